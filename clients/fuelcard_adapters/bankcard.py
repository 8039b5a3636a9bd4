"""Bank-card quick pay (银行卡快捷支付), UnionPay online gateway style (银联全渠道
5.1.0): backend notification (后台通知, backUrl) and the daily settlement file.

Notifications are a form-encoded POST: txnType 01 (consume) or 04 (refund,
退货), txnAmt in fen, currencyCode 156, orderId, txnTime (YYYYMMDDhhmmss,
Beijing), queryId (UnionPay's id: our channel txn id; for a refund, the
refund's own id) and origQryId (a refund's original consume), respCode "00"
for success, reqReserved (we carry the account id there), signature.

Signature: over every other non-empty field sorted by name, "k=v" joined by
"&", by signMethod:
  01  RSA: `signature` = base64 SHA256withRSA over the SHA-256 hex digest of
      that string, by the UnionPay signing certificate named by `certId`
      (configured by id: UnionPay rotates them);
  12  secure key: `signature` = hex SM3(string + "&" + hex SM3(secure key)),
      the secure key shared with UnionPay;
  02  SM2 (raw r || s, base64), a channel key as X || Y: our own choice for
      bank-card acquirers that sign with SM2.
respCode 00 (success) and A6 (success with a defect: the money moved) are
payments; any other respCode moves nothing.

Answer: HTTP 200 and UnionPay stops; any other status and it notifies again.

Settlement file (an abridged fixed-width layout after UnionPay's ZM file):
one line per transaction, fields separated by one space:
  txn code 3 (S22 consume, S30 refund) | queryId 21 | origQryId 21 |
  orderId 32 | txnTime 14 | amount 12 (fen) | fee 12 (fen) | respCode 2
left-justified and space-padded (numbers zero-padded); then a trailer line
"TRL" | count 12 | total amount 16.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

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
from fuelcard_adapters.neutral import SHANGHAI, FormatError, Kind, NeutralRecord, Status, parse_fen
from fuelcard_adapters.signing import rsa_verify, secure_key_digest, sm2_verify, sorted_pairs

CHANNEL = funding_pb2.CHANNEL_BANK_CARD
ENCODING = "utf-8"
WIDTHS = (3, 21, 21, 32, 14, 12, 12, 2)
LINE_CHARS = sum(WIDTHS) + len(WIDTHS) - 1


SUCCESS_CODES = frozenset({"00", "A6"})


@dataclass
class BankCard:
    mer_id: str
    certificates: Mapping[str, rsa.RSAPublicKey] = field(default_factory=dict)  # 01, by certId
    secure_key: str = field(default="", repr=False)                          # 12
    sm2_public_key: bytes = b""                                              # 02, X || Y
    channel: int = CHANNEL

    def _verified(self, p: dict[str, str]) -> bool:
        signed = sorted_pairs(p, exclude=("signature",))
        method = p.get("signMethod")
        try:
            if method == "12" and self.secure_key:
                return hmac.compare_digest(p["signature"].lower(),
                                           secure_key_digest(signed, self.secure_key))
            signature = base64.b64decode(p["signature"], validate=True)
        except (KeyError, binascii.Error, TypeError):
            return False
        if method == "01":
            cert = self.certificates.get(p.get("certId", ""))
            return cert is not None and rsa_verify(
                cert, hashlib.sha256(signed).hexdigest().encode(), signature)
        if method == "02" and self.sm2_public_key:
            return sm2_verify(self.sm2_public_key, signed, signature)
        return False

    def parse_notification(self, request: HttpRequest) -> Event:
        try:
            pairs = urllib.parse.parse_qsl(request.body.decode(), keep_blank_values=True,
                                           strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            raise BadNotification("not a form-encoded notification") from None
        p = dict(pairs)
        if len(p) != len(pairs) or "signature" not in p:
            raise BadNotification("duplicate parameters, or no signature")
        if not self._verified(p):
            raise BadNotification("signature does not verify (signMethod 01, 12 or 02)")
        if p.get("merId") != self.mer_id or p.get("currencyCode") != "156":
            raise BadNotification("merId is not ours or currencyCode is not 156")
        if p.get("respCode") not in SUCCESS_CODES:
            return Event(EventKind.IGNORE)  # a failed transaction moves no money
        query_id = p.get("queryId", "")
        amount = parse_fen(p.get("txnAmt", ""))
        if not query_id or amount <= 0:
            raise BadNotification("queryId or txnAmt is missing")
        if p.get("txnType") == "01":
            if not p.get("reqReserved"):
                raise BadNotification("reqReserved (the account) is missing")
            return Event(EventKind.PAYMENT, channel_txn_id=query_id,
                         account_id=p["reqReserved"], amount_fen=amount)
        if p.get("txnType") == "04":
            if not p.get("origQryId"):
                raise BadNotification("a refund without origQryId")
            return Event(EventKind.REFUND, channel_txn_id=p["origQryId"], refund_id=query_id,
                         amount_fen=amount)
        return Event(EventKind.IGNORE)

    def reply(self, result: Result) -> HttpReply:
        return HttpReply(200, b"ok") if result.outcome is Outcome.ACCEPTED else HttpReply(500)


def _time(w: str) -> dt.datetime:
    """YYYYMMDDhhmmss, Beijing time (fromisoformat: strptime is 10x slower)."""
    if len(w) != 14 or not w.isdigit():
        raise FormatError("txnTime is not YYYYMMDDhhmmss")
    return dt.datetime.fromisoformat(
        f"{w[:4]}-{w[4:6]}-{w[6:8]}T{w[8:10]}:{w[10:12]}:{w[12:]}").replace(tzinfo=SHANGHAI)


def parse_bill(lines: Iterable[str]) -> Iterator[NeutralRecord]:
    count = total = 0
    for n, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if line.startswith("TRL"):
            parts = line.split()
            if len(parts) != 3 or int(parts[1]) != count or int(parts[2]) != total:
                raise FormatError(f"line {n}: trailer does not match the {count} lines")
            return
        try:
            if len(line) != LINE_CHARS:
                raise FormatError(f"not {LINE_CHARS} characters")
            fields, at = [], 0
            for w in WIDTHS:
                fields.append(line[at:at + w].strip())
                at += w + 1
            code, query_id, orig, _order, when, amount, fee, resp = fields
            time = _time(when)
            status = Status.SUCCESS if resp == "00" else Status.FAILED
            fen = parse_fen(amount)
            if code == "S22":
                yield NeutralRecord(CHANNEL, Kind.PAYMENT, query_id, fen, time, status,
                                    parse_fen(fee))
            elif code == "S30":
                yield NeutralRecord(CHANNEL, Kind.REFUND, query_id, fen, time, status,
                                    parse_fen(fee), orig)
            else:
                raise FormatError("unknown txn code")
            count += 1
            total += fen
        except (FormatError, ValueError) as exc:
            raise FormatError(f"line {n}: {exc}") from None
    raise FormatError("the file ends without its trailer (truncated?)")
