"""The POS client library and the `fuelcard-pos` command, against the real
server and a real PostgreSQL. Bad links are played by a TCP proxy between the
client and the server (tests/plugins/proxy.py), never by mocks.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from fuelcard.v1 import common_pb2, transaction_pb2

# Submodules, not the package: an editable install made before
# fuelcard_pos/__init__.py existed sees the package as a namespace.
from fuelcard_pos.client import (
    PosClient,
    PosError,
    PosPending,
    RetryEvent,
    RetryPolicy,
    mask_card_number,
)
from fuelcard_pos.outbox import Outbox, OutboxFull
from fuelcard_server import verify
from fuelcard_server.settings import Settings
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.plugins.proxy import TcpProxy
from tests.plugins.server import RunningServer, make_settings
from tests.support import builders

Db = psycopg.Connection[tuple[Any, ...]]

# Quick retries, so that the tests spend their time on the link, not waiting.
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2, total_timeout_s=5.0)
# Enough to outlast the channel's reconnect backoff after the link returns.
RECOVER = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.5,
                      total_timeout_s=8.0)
STATION, TERMINAL = "KM-001", "KM-001-T1"
FUELCARD_POS = Path(sys.executable).parent / "fuelcard-pos"


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    # A small pool that gives up quickly, so one test can make the server
    # answer DATABASE_BUSY (with a RetryInfo) by blocking its two connections.
    return make_settings(tmp_path, pool_min=2, pool_max=2, pool_timeout_s=0.5)


@pytest.fixture
def proxy(server: RunningServer) -> Iterator[TcpProxy]:
    with TcpProxy(server.target) as p:
        yield p


def holds_of(db: Db, card: builders.FundedCard) -> list[tuple[str, int, int]]:
    rows = db.execute(
        "SELECT h.uid::text, h.amount_fen, h.state FROM fc.holds h"
        " JOIN fc.accounts a ON a.id = h.account_id WHERE a.uid = %s ORDER BY h.id",
        (card.account_id,)).fetchall()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def sales_of(db: Db, card: builders.FundedCard) -> list[int]:
    """Money journal entries of kind purchase debiting the card's account."""
    rows = db.execute(
        "SELECT j.amount FROM fc.journal j JOIN fc.accounts a ON a.id = j.debit_account_id"
        " WHERE a.uid = %s AND j.kind = 2 AND j.asset = 1 ORDER BY j.id",
        (card.account_id,)).fetchall()
    return [int(r[0]) for r in rows]


def keys_for(db: Db, operation: str) -> list[str]:
    rows = db.execute("SELECT request_id FROM fc.idempotency_keys WHERE operation = %s"
                      " ORDER BY created_at, request_id", (operation,)).fetchall()
    return [str(r[0]) for r in rows]


# -- the library ---------------------------------------------------------------

