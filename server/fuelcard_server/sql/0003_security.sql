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
