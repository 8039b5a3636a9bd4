-- Placeholder: 0003 belongs to feat/exceptions-adjustments (0003_exceptions_adjustments.sql).
-- This branch's 0004 needs no 0003 of its own, but migration numbers must have no gap. DROP
-- THIS FILE when merging.
SELECT 1;
