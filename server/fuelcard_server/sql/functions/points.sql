-- Loyalty points: earning into lots that expire, spending oldest first, family pooling, and
-- tiers from the rolling 12-month spend.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Re-evaluates an account's tier from its confirmed spend over the rolling
-- window ending with p_now's month; records a change. Caller holds the lock.
CREATE OR REPLACE FUNCTION fc.evaluate_tier(p_account_id bigint, p_now timestamptz) RETURNS smallint
LANGUAGE plpgsql AS $$
DECLARE
    v_month  date := date_trunc('month', p_now AT TIME ZONE fc.business_tz())::date;
    v_window integer := (SELECT value::integer FROM fc.config WHERE key = 'tier_window_months');
    v_spend  bigint;
    v_old    smallint;
    v_new    smallint;
BEGIN
    SELECT coalesce(sum(spend_fen), 0) INTO v_spend FROM fc.monthly_spend
     WHERE account_id = p_account_id
       AND month > (v_month - make_interval(months => v_window))::date AND month <= v_month;
    SELECT tier INTO v_new FROM fc.tier_rules WHERE min_spend_fen <= v_spend
     ORDER BY min_spend_fen DESC LIMIT 1;
    SELECT tier INTO v_old FROM fc.accounts WHERE id = p_account_id;
    IF v_new IS DISTINCT FROM v_old THEN
        UPDATE fc.accounts SET tier = v_new WHERE id = p_account_id;
        INSERT INTO fc.tier_changes (account_id, from_tier, to_tier, spend_fen, created_at)
        VALUES (p_account_id, v_old, v_new, v_spend, p_now);
    END IF;
    RETURN v_new;
END $$;

