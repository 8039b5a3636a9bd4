-- Holds at the pump (Try-Confirm-Cancel): authorize reserves, confirm settles, cancel and
-- expiry release. The hold state machine is enforced by a trigger here.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

CREATE OR REPLACE FUNCTION fc.hold_json(h fc.holds) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'hold_id', h.uid,
        'account_id', (SELECT uid FROM fc.accounts WHERE id = h.account_id),
        'card_id', c.uid,
        'masked_card_number', c.masked,
        'state', h.state,
        'amount_fen', h.amount_fen,
        'settled_fen', h.settled_fen,
        'station_id', h.station_id,
        'terminal_id', h.terminal_id,
        'nozzle', h.nozzle,
        'product', h.product,
        'create_us', fc.ts(h.created_at),
        'expire_us', fc.ts(h.expires_at),
        'close_us', fc.ts(h.closed_at),
        'volume_ml', h.volume_ml,
        'unit_price_fen', h.unit_price_fen,
        'points_earned', h.points_earned,
        'confirmed_late', h.confirmed_late)
      FROM fc.cards c WHERE c.id = h.card_id);
END $$;

CREATE OR REPLACE FUNCTION fc.check_hold_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state <> OLD.state AND NOT (
           (OLD.state = 1 AND NEW.state IN (2, 3, 4))   -- confirm, cancel, expire
        OR (OLD.state = 4 AND NEW.state = 2)            -- late confirm
        OR (OLD.state = 5 AND NEW.state IN (1, 3, 4, 6)) -- review approve, cancel, expire, reject
    ) THEN
        RAISE EXCEPTION 'illegal hold transition % -> % for hold %', OLD.state, NEW.state, OLD.id;
    END IF;
    IF NEW.amount_fen <> OLD.amount_fen OR NEW.account_id <> OLD.account_id THEN
        RAISE EXCEPTION 'hold % amount and account are immutable', OLD.id;
    END IF;
    RETURN NEW;
END $$;

CREATE OR REPLACE TRIGGER holds_state_machine BEFORE UPDATE ON fc.holds
    FOR EACH ROW EXECUTE FUNCTION fc.check_hold_transition();

