"""Terminal security for the POS: the working key, the transaction counter
and the MAC of every Authorize, Confirm and Cancel.

A terminal signs on (SecurityService.SignOn, over mutual TLS) for its
working key of the day. Each terminal request carries the key's version, a
transaction counter and an HMAC-SM3 under a session key derived from the
working key and that counter (proto/fuelcard/v1/security.proto has the exact
layout; this module follows fuelcard_server.keys byte for byte, with SM3 from
OpenSSL through hashlib). The server refuses a counter at or below the last
one it accepted, so the counter must only ever go up, across restarts too:

`TerminalStore` keeps, per terminal, the last counter handed out and the
working key (version and window) in a small SQLite table (stdlib sqlite3,
WAL, synchronous=FULL; it may share its file with the Outbox). A counter is
reserved, durably, before the request that carries it is sent. The file is
made readable by its owner only (0600): it holds the working key.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import hmac
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fuelcard.v1 import transaction_pb2

__all__ = [
    "COUNTER_MAX",
    "CounterExhausted",
    "TerminalStore",
    "WorkingKey",
    "canonical",
    "certificate_identity",
    "mac",
    "mac_input",
    "session_key",
    "sign",
    "strip_auth",
]

WORKING_KEY_SIZE = 16
SESSION_KEY_SIZE = 16
SM3_DIGEST_SIZE = 32
COUNTER_MAX = 2**63 - 1

TerminalRequest = (transaction_pb2.AuthorizeRequest | transaction_pb2.ConfirmRequest
                   | transaction_pb2.CancelRequest | transaction_pb2.ReverseAuthorizationRequest)
R = TypeVar("R", bound=TerminalRequest)


# -- the MAC -----------------------------------------------------------------

def canonical(*parts: bytes | str | int) -> bytes:
    """The server's unambiguous field encoding (fuelcard_server.keys.canonical):
    per field a type tag (b"s" UTF-8 text, b"i" minimal signed big-endian
    integer, b"b" bytes), a 4-byte big-endian length and the bytes."""
    out = bytearray()
    for part in parts:
        if isinstance(part, bytes):
            tag, raw = b"b", part
        elif isinstance(part, str):
            tag, raw = b"s", part.encode()
        elif isinstance(part, int) and not isinstance(part, bool):
            tag, raw = b"i", part.to_bytes(part.bit_length() // 8 + 1, "big", signed=True)
        else:
            raise TypeError(f"canonical: unsupported field type {type(part).__name__}")
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _sm3_kdf(key_material: bytes, info: bytes, length: int) -> bytes:
    z = key_material + info
    blocks = [hashlib.new("sm3", z + ct.to_bytes(4, "big")).digest()
              for ct in range(1, -(-length // SM3_DIGEST_SIZE) + 1)]
    return b"".join(blocks)[:length]


@dataclass(frozen=True)
class WorkingKey:
    """A terminal's working key from SignOn. The key itself never appears in
    a repr, a log line or any output."""

    terminal_id: str
    version: int
    valid_from: dt.datetime
    valid_until: dt.datetime
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != WORKING_KEY_SIZE:
            raise ValueError(f"a working key is {WORKING_KEY_SIZE} bytes")
        for t in (self.valid_from, self.valid_until):
            if t.tzinfo is None or t.utcoffset() is None:
                raise ValueError("the key's window must be timezone-aware")


def session_key(working: WorkingKey, counter: int) -> bytes:
    """SM3-KDF(working key || E("fuelcard", "session/v1", terminal, version,
    counter)): one key per transaction."""
    if not 0 <= counter <= COUNTER_MAX:
        raise ValueError("the transaction counter is a non-negative 63-bit integer")
    info = canonical("fuelcard", "session/v1", working.terminal_id, working.version, counter)
    return _sm3_kdf(working.key, info, SESSION_KEY_SIZE)


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SM3 (32 bytes)."""
    return hmac.digest(key, data, "sm3")


def mac_input(request: TerminalRequest) -> bytes:
    """The bytes a terminal request's MAC covers (security.proto)."""
    if isinstance(request, transaction_pb2.AuthorizeRequest):
        return canonical("Authorize", request.request_id, request.card_number,
                         request.amount_fen, request.station_id, request.terminal_id,
                         request.nozzle, request.product, request.key_version,
                         request.terminal_counter, request.pin_block)
    if isinstance(request, transaction_pb2.ConfirmRequest):
        return canonical("Confirm", request.request_id, request.hold_id,
                         request.final_amount_fen, request.volume_ml, request.unit_price_fen,
                         request.key_version, request.terminal_counter)
    if isinstance(request, transaction_pb2.CancelRequest):
        return canonical("Cancel", request.request_id, request.hold_id, request.key_version,
                         request.terminal_counter)
    if isinstance(request, transaction_pb2.ReverseAuthorizationRequest):
        return canonical("ReverseAuthorization", request.request_id, request.original_request_id,
                         request.key_version, request.terminal_counter)
    raise TypeError(f"{type(request).__name__} is not a terminal request")


