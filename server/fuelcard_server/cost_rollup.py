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
from fuelcard_server.rollups import Rollup

# Journal ids per batch: each batch one short transaction.
ROLLUP_BATCH = 5_000
ROLL_UP_SQL = "SELECT fc.roll_up_costs(p_limit => %(limit)s)"


class CostRollup(Rollup):
    def __init__(self, db: Database, batch: int = ROLLUP_BATCH) -> None:
        super().__init__(db, ROLL_UP_SQL, batch)
