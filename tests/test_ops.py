"""Operability on one server: reflection, deadlines, traces, metrics, logs,
early refusal of low-priority calls, settings. (Database outages, replicas
and the priority flood have their own modules.)"""

from __future__ import annotations

import io
import logging
import re
import secrets
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, common_pb2
from fuelcard_loadtest.otlp_sink import OtlpSink
from fuelcard_server import logs
from fuelcard_server.health import SERVICE_NAMES
from fuelcard_server.settings import Settings, SettingsError
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.plugins.server import RunningServer, make_settings
from tests.support import builders
from tests.support.ledger_asserts import count, unpack

Db = psycopg.Connection[tuple[object, ...]]


@pytest.fixture(scope="module")
def otlp_sink() -> Iterator[OtlpSink]:
    with OtlpSink() as sink:
        yield sink


@pytest.fixture
def server_settings(tmp_path: Path, otlp_sink: OtlpSink) -> Settings:
    return make_settings(tmp_path, load_shedding=True, metrics_listen="127.0.0.1:0",
                         otlp_endpoint=otlp_sink.endpoint,
                         trace_sample_ratio=0.0, max_inflight_reports=1, shed_retry_ms=300)


def _account_key(db: Db, account_id: str) -> int:
    row = db.execute("SELECT id FROM fc.accounts WHERE uid = %s", (account_id,)).fetchone()
    assert row is not None
    return int(str(row[0]))


# -- reflection ------------------------------------------------------------------


def test_reflection_lists_services_and_resolves_their_files(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                  for name in SERVICE_NAMES)]
    answers = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    listed = {s.name for s in answers[0].list_services_response.service}
    assert set(SERVICE_NAMES) <= listed and "grpc.health.v1.Health" in listed
    for name, answer in zip(SERVICE_NAMES, answers[1:], strict=True):
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in answer.file_descriptor_response.file_descriptor_proto]
        package, _, service = name.rpartition(".")
        found = [f for f in files if f.package == package
                 and any(s.name == service for s in f.service)]
        assert found, f"no file descriptor defines {name}"
        methods = {m.name for s in found[0].service if s.name == service for m in s.method}
        assert methods, name
    # a symbol of a message, as grpcurl asks when it builds a request
    answer = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="fuelcard.v1.AuthorizeRequest")]), timeout=10)))
    assert answer.file_descriptor_response.file_descriptor_proto


# -- deadlines -------------------------------------------------------------------


