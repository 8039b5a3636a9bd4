"""Issue 19: the risk officer's console - rule set versions, the diff between
two of them, drafts, and the bounded backtest, on a real database and a real
core (the browser journey is further down)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fuelcard_console import rule_backtest, rule_sets
from fuelcard_server import cli
from fuelcard_server.db import Database
from fuelcard_server.risk import backtest
from fuelcard_server.risk.model import load_text

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, scalar
from tests.support.risk_helpers import load_rules, rule

DEFAULT = Path(cli.__file__).parent / "risk" / "default_rules.toml"
T = TypeVar("T")


def on_database(url: str, fn: Callable[[Database], Awaitable[T]], *, read_only: bool = False) -> T:
    """Run fn with a Database on `url` (as the console's ctx.db / ctx.reports), then close it."""
    async def go() -> T:
        database = Database(url, min_size=1, max_size=2, timeout_s=5.0, name="console-test",
                            read_only=read_only)
        await database.open()
        try:
            return await fn(database)
        finally:
            await database.close()
    return asyncio.run(go())


SMALL = """
name = "small"
review_score = 60
decline_score = 100

[[rules]]
id = "AMT-BIG"
kind = "amount"
action = "review"
score = 60
min_amount_fen = 100000
"""


# --- canonical text and the diff ------------------------------------------------------------


def test_canonical_text_is_the_same_rule_set_whatever_the_layout() -> None:
    default = load_text(DEFAULT.read_text(encoding="utf-8"), "toml")
    text = rule_sets.canonical_text(default)
    # it loads back to the very same set (same digest), from TOML ...
    assert rule_sets.validate(text, "toml").digest() == default.digest()
    assert "#" not in text  # the file's comments are not part of the set
    # ... and the same set written as JSON, keys in another order, has the same text
    as_json = json.dumps({k: v for k, v in reversed(default.to_document().items())}, ensure_ascii=False)
    assert rule_sets.canonical_text(rule_sets.validate(as_json, "json")) == text
    # Chinese text survives as written, and a quote inside a string is escaped
    doc = tomllib.loads(SMALL)
    doc["rules"][0]["description"] = '大额 "加油"'
    tricky = rule_sets.validate(json.dumps(doc, ensure_ascii=False), "json")
    canonical = rule_sets.canonical_text(tricky)
    assert 'description = "大额 \\"加油\\""' in canonical
    assert rule_sets.validate(canonical, "toml") == tricky


def test_the_side_by_side_diff_shows_the_changed_lines_only() -> None:
    old = rule_sets.canonical_text(rule_sets.validate(SMALL, "toml"))
    new_doc = SMALL.replace("min_amount_fen = 100000", "min_amount_fen = 200000") + (
        '\n[[rules]]\nid = "VEL"\nkind = "velocity"\nmin_count = 5\nwindow_s = 3600\n')
    new = rule_sets.canonical_text(rule_sets.validate(new_doc, "toml"))
    rows = rule_sets.side_by_side(old, new)
    changed = [(r.tag, r.old, r.new) for r in rows if r.tag != "equal"]
    assert ("replace", "min_amount_fen = 100000", "min_amount_fen = 200000") in changed
    assert ("insert", "", 'id = "VEL"') in changed
    assert all(r.old_no is None for r in rows if r.tag == "insert")
    assert rule_sets.side_by_side(old, old) == []
    diff = rule_sets.unified(old, new, "版本 1", "草稿")
    assert "-min_amount_fen = 100000" in diff and "+min_amount_fen = 200000" in diff
    # far-apart changes come as two hunks with a gap between
    many = "\n".join(f"line {i}" for i in range(40))
    rows = rule_sets.side_by_side(many, many.replace("line 2\n", "line two\n").replace("line 37", "x"))
    assert [r.tag for r in rows].count("gap") == 1


def test_an_invalid_document_names_every_problem_in_chinese() -> None:
    bad = SMALL.replace('kind = "amount"', 'kind = "amount"\ncolour = "red"').replace(
        "decline_score = 100", "decline_score = 10")
    with pytest.raises(rule_sets.DocumentInvalid) as caught:
        rule_sets.validate(bad, "toml")
    problems = {p.field: p for p in caught.value.problems}
    assert problems["rules[0].colour"].zh == "该规则类型没有这个参数"
    assert problems["decline_score"].reason == "RULES_SCORE_INVALID"
    with pytest.raises(rule_sets.DocumentInvalid) as caught:
        rule_sets.validate("name = ", "toml")
    assert [p.zh for p in caught.value.problems] == ["文档无法解析"]
    with pytest.raises(rule_sets.DocumentInvalid) as caught:
        rule_sets.validate(" " * (rule_sets.MAX_DOCUMENT_CHARS + 1), "toml")
    assert caught.value.problems[0].reason == "DOCUMENT_TOO_LARGE"


# --- versions and drafts --------------------------------------------------------------------


def test_versions_are_listed_newest_first_in_pages(server: RunningServer) -> None:
    loaded = [load_rules(server, [rule(f"R{i}", "amount", min_amount_fen=100_000 + i)], name=f"v{i}")
              for i in range(5)]
    versions = [r.rule_set.version for r in loaded]

    async def pages(reports: Database) -> list[list[rule_sets.Version]]:
        out, token = [], ""
        while True:
            page, token = await rule_sets.list_versions(reports, token, page_size=2)
            out.append(page)
            if not token:
                return out
    got = on_database(server.database_url, pages, read_only=True)
    assert [[v.version for v in page] for page in got] == [
        versions[::-1][0:2], versions[::-1][2:4], versions[::-1][4:5]]
    newest = got[0][0]
    assert (newest.name, newest.active, newest.rule_count) == ("v4", True, 1)
    assert not any(v.active for page in got for v in page[1:]) and not got[1][0].active
    # an old version's document is the set it was
    old = on_database(server.database_url, lambda r: rule_sets.stored_rule_set(r, versions[1]))
    assert old is not None and old.rules[0].params["min_amount_fen"] == 100_001
    assert on_database(server.database_url, rule_sets.active_version) == versions[-1]
    with pytest.raises(ValueError):
        rule_sets.parse_page_token("7")


def test_a_draft_is_kept_as_written_and_marked_once_loaded(server: RunningServer, db: Conn) -> None:
    now = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)
    draft_id = on_database(server.database_url,
                           lambda d: rule_sets.save_draft(d, SMALL, "toml", "officer", now))
    draft = on_database(server.database_url, lambda d: rule_sets.get_draft(d, draft_id))
    assert draft is not None
    assert (draft.document, draft.name, draft.rule_count, draft.loaded_version) == (SMALL, "small", 1, None)
    assert draft.rule_set.digest() == load_text(SMALL, "toml").digest()
    loaded = load_rules(server, [rule("X", "amount", min_amount_fen=1)])
    on_database(server.database_url, lambda d: rule_sets.mark_loaded(d, draft_id, loaded.rule_set.version))
    on_database(server.database_url, lambda d: rule_sets.mark_loaded(d, draft_id, 999))  # once only
    assert scalar(db, "SELECT loaded_version FROM fc.console_rule_drafts WHERE id = %s",
                  (draft_id,)) == loaded.rule_set.version
    # an invalid document is not kept
    with pytest.raises(rule_sets.DocumentInvalid):
        on_database(server.database_url,
                    lambda d: rule_sets.save_draft(d, "rules = 3", "toml", "officer", now))
    assert scalar(db, "SELECT count(*) FROM fc.console_rule_drafts") == 1
    assert on_database(server.database_url, lambda d: rule_sets.get_draft(d, draft_id + 1)) is None


