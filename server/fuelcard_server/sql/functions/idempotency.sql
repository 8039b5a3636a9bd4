-- Idempotency (AIP-155): every mutating call stores its answer under (caller, request_id)
-- with a fingerprint of the request; a retry gets the stored answer, a different request under
-- the same key is refused. Also the retention classes of stored keys and their pruning.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Returns the stored response of a replayed request, or raises
-- REQUEST_ID_REUSED when the same key came with a different request. A
-- request refused for good (fc.remember_refusal) is refused again, with the
-- same SQLSTATE, reason and field, marked HINT 'replayed' so that the server
-- does not try to remember it a second time.
CREATE OR REPLACE FUNCTION fc.replay(p_caller text, p_request_id text, p_request_hash bytea) RETURNS jsonb
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
        -- An empty fingerprint is a reversal's tombstone (fc.reverse_authorization): the
        -- Authorize it names answers DECLINED REVERSED whatever its payload.
        IF octet_length(v_hash) = 0 THEN
            RETURN v_response || '{"replayed": true}';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'REQUEST_ID_REUSED',
            DETAIL = 'request_id';
    END IF;
    IF v_response ? 'refusal' THEN
        RAISE EXCEPTION USING ERRCODE = v_response->'refusal'->>'sqlstate',
            MESSAGE = v_response->'refusal'->>'reason',
            DETAIL = coalesce(v_response->'refusal'->>'field', ''), HINT = 'replayed';
    END IF;
    RETURN v_response || '{"replayed": true}';
END $$;

