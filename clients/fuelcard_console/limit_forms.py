"""The family holder's forms read into what the core takes: caps typed in yuan
become fen, a raise's window typed in Beijing time becomes UTC, and the
amount a limit-raise step-up is bound to is worked out as step_up.proto
defines it.

An input error is a FormError naming the field in Chinese; nothing reaches the
core until the whole form reads.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from fuelcard.v1 import control_pb2
from google.protobuf import timestamp_pb2

BEIJING = ZoneInfo("Asia/Shanghai")
MAX_FEN = 10**12  # a cap above 100 亿元 is a typing mistake
MAX_RAISE_DAYS = 90  # GrantTemporaryRaise's limit
_YUAN = re.compile(r"(\d{1,10})(?:\.(\d{1,2}))?")
_POINTS = re.compile(r"\d{1,12}")
CAP_FIELDS = (("per_transaction_fen", "单笔上限"), ("daily_fen", "每日上限"), ("monthly_fen", "每月上限"))


class FormError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def yuan_to_fen(text: str, field: str, label: str) -> int:
    """"12.5" yuan -> 1250 fen; an empty field is 0 (no cap). Exact: parsed as decimal text,
    never through a float."""
    text = text.strip().replace(",", "").replace("，", "")
    if not text:
        return 0
    m = _YUAN.fullmatch(text)
    if m is None:
        raise FormError(field, f"{label}须为金额（元），至多两位小数")
    fen = int(m.group(1)) * 100 + int((m.group(2) or "0").ljust(2, "0"))
    if fen > MAX_FEN:
        raise FormError(field, f"{label}过大")
    return fen


def fen_to_yuan(fen: int) -> str:
    """1250 -> "12.50"; 0 -> "" (no cap, shown as an empty field)."""
    return f"{fen // 100}.{fen % 100:02d}" if fen else ""


def limits_from(form: dict[str, str]) -> control_pb2.SpendingLimits:
    """The three caps of a form whose fields are named like SpendingLimits' fields, in yuan."""
    return control_pb2.SpendingLimits(**{
        name: yuan_to_fen(form.get(name, ""), name, label) for name, label in CAP_FIELDS})


def step_up_amount(limits: control_pb2.SpendingLimits) -> int:
    """The amount a STEP_UP_KIND_LIMIT_RAISE challenge is bound to (step_up.proto): the highest
    cap the request sets, or 0 when it leaves any of the three unset (no cap)."""
    caps = (limits.per_transaction_fen, limits.daily_fen, limits.monthly_fen)
    return 0 if 0 in caps else max(caps)


def points_from(text: str) -> int:
    text = text.strip()
    if not _POINTS.fullmatch(text) or int(text) == 0:
        raise FormError("points", "积分须为正整数")
    return int(text)


def local_time(text: str, field: str) -> dt.datetime:
    """A datetime-local field ("2026-11-25T08:00"), Beijing time, as an aware UTC datetime."""
    try:
        naive = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise FormError(field, "时间格式须为 YYYY-MM-DDTHH:MM") from None
    if naive.tzinfo is not None:
        raise FormError(field, "请填写北京时间，不带时区")
    return naive.replace(tzinfo=BEIJING).astimezone(dt.UTC)


@dataclass(frozen=True)
class RaiseWindow:
    start: dt.datetime
    end: dt.datetime

    @classmethod
    def parse(cls, start_text: str, end_text: str) -> RaiseWindow:
        start, end = local_time(start_text, "start_time"), local_time(end_text, "end_time")
        if end <= start:
            raise FormError("end_time", "结束时间须晚于开始时间")
        if end - start > dt.timedelta(days=MAX_RAISE_DAYS):
            raise FormError("end_time", f"临时提额至多 {MAX_RAISE_DAYS} 天")
        return cls(start, end)

    def timestamps(self) -> tuple[timestamp_pb2.Timestamp, timestamp_pb2.Timestamp]:
        start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
        start.FromDatetime(self.start)
        end.FromDatetime(self.end)
        return start, end

    def local_text(self) -> tuple[str, str]:
        """The window as the form's datetime-local values, to carry it to the code page."""
        fmt = "%Y-%m-%dT%H:%M"
        return self.start.astimezone(BEIJING).strftime(fmt), self.end.astimezone(BEIJING).strftime(fmt)
