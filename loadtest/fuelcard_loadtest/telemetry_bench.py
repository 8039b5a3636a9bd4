"""What tracing costs one RPC, measured precisely: the server's per-RPC
telemetry steps (the same calls the rpc decorator and db.py make) in a tight
loop, for tracing off, the default (parent-based, 5 % of root traces) and
every trace sampled and exported over OTLP to a local sink.

A load test on a shared 2-core machine moves by ±10 % from run to run; this
isolates the few microseconds in question: CPU time of this process (the
span exporter's thread included; the OTLP sink runs in a process of its
own), median of 5 rounds. Compare with the server CPU per pump cycle the load
test reports (two RPCs, two statements).

    python -m fuelcard_loadtest.telemetry_bench [--rpcs 20000]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time

from fuelcard_server import db
from fuelcard_server.services.transaction import AUTHORIZE_SQL
from fuelcard_server.settings import Settings
from fuelcard_server.telemetry import Telemetry, parent_context
from opentelemetry import context as otel_context
from opentelemetry import trace

from fuelcard_loadtest.server import free_port

# The span of the server's own statement (never run here: no database).
SQL = AUTHORIZE_SQL
METADATA = (("user-agent", "grpc-python/1.85"),)
ATTRS = {"rpc.method": "/fuelcard.v1.TransactionService/Authorize",
         "rpc.grpc.status_code": "OK"}


def one_rpc(tel: Telemetry, tracer: trace.Tracer | None) -> None:
    """The telemetry work of one RPC with one statement (rpc decorator + db)."""
    started = time.perf_counter()
    span = None
    token = None
    if tel.tracing:
        span = tel.tracer.start_span(ATTRS["rpc.method"], context=parent_context(METADATA),
                                     kind=trace.SpanKind.SERVER)
        token = otel_context.attach(trace.set_span_in_context(span))
    with db._span(tracer, SQL):
        pass
    tel.rpc_latency.record((time.perf_counter() - started) * 1000.0, ATTRS)
    if span is not None:
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]


def measure(tel: Telemetry, rpcs: int) -> float:
    """CPU microseconds of telemetry per RPC (median of 5 rounds)."""
    tracer = tel.tracer if db.tracing_on(tel.tracer) else None
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(rpcs):
            one_rpc(tel, tracer)
        tel.force_flush()  # the export is part of the cost
        rounds.append((time.process_time() - started) / rpcs * 1e6)
    return statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m fuelcard_loadtest.telemetry_bench")
    p.add_argument("--rpcs", type=int, default=20_000)
    args = p.parse_args()
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "fuelcard_loadtest.otlp_sink", "--port",
                             str(port)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(2)
        base = Settings(otlp_endpoint=f"http://127.0.0.1:{port}")
        configs = {
            "off": dataclasses.replace(base, tracing=False, otlp_endpoint=None),
            "default (5 % sampled)": base,
            "all sampled": dataclasses.replace(base, trace_sample_ratio=1.0),
        }
        for name, s in configs.items():
            tel = Telemetry.from_settings(s)
            us = measure(tel, args.rpcs)
            tel.shutdown()
            print(f"{name:24s} {us:6.1f} µs CPU per RPC")
    finally:
        sink.terminate()
        sink.wait(timeout=30)


if __name__ == "__main__":
    main()
