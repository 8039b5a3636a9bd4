"""The numbers the database holds for states, modes and kinds, by name.

Each enum takes its values from the generated proto enum of its family
(fuelcard.v1), with the family prefix dropped: `HoldState.SUSPENDED` is
`HOLD_STATE_SUSPENDED`, so the two cannot drift. The stored functions name
the same numbers once, in sql/functions/states.sql
(`fc.hold_state_suspended()`); tests/test_states.py holds the SQL names, these
enums and the proto enums to one another. SQL text in Python uses the SQL
names, Python code these.
"""

from __future__ import annotations

from enum import IntEnum

from fuelcard.v1 import account_pb2, common_pb2, events_pb2, risk_pb2, settlement_pb2, step_up_pb2


class HoldState(IntEnum):
    """holds.state: the life of a reservation at the pump."""

    AUTHORIZED = common_pb2.HOLD_STATE_AUTHORIZED
    CONFIRMED = common_pb2.HOLD_STATE_CONFIRMED
    CANCELLED = common_pb2.HOLD_STATE_CANCELLED
    EXPIRED = common_pb2.HOLD_STATE_EXPIRED
    SUSPENDED = common_pb2.HOLD_STATE_SUSPENDED
    REJECTED = common_pb2.HOLD_STATE_REJECTED


class FundingMode(IntEnum):
    """accounts.funding_mode: how a sub-account is funded. UNSPECIFIED on a
    top-level account, which funds itself."""

    UNSPECIFIED = account_pb2.FUNDING_MODE_UNSPECIFIED
    ALLOCATED = account_pb2.FUNDING_MODE_ALLOCATED
    SHARED = account_pb2.FUNDING_MODE_SHARED


class AccountType(IntEnum):
    """accounts.kind of a customer account."""

    PERSONAL = account_pb2.ACCOUNT_TYPE_PERSONAL
    CORPORATE = account_pb2.ACCOUNT_TYPE_CORPORATE
    FAMILY = account_pb2.ACCOUNT_TYPE_FAMILY


# accounts.kind of the system accounts (FUEL_SALES, CHANNEL_CLEARING_*,
# POINTS_*), which the API never shows: not in the proto.
ACCOUNT_KIND_SYSTEM = 100


class AccountStatus(IntEnum):
    ACTIVE = account_pb2.ACCOUNT_STATUS_ACTIVE
    FROZEN = account_pb2.ACCOUNT_STATUS_FROZEN


class CardStatus(IntEnum):
    ACTIVE = account_pb2.CARD_STATUS_ACTIVE
    BLOCKED = account_pb2.CARD_STATUS_BLOCKED
    CLOSED = account_pb2.CARD_STATUS_CLOSED


class LedgerEntryKind(IntEnum):
    """journal.kind."""

    RECHARGE = events_pb2.LEDGER_ENTRY_KIND_RECHARGE
    PURCHASE = events_pb2.LEDGER_ENTRY_KIND_PURCHASE
    POINTS_EARNED = events_pb2.LEDGER_ENTRY_KIND_POINTS_EARNED
    POINTS_REDEEMED = events_pb2.LEDGER_ENTRY_KIND_POINTS_REDEEMED
    ALLOCATION = events_pb2.LEDGER_ENTRY_KIND_ALLOCATION
    POINTS_TRANSFER = events_pb2.LEDGER_ENTRY_KIND_POINTS_TRANSFER
    POINTS_EXPIRED = events_pb2.LEDGER_ENTRY_KIND_POINTS_EXPIRED
    RECHARGE_REFUND = events_pb2.LEDGER_ENTRY_KIND_RECHARGE_REFUND
    MANUAL_ADJUSTMENT = events_pb2.LEDGER_ENTRY_KIND_MANUAL_ADJUSTMENT
    SALE_REFUND = events_pb2.LEDGER_ENTRY_KIND_SALE_REFUND
    OVERRUN_RECEIVABLE = events_pb2.LEDGER_ENTRY_KIND_OVERRUN_RECEIVABLE


