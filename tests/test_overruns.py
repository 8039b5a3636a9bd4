"""Issue 14, item 3: a pump overrun (Confirm above the hold) within the
tolerance is booked in full; what the balance cannot pay is owed by the
account (a receivable: authorizations decline until a recharge repays it)
and a settlement exception of kind 2; beyond the tolerance the confirm is
refused, books nothing and records the exception."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from fuelcard.v1 import account_pb2, common_pb2, transaction_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, expect

# The migration's defaults: 1 000 fen, or 5 % of the hold if larger.
TOLERANCE_FEN = 1_000


def _held(server: RunningServer, balance_fen: int, amount_fen: int
          ) -> tuple[builders.FundedCard, common_pb2.Hold]:
    card = builders.open_card(server, balance_fen=balance_fen)
    auth = builders.authorize(server, card, amount_fen)
    assert auth.decision == common_pb2.DECISION_APPROVED
    return card, auth.hold


def _entries(db: Conn, hold_id: str) -> list[tuple[int, str | None, str | None, int]]:
    rows = db.execute(
        "SELECT j.kind, d.system_code, c.system_code, j.amount FROM fc.journal j"
        " JOIN fc.accounts d ON d.id = j.debit_account_id"
        " JOIN fc.accounts c ON c.id = j.credit_account_id"
        " JOIN fc.holds h ON h.id = j.hold_id"
        " WHERE h.uid = %s AND j.asset = 1 ORDER BY j.id", (hold_id,)).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def test_an_overrun_the_balance_covers_is_taken_from_the_available_money(
        server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 50_000, 10_000)
    done = builders.confirm(server, hold.hold_id, 10_000 + TOLERANCE_FEN)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert (done.hold.settled_fen, done.balance_fen) == (11_000, 39_000)
    assert (done.receivable_fen, done.settlement_exception_id) == (0, "")
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"], row["receivable_fen"]) == (39_000, 0, 0)
    assert _entries(db, hold.hold_id) == [(2, None, "FUEL_SALES", 11_000)]
    # Usage counts the whole sale.
    used = db.execute("SELECT sum(amount_fen) FROM fc.usage WHERE scope_kind = 1").fetchone()
    assert used is not None and used[0] == 11_000
    assert_ledger_ok(server.database_url)


def test_an_overrun_past_the_money_is_booked_owed_and_repaid_by_the_next_recharge(
        server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 10_000, 10_000)
    done = builders.confirm(server, hold.hold_id, 10_800)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert (done.hold.settled_fen, done.balance_fen, done.receivable_fen) == (10_800, 0, 800)
    assert done.settlement_exception_id
    # The sale is booked in full: 10 000 from the balance, 800 from RECEIVABLES.
    assert _entries(db, hold.hold_id) == [(2, None, "FUEL_SALES", 10_000),
                                          (12, "RECEIVABLES", "FUEL_SALES", 800)]
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"], row["receivable_fen"]) == (0, 0, 800)
    x = db.execute("SELECT kind, reason, amount_fen, resolved_at FROM fc.settlement_exceptions"
                   " WHERE uid = %s", (done.settlement_exception_id,)).fetchone()
    assert x == (2, "OVERRUN_SHORTFALL", 800, None)
    assert_ledger_ok(server.database_url)

    # Owing, the account declines new sales, even with money on it.
    builders.recharge(server, card.account_id, 500)   # repays 500 of the 800
    assert account_row(db, card.account_id)["receivable_fen"] == 300
    declined = builders.authorize(server, card, 100)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_RECEIVABLE_OUTSTANDING
    assert_ledger_ok(server.database_url)

    paid = builders.recharge(server, card.account_id, 5_000)
    assert paid.balance_fen == 4_700
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["receivable_fen"]) == (4_700, 0)
    repaid = db.execute(
        "SELECT j.amount, c.system_code FROM fc.journal j"
        " JOIN fc.accounts c ON c.id = j.credit_account_id"
        " WHERE j.kind = 12 AND j.recharge_id IS NOT NULL ORDER BY j.id").fetchall()
    assert repaid == [(500, "RECEIVABLES"), (300, "RECEIVABLES")]
    resolved = db.execute("SELECT resolved_at IS NOT NULL, resolved_by FROM fc.settlement_exceptions"
                          " WHERE uid = %s", (done.settlement_exception_id,)).fetchone()
    assert resolved == (True, None)
    # The account's history shows the repayments, each naming the sale and its recharge.
    txns = server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=card.account_id)).transactions
    repayments = [t for t in txns if t.kind == account_pb2.TRANSACTION_KIND_OVERRUN_REPAYMENT]
    assert [(t.amount_fen, t.hold_id) for t in repayments] == [(-300, hold.hold_id),
                                                              (-500, hold.hold_id)]
    assert all(t.recharge_id for t in repayments)
    assert builders.authorize(server, card, 100).decision == common_pb2.DECISION_APPROVED
    assert_ledger_ok(server.database_url)


def test_an_overrun_above_the_tolerance_is_refused_recorded_and_books_nothing(
        server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 50_000, 10_000)
    rid = builders.rid("confirm")
    for _ in range(2):   # the refusal is the request's remembered answer
        e = expect(lambda: builders.confirm(server, hold.hold_id, 10_000 + TOLERANCE_FEN + 1,
                                            request_id=rid),
                   grpc.StatusCode.FAILED_PRECONDITION, "OVERRUN_ABOVE_TOLERANCE")
        exception_id = e.infos[0].metadata["settlement_exception_id"]
        x = db.execute("SELECT kind, reason, amount_fen, resolved_at FROM fc.settlement_exceptions"
                       " WHERE uid = %s", (exception_id,)).fetchone()
        assert x == (2, "OVERRUN_ABOVE_TOLERANCE", TOLERANCE_FEN + 1, None)
    got = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id)).hold
    assert got.state == common_pb2.HOLD_STATE_AUTHORIZED
    assert _entries(db, hold.hold_id) == []
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"], row["receivable_fen"]) == (50_000, 10_000, 0)
    assert_ledger_ok(server.database_url)
    # The terminal may then confirm what it can justify.
    assert builders.confirm(server, hold.hold_id, 10_000).decision == common_pb2.DECISION_APPROVED
    assert_ledger_ok(server.database_url)


def test_the_tolerance_is_a_share_of_a_large_hold(server: RunningServer, db: Conn) -> None:
    _, hold = _held(server, 100_000, 60_000)    # 5 % = 3 000 fen > 1 000
    assert builders.confirm(server, hold.hold_id, 63_000).hold.settled_fen == 63_000
    _, other = _held(server, 100_000, 60_000)
    expect(lambda: builders.confirm(server, other.hold_id, 63_001),
           grpc.StatusCode.FAILED_PRECONDITION, "OVERRUN_ABOVE_TOLERANCE")
    assert_ledger_ok(server.database_url)


def test_an_overrun_racing_another_authorization_keeps_the_ledger_whole(
        server: RunningServer, db: Conn) -> None:
    """The overrun takes its excess from the available money under the
    account's lock, so whichever goes first, the other sees what is left:
    the balance never falls below what is held, and what the balance could
    not pay is owed, never lost."""
    for _ in range(6):
        card, hold = _held(server, 10_000, 6_000)
        barrier = threading.Barrier(2)

        def overrun(hold_id: str, start: threading.Barrier) -> transaction_pb2.ConfirmResponse:
            start.wait()
            return builders.confirm(server, hold_id, 6_900)

        def other(card: builders.FundedCard, start: threading.Barrier
                  ) -> transaction_pb2.AuthorizeResponse:
            start.wait()
            return builders.authorize(server, card, 4_000)

        with ThreadPoolExecutor(2) as pool:
            f1 = pool.submit(overrun, hold.hold_id, barrier)
            f2 = pool.submit(other, card, barrier)
            done, auth = f1.result(), f2.result()
        row = account_row(db, card.account_id)
        assert row["balance_fen"] >= row["held_fen"] >= 0
        assert done.hold.settled_fen == 6_900
        if auth.decision == common_pb2.DECISION_APPROVED:
            # The authorization went first: the overrun found 6 000 to pay.
            assert (done.receivable_fen, row["receivable_fen"]) == (900, 900)
            assert (row["balance_fen"], row["held_fen"]) == (4_000, 4_000)
        else:
            assert auth.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
            assert (done.receivable_fen, row["receivable_fen"]) == (0, 0)
            assert (row["balance_fen"], row["held_fen"]) == (3_100, 0)
        assert_ledger_ok(server.database_url)
