"""Issue 20, item 6: the log stream as an SRE reads it. Every line is JSON
with pid and worker; gRPC's C-core lines join it as JSON; each RPC may have a
sampled, desensitised access line; and a line repeated during an outage is
written a few times per window, then summarised."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuelcard.v1 import account_pb2, account_pb2_grpc
from fuelcard_loadtest.server import free_port, listening_sockets
from fuelcard_server import logs
from fuelcard_server.settings import Settings, SettingsError
from fuelcard_server.telemetry import Telemetry

from tests.plugins import logscan
from tests.plugins.server import TEST_KEY_HEX, RunningServer, TlsServer
from tests.support import builders

ROOT = Path(__file__).resolve().parent.parent
FUELCARD = str(Path(sys.executable).parent / "fuelcard")
ACCESS_KEYS = {"ts", "level", "logger", "msg", "pid", "worker", "method", "code", "duration_us",
               "peer_role", "sample_rate"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


# -- pid and worker -------------------------------------------------------------------


def test_every_line_carries_pid_and_worker() -> None:
    record = logging.LogRecord("fuelcard_server.app", logging.INFO, __file__, 1, "serving", None,
                               None)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["pid"] == os.getpid()
    assert line["worker"] == 0  # the test process is no worker of `serve --workers`


def test_the_worker_number_comes_from_the_name_serve_gives_its_workers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    process = multiprocessing.current_process()
    monkeypatch.setattr(process, "name", "fuelcard-worker-3")
    assert logs.worker_number() == 3
    monkeypatch.setattr(process, "name", "MainProcess")
    assert logs.worker_number() == 0


# -- repeated lines ---------------------------------------------------------------------


def _limited(limit: int = 5, window_s: float = 15.0) -> tuple[logging.Logger, io.StringIO,
                                                               logs.JsonHandler, FakeClock]:
    clock = FakeClock()
    out = io.StringIO()
    handler = logs.JsonHandler(out, logs.RepeatLimiter(limit, window_s, clock), timer=False)
    logger = logging.getLogger(f"fuelcard_server.outage-probe-{id(out)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger, out, handler, clock


def test_an_outage_writes_a_few_identical_lines_then_one_summary() -> None:
    logger, out, handler, clock = _limited()
    # the outage of the issue: 92 failures in 15 s, with varying numbers in them
    for i in range(92):
        logger.error("database unreachable (attempt %d): %s", i, "OperationalError")
        clock.now += 0.15
    logger.warning("read replica unreachable, probe %d", 1)  # another line: not limited
    logger.info("health probe %d", 1)  # below WARNING: never limited
    lines = _lines(out.getvalue())
    assert [line["msg"] for line in lines[:5]] == [
        f"database unreachable (attempt {i}): OperationalError" for i in range(5)]
    assert len(lines) == 7 and "suppressed" not in out.getvalue()
    clock.now += 15.0
    assert handler.write_due() == 1
    summary = _lines(out.getvalue())[-1]
    # 92 in 13.8 s fall in one window: 5 written, 87 counted
    assert summary["msg"].startswith("suppressed 87 similar lines in 15 s: database unreachable")
    assert (summary["suppressed"], summary["level"], summary["logger"]) == (87, "error", logger.name)
    assert handler.write_due() == 0  # once


def test_a_new_window_writes_again_and_carries_the_last_summary() -> None:
    logger, out, _handler, clock = _limited(limit=2, window_s=10.0)
    for _ in range(6):
        logger.warning("pool exhausted after %d ms", 30_000)
    clock.now += 10.0
    logger.warning("pool exhausted after %d ms", 30_000)
    msgs = [line["msg"] for line in _lines(out.getvalue())]
    assert msgs == ["pool exhausted after 30000 ms"] * 2 + [
        "suppressed 4 similar lines in 10 s: pool exhausted after %d ms",
        "pool exhausted after 30000 ms"]


def test_f_strings_with_changing_numbers_count_as_the_same_line() -> None:
    logger, out, handler, clock = _limited(limit=1)
    for i in range(3):
        logger.error(f"worker {i} lost its connection")  # as some code logs
    clock.now += 15.0
    handler.write_due()
    msgs = [line["msg"] for line in _lines(out.getvalue())]
    assert msgs[0] == "worker 0 lost its connection"
    assert msgs[1].startswith("suppressed 2 similar lines")
    assert len(msgs) == 2


def test_the_summary_is_written_when_the_window_ends_without_another_line() -> None:
    out = io.StringIO()
    # a real timer this time (the summary must not wait for the next line)
    handler = logs.JsonHandler(out, logs.RepeatLimiter(1, 0.2))
    logger = logging.getLogger("fuelcard_server.outage-timer-probe")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for _ in range(4):
            logger.error("database unreachable")
        deadline = time.monotonic() + 30
        while "suppressed" not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.05)
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert _lines(out.getvalue())[-1]["suppressed"] == 3


# -- the access line --------------------------------------------------------------------


def test_the_sample_rate_is_a_setting_from_zero_to_one() -> None:
    assert Settings().access_log_sample == 0.01  # small, but not silent
    s = Settings.from_env({"FUELCARD_ACCESS_LOG_SAMPLE": "0.25"})
    assert s.access_log_sample == 0.25
    assert Telemetry.from_settings(s).access_sample == 0.25
    for bad in ("1.5", "-0.1"):
        with pytest.raises(SettingsError, match="access_log_sample"):
            Settings.from_env({"FUELCARD_ACCESS_LOG_SAMPLE": bad,
                               "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX}).validate()


def test_calls_are_sampled_at_the_rate(monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    draws = iter([0.1, 0.3, 0.24, 0.9, 0.0])
    monkeypatch.setattr("fuelcard_server.telemetry.random.random", lambda: next(draws))
    tel = Telemetry.disabled()
    tel.access_sample = 0.25
    with caplog.at_level(logging.INFO, logger="fuelcard_server.access"):
        for i in range(5):
            tel.access(f"/fuelcard.v1.X/M{i}", "OK", 0.001, "pos")
        tel.access_sample = 0.0
        tel.access("/fuelcard.v1.X/Never", "OK", 0.001, "pos")  # no draw needed at 0
    logged = [r.getMessage().split()[0] for r in caplog.records
              if r.name == "fuelcard_server.access"]
    assert logged == ["/fuelcard.v1.X/M0", "/fuelcard.v1.X/M2", "/fuelcard.v1.X/M4"]


def _access_lines(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    formatter = logs.JsonFormatter()
    return [json.loads(formatter.format(r)) for r in records if r.name == "fuelcard_server.access"]


def test_each_call_gets_a_desensitised_access_line(server: RunningServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    phone, id_number = "13987654321", "53010219800101003X"
    with caplog.at_level(logging.INFO, logger="fuelcard_server.access"):
        card = builders.open_card(server, balance_fen=10_000, phone=phone, id_number=id_number)
        with pytest.raises(grpc.RpcError) as refused:
            server.accounts.GetCard(account_pb2.GetCardRequest(card_id="c-unknown"))
    lines = _access_lines(caplog.records)
    methods = [line["method"] for line in lines]
    assert methods == ["/fuelcard.v1.AccountService/OpenAccount",
                       "/fuelcard.v1.AccountService/IssueCard",
                       "/fuelcard.v1.FundingService/Recharge",
                       "/fuelcard.v1.AccountService/GetCard"]
    assert [line["code"] for line in lines] == ["OK"] * 3 + [refused.value.code().name]
    for line in lines:
        assert set(line) == ACCESS_KEYS, line
        assert isinstance(line["duration_us"], int) and line["duration_us"] > 0
        assert line["peer_role"] == "development"  # no certificates on this server
        assert line["sample_rate"] == 1.0
        text = json.dumps(line, ensure_ascii=False)
        for secret in (card.card_number, phone, id_number, card.account_id):
            assert secret not in text


def test_the_access_line_names_the_callers_role_also_when_refused(
        tls_server: TlsServer, caplog: pytest.LogCaptureFixture) -> None:
    request = account_pb2.OpenAccountRequest(request_id=builders.rid(),
                                             type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                                             holder=account_pb2.Holder(name="access"))
    with caplog.at_level(logging.INFO, logger="fuelcard_server.access"):
        account_pb2_grpc.AccountServiceStub(tls_server.channel("admin-ops")).OpenAccount(request)
        with pytest.raises(grpc.RpcError) as refused:
            account_pb2_grpc.AccountServiceStub(tls_server.channel("analytics-bi")).OpenAccount(
                request)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert [(line["peer_role"], line["code"]) for line in _access_lines(caplog.records)] == [
        ("admin", "OK"), ("analytics", "PERMISSION_DENIED")]


# -- gRPC's C core ------------------------------------------------------------------------

_NATIVE_SCRIPT = textwrap.dedent("""
    import logging, multiprocessing, os
    multiprocessing.current_process().name = "fuelcard-worker-1"
    from fuelcard_server import logs
    logs.configure("INFO", native=True)
    import grpc  # C-core lines from here on land in the JSON stream
    from concurrent import futures
    server = grpc.server(futures.ThreadPoolExecutor(1))
    try:
        server.add_insecure_port("256.0.0.1:5")  # the C core logs why it cannot
    except RuntimeError:
        pass
    logging.getLogger("grpc._server").error("python-side grpc logger")
    os.write(2, b"a native line naming card 6222020200112233445\\n")
    print("done")
