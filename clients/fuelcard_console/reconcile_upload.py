"""Reconciliation (对账) of an uploaded settlement file, for the finance page.

There is no RPC for it: `fuelcard reconcile` runs fuelcard_server.reconcile
against the database, and so does this, with the same function, so the
page and the command store the same runs and breaks (fc.reconciliation_runs
and fc.reconciliation_breaks, which the serving role may write) and the
breaks are then followed up through ReconciliationService like any other.
reconcile() is synchronous (one connection, one transaction, COPY): it runs
in a worker thread so the edge's event loop keeps serving.

The upload is written to a private temporary file first (reconcile() reads
a path, and names the run after the file's name), and removed afterwards.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fuelcard_adapters.channels import CHANNELS
from fuelcard_adapters.neutral import FormatError
from fuelcard_console.ops_labels import FILE_CHANNELS, mask_digits
from fuelcard_server import reconcile

# A day's file of a busy channel is tens of MB; the edge must accept it
# (aiohttp's client_max_size) for the upload to reach here.
MAX_FILE_BYTES = 256 * 1024 * 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class UploadError(ValueError):
    """Why the file was not reconciled, in words for the page."""


@dataclass(frozen=True)
class Upload:
    channel: str  # a key of fuelcard_adapters.channels.CHANNELS
    day: dt.date
    file_name: str
    data: bytes


def check(channel: str, day_text: str, file_name: str, data: bytes) -> Upload:
    """The upload, checked; UploadError (zh-CN) if a part is missing or wrong."""
    if channel not in FILE_CHANNELS or channel not in CHANNELS:
        raise UploadError("请选择渠道")
    try:
        day = dt.date.fromisoformat(day_text.strip())
    except ValueError:
        raise UploadError("业务日期须为 YYYY-MM-DD") from None
    if not data:
        raise UploadError("请选择对账文件（文件为空）")
    if len(data) > MAX_FILE_BYTES:
        raise UploadError(f"文件过大（最多 {MAX_FILE_BYTES // (1024 * 1024)} MB）")
    # The run keeps the file's name: only a plain one (no path, nothing odd).
    name = _SAFE_NAME.sub("_", Path(file_name or "upload").name)[:100] or "upload"
    return Upload(channel, day, name, data)


def _run(url: str, upload: Upload, now: dt.datetime, show: int) -> reconcile.Result:
    with tempfile.TemporaryDirectory(prefix="fc-reconcile-") as directory:
        path = Path(directory) / upload.file_name
        path.write_bytes(upload.data)
        return reconcile.reconcile(url, CHANNELS[upload.channel], upload.day, path, now=now,
                                   show=show)


async def run(url: str, upload: Upload, now: dt.datetime, show: int = 50) -> reconcile.Result:
    """Reconcile the file; UploadError if it is not in the channel's format
    (nothing is stored then)."""
    try:
        return await asyncio.to_thread(_run, url, upload, now, show)
    except (FormatError, UnicodeDecodeError) as exc:
        # the message quotes the bad line: long digit runs (a bank file's card
        # field) are masked
        raise UploadError(f"文件不是{FILE_CHANNELS[upload.channel]}的对账单格式："
                          f"{mask_digits(str(exc))}") from None