-- The money movements, aware of suspended and rejected holds. Copies of the
-- final bodies of 0002 with the changes marked "risk".
CREATE OR REPLACE FUNCTION fc.release_expired_locked(p_account_id bigint, p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_hold     record;
    v_count    integer := 0;
    v_released bigint := 0;
BEGIN
    FOR v_hold IN
        UPDATE fc.holds h SET state = 4, closed_at = p_now
          FROM fc.accounts s
         WHERE h.account_id = p_account_id AND h.state IN (1, 5) AND h.expires_at <= p_now  -- risk
           AND s.id = h.spender_account_id
        RETURNING h.card_id, h.spender_account_id, s.parent_id, h.usage_day, h.amount_fen
    LOOP
        PERFORM fc.charge_usage(v_hold.card_id, v_hold.spender_account_id, v_hold.parent_id,
                                v_hold.usage_day, -v_hold.amount_fen);
        v_count := v_count + 1;
        v_released := v_released + v_hold.amount_fen;
    END LOOP;
    IF v_released > 0 THEN
        UPDATE fc.accounts SET held_fen = held_fen - v_released WHERE id = p_account_id;
    END IF;
    RETURN v_count;
END $$;

CREATE OR REPLACE FUNCTION fc.cancel(
    p_caller text, p_request_id text, p_request_hash bytea, p_hold_uid uuid, p_now timestamptz,
    p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_spender_id bigint;
    v_parent_id  bigint;
    v_hold       fc.holds;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_terminal, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT spender_account_id INTO v_spender_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    v_parent_id := fc.lock_chain(v_spender_id);
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    IF p_terminal IS NOT NULL AND v_hold.terminal_id <> p_terminal THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD', DETAIL = 'hold_id';
    END IF;
    IF v_hold.state = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    END IF;
    -- risk: a suspended hold may be cancelled too (the driver gave up waiting).
    IF v_hold.state IN (1, 5) THEN
        UPDATE fc.holds SET state = 3, closed_at = p_now WHERE id = v_hold.id RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_hold.account_id;
        PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                -v_hold.amount_fen);
    END IF;
    -- Already cancelled, expired or rejected: the money is free; nothing to do.
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'cancel', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.authorize(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_pan_index bytea, p_amount_fen bigint,
    p_station_id text, p_terminal_id text, p_nozzle integer, p_product smallint,
    p_now timestamptz, p_ttl interval, p_counter bigint, p_pin_ok boolean)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_card     fc.cards;
    v_spender  fc.accounts;   -- the card's account
    v_parent   fc.accounts;   -- its parent, for sub-accounts
    v_funder   fc.accounts;   -- whose money is reserved
    v_hold     fc.holds;
    v_reason   text;
    v_local    timestamp := p_now AT TIME ZONE fc.business_tz();
    v_day      date := v_local::date;                   -- perf: one fc.config read
    v_risk     jsonb;         -- risk: the engine's verdict, NULL without a rule set
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_terminal_id, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;

    SELECT * INTO v_card FROM fc.cards WHERE pan_index = p_pan_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_number';
    END IF;

    -- Serialise every reservation on this account tree (parent first). Held
    -- until commit, which is the end of this one statement.
    PERFORM fc.lock_chain(v_card.account_id);
    -- The card again, now that changes to it are serialised with us too: a
    -- block, a limit or a scope committed while we waited for the lock
    -- applies to this reservation (fc.update_card_status and the controls
    -- change a card under the same lock).
    SELECT * INTO v_card FROM fc.cards WHERE id = v_card.id;
    SELECT * INTO v_spender FROM fc.accounts WHERE id = v_card.account_id;
    IF v_spender.parent_id IS NOT NULL THEN
        SELECT * INTO v_parent FROM fc.accounts WHERE id = v_spender.parent_id;
    END IF;
    IF v_spender.funding_mode = 2 THEN
        v_funder := v_parent;
    ELSE
        v_funder := v_spender;
    END IF;

    IF v_card.status = 2 THEN
        v_reason := 'CARD_BLOCKED';
    ELSIF v_card.status = 3 THEN
        v_reason := 'CARD_CLOSED';
    ELSIF v_spender.status <> 1 OR v_parent.status <> 1 THEN
        v_reason := 'ACCOUNT_FROZEN';
    END IF;
    IF v_reason IS NULL AND v_card.has_pin THEN
        v_reason := fc.pin_refusal(v_card.id, p_pin_ok, p_now);
    END IF;
    IF v_reason IS NULL THEN
        v_reason := coalesce(
            fc.scope_refusal(v_card, p_station_id, p_product, v_local),
            fc.caps_refusal(v_card, v_spender, v_parent, v_day, p_amount_fen, p_now));
        -- Holds past their expiry still use their room until the sweeper gets
        -- to them; as for the money below, release this account's now, then
        -- look again. (Nested IFs: SQL's AND does not promise to skip the call.)
        IF v_reason LIKE 'LIMIT_%' THEN
            IF fc.release_expired_locked(v_funder.id, p_now) > 0 THEN
                SELECT * INTO v_funder FROM fc.accounts WHERE id = v_funder.id;
                v_reason := fc.caps_refusal(v_card, v_spender, v_parent, v_day, p_amount_fen,
                                            p_now);
            END IF;
        END IF;
        IF v_reason IS NULL AND v_funder.balance_fen - v_funder.held_fen < p_amount_fen THEN
            -- Holds past their expiry still count until the sweeper gets to
            -- them; release this account's now, then look again.
            IF fc.release_expired_locked(v_funder.id, p_now) > 0 THEN
                SELECT * INTO v_funder FROM fc.accounts WHERE id = v_funder.id;
            END IF;
            IF v_funder.balance_fen - v_funder.held_fen < p_amount_fen THEN
                v_reason := 'INSUFFICIENT_FUNDS';
            END IF;
        END IF;
    END IF;

    -- risk: score what passed every business check.
    IF v_reason IS NULL THEN
        v_risk := fc.risk_assess(v_card.id, v_spender.tier, v_spender.kind, v_spender.id,
                                 p_amount_fen, p_station_id, p_terminal_id, p_now, v_local);
        IF v_risk->>'decision' = 'DECLINE' THEN
            v_reason := 'RISK_DECLINED';
        END IF;
    END IF;
    PERFORM fc.risk_note(v_card.id, v_reason IS NULL, p_amount_fen, p_station_id,
                         p_terminal_id, p_now, v_day);

    IF v_reason IS NOT NULL THEN
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', v_reason,
            'available_fen', v_funder.balance_fen - v_funder.held_fen);
    ELSE
        INSERT INTO fc.holds (account_id, card_id, spender_account_id, usage_day, state,
                              amount_fen, station_id, terminal_id, nozzle, product,
                              created_at, expires_at, risk_score, risk_rules, review_state)
        VALUES (v_funder.id, v_card.id, v_spender.id, v_day,
                CASE WHEN v_risk->>'decision' = 'REVIEW' THEN 5 ELSE 1 END,   -- risk
                p_amount_fen, p_station_id,
                p_terminal_id, p_nozzle, p_product, p_now, p_now + p_ttl,
                coalesce((v_risk->>'score')::integer, 0),
                coalesce(ARRAY(SELECT jsonb_array_elements_text(v_risk->'rules')), '{}'),
                CASE WHEN v_risk->>'decision' = 'REVIEW' THEN 1 END)
        RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen + p_amount_fen WHERE id = v_funder.id;
        PERFORM fc.charge_usage(v_card.id, v_spender.id, v_parent.id, v_day, p_amount_fen);
        v_response := jsonb_build_object(
            'decision', CASE WHEN v_hold.state = 5 THEN 'REVIEW' ELSE 'APPROVED' END,
            -- perf: fc.hold_json(v_hold), from the rows already read
            'hold', jsonb_build_object(
                'hold_id', v_hold.uid, 'account_id', v_funder.uid, 'card_id', v_card.uid,
                'masked_card_number', v_card.masked, 'state', v_hold.state,
                'amount_fen', v_hold.amount_fen, 'settled_fen', v_hold.settled_fen,
                'station_id', v_hold.station_id, 'terminal_id', v_hold.terminal_id,
                'nozzle', v_hold.nozzle, 'product', v_hold.product,
                'create_us', fc.ts(v_hold.created_at), 'expire_us', fc.ts(v_hold.expires_at),
                'close_us', fc.ts(v_hold.closed_at), 'volume_ml', v_hold.volume_ml,
                'unit_price_fen', v_hold.unit_price_fen, 'points_earned', v_hold.points_earned,
                'confirmed_late', v_hold.confirmed_late),
            'available_fen', v_funder.balance_fen - v_funder.held_fen - p_amount_fen);
    END IF;
    IF v_risk IS NOT NULL THEN
        v_response := v_response || jsonb_build_object('risk', v_risk);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'authorize', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.confirm(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_hold_uid uuid, p_final_fen bigint, p_volume_ml bigint, p_unit_price_fen bigint,
    p_now timestamptz, p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response  jsonb;
    v_spender_id bigint;
    v_parent_id bigint;
    v_hold      fc.holds;
    v_funder    fc.accounts;
    v_spender   fc.accounts;
    v_points    bigint := 0;
    v_late      boolean;
    v_exception uuid;
    v_month     date;
    v_ms        fc.monthly_spend;   -- perf: this month's row, after the sale
    v_window    integer;
    v_spend     bigint;
    v_tier      smallint;
    v_prior     bigint;
    v_card_uid  uuid;
    v_masked    text;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_terminal, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;

    SELECT spender_account_id INTO v_spender_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    v_parent_id := fc.lock_chain(v_spender_id);
    -- A concurrent duplicate of this very request may have settled the hold
    -- while we waited for the lock: answer as it did, not HOLD_ALREADY_CONFIRMED.
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    -- Re-read under the lock: the sweeper or a racing confirm may have moved it.
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    SELECT * INTO v_funder FROM fc.accounts WHERE id = v_hold.account_id;
    IF p_terminal IS NOT NULL AND v_hold.terminal_id <> p_terminal THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD', DETAIL = 'hold_id';
    END IF;

    IF v_hold.state = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    ELSIF v_hold.state = 3 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_CANCELLED', DETAIL = 'hold_id';
    -- risk: a suspended hold, or one that expired before anyone approved it,
    -- was never approved: no fuel may have been sold on it.
    ELSIF v_hold.state = 5 OR (v_hold.state = 4 AND v_hold.review_state IN (1, 3)) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_SUSPENDED', DETAIL = 'hold_id';
    ELSIF v_hold.state = 6 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_REJECTED', DETAIL = 'hold_id';
    END IF;
    IF p_final_fen > v_hold.amount_fen THEN
        RAISE EXCEPTION USING ERRCODE = 'FCIA0', MESSAGE = 'FINAL_AMOUNT_EXCEEDS_HOLD',
            DETAIL = 'final_amount_fen';
    END IF;

    IF p_final_fen = 0 THEN
        -- Nothing delivered: behaves as cancel. An expired hold stays expired.
        IF v_hold.state = 1 THEN
            UPDATE fc.holds SET state = 3, closed_at = p_now WHERE id = v_hold.id
            RETURNING * INTO v_hold;
            UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_funder.id
            RETURNING * INTO v_funder;
            PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                                    -v_hold.amount_fen);
        END IF;
        v_response := jsonb_build_object('decision', 'APPROVED', 'hold', fc.hold_json(v_hold),
                                         'points_earned', 0, 'balance_fen', v_funder.balance_fen);
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
    END IF;

    v_late := v_hold.state = 4 OR v_hold.expires_at <= p_now;
    IF v_hold.state = 4 AND v_funder.balance_fen - v_funder.held_fen < p_final_fen THEN
        -- Expired, released, and the money has been spent since: the fuel is
        -- gone but cannot be paid from the card. Record it for reconciliation.
        INSERT INTO fc.settlement_exceptions (hold_id, account_id, amount_fen, reason, created_at)
        VALUES (v_hold.id, v_funder.id, p_final_fen, 'HOLD_EXPIRED_INSUFFICIENT_FUNDS', p_now)
        ON CONFLICT (hold_id) DO NOTHING;
        SELECT uid INTO v_exception FROM fc.settlement_exceptions WHERE hold_id = v_hold.id;
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', 'HOLD_EXPIRED',
            'hold', fc.hold_json(v_hold), 'points_earned', 0,
            'balance_fen', v_funder.balance_fen, 'settlement_exception_id', v_exception);
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
    END IF;

    -- perf: a personal account funds itself: the row read above, not read again.
    IF v_funder.id = v_spender_id THEN
        v_spender := v_funder;
    ELSE
        SELECT * INTO v_spender FROM fc.accounts WHERE id = v_spender_id;
    END IF;
    v_points := fc.points_for(p_final_fen, v_spender.tier);
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
    VALUES (2, 1, v_funder.id, fc.system_account('FUEL_SALES'), p_final_fen, v_hold.id, p_now);
    IF v_points > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
        VALUES (3, 2, fc.system_account('POINTS_ISSUED'), v_spender_id, v_points, v_hold.id, p_now);
        INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at)
        VALUES (v_spender_id, v_points, v_points, p_now,
                p_now + make_interval(months => (SELECT value::integer FROM fc.config
                                                  WHERE key = 'points_validity_months')));
        IF v_spender_id <> v_funder.id THEN   -- perf: else with the money, one row version
            UPDATE fc.accounts SET points_balance = points_balance + v_points WHERE id = v_spender_id;
        END IF;
    END IF;
    UPDATE fc.accounts
       SET balance_fen = balance_fen - p_final_fen,
           -- an expired hold no longer counts in held_fen
           held_fen = held_fen - CASE WHEN v_hold.state = 1 THEN v_hold.amount_fen ELSE 0 END,
           points_balance = points_balance
                            + CASE WHEN v_spender_id = v_funder.id THEN v_points ELSE 0 END
     WHERE id = v_funder.id
    RETURNING * INTO v_funder;
    -- Usage: an open hold charged its amount and now charges what was sold;
    -- an expired one had been released and charges the sale afresh.
    PERFORM fc.charge_usage(v_hold.card_id, v_spender_id, v_parent_id, v_hold.usage_day,
                            p_final_fen - CASE WHEN v_hold.state = 1 THEN v_hold.amount_fen ELSE 0 END);
    v_month := date_trunc('month', p_now AT TIME ZONE fc.business_tz())::date;
    INSERT INTO fc.monthly_spend (account_id, month, spend_fen) VALUES (v_spender_id, v_month, p_final_fen)
    ON CONFLICT (account_id, month) DO UPDATE SET spend_fen = fc.monthly_spend.spend_fen + excluded.spend_fen
    RETURNING * INTO v_ms;
    -- perf: fc.evaluate_tier(v_spender_id, p_now) without re-reading the
    -- window: its spend is this month's row plus the earlier months' sum,
    -- kept on this month's row (prior_fen, computed at its first sale).
    v_window := (SELECT value::integer FROM fc.config WHERE key = 'tier_window_months');
    -- A later month's kept sum covers this month: a sale dated before it (a
    -- request that waited for the lock across a month's end) makes it stale.
    UPDATE fc.monthly_spend SET prior_fen = NULL, prior_window = NULL
     WHERE account_id = v_spender_id AND month > v_month AND prior_fen IS NOT NULL;
    v_prior := v_ms.prior_fen;
    IF v_prior IS NULL OR v_ms.prior_window IS DISTINCT FROM v_window THEN
        SELECT coalesce(sum(spend_fen), 0) INTO v_prior FROM fc.monthly_spend
         WHERE account_id = v_spender_id
           AND month > (v_month - make_interval(months => v_window))::date AND month < v_month;
        UPDATE fc.monthly_spend SET prior_fen = v_prior, prior_window = v_window
         WHERE account_id = v_spender_id AND month = v_month;
    END IF;
    v_spend := v_prior + v_ms.spend_fen;
    SELECT tier INTO v_tier FROM fc.tier_rules WHERE min_spend_fen <= v_spend
     ORDER BY min_spend_fen DESC LIMIT 1;
    IF v_tier IS DISTINCT FROM v_spender.tier THEN
        UPDATE fc.accounts SET tier = v_tier WHERE id = v_spender_id;
        INSERT INTO fc.tier_changes (account_id, from_tier, to_tier, spend_fen, created_at)
        VALUES (v_spender_id, v_spender.tier, v_tier, v_spend, p_now);
    END IF;
    IF v_hold.state = 4 THEN
        -- A sale once declined for want of money, settled after all: the
        -- exception recorded for it is closed.
        UPDATE fc.settlement_exceptions SET resolved_at = p_now
         WHERE hold_id = v_hold.id AND resolved_at IS NULL;
    END IF;
    UPDATE fc.holds
       SET state = 2, settled_fen = p_final_fen, closed_at = coalesce(closed_at, p_now),
           volume_ml = p_volume_ml, unit_price_fen = p_unit_price_fen,
           points_earned = v_points, confirmed_late = v_late
     WHERE id = v_hold.id
    RETURNING * INTO v_hold;

    -- perf: fc.hold_json(v_hold) without reading the funding account again.
    SELECT uid, masked INTO v_card_uid, v_masked FROM fc.cards WHERE id = v_hold.card_id;
    v_response := jsonb_build_object(
        'decision', 'APPROVED',
        'hold', jsonb_build_object(
            'hold_id', v_hold.uid, 'account_id', v_funder.uid, 'card_id', v_card_uid,
            'masked_card_number', v_masked, 'state', v_hold.state,
            'amount_fen', v_hold.amount_fen, 'settled_fen', v_hold.settled_fen,
            'station_id', v_hold.station_id, 'terminal_id', v_hold.terminal_id,
            'nozzle', v_hold.nozzle, 'product', v_hold.product,
            'create_us', fc.ts(v_hold.created_at), 'expire_us', fc.ts(v_hold.expires_at),
            'close_us', fc.ts(v_hold.closed_at), 'volume_ml', v_hold.volume_ml,
            'unit_price_fen', v_hold.unit_price_fen, 'points_earned', v_hold.points_earned,
            'confirmed_late', v_hold.confirmed_late),
        'points_earned', v_points, 'balance_fen', v_funder.balance_fen);
    RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.expire_holds(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts bigint[];
    v_account  bigint;
    v_count    integer := 0;
BEGIN
    SELECT coalesce(array_agg(DISTINCT account_id ORDER BY account_id), '{}') INTO v_accounts
      FROM (SELECT account_id FROM fc.holds
             WHERE state IN (1, 5) AND expires_at <= p_now
             ORDER BY expires_at LIMIT p_limit) due;
    PERFORM fc.lock_accounts(v_accounts);
    FOREACH v_account IN ARRAY v_accounts LOOP
        v_count := v_count + fc.release_expired_locked(v_account, p_now);
    END LOOP;
    RETURN v_count;
END $$;
