"""Load run of the notification service: signed WeChat Pay and Alipay
notifications, a share of them duplicates, at a fixed rate.

    python -m fuelcard_loadtest.notify_bench [--rate 350] [--duration-s 30]
        [--duplicates 0.2] [--data-dir DIR] [--core-workers 1]

Everything runs on 127.0.0.1 and stops at the end: a core (`fuelcard serve`
with mutual TLS, development certificates made here, the embedded
PostgreSQL in --data-dir), the notification service (`fuelcard-adapters
serve`, its own process, configured as an operator would), and this
generator playing the two channels: WeChat Pay API v3 notifications
(RSA-signed headers, AES-256-GCM resource) and Alipay async notifications
(RSA2 form), each for a fresh payment to one of --accounts accounts, plus
--duplicates of re-notifications of payments already sent (fresh id, time
and signature, as a channel retries). All of them are signed before the
clock starts, so the run measures the service, not the signing.

Open loop: notification i is due at start + i/rate whatever happened to the
others, and its latency is counted from when it was due (a slow service
cannot hide its queue). Then, as the channels do, every notification not
taken is sent again (freshly signed, a few rounds). Reported: achieved rate,
p50/p99/max latency, answers not taken and retried, CPU per notification of
each process and how busy the machine was with other work, the service's RSS
each second (flat memory), and the ledger: every payment credited exactly
once (count and sum of fc.recharges per channel = the unique payments sent).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psycopg
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fuelcard.v1 import account_pb2, account_pb2_grpc, security_pb2, security_pb2_grpc
from fuelcard_adapters import cli as adapters_cli
from fuelcard_adapters.framework import HttpRequest
from fuelcard_adapters.neutral import format_yuan
from fuelcard_adapters.signing import sorted_pairs
from fuelcard_server.certs import DevPki
from fuelcard_server.embedded import EmbeddedPostgres
from fuelcard_server.identity import Role

from fuelcard_loadtest.server import (
    cpu_seconds,
    free_port,
    listening_sockets,
    machine_cpu,
    postmaster_pid,
    rss_mb,
    tree,
)

WECHAT, ALIPAY = 2, 3  # funding.proto Channel values
SERIAL = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
APP_ID, SELLER_ID = "2021000000000001", "2088101117955611"
MAX_RATE, MAX_DURATION_S = 2_000, 300  # bounds: this is a local bench, not a flood tool


def _pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _sign(key: rsa.RSAPrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data, padding.PKCS1v15(), hashes.SHA256())).decode()


@dataclass
class Channels:
    """The two channels' keys (made here) and how they notify."""

    wechat_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    alipay_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    apiv3_key: bytes = field(default_factory=lambda: os.urandom(16).hex().encode())

    def wechat(self, txn: str, account: str, fen: int) -> HttpRequest:
        data = {"mchid": "1900000109", "appid": "wx8888888888888888",
                "out_trade_no": f"FC{txn[-20:]}", "transaction_id": txn, "trade_type": "NATIVE",
                "trade_state": "SUCCESS", "attach": account,
                "amount": {"total": fen, "payer_total": fen, "currency": "CNY"}}
        nonce = secrets.token_hex(6)
        sealed = AESGCM(self.apiv3_key).encrypt(nonce.encode(), json.dumps(data).encode(),
                                                b"transaction")
        body = json.dumps({
            "id": str(uuid.uuid4()), "event_type": "TRANSACTION.SUCCESS",
            "resource_type": "encrypt-resource",
            "resource": {"original_type": "transaction", "algorithm": "AEAD_AES_256_GCM",
                         "ciphertext": base64.b64encode(sealed).decode(),
                         "associated_data": "transaction", "nonce": nonce}}).encode()
        ts, header_nonce = str(int(time.time())), secrets.token_hex(16)
        signature = _sign(self.wechat_key, f"{ts}\n{header_nonce}\n".encode() + body + b"\n")
        return HttpRequest(body, {"content-type": "application/json", "wechatpay-timestamp": ts,
                                  "wechatpay-nonce": header_nonce, "wechatpay-serial": SERIAL,
                                  "wechatpay-signature": signature})

    def alipay(self, trade_no: str, account: str, fen: int) -> HttpRequest:
        params = {"notify_type": "trade_status_sync", "notify_id": uuid.uuid4().hex,
                  "notify_time": time.strftime("%Y-%m-%d %H:%M:%S"), "app_id": APP_ID,
                  "charset": "utf-8", "version": "1.0", "sign_type": "RSA2",
                  "trade_no": trade_no, "out_trade_no": f"FC{trade_no[-20:]}",
                  "trade_status": "TRADE_SUCCESS", "total_amount": format_yuan(fen),
                  "passback_params": account, "seller_id": SELLER_ID}
        params["sign"] = _sign(self.alipay_key, sorted_pairs(params, exclude=("sign", "sign_type")))
        return HttpRequest(urllib.parse.urlencode(params).encode(),
                           {"content-type": "application/x-www-form-urlencoded; charset=utf-8"})


