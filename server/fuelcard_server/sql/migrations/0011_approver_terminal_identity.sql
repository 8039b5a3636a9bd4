-- Issue 15 items 6 and 7: the right approver of a limit raise, and terminal identity =
-- (station, terminal).

-- fc.set_limits takes the step-up gate inside, under the account lock (functions/limits.sql):
-- the old signature goes, the functions file makes the new one.
DROP FUNCTION IF EXISTS fc.set_limits(text, text, bytea, uuid, uuid, uuid, bigint, bigint, bigint, timestamptz);

-- Terminal identity = (station, terminal): counters and working keys are keyed by both (the
-- certificate's O and CN), so two stations that both name a terminal "T1" neither share a
-- counter or keys nor own each other's holds. The functions that took the terminal alone go
-- (functions/ makes them anew with the station).
DROP FUNCTION IF EXISTS fc.advance_counter(text, bigint);
DROP FUNCTION IF EXISTS fc.admit(text, text, bytea, text, bigint);
DROP FUNCTION IF EXISTS fc.cancel(text, text, bytea, uuid, timestamptz, text, bigint);
DROP FUNCTION IF EXISTS fc.confirm(text, text, bytea, uuid, bigint, bigint, bigint, timestamptz, text, bigint);
DROP FUNCTION IF EXISTS fc.reverse_answered(jsonb, text, timestamptz);
DROP FUNCTION IF EXISTS fc.reverse_authorization(text, text, bytea, text, timestamptz, text, bigint);

-- Backfill. A terminal's station is known from its holds (fc.holds stores station_id and
-- terminal_id). A counter is copied to every station whose holds name that terminal id: a
-- counter too high is safe (SignOn hands it back as last_counter and the terminal continues
-- above it), one too low would let an old request be replayed. A counter no hold explains
-- keeps the station '' that no certificate names: that terminal starts from 0 at its station,
-- which is safe because its working keys go with it (below) - an old MAC names a key that is
-- no longer found.
ALTER TABLE fc.terminals ADD COLUMN station_id text NOT NULL DEFAULT '';
ALTER TABLE fc.terminals DROP CONSTRAINT terminals_pkey;
INSERT INTO fc.terminals (station_id, terminal_id, last_counter)
SELECT DISTINCT h.station_id, t.terminal_id, t.last_counter
  FROM fc.terminals t JOIN fc.holds h ON h.terminal_id = t.terminal_id
 WHERE t.station_id = '';
DELETE FROM fc.terminals t
 WHERE t.station_id = '' AND EXISTS (SELECT 1 FROM fc.holds h WHERE h.terminal_id = t.terminal_id);
ALTER TABLE fc.terminals ALTER COLUMN station_id DROP DEFAULT;
ALTER TABLE fc.terminals ADD CONSTRAINT terminals_pkey PRIMARY KEY (station_id, terminal_id);

-- A working key moves to its terminal's station when the holds name exactly one; the keys of
-- a terminal id that several stations share (the very case this fixes), or that no hold
-- names (admin consoles, a terminal that signed on but never sold), are deleted: their next
-- request is UNAUTHENTICATED KEY_NOT_ACCEPTED and they sign on again, as the protocol says.
-- Keys are daily, so nothing lasting is lost.
ALTER TABLE fc.terminal_keys ADD COLUMN station_id text NOT NULL DEFAULT '';
ALTER TABLE fc.terminal_keys DROP CONSTRAINT terminal_keys_pkey;
UPDATE fc.terminal_keys k SET station_id = s.station_id
  FROM (SELECT terminal_id, min(station_id) AS station_id FROM fc.holds
         GROUP BY terminal_id HAVING count(DISTINCT station_id) = 1) s
 WHERE s.terminal_id = k.terminal_id;
DELETE FROM fc.terminal_keys WHERE station_id = '';
ALTER TABLE fc.terminal_keys ALTER COLUMN station_id DROP DEFAULT;
ALTER TABLE fc.terminal_keys ADD CONSTRAINT terminal_keys_pkey PRIMARY KEY (station_id, terminal_id, version);

-- A holder's phone changes with a step-up to the old one (STEP_UP_KIND_PHONE_CHANGE = 8).
ALTER TABLE fc.step_up_challenges DROP CONSTRAINT step_up_challenges_kind_check;
ALTER TABLE fc.step_up_challenges ADD CONSTRAINT step_up_challenges_kind_check
    CHECK (((kind >= 1) AND (kind <= 8)));
