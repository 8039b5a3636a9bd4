"""Issue 4, limits (限额): per-transaction, daily and monthly caps on cards and
accounts, a parent's caps binding its children at once, holds counting until
released, days and months in the business time zone (Asia/Shanghai),
temporary raises (假期临时提额), who may change them, and the cap check under
real concurrency. Everything through gRPC against the real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import functools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from fuelcard.v1 import account_pb2, common_pb2, control_pb2, transaction_pb2, transaction_pb2_grpc
from google.protobuf import timestamp_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.builders import FundedCard
from tests.support.ledger_asserts import Conn, count, expect, snapshot

PD = grpc.StatusCode.PERMISSION_DENIED
IA = grpc.StatusCode.INVALID_ARGUMENT
PER_TXN = common_pb2.DECLINE_REASON_LIMIT_PER_TRANSACTION
DAILY = common_pb2.DECLINE_REASON_LIMIT_DAILY
MONTHLY = common_pb2.DECLINE_REASON_LIMIT_MONTHLY


def _own_card(server: RunningServer, balance_fen: int = 1_000_000) -> FundedCard:
    """A top-level personal account with one card."""
    return builders.open_card(server, balance_fen=balance_fen)


def _usage(server: RunningServer, *, card: str = "", account: str = "") -> tuple[int, int]:
    got = cb.get_limits(server, card=card, account=account)
    return got.used_today_fen, got.used_this_month_fen


def _state(server: RunningServer, hold: common_pb2.Hold) -> int:
    got = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id)).hold
    return got.state


def test_card_caps_per_transaction_daily_monthly_each_named(server: RunningServer) -> None:
    card = _own_card(server)
    # A top-level account sets its own caps.
    set_ = cb.set_limits(server, card.account_id, card=card.card_id, txn=30_000, daily=50_000,
                         monthly=120_000)
    assert cb.caps(set_.limits) == (30_000, 50_000, 120_000)

    assert cb.declined(server, card, 30_001) == PER_TXN
    cb.sale(server, card, 30_000)
    assert cb.declined(server, card, 20_001) == DAILY
    cb.sale(server, card, 20_000)
    assert cb.declined(server, card, 1) == DAILY
    assert _usage(server, card=card.card_id) == (50_000, 50_000)

    # Next local day: the daily room is back, the month keeps counting.
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 9, 0))
    assert _usage(server, card=card.card_id) == (0, 50_000)
    cb.sale(server, card, 30_000)
    cb.sale(server, card, 20_000)
    cb.advance_to_local(server, dt.datetime(2026, 11, 27, 9, 0))
    cb.sale(server, card, 20_000)
    assert cb.declined(server, card, 1) == MONTHLY
    assert _usage(server, card=card.card_id) == (20_000, 120_000)
    # The per-transaction cap is checked first, the daily before the monthly.
    assert cb.declined(server, card, 30_001) == PER_TXN

    got = cb.get_limits(server, card=card.card_id)
    assert cb.caps(got.limits) == cb.caps(got.effective_limits) == (30_000, 50_000, 120_000)
    assert not got.HasField("raise_end_time")
    # Caps removed (0 = none): the money is the only bound again.
    cb.set_limits(server, card.account_id, card=card.card_id)
    cb.approved(server, card, 200_000)
    cb.assert_verified(server)


def test_account_caps_bind_all_its_cards_together(server: RunningServer) -> None:
    first = _own_card(server)
    second = cb.issue_card(server, first.account_id)
    cb.set_limits(server, first.account_id, account=first.account_id, txn=40_000, daily=50_000,
                  monthly=80_000)
    cb.sale(server, first, 30_000)
    assert cb.declined(server, second, 40_001) == PER_TXN
    assert cb.declined(server, second, 20_001) == DAILY
    cb.sale(server, second, 20_000)
    assert _usage(server, account=first.account_id) == (50_000, 50_000)
    # Each card's own counter only has its own spend.
    assert _usage(server, card=first.card_id) == (30_000, 30_000)
    assert _usage(server, card=second.card_id) == (20_000, 20_000)
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 12, 0))
    cb.approved(server, first, 30_000)
    assert cb.declined(server, second, 1) == MONTHLY
    cb.assert_verified(server)


def test_parent_caps_bind_every_child_at_once(server: RunningServer) -> None:
    fleet = cb.open_fleet(server, 2_000_000, [cb.SHARED, cb.ALLOCATED, cb.SHARED])
    a, b, c = fleet.subs
    cb.batch_top_up(server, fleet.parent_id, [(b.account_id, 500_000)])
    parent = fleet.parent_id
    cb.set_limits(server, parent, account=parent, daily=100_000, monthly=150_000)
    cb.set_limits(server, parent, card=a.card_id, txn=40_000)
    cb.set_limits(server, parent, account=c.account_id, daily=30_000)

    assert cb.declined(server, a, 40_001) == PER_TXN      # a's card cap
    cb.sale(server, a, 40_000)
    cb.sale(server, b, 35_000)                             # ALLOCATED, own money
    assert cb.declined(server, c, 30_001) == DAILY         # c's own account cap
    cb.sale(server, c, 20_000)
    # 95 000 used across the fleet: the parent's daily cap binds every vehicle,
    # whatever its own caps and whoever's money it spends.
    assert cb.declined(server, b, 5_001) == DAILY
    assert cb.declined(server, c, 5_001) == DAILY
    cb.sale(server, b, 5_000)
    # The parent's own card is bound by the same account caps.
    assert cb.declined(server, fleet.parent, 1) == DAILY
    assert _usage(server, account=parent) == (100_000, 100_000)
    assert _usage(server, account=b.account_id) == (40_000, 40_000)

    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 8, 0))
    cb.approved(server, fleet.parent, 30_000)
    cb.approved(server, a, 20_000)
    assert cb.declined(server, b, 1) == MONTHLY
    assert _usage(server, account=parent) == (50_000, 150_000)
    cb.assert_verified(server)


def test_holds_count_until_released(server: RunningServer) -> None:
    card = _own_card(server)
    cb.set_limits(server, card.account_id, card=card.card_id, daily=50_000)

    # An open hold uses room; cancelling gives it back.
    first = cb.approved(server, card, 30_000)
    assert cb.declined(server, card, 20_001) == DAILY
    assert _usage(server, card=card.card_id) == (30_000, 30_000)
    builders.cancel(server, first.hold_id)
    assert _usage(server, card=card.card_id) == (0, 0)

    # Confirming for less keeps only what was sold.
    second = cb.approved(server, card, 50_000)
    assert cb.declined(server, card, 1) == DAILY
    builders.confirm(server, second.hold_id, 12_000)
    assert _usage(server, card=card.card_id) == (12_000, 12_000)
    assert cb.declined(server, card, 38_001) == DAILY

    # Confirming 0 releases all of it.
    third = cb.approved(server, card, 38_000)
    builders.confirm(server, third.hold_id, 0)
    assert _usage(server, card=card.card_id) == (12_000, 12_000)

    # Expiry gives the room back too: by the sweep ...
    fourth = cb.approved(server, card, 38_000)
    assert cb.declined(server, card, 1) == DAILY
    server.advance(dt.timedelta(minutes=31))
    assert server.expire_holds() == 1
    assert _usage(server, card=card.card_id) == (12_000, 12_000)
    assert _state(server, fourth) == common_pb2.HOLD_STATE_EXPIRED
    # ... or, before the sweep gets to it, at the next authorization.
    sixth = cb.approved(server, card, 38_000)
    assert cb.declined(server, card, 1) == DAILY
    server.advance(dt.timedelta(minutes=31))
    fifth = cb.approved(server, card, 30_000)
    assert _state(server, sixth) == common_pb2.HOLD_STATE_EXPIRED
    assert server.expire_holds() == 0
    # A late confirm of the expired hold is a sale: it counts again.
    late = builders.confirm(server, fourth.hold_id, 5_000)
    assert late.decision == cb.APPROVED and late.hold.confirmed_late
    assert _usage(server, card=card.card_id) == (47_000, 47_000)
    builders.cancel(server, fifth.hold_id)
    assert _usage(server, card=card.card_id) == (17_000, 17_000)
    cb.assert_verified(server)


def test_days_and_months_are_shanghai_days_and_months(server: RunningServer) -> None:
    # The clock starts at 2026-11-25 16:00 in Shanghai (08:00 UTC).
    assert cb.local_now(server).replace(tzinfo=None) == dt.datetime(2026, 11, 25, 16, 0)
    card = _own_card(server, 2_000_000)
    cb.set_limits(server, card.account_id, card=card.card_id, daily=50_000, monthly=250_000)
    cb.sale(server, card, 30_000)
    cb.advance_to_local(server, dt.datetime(2026, 11, 25, 23, 50))
    late_evening = cb.approved(server, card, 20_000)
    assert cb.declined(server, card, 1) == DAILY

    # 00:10 in Shanghai is still 16:10 of the 25th in UTC: a new business day.
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 0, 10))
    assert server.clock.now().date() == dt.date(2026, 11, 25)
    assert _usage(server, card=card.card_id) == (0, 50_000)
    # Releasing yesterday's hold gives room back to yesterday, not today.
    builders.cancel(server, late_evening.hold_id)
    assert _usage(server, card=card.card_id) == (0, 30_000)
    cb.sale(server, card, 50_000)
    assert cb.declined(server, card, 1) == DAILY

    # Fill the month to its cap by the last evening of November.
    for d in (27, 28, 29):
        cb.advance_to_local(server, dt.datetime(2026, 11, d, 10, 0))
        cb.sale(server, card, 50_000)
    cb.advance_to_local(server, dt.datetime(2026, 11, 30, 10, 0))
    cb.sale(server, card, 20_000)
    assert _usage(server, card=card.card_id) == (20_000, 250_000)
    cb.advance_to_local(server, dt.datetime(2026, 11, 30, 23, 59))
    assert cb.declined(server, card, 1) == MONTHLY

    # 00:01 on 1 December in Shanghai (30 November 16:01 UTC): a new month.
    cb.advance_to_local(server, dt.datetime(2026, 12, 1, 0, 1))
    assert server.clock.now().month == 11
    assert _usage(server, card=card.card_id) == (0, 0)
    cb.approved(server, card, 50_000)
    assert cb.declined(server, card, 1) == DAILY
    assert _usage(server, card=card.card_id) == (50_000, 50_000)
    cb.assert_verified(server)


def test_temporary_raise_is_in_force_only_inside_its_window(server: RunningServer) -> None:
    family = cb.open_fleet(server, 2_000_000, [cb.SHARED], account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    main, secondary = family.parent_id, family.subs[0]
    cb.set_limits(server, main, card=secondary.card_id, txn=20_000, daily=30_000, monthly=100_000)
    start = dt.datetime(2026, 11, 27, 0, 0, tzinfo=cb.BUSINESS_TZ)
    end = dt.datetime(2026, 11, 29, 0, 0, tzinfo=cb.BUSINESS_TZ)
    raised = cb.grant_raise(server, main, start, end, card=secondary.card_id, txn=80_000,
                            daily=100_000, monthly=300_000)
    assert raised.raise_id

    # Before the window: the standing caps.
    before = cb.get_limits(server, card=secondary.card_id)
    assert cb.caps(before.effective_limits) == (20_000, 30_000, 100_000)
    assert not before.HasField("raise_end_time")
    assert cb.declined(server, secondary, 50_000) == PER_TXN

    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 23, 59))
    assert cb.declined(server, secondary, 50_000) == PER_TXN

    # Inside: the raised caps, and when they end.
    cb.advance_to_local(server, start)
    inside = cb.get_limits(server, card=secondary.card_id)
    assert cb.caps(inside.limits) == (20_000, 30_000, 100_000)
    assert cb.caps(inside.effective_limits) == (80_000, 100_000, 300_000)
    assert inside.raise_end_time.ToDatetime(dt.UTC) == end
    cb.sale(server, secondary, 50_000)
    cb.sale(server, secondary, 50_000)
    assert cb.declined(server, secondary, 1) == DAILY
    cb.advance_to_local(server, dt.datetime(2026, 11, 28, 23, 59))
    assert cb.declined(server, secondary, 80_001) == PER_TXN
    cb.sale(server, secondary, 80_000)

    # The end is exclusive: back to the standing caps, the month's usage intact.
    cb.advance_to_local(server, end)
    after = cb.get_limits(server, card=secondary.card_id)
    assert cb.caps(after.effective_limits) == (20_000, 30_000, 100_000)
    assert not after.HasField("raise_end_time")
    assert after.used_this_month_fen == 180_000
    assert cb.declined(server, secondary, 20_001) == PER_TXN
    assert cb.declined(server, secondary, 1) == MONTHLY

    # Raises on an account work the same way; the window must be sane.
    now = server.clock.now()
    cb.grant_raise(server, main, now, now + dt.timedelta(hours=1), account=secondary.account_id,
                   daily=10)
    assert cb.caps(cb.get_limits(server, account=secondary.account_id).effective_limits) == (0, 10, 0)
    expect(lambda: cb.grant_raise(server, main, now, now, card=secondary.card_id, txn=1), IA,
           "RAISE_WINDOW_INVALID")
    expect(lambda: cb.grant_raise(server, main, now, now + dt.timedelta(days=91),
                                  card=secondary.card_id, txn=1), IA, "RAISE_WINDOW_INVALID")
    # The member cannot raise its own caps.
    expect(lambda: cb.grant_raise(server, secondary.account_id, now, now + dt.timedelta(days=1),
                                  card=secondary.card_id, txn=1_000_000), PD,
           "NOT_THE_CONTROLLING_ACCOUNT")
    assert cb.declined(server, secondary, 20_001) == PER_TXN
    cb.assert_verified(server)


LAST_DAY_S = 253402300800 - 86400  # 9999-12-31, the last day a Timestamp holds


def test_impossible_times_are_invalid_argument_and_late_windows_are_no_error(
        server: RunningServer, db: Conn) -> None:
    """A Timestamp's nanos must be 0-999 999 999 and its seconds within year
    1970-9999: each bad one is named (it was INTERNAL: ValueError from
    ToDatetime). A window starting in the last 90 days of year 9999 is a
    window like any other (`start + 90 days` raised OverflowError)."""
    family = cb.open_fleet(server, 100_000, [cb.SHARED], account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    main, secondary = family.parent_id, family.subs[0]

    def raise_request(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp
                      ) -> control_pb2.GrantTemporaryRaiseRequest:
        return control_pb2.GrantTemporaryRaiseRequest(
            request_id=builders.rid("raise"), actor_account_id=main, card_id=secondary.card_id,
            limits=cb.limits(txn=50_000), start_time=start, end_time=end)

    def report_request(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp
                       ) -> control_pb2.GetFleetCostReportRequest:
        return control_pb2.GetFleetCostReportRequest(parent_account_id=main, start_time=start,
                                                     end_time=end)

    ok = timestamp_pb2.Timestamp(seconds=1_800_000_000)
    later = timestamp_pb2.Timestamp(seconds=1_800_003_600)
    bad = [("start_time", timestamp_pb2.Timestamp(seconds=1_800_000_000, nanos=-5), later),
           ("start_time", timestamp_pb2.Timestamp(seconds=1_800_000_000, nanos=10**9), later),
           ("end_time", ok, timestamp_pb2.Timestamp(seconds=1_800_003_600, nanos=-1)),
           ("end_time", ok, timestamp_pb2.Timestamp(seconds=253402300800))]
    before = snapshot(db)
    for field, start, end in bad:
        expect(functools.partial(cb.control(server).GrantTemporaryRaise,
                                 raise_request(start, end)), IA, "TIME_INVALID", field)
        expect(functools.partial(cb.control(server).GetFleetCostReport,
                                 report_request(start, end)), IA, "TIME_INVALID", field)
    assert snapshot(db) == before
    start = timestamp_pb2.Timestamp(seconds=LAST_DAY_S)
    end = timestamp_pb2.Timestamp(seconds=LAST_DAY_S + 3600)
    assert cb.control(server).GrantTemporaryRaise(raise_request(start, end)).raise_id
    report = cb.control(server).GetFleetCostReport(report_request(start, end))
    assert all(v.spend_fen == 0 for v in report.vehicles)
    expect(lambda: cb.control(server).GrantTemporaryRaise(raise_request(end, start)), IA,
           "RAISE_WINDOW_INVALID", "end_time")


def test_overlapping_raises_the_largest_caps_win(server: RunningServer) -> None:
    family = cb.open_fleet(server, 2_000_000, [cb.SHARED], account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    main, secondary = family.parent_id, family.subs[0]
    cb.set_limits(server, main, card=secondary.card_id, txn=20_000, daily=30_000)
    month = (dt.datetime(2026, 12, 1, tzinfo=cb.BUSINESS_TZ),
             dt.datetime(2026, 12, 31, tzinfo=cb.BUSINESS_TZ))
    holiday = (dt.datetime(2026, 12, 20, tzinfo=cb.BUSINESS_TZ),
               dt.datetime(2026, 12, 25, tzinfo=cb.BUSINESS_TZ))
    # A month-long modest raise, then a short holiday raise inside it.
    cb.grant_raise(server, main, *month, card=secondary.card_id, txn=40_000, daily=60_000)
    cb.grant_raise(server, main, *holiday, card=secondary.card_id, txn=100_000)

    cb.advance_to_local(server, dt.datetime(2026, 12, 10, 12, 0))
    got = cb.get_limits(server, card=secondary.card_id)
    assert cb.caps(got.effective_limits) == (40_000, 60_000, 0)
    assert got.raise_end_time.ToDatetime(dt.UTC) == month[1]
    assert cb.declined(server, secondary, 40_001) == PER_TXN

    # On holiday the larger per-transaction cap is in force, and the holiday
    # raise sets no daily cap at all; the month-long raise has not ended.
    cb.advance_to_local(server, dt.datetime(2026, 12, 22, 12, 0))
    got = cb.get_limits(server, card=secondary.card_id)
    assert cb.caps(got.effective_limits) == (100_000, 0, 0)
    assert got.raise_end_time.ToDatetime(dt.UTC) == month[1]
    cb.sale(server, secondary, 100_000)
    cb.sale(server, secondary, 100_000)

    cb.advance_to_local(server, dt.datetime(2026, 12, 26, 12, 0))
    assert cb.caps(cb.get_limits(server, card=secondary.card_id).effective_limits) == (40_000, 60_000, 0)
    assert cb.declined(server, secondary, 40_001) == PER_TXN
    cb.advance_to_local(server, month[1])
    assert cb.caps(cb.get_limits(server, card=secondary.card_id).effective_limits) == (20_000, 30_000, 0)
    cb.assert_verified(server)


# --------------------------------------------------------------------------
# Who may change limits
# --------------------------------------------------------------------------

def test_only_the_parent_changes_a_childs_limits(server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 500_000, [cb.SHARED, cb.ALLOCATED])
    child, sibling = fleet.subs
    stranger = cb.open_fleet(server, 0, [cb.SHARED])
    parent = fleet.parent_id
    cb.set_limits(server, parent, card=child.card_id, txn=10_000, daily=20_000)
    cb.set_limits(server, parent, account=child.account_id, daily=25_000)
    changes_before = count(db, "control_changes")
    standing = (cb.caps(cb.get_limits(server, card=child.card_id).limits),
                cb.caps(cb.get_limits(server, account=child.account_id).limits),
                cb.caps(cb.get_limits(server, account=parent).limits))

    attempts: list[tuple[str, dict[str, str]]] = [
        (child.account_id, {"card": child.card_id}),        # the child raising its own card
        (child.account_id, {"account": child.account_id}),  # ... or its own account
        (child.account_id, {"account": parent}),            # ... or its parent
        (sibling.account_id, {"card": child.card_id}),      # a sibling
        (stranger.parent_id, {"card": child.card_id}),      # another fleet's parent
        (stranger.parent_id, {"account": child.account_id}),
        (stranger.parent_id, {"account": parent}),          # another top-level account
        (parent, {"card": stranger.subs[0].card_id}),       # a parent over a stranger
    ]
    for actor, target in attempts:
        expect(lambda actor=actor, target=target: cb.set_limits(  # type: ignore[misc]
            server, actor, txn=1_000_000, daily=1_000_000, **target),
            PD, "NOT_THE_CONTROLLING_ACCOUNT")
    expect(lambda: cb.set_limits(server, cb.new_uuid(), card=child.card_id, txn=1),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    expect(lambda: cb.set_limits(server, parent, card=cb.new_uuid(), txn=1),
           grpc.StatusCode.NOT_FOUND, "CARD_NOT_FOUND")
    expect(lambda: cb.set_limits(server, parent, card=child.card_id, txn=-1), IA,
           field="limits.per_transaction_fen")

    # Nothing changed, nothing was recorded, and the caps still bind.
    assert count(db, "control_changes") == changes_before
    assert (cb.caps(cb.get_limits(server, card=child.card_id).limits),
            cb.caps(cb.get_limits(server, account=child.account_id).limits),
            cb.caps(cb.get_limits(server, account=parent).limits)) == standing
    assert cb.declined(server, child, 10_001) == PER_TXN
    cb.assert_verified(server)


def test_every_change_is_listed_with_its_actor(server: RunningServer) -> None:
    fleet = cb.open_fleet(server, 100_000, [cb.SHARED, cb.ALLOCATED])
    a, b = fleet.subs
    parent = fleet.parent_id
    other = cb.open_fleet(server, 0, [cb.SHARED])
    cb.set_limits(server, parent, account=parent, daily=500_000)
    cb.set_limits(server, parent, card=a.card_id, txn=10_000, daily=20_000, monthly=30_000)
    server.advance(dt.timedelta(minutes=5))
    now = server.clock.now()
    cb.grant_raise(server, parent, now, now + dt.timedelta(days=2), account=b.account_id, daily=9_000)
    cb.set_scope(server, parent, b.card_id, station_ids=["KM-001", "KM-002"],
                 products=[common_pb2.PRODUCT_DIESEL_0])
    cb.set_limits(server, other.parent_id, card=other.subs[0].card_id, txn=1)
    expect(lambda: cb.set_limits(server, a.account_id, card=a.card_id, txn=99_999), PD)

    listed = cb.changes(server, parent)
    assert [(c.kind, c.actor_account_id, c.account_id, c.card_id) for c in listed] == [
        ("scope", parent, b.account_id, b.card_id),
        ("raise", parent, b.account_id, ""),
        ("limits", parent, a.account_id, a.card_id),
        ("limits", parent, parent, ""),
    ]
    assert json.loads(listed[2].details_json) == {
        "per_transaction_fen": 10_000, "daily_fen": 20_000, "monthly_fen": 30_000}
    assert json.loads(listed[1].details_json)["daily_fen"] == 9_000
    assert json.loads(listed[0].details_json)["station_ids"] == ["KM-001", "KM-002"]
    assert listed[0].create_time.ToDatetime(dt.UTC) == now
    assert listed[3].create_time.ToDatetime(dt.UTC) == now - dt.timedelta(minutes=5)
    # A child's own list has only its changes; the other fleet's stay apart.
    assert [c.kind for c in cb.changes(server, a.account_id)] == ["limits"]
    assert [c.actor_account_id for c in cb.changes(server, other.parent_id)] == [other.parent_id]

    # Paging, newest first.
    stub = cb.control(server)
    page1 = stub.ListControlChanges(control_pb2.ListControlChangesRequest(account_id=parent,
                                                                           page_size=3))
    assert page1.next_page_token
    page2 = stub.ListControlChanges(control_pb2.ListControlChangesRequest(
        account_id=parent, page_size=3, page_token=page1.next_page_token))
    assert list(page1.changes) + list(page2.changes) == listed
    assert page2.next_page_token == ""
    cb.assert_verified(server)


# --------------------------------------------------------------------------
# Real concurrency
# --------------------------------------------------------------------------

def _fire(server: RunningServer, requests: list[transaction_pb2.AuthorizeRequest], threads: int,
          n_channels: int) -> list[transaction_pb2.AuthorizeResponse]:
    """All requests at once: `threads` threads released together, each with
    its share in flight together, over several connections."""
    channels = [grpc.insecure_channel(server.target) for _ in range(n_channels)]
    stubs = [transaction_pb2_grpc.TransactionServiceStub(c) for c in channels]
    start = threading.Barrier(threads)

    def worker(i: int) -> list[transaction_pb2.AuthorizeResponse]:
        mine = requests[i::threads]
        stub = stubs[i % n_channels]
        start.wait(timeout=30)
        futures = [stub.Authorize.future(r, timeout=60) for r in mine]
        return [f.result() for f in futures]

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return [a for batch in pool.map(worker, range(threads)) for a in batch]
    finally:
        for c in channels:
            c.close()


def test_concurrent_authorizations_never_pass_a_card_daily_cap(server: RunningServer,
                                                               db: Conn) -> None:
    card = _own_card(server, 5_000_000)
    builders.recharge(server, card.account_id, 5_000_000)
    cb.set_limits(server, card.account_id, card=card.card_id, daily=50_000)
    answers = _fire(server, [cb.auth_request(card, 5_000) for _ in range(120)], threads=40,
                    n_channels=4)
    assert len(answers) == 120
    outcome = Counter((a.decision, a.decline_reason) for a in answers)
    # The cap, not the balance (10 million fen), binds: exactly ten fit.
    assert outcome == {(cb.APPROVED, common_pb2.DECLINE_REASON_UNSPECIFIED): 10, (cb.DECLINED, DAILY): 110}
    assert count(db, "holds") == 10
    assert _usage(server, card=card.card_id) == (50_000, 50_000)
    assert cb.balance_of(server, card.account_id) == (10_000_000, 50_000)
    cb.assert_verified(server)


def test_concurrent_children_never_pass_their_parents_daily_cap(server: RunningServer,
                                                                db: Conn) -> None:
    fleet = cb.open_fleet(server, 5_000_000, [cb.SHARED, cb.ALLOCATED] * 3)
    cb.batch_top_up(server, fleet.parent_id,
                    [(s.account_id, 1_000_000) for s in fleet.subs[1::2]])
    cb.set_limits(server, fleet.parent_id, account=fleet.parent_id, daily=60_000)
    requests = [cb.auth_request(fleet.subs[i % 6], 5_000) for i in range(120)]
    answers = _fire(server, requests, threads=30, n_channels=3)
    approved = [a for a in answers if a.decision == cb.APPROVED]
    assert len(approved) == 12
    assert {a.decline_reason for a in answers if a.decision == cb.DECLINED} == {DAILY}
    assert _usage(server, account=fleet.parent_id) == (60_000, 60_000)
    assert count(db, "holds", "state = 1") == 12
    assert sum(cb.balance_of(server, s.account_id)[1] for s in fleet.subs) + \
        cb.balance_of(server, fleet.parent_id)[1] == 60_000
    cb.assert_verified(server)


STORM_SECONDS = 3.0


@pytest.mark.slow
def test_parent_child_storm_never_deadlocks(server: RunningServer, db: Conn) -> None:
    """Authorize/confirm/cancel on many SHARED and ALLOCATED children of one
    parent, with batch top-ups on the parent, limit changes on parent and
    children, and expiry sweeps, all at once: every call answers, none with a
    deadlock or any other error, and the ledger verifies."""
    fleet = cb.open_fleet(server, 5_000_000, [cb.SHARED, cb.ALLOCATED] * 4)
    builders.recharge(server, fleet.parent_id, 5_000_000)
    allocated = fleet.subs[1::2]
    cb.batch_top_up(server, fleet.parent_id, [(s.account_id, 300_000) for s in allocated])
    parent = fleet.parent_id
    n_channels = 4
    channels = [grpc.insecure_channel(server.target) for _ in range(n_channels)]
    stop = threading.Event()
    errors: list[str] = []  # every failure, with the thread it happened on
    tally: Counter[str] = Counter()
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            tally[what] += 1

    spent: Counter[str] = Counter()  # settled, per card
    top_ups_done: list[int] = []

    def guarded(name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except grpc.RpcError as err:
            errors.append(f"{name}: {err.code()} {err.details()}")
        except Exception as exc:  # any failure fails the test
            errors.append(f"{name}: {exc!r}")
        finally:
            stop.set()  # one failure ends the storm early

    def pump(i: int) -> None:
        card = fleet.subs[i % len(fleet.subs)]
        pos = transaction_pb2_grpc.TransactionServiceStub(channels[i % n_channels])
        rng = random.Random(i)
        while not stop.is_set():
            auth = pos.Authorize(cb.auth_request(card, rng.randint(1_000, 20_000)), timeout=30)
            note("authorize")
            if auth.decision != cb.APPROVED:
                note(f"declined {common_pb2.DeclineReason.Name(auth.decline_reason)}")
                continue
            roll = rng.random()
            if roll < 0.45:
                final = rng.randint(1, auth.hold.amount_fen)
                done = pos.Confirm(transaction_pb2.ConfirmRequest(
                    request_id=builders.rid("c"), hold_id=auth.hold.hold_id,
                    final_amount_fen=final, volume_ml=5_000, unit_price_fen=780), timeout=30)
                assert done.decision == cb.APPROVED, done
                with lock:
                    spent[card.card_id] += final
                note("confirm")
            elif roll < 0.9:
                pos.Cancel(transaction_pb2.CancelRequest(request_id=builders.rid("x"),
                                                         hold_id=auth.hold.hold_id), timeout=30)
                note("cancel")
            else:
                note("abandoned")  # left for the expiry sweep

    def top_ups() -> None:
        stub = cb.control(server, channels[0])
        while not stop.is_set():
            answer = stub.BatchTopUp(cb.top_up_request(parent, [(s.account_id, 500) for s in allocated]),
                                     timeout=30)
            assert answer.decision == cb.APPROVED, answer
            top_ups_done.append(answer.total_fen)
            note("top-up")

    def limit_changes() -> None:
        stub = cb.control(server, channels[1])
        rng = random.Random(99)
        while not stop.is_set():
            targets = [{"account_id": parent}] + [{"card_id": s.card_id} for s in fleet.subs]
            target: dict[str, Any] = rng.choice(
                targets + [{"account_id": s.account_id} for s in fleet.subs])
            stub.SetSpendingLimits(control_pb2.SetSpendingLimitsRequest(
                request_id=builders.rid("l"), actor_account_id=parent,
                limits=cb.limits(rng.choice([0, 15_000]), rng.choice([0, 5_000_000]),
                                 rng.choice([0, 50_000_000])), **target), timeout=30)
            note("set limits")

    def sweeps() -> None:
        while not stop.is_set():
            server.advance(dt.timedelta(minutes=4))
            server.expire_holds()
            note("sweep")
            time.sleep(0.2)

    bodies: list[tuple[str, Callable[[], None]]] = [
        (f"pump-{i}", functools.partial(pump, i)) for i in range(12)]
    bodies += [("top-ups", top_ups), ("limits", limit_changes), ("sweeps", sweeps)]
    try:
        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            futures = [pool.submit(guarded, name, body) for name, body in bodies]
            # A few seconds, longer on a loaded machine until every kind of
            # call has had its turns; a failure ends it at once.
            started = time.monotonic()
            while not stop.wait(0.1):
                with lock:
                    enough = min(tally[k] for k in ("confirm", "cancel", "top-up", "set limits",
                                                    "sweep")) >= 5 and tally["authorize"] >= 100
                elapsed = time.monotonic() - started
                if (elapsed >= STORM_SECONDS and enough) or elapsed >= 30:
                    break
            stop.set()
            for f in futures:
                f.result(timeout=60)
    finally:
        stop.set()
        for c in channels:
            c.close()

    assert errors == []
    assert tally["authorize"] >= 100, tally
    assert min(tally[k] for k in ("confirm", "cancel", "top-up", "set limits", "sweep")) >= 5, tally
    # Whatever is still open expires; then nothing is held anywhere.
    server.advance(dt.timedelta(hours=1))
    server.expire_holds()
    assert count(db, "holds", "state = 1") == 0
    # Every fen is where the answers said it went.
    shared_spent = sum(spent[s.card_id] for s in fleet.subs[0::2])
    assert cb.balance_of(server, parent) == (
        10_000_000 - 4 * 300_000 - sum(top_ups_done) - shared_spent, 0)
    for s in allocated:
        assert cb.balance_of(server, s.account_id) == (
            300_000 + 500 * len(top_ups_done) - spent[s.card_id], 0)
    cb.assert_verified(server)
