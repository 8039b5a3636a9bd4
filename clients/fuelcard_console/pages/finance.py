"""Finance's pages: reconciliation (对账) of an uploaded settlement file and
its breaks (差错), the settlement and channel exceptions, and manual
adjustments under dual control (调账双人复核).

- Upload: a channel's daily file and its business day are reconciled by
  fuelcard_server.reconcile (reconcile_upload; there is no RPC for it), and
  the result shows the totals and the breaks found.
- Breaks: ReconciliationService.ListBreaks / ResolveBreak (with a note).
- Exceptions: ListSettlementExceptions / ResolveSettlementException, and the
  channel exceptions (ListChannelExceptions / ResolveChannelException).
- Adjustments: a finance user proposes (the maker); another approves or
  rejects (the checker), after a TOTP step-up: approving books money at once.
  The core refuses a maker approving their own (OWN_ADJUSTMENT), telling the
  people apart by the on-behalf-of identity the console sends; the page shows
  its refusal in words rather than hiding the button, so the rule is the
  core's alone.

Every list is one page of at most 50 rows (page_token); every POST is
audited with its outcome.
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
import uuid
from typing import Any

from aiohttp import web
from fuelcard.v1 import adjustment_pb2, settlement_pb2
from fuelcard_adapters.channels import CHANNELS
from fuelcard_adapters.neutral import SHANGHAI

from fuelcard_console import auth, reconcile_upload
from fuelcard_console.auth import ConsoleUser, Role, requires
from fuelcard_console.context import CoreRefusal, console_context
from fuelcard_console.ops_labels import (
    ADJUSTMENT_DIRECTIONS_ZH,
    ADJUSTMENT_STATES_ZH,
    BREAK_KINDS_ZH,
    CHANNEL_EXCEPTION_KINDS_ZH,
    CHANNEL_EXCEPTION_STATES_ZH,
    CHANNELS_ZH,
    FILE_CHANNELS,
    OUTCOMES_ZH,
    SETTLEMENT_EXCEPTION_KINDS_ZH,
    SETTLEMENT_EXCEPTION_STATES_ZH,
    SETTLEMENT_KINDS_ZH,
    SETTLEMENT_STATUS_ZH,
    beijing,
    mask_digits,
    outcome_of,
    parse_yuan,
    refusal_zh,
    yuan,
)
from fuelcard_console.views import render

MAIN_PAGE = "/console/finance/"
BREAKS_PAGE = "/console/finance/breaks"
EXCEPTIONS_PAGE = "/console/finance/exceptions"
ADJUSTMENTS_PAGE = "/console/finance/adjustments"
NAV = [("对账", MAIN_PAGE), ("差错", BREAKS_PAGE), ("结算异常", EXCEPTIONS_PAGE),
       ("调账复核", ADJUSTMENTS_PAGE)]
PAGE_SIZE = 50
TEXT_MAX_CHARS = 500
_REASON = re.compile(r"[A-Z][A-Z0-9_]{1,63}")
DONE_ZH = {
    "break_resolved": "差错已处理。",
    "exception_resolved": "结算异常已处理。",
    "channel_exception_resolved": "渠道异常已处理。",
    "proposed": "调账已提交，等待另一位财务人员复核。",
    "approved": "调账已批准并入账。",
    "rejected": "调账已驳回。",
}
# What the page itself refuses before calling the core.
FORM_REFUSALS_ZH = {
    "NOTE_INVALID": "请填写处理说明（1-500 个字符）。",
    "AMOUNT_INVALID": "金额须为大于 0 的元金额，最多两位小数。",
    "ACCOUNT_ID_INVALID": "账户编号须为 UUID。",
    "DIRECTION_INVALID": "请选择调增或调减。",
    "REASON_INVALID": "请填写调账原因（1-500 个字符）。",
}
CHANNEL_BY_NAME = {name: CHANNELS[name].channel for name in FILE_CHANNELS}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, main)
    router.add_post("/console/finance/reconcile", reconcile_file)
    router.add_get(BREAKS_PAGE, breaks)
    router.add_post("/console/finance/breaks/{break_id}/resolve", resolve_break)
    router.add_get(EXCEPTIONS_PAGE, exceptions)
    router.add_post("/console/finance/settlement-exceptions/{exception_id}/resolve",
                    resolve_settlement_exception)
    router.add_post("/console/finance/channel-exceptions/{exception_id}/resolve",
                    resolve_channel_exception)
    router.add_get(ADJUSTMENTS_PAGE, adjustments)
    router.add_post(ADJUSTMENTS_PAGE, propose_adjustment)
    router.add_get("/console/finance/adjustments/{adjustment_id}", adjustment_detail)
    router.add_post("/console/finance/adjustments/{adjustment_id}/approve", approve_adjustment)
    router.add_post("/console/finance/adjustments/{adjustment_id}/reject", reject_adjustment)


# --- shared bits ------------------------------------------------------------------------------


def _notice(query: Any) -> dict[str, str]:
    """The outcome of the last POST, from the redirect's query: fixed words
    only (a reason code is looked up, never echoed as free text)."""
    refused = query.get("refused", "")
    error = ""
    if _REASON.fullmatch(refused):
        error = FORM_REFUSALS_ZH.get(refused) or refusal_zh(refused)
    return {"done": DONE_ZH.get(query.get("done", ""), ""), "error": error}


def _redirect(path: str, **query: str) -> web.Response:
    query = {k: v for k, v in query.items() if v}
    return auth.redirect(path + ("?" + urllib.parse.urlencode(query) if query else ""))


def _uuid(request: web.Request, name: str) -> str:
    try:
        return str(uuid.UUID(request.match_info[name]))
    except ValueError:
        raise web.HTTPNotFound() from None


def _note(form: Any, name: str) -> str | None:
    value = form.get(name)
    if not isinstance(value, str) or not value.strip() or len(value) > TEXT_MAX_CHARS:
        return None
    return value.strip()


def _back_to(form: Any, fallback: str) -> str:
    """Where a POST goes back to: the list it was made from (its path and
    query, within the finance pages), else the fallback."""
    target = form.get("back")
    if isinstance(target, str) and target.startswith("/console/finance/") and "//" not in target:
        return target
    return fallback


def _with(path: str, **query: str) -> str:
    parts = urllib.parse.urlsplit(path)
    q = dict(urllib.parse.parse_qsl(parts.query))
    for k in ("done", "refused", "page_token"):
        q.pop(k, None)
    q.update({k: v for k, v in query.items() if v})
    return parts.path + ("?" + urllib.parse.urlencode(q) if q else "")


def _channel_filter(query: Any) -> tuple[str, int]:
    name = query.get("channel", "")
    return (name, CHANNEL_BY_NAME[name]) if name in CHANNEL_BY_NAME else ("", 0)


def _record(r: settlement_pb2.SettlementRecord | None) -> dict[str, str] | None:
    if r is None:
        return None
    return {"amount": yuan(r.amount_fen), "status": SETTLEMENT_STATUS_ZH.get(r.status, "-"),
            "time": beijing(r.time), "fee": yuan(r.fee_fen)}


def _break_row(b: settlement_pb2.ReconciliationBreak) -> dict[str, Any]:
    ours = b.ours if b.HasField("ours") else None
    theirs = b.theirs if b.HasField("theirs") else None
    either = ours or theirs
    return {
        "break_id": b.break_id, "channel": CHANNELS_ZH.get(b.channel, str(b.channel)),
        "date": b.business_date, "kind": BREAK_KINDS_ZH.get(b.kind, str(b.kind)),
        "record_kind": SETTLEMENT_KINDS_ZH.get(either.kind, "-") if either else "-",
        "channel_txn_id": either.channel_txn_id if either else "-",
        "ours": _record(ours), "theirs": _record(theirs), "found": beijing(b.create_time),
        "resolved": b.resolved, "resolution": mask_digits(b.resolution),
        "resolved_at": beijing(b.resolve_time), "resolved_by": b.resolved_by}


async def _open_breaks(request: web.Request, user: ConsoleUser, channel: int, day: str,
                       include_resolved: bool, token: str) -> tuple[list[dict[str, Any]], str, str]:
    ctx = console_context(request)
    try:
        listed = await ctx.call(ctx.core.settlement.ListBreaks, settlement_pb2.ListBreaksRequest(
            channel=channel, business_date=day, include_resolved=include_resolved,  # type: ignore[arg-type]
            page_size=PAGE_SIZE, page_token=token), user)
    except CoreRefusal as refusal:
        return [], "", refusal_zh(refusal.reason)
    return [_break_row(b) for b in listed.breaks], listed.next_page_token, ""


# --- reconciliation -----------------------------------------------------------------------------


def _yesterday(request: web.Request) -> str:
    """The business day a channel's file usually is: yesterday, Beijing time."""
    now = console_context(request).clock.now().astimezone(SHANGHAI)
    return (now.date() - dt.timedelta(days=1)).isoformat()


