-- 0006: step-up verification (多因素认证) for high-risk operations, admin PIN
-- resets, and card numbers stored in segments that live apart (分段存储).

------------------------------------------------------------------------------
-- Step-up challenges
------------------------------------------------------------------------------

-- One one-time code per challenge. Only a keyed hash of the code is stored
-- (HMAC-SM3 under a key derived from the root key, over the challenge id and
-- the code): the database alone does not allow a search of the code space.
-- A challenge is bound to the caller that asked for it and to one operation
-- (kind, subject, amount); it is spent by a correct code (consumed_*), by
-- running out of attempts, or by time.
CREATE TABLE fc.step_up_challenges (
    uid             uuid        PRIMARY KEY,
    caller          text        NOT NULL,
    request_id      text        NOT NULL,
    -- StepUpKind: 1 recharge, 2 PIN reset, 3 limit raise, 4 reveal card number, 5 anomaly
    kind            smallint    NOT NULL CHECK (kind BETWEEN 1 AND 5),
    subject         uuid        NOT NULL,
    amount_fen      bigint      NOT NULL CHECK (amount_fen >= 0),
    code_hash       bytea       NOT NULL CHECK (octet_length(code_hash) = 32),
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    attempts        smallint    NOT NULL DEFAULT 0,
    max_attempts    smallint    NOT NULL CHECK (max_attempts >= 1),
    -- the operation that used it: (caller, request_id); a retry of that very
    -- operation passes again, any other use is refused
    consumed_at     timestamptz,
    consumed_request_id text,
    CONSTRAINT step_up_one_per_request UNIQUE (caller, request_id),
    CONSTRAINT step_up_attempts_bounded CHECK (attempts BETWEEN 0 AND max_attempts),
    CONSTRAINT step_up_consumed_whole CHECK ((consumed_at IS NULL) = (consumed_request_id IS NULL))
);
CREATE INDEX step_up_challenges_subject ON fc.step_up_challenges (subject, created_at);

-- The account a step-up subject belongs to (an account uid, or a card uid).
CREATE FUNCTION fc.step_up_account(p_subject uuid) RETURNS fc.accounts
LANGUAGE sql STABLE AS $$
    SELECT a FROM fc.accounts a
     WHERE a.kind <> 100
       AND (a.uid = p_subject OR a.id = (SELECT c.account_id FROM fc.cards c WHERE c.uid = p_subject))
     LIMIT 1
$$;

