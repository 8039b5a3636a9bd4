"""Read/write split against a real streaming replica: a second PostgreSQL
made a standby of the first with pg_basebackup (the embedded binaries), both
on loopback. Reports and histories are read on the standby; payments and
every write stay on the primary; report reads never touch the primary."""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
)
from fuelcard_server import migrations
from fuelcard_server.clock import ManualClock
from fuelcard_server.embedded import EmbeddedPostgres, bin_dir
from fuelcard_server.health import (
    READ_POOL_SERVICES,
    READS_HEALTH_NAME,
    REPLICA_HEALTH_NAMES,
    SERVICE_NAMES,
)
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.plugins.database import control_postgres
from tests.plugins.proxy import TcpProxy
from tests.plugins.server import (
    RunningServer,
    ServerThread,
    cluster_keys,
    make_settings,
    same_keys,
)
from tests.support import builders
from tests.support.ledger_asserts import unpack

pytestmark = pytest.mark.skipif(not (bin_dir() / "pg_basebackup").exists(),
                                reason="the embedded PostgreSQL has no pg_basebackup")


@pytest.fixture(scope="module")
def primary_and_standby() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    # Outside pytest's base temp directory: the PostgreSQL user must reach it
    # (pytest keeps that one private to us).
    with tempfile.TemporaryDirectory(prefix="fuelcard-replica-") as tmp:
        yield from _primary_and_standby(Path(tmp))


def _primary_and_standby(tmp: Path) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary = EmbeddedPostgres(tmp / "primary")
    standby = EmbeddedPostgres(tmp / "standby")
    control_postgres(primary, "start")
    try:
        migrations.migrate(primary.url())
        control_postgres(standby, "standby", primary=primary)
        control_postgres(standby, "start")
        try:
            yield primary, standby
        finally:
            control_postgres(standby, "stop", "immediate")
    finally:
        control_postgres(primary, "stop", "immediate")


@pytest.fixture
def split_server(primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
                 tmp_path: Path) -> Iterator[RunningServer]:
    primary, standby = primary_and_standby
    settings = make_settings(tmp_path, replica_url=standby.url(),
                             **cluster_keys(primary.data_dir / "server-keys"))
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, primary.url(), clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(f"127.0.0.1:{port}", primary.url(), clock, settings, thread.server,
                            thread.loop, channel)
    finally:
        channel.close()
        thread.stop()


def _caught_up(primary: EmbeddedPostgres, standby: EmbeddedPostgres) -> None:
    with psycopg.connect(primary.url(), autocommit=True) as p:
        row = p.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        lsn = row[0]
    with psycopg.connect(standby.url(), autocommit=True) as s:
        deadline = time.monotonic() + 30
        while True:
            row = s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if row is not None and row[0]:
                return
            assert time.monotonic() < deadline, "the standby does not catch up"
            time.sleep(0.05)


