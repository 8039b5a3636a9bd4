"""Channel simulators: WeChat Pay, Alipay, bank card (UnionPay style) and
e-CNY, each speaking its channel's own notification shape (field names,
amount units, where the signature sits, what answer means "taken"), as the
adapters' docstrings describe from the channels' public documentation.

The real channels cannot be reached from here; these stand in for them in
tests only. Each holds the channel's signing key (generated in the test: RSA
as WeChat Pay, Alipay and UnionPay sign by default, or SM2 / UnionPay's
secure key where a test asks) and makes notifications of payments and
refunds, re-notifications of the same event (what a channel sends when it
did not get its "taken" answer), and forgeries.

They are also HTTP clients: `post` sends a notification to the notification
service as the channel would, and `deliver` keeps re-notifying as the channel
does until it gets its "taken" answer (each channel's retry schedule, with
the waits compressed for tests; a hook runs between attempts).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import itertools
import json
import secrets
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fuelcard.v1 import funding_pb2
from fuelcard_adapters import alipay, bankcard, ecny, wechat
from fuelcard_adapters.framework import ChannelMapping, HttpReply, HttpRequest
from fuelcard_adapters.neutral import SHANGHAI, format_yuan
from fuelcard_adapters.signing import Sm2Signer, secure_key_digest, sorted_pairs

_seq = itertools.count(1)
NOW = dt.datetime(2026, 11, 25, 10, 0, tzinfo=SHANGHAI)


def _digits(n: int) -> str:
    return "".join(secrets.choice("0123456789") for _ in range(n))


@dataclass(frozen=True)
class RsaSigner:
    """A channel's RSA key pair: SHA256withRSA, PKCS#1 v1.5."""

    private: rsa.RSAPrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> RsaSigner:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def public(self) -> rsa.RSAPublicKey:
        return self.private.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())


Signer = RsaSigner | Sm2Signer


def wall_clock() -> dt.datetime:
    return dt.datetime.now(SHANGHAI)


def fixed_clock() -> dt.datetime:
    return NOW


@dataclass
class Notice:
    """A notification as sent, with the channel's ids of what it is about."""

    request: HttpRequest
    txn_id: str                     # the payment's id at the channel
    refund_id: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


class Simulator(Protocol):
    name: str
    channel: int
    path: str  # the notification service's URL path for this channel

    def mapping(self) -> ChannelMapping: ...
    def pay(self, account_id: str, amount_fen: int) -> Notice: ...
    def refund(self, paid: Notice, amount_fen: int) -> Notice: ...
    def resend(self, notice: Notice) -> HttpRequest: ...
    def forge_amount(self, notice: Notice, amount_fen: int) -> HttpRequest: ...
    def taken(self, reply: HttpReply) -> bool: ...


# --- WeChat Pay API v3 --------------------------------------------------------


