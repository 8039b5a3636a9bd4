"""What every servicer shares: dependencies, request fingerprints, the
translation of ApiError into a gRPC status, and the registration that
answers undecodable requests."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import functools
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import trace

from fuelcard_server import logs
from fuelcard_server.audit import AuditLog, method_name, should_audit
from fuelcard_server.card_numbers import CardVault
from fuelcard_server.cards import PanIndex
from fuelcard_server.clock import Clock
from fuelcard_server.db import Database
from fuelcard_server.errors import ApiError, internal, malformed, permission_denied, unauthenticated
from fuelcard_server.gm import Sm2PrivateKey
from fuelcard_server.holder_data import HolderSeal
from fuelcard_server.identity import DEVELOPMENT, Caller, Role, acting_for
from fuelcard_server.identity import of as identity_of
from fuelcard_server.overload import Admission, classify
from fuelcard_server.pins import Pins
from fuelcard_server.settings import Settings
from fuelcard_server.stepup import StepUps
from fuelcard_server.telemetry import Telemetry
from fuelcard_server.terminals import TerminalKeys
from fuelcard_server.validation import undecodable

log = logging.getLogger(__name__)

# The authenticated caller of the RPC being served. grpc.aio serves each RPC
# in its own task, so each sees its own value.
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("fuelcard_caller",
                                                                 default=DEVELOPMENT)

# Fields that authenticate a request rather than say what it asks for: a POS
# may re-sign a retry with a fresh counter, under a newer key version after a
# sign-on, and it is still the same request (a retry of a high-risk operation
# needs no fresh step-up code either). A PIN block stays in: it is encrypted
# under the key version, so a PIN-bearing retry under a newer key is another
# request (REQUEST_ID_REUSED; docs/TERMINAL_PROTOCOL.md section 8) - the
# server never decrypts a PIN to compare two requests.
_AUTH_FIELDS = ("mac", "terminal_counter", "key_version", "signature", "step_up")


_AUTH_OF_TYPE: dict[type, tuple[str, ...]] = {}


def _auth_fields(message: type[Message]) -> tuple[str, ...]:
    """The authentication fields a request type has (looked up once per type)."""
    auth = _AUTH_OF_TYPE.get(message)
    if auth is None:
        fields = message.DESCRIPTOR.fields_by_name
        auth = _AUTH_OF_TYPE[message] = tuple(name for name in _AUTH_FIELDS if name in fields)
    return auth


@dataclass
class Deps:
    db: Database
    clock: Clock
    settings: Settings
    pan_index: PanIndex
    fingerprint_key: bytes
    terminal_keys: TerminalKeys
    signing_key: Sm2PrivateKey
    pins: Pins
    # Writes the audit record of each internal/admin call (see audit.py).
    audit: AuditLog
    # One-time codes for high-risk operations (stepup.py).
    step_ups: StepUps
    # Card numbers in segments, sealed (card_numbers.py).
    card_vault: CardVault
    # Holders' phone and ID numbers, sealed (holder_data.py).
    holder_seal: HolderSeal
    # False only in development mode (plaintext on loopback): no identities.
    tls: bool = False
    # Report and history reads: the replica's pool (or a small pool of their
    # own on the primary); None: the transaction pool (tests of one module).
    read_db: Database | None = None
    telemetry: Telemetry = field(default_factory=Telemetry.disabled)
    # Bounded concurrency per priority class; None: no shedding.
    admission: Admission | None = None
    # The unary calls being served (their tasks): shutdown waits for the ones
    # it cancelled to unwind, so that their audit records are written.
    in_flight: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def reads(self) -> Database:
        """Where report and history reads go: never the transaction pool when
        a replica (or a read pool) is configured."""
        return self.read_db if self.read_db is not None else self.db

    @property
    def hold_ttl(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.hold_ttl_s)

    def fingerprint(self, operation: str, request: Message) -> bytes:
        """Keyed fingerprint of a request, to tell a replay from a reuse of
        its request_id. Keyed, because requests carry card numbers and a
        plain hash of a 19-digit number can be reversed by brute force."""
        auth = _auth_fields(type(request))
        if auth:
            stripped = type(request)()
            stripped.CopyFrom(request)
            for name in auth:
                stripped.ClearField(name)
            request = stripped
        body = operation.encode() + b"\0" + request.SerializeToString(deterministic=True)
        # one-shot HMAC (OpenSSL, no HMAC object): the same digest as hmac.new
        return hmac.digest(self.fingerprint_key, body, "sha256")

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Who is calling, as the scope of idempotency keys: one caller's
        request_ids never meet another's. Development mode has one scope."""
        return _CALLER.get().key

    @staticmethod
    def identity() -> Caller:
        """The authenticated caller of the RPC being served."""
        return _CALLER.get()

    async def terminal_auth(self, mac: bytes, key_version: int, counter: int,
                            *fields: bytes | str | int) -> tuple[str | None, str | None, int | None]:
        """For a terminal's request: (its station, its terminal id, the
        counter to advance atomically with the operation), after checking the
        request's MAC. A terminal is the pair (station, terminal id): its
        certificate's O and CN. (None, None, None) for other callers and in
        development mode, where no certificate names a terminal."""
        caller = _CALLER.get()
        if not self.tls or caller.role is not Role.POS:
            return None, None, None
        if not mac:
            if self.settings.require_mac:
                raise unauthenticated("MAC_MISSING", "terminal requests must carry a MAC")
            return caller.scope, caller.name, None
        await self.terminal_keys.check_mac(caller.scope, caller.name, key_version, counter, mac,
                                           self.clock.now(), *fields)
        return caller.scope, caller.name, counter


Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Self = TypeVar("Self")
Handler = Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: ApiError) -> None:
    # grpc-stubs does not know abort_with_status on the aio context yet.
    abort: Callable[[grpc.Status], Awaitable[None]] = context.abort_with_status  # type: ignore[attr-defined]
    await abort(error.to_status())


