-- Money in and back out through payment channels: recharges, channel refunds, batch top-up
-- of sub-accounts, and the settlement records reconciliation compares with the channels' files.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Batch top-up (批量充值) and points pooling (积分合并).

-- The lines of a batch top-up into pg_temp.top_up_lines (n: the line's index in the request),
-- checked (every account a known ALLOCATED sub-account of p_parent_id) and locked: the parent
-- first, then its sub-accounts in ascending id, the lock order.
CREATE OR REPLACE FUNCTION fc.load_top_up_lines(p_parent_id bigint, p_lines jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS pg_temp.top_up_lines (
        n bigint, account_id bigint, funding_mode smallint, parent_id bigint, uid uuid,
        amount bigint)
        ON COMMIT DROP;
    INSERT INTO pg_temp.top_up_lines
    SELECT e.n - 1, a.id, a.funding_mode, a.parent_id, (e.line->>'uid')::uuid,
           (e.line->>'amount')::bigint
      FROM jsonb_array_elements(p_lines) WITH ORDINALITY AS e(line, n)
      LEFT JOIN fc.accounts a ON a.uid = (e.line->>'uid')::uuid
                             AND a.kind <> fc.account_kind_system();
    IF EXISTS (SELECT 1 FROM pg_temp.top_up_lines WHERE account_id IS NULL) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'lines.account_id';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_temp.top_up_lines
                WHERE parent_id IS DISTINCT FROM p_parent_id
                   OR funding_mode <> fc.funding_mode_allocated()) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NOT_AN_ALLOCATED_SUB_ACCOUNT',
            DETAIL = 'lines.account_id';
    END IF;
    PERFORM pg_advisory_xact_lock(p_parent_id);
    PERFORM pg_advisory_xact_lock(account_id)
       FROM (SELECT account_id FROM pg_temp.top_up_lines ORDER BY account_id) ordered;
END $$;

-- A batch is all or nothing, and no sub-account may end above its maximum balance (as a
-- recharge may not): refuses the whole batch, naming every line that would
-- (lines[<n>].amount_fen, one field violation each). The caller holds the locks.
CREATE OR REPLACE FUNCTION fc.check_top_up_max_balance() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_fields text;
BEGIN
    SELECT string_agg(format('lines[%s].amount_fen', l.n), E'\n' ORDER BY l.n) INTO v_fields
      FROM pg_temp.top_up_lines l JOIN fc.accounts a ON a.id = l.account_id
     WHERE a.balance_fen > a.max_balance_fen - l.amount;
    IF v_fields IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FCIA0', MESSAGE = 'BALANCE_LIMIT_EXCEEDED',
            DETAIL = v_fields;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION fc.batch_top_up(
    p_caller text, p_request_id text, p_request_hash bytea, p_parent_uid uuid,
    p_lines jsonb, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_parent   fc.accounts;
    v_total    bigint;
    v_line     record;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_parent FROM fc.accounts WHERE uid = p_parent_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
            DETAIL = 'parent_account_id';
    END IF;
    PERFORM fc.load_top_up_lines(v_parent.id, p_lines);
    PERFORM fc.check_top_up_max_balance();
    -- Holds past their expiry still count in the parent's held money until the sweeper gets
    -- to them: release them under the lock before deciding, as authorize does.
    PERFORM fc.release_expired_locked(v_parent.id, p_now);
    SELECT * INTO v_parent FROM fc.accounts WHERE id = v_parent.id;
    SELECT sum(amount) INTO v_total FROM pg_temp.top_up_lines;
    IF v_parent.status <> fc.account_status_active() THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'ACCOUNT_FROZEN',
                                         'total_fen', v_total, 'parent_balance_fen', v_parent.balance_fen);
    ELSIF v_parent.balance_fen - v_parent.held_fen < v_total THEN
        v_response := jsonb_build_object('decision', 'DECLINED',
                                         'decline_reason', 'INSUFFICIENT_FUNDS',
                                         'total_fen', v_total, 'parent_balance_fen', v_parent.balance_fen);
    ELSE
        FOR v_line IN SELECT * FROM pg_temp.top_up_lines ORDER BY account_id LOOP
            INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                    description, created_at)
            VALUES (fc.ledger_entry_kind_allocation(), fc.asset_money(), v_parent.id, v_line.account_id,
                    v_line.amount, 'batch top-up', p_now);
            UPDATE fc.accounts SET balance_fen = balance_fen + v_line.amount
             WHERE id = v_line.account_id;
        END LOOP;
        UPDATE fc.accounts SET balance_fen = balance_fen - v_total WHERE id = v_parent.id
        RETURNING * INTO v_parent;
        v_response := jsonb_build_object('decision', 'APPROVED', 'total_fen', v_total,
                                         'parent_balance_fen', v_parent.balance_fen);
    END IF;
    DROP TABLE pg_temp.top_up_lines;
    RETURN fc.remember(p_caller, p_request_id, 'batch_top_up', p_request_hash, v_response, p_now);
