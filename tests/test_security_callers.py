"""Who may call what: mutual TLS, roles, terminals bound to their station and
holds, adapters bound to their channel, MACs and counters on terminal
requests. Each test tries the attack and shows it refused with nothing
changed."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server import keys
from fuelcard_server.certs import DevPki
from fuelcard_server.settings import SettingsError

from tests.plugins.server import make_settings
from tests.plugins.terminals import Fixture, expect, rid, sign_on
from tests.support.ledger_asserts import Conn, snapshot


def test_a_terminal_with_a_good_mac_pays(setup: Fixture) -> None:
    auth = setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 30_000))
    assert auth.decision == common_pb2.DECISION_APPROVED
    done = setup.t1.pos.Confirm(setup.t1.confirm(auth.hold.hold_id, 25_000))
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.balance_fen == 75_000


def test_forged_mac_is_refused_and_changes_nothing(setup: Fixture, db: Conn) -> None:
    before = snapshot(db)
    with pytest.raises(grpc.RpcError) as err:
        setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 30_000, tamper=True))
    expect(err.value, grpc.StatusCode.UNAUTHENTICATED, "MAC_INVALID")
    assert snapshot(db) == before


def test_missing_mac_is_refused(setup: Fixture, db: Conn) -> None:
    req = setup.t1.authorize(setup.card_number, 30_000)
    req.ClearField("mac")
    before = snapshot(db)
    with pytest.raises(grpc.RpcError) as err:
        setup.t1.pos.Authorize(req)
    expect(err.value, grpc.StatusCode.UNAUTHENTICATED, "MAC_MISSING")
    assert snapshot(db) == before


def test_replayed_counter_is_refused_but_a_resend_is_answered(setup: Fixture, db: Conn) -> None:
    setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 1_000))
    first = setup.t1.authorize(setup.card_number, 10_000)
    answer = setup.t1.pos.Authorize(first)
    assert answer.decision == common_pb2.DECISION_APPROVED
    # The same request again (a POS retry): the original answer, nothing new.
    assert setup.t1.pos.Authorize(first) == answer
    # A new request under a used counter: a replay.
    before = snapshot(db)
    for counter in (first.terminal_counter, first.terminal_counter - 1):
        with pytest.raises(grpc.RpcError) as err:
            setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 10_000, counter=counter))
        expect(err.value, grpc.StatusCode.UNAUTHENTICATED, "COUNTER_REPLAYED")
    assert snapshot(db) == before


def test_wrong_key_version_is_refused(setup: Fixture) -> None:
    stale = keys.WorkingKey(setup.t1.name, setup.t1.working.version - 1, setup.t1.working.valid_from,
                            setup.t1.working.valid_until, setup.t1.working.key)
    setup.t1.working = stale
    with pytest.raises(grpc.RpcError) as err:
        setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 10_000))
    expect(err.value, grpc.StatusCode.UNAUTHENTICATED, "KEY_NOT_ACCEPTED")


def test_wrong_roles_are_refused_and_change_nothing(setup: Fixture, db: Conn) -> None:
    terminal_accounts = account_pb2_grpc.AccountServiceStub(setup.server.channel("pos-KM-001-T1"))
    admin_pos = transaction_pb2_grpc.TransactionServiceStub(setup.server.channel("admin-ops"))
    analytics_funding = funding_pb2_grpc.FundingServiceStub(setup.server.channel("analytics-bi"))
    before = snapshot(db)
    with pytest.raises(grpc.RpcError) as err:
        terminal_accounts.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
            holder=account_pb2.Holder(name="x")))
    expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    with pytest.raises(grpc.RpcError) as err:
        admin_pos.Authorize(setup.t1.authorize(setup.card_number, 10_000))
    expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    with pytest.raises(grpc.RpcError) as err:
        analytics_funding.Recharge(funding_pb2.RechargeRequest(
            request_id=rid(), account_id=setup.account_id, channel=funding_pb2.CHANNEL_COUNTER,
            channel_txn_id="x-1", amount_fen=100))
    expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert snapshot(db) == before


def test_a_terminal_acts_only_at_its_station_and_on_its_holds(setup: Fixture, db: Conn) -> None:
    auth = setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 20_000))
    other = sign_on(setup.server, "pos-KM-002-T9", "KM-002-T9", "KM-002")
    before = snapshot(db)
    with pytest.raises(grpc.RpcError) as err:  # claims to be at KM-001
        other.pos.Authorize(other.authorize(setup.card_number, 10_000, station="KM-001"))
    expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "TERMINAL_MISMATCH")
    with pytest.raises(grpc.RpcError) as err:
        other.pos.Confirm(other.confirm(auth.hold.hold_id, 20_000))
    expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_HOLD")
    with pytest.raises(grpc.RpcError) as err:
        other.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=auth.hold.hold_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert snapshot(db) == before


def test_an_adapter_recharges_only_through_its_channel(setup: Fixture, db: Conn) -> None:
    adapter = funding_pb2_grpc.FundingServiceStub(setup.server.channel("adapter-wechat-gw"))
    before = snapshot(db)
    with pytest.raises(grpc.RpcError) as err:
        adapter.Recharge(funding_pb2.RechargeRequest(
            request_id=rid(), account_id=setup.account_id, channel=funding_pb2.CHANNEL_ALIPAY,
            channel_txn_id="ali-1", amount_fen=5_000))
    expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "CHANNEL_MISMATCH")
    assert snapshot(db) == before


def test_idempotency_keys_are_per_caller(setup: Fixture) -> None:
    t2 = sign_on(setup.server, "pos-KM-001-T2", "KM-001-T2", "KM-001")
    shared_id = rid()
    a = setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 10_000, request_id=shared_id))
    b = t2.pos.Authorize(t2.authorize(setup.card_number, 20_000, request_id=shared_id))
    assert a.decision == b.decision == common_pb2.DECISION_APPROVED
    assert a.hold.hold_id != b.hold.hold_id


def test_no_certificate_or_a_foreign_one_cannot_connect(setup: Fixture, tmp_path: Path) -> None:
    foreign = DevPki(tmp_path / "foreign")
    from fuelcard_server.identity import Role
    foreign.client(Role.ADMIN, "ops")
    stems = {"none": None}
    for label, name in stems.items():
        stub = account_pb2_grpc.AccountServiceStub(setup.server.channel(name))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAccount(account_pb2.GetAccountRequest(account_id=setup.account_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, label
    creds = grpc.ssl_channel_credentials(
        root_certificates=(setup.server.certs / "ca.pem").read_bytes(),
        private_key=(foreign.dir / "admin-ops.key").read_bytes(),
        certificate_chain=(foreign.dir / "admin-ops.pem").read_bytes())
    with grpc.secure_channel(setup.server.target, creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            account_pb2_grpc.AccountServiceStub(ch).GetAccount(
                account_pb2.GetAccountRequest(account_id=setup.account_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_for_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="loopback"):
        make_settings(tmp_path, listen="0.0.0.0:50051", insecure=True)
    assert not make_settings(tmp_path, listen="0.0.0.0:50051", insecure=False).insecure
