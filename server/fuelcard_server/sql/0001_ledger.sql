-- 0001: accounts, cards, holds, the double-entry journal, recharges, points,
-- idempotency keys, and the server-side functions that make each mutating RPC
-- one database round trip.
--
-- Conventions
--   * Money is bigint fen (CNY); points are bigint points. Never numeric/float.
--   * Internal keys are bigint identities; clients see only the uuid `uid`.
--   * Time is always passed in by the server (p_now), never read from now():
--     the clock is injected so that expiry is testable without sleeping.
--   * Errors that map to a gRPC status are raised with SQLSTATE class 'FC':
--       FCNF0 -> NOT_FOUND, FCFP0 -> FAILED_PRECONDITION, FCIA0 -> INVALID_ARGUMENT
--     MESSAGE is the ErrorInfo reason (UPPER_SNAKE); DETAIL names the field.
--   * Lock order: a function takes advisory locks on accounts in ascending
--     accounts.id order and holds them to the end of its transaction
--     (pg_advisory_xact_lock). Advisory lock keys >= 1 are account ids; keys
--     <= 0 are reserved for jobs (see fuelcard_server/locks.py).

CREATE SCHEMA fc;

-- Account kinds: 1 personal, 2 corporate, 3 family (AccountType in the proto),
-- 100 system account (the other side of every customer movement).
CREATE TABLE fc.accounts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid             uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    kind            smallint    NOT NULL CHECK (kind IN (1, 2, 3, 100)),
    status          smallint    NOT NULL DEFAULT 1 CHECK (status IN (1, 2)),
    system_code     text        UNIQUE,
    tier            smallint    NOT NULL DEFAULT 1 CHECK (tier BETWEEN 1 AND 4),
    -- Denormalised from the journal for customer accounts (verify checks it).
    -- System accounts keep 0 here: they are credited by every sale, and a
    -- stored balance would make one row the hottest lock in the database.
    balance_fen     bigint      NOT NULL DEFAULT 0,
    held_fen        bigint      NOT NULL DEFAULT 0,
    points_balance  bigint      NOT NULL DEFAULT 0,
    max_balance_fen bigint      NOT NULL DEFAULT 9223372036854775807 CHECK (max_balance_fen > 0),
    created_at      timestamptz NOT NULL,
    CONSTRAINT system_accounts_have_code CHECK ((kind = 100) = (system_code IS NOT NULL)),
    -- Money can never be spent twice: holds never exceed the balance.
    CONSTRAINT held_within_balance CHECK (held_fen >= 0 AND balance_fen >= held_fen),
    CONSTRAINT points_not_negative CHECK (points_balance >= 0),
    CONSTRAINT system_balances_not_stored
        CHECK (kind <> 100 OR (balance_fen = 0 AND held_fen = 0 AND points_balance = 0))
);

-- Personal data lives apart from the money so that it can be protected (and
-- audited) on its own.
CREATE TABLE fc.account_holders (
    account_id bigint PRIMARY KEY REFERENCES fc.accounts (id),
    name       text NOT NULL,
    phone      text NOT NULL DEFAULT '',
    id_number  text NOT NULL DEFAULT ''
);

-- The system accounts every movement balances against.
INSERT INTO fc.accounts (kind, system_code, created_at) VALUES
    (100, 'FUEL_SALES', now()),               -- revenue from confirmed sales
    (100, 'CHANNEL_CLEARING_BANK_CARD', now()),
    (100, 'CHANNEL_CLEARING_WECHAT_PAY', now()),
    (100, 'CHANNEL_CLEARING_ALIPAY', now()),
    (100, 'CHANNEL_CLEARING_ECNY', now()),
    (100, 'CHANNEL_CLEARING_COUNTER', now()),
    (100, 'POINTS_ISSUED', now()),            -- source of earned points
    (100, 'POINTS_REDEEMED', now());          -- sink of redeemed points

