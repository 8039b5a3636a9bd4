"""Issue 14, item 9: defects an adversarial review found, each with the test
that failed on the code before its fix. Through gRPC on real PostgreSQL, the
ledger and `fuelcard verify` checked after each; time moves by the
ManualClock."""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, common_pb2, funding_pb2, transaction_pb2
from fuelcard_server import migrations, verify

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, expect, snapshot
from tests.support.row_lock import wait_queued

MIN = dt.timedelta(minutes=1)
ALLOCATED = account_pb2.FUNDING_MODE_ALLOCATED
WECHAT = funding_pb2.CHANNEL_WECHAT_PAY


def _state(server: RunningServer, hold_id: str) -> int:
    state: int = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold_id)).hold.state
    return state


class _Counted:
    """Stands in for the server's counter of sweep failures: what the job
    added to it."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, amount: int, attributes: object = None) -> None:
        self.total += amount


def _drop_usage_counters(db: Conn, card: builders.FundedCard) -> None:
    """What a hold from an older schema looks like: open, with no usage
    counters for the day it charged (releasing it gives back usage that is
    not there, and refuses)."""
    db.execute("DELETE FROM fc.usage WHERE (scope_kind = 1 AND scope_id = (SELECT id FROM fc.cards"
               " WHERE uid = %s)) OR (scope_kind = 2 AND scope_id = (SELECT id FROM fc.accounts"
               " WHERE uid = %s))", (card.card_id, card.account_id))


def _backfill(db: Conn) -> None:
    """The upgrade's backfill, as the money-defects migration runs it."""
    sql = next(m for m in migrations.available() if m.name.endswith("_money_defects")).sql
    db.execute(sql[sql.index("INSERT INTO fc.usage"):].encode())


# --------------------------------------------------------------------------
# The expiry sweep, one account at a time
# --------------------------------------------------------------------------

