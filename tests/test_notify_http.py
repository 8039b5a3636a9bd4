"""Issue 18: the notification service over real HTTP.

The channel simulators sign real requests (keys generated here: RSA for
WeChat Pay, Alipay and UnionPay signMethod 01, SM2 for e-CNY) and POST them
to a running `fuelcard_adapters.http_service` built from a configuration file
as `fuelcard-adapters serve` builds it; the service calls a real core server
over mutual TLS with each channel's adapter certificate, through a TCP proxy
the tests can cut (a core outage)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import random
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import uvloop
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fuelcard.v1 import account_pb2, account_pb2_grpc, security_pb2, security_pb2_grpc
from fuelcard_adapters import alipay, wechat
from fuelcard_adapters import cli as adapters_cli
from fuelcard_adapters.framework import EventKind, HttpReply, HttpRequest, Outcome, Result
from fuelcard_adapters.http_service import DAY_S, NotificationMemory, NotifyService, start
from fuelcard_adapters.neutral import FormatError, Kind, Status
from fuelcard_adapters.signing import Sm2Signer
from fuelcard_loadtest import notify_bench
from fuelcard_server import logs
from fuelcard_server.certs import DevPki
from fuelcard_server.identity import Role

from tests.plugins.proxy import TcpProxy
from tests.plugins.server import TlsServer
from tests.support.channel_simulators import (
    AlipaySim,
    BankCardSim,
    EcnySim,
    Notice,
    Simulator,
    WeChatSim,
    deliver,
    post,
    wall_clock,
)
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, snapshot

T = TypeVar("T")
ROUTE_OF = {"WECHAT_PAY": "wechat", "ALIPAY": "alipay", "BANK_CARD": "unionpay", "ECNY": "ecny"}
CHANNELS = sorted(ROUTE_OF)


def _pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


class ServiceThread:
    """The notification service on its own thread and event loop, as in its
    own process."""

    def __init__(self, service: NotifyService) -> None:
        self.service = service
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="notify-service",
                                        daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> str:
        self._thread.start()
        self._runner, self.port = asyncio.run_coroutine_threadsafe(
            start(self.service, "127.0.0.1", 0), self.loop).result(timeout=30)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@dataclass
class Edge:
    core: TlsServer
    proxy: TcpProxy
    base_url: str
    service: NotifyService
    sims: dict[str, Simulator]
    accounts: account_pb2_grpc.AccountServiceStub

    def open_account(self) -> str:
        req = account_pb2.OpenAccountRequest(
            request_id=f"open-{uuid.uuid4().hex[:16]}", type=account_pb2.ACCOUNT_TYPE_CORPORATE,
            holder=account_pb2.Holder(name="通知测试"))
        account_id: str = self.accounts.OpenAccount(req).account.account_id
        return account_id

    def run(self, fn: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
        """Drive the channels' side (an HTTP client) from the test thread."""
        async def main() -> T:
            async with aiohttp.ClientSession() as session:
                return await fn(session)
        return asyncio.run(main())

    def send(self, sim: Simulator, request: HttpRequest) -> HttpReply:
        return self.run(lambda s: post(s, self.base_url, sim.path, request))


@pytest.fixture(scope="session")
def edge_certs(dev_certs: Path) -> Path:
    pki = DevPki(dev_certs)
    for name in CHANNELS:
        if not (dev_certs / f"adapter-{name.lower()}-gw.pem").exists():
            pki.client(Role.ADAPTER, f"{name.lower()}-gw", name)
    return dev_certs