class Servicer:
    """Base of the servicers: holds the dependencies the rpc decorator reads."""

    def __init__(self, deps: Deps) -> None:
        self.d = deps


S = TypeVar("S", bound=Servicer)


def rpc(*roles: Role) -> Callable[[Handler[S, Req, Resp]], Handler[S, Req, Resp]]:
    """Declare which caller roles may use an RPC; send ApiErrors as rich
    statuses; anything else is a bug: log it (the type only, never the
    request) and answer INTERNAL."""
    assert roles, "every RPC names the roles that may call it"
    allowed = frozenset(roles)

    def decorate(fn: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
        return _wrap(fn, allowed)

    return decorate


# Errors worth an operator's attention, logged at most once a second per
# (method, reason): under a database outage every call fails alike.
_LOGGED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.DEADLINE_EXCEEDED})
_last_logged: dict[tuple[str, str], float] = {}


def _log_failure(method: str, error: ApiError) -> None:
    key = (method, error.reason)
    now = time.monotonic()
    if now - _last_logged.get(key, -2.0) >= 1.0:
        _last_logged[key] = now
        log.warning("%s failed: %s %s", method, error.code.name, error.reason)


class _Meters:
    """Per-method metric attributes, built once per status (no formatting
    on the hot path)."""

    def __init__(self, method: str, priority: str, counts_authorizations: bool) -> None:
        self.method = method
        self.priority = priority
        # Authorize answers are also counted by decision and reason.
        self.counts_authorizations = counts_authorizations
        self.shed = {"rpc.method": method, "priority_class": priority}
        self.by_status: dict[grpc.StatusCode | None, dict[str, str]] = {}
        self.decisions: dict[tuple[int, int], dict[str, str]] = {}

    def status(self, code: grpc.StatusCode | None) -> dict[str, str]:
        attrs = self.by_status.get(code)
        if attrs is None:
            attrs = self.by_status[code] = {"rpc.method": self.method,
                                            "rpc.grpc.status_code": code.name if code else "OK"}
        return attrs

    def decision(self, response: Message) -> dict[str, str]:
        decision: int = getattr(response, "decision", 0)
        reason: int = getattr(response, "decline_reason", 0)
        attrs = self.decisions.get((decision, reason))
        if attrs is None:
            fields = response.DESCRIPTOR.fields_by_name
            attrs = self.decisions[(decision, reason)] = {
                "decision": _enum_name(fields.get("decision"), decision),
                "reason": _enum_name(fields.get("decline_reason"), reason)}
        return attrs


