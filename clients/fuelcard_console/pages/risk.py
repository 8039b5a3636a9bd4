"""The risk officer's pages: the rule set in force and the earlier versions,
the diff between two of them, a backtest against recent history, loading a
new version and putting a version in force.

A new version is pasted or uploaded as a draft (fuelcard_console.rule_sets
says why: LoadRuleSet puts a set in force the moment it stores it), compared
with the set in force, backtested, and only then loaded - with a TOTP step-up,
as is putting an earlier version back in force (ActivateRuleSet). The core
validates every load again; its refusal is shown in Chinese.

Versions are read from the reports database (there is no RPC that lists
them); the set in force comes from the core (GetActiveRuleSet).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

import aiohttp
from aiohttp import web
from fuelcard.v1 import risk_pb2
from fuelcard_server.risk.backtest import TARGET_LEGIT_SUSPENDED
from fuelcard_server.risk.model import RuleSet

from fuelcard_console import rule_backtest, rule_sets
from fuelcard_console.auth import ConsoleUser, Role, audit, redirect, requires
from fuelcard_console.backtest_jobs import JobKey, jobs_of
from fuelcard_console.context import CoreRefusal, console_context
from fuelcard_console.risk_charts import rule_bars
from fuelcard_console.views import refusal_text, render

MAIN_PAGE = "/console/risk/"
NAV = [("规则版本", MAIN_PAGE), ("载入新版本", "/console/risk/new")]
BEIJING = dt.timezone(dt.timedelta(hours=8))
FORMATS: dict[str, Literal["toml", "json"]] = {"toml": "toml", "json": "json"}
ACTION_ZH = {"score": "仅计分", "review": "转人工审核", "decline": "拒绝"}
FALLBACK_ZH = {"review": "转人工审核", "decline": "拒绝"}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, main)
    router.add_get("/console/risk/versions/{version:\\d{1,9}}", version_page)
    router.add_get("/console/risk/versions/{version:\\d{1,9}}/activate", activate_version_form)
    router.add_post("/console/risk/versions/{version:\\d{1,9}}/activate", activate_version)
    router.add_get("/console/risk/diff", diff_page)
    router.add_get("/console/risk/backtest", backtest_page)
    router.add_get("/console/risk/new", new_form)
    router.add_post("/console/risk/new", new_submit)
    router.add_get("/console/risk/drafts/{draft:\\d{1,18}}", draft_page)
    router.add_get("/console/risk/drafts/{draft:\\d{1,18}}/activate", load_draft_form)
    router.add_post("/console/risk/drafts/{draft:\\d{1,18}}/activate", load_draft)


def beijing(when: dt.datetime | None) -> str:
    return when.astimezone(BEIJING).strftime("%Y-%m-%d %H:%M") if when is not None else ""


# --- what a page compares: a stored version or a draft ----------------------------------------


class Ref:
    """A rule set a page names in its query: "v<version>", "d<draft>" or "active"."""

    def __init__(self, label: str, key: str, rule_set: RuleSet | None) -> None:
        self.label, self.key, self.rule_set = label, key, rule_set


async def resolve(request: web.Request, text: str) -> Ref:
    ctx = console_context(request)
    if text == "active":
        version = await rule_sets.active_version(ctx.reports)
        if version is None:
            return Ref("（无生效版本）", "active", None)
        text = f"v{version}"
    if len(text) > 20 or len(text) < 2 or not text[1:].isdigit():
        raise web.HTTPNotFound()
    number = int(text[1:])
    if text[0] == "v":
        rule_set = await rule_sets.stored_rule_set(ctx.reports, number)
        if rule_set is None:
            raise web.HTTPNotFound()
        return Ref(f"版本 {number}", text, rule_set)
    if text[0] == "d":
        draft = await rule_sets.get_draft(ctx.db, number)
        if draft is None:
            raise web.HTTPNotFound()
        return Ref(f"草稿 {number}", text, draft.rule_set)
    raise web.HTTPNotFound()


def _text(ref: Ref) -> str:
    return rule_sets.canonical_text(ref.rule_set)


def _summary(rule_set: RuleSet) -> dict[str, Any]:
    return {"name": rule_set.name, "fallback": FALLBACK_ZH[rule_set.fallback],
            "review_score": rule_set.review_score, "decline_score": rule_set.decline_score,
            "rules": [{"id": r.rule_id, "kind": r.kind, "action": ACTION_ZH[r.action], "score": r.score,
                       "description": r.description} for r in rule_set.rules]}


def _rule_changes(old: RuleSet | None, new: RuleSet) -> dict[str, list[str]]:
    """Rule ids added, removed and changed, as LoadRuleSet will report them."""
    before = {r.rule_id: r for r in old.rules} if old is not None else {}
    after = {r.rule_id: r for r in new.rules}
    return {"added": sorted(after.keys() - before.keys()), "removed": sorted(before.keys() - after.keys()),
            "changed": sorted(k for k in after.keys() & before.keys() if after[k] != before[k])}


# --- the main page: the set in force and the versions -----------------------------------------


@requires(Role.RISK_OFFICER)
async def main(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    active = await ctx.call(ctx.core.risk.GetActiveRuleSet, risk_pb2.GetActiveRuleSetRequest(), user)
    token, drafts_token = request.query.get("page_token", ""), request.query.get("drafts_token", "")
    try:
        versions, next_token = await rule_sets.list_versions(ctx.reports, token)
        drafts, next_drafts = await rule_sets.list_drafts(ctx.db, drafts_token)
    except ValueError:
        raise web.HTTPBadRequest() from None
    info = active.rule_set if active.HasField("rule_set") else None
    return render("risk/main.html", request, {
        "active": info, "active_time": beijing(info.activate_time.ToDatetime(dt.UTC)) if info else "",
        "versions": [{"v": v, "created": beijing(v.created_at), "activated": beijing(v.activated_at)}
                     for v in versions],
        "next_token": next_token, "first_page": not token,
        "drafts": [{"d": d, "created": beijing(d.created_at)} for d in drafts],
        "next_drafts": next_drafts, "first_drafts": not drafts_token,
        "notice": {"loaded": "新版本已生效。", "activated": "已切换生效版本。"}.get(
            request.query.get("done", ""), "")})


@requires(Role.RISK_OFFICER)
async def version_page(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ref = await resolve(request, f"v{request.match_info['version']}")
    ctx = console_context(request)
    active = await rule_sets.active_version(ctx.reports)
    assert ref.rule_set is not None
    return render("risk/version.html", request, {
        "ref": ref, "version": int(ref.key[1:]), "is_active": active == int(ref.key[1:]),
        "summary": _summary(ref.rule_set), "text": _text(ref)})


# --- the diff and the backtest ----------------------------------------------------------------


@requires(Role.RISK_OFFICER)
async def diff_page(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    old = await resolve(request, request.query.get("old", "active"))
    new = await resolve(request, request.query.get("new", "active"))
    view = "unified" if request.query.get("view") == "unified" else "side"
    old_lines, new_lines = rule_sets.canonical_lines(old.rule_set), rule_sets.canonical_lines(new.rule_set)
    return render("risk/diff.html", request, {
        "old": old, "new": new, "view": view,
        "rows": rule_sets.side_by_side(old_lines, new_lines) if view == "side" else [],
        "unified": rule_sets.unified(old_lines, new_lines, old.label, new.label) if view != "side" else "",
        "changes": _rule_changes(old.rule_set, new.rule_set) if new.rule_set is not None else None})


@requires(Role.RISK_OFFICER)
async def backtest_page(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    ref = await resolve(request, request.query.get("ref", "active"))
    bounds = rule_backtest.Bounds.parse(request.query.get("days"), request.query.get("holds"))
    result, running_since = None, ""
    if ref.rule_set is not None:
        rule_set, now = ref.rule_set, ctx.clock.now()
        jobs = jobs_of(ctx.console)
        result, job = await jobs.result(
            JobKey(rule_set.digest(), bounds), now,
            lambda: rule_backtest.run(ctx.reports, rule_set, now, bounds, replay_in=jobs.pool()))
        running_since = beijing(job.started)
    response = render("risk/backtest.html", request, {
        "ref": ref, "bounds": bounds, "result": result, "running_since": running_since,
        "has_rules": ref.rule_set is not None,
        "since": beijing(result.since) if result else "", "until": beijing(result.until) if result else "",
        "first": beijing(result.first_replayed) if result else "",
        "chart": rule_bars(result.report) if result and result.report.per_rule else "",
        "target_pct": f"{TARGET_LEGIT_SUSPENDED:.1%}",
        "max_days": rule_backtest.MAX_DAYS, "max_holds": rule_backtest.MAX_HOLDS})
    if result is None and ref.rule_set is not None:
        # still running: the browser asks again in a second (the console's CSP allows no
        # inline script, and a Refresh header needs none)
        response.headers["Refresh"] = "1"
    return response


# --- a new version: the draft, then the load --------------------------------------------------


def _new_form(request: web.Request, *, document: str = "", fmt: str = "toml",
              problems: list[rule_sets.Problem] | None = None, status: int = 200) -> web.Response:
    return render("risk/new.html", request, {"document": document, "format": fmt,
                                             "problems": problems or []}, status=status)


@requires(Role.RISK_OFFICER)
async def new_form(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return _new_form(request)


async def _document_form(request: web.Request) -> tuple[dict[str, str], str, bytes]:
    """The new-version form (multipart: a file, or text pasted): its small fields, the file's
    name and bytes. Read as a stream with LoadRuleSet's own limit (1 MiB a document), which a
    pasted set may reach too - past the edge's 64 KiB body limit, as views.read_upload reads
    uploads (the CSRF token is in the form's action)."""
    if request.content_type != "multipart/form-data":
        raise web.HTTPBadRequest()
    reader = await request.multipart()
    fields: dict[str, str] = {}
    filename, data = "", b""
    limit = 4 * rule_sets.MAX_DOCUMENT_CHARS  # bytes: a character is at most 4 in UTF-8
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader) or part.name not in ("file", "document", "format"):
            raise web.HTTPBadRequest()
        chunks, size = [], 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
            chunks.append(chunk)
        if part.name == "file":
            filename, data = part.filename or "", b"".join(chunks)
        else:
            fields[part.name] = b"".join(chunks).decode("utf-8", errors="replace")
    return fields, filename, data


