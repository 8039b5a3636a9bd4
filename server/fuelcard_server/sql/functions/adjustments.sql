-- Manual adjustments under dual control (issue 14, item 7): one admin proposes a credit or
-- a debit of an account with a reason, another approves (booked at once, journal kind 9
-- against the ADJUSTMENTS system account) or rejects it. PROPOSED -> APPROVED | REJECTED,
-- once. Every step is idempotent on its request_id and audited by the server.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

CREATE OR REPLACE FUNCTION fc.adjustment_json(a fc.adjustments) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object(
        'adjustment_id', a.uid,
        'account_id', (SELECT uid FROM fc.accounts WHERE id = a.account_id),
        'direction', a.direction, 'amount_fen', a.amount_fen, 'reason', a.reason,
        'state', a.state, 'proposed_by', a.proposed_by, 'propose_us', fc.ts(a.proposed_at),
        'decided_by', a.decided_by, 'decide_us', fc.ts(a.decided_at),
        'decision_note', a.decision_note,
        'entry_id', (SELECT j.id FROM fc.journal j WHERE j.adjustment_id = a.id AND j.kind = 9));
END $$;

-- ProposeAdjustment. Only an account that holds money of its own can be adjusted: a SHARED
-- sub-account spends its parent's (adjust the parent), a system account is no customer's.
-- Nothing is checked against the balance here: the approval decides, under the lock.
CREATE OR REPLACE FUNCTION fc.propose_adjustment(p_caller text, p_request_id text,
                                                 p_request_hash bytea, p_account_uid uuid,
                                                 p_direction smallint, p_amount_fen bigint,
                                                 p_reason text, p_proposed_by text,
                                                 p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb := fc.replay(p_caller, p_request_id, p_request_hash);
    v_account  fc.accounts;
    v_adj      fc.adjustments;
BEGIN
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> 100;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    IF v_account.funding_mode = 2 THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'ACCOUNT_USES_PARENT_BALANCE',
            DETAIL = 'account_id';
    END IF;
    INSERT INTO fc.adjustments (account_id, direction, amount_fen, reason, proposed_by, proposed_at)
    VALUES (v_account.id, p_direction, p_amount_fen, p_reason, p_proposed_by, p_now)
    RETURNING * INTO v_adj;
    RETURN fc.remember(p_caller, p_request_id, 'propose_adjustment', p_request_hash,
                       jsonb_build_object('adjustment', fc.adjustment_json(v_adj)), p_now);
END $$;

-- The PROPOSED adjustment a decision is about, row-locked, or the refusal: unknown,
-- already decided. NULL: a twin of this very request decided it while we waited for the
-- lock (the caller replays its answer).
CREATE OR REPLACE FUNCTION fc.lock_proposed_adjustment(p_caller text, p_request_id text,
                                                       p_request_hash bytea, p_adjustment_uid uuid)
RETURNS fc.adjustments
LANGUAGE plpgsql AS $$
DECLARE
    v_adj fc.adjustments;
BEGIN
    SELECT * INTO v_adj FROM fc.adjustments WHERE uid = p_adjustment_uid FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ADJUSTMENT_NOT_FOUND',
            DETAIL = 'adjustment';
    END IF;
    IF v_adj.state <> 1 THEN
        IF fc.replay(p_caller, p_request_id, p_request_hash) IS NOT NULL THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'ADJUSTMENT_ALREADY_DECIDED',
            DETAIL = 'adjustment_id';
    END IF;
    RETURN v_adj;
END $$;

-- ApproveAdjustment: books the adjustment under the account's lock (its parent's first, the
-- documented order), after releasing the account's expired holds (as fc.authorize does: a
-- debit is decided against held money). A debit that would leave less than is held, or a
-- credit above the account's maximum balance, is refused and the proposal stays PROPOSED.
-- The proposer may not approve (PERMISSION_DENIED OWN_ADJUSTMENT). Two approvals at once:
-- the second waits for the lock and finds it decided (or, its twin, replays the answer).
CREATE OR REPLACE FUNCTION fc.approve_adjustment(p_caller text, p_request_id text,
                                                 p_request_hash bytea, p_adjustment_uid uuid,
                                                 p_note text, p_decided_by text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb := fc.replay(p_caller, p_request_id, p_request_hash);
    v_adj      fc.adjustments;
    v_account  fc.accounts;
    v_system   bigint;
BEGIN
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_adj FROM fc.adjustments WHERE uid = p_adjustment_uid;
    IF FOUND THEN
        PERFORM fc.lock_chain(v_adj.account_id);
    END IF;
    v_adj := fc.lock_proposed_adjustment(p_caller, p_request_id, p_request_hash, p_adjustment_uid);
    IF v_adj.id IS NULL THEN
        RETURN fc.replay(p_caller, p_request_id, p_request_hash);
    END IF;
    IF v_adj.proposed_by = p_decided_by THEN
        RAISE EXCEPTION USING ERRCODE = 'FCPD0', MESSAGE = 'OWN_ADJUSTMENT', DETAIL = 'adjustment_id';
    END IF;
    PERFORM fc.release_expired_locked(v_adj.account_id, p_now);
    SELECT * INTO v_account FROM fc.accounts WHERE id = v_adj.account_id;
    IF v_adj.direction = 2 AND v_account.balance_fen - v_adj.amount_fen < v_account.held_fen THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'ADJUSTMENT_EXCEEDS_AVAILABLE',
            DETAIL = 'amount_fen';
    ELSIF v_adj.direction = 1 AND v_account.balance_fen > v_account.max_balance_fen - v_adj.amount_fen THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'MAX_BALANCE_EXCEEDED', DETAIL = 'amount_fen';
    END IF;
    v_system := fc.system_account('ADJUSTMENTS');
    INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, adjustment_id,
                            description, created_at)
    VALUES (9, 1, CASE v_adj.direction WHEN 1 THEN v_system ELSE v_account.id END,
            CASE v_adj.direction WHEN 1 THEN v_account.id ELSE v_system END,
            v_adj.amount_fen, v_adj.id, 'manual adjustment', p_now);
    UPDATE fc.accounts
       SET balance_fen = balance_fen + CASE v_adj.direction WHEN 1 THEN v_adj.amount_fen
                                                            ELSE -v_adj.amount_fen END
     WHERE id = v_account.id RETURNING * INTO v_account;
    UPDATE fc.adjustments SET state = 2, decided_by = p_decided_by, decided_at = p_now,
                              decision_note = p_note
     WHERE id = v_adj.id RETURNING * INTO v_adj;
    RETURN fc.remember(p_caller, p_request_id, 'approve_adjustment', p_request_hash,
                       jsonb_build_object('adjustment', fc.adjustment_json(v_adj),
                                          'balance_fen', v_account.balance_fen), p_now);