@dataclass
class Planned:
    path: str
    request: HttpRequest
    channel: int
    txn: str
    fen: int
    duplicate: bool
    account: str


def plan(channels: Channels, accounts: list[str], total: int, duplicates: float,
         rng: random.Random) -> list[Planned]:
    """`total` notifications: fresh payments, and re-notifications of one of
    the last few hundred payments (a channel's retries come soon after)."""
    out: list[Planned] = []
    sent: list[tuple[int, str, str, int]] = []
    for i in range(total):
        if sent and rng.random() < duplicates:
            channel, txn, account, fen = sent[rng.randrange(max(0, len(sent) - 300), len(sent))]
            dup = True
        else:
            channel = WECHAT if i % 2 == 0 else ALIPAY
            txn = (f"4200{uuid.uuid4().int % 10**24:024d}" if channel == WECHAT
                   else f"2026120622001{uuid.uuid4().int % 10**15:015d}")
            account, fen, dup = rng.choice(accounts), rng.randrange(100, 50_000), False
            sent.append((channel, txn, account, fen))
        request = (channels.wechat(txn, account, fen) if channel == WECHAT
                   else channels.alipay(txn, account, fen))
        out.append(Planned("/notify/wechat" if channel == WECHAT else "/notify/alipay", request,
                           channel, txn, fen, dup, account))
    return out


