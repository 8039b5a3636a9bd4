"""What a POS call ends in when it does not end in an answer: `PosError`
(the gRPC code, the google.rpc.ErrorInfo reason, the BadRequest field
violations, a RetryInfo delay) and `PosPending` (queued in the outbox), and
the codes and reasons that decide whether a request may be sent again.

A module of its own because both the client (which raises them) and the
outbox (which keeps what they leave undelivered) need them: each imports
this, neither imports the other's errors through the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "ERROR_DOMAIN",
    "RESYNC_REASONS",
    "RETRYABLE_CODES",
    "FieldViolation",
    "PosError",
    "PosPending",
]

ERROR_DOMAIN = "fuelcard.v1"

# The only codes worth another attempt. Everything else is an answer: the
# request is wrong (INVALID_ARGUMENT), the state forbids it
# (FAILED_PRECONDITION), or the thing does not exist (NOT_FOUND).
RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})

# UNAUTHENTICATED reasons about the terminal's key or counter: the server did
# nothing, and the client fixes it by signing on, so the same request (same
# request_id) goes through when sent again.
RESYNC_REASONS: frozenset[str] = frozenset({"KEY_NOT_ACCEPTED", "COUNTER_REPLAYED", "MAC_INVALID"})


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, from google.rpc.BadRequest."""

    field: str
    description: str
    reason: str = ""


class PosError(Exception):
    """An RPC that ended in an error status (after any retries)."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "",
                 domain: str = "", field_violations: Sequence[FieldViolation] = (),
                 retry_delay_s: float | None = None, method: str = "",
                 request_id: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_delay_s = retry_delay_s
        self.method = method
        self.request_id = request_id
        self.attempts = attempts

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE_CODES

    @property
    def resendable(self) -> bool:
        """The server did not act on the request, and the same request (same
        request_id) may go through if sent again later: a retryable code, or
        a refused key or counter the client has re-synced since. The outbox
        keeps such confirms and cancels."""
        return self.retryable or (self.code == grpc.StatusCode.UNAUTHENTICATED
                                  and self.reason in RESYNC_REASONS)

    def __str__(self) -> str:
        head = self.code.name + (f" {self.reason}" if self.reason else "")
        text = f"{head}: {self.message}" if self.message else head
        if self.field_violations:
            text += " (" + "; ".join(f"{v.field}: {v.description}"
                                     for v in self.field_violations) + ")"
        return text

    @classmethod
    def from_status(cls, code: grpc.StatusCode, message: str, status: status_pb2.Status | None,
                    *, method: str = "", request_id: str | None = None,
                    attempts: int = 1) -> PosError:
        """Read ErrorInfo, BadRequest and RetryInfo out of a google.rpc.Status."""
        reason = domain = ""
        violations: list[FieldViolation] = []
        retry_delay_s: float | None = None
        for detail in status.details if status is not None else ():
            try:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, domain = info.reason, info.domain
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations.extend(FieldViolation(v.field, v.description, v.reason)
                                      for v in bad.field_violations)
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_delay_s = max(0.0, retry.retry_delay.ToMilliseconds() / 1000.0)
            except DecodeError:
                continue  # a garbled detail must not hide the status itself
        return cls(code, message, reason=reason, domain=domain, field_violations=violations,
                   retry_delay_s=retry_delay_s, method=method, request_id=request_id,
                   attempts=attempts)

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError, *, method: str, request_id: str | None,
                       attempts: int) -> PosError:
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        message = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
        status: status_pb2.Status | None = None
        if isinstance(exc, grpc.Call):
            try:
                status = rpc_status.from_call(exc)
            except ValueError:  # code/message in the trailer disagree with the call's
                status = None
        return cls.from_status(code, message, status, method=method, request_id=request_id,
                               attempts=attempts)


class PosPending(Exception):
    """The confirm/cancel could not be delivered now and was queued in the
    outbox with its request_id; `Outbox.flush` will deliver it. Not a PosError
    on purpose: the operation is not failed, and it must not be redone with a
    new request_id."""

    def __init__(self, operation: Literal["confirm", "cancel", "reverse"], request_id: str,
                 hold_id: str,
                 outbox_entry_id: int, cause: PosError) -> None:
        super().__init__(f"{operation} of hold {hold_id} queued for delivery "
                         f"(outbox entry {outbox_entry_id}): {cause}")
        self.operation = operation
        self.request_id = request_id
        self.hold_id = hold_id
        self.outbox_entry_id = outbox_entry_id
        self.cause = cause
