"""What a console page works with: the core's gRPC services, the database
(primary) for the console's own small tables, the reports database, and the
clock.

`ctx = console_context(request)`:
- `ctx.core.<service>`: gRPC stubs over the edge's admin mTLS channel (the
  JSON API's certificate); `ctx.call(stub_method, request, user)` adds the
  on-behalf-of metadata (the core's audit trail then names the edge and the
  person) and turns a refusal into CoreRefusal(reason, message), which pages
  show in zh-CN (views.refusal_text).
- `ctx.reviewer_core.risk`: the same over the reviewer certificate, for the
  calls only a reviewer may make (RiskService.ReviewHold); None when the
  edge has none (`--reviewer-as`).
- `ctx.db`: a Database on the primary, for small reads and writes of console
  tables (sessions, users) and authority checks.
- `ctx.reports`: a Database for reports and long lists: the replica or the
  warehouse (`--reports-database-url`), the primary only if none is given.
  Reports and big lists read ONLY this, never the pump path's pool.
- `ctx.clock`: now (a ManualClock in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from fuelcard.v1 import (
    account_pb2_grpc,
    adjustment_pb2_grpc,
    control_pb2_grpc,
    funding_pb2_grpc,
    invoice_pb2_grpc,
    points_pb2_grpc,
    refund_pb2_grpc,
    risk_pb2_grpc,
    security_pb2_grpc,
    settlement_pb2_grpc,
    transaction_pb2_grpc,
)
from fuelcard_api.app import ACCOUNT_AUTHORITY_SQL, CARD_AUTHORITY_SQL
from fuelcard_server.clock import Clock, SystemClock
from fuelcard_server.db import Database
from fuelcard_server.identity import ON_BEHALF_OF
from grpc_health.v1 import health_pb2_grpc

from fuelcard_console.auth import ConsoleUser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsoleSettings:
    target: str  # the core's gRPC address
    database_url: str
    # admin mTLS (the edge's certificate); None: a development core without TLS
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    # a reviewer certificate, for RiskService.ReviewHold
    reviewer_cert: Path | None = None
    reviewer_key: Path | None = None
    reports_database_url: str | None = None
    # the core's Prometheus scrape (http://HOST:PORT/metrics), for the SRE page
    metrics_url: str | None = None
    idle_s: int = 30 * 60
    absolute_s: int = 12 * 3600
    step_up_s: int = 5 * 60
    # Secure cookies (HTTPS only): off only for a development edge on loopback over HTTP
    cookie_secure: bool = True
    call_timeout_s: float = 5.0
    pool_max: int = 4
    reports_pool_max: int = 4
    sre_sample_interval_s: float = 5.0


class CoreRefusal(Exception):
    """The core said no: its ErrorInfo reason (UPPER_SNAKE) and message."""

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.code = reason, message, code


def refusal_of(exc: grpc.aio.AioRpcError) -> CoreRefusal:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    reason = exc.code().name
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return CoreRefusal(reason, exc.details() or exc.code().name, exc.code())


class CoreStubs:
    """A stub for every service of the core, over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.account = account_pb2_grpc.AccountServiceStub(channel)
        self.control = control_pb2_grpc.ControlServiceStub(channel)
        self.funding = funding_pb2_grpc.FundingServiceStub(channel)
        self.invoice = invoice_pb2_grpc.InvoiceServiceStub(channel)
        self.risk = risk_pb2_grpc.RiskServiceStub(channel)
        self.settlement = settlement_pb2_grpc.ReconciliationServiceStub(channel)
        self.adjustment = adjustment_pb2_grpc.AdjustmentServiceStub(channel)
        self.points = points_pb2_grpc.PointsServiceStub(channel)
        self.refund = refund_pb2_grpc.RefundServiceStub(channel)
        self.security = security_pb2_grpc.SecurityServiceStub(channel)
        # the step-up challenges are SecurityService's (step_up.proto holds only messages)
        self.step_up = self.security
        self.transaction = transaction_pb2_grpc.TransactionServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


