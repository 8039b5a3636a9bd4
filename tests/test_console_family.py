"""Issue 19: the family main-card holder's console - caps typed in yuan, a raise's
window in Beijing time, the step-up a raise is bound to (on a real core), and
the browser journey further down."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    step_up_pb2,
)
from fuelcard_console import limit_forms
from fuelcard_console.auth import Role
from fuelcard_console.limit_forms import FormError
from fuelcard_server.clock import ManualClock
from fuelcard_server.settings import Settings
from fuelcard_server.stepup import FileOtpSender
from playwright.sync_api import Page

from tests.plugins import console as console_plugin
from tests.plugins import logscan
from tests.plugins.console import LoginHelper, RunningConsole
from tests.plugins.server import ServerThread, TlsServer, make_settings
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import expect
from tests.support.otp_fake import FakeOtpSender

SCREENSHOTS = Path(__file__).parent.parent / "docs" / "console"
MAIN_PHONE = "13700000013"
SECOND_PHONE = "13700000014"


def test_caps_are_read_in_yuan_exactly() -> None:
    assert limit_forms.yuan_to_fen("12.5", "daily_fen", "每日上限") == 1250
    assert limit_forms.yuan_to_fen(" 1,000.05 ", "daily_fen", "每日上限") == 100_005
    assert limit_forms.yuan_to_fen("0.1", "x", "x") == 10
    assert limit_forms.yuan_to_fen("", "x", "x") == 0  # no cap
    for bad in ("-1", "1.234", "1e3", "abc", "12元", "99999999999"):
        with pytest.raises(FormError) as caught:
            limit_forms.yuan_to_fen(bad, "monthly_fen", "每月上限")
        assert caught.value.field == "monthly_fen" and "每月上限" in caught.value.message
    assert limit_forms.fen_to_yuan(100_005) == "1000.05" and limit_forms.fen_to_yuan(0) == ""
    limits = limit_forms.limits_from({"per_transaction_fen": "300", "daily_fen": "500.5"})
    assert (limits.per_transaction_fen, limits.daily_fen, limits.monthly_fen) == (30_000, 50_050, 0)
    assert limit_forms.points_from(" 42 ") == 42
    for bad in ("0", "-3", "1.5", ""):
        with pytest.raises(FormError):
            limit_forms.points_from(bad)


def test_the_step_up_amount_is_the_highest_cap_or_zero_when_one_is_left_open() -> None:
    caps = control_pb2.SpendingLimits
    assert limit_forms.step_up_amount(caps(per_transaction_fen=1, daily_fen=5, monthly_fen=3)) == 5
    assert limit_forms.step_up_amount(caps(per_transaction_fen=1, daily_fen=5)) == 0


def test_a_raise_window_is_beijing_time() -> None:
    window = limit_forms.RaiseWindow.parse("2026-11-25T08:00", "2026-11-26T08:00")
    assert window.start == dt.datetime(2026, 11, 25, 0, 0, tzinfo=dt.UTC)
    assert window.local_text() == ("2026-11-25T08:00", "2026-11-26T08:00")
    start, end = window.timestamps()
    assert (start.seconds, end.seconds - start.seconds) == (int(window.start.timestamp()), 86_400)
    for start_text, end_text, field in (("2026-11-25T08:00", "2026-11-25T07:00", "end_time"),
                                        ("2026-11-25T08:00", "2027-03-01T08:00", "end_time"),
                                        ("soon", "2026-11-25T07:00", "start_time"),
                                        ("2026-11-25T08:00+08:00", "2026-11-26T08:00", "start_time")):
        with pytest.raises(FormError) as caught:
            limit_forms.RaiseWindow.parse(start_text, end_text)
        assert caught.value.field == field


# --- the step-up the console asks for is the one the core wants ------------------------------


@dataclass
class Core:
    sender: FakeOtpSender
    accounts: account_pb2_grpc.AccountServiceStub
    control: control_pb2_grpc.ControlServiceStub
    security: security_pb2_grpc.SecurityServiceStub

    def open(self, phone: str, parent: str = "") -> str:
        logscan.register("phone", phone)
        opened = self.accounts.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=f"fam-{uuid.uuid4().hex[:16]}", type=account_pb2.ACCOUNT_TYPE_FAMILY,
            holder=account_pb2.Holder(name="家庭", phone=phone), parent_account_id=parent,
            funding_mode=account_pb2.FUNDING_MODE_SHARED if parent else account_pb2.FUNDING_MODE_UNSPECIFIED))
        account_id: str = opened.account.account_id
        return account_id

    def card(self, account_id: str) -> str:
        issued = self.accounts.IssueCard(account_pb2.IssueCardRequest(
            request_id=f"fam-{uuid.uuid4().hex[:16]}", account_id=account_id))
        logscan.register("card number", issued.card_number)
        card_id: str = issued.card.card_id
        return card_id

    def step_up(self, subject: str, limits: control_pb2.SpendingLimits) -> tuple[step_up_pb2.StepUp, str]:
        answer = self.security.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
            request_id=f"fam-{uuid.uuid4().hex[:16]}", kind=step_up_pb2.STEP_UP_KIND_LIMIT_RAISE,
            subject_id=subject, amount_fen=limit_forms.step_up_amount(limits)))
        [sent] = [s for s in self.sender.sent if s.challenge_id == answer.challenge_id]
        return step_up_pb2.StepUp(challenge_id=answer.challenge_id, code=sent.code), sent.destination


@pytest.fixture
def core(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[Core]:
    settings = make_settings(tmp_path, insecure=False, tls_dir=dev_certs, step_up_limit_raises=True)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    sender = FakeOtpSender()
    thread.server.otp_sender = sender
    port = thread.start()
    handle = TlsServer(f"127.0.0.1:{port}", database_url, clock, dev_certs)
    try:
        channel = handle.channel("admin-ops")
        yield Core(sender, account_pb2_grpc.AccountServiceStub(channel),
                   control_pb2_grpc.ControlServiceStub(channel),
                   security_pb2_grpc.SecurityServiceStub(channel))
    finally:
        for ch in handle.channels:
            ch.close()
        thread.stop()


def test_the_code_the_console_asks_for_approves_the_raise_it_shows(core: Core) -> None:
    main = core.open(MAIN_PHONE)
    card = core.card(core.open(SECOND_PHONE, parent=main))
    core.control.SetSpendingLimits(control_pb2.SetSpendingLimitsRequest(
        request_id="fam-first", actor_account_id=main, card_id=card,
        limits=limit_forms.limits_from({"per_transaction_fen": "100", "daily_fen": "200",
                                        "monthly_fen": "2000"})))
    raised = limit_forms.limits_from({"per_transaction_fen": "800", "daily_fen": "1000",
                                      "monthly_fen": "3000"})
    window = limit_forms.RaiseWindow.parse("2026-11-25T16:00", "2026-11-27T16:00")
    start, end = window.timestamps()

    def grant(step_up: step_up_pb2.StepUp, limits: control_pb2.SpendingLimits
              ) -> control_pb2.GrantTemporaryRaiseResponse:
        answer: control_pb2.GrantTemporaryRaiseResponse = core.control.GrantTemporaryRaise(
            control_pb2.GrantTemporaryRaiseRequest(
                request_id=f"fam-{uuid.uuid4().hex[:16]}", actor_account_id=main, card_id=card,
                limits=limits, start_time=start, end_time=end, step_up=step_up))
        return answer

    # The code goes to the main holder (the console user), not to the secondary card's holder,
    step_up, to = core.step_up(card, raised)
    assert to == MAIN_PHONE
    # and it approves exactly the raise it was asked for: not a bigger one ...
    bigger = limit_forms.limits_from({"per_transaction_fen": "800", "daily_fen": "1000",
                                      "monthly_fen": "3001"})
    expect(lambda: grant(step_up, bigger), grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    # ... nor with a wrong code,
    step_up, _ = core.step_up(card, raised)
    wrong = step_up_pb2.StepUp(challenge_id=step_up.challenge_id,
                               code=f"{(int(step_up.code) + 1) % 1_000_000:06d}")
    expect(lambda: grant(wrong, raised), grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    # but this one, once.
    assert grant(step_up, raised).raise_id
    effective = core.control.GetSpendingLimits(control_pb2.GetSpendingLimitsRequest(card_id=card))
    assert effective.limits.monthly_fen == 200_000  # the standing cap is unchanged


# --- in the browser ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def raises_need_a_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """The console's TLS core (tests/plugins/console.py) with limit raises behind a step-up, as
    in production, and the codes it sends written to <its data dir>/otp-outbox.jsonl (the
    test reads the code the holder's phone would get there)."""
    def with_step_up(path: Path, **overrides: Any) -> Settings:
        if overrides.get("insecure") is False:
            overrides |= {"step_up_limit_raises": True, "otp_outbox_file": path / OUTBOX}
        return make_settings(path, **overrides)
    monkeypatch.setattr(console_plugin, "make_settings", with_step_up)


OUTBOX = "otp-outbox.jsonl"


def _caps_form(page: Page, form: str, txn: str, daily: str, monthly: str) -> None:
    page.fill(f"{form} input[name=per_transaction_fen]", txn)
    page.fill(f"{form} input[name=daily_fen]", daily)
    page.fill(f"{form} input[name=monthly_fen]", monthly)


def test_a_holder_caps_a_secondary_card_grants_a_raise_and_pools_points(
        console: RunningConsole, page: Page, login: LoginHelper, tmp_path: Path) -> None:
    server = console.server
    logscan.register("phone", MAIN_PHONE)
    main = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_FAMILY,
        holder=account_pb2.Holder(name="张伟", phone=MAIN_PHONE))).account.account_id
    builders.recharge(server, main, 500_000)
    son = cb.open_account(server, parent=main, mode=cb.SHARED, label="儿子")
    card = cb.issue_card(server, son.account_id)
    cb.sale(server, card, 30_000)  # points to the son
    son_points = cb.points_of(server, son.account_id)
    main_points = cb.points_of(server, main)
    assert son_points > 0
    name, password, _ = console.make_user(Role.HOLDER, main)
    login(page, name, password)

    page.goto("/console/family/")
    row = page.locator(f"#members tr[data-account='{son.account_id}']")
    assert row.locator("td[data-points]").text_content() == str(son_points)
    page.screenshot(path=str(SCREENSHOTS / "holder.png"), full_page=True)

    # A cap on the son's card (from none: not a raise, no code); the pump is held to it.
    with page.expect_navigation():
        row.locator("a").first.click()
    section = f"section[data-card='{card.card_id}']"
    _caps_form(page, f"{section} .limits-form", "200", "500", "3000")
    with page.expect_navigation():
        page.click(f"{section} .limits-form button[type=submit]")
    assert page.text_content("#notice") == "限额已更新。"
    assert page.text_content(f"{section} td[data-cap=per_transaction_fen]") == "200.00"
    assert cb.declined(server, card, 25_000) == common_pb2.DECLINE_REASON_LIMIT_PER_TRANSACTION
    cb.approved(server, card, 15_000)

    # A temporary raise: the code goes to the main holder's phone; a wrong one is refused.
    _caps_form(page, f"{section} .raise-form", "800", "1000", "3000")
    with page.expect_navigation():
        page.click(f"{section} .raise-form button[type=submit]")
    assert page.text_content("#code-destination") == "137****0013"
    challenge = page.get_attribute("#code-form input[name=challenge_id]", "value")
    assert challenge
    code = FileOtpSender(tmp_path / "core" / OUTBOX).read_code(challenge)
    assert code is not None
    page.fill("#code-form input[name=code]", f"{(int(code) + 1) % 1_000_000:06d}")
    with page.expect_navigation():
        page.click("#code-form button[type=submit]")
    assert "STEP_UP_FAILED" in (page.text_content("#code-error") or "")
    assert cb.declined(server, card, 50_000) == common_pb2.DECLINE_REASON_LIMIT_PER_TRANSACTION
    page.fill("#code-form input[name=code]", code)
    with page.expect_navigation():
        page.click("#code-form button[type=submit]")
    assert page.text_content("#notice") == "临时提额已生效。"
    assert page.text_content(f"{section} td[data-effective=per_transaction_fen]") == "800.00"
    assert page.text_content(f"{section} td[data-cap=per_transaction_fen]") == "200.00"
    cb.approved(server, card, 50_000)

    # Raising the standing cap needs a code too (lowering did not).
    _caps_form(page, f"{section} .limits-form", "300", "1000", "3000")
    with page.expect_navigation():
        page.click(f"{section} .limits-form button[type=submit]")
    challenge = page.get_attribute("#code-form input[name=challenge_id]", "value")
    code = FileOtpSender(tmp_path / "core" / OUTBOX).read_code(challenge or "")
    assert code is not None
    page.fill("#code-form input[name=code]", code)
    with page.expect_navigation():
        page.click("#code-form button[type=submit]")
    assert page.text_content("#notice") == "限额已更新。"
    assert page.text_content(f"{section} td[data-cap=per_transaction_fen]") == "300.00"

    # Points pooling: the son's points move to the main account.
    page.goto("/console/family/")
    with page.expect_navigation():
        page.click(f"#members tr[data-account='{son.account_id}'] button[type=submit]")
    assert page.text_content("#notice") == "积分已合并到主卡账户。"
    assert cb.points_of(server, son.account_id) == 0
    assert cb.points_of(server, main) == main_points + son_points
    assert page.text_content("#family-points") == str(main_points + son_points)

    # Another family's member and card are not this holder's: not shown, not changed.
    other = cb.open_account(server, account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    stranger = cb.open_account(server, parent=other.account_id, mode=cb.SHARED, label="邻居")
    their_card = cb.issue_card(server, stranger.account_id)
    answer = page.goto(f"/console/family/members/{stranger.account_id}")
    assert answer is not None and answer.status == 404
    page.goto("/console/family/")
    token = page.get_attribute("input[name=csrf_token]", "value") or ""
    posted = page.request.post(f"/console/family/cards/{their_card.card_id}/limits", form={
        "csrf_token": token, "per_transaction_fen": "1", "daily_fen": "1", "monthly_fen": "1"},
        max_redirects=0)
    assert posted.status == 404
    assert cb.caps(cb.get_limits(server, card=their_card.card_id).limits) == (0, 0, 0)
    # and the holder's own main account is no "member"
    answer = page.goto(f"/console/family/members/{main}")
    assert answer is not None and answer.status == 404