def _statements(pg: EmbeddedPostgres, application: str) -> list[str]:
    """Last statement of each backend of this application name."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        rows = conn.execute("SELECT query FROM pg_stat_activity WHERE application_name = %s",
                            (application,)).fetchall()
    return [str(r[0]) for r in rows]


def test_reports_and_histories_are_read_on_the_replica(
        split_server: RunningServer, primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres]
) -> None:
    primary, standby = primary_and_standby
    server = split_server
    with psycopg.connect(standby.url(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row is not None and row[0] is True, "the second cluster must be a standby"

    fleet = builders.open_card(server, balance_fen=100_000,
                               account_type=account_pb2.ACCOUNT_TYPE_PERSONAL)
    held = builders.authorize(server, fleet, 30_000)
    assert held.decision == common_pb2.DECISION_APPROVED
    builders.confirm(server, held.hold.hold_id, 25_000)
    _caught_up(primary, standby)

    listed = server.accounts.ListTransactions(
        account_pb2.ListTransactionsRequest(account_id=fleet.account_id), timeout=10)
    assert sorted(t.amount_fen for t in listed.transactions) == [-25_000, 100_000]
    holds = server.accounts.ListHolds(account_pb2.ListHoldsRequest(account_id=fleet.account_id),
                                      timeout=10)
    assert [h.settled_fen for h in holds.holds] == [25_000]
    points = points_pb2_grpc.PointsServiceStub(server.channel).ListPointsHistory(
        points_pb2.ListPointsHistoryRequest(account_id=fleet.account_id), timeout=10)
    assert [e.points for e in points.entries] == [250]
    control = control_pb2_grpc.ControlServiceStub(server.channel)
    report = control.GetFleetCostReport(control_pb2.GetFleetCostReportRequest(
        parent_account_id=fleet.account_id,
        start_time=timestamp_pb2.Timestamp(seconds=int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
                                                       .timestamp())),
        end_time=timestamp_pb2.Timestamp(seconds=int(dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
                                                     .timestamp()))), timeout=10)
    assert list(report.vehicles) == []  # a personal account has no vehicles

    # Where did they run? The read pool's backends are on the standby and
    # last ran report SQL; the primary has no backend of the read pool, and
    # none of its backends ran a journal page.
    on_standby = _statements(standby, "fuelcard-reads-w0")
    assert on_standby, "no read-pool connection on the standby"
    assert any("fc.journal" in q or "fc.holds" in q or "fc.accounts" in q for q in on_standby)
    assert _statements(primary, "fuelcard-reads-w0") == []
    for q in _statements(primary, "fuelcard-w0"):
        assert "fc.journal j" not in q and "fc.hold_json(h => h)" not in q, q

    # A write made after the standby was checked is not visible there until
    # replayed: the history read is the replica's view, not the primary's.
    builders.recharge(server, fleet.account_id, 1_000)
    _caught_up(primary, standby)
    listed = server.accounts.ListTransactions(
        account_pb2.ListTransactionsRequest(account_id=fleet.account_id), timeout=10)
    assert sorted(t.amount_fen for t in listed.transactions) == [-25_000, 1_000, 100_000]


def test_payments_never_touch_the_replica(
        split_server: RunningServer, primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres]
) -> None:
    primary, standby = primary_and_standby
    card = builders.open_card(split_server, balance_fen=10_000)
    answer = builders.authorize(split_server, card, 5_000)
    assert answer.decision == common_pb2.DECISION_APPROVED
    for q in _statements(standby, "fuelcard-reads-w0"):
        assert "fc.authorize" not in q and "fc.recharge" not in q, q
    assert any("fc.authorize" in q or "fc." in q for q in _statements(primary, "fuelcard-w0"))


# --- health and lag: the replica down or far behind ------------------------------

MAX_LAG_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# everything but the event stream: mixed services keep SERVING, their reads are
# watched under READS_HEALTH_NAME
STAY_SERVING = frozenset(SERVICE_NAMES) - REPLICA_HEALTH_NAMES


@pytest.fixture
def probed_server(primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres],
                  tmp_path: Path) -> Iterator[RunningServer]:
    """A split server probing often, with a small max lag and a scrape endpoint."""
    primary, standby = primary_and_standby
    settings = make_settings(tmp_path, replica_url=standby.url(), health_interval_s=0.1,
                             replica_max_lag_s=MAX_LAG_S, connect_timeout_s=1.0,
                             metrics_listen="127.0.0.1:0",
                             **cluster_keys(primary.data_dir / "server-keys"))
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, primary.url(), clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(f"127.0.0.1:{port}", primary.url(), clock, settings, thread.server,
                            thread.loop, channel)
    finally:
        channel.close()
        thread.stop()


def _health(server: RunningServer) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return {name: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in ("", *SERVICE_NAMES, READS_HEALTH_NAME)}


def _report_services_are(server: RunningServer, status: int, timeout_s: float) -> dict[str, int]:
    """Wait until the replica's health names say `status`; every other
    service (and the server as a whole) must say SERVING all along."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = _health(server)
        assert all(health[name] == SERVING for name in ("", *STAY_SERVING)), health
        if all(health[name] == status for name in REPLICA_HEALTH_NAMES):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.05)