def test_a_hold_that_cannot_be_released_does_not_wedge_the_sweep(
        server: RunningServer, db: Conn, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    counted = _Counted()
    assert server.server.telemetry is not None
    monkeypatch.setattr(server.server.telemetry, "hold_expiry_failures", counted)
    broken = builders.open_card(server, balance_fen=10_000)
    healthy = builders.open_card(server, balance_fen=10_000)
    stuck = builders.authorize(server, broken, 3_000).hold
    freed = builders.authorize(server, healthy, 4_000).hold
    _drop_usage_counters(db, broken)
    server.advance(31 * MIN)

    with caplog.at_level(logging.ERROR, logger="fuelcard_server.app"):
        assert server.expire_holds() == 1
    # The healthy account got its money back; the broken one is untouched and reported.
    assert _state(server, freed.hold_id) == common_pb2.HOLD_STATE_EXPIRED
    assert account_row(db, healthy.account_id)["held_fen"] == 0
    assert _state(server, stuck.hold_id) == common_pb2.HOLD_STATE_AUTHORIZED
    assert account_row(db, broken.account_id)["held_fen"] == 3_000
    assert counted.total == 1
    failed = [r for r in caplog.records if "hold expiry failed for account" in r.getMessage()]
    assert len(failed) == 1 and broken.account_id in failed[0].getMessage()
    assert broken.card_number not in failed[0].getMessage()

    # Set aside: the next sweeps skip it, and say nothing more about it.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="fuelcard_server.app"):
        assert server.expire_holds() == 0
    assert not [r for r in caplog.records if "hold expiry failed" in r.getMessage()]
    assert counted.total == 1
    assert count(db, "hold_sweep_failures", "failures = 1") == 1
    assert {v.check for v in verify.run(server.database_url)} == {
        "no_account_set_aside_by_the_expiry_sweep", "usage_equals_holds"}

    # The upgrade's backfill repairs it; at its retry time the sweep releases it.
    _backfill(db)
    server.advance(30 * MIN)
    assert server.expire_holds() == 0  # still set aside
    server.advance(31 * MIN)
    assert server.expire_holds() == 1
    assert _state(server, stuck.hold_id) == common_pb2.HOLD_STATE_EXPIRED
    assert account_row(db, broken.account_id)["held_fen"] == 0
    assert count(db, "hold_sweep_failures") == 0
    assert_ledger_ok(server.database_url)


def test_an_account_set_aside_does_not_fill_every_batch(server: RunningServer, db: Conn) -> None:
    # The broken account's hold is the oldest: a batch of one would be it every time.
    broken = builders.open_card(server, balance_fen=10_000)
    builders.authorize(server, broken, 1_000)
    _drop_usage_counters(db, broken)
    server.advance(MIN)
    healthy = builders.open_card(server, balance_fen=10_000)
    freed = builders.authorize(server, healthy, 2_000).hold
    server.advance(31 * MIN)

    def sweep() -> int:
        row = db.execute("SELECT fc.expire_holds(p_now => %(now)s, p_limit => 1)",
                         {"now": server.clock.now()}).fetchone()
        assert row is not None
        released: int = row[0]
        return released

    assert sweep() == 0  # the broken account, set aside
    assert sweep() == 1  # then the next one in line
    assert _state(server, freed.hold_id) == common_pb2.HOLD_STATE_EXPIRED
    assert sweep() == 0
    _backfill(db)
    server.advance(61 * MIN)
    assert sweep() == 1
    assert_ledger_ok(server.database_url)


def test_the_backfill_gives_open_holds_the_counters_they_charged(server: RunningServer,
                                                               db: Conn) -> None:
    fleet = cb.open_fleet(server, 50_000, [ALLOCATED])
    cb.batch_top_up(server, fleet.parent_id, [(fleet.subs[0].account_id, 20_000)])
    hold = cb.approved(server, fleet.subs[0], 6_000)
    used = db.execute("SELECT scope_kind, scope_id, day, amount_fen FROM fc.usage"
                      " ORDER BY 1, 2, 3").fetchall()
    db.execute("DELETE FROM fc.usage")
    _backfill(db)
    assert db.execute("SELECT scope_kind, scope_id, day, amount_fen FROM fc.usage"
                      " ORDER BY 1, 2, 3").fetchall() == used
    # Counters the holds charged are left as they are where they already cover them.
    _backfill(db)
    assert db.execute("SELECT scope_kind, scope_id, day, amount_fen FROM fc.usage"
                      " ORDER BY 1, 2, 3").fetchall() == used
    assert builders.cancel(server, hold.hold_id).hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert_ledger_ok(server.database_url)


# --------------------------------------------------------------------------
# Deciding against held money: expired holds released first
# --------------------------------------------------------------------------

def test_a_late_confirm_releases_the_accounts_other_expired_holds_first(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    late = builders.authorize(server, card, 6_000).hold
    server.advance(31 * MIN)
    assert server.expire_holds() == 1
    other = builders.authorize(server, card, 5_000).hold
    server.advance(31 * MIN)  # expired, not yet swept: it still holds 5 000
    answer = builders.confirm(server, late.hold_id, 6_000)
    assert answer.decision == common_pb2.DECISION_APPROVED, answer
    assert answer.hold.state == common_pb2.HOLD_STATE_CONFIRMED
    assert _state(server, other.hold_id) == common_pb2.HOLD_STATE_EXPIRED
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (4_000, 0)
    assert count(db, "settlement_exceptions") == 0
    assert_ledger_ok(server.database_url)


def test_a_channel_refund_releases_expired_holds_before_taking_money_back(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    txn = f"tx-{uuid.uuid4().hex}"
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("rc"), account_id=card.account_id, channel=WECHAT,
        channel_txn_id=txn, amount_fen=10_000))
    builders.authorize(server, card, 4_000)
    server.advance(31 * MIN)
    refund = server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=builders.rid("rf"), channel=WECHAT, channel_txn_id=txn,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=10_000)).refund
    assert (refund.debited_fen, refund.shortfall_fen) == (10_000, 0)
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (0, 0)
    assert count(db, "channel_exceptions") == 0
    assert_ledger_ok(server.database_url)


def test_a_batch_top_up_releases_the_parents_expired_holds_first(server: RunningServer,
                                                                db: Conn) -> None:
    fleet = cb.open_fleet(server, 10_000, [ALLOCATED])
    builders.authorize(server, fleet.parent, 8_000)
    server.advance(31 * MIN)
    answer = cb.batch_top_up(server, fleet.parent_id, [(fleet.subs[0].account_id, 5_000)])
    assert answer.decision == common_pb2.DECISION_APPROVED, answer
    assert answer.parent_balance_fen == 5_000
    assert cb.balance_of(server, fleet.parent_id) == (5_000, 0)
    assert cb.balance_of(server, fleet.subs[0].account_id) == (5_000, 0)
    assert_ledger_ok(server.database_url)