def write_config(tmp: Path, certs: Path, target: str, sims: dict[str, Any],
                 admin: security_pb2_grpc.SecurityServiceStub) -> Path:
    """The service's configuration and key files, as an operator writes them;
    each adapter's SM2 key registered with the core for its channel."""
    keys = tmp / "keys"
    keys.mkdir()
    wx, ali, up, ecny = sims["WECHAT_PAY"], sims["ALIPAY"], sims["BANK_CARD"], sims["ECNY"]
    (keys / "wechatpay-platform.pem").write_bytes(_pem(wx.key.public))
    (keys / "wechat-apiv3.txt").write_bytes(wx.apiv3_key)
    (keys / "alipay-public.pem").write_bytes(_pem(ali.key.public))
    (keys / "unionpay-sign.pem").write_bytes(_pem(up.key.public))
    (keys / "unionpay-secure-key.txt").write_text(up.secure_key)
    (keys / "unionpay-sm2.hex").write_text(up.sm2_key.public_hex)
    (keys / "ecny-institution.hex").write_text(ecny.key.public_hex)
    sections = {
        "wechat": f'apiv3_key = "keys/wechat-apiv3.txt"\n'
                  f'platform_keys = {{ "{wx.serial}" = "keys/wechatpay-platform.pem" }}\n',
        "alipay": f'app_id = "{ali.app_id}"\nseller_id = "{ali.seller_id}"\n'
                  'alipay_public_key = "keys/alipay-public.pem"\n',
        "unionpay": f'mer_id = "{up.mer_id}"\n'
                    f'certificates = {{ "{up.cert_id}" = "keys/unionpay-sign.pem" }}\n'
                    'secure_key = "keys/unionpay-secure-key.txt"\n'
                    'sm2_public_key = "keys/unionpay-sm2.hex"\n',
        "ecny": 'institution_public_key = "keys/ecny-institution.hex"\n',
    }
    text = f'[core]\ntarget = "{target}"\nca = "{certs / "ca.pem"}"\n'
    for channel, route in ROUTE_OF.items():
        signing = keys / f"{route}-adapter.json"
        key = adapters_cli.write_signing_key(signing)
        admin.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
            channel=sims[channel].channel, public_key_hex=key.public_hex))
        stem = certs / f"adapter-{channel.lower()}-gw"
        text += (f"\n[channels.{route}]\ncert = \"{stem}.pem\"\nkey = \"{stem}.key\"\n"
                 f"signing_key = \"keys/{route}-adapter.json\"\n" + sections[route])
    path = tmp / "notify.toml"
    path.write_text(text)
    return path


@pytest.fixture
def edge(tls_server: TlsServer, edge_certs: Path, tmp_path: Path) -> Iterator[Edge]:
    admin_channel = tls_server.channel("admin-ops")
    admin = security_pb2_grpc.SecurityServiceStub(admin_channel)
    sims: dict[str, Any] = {"WECHAT_PAY": WeChatSim(clock=wall_clock),
                            "ALIPAY": AlipaySim(clock=wall_clock),
                            "BANK_CARD": BankCardSim(clock=wall_clock),
                            "ECNY": EcnySim(clock=wall_clock)}
    with TcpProxy(tls_server.target) as proxy:
        config = write_config(tmp_path, edge_certs, f"127.0.0.1:{proxy.port}", sims, admin)
        routes, channels = adapters_cli.build_routes(config)
        service = NotifyService(routes)
        thread = ServiceThread(service)
        base_url = thread.start()
        try:
            yield Edge(tls_server, proxy, base_url, service, sims,
                       account_pb2_grpc.AccountServiceStub(admin_channel))
        finally:
            thread.stop()
            for ch in channels:
                ch.close()


def recharges(db: Conn, channel: int, txn: str) -> list[int]:
    return [int(r[0]) for r in db.execute(
        "SELECT amount_fen FROM fc.recharges WHERE channel = %s AND channel_txn_id = %s",
        (channel, txn))]


def balance(db: Conn, account_id: str) -> int:
    value: int = account_row(db, account_id)["balance_fen"]
    return value


