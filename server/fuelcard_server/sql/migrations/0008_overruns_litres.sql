-- Issue 14, items 3 and 5: pump overruns booked with a receivable for what the account could
-- not cover, and channel payments the core must refuse recorded with a refund instruction.
-- Schema only: the functions are in sql/functions/holds.sql (fc.confirm, fc.book_receivable)
-- and funding.sql (fc.recharge, fc.repay_receivables).

------------------------------------------------------------------------------
-- Overrun tolerance (item 3)
------------------------------------------------------------------------------

-- How far a pump may deliver past its hold and still be booked: the larger of an absolute
-- amount and a share of the hold (a 300 yuan preset overrunning by 1 % is normal pump
-- run-on; a 10 yuan hold confirmed for 200 yuan is a fault or a fraud). Kept in fc.config
-- rather than passed by the server: fc.confirm reads them only when a confirm is above its
-- hold, so the common path pays nothing for them.
INSERT INTO fc.config VALUES
    ('overrun_tolerance_fen', '1000'),
    ('overrun_tolerance_pct', '5');

------------------------------------------------------------------------------
-- Receivables (item 3)
------------------------------------------------------------------------------

-- The part of an overrun the account's balance could not pay. The sale is booked in full
-- (the fuel is gone): FUEL_SALES is credited the whole sale, the account's balance pays what
-- it can (a PURCHASE entry, as always), and the rest is a journal entry of kind 12 from the
-- RECEIVABLES system account to FUEL_SALES. RECEIVABLES' journal balance is then minus what
-- customers owe. The account's balance never goes below its held money (held_within_balance
-- still holds): what it owes is receivable_fen, not a negative balance. The next recharge
-- pays it first, oldest receivable first, with kind 12 entries from the account to
-- RECEIVABLES naming the recharge and the receivable's hold.
INSERT INTO fc.accounts (kind, system_code, created_at) VALUES (100, 'RECEIVABLES', now());

-- Kind 12, OVERRUN_RECEIVABLE (10 and 11 are left to the sale refunds of the same issue).
ALTER TABLE fc.journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE fc.journal ADD CONSTRAINT journal_kind_check CHECK (kind BETWEEN 1 AND 12);

-- What the account owes in total (the sum of its receivables' amount - repaid_fen), kept on
-- the row fc.authorize already reads under the lock: an account owing anything declines new
-- authorizations (RECEIVABLE_OUTSTANDING) with no extra query.
ALTER TABLE fc.accounts
    ADD COLUMN receivable_fen bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT receivable_not_negative CHECK (receivable_fen >= 0),
    ADD CONSTRAINT system_receivable_not_stored CHECK (kind <> 100 OR receivable_fen = 0);

-- One per overrun hold whose account could not pay all of it.
CREATE TABLE fc.receivables (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES fc.accounts (id),
    hold_id     bigint NOT NULL UNIQUE REFERENCES fc.holds (id),
    amount_fen  bigint NOT NULL CHECK (amount_fen > 0),
    repaid_fen  bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL,
    repaid_at   timestamptz,
    CONSTRAINT receivable_repaid_within_amount CHECK (repaid_fen BETWEEN 0 AND amount_fen),
    CONSTRAINT receivable_repaid_when_whole CHECK ((repaid_at IS NOT NULL) = (repaid_fen = amount_fen))
);
-- A recharge's look for what its account still owes, oldest first.
CREATE INDEX receivables_open ON fc.receivables (account_id, id) WHERE repaid_at IS NULL;

------------------------------------------------------------------------------
-- Refused channel payments (item 5)
------------------------------------------------------------------------------

-- One exception per refused channel payment: the channel's re-notifications of it find it
-- and answer the same refund instruction.
CREATE UNIQUE INDEX settlement_exceptions_channel_payment
    ON fc.settlement_exceptions (channel, channel_txn_id) WHERE kind = 3;

-- A sale may now exceed its hold (an overrun within the tolerance): settled_fen is what was
-- sold, up to the hold plus what fc.confirm's tolerance allowed, so the bound on the hold's
-- amount goes; that the sale is booked in full is verify's confirmed_hold_settled_once.
ALTER TABLE fc.holds DROP CONSTRAINT settled_only_when_confirmed;
ALTER TABLE fc.holds ADD CONSTRAINT settled_only_when_confirmed
    CHECK (settled_fen >= 0 AND (state = 2 OR settled_fen = 0));

------------------------------------------------------------------------------
-- Prices and litres (item 4)
------------------------------------------------------------------------------

-- The posted price of a product at a station from a moment on (挂牌价), in integer fen per
-- litre as pumps show it: the price in force at t is the row with the latest effective_at
-- <= t. ControlService.SetPrice writes it; fc.confirm compares the pump's unit price with
-- it and fc.authorize converts money into litres with it for a card's litre caps.
CREATE TABLE fc.prices (
    station_id     text NOT NULL,
    product        smallint NOT NULL CHECK (product BETWEEN 1 AND 20),
    effective_at   timestamptz NOT NULL,
    unit_price_fen bigint NOT NULL CHECK (unit_price_fen > 0),
    set_by         text NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (station_id, product, effective_at)
);

-- What a confirm reported that does not add up, recorded on the sale (the confirm still
-- succeeds: the pump's amount is what was charged): amount_mismatch when volume_ml x
-- unit_price_fen / 1000 is more than one fen from the amount, price_mismatch when the unit
-- price is not the station's posted price. volume_counted: the sale's volume was charged to
-- its card's litre counters (a card with litre caps), which verify checks against.
ALTER TABLE fc.holds
    ADD COLUMN amount_mismatch boolean NOT NULL DEFAULT false,
    ADD COLUMN price_mismatch boolean NOT NULL DEFAULT false,
    ADD COLUMN volume_counted boolean NOT NULL DEFAULT false;

-- A card's litre caps (as Sinopec and WEX fleet cards have): per fill, per business day,
-- per business month, in millilitres; NULL: none.
ALTER TABLE fc.cards
    ADD COLUMN limit_fill_ml bigint CHECK (limit_fill_ml > 0),
    ADD COLUMN limit_daily_ml bigint CHECK (limit_daily_ml > 0),
    ADD COLUMN limit_monthly_ml bigint CHECK (limit_monthly_ml > 0);

-- The litres a card with litre caps bought per business day (the hold's usage_day): charged
-- by fc.confirm with the confirmed volume. Only cards with litre caps are counted, so the
-- pump path of every other card writes nothing more.
CREATE TABLE fc.volume_usage (
    card_id   bigint NOT NULL REFERENCES fc.cards (id),
    day       date NOT NULL,
    volume_ml bigint NOT NULL CHECK (volume_ml >= 0),
    PRIMARY KEY (card_id, day)
);

-- A change of a card's litre caps is a control change like its money caps.
ALTER TABLE fc.control_changes DROP CONSTRAINT control_changes_kind_check;
ALTER TABLE fc.control_changes ADD CONSTRAINT control_changes_kind_check
    CHECK (kind IN ('limits', 'raise', 'scope', 'volume_limits'));
