-- Holds at the pump (Try-Confirm-Cancel): authorize reserves, confirm settles, cancel and
-- expiry release. The hold state machine is enforced by a trigger here.
--
-- fc.authorize and fc.confirm are the pump's two calls, each one statement: the steps they are
-- made of are functions of their own, called inside that statement, and handed the rows the
-- caller has already read rather than reading them again.
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

-- fc.hold_json's answer, from the funding account's and the card's values the pump path has
-- already read: no query. A plain SQL expression, inlined where it is called.
CREATE OR REPLACE FUNCTION fc.hold_json_of(h fc.holds, p_account_uid uuid, p_card_uid uuid,
                                           p_masked text)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'hold_id', h.uid, 'account_id', p_account_uid, 'card_id', p_card_uid,
        'masked_card_number', p_masked, 'state', h.state,
        'amount_fen', h.amount_fen, 'settled_fen', h.settled_fen,
        'station_id', h.station_id, 'terminal_id', h.terminal_id,
        'nozzle', h.nozzle, 'product', h.product,
        'create_us', fc.ts(h.created_at), 'expire_us', fc.ts(h.expires_at),
        'close_us', fc.ts(h.closed_at), 'volume_ml', h.volume_ml,
        'unit_price_fen', h.unit_price_fen, 'points_earned', h.points_earned,
        'confirmed_late', h.confirmed_late)
$$;

CREATE OR REPLACE FUNCTION fc.check_hold_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state <> OLD.state AND NOT (
           -- confirm, cancel, expire
           (OLD.state = fc.hold_state_authorized()
            AND NEW.state IN (fc.hold_state_confirmed(), fc.hold_state_cancelled(),
                              fc.hold_state_expired()))
           -- late confirm
        OR (OLD.state = fc.hold_state_expired() AND NEW.state = fc.hold_state_confirmed())
           -- review approve, cancel, expire, reject
        OR (OLD.state = fc.hold_state_suspended()
            AND NEW.state IN (fc.hold_state_authorized(), fc.hold_state_cancelled(),
                              fc.hold_state_expired(), fc.hold_state_rejected()))
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

-- Releases an account's holds past their expiry, the suspended ones too (a hold waiting for
-- review reserves money like an authorized one): their money and the usage they charged.
-- The caller holds the account's lock. Returns how many it released.
CREATE OR REPLACE FUNCTION fc.release_expired_locked(p_account_id bigint, p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_hold     record;
    v_count    integer := 0;
    v_released bigint := 0;
BEGIN
    FOR v_hold IN
        UPDATE fc.holds h SET state = fc.hold_state_expired(), closed_at = p_now
          FROM fc.accounts s
         WHERE h.account_id = p_account_id
           AND h.state IN (fc.hold_state_authorized(), fc.hold_state_suspended())
           AND h.expires_at <= p_now
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

-- Releases an open hold (cancel, reversal): its money and the usage it charged; CANCELLED.
-- A suspended hold may be released too: the driver gave up waiting for the review. One
-- already cancelled, expired or rejected holds no money: returned as it is. The caller
-- holds the account tree's lock (p_parent_id: the spender's parent, from fc.lock_chain).
CREATE OR REPLACE FUNCTION fc.release_hold(h fc.holds, p_parent_id bigint, p_now timestamptz)
RETURNS fc.holds
LANGUAGE plpgsql AS $$
BEGIN
    IF h.state IN (fc.hold_state_authorized(), fc.hold_state_suspended()) THEN
        UPDATE fc.holds SET state = fc.hold_state_cancelled(), closed_at = p_now
         WHERE id = h.id RETURNING * INTO h;
        UPDATE fc.accounts SET held_fen = held_fen - h.amount_fen WHERE id = h.account_id;
        PERFORM fc.charge_usage(h.card_id, h.spender_account_id, p_parent_id, h.usage_day,
                                -h.amount_fen);
    END IF;
    RETURN h;
END $$;

