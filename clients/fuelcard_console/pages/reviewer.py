"""The reviewer's pages: the suspended-hold queue (暂挂交易审核) with why each
hold was suspended, approve or reject, and the audit trail.

The queue is RiskService.ListSuspendedHolds (oldest first, 50 a page); the
reasons are the fired rules in words (risk_reasons, from the rule set in
force). A verdict is RiskService.ReviewHold, which only a reviewer
certificate may call: the edge makes it over its reviewer channel
(ctx.reviewer_core), and the console's own audit record names the person.

Step-up: approving a hold of APPROVE_STEP_UP_FEN (1 000 yuan) or more needs a
TOTP code entered in the last five minutes. Approval is the one irreversible
verdict: it lets the pump deliver against money the risk engine thought
suspicious, and large holds are what a stolen card is emptied with, so a
hijacked reviewer session must not be able to wave them through; below the
threshold (a car's tank) a code per click would slow the queue for little.
Rejecting releases the money back to the account and needs no step-up.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from typing import Any

from aiohttp import web
from fuelcard.v1 import risk_pb2

from fuelcard_console import audit_trail, auth, risk_reasons
from fuelcard_console.auth import ConsoleUser, Role, requires
from fuelcard_console.context import CONSOLE, CoreRefusal, console_context
from fuelcard_console.ops_labels import HOLD_STATES_ZH, PRODUCTS_ZH, beijing, outcome_of, refusal_zh, yuan
from fuelcard_console.views import render

MAIN_PAGE = "/console/reviewer/"
AUDIT_PAGE = "/console/reviewer/audit"
NAV = [("暂挂交易审核", MAIN_PAGE), ("审计日志", AUDIT_PAGE)]
PAGE_SIZE = 50
APPROVE_STEP_UP_FEN = 100_000
NOTE_MAX_CHARS = 500
HOLD_AMOUNT_SQL = "SELECT amount_fen FROM fc.holds WHERE uid = %(uid)s::uuid"
_REASON = re.compile(r"[A-Z][A-Z0-9_]{1,63}")
DONE_ZH = {"approved": "已批准：终端可以加油并确认交易。", "rejected": "已拒绝：冻结资金已释放。"}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, queue)
    router.add_post("/console/reviewer/holds/{hold_id}/review", review)
    router.add_get(AUDIT_PAGE, audit_page)


def _notice(query: Any) -> tuple[str, str]:
    """The outcome of the last verdict, from the redirect's query: fixed
    words for a success, the refusal's words for a reason code."""
    done = DONE_ZH.get(query.get("done", ""), "")
    refused = query.get("refused", "")
    return done, refusal_zh(refused) if _REASON.fullmatch(refused) else ""


@requires(Role.REVIEWER)
async def queue(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    token = request.query.get("page_token", "")
    error = ""
    holds: list[dict[str, Any]] = []
    next_token = ""
    try:
        listed = await ctx.call(ctx.core.risk.ListSuspendedHolds, risk_pb2.ListSuspendedHoldsRequest(
            page_size=PAGE_SIZE, page_token=token), user)
        active = await ctx.call(ctx.core.risk.GetActiveRuleSet, risk_pb2.GetActiveRuleSetRequest(), user)
        rules = risk_reasons.rules_by_id(active.rule_set.document_json if active.HasField("rule_set")
                                         else "")
        next_token = listed.next_page_token
        for s in listed.holds:
            h = s.hold
            holds.append({
                "hold_id": h.hold_id, "account_id": h.account_id,
                "card": h.masked_card_number or "-", "amount": yuan(h.amount_fen),
                "amount_fen": h.amount_fen, "station": h.station_id, "terminal": h.terminal_id,
                "product": PRODUCTS_ZH.get(h.product, "-"), "created": beijing(h.create_time),
                "expires": beijing(h.expire_time), "state": HOLD_STATES_ZH.get(h.state, "-"),
                "score": s.risk_score,
                "reasons": [risk_reasons.describe(r, rules) for r in s.fired_rules],
                "step_up": h.amount_fen >= APPROVE_STEP_UP_FEN})
    except CoreRefusal as refusal:
        error = refusal_zh(refusal.reason)
    done, refused = _notice(request.query)
    return render("reviewer/queue.html", request, {
        "holds": holds, "next_page_token": next_token, "first_page": not token,
        "error": error or refused, "done": done, "step_up_yuan": yuan(APPROVE_STEP_UP_FEN),
        "focus": request.query.get("hold", "")})


def _back(**query: str) -> web.Response:
    return auth.redirect(f"{MAIN_PAGE}?{urllib.parse.urlencode(query)}")


@requires(Role.REVIEWER)
async def review(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    form = await request.post()
    verdict_text, note = form.get("verdict"), form.get("note", "")
    try:
        hold_id = str(uuid.UUID(request.match_info["hold_id"]))
    except ValueError:
        raise web.HTTPNotFound() from None
    verdicts = {"approve": risk_pb2.REVIEW_VERDICT_APPROVE, "reject": risk_pb2.REVIEW_VERDICT_REJECT}
    if verdict_text not in verdicts or not isinstance(note, str) or len(note) > NOTE_MAX_CHARS:
        await auth.audit(request, user, "ReviewHold", hold_id, "INVALID_ARGUMENT VERDICT_INVALID")
        return _back(refused="VERDICT_INVALID")
    action = f"ReviewHold.{verdict_text}"
    if verdict_text == "approve":
        row = await ctx.db.fetch_one(HOLD_AMOUNT_SQL, {"uid": hold_id})
        if row is not None and int(row[0]) >= APPROVE_STEP_UP_FEN:
            session = await auth.session_of(request)
            if session is None or not auth.stepped_up(request.app[CONSOLE], session):
                await auth.audit(request, user, action, hold_id, "PERMISSION_DENIED STEP_UP_REQUIRED")
                back = f"{MAIN_PAGE}?{urllib.parse.urlencode({'hold': hold_id})}"
                return auth.redirect("/console/step-up?" + urllib.parse.urlencode({"next": back}))
    if ctx.reviewer_core is None:
        await auth.audit(request, user, action, hold_id, "FAILED_PRECONDITION REVIEWER_NOT_CONFIGURED")
        return _back(refused="REVIEWER_NOT_CONFIGURED")
    try:
        await ctx.call(ctx.reviewer_core.risk.ReviewHold, risk_pb2.ReviewHoldRequest(
            request_id=str(uuid.uuid4()), hold_id=hold_id, verdict=verdicts[verdict_text],
            note=note.strip()), user)
    except CoreRefusal as refusal:
        await auth.audit(request, user, action, hold_id, outcome_of(refusal))
        return _back(refused=refusal.reason)
    await auth.audit(request, user, action, hold_id, "OK")
    return _back(done="approved" if verdict_text == "approve" else "rejected")


@requires(Role.REVIEWER)
async def audit_page(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    rows: list[audit_trail.AuditRow] = []
    next_link = note = error = ""
    try:
        f = audit_trail.AuditFilter.parse(request.query)
        found = await audit_trail.page(ctx.reports, ctx.db, f, request.query.get("page_token", ""))
        rows, note = found.rows, found.note
        if found.next_page_token:
            next_link = f"{AUDIT_PAGE}?" + urllib.parse.urlencode(
                {**f.query(), "page_token": found.next_page_token})
    except audit_trail.FilterError as exc:
        error = str(exc)
    return render("reviewer/audit.html", request, {
        "rows": rows, "next_link": next_link, "error": error, "note": note,
        "first_page": not request.query.get("page_token"),
        "q": {k: request.query.get(k, "") for k in ("actor", "target", "from", "to")}})
