"""The SRE page in a real browser: the core's gRPC health, throughput
(pg_stat_database), RPC rate and latency (the core's Prometheus scrape),
replica lag (pg_stat_replication and the standby's replay age, against a
real streaming standby), charts with Chinese labels, refreshed in place.
Takes the screenshots docs/console/login.png and docs/console/sre.png."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import psycopg
import pytest
from fuelcard.v1 import account_pb2, account_pb2_grpc
from fuelcard_console.auth import Role
from fuelcard_console.charts import Series, bar_chart, line_chart
from fuelcard_console.sre import parse_buckets, quantile
from fuelcard_server import migrations
from fuelcard_server.embedded import EmbeddedPostgres, bin_dir
from fuelcard_server.health import READS_HEALTH_NAME, SERVICE_NAMES
from playwright.sync_api import Browser, Page

from tests.plugins.console import LoginHelper, RunningConsole, start_console
from tests.plugins.database import control_postgres
from tests.plugins.server import cluster_keys
from tests.support import builders
from tests.support import control_builders as cb

DOCS = Path(__file__).resolve().parent.parent / "docs" / "console"


def _traffic(console: RunningConsole, calls: int = 20) -> None:
    """Work for the core: a fleet made and a sale booked (the development
    core: database transactions), and reads over the TLS core the edge
    calls (RPCs its latency histogram counts)."""
    fleet = cb.open_fleet(console.server, 100_000, [cb.SHARED, cb.SHARED])
    cb.sale(console.server, fleet.subs[0], 5_000)
    accounts = account_pb2_grpc.AccountServiceStub(console.tls_channel())
    for _ in range(calls):
        accounts.GetAccount(account_pb2.GetAccountRequest(account_id=fleet.parent_id))


def test_the_sre_page_shows_health_throughput_and_latency(console: RunningConsole, page: Page,
                                                          login: LoginHelper) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    page.goto("/console/login")
    page.screenshot(path=str(DOCS / "login.png"))

    name, password, _ = console.make_user(Role.SRE)
    console.sample_sre()  # the baseline the rates are measured from
    _traffic(console)
    sample = console.sample_sre()
    # Backends report their transaction counts to pg_stat_database at most
    # once a second, and an idle one later still: the core's commits can reach
    # the view after the next sample. Sample again (bounded) until they have.
    for _ in range(15):
        if sample.db_tps:
            break
        time.sleep(1.0)
        _traffic(console, calls=5)  # the next sample's RPCs: its rates count from this one
        sample = console.sample_sre()
    assert sample.db_tps is not None and sample.db_tps > 0
    assert sample.rpc_per_s is not None and sample.rpc_per_s > 0
    assert sample.p50_ms is not None and sample.p99_ms is not None and sample.p50_ms <= sample.p99_ms
    login(page, name, password)
    assert page.url == console.url("/console/sre/")

    # every service of the core and the replica-backed reads answer SERVING
    statuses = {row.get_attribute("data-service"): row.get_attribute("data-status")
                for row in page.locator("#health tbody tr").all()}
    assert statuses == {name: "SERVING" for name in ("", *SERVICE_NAMES, READS_HEALTH_NAME)}
    assert page.locator("#overall").inner_text() == "全部正常"
    assert page.locator("#db-tps").inner_text() == f"{sample.db_tps:.1f}"
    latency = page.locator("#latency").inner_text()
    assert latency.startswith("P50 ≤ ") and " ms · P99 ≤ " in latency
    # no standby here: said plainly
    assert page.locator("#standbys").inner_text() == "没有备库：提交只保存在主库一处。"
    assert page.locator("#reports-lag").inner_text() == "—"
    # three charts, their titles and legends in Chinese, as SVG text (nothing fetched)
    titles = page.locator("#charts svg").evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    assert titles == ["吞吐量（每秒）", "RPC 延迟（毫秒）", "副本延迟（秒）"]
    assert page.locator("#charts svg text", has_text="数据库事务/秒").count() == 1
    assert page.locator("#charts svg polyline, #charts svg circle").count() >= 2

    # the page refreshes its live part in place (static/console.js), without a reload
    page.evaluate("window.__not_reloaded = true")
    page.wait_for_selector("#live[data-refreshed]", timeout=20_000)
    assert page.evaluate("window.__not_reloaded") is True
    assert page.locator("#health tbody tr").count() == len(statuses)
    page.screenshot(path=str(DOCS / "sre.png"), full_page=True)


def test_latency_quantiles_come_from_the_buckets_between_two_scrapes() -> None:
    def scrape(counts: dict[str, int]) -> str:
        lines = [f'fuelcard_rpc_latency_ms_bucket{{rpc_method="/a",le="{le}"}} {n}'
                 for le, n in counts.items()]
        lines.append('fuelcard_rpc_latency_ms_bucket{rpc_method="/b",le="+Inf"} 5')
        lines.append("fuelcard_holds_active 3")
        return "\n".join(lines)

    before = parse_buckets(scrape({"1.0": 10, "5.0": 10, "50.0": 10, "+Inf": 10}))
    after = parse_buckets(scrape({"1.0": 60, "5.0": 95, "50.0": 109, "+Inf": 110}))
    assert after == {1.0: 60.0, 5.0: 95.0, 50.0: 109.0, math.inf: 115.0}
    # 100 calls between: 50 under 1 ms, 35 more under 5, 14 more under 50, 1 slower
    assert quantile(before, after, 0.5) == 1.0
    assert quantile(before, after, 0.9) == 50.0
    assert quantile(before, after, 0.999) == math.inf
    assert quantile(after, after, 0.5) is None


# --- against a real streaming standby ---------------------------------------------------------


@pytest.fixture(scope="module")
def primary_and_standby() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    if not (bin_dir() / "pg_basebackup").exists():
        pytest.fail("the embedded PostgreSQL has no pg_basebackup")
    # outside pytest's base temp directory: the PostgreSQL user must reach it
    with tempfile.TemporaryDirectory(prefix="fuelcard-console-replica-") as tmp:
        primary = EmbeddedPostgres(Path(tmp) / "primary")
        standby = EmbeddedPostgres(Path(tmp) / "standby")
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


def _caught_up(primary: EmbeddedPostgres, standby: EmbeddedPostgres) -> None:
    with psycopg.connect(primary.url(), autocommit=True) as p:
        row = p.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
    with psycopg.connect(standby.url(), autocommit=True) as s:
        deadline = time.monotonic() + 30
        while True:
            done = s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)).fetchone()
            if done is not None and done[0]:
                return
            assert time.monotonic() < deadline, "the standby does not catch up"
            time.sleep(0.05)


def test_the_sre_page_shows_the_standby_and_its_lag(
        primary_and_standby: tuple[EmbeddedPostgres, EmbeddedPostgres], tmp_path: Path, dev_certs: Path,
        browser: Browser, login: LoginHelper) -> None:
    primary, standby = primary_and_standby
    for console in start_console(primary.url(), tmp_path, dev_certs, reports_database_url=standby.url(),
                                 keys=cluster_keys(primary.data_dir / "server-keys")):
        builders.open_card(console.server, 10_000)
        _caught_up(primary, standby)
        sample = console.sample_sre()
        assert len(sample.standbys) == 1
        assert sample.reports_lag_s is not None and sample.reports_lag_s >= 0
        name, password, _ = console.make_user(Role.SRE)
        fresh = browser.new_context(base_url=console.base_url)
        try:
            p = fresh.new_page()
            login(p, name, password)
            rows = p.locator("#standbys tbody tr").all()
            assert len(rows) == 1
            cells = rows[0].locator("td").all_inner_texts()
            assert cells[0] == sample.standbys[0].name and cells[1] == "async"
            assert p.locator("#reports-lag").inner_text().endswith(" 秒")
        finally:
            fresh.close()


def test_charts_escape_their_text_and_mark_flagged_bars() -> None:
    svg = bar_chart("每车油费（元）", ["云A·10001", "<b>x</b>"], [Series("本月", [120.0, 300.0]),
                                                              Series("上月", [None, 90.0])],
                    y_unit="元", flagged=[False, True])
    root = ElementTree.fromstring(svg)  # well-formed: every text escaped
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("aria-label") == "每车油费（元）"
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "云A·10001" in texts and "⚠ <b>x</b>" in texts and "本月" in texts and "上月" in texts
    flagged = [t for t in root.iter(f"{ns}text") if t.text == "⚠ <b>x</b>"]
    assert flagged[0].get("fill") == "#b42318"
    # three bars (the missing one is not drawn) and the two legend swatches
    assert len(list(root.iter(f"{ns}rect"))) == 3 + 2
    line = line_chart("吞吐量", ["a", "b", "c"], [Series("事务", [1.0, None, 3.0])])
    # a gap splits the line: two single points, no polyline across the gap
    points = ElementTree.fromstring(line)
    assert len(list(points.iter(f"{ns}circle"))) == 2 and not list(points.iter(f"{ns}polyline"))
