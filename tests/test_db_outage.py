"""The database goes away and comes back, for real: a PostgreSQL of this
module's own (the embedded binaries), stopped and started under the server.

While it is down the server says NOT_SERVING for every service and answers
UNAVAILABLE at once; when it returns the server recovers by itself; a crash
in the middle of a pump-cycle load leaves nothing half-applied: `fuelcard
verify` is green and every account holds exactly what the POS clients were
told (confirms they could not deliver went to their outboxes and were
delivered once afterwards).
"""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import common_pb2
from fuelcard_pos.client import PosClient, PosError, PosPending, RetryPolicy
from fuelcard_pos.outbox import Outbox
from fuelcard_server import migrations
from fuelcard_server.clock import ManualClock
from fuelcard_server.embedded import EmbeddedPostgres
from fuelcard_server.health import SERVICE_NAMES
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.plugins.database import control_postgres, postgres_running
from tests.plugins.proxy import TcpProxy
from tests.plugins.server import TEST_KEY_HEX, RunningServer, ServerThread, cluster_keys, make_settings
from tests.support import builders

FUELCARD = str(Path(sys.executable).parent / "fuelcard")
STATION, TERMINAL = "KM-001", "KM-001-T1"
START_FEN = 1_000_000


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    # Outside pytest's base temp directory: the PostgreSQL user must reach it
    # (pytest keeps that one private to us).
    with tempfile.TemporaryDirectory(prefix="fuelcard-outage-") as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        control_postgres(pg, "start")
        try:
            migrations.migrate(pg.url())
            yield pg
        finally:
            control_postgres(pg, "stop", "immediate")


