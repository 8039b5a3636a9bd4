-- 0006 (issue 8): refunds of recharges, channel exceptions, the neutral
-- settlement record of every channel transaction, and reconciliation breaks.

------------------------------------------------------------------------------
-- Refunds: a channel reverses (part of) a recharge it reported.
------------------------------------------------------------------------------

-- Journal kind 8: recharge refund (money leaves the account for the channel's
-- clearing account; recharge_id names the recharge refunded).
ALTER TABLE fc.journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE fc.journal ADD CONSTRAINT journal_kind_check CHECK (kind BETWEEN 1 AND 8);

CREATE TABLE fc.refunds (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid               uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    recharge_id       bigint      NOT NULL REFERENCES fc.recharges (id),
    account_id        bigint      NOT NULL REFERENCES fc.accounts (id),
    channel           smallint    NOT NULL CHECK (channel BETWEEN 1 AND 5),
    channel_refund_id text        NOT NULL,
    -- what the channel paid back to the payer
    amount_fen        bigint      NOT NULL CHECK (amount_fen > 0),
    -- what of it the account still had (available: balance minus holds)
    debited_fen       bigint      NOT NULL CHECK (debited_fen BETWEEN 0 AND amount_fen),
    -- the balance just after: what a repeated notification is answered with
    balance_after_fen bigint      NOT NULL,
    created_at        timestamptz NOT NULL,
    CONSTRAINT one_refund_per_channel_refund UNIQUE (channel, channel_refund_id)
);
CREATE INDEX refunds_by_recharge ON fc.refunds (recharge_id);

-- A refund the account could not cover in full: the channel paid the payer
-- back, the money was no longer on the account. One per refund. (Apart from
-- fc.settlement_exceptions, whose rows are late pump sales: hold_id NOT NULL.)
CREATE TABLE fc.channel_exceptions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid         uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    refund_id   bigint      NOT NULL UNIQUE REFERENCES fc.refunds (id),
    account_id  bigint      NOT NULL REFERENCES fc.accounts (id),
    channel     smallint    NOT NULL CHECK (channel BETWEEN 1 AND 5),
    amount_fen  bigint      NOT NULL CHECK (amount_fen > 0),
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL,
    resolved_at timestamptz
);

