-- 0006: the event stream for the analytics sidecar (transactional outbox).
--
-- Every committed money movement and card/account change reaches the stream:
--
--   1. Triggers on the tables that record them write one compact row to
--      fc.outbox in the same transaction (a rollback takes it away too). The
--      triggers live on the tables, not in the fc.* functions, so a function
--      rewritten with CREATE OR REPLACE keeps feeding the stream.
--        fc.journal   every entry (money and points; recharges carry their
--                     channel, sales their hold)                     kind 1
--        fc.holds     every change of a hold's state (confirmed, cancelled,
--                     expired, and states added later), the whole hold kind 2
--        fc.accounts  opened, or status/tier/kind/parent/mode/label changed  3
--        fc.cards     issued, or status/account changed              kind 4
--        fc.stations  registered or moved                            kind 5
--      Balance and held_fen updates fire nothing (the WHEN clauses are
--      checked in C, no function call): the journal says the same. A hold
--      being made is no event either (a reservation moves no journal money;
--      the hold is streamed whole when it is settled, cancelled or expires),
--      so the authorize path writes nothing to the outbox at all.
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
--   3. StreamEvents serves fc.events by position > the consumer's cursor.
--
-- Hold rows carry the state they changed to; the immutable fields (amount,
-- station, card, ...) and the settlement of a CONFIRMED hold are read when
-- the row is sequenced. Account, card and station rows carry a snapshot of
-- the fields that may change again. Payloads are built by the sequencer,
-- never on the authorize path.
--
-- Retention: fc.prune_events deletes events sequenced more than the
-- retention ago (the server's --event-retention-s, default 7 days), in
-- bounded batches; fc.event_head remembers the last position given and the
-- last position pruned, so a cursor older than the retention is refused
-- (CURSOR_EXPIRED) instead of silently missing events.

CREATE TABLE fc.outbox (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid    xid8        NOT NULL DEFAULT pg_current_xact_id(),
    kind   smallint    NOT NULL,
    ref_id bigint,               -- id of the row in its table (NULL for stations)
    state  smallint,             -- holds: the state changed to
    at     timestamptz,          -- business time of the change, when the row has one
    snap   jsonb                 -- accounts, cards, stations: the changeable fields
);
-- Written by every money movement and read only by the sequencer.
ALTER TABLE fc.outbox SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000);

CREATE TABLE fc.events (
    position     bigint      PRIMARY KEY,
    xid          xid8        NOT NULL,
    kind         smallint    NOT NULL,
    occurred_at  timestamptz NOT NULL,
    sequenced_at timestamptz NOT NULL,
    payload      jsonb       NOT NULL
);
CREATE INDEX events_sequenced ON fc.events (sequenced_at);

CREATE TABLE fc.event_head (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_position   bigint NOT NULL DEFAULT 0,
    pruned_through  bigint NOT NULL DEFAULT 0
);
INSERT INTO fc.event_head DEFAULT VALUES;

------------------------------------------------------------------------------
-- Triggers: one INSERT of a compact row each.
------------------------------------------------------------------------------

CREATE FUNCTION fc.outbox_journal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at) VALUES (1, NEW.id, NEW.created_at);
    RETURN NULL;
END $$;
CREATE TRIGGER journal_outbox AFTER INSERT ON fc.journal
    FOR EACH ROW EXECUTE FUNCTION fc.outbox_journal();

CREATE FUNCTION fc.outbox_hold_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, state, at) VALUES (2, NEW.id, NEW.state, NEW.closed_at);
    RETURN NULL;
END $$;
-- Any state change, including states added later: the stream passes the
-- number through.
CREATE TRIGGER holds_outbox_update AFTER UPDATE ON fc.holds
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION fc.outbox_hold_changed();

CREATE FUNCTION fc.account_snap(a fc.accounts) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('kind', a.kind, 'status', a.status, 'tier', a.tier,
                              'parent_id', a.parent_id, 'funding_mode', a.funding_mode,
                              'label', a.label)
$$;

