"""Signed recharge notifications, both ways (issue 5, "Payment adapters").

A payment adapter signs its Recharge with SM2 by the key registered for its
channel; the server refuses unsigned, badly signed and tampered notifications
with nothing changed, and signs every answer with its own key. The adapter
side signs with the pure-Python `gmssl` package (what adapters use: the
interop case) and with fuelcard_server.gm; the signing inputs are built here
from the definition in funding.proto, not taken from the server's code.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable, Iterator
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
from fuelcard_server import gm, keys
from fuelcard_server.db import Database
from fuelcard_server.services import funding, security
from gmssl import sm2 as gmssl_sm2

from tests.plugins.server import RunningServer, TlsServer
from tests.support.ledger_asserts import Conn, account_row, count, snapshot, unpack

WECHAT = funding_pb2.CHANNEL_WECHAT_PAY
Signer = Callable[[bytes], bytes]


# --- the two signing inputs, from their definition in funding.proto ----------


def request_input(req: funding_pb2.RechargeRequest) -> bytes:
    return keys.canonical("Recharge", req.request_id, req.account_id, req.channel,
                          req.channel_txn_id, req.amount_fen)


def response_input(req: funding_pb2.RechargeRequest, resp: funding_pb2.RechargeResponse) -> bytes:
    r = resp.recharge
    return keys.canonical("RechargeResponse", req.account_id, req.channel, req.channel_txn_id,
                          req.amount_fen, resp.decision, resp.decline_reason,
                          r.recharge_id, r.account_id, r.channel, r.channel_txn_id, r.amount_fen,
                          r.create_time.seconds, r.create_time.nanos, resp.balance_fen)


def test_signing_inputs_are_the_documented_bytes() -> None:
    """Known answers for both inputs, byte by byte: tag, 4-byte length, value."""
    req = funding_pb2.RechargeRequest(request_id="r-1", account_id="a", channel=WECHAT,
                                      channel_txn_id="wx-9", amount_fen=10_000)
    expected = bytes.fromhex(
        "73 00000008 5265636861726765"  # s "Recharge"
        "73 00000003 722d31"            # s request_id "r-1"
        "73 00000001 61"                # s account_id "a"
        "69 00000001 02"                # i channel 2 (CHANNEL_WECHAT_PAY)
        "73 00000004 77782d39"          # s channel_txn_id "wx-9"
        "69 00000002 2710")             # i amount_fen 10000
    assert request_input(req) == expected
    assert funding.recharge_signing_input(req) == expected
    # 128 fen needs a sign byte; 0 is one zero byte.
    assert keys.canonical(128, 0) == bytes.fromhex("69 00000002 0080 69 00000001 00")

    resp = funding_pb2.RechargeResponse(decision=common_pb2.DECISION_DECLINED,
                                        decline_reason=common_pb2.DECLINE_REASON_BALANCE_LIMIT_EXCEEDED,
                                        balance_fen=5)
    declined = bytes.fromhex(
        "73 00000010 5265636861726765526573706f6e7365"  # s "RechargeResponse"
        "73 00000001 61"                # s request.account_id "a"
        "69 00000001 02"                # i request.channel
        "73 00000004 77782d39"          # s request.channel_txn_id "wx-9"
        "69 00000002 2710"              # i request.amount_fen
        "69 00000001 02"                # i decision DECLINED (2)
        "69 00000001 06"                # i decline_reason BALANCE_LIMIT_EXCEEDED (6)
        "73 00000000"                   # s recharge.recharge_id (unset: "")
        "73 00000000"                   # s recharge.account_id
        "69 00000001 00"                # i recharge.channel
        "73 00000000"                   # s recharge.channel_txn_id
        "69 00000001 00"                # i recharge.amount_fen
        "69 00000001 00"                # i recharge.create_time.seconds
        "69 00000001 00"                # i recharge.create_time.nanos
        "69 00000001 05")               # i balance_fen 5
    assert (common_pb2.DECISION_DECLINED, common_pb2.DECLINE_REASON_BALANCE_LIMIT_EXCEEDED) == (2, 6)
    assert response_input(req, resp) == declined
    assert funding.recharge_response_signing_input(req, resp) == declined
    # The request_id is not part of it (a channel's second notice of a payment
    # gets the original answer); every other field is.
    assert funding.recharge_response_signing_input(
        funding_pb2.RechargeRequest(request_id="r-2", account_id="a", channel=WECHAT,
                                    channel_txn_id="wx-9", amount_fen=10_000), resp) == declined
    resp.recharge.recharge_id = "x"
    resp.recharge.create_time.nanos = 1_000
    assert funding.recharge_response_signing_input(req, resp) == response_input(req, resp)
    assert response_input(req, resp) != declined


# --- keys and signers --------------------------------------------------------


def gmssl_safe_key() -> gm.Sm2PrivateKey:
    """gmssl's CryptSM2 mangles a public key whose hex starts with "04"
    (str.lstrip); adapters using gmssl must avoid such keys (see test_gm)."""
    while True:
        key = gm.Sm2PrivateKey.generate()
        if not key.public_key.to_hex().startswith("04"):
            return key


def gmssl_signer(key: gm.Sm2PrivateKey) -> Signer:
    crypt = gmssl_sm2.CryptSM2(private_key=key.to_hex(), public_key=key.public_key.to_hex())
    return lambda data: bytes.fromhex(crypt.sign_with_sm3(data, secrets.token_hex(32)))


def gm_signer(key: gm.Sm2PrivateKey) -> Signer:
    return lambda data: gm.sm2_sign(key, data)


def gmssl_verifies(public_hex: str, data: bytes, signature: bytes) -> bool:
    """How an adapter using gmssl checks the server's answer."""
    crypt = gmssl_sm2.CryptSM2(private_key="", public_key=public_hex)
    return bool(crypt.verify_with_sm3(signature.hex(), data))


