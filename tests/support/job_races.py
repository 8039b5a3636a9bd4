"""Two maintenance jobs at once, as two server processes run them, made
deterministic: a third connection holds one account's advisory lock, the
first job is started and queues on it, then the second is started and queues
behind the first; then the account is let go. Jobs that lock in one order
(ascending account id) both finish; jobs that lock in a cycle deadlock, and
PostgreSQL fails one of them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.builders import FundedCard
from tests.support.ledger_asserts import Conn, scalar


@dataclass(frozen=True)
class CrossedFamilies:
    """Two parents and a member of each, ids P1 < P2 < A < B (A of P1, B of
    P2): a job visiting A then B in ascending id, each with its parent first,
    locks P1, A, P2, B - not ascending."""

    p1: int
    p2: int
    a: int
    b: int
    card_a: FundedCard
    card_b: FundedCard


def crossed_families(server: RunningServer, db: Conn, mode: cb.FundingMode) -> CrossedFamilies:
    parents = [cb.open_account(server), cb.open_account(server)]
    members = [cb.open_account(server, parent=p.account_id, mode=mode) for p in parents]
    for parent, member in zip(parents, members, strict=True):
        builders.recharge(server, parent.account_id, 1_000_000)
        if mode == cb.ALLOCATED:
            cb.batch_top_up(server, parent.account_id, [(member.account_id, 500_000)])
    p1, p2, a, b = (int(scalar(db, "SELECT id FROM fc.accounts WHERE uid = %s", (x.account_id,)))
                    for x in (*parents, *members))
    assert p1 < p2 < a < b
    card_a, card_b = (cb.issue_card(server, m.account_id) for m in members)
    return CrossedFamilies(p1, p2, a, b, card_a, card_b)


def _run(database_url: str, query: str, params: Mapping[str, object]) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(query.encode(), params).fetchone()
        assert row is not None
        result: int = row[0]
        return result


def jobs_behind_account_lock(database_url: str, account_id: int,
                             first: tuple[str, Mapping[str, object]],
                             second: tuple[str, Mapping[str, object]],
                             timeout_s: float = 20.0) -> list[int | BaseException]:
    """Each job's result, or the exception it failed with."""
    # The pool outlives the lock holder: on a failed assertion the holder
    # lets go first, so the queued jobs finish and the pool can shut down.
    with ThreadPoolExecutor(2) as pool:
        with psycopg.connect(database_url) as holder, \
                psycopg.connect(database_url, autocommit=True) as watcher:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (account_id,))

            def wait_for_queued(n: int) -> None:
                deadline = time.monotonic() + timeout_s
                while True:
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database()"
                        " AND cardinality(pg_blocking_pids(pid)) > 0").fetchone()
                    assert row is not None
                    if row[0] >= n:
                        return
                    assert time.monotonic() < deadline, f"only {row[0]} of {n} jobs queued"
                    time.sleep(0.01)

            futures = [pool.submit(_run, database_url, *first)]
            wait_for_queued(1)
            futures.append(pool.submit(_run, database_url, *second))
            wait_for_queued(2)
            holder.rollback()
        return [f.exception(timeout_s) or f.result() for f in futures]