END $$;

-- Recharge: SHARED sub-accounts hold no money; sub-accounts lock their parent first.
CREATE OR REPLACE FUNCTION fc.recharge(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_account_uid uuid, p_channel smallint, p_channel_txn_id text, p_amount_fen bigint,
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_recharge fc.recharges;
    v_clearing text;
    v_repay    bigint;   -- what the payment repays of the account's overrun receivables
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    IF v_account.funding_mode = fc.funding_mode_shared() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'ACCOUNT_USES_PARENT_BALANCE',
            DETAIL = 'account_id';
    END IF;

    -- The channel may notify the same payment again under a new request_id.
    SELECT * INTO v_recharge FROM fc.recharges
     WHERE channel = p_channel AND channel_txn_id = p_channel_txn_id;
    IF FOUND THEN
        IF v_recharge.account_id <> v_account.id OR v_recharge.amount_fen <> p_amount_fen THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CHANNEL_TXN_REUSED',
                DETAIL = 'channel_txn_id';
        END IF;
        -- The original answer: the balance just after this recharge was credited.
        v_response := jsonb_build_object('decision', 'APPROVED',
            'recharge', fc.recharge_json(v_recharge), 'balance_fen', v_recharge.balance_after_fen);
        -- This request_id is now spent on this answer, like any other.
        RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now)
               || '{"replayed": true}';
    END IF;

    PERFORM fc.lock_chain(v_account.id);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account.id;
    -- What the account owes from overruns is paid first, out of this payment.
    v_repay := least(v_account.receivable_fen, p_amount_fen);
    v_response := fc.channel_payment_refusal(v_account, p_channel, p_channel_txn_id,
                                             p_amount_fen - v_repay, p_amount_fen, p_now);
    IF v_response IS NOT NULL THEN
        RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now);
    END IF;

    v_clearing := 'CHANNEL_CLEARING_' || (ARRAY['BANK_CARD', 'WECHAT_PAY', 'ALIPAY', 'ECNY', 'COUNTER'])[p_channel];
    INSERT INTO fc.recharges (account_id, channel, channel_txn_id, amount_fen, balance_after_fen,
                              created_at)
    VALUES (v_account.id, p_channel, p_channel_txn_id, p_amount_fen,
            v_account.balance_fen + p_amount_fen - v_repay, p_now)
    RETURNING * INTO v_recharge;
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, recharge_id, created_at)
    VALUES (fc.ledger_entry_kind_recharge(), fc.asset_money(), fc.system_account(v_clearing), v_account.id,
            p_amount_fen, v_recharge.id, p_now);
    UPDATE fc.accounts SET balance_fen = balance_fen + p_amount_fen WHERE id = v_account.id
    RETURNING * INTO v_account;
    IF v_repay > 0 THEN
        v_account := fc.repay_receivables(v_account, v_recharge.id, v_repay, p_now);
    END IF;

    v_response := jsonb_build_object('decision', 'APPROVED',
        'recharge', fc.recharge_json(v_recharge), 'balance_fen', v_account.balance_fen);
    RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now);
END $$;

