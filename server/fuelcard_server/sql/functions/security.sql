-- Terminal counters and card PINs: verification, change, reset and the lockout.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- Why a PIN card may not pay now, given the server's verdict on the PIN
-- block (NULL: none was sent), or NULL if it may. Records failures and the
-- lock; a good PIN clears the failure count.
CREATE OR REPLACE FUNCTION fc.pin_refusal(p_card_id bigint, p_pin_ok boolean, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_pin fc.card_pins;
    v_max integer := (SELECT value::integer FROM fc.config WHERE key = 'pin_max_attempts');
BEGIN
    SELECT * INTO v_pin FROM fc.card_pins WHERE card_id = p_card_id FOR UPDATE;
    IF v_pin.locked_at IS NOT NULL THEN
        RETURN 'PIN_LOCKED';
    ELSIF p_pin_ok IS NULL THEN
        RETURN 'PIN_REQUIRED';
    ELSIF NOT p_pin_ok THEN
        UPDATE fc.card_pins
           SET failed_attempts = failed_attempts + 1,
               locked_at = CASE WHEN failed_attempts + 1 >= v_max THEN p_now END
         WHERE card_id = p_card_id;
        RETURN CASE WHEN v_pin.failed_attempts + 1 >= v_max THEN 'PIN_LOCKED' ELSE 'WRONG_PIN' END;
    ELSIF v_pin.failed_attempts > 0 THEN
        UPDATE fc.card_pins SET failed_attempts = 0 WHERE card_id = p_card_id;
    END IF;
    RETURN NULL;
END $$;

-- Sets a card's PIN hash (the server checked the old PIN, if any).
CREATE OR REPLACE FUNCTION fc.set_pin(p_card_id bigint, p_pin_hash text, p_now timestamptz) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO fc.card_pins (card_id, pin_hash, changed_at) VALUES (p_card_id, p_pin_hash, p_now)
    ON CONFLICT (card_id) DO UPDATE
       SET pin_hash = excluded.pin_hash, failed_attempts = 0, locked_at = NULL,
           changed_at = excluded.changed_at;
    UPDATE fc.cards SET has_pin = true WHERE id = p_card_id;
$$;

-- A terminal is (station, terminal id): two stations' "T1" count apart.
CREATE OR REPLACE FUNCTION fc.advance_counter(p_station text, p_terminal text, p_counter bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fc.terminals AS t (station_id, terminal_id, last_counter)
    VALUES (p_station, p_terminal, p_counter)
    ON CONFLICT (station_id, terminal_id) DO UPDATE SET last_counter = excluded.last_counter
     WHERE t.last_counter < excluded.last_counter;
    RETURN FOUND;
END $$;

-- Admin PIN reset
------------------------------------------------------------------------------

-- Sets a card's new PIN hash and clears its lockout (the server decoded the
-- PIN block and hashed the PIN; the step-up gate ran before, in the same
-- transaction).
CREATE OR REPLACE FUNCTION fc.reset_pin(p_caller text, p_request_id text, p_request_hash bytea,
                             p_card_uid uuid, p_pin_hash text, p_now timestamptz)
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
    -- the lock authorize takes: a reset lands between two reservations
    PERFORM pg_advisory_xact_lock(v_card.account_id);
    PERFORM fc.set_pin(v_card.id, p_pin_hash, p_now);
    RETURN fc.remember(p_caller, p_request_id, 'reset_pin', p_request_hash,
                       jsonb_build_object('card_id', v_card.uid), p_now);
END $$;

-- Changing a PIN (SecurityService.SetCardPin, from a terminal) obeys the
-- same lockout as paying with it: the server's verdict on the old PIN goes
-- through fc.pin_refusal under the PIN row's lock (the lock fc.authorize's
-- check takes too), so a wrong one counts towards the lock, a locked card is
-- refused, and only a right one replaces the hash. Otherwise anyone holding
-- a card number could guess its PIN at SetCardPin without limit, and the
-- right guess would unlock the card (fc.set_pin clears the lock). The lock
-- is cleared only by fc.set_pin, which is left to fc.reset_pin (an
-- operator, with step-up verification).

-- Returns NULL when the PIN was changed, else why not: PIN_LOCKED,
-- WRONG_PIN (counted, or the card got a PIN since the server looked),
-- PIN_REQUIRED (no old PIN block sent; not counted). p_had_pin: the card
-- had a PIN when the server read its hash; p_old_ok: the server's verdict
-- on the old PIN block (NULL: none sent); p_pin_hash: the new PIN's hash
-- (NULL when the old PIN is already known to be wrong: nothing to set).
-- Refusals return rather than raise, so that a counted failure commits.
CREATE OR REPLACE FUNCTION fc.change_pin(p_card_id bigint, p_had_pin boolean, p_old_ok boolean,
                              p_pin_hash text, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_refusal text;
BEGIN
    PERFORM 1 FROM fc.card_pins WHERE card_id = p_card_id FOR UPDATE;
    IF NOT FOUND THEN
        -- the card's first PIN (p_had_pin is false: PINs are never deleted)
        ASSERT p_pin_hash IS NOT NULL, 'a first PIN needs its hash';
        PERFORM fc.set_pin(p_card_id, p_pin_hash, p_now);
        RETURN NULL;
    END IF;
    IF NOT p_had_pin THEN
        RETURN 'WRONG_PIN';  -- set by another request meanwhile: no old PIN was checked
    END IF;
    v_refusal := fc.pin_refusal(p_card_id, p_old_ok, p_now);
    IF v_refusal IS NOT NULL THEN
        RETURN v_refusal;
    END IF;
    ASSERT p_pin_hash IS NOT NULL, 'a right old PIN comes with the new hash';
    UPDATE fc.card_pins SET pin_hash = p_pin_hash, failed_attempts = 0, changed_at = p_now
     WHERE card_id = p_card_id;
    RETURN NULL;
END $$;