CREATE FUNCTION fc.outbox_account_opened() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at, snap)
    SELECT 3, n.id, n.created_at, fc.account_snap(n) FROM new_rows n WHERE n.kind <> 100 ORDER BY n.id;
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_outbox_insert AFTER INSERT ON fc.accounts
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fc.outbox_account_opened();

CREATE FUNCTION fc.outbox_account_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, snap) VALUES (3, NEW.id, fc.account_snap(NEW));
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_outbox_update AFTER UPDATE ON fc.accounts
    FOR EACH ROW WHEN (NEW.kind <> 100 AND (
        OLD.status IS DISTINCT FROM NEW.status OR OLD.tier IS DISTINCT FROM NEW.tier
        OR OLD.kind IS DISTINCT FROM NEW.kind OR OLD.parent_id IS DISTINCT FROM NEW.parent_id
        OR OLD.funding_mode IS DISTINCT FROM NEW.funding_mode
        OR OLD.label IS DISTINCT FROM NEW.label))
    EXECUTE FUNCTION fc.outbox_account_changed();

CREATE FUNCTION fc.outbox_card_issued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, at, snap)
    SELECT 4, n.id, n.created_at, jsonb_build_object('status', n.status, 'account_id', n.account_id)
      FROM new_rows n ORDER BY n.id;
    RETURN NULL;
END $$;
CREATE TRIGGER cards_outbox_insert AFTER INSERT ON fc.cards
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION fc.outbox_card_issued();

CREATE FUNCTION fc.outbox_card_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, ref_id, snap)
    VALUES (4, NEW.id, jsonb_build_object('status', NEW.status, 'account_id', NEW.account_id));
    RETURN NULL;
END $$;
CREATE TRIGGER cards_outbox_update AFTER UPDATE ON fc.cards
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       OR OLD.account_id IS DISTINCT FROM NEW.account_id)
    EXECUTE FUNCTION fc.outbox_card_changed();

CREATE FUNCTION fc.outbox_station() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.outbox (kind, snap)
    VALUES (5, jsonb_build_object('station_id', NEW.station_id, 'name', NEW.name,
                                  'latitude', NEW.latitude, 'longitude', NEW.longitude));
    RETURN NULL;
END $$;
CREATE TRIGGER stations_outbox AFTER INSERT OR UPDATE ON fc.stations
    FOR EACH ROW EXECUTE FUNCTION fc.outbox_station();

------------------------------------------------------------------------------
-- Payloads, built when a row is sequenced. Ids are the public uuids; system
-- accounts are named by their code. No personal data (names, phones, ID
-- numbers, card numbers) ever enters the stream.
------------------------------------------------------------------------------

