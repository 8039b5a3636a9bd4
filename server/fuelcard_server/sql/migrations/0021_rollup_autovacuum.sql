-- The report rollups (fc.vehicle_costs, fc.statement_movements) are read by index-only scans,
-- which skip the table only on pages the visibility map marks all-visible; and every sale
-- updates a vehicle's day and month rows, which clears those marks and leaves a dead row. At
-- the default thresholds (a vacuum once a fifth of the rows are dead) a 10 000-vehicle fleet's
-- rollup goes about a month between vacuums, and right after a backfill (a migrated database,
-- a restored one) every row is dead or unmarked: measured at 10 000 vehicles, the cost report
-- took 300 ms against 82 ms after a vacuum. Vacuumed once a hundredth of the rows changed,
-- the rollups stay marked and small; vacuuming them costs little (the visibility map skips
-- the pages nothing touched).
ALTER TABLE fc.vehicle_costs SET (autovacuum_vacuum_scale_factor = 0.01,
                                  autovacuum_vacuum_insert_scale_factor = 0.01,
                                  autovacuum_analyze_scale_factor = 0.02);
ALTER TABLE fc.statement_movements SET (autovacuum_vacuum_scale_factor = 0.01,
                                        autovacuum_vacuum_insert_scale_factor = 0.01,
                                        autovacuum_analyze_scale_factor = 0.02);