@pytest.fixture
def outage_server(own_pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[RunningServer]:
    if not postgres_running(own_pg):
        control_postgres(own_pg, "start")
    settings = make_settings(tmp_path, pool_min=4, pool_max=8, pool_timeout_s=1.0,
                             connect_timeout_s=1.0, health_interval_s=0.2,
                             **cluster_keys(own_pg.data_dir / "server-keys"))
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    url = own_pg.url()
    thread = ServerThread(settings, url, clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(f"127.0.0.1:{port}", url, clock, settings, thread.server,
                            thread.loop, channel)
    finally:
        channel.close()
        thread.stop()
        if not postgres_running(own_pg):
            control_postgres(own_pg, "start")


def _health(channel: grpc.Channel) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in ("", *SERVICE_NAMES)}


def _wait_health(channel: grpc.Channel, status: int, timeout_s: float) -> float:
    started = time.monotonic()
    while set(_health(channel).values()) != {status}:
        assert time.monotonic() - started < timeout_s, _health(channel)
        time.sleep(0.05)
    return time.monotonic() - started


def test_health_flips_when_the_database_stops_and_calls_fail_fast(
        outage_server: RunningServer, own_pg: EmbeddedPostgres) -> None:
    server = outage_server
    card = builders.open_card(server, balance_fen=50_000)
    assert set(_health(server.channel).values()) == {health_pb2.HealthCheckResponse.SERVING}
    control_postgres(own_pg, "stop", "fast")
    _wait_health(server.channel, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            server.pos.Authorize(builders.authorize_request(card, 1_000), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 0.5, "a call must not wait for a database that is gone"
    control_postgres(own_pg, "start")
    _wait_health(server.channel, health_pb2.HealthCheckResponse.SERVING, 20)
    answer = builders.authorize(server, card, 1_000)
    assert answer.decision == common_pb2.DECISION_APPROVED



def test_payments_resume_when_the_database_returns_though_pooled_links_went_silent(
        database_url: str, tmp_path: Path) -> None:
    # The server reaches the database through a link we can silence: every
    # connection open at that moment goes quiet for good (a host gone behind
    # a moved address), new ones work. The probe's own link times out: down;
    # the next probe connects: up. Before, the recovery asked each pooled
    # connection with pool.check(), which waited for ever on a silent one,
    # and payments stayed refused although the database answered.
    port = psycopg.conninfo.conninfo_to_dict(database_url).get("port") or 5432
    with TcpProxy(f"127.0.0.1:{port}") as link:
        proxied = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1",
                                                 port=link.target.rpartition(":")[2])
        settings = make_settings(tmp_path, health_interval_s=0.2, connect_timeout_s=1.0,
                                 pool_min=2, pool_max=2, read_pool_max=1)
        clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
        thread = ServerThread(settings, proxied, clock)
        server_port = thread.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server_port}") as channel:
                server = RunningServer(f"127.0.0.1:{server_port}", proxied, clock, settings,
                                       thread.server, thread.loop, channel)
                card = builders.open_card(server, balance_fen=100_000)
                builders.authorize(server, card, 1_000)
                db = thread.server._db
                assert db is not None
                link.blackhole()
                deadline = time.monotonic() + 20
                while db.available:  # the probe's silent link times out
                    assert time.monotonic() < deadline, "the probe never noticed"
                    time.sleep(0.02)
                deadline = time.monotonic() + 15
                while not db.available:  # the next probe connects afresh
                    assert time.monotonic() < deadline, "payments still refused"
                    time.sleep(0.05)
                answer = server.pos.Authorize(builders.authorize_request(card, 1_000),
                                              timeout=10)
                assert answer.decision == common_pb2.DECISION_APPROVED
        finally:
            thread.stop()

@dataclass
class Tally:
    """What one POS client was told."""

    settled_fen: dict[str, int] = field(default_factory=dict)  # account -> confirmed sum
    pending: list[tuple[str, int]] = field(default_factory=list)  # (account, final) queued
    ok_calls: int = 0
    unavailable: int = 0
    longest_call_s: float = 0.0
    unexpected: list[str] = field(default_factory=list)


def _pump(server: RunningServer, cards: list[builders.FundedCard], outbox: Outbox,
          stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1,
                         total_timeout_s=3.0)
    with PosClient(server.target, deadline_s=2.0, retry=policy, outbox=outbox) as pos:
        while not stop.is_set():
            card = rng.choice(cards)
            amount = rng.randrange(1_000, 5_000)
            started = time.monotonic()
            try:
                auth = pos.authorize(card.card_number, amount, STATION, TERMINAL)
                tally.ok_calls += 1
                if auth.decision != common_pb2.DECISION_APPROVED:
                    tally.unexpected.append(f"declined {auth.decline_reason}")
                    continue
                final = rng.randrange(1, amount + 1)
                try:
                    pos.confirm(auth.hold.hold_id, final, volume_ml=1_000, unit_price_fen=785)
                    tally.settled_fen[card.account_id] = (
                        tally.settled_fen.get(card.account_id, 0) + final)
                    tally.ok_calls += 1
                except PosPending:
                    tally.pending.append((card.account_id, final))
            except PosError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    tally.unexpected.append(f"{exc.code.name} {exc.reason}")
                tally.unavailable += 1
                time.sleep(0.02)
            finally:
                tally.longest_call_s = max(tally.longest_call_s, time.monotonic() - started)


@pytest.mark.slow
def test_database_crash_under_load_leaves_the_ledger_consistent(
        outage_server: RunningServer, own_pg: EmbeddedPostgres, tmp_path: Path) -> None:
    server = outage_server
    cards = [builders.open_card(server, balance_fen=START_FEN) for _ in range(6)]
    stop = threading.Event()
    tallies = [Tally() for _ in range(4)]
    outboxes = [Outbox(tmp_path / f"pos-{i}.sqlite3") for i in range(4)]
    threads = [threading.Thread(target=_pump, args=(server, cards, outboxes[i], stop, tallies[i], i))
               for i in range(4)]
    for t in threads:
        t.start()
    # One sale is sure to be cut off: authorized before the crash, its
    # confirm sent while the database is down goes to the POS outbox.
    stranded = Tally()
    stranded_outbox = Outbox(tmp_path / "pos-stranded.sqlite3")
    stranded_pos = PosClient(server.target, deadline_s=2.0, outbox=stranded_outbox,
                             retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.05,
                                               max_backoff_s=0.1, total_timeout_s=3.0))
    held = stranded_pos.authorize(cards[0].card_number, 4_321, STATION, TERMINAL)
    assert held.decision == common_pb2.DECISION_APPROVED
    tallies.append(stranded)
    outboxes.append(stranded_outbox)
    try:
        time.sleep(1.5)
        before_crash = sum(t.ok_calls for t in tallies)
        control_postgres(own_pg, "stop", "immediate")  # a crash: in-flight transactions die
        _wait_health(server.channel, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        with pytest.raises(PosPending):
            stranded_pos.confirm(held.hold.hold_id, 4_000, volume_ml=1_000, unit_price_fen=785)
        stranded.pending.append((cards[0].account_id, 4_000))
        assert len(stranded_outbox) == 1
        time.sleep(1.0)
        during = sum(t.unavailable for t in tallies)
        control_postgres(own_pg, "start")  # crash recovery
        _wait_health(server.channel, health_pb2.HealthCheckResponse.SERVING, 30)
        after_start = sum(t.ok_calls for t in tallies)
        deadline = time.monotonic() + 20
        while sum(t.ok_calls for t in tallies) < after_start + 40:
            assert time.monotonic() < deadline, "the load did not recover"
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        stranded_pos.close()
    assert before_crash > 0 and during > 0
    for tally in tallies:
        assert tally.unexpected == []
        # nothing hangs: every call (retries included) ended within its budget
        assert tally.longest_call_s < 5.0
    # The confirms that could not be delivered: delivered now, once.
    with PosClient(server.target, retry=RetryPolicy(max_attempts=3)) as pos:
        for outbox, tally in zip(outboxes, tallies, strict=True):
            report = outbox.flush(pos)
            assert report.complete, report
            for account, final in tally.pending:
                tally.settled_fen[account] = tally.settled_fen.get(account, 0) + final
            outbox.close()
    res = subprocess.run([FUELCARD, "verify", "--database-url", server.database_url],
                         capture_output=True, text=True, timeout=120,
                         env={"FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX, "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout + res.stderr
    for card in cards:
        settled = sum(t.settled_fen.get(card.account_id, 0) for t in tallies)
        bal = builders.balance(server, card).balance
        # Authorizes whose answer was lost may leave holds open: held, not
        # spent. The settled balance is exactly what the clients were told.
        assert bal.balance_fen == START_FEN - settled, card.account_id