END $$;

-- RejectAdjustment: PROPOSED -> REJECTED, nothing booked. The proposer may withdraw their
-- own proposal this way: dual control guards the money that moves, and a rejection moves
-- none. No account lock: an approval racing it holds the row lock too, and one of them
-- finds the proposal decided.
CREATE OR REPLACE FUNCTION fc.reject_adjustment(p_caller text, p_request_id text,
                                                p_request_hash bytea, p_adjustment_uid uuid,
                                                p_note text, p_decided_by text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb := fc.replay(p_caller, p_request_id, p_request_hash);
    v_adj      fc.adjustments;
BEGIN
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    v_adj := fc.lock_proposed_adjustment(p_caller, p_request_id, p_request_hash, p_adjustment_uid);
    IF v_adj.id IS NULL THEN
        RETURN fc.replay(p_caller, p_request_id, p_request_hash);
    END IF;
    UPDATE fc.adjustments SET state = 3, decided_by = p_decided_by, decided_at = p_now,
                              decision_note = p_note
     WHERE id = v_adj.id RETURNING * INTO v_adj;
    RETURN fc.remember(p_caller, p_request_id, 'reject_adjustment', p_request_hash,
                       jsonb_build_object('adjustment', fc.adjustment_json(v_adj)), p_now);
END $$;
