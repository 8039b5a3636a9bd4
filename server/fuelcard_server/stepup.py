"""Step-up verification (多因素认证): one-time codes for high-risk operations.

A caller asks for a challenge (SecurityService.CreateStepUpChallenge) naming
the operation: its kind, its subject (account or card) and its amount. The
server makes a 6-digit code, stores only a keyed hash of it (HMAC-SM3 under a
key derived from the root key, over the challenge id and the code) and hands
the code to an OtpSender, which delivers it to the phone of the subject's
holder. The challenge is answered OK only once the sender took the code
(fc.step_up_sent, 0017): a retry after a failed send gets a fresh code. The
operation's request then carries a StepUp (challenge id + code).

The check runs inside PostgreSQL, in the same transaction as the operation
(fc.consume_step_up, 0006): the code is used if and only if the operation
commits, a wrong code costs an attempt even though the operation does not
run, and a retry of an operation already answered (same caller and
request_id) passes without a fresh code. `gate()` builds that statement.

Hook for other code (the risk engine, on a new device or impossible travel):
call `StepUps.verify()` before the operation (its own transaction), or put
`fc.consume_step_up(p_required => true, ...)` in front of the
operation's function as `gate()` does; on a refusal raise `refusal_error()`.

The destination (the holder's phone) is never logged or put in an error: only
its masked form goes back to the caller. Codes are never logged either.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, LiteralString, Protocol

import grpc

from fuelcard_server import errors, gm, keys
from fuelcard_server.db import Database
from fuelcard_server.holder_data import HolderSeal
from fuelcard_server.privacy import mask_phone
from fuelcard_server.states import StepUpKind

log = logging.getLogger(__name__)

CODE_DIGITS = 6
RECHARGE, PIN_RESET, LIMIT_RAISE = StepUpKind.RECHARGE, StepUpKind.PIN_RESET, StepUpKind.LIMIT_RAISE
REVEAL_CARD_NUMBER, ANOMALY = StepUpKind.REVEAL_CARD_NUMBER, StepUpKind.ANOMALY
HOLDER_DATA_EXPORT = StepUpKind.HOLDER_DATA_EXPORT
SALE_REFUND, PHONE_CHANGE = StepUpKind.SALE_REFUND, StepUpKind.PHONE_CHANGE
KIND_NAMES: dict[int, str] = {RECHARGE: "recharge", PIN_RESET: "PIN reset", LIMIT_RAISE: "limit raise",
                              REVEAL_CARD_NUMBER: "card number reveal", ANOMALY: "transaction check",
                              HOLDER_DATA_EXPORT: "export of your personal data",
                              SALE_REFUND: "sale refund", PHONE_CHANGE: "phone number change"}

CREATE_SQL = (
    "SELECT fc.create_step_up(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_uid => %(uid)s::uuid, p_kind => %(kind)s::smallint, p_subject => %(subject)s::uuid,"
    " p_amount => %(amount)s::bigint, p_code_hash => %(code_hash)s,"
    " p_expires => %(expires)s::timestamptz, p_max_attempts => %(max_attempts)s::smallint,"
    " p_max_open => %(max_open)s::integer, p_window => %(window)s::interval,"
    " p_now => %(now)s::timestamptz, p_send_timeout => %(send_timeout)s::interval)")
SENT_SQL = "SELECT fc.step_up_sent(p_uid => %(uid)s::uuid, p_now => %(now)s::timestamptz)"
NOT_SENT_SQL = "SELECT fc.step_up_not_sent(p_uid => %(uid)s::uuid)"
# The gate's call, its placeholders named step_up_* so that they never meet
# the guarded operation's own (caller, request_id, now, ...) in one statement.
CONSUME_CALL = (
    "fc.consume_step_up(p_caller => %(step_up_caller)s, p_request_id => %(step_up_request_id)s,"
    " p_operation => %(step_up_operation)s, p_required => %(step_up_required)s::boolean,"
    " p_kind => %(step_up_kind)s::smallint, p_subject => %(step_up_subject)s::uuid,"
    " p_amount => %(step_up_amount)s::bigint, p_challenge => %(step_up_challenge)s::uuid,"
    " p_code_hash => %(step_up_code_hash)s, p_now => %(step_up_now)s::timestamptz)")
CONSUME_SQL = "SELECT " + CONSUME_CALL


class OtpSender(Protocol):
    """Delivers a one-time code. Production: an SMS gateway client behind this
    interface. It must not log the destination or the code."""

    async def send(self, destination: str, code: str, *, challenge_id: str, kind: int) -> None: ...


class FileOtpSender:
    """Development: appends each code as a JSON line to a 0600 file (default
    data_dir/otp-outbox.jsonl) instead of sending an SMS; read it with
    `read_code()`. The destination is written masked."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def send(self, destination: str, code: str, *, challenge_id: str, kind: int) -> None:
        line = json.dumps({"challenge_id": challenge_id, "kind": KIND_NAMES.get(kind, str(kind)),
                           "to": mask_phone(destination), "code": code})
        await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")

    def read_code(self, challenge_id: str) -> str | None:
        """The code sent for a challenge, if any (development and tests)."""
        if not self.path.exists():
            return None
        code = None
        for line in self.path.read_text().splitlines():
            entry = json.loads(line)
            if entry["challenge_id"] == challenge_id:
                code = entry["code"]
        return code


