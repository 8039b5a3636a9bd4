"""The `fuelcard` command as an operator runs it: a real process, real
signals, the embedded database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    transaction_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server.health import SERVICE_NAMES
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.plugins import logscan
from tests.plugins.server import TEST_KEY_HEX, RunningServer
from tests.support import builders

FUELCARD = str(Path(sys.executable).parent / "fuelcard")


def _env() -> dict[str, str]:
    return {**os.environ, "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX}


def _wait_for_port(port_file: Path, proc: subprocess.Popen[str], timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("server did not start")


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [FUELCARD, "serve", "--insecure", "--listen", "127.0.0.1:0", "--database-url", database_url,
         "--data-dir", str(tmp_path), "--port-file", str(port_file)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = _wait_for_port(port_file, proc)
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=30)
        logscan.feed("fuelcard serve (stderr)", stderr)


def test_health_reports_every_service_serving(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_the_services(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        listed = {s.name for a in answers for s in a.list_services_response.service}
    assert set(SERVICE_NAMES) <= listed
    assert "grpc.health.v1.Health" in listed


def test_sigterm_drains_in_flight_calls(served: tuple[subprocess.Popen[str], str],
                                       database_url: str) -> None:
    proc, target = served
    with grpc.insecure_channel(target) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        pos = transaction_pb2_grpc.TransactionServiceStub(channel)
        opened = accounts.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=builders.rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
            holder=account_pb2.Holder(name="drain")))
        issued = accounts.IssueCard(account_pb2.IssueCardRequest(
            request_id=builders.rid(), account_id=opened.account.account_id))
        card = builders.FundedCard(opened.account.account_id, issued.card.card_id,
                                   issued.card_number)
        logscan.register("card number", issued.card_number)
        with psycopg.connect(database_url, autocommit=True) as conn:
            key = conn.execute("SELECT id FROM fc.accounts WHERE uid = %s",
                               (card.account_id,)).fetchone()
            assert key is not None
            # Hold the account's lock so the authorize is stuck in flight.
            conn.execute("SELECT pg_advisory_lock(%s)", (key[0],))
            result: dict[str, object] = {}

            def call() -> None:
                try:
                    result["answer"] = pos.Authorize(builders.authorize_request(card, 100),
                                                     timeout=30)
                except grpc.RpcError as exc:
                    result["error"] = exc

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)
            assert caller.is_alive(), "the call should be waiting on the lock"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None, "the server must wait for the in-flight call"
            conn.execute("SELECT pg_advisory_unlock(%s)", (key[0],))
            caller.join(timeout=30)
    assert "error" not in result, result
    answer = result["answer"]
    assert isinstance(answer, transaction_pb2.AuthorizeResponse)
    assert answer.decision == common_pb2.DECISION_DECLINED  # no money on the card
    assert proc.wait(timeout=30) == 0


def test_bad_setting_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    res = subprocess.run([FUELCARD, "serve", "--listen", "nonsense", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert res.returncode == 2
    assert "listen" in res.stderr and "HOST:PORT" in res.stderr


def test_migrate_is_idempotent(database_url: str, tmp_path: Path) -> None:
    res = subprocess.run([FUELCARD, "migrate", "--database-url", database_url,
                          "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout


def test_embedded_database_needs_no_setup(tmp_path: Path) -> None:
    """No URL: the command starts its own PostgreSQL, migrates, and stops it."""
    data = tmp_path / "data"
    res = subprocess.run([FUELCARD, "migrate", "--data-dir", str(data)],
                         capture_output=True, text=True, env=_env(), timeout=180)
    assert res.returncode == 0, res.stderr
    assert "0001_baseline" in res.stdout
    res = subprocess.run([FUELCARD, "verify", "--data-dir", str(data)],
                         capture_output=True, text=True, env=_env(), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "invariants hold" in res.stdout
    assert not (data / "postgres" / "pgdata" / "postmaster.pid").exists(), "left running"


def test_server_fixture_and_cli_agree_on_card_lookup(server: RunningServer) -> None:
    # The test key makes card numbers issued in one process findable in another.
    card = builders.open_card(server, balance_fen=100)
    assert builders.balance(server, card).balance.balance_fen == 100


def test_tls_is_the_default_and_needs_certificates(tmp_path: Path, database_url: str) -> None:
    res = subprocess.run([FUELCARD, "serve", "--listen", "127.0.0.1:0", "--database-url",
                          database_url, "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert res.returncode == 2, res.stderr
    assert "fuelcard certs" in res.stderr and "--insecure" in res.stderr


def _run_demo(database_url: str, data: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    """`fuelcard serve --demo --tls` as scripts/demo runs it, until it has
    printed what to try; returns the process and the lines it printed."""
    proc = subprocess.Popen(
        [FUELCARD, "serve", "--demo", "--tls", "--data-dir", str(data), "--database-url",
         database_url, "--listen", f"127.0.0.1:{port}", "--log-level", "WARNING"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not lines or "Ctrl-C" not in lines[-1]:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the demo did not come up: {''.join(lines)} {proc.communicate(timeout=30)[1]}")
        lines.append(line)
    return proc, lines


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]  # also closes the pipes
    assert proc.returncode == 0, err


def test_the_demo_serves_cards_a_terminal_can_pay_with_and_restarts_unchanged(
        database_url: str, tmp_path: Path) -> None:
    """README's first command: the demo prints cards and the POS commands to
    try, over mutual TLS; the printed commands work as printed; running the
    demo again on the same data neither fails nor tops the cards up again."""
    from fuelcard_loadtest.server import free_port

    data = tmp_path / "data"
    port = free_port()
    proc, lines = _run_demo(database_url, data, port)
    try:
        cards = [line.split()[1] for line in lines if line.strip().startswith("card ")]
        assert len(cards) == 3, lines
        tries = [line.strip() for line in lines if line.strip().startswith(".venv/bin/fuelcard-pos")]
        balance_cmd, authorize_cmd = tries
        pos = str(Path(sys.executable).parent / "fuelcard-pos")
        before = subprocess.run([pos, *balance_cmd.split()[1:]], capture_output=True, text=True,
                                timeout=60)
        assert before.returncode == 0, before.stderr
        assert "available  800.00 CNY" in before.stdout, before.stdout
        paid = subprocess.run([pos, *authorize_cmd.split()[1:]], capture_output=True, text=True,
                              timeout=60)
        assert paid.returncode == 0 and "APPROVED" in paid.stdout, paid.stdout + paid.stderr
    finally:
        _stop(proc)

    proc, again = _run_demo(database_url, data, port)
    try:
        assert [line.split()[1] for line in again if line.strip().startswith("card ")] == cards
        after = subprocess.run([pos, *balance_cmd.split()[1:]], capture_output=True, text=True,
                               timeout=60)
        assert after.returncode == 0, after.stderr
        # the 200.00 hold still stands; no second top-up
        assert "balance    800.00 CNY" in after.stdout and "available  600.00 CNY" in after.stdout, \
            after.stdout
    finally:
        _stop(proc)
