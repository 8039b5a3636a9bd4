"""What every servicer shares: dependencies, request fingerprints, and the
translation of ApiError into a gRPC status."""

from __future__ import annotations

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

from fuelcard_server.cards import PanIndex
from fuelcard_server.clock import Clock
from fuelcard_server.db import Database
from fuelcard_server.errors import ApiError, internal
from fuelcard_server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Deps:
    db: Database
    clock: Clock
    settings: Settings
    pan_index: PanIndex
    fingerprint_key: bytes

    @property
    def hold_ttl(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.settings.hold_ttl_s)

    def fingerprint(self, operation: str, request: Message) -> bytes:
        """Keyed fingerprint of a request, to tell a replay from a reuse of
        its request_id. Keyed, because requests carry card numbers and a
        plain hash of a 19-digit number can be reversed by brute force."""
        body = operation.encode() + b"\0" + request.SerializeToString(deterministic=True)
        return hmac.new(self.fingerprint_key, body, hashlib.sha256).digest()

    def caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Who is calling, for scoping idempotency keys. Without
        authenticated identities every caller shares one scope."""
        return ""


Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Self = TypeVar("Self")
Handler = Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: ApiError) -> None:
    # grpc-stubs does not know abort_with_status on the aio context yet.
    abort: Callable[[grpc.Status], Awaitable[None]] = context.abort_with_status  # type: ignore[attr-defined]
    await abort(error.to_status())


def rpc(fn: Handler[Self, Req, Resp]) -> Handler[Self, Req, Resp]:
    """Send ApiErrors as rich statuses; anything else is a bug: log it (the
    type only, never the request) and answer INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await fn(self, request, context)
        except ApiError as exc:
            await _abort(context, exc)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # a bug; the client gets INTERNAL, we get the type
            log.exception("unhandled %s in %s", type(exc).__name__, fn.__name__)
            await _abort(context, internal())
        raise AssertionError("abort_with_status always raises")

    return wrapper