CREATE TABLE fc.cards (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid        uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    account_id bigint      NOT NULL REFERENCES fc.accounts (id),
    -- Keyed hash (HMAC-SM3) of the card number: the only way to find a card
    -- by its number. The number itself is not stored here.
    pan_index  bytea       NOT NULL UNIQUE,
    masked     text        NOT NULL,
    status     smallint    NOT NULL DEFAULT 1 CHECK (status IN (1, 2, 3)),
    created_at timestamptz NOT NULL
);
CREATE INDEX cards_account ON fc.cards (account_id);

-- Hold states: 1 AUTHORIZED, 2 CONFIRMED, 3 CANCELLED, 4 EXPIRED.
CREATE TABLE fc.holds (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid            uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    account_id     bigint      NOT NULL REFERENCES fc.accounts (id),
    card_id        bigint      NOT NULL REFERENCES fc.cards (id),
    state          smallint    NOT NULL CHECK (state IN (1, 2, 3, 4)),
    amount_fen     bigint      NOT NULL CHECK (amount_fen > 0),
    settled_fen    bigint      NOT NULL DEFAULT 0,
    station_id     text        NOT NULL,
    terminal_id    text        NOT NULL,
    nozzle         integer     NOT NULL,
    product        smallint    NOT NULL,
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    closed_at      timestamptz,
    volume_ml      bigint      NOT NULL DEFAULT 0,
    unit_price_fen bigint      NOT NULL DEFAULT 0,
    points_earned  bigint      NOT NULL DEFAULT 0,
    confirmed_late boolean     NOT NULL DEFAULT false,
    CONSTRAINT open_iff_authorized CHECK ((state = 1) = (closed_at IS NULL)),
    CONSTRAINT settled_only_when_confirmed
        CHECK (settled_fen BETWEEN 0 AND amount_fen AND (state = 2 OR settled_fen = 0)),
    CONSTRAINT confirmed_settles_something CHECK (state <> 2 OR settled_fen > 0)
);
CREATE INDEX holds_expiring ON fc.holds (expires_at) WHERE state = 1;
CREATE INDEX holds_by_account ON fc.holds (account_id, id DESC);

-- The hold state machine, written down once: any other transition is a bug.
CREATE FUNCTION fc.check_hold_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state <> OLD.state AND NOT (
           (OLD.state = 1 AND NEW.state IN (2, 3, 4))   -- confirm, cancel, expire
        OR (OLD.state = 4 AND NEW.state = 2)            -- late confirm
    ) THEN
        RAISE EXCEPTION 'illegal hold transition % -> % for hold %', OLD.state, NEW.state, OLD.id;
    END IF;
    IF NEW.amount_fen <> OLD.amount_fen OR NEW.account_id <> OLD.account_id THEN
        RAISE EXCEPTION 'hold % amount and account are immutable', OLD.id;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER holds_state_machine BEFORE UPDATE ON fc.holds
    FOR EACH ROW EXECUTE FUNCTION fc.check_hold_transition();

-- Channels: 1 bank card, 2 WeChat Pay, 3 Alipay, 4 e-CNY, 5 counter.
CREATE TABLE fc.recharges (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid            uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    account_id     bigint      NOT NULL REFERENCES fc.accounts (id),
    channel        smallint    NOT NULL CHECK (channel BETWEEN 1 AND 5),
    channel_txn_id text        NOT NULL,
    amount_fen     bigint      NOT NULL CHECK (amount_fen > 0),
    -- the account's balance just after the credit: what a duplicate
    -- notification of the same payment is answered with
    balance_after_fen bigint   NOT NULL,
    created_at     timestamptz NOT NULL,
    CONSTRAINT one_recharge_per_channel_txn UNIQUE (channel, channel_txn_id)
);