def flip(sig: bytes, i: int) -> bytes:
    out = bytearray(sig)
    out[i] ^= 0x01
    return bytes(out)


def rid() -> str:
    return f"sig-{uuid.uuid4().hex[:20]}"


def expect(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    e = unpack(err.value)
    assert (e.code, e.reason, len(e.infos)) == (code, reason, 1), (e.code, e.message)


UNAUTH, FP = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION


# --- fixtures ----------------------------------------------------------------


@pytest.fixture
def server_key(tmp_path: Path) -> gm.Sm2PrivateKey:
    """The server's signing key, written where the test servers (data_dir =
    tmp_path) load it from, so it is one gmssl can use too."""
    key = gmssl_safe_key()
    (tmp_path / "server-sm2.key").write_text(key.to_hex())
    return key


@dataclass
class Adapter:
    """The WeChat Pay adapter: its channel to the core and its signing key."""

    funding: funding_pb2_grpc.FundingServiceStub
    security: security_pb2_grpc.SecurityServiceStub
    key: gm.Sm2PrivateKey
    server_public_hex: str

    def notify(self, account_id: str, amount_fen: int, *, txn: str | None = None,
               request_id: str | None = None, signer: Signer | None = None
               ) -> funding_pb2.RechargeRequest:
        req = funding_pb2.RechargeRequest(
            request_id=request_id or rid(), account_id=account_id, channel=WECHAT,
            channel_txn_id=txn or f"wx-{uuid.uuid4().hex}", amount_fen=amount_fen)
        req.signature = (signer or gm_signer(self.key))(request_input(req))
        return req

    def answer_verifies(self, req: funding_pb2.RechargeRequest, resp: funding_pb2.RechargeResponse,
                        *, with_gmssl: bool = True) -> bool:
        """Whether the server signed this answer to this request; checked with
        gm and (as a gmssl-based adapter would) with gmssl, which must agree."""
        data = response_input(req, resp)
        ours = gm.sm2_verify(gm.Sm2PublicKey.from_hex(self.server_public_hex), data, resp.signature)
        if with_gmssl:
            assert gmssl_verifies(self.server_public_hex, data, resp.signature) == ours
        return ours


@dataclass
class Setup:
    server: TlsServer
    adapter: Adapter
    admin_security: security_pb2_grpc.SecurityServiceStub
    admin_accounts: account_pb2_grpc.AccountServiceStub
    account_id: str


def open_account(accounts: account_pb2_grpc.AccountServiceStub) -> str:
    opened = accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="签名测试")))
    return opened.account.account_id


