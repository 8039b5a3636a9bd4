-- The event stream for the analytics sidecar (transactional outbox).
--
-- Every committed money movement and card/account change reaches the stream:
--
--   1. Triggers on the tables that record them write one compact row to
--      fc.outbox in the same transaction (a rollback takes it away too). The
--      triggers live on the tables, not in the fc.* functions, so a function
--      rewritten with CREATE OR REPLACE keeps feeding the stream.
--        fc.journal   every entry (money and points; recharges carry their
--                     channel), except a sale's own entries          kind 1
--        fc.holds     every change of a hold's state (cancelled, expired,
--                     and states added later), the whole hold        kind 2
--                     confirmed: one row for the whole sale, its
--                     entries then the hold                          kind 7
--        fc.accounts  opened, or status/tier/kind/parent/mode/label changed  3
--        fc.cards     issued, or status/account changed              kind 4
--        fc.stations  registered or moved                            kind 5
--      Balance and held_fen updates fire nothing (the WHEN clauses are
--      checked in C, no function call): the journal says the same. A hold
--      being made is no event either (a reservation moves no journal money;
--      the hold is streamed whole when it is settled, cancelled or expires),
--      so the authorize path writes nothing to the outbox at all, and a
--      confirm writes one row (kind 7): the sale's entries (purchase, points
--      earned, an overrun's receivable; fc.journal.hold_id names the hold,
--      and no other transaction writes entries of those kinds for a hold
--      without a recharge) are found by their hold when the row is
--      sequenced, and positioned in id order before the hold, as their own
--      rows were before.
--      Journal rows are written by row triggers (one cached-plan INSERT
--      each: measured cheaper than a statement trigger with a transition
--      table for the one-row inserts of the hot path); accounts and cards,
--      which loaders COPY in bulk, by statement triggers.
--   2. One sequencer at a time (fc.sequence_events, under an advisory lock
--      taken by the caller) moves the rows its snapshot sees from fc.outbox
--      to fc.events and gives them gap-free positions 1, 2, 3, ... A row is
--      positioned only once its transaction has committed, so a transaction
--      that commits late gets a later position: a reader following positions
--      never skips it (a reader following outbox ids would). Within a batch,
--      transactions are ordered by their last outbox row and keep their rows
--      together. When one transaction waited for another (the account
--      advisory locks), all the waiter's rows were written after the other
--      committed, so the order agrees with commit order where it matters.
--      The sequencer writes one compact fc.events row per event: what its
--      outbox row carried, no payload.
--   3. StreamEvents serves fc.events by position > the consumer's cursor,
--      each event rendered as it is read (fc.read_events).
--
-- Hold rows carry the state they changed to; the immutable fields (amount,
-- station, card, ...) and the settlement of a CONFIRMED hold are read when
-- the event is streamed (they do not change after that transition; the
-- expiry, changed by a risk approval, is that transition's own). Journal
-- entries, refunds and the ids of accounts and cards never change. Account,
-- card and station rows carry a snapshot of the fields that may change
-- again. Payloads are built when streamed, never on the pump path or by the
-- sequencer (events positioned before migration 0012 keep the payload they
-- were given then).
--
-- Retention: fc.prune_events deletes events sequenced more than the
-- retention ago (the server's --event-retention-s, default 7 days), in
-- bounded batches, from the start of the stream; fc.event_head remembers the last position given and the
-- last position pruned, so a cursor older than the retention is refused
-- (CURSOR_EXPIRED) instead of silently missing events.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Triggers: one INSERT of a compact row each.
CREATE OR REPLACE FUNCTION fc.outbox_journal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at) VALUES (1, NEW.id, NEW.created_at);
    RETURN NULL;
END $$;

-- A sale's entries (kinds 2 purchase, 3 points earned, 12 overrun receivable, naming their
-- hold, without a recharge: written only by fc.book_sale and fc.book_receivable, in the
-- transaction that confirms the hold) fire nothing: the hold's kind 7 row brings them (see
-- fc.sequence_events, which selects the same entries). A recharge's repayment of a
-- receivable (kind 12 with its recharge) and a sale refund (kind 10) are rows of their own.
-- The kinds by their numbers: a trigger's WHEN is resolved when the trigger is made.
CREATE OR REPLACE TRIGGER journal_outbox AFTER INSERT ON fc.journal
    FOR EACH ROW WHEN (NEW.hold_id IS NULL OR NEW.recharge_id IS NOT NULL
                       OR NEW.kind NOT IN (2, 3, 12))
    EXECUTE FUNCTION fc.outbox_journal();

