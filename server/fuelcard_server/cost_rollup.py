"""The cost rollup (issue 19): confirmed sales summed per vehicle and
business day and month (the business time zone's, as reports ask) in
fc.vehicle_costs, so the fleet cost report (reports.py) reads a few rows a
vehicle instead of every sale of seven periods.

Kept off the pump path: fc.confirm writes nothing more. A background job
(`CostRollup.run_once`, after each round of the journal chain in jobs.py)
follows the journal's purchase entries in id order behind a watermark
(fc.cost_rollup_state.rolled_id), in bounded batches, never past the
journal chain's head (ids up to it are final). A report sums the rolled
part from here and reads the entries past the watermark from the journal
itself, so a rollup that lags makes a report slower, never wrong.
Concurrent runs queue on the state row's lock; each adds its own batch.
"""

from __future__ import annotations

from fuelcard_server.db import Database

# Journal ids per batch: each batch one short transaction.
ROLLUP_BATCH = 5_000
# Bound on batches per run (a backlog past it goes on at the next run).
ROLLUP_BATCHES_MAX = 20

ROLL_UP_SQL = "SELECT fc.roll_up_costs(p_limit => %(limit)s)"


class CostRollup:
    def __init__(self, db: Database, batch: int = ROLLUP_BATCH) -> None:
        self._db = db
        self._batch = batch

    async def run_once(self) -> int:
        """Roll up to ROLLUP_BATCHES_MAX batches; returns the journal ids the
        watermark moved."""
        moved = 0
        for _ in range(ROLLUP_BATCHES_MAX):
            row = await self._db.fetch_one(ROLL_UP_SQL, {"limit": self._batch})
            assert row is not None
            moved += row[0]
            if row[0] < self._batch:
                break
        return moved