-- Why a channel payment must be refused and given back to the payer, as the recharge's
-- answer, or NULL if it may be credited. p_kept: what the payment would add to the balance
-- (what it does not repay of receivables). A payment once refused stays refused: the
-- channel's re-notifications of it (new request_ids) find its exception and get the same
-- answer, even if the balance has room by then, since the adapter was already told to
-- refund it. The refusal is a settlement exception of kind 3 (one per channel payment) and
-- the answer's refund_payment. The caller holds the account's lock.
CREATE OR REPLACE FUNCTION fc.channel_payment_refusal(p_account fc.accounts, p_channel smallint,
                                                      p_channel_txn_id text, p_kept bigint,
                                                      p_amount_fen bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_exception fc.settlement_exceptions;
BEGIN
    SELECT * INTO v_exception FROM fc.settlement_exceptions
     WHERE kind = 3 AND channel = p_channel AND channel_txn_id = p_channel_txn_id;
    IF NOT FOUND THEN
        IF p_account.balance_fen <= p_account.max_balance_fen - p_kept THEN
            RETURN NULL;
        END IF;
        INSERT INTO fc.settlement_exceptions (kind, account_id, channel, channel_txn_id, amount_fen,
                                              reason, created_at)
        VALUES (3, p_account.id, p_channel, p_channel_txn_id, p_amount_fen, 'BALANCE_LIMIT_EXCEEDED',
                p_now)
        RETURNING * INTO v_exception;
    END IF;
    RETURN jsonb_build_object('decision', 'DECLINED', 'decline_reason', v_exception.reason,
                              'balance_fen', p_account.balance_fen, 'refund_payment', true,
                              'settlement_exception_id', v_exception.uid);
END $$;

-- Pays p_amount of p_account's overrun receivables out of recharge p_recharge_id, oldest
-- first: a journal entry of kind 12 from the account to RECEIVABLES per receivable paid
-- (naming its hold and the recharge), the receivables and the account's receivable_fen
-- down. A receivable paid in full closes its shortfall exception (SETTLED, as a late confirm
-- paid after all does). The caller holds the lock. Returns the account as updated.
CREATE OR REPLACE FUNCTION fc.repay_receivables(p_account fc.accounts, p_recharge_id bigint,
                                                p_amount bigint, p_now timestamptz)
RETURNS fc.accounts
LANGUAGE plpgsql AS $$
DECLARE
    v_left bigint := p_amount;
    v_pay  bigint;
    v_rec  fc.receivables;
BEGIN
    FOR v_rec IN SELECT * FROM fc.receivables WHERE account_id = p_account.id AND repaid_at IS NULL
                  ORDER BY id LOOP
        EXIT WHEN v_left = 0;
        v_pay := least(v_left, v_rec.amount_fen - v_rec.repaid_fen);
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,
                                recharge_id, created_at)
        VALUES (fc.ledger_entry_kind_overrun_receivable(), fc.asset_money(), p_account.id,
                fc.system_account('RECEIVABLES'), v_pay, v_rec.hold_id, p_recharge_id, p_now);
        UPDATE fc.receivables
           SET repaid_fen = repaid_fen + v_pay,
               repaid_at = CASE WHEN repaid_fen + v_pay = amount_fen THEN p_now END
         WHERE id = v_rec.id;
        IF v_pay = v_rec.amount_fen - v_rec.repaid_fen THEN
            UPDATE fc.settlement_exceptions SET resolved_at = p_now
             WHERE hold_id = v_rec.hold_id AND kind = 2 AND resolved_at IS NULL;
        END IF;
        v_left := v_left - v_pay;
    END LOOP;
    UPDATE fc.accounts SET balance_fen = balance_fen - (p_amount - v_left),
                           receivable_fen = receivable_fen - (p_amount - v_left)
     WHERE id = p_account.id RETURNING * INTO p_account;
    RETURN p_account;
END $$;

CREATE OR REPLACE FUNCTION fc.recharge_json(r fc.recharges) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'recharge_id', r.uid,
        'account_id', (SELECT uid FROM fc.accounts WHERE id = r.account_id),
        'channel', r.channel,
        'channel_txn_id', r.channel_txn_id,
        'amount_fen', r.amount_fen,
        'create_us', fc.ts(r.created_at));