-- CONFIRMED is the sale (kind 7: its entries, then the hold); any other change is the hold's.
CREATE OR REPLACE FUNCTION fc.outbox_hold_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, state, at)
    VALUES (CASE WHEN NEW.state = fc.hold_state_confirmed() THEN 7 ELSE 2 END, NEW.id, NEW.state,
            NEW.closed_at);
    RETURN NULL;
END $$;

-- Any state change, including states added later: the stream passes the
-- number through.
CREATE OR REPLACE TRIGGER holds_outbox_update AFTER UPDATE ON fc.holds
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION fc.outbox_hold_changed();

CREATE OR REPLACE FUNCTION fc.account_snap(a fc.accounts) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('kind', a.kind, 'status', a.status, 'tier', a.tier,
                              'parent_id', a.parent_id, 'funding_mode', a.funding_mode,
                              'label', a.label)
$$;

CREATE OR REPLACE FUNCTION fc.outbox_account_opened() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at, snap)
    SELECT 3, n.id, n.created_at, fc.account_snap(n) FROM new_rows n
     WHERE n.kind <> fc.account_kind_system() ORDER BY n.id;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER accounts_outbox_insert AFTER INSERT ON fc.accounts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fc.outbox_account_opened();

CREATE OR REPLACE FUNCTION fc.outbox_account_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, snap) VALUES (3, NEW.id, fc.account_snap(NEW));
    RETURN NULL;
END $$;

-- 100: fc.account_kind_system(), by its number: a trigger's WHEN is resolved when the trigger
-- is made, and a fresh database gets this file before states.sql.
CREATE OR REPLACE TRIGGER accounts_outbox_update AFTER UPDATE ON fc.accounts
    FOR EACH ROW WHEN (NEW.kind <> 100 AND (
        OLD.status IS DISTINCT FROM NEW.status OR OLD.tier IS DISTINCT FROM NEW.tier
        OR OLD.kind IS DISTINCT FROM NEW.kind OR OLD.parent_id IS DISTINCT FROM NEW.parent_id
        OR OLD.funding_mode IS DISTINCT FROM NEW.funding_mode
        OR OLD.label IS DISTINCT FROM NEW.label))
    EXECUTE FUNCTION fc.outbox_account_changed();

CREATE OR REPLACE FUNCTION fc.outbox_card_issued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at, snap)
    SELECT 4, n.id, n.created_at, jsonb_build_object('status', n.status, 'account_id', n.account_id)
      FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER cards_outbox_insert AFTER INSERT ON fc.cards
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fc.outbox_card_issued();

CREATE OR REPLACE FUNCTION fc.outbox_card_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, snap)
    VALUES (4, NEW.id, jsonb_build_object('status', NEW.status, 'account_id', NEW.account_id));
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER cards_outbox_update AFTER UPDATE ON fc.cards
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.account_id IS DISTINCT FROM NEW.account_id)
    EXECUTE FUNCTION fc.outbox_card_changed();

CREATE OR REPLACE FUNCTION fc.outbox_station() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, snap)
    VALUES (5, jsonb_build_object('station_id', NEW.station_id, 'name', NEW.name,
                                  'latitude', NEW.latitude, 'longitude', NEW.longitude));
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER stations_outbox AFTER INSERT OR UPDATE ON fc.stations
    FOR EACH ROW EXECUTE FUNCTION fc.outbox_station();