@dataclass
class WeChatSim:
    name: str = "WECHAT_PAY"
    channel: int = funding_pb2.CHANNEL_WECHAT_PAY
    path: str = "/notify/wechat"
    # RSA (WECHATPAY2-SHA256-RSA2048, WeChat's default) or SM2 (WECHATPAY2-SM2-WITH-SM3)
    key: Signer = field(default_factory=RsaSigner.generate)
    # 32 characters, as the merchant platform has the merchant set it
    apiv3_key: bytes = field(default_factory=lambda: secrets.token_hex(16).encode())
    serial: str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1"
    clock: Callable[[], dt.datetime] = fixed_clock

    def mapping(self) -> ChannelMapping:
        return wechat.WeChatPay({self.serial: self.key.public}, self.apiv3_key,
                                now=lambda: self.clock().timestamp())

    @property
    def signature_type(self) -> str:
        return wechat.SM2_SIGNATURE_TYPE if isinstance(self.key, Sm2Signer) else \
            wechat.RSA_SIGNATURE_TYPE

    def _notify(self, event_type: str, original_type: str, data: dict[str, Any],
                signer: Signer | None = None, sign_body: bytes | None = None,
                at: dt.datetime | None = None) -> HttpRequest:
        nonce = secrets.token_hex(6)  # 12 characters
        ciphertext = AESGCM(self.apiv3_key).encrypt(
            nonce.encode(), json.dumps(data, ensure_ascii=False).encode(), original_type.encode())
        when = at or self.clock()
        body = json.dumps({
            "id": str(uuid.uuid4()), "create_time": when.isoformat(),
            "resource_type": "encrypt-resource", "event_type": event_type,
            "summary": "支付成功" if original_type == "transaction" else "退款成功",
            "resource": {"original_type": original_type, "algorithm": "AEAD_AES_256_GCM",
                         "ciphertext": base64.b64encode(ciphertext).decode(),
                         "associated_data": original_type, "nonce": nonce}},
            ensure_ascii=False).encode()
        timestamp, header_nonce = str(int(when.timestamp())), secrets.token_hex(16).upper()
        signed = f"{timestamp}\n{header_nonce}\n".encode() + (sign_body or body) + b"\n"
        return HttpRequest(body, {
            "content-type": "application/json",
            "wechatpay-timestamp": timestamp, "wechatpay-nonce": header_nonce,
            "wechatpay-serial": self.serial,
            "wechatpay-signature-type": self.signature_type,
            "wechatpay-signature": base64.b64encode((signer or self.key).sign(signed)).decode()})

    def stale(self, notice: Notice, minutes: float = 6) -> HttpRequest:
        """The notification signed with a timestamp `minutes` old (a replay)."""
        refund = bool(notice.refund_id)
        return self._notify("REFUND.SUCCESS" if refund else "TRANSACTION.SUCCESS",
                            "refund" if refund else "transaction", notice.fields,
                            at=self.clock() - dt.timedelta(minutes=minutes))

    def probe(self, notice: Notice) -> HttpRequest:
        """WeChat's deliberate bad-signature probe of a genuine body."""
        headers = dict(notice.request.headers)
        headers["wechatpay-signature"] = wechat.PROBE_PREFIX + secrets.token_hex(32)
        return HttpRequest(notice.request.body, headers)

    def pay(self, account_id: str, amount_fen: int) -> Notice:
        txn = "4200" + _digits(24)
        data = {"mchid": "1900000109", "appid": "wx8888888888888888",
                "out_trade_no": f"FC{next(_seq):012d}", "transaction_id": txn,
                "trade_type": "NATIVE", "trade_state": "SUCCESS", "trade_state_desc": "支付成功",
                "bank_type": "CMB_DEBIT", "attach": account_id, "success_time": NOW.isoformat(),
                "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
                "amount": {"total": amount_fen, "payer_total": amount_fen, "currency": "CNY",
                           "payer_currency": "CNY"}}
        return Notice(self._notify("TRANSACTION.SUCCESS", "transaction", data), txn, fields=data)

    def refund(self, paid: Notice, amount_fen: int) -> Notice:
        refund_id = "5030" + _digits(25)
        total = paid.fields["amount"]["total"]
        data = {"mchid": "1900000109", "out_trade_no": paid.fields["out_trade_no"],
                "transaction_id": paid.txn_id, "out_refund_no": f"RF{next(_seq):012d}",
                "refund_id": refund_id, "refund_status": "SUCCESS", "success_time": NOW.isoformat(),
                "user_received_account": "招商银行信用卡0403",
                "amount": {"total": total, "refund": amount_fen, "payer_total": total,
                           "payer_refund": amount_fen}}
        return Notice(self._notify("REFUND.SUCCESS", "refund", data), paid.txn_id, refund_id, data)

    def resend(self, notice: Notice) -> HttpRequest:
        refund = bool(notice.refund_id)
        return self._notify("REFUND.SUCCESS" if refund else "TRANSACTION.SUCCESS",
                            "refund" if refund else "transaction", notice.fields)

    def forge_amount(self, notice: Notice, amount_fen: int) -> HttpRequest:
        """The body changed (re-encrypted: as if the APIv3 key leaked) under
        the genuine notification's signature headers."""
        data = json.loads(json.dumps(notice.fields))
        data["amount"]["refund" if notice.refund_id else "total"] = amount_fen
        forged = self._notify("TRANSACTION.SUCCESS", "transaction", data)
        return HttpRequest(forged.body, notice.request.headers)

    def taken(self, reply: HttpReply) -> bool:
        return reply.status in (200, 204)


