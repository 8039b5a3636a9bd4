-- Settlement exceptions as a resource (issue 14, item 6): fuel delivered or money collected
-- that the ledger could not book as asked (a late confirm that found the money gone, and
-- later an overrun shortfall or a refused channel payment), listed, read and resolved with a
-- note through ReconciliationService and `fuelcard exceptions`.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- An exception as the API shows it. state: OPEN; RESOLVED by a person (resolved_by, with
-- the note); SETTLED when fc.confirm closed it because a later confirm paid the sale after
-- all (resolved_at without resolved_by). NULL only for a row whose references are gone,
-- which the foreign keys forbid: `fuelcard verify` checks every open one renders.
CREATE OR REPLACE FUNCTION fc.settlement_exception_json(x fc.settlement_exceptions) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'exception_id', x.uid,
        'kind', x.kind,
        'reason', x.reason,
        'account_id', a.uid,
        'hold_id', (SELECT h.uid FROM fc.holds h WHERE h.id = x.hold_id),
        'recharge_id', (SELECT r.uid FROM fc.recharges r WHERE r.id = x.recharge_id),
        'channel', x.channel,
        'channel_txn_id', x.channel_txn_id,
        'amount_fen', x.amount_fen,
        'state', CASE WHEN x.resolved_at IS NULL THEN 'OPEN'
                      WHEN x.resolved_by IS NULL THEN 'SETTLED' ELSE 'RESOLVED' END,
        'create_us', fc.ts(x.created_at),
        'resolve_us', fc.ts(x.resolved_at),
        'resolution', x.resolution,
        'resolved_by', x.resolved_by)
      FROM fc.accounts a WHERE a.id = x.account_id);
END $$;

-- ResolveSettlementException: OPEN -> RESOLVED, once, with the note and who wrote it.
-- Idempotent on request_id, also for a twin sent while the first was in flight (the key is
-- looked up again after the row lock, as fc.resolve_channel_exception does). One already
-- closed (resolved by another request, or settled by a later confirm) is
-- SETTLEMENT_EXCEPTION_ALREADY_RESOLVED. No account lock: resolving moves no money. A late
-- confirm that settles the hold at the same time waits for this row lock, then finds it
-- closed and leaves it so (its UPDATE is WHERE resolved_at IS NULL).
CREATE OR REPLACE FUNCTION fc.resolve_settlement_exception(p_caller text, p_request_id text,
                                                         p_request_hash bytea, p_exception_uid uuid,
                                                         p_resolution text, p_resolved_by text,
                                                         p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response  jsonb;
    v_exception fc.settlement_exceptions;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_exception FROM fc.settlement_exceptions WHERE uid = p_exception_uid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'SETTLEMENT_EXCEPTION_NOT_FOUND',
            DETAIL = 'settlement_exception';
    END IF;
    IF v_exception.resolved_at IS NOT NULL THEN
        v_response := fc.replay(p_caller, p_request_id, p_request_hash);
        IF v_response IS NOT NULL THEN
            RETURN v_response;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'SETTLEMENT_EXCEPTION_ALREADY_RESOLVED',
            DETAIL = 'exception_id';
    END IF;
    UPDATE fc.settlement_exceptions
       SET resolved_at = p_now, resolution = p_resolution, resolved_by = p_resolved_by
     WHERE id = v_exception.id RETURNING * INTO v_exception;
    RETURN fc.remember(p_caller, p_request_id, 'resolve_settlement_exception', p_request_hash,
                       jsonb_build_object('settlement_exception',
                                          fc.settlement_exception_json(v_exception)), p_now);
END $$;
