-- Issue 17: the event stream off the pump path. Schema only: the triggers, the sequencer and
-- the rendering are in sql/functions/events.sql.
--
-- A positioned event keeps what its outbox row carried (what it is about and the few values
-- that are not recoverable later: a hold's state at that change, an account's or card's
-- snapshot, a station) instead of a jsonb payload built by the sequencer from 4-5 joins; the
-- payload is rendered from the immutable rows when the event is streamed (fc.render_event).
-- Events positioned before this migration keep the payload they were given (payload is NULL
-- exactly for the new ones), so no event changes and none is lost.
ALTER TABLE fc.events ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE fc.events ADD COLUMN ref_id bigint;   -- id of the row in its table (as fc.outbox)
ALTER TABLE fc.events ADD COLUMN state smallint;  -- holds: the state changed to
ALTER TABLE fc.events ADD COLUMN snap jsonb;      -- accounts, cards, stations; backfill flag

-- Positions are given in sequencing order, so the events past the retention are a prefix of
-- the stream: fc.prune_events walks the primary key and no index on sequenced_at is written
-- for every event any more.
DROP INDEX fc.events_sequenced;

-- A sale writes one outbox row (kind 7, the hold CONFIRMED) instead of one per journal entry
-- and one for the hold: the sequencer finds the sale's entries (purchase, points earned, an
-- overrun's receivable) by their hold. Outbox rows already written keep their kinds 1-6,
-- which the sequencer positions as before: nothing to carry over, nothing streamed twice
-- (the sale entries written before this migration have their own kind 1 rows and rows of
-- kind 7 exist only from now on).
CREATE INDEX journal_by_hold ON fc.journal (hold_id) WHERE hold_id IS NOT NULL;
-- fc.outbox.kind: 1 journal entry, 2 hold state change, 3 account, 4 card, 5 station,
-- 6 refund, 7 sale (the hold CONFIRMED, streamed after its journal entries).

-- Payloads are rendered when streamed (fc.read_events, fc.render_event), not by the sequencer.
DROP FUNCTION IF EXISTS fc.event_payload(fc.outbox);
DROP FUNCTION IF EXISTS fc.journal_event(bigint);
DROP FUNCTION IF EXISTS fc.hold_event(bigint, smallint);
