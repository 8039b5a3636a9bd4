"""Issue 4, tiers and points: tiers 普通 / 银牌 / 金牌 / 钻石 from the rolling
12-month confirmed spend (configurable thresholds and multipliers in
fc.tier_rules), the multiplier applied when points are earned, tier changes
recorded and falling as old months leave the window; points lots that expire
after fc.config points_validity_months, an idempotent expiry job that
journals what lapsed, a redemption that lapses expired lots first whether
the job has run or not, and redemption from the oldest lots first; the jobs
running at once without deadlocking. Through gRPC against the real
PostgreSQL; the jobs run on the server's own loop."""

from __future__ import annotations

import datetime as dt

from fuelcard.v1 import account_pb2, common_pb2, points_pb2

from tests.plugins.server import RunningServer
from tests.support import builders, job_races
from tests.support import control_builders as cb
from tests.support.builders import FundedCard
from tests.support.ledger_asserts import Conn, count

REGULAR, SILVER, GOLD, DIAMOND = (account_pb2.TIER_REGULAR, account_pb2.TIER_SILVER,
                                  account_pb2.TIER_GOLD, account_pb2.TIER_DIAMOND)


def _tier(server: RunningServer, card: FundedCard) -> int:
    return cb.get_account(server, card.account_id).tier


def _earned(server: RunningServer, card: FundedCard, amount_fen: int) -> int:
    done = cb.sale(server, card, amount_fen)
    assert done.hold.points_earned == done.points_earned
    return done.points_earned


def _tier_changes(db: Conn, card: FundedCard) -> list[tuple[int, int, int]]:
    rows = db.execute(
        "SELECT t.from_tier, t.to_tier, t.spend_fen FROM fc.tier_changes t"
        " JOIN fc.accounts a ON a.id = t.account_id WHERE a.uid = %s ORDER BY t.id",
        (card.account_id,)).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _lots(db: Conn, card: FundedCard) -> list[tuple[int, int, dt.datetime]]:
    rows = db.execute(
        "SELECT l.points, l.remaining, l.expires_at FROM fc.points_lots l"
        " JOIN fc.accounts a ON a.id = l.account_id WHERE a.uid = %s ORDER BY l.id",
        (card.account_id,)).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def _expire_points(server: RunningServer) -> int:
    lapsed: int = server.run(server.server.expire_points_once)
    return lapsed


def _evaluate_tiers(server: RunningServer) -> int:
    changed: int = server.run(server.server.evaluate_tiers_once)
    return changed


def _rich_card(server: RunningServer, fen: int) -> FundedCard:
    card = builders.open_card(server)
    while fen > 0:
        builders.recharge(server, card.account_id, min(fen, 5_000_000))
        fen -= 5_000_000
    return card


def test_multiplier_applies_when_points_are_earned_and_changes_are_recorded(
        server: RunningServer, db: Conn) -> None:
    card = _rich_card(server, 6_000_000)
    assert _tier(server, card) == REGULAR
    assert _earned(server, card, 499_900) == 4_999               # x1.0
    assert _tier(server, card) == REGULAR
    # This sale takes the 12-month spend to 5 000 yuan: earned at x1.0, then silver.
    assert _earned(server, card, 100) == 1
    assert _tier(server, card) == SILVER
    assert _earned(server, card, 10_000) == 120                   # 100 yuan x1.2
    assert _earned(server, card, 1_000_000) == 12_000
    assert _earned(server, card, 490_000) == 5_880                # now 20 000 yuan: gold
    assert _tier(server, card) == GOLD
    assert _earned(server, card, 10_000) == 150                   # x1.5
    for _ in range(3):
        _earned(server, card, 996_667)
    assert _tier(server, card) == DIAMOND                         # 50 000.01 yuan
    assert _earned(server, card, 10_000) == 200                   # x2.0
    # Part-yuan amounts earn on whole yuan only.
    assert _earned(server, card, 10_099) == 200

    assert _tier_changes(db, card) == [
        (REGULAR, SILVER, 500_000), (SILVER, GOLD, 2_000_000),
        (GOLD, DIAMOND, 2_010_000 + 3 * 996_667)]
    created = db.execute("SELECT DISTINCT created_at FROM fc.tier_changes").fetchall()
    assert created == [(server.clock.now(),)]
    # A confirm for less than the hold counts what was sold.
    small = builders.open_card(server, balance_fen=600_000)
    hold = cb.approved(server, small, 600_000)
    builders.confirm(server, hold.hold_id, 499_999)
    assert _tier(server, small) == REGULAR
    assert _tier_changes(db, small) == []
    cb.assert_verified(server)


