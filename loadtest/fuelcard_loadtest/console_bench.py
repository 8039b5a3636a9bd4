"""`fuelcard-loadtest console`: every console page in a real browser, on a
fleet of 10 000 vehicles with a year of sales (issue 19: ≤ 300 ms a page).

The data set is the loadtest's own (seed.py, history.py): the hot-fleet
layout (ONE corporate account funding every card) with a year of sales,
written set-based inside PostgreSQL. The bench then gives each card a
vehicle of its own: a SHARED sub-account of the fleet account with a plate
as its label (what OpenAccount(parent, SHARED) and IssueCard would have
left), and makes each past sale that vehicle's (holds.spender_account_id),
so the fleet pages meet 10 000 vehicles and their year. A family (main card
holder, two members with a card each) is opened through the core, and a risk
rule set put in force, so the other roles' pages have rows too.

Then a core (`fuelcard serve`, development listener: the console calls it
without TLS) and the console (mounted on an aiohttp app on a thread of its
own, reports reading --reports-database-url or the primary) start; one
console user per role logs in with headless Chromium (Debian's, never
Playwright's download) and opens every GET page of its role, plus the
second page of each paged list (the page's own "next page" link), `visits`
times each. Per page: the browser's Navigation Timing, responseEnd −
requestStart (the server's answer) and loadEventEnd − startTime (the whole
load), median and max.

With --data-dir the database and the data set are kept and reused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import uvloop
from aiohttp import web

from fuelcard_loadtest import risk_rules, seed, server

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "console bench 2026"
LIMIT_MS = 300.0
PAGE_SIZE = 50  # the console's list pages (≤ 50 rows)
RULES_FILE = Path(__file__).resolve().parent.parent / "risk-rules-200.json"
PLATE = "云A·"
SUSPENDED = 60  # authorizations a review rule suspends: more than a page of the reviewer's queue
REVIEW_FROM_FEN = 90_000
ADJUSTMENTS = 60
REVIEW_RULES = {"name": "console-bench-review", "fallback": "review", "review_score": 1000,
                "decline_score": 2000,
                "rules": [{"id": "BENCH-REVIEW", "action": "review", "kind": "amount",
                           "min_amount_fen": REVIEW_FROM_FEN}]}


@dataclass(frozen=True)
class Options:
    vehicles: int = 10_000
    weeks: int = 52
    fills_per_week: int = 2
    visits: int = 5
    data_dir: Path | None = None
    # an already running development core and its database (the tests' own), instead of
    # `fuelcard serve` on the embedded PostgreSQL in data_dir
    target: str | None = None
    database_url: str | None = None
    card_index_key: bytes | None = None
    reports_database_url: str | None = None
    workers: int = 2
    history_jobs: int = 2
    out: Path | None = None

    @property
    def sales(self) -> int:
        return self.vehicles * self.weeks * self.fills_per_week

    @property
    def history_entries(self) -> int:
        # hot-fleet: one account (its opening recharge) + 2 entries a sale + 1 a recharge,
        # SALES_PER_RECHARGE sales to a recharge (history.Plan.of inverted)
        return 1 + -(-self.sales * 9 // 4)


@dataclass
class PageTimes:
    role: str
    path: str
    statuses: list[int] = field(default_factory=list)
    response_ms: list[float] = field(default_factory=list)
    load_ms: list[float] = field(default_factory=list)
    rows: int = 0  # table rows on the page's last visit
    next_link: bool = False
    text: str = ""  # the page's main text on its last visit

    @property
    def median_ms(self) -> float:
        return statistics.median(self.response_ms)

    @property
    def max_ms(self) -> float:
        return max(self.response_ms)

    @property
    def ok(self) -> bool:
        return self.max_ms <= LIMIT_MS

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "path": self.path, "statuses": self.statuses,
                "response_ms": self.response_ms, "load_ms": self.load_ms, "rows": self.rows,
                "next_link": self.next_link, "median_ms": self.median_ms, "max_ms": self.max_ms}


@dataclass
class Result:
    pages: list[PageTimes]
    vehicles: int
    sales: int
    seed_seconds: float
    fleet_account: str
    loadavg: tuple[float, float, float]

    def page(self, role: str, path: str) -> PageTimes:
        for p in self.pages:
            if p.role == role and p.path == path:
                return p
        raise KeyError(f"{role} {path}")

    def table(self) -> str:
        lines = ["| role | page | median ms | max ms | load median ms | rows | ≤ 300 ms |",
                 "|---|---|---:|---:|---:|---:|---|"]
        for p in self.pages:
            lines.append(f"| {p.role} | `{p.path}` | {p.median_ms:.0f} | {p.max_ms:.0f}"
                         f" | {statistics.median(p.load_ms):.0f} | {p.rows}"
                         f" | {'yes' if p.ok else '**no**'} |")
        return "\n".join(lines)


# --- the data -----------------------------------------------------------------------------

VEHICLES_SQL = """
WITH fleet AS (SELECT id FROM fc.accounts WHERE uid = %(fleet)s::uuid),
     made AS (
    INSERT INTO fc.accounts (kind, created_at, parent_id, funding_mode, label)
    SELECT 2, a.created_at, fleet.id, 2, %(plate)s || lpad(lc.i::text, 5, '0')
      FROM loadtest.cards lc JOIN fc.cards c ON c.pan_index = lc.pan_index
      JOIN fc.accounts a ON a.id = c.account_id, fleet
     WHERE lc.tag = %(tag)s
     ORDER BY lc.i  -- ids in plate order, as a fleet would have opened them
    RETURNING id, label)
