"""The adapter's link to the core: signed Recharge and RefundRecharge calls,
and GetRecharge reads whose signed answers are checked the same way.

Each call carries ONE request_id on every attempt, derived from the channel's
own id of the transaction (so a channel's duplicate notification, even after
an adapter restart, is the same request to the core). Attempts are retried
with backoff, bounded in number, only for codes that mean "try again". Every
request is signed with the adapter's SM2 key (registered for its channel);
every answer's SM2 signature is checked against the core's key before the
adapter believes it. The current OpenTelemetry context (the notification's
span, when the notification service serves it) travels as `traceparent`
metadata, so the core's span of the call joins the notification's trace.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from fuelcard.v1 import funding_pb2, funding_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fuelcard_adapters.signing import Sm2Signer, canonical, sm2_verify

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})
T = TypeVar("T")
_PROPAGATOR = TraceContextTextMapPropagator()


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC metadata (empty outside a span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


class CoreError(Exception):
    """The core refused the call (or could not be reached in time)."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(f"{code.name} {reason}")
        self.code = code
        self.reason = reason


def request_id_for(operation: str, channel: int, channel_id: str) -> str:
    """A stable request_id for one channel transaction: the same notification
    always maps to the same key, whichever adapter process handles it."""
    digest = hashlib.sha256(f"{operation}\0{channel}\0{channel_id}".encode()).hexdigest()
    return f"{operation[:3]}-{digest[:40]}"


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return str(info.reason)
    return ""


# --- the signed requests and the checks of the signed answers, shared by
# the blocking client (library use, tests) and the asyncio one (the
# notification service calls the core from its event loop) ----------------


def _checked(core_public_key: bytes, signed: bytes, signature: bytes) -> None:
    if not sm2_verify(core_public_key, signed, signature):
        raise CoreError(grpc.StatusCode.UNAUTHENTICATED, "ANSWER_SIGNATURE_INVALID")


def recharge_request(key: Sm2Signer, channel: int, account_id: str, channel_txn_id: str,
                     amount_fen: int) -> funding_pb2.RechargeRequest:
    req = funding_pb2.RechargeRequest(
        request_id=request_id_for("recharge", channel, channel_txn_id),
        account_id=account_id, channel=channel,  # type: ignore[arg-type]
        channel_txn_id=channel_txn_id, amount_fen=amount_fen)
    req.signature = key.sign(canonical(
        "Recharge", req.request_id, req.account_id, req.channel, req.channel_txn_id,
        req.amount_fen))
    return req


def check_recharge(core_public_key: bytes, req: funding_pb2.RechargeRequest,
                   resp: funding_pb2.RechargeResponse) -> funding_pb2.RechargeResponse:
    r = resp.recharge
    _checked(core_public_key, canonical(
        "RechargeResponse", req.account_id, req.channel, req.channel_txn_id, req.amount_fen,
        resp.decision, resp.decline_reason, r.recharge_id, r.account_id, r.channel,
        r.channel_txn_id, r.amount_fen, r.create_time.seconds, r.create_time.nanos,
        resp.balance_fen), resp.signature)
    return resp


def check_get_recharge(core_public_key: bytes, req: funding_pb2.GetRechargeRequest,
                       resp: funding_pb2.GetRechargeResponse) -> funding_pb2.GetRechargeResponse:
    r = resp.recharge
    _checked(core_public_key, canonical(
        "GetRechargeResponse", req.channel, req.channel_txn_id, r.recharge_id, r.account_id,
        r.channel, r.channel_txn_id, r.amount_fen, r.create_time.seconds,
        r.create_time.nanos, resp.refunded_fen), resp.signature)
    return resp


def refund_request(key: Sm2Signer, channel: int, channel_txn_id: str, channel_refund_id: str,
                   amount_fen: int, refunded_total_fen: int) -> funding_pb2.RefundRechargeRequest:
    req = funding_pb2.RefundRechargeRequest(
        request_id=request_id_for("refund", channel, channel_refund_id),
        channel=channel,  # type: ignore[arg-type]
        channel_txn_id=channel_txn_id, channel_refund_id=channel_refund_id,
        amount_fen=amount_fen, refunded_total_fen=refunded_total_fen)
    req.signature = key.sign(canonical(
        "RefundRecharge", req.request_id, req.channel, req.channel_txn_id,
        req.channel_refund_id, req.amount_fen, req.refunded_total_fen))
    return req


