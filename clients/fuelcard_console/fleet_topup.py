"""Batch top-up (批量充值) from a CSV file: reading the file, the preview the
fleet manager checks before confirming, and the batches waiting for that
confirmation.

The file has one line per vehicle: the vehicle (its plate as the console
shows it, or its account id) and the amount in yuan, e.g.

    车牌,金额
    云A·12345,300
    云A·D7788,125.50

A header line is optional; commas or tabs separate the columns; the file may
be UTF-8 (with or without a byte order mark) or GBK, which is what a
spreadsheet program in China saves by default.

Each line of the preview is ok or says what is wrong with it (unknown
vehicle, a vehicle that shares the fleet's balance and so cannot hold money
of its own, a bad amount, a vehicle named twice). Only a preview without
errors can be confirmed, and it is sent as ONE BatchTopUp (all or nothing)
with the request_id chosen when the preview was made: a double click, a
resent form or a confirm after the step-up detour sends the same request_id,
and the core answers the first result again without moving money twice.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fuelcard.v1 import account_pb2

from fuelcard_console.fleet_forms import FormError, yuan_to_fen

MAX_LINES = 1000  # the core's BatchTopUp limit
MAX_FILE_BYTES = 256 * 1024  # 1,000 lines of a plate and an amount need about 30 KB
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEADER_WORDS = ("车", "vehicle", "plate", "account", "金额", "amount")

# The fleet's sub-accounts named in a file: by plate or by id. Read from the
# reports database (a replica when there is one): a file can name 1,000
# vehicles, and the core checks every line again when the batch is sent.
VEHICLES_SQL = """
    SELECT a.uid::text, a.label, a.funding_mode
      FROM fc.accounts a
     WHERE a.parent_id = %(parent)s
       AND (a.label = ANY(%(labels)s::text[]) OR a.uid = ANY(%(ids)s::uuid[]))"""


@dataclass(frozen=True)
class RawLine:
    line_number: int  # in the file, 1-based
    vehicle: str
    amount: str


@dataclass(frozen=True)
class Vehicle:
    account_id: str
    label: str
    funding_mode: int


@dataclass(frozen=True)
class PreviewLine:
    line_number: int
    vehicle: str  # as typed in the file
    label: str  # as the console knows it; empty if unknown
    account_id: str
    amount_fen: int
    error: str  # empty when the line is ok

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class Preview:
    lines: tuple[PreviewLine, ...]
    file_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.file_error and bool(self.lines) and all(line.ok for line in self.lines)

    @property
    def total_fen(self) -> int:
        return sum(line.amount_fen for line in self.lines if line.ok)

    @property
    def error_count(self) -> int:
        return sum(1 for line in self.lines if not line.ok)


def decode(data: bytes) -> str:
    """UTF-8 (a BOM is dropped) or, failing that, GBK; else a FormError."""
    if len(data) > MAX_FILE_BYTES:
        raise FormError("file", f"文件太大：最多 {MAX_FILE_BYTES // 1024} KB")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise FormError("file", "无法识别文件编码：请存为 UTF-8 或 GBK 的 CSV")  # pragma: no cover


def parse_csv(text: str) -> list[RawLine]:
    """The file's lines (vehicle, amount), blank lines and a header skipped."""
    dialect = "excel-tab" if "\t" in text.split("\n", 1)[0] else "excel"
    out: list[RawLine] = []
    for number, row in enumerate(csv.reader(io.StringIO(text), dialect=dialect), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if not out and number == 1 and _is_header(cells):
            continue
        vehicle = cells[0] if cells else ""
        amount = cells[1] if len(cells) > 1 else ""
        out.append(RawLine(number, vehicle, amount))
        if len(out) > MAX_LINES:
            raise FormError("file", f"一次最多 {MAX_LINES} 行")
    if not out:
        raise FormError("file", "文件里没有充值行")
    return out


def _is_header(cells: Sequence[str]) -> bool:
    first = " ".join(cells).lower()
    return any(word in first for word in _HEADER_WORDS) and not re.search(r"\d+(\.\d+)?\s*$", cells[-1])


def lookup_keys(lines: Iterable[RawLine]) -> tuple[list[str], list[str]]:
    """(labels, ids) to look the file's vehicles up by."""
    labels, ids = [], []
    for line in lines:
        if _UUID.fullmatch(line.vehicle):
            ids.append(line.vehicle.lower())
        elif line.vehicle:
            labels.append(line.vehicle)
    return sorted(set(labels)), sorted(set(ids))


def preview(lines: Sequence[RawLine], vehicles: Iterable[Vehicle]) -> Preview:
    by_id: dict[str, Vehicle] = {}
    by_label: dict[str, list[Vehicle]] = {}
    for v in vehicles:
        by_id[v.account_id] = v
        by_label.setdefault(v.label, []).append(v)
    seen: set[str] = set()
    out = []
    for line in lines:
        error, found = "", None
        if not line.vehicle:
            error = "缺少车辆"
        elif _UUID.fullmatch(line.vehicle):
            found = by_id.get(line.vehicle.lower())
        else:
            matches = by_label.get(line.vehicle, [])
            if len(matches) > 1:
                error = "有多辆车用这个车牌：请写账户编号"
            found = matches[0] if len(matches) == 1 else None
        if not error and found is None:
            error = "车队里没有这辆车"
        if found is not None and found.funding_mode != account_pb2.FUNDING_MODE_ALLOCATED:
            error = "这辆车共用车队余额，不能单独充值"
        amount = 0
        try:
            amount = yuan_to_fen(line.amount, "amount", allow_zero=False)
        except FormError as exc:
            error = error or exc.message
        if found is not None and not error:
            if found.account_id in seen:
                error = "同一辆车出现了两次"
            seen.add(found.account_id)
        out.append(PreviewLine(line.line_number, line.vehicle, found.label if found else "",
                               found.account_id if found else "", amount, error))
    return Preview(tuple(out))


# --- batches waiting for their confirmation -------------------------------------------------


@dataclass
class PendingBatch:
    batch_id: str
    user_id: str
    parent_account_id: str
    request_id: str  # sent to BatchTopUp, the same on every confirm of this batch
    preview: Preview
    created_at: dt.datetime
    result: dict[str, int | str] | None = field(default=None)


class PendingBatches:
    """Previews waiting to be confirmed, in this edge process's memory.

    A preview lives between two requests (the upload and the confirm, with
    the TOTP step-up page possibly in between), so it is kept on the server
    under a random id; the page carries only that id. Memory, not a table:
    a preview is worth a few minutes and is made again by uploading the file
    again, the console runs as one process (fuelcard-api serve), and the
    money's safety does not rest on it (the core's request_id does). Bounded
    in size and age so that uploads cannot grow it without end."""

    def __init__(self, ttl: dt.timedelta = dt.timedelta(minutes=30), max_batches: int = 1000) -> None:
        self._ttl, self._max = ttl, max_batches
        self._items: OrderedDict[str, PendingBatch] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user_id: str, parent_account_id: str, pv: Preview, now: dt.datetime) -> PendingBatch:
        batch = PendingBatch(batch_id=secrets.token_urlsafe(16), user_id=user_id,
                             parent_account_id=parent_account_id,
                             request_id="console-topup-" + secrets.token_hex(16), preview=pv,
                             created_at=now)
        with self._lock:
            self._expire(now)
            while len(self._items) >= self._max:
                self._items.popitem(last=False)
            self._items[batch.batch_id] = batch
        return batch

    def get(self, batch_id: str, user_id: str, now: dt.datetime) -> PendingBatch | None:
        """The batch, only for the user who uploaded it."""
        with self._lock:
            self._expire(now)
            batch = self._items.get(batch_id)
        if batch is None or batch.user_id != user_id:
            return None
        return batch

    def _expire(self, now: dt.datetime) -> None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.created_at <= self._ttl:
                break
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


PENDING = PendingBatches()
