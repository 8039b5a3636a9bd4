"""Who vouches for a payment, and signed reads (issue 5, "Payment adapters").

Staff (role admin) may book counter top-ups unsigned; a bank-card, WeChat
Pay, Alipay or e-CNY payment - or its refund - must carry the signature of
that channel's adapter, whoever sends it. GetRecharge answers are signed by
the server like Recharge answers, and the adapter framework's client checks
them. Through mutual TLS, the real server and the generated stubs; the
signing input is built here from its definition in funding.proto."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass

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
from fuelcard_adapters.core import CoreClient, CoreError
from fuelcard_adapters.signing import Sm2Signer
from fuelcard_server import gm, keys
from fuelcard_server.services import funding

from tests.plugins.server import TlsServer
from tests.support.ledger_asserts import Conn, account_row, count, snapshot, unpack

WECHAT = funding_pb2.CHANNEL_WECHAT_PAY
PAYMENT_CHANNELS = (funding_pb2.CHANNEL_BANK_CARD, WECHAT, funding_pb2.CHANNEL_ALIPAY,
                    funding_pb2.CHANNEL_ECNY)


def rid() -> str:
    return f"chs-{uuid.uuid4().hex[:20]}"


def expect(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    e = unpack(err.value)
    assert (e.code, e.reason, len(e.infos)) == (code, reason, 1), (e.code, e.message)


def money(db: Conn) -> dict[str, tuple[int, str | None]]:
    """Everything but the audit trail (every admin call is audited, refused
    or not)."""
    state = snapshot(db)
    state.pop("audit_log", None)
    return state


def recharge_input(req: funding_pb2.RechargeRequest) -> bytes:
    return keys.canonical("Recharge", req.request_id, req.account_id, req.channel,
                          req.channel_txn_id, req.amount_fen)


def get_recharge_input(req: funding_pb2.GetRechargeRequest,
                       resp: funding_pb2.GetRechargeResponse) -> bytes:
    """GetRechargeResponse.signature's input, from funding.proto."""
    r = resp.recharge
    return keys.canonical("GetRechargeResponse", req.channel, req.channel_txn_id,
                          r.recharge_id, r.account_id, r.channel, r.channel_txn_id, r.amount_fen,
                          r.create_time.seconds, r.create_time.nanos, resp.refunded_fen)


@dataclass
class Env:
    admin_funding: funding_pb2_grpc.FundingServiceStub
    adapter_funding: funding_pb2_grpc.FundingServiceStub
    adapter: CoreClient  # the WeChat Pay adapter framework's client
    adapter_key: Sm2Signer
    server_key: gm.Sm2PublicKey
    account_id: str

    def signed(self, amount_fen: int, txn: str | None = None) -> funding_pb2.RechargeRequest:
        req = funding_pb2.RechargeRequest(
            request_id=rid(), account_id=self.account_id, channel=WECHAT,
            channel_txn_id=txn or f"wx-{uuid.uuid4().hex}", amount_fen=amount_fen)
        req.signature = self.adapter_key.sign(recharge_input(req))
        return req


@pytest.fixture
def env(tls_server: TlsServer) -> Env:
    admin = tls_server.channel("admin-ops")
    adapter_channel = tls_server.channel("adapter-wechat-gw")
    server_hex = security_pb2_grpc.SecurityServiceStub(adapter_channel).GetServerSigningKey(
        security_pb2.GetServerSigningKeyRequest()).public_key_hex
    key = Sm2Signer.generate()
    security_pb2_grpc.SecurityServiceStub(admin).RegisterChannelKey(
        security_pb2.RegisterChannelKeyRequest(channel=WECHAT, public_key_hex=key.public_hex))
    account_id = account_pb2_grpc.AccountServiceStub(admin).OpenAccount(
        account_pb2.OpenAccountRequest(request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                                       holder=account_pb2.Holder(name="渠道签名"))
    ).account.account_id
    adapter_funding = funding_pb2_grpc.FundingServiceStub(adapter_channel)
    return Env(funding_pb2_grpc.FundingServiceStub(admin), adapter_funding,
               CoreClient(adapter_funding, WECHAT, key, bytes.fromhex(server_hex),
                          sleep=lambda _s: None),
               key, gm.Sm2PublicKey.from_hex(server_hex), account_id)


