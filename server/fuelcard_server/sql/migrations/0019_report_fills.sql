-- Issue 19: the fleet cost report flags fills above a stated tank capacity and fills outside
-- working hours. Read from fc.holds, that was a scan of every hold of the period (a few hundred
-- ms at 10 000 vehicles, on every report); the rollup now keeps what those flags need per
-- vehicle and bucket:
--   max_fill_ml:  the largest single fill (a fill above the tank exists iff this is above it);
--   fill_minutes: the distinct minutes of the day, in the business time zone, at which the
--                 bucket's sales closed (a fill outside any working hours exists iff one of
--                 these is outside them). Sorted, at most 1 440 entries, in practice a handful.
ALTER TABLE fc.vehicle_costs
    ADD COLUMN max_fill_ml bigint DEFAULT 0 NOT NULL,
    ADD COLUMN fill_minutes smallint[] DEFAULT '{}' NOT NULL,
    ADD CONSTRAINT vehicle_costs_fill_minutes_bound CHECK (cardinality(fill_minutes) <= 1440);

-- Buckets are now the business time zone's days and months (fc.business_tz()), not UTC's: a
-- report over business days (the console's) reads whole buckets and no part-day edges from
-- fc.holds, and a business month is one row a vehicle.
--
-- The rows rolled so far lack the new columns and have UTC bounds: roll up again from the start. Until the job has
-- caught up, the report reads fc.holds (reports.ROLLUP_MAX_LAG), exact either way.
TRUNCATE fc.vehicle_costs;
UPDATE fc.cost_rollup_state SET rolled_id = 0;

-- The report's read of a period stays index-only with the new columns.
DROP INDEX fc.vehicle_costs_by_bucket;
CREATE INDEX vehicle_costs_by_bucket ON fc.vehicle_costs (grain, bucket)
    INCLUDE (vehicle_id, spend_fen, volume_ml, sale_count, first_hold_id, last_hold_id,
             max_fill_ml, fill_minutes);