-- Records a new challenge and returns where to send its code: the phone of
-- the subject's holder (or of the parent account's holder, for a sub-account
-- without one). A retry of the same request returns the same challenge with
-- "created": false (no second code is sent). At most p_max_open challenges
-- per subject are made within p_window, so codes cannot be farmed.
CREATE FUNCTION fc.create_step_up(
    p_caller text, p_request_id text, p_uid uuid, p_kind smallint, p_subject uuid,
    p_amount bigint, p_code_hash bytea, p_expires timestamptz, p_max_attempts smallint,
    p_max_open integer, p_window interval, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_old     fc.step_up_challenges;
    v_account fc.accounts;
    v_phone   text;
BEGIN
    v_account := fc.step_up_account(p_subject);
    IF v_account.id IS NULL OR (p_kind IN (2, 4, 5)
                                AND NOT EXISTS (SELECT 1 FROM fc.cards WHERE uid = p_subject)) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'SUBJECT_NOT_FOUND', DETAIL = 'subject_id';
    END IF;
    SELECT nullif(h.phone, '') INTO v_phone FROM fc.account_holders h WHERE h.account_id = v_account.id;
    IF v_phone IS NULL AND v_account.parent_id IS NOT NULL THEN
        SELECT nullif(h.phone, '') INTO v_phone FROM fc.account_holders h
         WHERE h.account_id = v_account.parent_id;
    END IF;
    IF v_phone IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'NO_PHONE_ON_FILE', DETAIL = 'subject_id';
    END IF;
    -- One subject's challenges are made and counted under its account's lock
    -- (a concurrent duplicate then finds the first one's row).
    PERFORM pg_advisory_xact_lock(v_account.id);
    SELECT * INTO v_old FROM fc.step_up_challenges
     WHERE caller = p_caller AND request_id = p_request_id;
    IF FOUND THEN
        IF (v_old.kind, v_old.subject, v_old.amount_fen) <> (p_kind, p_subject, p_amount) THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REQUEST_ID_REUSED',
                DETAIL = 'request_id';
        END IF;
        RETURN jsonb_build_object('challenge_id', v_old.uid, 'expire_us', fc.ts(v_old.expires_at),
                                  'max_attempts', v_old.max_attempts, 'created', false,
                                  'phone', v_phone);
    END IF;
    IF (SELECT count(*) FROM fc.step_up_challenges
         WHERE subject = p_subject AND created_at > p_now - p_window) >= p_max_open THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'TOO_MANY_STEP_UPS', DETAIL = 'subject_id';
    END IF;
    INSERT INTO fc.step_up_challenges (uid, caller, request_id, kind, subject, amount_fen, code_hash,
                                       created_at, expires_at, max_attempts)
    VALUES (p_uid, p_caller, p_request_id, p_kind, p_subject, p_amount, p_code_hash, p_now,
            p_expires, p_max_attempts);
    RETURN jsonb_build_object('challenge_id', p_uid, 'expire_us', fc.ts(p_expires),
                              'max_attempts', p_max_attempts, 'created', true, 'phone', v_phone);
END $$;

-- The step-up gate of a high-risk operation: NULL if the operation may run,
-- else why not (STEP_UP_REQUIRED, or STEP_UP_FAILED:<cause>). Call it in the
-- same transaction as the operation, before it:
--
--   WITH s AS MATERIALIZED (SELECT fc.consume_step_up(...) AS refusal)
--   SELECT CASE WHEN s.refusal IS NULL THEN fc.<operation>(...)
--               ELSE jsonb_build_object('step_up_refusal', s.refusal) END FROM s
--
-- so the code is used if and only if the operation commits, and a wrong
-- code's attempt is counted although the operation does not run. An operation
-- p_operation (the name fc.remember stores) already answered under
-- (p_caller, p_request_id) passes (it replays its stored answer, or fails
-- REQUEST_ID_REUSED), as does a retry of the very operation that used the
-- challenge. p_operation NULL (an operation that stores no answer, e.g. a
-- read): only the latter. Other code (e.g. the risk engine, on an
-- anomaly) demands a step-up by calling this with p_required = true.
CREATE FUNCTION fc.consume_step_up(
    p_caller text, p_request_id text, p_operation text, p_required boolean, p_kind smallint, p_subject uuid,
    p_amount bigint, p_challenge uuid, p_code_hash bytea, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v fc.step_up_challenges;
BEGIN
    IF NOT p_required
       OR EXISTS (SELECT 1 FROM fc.idempotency_keys
                   WHERE caller = p_caller AND request_id = p_request_id
                     AND operation = p_operation) THEN
        RETURN NULL;
    END IF;
    IF p_challenge IS NULL THEN
        RETURN 'STEP_UP_REQUIRED';
    END IF;
    SELECT * INTO v FROM fc.step_up_challenges WHERE uid = p_challenge AND caller = p_caller
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'STEP_UP_FAILED:UNKNOWN_CHALLENGE';
    ELSIF v.consumed_at IS NOT NULL THEN
        IF v.consumed_request_id = p_request_id AND v.kind = p_kind AND v.subject = p_subject
           AND v.amount_fen = p_amount THEN
            RETURN NULL;
        END IF;
        RETURN 'STEP_UP_FAILED:USED';
    ELSIF (v.kind, v.subject, v.amount_fen) <> (p_kind, p_subject, p_amount) THEN
        RETURN 'STEP_UP_FAILED:MISMATCH';
    ELSIF p_now >= v.expires_at THEN
        RETURN 'STEP_UP_FAILED:EXPIRED';
    ELSIF v.attempts >= v.max_attempts THEN
        RETURN 'STEP_UP_FAILED:ATTEMPTS_EXHAUSTED';
    ELSIF v.code_hash <> p_code_hash THEN
        UPDATE fc.step_up_challenges SET attempts = attempts + 1 WHERE uid = v.uid;
        RETURN 'STEP_UP_FAILED:WRONG_CODE';
    END IF;
    UPDATE fc.step_up_challenges SET consumed_at = p_now, consumed_request_id = p_request_id
     WHERE uid = v.uid;
    RETURN NULL;
END $$;

-- Whether new caps (0: no cap) are higher than the standing ones of a card or
-- account, or remove one: a limit raise needs a step-up. False for an unknown
-- target (the operation itself answers NOT_FOUND).
CREATE FUNCTION fc.is_limit_raise(p_card_uid uuid, p_account_uid uuid, p_txn bigint,
                                  p_daily bigint, p_monthly bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    WITH old AS (
        SELECT limit_txn_fen AS t, limit_daily_fen AS d, limit_monthly_fen AS m
          FROM fc.cards WHERE p_card_uid IS NOT NULL AND uid = p_card_uid
        UNION ALL
        SELECT limit_txn_fen, limit_daily_fen, limit_monthly_fen
          FROM fc.accounts WHERE p_card_uid IS NULL AND uid = p_account_uid AND kind <> 100)
    SELECT coalesce(bool_or(
               (o.t IS NOT NULL AND (p_txn = 0 OR p_txn > o.t))
            OR (o.d IS NOT NULL AND (p_daily = 0 OR p_daily > o.d))
            OR (o.m IS NOT NULL AND (p_monthly = 0 OR p_monthly > o.m))), false)
      FROM old o
$$;

------------------------------------------------------------------------------
-- Admin PIN reset
------------------------------------------------------------------------------

-- Sets a card's new PIN hash and clears its lockout (the server decoded the
-- PIN block and hashed the PIN; the step-up gate ran before, in the same
-- transaction).
CREATE FUNCTION fc.reset_pin(p_caller text, p_request_id text, p_request_hash bytea,
                             p_card_uid uuid, p_pin_hash text, p_now timestamptz)
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
    -- the lock authorize takes: a reset lands between two reservations
    PERFORM pg_advisory_xact_lock(v_card.account_id);
    PERFORM fc.set_pin(v_card.id, p_pin_hash, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'reset_pin', p_request_hash,
                       jsonb_build_object('card_id', v_card.uid), p_now);
END $$;

------------------------------------------------------------------------------
-- Card numbers in segments (分段存储)
------------------------------------------------------------------------------
--
-- A card number is cut into three segments; each is sealed (SM4-GCM) under its
-- own key derived from the root key and kept in its own schema, owned by its
-- own NOLOGIN role and reachable only through that role's SECURITY DEFINER
-- functions. The whole number, sealed under a fourth derived key, lives in a
-- fourth schema. The root key is never in the database. Lookup stays by the
-- blind index (fc.cards.pan_index); fc.cards keeps only the masked form.
--
-- Least privilege: the role that runs the migrations (the one the server
-- connects as) is granted EXECUTE on the put/get functions only, never the
-- tables. (In development and tests it is a superuser, where this is moot.)
-- This migration needs a superuser, or a role with CREATEROLE that is a
-- member of the four roles; the roles are cluster-wide, so made only if
-- missing.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['fc_pan_seg1', 'fc_pan_seg2', 'fc_pan_seg3', 'fc_pan_vault'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END $$;

DO $$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY ARRAY['fc_pan_seg1', 'fc_pan_seg2', 'fc_pan_seg3', 'fc_pan_vault'] LOOP
        EXECUTE format('CREATE SCHEMA %I AUTHORIZATION %I', s, s);
        EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', s);
        EXECUTE format($f$
            CREATE TABLE %1$I.sealed (
                card_id     bigint      PRIMARY KEY,
                root_key_id text        NOT NULL,
                sealed      bytea       NOT NULL
            )$f$, s);
        EXECUTE format('ALTER TABLE %1$I.sealed OWNER TO %1$I', s);
        EXECUTE format($f$
            CREATE FUNCTION %1$I.put(p_card_id bigint, p_root_key_id text, p_sealed bytea)
            RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
            'INSERT INTO %1$I.sealed (card_id, root_key_id, sealed) VALUES ($1, $2, $3)
             ON CONFLICT (card_id) DO NOTHING'$f$, s);
        EXECUTE format($f$
            CREATE FUNCTION %1$I.get(p_card_id bigint, OUT root_key_id text, OUT sealed bytea)
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS
            'SELECT root_key_id, sealed FROM %1$I.sealed WHERE card_id = $1'$f$, s);
        EXECUTE format('ALTER FUNCTION %1$I.put(bigint, text, bytea) OWNER TO %1$I', s);
        EXECUTE format('ALTER FUNCTION %1$I.get(bigint) OWNER TO %1$I', s);
        EXECUTE format('REVOKE ALL ON FUNCTION %1$I.put(bigint, text, bytea) FROM PUBLIC', s);
        EXECUTE format('REVOKE ALL ON FUNCTION %1$I.get(bigint) FROM PUBLIC', s);
        -- the role running the migrations is the one the server connects as
        EXECUTE format('GRANT USAGE ON SCHEMA %1$I TO CURRENT_USER', s);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %1$I.put(bigint, text, bytea), %1$I.get(bigint)'
                       ' TO CURRENT_USER', s);
    END LOOP;
END $$;

-- After fc.issue_card in the same statement (one transaction): stores the
-- new card's sealed segments and sealed number. p_sealed holds four values:
-- segments 1-3, then the whole number. A replayed issue stores nothing.
CREATE FUNCTION fc.store_card_number(p_issued jsonb, p_pan_index bytea, p_root_key_id text,
                                     p_sealed bytea[]) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_card_id bigint;
BEGIN
    IF p_issued ? 'replayed' THEN
        RETURN p_issued;
    END IF;
    SELECT id INTO STRICT v_card_id FROM fc.cards WHERE pan_index = p_pan_index;
    PERFORM fc_pan_seg1.put(v_card_id, p_root_key_id, p_sealed[1]);
    PERFORM fc_pan_seg2.put(v_card_id, p_root_key_id, p_sealed[2]);
    PERFORM fc_pan_seg3.put(v_card_id, p_root_key_id, p_sealed[3]);
    PERFORM fc_pan_vault.put(v_card_id, p_root_key_id, p_sealed[4]);
    RETURN p_issued;
END $$;

-- A card's stored number parts for RevealCardNumber: its blind index, the
-- root key id, and the four sealed values (NULLs for a card made without
-- them, e.g. seeded by the load generator). NULL for an unknown card.
CREATE FUNCTION fc.card_number_parts(p_card_uid uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'pan_index', encode(c.pan_index, 'hex'),
        'root_key_id', (fc_pan_vault.get(c.id)).root_key_id,
        'sealed', jsonb_build_array(encode((fc_pan_seg1.get(c.id)).sealed, 'hex'),
                                    encode((fc_pan_seg2.get(c.id)).sealed, 'hex'),
                                    encode((fc_pan_seg3.get(c.id)).sealed, 'hex'),
                                    encode((fc_pan_vault.get(c.id)).sealed, 'hex')))
      FROM fc.cards c WHERE c.uid = p_card_uid
$$;