INSERT INTO fc.account_holders (account_id, name) SELECT id, label FROM made
"""

# each card onto its vehicle (card i ↔ plate i), then each past sale onto the card's vehicle
CARDS_SQL = """
UPDATE fc.cards c SET account_id = v.id
  FROM loadtest.cards lc, fc.accounts v, fc.accounts f
 WHERE lc.tag = %(tag)s AND c.pan_index = lc.pan_index AND f.uid = %(fleet)s::uuid
   AND v.parent_id = f.id AND v.label = %(plate)s || lpad(lc.i::text, 5, '0')
"""
HOLDS_SQL = """
UPDATE fc.holds h SET spender_account_id = c.account_id
  FROM fc.cards c, fc.accounts v, fc.accounts f
 WHERE h.card_id = c.id AND c.account_id = v.id AND v.parent_id = f.id
   AND f.uid = %(fleet)s::uuid AND h.spender_account_id IS DISTINCT FROM c.account_id
"""


def _vehicles(url: str, tag: int, fleet: str, log: Callable[[str], None]) -> None:
    params = {"tag": tag, "fleet": fleet, "plate": PLATE}
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM fc.accounts v JOIN fc.accounts f ON v.parent_id = f.id"
                           " WHERE f.uid = %(fleet)s::uuid", params).fetchone()
        if row is not None and row[0]:
            return  # reused: done before
        started = time.monotonic()
        conn.execute(VEHICLES_SQL, params)
        conn.execute(CARDS_SQL, params)
        # a year of holds changes only its spender: the holds' row triggers (state machine,
        # outbox on a state change) have nothing to say, and running them a million times took
        # minutes (the embedded database's user is a superuser)
        conn.execute("SET LOCAL session_replication_role = replica")
        # the statistics still say every card is the fleet account's: the planner then took a
        # nested loop over the fleet's 10 000 vehicles for each of a million holds
        conn.execute("SET LOCAL enable_nestloop = off")
        moved = conn.execute(HOLDS_SQL, params).rowcount
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) fc.accounts, fc.account_holders, fc.cards, fc.holds")
    log(f"console: vehicles made, {moved} past sales moved onto them in"
        f" {time.monotonic() - started:.0f} s")


def _family(target: str) -> str:
    """A family account with two members (a card each), through the core;
    its uid."""
    from fuelcard.v1 import account_pb2, account_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = account_pb2_grpc.AccountServiceStub(channel)
        stamp = f"{time.time_ns():x}"
        main = stub.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=f"bench-family-{stamp}", type=account_pb2.ACCOUNT_TYPE_FAMILY,
            holder=account_pb2.Holder(name="压测家庭")), timeout=10).account
        for n, label in enumerate(("儿子", "女儿")):
            member = stub.OpenAccount(account_pb2.OpenAccountRequest(
                request_id=f"bench-member-{stamp}-{n}", parent_account_id=main.account_id,
                funding_mode=account_pb2.FUNDING_MODE_SHARED, label=label,
                holder=account_pb2.Holder(name=label)), timeout=10).account
            stub.IssueCard(account_pb2.IssueCardRequest(request_id=f"bench-card-{stamp}-{n}",
                                                        account_id=member.account_id), timeout=10)
        return str(main.account_id)


def _suspended(target: str, url: str, tag: int, vehicles: int, log: Callable[[str], None]) -> None:
    """Holds for the reviewer's queue: a rule set that sends big fills to review, and
    SUSPENDED such authorizations at a pump (the POS path, as in service); then the
    loadtest's 200-rule set goes in force after it (a second rule set version)."""
    from fuelcard.v1 import common_pb2, transaction_pb2, transaction_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "review.json"
        rules.write_text(json.dumps(REVIEW_RULES))
        risk_rules.apply(url, str(rules), log=log)
    stamp = f"{time.time_ns():x}"
    with grpc.insecure_channel(target) as channel:
        pos = transaction_pb2_grpc.TransactionServiceStub(channel)
        for i in range(SUSPENDED):
            pos.Authorize(transaction_pb2.AuthorizeRequest(
                request_id=f"bench-review-{stamp}-{i}", card_number=seed.card_number(tag, i % vehicles),
                amount_fen=REVIEW_FROM_FEN + i, station_id="BENCH-KM-01", terminal_id="BENCH-KM-01-T1",
                nozzle=1, product=common_pb2.PRODUCT_GASOLINE_92), timeout=10)
    risk_rules.apply(url, str(RULES_FILE), log=log)


