"""A small durable outbox for confirms, cancels and reversals the POS could
not deliver.

A fuel sale must not be lost because the link was down when the nozzle was
hung up. The PosClient writes such a confirm (or cancel) here, WITH ITS
ORIGINAL request_id, and `flush()` resends the entries in order until the
server gives a definitive answer:

- success (including a business decline, e.g. an expired hold whose account
  no longer has the money: the server records it for reconciliation) removes
  the entry;
- a non-retryable error (FAILED_PRECONDITION, INVALID_ARGUMENT, NOT_FOUND, ...)
  marks the entry FAILED, with the code, reason and message, for the operator;
- a retryable error (the link is still down), or a refusal of the terminal's
  key or counter (UNAUTHENTICATED KEY_NOT_ACCEPTED / COUNTER_REPLAYED /
  MAC_INVALID: no verdict on the sale, and the client has re-synced) leaves
  the entry and everything after it pending, and stops the flush.

A reversal (ReverseAuthorization) is queued by the client itself for an
Authorize whose outcome it never learned (the retries ran out on a timeout
or UNAVAILABLE): the Authorize may have held money the driver will never
use, and the terminal has no hold id to cancel it by. Its entry has no hold
id (an empty one); the server releases whatever that Authorize held, or
makes it decline if it arrives later.

Resending is safe because the server applies a request_id once and answers
every replay with the first answer. An entry holds what to do, without the
key version, counter and MAC of the send that failed: on a secure link the
client signs every resend with a fresh counter (the server ignores those
fields when it matches a resend to the first request).

Storage is one SQLite file (stdlib sqlite3, WAL, synchronous=FULL): a queued
sale survives a crash or a reboot of the POS. The outbox is bounded
(`max_entries`, pending and failed together); when it is full, enqueue raises
OutboxFull and the caller gets the original error rather than a false
"pending".
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from fuelcard.v1 import transaction_pb2
from google.protobuf.message import Message

from fuelcard_pos.errors import PosError
from fuelcard_pos.terminal import strip_auth

__all__ = ["DEFAULT_MAX_ENTRIES", "Delivery", "FlushReport", "Outbox", "OutboxEntry", "OutboxFull"]

DEFAULT_MAX_ENTRIES = 10_000
# 2: reversals ("reverse" entries). A version 1 file is rebuilt on opening.
SCHEMA_VERSION = 2

Operation = Literal["confirm", "cancel", "reverse"]
State = Literal["pending", "failed"]
QueuedRequest = (transaction_pb2.ConfirmRequest | transaction_pb2.CancelRequest
                 | transaction_pb2.ReverseAuthorizationRequest)
Response = (transaction_pb2.ConfirmResponse | transaction_pb2.CancelResponse
            | transaction_pb2.ReverseAuthorizationResponse)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    operation       TEXT    NOT NULL CHECK (operation IN ('confirm', 'cancel', 'reverse')),
    request_id      TEXT    NOT NULL UNIQUE,
    hold_id         TEXT    NOT NULL,
    payload         BLOB    NOT NULL,
    state           TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'failed')),
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_attempt_at REAL,
    last_error      TEXT    NOT NULL DEFAULT '',
    error_code      TEXT    NOT NULL DEFAULT '',
    error_reason    TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_by_state ON outbox (state, id);
"""
# Version 1 allowed two operations in its CHECK, which SQLite cannot alter:
# the table is copied into one of the current schema, in one transaction.
_UPGRADE_FROM_1 = """
BEGIN IMMEDIATE;
DROP INDEX IF EXISTS outbox_by_state;
ALTER TABLE outbox RENAME TO outbox_v1;
""" + _SCHEMA + """
INSERT INTO outbox SELECT * FROM outbox_v1;
DROP TABLE outbox_v1;
PRAGMA user_version = 2;
COMMIT;
"""

_COLUMNS = ("id, operation, request_id, hold_id, payload, state, created_at, attempts,"
            " last_attempt_at, last_error, error_code, error_reason")


