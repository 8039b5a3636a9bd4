"""The console's login, sessions, CSRF, roles, step-up and audit trail, in a
real headless browser (Debian's Chromium) against a real core (mutual TLS)
and a real database."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from aiohttp import web
from fuelcard_console import auth
from fuelcard_console.auth import ConsoleUser, Role, audit, audit_fields, requires
from fuelcard_console.views import main_page, read_upload
from playwright.sync_api import Browser, FilePayload, Page

from tests.plugins.console import LoginHelper, RunningConsole, StepUpHelper, start_console
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn

NEW_PASSWORD = "a new pass 2026"


def audit_count(db: Conn, action: str, outcome: str | None = None) -> int:
    sql = "SELECT count(*) FROM fc.audit_log WHERE method = %s"
    args: tuple[str, ...] = (f"/fuelcard.console/{action}",)
    if outcome is not None:
        sql += " AND outcome = %s"
        args += (outcome,)
    row = db.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def submit_login(page: Page, name: str, password: str) -> int:
    page.goto("/console/login")
    page.fill("input[name=login]", name)
    page.fill("input[name=password]", password)
    with page.expect_response(lambda r: r.url.endswith("/console/login") and r.request.method == "POST"
                              ) as response:
        page.click("main button[type=submit]")
    status: int = response.value.status
    return status


def visit(page: Page, path: str) -> str:
    """Open a page; where the browser ended up (after any redirect)."""
    page.goto(path)
    return page.url


def session_cookie(page: Page) -> str | None:
    for cookie in page.context.cookies():
        if cookie["name"] == auth.COOKIE:
            return cookie["value"]
    return None


def test_login_lands_on_the_role_main_page_and_is_audited(console: RunningConsole, page: Page,
                                                          login: LoginHelper, db: Conn) -> None:
    name, password, _ = console.make_user(Role.SRE)
    login(page, name, password)
    assert page.url == console.url("/console/sre/")
    assert page.locator("html").get_attribute("lang") == "zh-CN"
    assert page.locator("header .login").inner_text() == name
    assert page.locator("header .role").inner_text() == "运维 (SRE)"
    assert audit_count(db, "Login", "OK") == 1
    # the cookie is HttpOnly and SameSite=Strict: no script reads it, no other site sends it
    cookie = next(c for c in page.context.cookies() if c["name"] == auth.COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # only its hash is stored
    rows = db.execute("SELECT token_hash FROM fc.console_sessions").fetchall()
    assert rows == [(auth.token_hash(cookie["value"]),)]


def test_wrong_password_and_unknown_login_get_the_same_answer(console: RunningConsole, page: Page,
                                                               db: Conn) -> None:
    name, _, _ = console.make_user(Role.FINANCE)
    answers = []
    for login_name, password in ((name, "not the password"), ("nobody.here", "whatever pass")):
        status = submit_login(page, login_name, password)
        answers.append((status, page.locator("main .error").inner_text(), page.url))
        assert session_cookie(page) is None
    assert answers[0] == answers[1]
    assert answers[0][0] == 401
    assert answers[0][1] == "登录名或密码错误，或尝试次数过多已被暂时锁定。"
    assert audit_count(db, "Login", "UNAUTHENTICATED LOGIN_FAILED") == 2
    assert db.execute("SELECT count(*) FROM fc.console_sessions").fetchone() == (0,)


def test_repeated_wrong_passwords_lock_the_login_for_a_while(console: RunningConsole, page: Page,
                                                             login: LoginHelper, db: Conn) -> None:
    name, password, _ = console.make_user(Role.REVIEWER)
    for _ in range(auth.MAX_FAILED_LOGINS):
        assert submit_login(page, name, "wrong password!") == 401
    # locked: even the right password is refused, with the same answer
    assert submit_login(page, name, password) == 401
    assert session_cookie(page) is None
    assert audit_count(db, "Login", "UNAUTHENTICATED LOGIN_LOCKED") == 1
    console.advance(dt.timedelta(seconds=auth.LOCK_S + 1))
    login(page, name, password)
    assert page.url == console.url("/console/reviewer/")


def test_an_idle_session_expires_after_30_minutes(console: RunningConsole, page: Page,
                                                  login: LoginHelper) -> None:
    name, password, _ = console.make_user(Role.SRE)
    login(page, name, password)
    console.advance(dt.timedelta(minutes=29))
    assert visit(page, "/console/sre/") == console.url("/console/sre/")  # still alive; touched
    console.advance(dt.timedelta(minutes=29))
    assert visit(page, "/console/sre/") == console.url("/console/sre/")
    console.advance(dt.timedelta(minutes=30, seconds=1))
    response = page.goto("/console/sre/")
    assert response is not None and response.status == 200
    assert page.url == console.url("/console/login?next=%2Fconsole%2Fsre%2F")
    # logging in again goes back where the user was
    page.fill("input[name=login]", name)
    page.fill("input[name=password]", password)
    with page.expect_navigation():
        page.click("main button[type=submit]")
    assert page.url == console.url("/console/sre/")


def test_a_busy_session_still_ends_12_hours_after_login(console: RunningConsole, page: Page,
                                                        login: LoginHelper) -> None:
    name, password, _ = console.make_user(Role.FINANCE)
    login(page, name, password)
    for _ in range(12 * 3):  # a request every 20 minutes: never idle for long
        assert visit(page, "/console/finance/") == console.url("/console/finance/")
        console.advance(dt.timedelta(minutes=20))
    assert visit(page, "/console/finance/").startswith(console.url("/console/login"))


def test_logout_ends_the_session(console: RunningConsole, page: Page, login: LoginHelper,
                                 db: Conn) -> None:
    name, password, _ = console.make_user(Role.SRE)
    login(page, name, password)
    old = session_cookie(page)
    with page.expect_navigation():
        page.click("header form button")
    assert page.url == console.url("/console/login")
    assert audit_count(db, "Logout", "OK") == 1
    assert db.execute("SELECT count(*) FROM fc.console_sessions").fetchone() == (0,)
    # the old cookie, replayed, opens nothing
    assert old is not None
    page.context.add_cookies([{"name": auth.COOKIE, "value": old, "url": console.base_url}])
    assert visit(page, "/console/sre/").startswith(console.url("/console/login"))


@pytest.mark.parametrize("path", ["/console/sre/", "/console/fleet/", "/console/finance/"])
def test_a_reviewer_cannot_open_another_role_page(console: RunningConsole, page: Page, login: LoginHelper,
                                                  db: Conn, path: str) -> None:
    name, password, _ = console.make_user(Role.REVIEWER)
    login(page, name, password)
    response = page.goto(path)
    assert response is not None and response.status == 403
    assert page.locator("main h1").inner_text() == "无权访问"
    assert audit_count(db, "Forbidden", "PERMISSION_DENIED GET") == 1
    # their own page opens
    response = page.goto("/console/reviewer/")
    assert response is not None and response.status == 200


def test_no_session_goes_to_the_login_page(console: RunningConsole, page: Page) -> None:
    response = page.goto("/console/sre/")
    assert response is not None
    assert page.url == console.url("/console/login?next=%2Fconsole%2Fsre%2F")
    assert page.locator("main h1").inner_text() == "登录"


# --- CSRF -------------------------------------------------------------------------------------


def test_a_post_without_or_with_a_wrong_csrf_token_is_refused_and_changes_nothing(
        console: RunningConsole, page: Page, login: LoginHelper, db: Conn) -> None:
    name, password, _ = console.make_user(Role.SRE)
    login(page, name, password)
    # The browser's own request context: it carries the session cookie, as a forged form would
    # if the cookie were not SameSite.
    forms: tuple[dict[str, str | float | bool], ...] = ({}, {"csrf_token": "forged"})
    for form in forms:
        refused = page.request.post("/console/logout", form=form, max_redirects=0)
        assert refused.status == 403
        assert "CSRF" in refused.text()
    # a right token from another origin is refused too
    token = db.execute("SELECT csrf_token FROM fc.console_sessions").fetchone()
    assert token is not None
    refused = page.request.post("/console/logout", form={"csrf_token": token[0]}, max_redirects=0,
                                headers={"Origin": "http://evil.example"})
    assert refused.status == 403
    # nothing changed: the session lives on, no logout was recorded, every refusal was
    assert db.execute("SELECT count(*) FROM fc.console_sessions").fetchone() == (1,)
    assert audit_count(db, "Logout") == 0
    assert audit_count(db, "CsrfRefused", "PERMISSION_DENIED CSRF_TOKEN_INVALID") == 3
    assert visit(page, "/console/sre/") == console.url("/console/sre/")
    # and the right token from this origin works (the check can pass)
    done = page.request.post("/console/logout", form={"csrf_token": token[0]}, max_redirects=0)
    assert done.status == 303
    assert db.execute("SELECT count(*) FROM fc.console_sessions").fetchone() == (0,)


class _EvilSite(BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        body = (f'<!DOCTYPE html><html><body><form id="f" method="post" action="{self.target}">'
                '<input type="hidden" name="csrf_token" value="guess"></form>'
                '<script>document.getElementById("f").submit()</script></body></html>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def evil_site(console: RunningConsole) -> Iterator[str]:
    """Another site (another origin: localhost, not 127.0.0.1) whose page
    posts a form to the console as soon as it loads."""
    handler = type("Evil", (_EvilSite,), {"target": console.url("/console/logout")})
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def test_a_form_posted_from_another_site_is_refused(console: RunningConsole, page: Page,
                                                    login: LoginHelper, db: Conn, evil_site: str) -> None:
    name, password, _ = console.make_user(Role.SRE)
    login(page, name, password)
    with page.expect_response(lambda r: r.url == console.url("/console/logout")) as response:
        page.goto(evil_site)
    assert response.value.status == 403
    assert db.execute("SELECT count(*) FROM fc.console_sessions").fetchone() == (1,)
    assert audit_count(db, "Logout") == 0
    assert audit_count(db, "CsrfRefused") == 1
    assert visit(page, console.url("/console/sre/")) == console.url("/console/sre/")


# --- step-up ----------------------------------------------------------------------------------


def test_a_step_up_action_asks_for_the_totp_code(console: RunningConsole, page: Page, login: LoginHelper,
                                                 step_up: StepUpHelper, db: Conn) -> None:
    name, password, secret = console.make_user(Role.FINANCE)
    login(page, name, password)
    page.goto("/console/account/password")
    assert page.url == console.url("/console/step-up?next=%2Fconsole%2Faccount%2Fpassword")
    # a wrong code is refused, and the action stays closed
    right = console.totp(secret)
    page.fill("input[name=code]", "000000" if right != "000000" else "111111")
    with page.expect_response(lambda r: r.request.method == "POST") as response:
        page.click("main button[type=submit]")
    assert response.value.status == 403
    assert page.locator("main .error").inner_text() == "验证码错误或已使用，请重试。"
    assert visit(page, "/console/account/password").startswith(console.url("/console/step-up"))
    # the right one opens it
    step_up(page, secret)
    assert page.url == console.url("/console/account/password")
    page.fill("input[name=current]", password)
    page.fill("input[name=new]", NEW_PASSWORD)
    page.fill("input[name=again]", NEW_PASSWORD)
    with page.expect_navigation():
        page.click("main button[type=submit]")
    assert page.locator("#password-changed").is_visible()
    assert audit_count(db, "StepUp", "PERMISSION_DENIED STEP_UP_FAILED") == 1
    assert audit_count(db, "StepUp", "OK") == 1
    assert audit_count(db, "ChangePassword", "OK") == 1
    # five minutes later the step-up has lapsed
    console.advance(dt.timedelta(minutes=5, seconds=1))
    assert visit(page, "/console/account/password").startswith(console.url("/console/step-up"))
    # the new password is the one that logs in
    with page.expect_navigation():
        page.click("header form button")
    assert submit_login(page, name, password) == 401
    login(page, name, NEW_PASSWORD)
    assert page.url == console.url("/console/finance/")


def test_a_totp_code_works_once(console: RunningConsole, page: Page, login: LoginHelper) -> None:
    name, password, secret = console.make_user(Role.SRE)
    login(page, name, password)
    page.goto("/console/account/password")
    code = console.totp(secret)
    page.fill("input[name=code]", code)
    with page.expect_navigation():
        page.click("main button[type=submit]")
    assert page.url == console.url("/console/account/password")
    # the same code again, in the same 30 seconds, on a new session
    with page.expect_navigation():
        page.click("header form button")
    login(page, name, password)
    page.goto("/console/account/password")
    page.fill("input[name=code]", code)
    with page.expect_response(lambda r: r.request.method == "POST") as response:
        page.click("main button[type=submit]")
    assert response.value.status == 403


def test_a_post_to_a_step_up_action_without_step_up_changes_nothing(
        console: RunningConsole, page: Page, login: LoginHelper, db: Conn) -> None:
    name, password, _ = console.make_user(Role.SRE)
    login(page, name, password)
    token = db.execute("SELECT csrf_token FROM fc.console_sessions").fetchone()
    assert token is not None
    before = db.execute("SELECT password_hash FROM fc.console_users").fetchone()
    answer = page.request.post("/console/account/password", max_redirects=0, form={
        "csrf_token": token[0], "current": password, "new": NEW_PASSWORD, "again": NEW_PASSWORD})
    assert answer.status == 303
    assert answer.headers["location"].startswith("/console/step-up?next=")
    assert db.execute("SELECT password_hash FROM fc.console_users").fetchone() == before
    assert audit_count(db, "ChangePassword") == 0


# --- the audit trail and users ----------------------------------------------------------------


def test_every_post_leaves_an_audit_record(console: RunningConsole, page: Page, login: LoginHelper,
                                           step_up: StepUpHelper, db: Conn) -> None:
    name, password, secret = console.make_user(Role.SRE)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    submit_login(page, name, "wrong password!")
    login(page, name, password)
    page.goto("/console/account/password")
    step_up(page, secret)
    with page.expect_navigation():
        page.click("header form button")
    assert [p.removeprefix(console.base_url) for p in posts] == [
        "/console/login", "/console/login", "/console/step-up", "/console/logout"]
    rows = db.execute("SELECT actor, method, outcome FROM fc.audit_log"
                      " WHERE method LIKE '/fuelcard.console/%%' ORDER BY id").fetchall()
    user_id = db.execute("SELECT uid::text FROM fc.console_users").fetchone()
    assert user_id is not None
    actor = f"console:sre:{user_id[0]}"
    assert rows == [
        ("test", "/fuelcard.console/AddUser", "OK"),
        (actor, "/fuelcard.console/Login", "UNAUTHENTICATED LOGIN_FAILED"),
        (actor, "/fuelcard.console/Login", "OK"),
        (actor, "/fuelcard.console/StepUp", "OK"),
        (actor, "/fuelcard.console/Logout", "OK"),
    ]
    # the trail names the user by id, never by login or password
    text = " ".join(str(v) for row in db.execute("SELECT actor, method, target::text, outcome"
                                                 " FROM fc.audit_log").fetchall() for v in row)
    assert name not in text and password not in text and secret not in text


def test_audit_targets_never_hold_a_card_number_or_phone() -> None:
    assert audit_fields("ReviewHold", "0b9c5b8e-7d4c-4d5e-9f00-0123456789ab") == (
        "/fuelcard.console/ReviewHold", "0b9c5b8e-7d4c-4d5e-9f00-0123456789ab")
    assert audit_fields("ActivateRuleSet", "v12") == ("/fuelcard.console/ActivateRuleSet/v12", None)
    for leak in ("9860000000000000016", "13912345678", "card 9860"):
        with pytest.raises(ValueError):
            audit_fields("Anything", leak)


def test_fleet_users_are_made_for_a_fleet_account_only(console: RunningConsole, db: Conn) -> None:
    from fuelcard_console import users

    fleet = cb.open_fleet(console.server, 100_000, [cb.ALLOCATED])
    name, _, _ = console.make_user(Role.FLEET_MANAGER, fleet.parent_id)
    assert db.execute("SELECT a.uid::text FROM fc.console_users u JOIN fc.accounts a ON a.id = u.account_id"
                      " WHERE u.login = %s", (name,)).fetchone() == (fleet.parent_id,)
    with pytest.raises(users.ConsoleUserError, match="top-level"):
        console.make_user(Role.FLEET_MANAGER, fleet.subs[0].account_id)
    with pytest.raises(users.ConsoleUserError, match="--account"):
        console.make_user(Role.FLEET_MANAGER)
    with pytest.raises(users.ConsoleUserError, match="--account"):
        console.make_user(Role.SRE, fleet.parent_id)


def test_the_cli_makes_a_user_and_prints_the_secrets_once(database_url: str, db: Conn,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fuelcard_api import cli, principals

    assert cli.main(["console-user", "add", "--login", "ops.li", "--role", "reviewer",
                     "--database-url", database_url]) == 0
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines()[1:])
    password, secret = out["password"].strip(), out["TOTP secret"].strip()
    row = db.execute("SELECT role, password_hash, totp_secret, account_id FROM fc.console_users"
                     " WHERE login = 'ops.li'").fetchone()
    assert row is not None
    assert (row[0], row[2], row[3]) == ("reviewer", secret, None)
    assert principals.check_password(password, row[1]) and password not in row[1]
    # a second user with that login is refused, and the role must be one of the six
    assert cli.main(["console-user", "add", "--login", "ops.li", "--role", "reviewer",
                     "--database-url", database_url]) == 1
    assert cli.main(["console-user", "add", "--login", "ops.wang", "--role", "admin",
                     "--database-url", database_url]) == 1
    assert "that login is taken" in capsys.readouterr().err
    assert cli.main(["console-user", "disable", "--login", "ops.li", "--database-url", database_url]) == 0
    assert db.execute("SELECT disabled_at IS NOT NULL FROM fc.console_users WHERE login = 'ops.li'"
                      ).fetchone() == (True,)


# --- uploads ----------------------------------------------------------------------------------


@requires(Role.SRE)
async def _upload(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    upload = await read_upload(request, "file", max_bytes=200_000)
    await audit(request, user, "TestUpload", None, "OK")
    return web.json_response({"name": upload.filename, "size": len(upload.data), "fields": upload.fields})


@pytest.fixture
def upload_console(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[RunningConsole]:
    def routes(router: web.UrlDispatcher) -> None:
        router.add_post("/console/test/upload", _upload)

    yield from start_console(database_url, tmp_path, dev_certs, extra_routes=routes)


def test_an_upload_is_csrf_checked_from_the_action_and_size_limited(
        upload_console: RunningConsole, browser: Browser, login: LoginHelper, db: Conn) -> None:
    context = browser.new_context(base_url=upload_console.base_url)
    try:
        page = context.new_page()
        name, password, _ = upload_console.make_user(Role.SRE)
        login(page, name, password)
        token = db.execute("SELECT csrf_token FROM fc.console_sessions").fetchone()
        assert token is not None
        body = b"plate,amount_fen\n" + b"A12345,10000\n" * 9000  # 117 KB: past the JSON API's 64 KiB
        file = FilePayload(name="topup.csv", mimeType="text/csv", buffer=body)
        ok = page.request.post(f"/console/test/upload?csrf_token={token[0]}",
                               multipart={"note": "十一月", "file": file})
        assert ok.status == 200, ok.text()
        assert ok.json() == {"name": "topup.csv", "size": len(body), "fields": {"note": "十一月"}}
        # no token, or a wrong one: refused before the handler runs
        for query in ("", "?csrf_token=forged"):
            refused = page.request.post(f"/console/test/upload{query}", multipart={"file": file})
            assert refused.status == 403
        # too large for the handler's limit: 413, a Chinese page
        big = FilePayload(name="big.csv", mimeType="text/csv", buffer=b"x" * 300_000)
        too_big = page.request.post(f"/console/test/upload?csrf_token={token[0]}", multipart={"file": big})
        assert too_big.status == 413 and "上传的内容过大" in too_big.text()
        assert audit_count(db, "TestUpload", "OK") == 1
        assert audit_count(db, "CsrfRefused") == 2
    finally:
        context.close()


def test_console_pages_forbid_framing_and_inline_script(console: RunningConsole, page: Page) -> None:
    response = page.goto("/console/login")
    assert response is not None
    headers = response.headers
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    csp = headers["content-security-policy"]
    nonce = csp.split("'nonce-", 1)[1].split("'", 1)[0]
    assert len(nonce) >= 16
    # the template's own script tags carry this response's nonce
    assert page.evaluate("document.querySelector('script').nonce") == nonce
    assert page.goto("/console/login") is not None
    assert page.evaluate("document.querySelector('script').nonce") != nonce  # a new one each time
    # an inline script injected into the page does not run
    page.evaluate("""() => { const s = document.createElement('script');
        s.textContent = 'window.__injected = true'; document.body.appendChild(s); }""")
    assert page.evaluate("window.__injected === undefined") is True


def test_only_script_tags_written_in_templates_get_the_nonce() -> None:
    import jinja2
    from fuelcard_console.views import ScriptNonce

    env = jinja2.Environment(extensions=[ScriptNonce], autoescape=True)
    out = env.from_string("<script>go()</script><SCRIPT src='/x.js'></SCRIPT>{{ data }}").render(
        csp_nonce=lambda: "N1", data="<script>evil()</script>")
    assert out == ('<script nonce="N1">go()</script><script nonce="N1" src=\'/x.js\'></SCRIPT>'
                   "&lt;script&gt;evil()&lt;/script&gt;")


def test_the_serving_role_cannot_read_console_users_or_sessions(db: Conn) -> None:
    for table in ("fc.console_users", "fc.console_sessions"):
        assert db.execute("SELECT has_table_privilege('fuelcard_app', %s, 'SELECT')", (table,)
                          ).fetchone() == (False,)
    # the blanket grant still holds for the others (the check can fail)
    assert db.execute("SELECT has_table_privilege('fuelcard_app', 'fc.principals', 'SELECT')"
                      ).fetchone() == (True,)


def test_the_demo_makes_one_login_per_role_that_opens_its_page(console: RunningConsole, page: Page,
                                                                login: LoginHelper) -> None:
    from fuelcard.v1 import account_pb2
    from fuelcard_console import demo

    fleet = cb.open_account(console.server)
    family = cb.open_account(console.server, account_pb2.ACCOUNT_TYPE_FAMILY)
    accounts = {"顺丰车队 fleet": fleet.account_id, "李娜 (family main card)": family.account_id}
    made = demo.make_users(console.database_url, accounts)
    assert demo.make_users(console.database_url, accounts) == made  # again: the logins are kept
    assert sorted(role for _, role in made) == sorted(Role)
    text = demo.banner("127.0.0.1:8080", made)
    assert "http://127.0.0.1:8080/console/" in text and demo.DEMO_PASSWORD in text
    for name, role in made:
        login(page, name, demo.DEMO_PASSWORD)
        assert page.url == console.url(main_page(role)), name
        with page.expect_navigation():
            page.click("header form button")


def test_the_sweep_reclaims_only_sessions_that_are_over(console: RunningConsole, db: Conn) -> None:
    first, password, _ = console.make_user(Role.SRE)
    second, _, _ = console.make_user(Role.FINANCE)

    async def log_in(name: str) -> str | None:
        result = await auth.check_login(console.console, name, password)
        return result.token

    assert console.run(lambda: log_in(first)) is not None
    console.advance(dt.timedelta(minutes=20))
    assert console.run(lambda: log_in(second)) is not None
    console.advance(dt.timedelta(minutes=11))  # the first idle 31 min, the second 11
    assert console.run(lambda: auth.sweep(console.console)) == 1
    rows = db.execute("SELECT u.login FROM fc.console_sessions s JOIN fc.console_users u ON u.id = s.user_id"
                      ).fetchall()
    assert rows == [(second,)]


# --- calls to the core --------------------------------------------------------------------------


@requires(Role.SRE)
async def _get_account(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    from fuelcard.v1 import account_pb2
    from fuelcard_console.context import console_context

    ctx = console_context(request)
    answer = await ctx.call(ctx.core.account.GetAccount,
                            account_pb2.GetAccountRequest(account_id=request.match_info["id"]), user)
    return web.json_response({"account_id": answer.account.account_id})


@pytest.fixture
def call_console(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[RunningConsole]:
    def routes(router: web.UrlDispatcher) -> None:
        router.add_get("/console/test/accounts/{id}", _get_account)

    yield from start_console(database_url, tmp_path, dev_certs, extra_routes=routes)


def test_calls_to_the_core_name_the_user_and_refusals_are_shown_in_chinese(
        call_console: RunningConsole, browser: Browser, login: LoginHelper, db: Conn) -> None:
    context = browser.new_context(base_url=call_console.base_url)
    try:
        page = context.new_page()
        name, password, _ = call_console.make_user(Role.SRE)
        login(page, name, password)
        account = cb.open_account(call_console.server)
        response = page.goto(f"/console/test/accounts/{account.account_id}")
        assert response is not None and response.status == 200
        assert response.json() == {"account_id": account.account_id}
        # the core's audit trail names the edge's certificate and the console user
        user_id = db.execute("SELECT uid::text FROM fc.console_users WHERE login = %s", (name,)).fetchone()
        assert user_id is not None
        actors = {row[0] for row in db.execute(
            "SELECT actor FROM fc.audit_log WHERE method = '/fuelcard.v1.AccountService/GetAccount'")}
        assert actors == {f"admin::ops for console_user:{user_id[0]}"}
        # a refusal: the page says it in Chinese, with the reason, and the status fits
        response = page.goto("/console/test/accounts/00000000-0000-4000-8000-000000000000")
        assert response is not None and response.status == 404
        assert page.locator("main .error").inner_text() == "找不到该对象（ACCOUNT_NOT_FOUND）"
    finally:
        context.close()
