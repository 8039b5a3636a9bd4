-- Accounts and cards: opening, issuing, status changes, and their JSON answers.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

CREATE OR REPLACE FUNCTION fc.card_json(c fc.cards) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'card_id', c.uid, 'account_id', (SELECT uid FROM fc.accounts WHERE id = c.account_id),
        'masked_card_number', c.masked, 'status', c.status, 'create_us', fc.ts(c.created_at))
$$;

CREATE OR REPLACE FUNCTION fc.issue_card(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_account_uid uuid, p_pan_index bytea, p_masked text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  fc.accounts;
    v_card     fc.cards;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    IF EXISTS (SELECT 1 FROM fc.cards WHERE pan_index = p_pan_index) THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CARD_NUMBER_IN_USE', DETAIL = 'card_number';
    END IF;
    INSERT INTO fc.cards (account_id, pan_index, masked, created_at)
    VALUES (v_account.id, p_pan_index, p_masked, p_now) RETURNING * INTO v_card;
    RETURN fc.remember(p_caller, p_request_id, 'issue_card', p_request_hash,
                       jsonb_build_object('card', fc.card_json(v_card)), p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.update_card_status(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_card_uid uuid, p_status smallint, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_card     fc.cards;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT * INTO v_card FROM fc.cards WHERE uid = p_card_uid;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'CARD_NOT_FOUND', DETAIL = 'card_id';
    END IF;
    -- Same lock as authorize: a block takes effect between two reservations,
    -- never in the middle of one.
    PERFORM pg_advisory_xact_lock(v_card.account_id);
    SELECT * INTO v_card FROM fc.cards WHERE uid = p_card_uid;
    IF v_card.status = fc.card_status_closed() AND p_status <> fc.card_status_closed() THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'CARD_CLOSED', DETAIL = 'card_id';
    END IF;
    UPDATE fc.cards SET status = p_status WHERE id = v_card.id RETURNING * INTO v_card;
    RETURN fc.remember(p_caller, p_request_id, 'update_card_status', p_request_hash,
                       jsonb_build_object('card', fc.card_json(v_card)), p_now);
END $$;

CREATE OR REPLACE FUNCTION fc.open_account(
    p_caller text, p_request_id text, p_request_hash bytea,
    p_kind smallint, p_name text, p_phone_sealed bytea, p_phone_index bytea,
    p_id_number_sealed bytea, p_id_number_index bytea, p_seal_key_id text,
    p_parent_uid uuid, p_funding_mode smallint, p_label text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_parent   fc.accounts;
    v_account  fc.accounts;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    IF p_parent_uid IS NOT NULL THEN
        SELECT * INTO v_parent FROM fc.accounts WHERE uid = p_parent_uid AND kind <> fc.account_kind_system();
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND',
                DETAIL = 'parent_account_id';
        END IF;
        IF v_parent.parent_id IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'PARENT_NOT_TOP_LEVEL',
                DETAIL = 'parent_account_id';
        END IF;
    END IF;
    INSERT INTO fc.accounts (kind, parent_id, funding_mode, label, created_at)
    VALUES (coalesce(nullif(p_kind, 0), v_parent.kind), v_parent.id, p_funding_mode, p_label, p_now)
    RETURNING * INTO v_account;
    -- Phone and ID number arrive sealed, with their blind indexes (holder_data.py):
    -- the database never sees them in plaintext.
    INSERT INTO fc.account_holders (account_id, name, phone_sealed, phone_index, id_number_sealed,
                                    id_number_index, seal_key_id)
    VALUES (v_account.id, p_name, p_phone_sealed, p_phone_index, p_id_number_sealed,
            p_id_number_index, p_seal_key_id);
    -- The stored response keeps only the account id: personal data is not
    -- copied into the idempotency table; the server re-reads it on replay.
    RETURN fc.remember(p_caller, p_request_id, 'open_account', p_request_hash,
                       jsonb_build_object('account_id', v_account.uid), p_now);
END $$;

-- A holder's phone and ID number as stored: sealed (base64), for the server to open
-- (holder_data.py); or, in a row an upgrade left unsealed, in plaintext until the server's
-- sealing pass reaches it.
CREATE OR REPLACE FUNCTION fc.holder_sealed_json(h fc.account_holders) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object(
        'holder_phone_sealed', encode(h.phone_sealed, 'base64'),
        'holder_phone_index', encode(h.phone_index, 'base64'),
        'holder_phone_plaintext', h.phone_plaintext,
        'holder_id_number_sealed', encode(h.id_number_sealed, 'base64'),
        'holder_id_number_index', encode(h.id_number_index, 'base64'),
        'holder_id_number_plaintext', h.id_number_plaintext,
        'holder_seal_key_id', h.seal_key_id)
$$;

CREATE OR REPLACE FUNCTION fc.account_json(a fc.accounts) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'account_id', a.uid, 'type', a.kind, 'status', a.status, 'tier', a.tier,
        'balance_fen', a.balance_fen, 'held_fen', a.held_fen,
        'points_balance', a.points_balance, 'create_us', fc.ts(a.created_at),
        'holder_name', h.name, 'holder_erased', h.erased_at IS NOT NULL)
        || fc.holder_sealed_json(h => h) || jsonb_build_object(
        'parent_account_id', (SELECT uid FROM fc.accounts p WHERE p.id = a.parent_id),
        'funding_mode', a.funding_mode, 'label', a.label)
    FROM fc.account_holders h WHERE h.account_id = a.id
$$;

-- Changes an account holder's phone (where its step-up codes go), given sealed
-- with its blind index as fc.open_account takes it. The step-up gate ran
-- before, in the same transaction, with its code sent to the old phone
-- (STEP_UP_KIND_PHONE_CHANGE). Under the account's lock, as fc.create_step_up
-- reads the phone under it. Refused (HOLDER_NOT_CHANGEABLE) for an erased
-- holder, or when the row's ID number is sealed under another data key than
-- the new phone would be (one row has one seal_key_id). The stored answer names the account
-- only: no phone in the idempotency table.
CREATE OR REPLACE FUNCTION fc.change_holder_phone(
    p_caller text, p_request_id text, p_request_hash bytea, p_account_uid uuid,
    p_phone_sealed bytea, p_phone_index bytea, p_seal_key_id text, p_now timestamptz)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb;
    v_account  bigint;
BEGIN
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    SELECT id INTO v_account FROM fc.accounts WHERE uid = p_account_uid AND kind <> fc.account_kind_system();
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCNF0', MESSAGE = 'ACCOUNT_NOT_FOUND', DETAIL = 'account_id';
    END IF;
    PERFORM pg_advisory_xact_lock(v_account);
    UPDATE fc.account_holders h
       SET phone_sealed = p_phone_sealed, phone_index = p_phone_index, phone_plaintext = NULL,
           seal_key_id = p_seal_key_id
     WHERE h.account_id = v_account AND h.erased_at IS NULL
       AND (h.id_number_sealed IS NULL OR h.seal_key_id = p_seal_key_id);
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLDER_NOT_CHANGEABLE',
            DETAIL = 'account_id';
    END IF;
    RETURN fc.remember(p_caller, p_request_id, 'change_holder_phone', p_request_hash,
                       jsonb_build_object('account_id', p_account_uid), p_now);
END $$;