@requires(Role.RISK_OFFICER)
async def new_submit(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    form, filename, data = await _document_form(request)
    fmt = FORMATS.get(form.get("format", "toml"), "toml")
    text = form.get("document", "")
    if filename:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            await audit(request, user, "RiskDraft", None, "INVALID_ARGUMENT RULES_UNREADABLE")
            return _new_form(request, fmt=fmt, status=400, problems=[rule_sets.Problem(
                "document", "RULES_UNREADABLE", "文件须为 UTF-8 编码的文本", "not UTF-8")])
        if filename.lower().endswith(".json"):
            fmt = "json"
    try:
        draft_id = await rule_sets.save_draft(ctx.db, text, fmt, user.login, ctx.clock.now())
    except rule_sets.DocumentInvalid as invalid:
        await audit(request, user, "RiskDraft", None, "INVALID_ARGUMENT")
        return _new_form(request, document=text, fmt=fmt, problems=invalid.problems, status=400)
    await audit(request, user, "RiskDraft", f"draft-{draft_id}", "OK")
    return redirect(f"/console/risk/drafts/{draft_id}")


async def _draft(request: web.Request) -> rule_sets.Draft:
    draft = await rule_sets.get_draft(console_context(request).db, int(request.match_info["draft"]))
    if draft is None:
        raise web.HTTPNotFound()
    return draft


@requires(Role.RISK_OFFICER)
async def draft_page(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    draft = await _draft(request)
    active = await resolve(request, "active")
    return render("risk/draft.html", request, {
        "draft": draft, "created": beijing(draft.created_at), "active": active,
        "rows": rule_sets.side_by_side(rule_sets.canonical_lines(active.rule_set),
                                       rule_sets.canonical_lines(draft.rule_set)),
        "changes": _rule_changes(active.rule_set, draft.rule_set),
        "summary": _summary(draft.rule_set)})


@requires(Role.RISK_OFFICER, step_up=True)
async def load_draft_form(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    draft = await _draft(request)
    if draft.loaded_version is not None:
        return redirect(f"/console/risk/versions/{draft.loaded_version}")
    active = await resolve(request, "active")
    return render("risk/activate.html", request, {
        "what": f"草稿 {draft.draft_id}（{draft.name}，{draft.rule_count} 条规则）",
        "action": f"/console/risk/drafts/{draft.draft_id}/activate", "error": "",
        "changes": _rule_changes(active.rule_set, draft.rule_set), "active": active})


@requires(Role.RISK_OFFICER, step_up=True)
async def load_draft(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    draft = await _draft(request)
    try:
        # the draft's id is the idempotency key: a second press gets the first answer
        answer = await ctx.call(ctx.core.risk.LoadRuleSet, risk_pb2.LoadRuleSetRequest(
            request_id=draft.request_id, document=draft.document,
            format=risk_pb2.RULE_FORMAT_JSON if draft.format == "json" else risk_pb2.RULE_FORMAT_TOML), user)
    except CoreRefusal as refusal:
        await audit(request, user, "LoadRuleSet", f"draft-{draft.draft_id}", refusal.reason)
        active = await resolve(request, "active")
        return render("risk/activate.html", request, {
            "what": f"草稿 {draft.draft_id}", "action": f"/console/risk/drafts/{draft.draft_id}/activate",
            "error": f"{refusal_text(refusal)}：{refusal.message}", "active": active,
            "changes": _rule_changes(active.rule_set, draft.rule_set)}, status=409)
    version = answer.rule_set.version
    await rule_sets.mark_loaded(ctx.db, draft.draft_id, version)
    await audit(request, user, "LoadRuleSet", f"v{version}", "OK")
    return redirect(f"{MAIN_PAGE}?done=loaded")


# --- an earlier version back in force ---------------------------------------------------------


@requires(Role.RISK_OFFICER, step_up=True)
async def activate_version_form(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ref = await resolve(request, f"v{request.match_info['version']}")
    active = await resolve(request, "active")
    assert ref.rule_set is not None
    return render("risk/activate.html", request, {
        "what": ref.label, "action": f"/console/risk/versions/{ref.key[1:]}/activate", "error": "",
        "changes": _rule_changes(active.rule_set, ref.rule_set), "active": active})


@requires(Role.RISK_OFFICER, step_up=True)
async def activate_version(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    version = int(request.match_info["version"])
    try:
        await ctx.call(ctx.core.risk.ActivateRuleSet, risk_pb2.ActivateRuleSetRequest(
            request_id=f"console-activate-{uuid.uuid4().hex}", version=version), user)
    except CoreRefusal as refusal:
        await audit(request, user, "ActivateRuleSet", f"v{version}", refusal.reason)
        raise
    await audit(request, user, "ActivateRuleSet", f"v{version}", "OK")
    return redirect(f"{MAIN_PAGE}?done=activated")
