"""OpenTelemetry for one server process: a span per RPC (child spans for
database work), the metrics operators watch, and their export.

Each FuelcardServer has its own TracerProvider and MeterProvider (tests run
several servers in one process); `install_global()` makes them the process's
global providers in a real worker, so instruments other modules create with
`opentelemetry.metrics.get_meter` are exported and scraped with ours.

Export: OTLP/gRPC when `otlp_endpoint` is set (batched, off the hot path), and
a Prometheus text-format scrape (`metrics_listen`) read from an in-memory
reader on demand. Sampling is parent-based: a caller's sampled W3C
traceparent is always followed; root traces are kept at trace_sample_ratio.

An RPC whose span nothing would record gets no span at all (`rpc_span`):
building a non-recording span, its ids and its context cost about 50 us per
RPC, two thirds of what the pump path spent in OpenTelemetry. So the root
sampling decision is made here, before any span exists, and the SDK's sampler
only follows parents; without an exporter no span is made, but a caller's
traceparent still becomes the current context, so log lines carry its trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fuelcard_server.replication import ReplicationView
from fuelcard_server.settings import Settings

log = logging.getLogger(__name__)
# The sampled access lines (logs.py): a logger of their own, so an operator
# can route or silence them apart from the rest.
access_log = logging.getLogger("fuelcard_server.access")

SCOPE = "fuelcard_server"
RPC_LATENCY = "fuelcard.rpc.latency_ms"
# Milliseconds: payments live in the low single digits.
LATENCY_BUCKETS_MS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500,
                      1000, 2500, 5000, 10000)

_PROPAGATOR = TraceContextTextMapPropagator()


def _metadata_getter(carrier: Mapping[str, str], key: str) -> list[str] | None:
    value = carrier.get(key)
    return None if value is None else [value]


class _Getter:
    """TextMapPropagator getter over a dict of invocation metadata."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        return _metadata_getter(carrier, key)

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _Getter()


def parent_context(metadata: Iterable[Any] | None) -> otel_context.Context | None:
    """The caller's trace context from its `traceparent` (and `tracestate`)
    metadata; None when it sent none (the common, cheap case)."""
    if not metadata:
        return None
    carrier: dict[str, str] = {}
    for key, value in metadata:
        if key in ("traceparent", "tracestate") and isinstance(value, str):
            carrier[key] = value
    if not carrier:
        return None
    return _PROPAGATOR.extract(carrier, getter=_GETTER)  # type: ignore[arg-type]


@dataclass
class Gauges:
    """Values the server refreshes (health probe) and the gauges report."""

    active_holds: int = 0
    database_up: int = 1
    # The read replica (None: no replica configured, nothing reported):
    # 1 while its probe reaches it, and how far behind the primary it is
    # (None while it cannot be reached).
    replica_up: int | None = None
    replica_lag_s: float | None = None
    # 1 while the node the replica URL reached is in recovery (a standby),
    # 0 once it was promoted (reads refused until a standby is found).
    replica_standby: int | None = None
    # The primary's view of itself and its standbys (None until probed).
    replication: ReplicationView | None = None


