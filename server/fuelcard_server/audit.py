"""The audit trail: who called what, when, about which object, and how it
ended - for every internal/admin RPC and every read of personal data.

Records live in fc.audit_log, append-only (triggers refuse UPDATE, DELETE
and TRUNCATE) and SM3 hash-chained: each record's hash covers the previous
record's hash and its own canonical encoding (sql/functions/audit.sql defines it), so
`verify` finds any record edited, deleted or moved by someone who got past
the triggers. The database extends the chain (fc.audit_append, under
locks.AUDIT_LOCK): an audited RPC costs one more round trip, and every
server process extends the same chain. `verify` recomputes each hash here with the C-backed SM3 of
fuelcard_server.gm, independently of the SQL implementation.

What is audited (`should_audit`):
  * never the POS hot path (TransactionService Authorize/Confirm/Cancel):
    it stays one round trip;
  * every call by an internal caller (admin, reviewer, analytics), whatever
    its outcome;
  * a terminal's or adapter's call only when its role may not make it (a
    refused reach for an internal RPC) - their routine traffic is not;
  * a certificate that names no role: always (it is refused);
  * a step-up challenge, by any caller (it reads the holder's phone);
  * in development mode (no identities), every call outside TransactionService
    and FundingService.

A record never carries a card number, phone or ID number: the target is a
uuid column (an internal id, or NULL), the outcome a status code name and an
UPPER_SNAKE reason, the actor the caller's certificate identity with any long
digit run masked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import importlib
import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import psycopg
from google.protobuf.message import Message

from fuelcard_server import errors, gm
from fuelcard_server.db import Database
from fuelcard_server.identity import Caller, Role
from fuelcard_server.locks import AUDIT_LOCK
from fuelcard_server.privacy import scrub

log = logging.getLogger(__name__)

GENESIS = bytes(32)  # prev_hash of record 1
MAGIC = b"FCAUDIT1"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# The POS hot path: never audited, whoever calls.
NEVER_AUDITED = frozenset({
    "/fuelcard.v1.TransactionService/Authorize",
    "/fuelcard.v1.TransactionService/Confirm",
    "/fuelcard.v1.TransactionService/Cancel",
})
# Calls audited whoever makes them: they read personal data (the holder's
# phone, to send a step-up code to it).
ALWAYS_AUDITED = frozenset({"/fuelcard.v1.SecurityService/CreateStepUpChallenge"})
# Services whose calls are terminal or adapter traffic, not administration:
# not audited in development mode, where no certificate says who calls.
ROUTINE_SERVICES = frozenset({"fuelcard.v1.TransactionService", "fuelcard.v1.FundingService"})
ROUTINE_ROLES = frozenset({Role.POS, Role.ADAPTER})

APPEND_SQL = (
    "SELECT fc.audit_append(p_lock => %(lock)s, p_actor => %(actor)s, p_method => %(method)s,"
    " p_target => %(target)s::uuid, p_outcome => %(outcome)s)")
WALK_SQL = ("SELECT id, created_at, actor, method, target, outcome, prev_hash, hash"
            " FROM fc.audit_log ORDER BY id")

# Fields naming what a call is about, most specific first; a request's win
# over a response's (OpenAccount's target is the account it made).
_TARGET_FIELDS = ("hold_id", "card_id", "account_id", "parent_account_id", "from_account_id",
                  "subject_id", "break_id", "exception_id", "adjustment_id")
_TARGET_MESSAGES = (("hold", "hold_id"), ("card", "card_id"), ("account", "account_id"),
                    ("recharge", "account_id"))
_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


# --- what a record says -------------------------------------------------------


@functools.cache
def method_name(servicer: type, name: str) -> str:
    """The full gRPC method name (/package.Service/Method) of a servicer's
    handler, from the descriptor of the generated base class it implements."""
    for cls in servicer.__mro__:
        if cls.__module__.endswith("_pb2_grpc") and cls.__name__.endswith("Servicer"):
            pb2 = importlib.import_module(cls.__module__.removesuffix("_grpc"))
            service = pb2.DESCRIPTOR.services_by_name[cls.__name__.removesuffix("Servicer")]
            return f"/{service.full_name}/{service.methods_by_name[name].name}"
    raise TypeError(f"{servicer.__name__} implements no generated gRPC servicer")


def should_audit(method: str, caller: Caller | None, allowed: frozenset[Role]) -> bool:
    """Whether a call writes an audit record (see the module docstring)."""
    if method in NEVER_AUDITED:
        return False
    if caller is None or method in ALWAYS_AUDITED:
        return True
    if caller.role is None:  # development mode
        return method.split("/")[1] not in ROUTINE_SERVICES
    if caller.role in ROUTINE_ROLES:
        return caller.role not in allowed
    return True


def actor_of(caller: Caller | None) -> str:
    """The certificate's identity, and the principal an edge acted for
    ("admin::fuelcard-api for principal:<uuid>")."""
    if caller is None:
        return "unidentified"
    actor = "development" if caller.role is None else scrub(caller.key)
    if caller.on_behalf_of:
        # "principal:<uuid>" (identity.acting_for admits nothing else): not
        # scrubbed, a uuid's 12 hex digits may all be decimal ones
        actor += " for " + caller.on_behalf_of
    return actor


def outcome_of(error: errors.ApiError | None) -> str:
    """OK, or the status code name and the reason (never free text)."""
    if error is None:
        return "OK"
    reason = error.reason if _REASON.fullmatch(error.reason) else "UNSPECIFIED"
    return f"{error.code.name} {reason}"


def _ids(message: Message) -> Iterator[str]:
    fields = message.DESCRIPTOR.fields_by_name
    for name in _TARGET_FIELDS:
        if name in fields:
            value = getattr(message, name)
            if isinstance(value, str) and value:
                yield value
    for name, id_field in _TARGET_MESSAGES:
        if name in fields and fields[name].message_type is not None and message.HasField(name):
            yield getattr(getattr(message, name), id_field)


def target_of(request: Message, response: Message | None) -> uuid.UUID | None:
    """The internal id (account, card, hold) a call was about, if it names
    one. Only a well-formed uuid is taken: a card number or phone sent in an
    id field is never recorded."""
    for message in (request, response):
        if message is None:
            continue
        for value in _ids(message):
            if len(value) <= 36:
                try:
                    return uuid.UUID(value)
                except ValueError:
                    continue
    return None


def canonical(record_id: int, created_at: dt.datetime, actor: str, method: str,
              target: uuid.UUID | None, outcome: str) -> bytes:
    """The record's canonical encoding, as fc.audit_canonical makes it."""
    micros = (created_at - EPOCH) // dt.timedelta(microseconds=1)
    parts = [MAGIC, record_id.to_bytes(8, "big", signed=True), micros.to_bytes(8, "big", signed=True)]
    for text in (actor, method, "" if target is None else str(target), outcome):
        data = text.encode()
        parts += [len(data).to_bytes(4, "big"), data]
    return b"".join(parts)


