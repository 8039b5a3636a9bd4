-- Issue 14, item 9: defects found by an adversarial review. Schema for the expiry sweep's
-- failures, and the backfill an upgraded database needs before the sweep can release every
-- open hold. The functions are in sql/functions/holds.sql.

-- Accounts whose expired holds the sweep could not release (fc.sweep_account): set aside
-- until retry_at so that one account never wedges the sweep for all the others, and
-- reported once by the job (reported). The row goes when a later sweep of the account
-- succeeds.
CREATE TABLE fc.hold_sweep_failures (
    account_id      bigint PRIMARY KEY REFERENCES fc.accounts (id),
    sqlstate        text NOT NULL,
    message         text NOT NULL,
    failures        integer NOT NULL CHECK (failures > 0),
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    retry_at        timestamptz NOT NULL,
    reported        boolean NOT NULL DEFAULT false
);

-- Releasing a hold gives back the usage it charged (fc.charge_usage), and refuses when the
-- counters are missing or would go below zero. A database upgraded from an older schema can
-- hold open holds (AUTHORIZED or SUSPENDED) made before their day's counters were kept, and
-- such a hold could never be released. Every counter is raised to at least what the open
-- holds charging it reserve: the card, the spender and the spender's parent, on the hold's
-- usage day. On a database where every hold charged its counters this changes nothing.
-- (States as numbers, 1 AUTHORIZED and 5 SUSPENDED: functions/states.sql is applied after the
-- migrations.)
INSERT INTO fc.usage (scope_kind, scope_id, day, amount_fen)
SELECT scope_kind, scope_id, usage_day, sum(amount_fen)
  FROM (SELECT 1::smallint AS scope_kind, h.card_id AS scope_id, h.usage_day, h.amount_fen
          FROM fc.holds h WHERE h.state IN (1, 5)
        UNION ALL
        SELECT 2::smallint, h.spender_account_id, h.usage_day, h.amount_fen
          FROM fc.holds h WHERE h.state IN (1, 5)
        UNION ALL
        SELECT 2::smallint, s.parent_id, h.usage_day, h.amount_fen
          FROM fc.holds h JOIN fc.accounts s ON s.id = h.spender_account_id
         WHERE h.state IN (1, 5) AND s.parent_id IS NOT NULL) charged
 GROUP BY scope_kind, scope_id, usage_day
ON CONFLICT (scope_kind, scope_id, day)
DO UPDATE SET amount_fen = greatest(fc.usage.amount_fen, excluded.amount_fen);
