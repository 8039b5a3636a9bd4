"""Issue 19: the risk officer's console - rule set versions, the diff between
two of them, drafts, and the bounded backtest, on a real database and a real
core (the browser journey is further down)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import os
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fuelcard.v1 import risk_pb2
from fuelcard_console import backtest_jobs, rule_backtest, rule_sets
from fuelcard_console.auth import Role
from fuelcard_server import cli
from fuelcard_server.db import Database
from fuelcard_server.risk import backtest
from fuelcard_server.risk.model import load_text
from playwright.sync_api import FilePayload, Page

from tests.plugins.console import LoginHelper, RunningConsole, StepUpHelper
from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, scalar
from tests.support.risk_helpers import load_rules, risk, rule

DEFAULT = Path(cli.__file__).parent / "risk" / "default_rules.toml"
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "console"
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
    # In a thread of its own: a browser test of this module may have left
    # Playwright's loop running in the test thread, where asyncio.run() refuses.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, go()).result()


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


def test_the_diff_shows_each_rules_own_changes() -> None:
    old = rule_sets.canonical_lines(rule_sets.validate(SMALL, "toml"))
    new_doc = SMALL.replace("min_amount_fen = 100000", "min_amount_fen = 200000") + (
        '\n[[rules]]\nid = "VEL"\nkind = "velocity"\naction = "review"\nscore = 60\n'
        'min_count = 5\nwindow_s = 3600\n')
    new = rule_sets.canonical_lines(rule_sets.validate(new_doc, "toml"))
    rows = rule_sets.side_by_side(old, new)
    changed = [(r.tag, r.old, r.new) for r in rows if r.tag != "equal"]
    # AMT-BIG's threshold changed, and VEL came in whole - its `action = "review"` and
    # `score = 60` are its own new lines, not taken for AMT-BIG's identical ones
    assert changed == [("replace", "min_amount_fen = 100000", "min_amount_fen = 200000")] + [
        ("insert", "", text) for _, text in new[-8:]]
    assert all(r.old_no is None for r in rows if r.tag == "insert")
    assert rule_sets.side_by_side(old, old) == []
    diff = rule_sets.unified(old, new, "版本 1", "草稿")
    assert diff.startswith("--- 版本 1\n+++ 草稿\n@@ ")
    assert "-min_amount_fen = 100000\n+min_amount_fen = 200000\n" in diff
    assert '+action = "review"' in diff and '-action = "review"' not in diff
    assert rule_sets.unified(old, old, "a", "b") == ""
    # far-apart changes come as two hunks with a gap between
    many = "\n".join(f"line {i}" for i in range(40))
    rows = rule_sets.side_by_side(rule_sets.plain_lines(many), rule_sets.plain_lines(
        many.replace("line 2\n", "line two\n").replace("line 37", "x")))
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
    second = on_database(server.database_url,
                         lambda d: rule_sets.save_draft(d, SMALL, "toml", "officer", now))
    first_page, token = on_database(server.database_url, lambda d: rule_sets.list_drafts(d, page_size=1))
    last_page, end = on_database(server.database_url, lambda d: rule_sets.list_drafts(d, token, 1))
    assert ([d.draft_id for d in first_page], [d.draft_id for d in last_page], end) == (
        [second], [draft_id], "")
    assert on_database(server.database_url, lambda d: rule_sets.get_draft(d, second + 1)) is None


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


def test_the_pages_replay_runs_in_one_worker_process_started_on_demand(server: RunningServer) -> None:
    card = builders.open_card(server, 2_000_000)
    for amount in (30_000, 120_000, 40_000):
        cb.sale(server, card, amount)
        server.advance(dt.timedelta(hours=1))
    now = server.clock.now()
    candidate = rule_sets.validate(SMALL, "toml")
    jobs = backtest_jobs.BacktestJobs()
    assert jobs._pool is None  # nothing started before the first backtest

    async def both(reports: Database) -> tuple[rule_backtest.BacktestResult, rule_backtest.BacktestResult]:
        pool = jobs.pool()
        in_worker = await rule_backtest.run(reports, candidate, now, rule_backtest.Bounds(), replay_in=pool)
        in_thread = await rule_backtest.run(reports, candidate, now, rule_backtest.Bounds())
        return in_worker, in_thread

    try:
        in_worker, in_thread = on_database(server.database_url, both, read_only=True)
        pool = jobs.pool()
        assert pool is jobs._pool and pool._max_workers == 1
        assert pool.submit(os.getpid).result(timeout=60) != os.getpid()  # another process
        assert (in_worker.report.transactions, in_worker.report.suspended) == (3, 1)
        assert in_worker.report == in_thread.report
    finally:
        jobs.close()
    # closed with the edge: the worker is stopped, and a later backtest would start another
    with pytest.raises(RuntimeError):
        pool.submit(os.getpid)
    with pytest.raises(RuntimeError):  # the replay is the pool's: a stopped pool takes none
        on_database(server.database_url, lambda r: rule_backtest.run(
            r, candidate, now, rule_backtest.Bounds(), replay_in=pool), read_only=True)
    assert jobs._pool is None and jobs.pool() is not pool
    jobs.close()


def test_backtest_bounds_are_clamped() -> None:
    assert rule_backtest.Bounds.parse(None, None) == rule_backtest.Bounds()
    assert rule_backtest.Bounds.parse("1000", "0") == rule_backtest.Bounds(rule_backtest.MAX_DAYS, 1)
    assert rule_backtest.Bounds.parse("x", "9" * 9) == rule_backtest.Bounds(
        rule_backtest.DEFAULT_DAYS, rule_backtest.MAX_HOLDS)


def test_backtests_run_as_jobs_kept_a_few_minutes() -> None:
    now = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)
    key = backtest_jobs.JobKey("digest", rule_backtest.Bounds())
    calls: list[str] = []

    def result_at(when: dt.datetime) -> rule_backtest.BacktestResult:
        return rule_backtest.BacktestResult(backtest.Report(transactions=len(calls)), when, when,
                                            rule_backtest.Bounds(), False, None)

    async def go() -> None:
        jobs = backtest_jobs.BacktestJobs()
        gate = asyncio.Event()

        async def slow() -> rule_backtest.BacktestResult:
            calls.append("slow")
            await gate.wait()
            return result_at(now)

        # a long one: the page hears "running", and the same key does not start a second run
        first, job = await jobs.result(key, now, slow)
        again, same = await jobs.result(key, now, slow)
        assert first is None and again is None and same is job and calls == ["slow"]
        gate.set()
        await job.task
        done, _ = await jobs.result(key, now + dt.timedelta(minutes=1), slow)
        assert done is not None and done.report.transactions == 1 and calls == ["slow"]

        async def quick() -> rule_backtest.BacktestResult:
            calls.append("quick")
            return result_at(now)

        # a quick one is answered at once; another key is another run
        other = backtest_jobs.JobKey("digest", rule_backtest.Bounds(days=1))
        answer, _ = await jobs.result(other, now, quick)
        assert answer is not None and calls == ["slow", "quick"]
        # past FRESH_S the result is run again
        later = now + dt.timedelta(seconds=backtest_jobs.FRESH_S + 1)
        rerun, _ = await jobs.result(other, later, quick)
        assert rerun is not None and calls == ["slow", "quick", "quick"]

        async def broken() -> rule_backtest.BacktestResult:
            calls.append("broken")
            raise RuntimeError("replica gone")

        # a failure reaches the page (its error page), and the next request tries again
        failing = backtest_jobs.JobKey("other", rule_backtest.Bounds())
        with pytest.raises(RuntimeError):
            await jobs.result(failing, now, broken)
        recovered, _ = await jobs.result(failing, now, quick)
        assert recovered is not None and calls[-2:] == ["broken", "quick"]

    asyncio.run(go())


# --- in the browser ---------------------------------------------------------------------------

CURRENT = """
name = "现行"
review_score = 60
decline_score = 100