def test_thresholds_and_multipliers_are_configurable(server: RunningServer, db: Conn) -> None:
    db.execute("UPDATE fc.tier_rules SET min_spend_fen = 20_000, multiplier_permille = 3000"
               " WHERE tier = 2")
    card = _rich_card(server, 100_000)
    assert _earned(server, card, 19_900) == 199
    assert _tier(server, card) == REGULAR
    assert _earned(server, card, 100) == 1
    assert _tier(server, card) == SILVER
    assert _earned(server, card, 10_000) == 300
    assert _tier_changes(db, card) == [(REGULAR, SILVER, 20_000)]
    cb.assert_verified(server)


def test_tier_falls_as_old_months_leave_the_rolling_window(server: RunningServer,
                                                          db: Conn) -> None:
    card = _rich_card(server, 3_000_000)
    bystander = _rich_card(server, 100_000)
    # November 2026: 15 000 yuan; January 2027: 6 000 more. Gold.
    _earned(server, card, 1_000_000)
    _earned(server, card, 500_000)
    _earned(server, bystander, 10_000)
    cb.advance_to_local(server, dt.datetime(2027, 1, 10, 12, 0))
    _earned(server, card, 600_000)
    assert _tier(server, card) == GOLD
    assert _evaluate_tiers(server) == 0

    # 31 October 2027: November 2026 is still inside the twelve months.
    cb.advance_to_local(server, dt.datetime(2027, 10, 31, 23, 59))
    assert _evaluate_tiers(server) == 0
    assert _tier(server, card) == GOLD
    # 1 November 2027 in Shanghai: it leaves; 6 000 yuan remain. Silver.
    cb.advance_to_local(server, dt.datetime(2027, 11, 1, 0, 1))
    assert _evaluate_tiers(server) == 1
    assert _tier(server, card) == SILVER
    assert _evaluate_tiers(server) == 0                            # nothing more to change
    assert _earned(server, card, 10_000) == 120                    # the silver multiplier
    # Thirteen months after January 2027 only this month's 100 yuan is left.
    cb.advance_to_local(server, dt.datetime(2028, 2, 1, 9, 0))
    assert _evaluate_tiers(server) == 1
    assert _tier(server, card) == REGULAR
    assert _tier_changes(db, card) == [
        (REGULAR, SILVER, 1_000_000), (SILVER, GOLD, 2_100_000),
        (GOLD, SILVER, 600_000), (SILVER, REGULAR, 10_000)]
    assert _tier(server, bystander) == REGULAR
    assert _tier_changes(db, bystander) == []
    assert _earned(server, card, 10_000) == 100
    cb.assert_verified(server)


