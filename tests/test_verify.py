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
from pathlib import Path

import psycopg
import pytest
from fuelcard.v1 import common_pb2, points_pb2
from fuelcard_server import verify

from tests import builders
from tests.ledger_asserts import Conn, scalar
from tests.plugins.server import TEST_KEY_HEX, RunningServer

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
      " recharge_id, created_at) SELECT 1, 1, fc.system_account('CHANNEL_CLEARING_ALIPAY'), id,"
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
      " description, created_at) VALUES (4, 2, 999999, fc.system_account('POINTS_REDEEMED'), 1,"
      " 'ghost', now())"],
     {"journal_references_exist", "ledger_sums_to_zero"}),
    ("settled-while-suspended",   # risk (0006): a sale on a hold nobody approved
     ["UPDATE fc.holds SET review_state = 1 WHERE id = (SELECT min(id) FROM fc.holds WHERE state = 2)"],
     {"reviews_match_hold_states"}),
    ("confirmed-without-purchase",
     ["UPDATE fc.holds SET state = 2, settled_fen = 1"
      " WHERE id = (SELECT min(id) FROM fc.holds WHERE state = 4)"],
     {"confirmed_hold_settled_once"}),
    ("purchase-on-a-cancelled-hold",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,"
      " created_at) SELECT 2, 1, h.account_id, fc.system_account('FUEL_SALES'), 1, h.id, now()"
      " FROM fc.holds h WHERE h.state = 3",
      "UPDATE fc.accounts SET balance_fen = balance_fen - 1 WHERE uid = %(account)s"],
     {"confirmed_hold_settled_once"}),
    ("points-earned-twice",
     ["INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,"
      " created_at) SELECT 3, 2, fc.system_account('POINTS_ISSUED'), h.account_id, 1, h.id, now()"
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
      " created_at) SELECT 2, 1, id, fc.system_account('FUEL_SALES'), 5, now()"
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
    # The event stream (issue 9): a position lost from the stream.
    ("event-deleted",
     ["SELECT fc.sequence_events(now(), 1000)",
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
