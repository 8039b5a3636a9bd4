"""Retention (retention.py, sql/<n>_retention.sql): idempotency keys and
step-up challenges are deleted once no legitimate retry needs them, in
bounded batches, one process at a time; a replay after that never moves
money twice, and the step-up rate limit still holds."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    funding_pb2,
    points_pb2,
    security_pb2,
    security_pb2_grpc,
    step_up_pb2,
    transaction_pb2,
)
from fuelcard_server import cli
from fuelcard_server.clock import ManualClock
from fuelcard_server.retention import Pruned, Retention
from fuelcard_server.settings import Settings, SettingsError

from tests.plugins.server import RunningServer, ServerThread, make_settings, same_keys
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, expect, scalar

DAY = dt.timedelta(days=1)
WINDOW = dt.timedelta(seconds=Settings().idempotency_retention_s)
UNGUARDED_WINDOW = dt.timedelta(seconds=Settings().idempotency_retention_unguarded_s)
STEP_UP_ABOVE_FEN = 1_000_000
PHONE = "13812345678"
FP = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, metrics_listen="127.0.0.1:0", trace_sample_ratio=0.0,
                         step_up_recharge_above_fen=STEP_UP_ABOVE_FEN)


def prune(server: RunningServer) -> Pruned:
    result: Pruned = server.run(server.server.prune_once)
    return result


def keys(db: Conn, *request_ids: str) -> set[str]:
    """Which of these request_ids still have a key."""
    rows = db.execute("SELECT request_id FROM fc.idempotency_keys WHERE request_id = ANY(%s)",
                      (list(request_ids),)).fetchall()
    return {str(r[0]) for r in rows}


def money(db: Conn, account_id: str) -> tuple[int, int, int]:
    row = account_row(db, account_id)
    return row["balance_fen"], row["held_fen"], row["points_balance"]


def sale(server: RunningServer, card: builders.FundedCard, amount_fen: int
         ) -> tuple[transaction_pb2.AuthorizeRequest, transaction_pb2.AuthorizeResponse,
                    transaction_pb2.ConfirmRequest, transaction_pb2.ConfirmResponse]:
    auth_req = builders.authorize_request(card, amount_fen)
    auth = server.pos.Authorize(auth_req)
    assert auth.decision == common_pb2.DECISION_APPROVED
    confirm_req = transaction_pb2.ConfirmRequest(
        request_id=builders.rid("confirm"), hold_id=auth.hold.hold_id,
        final_amount_fen=amount_fen, volume_ml=1_000, unit_price_fen=785)
    confirmed = server.pos.Confirm(confirm_req)
    assert confirmed.decision == common_pb2.DECISION_APPROVED
    return auth_req, auth, confirm_req, confirmed


def recharge_request(account_id: str, amount_fen: int,
                     step_up: step_up_pb2.StepUp | None = None) -> funding_pb2.RechargeRequest:
    return funding_pb2.RechargeRequest(
        request_id=builders.rid("recharge"), account_id=account_id,
        channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=f"wx-{uuid.uuid4().hex}",
        amount_fen=amount_fen, step_up=step_up)


# --- the window ------------------------------------------------------------------


def test_keys_past_the_window_go_and_younger_ones_stay_and_replay(server: RunningServer,
                                                                   db: Conn) -> None:
    card = builders.open_card(server, balance_fen=80_000)
    old_auth, _, old_confirm, _ = sale(server, card, 10_000)
    old_recharge = recharge_request(card.account_id, 5_000)
    server.funding.Recharge(old_recharge)
    server.advance(WINDOW - dt.timedelta(hours=1))
    young_auth_req, young_auth, young_confirm_req, young_confirm = sale(server, card, 20_000)
    young_recharge = recharge_request(card.account_id, 7_000)
    young_recharged = server.funding.Recharge(young_recharge)
    server.advance(dt.timedelta(hours=2))  # the first ones are now 7 days and 1 hour old
    total = count(db, "idempotency_keys")

    pruned = prune(server)

    old = (old_auth.request_id, old_confirm.request_id, old_recharge.request_id)
    young = (young_auth_req.request_id, young_confirm_req.request_id, young_recharge.request_id)
    assert keys(db, *old) == set()
    assert keys(db, *young) == set(young)
    # the card's own recharge on opening went too; opening and issuing stay (unguarded)
    assert pruned == Pruned(idempotency_keys=4)
    assert count(db, "idempotency_keys") == total - 4
    assert count(db, "idempotency_keys", "operation IN ('open_account', 'issue_card')") == 2

    # Inside the window a replay is answered from its key: nothing moves.
    before = money(db, card.account_id)
    holds = count(db, "holds")
    assert server.pos.Authorize(young_auth_req) == young_auth
    assert server.pos.Confirm(young_confirm_req) == young_confirm
    assert server.funding.Recharge(young_recharge) == young_recharged
    assert money(db, card.account_id) == before
    assert count(db, "holds") == holds
    # A second run finds nothing more.
    assert prune(server) == Pruned()
    assert_ledger_ok(server.database_url)


def test_replays_after_the_window_never_move_money_twice(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=100_000)
    auth_req, auth, confirm_req, _ = sale(server, card, 30_000)
    cancelled = builders.authorize(server, card, 5_000).hold.hold_id
    cancel_req = transaction_pb2.CancelRequest(request_id=builders.rid("cancel"),
                                               hold_id=cancelled)
    server.pos.Cancel(cancel_req)
    recharge_req = recharge_request(card.account_id, 12_000)
    recharged = server.funding.Recharge(recharge_req)
    server.advance(WINDOW + DAY)
    prune(server)
    assert keys(db, auth_req.request_id, confirm_req.request_id, cancel_req.request_id,
                recharge_req.request_id) == set()
    before = money(db, card.account_id)
    assert before == (100_000 - 30_000 + 12_000, 0, 300)
    journal = count(db, "journal")

    # A POS outbox re-sending a stranded confirm or cancel: refused, or nothing to do.
    expect(lambda: server.pos.Confirm(confirm_req), FP, "HOLD_ALREADY_CONFIRMED")
    assert server.pos.Cancel(cancel_req).hold.state == common_pb2.HOLD_STATE_CANCELLED
    # A channel notifying the payment again, under its request_id or a new one:
    # the recharge already credited answers.
    again = server.funding.Recharge(recharge_req)
    assert again.recharge.recharge_id == recharged.recharge.recharge_id
    fresh = funding_pb2.RechargeRequest()
    fresh.CopyFrom(recharge_req)
    fresh.request_id = builders.rid("recharge")
    assert server.funding.Recharge(fresh).recharge.recharge_id == recharged.recharge.recharge_id
    assert money(db, card.account_id) == before
    assert count(db, "journal") == journal

    # An Authorize replayed after its hold was settled makes a new hold, which
    # moves no money: it expires unconfirmed (the POS never had its id).
    second = server.pos.Authorize(auth_req)
    assert second.hold.hold_id != auth.hold.hold_id
    server.advance(dt.timedelta(seconds=server.settings.hold_ttl_s + 1))
    assert server.expire_holds() == 1
    assert money(db, card.account_id) == before
    assert count(db, "journal") == journal
    assert count(db, "journal", "kind = 2") == 1
    assert_ledger_ok(server.database_url)


def test_an_authorize_key_stays_while_its_hold_is_live(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    request = builders.authorize_request(card, 40_000)
    first = server.pos.Authorize(request)
    # The sweeper has not run (it is behind, or stopped): the hold is still
    # AUTHORIZED long after the window.
    server.advance(WINDOW + DAY)
    prune(server)
    assert keys(db, request.request_id) == {request.request_id}
    # So a retry still answers the hold it made; no second hold reserves the money.
    assert server.pos.Authorize(request) == first
    assert count(db, "holds") == 1
    assert money(db, card.account_id) == (50_000, 40_000, 0)
    # Once the hold is released, the key goes.
    assert server.expire_holds() == 1
    assert prune(server).idempotency_keys >= 1
    assert keys(db, request.request_id) == set()


def test_unguarded_operations_keep_their_keys_for_the_longer_window(server: RunningServer,
                                                                    db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    sale(server, card, 30_000)
    redeem = points_pb2.RedeemPointsRequest(request_id=builders.rid("redeem"),
                                            account_id=card.account_id, points=120,
                                            description="mall order")
    first = server.points.RedeemPoints(redeem)
    assert first.points_balance == 180
    server.advance(WINDOW + DAY)
    prune(server)
    # Nothing in the ledger stops a second redemption: only the key does.
    assert keys(db, redeem.request_id) == {redeem.request_id}
    assert server.points.RedeemPoints(redeem) == first
    assert money(db, card.account_id)[2] == 180
    assert count(db, "journal", "kind = 4") == 1
    server.advance(UNGUARDED_WINDOW - WINDOW)
    assert prune(server).idempotency_keys == 3  # the redemption, the opening, the issue
    assert keys(db, redeem.request_id) == set()


def test_forever_keeps_unguarded_keys(server: RunningServer, db: Conn) -> None:
    builders.open_card(server)
    settings = dataclasses.replace(server.settings, idempotency_retention_unguarded_s=0).validate()
    assert server.server._db is not None
    retention = Retention(server.server._db, server.clock, settings)
    server.advance(10 * UNGUARDED_WINDOW)
    server.run(retention.run_once)
    assert count(db, "idempotency_keys", "operation IN ('open_account', 'issue_card')") == 2


# --- batches and concurrency -----------------------------------------------------------


def insert_old_keys(db: Conn, n: int, when: dt.datetime, prefix: str = "old") -> None:
    """n keys of confirms made at `when` (a confirm's key guards nothing the
    hold's state does not)."""
    db.execute(
        "INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response,"
        " created_at) SELECT 'bulk', %s || '-' || i, 'confirm', '\\x00', '{}'::jsonb, %s"
        " FROM generate_series(1, %s) i", (prefix, when, n))


def test_a_run_is_bounded_and_capped(server: RunningServer, db: Conn) -> None:
    settings = dataclasses.replace(server.settings, retention_batch=100,
                                   retention_batches_max=3).validate()
    assert server.server._db is not None
    retention = Retention(server.server._db, server.clock, settings)
    insert_old_keys(db, 450, server.clock.now() - WINDOW - DAY)
    first = server.run(retention.run_once)
    # the challenges' statement found none, then two full batches of keys
    assert first == Pruned(idempotency_keys=200, capped=True)
    second = server.run(retention.run_once)
    assert second == Pruned(idempotency_keys=200, capped=True)
    assert server.run(retention.run_once) == Pruned(idempotency_keys=50)
    assert count(db, "idempotency_keys", "caller = 'bulk'") == 0


@pytest.fixture
def second_server(database_url: str, server: RunningServer) -> Iterator[RunningServer]:
    settings = dataclasses.replace(server.settings, data_dir=server.settings.data_dir / "second",
                                   **same_keys(server.settings))
    thread = ServerThread(settings, database_url, server.clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(f"127.0.0.1:{port}", database_url, server.clock, settings,
                            thread.server, thread.loop, channel)
    finally:
        channel.close()
        thread.stop()


def test_two_servers_pruning_at_once_delete_each_row_once(server: RunningServer,
                                                          second_server: RunningServer,
                                                          db: Conn) -> None:
    n = 6_000
    insert_old_keys(db, n, server.clock.now() - WINDOW - DAY)
    insert_old_keys(db, 50, server.clock.now() - DAY, prefix="young")  # stay
    results: dict[str, list[Pruned]] = {"a": [], "b": []}
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def run(name: str, s: RunningServer) -> None:
        try:
            start.wait()
            for _ in range(40):
                results[name].append(s.run(s.server.prune_once))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=("a", server)),
               threading.Thread(target=run, args=("b", second_server))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    deleted = sum(p.idempotency_keys for runs in results.values() for p in runs)
    assert deleted == n
    assert count(db, "idempotency_keys", "caller = 'bulk' AND request_id LIKE %s",
                 ("young-%",)) == 50
    assert count(db, "idempotency_keys", "caller = 'bulk'") == 50


def test_concurrent_prune_statements_skip_each_others_rows(server: RunningServer,
                                                           db: Conn) -> None:
    """Without the lock (e.g. an operator's prune beside the servers'), two
    statements still delete each row once, without waiting or failing."""
    n = 3_000
    insert_old_keys(db, n, server.clock.now() - WINDOW - DAY)
    cutoff = server.clock.now() - WINDOW
    counts: list[int] = []
    failures: list[BaseException] = []
    start = threading.Barrier(3)

    def run() -> None:
        try:
            with psycopg.connect(server.database_url, autocommit=True) as conn:
                start.wait()
                while True:
                    row = conn.execute(
                        "SELECT fc.prune_idempotency_keys(p_before => %(before)s,"
                        " p_unguarded_before => NULL, p_limit => 200)", {"before": cutoff}).fetchone()
                    assert row is not None
                    counts.append(int(row[0]))
                    if row[0] == 0:
                        return
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    assert sum(counts) == n
    assert count(db, "idempotency_keys", "caller = 'bulk'") == 0


# --- step-up challenges ---------------------------------------------------------------


def challenge(server: RunningServer, subject: str, amount_fen: int) -> str:
    stub = security_pb2_grpc.SecurityServiceStub(server.channel)
    answer = stub.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
        request_id=builders.rid("su"), kind=step_up_pb2.STEP_UP_KIND_RECHARGE,
        subject_id=subject, amount_fen=amount_fen))
    return str(answer.challenge_id)


