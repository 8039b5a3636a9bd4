"""The notification service: the channels' HTTP POSTs in, the core's gRPC out.

One URL per channel (`POST /notify/wechat`, `/notify/alipay`,
`/notify/unionpay`, `/notify/ecny`), each feeding that channel's adapter
(framework.Adapter: the mapping checks the channel's signature and reads the
notification, the core client makes the signed, idempotent core call over
mutual TLS with the channel's adapter certificate). aiohttp serves it on one
event loop, which also checks the channels' signatures and makes the core
calls (grpc.aio; or a library adapter's blocking client on a bounded thread
pool) in the request's context, so its OpenTelemetry span (the
notification's, child of a proxy's `traceparent` if one came) is the parent
of the core's span of the call.

What a channel gets back is what makes it stop or retry (framework.Outcome):
taken; "retry" when the core is unreachable or slower than the deadline (the
channels wait at most about 5 s for an answer, so the service answers before
that) or a refund came before its payment; refused when the notification is
not genuine, stale, or larger than the body limit (413). Nothing is kept
here that the core does not have: a notification the core did not take is
answered "retry", and the channel sends it again until it does.

Duplicates: the channels re-notify for about 24 hours, and a burst of the
same notification may arrive at once. Notifications of the same event (the
Event key: kind, the channel's ids, amounts) share one core call while it is
in flight, and an event the core took is remembered for `ttl_s` (at most
`capacity` events, oldest forgotten first) and answered without a call.
What is forgotten, or arrives at another instance, still goes to the core,
which is idempotent on the request_id derived from the channel's ids: the
memory saves calls, it is not what makes a duplicate harmless.

Log lines name the channel, the outcome and its reason, and the duration:
never an account, an amount or a payer's detail.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fuelcard_adapters.core import AsyncCoreClient
from fuelcard_adapters.framework import Adapter, Event, HttpReply, HttpRequest, Outcome, Result

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()
T = TypeVar("T")
T_arg = TypeVar("T_arg")

MAX_BODY = 64 * 1024      # a real notification is a few KiB
DEADLINE_S = 4.0          # WeChat Pay waits 5 s; answer "retry" before it gives up
DAY_S = 24 * 3600.0       # how long the channels keep re-notifying
# Notifications being served at once past which more are answered "retry" at
# once: under overload a queue only makes every answer late (and the channel
# retries anyway), so the service stays quick and its memory bounded.
MAX_INFLIGHT = 256
# Core calls in flight at once (the thread pool's size on the blocking path).
# More only queue inside the core for its database pool, where they time out
# or are shed: the load run without this bound saw DATABASE_BUSY answers and
# most notifications answered "retry".
CORE_CONCURRENCY = 8


class NotificationMemory:
    """Events the core took, by key, for `ttl_s`; at most `capacity` of them
    (memory stays flat under any load: the oldest are forgotten first)."""

    # ~0.5 KB an event: 50 000 is ~25 MB, a few minutes of notifications at
    # hundreds a second, which is when a channel's quick retries come; what
    # falls out goes to the core, idempotent on its own.
    def __init__(self, ttl_s: float = DAY_S, capacity: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        self._taken: collections.OrderedDict[object, tuple[float, Result]] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        return len(self._taken)

    def get(self, key: object) -> Result | None:
        found = self._taken.get(key)
        if found is None:
            return None
        if found[0] < self._clock():
            del self._taken[key]
            return None
        return found[1]

    def put(self, key: object, result: Result) -> None:
        self._taken[key] = (self._clock() + self.ttl_s, result)
        self._taken.move_to_end(key)
        while len(self._taken) > self.capacity:
            self._taken.popitem(last=False)


# Opens a channel's asyncio core client on the service's loop (grpc.aio
# channels belong to the loop they are made on); the channel is closed at stop.
AsyncCoreFactory = Callable[[], tuple[AsyncCoreClient, grpc.aio.Channel]]


@dataclass(frozen=True)
class Route:
    """One channel's URL segment and its adapter."""

    name: str  # /notify/<name>
    adapter: Adapter
    # The core called from the loop (grpc.aio); None: the adapter's blocking
    # client on the thread pool. The load run measured the thread hand-offs
    # at about a tenth of the service's CPU.
    connect: AsyncCoreFactory | None = None