def test_pump_cycle_through_pos_client(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    with PosClient(server.target, retry=FAST) as pos:
        auth = pos.authorize(card.card_number, 30_000, STATION, TERMINAL, 3,
                             common_pb2.PRODUCT_GASOLINE_95)
        assert auth.decision == common_pb2.DECISION_APPROVED
        assert auth.available_fen == 20_000
        assert auth.hold.state == common_pb2.HOLD_STATE_AUTHORIZED
        assert auth.hold.masked_card_number == mask_card_number(card.card_number)
        assert (auth.hold.station_id, auth.hold.nozzle, auth.hold.product) == (
            STATION, 3, common_pb2.PRODUCT_GASOLINE_95)
        assert pos.get_hold(auth.hold.hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED

        done = pos.confirm(auth.hold.hold_id, 25_150, volume_ml=32_038, unit_price_fen=785)
        assert done.decision == common_pb2.DECISION_APPROVED
        assert done.hold.state == common_pb2.HOLD_STATE_CONFIRMED
        assert (done.hold.settled_fen, done.points_earned, done.balance_fen) == (25_150, 251, 24_850)
        assert (done.hold.volume_ml, done.hold.unit_price_fen) == (32_038, 785)

        second = pos.authorize(card.card_number, 10_000, STATION, TERMINAL)
        assert second.decision == common_pb2.DECISION_APPROVED
        assert pos.balance(card.card_number).balance.held_fen == 10_000
        cancelled = pos.cancel(second.hold.hold_id)
        assert cancelled.hold.state == common_pb2.HOLD_STATE_CANCELLED

        declined = pos.authorize(card.card_number, 30_000, STATION, TERMINAL)
        assert declined.decision == common_pb2.DECISION_DECLINED
        assert declined.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
        assert not declined.HasField("hold")

        bal = pos.balance(card.card_number)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.balance.available_fen,
            bal.points_balance) == (24_850, 0, 24_850, 251)
    assert bal.masked_card_number == mask_card_number(card.card_number)
    assert verify.run(server.database_url) == []


def test_a_timed_out_attempt_is_retried_with_the_same_request_id(
        server: RunningServer, proxy: TcpProxy, db: Db) -> None:
    """The server does the work but its answer is lost: the retry must carry
    the same request_id, so the hold (and then the sale) happen once."""
    card = builders.open_card(server, balance_fen=50_000)
    events: list[RetryEvent] = []

    def let_the_answer_through(event: RetryEvent) -> None:
        events.append(event)
        # the first attempt did reach the server, which answered into the hang
        assert proxy.answer_held.wait(5)
        proxy.resume()

    with PosClient(proxy.target, deadline_s=0.5, retry=FAST, on_retry=let_the_answer_through) as pos:
        pos.balance(card.card_number)  # connect through the proxy first
        proxy.hang()
        auth = pos.authorize(card.card_number, 12_000, STATION, TERMINAL)
        assert auth.decision == common_pb2.DECISION_APPROVED
        assert [(e.method, e.attempt, e.code) for e in events] == [
            ("Authorize", 1, grpc.StatusCode.DEADLINE_EXCEEDED)]
        authorize_rid = events[0].request_id
        assert authorize_rid

        proxy.answer_held.clear()
        proxy.hang()
        done = pos.confirm(auth.hold.hold_id, 9_900, volume_ml=12_611, unit_price_fen=785)
        assert done.decision == common_pb2.DECISION_APPROVED
        assert [(e.method, e.code) for e in events[1:]] == [
            ("Confirm", grpc.StatusCode.DEADLINE_EXCEEDED)]
        confirm_rid = events[1].request_id

    # one hold, one sale, one key each: the retries were replays
    assert holds_of(db, card) == [(auth.hold.hold_id, 12_000, common_pb2.HOLD_STATE_CONFIRMED)]
    assert sales_of(db, card) == [9_900]
    assert keys_for(db, "authorize") == [authorize_rid]
    assert keys_for(db, "confirm") == [confirm_rid]
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (40_100, 0, 99)
    assert verify.run(server.database_url) == []


def test_answers_are_not_retried(server: RunningServer, tmp_path: Path) -> None:
    """FAILED_PRECONDITION, INVALID_ARGUMENT and NOT_FOUND are answers: one
    attempt, a typed error, and nothing queued in the outbox."""
    card = builders.open_card(server, balance_fen=50_000)
    events: list[RetryEvent] = []
    with Outbox(tmp_path / "outbox.sqlite3") as outbox, \
            PosClient(server.target, retry=FAST, outbox=outbox, on_retry=events.append) as pos:
        auth = pos.authorize(card.card_number, 5_000, STATION, TERMINAL)
        pos.cancel(auth.hold.hold_id)
        with pytest.raises(PosError) as cancelled:
            pos.confirm(auth.hold.hold_id, 4_000)
        assert cancelled.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert cancelled.value.reason == "HOLD_CANCELLED"
        assert cancelled.value.domain == "fuelcard.v1"
        assert (cancelled.value.attempts, cancelled.value.retryable) == (1, False)

        pos.authorize(card.card_number, 1_000, STATION, TERMINAL, request_id="pos-test-reuse-1")
        with pytest.raises(PosError) as reused:
            pos.authorize(card.card_number, 2_000, STATION, TERMINAL, request_id="pos-test-reuse-1")
        assert (reused.value.code, reused.value.reason, reused.value.attempts) == (
            grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED", 1)

        with pytest.raises(PosError) as invalid:
            pos.authorize(card.card_number, 0, "", TERMINAL)
        assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in invalid.value.field_violations} == {"amount_fen", "station_id"}
        assert invalid.value.attempts == 1
        assert card.card_number not in str(invalid.value)

        # A few fen over the hold is a pump overrun, booked (test_overruns.py); past the
        # tolerance (the larger of 1 000 fen and 5 % of the hold) it is refused.
        with pytest.raises(PosError) as too_much:
            pos.confirm(pos.authorize(card.card_number, 1_000, STATION, TERMINAL).hold.hold_id,
                        2_001)
        assert (too_much.value.code, too_much.value.reason, too_much.value.attempts) == (
            grpc.StatusCode.FAILED_PRECONDITION, "OVERRUN_ABOVE_TOLERANCE", 1)

        with pytest.raises(PosError) as missing:
            pos.get_hold(str(uuid.uuid4()))
        assert (missing.value.code, missing.value.reason, missing.value.attempts) == (
            grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND", 1)
        assert len(outbox) == 0
    assert events == []


def test_retry_info_from_a_busy_server_is_honoured(server: RunningServer, db: Db) -> None:
    """Both pool connections wait on a lock the test holds, so the server
    answers UNAVAILABLE with RetryInfo(200 ms); the client waits
    at least that long (its own backoff is 10-20 ms) and the retry succeeds."""
    locked = builders.open_card(server, balance_fen=10_000)
    other = builders.open_card(server, balance_fen=7_000)
    (account_id,) = db.execute("SELECT id FROM fc.accounts WHERE uid = %s",
                               (locked.account_id,)).fetchone() or (None,)
    db.execute("SELECT pg_advisory_lock(%s)", (account_id,))
    events: list[RetryEvent] = []
    slept: list[float] = []

    def release(event: RetryEvent) -> None:
        events.append(event)
        db.execute("SELECT pg_advisory_unlock(%s)", (account_id,))

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02,
                         total_timeout_s=5.0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        blocked = [pool.submit(builders.authorize, server, locked, 1_000) for _ in range(2)]
        deadline = time.monotonic() + 10
        while db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                         " AND NOT granted").fetchone() != (2,):
            assert time.monotonic() < deadline, "the authorizations never queued on the lock"
            time.sleep(0.02)
        with PosClient(server.target, deadline_s=3.0, retry=policy, on_retry=release,
                       sleep=sleep) as pos:
            bal = pos.balance(other.card_number)
        assert [r.result().decision for r in blocked] == [common_pb2.DECISION_APPROVED] * 2
    assert bal.balance.balance_fen == 7_000
    assert [e.code for e in events] == [grpc.StatusCode.UNAVAILABLE]
    assert events[0].reason == "DATABASE_BUSY"
    assert slept == [events[0].delay_s]
    assert slept[0] >= 0.2


def test_error_details_and_backoff() -> None:
    """PosError reads ErrorInfo, BadRequest and RetryInfo out of a status, and
    the backoff grows, jitters within bounds, and never undercuts RetryInfo."""
    status = status_pb2.Status(code=3, message="invalid request: amount_fen")
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(1_500)
    for detail in (
        error_details_pb2.ErrorInfo(reason="AMOUNT_NOT_POSITIVE", domain="fuelcard.v1"),
        error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(
            field="amount_fen", description="must be positive", reason="AMOUNT_NOT_POSITIVE")]),
        retry,
    ):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    error = PosError.from_status(grpc.StatusCode.INVALID_ARGUMENT, status.message, status,
                                 method="Authorize", request_id="r-1", attempts=1)
    assert (error.reason, error.domain, error.retry_delay_s) == (
        "AMOUNT_NOT_POSITIVE", "fuelcard.v1", 1.5)
    assert [(v.field, v.reason) for v in error.field_violations] == [
        ("amount_fen", "AMOUNT_NOT_POSITIVE")]
    assert not error.retryable
    assert "amount_fen: must be positive" in str(error)

    rng = random.Random(7)
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.8, multiplier=2.0)
    for failed, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (9, 0.8)]:
        delays = [policy.backoff_s(failed, rng) for _ in range(50)]
        assert all(base / 2 <= d <= base for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert policy.backoff_s(1, rng, server_delay_s=1.5) == 1.5
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


# -- the outbox ----------------------------------------------------------------

def test_outbox_keeps_a_confirm_while_the_link_is_down_and_delivers_it_once(
        server: RunningServer, proxy: TcpProxy, db: Db, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    path = tmp_path / "pos" / "outbox.sqlite3"
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1,
                         total_timeout_s=3.0)
    with Outbox(path) as outbox, PosClient(proxy.target, deadline_s=0.5, retry=policy,
                                           outbox=outbox) as pos:
        auth = pos.authorize(card.card_number, 30_000, STATION, TERMINAL)
        proxy.down()
        with pytest.raises(PosPending) as caught:
            pos.confirm(auth.hold.hold_id, 25_150, volume_ml=32_038, unit_price_fen=785)
        pending = caught.value
        assert pending.cause.code == grpc.StatusCode.UNAVAILABLE
        assert pending.cause.attempts == 3
        [entry] = outbox.pending()
        assert (entry.operation, entry.request_id, entry.hold_id) == (
            "confirm", pending.request_id, auth.hold.hold_id)
        queued = entry.request
        assert isinstance(queued, transaction_pb2.ConfirmRequest)
        assert (queued.request_id, queued.final_amount_fen, queued.volume_ml) == (
            pending.request_id, 25_150, 32_038)

        # nothing reached the server
        bal = builders.balance(server, card)
        assert (bal.balance.balance_fen, bal.balance.held_fen) == (50_000, 30_000)

        # still down: the flush keeps the entry
        report = pos.flush_outbox()
        assert report.delivered == [] and report.remaining == 1
        assert report.stopped_by is not None
        assert report.stopped_by.code == grpc.StatusCode.UNAVAILABLE
        assert proxy.refused > 0

    # the POS restarts; the outbox is a file, the sale is still there
    proxy.up()
    with Outbox(path) as outbox, PosClient(proxy.target, retry=FAST, outbox=outbox) as pos:
        assert [e.request_id for e in outbox.pending()] == [pending.request_id]
        assert outbox.pending()[0].attempts == 1
        report = outbox.flush(pos)
        assert report.complete
        [delivered] = report.delivered
        assert delivered.entry.request_id == pending.request_id
        assert isinstance(delivered.response, transaction_pb2.ConfirmResponse)
        assert delivered.response.decision == common_pb2.DECISION_APPROVED
        assert delivered.response.balance_fen == 24_850
        assert len(outbox) == 0
        assert outbox.flush(pos).delivered == []

    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (24_850, 0, 251)
    assert sales_of(db, card) == [25_150]
    assert keys_for(db, "confirm") == [pending.request_id]
    assert verify.run(server.database_url) == []


def test_outbox_resend_of_an_unanswered_confirm_is_a_replay(
        server: RunningServer, proxy: TcpProxy, db: Db, tmp_path: Path) -> None:
    """The confirm reached the server and was applied, but every answer was
    lost: the outbox resends it with the same request_id and the server
    answers from its record; the money moves once."""
    card = builders.open_card(server, balance_fen=50_000)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1,
                         total_timeout_s=3.0)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox, \
            PosClient(proxy.target, deadline_s=0.4, retry=policy, outbox=outbox) as pos:
        auth = pos.authorize(card.card_number, 30_000, STATION, TERMINAL)
        proxy.hang()
        with pytest.raises(PosPending) as caught:
            pos.confirm(auth.hold.hold_id, 20_000, volume_ml=25_477, unit_price_fen=785)
        assert caught.value.cause.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert proxy.answer_held.is_set()
        assert builders.balance(server, card).balance.balance_fen == 30_000  # applied already

        proxy.resume()
        report = outbox.flush(pos)
        [delivered] = report.delivered
        assert isinstance(delivered.response, transaction_pb2.ConfirmResponse)
        assert (delivered.response.decision, delivered.response.balance_fen) == (
            common_pb2.DECISION_APPROVED, 30_000)
        assert report.complete and len(outbox) == 0
    assert sales_of(db, card) == [20_000]
    assert keys_for(db, "confirm") == [caught.value.request_id]
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (30_000, 0, 200)


