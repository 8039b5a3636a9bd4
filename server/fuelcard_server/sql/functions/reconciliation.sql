-- Reconciliation: breaks between our settlement records and the channels' files, and channel
-- exceptions (refunds the account could not cover), with how each is resolved.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

CREATE OR REPLACE FUNCTION fc.break_json(b fc.reconciliation_breaks) RETURNS jsonb
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

CREATE OR REPLACE FUNCTION fc.channel_exception_json(x fc.channel_exceptions) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'exception_id', x.uid,
        'channel', x.channel,
        'reason', x.reason,
        'account_id', (SELECT uid FROM fc.accounts WHERE id = x.account_id),
        'refund_id', f.uid,
        'recharge_id', r.uid,
        'channel_txn_id', r.channel_txn_id,
        'channel_refund_id', f.channel_refund_id,
        'amount_fen', x.amount_fen,
        'create_us', fc.ts(x.created_at),
        'resolve_us', fc.ts(x.resolved_at),
        'resolution', x.resolution,
        'resolved_by', x.resolved_by)
      FROM fc.refunds f JOIN fc.recharges r ON r.id = f.recharge_id
     WHERE f.id = x.refund_id);
END $$;

-- ResolveChannelException: idempotent on request_id, also for a twin sent
-- while the first was in flight (the key is looked up again after the row
-- lock); only an OPEN exception can be resolved (one resolved before, by
-- another request, is CHANNEL_EXCEPTION_ALREADY_RESOLVED).
CREATE OR REPLACE FUNCTION fc.resolve_channel_exception(p_caller text, p_request_id text,
                                             p_request_hash bytea, p_exception_uid uuid,
                                             p_resolution text, p_resolved_by text,
                                             p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response  jsonb;
    v_exception fc.channel_exceptions;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_exception FROM fc.channel_exceptions WHERE uid = p_exception_uid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CHANNEL_EXCEPTION_NOT_FOUND',
            DETAIL = 'channel_exception';
    END IF;
    IF v_exception.resolved_at IS NOT NULL THEN
        -- resolved while we waited for the lock: by this very request? (a
        -- retry sent while the first was in flight answers as the first did)
        v_response := fc.replay(p_caller, p_request_id, p_request_hash);
        IF v_response IS NOT NULL THEN
            RETURN v_response;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CHANNEL_EXCEPTION_ALREADY_RESOLVED',
            DETAIL = 'exception_id';
    END IF;
    UPDATE fc.channel_exceptions
       SET resolved_at = p_now, resolution = p_resolution, resolved_by = p_resolved_by
     WHERE id = v_exception.id RETURNING * INTO v_exception;
    RETURN fc.remember(p_caller, p_request_id, 'resolve_channel_exception', p_request_hash,
                       jsonb_build_object('channel_exception',
                                          fc.channel_exception_json(v_exception)), p_now);
END $$;

-- A request that resolves a break, sent twice at the same time (a retry
-- after a timeout that had in fact gone through), answers both times as the
-- first did: the twin waits for the row lock the first holds, and would
-- then find the row resolved and answer BREAK_ALREADY_RESOLVED, an
-- idempotent RPC failing on its own retry. So after the lock the request's
-- key is looked up again (under READ COMMITTED the statement sees what the
-- first committed), as fc.confirm does after the account lock, and as
-- fc.resolve_channel_exception does.
CREATE OR REPLACE FUNCTION fc.resolve_break(p_caller text, p_request_id text,
                                            p_request_hash bytea, p_break_uid uuid,
                                            p_resolution text, p_resolved_by text,
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
        -- resolved while we waited for the lock: by this very request?
        v_response := fc.replay(p_caller, p_request_id, p_request_hash);
        IF v_response IS NOT NULL THEN
            RETURN v_response;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'BREAK_ALREADY_RESOLVED',
            DETAIL = 'break_id';
    END IF;
    UPDATE fc.reconciliation_breaks
       SET resolved_at = p_now, resolution = p_resolution, resolved_by = p_resolved_by
     WHERE id = v_break.id RETURNING * INTO v_break;
    RETURN fc.remember(p_caller, p_request_id, 'resolve_break', p_request_hash,
                       jsonb_build_object('break', fc.break_json(v_break)), p_now);
END $$;
