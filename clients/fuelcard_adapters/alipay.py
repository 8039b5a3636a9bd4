"""Alipay (支付宝): asynchronous notification (异步通知) and the business
detail bill (业务明细).

Notifications are a form-encoded POST (notify_type trade_status_sync):
trade_no (Alipay's id: our channel txn id), out_trade_no, trade_status
(WAIT_BUYER_PAY, TRADE_SUCCESS, TRADE_FINISHED, TRADE_CLOSED), total_amount
in yuan as a decimal string, passback_params (we carry the account id), and
for refunds out_biz_no (the refund request no: our channel refund id),
refund_fee (the TOTAL refunded so far, yuan) and gmt_refund. A partial
refund arrives with trade_status TRADE_SUCCESS, a full one with TRADE_CLOSED.

Signature: `sign` (base64) over every other parameter but sign and
sign_type, sorted by name, "k=v" joined with "&", values URL-decoded. Alipay
signs with RSA2 (SHA256withRSA, an RSA Alipay public key); its SDKs also know
sign_type SM2 (raw r || s, an SM2 key as X || Y): the configured key's kind
says which sign_type is accepted.

Our records: app_id must be ours, seller_id (when configured) our merchant
PID, out_trade_no present; a refund notification restates the payment's
total_amount, which must be the amount the core booked for trade_no.

Refunds go to the core as that running total (RefundRecharge
refunded_total_fen): the core refunds the difference under the account's lock,
so the total is right in any order. If two partial refunds are notified out
of order, the later refund id carries both amounts and the earlier one is
"already covered": the day's reconciliation then shows them as an amount
mismatch and a missing refund, for a person to look at.

Answer: the literal body "success", or Alipay notifies again (8 times over
25 hours); "fail" otherwise.

Bill: the 业务明细 CSV (GBK): '#' comment lines, a header, one row per trade
(业务类型 交易) or refund (退款; negative amounts; 退款批次号/请求号 is
out_biz_no), 服务费 (the fee) negative on trades, then '#交易合计：N笔' and
'#退款合计：M笔' trailer lines.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa
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
from fuelcard_adapters.signing import ChannelKey, channel_verify, sorted_pairs

CHANNEL = funding_pb2.CHANNEL_ALIPAY
ENCODING = "gbk"
PAID = frozenset({"TRADE_SUCCESS", "TRADE_FINISHED"})


@dataclass
class Alipay:
    alipay_public_key: ChannelKey  # RSA (sign_type RSA2) or SM2 X || Y (sign_type SM2)
    app_id: str
    seller_id: str = ""  # our merchant PID (2088...); "" = not checked
    channel: int = CHANNEL

    def parse_notification(self, request: HttpRequest) -> Event:
        try:
            pairs = urllib.parse.parse_qsl(request.body.decode(), keep_blank_values=True,
                                           strict_parsing=True)
            sign = base64.b64decode(dict(pairs)["sign"], validate=True)
        except (UnicodeDecodeError, ValueError, KeyError, binascii.Error):
            raise BadNotification("not a form-encoded notification with a sign") from None
        p = dict(pairs)
        if len(p) != len(pairs):
            raise BadNotification("a parameter appears twice")
        expected = "RSA2" if isinstance(self.alipay_public_key, rsa.RSAPublicKey) else "SM2"
        if p.get("sign_type") != expected:
            raise BadNotification(f"sign_type is not {expected}")
        if not channel_verify(self.alipay_public_key,
                              sorted_pairs(p, exclude=("sign", "sign_type")), sign):
            raise BadNotification("sign does not verify")
        if p.get("app_id") != self.app_id:
            raise BadNotification("app_id is not ours")
        if self.seller_id and p.get("seller_id") != self.seller_id:
            raise BadNotification("seller_id is not ours")
        status, trade_no = p.get("trade_status", ""), p.get("trade_no", "")
        if not trade_no or not p.get("out_trade_no"):
            raise BadNotification("trade_no or out_trade_no is missing")
        refunded = parse_yuan(p["refund_fee"]) if p.get("refund_fee") else 0
        if refunded > 0:
            if not p.get("out_biz_no"):
                raise BadNotification("a refund without out_biz_no")
            total = parse_yuan(p["total_amount"]) if p.get("total_amount") else 0
            return Event(EventKind.REFUND, channel_txn_id=trade_no, refund_id=p["out_biz_no"],
                         refunded_total_fen=refunded, payment_total_fen=total)
        if status in PAID:
            amount = parse_yuan(p.get("total_amount", ""))
            if amount <= 0 or not p.get("passback_params"):
                raise BadNotification("total_amount or passback_params is missing")
            return Event(EventKind.PAYMENT, channel_txn_id=trade_no,
                         account_id=p["passback_params"], amount_fen=amount)
        return Event(EventKind.IGNORE)  # WAIT_BUYER_PAY, or closed unpaid

    def reply(self, result: Result) -> HttpReply:
        return HttpReply(200, b"success" if result.outcome is Outcome.ACCEPTED else b"fail",
                         {"content-type": "text/plain"})


# --- the business detail bill -------------------------------------------------

BILL_HEADER = ("支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,"
               "对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,"
               "商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,卡消费金额（元）,"
               "退款批次号/请求号,服务费（元）,分润（元）,备注")
END_MARK = "#-----------------------------------------业务明细列表结束"


def _count(line: str, label: str) -> int:
    if not line.startswith(label) or "笔" not in line:
        raise FormatError(f"expected a '{label}' trailer line")
    return int(line[len(label):line.index("笔")])


def parse_bill(lines: Iterable[str]) -> Iterator[NeutralRecord]:
    it = iter(lines)
    pos = [0, 0]  # line number, whether the end mark was seen
    for line in it:
        pos[0] += 1
        if not line.startswith("#"):
            if line.strip().lstrip("\ufeff") != BILL_HEADER:
                raise FormatError(f"line {pos[0]}: not an Alipay 业务明细 header")
            break
    else:
        raise FormatError("no Alipay 业务明细 header")

    def body() -> Iterator[str]:
        for line in it:
            pos[0] += 1
            if line.startswith("#"):
                if not line.startswith(END_MARK):
                    raise FormatError(f"line {pos[0]}: unexpected comment line")
                pos[1] = 1
                return
            yield line

    trades = refunds = 0
    for row in csv.reader(body()):
        try:
            if len(row) != 25:
                raise FormatError("not 25 fields")
            kind = row[2].strip()
            finished = row[5].strip()
            time = dt.datetime.fromisoformat(finished or row[4].strip()).replace(tzinfo=SHANGHAI)
            fee = abs(parse_yuan(row[22].strip(), allow_negative=True))
            amount = abs(parse_yuan(row[11].strip(), allow_negative=True))
            if kind == "交易":
                trades += 1
                yield NeutralRecord(CHANNEL, Kind.PAYMENT, row[0].strip(), amount, time,
                                    Status.SUCCESS, fee)
            elif kind == "退款":
                refunds += 1
                yield NeutralRecord(CHANNEL, Kind.REFUND, row[21].strip(), amount, time,
                                    Status.SUCCESS, fee, row[0].strip())
            else:
                raise FormatError("业务类型 is neither 交易 nor 退款")
        except (FormatError, ValueError) as exc:
            raise FormatError(f"line {pos[0]}: {exc}") from None
    if not pos[1]:
        raise FormatError("the bill ends without its end mark (truncated?)")
    try:
        if _count(next(it), "#交易合计：") != trades or _count(next(it), "#退款合计：") != refunds:
            raise FormatError("trailer counts do not match the rows (truncated?)")
    except (StopIteration, ValueError) as exc:
        raise FormatError(f"after line {pos[0]}: bad trailer: {exc}") from None
