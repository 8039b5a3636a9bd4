"""Reconciliation (对账): a channel's daily settlement file against our records.

The file, in the channel's own format, is parsed by that channel's module
(fuelcard_adapters.<channel>.parse_bill) into neutral records, streamed into
a temporary table with COPY, and compared with fc.settlement_records in SQL
(one hash full join on (kind, channel transaction id)), in one transaction:

  matched          in both, same amount and status
  missing ours     in the file, not in our records (a FAILED one, which moved
                   no money on either side, counts as matched)
  missing theirs   in our records of that business day, not in the file
  amount mismatch  in both, different amounts
  status mismatch  in both, same amount, different status

Day boundaries: a transaction near midnight may be on the channel's day D and
on our D-1 or D+1; the file's records are matched against our records of
D-1..D+1, so it is not reported twice. An open "missing theirs" break of
another day that this file matches is resolved automatically.

Every break is stored (fc.reconciliation_breaks) for ReconciliationService
and `fuelcard reconcile breaks list|resolve` (list_breaks, resolve_break:
the service's own SQL); reconciling the same channel and day again replaces
that day's open breaks (resolved ones stay, and are not raised again). The
run and its totals are kept in fc.reconciliation_runs.

What finance staff read (the printed summary, the CSV report, the break
list) shows amounts in yuan and times in Beijing time, as the channels'
bills do, so a line can be checked against the bill by eye; what is stored
stays in fen and UTC.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from fuelcard_adapters.channels import ChannelFiles
from fuelcard_adapters.neutral import SHANGHAI, FormatError, NeutralRecord, format_yuan

from fuelcard_server.db import one_shot
from fuelcard_server.states import SettlementKind, SettlementStatus

OUTCOMES = ("matched", "missing_ours", "missing_theirs", "amount_mismatch", "status_mismatch")
BREAK_KINDS = OUTCOMES[1:]
KIND_NAMES: dict[int, str] = {SettlementKind.PAYMENT: "payment", SettlementKind.REFUND: "refund"}
STATUS_NAMES: dict[int, str] = {s: s.name for s in SettlementStatus}

_SETUP = """
    CREATE TEMP TABLE recon_theirs (
        kind smallint, channel_txn_id text, original text, amount_fen bigint, fee_fen bigint,
        status smallint, occurred_at timestamptz) ON COMMIT DROP"""
_COPY_THEIRS = ("COPY recon_theirs (kind, channel_txn_id, original, amount_fen, fee_fen, status,"
                " occurred_at) FROM STDIN")
_OURS = """
    CREATE TEMP TABLE recon_ours ON COMMIT DROP AS
    SELECT kind, channel_txn_id, txn_uid, original_channel_txn_id AS original, amount_fen, status,
           occurred_at, business_date
      FROM fc.settlement_records
     WHERE channel = %(channel)s AND business_date = %(day)s
    UNION ALL
    SELECT s.kind, s.channel_txn_id, s.txn_uid, s.original_channel_txn_id, s.amount_fen, s.status,
           s.occurred_at, s.business_date
      FROM fc.settlement_records s
      JOIN recon_theirs t ON t.kind = s.kind AND t.channel_txn_id = s.channel_txn_id
     WHERE s.channel = %(channel)s AND s.business_date IN (%(day)s::date - 1, %(day)s::date + 1)"""
_RESULT = """
    CREATE TEMP TABLE recon_result ON COMMIT DROP AS
    SELECT coalesce(o.kind, t.kind) AS kind,
           coalesce(o.channel_txn_id, t.channel_txn_id) AS channel_txn_id,
           -- 0: matched (no break); else a break kind
           CASE WHEN o.kind IS NULL
                THEN CASE WHEN t.status = fc.settlement_status_failed() THEN 0
                          ELSE fc.break_kind_missing_ours() END
                WHEN t.kind IS NULL THEN fc.break_kind_missing_theirs()
                WHEN o.amount_fen <> t.amount_fen THEN fc.break_kind_amount_mismatch()
                WHEN o.status <> t.status THEN fc.break_kind_status_mismatch()
                ELSE 0 END AS outcome,
           o.txn_uid, o.original AS ours_original, o.amount_fen AS ours_amount_fen,
           o.status AS ours_status, o.occurred_at AS ours_at, o.business_date AS ours_business_date,
           t.original AS theirs_original, t.amount_fen AS theirs_amount_fen, t.fee_fen,
           t.status AS theirs_status, t.occurred_at AS theirs_at
      FROM recon_ours o FULL JOIN recon_theirs t
        ON o.kind = t.kind AND o.channel_txn_id = t.channel_txn_id"""
_TOTALS = """
    SELECT (SELECT count(*) FROM recon_theirs), (SELECT count(*) FROM recon_ours),
           count(*) FILTER (WHERE outcome = 0),
           count(*) FILTER (WHERE outcome = fc.break_kind_missing_ours()),
           count(*) FILTER (WHERE outcome = fc.break_kind_missing_theirs()),
           count(*) FILTER (WHERE outcome = fc.break_kind_amount_mismatch()),
           count(*) FILTER (WHERE outcome = fc.break_kind_status_mismatch()),
           (SELECT coalesce(sum(amount_fen) FILTER (WHERE kind = fc.settlement_kind_payment()
                                                   AND status = fc.settlement_status_success()), 0)
              FROM recon_theirs),
           (SELECT coalesce(sum(amount_fen) FILTER (WHERE kind = fc.settlement_kind_refund()
                                                   AND status = fc.settlement_status_success()), 0)
              FROM recon_theirs),
           (SELECT coalesce(sum(fee_fen), 0) FROM recon_theirs),
           (SELECT coalesce(sum(amount_fen) FILTER (WHERE kind = fc.settlement_kind_payment()
                                                   AND status = fc.settlement_status_success()), 0)
              FROM recon_ours WHERE business_date = %(day)s),
           (SELECT coalesce(sum(amount_fen) FILTER (WHERE kind = fc.settlement_kind_refund()
                                                   AND status = fc.settlement_status_success()), 0)
              FROM recon_ours WHERE business_date = %(day)s)
      FROM recon_result"""
_RUN = """
    INSERT INTO fc.reconciliation_runs (channel, business_date, file_name, file_sha256, theirs,
        ours, matched, missing_ours, missing_theirs, amount_mismatch, status_mismatch, created_at)
    VALUES (%(channel)s, %(day)s, %(file)s, %(sha)s, %(theirs)s, %(ours)s, %(matched)s,
            %(missing_ours)s, %(missing_theirs)s, %(amount_mismatch)s, %(status_mismatch)s,
            %(now)s)
    RETURNING id"""
_CLEAR = """
    DELETE FROM fc.reconciliation_breaks
     WHERE channel = %(channel)s AND business_date = %(day)s AND resolved_at IS NULL"""
_STORE = """
    INSERT INTO fc.reconciliation_breaks (run_id, channel, business_date, kind, record_kind,
        channel_txn_id, ours_txn_uid, ours_original, ours_amount_fen, ours_status, ours_at,
        ours_business_date, theirs_original, theirs_amount_fen, theirs_fee_fen, theirs_status,
        theirs_at, created_at)
    SELECT %(run)s, %(channel)s, %(day)s, r.outcome, r.kind, r.channel_txn_id, r.txn_uid,
           r.ours_original, r.ours_amount_fen, r.ours_status, r.ours_at, r.ours_business_date,
           r.theirs_original, r.theirs_amount_fen, r.fee_fen, r.theirs_status, r.theirs_at,
           %(now)s
      FROM recon_result r
     WHERE r.outcome > 0
       AND NOT EXISTS (SELECT 1 FROM fc.reconciliation_breaks b
                        WHERE b.channel = %(channel)s AND b.business_date = %(day)s
                          AND b.record_kind = r.kind AND b.channel_txn_id = r.channel_txn_id
                          AND b.kind = r.outcome AND b.resolved_at IS NOT NULL)"""
_AUTO_RESOLVE = """
    UPDATE fc.reconciliation_breaks b
       SET resolved_at = %(now)s, resolved_by = 'reconcile',
           resolution = 'matched in the channel file of ' || %(day)s::text
      FROM recon_result r
     WHERE b.channel = %(channel)s AND b.business_date <> %(day)s
       AND b.kind = fc.break_kind_missing_theirs()
       AND b.resolved_at IS NULL AND r.outcome = 0
       AND b.record_kind = r.kind AND b.channel_txn_id = r.channel_txn_id"""
# The business days (Beijing time) the file's records fall on: a file whose
# dates are not the --date given was most likely picked for the wrong day.
_FILE_DAYS = """
    SELECT count(*) FILTER (WHERE (occurred_at AT TIME ZONE 'Asia/Shanghai')::date <> %(day)s),
           min((occurred_at AT TIME ZONE 'Asia/Shanghai')::date),
           max((occurred_at AT TIME ZONE 'Asia/Shanghai')::date)
      FROM recon_theirs"""
_SAMPLE = """
    SELECT outcome, kind, channel_txn_id, ours_amount_fen, theirs_amount_fen, ours_status,
           theirs_status
      FROM recon_result WHERE outcome > 0
     ORDER BY outcome, kind, channel_txn_id LIMIT %(limit)s"""
# Yuan with two decimals and Beijing wall-clock time, as on the channels' bills.
_REPORT = """
    COPY (SELECT CASE outcome WHEN 0 THEN 'matched'
                              WHEN fc.break_kind_missing_ours() THEN 'missing_ours'
                              WHEN fc.break_kind_missing_theirs() THEN 'missing_theirs'
                              WHEN fc.break_kind_amount_mismatch() THEN 'amount_mismatch'
                              ELSE 'status_mismatch' END AS outcome,
                 CASE kind WHEN fc.settlement_kind_payment() THEN 'payment' ELSE 'refund' END AS kind,
                 channel_txn_id, txn_uid AS our_txn_id,
                 coalesce(ours_original, theirs_original) AS original_channel_txn_id,
                 to_char(ours_amount_fen / 100.0, 'FM9999999999999990.00') AS ours_amount_yuan,
                 to_char(theirs_amount_fen / 100.0, 'FM9999999999999990.00') AS theirs_amount_yuan,
                 to_char(fee_fen / 100.0, 'FM9999999999999990.00') AS theirs_fee_yuan,
                 ours_status, theirs_status,
                 to_char(ours_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS')
                     AS ours_time_beijing,
                 to_char(theirs_at AT TIME ZONE 'Asia/Shanghai', 'YYYY-MM-DD HH24:MI:SS')
                     AS theirs_time_beijing
            FROM recon_result ORDER BY outcome, kind, channel_txn_id)
    TO STDOUT WITH (FORMAT csv, HEADER)"""


def yuan(fen: int | None) -> str:
    """An amount as the bills write it: 12345 -> '123.45'; None -> '-'."""
    # int(): PostgreSQL's sum() of bigint arrives as a Decimal
    return "-" if fen is None else format_yuan(int(fen))


def beijing(at: dt.datetime | None) -> str:
    """An instant as the bills write it, Beijing wall-clock time."""
    return "-" if at is None else at.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class BreakLine:
    outcome: str
    kind: str
    channel_txn_id: str
    ours_amount_fen: int | None
    theirs_amount_fen: int | None
    ours_status: str
    theirs_status: str

    def __str__(self) -> str:
        return (f"{self.outcome:<16} {self.kind:<7} {self.channel_txn_id:<34} "
                f"ours {yuan(self.ours_amount_fen):>12} {self.ours_status or '-':<10} "
                f"theirs {yuan(self.theirs_amount_fen):>12} {self.theirs_status or '-'}")


@dataclass
class Result:
    run_id: int
    theirs: int
    ours: int
    counts: dict[str, int]
    theirs_paid_fen: int
    theirs_refunded_fen: int
    theirs_fee_fen: int
    ours_paid_fen: int
    ours_refunded_fen: int
    breaks: list[BreakLine] = field(default_factory=list)
    # seconds per phase: load (read, parse, COPY), ours, join, store, report
    phases_s: dict[str, float] = field(default_factory=dict)
    # the file's records dated (Beijing time) other than the day reconciled,
    # and the first and last day it holds (None for an empty file)
    off_day: int = 0
    first_day: dt.date | None = None
    last_day: dt.date | None = None

    def date_warning(self, day: dt.date) -> str | None:
        """Why the file may not be the one for `day`; None if its dates fit."""
        if not self.off_day or self.first_day is None or self.last_day is None:
            return None
        span = (str(self.first_day) if self.first_day == self.last_day
                else f"{self.first_day} to {self.last_day}")
        return (f"{self.off_day} of {self.theirs} records in the file are not dated {day} "
                f"(Beijing time; the file holds {span}): is it the file for {day}?")

    @property
    def break_count(self) -> int:
        return sum(self.counts[k] for k in BREAK_KINDS)


class _Hashing(io.RawIOBase):
    """A raw reader that hashes what passes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.sha.update(memoryview(buffer)[:n])
        return int(n or 0)


def _copy_text(records: Iterator[NeutralRecord], batch: int = 5000) -> Iterator[str]:
    """The records as COPY text lines, in batches (faster than write_row per
    record). Ids are printable and free of backslashes (FormatError if not),
    so nothing needs escaping."""
    lines: list[str] = []
    for r in records:
        txn, orig = r.channel_txn_id, r.original_channel_txn_id
        if not (txn.isprintable() and orig.isprintable()) or "\\" in txn or "\\" in orig:
            raise FormatError(f"transaction id {txn!r} has control characters or backslashes")
        lines.append(f"{r.kind.value}\t{txn}\t{orig}\t{r.amount_fen}\t{r.fee_fen}\t"
                     f"{r.status.value}\t{r.time.isoformat()}\n")
        if len(lines) >= batch:
            yield "".join(lines)
            lines.clear()
    if lines:
        yield "".join(lines)


def reconcile(url: str, files: ChannelFiles, day: dt.date, path: Path, *,
              now: dt.datetime, report: Path | None = None, show: int = 50) -> Result:
    """Reconcile one channel file; FormatError (naming the line) if the file
    is not in the channel's format, with nothing stored."""
    params: dict[str, Any] = {"channel": files.channel, "day": day, "now": now,
                              "file": path.name, "limit": show}
    phases: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now_s = time.perf_counter()
        phases[name] = now_s - clock[0]
        clock[0] = now_s

    with path.open("rb") as raw, one_shot(url) as conn:
        hashing = _Hashing(raw)
        text = io.TextIOWrapper(io.BufferedReader(hashing, 1 << 20), encoding=files.encoding,
                                newline="")
        with conn.cursor() as cur:
            cur.execute(_SETUP)
            with cur.copy(_COPY_THEIRS) as copy:
                for chunk in _copy_text(files.parse_bill(text)):
                    copy.write(chunk)
            cur.execute("ANALYZE recon_theirs")
            lap("load")
            cur.execute(_OURS, params)
            cur.execute("ANALYZE recon_ours")
            lap("ours")
            cur.execute(_RESULT)
            lap("join")
            totals = cur.execute(_TOTALS, params).fetchone()
            assert totals is not None
            file_days = cur.execute(_FILE_DAYS, params).fetchone()
            assert file_days is not None
            counts = dict(zip(OUTCOMES, totals[2:7], strict=True))
            params.update(counts, theirs=totals[0], ours=totals[1], sha=hashing.sha.digest())
            run = cur.execute(_RUN, params).fetchone()
            assert run is not None
            params["run"] = run[0]
            cur.execute(_CLEAR, params)
            cur.execute(_STORE, params)
            cur.execute(_AUTO_RESOLVE, params)
            sample = [BreakLine(OUTCOMES[o], KIND_NAMES[k], txn, ours, theirs,
                                STATUS_NAMES.get(os_, ""), STATUS_NAMES.get(ts, ""))
                      for o, k, txn, ours, theirs, os_, ts in cur.execute(_SAMPLE, params)]
            lap("store")
            if report is not None:
                with report.open("wb") as out, cur.copy(_REPORT) as copy:
                    for data in copy:
                        out.write(data)
                lap("report")
    lap("commit")
    return Result(run[0], totals[0], totals[1], counts, totals[7], totals[8], totals[9],
                  totals[10], totals[11], sample, phases, *file_days)


# --- following up breaks from the command line ------------------------------------

class BreakError(Exception):
    """A break that cannot be resolved: its reason (BREAK_NOT_FOUND,
    BREAK_ALREADY_RESOLVED, ...), as ReconciliationService answers it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Idempotency keys of the command line live apart from every certificate's
# (a service's scope is its certificate name, never containing a colon).
CLI_CALLER = "cli:reconcile"
LIST_METHOD = "/fuelcard.v1.ReconciliationService/ListBreaks"
RESOLVE_METHOD = "/fuelcard.v1.ReconciliationService/ResolveBreak"


def _actor(by: str) -> str:
    """The audit trail's actor for a command-line user: marked as such."""
    from fuelcard_server.privacy import scrub

    return scrub(by if by.startswith("cli:") else f"cli:{by}")


def _audit(conn: psycopg.Connection[Any], actor: str, method: str, target: str | None,
           outcome: str) -> None:
    """One audit record, as the rpc decorator writes for the service's
    calls: the follow-up of breaks is audited whichever way it is made."""
    from fuelcard_server.audit import APPEND_SQL
    from fuelcard_server.locks import AUDIT_LOCK

    conn.execute(APPEND_SQL, {"lock": AUDIT_LOCK, "actor": actor, "method": method,
                              "target": target, "outcome": outcome})


def list_breaks(url: str, *, by: str, channel: int = 0, day: dt.date | None = None,
                include_resolved: bool = False, limit: int = 100) -> list[dict[str, Any]]:
    """Breaks, newest first, as fc.break_json gives them (ListBreaks' query)."""
    from fuelcard_server.services.reconciliation import LIST_SQL

    with one_shot(url) as conn:
        rows = conn.execute(LIST_SQL, {"channel": channel, "day": day, "all": include_resolved,
                                       "before": 2**63 - 1, "limit": limit}).fetchall()
        _audit(conn, _actor(by), LIST_METHOD, None, "OK")
    return [row[1] for row in rows]


def resolve_break(url: str, break_id: str, resolution: str, resolved_by: str, *,
                  now: dt.datetime, request_id: str | None = None) -> dict[str, Any]:
    """Resolve one break with fc.resolve_break, the function ResolveBreak
    calls: the same request_id again answers the first result. Audited,
    refusals too. BreakError with the reason the service would answer."""
    import grpc

    from fuelcard_server import db, errors
    from fuelcard_server.audit import outcome_of
    from fuelcard_server.services.reconciliation import RESOLUTION_MAX_CHARS, RESOLVE_SQL

    actor = _actor(resolved_by)
    uid: str | None = None
    refusal: errors.ApiError | None = None
    try:
        uid = str(uuid.UUID(break_id))
    except ValueError:
        refusal = errors.ApiError(grpc.StatusCode.INVALID_ARGUMENT, "BREAK_ID_MALFORMED",
                                  "break_id must be a uuid")
    if refusal is None and (not resolution.strip() or len(resolution) > RESOLUTION_MAX_CHARS):
        refusal = errors.ApiError(grpc.StatusCode.INVALID_ARGUMENT, "RESOLUTION_INVALID",
                                  f"resolution: 1-{RESOLUTION_MAX_CHARS} characters")
    request_id = request_id or str(uuid.uuid4())
    digest = hashlib.sha256(f"resolve_break\0{uid}\0{resolution}".encode()).digest()
    with one_shot(url) as conn:
        if refusal is None:
            try:
                row = conn.execute(RESOLVE_SQL, {
                    "caller": CLI_CALLER, "request_id": request_id, "request_hash": digest,
                    "break_uid": uid, "resolution": resolution, "resolved_by": resolved_by,
                    "now": now}).fetchone()
            except psycopg.Error as exc:
                conn.rollback()
                refusal = db.translate(exc)
        if refusal is not None:
            _audit(conn, actor, RESOLVE_METHOD, uid, outcome_of(refusal))
            conn.commit()
            raise BreakError(refusal.reason)
        _audit(conn, actor, RESOLVE_METHOD, uid, "OK")
    assert row is not None
    result: dict[str, Any] = row[0]["break"]
    return result


def break_lines(breaks: list[dict[str, Any]], channel_names: dict[int, str]) -> list[str]:
    """The breaks for a person: yuan and Beijing time, as on the bills."""
    lines = []
    for b in breaks:
        def side(name: str, b: dict[str, Any] = b) -> str:
            us = b[f"{name}_us"]
            at = None if us is None else dt.datetime.fromtimestamp(us / 1e6, dt.UTC)
            return (f"{name} {yuan(b[f'{name}_amount_fen']):>12} "
                    f"{STATUS_NAMES.get(b[f'{name}_status'] or 0, '-'):<10} {beijing(at)}")
        state = (f"resolved by {b['resolved_by']}: {b['resolution']}" if b["resolve_us"] is not None
                 else "open")
        lines.append(f"{b['break_id']}  {channel_names.get(b['channel'], str(b['channel']))} "
                     f"{b['business_date']} {OUTCOMES[b['kind']]:<16} "
                     f"{KIND_NAMES.get(b['record_kind'], '?'):<7} {b['channel_txn_id']}\n"
                     f"    {side('ours')}\n    {side('theirs')}\n    {state}")
    return lines
