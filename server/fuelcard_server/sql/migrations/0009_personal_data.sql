-- Personal data sealed at rest (issue 15, item 5). Phone and ID numbers are kept SM4-GCM sealed
-- under a key derived from the data key (holder_data.py), with an HMAC-SM3 blind index each to
-- find a holder by them; the key is never in the database, so this migration cannot seal what an
-- older database holds in plaintext. It renames those columns to *_plaintext (nullable, '' made
-- NULL): the server seals them in batches when it starts, as `fuelcard privacy seal` does, and
-- nulls them. Nothing reads them after that; a later migration may drop them.
ALTER TABLE fc.account_holders RENAME COLUMN phone TO phone_plaintext;
ALTER TABLE fc.account_holders RENAME COLUMN id_number TO id_number_plaintext;
ALTER TABLE fc.account_holders
    ALTER COLUMN phone_plaintext DROP NOT NULL,
    ALTER COLUMN phone_plaintext DROP DEFAULT,
    ALTER COLUMN id_number_plaintext DROP NOT NULL,
    ALTER COLUMN id_number_plaintext DROP DEFAULT,
    -- sealed values and blind indexes: NULL when the holder gave none (or was erased)
    ADD COLUMN phone_sealed bytea,
    ADD COLUMN phone_index bytea,
    ADD COLUMN id_number_sealed bytea,
    ADD COLUMN id_number_index bytea,
    -- the data key's id (keys.root_key_id) the values are sealed under
    ADD COLUMN seal_key_id text,
    -- set when the holder's personal data was erased (fc.erase_holder): the account is closed
    -- and its name is a placeholder
    ADD COLUMN erased_at timestamptz,
    ADD CONSTRAINT account_holders_phone_sealed CHECK ((phone_sealed IS NULL) = (phone_index IS NULL)),
    ADD CONSTRAINT account_holders_id_number_sealed
        CHECK ((id_number_sealed IS NULL) = (id_number_index IS NULL));
UPDATE fc.account_holders SET phone_plaintext = NULL WHERE phone_plaintext = '';
UPDATE fc.account_holders SET id_number_plaintext = NULL WHERE id_number_plaintext = '';
CREATE INDEX account_holders_phone_index ON fc.account_holders (phone_index) WHERE phone_index IS NOT NULL;
CREATE INDEX account_holders_id_number_index ON fc.account_holders (id_number_index)
    WHERE id_number_index IS NOT NULL;
-- rows an upgrade left in plaintext, for the sealing pass
CREATE INDEX account_holders_plaintext ON fc.account_holders (account_id)
    WHERE phone_plaintext IS NOT NULL OR id_number_plaintext IS NOT NULL;
-- open_account takes the sealed values now
DROP FUNCTION IF EXISTS fc.open_account(text, text, bytea, smallint, text, text, text, uuid, smallint, text,
                              timestamptz);
-- a step-up of the holder for the data-subject export (STEP_UP_KIND_HOLDER_DATA_EXPORT = 6)
ALTER TABLE fc.step_up_challenges DROP CONSTRAINT step_up_challenges_kind_check;
ALTER TABLE fc.step_up_challenges ADD CONSTRAINT step_up_challenges_kind_check
    CHECK (((kind >= 1) AND (kind <= 6)));
