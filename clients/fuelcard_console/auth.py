"""Who may do what in the console: roles, sessions, the TOTP step-up, CSRF,
and the audit trail.

A user logs in with a login and a password (scrypt, the JSON API's hash:
fuelcard_api.principals) and gets a session cookie. The cookie is a random
token; the database keeps only its SHA-256, with the user, a CSRF token for
the session's forms, and three times: the last use (a session idle for
`idle_s`, 30 min, is over), the absolute end (`absolute_s`, 12 h after
login, whatever happens) and the end of a step-up (a TOTP code entered in
the last `step_up_s`, 5 min). High-risk actions (`@requires(..., step_up=True)`)
need a fresh step-up.

Wrong passwords count per user: after MAX_FAILED_LOGINS in a row the login
is locked for LOCK_S; a wrong TOTP code counts the same. A login that names
no user, a wrong password and a locked login all get the same answer, in
the same time (one scrypt each), so the page does not tell which logins exist.

Every POST is CSRF-checked (csrf_middleware): the form's hidden `csrf_token`
must be the session's (or, on the login form, the pre-login cookie's; for a
multipart upload, `?csrf_token=` in the form's action), and a browser's
Origin header, when sent, must be this site. A forged post answers
403 and changes nothing.

Every action is audited (audit()): fc.audit_append, the core's hash-chained
trail, with the actor `console:<role>:<user uuid>` and the method
`/fuelcard.console/<action>`; never a card number or a phone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import functools
import hashlib
import hmac
import re
import secrets
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyotp
from aiohttp import web
from fuelcard_api import principals
from fuelcard_server.locks import AUDIT_LOCK

if TYPE_CHECKING:
    from fuelcard_console.context import Console

COOKIE = "fc_console"
LOGIN_CSRF_COOKIE = "fc_console_login"
TOKEN_BYTES = 32
MAX_FAILED_LOGINS = 5
LOCK_S = 15 * 60
TOTP_STEP_S = 30
MIN_PASSWORD_CHARS = principals.MIN_PASSWORD_CHARS
MAX_PASSWORD_CHARS = principals.MAX_PASSWORD_CHARS


class Role(enum.StrEnum):
    FLEET_MANAGER = "fleet_manager"
    HOLDER = "holder"
    REVIEWER = "reviewer"
    FINANCE = "finance"
    RISK_OFFICER = "risk_officer"
    SRE = "sre"


# The roles that act for one account (and its sub-accounts): they are made with one.
ACCOUNT_ROLES = frozenset({Role.FLEET_MANAGER, Role.HOLDER})

ROLE_NAMES_ZH = {
    Role.FLEET_MANAGER: "车队管理员",
    Role.HOLDER: "家庭主卡持卡人",
    Role.REVIEWER: "风控审核员",
    Role.FINANCE: "财务",
    Role.RISK_OFFICER: "风控策略员",
    Role.SRE: "运维 (SRE)",
}


@dataclass(frozen=True)
class ConsoleUser:
    user_id: str  # fc.console_users.uid
    login: str
    role: Role
    # fleet manager / holder: the account the user has authority over (it and its sub-accounts)
    account_uid: str | None
    # the id the core's audit trail names for the user (on-behalf-of `console_user:<uuid>`)
    principal_uid: str | None
    account_key: int | None = None  # fc.accounts.id of account_uid, for authority checks

    @property
    def actor(self) -> str:
        """The user as the audit trail names them: role and id, never the login."""
        return f"console:{self.role.value}:{self.user_id}"


@dataclass(frozen=True)
class Session:
    user: ConsoleUser
    csrf_token: str
    stepped_up_until: dt.datetime | None


# --- SQL ------------------------------------------------------------------------------------

USER_SQL = """
    SELECT u.id, u.uid::text, u.role, a.uid::text, u.account_id, u.password_hash, u.locked_until
      FROM fc.console_users u LEFT JOIN fc.accounts a ON a.id = u.account_id
     WHERE u.login = %(login)s AND u.disabled_at IS NULL"""
FAILED_LOGIN_SQL = """
    UPDATE fc.console_users
       SET failed_logins = failed_logins + 1,
           locked_until = CASE WHEN failed_logins + 1 >= %(max)s THEN %(lock_until)s ELSE locked_until END
     WHERE id = %(id)s RETURNING failed_logins"""
GOOD_LOGIN_SQL = """
    UPDATE fc.console_users SET failed_logins = 0, locked_until = NULL WHERE id = %(id)s RETURNING 1"""
NEW_SESSION_SQL = """
    INSERT INTO fc.console_sessions (token_hash, user_id, csrf_token, created_at, last_seen_at,
                                     expires_at)
    VALUES (%(hash)s, %(user)s, %(csrf)s, %(now)s, %(now)s, %(expires)s) RETURNING 1"""
# One round trip: the session if it is alive, touched (its idle clock starts again).
SESSION_SQL = """
    UPDATE fc.console_sessions s SET last_seen_at = %(now)s
      FROM fc.console_users u LEFT JOIN fc.accounts a ON a.id = u.account_id
     WHERE s.token_hash = %(hash)s AND u.id = s.user_id AND u.disabled_at IS NULL
       AND s.expires_at > %(now)s AND s.last_seen_at > %(idle_since)s
    RETURNING u.uid::text, u.login, u.role, a.uid::text, u.account_id, s.csrf_token,
              s.stepped_up_until"""
END_SESSION_SQL = "DELETE FROM fc.console_sessions WHERE token_hash = %(hash)s RETURNING 1"
SWEEP_SQL = """
    DELETE FROM fc.console_sessions WHERE expires_at <= %(now)s OR last_seen_at <= %(idle_since)s
    RETURNING 1"""
TOTP_SQL = """
    SELECT u.id, u.totp_secret, u.totp_last_step, u.locked_until
      FROM fc.console_users u WHERE u.uid = %(user)s::uuid AND u.disabled_at IS NULL"""
# The step is taken only if it is newer than the last one used: a code works once.
STEPPED_UP_SQL = """
    WITH used AS (UPDATE fc.console_users SET totp_last_step = %(step)s, failed_logins = 0
                   WHERE id = %(id)s AND totp_last_step < %(step)s RETURNING id)
    UPDATE fc.console_sessions s SET stepped_up_until = %(until)s
      FROM used WHERE s.token_hash = %(hash)s AND s.user_id = used.id RETURNING 1"""
PASSWORD_SQL = """
    SELECT u.id, u.password_hash FROM fc.console_users u
     WHERE u.uid = %(user)s::uuid AND u.disabled_at IS NULL"""
# The new hash, and every other session of the user ends (someone who knew the old
# password may be logged in).
NEW_PASSWORD_SQL = """
    WITH u AS (UPDATE fc.console_users SET password_hash = %(hash)s WHERE id = %(id)s RETURNING id)
    DELETE FROM fc.console_sessions s USING u
     WHERE s.user_id = u.id AND s.token_hash <> %(keep)s RETURNING 1"""
AUDIT_SQL = (
    "SELECT fc.audit_append(p_lock => %(lock)s, p_actor => %(actor)s, p_method => %(method)s,"
    " p_target => %(target)s::uuid, p_outcome => %(outcome)s)")

_SAFE_TARGET = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_LONG_DIGITS = re.compile(r"\d{7,}")
_ACTION = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


# --- the audit trail ------------------------------------------------------------------------


def audit_fields(action: str, target: str | None) -> tuple[str, str | None]:
    """The method and the target column for an audit record. The target is
    an internal uuid; anything else (a rule set's version, a reconciliation
    run's name) goes into the method after a '/', and only if it is short and
    holds no long run of digits: never a card number or a phone."""
    if not _ACTION.fullmatch(action):
        raise ValueError("an audit action is a short name (letters, digits, . _ -)")
    method = f"/fuelcard.console/{action}"
    if target is None:
        return method, None
    try:
        return method, str(uuid.UUID(target))
    except ValueError:
        pass
    if not _SAFE_TARGET.fullmatch(target) or _LONG_DIGITS.search(target):
        raise ValueError("an audit target is an internal id, never a card number or a phone")
    return f"{method}/{target}", None


async def record(console: Console, actor: str, action: str, target: str | None, outcome: str) -> None:
    method, target_uuid = audit_fields(action, target)
    await console.db.fetch_all(AUDIT_SQL, {"lock": AUDIT_LOCK, "actor": actor, "method": method,
                                           "target": target_uuid, "outcome": outcome})


async def audit(request: web.Request, user: ConsoleUser, action: str, target: str | None,
                outcome: str) -> None:
    """Record a user's action in the audit trail (every POST handler calls
    it, whatever the outcome: "OK", or the refusal's UPPER_SNAKE reason)."""
    from fuelcard_console.context import CONSOLE

    await record(request.app[CONSOLE], user.actor, action, target, outcome)


# --- sessions -------------------------------------------------------------------------------


async def load_session(console: Console, request: web.Request) -> Session | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    now = console.clock.now()
    row = await console.db.fetch_one(SESSION_SQL, {
        "hash": token_hash(token), "now": now,
        "idle_since": now - dt.timedelta(seconds=console.settings.idle_s)})
    if row is None:
        return None
    user_id, login, role, account_uid, account_key, csrf, stepped_up_until = row
    user = ConsoleUser(user_id=user_id, login=login, role=Role(role), account_uid=account_uid,
                       principal_uid=user_id, account_key=account_key)
    return Session(user, csrf, stepped_up_until)


async def session_of(request: web.Request) -> Session | None:
    """The request's session, read once per request (the middleware and the
    handler share it)."""
    from fuelcard_console.context import CONSOLE

    if SESSION not in request:
        request[SESSION] = await load_session(request.app[CONSOLE], request)
    return request[SESSION]


# What a request carries between the middlewares, the handler and the templates.
SESSION: web.RequestKey[Session | None] = web.RequestKey("fuelcard_console.session")
# the login form's pre-session CSRF token
LOGIN_CSRF: web.RequestKey[str] = web.RequestKey("fuelcard_console.login_csrf", str)
# set by the error pages that must not touch the database again
NO_SESSION: web.RequestKey[bool] = web.RequestKey("fuelcard_console.no_session", bool)


@dataclass(frozen=True)
class LoginResult:
    user: ConsoleUser | None
    token: str | None


async def check_login(console: Console, login: str, password: str) -> LoginResult:
    """A new session for a right login and password of an unlocked user;
    LoginResult(None, None) for anything else (one scrypt either way)."""
    now = console.clock.now()
    row = await console.db.fetch_one(USER_SQL, {"login": login}) if 3 <= len(login) <= 64 else None
    ok = await asyncio.to_thread(principals.check_password, password, row[5] if row else None)
    if row is None:
        await record(console, "console:anonymous", "Login", None, "UNAUTHENTICATED LOGIN_FAILED")
        return LoginResult(None, None)
    key, user_id, role, account_uid, account_key, _, locked_until = row
    user = ConsoleUser(user_id=user_id, login=login, role=Role(role), account_uid=account_uid,
                       principal_uid=user_id, account_key=account_key)
    if locked_until is not None and locked_until > now:
        await record(console, user.actor, "Login", user_id, "UNAUTHENTICATED LOGIN_LOCKED")
        return LoginResult(None, None)
    if not ok:
        await console.db.fetch_all(FAILED_LOGIN_SQL, {
            "id": key, "max": MAX_FAILED_LOGINS, "lock_until": now + dt.timedelta(seconds=LOCK_S)})
        await record(console, user.actor, "Login", user_id, "UNAUTHENTICATED LOGIN_FAILED")
        return LoginResult(None, None)
    await console.db.fetch_all(GOOD_LOGIN_SQL, {"id": key})
    token = secrets.token_urlsafe(TOKEN_BYTES)
    await console.db.fetch_all(NEW_SESSION_SQL, {
        "hash": token_hash(token), "user": key, "csrf": secrets.token_urlsafe(TOKEN_BYTES), "now": now,
        "expires": now + dt.timedelta(seconds=console.settings.absolute_s)})
    await record(console, user.actor, "Login", user_id, "OK")
    return LoginResult(user, token)


async def end_session(console: Console, request: web.Request) -> None:
    token = request.cookies.get(COOKIE)
    if token:
        await console.db.fetch_all(END_SESSION_SQL, {"hash": token_hash(token)})


async def sweep(console: Console) -> int:
    """Delete the rows of sessions that are over (they are refused on sight anyway)."""
    now = console.clock.now()
    return len(await console.db.fetch_all(SWEEP_SQL, {
        "now": now, "idle_since": now - dt.timedelta(seconds=console.settings.idle_s)}))


async def change_password(console: Console, request: web.Request, user: ConsoleUser, current: str,
                          new: str) -> bool:
    """Replace the password if `current` is right; the other sessions end."""
    row = await console.db.fetch_one(PASSWORD_SQL, {"user": user.user_id})
    ok = await asyncio.to_thread(principals.check_password, current, row[1] if row else None)
    if row is None or not ok:
        return False
    digest = await asyncio.to_thread(principals.hash_password, new)
    await console.db.fetch_all(NEW_PASSWORD_SQL, {"hash": digest, "id": row[0],
                                                 "keep": token_hash(request.cookies.get(COOKIE, ""))})
    return True


def stepped_up(console: Console, session: Session) -> bool:
    until = session.stepped_up_until
    return until is not None and until > console.clock.now()


async def step_up(console: Console, request: web.Request, user: ConsoleUser, code: str) -> bool:
    """Check a TOTP code (the current 30-second step or the one either side,
    for clock drift; each step once) and, if right, mark the session stepped
    up for step_up_s. A wrong code counts as a failed login."""
    now = console.clock.now()
    row = await console.db.fetch_one(TOTP_SQL, {"user": user.user_id})
    token = request.cookies.get(COOKIE, "")
    if row is None or not token:
        return False
    key, secret, last_step, locked_until = row
    if locked_until is not None and locked_until > now:
        return False
    totp = pyotp.TOTP(secret, interval=TOTP_STEP_S)
    step = int(now.timestamp()) // TOTP_STEP_S
    matched = None
    if code.isascii() and code.isdigit() and len(code) == 6:
        for candidate in (step, step - 1, step + 1):
            if candidate > last_step and hmac.compare_digest(totp.generate_otp(candidate), code):
                matched = candidate
                break
    if matched is None:
        await console.db.fetch_all(FAILED_LOGIN_SQL, {
            "id": key, "max": MAX_FAILED_LOGINS, "lock_until": now + dt.timedelta(seconds=LOCK_S)})
        return False
    done = await console.db.fetch_all(STEPPED_UP_SQL, {
        "id": key, "step": matched, "hash": token_hash(token),
        "until": now + dt.timedelta(seconds=console.settings.step_up_s)})
    return bool(done)


# --- the handler decorator ------------------------------------------------------------------

UserHandler = Callable[[web.Request, ConsoleUser], Awaitable[web.StreamResponse]]


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the new page."""
    return web.Response(status=303, headers={"Location": location})


def safe_next(target: str | None, fallback: str = "/console/") -> str:
    """A redirect target only within the console (no other site, no scheme)."""
    if target and target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return fallback


def requires(*roles: Role, step_up: bool = False) -> Callable[[UserHandler],
                                                              Callable[[web.Request],
                                                                       Awaitable[web.StreamResponse]]]:
    """A handler for users of these roles. No session: to the login page;
    another role: 403 (a zh-CN page); step_up and no step-up in the last
    step_up_s: to the TOTP page, back here after (a POST goes back to the
    page it came from: put step_up on the GET that shows the form too)."""
    allowed = frozenset(roles)

    def wrap(handler: UserHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(handler)
        async def serve(request: web.Request) -> web.StreamResponse:
            from fuelcard_console.context import CONSOLE
            from fuelcard_console.views import forbidden

            console = request.app[CONSOLE]
            session = await session_of(request)
            if session is None:
                back = request.path_qs if request.method == "GET" else ""
                query = "?" + urllib.parse.urlencode({"next": back}) if back else ""
                return redirect(f"/console/login{query}")
            user = session.user
            if user.role not in allowed:
                await record(console, user.actor, "Forbidden", None, f"PERMISSION_DENIED {request.method}")
                return forbidden(request, user)
            if step_up and not stepped_up(console, session):
                back = request.path_qs if request.method == "GET" else safe_next(
                    urllib.parse.urlsplit(request.headers.get("Referer", "")).path or None,
                    request.path)
                return redirect("/console/step-up?" + urllib.parse.urlencode({"next": back}))
            return await handler(request, user)

        serve.__dict__["console_roles"] = allowed
        return serve

    return wrap


# --- CSRF -----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a form was posted from (Origin; Referer if
    not): it must be this site. No header at all (curl, an old client) is
    left to the token."""
    origin = request.headers.get("Origin")
    if origin is None:
        referer = request.headers.get("Referer")
        if referer is None:
            return True
        parts = urllib.parse.urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin == "null":
        return False
    return urllib.parse.urlsplit(origin).netloc == request.host


@web.middleware
async def csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in ("GET", "HEAD", "OPTIONS") or not request.path.startswith("/console/"):
        return await handler(request)
    from fuelcard_console.context import CONSOLE
    from fuelcard_console.views import csrf_refused

    console = request.app[CONSOLE]
    if request.content_type == "multipart/form-data":
        # An upload is read as a stream by its handler (views.read_upload, with its own size
        # limit), so the token cannot come from the body: the form's action carries it
        # (action="...?csrf_token={{ csrf_token() }}"), or a script's X-CSRF-Token header.
        sent: object = request.headers.get("X-CSRF-Token") or request.query.get("csrf_token")
    else:
        sent = (await request.post()).get("csrf_token")
    if request.path == "/console/login":
        expected = request.cookies.get(LOGIN_CSRF_COOKIE)
        actor = "console:anonymous"
    else:
        session = await session_of(request)
        expected = session.csrf_token if session is not None else None
        actor = session.user.actor if session is not None else "console:anonymous"
    if (not _same_origin(request) or not isinstance(sent, str) or not expected
            or not hmac.compare_digest(sent.encode(), expected.encode())):
        await record(console, actor, "CsrfRefused", None, "PERMISSION_DENIED CSRF_TOKEN_INVALID")
        return csrf_refused(request)
    return await handler(request)


def handler_roles(handler: Any) -> frozenset[Role] | None:
    """The roles a @requires handler admits (for tests and the nav)."""
    roles: frozenset[Role] | None = getattr(handler, "console_roles", None)
    return roles