def is_failure_answer(sim: Simulator, reply: HttpReply) -> bool:
    """The answer the channel reads as "not taken, notify again", in the
    channel's own form."""
    if isinstance(sim, WeChatSim):
        return reply.status >= 400 and json.loads(reply.body)["code"] == "FAIL"
    if isinstance(sim, AlipaySim):
        return reply.body != b"success"
    return not sim.taken(reply)


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_payment_notified_20_times_at_once_credits_once(edge: Edge, db: Conn, channel: str
                                                          ) -> None:
    sim = edge.sims[channel]
    account = edge.open_account()
    paid = sim.pay(account, 12_345)
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    logging.getLogger("fuelcard_adapters").addHandler(handler)
    logging.getLogger("fuelcard_adapters").setLevel(logging.INFO)
    # Twenty at once: the same message and fresh re-notifications (new id,
    # time, nonce and signature), on twenty connections.
    burst = [paid.request if i % 2 else sim.resend(paid) for i in range(20)]

    async def all_at_once(session: aiohttp.ClientSession) -> list[HttpReply]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as many:
            return list(await asyncio.gather(*(post(many, edge.base_url, sim.path, r)
                                               for r in burst)))
    try:
        replies = edge.run(all_at_once)
        # ... and once more later, as the channel's retry would.
        again = edge.send(sim, sim.resend(paid))
    finally:
        logging.getLogger("fuelcard_adapters").removeHandler(handler)
    assert all(sim.taken(r) for r in [*replies, again]), [r.status for r in replies]
    assert recharges(db, sim.channel, paid.txn_id) == [12_345]
    assert balance(db, account) == 12_345
    assert edge.service.counts["accepted"] == 21
    # the service's log lines: the channel and the outcome, not whose money
    text = captured.getvalue()
    assert f"notify {ROUTE_OF[channel]}" in text and "accepted" in text
    assert account not in text and paid.txn_id not in text
    assert_ledger_ok(edge.core.database_url)


def test_bad_signatures_stale_timestamps_and_oversized_bodies_change_nothing(
        edge: Edge, db: Conn) -> None:
    account = edge.open_account()
    before = snapshot(db)
    wx: WeChatSim = edge.sims["WECHAT_PAY"]  # type: ignore[assignment]
    ali: AlipaySim = edge.sims["ALIPAY"]  # type: ignore[assignment]
    up: BankCardSim = edge.sims["BANK_CARD"]  # type: ignore[assignment]
    ecny: EcnySim = edge.sims["ECNY"]  # type: ignore[assignment]
    bad: list[tuple[Simulator, HttpRequest, int]] = []
    for sim in edge.sims.values():
        paid = sim.pay(account, 2_000)
        # the same channel's format, another key
        stranger: Simulator = type(sim)(clock=wall_clock)  # type: ignore[call-arg]
        bad.append((sim, stranger.pay(account, 2_000).request, 0))
        bad.append((sim, sim.forge_amount(paid, 200_000), 0))
        # a genuine notification padded past the 64 KiB limit
        padded = HttpRequest(paid.request.body + b" " * (64 * 1024), paid.request.headers)
        bad.append((sim, padded, 413))
    wx_paid = wx.pay(account, 3_000)
    bad.append((wx, wx.stale(wx_paid, minutes=6), 0))
    bad.append((wx, wx.probe(wx_paid), 0))
    # the other WeChat signature type under the same platform key's serial
    bad.append((wx, WeChatSim(key=Sm2Signer.generate(), apiv3_key=wx.apiv3_key,
                              clock=wall_clock).pay(account, 3_000).request, 0))
    for sim, request, status in bad:
        reply = edge.send(sim, request)
        assert is_failure_answer(sim, reply), (sim.name, reply)
        if status:
            assert reply.status == status, (sim.name, reply.status)
    # WeChat: 4xx and {"code": "FAIL", "message": ...}
    wx_bad = [r for s, r, st in bad if s is wx and not st]
    assert [edge.send(wx, r).status for r in wx_bad] == [400] * len(wx_bad)
    assert edge.service.counts["rejected"] == len(bad) + len(wx_bad)
    assert snapshot(db) == before
    # The genuine ones still go through (UnionPay's secure-key and SM2
    # methods too), once each.
    up12 = BankCardSim(sign_method="12", key=up.key, sm2_key=up.sm2_key,
                       secure_key=up.secure_key, clock=wall_clock)
    up02 = BankCardSim(sign_method="02", key=up.key, sm2_key=up.sm2_key,
                       secure_key=up.secure_key, clock=wall_clock)
    for sim in (wx, ali, up, ecny, up12, up02):
        assert sim.taken(edge.send(sim, sim.pay(account, 1_000).request)), sim.name
    assert balance(db, account) == 6_000


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_refund_before_its_payment_is_retried_until_it_applies(edge: Edge, db: Conn,
                                                                 channel: str) -> None:
    sim = edge.sims[channel]
    account = edge.open_account()
    paid = sim.pay(account, 10_000)
    refund = sim.refund(paid, 2_500)

    async def run(session: aiohttp.ClientSession) -> Any:
        async def pay_meanwhile(attempt: int) -> None:
            if attempt == 2:  # the payment's notification arrives at last
                assert sim.taken(await post(session, edge.base_url, sim.path, paid.request))
        return await deliver(sim, session, edge.base_url, refund, between=pay_meanwhile)

    delivery = edge.run(run)
    assert delivery.taken and delivery.attempts == 3, delivery
    assert all(is_failure_answer(sim, r) for r in delivery.replies[:2])
    assert balance(db, account) == 7_500
    # the refund's duplicates change nothing
    assert sim.taken(edge.send(sim, sim.resend(refund)))
    assert balance(db, account) == 7_500
    assert_ledger_ok(edge.core.database_url)