-- A sale's part in its spender's tier: adds it to the spend of its month, and moves the tier
-- when the rolling window's spend says so. What fc.evaluate_tier decides, without summing
-- the window on every sale: the earlier months' sum is kept on this month's row (prior_fen,
-- computed at the month's first sale, or again when the window setting changed). p_tier:
-- the spender's tier before the sale; returns the tier after it. Caller holds the lock.
CREATE OR REPLACE FUNCTION fc.count_sale_for_tier(p_spender_id bigint, p_tier smallint,
                                                  p_final_fen bigint, p_now timestamptz)
RETURNS smallint
LANGUAGE plpgsql AS $$
DECLARE
    v_month  date := date_trunc('month', p_now AT TIME ZONE fc.business_tz())::date;
    v_ms     fc.monthly_spend;   -- this month's row, after the sale
    v_window integer;
    v_prior  bigint;
    v_spend  bigint;
    v_tier   smallint;
BEGIN
    INSERT INTO fc.monthly_spend (account_id, month, spend_fen) VALUES (p_spender_id, v_month, p_final_fen)
    ON CONFLICT (account_id, month) DO UPDATE SET spend_fen = fc.monthly_spend.spend_fen + excluded.spend_fen
    RETURNING * INTO v_ms;
    v_window := (SELECT value::integer FROM fc.config WHERE key = 'tier_window_months');
    -- A later month's kept sum covers this month: a sale dated before it (a
    -- request that waited for the lock across a month's end) makes it stale.
    UPDATE fc.monthly_spend SET prior_fen = NULL, prior_window = NULL
     WHERE account_id = p_spender_id AND month > v_month AND prior_fen IS NOT NULL;
    v_prior := v_ms.prior_fen;
    IF v_prior IS NULL OR v_ms.prior_window IS DISTINCT FROM v_window THEN
        SELECT coalesce(sum(spend_fen), 0) INTO v_prior FROM fc.monthly_spend
         WHERE account_id = p_spender_id
           AND month > (v_month - make_interval(months => v_window))::date AND month < v_month;
        UPDATE fc.monthly_spend SET prior_fen = v_prior, prior_window = v_window
         WHERE account_id = p_spender_id AND month = v_month;
    END IF;
    v_spend := v_prior + v_ms.spend_fen;
    SELECT tier INTO v_tier FROM fc.tier_rules WHERE min_spend_fen <= v_spend
     ORDER BY min_spend_fen DESC LIMIT 1;
    IF v_tier IS DISTINCT FROM p_tier THEN
        UPDATE fc.accounts SET tier = v_tier WHERE id = p_spender_id;
        INSERT INTO fc.tier_changes (account_id, from_tier, to_tier, spend_fen, created_at)
        VALUES (p_spender_id, p_tier, v_tier, v_spend, p_now);
    END IF;
    RETURN v_tier;
END $$;

CREATE OR REPLACE FUNCTION fc.points_for(p_amount_fen bigint, p_tier smallint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT (p_amount_fen / 100) * multiplier_permille / 1000
              FROM fc.tier_rules WHERE tier = p_tier);
END $$;

-- Lapses an account's points lots past their expiry: one points entry to
-- POINTS_EXPIRED for what they had left. Caller holds the account's lock.
-- Returns the number of lots that lapsed.
CREATE OR REPLACE FUNCTION fc.lapse_points_locked(p_account_id bigint, p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_points bigint;
    v_lots   integer;
BEGIN
    SELECT count(*), coalesce(sum(remaining), 0) INTO v_lots, v_points FROM fc.points_lots
     WHERE account_id = p_account_id AND remaining > 0 AND expires_at <= p_now;
    UPDATE fc.points_lots SET remaining = 0
     WHERE account_id = p_account_id AND remaining > 0 AND expires_at <= p_now;
    IF v_points > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                description, created_at)
        VALUES (fc.ledger_entry_kind_points_expired(), fc.asset_points(), p_account_id,
                fc.system_account('POINTS_EXPIRED'), v_points,
                'points expired', p_now);
        UPDATE fc.accounts SET points_balance = points_balance - v_points WHERE id = p_account_id;
    END IF;
    RETURN v_lots;
END $$;

CREATE OR REPLACE FUNCTION fc.take_points(p_account_id bigint, p_points bigint, p_now timestamptz)
RETURNS TABLE (expires_at timestamptz, points bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_lot  fc.points_lots;
    v_left bigint := p_points;
    v_take bigint;
BEGIN
    FOR v_lot IN SELECT * FROM fc.points_lots l
                  WHERE l.account_id = p_account_id AND l.remaining > 0
                  ORDER BY l.expires_at, l.id LOOP
        EXIT WHEN v_left = 0;
        IF v_lot.expires_at <= p_now THEN
            RAISE EXCEPTION 'points lot % of account % expired and was not lapsed',
                v_lot.id, p_account_id;
        END IF;
        v_take := least(v_left, v_lot.remaining);
        UPDATE fc.points_lots SET remaining = remaining - v_take WHERE id = v_lot.id;
        v_left := v_left - v_take;
        expires_at := v_lot.expires_at;
        points := v_take;
        RETURN NEXT;
    END LOOP;
    IF v_left <> 0 THEN
        RAISE EXCEPTION 'points lots of account % short by %', p_account_id, v_left;
    END IF;
END $$;

-- 1. Spending points lapses the expired ones first.
CREATE OR REPLACE FUNCTION fc.redeem_points(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_account_uid uuid, p_points bigint, p_description text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_entry    fc.journal;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    PERFORM fc.lock_chain(v_account.id);
    PERFORM fc.lapse_points_locked(v_account.id, p_now);   -- expired points are not spendable
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account.id;

    IF v_account.status <> fc.account_status_active() THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'ACCOUNT_FROZEN',
                                         'points_balance', v_account.points_balance);
    ELSIF v_account.points_balance < p_points THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'INSUFFICIENT_POINTS',
                                         'points_balance', v_account.points_balance);
    ELSE
        PERFORM fc.take_points(v_account.id, p_points, p_now);   -- oldest lots first
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, description, created_at)
        VALUES (fc.ledger_entry_kind_points_redeemed(), fc.asset_points(), v_account.id,
                fc.system_account('POINTS_REDEEMED'), p_points, p_description, p_now)
        RETURNING * INTO v_entry;
        UPDATE fc.accounts SET points_balance = points_balance - p_points WHERE id = v_account.id
        RETURNING * INTO v_account;
        v_response := jsonb_build_object('decision', 'APPROVED',
            'entry', jsonb_build_object('entry_id', v_entry.id::text, 'kind', v_entry.kind,
                                        'points', -p_points, 'description', p_description,
                                        'create_us', fc.ts(p_now)),
            'points_balance', v_account.points_balance);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'redeem_points', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.transfer_points(
    p_caller text, p_request_id text, p_request_hash bytea, p_from_uid uuid, p_to_uid uuid,
    p_points bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_from     fc.accounts;
    v_to       fc.accounts;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_from FROM fc.accounts WHERE uid = p_from_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'from_account_id';
    END IF;
    SELECT * INTO v_to FROM fc.accounts WHERE uid = p_to_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'to_account_id';
    END IF;
    IF v_from.parent_id IS DISTINCT FROM v_to.id THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOT_THE_PARENT_ACCOUNT',
            DETAIL = 'to_account_id';
    END IF;
    PERFORM fc.lock_chain(v_from.id);                    -- the main account (v_to) and the member
    PERFORM fc.lapse_points_locked(v_to.id, p_now);      -- expired points are not spendable,
    PERFORM fc.lapse_points_locked(v_from.id, p_now);    -- nor counted in either balance
    SELECT * INTO v_from FROM fc.accounts WHERE id = v_from.id;
    IF v_from.points_balance < p_points THEN
        v_response := jsonb_build_object('decision', 'DECLINED',
            'decline_reason', 'INSUFFICIENT_POINTS', 'from_points_balance', v_from.points_balance,
            'to_points_balance', (SELECT points_balance FROM fc.accounts WHERE id = v_to.id));
    ELSE
        -- The points keep their expiry dates on the main account.
        INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at)
        SELECT v_to.id, t.points, t.points, p_now, t.expires_at
          FROM fc.take_points(v_from.id, p_points, p_now) t;
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                description, created_at)
        VALUES (fc.ledger_entry_kind_points_transfer(), fc.asset_points(), v_from.id, v_to.id, p_points,
                'points pooled', p_now);
        UPDATE fc.accounts SET points_balance = points_balance - p_points WHERE id = v_from.id
        RETURNING * INTO v_from;
        UPDATE fc.accounts SET points_balance = points_balance + p_points WHERE id = v_to.id
        RETURNING * INTO v_to;
        v_response := jsonb_build_object('decision', 'APPROVED',
            'from_points_balance', v_from.points_balance, 'to_points_balance', v_to.points_balance);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'transfer_points', p_request_hash, v_response, p_now);
