"""The operator console in a real headless browser: fixtures for the
console tests (tests/test_console_*.py).

`console`: a core server with mutual TLS (the edge calls it with an admin
certificate, and a reviewer one for hold reviews, as in production), the HTTP
edge (`fuelcard-api serve`'s Api with the console mounted under /console/)
on loopback on a thread and event loop of its own, and a second core server
on the same database in development mode (no TLS: every role) for the test's
own setup: `console.server` is a RunningServer for tests/support/builders and
control_builders (open fleets, recharge, authorize at a pump). All three share
one ManualClock (`console.clock`, `console.advance`): the console's sessions
and TOTP codes, and the core's holds, move together.

`browser` (one per session) and `page` (a fresh browser context per test:
no cookies carried over, base URL the console's): Playwright's sync API
driving Debian's Chromium (/usr/bin/chromium, headless; Playwright's own
browser download never runs). The servers run on their own threads, so the
test thread has no asyncio loop running, as the sync API needs.

`login(page, login, password)` logs in through the form and waits for the
landing page; `step_up(page, totp_secret)` enters the TOTP code on the
step-up page the console redirected to and waits to be sent back.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pyotp
import pytest
import uvloop
from aiohttp import web
from fuelcard_api.app import Api, ApiSettings
from fuelcard_console import auth, users
from fuelcard_console.context import Console, ConsoleSettings
from fuelcard_console.views import install
from fuelcard_server.clock import ManualClock
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.plugins.server import RunningServer, ServerThread, make_settings, same_keys

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "console pass 2026"
START = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)
ADMIN_CERT = "admin-ops"  # tests/plugins/server.py TLS_CALLERS
REVIEWER_CERT = "reviewer-risk"
_logins = itertools.count(1)


class EdgeThread:
    """The HTTP edge (JSON API + console) on its own thread and uvloop."""

    def __init__(self, api: Api, console: Console,
                 extra_routes: Callable[[web.UrlDispatcher], None] | None = None) -> None:
        self.api, self.console, self.extra_routes = api, console, extra_routes
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuelcard-edge")
        self.runner: web.AppRunner | None = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def start(self) -> int:
        self.thread.start()

        async def up() -> int:
            await self.api.start()
            app = self.api.app()
            install(app, self.console)
            if self.extra_routes is not None:
                self.extra_routes(app.router)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port: int = self.runner.addresses[0][1]
            return port

        port: int = self.run(up())
        return port

    def stop(self) -> None:
        async def down() -> None:
            if self.runner is not None:
                await self.runner.cleanup()
            await self.api.stop()

        self.run(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class RunningConsole:
    base_url: str
    database_url: str
    clock: ManualClock
    server: RunningServer  # the development-mode core, for the test's own setup
    core_target: str  # the TLS core the edge calls
    metrics_url: str
    edge: EdgeThread
    certs: Path
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def console(self) -> Console:
        return self.edge.console

    def url(self, path: str) -> str:
        return self.base_url + path

    def core_channel(self) -> grpc.Channel:
        """A channel to the core as any caller (development mode): a POS, a
        payment channel, an admin; closed when the test ends."""
        channel = grpc.insecure_channel(self.server.target)
        self.channels.append(channel)
        return channel

    def tls_channel(self, name: str = ADMIN_CERT) -> grpc.Channel:
        """A channel to the TLS core (the one the edge calls) as a caller of
        tests/plugins/server.py TLS_CALLERS; closed when the test ends."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(self.certs / "ca.pem").read_bytes(),
            private_key=(self.certs / f"{name}.key").read_bytes(),
            certificate_chain=(self.certs / f"{name}.pem").read_bytes())
        channel = grpc.secure_channel(self.core_target, credentials)
        self.channels.append(channel)
        return channel

    def sample_sre(self) -> Any:
        """Take one SRE sample now (the SRE page shows the latest)."""
        return self.edge.run(self.console.sre.sample_once())

    def make_user(self, role: auth.Role | str, account_uid: str | None = None) -> tuple[str, str, str]:
        """A console user: (login, password, TOTP secret)."""
        value = role.value if isinstance(role, auth.Role) else role
        login = f"{value.replace('_', '-')}.{next(_logins)}"
        made = users.add(self.database_url, login=login, role=value, account_id=account_uid,
                         password=PASSWORD, by="test")
        return made.login, made.password, made.totp_secret

    def advance(self, delta: dt.timedelta) -> None:
        self.clock.advance(delta)

    def run(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine factory on the edge's loop (e.g. a console job) and wait for it."""
        return self.edge.run(fn())

    def totp(self, secret: str) -> str:
        """The code an authenticator shows now (by the console's clock)."""
        return pyotp.TOTP(secret, interval=auth.TOTP_STEP_S).at(self.clock.now())


def start_console(database_url: str, tmp_path: Path, dev_certs: Path, *,
                  reports_database_url: str | None = None,
                  keys: dict[str, Any] | None = None,
                  extra_routes: Callable[[web.UrlDispatcher], None] | None = None
                  ) -> Iterator[RunningConsole]:
    """The `console` fixture's parts, for a test that needs them otherwise:
    another database (a primary with a streaming standby as the reports
    database), or the key set of a database shared across a module's tests
    (tests/plugins/server.py cluster_keys), or routes of the test's own
    (`extra_routes(router)`, e.g. a handler to exercise a framework part)."""
    clock = ManualClock(START)
    (tmp_path / "core").mkdir(exist_ok=True)
    tls_settings = make_settings(tmp_path / "core", insecure=False, tls_dir=dev_certs,
                                 metrics_listen="127.0.0.1:0", **(keys or {}))
    core = ServerThread(tls_settings, database_url, clock)
    core_port = core.start()
    (tmp_path / "dev").mkdir(exist_ok=True)
    dev_settings = make_settings(tmp_path / "dev", **same_keys(tls_settings))
    dev = ServerThread(dev_settings, database_url, clock)
    edge: EdgeThread | None = None
    channel: grpc.Channel | None = None
    try:
        dev_port = dev.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{dev_port}")
        server = RunningServer(f"127.0.0.1:{dev_port}", database_url, clock, dev_settings, dev.server,
                               dev.loop, channel)
        target = f"127.0.0.1:{core_port}"
        metrics_url = f"http://127.0.0.1:{core.server.metrics_port}/metrics"
        api = Api(ApiSettings(target=target, ca=dev_certs / "ca.pem", cert=dev_certs / f"{ADMIN_CERT}.pem",
                              key=dev_certs / f"{ADMIN_CERT}.key", database_url=database_url,
                              ip_rate=1000.0, ip_burst=1000, principal_rate=1000.0, pool_max=2),
                  now=clock.now)
        settings = ConsoleSettings(
            target=target, database_url=database_url, ca=dev_certs / "ca.pem",
            cert=dev_certs / f"{ADMIN_CERT}.pem", key=dev_certs / f"{ADMIN_CERT}.key",
            reviewer_cert=dev_certs / f"{REVIEWER_CERT}.pem", reviewer_key=dev_certs / f"{REVIEWER_CERT}.key",
            reports_database_url=reports_database_url, metrics_url=metrics_url, cookie_secure=False,
            pool_max=4, reports_pool_max=2,
            # sampled when a test asks (RunningConsole.sample_sre) or the page finds no sample
            # yet, not behind the test's back
            sre_sample_interval_s=3600.0)
        edge = EdgeThread(api, Console(settings, clock=clock), extra_routes)
        port = edge.start()
        running = RunningConsole(f"http://127.0.0.1:{port}", database_url, clock, server, target,
                                 metrics_url, edge, dev_certs)
        yield running
        for ch in running.channels:
            ch.close()
    finally:
        if edge is not None:
            edge.stop()
        if channel is not None:
            channel.close()
        dev.stop()
        core.stop()


@pytest.fixture
def console(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[RunningConsole]:
    yield from start_console(database_url, tmp_path, dev_certs)


# Module scope, not session: Playwright's sync API keeps an asyncio loop
# running in the test thread while it is started, and every later test that
# calls asyncio.run() in that thread would fail. Stopping it after each module
# costs one Chromium start per console test module.
@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/bootstrap does)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    # --no-sandbox: CI runs as root, where Chromium's sandbox will not start
    b = playwright_driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
    yield b
    b.close()


@pytest.fixture
def page(browser: Browser, console: RunningConsole) -> Iterator[Page]:
    context = browser.new_context(base_url=console.base_url, locale="zh-CN",
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    p = context.new_page()
    yield p
    context.close()


LoginHelper = Callable[[Page, str, str], None]
StepUpHelper = Callable[[Page, str], None]


@pytest.fixture
def login() -> LoginHelper:
    def go(page: Page, name: str, password: str) -> None:
        page.goto("/console/login")
        page.fill("input[name=login]", name)
        page.fill("input[name=password]", password)
        with page.expect_navigation():
            page.click("main button[type=submit]")

    return go


@pytest.fixture
def step_up(console: RunningConsole) -> StepUpHelper:
    """Enter the TOTP code on the step-up page. A code works once: when the
    user stepped up already in this 30-second step, the console's clock is
    moved on to the next step first."""

    def go(page: Page, secret: str) -> None:
        assert page.url.split("?")[0].endswith("/console/step-up"), page.url
        with psycopg.connect(console.database_url) as conn:
            row = conn.execute("SELECT max(totp_last_step) FROM fc.console_users WHERE totp_secret = %s",
                               (secret,)).fetchone()
        last = row[0] if row is not None and row[0] is not None else 0
        if int(console.clock.now().timestamp()) // auth.TOTP_STEP_S <= last:
            console.advance(dt.timedelta(seconds=auth.TOTP_STEP_S))
        page.fill("input[name=code]", console.totp(secret))
        with page.expect_navigation():
            page.click("main button[type=submit]")

    return go




def navigation_ms(page: Page) -> float:
    """How long the page's last navigation took in the browser, from the
    request to the end of the response (ms): the server's answer as the user
    waits for it (Navigation Timing). For the BENCHMARKS.md page times."""
    value = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                          " return n.responseEnd - n.requestStart; }")
    return float(value)
