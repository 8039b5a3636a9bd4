-- Placeholder: 0005 belongs to another branch of issue 15. feat/pii's 0007 needs no 0005 of its own,
-- but migration numbers must have no gap. DROP THIS FILE when merging.
SELECT 1;
