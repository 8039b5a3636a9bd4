"""Risk rule set versions as the risk officer's pages show them.

There is no RPC that lists rule sets or reads an old version (RiskService has
Load, Activate and GetActive), so the versions are read from fc.risk_rule_sets
through the reports database, the way LoadRuleSet stores them: one row per
load, its id the version, with the normalised document as JSON.

A draft is a rule set the officer pasted or uploaded and has not put in force
(LoadRuleSet puts a set in force the moment it is stored): it waits in
fc.console_rule_drafts, validated by the server's own rule model, so that it
can be compared with the set in force and backtested first.

Two versions are compared on their canonical text: the normalised document
written back as TOML, keys in the model's order, so two documents that mean
the same are the same text, whatever their comments, layout or format.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fuelcard_server import errors
from fuelcard_server.db import Database
from fuelcard_server.risk import model
from fuelcard_server.risk.model import RuleSet

PAGE_SIZE = 20  # versions a page (the console's lists stay within 50 rows)
MAX_DOCUMENT_CHARS = 1024 * 1024  # as LoadRuleSet

VERSIONS_SQL = """
    SELECT s.id, s.name, s.digest, (SELECT count(*) FROM fc.risk_rules r WHERE r.rule_set_id = s.id),
           s.created_at, s.created_by, a.rule_set_id IS NOT NULL, a.activated_at
      FROM fc.risk_rule_sets s LEFT JOIN fc.risk_active a ON a.rule_set_id = s.id
     WHERE s.id < %(before)s
     ORDER BY s.id DESC
     LIMIT %(limit)s"""
DOCUMENT_SQL = "SELECT s.document FROM fc.risk_rule_sets s WHERE s.id = %(version)s"
ACTIVE_SQL = "SELECT a.rule_set_id FROM fc.risk_active a"
SAVE_DRAFT_SQL = """
    INSERT INTO fc.console_rule_drafts (document, format, name, digest, rule_count, created_by,
                                        created_at)
    VALUES (%(document)s, %(format)s, %(name)s, %(digest)s, %(rule_count)s, %(created_by)s, %(now)s)
    RETURNING id"""
DRAFT_SQL = """
    SELECT d.id, d.document, d.format, d.name, d.digest, d.rule_count, d.created_by, d.created_at,
           d.loaded_version
      FROM fc.console_rule_drafts d WHERE d.id = %(id)s"""
DRAFTS_SQL = """
    SELECT d.id, d.document, d.format, d.name, d.digest, d.rule_count, d.created_by, d.created_at,
           d.loaded_version
      FROM fc.console_rule_drafts d WHERE d.id < %(before)s ORDER BY d.id DESC LIMIT %(limit)s"""
DRAFT_LOADED_SQL = ("UPDATE fc.console_rule_drafts SET loaded_version = %(version)s"
                    " WHERE id = %(id)s AND loaded_version IS NULL RETURNING id")

# The rule model's reasons, said in Chinese for the officer (the field path is shown as is).
REASONS_ZH: dict[str, str] = {
    "RULES_UNREADABLE": "文档无法解析",
    "RULES_KEY_UNKNOWN": "未知的顶层字段",
    "RULES_NAME_INVALID": "名称须为 1-128 个字符，且不含控制字符",
    "RULES_FALLBACK_INVALID": "fallback 只能是 \"review\"（转人工）或 \"decline\"（拒绝）",
    "RULES_SCORE_INVALID": "分数须为 1-1000000 的整数，且 decline_score 不小于 review_score",
    "RULES_INVALID": f"rules 须为规则列表，至多 {model.MAX_RULES} 条",
    "RULE_INVALID": "每条规则须为一个表（[[rules]]）",
    "RULE_ID_INVALID": "规则编号须为 1-64 个字母、数字或 _ . -",
    "RULE_ID_DUPLICATE": "规则编号重复",
    "RULE_KIND_UNKNOWN": "未知的规则类型",
    "RULE_ACTION_INVALID": "action 只能是 \"score\"、\"review\" 或 \"decline\"",
    "RULE_SCORE_INVALID": "规则分数须为 0-1000000 的整数",
    "RULE_PARAM_UNKNOWN": "该规则类型没有这个参数",
    "RULE_PARAM_MISSING": "缺少必填参数",
    "RULE_PARAM_INVALID": "参数取值无效",
    "DOCUMENT_TOO_LARGE": "文档超过 1 MiB",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document, for the page: where, and what (in Chinese), with the
    model's own English detail (its ranges and lists are exact)."""

    field: str
    reason: str
    zh: str
    detail: str


class DocumentInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(f"{len(problems)} problems")
        self.problems = problems


def problems_of(exc: errors.ApiError) -> list[Problem]:
    return [Problem(v.field, v.reason, REASONS_ZH.get(v.reason, "取值无效"), v.description)
            for v in exc.violations] or [Problem("document", exc.reason, REASONS_ZH.get(
                exc.reason, "文档无效"), exc.message)]


def validate(text: str, fmt: Literal["toml", "json"]) -> RuleSet:
    """The rule set in `text`, validated exactly as LoadRuleSet validates it (the same model);
    DocumentInvalid naming every problem otherwise."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise DocumentInvalid([Problem("document", "DOCUMENT_TOO_LARGE",
                                       REASONS_ZH["DOCUMENT_TOO_LARGE"], "at most 1 MiB")])
    try:
        return model.load_text(text, fmt)
    except errors.ApiError as exc:
        raise DocumentInvalid(problems_of(exc)) from None


def from_stored(document: Any) -> RuleSet:
    """A stored version's rule set (already validated when it was loaded; the test-only fault
    kind is let through, as the server lets it through when its fault injection is on)."""
    doc = json.loads(document) if isinstance(document, str) else document
    return model.parse(doc, allow_fault=True)


# --- canonical text and the diff ------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string (same escapes), Chinese kept as written
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


# A line of canonical text with the block it belongs to: "" for the set's own keys, else the
# rule's id. The diff matches lines by both, so that `action = "score"` of one rule is never
# taken for the same line of another (which a plain line diff does, and then shows one rule's
# change as another's).
Line = tuple[str, str]


def canonical_lines(rule_set: RuleSet | None) -> list[Line]:
    """The rule set as TOML lines, in the model's key order; none for no set."""
    if rule_set is None:
        return []
    doc = rule_set.to_document()
    lines = [("", f"{key} = {_toml_value(doc[key])}") for key in doc if key != "rules"]
    for rule in doc["rules"]:
        block = str(rule["id"])
        lines += [(block, ""), (block, "[[rules]]")] + [
            (block, f"{key} = {_toml_value(value)}") for key, value in rule.items()]
    return lines


def canonical_text(rule_set: RuleSet | None) -> str:
    """The rule set as TOML, in the model's key order: what the diff compares. Loading it gives
    the same rule set (tests/test_console_risk.py)."""
    lines = canonical_lines(rule_set)
    return "\n".join(text for _, text in lines) + "\n" if lines else ""


def plain_lines(text: str) -> list[Line]:
    return [("", line) for line in text.splitlines()]


@dataclass(frozen=True)
class DiffRow:
    """One row of the side-by-side diff: `tag` is equal, replace, delete, insert, or gap (the
    unchanged lines between two hunks left out)."""

    tag: str
    old_no: int | None
    old: str
    new_no: int | None
    new: str


def _groups(a: Sequence[Line], b: Sequence[Line], context: int
            ) -> list[list[tuple[str, int, int, int, int]]]:
    return list(difflib.SequenceMatcher(None, a, b, autojunk=False).get_grouped_opcodes(context))


def side_by_side(old: Sequence[Line], new: Sequence[Line], context: int = 3) -> list[DiffRow]:
    """The changed hunks side by side, with `context` unchanged lines around each; an empty
    list when the two are the same."""
    rows: list[DiffRow] = []
    for n, group in enumerate(_groups(old, new, context)):
        if n:
            rows.append(DiffRow("gap", None, "", None, ""))
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                rows += [DiffRow("equal", i + 1, old[i][1], j + 1, new[j][1]) for i, j in
                         zip(range(i1, i2), range(j1, j2), strict=True)]
                continue
            for k in range(max(i2 - i1, j2 - j1)):
                i, j = i1 + k, j1 + k
                # a replaced block longer on one side: its extra lines are inserts or deletes
                row_tag = tag if i < i2 and j < j2 else "insert" if j < j2 else "delete"
                rows.append(DiffRow(row_tag, i + 1 if i < i2 else None, old[i][1] if i < i2 else "",
                                    j + 1 if j < j2 else None, new[j][1] if j < j2 else ""))
    return rows