CREATE FUNCTION fc.clearing_account(p_channel smallint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN fc.system_account('CHANNEL_CLEARING_' ||
        (ARRAY['BANK_CARD', 'WECHAT_PAY', 'ALIPAY', 'ECNY', 'COUNTER'])[p_channel]);
END $$;

CREATE FUNCTION fc.refund_json(f fc.refunds) RETURNS jsonb
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

-- RefundRecharge: one round trip. p_amount_fen (this refund) or
-- p_refunded_total_fen (the channel's running total; this refund is the
-- difference from what is already refunded, worked out under the lock).
CREATE FUNCTION fc.refund_recharge(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_channel smallint, p_channel_txn_id text, p_channel_refund_id text,
    p_amount_fen bigint, p_refunded_total_fen bigint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_recharge fc.recharges;
    v_refund   fc.refunds;
    v_account  fc.accounts;
    v_refunded bigint;
    v_amount   bigint;
    v_debit    bigint;
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
           OR (p_amount_fen > 0 AND v_refund.amount_fen <> p_amount_fen) THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CHANNEL_REFUND_REUSED',
                DETAIL = 'channel_refund_id';
        END IF;
        v_response := jsonb_build_object('refund', fc.refund_json(v_refund),
                                         'balance_fen', v_refund.balance_after_fen);
        RETURN fc.remember(p_caller, p_request_id, 'refund_recharge', p_request_hash,
                           v_response, p_now) || '{"replayed": true}';
    END IF;

    SELECT coalesce(sum(amount_fen), 0) INTO v_refunded FROM fc.refunds
     WHERE recharge_id = v_recharge.id;
    IF p_refunded_total_fen > 0 THEN
        v_amount := p_refunded_total_fen - v_refunded;
        IF v_amount <= 0 THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REFUND_ALREADY_COVERED',
                DETAIL = 'refunded_total_fen';
        END IF;
    ELSE
        v_amount := p_amount_fen;
    END IF;
    IF v_amount > v_recharge.amount_fen - v_refunded THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REFUND_EXCEEDS_RECHARGE',
            DETAIL = 'amount_fen';
    END IF;

    SELECT * INTO v_account FROM fc.accounts WHERE id = v_recharge.account_id;
    -- Only money still there is taken back: never what holds reserve.
    v_debit := least(v_amount, greatest(v_account.balance_fen - v_account.held_fen, 0));
    INSERT INTO fc.refunds (recharge_id, account_id, channel, channel_refund_id, amount_fen,
                            debited_fen, balance_after_fen, created_at)
    VALUES (v_recharge.id, v_account.id, p_channel, p_channel_refund_id, v_amount, v_debit,
            v_account.balance_fen - v_debit, p_now)
    RETURNING * INTO v_refund;
    IF v_debit > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                recharge_id, description, created_at)
        VALUES (8, 1, v_account.id, fc.clearing_account(p_channel), v_debit, v_recharge.id,
                'channel refund', p_now);
        UPDATE fc.accounts SET balance_fen = balance_fen - v_debit WHERE id = v_account.id;
    END IF;
    IF v_debit < v_amount THEN
        INSERT INTO fc.channel_exceptions (refund_id, account_id, channel, amount_fen, reason,
                                           created_at)
        VALUES (v_refund.id, v_account.id, p_channel, v_amount - v_debit, 'REFUND_SHORTFALL', p_now);
    END IF;
    v_response := jsonb_build_object('refund', fc.refund_json(v_refund),
                                     'balance_fen', v_refund.balance_after_fen);
    RETURN fc.remember(p_caller, p_request_id, 'refund_recharge', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- The neutral settlement record (中立的清结算协议): settlement.proto's
-- SettlementRecord, one row per channel transaction, written by triggers in
-- the transaction that moves the money.
--   kind:   1 payment (a recharge), 2 refund
--   status: 1 success, 2 failed, 3 processing
------------------------------------------------------------------------------

CREATE TABLE fc.settlement_records (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel                 smallint    NOT NULL CHECK (channel BETWEEN 1 AND 5),
    kind                    smallint    NOT NULL CHECK (kind IN (1, 2)),
    channel_txn_id          text        NOT NULL,
    txn_uid                 uuid        NOT NULL,   -- recharges.uid or refunds.uid
    original_channel_txn_id text        NOT NULL DEFAULT '',
    amount_fen              bigint      NOT NULL CHECK (amount_fen > 0),
    fee_fen                 bigint      NOT NULL DEFAULT 0,
    status                  smallint    NOT NULL CHECK (status IN (1, 2, 3)),
    occurred_at             timestamptz NOT NULL,
    business_date           date        NOT NULL,
    CONSTRAINT one_settlement_record_per_channel_txn UNIQUE (channel, kind, channel_txn_id)
);
CREATE INDEX settlement_records_by_day ON fc.settlement_records (channel, business_date);
CREATE TRIGGER settlement_records_append_only BEFORE UPDATE OR DELETE ON fc.settlement_records
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();

CREATE FUNCTION fc.settle_recharge() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.settlement_records (channel, kind, channel_txn_id, txn_uid, amount_fen,
                                       status, occurred_at, business_date)
    VALUES (NEW.channel, 1, NEW.channel_txn_id, NEW.uid, NEW.amount_fen, 1, NEW.created_at,
            (NEW.created_at AT TIME ZONE fc.business_tz())::date);
    RETURN NULL;
END $$;
CREATE TRIGGER recharges_settlement_record AFTER INSERT ON fc.recharges
    FOR EACH ROW EXECUTE FUNCTION fc.settle_recharge();

-- Recharges booked before this migration get their records too: the
-- invariant (verify: settlement_record_per_channel_txn) holds from the start
-- on an upgraded database, not only on a new one.
INSERT INTO fc.settlement_records (channel, kind, channel_txn_id, txn_uid, amount_fen, status,
                                   occurred_at, business_date)
SELECT channel, 1, channel_txn_id, uid, amount_fen, 1, created_at,
       (created_at AT TIME ZONE fc.business_tz())::date
  FROM fc.recharges ORDER BY id;

CREATE FUNCTION fc.settle_refund() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.settlement_records (channel, kind, channel_txn_id, txn_uid,
                                       original_channel_txn_id, amount_fen, status, occurred_at,
                                       business_date)
    SELECT NEW.channel, 2, NEW.channel_refund_id, NEW.uid, r.channel_txn_id, NEW.amount_fen, 1,
           NEW.created_at, (NEW.created_at AT TIME ZONE fc.business_tz())::date
      FROM fc.recharges r WHERE r.id = NEW.recharge_id;
    RETURN NULL;
END $$;
CREATE TRIGGER refunds_settlement_record AFTER INSERT ON fc.refunds
    FOR EACH ROW EXECUTE FUNCTION fc.settle_refund();

------------------------------------------------------------------------------
-- Reconciliation (对账): one run per channel file; the breaks it found.
--   break kind: 1 missing ours, 2 missing theirs, 3 amount mismatch,
--               4 status mismatch
------------------------------------------------------------------------------

CREATE TABLE fc.reconciliation_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel         smallint    NOT NULL CHECK (channel BETWEEN 1 AND 5),
    business_date   date        NOT NULL,
    file_name       text        NOT NULL,
    file_sha256     bytea       NOT NULL,
    theirs          bigint      NOT NULL,
    ours            bigint      NOT NULL,
    matched         bigint      NOT NULL,
    missing_ours    bigint      NOT NULL,
    missing_theirs  bigint      NOT NULL,
    amount_mismatch bigint      NOT NULL,
    status_mismatch bigint      NOT NULL,
    created_at      timestamptz NOT NULL
);

CREATE TABLE fc.reconciliation_breaks (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid                  uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    run_id               bigint      NOT NULL REFERENCES fc.reconciliation_runs (id),
    channel              smallint    NOT NULL,
    business_date        date        NOT NULL,
    kind                 smallint    NOT NULL CHECK (kind BETWEEN 1 AND 4),
    record_kind          smallint    NOT NULL CHECK (record_kind IN (1, 2)),
    channel_txn_id       text        NOT NULL,
    -- our record (NULL for missing ours)
    ours_txn_uid         uuid,
    ours_original        text,
    ours_amount_fen      bigint,
    ours_status          smallint,
    ours_at              timestamptz,
    ours_business_date   date,
    -- the channel's record (NULL for missing theirs)
    theirs_original      text,
    theirs_amount_fen    bigint,
    theirs_fee_fen       bigint,
    theirs_status        smallint,
    theirs_at            timestamptz,
    created_at           timestamptz NOT NULL,
    resolved_at          timestamptz,
    resolution           text,
    resolved_by          text,
    CONSTRAINT resolved_with_a_note CHECK ((resolved_at IS NULL) = (resolution IS NULL))
);
CREATE INDEX reconciliation_breaks_by_day ON fc.reconciliation_breaks (channel, business_date);
CREATE INDEX reconciliation_breaks_open ON fc.reconciliation_breaks (id DESC)
    WHERE resolved_at IS NULL;
CREATE INDEX reconciliation_breaks_by_txn ON fc.reconciliation_breaks (channel, record_kind, channel_txn_id)
    WHERE resolved_at IS NULL;

CREATE FUNCTION fc.break_json(b fc.reconciliation_breaks) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'break_id', b.uid, 'channel', b.channel, 'business_date', b.business_date::text,
        'kind', b.kind, 'record_kind', b.record_kind, 'channel_txn_id', b.channel_txn_id,
        'ours_txn_id', b.ours_txn_uid, 'ours_original', b.ours_original,
        'ours_amount_fen', b.ours_amount_fen, 'ours_status', b.ours_status,
        'ours_us', fc.ts(b.ours_at), 'ours_business_date', b.ours_business_date::text,
        'theirs_original', b.theirs_original, 'theirs_amount_fen', b.theirs_amount_fen,
        'theirs_fee_fen', b.theirs_fee_fen, 'theirs_status', b.theirs_status,
        'theirs_us', fc.ts(b.theirs_at), 'create_us', fc.ts(b.created_at),
        'resolve_us', fc.ts(b.resolved_at), 'resolution', b.resolution,
        'resolved_by', b.resolved_by);
END $$;

-- ResolveBreak: idempotent on request_id; a break resolved by another
-- request is BREAK_ALREADY_RESOLVED.
CREATE FUNCTION fc.resolve_break(p_caller text, p_request_id text, p_request_hash bytea,
                                 p_break_uid uuid, p_resolution text, p_resolved_by text,
                                 p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_break    fc.reconciliation_breaks;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_break FROM fc.reconciliation_breaks WHERE uid = p_break_uid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'BREAK_NOT_FOUND', DETAIL = 'break';
    END IF;
    IF v_break.resolved_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'BREAK_ALREADY_RESOLVED',
            DETAIL = 'break_id';
    END IF;
    UPDATE fc.reconciliation_breaks
       SET resolved_at = p_now, resolution = p_resolution, resolved_by = p_resolved_by
     WHERE id = v_break.id RETURNING * INTO v_break;
    RETURN fc.remember(p_caller, p_request_id, 'resolve_break', p_request_hash,
                       jsonb_build_object('break', fc.break_json(v_break)), p_now);
END $$;