-- The sequencer. The caller holds the sequencer's advisory lock (see
-- fuelcard_server/locks.py), so positions are given by one transaction at a
-- time and readers see a batch all at once, when it commits. One statement
-- moves the batch: a sale's row (kind 7) becomes its journal entries (kind 1,
-- in id order, at their booking time) then the hold (kind 2); every other
-- row one event of its kind. Only a backfilled account, card or station is
-- looked up here (its snapshot as it is now, see fc.current_snap); nothing
-- else is rendered (fc.read_events, when streamed).
CREATE OR REPLACE FUNCTION fc.sequence_events(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_last  bigint;
    v_count integer;
BEGIN
    SELECT last_position INTO v_last FROM fc.event_head FOR UPDATE;
    WITH moved AS (
        DELETE FROM fc.outbox o
         WHERE o.id IN (SELECT b.id FROM fc.outbox b ORDER BY b.id LIMIT p_limit)
        RETURNING o.*
    ), by_tx AS (
        SELECT m.*, max(m.id) OVER (PARTITION BY m.xid) AS tx_last FROM moved m
    ), one AS (
        SELECT t.tx_last, t.id, 0 AS sub, t.xid, 1::smallint AS kind, j.id AS ref_id,
               NULL::smallint AS state, j.created_at AS at, t.snap
          FROM by_tx t JOIN fc.journal j ON j.hold_id = t.ref_id
         WHERE t.kind = 7 AND j.recharge_id IS NULL AND j.kind IN (2, 3, 12)
        UNION ALL
        SELECT t.tx_last, t.id, 1, t.xid, CASE WHEN t.kind = 7 THEN 2 ELSE t.kind END::smallint,
               t.ref_id, t.state, t.at,
               CASE WHEN t.kind IN (3, 4, 5) AND t.snap ? 'backfill'
                    THEN coalesce(fc.current_snap(ROW(t.id, t.xid, t.kind, t.ref_id, t.state,
                                                      t.at, t.snap)::fc.outbox), '{}'::jsonb)
                         || '{"backfill": true}'::jsonb
                    ELSE t.snap END
          FROM by_tx t
    )
    INSERT INTO fc.events (position, xid, kind, occurred_at, sequenced_at, ref_id, state, snap)
    SELECT v_last + row_number() OVER (ORDER BY e.tx_last, e.id, e.sub, e.ref_id), e.xid, e.kind,
           coalesce(e.at, p_now), p_now, e.ref_id, e.state, e.snap
      FROM one e ORDER BY 1;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        UPDATE fc.event_head SET last_position = v_last + v_count;
    END IF;
    RETURN v_count;
END $$;

-- Deletes up to p_limit events sequenced before p_before; returns how many. The old events
-- are the start of the stream (positions are given in sequencing order), so at most p_limit
-- rows of the primary key are read, and the first younger event ends the batch (a clock set
-- back leaves what follows it for a later round: the stream never gets a hole).
CREATE OR REPLACE FUNCTION fc.prune_events(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_through bigint;
    v_count   integer;
BEGIN
    SELECT max(position), count(*) INTO v_through, v_count FROM (
        SELECT position, sequenced_at < p_before AND bool_and(sequenced_at < p_before)
                   OVER (ORDER BY position) AS old
          FROM (SELECT position, sequenced_at FROM fc.events ORDER BY position LIMIT p_limit) f
    ) p WHERE p.old;
    IF v_count = 0 THEN
        RETURN 0;
    END IF;
    DELETE FROM fc.events WHERE position <= v_through;
    UPDATE fc.event_head SET pruned_through = greatest(pruned_through, v_through);
    RETURN v_count;
END $$;

-- Refunds and the backfill of history.
--
-- 1. Refunds (outbox kind 6). A refund's money leg is already streamed as a
--    journal entry of kind 8 (RECHARGE_REFUND) when the account still had
--    the money; a refund it could not cover (in part or at all) leaves less
--    or nothing in the journal, the rest being a channel exception. The
--    refund event carries the whole refund: what the channel paid back,
--    what was debited from the account, the shortfall. One per fc.refunds
--    row, written by a row trigger (refunds are rare; never on the pump path).
--
-- 2. The backfill. Rows booked before the stream's triggers existed have no
--    events. fc.backfill_events writes outbox rows for them, in bounded
--    batches, each batch its own short transaction; the sequencer gives them
--    positions like any other (after the live events already positioned).
--    Each source's rows to write end at its mark (fc.event_backfill.through_id,
--    recorded when the stream was added). What is written:
--      journal entries up to the journal mark                 kind 1
--      for each sale among them (kind 2 entry), its hold,
--        CONFIRMED, right after the entry (as a confirm does)  kind 2
--      accounts and cards up to their marks, as they are
--        when sequenced (dimensions: the newest version wins
--        in the warehouse)                                     kinds 3, 4
--      stations, as they are when sequenced, in the first
--        batch                                                kind 5
--      refunds up to their mark                               kind 6
--    Holds cancelled or expired before the stream are not replayed: they
--    moved no money and make no fact.
--    Order: within each source by id; across sources by booking time (each
--    source keyed by the running maximum of its booking times in id order,
--    so a batch always takes a prefix of every source and progress is one id
--    per source). Progress is kept in fc.event_backfill under a row lock:
--    a batch is all or nothing, a second run writes nothing, two runs at once
--    wait for each other batch by batch.
--    Backfilled rows carry {"backfill": true} in their snapshot; the payload
--    says so, and a consumer books them "if not already there".
--
-- The journal mark: the entries that have an event are exactly those
-- inserted after the journal's outbox trigger was made (CREATE TRIGGER
-- waited for every writer of fc.journal), i.e. above some id. If a journal
-- event was still in the outbox or the stream when the mark was recorded,
-- the mark is just below the lowest; if none, nothing had been streamed yet
-- and the mark is the journal's last id then, read while no writer was in
-- flight. If every journal event had already been pruned, the boundary is
-- unknown and the mark is the last id: entries already streamed are written
-- again, and consumers skip the ones they hold (the backfill flag).