# --- Alipay ---------------------------------------------------------------------


def _form(params: dict[str, str], signer: Signer, exclude: tuple[str, ...], name: str
          ) -> HttpRequest:
    signed = dict(params)
    signed[name] = base64.b64encode(signer.sign(sorted_pairs(signed, exclude=exclude))).decode()
    return HttpRequest(urllib.parse.urlencode(signed).encode(),
                       {"content-type": "application/x-www-form-urlencoded; charset=utf-8"})


@dataclass
class AlipaySim:
    name: str = "ALIPAY"
    channel: int = funding_pb2.CHANNEL_ALIPAY
    path: str = "/notify/alipay"
    key: Signer = field(default_factory=RsaSigner.generate)  # RSA2 by default, or SM2
    app_id: str = "2021000000000001"
    seller_id: str = "2088101117955611"
    refunded: dict[str, int] = field(default_factory=dict)
    clock: Callable[[], dt.datetime] = fixed_clock

    def mapping(self) -> ChannelMapping:
        return alipay.Alipay(self.key.public, self.app_id, seller_id=self.seller_id)

    @property
    def sign_type(self) -> str:
        return "SM2" if isinstance(self.key, Sm2Signer) else "RSA2"

    def _send(self, params: dict[str, str]) -> HttpRequest:
        params = {**params, "notify_id": uuid.uuid4().hex, "sign_type": self.sign_type,
                  "notify_time": self.clock().strftime("%Y-%m-%d %H:%M:%S")}
        return _form(params, self.key, ("sign", "sign_type"), "sign")

    def pay(self, account_id: str, amount_fen: int, status: str = "TRADE_SUCCESS") -> Notice:
        trade_no = "2026112522001" + _digits(15)
        amount = format_yuan(amount_fen)
        params = {"notify_type": "trade_status_sync", "app_id": self.app_id, "charset": "utf-8",
                  "version": "1.0", "sign_type": self.sign_type, "trade_no": trade_no,
                  "out_trade_no": f"FC{next(_seq):012d}", "trade_status": status,
                  "total_amount": amount, "receipt_amount": amount, "buyer_pay_amount": amount,
                  "gmt_create": "2026-11-25 09:59:50", "gmt_payment": "2026-11-25 10:00:00",
                  "subject": "加油卡充值", "passback_params": account_id,
                  "buyer_id": "2088102122524333", "seller_id": self.seller_id}
        return Notice(self._send(params), trade_no, fields=params)

    def refund(self, paid: Notice, amount_fen: int) -> Notice:
        total = self.refunded.get(paid.txn_id, 0) + amount_fen
        self.refunded[paid.txn_id] = total
        full = total == alipay_amount(paid)
        out_biz_no = f"RF{next(_seq):012d}"
        params = {**paid.fields, "trade_status": "TRADE_CLOSED" if full else "TRADE_SUCCESS",
                  "out_biz_no": out_biz_no, "refund_fee": format_yuan(total),
                  "gmt_refund": "2026-11-25 11:00:00.123"}
        return Notice(self._send(params), paid.txn_id, out_biz_no, params)

    def resend(self, notice: Notice) -> HttpRequest:
        return self._send(notice.fields)

    def forge_amount(self, notice: Notice, amount_fen: int) -> HttpRequest:
        params = dict(urllib.parse.parse_qsl(notice.request.body.decode()))
        params["refund_fee" if notice.refund_id else "total_amount"] = format_yuan(amount_fen)
        return HttpRequest(urllib.parse.urlencode(params).encode(), notice.request.headers)

    def taken(self, reply: HttpReply) -> bool:
        return reply.body == b"success"


def alipay_amount(paid: Notice) -> int:
    whole, _, cents = paid.fields["total_amount"].partition(".")
    return int(whole) * 100 + int(cents)


# --- bank card, UnionPay style ---------------------------------------------------