class NotifyService:
    def __init__(self, routes: Iterable[Route], *, max_body: int = MAX_BODY,
                 deadline_s: float = DEADLINE_S, memory: NotificationMemory | None = None,
                 trusted_proxies: Iterable[str] = (),
                 max_inflight: int = MAX_INFLIGHT, core_concurrency: int = CORE_CONCURRENCY
                 ) -> None:
        self.routes = {r.name: r for r in routes}
        self.max_body = max_body
        self.deadline_s = deadline_s
        self.memory = memory or NotificationMemory()
        self.trusted_proxies = frozenset(trusted_proxies)
        self.max_inflight = max_inflight
        self._serving = 0
        self._pool = ThreadPoolExecutor(max_workers=core_concurrency, thread_name_prefix="notify")
        self._inflight: dict[object, asyncio.Future[Result]] = {}
        self._cores: dict[str, AsyncCoreClient] = {}
        self._core_slots = asyncio.Semaphore(core_concurrency)
        self._core_channels: list[grpc.aio.Channel] = []
        self.counts: collections.Counter[str] = collections.Counter()  # outcome -> notifications

    def application(self) -> web.Application:
        # client_max_size bounds what request.read() accepts (413 past it);
        # the Content-Length check below refuses before reading at all.
        app = web.Application(client_max_size=self.max_body)
        for route in self.routes.values():
            app.router.add_post(f"/notify/{route.name}", functools.partial(self._serve, route))
        app.router.add_get("/healthz", self._health)
        app.on_startup.append(self._connect)
        app.on_cleanup.append(self._close)
        return app

    async def _connect(self, _app: web.Application) -> None:
        for route in self.routes.values():
            if route.connect is not None:
                core, channel = route.connect()
                self._cores[route.name] = core
                self._core_channels.append(channel)

    async def _close(self, _app: web.Application) -> None:
        for channel in self._core_channels:
            await channel.close(None)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _client(self, request: web.Request) -> str:
        """The sender's address: the peer, or the client a trusted reverse
        proxy names last in X-Forwarded-For (any earlier entry is the
        sender's own claim)."""
        peer = request.remote or "-"
        forwarded = request.headers.get("x-forwarded-for", "")
        if peer in self.trusted_proxies and forwarded:
            return forwarded.rsplit(",", 1)[-1].strip()
        return peer

    async def _serve(self, route: Route, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        parent = _PROPAGATOR.extract({k.lower(): v for k, v in request.headers.items()})
        with _tracer.start_as_current_span(f"notify {route.name}", context=parent,
                                           kind=SpanKind.SERVER) as span:
            result, reply = await self._process(route, request)
            span.set_attribute("fuelcard.notify.outcome", result.outcome.value)
            span.set_attribute("fuelcard.notify.reason", result.reason[:80])
            self.counts[result.outcome.value] += 1
            log.info("notify %s from %s: %s %s, HTTP %d in %.1f ms", route.name,
                     self._client(request), result.outcome.value, result.reason[:80],
                     reply.status, (time.perf_counter() - started) * 1000)
        return web.Response(status=reply.status, body=reply.body, headers=dict(reply.headers))

    async def _process(self, route: Route, request: web.Request) -> tuple[Result, HttpReply]:
        mapping = route.adapter.mapping
        if self._serving >= self.max_inflight:
            busy = Result(Outcome.RETRY, "BUSY")
            return busy, mapping.reply(busy)
        self._serving += 1
        try:
            return await self._read_and_apply(route, request)
        finally:
            self._serving -= 1

    async def _read_and_apply(self, route: Route, request: web.Request
                              ) -> tuple[Result, HttpReply]:
        mapping = route.adapter.mapping
        length = request.content_length
        body: bytes | None = None
        if length is None or length <= self.max_body:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                body = None
        if body is None:
            # The channel's failure answer, as 413: nothing was read or parsed.
            result = Result(Outcome.REJECTED, "BODY_TOO_LARGE")
            return result, dataclasses.replace(mapping.reply(result), status=413)
        notification = HttpRequest(body, {k.lower(): v for k, v in request.headers.items()})
        # Reading and checking a notification is CPU only (an RSA verify is
        # ~50 µs, SM2 under 1 ms): done on the loop, a thread hop costs more.
        try:
            parsed = route.adapter.parse(notification)
        except Exception as exc:  # a mapping's gap must not become aiohttp's bare 500
            log.warning("notify %s: unreadable notification (%s)", route.name, type(exc).__name__)
            parsed = Result(Outcome.REJECTED, "MALFORMED")
        if isinstance(parsed, Result):
            return parsed, mapping.reply(parsed)
        result = await self._apply(route, parsed)
        return result, mapping.reply(result)

    async def _apply(self, route: Route, event: Event) -> Result:
        key = (route.adapter.mapping.channel, event.key)
        known = self.memory.get(key)
        if known is not None:
            return known
        pending = self._inflight.get(key)
        if pending is None:
            core = self._cores.get(route.name)
            pending = asyncio.ensure_future(
                self._apply_async(route.adapter, event, core) if core is not None
                else self._in_thread(route.adapter.apply, event))
            self._inflight[key] = pending
            pending.add_done_callback(functools.partial(self._settled, key))
        try:
            # shield: one notification giving up does not cancel the call the
            # others (and the next retry) are waiting for.
            return await asyncio.wait_for(asyncio.shield(pending), self.deadline_s)
        except TimeoutError:
            log.warning("notify %s: the core did not answer within %.1f s", route.name,
                        self.deadline_s)
            return Result(Outcome.RETRY, "CORE_TIMEOUT")
        except Exception as exc:
            # Whatever went wrong on the way to the core, the channel's answer
            # is "retry": it sends the notification again. The type only: an
            # exception's text may quote the request.
            log.error("notify %s: core call failed (%s)", route.name, type(exc).__name__)
            return Result(Outcome.RETRY, "INTERNAL")

    async def _apply_async(self, adapter: Adapter, event: Event, core: AsyncCoreClient) -> Result:
        async with self._core_slots:
            return await adapter.apply_async(event, core)

    def _settled(self, key: object, done: asyncio.Future[Result]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            result = done.result()
            if result.outcome is Outcome.ACCEPTED:
                self.memory.put(key, result)

    async def _in_thread(self, fn: Callable[[T_arg], T], arg: T_arg) -> T:
        # The request's contextvars (its span) go along into the thread.
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(ctx.run, fn, arg))


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS for the listener (when no reverse proxy terminates it)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def start(service: NotifyService, host: str, port: int,
                ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Listen; the runner (cleanup() stops it) and the bound port."""
    runner = web.AppRunner(service.application(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=1024,
                       reuse_address=True)
    await site.start()
    return runner, int(runner.addresses[0][1])


def routes_by_name(adapters: Mapping[str, Adapter]) -> list[Route]:
    return [Route(name, adapter) for name, adapter in adapters.items()]