END $$;

CREATE OR REPLACE FUNCTION fc.refund_json(f fc.refunds) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'refund_id', f.uid,
        'recharge_id', r.uid,
        'account_id', (SELECT uid FROM fc.accounts WHERE id = f.account_id),
        'channel', f.channel,
        'channel_txn_id', r.channel_txn_id,
        'channel_refund_id', f.channel_refund_id,
        'amount_fen', f.amount_fen,
        'debited_fen', f.debited_fen,
        'shortfall_fen', f.amount_fen - f.debited_fen,
        'create_us', fc.ts(f.created_at))
      FROM fc.recharges r WHERE r.id = f.recharge_id);
END $$;

-- What this refund of p_recharge is, in fen: p_amount_fen, or the rise of the channel's
-- running total p_refunded_total_fen over what is already refunded. Refuses a total already
-- covered, and a refund past what the recharge has left. The caller holds the account's lock.
CREATE OR REPLACE FUNCTION fc.refund_amount(p_recharge fc.recharges, p_amount_fen bigint,
                                            p_refunded_total_fen bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_refunded bigint;
    v_amount   bigint;
BEGIN
    SELECT coalesce(sum(amount_fen), 0) INTO v_refunded FROM fc.refunds
     WHERE recharge_id = p_recharge.id;
    IF p_refunded_total_fen > 0 THEN
        v_amount := p_refunded_total_fen - v_refunded;
        IF v_amount <= 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REFUND_ALREADY_COVERED',
                DETAIL = 'refunded_total_fen';
        END IF;
    ELSE
        v_amount := p_amount_fen;
    END IF;
    IF v_amount > p_recharge.amount_fen - v_refunded THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REFUND_EXCEEDS_RECHARGE',
            DETAIL = 'amount_fen';
    END IF;
    RETURN v_amount;
END $$;

-- The refund's money: only money still on the account is taken back, never what holds
-- reserve; the rest is a shortfall, a channel exception for someone to settle. Returns the
-- refund. The caller holds the account's lock.
CREATE OR REPLACE FUNCTION fc.book_refund(p_recharge fc.recharges, p_channel smallint,
                                          p_channel_refund_id text, p_amount bigint,
                                          p_now timestamptz)
RETURNS fc.refunds
LANGUAGE plpgsql AS $$
DECLARE
    v_account fc.accounts;
    v_refund  fc.refunds;
    v_debit   bigint;
BEGIN
    SELECT * INTO v_account FROM fc.accounts WHERE id = p_recharge.account_id;
    v_debit := least(p_amount, greatest(v_account.balance_fen - v_account.held_fen, 0));
    INSERT INTO fc.refunds (recharge_id, account_id, channel, channel_refund_id, amount_fen,
                            debited_fen, balance_after_fen, created_at)
    VALUES (p_recharge.id, v_account.id, p_channel, p_channel_refund_id, p_amount, v_debit,
            v_account.balance_fen - v_debit, p_now)
    RETURNING * INTO v_refund;
    IF v_debit > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                recharge_id, description, created_at)
        VALUES (fc.ledger_entry_kind_recharge_refund(), fc.asset_money(), v_account.id,
                fc.clearing_account(p_channel), v_debit, p_recharge.id, 'channel refund', p_now);
        UPDATE fc.accounts SET balance_fen = balance_fen - v_debit WHERE id = v_account.id;
    END IF;
    IF v_debit < p_amount THEN
        INSERT INTO fc.channel_exceptions (refund_id, account_id, channel, amount_fen, reason,
                                           created_at)
        VALUES (v_refund.id, v_account.id, p_channel, p_amount - v_debit, 'REFUND_SHORTFALL', p_now);
    END IF;
    RETURN v_refund;
END $$;