# --------------------------------------------------------------------------
# A parent's caps and its family's expired holds
# --------------------------------------------------------------------------

@pytest.mark.parametrize("spender", ["sibling", "parent"])
def test_a_parents_caps_do_not_count_a_family_members_expired_hold(
        server: RunningServer, db: Conn, spender: str) -> None:
    fleet = cb.open_fleet(server, 100_000, [ALLOCATED, ALLOCATED])
    cb.batch_top_up(server, fleet.parent_id, [(fleet.subs[0].account_id, 20_000),
                                              (fleet.subs[1].account_id, 20_000)])
    cb.set_limits(server, fleet.parent_id, account=fleet.parent_id, daily=10_000)
    expired = cb.approved(server, fleet.subs[0], 8_000)
    server.advance(31 * MIN)  # expired, not yet swept: the parent's usage still counts it
    card = fleet.subs[1] if spender == "sibling" else fleet.parent
    answer = cb.authorize(server, card, 5_000)
    assert answer.decision == common_pb2.DECISION_APPROVED, answer.decline_reason
    assert _state(server, expired.hold_id) == common_pb2.HOLD_STATE_EXPIRED
    assert cb.balance_of(server, fleet.subs[0].account_id) == (20_000, 0)
    limits = cb.get_limits(server, account=fleet.parent_id)
    assert limits.used_today_fen == 5_000
    # A real breach is still one.
    assert cb.authorize(server, card, 6_000).decline_reason == common_pb2.DECLINE_REASON_LIMIT_DAILY
    assert_ledger_ok(server.database_url)


def test_a_family_release_racing_the_sweep_releases_each_hold_once(server: RunningServer,
                                                                   db: Conn) -> None:
    fleet = cb.open_fleet(server, 100_000, [ALLOCATED, ALLOCATED])
    cb.batch_top_up(server, fleet.parent_id, [(fleet.subs[0].account_id, 20_000),
                                              (fleet.subs[1].account_id, 20_000)])
    cb.set_limits(server, fleet.parent_id, account=fleet.parent_id, daily=10_000)
    expired = cb.approved(server, fleet.subs[0], 8_000)
    server.advance(31 * MIN)
    # Both queue behind the parent's lock: the sibling's authorization (refused by the parent's
    # cap until it releases the family's expired holds) and the sweep (which locks the parent
    # with the member); whichever goes first releases the hold, the other finds it released.
    with psycopg.connect(server.database_url, autocommit=True) as side:
        side.execute("BEGIN")
        side.execute("SELECT pg_advisory_xact_lock(%s)", (account_row(db, fleet.parent_id)["id"],))
        with ThreadPoolExecutor(max_workers=2) as pool:
            auth = pool.submit(cb.authorize, server, fleet.subs[1], 5_000)
            sweep = pool.submit(server.expire_holds)
            wait_queued(server.database_url, 2, [auth, sweep])
            side.execute("COMMIT")
            answer, released = auth.result(timeout=30), sweep.result(timeout=30)
    assert answer.decision == common_pb2.DECISION_APPROVED, answer.decline_reason
    assert released in (0, 1)
    assert _state(server, expired.hold_id) == common_pb2.HOLD_STATE_EXPIRED
    assert cb.balance_of(server, fleet.subs[0].account_id) == (20_000, 0)
    assert cb.get_limits(server, account=fleet.parent_id).used_today_fen == 5_000
    assert_ledger_ok(server.database_url)


# --------------------------------------------------------------------------
# Points expiry dates
# --------------------------------------------------------------------------

def _plus_months(local: dt.datetime, months: int) -> dt.datetime:
    """Calendar months later on the same wall clock, the day clamped to the
    month's last (as PostgreSQL adds months)."""
    y, m = divmod(local.month - 1 + months, 12)
    year, month = local.year + y, m + 1
    return local.replace(year=year, month=month,
                         day=min(local.day, calendar.monthrange(year, month)[1]))


