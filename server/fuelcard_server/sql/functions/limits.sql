-- Spending controls: per-transaction, daily and monthly caps on cards and accounts (a
-- parent's caps bind its children), temporary raises, and the usage counters holds charge.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

CREATE OR REPLACE FUNCTION fc.largest_cap(p_caps bigint[]) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN array_position(p_caps, NULL) IS NULL
                THEN (SELECT max(x) FROM unnest(p_caps) x) END
$$;

-- Which cap, if any, `p_amount` more would break. Holds charge the day they
-- were made; a month is the sum of its days so far.
CREATE OR REPLACE FUNCTION fc.cap_refusal(p_caps fc.caps, p_kind smallint, p_id bigint, p_day date,
                               p_amount bigint)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_caps.txn IS NOT NULL AND p_amount > p_caps.txn THEN
        RETURN 'LIMIT_PER_TRANSACTION';
    END IF;
    IF p_caps.daily IS NOT NULL AND fc.used_on(p_kind, p_id, p_day) + p_amount > p_caps.daily THEN
        RETURN 'LIMIT_DAILY';
    END IF;
    IF p_caps.monthly IS NOT NULL
       AND fc.used_in_month(p_kind, p_id, p_day) + p_amount > p_caps.monthly THEN
        RETURN 'LIMIT_MONTHLY';
    END IF;
    RETURN NULL;
END $$;

-- Adds delta (may be negative) to the usage of a card, its account and that
-- account's parent on one day. Callers hold the chain's locks.
CREATE OR REPLACE FUNCTION fc.charge_usage(p_card_id bigint, p_spender_id bigint, p_parent_id bigint,
                                p_day date, p_delta bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_rows integer;
BEGIN
    IF p_delta > 0 THEN
        INSERT INTO fc.usage (scope_kind, scope_id, day, amount_fen)
        SELECT kind, id, p_day, p_delta
          FROM (VALUES (1::smallint, p_card_id), (2::smallint, p_spender_id),
                       (2::smallint, p_parent_id)) scopes (kind, id)
         WHERE id IS NOT NULL
        ON CONFLICT (scope_kind, scope_id, day)
        DO UPDATE SET amount_fen = fc.usage.amount_fen + excluded.amount_fen;
    ELSIF p_delta < 0 THEN
        -- Giving back what a hold charged: the counters exist (the CHECK on a
        -- speculative INSERT would refuse a negative row before any conflict).
        UPDATE fc.usage SET amount_fen = amount_fen + p_delta
         WHERE day = p_day
           AND ((scope_kind = 1 AND scope_id = p_card_id)
             OR (scope_kind = 2 AND scope_id IN (p_spender_id, p_parent_id)));
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        IF v_rows <> (CASE WHEN p_parent_id IS NULL THEN 2 ELSE 3 END) THEN
            RAISE EXCEPTION 'usage counters missing for card % on %', p_card_id, p_day;
        END IF;
    END IF;
END $$;

-- Controls: who may change what, and the changes.
------------------------------------------------------------------------------

-- An account's limits and scope are set by its parent; a top-level account
-- sets its own. A sub-account never sets its own: it cannot raise its caps.
CREATE OR REPLACE FUNCTION fc.require_controller(p_actor_uid uuid, p_target fc.accounts) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_actor bigint;
BEGIN
    SELECT id INTO v_actor FROM fc.accounts WHERE uid = p_actor_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'actor_account_id';
    END IF;
    IF p_target.parent_id IS DISTINCT FROM v_actor
       AND NOT (p_target.parent_id IS NULL AND p_target.id = v_actor) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_THE_CONTROLLING_ACCOUNT',
            DETAIL = 'actor_account_id';
    END IF;
    RETURN v_actor;
END $$;

-- Resolves a card-or-account target to (card row or NULL, account row).
CREATE OR REPLACE FUNCTION fc.resolve_target(p_card_uid uuid, p_account_uid uuid,
                                  OUT o_card fc.cards, OUT o_account fc.accounts)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_card_uid IS NOT NULL THEN
        SELECT * INTO o_card FROM fc.cards WHERE uid = p_card_uid;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_id';
        END IF;
        SELECT * INTO o_account FROM fc.accounts WHERE id = o_card.account_id;
    ELSE
        SELECT * INTO o_account FROM fc.accounts
         WHERE uid = p_account_uid AND kind <> fc.account_kind_system();
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
                DETAIL = 'account_id';
        END IF;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION fc.set_limits(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid,
    p_card_uid uuid, p_account_uid uuid, p_txn bigint, p_daily bigint, p_monthly bigint,
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_limits   jsonb := jsonb_build_object('per_transaction_fen', p_txn, 'daily_fen', p_daily,
                                           'monthly_fen', p_monthly);
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, p_account_uid);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    IF p_card_uid IS NOT NULL THEN
        UPDATE fc.cards SET limit_txn_fen = nullif(p_txn, 0), limit_daily_fen = nullif(p_daily, 0),
                            limit_monthly_fen = nullif(p_monthly, 0)
         WHERE id = (v_target.o_card).id;
    ELSE
        UPDATE fc.accounts SET limit_txn_fen = nullif(p_txn, 0),
                               limit_daily_fen = nullif(p_daily, 0),
                               limit_monthly_fen = nullif(p_monthly, 0)
         WHERE id = (v_target.o_account).id;
    END IF;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'limits', (v_target.o_card).id, (v_target.o_account).id, v_limits, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'set_limits', p_request_hash,
                       jsonb_build_object('limits', v_limits), p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.grant_raise(
    p_caller text, p_request_id text, p_request_hash bytea, p_actor_uid uuid,
    p_card_uid uuid, p_account_uid uuid, p_txn bigint, p_daily bigint, p_monthly bigint,
    p_starts timestamptz, p_ends timestamptz, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_target   record;
    v_actor    bigint;
    v_raise    uuid;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_target := fc.resolve_target(p_card_uid, p_account_uid);
    v_actor := fc.require_controller(p_actor_uid, v_target.o_account);
    PERFORM fc.lock_chain((v_target.o_account).id);
    INSERT INTO fc.limit_raises (card_id, account_id, limit_txn_fen, limit_daily_fen,
                                 limit_monthly_fen, starts_at, ends_at)
    VALUES ((v_target.o_card).id,
            CASE WHEN p_card_uid IS NULL THEN (v_target.o_account).id END,
            nullif(p_txn, 0), nullif(p_daily, 0), nullif(p_monthly, 0), p_starts, p_ends)
    RETURNING uid INTO v_raise;
    INSERT INTO fc.control_changes (actor_account_id, kind, card_id, account_id, details, created_at)
    VALUES (v_actor, 'raise', (v_target.o_card).id, (v_target.o_account).id,
            jsonb_build_object('per_transaction_fen', p_txn, 'daily_fen', p_daily,
                               'monthly_fen', p_monthly, 'start_us', fc.ts(p_starts),
                               'end_us', fc.ts(p_ends)), p_now);
    RETURN fc.remember(p_caller, p_request_id, 'grant_raise', p_request_hash,
                       jsonb_build_object('raise_id', v_raise), p_now);
END $$;

-- Reads of the controls.
CREATE OR REPLACE FUNCTION fc.get_limits(p_card_uid uuid, p_account_uid uuid, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_target record;
    v_kind   smallint;
    v_id     bigint;
    v_caps   fc.caps;
    v_day    date := (p_now AT TIME ZONE fc.business_tz())::date;
BEGIN
    v_target := fc.resolve_target(p_card_uid, p_account_uid);
    IF p_card_uid IS NOT NULL THEN
        v_kind := 1;
        v_id := (v_target.o_card).id;
        v_caps := fc.card_caps(v_target.o_card, p_now);
        RETURN jsonb_build_object(
            'limits', jsonb_build_object(
                'per_transaction_fen', coalesce((v_target.o_card).limit_txn_fen, 0),
                'daily_fen', coalesce((v_target.o_card).limit_daily_fen, 0),
                'monthly_fen', coalesce((v_target.o_card).limit_monthly_fen, 0)),
            'effective', jsonb_build_object('per_transaction_fen', coalesce(v_caps.txn, 0),
                'daily_fen', coalesce(v_caps.daily, 0), 'monthly_fen', coalesce(v_caps.monthly, 0)),
            'used_today_fen', fc.used_on(v_kind, v_id, v_day),
            'used_this_month_fen', fc.used_in_month(v_kind, v_id, v_day),
            'raise_end_us', fc.ts(v_caps.raise_ends))
            || fc.volume_limits_json(v_target.o_card, v_day);
    END IF;
    v_kind := 2;
    v_id := (v_target.o_account).id;
    v_caps := fc.account_caps(v_target.o_account, p_now);
    RETURN jsonb_build_object(
        'limits', jsonb_build_object(
            'per_transaction_fen', coalesce((v_target.o_account).limit_txn_fen, 0),
            'daily_fen', coalesce((v_target.o_account).limit_daily_fen, 0),
            'monthly_fen', coalesce((v_target.o_account).limit_monthly_fen, 0)),
        'effective', jsonb_build_object('per_transaction_fen', coalesce(v_caps.txn, 0),
            'daily_fen', coalesce(v_caps.daily, 0), 'monthly_fen', coalesce(v_caps.monthly, 0)),
        'used_today_fen', fc.used_on(v_kind, v_id, v_day),
        'used_this_month_fen', fc.used_in_month(v_kind, v_id, v_day),
        'raise_end_us', fc.ts(v_caps.raise_ends));
END $$;

CREATE OR REPLACE FUNCTION fc.card_caps(c fc.cards, p_now timestamptz) RETURNS fc.caps
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(
        (SELECT ROW(fc.largest_cap(array_agg(r.limit_txn_fen)),
                    fc.largest_cap(array_agg(r.limit_daily_fen)),
                    fc.largest_cap(array_agg(r.limit_monthly_fen)), max(r.ends_at))::fc.caps
           FROM fc.limit_raises r
          WHERE r.card_id = c.id AND r.starts_at <= p_now AND r.ends_at > p_now
         HAVING count(*) > 0),
        ROW(c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen, NULL)::fc.caps);
END $$;

CREATE OR REPLACE FUNCTION fc.account_caps(a fc.accounts, p_now timestamptz) RETURNS fc.caps
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce(
        (SELECT ROW(fc.largest_cap(array_agg(r.limit_txn_fen)),
                    fc.largest_cap(array_agg(r.limit_daily_fen)),
                    fc.largest_cap(array_agg(r.limit_monthly_fen)), max(r.ends_at))::fc.caps
           FROM fc.limit_raises r
          WHERE r.account_id = a.id AND r.starts_at <= p_now AND r.ends_at > p_now
         HAVING count(*) > 0),
        ROW(a.limit_txn_fen, a.limit_daily_fen, a.limit_monthly_fen, NULL)::fc.caps);
END $$;

CREATE OR REPLACE FUNCTION fc.used_on(p_kind smallint, p_id bigint, p_day date) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT amount_fen FROM fc.usage
                      WHERE scope_kind = p_kind AND scope_id = p_id AND day = p_day), 0);
END $$;

CREATE OR REPLACE FUNCTION fc.used_in_month(p_kind smallint, p_id bigint, p_day date)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(sum(amount_fen), 0) FROM fc.usage
             WHERE scope_kind = p_kind AND scope_id = p_id
               AND day >= date_trunc('month', p_day)::date AND day <= p_day);
END $$;

-- Whether new caps (0: no cap) are higher than the standing ones of a card or
-- account, or remove one: a limit raise needs a step-up. False for an unknown
-- target (the operation itself answers NOT_FOUND).
CREATE OR REPLACE FUNCTION fc.is_limit_raise(p_card_uid uuid, p_account_uid uuid, p_txn bigint,
                                  p_daily bigint, p_monthly bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    WITH old AS (
        SELECT limit_txn_fen AS t, limit_daily_fen AS d, limit_monthly_fen AS m
          FROM fc.cards WHERE p_card_uid IS NOT NULL AND uid = p_card_uid
        UNION ALL
        SELECT limit_txn_fen, limit_daily_fen, limit_monthly_fen
          FROM fc.accounts
         WHERE p_card_uid IS NULL AND uid = p_account_uid AND kind <> fc.account_kind_system())
    SELECT coalesce(bool_or(
               (o.t IS NOT NULL AND (p_txn = 0 OR p_txn > o.t))
            OR (o.d IS NOT NULL AND (p_daily = 0 OR p_daily > o.d))
            OR (o.m IS NOT NULL AND (p_monthly = 0 OR p_monthly > o.m))), false)
      FROM old o
$$;

CREATE OR REPLACE FUNCTION fc.note_raise() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE fc.accounts SET raises_end_at = NEW.ends_at
     WHERE id = coalesce(NEW.account_id, (SELECT account_id FROM fc.cards WHERE id = NEW.card_id))
       AND (raises_end_at IS NULL OR raises_end_at < NEW.ends_at);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER limit_raises_noted AFTER INSERT OR UPDATE ON fc.limit_raises
    FOR EACH ROW EXECUTE FUNCTION fc.note_raise();

-- Which cap of the card, its account or that account's parent (in that
-- order) `p_amount` more would break, or NULL. Callers hold the chain's
-- locks and read s and p under them.
-- On the pump path: fc.card_caps / fc.account_caps (which read
-- fc.limit_raises) only where a raise can be in force (raises_end_at), and
-- fc.cap_refusal only for the caps that are set.
CREATE OR REPLACE FUNCTION fc.caps_refusal(c fc.cards, s fc.accounts, p fc.accounts, p_day date,
                                           p_amount bigint, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_reason text;
BEGIN
    IF c.account_id IS DISTINCT FROM s.id OR s.raises_end_at > p_now THEN
        v_reason := coalesce(
            fc.cap_refusal(fc.card_caps(c, p_now), 1::smallint, c.id, p_day, p_amount),
            fc.cap_refusal(fc.account_caps(s, p_now), 2::smallint, s.id, p_day, p_amount));
    ELSE
        -- No raise of the card or its account in force: the standing caps.
        IF num_nonnulls(c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen) > 0 THEN
            v_reason := fc.cap_refusal(
                ROW(c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen, NULL)::fc.caps,
                1::smallint, c.id, p_day, p_amount);
        END IF;
        IF v_reason IS NULL
           AND num_nonnulls(s.limit_txn_fen, s.limit_daily_fen, s.limit_monthly_fen) > 0 THEN
            v_reason := fc.cap_refusal(
                ROW(s.limit_txn_fen, s.limit_daily_fen, s.limit_monthly_fen, NULL)::fc.caps,
                2::smallint, s.id, p_day, p_amount);
        END IF;
    END IF;
    IF v_reason IS NULL AND p.id IS NOT NULL THEN
        IF p.raises_end_at > p_now THEN
            v_reason := fc.cap_refusal(fc.account_caps(p, p_now), 2::smallint, p.id, p_day,
                                       p_amount);
        ELSIF num_nonnulls(p.limit_txn_fen, p.limit_daily_fen, p.limit_monthly_fen) > 0 THEN
            v_reason := fc.cap_refusal(
                ROW(p.limit_txn_fen, p.limit_daily_fen, p.limit_monthly_fen, NULL)::fc.caps,
                2::smallint, p.id, p_day, p_amount);
        END IF;
    END IF;
    RETURN v_reason;
END $$;