-- Releases the expired holds of a whole family: the account p_root_id and its sub-accounts,
-- whoever's money they reserve. A parent's caps count what every member's holds charged (a
-- sub-account's holds charge its parent's usage too), so releasing only the funding
-- account's would leave a sibling's expired hold counting against the parent's caps. The
-- caller holds the root's lock: every movement on a sub-account locks its parent first, so
-- no member's holds can move under us. Returns how many it released.
CREATE OR REPLACE FUNCTION fc.release_family_expired_locked(p_root_id bigint, p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_account bigint;
    v_count   integer := 0;
BEGIN
    FOR v_account IN
        SELECT DISTINCT h.account_id FROM fc.holds h JOIN fc.accounts a ON a.id = h.account_id
         WHERE (a.id = p_root_id OR a.parent_id = p_root_id)
           AND h.state IN (fc.hold_state_authorized(), fc.hold_state_suspended())
           AND h.expires_at <= p_now
         ORDER BY h.account_id
    LOOP
        v_count := v_count + fc.release_expired_locked(v_account, p_now);
    END LOOP;
    RETURN v_count;
END $$;

-- Before an authorization is declined for want of room or money: releases the expired holds
-- that may be what stands in the way. Money: the funding account's. Caps: the whole family's
-- (rooted at p_root_id, the parent or the account itself), since a parent's caps count every
-- member's holds. Returns how many it released; the caller looks again when any were.
CREATE OR REPLACE FUNCTION fc.release_for_refusal(p_reason text, p_funder_id bigint,
                                                  p_root_id bigint, p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF p_reason LIKE 'LIMIT_%' THEN
        RETURN fc.release_family_expired_locked(p_root_id, p_now);
    ELSIF p_reason = 'INSUFFICIENT_FUNDS' THEN
        RETURN fc.release_expired_locked(p_funder_id, p_now);
    END IF;
    RETURN 0;
END $$;

CREATE OR REPLACE FUNCTION fc.cancel(
    p_caller text, p_request_id text, p_request_hash bytea, p_hold_uid uuid, p_now timestamptz,
    p_station text, p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_spender_id bigint;
    v_parent_id  bigint;
    v_hold       fc.holds;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_station, p_terminal, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT spender_account_id INTO v_spender_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    v_parent_id := fc.lock_chain(v_spender_id);
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    IF p_terminal IS NOT NULL AND (v_hold.station_id, v_hold.terminal_id) <> (p_station, p_terminal) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD', DETAIL = 'hold_id';
    END IF;
    IF v_hold.state = fc.hold_state_confirmed() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    END IF;
    v_hold := fc.release_hold(v_hold, v_parent_id, p_now);
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'cancel', p_request_hash, v_response, p_now);
END $$;

-- Authorize: reserve money at the pump.
------------------------------------------------------------------------------

-- Why the card may not be used at all now: a blocked or closed card, a frozen account or
-- parent, a PIN refused (asked only of a card that may otherwise be used); NULL if it may.
CREATE OR REPLACE FUNCTION fc.card_refusal(c fc.cards, s fc.accounts, p fc.accounts,
                                           p_pin_ok boolean, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF c.status = fc.card_status_blocked() THEN
        RETURN 'CARD_BLOCKED';
    ELSIF c.status = fc.card_status_closed() THEN
        RETURN 'CARD_CLOSED';
    -- p is NULL for an account without a parent: only s decides then.
    ELSIF s.status <> fc.account_status_active() OR p.status <> fc.account_status_active() THEN
        RETURN 'ACCOUNT_FROZEN';
    ELSIF c.has_pin THEN
        RETURN fc.pin_refusal(c.id, p_pin_ok, p_now);
    END IF;
    RETURN NULL;
END $$;

-- Whether p_amount fits: the card's scope (station, product, hours), the caps of the card,
-- its account and the parent, then the money of the funding account p_funder; the refusal,
-- or NULL if it fits. Reads only. (A text answer, not a record: a PL/pgSQL function with OUT
-- parameters costs several microseconds more per call on the pump path.)
CREATE OR REPLACE FUNCTION fc.room_refusal(
    c fc.cards, s fc.accounts, p fc.accounts, p_funder fc.accounts, p_amount bigint,
    p_station_id text, p_product smallint, p_local timestamp, p_day date, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_reason text;
BEGIN
    v_reason := coalesce(fc.scope_refusal(c, p_station_id, p_product, p_local),
                         fc.caps_refusal(c, s, p, p_day, p_amount, p_now));
    -- Litre caps (fc.volume_refusal): only a card that has one pays for the look.
    IF v_reason IS NULL AND num_nonnulls(c.limit_fill_ml, c.limit_daily_ml, c.limit_monthly_ml) > 0 THEN
        v_reason := fc.volume_refusal(c, p_station_id, p_product, p_amount, p_day, p_now);
    END IF;
    -- An overrun left the account owing (fc.book_receivable): no new sale until a recharge
    -- has repaid it. From the row already read: no query.
    IF v_reason IS NULL AND p_funder.receivable_fen > 0 THEN
        v_reason := 'RECEIVABLE_OUTSTANDING';
    ELSIF v_reason IS NULL AND p_funder.balance_fen - p_funder.held_fen < p_amount THEN
        v_reason := 'INSUFFICIENT_FUNDS';
    END IF;
    RETURN v_reason;
END $$;

-- The reservation itself: the hold (SUSPENDED, waiting for a reviewer, when the risk verdict
-- p_risk says REVIEW; AUTHORIZED otherwise), the money held on the funding account, and the
-- usage charged to the caps of the card, its account and the parent. Returns the hold.
CREATE OR REPLACE FUNCTION fc.open_hold(
    p_card_id bigint, p_spender_id bigint, p_parent_id bigint, p_funder_id bigint, p_day date,
    p_amount_fen bigint, p_station_id text, p_terminal_id text, p_nozzle integer,
    p_product smallint, p_now timestamptz, p_ttl interval, p_risk jsonb)
RETURNS fc.holds
LANGUAGE plpgsql AS $$
DECLARE
    v_hold fc.holds;
BEGIN
    INSERT INTO fc.holds (account_id, card_id, spender_account_id, usage_day, state,
                          amount_fen, station_id, terminal_id, nozzle, product,
                          created_at, expires_at, risk_score, risk_rules, review_state)
    VALUES (p_funder_id, p_card_id, p_spender_id, p_day,
            CASE WHEN p_risk->>'decision' = 'REVIEW' THEN fc.hold_state_suspended()
                 ELSE fc.hold_state_authorized() END,
            p_amount_fen, p_station_id, p_terminal_id, p_nozzle, p_product, p_now, p_now + p_ttl,
            coalesce((p_risk->>'score')::integer, 0),
            coalesce(ARRAY(SELECT jsonb_array_elements_text(p_risk->'rules')), '{}'),
            CASE WHEN p_risk->>'decision' = 'REVIEW' THEN fc.review_state_pending() END)
    RETURNING * INTO v_hold;
    UPDATE fc.accounts SET held_fen = held_fen + p_amount_fen WHERE id = p_funder_id;
    PERFORM fc.charge_usage(p_card_id, p_spender_id, p_parent_id, p_day, p_amount_fen);
    RETURN v_hold;
END $$;

-- The card with this pan_index, once its account tree is locked until commit: fc.lock_chain's
-- locks (parent first) without its read, the parent being read with the card (an account's
-- parent never changes). CARD_NOT_FOUND if there is none. Returns the card's id.
CREATE OR REPLACE FUNCTION fc.lock_card(p_pan_index bytea) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v record;
BEGIN
    SELECT c.id, c.account_id, s.parent_id INTO v
      FROM fc.cards c JOIN fc.accounts s ON s.id = c.account_id WHERE c.pan_index = p_pan_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_number';
    END IF;
    PERFORM fc.lock_pair(v.parent_id, v.account_id);
    RETURN v.id;
END $$;

-- Reserve p_amount_fen for a sale at the pump, or decline. The money comes from the card's
-- account, or from its parent for a SHARED sub-account. Steps: the card (fc.card_refusal),
-- the room and the money (fc.room_refusal, again after releasing expired holds), the risk
-- engine, the hold (fc.open_hold).
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
    v_day      date := v_local::date;   -- from v_local: one fc.config read
    v_risk     jsonb;         -- the risk engine's verdict, NULL without a rule set
    v_rows     record;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_station_id, p_terminal_id, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    -- Serialise reservations on this account tree until commit (fc.lock_card); then read the
    -- card, its account and the parent, in one statement: a block, limit or scope committed
    -- while we waited applies to this one.
    v_card.id := fc.lock_card(p_pan_index);
    SELECT c AS card, s AS spender, p AS parent INTO v_rows
      FROM fc.cards c JOIN fc.accounts s ON s.id = c.account_id
      LEFT JOIN fc.accounts p ON p.id = s.parent_id
     WHERE c.id = v_card.id;
    v_card := v_rows.card;
    v_spender := v_rows.spender;
    v_parent := v_rows.parent;
    v_funder := CASE WHEN v_spender.funding_mode = fc.funding_mode_shared() THEN v_parent
                     ELSE v_spender END;
    v_reason := fc.card_refusal(v_card, v_spender, v_parent, p_pin_ok, p_now);
    IF v_reason IS NULL THEN
        v_reason := fc.room_refusal(v_card, v_spender, v_parent, v_funder, p_amount_fen,
                                    p_station_id, p_product, v_local, v_day, p_now);
        -- Expired holds not yet swept still use room and money: release them, look again.
        IF v_reason IS NOT NULL
           AND fc.release_for_refusal(v_reason, v_funder.id, coalesce(v_parent.id, v_spender.id),
                                      p_now) > 0 THEN
            SELECT * INTO v_funder FROM fc.accounts WHERE id = v_funder.id;
            v_reason := fc.room_refusal(v_card, v_spender, v_parent, v_funder, p_amount_fen,
                                        p_station_id, p_product, v_local, v_day, p_now);
        END IF;
    END IF;
    -- The risk engine scores only what passed every business check.
    IF v_reason IS NULL THEN
        v_risk := fc.risk_assess(v_card.id, v_spender.tier, v_spender.kind, v_spender.id,
                                 p_amount_fen, p_station_id, p_terminal_id, p_now, v_local);
        v_reason := CASE WHEN v_risk->>'decision' = 'DECLINE' THEN 'RISK_DECLINED' END;
    END IF;
    PERFORM fc.risk_note(v_card.id, v_reason IS NULL, p_amount_fen, p_station_id,
                         p_terminal_id, p_now, v_day);
    IF v_reason IS NOT NULL THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', v_reason,
                                         'available_fen', v_funder.balance_fen - v_funder.held_fen);
    ELSE
        v_hold := fc.open_hold(v_card.id, v_spender.id, v_parent.id, v_funder.id, v_day,
                               p_amount_fen, p_station_id, p_terminal_id, p_nozzle, p_product,
                               p_now, p_ttl, v_risk);
        v_response := jsonb_build_object(
            'decision', CASE WHEN v_hold.state = fc.hold_state_suspended() THEN 'REVIEW'
                             ELSE 'APPROVED' END,
            'hold', fc.hold_json_of(v_hold, v_funder.uid, v_card.uid, v_card.masked),
            'available_fen', v_funder.balance_fen - v_funder.held_fen - p_amount_fen);
    END IF;
    IF v_risk IS NOT NULL THEN
        v_response := v_response || jsonb_build_object('risk', v_risk);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'authorize', p_request_hash, v_response, p_now);
END $$;

-- Confirm: settle a hold for what the pump delivered.
------------------------------------------------------------------------------

-- Refuses a hold that cannot be confirmed for p_final_fen: already confirmed, cancelled,
-- never approved by its review, or rejected. Otherwise answers whether
-- the sale is late: the hold has expired (swept or not yet).
CREATE OR REPLACE FUNCTION fc.check_confirm(h fc.holds, p_final_fen bigint, p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF h.state = fc.hold_state_confirmed() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    ELSIF h.state = fc.hold_state_cancelled() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_CANCELLED', DETAIL = 'hold_id';
    -- A suspended hold, or one that expired before anyone approved it, was never approved:
    -- no fuel may have been sold on it.
    ELSIF h.state = fc.hold_state_suspended()
          OR (h.state = fc.hold_state_expired()
              AND h.review_state IN (fc.review_state_pending(), fc.review_state_rejected())) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_SUSPENDED', DETAIL = 'hold_id';
    ELSIF h.state = fc.hold_state_rejected() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_REJECTED', DETAIL = 'hold_id';
    END IF;
    -- A sale above the hold is an overrun: fc.confirm_overrun decides it.
    RETURN h.state = fc.hold_state_expired() OR h.expires_at <= p_now;
END $$;

-- A confirm of nothing delivered (final amount 0) behaves as a cancel: an authorized hold is
-- released; an expired one stays expired. Returns the answer.
CREATE OR REPLACE FUNCTION fc.confirm_nothing(h fc.holds, p_funder fc.accounts, p_spender_id bigint,
                                              p_parent_id bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    IF h.state = fc.hold_state_authorized() THEN
        UPDATE fc.holds SET state = fc.hold_state_cancelled(), closed_at = p_now WHERE id = h.id
        RETURNING * INTO h;
        UPDATE fc.accounts SET held_fen = held_fen - h.amount_fen WHERE id = p_funder.id
        RETURNING * INTO p_funder;
        PERFORM fc.charge_usage(h.card_id, p_spender_id, p_parent_id, h.usage_day, -h.amount_fen);
    END IF;
    RETURN jsonb_build_object('decision', 'APPROVED', 'hold', fc.hold_json(h),
                              'points_earned', 0, 'balance_fen', p_funder.balance_fen);
END $$;

-- A late sale on an expired hold whose money has been spent since: the fuel is gone but
-- cannot be paid from the card. Records it for reconciliation (once per hold) and answers
-- DECLINED, HOLD_EXPIRED, naming the record.
CREATE OR REPLACE FUNCTION fc.confirm_unpaid(h fc.holds, p_funder fc.accounts, p_final_fen bigint,
                                             p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_exception uuid;
BEGIN
    INSERT INTO fc.settlement_exceptions (hold_id, account_id, amount_fen, reason, created_at)
    VALUES (h.id, p_funder.id, p_final_fen, 'HOLD_EXPIRED_INSUFFICIENT_FUNDS', p_now)
    ON CONFLICT (hold_id) DO NOTHING;
    SELECT uid INTO v_exception FROM fc.settlement_exceptions WHERE hold_id = h.id;
    RETURN jsonb_build_object(
        'decision', 'DECLINED', 'decline_reason', 'HOLD_EXPIRED',
        'hold', fc.hold_json(h), 'points_earned', 0,
        'balance_fen', p_funder.balance_fen, 'settlement_exception_id', v_exception);
END $$;

-- A late sale on a swept (expired) hold is paid from the available money: when that looks
-- short, other holds past their expiry may still reserve money the sweeper has not given back
-- yet. Releases them under the lock (as fc.authorize does) before the caller decides, and
-- returns the funding account as it then is. The hold being confirmed is expired already and
-- untouched. Only on the late path: an ordinary confirm does not come here.
CREATE OR REPLACE FUNCTION fc.funder_for_late_sale(p_funder fc.accounts, p_final_fen bigint,
                                                   p_now timestamptz)
RETURNS fc.accounts
LANGUAGE plpgsql AS $$
BEGIN
    IF p_funder.balance_fen - p_funder.held_fen < p_final_fen
       AND fc.release_expired_locked(p_funder.id, p_now) > 0 THEN
        SELECT * INTO p_funder FROM fc.accounts WHERE id = p_funder.id;
    END IF;
    RETURN p_funder;
END $$;

-- The sale's money and points: the purchase entry, the points entry and lot, the funding
-- account's balance (and its held money, while the hold is authorized: an expired hold was
-- already released), the spender's points, and the usage the caps count. p_funder as read
-- under the lock; returns it as updated.
CREATE OR REPLACE FUNCTION fc.book_sale(h fc.holds, p_funder fc.accounts, p_spender_id bigint,
                                        p_parent_id bigint, p_final_fen bigint, p_points bigint,
                                        p_now timestamptz)
RETURNS fc.accounts
LANGUAGE plpgsql AS $$
DECLARE
    v_open boolean := h.state = fc.hold_state_authorized();
BEGIN
    -- Both legs in one statement (the points leg when there are points), in this order.
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
    SELECT leg.kind, leg.asset, leg.debit, leg.credit, leg.amount, h.id, p_now
      FROM (VALUES (1, fc.ledger_entry_kind_purchase(), fc.asset_money(), p_funder.id,
                    fc.system_account('FUEL_SALES'), p_final_fen),
                   (2, fc.ledger_entry_kind_points_earned(), fc.asset_points(),
                    fc.system_account('POINTS_ISSUED'), p_spender_id, p_points))
           leg (ord, kind, asset, debit, credit, amount)
     WHERE leg.ord = 1 OR p_points > 0
     ORDER BY leg.ord;
    IF p_points > 0 THEN
        -- The lot names its sale: a refund takes the points back from it first.
        -- The lot lasts so many calendar months in the business time zone: "+ 12 months" on
        -- a timestamptz counts months in the session's zone (UTC for the server), which moves
        -- a sale made early on the 29th-31st local (still the day before in UTC) to another
        -- expiry date. One read of fc.config for both values, as before for one.
        INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at,
                                    hold_id)
        SELECT p_spender_id, p_points, p_points, p_now,
               ((p_now AT TIME ZONE tz.value) + make_interval(months => m.value::integer))
                   AT TIME ZONE tz.value, h.id
          FROM fc.config m, fc.config tz
         WHERE m.key = 'points_validity_months' AND tz.key = 'business_time_zone';
        -- An account that funds itself gets its points with the money below: one row version.
        IF p_spender_id <> p_funder.id THEN
            UPDATE fc.accounts SET points_balance = points_balance + p_points WHERE id = p_spender_id;
        END IF;
    END IF;
    UPDATE fc.accounts
       SET balance_fen = balance_fen - p_final_fen,
           held_fen = held_fen - CASE WHEN v_open THEN h.amount_fen ELSE 0 END,
           points_balance = points_balance
                            + CASE WHEN p_spender_id = p_funder.id THEN p_points ELSE 0 END
     WHERE id = p_funder.id
    RETURNING * INTO p_funder;
    -- Usage: an open hold charged its amount and now charges what was sold; an expired one
    -- had been released and charges the sale afresh.
    PERFORM fc.charge_usage(h.card_id, p_spender_id, p_parent_id, h.usage_day,
                            p_final_fen - CASE WHEN v_open THEN h.amount_fen ELSE 0 END);
    RETURN p_funder;
END $$;

-- The hold, settled: CONFIRMED for what was sold. A late sale on an expired hold, once
-- declined for want of money and settled after all, closes the exception recorded for it.
-- Returns the hold as updated.
CREATE OR REPLACE FUNCTION fc.close_sale(h fc.holds, p_final_fen bigint, p_volume_ml bigint,
                                         p_unit_price_fen bigint, p_points bigint, p_late boolean,
                                         p_now timestamptz)
RETURNS fc.holds
LANGUAGE plpgsql AS $$
BEGIN
    IF h.state = fc.hold_state_expired() THEN
        UPDATE fc.settlement_exceptions SET resolved_at = p_now
         WHERE hold_id = h.id AND resolved_at IS NULL;
    END IF;
    UPDATE fc.holds
       SET state = fc.hold_state_confirmed(), settled_fen = p_final_fen,
           closed_at = coalesce(closed_at, p_now),
           volume_ml = p_volume_ml, unit_price_fen = p_unit_price_fen,
           points_earned = p_points, confirmed_late = p_late
     WHERE id = h.id
    RETURNING * INTO h;
    RETURN h;
END $$;

-- A pump overrun: p_final_fen above the hold. Beyond the tolerance (fc.config
-- overrun_tolerance_fen, or overrun_tolerance_pct of the hold, whichever is larger) nothing
-- is booked: a pump that ran that far past its preset is a fault or a fraud, not run-on, and
-- a person must look at it first. The hold stays as it was (the terminal may confirm again
-- with the amount it can justify, under a new request_id) and an exception of kind 2 records
-- the excess; the answer is the refusal, remembered like any other (not under the key
-- 'refusal', which fc.replay takes for a raised refusal of fc.remember_refusal). NULL when within the
-- tolerance. The config is read here only: the common path never comes here.
CREATE OR REPLACE FUNCTION fc.overrun_refusal(h fc.holds, p_final_fen bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_tolerance bigint;
    v_exception uuid;
BEGIN
    SELECT greatest(max(value::bigint) FILTER (WHERE key = 'overrun_tolerance_fen'),
                    h.amount_fen * max(value::bigint) FILTER (WHERE key = 'overrun_tolerance_pct')
                        / 100)
      INTO v_tolerance FROM fc.config
     WHERE key IN ('overrun_tolerance_fen', 'overrun_tolerance_pct');
    IF p_final_fen - h.amount_fen <= coalesce(v_tolerance, 0) THEN
        RETURN NULL;
    END IF;
    INSERT INTO fc.settlement_exceptions (kind, hold_id, account_id, amount_fen, reason, created_at)
    VALUES (2, h.id, h.account_id, p_final_fen - h.amount_fen, 'OVERRUN_ABOVE_TOLERANCE', p_now)
    ON CONFLICT (hold_id) DO UPDATE SET amount_fen = greatest(fc.settlement_exceptions.amount_fen,
                                                             EXCLUDED.amount_fen)
    RETURNING uid INTO v_exception;
    RETURN jsonb_build_object('overrun_refusal', 'OVERRUN_ABOVE_TOLERANCE',
                              'settlement_exception_id', v_exception);
END $$;

-- The part p_shortfall of a sale on hold h that its account's balance could not pay (an
-- overrun): booked all the same, from RECEIVABLES to FUEL_SALES (journal kind 12), owed by
-- the account (receivables, accounts.receivable_fen: it declines new authorizations until a
-- recharge repays it), charged to the caps' usage like the rest of the sale, and an open
-- settlement exception of kind 2 for finance. Returns the exception's uid.
CREATE OR REPLACE FUNCTION fc.book_receivable(h fc.holds, p_spender_id bigint, p_parent_id bigint,
                                              p_shortfall bigint, p_now timestamptz)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_exception uuid;
BEGIN
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
    VALUES (fc.ledger_entry_kind_overrun_receivable(), fc.asset_money(),
            fc.system_account('RECEIVABLES'), fc.system_account('FUEL_SALES'), p_shortfall, h.id, p_now);
    INSERT INTO fc.receivables (account_id, hold_id, amount_fen, created_at)
    VALUES (h.account_id, h.id, p_shortfall, p_now);
    UPDATE fc.accounts SET receivable_fen = receivable_fen + p_shortfall WHERE id = h.account_id;
    PERFORM fc.charge_usage(h.card_id, p_spender_id, p_parent_id, h.usage_day, p_shortfall);
    -- An earlier confirm of this hold, refused above the tolerance, left one: this is now
    -- the hold's exception, for what is owed.
    INSERT INTO fc.settlement_exceptions (kind, hold_id, account_id, amount_fen, reason, created_at)
    VALUES (2, h.id, h.account_id, p_shortfall, 'OVERRUN_SHORTFALL', p_now)
    ON CONFLICT (hold_id) DO UPDATE
       SET kind = 2, amount_fen = EXCLUDED.amount_fen, reason = EXCLUDED.reason,
           created_at = EXCLUDED.created_at, resolved_at = NULL, resolution = NULL,
           resolved_by = NULL
    RETURNING uid INTO v_exception;
    RETURN v_exception;
END $$;

-- The sale settled (fc.confirm's last step, once every check has passed): what the balance
-- pays (all of it, except an overrun past the money), the money and points (fc.book_sale),
-- the unpaid rest of an overrun (fc.book_receivable), the tier (fc.count_sale_for_tier), the
-- hold (fc.close_sale). Returns the answer.
CREATE OR REPLACE FUNCTION fc.settle_sale(h fc.holds, p_funder fc.accounts, p_spender_id bigint,
                                          p_parent_id bigint, p_final_fen bigint,
                                          p_volume_ml bigint, p_unit_price_fen bigint,
                                          p_late boolean, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_spender    fc.accounts;
    v_points     bigint;
    v_tier       smallint;
    v_card_uid   uuid;
    v_masked     text;
    v_paid       bigint;   -- what the balance pays of the sale
    v_exception  uuid;     -- an overrun's shortfall exception
    v_counts     boolean;  -- the card counts its litres
    v_posted     bigint;   -- the posted price of the sale's product at its station
BEGIN
    -- What the balance pays: all of it, except an overrun past the money (the rest is owed).
    v_paid := least(p_final_fen, p_funder.balance_fen - p_funder.held_fen
                                 + CASE WHEN h.state = fc.hold_state_authorized()
                                        THEN h.amount_fen ELSE 0 END);
    -- An account that funds itself is the row read above, not read again.
    IF p_funder.id = p_spender_id THEN
        v_spender := p_funder;
    ELSE
        SELECT * INTO v_spender FROM fc.accounts WHERE id = p_spender_id;
    END IF;
    v_points := fc.points_for(p_final_fen, v_spender.tier);
    p_funder := fc.book_sale(h, p_funder, p_spender_id, p_parent_id, v_paid, v_points, p_now);
    IF v_paid < p_final_fen THEN
        v_exception := fc.book_receivable(h, p_spender_id, p_parent_id, p_final_fen - v_paid,
                                          p_now);
    END IF;
    v_tier := fc.count_sale_for_tier(p_spender_id, v_spender.tier, p_final_fen, p_now);
    h := fc.close_sale(h, p_final_fen, p_volume_ml, p_unit_price_fen, v_points, p_late, p_now);
    -- fc.hold_json(h) without reading the funding account again; from the same row, whether
    -- the card counts litres, and the posted price (fc.note_sale_figures).
    SELECT c.uid, c.masked, num_nonnulls(c.limit_daily_ml, c.limit_monthly_ml) > 0,
           CASE WHEN p_unit_price_fen > 0 THEN fc.posted_price(h.station_id, h.product, p_now) END
      INTO v_card_uid, v_masked, v_counts, v_posted FROM fc.cards c WHERE c.id = h.card_id;
    h := fc.note_sale_figures(h, v_posted, v_counts);
    RETURN jsonb_build_object(
        'decision', 'APPROVED',
        'hold', fc.hold_json_of(h, p_funder.uid, v_card_uid, v_masked),
        'points_earned', v_points, 'balance_fen', p_funder.balance_fen,
        'receivable_fen', p_final_fen - v_paid, 'settlement_exception_id', v_exception,
        'amount_mismatch', h.amount_mismatch, 'price_mismatch', h.price_mismatch);
END $$;

-- Settle a hold for p_final_fen delivered (0: nothing, as a cancel). Steps: the checks
-- (fc.check_confirm), an overrun beyond the tolerance (fc.overrun_refusal), a late sale
-- without money (fc.confirm_unpaid), then the sale (fc.settle_sale).
CREATE OR REPLACE FUNCTION fc.confirm(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_hold_uid uuid, p_final_fen bigint, p_volume_ml bigint, p_unit_price_fen bigint,
    p_now timestamptz, p_station text, p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_spender_id bigint;
    v_parent_id  bigint;
    v_hold       fc.holds;
    v_funder     fc.accounts;
    v_late       boolean;
    v_rows       record;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_station, p_terminal, p_counter);
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
    -- Re-read under the lock, with its funding account in the same statement: the sweeper
    -- or a racing confirm may have moved it.
    SELECT h AS hold, a AS funder INTO v_rows
      FROM fc.holds h JOIN fc.accounts a ON a.id = h.account_id WHERE h.uid = p_hold_uid;
    v_hold := v_rows.hold;
    v_funder := v_rows.funder;
    IF p_terminal IS NOT NULL AND (v_hold.station_id, v_hold.terminal_id) <> (p_station, p_terminal) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD', DETAIL = 'hold_id';
    END IF;
    v_late := fc.check_confirm(v_hold, p_final_fen, p_now);
    IF p_final_fen = 0 THEN
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash,
                           fc.confirm_nothing(v_hold, v_funder, v_spender_id, v_parent_id, p_now),
                           p_now);
    END IF;
    IF p_final_fen > v_hold.amount_fen THEN
        v_response := fc.overrun_refusal(v_hold, p_final_fen, p_now);
        IF v_response IS NOT NULL THEN
            RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
        END IF;
    END IF;
    IF v_hold.state = fc.hold_state_expired() THEN
        v_funder := fc.funder_for_late_sale(v_funder, p_final_fen, p_now);
    END IF;
    IF v_hold.state = fc.hold_state_expired()
       AND v_funder.balance_fen - v_funder.held_fen < p_final_fen THEN
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash,
                           fc.confirm_unpaid(v_hold, v_funder, p_final_fen, p_now), p_now);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash,
                       fc.settle_sale(v_hold, v_funder, v_spender_id, v_parent_id, p_final_fen,
                                      p_volume_ml, p_unit_price_fen, v_late, p_now), p_now);
END $$;

-- The expiry sweep. Each account is released in a subtransaction of its own
-- (fc.sweep_account): one account whose holds cannot be released (say, a hold from an older
-- schema without the usage counters it should have charged) must not keep every other
-- customer's money reserved. Such an account is set aside in fc.hold_sweep_failures, skipped
-- until its retry time (an hour on: not retried in a tight loop, since the sweep goes again at
-- once after a full batch), and reported once by the job (fc.take_hold_sweep_failures).
-- Returns how many holds it released.
CREATE OR REPLACE FUNCTION fc.expire_holds(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_accounts bigint[];
    v_account  bigint;
    v_count    integer := 0;
BEGIN
    SELECT coalesce(array_agg(DISTINCT account_id ORDER BY account_id), '{}') INTO v_accounts
      FROM (SELECT h.account_id FROM fc.holds h
             WHERE h.state IN (fc.hold_state_authorized(), fc.hold_state_suspended())
               AND h.expires_at <= p_now
               AND NOT EXISTS (SELECT 1 FROM fc.hold_sweep_failures f
                                WHERE f.account_id = h.account_id AND f.retry_at > p_now)
             ORDER BY h.expires_at LIMIT p_limit) due;
    PERFORM fc.lock_accounts(v_accounts);
    FOREACH v_account IN ARRAY v_accounts LOOP
        v_count := v_count + fc.sweep_account(v_account, p_now);
    END LOOP;
    RETURN v_count;
END $$;

-- Reversal (冲正): ReverseAuthorization names an Authorize by its request id.
------------------------------------------------------------------------------

-- The answer an Authorize gets when its reversal came first (the tombstone's answer).
CREATE OR REPLACE FUNCTION fc.reversed_answer() RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '{"decision": "DECLINED", "decline_reason": "REVERSED", "available_fen": 0}'::jsonb
$$;

-- The reversal of an Authorize that has answered (p_original: its stored answer): its open
-- hold released, under the account tree's lock. A confirmed hold is refused: a sale is
-- undone by a refund, not a reversal.
CREATE OR REPLACE FUNCTION fc.reverse_answered(p_original jsonb, p_station text, p_terminal text,
                                                p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_hold      fc.holds;
    v_parent_id bigint;
BEGIN
    IF p_original->'hold' IS NULL THEN
        -- Declined, or refused (a stored refusal): nothing was ever held.
        RETURN jsonb_build_object('outcome', 'NOTHING_HELD');
    END IF;
    SELECT * INTO v_hold FROM fc.holds WHERE uid = (p_original->'hold'->>'hold_id')::uuid;
    v_parent_id := fc.lock_chain(v_hold.spender_account_id);
    SELECT * INTO v_hold FROM fc.holds WHERE id = v_hold.id;   -- as it is under the lock
    IF p_terminal IS NOT NULL AND (v_hold.station_id, v_hold.terminal_id) <> (p_station, p_terminal) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'NOT_YOUR_HOLD',
            DETAIL = 'original_request_id';
    END IF;
    IF v_hold.state = fc.hold_state_confirmed() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED',
            DETAIL = 'original_request_id';
    END IF;
    RETURN jsonb_build_object(
        'outcome', CASE WHEN v_hold.state IN (fc.hold_state_authorized(), fc.hold_state_suspended())
                        THEN 'RELEASED' ELSE 'ALREADY_CLOSED' END,
        'hold', fc.hold_json(fc.release_hold(v_hold, v_parent_id, p_now)));
END $$;

-- ReverseAuthorization. The tombstone is the original Authorize's idempotency key itself:
-- (caller, original request id), operation 'authorize', the answer DECLINED REVERSED, and an
-- empty fingerprint, which no request has (a fingerprint is an HMAC-SHA256, 32 bytes).
-- fc.replay answers an empty fingerprint's stored answer whatever the request's own: the
-- Authorize arriving later, whose payload the reversal could not know, gets DECLINED
-- REVERSED from its ordinary idempotency probe (no extra query on the pump path) rather
-- than REQUEST_ID_REUSED.
-- The races, all decided by the key's primary key: an Authorize that stored its answer
-- first makes the tombstone's INSERT do nothing (after waiting for it to commit), and the
-- reversal then releases its hold; a tombstone stored first makes the Authorize's own
-- fc.remember fail on the primary key, its hold rolls back with it, and the server's retry
-- (db.py, a race on idempotency_keys_pkey) replays the tombstone.
CREATE OR REPLACE FUNCTION fc.reverse_authorization(
    p_caller text, p_request_id text, p_request_hash bytea, p_original_request_id text,
    p_now timestamptz, p_station text, p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_hash      bytea;
    v_original  jsonb;
    v_operation text;
BEGIN
    v_response := fc.admit(p_caller, p_request_id, p_request_hash, p_station, p_terminal, p_counter);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response, created_at)
    VALUES (p_caller, p_original_request_id, 'authorize', ''::bytea, fc.reversed_answer(), p_now)
    ON CONFLICT (caller, request_id) DO NOTHING;
    IF FOUND THEN
        v_response := jsonb_build_object('outcome', 'AHEAD_OF_AUTHORIZE');
    ELSE
        SELECT request_hash, response, operation INTO v_hash, v_original, v_operation
          FROM fc.idempotency_keys WHERE caller = p_caller AND request_id = p_original_request_id;
        IF v_operation <> 'authorize' THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOT_AN_AUTHORIZATION',
                DETAIL = 'original_request_id';
        ELSIF octet_length(v_hash) = 0 THEN
            v_response := jsonb_build_object('outcome', 'AHEAD_OF_AUTHORIZE');   -- reversed twice
        ELSE
            v_response := fc.reverse_answered(fc.expand_answer('authorize', v_original), p_station,
                                              p_terminal, p_now);
        END IF;
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'reverse_authorization', p_request_hash,
                       v_response, p_now);
END $$;

-- One account of the sweep, in a subtransaction: its expired holds released, or, when that
-- fails, nothing of it changed and the failure recorded (the account set aside for an hour).
-- A transient failure (a deadlock, a serialisation failure, the server short of resources or
-- shutting down) is raised instead: the whole sweep is simply tried again. The caller holds
-- the account's lock. Returns how many holds it released.
CREATE OR REPLACE FUNCTION fc.sweep_account(p_account_id bigint, p_now timestamptz)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count   integer;
    v_state   text;
    v_message text;
BEGIN
    v_count := fc.release_expired_locked(p_account_id, p_now);
    DELETE FROM fc.hold_sweep_failures WHERE account_id = p_account_id;
    RETURN v_count;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT;
    IF left(v_state, 2) IN ('40', '53', '57', '08') THEN
        RAISE;
    END IF;
    INSERT INTO fc.hold_sweep_failures (account_id, sqlstate, message, failures, first_failed_at,
                                        last_failed_at, retry_at, reported)
    VALUES (p_account_id, v_state, v_message, 1, p_now, p_now, p_now + interval '1 hour', false)
    ON CONFLICT (account_id) DO UPDATE
       SET sqlstate = excluded.sqlstate, message = excluded.message,
           failures = fc.hold_sweep_failures.failures + 1, last_failed_at = excluded.last_failed_at,
           retry_at = excluded.retry_at, reported = false;
    RETURN 0;
END $$;

-- The sweep failures not yet reported, marked reported: the job logs each once and counts
-- it (fuelcard.holds.expiry_failures). Account ids are the public uids; the message is the
-- database's own text about internal rows, never a card number.
CREATE OR REPLACE FUNCTION fc.take_hold_sweep_failures()
RETURNS TABLE (account_uid uuid, sqlstate text, message text, failures integer,
               retry_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    UPDATE fc.hold_sweep_failures f SET reported = true
      FROM fc.accounts a
     WHERE a.id = f.account_id AND NOT f.reported
    RETURNING a.uid, f.sqlstate, f.message, f.failures, f.retry_at;
END $$;
