-- Issue 17: what a pump cycle writes besides its rows.

-- Foreign keys checked on every hold and every points lot. Each check is a query per insert
-- and a row lock (FOR KEY SHARE) on the row it names, and a lock is a WAL record that dirties
-- the page: on the card, which the pump otherwise only reads, that was a full-page image of a
-- card page after each checkpoint (at a million cards, nearly one per authorization). The
-- invariants they kept are kept another way: accounts and cards are never deleted (no
-- function deletes one, and the serving role may not: sql/privileges.sql), a card never
-- changes account, and fc.open_hold and fc.book_sale insert only ids read from those rows
-- under the account's lock. `fuelcard verify` checks it (holds_name_their_card_and_accounts,
-- points_lots_name_an_account), more strictly than the keys did: a hold's spender is its
-- card's account and its money that account's or, for a SHARED sub-account, the parent's.
ALTER TABLE fc.holds
    DROP CONSTRAINT holds_account_id_fkey,
    DROP CONSTRAINT holds_card_id_fkey,
    DROP CONSTRAINT holds_spender_account_id_fkey;
ALTER TABLE fc.points_lots DROP CONSTRAINT points_lots_account_id_fkey;
