-- Step-up verification (one-time codes) for high-risk operations: challenges, delivery
-- bookkeeping and consumption inside the operation's own transaction.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- The account a step-up subject belongs to (an account uid, a card uid, or, for a sale
-- refund, the hold uid: the account of the card that bought the fuel).
CREATE OR REPLACE FUNCTION fc.step_up_account(p_subject uuid) RETURNS fc.accounts
LANGUAGE sql STABLE AS $$
    SELECT a FROM fc.accounts a
     WHERE a.kind <> fc.account_kind_system()
       AND (a.uid = p_subject OR a.id = (SELECT c.account_id FROM fc.cards c WHERE c.uid = p_subject)
            OR a.id = (SELECT h.spender_account_id FROM fc.holds h WHERE h.uid = p_subject))
     LIMIT 1
$$;

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
CREATE OR REPLACE FUNCTION fc.consume_step_up(
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

-- Deletes up to p_limit challenges made and expired before p_before (the
-- caller keeps p_before behind the per-subject rate limit's window and the
-- codes' lifetime, so no challenge the rate limit counts, and none that can
-- still be answered, is deleted). A consumed challenge only lets a retry of
-- the operation that used it pass again; that operation's idempotency key
-- answers such a retry for longer. Returns how many.
CREATE OR REPLACE FUNCTION fc.prune_step_ups(p_before timestamptz, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    WITH doomed AS (
        SELECT uid FROM fc.step_up_challenges
         WHERE created_at < p_before AND expires_at < p_before
         ORDER BY created_at LIMIT p_limit
           FOR UPDATE SKIP LOCKED)
    DELETE FROM fc.step_up_challenges c USING doomed d WHERE c.uid = d.uid;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END $$;

-- Where a step-up's code goes, as fc.holder_sealed_json gives a holder's phone
-- (the server opens it: holder_data.py), or NULL: nowhere on file. A limit
-- raise on a sub-account or its card (a fleet vehicle, a family secondary
-- card) is approved by whoever has authority over it - the fleet's manager
-- principal (fc.principals, its phone), else the parent account's holder (a
-- family's main-card holder), else a holder principal of the parent - and
-- never by the sub-account's own holder, the person being limited. Every
-- other step-up goes to the subject's holder, else to the parent's holder.
CREATE OR REPLACE FUNCTION fc.step_up_phone(p_account fc.accounts, p_kind smallint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_kind = fc.step_up_kind_limit_raise() AND p_account.parent_id IS NOT NULL THEN coalesce(
            fc.principal_phone(p_account.parent_id, fc.principal_kind_fleet_manager()),
            fc.holder_phone(p_account.parent_id),
            fc.principal_phone(p_account.parent_id, fc.principal_kind_holder()))
        ELSE coalesce(fc.holder_phone(p_account.id), fc.holder_phone(p_account.parent_id))
    END
$$;

-- An account holder's phone as stored (fc.holder_sealed_json), or NULL if none.
CREATE OR REPLACE FUNCTION fc.holder_phone(p_account_id bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT fc.holder_sealed_json(h => h) FROM fc.account_holders h
     WHERE h.account_id = p_account_id AND (h.phone_sealed IS NOT NULL OR h.phone_plaintext IS NOT NULL)
$$;

-- The phone of an account's first enabled principal of a kind, in the same
-- shape (principals' phones are kept as the JSON API's principals.py stores
-- them), or NULL.
CREATE OR REPLACE FUNCTION fc.principal_phone(p_account_id bigint, p_kind smallint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('holder_phone_plaintext', pr.phone) FROM fc.principals pr
     WHERE pr.account_id = p_account_id AND pr.kind = p_kind AND pr.disabled_at IS NULL
       AND pr.phone <> ''
     ORDER BY pr.id LIMIT 1
$$;

-- Records a new challenge (or renews an undelivered one) and returns where
-- to send its code (fc.step_up_phone). "created": true - send
-- the code for "challenge_id" (p_uid, whose hash p_code_hash is), then call
-- fc.step_up_sent or fc.step_up_not_sent. A retry of a delivered challenge
-- returns it with "created": false (no second code). "sending": true - another
-- call is sending this request's code (for less than p_send_timeout). At
-- most p_max_open challenges per subject, delivered or being sent, are made
-- within p_window, so codes cannot be farmed.
CREATE OR REPLACE FUNCTION fc.create_step_up(
    p_caller text, p_request_id text, p_uid uuid, p_kind smallint, p_subject uuid,
    p_amount bigint, p_code_hash bytea, p_expires timestamptz, p_max_attempts smallint,
    p_max_open integer, p_window interval, p_now timestamptz, p_send_timeout interval)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_old     fc.step_up_challenges;
    v_account fc.accounts;
    v_phone   jsonb;
BEGIN
    v_account := fc.step_up_account(p_subject);
    IF v_account.id IS NULL OR (p_kind IN (fc.step_up_kind_pin_reset(), fc.step_up_kind_reveal_card_number(),
                                           fc.step_up_kind_anomaly())
                                AND NOT EXISTS (SELECT 1 FROM fc.cards WHERE uid = p_subject)) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'SUBJECT_NOT_FOUND', DETAIL = 'subject_id';
    END IF;
    v_phone := fc.step_up_phone(v_account, p_kind);
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
        -- Delivered (or used: its code got through); or this very call run
        -- again (its link broke after the commit): the same challenge.
        IF v_old.sent_at IS NOT NULL OR v_old.consumed_at IS NOT NULL OR v_old.uid = p_uid THEN
            RETURN jsonb_build_object('challenge_id', v_old.uid, 'expire_us', fc.ts(v_old.expires_at),
                                      'max_attempts', v_old.max_attempts,
                                      'created', v_old.sent_at IS NULL AND v_old.consumed_at IS NULL,
                                      'phone', v_phone);
        END IF;
        IF v_old.sending_since > p_now - p_send_timeout THEN
            RETURN jsonb_build_object('sending', true);
        END IF;
    END IF;
    IF (SELECT count(*) FROM fc.step_up_challenges
         WHERE subject = p_subject AND created_at > p_now - p_window
           AND (sent_at IS NOT NULL OR sending_since IS NOT NULL)
           AND uid IS DISTINCT FROM v_old.uid) >= p_max_open THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'TOO_MANY_STEP_UPS', DETAIL = 'subject_id';
    END IF;
    IF v_old.uid IS NOT NULL THEN
        -- Not delivered (its send failed, or the server sending it went
        -- away): a fresh code under a fresh id.
        UPDATE fc.step_up_challenges
           SET uid = p_uid, code_hash = p_code_hash, created_at = p_now, expires_at = p_expires,
               attempts = 0, max_attempts = p_max_attempts, sending_since = p_now
         WHERE uid = v_old.uid;
    ELSE
        INSERT INTO fc.step_up_challenges (uid, caller, request_id, kind, subject, amount_fen,
                                           code_hash, created_at, expires_at, max_attempts,
                                           sending_since)
        VALUES (p_uid, p_caller, p_request_id, p_kind, p_subject, p_amount, p_code_hash, p_now,
                p_expires, p_max_attempts, p_now);
    END IF;
    RETURN jsonb_build_object('challenge_id', p_uid, 'expire_us', fc.ts(p_expires),
                              'max_attempts', p_max_attempts, 'created', true, 'phone', v_phone);
END $$;

-- The OtpSender took the code of challenge p_uid: it is delivered. False if
-- the challenge is no longer that code's (renewed by a retry after this
-- send was taken for dead): the caller must not answer OK.
CREATE OR REPLACE FUNCTION fc.step_up_sent(p_uid uuid, p_now timestamptz) RETURNS boolean
LANGUAGE sql AS $$
    WITH done AS (
        UPDATE fc.step_up_challenges SET sent_at = coalesce(sent_at, p_now), sending_since = NULL
         WHERE uid = p_uid RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM done)
$$;

-- The send of challenge p_uid's code failed: a retry of its request sends a
-- fresh code at once, and it no longer counts toward the rate limit.
CREATE OR REPLACE FUNCTION fc.step_up_not_sent(p_uid uuid) RETURNS boolean
LANGUAGE sql AS $$
    WITH done AS (
        UPDATE fc.step_up_challenges SET sending_since = NULL
         WHERE uid = p_uid AND sent_at IS NULL RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM done)
$$;
