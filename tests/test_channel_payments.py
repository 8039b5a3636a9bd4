"""Issue 14, item 5: channel payments of any size are credited. A payment
its channel's adapter notified, signed, is never asked for a step-up (that
is for people typing amounts); the same amount from staff is. A payment the
core must refuse (over the account's maximum balance) becomes a settlement
exception of kind 3 and a signed refund instruction, and the adapter
framework stops retrying it and says so. Through mutual TLS, the real
server, the adapters' core client and the framework."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
)
from fuelcard_adapters.core import CoreClient
from fuelcard_adapters.framework import (
    Adapter,
    Event,
    EventKind,
    HttpReply,
    HttpRequest,
    Outcome,
    Result,
)
from fuelcard_adapters.signing import Sm2Signer
from fuelcard_server import keys
from fuelcard_server.clock import ManualClock

from tests.plugins.server import ServerThread, TlsServer, make_settings
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, unpack

# The TLS test server has certificates for the WeChat Pay adapter only
# (tests/plugins/server.py); the path is the same for every channel.
BANK = funding_pb2.CHANNEL_WECHAT_PAY
BIG_FEN = 5_000_000   # 50 000 yuan, above the step-up threshold (20 000 yuan)


def rid() -> str:
    return f"chp-{uuid.uuid4().hex[:20]}"


@dataclass
class Env:
    admin: grpc.Channel
    adapter_funding: funding_pb2_grpc.FundingServiceStub
    core: CoreClient
    key: Sm2Signer

    def open_account(self) -> str:
        account_id: str = account_pb2_grpc.AccountServiceStub(self.admin).OpenAccount(
            account_pb2.OpenAccountRequest(request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                                           holder=account_pb2.Holder(name="车队转账"))
        ).account.account_id
        return account_id

    def signed(self, account_id: str, amount_fen: int) -> funding_pb2.RechargeRequest:
        req = funding_pb2.RechargeRequest(
            request_id=rid(), account_id=account_id, channel=BANK,
            channel_txn_id=f"bt-{uuid.uuid4().hex}", amount_fen=amount_fen)
        req.signature = self.key.sign(keys.canonical(
            "Recharge", req.request_id, req.account_id, req.channel, req.channel_txn_id,
            req.amount_fen))
        return req


@pytest.fixture
def tls_server(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[TlsServer]:
    """A TLS server with step-ups on, as production has them (the shared
    one turns them off), above 20 000 yuan."""
    settings = make_settings(tmp_path, insecure=False, tls_dir=dev_certs,
                             step_up_recharge_above_fen=2_000_000)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    port = thread.start()
    handle = TlsServer(f"127.0.0.1:{port}", database_url, clock, dev_certs)
    try:
        yield handle
    finally:
        for ch in handle.channels:
            ch.close()
        thread.stop()


@pytest.fixture
def env(tls_server: TlsServer) -> Env:
    admin = tls_server.channel("admin-ops")
    adapter_channel = tls_server.channel("adapter-wechat-gw")
    server_hex = security_pb2_grpc.SecurityServiceStub(adapter_channel).GetServerSigningKey(
        security_pb2.GetServerSigningKeyRequest()).public_key_hex
    key = Sm2Signer.generate()
    security_pb2_grpc.SecurityServiceStub(admin).RegisterChannelKey(
        security_pb2.RegisterChannelKeyRequest(channel=BANK, public_key_hex=key.public_hex))
    adapter_funding = funding_pb2_grpc.FundingServiceStub(adapter_channel)
    return Env(admin, adapter_funding,
               CoreClient(adapter_funding, BANK, key, bytes.fromhex(server_hex),
                          sleep=lambda _s: None), key)


def test_a_large_signed_bank_transfer_is_credited_without_a_step_up(
        env: Env, tls_server: TlsServer, db: Conn) -> None:
    account_id = env.open_account()
    paid = env.adapter_funding.Recharge(env.signed(account_id, BIG_FEN))
    assert paid.decision == common_pb2.DECISION_APPROVED
    assert (paid.balance_fen, paid.refund_payment) == (BIG_FEN, False)
    assert count(db, "step_up_challenges") == 0
    # The same payment relayed by staff is a person's booking: a step-up.
    with pytest.raises(grpc.RpcError) as err:
        funding_pb2_grpc.FundingServiceStub(env.admin).Recharge(env.signed(account_id, BIG_FEN))
    e = unpack(err.value)
    assert (e.code, e.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    assert account_row(db, account_id)["balance_fen"] == BIG_FEN
    assert_ledger_ok(tls_server.database_url)


@dataclass
class OnePayment:
    """A channel mapping that has already read one payment notification:
    the framework and the core are the real ones."""

    event: Event
    channel: int = BANK

    def parse_notification(self, request: HttpRequest) -> Event:
        return self.event

    def reply(self, result: Result) -> HttpReply:
        return HttpReply(200 if result.outcome is Outcome.ACCEPTED else 500, result.reason.encode())


def test_a_payment_the_core_refuses_is_an_exception_and_a_refund_not_a_retry(
        env: Env, tls_server: TlsServer, db: Conn) -> None:
    account_id = env.open_account()
    db.execute("UPDATE fc.accounts SET max_balance_fen = 100_000 WHERE uid = %s", (account_id,))
    event = Event(EventKind.PAYMENT, channel_txn_id=f"bt-{uuid.uuid4().hex}",
                  account_id=account_id, amount_fen=BIG_FEN)
    adapter = Adapter(OnePayment(event), env.core)
    results = [adapter.process(HttpRequest(b"")) for _ in range(2)]   # the channel notifies twice
    for result in results:
        assert (result.outcome, result.reason, result.refund_payer) == (
            Outcome.ACCEPTED, "REFUND_PAYER", True)
    assert results[0].settlement_exception_id == results[1].settlement_exception_id != ""
    x = db.execute("SELECT x.kind, x.reason, x.amount_fen, x.channel, x.channel_txn_id, x.resolved_at,"
                   " a.uid::text"
                   " FROM fc.settlement_exceptions x JOIN fc.accounts a ON a.id = x.account_id"
                   " WHERE x.uid = %s", (results[0].settlement_exception_id,)).fetchone()
    assert x == (3, "BALANCE_LIMIT_EXCEEDED", BIG_FEN, BANK, event.channel_txn_id, None, account_id)
    assert account_row(db, account_id)["balance_fen"] == 0
    assert count(db, "recharges") == 0
    # Room made later does not credit a payment already sent back.
    db.execute("UPDATE fc.accounts SET max_balance_fen = 100_000_000 WHERE uid = %s", (account_id,))
    assert adapter.process(HttpRequest(b"")).reason == "REFUND_PAYER"
    assert account_row(db, account_id)["balance_fen"] == 0
    assert_ledger_ok(tls_server.database_url)
