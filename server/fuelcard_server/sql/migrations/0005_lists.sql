-- The list RPCs (AccountService.ListSubAccounts, ListCards) and the JSON API's
-- principals and sessions (fuelcard-api; issue 18).

-- Keyset pages of a parent's sub-accounts and of an account's cards, oldest
-- first: each page is an index range scan, no sort, however large the fleet.
-- They replace the single-column indexes (every query those served, these
-- serve too).
CREATE INDEX accounts_children_by_id ON fc.accounts USING btree (parent_id, id)
    WHERE (parent_id IS NOT NULL);
DROP INDEX fc.accounts_children;
CREATE INDEX cards_account_by_id ON fc.cards USING btree (account_id, id);
DROP INDEX fc.cards_account;

-- table: fc.principals
-- The people who log in to the JSON API: a card holder (kind 1; a family's
-- main-card holder is the holder of the parent account) or a fleet manager
-- (kind 2). A principal has authority over its account and that account's
-- sub-accounts (a family's secondary cards, a fleet's vehicles) and their
-- cards. Minimal until principals become first-class in the core (issue 15
-- item 6): the core still sends step-up codes to the subject's holder.
-- password_hash: "scrypt$<log2 n>$<r>$<p>$<salt hex>$<hash hex>" (hashlib.scrypt),
-- never the password. phone: where step-up codes for this principal go; never
-- logged. login: what the person types (not a phone number or ID number).
CREATE TABLE fc.principals (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid uuid DEFAULT gen_random_uuid() NOT NULL UNIQUE,
    login text NOT NULL UNIQUE,
    kind smallint NOT NULL,
    account_id bigint NOT NULL REFERENCES fc.accounts (id),
    password_hash text NOT NULL,
    phone text NOT NULL DEFAULT '',
    created_at timestamp with time zone NOT NULL,
    disabled_at timestamp with time zone,
    CONSTRAINT principals_kind_check CHECK ((kind = ANY (ARRAY[1, 2]))),
    CONSTRAINT principals_login_check CHECK ((login ~ '^[A-Za-z0-9._@-]{3,64}$'))
);
CREATE INDEX principals_account ON fc.principals USING btree (account_id);

-- table: fc.api_sessions
-- A JSON API session: the SHA-256 of its bearer token (the token itself is
-- stored nowhere), whose it is, and when it stops working. Expired rows are
-- refused on sight and deleted by the API's own sweep.
CREATE TABLE fc.api_sessions (
    token_hash bytea PRIMARY KEY,
    principal_id bigint NOT NULL REFERENCES fc.principals (id) ON DELETE CASCADE,
    created_at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    CONSTRAINT api_sessions_token_hash_check CHECK ((octet_length(token_hash) = 32))
);
CREATE INDEX api_sessions_expiry ON fc.api_sessions USING btree (expires_at);
