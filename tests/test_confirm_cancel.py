"""Semantics 2 and 3: Confirm settles 0 < final <= held, releases the rest,
earns points and records the sale; final = 0 cancels; Cancel releases and is
idempotent; wrong-state calls are refused and change nothing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from fuelcard.v1 import account_pb2, common_pb2, transaction_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, expect, snapshot

FP = grpc.StatusCode.FAILED_PRECONDITION


def _held(server: RunningServer, balance_fen: int, amount_fen: int
          ) -> tuple[builders.FundedCard, common_pb2.Hold]:
    card = builders.open_card(server, balance_fen=balance_fen)
    auth = builders.authorize(server, card, amount_fen)
    assert auth.decision == common_pb2.DECISION_APPROVED
    return card, auth.hold


@pytest.mark.parametrize(("final_fen", "points"), [(1, 0), (99, 0), (100, 1), (25_150, 251),
                                                   (30_000, 300)])
def test_confirm_settles_final_releases_rest_and_earns_points(
        server: RunningServer, db: Conn, final_fen: int, points: int) -> None:
    card, hold = _held(server, 50_000, 30_000)
    done = builders.confirm(server, hold.hold_id, final_fen, volume_ml=32_040, unit_price_fen=785)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.decline_reason == common_pb2.DECLINE_REASON_UNSPECIFIED
    assert done.points_earned == points
    assert done.balance_fen == 50_000 - final_fen
    assert done.settlement_exception_id == ""
    h = done.hold
    assert h.state == common_pb2.HOLD_STATE_CONFIRMED
    assert (h.amount_fen, h.settled_fen, h.points_earned) == (30_000, final_fen, points)
    assert (h.volume_ml, h.unit_price_fen) == (32_040, 785)
    assert (h.station_id, h.terminal_id, h.nozzle) == ("KM-001", "KM-001-T1", 3)
    assert h.product == common_pb2.PRODUCT_GASOLINE_92
    assert not h.confirmed_late
    assert h.HasField("close_time")

    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen) == (50_000 - final_fen, 0)
    assert bal.balance.available_fen == 50_000 - final_fen
    assert bal.points_balance == points
    # The sale is one purchase entry to FUEL_SALES; the points one earn entry.
    row = account_row(db, card.account_id)
    sales = db.execute(
        "SELECT j.debit_account_id, s.system_code, j.amount FROM fc.journal j"
        " JOIN fc.accounts s ON s.id = j.credit_account_id"
        " JOIN fc.holds h ON h.id = j.hold_id WHERE j.kind = 2 AND h.uid = %s",
        (hold.hold_id,)).fetchall()
    assert sales == [(row["id"], "FUEL_SALES", final_fen)]
    earned = db.execute(
        "SELECT s.system_code, j.credit_account_id, j.amount FROM fc.journal j"
        " JOIN fc.accounts s ON s.id = j.debit_account_id WHERE j.kind = 3").fetchall()
    assert earned == ([("POINTS_ISSUED", row["id"], points)] if points else [])
    stored = db.execute(
        "SELECT station_id, terminal_id, nozzle, product, volume_ml, unit_price_fen, settled_fen"
        " FROM fc.holds WHERE uid = %s", (hold.hold_id,)).fetchone()
    assert stored == ("KM-001", "KM-001-T1", 3, common_pb2.PRODUCT_GASOLINE_92, 32_040, 785,
                      final_fen)
    # The settled transaction is listed for the account.
    txns = server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=card.account_id)).transactions
    assert [(t.kind, t.amount_fen, t.hold_id) for t in txns] == [
        (account_pb2.TRANSACTION_KIND_PURCHASE, -final_fen, hold.hold_id),
        (account_pb2.TRANSACTION_KIND_RECHARGE, 50_000, "")]
    assert server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id)).hold == h
    assert_ledger_ok(server.database_url)


def test_confirm_zero_behaves_as_cancel(server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 50_000, 30_000)
    done = builders.confirm(server, hold.hold_id, 0)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert (done.hold.settled_fen, done.points_earned, done.balance_fen) == (0, 0, 50_000)
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (50_000, 0, 0)
    assert count(db, "journal", "hold_id IS NOT NULL") == 0
    # It is now a cancelled hold: a real confirm is refused.
    expect(lambda: builders.confirm(server, hold.hold_id, 100), FP, "HOLD_CANCELLED")
    assert_ledger_ok(server.database_url)


def test_confirm_above_the_overrun_tolerance_moves_no_money(server: RunningServer,
                                                           db: Conn) -> None:
    # 5 % of a 30 000 hold is 1 500: more is refused (tests/test_overruns.py has
    # the overruns within it). Only the exception and the remembered answer are written.
    card, hold = _held(server, 50_000, 30_000)
    before = snapshot(db)
    expect(lambda: builders.confirm(server, hold.hold_id, 31_501), FP, "OVERRUN_ABOVE_TOLERANCE")
    after = snapshot(db)
    assert {t for t in after if after[t] != before.get(t)} == {"settlement_exceptions",
                                                               "idempotency_keys"}
    # The hold is intact and can still be confirmed for its full amount.
    assert builders.confirm(server, hold.hold_id, 30_000).hold.settled_fen == 30_000
    assert builders.balance(server, card).balance.balance_fen == 20_000


def test_confirm_twice_with_the_same_request_moves_money_once(server: RunningServer,
                                                               db: Conn) -> None:
    card, hold = _held(server, 50_000, 30_000)
    rid = builders.rid("confirm")
    first = builders.confirm(server, hold.hold_id, 20_000, request_id=rid)
    after_first = snapshot(db)
    second = builders.confirm(server, hold.hold_id, 20_000, request_id=rid)
    assert second == first
    assert snapshot(db) == after_first
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.points_balance) == (30_000, 200)
    assert count(db, "journal", "kind = 2") == 1


def test_confirm_with_a_new_request_on_a_confirmed_hold_is_refused(server: RunningServer,
                                                                   db: Conn) -> None:
    _, hold = _held(server, 50_000, 30_000)
    builders.confirm(server, hold.hold_id, 20_000)
    before = snapshot(db)
    e = expect(lambda: builders.confirm(server, hold.hold_id, 20_000), FP, "HOLD_ALREADY_CONFIRMED")
    assert e.bad_request is None
    assert snapshot(db) == before


def test_confirm_after_cancel_is_refused(server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 50_000, 30_000)
    builders.cancel(server, hold.hold_id)
    before = snapshot(db)
    expect(lambda: builders.confirm(server, hold.hold_id, 10_000), FP, "HOLD_CANCELLED")
    assert snapshot(db) == before
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (50_000, 0, 0)


def test_cancel_releases_the_hold_and_is_idempotent(server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 50_000, 30_000)
    rid = builders.rid("cancel")
    first = builders.cancel(server, hold.hold_id, request_id=rid)
    assert first.hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert first.hold.HasField("close_time")
    assert first.hold.settled_fen == 0
    bal = builders.balance(server, card).balance
    assert (bal.balance_fen, bal.held_fen, bal.available_fen) == (50_000, 0, 50_000)
    after = snapshot(db)
    # Same request: same answer, nothing else happens.
    assert builders.cancel(server, hold.hold_id, request_id=rid) == first
    assert snapshot(db) == after
    # A new request on the cancelled hold succeeds and changes no money.
    again = builders.cancel(server, hold.hold_id)
    assert again.hold == first.hold
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert count(db, "journal", "hold_id IS NOT NULL") == 0
    assert_ledger_ok(server.database_url)


def test_cancel_of_a_confirmed_hold_is_refused(server: RunningServer, db: Conn) -> None:
    card, hold = _held(server, 50_000, 30_000)
    builders.confirm(server, hold.hold_id, 12_300)
    before = snapshot(db)
    expect(lambda: builders.cancel(server, hold.hold_id), FP, "HOLD_ALREADY_CONFIRMED")
    assert snapshot(db) == before
    assert builders.balance(server, card).balance.balance_fen == 50_000 - 12_300


def test_concurrent_confirm_and_cancel_exactly_one_wins(server: RunningServer, db: Conn) -> None:
    rounds = 12
    card = builders.open_card(server, balance_fen=rounds * 10_000)
    holds = [builders.authorize(server, card, 10_000).hold for _ in range(rounds)]
    outcomes: list[str] = []
    for hold in holds:
        gate = threading.Barrier(2)

        def do_confirm(hold_id: str = hold.hold_id, gate: threading.Barrier = gate) -> str:
            gate.wait(timeout=10)
            try:
                done = builders.confirm(server, hold_id, 7_000)
            except grpc.RpcError as err:
                assert err.code() == FP, err
                return "confirm-refused"
            assert done.hold.state == common_pb2.HOLD_STATE_CONFIRMED
            return "confirmed"

        def do_cancel(hold_id: str = hold.hold_id, gate: threading.Barrier = gate) -> str:
            gate.wait(timeout=10)
            try:
                done = builders.cancel(server, hold_id)
            except grpc.RpcError as err:
                assert err.code() == FP, err
                return "cancel-refused"
            assert done.hold.state == common_pb2.HOLD_STATE_CANCELLED
            return "cancelled"

        with ThreadPoolExecutor(max_workers=2) as pool:
            a, b = pool.submit(do_confirm), pool.submit(do_cancel)
            pair = (a.result(), b.result())
        assert pair in {("confirmed", "cancel-refused"), ("confirm-refused", "cancelled")}, pair
        state = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id)).hold.state
        assert state == (common_pb2.HOLD_STATE_CONFIRMED if pair[0] == "confirmed"
                         else common_pb2.HOLD_STATE_CANCELLED)
        outcomes.append(pair[0])

    confirmed = outcomes.count("confirmed")
    row = account_row(db, card.account_id)
    assert row["held_fen"] == 0
    assert row["balance_fen"] == rounds * 10_000 - confirmed * 7_000
    assert row["points_balance"] == confirmed * 70
    assert count(db, "journal", "kind = 2") == confirmed
    assert_ledger_ok(server.database_url)