def chain_hash(prev_hash: bytes, record_id: int, created_at: dt.datetime, actor: str,
               method: str, target: uuid.UUID | None, outcome: str) -> bytes:
    return gm.sm3(prev_hash + canonical(record_id, created_at, actor, method, target, outcome))


# --- writing ------------------------------------------------------------------


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        # Appends in flight, kept referenced so none is lost when its RPC is
        # cancelled (drain() waits for them at shutdown).
        self._pending: set[asyncio.Task[int]] = set()

    async def record(self, caller: Caller | None, method: str, target: uuid.UUID | None,
                     outcome: str) -> int:
        """Append one record (one round trip); its id. The append runs to
        the end even if the RPC that asked for it is cancelled meanwhile."""
        return await asyncio.shield(self._start(caller, method, target, outcome))

    def _start(self, caller: Caller | None, method: str, target: uuid.UUID | None,
               outcome: str) -> asyncio.Task[int]:
        task = asyncio.ensure_future(self._append(actor_of(caller), method, target, outcome))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _append(self, actor: str, method: str, target: uuid.UUID | None,
                      outcome: str) -> int:
        row = await self.db.fetch_one(APPEND_SQL, {"lock": AUDIT_LOCK, "actor": actor, "method": method,
                                                   "target": target, "outcome": outcome})
        assert row is not None
        record_id: int = row[0]
        return record_id

    async def rpc_done(self, servicer: type, name: str, allowed: frozenset[Role],
                       caller: Caller | None, request: Message, response: Message | None,
                       error: errors.ApiError | None) -> errors.ApiError | None:
        """Record a finished call if it is audited; the error to answer with
        (None: send the response). Fails closed: a successful call that
        cannot be recorded is answered UNAVAILABLE, so nothing is handed out
        unaudited (a retry with the same request_id replays a mutation)."""
        method = method_name(servicer, name)
        if not should_audit(method, caller, allowed):
            return error
        try:
            await self.record(caller, method, target_of(request, response), outcome_of(error))
        except Exception as exc:
            reason = exc.reason if isinstance(exc, errors.ApiError) else type(exc).__name__
            log.error("audit record for %s not written (%s)", method, reason)
            if error is None:
                return errors.unavailable("AUDIT_UNAVAILABLE",
                                          "the call could not be audited; retry")
        return error

    def rpc_cancelled(self, servicer: type, name: str, allowed: frozenset[Role],
                      caller: Caller | None, request: Message) -> None:
        """Record a call cancelled mid-way (client gone, deadline), in the
        background: the cancelled RPC cannot wait for it."""
        method = method_name(servicer, name)
        if should_audit(method, caller, allowed):
            task = self._start(caller, method, target_of(request, None), "CANCELLED")
            task.add_done_callback(_log_failure)

    async def drain(self) -> None:
        """Wait for appends in flight (before the pool closes)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("audit record of a cancelled call not written")


# --- verifying ----------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A break in the chain, at the first record it shows in."""

    record_id: int
    kind: str  # missing | unlinked | edited | anchor
    detail: str

    def __str__(self) -> str:
        return f"record {self.record_id}: {self.detail}"