------------------------------------------------------------------------------
-- Refund events.
CREATE OR REPLACE FUNCTION fc.outbox_refund() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at) VALUES (6, NEW.id, NEW.created_at);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER refunds_outbox AFTER INSERT ON fc.refunds
    FOR EACH ROW EXECUTE FUNCTION fc.outbox_refund();

-- The payload of an event of the rarer kinds, rendered when it is streamed (fc.read_events),
-- from what its fc.events row carries: 3 account, 4 card, 5 station (its snapshot as
-- written), 6 refund; a kind this version does not know, its snapshot. A backfilled account, card or station is described as it was when
-- sequenced (the sequencer stored its snapshot then: a change committed in between may be
-- positioned before it, and must not be undone). Backfilled payloads carry "backfill": true.
CREATE OR REPLACE FUNCTION fc.render_event(p_kind smallint, p_ref_id bigint, p_snap jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v jsonb;
BEGIN
    v := CASE p_kind
             WHEN 3 THEN fc.account_event(p_ref_id, p_snap)
             WHEN 4 THEN fc.card_event(p_ref_id, p_snap)
             WHEN 6 THEN fc.refund_event(p_ref_id)
             ELSE p_snap END;
    IF coalesce(p_snap ? 'backfill', false) THEN
        v := coalesce(v, '{}'::jsonb) || '{"backfill": true}'::jsonb;
    END IF;
    RETURN coalesce(v, '{}'::jsonb);
END $$;

-- A backfilled account's, card's or station's snapshot, as the row is now (the backfill
-- writes only a reference; see fc.sequence_events).
CREATE OR REPLACE FUNCTION fc.current_snap(o fc.outbox) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF o.kind = 3 THEN
        RETURN (SELECT fc.account_snap(a) FROM fc.accounts a WHERE a.id = o.ref_id);
    ELSIF o.kind = 4 THEN
        RETURN (SELECT jsonb_build_object('status', c.status, 'account_id', c.account_id)
                  FROM fc.cards c WHERE c.id = o.ref_id);
    END IF;
    RETURN (SELECT jsonb_build_object('station_id', s.station_id, 'name', s.name,
                                      'latitude', s.latitude, 'longitude', s.longitude)
              FROM fc.stations s WHERE s.station_id = o.snap ->> 'station_id');
END $$;