def test_points_lots_expire_and_the_job_is_idempotent(server: RunningServer, db: Conn) -> None:
    t0 = server.clock.now()
    card = _rich_card(server, 100_000)
    assert _earned(server, card, 10_000) == 100
    cb.advance_to_local(server, dt.datetime(2027, 5, 25, 16, 0))
    assert _earned(server, card, 20_000) == 200
    first_expiry = dt.datetime(2028, 11, 25, 8, 0, tzinfo=dt.UTC)
    assert [(p, r, e) for p, r, e in _lots(db, card)] == [
        (100, 100, first_expiry), (200, 200, dt.datetime(2029, 5, 25, 8, 0, tzinfo=dt.UTC))]
    assert first_expiry == t0.replace(year=t0.year + 2)             # 24 months

    # Just before the 24 months are up nothing lapses.
    server.advance(first_expiry - server.clock.now() - dt.timedelta(seconds=1))
    assert _expire_points(server) == 0
    assert cb.points_of(server, card.account_id) == 300
    server.advance(dt.timedelta(seconds=1))
    assert _expire_points(server) == 1
    assert cb.points_of(server, card.account_id) == 200
    expired = db.execute(
        "SELECT j.amount, j.asset, j.created_at, d.uid::text, c.system_code FROM fc.journal j"
        " JOIN fc.accounts d ON d.id = j.debit_account_id"
        " JOIN fc.accounts c ON c.id = j.credit_account_id WHERE j.kind = 7").fetchall()
    assert expired == [(100, 2, first_expiry, card.account_id, "POINTS_EXPIRED")]
    history = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=card.account_id)).entries
    assert (history[0].kind, history[0].points) == (points_pb2.POINTS_ENTRY_KIND_EXPIRE, -100)
    assert history[0].create_time.ToDatetime(dt.UTC) == first_expiry

    # Again, and again later: nothing more lapses, nothing more is journaled.
    assert _expire_points(server) == 0
    server.advance(dt.timedelta(days=30))
    assert _expire_points(server) == 0
    assert count(db, "journal", "kind = 7") == 1
    assert cb.points_of(server, card.account_id) == 200
    assert [r for _, r, _ in _lots(db, card)] == [0, 200]

    # The second lot lapses on its own date.
    cb.advance_to_local(server, dt.datetime(2029, 5, 25, 16, 0))
    assert _expire_points(server) == 1
    assert cb.points_of(server, card.account_id) == 0
    assert count(db, "journal", "kind = 7") == 2
    cb.assert_verified(server)


def test_redemption_takes_the_oldest_lots_first(server: RunningServer, db: Conn) -> None:
    card = _rich_card(server, 100_000)
    for month, fen in ((0, 10_000), (1, 20_000), (2, 30_000)):
        if month:
            server.advance(dt.timedelta(days=31))
        _earned(server, card, fen)
    assert [(p, r) for p, r, _ in _lots(db, card)] == [(100, 100), (200, 200), (300, 300)]

    def redeem(points: int) -> points_pb2.RedeemPointsResponse:
        response: points_pb2.RedeemPointsResponse = server.points.RedeemPoints(
            points_pb2.RedeemPointsRequest(request_id=builders.rid("redeem"),
                                           account_id=card.account_id, points=points))
        return response

    assert redeem(150).points_balance == 450
    assert [(p, r) for p, r, _ in _lots(db, card)] == [(100, 0), (200, 150), (300, 300)]
    assert redeem(200).points_balance == 250
    assert [(p, r) for p, r, _ in _lots(db, card)] == [(100, 0), (200, 0), (300, 250)]
    assert redeem(251).decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS
    assert [(p, r) for p, r, _ in _lots(db, card)] == [(100, 0), (200, 0), (300, 250)]

    # Spent lots have nothing left to lapse; the last lapses with what remains.
    third_expiry = _lots(db, card)[2][2]
    server.advance(third_expiry - server.clock.now() - dt.timedelta(minutes=1))
    assert _expire_points(server) == 0
    assert count(db, "journal", "kind = 7") == 0
    server.advance(dt.timedelta(minutes=1))
    assert _expire_points(server) == 1
    assert db.execute("SELECT amount FROM fc.journal WHERE kind = 7").fetchall() == [(250,)]
    assert cb.points_of(server, card.account_id) == 0

    # The validity period is configuration.
    db.execute("UPDATE fc.config SET value = '3' WHERE key = 'points_validity_months'")
    _earned(server, card, 10_000)
    now = server.clock.now()
    month = now.month + 3
    assert _lots(db, card)[-1][2] == now.replace(year=now.year + (month - 1) // 12,
                                                 month=(month - 1) % 12 + 1)
    cb.assert_verified(server)


