"""Sale refunds (退款, issue 14 item 1): full and partial refunds of a
confirmed sale, back to the account that funded it, through the journal
(kind 10); the points taken back pro rata (from the sale's own lot, then
what is left; a shortfall when they were spent); the tier spend reduced;
idempotent; a step-up above the threshold; racing refunds never exceed the
sale; `fuelcard verify` clean after each."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    points_pb2,
    points_pb2_grpc,
    refund_pb2,
    refund_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    step_up_pb2,
)
from fuelcard_server.clock import ManualClock
from fuelcard_server.settings import Settings

from tests.plugins.server import RunningServer, ServerThread, make_settings
from tests.support import builders, control_builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, expect, scalar, snapshot
from tests.support.otp_fake import FakeOtpSender

FP = grpc.StatusCode.FAILED_PRECONDITION
STEP_UP_ABOVE_FEN = 50_000
SHARED = account_pb2.FUNDING_MODE_SHARED


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, step_up_sale_refund_above_fen=STEP_UP_ABOVE_FEN)


def _stub(server: RunningServer) -> refund_pb2_grpc.RefundServiceStub:
    return refund_pb2_grpc.RefundServiceStub(server.channel)


def _refund(server: RunningServer, hold_id: str, amount_fen: int, request_id: str | None = None,
            reason: str = "driver disputes the sale, ticket 812",
            step_up: step_up_pb2.StepUp | None = None) -> refund_pb2.RefundSaleResponse:
    answer: refund_pb2.RefundSaleResponse = _stub(server).RefundSale(refund_pb2.RefundSaleRequest(
        request_id=request_id or builders.rid("refund"), hold_id=hold_id, amount_fen=amount_fen,
        reason=reason, step_up=step_up))
    return answer


def _sale(server: RunningServer, balance_fen: int, amount_fen: int
          ) -> tuple[builders.FundedCard, common_pb2.Hold]:
    card = builders.open_card(server, balance_fen=balance_fen)
    done = control_builders.sale(server, card, amount_fen)
    return card, done.hold


def _entries(db: Conn, hold_id: str) -> list[tuple[object, ...]]:
    """The sale's refund entries: asset, debit (system code or customer uid),
    credit, amount."""
    return db.execute(
        "SELECT j.asset, coalesce(d.system_code, d.uid::text), coalesce(c.system_code, c.uid::text),"
        " j.amount FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id"
        " JOIN fc.accounts d ON d.id = j.debit_account_id"
        " JOIN fc.accounts c ON c.id = j.credit_account_id"
        " WHERE j.kind = 10 AND h.uid = %s ORDER BY j.id", (hold_id,)).fetchall()


def _month_spend(db: Conn, account_id: str) -> int:
    return int(scalar(db, "SELECT coalesce(sum(m.spend_fen), 0) FROM fc.monthly_spend m"
                          " JOIN fc.accounts a ON a.id = m.account_id WHERE a.uid = %s",
                      (account_id,)))


def test_full_refund_gives_back_money_points_and_spend(server: RunningServer, db: Conn) -> None:
    card, hold = _sale(server, 50_000, 30_000)
    assert hold.points_earned == 300
    answer = _refund(server, hold.hold_id, 30_000)
    r = answer.refund
    assert answer.balance_fen == 50_000
    assert (r.hold_id, r.account_id, r.amount_fen, r.refunded_total_fen) == (
        hold.hold_id, card.account_id, 30_000, 30_000)
    assert (r.points_taken_back, r.points_shortfall) == (300, 0)
    assert r.reason == "driver disputes the sale, ticket 812"
    assert r.refunded_by and r.entry_id > 0
    assert _entries(db, hold.hold_id) == [(1, "FUEL_SALES", card.account_id, 30_000),
                                          (2, card.account_id, "POINTS_ISSUED", 300)]
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"], row["points_balance"]) == (50_000, 0, 0)
    assert _month_spend(db, card.account_id) == 0
    # The sale itself stays as it was: CONFIRMED for what the pump delivered.
    assert scalar(db, "SELECT state FROM fc.holds WHERE uid = %s", (hold.hold_id,)) == 2
    listed = _stub(server).ListSaleRefunds(refund_pb2.ListSaleRefundsRequest(hold_id=hold.hold_id))
    assert list(listed.refunds) == [r]
    # Nothing more to refund.
    before = snapshot(db)
    expect(lambda: _refund(server, hold.hold_id, 1), FP, "REFUND_EXCEEDS_SALE")
    assert snapshot(db) == before
    assert_ledger_ok(server.database_url)


def test_partial_refunds_take_back_points_pro_rata_up_to_the_sale(server: RunningServer,
                                                                  db: Conn) -> None:
    card, hold = _sale(server, 50_000, 25_150)   # 251 points
    first = _refund(server, hold.hold_id, 10_000).refund
    # 251 * 10 000 / 25 150 = 99.8: 99 back now, rounded down.
    assert (first.amount_fen, first.refunded_total_fen, first.points_taken_back) == (
        10_000, 10_000, 99)
    second = _refund(server, hold.hold_id, 15_000).refund
    # 251 * 25 000 / 25 150 = 249.5: 249 in all, 150 now.
    assert (second.refunded_total_fen, second.points_taken_back) == (25_000, 150)
    before = snapshot(db)
    expect(lambda: _refund(server, hold.hold_id, 151), FP, "REFUND_EXCEEDS_SALE", None)
    assert snapshot(db) == before
    last = _refund(server, hold.hold_id, 150).refund
    # The last fen takes back the rest: every point the sale earned, no more.
    assert (last.refunded_total_fen, last.points_taken_back) == (25_150, 2)
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["points_balance"]) == (50_000, 0)
    listed = _stub(server).ListSaleRefunds(refund_pb2.ListSaleRefundsRequest(hold_id=hold.hold_id))
    assert [x.amount_fen for x in listed.refunds] == [10_000, 15_000, 150]
    assert_ledger_ok(server.database_url)


def test_a_shared_sub_account_sale_is_refunded_to_the_parent(server: RunningServer,
                                                             db: Conn) -> None:
    fleet = control_builders.open_fleet(server, 80_000, [SHARED])
    truck = fleet.subs[0]
    hold = control_builders.sale(server, truck, 20_000).hold
    assert account_row(db, fleet.parent_id)["balance_fen"] == 60_000
    answer = _refund(server, hold.hold_id, 5_000)
    assert answer.refund.account_id == fleet.parent_id
    assert answer.balance_fen == 65_000
    assert account_row(db, fleet.parent_id)["balance_fen"] == 65_000
    # The points were the truck's (its own account spends): taken back there.
    assert answer.refund.points_taken_back == 50
    assert account_row(db, truck.account_id)["points_balance"] == 150
    assert _entries(db, hold.hold_id) == [(1, "FUEL_SALES", fleet.parent_id, 5_000),
                                          (2, truck.account_id, "POINTS_ISSUED", 50)]
    assert_ledger_ok(server.database_url)


def test_spent_points_are_taken_from_what_is_left_and_the_rest_recorded(
        server: RunningServer, db: Conn) -> None:
    card, old = _sale(server, 100_000, 20_000)          # 200 points, an older lot
    hold = control_builders.sale(server, card, 30_000).hold   # 300 points, the sale's lot
    points = points_pb2_grpc.PointsServiceStub(server.channel)
    redeemed = points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid("redeem"), account_id=card.account_id, points=420,
        description="car wash"))
    assert redeemed.decision == common_pb2.DECISION_APPROVED
    # Oldest first: the older lot's 200, then 220 of the sale's; 80 left.
    assert account_row(db, card.account_id)["points_balance"] == 80
    r = _refund(server, hold.hold_id, 30_000).refund
    # 300 due back; the 80 there are taken, the balance never goes negative.
    assert (r.points_taken_back, r.points_shortfall) == (80, 220)
    assert account_row(db, card.account_id)["points_balance"] == 0
    assert old.hold_id != hold.hold_id
    assert_ledger_ok(server.database_url)


def test_points_come_back_from_the_sale_lot_first(server: RunningServer, db: Conn) -> None:
    card, old = _sale(server, 100_000, 20_000)           # lot of 200
    hold = control_builders.sale(server, card, 30_000).hold  # lot of 300
    _refund(server, hold.hold_id, 10_000)                # 100 back
    lots = db.execute(
        "SELECT l.points, l.remaining, h.uid::text FROM fc.points_lots l"
        " JOIN fc.holds h ON h.id = l.hold_id ORDER BY l.id").fetchall()
    assert lots == [(200, 200, old.hold_id), (300, 200, hold.hold_id)]
    assert_ledger_ok(server.database_url)


def _tier(db: Conn, account_id: str) -> int:
    return int(scalar(db, "SELECT tier FROM fc.accounts WHERE uid = %s", (account_id,)))


def test_a_refund_lowers_the_tier_it_had_raised(server: RunningServer, db: Conn) -> None:
    card, hold = _sale(server, 700_000, 600_000)   # 5 000 yuan a year: silver
    assert _tier(db, card.account_id) == 2
    # Below the step-up threshold in steps: 4 x 50 000.
    for _ in range(4):
        _refund(server, hold.hold_id, STEP_UP_ABOVE_FEN)
    assert _month_spend(db, card.account_id) == 400_000
    assert _tier(db, card.account_id) == 1
    changes = db.execute("SELECT from_tier, to_tier, spend_fen FROM fc.tier_changes t"
                         " JOIN fc.accounts a ON a.id = t.account_id WHERE a.uid = %s"
                         " ORDER BY t.id", (card.account_id,)).fetchall()
    assert changes[-1] == (2, 1, 450_000)
    assert_ledger_ok(server.database_url)


def test_refunds_are_idempotent_on_request_id(server: RunningServer, db: Conn) -> None:
    _, hold = _sale(server, 50_000, 30_000)
    first = _refund(server, hold.hold_id, 10_000, request_id="refund-1")
    before = snapshot(db)
    again = _refund(server, hold.hold_id, 10_000, request_id="refund-1")
    assert again == first
    assert snapshot(db) == before
    expect(lambda: _refund(server, hold.hold_id, 9_000, request_id="refund-1"), FP,
           "REQUEST_ID_REUSED")
    assert snapshot(db) == before
    assert_ledger_ok(server.database_url)


def test_only_a_confirmed_sale_is_refunded(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 10_000).hold
    expect(lambda: _refund(server, hold.hold_id, 1_000), FP, "HOLD_NOT_CONFIRMED")
    builders.cancel(server, hold.hold_id)
    expect(lambda: _refund(server, hold.hold_id, 1_000), FP, "HOLD_NOT_CONFIRMED")
    expect(lambda: _refund(server, "7f1d9c8e-0000-4000-8000-000000000001", 1_000),
           grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND")
    expect(lambda: _refund(server, hold.hold_id, 1_000, reason=""),
           grpc.StatusCode.INVALID_ARGUMENT, None, "reason")
    assert count_refunds(db) == 0
    assert scalar(db, "SELECT count(*) FROM fc.journal WHERE kind = 10") == 0
    assert_ledger_ok(server.database_url)


def count_refunds(db: Conn) -> int:
    return int(scalar(db, "SELECT count(*) FROM fc.sale_refunds"))


def test_racing_refunds_never_exceed_the_sale(server: RunningServer, db: Conn) -> None:
    card, hold = _sale(server, 50_000, 30_000)

    def attempt(_: int) -> str:
        try:
            _refund(server, hold.hold_id, 7_000)
            return "ok"
        except grpc.RpcError as e:
            assert e.code() == FP, e
            return "refused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    # 4 x 7 000 fit in 30 000; the fifth would not.
    assert sorted(outcomes) == ["ok"] * 4 + ["refused"] * 4
    assert scalar(db, "SELECT sum(amount_fen) FROM fc.sale_refunds") == 28_000
    assert account_row(db, card.account_id)["balance_fen"] == 50_000 - 30_000 + 28_000
    assert_ledger_ok(server.database_url)


# --- step-up ------------------------------------------------------------------


@pytest.fixture
def stepped(database_url: str, tmp_path: Path) -> Iterator[tuple[RunningServer, FakeOtpSender]]:
    settings = make_settings(tmp_path, step_up_sale_refund_above_fen=STEP_UP_ABOVE_FEN)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    sender = FakeOtpSender()
    thread.server.otp_sender = sender
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(f"127.0.0.1:{port}", database_url, clock, settings, thread.server,
                            thread.loop, channel), sender
    finally:
        channel.close()
        thread.stop()


def test_a_large_refund_needs_a_step_up(stepped: tuple[RunningServer, FakeOtpSender],
                                        db: Conn) -> None:
    server, sender = stepped
    card = builders.open_card(server, balance_fen=200_000, phone="13800138000")
    hold = control_builders.sale(server, card, 150_000).hold
    before = snapshot(db)
    expect(lambda: _refund(server, hold.hold_id, STEP_UP_ABOVE_FEN + 1), FP, "STEP_UP_REQUIRED")
    assert snapshot(db) == before
    security = security_pb2_grpc.SecurityServiceStub(server.channel)
    challenge = security.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
        request_id=builders.rid("su"), kind=step_up_pb2.STEP_UP_KIND_SALE_REFUND,
        subject_id=hold.hold_id, amount_fen=100_000))
    assert sender.sent[-1].destination == "13800138000"
    code = sender.code(challenge.challenge_id)
    step_up = step_up_pb2.StepUp(challenge_id=challenge.challenge_id, code=code)
    # A code for another amount does not do.
    expect(lambda: _refund(server, hold.hold_id, 90_000, step_up=step_up),
           grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    done = _refund(server, hold.hold_id, 100_000, step_up=step_up)
    assert done.refund.amount_fen == 100_000
    # At or under the threshold: no code.
    assert _refund(server, hold.hold_id, STEP_UP_ABOVE_FEN).refund.refunded_total_fen == 150_000
    assert_ledger_ok(server.database_url)
