"""The neutral settlement format (中立的清结算协议) on the adapter side.

Every channel's notifications and daily settlement files are turned into the
same records (settlement.proto SettlementRecord): the channel, payment or
refund, the channel's transaction id, the amount and fee in fen, the time and
the status. Money is exact: yuan strings are parsed with Decimal, never float.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from fuelcard.v1 import settlement_pb2

SHANGHAI = dt.timezone(dt.timedelta(hours=8), "Asia/Shanghai")  # no DST since 1991


class Kind(enum.IntEnum):
    PAYMENT = settlement_pb2.SETTLEMENT_KIND_PAYMENT
    REFUND = settlement_pb2.SETTLEMENT_KIND_REFUND


class Status(enum.IntEnum):
    SUCCESS = settlement_pb2.SETTLEMENT_STATUS_SUCCESS
    FAILED = settlement_pb2.SETTLEMENT_STATUS_FAILED
    PROCESSING = settlement_pb2.SETTLEMENT_STATUS_PROCESSING


class FormatError(ValueError):
    """A notification or settlement file that is not in the channel's format."""


@dataclass(frozen=True, slots=True)
class NeutralRecord:
    """settlement.proto SettlementRecord, as a plain value."""

    channel: int
    kind: Kind
    channel_txn_id: str
    amount_fen: int  # > 0; kind says the direction
    time: dt.datetime  # aware
    status: Status
    fee_fen: int = 0
    original_channel_txn_id: str = ""
    txn_id: str = ""  # ours: recharge_id / refund_id; "" when read from a channel file

    @property
    def business_date(self) -> dt.date:
        return self.time.astimezone(SHANGHAI).date()

    def to_proto(self) -> settlement_pb2.SettlementRecord:
        m = settlement_pb2.SettlementRecord(
            channel=self.channel,  # type: ignore[arg-type]
            kind=self.kind.value,
            channel_txn_id=self.channel_txn_id, txn_id=self.txn_id,
            original_channel_txn_id=self.original_channel_txn_id, amount_fen=self.amount_fen,
            fee_fen=self.fee_fen, status=self.status.value,
            business_date=self.business_date.isoformat())
        m.time.FromDatetime(self.time)
        return m

    @classmethod
    def from_proto(cls, m: settlement_pb2.SettlementRecord) -> NeutralRecord:
        return cls(channel=m.channel, kind=Kind(m.kind), channel_txn_id=m.channel_txn_id,
                   amount_fen=m.amount_fen, time=m.time.ToDatetime(dt.UTC),
                   status=Status(m.status), fee_fen=m.fee_fen,
                   original_channel_txn_id=m.original_channel_txn_id, txn_id=m.txn_id)


def parse_yuan(text: str, *, allow_negative: bool = False) -> int:
    """'12.34' -> 1234 fen, exactly (decimal digits to integer fen, never a
    float). At most two decimals; no exponent, no spaces, no NaN/Infinity, a
    leading '-' only if allowed. FormatError otherwise."""
    negative = allow_negative and text.startswith("-")
    body = text[1:] if negative else text
    int_part, dot, frac = body.partition(".")
    if (not int_part or not int_part.isascii() or not int_part.isdigit() or len(int_part) > 16
            or (dot and (not frac or not frac.isascii() or not frac.isdigit() or len(frac) > 2))):
        raise FormatError(f"not a yuan amount with at most 2 decimals: {text!r}")
    fen = int(int_part) * 100 + (int(frac) * (10 if len(frac) == 1 else 1) if frac else 0)
    return -fen if negative else fen


def parse_yuan_decimal(text: str) -> int:
    """The same through Decimal, for cross-checking parse_yuan."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise FormatError(f"not a yuan amount: {text!r}") from None
    if not value.is_finite() or value.as_tuple().exponent < -2:  # type: ignore[operator]
        raise FormatError(f"not a yuan amount with at most 2 decimals: {text!r}")
    return int(value * 100)


def format_yuan(fen: int) -> str:
    """1234 -> '12.34'; -5 -> '-0.05'."""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(fen), 100)
    return f"{sign}{whole}.{cents:02d}"


def parse_fen(text: str) -> int:
    """A channel's amount in fen as decimal digits ('000000001234' -> 1234)."""
    if not text or not text.isascii() or not text.isdigit():
        raise FormatError(f"not an amount in fen: {text!r}")
    return int(text)