@pytest.mark.parametrize("channel", ["WECHAT_PAY", "ALIPAY"])
def test_a_core_outage_is_answered_so_the_channel_retries_and_nothing_is_lost(
        edge: Edge, db: Conn, channel: str) -> None:
    sim = edge.sims[channel]
    account = edge.open_account()
    paid = sim.pay(account, 8_800)
    edge.proxy.down()

    async def run(session: aiohttp.ClientSession) -> Any:
        async def core_back(attempt: int) -> None:
            if attempt == 3:
                edge.proxy.up()
        return await deliver(sim, session, edge.base_url, paid, between=core_back, pause_s=0.3)

    delivery = edge.run(run)
    assert delivery.taken, delivery
    first = delivery.replies[0]
    assert is_failure_answer(sim, first)
    if isinstance(sim, WeChatSim):
        assert first.status == 500
    assert recharges(db, sim.channel, paid.txn_id) == [8_800]
    assert balance(db, account) == 8_800
    assert edge.service.counts["retry"] >= 3


def test_the_core_call_joins_the_notifications_trace(edge: Edge) -> None:
    # A reverse proxy (or the channel) sent a traceparent: the core's lines
    # about the recharge carry its trace id.
    wx = edge.sims["WECHAT_PAY"]
    trace_id = next(t for t in (secrets.token_hex(16) for _ in range(100))
                    if not re.search(r"\d{16}", t))
    paid = wx.pay(edge.open_account(), 500)
    headers = {**paid.request.headers,
               "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RpcContext())
    logging.getLogger().addHandler(handler)
    try:
        assert wx.taken(edge.send(wx, HttpRequest(paid.request.body, headers)))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in captured.getvalue().splitlines()
             if "FundingService/Recharge" in line]
    assert lines and all(line.get("trace_id") == trace_id for line in lines), lines


def test_wechat_refund_closed_and_abnormal_are_taken_without_moving_money(
        edge: Edge, db: Conn) -> None:
    wx: WeChatSim = edge.sims["WECHAT_PAY"]  # type: ignore[assignment]
    account = edge.open_account()
    paid = wx.pay(account, 4_000)
    assert wx.taken(edge.send(wx, paid.request))
    after = snapshot(db)
    for status in ("CLOSED", "ABNORMAL"):
        refund: Notice = wx.refund(paid, 1_000)
        data = {**refund.fields, "refund_status": status}
        reply = edge.send(wx, wx._notify(f"REFUND.{status}", "refund", data))
        assert reply.status in (200, 204) and reply.body == b""
    assert snapshot(db) == after


