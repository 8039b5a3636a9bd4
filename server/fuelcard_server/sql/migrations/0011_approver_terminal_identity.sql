-- Issue 15 items 6 and 7: the right approver of a limit raise, and terminal identity =
-- (station, terminal).

-- fc.set_limits takes the step-up gate inside, under the account lock (functions/limits.sql):
-- the old signature goes, the functions file makes the new one.
DROP FUNCTION IF EXISTS fc.set_limits(text, text, bytea, uuid, uuid, uuid, bigint, bigint, bigint, timestamptz);