def register(security_stub: security_pb2_grpc.SecurityServiceStub, key: gm.Sm2PrivateKey,
             channel: funding_pb2.Channel.ValueType = WECHAT) -> None:
    stored = security_stub.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
        channel=channel, public_key_hex=key.public_key.to_hex()))
    assert stored.public_key_hex == key.public_key.to_hex()


@pytest.fixture
def unregistered(server_key: gm.Sm2PrivateKey, tls_server: TlsServer) -> Setup:
    """A TLS server, an account, the WeChat Pay adapter; no channel key yet."""
    admin = tls_server.channel("admin-ops")
    adapter_channel = tls_server.channel("adapter-wechat-gw")
    adapter_security = security_pb2_grpc.SecurityServiceStub(adapter_channel)
    public_hex = adapter_security.GetServerSigningKey(
        security_pb2.GetServerSigningKeyRequest()).public_key_hex
    assert public_hex == server_key.public_key.to_hex()
    adapter = Adapter(funding_pb2_grpc.FundingServiceStub(adapter_channel), adapter_security,
                      gmssl_safe_key(), public_hex)
    accounts = account_pb2_grpc.AccountServiceStub(admin)
    return Setup(tls_server, adapter, security_pb2_grpc.SecurityServiceStub(admin), accounts,
                 open_account(accounts))


@pytest.fixture
def setup(unregistered: Setup) -> Setup:
    """... with the adapter's key registered for WECHAT_PAY by the admin."""
    register(unregistered.admin_security, unregistered.adapter.key)
    return unregistered


# --- the adapter signs -------------------------------------------------------


@pytest.mark.parametrize("signer_kind", ["gmssl", "gm"])
def test_a_signed_notification_is_credited_and_the_answer_is_signed(
        setup: Setup, db: Conn, signer_kind: str) -> None:
    a = setup.adapter
    signer = gmssl_signer(a.key) if signer_kind == "gmssl" else gm_signer(a.key)
    req = a.notify(setup.account_id, 12_345, signer=signer)
    resp = a.funding.Recharge(req)
    assert resp.decision == common_pb2.DECISION_APPROVED
    assert resp.balance_fen == 12_345
    r = resp.recharge
    assert (r.account_id, r.channel, r.channel_txn_id, r.amount_fen) == (
        setup.account_id, WECHAT, req.channel_txn_id, 12_345)
    assert len(resp.signature) == 64
    assert a.answer_verifies(req, resp)
    assert account_row(db, setup.account_id)["balance_fen"] == 12_345
    assert count(db, "recharges") == 1


