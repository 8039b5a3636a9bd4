"""`fuelcard events backfill`: events for the history booked before the
event stream existed (an upgraded database), so that a sidecar's warehouse
holds all of it.

The work is fc.backfill_events (sql/functions/events.sql): one
bounded batch per call, each its own short transaction that only reads the
history (by primary key ranges) and appends to fc.outbox, so it runs while
the server serves: no table lock, no long transaction. Progress is stored in
fc.event_backfill in the batch's transaction, so the command can be stopped
at any point and run again: it goes on where it stopped, and once done it
writes nothing.

Between batches the command keeps the outbox backlog bounded: while more
than `max_backlog` rows wait, it positions them itself (the server's own
sequencer, under the same advisory lock; when a server process holds the
lock it is doing the same work, and the command waits a moment).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from fuelcard_server.events import SEQUENCE_SQL
from fuelcard_server.locks import EVENT_SEQUENCER_LOCK

BACKFILL_SQL = "SELECT fc.backfill_events(p_limit => %(limit)s)"
PROGRESS_SQL = "SELECT source, through_id, done_id FROM fc.event_backfill ORDER BY source"
BACKLOG_SQL = "SELECT count(*) FROM (SELECT 1 FROM fc.outbox LIMIT %s) o"
# After a batch that found nothing: every source's range is written, but its
# done_id is the last id that existed, short of through_id when the range
# ends in a gap (ids of rolled-back transactions): close the ranges, or
# --status says "to do" for ever. Safe: the ranges predate the stream, so no
# row can appear in them later.
CLOSE_SQL = "UPDATE fc.event_backfill SET done_id = through_id WHERE done_id < through_id"
SOURCES = {1: "journal entries", 3: "accounts", 4: "cards", 5: "stations", 6: "refunds"}
# How long to wait for another process's sequencer round before looking again.
SEQUENCER_BUSY_WAIT_S = 0.1
# Sequencer rounds per wait for the backlog at most: the bound is kept loosely
# when live traffic outpaces sequencing, never by waiting for ever.
DRAIN_ROUNDS_MAX = 1000


@dataclass(frozen=True)
class Source:
    name: str
    through_id: int
    done_id: int

    @property
    def done(self) -> bool:
        return self.done_id >= self.through_id


def progress(conn: psycopg.Connection[tuple[Any, ...]]) -> list[Source]:
    return [Source(SOURCES[int(s)], int(t), int(d))
            for s, t, d in conn.execute(PROGRESS_SQL).fetchall()]


def _drain(conn: psycopg.Connection[tuple[Any, ...]], max_backlog: int, batch: int,
           now: Callable[[], dt.datetime]) -> None:
    """Position outbox rows until at most max_backlog wait."""
    for _ in range(DRAIN_ROUNDS_MAX):
        row = conn.execute(BACKLOG_SQL, (max_backlog + 1,)).fetchone()
        if row is None or int(row[0]) <= max_backlog:
            return
        done = conn.execute(SEQUENCE_SQL, {"lock": EVENT_SEQUENCER_LOCK, "now": now(),
                                          "limit": batch}).fetchone()
        if done is not None and int(done[0]) < 0:  # a server process is at it
            time.sleep(SEQUENCER_BUSY_WAIT_S)


def run(url: str, *, batch: int = 2000, max_backlog: int = 20_000,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        log: Callable[[str], None] = lambda _: None, max_batches: int | None = None) -> int:
    """Write the backfill's outbox rows in batches of `batch` source rows;
    how many rows were written (0 when there was nothing left to do).
    `max_batches` stops early (resumable: the next run goes on)."""
    if batch < 1 or max_backlog < 0:
        raise ValueError("batch must be >= 1 and max_backlog >= 0")
    written = 0
    batches = 0
    with psycopg.connect(url, autocommit=True) as conn:
        # Never queue behind a lock for long: the batch only appends and reads.
        conn.execute("SET lock_timeout = '10s'")
        while max_batches is None or batches < max_batches:
            _drain(conn, max_backlog, batch, now)
            row = conn.execute(BACKFILL_SQL, {"limit": batch}).fetchone()
            count = int(row[0]) if row is not None else 0
            if count == 0:
                conn.execute(CLOSE_SQL)
                break
            written += count
            batches += 1
            if batches % 50 == 1:
                log(f"batch {batches}: {written} events written; "
                    + ", ".join(f"{s.name} {s.done_id}/{s.through_id}" for s in progress(conn)))
        # Position the last batches too, so that a consumer sees them now.
        _drain(conn, 0, batch, now)
    return written
