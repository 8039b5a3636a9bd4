"""Semantics 6 and 7: Recharge credits through the journal and refuses bad
amounts; points are earned on confirm, redeemable but never below zero,
idempotent, and listed in a history."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
from fuelcard.v1 import account_pb2, common_pb2, funding_pb2, points_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, expect, snapshot

IA = grpc.StatusCode.INVALID_ARGUMENT
CHANNEL_CODES = {
    funding_pb2.CHANNEL_BANK_CARD: "CHANNEL_CLEARING_BANK_CARD",
    funding_pb2.CHANNEL_WECHAT_PAY: "CHANNEL_CLEARING_WECHAT_PAY",
    funding_pb2.CHANNEL_ALIPAY: "CHANNEL_CLEARING_ALIPAY",
    funding_pb2.CHANNEL_ECNY: "CHANNEL_CLEARING_ECNY",
    funding_pb2.CHANNEL_COUNTER: "CHANNEL_CLEARING_COUNTER",
}


def _recharge_request(account_id: str, amount_fen: int,
                      channel: funding_pb2.Channel.ValueType = funding_pb2.CHANNEL_WECHAT_PAY
                      ) -> funding_pb2.RechargeRequest:
    return funding_pb2.RechargeRequest(request_id=builders.rid("recharge"), account_id=account_id,
                                       channel=channel, channel_txn_id=f"t-{uuid.uuid4().hex}",
                                       amount_fen=amount_fen)


@pytest.mark.parametrize("channel", sorted(CHANNEL_CODES))
def test_recharge_credits_the_account_through_the_journal(
        server: RunningServer, db: Conn, channel: funding_pb2.Channel.ValueType) -> None:
    card = builders.open_card(server)
    request = _recharge_request(card.account_id, 12_345, channel)
    done = server.funding.Recharge(request)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.decline_reason == common_pb2.DECLINE_REASON_UNSPECIFIED
    assert done.balance_fen == 12_345
    r = done.recharge
    assert (r.account_id, r.channel, r.channel_txn_id, r.amount_fen) == (
        card.account_id, channel, request.channel_txn_id, 12_345)
    assert r.create_time.ToDatetime(dt.UTC) == server.clock.now()

    entries = db.execute(
        "SELECT j.kind, j.asset, d.system_code, c.uid::text, j.amount, rc.uid::text"
        " FROM fc.journal j JOIN fc.accounts d ON d.id = j.debit_account_id"
        " JOIN fc.accounts c ON c.id = j.credit_account_id"
        " JOIN fc.recharges rc ON rc.id = j.recharge_id").fetchall()
    assert entries == [(1, 1, CHANNEL_CODES[channel], card.account_id, 12_345, r.recharge_id)]
    assert account_row(db, card.account_id)["balance_fen"] == 12_345
    assert builders.balance(server, card).balance.available_fen == 12_345
    txns = server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=card.account_id)).transactions
    assert [(t.kind, t.amount_fen, t.recharge_id) for t in txns] == [
        (account_pb2.TRANSACTION_KIND_RECHARGE, 12_345, r.recharge_id)]
    got = server.funding.GetRecharge(funding_pb2.GetRechargeRequest(
        channel=channel, channel_txn_id=request.channel_txn_id))
    assert got.recharge == r
    assert_ledger_ok(server.database_url)


def test_recharges_add_up(server: RunningServer) -> None:
    card = builders.open_card(server)
    for amount in (1, 99, 5_000_000):
        builders.recharge(server, card.account_id, amount)
    assert builders.balance(server, card).balance.balance_fen == 5_000_100
    assert_ledger_ok(server.database_url)


@pytest.mark.parametrize("amount", [0, -1, -10_000, -(2**63)])
def test_recharge_refuses_non_positive_amounts(server: RunningServer, db: Conn, amount: int) -> None:
    card = builders.open_card(server)
    before = snapshot(db)
    e = expect(lambda: server.funding.Recharge(_recharge_request(card.account_id, amount)), IA,
               "AMOUNT_NOT_POSITIVE", field="amount_fen")
    assert e.fields == ["amount_fen"]
    assert snapshot(db) == before


@pytest.mark.parametrize("over", [1, 2**63 - 1 - 5_000_000])
def test_recharge_refuses_amounts_over_the_per_recharge_limit(server: RunningServer, db: Conn,
                                                              over: int) -> None:
    card = builders.open_card(server)
    limit = server.settings.max_recharge_fen
    assert limit == 5_000_000
    before = snapshot(db)
    expect(lambda: server.funding.Recharge(_recharge_request(card.account_id, limit + over)), IA,
           "AMOUNT_TOO_LARGE", field="amount_fen")
    assert snapshot(db) == before
    # The limit itself is fine.
    assert server.funding.Recharge(_recharge_request(card.account_id, limit)).balance_fen == limit


def test_recharge_above_the_account_maximum_is_declined(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    db.execute("UPDATE fc.accounts SET max_balance_fen = 50_000 WHERE uid = %s", (card.account_id,))
    request = _recharge_request(card.account_id, 40_001)
    declined = server.funding.Recharge(request)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_BALANCE_LIMIT_EXCEEDED
    assert not declined.HasField("recharge")
    assert declined.balance_fen == 10_000
    assert count(db, "recharges") == 1  # only the opening one
    assert account_row(db, card.account_id)["balance_fen"] == 10_000
    # The retry answers the same; up to the maximum exactly is fine.
    assert server.funding.Recharge(request) == declined
    assert server.funding.Recharge(_recharge_request(card.account_id, 40_000)).balance_fen == 50_000
    assert server.funding.Recharge(_recharge_request(card.account_id, 1)).decline_reason == \
        common_pb2.DECLINE_REASON_BALANCE_LIMIT_EXCEEDED
    assert_ledger_ok(server.database_url)


def test_recharge_of_an_unknown_account_is_not_found(server: RunningServer, db: Conn) -> None:
    before = snapshot(db)
    expect(lambda: server.funding.Recharge(_recharge_request(str(uuid.uuid4()), 100)),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert snapshot(db) == before


def test_recharge_of_a_frozen_account_still_credits(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    db.execute("UPDATE fc.accounts SET status = 2 WHERE uid = %s", (card.account_id,))
    assert server.funding.Recharge(_recharge_request(card.account_id, 700)).decision == \
        common_pb2.DECISION_APPROVED
    assert account_row(db, card.account_id)["balance_fen"] == 700


# --------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------

def _sale(server: RunningServer, card: builders.FundedCard, fen: int) -> str:
    hold = builders.authorize(server, card, fen).hold
    done = builders.confirm(server, hold.hold_id, fen)
    assert done.decision == common_pb2.DECISION_APPROVED
    return hold.hold_id


def _redeem(server: RunningServer, account_id: str, points: int, description: str = "",
            request_id: str | None = None) -> points_pb2.RedeemPointsResponse:
    response: points_pb2.RedeemPointsResponse = server.points.RedeemPoints(
        points_pb2.RedeemPointsRequest(request_id=request_id or builders.rid("redeem"),
                                       account_id=account_id, points=points,
                                       description=description))
    return response


def _points(server: RunningServer, account_id: str) -> int:
    got: int = server.points.GetPointsBalance(
        points_pb2.GetPointsBalanceRequest(account_id=account_id)).points_balance
    return got


def test_points_are_earned_per_whole_yuan(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    for fen in (199, 100, 99, 12_345):
        _sale(server, card, fen)
    assert _points(server, card.account_id) == 1 + 1 + 0 + 123
    assert builders.balance(server, card).points_balance == 125
    account = server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id))
    assert account.account.points_balance == 125
    assert_ledger_ok(server.database_url)


def test_redeem_spends_points_through_the_journal(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    _sale(server, card, 50_000)
    done = _redeem(server, card.account_id, 120, "积分商城订单 42")
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.points_balance == 380
    assert done.entry.kind == points_pb2.POINTS_ENTRY_KIND_REDEEM
    assert done.entry.points == -120
    assert done.entry.description == "积分商城订单 42"
    assert done.entry.create_time.ToDatetime(dt.UTC) == server.clock.now()
    rows = db.execute(
        "SELECT j.kind, j.asset, d.uid::text, c.system_code, j.amount FROM fc.journal j"
        " JOIN fc.accounts d ON d.id = j.debit_account_id"
        " JOIN fc.accounts c ON c.id = j.credit_account_id WHERE j.kind = 4").fetchall()
    assert rows == [(4, 2, card.account_id, "POINTS_REDEEMED", 120)]
    assert _points(server, card.account_id) == 380
    # Money is untouched by points.
    assert builders.balance(server, card).balance.balance_fen == 50_000
    assert_ledger_ok(server.database_url)


def test_points_never_go_below_zero(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    _sale(server, card, 10_050)  # 100 points
    request_id = builders.rid("redeem")
    declined = _redeem(server, card.account_id, 101, request_id=request_id)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS
    assert declined.points_balance == 100
    assert not declined.HasField("entry")
    assert count(db, "journal", "kind = 4") == 0
    # Exactly all of them is fine, then nothing is left to spend.
    assert _redeem(server, card.account_id, 100).points_balance == 0
    assert _redeem(server, card.account_id, 1).decline_reason == \
        common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS
    assert account_row(db, card.account_id)["points_balance"] == 0
    # A replay of the first decline answers as it did then.
    assert _redeem(server, card.account_id, 101, request_id=request_id) == declined
    assert_ledger_ok(server.database_url)


def test_account_without_points_cannot_redeem(server: RunningServer) -> None:
    card = builders.open_card(server)
    assert _redeem(server, card.account_id, 1).decline_reason == \
        common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS


def test_frozen_account_cannot_redeem(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    _sale(server, card, 10_000)
    db.execute("UPDATE fc.accounts SET status = 2 WHERE uid = %s", (card.account_id,))
    declined = _redeem(server, card.account_id, 10)
    assert declined.decline_reason == common_pb2.DECLINE_REASON_ACCOUNT_FROZEN
    assert account_row(db, card.account_id)["points_balance"] == 100


def test_redeem_is_idempotent(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    _sale(server, card, 10_000)
    rid = builders.rid("redeem")
    first = _redeem(server, card.account_id, 30, "order 7", request_id=rid)
    snap = snapshot(db)
    assert _redeem(server, card.account_id, 30, "order 7", request_id=rid) == first
    assert snapshot(db) == snap
    assert _points(server, card.account_id) == 70
    expect(lambda: _redeem(server, card.account_id, 30, "order 8", request_id=rid),
           grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    assert snapshot(db) == snap


def test_points_history_newest_first_with_paging(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    h1 = _sale(server, card, 1_000)           # +10
    server.advance(dt.timedelta(minutes=1))
    r1 = _redeem(server, card.account_id, 3, "r1").entry
    server.advance(dt.timedelta(minutes=1))
    h2 = _sale(server, card, 2_099)           # +20
    _sale(server, card, 50)                   # no points: no entry
    server.advance(dt.timedelta(minutes=1))
    r2 = _redeem(server, card.account_id, 7, "r2").entry

    full = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=card.account_id))
    assert full.next_page_token == ""
    got = [(e.kind, e.points, e.hold_id, e.description) for e in full.entries]
    earn, redeem = points_pb2.POINTS_ENTRY_KIND_EARN, points_pb2.POINTS_ENTRY_KIND_REDEEM
    assert got == [(redeem, -7, "", "r2"), (earn, 20, h2, ""), (redeem, -3, "", "r1"),
                   (earn, 10, h1, "")]
    times = [e.create_time.ToDatetime(dt.UTC) for e in full.entries]
    assert times == sorted(times, reverse=True)
    assert full.entries[0].entry_id == r2.entry_id
    assert full.entries[2] == r1
    assert sum(e.points for e in full.entries) == _points(server, card.account_id) == 20

    # Pages of 3 then 1, the same entries in the same order.
    page1 = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=card.account_id, page_size=3))
    assert len(page1.entries) == 3 and page1.next_page_token
    page2 = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=card.account_id, page_size=3, page_token=page1.next_page_token))
    assert page2.next_page_token == ""
    assert list(page1.entries) + list(page2.entries) == list(full.entries)
    # Page size 1 walks every entry.
    token = ""
    walked: list[points_pb2.PointsEntry] = []
    while True:
        page = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
            account_id=card.account_id, page_size=1, page_token=token))
        walked.extend(page.entries)
        token = page.next_page_token
        if not token:
            break
    assert walked == list(full.entries)


def test_points_history_of_an_account_without_points_is_empty(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=5_000)  # a recharge is money, not points
    page = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=card.account_id))
    assert list(page.entries) == [] and page.next_page_token == ""
