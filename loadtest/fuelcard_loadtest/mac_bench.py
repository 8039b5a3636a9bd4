"""What terminal MACs cost on the authorize/confirm path (issue #5).

Starts `fuelcard serve` over mutual TLS (a development PKI made here, one
client certificate per terminal) with FUELCARD_REQUIRE_MAC=false, so the same
server takes both kinds of request; opens one funded card per terminal
through the API; signs every terminal on for its working key; then drives
closed-loop pump cycles (Authorize, then Confirm of the hold) from every
terminal at once, alternating runs:

  MAC on:  key_version + a fresh terminal_counter + HMAC-SM3 under the
           per-transaction session key (SM3-KDF), verified by the server,
           which also advances the terminal's counter in the same statement;
  MAC off: the same requests without them.

Each terminal has one request in flight at a time (counters must rise).
Reports RPC/s (authorize + confirm) per run, and the CPU the server processes
and PostgreSQL spent per RPC (from /proc: steadier than throughput on a
shared, loaded machine); the median of each mode and the ratios. The
generator runs on the same machine as the server and PostgreSQL.

    .venv/bin/python -m fuelcard_loadtest.mac_bench [--terminals 32] [--seconds 20]
        [--rounds 3] [--workers 2] [--data-dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server import keys
from fuelcard_server.certs import DevPki
from fuelcard_server.embedded import EmbeddedPostgres
from fuelcard_server.identity import Role

from fuelcard_loadtest.server import cpu_seconds, free_port, postmaster_pid, tree

STATION = "MB-1"
AUTHORIZE_FEN = 100
CONFIRM_FEN = 80
OPENING_FEN = 1_000_000  # below the step-up threshold for recharges


@dataclass
class Terminal:
    name: str
    pos: transaction_pb2_grpc.TransactionServiceAsyncStub
    working: keys.WorkingKey
    counter: itertools.count[int]
    card_number: str

    def mac(self, counter: int, *fields: bytes | str | int) -> bytes:
        return keys.mac(keys.session_key(self.working, counter), keys.canonical(*fields))

    def authorize(self, with_mac: bool) -> transaction_pb2.AuthorizeRequest:
        req = transaction_pb2.AuthorizeRequest(
            request_id=uuid.uuid4().hex, card_number=self.card_number, amount_fen=AUTHORIZE_FEN,
            station_id=STATION, terminal_id=self.name, nozzle=1,
            product=common_pb2.PRODUCT_GASOLINE_92)
        if with_mac:
            req.key_version = self.working.version
            req.terminal_counter = next(self.counter)
            req.mac = self.mac(req.terminal_counter, "Authorize", req.request_id, req.card_number,
                               req.amount_fen, req.station_id, req.terminal_id, req.nozzle,
                               req.product, req.key_version, req.terminal_counter, req.pin_block)
        return req

    def confirm(self, hold_id: str, with_mac: bool) -> transaction_pb2.ConfirmRequest:
        req = transaction_pb2.ConfirmRequest(
            request_id=uuid.uuid4().hex, hold_id=hold_id, final_amount_fen=CONFIRM_FEN,
            volume_ml=100, unit_price_fen=800)
        if with_mac:
            req.key_version = self.working.version
            req.terminal_counter = next(self.counter)
            req.mac = self.mac(req.terminal_counter, "Confirm", req.request_id, req.hold_id,
                               req.final_amount_fen, req.volume_ml, req.unit_price_fen,
                               req.key_version, req.terminal_counter)
        return req


def _credentials(certs: Path, stem: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / f"{stem}.key").read_bytes(),
        certificate_chain=(certs / f"{stem}.pem").read_bytes())


def make_pki(certs: Path, terminals: int) -> list[str]:
    pki = DevPki(certs)
    pki.server()
    pki.client(Role.ADMIN, "bench")
    names = [f"{STATION}-T{i:03d}" for i in range(terminals)]
    for name in names:
        pki.client(Role.POS, name, STATION)
    return names


def start_server(data: Path, certs: Path, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    port_file = data / "mac-bench.port"
    port_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "FUELCARD_DATABASE_URL"}
    env["FUELCARD_REQUIRE_MAC"] = "false"  # both kinds of request on one server
    log = (data / "mac-bench-serve.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuelcard_server.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(data), "--tls-dir", str(certs), "--workers", str(workers),
         "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"fuelcard serve did not start; see {data / 'mac-bench-serve.log'}")
        time.sleep(0.1)
    time.sleep(1.0)  # every worker bound
    return proc, port


async def prepare(target: str, certs: Path, names: Sequence[str]
                  ) -> tuple[list[Terminal], list[grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []
    admin = grpc.aio.secure_channel(target, _credentials(certs, "admin-bench"))
    channels.append(admin)
    accounts = account_pb2_grpc.AccountServiceStub(admin)
    funding = funding_pb2_grpc.FundingServiceStub(admin)
    terminals = []
    for name in names:
        opened = await accounts.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=uuid.uuid4().hex, type=account_pb2.ACCOUNT_TYPE_PERSONAL,
            holder=account_pb2.Holder(name=f"bench {name}")))
        account_id = opened.account.account_id
        issued = await accounts.IssueCard(account_pb2.IssueCardRequest(
            request_id=uuid.uuid4().hex, account_id=account_id))
        await funding.Recharge(funding_pb2.RechargeRequest(
            request_id=uuid.uuid4().hex, account_id=account_id,
            channel=funding_pb2.CHANNEL_COUNTER, channel_txn_id=f"mb-{uuid.uuid4().hex}",
            amount_fen=OPENING_FEN))
        channel = grpc.aio.secure_channel(target, _credentials(certs, f"pos-{name}"))
        channels.append(channel)
        answer = await security_pb2_grpc.SecurityServiceStub(channel).SignOn(
            security_pb2.SignOnRequest(terminal_id=name))
        working = keys.WorkingKey(name, answer.key_version, answer.valid_from.ToDatetime(dt.UTC),
                                  answer.valid_until.ToDatetime(dt.UTC), answer.working_key)
        terminals.append(Terminal(name, transaction_pb2_grpc.TransactionServiceStub(channel),
                                  working, itertools.count(answer.last_counter + 1),
                                  issued.card_number))
    return terminals, channels


@dataclass
class Processes:
    server_pid: int
    postgres: EmbeddedPostgres

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of (the server's processes, PostgreSQL's)."""
        pg = postmaster_pid(self.postgres)
        return (cpu_seconds(tree(self.server_pid)),
                cpu_seconds(tree(pg)) if pg is not None else 0.0)


