"""The family main-card holder's pages: the family account and its secondary
cards, caps on a secondary card, temporary raises, and points pooling.

The holder acts for their own account (user.account_uid) and its
sub-accounts; every id in a URL is checked against that authority before the
core is called (the JSON API's rule), and the core checks the rest.

A raise - a higher cap, or a temporary raise - needs the code the core sends
to whoever approves it: for a secondary card, the main holder, who is the
console user. So the flow is: the form -> the core sends the code (a step-up
challenge bound to the card and the raise's amount) -> the holder types it
on the next page, which carries the request in hidden fields (the challenge
binds them: a changed field is refused by the core) -> done.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from aiohttp import web
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    control_pb2,
    points_pb2,
    security_pb2,
    step_up_pb2,
)

from fuelcard_console import limit_forms
from fuelcard_console.auth import ConsoleUser, Role, audit, redirect, requires
from fuelcard_console.context import CoreRefusal, console_context
from fuelcard_console.limit_forms import FormError
from fuelcard_console.views import refusal_text, render

MAIN_PAGE = "/console/family/"
PAGE_SIZE = 50
BEIJING = dt.timezone(dt.timedelta(hours=8))
CARD_STATUS_ZH = {account_pb2.CARD_STATUS_ACTIVE: "正常", account_pb2.CARD_STATUS_BLOCKED: "已冻结",
                  account_pb2.CARD_STATUS_CLOSED: "已注销"}
DONE_ZH = {"limits": "限额已更新。", "raise": "临时提额已生效。", "pooled": "积分已合并到主卡账户。"}
# what the holder reads for the refusals a family page meets
REFUSALS_ZH = {
    "STEP_UP_FAILED": "验证码错误、已过期或已用完，请重新获取",
    "NO_PHONE_ON_FILE": "主卡账户没有登记手机号，无法发送验证码",
    "OTP_NOT_SENT": "验证码短信未能发出，请稍后重试",
}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, main)
    router.add_get("/console/family/members/{account_id}", member_page)
    router.add_post("/console/family/members/{account_id}/pool", pool_points)
    router.add_post("/console/family/cards/{card_id}/limits", set_limits)
    router.add_post("/console/family/cards/{card_id}/raise", request_raise)
    router.add_post("/console/family/cards/{card_id}/confirm", confirm_with_code)


def _say(refusal: CoreRefusal) -> str:
    return f"{REFUSALS_ZH[refusal.reason]}（{refusal.reason}）" if refusal.reason in REFUSALS_ZH \
        else refusal_text(refusal)


def _page_token(request: web.Request) -> str:
    token = request.query.get("page_token", "")
    if len(token) > 500:
        raise web.HTTPBadRequest()
    return token


def _mine(user: ConsoleUser) -> str:
    if user.account_uid is None:  # a holder is always made with an account (console_users)
        raise web.HTTPForbidden()
    return user.account_uid


async def _member(request: web.Request, user: ConsoleUser, account_id: str) -> account_pb2.Account:
    """A secondary account of the user's family, or 404 (unknown and not-yours answer alike)."""
    ctx = console_context(request)
    if account_id == _mine(user) or not await ctx.may_touch_account(user, account_id):
        raise web.HTTPNotFound()
    got = await ctx.call(ctx.core.account.GetAccount, account_pb2.GetAccountRequest(account_id=account_id),
                         user)
    account: account_pb2.Account = got.account
    return account


async def _card(request: web.Request, user: ConsoleUser) -> account_pb2.Card:
    """A card of a secondary account of the user's family, or 404."""
    ctx = console_context(request)
    card_id = request.match_info["card_id"]
    if not await ctx.may_touch_card(user, card_id):
        raise web.HTTPNotFound()
    got = await ctx.call(ctx.core.account.GetCard, account_pb2.GetCardRequest(card_id=card_id), user)
    card: account_pb2.Card = got.card
    if card.account_id == _mine(user):
        raise web.HTTPNotFound()  # the main card's caps are not the holder's to set here
    return card


def _caps(limits: control_pb2.SpendingLimits) -> dict[str, int]:
    return {"per_transaction_fen": limits.per_transaction_fen, "daily_fen": limits.daily_fen,
            "monthly_fen": limits.monthly_fen}


# --- the family -------------------------------------------------------------------------------