def _channel(target: str, ca: Path | None, cert: Path | None, key: Path | None) -> grpc.aio.Channel:
    if ca is None or cert is None or key is None:
        return grpc.aio.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes())
    return grpc.aio.secure_channel(target, credentials)


@dataclass
class Console:
    """The console's long-lived parts, one per edge process."""

    settings: ConsoleSettings
    clock: Clock = field(default_factory=SystemClock)
    db: Database = field(init=False)
    reports: Database = field(init=False)
    core: CoreStubs = field(init=False)
    reviewer_core: CoreStubs | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        s = self.settings
        self.db = Database(s.database_url, min_size=1, max_size=s.pool_max, timeout_s=5.0,
                           name="fuelcard-console")
        # Reports read this pool only: the replica or the warehouse when given, so a long
        # report never takes a connection the payments' primary would need.
        self.reports = Database(s.reports_database_url or s.database_url, min_size=1,
                                max_size=s.reports_pool_max, timeout_s=10.0,
                                name="fuelcard-console-reports", read_only=True)
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []
        from fuelcard_console.sre import SreSampler

        self.sre = SreSampler(self)

    async def start(self) -> None:
        s = self.settings
        admin = _channel(s.target, s.ca, s.cert, s.key)
        self._channels.append(admin)
        self.core = CoreStubs(admin)
        if s.reviewer_cert is not None and s.reviewer_key is not None:
            reviewer = _channel(s.target, s.ca, s.reviewer_cert, s.reviewer_key)
            self._channels.append(reviewer)
            self.reviewer_core = CoreStubs(reviewer)
        elif s.ca is None:
            # a development core without TLS: every caller may do everything
            self.reviewer_core = self.core
        await self.db.open()
        await self.reports.open()
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="console-session-sweep"))
        self._tasks.append(asyncio.create_task(self.sre.run(), name="console-sre-sampler"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self._channels:
            await channel.close(grace=None)
        await self.reports.close()
        await self.db.close()

    async def _sweep_loop(self) -> None:
        from fuelcard_console import auth

        # Sessions that are over are refused on sight; this only reclaims their rows.
        while True:
            await asyncio.sleep(300)
            try:
                await auth.sweep(self)
            except Exception as exc:
                log.warning("console session sweep failed: %s", type(exc).__name__)


CONSOLE = web.AppKey("fuelcard_console", Console)


@dataclass(frozen=True)
class ConsoleContext:
    console: Console

    @property
    def core(self) -> CoreStubs:
        return self.console.core

    @property
    def reviewer_core(self) -> CoreStubs | None:
        return self.console.reviewer_core

    @property
    def db(self) -> Database:
        return self.console.db

    @property
    def reports(self) -> Database:
        return self.console.reports

    @property
    def clock(self) -> Clock:
        return self.console.clock

    @property
    def settings(self) -> ConsoleSettings:
        return self.console.settings

    async def call(self, method: Any, message: Any, user: ConsoleUser) -> Any:
        """One call to the core on the user's behalf; a refusal raises CoreRefusal."""
        try:
            return await method(message, metadata=((ON_BEHALF_OF, f"console_user:{user.user_id}"),),
                                timeout=self.console.settings.call_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise refusal_of(exc) from None

    async def may_touch_account(self, user: ConsoleUser, account_id: str) -> bool:
        """Whether the user has authority over this account: their own or a
        sub-account of it (the JSON API's rule, fuelcard_api.app)."""
        return await self._authority(ACCOUNT_AUTHORITY_SQL, user, account_id)

    async def may_touch_card(self, user: ConsoleUser, card_id: str) -> bool:
        """Whether the card belongs to an account the user has authority over."""
        return await self._authority(CARD_AUTHORITY_SQL, user, card_id)

    async def _authority(self, sql: Any, user: ConsoleUser, target: str) -> bool:
        import uuid

        if user.account_key is None:
            return False
        try:
            uuid.UUID(target)
        except ValueError:
            return False
        return await self.db.fetch_one(sql, {"target": target, "mine": user.account_key}) is not None


def console_context(request: web.Request) -> ConsoleContext:
    return ConsoleContext(request.app[CONSOLE])
