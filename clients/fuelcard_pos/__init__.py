"""POS client for the fuelcard TransactionService: retries that reuse the
request_id, typed errors, and a durable outbox for undelivered confirms and
cancels. The command line is `fuelcard-pos` (fuelcard_pos.cli)."""

from fuelcard_pos.client import (
    DEFAULT_DEADLINE_S,
    DEFAULT_TARGET,
    RETRYABLE_CODES,
    FieldViolation,
    PosClient,
    PosError,
    PosPending,
    RetryEvent,
    RetryPolicy,
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

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_TARGET",
    "RETRYABLE_CODES",
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
    "mask_card_number",
]
