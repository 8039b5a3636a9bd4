"""Assembling and running one server process.

Created inside the running event loop (grpc.aio and the psycopg pool both
bind to the loop they are created on).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass, field

import grpc
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    funding_pb2,
    funding_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fuelcard_server import errors
from fuelcard_server.audit import AuditLog
from fuelcard_server.cards import PanIndex
from fuelcard_server.clock import Clock, SystemClock
from fuelcard_server.db import Database
from fuelcard_server.events import PRUNE_BATCHES_MAX, PRUNE_EVERY_S, Sequencer
from fuelcard_server.keys import pin_pepper
from fuelcard_server.locks import EXPIRY_SWEEP_LOCK, POINTS_EXPIRY_LOCK, TIER_EVALUATION_LOCK
from fuelcard_server.pins import Pins
from fuelcard_server.services.account import AccountService
from fuelcard_server.services.control import ControlService
from fuelcard_server.services.events import EventService
from fuelcard_server.services.funding import FundingService
from fuelcard_server.services.handling import Deps
from fuelcard_server.services.points import PointsService
from fuelcard_server.services.security import SecurityService
from fuelcard_server.services.transaction import TransactionService
from fuelcard_server.settings import Settings, SettingsError
from fuelcard_server.terminals import TerminalKeys

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    transaction_pb2.DESCRIPTOR.services_by_name["TransactionService"].full_name,
    funding_pb2.DESCRIPTOR.services_by_name["FundingService"].full_name,
    points_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name,
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    security_pb2.DESCRIPTOR.services_by_name["SecurityService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
)

# Only one process sweeps at a time; the others skip the round.
EXPIRE_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%s) THEN fc.expire_holds(%s::timestamptz, %s)"
    " ELSE -1 END")
EXPIRE_POINTS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%s) THEN fc.expire_points(%s::timestamptz, %s)"
    " ELSE -1 END")
EVALUATE_TIERS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%s) THEN fc.evaluate_tiers(%s::timestamptz)"
    " ELSE -1 END")
TIER_EVALUATION_INTERVAL = 3600.0

SERVER_OPTIONS = [
    # Several worker processes share the port; the kernel spreads connections.
    ("grpc.so_reuseport", 1),
    # Requests are small; refuse anything that is not a request.
    ("grpc.max_receive_message_length", 1 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # Find dead POS links, without letting clients ping us to death.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]


def server_credentials(s: Settings) -> grpc.ServerCredentials:
    """Mutual TLS: clients must present a certificate signed by our CA."""
    d = s.certs_dir
    try:
        key, cert, ca = ((d / name).read_bytes() for name in ("server.key", "server.pem", "ca.pem"))
    except FileNotFoundError as exc:
        raise SettingsError(f"TLS: {exc.filename} is missing (create development certificates "
                            "with `fuelcard certs`, or serve --insecure on loopback)") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


@dataclass
class FuelcardServer:
    settings: Settings
    database_url: str
    clock: Clock = field(default_factory=SystemClock)
    port: int = 0
    _server: grpc.aio.Server | None = None
    _db: Database | None = None
    _audit: AuditLog | None = None
    _health: health_aio.HealthServicer | None = None
    _jobs: list[asyncio.Task[None]] = field(default_factory=list)
    _sequencer: Sequencer | None = None

    async def start(self) -> int:
        s = self.settings
        self._db = Database(self.database_url, min_size=s.pool_min, max_size=s.pool_max,
                            timeout_s=s.pool_timeout_s)
        await self._db.open()
        key = s.card_index_key()
        provider = s.key_provider()
        terminal_keys = TerminalKeys(self._db, provider)
        deps = Deps(
            db=self._db, clock=self.clock, settings=s, pan_index=PanIndex(key),
            fingerprint_key=hmac.new(key, b"request-fingerprint", hashlib.sha256).digest(),
            terminal_keys=terminal_keys, signing_key=s.signing_key(),
            pins=Pins(self._db, terminal_keys, pin_pepper(provider)), audit=AuditLog(self._db),
            tls=not s.insecure)
        self._audit = deps.audit
        server = grpc.aio.server(options=SERVER_OPTIONS,
                                 maximum_concurrent_rpcs=s.pool_max * 64)
        transaction_pb2_grpc.add_TransactionServiceServicer_to_server(TransactionService(deps), server)
        funding_pb2_grpc.add_FundingServiceServicer_to_server(FundingService(deps), server)
        points_pb2_grpc.add_PointsServiceServicer_to_server(PointsService(deps), server)
        account_pb2_grpc.add_AccountServiceServicer_to_server(AccountService(deps), server)
        control_pb2_grpc.add_ControlServiceServicer_to_server(ControlService(deps), server)
        security_pb2_grpc.add_SecurityServiceServicer_to_server(SecurityService(deps), server)
        self._sequencer = Sequencer(self._db, self.clock, s.event_batch, s.event_retention_s)
        events_pb2_grpc.add_EventServiceServicer_to_server(EventService(deps, self._sequencer),
                                                           server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host, port = s.host_port
        if s.insecure:
            self.port = server.add_insecure_port(f"{host}:{port}")
        else:
            self.port = server.add_secure_port(f"{host}:{port}", server_credentials(s))
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {s.listen}")
        await server.start()
        self._server = server
        await self._set_health(serving=True)
        self._jobs.append(asyncio.create_task(self._expiry_loop(), name="hold-expiry"))
        self._jobs.append(asyncio.create_task(self._event_loop(), name="event-sequencer"))
        log.info("serving on %s:%d", host, self.port)
        return self.port

    async def _set_health(self, *, serving: bool) -> None:
        assert self._health is not None
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def expire_holds_once(self) -> int:
        """One sweep; returns holds released, or -1 if another process is
        sweeping."""
        assert self._db is not None
        row = await self._db.fetch_one(EXPIRE_SQL, (
            EXPIRY_SWEEP_LOCK, self.clock.now(), self.settings.expiry_batch))
        assert row is not None
        released: int = row[0]
        return released

    async def expire_points_once(self) -> int:
        """Lapse points lots past their expiry; -1 if another process is on it."""
        assert self._db is not None
        row = await self._db.fetch_one(EXPIRE_POINTS_SQL, (
            POINTS_EXPIRY_LOCK, self.clock.now(), self.settings.expiry_batch))
        assert row is not None
        lapsed: int = row[0]
        return lapsed

    async def evaluate_tiers_once(self) -> int:
        """Re-evaluate tiers (they fall as old months leave the window)."""
        assert self._db is not None
        row = await self._db.fetch_one(EVALUATE_TIERS_SQL, (TIER_EVALUATION_LOCK,
                                                            self.clock.now()))
        assert row is not None
        changed: int = row[0]
        return changed

    async def _expiry_loop(self) -> None:
        healthy = True
        next_tiers = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.expire_points_once()
                if loop.time() >= next_tiers:
                    await self.evaluate_tiers_once()
                    next_tiers = loop.time() + TIER_EVALUATION_INTERVAL
                released = await self.expire_holds_once()
                if released > 0:
                    log.info("released %d expired holds", released)
                if not healthy:
                    await self._set_health(serving=True)
                    healthy = True
                # A full batch means more are due: go again at once.
                if released >= self.settings.expiry_batch:
                    continue
            except errors.ApiError as exc:
                log.warning("hold expiry sweep failed: %s", exc.reason)
                if healthy and exc.reason in ("DATABASE_UNAVAILABLE", "DATABASE_BUSY"):
                    await self._set_health(serving=False)
                    healthy = False
            await asyncio.sleep(self.settings.expiry_interval_s)

    async def sequence_events_once(self) -> int:
        """Position one batch of committed outbox rows; -1 if another
        process is on it."""
        assert self._sequencer is not None
        return await self._sequencer.run_once()

    async def _event_loop(self) -> None:
        """Keep the event stream moving (and pruned) while no consumer is
        attached; bounded batches, one process at a time."""
        assert self._sequencer is not None
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + PRUNE_EVERY_S
        full = False
        while True:
            if not full:
                await asyncio.sleep(self.settings.event_interval_s)
            full = False
            try:
                # a full batch: more are waiting, go again at once
                full = await self._sequencer.run_once() >= self.settings.event_batch
                if loop.time() >= next_prune:
                    next_prune = loop.time() + PRUNE_EVERY_S
                    # bounded: up to PRUNE_BATCHES_MAX batches a minute
                    for _ in range(PRUNE_BATCHES_MAX):
                        if await self._sequencer.prune_once() < self.settings.event_batch:
                            break
            except errors.ApiError as exc:
                log.warning("event sequencing failed: %s", exc.reason)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight RPCs finish, then close the pool."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_s if grace_s is None else grace_s)
        for job in self._jobs:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        self._jobs.clear()
        if self._audit is not None:
            await self._audit.drain()  # records of calls cancelled at shutdown
        if self._db is not None:
            await self._db.close()

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