-- The journal. Each row is one balanced transfer: `amount` leaves the debit
-- account and reaches the credit account, so every entry balances by
-- construction and the sum of all balances is zero. A movement with several
-- legs (a sale that also earns points) is several rows in one transaction.
-- An account's balance is sum(credits) - sum(debits) of its rows.
--
-- Assets: 1 money (fen), 2 points.
-- Kinds:  1 recharge, 2 purchase, 3 points earned, 4 points redeemed.
--
-- No foreign keys here on purpose: a FOR KEY SHARE lock on the FUEL_SALES row
-- from every concurrent confirm would turn that row into a multixact hot spot.
-- `fuelcard verify` checks the references instead.
CREATE TABLE fc.journal (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              smallint    NOT NULL CHECK (kind BETWEEN 1 AND 4),
    asset             smallint    NOT NULL CHECK (asset IN (1, 2)),
    debit_account_id  bigint      NOT NULL,
    credit_account_id bigint      NOT NULL,
    amount            bigint      NOT NULL CHECK (amount > 0),
    hold_id           bigint,
    recharge_id       bigint,
    description       text        NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL,
    CONSTRAINT two_sided CHECK (debit_account_id <> credit_account_id)
);
CREATE INDEX journal_by_debit ON fc.journal (debit_account_id, id DESC);
CREATE INDEX journal_by_credit ON fc.journal (credit_account_id, id DESC);

-- Entries are immutable: a correction is a new entry, never an edit.
CREATE FUNCTION fc.refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused)', TG_TABLE_NAME, TG_OP;
END $$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON fc.journal
    FOR EACH ROW EXECUTE FUNCTION fc.refuse_change();
CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON fc.journal
    FOR EACH STATEMENT EXECUTE FUNCTION fc.refuse_change();

-- A confirm that arrived after its hold expired, when the money was gone:
-- the fuel was delivered but not paid from the card. One per hold.
CREATE TABLE fc.settlement_exceptions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid         uuid        NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    hold_id     bigint      NOT NULL UNIQUE REFERENCES fc.holds (id),
    account_id  bigint      NOT NULL REFERENCES fc.accounts (id),
    amount_fen  bigint      NOT NULL CHECK (amount_fen > 0),
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL,
    resolved_at timestamptz
);

-- Idempotency (AIP-155): the first response to (caller, request_id) is kept
-- with a fingerprint of the request it answered.
CREATE TABLE fc.idempotency_keys (
    caller       text        NOT NULL,
    request_id   text        NOT NULL,
    operation    text        NOT NULL,
    request_hash bytea       NOT NULL,
    response     jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (caller, request_id)
);
CREATE INDEX idempotency_keys_age ON fc.idempotency_keys (created_at);

------------------------------------------------------------------------------
-- Helpers
------------------------------------------------------------------------------

