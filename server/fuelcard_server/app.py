"""Assembling and running one server process.

Created inside the running event loop (grpc.aio and the psycopg pool both
bind to the loop they are created on).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import psycopg
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
    risk_pb2,
    risk_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fuelcard_server import errors
from fuelcard_server.audit import AuditLog
from fuelcard_server.card_numbers import CardVault
from fuelcard_server.cards import PanIndex
from fuelcard_server.clock import Clock, SystemClock
from fuelcard_server.db import Database
from fuelcard_server.events import PRUNE_BATCHES_MAX, PRUNE_EVERY_S, Sequencer
from fuelcard_server.keys import pin_pepper
from fuelcard_server.locks import EXPIRY_SWEEP_LOCK, POINTS_EXPIRY_LOCK, TIER_EVALUATION_LOCK
from fuelcard_server.overload import Admission
from fuelcard_server.pins import Pins
from fuelcard_server.replication import (
    REPLICATION_SQL,
    STANDBY_SQL,
    LagMeter,
    ReplicaState,
    ReplicationView,
    StandbyStatus,
    parse_lsn,
)
from fuelcard_server.retention import Pruned, Retention
from fuelcard_server.services.account import AccountService
from fuelcard_server.services.control import ControlService
from fuelcard_server.services.events import EventService
from fuelcard_server.services.funding import FundingService
from fuelcard_server.services.handling import Deps
from fuelcard_server.services.points import PointsService
from fuelcard_server.services.reconciliation import ReconciliationService
from fuelcard_server.services.risk import RiskService
from fuelcard_server.services.security import SecurityService
from fuelcard_server.services.transaction import TransactionService
from fuelcard_server.settings import Settings, SettingsError
from fuelcard_server.stepup import FileOtpSender, OtpSender, StepUps
from fuelcard_server.stepup import Policy as StepUpPolicy
from fuelcard_server.telemetry import MetricsEndpoint, Telemetry
from fuelcard_server.terminals import TerminalKeys

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SERVICE_NAMES = (
    transaction_pb2.DESCRIPTOR.services_by_name["TransactionService"].full_name,
    funding_pb2.DESCRIPTOR.services_by_name["FundingService"].full_name,
    points_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name,
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    security_pb2.DESCRIPTOR.services_by_name["SecurityService"].full_name,
    risk_pb2.DESCRIPTOR.services_by_name["RiskService"].full_name,
    settlement_pb2.DESCRIPTOR.services_by_name["ReconciliationService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
)

# Services with an RPC that reads through the read pool (the replica when
# configured): reports, histories, reconciliation and risk listings, the
# event stream. tests/test_read_replica.py checks this list against the
# RPCs' priority classes.
READ_POOL_SERVICES = frozenset({
    account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name,
    points_pb2.DESCRIPTOR.services_by_name["PointsService"].full_name,
    control_pb2.DESCRIPTOR.services_by_name["ControlService"].full_name,
    risk_pb2.DESCRIPTOR.services_by_name["RiskService"].full_name,
    settlement_pb2.DESCRIPTOR.services_by_name["ReconciliationService"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
})
# What reports NOT_SERVING while the replica cannot be read (down, or further
# behind than replica_max_lag_s). A load balancer routes by these names, so a
# service flips only if EVERY one of its RPCs reads the replica (the event
# stream): pulling AccountService would stop card issuance and pulling
# RiskService the reviewers' decisions, which go to the primary. The reads of
# the mixed services are watched under a name of their own instead.
READS_HEALTH_NAME = "fuelcard.v1.Reads"
REPLICA_HEALTH_NAMES = frozenset({
    events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
    READS_HEALTH_NAME,
})
# A replica that went past replica_max_lag_s is read again below this share of it.
LAG_RECOVERY_SHARE = 0.5
REPLICA_REFUSALS = {
    ReplicaState.DOWN: ("REPLICA_UNAVAILABLE", "the read replica is unavailable: reports and "
                                               "histories are paused, payments are not"),
    ReplicaState.LAGGING: ("REPLICA_LAGGING", "the read replica is too far behind: reports and "
                                              "histories are paused, payments are not"),
    ReplicaState.PROMOTED: ("REPLICA_UNAVAILABLE", "the read replica was promoted to primary: "
                                                   "reports and histories are paused until a "
                                                   "standby is found, payments are not"),
}

# Only one process sweeps at a time; the others skip the round.
EXPIRE_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.expire_holds(p_now => %(now)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
EXPIRE_POINTS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.expire_points(p_now => %(now)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
# One batch of the tier job (NULL: another process is at it).
EVALUATE_TIERS_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.evaluate_tiers(p_now => %(now)s::timestamptz, p_after_id => %(after_id)s,"
    " p_limit => %(limit)s) END")
TIER_EVALUATION_INTERVAL = 3600.0
# At shutdown, how long cancelled calls get to unwind (their audit records).
UNWIND_WAIT_S = 10.0
# Accounts per batch of the tier job, each batch its own transaction holding
# that many account locks (plus parents) for a few milliseconds; and a bound
# on batches per run (a run past it goes on at the next interval).
TIER_BATCH = 500
TIER_BATCHES_MAX = 100_000
# The health probe: its own connection, so a busy pool is not a dead database.
# (And the primary's WAL position: the replica's lag is measured against it.)
PROBE_SQL = "SELECT count(*), pg_current_wal_lsn()::text FROM fc.holds WHERE state = 1"

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
    _health: health_aio.HealthServicer | None = None
    _jobs: list[asyncio.Task[None]] = field(default_factory=list)
    _sequencer: Sequencer | None = None
    # What the health service says: the primary's probe, and the replica's.
    _primary_up: bool = True
    _replica: ReplicaState = ReplicaState.OK
    # Failed replica probes in a row (replica_down_after_probes).
    _replica_failures: int = 0
    # One writer of the health service at a time: the primary's probe and the
    # replica's each apply both states, and two interleaved passes could
    # leave a name with the older pass's status.
    _health_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _lag: LagMeter = field(default_factory=LagMeter)
    _retention: Retention | None = None

    async def start(self) -> int:
        s = self.settings
        tel = self.telemetry = self.telemetry or Telemetry.from_settings(s, self.worker)
        self._db = Database(self.database_url, min_size=s.pool_min, max_size=s.pool_max,
                            timeout_s=s.pool_timeout_s, connect_timeout_s=s.connect_timeout_s,
                            name=f"fuelcard-w{self.worker}", tracer=tel.tracer)
        await self._db.open()
        # Reports and histories never borrow from the transaction pool: the
        # replica's pool, or a small one of their own on the primary.
        self._reads = Database(s.replica_url or self.database_url, min_size=1,
                               max_size=s.read_pool_max, timeout_s=s.pool_timeout_s,
                               connect_timeout_s=s.connect_timeout_s, name=f"fuelcard-reads-w{self.worker}",
                               tracer=tel.tracer, read_only=True)
        if s.replica_url:
            # A replica that is down must not keep payments from starting:
            # its probe (below) says whether reports may use it.
            await self._reads.pool.open(wait=False)
            tel.gauges.replica_up = 0
        else:
            await self._reads.open()
        tel.watch_pool("transactions", self._db.pool.get_stats)
        tel.watch_pool("reads", self._reads.pool.get_stats)
        key = s.card_index_key()
        provider = s.key_provider()
        terminal_keys = TerminalKeys(self._db, provider)
        deps = Deps(
            db=self._db, clock=self.clock, settings=s, pan_index=PanIndex(key),
            fingerprint_key=hmac.new(key, b"request-fingerprint", hashlib.sha256).digest(),
            terminal_keys=terminal_keys, signing_key=s.signing_key(),
            pins=Pins(self._db, terminal_keys, pin_pepper(provider)), audit=AuditLog(self._db),
            step_ups=StepUps(self._db, provider, self.otp_sender or FileOtpSender(
                s.otp_outbox_file or s.data_dir / "otp-outbox.jsonl"), StepUpPolicy(
                    ttl=dt.timedelta(seconds=s.otp_ttl_s), max_attempts=s.otp_max_attempts)),
            card_vault=CardVault(provider, PanIndex(key)),
            tls=not s.insecure, read_db=self._reads, telemetry=tel,
            admission=Admission(s, self._db.pool_waiting) if s.load_shedding else None)
        self._audit = deps.audit
        self._deps = deps
        self._retention = Retention(self._db, self.clock, s, tel, deps.step_ups.policy)
        server = grpc.aio.server(options=SERVER_OPTIONS,
                                 maximum_concurrent_rpcs=s.pool_max * 64)
        transaction_pb2_grpc.add_TransactionServiceServicer_to_server(TransactionService(deps), server)
        funding_pb2_grpc.add_FundingServiceServicer_to_server(FundingService(deps), server)
        points_pb2_grpc.add_PointsServiceServicer_to_server(PointsService(deps), server)
        account_pb2_grpc.add_AccountServiceServicer_to_server(AccountService(deps), server)
        control_pb2_grpc.add_ControlServiceServicer_to_server(ControlService(deps), server)
        security_pb2_grpc.add_SecurityServiceServicer_to_server(SecurityService(deps), server)
        risk_pb2_grpc.add_RiskServiceServicer_to_server(RiskService(deps), server)
        settlement_pb2_grpc.add_ReconciliationServiceServicer_to_server(
            ReconciliationService(deps), server)
        self._sequencer = Sequencer(self._db, self.clock, s.event_batch, s.event_retention_s,
                                    reads=self._reads)
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
        if s.replica_url:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await self.refresh_gauges()  # a first sample of the primary's WAL position
            replica_conn = await self._probe_replica(None, first=True)
            if replica_conn is not None:
                await replica_conn.close()
        await self._apply_health()
        if s.metrics_listen is not None:
            m_host, _, m_port = s.metrics_listen.rpartition(":")
            self._metrics = MetricsEndpoint(tel, m_host.strip("[]"),
                                            int(m_port) + self.worker if int(m_port) else 0)
            self.metrics_port = await self._metrics.start()
            log.info("metrics on http://%s:%d/metrics", m_host, self.metrics_port)
        self._jobs.append(asyncio.create_task(self._expiry_loop(), name="hold-expiry"))
        self._jobs.append(asyncio.create_task(self._health_loop(), name="health-probe"))
        if s.replica_url:
            # Its own loop: a replica that hangs never delays the primary's probe.
            self._jobs.append(asyncio.create_task(self._replica_loop(), name="replica-probe"))
        self._jobs.append(asyncio.create_task(self._event_loop(), name="event-sequencer"))
        log.info("serving on %s:%d", host, self.port)
        return self.port

    async def _apply_health(self) -> None:
        """Per service: SERVING while the primary is reachable and, for the
        services that read through the read pool, the replica is readable.
        The server as a whole ("") follows the primary: payments go on."""
        assert self._health is not None
        async with self._health_lock:
            for name in ("", *SERVICE_NAMES, READS_HEALTH_NAME):
                # read per name, under the lock: the latest state wins
                serving = self._primary_up and (self._replica is ReplicaState.OK
                                                or name not in REPLICA_HEALTH_NAMES)
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                                       else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def probe_once(self, conn: psycopg.AsyncConnection[tuple[Any, ...]] | None
                         ) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        """One health probe on the probe's own connection (opened if None or
        broken): raises psycopg.Error if the database cannot be reached."""
        s = self.settings
        if conn is None or conn.closed:
            conn = await psycopg.AsyncConnection.connect(
                self.database_url, autocommit=True, application_name="fuelcard-health",
                connect_timeout=max(1, round(s.connect_timeout_s)))
        try:
            async with asyncio.timeout(s.connect_timeout_s):
                row = await (await conn.execute(PROBE_SQL)).fetchone()
        except BaseException:  # failed or cancelled: the caller never gets it back
            await asyncio.shield(conn.close())
            raise
        assert self.telemetry is not None and row is not None
        self.telemetry.gauges.active_holds = row[0]
        if self.settings.replica_url:
            self._lag.note_primary(asyncio.get_running_loop().time(), parse_lsn(row[1]))
        await self._observe_replication(conn)
        return conn

    async def _observe_replication(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """The primary's standbys for the metrics, and a log line when the
        primary's node or its synchronous standby changes (a failover, a
        switchover, a standby lost: what the on-call SRE looks for first)."""
        assert self.telemetry is not None
        gauges = self.telemetry.gauges
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                rows = await (await conn.execute(REPLICATION_SQL)).fetchall()
        except BaseException:
            await asyncio.shield(conn.close())
            raise
        view = ReplicationView.from_rows(rows)
        before = gauges.replication
        if before is None or (before.primary, before.sync_standby) != (view.primary,
                                                                      view.sync_standby):
            standbys = ", ".join(f"{x.name} ({x.sync_state})" for x in view.standbys) or "none"
            log_at = log.warning if view.sync_standby is None and view.standbys else log.info
            log_at("primary %s; synchronous standby %s; standbys: %s", view.primary,
                   view.sync_standby or "NONE (commits are on one node only)", standbys)
        gauges.replication = view

    async def refresh_gauges(self) -> None:
        """One probe now (the gauges it feeds), on a connection of its own."""
        conn = await self.probe_once(None)
        await conn.close()

    async def _health_loop(self) -> None:
        """Probe the database; flip every service's health to NOT_SERVING
        while it cannot be reached, and make calls fail fast meanwhile."""
        assert self._db is not None and self.telemetry is not None
        conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        healthy = True
        try:
            while True:
                try:
                    conn = await self.probe_once(conn)
                    up = True
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    up = False
                    conn = None  # probe_once closed it
                    if healthy:
                        log.warning("database unreachable (%s): NOT_SERVING", type(exc).__name__)
                if up and not healthy:
                    # Replace the pool: its connections may have died with
                    # the database, lead to a host that is gone without a
                    # word (a moved address, a NAT that forgot the flow), or
                    # to the old primary of a failover, and its reconnects
                    # are in back-off (db.renew). pool.check() asked each
                    # one, one at a time without a time limit; drain() had
                    # nothing to replace when they were all gone. SERVING
                    # only once a statement went through the new pool.
                    up = await self._db.renew()
                    # The replica's pool is the replica loop's business.
                    if up and self._reads is not None and self._reads.url == self._db.url:
                        up = await self._reads.renew()
                if up != healthy:
                    healthy = up
                    self._db.available = up
                    if self._reads is not None and self._reads.url == self._db.url:
                        self._reads.available = up
                    self.telemetry.gauges.database_up = int(up)
                    self._primary_up = up
                    await self._apply_health()
                    if up:
                        log.info("database reachable again: SERVING")
                await asyncio.sleep(self.settings.health_interval_s)
        finally:
            if conn is not None:
                await conn.close()

    async def _probe_replica(self, conn: psycopg.AsyncConnection[tuple[Any, ...]] | None,
                             first: bool = False
                             ) -> psycopg.AsyncConnection[tuple[Any, ...]] | None:
        """One probe of the replica on its own connection (opened if None or
        broken): its lag, its state, and what follows from a change (the read
        pool refused or resumed, health). Returns the connection, None if the
        replica could not be reached. A readable replica is taken out after
        replica_down_after_probes failed probes in a row (`first`: the probe
        at start, after one)."""
        s = self.settings
        assert s.replica_url and self._reads is not None and self.telemetry is not None
        gauges = self.telemetry.gauges
        try:
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(
                    s.replica_url, autocommit=True, application_name="fuelcard-replica-health",
                    connect_timeout=max(1, round(s.connect_timeout_s)))
            try:
                async with asyncio.timeout(s.connect_timeout_s):
                    row = await (await conn.execute(STANDBY_SQL)).fetchone()
            except BaseException:  # failed or cancelled: the caller never gets it back
                await asyncio.shield(conn.close())
                raise
            assert row is not None
            status = StandbyStatus.from_row(row)
            lag = self._lag.lag_s(status, asyncio.get_running_loop().time())
            # Hysteresis: a replica that was lagging or down is read again
            # once it is well under the limit, so a lag hovering at it (or a
            # lagging replica that dropped a probe) does not flap health.
            limit = s.replica_max_lag_s * (1.0 if self._replica is ReplicaState.OK
                                           else LAG_RECOVERY_SHARE)
            state = ReplicaState.OK if lag <= limit else ReplicaState.LAGGING
            gauges.replica_up, gauges.replica_lag_s = 1, lag
            gauges.replica_standby = int(status.in_recovery)
            self._replica_failures = 0
            if not status.in_recovery:
                # Promoted under our connection: not a replica any more
                # (replication.py). Reconnect next time, to a standby.
                state = ReplicaState.PROMOTED
                gauges.replica_lag_s = None
                await conn.close()
                conn = None
        except (psycopg.Error, OSError, TimeoutError) as exc:
            conn = None
            # the gauges say what the last probe saw; the state waits for more
            gauges.replica_up, gauges.replica_lag_s = 0, None
            self._replica_failures = min(self._replica_failures + 1, s.replica_down_after_probes)
            tolerated = (self._replica is ReplicaState.OK and not first
                         and self._replica_failures < s.replica_down_after_probes)
            state = self._replica if tolerated else ReplicaState.DOWN
            if self._replica is not ReplicaState.DOWN:
                log.warning("read replica unreachable (%s), probe %d of %d in a row",
                            type(exc).__name__, self._replica_failures,
                            1 if first else s.replica_down_after_probes)
        if state is not self._replica:
            previous, self._replica = self._replica, state
            if state is ReplicaState.OK:
                if previous in (ReplicaState.DOWN, ReplicaState.PROMOTED):
                    # replace the connections that died with it, or that
                    # stayed on the node a failover promoted
                    await self._reads.renew()
                self._reads.resume()
                log.info("read replica usable again: report services SERVING")
            else:
                self._reads.refuse(*REPLICA_REFUSALS[state])
                log.warning("read replica %s (max lag %.1f s): report services NOT_SERVING, "
                            "payments go on", state.value, s.replica_max_lag_s)
            await self._apply_health()
        return conn

    async def _replica_loop(self) -> None:
        conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        try:
            while True:
                await asyncio.sleep(self.settings.health_interval_s)
                conn = await self._probe_replica(conn)
        finally:
            if conn is not None:
                await conn.close()

    async def expire_holds_once(self) -> int:
        """One sweep; returns holds released, or -1 if another process is
        sweeping."""
        assert self._db is not None
        row = await self._db.fetch_one(EXPIRE_SQL, {
            "lock": EXPIRY_SWEEP_LOCK, "now": self.clock.now(), "limit": self.settings.expiry_batch})
        assert row is not None
        released: int = row[0]
        if released > 0 and self.telemetry is not None:
            self.telemetry.hold_expiries.add(released)
        return released

    async def expire_points_once(self) -> int:
        """Lapse points lots past their expiry; -1 if another process is on it."""
        assert self._db is not None
        row = await self._db.fetch_one(EXPIRE_POINTS_SQL, {
            "lock": POINTS_EXPIRY_LOCK, "now": self.clock.now(), "limit": self.settings.expiry_batch})
        assert row is not None
        lapsed: int = row[0]
        return lapsed

    async def evaluate_tiers_once(self, batch: int = TIER_BATCH) -> int:
        """Re-evaluate tiers (they fall as old months leave the window), in
        batches of `batch` accounts; the number changed, or -1 if another
        process is on it."""
        assert self._db is not None
        now = self.clock.now()
        changed = 0
        after_id = 0
        for _ in range(TIER_BATCHES_MAX):
            row = await self._db.fetch_one(EVALUATE_TIERS_SQL, {
                "lock": TIER_EVALUATION_LOCK, "now": now, "after_id": after_id, "limit": batch})
            assert row is not None
            if row[0] is None:  # another process took the job between two batches
                return changed if after_id else -1
            changed += int(row[0]["changed"])
            if row[0]["last_id"] is None:
                break
            after_id = int(row[0]["last_id"])
        return changed

    async def prune_once(self) -> Pruned:
        """One bounded retention run (retention.py): idempotency keys and
        step-up challenges past their retention."""
        assert self._retention is not None
        return await self._retention.run_once()

    async def _expiry_loop(self) -> None:
        next_tiers = 0.0
        loop = asyncio.get_running_loop()
        # (not at start: servers restarted in a loop would prune back to back)
        next_prune = loop.time() + self.settings.retention_interval_s
        while True:
            # Holds first, and every other job on its own: one that keeps
            # failing (a timeout, a function missing) must never keep
            # customers' money reserved. A failed job is tried again at the
            # next sweep.
            released = await self._sweep("hold expiry", self.expire_holds_once)
            if released is not None and released > 0:  # -1: another process sweeps
                log.info("released %d expired holds", released)
            await self._sweep("points expiry", self.expire_points_once)
            if loop.time() >= next_tiers and \
                    await self._sweep("tier evaluation", self.evaluate_tiers_once) is not None:
                next_tiers = loop.time() + TIER_EVALUATION_INTERVAL
            if loop.time() >= next_prune:
                pruned = await self._sweep("retention", self.prune_once)
                if pruned is not None:  # capped (more due): again at the next sweep
                    next_prune = loop.time() + (0.0 if pruned.capped
                                                else self.settings.retention_interval_s)
            # A full batch means more holds are due: go again at once.
            if released is not None and released >= self.settings.expiry_batch:
                continue
            await asyncio.sleep(self.settings.expiry_interval_s)

    @staticmethod
    async def _sweep(what: str, job: Callable[[], Awaitable[_T]]) -> _T | None:
        """One maintenance job; None if it failed (the health probe flips
        health when the database is gone, so a warning is enough here). Any
        other exception is a bug, logged as one, but it must not end the
        loop: expiry is what gives customers' reserved money back."""
        try:
            return await job()
        except errors.ApiError as exc:
            log.warning("%s failed: %s", what, exc.reason)
            return None
        except Exception:
            log.exception("%s failed unexpectedly; tried again at the next sweep", what)
            return None

    async def sequence_events_once(self) -> int:
        """Position one batch of committed outbox rows; -1 if another
        process is on it."""
        assert self._sequencer is not None
        return await self._sequencer.run_once()

    async def _event_loop(self) -> None:
        """Keep the event stream moving (and pruned): the only caller of
        run_once in a serving process (streams wait for its rounds, or ask
        for one now: Sequencer.round); bounded batches, one process at a time."""
        assert self._sequencer is not None
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + PRUNE_EVERY_S
        full = False
        while True:
            if not full:
                await self._sequencer.pause(self.settings.event_interval_s)
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
            except Exception:
                log.exception("event sequencing failed unexpectedly; tried again shortly")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight RPCs finish, then close the pool."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.grace_s if grace_s is None else grace_s)
        if self._deps is not None and self._deps.in_flight:
            # grpc's stop cancels the calls still running when the grace ends
            # and returns before they have unwound (a cancelled database call
            # takes a round trip to cancel its statement): wait for them, so
            # that the audit records of their cancellation are appended
            # before the drain below, and the pools close under nobody.
            await asyncio.wait(set(self._deps.in_flight), timeout=UNWIND_WAIT_S)
        for job in self._jobs:
            job.cancel()
        # A job that had died of an exception must not stop the shutdown
        # before the audit appends are drained and the pools closed.
        outcomes = await asyncio.gather(*self._jobs, return_exceptions=True)
        for job, outcome in zip(self._jobs, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error("background job %s had ended with %s", job.get_name(),
                          type(outcome).__name__)
        self._jobs.clear()
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