def _adjustments(target: str, account: str) -> None:
    """Adjustments awaiting a second person's approval, for the finance pages
    (more than a page of them)."""
    from fuelcard.v1 import adjustment_pb2, adjustment_pb2_grpc

    stamp = f"{time.time_ns():x}"
    with grpc.insecure_channel(target) as channel:
        stub = adjustment_pb2_grpc.AdjustmentServiceStub(channel)
        for i in range(ADJUSTMENTS):
            stub.ProposeAdjustment(adjustment_pb2.ProposeAdjustmentRequest(
                request_id=f"bench-adjust-{stamp}-{i}", account_id=account,
                direction=adjustment_pb2.ADJUSTMENT_DIRECTION_CREDIT, amount_fen=100 + i,
                reason="压测：待复核的调账"), timeout=10)


def _users(url: str, fleet: str, family: str) -> dict[str, str]:
    """One console user per role: role -> login (password PASSWORD)."""
    from fuelcard_console import users

    stamp = f"{time.time_ns():x}"[-8:]
    made: dict[str, str] = {}
    for role, account in (("fleet_manager", fleet), ("holder", family), ("reviewer", None),
                          ("finance", None), ("risk_officer", None), ("sre", None)):
        login = f"bench-{role.replace('_', '-')}-{stamp}"
        users.add(url, login=login, role=role, account_id=account, password=PASSWORD, by="console-bench")
        made[role] = login
    return made


# --- the console --------------------------------------------------------------------------


class Edge:
    """The console on an aiohttp app, on a thread and uvloop of its own (the
    browser is driven by Playwright's sync API on this thread)."""

    def __init__(self, target: str, url: str, reports_url: str | None) -> None:
        from fuelcard_console.context import Console, ConsoleSettings

        self.console = Console(ConsoleSettings(target=target, database_url=url,
                                               reports_database_url=reports_url, cookie_secure=False,
                                               sre_sample_interval_s=5.0))
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="console-edge")
        self.runner: web.AppRunner | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)

    def start(self) -> str:
        from fuelcard_console.views import install

        self.thread.start()

        async def up() -> int:
            app = web.Application()
            install(app, self.console)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port: int = self.runner.addresses[0][1]
            return port

        return f"http://127.0.0.1:{self._run(up())}"

    def stop(self) -> None:
        if self.runner is not None:
            self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


# How far the journal's hash chain and the report rollups (the cost report's and the
# statements') are behind the newest journal entry. In service they follow within a round of
# the newest commit; a data set loaded a moment ago has a year of entries for them to catch up
# on first, and until they do, reports take their exact but slow fallbacks: the bench measures
# the pages as they are in service, after the catch-up, and says how long that took.
BACKLOG_SQL = """
    SELECT coalesce((SELECT max(id) FROM fc.journal), 0) - least(
        coalesce((SELECT max(entry_id) FROM fc.journal_chain), 0),
        (SELECT rolled_id FROM fc.cost_rollup_state),
        (SELECT rolled_id FROM fc.statement_rollup_state))"""
# A rollup read right after a backfill is every row dead or not yet marked all-visible, and
# its index-only scans read the table too (the cost report: 300 ms, against 82 ms once
# vacuumed); autovacuum (migration 0021's thresholds) takes it within a minute or two, as it
# would after a migration in service. The bench waits for that as well: the rollups' dead rows
# down to what autovacuum leaves.
UNVACUUMED_SQL = """
    SELECT count(*) FROM pg_stat_user_tables
     WHERE schemaname = 'fc' AND relname IN ('vehicle_costs', 'statement_movements')
       AND n_dead_tup > 0.01 * n_live_tup + 50"""
CATCH_UP_TIMEOUT_S = 3600.0


