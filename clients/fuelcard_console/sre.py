"""What the SRE page shows, sampled every `sre_sample_interval_s` (5 s) by
one background task of the edge, so that a page view costs no probe and
twenty SREs looking at once cost the core nothing more:

- health: the core's gRPC health service (grpc.health.v1), for each of its
  services and the replica-backed reads (fuelcard.v1.Reads), over the edge's
  admin channel;
- replica lag: the primary's pg_stat_replication (each standby's replay
  distance in bytes and its replay lag, the view the core's health probe
  reads: replication.REPLICATION_SQL), and, when the console's reports
  database is another server, that standby's own view (the age of its last
  replayed commit: replication.STANDBY_SQL);
- throughput: committed and rolled-back transactions per second of the
  core's database (pg_stat_database, the difference between two samples:
  every payment is one or more transactions, so it counts all the core's
  work); and, when the core's Prometheus scrape is given (`--core-metrics-url`),
  RPCs per second from its latency histogram's count;
- latency: p50 and p99 of the core's RPCs in the last interval, from the
  scrape's histogram buckets (fuelcard_rpc_latency_ms; the bucket bound the
  quantile falls in, an upper estimate); without a scrape, no latency.

The samples of the last SAMPLES_KEPT intervals are kept in memory for the
charts; nothing is written anywhere.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from fuelcard_server.health import READS_HEALTH_NAME, SERVICE_NAMES
from fuelcard_server.replication import REPLICATION_SQL, STANDBY_SQL, ReplicationView
from grpc_health.v1 import health_pb2

if TYPE_CHECKING:
    from fuelcard_console.context import Console

log = logging.getLogger(__name__)

SAMPLES_KEPT = 120  # 10 minutes at 5 s
HEALTH_TIMEOUT_S = 2.0
METRIC = "fuelcard_rpc_latency_ms"
THROUGHPUT_SQL = """
    SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"""
_BUCKET = re.compile(rf'^{METRIC}_bucket\{{(?P<labels>.*)\}} (?P<value>\S+)$')
_LE = re.compile(r'(?:^|,)le="(?P<le>[^"]*)"')

STATUS_ZH = {"SERVING": "正常", "NOT_SERVING": "停止服务", "UNKNOWN": "未知", "SERVICE_UNKNOWN": "未知服务",
             "UNREACHABLE": "无法连接"}
SERVICE_ZH = {
    "": "整体", "fuelcard.v1.TransactionService": "交易 (POS)", "fuelcard.v1.FundingService": "充值",
    "fuelcard.v1.PointsService": "积分", "fuelcard.v1.AccountService": "账户",
    "fuelcard.v1.ControlService": "额度与范围", "fuelcard.v1.SecurityService": "安全",
    "fuelcard.v1.RiskService": "风控", "fuelcard.v1.ReconciliationService": "对账",
    "fuelcard.v1.EventService": "事件流", "fuelcard.v1.AdjustmentService": "调账",
    "fuelcard.v1.RefundService": "退款", "fuelcard.v1.InvoiceService": "发票",
    READS_HEALTH_NAME: "报表读取 (副本)",
}


@dataclass(frozen=True)
class Standby:
    name: str
    sync_state: str
    lag_bytes: float
    lag_s: float


@dataclass(frozen=True)
class Sample:
    at: dt.datetime
    health: tuple[tuple[str, str], ...]  # (service, status name)
    standbys: tuple[Standby, ...]
    reports_lag_s: float | None  # the reports database's replay age; None: it is the primary
    db_tps: float | None  # transactions/s of the core's database since the previous sample
    rpc_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    errors: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return bool(self.health) and all(status == "SERVING" for _, status in self.health)


def parse_buckets(text: str) -> dict[float, float]:
    """The latency histogram's cumulative bucket counts, summed over every
    method and status: {upper bound in ms: count}."""
    buckets: dict[float, float] = collections.defaultdict(float)
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m is None:
            continue
        le = _LE.search(m["labels"])
        if le is None:
            continue
        bound = math.inf if le["le"] == "+Inf" else float(le["le"])
        buckets[bound] += float(m["value"])
    return dict(buckets)


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket the q-quantile of the calls between two
    scrapes fell in (None: no calls; inf: past the last bound)."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    total = deltas[-1] if deltas else 0.0
    if total <= 0:
        return None
    for bound, cumulative in zip(bounds, deltas, strict=True):
        if cumulative >= q * total:
            return bound
    return math.inf


@dataclass
class SreSampler:
    console: Console
    samples: collections.deque[Sample] = field(
        default_factory=lambda: collections.deque(maxlen=SAMPLES_KEPT))
    _last_xacts: tuple[float, float] | None = None  # (monotonic time, transactions)
    _last_buckets: tuple[float, dict[float, float]] | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.sample_once()
            except Exception as exc:  # never let the page's sampler die
                log.warning("SRE sample failed: %s", type(exc).__name__)
            await asyncio.sleep(self.console.settings.sre_sample_interval_s)

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    async def sample_once(self) -> Sample:
        errors: list[str] = []
        health = await self._health()
        standbys: tuple[Standby, ...] = ()
        try:
            view = ReplicationView.from_rows(await self.console.db.fetch_all(REPLICATION_SQL, ()))
            standbys = tuple(Standby(s.name, s.sync_state, s.lag_bytes, s.lag_s) for s in view.standbys)
        except Exception as exc:
            errors.append(f"pg_stat_replication: {type(exc).__name__}")
        reports_lag = None
        if self.console.settings.reports_database_url not in (None, self.console.settings.database_url):
            try:
                row = await self.console.reports.fetch_one(STANDBY_SQL, ())
                if row is not None and row[0]:
                    reports_lag = float(row[3]) if row[3] is not None else 0.0
            except Exception as exc:
                errors.append(f"reports: {type(exc).__name__}")
        db_tps = None
        try:
            row = await self.console.db.fetch_one(THROUGHPUT_SQL, ())
            if row is not None and row[0] is not None:
                now, xacts = time.monotonic(), float(row[0])
                if self._last_xacts is not None and now > self._last_xacts[0]:
                    db_tps = max(0.0, (xacts - self._last_xacts[1]) / (now - self._last_xacts[0]))
                self._last_xacts = (now, xacts)
        except Exception as exc:
            errors.append(f"pg_stat_database: {type(exc).__name__}")
        rpc_per_s = p50 = p99 = None
        if self.console.settings.metrics_url:
            try:
                rpc_per_s, p50, p99 = await self._latency()
            except Exception as exc:
                errors.append(f"metrics: {type(exc).__name__}")
        sample = Sample(dt.datetime.now(dt.UTC), health, standbys, reports_lag, db_tps, rpc_per_s, p50,
                        p99, tuple(errors))
        self.samples.append(sample)
        return sample

    async def _health(self) -> tuple[tuple[str, str], ...]:
        stub = self.console.core.health

        async def one(name: str) -> tuple[str, str]:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=HEALTH_TIMEOUT_S)
                return name, health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except Exception:
                return name, "UNREACHABLE"

        names = ("", *SERVICE_NAMES, READS_HEALTH_NAME)
        return tuple(await asyncio.gather(*(one(n) for n in names)))

    async def _latency(self) -> tuple[float | None, float | None, float | None]:
        url = self.console.settings.metrics_url
        assert url is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http, \
                http.get(url) as response:
            response.raise_for_status()
            text = await response.text()
        now, buckets = time.monotonic(), parse_buckets(text)
        previous, self._last_buckets = self._last_buckets, (now, buckets)
        if previous is None or not buckets or now <= previous[0]:
            return None, None, None
        calls = buckets.get(math.inf, 0.0) - previous[1].get(math.inf, 0.0)
        rate = max(0.0, calls / (now - previous[0]))
        return rate, quantile(previous[1], buckets, 0.5), quantile(previous[1], buckets, 0.99)
