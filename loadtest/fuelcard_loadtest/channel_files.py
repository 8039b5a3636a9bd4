"""Channel settlement files, written the way each channel writes them: the
simulators' side of reconciliation (tests, and the 1 000 000-record
benchmark). The readers are fuelcard_adapters.<channel>.parse_bill.

`write(name, records, day, path)` writes neutral records as that channel's
daily file. Formats that cannot say a status (Alipay lists completed
transactions only; the bank-card file says success or failure) refuse
records they cannot express.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fuelcard_adapters import alipay, bankcard, ecny, wechat
from fuelcard_adapters.channels import by_name
from fuelcard_adapters.neutral import SHANGHAI, Kind, NeutralRecord, Status, format_yuan

Writer = Callable[[Iterable[NeutralRecord], dt.date], Iterator[str]]


def _local(r: NeutralRecord) -> dt.datetime:
    return r.time.astimezone(SHANGHAI)


_WX_PAY = {Status.SUCCESS: "SUCCESS", Status.FAILED: "CLOSED", Status.PROCESSING: "NOTPAY"}
_WX_REFUND = {Status.SUCCESS: "SUCCESS", Status.FAILED: "CLOSED", Status.PROCESSING: "PROCESSING"}


def wechat_bill(records: Iterable[NeutralRecord], day: dt.date) -> Iterator[str]:
    yield wechat.BILL_HEADER + "\r\n"
    n = settled = refunded = fees = ordered = 0
    for r in records:
        when = _local(r).strftime("%Y-%m-%d %H:%M:%S")
        if r.kind is Kind.PAYMENT:
            amount = format_yuan(r.amount_fen)
            fields = [when, "wx8888888888888888", "1900000109", "0", "", r.channel_txn_id,
                      f"FC{r.channel_txn_id[-20:]}", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o", "NATIVE",
                      _WX_PAY[r.status], "CMB_DEBIT", "CNY", amount, "0.00", "0", "0", "0.00",
                      "0.00", "", "", "加油卡充值", "", format_yuan(r.fee_fen), "0.60%", amount,
                      "0.00", ""]
            settled += r.amount_fen
            ordered += r.amount_fen
            fees += r.fee_fen
        else:
            fields = [when, "wx8888888888888888", "1900000109", "0", "", r.original_channel_txn_id,
                      f"FC{r.original_channel_txn_id[-20:]}", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o",
                      "NATIVE", "REFUND", "CMB_DEBIT", "CNY", "0.00", "0.00", r.channel_txn_id,
                      f"RF{r.channel_txn_id[-20:]}", format_yuan(r.amount_fen), "0.00",
                      "ORIGINAL", _WX_REFUND[r.status], "加油卡充值", "", format_yuan(-r.fee_fen),
                      "0.60%", "0.00", format_yuan(r.amount_fen), ""]
            refunded += r.amount_fen
            fees -= r.fee_fen
        n += 1
        yield ",".join("`" + f for f in fields) + "\r\n"
    yield "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\r\n"
    yield ",".join("`" + v for v in (str(n), format_yuan(settled), format_yuan(refunded), "0.00",
                                     format_yuan(fees), format_yuan(ordered),
                                     format_yuan(refunded))) + "\r\n"


def alipay_bill(records: Iterable[NeutralRecord], day: dt.date) -> Iterator[str]:
    yield "#支付宝业务明细查询\r\n"
    yield "#账号：[20881234567890120156]\r\n"
    yield (f"#起始日期：[{day:%Y年%m月%d日} 00:00:00]   "
           f"终止日期：[{day + dt.timedelta(days=1):%Y年%m月%d日} 00:00:00]\r\n")
    yield "#-----------------------------------------业务明细列表----------------------------------------\r\n"
    yield alipay.BILL_HEADER + "\r\n"
    trades = refunds = 0
    trade_total = refund_total = 0
    for r in records:
        if r.status is not Status.SUCCESS:
            raise ValueError("the Alipay bill lists completed transactions only")
        when = _local(r).strftime("%Y-%m-%d %H:%M:%S")
        if r.kind is Kind.PAYMENT:
            amount, fee = format_yuan(r.amount_fen), format_yuan(-r.fee_fen)
            row = [r.channel_txn_id, f"FC{r.channel_txn_id[-20:]}", "交易", "加油卡充值", when, when,
                   "", "", "", "", "buy***@163.com", amount, amount, "0.00", "0.00", "0.00",
                   "0.00", "0.00", "", "0.00", "0.00", "", fee, "0.00", ""]
            trades += 1
            trade_total += r.amount_fen
        else:
            amount, fee = format_yuan(-r.amount_fen), format_yuan(r.fee_fen)
            row = [r.original_channel_txn_id, f"FC{r.original_channel_txn_id[-20:]}", "退款",
                   "加油卡充值", when, when, "", "", "", "", "buy***@163.com", amount, amount,
                   "0.00", "0.00", "0.00", "0.00", "0.00", "", "0.00", "0.00", r.channel_txn_id,
                   fee, "0.00", ""]
            refunds += 1
            refund_total += r.amount_fen
        yield ",".join(v + "\t" if v else v for v in row) + "\r\n"
    yield "#-----------------------------------------业务明细列表结束------------------------------------\r\n"
    yield f"#交易合计：{trades}笔，商家实收共{format_yuan(trade_total)}元\r\n"
    yield f"#退款合计：{refunds}笔，商家实收退款共{format_yuan(refund_total)}元\r\n"
    yield f"#导出时间：[{day + dt.timedelta(days=1):%Y年%m月%d日} 09:00:00]\r\n"


def bankcard_file(records: Iterable[NeutralRecord], day: dt.date) -> Iterator[str]:
    count = total = 0
    for r in records:
        if r.status is Status.PROCESSING:
            raise ValueError("the bank-card file says success or failure only")
        code = "S22" if r.kind is Kind.PAYMENT else "S30"
        fields = (code.ljust(3), r.channel_txn_id.ljust(21), r.original_channel_txn_id.ljust(21),
                  f"FC{r.channel_txn_id[-20:]}".ljust(32), _local(r).strftime("%Y%m%d%H%M%S"),
                  f"{r.amount_fen:012d}", f"{r.fee_fen:012d}",
                  "00" if r.status is Status.SUCCESS else "01")
        line = " ".join(fields)
        if len(line) != bankcard.LINE_CHARS:
            raise ValueError("a field is too wide for the bank-card file")
        count += 1
        total += r.amount_fen
        yield line + "\n"
    yield f"TRL {count:012d} {total:016d}\n"


_ECNY_STATUS = {Status.SUCCESS: "SUCCESS", Status.FAILED: "FAIL", Status.PROCESSING: "PROCESSING"}


def ecny_statement(records: Iterable[NeutralRecord], day: dt.date) -> Iterator[str]:
    yield ecny.BILL_HEADER + "\n"
    count = total = 0
    for r in records:
        t = _local(r)
        kind = "PAY" if r.kind is Kind.PAYMENT else "REFUND"
        yield (f"{t:%Y-%m-%d}|{t:%H:%M:%S}|{r.channel_txn_id}|{r.original_channel_txn_id}|"
               f"FC{r.channel_txn_id[-20:]}|{kind}|{r.amount_fen}|{r.fee_fen}|"
               f"{_ECNY_STATUS[r.status]}\n")
        count += 1
        total += r.amount_fen
    yield f"合计|{count}|{total}\n"


WRITERS: dict[str, Writer] = {"WECHAT_PAY": wechat_bill, "ALIPAY": alipay_bill,
                              "BANK_CARD": bankcard_file, "ECNY": ecny_statement}


def write(name: str, records: Iterable[NeutralRecord], day: dt.date, path: Path) -> Path:
    """Write `records` as channel `name`'s file for `day`, in its encoding."""
    files = by_name(name)
    encoding = "utf-8" if files.encoding == "utf-8-sig" else files.encoding
    with path.open("w", encoding=encoding, newline="") as out:
        buf: list[str] = []
        for line in WRITERS[name.upper().removeprefix("CHANNEL_")](records, day):
            buf.append(line)
            if len(buf) >= 10_000:
                out.write("".join(buf))
                buf.clear()
        out.write("".join(buf))
    return path
