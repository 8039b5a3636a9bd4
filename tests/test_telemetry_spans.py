"""Issue 17: an RPC whose span nothing would record gets none (telemetry.rpc_span),
and one that would be recorded still gets it: the server span of a sampled
root or of a caller's sampled trace, only the caller's context for its
unsampled trace, and nothing at all for an unsampled root. The end-to-end
export (OTLP, database children, a cancelled call) is tests/test_ops.py."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuelcard_loadtest.otlp_sink import OtlpSink
from fuelcard_server.settings import Settings
from fuelcard_server.telemetry import Telemetry
from opentelemetry import context as otel_context
from opentelemetry import trace

NAME = "/fuelcard.v1.TransactionService/Authorize"


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    with OtlpSink() as s:
        yield s


def _telemetry(tmp_path: Path, **overrides: object) -> Telemetry:
    return Telemetry.from_settings(Settings(data_dir=tmp_path, **overrides))  # type: ignore[arg-type]


def _traceparent(sampled: bool) -> tuple[str, tuple[tuple[str, str], ...]]:
    trace_id = secrets.token_hex(16)
    flags = "01" if sampled else "00"
    return trace_id, (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"),)


def _current_trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


def test_a_sampled_root_is_recorded_and_an_unsampled_one_makes_no_span(
        tmp_path: Path, sink: OtlpSink) -> None:
    every = _telemetry(tmp_path, otlp_endpoint=sink.endpoint, trace_sample_ratio=1.0)
    none = _telemetry(tmp_path, otlp_endpoint=sink.endpoint, trace_sample_ratio=0.0)
    try:
        span, token = every.rpc_span(NAME, ())
        assert span is not None and span.is_recording() and token is not None
        assert trace.get_current_span() is span
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]
        assert none.rpc_span(NAME, ()) == (None, None)
        assert not trace.get_current_span().get_span_context().is_valid
    finally:
        every.shutdown()
        none.shutdown()


def test_a_callers_trace_is_followed_when_sampled_and_only_joined_when_not(
        tmp_path: Path, sink: OtlpSink) -> None:
    tel = _telemetry(tmp_path, otlp_endpoint=sink.endpoint, trace_sample_ratio=0.0)
    try:
        trace_id, metadata = _traceparent(sampled=True)
        span, token = tel.rpc_span(NAME, metadata)
        assert span is not None and span.is_recording()
        assert _current_trace_id() == trace_id
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]
        trace_id, metadata = _traceparent(sampled=False)
        span, token = tel.rpc_span(NAME, metadata)
        assert span is None and token is not None
        assert _current_trace_id() == trace_id  # log lines still carry it
        otel_context.detach(token)  # type: ignore[arg-type]
    finally:
        tel.shutdown()


def test_without_an_exporter_no_span_is_made_but_the_callers_trace_id_is_kept(
        tmp_path: Path) -> None:
    tel = _telemetry(tmp_path, trace_sample_ratio=1.0)
    try:
        assert tel.tracing and not tel.exporting and tel.span_tracer is None
        assert tel.rpc_span(NAME, ()) == (None, None)
        trace_id, metadata = _traceparent(sampled=True)
        span, token = tel.rpc_span(NAME, metadata)
        assert span is None and token is not None
        assert _current_trace_id() == trace_id
        otel_context.detach(token)  # type: ignore[arg-type]
    finally:
        tel.shutdown()


def test_tracing_off_makes_nothing_even_for_a_callers_trace(tmp_path: Path) -> None:
    tel = _telemetry(tmp_path, tracing=False)
    _, metadata = _traceparent(sampled=True)
    assert tel.rpc_span(NAME, metadata) == (None, None)