def _enum_name(fd: Any, number: int) -> str:
    if fd is None or fd.enum_type is None:
        return str(number)
    value = fd.enum_type.values_by_number.get(number)
    return value.name if value is not None else str(number)


def _wrap(fn: Handler[S, Req, Resp], allowed: frozenset[Role]) -> Handler[S, Req, Resp]:
    priority = classify(fn.__name__, allowed)
    meters: dict[type, _Meters] = {}

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        d = self.d
        tel = d.telemetry
        servicer: type = type(self)
        m = meters.get(servicer)
        if m is None:
            m = meters[servicer] = _Meters(method_name(servicer, fn.__name__), priority.label,
                                           fn.__name__ == "Authorize")
        started = time.perf_counter()
        admission = d.admission
        if admission is not None and not admission.enter(priority):
            # Refused before any work: no span, no audit record, no database.
            tel.shed.add(1, m.shed)
            abort: Callable[[grpc.Status], Awaitable[None]] = context.abort_with_status  # type: ignore[attr-defined]
            await abort(admission.statuses[priority])
        me = asyncio.current_task()
        if me is not None:
            d.in_flight.add(me)
        try:
            return await _serve(self, request, context, fn, allowed, tel, m, started)
        finally:
            if admission is not None:
                admission.leave(priority)
            if me is not None:
                d.in_flight.discard(me)

    wrapper.__wrapped_roles__ = allowed  # type: ignore[attr-defined]
    return wrapper


async def _serve(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp],
                 fn: Handler[S, Req, Resp], allowed: frozenset[Role], tel: Telemetry,
                 m: _Meters, started: float) -> Resp:
    d = self.d
    # Built anew by grpc at each call: asked for once, and only when needed.
    metadata = context.invocation_metadata() if tel.tracing else None
    span, token = tel.rpc_span(m.method, metadata) if tel.tracing else (None, None)
    logs.METHOD.set(m.method)
    request_id = getattr(request, "request_id", None)
    if request_id:
        logs.REQUEST_ID.set(request_id)
    caller: Caller | None = None
    response: Resp | None = None
    error: ApiError | None = None
    deadline: asyncio.Timeout | None = None
    try:
        caller = identity_of(context, tls=d.tls)
        if caller is None:
            raise unauthenticated("NO_CLIENT_IDENTITY",
                                  "the client certificate names no fuelcard role")
        if caller.role is Role.ADMIN or caller.role is None:  # who may act for someone
            if metadata is None:
                metadata = context.invocation_metadata()
            caller = acting_for(caller, metadata)
        # set before the role check, so the access line of a refused call
        # names the role that was refused
        _CALLER.set(caller)
        if not caller.may(allowed):
            raise permission_denied("ROLE_NOT_ALLOWED")
        remaining = context.time_remaining()
        if remaining is None:
            response = await fn(self, request, context)
        else:
            # Past the caller's deadline the work stops: cancelling the
            # database call cancels its statement in PostgreSQL.
            async with asyncio.timeout(max(remaining, 0.0)) as deadline:
                response = await fn(self, request, context)
    except ApiError as exc:
        error = exc
    except TimeoutError:
        if deadline is not None and deadline.expired():
            error = ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                             "the call's deadline passed; its work was stopped")
        else:  # a time limit of the handler's own, not handled there: a bug
            log.exception("unhandled TimeoutError in %s", fn.__name__)
            error = internal()
    except (grpc.aio.AbortError, grpc.aio.UsageError):
        _finish(tel, m, span, token, started, None)
        raise
    except asyncio.CancelledError:
        d.audit.rpc_cancelled(type(self), fn.__name__, allowed, caller, request)
        _finish(tel, m, span, token, started, grpc.StatusCode.CANCELLED)
        raise
    except Exception as exc:  # a bug; the client gets INTERNAL, we get the type
        log.exception("unhandled %s in %s", type(exc).__name__, fn.__name__)
        error = internal()
    # The audit record, if this call gets one (never on the POS hot path, so
    # asked here first: rpc_done would look the method's name up again).
    try:
        if should_audit(m.method, caller, allowed):
            error = await d.audit.rpc_done(type(self), fn.__name__, allowed, caller, request,
                                           response, error)
    except asyncio.CancelledError:
        # Cancelled while the record was appended (the append itself goes
        # on: it is shielded): end the span and count the call all the same.
        _finish(tel, m, span, token, started, grpc.StatusCode.CANCELLED)
        raise
    if error is None and response is not None:
        if m.counts_authorizations:
            tel.authorizations.add(1, m.decision(response))
        _finish(tel, m, span, token, started, None)
        return response
    error = error or internal()
    if error.code in _LOGGED_CODES:
        _log_failure(m.method, error)
    _finish(tel, m, span, token, started, error.code)
    await _abort(context, error)
    raise AssertionError("abort_with_status always raises")


