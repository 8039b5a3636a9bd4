"""The analytics sidecar (issue 9): it follows a live server under load into
its warehouse and, killed with SIGKILL mid-stream, resumes exactly where it
stopped; every report runs on a generated history and writes a CSV and a
PNG; the forecast's MAPE and the churn AUC are printed."""

from __future__ import annotations

import contextlib
import csv
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fuelcard.v1 import events_pb2, events_pb2_grpc
from fuelcard_analytics import churn, cli, forecast, reports
from fuelcard_analytics.generator import YearConfig, generate
from fuelcard_analytics.warehouse import CursorMismatch, Warehouse, open_store
from fuelcard_server.settings import Settings

from tests.plugins.server import RunningServer, TlsServer, make_settings
from tests.support import builders

SMALL_YEAR = YearConfig(days=220, stations=8, drivers=220, families=30, fleets=2, seed=11)
REPORT_FILES = ["fleet_costs", "station_sales", "tiers", "points_liability", "station_heatmap",
                "forecast", "churn"]


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    # A live server: its sequencer loop runs on its timer, as in production
    # (a following stream waits for the loop's rounds, it never sequences).
    return make_settings(tmp_path, event_interval_s=0.2)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("year") / "year.duckdb"
    store = open_store(str(path))
    try:
        generate(store, SMALL_YEAR, log=lambda _: None)
    finally:
        store.close()
    return path


