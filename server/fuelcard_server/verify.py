"""`fuelcard verify`: every ledger invariant, checked against the database.

Each check is a query that returns the offending rows (at most a sample); an
empty result means the invariant holds. The checks read a consistent
snapshot (REPEATABLE READ), so they can run while the server is taking
traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuelcard_server import journal_chain
from fuelcard_server.db import one_shot
from fuelcard_server.states import (
    ACCOUNT_KIND_SYSTEM,
    Asset,
    FundingMode,
    HoldState,
    LedgerEntryKind,
    ReviewState,
    SettlementKind,
)


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    sql: str  # "" for JOURNAL_CHAIN, which is recomputed in Python
    # A table that came with a later migration: on a database not yet migrated that far (verify
    # before `fuelcard migrate`), the table is missing and so is anything to check.
    since_table: str = ""


@dataclass(frozen=True)
class Violation:
    check: str
    description: str
    samples: list[tuple[object, ...]]


JOURNAL_CHAIN = "journal_chain_intact"

_BALANCES = f"""
    WITH moves AS (
        SELECT credit_account_id AS account_id, asset, amount FROM fc.journal
        UNION ALL
        SELECT debit_account_id, asset, -amount FROM fc.journal),
    computed AS (
        SELECT account_id,
               coalesce(sum(amount) FILTER (WHERE asset = {Asset.MONEY:d}), 0) AS money,
               coalesce(sum(amount) FILTER (WHERE asset = {Asset.POINTS:d}), 0) AS points
          FROM moves GROUP BY account_id)
