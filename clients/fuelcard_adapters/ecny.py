"""Digital RMB (数字人民币, e-CNY) merchant acquiring: result notification and
daily statement.

The e-CNY acquiring interfaces are published by each operating institution
to its merchants, not openly; this follows their common shape. Notifications
are a JSON POST: txnType PAY or REFUND, txnSeqNo (the wallet system's id: our
channel txn id; a refund's own id for a refund), origTxnSeqNo (a refund's
payment), orderNo, txnAmt in fen as a decimal string, currency CNY,
txnStatus SUCCESS / FAIL / PROCESSING, txnTime (YYYYMMDDhhmmss, Beijing),
attach (we carry the account id there), signType SM2 and signature: base64
raw r || s over every other non-empty field sorted by name, "k=v" joined by
"&" (e-CNY signs with SM2 natively). Answer: {"respCode": "000000"} taken;
any other respCode and the institution notifies again.

Statement: UTF-8, '|'-delimited, a header line, one line per transaction,
a trailer "合计|count|total fen".
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
from fuelcard_adapters.neutral import SHANGHAI, FormatError, Kind, NeutralRecord, Status, parse_fen
from fuelcard_adapters.signing import sm2_verify, sorted_pairs

CHANNEL = funding_pb2.CHANNEL_ECNY
ENCODING = "utf-8"
BILL_HEADER = "交易日期|交易时间|交易流水号|原交易流水号|商户订单号|交易类型|交易金额(分)|手续费(分)|交易状态"
_STATUS = {"SUCCESS": Status.SUCCESS, "FAIL": Status.FAILED, "PROCESSING": Status.PROCESSING}


@dataclass
class Ecny:
    institution_public_key: bytes  # X || Y
    channel: int = CHANNEL

    def parse_notification(self, request: HttpRequest) -> Event:
        try:
            p = json.loads(request.body)
            if not isinstance(p, dict) or not all(isinstance(v, str) for v in p.values()):
                raise ValueError
            signature = base64.b64decode(p["signature"], validate=True)
        except (ValueError, KeyError, binascii.Error):
            raise BadNotification("not an e-CNY notification with a signature") from None
        if p.get("signType") != "SM2" or not sm2_verify(
                self.institution_public_key, sorted_pairs(p, exclude=("signature",)), signature):
            raise BadNotification("signature does not verify")
        if p.get("currency") != "CNY":
            raise BadNotification("currency is not CNY")
        if p.get("txnStatus") != "SUCCESS":
            return Event(EventKind.IGNORE)
        seq, amount = p.get("txnSeqNo", ""), parse_fen(p.get("txnAmt", ""))
        if not seq or amount <= 0:
            raise BadNotification("txnSeqNo or txnAmt is missing")
        if p.get("txnType") == "PAY" and p.get("attach"):
            return Event(EventKind.PAYMENT, channel_txn_id=seq, account_id=p["attach"],
                         amount_fen=amount)
        if p.get("txnType") == "REFUND" and p.get("origTxnSeqNo"):
            return Event(EventKind.REFUND, channel_txn_id=p["origTxnSeqNo"], refund_id=seq,
                         amount_fen=amount)
        raise BadNotification("txnType with its attach / origTxnSeqNo is missing")

    def reply(self, result: Result) -> HttpReply:
        ok = result.outcome is Outcome.ACCEPTED
        body = {"respCode": "000000", "respMsg": "成功"} if ok else {
            "respCode": "999999", "respMsg": "失败"}
        return HttpReply(200, json.dumps(body, ensure_ascii=False).encode(),
                         {"content-type": "application/json"})


def parse_bill(lines: Iterable[str]) -> Iterator[NeutralRecord]:
    it = iter(lines)
    if next(it, "").strip().lstrip("\ufeff") != BILL_HEADER:
        raise FormatError("line 1: not an e-CNY statement header")
    count = total = 0
    for n, raw in enumerate(it, start=2):
        f = raw.rstrip("\r\n").split("|")
        if f[0] == "合计":
            if len(f) != 3 or int(f[1]) != count or int(f[2]) != total:
                raise FormatError(f"line {n}: trailer does not match the {count} lines")
            return
        try:
            if len(f) != 9:
                raise FormatError("not 9 fields")
            day, clock, seq, orig, _order, kind, amount, fee, status = f
            time = dt.datetime.fromisoformat(f"{day}T{clock}").replace(tzinfo=SHANGHAI)
            fen = parse_fen(amount)
            k = {"PAY": Kind.PAYMENT, "REFUND": Kind.REFUND}[kind]
            yield NeutralRecord(CHANNEL, k, seq, fen, time, _STATUS[status], parse_fen(fee),
                                orig if k is Kind.REFUND else "")
            count += 1
            total += fen
        except (FormatError, ValueError, KeyError) as exc:
            raise FormatError(f"line {n}: {exc}") from None
    raise FormatError("the statement ends without its trailer (truncated?)")