async def run(terminals: Sequence[Terminal], with_mac: bool, seconds: float,
              procs: Processes | None = None) -> dict[str, Any]:
    """Closed-loop pump cycles from every terminal for `seconds`."""
    stop_at = time.monotonic() + seconds
    cycles = [0] * len(terminals)
    errors: dict[str, int] = {}

    async def loop(k: int, t: Terminal) -> None:
        while time.monotonic() < stop_at:
            try:
                auth = await t.pos.Authorize(t.authorize(with_mac), timeout=30)
                if auth.decision != common_pb2.DECISION_APPROVED:
                    errors["declined"] = errors.get("declined", 0) + 1
                    continue
                await t.pos.Confirm(t.confirm(auth.hold.hold_id, with_mac), timeout=30)
                cycles[k] += 1
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    cpu0 = procs.cpu() if procs else (0.0, 0.0)
    started = time.monotonic()
    await asyncio.gather(*(loop(k, t) for k, t in enumerate(terminals)))
    elapsed = time.monotonic() - started
    cpu1 = procs.cpu() if procs else (0.0, 0.0)
    rpcs = max(1, 2 * sum(cycles))
    return {"mac": with_mac, "seconds": round(elapsed, 2), "cycles": sum(cycles),
            "rpc_per_s": round(2 * sum(cycles) / elapsed, 1),
            "server_cpu_us_per_rpc": round(1e6 * (cpu1[0] - cpu0[0]) / rpcs, 1),
            "postgres_cpu_us_per_rpc": round(1e6 * (cpu1[1] - cpu0[1]) / rpcs, 1),
            "errors": errors}


async def bench(target: str, certs: Path, names: Sequence[str], seconds: float, rounds: int,
                warmup_s: float, procs: Processes) -> dict[str, Any]:
    terminals, channels = await prepare(target, certs, names)
    try:
        await run(terminals, True, warmup_s)
        await run(terminals, False, warmup_s)
        runs = []
        for r in range(rounds):
            # alternate which mode goes first, so drift does not favour one
            order = (True, False) if r % 2 == 0 else (False, True)
            for with_mac in order:
                result = await run(terminals, with_mac, seconds, procs)
                print(json.dumps(result), flush=True)
                runs.append(result)
    finally:
        for ch in channels:
            await ch.close(None)
    def median(key: str, mac: bool) -> float:
        return float(statistics.median(r[key] for r in runs if r["mac"] is mac))

    on, off = median("rpc_per_s", True), median("rpc_per_s", False)
    summary: dict[str, Any] = {
        "terminals": len(names), "seconds_per_run": seconds, "rounds": rounds,
        "median_rpc_per_s_mac_on": on, "median_rpc_per_s_mac_off": off,
        "ratio_on_over_off": round(on / off, 3), "loss_pct": round(100 * (1 - on / off), 1)}
    for key in ("server_cpu_us_per_rpc", "postgres_cpu_us_per_rpc"):
        summary[f"median_{key}_mac_on"] = median(key, True)
        summary[f"median_{key}_mac_off"] = median(key, False)
    # Each round's two runs ran back to back: their ratio cancels drift in
    # what else the machine is doing; the median of those ratios.
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
    ratios = [(a if a["mac"] else b)["rpc_per_s"] / (b if a["mac"] else a)["rpc_per_s"]
              for a, b in pairs]
    summary["median_round_ratio_on_over_off"] = round(statistics.median(ratios), 3)
    cpu = [((a if a["mac"] else b), (b if a["mac"] else a)) for a, b in pairs]
    summary["median_round_ratio_cpu_per_rpc_on_over_off"] = round(statistics.median(
        (on_["server_cpu_us_per_rpc"] + on_["postgres_cpu_us_per_rpc"])
        / (off_["server_cpu_us_per_rpc"] + off_["postgres_cpu_us_per_rpc"])
        for on_, off_ in cpu), 3)
    summary["runs"] = runs
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fuelcard_loadtest.mac_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--terminals", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0, help="per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of each mode (median)")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="server processes")
    p.add_argument("--data-dir", type=Path, help="default: a temporary directory, removed after")
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args(argv)
    if not (1 <= args.terminals <= 500 and args.rounds >= 1 and args.seconds > 0):
        p.error("need 1..500 terminals, rounds >= 1, seconds > 0")
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="fuelcard-mac-bench-"))
    certs = data / "bench-certs"
    names = make_pki(certs, args.terminals)
    proc, port = start_server(data, certs, args.workers)
    try:
        procs = Processes(proc.pid, EmbeddedPostgres(data / "postgres"))
        summary = asyncio.run(bench(f"127.0.0.1:{port}", certs, names, args.seconds, args.rounds,
                                    args.warmup_s, procs))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        if args.data_dir is None:
            shutil.rmtree(data, ignore_errors=True)
    summary["workers"] = args.workers
    summary["load_avg"] = os.getloadavg()
    text = json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
