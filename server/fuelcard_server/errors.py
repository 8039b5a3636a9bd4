"""gRPC errors as AIP-193 describes them.

Every error leaves the server as a google.rpc.Status with exactly one
ErrorInfo (domain `fuelcard.v1`, an UPPER_SNAKE reason); INVALID_ARGUMENT also
carries a BadRequest naming the bad fields (the first VIOLATIONS_LISTED of
them; ErrorInfo.metadata["violation_count"] says how many there are).
Messages are fixed English text: they never echo a card number, phone or ID
number back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "fuelcard.v1"
# A status travels in trailers (grpc-message and grpc-status-details-bin),
# and clients refuse trailers past 8-16 KiB: a batch with hundreds of bad
# lines answered RESOURCE_EXHAUSTED "received metadata size exceeds hard
# limit", with no ErrorInfo, when every violation went into it. So a
# BadRequest lists the first 20 and the count says how many there are; and
# since a field path may hold the caller's own text (the unknown keys of a
# rule set document), each violation is clipped and the listed ones stop at
# a byte budget: a whole status stays under ~4 KiB (~5 KiB in base64).
VIOLATIONS_LISTED = 20
FIELD_CHARS_MAX = 128
DESCRIPTION_CHARS_MAX = 200
VIOLATIONS_BYTES_MAX = 2048
# Past this, the message gives the count instead of the field names.
MESSAGE_CHARS_MAX = 1024
# ErrorInfo.metadata key of an INVALID_ARGUMENT: how many fields are invalid.
VIOLATION_COUNT_KEY = "violation_count"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str
    reason: str


@dataclass
class ApiError(Exception):
    """An error to send to the caller as a gRPC status."""

    code: grpc.StatusCode
    reason: str
    message: str
    violations: Sequence[FieldViolation] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    retry_delay_ms: int | None = None

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        info.metadata.update(self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        status.details.append(detail)
        if self.violations:
            bad = error_details_pb2.BadRequest()
            for v in listed(self.violations):
                bad.field_violations.add(field=v.field, description=v.description, reason=v.reason)
            detail = any_pb2.Any()
            detail.Pack(bad)
            status.details.append(detail)
        if self.retry_delay_ms is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromMilliseconds(self.retry_delay_ms)
            detail = any_pb2.Any()
            detail.Pack(retry)
            status.details.append(detail)
        return rpc_status.to_status(status)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def listed(violations: Sequence[FieldViolation]) -> list[FieldViolation]:
    """The violations a status carries: the first VIOLATIONS_LISTED, each
    clipped, as many as fit VIOLATIONS_BYTES_MAX (at least one)."""
    out: list[FieldViolation] = []
    size = 0
    for v in violations[:VIOLATIONS_LISTED]:
        clipped = FieldViolation(_clip(v.field, FIELD_CHARS_MAX),
                                 _clip(v.description, DESCRIPTION_CHARS_MAX), v.reason)
        size += sum(len(t.encode()) + 3 for t in (clipped.field, clipped.description, v.reason))
        if out and size > VIOLATIONS_BYTES_MAX:
            break
        out.append(clipped)
    return out


def invalid(violations: Sequence[FieldViolation]) -> ApiError:
    """INVALID_ARGUMENT naming the bad fields: by name in the message when
    they are all listed and the names are short, otherwise the count and how
    many are listed (the ApiError keeps them all, for callers in this
    process such as the CLI)."""
    assert violations, "an INVALID_ARGUMENT error names at least one field"
    total = len(violations)
    shown = listed(violations)
    message = "invalid request: " + ", ".join(v.field for v in shown)
    if len(shown) < total or len(message) > MESSAGE_CHARS_MAX:
        message = (f"{total} fields are invalid; the first {len(shown)} are listed"
                   if len(shown) < total else f"{total} fields are invalid; all are listed")
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        violations[0].reason,
        message,
        violations,
        metadata={VIOLATION_COUNT_KEY: str(total)},
    )


MALFORMED_REQUEST = "MALFORMED_REQUEST"


def malformed(message_type: str, violation: FieldViolation) -> ApiError:
    """INVALID_ARGUMENT for bytes that are not a `message_type` message:
    corrupt wire format, or a string field that is not UTF-8. `violation`
    names the field where decoding failed ("" if none can be named)."""
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        MALFORMED_REQUEST,
        f"the request is not a valid {message_type} message",
        [violation],
        metadata={VIOLATION_COUNT_KEY: "1"},
    )


def not_found(reason: str, what: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, reason, f"{what} not found")


_PRECONDITION_MESSAGES = {
    "REQUEST_ID_REUSED": "request_id was already used for a different request",
    "HOLD_ALREADY_CONFIRMED": "the hold is already confirmed",
    "HOLD_CANCELLED": "the hold was cancelled",
    "CHANNEL_TXN_REUSED": "the channel transaction id was already used for a different recharge",
    "CARD_NUMBER_IN_USE": "the card number is already issued",
    "CARD_CLOSED": "the card is closed and cannot be reopened",
    "NOT_AN_ALLOCATED_SUB_ACCOUNT": "every line must name an ALLOCATED sub-account of the parent",
    "NOT_THE_PARENT_ACCOUNT": "points can only move to the member's parent account",
    "ACCOUNT_USES_PARENT_BALANCE": "a SHARED sub-account holds no money of its own",
    "PARENT_NOT_TOP_LEVEL": "sub-accounts can only be opened under a top-level account",
    "SIGN_ON_NEEDS_TLS": "working keys are only handed out over mutual TLS",
    "PIN_NEEDS_TERMINAL_KEY": "PIN blocks are read with the key of a terminal named by its "
                              "certificate (mutual TLS)",
    "OLD_PIN_WRONG": "the current PIN given to change it is wrong",
    "PIN_LOCKED": "the card's PIN is locked after too many wrong PINs; an operator must reset it",
    "NO_PHONE_ON_FILE": "the holder has no phone number to send a step-up code to",
    "TOO_MANY_STEP_UPS": "too many step-up codes were asked for this subject; try again later",
    "CARD_NUMBER_NOT_STORED": "this card's number is not stored (a seeded card)",
    "HOLD_SUSPENDED": "the hold was suspended for risk review and has not been approved",
    "HOLD_REJECTED": "a reviewer rejected the hold",
    "HOLD_NOT_SUSPENDED": "the hold is not awaiting review",
    "ACCOUNT_NOT_CLOSED": "only a closed account's personal data can be erased: no money or "
                          "anything held, every card closed and every sub-account erased",
}


def failed_precondition(reason: str) -> ApiError:
    message = _PRECONDITION_MESSAGES.get(reason, reason.lower().replace("_", " "))
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, reason, message)


def permission_denied(reason: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, reason,
                    "the caller may not perform this operation on this object")


def unauthenticated(reason: str, message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def unavailable(reason: str, message: str, retry_delay_ms: int = 200) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, reason, message, retry_delay_ms=retry_delay_ms)


def internal() -> ApiError:
    return ApiError(grpc.StatusCode.INTERNAL, "INTERNAL", "internal error")