[[rules]]
id = "AMT-BIG"
kind = "amount"
action = "score"
score = 10
min_amount_fen = 100000
"""
NEW = """
# 新版：大额转人工，再加一条频次规则
name = "新版"
review_score = 60
decline_score = 100

[[rules]]
id = "AMT-BIG"
kind = "amount"
action = "review"
score = 60
min_amount_fen = 50000

[[rules]]
id = "VEL-1H"
kind = "velocity"
action = "score"
score = 20
min_count = 3
window_s = 3600
"""


def test_a_risk_officer_loads_compares_backtests_and_activates_a_version(
        console: RunningConsole, page: Page, login: LoginHelper, step_up: StepUpHelper, db: Conn,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = console.server
    first = risk(server).LoadRuleSet(risk_pb2.LoadRuleSetRequest(
        request_id=builders.rid("rules"), document=CURRENT, format=risk_pb2.RULE_FORMAT_TOML))
    card = builders.open_card(server, 2_000_000)
    for amount in (80_000, 20_000, 30_000):  # one of them above the new set's threshold
        cb.sale(server, card, amount)
        console.advance(dt.timedelta(minutes=5))
    name, password, secret = console.make_user(Role.RISK_OFFICER)
    login(page, name, password)

    page.goto("/console/risk/")
    assert page.text_content("#active-version") == str(first.rule_set.version)
    assert page.locator(f"#versions tr[data-version='{first.rule_set.version}']").count() == 1

    # A document with a mistake: nothing kept, the problems said in Chinese.
    page.goto("/console/risk/new")
    page.fill("textarea[name=document]", NEW.replace('kind = "velocity"', 'kind = "speed"'))
    page.click("#new-rules button[type=submit]")
    assert page.locator("#problems tr[data-field='rules[1].kind']").text_content() is not None
    assert "未知的规则类型" in (page.text_content("#problems") or "")
    assert scalar(db, "SELECT count(*) FROM fc.console_rule_drafts") == 0

    # The right one, uploaded as a file (it wins over the text box), becomes a draft; the diff
    # against the version in force shows the change.
    page.set_input_files("input[name=file]", files=FilePayload(
        name="新版.toml", mimeType="text/plain", buffer=NEW.encode()))
    with page.expect_navigation():
        page.click("#new-rules button[type=submit]")
    assert "/console/risk/drafts/" in page.url
    draft_page = page.url
    changed = page.locator("#diff-table tr[data-tag=replace]").all_text_contents()
    assert any("min_amount_fen = 100000" in row and "min_amount_fen = 50000" in row for row in changed)
    assert "VEL-1H" in (page.text_content("#rule-changes") or "")
    assert risk(server).GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest()).rule_set.version == \
        first.rule_set.version  # a draft is not in force

    # The backtest of the draft against the recent sales: the 800-yuan one would be suspended.
    page.click("#run-backtest")
    page.wait_for_selector("#bt-transactions")
    assert page.text_content("#bt-transactions") == "3"
    assert page.text_content("#bt-suspended") == "1"
    assert page.locator("#bt-rules tr[data-rule='AMT-BIG'] td").nth(1).text_content() == "1"
    # A backtest that takes longer: the page says it is running, then shows the result by
    # itself (the replay made slower than the page's wait, as a large slice is).
    real_run = rule_backtest.run

    async def slower(*args: Any, **kwargs: Any) -> rule_backtest.BacktestResult:
        await asyncio.sleep(3 * backtest_jobs.WAIT_S)
        return await real_run(*args, **kwargs)
    monkeypatch.setattr(rule_backtest, "run", slower)
    page.goto(page.url + "&days=3")
    assert page.locator("#bt-running").count() == 1
    page.wait_for_selector("#bt-transactions")
    assert page.text_content("#bt-transactions") == "3"
    page.goto(draft_page)

    # Activation asks for the TOTP step-up; a wrong code is refused and changes nothing.
    with page.expect_navigation():
        page.click("#activate-draft")
    assert "/console/step-up" in page.url
    right = console.totp(secret)
    page.fill("input[name=code]", f"{(int(right) + 1) % 1_000_000:06d}")
    page.click("main button[type=submit]")
    page.wait_for_selector(".error")
    assert "/console/step-up" in page.url
    assert risk(server).GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest()).rule_set.version == \
        first.rule_set.version
    step_up(page, secret)
    assert "/activate" in page.url
    with page.expect_navigation():
        page.click("#activate-form button[type=submit]")
    active = risk(server).GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest()).rule_set
    assert (active.version, active.name) == (first.rule_set.version + 1, "新版")
    assert page.text_content("#active-version") == str(active.version)
    assert scalar(db, "SELECT count(*) FROM fc.audit_log WHERE method = %s AND outcome = 'OK'",
                  (f"/fuelcard.console/LoadRuleSet/v{active.version}",)) == 1

    # The earlier version goes back in force the same way (the step-up still holds).
    page.goto(f"/console/risk/versions/{first.rule_set.version}/activate")
    with page.expect_navigation():
        page.click("#activate-form button[type=submit]")
    assert risk(server).GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest()).rule_set.version == \
        first.rule_set.version
    assert page.text_content("#notice") == "已切换生效版本。"
    assert f"版本 {active.version}" in (page.text_content("#drafts tr[data-draft]") or "")
    assert page.locator("#versions tr[data-version]").count() == 2
    page.screenshot(path=str(SCREENSHOTS / "risk_officer.png"), full_page=True)