def _metric(server: RunningServer, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    rich = unpack(err.value)
    return rich.code, rich.reason, time.monotonic() - started


def test_the_read_pool_services_are_exactly_those_with_report_type_rpcs() -> None:
    """READ_POOL_SERVICES and REPLICA_HEALTH_NAMES against the RPCs' priority
    classes: a service has a report-type RPC (a history, listing, report or
    stream: what the read pool serves) iff it is in the first, and its own
    health flips with the replica iff it has nothing but such RPCs."""
    from fuelcard_server.audit import method_name
    from fuelcard_server.overload import Priority, classify
    from fuelcard_server.services import (
        account,
        adjustment,
        control,
        events,
        funding,
        invoice,
        points,
        reconciliation,
        refund,
        risk,
        security,
        transaction,
    )

    with_reports: set[str] = set()
    with_others: set[str] = set()
    seen: set[str] = set()
    for module in (account, adjustment, control, events, funding, invoice, points, reconciliation,
                   refund, risk, security, transaction):
        for servicer in vars(module).values():
            if isinstance(servicer, type) and servicer.__module__ == module.__name__:
                for name, fn in vars(servicer).items():
                    roles = getattr(fn, "__wrapped_roles__", None)
                    if name == "StreamEvents":  # streaming: not the unary rpc decorator
                        roles = events.ALLOWED
                    if roles is None:
                        continue
                    service = method_name(servicer, name).split("/")[1]
                    seen.add(service)
                    if classify(name, roles) is Priority.REPORTS:
                        with_reports.add(service)
                    else:
                        with_others.add(service)
    assert seen == set(SERVICE_NAMES)
    assert with_reports == READ_POOL_SERVICES
    # a service flips as a whole only if nothing else it serves would stop with it
    assert with_reports - with_others == REPLICA_HEALTH_NAMES - {READS_HEALTH_NAME}


def test_health_flips_per_service_when_the_replica_stops_and_payments_go_on(
        probed_server: RunningServer,
        primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres], tmp_path: Path) -> None:
    primary, standby = primary_and_standby
    server = probed_server
    card = builders.open_card(server, balance_fen=50_000)
    _caught_up(primary, standby)
    # Idle for longer than the max lag: no commit to replay, and the standby
    # is caught up; its lag is 0, not the age of the last commit replayed.
    idle_until = time.monotonic() + 2.5 * MAX_LAG_S
    while time.monotonic() < idle_until:
        assert set(_health(server).values()) == {SERVING}
        time.sleep(0.1)
    assert _metric(server, "fuelcard_replica_lag_seconds") == 0.0
    assert _metric(server, "fuelcard_replica_up") == 1.0

    control_postgres(standby, "stop", "fast")
    try:
        _report_services_are(server, NOT_SERVING, 15)
        # Payments go on: authorize, confirm, recharge on the primary.
        held = builders.authorize(server, card, 30_000)
        assert held.decision == common_pb2.DECISION_APPROVED
        builders.confirm(server, held.hold.hold_id, 20_000)
        builders.recharge(server, card.account_id, 5_000)
        # Report reads fail at once, saying why.
        code, reason, took = _refused(lambda: server.accounts.ListTransactions(
            account_pb2.ListTransactionsRequest(account_id=card.account_id), timeout=10))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REPLICA_UNAVAILABLE")
        assert took < 1.0
        # In a NOT_SERVING service, the listing (read pool) is refused; the
        # resolution (primary) is served: an unknown id is NOT_FOUND.
        recon = settlement_pb2_grpc.ReconciliationServiceStub(server.channel)
        code, reason, _ = _refused(lambda: recon.ListChannelExceptions(
            settlement_pb2.ListChannelExceptionsRequest(), timeout=10))
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REPLICA_UNAVAILABLE")
        code, reason, _ = _refused(lambda: recon.ResolveChannelException(
            settlement_pb2.ResolveChannelExceptionRequest(
                request_id=builders.rid("rx"), exception_id=str(uuid.uuid4()),
                resolution="x"), timeout=10))
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "CHANNEL_EXCEPTION_NOT_FOUND")
        assert _metric(server, "fuelcard_replica_up") == 0.0
        assert _metric(server, "fuelcard_replica_lag_seconds") is None  # unknown, not 0
        # A server started while the replica is down starts, and says so.
        second = ServerThread(make_settings(tmp_path / "second", replica_url=standby.url(),
                                            connect_timeout_s=1.0, **same_keys(server.settings)),
                              primary.url(), server.clock)
        port = second.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                other = RunningServer(f"127.0.0.1:{port}", primary.url(), server.clock,
                                      second.server.settings, second.server, second.loop,
                                      channel)
                _report_services_are(other, NOT_SERVING, 0)
                assert builders.authorize(other, card, 1_000).decision == \
                    common_pb2.DECISION_APPROVED
        finally:
            second.stop()
    finally:
        control_postgres(standby, "start")
    _report_services_are(server, SERVING, 60)
    _caught_up(primary, standby)
    listed = server.accounts.ListTransactions(
        account_pb2.ListTransactionsRequest(account_id=card.account_id), timeout=10)
    # (the second server's 1 000 fen hold is still open: no journal entry)
    assert sorted(t.amount_fen for t in listed.transactions) == [-20_000, 5_000, 50_000]
    assert _metric(server, "fuelcard_replica_up") == 1.0


