-- Personal data of account holders (issue 15, item 5): sealing what an upgrade left in
-- plaintext, lookup by blind index, the data-subject export and erasure. The sealing and the
-- opening are the server's (holder_data.py): the key is never in the database.

-- Up to p_limit holders an upgrade left with a plaintext phone or ID number, locked for the
-- caller's transaction (SKIP LOCKED: two servers starting at once seal different rows).
CREATE OR REPLACE FUNCTION fc.holders_to_seal(p_limit integer)
RETURNS TABLE (account_id bigint, phone text, id_number text)
LANGUAGE sql AS $$
    SELECT h.account_id, h.phone_plaintext, h.id_number_plaintext FROM fc.account_holders h
     WHERE h.phone_plaintext IS NOT NULL OR h.id_number_plaintext IS NOT NULL
     ORDER BY h.account_id LIMIT p_limit FOR UPDATE SKIP LOCKED
$$;

-- Stores the sealed values of a row fc.holders_to_seal returned and nulls its plaintext. A
-- field that had no plaintext keeps what it holds.
CREATE OR REPLACE FUNCTION fc.seal_holder(
    p_account_id bigint, p_phone_sealed bytea, p_phone_index bytea, p_id_number_sealed bytea,
    p_id_number_index bytea, p_seal_key_id text)
RETURNS boolean
LANGUAGE sql AS $$
    UPDATE fc.account_holders h
       SET phone_sealed = CASE WHEN h.phone_plaintext IS NULL THEN h.phone_sealed ELSE p_phone_sealed END,
           phone_index = CASE WHEN h.phone_plaintext IS NULL THEN h.phone_index ELSE p_phone_index END,
           id_number_sealed = CASE WHEN h.id_number_plaintext IS NULL THEN h.id_number_sealed
                                   ELSE p_id_number_sealed END,
           id_number_index = CASE WHEN h.id_number_plaintext IS NULL THEN h.id_number_index
                                  ELSE p_id_number_index END,
           seal_key_id = p_seal_key_id, phone_plaintext = NULL, id_number_plaintext = NULL
     WHERE h.account_id = p_account_id
       AND (h.phone_plaintext IS NOT NULL OR h.id_number_plaintext IS NOT NULL)
    RETURNING true
$$;

-- The accounts (uids, oldest first) whose holder has this phone or this ID number, by blind
-- index (holder_data.HolderSeal.index); NULL matches nothing.
CREATE OR REPLACE FUNCTION fc.holder_accounts(p_phone_index bytea, p_id_number_index bytea)
RETURNS uuid[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(a.uid ORDER BY a.id), '{}') FROM fc.account_holders h
      JOIN fc.accounts a ON a.id = h.account_id
     WHERE h.phone_index = p_phone_index OR h.id_number_index = p_id_number_index
$$;

