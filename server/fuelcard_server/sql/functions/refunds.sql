-- Refunds of confirmed sales (退款, issue 14 item 1): the money back to the account that
-- funded the sale (journal kind 10, FUEL_SALES -> funder), the points the sale earned taken
-- back pro rata, the sale's spend taken out of the tier window. Several partial refunds of
-- one sale add up to at most its settled amount: each decides under the account tree's lock
-- (fc.lock_chain), so two racing refunds are decided one after the other.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

CREATE OR REPLACE FUNCTION fc.sale_refund_json(r fc.sale_refunds) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'refund_id', r.uid,
        'hold_id', (SELECT uid FROM fc.holds WHERE id = r.hold_id),
        'account_id', (SELECT uid FROM fc.accounts WHERE id = r.account_id),
        'amount_fen', r.amount_fen,
        'refunded_total_fen', (SELECT sum(x.amount_fen) FROM fc.sale_refunds x
                                WHERE x.hold_id = r.hold_id AND x.id <= r.id),
        'points_taken', r.points_taken, 'points_shortfall', r.points_shortfall,
        'reason', r.reason, 'refunded_by', r.refunded_by, 'create_us', fc.ts(r.created_at),
        'entry_id', (SELECT j.id FROM fc.journal j
                      WHERE j.sale_refund_id = r.id AND j.asset = fc.asset_money()));
END $$;

-- The CONFIRMED hold a refund is about, as it is under the account tree's lock, or the
-- refusal: unknown, not a sale (yet, or at all).
CREATE OR REPLACE FUNCTION fc.lock_sale(p_hold_uid uuid) RETURNS fc.holds
LANGUAGE plpgsql AS $$
DECLARE
    v_hold fc.holds;
BEGIN
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    PERFORM fc.lock_chain(v_hold.spender_account_id);
    SELECT * INTO v_hold FROM fc.holds WHERE id = v_hold.id;
    IF v_hold.state <> fc.hold_state_confirmed() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_NOT_CONFIRMED', DETAIL = 'hold_id';
    END IF;
    RETURN v_hold;
END $$;

-- Takes back up to p_points points of the sale h from its spender: from the lot the sale
-- earned while it has any left, then from the spender's other lots (oldest first), never
-- more than the spender has: the points balance does not go negative. Expired lots lapse
-- first (their points are gone to POINTS_EXPIRED, not there to take). Books what it took
-- (kind 10, points, spender -> POINTS_ISSUED) and returns it; the caller records the rest
-- as the refund's shortfall. Caller holds the lock.
CREATE OR REPLACE FUNCTION fc.take_back_points(h fc.holds, p_points bigint, p_refund_id bigint,
                                               p_now timestamptz)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_lot     fc.points_lots;
    v_balance bigint;
    v_own     bigint := 0;
    v_more    bigint;
BEGIN
    IF p_points = 0 THEN
        RETURN 0;
    END IF;
    PERFORM fc.lapse_points_locked(h.spender_account_id, p_now);
    SELECT points_balance INTO v_balance FROM fc.accounts WHERE id = h.spender_account_id;
    SELECT * INTO v_lot FROM fc.points_lots
     WHERE account_id = h.spender_account_id AND hold_id = h.id AND remaining > 0;
    IF FOUND THEN
        v_own := least(v_lot.remaining, p_points);
        UPDATE fc.points_lots SET remaining = remaining - v_own WHERE id = v_lot.id;
    END IF;
    v_more := least(p_points - v_own, v_balance - v_own);
    IF v_more > 0 THEN
        PERFORM fc.take_points(h.spender_account_id, v_more, p_now);
    END IF;
    IF v_own + v_more > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,
                                sale_refund_id, description, created_at)
        VALUES (fc.ledger_entry_kind_sale_refund(), fc.asset_points(), h.spender_account_id,
                fc.system_account('POINTS_ISSUED'), v_own + v_more, h.id, p_refund_id,
                'points of a refunded sale', p_now);
        UPDATE fc.accounts SET points_balance = points_balance - (v_own + v_more)
         WHERE id = h.spender_account_id;
    END IF;
    RETURN v_own + v_more;