def code_of(server: RunningServer, challenge_id: str) -> str:
    lines = (server.settings.data_dir / "otp-outbox.jsonl").read_text().splitlines()
    codes = [json.loads(x)["code"] for x in lines if json.loads(x)["challenge_id"] == challenge_id]
    assert len(codes) == 1
    return str(codes[0])


def open_with_phone(server: RunningServer) -> str:
    opened = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="保留测试", phone=PHONE)))
    return str(opened.account.account_id)


def test_the_step_up_rate_limit_holds_across_a_prune(server: RunningServer, db: Conn) -> None:
    subject = open_with_phone(server)
    for _ in range(5):
        challenge(server, subject, 2_000_000)
    # Ten minutes on, the codes have expired (5 min) but the rate limit's
    # window (15 min) still counts them: even a retention set far too short
    # keeps them.
    server.advance(dt.timedelta(minutes=10))
    too_short = dataclasses.replace(server.settings, step_up_retention_s=60)
    assert server.server._db is not None
    retention = Retention(server.server._db, server.clock, too_short)
    assert server.run(retention.run_once).step_up_challenges == 0
    assert prune(server).step_up_challenges == 0
    assert count(db, "step_up_challenges") == 5
    expect(lambda: challenge(server, subject, 2_000_000), FP, "TOO_MANY_STEP_UPS")
    # Past the window the limit lets one through again, and after the
    # retention the old challenges go; the new one stays.
    server.advance(dt.timedelta(minutes=6))
    challenge(server, subject, 2_000_000)
    server.advance(dt.timedelta(seconds=server.settings.step_up_retention_s)
                   - dt.timedelta(minutes=1))
    assert prune(server).step_up_challenges == 5
    assert count(db, "step_up_challenges") == 1
    for _ in range(5):
        challenge(server, subject, 2_000_000)
    expect(lambda: challenge(server, subject, 2_000_000), FP, "TOO_MANY_STEP_UPS")


