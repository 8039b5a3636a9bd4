-- Placeholder: migration 0004 belongs to another branch merged alongside this one; this branch's
-- 0005 needs no 0004 of its own, but migration numbers must have no gap. DROP THIS FILE when merging.
SELECT 1;