END $$;

-- Takes a refunded amount out of the spender's tier spend: out of the month the sale was
-- counted in (the business month of its purchase entry, as fc.count_sale_for_tier counted
-- it), clearing the kept window sums of later months that covered it (the next sale
-- recomputes them), then re-evaluates the tier. Caller holds the lock.
CREATE OR REPLACE FUNCTION fc.uncount_sale_for_tier(h fc.holds, p_amount_fen bigint,
                                                    p_now timestamptz)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_month date;
BEGIN
    -- The purchase entry, through the funding account's entries (journal_by_debit).
    SELECT date_trunc('month', j.created_at AT TIME ZONE fc.business_tz())::date INTO v_month
      FROM fc.journal j
     WHERE j.debit_account_id = h.account_id AND j.hold_id = h.id
       AND j.kind = fc.ledger_entry_kind_purchase();
    UPDATE fc.monthly_spend SET spend_fen = spend_fen - p_amount_fen
     WHERE account_id = h.spender_account_id AND month = v_month;
    UPDATE fc.monthly_spend SET prior_fen = NULL, prior_window = NULL
     WHERE account_id = h.spender_account_id AND month > v_month AND prior_fen IS NOT NULL;
    PERFORM fc.evaluate_tier(h.spender_account_id, p_now);
END $$;

-- RefundSale. The points due back are pro rata and cumulative: after this refund the sale
-- has given back points_earned * refunded / settled (rounded down) in all, taken or short,
-- so partial refunds never take back more than a full one would, and a full refund takes
-- back every point the sale earned.
CREATE OR REPLACE FUNCTION fc.refund_sale(p_caller text, p_request_id text, p_request_hash bytea,
                                          p_hold_uid uuid, p_amount_fen bigint, p_reason text,
                                          p_refunded_by text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb := fc.replay(p_caller, p_request_id, p_request_hash);
    v_hold     fc.holds;
    v_refunded bigint;   -- by earlier refunds
    v_points   bigint;   -- given back by earlier refunds, taken or short
    v_due      bigint;
    v_taken    bigint;
    v_refund   fc.sale_refunds;
    v_balance  bigint;
BEGIN
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_hold := fc.lock_sale(p_hold_uid);
    -- A twin of this very request may have refunded while we waited for the lock.
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT coalesce(sum(amount_fen), 0), coalesce(sum(points_taken + points_shortfall), 0)
      INTO v_refunded, v_points FROM fc.sale_refunds WHERE hold_id = v_hold.id;
    IF v_refunded + p_amount_fen > v_hold.settled_fen THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REFUND_EXCEEDS_SALE', DETAIL = 'amount_fen';
    END IF;
    v_due := v_hold.points_earned * (v_refunded + p_amount_fen) / v_hold.settled_fen - v_points;
    INSERT INTO fc.sale_refunds (hold_id, account_id, amount_fen, points_taken, points_shortfall,
                                 reason, refunded_by, created_at)
    VALUES (v_hold.id, v_hold.account_id, p_amount_fen, 0, 0, p_reason, p_refunded_by, p_now)
    RETURNING * INTO v_refund;
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,
                            sale_refund_id, description, created_at)
    VALUES (fc.ledger_entry_kind_sale_refund(), fc.asset_money(), fc.system_account('FUEL_SALES'),
            v_hold.account_id, p_amount_fen, v_hold.id, v_refund.id, 'sale refund', p_now);
    UPDATE fc.accounts SET balance_fen = balance_fen + p_amount_fen WHERE id = v_hold.account_id
    RETURNING balance_fen INTO v_balance;
    v_taken := fc.take_back_points(v_hold, v_due, v_refund.id, p_now);
    UPDATE fc.sale_refunds SET points_taken = v_taken, points_shortfall = v_due - v_taken
     WHERE id = v_refund.id RETURNING * INTO v_refund;
    PERFORM fc.uncount_sale_for_tier(v_hold, p_amount_fen, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'refund_sale', p_request_hash,
                       jsonb_build_object('refund', fc.sale_refund_json(v_refund),
                                          'balance_fen', v_balance), p_now);
END $$;