def test_expired_points_are_lapsed_before_a_redemption_decides(server: RunningServer,
                                                               db: Conn) -> None:
    card = _rich_card(server, 100_000)
    assert _earned(server, card, 10_000) == 100
    server.advance(dt.timedelta(days=180))
    assert _earned(server, card, 20_000) == 200
    # The first lot is past its 24 months; the points sweep has not run.
    first_expiry = _lots(db, card)[0][2]
    server.advance(first_expiry - server.clock.now())
    request = points_pb2.RedeemPointsRequest(request_id=builders.rid("redeem"),
                                             account_id=card.account_id, points=250,
                                             description="积分商城 订单 88002")
    refused = server.points.RedeemPoints(request)
    assert (refused.decision, refused.decline_reason, refused.points_balance) == (
        common_pb2.DECISION_DECLINED, common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS, 200)
    # The lapse is booked as the sweep books it, and kept with the decline.
    assert db.execute("SELECT amount, created_at FROM fc.journal WHERE kind = 7").fetchall() == [
        (100, first_expiry)]
    assert [r for _, r, _ in _lots(db, card)] == [0, 200]
    assert cb.points_of(server, card.account_id) == 200
    history = server.points.ListPointsHistory(points_pb2.ListPointsHistoryRequest(
        account_id=card.account_id)).entries
    assert (history[0].kind, history[0].points) == (points_pb2.POINTS_ENTRY_KIND_EXPIRE, -100)
    # Resent: the same answer; nothing lapses twice.
    assert server.points.RedeemPoints(request) == refused
    assert count(db, "journal", "kind = 7") == 1

    # What is still valid is spent; the sweep finds nothing left to lapse.
    spent = server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid("redeem"), account_id=card.account_id, points=200))
    assert (spent.decision, spent.points_balance) == (common_pb2.DECISION_APPROVED, 0)
    assert _expire_points(server) == 0
    assert count(db, "journal", "kind = 7") == 1
    cb.assert_verified(server)


def test_points_expiry_and_tier_evaluation_at_once_do_not_deadlock(server: RunningServer,
                                                                   db: Conn) -> None:
    # Points on A and B that expired; P2 and A above the lowest tier, so the
    # tier job visits P2 (its lock) and then A (P1 first): against a points
    # sweep that holds P1 and waits for A, then wants P2.
    tree = job_races.crossed_families(server, db, cb.SHARED)
    _earned(server, tree.card_a, 10_000)
    _earned(server, tree.card_b, 10_000)
    server.advance(dt.timedelta(days=800))
    db.execute("UPDATE fc.accounts SET tier = 2 WHERE id IN (%s, %s)", (tree.p2, tree.a))
    now = server.clock.now()
    results = job_races.jobs_behind_account_lock(
        server.database_url, tree.a,
        ("SELECT fc.expire_points(p_now => %(now)s, p_limit => 100)", {"now": now}),
        ("SELECT fc.evaluate_tiers(p_now => %(now)s, p_after_id => 0, p_limit => 100) -> 'changed'",
         {"now": now}))
    assert results == [2, 2]
    assert (cb.points_of(server, tree.card_a.account_id),
            cb.points_of(server, tree.card_b.account_id)) == (0, 0)
    assert (_tier(server, tree.card_a), _tier(server, tree.card_b)) == (REGULAR, REGULAR)
    cb.assert_verified(server)


def test_the_tier_job_runs_in_batches_each_its_own_transaction(server: RunningServer,
                                                                db: Conn) -> None:
    # One transaction for every tiered account held one lock per account:
    # past the lock table's size the job failed every hour. Five accounts
    # marked silver with no spend fall in three batches of two.
    cards = [_rich_card(server, 10_000) for _ in range(5)]
    ids = [int(r[0]) for r in db.execute(
        "SELECT a.id FROM fc.accounts a JOIN fc.cards c ON c.account_id = a.id"
        " WHERE c.uid = ANY(%s::uuid[]) ORDER BY a.id", ([c.card_id for c in cards],))]
    db.execute("UPDATE fc.accounts SET tier = %s WHERE id = ANY(%s)", (SILVER, ids))
    batches = db.execute("SELECT fc.evaluate_tiers(p_now => %(now)s, p_after_id => 0, p_limit => 2)",
                         {"now": server.clock.now()}).fetchone()
    assert batches == ({"changed": 2, "last_id": ids[1]},)  # the first batch alone
    assert server.run(lambda: server.server.evaluate_tiers_once(batch=2)) == 3  # the rest
    assert [_tier(server, c) for c in cards] == [REGULAR] * 5
    assert db.execute("SELECT fc.evaluate_tiers(p_now => %(now)s, p_after_id => 0, p_limit => 2)",
                      {"now": server.clock.now()}).fetchone() == ({"changed": 0, "last_id": None},)
    cb.assert_verified(server)