def test_the_answer_signature_fails_if_anything_is_altered(setup: Setup) -> None:
    a = setup.adapter
    req = a.notify(setup.account_id, 5_000)
    resp = a.funding.Recharge(req)
    assert a.answer_verifies(req, resp)
    # Not the answer to another notification.
    for other in (a.notify(setup.account_id, 5_001, txn=req.channel_txn_id),
                  a.notify(setup.account_id, 5_000)):
        assert not a.answer_verifies(other, resp, with_gmssl=False)

    def altered(change: Callable[[funding_pb2.RechargeResponse], None]) -> bool:
        copy = funding_pb2.RechargeResponse()
        copy.CopyFrom(resp)
        change(copy)
        return a.answer_verifies(req, copy, with_gmssl=False)

    changes: list[Callable[[funding_pb2.RechargeResponse], None]] = [
        lambda m: setattr(m, "decision", common_pb2.DECISION_DECLINED),
        lambda m: setattr(m, "decline_reason", common_pb2.DECLINE_REASON_BALANCE_LIMIT_EXCEEDED),
        lambda m: setattr(m, "balance_fen", m.balance_fen + 1),
        lambda m: setattr(m.recharge, "recharge_id", str(uuid.uuid4())),
        lambda m: setattr(m.recharge, "account_id", str(uuid.uuid4())),
        lambda m: setattr(m.recharge, "channel", funding_pb2.CHANNEL_ALIPAY),
        lambda m: setattr(m.recharge, "channel_txn_id", m.recharge.channel_txn_id + "x"),
        lambda m: setattr(m.recharge, "amount_fen", 50_000),
        lambda m: setattr(m.recharge.create_time, "seconds", m.recharge.create_time.seconds + 1),
        lambda m: setattr(m.recharge.create_time, "nanos", m.recharge.create_time.nanos + 1),
        lambda m: m.ClearField("recharge"),
        lambda m: setattr(m, "signature", flip(m.signature, 10)),
    ]
    for i, change in enumerate(changes):
        assert not altered(change), i
    # Signed by another key: not the server's answer.
    forged = funding_pb2.RechargeResponse()
    forged.CopyFrom(resp)
    forged.signature = gm.sm2_sign(gmssl_safe_key(), response_input(req, resp))
    assert not a.answer_verifies(req, forged)


def test_a_declined_answer_is_signed_and_bound_to_its_request(setup: Setup, db: Conn) -> None:
    a = setup.adapter
    db.execute("UPDATE fc.accounts SET max_balance_fen = 1000 WHERE uid = %s", (setup.account_id,))
    req = a.notify(setup.account_id, 1_001)
    declined = a.funding.Recharge(req)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_BALANCE_LIMIT_EXCEEDED
    assert not declined.HasField("recharge")
    assert a.answer_verifies(req, declined)
    # The same decline cannot pass as the answer to another notification.
    other = a.notify(setup.account_id, 1_001)
    assert not a.answer_verifies(other, declined)
    assert a.funding.Recharge(req) == declined  # a replay: the original answer
    assert count(db, "recharges") == 0


def test_a_replayed_notification_gets_the_same_answer_and_money_once(setup: Setup, db: Conn) -> None:
    a = setup.adapter
    req = a.notify(setup.account_id, 8_800, signer=gmssl_signer(a.key))
    first = a.funding.Recharge(req)
    after_first = snapshot(db)
    # The exact request again: the original answer, byte for byte.
    again = a.funding.Recharge(req)
    assert again == first
    # A retry re-signed by the adapter (SM2 is randomised: other signature
    # bytes) is the same request.
    resigned = funding_pb2.RechargeRequest()
    resigned.CopyFrom(req)
    resigned.signature = gm.sm2_sign(a.key, request_input(req))
    assert resigned.signature != req.signature
    assert a.funding.Recharge(resigned) == first
    # The channel notifies the same payment again under a new request_id
    # (validly signed): the original answer.
    renotified = a.notify(setup.account_id, 8_800, txn=req.channel_txn_id)
    assert renotified.request_id != req.request_id
    answer = a.funding.Recharge(renotified)
    assert answer == first
    assert answer.balance_fen == 8_800
    assert a.answer_verifies(renotified, answer)
    assert account_row(db, setup.account_id)["balance_fen"] == 8_800
    assert count(db, "recharges") == 1
    assert count(db, "journal", "kind = 1") == 1
    # Only the new request_id was remembered; no money moved.
    before, after = snapshot(db), after_first
    assert {t for t in before if before[t] != after[t]} == {"idempotency_keys"}


# --- refusals: nothing changes -----------------------------------------------