def unified(old: Sequence[Line], new: Sequence[Line], old_label: str, new_label: str,
            context: int = 3) -> str:
    """The same hunks in unified diff format (what `diff -u` prints)."""
    groups = _groups(old, new, context)
    if not groups:
        return ""
    out = [f"--- {old_label}", f"+++ {new_label}"]
    for group in groups:
        first, last = group[0], group[-1]
        out.append(f"@@ -{first[1] + 1},{last[2] - first[1]} +{first[3] + 1},{last[4] - first[3]} @@")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [f" {text}" for _, text in old[i1:i2]]
                continue
            out += [f"-{text}" for _, text in old[i1:i2]] + [f"+{text}" for _, text in new[j1:j2]]
    return "\n".join(out) + "\n"


# --- versions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    version: int
    name: str
    digest: str
    rule_count: int
    created_at: dt.datetime
    created_by: str
    active: bool
    activated_at: dt.datetime | None


def parse_page_token(token: str) -> int:
    """A page of versions starts below the version in its token ("v<version>"); ValueError for
    a token not made here."""
    if not token:
        return 2**31 - 1
    if not token.startswith("v") or not token[1:].isdigit() or len(token) > 11:
        raise ValueError("page token")
    return int(token[1:])


async def list_versions(reports: Database, page_token: str = "", page_size: int = PAGE_SIZE
                        ) -> tuple[list[Version], str]:
    """A page of versions, newest first, and the next page's token ("" on the last page)."""
    rows = await reports.fetch_all(VERSIONS_SQL, {"before": parse_page_token(page_token),
                                                  "limit": page_size + 1})
    versions = [Version(*row) for row in rows[:page_size]]
    more = len(rows) > page_size
    return versions, f"v{versions[-1].version}" if more else ""


async def stored_rule_set(reports: Database, version: int) -> RuleSet | None:
    row = await reports.fetch_one(DOCUMENT_SQL, {"version": version})
    return None if row is None else from_stored(row[0])


async def active_version(reports: Database) -> int | None:
    row = await reports.fetch_one(ACTIVE_SQL, {})
    return None if row is None else int(row[0])


# --- drafts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    draft_id: int
    document: str
    format: Literal["toml", "json"]
    name: str
    digest: str
    rule_count: int
    created_by: str
    created_at: dt.datetime
    loaded_version: int | None

    @property
    def rule_set(self) -> RuleSet:
        return validate(self.document, self.format)

    @property
    def request_id(self) -> str:
        """LoadRuleSet's idempotency key: a draft is loaded once, however often the officer
        presses the button (a retry gets the first answer)."""
        return f"console-rule-draft-{self.draft_id}"


async def save_draft(db: Database, text: str, fmt: Literal["toml", "json"], login: str,
                     now: dt.datetime) -> int:
    """Validate `text` and keep it as a draft; its id. DocumentInvalid when it would not load."""
    rule_set = validate(text, fmt)
    row = await db.fetch_one(SAVE_DRAFT_SQL, {
        "document": text, "format": fmt, "name": rule_set.name, "digest": rule_set.digest(),
        "rule_count": len(rule_set.rules), "created_by": login, "now": now})
    assert row is not None
    return int(row[0])


async def get_draft(db: Database, draft_id: int) -> Draft | None:
    row = await db.fetch_one(DRAFT_SQL, {"id": draft_id})
    return None if row is None else Draft(*row)


async def list_drafts(db: Database, page_token: str = "", page_size: int = 10) -> tuple[list[Draft], str]:
    """A page of drafts, newest first, and the next page's token ("d<id>"; "" on the last)."""
    before = 2**63 - 1
    if page_token:
        if not page_token.startswith("d") or not page_token[1:].isdigit() or len(page_token) > 20:
            raise ValueError("page token")
        before = int(page_token[1:])
    rows = await db.fetch_all(DRAFTS_SQL, {"before": before, "limit": page_size + 1})
    drafts = [Draft(*row) for row in rows[:page_size]]
    return drafts, f"d{drafts[-1].draft_id}" if len(rows) > page_size else ""


async def mark_loaded(db: Database, draft_id: int, version: int) -> None:
    await db.fetch_all(DRAFT_LOADED_SQL, {"version": version, "id": draft_id})