def test_every_report_runs_on_the_generated_history(generated: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    assert cli.main(["report", "--store", str(generated), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stem in REPORT_FILES:
        for suffix in ("csv", "png"):
            files = [p for p in out.glob(f"{stem}*.{suffix}")]
            assert files and all(p.stat().st_size > 100 for p in files), (stem, suffix)
    assert (out / "station_heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert "back-tested MAPE" in printed and "churn AUC" in printed
    # the fleet report flags the vehicles the generator made anomalous
    store = open_store(str(generated))
    try:
        truth = {r[0] for r in store.query(
            "SELECT account_id FROM generated_truth WHERE anomaly")}
    finally:
        store.close()
    flagged = {line.split(",")[1] for line in (out / "fleet_costs.csv").read_text().splitlines()
               if line.endswith(",True")}
    assert truth and truth <= flagged, (truth, flagged)
    # and shows litres (issue 14, item 4): the volume in litres and the price per litre paid
    with (out / "fleet_costs.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][4:7] == ["volume_ml", "litres", "fen_per_litre"]
    sold = [r for r in rows[1:] if int(r[4])]
    assert sold and all(r[5] == f"{int(r[4]) / 1000:.3f}" for r in sold)
    assert all(int(r[6]) == round(int(r[3]) * 1000 / int(r[4])) for r in sold)


def test_forecast_and_churn_quality_on_known_structure(generated: Path, tmp_path: Path) -> None:
    store = open_store(str(generated))
    try:
        _, backtest = forecast.run(store, tmp_path)
        _, quality = churn.run(store, tmp_path)
    finally:
        store.close()
    # the structure (weekdays, holidays, trend) is found: the decomposition beats a flat
    # mean of the last four weeks; single small series stay dominated by Poisson noise
    assert backtest.folds == 3, backtest
    assert backtest.mape_network < 0.8 * backtest.naive_mape_network, backtest
    assert backtest.mape_network < backtest.mape_station_product, backtest
    assert quality is not None and quality.churners > 10
    assert quality.auc_last_day > 0.85 and quality.auc_early > 0.6, quality


def test_a_postgresql_warehouse_holds_the_same_facts(database_url: str, tmp_path: Path) -> None:
    config = YearConfig(days=40, stations=4, drivers=40, families=5, fleets=1, seed=3)
    duck = open_store(str(tmp_path / "a.duckdb"))
    pg = open_store(database_url, "warehouse")
    try:
        generate(duck, config, log=lambda _: None)
        generate(pg, config, log=lambda _: None)
        query = ("SELECT count(*), sum(amount_fen), sum(volume_ml), count(DISTINCT station_id)"
                 " FROM fact_sale")
        assert duck.query(query) == pg.query(query)
        assert duck.query(query)[0][0] > 100
        out = tmp_path / "pg"
        output = reports.station_sales(pg, out)
        assert output.png.exists() and output.csv.stat().st_size > 100
    finally:
        duck.close()
        pg.close()
    with psycopg.connect(database_url) as conn:  # its own schema, never fc
        row = conn.execute("SELECT count(*) FROM information_schema.tables"
                           " WHERE table_schema = 'warehouse'").fetchone()
        assert row is not None and row[0] >= 10


def test_a_batch_must_continue_the_cursor(server: RunningServer, tmp_path: Path) -> None:
    builders.open_card(server, balance_fen=1_000)
    builders.open_card(server, balance_fen=2_000)
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    events = [e for m in stub.StreamEvents(events_pb2.StreamEventsRequest()) for e in m.events]
    store = open_store(str(tmp_path / "w.duckdb"))
    try:
        w = Warehouse(store)
        assert w.apply(events[:2]) == 2
        for bad in (events[:2], events[1:], events[3:]):  # a replay, an overlap, a gap
            with pytest.raises(CursorMismatch):
                w.apply(bad)
        assert w.apply(events[2:]) == len(events)
        assert store.query("SELECT count(*), sum(amount) FROM fact_ledger") == [(2, 3_000)]
    finally:
        store.close()


def test_the_sidecar_syncs_over_mutual_tls_as_an_analytics_caller(
        tls_server: TlsServer, dev_certs: Path, tmp_path: Path) -> None:
    from fuelcard.v1 import control_pb2, control_pb2_grpc
    from fuelcard_analytics.follow import Target, follow

    control_pb2_grpc.ControlServiceStub(tls_server.channel("admin-ops")).RegisterStation(
        control_pb2.RegisterStationRequest(station=control_pb2.Station(
            station_id="KM-009", name="Kunming 9",
            location=control_pb2.GeoPoint(latitude=25.0, longitude=102.7))))
    store = open_store(str(tmp_path / "tls.duckdb"))
    try:
        w = Warehouse(store)
        assert follow(Target(tls_server.target, dev_certs, "analytics-bi"), w,
                      keep_following=False, log=lambda _: None) == 1
        assert store.query("SELECT station_id, latitude FROM dim_station") == [("KM-009", 25.0)]
    finally:
        store.close()


# --- following a live server, killed mid-stream --------------------------------------


class Sidecar:
    """`fuelcard-analytics follow` as a real process; its progress lines."""

    def __init__(self, target: str, store: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fuelcard_analytics.cli", "follow", "--target", target,
             "--insecure", "--store", str(store), "--max-batch", "25"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, predicate: Any, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=0.5)
                if predicate(line):
                    return line
            assert self.proc.poll() is None, f"sidecar exited with {self.proc.returncode}"
        raise AssertionError("sidecar made no such progress in time")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no chance to tidy up
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)  # to the end of its output
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _position(line: str) -> int:
    return int(line.split(" through position ")[1].split()[0]) if " through position " in line \
        else -1


@contextlib.contextmanager
def pump_load(server: RunningServer, cards: list[builders.FundedCard]) -> Iterator[list[int]]:
    """Pump cycles and recharges on every card until the block ends."""
    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def run(card: builders.FundedCard) -> None:
        try:
            n = 0
            while not stop.is_set():
                n += 1
                hold = builders.authorize(server, card, 2_000).hold
                if n % 5 == 0:
                    builders.cancel(server, hold.hold_id)
                else:
                    builders.confirm(server, hold.hold_id, 1_000 + n % 900)
                if n % 10 == 0:
                    builders.recharge(server, card.account_id, 20_000)
            done.append(n)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in cards]
    for t in threads:
        t.start()
    try:
        yield done
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors


@pytest.mark.slow
def test_the_sidecar_follows_under_load_and_resumes_after_kill_9(
        server: RunningServer, db: psycopg.Connection[Any], tmp_path: Path) -> None:
    cards = [builders.open_card(server, balance_fen=5_000_000) for _ in range(4)]
    store = tmp_path / "live.duckdb"
    with pump_load(server, cards):
        time.sleep(1.0)  # a backlog, so the kill lands mid-stream
        sidecar = Sidecar(server.target, store)
        sidecar.wait_for(lambda line: _position(line) > 0)
        applied = _position(sidecar.wait_for(lambda line: _position(line) > 0))  # a few batches in
        sidecar.kill()
        positioned = db.execute("SELECT last_position FROM fc.event_head").fetchone()
        assert positioned is not None and positioned[0] > applied, "killed mid-stream"
        time.sleep(0.5)  # the load goes on while it is down
        sidecar = Sidecar(server.target, store)
        resumed = _position(sidecar.wait_for(lambda line: _position(line) > 0))
        assert resumed > applied
        time.sleep(1.0)  # following, under load
    while server.sequence_events() != 0:  # -1: the server's sequencer loop is at it
        time.sleep(0.05)
    head = db.execute("SELECT last_position FROM fc.event_head").fetchone()
    assert head is not None
    sidecar.wait_for(lambda line: _position(line) == head[0])
    sidecar.kill()

    wh = open_store(str(store))
    try:
        assert wh.query("SELECT position FROM sidecar_cursor WHERE stream = 'fuelcard'") == [head]
        streamed = wh.query("SELECT kind, asset, count(*), count(DISTINCT entry_id), sum(amount)"
                            " FROM fact_ledger GROUP BY kind, asset ORDER BY kind, asset")
        sales = wh.query("SELECT count(*), sum(amount_fen), sum(volume_ml) FROM fact_sale")
    finally:
        wh.close()
    ledger = db.execute("SELECT kind, asset, count(*), count(*), sum(amount) FROM fc.journal"
                        " GROUP BY kind, asset ORDER BY kind, asset").fetchall()
    assert [tuple(int(v) for v in r) for r in streamed] == [tuple(int(v) for v in r)
                                                           for r in ledger]
    confirmed = db.execute("SELECT count(*), sum(settled_fen), sum(volume_ml) FROM fc.holds"
                           " WHERE state = 2").fetchone()
    assert confirmed is not None and confirmed[0] > 50
    assert tuple(int(v) for v in sales[0]) == tuple(int(v) for v in confirmed)