@dataclass(frozen=True)
class Policy:
    ttl: dt.timedelta = dt.timedelta(minutes=5)
    max_attempts: int = 3
    # At most this many challenges per subject within `window`.
    max_open: int = 5
    window: dt.timedelta = dt.timedelta(minutes=15)
    # A send that has not returned in this time has failed. A retry finding
    # a send older than twice this takes it for dead (its server went away)
    # and sends a fresh code.
    send_timeout: dt.timedelta = dt.timedelta(seconds=10)


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    expire_us: int
    max_attempts: int
    masked_destination: str


def refusal_error(refusal: str) -> errors.ApiError:
    """The error for fc.consume_step_up's refusal."""
    if refusal == "STEP_UP_REQUIRED":
        return errors.ApiError(
            grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED",
            "this operation needs a step-up verification: CreateStepUpChallenge, then send "
            "the code in step_up")
    cause = refusal.partition(":")[2] or "WRONG_CODE"
    return errors.ApiError(grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED",
                           "the step-up verification failed; nothing was changed",
                           metadata={"cause": cause})


def gate(operation_sql: LiteralString) -> LiteralString:
    """The statement running the step-up gate and then, only if it passes,
    `operation_sql` (a `fc.<operation>(...)` call expression, no SELECT), in
    one transaction. Its parameters: the ten step_up_* of fc.consume_step_up
    (gate_params) and the operation's, in one mapping. Answers the operation's jsonb, or
    {"step_up_refusal": ...}."""
    return ("WITH s AS MATERIALIZED (SELECT " + CONSUME_CALL + " AS refusal)"
            " SELECT CASE WHEN s.refusal IS NULL THEN " + operation_sql +
            " ELSE jsonb_build_object('step_up_refusal', s.refusal) END FROM s")


def check_answer(d: dict[str, Any]) -> dict[str, Any]:
    """`d` unless the gate refused: then raise its error."""
    refusal = d.get("step_up_refusal")
    if refusal is not None:
        raise refusal_error(str(refusal))
    return d