class Resender(Protocol):
    """What `flush` sends through: a PosClient. Named by what it does so
    that the outbox never imports the client (the client imports the outbox)."""

    def send_confirm(self, request: transaction_pb2.ConfirmRequest, *, queue: bool
                     ) -> transaction_pb2.ConfirmResponse: ...

    def send_cancel(self, request: transaction_pb2.CancelRequest, *, queue: bool
                    ) -> transaction_pb2.CancelResponse: ...

    def send_reversal(self, request: transaction_pb2.ReverseAuthorizationRequest, *, queue: bool
                      ) -> transaction_pb2.ReverseAuthorizationResponse: ...


class OutboxFull(Exception):
    """The outbox holds max_entries entries; nothing more can be queued."""


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    operation: Operation
    request_id: str
    hold_id: str
    payload: bytes
    state: State
    created_at: float
    attempts: int
    last_attempt_at: float | None
    last_error: str
    error_code: str
    error_reason: str

    @property
    def request(self) -> QueuedRequest:
        """The request exactly as it was first sent (request_id included)."""
        if self.operation == "confirm":
            return transaction_pb2.ConfirmRequest.FromString(self.payload)
        if self.operation == "reverse":
            return transaction_pb2.ReverseAuthorizationRequest.FromString(self.payload)
        return transaction_pb2.CancelRequest.FromString(self.payload)


@dataclass(frozen=True)
class Delivery:
    """An entry the server answered; the entry is gone from the outbox."""

    entry: OutboxEntry
    response: Response


@dataclass
class FlushReport:
    delivered: list[Delivery] = field(default_factory=list)
    # Entries that failed for good in this flush (now in state "failed").
    failed: list[tuple[OutboxEntry, PosError]] = field(default_factory=list)
    # Entries still pending after the flush.
    remaining: int = 0
    # Why the flush stopped early (the retryable error), if it did.
    stopped_by: PosError | None = None

    @property
    def complete(self) -> bool:
        return self.remaining == 0 and not self.failed


