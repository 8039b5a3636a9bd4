"""Issue 19, the finance console: reconciliation of an uploaded settlement
file, breaks, exceptions and adjustments under dual control.

The browser journeys (test_finance_*_in_the_browser) drive the real console
in Chromium; the tests before them pin the parts the pages stand on: the
dual control of two people behind one edge certificate, the upload's checks
and the amounts in yuan."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from fuelcard.v1 import adjustment_pb2, adjustment_pb2_grpc, funding_pb2, settlement_pb2, settlement_pb2_grpc
from fuelcard_adapters.channels import by_name
from fuelcard_adapters.neutral import Kind, NeutralRecord, Status
from fuelcard_console import reconcile_upload
from fuelcard_console.auth import Role
from fuelcard_console.ops_labels import mask_digits, parse_yuan, refusal_zh
from fuelcard_loadtest import channel_files
from fuelcard_server.identity import ON_BEHALF_OF
from playwright.sync_api import Browser, Page, expect

from tests.plugins.console import LoginHelper, RunningConsole, StepUpHelper
from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row
from tests.support.ledger_asserts import expect as expect_refusal

CREDIT = adjustment_pb2.ADJUSTMENT_DIRECTION_CREDIT
T = TypeVar("T")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console" / "finance.png"


def _as(person: str) -> tuple[tuple[str, str]]:
    return ((ON_BEHALF_OF, f"console_user:{person}"),)


def test_two_console_users_behind_one_edge_certificate_are_two_people_for_dual_control(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    edge = adjustment_pb2_grpc.AdjustmentServiceStub(tls_server.channel("admin-ops"))
    maker, checker = str(uuid.uuid4()), str(uuid.uuid4())
    proposed = edge.ProposeAdjustment(adjustment_pb2.ProposeAdjustmentRequest(
        request_id=builders.rid("adj"), account_id=card.account_id, direction=CREDIT,
        amount_fen=1_500, reason="double charge, ticket 4711"), metadata=_as(maker)).adjustment
    assert proposed.proposed_by == f"admin::ops for console_user:{maker}"

    def approve(person: str) -> adjustment_pb2.ApproveAdjustmentResponse:
        answer: adjustment_pb2.ApproveAdjustmentResponse = edge.ApproveAdjustment(
            adjustment_pb2.ApproveAdjustmentRequest(request_id=builders.rid("ok"),
                                                    adjustment_id=proposed.adjustment_id),
            metadata=_as(person))
        return answer

    # The maker, through the same edge, is still the maker.
    expect_refusal(lambda: approve(maker), grpc.StatusCode.PERMISSION_DENIED, "OWN_ADJUSTMENT")
    assert account_row(db, card.account_id)["balance_fen"] == 10_000
    done = approve(checker)
    assert done.balance_fen == 11_500
    assert done.adjustment.decided_by == f"admin::ops for console_user:{checker}"
    assert account_row(db, card.account_id)["balance_fen"] == 11_500


def test_amounts_typed_in_yuan_become_fen_exactly() -> None:
    assert parse_yuan("100") == 10_000
    assert parse_yuan("0.1") == 10
    assert parse_yuan(" 12.34 ") == 1_234
    for bad in ("0", "0.00", "-5", "1.234", "1e3", "abc", "", "123456789"):
        assert parse_yuan(bad) is None, bad


def test_long_digit_runs_are_masked_and_refusals_are_in_words() -> None:
    assert mask_digits("card 6228480402564890018 called") == "card ***************0018 called"
    assert mask_digits("ticket 4711, phone 13800138000") == "ticket 4711, phone *******8000"
    assert refusal_zh("OWN_ADJUSTMENT").startswith("不能复核自己提交的调账")
    assert refusal_zh("OWN_ADJUSTMENT").endswith("（OWN_ADJUSTMENT）")
    assert refusal_zh("SOMETHING_NEW") == "操作被拒绝（SOMETHING_NEW）。"


def test_an_upload_is_checked_before_anything_runs() -> None:
    ok = reconcile_upload.check("WECHAT_PAY", "2026-11-25", "../../etc/微信 bill.csv", b"x")
    assert (ok.channel, ok.day, ok.file_name) == ("WECHAT_PAY", dt.date(2026, 11, 25), "___bill.csv")
    for channel, day, data, words in (("PAYPAL", "2026-11-25", b"x", "渠道"),
                                      ("ALIPAY", "25/11/2026", b"x", "业务日期"),
                                      ("ALIPAY", "2026-11-25", b"", "文件为空")):
        with pytest.raises(reconcile_upload.UploadError, match=words):
            reconcile_upload.check(channel, day, "f.csv", data)


def _in_a_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on an event loop of its own thread (Playwright's sync
    API, once started in this session, keeps a loop on the test thread)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def test_an_upload_with_one_mismatch_stores_one_break(server: RunningServer, db: Conn,
                                                          tmp_path: Path) -> None:
    name = "WECHAT_PAY"
    channel = by_name(name).channel
    day = dt.date(2026, 11, 25)
    card = builders.open_card(server)
    for i in range(3):
        server.funding.Recharge(funding_pb2.RechargeRequest(
            request_id=builders.rid("rc"), account_id=card.account_id, channel=channel,  # type: ignore[arg-type]
            channel_txn_id=f"42{uuid.uuid4().hex}", amount_fen=10_000 + i))
    records = [NeutralRecord(channel, Kind(k), txn, amount, at, Status(st), 6, orig)
               for k, txn, amount, at, st, orig in db.execute(
                   "SELECT kind, channel_txn_id, amount_fen, occurred_at, status,"
                   " original_channel_txn_id FROM fc.settlement_records WHERE channel = %s ORDER BY id",
                   (channel,))]
    records[1] = dataclasses.replace(records[1], amount_fen=records[1].amount_fen + 100)
    path = channel_files.write(name, records, day, tmp_path / "bill.csv")
    upload = reconcile_upload.check(name, day.isoformat(), "bill.csv", path.read_bytes())
    result = _in_a_loop(reconcile_upload.run(server.database_url, upload, dt.datetime.now(dt.UTC)))
    assert result.counts["amount_mismatch"] == 1 and result.break_count == 1
    assert [b.channel_txn_id for b in result.breaks] == [records[1].channel_txn_id]
    assert db.execute("SELECT count(*) FROM fc.reconciliation_breaks WHERE resolved_at IS NULL"
                      ).fetchone() == (1,)
    # A file that is not the channel's format is refused, and nothing stored.
    foreign = reconcile_upload.check("ALIPAY", day.isoformat(), "bill.csv", path.read_bytes())
    with pytest.raises(reconcile_upload.UploadError, match="支付宝"):
        _in_a_loop(reconcile_upload.run(server.database_url, foreign, dt.datetime.now(dt.UTC)))
    assert db.execute("SELECT count(*) FROM fc.reconciliation_runs").fetchone() == (1,)


# --- in the browser --------------------------------------------------------------------------


def _our_records(db: Conn, channel: int) -> list[NeutralRecord]:
    """Our settlement records, as the channel's file would list them."""
    return [NeutralRecord(channel, Kind(k), txn, amount, at, Status(st), amount * 6 // 1000, orig)
            for k, txn, amount, at, st, orig in db.execute(
                "SELECT kind, channel_txn_id, amount_fen, occurred_at, status,"
                " original_channel_txn_id FROM fc.settlement_records WHERE channel = %s ORDER BY id",
                (channel,))]


def test_finance_uploads_a_settlement_file_and_resolves_its_break_in_the_browser(
        console: RunningConsole, page: Page, login: LoginHelper, db: Conn, tmp_path: Path) -> None:
    server = console.server
    name = "WECHAT_PAY"
    channel = by_name(name).channel
    day = dt.date(2026, 11, 25)  # the console clock's day, Beijing time
    card = builders.open_card(server)
    for i in range(4):
        server.funding.Recharge(funding_pb2.RechargeRequest(
            request_id=builders.rid("rc"), account_id=card.account_id, channel=channel,  # type: ignore[arg-type]
            channel_txn_id=f"42{uuid.uuid4().hex}", amount_fen=20_000 + i))
    records = _our_records(db, channel)
    assert len(records) == 4
    # The channel says one payment was a yuan more than we booked.
    records[2] = dataclasses.replace(records[2], amount_fen=records[2].amount_fen + 100)
    path = channel_files.write(name, records, day, tmp_path / f"wechat-{day}.csv")

    user, password, _ = console.make_user(Role.FINANCE)
    login(page, user, password)
    assert page.url.endswith("/console/finance/")
    page.select_option("select[name=channel]", name)
    page.fill("input[name=business_date]", day.isoformat())
    page.set_input_files("input[name=file]", str(path))
    with page.expect_navigation():
        page.click("#reconcile-form button[type=submit]")
    result = page.locator("#reconcile-result")
    expect(page.locator("#break-count")).to_have_text("发现 1 笔差错，已保存待跟进。")
    expect(result).to_contain_text("微信支付 2026-11-25")
    found = result.locator("table.found-breaks tbody tr")
    expect(found).to_have_count(1)
    expect(found).to_contain_text(records[2].channel_txn_id)
    expect(found).to_contain_text("金额不符")
    expect(found.locator("td.num")).to_have_text(["200.02", "201.02"])

    # The main page now lists the open break (the screenshot shows it).
    page.goto("/console/finance/")
    expect(page.locator("table.breaks tbody tr[data-break-id]")).to_have_count(1)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Follow it up: the breaks of that channel and day, resolved with a note.
    page.goto(f"/console/finance/breaks?channel={name}&date={day}")
    row = page.locator("table.breaks tbody tr[data-break-id]")
    expect(row).to_have_count(1)
    break_id = row.get_attribute("data-break-id")
    assert break_id is not None
    row.locator("input[name=resolution]").fill("渠道多记 1 元，已提交差错调整单 4711")
    with page.expect_navigation():
        row.locator("button[type=submit]").click()
    expect(page.locator("p.ok[role=status]")).to_have_text("差错已处理。")
    expect(page.locator("table.breaks tbody tr[data-break-id]")).to_have_count(0)

    listed = settlement_pb2_grpc.ReconciliationServiceStub(console.core_channel()).ListBreaks(
        settlement_pb2.ListBreaksRequest(channel=channel, include_resolved=True))  # type: ignore[arg-type]
    assert [(b.break_id, b.kind, b.resolved, b.resolution) for b in listed.breaks] == [
        (break_id, settlement_pb2.BREAK_KIND_AMOUNT_MISMATCH, True, "渠道多记 1 元，已提交差错调整单 4711")]
    # Shown with the resolved ones on request, and resolving it again is refused in words.
    page.goto(f"/console/finance/breaks?channel={name}&resolved=1")
    expect(page.locator(f"tr[data-break-id='{break_id}'] .state")).to_have_text("已处理")
    # The upload and the resolution are in the audit trail, with their outcomes.
    audited = db.execute("SELECT method, outcome FROM fc.audit_log WHERE actor LIKE 'console:finance:%%'"
                         " AND method <> '/fuelcard.console/Login' ORDER BY id").fetchall()
    assert audited == [(f"/fuelcard.console/Reconcile/{name}-{day}", "OK"),
                       ("/fuelcard.console/ResolveBreak", "OK")]


def test_a_file_in_another_channels_format_is_refused_in_words_in_the_browser(
        console: RunningConsole, page: Page, login: LoginHelper, db: Conn, tmp_path: Path) -> None:
    path = tmp_path / "not-a-bill.csv"
    path.write_text("hello,world\n1,2\n", encoding="utf-8")
    user, password, _ = console.make_user(Role.FINANCE)
    login(page, user, password)
    page.select_option("select[name=channel]", "ALIPAY")
    page.fill("input[name=business_date]", "2026-11-25")
    page.set_input_files("input[name=file]", str(path))
    with page.expect_navigation():
        page.click("#reconcile-form button[type=submit]")
    expect(page.locator("#upload-error")).to_contain_text("文件不是支付宝的对账单格式")
    assert db.execute("SELECT count(*) FROM fc.reconciliation_runs").fetchone() == (0,)
    # The exceptions page answers (nothing open here).
    page.goto("/console/finance/exceptions")
    expect(page.locator("#settlement-exceptions tbody")).to_contain_text("没有结算异常")
    expect(page.locator("#channel-exceptions tbody")).to_contain_text("没有渠道异常")


def test_an_adjustment_proposed_by_one_finance_user_is_approved_by_another_with_a_step_up(
        console: RunningConsole, page: Page, browser: Browser, login: LoginHelper,
        step_up: StepUpHelper) -> None:
    server = console.server
    card = builders.open_card(server, balance_fen=10_000)
    maker, maker_password, maker_secret = console.make_user(Role.FINANCE)
    checker, checker_password, checker_secret = console.make_user(Role.FINANCE)

    login(page, maker, maker_password)
    page.goto("/console/finance/adjustments")
    page.fill("#propose-form input[name=account_id]", card.account_id)
    page.select_option("#propose-form select[name=direction]", "credit")
    page.fill("#propose-form input[name=amount_yuan]", "25.00")
    page.fill("#propose-form textarea[name=reason]", "11 月 20 日 KM-001 重复扣款，工单 4711")
    with page.expect_navigation():
        page.click("#propose-form button[type=submit]")
    expect(page.locator("#notice")).to_have_text("调账已提交，等待另一位财务人员复核。")
    row = page.locator("#adjustments tbody tr[data-adjustment-id]")
    expect(row).to_have_count(1)
    expect(row.locator(".state")).to_have_text("待复核 （本人提交）")
    adjustment_id = row.get_attribute("data-adjustment-id")
    assert adjustment_id is not None
    assert builders.balance(server, card).balance.balance_fen == 10_000  # nothing booked yet

    # The maker tries to approve their own: step-up first, then the core refuses.
    with page.expect_navigation():
        row.locator("a.decide").click()
    step_up(page, maker_secret)
    assert page.url.endswith(f"/console/finance/adjustments/{adjustment_id}")
    with page.expect_navigation():
        page.click("#approve-form button[type=submit]")
    expect(page.locator("#notice")).to_have_text(
        "不能复核自己提交的调账：须由另一位财务人员批准（双人复核）。（OWN_ADJUSTMENT）")
    expect(page.locator("#state")).to_have_text("待复核")
    assert builders.balance(server, card).balance.balance_fen == 10_000

    # The checker, in a browser of their own: step-up, approve, booked.
    context = browser.new_context(base_url=console.base_url, locale="zh-CN")
    try:
        other = context.new_page()
        login(other, checker, checker_password)
        other.goto(f"/console/finance/adjustments/{adjustment_id}")
        step_up(other, checker_secret)
        expect(other.locator("[data-adjustment-id]")).not_to_contain_text("本人提交")
        with other.expect_navigation():
            other.click("#approve-form button[type=submit]")
        expect(other.locator("#notice")).to_have_text("调账已批准并入账。")
        expect(other.locator("#state")).to_have_text("已批准入账")
    finally:
        context.close()
    assert builders.balance(server, card).balance.balance_fen == 12_500
    got = adjustment_pb2_grpc.AdjustmentServiceStub(console.core_channel()).GetAdjustment(
        adjustment_pb2.GetAdjustmentRequest(adjustment_id=adjustment_id)).adjustment
    assert got.state == adjustment_pb2.ADJUSTMENT_STATE_APPROVED and got.amount_fen == 2_500
    assert got.proposed_by.endswith("for console_user:" + _user_uid(console, maker))
    assert got.decided_by.endswith("for console_user:" + _user_uid(console, checker))


def _user_uid(console: RunningConsole, login: str) -> str:
    with psycopg.connect(console.database_url) as conn:
        row = conn.execute("SELECT uid::text FROM fc.console_users WHERE login = %s", (login,)).fetchone()
    assert row is not None
    return str(row[0])