def check_refund(core_public_key: bytes, req: funding_pb2.RefundRechargeRequest,
                 resp: funding_pb2.RefundRechargeResponse) -> funding_pb2.RefundRechargeResponse:
    f = resp.refund
    _checked(core_public_key, canonical(
        "RefundRechargeResponse", req.channel, req.channel_txn_id, req.channel_refund_id,
        req.amount_fen, req.refunded_total_fen, f.refund_id, f.recharge_id, f.account_id,
        f.amount_fen, f.debited_fen, f.shortfall_fen, f.create_time.seconds,
        f.create_time.nanos, resp.balance_fen), resp.signature)
    return resp


@dataclass
class CoreClient:
    funding: funding_pb2_grpc.FundingServiceStub
    channel: int
    key: Sm2Signer
    core_public_key: bytes  # X || Y, SecurityService.GetServerSigningKey
    attempts: int = 4
    timeout_s: float = 5.0
    backoff_s: float = 0.05
    sleep: Callable[[float], None] = time.sleep

    def _call(self, fn: Callable[[], T]) -> T:
        for attempt in range(self.attempts):
            try:
                return fn()
            except grpc.RpcError as err:
                code = err.code()
                if code not in RETRYABLE or attempt + 1 == self.attempts:
                    raise CoreError(code, _reason(err)) from None
                self.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def recharge(self, account_id: str, channel_txn_id: str, amount_fen: int
                 ) -> funding_pb2.RechargeResponse:
        req = recharge_request(self.key, self.channel, account_id, channel_txn_id, amount_fen)
        return check_recharge(self.core_public_key, req, self._call(lambda: self.funding.Recharge(
            req, timeout=self.timeout_s, metadata=trace_metadata())))

    def get_recharge(self, channel_txn_id: str) -> funding_pb2.GetRechargeResponse:
        """The core's record of one of this channel's payments (and what was
        refunded of it), believed only if the core's signature verifies."""
        req = funding_pb2.GetRechargeRequest(
            channel=self.channel,  # type: ignore[arg-type]
            channel_txn_id=channel_txn_id)
        return check_get_recharge(self.core_public_key, req, self._call(
            lambda: self.funding.GetRecharge(req, timeout=self.timeout_s,
                                             metadata=trace_metadata())))

    def refund(self, channel_txn_id: str, channel_refund_id: str, *, amount_fen: int = 0,
               refunded_total_fen: int = 0) -> funding_pb2.RefundRechargeResponse:
        req = refund_request(self.key, self.channel, channel_txn_id, channel_refund_id,
                             amount_fen, refunded_total_fen)
        return check_refund(self.core_public_key, req, self._call(
            lambda: self.funding.RefundRecharge(req, timeout=self.timeout_s,
                                                metadata=trace_metadata())))


@dataclass
class AsyncCoreClient:
    """The same calls over grpc.aio, for a caller on an asyncio loop (no
    thread per call in flight)."""

    funding: funding_pb2_grpc.FundingServiceAsyncStub
    channel: int
    key: Sm2Signer
    core_public_key: bytes
    attempts: int = 4
    timeout_s: float = 5.0
    backoff_s: float = 0.05

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self.attempts):
            try:
                return await fn()
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code not in RETRYABLE or attempt + 1 == self.attempts:
                    raise CoreError(code, _reason(err)) from None
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def recharge(self, account_id: str, channel_txn_id: str, amount_fen: int
                       ) -> funding_pb2.RechargeResponse:
        req = recharge_request(self.key, self.channel, account_id, channel_txn_id, amount_fen)
        return check_recharge(self.core_public_key, req, await self._call(
            lambda: self.funding.Recharge(req, timeout=self.timeout_s,
                                          metadata=trace_metadata())))

    async def get_recharge(self, channel_txn_id: str) -> funding_pb2.GetRechargeResponse:
        req = funding_pb2.GetRechargeRequest(
            channel=self.channel,  # type: ignore[arg-type]
            channel_txn_id=channel_txn_id)
        return check_get_recharge(self.core_public_key, req, await self._call(
            lambda: self.funding.GetRecharge(req, timeout=self.timeout_s,
                                             metadata=trace_metadata())))

    async def refund(self, channel_txn_id: str, channel_refund_id: str, *, amount_fen: int = 0,
                     refunded_total_fen: int = 0) -> funding_pb2.RefundRechargeResponse:
        req = refund_request(self.key, self.channel, channel_txn_id, channel_refund_id,
                             amount_fen, refunded_total_fen)
        return check_refund(self.core_public_key, req, await self._call(
            lambda: self.funding.RefundRecharge(req, timeout=self.timeout_s,
                                                metadata=trace_metadata())))