class Outbox:
    """A bounded, durable FIFO of undelivered confirms and cancels."""

    def __init__(self, path: str | Path, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.path = Path(path)
        self.max_entries = max_entries
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # autocommit (isolation_level=None): we open transactions ourselves
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"outbox {self.path} has schema {version}, newer than this "
                                   f"client ({SCHEMA_VERSION})")
            if version == 1:
                self._db.executescript(_UPGRADE_FROM_1)
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------

    def enqueue(self, request: QueuedRequest) -> int:
        """Store the request durably (without key version, counter and MAC);
        returns the entry id. Enqueuing the same request (same request_id)
        again, however it was signed, returns the existing entry."""
        operation: Operation
        if isinstance(request, transaction_pb2.ConfirmRequest):
            operation = "confirm"
        elif isinstance(request, transaction_pb2.CancelRequest):
            operation = "cancel"
        elif isinstance(request, transaction_pb2.ReverseAuthorizationRequest):
            operation = "reverse"
        else:
            raise TypeError(f"only confirms, cancels and reversals are queued, not "
                            f"{type(request).__name__}")
        if not request.request_id:
            raise ValueError("a queued request must carry its request_id")
        payload = _serialize(strip_auth(request))
        with self._transaction() as db:
            row = db.execute("SELECT id, operation, payload FROM outbox WHERE request_id = ?",
                             (request.request_id,)).fetchone()
            if row is not None:
                if (row[1], bytes(row[2])) != (operation, payload):
                    raise ValueError("request_id is already queued for a different request")
                return int(row[0])
            (count,) = db.execute("SELECT count(*) FROM outbox").fetchone()
            if count >= self.max_entries:
                raise OutboxFull(f"the outbox holds {count} entries (max {self.max_entries})")
            cursor = db.execute(
                "INSERT INTO outbox (operation, request_id, hold_id, payload, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (operation, request.request_id, _hold_id(request), payload, time.time()))
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def discard(self, entry_id: int) -> bool:
        """Remove an entry (the operator has dealt with a failed one)."""
        with self._transaction() as db:
            return db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,)).rowcount > 0

    # -- reading -----------------------------------------------------------

    def entries(self, state: State | None = None) -> list[OutboxEntry]:
        with self._transaction() as db:
            if state is None:
                rows = db.execute(f"SELECT {_COLUMNS} FROM outbox ORDER BY id").fetchall()
            else:
                rows = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE state = ? ORDER BY id",
                                  (state,)).fetchall()
        return [_entry(row) for row in rows]

    def pending(self) -> list[OutboxEntry]:
        return self.entries("pending")

    def failed(self) -> list[OutboxEntry]:
        return self.entries("failed")

    def __len__(self) -> int:
        with self._transaction() as db:
            (count,) = db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    # -- delivering --------------------------------------------------------

    def flush(self, client: Resender, *, limit: int | None = None) -> FlushReport:
        """Resend pending entries, oldest first, through `client` (which does
        its own bounded retries and signs each resend). Stops at the first
        entry that still gets a retryable error (or a refused key or counter),
        so nothing overtakes an older entry."""
        report = FlushReport()
        for n, entry in enumerate(self.pending()):
            if limit is not None and n >= limit:
                break
            self._note_attempt(entry.id)
            request = entry.request
            try:
                response: Response
                if isinstance(request, transaction_pb2.ConfirmRequest):
                    response = client.send_confirm(request, queue=False)
                elif isinstance(request, transaction_pb2.ReverseAuthorizationRequest):
                    response = client.send_reversal(request, queue=False)
                else:
                    response = client.send_cancel(request, queue=False)
            except PosError as exc:
                if exc.resendable:
                    self._note_error(entry.id, exc)
                    report.stopped_by = exc
                    break
                self._mark_failed(entry.id, exc)
                report.failed.append((self._get(entry.id) or entry, exc))
                continue
            self.discard(entry.id)
            report.delivered.append(Delivery(entry, response))
        report.remaining = len(self.pending())
        return report

    # -- internals ---------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK), one thread at a time."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _note_attempt(self, entry_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ? WHERE id = ?",
                       (time.time(), entry_id))

    def _note_error(self, entry_id: int, exc: PosError) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET last_error = ?, error_code = ?, error_reason = ?"
                       " WHERE id = ?", (str(exc), exc.code.name, exc.reason, entry_id))

    def _mark_failed(self, entry_id: int, exc: PosError) -> None:
        with self._transaction() as db:
            db.execute("UPDATE outbox SET state = 'failed', last_error = ?, error_code = ?,"
                       " error_reason = ? WHERE id = ?",
                       (str(exc), exc.code.name, exc.reason, entry_id))

    def _get(self, entry_id: int) -> OutboxEntry | None:
        with self._transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row) if row is not None else None


def _hold_id(request: QueuedRequest) -> str:
    """The hold an entry is about: none for a reversal, which names its
    Authorize by request id."""
    if isinstance(request, transaction_pb2.ReverseAuthorizationRequest):
        return ""
    return request.hold_id


def _serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def _entry(row: Any) -> OutboxEntry:
    (id_, operation, request_id, hold_id, payload, state, created_at, attempts,
     last_attempt_at, last_error, error_code, error_reason) = row
    assert operation in ("confirm", "cancel", "reverse") and state in ("pending", "failed")
    return OutboxEntry(
        id=int(id_), operation=operation, request_id=str(request_id), hold_id=str(hold_id),
        payload=bytes(payload), state=state, created_at=float(created_at),
        attempts=int(attempts),
        last_attempt_at=None if last_attempt_at is None else float(last_attempt_at),
        last_error=str(last_error), error_code=str(error_code), error_reason=str(error_reason))
