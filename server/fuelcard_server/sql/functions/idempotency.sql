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
    v_hash      bytea;
    v_response  jsonb;
    v_operation text;
BEGIN
    SELECT request_hash, response, operation INTO v_hash, v_response, v_operation
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
    RETURN fc.expand_answer(v_operation, v_response) || '{"replayed": true}';
END $$;

-- Compact answers. The pump's two calls answer with their hold (fc.hold_json, ~600 bytes
-- of jsonb), and storing that twice a cycle was a sixth of the WAL. Their key stores, under
-- short names, the answer's scalars and the hold's uid ("h"), and fc.expand_answer rebuilds
-- the rest on a replay from the hold row. That is the same answer only where the row cannot
-- have moved since, so only these two shapes are compacted:
--   authorize, APPROVED: the hold as opened (AUTHORIZED, nothing settled, not closed); what
--        else hold_json shows of the row never changes after its insert. (Not a REVIEW: a
--        reviewer's approval gives the hold a new expiry.) Stored: "a" available_fen, and of
--        the risk verdict (APPROVE, its score and rules as the hold records them) "v" its rule
--        set; any other verdict whole, "r";
--   confirm, a sale settled (fc.settle_sale's answer): the hold CONFIRMED, which is final
--        (fc.check_hold_transition), points_earned, amount_mismatch and price_mismatch as the
--        hold records them. Stored: "b" balance_fen, "rf" receivable_fen when not 0, "x" the
--        settlement exception when there is one.
-- An answer with any other key is stored whole: a key added to these answers later is kept
-- rather than lost. Every other answer (declines, refusals, a confirm of nothing, a late sale
-- declined, every other operation) is stored as it is: small, or rare, or not final. Keys
-- stored before this (whole, no "h") are returned as they are.
-- STABLE, as jsonb_build_object is: an IMMUTABLE SQL function over a STABLE one is not inlined
-- into fc.remember's INSERT, and is then planned afresh on every call (measured: ~500 us).
CREATE OR REPLACE FUNCTION fc.compact_answer(p_operation text, p_response jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_operation = 'authorize' AND p_response->>'decision' = 'APPROVED'
             AND p_response - '{decision,hold,available_fen,risk}'::text[] = '{}'
             AND (p_response->'hold'->>'state')::smallint = fc.hold_state_authorized()
             AND p_response->'hold'->>'close_us' IS NULL
             AND (p_response->'hold'->>'settled_fen')::bigint = 0
        -- Not jsonb_strip_nulls: it would strip the risk verdict's own nulls too.
        THEN jsonb_build_object('h', p_response->'hold'->'hold_id', 'a', p_response->'available_fen')
             || CASE WHEN NOT p_response ? 'risk' THEN '{}'
                     WHEN (p_response->'risk') - '{decision,score,rules,version,fallback}'::text[] = '{}'
                          AND p_response->'risk'->>'decision' = 'APPROVE'
                          AND p_response->'risk'->'fallback' = 'false'
                          AND NOT jsonb_path_exists(p_response->'risk'->'rules',
                                                    '$[*] ? (@.type() != "string")')
                     THEN jsonb_build_object('v', p_response->'risk'->'version')
                     ELSE jsonb_build_object('r', p_response->'risk') END
        WHEN p_operation = 'confirm' AND p_response->>'decision' = 'APPROVED'
             AND p_response - '{decision,hold,points_earned,balance_fen,receivable_fen,
                                settlement_exception_id,amount_mismatch,price_mismatch}'::text[]
                 = '{}'
             AND (p_response->'hold'->>'state')::smallint = fc.hold_state_confirmed()
        THEN jsonb_strip_nulls(jsonb_build_object(
                 'h', p_response->'hold'->'hold_id', 'b', p_response->'balance_fen',
                 'rf', nullif(p_response->'receivable_fen', '0'),
                 'x', p_response->'settlement_exception_id'))
        ELSE p_response
    END
$$;

-- The answer fc.compact_answer stored, whole again (see there); any other stored answer as
-- it is.
CREATE OR REPLACE FUNCTION fc.expand_answer(p_operation text, p_stored jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    h fc.holds;
BEGIN
    IF NOT p_stored ? 'h' THEN
        RETURN p_stored;
    END IF;
    SELECT * INTO h FROM fc.holds WHERE uid = (p_stored->>'h')::uuid;
    IF p_operation = 'authorize' THEN
        RETURN CASE WHEN p_stored ? 'r' THEN jsonb_build_object('risk', p_stored->'r')
                    WHEN p_stored ? 'v' THEN jsonb_build_object('risk', jsonb_build_object(
                        'decision', 'APPROVE', 'score', h.risk_score, 'rules', to_jsonb(h.risk_rules),
                        'version', p_stored->'v', 'fallback', false))
                    ELSE '{}' END || jsonb_build_object(
            'decision', 'APPROVED', 'available_fen', p_stored->'a',
            'hold', fc.hold_json(h) || jsonb_build_object(
                'state', fc.hold_state_authorized(), 'settled_fen', 0, 'close_us', NULL,
                'volume_ml', 0, 'unit_price_fen', 0, 'points_earned', 0, 'confirmed_late', false));
    END IF;
    RETURN jsonb_build_object(
        'decision', 'APPROVED', 'hold', fc.hold_json(h), 'points_earned', h.points_earned,
        'balance_fen', p_stored->'b', 'receivable_fen', coalesce(p_stored->'rf', '0'),
        'settlement_exception_id', p_stored->'x', 'amount_mismatch', h.amount_mismatch,
        'price_mismatch', h.price_mismatch);
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
    VALUES (p_caller, p_request_id, p_operation, p_request_hash,
            fc.compact_answer(p_operation, p_response), p_now);
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
                    WHERE h.uid = coalesce(k.response->>'h', k.response->'hold'->>'hold_id')::uuid
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