class Asset(IntEnum):
    """journal.asset: what an entry moves."""

    MONEY = events_pb2.ASSET_MONEY
    POINTS = events_pb2.ASSET_POINTS


class RiskDecision(IntEnum):
    """A risk rule's action beyond scoring (risk_rules.action, 0 when it only
    scores) and a rule set's fallback."""

    APPROVE = risk_pb2.RISK_DECISION_APPROVE
    REVIEW = risk_pb2.RISK_DECISION_REVIEW
    DECLINE = risk_pb2.RISK_DECISION_DECLINE


class StepUpKind(IntEnum):
    """step_up_challenges.kind: what a step-up challenge confirms."""

    RECHARGE = step_up_pb2.STEP_UP_KIND_RECHARGE
    PIN_RESET = step_up_pb2.STEP_UP_KIND_PIN_RESET
    LIMIT_RAISE = step_up_pb2.STEP_UP_KIND_LIMIT_RAISE
    REVEAL_CARD_NUMBER = step_up_pb2.STEP_UP_KIND_REVEAL_CARD_NUMBER
    ANOMALY = step_up_pb2.STEP_UP_KIND_ANOMALY
    HOLDER_DATA_EXPORT = step_up_pb2.STEP_UP_KIND_HOLDER_DATA_EXPORT
    SALE_REFUND = step_up_pb2.STEP_UP_KIND_SALE_REFUND
    PHONE_CHANGE = step_up_pb2.STEP_UP_KIND_PHONE_CHANGE


class SettlementKind(IntEnum):
    """settlement_records.kind (reconciliation_breaks.record_kind)."""

    PAYMENT = settlement_pb2.SETTLEMENT_KIND_PAYMENT
    REFUND = settlement_pb2.SETTLEMENT_KIND_REFUND


class SettlementStatus(IntEnum):
    SUCCESS = settlement_pb2.SETTLEMENT_STATUS_SUCCESS
    FAILED = settlement_pb2.SETTLEMENT_STATUS_FAILED
    PROCESSING = settlement_pb2.SETTLEMENT_STATUS_PROCESSING


class BreakKind(IntEnum):
    """reconciliation_breaks.kind: how our record and the channel's differ."""

    MISSING_OURS = settlement_pb2.BREAK_KIND_MISSING_OURS
    MISSING_THEIRS = settlement_pb2.BREAK_KIND_MISSING_THEIRS
    AMOUNT_MISMATCH = settlement_pb2.BREAK_KIND_AMOUNT_MISMATCH
    STATUS_MISMATCH = settlement_pb2.BREAK_KIND_STATUS_MISMATCH


class ReviewState(IntEnum):
    """holds.review_state: where a hold the risk engine suspended stands in
    its review (NULL on a hold never suspended). Not in the proto: a hold
    shows its review through its state."""

    PENDING = 1
    APPROVED = 2
    REJECTED = 3


class PrincipalKind(IntEnum):
    """fc.principals.kind: who logs in to the JSON API. Not in the proto: the
    core sees a principal only as the approver of a sub-account's limit raise."""

    HOLDER = 1
    FLEET_MANAGER = 2


# Each enum and the proto enum it takes its values from (its prefix is the
# proto enum's name in UPPER_SNAKE).
PROTO_ENUMS: dict[type[IntEnum], str] = {
    HoldState: "fuelcard.v1.HoldState",
    FundingMode: "fuelcard.v1.FundingMode",
    AccountType: "fuelcard.v1.AccountType",
    AccountStatus: "fuelcard.v1.AccountStatus",
    CardStatus: "fuelcard.v1.CardStatus",
    LedgerEntryKind: "fuelcard.v1.LedgerEntryKind",
    Asset: "fuelcard.v1.Asset",
    RiskDecision: "fuelcard.v1.RiskDecision",
    StepUpKind: "fuelcard.v1.StepUpKind",
    SettlementKind: "fuelcard.v1.SettlementKind",
    SettlementStatus: "fuelcard.v1.SettlementStatus",
    BreakKind: "fuelcard.v1.BreakKind",
}