CREATE FUNCTION fc.system_account(p_code text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT id FROM fc.accounts WHERE system_code = p_code
$$;

-- The earning rule: one point per whole yuan of the settled amount. Tier
-- multipliers are applied on top by the controls (see later migrations).
CREATE FUNCTION fc.points_for(p_amount_fen bigint, p_tier smallint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_amount_fen / 100
$$;

CREATE FUNCTION fc.ts(p timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    -- microseconds since the epoch: exact, and cheap to turn into a Timestamp
    SELECT CASE WHEN p IS NULL THEN NULL
                ELSE (extract(epoch FROM p) * 1000000)::bigint END
$$;

CREATE FUNCTION fc.hold_json(h fc.holds) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
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
    FROM fc.cards c WHERE c.id = h.card_id
$$;

-- Returns the stored response of a replayed request, or raises
-- REQUEST_ID_REUSED when the same key came with a different request.
CREATE FUNCTION fc.replay(p_caller text, p_request_id text, p_request_hash bytea) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_hash bytea;
    v_response jsonb;
BEGIN
    SELECT request_hash, response INTO v_hash, v_response
      FROM fc.idempotency_keys WHERE caller = p_caller AND request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_hash <> p_request_hash THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REQUEST_ID_REUSED',
            DETAIL = 'request_id';
    END IF;
    RETURN v_response || '{"replayed": true}';
END $$;

CREATE FUNCTION fc.remember(p_caller text, p_request_id text, p_operation text,
                            p_request_hash bytea, p_response jsonb, p_now timestamptz)
RETURNS jsonb
LANGUAGE sql AS $$
    -- A concurrent duplicate that got this far fails here on the primary key;
    -- its transaction rolls back and the server retries it as a replay.
    INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response, created_at)
    VALUES (p_caller, p_request_id, p_operation, p_request_hash, p_response, p_now)
    RETURNING response
$$;

-- Releases the account's holds that expired by p_now. The caller holds the
-- account's advisory lock.
CREATE FUNCTION fc.release_expired_locked(p_account_id bigint, p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count    integer;
    v_released bigint;
BEGIN
    WITH expired AS (
        UPDATE fc.holds SET state = 4, closed_at = p_now
         WHERE account_id = p_account_id AND state = 1 AND expires_at <= p_now
        RETURNING amount_fen
    )
    SELECT count(*), coalesce(sum(amount_fen), 0) INTO v_count, v_released FROM expired;
    IF v_released > 0 THEN
        UPDATE fc.accounts SET held_fen = held_fen - v_released WHERE id = p_account_id;
    END IF;
    RETURN v_count;
END $$;

------------------------------------------------------------------------------
-- Authorize (Try): reserve money on the card's account.
------------------------------------------------------------------------------
CREATE FUNCTION fc.authorize(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_pan_index bytea, p_amount_fen bigint,
    p_station_id text, p_terminal_id text, p_nozzle integer, p_product smallint,
    p_now timestamptz, p_ttl interval)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_card     fc.cards;
    v_account  fc.accounts;
    v_hold     fc.holds;
    v_reason   text;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;

    SELECT * INTO v_card FROM fc.cards WHERE pan_index = p_pan_index;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_number';
    END IF;

    -- Serialise every reservation on this account. Held until commit, which
    -- is the end of this one statement: microseconds, not the whole RPC.
    PERFORM pg_advisory_xact_lock(v_card.account_id);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_card.account_id;

    IF v_card.status = 2 THEN
        v_reason := 'CARD_BLOCKED';
    ELSIF v_card.status = 3 THEN
        v_reason := 'CARD_CLOSED';
    ELSIF v_account.status <> 1 THEN
        v_reason := 'ACCOUNT_FROZEN';
    ELSIF v_account.balance_fen - v_account.held_fen < p_amount_fen THEN
        -- Holds past their expiry still count until the sweeper gets to
        -- them; release this account's now, then look again.
        IF fc.release_expired_locked(v_account.id, p_now) > 0 THEN
            SELECT * INTO v_account FROM fc.accounts WHERE id = v_card.account_id;
        END IF;
        IF v_account.balance_fen - v_account.held_fen < p_amount_fen THEN
            v_reason := 'INSUFFICIENT_FUNDS';
        END IF;
    END IF;

    IF v_reason IS NOT NULL THEN
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', v_reason,
            'available_fen', v_account.balance_fen - v_account.held_fen);
    ELSE
        INSERT INTO fc.holds (account_id, card_id, state, amount_fen, station_id, terminal_id,
                              nozzle, product, created_at, expires_at)
        VALUES (v_account.id, v_card.id, 1, p_amount_fen, p_station_id, p_terminal_id,
                p_nozzle, p_product, p_now, p_now + p_ttl)
        RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen + p_amount_fen WHERE id = v_account.id;
        v_response := jsonb_build_object(
            'decision', 'APPROVED',
            'hold', fc.hold_json(v_hold),
            'available_fen', v_account.balance_fen - v_account.held_fen - p_amount_fen);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'authorize', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Confirm: settle the delivered amount, release the rest, earn points.
------------------------------------------------------------------------------
CREATE FUNCTION fc.confirm(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_hold_uid uuid, p_final_fen bigint, p_volume_ml bigint, p_unit_price_fen bigint,
    p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_account_id bigint;
    v_hold       fc.holds;
    v_account    fc.accounts;
    v_points     bigint := 0;
    v_late       boolean;
    v_exception  uuid;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;

    SELECT account_id INTO v_account_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    PERFORM pg_advisory_xact_lock(v_account_id);
    -- A concurrent duplicate of this very request may have settled the hold
    -- while we waited for the lock: answer as it did, not HOLD_ALREADY_CONFIRMED.
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    -- Re-read under the lock: the sweeper or a racing confirm may have moved it.
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account_id;

    IF v_hold.state = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    ELSIF v_hold.state = 3 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_CANCELLED', DETAIL = 'hold_id';
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
            UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_account_id
            RETURNING * INTO v_account;
        END IF;
        v_response := jsonb_build_object('decision', 'APPROVED', 'hold', fc.hold_json(v_hold),
                                         'points_earned', 0, 'balance_fen', v_account.balance_fen);
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
    END IF;

    v_late := v_hold.state = 4 OR v_hold.expires_at <= p_now;
    IF v_hold.state = 4
       AND v_account.balance_fen - v_account.held_fen < p_final_fen THEN
        -- Expired, released, and the money has been spent since: the fuel is
        -- gone but cannot be paid from the card. Record it for reconciliation.
        INSERT INTO fc.settlement_exceptions (hold_id, account_id, amount_fen, reason, created_at)
        VALUES (v_hold.id, v_account_id, p_final_fen, 'HOLD_EXPIRED_INSUFFICIENT_FUNDS', p_now)
        ON CONFLICT (hold_id) DO NOTHING;
        SELECT uid INTO v_exception FROM fc.settlement_exceptions WHERE hold_id = v_hold.id;
        v_response := jsonb_build_object(
            'decision', 'DECLINED', 'decline_reason', 'HOLD_EXPIRED',
            'hold', fc.hold_json(v_hold), 'points_earned', 0,
            'balance_fen', v_account.balance_fen, 'settlement_exception_id', v_exception);
        RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
    END IF;

    v_points := fc.points_for(p_final_fen, v_account.tier);
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
    VALUES (2, 1, v_account_id, fc.system_account('FUEL_SALES'), p_final_fen, v_hold.id, p_now);
    IF v_points > 0 THEN
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id, created_at)
        VALUES (3, 2, fc.system_account('POINTS_ISSUED'), v_account_id, v_points, v_hold.id, p_now);
    END IF;
    UPDATE fc.accounts
       SET balance_fen = balance_fen - p_final_fen,
           -- an expired hold no longer counts in held_fen
           held_fen = held_fen - CASE WHEN v_hold.state = 1 THEN v_hold.amount_fen ELSE 0 END,
           points_balance = points_balance + v_points
     WHERE id = v_account_id
    RETURNING * INTO v_account;
    UPDATE fc.holds
       SET state = 2, settled_fen = p_final_fen, closed_at = coalesce(closed_at, p_now),
           volume_ml = p_volume_ml, unit_price_fen = p_unit_price_fen,
           points_earned = v_points, confirmed_late = v_late
     WHERE id = v_hold.id
    RETURNING * INTO v_hold;

    v_response := jsonb_build_object('decision', 'APPROVED', 'hold', fc.hold_json(v_hold),
                                     'points_earned', v_points, 'balance_fen', v_account.balance_fen);
    RETURN fc.remember(p_caller, p_request_id, 'confirm', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Cancel: release the hold.
------------------------------------------------------------------------------
CREATE FUNCTION fc.cancel(
    p_caller text, p_request_id text, p_request_hash bytea, p_hold_uid uuid, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response   jsonb;
    v_account_id bigint;
    v_hold       fc.holds;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT account_id INTO v_account_id FROM fc.holds WHERE uid = p_hold_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'HOLD_NOT_FOUND', DETAIL = 'hold_id';
    END IF;
    PERFORM pg_advisory_xact_lock(v_account_id);
    SELECT * INTO v_hold FROM fc.holds WHERE uid = p_hold_uid;
    IF v_hold.state = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED', DETAIL = 'hold_id';
    END IF;
    IF v_hold.state = 1 THEN
        UPDATE fc.holds SET state = 3, closed_at = p_now WHERE id = v_hold.id RETURNING * INTO v_hold;
        UPDATE fc.accounts SET held_fen = held_fen - v_hold.amount_fen WHERE id = v_account_id;
    END IF;
    -- Already cancelled or expired: the money is free; nothing to do.
    v_response := jsonb_build_object('hold', fc.hold_json(v_hold));
    RETURN fc.remember(p_caller, p_request_id, 'cancel', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Expiry sweep: release holds nobody settled in time. Batched, so one call
-- holds a bounded number of account locks; returns how many it released.
------------------------------------------------------------------------------
CREATE FUNCTION fc.expire_holds(p_now timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_account_id bigint;
    v_count      integer := 0;
BEGIN
    -- Ascending account id: the documented lock order.
    FOR v_account_id IN
        SELECT DISTINCT account_id FROM (
            SELECT account_id FROM fc.holds
             WHERE state = 1 AND expires_at <= p_now
             ORDER BY expires_at LIMIT p_limit) due
        ORDER BY account_id
    LOOP
        PERFORM pg_advisory_xact_lock(v_account_id);
        v_count := v_count + fc.release_expired_locked(v_account_id, p_now);
    END LOOP;
    RETURN v_count;
END $$;

------------------------------------------------------------------------------
-- Recharge: credit an account with money a channel collected.
------------------------------------------------------------------------------
CREATE FUNCTION fc.recharge_json(r fc.recharges) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'recharge_id', r.uid,
        'account_id', (SELECT uid FROM fc.accounts WHERE id = r.account_id),
        'channel', r.channel,
        'channel_txn_id', r.channel_txn_id,
        'amount_fen', r.amount_fen,
        'create_us', fc.ts(r.created_at))
$$;

CREATE FUNCTION fc.recharge(
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
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
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

    PERFORM pg_advisory_xact_lock(v_account.id);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account.id;
    IF v_account.balance_fen > v_account.max_balance_fen - p_amount_fen THEN
        v_response := jsonb_build_object('decision', 'DECLINED',
            'decline_reason', 'BALANCE_LIMIT_EXCEEDED', 'balance_fen', v_account.balance_fen);
        RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now);
    END IF;

    v_clearing := 'CHANNEL_CLEARING_' || (ARRAY['BANK_CARD', 'WECHAT_PAY', 'ALIPAY', 'ECNY', 'COUNTER'])[p_channel];
    INSERT INTO fc.recharges (account_id, channel, channel_txn_id, amount_fen, balance_after_fen,
                              created_at)
    VALUES (v_account.id, p_channel, p_channel_txn_id, p_amount_fen,
            v_account.balance_fen + p_amount_fen, p_now)
    RETURNING * INTO v_recharge;
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, recharge_id, created_at)
    VALUES (1, 1, fc.system_account(v_clearing), v_account.id, p_amount_fen, v_recharge.id, p_now);
    UPDATE fc.accounts SET balance_fen = balance_fen + p_amount_fen WHERE id = v_account.id
    RETURNING * INTO v_account;

    v_response := jsonb_build_object('decision', 'APPROVED',
        'recharge', fc.recharge_json(v_recharge), 'balance_fen', v_account.balance_fen);
    RETURN fc.remember(p_caller, p_request_id, 'recharge', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Points redemption.
------------------------------------------------------------------------------
CREATE FUNCTION fc.redeem_points(
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
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    PERFORM pg_advisory_xact_lock(v_account.id);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_account.id;

    IF v_account.status <> 1 THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'ACCOUNT_FROZEN',
                                         'points_balance', v_account.points_balance);
    ELSIF v_account.points_balance < p_points THEN
        v_response := jsonb_build_object('decision', 'DECLINED', 'decline_reason', 'INSUFFICIENT_POINTS',
                                         'points_balance', v_account.points_balance);
    ELSE
        INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, description, created_at)
        VALUES (4, 2, v_account.id, fc.system_account('POINTS_REDEEMED'), p_points, p_description, p_now)
        RETURNING * INTO v_entry;
        UPDATE fc.accounts SET points_balance = points_balance - p_points WHERE id = v_account.id
        RETURNING * INTO v_account;
        v_response := jsonb_build_object('decision', 'APPROVED',
            'entry', jsonb_build_object('entry_id', v_entry.id::text, 'kind', 4,
                                        'points', -p_points, 'description', p_description,
                                        'create_us', fc.ts(p_now)),
            'points_balance', v_account.points_balance);
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'redeem_points', p_request_hash, v_response, p_now);
END $$;

------------------------------------------------------------------------------
-- Account administration.
------------------------------------------------------------------------------
CREATE FUNCTION fc.account_json(a fc.accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'account_id', a.uid, 'type', a.kind, 'status', a.status, 'tier', a.tier,
        'balance_fen', a.balance_fen, 'held_fen', a.held_fen,
        'points_balance', a.points_balance, 'create_us', fc.ts(a.created_at),
        'holder_name', h.name, 'holder_phone', h.phone, 'holder_id_number', h.id_number)
    FROM fc.account_holders h WHERE h.account_id = a.id
$$;

CREATE FUNCTION fc.card_json(c fc.cards) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'card_id', c.uid, 'account_id', (SELECT uid FROM fc.accounts WHERE id = c.account_id),
        'masked_card_number', c.masked, 'status', c.status, 'create_us', fc.ts(c.created_at))
$$;

CREATE FUNCTION fc.open_account(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_kind smallint, p_name text, p_phone text, p_id_number text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    INSERT INTO fc.accounts (kind, created_at) VALUES (p_kind, p_now) RETURNING * INTO v_account;
    INSERT INTO fc.account_holders (account_id, name, phone, id_number)
    VALUES (v_account.id, p_name, p_phone, p_id_number);
    -- The stored response keeps only the account id: personal data is not
    -- copied into the idempotency table; the server re-reads it on replay.
    RETURN fc.remember(p_caller, p_request_id, 'open_account', p_request_hash,
                       jsonb_build_object('account_id', v_account.uid), p_now);
END $$;

CREATE FUNCTION fc.issue_card(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_account_uid uuid, p_pan_index bytea, p_masked text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_card     fc.cards;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    IF EXISTS (SELECT 1 FROM fc.cards WHERE pan_index = p_pan_index) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CARD_NUMBER_IN_USE', DETAIL = 'card_number';
    END IF;
    INSERT INTO fc.cards (account_id, pan_index, masked, created_at)
    VALUES (v_account.id, p_pan_index, p_masked, p_now) RETURNING * INTO v_card;
    RETURN fc.remember(p_caller, p_request_id, 'issue_card', p_request_hash,
                       jsonb_build_object('card', fc.card_json(v_card)), p_now);
END $$;

CREATE FUNCTION fc.update_card_status(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_card_uid uuid, p_status smallint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_card     fc.cards;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_card FROM fc.cards WHERE uid = p_card_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_id';
    END IF;
    -- Same lock as authorize: a block takes effect between two reservations,
    -- never in the middle of one.
    PERFORM pg_advisory_xact_lock(v_card.account_id);
    SELECT * INTO v_card FROM fc.cards WHERE uid = p_card_uid;
    IF v_card.status = 3 AND p_status <> 3 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CARD_CLOSED', DETAIL = 'card_id';
    END IF;
    UPDATE fc.cards SET status = p_status WHERE id = v_card.id RETURNING * INTO v_card;
    RETURN fc.remember(p_caller, p_request_id, 'update_card_status', p_request_hash,
                       jsonb_build_object('card', fc.card_json(v_card)), p_now);
END $$;
