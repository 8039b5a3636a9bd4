-- Following up channel exceptions (a refund the account could not cover,
-- recorded by fc.refund_recharge): finance staff list them and resolve them
-- with a note through ReconciliationService, as they do reconciliation breaks.
--   state: OPEN (resolved_at IS NULL) -> RESOLVED (resolved_at, resolution
--   and resolved_by set, never changed again)

ALTER TABLE fc.channel_exceptions
    ADD COLUMN resolution  text,
    ADD COLUMN resolved_by text;
-- Before this there was no RPC to resolve one: an exception marked by hand in
-- SQL (resolved_at set) keeps its mark and says so, rather than failing the
-- constraint below and with it the upgrade.
UPDATE fc.channel_exceptions
   SET resolution = 'resolved in SQL before ResolveChannelException existed',
       resolved_by = 'migration'
 WHERE resolved_at IS NOT NULL;
ALTER TABLE fc.channel_exceptions
    ADD CONSTRAINT channel_exception_resolved_with_a_note
        CHECK ((resolved_at IS NULL) = (resolution IS NULL)
               AND (resolved_at IS NULL) = (resolved_by IS NULL));

CREATE INDEX channel_exceptions_open ON fc.channel_exceptions (id DESC)
    WHERE resolved_at IS NULL;

CREATE FUNCTION fc.channel_exception_json(x fc.channel_exceptions) RETURNS jsonb
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
CREATE FUNCTION fc.resolve_channel_exception(p_caller text, p_request_id text,
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
