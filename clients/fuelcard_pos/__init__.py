"""POS client for the fuelcard TransactionService: retries that reuse the
request_id, typed errors, and a durable outbox for undelivered confirms and
cancels; on a secure link, a terminal that signs on and MACs its requests
with a durable counter (fuelcard_pos.terminal). The command line is
`fuelcard-pos` (fuelcard_pos.cli)."""

from fuelcard_pos.client import (
    DEFAULT_DEADLINE_S,
    DEFAULT_TARGET,
    RESYNC_REASONS,
    RETRYABLE_CODES,
    FieldViolation,
    PosClient,
    PosError,
    PosPending,
    RetryEvent,
    RetryPolicy,
    SignOnEvent,
    mask_card_number,
)
from fuelcard_pos.outbox import (
    DEFAULT_MAX_ENTRIES,
    Delivery,
    FlushReport,
    Outbox,
    OutboxEntry,
    OutboxFull,
)
from fuelcard_pos.terminal import CounterExhausted, TerminalStore, WorkingKey

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_TARGET",
    "RESYNC_REASONS",
    "RETRYABLE_CODES",
    "CounterExhausted",
    "Delivery",
    "FieldViolation",
    "FlushReport",
    "Outbox",
    "OutboxEntry",
    "OutboxFull",
    "PosClient",
    "PosError",
    "PosPending",
    "RetryEvent",
    "RetryPolicy",
    "SignOnEvent",
    "TerminalStore",
    "WorkingKey",
    "mask_card_number",
]