def test_outbox_flushes_in_order_and_keeps_definitive_failures_for_the_operator(
        server: RunningServer, proxy: TcpProxy, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1,
                         total_timeout_s=3.0)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox, \
            PosClient(proxy.target, deadline_s=0.5, retry=policy, outbox=outbox) as pos:
        first = pos.authorize(card.card_number, 10_000, STATION, TERMINAL).hold.hold_id
        second = pos.authorize(card.card_number, 10_000, STATION, TERMINAL).hold.hold_id
        proxy.down()
        with pytest.raises(PosPending):
            pos.cancel(first)
        with pytest.raises(PosPending):
            pos.confirm(second, 8_000)
        assert [(e.operation, e.hold_id) for e in outbox.pending()] == [
            ("cancel", first), ("confirm", second)]
        # meanwhile the first hold was settled by another path
        builders.confirm(server, first, 6_000)
        proxy.up()

        # the channel reconnects on its own backoff (up to 1 s): allow for it
        pos.retry = RECOVER
        report = outbox.flush(pos)
        [(failed, error)] = report.failed
        assert (failed.operation, failed.hold_id, failed.state) == ("cancel", first, "failed")
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                              "HOLD_ALREADY_CONFIRMED")
        assert [d.entry.hold_id for d in report.delivered] == [second]
        assert report.remaining == 0 and not report.complete
        [kept] = outbox.failed()
        assert (kept.hold_id, kept.error_code, kept.error_reason) == (
            first, "FAILED_PRECONDITION", "HOLD_ALREADY_CONFIRMED")
        # failed entries are not resent; the operator discards them when done
        again = outbox.flush(pos)
        assert (again.delivered, again.failed) == ([], [])
        assert outbox.discard(kept.id) and len(outbox) == 0
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen) == (36_000, 0)


