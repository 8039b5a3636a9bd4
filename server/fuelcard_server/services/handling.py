"""What every servicer shares: dependencies, request fingerprints, and the
translation of ApiError into a gRPC status."""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from fuelcard_server.audit import AuditLog
from fuelcard_server.card_numbers import CardVault
from fuelcard_server.cards import PanIndex
from fuelcard_server.clock import Clock
from fuelcard_server.db import Database
from fuelcard_server.errors import ApiError, internal, permission_denied, unauthenticated
from fuelcard_server.gm import Sm2PrivateKey
from fuelcard_server.identity import DEVELOPMENT, Caller, Role
from fuelcard_server.identity import of as identity_of
from fuelcard_server.pins import Pins
from fuelcard_server.settings import Settings
from fuelcard_server.stepup import StepUps
from fuelcard_server.terminals import TerminalKeys

log = logging.getLogger(__name__)

# The authenticated caller of the RPC being served. grpc.aio serves each RPC
# in its own task, so each sees its own value.
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("fuelcard_caller",
                                                                 default=DEVELOPMENT)

# Fields that authenticate a request rather than say what it asks for: a POS
# may re-sign a retry with a fresh counter, and it is still the same request
# (a retry of a high-risk operation needs no fresh step-up code either).
_AUTH_FIELDS = ("mac", "terminal_counter", "key_version", "signature", "step_up")


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
    # False only in development mode (plaintext on loopback): no identities.
    tls: bool = False

    @property
    def hold_ttl(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.hold_ttl_s)

    def fingerprint(self, operation: str, request: Message) -> bytes:
        """Keyed fingerprint of a request, to tell a replay from a reuse of
        its request_id. Keyed, because requests carry card numbers and a
        plain hash of a 19-digit number can be reversed by brute force."""
        fields = request.DESCRIPTOR.fields_by_name
        if any(name in fields for name in _AUTH_FIELDS):
            stripped = type(request)()
            stripped.CopyFrom(request)
            for name in _AUTH_FIELDS:
                if name in fields:
                    stripped.ClearField(name)
            request = stripped
        body = operation.encode() + b"\0" + request.SerializeToString(deterministic=True)
        return hmac.new(self.fingerprint_key, body, hashlib.sha256).digest()

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Who is calling, as the scope of idempotency keys: one caller's
        request_ids never meet another's. Development mode has one scope."""
        return _CALLER.get().key

    @staticmethod
    def identity() -> Caller:
        """The authenticated caller of the RPC being served."""
        return _CALLER.get()

    async def terminal_auth(self, mac: bytes, key_version: int, counter: int,
                            *fields: bytes | str | int) -> tuple[str | None, int | None]:
        """For a terminal's request: (its terminal id, the counter to advance
        atomically with the operation), after checking the request's MAC.
        (None, None) for other callers and in development mode, where no
        certificate names a terminal."""
        caller = _CALLER.get()
        if not self.tls or caller.role is not Role.POS:
            return None, None
        if not mac:
            if self.settings.require_mac:
                raise unauthenticated("MAC_MISSING", "terminal requests must carry a MAC")
            return caller.name, None
        await self.terminal_keys.check_mac(caller.name, key_version, counter, mac,
                                           self.clock.now(), *fields)
        return caller.name, counter


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


def _wrap(fn: Handler[S, Req, Resp], allowed: frozenset[Role]) -> Handler[S, Req, Resp]:
    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        caller: Caller | None = None
        response: Resp | None = None
        error: ApiError | None = None
        try:
            caller = identity_of(context, tls=self.d.tls)
            if caller is None:
                raise unauthenticated("NO_CLIENT_IDENTITY",
                                      "the client certificate names no fuelcard role")
            if not caller.may(allowed):
                raise permission_denied("ROLE_NOT_ALLOWED")
            _CALLER.set(caller)
            response = await fn(self, request, context)
        except ApiError as exc:
            error = exc
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except asyncio.CancelledError:
            self.d.audit.rpc_cancelled(type(self), fn.__name__, allowed, caller, request)
            raise
        except Exception as exc:  # a bug; the client gets INTERNAL, we get the type
            log.exception("unhandled %s in %s", type(exc).__name__, fn.__name__)
            error = internal()
        # The audit record, if this call gets one (never on the POS hot path).
        error = await self.d.audit.rpc_done(type(self), fn.__name__, allowed, caller, request,
                                            response, error)
        if error is None and response is not None:
            return response
        await _abort(context, error or internal())
        raise AssertionError("abort_with_status always raises")

    return wrapper