def test_a_call_past_its_deadline_stops_its_database_work(server: RunningServer, db: Db) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    key = _account_key(db, card.account_id)
    with psycopg.connect(server.database_url, autocommit=True) as locker:
        locker.execute("SELECT pg_advisory_lock(%s)", (key,))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            server.pos.Authorize(builders.authorize_request(card, 10_000), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3
        # The authorize's statement was waiting on the account lock: it is
        # cancelled, not left to run once the lock is free.
        deadline = time.monotonic() + 5
        while True:
            waiting = _lock_waiters(db)
            if waiting == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert waiting == 0, "the authorize is still waiting in PostgreSQL"
        locker.execute("SELECT pg_advisory_unlock(%s)", (key,))
    time.sleep(0.2)
    assert count(db, "holds") == 0
    assert builders.balance(server, card).balance.available_fen == 50_000


def _lock_waiters(db: Db) -> int:
    row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                     " AND state = 'active' AND wait_event_type = 'Lock'").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_a_request_past_the_message_size_limit_is_refused(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=5_000)
    request = builders.authorize_request(card, 1_000)
    request.station_id = "S" * (1024 * 1024 + 1)  # more than max_receive_message_length
    with pytest.raises(grpc.RpcError) as caught:
        server.pos.Authorize(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert builders.balance(server, card).balance.held_fen == 0


# -- traces, logs ------------------------------------------------------------------


def test_rpc_spans_follow_the_callers_traceparent_with_database_children(
        server: RunningServer, otlp_sink: OtlpSink) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    # (one random id in ~300 has 16 digits in a row, room for a card number:
    # the log scrubs those, tests/test_privacy.py; not this test's subject)
    trace_id = next(t for t in (secrets.token_hex(16) for _ in range(100))
                    if not re.search(r"\d{16}", t))
    parent_span = secrets.token_hex(8)
    request_id = builders.rid("traced")
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RpcContext())
    logging.getLogger().addHandler(handler)
    try:
        answer = server.pos.Authorize(
            builders.authorize_request(card, 10_000, request_id=request_id),
            metadata=(("traceparent", f"00-{trace_id}-{parent_span}-01"),))
        # an RPC that logs (a bug-free one does not): a database refusal
        server.run(_mark_database_down(server, True))
        with pytest.raises(grpc.RpcError):
            server.pos.Authorize(builders.authorize_request(card, 10_000, request_id="rid-logged"),
                                 metadata=(("traceparent", f"00-{trace_id}-{parent_span}-01"),))
    finally:
        server.run(_mark_database_down(server, False))
        logging.getLogger().removeHandler(handler)
    assert answer.decision == common_pb2.DECISION_APPROVED
    assert server.server.telemetry is not None
    server.server.telemetry.force_flush()
    spans = otlp_sink.spans_of_trace(bytes.fromhex(trace_id))
    rpc = [s for s in spans if s.name == "/fuelcard.v1.TransactionService/Authorize"]
    assert len(rpc) == 2
    assert all(s.parent_span_id == bytes.fromhex(parent_span) for s in rpc)
    children = [s for s in spans if s.parent_span_id == rpc[0].span_id]
    assert any(s.name.startswith("db fc.") for s in children), [s.name for s in spans]
    # metrics go out over OTLP too
    assert {"fuelcard.rpc.latency_ms", "fuelcard.authorizations"} <= otlp_sink.metric_names
    # an unsampled root trace (ratio 0) exports nothing
    before = otlp_sink.span_count
    builders.balance(server, card)
    server.server.telemetry.force_flush()
    assert otlp_sink.span_count == before
    lines = [line for line in captured.getvalue().splitlines() if "Authorize failed" in line]
    assert lines, captured.getvalue()
    assert f'"trace_id": "{trace_id}"' in lines[0] and '"request_id": "rid-logged"' in lines[0]
    assert card.card_number not in captured.getvalue()



def test_a_call_cancelled_while_its_audit_record_is_written_still_ends_its_span(
        server: RunningServer, otlp_sink: OtlpSink) -> None:
    # The audit append waits for the audit chain's lock, held from the side;
    # the caller's deadline passes meanwhile and the call is cancelled there.
    # Its span used to be left open, so never exported.
    from fuelcard_server.locks import AUDIT_LOCK
    trace_id = next(t for t in (secrets.token_hex(16) for _ in range(100))
                    if not re.search(r"\d{16}", t))
    with psycopg.connect(server.database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (AUDIT_LOCK,))
        with pytest.raises(grpc.RpcError) as caught:
            server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
                request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                holder=account_pb2.Holder(name="审计")), timeout=1.0,
                metadata=(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        holder.execute("SELECT pg_advisory_unlock_all()")
    assert server.server.telemetry is not None
    deadline = time.monotonic() + 10
    while True:  # the handler unwinds after the client has given up
        server.server.telemetry.force_flush()
        spans = [s for s in otlp_sink.spans_of_trace(bytes.fromhex(trace_id))
                 if s.name == "/fuelcard.v1.AccountService/OpenAccount"]
        if spans or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(spans) == 1, "the cancelled call's span was never ended"
    codes = [a.value.int_value for a in spans[0].attributes if a.key == "rpc.grpc.status_code"]
    assert codes == [grpc.StatusCode.CANCELLED.value[0]]

def _mark_database_down(server: RunningServer, down: bool) -> Callable[[], Awaitable[None]]:
    async def flip() -> None:
        db = server.server._db
        assert db is not None
        db.available = not down
    return flip


def test_log_lines_are_desensitised_json() -> None:
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RpcContext())
    log = logging.getLogger("fuelcard.test")
    log.addHandler(handler)
    try:
        log.warning("card %s phone %s id %s", "6222021234567890123", "13812345678",
                    "11010119900307123X", extra={"request_id": "r-13812345678"})
    finally:
        log.removeHandler(handler)
    text = captured.getvalue()
    for secret in ("6222021234567890123", "13812345678", "11010119900307123X"):
        assert secret not in text
    assert '"level": "warning"' in text and '"request_id": "r-138***78"' in text


