"""Semantic 5: the double-entry journal and `fuelcard verify`.

verify passes on a ledger built through the API, and names the violated
invariant when the database is corrupted behind the server's back. The
journal itself refuses to be edited.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from fuelcard.v1 import account_pb2, common_pb2, funding_pb2, points_pb2
from fuelcard_server import verify

from tests.plugins.server import TEST_KEY_HEX, RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, scalar

FUELCARD = str(Path(sys.executable).parent / "fuelcard")


def _busy_ledger(server: RunningServer) -> tuple[builders.FundedCard, builders.FundedCard]:
    """Recharges, sales with points, a cancel, an expiry, a redemption."""
    card = builders.open_card(server, balance_fen=80_000)
    other = builders.open_card(server, balance_fen=10_000)
    sale = builders.authorize(server, card, 30_000).hold
    builders.confirm(server, sale.hold_id, 25_150)
    builders.cancel(server, builders.authorize(server, card, 5_000).hold.hold_id)
    builders.authorize(server, other, 4_000)  # expires too
    builders.authorize(server, card, 1_000)   # will expire
    server.advance(dt.timedelta(hours=1))
    assert server.expire_holds() == 2
    server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid(), account_id=card.account_id, points=51))
    # every entry in the journal's hash chain (journal_chain.py), so that an
    # entry edited behind the server's back shows there too
    assert server.chain_journal() > 0
    return card, other


def _checks(url: str) -> set[str]:
    return {v.check for v in verify.run(url)}


def _cli(url: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUELCARD_")}
    env["FUELCARD_CARD_INDEX_KEY_HEX"] = TEST_KEY_HEX
    return subprocess.run([FUELCARD, "verify", "--database-url", url, "--data-dir", str(tmp)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_empty_ledger_verifies(database_url: str) -> None:
    assert verify.run(database_url) == []


def test_busy_ledger_verifies_and_sums_to_zero(server: RunningServer, db: Conn) -> None:
    _busy_ledger(server)
    assert verify.run(server.database_url) == []
    # Double entry, checked independently of verify: every row moves a
    # positive amount between two different accounts, so per asset the
    # customer balances and the system accounts' journal totals cancel out.
    for asset, column in ((1, "balance_fen"), (2, "points_balance")):
        customers = scalar(db, f"SELECT sum({column}) FROM fc.accounts WHERE kind <> 100")
        system = scalar(db, """
            SELECT coalesce(sum(CASE WHEN a.id = j.credit_account_id THEN j.amount
                                     ELSE -j.amount END), 0)
              FROM fc.journal j JOIN fc.accounts a
                ON a.id IN (j.credit_account_id, j.debit_account_id)
             WHERE a.kind = 100 AND j.asset = %s""", (asset,))
        assert customers + system == 0, asset
        assert customers > 0
    assert scalar(db, "SELECT count(*) FROM fc.journal WHERE amount <= 0"
                  " OR debit_account_id = credit_account_id") == 0


def _every_kind_ledger(server: RunningServer) -> tuple[str, str]:
    """Every kind of journal entry, on the channels and accounts the server
    books it against; a sale funded by the parent of the account it counts
    for; settlement exceptions, one still open and one closed by a late sale
    confirmed in the month after its hold expired."""
    family = cb.open_fleet(server, 100_000, [cb.SHARED],
                           account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    son = family.subs[0]
    cb.sale(server, son, 20_000)                  # 1, 2, 3: the parent's money, the son's spend
    assert cb.transfer_points(server, son.account_id, family.parent_id,
                              50).decision == cb.APPROVED                               # 6
    server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid(), account_id=family.parent_id, points=10))             # 4
    fleet = cb.open_fleet(server, 50_000, [cb.ALLOCATED])
    assert cb.batch_top_up(server, fleet.parent_id,
                           [(fleet.subs[0].account_id, 30_000)]).decision == cb.APPROVED  # 5
    card = builders.open_card(server)
    txn = f"ali-{uuid.uuid4().hex}"
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid(), account_id=card.account_id, channel=funding_pb2.CHANNEL_ALIPAY,
        channel_txn_id=txn, amount_fen=10_000))
    server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(                     # 8
        request_id=builders.rid(), channel=funding_pb2.CHANNEL_ALIPAY, channel_txn_id=txn,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=4_000))
    # 6 000 fen left, all of it held by two holds that expire; the money is
    # spent elsewhere, and both late confirms record a settlement exception.
    unpaid = builders.authorize(server, card, 5_000).hold
    paid_late = builders.authorize(server, card, 1_000).hold
    server.advance(dt.timedelta(minutes=31))
    assert server.expire_holds() == 2
    cb.sale(server, card, 5_500)
    for hold, amount in ((unpaid, 5_000), (paid_late, 1_000)):
        assert builders.confirm(server, hold.hold_id, amount).decline_reason == \
            common_pb2.DECLINE_REASON_HOLD_EXPIRED
    # Next month the driver pays in and the POS resends one of them: a sale
    # of the month it is confirmed in, not of the month its hold closed.
    month = cb.local_now(server).replace(day=1, hour=0, minute=5, second=0, microsecond=0)
    cb.advance_to_local(server, (month + dt.timedelta(days=32)).replace(day=1))
    builders.recharge(server, card.account_id, 2_000)
    assert builders.confirm(server, paid_late.hold_id, 1_000).decision == cb.APPROVED
    # Two years on, the points left lapse.
    server.advance(dt.timedelta(days=800))
    assert server.run(server.server.expire_points_once) > 0                              # 7
    return family.parent_id, son.account_id


def test_every_kind_of_entry_verifies(server: RunningServer, db: Conn) -> None:
    parent, son = _every_kind_ledger(server)
    assert verify.run(server.database_url) == []
    assert [r[0] for r in db.execute(
        "SELECT DISTINCT kind FROM fc.journal ORDER BY 1").fetchall()] == list(range(1, 9))
    assert db.execute(
        "SELECT h.state, x.resolved_at IS NOT NULL FROM fc.settlement_exceptions x"
        " JOIN fc.holds h ON h.id = x.hold_id ORDER BY x.id").fetchall() == [(4, False), (2, True)]
    # The late sale counts in the month it was confirmed, after its hold closed.
    assert scalar(db, """
        SELECT count(*) FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id
         WHERE j.kind = 2 AND h.confirmed_late
           AND date_trunc('month', j.created_at AT TIME ZONE fc.business_tz())
               > date_trunc('month', h.closed_at AT TIME ZONE fc.business_tz())""") == 1
    # The family's sale counts for the son who bought, not the parent who paid.
    spend = db.execute(
        "SELECT a.uid::text, sum(m.spend_fen) FROM fc.monthly_spend m"
        " JOIN fc.accounts a ON a.id = m.account_id WHERE a.uid IN (%s, %s)"
        " GROUP BY a.uid", (parent, son)).fetchall()
    assert spend == [(son, 20_000)]


def test_cli_passes_on_a_healthy_ledger(server: RunningServer, tmp_path: Path) -> None:
    _busy_ledger(server)
    res = _cli(server.database_url, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout
    for check in verify.CHECKS:
        assert f"ok   {check.name}" in res.stdout
    assert f"all {len(verify.CHECKS)} invariants hold" in res.stdout


def test_cli_fails_naming_the_violation(server: RunningServer, db: Conn, tmp_path: Path) -> None:
    card, _ = _busy_ledger(server)
    db.execute("UPDATE fc.accounts SET balance_fen = balance_fen + 1 WHERE uid = %s",
               (card.account_id,))
    res = _cli(server.database_url, tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL balance_equals_journal" in res.stdout
    assert "FAIL ledger_sums_to_zero" in res.stdout
    assert "ok   held_equals_active_holds" in res.stdout
    assert "invariant(s) violated" in res.stderr


# Each corruption, done behind the server's back, and the checks that must
# name it (exactly: verify must not blame the wrong invariant either).
CORRUPTIONS: list[tuple[str, list[str], set[str]]] = [
    ("balance-off-by-one",
     ["UPDATE fc.accounts SET balance_fen = balance_fen + 1 WHERE uid = %(account)s"],
     {"balance_equals_journal", "ledger_sums_to_zero"}),
    ("points-off",
     ["UPDATE fc.accounts SET points_balance = points_balance + 7 WHERE uid = %(account)s"],
     {"points_equal_journal", "ledger_sums_to_zero"}),
    ("journal-row-without-balance",  # an unbalanced state: money in the journal only
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
      " recharge_id, created_at) SELECT 1, 1, fc.system_account(p_code => 'CHANNEL_CLEARING_ALIPAY'), id,"
      " 500, (SELECT min(id) FROM fc.recharges), now() FROM fc.accounts WHERE uid = %(account)s"],
     {"balance_equals_journal", "ledger_sums_to_zero", "recharge_credited_once"}),
    ("held-without-hold",
     ["UPDATE fc.accounts SET held_fen = held_fen + 100 WHERE uid = %(account)s"],
     {"held_equals_active_holds"}),
    ("overdraft",
     ["ALTER TABLE fc.accounts DROP CONSTRAINT held_within_balance",
      "UPDATE fc.accounts SET held_fen = balance_fen + 1 WHERE uid = %(account)s"],
     {"no_overdraft", "held_equals_active_holds"}),
    ("journal-names-a-missing-account",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
      " description, created_at) VALUES (4, 2, 999999, fc.system_account(p_code => 'POINTS_REDEEMED'), 1,"
      " 'ghost', now())"],
     {"journal_references_exist", "ledger_sums_to_zero"}),
    # Issue 17: the foreign keys of holds and points lots went (a row lock per insert); verify
    # checks what they kept, and more: the hold's card is its spender's.
    ("hold-names-another-accounts-card",
     ["UPDATE fc.holds SET card_id = (SELECT c.id FROM fc.cards c JOIN fc.accounts a"
      " ON a.id = c.account_id WHERE a.uid = %(other)s LIMIT 1)"
      " WHERE id = (SELECT min(h.id) FROM fc.holds h JOIN fc.accounts a"
      " ON a.id = h.spender_account_id WHERE a.uid = %(account)s)"],
     {"holds_name_their_card_and_accounts"}),
    ("lot-names-a-missing-account",
     ["UPDATE fc.points_lots SET account_id = 999999 WHERE id = (SELECT min(id) FROM fc.points_lots)"],
     {"points_lots_name_an_account"}),
    ("cost-rollup-of-no-sale",   # the fleet cost report would count a sale never made
     ["INSERT INTO fc.vehicle_costs (vehicle_id, grain, bucket, spend_fen, volume_ml, sale_count,"
      " first_hold_id, last_hold_id) SELECT id, 1, '2001-01-01', 100, 10, 1, 1, 1 FROM fc.accounts"
      " WHERE uid = %(account)s"],
     {"cost_rollup_matches_sales"}),
    ("statement-rollup-of-no-movement",   # a statement would show a recharge never made
     ["INSERT INTO fc.statement_movements (account_id, month, recharges_fen, transfers_fen,"
      " charged_fen, refunds_fen, other_fen, sales_fen, sales_volume_ml, sale_count)"
      " SELECT id, '2001-01-01', 100, 0, 0, 0, 0, 0, 0, 0 FROM fc.accounts WHERE uid = %(account)s"],
     {"statement_rollup_matches_journal"}),
    ("settled-while-suspended",   # risk (0006): a sale on a hold nobody approved
     ["UPDATE fc.holds SET review_state = 1 WHERE id = (SELECT min(id) FROM fc.holds WHERE state = 2)"],
     {"reviews_match_hold_states"}),
    ("confirmed-without-purchase",
     ["UPDATE fc.holds SET state = 2, settled_fen = 1"
      " WHERE id = (SELECT min(id) FROM fc.holds WHERE state = 4)"],
     {"confirmed_hold_settled_once"}),
    ("purchase-on-a-cancelled-hold",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,"
      " created_at) SELECT 2, 1, h.account_id, fc.system_account(p_code => 'FUEL_SALES'), 1, h.id, now()"
      " FROM fc.holds h WHERE h.state = 3",
      "UPDATE fc.accounts SET balance_fen = balance_fen - 1 WHERE uid = %(account)s"],
     {"confirmed_hold_settled_once"}),
    ("points-earned-twice",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,"
      " created_at) SELECT 3, 2, fc.system_account(p_code => 'POINTS_ISSUED'), h.account_id, 1, h.id, now()"
      " FROM fc.holds h WHERE h.state = 2",
      "UPDATE fc.accounts SET points_balance = points_balance + 1 WHERE uid = %(account)s"],
     {"points_earned_once"}),
    ("recharge-never-credited",
     ["INSERT INTO fc.recharges (account_id, channel, channel_txn_id, amount_fen,"
      " balance_after_fen, created_at)"
      " SELECT id, 1, 'lost', 100, balance_fen + 100, now() FROM fc.accounts WHERE uid = %(account)s"],
     {"recharge_credited_once"}),
    ("entry-without-cause",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
      " created_at) SELECT 2, 1, id, fc.system_account(p_code => 'FUEL_SALES'), 5, now()"
      " FROM fc.accounts WHERE uid = %(account)s",
      "UPDATE fc.accounts SET balance_fen = balance_fen - 5 WHERE uid = %(account)s"],
     {"entries_point_at_their_cause"}),
    # Checks of the controls (issue 3) on the same kind of ledger.
    ("usage-counter-off",
     ["UPDATE fc.usage SET amount_fen = amount_fen + 1"
      " WHERE (scope_kind, scope_id, day) = (SELECT scope_kind, scope_id, day FROM fc.usage"
      " ORDER BY 1, 2, 3 LIMIT 1)"],
     {"usage_equals_holds"}),
    ("points-lot-shrunk",
     ["UPDATE fc.points_lots SET remaining = remaining - 1"
      " WHERE id = (SELECT min(id) FROM fc.points_lots WHERE remaining > 0)"],
     {"points_lots_cover_balance"}),
    ("allocation-to-a-stranger",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
      " created_at) SELECT 5, 1, a.id, b.id, 10, now() FROM fc.accounts a, fc.accounts b"
      " WHERE a.uid = %(account)s AND b.uid = %(other)s",
      "UPDATE fc.accounts SET balance_fen = balance_fen - 10 WHERE uid = %(account)s",
      "UPDATE fc.accounts SET balance_fen = balance_fen + 10 WHERE uid = %(other)s"],
     {"allocations_stay_in_the_family"}),
    ("card-number-part-lost",
     ["DELETE FROM fc_pan_seg3.sealed WHERE card_id = (SELECT c.id FROM fc.cards c"
      " JOIN fc.accounts a ON a.id = c.account_id WHERE a.uid = %(account)s LIMIT 1)"],
     {"card_number_parts_whole"}),
    # Checks of channel refunds and settlement records (issue 8).
    ("refund-never-debited",
     ["INSERT INTO fc.refunds (recharge_id, account_id, channel, channel_refund_id, amount_fen,"
      " debited_fen, balance_after_fen, created_at) SELECT id, account_id, channel, 'lost', 100,"
      " 100, 0, now() FROM fc.recharges WHERE id = (SELECT min(id) FROM fc.recharges)"],
     {"refunds_debited_once"}),
    ("refund-shortfall-unrecorded",
     ["INSERT INTO fc.refunds (recharge_id, account_id, channel, channel_refund_id, amount_fen,"
      " debited_fen, balance_after_fen, created_at) SELECT id, account_id, channel, 'short', 100,"
      " 0, 0, now() FROM fc.recharges WHERE id = (SELECT min(id) FROM fc.recharges)"],
     {"refund_shortfall_recorded"}),
    ("settlement-record-deleted",
     ["ALTER TABLE fc.settlement_records DISABLE TRIGGER settlement_records_append_only",
      "DELETE FROM fc.settlement_records WHERE id = (SELECT min(id) FROM fc.settlement_records)"],
     {"settlement_record_per_channel_txn"}),
    # The tier window's kept sums (issue 3, round 2): an earlier month written
    # behind confirm's back.
    ("tier-window-month-added",
     ["INSERT INTO fc.monthly_spend (account_id, month, spend_fen)"
      " SELECT account_id, (month - interval '1 month')::date, 100 FROM fc.monthly_spend"
      " WHERE prior_fen IS NOT NULL ORDER BY 1, 2 LIMIT 1"],
     {"tier_window_sums_kept"}),
    # Review r2: what the tiers read, who is on the other side of an entry,
    # and what a settlement exception names.
    ("monthly-spend-drifted",
     ["UPDATE fc.monthly_spend SET spend_fen = spend_fen + 10000000, prior_fen = NULL,"
      " prior_window = NULL"],
     {"monthly_spend_equals_sales"}),
    ("monthly-spend-in-the-wrong-month",
     ["UPDATE fc.monthly_spend SET month = (month - interval '1 month')::date, prior_fen = NULL,"
      " prior_window = NULL"],
     {"monthly_spend_equals_sales"}),
    ("sale-credited-to-a-clearing-account",  # balances and the zero sum still agree
     ["ALTER TABLE fc.journal DISABLE TRIGGER journal_append_only",
      "UPDATE fc.journal SET credit_account_id = fc.system_account(p_code => 'CHANNEL_CLEARING_ALIPAY')"
      " WHERE kind = 2",
      "ALTER TABLE fc.journal ENABLE TRIGGER journal_append_only"],
     {"entries_have_their_counterparties"}),
    ("recharge-from-another-channel",
     ["ALTER TABLE fc.journal DISABLE TRIGGER journal_append_only",
      "UPDATE fc.journal SET debit_account_id = fc.system_account(p_code => 'CHANNEL_CLEARING_COUNTER')"
      " WHERE id = (SELECT min(id) FROM fc.journal WHERE kind = 1)",
      "ALTER TABLE fc.journal ENABLE TRIGGER journal_append_only"],
     {"entries_have_their_counterparties"}),
    ("settlement-exception-on-a-paid-hold",  # fuel "not paid" on a hold that was paid
     ["INSERT INTO fc.settlement_exceptions (hold_id, account_id, amount_fen, reason,"
      " created_at) SELECT id, account_id, settled_fen, 'HOLD_EXPIRED_INSUFFICIENT_FUNDS',"
      " now() FROM fc.holds WHERE state = 2"],
     {"settlement_exception_on_unpaid_hold"}),
    ("settlement-exception-on-another-account",
     ["INSERT INTO fc.settlement_exceptions (hold_id, account_id, amount_fen, reason,"
      " created_at) SELECT h.id, a.id, h.amount_fen, 'HOLD_EXPIRED_INSUFFICIENT_FUNDS', now()"
      " FROM fc.holds h, fc.accounts a WHERE h.state = 4 AND a.uid = %(other)s"
      " AND h.account_id <> a.id"],
     {"settlement_exception_on_unpaid_hold"}),
    # Issue 15: the invariants a review found unchecked, the append-only
    # guards, and the journal's hash chain.
    ("points-credited-to-the-funder",  # the sale's spender changed under its points entry
     ["ALTER TABLE fc.holds DISABLE TRIGGER holds_state_machine",
      "UPDATE fc.holds SET spender_account_id = (SELECT id FROM fc.accounts WHERE uid = %(other)s)"
      " WHERE state = 2",
      "ALTER TABLE fc.holds ENABLE TRIGGER holds_state_machine"],
     {"points_credited_to_the_spender", "holds_on_the_right_funder"}),
    ("hold-on-the-wrong-funder",  # another customer's expired hold moved onto this account
     ["ALTER TABLE fc.holds DISABLE TRIGGER holds_state_machine",
      "UPDATE fc.holds SET account_id = (SELECT id FROM fc.accounts WHERE uid = %(account)s)"
      " WHERE state = 4 AND account_id = (SELECT id FROM fc.accounts WHERE uid = %(other)s)",
      "ALTER TABLE fc.holds ENABLE TRIGGER holds_state_machine"],
     {"holds_on_the_right_funder"}),
    ("audit-log-guard-disabled",
     ["ALTER TABLE fc.audit_log DISABLE TRIGGER audit_log_append_only"],
     {"append_only_triggers_enabled"}),
    ("journal-guard-dropped",
     ["DROP TRIGGER journal_no_truncate ON fc.journal"],
     {"append_only_triggers_enabled"}),
    ("chained-entry-edited",  # balances untouched: only the chain shows it
     ["ALTER TABLE fc.journal DISABLE TRIGGER journal_append_only",
      "UPDATE fc.journal SET description = 'edited' WHERE id = (SELECT min(id) FROM fc.journal)",
      "ALTER TABLE fc.journal ENABLE TRIGGER journal_append_only"],
     {"journal_chain_intact"}),
    # Issue 14: an open exception filed under an account that is not its
    # hold's (listed where nobody chases it), and an adjustment approved
    # without its booking.
    ("open-exception-under-another-account",
     ["INSERT INTO fc.settlement_exceptions (kind, hold_id, account_id, amount_fen, reason,"
      " created_at) SELECT 2, h.id, a.id, 10, 'OVERRUN_SHORTFALL', now()"
      " FROM fc.holds h, fc.accounts a WHERE h.state = 2 AND a.uid = %(other)s"
      " AND h.account_id <> a.id"],
     {"open_settlement_exceptions_reachable"}),
    ("adjustment-approved-unbooked",
     ["INSERT INTO fc.adjustments (account_id, direction, amount_fen, reason, state, proposed_by,"
      " proposed_at, decided_by, decided_at) SELECT id, 1, 500, 'goodwill', 2, 'admin::a', now(),"
      " 'admin::b', now() FROM fc.accounts WHERE uid = %(account)s"],
     {"adjustments_booked_once"}),
    # Issue 14: sale refunds. A refund row without its journal entries (so
    # the month's spend no longer matches either), one beyond its sale, one
    # that gave back more points than the sale earned.
    ("sale-refund-unbooked",
     ["INSERT INTO fc.sale_refunds (hold_id, account_id, amount_fen, points_taken,"
      " points_shortfall, reason, refunded_by, created_at) SELECT id, account_id, 1, 0, 0,"
      " 'dispute', 'admin::a', now() FROM fc.holds WHERE state = 2 ORDER BY id LIMIT 1"],
     {"sale_refund_booked_once", "monthly_spend_equals_sales"}),
    ("sale-refund-beyond-sale",
     ["INSERT INTO fc.sale_refunds (hold_id, account_id, amount_fen, points_taken,"
      " points_shortfall, reason, refunded_by, created_at) SELECT id, account_id,"
      " settled_fen + 1, 0, 0, 'dispute', 'admin::a', now() FROM fc.holds WHERE state = 2"
      " ORDER BY id LIMIT 1"],
     {"sale_refunds_within_sale", "sale_refund_booked_once", "monthly_spend_equals_sales"}),
    ("sale-refund-points-beyond-earned",
     ["INSERT INTO fc.sale_refunds (hold_id, account_id, amount_fen, points_taken,"
      " points_shortfall, reason, refunded_by, created_at) SELECT id, account_id, 1, 0,"
      " points_earned + 1, 'dispute', 'admin::a', now() FROM fc.holds WHERE state = 2"
      " ORDER BY id LIMIT 1"],
     {"refunded_points_within_earned", "sale_refund_booked_once", "monthly_spend_equals_sales"}),
    # Issue 14, item 9: an account the expiry sweep set aside.
    ("account-set-aside-by-the-sweep",
     ["INSERT INTO fc.hold_sweep_failures (account_id, sqlstate, message, failures,"
      " first_failed_at, last_failed_at, retry_at) SELECT id, 'P0001', 'usage counters missing',"
      " 1, now(), now(), now() + interval '1 hour' FROM fc.accounts WHERE uid = %(account)s"],
     {"no_account_set_aside_by_the_expiry_sweep"}),
    # Overrun receivables (issue 14, item 3): an account said to owe what no
    # receivable says; a receivable never booked, with no exception to chase it.
    ("receivable-on-the-account-only",
     ["UPDATE fc.accounts SET receivable_fen = receivable_fen + 5 WHERE uid = %(account)s"],
     {"receivables_booked_and_owed"}),
    ("receivable-unbooked",
     ["INSERT INTO fc.receivables (account_id, hold_id, amount_fen, created_at)"
      " SELECT h.account_id, h.id, 5, now() FROM fc.holds h JOIN fc.accounts a ON a.id = h.account_id"
      " WHERE a.uid = %(account)s AND h.state = 2 ORDER BY h.id LIMIT 1"],
     {"receivables_booked_and_owed", "receivable_exception_open_while_owed"}),
    # Litre counters (issue 14, item 4): litres counted that no sale sold.
    ("litres-uncounted",
     ["INSERT INTO fc.volume_usage (card_id, day, volume_ml)"
      " SELECT c.id, current_date, 1000 FROM fc.cards c JOIN fc.accounts a ON a.id = c.account_id"
      " WHERE a.uid = %(account)s LIMIT 1"],
     {"litres_equal_confirmed_volumes"}),
    # Invoices (issue 19): the account's recharges invoiced at recharge, then (past the
    # constraint that forbids it) its consumption invoiced too: the same money twice.
    ("money-invoiced-twice",
     ["INSERT INTO fc.invoicing_modes SELECT id, 1, now() FROM fc.accounts WHERE uid = %(account)s",
      "INSERT INTO fc.invoices (account_id, kind, invoice_type, recharge_id, buyer_name, amount_fen,"
      " tax_fen, total_fen, created_at, requested_by) SELECT r.account_id, 1, 1, r.id, 'x',"
      " r.amount_fen, 0, r.amount_fen, now(), 't' FROM fc.recharges r"
      " JOIN fc.accounts a ON a.id = r.account_id WHERE a.uid = %(account)s",
      "ALTER TABLE fc.invoices DROP CONSTRAINT invoice_follows_account_mode",
      "INSERT INTO fc.invoices (account_id, kind, invoice_type, month, buyer_name, amount_fen,"
      " tax_fen, total_fen, created_at, requested_by) SELECT id, 2, 1, date_trunc('month', now()),"
      " 'x', 100, 0, 100, now(), 't' FROM fc.accounts WHERE uid = %(account)s"],
     {"no_money_invoiced_twice"}),
    ("invoice-item-off-by-a-fen",
     ["INSERT INTO fc.invoicing_modes SELECT id, 1, now() FROM fc.accounts WHERE uid = %(account)s",
      "INSERT INTO fc.invoices (account_id, kind, invoice_type, recharge_id, buyer_name, amount_fen,"
      " tax_fen, total_fen, created_at, requested_by) SELECT r.account_id, 1, 1, r.id, 'x',"
      " r.amount_fen, 0, r.amount_fen, now(), 't' FROM fc.recharges r"
      " JOIN fc.accounts a ON a.id = r.account_id WHERE a.uid = %(account)s",
      "INSERT INTO fc.invoice_items (invoice_id, line_no, name, tax_code, amount_fen, tax_fen,"
      " total_fen) SELECT id, 1, 'x', '6010000000000000000', amount_fen - 1, 0, total_fen - 1"
      " FROM fc.invoices"],
     {"invoice_lines_sum_to_totals"}),
    # The event stream (issue 9): a position lost from the stream.
    ("event-deleted",
     ["SELECT fc.sequence_events(p_now => now(), p_limit => 1000)",
      "DELETE FROM fc.events WHERE position = 2"],
     {"event_positions_gap_free"}),
]
# The invariants of the core ledger (issue 2): a corruption must trip exactly
# the ones expected of it. Checks added later may also fire.
LEDGER_CHECKS = {"balance_equals_journal", "points_equal_journal", "ledger_sums_to_zero",
                 "held_equals_active_holds", "no_overdraft", "journal_references_exist",
                 "confirmed_hold_settled_once", "points_earned_once", "recharge_credited_once",
                 "entries_point_at_their_cause"}


@pytest.mark.parametrize(("statements", "expected"), [(s, e) for _, s, e in CORRUPTIONS],
                         ids=[n for n, _, _ in CORRUPTIONS])
def test_verify_names_the_violated_check(server: RunningServer, db: Conn,
                                         statements: list[str], expected: set[str]) -> None:
    card, other = _busy_ledger(server)
    assert verify.run(server.database_url) == []
    for statement in statements:
        db.execute(statement.encode(), {"account": card.account_id, "other": other.account_id})
    violations = verify.run(server.database_url)
    found = {v.check for v in violations}
    assert expected <= found
    assert not (found - expected) & LEDGER_CHECKS, found
    for v in violations:
        assert v.samples, v.check
        assert v.description


def test_every_check_is_exercised() -> None:
    named = set().union(*(e for _, _, e in CORRUPTIONS))
    assert named == {c.name for c in verify.CHECKS}


@pytest.mark.parametrize("statement", [
    "UPDATE fc.journal SET amount = amount + 1",
    "UPDATE fc.journal SET description = 'edited' WHERE id = (SELECT min(id) FROM fc.journal)",
    "DELETE FROM fc.journal WHERE id = (SELECT max(id) FROM fc.journal)",
    "DELETE FROM fc.journal",
    "TRUNCATE fc.journal",
    "TRUNCATE fc.journal CASCADE",
])
def test_journal_is_append_only(server: RunningServer, db: Conn, statement: str) -> None:
    _busy_ledger(server)
    before = scalar(db, "SELECT md5(string_agg(j::text, ',' ORDER BY j.id)) FROM fc.journal j")
    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        db.execute(statement.encode())
    after = scalar(db, "SELECT md5(string_agg(j::text, ',' ORDER BY j.id)) FROM fc.journal j")
    assert after == before
    assert verify.run(server.database_url) == []


def test_hold_state_machine_refuses_illegal_transitions(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    hold = builders.authorize(server, card, 1_000).hold
    assert builders.confirm(server, hold.hold_id, 1_000).decision == common_pb2.DECISION_APPROVED
    for statement in ("UPDATE fc.holds SET state = 1, closed_at = NULL, settled_fen = 0",
                      "UPDATE fc.holds SET state = 3, settled_fen = 0",
                      "UPDATE fc.holds SET amount_fen = 2000"):
        with pytest.raises(psycopg.errors.RaiseException):
            db.execute(statement.encode())
    assert verify.run(server.database_url) == []
