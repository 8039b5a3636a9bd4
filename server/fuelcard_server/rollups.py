"""The run of a rollup job: a stored function that adds one bounded batch of
the journal past its watermark to a rollup (fc.roll_up_costs,
fc.roll_up_statements), called batch after batch until it comes back short
or the run's bound is reached (a backlog past it goes on at the next run).
The rollups themselves: cost_rollup.py and statement_rollup.py."""

from __future__ import annotations

from typing import LiteralString

from fuelcard_server.db import Database

# Bound on batches per run.
ROLLUP_BATCHES_MAX = 20
# How far behind the newest journal entry a rollup may be for a report to read it (the rolled
# rows plus the entries past its watermark). Further behind (a database just migrated, before
# the job has caught up: some seconds per 100 000 sales) the entries past the watermark cost
# more than the rollup saves, and the report reads the journal or the holds instead, as it did
# before the rollup: exact either way.
ROLLUP_MAX_LAG = 50_000


class Rollup:
    def __init__(self, db: Database, roll_up_sql: LiteralString, batch: int) -> None:
        """roll_up_sql: one batch of at most %(limit)s journal ids; it
        returns how many ids the watermark moved."""
        self._db = db
        self._sql = roll_up_sql
        self._batch = batch

    async def run_once(self) -> int:
        """Roll up to ROLLUP_BATCHES_MAX batches; returns the journal ids the
        watermark moved."""
        moved = 0
        for _ in range(ROLLUP_BATCHES_MAX):
            row = await self._db.fetch_one(self._sql, {"limit": self._batch})
            assert row is not None
            moved += row[0]
            if row[0] < self._batch:
                break
        return moved
