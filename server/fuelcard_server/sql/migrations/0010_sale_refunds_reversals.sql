-- Issue 14, items 1 and 2: refunds of confirmed sales (退款) and reversals of an Authorize
-- by its request id (冲正). Schema only: the functions are in sql/functions/refunds.sql and
-- holds.sql (fc.reverse_authorization).

-- Journal kind 10: a sale refund. Two entries at most per refund, both naming the sale's
-- hold and the refund: the money (FUEL_SALES -> the account that funded the sale) and the
-- points taken back (the spender -> POINTS_ISSUED), when there were any to take.
-- (0008 already allows 1-12: its kind 12 left 10 and 11 to sale refunds. Restated here so
-- that this migration says what it needs.)
ALTER TABLE fc.journal DROP CONSTRAINT journal_kind_check;
ALTER TABLE fc.journal ADD CONSTRAINT journal_kind_check CHECK (kind BETWEEN 1 AND 12);
ALTER TABLE fc.journal ADD COLUMN sale_refund_id bigint;
CREATE INDEX journal_sale_refund ON fc.journal (sale_refund_id) WHERE sale_refund_id IS NOT NULL;

-- The sale a points lot was earned on (NULL: a pooled lot, or one older than this
-- migration): a refund takes the points back from that lot first. Found through the
-- existing points_lots_open index (the spender's open lots), so no index of its own.
ALTER TABLE fc.points_lots ADD COLUMN hold_id bigint;

-- Step-up kind 7: a sale refund above step_up_sale_refund_above_fen (subject: the hold).
ALTER TABLE fc.step_up_challenges DROP CONSTRAINT step_up_challenges_kind_check;
ALTER TABLE fc.step_up_challenges ADD CONSTRAINT step_up_challenges_kind_check
    CHECK (kind BETWEEN 1 AND 7);

-- One row per refund of a CONFIRMED hold. Their sum per hold never exceeds the hold's
-- settled amount (fc.refund_sale decides under the account tree's lock; verify checks).
-- points_taken: what was taken back from the spender's points; points_shortfall: what was
-- due pro rata but already spent (the points balance never goes negative).
CREATE TABLE fc.sale_refunds (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid              uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    hold_id          bigint NOT NULL REFERENCES fc.holds (id),
    account_id       bigint NOT NULL REFERENCES fc.accounts (id),
    amount_fen       bigint NOT NULL CHECK (amount_fen > 0),
    points_taken     bigint NOT NULL CHECK (points_taken >= 0),
    points_shortfall bigint NOT NULL CHECK (points_shortfall >= 0),
    reason           text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    refunded_by      text NOT NULL,
    created_at       timestamptz NOT NULL
);
CREATE INDEX sale_refunds_by_hold ON fc.sale_refunds (hold_id, id);
