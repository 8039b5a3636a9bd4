-- 0015: changing a PIN (SecurityService.SetCardPin, from a terminal) obeys
-- the same lockout as paying with it. Before, the server compared the old
-- PIN block with the stored hash and, on a match, called fc.set_pin, which
-- clears the lock: a wrong old PIN was never counted and a locked card was
-- never refused, so anyone holding a card number could guess its PIN at
-- SetCardPin without limit, and the right guess unlocked the card. Now the
-- server's verdict on the old PIN goes through fc.pin_refusal under the
-- PIN row's lock (the lock fc.authorize's check takes too): a wrong one
-- counts towards the lock, a locked card is refused, and only a right one
-- replaces the hash. The lock itself is cleared only by fc.set_pin, which
-- is left to fc.reset_pin (an operator, with step-up verification).

-- Returns NULL when the PIN was changed, else why not: PIN_LOCKED,
-- WRONG_PIN (counted, or the card got a PIN since the server looked),
-- PIN_REQUIRED (no old PIN block sent; not counted). p_had_pin: the card
-- had a PIN when the server read its hash; p_old_ok: the server's verdict
-- on the old PIN block (NULL: none sent); p_pin_hash: the new PIN's hash
-- (NULL when the old PIN is already known to be wrong: nothing to set).
-- Refusals return rather than raise, so that a counted failure commits.
CREATE FUNCTION fc.change_pin(p_card_id bigint, p_had_pin boolean, p_old_ok boolean,
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