CREATE FUNCTION fc.event_payload(o fc.outbox) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v jsonb;
BEGIN
    IF o.kind = 1 THEN
        SELECT jsonb_build_object(
                   'entry_id', j.id, 'kind', j.kind, 'asset', j.asset, 'amount', j.amount,
                   'debit_account_id', da.uid, 'debit_system_code', da.system_code,
                   'credit_account_id', ca.uid, 'credit_system_code', ca.system_code,
                   'hold_id', h.uid, 'recharge_id', r.uid, 'channel', r.channel,
                   'description', j.description)
          INTO v
          FROM fc.journal j
          JOIN fc.accounts da ON da.id = j.debit_account_id
          JOIN fc.accounts ca ON ca.id = j.credit_account_id
          LEFT JOIN fc.holds h ON h.id = j.hold_id
          LEFT JOIN fc.recharges r ON r.id = j.recharge_id
         WHERE j.id = o.ref_id;
    ELSIF o.kind = 2 THEN
        SELECT jsonb_build_object(
                   'hold_id', h.uid, 'state', o.state, 'account_id', fa.uid,
                   'spender_account_id', sa.uid, 'card_id', c.uid, 'amount_fen', h.amount_fen,
                   'station_id', h.station_id, 'terminal_id', h.terminal_id, 'nozzle', h.nozzle,
                   'product', h.product, 'create_us', fc.ts(h.created_at),
                   'expire_us', fc.ts(h.expires_at),
                   -- closed_at is written once, when the hold leaves AUTHORIZED
                   'close_us', CASE WHEN o.state <> 1 THEN fc.ts(h.closed_at) END)
               -- the settlement is final once CONFIRMED
               || CASE WHEN o.state = 2 THEN jsonb_build_object(
                   'settled_fen', h.settled_fen, 'volume_ml', h.volume_ml,
                   'unit_price_fen', h.unit_price_fen, 'points_earned', h.points_earned,
                   'confirmed_late', h.confirmed_late) ELSE '{}'::jsonb END
          INTO v
          FROM fc.holds h
          JOIN fc.accounts fa ON fa.id = h.account_id
          JOIN fc.accounts sa ON sa.id = h.spender_account_id
          JOIN fc.cards c ON c.id = h.card_id
         WHERE h.id = o.ref_id;
    ELSIF o.kind = 3 THEN
        SELECT jsonb_build_object(
                   'account_id', a.uid, 'type', o.snap -> 'kind', 'status', o.snap -> 'status',
                   'tier', o.snap -> 'tier', 'funding_mode', o.snap -> 'funding_mode',
                   'label', o.snap -> 'label', 'create_us', fc.ts(a.created_at),
                   'parent_account_id', (SELECT p.uid FROM fc.accounts p
                                          WHERE p.id = (o.snap ->> 'parent_id')::bigint))
          INTO v
          FROM fc.accounts a WHERE a.id = o.ref_id;
    ELSIF o.kind = 4 THEN
        SELECT jsonb_build_object(
                   'card_id', c.uid, 'status', o.snap -> 'status', 'create_us', fc.ts(c.created_at),
                   'account_id', (SELECT a.uid FROM fc.accounts a
                                   WHERE a.id = (o.snap ->> 'account_id')::bigint))
          INTO v
          FROM fc.cards c WHERE c.id = o.ref_id;
    ELSE
        v := o.snap;
    END IF;
    RETURN coalesce(v, '{}'::jsonb);
END $$;

------------------------------------------------------------------------------
-- The sequencer. The caller holds the sequencer's advisory lock (see
-- fuelcard_server/locks.py), so positions are given by one transaction at a
-- time and readers see a batch all at once, when it commits.
------------------------------------------------------------------------------
CREATE FUNCTION fc.sequence_events(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_last  bigint;
    v_count integer;
BEGIN
    SELECT last_position INTO v_last FROM fc.event_head FOR UPDATE;
    WITH batch AS (
        SELECT o.* FROM fc.outbox o ORDER BY o.id LIMIT p_limit
    ), by_tx AS (
        SELECT b.*, max(b.id) OVER (PARTITION BY b.xid) AS tx_last FROM batch b
    ), ordered AS (
        SELECT t.id, row_number() OVER (ORDER BY t.tx_last, t.id) AS n FROM by_tx t
    ), moved AS (
        DELETE FROM fc.outbox o USING ordered WHERE o.id = ordered.id
        RETURNING o.*, ordered.n
    )
    INSERT INTO fc.events (position, xid, kind, occurred_at, sequenced_at, payload)
    SELECT v_last + m.n, m.xid, m.kind, coalesce(m.at, p_now), p_now,
           fc.event_payload(ROW(m.id, m.xid, m.kind, m.ref_id, m.state, m.at, m.snap)::fc.outbox)
      FROM moved m;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        UPDATE fc.event_head SET last_position = v_last + v_count;
    END IF;
    RETURN v_count;
END $$;

-- Deletes up to p_limit events sequenced before p_before; returns how many.
CREATE FUNCTION fc.prune_events(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_through bigint;
    v_count   integer;
BEGIN
    SELECT max(position), count(*) INTO v_through, v_count FROM (
        SELECT position FROM fc.events WHERE sequenced_at < p_before
         ORDER BY position LIMIT p_limit) old;
    IF v_count = 0 THEN
        RETURN 0;
    END IF;
    DELETE FROM fc.events WHERE position <= v_through;
    UPDATE fc.event_head SET pruned_through = greatest(pruned_through, v_through);
    RETURN v_count;
END $$;