# --- unsigned bookings by staff ----------------------------------------------------


def test_staff_book_counter_top_ups_unsigned_but_never_a_channel_payment(
        env: Env, db: Conn) -> None:
    before = money(db)
    for channel in PAYMENT_CHANNELS:
        req = funding_pb2.RechargeRequest(
            request_id=rid(), account_id=env.account_id, channel=channel,
            channel_txn_id=f"t-{uuid.uuid4().hex}", amount_fen=50_000)
        expect(functools.partial(env.admin_funding.Recharge, req),
               grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_MISSING")
        assert money(db) == before, funding_pb2.Channel.Name(channel)
    counter = env.admin_funding.Recharge(funding_pb2.RechargeRequest(
        request_id=rid(), account_id=env.account_id, channel=funding_pb2.CHANNEL_COUNTER,
        channel_txn_id=f"ctr-{uuid.uuid4().hex}", amount_fen=50_000))
    assert counter.decision == common_pb2.DECISION_APPROVED
    assert account_row(db, env.account_id)["balance_fen"] == 50_000
    assert count(db, "recharges") == 1


def test_staff_may_relay_a_payment_its_adapter_signed(env: Env, db: Conn) -> None:
    """The rule is about who vouches for the money, not who carries the
    message: a notification the WeChat Pay adapter signed is credited when an
    admin tool relays it; altered on the way, it is refused."""
    req = env.signed(7_000)
    forged = funding_pb2.RechargeRequest()
    forged.CopyFrom(req)
    forged.amount_fen = 70_000
    before = money(db)
    expect(lambda: env.admin_funding.Recharge(forged), grpc.StatusCode.UNAUTHENTICATED,
           "SIGNATURE_INVALID")
    assert money(db) == before
    assert env.admin_funding.Recharge(req).balance_fen == 7_000


def test_staff_refund_channel_payments_only_signed(env: Env, db: Conn) -> None:
    paid = env.adapter.recharge(env.account_id, f"wx-{uuid.uuid4().hex}", 9_000)
    txn = paid.recharge.channel_txn_id
    before = money(db)
    expect(lambda: env.admin_funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=rid(), channel=WECHAT, channel_txn_id=txn,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=1_000)),
        grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_MISSING")
    assert money(db) == before
    # The channel's own (signed) refund goes through; so does a counter refund by staff.
    assert env.adapter.refund(txn, f"rf-{uuid.uuid4().hex}", amount_fen=1_000).balance_fen == 8_000
    ctr = f"ctr-{uuid.uuid4().hex}"
    env.admin_funding.Recharge(funding_pb2.RechargeRequest(
        request_id=rid(), account_id=env.account_id, channel=funding_pb2.CHANNEL_COUNTER,
        channel_txn_id=ctr, amount_fen=2_000))
    back = env.admin_funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=rid(), channel=funding_pb2.CHANNEL_COUNTER, channel_txn_id=ctr,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=2_000))
    assert back.balance_fen == 8_000


# --- signed GetRecharge answers -------------------------------------------------------


def test_get_recharge_signing_input_is_the_documented_bytes() -> None:
    req = funding_pb2.GetRechargeRequest(channel=WECHAT, channel_txn_id="wx-9")
    resp = funding_pb2.GetRechargeResponse(refunded_fen=128)
    resp.recharge.recharge_id, resp.recharge.amount_fen = "r", 10_000
    expected = bytes.fromhex(
        "73 00000013 476574526563686172676552657370 6f6e7365"  # s "GetRechargeResponse"
        "69 00000001 02"        # i request.channel (CHANNEL_WECHAT_PAY)
        "73 00000004 77782d39"  # s request.channel_txn_id "wx-9"
        "73 00000001 72"        # s recharge.recharge_id "r"
        "73 00000000"           # s recharge.account_id ""
        "69 00000001 00"        # i recharge.channel
        "73 00000000"           # s recharge.channel_txn_id
        "69 00000002 2710"      # i recharge.amount_fen 10000
        "69 00000001 00"        # i recharge.create_time.seconds
        "69 00000001 00"        # i recharge.create_time.nanos
        "69 00000002 0080")     # i refunded_fen 128
    assert get_recharge_input(req, resp) == expected
    assert funding.get_recharge_signing_input(req, resp) == expected


