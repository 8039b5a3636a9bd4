-- 0017: a step-up challenge whose code was not sent is sent again on retry.
--
-- fc.create_step_up committed the challenge before the server handed its
-- code to the OtpSender. When the send failed the caller was answered
-- UNAVAILABLE OTP_NOT_SENT ("ask again"), but its retry - same request_id,
-- as for every retryable error - replayed the committed challenge with
-- "created": false: OK, and no code was ever sent for it. Failed challenges
-- also counted toward TOO_MANY_STEP_UPS.
--
-- Now a challenge records its delivery: sending_since while a send is in
-- progress, sent_at once the OtpSender took the code (fc.step_up_sent); a
-- failed send clears sending_since (fc.step_up_not_sent). A retry of a
-- challenge that is not delivered and not being sent gets a fresh code under
-- a fresh challenge id (new hash, new expiry, attempts reset): the old id
-- was never answered to anyone. A retry while another call is sending is
-- told so ("sending": the caller answers UNAVAILABLE). Undelivered
-- challenges do not count toward the rate limit; those being sent do (so
-- concurrent first requests cannot farm codes).

ALTER TABLE fc.step_up_challenges
    ADD COLUMN sent_at timestamptz,
    ADD COLUMN sending_since timestamptz;
-- Challenges made before this migration were answered OK only after their
-- code was sent (a failed send's challenge cannot be told apart: counted as
-- sent, as before).
UPDATE fc.step_up_challenges SET sent_at = created_at;
ALTER TABLE fc.step_up_challenges
    ADD CONSTRAINT step_up_sent_or_sending CHECK (sent_at IS NULL OR sending_since IS NULL);

DROP FUNCTION fc.create_step_up(text, text, uuid, smallint, uuid, bigint, bytea, timestamptz,
                                smallint, integer, interval, timestamptz);

-- Records a new challenge (or renews an undelivered one) and returns where
-- to send its code: the phone of the subject's holder (or of the parent
-- account's holder, for a sub-account without one). "created": true - send
-- the code for "challenge_id" (p_uid, whose hash p_code_hash is), then call
-- fc.step_up_sent or fc.step_up_not_sent. A retry of a delivered challenge
-- returns it with "created": false (no second code). "sending": true - another
-- call is sending this request's code (for less than p_send_timeout). At
-- most p_max_open challenges per subject, delivered or being sent, are made
-- within p_window, so codes cannot be farmed.
CREATE FUNCTION fc.create_step_up(
    p_caller text, p_request_id text, p_uid uuid, p_kind smallint, p_subject uuid,
    p_amount bigint, p_code_hash bytea, p_expires timestamptz, p_max_attempts smallint,
    p_max_open integer, p_window interval, p_now timestamptz, p_send_timeout interval)
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
CREATE FUNCTION fc.step_up_sent(p_uid uuid, p_now timestamptz) RETURNS boolean
LANGUAGE sql AS $$
    WITH done AS (
        UPDATE fc.step_up_challenges SET sent_at = coalesce(sent_at, p_now), sending_since = NULL
         WHERE uid = p_uid RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM done)
$$;

-- The send of challenge p_uid's code failed: a retry of its request sends a
-- fresh code at once, and it no longer counts toward the rate limit.
CREATE FUNCTION fc.step_up_not_sent(p_uid uuid) RETURNS boolean
LANGUAGE sql AS $$
    WITH done AS (
        UPDATE fc.step_up_challenges SET sending_since = NULL
         WHERE uid = p_uid AND sent_at IS NULL RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM done)
$$;
