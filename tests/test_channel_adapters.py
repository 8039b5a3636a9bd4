"""Issue 8: each channel adapter against its channel's simulator, through the
real server over mutual TLS as that channel's adapter (signed requests,
signed answers): success, duplicates, out-of-order notifications, bad
signatures, refunds (covered, and with a shortfall)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    funding_pb2,
    funding_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
)
from fuelcard_adapters.core import CoreClient
from fuelcard_adapters.framework import Adapter, HttpReply, Outcome
from fuelcard_adapters.neutral import format_yuan, parse_yuan, parse_yuan_decimal
from fuelcard_adapters.signing import Sm2Signer
from fuelcard_server import verify
from fuelcard_server.certs import DevPki
from fuelcard_server.identity import Role
from hypothesis import given
from hypothesis import strategies as st

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support.channel_simulators import SIMULATORS, AlipaySim, Simulator
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, snapshot


@pytest.fixture(scope="session")
def adapter_certs(dev_certs: Path) -> Path:
    pki = DevPki(dev_certs)
    for name in SIMULATORS:
        if not (dev_certs / f"adapter-{name.lower()}-gw.pem").exists():
            pki.client(Role.ADAPTER, f"{name.lower()}-gw", name)
    return dev_certs


@dataclass
class Rig:
    server: TlsServer
    sim: Simulator
    adapter: Adapter
    funding: funding_pb2_grpc.FundingServiceStub
    accounts: account_pb2_grpc.AccountServiceStub
    admin: security_pb2_grpc.SecurityServiceStub
    account_id: str

    def balance(self, db: Conn, account_id: str | None = None) -> int:
        value: int = account_row(db, account_id or self.account_id)["balance_fen"]
        return value


def open_account(accounts: account_pb2_grpc.AccountServiceStub, **kw: object) -> str:
    req = account_pb2.OpenAccountRequest(request_id=f"open-{uuid.uuid4().hex[:16]}",
                                         holder=account_pb2.Holder(name="渠道测试"), **kw)  # type: ignore[arg-type]
    if not req.parent_account_id:
        req.type = account_pb2.ACCOUNT_TYPE_CORPORATE
    account_id: str = accounts.OpenAccount(req).account.account_id
    return account_id


def make_rig(name: str, tls_server: TlsServer) -> Rig:
    """The channel's simulator and adapter; the adapter's key registered."""
    sim = SIMULATORS[name]()
    admin_channel = tls_server.channel("admin-ops")
    admin = security_pb2_grpc.SecurityServiceStub(admin_channel)
    accounts = account_pb2_grpc.AccountServiceStub(admin_channel)
    adapter_channel = tls_server.channel(f"adapter-{name.lower()}-gw")
    adapter_security = security_pb2_grpc.SecurityServiceStub(adapter_channel)
    core_key = bytes.fromhex(adapter_security.GetServerSigningKey(
        security_pb2.GetServerSigningKeyRequest()).public_key_hex)
    key = Sm2Signer.generate()
    admin.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
        channel=sim.channel, public_key_hex=key.public_hex))  # type: ignore[arg-type]
    funding = funding_pb2_grpc.FundingServiceStub(adapter_channel)
    core = CoreClient(funding, sim.channel, key, core_key, sleep=lambda _s: None)
    return Rig(tls_server, sim, Adapter(sim.mapping(), core), funding, accounts, admin,
               open_account(accounts))


@pytest.fixture(params=sorted(SIMULATORS))
def rig(request: pytest.FixtureRequest, tls_server: TlsServer, adapter_certs: Path) -> Rig:
    return make_rig(request.param, tls_server)


def recharges_of(db: Conn, channel: int) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for r in db.execute(
        "SELECT channel_txn_id, amount_fen FROM fc.recharges WHERE channel = %s ORDER BY id",
        (channel,))]


def settlement_rows(db: Conn, channel: int) -> list[tuple[int, str, str, int]]:
    return [(r[0], r[1], r[2], r[3]) for r in db.execute(
        "SELECT kind, channel_txn_id, original_channel_txn_id, amount_fen"
        " FROM fc.settlement_records WHERE channel = %s ORDER BY id", (channel,))]


def test_a_payment_is_credited_once_and_written_in_the_neutral_format(rig: Rig, db: Conn) -> None:
    paid = rig.sim.pay(rig.account_id, 12_345)
    reply = rig.adapter.handle(paid.request)
    assert rig.sim.taken(reply), reply
    assert rig.balance(db) == 12_345
    assert recharges_of(db, rig.sim.channel) == [(paid.txn_id, 12_345)]
    assert settlement_rows(db, rig.sim.channel) == [(1, paid.txn_id, "", 12_345)]
    got = rig.funding.GetRecharge(funding_pb2.GetRechargeRequest(
        channel=rig.sim.channel, channel_txn_id=paid.txn_id))  # type: ignore[arg-type]
    assert (got.recharge.account_id, got.recharge.amount_fen, got.refunded_fen) == (
        rig.account_id, 12_345, 0)
    assert_ledger_ok(rig.server.database_url)


def test_duplicate_notifications_credit_once(rig: Rig, db: Conn) -> None:
    paid = rig.sim.pay(rig.account_id, 5_000)
    assert rig.sim.taken(rig.adapter.handle(paid.request))
    after = snapshot(db)
    # The same message again, and a fresh notification of the same payment
    # (new notify id, timestamp, nonce, signature): taken, nothing moves.
    for again in (paid.request, rig.sim.resend(paid), rig.sim.resend(paid)):
        assert rig.sim.taken(rig.adapter.handle(again))
    assert snapshot(db) == after
    assert rig.balance(db) == 5_000


def test_out_of_order_notifications_end_in_the_right_balance(rig: Rig, db: Conn) -> None:
    paid = rig.sim.pay(rig.account_id, 10_000)
    refund = rig.sim.refund(paid, 3_000)
    # The refund overtakes its payment: not taken (the channel retries), nothing moves.
    before = snapshot(db)
    result = rig.adapter.process(refund.request)
    assert (result.outcome, result.reason) == (Outcome.RETRY, "RECHARGE_NOT_FOUND")
    assert not rig.sim.taken(rig.adapter.mapping.reply(result))
    assert snapshot(db) == before
    assert rig.sim.taken(rig.adapter.handle(paid.request))
    # The channel's retry of the refund now goes through, and a late copy of
    # the payment notification changes nothing.
    assert rig.sim.taken(rig.adapter.handle(rig.sim.resend(refund)))
    assert rig.sim.taken(rig.adapter.handle(rig.sim.resend(paid)))
    assert rig.sim.taken(rig.adapter.handle(refund.request))
    assert rig.balance(db) == 7_000
    assert [r[0] for r in settlement_rows(db, rig.sim.channel)] == [1, 2]
    assert_ledger_ok(rig.server.database_url)


def test_bad_signatures_are_refused_and_change_nothing(rig: Rig, db: Conn) -> None:
    paid = rig.sim.pay(rig.account_id, 2_000)
    stranger = type(rig.sim)()  # same channel, another key: a forger
    forged_by_stranger = stranger.pay(rig.account_id, 2_000)
    before = snapshot(db)
    for bad in (rig.sim.forge_amount(paid, 200_000), forged_by_stranger.request):
        result = rig.adapter.process(bad)
        assert result.outcome is Outcome.REJECTED, result
        assert not rig.sim.taken(rig.adapter.mapping.reply(result))
    # The adapter's own key is not the one registered for the channel: the
    # core refuses; the channel is told to try again later.
    impostor = Adapter(rig.adapter.mapping, CoreClient(
        rig.funding, rig.sim.channel, Sm2Signer.generate(), rig.adapter.core.core_public_key))
    result = impostor.process(paid.request)
    assert (result.outcome, result.reason) == (Outcome.RETRY, "SIGNATURE_INVALID")
    assert snapshot(db) == before
    # The genuine notification still goes through.
    assert rig.sim.taken(rig.adapter.handle(paid.request))
    assert rig.balance(db) == 2_000


def test_a_refund_is_debited_and_a_shortfall_recorded(rig: Rig, db: Conn) -> None:
    # A fleet parent: its money can move to a sub-account (batch top-up), out
    # of the refund's reach.
    admin_channel = rig.server.channel("admin-ops")
    sub = open_account(rig.accounts, parent_account_id=rig.account_id,
                       funding_mode=account_pb2.FUNDING_MODE_ALLOCATED, label="云A·00001")
    paid = rig.sim.pay(rig.account_id, 10_000)
    assert rig.sim.taken(rig.adapter.handle(paid.request))
    first = rig.sim.refund(paid, 2_500)
    assert rig.sim.taken(rig.adapter.handle(first.request))
    assert rig.balance(db) == 7_500
    control_pb2_grpc.ControlServiceStub(admin_channel).BatchTopUp(control_pb2.BatchTopUpRequest(
        request_id=f"top-{uuid.uuid4().hex[:16]}", parent_account_id=rig.account_id,
        lines=[control_pb2.TopUpLine(account_id=sub, amount_fen=6_000)]))
    assert rig.balance(db) == 1_500
    second = rig.sim.refund(paid, 4_000)
    result = rig.adapter.process(second.request)
    assert (result.outcome, result.balance_fen) == (Outcome.ACCEPTED, 0)
    refunds = db.execute(
        "SELECT f.channel_refund_id, f.amount_fen, f.debited_fen, x.amount_fen, x.reason"
        " FROM fc.refunds f LEFT JOIN fc.channel_exceptions x ON x.refund_id = f.id"
        " ORDER BY f.id").fetchall()
    assert refunds == [(first.refund_id, 2_500, 2_500, None, None),
                       (second.refund_id, 4_000, 1_500, 2_500, "REFUND_SHORTFALL")]
    # Repeats of either refund change nothing; a third refund beyond what is
    # left of the payment is refused (not taken), nothing changes.
    after = snapshot(db)
    for again in (first.request, rig.sim.resend(second)):
        assert rig.sim.taken(rig.adapter.handle(again))
    assert snapshot(db) == after
    got = rig.funding.GetRecharge(funding_pb2.GetRechargeRequest(
        channel=rig.sim.channel, channel_txn_id=paid.txn_id))  # type: ignore[arg-type]
    assert got.refunded_fen == 6_500
    too_much = rig.sim.refund(paid, 3_501)
    result = rig.adapter.process(too_much.request)
    assert (result.outcome, result.reason) == (Outcome.RETRY, "REFUND_EXCEEDS_RECHARGE")
    assert snapshot(db) == after
    # The journal: the debits, and the history shows them as refunds.
    txns = account_pb2_grpc.AccountServiceStub(admin_channel).ListTransactions(
        account_pb2.ListTransactionsRequest(account_id=rig.account_id)).transactions
    assert [(t.kind, t.amount_fen) for t in txns if t.kind != account_pb2.TRANSACTION_KIND_ALLOCATION] == [
        (account_pb2.TRANSACTION_KIND_RECHARGE_REFUND, -1_500),
        (account_pb2.TRANSACTION_KIND_RECHARGE_REFUND, -2_500),
        (account_pb2.TRANSACTION_KIND_RECHARGE, 10_000)]
    assert_ledger_ok(rig.server.database_url)


# --- amounts ------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=10**15))
def test_yuan_strings_parse_to_exact_fen(fen: int) -> None:
    text = format_yuan(fen)
    assert parse_yuan(text) == parse_yuan_decimal(text) == fen
    if fen % 10 == 0:
        assert parse_yuan(text[:-1]) == fen  # "12.3"
    if fen % 100 == 0:
        assert parse_yuan(text[:-3]) == fen  # "12"


@pytest.mark.parametrize("text", ["", "1.234", "0.001", "1e2", "-1.00", "+1.00", " 1.00", "1.00 ",
                                  "1.", ".5", "NaN", "Infinity", "1,00", "１.００", "0x10"])
def test_bad_yuan_strings_are_refused(text: str) -> None:
    from fuelcard_adapters.neutral import FormatError
    with pytest.raises(FormatError):
        parse_yuan(text)


def test_negative_yuan_only_where_allowed() -> None:
    assert parse_yuan("-0.18", allow_negative=True) == -18
    assert parse_yuan("0.1") == 10
    assert format_yuan(-5) == "-0.05"


# --- concurrency and channel specifics ------------------------------------------


def _at_once(n: int, fn: Callable[[int], HttpReply]) -> list[HttpReply]:
    barrier = threading.Barrier(n)

    def go(i: int) -> HttpReply:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_concurrent_duplicates_credit_and_refund_once(rig: Rig, db: Conn) -> None:
    paid = rig.sim.pay(rig.account_id, 9_000)
    copies = [paid.request] + [rig.sim.resend(paid) for _ in range(5)]
    assert all(rig.sim.taken(r) for r in _at_once(6, lambda i: rig.adapter.handle(copies[i])))
    refund = rig.sim.refund(paid, 4_000)
    copies = [refund.request] + [rig.sim.resend(refund) for _ in range(5)]
    assert all(rig.sim.taken(r) for r in _at_once(6, lambda i: rig.adapter.handle(copies[i])))
    assert rig.balance(db) == 5_000
    assert [r[0] for r in settlement_rows(db, rig.sim.channel)] == [1, 2]
    assert_ledger_ok(rig.server.database_url)


@pytest.fixture
def alipay_rig(tls_server: TlsServer, adapter_certs: Path) -> Rig:
    return make_rig("ALIPAY", tls_server)


def test_alipay_running_refund_totals_are_applied_once_in_any_order(alipay_rig: Rig,
                                                                    db: Conn) -> None:
    """Alipay's refund_fee is the total refunded so far: two partial refunds
    notified at once, in either order, refund the final total, no more."""
    sim = alipay_rig.sim
    assert isinstance(sim, AlipaySim)
    paid = sim.pay(alipay_rig.account_id, 10_000)
    assert sim.taken(alipay_rig.adapter.handle(paid.request))
    first, second = sim.refund(paid, 3_000), sim.refund(paid, 2_000)  # totals 30.00, 50.00
    notices = [first.request, second.request]
    assert all(sim.taken(r) for r in _at_once(2, lambda i: alipay_rig.adapter.handle(notices[i])))
    assert alipay_rig.balance(db) == 5_000
    assert db.execute("SELECT sum(amount_fen) FROM fc.refunds").fetchone() == (5_000,)


def test_alipay_trade_finished_before_trade_success_credits_once(alipay_rig: Rig, db: Conn) -> None:
    sim = alipay_rig.sim
    assert isinstance(sim, AlipaySim)
    waiting = sim.pay(alipay_rig.account_id, 4_200, status="WAIT_BUYER_PAY")
    assert sim.taken(alipay_rig.adapter.handle(waiting.request))
    assert alipay_rig.balance(db) == 0
    success = sim.pay(alipay_rig.account_id, 4_200)
    finished = dataclasses.replace(success, fields={**success.fields, "trade_status": "TRADE_FINISHED"})
    assert sim.taken(alipay_rig.adapter.handle(sim.resend(finished)))   # arrives first
    assert sim.taken(alipay_rig.adapter.handle(success.request))
    assert alipay_rig.balance(db) == 4_200
    # What Alipay must get back: the literal "success".
    assert alipay_rig.adapter.handle(success.request).body == b"success"


# --- invariants -------------------------------------------------------------------


def test_verify_catches_broken_refund_records(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    txn = f"wx-{uuid.uuid4().hex}"
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("rc"), account_id=card.account_id,
        channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=txn, amount_fen=1_000))
    builders.authorize(server, card, 800)  # a hold: the refund cannot take that money
    done = server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=builders.rid("rf"), channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=txn,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=500))
    assert (done.refund.debited_fen, done.refund.shortfall_fen, done.balance_fen) == (200, 300, 800)
    assert verify.run(server.database_url) == []
    # Each edit (past the append-only triggers), then its undo.
    tampering: list[tuple[str, bytes, bytes]] = [
        ("refund_shortfall_recorded", b"UPDATE fc.channel_exceptions SET amount_fen = amount_fen + 1",
         b"UPDATE fc.channel_exceptions SET amount_fen = amount_fen - 1"),
        ("refunds_debited_once", b"UPDATE fc.refunds SET debited_fen = debited_fen - 1",
         b"UPDATE fc.refunds SET debited_fen = debited_fen + 1"),
        ("settlement_record_per_channel_txn", b"DELETE FROM fc.settlement_records WHERE kind = 2",
         b"SELECT 1"),
    ]
    db.execute("SET session_replication_role = replica")
    for check, edit, undo in tampering:
        db.execute(edit)
        found = {v.check for v in verify.run(server.database_url)}
        assert check in found, (check, found)
        db.execute(undo)


def test_neutral_records_round_trip_through_the_proto() -> None:
    from fuelcard_adapters.neutral import SHANGHAI, Kind, NeutralRecord, Status
    record = NeutralRecord(funding_pb2.CHANNEL_ALIPAY, Kind.REFUND, "RF1", 250,
                           dt.datetime(2026, 11, 25, 23, 59, 59, tzinfo=SHANGHAI), Status.PROCESSING,
                           2, "2026112522001", "0b9d7a3e-1111-4c4c-8888-123456789abc")
    m = record.to_proto()
    assert (m.kind, m.status, m.business_date) == (2, 3, "2026-11-25")
    back = NeutralRecord.from_proto(m)
    assert back == record and back.time.utcoffset() == dt.timedelta(0)
