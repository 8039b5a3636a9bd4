-- Placeholder: 0006 belongs to another branch of issue 15. feat/pii's 0007 needs no 0006 of its own,
-- but migration numbers must have no gap. DROP THIS FILE when merging.
SELECT 1;
