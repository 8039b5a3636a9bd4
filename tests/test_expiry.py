"""Semantic 4: holds expire after a configurable TTL and release their money;
a confirm after expiry is never lost (late settlement, or a recorded
settlement exception); the sweep runs beside the other jobs without
deadlocking. Time moves by the ManualClock, never by sleeping."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import account_pb2, common_pb2, transaction_pb2
from fuelcard_server.settings import Settings

from tests.plugins.server import RunningServer, make_settings
from tests.support import builders, job_races
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, expect, snapshot

MIN = dt.timedelta(minutes=1)
SEC = dt.timedelta(seconds=1)


def _hold(server: RunningServer, hold_id: str) -> common_pb2.Hold:
    hold: common_pb2.Hold = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold_id)).hold
    return hold


def test_hold_expires_after_30_minutes_by_default(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    created = server.clock.now()
    assert hold.expire_time.ToDatetime(dt.UTC) == created + 30 * MIN

    server.advance(30 * MIN - SEC)
    assert server.expire_holds() == 0
    assert _hold(server, hold.hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED
    assert builders.balance(server, card).balance.held_fen == 30_000

    server.advance(SEC)
    assert server.expire_holds() == 1
    expired = _hold(server, hold.hold_id)
    assert expired.state == common_pb2.HOLD_STATE_EXPIRED
    assert expired.close_time.ToDatetime(dt.UTC) == created + 30 * MIN
    assert expired.settled_fen == 0
    bal = builders.balance(server, card).balance
    assert (bal.balance_fen, bal.held_fen, bal.available_fen) == (50_000, 0, 50_000)
    # Released, not spent: no journal entry, no points.
    assert count(db, "journal", "hold_id IS NOT NULL") == 0
    # A second sweep finds nothing more.
    assert server.expire_holds() == 0
    assert_ledger_ok(server.database_url)


def test_sweep_releases_only_the_due_holds_of_every_account(server: RunningServer,
                                                            db: Conn) -> None:
    a = builders.open_card(server, balance_fen=10_000)
    b = builders.open_card(server, balance_fen=10_000)
    old_a = builders.authorize(server, a, 1_000).hold
    old_b = builders.authorize(server, b, 2_000).hold
    server.advance(20 * MIN)
    young_a = builders.authorize(server, a, 3_000).hold
    server.advance(10 * MIN)
    assert server.expire_holds() == 2
    assert _hold(server, old_a.hold_id).state == common_pb2.HOLD_STATE_EXPIRED
    assert _hold(server, old_b.hold_id).state == common_pb2.HOLD_STATE_EXPIRED
    assert _hold(server, young_a.hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED
    assert account_row(db, a.account_id)["held_fen"] == 3_000
    assert account_row(db, b.account_id)["held_fen"] == 0
    assert_ledger_ok(server.database_url)


def test_cancel_of_an_expired_hold_succeeds_and_changes_nothing(server: RunningServer,
                                                               db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    hold = builders.authorize(server, card, 4_000).hold
    server.advance(31 * MIN)
    assert server.expire_holds() == 1
    cancelled = builders.cancel(server, hold.hold_id)
    assert cancelled.hold.state == common_pb2.HOLD_STATE_EXPIRED
    assert account_row(db, card.account_id)["held_fen"] == 0
    # final = 0 on an expired hold: approved, and the hold stays expired.
    zero = builders.confirm(server, hold.hold_id, 0)
    assert zero.decision == common_pb2.DECISION_APPROVED
    assert zero.hold.state == common_pb2.HOLD_STATE_EXPIRED
    assert builders.balance(server, card).balance.balance_fen == 10_000
    assert_ledger_ok(server.database_url)


def test_expired_but_unswept_hold_stops_counting_when_the_money_is_needed(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    old = builders.authorize(server, card, 8_000).hold
    server.advance(30 * MIN)
    # No sweep has run: the hold still counts ...
    assert builders.balance(server, card).balance.held_fen == 8_000
    # ... until an authorization needs its money: authorize sweeps the account.
    fresh = builders.authorize(server, card, 5_000)
    assert fresh.decision == common_pb2.DECISION_APPROVED
    assert fresh.available_fen == 5_000
    assert _hold(server, old.hold_id).state == common_pb2.HOLD_STATE_EXPIRED
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (10_000, 5_000)
    assert server.expire_holds() == 0
    assert_ledger_ok(server.database_url)


def test_unswept_expired_hold_is_not_released_while_money_suffices(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    old = builders.authorize(server, card, 2_000).hold
    server.advance(31 * MIN)
    assert builders.authorize(server, card, 1_000).available_fen == 7_000
    assert _hold(server, old.hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED
    assert server.expire_holds() == 1
    assert builders.balance(server, card).balance.held_fen == 1_000


def test_confirm_after_expiry_settles_late_when_the_money_is_there(server: RunningServer,
                                                                   db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    server.advance(45 * MIN)
    assert server.expire_holds() == 1
    assert builders.balance(server, card).balance.held_fen == 0
    done = builders.confirm(server, hold.hold_id, 21_050, volume_ml=26_810, unit_price_fen=785)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.hold.state == common_pb2.HOLD_STATE_CONFIRMED
    assert done.hold.confirmed_late
    assert done.hold.settled_fen == 21_050
    assert done.points_earned == 210
    assert done.settlement_exception_id == ""
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (28_950, 0, 210)
    assert count(db, "settlement_exceptions") == 0
    assert_ledger_ok(server.database_url)


def test_confirm_of_an_expired_unswept_hold_settles_late(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    server.advance(31 * MIN)
    done = builders.confirm(server, hold.hold_id, 30_000)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.hold.state == common_pb2.HOLD_STATE_CONFIRMED
    assert done.hold.confirmed_late
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (20_000, 0)
    assert server.expire_holds() == 0
    assert_ledger_ok(server.database_url)


def test_confirm_after_expiry_without_money_records_a_settlement_exception(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    server.advance(31 * MIN)
    assert server.expire_holds() == 1
    # The released money is spent by another sale before the late confirm.
    other = builders.authorize(server, card, 40_000).hold
    builders.confirm(server, other.hold_id, 40_000)
    before = account_row(db, card.account_id)
    assert (before["balance_fen"], before["held_fen"]) == (10_000, 0)
    journal_rows = count(db, "journal")

    rid = builders.rid("late")
    late = builders.confirm(server, hold.hold_id, 25_000, request_id=rid)
    assert late.decision == common_pb2.DECISION_DECLINED
    assert late.decline_reason == common_pb2.DECLINE_REASON_HOLD_EXPIRED
    assert late.settlement_exception_id
    assert late.hold.state == common_pb2.HOLD_STATE_EXPIRED
    assert late.points_earned == 0
    assert late.balance_fen == 10_000
    exceptions = db.execute(
        "SELECT e.uid::text, h.uid::text, a.uid::text, e.amount_fen, e.reason, e.resolved_at"
        " FROM fc.settlement_exceptions e JOIN fc.holds h ON h.id = e.hold_id"
        " JOIN fc.accounts a ON a.id = e.account_id").fetchall()
    assert exceptions == [(late.settlement_exception_id, hold.hold_id, card.account_id, 25_000,
                           "HOLD_EXPIRED_INSUFFICIENT_FUNDS", None)]
    # No money moved, no points.
    after = account_row(db, card.account_id)
    assert after == before
    assert count(db, "journal") == journal_rows
    # The POS retries: the same answer, still one exception.
    snap = snapshot(db)
    assert builders.confirm(server, hold.hold_id, 25_000, request_id=rid) == late
    assert snapshot(db) == snap
    assert count(db, "settlement_exceptions") == 1
    assert_ledger_ok(server.database_url)


def test_settlement_exception_when_authorize_sweeps_the_money_away(server: RunningServer,
                                                                   db: Conn) -> None:
    """Never swept by the job: an authorize needing the money releases the
    expired hold, takes the money, and the late confirm is an exception."""
    card = builders.open_card(server, balance_fen=10_000)
    hold = builders.authorize(server, card, 10_000).hold
    server.advance(30 * MIN)
    assert builders.authorize(server, card, 9_000).decision == common_pb2.DECISION_APPROVED
    late = builders.confirm(server, hold.hold_id, 5_000)
    assert late.decision == common_pb2.DECISION_DECLINED
    assert late.decline_reason == common_pb2.DECLINE_REASON_HOLD_EXPIRED
    assert count(db, "settlement_exceptions") == 1
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (10_000, 9_000)
    # Even 1 001 fen is more than the 1 000 left; 1 000 itself would fit.
    assert builders.confirm(server, hold.hold_id, 1_001).decline_reason == \
        common_pb2.DECLINE_REASON_HOLD_EXPIRED
    assert count(db, "settlement_exceptions") == 1
    assert_ledger_ok(server.database_url)


def test_late_confirm_of_a_confirmed_hold_is_still_refused(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    hold = builders.authorize(server, card, 5_000).hold
    builders.confirm(server, hold.hold_id, 5_000)
    server.advance(60 * MIN)
    assert server.expire_holds() == 0
    expect(lambda: builders.confirm(server, hold.hold_id, 5_000),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_ALREADY_CONFIRMED")
    assert builders.balance(server, card).balance.balance_fen == 5_000


def test_list_holds_filters_expired(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    old = builders.authorize(server, card, 1_000).hold
    server.advance(31 * MIN)
    server.expire_holds()
    young = builders.authorize(server, card, 1_000).hold
    listed = server.accounts.ListHolds(account_pb2.ListHoldsRequest(
        account_id=card.account_id, state=common_pb2.HOLD_STATE_EXPIRED)).holds
    assert [h.hold_id for h in listed] == [old.hold_id]
    every = server.accounts.ListHolds(account_pb2.ListHoldsRequest(
        account_id=card.account_id)).holds
    assert [h.hold_id for h in every] == [young.hold_id, old.hold_id]


class TestCustomTtl:
    @pytest.fixture
    def server_settings(self, tmp_path: Path) -> Settings:
        return make_settings(tmp_path, hold_ttl_s=90)

    def test_custom_ttl_applies(self, server: RunningServer, db: Conn) -> None:
        assert server.settings.hold_ttl_s == 90
        card = builders.open_card(server, balance_fen=10_000)
        hold = builders.authorize(server, card, 6_000).hold
        assert hold.expire_time.ToDatetime(dt.UTC) - hold.create_time.ToDatetime(dt.UTC) == \
            90 * SEC
        server.advance(89 * SEC)
        assert server.expire_holds() == 0
        server.advance(SEC)
        assert server.expire_holds() == 1
        assert _hold(server, hold.hold_id).state == common_pb2.HOLD_STATE_EXPIRED
        assert account_row(db, card.account_id)["held_fen"] == 0
        assert_ledger_ok(server.database_url)


def test_late_settlement_closes_the_exception_recorded_for_it(server: RunningServer,
                                                               db: Conn) -> None:
    card = builders.open_card(server, balance_fen=30_000)
    hold = builders.authorize(server, card, 30_000).hold
    server.advance(dt.timedelta(minutes=31))
    assert server.expire_holds() == 1
    spender = builders.authorize(server, card, 30_000)           # the money goes elsewhere
    assert spender.decision == common_pb2.DECISION_APPROVED
    declined = builders.confirm(server, hold.hold_id, 20_000)
    assert declined.decline_reason == common_pb2.DECLINE_REASON_HOLD_EXPIRED
    open_rows = db.execute("SELECT count(*) FROM fc.settlement_exceptions"
                           " WHERE resolved_at IS NULL").fetchone()
    assert open_rows == (1,)
    builders.recharge(server, card.account_id, 20_000)          # the driver pays in
    settled = builders.confirm(server, hold.hold_id, 20_000)     # the POS resends, new request_id
    assert settled.decision == common_pb2.DECISION_APPROVED
    assert settled.hold.confirmed_late
    open_rows = db.execute("SELECT count(*) FROM fc.settlement_exceptions"
                           " WHERE resolved_at IS NULL").fetchone()
    assert open_rows == (0,)


def test_hold_expiry_and_tier_evaluation_at_once_do_not_deadlock(server: RunningServer,
                                                                 db: Conn) -> None:
    # Expired holds on A and B; P2 and A above the lowest tier, so the tier
    # job visits P2 (its lock) and then A (P1 first): against a hold sweep
    # that holds P1 and waits for A, then wants P2.
    tree = job_races.crossed_families(server, db, cb.ALLOCATED)
    for card in (tree.card_a, tree.card_b):
        builders.authorize(server, card, 30_000)
    server.advance(31 * MIN)
    db.execute("UPDATE fc.accounts SET tier = 2 WHERE id IN (%s, %s)", (tree.p2, tree.a))
    now = server.clock.now()
    results = job_races.jobs_behind_account_lock(
        server.database_url, tree.a,
        ("SELECT fc.expire_holds(p_now => %(now)s, p_limit => 100)", {"now": now}),
        ("SELECT fc.evaluate_tiers(p_now => %(now)s, p_after_id => 0, p_limit => 100) -> 'changed'",
         {"now": now}))
    assert results == [2, 2]
    for card in (tree.card_a, tree.card_b):
        assert builders.balance(server, card).balance.held_fen == 0
    assert_ledger_ok(server.database_url)


def test_a_maintenance_job_that_breaks_does_not_stop_hold_expiry(
        database_url: str, db: Conn, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Found in review: the maintenance loop caught only ApiError, so any
    # other exception from one job (here the tier job, after a bad hotfix
    # left fc.evaluate_tiers answering nothing it can read) ended the loop
    # for good, silently: no hold expired again, customers' money stayed
    # reserved; and stop() re-raised it before closing the pools.
    import logging
    import time

    from fuelcard_server.clock import ManualClock

    from tests.plugins.server import ServerThread
    db.execute("CREATE OR REPLACE FUNCTION fc.evaluate_tiers(p_now timestamptz,"
               " p_after_id bigint, p_limit integer)"
               " RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$")
    settings = make_settings(tmp_path, expiry_interval_s=0.05)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    port = thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            server = RunningServer(f"127.0.0.1:{port}", database_url, clock, settings,
                                   thread.server, thread.loop, channel)
            card = builders.open_card(server, balance_fen=100_000)
            hold = builders.authorize(server, card, 50_000).hold
            # the loop's first round ran the tier job at start
            clock.advance(dt.timedelta(seconds=settings.hold_ttl_s + 60))
            deadline = time.monotonic() + 10
            while server.pos.GetHold(transaction_pb2.GetHoldRequest(
                    hold_id=hold.hold_id)).hold.state != common_pb2.HOLD_STATE_EXPIRED:
                assert time.monotonic() < deadline, "hold expiry stopped with the tier job"
                time.sleep(0.05)
    finally:
        thread.stop()  # raised the job's exception before
    assert any(r.levelno == logging.ERROR and "tier evaluation" in r.getMessage()
               for r in caplog.records)
    assert_ledger_ok(database_url)


def test_a_sweep_another_process_is_doing_is_not_logged_as_released_holds(
        database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Under `serve --workers N` every sweep but one finds the sweep's lock
    # taken and answers -1, which read as true: "released -1 expired holds"
    # at INFO, once a second per worker.
    import asyncio
    import logging
    import time

    import psycopg
    from fuelcard_server.clock import ManualClock
    from fuelcard_server.locks import EXPIRY_SWEEP_LOCK

    from tests.plugins.server import ServerThread
    settings = make_settings(tmp_path, expiry_interval_s=0.02)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    with psycopg.connect(database_url, autocommit=True) as other_worker:
        other_worker.execute("SELECT pg_advisory_lock(%s)", (EXPIRY_SWEEP_LOCK,))
        thread = ServerThread(settings, database_url, clock)
        with caplog.at_level(logging.INFO, logger="fuelcard_server.app"):
            thread.start()
            try:
                skipped = asyncio.run_coroutine_threadsafe(
                    thread.server.expire_holds_once(), thread.loop).result(10)
                assert skipped == -1  # what each round of the loop gets
                time.sleep(0.3)  # some fifteen rounds of the loop, each skipped
            finally:
                thread.stop()
    assert [r.getMessage() for r in caplog.records if "expired holds" in r.getMessage()] == []
