"""A real fuelcard gRPC server on loopback, for tests to call through the
generated stubs.

The server runs on its own thread and event loop (uvloop), as it would in
its own process, with a ManualClock the test can move forward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop
from fuelcard.v1 import (
    account_pb2_grpc,
    funding_pb2_grpc,
    points_pb2_grpc,
    transaction_pb2_grpc,
)
from fuelcard_server import roles
from fuelcard_server.app import FuelcardServer
from fuelcard_server.clock import ManualClock
from fuelcard_server.settings import Settings
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

TEST_KEY_HEX = "00112233445566778899aabbccddeeff" * 2


@dataclass
class RunningServer:
    target: str
    database_url: str
    clock: ManualClock
    settings: Settings
    server: FuelcardServer
    loop: asyncio.AbstractEventLoop
    channel: grpc.Channel
    pos: transaction_pb2_grpc.TransactionServiceStub = field(init=False)
    funding: funding_pb2_grpc.FundingServiceStub = field(init=False)
    points: points_pb2_grpc.PointsServiceStub = field(init=False)
    accounts: account_pb2_grpc.AccountServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.pos = transaction_pb2_grpc.TransactionServiceStub(self.channel)
        self.funding = funding_pb2_grpc.FundingServiceStub(self.channel)
        self.points = points_pb2_grpc.PointsServiceStub(self.channel)
        self.accounts = account_pb2_grpc.AccountServiceStub(self.channel)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine factory on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout=60)

    def advance(self, delta: dt.timedelta) -> None:
        self.clock.advance(delta)

    def sequence_events(self) -> int:
        """Position the committed outbox rows now (one batch)."""
        result: int = self.run(self.server.sequence_events_once)
        return result

    def chain_journal(self) -> int:
        """Chain one batch of committed journal entries now."""
        result: int = self.run(self.server.chain_journal_once)
        return result

    def expire_holds(self) -> int:
        """Run one expiry sweep now, at the clock's time."""
        result: int = self.run(self.server.expire_holds_once)
        return result


