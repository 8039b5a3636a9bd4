"""The console bench (loadtest/fuelcard_loadtest/console_bench.py) at a tiny
scale against the real stack: a fleet of 60 vehicles with a few sales, a
family, a risk rule set, one console user per role, every GET page of every
role opened in headless Chromium. Functional facts only (the page times are
the bench's report, for BENCHMARKS.md, not asserted here)."""

from __future__ import annotations

from fuelcard_console.pages import fleet
from fuelcard_loadtest import console_bench

from tests.plugins.server import RunningServer

VEHICLES = 60  # three pages of the fleet page's 20


def test_every_role_page_answers_with_its_data(server: RunningServer) -> None:
    result = console_bench.run(console_bench.Options(
        vehicles=VEHICLES, weeks=1, fills_per_week=1, visits=1, target=server.target,
        database_url=server.database_url, card_index_key=server.settings.card_index_key()),
        log=lambda _: None)
    assert result.sales == VEHICLES
    roles = {p.role for p in result.pages}
    assert roles == {"fleet_manager", "holder", "reviewer", "finance", "risk_officer", "sre"}
    for p in result.pages:
        assert p.statuses == [200], (p.role, p.path, p.statuses)
        assert "登录" not in p.text.splitlines()[:1], (p.role, p.path)  # not sent back to the login form

    first = result.page("fleet_manager", "/console/fleet/")
    assert first.next_link
    assert first.rows == fleet.PAGE_SIZE <= console_bench.PAGE_SIZE
    assert f"{console_bench.PLATE}00000" in first.text
    assert f"{console_bench.PLATE}{fleet.PAGE_SIZE:05d}" not in first.text
    # the second page (the bench followed the first page's own "next" link) goes on from there
    second = [p for p in result.pages if p.path.startswith("/console/fleet/?page_token=")]
    assert len(second) == 1
    assert second[0].rows == fleet.PAGE_SIZE
    assert f"{console_bench.PLATE}{fleet.PAGE_SIZE:05d}" in second[0].text
    assert f"{console_bench.PLATE}00000" not in second[0].text

    # the cost report: a page of 50, and the other 10 behind its own "next" link
    report = result.page("fleet_manager", "/console/fleet/report")
    assert report.rows == fleet.REPORT_PAGE_SIZE and report.next_link
    more = [p for p in result.pages if p.path.startswith("/console/fleet/report?")
            and "page_token=" in p.path and "start=" not in p.path and "flagged" not in p.path]
    assert [p.rows for p in more] == [VEHICLES - fleet.REPORT_PAGE_SIZE]

    # the reviewer's queue: a full first page of the bench's suspended fills, and a second
    queue = result.page("reviewer", "/console/reviewer/")
    assert queue.text.count("BENCH-REVIEW") == console_bench.PAGE_SIZE and queue.next_link
    rest = [p for p in result.pages if p.path.startswith("/console/reviewer/?page_token=")]
    assert len(rest) == 1
    assert rest[0].text.count("BENCH-REVIEW") == console_bench.SUSPENDED - console_bench.PAGE_SIZE
    # finance: the proposed adjustments, a full page and a second one
    proposed = result.page("finance", "/console/finance/adjustments")
    assert proposed.text.count("压测：待复核的调账") == console_bench.PAGE_SIZE and proposed.next_link
    assert "儿子" in result.page("holder", "/console/family/").text
    assert result.page("risk_officer", "/console/risk/").rows >= 1
    assert "| fleet_manager | `/console/fleet/` |" in result.table()