def test_an_unsigned_notification_is_refused(setup: Setup, db: Conn) -> None:
    a = setup.adapter
    req = a.notify(setup.account_id, 10_000)
    req.ClearField("signature")
    before = snapshot(db)
    expect(lambda: a.funding.Recharge(req), UNAUTH, "SIGNATURE_MISSING")
    assert snapshot(db) == before
    # A replay of a credited notification with its signature stripped, too.
    signed = a.notify(setup.account_id, 10_000)
    a.funding.Recharge(signed)
    signed.ClearField("signature")
    before = snapshot(db)
    expect(lambda: a.funding.Recharge(signed), UNAUTH, "SIGNATURE_MISSING")
    assert snapshot(db) == before


def test_bad_signatures_are_refused_and_change_nothing(setup: Setup, db: Conn) -> None:
    a = setup.adapter
    genuine = a.notify(setup.account_id, 10_000, signer=gmssl_signer(a.key))
    sig = genuine.signature
    other_key = gmssl_safe_key()

    def variant(**fields: object) -> funding_pb2.RechargeRequest:
        req = funding_pb2.RechargeRequest()
        req.CopyFrom(genuine)
        for name, value in fields.items():
            setattr(req, name, value)
        return req

    over_10 = a.notify(setup.account_id, 10, txn=genuine.channel_txn_id,
                       request_id=genuine.request_id).signature
    bad: dict[str, funding_pb2.RechargeRequest] = {
        **{f"bit {i} flipped": variant(signature=flip(sig, i)) for i in (0, 31, 32, 63)},
        "amount raised after signing": variant(amount_fen=90_000),
        "signed over another amount": variant(signature=over_10),
        "signed by another key": variant(
            signature=gmssl_signer(other_key)(request_input(genuine))),
        "replayed under a new request_id": variant(request_id=rid()),
        "moved to another account": variant(account_id=open_account(setup.admin_accounts)),
        "another channel txn id": variant(channel_txn_id=genuine.channel_txn_id + "0"),
        "another signer id": variant(
            signature=gm.sm2_sign(a.key, request_input(genuine), uid=b"wechat-gw")),
        "DER instead of r||s": variant(signature=gm.sig_to_der(sig)),
        "truncated": variant(signature=sig[:63]),
        "zeros": variant(signature=bytes(64)),
    }
    before = snapshot(db)
    for label, req in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            a.funding.Recharge(req)
        e = unpack(err.value)
        assert (e.code, e.reason) == (UNAUTH, "SIGNATURE_INVALID"), label
        assert snapshot(db) == before, label
    # The genuine notification still goes through, once.
    assert a.funding.Recharge(genuine).balance_fen == 10_000
    assert count(db, "recharges") == 1


def test_a_tampered_replay_of_a_channel_txn_is_refused(setup: Setup, db: Conn) -> None:
    a = setup.adapter
    first = a.notify(setup.account_id, 10_000)
    a.funding.Recharge(first)
    before = snapshot(db)
    # An attacker re-sends it with a larger amount: the signature breaks.
    forged = funding_pb2.RechargeRequest()
    forged.CopyFrom(first)
    forged.request_id, forged.amount_fen = rid(), 20_000
    expect(lambda: a.funding.Recharge(forged), UNAUTH, "SIGNATURE_INVALID")
    # Even validly signed, another amount for the same channel txn is refused.
    resigned = a.notify(setup.account_id, 20_000, txn=first.channel_txn_id)
    expect(lambda: a.funding.Recharge(resigned), FP, "CHANNEL_TXN_REUSED")
    # The same request_id with another amount (validly signed): a reuse.
    reused = a.notify(setup.account_id, 20_000, txn=first.channel_txn_id,
                      request_id=first.request_id)
    expect(lambda: a.funding.Recharge(reused), FP, "REQUEST_ID_REUSED")
    assert snapshot(db) == before
    assert account_row(db, setup.account_id)["balance_fen"] == 10_000