-- StreamEvents' read: up to p_limit events after position p_after. Journal entries and
-- holds (nearly every event) come as columns, which the server turns into Events (no jsonb
-- built here, none parsed there), looked up by primary key (LATERAL: whatever the tables'
-- sizes) keyed on NULL for the other kinds (a condition on the kind alone would be checked
-- after the lookup); the other kinds, and events positioned before migration 0012 (which
-- carry their payload), as a jsonb payload (fc.render_event). A hold's event is for its move
-- to the state the change wrote (e.state), not the hold's state now, which may have moved on.
-- PL/pgSQL keeps the plan (an SQL function is planned again at every call: milliseconds).
CREATE OR REPLACE FUNCTION fc.read_events(p_after bigint, p_limit integer)
RETURNS TABLE (event_position bigint, event_xid bigint, event_kind smallint, occur_us bigint,
               payload jsonb, backfilled boolean,
               entry_id bigint, entry_kind smallint, asset smallint, amount bigint,
               debit_uid text, debit_code text, credit_uid text, credit_code text,
               entry_hold_uid text, recharge_uid text, channel smallint, description text,
               hold_uid text, hold_state smallint, account_uid text, spender_uid text,
               card_uid text, amount_fen bigint, station_id text, terminal_id text,
               nozzle integer, product smallint, create_us bigint, expire_us bigint,
               close_us bigint, settled_fen bigint, volume_ml bigint, unit_price_fen bigint,
               points_earned bigint, confirmed_late boolean)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT e.position, e.xid::text::bigint, e.kind, fc.ts(e.occurred_at),
           CASE WHEN e.payload IS NOT NULL OR e.kind NOT IN (1, 2) THEN
               coalesce(e.payload, fc.render_event(e.kind, e.ref_id, e.snap)) END,
           coalesce(e.snap ? 'backfill', false),
           j.id, j.kind, j.asset, j.amount, j.debit_uid, j.debit_code, j.credit_uid,
           j.credit_code, j.hold_uid, j.recharge_uid, j.channel, j.description,
           h.uid::text, e.state, h.account_uid, h.spender_uid, h.card_uid, h.amount_fen,
           h.station_id, h.terminal_id, h.nozzle, h.product, fc.ts(h.created_at),
           fc.ts(h.expires_at),
           -- closed_at is written once, when the hold leaves AUTHORIZED
           CASE WHEN e.state <> fc.hold_state_authorized() THEN fc.ts(h.closed_at) END,
           h.settled_fen, h.volume_ml, h.unit_price_fen, h.points_earned, h.confirmed_late
      FROM (SELECT * FROM fc.events WHERE position > p_after ORDER BY position LIMIT p_limit) e
      LEFT JOIN LATERAL (
          SELECT j.id, j.kind, j.asset, j.amount, da.uid::text AS debit_uid,
                 da.system_code AS debit_code, ca.uid::text AS credit_uid,
                 ca.system_code AS credit_code, jh.uid::text AS hold_uid,
                 r.uid::text AS recharge_uid, r.channel, j.description
            FROM fc.journal j
            JOIN fc.accounts da ON da.id = j.debit_account_id
            JOIN fc.accounts ca ON ca.id = j.credit_account_id
            LEFT JOIN fc.holds jh ON jh.id = j.hold_id
            LEFT JOIN fc.recharges r ON r.id = j.recharge_id
           WHERE j.id = CASE WHEN e.kind = 1 AND e.payload IS NULL THEN e.ref_id END) j ON true
      LEFT JOIN LATERAL (
          SELECT h.*, fa.uid::text AS account_uid, sa.uid::text AS spender_uid,
                 c.uid::text AS card_uid
            FROM fc.holds h
            JOIN fc.accounts fa ON fa.id = h.account_id
            JOIN fc.accounts sa ON sa.id = h.spender_account_id
            JOIN fc.cards c ON c.id = h.card_id
           WHERE h.id = CASE WHEN e.kind = 2 AND e.payload IS NULL THEN e.ref_id END) h ON true
     ORDER BY e.position;
END $$;

-- An account's event: the snapshot the change wrote (p_snap, see fc.account_snap), with the
-- ids the stream uses.
CREATE OR REPLACE FUNCTION fc.account_event(p_account_id bigint, p_snap jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
                'account_id', a.uid, 'type', p_snap -> 'kind', 'status', p_snap -> 'status',
                'tier', p_snap -> 'tier', 'funding_mode', p_snap -> 'funding_mode',
                'label', p_snap -> 'label', 'create_us', fc.ts(a.created_at),
                'parent_account_id', (SELECT p.uid FROM fc.accounts p
                                       WHERE p.id = (p_snap ->> 'parent_id')::bigint))
              FROM fc.accounts a WHERE a.id = p_account_id);
END $$;

-- A card's event: the snapshot the change wrote (status, account), with the stream's ids.
CREATE OR REPLACE FUNCTION fc.card_event(p_card_id bigint, p_snap jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
                'card_id', c.uid, 'status', p_snap -> 'status', 'create_us', fc.ts(c.created_at),
                'account_id', (SELECT a.uid FROM fc.accounts a
                                WHERE a.id = (p_snap ->> 'account_id')::bigint))
              FROM fc.cards c WHERE c.id = p_card_id);
END $$;

-- A refund's event: the whole refund, what the channel paid back, what was debited from the
-- account, and the shortfall.
CREATE OR REPLACE FUNCTION fc.refund_event(p_refund_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
                'refund_id', f.uid, 'recharge_id', r.uid, 'account_id', a.uid,
                'channel', f.channel, 'amount_fen', f.amount_fen,
                'debited_fen', f.debited_fen, 'shortfall_fen', f.amount_fen - f.debited_fen,
                'create_us', fc.ts(f.created_at))
              FROM fc.refunds f
              JOIN fc.recharges r ON r.id = f.recharge_id
              JOIN fc.accounts a ON a.id = f.account_id
             WHERE f.id = p_refund_id);