@dataclass
class BankCardSim:
    name: str = "BANK_CARD"
    channel: int = funding_pb2.CHANNEL_BANK_CARD
    path: str = "/notify/unionpay"
    sign_method: str = "01"  # 01 RSA by certId, 12 SM3 secure key, 02 SM2
    key: Signer = field(default_factory=RsaSigner.generate)
    sm2_key: Sm2Signer = field(default_factory=Sm2Signer.generate)
    secure_key: str = field(default_factory=lambda: secrets.token_hex(16))
    cert_id: str = "69629715588"
    mer_id: str = "898111148990001"
    clock: Callable[[], dt.datetime] = fixed_clock

    def mapping(self) -> ChannelMapping:
        rsa_key = self.key.public
        return bankcard.BankCard(
            self.mer_id, {self.cert_id: rsa_key} if isinstance(rsa_key, rsa.RSAPublicKey) else {},
            self.secure_key, self.sm2_key.public)

    def _sign(self, params: dict[str, str]) -> HttpRequest:
        signed = dict(params)
        data = sorted_pairs(signed, exclude=("signature",))
        if self.sign_method == "01":
            signature = base64.b64encode(
                self.key.sign(hashlib.sha256(data).hexdigest().encode())).decode()
        elif self.sign_method == "12":
            signature = secure_key_digest(data, self.secure_key)
        else:
            signature = base64.b64encode(self.sm2_key.sign(data)).decode()
        signed["signature"] = signature
        return HttpRequest(urllib.parse.urlencode(signed).encode(),
                           {"content-type": "application/x-www-form-urlencoded; charset=utf-8"})

    def _params(self, txn_type: str, amount_fen: int, query_id: str) -> dict[str, str]:
        now = self.clock()
        params = {"version": "5.1.0", "encoding": "UTF-8", "signMethod": self.sign_method,
                  "txnType": txn_type, "txnSubType": "01" if txn_type == "01" else "00",
                  "bizType": "000301", "accessType": "0", "merId": self.mer_id,
                  "orderId": f"FC{next(_seq):012d}", "txnTime": now.strftime("%Y%m%d%H%M%S"),
                  "txnAmt": str(amount_fen), "currencyCode": "156", "queryId": query_id,
                  "respCode": "00", "respMsg": "Success!", "traceNo": _digits(6),
                  "traceTime": now.strftime("%m%d%H%M%S"), "settleDate": now.strftime("%m%d"),
                  "settleAmt": str(amount_fen), "settleCurrencyCode": "156",
                  "accNo": "6216***********0018"}
        if self.sign_method == "01":
            params["certId"] = self.cert_id
        return params

    def pay(self, account_id: str, amount_fen: int) -> Notice:
        query_id = "7" + _digits(20)
        params = {**self._params("01", amount_fen, query_id), "reqReserved": account_id}
        return Notice(self._sign(params), query_id, fields=params)

    def refund(self, paid: Notice, amount_fen: int) -> Notice:
        query_id = "8" + _digits(20)
        params = {**self._params("04", amount_fen, query_id), "origQryId": paid.txn_id}
        return Notice(self._sign(params), paid.txn_id, query_id, params)

    def resend(self, notice: Notice) -> HttpRequest:
        return notice.request  # UnionPay resends the same message

    def forge_amount(self, notice: Notice, amount_fen: int) -> HttpRequest:
        params = dict(urllib.parse.parse_qsl(notice.request.body.decode()))
        params["txnAmt"] = params["settleAmt"] = str(amount_fen)
        return HttpRequest(urllib.parse.urlencode(params).encode(), notice.request.headers)

    def taken(self, reply: HttpReply) -> bool:
        return reply.status == 200


# --- e-CNY ------------------------------------------------------------------------