@dataclass
class Telemetry:
    tracer: trace.Tracer
    meter: metrics.Meter
    tracing: bool
    # Whether a span made here is recorded and sent somewhere (an exporter is
    # configured); False: RPCs get no span (rpc_span).
    exporting: bool = False
    # Share of root traces (no traceparent from the caller) recorded.
    root_ratio: float = 1.0
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    scrape_reader: InMemoryMetricReader | None = None
    gauges: Gauges = field(default_factory=Gauges)
    # share of RPCs given an access line (Settings.access_log_sample)
    access_sample: float = 0.0
    # attributes of the pool gauges, filled in by watch_pools
    _pools: list[tuple[str, Callable[[], Mapping[str, int]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        m = self.meter
        self.rpc_latency = m.create_histogram(
            RPC_LATENCY, unit="ms", description="RPC latency in the server, by method and status")
        self.authorizations = m.create_counter(
            "fuelcard.authorizations", description="Authorize answers by decision and reason")
        self.hold_expiries = m.create_counter(
            "fuelcard.holds.expired", description="holds released by the expiry sweep")
        self.hold_expiry_failures = m.create_counter(
            "fuelcard.holds.expiry_failures",
            description="accounts whose expired holds the sweep could not release (set aside "
                        "until their retry time)")
        self.retention_deleted = m.create_counter(
            "fuelcard.retention.deleted",
            description="rows deleted by the retention job, by table (idempotency_keys, "
                        "step_up_challenges)")
        self.shed = m.create_counter(
            "fuelcard.rpc.shed", description="RPCs refused early by priority class (overload)")
        m.create_observable_gauge("fuelcard.holds.active", callbacks=[self._active_holds],
                                  description="holds AUTHORIZED and not yet closed")
        m.create_observable_gauge("fuelcard.db.up", callbacks=[self._database_up],
                                  description="1 while the health probe reaches the database")
        m.create_observable_gauge("fuelcard.replica.up", callbacks=[self._replica_up],
                                  description="1 while the health probe reaches the read replica")
        m.create_observable_gauge(
            "fuelcard.replica.lag_seconds", unit="s", callbacks=[self._replica_lag],
            description="how far the read replica's replay is behind the primary, in seconds"
                        " (0 when caught up, also while the primary is idle)")
        m.create_observable_gauge(
            "fuelcard.replica.standby", callbacks=[self._replica_standby],
            description="1 while the read replica is a standby, 0 if a failover promoted it")
        m.create_observable_gauge(
            "fuelcard.db.primary", callbacks=[self._primary_node],
            description="1, labelled with the address of the node the primary pool reaches")
        m.create_observable_gauge(
            "fuelcard.replication.lag_bytes", unit="By", callbacks=[self._standby_lag_bytes],
            description="each standby's replay distance behind the primary, by standby name and"
                        " sync_state (sync: the synchronous standby)")
        m.create_observable_gauge(
            "fuelcard.replication.lag_seconds", unit="s", callbacks=[self._standby_lag_s],
            description="each standby's replay lag as the primary measures it, by standby and"
                        " sync_state")
        m.create_observable_gauge(
            "fuelcard.replication.sync_standbys", callbacks=[self._sync_standbys],
            description="standbys in sync (0: a commit is on one node only), labelled with the"
                        " synchronous standby's name")
        m.create_observable_gauge("fuelcard.db.pool.in_use", callbacks=[self._pool_in_use],
                                  description="database connections lent out, by pool")
        m.create_observable_gauge("fuelcard.db.pool.waiting", callbacks=[self._pool_waiting],
                                  description="calls waiting for a database connection, by pool")

    # -- construction --------------------------------------------------------

    @classmethod
    def disabled(cls) -> Telemetry:
        """No-op telemetry (the API's default providers)."""
        return cls(trace.NoOpTracer(), metrics.NoOpMeter(SCOPE), tracing=False)

    @classmethod
    def from_settings(cls, s: Settings, worker: int = 0) -> Telemetry:
        resource = Resource.create({"service.name": "fuelcard", "service.instance.id":
                                    f"worker-{worker}"})
        tracer_provider: TracerProvider | None = None
        tracer: trace.Tracer = trace.NoOpTracer()
        if s.tracing:
            # Roots: decided in rpc_span at trace_sample_ratio, before any span
            # is built; the SDK only follows the parent's decision.
            tracer_provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
            if s.otlp_endpoint:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
                tracer_provider.add_span_processor(BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=s.otlp_endpoint, insecure=_insecure(s.otlp_endpoint)),
                    max_queue_size=8192, max_export_batch_size=512))
            tracer = tracer_provider.get_tracer(SCOPE)
        readers: list[MetricReader] = []
        scrape: InMemoryMetricReader | None = None
        if s.metrics_listen is not None:
            scrape = InMemoryMetricReader()
            readers.append(scrape)
        if s.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=s.otlp_endpoint, insecure=_insecure(s.otlp_endpoint)),
                export_interval_millis=s.metrics_interval_s * 1000))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers, views=[
            View(instrument_name=RPC_LATENCY, aggregation=ExplicitBucketHistogramAggregation(
                LATENCY_BUCKETS_MS))])
        return cls(tracer, meter_provider.get_meter(SCOPE), tracing=s.tracing,
                   exporting=s.tracing and bool(s.otlp_endpoint), root_ratio=s.trace_sample_ratio,
                   tracer_provider=tracer_provider, meter_provider=meter_provider,
                   scrape_reader=scrape, access_sample=s.access_log_sample)

    def install_global(self) -> None:
        """Make our providers the process's globals (once, in a worker), and
        route gRPC's C-core log lines into the worker's JSON log stream (a
        process-wide change, like the providers: only a serving process
        makes it; see logs.route_native_stderr)."""
        from fuelcard_server import logs

        logs.route_native_stderr()
        if self.meter_provider is not None:
            metrics.set_meter_provider(self.meter_provider)
        if self.tracer_provider is not None:
            trace.set_tracer_provider(self.tracer_provider)

    @property
    def span_tracer(self) -> trace.Tracer | None:
        """The tracer for child spans (database statements); None when no
        span is recorded anywhere."""
        return self.tracer if self.exporting else None

    def rpc_span(self, name: str, metadata: Iterable[Any] | None
                 ) -> tuple[trace.Span | None, object]:
        """The server span of one RPC and the context token to detach when it
        ends: (None, None) when nothing would record it (no exporter, or an
        unsampled root, or a caller's unsampled trace) - then no span is built;
        (None, token) when only the caller's trace context is made current (so
        log lines carry its trace id)."""
        if not self.tracing:
            return None, None
        parent = parent_context(metadata)
        if self.exporting:
            if parent is None:
                ratio = self.root_ratio
                if ratio <= 0.0 or (ratio < 1.0 and random.random() >= ratio):
                    return None, None
            elif not trace.get_current_span(parent).get_span_context().trace_flags.sampled:
                return None, otel_context.attach(parent)
            span = self.tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER)
            return span, otel_context.attach(trace.set_span_in_context(span))
        if parent is None:
            return None, None
        return None, otel_context.attach(parent)

    def access(self, method: str, code: str, elapsed_s: float, peer_role: str) -> None:
        """The access line of one RPC, if it is sampled. Only what the
        server knows of any call: never a request field, so no card, phone
        or ID number can be in it."""
        rate = self.access_sample
        if rate <= 0.0 or (rate < 1.0 and random.random() >= rate):
            return
        us = int(elapsed_s * 1_000_000)
        access_log.info("%s %s %d us (%s)", method, code, us, peer_role, extra={
            "method": method, "fields": {"code": code, "duration_us": us, "peer_role": peer_role,
                                         "sample_rate": rate}})

    def watch_pool(self, name: str, stats: Callable[[], Mapping[str, int]]) -> None:
        self._pools.append((name, stats))

    def force_flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(10_000)
        if self.meter_provider is not None:
            self.meter_provider.force_flush(10_000)

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()

    # -- gauges ----------------------------------------------------------------

    def _active_holds(self, _options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.active_holds)

    def _database_up(self, _options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(self.gauges.database_up)

    def _replica_up(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self.gauges.replica_up is not None:
            yield Observation(self.gauges.replica_up)

    def _replica_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self.gauges.replica_lag_s is not None and math.isfinite(self.gauges.replica_lag_s):
            yield Observation(self.gauges.replica_lag_s)

    def _replica_standby(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self.gauges.replica_standby is not None:
            yield Observation(self.gauges.replica_standby)

    def _primary_node(self, _options: CallbackOptions) -> Iterable[Observation]:
        view = self.gauges.replication
        if view is not None and self.gauges.database_up:
            yield Observation(1, {"node": view.primary})

    def _standby_lag_bytes(self, _options: CallbackOptions) -> Iterable[Observation]:
        view = self.gauges.replication
        for sb in view.standbys if view is not None else ():
            yield Observation(sb.lag_bytes, {"standby": sb.name, "sync_state": sb.sync_state})

    def _standby_lag_s(self, _options: CallbackOptions) -> Iterable[Observation]:
        view = self.gauges.replication
        for sb in view.standbys if view is not None else ():
            yield Observation(sb.lag_s, {"standby": sb.name, "sync_state": sb.sync_state})

    def _sync_standbys(self, _options: CallbackOptions) -> Iterable[Observation]:
        view = self.gauges.replication
        if view is not None:
            names = [sb.name for sb in view.standbys if sb.sync_state in ("sync", "quorum")]
            yield Observation(len(names), {"name": ",".join(names)})

    def _pool_in_use(self, _options: CallbackOptions) -> Iterable[Observation]:
        for name, stats in self._pools:
            s = stats()
            yield Observation(s.get("pool_size", 0) - s.get("pool_available", 0), {"pool": name})

    def _pool_waiting(self, _options: CallbackOptions) -> Iterable[Observation]:
        for name, stats in self._pools:
            yield Observation(stats().get("requests_waiting", 0), {"pool": name})

    # -- Prometheus ------------------------------------------------------------

    def prometheus_text(self) -> str:
        if self.scrape_reader is None:
            return ""
        data = self.scrape_reader.get_metrics_data()
        return render_prometheus(data) if data is not None else ""


def _insecure(endpoint: str) -> bool:
    return endpoint.startswith("http://")


# --- the Prometheus text exposition format (0.0.4) ----------------------------------


def _name(raw: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in raw)


def _labels(attributes: Mapping[str, Any] | None, extra: tuple[str, str] | None = None) -> str:
    items = [(_name(k), str(v)) for k, v in (attributes or {}).items()]
    if extra is not None:
        items.append(extra)
    if not items:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in items)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def render_prometheus(data: MetricsData) -> str:
    lines: list[str] = []
    seen: set[str] = set()
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                name = _name(metric.name)
                points = metric.data
                if isinstance(points, Sum) and points.is_monotonic:
                    kind = "counter"
                    name = name if name.endswith("_total") else name + "_total"
                elif isinstance(points, Histogram):
                    kind = "histogram"
                elif isinstance(points, Sum | Gauge):
                    kind = "gauge"
                else:
                    continue
                if name not in seen:
                    seen.add(name)
                    if metric.description:
                        lines.append(f"# HELP {name} {_escape(metric.description)}")
                    lines.append(f"# TYPE {name} {kind}")
                if isinstance(points, Histogram):
                    for hp in points.data_points:
                        cumulative = 0
                        for bound, n in zip(hp.explicit_bounds, hp.bucket_counts, strict=False):
                            cumulative += n
                            le = ("le", _number(float(bound)))
                            lines.append(f"{name}_bucket{_labels(hp.attributes, le)} {cumulative}")
                        lines.append(f"{name}_bucket{_labels(hp.attributes, ('le', '+Inf'))} {hp.count}")
                        lines.append(f"{name}_sum{_labels(hp.attributes)} {_number(hp.sum)}")
                        lines.append(f"{name}_count{_labels(hp.attributes)} {hp.count}")
                else:
                    for p in points.data_points:
                        lines.append(f"{name}{_labels(p.attributes)} {_number(p.value)}")
    return "\n".join(lines) + "\n"


class MetricsEndpoint:
    """GET /metrics over plain HTTP/1.1 on the server's event loop; and the
    probes a load balancer or an orchestrator can make without a client
    certificate (the gRPC health service needs one, as every gRPC call does):

    - /healthz: 200 while the process serves its event loop (liveness);
    - /readyz: 200 if a call would succeed now, else 503; the body (JSON)
      says why: the database reachable, the replica's state, stopping
      (`readiness`, from health.Health).

    They say nothing a scraper of /metrics cannot already read."""

    def __init__(self, telemetry: Telemetry, host: str, port: int,
                 readiness: Callable[[], tuple[bool, dict[str, Any]]] | None = None) -> None:
        self._telemetry = telemetry
        self._readiness = readiness
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                  reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            parts = request.split(b" ", 2)
            path = parts[1].split(b"?")[0] if len(parts) >= 2 and parts[0] == b"GET" else b""
            if path == b"/metrics":
                body = (await asyncio.to_thread(self._telemetry.prometheus_text)).encode()
                head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; "
                        b"charset=utf-8\r\n")
            elif path == b"/healthz":
                body, head = b"ok\n", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            elif path == b"/readyz" and self._readiness is not None:
                ready, detail = self._readiness()
                body = (json.dumps(detail, sort_keys=True) + "\n").encode()
                head = (b"HTTP/1.1 200 OK\r\n" if ready else b"HTTP/1.1 503 Service Unavailable\r\n"
                        ) + b"Content-Type: application/json\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