-- The channel's running total of refunds of a recharge as it stood just after refund f: what
-- a re-sent running-total notification of the same refund must name again. A different total
-- under the same channel refund id is another refund reusing the id, never a duplicate.
CREATE OR REPLACE FUNCTION fc.refunded_total_at(f fc.refunds) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT sum(amount_fen) FROM fc.refunds WHERE recharge_id = f.recharge_id AND id <= f.id
$$;

-- RefundRecharge: one round trip. p_amount_fen (this refund) or
-- p_refunded_total_fen (the channel's running total; this refund is the
-- difference from what is already refunded, worked out under the lock).
-- Steps: the amount (fc.refund_amount), the money (fc.book_refund).
CREATE OR REPLACE FUNCTION fc.refund_recharge(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_channel smallint, p_channel_txn_id text, p_channel_refund_id text,
    p_amount_fen bigint, p_refunded_total_fen bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_recharge fc.recharges;
    v_refund   fc.refunds;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_recharge FROM fc.recharges
     WHERE channel = p_channel AND channel_txn_id = p_channel_txn_id;
    IF NOT FOUND THEN
        -- Also a refund notified before its payment: the adapter asks the
        -- channel to notify again later.
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'RECHARGE_NOT_FOUND',
            DETAIL = 'recharge';
    END IF;
    PERFORM fc.lock_chain(v_recharge.account_id);

    -- The channel may notify the same refund again under a new request_id.
    SELECT * INTO v_refund FROM fc.refunds
     WHERE channel = p_channel AND channel_refund_id = p_channel_refund_id;
    IF FOUND THEN
        IF v_refund.recharge_id <> v_recharge.id
           OR (p_amount_fen > 0 AND v_refund.amount_fen <> p_amount_fen)
           OR (p_refunded_total_fen > 0
               AND fc.refunded_total_at(v_refund) <> p_refunded_total_fen) THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CHANNEL_REFUND_REUSED',
                DETAIL = 'channel_refund_id';
        END IF;
        v_response := jsonb_build_object('refund', fc.refund_json(v_refund),
                                         'balance_fen', v_refund.balance_after_fen);
        RETURN fc.remember(p_caller, p_request_id, 'refund_recharge', p_request_hash,
                           v_response, p_now) || '{"replayed": true}';
    END IF;

    -- Holds past their expiry still count in the held money until the sweeper gets to them:
    -- release them under the lock before deciding what the account can give back.
    PERFORM fc.release_expired_locked(v_recharge.account_id, p_now);
    v_refund := fc.book_refund(v_recharge, p_channel, p_channel_refund_id,
                               fc.refund_amount(v_recharge, p_amount_fen, p_refunded_total_fen),
                               p_now);
    v_response := jsonb_build_object('refund', fc.refund_json(v_refund),
                                     'balance_fen', v_refund.balance_after_fen);
    RETURN fc.remember(p_caller, p_request_id, 'refund_recharge', p_request_hash, v_response, p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.settle_recharge() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.settlement_records (channel, kind, channel_txn_id, txn_uid, amount_fen,
                                       status, occurred_at, business_date)
    VALUES (NEW.channel, fc.settlement_kind_payment(), NEW.channel_txn_id, NEW.uid, NEW.amount_fen,
            fc.settlement_status_success(), NEW.created_at,
            (NEW.created_at AT TIME ZONE fc.business_tz())::date);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER recharges_settlement_record AFTER INSERT ON fc.recharges
    FOR EACH ROW EXECUTE FUNCTION fc.settle_recharge();

CREATE OR REPLACE FUNCTION fc.settle_refund() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.settlement_records (channel, kind, channel_txn_id, txn_uid,
                                       original_channel_txn_id, amount_fen, status, occurred_at,
                                       business_date)
    SELECT NEW.channel, fc.settlement_kind_refund(), NEW.channel_refund_id, NEW.uid, r.channel_txn_id,
           NEW.amount_fen, fc.settlement_status_success(),
           NEW.created_at, (NEW.created_at AT TIME ZONE fc.business_tz())::date
      FROM fc.recharges r WHERE r.id = NEW.recharge_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER refunds_settlement_record AFTER INSERT ON fc.refunds
    FOR EACH ROW EXECUTE FUNCTION fc.settle_refund();
