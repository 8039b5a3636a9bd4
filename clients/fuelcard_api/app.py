"""The JSON API for apps and mini-programs (issue 18 item 2), on aiohttp.

Holders and fleet managers (principals, principals.py) log in with a login
and a password and get an opaque bearer token (a server-side session that
expires). Every other call then reads or changes what the principal has
authority over: its account, that account's sub-accounts (a family's
secondary cards, a fleet's vehicles) and their cards. The API checks that
authority before it calls the core; the core checks everything else, over the
same gRPC services the back office uses, with the API's admin certificate.
Each call carries the principal in the call metadata (identity.ON_BEHALF_OF),
so the core's audit trail names both the edge and the person.

The route table (ROUTES) is the single description of the API: the router
and the OpenAPI 3.1 document (GET /openapi.json) are both made from it.

Requests are rate-limited per IP address (every request, login included) and
per principal (authenticated requests), in bounded memory (throttle.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    step_up_pb2,
)
from fuelcard_server.db import Database
from fuelcard_server.errors import ApiError
from fuelcard_server.identity import ON_BEHALF_OF
from fuelcard_server.locks import AUDIT_LOCK
from google.protobuf.timestamp_pb2 import Timestamp

from fuelcard_api import principals, schemas
from fuelcard_api.throttle import Throttle

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
MAX_BODY_BYTES = 64 * 1024
TOKEN_BYTES = 32

LOGIN_SQL = """
    SELECT p.id, p.uid::text, p.kind, a.uid::text, p.account_id, p.password_hash
      FROM fc.principals p JOIN fc.accounts a ON a.id = p.account_id
     WHERE p.login = %(login)s AND p.disabled_at IS NULL"""
NEW_SESSION_SQL = """
    INSERT INTO fc.api_sessions (token_hash, principal_id, created_at, expires_at)
    VALUES (%(hash)s, %(principal)s, %(now)s, %(expires)s) RETURNING 1"""
SESSION_SQL = """
    SELECT p.uid::text, p.kind, a.uid::text, p.account_id
      FROM fc.api_sessions s JOIN fc.principals p ON p.id = s.principal_id
      JOIN fc.accounts a ON a.id = p.account_id
     WHERE s.token_hash = %(hash)s AND s.expires_at > %(now)s AND p.disabled_at IS NULL"""
END_SESSION_SQL = "DELETE FROM fc.api_sessions WHERE token_hash = %(hash)s RETURNING 1"
SWEEP_SQL = "DELETE FROM fc.api_sessions WHERE expires_at <= %(now)s RETURNING 1"
# Authority: the principal's own account, or a sub-account of it.
ACCOUNT_AUTHORITY_SQL = """
    SELECT 1 FROM fc.accounts a
     WHERE a.uid = %(target)s::uuid AND a.kind <> fc.account_kind_system()
       AND (a.id = %(mine)s OR a.parent_id = %(mine)s)"""
CARD_AUTHORITY_SQL = """
    SELECT 1 FROM fc.cards c JOIN fc.accounts a ON a.id = c.account_id
     WHERE c.uid = %(target)s::uuid AND (a.id = %(mine)s OR a.parent_id = %(mine)s)"""
AUDIT_SQL = (
    "SELECT fc.audit_append(p_lock => %(lock)s, p_actor => %(actor)s, p_method => %(method)s,"
    " p_target => %(target)s::uuid, p_outcome => %(outcome)s)")

# gRPC status -> HTTP status
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class ApiSettings:
    target: str
    ca: Path
    cert: Path
    key: Path
    database_url: str
    session_ttl_s: int = 1800
    # token buckets: requests per second, and the burst allowed
    ip_rate: float = 20.0
    ip_burst: int = 60
    principal_rate: float = 5.0
    principal_burst: int = 30
    max_throttle_keys: int = 100_000
    call_timeout_s: float = 5.0
    pool_max: int = 8


@dataclass(frozen=True)
class Principal:
    principal_id: str
    kind: str
    account_id: str
    account_key: int  # fc.accounts.id, for the authority checks

    def json(self) -> dict[str, str]:
        return {"principal_id": self.principal_id, "kind": self.kind, "account_id": self.account_id}


class HttpError(Exception):
    def __init__(self, status: int, reason: str, message: str,
                 fields: list[dict[str, str]] | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.fields = status, reason, message, fields or []
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        body: dict[str, Any] = {"status": self.status, "reason": self.reason, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_s is not None:
            # whole seconds, rounded up; a bucket that never refills: an hour
            wait = self.retry_after_s
            headers["Retry-After"] = "3600" if wait == float("inf") else str(max(1, math.ceil(wait)))
        return web.json_response({"error": body}, status=self.status, headers=headers)


def from_rpc(exc: grpc.aio.AioRpcError) -> HttpError:
    """The core's refusal as an HTTP error: its reason and the fields at
    fault, never anything the request carried."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    reason, fields = "UNSPECIFIED", []
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(bad):
                fields = [{"field": v.field, "description": v.description} for v in bad.field_violations]
    code = exc.code()
    return HttpError(_HTTP.get(code, 502), reason, exc.details() or code.name, fields)


