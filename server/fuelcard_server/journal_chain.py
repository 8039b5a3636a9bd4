"""The journal's SM3 hash chain: tamper evidence for the ledger itself.

Each journal entry gets a chain hash, in entry id order:

    hash(e) = SM3(hash(previous chained entry) || encode(e))

the first entry's previous hash being 32 zero bytes (GENESIS). `encode` is
the entry's canonical encoding, defined here and nowhere else: every column
of fc.journal, in this fixed order, through keys.canonical (each field a
type tag, a 4-byte length and its bytes; integers signed big-endian, text
UTF-8), after the tag "JournalEntry/1":

    id, kind, asset, debit_account_id, credit_account_id, amount,
    hold_id (0 when NULL), recharge_id (0 when NULL), description,
    created_at (integer microseconds since 1970-01-01 UTC)

(ids are >= 1, so 0 cannot be a real hold or recharge.) A new column of
fc.journal needs a new tag ("JournalEntry/2") and a decision about the
entries chained before it.

Not on the pump path. The SM3 of fc.sm3 in PL/pgSQL costs ~70 us a block,
and a chain extended inside each sale would serialise every sale on one
lock. So entries are chained after they commit, by a background job
(`Chainer.run_once`, from the server's event loop; one process at a time
under locks.JOURNAL_CHAIN_LOCK; bounded batches) that hashes with the
C-backed SM3 of gm.py and stores each hash in fc.journal_chain (append-only:
the serving role may insert there, never update or delete). Entries not yet
chained are a window of about journal_chain_interval_s (one second by
default) behind the newest commit, longer only while a batch backlog drains
(a database upgraded with an existing journal chains it in batches).

Committed in id order, chained in id order. An identity id is taken before
its transaction commits, and a transaction that rolls back leaves its id
unused for good; one still running will commit later with a lower id than
entries already visible. So the job chains the next id only when it is the
one after the last chained, or when every id up to it is final
(fc.journal_chain_state): one round notes the largest visible id (the
"horizon"), the next round notes its snapshot's xmax, and once the oldest
running transaction is newer than that xmax, the ids up to the horizon are
final. A transaction that took one of them did so before the first round,
in the statement that wrote the row (which gives it its xid); by the second
round, a job interval later, it has an xid, below that xmax; so it has ended,
and a missing id will never appear. A gap is passed over after about three
rounds. Were an entry ever to appear below the chain's head after all,
`verify` reports it as unchained: never silently skipped.

`verify` (walk) recomputes every hash and reports the first broken link: an
entry edited (its hash no longer matches), deleted (a chain row without its
entry), or inserted below the head; anchors (audit_anchor.py, format
"fuelcard-journal-anchor/1", written by `fuelcard journal anchor`) catch a
chain rewritten wholesale or cut short.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests

from fuelcard_server import errors, gm, keys
from fuelcard_server.db import Database, one_shot, translate
from fuelcard_server.locks import JOURNAL_CHAIN_LOCK

log = logging.getLogger(__name__)

GENESIS = bytes(32)
TAG = "JournalEntry/1"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The columns encode() takes, in its order.
COLUMNS = ("id, kind, asset, debit_account_id, credit_account_id, amount, hold_id, recharge_id,"
           " description, created_at")

Entry = tuple[Any, ...]  # a row of COLUMNS


def encode(entry: Entry) -> bytes:
    """The canonical encoding of one journal entry (see the module docstring)."""
    (entry_id, kind, asset, debit, credit, amount, hold_id, recharge_id, description,
     created_at) = entry
    micros = (created_at - EPOCH) // dt.timedelta(microseconds=1)
    return keys.canonical(TAG, entry_id, kind, asset, debit, credit, amount, hold_id or 0,
                          recharge_id or 0, description, micros)


def link(prev_hash: bytes, entry: Entry) -> bytes:
    return gm.sm3(prev_hash + encode(entry))


# --- chaining (the background job) ---------------------------------------------

LOCK_SQL = "SELECT pg_try_advisory_xact_lock(%(lock)s)"
# One snapshot for all of it (pg_current_snapshot() is the statement's): the
# horizon kept, the oldest running and the next transaction, the largest
# visible id, and the chain's head.
STATE_SQL = """
    SELECT s.settled_id, s.horizon_id, s.horizon_xmax,
           pg_snapshot_xmin(pg_current_snapshot()), pg_snapshot_xmax(pg_current_snapshot()),
           (SELECT coalesce(max(id), 0) FROM fc.journal),
           h.entry_id, h.hash
      FROM fc.journal_chain_state s
      LEFT JOIN LATERAL (SELECT entry_id, hash FROM fc.journal_chain
                          ORDER BY entry_id DESC LIMIT 1) h ON true
       FOR UPDATE OF s"""
BATCH_SQL = ("SELECT " + COLUMNS + " FROM fc.journal WHERE id > %(after)s ORDER BY id"
             " LIMIT %(limit)s")
STORE_SQL = ("INSERT INTO fc.journal_chain (entry_id, hash)"
             " SELECT * FROM unnest(%(ids)s::bigint[], %(hashes)s::bytea[])")
STATE_UPDATE_SQL = ("UPDATE fc.journal_chain_state SET settled_id = %(settled)s,"
                    " horizon_id = %(horizon_id)s, horizon_xmax = %(horizon_xmax)s::xid8")


def chainable(entries: Sequence[Entry], head_id: int, settled_id: int) -> int:
    """How many of `entries` (ids above head_id, ascending) may be chained
    now: up to the first one after a missing id that may still appear."""
    expected, n = head_id + 1, 0
    for entry in entries:
        if entry[0] != expected and entry[0] > settled_id:
            break
        expected, n = entry[0] + 1, n + 1
    return n


class Chainer:
    """Extends the chain by one bounded batch a round."""

    def __init__(self, db: Database, batch: int) -> None:
        self.db = db
        self.batch = batch

    async def run_once(self) -> int:
        """Chain up to one batch of committed entries; how many, or -1 if
        another process is at it. A database that is down (or a pool that
        is busy) is an ApiError, as for the other jobs: tried next round."""
        if not self.db.available:
            raise errors.unavailable(*self.db.unavailable_reason)
        try:
            return await self._round()
        except (PoolTimeout, TooManyRequests, PoolClosed):
            raise errors.unavailable("DATABASE_BUSY",
                                     "no database connection for the chain job") from None
        except psycopg.Error as exc:
            raise translate(exc) from None

    async def _round(self) -> int:
        # Several statements in one transaction (the hashing happens here,
        # between them), which Database's one-statement calls do not give.
        async with self.db.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(LOCK_SQL, {"lock": JOURNAL_CHAIN_LOCK})).fetchone()
            if row is None or not row[0]:
                return -1
            state = await (await conn.execute(STATE_SQL)).fetchone()
            assert state is not None, "fc.journal_chain_state has its one row"
            (settled, horizon_id, horizon_xmax, oldest_running, next_xid, max_id, head_id,
             head_hash) = state
            head_id, prev = (head_id or 0), bytes(head_hash) if head_hash is not None else GENESIS
            if int(horizon_xmax) == 0:
                # the horizon's second round: the xmax it must be older than
                horizon_xmax = next_xid
            elif int(oldest_running) >= int(horizon_xmax):
                # every transaction that took an id up to the horizon has
                # ended: those ids are final; note the next horizon
                settled = max(settled, horizon_id)
                horizon_id, horizon_xmax = max_id, 0
            entries = await (await conn.execute(
                BATCH_SQL, {"after": head_id, "limit": self.batch})).fetchall()
            entries = entries[:chainable(entries, head_id, settled)]
            hashes = []
            for entry in entries:
                prev = link(prev, entry)
                hashes.append(prev)
            if entries:
                await conn.execute(STORE_SQL, {"ids": [e[0] for e in entries], "hashes": hashes})
            await conn.execute(STATE_UPDATE_SQL, {"settled": settled, "horizon_id": horizon_id,
                                                  "horizon_xmax": str(horizon_xmax)})
            return len(entries)


# --- verifying --------------------------------------------------------------------

WALK_SQL = ("SELECT coalesce(j.id, c.entry_id), " + ", ".join(
    f"j.{c.strip()}" for c in COLUMNS.split(",")) + ", c.hash"
    " FROM fc.journal j FULL JOIN fc.journal_chain c ON c.entry_id = j.id"
    " ORDER BY coalesce(j.id, c.entry_id)")
HEAD_SQL = "SELECT entry_id, hash FROM fc.journal_chain ORDER BY entry_id DESC LIMIT 1"


@dataclass(frozen=True)
class Problem:
    """A break in the chain, at the entry it shows in."""

    entry_id: int
    kind: str  # edited | deleted | unchained | anchor
    detail: str

    def __str__(self) -> str:
        return f"entry {self.entry_id}: {self.detail}"


@dataclass
class Report:
    chained: int = 0
    unchained: int = 0  # entries above the head: not chained yet (the window)
    head_id: int = 0
    head_hash: bytes = GENESIS
    problems: list[Problem] = field(default_factory=list)


def walk_connection(conn: psycopg.Connection[tuple[Any, ...]],
                    anchors: Sequence[tuple[int, bytes]] = ()) -> Report:
    """Walk the whole journal and its chain in id order on `conn` (in the
    caller's transaction), recomputing every hash. Each chain row is checked
    against the stored hash before it, so one edited entry is one problem.
    Every anchored (entry id, hash) must still be in the chain."""
    report = Report()
    head = conn.execute(HEAD_SQL).fetchone()
    if head is not None:
        report.head_id, report.head_hash = int(head[0]), bytes(head[1])
    prev = GENESIS
    wanted: dict[int, set[bytes]] = {}
    for entry_id, digest in anchors:
        wanted.setdefault(entry_id, set()).add(digest)
    found: dict[int, bytes] = {}
    with conn.cursor(name="journal_chain_walk") as cur:
        cur.itersize = 5000
        cur.execute(WALK_SQL)
        for row in cur:
            entry_id, entry, stored = int(row[0]), row[1:-1], row[-1]
            if stored is None:
                if entry_id < report.head_id:
                    report.problems.append(Problem(
                        entry_id, "unchained", "is below the chain's head but not in the chain:"
                        " inserted out of order, or its chain row deleted"))
                else:
                    report.unchained += 1
                continue
            stored = bytes(stored)
            if entry[0] is None:
                report.problems.append(Problem(
                    entry_id, "deleted", "is in the chain but not in the journal: deleted"))
            elif link(prev, entry) != stored:
                report.problems.append(Problem(
                    entry_id, "edited", "its chain hash does not match the entry and the hash"
                    " before it: the entry was edited (or the chain rewritten)"))
            if entry_id in wanted:
                found[entry_id] = stored
            report.chained += 1
            prev = stored
    for entry_id in sorted(wanted):
        got = found.get(entry_id)
        if got is not None and wanted[entry_id] == {got}:
            continue
        detail = ("is anchored but not in the chain: the chain was cut short or rewritten"
                  if got is None else "has another hash than the anchor: the chain was rewritten")
        report.problems.append(Problem(entry_id, "anchor", detail))
    report.problems.sort(key=lambda p: p.entry_id)
    return report


def walk(url: str, anchors: Sequence[tuple[int, bytes]] = ()) -> Report:
    """walk_connection on a connection of its own (a consistent snapshot)."""
    with one_shot(url) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        return walk_connection(conn, anchors)