def test_outbox_is_bounded(server: RunningServer, proxy: TcpProxy, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1,
                         total_timeout_s=3.0)
    with Outbox(tmp_path / "outbox.sqlite3", max_entries=2) as outbox, \
            PosClient(proxy.target, deadline_s=0.5, retry=policy, outbox=outbox) as pos:
        holds = [pos.authorize(card.card_number, 1_000, STATION, TERMINAL).hold.hold_id
                 for _ in range(3)]
        proxy.down()
        with pytest.raises(PosPending) as first:
            pos.cancel(holds[0])
        with pytest.raises(PosPending):
            pos.cancel(holds[1])
        # enqueuing the same request again is a no-op, not a new entry
        assert outbox.enqueue(outbox.pending()[0].request) == first.value.outbox_entry_id
        with pytest.raises(OutboxFull):
            outbox.enqueue(transaction_pb2.CancelRequest(request_id="x-1", hold_id=holds[2]))
        # full: the caller gets the error, not a false "pending"
        with pytest.raises(PosError) as refused:
            pos.cancel(holds[2])
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert isinstance(refused.value.__cause__, OutboxFull)
        assert len(outbox) == 2


# -- the command line ------------------------------------------------------------

class Cli:
    def __init__(self, target: str, tmp_path: Path, secrets: list[str]) -> None:
        self.target = target
        self.secrets = secrets
        self.env = {k: v for k, v in os.environ.items() if k != "FUELCARD_TARGET"}
        self.env["FUELCARD_POS_OUTBOX"] = str(tmp_path / "cli-outbox.sqlite3")

    def run(self, *args: str, target: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(FUELCARD_POS), "--target", target or self.target, *args],
                              capture_output=True, text=True, timeout=60, env=self.env,
                              check=False)
        for secret in self.secrets:
            assert secret not in done.stdout and secret not in done.stderr, "card number leaked"
        return done

    def json(self, *args: str, expect: int, target: str | None = None) -> dict[str, Any]:
        done = self.run("--json", *args, target=target)
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        obj: dict[str, Any] = json.loads(done.stdout)
        return obj


