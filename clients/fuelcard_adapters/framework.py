"""The adapter framework: one flow for every channel.

A channel POSTs a payment notification (an HTTP request in its own shape).
The channel's mapping module (bankcard, wechat, alipay, ecny) checks the
channel's signature and turns it into a neutral `Event`; the framework makes
the core call (signed, idempotent on the channel's transaction id) and hands
the `Outcome` back to the mapping, which renders what the channel expects.

  accepted  - the core has it (credited, refunded, declined, or nothing to
              do): the channel must stop notifying. A payment the core
              refuses for good (Result.refund_payer: the core's signed
              DECLINED with refund_payment) is accepted too, with reason
              REFUND_PAYER: the money goes back to the payer through the
              channel, never a retry.
  retry     - not now (the core is unreachable, or a refund arrived before
              its payment): the channel's failure answer, so it notifies
              again later (every channel retries failed notifications).
  rejected  - the notification is not genuine or not well-formed: the
              channel's failure answer; nothing reaches the core.

Adding a channel = one module with a `Mapping` (parse_notification, reply)
and a settlement-file parser (parse_bill), registered in channels.py.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from fuelcard.v1 import common_pb2

from fuelcard_adapters.core import AsyncCoreClient, CoreClient, CoreError
from fuelcard_adapters.neutral import FormatError, NeutralRecord

log = logging.getLogger(__name__)


class BadNotification(Exception):
    """Not a genuine, well-formed notification of this channel. The message
    names what is wrong, never a value from the notification."""


@dataclass(frozen=True)
class HttpRequest:
    """What a channel sends: an HTTP POST's headers (lower-case names) and body."""

    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class EventKind(enum.Enum):
    PAYMENT = "payment"   # money collected: recharge
    REFUND = "refund"     # money given back: refund the recharge
    IGNORE = "ignore"     # a state that moves no money (waiting, closed unpaid)


@dataclass(frozen=True)
class Event:
    """A notification in neutral terms."""

    kind: EventKind
    channel_txn_id: str = ""     # the payment's id at the channel
    account_id: str = ""         # the account to credit (payments)
    amount_fen: int = 0          # this payment / this refund
    refund_id: str = ""          # the channel's refund id (refunds)
    refunded_total_fen: int = 0  # a running refunded total instead of amount_fen
    # The payment's total as a refund notification restates it (Alipay's
    # total_amount): checked against the core's record of the payment.
    payment_total_fen: int = 0

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        """What makes two notifications the same event: a duplicate (same
        key) is answered as the first one was."""
        return (self.kind.value, self.channel_txn_id, self.refund_id, self.amount_fen,
                self.refunded_total_fen)


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""       # why not accepted, or how (APPROVED, DECLINED, ...)
    balance_fen: int = 0
    # The core refused the payment for good: refund it to the payer through
    # the channel (the core's settlement exception names it for finance).
    refund_payer: bool = False
    settlement_exception_id: str = ""


class ChannelMapping(Protocol):
    """What a channel module provides."""

    channel: int

    def parse_notification(self, request: HttpRequest) -> Event:
        """Check the channel's signature and read the notification; raise
        BadNotification if it is not genuine or not well-formed."""
        ...

    def reply(self, result: Result) -> HttpReply:
        """What the channel expects back for this result."""
        ...


# A core call as the flow asks for it: a CoreClient method's name and arguments.
CoreCall = tuple[str, tuple[Any, ...], dict[str, Any]]


class BillParser(Protocol):
    def __call__(self, lines: Iterable[str]) -> Iterator[NeutralRecord]: ...


@dataclass
class Adapter:
    mapping: ChannelMapping
    core: CoreClient

    def handle(self, request: HttpRequest) -> HttpReply:
        return self.mapping.reply(self.process(request))

    def process(self, request: HttpRequest) -> Result:
        event = self.parse(request)
        return event if isinstance(event, Result) else self.apply(event)

    def parse(self, request: HttpRequest) -> Event | Result:
        """The notification as an Event, or the Result of refusing it."""
        try:
            return self.mapping.parse_notification(request)
        except (BadNotification, FormatError) as exc:
            log.warning("channel %d: notification rejected: %s", self.mapping.channel, exc)
            return Result(Outcome.REJECTED, str(exc))

    def apply(self, event: Event) -> Result:
        """The core call for one genuine notification (idempotent: the same
        event always makes the same request)."""
        steps = self._steps(event)
        try:
            call = next(steps)
            while True:
                name, args, kwargs = call
                try:
                    answer = getattr(self.core, name)(*args, **kwargs)
                except CoreError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(answer)
        except StopIteration as done:
            result: Result = done.value
            return result

    async def apply_async(self, event: Event, core: AsyncCoreClient) -> Result:
        """`apply`, with the core calls made on the caller's asyncio loop."""
        steps = self._steps(event)
        try:
            call = next(steps)
            while True:
                name, args, kwargs = call
                try:
                    answer = await getattr(core, name)(*args, **kwargs)
                except CoreError as exc:
                    call = steps.throw(exc)
                else:
                    call = steps.send(answer)
        except StopIteration as done:
            result: Result = done.value
            return result

    def _steps(self, event: Event) -> Generator[CoreCall, Any, Result]:
        """What to ask the core and what its answers mean, written once for
        both clients: yields each call (method name and arguments), is sent
        the answer or thrown the CoreError."""
        if event.kind is EventKind.IGNORE:
            return Result(Outcome.ACCEPTED, "IGNORED")
        try:
            if event.kind is EventKind.PAYMENT:
                paid = yield ("recharge", (event.account_id, event.channel_txn_id,
                                           event.amount_fen), {})
                if paid.decision == common_pb2.DECISION_DECLINED:
                    # The core will not take the money: the payer must be
                    # refunded through the channel; notifying again would get
                    # the same answer, so the channel is told to stop.
                    log.warning("channel %d: recharge refused (%s): refund the payer",
                                self.mapping.channel,
                                common_pb2.DeclineReason.Name(paid.decline_reason))
                    return Result(Outcome.ACCEPTED,
                                  "REFUND_PAYER" if paid.refund_payment else "DECLINED",
                                  paid.balance_fen, refund_payer=paid.refund_payment,
                                  settlement_exception_id=paid.settlement_exception_id)
                return Result(Outcome.ACCEPTED, "APPROVED", paid.balance_fen)
            if event.payment_total_fen:
                # Our record of the payment must say what the channel says:
                # a refund of a payment we know under another amount is not
                # ours to apply (a person looks at it).
                known = yield ("get_recharge", (event.channel_txn_id,), {})
                if known.recharge.amount_fen != event.payment_total_fen:
                    log.warning("channel %d: refund notification states another payment total",
                                self.mapping.channel)
                    return Result(Outcome.REJECTED, "PAYMENT_TOTAL_MISMATCH")
            refunded = yield ("refund", (event.channel_txn_id, event.refund_id),
                              {"amount_fen": event.amount_fen,
                               "refunded_total_fen": event.refunded_total_fen})
            return Result(Outcome.ACCEPTED, "REFUNDED", refunded.balance_fen)
        except CoreError as exc:
            if exc.reason == "REFUND_ALREADY_COVERED":
                return Result(Outcome.ACCEPTED, exc.reason)
            if exc.code is grpc.StatusCode.NOT_FOUND and exc.reason == "RECHARGE_NOT_FOUND":
                # A refund before its payment: out of order; the channel retries.
                return Result(Outcome.RETRY, exc.reason)
            log.warning("channel %d: core refused: %s", self.mapping.channel, exc)
            return Result(Outcome.RETRY, exc.reason or exc.code.name)