END $$;

-- One batch: outbox rows for up to p_limit source rows (plus the hold of
-- each sale among them, and the stations in the first batch); returns the
-- number of outbox rows written, 0 once everything is written.
CREATE OR REPLACE FUNCTION fc.backfill_events(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_j       fc.event_backfill;
    v_a       fc.event_backfill;
    v_c       fc.event_backfill;
    v_s       fc.event_backfill;
    v_f       fc.event_backfill;
    v_count   integer := 0;
    v_written integer;
BEGIN
    -- Progress is read and moved under these row locks: one batch at a time.
    PERFORM 1 FROM fc.event_backfill ORDER BY source FOR UPDATE;
    SELECT * INTO v_j FROM fc.event_backfill WHERE source = 1;
    SELECT * INTO v_a FROM fc.event_backfill WHERE source = 3;
    SELECT * INTO v_c FROM fc.event_backfill WHERE source = 4;
    SELECT * INTO v_s FROM fc.event_backfill WHERE source = 5;
    SELECT * INTO v_f FROM fc.event_backfill WHERE source = 6;

    IF v_s.done_id < v_s.through_id THEN
        INSERT INTO fc.outbox (kind, snap)
        SELECT 5, jsonb_build_object('station_id', s.station_id, 'backfill', true)
          FROM fc.stations s ORDER BY s.station_id;
        GET DIAGNOSTICS v_count = ROW_COUNT;
        UPDATE fc.event_backfill SET done_id = through_id WHERE source = 5;
    END IF;

    WITH cand AS (
        (SELECT 1::smallint AS src, j.id, j.created_at AS t, j.kind AS entry_kind, j.hold_id
           FROM fc.journal j WHERE j.id > v_j.done_id AND j.id <= v_j.through_id
          ORDER BY j.id LIMIT p_limit)
        UNION ALL
        (SELECT 3::smallint, a.id, a.created_at, NULL::smallint, NULL::bigint
           FROM fc.accounts a WHERE a.id > v_a.done_id AND a.id <= v_a.through_id
            AND a.kind <> fc.account_kind_system()
          ORDER BY a.id LIMIT p_limit)
        UNION ALL
        (SELECT 4::smallint, c.id, c.created_at, NULL::smallint, NULL::bigint
           FROM fc.cards c WHERE c.id > v_c.done_id AND c.id <= v_c.through_id
          ORDER BY c.id LIMIT p_limit)
        UNION ALL
        (SELECT 6::smallint, f.id, f.created_at, NULL::smallint, NULL::bigint
           FROM fc.refunds f WHERE f.id > v_f.done_id AND f.id <= v_f.through_id
          ORDER BY f.id LIMIT p_limit)
    ), keyed AS (
        SELECT c.*, max(c.t) OVER (PARTITION BY c.src ORDER BY c.id) AS k FROM cand c
    ), taken AS (
        SELECT * FROM keyed ORDER BY k, src, id LIMIT p_limit
    ), written AS (
        SELECT t.k, t.src, t.id, 0 AS sub, t.src AS kind, t.id AS ref_id, NULL::smallint AS state,
               t.t AS at, '{"backfill": true}'::jsonb AS snap
          FROM taken t
        UNION ALL
        -- a sale's hold, CONFIRMED, right after its entry
        SELECT t.k, t.src, t.id, 1, 2::smallint, h.id, fc.hold_state_confirmed(), h.closed_at,
               '{"backfill": true}'::jsonb
          FROM taken t JOIN fc.holds h ON h.id = t.hold_id
         WHERE t.src = 1 AND t.entry_kind = fc.ledger_entry_kind_purchase()
    ), ins AS (
        INSERT INTO fc.outbox (kind, ref_id, state, at, snap)
        SELECT w.kind, w.ref_id, w.state, w.at, w.snap FROM written w
         ORDER BY w.k, w.src, w.id, w.sub
        RETURNING 1
    ), moved AS (
        UPDATE fc.event_backfill m SET done_id = x.last_id
          FROM (SELECT src, max(id) AS last_id FROM taken GROUP BY src) x
         WHERE m.source = x.src
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins) + 0 * (SELECT count(*) FROM moved) INTO v_written;
    RETURN v_count + v_written;
END $$;