def test_points_expire_by_calendar_months_in_the_business_time_zone(server: RunningServer,
                                                                   db: Conn) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    months = int(db.execute("SELECT value FROM fc.config WHERE key = 'points_validity_months'"
                            ).fetchone()[0])  # type: ignore[index]
    # 04:00 on 29 February in Shanghai is still 28 February in UTC: counted in
    # UTC, the lot would lapse on 1 March local instead of the 28th.
    cb.advance_to_local(server, dt.datetime(2028, 2, 29, 4, 0))
    hold = builders.authorize(server, card, 10_000).hold
    confirmed = builders.confirm(server, hold.hold_id, 10_000)
    assert confirmed.points_earned > 0
    row = db.execute("SELECT earned_at, expires_at FROM fc.points_lots l JOIN fc.accounts a"
                     " ON a.id = l.account_id WHERE a.uid = %s", (card.account_id,)).fetchone()
    assert row is not None
    earned, expires = row
    local = earned.astimezone(cb.BUSINESS_TZ)
    assert local.date() == dt.date(2028, 2, 29)
    assert expires.astimezone(cb.BUSINESS_TZ) == _plus_months(local, months)
    assert_ledger_ok(server.database_url)


# --------------------------------------------------------------------------
# Batch top-up and each sub-account's maximum balance
# --------------------------------------------------------------------------

def test_a_batch_top_up_over_a_sub_accounts_maximum_balance_is_refused_whole(
        server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 100_000, [ALLOCATED, ALLOCATED, ALLOCATED])
    subs = [s.account_id for s in fleet.subs]
    db.execute("UPDATE fc.accounts SET max_balance_fen = 5_000 WHERE uid = %s", (subs[0],))
    db.execute("UPDATE fc.accounts SET max_balance_fen = 1_000 WHERE uid = %s", (subs[2],))
    before = snapshot(db)
    e = expect(lambda: cb.batch_top_up(server, fleet.parent_id,
                                       [(subs[0], 6_000), (subs[1], 1_000), (subs[2], 1_001)]),
               grpc.StatusCode.INVALID_ARGUMENT, "BALANCE_LIMIT_EXCEEDED")
    assert sorted(e.fields) == ["lines[0].amount_fen", "lines[2].amount_fen"]
    assert snapshot(db) == before  # nothing moved, not even the line that fitted
    # Up to the maximum is fine.
    answer = cb.batch_top_up(server, fleet.parent_id,
                             [(subs[0], 5_000), (subs[1], 1_000), (subs[2], 1_000)])
    assert answer.decision == common_pb2.DECISION_APPROVED
    assert cb.balance_of(server, subs[0]) == (5_000, 0)
    assert_ledger_ok(server.database_url)


# --------------------------------------------------------------------------
# Running-total channel refunds sent again
# --------------------------------------------------------------------------

def test_a_resent_running_total_refund_naming_another_total_is_refused(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    txn = f"tx-{uuid.uuid4().hex}"
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("rc"), account_id=card.account_id, channel=WECHAT,
        channel_txn_id=txn, amount_fen=10_000))

    def refund(refund_id: str, total: int) -> funding_pb2.RefundRechargeResponse:
        response: funding_pb2.RefundRechargeResponse = server.funding.RefundRecharge(
            funding_pb2.RefundRechargeRequest(
                request_id=builders.rid("rf"), channel=WECHAT, channel_txn_id=txn,
                channel_refund_id=refund_id, refunded_total_fen=total))
        return response

    first = refund("rf-1", 3_000).refund
    assert first.amount_fen == 3_000
    assert refund("rf-1", 3_000).refund.refund_id == first.refund_id  # the same, again
    before = snapshot(db)
    expect(lambda: refund("rf-1", 5_000), grpc.StatusCode.FAILED_PRECONDITION,
           "CHANNEL_REFUND_REUSED")
    assert snapshot(db) == before
    assert refund("rf-2", 5_000).refund.amount_fen == 2_000
    # Each refund keeps the total it was sent with.
    assert refund("rf-1", 3_000).refund.refund_id == first.refund_id
    expect(lambda: refund("rf-2", 3_000), grpc.StatusCode.FAILED_PRECONDITION,
           "CHANNEL_REFUND_REUSED")
    assert account_row(db, card.account_id)["balance_fen"] == 5_000
    assert_ledger_ok(server.database_url)
