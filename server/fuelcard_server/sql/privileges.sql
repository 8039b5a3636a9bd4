-- Who may do what in schema fc (issue 15, least privilege). Re-applied by `fuelcard migrate`
-- after every run that applies anything: CREATE OR REPLACE FUNCTION resets a function's
-- SECURITY DEFINER and SET clauses (and a new table or function is owned by whoever made it),
-- so these cannot live in a numbered migration, which runs once. Idempotent.
--
-- fuelcard_owner (NOLOGIN) owns everything in fc. fuelcard_app (the serving role) has:
--   * USAGE on the schema and SELECT on its tables (the servers read holds, accounts, cards,
--     the journal ... directly: history pages, reports, GetHold);
--   * EXECUTE on the entry points below: the functions the server calls to change anything.
--     They run as SECURITY DEFINER owned by fuelcard_owner, with a fixed search_path, so the
--     serving role changes balances, holds and the journal only through the rules they
--     enforce. Internal helpers stay SECURITY INVOKER: called from an entry point they run as
--     the owner; called by the serving role directly they run as it, and fail on any write;
--   * INSERT/UPDATE/DELETE on the few tables the server's Python writes itself (registered
--     channel keys, stations, terminal working keys, reconciliation runs and breaks, the
--     event backfill's progress, the journal chain) - none of them the journal, the audit log
--     or a balance.
-- Not having ownership, it cannot ALTER a table or DISABLE a trigger; without UPDATE, DELETE
-- or TRUNCATE on fc.journal, fc.audit_log and fc.accounts, it cannot rewrite history.
DO $$
DECLARE
    r record;
    -- Every fc function the server's Python calls that writes (or reads the card number
    -- segments). tests/test_least_privilege.py checks that no VOLATILE function the Python
    -- calls is missing. Not fc.reindex_card: only `fuelcard keys rotate-card-index` calls it,
    -- as the owner; the serving role must not re-index cards.
    entry_points text[] := ARRAY[
        'advance_invoice', 'approve_adjustment', 'audit_append', 'authorize', 'backfill_events',
        'batch_top_up',
        'cancel', 'card_number_parts', 'change_holder_phone', 'change_pin', 'confirm', 'consume_step_up',
        'create_step_up', 'erase_holder', 'evaluate_tiers', 'expire_holds', 'expire_points',
        'grant_raise', 'holders_to_seal', 'issue_card', 'open_account', 'propose_adjustment',
        'prune_events', 'prune_idempotency_keys', 'prune_step_ups', 'recharge', 'redeem_points',
        'refund_recharge', 'refund_sale', 'reject_adjustment', 'remember_refusal',
        'request_invoice', 'reset_pin', 'resolve_break', 'reverse_authorization',
        'resolve_channel_exception', 'resolve_settlement_exception', 'review_hold', 'roll_up_costs',
        'risk_activate', 'risk_load', 'roll_up_statements', 'seal_holder', 'sequence_events',
        'set_limits', 'set_price',
        'set_scope', 'set_volume_limits', 'step_up_not_sent', 'step_up_sent', 'store_card_number',
        'take_hold_sweep_failures', 'transfer_points', 'update_card_status'];
    missing text[];
    owner oid := 'fuelcard_owner'::regrole;
