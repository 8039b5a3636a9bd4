-- Placeholder: 0002 belongs to feat/key-custody (0002_key_custody.sql). This branch's 0004 needs
-- no 0002 of its own, but migration numbers must have no gap. DROP THIS FILE when merging.
SELECT 1;