@dataclass
class Report:
    records: int = 0
    head_id: int = 0
    head_hash: bytes = GENESIS
    problems: list[Problem] = field(default_factory=list)


def walk(url: str, anchor: tuple[int, bytes] | None = None,
         anchors: Sequence[tuple[int, bytes]] = ()) -> Report:
    """Walk the whole chain in id order, recomputing every hash.

    Finds a record edited (its hash no longer matches its contents), deleted
    (a gap in the ids, and the next record's prev_hash links to nothing) or
    moved (its link and its hash both break). A chain rewritten wholesale by
    someone who recomputed every later hash, or cut short at the end, is
    consistent in itself: `anchor` (a record id and the hash it had, noted
    earlier outside the database) catches that, and so does each of
    `anchors` (audit_anchor.py: heads anchored by `fuelcard audit anchor`):
    the chain must still extend every one of them."""
    report = Report()
    expected, prev = 1, GENESIS
    wanted: dict[int, set[bytes]] = {}
    for record_id, digest in ([anchor] if anchor is not None else []) + list(anchors):
        wanted.setdefault(record_id, set()).add(digest)
    found: dict[int, bytes] = {}
    with psycopg.connect(url) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.cursor(name="audit_walk") as cur:
            cur.itersize = 5000
            cur.execute(WALK_SQL)
            for record_id, created_at, actor, method, target, outcome, prev_hash, stored in cur:
                prev_hash, stored = bytes(prev_hash), bytes(stored)
                if record_id != expected:
                    missing = (f"record {expected} is missing" if record_id == expected + 1
                               else f"records {expected}-{record_id - 1} are missing")
                    report.problems.append(Problem(expected, "missing",
                                                   f"{missing} (deleted)"))
                if prev_hash != prev:
                    report.problems.append(Problem(
                        record_id, "unlinked", f"prev_hash does not match the hash of the "
                        f"record before it (#{report.head_id}): deleted, inserted or reordered"))
                if chain_hash(prev_hash, record_id, created_at, actor, method, target,
                              outcome) != stored:
                    report.problems.append(Problem(
                        record_id, "edited", "hash does not match the record's contents: edited"))
                if record_id in wanted:
                    found[record_id] = stored
                report.records += 1
                report.head_id, report.head_hash = record_id, stored
                expected, prev = record_id + 1, stored
    for record_id in sorted(wanted):
        stored = found.get(record_id)
        if stored is not None and wanted[record_id] == {stored}:
            continue
        detail = ("is missing: the log was cut short or rewritten" if stored is None
                  else "has a different hash than the anchor: the log was rewritten")
        report.problems.append(Problem(record_id, "anchor", detail))
    report.problems.sort(key=lambda p: p.record_id)
    return report


def verify(url: str, anchor: tuple[int, bytes] | None = None) -> list[Problem]:
    """Every break in the audit chain, first record first; [] when intact."""
    return walk(url, anchor).problems