def _catch_up(url: str, log: Callable[[str], None]) -> float:
    """Wait until the chain and the rollups have caught up with the journal
    (the server's jobs do the work) and autovacuum has been through the
    rollups; returns the seconds it took."""
    started = time.monotonic()
    reported = 0.0
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(BACKLOG_SQL).fetchone()
            backlog = int(row[0]) if row is not None else 0
            waited = time.monotonic() - started
            if backlog <= 0:
                row = conn.execute(UNVACUUMED_SQL).fetchone()
                if row is not None and row[0] == 0:
                    return waited
            if waited > CATCH_UP_TIMEOUT_S:
                raise RuntimeError(f"the journal chain and the rollups are still {backlog} entries"
                                   f" behind after {waited:.0f} s")
            if waited - reported >= 30:
                log(f"console: the chain and rollups are {backlog} journal entries behind"
                    f"{' (waiting for their vacuum)' if backlog <= 0 else ''} ...")
                reported = waited
            time.sleep(1.0)


TIMING_JS = """() => { const n = performance.getEntriesByType('navigation')[0];
  return [n.responseEnd - n.requestStart, n.loadEventEnd - n.startTime]; }"""


def _pages(url: str, fleet: str, family: str) -> dict[str, list[str]]:
    """Every GET page of every role (ids taken from the data)."""
    with psycopg.connect(url) as conn:
        card = conn.execute(
            "SELECT c.uid::text FROM fc.cards c JOIN fc.accounts v ON v.id = c.account_id"
            " JOIN fc.accounts f ON f.id = v.parent_id WHERE f.uid = %s::uuid ORDER BY v.label LIMIT 1",
            (fleet,)).fetchone()
        member = conn.execute(
            "SELECT v.uid::text FROM fc.accounts v JOIN fc.accounts f ON f.id = v.parent_id"
            " WHERE f.uid = %s::uuid ORDER BY v.id LIMIT 1", (family,)).fetchone()
    assert card is not None and member is not None
    month = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=8)).replace(day=1) - dt.timedelta(days=1)
    year_ago = month.replace(year=month.year - 1) + dt.timedelta(days=1)
    return {
        # the cost report: this month so far (the default), last month, the last twelve months
        # (the longest period it takes), and the flagged vehicles alone
        "fleet_manager": ["/console/fleet/", "/console/fleet/report",
                          f"/console/fleet/report?start={month:%Y-%m}-01&end={month:%Y-%m-%d}",
                          f"/console/fleet/report?start={year_ago:%Y-%m-%d}&end={month:%Y-%m-%d}",
                          "/console/fleet/report?flagged=1",
                          f"/console/fleet/statements?month={month:%Y-%m}", "/console/fleet/invoices",
                          "/console/fleet/vehicles/new", "/console/fleet/topup",
                          f"/console/fleet/cards/{card[0]}/controls"],
        "holder": ["/console/family/", f"/console/family/members/{member[0]}"],
        "reviewer": ["/console/reviewer/", "/console/reviewer/audit"],
        "finance": ["/console/finance/", "/console/finance/breaks", "/console/finance/exceptions",
                    "/console/finance/adjustments"],
        "risk_officer": ["/console/risk/", "/console/risk/new", "/console/risk/backtest"],
        "sre": ["/console/sre/"],
    }


def _visit_all(base_url: str, logins: dict[str, str], pages: dict[str, list[str]], visits: int,
               log: Callable[[str], None]) -> list[PageTimes]:
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install chromium")
    found: list[PageTimes] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            for role, paths in pages.items():
                context = browser.new_context(base_url=base_url, locale="zh-CN")
                context.set_default_timeout(60_000)
                page = context.new_page()
                page.goto("/console/login")
                page.fill("input[name=login]", logins[role])
                page.fill("input[name=password]", PASSWORD)
                with page.expect_navigation():
                    page.click("main button[type=submit]")
                todo = list(paths)
                while todo:
                    path = todo.pop(0)
                    times = PageTimes(role, path)
                    for _ in range(visits):
                        response = page.goto(path)
                        times.statuses.append(response.status if response is not None else 0)
                        answer, load = page.evaluate(TIMING_JS)
                        times.response_ms.append(round(float(answer), 1))
                        times.load_ms.append(round(float(load), 1))
                    times.rows = page.locator("main table tbody tr").count()
                    times.text = page.inner_text("main")
                    # the list's own "next page" link (page_token=)
                    nxt = page.locator("main a[rel=next], main a[href*='page_token=']")
                    times.next_link = nxt.count() > 0
                    if times.next_link and "page_token=" not in path:
                        href = nxt.first.get_attribute("href") or ""
                        todo.insert(0, href if href.startswith("/") else
                                    path.split("?")[0] + href if href.startswith("?") else href)
                    found.append(times)
                    log(f"console: {role} {path}: {times.statuses[-1]}, median {times.median_ms:.0f} ms,"
                        f" max {times.max_ms:.0f} ms, {times.rows} rows")
                context.close()
        finally:
            browser.close()
    return found