def _wait(check: Any, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def _fire(base_url: str, planned: list[Planned], rate: float, service_pid: int
                ) -> tuple[list[float], list[bool], list[float], float]:
    latencies = [0.0] * len(planned)
    taken = [False] * len(planned)
    rss: list[float] = []
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2

        async def one(i: int, p: Planned) -> None:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                async with session.post(base_url + p.path, data=p.request.body,
                                        headers=dict(p.request.headers)) as resp:
                    body = await resp.read()
                    ok = resp.status in (200, 204) and (p.channel == WECHAT or body == b"success")
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies[i] = (loop.time() - due) * 1000
            taken[i] = ok

        async def sample_rss() -> None:
            while True:
                rss.append(rss_mb(service_pid))
                await asyncio.sleep(1.0)

        sampler = asyncio.ensure_future(sample_rss())
        await asyncio.gather(*(one(i, p) for i, p in enumerate(planned)))
        elapsed = loop.time() - start
        sampler.cancel()
        rss.append(rss_mb(service_pid))
    return latencies, taken, rss, elapsed


async def _retry(base_url: str, channels: Channels, missed: list[Planned], rounds: int = 5
                 ) -> tuple[int, int]:
    """What a channel does with a notification not taken: notify again
    (freshly signed), a few rounds, 32 at a time. (sent, still not taken)"""
    sent = 0
    limit = asyncio.Semaphore(32)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for _ in range(rounds):
            if not missed:
                break
            await asyncio.sleep(1.0)

            async def again(p: Planned) -> bool:
                request = (channels.wechat(p.txn, p.account, p.fen) if p.channel == WECHAT
                           else channels.alipay(p.txn, p.account, p.fen))
                async with limit:
                    try:
                        async with session.post(base_url + p.path, data=request.body,
                                                headers=dict(request.headers)) as resp:
                            body = await resp.read()
                            return resp.status in (200, 204) and (
                                p.channel == WECHAT or body == b"success")
                    except (aiohttp.ClientError, TimeoutError):
                        return False

            sent += len(missed)
            results = await asyncio.gather(*(again(p) for p in missed))
            missed = [p for p, ok in zip(missed, results, strict=True) if not ok]
    return sent, len(missed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rate = min(float(args.rate), MAX_RATE)
    duration = min(float(args.duration_s), MAX_DURATION_S)
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="notify-bench-"))
    certs = data / "certs"
    pki = DevPki(certs)
    pki.ensure_ca()
    pki.server()
    pki.client(Role.ADAPTER, "wechat-gw", "WECHAT_PAY")
    pki.client(Role.ADAPTER, "alipay-gw", "ALIPAY")
    pki.client(Role.ADMIN, "bench")
    core_port, edge_port = free_port(), free_port()
    core: subprocess.Popen[bytes] | None = None
    edge: subprocess.Popen[bytes] | None = None
    log = open(data / "bench.log", "ab")  # noqa: SIM115 - open for both subprocesses' lifetime
    try:
        env = {k: v for k, v in os.environ.items() if k != "FUELCARD_DATABASE_URL"}
        core = subprocess.Popen(
            [sys.executable, "-m", "fuelcard_server.cli", "serve", "--listen",
             f"127.0.0.1:{core_port}", "--data-dir", str(data), "--tls-dir", str(certs),
             "--workers", str(args.core_workers)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        _wait(lambda: listening_sockets(core_port) >= args.core_workers, core, "fuelcard serve")
        creds = grpc.ssl_channel_credentials(
            root_certificates=(certs / "ca.pem").read_bytes(),
            private_key=(certs / "admin-bench.key").read_bytes(),
            certificate_chain=(certs / "admin-bench.pem").read_bytes())
        channels = Channels()
        keys = data / "keys"
        keys.mkdir(exist_ok=True)
        (keys / "wechatpay-platform.pem").write_bytes(_pem(channels.wechat_key.public_key()))
        (keys / "wechat-apiv3.txt").write_bytes(channels.apiv3_key)
        (keys / "alipay-public.pem").write_bytes(_pem(channels.alipay_key.public_key()))
        with grpc.secure_channel(f"127.0.0.1:{core_port}", creds) as admin_channel:
            admin = security_pb2_grpc.SecurityServiceStub(admin_channel)
            for name, channel in (("wechat", WECHAT), ("alipay", ALIPAY)):
                key_file = keys / f"{name}-adapter.json"
                key_file.unlink(missing_ok=True)
                key = adapters_cli.write_signing_key(key_file)
                admin.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
                    channel=channel, public_key_hex=key.public_hex),  # type: ignore[arg-type]
                    timeout=30, wait_for_ready=True)
            open_account = account_pb2_grpc.AccountServiceStub(admin_channel).OpenAccount
            accounts = [open_account(account_pb2.OpenAccountRequest(
                request_id=f"bench-{uuid.uuid4().hex[:16]}",
                type=account_pb2.ACCOUNT_TYPE_CORPORATE,
                holder=account_pb2.Holder(name=f"压测{i}")), timeout=30).account.account_id
                for i in range(args.accounts)]
        config = data / "notify.toml"
        config.write_text(
            f'[core]\ntarget = "127.0.0.1:{core_port}"\nca = "certs/ca.pem"\n\n'
            '[channels.wechat]\ncert = "certs/adapter-wechat-gw.pem"\n'
            'key = "certs/adapter-wechat-gw.key"\nsigning_key = "keys/wechat-adapter.json"\n'
            'apiv3_key = "keys/wechat-apiv3.txt"\n'
            f'platform_keys = {{ "{SERIAL}" = "keys/wechatpay-platform.pem" }}\n\n'
            '[channels.alipay]\ncert = "certs/adapter-alipay-gw.pem"\n'
            'key = "certs/adapter-alipay-gw.key"\nsigning_key = "keys/alipay-adapter.json"\n'
            f'app_id = "{APP_ID}"\nseller_id = "{SELLER_ID}"\n'
            'alipay_public_key = "keys/alipay-public.pem"\n')
        edge = subprocess.Popen(
            [sys.executable, "-m", "fuelcard_adapters.cli", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{edge_port}", "--log-level", "WARNING",
             "--core-client", args.core_client],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait(lambda: listening_sockets(edge_port) >= 1, edge, "fuelcard-adapters serve")
        total = int(rate * duration)
        warmup = int(rate * min(args.warmup_s, duration))
        print(f"signing {warmup} + {total} notifications ...", file=sys.stderr)
        rng = random.Random(args.seed)
        warm = plan(channels, accounts, warmup, args.duplicates, rng)
        planned = plan(channels, accounts, total, args.duplicates, rng)
        base_url = f"http://127.0.0.1:{edge_port}"
        # A warm-up at the same rate first (connections opened, the core's
        # pool and caches filled); its notifications count in the ledger
        # check, not in the latencies.
        _lat, warm_taken, _rss, _elapsed = asyncio.run(_fire(base_url, warm, rate, edge.pid))
        print(f"sending at {rate:.0f}/s for {duration:.0f} s ...", file=sys.stderr)
        edge_pids, core_pids = tree(edge.pid), tree(core.pid)
        pg_pid = postmaster_pid(EmbeddedPostgres(data / "postgres"))
        pg_pids = tree(pg_pid) if pg_pid else []
        groups = (edge_pids, core_pids, pg_pids, [os.getpid()])
        busy_before = machine_cpu()
        cpu_before = [cpu_seconds(p) for p in groups]
        latencies, taken, rss, elapsed = asyncio.run(_fire(base_url, planned, rate, edge.pid))
        cpu_after = [cpu_seconds(p) for p in groups]
        busy_after = machine_cpu()
        # How busy the whole machine was (other work included): the figures
        # mean little on a machine that was not ours.
        machine_busy = (busy_after[0] - busy_before[0]) / max(1.0, busy_after[2] - busy_before[2])
        ours_s = sum(a - b for a, b in zip(cpu_after, cpu_before, strict=True))
        ncpu = os.cpu_count() or 1
        cpu_us = [round((a - b) / total * 1e6) for a, b in zip(cpu_after, cpu_before, strict=True)]
        everything = [*warm, *planned]
        taken = [*warm_taken, *taken]
        # Then the channels' retries of whatever was not taken (answered
        # "retry", or too late): nothing may be lost, nothing credited twice.
        retried, lost = asyncio.run(_retry(
            base_url, channels, [p for p, ok in zip(everything, taken, strict=True) if not ok]))
        unique = {(p.channel, p.txn): p.fen for p in everything if not p.duplicate}
        with psycopg.connect(EmbeddedPostgres(data / "postgres").url()) as db:
            rows = db.execute(
                "SELECT channel, count(*), count(DISTINCT channel_txn_id), sum(amount_fen)"
                " FROM fc.recharges WHERE channel IN (%s, %s) GROUP BY channel",
                (WECHAT, ALIPAY)).fetchall()
        booked = {int(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}
        expected = {ch: (sum(1 for c, _t in unique if c == ch),
                         sum(f for (c, _t), f in unique.items() if c == ch))
                    for ch in (WECHAT, ALIPAY)}
        exactly_once = all(booked.get(ch, (0, 0, 0)) == (n, n, s)
                           for ch, (n, s) in expected.items())
        ordered = sorted(latencies)
        return {
            "notifications": total, "warmup_notifications": warmup,
            "core_client": args.core_client,
            "duplicates": sum(p.duplicate for p in planned),
            "unique_payments": len(unique), "target_rate": rate,
            "achieved_rate": round(total / elapsed, 1),
            "p50_ms": round(_percentile(ordered, 0.50), 1),
            "p99_ms": round(_percentile(ordered, 0.99), 1),
            "max_ms": round(ordered[-1], 1) if ordered else 0.0,
            "not_taken": taken.count(False),
            "retried": retried, "still_not_taken_after_retries": lost,
            "cpu_us_per_notification": {"service": cpu_us[0], "core": cpu_us[1],
                                        "postgres": cpu_us[2], "generator": cpu_us[3]},
            "machine_busy": round(machine_busy, 2),
            "others_busy_cpus": round(max(0.0, machine_busy * ncpu - ours_s / elapsed), 2),
            "load_average": os.getloadavg()[0],
            "service_rss_mb": {"first": round(rss[0], 1), "last": round(rss[-1], 1),
                               "max": round(max(rss), 1)},
            "booked": {("WECHAT_PAY" if ch == WECHAT else "ALIPAY"): v
                       for ch, v in booked.items()},
            "credited_exactly_once": exactly_once,
        }
    finally:
        _stop(edge)
        _stop(core)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuelcard_loadtest.notify_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=350.0, help=f"notifications/s (max {MAX_RATE})")
    p.add_argument("--duration-s", type=float, default=30.0, help=f"max {MAX_DURATION_S}")
    p.add_argument("--duplicates", type=float, default=0.2, help="share of re-notifications")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--core-client", choices=("asyncio", "blocking"), default="asyncio",
                   help="the service's core client (fuelcard-adapters serve --core-client)")
    p.add_argument("--accounts", type=int, default=200)
    p.add_argument("--core-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--data-dir", help="where the core's database and certificates go")
    args = p.parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    ok = result["credited_exactly_once"] and result["still_not_taken_after_retries"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