BEGIN
    IF (SELECT nspowner FROM pg_namespace WHERE nspname = 'fc') <> owner THEN
        ALTER SCHEMA fc OWNER TO fuelcard_owner;
    END IF;
    -- Tables, views and free-standing sequences (an identity's follows its table).
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relkind FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'fc' AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND c.relowner <> owner
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO fuelcard_owner',
                       CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                      WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END, r.rel);
    END LOOP;
    -- Composite types, enums and domains (a table's row type and an array type follow theirs).
    FOR r IN
        SELECT t.oid::regtype AS typ FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
          LEFT JOIN pg_class c ON c.oid = t.typrelid
         WHERE n.nspname = 'fc' AND t.typowner <> owner AND t.typelem = 0
           AND (t.typrelid = 0 OR c.relkind = 'c')
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO fuelcard_owner', r.typ);
    END LOOP;
    FOR r IN
        SELECT p.oid::regprocedure AS fn, p.prokind FROM pg_proc p
          JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'fc' AND p.proowner <> owner
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO fuelcard_owner',
                       CASE r.prokind WHEN 'a' THEN 'AGGREGATE' ELSE 'ROUTINE' END, r.fn);
    END LOOP;

    SELECT array_agg(e ORDER BY e) INTO missing FROM unnest(entry_points) e
     WHERE NOT EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = 'fc'::regnamespace
                          AND p.proname = e);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'privileges.sql names entry points that do not exist: %', missing;
    END IF;
    FOR r IN
        SELECT p.oid::regprocedure AS fn, p.prosecdef, p.proconfig FROM pg_proc p
         WHERE p.pronamespace = 'fc'::regnamespace AND p.proname = ANY (entry_points)
    LOOP
        IF NOT r.prosecdef OR r.proconfig IS DISTINCT FROM
                ARRAY['search_path=pg_catalog, fc, pg_temp'] THEN
            EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, fc, '
                           'pg_temp', r.fn);
        END IF;
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', r.fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO fuelcard_app', r.fn);
    END LOOP;
END $$;

-- The owner stores and reads the card number segments (fc.store_card_number,
-- fc.card_number_parts) through the segment schemas' functions.
GRANT EXECUTE ON FUNCTION fc_pan_seg1.put(bigint, text, bytea), fc_pan_seg1.get(bigint),
                          fc_pan_seg2.put(bigint, text, bytea), fc_pan_seg2.get(bigint),
                          fc_pan_seg3.put(bigint, text, bytea), fc_pan_seg3.get(bigint),
                          fc_pan_vault.put(bigint, text, bytea), fc_pan_vault.get(bigint)
   TO fuelcard_owner;

GRANT USAGE ON SCHEMA fc TO fuelcard_app;
GRANT SELECT ON ALL TABLES IN SCHEMA fc TO fuelcard_app;
-- ... but not the operator console's users and sessions (password hashes, TOTP secrets,
-- session hashes): only the HTTP edge reads them, and the pump path never needs them.
DO $$
BEGIN
    IF to_regclass('fc.console_users') IS NOT NULL THEN
        REVOKE ALL ON fc.console_users, fc.console_sessions FROM fuelcard_app;
    END IF;
END $$;
-- The tables the server's Python writes itself (fc.outbox: the stations trigger, fired by the
-- server's own INSERT into fc.stations). A table named here that this schema does not have
-- (yet) is skipped: the key set's check values are another migration's.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT t.tab, t.privileges FROM (VALUES
            ('fc.channel_keys', 'INSERT, UPDATE'),        -- RegisterChannelKey (upsert)
            ('fc.stations', 'INSERT, UPDATE'),            -- RegisterStation (upsert)
            ('fc.outbox', 'INSERT'),
            ('fc.terminal_keys', 'INSERT'),               -- a terminal's next working key
            ('fc.reconciliation_runs', 'INSERT'),         -- reconcile.py
            ('fc.reconciliation_breaks', 'INSERT, UPDATE, DELETE'),
            ('fc.event_backfill', 'UPDATE'),              -- event_backfill.py
            ('fc.journal_chain', 'INSERT'),               -- the chain job (journal_chain.py)
            ('fc.journal_chain_state', 'UPDATE'),
            ('fc.key_check_values', 'INSERT'),            -- recorded by the first server to start
            ('fc.wrapped_keys', 'INSERT')) t (tab, privileges)
         WHERE to_regclass(t.tab) IS NOT NULL
    LOOP
        EXECUTE format('GRANT %s ON %s TO fuelcard_app', r.privileges, r.tab);
    END LOOP;
END $$;