# --- the route table ------------------------------------------------------------------------

Handler = Callable[["Api", web.Request, Principal | None], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path or query
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    handler: Handler
    auth: bool = True
    body: str | None = None  # schema name
    response: str | None = None  # schema name; None: 204
    params: tuple[Param, ...] = ()
    tag: str = "account"
    errors: tuple[int, ...] = (400, 401, 403, 404, 409, 429, 503)


ACCOUNT_ID = Param("account_id", "path", schemas.UUID, "an account the principal has authority over")
CARD_ID = Param("card_id", "path", schemas.UUID, "a card of such an account")
PAGING = (Param("page_size", "query", {"type": "integer", "minimum": 0, "maximum": 500},
                "at most this many (default 50, max 500)"),
          Param("page_token", "query", schemas.PAGE_TOKEN, "from the previous page"))
IDEMPOTENCY_KEY = "Idempotency-Key"


# --- the application ------------------------------------------------------------------------


@dataclass
class Api:
    settings: ApiSettings
    now: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(dt.UTC))
    db: Database = field(init=False)
    channel: grpc.aio.Channel = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.db = Database(s.database_url, min_size=1, max_size=s.pool_max, timeout_s=5.0,
                           name="fuelcard-api")
        self.by_ip = Throttle(s.ip_rate, s.ip_burst, max_keys=s.max_throttle_keys)
        self.by_principal = Throttle(s.principal_rate, s.principal_burst, max_keys=s.max_throttle_keys)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        credentials = grpc.ssl_channel_credentials(
            root_certificates=s.ca.read_bytes(), private_key=s.key.read_bytes(),
            certificate_chain=s.cert.read_bytes())
        self.channel = grpc.aio.secure_channel(s.target, credentials)
        self.accounts = account_pb2_grpc.AccountServiceStub(self.channel)
        self.control = control_pb2_grpc.ControlServiceStub(self.channel)
        self.security = security_pb2_grpc.SecurityServiceStub(self.channel)
        await self.db.open()
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.channel.close(grace=None)
        await self.db.close()

    async def _sweep_loop(self) -> None:
        # Expired sessions are refused on sight; this only reclaims the rows.
        while True:
            await asyncio.sleep(300)
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("session sweep failed: %s", type(exc).__name__)

    async def sweep(self) -> int:
        return len(await self.db.fetch_all(SWEEP_SQL, {"now": self.now()}))

    # --- plumbing ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        for route in ROUTES:
            app.router.add_route(route.method, route.path, self._bind(route))
        app.router.add_get("/openapi.json", self._openapi)
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        if request.path == "/console" or request.path.startswith("/console/"):
            # the operator console (fuelcard_console) answers in HTML with its own error pages;
            # the per-IP limit holds for it too
            wait = self.by_ip.take(request.remote or "unknown")
            if wait:
                return web.Response(status=429, text="请求过于频繁，请稍后再试。",
                                    headers={"Retry-After": "3600" if wait == float("inf")
                                             else str(max(1, math.ceil(wait)))})
            return await handler(request)
        try:
            wait = self.by_ip.take(request.remote or "unknown")
            if wait:
                raise _too_many(wait)
            return await handler(request)
        except HttpError as exc:
            return exc.response()
        except web.HTTPRequestEntityTooLarge:
            return HttpError(413, "BODY_TOO_LARGE", f"at most {MAX_BODY_BYTES} bytes").response()
        except web.HTTPException as exc:  # the router's 404 and 405
            return HttpError(exc.status, "NOT_FOUND" if exc.status == 404 else "METHOD_NOT_ALLOWED",
                             exc.reason).response()
        except grpc.aio.AioRpcError as exc:
            return from_rpc(exc).response()
        except ApiError as exc:  # the API's own database calls (sessions, authority)
            status = 503 if exc.code is grpc.StatusCode.UNAVAILABLE else 500
            return HttpError(status, exc.reason, "the service is unavailable; retry"
                             if status == 503 else "internal error").response()
        except Exception as exc:  # a bug: the type in the log, never the request
            log.exception("unhandled %s in %s %s", type(exc).__name__, request.method,
                          request.match_info.route.resource.canonical
                          if request.match_info.route.resource else "?")
            return HttpError(500, "INTERNAL", "internal error").response()

    def _bind(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            principal = await self._authenticate(request) if route.auth else None
            return await route.handler(self, request, principal)
        return serve

    async def _openapi(self, request: web.Request) -> web.Response:
        from fuelcard_api.openapi import document

        return web.json_response(document())

    async def _authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HttpError(401, "SESSION_MISSING", "log in first: Authorization: Bearer <token>")
        row = await self.db.fetch_one(SESSION_SQL, {"hash": _token_hash(token.strip()), "now": self.now()})
        if row is None:
            raise HttpError(401, "SESSION_INVALID", "the session expired or ended: log in again")
        principal = Principal(row[0], principals.KIND_NAMES[row[1]], row[2], row[3])
        wait = self.by_principal.take(principal.principal_id)
        if wait:
            raise _too_many(wait)
        return principal

    def metadata(self, principal: Principal) -> tuple[tuple[str, str], ...]:
        return ((ON_BEHALF_OF, f"principal:{principal.principal_id}"),)

    def request_id(self, request: web.Request, principal: Principal) -> str:
        """The idempotency key sent to the core: the client's Idempotency-Key
        (scoped to the principal: two principals' keys never meet, as all
        calls share the API's certificate) or a fresh one."""
        key = request.headers.get(IDEMPOTENCY_KEY)
        if key is None:
            return "api-" + uuid.uuid4().hex
        if not 1 <= len(key) <= 200:
            raise HttpError(400, "IDEMPOTENCY_KEY_INVALID", "Idempotency-Key: 1-200 characters")
        return "api-" + hashlib.sha256(f"{principal.principal_id}\0{key}".encode()).hexdigest()[:48]

    async def may_touch_account(self, principal: Principal, account_id: str) -> None:
        await self._authority(ACCOUNT_AUTHORITY_SQL, principal, account_id, "account")

    async def may_touch_card(self, principal: Principal, card_id: str) -> None:
        await self._authority(CARD_AUTHORITY_SQL, principal, card_id, "card")

    async def _authority(self, sql: Any, principal: Principal, target: str, what: str) -> None:
        if not isinstance(target, str) or not _UUID.fullmatch(target):
            raise HttpError(400, "ID_MALFORMED", f"the {what} id must be a lower-case UUID")
        # Unknown and not-yours answer alike: the API does not tell which ids exist.
        if await self.db.fetch_one(sql, {"target": target, "mine": principal.account_key}) is None:
            raise HttpError(403, "NOT_YOUR_" + what.upper(),
                            f"this {what} is not one the principal has authority over")

    async def audit(self, actor: str, method: str, target: str | None, outcome: str) -> None:
        await self.db.fetch_all(AUDIT_SQL, {"lock": AUDIT_LOCK, "actor": actor, "method": method,
                                            "target": target, "outcome": outcome})

    async def call(self, method: Any, message: Any, principal: Principal) -> Any:
        return await method(message, metadata=self.metadata(principal),
                            timeout=self.settings.call_timeout_s)


def _too_many(wait: float) -> HttpError:
    return HttpError(429, "RATE_LIMITED", "too many requests; retry later", retry_after_s=wait)


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HttpError(400, "BODY_MALFORMED", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HttpError(400, "BODY_MALFORMED", "the body must be a JSON object")
    return body


def _int(body: dict[str, Any], name: str, *, required: bool = False) -> int:
    value = body.get(name)
    if value is None and not required:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise HttpError(400, "FIELD_INVALID", f"{name}: a non-negative integer",
                        [{"field": name, "description": "must be a non-negative integer"}])
    return value


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise HttpError(400, "FIELD_INVALID", f"{name}: required",
                        [{"field": name, "description": "is required (a string)"}])
    return value


def _limits(body: dict[str, Any]) -> control_pb2.SpendingLimits:
    raw = body.get("limits")
    if not isinstance(raw, dict):
        raise HttpError(400, "FIELD_INVALID", "limits: required",
                        [{"field": "limits", "description": "is required (an object)"}])
    return control_pb2.SpendingLimits(per_transaction_fen=_int(raw, "per_transaction_fen"),
                                      daily_fen=_int(raw, "daily_fen"), monthly_fen=_int(raw, "monthly_fen"))


def _step_up(body: dict[str, Any]) -> step_up_pb2.StepUp | None:
    raw = body.get("step_up")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise HttpError(400, "FIELD_INVALID", "step_up: an object")
    return step_up_pb2.StepUp(challenge_id=_str(raw, "challenge_id"), code=_str(raw, "code"))


def _timestamp(body: dict[str, Any], name: str) -> Timestamp:
    text = _str(body, name)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if when.tzinfo is None:
            raise ValueError
    except ValueError:
        raise HttpError(400, "FIELD_INVALID", f"{name}: an RFC 3339 time with its offset",
                        [{"field": name, "description": "must be an RFC 3339 time"}]) from None
    ts = Timestamp()
    ts.FromDatetime(when.astimezone(dt.UTC))
    return ts


def _paging(request: web.Request) -> tuple[int, str]:
    try:
        size = int(request.query.get("page_size", "0"))
    except ValueError:
        raise HttpError(400, "PAGE_SIZE_INVALID", "page_size: an integer 0-500") from None
    return size, request.query.get("page_token", "")


def _me(principal: Principal | None) -> Principal:
    assert principal is not None  # every route but login authenticates
    return principal


# --- handlers -------------------------------------------------------------------------------


async def login(api: Api, request: web.Request, _: Principal | None) -> web.StreamResponse:
    body = await _body(request)
    name, password = body.get("login"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str):
        raise HttpError(400, "FIELD_INVALID", "login and password are required strings")
    row = await api.db.fetch_one(LOGIN_SQL, {"login": name}) if 3 <= len(name) <= 64 else None
    # scrypt off the event loop: tens of milliseconds of CPU per try
    ok = await asyncio.to_thread(principals.check_password, password, row[5] if row else None)
    if row is None or not ok:
        await api.audit("api:anonymous", "/fuelcard.api/Login", row[1] if row else None,
                        "UNAUTHENTICATED LOGIN_FAILED")
        raise HttpError(401, "LOGIN_FAILED", "wrong login or password")
    principal = Principal(row[1], principals.KIND_NAMES[row[2]], row[3], row[4])
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = api.now()
    expires = now + dt.timedelta(seconds=api.settings.session_ttl_s)
    await api.db.fetch_all(NEW_SESSION_SQL, {"hash": _token_hash(token), "principal": row[0], "now": now,
                                             "expires": expires})
    await api.audit(f"api:principal:{principal.principal_id}", "/fuelcard.api/Login",
                    principal.principal_id, "OK")
    return web.json_response({"token": token, "expire_time": expires.isoformat().replace("+00:00", "Z"),
                              "principal": principal.json()}, status=201)


async def logout(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    token = request.headers["Authorization"].partition(" ")[2].strip()
    await api.db.fetch_all(END_SESSION_SQL, {"hash": _token_hash(token)})
    await api.audit(f"api:principal:{_me(principal).principal_id}", "/fuelcard.api/Logout",
                    _me(principal).principal_id, "OK")
    return web.Response(status=204)


async def me(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p = _me(principal)
    r = await api.call(api.accounts.GetAccount, account_pb2.GetAccountRequest(account_id=p.account_id), p)
    return web.json_response({"principal": p.json(), "account": schemas.account_json(r.account)})


async def get_account(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p, account_id = _me(principal), request.match_info["account_id"]
    await api.may_touch_account(p, account_id)
    r = await api.call(api.accounts.GetAccount, account_pb2.GetAccountRequest(account_id=account_id), p)
    return web.json_response(schemas.account_json(r.account))


async def list_transactions(api: Api, request: web.Request, principal: Principal | None
                            ) -> web.StreamResponse:
    p, account_id = _me(principal), request.match_info["account_id"]
    await api.may_touch_account(p, account_id)
    size, token = _paging(request)
    r = await api.call(api.accounts.ListTransactions, account_pb2.ListTransactionsRequest(
        account_id=account_id, page_size=size, page_token=token), p)
    return web.json_response({"transactions": [schemas.transaction_json(t) for t in r.transactions],
                              "next_page_token": r.next_page_token})


async def list_cards(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p, account_id = _me(principal), request.match_info["account_id"]
    await api.may_touch_account(p, account_id)
    size, token = _paging(request)
    r = await api.call(api.accounts.ListCards, account_pb2.ListCardsRequest(
        account_id=account_id, page_size=size, page_token=token), p)
    return web.json_response({"cards": [schemas.card_json(c) for c in r.cards],
                              "next_page_token": r.next_page_token})


async def list_sub_accounts(api: Api, request: web.Request, principal: Principal | None
                            ) -> web.StreamResponse:
    p, account_id = _me(principal), request.match_info["account_id"]
    await api.may_touch_account(p, account_id)
    size, token = _paging(request)
    r = await api.call(api.accounts.ListSubAccounts, account_pb2.ListSubAccountsRequest(
        parent_account_id=account_id, page_size=size, page_token=token), p)
    return web.json_response({"accounts": [schemas.account_json(a) for a in r.accounts],
                              "next_page_token": r.next_page_token})


def _target(request: web.Request) -> tuple[str, str]:
    if "card_id" in request.match_info:
        return "card_id", request.match_info["card_id"]
    return "account_id", request.match_info["account_id"]


async def _may_touch(api: Api, p: Principal, kind: str, target: str) -> None:
    if kind == "card_id":
        await api.may_touch_card(p, target)
    else:
        await api.may_touch_account(p, target)


async def get_limits(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p, (kind, target) = _me(principal), _target(request)
    await _may_touch(api, p, kind, target)
    message = control_pb2.GetSpendingLimitsRequest()
    setattr(message, kind, target)
    r = await api.call(api.control.GetSpendingLimits, message, p)
    return web.json_response({"limits": schemas.limits_json(r.limits),
                              "effective_limits": schemas.limits_json(r.effective_limits),
                              "used_today_fen": r.used_today_fen,
                              "used_this_month_fen": r.used_this_month_fen,
                              "raise_end_time": schemas.time_json(r.raise_end_time)})


async def set_limits(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p, (kind, target) = _me(principal), _target(request)
    await _may_touch(api, p, kind, target)
    body = await _body(request)
    message = control_pb2.SetSpendingLimitsRequest(
        request_id=api.request_id(request, p), actor_account_id=p.account_id, limits=_limits(body))
    setattr(message, kind, target)  # the oneof target: card_id or account_id
    step_up = _step_up(body)
    if step_up is not None:
        message.step_up.CopyFrom(step_up)
    r = await api.call(api.control.SetSpendingLimits, message, p)
    return web.json_response(schemas.limits_json(r.limits))


async def step_up_challenge(api: Api, request: web.Request, principal: Principal | None
                            ) -> web.StreamResponse:
    p, body = _me(principal), await _body(request)
    if body.get("kind") != "limit_raise":
        raise HttpError(400, "FIELD_INVALID", "kind: limit_raise",
                        [{"field": "kind", "description": "must be limit_raise"}])
    subject = _str(body, "subject_id")
    if not _UUID.fullmatch(subject):
        raise HttpError(400, "ID_MALFORMED", "subject_id: a lower-case UUID")
    # the subject is an account or a card the principal has authority over
    if await api.db.fetch_one(ACCOUNT_AUTHORITY_SQL, {"target": subject, "mine": p.account_key}) is None:
        await api.may_touch_card(p, subject)
    r = await api.call(api.security.CreateStepUpChallenge, security_pb2.CreateStepUpChallengeRequest(
        request_id=api.request_id(request, p), kind=step_up_pb2.STEP_UP_KIND_LIMIT_RAISE,
        subject_id=subject, amount_fen=_int(body, "amount_fen")), p)
    return web.json_response({"challenge_id": r.challenge_id, "expire_time": schemas.time_json(r.expire_time),
                              "masked_destination": r.masked_destination, "max_attempts": r.max_attempts},
                             status=201)


async def grant_raise(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p, (kind, target) = _me(principal), _target(request)
    await _may_touch(api, p, kind, target)
    body = await _body(request)
    message = control_pb2.GrantTemporaryRaiseRequest(
        request_id=api.request_id(request, p), actor_account_id=p.account_id, limits=_limits(body),
        start_time=_timestamp(body, "start_time"), end_time=_timestamp(body, "end_time"))
    setattr(message, kind, target)
    step_up = _step_up(body)
    if step_up is not None:
        message.step_up.CopyFrom(step_up)
    r = await api.call(api.control.GrantTemporaryRaise, message, p)
    return web.json_response({"raise_id": r.raise_id}, status=201)


async def transfer_points(api: Api, request: web.Request, principal: Principal | None
                          ) -> web.StreamResponse:
    p, body = _me(principal), await _body(request)
    source, dest = _str(body, "from_account_id"), _str(body, "to_account_id")
    await api.may_touch_account(p, source)
    await api.may_touch_account(p, dest)
    r = await api.call(api.control.TransferPoints, control_pb2.TransferPointsRequest(
        request_id=api.request_id(request, p), from_account_id=source, to_account_id=dest,
        points=_int(body, "points", required=True)), p)
    return web.json_response({"from_points_balance": r.from_points_balance,
                              "to_points_balance": r.to_points_balance}, status=201)


async def top_up(api: Api, request: web.Request, principal: Principal | None) -> web.StreamResponse:
    p, body = _me(principal), await _body(request)
    raw = body.get("lines")
    if not isinstance(raw, list) or not 1 <= len(raw) <= 1000 or not all(isinstance(x, dict) for x in raw):
        raise HttpError(400, "FIELD_INVALID", "lines: 1-1000 objects",
                        [{"field": "lines", "description": "must hold 1-1000 lines"}])
    lines = []
    for line in raw:
        account = _str(line, "account_id")
        await api.may_touch_account(p, account)
        lines.append(control_pb2.TopUpLine(account_id=account, amount_fen=_int(line, "amount_fen",
                                                                                required=True)))
    r = await api.call(api.control.BatchTopUp, control_pb2.BatchTopUpRequest(
        request_id=api.request_id(request, p), parent_account_id=p.account_id, lines=lines), p)
    return web.json_response({"total_fen": r.total_fen, "parent_balance_fen": r.parent_balance_fen},
                             status=201)


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/sessions", "login", "Log in: a bearer token for the other calls", login,
          auth=False, body="LoginRequest", response="Session", tag="session", errors=(400, 401, 429, 503)),
    Route("DELETE", "/v1/sessions/current", "logout", "Log out: the token stops working", logout,
          tag="session", errors=(401, 429)),
    Route("GET", "/v1/me", "getMe", "Who is logged in, and their account with its balance", me,
          response="Me", tag="session"),
    Route("GET", "/v1/accounts/{account_id}", "getAccount", "An account and its balance", get_account,
          response="Account", params=(ACCOUNT_ID,)),
    Route("GET", "/v1/accounts/{account_id}/transactions", "listTransactions",
          "An account's history (settled money movements), newest first", list_transactions,
          response="TransactionPage", params=(ACCOUNT_ID, *PAGING)),
    Route("GET", "/v1/accounts/{account_id}/cards", "listCards", "An account's cards, oldest first",
          list_cards, response="CardPage", params=(ACCOUNT_ID, *PAGING)),
    Route("GET", "/v1/accounts/{account_id}/sub-accounts", "listSubAccounts",
          "The sub-accounts: a family's secondary cards, a fleet's vehicles", list_sub_accounts,
          response="AccountPage", params=(ACCOUNT_ID, *PAGING)),
    Route("GET", "/v1/accounts/{account_id}/limits", "getAccountLimits",
          "A sub-account's caps, those in force and what was used", get_limits,
          response="LimitsView", params=(ACCOUNT_ID,), tag="limits"),
    Route("PUT", "/v1/accounts/{account_id}/limits", "setAccountLimits",
          "Set a sub-account's caps (a raise needs a step-up)", set_limits, body="SetLimitsRequest",
          response="Limits", params=(ACCOUNT_ID,), tag="limits"),
    Route("GET", "/v1/cards/{card_id}/limits", "getCardLimits", "A card's caps", get_limits,
          response="LimitsView", params=(CARD_ID,), tag="limits"),
    Route("PUT", "/v1/cards/{card_id}/limits", "setCardLimits", "Set a card's caps (a raise needs a "
          "step-up)", set_limits, body="SetLimitsRequest", response="Limits", params=(CARD_ID,),
          tag="limits"),
    Route("POST", "/v1/step-up-challenges", "createStepUpChallenge",
          "Send a one-time code by SMS for a limit raise", step_up_challenge,
          body="StepUpChallengeRequest", response="StepUpChallenge", tag="limits"),
    Route("POST", "/v1/accounts/{account_id}/raises", "grantAccountRaise",
          "A temporary raise of a sub-account's caps (needs a step-up)", grant_raise,
          body="RaiseRequest", response="Raise", params=(ACCOUNT_ID,), tag="limits"),
    Route("POST", "/v1/cards/{card_id}/raises", "grantCardRaise",
          "A temporary raise of a card's caps (needs a step-up)", grant_raise, body="RaiseRequest",
          response="Raise", params=(CARD_ID,), tag="limits"),
    Route("POST", "/v1/points-transfers", "transferPoints",
          "Pool points: move points between the family's (or fleet's) accounts", transfer_points,
          body="PointsTransferRequest", response="PointsTransfer", tag="points"),
    Route("POST", "/v1/top-ups", "topUp",
          "Batch top-up (批量充值) of the principal's sub-accounts from its balance", top_up,
          body="TopUpRequest", response="TopUpResult", tag="fleet"),
)