-- Everything held about an account's holder (the data-subject export, PIPL): the account with
-- its holder data as stored (sealed: the server opens it), its sub-accounts, its cards (masked
-- numbers only), every journal line it is on (money and points), its holds, the step-up
-- challenges about it and the audit records whose target is the account, a card or a hold of
-- it. NULL if there is no such account.
CREATE OR REPLACE FUNCTION fc.holder_export(p_account_uid uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_account fc.accounts;
    v_targets uuid[];
BEGIN
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid
       AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_targets := ARRAY[v_account.uid]
        || ARRAY(SELECT uid FROM fc.cards WHERE account_id = v_account.id)
        || ARRAY(SELECT uid FROM fc.holds WHERE account_id = v_account.id
                    OR spender_account_id = v_account.id);
    RETURN jsonb_build_object(
        'account', fc.account_json(a => v_account),
        'sub_accounts', (SELECT coalesce(jsonb_agg(s.uid ORDER BY s.id), '[]') FROM fc.accounts s
                          WHERE s.parent_id = v_account.id),
        'cards', (SELECT coalesce(jsonb_agg(fc.card_json(c => c) ORDER BY c.id), '[]')
                    FROM fc.cards c WHERE c.account_id = v_account.id),
        'transactions', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'id', j.id, 'kind', j.kind, 'asset', j.asset,
                'amount', CASE WHEN j.credit_account_id = v_account.id THEN j.amount ELSE -j.amount END,
                'hold_id', (SELECT uid FROM fc.holds WHERE id = j.hold_id),
                'description', j.description, 'create_us', fc.ts(j.created_at)) ORDER BY j.id), '[]')
              FROM fc.journal j
             WHERE j.debit_account_id = v_account.id OR j.credit_account_id = v_account.id),
        'holds', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'hold_id', h.uid, 'state', h.state, 'amount_fen', h.amount_fen,
                'settled_fen', h.settled_fen, 'station_id', h.station_id,
                'terminal_id', h.terminal_id, 'nozzle', h.nozzle, 'product', h.product,
                'volume_ml', h.volume_ml, 'points_earned', h.points_earned,
                'card_id', (SELECT uid FROM fc.cards WHERE id = h.card_id),
                'create_us', fc.ts(h.created_at), 'close_us', fc.ts(h.closed_at)) ORDER BY h.id), '[]')
              FROM fc.holds h WHERE h.account_id = v_account.id OR h.spender_account_id = v_account.id),
        'points', jsonb_build_object('balance', v_account.points_balance),
        'step_ups', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'challenge_id', s.uid, 'kind', s.kind, 'subject', s.subject,
                'create_us', fc.ts(s.created_at), 'sent', s.sent_at IS NOT NULL,
                'consumed', s.consumed_at IS NOT NULL) ORDER BY s.created_at), '[]')
              FROM fc.step_up_challenges s WHERE s.subject = ANY (v_targets)),
        'audit', (SELECT coalesce(jsonb_agg(jsonb_build_object(
                'id', l.id, 'create_us', fc.ts(l.created_at), 'actor', l.actor,
                'method', l.method, 'target', l.target, 'outcome', l.outcome) ORDER BY l.id), '[]')
              FROM fc.audit_log l WHERE l.target = ANY (v_targets)));
END $$;

-- Erasure (anonymisation) of a closed account's personal data. Closed: it holds no money and
-- nothing held, every card is closed and every sub-account already erased. Points left over are
-- forfeited with the account (they stay in the ledger, on a frozen account nobody can spend).
-- The holder's name becomes a placeholder, phone and ID number (sealed, index and any
-- plaintext) go, the account's label goes, and the account is frozen so that nothing moves
-- into it again. The ledger is untouched: journal lines, holds and audit records name
-- accounts and cards by id, never by person, so they stay whole and `fuelcard verify` clean.
-- Erasing an erased account changes nothing ("already": true).
CREATE OR REPLACE FUNCTION fc.erase_holder(p_account_uid uuid, p_now timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_account fc.accounts;
    v_erased  timestamptz;
BEGIN
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid
       AND kind <> fc.account_kind_system() FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    SELECT erased_at INTO v_erased FROM fc.account_holders WHERE account_id = v_account.id FOR UPDATE;
    IF v_erased IS NOT NULL THEN
        RETURN jsonb_build_object('account_id', v_account.uid, 'already', true,
                                  'erase_us', fc.ts(v_erased));
    END IF;
    IF v_account.balance_fen <> 0 OR v_account.held_fen <> 0
       OR EXISTS (SELECT 1 FROM fc.cards WHERE account_id = v_account.id
                     AND status <> fc.card_status_closed())
       OR EXISTS (SELECT 1 FROM fc.accounts s JOIN fc.account_holders sh ON sh.account_id = s.id
                   WHERE s.parent_id = v_account.id AND sh.erased_at IS NULL) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'ACCOUNT_NOT_CLOSED', DETAIL = 'account_id';
    END IF;
    UPDATE fc.account_holders
       SET name = 'erased', phone_sealed = NULL, phone_index = NULL, phone_plaintext = NULL,
           id_number_sealed = NULL, id_number_index = NULL, id_number_plaintext = NULL,
           erased_at = p_now
     WHERE account_id = v_account.id;
    UPDATE fc.accounts SET label = '', status = fc.account_status_frozen() WHERE id = v_account.id;
    RETURN jsonb_build_object('account_id', v_account.uid, 'already', false, 'erase_us', fc.ts(p_now));
END $$;