# --- the backtest ---------------------------------------------------------------------------


def test_the_bounded_backtest_is_the_servers_backtest_on_the_slice(server: RunningServer) -> None:
    card = builders.open_card(server, 2_000_000)
    # Three days of sales: two old ones (10 days ago) and three recent, one of them big.
    for amount in (150_000, 20_000):
        cb.sale(server, card, amount)
    server.advance(dt.timedelta(days=10))
    for amount in (30_000, 120_000, 40_000):
        cb.sale(server, card, amount)
        server.advance(dt.timedelta(hours=1))
    now = server.clock.now()
    candidate = rule_sets.validate(SMALL, "toml")  # suspends amounts >= 1 000 yuan

    def run(days: int, holds: int) -> rule_backtest.BacktestResult:
        return on_database(server.database_url, lambda r: rule_backtest.run(
            r, candidate, now, rule_backtest.Bounds(days, holds)), read_only=True)

    recent = run(7, 100)
    assert (recent.report.transactions, recent.report.suspended, recent.truncated) == (3, 1, False)
    assert recent.report.per_rule["AMT-BIG"].fired == 1
    assert recent.report.legit_suspended == 1  # the big recent sale went through: a false positive
    assert not recent.meets_target
    # the whole history: what the CLI's backtest says, count for count
    everything = run(30, 100)
    cli_report = backtest.run(server.database_url, candidate)
    assert everything.report.transactions == cli_report.transactions == 5
    assert everything.report.suspended == cli_report.suspended == 2
    assert everything.report.per_rule["AMT-BIG"] == cli_report.per_rule["AMT-BIG"]
    # at most M holds: the most recent ones
    two = run(30, 2)
    assert (two.report.transactions, two.truncated, two.report.suspended) == (2, True, 1)
    assert two.first_replayed is not None and two.first_replayed > now - dt.timedelta(hours=3)


def test_backtest_bounds_are_clamped() -> None:
    assert rule_backtest.Bounds.parse(None, None) == rule_backtest.Bounds()
    assert rule_backtest.Bounds.parse("1000", "0") == rule_backtest.Bounds(rule_backtest.MAX_DAYS, 1)
    assert rule_backtest.Bounds.parse("x", "9" * 9) == rule_backtest.Bounds(
        rule_backtest.DEFAULT_DAYS, rule_backtest.MAX_HOLDS)
