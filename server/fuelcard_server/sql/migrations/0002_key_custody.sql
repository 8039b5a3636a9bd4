-- Key custody (key_custody.py): the database remembers which key set serves it, so a server
-- started with other keys refuses to start instead of answering CARD_NOT_FOUND for every card.

-- table: fc.key_check_values
-- One check value per key of the set (root, card-index, signing): an HMAC-SM3 of a fixed label
-- under the key, recorded by the first server to start. Never the key: a check value tells a
-- wrong key from the right one and nothing more.
CREATE TABLE fc.key_check_values (
    key_name text PRIMARY KEY,
    check_value text NOT NULL,
    recorded_at timestamp with time zone NOT NULL DEFAULT now()
);

-- table: fc.wrapped_keys
-- Keys kept sealed (SM4-GCM) under a key derived from the root key, like fc.terminal_keys: the
-- data key, from which the PIN pepper, the card-number segment keys and the step-up code key
-- are derived. `fuelcard keys rotate-root` re-seals them under the new root key.
CREATE TABLE fc.wrapped_keys (
    key_name text PRIMARY KEY,
    root_key_id text NOT NULL,
    sealed bytea NOT NULL
);

-- table: fc.card_index_rotation
-- A `fuelcard keys rotate-card-index` under way (at most one row): the new key's check value
-- and the last card re-indexed, so an interrupted run resumes where it stopped.
CREATE TABLE fc.card_index_rotation (
    only_one boolean PRIMARY KEY DEFAULT true CHECK (only_one),
    new_check_value text NOT NULL,
    after_card_id bigint NOT NULL DEFAULT 0,
    started_at timestamp with time zone NOT NULL DEFAULT now()
);
