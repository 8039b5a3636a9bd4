-- Issue 14, items 6 and 7: settlement exceptions become a resource finance follows up, and
-- manual adjustments under dual control (maker-checker) get their table, journal kind and
-- system account. Schema only: the functions are in sql/functions/exceptions.sql and
-- adjustments.sql.

------------------------------------------------------------------------------
-- Settlement exceptions (item 6)
------------------------------------------------------------------------------

-- Until now one kind only: a late confirm that found the money gone (fc.confirm writes it,
-- naming the EXPIRED hold). Later flows record others in the same table, each naming what
-- it is about:
--   kind 1  LATE_CONFIRM_NO_FUNDS     the hold (fc.confirm)
--   kind 2  OVERRUN_SHORTFALL         the hold whose pump delivered more than was covered
--   kind 3  CHANNEL_PAYMENT_REFUSED   the channel payment (channel, channel_txn_id; the
--                                     recharge too when one was booked)
-- The default is kind 1 so that fc.confirm's insert, which names no kind, keeps its meaning;
-- any other kind is written with its kind and its reference (the CHECK below refuses a kind
-- without the reference it needs). One exception per hold, as before (UNIQUE hold_id): a
-- hold is confirmed once, so it falls short in one way at most.
--
-- Who closed it: resolved_at alone (resolved_by NULL) is fc.confirm closing it because a
-- later confirm paid the sale after all (SETTLED); resolved_by and resolution are a
-- person's follow-up (RESOLVED, fc.resolve_settlement_exception).
ALTER TABLE fc.settlement_exceptions
    ALTER COLUMN hold_id DROP NOT NULL,
    ADD COLUMN kind smallint NOT NULL DEFAULT 1,
    ADD COLUMN recharge_id bigint REFERENCES fc.recharges (id),
    ADD COLUMN channel smallint,
    ADD COLUMN channel_txn_id text,
    ADD COLUMN resolution text,
    ADD COLUMN resolved_by text,
    ADD CONSTRAINT settlement_exceptions_kind_check CHECK (kind BETWEEN 1 AND 3),
    ADD CONSTRAINT settlement_exceptions_channel_check CHECK (channel BETWEEN 1 AND 5),
    ADD CONSTRAINT settlement_exception_names_its_cause CHECK (
        CASE kind WHEN 3 THEN channel IS NOT NULL AND channel_txn_id IS NOT NULL
                  ELSE hold_id IS NOT NULL END),
    ADD CONSTRAINT settlement_exception_resolved_with_a_note CHECK (
        (resolution IS NULL) = (resolved_by IS NULL)
        AND (resolved_by IS NULL OR resolved_at IS NOT NULL));

COMMENT ON COLUMN fc.settlement_exceptions.kind IS
    '1 late confirm without funds, 2 overrun shortfall, 3 refused channel payment';

------------------------------------------------------------------------------
-- Manual adjustments (item 7)
------------------------------------------------------------------------------

-- The other side of every adjustment: a credit to a customer moves money out of it, a
-- debit into it, so its balance (computed from the journal, as for every system account)
-- is what finance has corrected by hand, net.
INSERT INTO fc.accounts (kind, system_code, created_at) VALUES (100, 'ADJUSTMENTS', now());

-- Journal kind 9: a manual adjustment, between a customer account and ADJUSTMENTS, naming
-- its adjustment (journal.adjustment_id; NULL on every other kind).
ALTER TABLE fc.journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE fc.journal ADD CONSTRAINT journal_kind_check CHECK (kind BETWEEN 1 AND 9);
ALTER TABLE fc.journal ADD COLUMN adjustment_id bigint;

-- One admin proposes, another decides. States: 1 PROPOSED, 2 APPROVED, 3 REJECTED; only
-- PROPOSED moves, once. Direction: 1 credit (money to the account), 2 debit (from it).
-- The proposer may withdraw (reject) a proposal; nobody approves their own (the CHECK holds
-- the approval to that even if a function forgot).
CREATE TABLE fc.adjustments (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid          uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    account_id   bigint NOT NULL REFERENCES fc.accounts (id),
    direction    smallint NOT NULL CHECK (direction IN (1, 2)),
    amount_fen   bigint NOT NULL CHECK (amount_fen > 0),
    reason       text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    state        smallint NOT NULL DEFAULT 1 CHECK (state IN (1, 2, 3)),
    proposed_by  text NOT NULL,
    proposed_at  timestamptz NOT NULL,
    decided_by   text,
    decided_at   timestamptz,
    decision_note text,
    CONSTRAINT adjustment_decided_once CHECK (
        (state = 1) = (decided_by IS NULL) AND (decided_by IS NULL) = (decided_at IS NULL)),
    CONSTRAINT adjustment_approved_by_another CHECK (state <> 2 OR decided_by <> proposed_by)
);
-- Finance's queue: the proposals awaiting a decision, newest first.
CREATE INDEX adjustments_proposed ON fc.adjustments (id) WHERE state = 1;
-- verify's invariant and an account's history.
CREATE INDEX journal_adjustment ON fc.journal (adjustment_id) WHERE adjustment_id IS NOT NULL;
