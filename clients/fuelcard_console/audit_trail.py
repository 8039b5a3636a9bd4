"""The audit trail (fc.audit_log) as the reviewer reads it: newest first,
paged, filtered by actor, target and time.

An actor that is a console login means that user's records (an index on the
actor's uuid tail); anything else is a substring of the actor. A target is
an internal uuid (an index on target).

It is read from the reports database only (ctx.reports: the replica or the
warehouse), never from the pump path's pool. Pages are keyset pages on the
log's id (AIP-132 page_token = the last id shown), so page 1000 costs what
page 1 does. Nothing in the log should hold a card number (the writers keep
them out); as a second line, any long run of digits is masked before it is
shown.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, LiteralString

from fuelcard_adapters.neutral import SHANGHAI
from fuelcard_server.db import Database

from fuelcard_console.ops_labels import beijing, mask_digits

PAGE_SIZE = 50
ACTOR_MAX_CHARS = 100

# The statement is put together from fixed pieces, one per filter in use, so
# that each filter is a plain predicate the planner can match to its index
# (an "x IS NULL OR ..." form would hide them from a generic plan).
_SELECT = ("SELECT id, created_at, actor, method, target::text, outcome FROM fc.audit_log"
           " WHERE id < %(before)s")
# A console user's records, through audit_log_actor_tail_by_id (migration 0016): both
# kinds of actor naming the user end with the user's uuid.
_BY_USER = " AND right(actor, 36) = %(actor)s::text"
_BY_SUBSTRING = " AND strpos(actor, %(actor)s::text) > 0"
_BY_TARGET = " AND target = %(target)s::uuid"
# A time window as a range of ids as well: fc.audit_append numbers the records
# under a lock in clock order, so the window's first and last ids (two probes
# of audit_log_created_by_id) bound the scan of whichever index serves the
# other filters; the planner cannot know that ids and times rise together,
# and without the bounds it walks the log back from the newest record.
_SINCE = (" AND id >= coalesce((SELECT a.id FROM fc.audit_log a WHERE a.created_at >= %(since)s::timestamptz"
          " ORDER BY a.created_at, a.id LIMIT 1), 9223372036854775807)"
          " AND created_at >= %(since)s::timestamptz")
_UNTIL = (" AND id <= coalesce((SELECT a.id FROM fc.audit_log a WHERE a.created_at < %(until)s::timestamptz"
          " ORDER BY a.created_at DESC, a.id DESC LIMIT 1), 0)"
          " AND created_at < %(until)s::timestamptz")
_ORDER = " ORDER BY id DESC LIMIT %(limit)s"
# A substring of the actor cannot use an index: it is looked for within at
# most this window (the last DEFAULT days when no dates are given), so a
# search that matches nothing reads a bounded part of the log.
SUBSTRING_WINDOW_MAX = dt.timedelta(days=31)
SUBSTRING_WINDOW_DEFAULT = dt.timedelta(days=7)
# A console login typed into the actor filter means that user's records:
# the console's own (console:<role>:<uuid>) and the core's for calls made on
# the user's behalf (admin::... for console_user:<uuid>); both hold the uuid.
LOGIN_SQL = "SELECT uid::text FROM fc.console_users WHERE login = %(login)s"
DB_NOW_SQL = "SELECT now()"
LOGINS_SQL = "SELECT uid::text, login FROM fc.console_users WHERE uid = ANY(%(uids)s::uuid[])"


class FilterError(ValueError):
    """A filter that cannot be used, in words for the page."""


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    target: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None  # exclusive

    @staticmethod
    def parse(query: Any) -> AuditFilter:
        """From the page's query (actor, target, from, to: YYYY-MM-DD, Beijing
        days, both inclusive); FilterError naming what is wrong."""
        actor = (query.get("actor") or "").strip() or None
        if actor is not None and len(actor) > ACTOR_MAX_CHARS:
            raise FilterError(f"操作人过长（最多 {ACTOR_MAX_CHARS} 个字符）")
        target = (query.get("target") or "").strip() or None
        if target is not None:
            try:
                target = str(uuid.UUID(target))
            except ValueError:
                raise FilterError("对象须为内部编号（UUID），例如预授权编号") from None

        def day(name: str, label: str) -> dt.date | None:
            text = (query.get(name) or "").strip()
            if not text:
                return None
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                raise FilterError(f"{label}须为 YYYY-MM-DD") from None

        first, last = day("from", "开始日期"), day("to", "结束日期")
        since = dt.datetime.combine(first, dt.time(), SHANGHAI) if first else None
        until = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), SHANGHAI) if last else None
        if since and until and since >= until:
            raise FilterError("开始日期晚于结束日期")
        return AuditFilter(actor, target, since, until)

    def query(self) -> dict[str, str]:
        """The filter as query parameters (for the next page's link)."""
        q: dict[str, str] = {}
        if self.actor:
            q["actor"] = self.actor
        if self.target:
            q["target"] = self.target
        if self.since:
            q["from"] = self.since.astimezone(SHANGHAI).date().isoformat()
        if self.until:
            q["to"] = (self.until.astimezone(SHANGHAI).date() - dt.timedelta(days=1)).isoformat()
        return q


@dataclass(frozen=True)
class AuditRow:
    id: int
    time: str
    actor: str
    method: str
    target: str
    outcome: str


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    next_page_token: str
    note: str = ""  # how the filter was narrowed, in words


def _token(page_token: str) -> int:
    if not page_token:
        return 2**63 - 1
    if not page_token.isdigit() or len(page_token) > 19:
        raise FilterError("分页参数无效，请从第一页重新查看")
    return int(page_token)


def _actor_words(actor: str, logins: dict[str, str]) -> str:
    """The actor with console users' uuids shown as their logins."""
    for uid, login in logins.items():
        actor = actor.replace(uid, login)
    return mask_digits(actor)


def _statement(by_user: bool, substring: bool, target: bool, since: bool,
               until: bool) -> LiteralString:
    sql: LiteralString = _SELECT
    if by_user:
        sql += _BY_USER
    if substring:
        sql += _BY_SUBSTRING
    if target:
        sql += _BY_TARGET
    if since:
        sql += _SINCE
    if until:
        sql += _UNTIL
    return sql + _ORDER


async def page(reports: Database, db: Database, f: AuditFilter, page_token: str = "", *,
               size: int = PAGE_SIZE) -> AuditPage:
    """One page; FilterError for a filter that cannot be used."""
    before = _token(page_token)
    actor, by_user, since, until = f.actor, False, f.since, f.until
    note = ""
    if actor is not None:
        row = await db.fetch_one(LOGIN_SQL, {"login": actor})
        if row is not None:
            actor, by_user = str(row[0]), True
        else:
            # Bounded on both sides, so the scan is the window's ids only; by
            # the database's clock, which stamps the records.
            if until is None:
                row = await reports.fetch_one(DB_NOW_SQL, {})
                until = (row[0] if row is not None else dt.datetime.now(dt.UTC)) + dt.timedelta(minutes=1)
            if since is None:
                since = until - SUBSTRING_WINDOW_DEFAULT
                note = (f"操作人不是登录名，按包含匹配，只查了截止日前 {SUBSTRING_WINDOW_DEFAULT.days} 天；"
                        "可指定日期范围。")
            if until - since > SUBSTRING_WINDOW_MAX:
                raise FilterError(f"操作人不是登录名时按包含匹配，日期范围最多 "
                                  f"{SUBSTRING_WINDOW_MAX.days} 天")
    sql = _statement(by_user, actor is not None and not by_user, f.target is not None,
                     since is not None, until is not None)
    rows = await reports.fetch_all(sql, {
        "actor": actor, "target": f.target, "since": since, "until": until,
        "before": before, "limit": size + 1})
    more = len(rows) > size
    rows = rows[:size]
    uids = sorted({part for r in rows for part in _uuids(str(r[2]))})
    logins = ({str(u): str(login) for u, login in await db.fetch_all(LOGINS_SQL, {"uids": uids})}
              if uids else {})
    out = [AuditRow(int(i), beijing(at), _actor_words(str(a), logins), mask_digits(str(m)),
                    t or "-", mask_digits(str(o)))
           for i, at, a, m, t, o in rows]
    return AuditPage(out, str(out[-1].id) if more and out else "", note)


def _uuids(actor: str) -> list[str]:
    found = []
    for word in actor.replace(" ", ":").split(":"):
        if len(word) == 36:
            with contextlib.suppress(ValueError):
                found.append(str(uuid.UUID(word)))
    return found