def test_get_recharge_answers_are_signed_and_checked_by_the_adapter(env: Env) -> None:
    txn = f"wx-{uuid.uuid4().hex}"
    env.adapter.recharge(env.account_id, txn, 6_000)
    got = env.adapter.get_recharge(txn)  # verified by the framework's client
    assert (got.recharge.account_id, got.recharge.amount_fen, got.refunded_fen) == (
        env.account_id, 6_000, 0)
    req = funding_pb2.GetRechargeRequest(channel=WECHAT, channel_txn_id=txn)
    assert len(got.signature) == 64
    assert gm.sm2_verify(env.server_key, get_recharge_input(req, got), got.signature)
    # After a refund the answer says so, signed again.
    env.adapter.refund(txn, f"rf-{uuid.uuid4().hex}", amount_fen=2_500)
    later = env.adapter.get_recharge(txn)
    assert later.refunded_fen == 2_500
    assert gm.sm2_verify(env.server_key, get_recharge_input(req, later), later.signature)
    # The old answer cannot pass for the new state, nor for another transaction.
    stale = funding_pb2.GetRechargeResponse()
    stale.CopyFrom(got)
    stale.refunded_fen = 2_500
    assert not gm.sm2_verify(env.server_key, get_recharge_input(req, stale), got.signature)
    other = funding_pb2.GetRechargeRequest(channel=WECHAT, channel_txn_id=txn + "0")
    assert not gm.sm2_verify(env.server_key, get_recharge_input(other, got), got.signature)
    # Each signed field matters.
    changes: list[Callable[[funding_pb2.GetRechargeResponse], None]] = [
        lambda m: setattr(m.recharge, "recharge_id", str(uuid.uuid4())),
        lambda m: setattr(m.recharge, "account_id", str(uuid.uuid4())),
        lambda m: setattr(m.recharge, "channel", funding_pb2.CHANNEL_ALIPAY),
        lambda m: setattr(m.recharge, "channel_txn_id", txn + "x"),
        lambda m: setattr(m.recharge, "amount_fen", 60_000),
        lambda m: setattr(m.recharge.create_time, "seconds", m.recharge.create_time.seconds + 1),
        lambda m: setattr(m.recharge.create_time, "nanos", m.recharge.create_time.nanos + 1),
        lambda m: setattr(m, "refunded_fen", 0),
    ]
    for i, change in enumerate(changes):
        copy = funding_pb2.GetRechargeResponse()
        copy.CopyFrom(later)
        change(copy)
        assert not gm.sm2_verify(env.server_key, get_recharge_input(req, copy),
                                 later.signature), i


def test_the_adapter_refuses_an_answer_the_core_did_not_sign(env: Env) -> None:
    """An adapter holding another key for the core (an impostor answering in
    its place) believes none of its answers."""
    txn = f"wx-{uuid.uuid4().hex}"
    env.adapter.recharge(env.account_id, txn, 1_000)
    impostor = CoreClient(env.adapter_funding, WECHAT, env.adapter_key,
                          Sm2Signer.generate().public, sleep=lambda _s: None)
    with pytest.raises(CoreError) as err:
        impostor.get_recharge(txn)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.UNAUTHENTICATED,
                                                  "ANSWER_SIGNATURE_INVALID")
    # Unknown transactions are an error status, not a signed answer.
    with pytest.raises(CoreError) as err:
        env.adapter.get_recharge(f"wx-{uuid.uuid4().hex}")
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "RECHARGE_NOT_FOUND")
