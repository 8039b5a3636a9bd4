"""The maintenance jobs of a serving process, each in a loop of its own
task: holds past their expiry released (customers' reserved money given
back), points lots lapsed, tiers re-evaluated as old months leave their
window, idempotency keys and step-up challenges pruned (retention.py), and
the event outbox positioned and pruned (events.py), committed journal
entries hash-chained (journal_chain.py).

Every job takes an advisory lock and does nothing while another process
holds it: under `serve --workers N` one process at a time does each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fuelcard_server import errors
from fuelcard_server.clock import Clock
from fuelcard_server.cost_rollup import CostRollup
from fuelcard_server.db import Database
from fuelcard_server.events import PRUNE_BATCHES_MAX, PRUNE_EVERY_S, Sequencer
from fuelcard_server.journal_chain import Chainer
from fuelcard_server.locks import EXPIRY_SWEEP_LOCK, POINTS_EXPIRY_LOCK, TIER_EVALUATION_LOCK
from fuelcard_server.retention import Pruned, Retention
from fuelcard_server.settings import Settings
from fuelcard_server.statement_rollup import StatementRollup
from fuelcard_server.telemetry import Telemetry

# The server's log lines keep the logger they had when this lived in app.py:
# operators filter on it (the JSON lines' "logger").
log = logging.getLogger("fuelcard_server.app")
_T = TypeVar("_T")

# Only one process sweeps at a time; the others skip the round.
EXPIRE_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.expire_holds(p_now => %(now)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
# The accounts the sweep set aside since the last report (fc.sweep_account): each is logged
# and counted once, then skipped until its retry time.
TAKE_SWEEP_FAILURES_SQL = (
    "SELECT account_uid, sqlstate, message, failures, retry_at FROM fc.take_hold_sweep_failures()")
EXPIRE_POINTS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.expire_points(p_now => %(now)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
# One batch of the tier job (NULL: another process is at it).
EVALUATE_TIERS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.evaluate_tiers(p_now => %(now)s::timestamptz, p_after_id => %(after_id)s,"
    " p_limit => %(limit)s) END")
TIER_EVALUATION_INTERVAL = 3600.0
# Accounts per batch of the tier job, each batch its own transaction holding
# that many account locks (plus parents) for a few milliseconds; and a bound
# on batches per run (a run past it goes on at the next interval).
TIER_BATCH = 500
TIER_BATCHES_MAX = 100_000


class Jobs:
    """The jobs of one serving process; app.py starts expiry_loop and
    event_loop as tasks, tests call the *_once steps directly."""

    def __init__(self, db: Database, clock: Clock, settings: Settings, telemetry: Telemetry,
                 retention: Retention, sequencer: Sequencer) -> None:
        self._db = db
        self.clock = clock
        self.settings = settings
        self.telemetry = telemetry
        self._retention = retention
        self._sequencer = sequencer
        self._chainer = Chainer(db, settings.journal_chain_batch)
        self._cost_rollup = CostRollup(db)
        self._statement_rollup = StatementRollup(db)
        # Set once journal_chain_loop's first round (at start) is over: from then on the chain
        # and the rollups write only at their interval (tests wait for it, so that no job
        # writes behind a test's back).
        self.first_chain_round = asyncio.Event()

    async def expire_holds_once(self) -> int:
        """One sweep; returns holds released, or -1 if another process is
        sweeping."""
        row = await self._db.fetch_one(EXPIRE_SQL, {
            "lock": EXPIRY_SWEEP_LOCK, "now": self.clock.now(), "limit": self.settings.expiry_batch})
        assert row is not None
        released: int = row[0]
        if released > 0:
            self.telemetry.hold_expiries.add(released)
        if released >= 0:
            await self._report_sweep_failures()
        return released

    async def _report_sweep_failures(self) -> None:
        """Log and count the accounts whose expired holds the sweep could
        not release: the others were released all the same, and these stay
        set aside until their retry time. An operator follows the account
        id (never a card number: the message is the database's text about
        internal rows)."""
        for uid, sqlstate, message, failures, retry_at in await self._db.fetch_all(
                TAKE_SWEEP_FAILURES_SQL, {}):
            self.telemetry.hold_expiry_failures.add(1)
            log.error("hold expiry failed for account %s (sqlstate %s, failure %d): %s; "
                      "skipped until %s", uid, sqlstate, failures, message, retry_at.isoformat())

    async def expire_points_once(self) -> int:
        """Lapse points lots past their expiry; -1 if another process is on it."""
        row = await self._db.fetch_one(EXPIRE_POINTS_SQL, {
            "lock": POINTS_EXPIRY_LOCK, "now": self.clock.now(), "limit": self.settings.expiry_batch})
        assert row is not None
        lapsed: int = row[0]
        return lapsed

    async def evaluate_tiers_once(self, batch: int = TIER_BATCH) -> int:
        """Re-evaluate tiers (they fall as old months leave the window), in
        batches of `batch` accounts; the number changed, or -1 if another
        process is on it."""
        now = self.clock.now()
        changed = 0
        after_id = 0
        for _ in range(TIER_BATCHES_MAX):
            row = await self._db.fetch_one(EVALUATE_TIERS_SQL, {
                "lock": TIER_EVALUATION_LOCK, "now": now, "after_id": after_id, "limit": batch})
            assert row is not None
            if row[0] is None:  # another process took the job between two batches
                return changed if after_id else -1
            changed += int(row[0]["changed"])
            if row[0]["last_id"] is None:
                break
            after_id = int(row[0]["last_id"])
        return changed

    async def prune_once(self) -> Pruned:
        """One bounded retention run (retention.py): idempotency keys and
        step-up challenges past their retention."""
        return await self._retention.run_once()

    async def expiry_loop(self) -> None:
        """Hold expiry every expiry_interval_s (at once again after a full
        batch), with points expiry, the hourly tier job and retention
        alongside it."""
        next_tiers = 0.0
        loop = asyncio.get_running_loop()
        # (not at start: servers restarted in a loop would prune back to back)
        next_prune = loop.time() + self.settings.retention_interval_s
        while True:
            # Holds first, and every other job on its own: one that keeps
            # failing (a timeout, a function missing) must never keep
            # customers' money reserved. A failed job is tried again at the
            # next sweep.
            released = await self._sweep("hold expiry", self.expire_holds_once)
            if released is not None and released > 0:  # -1: another process sweeps
                log.info("released %d expired holds", released)
            await self._sweep("points expiry", self.expire_points_once)
            if loop.time() >= next_tiers and \
                    await self._sweep("tier evaluation", self.evaluate_tiers_once) is not None:
                next_tiers = loop.time() + TIER_EVALUATION_INTERVAL
            if loop.time() >= next_prune:
                pruned = await self._sweep("retention", self.prune_once)
                if pruned is not None:  # capped (more due): again at the next sweep
                    next_prune = loop.time() + (0.0 if pruned.capped
                                                else self.settings.retention_interval_s)
            # A full batch means more holds are due: go again at once.
            if released is not None and released >= self.settings.expiry_batch:
                continue
            await asyncio.sleep(self.settings.expiry_interval_s)

    @staticmethod
    async def _sweep(what: str, job: Callable[[], Awaitable[_T]]) -> _T | None:
        """One maintenance job; None if it failed (the health probe flips
        health when the database is gone, so a warning is enough here). Any
        other exception is a bug, logged as one, but it must not end the
        loop: expiry is what gives customers' reserved money back."""
        try:
            return await job()
        except errors.ApiError as exc:
            log.warning("%s failed: %s", what, exc.reason)
            return None
        except Exception:
            log.exception("%s failed unexpectedly; tried again at the next sweep", what)
            return None

    async def sequence_events_once(self) -> int:
        """Position one batch of committed outbox rows; -1 if another
        process is on it."""
        return await self._sequencer.run_once()

    async def chain_journal_once(self) -> int:
        """Chain one batch of committed journal entries; -1 if another
        process is on it."""
        return await self._chainer.run_once()

    async def roll_up_costs_once(self) -> int:
        """Add the sales the chain has passed to the cost rollup (cost_rollup.py)."""
        return await self._cost_rollup.run_once()

    async def roll_up_statements_once(self) -> int:
        """Add the money entries the chain has passed to the statement rollup
        (statement_rollup.py)."""
        return await self._statement_rollup.run_once()

    async def journal_chain_loop(self) -> None:
        """Keep the journal's hash chain within a round of the newest commit:
        every journal_chain_interval_s, at once again after a full batch."""
        while True:
            chained = await self._sweep("journal chaining", self.chain_journal_once)
            # The rollup follows the chain's head, so it runs right behind it.
            await self._sweep("cost rollup", self.roll_up_costs_once)
            await self._sweep("statement rollup", self.roll_up_statements_once)
            self.first_chain_round.set()
            if chained is None or chained < self.settings.journal_chain_batch:
                await asyncio.sleep(self.settings.journal_chain_interval_s)

    async def event_loop(self) -> None:
        """Keep the event stream moving (and pruned): the only caller of
        run_once in a serving process (streams wait for its rounds, or ask
        for one now: Sequencer.round); bounded batches, one process at a time."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + PRUNE_EVERY_S
        full = False
        while True:
            if not full:
                await self._sequencer.pause(self.settings.event_interval_s)
            full = False
            try:
                # a full batch: more are waiting, go again at once
                full = await self._sequencer.run_once() >= self.settings.event_batch
                if loop.time() >= next_prune:
                    next_prune = loop.time() + PRUNE_EVERY_S
                    # bounded: up to PRUNE_BATCHES_MAX batches a minute
                    for _ in range(PRUNE_BATCHES_MAX):
                        if await self._sequencer.prune_once() < self.settings.event_batch:
                            break
            except errors.ApiError as exc:
                log.warning("event sequencing failed: %s", exc.reason)
            except Exception:
                log.exception("event sequencing failed unexpectedly; tried again shortly")