def run(opts: Options, log: Callable[[str], None] = print) -> Result:
    local: server.LocalServer | None = None
    made_dir: Path | None = None
    edge: Edge | None = None
    try:
        if opts.target is None:
            data_dir = opts.data_dir
            if data_dir is None:
                made_dir = data_dir = Path(tempfile.mkdtemp(prefix="fuelcard-console-bench-"))
            local = server.LocalServer(data_dir.resolve(), workers=opts.workers)
            log(f"console: starting fuelcard serve in {data_dir} ...")
            local.start()
            target, url = local.target, local.database_url()
            from fuelcard_server.settings import Settings

            settings = Settings.from_env()
            settings.data_dir = data_dir.resolve()
            key = settings.card_index_key()
        else:
            assert opts.database_url is not None and opts.card_index_key is not None
            target, url, key = opts.target, opts.database_url, opts.card_index_key
        started = time.monotonic()
        dataset = seed.seed(url, key, "hot-fleet", opts.vehicles, history_entries=opts.history_entries,
                            history_jobs=opts.history_jobs, log=log)
        fleet = seed.account_uid(dataset.tag, 0)
        _vehicles(url, dataset.tag, fleet, log)
        family = _family(target)
        _suspended(target, url, dataset.tag, opts.vehicles, log)
        _adjustments(target, fleet)
        seed_seconds = time.monotonic() - started
        # (a core the caller runs, the tests' own, runs its jobs on its own schedule)
        catch_up_seconds = _catch_up(url, log) if local is not None else 0.0
        log(f"console: the journal chain and the rollups caught up (and were vacuumed)"
            f" in {catch_up_seconds:.0f} s")
        logins = _users(url, fleet, family)
        edge = Edge(target, url, opts.reports_database_url)
        base_url = edge.start()
        log(f"console: serving on {base_url}; {opts.visits} visits a page")
        pages = _visit_all(base_url, logins, _pages(url, fleet, family), opts.visits, log)
        load1, load5, load15 = os.getloadavg()
        result = Result(pages, opts.vehicles, opts.sales, seed_seconds, fleet, (load1, load5, load15))
        if opts.out is not None:
            opts.out.write_text(json.dumps({
                "vehicles": opts.vehicles, "sales": opts.sales, "visits": opts.visits,
                "seed_seconds": seed_seconds, "catch_up_seconds": catch_up_seconds,
                "loadavg": result.loadavg,
                "pages": [p.as_dict() for p in pages]}, ensure_ascii=False, indent=1))
        log(result.table())
        return result
    finally:
        if edge is not None:
            edge.stop()
        if local is not None:
            local.stop()
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`fuelcard-loadtest console [...]`: 0 when every page answered 200, 1
    otherwise (the times are the report, not a verdict: the machine is shared)."""
    import argparse

    p = argparse.ArgumentParser(prog="fuelcard-loadtest console", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vehicles", type=int, default=10_000, help="vehicles of the fleet (default 10000)")
    p.add_argument("--weeks", type=int, default=52, help="weeks of sales behind them (default 52)")
    p.add_argument("--fills-per-week", type=int, default=2, help="sales a vehicle a week (default 2)")
    p.add_argument("--visits", type=int, default=5, help="times each page is opened (default 5)")
    p.add_argument("--data-dir", type=Path, help="keep (and reuse) the database here")
    p.add_argument("--reports-database-url", help="the replica or warehouse the reports read"
                   " (default: the primary)")
    p.add_argument("--history-jobs", type=int, default=2, help="connections loading the history")
    p.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = p.parse_args(argv)
    result = run(Options(vehicles=args.vehicles, weeks=args.weeks, fills_per_week=args.fills_per_week,
                         visits=args.visits, data_dir=args.data_dir,
                         reports_database_url=args.reports_database_url,
                         history_jobs=args.history_jobs, out=args.out))
    print(f"load average {result.loadavg[0]:.2f} {result.loadavg[1]:.2f} {result.loadavg[2]:.2f};"
          f" {sum(not p.ok for p in result.pages)} of {len(result.pages)} pages over {LIMIT_MS:.0f} ms")
    return 0 if all(s == 200 for p in result.pages for s in p.statuses) else 1