# -- metrics -------------------------------------------------------------------------


def test_prometheus_scrape_has_the_operators_metrics(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    held = builders.authorize(server, card, 10_000)
    builders.authorize(server, card, 900_000)  # declined: not enough money
    builders.confirm(server, held.hold.hold_id, 8_000)
    builders.authorize(server, card, 1_000)  # stays active
    server.run(server.server.refresh_gauges)
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "# TYPE fuelcard_rpc_latency_ms histogram" in text
    assert ('fuelcard_rpc_latency_ms_count{rpc_method="/fuelcard.v1.TransactionService/Authorize",'
            'rpc_grpc_status_code="OK"} 3') in text
    assert 'fuelcard_authorizations_total{decision="DECISION_APPROVED"' in text
    assert 'decision="DECISION_DECLINED",reason="DECLINE_REASON_INSUFFICIENT_FUNDS"} 1' in text
    assert "fuelcard_holds_active 1" in text
    assert 'fuelcard_db_pool_in_use{pool="transactions"}' in text
    assert 'fuelcard_db_pool_waiting{pool="reads"} 0' in text
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)


# -- priority classes ---------------------------------------------------------------------


def test_reports_past_their_cap_are_refused_at_once_with_a_retry_hint(
        server: RunningServer, db: Db) -> None:
    """max_inflight_reports=1: with one report stuck, the next is refused
    without waiting, while payments go on."""
    card = builders.open_card(server, balance_fen=50_000)
    listing = account_pb2.ListTransactionsRequest(account_id=card.account_id)
    result: dict[str, object] = {}
    with psycopg.connect(server.database_url) as locker:
        locker.execute("LOCK TABLE fc.journal IN ACCESS EXCLUSIVE MODE")

        def stuck() -> None:
            try:
                result["answer"] = server.accounts.ListTransactions(listing, timeout=30)
            except grpc.RpcError as exc:
                result["error"] = exc

        thread = threading.Thread(target=stuck)
        thread.start()
        deadline = time.monotonic() + 10
        while _lock_waiters(db) == 0:
            assert time.monotonic() < deadline, "the report never reached the database"
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            server.accounts.ListTransactions(listing, timeout=10)
        assert time.monotonic() - started < 1
        err = unpack(caught.value)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "OVERLOADED"
        locker.rollback()
    thread.join(timeout=30)
    assert "answer" in result, result
    retry = _retry_info(caught.value)
    assert retry is not None and retry.retry_delay.ToMilliseconds() >= 300
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    assert ('fuelcard_rpc_shed_total{rpc_method="/fuelcard.v1.AccountService/ListTransactions",'
            'priority_class="reports"} 1') in text
    # payments were never in the reports' class
    assert builders.balance(server, card).balance.available_fen == 50_000