class ServerThread:
    def __init__(self, settings: Settings, url: str, clock: ManualClock) -> None:
        # The server connects as the serving role, as `fuelcard serve` does
        # (roles.py): every test exercises the privileges it has. `url` (the
        # superuser's) stays the tests' own, to assert on rows.
        self.server = FuelcardServer(settings, roles.as_role(url), clock=clock)
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuelcard-server",
                                        daemon=True)

    def start(self) -> int:
        self._thread.start()
        fut: Future[int] = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        port = fut.result(timeout=60)
        # The journal chain loop runs a round at start (its state row notes a horizon even on
        # an empty journal): over before the test begins, or a test's snapshot of the tables
        # could see it land mid-test.
        asyncio.run_coroutine_threadsafe(self.server.first_chain_round(), self.loop).result(timeout=60)
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace_s=1.0), self.loop).result(timeout=60)

        async def shutdown_asyncgens() -> None:
            await self.loop.shutdown_asyncgens()

        asyncio.run_coroutine_threadsafe(shutdown_asyncgens(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    # Step-up codes for large recharges and limit raises are off unless a
    # test turns them on (test_security_step_up.py): most tests are about
    # other things and move large amounts and caps freely.
    s = Settings(listen="127.0.0.1:0", data_dir=tmp_path, card_index_key_hex=TEST_KEY_HEX,
                 pool_min=2, pool_max=8, expiry_interval_s=3600.0, grace_s=1.0, insecure=True,
                 step_up_recharge_above_fen=2**62, step_up_limit_raises=False,
                 # events are positioned when a caught-up stream asks the sequencer loop for
                 # a round (or a test does), not by a timer
                 event_interval_s=3600.0,
                 # nor are keys and challenges pruned behind a test's back (test_retention.py
                 # runs the job when it means to)
                 retention_interval_s=3600.0,
                 # nor is the journal chained but when a test asks (RunningServer.chain_journal)
                 journal_chain_interval_s=3600.0,
                 # shedding refuses admin and report calls while payments wait for the pool:
                 # right for production, noise for storm tests about other things
                 # (test_overload.py and test_ops.py turn it on)
                 load_shedding=False,
                 # every call's access line, so the session's log scan sees them all
                 access_log_sample=1.0)
    return dataclasses.replace(s, **overrides).validate()


def same_keys(settings: Settings) -> dict[str, Any]:
    """make_settings overrides for another server that shares `settings`'
    key set, as a second host does after `fuelcard keys import`: a server
    with other keys refuses to start against the same database."""
    return {"root_key_file": settings.root_key_file or settings.data_dir / "root.key",
            "signing_key_file": settings.signing_key_path,
            "card_index_key_hex": settings.card_index_key_hex}


def cluster_keys(directory: Path) -> dict[str, Any]:
    """make_settings overrides for every server of a module that shares one
    database across its tests: one key set for them all, kept in `directory`
    (made by the first server), as the hosts of one deployment share theirs."""
    directory.mkdir(parents=True, exist_ok=True)
    return same_keys(make_settings(directory))


@pytest.fixture(scope="session")
def metric_reader() -> InMemoryMetricReader:
    """The metrics the servers of this test session record (OpenTelemetry's
    global meter provider can be set once per process: one reader for all
    tests; compare counts before and after)."""
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    """Override in a test module to change settings for its server."""
    return make_settings(tmp_path)


@pytest.fixture
def server(database_url: str, server_settings: Settings) -> Iterator[RunningServer]:
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(server_settings, database_url, clock)
    port = thread.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    try:
        yield RunningServer(target, database_url, clock, server_settings, thread.server,
                            thread.loop, channel)
    finally:
        channel.close()
        thread.stop()


@dataclass
class TlsServer:
    """A server with mutual TLS and development certificates for several
    callers; `channel(name)` opens a channel as one of them."""

    target: str
    database_url: str
    clock: ManualClock
    certs: Path
    channels: list[grpc.Channel] = field(default_factory=list)

    def credentials(self, name: str | None, ca: Path | None = None) -> grpc.ChannelCredentials:
        root = (ca or self.certs / "ca.pem").read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        return grpc.ssl_channel_credentials(
            root_certificates=root, private_key=(self.certs / f"{name}.key").read_bytes(),
            certificate_chain=(self.certs / f"{name}.pem").read_bytes())

    def channel(self, name: str | None, ca: Path | None = None) -> grpc.Channel:
        ch = grpc.secure_channel(self.target, self.credentials(name, ca))
        self.channels.append(ch)
        return ch


# The callers every TLS test server has certificates for (file stems).
TLS_CALLERS = {
    "pos-KM-001-T1": ("pos", "KM-001-T1", "KM-001"),
    "pos-KM-001-T2": ("pos", "KM-001-T2", "KM-001"),
    "pos-KM-002-T9": ("pos", "KM-002-T9", "KM-002"),
    "adapter-wechat-gw": ("adapter", "wechat-gw", "WECHAT_PAY"),
    "admin-ops": ("admin", "ops", ""),
    "analytics-bi": ("analytics", "bi", ""),
    "reviewer-risk": ("reviewer", "risk", ""),
}


@pytest.fixture(scope="session")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fuelcard_server.certs import DevPki
    from fuelcard_server.identity import Role

    directory = tmp_path_factory.mktemp("certs")
    pki = DevPki(directory)
    pki.server()
    for role, name, scope in TLS_CALLERS.values():
        pki.client(Role(role), name, scope)
    return directory


@pytest.fixture
def tls_server(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[TlsServer]:
    settings = make_settings(tmp_path, insecure=False, tls_dir=dev_certs)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    port = thread.start()
    handle = TlsServer(f"127.0.0.1:{port}", database_url, clock, dev_certs)
    try:
        yield handle
    finally:
        for ch in handle.channels:
            ch.close()
        thread.stop()
