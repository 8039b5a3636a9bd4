"""The console's login, sessions, CSRF, roles, step-up and audit trail, in a
real headless browser (Debian's Chromium) against a real core (mutual TLS)
and a real database."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fuelcard_console import auth
from fuelcard_console.auth import Role, audit_fields
from playwright.sync_api import Page

from tests.plugins.console import LoginHelper, RunningConsole, StepUpHelper
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