def _retry_info(err: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    from grpc_status import rpc_status
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    infos = 0
    found = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            infos += 1
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            found = error_details_pb2.RetryInfo()
            detail.Unpack(found)
    assert infos == 1
    return found


# -- settings --------------------------------------------------------------------------------


def test_settings_come_from_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "fuelcard.toml"
    config.write_text('pool_max = 24\nmax_inflight_reports = 2\nmetrics_listen = "127.0.0.1:9464"\n'
                      "tracing = false\ntrace_sample_ratio = 0.5\n")
    s = Settings.from_env({"FUELCARD_POOL_MAX": "32"}, config=config).validate()
    assert (s.pool_max, s.max_inflight_reports, s.metrics_listen, s.tracing,
            s.trace_sample_ratio) == (32, 2, "127.0.0.1:9464", False, 0.5)
    s = Settings.from_env({"FUELCARD_CONFIG": str(config)})
    assert s.pool_max == 24


@pytest.mark.parametrize(("text", "message"), [
    ("pool_max = 'many'", "pool_max: cannot read"),
    ("no_such_thing = 1", "unknown setting no_such_thing"),
    ("trace_sample_ratio = 2.0", "trace_sample_ratio must be between 0 and 1"),
    ("max_inflight_reports = 5000", "max_inflight_payments must be the largest"),
    ("max_event_streams = 0", "max_event_streams must be between 1 and 64"),
    ("metrics_listen = 'nine'", "metrics_listen: expected HOST:PORT"),
    ("otlp_endpoint = '127.0.0.1:4317'", "otlp_endpoint: expected a URL"),
    ("replica_max_lag_s = 0", "replica_max_lag_s must be > 0"),
    ("replica_down_after_probes = 0", "replica_down_after_probes must be between 1 and 100"),
    ("health_interval_s = inf", "health_interval_s must be a finite number"),
    ("connect_timeout_s = nan", "connect_timeout_s must be a finite number"),
    ("idempotency_retention_unguarded_s = 100000000000",
     "idempotency_retention_unguarded_s must be at most"),
    ("pool_max = [", "not TOML"),
])
def test_bad_settings_are_refused_with_a_clear_message(tmp_path: Path, text: str,
                                                       message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({}, config=config).validate()
    with pytest.raises(SettingsError, match="config file"):
        Settings.from_env({}, config=tmp_path / "missing.toml")


def test_every_rpc_has_the_priority_class_it_should() -> None:
    """Which class each of today's RPCs falls in (new RPCs are classed by
    the same rules: a POS may call it -> payments, a report-type name or an
    analytics caller -> reports, an adapter -> funding, else admin)."""
    from fuelcard_server.overload import Priority, classify
    from fuelcard_server.services import account, control, funding, points, security, transaction

    classes: dict[str, Priority] = {}
    for module in (account, control, funding, points, security, transaction):
        for servicer in vars(module).values():
            if isinstance(servicer, type) and servicer.__module__ == module.__name__:
                for name, fn in vars(servicer).items():
                    roles = getattr(fn, "__wrapped_roles__", None)
                    if roles is not None:
                        classes[name] = classify(name, roles)
    payments = {"Authorize", "Confirm", "Cancel", "GetHold", "GetCardBalance", "SignOn",
                "SetCardPin"}
    reports = {"ListHolds", "ListTransactions", "ListPointsHistory", "ListControlChanges",
               "GetFleetCostReport", "GetPointsBalance"}
    assert {n for n, p in classes.items() if p is Priority.PAYMENTS} >= payments
    assert {n for n, p in classes.items() if p is Priority.REPORTS} >= reports
    assert classes["Recharge"] is Priority.FUNDING
    assert classes["OpenAccount"] is Priority.ADMIN and classes["BatchTopUp"] is Priority.ADMIN


def test_metrics_other_modules_make_with_the_global_api_are_scraped_with_ours() -> None:
    """A worker installs its providers as the process's globals: instruments
    made with opentelemetry.metrics.get_meter, even before that (at import),
    land in the same scrape. In a process of its own: globals are set once."""
    import subprocess
    import sys

    script = (
        "from opentelemetry import metrics\n"
        "early = metrics.get_meter('other').create_counter('fuelcard.other.scored')\n"
        "from fuelcard_server.settings import Settings\n"
        "from fuelcard_server.telemetry import Telemetry\n"
        "t = Telemetry.from_settings(Settings(metrics_listen='127.0.0.1:0'))\n"
        "t.install_global()\n"
        "early.add(3, {'verdict': 'ALLOW'})\n"
        "print(t.prometheus_text())\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert 'fuelcard_other_scored_total{verdict="ALLOW"} 3' in res.stdout
    assert "fuelcard_db_up 1" in res.stdout  # and ours