@requires(Role.FINANCE)
async def main(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    rows, next_token, error = await _open_breaks(request, user, 0, "", False, "")
    notice = _notice(request.query)
    return render("finance/index.html", request, {
        "channels": FILE_CHANNELS, "today": _yesterday(request),
        "breaks": rows, "more_breaks": bool(next_token), "error": error or notice["error"],
        "done": notice["done"], "result": None, "upload_error": "", "back": MAIN_PAGE})


@requires(Role.FINANCE)
async def reconcile_file(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    form = await request.post()
    channel, day = form.get("channel"), form.get("business_date")
    upload = form.get("file")
    data = upload.file.read() if isinstance(upload, web.FileField) else b""
    file_name = upload.filename if isinstance(upload, web.FileField) else ""
    context: dict[str, Any] = {
        "channels": FILE_CHANNELS, "today": _yesterday(request), "breaks": [],
        "more_breaks": False, "error": "", "done": "", "result": None, "upload_error": "",
        "back": MAIN_PAGE}
    try:
        checked = reconcile_upload.check(channel if isinstance(channel, str) else "",
                                         day if isinstance(day, str) else "", file_name, data)
    except reconcile_upload.UploadError as exc:
        await auth.audit(request, user, "Reconcile", None, "INVALID_ARGUMENT UPLOAD_INVALID")
        context["upload_error"] = str(exc)
        return render("finance/index.html", request, context, status=400)
    target = f"{checked.channel}-{checked.day.isoformat()}"
    try:
        result = await reconcile_upload.run(ctx.db.url, checked, ctx.clock.now())
    except reconcile_upload.UploadError as exc:
        await auth.audit(request, user, "Reconcile", target, "INVALID_ARGUMENT FILE_FORMAT_INVALID")
        context["upload_error"] = str(exc)
        return render("finance/index.html", request, context, status=400)
    await auth.audit(request, user, "Reconcile", target,
                     "OK")
    warning = result.date_warning(checked.day)
    context["result"] = {
        "run_id": result.run_id, "channel": FILE_CHANNELS[checked.channel], "channel_key": checked.channel,
        "date": checked.day.isoformat(), "file": checked.file_name, "theirs": result.theirs,
        "ours": result.ours, "counts": [(OUTCOMES_ZH[k], n) for k, n in result.counts.items()],
        "theirs_paid": yuan(result.theirs_paid_fen), "theirs_refunded": yuan(result.theirs_refunded_fen),
        "theirs_fee": yuan(result.theirs_fee_fen), "ours_paid": yuan(result.ours_paid_fen),
        "ours_refunded": yuan(result.ours_refunded_fen), "break_count": result.break_count,
        "breaks": [{"kind": OUTCOMES_ZH[b.outcome], "record_kind": "支付" if b.kind == "payment" else "退款",
                    "channel_txn_id": b.channel_txn_id, "ours": yuan(b.ours_amount_fen),
                    "theirs": yuan(b.theirs_amount_fen)} for b in result.breaks],
        "more": max(0, result.break_count - len(result.breaks)),
        "date_warning": (f"文件中有 {result.off_day} 条记录的日期（北京时间）不是 {checked.day}，"
                         f"请确认是否选错了文件。") if warning else ""}
    return render("finance/index.html", request, context)


# --- breaks ---------------------------------------------------------------------------------


@requires(Role.FINANCE)
async def breaks(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    q = request.query
    name, channel = _channel_filter(q)
    day = q.get("date", "").strip()
    include_resolved = q.get("resolved") == "1"
    token = q.get("page_token", "")
    rows, next_token, error = await _open_breaks(request, user, channel, day, include_resolved, token)
    notice = _notice(q)
    here = request.path_qs
    return render("finance/breaks.html", request, {
        "channels": FILE_CHANNELS, "channel": name, "date": day, "include_resolved": include_resolved,
        "breaks": rows, "error": error or notice["error"], "done": notice["done"],
        "back": _with(here), "first_page": not token,
        "next_link": _with(here, page_token=next_token) if next_token else ""})


@requires(Role.FINANCE)
async def resolve_break(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    break_id = _uuid(request, "break_id")
    form = await request.post()
    back = _back_to(form, BREAKS_PAGE)
    note = _note(form, "resolution")
    if note is None:
        await auth.audit(request, user, "ResolveBreak", break_id, "INVALID_ARGUMENT NOTE_INVALID")
        return auth.redirect(_with(back, refused="NOTE_INVALID"))
    try:
        await ctx.call(ctx.core.settlement.ResolveBreak, settlement_pb2.ResolveBreakRequest(
            request_id=str(uuid.uuid4()), break_id=break_id, resolution=note), user)
    except CoreRefusal as refusal:
        await auth.audit(request, user, "ResolveBreak", break_id, outcome_of(refusal))
        return auth.redirect(_with(back, refused=refusal.reason))
    await auth.audit(request, user, "ResolveBreak", break_id, "OK")
    return auth.redirect(_with(back, done="break_resolved"))


# --- settlement and channel exceptions ---------------------------------------------------------


@requires(Role.FINANCE)
async def exceptions(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    q = request.query
    show_all = q.get("all") == "1"
    se_token, ce_token = q.get("se_token", ""), q.get("ce_token", "")
    error = ""
    settlement: list[dict[str, Any]] = []
    channel: list[dict[str, Any]] = []
    se_next = ce_next = ""
    try:
        se = await ctx.call(ctx.core.settlement.ListSettlementExceptions,
                            settlement_pb2.ListSettlementExceptionsRequest(
                                state=(settlement_pb2.SETTLEMENT_EXCEPTION_STATE_UNSPECIFIED if show_all
                                       else settlement_pb2.SETTLEMENT_EXCEPTION_STATE_OPEN),
                                page_size=PAGE_SIZE, page_token=se_token), user)
        se_next = se.next_page_token
        settlement = [{
            "exception_id": e.exception_id, "kind": SETTLEMENT_EXCEPTION_KINDS_ZH.get(e.kind, str(e.kind)),
            "account_id": e.account_id, "hold_id": e.hold_id or "-",
            "channel": CHANNELS_ZH.get(e.channel, "-"), "channel_txn_id": e.channel_txn_id or "-",
            "amount": yuan(e.amount_fen), "reason": e.reason,
            "state": SETTLEMENT_EXCEPTION_STATES_ZH.get(e.state, str(e.state)),
            "open": e.state == settlement_pb2.SETTLEMENT_EXCEPTION_STATE_OPEN,
            "created": beijing(e.create_time), "resolution": mask_digits(e.resolution),
            "resolved_by": e.resolved_by} for e in se.settlement_exceptions]
        ce = await ctx.call(ctx.core.settlement.ListChannelExceptions,
                            settlement_pb2.ListChannelExceptionsRequest(
                                state=(settlement_pb2.CHANNEL_EXCEPTION_STATE_UNSPECIFIED if show_all
                                       else settlement_pb2.CHANNEL_EXCEPTION_STATE_OPEN),
                                page_size=PAGE_SIZE, page_token=ce_token), user)
        ce_next = ce.next_page_token
        channel = [{
            "exception_id": e.exception_id, "kind": CHANNEL_EXCEPTION_KINDS_ZH.get(e.kind, str(e.kind)),
            "channel": CHANNELS_ZH.get(e.channel, "-"), "account_id": e.account_id,
            "channel_txn_id": e.channel_txn_id, "channel_refund_id": e.channel_refund_id,
            "amount": yuan(e.amount_fen), "state": CHANNEL_EXCEPTION_STATES_ZH.get(e.state, str(e.state)),
            "open": e.state == settlement_pb2.CHANNEL_EXCEPTION_STATE_OPEN,
            "created": beijing(e.create_time), "resolution": mask_digits(e.resolution)}
            for e in ce.channel_exceptions]
    except CoreRefusal as refusal:
        error = refusal_zh(refusal.reason)
    notice = _notice(q)
    here = request.path_qs
    return render("finance/exceptions.html", request, {
        "settlement": settlement, "channel": channel, "show_all": show_all,
        "error": error or notice["error"], "done": notice["done"], "back": _with(here),
        "se_next": _with(here, se_token=se_next) if se_next else "",
        "ce_next": _with(here, ce_token=ce_next) if ce_next else ""})


async def _resolve_exception(request: web.Request, user: ConsoleUser, action: str, done: str,
                             method: Any, message: Any) -> web.StreamResponse:
    ctx = console_context(request)
    form = await request.post()
    back = _back_to(form, EXCEPTIONS_PAGE)
    target = message.exception_id
    note = _note(form, "resolution")
    if note is None:
        await auth.audit(request, user, action, target, "INVALID_ARGUMENT NOTE_INVALID")
        return auth.redirect(_with(back, refused="NOTE_INVALID"))
    message.resolution = note
    try:
        await ctx.call(method, message, user)
    except CoreRefusal as refusal:
        await auth.audit(request, user, action, target, outcome_of(refusal))
        return auth.redirect(_with(back, refused=refusal.reason))
    await auth.audit(request, user, action, target, "OK")
    return auth.redirect(_with(back, done=done))


@requires(Role.FINANCE)
async def resolve_settlement_exception(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    return await _resolve_exception(
        request, user, "ResolveSettlementException", "exception_resolved",
        ctx.core.settlement.ResolveSettlementException,
        settlement_pb2.ResolveSettlementExceptionRequest(
            request_id=str(uuid.uuid4()), exception_id=_uuid(request, "exception_id")))


@requires(Role.FINANCE)
async def resolve_channel_exception(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    return await _resolve_exception(
        request, user, "ResolveChannelException", "channel_exception_resolved",
        ctx.core.settlement.ResolveChannelException,
        settlement_pb2.ResolveChannelExceptionRequest(
            request_id=str(uuid.uuid4()), exception_id=_uuid(request, "exception_id")))


# --- adjustments ------------------------------------------------------------------------------


def _mine(user: ConsoleUser, by: str) -> bool:
    """Whether an adjustment's proposer/decider is this console user (the
    core records "<edge> for console_user:<uuid>")."""
    return by.endswith(f"console_user:{user.user_id}")


def _adjustment_row(a: adjustment_pb2.Adjustment, user: ConsoleUser) -> dict[str, Any]:
    return {
        "adjustment_id": a.adjustment_id, "account_id": a.account_id,
        "direction": ADJUSTMENT_DIRECTIONS_ZH.get(a.direction, str(a.direction)),
        "amount": yuan(a.amount_fen), "reason": mask_digits(a.reason),
        "state": ADJUSTMENT_STATES_ZH.get(a.state, str(a.state)),
        "proposed": a.state == adjustment_pb2.ADJUSTMENT_STATE_PROPOSED,
        "mine": _mine(user, a.proposed_by), "proposed_at": beijing(a.propose_time),
        "decided_at": beijing(a.decide_time), "note": mask_digits(a.decision_note),
        "decided_by_me": bool(a.decided_by) and _mine(user, a.decided_by)}


@requires(Role.FINANCE)
async def adjustments(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    q = request.query
    states = {"proposed": adjustment_pb2.ADJUSTMENT_STATE_PROPOSED,
              "approved": adjustment_pb2.ADJUSTMENT_STATE_APPROVED,
              "rejected": adjustment_pb2.ADJUSTMENT_STATE_REJECTED, "all": 0}
    state = q.get("state", "proposed")
    state = state if state in states else "proposed"
    token = q.get("page_token", "")
    rows: list[dict[str, Any]] = []
    next_token = error = ""
    try:
        listed = await ctx.call(ctx.core.adjustment.ListAdjustments, adjustment_pb2.ListAdjustmentsRequest(
            state=states[state], page_size=PAGE_SIZE, page_token=token), user)  # type: ignore[arg-type]
        rows = [_adjustment_row(a, user) for a in listed.adjustments]
        next_token = listed.next_page_token
    except CoreRefusal as refusal:
        error = refusal_zh(refusal.reason)
    notice = _notice(q)
    here = request.path_qs
    return render("finance/adjustments.html", request, {
        "rows": rows, "state": state, "error": error or notice["error"], "done": notice["done"],
        "first_page": not token, "next_link": _with(here, page_token=next_token) if next_token else "",
        "form": {"account_id": q.get("account_id", "")}})


@requires(Role.FINANCE)
async def propose_adjustment(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    form = await request.post()
    account_text, direction = form.get("account_id"), form.get("direction")
    amount_text = form.get("amount_yuan")
    reason = _note(form, "reason")
    refused = ""
    account_id = ""
    try:
        account_id = str(uuid.UUID(account_text if isinstance(account_text, str) else ""))
    except ValueError:
        refused = "ACCOUNT_ID_INVALID"
    directions = {"credit": adjustment_pb2.ADJUSTMENT_DIRECTION_CREDIT,
                  "debit": adjustment_pb2.ADJUSTMENT_DIRECTION_DEBIT}
    amount_fen = parse_yuan(amount_text) if isinstance(amount_text, str) else None
    if not refused and direction not in directions:
        refused = "DIRECTION_INVALID"
    if not refused and amount_fen is None:
        refused = "AMOUNT_INVALID"
    if not refused and reason is None:
        refused = "REASON_INVALID"
    if refused or amount_fen is None or reason is None or not isinstance(direction, str):
        await auth.audit(request, user, "ProposeAdjustment", account_id or None,
                         f"INVALID_ARGUMENT {refused}")
        return _redirect(ADJUSTMENTS_PAGE, refused=refused)
    try:
        made = await ctx.call(ctx.core.adjustment.ProposeAdjustment, adjustment_pb2.ProposeAdjustmentRequest(
            request_id=str(uuid.uuid4()), account_id=account_id, direction=directions[direction],
            amount_fen=amount_fen, reason=reason), user)
    except CoreRefusal as refusal:
        await auth.audit(request, user, "ProposeAdjustment", account_id, outcome_of(refusal))
        return _redirect(ADJUSTMENTS_PAGE, refused=refusal.reason)
    await auth.audit(request, user, "ProposeAdjustment", made.adjustment.adjustment_id, "OK")
    return _redirect(ADJUSTMENTS_PAGE, done="proposed")


@requires(Role.FINANCE, step_up=True)
async def adjustment_detail(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """The checker's page for one adjustment: stepped up before it shows the
    approve and reject forms (their POSTs need the step-up too)."""
    ctx = console_context(request)
    adjustment_id = _uuid(request, "adjustment_id")
    got = await ctx.call(ctx.core.adjustment.GetAdjustment, adjustment_pb2.GetAdjustmentRequest(
        adjustment_id=adjustment_id), user)
    notice = _notice(request.query)
    return render("finance/adjustment.html", request, {
        "a": _adjustment_row(got.adjustment, user), "error": notice["error"], "done": notice["done"]})


async def _decide(request: web.Request, user: ConsoleUser, approve: bool) -> web.StreamResponse:
    ctx = console_context(request)
    adjustment_id = _uuid(request, "adjustment_id")
    form = await request.post()
    note = form.get("note", "")
    here = f"/console/finance/adjustments/{adjustment_id}"
    action = "ApproveAdjustment" if approve else "RejectAdjustment"
    if not isinstance(note, str) or len(note) > TEXT_MAX_CHARS:
        await auth.audit(request, user, action, adjustment_id, "INVALID_ARGUMENT NOTE_INVALID")
        return _redirect(here, refused="NOTE_INVALID")
    try:
        if approve:
            await ctx.call(ctx.core.adjustment.ApproveAdjustment, adjustment_pb2.ApproveAdjustmentRequest(
                request_id=str(uuid.uuid4()), adjustment_id=adjustment_id, note=note.strip()), user)
        else:
            await ctx.call(ctx.core.adjustment.RejectAdjustment, adjustment_pb2.RejectAdjustmentRequest(
                request_id=str(uuid.uuid4()), adjustment_id=adjustment_id, note=note.strip()), user)
    except CoreRefusal as refusal:
        await auth.audit(request, user, action, adjustment_id, outcome_of(refusal))
        return _redirect(here, refused=refusal.reason)
    await auth.audit(request, user, action, adjustment_id, "OK")
    return _redirect(here, done="approved" if approve else "rejected")


@requires(Role.FINANCE, step_up=True)
async def approve_adjustment(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return await _decide(request, user, True)


@requires(Role.FINANCE, step_up=True)
async def reject_adjustment(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return await _decide(request, user, False)