def test_a_replica_past_the_max_lag_is_not_read_until_it_catches_up(
        probed_server: RunningServer,
        primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres]) -> None:
    primary, standby = primary_and_standby
    server = probed_server
    card = builders.open_card(server, balance_fen=20_000)
    _caught_up(primary, standby)
    _report_services_are(server, SERVING, 10)
    with psycopg.connect(standby.url(), autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            # The primary moves on; the standby's replay stays behind.
            builders.recharge(server, card.account_id, 1_000)
            _report_services_are(server, NOT_SERVING, 15)
            lag = _metric(server, "fuelcard_replica_lag_seconds")
            assert lag is not None and lag > MAX_LAG_S
            assert _metric(server, "fuelcard_replica_up") == 1.0
            code, reason, _ = _refused(lambda: server.accounts.ListHolds(
                account_pb2.ListHoldsRequest(account_id=card.account_id), timeout=10))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REPLICA_LAGGING")
            assert builders.authorize(server, card, 1_000).decision == \
                common_pb2.DECISION_APPROVED
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")
    _report_services_are(server, SERVING, 15)
    lag = _metric(server, "fuelcard_replica_lag_seconds")
    assert lag is not None and lag <= MAX_LAG_S
    listed = server.accounts.ListTransactions(
        account_pb2.ListTransactionsRequest(account_id=card.account_id), timeout=10)
    assert sorted(t.amount_fen for t in listed.transactions) == [1_000, 20_000]


def test_one_dropped_probe_does_not_flap_health_three_in_a_row_do(
        primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The replica behind a link we can cut: down until one probe has failed,
    then up again, and health stays SERVING; keep it down and the report
    services go NOT_SERVING after replica_down_after_probes probes."""
    primary, standby = primary_and_standby
    caplog.set_level(logging.WARNING, logger="fuelcard_server.app")
    with TcpProxy(f"127.0.0.1:{standby.port}") as link:
        port = link.target.rpartition(":")[2]
        # Probes 0.5 s apart: time enough to bring the link back after the
        # first failure is logged and before a third one.
        settings = make_settings(tmp_path, replica_url=standby.url(tcp=True).replace(
            f":{standby.port}/", f":{port}/"), health_interval_s=0.5, replica_max_lag_s=60.0,
            connect_timeout_s=1.0, replica_down_after_probes=3, metrics_listen="127.0.0.1:0",
            **cluster_keys(primary.data_dir / "server-keys"))
        clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
        thread = ServerThread(settings, primary.url(), clock)
        server_port = thread.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server_port}") as channel:
                server = RunningServer(f"127.0.0.1:{server_port}", primary.url(), clock,
                                       settings, thread.server, thread.loop, channel)
                _report_services_are(server, SERVING, 10)

                def warnings() -> list[str]:
                    return [r.getMessage() for r in caplog.records
                            if r.name == "fuelcard_server.app" and r.levelno == logging.WARNING]

                def wait_for(text: str) -> None:
                    deadline = time.monotonic() + 10
                    while not any(text in w for w in warnings()):
                        assert time.monotonic() < deadline, warnings()
                        time.sleep(0.01)

                link.down()
                wait_for("probe 1 of 3")
                link.up()
                # three probe intervals later: never out, and the probe is back
                until = time.monotonic() + 1.5
                while time.monotonic() < until:
                    _report_services_are(server, SERVING, 0)
                    time.sleep(0.05)
                assert not any("NOT_SERVING" in w for w in warnings()), warnings()
                assert _metric(server, "fuelcard_replica_up") == 1.0

                link.down()  # and stays down
                _report_services_are(server, NOT_SERVING, 10)
                said = warnings()
                assert any("probe 3 of 3" in w for w in said), said
                assert any("NOT_SERVING" in w for w in said), said
                link.up()
                _report_services_are(server, SERVING, 30)
        finally:
            thread.stop()
