"""`fuelcard serve --workers 2` as an operator runs it: two processes share
the port (SO_REUSEPORT), each with its own pool and metrics endpoint
(--metrics-listen PORT, PORT+1); SIGTERM drains the calls in flight in both
before the command exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, account_pb2_grpc, common_pb2, transaction_pb2_grpc
from fuelcard_loadtest.server import free_port, listening_sockets

from tests.plugins.server import TEST_KEY_HEX
from tests.support import builders

FUELCARD = str(Path(sys.executable).parent / "fuelcard")


def _authorize_count(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("fuelcard_rpc_latency_ms_count{") and "Authorize" in line \
                and 'status_code="OK"' in line:
            return int(line.rsplit(" ", 1)[1])
    return 0


def _blocked_by_worker(conn: psycopg.Connection[tuple[object, ...]]) -> set[str]:
    rows = conn.execute("SELECT application_name FROM pg_stat_activity WHERE datname ="
                        " current_database() AND wait_event_type = 'Lock'").fetchall()
    return {str(r[0]) for r in rows}


def test_two_workers_share_the_port_and_both_drain_on_sigterm(
        database_url: str, tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    while metrics + 1 == port or not _free(metrics + 1):
        metrics = free_port()
    env = {**os.environ, "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX}
    proc = subprocess.Popen(
        [FUELCARD, "serve", "--insecure", "--workers", "2", "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", f"127.0.0.1:{metrics}", "--database-url", database_url,
         "--data-dir", str(tmp_path), "--log-level", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while listening_sockets(port) < 2 or listening_sockets(metrics + 1) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                # a worker that died leaves the command waiting on the other
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"the workers did not start: {proc.communicate(timeout=30)[1]}")
            time.sleep(0.1)
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as channel:
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            opened = accounts.OpenAccount(account_pb2.OpenAccountRequest(
                request_id=builders.rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                holder=account_pb2.Holder(name="workers")))
            issued = accounts.IssueCard(account_pb2.IssueCardRequest(
                request_id=builders.rid(), account_id=opened.account.account_id))
        card = builders.FundedCard(opened.account.account_id, issued.card.card_id,
                                   issued.card_number)
        # Connections spread over both workers: each serves some of 16.
        for _ in range(16):
            with grpc.insecure_channel(target) as channel:
                transaction_pb2_grpc.TransactionServiceStub(channel).Authorize(
                    builders.authorize_request(card, 100), timeout=10)
        served = [_authorize_count(metrics), _authorize_count(metrics + 1)]
        assert sum(served) == 16 and min(served) > 0, served

        # Calls in flight in both workers, held on the account's lock.
        results: list[object] = []
        threads: list[threading.Thread] = []
        channels: list[grpc.Channel] = []

        def call(channel: grpc.Channel) -> None:
            try:
                results.append(transaction_pb2_grpc.TransactionServiceStub(channel).Authorize(
                    builders.authorize_request(card, 100), timeout=60))
            except grpc.RpcError as exc:
                results.append(exc)

        with psycopg.connect(database_url, autocommit=True) as conn:
            row = conn.execute("SELECT id FROM fc.accounts WHERE uid = %s",
                               (card.account_id,)).fetchone()
            assert row is not None
            conn.execute("SELECT pg_advisory_lock(%s)", (row[0],))
            deadline = time.monotonic() + 30
            while _blocked_by_worker(conn) != {"fuelcard-w0", "fuelcard-w1"}:
                assert time.monotonic() < deadline and len(channels) < 40, _blocked_by_worker(conn)
                # a connection of its own (channels share them by default)
                channels.append(grpc.insecure_channel(
                    target, options=[("grpc.use_local_subchannel_pool", 1)]))
                threads.append(threading.Thread(target=call, args=(channels[-1],)))
                threads[-1].start()
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None, "the server must wait for the calls in flight"
            conn.execute("SELECT pg_advisory_unlock(%s)", (row[0],))
        for t in threads:
            t.join(timeout=60)
        for ch in channels:
            ch.close()
        assert len(results) == len(threads)
        for r in results:
            assert not isinstance(r, grpc.RpcError), r
            assert r.decision == common_pb2.DECISION_DECLINED  # type: ignore[attr-defined]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers
        proc.communicate(timeout=30)


def _free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
