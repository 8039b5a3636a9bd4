"""Read/write split against a real streaming replica: a second PostgreSQL
made a standby of the first with pg_basebackup (the embedded binaries), both
on loopback. Reports and histories are read on the standby; payments and
every write stay on the primary; report reads never touch the primary."""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Iterator
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
)
from fuelcard_server import migrations
from fuelcard_server.clock import ManualClock
from fuelcard_server.embedded import EmbeddedPostgres, bin_dir
from google.protobuf import timestamp_pb2

from tests import builders
from tests.plugins.database import control_postgres
from tests.plugins.server import RunningServer, ServerThread, make_settings

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
    settings = make_settings(tmp_path, replica_url=standby.url())
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
        assert "fc.journal j" not in q and "fc.hold_json(h)" not in q, q

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
