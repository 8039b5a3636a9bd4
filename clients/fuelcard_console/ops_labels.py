"""The reviewer's and finance's words (zh-CN) for the core's enums and refusals.

The core speaks in enum numbers and UPPER_SNAKE reasons; the people using
the review queue and the finance pages read Chinese. Amounts are shown in
yuan with two decimals and times in Beijing time, as on the channels' bills,
so a line can be checked against a bill by eye; everything sent to the core
stays in fen.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING

from fuelcard.v1 import adjustment_pb2, common_pb2, funding_pb2, settlement_pb2
from fuelcard_adapters.neutral import SHANGHAI, format_yuan
from google.protobuf.timestamp_pb2 import Timestamp

if TYPE_CHECKING:
    from fuelcard_console.context import CoreRefusal

CHANNELS_ZH: dict[int, str] = {
    funding_pb2.CHANNEL_BANK_CARD: "银联/银行卡",
    funding_pb2.CHANNEL_WECHAT_PAY: "微信支付",
    funding_pb2.CHANNEL_ALIPAY: "支付宝",
    funding_pb2.CHANNEL_ECNY: "数字人民币",
    funding_pb2.CHANNEL_COUNTER: "柜台",
}
# The channels whose daily settlement files reconciliation reads
# (fuelcard_adapters.channels.CHANNELS), by that module's names.
FILE_CHANNELS: dict[str, str] = {
    "WECHAT_PAY": "微信支付",
    "ALIPAY": "支付宝",
    "BANK_CARD": "银联/银行卡",
    "ECNY": "数字人民币",
}
BREAK_KINDS_ZH: dict[int, str] = {
    settlement_pb2.BREAK_KIND_MISSING_OURS: "我方无记录（渠道有）",
    settlement_pb2.BREAK_KIND_MISSING_THEIRS: "渠道无记录（我方有）",
    settlement_pb2.BREAK_KIND_AMOUNT_MISMATCH: "金额不符",
    settlement_pb2.BREAK_KIND_STATUS_MISMATCH: "状态不符",
}
# reconcile.Result.counts keys
OUTCOMES_ZH: dict[str, str] = {
    "matched": "一致",
    "missing_ours": "我方无记录（渠道有）",
    "missing_theirs": "渠道无记录（我方有）",
    "amount_mismatch": "金额不符",
    "status_mismatch": "状态不符",
}
SETTLEMENT_KINDS_ZH: dict[int, str] = {
    settlement_pb2.SETTLEMENT_KIND_PAYMENT: "支付",
    settlement_pb2.SETTLEMENT_KIND_REFUND: "退款",
}
SETTLEMENT_STATUS_ZH: dict[int, str] = {
    settlement_pb2.SETTLEMENT_STATUS_SUCCESS: "成功",
    settlement_pb2.SETTLEMENT_STATUS_FAILED: "失败",
    settlement_pb2.SETTLEMENT_STATUS_PROCESSING: "处理中",
}
SETTLEMENT_EXCEPTION_KINDS_ZH: dict[int, str] = {
    settlement_pb2.SETTLEMENT_EXCEPTION_KIND_LATE_CONFIRM_NO_FUNDS: "迟到确认时余额不足（已加油未扣款）",
    settlement_pb2.SETTLEMENT_EXCEPTION_KIND_OVERRUN_SHORTFALL: "超额加油差额未能扣款",
    settlement_pb2.SETTLEMENT_EXCEPTION_KIND_CHANNEL_PAYMENT_REFUSED:
        "渠道已收款但核心拒绝入账（需渠道退款）",
}
SETTLEMENT_EXCEPTION_STATES_ZH: dict[int, str] = {
    settlement_pb2.SETTLEMENT_EXCEPTION_STATE_OPEN: "待处理",
    settlement_pb2.SETTLEMENT_EXCEPTION_STATE_RESOLVED: "已处理",
    settlement_pb2.SETTLEMENT_EXCEPTION_STATE_SETTLED: "系统已结清",
}
CHANNEL_EXCEPTION_KINDS_ZH: dict[int, str] = {
    settlement_pb2.CHANNEL_EXCEPTION_KIND_REFUND_SHORTFALL: "渠道退款时账户余额不足",
}
CHANNEL_EXCEPTION_STATES_ZH: dict[int, str] = {
    settlement_pb2.CHANNEL_EXCEPTION_STATE_OPEN: "待处理",
    settlement_pb2.CHANNEL_EXCEPTION_STATE_RESOLVED: "已处理",
}
ADJUSTMENT_DIRECTIONS_ZH: dict[int, str] = {
    adjustment_pb2.ADJUSTMENT_DIRECTION_CREDIT: "调增（入账）",
    adjustment_pb2.ADJUSTMENT_DIRECTION_DEBIT: "调减（扣账）",
}
ADJUSTMENT_STATES_ZH: dict[int, str] = {
    adjustment_pb2.ADJUSTMENT_STATE_PROPOSED: "待复核",
    adjustment_pb2.ADJUSTMENT_STATE_APPROVED: "已批准入账",
    adjustment_pb2.ADJUSTMENT_STATE_REJECTED: "已驳回",
}
HOLD_STATES_ZH: dict[int, str] = {
    common_pb2.HOLD_STATE_AUTHORIZED: "已授权",
    common_pb2.HOLD_STATE_CONFIRMED: "已完成",
    common_pb2.HOLD_STATE_CANCELLED: "已取消",
    common_pb2.HOLD_STATE_EXPIRED: "已过期",
    common_pb2.HOLD_STATE_SUSPENDED: "暂挂待审",
    common_pb2.HOLD_STATE_REJECTED: "已拒绝",
}
PRODUCTS_ZH: dict[int, str] = {
    common_pb2.PRODUCT_GASOLINE_92: "92# 汽油",
    common_pb2.PRODUCT_GASOLINE_95: "95# 汽油",
    common_pb2.PRODUCT_GASOLINE_98: "98# 汽油",
    common_pb2.PRODUCT_DIESEL_0: "0# 柴油",
    common_pb2.PRODUCT_DIESEL_MINUS_10: "-10# 柴油",
    common_pb2.PRODUCT_GAS: "天然气",
    common_pb2.PRODUCT_SHOP: "便利店商品",
}

# The refusals these pages can meet, in words; anything else is shown with
# its reason code so that it can still be looked up.
REFUSALS_ZH: dict[str, str] = {
    "OWN_ADJUSTMENT": "不能复核自己提交的调账：须由另一位财务人员批准（双人复核）。",
    "ADJUSTMENT_ALREADY_DECIDED": "该调账已被处理过（已批准或已驳回）。",
    "ADJUSTMENT_NOT_FOUND": "找不到该调账。",
    "ADJUSTMENT_EXCEEDS_AVAILABLE": "调减后账户余额将低于冻结金额，无法批准；调账仍待复核。",
    "MAX_BALANCE_EXCEEDED": "调增后账户余额将超过上限，无法批准；调账仍待复核。",
    "ACCOUNT_NOT_FOUND": "找不到该账户。",
    "ACCOUNT_USES_PARENT_BALANCE": "该子账户使用主账户余额，请对主账户调账。",
    "BREAK_ALREADY_RESOLVED": "该差错已被处理过。",
    "BREAK_NOT_FOUND": "找不到该差错。",
    "SETTLEMENT_EXCEPTION_ALREADY_RESOLVED": "该结算异常已关闭（已处理或系统已结清）。",
    "SETTLEMENT_EXCEPTION_NOT_FOUND": "找不到该结算异常。",
    "CHANNEL_EXCEPTION_ALREADY_RESOLVED": "该渠道异常已被处理过。",
    "CHANNEL_EXCEPTION_NOT_FOUND": "找不到该渠道异常。",
    "HOLD_NOT_SUSPENDED": "该预授权已不在暂挂状态（可能已被他人审核，或终端已取消）。",
    "HOLD_EXPIRED": "该预授权已过期，资金已释放，无法再审核。",
    "HOLD_NOT_FOUND": "找不到该预授权。",
    "ROLE_NOT_ALLOWED": "核心系统拒绝：当前身份无权执行此操作。",
    "REVIEWER_NOT_CONFIGURED": "控制台未配置审核员证书，暂不能审核。",
    "PAGE_TOKEN_INVALID": "分页参数无效，请从第一页重新查看。",
    "RESOLUTION_INVALID": "处理说明须为 1-500 个字符。",
    "UNAVAILABLE": "核心系统暂不可用，请稍后再试。",
    "DEADLINE_EXCEEDED": "核心系统响应超时，请稍后再试。",
}


def refusal_zh(reason: str) -> str:
    """A refusal for a person: the words if we have them, with the code."""
    words = REFUSALS_ZH.get(reason)
    return f"{words}（{reason}）" if words else f"操作被拒绝（{reason}）。"


def outcome_of(refusal: CoreRefusal) -> str:
    """A refusal as the audit trail's outcome: "<status code> <REASON>", as
    the core writes its own."""
    code = refusal.code.name if refusal.code is not None else "UNKNOWN"
    return f"{code} {refusal.reason}"


def yuan(fen: int | None) -> str:
    """12345 -> '123.45'; None -> '-'."""
    return "-" if fen is None else format_yuan(int(fen))


def beijing(at: dt.datetime | Timestamp | None) -> str:
    """Beijing wall-clock time; '-' when unset."""
    if isinstance(at, Timestamp):
        if not at.seconds and not at.nanos:
            return "-"
        at = at.ToDatetime(dt.UTC)
    return "-" if at is None else at.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")


_FEN = re.compile(r"^\s*(\d{1,8})(?:\.(\d{1,2}))?\s*$")


def parse_yuan(text: str) -> int | None:
    """'123.45' -> 12345 fen; None if it is not a positive amount in yuan
    with at most two decimals (no float on the way: money is int fen)."""
    m = _FEN.match(text)
    if m is None:
        return None
    fen = int(m.group(1)) * 100 + int((m.group(2) or "0").ljust(2, "0"))
    return fen if fen > 0 else None


# Card numbers are 16-19 digits, mobile phones 11; a run of 11 or more digits
# anywhere in what a page shows from free text (an audit row, a note) is
# masked to its last 4, so a number typed into a note by mistake is not
# shown back.
_LONG_DIGITS = re.compile(r"\d{11,}")


def mask_digits(text: str) -> str:
    return _LONG_DIGITS.sub(lambda m: "*" * (len(m.group()) - 4) + m.group()[-4:], text)