def test_serve_runs_as_its_own_process_over_tls(tls_server: TlsServer, edge_certs: Path,
                                                tmp_path: Path, db: Conn) -> None:
    admin_channel = tls_server.channel("admin-ops")
    sims: dict[str, Any] = {"WECHAT_PAY": WeChatSim(clock=wall_clock),
                            "ALIPAY": AlipaySim(clock=wall_clock),
                            "BANK_CARD": BankCardSim(clock=wall_clock),
                            "ECNY": EcnySim(clock=wall_clock)}
    config = write_config(tmp_path, edge_certs, tls_server.target, sims,
                          security_pb2_grpc.SecurityServiceStub(admin_channel))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fuelcard_adapters.cli", "serve", "--config", str(config),
         "--listen", f"127.0.0.1:{port}", "--tls-cert", str(edge_certs / "server.pem"),
         "--tls-key", str(edge_certs / "server.key")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tls = ssl.create_default_context(cafile=str(edge_certs / "ca.pem"))
    base_url = f"https://localhost:{port}"
    accounts = account_pb2_grpc.AccountServiceStub(admin_channel)
    account = accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=f"open-{uuid.uuid4().hex[:16]}", type=account_pb2.ACCOUNT_TYPE_CORPORATE,
        holder=account_pb2.Holder(name="通知测试"))).account.account_id
    wx, ali = sims["WECHAT_PAY"], sims["ALIPAY"]

    async def run() -> list[HttpReply]:
        connector = aiohttp.TCPConnector(ssl=tls)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(300):  # until it listens (it first asks the core for its key)
                try:
                    async with session.get(base_url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None, "fuelcard-adapters serve exited"
                await asyncio.sleep(0.1)
            return [await post(session, base_url, wx.path, wx.pay(account, 1_500).request),
                    await post(session, base_url, ali.path, ali.pay(account, 2_500).request)]

    try:
        wx_reply, ali_reply = asyncio.run(run())
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert wx.taken(wx_reply) and ali_reply.body == b"success"
    assert balance(db, account) == 4_000
    assert b"notify wechat" in err and account.encode() not in err


def test_the_wechat_trade_bill_is_read_with_its_summary_in_yuan() -> None:
    path = Path(__file__).parent.parent / "docs/examples/settlement-wechat-pay-2026-11-25.csv"
    text = path.read_text(encoding="utf-8-sig")
    records = list(wechat.parse_bill(text.splitlines(keepends=True)))
    assert [(r.kind, r.channel_txn_id, r.amount_fen, r.fee_fen, r.status,
             r.original_channel_txn_id) for r in records] == [
        (Kind.PAYMENT, "4220261125WE00000001", 20_000, 120, Status.SUCCESS, ""),
        (Kind.PAYMENT, "4220261125WE00000002", 12_345, 74, Status.SUCCESS, ""),
        (Kind.PAYMENT, "4220261125WE00000003", 50_000, 300, Status.SUCCESS, ""),
        (Kind.REFUND, "4220261125WE00000004", 2_345, 14, Status.SUCCESS, "4220261125WE00000002"),
        (Kind.PAYMENT, "4220261125WE00000005", 8_800, 0, Status.FAILED, "")]
    assert records[2].time.isoformat() == "2026-11-25T23:59:05+08:00"
    # The summary's totals are checked against the rows: each total altered by
    # one fen is refused, and so is a bill cut before its summary.
    lines = text.splitlines(keepends=True)
    for good, bad in (("`911.45,`23.45", "`911.46,`23.45"), (",`23.45,", ",`23.44,"),
                      ("`4.80", "`4.81"), ("`5,", "`4,")):
        altered = [*lines[:-1], lines[-1].replace(good, bad, 1)]
        assert altered[-1] != lines[-1]
        with pytest.raises(FormatError, match="summary"):
            list(wechat.parse_bill(altered))
    with pytest.raises(FormatError, match="without its summary"):
        list(wechat.parse_bill(lines[:-2]))


def test_the_memory_of_taken_notifications_is_bounded_in_count_and_time() -> None:
    now = [0.0]
    memory = NotificationMemory(ttl_s=DAY_S, capacity=3, clock=lambda: now[0])
    taken = Result(Outcome.ACCEPTED, "APPROVED", 100)
    for key in "abcd":
        memory.put(key, taken)
    assert len(memory) == 3 and memory.get("a") is None  # the oldest forgotten first
    assert memory.get("b") is taken
    now[0] = DAY_S + 1  # the channels have stopped re-notifying by now
    assert memory.get("c") is None and len(memory) == 2


def test_alipay_refund_restating_another_total_is_refused_and_unionpay_a6_is_a_payment(
        edge: Edge, db: Conn) -> None:
    ali: AlipaySim = edge.sims["ALIPAY"]  # type: ignore[assignment]
    up: BankCardSim = edge.sims["BANK_CARD"]  # type: ignore[assignment]
    account = edge.open_account()
    paid = ali.pay(account, 10_000)
    assert ali.taken(edge.send(ali, paid.request))
    # A genuine-looking (signed) partial refund of a trade whose total_amount
    # is not what we booked: not applied, answered "fail".
    refund = ali.refund(paid, 1_000)
    wrong_total = ali._send({**refund.fields, "total_amount": "200.00"})
    assert edge.send(ali, wrong_total).body == b"fail"
    assert edge.service.counts["rejected"] == 1  # refused, not "retry later"
    assert balance(db, account) == 10_000
    assert ali.taken(edge.send(ali, refund.request))
    assert balance(db, account) == 9_000
    # UnionPay respCode A6 (success with a defect): the money moved.
    query_id = "7" + "".join(secrets.choice("0123456789") for _ in range(20))
    params = {**up._params("01", 3_300, query_id), "reqReserved": account, "respCode": "A6"}
    assert up.taken(edge.send(up, up._sign(params)))
    assert recharges(db, up.channel, query_id) == [3_300]


def test_past_the_inflight_bound_notifications_are_answered_retry_and_land_later(
        edge: Edge, db: Conn) -> None:
    wx = edge.sims["WECHAT_PAY"]
    account = edge.open_account()
    paid = wx.pay(account, 600)
    edge.service.max_inflight = 0  # as if 256 notifications were being served already
    reply = edge.send(wx, paid.request)
    assert reply.status == 500 and json.loads(reply.body)["code"] == "FAIL"
    assert recharges(db, wx.channel, paid.txn_id) == []
    edge.service.max_inflight = 256
    assert wx.taken(edge.send(wx, wx.resend(paid)))
    assert recharges(db, wx.channel, paid.txn_id) == [600]


def test_the_load_runs_notifications_are_genuine_with_the_share_of_duplicates_asked() -> None:
    channels = notify_bench.Channels()
    planned = notify_bench.plan(channels, ["A1", "A2"], 400, 0.2, random.Random(7))
    wx = wechat.WeChatPay({notify_bench.SERIAL: channels.wechat_key.public_key()},
                          channels.apiv3_key)
    ali = alipay.Alipay(channels.alipay_key.public_key(), notify_bench.APP_ID,
                        seller_id=notify_bench.SELLER_ID)
    for p in planned:
        event = (wx if p.channel == notify_bench.WECHAT else ali).parse_notification(p.request)
        assert (event.kind, event.channel_txn_id, event.amount_fen) == (
            EventKind.PAYMENT, p.txn, p.fen)
    duplicates = [p for p in planned if p.duplicate]
    assert 50 <= len(duplicates) <= 110  # about 20 % of 400 (seeded)
    originals = {p.txn for p in planned if not p.duplicate}
    assert {p.txn for p in duplicates} <= originals
    assert len(originals) == len(planned) - len(duplicates)


def test_a_route_without_an_asyncio_core_uses_the_adapters_blocking_client(
        edge: Edge, db: Conn) -> None:
    # Routes built by hand from library adapters (no `connect`): the core
    # calls go through the thread pool, with the same answers.
    routes = [dataclasses.replace(r, connect=None) for r in edge.service.routes.values()]
    thread = ServiceThread(NotifyService(routes))
    base_url = thread.start()
    try:
        for channel in CHANNELS:
            sim = edge.sims[channel]
            account = edge.open_account()
            paid = sim.pay(account, 700)
            refund = sim.refund(paid, 200)
            sends = (refund.request, paid.request, sim.resend(paid), refund.request)

            async def send_all(session: aiohttp.ClientSession, sim: Simulator = sim,
                               sends: tuple[HttpRequest, ...] = sends) -> list[HttpReply]:
                return [await post(session, base_url, sim.path, r) for r in sends]

            replies = edge.run(send_all)
            # a refund before its payment: retry; then all taken
            assert [sim.taken(r) for r in replies] == [False, True, True, True]
            assert balance(db, account) == 500
    finally:
        thread.stop()