"""

CHECKS: tuple[Check, ...] = (
    Check("balance_equals_journal",
          "a customer account's balance equals the sum of its journal entries",
          _BALANCES + f"""
          SELECT a.id, a.balance_fen, coalesce(c.money, 0)
            FROM fc.accounts a LEFT JOIN computed c ON c.account_id = a.id
           WHERE a.kind <> {ACCOUNT_KIND_SYSTEM} AND a.balance_fen <> coalesce(c.money, 0) LIMIT 10"""),
    Check("points_equal_journal",
          "a customer account's points balance equals the sum of its points entries",
          _BALANCES + f"""
          SELECT a.id, a.points_balance, coalesce(c.points, 0)
            FROM fc.accounts a LEFT JOIN computed c ON c.account_id = a.id
           WHERE a.kind <> {ACCOUNT_KIND_SYSTEM} AND a.points_balance <> coalesce(c.points, 0) LIMIT 10"""),
    Check("ledger_sums_to_zero",
          "stored customer balances plus system balances sum to zero, per asset",
          _BALANCES + f"""
          SELECT asset, total FROM (
            SELECT {Asset.MONEY:d} AS asset,
                   (SELECT coalesce(sum(balance_fen), 0) FROM fc.accounts
                     WHERE kind <> {ACCOUNT_KIND_SYSTEM})
                 + (SELECT coalesce(sum(c.money), 0) FROM computed c
                      JOIN fc.accounts a ON a.id = c.account_id WHERE a.kind = {ACCOUNT_KIND_SYSTEM}) AS total
            UNION ALL
            SELECT {Asset.POINTS:d},
                   (SELECT coalesce(sum(points_balance), 0) FROM fc.accounts
                     WHERE kind <> {ACCOUNT_KIND_SYSTEM})
                 + (SELECT coalesce(sum(c.points), 0) FROM computed c
                      JOIN fc.accounts a ON a.id = c.account_id WHERE a.kind = {ACCOUNT_KIND_SYSTEM})) t
           WHERE total <> 0"""),
    Check("held_equals_active_holds",
          "an account's held amount equals the sum of its AUTHORIZED and SUSPENDED holds",
          f"""
          SELECT a.id, a.held_fen, coalesce(h.total, 0)
            FROM fc.accounts a
            LEFT JOIN (SELECT account_id, sum(amount_fen) AS total FROM fc.holds
                        WHERE state IN ({HoldState.AUTHORIZED:d}, {HoldState.SUSPENDED:d})
                        GROUP BY account_id) h ON h.account_id = a.id
           WHERE a.held_fen <> coalesce(h.total, 0) LIMIT 10"""),
    Check("no_overdraft",
          "no customer account has spent money it does not have",
          "SELECT id, balance_fen, held_fen FROM fc.accounts"
          f" WHERE kind <> {ACCOUNT_KIND_SYSTEM} AND (balance_fen < held_fen OR held_fen < 0) LIMIT 10"),
    Check("journal_references_exist",
          "every journal entry names two existing accounts",
          """
          SELECT j.id FROM fc.journal j
           WHERE NOT EXISTS (SELECT 1 FROM fc.accounts a WHERE a.id = j.debit_account_id)
              OR NOT EXISTS (SELECT 1 FROM fc.accounts a WHERE a.id = j.credit_account_id)
           LIMIT 10"""),
    # The foreign keys of fc.holds and fc.points_lots went in migration 0013 (issue 17: a row
    # lock per insert); what they kept is checked here.
    Check("holds_name_their_card_and_accounts",
          "each hold names an existing card, that card's account as its spender, and as its"
          " funding account the spender or, for a SHARED sub-account, the spender's parent",
          f"""
          SELECT h.id, h.card_id, h.spender_account_id, h.account_id
            FROM fc.holds h
            LEFT JOIN fc.cards c ON c.id = h.card_id
            LEFT JOIN fc.accounts s ON s.id = h.spender_account_id
           WHERE c.id IS NULL OR s.id IS NULL OR c.account_id <> h.spender_account_id
              OR h.account_id <> CASE WHEN s.funding_mode = {FundingMode.SHARED:d} THEN s.parent_id
                                      ELSE s.id END
           LIMIT 10"""),
    Check("points_lots_name_an_account",
          "each points lot names an existing account",
          """
          SELECT l.id, l.account_id FROM fc.points_lots l
           WHERE NOT EXISTS (SELECT 1 FROM fc.accounts a WHERE a.id = l.account_id)
           LIMIT 10"""),
    Check("confirmed_hold_settled_once",
          "each CONFIRMED hold has exactly one purchase entry from its own account, which with"
          " the unpaid part of an overrun (a receivable entry) is its settled amount; no other"
          " hold has one",
          f"""
          SELECT h.id, h.state, h.settled_fen, p.n, p.total, o.total
            FROM fc.holds h
            LEFT JOIN (SELECT hold_id, count(*) AS n, sum(amount) AS total,
                              min(debit_account_id) AS lo, max(debit_account_id) AS hi
                         FROM fc.journal WHERE kind = {LedgerEntryKind.PURCHASE:d}
                        GROUP BY hold_id) p ON p.hold_id = h.id
            LEFT JOIN (SELECT hold_id, sum(amount) AS total FROM fc.journal
                        WHERE kind = {LedgerEntryKind.OVERRUN_RECEIVABLE:d} AND recharge_id IS NULL
                        GROUP BY hold_id) o ON o.hold_id = h.id
           WHERE (h.state = {HoldState.CONFIRMED:d}
                  AND (p.n IS DISTINCT FROM 1 OR p.total + coalesce(o.total, 0) <> h.settled_fen
                       OR p.lo <> h.account_id OR p.hi <> h.account_id))
              OR (h.state <> {HoldState.CONFIRMED:d} AND (p.n IS NOT NULL OR o.total IS NOT NULL))
           LIMIT 10"""),
    Check("points_earned_once",
          "each hold's points_earned equals its points entries",
          f"""
          SELECT h.id, h.points_earned, coalesce(p.total, 0)
            FROM fc.holds h
            LEFT JOIN (SELECT hold_id, sum(amount) AS total FROM fc.journal
                        WHERE kind = {LedgerEntryKind.POINTS_EARNED:d} GROUP BY hold_id) p ON p.hold_id = h.id
           WHERE h.points_earned <> coalesce(p.total, 0) LIMIT 10"""),
    Check("recharge_credited_once",
          "each recharge has exactly one entry crediting its account with its amount",
          f"""
          SELECT r.id, r.amount_fen, e.n, e.total
            FROM fc.recharges r
            LEFT JOIN (SELECT recharge_id, count(*) AS n, sum(amount) AS total,
                              min(credit_account_id) AS acct
                         FROM fc.journal WHERE kind = {LedgerEntryKind.RECHARGE:d} GROUP BY recharge_id) e
                   ON e.recharge_id = r.id
           WHERE e.n IS DISTINCT FROM 1 OR e.total <> r.amount_fen OR e.acct <> r.account_id
           LIMIT 10"""),
    Check("entries_point_at_their_cause",
          "purchase and earn entries name a hold; recharge entries name a recharge",
          f"""
          SELECT id, kind FROM fc.journal
           WHERE (kind IN ({LedgerEntryKind.PURCHASE:d}, {LedgerEntryKind.POINTS_EARNED:d},
                           {LedgerEntryKind.OVERRUN_RECEIVABLE:d})
                  AND hold_id IS NULL)
              OR (kind IN ({LedgerEntryKind.RECHARGE:d}, {LedgerEntryKind.RECHARGE_REFUND:d})
                  AND recharge_id IS NULL)
              OR (kind IN ({LedgerEntryKind.POINTS_REDEEMED:d}, {LedgerEntryKind.ALLOCATION:d},
                           {LedgerEntryKind.POINTS_TRANSFER:d}, {LedgerEntryKind.POINTS_EXPIRED:d})
                  AND (hold_id IS NOT NULL OR recharge_id IS NOT NULL))
              OR ((kind = {LedgerEntryKind.MANUAL_ADJUSTMENT:d}) <> (adjustment_id IS NOT NULL))
              OR (kind = {LedgerEntryKind.MANUAL_ADJUSTMENT:d}
                  AND (hold_id IS NOT NULL OR recharge_id IS NOT NULL))
              OR ((kind = {LedgerEntryKind.SALE_REFUND:d}) <> (sale_refund_id IS NOT NULL))
              OR (kind = {LedgerEntryKind.SALE_REFUND:d} AND hold_id IS NULL)
           LIMIT 10"""),
    Check("allocations_stay_in_the_family",
          "batch top-ups move money from a parent to its own ALLOCATED sub-accounts",
          f"""
          SELECT j.id FROM fc.journal j JOIN fc.accounts c ON c.id = j.credit_account_id
           WHERE j.kind = {LedgerEntryKind.ALLOCATION:d} AND (c.parent_id IS DISTINCT FROM j.debit_account_id
                                 OR c.funding_mode <> {FundingMode.ALLOCATED:d})
           LIMIT 10"""),
    Check("usage_equals_holds",
          "each day's usage counter of a card or account equals what its holds charge"
          " (amount while authorized, settled amount once confirmed)",
          f"""
          WITH charged AS (
              SELECT h.card_id, h.spender_account_id, s.parent_id, h.usage_day,
                     CASE h.state WHEN {HoldState.AUTHORIZED:d} THEN h.amount_fen
                                  WHEN {HoldState.SUSPENDED:d} THEN h.amount_fen
                                  WHEN {HoldState.CONFIRMED:d} THEN h.settled_fen
                                  ELSE 0 END AS amount
                FROM fc.holds h JOIN fc.accounts s ON s.id = h.spender_account_id),
          expected AS (
              SELECT 1 AS scope_kind, card_id AS scope_id, usage_day AS day, sum(amount) AS amount
                FROM charged GROUP BY card_id, usage_day
              UNION ALL
              SELECT 2, spender_account_id, usage_day, sum(amount)
                FROM charged GROUP BY spender_account_id, usage_day
              UNION ALL
              SELECT 2, parent_id, usage_day, sum(amount)
                FROM charged WHERE parent_id IS NOT NULL GROUP BY parent_id, usage_day),
          expected_total AS (
              SELECT scope_kind, scope_id, day, sum(amount) AS amount FROM expected
               GROUP BY scope_kind, scope_id, day)
          SELECT coalesce(e.scope_kind, u.scope_kind), coalesce(e.scope_id, u.scope_id),
                 coalesce(e.day, u.day), e.amount, u.amount_fen
            FROM expected_total e
            FULL JOIN fc.usage u
              ON u.scope_kind = e.scope_kind AND u.scope_id = e.scope_id AND u.day = e.day
           WHERE coalesce(e.amount, 0) <> coalesce(u.amount_fen, 0)
           LIMIT 10"""),
    Check("points_lots_cover_balance",
          "an account's points balance equals what remains in its points lots",
          f"""
          SELECT a.id, a.points_balance, coalesce(l.remaining, 0)
            FROM fc.accounts a
            LEFT JOIN (SELECT account_id, sum(remaining) AS remaining FROM fc.points_lots
                        GROUP BY account_id) l ON l.account_id = a.id
           WHERE a.kind <> {ACCOUNT_KIND_SYSTEM} AND a.points_balance <> coalesce(l.remaining, 0)
           LIMIT 10"""),
    Check("card_number_parts_whole",
          "a card has all four sealed parts of its number (three segments and the whole) or"
          " none (cards seeded straight into the database)",
          """
          SELECT c.id, n.parts FROM fc.cards c
           CROSS JOIN LATERAL (
               SELECT (SELECT count(*) FROM fc_pan_seg1.sealed s WHERE s.card_id = c.id)
                    + (SELECT count(*) FROM fc_pan_seg2.sealed s WHERE s.card_id = c.id)
                    + (SELECT count(*) FROM fc_pan_seg3.sealed s WHERE s.card_id = c.id)
                    + (SELECT count(*) FROM fc_pan_vault.sealed s WHERE s.card_id = c.id) AS parts) n
           WHERE n.parts NOT IN (0, 4)
           LIMIT 10"""),
    Check("reviews_match_hold_states",
          "a SUSPENDED hold awaits review, a REJECTED one was rejected, and no hold was"
          " settled without a reviewer's approval once suspended",
          f"""
          SELECT id, state, review_state FROM fc.holds
           WHERE (state = {HoldState.SUSPENDED:d})
                 <> (review_state IS NOT DISTINCT FROM {ReviewState.PENDING:d} AND closed_at IS NULL)
              OR (state = {HoldState.REJECTED:d})
                 <> (review_state IS NOT DISTINCT FROM {ReviewState.REJECTED:d})
              OR (state IN ({HoldState.AUTHORIZED:d}, {HoldState.CONFIRMED:d})
                  AND review_state IN ({ReviewState.PENDING:d}, {ReviewState.REJECTED:d}))
           LIMIT 10"""),
    # issue 8: refunds of recharges and the neutral settlement records
    Check("refunds_debited_once",
          "the refund entries of each recharge add up to what its refunds debited,"
          " never more than the recharge",
          f"""
          SELECT r.id, r.amount_fen, f.amount, f.debited, coalesce(e.total, 0)
            FROM fc.recharges r
            LEFT JOIN (SELECT recharge_id, sum(amount_fen) AS amount, sum(debited_fen) AS debited
                         FROM fc.refunds GROUP BY recharge_id) f ON f.recharge_id = r.id
            LEFT JOIN (SELECT recharge_id, sum(amount) AS total, min(debit_account_id) AS lo,
                              max(debit_account_id) AS hi
                         FROM fc.journal WHERE kind = {LedgerEntryKind.RECHARGE_REFUND:d}
                        GROUP BY recharge_id) e
                   ON e.recharge_id = r.id
           WHERE coalesce(f.debited, 0) <> coalesce(e.total, 0)
              OR coalesce(f.amount, 0) > r.amount_fen
              OR e.lo <> r.account_id OR e.hi <> r.account_id
           LIMIT 10"""),
    Check("refund_shortfall_recorded",
          "a refund the account could not cover has one channel exception of the shortfall;"
          " no other refund has one",
          """
          SELECT f.id, f.amount_fen, f.debited_fen, x.amount_fen
            FROM fc.refunds f LEFT JOIN fc.channel_exceptions x ON x.refund_id = f.id
           WHERE (f.amount_fen - f.debited_fen) <> coalesce(x.amount_fen, 0)
           LIMIT 10"""),
    Check("settlement_record_per_channel_txn",
          "every recharge and refund has its neutral settlement record, of its amount",
          f"""
          SELECT 'recharge', r.id FROM fc.recharges r
           WHERE NOT EXISTS (SELECT 1 FROM fc.settlement_records s
                              WHERE s.txn_uid = r.uid AND s.kind = {SettlementKind.PAYMENT:d}
                                AND s.channel = r.channel
                                AND s.channel_txn_id = r.channel_txn_id
                                AND s.amount_fen = r.amount_fen)
          UNION ALL
          SELECT 'refund', f.id FROM fc.refunds f
           WHERE NOT EXISTS (SELECT 1 FROM fc.settlement_records s
                              WHERE s.txn_uid = f.uid AND s.kind = {SettlementKind.REFUND:d}
                                AND s.channel = f.channel
                                AND s.channel_txn_id = f.channel_refund_id
                                AND s.amount_fen = f.amount_fen)
           LIMIT 10"""),
    # issue 3, round 2: confirm keeps the sum of the tier window's earlier
    # months on the month's row instead of re-reading them on every sale.
    Check("tier_window_sums_kept",
          "a month's kept sum of the tier window's earlier months (monthly_spend.prior_fen)"
          " equals the sum of those months",
          """
          SELECT m.account_id, m.month, m.prior_window, m.prior_fen, e.total
            FROM fc.monthly_spend m
           CROSS JOIN LATERAL (
                 SELECT coalesce(sum(x.spend_fen), 0) AS total FROM fc.monthly_spend x
                  WHERE x.account_id = m.account_id AND x.month < m.month
                    AND x.month > (m.month - make_interval(months => m.prior_window))::date) e
           WHERE m.prior_fen IS NOT NULL AND m.prior_fen <> e.total
           LIMIT 10"""),
    # Review r2. The tiers (points multipliers) are read from monthly_spend:
    # each month's spend is what the spender's confirmed sales of that month
    # said. fc.confirm adds the settled amount to the spender's (the hold's
    # spender_account_id) row of the business month of the sale (its p_now in
    # the business time zone, which is the purchase entry's created_at; a late
    # confirm of an expired hold counts in the month it was confirmed, not
    # the month the hold closed). A sale refund (issue 14) takes its amount
    # out of the month its sale was counted in. The time zone is a subquery: run
    # once (an InitPlan), not per sale.
    Check("monthly_spend_equals_sales",
          "each month's spend of an account (monthly_spend, which sets its tier) equals its"
          " confirmed sales in that business month",
          f"""
          WITH sold AS (
              SELECT h.spender_account_id AS account_id,
                     date_trunc('month', j.created_at AT TIME ZONE (SELECT fc.business_tz()))
                         ::date AS month,
                     sum(j.amount)::bigint AS spend_fen
                FROM fc.journal j
                JOIN fc.holds h ON h.id = j.hold_id
               WHERE j.kind = {LedgerEntryKind.PURCHASE:d}
                  OR (j.kind = {LedgerEntryKind.OVERRUN_RECEIVABLE:d} AND j.recharge_id IS NULL)
               GROUP BY 1, 2),
          refunded AS (
              -- issue 14: a sale refund comes out of the month its sale was counted in
              SELECT h.spender_account_id AS account_id,
                     date_trunc('month', p.created_at AT TIME ZONE (SELECT fc.business_tz()))
                         ::date AS month,
                     sum(r.amount_fen)::bigint AS refund_fen
                FROM fc.sale_refunds r
                JOIN fc.holds h ON h.id = r.hold_id
                JOIN fc.journal p ON p.hold_id = r.hold_id AND p.kind = {LedgerEntryKind.PURCHASE:d}
               GROUP BY 1, 2),
          net AS (
              SELECT coalesce(s.account_id, f.account_id) AS account_id,
                     coalesce(s.month, f.month) AS month,
                     coalesce(s.spend_fen, 0) - coalesce(f.refund_fen, 0) AS spend_fen
                FROM sold s FULL JOIN refunded f ON f.account_id = s.account_id AND f.month = s.month)
          SELECT coalesce(s.account_id, m.account_id), coalesce(s.month, m.month),
                 s.spend_fen, m.spend_fen
            FROM net s
            FULL JOIN fc.monthly_spend m ON m.account_id = s.account_id AND m.month = s.month
           WHERE coalesce(s.spend_fen, 0) <> coalesce(m.spend_fen, 0)
           LIMIT 10"""),
    # Review r2. Every other check would pass a sale credited to a clearing
    # account, or points issued from FUEL_SALES: the rows still balance. Each
    # kind has the asset and the system account (or none: a customer) of the
    # one function that writes it: 1 fc.recharge, 2 and 3 fc.confirm,
    # 4 fc.redeem_points, 5 fc.batch_top_up, 6 fc.transfer_points,
    # 7 fc.expire_points, 8 fc.refund_recharge (the clearing account of the
    # recharge's channel, fc.clearing_account; a refund has its recharge's
    # channel), 9 fc.approve_adjustment (ADJUSTMENTS on the side opposite the
    # customer, issue 14), 10 fc.refund_sale (money FUEL_SALES -> customer,
    # points customer -> POINTS_ISSUED, issue 14). Which customer it is, is checked by the checks above.
    Check("entries_have_their_counterparties",
          "each journal entry moves its kind's asset between its kind's accounts (e.g. a sale"
          " from a customer to FUEL_SALES, a recharge from its channel's clearing account to"
          " a customer)",
          f"""
          WITH sys AS (SELECT id, system_code AS code FROM fc.accounts
                        WHERE system_code IS NOT NULL),
          e AS (
              SELECT j.id, j.kind, j.asset, d.code AS debit, c.code AS credit, j.recharge_id,
                     'CHANNEL_CLEARING_' || (ARRAY['BANK_CARD', 'WECHAT_PAY', 'ALIPAY', 'ECNY',
                                                   'COUNTER'])[r.channel] AS clearing
                FROM fc.journal j
                LEFT JOIN sys d ON d.id = j.debit_account_id
                LEFT JOIN sys c ON c.id = j.credit_account_id
                LEFT JOIN fc.recharges r ON r.id = j.recharge_id
                      AND j.kind IN ({LedgerEntryKind.RECHARGE:d}, {LedgerEntryKind.RECHARGE_REFUND:d}))
          SELECT id, kind, asset, debit, credit FROM e
           WHERE NOT coalesce(CASE kind
                 WHEN {LedgerEntryKind.RECHARGE:d}
                     THEN asset = {Asset.MONEY:d} AND debit = clearing AND credit IS NULL
                 WHEN {LedgerEntryKind.PURCHASE:d}
                     THEN asset = {Asset.MONEY:d} AND debit IS NULL AND credit = 'FUEL_SALES'
                 WHEN {LedgerEntryKind.POINTS_EARNED:d}
                     THEN asset = {Asset.POINTS:d} AND debit = 'POINTS_ISSUED' AND credit IS NULL
                 WHEN {LedgerEntryKind.POINTS_REDEEMED:d}
                     THEN asset = {Asset.POINTS:d} AND debit IS NULL AND credit = 'POINTS_REDEEMED'
                 WHEN {LedgerEntryKind.ALLOCATION:d}
                     THEN asset = {Asset.MONEY:d} AND debit IS NULL AND credit IS NULL
                 WHEN {LedgerEntryKind.POINTS_TRANSFER:d}
                     THEN asset = {Asset.POINTS:d} AND debit IS NULL AND credit IS NULL
                 WHEN {LedgerEntryKind.POINTS_EXPIRED:d}
                     THEN asset = {Asset.POINTS:d} AND debit IS NULL AND credit = 'POINTS_EXPIRED'
                 WHEN {LedgerEntryKind.RECHARGE_REFUND:d}
                     THEN asset = {Asset.MONEY:d} AND debit IS NULL AND credit = clearing
                 WHEN {LedgerEntryKind.MANUAL_ADJUSTMENT:d}
                     THEN asset = {Asset.MONEY:d} AND ((debit = 'ADJUSTMENTS' AND credit IS NULL)
                                                    OR (debit IS NULL AND credit = 'ADJUSTMENTS'))
                 WHEN {LedgerEntryKind.SALE_REFUND:d}
                     THEN (asset = {Asset.MONEY:d} AND debit = 'FUEL_SALES' AND credit IS NULL)
                       OR (asset = {Asset.POINTS:d} AND debit IS NULL AND credit = 'POINTS_ISSUED')
                 WHEN {LedgerEntryKind.OVERRUN_RECEIVABLE:d}
                     THEN asset = {Asset.MONEY:d}
                          AND ((debit = 'RECEIVABLES' AND credit = 'FUEL_SALES' AND recharge_id IS NULL)
                               OR (debit IS NULL AND credit = 'RECEIVABLES'
                                   AND recharge_id IS NOT NULL))
                 END, false)
           LIMIT 10"""),
    # Review r2. A settlement exception is fuel delivered on an EXPIRED hold
    # whose money was gone by the late confirm (fc.confirm): the hold stays
    # EXPIRED while it is open. If the money comes back and a later confirm
    # settles the hold after all, that confirm closes it (resolved_at) and
    # the hold is CONFIRMED late. Nothing else resolves one. So: an open one
    # names an EXPIRED hold; one on a paid hold is closed. (An EXPIRED hold
    # may have a closed one: written off by hand.) Channel exceptions name
    # refunds, not holds: refund_shortfall_recorded checks them.
    Check("settlement_exception_on_unpaid_hold",
          "a settlement exception (fuel delivered, not paid) names an EXPIRED hold of its"
          " account, for no more than the hold; one whose hold was paid later is closed",
          f"""
          SELECT x.id, x.hold_id, h.state, x.amount_fen, h.amount_fen, x.resolved_at
            FROM fc.settlement_exceptions x JOIN fc.holds h ON h.id = x.hold_id
           WHERE x.kind = 1
             AND (x.account_id <> h.account_id OR x.amount_fen > h.amount_fen
                  OR NOT (h.state = {HoldState.EXPIRED:d}
                          OR (h.state = {HoldState.CONFIRMED:d} AND h.confirmed_late
                              AND x.resolved_at IS NOT NULL)))
           LIMIT 10"""),
    # Issue 14, item 6: finance follows the open exceptions up through
    # ReconciliationService.ListSettlementExceptions and `fuelcard
    # exceptions`. An open one nobody can reach is money nobody chases: each
    # names what it is about (a hold for kinds 1 and 2, a channel payment for
    # kind 3, and the recharge when it names one), of its own account, and is
    # of a kind the API knows and renders (fc.settlement_exception_json, the
    # listing's own function, gives it a state and an account).
    Check("open_settlement_exceptions_reachable",
          "every open settlement exception names an existing hold (or channel payment) of its"
          " account and is listed by the API",
          """
          SELECT x.id, x.kind, x.hold_id, x.recharge_id
            FROM fc.settlement_exceptions x
            LEFT JOIN fc.holds h ON h.id = x.hold_id
            LEFT JOIN fc.recharges r ON r.id = x.recharge_id
           WHERE x.resolved_at IS NULL
             AND (x.kind NOT IN (1, 2, 3)
                  OR (x.kind IN (1, 2) AND h.id IS NULL)
                  OR (x.kind = 3 AND (x.channel IS NULL OR x.channel_txn_id IS NULL))
                  OR (x.recharge_id IS NOT NULL AND r.id IS NULL)
                  OR (h.id IS NOT NULL AND h.account_id <> x.account_id)
                  OR (r.id IS NOT NULL AND r.account_id <> x.account_id)
                  OR fc.settlement_exception_json(x => x) IS NULL
                  OR fc.settlement_exception_json(x => x)->>'state' IS DISTINCT FROM 'OPEN')
           LIMIT 10"""),
    # Issue 14, item 7: an APPROVED adjustment is booked exactly once, as one
    # kind 9 entry of its amount between its account (on the side its
    # direction says) and ADJUSTMENTS; a PROPOSED or REJECTED one is booked
    # nowhere; a kind 9 entry names an adjustment that exists.
    Check("adjustments_booked_once",
          "each APPROVED adjustment has exactly one adjustment entry, of its amount and"
          " direction, on its account; no other adjustment has one",
          """
          SELECT coalesce(a.id, e.adjustment_id), a.state, a.amount_fen, e.n, e.total
            FROM fc.adjustments a
            FULL JOIN (SELECT adjustment_id, count(*) AS n, sum(amount) AS total,
                              min(CASE WHEN debit_account_id = (SELECT id FROM fc.accounts
                                                                WHERE system_code = 'ADJUSTMENTS')
                                       THEN credit_account_id ELSE -debit_account_id END) AS lo,
                              max(CASE WHEN debit_account_id = (SELECT id FROM fc.accounts
                                                                WHERE system_code = 'ADJUSTMENTS')
                                       THEN credit_account_id ELSE -debit_account_id END) AS hi
                         FROM fc.journal WHERE kind = 9 GROUP BY adjustment_id) e
                   ON e.adjustment_id = a.id
           WHERE a.id IS NULL
              OR (a.state = 2 AND (e.n IS DISTINCT FROM 1 OR e.total <> a.amount_fen
                                   OR e.lo <> e.hi
                                   OR e.lo <> CASE a.direction WHEN 1 THEN a.account_id
                                                               ELSE -a.account_id END))
              OR (a.state <> 2 AND e.n IS NOT NULL)
           LIMIT 10"""),
    # issue 14: refunds of sales (fc.refund_sale)
    Check("sale_refunds_within_sale",
          "the refunds of a sale add up to at most its settled amount, and only a CONFIRMED"
          " hold has any",
          f"""
          SELECT h.id, h.state, h.settled_fen, r.total
            FROM fc.holds h
            JOIN (SELECT hold_id, sum(amount_fen) AS total FROM fc.sale_refunds
                   GROUP BY hold_id) r ON r.hold_id = h.id
           WHERE h.state <> {HoldState.CONFIRMED:d} OR r.total > h.settled_fen
           LIMIT 10"""),
    Check("sale_refund_booked_once",
          "each sale refund has one money entry of its amount, to the account that funded the"
          " sale, and one points entry of the points it took back (none if it took none)",
          f"""
          SELECT r.id, r.amount_fen, m.n, m.total, m.acct, coalesce(p.total, 0), r.points_taken
            FROM fc.sale_refunds r
            JOIN fc.holds h ON h.id = r.hold_id
            LEFT JOIN (SELECT sale_refund_id, count(*) AS n, sum(amount) AS total,
                              min(credit_account_id) AS acct, max(hold_id) AS hold
                         FROM fc.journal WHERE kind = {LedgerEntryKind.SALE_REFUND:d}
                          AND asset = {Asset.MONEY:d} GROUP BY sale_refund_id) m
                   ON m.sale_refund_id = r.id
            LEFT JOIN (SELECT sale_refund_id, count(*) AS n, sum(amount) AS total
                         FROM fc.journal WHERE kind = {LedgerEntryKind.SALE_REFUND:d}
                          AND asset = {Asset.POINTS:d} GROUP BY sale_refund_id) p
                   ON p.sale_refund_id = r.id
           WHERE m.n IS DISTINCT FROM 1 OR m.total <> r.amount_fen OR m.hold <> r.hold_id
              OR m.acct <> r.account_id OR r.account_id <> h.account_id
              OR coalesce(p.total, 0) <> r.points_taken OR p.n > 1
           LIMIT 10"""),
    Check("refunded_points_within_earned",
          "the points the refunds of a sale took back (or found spent) never exceed what the"
          " sale earned",
          """
          SELECT h.id, h.points_earned, r.points
            FROM fc.holds h
            JOIN (SELECT hold_id, sum(points_taken + points_shortfall) AS points
                    FROM fc.sale_refunds GROUP BY hold_id) r ON r.hold_id = h.id
           WHERE r.points > h.points_earned
           LIMIT 10"""),
    # Issue 14, item 9: an account whose expired holds the sweep could not
    # release is set aside (fc.sweep_account) so that it wedges no other;
    # until someone repairs it, its customer's money stays reserved.
    Check("no_account_set_aside_by_the_expiry_sweep",
          "no account has expired holds the expiry sweep could not release",
          """
          SELECT f.account_id, f.sqlstate, f.failures, f.last_failed_at
            FROM fc.hold_sweep_failures f ORDER BY f.account_id LIMIT 10""",
          since_table="fc.hold_sweep_failures"),
    # Issue 14, item 3: what an overrun left unpaid is owed by the account.
    # Each receivable was booked once, as one receivable entry of its amount
    # (from RECEIVABLES to FUEL_SALES, naming its hold, of its account), its
    # repayments are the entries from its account naming it and a recharge,
    # and the account's receivable_fen (what fc.authorize declines on) is what
    # its receivables still want. receivable_not_negative holds the sign.
    Check("receivables_booked_and_owed",
          "each overrun receivable is booked once for its amount, repaid by its entries, and"
          " its account's receivable_fen is what its receivables still want",
          f"""
          WITH legs AS (
              SELECT hold_id,
                     sum(amount) FILTER (WHERE recharge_id IS NULL) AS booked,
                     count(*) FILTER (WHERE recharge_id IS NULL) AS n,
                     coalesce(sum(amount) FILTER (WHERE recharge_id IS NOT NULL), 0) AS repaid,
                     min(debit_account_id) FILTER (WHERE recharge_id IS NOT NULL) AS payer_lo,
                     max(debit_account_id) FILTER (WHERE recharge_id IS NOT NULL) AS payer_hi
                FROM fc.journal WHERE kind = {LedgerEntryKind.OVERRUN_RECEIVABLE:d} GROUP BY hold_id)
          SELECT 'receivable' AS what, coalesce(r.hold_id, l.hold_id) AS id
            FROM fc.receivables r
            FULL JOIN legs l ON l.hold_id = r.hold_id
            LEFT JOIN fc.holds h ON h.id = r.hold_id
           WHERE r.id IS NULL OR l.hold_id IS NULL OR l.n <> 1 OR l.booked <> r.amount_fen
              OR l.repaid <> r.repaid_fen OR h.account_id <> r.account_id
              OR l.payer_lo <> r.account_id OR l.payer_hi <> r.account_id
          UNION ALL
          SELECT 'account', a.id
            FROM fc.accounts a
            LEFT JOIN (SELECT account_id, sum(amount_fen - repaid_fen) AS owed FROM fc.receivables
                        GROUP BY account_id) o ON o.account_id = a.id
           WHERE a.receivable_fen <> coalesce(o.owed, 0)
           LIMIT 10"""),
    # Issue 14, item 3: an overrun's shortfall is followed up until repaid: a
    # receivable still owed has its open exception of kind 2, and one repaid
    # in full is closed (fc.repay_receivables settles it, or a person did).
    Check("receivable_exception_open_while_owed",
          "a receivable still owed has an open overrun shortfall exception",
          """
          SELECT r.id, r.hold_id, x.id, x.resolved_at
            FROM fc.receivables r
            LEFT JOIN fc.settlement_exceptions x ON x.hold_id = r.hold_id AND x.kind = 2
           WHERE x.id IS NULL
              OR (r.repaid_at IS NULL AND x.resolved_at IS NULL AND x.account_id <> r.account_id)
              OR (r.repaid_at IS NOT NULL AND x.resolved_at IS NULL)
           LIMIT 10"""),
    # Issue 14, item 4: a card's litre counters (what its daily and monthly
    # litre caps are checked against) are the volumes of its confirmed sales
    # that fc.confirm counted (holds.volume_counted: the card had litre caps),
    # per business day; only a confirmed sale is counted.
    Check("litres_equal_confirmed_volumes",
          "each card's litres per day (volume_usage) equal the volumes of its counted confirmed"
          " sales",
          f"""
          WITH sold AS (
              SELECT card_id, usage_day AS day, sum(volume_ml) AS volume_ml FROM fc.holds
               WHERE volume_counted AND state = {HoldState.CONFIRMED:d}
               GROUP BY card_id, usage_day)
          SELECT coalesce(s.card_id, u.card_id), coalesce(s.day, u.day), s.volume_ml, u.volume_ml
            FROM sold s FULL JOIN fc.volume_usage u ON u.card_id = s.card_id AND u.day = s.day
           WHERE coalesce(s.volume_ml, 0) <> coalesce(u.volume_ml, 0)
          UNION ALL
          SELECT card_id, usage_day, volume_ml, NULL FROM fc.holds
           WHERE volume_counted AND state <> {HoldState.CONFIRMED:d}
           LIMIT 10"""),
    # issue 19: invoices (统一开票). The same money is invoiced once: an account's invoices
    # are all of its one invoicing mode (at recharge, or on consumption), a recharge or a month
    # has at most one live invoice, a recharge invoice covers no more than the recharge, and
    # a live consumption invoice covers exactly the month's sales in the journal.
    Check("no_money_invoiced_twice",
          "an account's invoices are all of its invoicing mode (recharge invoices and"
          " consumption invoices never cover the same funds); one live invoice per recharge"
          " and per month, covering no more than the recharge or exactly the month's sales",
          """
          SELECT i.id, 'kind is not the account''s mode' AS what, i.kind::bigint, m.mode::bigint
            FROM fc.invoices i JOIN fc.accounts a ON a.id = i.account_id
            LEFT JOIN fc.invoicing_modes m ON m.account_id = i.account_id
           WHERE a.parent_id IS NOT NULL OR m.mode IS DISTINCT FROM i.kind
          UNION ALL
          SELECT min(i.id), 'recharge invoiced twice', i.recharge_id, count(*)
            FROM fc.invoices i WHERE i.kind = 1 AND i.state IN (1, 2)
           GROUP BY i.recharge_id HAVING count(*) > 1
          UNION ALL
          SELECT min(i.id), 'month invoiced twice', i.account_id, count(*)
            FROM fc.invoices i WHERE i.kind = 2 AND i.state IN (1, 2)
           GROUP BY i.account_id, i.month HAVING count(*) > 1
          UNION ALL
          SELECT i.id, 'more than the recharge', i.total_fen, r.amount_fen
            FROM fc.invoices i JOIN fc.recharges r ON r.id = i.recharge_id
           WHERE i.total_fen > r.amount_fen
          UNION ALL
          SELECT i.id, 'not the month''s sales', i.total_fen, c.total
            FROM fc.invoices i CROSS JOIN LATERAL (
                SELECT coalesce(sum(e.total_fen), 0)::bigint AS total
                  FROM fc.consumption_entries(p_account_id => i.account_id, p_month => i.month) e) c
           WHERE i.kind = 2 AND i.state IN (1, 2) AND i.total_fen <> c.total
           LIMIT 10""", since_table="fc.invoices"),
    Check("invoice_lines_sum_to_totals",
          "an invoice's amount, tax and total are the sums of its items', and a consolidated"
          " invoice's items the sums of its list entries, product by product",
          """
          SELECT i.id, i.amount_fen, i.tax_fen, i.total_fen, s.amount, s.tax, s.total
            FROM fc.invoices i LEFT JOIN (
                SELECT invoice_id, sum(amount_fen) AS amount, sum(tax_fen) AS tax,
                       sum(total_fen) AS total
                  FROM fc.invoice_items GROUP BY invoice_id) s ON s.invoice_id = i.id
           WHERE (i.amount_fen, i.tax_fen, i.total_fen) IS DISTINCT FROM (s.amount, s.tax, s.total)
          UNION ALL
          SELECT t.invoice_id, t.amount_fen, t.tax_fen, t.total_fen, e.amount, e.tax, e.total
            FROM fc.invoice_items t JOIN fc.invoices i ON i.id = t.invoice_id
            LEFT JOIN LATERAL (
                SELECT sum(amount_fen) AS amount, sum(tax_fen) AS tax, sum(total_fen) AS total,
                       sum(quantity_ml) AS ml
                  FROM fc.invoice_list_entries x
                 WHERE x.invoice_id = t.invoice_id AND x.product = t.product) e ON true
           WHERE i.kind = 2 AND (t.amount_fen, t.tax_fen, t.total_fen, t.quantity_ml)
                 IS DISTINCT FROM (e.amount, e.tax, e.total, e.ml)
           LIMIT 10""", since_table="fc.invoices"),
    Check("event_positions_gap_free",
          "the event stream holds every position after the pruned ones up to the head, once",
          """
          SELECT h.last_position, h.pruned_through, count(e.position), min(e.position),
                 max(e.position)
            FROM fc.event_head h LEFT JOIN fc.events e ON true
           GROUP BY h.last_position, h.pruned_through
          HAVING count(e.position) <> h.last_position - h.pruned_through
              OR (count(e.position) > 0 AND (min(e.position) <> h.pruned_through + 1
                                             OR max(e.position) <> h.last_position))"""),
    # Issue 15. A sale's points go to whoever bought the fuel (the hold's
    # spender: fc.confirm), not to the account that paid (a SHARED
    # sub-account's parent): the review found nothing checked it.
    Check("points_credited_to_the_spender",
          "each points-earned entry credits its hold's spender, not the funder",
          f"""
          SELECT j.id, j.hold_id, j.credit_account_id, h.spender_account_id
            FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id
           WHERE j.kind = {LedgerEntryKind.POINTS_EARNED:d}
             AND j.credit_account_id <> h.spender_account_id
           LIMIT 10"""),
    # A hold reserves the money of the account that pays: a SHARED
    # sub-account spends its parent's balance, every other
    # account its own (fc.authorize; nothing changes an account's funding
    # mode once it is opened).
    Check("holds_on_the_right_funder",
          "each hold is on its funder: a SHARED sub-account's on its parent, others' on their own"
          " account",
          f"""
          SELECT h.id, h.account_id, s.id, s.funding_mode, s.parent_id
            FROM fc.holds h JOIN fc.accounts s ON s.id = h.spender_account_id
           WHERE h.account_id IS DISTINCT FROM
                 CASE WHEN s.funding_mode = {FundingMode.SHARED:d} THEN s.parent_id ELSE s.id END
           LIMIT 10"""),
    # The append-only guards: disabled (ALTER TABLE ... DISABLE TRIGGER, by
    # the owner) or dropped, they leave history editable; the serving role
    # cannot do either (issue 15), so a guard found off was someone else.
    Check("append_only_triggers_enabled",
          "the triggers that keep the journal, its chain and the audit log append-only are"
          " there and enabled",
          """
          SELECT g.tab, g.name, t.tgenabled
            FROM (VALUES ('fc.journal', 'journal_append_only'), ('fc.journal', 'journal_no_truncate'),
                         ('fc.audit_log', 'audit_log_append_only'),
                         ('fc.audit_log', 'audit_log_no_truncate'),
                         ('fc.journal_chain', 'journal_chain_append_only'),
                         ('fc.journal_chain', 'journal_chain_no_truncate')) g (tab, name)
            LEFT JOIN pg_trigger t ON t.tgrelid = g.tab::regclass AND t.tgname = g.name
           WHERE t.tgenabled IS NULL OR t.tgenabled NOT IN ('O', 'A')"""),
    # The cost rollup (cost_rollup.py, issue 19) is what the fleet cost report
    # reads: each row must be the sum of the sales rolled so far (the purchase
    # entries up to its watermark), recomputed here from the holds.
    Check("cost_rollup_matches_sales",
          "each day and month of fc.vehicle_costs sums the confirmed sales of the purchase entries"
          " up to the rollup's watermark, with their largest fill and their minutes of the day",
          f"""
          WITH sales AS (
              SELECT h.spender_account_id AS vehicle_id, g.grain,
                     date_trunc(CASE g.grain WHEN 1 THEN 'day' ELSE 'month' END, h.closed_at,
                                m.tz) AS bucket,
                     sum(h.settled_fen) AS spend_fen, sum(h.volume_ml) AS volume_ml,
                     count(*) AS sale_count, min(h.id) AS first_hold_id, max(h.id) AS last_hold_id,
                     max(h.volume_ml) AS max_fill_ml,
                     array_agg(DISTINCT m.minute ORDER BY m.minute) AS fill_minutes
                FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id
               CROSS JOIN (VALUES (1), (2)) g (grain)
               CROSS JOIN LATERAL (
                   SELECT (extract(hour FROM h.closed_at AT TIME ZONE tz.value) * 60
                           + extract(minute FROM h.closed_at AT TIME ZONE tz.value))::smallint AS minute,
                          tz.value AS tz
                     FROM fc.config tz WHERE tz.key = 'business_time_zone') m
               WHERE j.kind = {LedgerEntryKind.PURCHASE:d} AND h.state = {HoldState.CONFIRMED:d}
                 AND j.id <= (SELECT rolled_id FROM fc.cost_rollup_state)
               GROUP BY 1, 2, 3)
          SELECT coalesce(c.vehicle_id, s.vehicle_id), coalesce(c.grain, s.grain),
                 coalesce(c.bucket, s.bucket), c.spend_fen, s.spend_fen
            FROM fc.vehicle_costs c FULL JOIN sales s
              ON s.vehicle_id = c.vehicle_id AND s.grain = c.grain AND s.bucket = c.bucket
           WHERE (c.spend_fen, c.volume_ml, c.sale_count, c.first_hold_id, c.last_hold_id,
                  c.max_fill_ml, c.fill_minutes)
                 IS DISTINCT FROM (s.spend_fen, s.volume_ml, s.sale_count, s.first_hold_id,
                                   s.last_hold_id, s.max_fill_ml, s.fill_minutes)
           LIMIT 10""", since_table="fc.vehicle_costs"),
    # The statement rollup (statement_rollup.py) is what a month's statement
    # reads: each account's month must be the sums of its money entries up to
    # the rollup's watermark, recomputed here from the journal and the holds.
    Check("statement_rollup_matches_journal",
          "each account and business month of fc.statement_movements sums the money entries up to"
          " the statement rollup's watermark",
          f"""
          WITH zone AS (SELECT fc.business_tz() AS tz),
          e AS (
              SELECT j.kind, j.amount, j.credit_account_id, j.debit_account_id, j.hold_id,
                     date_trunc('month', j.created_at AT TIME ZONE zone.tz)::date AS month
                FROM fc.journal j, zone
               WHERE j.asset = {Asset.MONEY:d}
                 AND j.id <= (SELECT rolled_id FROM fc.statement_rollup_state)),
          sides AS (
              SELECT credit_account_id AS account_id, month, kind, amount AS delta FROM e
              UNION ALL
              SELECT debit_account_id, month, kind, -amount FROM e),
          moved AS (
              SELECT account_id, month,
                     sum(delta) FILTER (WHERE kind = {LedgerEntryKind.RECHARGE:d}) AS recharges,
                     sum(delta) FILTER (WHERE kind = {LedgerEntryKind.ALLOCATION:d}) AS transfers,
                     -sum(delta) FILTER (WHERE kind = {LedgerEntryKind.PURCHASE:d}) AS charged,
                     -sum(delta) FILTER (WHERE kind = {LedgerEntryKind.RECHARGE_REFUND:d}) AS refunds,
                     sum(delta) FILTER (WHERE kind NOT IN ({LedgerEntryKind.RECHARGE:d},
                         {LedgerEntryKind.ALLOCATION:d}, {LedgerEntryKind.PURCHASE:d},
                         {LedgerEntryKind.RECHARGE_REFUND:d})) AS other
                FROM sides GROUP BY account_id, month),
          bought AS (
              SELECT h.spender_account_id AS account_id, e.month, sum(e.amount) AS fen,
                     sum(h.volume_ml) AS ml, count(*) AS n
                FROM e JOIN fc.holds h ON h.id = e.hold_id
               WHERE e.kind = {LedgerEntryKind.PURCHASE:d}
               GROUP BY h.spender_account_id, e.month),
          want AS (
              SELECT coalesce(m.account_id, b.account_id) AS account_id,
                     coalesce(m.month, b.month) AS month,
                     coalesce(m.recharges, 0) AS recharges, coalesce(m.transfers, 0) AS transfers,
                     coalesce(m.charged, 0) AS charged, coalesce(m.refunds, 0) AS refunds,
                     coalesce(m.other, 0) AS other, coalesce(b.fen, 0) AS fen,
                     coalesce(b.ml, 0) AS ml, coalesce(b.n, 0) AS n
                FROM moved m FULL JOIN bought b ON b.account_id = m.account_id AND b.month = m.month)
          SELECT coalesce(r.account_id, w.account_id), coalesce(r.month, w.month),
                 r.charged_fen, w.charged, r.sales_fen, w.fen
            FROM fc.statement_movements r FULL JOIN want w
              ON w.account_id = r.account_id AND w.month = r.month
           WHERE (r.recharges_fen, r.transfers_fen, r.charged_fen, r.refunds_fen, r.other_fen,
                  r.sales_fen, r.sales_volume_ml, r.sale_count)
                 IS DISTINCT FROM (w.recharges, w.transfers, w.charged, w.refunds, w.other,
                                   w.fen, w.ml, w.n)
           LIMIT 10""", since_table="fc.statement_movements"),
    Check(JOURNAL_CHAIN,
          "every chained journal entry matches its SM3 chain hash, and none below the chain's"
          " head is missing from it (journal_chain.py)",
          ""),
)


def run(url: str) -> list[Violation]:
    found: list[Violation] = []
    with one_shot(url) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for check in CHECKS:
            if check.since_table:
                exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                      (check.since_table,)).fetchone()
                if not (exists and exists[0]):
                    continue
            if check.name == JOURNAL_CHAIN:
                report = journal_chain.walk_connection(conn)
                rows = [(p.entry_id, p.kind, p.detail) for p in report.problems[:10]]
            else:
                rows = conn.execute(check.sql.encode()).fetchall()
            if rows:
                found.append(Violation(check.name, check.description, list(rows)))
    return found