def test_a_stepped_up_recharge_replayed_after_key_and_challenge_are_gone_credits_once(
        server: RunningServer, db: Conn) -> None:
    account = open_with_phone(server)
    challenge_id = challenge(server, account, 2_000_000)
    request = recharge_request(account, 2_000_000, step_up_pb2.StepUp(
        challenge_id=challenge_id, code=code_of(server, challenge_id)))
    first = server.funding.Recharge(request)
    assert first.balance_fen == 2_000_000
    server.advance(dt.timedelta(hours=2))
    assert server.funding.Recharge(request) == first  # inside the window: the key answers
    server.advance(WINDOW + DAY)
    pruned = prune(server)
    assert (pruned.step_up_challenges, keys(db, request.request_id)) == (1, set())
    # The channel's notice again: the payment is booked (one recharge per
    # channel transaction), so it needs no code and gets the original answer.
    again = server.funding.Recharge(request)
    assert again.recharge.recharge_id == first.recharge.recharge_id
    assert again.balance_fen == 2_000_000
    assert account_row(db, account)["balance_fen"] == 2_000_000
    assert count(db, "recharges", "channel_txn_id = %s", (request.channel_txn_id,)) == 1
    # A new payment of that size still needs a fresh code: the used one is gone.
    expect(lambda: server.funding.Recharge(recharge_request(account, 2_000_000, request.step_up)),
           grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert account_row(db, account)["balance_fen"] == 2_000_000
    assert_ledger_ok(server.database_url)


# --- metrics, settings, the command ---------------------------------------------------------


def test_rows_deleted_are_counted_by_table(server: RunningServer, db: Conn) -> None:
    subject = open_with_phone(server)
    challenge(server, subject, 2_000_000)
    insert_old_keys(db, 7, server.clock.now())
    server.advance(WINDOW + DAY)
    assert prune(server) == Pruned(idempotency_keys=7, step_up_challenges=1)
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'fuelcard_retention_deleted_total{table="idempotency_keys"} 7' in text
    assert 'fuelcard_retention_deleted_total{table="step_up_challenges"} 1' in text


@pytest.mark.parametrize(("name", "value"), [
    ("idempotency_retention_s", "3600"),            # shorter than a day of channel retries
    ("idempotency_retention_unguarded_s", "86400"),  # shorter than the guarded window
    ("step_up_retention_s", "60"),
    ("retention_batch", "0"),
    ("retention_batches_max", "0"),
])
def test_retention_settings_are_checked_at_start(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({f"FUELCARD_{name.upper()}": value}).validate()


def test_retention_settings_come_from_the_environment() -> None:
    s = Settings.from_env({"FUELCARD_IDEMPOTENCY_RETENTION_S": str(14 * 86400),
                           "FUELCARD_IDEMPOTENCY_RETENTION_UNGUARDED_S": "0"}).validate()
    assert (s.idempotency_retention_s, s.idempotency_retention_unguarded_s) == (14 * 86400, 0)


def test_fuelcard_prune_deletes_what_is_due_now(database_url: str, db: Conn, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    now = dt.datetime.now(dt.UTC)
    insert_old_keys(db, 30, now - WINDOW - DAY)
    db.execute("INSERT INTO fc.idempotency_keys VALUES ('bulk', 'recent', 'confirm', '\\x00',"
               " '{}', %s)", (now - DAY,))
    monkeypatch.setenv("FUELCARD_RETENTION_BATCH", "7")
    monkeypatch.setenv("FUELCARD_RETENTION_BATCHES_MAX", "2")
    assert cli.main(["prune", "--database-url", database_url, "--data-dir", str(tmp_path)]) == 0
    assert "deleted 30 idempotency keys and 0 step-up challenges" in capsys.readouterr().out
    assert scalar(db, "SELECT array_agg(request_id) FROM fc.idempotency_keys"
                      " WHERE caller = 'bulk'") == ["recent"]


def test_the_clock_is_the_servers(server: RunningServer) -> None:
    """Cut-offs follow the injected clock, not the wall clock."""
    assert server.server._retention is not None
    guarded, unguarded, step_ups = server.server._retention.cutoffs()
    now = server.clock.now()
    assert guarded == now - WINDOW and unguarded == now - UNGUARDED_WINDOW
    assert step_ups == now - dt.timedelta(seconds=server.settings.step_up_retention_s)
    assert isinstance(server.clock, ManualClock)


def test_the_servers_maintenance_loop_prunes_by_itself(database_url: str, db: Conn,
                                                       tmp_path: Path) -> None:
    settings = make_settings(tmp_path, expiry_interval_s=0.05, retention_interval_s=0.05,
                             retention_batch=100)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    insert_old_keys(db, 250, clock.now() - WINDOW - DAY)
    insert_old_keys(db, 5, clock.now() - DAY, prefix="young")
    thread = ServerThread(settings, database_url, clock)
    thread.start()
    try:
        # The loop runs on the event loop's timer; what it deletes is decided
        # by the injected clock. Bounded wait for it to come round.
        deadline = time.monotonic() + 30
        while count(db, "idempotency_keys", "caller = 'bulk'") > 5:
            assert time.monotonic() < deadline, "the maintenance loop never pruned"
            time.sleep(0.05)
        assert count(db, "idempotency_keys", "request_id LIKE %s", ("young-%",)) == 5
    finally:
        thread.stop()


def test_a_failing_prune_never_keeps_expired_holds_reserved(database_url: str, db: Conn,
                                                            tmp_path: Path) -> None:
    """The maintenance jobs share one loop: a retention run that fails every
    time (here its function is gone) must not stop the hold sweep, or the
    customers' money would stay reserved."""
    settings = make_settings(tmp_path, expiry_interval_s=0.05, retention_interval_s=0.05)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    insert_old_keys(db, 10, clock.now() - WINDOW - DAY)
    db.execute("ALTER FUNCTION fc.prune_idempotency_keys RENAME TO prune_idempotency_keys_gone")
    thread = ServerThread(settings, database_url, clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        server = RunningServer(f"127.0.0.1:{port}", database_url, clock, settings, thread.server,
                               thread.loop, channel)
        card = builders.open_card(server, 50_000)
        assert builders.authorize(server, card, 20_000).decision == common_pb2.DECISION_APPROVED
        assert builders.balance(server, card).balance.available_fen == 30_000
        clock.advance(dt.timedelta(seconds=settings.hold_ttl_s + 1))
        deadline = time.monotonic() + 30
        while builders.balance(server, card).balance.available_fen != 50_000:
            assert time.monotonic() < deadline, "the hold sweep stopped behind a failing prune"
            time.sleep(0.05)
        assert count(db, "idempotency_keys", "caller = 'bulk'") == 10, "the prune did fail"
    finally:
        channel.close()
        thread.stop()