-- The start of every terminal request: the stored answer of a replay, or
-- NULL after advancing the terminal's counter (when the request carries one).
-- A counter at or below the last one is refused, unless a concurrent
-- duplicate of this very request took it first: then its answer is returned.
CREATE OR REPLACE FUNCTION fc.admit(p_caller text, p_request_id text, p_request_hash bytea,
                         p_station text, p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb := fc.replay(p_caller, p_request_id, p_request_hash);
BEGIN
    IF v_response IS NOT NULL OR p_counter IS NULL OR fc.advance_counter(p_station, p_terminal, p_counter) THEN
        RETURN v_response;
    END IF;
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'FCUA0', MESSAGE = 'COUNTER_REPLAYED',
        DETAIL = 'terminal_counter';
END $$;

CREATE OR REPLACE FUNCTION fc.remember(p_caller text, p_request_id text, p_operation text,
                                       p_request_hash bytea, p_response jsonb, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    -- A concurrent duplicate that got this far fails here on the primary key;
    -- its transaction rolls back and the server retries it as a replay.
    INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response, created_at)
    VALUES (p_caller, p_request_id, p_operation, p_request_hash, p_response, p_now);
    RETURN p_response;
END $$;

-- Permanent refusals are remembered as Stripe remembers a 4xx: a retry of a
-- refused request (same caller, request_id and fingerprint) is refused again
-- with the same error instead of being decided afresh, so a client that lost
-- the first answer learns what it was, and a request never turns from
-- refused into done behind its sender's back.
--
-- A RAISE rolls back everything its transaction did, the key included, so
-- the refusal cannot be stored where it is decided without catching it: an
-- EXCEPTION block in every mutating function, i.e. a subtransaction on every
-- pump call, successful ones included, and edits to every function. Instead
-- the server stores it right after the failed statement (db.py), in this one
-- short statement, keyed and fingerprinted like any answer. That is sound
-- because a refused request changed nothing (its transaction rolled back):
-- storing its answer a moment later says what storing it at once would have
-- said. A twin that got in between and stored its own answer first wins (ON
-- CONFLICT DO NOTHING): every later retry gets that stored answer, as
-- always. If the server dies between the two statements, the refusal is not
-- remembered and a retry is decided afresh, as before. The success path costs
-- nothing more.
--
-- What is remembered: the refusals of class FC that answer the request
-- itself (NOT_FOUND FCNF0, FAILED_PRECONDITION FCFP0, PERMISSION_DENIED
-- FCPD0, INVALID_ARGUMENT FCIA0). Never: REQUEST_ID_REUSED (the key is
-- another request's), UNAUTHENTICATED FCUA0 (the sending was refused, not
-- the request: a re-signed retry goes through), and the refusals that
-- invite the same request again later (fc.refusal_is_transient). Transient
-- failures (lost link, class 40 rollbacks, DATABASE_BUSY, deadlines) never
-- reach here: they raise no FC SQLSTATE.
CREATE OR REPLACE FUNCTION fc.refusal_is_transient(p_reason text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- RECHARGE_NOT_FOUND: a channel's refund that came before its payment; the
    --   adapter sends the same request again once the payment is booked.
    -- TOO_MANY_STEP_UPS: a rate limit ("try again later").
    SELECT p_reason IN ('REQUEST_ID_REUSED', 'RECHARGE_NOT_FOUND', 'TOO_MANY_STEP_UPS')
$$;

-- Stores a permanent refusal as the request's answer; whether it did.
CREATE OR REPLACE FUNCTION fc.remember_refusal(p_caller text, p_request_id text, p_operation text,
                                               p_request_hash bytea, p_sqlstate text,
                                               p_reason text, p_field text, p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_sqlstate NOT IN ('FCNF0', 'FCFP0', 'FCPD0', 'FCIA0') OR fc.refusal_is_transient(p_reason) THEN
        RETURN false;
    END IF;
    INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response, created_at)
    VALUES (p_caller, p_request_id, p_operation, p_request_hash,
            jsonb_build_object('refusal', jsonb_build_object(
                'sqlstate', p_sqlstate, 'reason', p_reason, 'field', p_field)),
            p_now)
    ON CONFLICT (caller, request_id) DO NOTHING;
    RETURN FOUND;
END $$;

-- Retention: idempotency keys and step-up challenges are deleted once no
-- legitimate retry can need them (retention.py runs these functions in
-- bounded batches, one process at a time; README "Retention").

------------------------------------------------------------------------------
-- Idempotency keys
------------------------------------------------------------------------------

-- Whether a replay of the operation, once its key is gone, is stopped by what
-- the ledger itself records, so that it can never move money twice:
--   confirm, cancel, review_hold  name their hold, and a hold moves only out
--        of AUTHORIZED/SUSPENDED: a replay finds it closed and is refused
--        (HOLD_ALREADY_CONFIRMED, HOLD_CANCELLED, HOLD_NOT_SUSPENDED) or, for
--        a cancel of a closed hold, changes nothing;
--   recharge        one recharge per (channel, channel_txn_id): a replay
--        answers the recharge already credited;
--   refund_recharge one refund per (channel, channel_refund_id), and a running
--        total never refunds twice (REFUND_ALREADY_COVERED);
--   authorize       a replay makes a new hold, which is harmless once the
--        first is closed (the POS never got its id, so never confirmed it;
--        money moves only on a confirm, once per hold); while the first hold
--        is AUTHORIZED or SUSPENDED its key is never deleted (below).
-- Every other operation (batch top-up, points redemption and pooling, account
-- opening, card issuing, settings of limits, scopes and rules, PIN resets,
-- reconciliation) has no such guard: its key is kept for the longer
-- retention. They are a small share of the keys; the pump cycle and the
-- channels' notifications are nearly all of them.
-- The index below is built on this function: a later migration that changes
-- the list must REINDEX INDEX fc.idempotency_keys_retention in the same
-- migration, or existing keys keep their old class.
CREATE OR REPLACE FUNCTION fc.replay_guarded(p_operation text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_operation IN ('authorize', 'confirm', 'cancel', 'review_hold', 'recharge',
                           'refund_recharge')
$$;

-- The index lives beside the function it is built on: a fresh database needs the function
-- first. Changing the list above needs REINDEX INDEX fc.idempotency_keys_retention in a
-- numbered migration, or existing keys keep their old class.
CREATE INDEX IF NOT EXISTS idempotency_keys_retention
    ON fc.idempotency_keys (fc.replay_guarded(operation), created_at);

-- Deletes up to p_limit keys: guarded operations' keys made before p_before,
-- other operations' keys made before p_unguarded_before (NULL: those are
-- kept for ever), never the key of an Authorize whose hold is still
-- AUTHORIZED or SUSPENDED. Returns how many. Rows another transaction has
-- locked are skipped (and deleted by a later batch), so a prune never waits.
CREATE OR REPLACE FUNCTION fc.prune_idempotency_keys(p_before timestamptz, p_unguarded_before timestamptz,
                                          p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
    v_more  integer := 0;
BEGIN
    WITH doomed AS (
        SELECT k.caller, k.request_id FROM fc.idempotency_keys k
         WHERE fc.replay_guarded(k.operation) AND k.created_at < p_before
           AND NOT (k.operation = 'authorize' AND EXISTS (
                   SELECT 1 FROM fc.holds h
                    WHERE h.uid = (k.response->'hold'->>'hold_id')::uuid 
                      AND h.state IN (fc.hold_state_authorized(), fc.hold_state_suspended())))
         ORDER BY k.created_at LIMIT p_limit
           FOR UPDATE OF k SKIP LOCKED)
    DELETE FROM fc.idempotency_keys k USING doomed d
     WHERE k.caller = d.caller AND k.request_id = d.request_id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count < p_limit AND p_unguarded_before IS NOT NULL THEN
        WITH doomed AS (
            SELECT k.caller, k.request_id FROM fc.idempotency_keys k
             WHERE NOT fc.replay_guarded(k.operation) AND k.created_at < p_unguarded_before
             ORDER BY k.created_at LIMIT p_limit - v_count
               FOR UPDATE OF k SKIP LOCKED)
        DELETE FROM fc.idempotency_keys k USING doomed d
         WHERE k.caller = d.caller AND k.request_id = d.request_id;
        GET DIAGNOSTICS v_more = ROW_COUNT;
    END IF;
    RETURN v_count + v_more;
END $$;