def test_no_registered_key_refuses_signed_notifications(unregistered: Setup, db: Conn) -> None:
    a = unregistered.adapter
    req = a.notify(unregistered.account_id, 10_000)
    before = snapshot(db)
    expect(lambda: a.funding.Recharge(req), FP, "CHANNEL_KEY_NOT_REGISTERED")
    unsigned = a.notify(unregistered.account_id, 10_000)
    unsigned.ClearField("signature")
    expect(lambda: a.funding.Recharge(unsigned), UNAUTH, "SIGNATURE_MISSING")
    assert snapshot(db) == before
    # Registering the key takes effect at once ("not registered" was cached).
    register(unregistered.admin_security, a.key)
    assert a.funding.Recharge(req).decision == common_pb2.DECISION_APPROVED


# --- channel keys ------------------------------------------------------------


def test_a_replaced_channel_key_takes_effect_at_once(setup: Setup, db: Conn) -> None:
    a = setup.adapter
    old_key, new_key = a.key, gmssl_safe_key()
    assert a.funding.Recharge(a.notify(setup.account_id, 100)).balance_fen == 100  # caches old_key
    register(setup.admin_security, new_key)
    before = snapshot(db)
    expect(lambda: a.funding.Recharge(a.notify(setup.account_id, 100, signer=gm_signer(old_key))),
           UNAUTH, "SIGNATURE_INVALID")
    assert snapshot(db) == before
    a.key = new_key
    assert a.funding.Recharge(a.notify(setup.account_id, 100)).balance_fen == 200


def test_recharges_do_not_read_the_channel_key_table_each_time(setup: Setup, db: Conn) -> None:
    """Within the cache's lifetime the server uses the key it read; a change
    made behind RegisterChannelKey's back (another process would make it
    through its own RegisterChannelKey) shows only after CHANNEL_KEY_TTL_S."""
    a = setup.adapter
    assert a.funding.Recharge(a.notify(setup.account_id, 100)).balance_fen == 100
    other = gmssl_safe_key()
    db.execute("UPDATE fc.channel_keys SET public_key_hex = %s WHERE channel = %s",
               (other.public_key.to_hex(), WECHAT))
    assert a.funding.Recharge(a.notify(setup.account_id, 100)).balance_fen == 200


def test_channel_key_cache_expires_and_is_invalidated(database_url: str, db: Conn) -> None:
    """security.ChannelKeys on a real database with a hand-driven clock."""
    key_a, key_b = gm.Sm2PrivateKey.generate().public_key, gm.Sm2PrivateKey.generate().public_key
    now = [1000.0]

    def put(key: gm.Sm2PublicKey) -> None:
        db.execute("INSERT INTO fc.channel_keys VALUES (%s, %s, now()) ON CONFLICT (channel)"
                   " DO UPDATE SET public_key_hex = excluded.public_key_hex", (WECHAT, key.to_hex()))

    async def scenario() -> None:
        database = Database(database_url, min_size=1, max_size=1, timeout_s=10)
        await database.open()
        try:
            cache = security.ChannelKeys(database, ttl_s=30.0, now=lambda: now[0])
            assert await cache.get(WECHAT) is None
            put(key_a)
            assert await cache.get(WECHAT) is None      # "none" is cached too
            now[0] += 29.9
            assert await cache.get(WECHAT) is None
            now[0] += 0.2                               # past the TTL
            assert await cache.get(WECHAT) == key_a
            put(key_b)
            assert await cache.get(WECHAT) == key_a     # cached
            cache.invalidate(WECHAT)                    # RegisterChannelKey does this
            assert await cache.get(WECHAT) == key_b
            assert await cache.get(funding_pb2.CHANNEL_ALIPAY) is None
            # One cache per server (per Database), shared by its servicers.
            assert security.channel_keys(database) is security.channel_keys(database)
        finally:
            await database.close()

    asyncio.run(scenario())
    assert security.CHANNEL_KEY_TTL_S == 30.0