@requires(Role.HOLDER)
async def main(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    mine = _mine(user)
    family = (await ctx.call(ctx.core.account.GetAccount, account_pb2.GetAccountRequest(account_id=mine),
                             user)).account
    points = await ctx.call(ctx.core.points.GetPointsBalance,
                            points_pb2.GetPointsBalanceRequest(account_id=mine), user)
    token = _page_token(request)
    page = await ctx.call(ctx.core.account.ListSubAccounts, account_pb2.ListSubAccountsRequest(
        parent_account_id=mine, page_size=PAGE_SIZE, page_token=token), user)
    return render("family/main.html", request, {
        "family": family, "points": points.points_balance, "members": list(page.accounts),
        "next_token": page.next_page_token, "first_page": not token,
        "shared": account_pb2.FUNDING_MODE_SHARED,
        "notice": DONE_ZH.get(request.query.get("done", ""), "")})


@requires(Role.HOLDER)
async def member_page(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return await _member_view(request, user)


async def _member_view(request: web.Request, user: ConsoleUser, *, error: str = "", status: int = 200,
                       account_id: str | None = None) -> web.Response:
    ctx = console_context(request)
    member = await _member(request, user, account_id or request.match_info["account_id"])
    token = _page_token(request)
    page = await ctx.call(ctx.core.account.ListCards, account_pb2.ListCardsRequest(
        account_id=member.account_id, page_size=PAGE_SIZE, page_token=token), user)
    cards: list[dict[str, Any]] = []
    for card in page.cards:
        limits = await ctx.call(ctx.core.control.GetSpendingLimits,
                                control_pb2.GetSpendingLimitsRequest(card_id=card.card_id), user)
        raise_end = (limits.raise_end_time.ToDatetime(dt.UTC).astimezone(BEIJING).strftime("%Y-%m-%d %H:%M")
                     if limits.HasField("raise_end_time") else "")
        cards.append({"card": card, "status": CARD_STATUS_ZH.get(card.status, "未知"),
                      "limits": _caps(limits.limits), "effective": _caps(limits.effective_limits),
                      "yuan": {k: limit_forms.fen_to_yuan(v) for k, v in _caps(limits.limits).items()},
                      "used_today": limits.used_today_fen, "used_month": limits.used_this_month_fen,
                      "raise_end": raise_end})
    now = ctx.clock.now().astimezone(BEIJING)
    return render("family/member.html", request, {
        "member": member, "cards": cards, "next_token": page.next_page_token, "first_page": not token,
        "cap_fields": limit_forms.CAP_FIELDS, "error": error,
        "raise_start": now.strftime("%Y-%m-%dT%H:%M"),
        "raise_end": (now + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"),
        "notice": DONE_ZH.get(request.query.get("done", ""), "")}, status=status)


# --- caps and raises --------------------------------------------------------------------------


def _form(post: Any) -> dict[str, str]:
    return {k: v for k, v in post.items() if isinstance(v, str)}


async def _challenge(request: web.Request, user: ConsoleUser, card: account_pb2.Card, kind: str,
                     limits: control_pb2.SpendingLimits, window: limit_forms.RaiseWindow | None
                     ) -> web.Response:
    """Have the core send the approver's code, and show the page that takes it."""
    ctx = console_context(request)
    amount = limit_forms.step_up_amount(limits)
    try:
        sent = await ctx.call(ctx.core.security.CreateStepUpChallenge,
                              security_pb2.CreateStepUpChallengeRequest(
                                  request_id=f"console-{uuid.uuid4().hex}",
                                  kind=step_up_pb2.STEP_UP_KIND_LIMIT_RAISE,
                                  subject_id=card.card_id, amount_fen=amount), user)
    except CoreRefusal as refusal:  # no phone on file, the SMS not sent
        await audit(request, user, "CreateStepUpChallenge", card.card_id, refusal.reason)
        return await _member_view(request, user, error=_say(refusal), status=409, account_id=card.account_id)
    await audit(request, user, "CreateStepUpChallenge", card.card_id, "OK")
    return _code_page(request, card, kind, limits, window, sent.challenge_id, sent.masked_destination)


def _code_page(request: web.Request, card: account_pb2.Card, kind: str, limits: control_pb2.SpendingLimits,
               window: limit_forms.RaiseWindow | None, challenge_id: str, destination: str, *,
               error: str = "", status: int = 200) -> web.Response:
    start, end = window.local_text() if window is not None else ("", "")
    return render("family/code.html", request, {
        "card": card, "kind": kind, "what": "临时提额" if kind == "raise" else "提高限额",
        "caps": [(name, label, limit_forms.fen_to_yuan(getattr(limits, name)))
                 for name, label in limit_forms.CAP_FIELDS],
        "start": start, "end": end, "challenge_id": challenge_id, "destination": destination,
        "error": error}, status=status)


@requires(Role.HOLDER)
async def set_limits(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    card = await _card(request, user)
    try:
        limits = limit_forms.limits_from(_form(await request.post()))
    except FormError as bad:
        await audit(request, user, "SetSpendingLimits", card.card_id, "INVALID_ARGUMENT")
        return await _member_view(request, user, error=bad.message, status=400, account_id=card.account_id)
    try:
        await ctx.call(ctx.core.control.SetSpendingLimits, control_pb2.SetSpendingLimitsRequest(
            request_id=f"console-{uuid.uuid4().hex}", actor_account_id=_mine(user), card_id=card.card_id,
            limits=limits), user)
    except CoreRefusal as refusal:
        if refusal.reason != "STEP_UP_REQUIRED":  # a raise: the approver's code first
            await audit(request, user, "SetSpendingLimits", card.card_id, refusal.reason)
            return await _member_view(request, user, error=_say(refusal), status=409,
                                      account_id=card.account_id)
        await audit(request, user, "SetSpendingLimits", card.card_id, "STEP_UP_REQUIRED")
        return await _challenge(request, user, card, "limits", limits, None)
    await audit(request, user, "SetSpendingLimits", card.card_id, "OK")
    return redirect(f"/console/family/members/{card.account_id}?done=limits")


@requires(Role.HOLDER)
async def request_raise(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    card = await _card(request, user)
    form = _form(await request.post())
    try:
        limits = limit_forms.limits_from(form)
        window = limit_forms.RaiseWindow.parse(form.get("start_time", ""), form.get("end_time", ""))
    except FormError as bad:
        await audit(request, user, "GrantTemporaryRaise", card.card_id, "INVALID_ARGUMENT")
        return await _member_view(request, user, error=bad.message, status=400, account_id=card.account_id)
    return await _challenge(request, user, card, "raise", limits, window)


@requires(Role.HOLDER)
async def confirm_with_code(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """The code page's post: the request it carries, with the code the holder received."""
    ctx = console_context(request)
    card = await _card(request, user)
    form = _form(await request.post())
    kind = "raise" if form.get("kind") == "raise" else "limits"
    challenge_id, code = form.get("challenge_id", ""), form.get("code", "").strip()
    try:
        limits = limit_forms.limits_from(form)
        window = (limit_forms.RaiseWindow.parse(form.get("start_time", ""), form.get("end_time", ""))
                  if kind == "raise" else None)
    except FormError:
        await audit(request, user, "ConfirmLimitRaise", card.card_id, "INVALID_ARGUMENT")
        raise web.HTTPBadRequest() from None
    step_up = step_up_pb2.StepUp(challenge_id=challenge_id, code=code)
    # a second press of the same code gets the first answer; another code (after a wrong one)
    # is another attempt, never the wrong one's remembered refusal
    request_id = f"console-{kind}-{uuid.uuid5(uuid.NAMESPACE_URL, f'{challenge_id}/{code}').hex}"
    action = "GrantTemporaryRaise" if kind == "raise" else "SetSpendingLimits"
    try:
        if window is not None:
            start, end = window.timestamps()
            await ctx.call(ctx.core.control.GrantTemporaryRaise, control_pb2.GrantTemporaryRaiseRequest(
                request_id=request_id, actor_account_id=_mine(user), card_id=card.card_id, limits=limits,
                start_time=start, end_time=end, step_up=step_up), user)
        else:
            await ctx.call(ctx.core.control.SetSpendingLimits, control_pb2.SetSpendingLimitsRequest(
                request_id=request_id, actor_account_id=_mine(user), card_id=card.card_id, limits=limits,
                step_up=step_up), user)
    except CoreRefusal as refusal:
        await audit(request, user, action, card.card_id, refusal.reason)
        return _code_page(request, card, kind, limits, window, challenge_id, form.get("destination", ""),
                          error=_say(refusal), status=403 if refusal.reason == "STEP_UP_FAILED" else 409)
    await audit(request, user, action, card.card_id, "OK")
    return redirect(f"/console/family/members/{card.account_id}?done={kind}")


# --- points pooling ---------------------------------------------------------------------------


@requires(Role.HOLDER)
async def pool_points(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    member = await _member(request, user, request.match_info["account_id"])
    form = _form(await request.post())
    try:
        points = (member.points_balance if form.get("all") == "1"
                  else limit_forms.points_from(form.get("points", "")))
        if points <= 0:
            raise FormError("points", "该成员没有可合并的积分")
    except FormError as bad:
        await audit(request, user, "TransferPoints", member.account_id, "INVALID_ARGUMENT")
        return await _member_view(request, user, error=bad.message, status=400, account_id=member.account_id)
    try:
        answer = await ctx.call(ctx.core.control.TransferPoints, control_pb2.TransferPointsRequest(
            request_id=f"console-{uuid.uuid4().hex}", from_account_id=member.account_id,
            to_account_id=_mine(user), points=points), user)
    except CoreRefusal as refusal:
        await audit(request, user, "TransferPoints", member.account_id, refusal.reason)
        return await _member_view(request, user, error=_say(refusal), status=409,
                                  account_id=member.account_id)
    if answer.decision != common_pb2.DECISION_APPROVED:
        await audit(request, user, "TransferPoints", member.account_id, "DECLINED")
        return await _member_view(request, user, error="该成员积分不足，未合并。", status=409,
                                  account_id=member.account_id)
    await audit(request, user, "TransferPoints", member.account_id, "OK")
    return redirect(f"{MAIN_PAGE}?done=pooled")
