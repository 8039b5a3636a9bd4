-- Issue 19: the fleet cost report (reports.py) read every confirmed hold of a fleet over the
-- period and six baseline periods, ~1.2 s for 10 000 vehicles and a year of sales. These
-- tables hold the sales already summed per vehicle and UTC day / UTC month, kept by a
-- background job (cost_rollup.py, fc.roll_up_costs) from the journal, never on the pump path
-- (no trigger, no index on fc.holds or fc.journal: a sale's write cost is unchanged).

-- table: fc.vehicle_costs
-- One row per vehicle (holds.spender_account_id), grain and bucket: the confirmed sales whose
-- purchase entry is at or below fc.cost_rollup_state.rolled_id, by closed_at. first_hold_id
-- and last_hold_id bound the hold ids of a day's sales, so a report can read a day's part
-- from fc.holds through holds_by_spender (spender_account_id, id) without a time index.
CREATE TABLE fc.vehicle_costs (
    vehicle_id bigint NOT NULL,
    grain smallint NOT NULL,
    bucket timestamptz NOT NULL,
    spend_fen bigint NOT NULL,
    volume_ml bigint NOT NULL,
    sale_count integer NOT NULL,
    first_hold_id bigint NOT NULL,
    last_hold_id bigint NOT NULL,
    CONSTRAINT vehicle_costs_pkey PRIMARY KEY (vehicle_id, grain, bucket),
    -- 1: the UTC day starting at bucket; 2: the UTC month starting at bucket
    CONSTRAINT vehicle_costs_grain_check CHECK (grain IN (1, 2))
);

-- A report reads one grain's buckets over a range for a fleet's vehicles: an index-only
-- range scan here (the key leads with the vehicle, which would mean one probe per vehicle).
CREATE INDEX vehicle_costs_by_bucket ON fc.vehicle_costs (grain, bucket)
    INCLUDE (vehicle_id, spend_fen, volume_ml, sale_count, first_hold_id, last_hold_id);

-- table: fc.cost_rollup_state
-- The journal id up to which every purchase entry is in fc.vehicle_costs. Only ids the
-- journal chain has passed (final: no transaction can still commit one below) are rolled.
CREATE TABLE fc.cost_rollup_state (
    one boolean DEFAULT true NOT NULL,
    rolled_id bigint DEFAULT 0 NOT NULL,
    CONSTRAINT cost_rollup_state_pkey PRIMARY KEY (one),
    CONSTRAINT cost_rollup_state_one CHECK (one)
);
INSERT INTO fc.cost_rollup_state DEFAULT VALUES;
