"""Make a same-request race deterministic: hold a row's lock from the side,
send the same request several times at once, wait until every one of them
is queued on that lock inside the database, then let go. All of them have
passed their first idempotency lookup by then, so the lookup after the lock
is what must answer the twins."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import psycopg
from psycopg import sql

T = TypeVar("T")


def twins_behind_row_lock(database_url: str, table: str, uid: str, call: Callable[[], T],
                          twins: int = 4, timeout_s: float = 20.0) -> list[Future[T]]:
    # The pool outlives the lock holder: on a failed assertion the holder
    # lets go first, so the queued calls finish and the pool can shut down.
    with ThreadPoolExecutor(twins) as pool:
        with psycopg.connect(database_url) as holder:
            holder.execute(sql.SQL("SELECT 1 FROM {} WHERE uid = %s FOR UPDATE").format(
                sql.Identifier("fc", table)), (uid,))
            holder_pid = holder.info.backend_pid
            futures = [pool.submit(call) for _ in range(twins)]
            with psycopg.connect(database_url, autocommit=True) as watcher:
                deadline = time.monotonic() + timeout_s
                while True:
                    # The first in the queue waits for the holder, the rest
                    # for the first (PostgreSQL's tuple lock): count both.
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> %s"
                        " AND cardinality(pg_blocking_pids(pid)) > 0", (holder_pid,)).fetchone()
                    assert row is not None
                    if row[0] >= twins:
                        break
                    assert time.monotonic() < deadline, f"only {row[0]} of {twins} queued"
                    assert not any(f.done() for f in futures), [
                        f.exception() for f in futures if f.done()]
                    time.sleep(0.01)
            holder.rollback()
        for f in futures:
            f.exception(timeout_s)
    return futures
