"""Issue 4, family cards (家庭主副卡): a main account whose members' secondary
cards draw on its balance within the caps the main holder sets, the main
holder reading a member's history, and points pooling (积分合并): members
move points still valid to the main account, which redeems the pool.
Everything through gRPC against the real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import grpc
from fuelcard.v1 import account_pb2, common_pb2, points_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.builders import FundedCard
from tests.support.ledger_asserts import Conn, count, expect, scalar

FP = grpc.StatusCode.FAILED_PRECONDITION
PD = grpc.StatusCode.PERMISSION_DENIED
FAMILY = account_pb2.ACCOUNT_TYPE_FAMILY


def _family(server: RunningServer, balance_fen: int = 1_000_000,
            members: tuple[str, ...] = ("妻子", "儿子")) -> cb.Fleet:
    return cb.open_fleet(server, balance_fen, [cb.SHARED] * len(members), account_type=FAMILY,
                         labels=list(members))


def _history(server: RunningServer, account_id: str) -> list[tuple[int, int]]:
    entries = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=account_id)).entries
    return [(e.kind, e.points) for e in entries]


def test_secondary_cards_share_the_main_balance_within_caps_set_by_the_main_holder(
        server: RunningServer) -> None:
    family = _family(server)
    main, (wife, son) = family.parent, family.subs
    for member, label in ((wife, "妻子"), (son, "儿子")):
        got = cb.get_account(server, member.account_id)
        assert (got.type, got.funding_mode, got.parent_account_id, got.label) == (
            FAMILY, cb.SHARED, main.account_id, label)
    cb.set_limits(server, main.account_id, card=son.card_id, txn=30_000, monthly=100_000)

    # Both draw on the main account's money.
    hold = cb.approved(server, son, 30_000)
    assert hold.account_id == main.account_id
    assert cb.balance_of(server, main.account_id) == (1_000_000, 30_000)
    builders.confirm(server, hold.hold_id, 30_000)
    assert cb.declined(server, son, 30_001) == common_pb2.DECLINE_REASON_LIMIT_PER_TRANSACTION
    cb.sale(server, son, 30_000)
    cb.advance_to_local(server, dt.datetime(2026, 11, 28, 10, 0))
    cb.sale(server, son, 30_000)
    assert cb.declined(server, son, 10_001) == common_pb2.DECLINE_REASON_LIMIT_MONTHLY
    cb.sale(server, son, 10_000)
    # The son's caps bind the son's card only: the wife and the main card spend on.
    cb.sale(server, wife, 200_000)
    cb.sale(server, main, 200_000)
    assert cb.balance_of(server, main.account_id) == (1_000_000 - 100_000 - 400_000, 0)
    assert cb.balance_of(server, son.account_id) == (0, 0)
    limits = cb.get_limits(server, card=son.card_id)
    assert (limits.used_this_month_fen, cb.caps(limits.effective_limits)) == (100_000, (30_000, 0, 100_000))

    # A new month in Shanghai: the monthly room is back.
    cb.advance_to_local(server, dt.datetime(2026, 12, 1, 0, 30))
    cb.sale(server, son, 30_000)
    # The son cannot lift his own caps, nor can his mother's member account.
    for actor in (son.account_id, wife.account_id):
        expect(lambda actor=actor: cb.set_limits(  # type: ignore[misc]
            server, actor, card=son.card_id, txn=1_000_000), PD, "NOT_THE_CONTROLLING_ACCOUNT")
    assert cb.declined(server, son, 30_001) == common_pb2.DECLINE_REASON_LIMIT_PER_TRANSACTION
    cb.assert_verified(server)


def _secondary_history(server: RunningServer, main: str, son: FundedCard) -> list[common_pb2.Hold]:
    holds = server.accounts.ListHolds(account_pb2.ListHoldsRequest(account_id=main)).holds
    return [h for h in holds if h.card_id == son.card_id]


def test_main_holder_reads_a_secondary_cards_history(server: RunningServer) -> None:
    family = _family(server)
    main, (wife, son) = family.parent, family.subs
    done = cb.sale(server, son, 25_000)
    open_hold = cb.approved(server, son, 8_000)
    cancelled = cb.approved(server, son, 9_000)
    builders.cancel(server, cancelled.hold_id)
    cb.sale(server, wife, 50_000)

    # The holds live on the main account (its money), each naming the card.
    mine = _secondary_history(server, main.account_id, son)
    assert [(h.hold_id, h.state, h.amount_fen, h.settled_fen) for h in mine] == [
        (cancelled.hold_id, common_pb2.HOLD_STATE_CANCELLED, 9_000, 0),
        (open_hold.hold_id, common_pb2.HOLD_STATE_AUTHORIZED, 8_000, 0),
        (done.hold.hold_id, common_pb2.HOLD_STATE_CONFIRMED, 25_000, 25_000),
    ]
    # The settled sale is on the main account's statement, pointing at the hold.
    txns = server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=main.account_id)).transactions
    purchases = [(t.amount_fen, t.hold_id) for t in txns
                 if t.kind == account_pb2.TRANSACTION_KIND_PURCHASE]
    assert (-25_000, done.hold.hold_id) in purchases
    # The member's own figures: its usage and its points.
    assert cb.get_limits(server, account=son.account_id).used_today_fen == 25_000 + 8_000
    assert _history(server, son.account_id) == [(points_pb2.POINTS_ENTRY_KIND_EARN, 250)]
    cb.assert_verified(server)


def test_list_holds_on_a_shared_member_shows_its_holds(server: RunningServer) -> None:
    family = _family(server)
    son = family.subs[1]
    done = cb.sale(server, son, 25_000)
    holds = server.accounts.ListHolds(account_pb2.ListHoldsRequest(account_id=son.account_id)).holds
    assert [h.hold_id for h in holds] == [done.hold.hold_id]


def test_points_pool_on_the_main_account_which_redeems_them(server: RunningServer,
                                                            db: Conn) -> None:
    family = _family(server)
    main, (wife, son) = family.parent, family.subs
    other = _family(server, 0, ("丈夫",))
    cb.sale(server, son, 30_000)                         # 300 points to the son
    server.advance(dt.timedelta(days=40))
    cb.sale(server, son, 20_000)                         # 200 more, a later lot
    cb.sale(server, wife, 45_000)                        # 450 to the wife
    cb.sale(server, main, 10_000)                        # 100 to the main account
    assert (cb.points_of(server, son.account_id), cb.points_of(server, wife.account_id),
            cb.points_of(server, main.account_id)) == (500, 450, 100)

    request_id = builders.rid("pool")
    moved = cb.transfer_points(server, son.account_id, main.account_id, 400, request_id)
    assert (moved.decision, moved.from_points_balance, moved.to_points_balance) == (
        cb.APPROVED, 100, 500)
    # Resent: the same answer, moved once.
    assert cb.transfer_points(server, son.account_id, main.account_id, 400, request_id) == moved
    assert cb.points_of(server, main.account_id) == 500
    assert _history(server, son.account_id)[0] == (points_pb2.POINTS_ENTRY_KIND_TRANSFER, -400)
    assert _history(server, main.account_id)[0] == (points_pb2.POINTS_ENTRY_KIND_TRANSFER, 400)
    # The pooled points keep their expiry: the son's oldest lot went first.
    son_lots = db.execute(
        "SELECT l.points, l.remaining, l.expires_at FROM fc.points_lots l JOIN fc.accounts a"
        " ON a.id = l.account_id WHERE a.uid = %s ORDER BY l.id", (son.account_id,)).fetchall()
    assert [(p, r) for p, r, _ in son_lots] == [(300, 0), (200, 100)]
    pooled = db.execute(
        "SELECT l.points, l.expires_at FROM fc.points_lots l JOIN fc.accounts a"
        " ON a.id = l.account_id WHERE a.uid = %s AND l.points IN (300, 100) ORDER BY l.id",
        (main.account_id,)).fetchall()
    assert pooled[-2:] == [(300, son_lots[0][2]), (100, son_lots[1][2])]

    # More than the member holds: declined, nothing moves.
    short = cb.transfer_points(server, wife.account_id, main.account_id, 451)
    assert (short.decision, short.decline_reason) == (
        cb.DECLINED, common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS)
    assert (short.from_points_balance, short.to_points_balance) == (450, 500)
    # Only to the member's own parent: not a sibling, not another family, not downwards.
    journal = count(db, "journal")
    for source, target in ((wife.account_id, son.account_id),
                           (wife.account_id, other.parent_id),
                           (main.account_id, wife.account_id),
                           (wife.account_id, wife.account_id)):
        expect(lambda s=source, t=target: cb.transfer_points(server, s, t, 10),  # type: ignore[misc]
               FP, "NOT_THE_PARENT_ACCOUNT")
    assert count(db, "journal") == journal
    assert (cb.points_of(server, wife.account_id), cb.points_of(server, main.account_id)) == (450, 500)
    cb.transfer_points(server, wife.account_id, main.account_id, 450)

    # The main account redeems the pool, more than it ever earned itself.
    redeemed = server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid("redeem"), account_id=main.account_id, points=900,
        description="积分商城 订单 88001"))
    assert (redeemed.decision, redeemed.points_balance) == (cb.APPROVED, 50)
    assert redeemed.entry.kind == points_pb2.POINTS_ENTRY_KIND_REDEEM
    assert scalar(db, "SELECT sum(remaining) FROM fc.points_lots l JOIN fc.accounts a"
                      " ON a.id = l.account_id WHERE a.uid = %s", (main.account_id,)) == 50
    cb.assert_verified(server)


def test_points_past_their_expiry_are_not_pooled(server: RunningServer, db: Conn) -> None:
    family = _family(server)
    main, son = family.parent, family.subs[1]
    cb.sale(server, son, 30_000)                         # 300 points, valid 24 months
    cb.sale(server, main, 10_000)                        # 100 on the main account
    server.advance(dt.timedelta(days=400))
    cb.sale(server, son, 20_000)                         # 200 more, a later lot
    server.advance(dt.timedelta(days=400))               # the first lots expired; no sweep yet

    refused = cb.transfer_points(server, son.account_id, main.account_id, 300)
    assert (refused.decision, refused.decline_reason) == (
        cb.DECLINED, common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS)
    # Both balances in the answer count no expired points: both lapsed, journaled.
    assert (refused.from_points_balance, refused.to_points_balance) == (200, 0)
    assert _history(server, son.account_id)[0] == (points_pb2.POINTS_ENTRY_KIND_EXPIRE, -300)
    assert _history(server, main.account_id)[0] == (points_pb2.POINTS_ENTRY_KIND_EXPIRE, -100)

    moved = cb.transfer_points(server, son.account_id, main.account_id, 200)
    assert (moved.decision, moved.from_points_balance, moved.to_points_balance) == (
        cb.APPROVED, 0, 200)
    # Only points still valid reached the main account.
    assert scalar(db, "SELECT count(*) FROM fc.points_lots l JOIN fc.accounts a"
                      " ON a.id = l.account_id WHERE a.uid = %s AND l.remaining > 0"
                      " AND l.expires_at <= %s", (main.account_id, server.clock.now())) == 0
    assert count(db, "journal", "kind = 7") == 2
    assert server.run(server.server.expire_points_once) == 0
    cb.assert_verified(server)
