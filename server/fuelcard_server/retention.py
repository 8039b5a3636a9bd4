"""Retention of idempotency keys and step-up challenges (README "Retention").

Neither table is needed for ever: a key answers replays of its request, a
challenge lets its code be checked and counts towards the per-subject rate
limit. What may be deleted, and why a replay after that cannot move money
twice, is in sql/functions/idempotency.sql (fc.replay_guarded). Here: how often and
how much.

A run is a bounded number of short transactions (`retention_batch` rows each,
at most `retention_batches_max` of them), each under a try-lock: while one
server process deletes, the others skip the round, so several servers never
fight over the same rows (and the statement skips rows someone else has
locked rather than wait).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from fuelcard_server.clock import Clock
from fuelcard_server.db import Database
from fuelcard_server.locks import RETENTION_LOCK
from fuelcard_server.settings import Settings
from fuelcard_server.stepup import Policy as StepUpPolicy
from fuelcard_server.telemetry import Telemetry

log = logging.getLogger(__name__)

PRUNE_KEYS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.prune_idempotency_keys(p_before => %(before)s::timestamptz,"
    " p_unguarded_before => %(unguarded_before)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
PRUNE_STEP_UPS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.prune_step_ups(p_before => %(before)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")

KEYS = "idempotency_keys"
STEP_UPS = "step_up_challenges"


@dataclass(frozen=True)
class Pruned:
    """One run: rows deleted per table; `busy` if another process held the
    lock (this one then did nothing more), `capped` if it stopped at the
    statement cap with more rows due."""

    idempotency_keys: int = 0
    step_up_challenges: int = 0
    busy: bool = False
    capped: bool = False


class Retention:
    def __init__(self, db: Database, clock: Clock, settings: Settings,
                 telemetry: Telemetry | None = None,
                 step_up_policy: StepUpPolicy | None = None) -> None:
        self.db = db
        self.clock = clock
        self.settings = settings
        self.telemetry = telemetry
        policy = step_up_policy or StepUpPolicy()
        # Never delete a challenge the rate limit still counts or whose code
        # may still be answered, whatever the setting says.
        self.step_up_keep = max(dt.timedelta(seconds=settings.step_up_retention_s),
                                policy.window, dt.timedelta(seconds=settings.otp_ttl_s))

    def cutoffs(self) -> tuple[dt.datetime, dt.datetime | None, dt.datetime]:
        """(guarded keys before, other keys before or None, challenges before)."""
        s = self.settings
        now = self.clock.now()
        unguarded = (now - dt.timedelta(seconds=s.idempotency_retention_unguarded_s)
                     if s.idempotency_retention_unguarded_s else None)
        return (now - dt.timedelta(seconds=s.idempotency_retention_s), unguarded,
                now - self.step_up_keep)

    async def run_once(self, batches_max: int | None = None) -> Pruned:
        """Delete what is due, in at most `batches_max` statements
        (default: the setting) shared by both tables."""
        s = self.settings
        budget = s.retention_batches_max if batches_max is None else batches_max
        keys_before, unguarded_before, step_ups_before = self.cutoffs()
        deleted = {KEYS: 0, STEP_UPS: 0}
        busy = False
        capped = False
        # Challenges first: few, so a backlog of keys never starves them.
        plans = ((STEP_UPS, PRUNE_STEP_UPS_SQL, {"lock": RETENTION_LOCK, "before": step_ups_before,
                                                 "limit": s.retention_batch}),
                 (KEYS, PRUNE_KEYS_SQL, {"lock": RETENTION_LOCK, "before": keys_before,
                                         "unguarded_before": unguarded_before,
                                         "limit": s.retention_batch}))
        for table, sql, params in plans:
            while True:
                if budget == 0:
                    capped = True
                    break
                budget -= 1
                row = await self.db.fetch_one(sql, params)
                assert row is not None
                count: int = row[0]
                if count < 0:
                    busy = True
                    break
                deleted[table] += count
                if count < s.retention_batch:
                    break
            if busy or capped:
                break
        result = Pruned(deleted[KEYS], deleted[STEP_UPS], busy=busy, capped=capped)
        if self.telemetry is not None:
            for table, count in deleted.items():
                if count:
                    self.telemetry.retention_deleted.add(count, {"table": table})
        if result.idempotency_keys or result.step_up_challenges:
            log.info("retention: deleted %d idempotency keys, %d step-up challenges%s",
                     result.idempotency_keys, result.step_up_challenges,
                     " (capped, more due)" if capped else "")
        return result
