"""The console's own pages (login, logout, step-up, the landing page and the
error pages), the template environment, and the wiring into the HTTP edge's
aiohttp application (`install`).

Routes are added to the edge's router with their full paths (/console/...),
so the role modules (pages/*.py) write `router.add_get("/console/fleet/...")`.
"""

from __future__ import annotations

import logging
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp_jinja2
import grpc
import jinja2
import jinja2.ext
from aiohttp import web
from fuelcard_server.errors import ApiError

from fuelcard_console import auth, backtest_jobs
from fuelcard_console.auth import ConsoleUser, Role, requires
from fuelcard_console.context import CONSOLE, Console, CoreRefusal

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# What the pages say for the core's refusals they meet most; others show the reason code.
REFUSALS_ZH = {
    "PERMISSION_DENIED": "无权执行此操作",
    "NOT_FOUND": "找不到该对象",
    "STEP_UP_REQUIRED": "此操作需要二次验证",
    "STEP_UP_FAILED": "二次验证失败",
    "INSUFFICIENT_FUNDS": "余额不足",
    "UNAVAILABLE": "服务暂不可用，请稍后再试",
    "DATABASE_UNAVAILABLE": "数据库暂不可用，请稍后再试",
    "DEADLINE_EXCEEDED": "核心系统响应超时，请稍后再试",
    "REPLICA_UNAVAILABLE": "报表库暂不可用（支付不受影响）",
    "REPLICA_LAGGING": "报表库延迟过大，报表暂停（支付不受影响）",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A refusal a page did not handle itself, as an HTTP status (the JSON API's mapping, in short)
_REFUSAL_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# ... and in words by its status code, when its reason has no sentence of its own
_CODE_ZH = {
    grpc.StatusCode.INVALID_ARGUMENT: "输入有误", grpc.StatusCode.OUT_OF_RANGE: "输入超出范围",
    grpc.StatusCode.NOT_FOUND: "找不到该对象", grpc.StatusCode.ALREADY_EXISTS: "该对象已存在",
    grpc.StatusCode.FAILED_PRECONDITION: "当前状态不允许此操作",
    grpc.StatusCode.ABORTED: "操作冲突，请重试",
    grpc.StatusCode.PERMISSION_DENIED: "无权执行此操作",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "请求过多，请稍后再试",
    grpc.StatusCode.UNAVAILABLE: "服务暂不可用，请稍后再试",
    grpc.StatusCode.DEADLINE_EXCEEDED: "核心系统响应超时",
}


def refusal_text(refusal: CoreRefusal) -> str:
    """A refusal as a clerk reads it: the Chinese sentence when there is one,
    and the reason code either way (what support asks for)."""
    fallback = _CODE_ZH.get(refusal.code, "") if refusal.code is not None else ""
    text = REFUSALS_ZH.get(refusal.reason) or fallback or "核心系统拒绝了该操作"
    return f"{text}（{refusal.reason}）"


def render(template: str, request: web.Request, context: dict[str, Any], *,
           status: int = 200) -> web.Response:
    """A page from templates/<template>, extending base.html."""
    if request.get(auth.NO_SESSION):
        request[auth.SESSION] = None
    response = aiohttp_jinja2.render_template(template, request, _base_context(request) | context,
                                              status=status)
    response.headers["Cache-Control"] = "no-store"
    return response


def forbidden(request: web.Request, user: ConsoleUser | None) -> web.Response:
    return render("error.html", request, {"title": "无权访问", "status": 403,
                                          "message": "您的角色无权访问此页面。"}, status=403)


def csrf_refused(request: web.Request) -> web.Response:
    return render("error.html", request, {
        "title": "请求被拒绝", "status": 403,
        "message": "表单已失效或来自其他网站（CSRF 校验失败），未做任何更改。请刷新页面后重试。"},
        status=403)


PAGE_SIZE = 50  # rows of a list page (AIP-132 page_token paging)


def page_token(request: web.Request) -> str:
    """The `?page_token=` of a list page ('' for the first page); a list
    passes it to the core's List* call (page_size <= PAGE_SIZE) and gives
    the answer's next_page_token to the page's "next" link."""
    token = request.query.get("page_token", "")
    if len(token) > 200:
        raise web.HTTPBadRequest(reason="page_token too long")
    return token


@dataclass(frozen=True)
class Upload:
    fields: dict[str, str]  # the form's other fields
    filename: str
    data: bytes


async def read_upload(request: web.Request, file_field: str, max_bytes: int) -> Upload:
    """A multipart form with one file (a CSV to preview, a settlement file),
    read as a stream with its own limit: the edge's body limit (64 KiB, the
    JSON API's) does not apply to it. Too large: HTTP 413 (a zh-CN page).
    The form's action carries ?csrf_token= (auth.csrf_middleware)."""
    reader = await request.multipart()
    fields: dict[str, str] = {}
    filename, data = "", b""
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, aiohttp.BodyPartReader):
            raise web.HTTPBadRequest(reason="nested multipart")
        if part.name == file_field:
            filename = part.filename or ""
            chunks, size = [], 0
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
                chunks.append(chunk)
            data = b"".join(chunks)
        elif part.name:
            text = await part.text()
            if len(text) > 64 * 1024:
                raise web.HTTPRequestEntityTooLarge(max_size=64 * 1024, actual_size=len(text))
            fields[part.name] = text
    return Upload(fields, filename, data)


def placeholder(request: web.Request, user: ConsoleUser, heading: str) -> web.Response:
    """The main page of a role whose pages are not built yet."""
    return render("placeholder.html", request, {"heading": heading})


def main_page(role: Role) -> str:
    from fuelcard_console.pages import ROLE_MODULES

    return str(ROLE_MODULES[role].MAIN_PAGE)


def nav_for(role: Role) -> list[tuple[str, str]]:
    """The nav links of a role: its module's NAV, or its main page alone."""
    from fuelcard_console.pages import ROLE_MODULES

    module = ROLE_MODULES[role]
    nav: list[tuple[str, str]] = list(getattr(module, "NAV", ()) or [("首页", module.MAIN_PAGE)])
    return nav


def _base_context(request: web.Request) -> dict[str, Any]:
    """What every page's template gets: the user (from the session the
    middlewares loaded), the nav of their role, and csrf_token()."""
    session = request.get(auth.SESSION)
    user = session.user if session is not None else None
    return {
        "csrf_token": lambda: session.csrf_token if session is not None else request.get(auth.LOGIN_CSRF, ""),
        "user": user,
        "role_name": auth.ROLE_NAMES_ZH[user.role] if user is not None else "",
        "nav": nav_for(user.role) if user is not None else [],
        "current_path": request.path,
        "csp_nonce": lambda: csp_nonce(request),
    }


# Scripts only from the console's own files and the <script> tags written in its templates
# (each gets the response's nonce when the template is compiled: ScriptNonce), never one that
# came in through data; nothing framed; forms only to the console; inline style attributes
# are allowed (they run nothing). Inline event handlers (onclick=...) do not run: use a
# <script> in the template.
CSP = ("default-src 'self'; script-src 'self'{nonce}; style-src 'self' 'unsafe-inline';"
       " img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # a page_token or an upload's ?csrf_token= never leaves in a Referer to another site
    "Referrer-Policy": "same-origin",
}


NONCE: web.RequestKey[str] = web.RequestKey("fuelcard_console.csp_nonce", str)
_SCRIPT_TAG = re.compile(r"<script(?=[\s>])", re.IGNORECASE)


def csp_nonce(request: web.Request) -> str:
    """This response's script nonce (made on first use)."""
    if NONCE not in request:
        request[NONCE] = secrets.token_urlsafe(16)
    return request[NONCE]


class ScriptNonce(jinja2.ext.Extension):
    """Gives every <script> tag written in a template's source the
    response's nonce: the tags the console's authors wrote run, a tag that
    arrived in data (escaped anyway) never would."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        return _SCRIPT_TAG.sub('<script nonce="{{ csp_nonce() }}"', source)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/console"):
        nonce = request.get(NONCE)
        response.headers.setdefault("Content-Security-Policy",
                                    CSP.format(nonce=f" 'nonce-{nonce}'" if nonce else ""))
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)


@web.middleware
async def session_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Load the request's session once, before the handler: the CSRF check,
    @requires and the templates (render) all read it."""
    if request.path.startswith("/console/") and not request.path.startswith("/console/static/"):
        await auth.session_of(request)
    return await handler(request)


# --- error pages ----------------------------------------------------------------------------


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/console/"):
        return await handler(request)
    try:
        return await handler(request)
    except CoreRefusal as refusal:
        status = _REFUSAL_STATUS.get(refusal.code, 409) if refusal.code is not None else 409
        return render("error.html", request, {"title": "操作未完成", "status": status,
                                              "message": refusal_text(refusal)}, status=status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {404: "页面不存在。", 405: "不支持该请求方式。", 413: "上传的内容过大。"}
        return render("error.html", request, {"title": "出错了", "status": exc.status,
                                              "message": messages.get(exc.status, exc.reason)},
                      status=exc.status)
    except ApiError as exc:
        status = 503 if exc.reason.endswith("UNAVAILABLE") or exc.reason.startswith("DATABASE") else 500
        log.warning("console database call failed: %s", exc.reason)
        request[auth.NO_SESSION] = True
        return render("error.html", request, {"title": "服务暂不可用", "status": status,
                                              "message": "数据库暂不可用，请稍后再试。"}, status=status)
    except Exception as exc:  # a bug: the type in the log, never the request
        log.exception("console: unhandled %s in %s %s", type(exc).__name__, request.method,
                      request.match_info.route.resource.canonical
                      if request.match_info.route.resource else "?")
        request[auth.NO_SESSION] = True
        return render("error.html", request, {"title": "内部错误", "status": 500,
                                              "message": "系统内部错误，已记录。"}, status=500)


# --- login, logout, step-up -----------------------------------------------------------------


def _login_page(request: web.Request, *, error: str = "", status: int = 200) -> web.Response:
    token = request.cookies.get(auth.LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(auth.TOKEN_BYTES)
    request[auth.LOGIN_CSRF] = token
    request[auth.SESSION] = None  # the login page shows no one as logged in
    response = render("login.html", request, {
        "error": error, "next": auth.safe_next(request.query.get("next"), "")}, status=status)
    console = request.app[CONSOLE]
    response.set_cookie(auth.LOGIN_CSRF_COOKIE, token, path="/console/", httponly=True, samesite="Strict",
                        secure=console.settings.cookie_secure)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    session = await auth.session_of(request)
    if session is not None:
        return auth.redirect(main_page(session.user.role))
    return _login_page(request)


async def login_submit(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    login, password = form.get("login"), form.get("password")
    if not isinstance(login, str) or not isinstance(password, str):
        return _login_page(request, error="请输入登录名和密码。", status=400)
    result = await auth.check_login(console, login.strip(), password)
    if result.user is None or result.token is None:
        # one answer for an unknown login, a wrong password and a locked login
        return _login_page(request, error="登录名或密码错误，或尝试次数过多已被暂时锁定。", status=401)
    target = form.get("next")
    response = auth.redirect(auth.safe_next(target if isinstance(target, str) else None,
                                            main_page(result.user.role)))
    response.set_cookie(auth.COOKIE, result.token, path="/console/", httponly=True, samesite="Strict",
                        secure=console.settings.cookie_secure, max_age=console.settings.absolute_s)
    response.del_cookie(auth.LOGIN_CSRF_COOKIE, path="/console/")
    return response


@requires(*Role)
async def logout(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    console = request.app[CONSOLE]
    await auth.end_session(console, request)
    await auth.audit(request, user, "Logout", user.user_id, "OK")
    response = auth.redirect("/console/login")
    response.del_cookie(auth.COOKIE, path="/console/")
    return response


@requires(*Role)
async def step_up_form(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return render("step_up.html", request, {"next": auth.safe_next(request.query.get("next"),
                                                                   main_page(user.role)), "error": ""})


@requires(*Role)
async def step_up_submit(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = await request.post()
    code, target = form.get("code"), form.get("next")
    back = auth.safe_next(target if isinstance(target, str) else None, main_page(user.role))
    ok = isinstance(code, str) and await auth.step_up(console, request, user, code.strip())
    await auth.audit(request, user, "StepUp", user.user_id,
                     "OK" if ok else "PERMISSION_DENIED STEP_UP_FAILED")
    if not ok:
        return render("step_up.html", request, {"next": back, "error": "验证码错误或已使用，请重试。"},
                      status=403)
    return auth.redirect(back)


@requires(*Role, step_up=True)
async def password_form(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return render("password.html", request, {"error": "", "done": False})


@requires(*Role, step_up=True)
async def password_submit(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """A new password (the current one, and a step-up within five minutes,
    first): every other session of the user ends."""
    console = request.app[CONSOLE]
    form = await request.post()
    current, new, again = form.get("current"), form.get("new"), form.get("again")
    if not (isinstance(current, str) and isinstance(new, str) and isinstance(again, str)):
        outcome, error = "INVALID_ARGUMENT FIELD_MISSING", "请填写所有字段。"
    elif new != again:
        outcome, error = "INVALID_ARGUMENT PASSWORDS_DIFFER", "两次输入的新密码不一致。"
    elif not auth.MIN_PASSWORD_CHARS <= len(new) <= auth.MAX_PASSWORD_CHARS:
        outcome, error = "INVALID_ARGUMENT PASSWORD_LENGTH", (
            f"新密码须为 {auth.MIN_PASSWORD_CHARS}-{auth.MAX_PASSWORD_CHARS} 个字符。")
    elif not await auth.change_password(console, request, user, current, new):
        outcome, error = "PERMISSION_DENIED PASSWORD_WRONG", "当前密码错误。"
    else:
        outcome, error = "OK", ""
    await auth.audit(request, user, "ChangePassword", user.user_id, outcome)
    if error:
        return render("password.html", request, {"error": error, "done": False}, status=400)
    return render("password.html", request, {"error": "", "done": True})


@requires(*Role)
async def home(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return auth.redirect(main_page(user.role))


async def root(request: web.Request) -> web.StreamResponse:
    return auth.redirect("/console/")


# --- wiring ---------------------------------------------------------------------------------


def install(app: web.Application, console: Console) -> None:
    """Mount the console under /console/ in the edge's application: its
    routes, templates, static files, middlewares and start/stop."""
    from fuelcard_console import pages

    app[CONSOLE] = console
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                         autoescape=jinja2.select_autoescape(default=True),
                         undefined=jinja2.StrictUndefined, extensions=[ScriptNonce])
    env = aiohttp_jinja2.get_env(app)
    env.filters["yuan"] = yuan
    env.filters["urlencode_path"] = urllib.parse.quote
    app.on_response_prepare.append(_security_headers)
    app.middlewares.append(error_middleware)
    app.middlewares.append(session_middleware)
    app.middlewares.append(auth.csrf_middleware)
    router = app.router
    router.add_get("/console", root)
    router.add_get("/console/", home)
    router.add_get("/console/login", login_form)
    router.add_post("/console/login", login_submit)
    router.add_post("/console/logout", logout)
    router.add_get("/console/step-up", step_up_form)
    router.add_post("/console/step-up", step_up_submit)
    router.add_get("/console/account/password", password_form)
    router.add_post("/console/account/password", password_submit)
    router.add_static("/console/static/", STATIC)
    for module in pages.MODULES:
        module.add_routes(router)

    async def start(_: web.Application) -> None:
        await console.start()

    async def stop(_: web.Application) -> None:
        backtest_jobs.close_jobs(console)
        await console.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def yuan(fen: int | None) -> str:
    """Fen as yuan for a page: 123456 -> '1,234.56'."""
    if fen is None:
        return ""
    sign = "-" if fen < 0 else ""
    whole, cents = divmod(abs(int(fen)), 100)
    return f"{sign}{whole:,}.{cents:02d}"
