"""Issue 19, the reviewer console: the suspended-hold queue with its reasons,
approval (with a step-up above the threshold) and the audit trail, in a real
headless browser; and the parts the pages stand on (the reasons in words,
the audit filter)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fuelcard.v1 import common_pb2, transaction_pb2
from fuelcard_console import audit_trail, risk_reasons
from fuelcard_console.auth import Role
from fuelcard_console.pages.reviewer import APPROVE_STEP_UP_FEN
from fuelcard_server import cards
from playwright.sync_api import Page, expect

from tests.plugins.console import LoginHelper, RunningConsole, StepUpHelper
from tests.support import builders
from tests.support.risk_helpers import authorize, load_rules, rule

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console" / "reviewer.png"


def test_fired_rules_are_described_in_words() -> None:
    rules = risk_reasons.rules_by_id(
        '{"rules": [{"id": "BIG", "kind": "amount", "action": "review", "score": 65,'
        ' "min_amount_fen": 150000, "description": "more than a tank"},'
        ' {"id": "FAST", "kind": "velocity", "action": "score", "score": 30,'
        ' "min_count": 3, "window_s": 600},'
        ' {"id": "NIGHT", "kind": "night_amount", "action": "score", "score": 40,'
        ' "min_amount_fen": 100000, "from": "23:00", "to": "05:00"}]}')
    assert risk_reasons.describe("BIG", rules) == (
        "BIG：单笔金额 ≥ 1500.00 元（暂挂审核，65 分） — more than a tank")
    assert risk_reasons.describe("FAST", rules) == (
        "FAST：该卡 10 分钟内授权次数（含本笔）≥ 3 次（计分，30 分）")
    assert risk_reasons.describe("NIGHT", rules).startswith("NIGHT：夜间 23:00-05:00 单笔金额 ≥ 1000.00 元")
    assert risk_reasons.describe("GONE", rules) == "GONE（该规则已不在当前生效的规则集中）"
    assert risk_reasons.describe("ENGINE_FAULT", {}).endswith("（ENGINE_FAULT）")
    assert risk_reasons.rules_by_id("") == {}


def test_the_audit_filter_reads_beijing_days_and_refuses_what_it_cannot_use() -> None:
    f = audit_trail.AuditFilter.parse({"actor": " reviewer.1 ",
                                       "target": "8C1B4E4A-0E43-4C8B-9C55-0D6E8C9B6F10",
                                       "from": "2026-11-25", "to": "2026-11-25"})
    assert f.actor == "reviewer.1" and f.target == "8c1b4e4a-0e43-4c8b-9c55-0d6e8c9b6f10"
    assert f.since == dt.datetime(2026, 11, 24, 16, 0, tzinfo=dt.UTC)
    assert f.until == dt.datetime(2026, 11, 25, 16, 0, tzinfo=dt.UTC)
    assert f.query() == {"actor": "reviewer.1", "target": "8c1b4e4a-0e43-4c8b-9c55-0d6e8c9b6f10",
                         "from": "2026-11-25", "to": "2026-11-25"}
    for bad, words in (({"target": "6228480402564890018"}, "UUID"), ({"from": "25/11/2026"}, "开始日期"),
                       ({"from": "2026-11-26", "to": "2026-11-25"}, "晚于"), ({"actor": "x" * 101}, "过长")):
        with pytest.raises(audit_trail.FilterError, match=words):
            audit_trail.AuditFilter.parse(bad)


def test_a_reviewer_approves_a_suspended_hold_with_a_step_up_and_the_trail_shows_it(
        console: RunningConsole, page: Page, login: LoginHelper, step_up: StepUpHelper) -> None:
    server = console.server
    load_rules(server, [rule("BIG", "amount", min_amount_fen=100_000, score=65,
                             description="超过一箱油的金额")])
    card = builders.open_card(server, balance_fen=300_000)
    large = authorize(server, card, 150_000)
    assert large.hold.state == common_pb2.HOLD_STATE_SUSPENDED
    hold_id = large.hold.hold_id
    assert large.hold.amount_fen >= APPROVE_STEP_UP_FEN

    name, password, secret = console.make_user(Role.REVIEWER)
    login(page, name, password)
    assert page.url.endswith("/console/reviewer/")
    held = page.locator(f"section.hold[data-hold-id='{hold_id}']")
    expect(held).to_contain_text("BIG：单笔金额 ≥ 1000.00 元（暂挂审核，65 分） — 超过一箱油的金额")
    expect(held).to_contain_text("1500.00 元")
    expect(held.locator(".card-number")).to_have_text(cards.mask(card.card_number))
    assert card.card_number not in page.content()
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Approve: the amount needs a fresh step-up first; nothing is decided before it.
    with page.expect_navigation():
        held.locator("button[value=approve]").click()
    assert "/console/step-up" in page.url
    assert server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold_id)).hold.state == \
        common_pb2.HOLD_STATE_SUSPENDED
    step_up(page, secret)
    held = page.locator(f"section.hold[data-hold-id='{hold_id}']")
    held.locator("input[name=note]").fill("已电话联系司机确认")
    with page.expect_navigation():
        held.locator("button[value=approve]").click()
    expect(page.locator("#notice")).to_have_text("已批准：终端可以加油并确认交易。")
    expect(page.locator(f"section.hold[data-hold-id='{hold_id}']")).to_have_count(0)
    expect(page.locator("#empty-queue")).to_be_visible()

    # The pump may now deliver: the hold is AUTHORIZED and confirms.
    assert server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold_id)).hold.state == \
        common_pb2.HOLD_STATE_AUTHORIZED
    done = builders.confirm(server, hold_id, 90_000)
    assert done.decision == common_pb2.DECISION_APPROVED

    # The audit trail, filtered by the hold: the console's record of the
    # person and the core's of the reviewer certificate, both OK.
    page.goto(f"/console/reviewer/audit?target={hold_id}")
    rows = page.locator("#audit tbody tr")
    approvals = rows.filter(has_text="/fuelcard.console/ReviewHold.approve").filter(has_text=name)
    # the refused first click (no step-up yet), and the approval
    expect(approvals).to_have_count(2)
    expect(approvals.filter(has_text="PERMISSION_DENIED STEP_UP_REQUIRED")).to_have_count(1)
    expect(approvals.locator("td.ok")).to_have_text(["OK"])
    expect(rows.filter(has_text="/fuelcard.v1.RiskService/ReviewHold").locator("td.ok")).to_have_text(["OK"])
    # By actor: the reviewer's login finds their records, another's finds none of them.
    page.goto(f"/console/reviewer/audit?actor={name}&target={hold_id}")
    expect(page.locator("#audit tbody tr").filter(has_text="ReviewHold.approve")).to_have_count(2)
    page.goto(f"/console/reviewer/audit?actor=nobody-at-all&target={hold_id}")
    expect(page.locator("#audit tbody")).to_contain_text("没有符合条件的记录")
    # not a login: a substring, looked for in the last 7 days unless told
    expect(page.locator("#filter-note")).to_contain_text("只查了截止日前 7 天")
    page.goto("/console/reviewer/audit?actor=reviewer")
    expect(page.locator("#audit tbody tr").filter(has_text="ReviewHold.approve")).to_have_count(2)
    page.goto("/console/reviewer/audit?actor=x&from=2026-01-01&to=2026-11-25")
    expect(page.locator("p.error")).to_have_text("操作人不是登录名时按包含匹配，日期范围最多 31 天")
    assert card.card_number not in page.content()


def test_a_reject_needs_no_step_up_and_a_second_verdict_is_refused_in_words(
        console: RunningConsole, page: Page, login: LoginHelper) -> None:
    server = console.server
    load_rules(server, [rule("BIG", "amount", min_amount_fen=10_000)])
    card = builders.open_card(server, balance_fen=300_000)
    hold_id = authorize(server, card, 20_000).hold.hold_id
    name, password, _ = console.make_user(Role.REVIEWER)
    login(page, name, password)
    held = page.locator(f"section.hold[data-hold-id='{hold_id}']")
    # The POS cancels while the reviewer looks: the verdict comes too late.
    page.reload()
    builders.cancel(server, hold_id)
    with page.expect_navigation():
        held.locator("button[value=reject]").click()
    expect(page.locator("#notice")).to_have_text(
        "该预授权已不在暂挂状态（可能已被他人审核，或终端已取消）。（HOLD_NOT_SUSPENDED）")
    hold2 = authorize(server, card, 20_000).hold.hold_id
    page.reload()
    with page.expect_navigation():
        page.locator(f"section.hold[data-hold-id='{hold2}'] button[value=reject]").click()
    expect(page.locator("#notice")).to_have_text("已拒绝：冻结资金已释放。")
    assert server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold2)).hold.state == \
        common_pb2.HOLD_STATE_REJECTED