class StepUps:
    def __init__(self, db: Database, provider: keys.KeyProvider, sender: OtpSender,
                 policy: Policy | None = None) -> None:
        self._db = db
        self._key = gm.sm3_kdf(provider.root_key(), keys.canonical("fuelcard", "otp/v1"), 32)
        # The phone is stored sealed (holder_data.py); it is opened only to send the code.
        self._holders = HolderSeal(provider)
        self.sender = sender
        self.policy = policy or Policy()

    def code_hash(self, challenge_id: uuid.UUID | str, code: str) -> bytes:
        return gm.hmac_sm3(self._key, keys.canonical("step-up", str(challenge_id), code))

    def gate_params(self, caller: str, request_id: str, operation: str | None, required: bool,
                    kind: int, subject: uuid.UUID | str | None, amount_fen: int,
                    challenge_id: uuid.UUID | None, code: str, now: dt.datetime
                    ) -> dict[str, Any]:
        """The ten parameters of fc.consume_step_up for `gate()`. `operation`:
        the name under which the operation stores its answer (fc.remember), so
        that a retry replays without a fresh code; None if it stores none."""
        code_hash = self.code_hash(challenge_id, code) if challenge_id is not None else None
        return {"step_up_caller": caller, "step_up_request_id": request_id,
                "step_up_operation": operation, "step_up_required": required, "step_up_kind": kind,
                "step_up_subject": subject, "step_up_amount": amount_fen,
                "step_up_challenge": challenge_id, "step_up_code_hash": code_hash,
                "step_up_now": now}

    async def verify(self, caller: str, request_id: str, kind: int, subject: uuid.UUID | str,
                     amount_fen: int, challenge_id: uuid.UUID | None, code: str,
                     now: dt.datetime) -> None:
        """Demand and use a step-up on its own (one transaction): for reads
        and for other code that needs one (the risk engine). Raises the
        refusal's error; nothing else changes."""
        row = await self._db.fetch_one(CONSUME_SQL, self.gate_params(
            caller, request_id, None, True, kind, subject, amount_fen, challenge_id, code, now))
        if row is not None and row[0] is not None:
            raise refusal_error(row[0])

    async def create(self, caller: str, request_id: str, kind: int, subject: uuid.UUID,
                     amount_fen: int, now: dt.datetime) -> Challenge:
        """The challenge of (caller, request_id), its code sent: a new one; a
        retry's, sent once; or, if its code was never sent (the gateway
        failed), a fresh one under a new id. Raises UNAVAILABLE OTP_NOT_SENT
        while no code went out (the caller asks again)."""
        challenge_id = uuid.uuid4()
        code = f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"
        p = self.policy
        row = await self._db.fetch_one(CREATE_SQL, {
            "caller": caller, "request_id": request_id, "uid": challenge_id, "kind": kind,
            "subject": subject, "amount": amount_fen, "code_hash": self.code_hash(challenge_id, code),
            "expires": now + p.ttl, "max_attempts": p.max_attempts, "max_open": p.max_open,
            "window": p.window, "now": now, "send_timeout": 2 * p.send_timeout})
        assert row is not None
        d: dict[str, Any] = row[0]
        if d.get("sending"):
            raise errors.unavailable("OTP_NOT_SENT",
                                     "the code is being sent by another call; ask again")
        phone = self._holders.open_stored("phone", d["phone"], "holder_")
        if d["created"]:
            await self._send(phone, code, challenge_id, kind, now)
        del code
        return Challenge(str(d["challenge_id"]), int(d["expire_us"]), int(d["max_attempts"]),
                         mask_phone(phone) if phone else "")

    async def _send(self, phone: str, code: str, challenge_id: uuid.UUID, kind: int,
                    now: dt.datetime) -> None:
        """Send the code and record whether it went (fc.step_up_sent /
        fc.step_up_not_sent): only a delivered challenge is answered OK and
        counts toward the rate limit."""
        try:
            async with asyncio.timeout(self.policy.send_timeout.total_seconds()):
                await self.sender.send(phone, code, challenge_id=str(challenge_id), kind=kind)
        except Exception as exc:
            # Never the destination or the code: only what failed.
            log.error("step-up code not sent (%s)", type(exc).__name__)
            try:
                await self._db.fetch_one(NOT_SENT_SQL, {"uid": challenge_id})
            except errors.ApiError as db_error:
                # The challenge stays "being sent" until its send is taken
                # for dead (Policy.send_timeout): a retry then sends afresh.
                log.warning("step-up send failure not recorded (%s)", db_error.reason)
            raise errors.unavailable("OTP_NOT_SENT",
                                     "the code could not be sent; ask again") from None
        row = await self._db.fetch_one(SENT_SQL, {"uid": challenge_id, "now": now})
        if row is None or not row[0]:
            # A retry renewed the challenge meanwhile: this code is void.
            raise errors.unavailable("OTP_NOT_SENT", "the code could not be sent; ask again")
