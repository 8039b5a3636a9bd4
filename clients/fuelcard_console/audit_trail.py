"""The audit trail (fc.audit_log) as the reviewer reads it: newest first,
paged, filtered by actor, target and time.

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
from typing import Any

from fuelcard_adapters.neutral import SHANGHAI
from fuelcard_console.ops_labels import beijing, mask_digits
from fuelcard_server.db import Database

PAGE_SIZE = 50
ACTOR_MAX_CHARS = 100

PAGE_SQL = """
    SELECT id, created_at, actor, method, target::text, outcome FROM fc.audit_log
     WHERE (%(actor)s::text IS NULL OR strpos(actor, %(actor)s::text) > 0)
       AND (%(target)s::uuid IS NULL OR target = %(target)s::uuid)
       AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
       AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)
       AND id < %(before)s
     ORDER BY id DESC LIMIT %(limit)s"""
# A console login typed into the actor filter means that user's records:
# the console's own (console:<role>:<uuid>) and the core's for calls made on
# the user's behalf (admin::... for console_user:<uuid>); both hold the uuid.
LOGIN_SQL = "SELECT uid::text FROM fc.console_users WHERE login = %(login)s"
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


async def page(reports: Database, db: Database, f: AuditFilter, page_token: str = "",
               size: int = PAGE_SIZE) -> AuditPage:
    before = _token(page_token)
    actor = f.actor
    if actor is not None:
        row = await db.fetch_one(LOGIN_SQL, {"login": actor})
        if row is not None:
            actor = str(row[0])
    rows = await reports.fetch_all(PAGE_SQL, {
        "actor": actor, "target": f.target, "since": f.since, "until": f.until,
        "before": before, "limit": size + 1})
    more = len(rows) > size
    rows = rows[:size]
    uids = sorted({part for r in rows for part in _uuids(str(r[2]))})
    logins = ({str(u): str(login) for u, login in await db.fetch_all(LOGINS_SQL, {"uids": uids})}
              if uids else {})
    out = [AuditRow(int(i), beijing(at), _actor_words(str(a), logins), mask_digits(str(m)),
                    t or "-", mask_digits(str(o)))
           for i, at, a, m, t, o in rows]
    return AuditPage(out, str(out[-1].id) if more and out else "")


def _uuids(actor: str) -> list[str]:
    found = []
    for word in actor.replace(" ", ":").split(":"):
        if len(word) == 36:
            with contextlib.suppress(ValueError):
                found.append(str(uuid.UUID(word)))
    return found