""")


def _run_native(env_extra: dict[str, str]) -> tuple[subprocess.CompletedProcess[str],
                                                      list[dict[str, Any]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env.update(env_extra, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _NATIVE_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=120)
    logscan.feed("native-stderr probe", res.stderr)
    assert res.returncode == 0 and res.stdout.strip() == "done", res.stderr
    return res, _lines(res.stderr)  # json.loads fails the test on any line that is not JSON


def test_grpc_core_lines_are_json_errors_only_by_default() -> None:
    res, lines = _run_native({})
    core = [line for line in lines if line["logger"] == "grpc.core"]
    assert core and {line["level"] for line in core} == {"error"}, res.stderr
    assert any("256.0.0.1:5" in line["msg"] for line in core)
    assert {(line["pid"], line["worker"]) for line in lines} == {(lines[0]["pid"], 1)}
    assert lines[0]["pid"] != os.getpid()
    by_logger = {line["logger"]: line for line in lines}
    assert by_logger["grpc._server"]["msg"] == "python-side grpc logger"
    # text on stderr that is not absl's is kept, as logger "stderr", and desensitised
    assert by_logger["stderr"]["msg"] == "a native line naming card 622***45"
    assert "6222020200112233445" not in res.stderr


def test_grpc_verbosity_turns_more_core_lines_on() -> None:
    res, lines = _run_native({"GRPC_VERBOSITY": "INFO"})
    levels = {line["level"] for line in lines if line["logger"] == "grpc.core"}
    # absl's own warning that INFO is not for production, and the error
    assert {"warning", "error"} <= levels, res.stderr


# -- a real multi-worker server --------------------------------------------------------------


def test_a_two_worker_server_writes_only_json_lines_with_pid_and_worker(
        database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX,
           "FUELCARD_ACCESS_LOG_SAMPLE": "1.0"}
    proc = subprocess.Popen(
        [FUELCARD, "serve", "--insecure", "--workers", "2", "--listen", f"127.0.0.1:{port}",
         "--database-url", database_url, "--data-dir", str(tmp_path), "--no-tracing"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()  # type: ignore[union-attr]
                                                        ), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while listening_sockets(port) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        for _ in range(12):  # connections of their own, spread over both workers
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                account_pb2_grpc.AccountServiceStub(channel).OpenAccount(
                    account_pb2.OpenAccountRequest(
                        request_id=builders.rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                        holder=account_pb2.Holder(name="sre")), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        reader.join(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    text = "".join(err)
    logscan.feed("fuelcard serve --workers 2", text)
    lines = _lines(text)  # every line JSON
    serving = {line["worker"]: line["pid"] for line in lines if line["msg"].startswith("serving on")}
    assert set(serving) == {0, 1} and len(set(serving.values())) == 2, text
    access = [line for line in lines if line["logger"] == "fuelcard_server.access"]
    assert len(access) == 12
    for line in access:
        assert serving[line["worker"]] == line["pid"]  # pid and worker agree
        assert line["method"] == "/fuelcard.v1.AccountService/OpenAccount" and line["code"] == "OK"