END $$;

-- 2. The jobs: the batch's accounts and parents locked in one ascending pass.
------------------------------------------------------------------------------

-- Job: lots past their expiry lapse. Idempotent: a lapsed lot has nothing
-- left to lapse. Returns the number of lots that lapsed.
CREATE OR REPLACE FUNCTION fc.expire_points(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts bigint[];
    v_account  bigint;
    v_total    integer := 0;
BEGIN
    SELECT coalesce(array_agg(DISTINCT account_id ORDER BY account_id), '{}') INTO v_accounts
      FROM (SELECT account_id FROM fc.points_lots
             WHERE remaining > 0 AND expires_at <= p_now ORDER BY expires_at LIMIT p_limit) due;
    PERFORM fc.lock_accounts(v_accounts);
    FOREACH v_account IN ARRAY v_accounts LOOP
        v_total := v_total + fc.lapse_points_locked(v_account, p_now);
    END LOOP;
    RETURN v_total;
END $$;

CREATE OR REPLACE FUNCTION fc.evaluate_tiers(p_now timestamptz, p_after_id bigint, p_limit integer)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts bigint[];
    v_account  bigint;
    v_old      smallint;
    v_changed  integer := 0;
BEGIN
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO v_accounts
      FROM (SELECT id FROM fc.accounts
             WHERE kind <> fc.account_kind_system() AND tier > 1 AND id > p_after_id
             ORDER BY id LIMIT p_limit) batch;
    PERFORM fc.lock_accounts(v_accounts);
    -- each tier as it is under the lock (a confirm may have moved it since)
    FOR v_account, v_old IN
        SELECT id, tier FROM fc.accounts WHERE id = ANY (v_accounts) ORDER BY id
    LOOP
        IF fc.evaluate_tier(v_account, p_now) IS DISTINCT FROM v_old THEN
            v_changed := v_changed + 1;
        END IF;
    END LOOP;
    RETURN jsonb_build_object('changed', v_changed,
                              'last_id', v_accounts[cardinality(v_accounts)]);
END $$;
