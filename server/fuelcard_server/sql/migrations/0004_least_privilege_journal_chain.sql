-- Issue 15: least privilege in the database, and the journal's hash chain.
--
-- Two roles. fuelcard_owner (NOLOGIN) owns schema fc, its tables and its functions; nobody
-- logs in as it, and migrations act as it (a superuser, or an admin that is a member of it).
-- fuelcard_app (LOGIN) is the role `fuelcard serve` connects as: it may read, call the entry
-- points (SECURITY DEFINER functions owned by fuelcard_owner) and write the few tables the
-- server's Python writes itself - so it cannot ALTER a table, DISABLE a trigger, or UPDATE,
-- DELETE or TRUNCATE the journal or the audit log. Who may do what is sql/privileges.sql,
-- re-applied after every migrate that changes anything (a re-created function would otherwise
-- lose its SECURITY DEFINER). Roles are cluster-wide: made only if missing (this needs a
-- superuser or a role with CREATEROLE). An external deployment gives fuelcard_app a password
-- (ALTER ROLE fuelcard_app PASSWORD ...) or grants it to the login role it uses.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fuelcard_owner') THEN
        CREATE ROLE fuelcard_owner NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fuelcard_app') THEN
        CREATE ROLE fuelcard_app LOGIN;
    END IF;
END $$;

-- The migrating role acts as the owner (a superuser may anyway; an admin needs the membership).
GRANT fuelcard_owner TO CURRENT_USER;

-- The entry point that issues a card (fc.store_card_number) runs as the owner and stores the
-- sealed segments through the segment schemas' own functions (EXECUTE on those: privileges.sql).
GRANT USAGE ON SCHEMA fc_pan_seg1, fc_pan_seg2, fc_pan_seg3, fc_pan_vault TO fuelcard_owner;

-- table: fc.journal_chain
-- The journal's SM3 hash chain (fuelcard_server/journal_chain.py): one row per entry, in
-- entry id order, written by a background job after the entry committed - never on the pump
-- path. hash = SM3(previous chained entry's hash || canonical encoding of the entry), the
-- first entry's previous hash 32 zero bytes. Append-only (trigger in functions/ledger.sql).
CREATE TABLE fc.journal_chain (
    entry_id bigint NOT NULL,
    hash bytea NOT NULL,
    CONSTRAINT journal_chain_pkey PRIMARY KEY (entry_id),
    CONSTRAINT journal_chain_hash_check CHECK (octet_length(hash) = 32)
);

-- table: fc.journal_chain_state
-- How far the chain job may pass over a missing id (a transaction that took an id and rolled
-- back): every id <= settled_id is final (committed, or never will be). horizon_id is the
-- largest id a round saw; horizon_xmax the xmax of the next round's snapshot (0: not noted
-- yet). Once the oldest running transaction is newer than it, every id up to horizon_id is
-- final too (journal_chain.py says why).
CREATE TABLE fc.journal_chain_state (
    one boolean DEFAULT true NOT NULL,
    settled_id bigint DEFAULT 0 NOT NULL,
    horizon_id bigint DEFAULT 0 NOT NULL,
    horizon_xmax xid8 DEFAULT '0'::xid8 NOT NULL,
    CONSTRAINT journal_chain_state_pkey PRIMARY KEY (one),
    CONSTRAINT journal_chain_state_one CHECK (one)
);

INSERT INTO fc.journal_chain_state DEFAULT VALUES;
