"""Assembling and running one server process: its pools, the services on
one gRPC server, the health service (health.py) and the maintenance jobs
(jobs.py), and their shutdown in order.

Started inside the running event loop (grpc.aio and the psycopg pool both
bind to the loop they are created on).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
from dataclasses import dataclass, field

import grpc
from fuelcard.v1 import (
    account_pb2_grpc,
    adjustment_pb2_grpc,
    control_pb2_grpc,
    events_pb2_grpc,
    funding_pb2_grpc,
    invoice_pb2_grpc,
    points_pb2_grpc,
    refund_pb2_grpc,
    risk_pb2_grpc,
    security_pb2_grpc,
    settlement_pb2_grpc,
    transaction_pb2_grpc,
)
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fuelcard_server.audit import AuditLog
from fuelcard_server.card_numbers import CardVault
from fuelcard_server.cards import PanIndex
from fuelcard_server.clock import Clock, SystemClock
from fuelcard_server.db import Database
from fuelcard_server.events import Sequencer
from fuelcard_server.health import SERVICE_NAMES, Health
from fuelcard_server.holder_data import HolderSeal, seal_plaintext
from fuelcard_server.jobs import TIER_BATCH, Jobs
from fuelcard_server.key_custody import FileKeySetStore, open_key_set
from fuelcard_server.keys import pin_pepper
from fuelcard_server.overload import Admission
from fuelcard_server.pins import Pins
from fuelcard_server.retention import Pruned, Retention
from fuelcard_server.services.account import AccountService
from fuelcard_server.services.adjustment import AdjustmentService
from fuelcard_server.services.control import ControlService
from fuelcard_server.services.events import EventService
from fuelcard_server.services.funding import FundingService
from fuelcard_server.services.handling import Deps, guarded
from fuelcard_server.services.invoice import InvoiceService
from fuelcard_server.services.points import PointsService
from fuelcard_server.services.reconciliation import ReconciliationService
from fuelcard_server.services.refund import RefundService
from fuelcard_server.services.risk import RiskService
from fuelcard_server.services.security import SecurityService
from fuelcard_server.services.transaction import TransactionService
from fuelcard_server.settings import Settings, SettingsError
from fuelcard_server.stepup import FileOtpSender, OtpSender, StepUps
from fuelcard_server.stepup import Policy as StepUpPolicy
from fuelcard_server.telemetry import MetricsEndpoint, Telemetry
from fuelcard_server.terminals import TerminalKeys

log = logging.getLogger(__name__)

# At shutdown, how long cancelled calls get to unwind (their audit records).
UNWIND_WAIT_S = 10.0

SERVER_OPTIONS = [
    # Several worker processes share the port; the kernel spreads connections.
    ("grpc.so_reuseport", 1),
    # Requests are small (the largest, a batch top-up of 1000 lines, is
    # ~100 KiB); refuse anything that is not a request. Answers: a page of
    # history or a fleet report stays well under 8 MiB.
    ("grpc.max_receive_message_length", 1 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # Find dead POS links (a pump's 4G router dropping NAT state) within
    # ~40 s, without letting clients ping us to death: at most one ping per
    # 10 s from a client, two strikes and the connection is closed.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    # Rotate connections now and then (spreads load over SO_REUSEPORT
    # workers again after a restart); calls in flight get 30 s to finish.
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
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
    # Which of `serve --workers N` this is (its metrics port is PORT+worker).
    worker: int = 0
    telemetry: Telemetry | None = None
    metrics_port: int = 0
    # Delivers step-up codes; None: FileOtpSender (development).
    otp_sender: OtpSender | None = None
    _server: grpc.aio.Server | None = None
    _db: Database | None = None
    _reads: Database | None = None
    _metrics: MetricsEndpoint | None = None
    _audit: AuditLog | None = None
    _deps: Deps | None = None
    _health: Health | None = None
    _jobs: Jobs | None = None
    # The loops of the health probes and the jobs, cancelled at stop().
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _sequencer: Sequencer | None = None
    _retention: Retention | None = None

    async def start(self) -> int:
        s = self.settings
        # Before anything listens: a host whose keys are not the database's
        # refuses to start (key_custody.py) rather than answer CARD_NOT_FOUND.
        key_set = await asyncio.to_thread(FileKeySetStore(s).load)
        served = await asyncio.to_thread(open_key_set, self.database_url, key_set)
        # Personal data an upgrade left in plaintext is sealed before anything is
        # served (holder_data.py): the key for it is only here, not in the database.
        await asyncio.to_thread(seal_plaintext, self.database_url, HolderSeal(served.data))
        tel = self.telemetry = self.telemetry or Telemetry.from_settings(s, self.worker)
        self._db = Database(self.database_url, min_size=s.pool_min, max_size=s.pool_max,
                            timeout_s=s.pool_timeout_s, connect_timeout_s=s.connect_timeout_s,
                            name=f"fuelcard-w{self.worker}", tracer=tel.span_tracer)
        await self._db.open()
        # Reports and histories never borrow from the transaction pool: the
        # replica's pool, or a small one of their own on the primary.
        self._reads = Database(s.replica_url or self.database_url, min_size=1,
                               max_size=s.read_pool_max, timeout_s=s.pool_timeout_s,
                               connect_timeout_s=s.connect_timeout_s, name=f"fuelcard-reads-w{self.worker}",
                               tracer=tel.span_tracer, read_only=True)
        if s.replica_url:
            # A replica that is down must not keep payments from starting:
            # its probe (below) says whether reports may use it.
            await self._reads.pool.open(wait=False)
            tel.gauges.replica_up = 0
        else:
            await self._reads.open()
        # through the Database, not its pool of the moment (renew() replaces it)
        tel.watch_pool("transactions", self._db.pool_stats)
        tel.watch_pool("reads", self._reads.pool_stats)
        key = served.card_index
        terminal_keys = TerminalKeys(self._db, served.root)
        deps = Deps(
            db=self._db, clock=self.clock, settings=s, pan_index=PanIndex(key),
            fingerprint_key=hmac.new(key, b"request-fingerprint", hashlib.sha256).digest(),
            terminal_keys=terminal_keys, signing_key=served.signing,
            pins=Pins(self._db, terminal_keys, pin_pepper(served.data)), audit=AuditLog(self._db),
            step_ups=StepUps(self._db, served.data, self.otp_sender or FileOtpSender(
                s.otp_outbox_file or s.data_dir / "otp-outbox.jsonl"), StepUpPolicy(
                    ttl=dt.timedelta(seconds=s.otp_ttl_s), max_attempts=s.otp_max_attempts)),
            card_vault=CardVault(served.data, PanIndex(key)),
            holder_seal=HolderSeal(served.data),
            tls=not s.insecure, read_db=self._reads, telemetry=tel,
            admission=Admission(s, self._db.pool_waiting) if s.load_shedding else None)
        self._audit = deps.audit
        self._deps = deps
        self._retention = Retention(self._db, self.clock, s, tel, deps.step_ups.policy)
        server = grpc.aio.server(options=SERVER_OPTIONS,
                                 maximum_concurrent_rpcs=s.pool_max * 64)
        # Undecodable requests answer INVALID_ARGUMENT with an ErrorInfo (handling.guarded).
        guard = guarded(server)
        transaction_pb2_grpc.add_TransactionServiceServicer_to_server(TransactionService(deps), guard)
        funding_pb2_grpc.add_FundingServiceServicer_to_server(FundingService(deps), guard)
        points_pb2_grpc.add_PointsServiceServicer_to_server(PointsService(deps), guard)
        account_pb2_grpc.add_AccountServiceServicer_to_server(AccountService(deps), guard)
        control_pb2_grpc.add_ControlServiceServicer_to_server(ControlService(deps), guard)
        security_pb2_grpc.add_SecurityServiceServicer_to_server(SecurityService(deps), guard)
        risk_pb2_grpc.add_RiskServiceServicer_to_server(RiskService(deps), guard)
        settlement_pb2_grpc.add_ReconciliationServiceServicer_to_server(
            ReconciliationService(deps), guard)
        adjustment_pb2_grpc.add_AdjustmentServiceServicer_to_server(AdjustmentService(deps), guard)
        refund_pb2_grpc.add_RefundServiceServicer_to_server(RefundService(deps), guard)
        invoice_pb2_grpc.add_InvoiceServiceServicer_to_server(InvoiceService(deps), guard)
        self._sequencer = Sequencer(self._db, self.clock, s.event_batch, s.event_retention_s,
                                    reads=self._reads)
        events_pb2_grpc.add_EventServiceServicer_to_server(EventService(deps, self._sequencer),
                                                           guard)
        self._jobs = Jobs(self._db, self.clock, s, tel, self._retention, self._sequencer)
        self._health = Health(s, self.database_url, tel, self._db, self._reads,
                              health_aio.HealthServicer())
        health_pb2_grpc.add_HealthServicer_to_server(self._health.servicer, server)
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
        await self._health.start()
        if s.metrics_listen is not None:
            m_host, _, m_port = s.metrics_listen.rpartition(":")
            self._metrics = MetricsEndpoint(tel, m_host.strip("[]"),
                                            int(m_port) + self.worker if int(m_port) else 0,
                                            readiness=self._health.readiness)
            self.metrics_port = await self._metrics.start()
            log.info("metrics on http://%s:%d/metrics", m_host, self.metrics_port)
        self._tasks.append(asyncio.create_task(self._jobs.expiry_loop(), name="hold-expiry"))
        self._tasks.append(asyncio.create_task(self._health.primary_loop(), name="health-probe"))
        if s.replica_url:
            # Its own loop: a replica that hangs never delays the primary's probe.
            self._tasks.append(asyncio.create_task(self._health.replica_loop(),
                                                   name="replica-probe"))
        self._tasks.append(asyncio.create_task(self._jobs.event_loop(), name="event-sequencer"))
        self._tasks.append(asyncio.create_task(self._jobs.journal_chain_loop(), name="journal-chain"))
        log.info("serving on %s:%d", host, self.port)
        return self.port

    # One step of a job or of the health probe, now rather than at its
    # loop's next round: how tests drive them (health.py and jobs.py hold
    # the steps; these only hand over).

    async def refresh_gauges(self) -> None:
        """One probe of the primary now (the gauges it feeds)."""
        assert self._health is not None
        await self._health.refresh_gauges()

    async def expire_holds_once(self) -> int:
        assert self._jobs is not None
        return await self._jobs.expire_holds_once()

    async def expire_points_once(self) -> int:
        assert self._jobs is not None
        return await self._jobs.expire_points_once()

    async def evaluate_tiers_once(self, batch: int = TIER_BATCH) -> int:
        assert self._jobs is not None
        return await self._jobs.evaluate_tiers_once(batch)

    async def prune_once(self) -> Pruned:
        assert self._jobs is not None
        return await self._jobs.prune_once()

    async def sequence_events_once(self) -> int:
        assert self._jobs is not None
        return await self._jobs.sequence_events_once()

    async def chain_journal_once(self) -> int:
        assert self._jobs is not None
        return await self._jobs.chain_journal_once()

    async def first_chain_round(self) -> None:
        """Wait for the journal chain loop's first round (the one at start)."""
        assert self._jobs is not None
        await self._jobs.first_chain_round.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight RPCs finish, then close the pool."""
        if self._health is not None:
            self._health.stopping = True
            await self._health.servicer.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_s if grace_s is None else grace_s)
        if self._deps is not None and self._deps.in_flight:
            # grpc's stop cancels the calls still running when the grace ends
            # and returns before they have unwound (a cancelled database call
            # takes a round trip to cancel its statement): wait for them, so
            # that the audit records of their cancellation are appended
            # before the drain below, and the pools close under nobody.
            await asyncio.wait(set(self._deps.in_flight), timeout=UNWIND_WAIT_S)
        for job in self._tasks:
            job.cancel()
        # A job that had died of an exception must not stop the shutdown
        # before the audit appends are drained and the pools closed.
        outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        for job, outcome in zip(self._tasks, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error("background job %s had ended with %s", job.get_name(),
                          type(outcome).__name__)
        self._tasks.clear()
        if self._audit is not None:
            await self._audit.drain()  # records of calls cancelled at shutdown
        if self._metrics is not None:
            await self._metrics.stop()
        for db in (self._reads, self._db):
            if db is not None:
                await db.close()
        if self.telemetry is not None:
            # exports what is batched, then stops the exporters' threads
            await asyncio.to_thread(self.telemetry.shutdown)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