@dataclass
class EcnySim:
    name: str = "ECNY"
    channel: int = funding_pb2.CHANNEL_ECNY
    path: str = "/notify/ecny"
    key: Sm2Signer = field(default_factory=Sm2Signer.generate)
    clock: Callable[[], dt.datetime] = fixed_clock

    def mapping(self) -> ChannelMapping:
        return ecny.Ecny(self.key.public)

    def _send(self, params: dict[str, str]) -> HttpRequest:
        signed = dict(params)
        signed["signature"] = base64.b64encode(
            self.key.sign(sorted_pairs(signed, exclude=("signature",)))).decode()
        return HttpRequest(json.dumps(signed, ensure_ascii=False).encode(),
                           {"content-type": "application/json"})

    def _params(self, kind: str, seq: str, amount_fen: int) -> dict[str, str]:
        return {"version": "1.0", "merchantNo": "M10000000001", "orderNo": f"FC{next(_seq):012d}",
                "txnSeqNo": seq, "txnType": kind, "txnAmt": str(amount_fen), "currency": "CNY",
                "txnStatus": "SUCCESS", "txnTime": self.clock().strftime("%Y%m%d%H%M%S"),
                "signType": "SM2"}

    def pay(self, account_id: str, amount_fen: int) -> Notice:
        seq = "E" + _digits(24)
        params = {**self._params("PAY", seq, amount_fen), "attach": account_id}
        return Notice(self._send(params), seq, fields=params)

    def refund(self, paid: Notice, amount_fen: int) -> Notice:
        seq = "R" + _digits(24)
        params = {**self._params("REFUND", seq, amount_fen), "origTxnSeqNo": paid.txn_id}
        return Notice(self._send(params), paid.txn_id, seq, params)

    def resend(self, notice: Notice) -> HttpRequest:
        return self._send(notice.fields)

    def forge_amount(self, notice: Notice, amount_fen: int) -> HttpRequest:
        params = json.loads(notice.request.body)
        params["txnAmt"] = str(amount_fen)
        return HttpRequest(json.dumps(params).encode(), notice.request.headers)

    def taken(self, reply: HttpReply) -> bool:
        return reply.status == 200 and json.loads(reply.body).get("respCode") == "000000"


SIMULATORS: dict[str, type[WeChatSim | AlipaySim | BankCardSim | EcnySim]] = {
    "WECHAT_PAY": WeChatSim, "ALIPAY": AlipaySim, "BANK_CARD": BankCardSim, "ECNY": EcnySim}


# --- over HTTP ------------------------------------------------------------------------

# How often each channel notifies again when it did not get its "taken"
# answer (seconds after the first try), from the channels' documentation;
# `deliver` keeps the count and order, not the waits.
RETRY_SCHEDULES: dict[str, tuple[float, ...]] = {
    "WECHAT_PAY": (15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800,
                   21600, 21600),
    "ALIPAY": (240, 600, 600, 3600, 7200, 21600, 54000),
    "BANK_CARD": (1, 2, 4, 8, 16),
    "ECNY": (15, 60, 300, 1800, 3600),
}


async def post(session: aiohttp.ClientSession, base_url: str, path: str, request: HttpRequest
               ) -> HttpReply:
    """One notification, sent as the channel sends it."""
    async with session.post(base_url + path, data=request.body,
                            headers=dict(request.headers)) as resp:
        body = await resp.read()
        return HttpReply(resp.status, body, {k.lower(): v for k, v in resp.headers.items()})


@dataclass
class Delivery:
    taken: bool
    attempts: int
    replies: list[HttpReply]


async def deliver(sim: Simulator, session: aiohttp.ClientSession, base_url: str, notice: Notice,
                  between: Callable[[int], Awaitable[None]] | None = None,
                  pause_s: float = 0.05) -> Delivery:
    """Notify until taken, as the channel does: the first notification, then
    a re-notification (fresh id, time and signature) per retry of the
    channel's schedule. `between(n)` runs before retry n (a test changes the
    world there); `pause_s` stands for the channel's wait."""
    replies = [await post(session, base_url, sim.path, notice.request)]
    for n in range(1, len(RETRY_SCHEDULES[sim.name]) + 1):
        if sim.taken(replies[-1]):
            break
        if between is not None:
            await between(n)
        await asyncio.sleep(pause_s)
        replies.append(await post(session, base_url, sim.path, sim.resend(notice)))
    return Delivery(sim.taken(replies[-1]), len(replies), replies)