def strip_auth(request: R) -> R:
    """A copy of `request` without key_version, terminal_counter and mac:
    what the request asks for, not how one send of it was authenticated."""
    bare = copy.deepcopy(request)
    # proto3 scalars without presence: the default is the cleared field
    bare.key_version = 0
    bare.terminal_counter = 0
    bare.mac = b""
    return bare


def sign(request: R, working: WorkingKey, counter: int) -> R:
    """A copy of `request` carrying the key version, `counter` and its MAC."""
    signed = strip_auth(request)
    signed.key_version = working.version
    signed.terminal_counter = counter
    signed.mac = mac(session_key(working, counter), mac_input(signed))
    return signed


# -- the durable state -------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pos_terminal (
    terminal_id  TEXT    PRIMARY KEY,
    -- the last transaction counter handed out: the next one is above it
    last_counter INTEGER NOT NULL DEFAULT 0 CHECK (last_counter >= 0),
    key_version  INTEGER,
    working_key  BLOB,
    valid_from   TEXT,
    valid_until  TEXT,
    signed_on_at TEXT
);
"""


class CounterExhausted(Exception):
    """The terminal's counter reached 2^63-1; the terminal must be replaced."""


class TerminalStore:
    """Per terminal: the last counter reserved and the working key. Safe to
    share between threads and between processes using the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        if self.path != ":memory:":
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            # created owner-only; an existing file (e.g. the outbox's) is narrowed
            os.close(os.open(p, os.O_CREAT | os.O_RDWR, 0o600))
            p.chmod(0o600)
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> TerminalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TerminalStore({self.path!r})"

    # -- reading -----------------------------------------------------------

    def working_key(self, terminal_id: str) -> WorkingKey | None:
        with self._transaction() as db:
            row = db.execute("SELECT key_version, working_key, valid_from, valid_until"
                             " FROM pos_terminal WHERE terminal_id = ?", (terminal_id,)).fetchone()
        if row is None or row[0] is None or row[1] is None:
            return None
        try:
            return WorkingKey(terminal_id, int(row[0]), dt.datetime.fromisoformat(row[2]),
                              dt.datetime.fromisoformat(row[3]), bytes(row[1]))
        except (TypeError, ValueError):
            return None  # unreadable: sign on again

    def last_counter(self, terminal_id: str) -> int:
        with self._transaction() as db:
            row = db.execute("SELECT last_counter FROM pos_terminal WHERE terminal_id = ?",
                             (terminal_id,)).fetchone()
        return int(row[0]) if row is not None else 0

    # -- writing -----------------------------------------------------------

    def signed_on(self, working: WorkingKey, server_last_counter: int,
                  now: dt.datetime) -> int:
        """Keep the key from a sign-on and lift the counter to the server's
        last accepted one if that is higher (never lower it). Returns the
        counter the next reservation continues above."""
        with self._transaction() as db:
            self._ensure(db, working.terminal_id)
            db.execute(
                "UPDATE pos_terminal SET key_version = ?, working_key = ?, valid_from = ?,"
                " valid_until = ?, signed_on_at = ?, last_counter = max(last_counter, ?)"
                " WHERE terminal_id = ?",
                (working.version, working.key, working.valid_from.isoformat(),
                 working.valid_until.isoformat(), now.isoformat(),
                 min(max(0, server_last_counter), COUNTER_MAX), working.terminal_id))
            (counter,) = db.execute("SELECT last_counter FROM pos_terminal WHERE terminal_id = ?",
                                    (working.terminal_id,)).fetchone()
        return int(counter)

    def reserve(self, terminal_id: str) -> int:
        """The next counter, committed to disk before it is returned: once a
        request has carried it, no later request of this terminal reuses it."""
        with self._transaction() as db:
            self._ensure(db, terminal_id)
            (last,) = db.execute("SELECT last_counter FROM pos_terminal WHERE terminal_id = ?",
                                 (terminal_id,)).fetchone()
            if int(last) >= COUNTER_MAX:
                raise CounterExhausted(f"terminal {terminal_id}: the counter is exhausted")
            db.execute("UPDATE pos_terminal SET last_counter = ? WHERE terminal_id = ?",
                       (int(last) + 1, terminal_id))
        return int(last) + 1

    # -- internals ---------------------------------------------------------

    @staticmethod
    def _ensure(db: sqlite3.Connection, terminal_id: str) -> None:
        db.execute("INSERT OR IGNORE INTO pos_terminal (terminal_id) VALUES (?)", (terminal_id,))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the terminal store is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


def certificate_identity(pem: bytes) -> tuple[str, str, str]:
    """(role, name, scope) named by a client certificate's subject, as the
    server reads it (OU, CN, O): for a terminal ('pos', terminal, station)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    subject = x509.load_pem_x509_certificate(pem).subject

    def first(oid: Any) -> str:
        values = subject.get_attributes_for_oid(oid)
        value = values[0].value if values else ""
        return value if isinstance(value, str) else bytes(value).decode()

    return (first(NameOID.ORGANIZATIONAL_UNIT_NAME), first(NameOID.COMMON_NAME),
            first(NameOID.ORGANIZATION_NAME))
