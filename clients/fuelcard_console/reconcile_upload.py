"""Reconciliation (对账) of an uploaded settlement file, for the finance page.

There is no RPC for it: `fuelcard reconcile` runs fuelcard_server.reconcile
against the database, and so does this, with the same function, so the
page and the command store the same runs and breaks (fc.reconciliation_runs
and fc.reconciliation_breaks, which the serving role may write) and the
breaks are then followed up through ReconciliationService like any other.
reconcile() is synchronous (one connection, one transaction, COPY): it runs
in a worker thread so the edge's event loop keeps serving.

The upload is streamed to a private temporary directory (reconcile() reads
a path, and names the run after the file's name), and removed afterwards;
the edge's 64 KiB body limit does not apply to it (receive()).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from fuelcard_adapters.channels import CHANNELS
from fuelcard_adapters.neutral import FormatError
from fuelcard_server import reconcile

from fuelcard_console.ops_labels import FILE_CHANNELS, mask_digits

# A day's file of a busy channel is tens of MB (WeChat Pay's: ~270 bytes a
# transaction). It is streamed to a private temporary file, never held in
# memory, and past this size refused (413).
MAX_FILE_BYTES = 512 * 1024 * 1024
FIELD_MAX_BYTES = 1024
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class UploadError(ValueError):
    """Why the file was not reconciled, in words for the page."""


@dataclass(frozen=True)
class Upload:
    channel: str  # a key of fuelcard_adapters.channels.CHANNELS
    day: dt.date
    file_name: str
    path: Path  # the file's bytes, in a temporary directory the caller removes


async def receive(request: web.Request, directory: Path,
                  max_bytes: int = MAX_FILE_BYTES) -> tuple[dict[str, str], str, Path]:
    """The multipart form's short fields, the file's name, and where its
    bytes were written (directory/upload), read as a stream. The edge's body
    limit does not apply to it (the CSRF token came in the action's query:
    auth.csrf_middleware); past max_bytes, HTTP 413."""
    reader = await request.multipart()
    fields: dict[str, str] = {}
    file_name = ""
    path = directory / "upload"
    path.touch()
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            raise web.HTTPBadRequest(reason="nested multipart")
        if part.name == "file" and part.filename is not None:
            file_name = part.filename
            size = 0
            with path.open("wb") as out:
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=size)
                    # a local file, a chunk at a time: not worth a thread hop per MB
                    out.write(chunk)
        elif part.name:
            raw = await part.read()
            if len(raw) > FIELD_MAX_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=FIELD_MAX_BYTES, actual_size=len(raw))
            fields[part.name] = raw.decode("utf-8", "replace")
    return fields, file_name, path


def check(channel: str, day_text: str, file_name: str, path: Path) -> Upload:
    """The upload, checked; UploadError (zh-CN) if a part is missing or wrong."""
    if channel not in FILE_CHANNELS or channel not in CHANNELS:
        raise UploadError("请选择渠道")
    try:
        day = dt.date.fromisoformat(day_text.strip())
    except ValueError:
        raise UploadError("业务日期须为 YYYY-MM-DD") from None
    if not path.exists() or path.stat().st_size == 0:
        raise UploadError("请选择对账文件（文件为空）")
    # The run keeps the file's name: only a plain one (no path, nothing odd).
    name = _SAFE_NAME.sub("_", Path(file_name or "upload").name)[:100] or "upload"
    return Upload(channel, day, name, path)


def _run(url: str, upload: Upload, now: dt.datetime, show: int) -> reconcile.Result:
    # reconcile() names the run after the file: give it the uploaded name
    named = upload.path.with_name(upload.file_name)
    if named != upload.path:
        upload.path.rename(named)
    try:
        return reconcile.reconcile(url, CHANNELS[upload.channel], upload.day, named, now=now,
                                   show=show)
    finally:
        if named != upload.path:
            named.rename(upload.path)


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
