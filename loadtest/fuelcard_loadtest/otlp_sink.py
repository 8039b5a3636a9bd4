"""A minimal OTLP/gRPC receiver on loopback: it accepts trace and metric
exports and keeps what it got (bounded), so the cost of exporting can be
measured and tests can look at the spans a server sent. A stand-in for an
OpenTelemetry collector, which cannot run here.

    python -m fuelcard_loadtest.otlp_sink --port 4317
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import deque
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

MAX_KEPT_SPANS = 100_000


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer,
               metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: int = MAX_KEPT_SPANS) -> None:
        self._lock = threading.Lock()
        self.spans: deque[trace_pb2.Span] = deque(maxlen=keep)
        self.span_count = 0
        self.metric_exports = 0
        self.metric_names: set[str] = set()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"

    def start(self) -> OtlpSink:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def Export(self, request: Any, context: Any) -> Any:
        # Both services name their method Export: the request type tells them apart.
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            with self._lock:
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        self.span_count += len(ss.spans)
                        self.spans.extend(ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        with self._lock:
            self.metric_exports += 1
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    self.metric_names.update(m.name for m in sm.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def spans_of_trace(self, trace_id: bytes) -> list[trace_pb2.Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m fuelcard_loadtest.otlp_sink")
    p.add_argument("--port", type=int, default=4317)
    args = p.parse_args()
    with OtlpSink(port=args.port) as sink:
        print(f"OTLP sink on {sink.endpoint}", flush=True)
        try:
            while True:
                time.sleep(10)
                print(f"spans {sink.span_count}  metric exports {sink.metric_exports}", flush=True)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
