"""WeChat Pay (微信支付) API v3: payment and refund notifications, trade bill.

Notifications (支付通知 / 退款结果通知) are a JSON POST: `event_type`
TRANSACTION.SUCCESS or REFUND.SUCCESS / REFUND.ABNORMAL / REFUND.CLOSED, the
business data in `resource`, encrypted with AEAD_AES_256_GCM under the
merchant's APIv3 key (nonce and associated_data alongside, ciphertext in
base64 with the tag at its end). The decrypted transaction has
out_trade_no, transaction_id (our channel txn id), trade_state,
attach (we carry the account id there), success_time and amount.total in
fen; a refund has refund_id, out_refund_no, transaction_id, refund_status
and amount.refund in fen.

Signature: the headers Wechatpay-Timestamp, Wechatpay-Nonce, Wechatpay-Serial
and Wechatpay-Signature sign "timestamp\\nnonce\\nbody\\n". WeChat signs with
RSA-SHA256 (WECHATPAY2-SHA256-RSA2048, the default when no
Wechatpay-Signature-Type is sent) or, in its national-cryptography mode, SM2
with SM3 (WECHATPAY2-SM2-WITH-SM3; signature base64 of raw r || s, the key as
X || Y). Wechatpay-Serial names the platform key (WeChat rotates them, so
several are configured by serial); an unknown serial or a key of the other
kind does not verify. A timestamp more than 5 minutes from our clock is
refused (a replayed notification), and so are WeChat's deliberate
bad-signature probes (a signature starting WECHATPAY/SIGNTEST/, sent to check
that merchants verify): they are bad signatures, answered as such.

Answer: HTTP 200 with no body when the notification is taken; otherwise a
4XX/5XX with {"code": "FAIL", "message": ...}, and WeChat notifies again.

Trade bill (交易账单, bill_type ALL): CSV, every value prefixed with a
backtick, amounts in yuan, times in Beijing time, then a summary header
(总交易单数,...) and one summary line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fuelcard.v1 import funding_pb2

from fuelcard_adapters.framework import (
    BadNotification,
    Event,
    EventKind,
    HttpReply,
    HttpRequest,
    Outcome,
    Result,
)
from fuelcard_adapters.neutral import SHANGHAI, FormatError, Kind, NeutralRecord, Status, parse_yuan
from fuelcard_adapters.signing import ChannelKey, rsa_verify, sm2_verify

CHANNEL = funding_pb2.CHANNEL_WECHAT_PAY
RSA_SIGNATURE_TYPE = "WECHATPAY2-SHA256-RSA2048"
SM2_SIGNATURE_TYPE = "WECHATPAY2-SM2-WITH-SM3"
SIGNATURE_TYPE = SM2_SIGNATURE_TYPE
PROBE_PREFIX = "WECHATPAY/SIGNTEST/"
MAX_SKEW_S = 300.0  # WeChat's own rule for its notifications: 5 minutes


def _fen(value: Any, name: str) -> int:
    if type(value) is not int or value <= 0:
        raise BadNotification(f"{name} must be a positive integer of fen")
    return value


def _text(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise BadNotification(f"{name} is missing")
    return value


@dataclass
class WeChatPay:
    platform_keys: Mapping[str, ChannelKey]  # WeChat Pay's platform keys by serial
    apiv3_key: bytes                         # 32 bytes
    channel: int = CHANNEL
    # Our clock (seconds since the epoch), against Wechatpay-Timestamp.
    now: Callable[[], float] = field(default=time.time, repr=False)
    max_skew_s: float = MAX_SKEW_S

    def parse_notification(self, request: HttpRequest) -> Event:
        h = request.headers
        try:
            timestamp, nonce = h["wechatpay-timestamp"], h["wechatpay-nonce"]
            encoded, serial = h["wechatpay-signature"], h["wechatpay-serial"]
        except KeyError:
            raise BadNotification("Wechatpay-* signature headers missing") from None
        if encoded.startswith(PROBE_PREFIX):
            raise BadNotification("Wechatpay-Signature is a signature probe")
        try:
            signature = base64.b64decode(encoded, validate=True)
            sent = int(timestamp)
        except (binascii.Error, ValueError):
            raise BadNotification("Wechatpay-Signature or -Timestamp malformed") from None
        if abs(self.now() - sent) > self.max_skew_s:
            raise BadNotification("Wechatpay-Timestamp is more than 5 minutes off")
        key = self.platform_keys.get(serial)
        if key is None:
            raise BadNotification("Wechatpay-Serial names no platform key we hold")
        message = f"{timestamp}\n{nonce}\n".encode() + request.body + b"\n"
        kind = h.get("wechatpay-signature-type", RSA_SIGNATURE_TYPE)
        if kind == RSA_SIGNATURE_TYPE and isinstance(key, rsa.RSAPublicKey):
            verified = rsa_verify(key, message, signature)
        elif kind == SM2_SIGNATURE_TYPE and isinstance(key, bytes):
            verified = sm2_verify(key, message, signature)
        else:
            raise BadNotification("Wechatpay-Signature-Type does not match the platform key")
        if not verified:
            raise BadNotification("Wechatpay-Signature does not verify")
        try:
            body = json.loads(request.body)
            res = body["resource"]
            if res.get("algorithm") != "AEAD_AES_256_GCM":
                raise BadNotification("resource.algorithm is not AEAD_AES_256_GCM")
            plain = AESGCM(self.apiv3_key).decrypt(
                res["nonce"].encode(), base64.b64decode(res["ciphertext"], validate=True),
                (res.get("associated_data") or "").encode())
            data = json.loads(plain)
            event_type = body["event_type"]
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error, InvalidTag):
            raise BadNotification("body or resource is not a WeChat Pay v3 notification") from None
        if not isinstance(data, dict):
            raise BadNotification("resource is not an object")
        amount = data.get("amount")
        if not isinstance(amount, dict):
            raise BadNotification("amount is missing")
        if event_type == "TRANSACTION.SUCCESS":
            if data.get("trade_state") != "SUCCESS":
                return Event(EventKind.IGNORE)
            if amount.get("currency", "CNY") != "CNY":
                raise BadNotification("amount.currency is not CNY")
            return Event(EventKind.PAYMENT, channel_txn_id=_text(data, "transaction_id"),
                         account_id=_text(data, "attach"), amount_fen=_fen(amount.get("total"),
                                                                           "amount.total"))
        if event_type.startswith("REFUND."):
            if event_type != "REFUND.SUCCESS" or data.get("refund_status") != "SUCCESS":
                return Event(EventKind.IGNORE)  # closed or abnormal: no money went back
            return Event(EventKind.REFUND, channel_txn_id=_text(data, "transaction_id"),
                         refund_id=_text(data, "refund_id"),
                         amount_fen=_fen(amount.get("refund"), "amount.refund"))
        return Event(EventKind.IGNORE)

    def reply(self, result: Result) -> HttpReply:
        if result.outcome is Outcome.ACCEPTED:
            return HttpReply(200)
        status = 400 if result.outcome is Outcome.REJECTED else 500
        body = json.dumps({"code": "FAIL", "message": "失败"}, ensure_ascii=False).encode()
        return HttpReply(status, body, {"content-type": "application/json"})


# --- the trade bill -----------------------------------------------------------

BILL_HEADER = ("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,"
               "交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,"
               "充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注")
SUMMARY_HEADER = "总交易单数"
_PAY_STATUS = {"SUCCESS": Status.SUCCESS, "REVOKED": Status.FAILED, "CLOSED": Status.FAILED,
               "PAYERROR": Status.FAILED, "NOTPAY": Status.PROCESSING,
               "USERPAYING": Status.PROCESSING}
_REFUND_STATUS = {"SUCCESS": Status.SUCCESS, "PROCESSING": Status.PROCESSING,
                  "CLOSED": Status.FAILED, "ABNORMAL": Status.FAILED, "FAIL": Status.FAILED}


def parse_bill(lines: Iterable[str]) -> Iterator[NeutralRecord]:
    """The ALL trade bill to neutral records; FormatError naming the line."""
    rows = csv.reader(lines)
    header = next(rows, None)
    if header is None or ",".join(header).lstrip("\ufeff") != BILL_HEADER:
        raise FormatError("line 1: not a WeChat Pay trade bill header")
    # The summary line's totals, recomputed from the rows: a bill cut short
    # or edited shows here. Refund rows carry 0.00 as their settled amount
    # and a negative fee, so the sums are over every row, as WeChat sums them.
    count = settled = refunded = fees = 0
    for n, row in enumerate(rows, start=2):
        if row and row[0] == SUMMARY_HEADER:
            summary = [v.removeprefix("`") for v in next(rows, None) or []]
            if len(summary) < 5 or summary[0] != str(count):
                raise FormatError(f"line {n + 1}: summary count does not match {count} rows")
            try:
                totals = (parse_yuan(summary[1]), parse_yuan(summary[2]),
                          parse_yuan(summary[4], allow_negative=True))
            except FormatError as exc:
                raise FormatError(f"line {n + 1}: summary: {exc}") from None
            if totals != (settled, refunded, fees):
                raise FormatError(f"line {n + 1}: summary totals (settled, refunded, fees) do not"
                                  " match the rows")
            return
        try:
            if len(row) != 27:
                raise FormatError("not 27 fields")
            # The fields read here (every value is prefixed with a backtick).
            when, txn, state, currency, refund_id, refund_amount, refund_state, fee, amount = (
                row[0], row[5], row[9], row[11], row[14], row[16], row[19], row[22], row[24])
            if not (when[:1] == txn[:1] == state[:1] == currency[:1] == refund_id[:1]
                    == refund_amount[:1] == refund_state[:1] == fee[:1] == amount[:1] == "`"):
                raise FormatError("a value without its backtick")
            time = dt.datetime.fromisoformat(when[1:]).replace(tzinfo=SHANGHAI)
            if currency != "`CNY":
                raise FormatError("currency is not CNY")
            if not row[12].startswith("`"):
                raise FormatError("a value without its backtick")
            settled += parse_yuan(row[12][1:])
            refunded += parse_yuan(refund_amount[1:])
            fees += parse_yuan(fee[1:], allow_negative=True)
            if state == "`REFUND":
                yield NeutralRecord(CHANNEL, Kind.REFUND, refund_id[1:], parse_yuan(refund_amount[1:]),
                                    time, _REFUND_STATUS[refund_state[1:]],
                                    abs(parse_yuan(fee[1:], allow_negative=True)), txn[1:])
            else:
                yield NeutralRecord(CHANNEL, Kind.PAYMENT, txn[1:], parse_yuan(amount[1:]), time,
                                    _PAY_STATUS[state[1:]], parse_yuan(fee[1:]))
            count += 1
        except (FormatError, ValueError, KeyError) as exc:
            raise FormatError(f"line {n}: {exc}") from None
    raise FormatError("the bill ends without its summary (truncated?)")
