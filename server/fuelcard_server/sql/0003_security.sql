-- 0003: terminals (transaction counters for replay protection), working keys
-- stored only sealed under the root key, and payment channels' signing keys.

CREATE TABLE fc.terminals (
    terminal_id  text PRIMARY KEY,
    -- The highest transaction counter accepted: a request must come above it.
    last_counter bigint NOT NULL CHECK (last_counter >= 0)
);

-- Advances a terminal's counter to p_counter if that is higher; false if
-- not (a replay, or a concurrent duplicate that got there first).
CREATE FUNCTION fc.advance_counter(p_terminal text, p_counter bigint) RETURNS boolean
LANGUAGE sql AS $$
    WITH advanced AS (
        INSERT INTO fc.terminals AS t (terminal_id, last_counter) VALUES (p_terminal, p_counter)
        ON CONFLICT (terminal_id) DO UPDATE SET last_counter = excluded.last_counter
         WHERE t.last_counter < excluded.last_counter
        RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM advanced)
$$;

-- The start of every terminal request: the stored answer of a replay, or
-- NULL after advancing the terminal's counter (when the request carries one).
-- A counter at or below the last one is refused, unless a concurrent
-- duplicate of this very request took it first: then its answer is returned.
CREATE FUNCTION fc.admit(p_caller text, p_request_id text, p_request_hash bytea,
                         p_terminal text, p_counter bigint)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_response jsonb := fc.replay(p_caller, p_request_id, p_request_hash);
BEGIN
    IF v_response IS NOT NULL OR p_counter IS NULL OR fc.advance_counter(p_terminal, p_counter) THEN
        RETURN v_response;
    END IF;
    v_response := fc.replay(p_caller, p_request_id, p_request_hash);
    IF v_response IS NOT NULL THEN
        RETURN v_response;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'FCUA0', MESSAGE = 'COUNTER_REPLAYED',
        DETAIL = 'terminal_counter';
END $$;

-- Working keys (三级密钥体制, the middle tier): per terminal and version, sealed
-- (SM4-GCM) under a key derived from the root key, with the window and the
-- terminal bound to the seal. The root key itself is never in the database.
CREATE TABLE fc.terminal_keys (
    terminal_id  text        NOT NULL,
    version      integer     NOT NULL,
    valid_from   timestamptz NOT NULL,
    valid_until  timestamptz NOT NULL,
    root_key_id  text        NOT NULL,
    sealed       bytea       NOT NULL,
    PRIMARY KEY (terminal_id, version),
    CHECK (valid_until > valid_from)
);

-- Payment channels' SM2 public keys, for their signed notifications.
CREATE TABLE fc.channel_keys (
    channel        smallint PRIMARY KEY CHECK (channel BETWEEN 1 AND 5),
    public_key_hex text        NOT NULL CHECK (public_key_hex ~ '^[0-9a-f]{128}$'),
    registered_at  timestamptz NOT NULL
);

-- PINs: only a salted slow hash (scrypt, with a pepper from the root key) is
-- stored, never the PIN; the check itself runs in the server, which passes
-- authorize its verdict. Too many wrong PINs in a row lock the card.
CREATE TABLE fc.card_pins (
    card_id         bigint PRIMARY KEY REFERENCES fc.cards (id),
    pin_hash        text        NOT NULL,
    failed_attempts smallint    NOT NULL DEFAULT 0 CHECK (failed_attempts >= 0),
    locked_at       timestamptz,
    changed_at      timestamptz NOT NULL
);
ALTER TABLE fc.cards ADD COLUMN has_pin boolean NOT NULL DEFAULT false;
INSERT INTO fc.config VALUES ('pin_max_attempts', '3');

-- Why a PIN card may not pay now, given the server's verdict on the PIN
-- block (NULL: none was sent), or NULL if it may. Records failures and the
-- lock; a good PIN clears the failure count.
CREATE FUNCTION fc.pin_refusal(p_card_id bigint, p_pin_ok boolean, p_now timestamptz)
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
CREATE FUNCTION fc.set_pin(p_card_id bigint, p_pin_hash text, p_now timestamptz) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO fc.card_pins (card_id, pin_hash, changed_at) VALUES (p_card_id, p_pin_hash, p_now)
    ON CONFLICT (card_id) DO UPDATE
       SET pin_hash = excluded.pin_hash, failed_attempts = 0, locked_at = NULL,
           changed_at = excluded.changed_at;
    UPDATE fc.cards SET has_pin = true WHERE id = p_card_id;
$$;
