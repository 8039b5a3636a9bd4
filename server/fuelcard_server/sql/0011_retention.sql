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
CREATE FUNCTION fc.replay_guarded(p_operation text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_operation IN ('authorize', 'confirm', 'cancel', 'review_hold', 'recharge',
                           'refund_recharge')
$$;

-- Keys by retention class, then age: each class's deletable keys are a
-- range at the front of its part of the index, so a batch never reads past
-- keys it must keep. It replaces the index on age alone (same write cost).
CREATE INDEX idempotency_keys_retention
    ON fc.idempotency_keys (fc.replay_guarded(operation), created_at);
DROP INDEX fc.idempotency_keys_age;

-- Deletes up to p_limit keys: guarded operations' keys made before p_before,
-- other operations' keys made before p_unguarded_before (NULL: those are
-- kept for ever), never the key of an Authorize whose hold is still
-- AUTHORIZED or SUSPENDED. Returns how many. Rows another transaction has
-- locked are skipped (and deleted by a later batch), so a prune never waits.
CREATE FUNCTION fc.prune_idempotency_keys(p_before timestamptz, p_unguarded_before timestamptz,
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
                    WHERE h.uid = (k.response->'hold'->>'hold_id')::uuid AND h.state IN (1, 5)))
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

------------------------------------------------------------------------------
-- Step-up challenges
------------------------------------------------------------------------------

CREATE INDEX step_up_challenges_age ON fc.step_up_challenges (created_at);

-- Deletes up to p_limit challenges made and expired before p_before (the
-- caller keeps p_before behind the per-subject rate limit's window and the
-- codes' lifetime, so no challenge the rate limit counts, and none that can
-- still be answered, is deleted). A consumed challenge only lets a retry of
-- the operation that used it pass again; that operation's idempotency key
-- answers such a retry for longer. Returns how many.
CREATE FUNCTION fc.prune_step_ups(p_before timestamptz, p_limit integer) RETURNS integer
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
