"""What the gRPC health service says, and the probes that decide it.

The primary is probed on a connection of its own every health_interval_s:
while it cannot be reached every service reports NOT_SERVING and calls
fail at once with UNAVAILABLE (Database.available) instead of each waiting
out the pool timeout. With a read replica, a second loop probes it: its lag
behind the primary (replication.py) decides whether reports may read it,
and the services that read only through it report NOT_SERVING while they
cannot; payments go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from fuelcard.v1 import (
    account_pb2,
    adjustment_pb2,
    control_pb2,
    events_pb2,
    funding_pb2,
    invoice_pb2,
    points_pb2,
    refund_pb2,
    risk_pb2,
    security_pb2,
    settlement_pb2,
    transaction_pb2,
)
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from fuelcard_server.db import Database, probe_connection
from fuelcard_server.replication import (
    REPLICATION_SQL,
    STANDBY_SQL,
    LagMeter,
    ReplicaState,
    ReplicationView,
    StandbyStatus,
    parse_lsn,
)
from fuelcard_server.settings import Settings
from fuelcard_server.telemetry import Telemetry

# The server's log lines keep the logger they had when this lived in app.py:
# operators filter on it (the JSON lines' "logger").
log = logging.getLogger("fuelcard_server.app")

# Every service a server serves: each has a health status of its own (and
# reflection lists them).
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
    adjustment_pb2.DESCRIPTOR.services_by_name["AdjustmentService"].full_name,
    refund_pb2.DESCRIPTOR.services_by_name["RefundService"].full_name,
    invoice_pb2.DESCRIPTOR.services_by_name["InvoiceService"].full_name,
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
    adjustment_pb2.DESCRIPTOR.services_by_name["AdjustmentService"].full_name,
    refund_pb2.DESCRIPTOR.services_by_name["RefundService"].full_name,
    invoice_pb2.DESCRIPTOR.services_by_name["InvoiceService"].full_name,
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

# The health probe: its own connection, so a busy pool is not a dead database.
# (And the primary's WAL position: the replica's lag is measured against it.)
PROBE_SQL = ("SELECT count(*), pg_current_wal_lsn()::text FROM fc.holds"
             " WHERE state = fc.hold_state_authorized()")


class Health:
    """The health service's state for one serving process: the primary's
    verdict, the replica's, and the loops that probe them."""

    def __init__(self, settings: Settings, database_url: str, telemetry: Telemetry,
                 db: Database, reads: Database, servicer: health_aio.HealthServicer) -> None:
        self.settings = settings
        self.database_url = database_url
        self.telemetry = telemetry
        self._db = db
        self._reads = reads
        self.servicer = servicer
        # What the health service says: the primary's probe, and the replica's.
        self._primary_up = True
        self._replica = ReplicaState.OK
        # Failed replica probes in a row (replica_down_after_probes).
        self._replica_failures = 0
        # One writer of the health service at a time: the primary's probe and the
        # replica's each apply both states, and two interleaved passes could
        # leave a name with the older pass's status.
        self._health_lock = asyncio.Lock()
        self._lag = LagMeter()
        # Set when the server begins to stop: /readyz says so, and a load
        # balancer stops sending before the listener closes.
        self.stopping = False

    async def start(self) -> None:
        """The first verdicts, before any loop runs: with a replica, one
        probe of each (the replica's lag needs the primary's WAL position)."""
        if self.settings.replica_url:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await self.refresh_gauges()  # a first sample of the primary's WAL position
            replica_conn = await self.probe_replica(None, first=True)
            if replica_conn is not None:
                await replica_conn.close()
        await self.apply()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What plain-HTTP /readyz answers (telemetry.MetricsEndpoint): would
        a call succeed now. Ready while the primary is reachable (calls are
        not refused at once: Database.available) and the server is not
        stopping. The replica's state is reported but not required: without
        it reports pause, payments go on."""
        database = "up" if self._primary_up and self._db.available else "down"
        replica = self._replica.value if self.settings.replica_url else "none"
        ready = database == "up" and not self.stopping
        return ready, {"ready": ready, "database": database, "replica": replica,
                       "stopping": self.stopping}

    async def apply(self) -> None:
        """Per service: SERVING while the primary is reachable and, for the
        services that read through the read pool, the replica is readable.
        The server as a whole ("") follows the primary: payments go on."""
        async with self._health_lock:
            for name in ("", *SERVICE_NAMES, READS_HEALTH_NAME):
                # read per name, under the lock: the latest state wins
                serving = self._primary_up and (self._replica is ReplicaState.OK
                                                or name not in REPLICA_HEALTH_NAMES)
                await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def probe_once(self, conn: psycopg.AsyncConnection[tuple[Any, ...]] | None
                         ) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        """One health probe on the probe's own connection (opened if None or
        broken): raises psycopg.Error if the database cannot be reached."""
        s = self.settings
        if conn is None or conn.closed:
            conn = await probe_connection(self.database_url, "fuelcard-health",
                                          s.connect_timeout_s)
        try:
            async with asyncio.timeout(s.connect_timeout_s):
                row = await (await conn.execute(PROBE_SQL)).fetchone()
        except BaseException:  # failed or cancelled: the caller never gets it back
            await asyncio.shield(conn.close())
            raise
        assert row is not None
        self.telemetry.gauges.active_holds = row[0]
        if self.settings.replica_url:
            self._lag.note_primary(asyncio.get_running_loop().time(), parse_lsn(row[1]))
        await self._observe_replication(conn)
        return conn

    async def _observe_replication(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """The primary's standbys for the metrics, and a log line when the
        primary's node or its synchronous standby changes (a failover, a
        switchover, a standby lost: what the on-call SRE looks for first)."""
        gauges = self.telemetry.gauges
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                rows = await (await conn.execute(REPLICATION_SQL)).fetchall()
        except BaseException:  # failed or cancelled: the caller never gets it back
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

    async def primary_loop(self) -> None:
        """Probe the database; flip every service's health to NOT_SERVING
        while it cannot be reached, and make calls fail fast meanwhile."""
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
                    if up and self._reads.url == self._db.url:
                        up = await self._reads.renew()
                if up != healthy:
                    healthy = up
                    self._db.available = up
                    if self._reads.url == self._db.url:
                        self._reads.available = up
                    self.telemetry.gauges.database_up = int(up)
                    self._primary_up = up
                    await self.apply()
                    if up:
                        log.info("database reachable again: SERVING")
                await asyncio.sleep(self.settings.health_interval_s)
        finally:
            if conn is not None:
                await conn.close()

    async def probe_replica(self, conn: psycopg.AsyncConnection[tuple[Any, ...]] | None,
                            first: bool = False
                            ) -> psycopg.AsyncConnection[tuple[Any, ...]] | None:
        """One probe of the replica on its own connection (opened if None or
        broken): its lag, its state, and what follows from a change (the read
        pool refused or resumed, health). Returns the connection, None if the
        replica could not be reached. A readable replica is taken out after
        replica_down_after_probes failed probes in a row (`first`: the probe
        at start, after one)."""
        s = self.settings
        assert s.replica_url
        gauges = self.telemetry.gauges
        try:
            if conn is None or conn.closed:
                conn = await probe_connection(s.replica_url, "fuelcard-replica-health",
                                              s.connect_timeout_s)
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
            await self.apply()
        return conn

    async def replica_loop(self) -> None:
        conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        try:
            while True:
                await asyncio.sleep(self.settings.health_interval_s)
                conn = await self.probe_replica(conn)
        finally:
            if conn is not None:
                await conn.close()