def _finish(tel: Telemetry, m: _Meters, span: trace.Span | None, token: object,
            started: float, code: grpc.StatusCode | None) -> None:
    elapsed = time.perf_counter() - started
    tel.rpc_latency.record(elapsed * 1000.0, m.status(code))
    caller = _CALLER.get()
    tel.access(m.method, code.name if code else "OK", elapsed,
               caller.role.value if caller.role else caller.name)
    if span is not None:
        if code is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.CANCELLED:
                span.set_status(trace.StatusCode.ERROR)
        span.end()
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Registration: requests that are not messages
# --------------------------------------------------------------------------

class Malformed:
    """What a servicer's request deserializer hands the handler for bytes
    that are not a valid request message, in place of the message: the
    answer to send (gRPC would answer a DecodeError with UNKNOWN and no
    ErrorInfo)."""

    __slots__ = ("error",)

    def __init__(self, error: ApiError) -> None:
        self.error = error


def guarded(server: grpc.aio.Server) -> grpc.aio.Server:
    """A stand-in for `server` to hand the generated add_*Servicer_to_server
    functions: it registers their handlers on `server` with a deserializer
    that answers undecodable requests INVALID_ARGUMENT / MALFORMED_REQUEST
    (a BadRequest naming the field, when one can be named). It takes
    nothing else."""
    return cast(grpc.aio.Server, _Guard(server))


class _Guard:
    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # The generated code registers the same handlers both ways: generic
        # (wrapped, opaque) first, then by method (a dictionary). Both are
        # registered, guarded, from the dictionary below.
        pass

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        methods = descriptor_pool.Default().FindServiceByName(service).methods_by_name
        safe = {name: _guard(handler, methods[name].input_type, f"/{service}/{name}")
                for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        # grpc-stubs does not know registered method handlers yet.
        self._server.add_registered_method_handlers(service, safe)  # type: ignore[attr-defined]


def _deserializer(request: Descriptor) -> Callable[[bytes], Any]:
    parse = message_factory.GetMessageClass(request).FromString

    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return parse(data)
        except DecodeError:
            return Malformed(malformed(request.full_name, undecodable(request, data)))

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], method: str, request: Malformed) -> None:
    _log_failure(method, request.error)
    await _abort(context, request.error)


def _guard(handler: grpc.RpcMethodHandler[Any, Any], request: Descriptor, method: str
           ) -> grpc.RpcMethodHandler[Any, Any]:
    """The handler with a deserializer that never raises, and a behavior
    that answers its Malformed marker before the servicer sees it: for the
    unary calls one check of the request's type (nothing on the pump path
    but that and one more await). No fuelcard RPC streams its requests."""
    if handler.request_streaming:
        raise TypeError(f"{request.full_name}: streamed requests are not guarded yet")
    deserialize = _deserializer(request)
    if not handler.response_streaming:
        unary: Callable[[Any, Any], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if type(request) is Malformed:
                await _refuse(context, method, request)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=deserialize,
            response_serializer=handler.response_serializer)
    stream: Callable[[Any, Any], Any] = handler.unary_stream  # type: ignore[assignment]
    if not inspect.isasyncgenfunction(stream):
        raise TypeError(f"{request.full_name}: a streaming handler must be an async generator")

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[Any]:
        if type(request) is Malformed:
            await _refuse(context, method, request)
        # closed with this generator, whenever grpc closes it
        async with contextlib.aclosing(stream(request, context)) as responses:
            async for response in responses:
                yield response

    return grpc.unary_stream_rpc_method_handler(
        unary_stream, request_deserializer=deserialize,
        response_serializer=handler.response_serializer)