def keys_and_money(db: Conn) -> dict[str, tuple[int, str | None]]:
    """The snapshot without the audit trail: every internal call, refused or
    not, is audited by design (audit.py)."""
    state = snapshot(db)
    state.pop("audit_log", None)
    return state


def test_register_channel_key_validates_and_only_admins_may(setup: Setup, db: Conn) -> None:
    off_curve = "01" * 32 + "02" * 32
    bad = {
        "not hex": "zz" * 64,
        "too short": setup.adapter.key.public_key.to_hex()[:126],
        "127 digits": setup.adapter.key.public_key.to_hex()[:127],
        "not on the curve": off_curve,
        "private key": setup.adapter.key.to_hex(),
        "empty": "",
    }
    before = keys_and_money(db)
    for label, text in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            setup.admin_security.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
                channel=WECHAT, public_key_hex=text))
        e = unpack(err.value)
        assert (e.code, e.reason, e.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT, "PUBLIC_KEY_INVALID", ["public_key_hex"]), label
    with pytest.raises(grpc.RpcError) as err:
        setup.admin_security.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
            public_key_hex=gmssl_safe_key().public_key.to_hex()))
    assert unpack(err.value).code == grpc.StatusCode.INVALID_ARGUMENT
    # The adapter may not register (or replace) its own channel's key.
    expect(lambda: setup.adapter.security.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
        channel=WECHAT, public_key_hex=gmssl_safe_key().public_key.to_hex())),
        grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert keys_and_money(db) == before
    # The registered key still works; "04" || X || Y is accepted and stored as X || Y.
    a = setup.adapter
    assert a.funding.Recharge(a.notify(setup.account_id, 100)).balance_fen == 100
    new_key = gmssl_safe_key()
    stored = setup.admin_security.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
        channel=WECHAT, public_key_hex="04" + new_key.public_key.to_hex().upper()))
    assert stored.public_key_hex == new_key.public_key.to_hex()


# --- development mode (plaintext loopback, no caller identities) -------------


@pytest.fixture
def dev(server_key: gm.Sm2PrivateKey, server: RunningServer) -> Iterator[RunningServer]:
    yield server


def test_development_mode_checks_signatures_only_when_present(
        server_key: gm.Sm2PrivateKey, dev: RunningServer, db: Conn) -> None:
    sec = security_pb2_grpc.SecurityServiceStub(dev.channel)
    server_hex = sec.GetServerSigningKey(security_pb2.GetServerSigningKeyRequest()).public_key_hex
    assert server_hex == server_key.public_key.to_hex()
    adapter = Adapter(dev.funding, sec, gmssl_safe_key(), server_hex)
    account_id = open_account(dev.accounts)
    # Unsigned: allowed here (there is no adapter identity), and answered signed.
    unsigned = adapter.notify(account_id, 1_000)
    unsigned.ClearField("signature")
    resp = dev.funding.Recharge(unsigned)
    assert resp.balance_fen == 1_000
    assert adapter.answer_verifies(unsigned, resp)
    # Signed, but no key registered for the channel: refused.
    before = snapshot(db)
    expect(lambda: dev.funding.Recharge(adapter.notify(account_id, 1_000)), FP,
           "CHANNEL_KEY_NOT_REGISTERED")
    assert snapshot(db) == before
    register(sec, adapter.key)
    before = snapshot(db)
    # A present signature is checked against the channel key.
    expect(lambda: dev.funding.Recharge(adapter.notify(
        account_id, 1_000, signer=gm_signer(gmssl_safe_key()))), UNAUTH, "SIGNATURE_INVALID")
    assert snapshot(db) == before
    signed = adapter.notify(account_id, 1_000, signer=gmssl_signer(adapter.key))
    resp = dev.funding.Recharge(signed)
    assert resp.balance_fen == 2_000
    assert adapter.answer_verifies(signed, resp)

