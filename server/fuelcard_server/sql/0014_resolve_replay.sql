-- 0014: a request that resolves a break, sent twice at the same time (a
-- retry after a timeout that had in fact gone through), answers both times
-- as the first did. Before, the twin waited for the row lock the first
-- held, then found the row resolved and answered BREAK_ALREADY_RESOLVED: an
-- idempotent RPC that failed on its own retry. After the lock, the
-- request's key is looked up again (under READ COMMITTED the statement sees
-- what the first committed), as fc.confirm does after the account lock.
-- Body otherwise as in 0008. (fc.resolve_channel_exception had the same
-- flaw; 0010 had not been released, so it is fixed there.)

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
