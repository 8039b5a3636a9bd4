"""Make a race deterministic: hold a row's lock from the side, start the
racing calls, wait until they are queued inside the database, then let go.

twins_behind_row_lock sends the same request several times at once: all
have passed their first idempotency lookup by the time they queue, so the
lookup after the lock is what must answer the twins."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
from psycopg import sql

T = TypeVar("T")

# Backends of this database that wait for a lock. The first in a row lock's
# queue waits for the holder, the rest for the first (PostgreSQL's tuple
# lock): counting backends with any blocker counts them all.
QUEUED_SQL = """
    SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0"""


def wait_queued(database_url: str, n: int, started: Sequence[Future[Any]] = (),
                timeout_s: float = 20.0) -> None:
    """Return once n backends wait for a lock; fail if one of `started`
    finished meanwhile (it did not queue) or after timeout_s."""
    with psycopg.connect(database_url, autocommit=True) as watcher:
        deadline = time.monotonic() + timeout_s
        while True:
            row = watcher.execute(QUEUED_SQL).fetchone()
            assert row is not None
            if row[0] >= n:
                return
            assert time.monotonic() < deadline, f"only {row[0]} of {n} queued"
            assert not any(f.done() for f in started), [
                f.exception() for f in started if f.done()]
            time.sleep(0.01)


def twins_behind_row_lock(database_url: str, table: str, uid: str, call: Callable[[], T],
                          twins: int = 4, timeout_s: float = 20.0) -> list[Future[T]]:
    # The pool outlives the lock holder: on a failed assertion the holder
    # lets go first, so the queued calls finish and the pool can shut down.
    with ThreadPoolExecutor(twins) as pool:
        with psycopg.connect(database_url) as holder:
            holder.execute(sql.SQL("SELECT 1 FROM {} WHERE uid = %s FOR UPDATE").format(
                sql.Identifier("fc", table)), (uid,))
            futures = [pool.submit(call) for _ in range(twins)]
            wait_queued(database_url, twins, futures, timeout_s)
            holder.rollback()
        for f in futures:
            f.exception(timeout_s)
    return futures
