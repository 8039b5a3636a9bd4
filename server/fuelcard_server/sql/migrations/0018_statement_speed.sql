-- A month's statement (fc.statement_lines) reads the journal's entries from the month's start
-- on; without an index on created_at that is a sequential scan of the whole journal (2.3 M
-- entries at 10 000 vehicles and a year of sales: a third of a second per statement).
--
-- BRIN and not btree: the journal is append-only and written in created_at order, so each
-- range of 128 pages holds a narrow band of times and the index is a few kB (24 kB at 2.3 M
-- entries). Inserting costs nearly nothing: only when a row opens a new page range does the
-- index gain an entry, and no pump confirm waits on a btree page split.
CREATE INDEX journal_by_time ON fc.journal USING brin (created_at);