def test_cli_pump_cycle_json_exit_codes_and_masking(server: RunningServer, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    cli = Cli(server.target, tmp_path, [card.card_number])
    masked = mask_card_number(card.card_number)

    auth = cli.json("authorize", card.card_number, "30000", "--station", STATION,
                    "--terminal", TERMINAL, "--nozzle", "2", "--product", "95", expect=0)
    assert auth["decision"] == "DECISION_APPROVED"
    assert auth["available_fen"] == 20_000
    hold = auth["hold"]
    assert (hold["masked_card_number"], hold["amount_fen"], hold["nozzle"], hold["product"]) == (
        masked, 30_000, 2, "PRODUCT_GASOLINE_95")
    hold_id = hold["hold_id"]

    declined = cli.json("authorize", card.card_number, "40000", "--station", STATION,
                        "--terminal", TERMINAL, expect=1)
    assert (declined["decision"], declined["decline_reason"]) == (
        "DECISION_DECLINED", "DECLINE_REASON_INSUFFICIENT_FUNDS")
    assert "hold" not in declined

    human = cli.run("authorize", card.card_number, "40000", "--station", STATION,
                    "--terminal", TERMINAL)
    assert human.returncode == 1
    assert "DECLINED" in human.stdout and "INSUFFICIENT_FUNDS" in human.stdout
    assert masked in human.stdout

    assert cli.json("hold", hold_id, expect=0)["state"] == "HOLD_STATE_AUTHORIZED"
    done = cli.json("confirm", hold_id, "25150", "--volume-ml", "32038", "--unit-price-fen", "785",
                    expect=0)
    assert (done["decision"], done["points_earned"], done["balance_fen"]) == (
        "DECISION_APPROVED", 251, 24_850)
    assert done["hold"]["state"] == "HOLD_STATE_CONFIRMED"

    again = cli.json("cancel", hold_id, expect=3)
    assert (again["error"]["code"], again["error"]["reason"]) == (
        "FAILED_PRECONDITION", "HOLD_ALREADY_CONFIRMED")

    bal = cli.json("balance", card.card_number, expect=0)
    assert bal["balance"] == {"balance_fen": 24_850, "held_fen": 0, "available_fen": 24_850,
                              "currency_code": "CNY"}
    assert (bal["masked_card_number"], bal["points_balance"]) == (masked, 251)
    human = cli.run("balance", card.card_number)
    assert human.returncode == 0
    assert masked in human.stdout and "248.50 CNY" in human.stdout

    bad = cli.json("authorize", card.card_number, "0", "--station", STATION,
                   "--terminal", TERMINAL, expect=2)
    assert bad["error"]["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in bad["error"]["field_violations"]] == ["amount_fen"]

    # a mistyped number (bad check digit) is refused and still never echoed
    typo = card.card_number[:-1] + str((int(card.card_number[-1]) + 1) % 10)
    cli.secrets.append(typo)
    bad_card = cli.run("balance", typo)
    assert bad_card.returncode == 2
    assert "card_number" in bad_card.stderr

    missing = cli.json("hold", str(uuid.uuid4()), expect=3)
    assert missing["error"]["reason"] == "HOLD_NOT_FOUND"

    usage = cli.run("authorize", card.card_number, "100", "--terminal", TERMINAL,
                    "stray", card.card_number)
    assert usage.returncode == 2 and "--station" in usage.stderr


def test_cli_confirm_waits_in_the_outbox_until_the_link_returns(
        server: RunningServer, proxy: TcpProxy, db: Db, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold_id = builders.authorize(server, card, 30_000).hold.hold_id
    cli = Cli(proxy.target, tmp_path, [card.card_number])
    proxy.down()
    pending = cli.json("--max-attempts", "2", "confirm", hold_id, "25150",
                       "--volume-ml", "32038", "--unit-price-fen", "785", expect=4)
    assert pending["pending"] is True and pending["hold_id"] == hold_id
    assert pending["error"]["code"] == "UNAVAILABLE"
    assert builders.balance(server, card).balance.balance_fen == 50_000

    proxy.up()
    outbox = cli.env["FUELCARD_POS_OUTBOX"]
    flushed = cli.json("outbox-flush", "--outbox", outbox, expect=0)
    [delivered] = flushed["delivered"]
    assert (delivered["request_id"], delivered["hold_id"]) == (pending["request_id"], hold_id)
    assert delivered["response"]["decision"] == "DECISION_APPROVED"
    assert (flushed["remaining"], flushed["failed"]) == (0, [])
    assert cli.json("outbox-flush", expect=0)["delivered"] == []

    assert sales_of(db, card) == [25_150]
    assert keys_for(db, "confirm") == [pending["request_id"]]
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen) == (24_850, 0)
