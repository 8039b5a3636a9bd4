"""The fleet manager's console (车队管理): the fleet's balance and vehicles,
issuing a vehicle card with its limits and scope, batch top-up from a CSV
file, the per-vehicle cost report, statements and invoices.

Every read and change goes to the core over gRPC (ctx.call, on the user's
behalf); the core checks authority again (only the fleet's parent account
may change its vehicles). The page checks first that what the user names
(a card, a sub-account) is theirs, so a URL edited by hand answers 404 and
reaches nothing. Reports and long lists read the reports database only.

Idempotency: each form carries a `form_id` made when the form was shown,
and the request_ids sent to the core are derived from it, so a double
click or a resent form changes nothing twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from aiohttp import web
from fuelcard.v1 import account_pb2, common_pb2, control_pb2, invoice_pb2
from fuelcard_server.identity import ON_BEHALF_OF
from google.protobuf.timestamp_pb2 import Timestamp

from fuelcard_console import fleet_forms, fleet_report, fleet_topup, views
from fuelcard_console.auth import ConsoleUser, Role, audit, requires
from fuelcard_console.context import ConsoleContext, CoreRefusal, console_context, refusal_of
from fuelcard_console.fleet_forms import FormError, fen_to_yuan, ml_to_litres
from fuelcard_console.ops_labels import PRODUCTS_ZH
from fuelcard_console.views import read_upload, render

MAIN_PAGE = "/console/fleet/"
NAV = [("车辆与余额", MAIN_PAGE), ("开车辆卡", MAIN_PAGE + "vehicles/new"), ("批量充值", MAIN_PAGE + "topup"),
       ("费用报表", MAIN_PAGE + "report"), ("对账单", MAIN_PAGE + "statements"),
       ("发票", MAIN_PAGE + "invoices")]
PAGE_SIZE = 20  # vehicles a page: each row costs two reads of the core
INVOICE_PAGE_SIZE = 20
REPORT_PAGE_SIZE = 50
PDF_TIMEOUT_S = 60.0
_FORM_ID = re.compile(r"[A-Za-z0-9_-]{16,43}")
_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TAXPAYER_ID = re.compile(r"[0-9A-Z]{15,20}")

# The core's refusals a fleet manager meets, in Chinese (the page adds the
# reason code, which support asks for).
REFUSALS_ZH = {
    "INVOICING_MODE_CONFLICT": "该账户已按消费开具发票：同一笔钱不能在充值时再开一次发票"
                               "（充值发票与消费发票只能选一种）。",
    "RECHARGE_ALREADY_INVOICED": "这笔充值已经开过发票。",
    "MONTH_ALREADY_INVOICED": "这个月的消费已经开过发票。",
    "MONTH_NOT_ENDED": "这个月还没有结束，月底之后才能按消费开票。",
    "NOTHING_TO_INVOICE": "没有可以开票的金额。",
    "SALES_WITHOUT_LITRES": "有消费记录缺少升数，无法开具油品发票。",
    "SPECIAL_INVOICE_NOT_AT_RECHARGE": "充值时不能开增值税专用发票，只能开不征税的普通发票。",
    "NOT_A_TOP_LEVEL_ACCOUNT": "只能为车队主账户开票。",
    "RECHARGE_NOT_FOUND": "找不到这笔充值。",
    "INVOICE_NOT_FOUND": "找不到这张发票。",
    "ACCOUNT_NOT_FOUND": "找不到这个账户。",
    "CARD_NOT_FOUND": "找不到这张卡。",
    "CARD_CLOSED": "这张卡已注销，不能再启用。",
    "NOT_AN_ALLOCATED_SUB_ACCOUNT": "有车辆不是本车队的独立额度子账户。",
    "LINE_DUPLICATE": "同一辆车出现了两次。",
    "REQUEST_ID_REUSED": "这个请求已用于另一项操作，请重新打开页面再提交。",
    "STEP_UP_REQUIRED": "提高或取消金额限额需要短信验证，控制台不能代为完成；请降低限额或联系客服。",
    "NOT_PARENT": "只有车队主账户能修改车辆的限额和使用范围。",
    "PARENT_NOT_TOP_LEVEL": "子账户下不能再开子账户。",
}
DECLINES_ZH = {
    common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS: "车队主账户余额不足",
    common_pb2.DECLINE_REASON_ACCOUNT_FROZEN: "账户已冻结",
}
CARD_STATUS_ZH = {account_pb2.CARD_STATUS_ACTIVE: "正常", account_pb2.CARD_STATUS_BLOCKED: "已暂停",
                  account_pb2.CARD_STATUS_CLOSED: "已注销"}
CARD_STATUS_FORM = {"active": account_pb2.CARD_STATUS_ACTIVE, "blocked": account_pb2.CARD_STATUS_BLOCKED,
                    "closed": account_pb2.CARD_STATUS_CLOSED}
FUNDING_ZH = {account_pb2.FUNDING_MODE_ALLOCATED: "独立额度", account_pb2.FUNDING_MODE_SHARED: "共用车队余额"}
INVOICE_STATE_ZH = {invoice_pb2.INVOICE_STATE_REQUESTED: "已申请", invoice_pb2.INVOICE_STATE_ISSUED: "已开具",
                    invoice_pb2.INVOICE_STATE_RED_LETTER: "已红冲"}
INVOICE_KIND_ZH = {invoice_pb2.INVOICE_KIND_RECHARGE: "充值（不征税）",
                   invoice_pb2.INVOICE_KIND_CONSUMPTION: "消费（汇总）"}
INVOICE_TYPE_ZH = {invoice_pb2.INVOICE_TYPE_ORDINARY: "普通发票",
                   invoice_pb2.INVOICE_TYPE_SPECIAL: "增值税专用发票"}

# The cards of a page's vehicles, with their caps and scope, in one read of
# the reports database (not two calls of the core per card: a page of 20
# vehicles would be 40 calls). The core has no read of a card's scope anyway.
# At most CARDS_PER_VEHICLE cards a vehicle, oldest first, as ListCards gives them.
CARDS_PER_VEHICLE = 10
VEHICLE_CARDS_SQL = """
    SELECT * FROM (
        SELECT a.uid::text, c.uid::text, c.masked, c.status,
               c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen,
               c.limit_fill_ml, c.limit_daily_ml, c.limit_monthly_ml,
               c.scope_stations, c.scope_products, jsonb_array_length(c.scope_fences), c.scope_hours,
               row_number() OVER (PARTITION BY c.account_id ORDER BY c.id) AS n
          FROM fc.accounts a JOIN fc.cards c ON c.account_id = a.id
         WHERE a.uid = ANY(%(accounts)s::uuid[])) cards
     WHERE n <= %(per_vehicle)s ORDER BY n"""

Handler = Callable[[web.Request, ConsoleUser], Awaitable[web.StreamResponse]]


def refusal_text(refusal: CoreRefusal) -> str:
    """The fleet's own sentences for the refusals it meets most, else the
    console's (views.refusal_text), with the reason code either way."""
    text = REFUSALS_ZH.get(refusal.reason)
    return f"{text}（{refusal.reason}）" if text else views.refusal_text(refusal)


def _render(template: str, request: web.Request, context: Mapping[str, Any], status: int = 200
            ) -> web.Response:
    """A page from templates/fleet/ (base.html shows the session's user and nav)."""
    return render(f"fleet/{template}", request, {"yuan": fen_to_yuan, "litres": ml_to_litres, **context},
                  status=status)


def _fleet(user: ConsoleUser) -> str:
    # A fleet manager is made with the account they manage (console_users_account_check).
    assert user.account_uid is not None
    return user.account_uid


def _form_id(form: Mapping[str, Any]) -> str:
    """The form's idempotency seed, as the form was shown; a fresh one if
    missing (then a resend is a new request, which the core still checks)."""
    value = form.get("form_id")
    if isinstance(value, str) and _FORM_ID.fullmatch(value):
        return value
    return secrets.token_urlsafe(16)


def _text(form: Mapping[str, Any]) -> dict[str, str]:
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _ts(when: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when.astimezone(dt.UTC))
    return stamp


def _local(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    when = stamp.ToDatetime(dt.UTC).astimezone(fleet_report.BUSINESS_TZ)
    return when.strftime("%Y-%m-%d %H:%M")


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


# --- the main page: balance and vehicles -----------------------------------------------------


@requires(Role.FLEET_MANAGER)
async def index(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    fleet = _fleet(user)
    token = request.query.get("page_token", "")
    try:
        account, subs = await asyncio.gather(
            ctx.call(ctx.core.account.GetAccount, account_pb2.GetAccountRequest(account_id=fleet), user),
            ctx.call(ctx.core.account.ListSubAccounts, account_pb2.ListSubAccountsRequest(
                parent_account_id=fleet, page_size=PAGE_SIZE, page_token=token), user))
    except CoreRefusal as refusal:
        if refusal.reason != "PAGE_TOKEN_INVALID":
            raise
        return _see_other(MAIN_PAGE)
    vehicles = await _vehicle_rows(ctx, list(subs.accounts))
    return _render("index.html", request, {
        "account": account.account, "vehicles": vehicles, "next_page_token": subs.next_page_token,
        "first_page": not token, "issued": request.query.get("issued", "")})


async def _vehicle_rows(ctx: ConsoleContext, subs: list[account_pb2.Account]) -> list[dict[str, Any]]:
    """Each vehicle with its cards, and each card with its caps and scope."""
    rows = await ctx.reports.fetch_all(VEHICLE_CARDS_SQL, {
        "accounts": [a.account_id for a in subs], "per_vehicle": CARDS_PER_VEHICLE}) if subs else []
    cards: dict[str, list[dict[str, Any]]] = {}
    for (account_id, card_id, masked, status, txn, daily, monthly, fill_ml, daily_ml, monthly_ml,
         *scope, _) in rows:
        card = account_pb2.Card(card_id=card_id, account_id=account_id, masked_card_number=masked,
                                status=status)
        limits = control_pb2.GetSpendingLimitsResponse(
            limits=control_pb2.SpendingLimits(per_transaction_fen=txn or 0, daily_fen=daily or 0,
                                              monthly_fen=monthly or 0),
            volume_limits=control_pb2.VolumeLimits(per_fill_ml=fill_ml or 0, daily_ml=daily_ml or 0,
                                                   monthly_ml=monthly_ml or 0))
        cards.setdefault(account_id, []).append({
            "card": card, "status": CARD_STATUS_ZH.get(status, ""), "limits": limits,
            "scope": _scope_text(scope)})
    return [{"account": a, "funding": FUNDING_ZH.get(a.funding_mode, ""),
             "cards": cards.get(a.account_id, [])} for a in subs]


def _scope_text(row: Any) -> list[str]:
    if row is None:
        return []
    stations, products, fences, hours = row
    out = []
    if stations:
        out.append("油站：" + "、".join(stations))
    if products:
        out.append("油品：" + "、".join(PRODUCTS_ZH.get(p, str(p)) for p in products))
    if fences:
        out.append(f"电子围栏：{fences} 个")
    if hours:
        out.append("时段：" + fleet_forms.describe_hours(list(hours)))
    return out


@requires(Role.FLEET_MANAGER)
async def card_status(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    card_id = request.match_info["card_id"]
    form = await request.post()
    status = CARD_STATUS_FORM.get(str(form.get("status", "")))
    if status is None or not await ctx.may_touch_card(user, card_id):
        await audit(request, user, "fleet.CardStatus", None, "NOT_FOUND")
        raise web.HTTPNotFound()
    try:
        await ctx.call(ctx.core.account.UpdateCardStatus, account_pb2.UpdateCardStatusRequest(
            request_id=f"console-status-{_form_id(form)}", card_id=card_id, status=status), user)
    except CoreRefusal as refusal:
        await audit(request, user, "fleet.CardStatus", card_id, refusal.reason)
        return _render("message.html", request, {"title": "修改卡状态", "error": refusal_text(refusal)},
                       status=409)
    await audit(request, user, "fleet.CardStatus", card_id, "OK")
    # back to the page of the list the button was on
    referer = urllib.parse.urlsplit(request.headers.get("Referer", ""))
    back = referer.path + (f"?{referer.query}" if referer.query else "")
    return _see_other(back if referer.netloc == request.host and back.startswith(MAIN_PAGE) else MAIN_PAGE)


# --- issuing a vehicle card -----------------------------------------------------------------


def _vehicle_form_context(values: Mapping[str, str], chosen: list[str], error: FormError | None
                          ) -> dict[str, Any]:
    return {"form_id": values.get("form_id") or secrets.token_urlsafe(16), "values": values,
            "chosen_products": chosen, "products": PRODUCTS_ZH, "error": error}


@requires(Role.FLEET_MANAGER)
async def new_vehicle(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return _render("new_vehicle.html", request, _vehicle_form_context({}, [], None))


@requires(Role.FLEET_MANAGER)
async def issue_vehicle(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """A sub-account (the vehicle) and a card on it, then its money caps,
    litre caps and scope. If a step after the card fails, the card is
    blocked: a card must never be out with less control than was asked."""
    ctx = console_context(request)
    form = await request.post()
    values = _text(form)
    chosen = [v for v in form.getall("products", []) if isinstance(v, str)]
    try:
        vehicle = fleet_forms.vehicle_form(values, chosen)
    except FormError as error:
        await audit(request, user, "fleet.IssueVehicleCard", None, "INVALID_ARGUMENT " + error.field)
        return _render("new_vehicle.html", request, _vehicle_form_context(values, chosen, error),
                       status=400)
    seed = _form_id(form)
    fleet = _fleet(user)
    try:
        opened = await ctx.call(ctx.core.account.OpenAccount, account_pb2.OpenAccountRequest(
            request_id=f"console-open-{seed}", holder=account_pb2.Holder(name=vehicle.holder_name),
            parent_account_id=fleet, funding_mode=vehicle.funding_mode,  # type: ignore[arg-type]
            label=vehicle.label), user)
        issued = await ctx.call(ctx.core.account.IssueCard, account_pb2.IssueCardRequest(
            request_id=f"console-card-{seed}", account_id=opened.account.account_id), user)
    except CoreRefusal as refusal:
        await audit(request, user, "fleet.IssueVehicleCard", None, refusal.reason)
        return _render("new_vehicle.html", request, _vehicle_form_context(
            values, chosen, FormError("", refusal_text(refusal))), status=409)
    card_id = issued.card.card_id
    try:
        await _apply_controls(ctx, user, fleet, card_id, vehicle, seed)
    except CoreRefusal as refusal:
        await ctx.call(ctx.core.account.UpdateCardStatus, account_pb2.UpdateCardStatusRequest(
            request_id=f"console-block-{seed}", card_id=card_id,
            status=account_pb2.CARD_STATUS_BLOCKED), user)
        await audit(request, user, "fleet.IssueVehicleCard", card_id, "CONTROLS_REFUSED " + refusal.reason)
        return _render("message.html", request, {
            "title": "开卡未完成",
            "error": f"卡已开出但限额或使用范围没有设置成功，卡已暂停使用：{refusal_text(refusal)}"},
            status=409)
    await audit(request, user, "fleet.IssueVehicleCard", card_id, "OK")
    response = _render("issued.html", request, {
        "account": opened.account, "card": issued.card, "card_number": issued.card_number,
        "vehicle": vehicle, "scope": _scope_lines(vehicle.scope)})
    # The full card number is on this page once, for printing: never cached.
    response.headers["Cache-Control"] = "no-store"
    return response


async def _apply_controls(ctx: ConsoleContext, user: ConsoleUser, fleet: str, card_id: str,
                          vehicle: fleet_forms.VehicleForm, seed: str) -> None:
    # A new card has no caps: setting them lowers them, which needs no step-up.
    if vehicle.has_limits:
        await ctx.call(ctx.core.control.SetSpendingLimits, control_pb2.SetSpendingLimitsRequest(
            request_id=f"console-limits-{seed}", actor_account_id=fleet, card_id=card_id,
            limits=vehicle.limits), user)
    if vehicle.has_volume:
        await ctx.call(ctx.core.control.SetVolumeLimits, control_pb2.SetVolumeLimitsRequest(
            request_id=f"console-litres-{seed}", actor_account_id=fleet, card_id=card_id,
            limits=vehicle.volume), user)
    if vehicle.has_scope:
        await ctx.call(ctx.core.control.SetCardScope, control_pb2.SetCardScopeRequest(
            request_id=f"console-scope-{seed}", actor_account_id=fleet, card_id=card_id,
            scope=vehicle.scope), user)


def _scope_lines(scope: control_pb2.CardScope) -> list[str]:
    out = []
    if scope.station_ids:
        out.append("油站：" + "、".join(scope.station_ids))
    if scope.products:
        out.append("油品：" + "、".join(PRODUCTS_ZH[p] for p in scope.products))
    for fence in scope.geofences:
        if fence.HasField("circle"):
            c = fence.circle
            out.append(f"电子围栏：以 ({c.center.latitude:.6f}, {c.center.longitude:.6f}) 为圆心、"
                       f"半径 {c.radius_m} 米")
        else:
            out.append(f"电子围栏：{len(fence.polygon.vertices)} 个顶点的多边形")
    if scope.hours:
        minutes = [m for w in scope.hours for m in (w.start_minute, w.end_minute)]
        out.append("时段：" + fleet_forms.describe_hours(minutes))
    return out


# --- changing a card's controls --------------------------------------------------------------

CARD_CONTROLS_SQL = """
    SELECT a.label, c.masked, c.scope_stations, c.scope_products, c.scope_fences, c.scope_hours
      FROM fc.cards c JOIN fc.accounts a ON a.id = c.account_id WHERE c.uid = %(card)s::uuid"""


async def _card_controls_page(request: web.Request, user: ConsoleUser, card_id: str, *,
                              values: Mapping[str, str] | None = None, chosen: list[str] | None = None,
                              error: FormError | None = None, notice: str = "", status: int = 200
                              ) -> web.Response:
    """The form, filled with what is in force (or with what was typed)."""
    ctx = console_context(request)
    current, row = await asyncio.gather(
        ctx.call(ctx.core.control.GetSpendingLimits,
                 control_pb2.GetSpendingLimitsRequest(card_id=card_id), user),
        ctx.reports.fetch_one(CARD_CONTROLS_SQL, {"card": card_id}))
    if row is None:  # not on the reports database yet (a replica a moment behind)
        raise web.HTTPNotFound()
    label, masked, stations_now, products_now, fences, hours = row
    if values is None:
        values = fleet_forms.prefill(current.limits, current.volume_limits, stations_now, fences, hours)
        chosen = [str(p) for p in products_now or []]
    return _render("controls.html", request, {
        "card_id": card_id, "label": label, "masked": masked, "values": values,
        "chosen_products": chosen or [], "products": PRODUCTS_ZH, "error": error, "notice": notice,
        "form_id": secrets.token_urlsafe(16)}, status=status)


@requires(Role.FLEET_MANAGER)
async def card_controls(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    card_id = request.match_info["card_id"]
    if not await console_context(request).may_touch_card(user, card_id):
        raise web.HTTPNotFound()
    notice = "已保存。" if request.query.get("saved") else ""
    return await _card_controls_page(request, user, card_id, notice=notice)


@requires(Role.FLEET_MANAGER)
async def set_card_controls(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """New caps and scope for a card. The money caps are sent only when they
    change (a raise may need the holder's SMS step-up, which the core asks
    for); litre caps and scope are replaced as typed."""
    ctx = console_context(request)
    card_id = request.match_info["card_id"]
    if not await ctx.may_touch_card(user, card_id):
        await audit(request, user, "fleet.SetCardControls", None, "NOT_FOUND")
        raise web.HTTPNotFound()
    form = await request.post()
    values = _text(form)
    chosen = [v for v in form.getall("products", []) if isinstance(v, str)]
    try:
        controls = fleet_forms.controls_form(values, chosen)
    except FormError as error:
        await audit(request, user, "fleet.SetCardControls", card_id, "INVALID_ARGUMENT " + error.field)
        return await _card_controls_page(request, user, card_id, values=values, chosen=chosen, error=error,
                                         status=400)
    seed, fleet = _form_id(form), _fleet(user)
    try:
        current = await ctx.call(ctx.core.control.GetSpendingLimits,
                                 control_pb2.GetSpendingLimitsRequest(card_id=card_id), user)
        if current.limits != controls.limits:
            await ctx.call(ctx.core.control.SetSpendingLimits, control_pb2.SetSpendingLimitsRequest(
                request_id=f"console-limits-{seed}", actor_account_id=fleet, card_id=card_id,
                limits=controls.limits), user)
        await ctx.call(ctx.core.control.SetVolumeLimits, control_pb2.SetVolumeLimitsRequest(
            request_id=f"console-litres-{seed}", actor_account_id=fleet, card_id=card_id,
            limits=controls.volume), user)
        await ctx.call(ctx.core.control.SetCardScope, control_pb2.SetCardScopeRequest(
            request_id=f"console-scope-{seed}", actor_account_id=fleet, card_id=card_id,
            scope=controls.scope), user)
    except CoreRefusal as refusal:
        await audit(request, user, "fleet.SetCardControls", card_id, refusal.reason)
        return await _card_controls_page(request, user, card_id, values=values, chosen=chosen,
                                         error=FormError("", refusal_text(refusal)), status=409)
    await audit(request, user, "fleet.SetCardControls", card_id, "OK")
    return _see_other(f"{MAIN_PAGE}cards/{card_id}/controls?saved=1")


# --- batch top-up ---------------------------------------------------------------------------


@requires(Role.FLEET_MANAGER)
async def topup_form(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    return _render("topup.html", request, {"error": None})


@requires(Role.FLEET_MANAGER)
async def topup_upload(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    try:
        # Streamed with its own limit (the edge's body limit is the JSON API's 64 KiB); the
        # CSRF token is in the form's action, as for every upload (auth.csrf_middleware).
        upload = await read_upload(request, "file", fleet_topup.MAX_FILE_BYTES)
        if not upload.data:
            raise FormError("file", "请选择一个 CSV 文件")
        lines = fleet_topup.parse_csv(fleet_topup.decode(upload.data))
    except FormError as error:
        await audit(request, user, "fleet.TopUpPreview", None, "INVALID_ARGUMENT")
        return _render("topup.html", request, {"error": error.message}, status=400)
    labels, ids = fleet_topup.lookup_keys(lines)
    rows = await ctx.reports.fetch_all(fleet_topup.VEHICLES_SQL, {
        "parent": user.account_key, "labels": labels, "ids": ids})
    pv = fleet_topup.preview(lines, [fleet_topup.Vehicle(r[0], r[1], r[2]) for r in rows])
    batch = fleet_topup.PENDING.add(user.user_id, _fleet(user), pv, ctx.clock.now())
    await audit(request, user, "fleet.TopUpPreview", None,
                "OK" if pv.ok else f"LINES_INVALID {pv.error_count}")
    return _see_other(f"{MAIN_PAGE}topup/{batch.batch_id}")


def _batch(request: web.Request, user: ConsoleUser) -> fleet_topup.PendingBatch | None:
    batch = fleet_topup.PENDING.get(request.match_info["batch_id"], user.user_id,
                                    console_context(request).clock.now())
    if batch is None or batch.parent_account_id != user.account_uid:
        return None
    return batch


def _batch_gone(request: web.Request) -> web.Response:
    return _render("message.html", request, {
        "title": "批量充值", "error": "这份预览已过期或不存在，请重新上传文件。"}, status=404)


# The step-up is asked for before the preview is shown, so that its confirm
# button goes straight through (the console's rule: the GET that shows a
# high-risk form is gated as well as its POST).
@requires(Role.FLEET_MANAGER, step_up=True)
async def topup_preview(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    batch = _batch(request, user)
    if batch is None:
        return _batch_gone(request)
    return _render("topup_preview.html", request, {"batch": batch, "preview": batch.preview})


@requires(Role.FLEET_MANAGER, step_up=True)
async def topup_confirm(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """One BatchTopUp with the batch's request_id: a second confirm of the
    same batch gets the first answer, and no money moves twice."""
    ctx = console_context(request)
    batch = _batch(request, user)
    if batch is None:
        await audit(request, user, "fleet.TopUp", None, "NOT_FOUND")
        return _batch_gone(request)
    if not batch.preview.ok:
        await audit(request, user, "fleet.TopUp", None, "LINES_INVALID")
        return _render("topup_preview.html", request, {"batch": batch, "preview": batch.preview},
                       status=400)
    lines = [control_pb2.TopUpLine(account_id=x.account_id, amount_fen=x.amount_fen)
             for x in batch.preview.lines]
    try:
        answer = await ctx.call(ctx.core.control.BatchTopUp, control_pb2.BatchTopUpRequest(
            request_id=batch.request_id, parent_account_id=batch.parent_account_id, lines=lines), user)
    except CoreRefusal as refusal:
        await audit(request, user, "fleet.TopUp", batch.parent_account_id, refusal.reason)
        batch.result = {"approved": 0, "total_fen": 0, "parent_balance_fen": 0,
                        "error": refusal_text(refusal)}
        return _see_other(f"{MAIN_PAGE}topup/{batch.batch_id}")
    approved = answer.decision == common_pb2.DECISION_APPROVED
    batch.result = {"approved": int(approved), "total_fen": answer.total_fen,
                    "parent_balance_fen": answer.parent_balance_fen,
                    "error": "" if approved else DECLINES_ZH.get(answer.decline_reason, "充值被拒绝")}
    await audit(request, user, "fleet.TopUp", batch.parent_account_id,
                "OK" if approved else "DECLINED " + common_pb2.DeclineReason.Name(answer.decline_reason))
    return _see_other(f"{MAIN_PAGE}topup/{batch.batch_id}")


# --- the cost report ------------------------------------------------------------------------


def _report_period(query: Mapping[str, str], now: dt.datetime) -> tuple[dt.date, dt.date]:
    """[start, end] inclusive days; default: this month up to today."""
    today = now.astimezone(fleet_report.BUSINESS_TZ).date()
    start_text, end_text = query.get("start", ""), query.get("end", "")
    try:
        start = dt.date.fromisoformat(start_text) if _DATE.fullmatch(start_text) else today.replace(day=1)
        end = dt.date.fromisoformat(end_text) if _DATE.fullmatch(end_text) else today
    except ValueError:
        raise FormError("start", "日期格式应为 YYYY-MM-DD") from None
    if end < start:
        raise FormError("end", "结束日期不能早于开始日期")
    if (end - start).days > 365:
        raise FormError("end", "一次最多查询一年")
    return start, end


def _report_settings(query: Mapping[str, str]) -> fleet_report.Settings:
    tank = query.get("tank_l", "").strip()
    tank_ml = fleet_forms.optional_litres(tank, "tank_l") if tank else fleet_report.DEFAULT_TANK_L * 1000
    if tank_ml <= 0:
        raise FormError("tank_l", "油箱容量必须大于 0")
    hours = fleet_forms.hour_windows(query.get("work", "").strip() or "06:00-22:00")
    if len(hours) != 1:
        raise FormError("work", "工作时间请填一个时段")
    return fleet_report.Settings(tank_ml=tank_ml, work_start=hours[0].start_minute,
                                 work_end=hours[0].end_minute)


@requires(Role.FLEET_MANAGER)
async def report(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    query = dict(request.query)
    try:
        start_day, end_day = _report_period(query, ctx.clock.now())
        settings = _report_settings(query)
    except FormError as error:
        return _render("report.html", request, {"error": error.message, "query": query, "form": query},
                       status=400)
    start = dt.datetime.combine(start_day, dt.time(), fleet_report.BUSINESS_TZ)
    end = dt.datetime.combine(end_day + dt.timedelta(days=1), dt.time(), fleet_report.BUSINESS_TZ)
    flagged_only = query.get("flagged") == "1"
    token = query.get("page_token", "")
    # One page, the fleet's sums and the chart's bars in one call: the core reads its replica.
    try:
        got = await ctx.call(ctx.core.control.GetFleetCostReport, control_pb2.GetFleetCostReportRequest(
            parent_account_id=_fleet(user), start_time=_ts(start), end_time=_ts(end),
            page_size=REPORT_PAGE_SIZE, page_token=token, anomalies_only=flagged_only,
            top_spenders_count=fleet_report.CHART_ROWS, tank_capacity_ml=settings.tank_ml,
            working_hours_start_minute=settings.work_start,
            working_hours_end_minute=settings.work_end), user)
    except CoreRefusal as refusal:
        if refusal.reason != "PAGE_TOKEN_INVALID":
            raise
        base = {k: v for k, v in query.items() if k != "page_token"}
        return _see_other(f"{MAIN_PAGE}report?{urllib.parse.urlencode(base)}")
    summary = got.summary
    work = fleet_forms.describe_hours([settings.work_start, settings.work_end])
    tank_l = f"{settings.tank_ml / 1000:g}"
    title = (f"车辆加油费用 {start_day.isoformat()} 至 {end_day.isoformat()}"
             f"（前 {fleet_report.CHART_ROWS} 名）")
    base = {k: v for k, v in query.items() if k != "page_token"}
    return _render("report.html", request, {
        "error": None, "query": query, "form": {
            "start": start_day.isoformat(), "end": end_day.isoformat(), "work": work, "tank_l": tank_l},
        "work": work, "tank_l": tank_l, "lines": list(got.vehicles),
        "count": summary.anomalous_vehicle_count if flagged_only else summary.vehicle_count,
        "flagged_count": summary.anomalous_vehicle_count, "total_spend": summary.spend_fen,
        "total_volume": summary.volume_ml, "median": summary.median_spend_fen,
        "chart": fleet_report.chart_svg(got.top_spenders, title), "flag_text": fleet_report.flag_text,
        "next_url": f"{MAIN_PAGE}report?" + urllib.parse.urlencode(
            {**base, "page_token": got.next_page_token}) if got.next_page_token else None,
        "first_url": f"{MAIN_PAGE}report?" + urllib.parse.urlencode(base) if token else None})


# --- statements and invoices ----------------------------------------------------------------


def _month(text: str | None, now: dt.datetime) -> str:
    if text and _MONTH.fullmatch(text):
        return text
    return fleet_report.previous_month(now)


# The earlier pages' tokens travel in the statement page's links ("back": comma-separated, "-"
# for the first page), so that "previous" needs no state on the server; digits only (the core's
# page tokens), and a bounded trail.
_BACK = re.compile(r"(-|\d{1,19})(,(\d{1,19}))*")
BACK_PAGES_MAX = 300


@requires(Role.FLEET_MANAGER)
async def statements(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """One page of the month's statement (the core pages it: a fleet of 10 000
    vehicles has 10 001 lines), with the whole month's totals."""
    ctx = console_context(request)
    month = _month(request.query.get("month"), ctx.clock.now())
    token = request.query.get("page_token", "")
    back_text = request.query.get("back", "")
    back = back_text.split(",") if _BACK.fullmatch(back_text) and token else []
    got = await ctx.call(ctx.core.invoice.GetStatement, invoice_pb2.GetStatementRequest(
        account_id=_fleet(user), month=month, page_size=REPORT_PAGE_SIZE, page_token=token), user)
    base = {"month": month}
    next_url = prev_url = None
    if got.next_page_token:
        trail = [*back, token or "-"][-BACK_PAGES_MAX:]
        next_url = "?" + urllib.parse.urlencode(
            {**base, "page_token": got.next_page_token, "back": ",".join(trail)})
    if token:
        prev = back[-1] if back else "-"
        query = dict(base)
        if prev != "-":
            query |= {"page_token": prev, "back": ",".join(back[:-1])}
        prev_url = "?" + urllib.parse.urlencode(query)
    return _render("statements.html", request, {
        "month": month, "statement": got.statement, "lines": list(got.statement.lines),
        "line_count": got.total_size, "next_url": next_url, "prev_url": prev_url,
        "first_url": "?" + urllib.parse.urlencode(base) if len(back) > 1 else None})


@requires(Role.FLEET_MANAGER)
async def statement_file(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    month, kind = request.match_info["month"], request.match_info["kind"]
    if not _MONTH.fullmatch(month):
        raise web.HTTPNotFound()
    fmt = invoice_pb2.STATEMENT_FORMAT_PDF if kind == "pdf" else invoice_pb2.STATEMENT_FORMAT_CSV
    message = invoice_pb2.GetStatementRequest(account_id=_fleet(user), month=month, format=fmt)
    if kind == "pdf":
        got = await _call_slow(ctx, ctx.core.invoice.GetStatement, message, user, PDF_TIMEOUT_S)
    else:
        got = await ctx.call(ctx.core.invoice.GetStatement, message, user)
    name = f"statement-{month}.{kind}"
    return web.Response(body=got.content, headers={
        "Content-Type": got.content_type, "Content-Disposition": f'attachment; filename="{name}"',
        "Cache-Control": "no-store"})


async def _call_slow(ctx: ConsoleContext, method: Any, message: Any, user: ConsoleUser,
                     timeout_s: float) -> Any:
    """ctx.call with a longer deadline, for a call known to take seconds (the
    core draws a statement's PDF with a CJK font embedded: seconds of CPU on a
    busy machine, past the console's usual deadline). The same on-behalf-of
    metadata and the same refusals as ctx.call."""
    try:
        return await method(message, metadata=((ON_BEHALF_OF, f"console_user:{user.user_id}"),),
                            timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise refusal_of(exc) from None


async def _invoices_page(request: web.Request, user: ConsoleUser, *, error: str = "", notice: str = "",
                         status: int = 200) -> web.Response:
    ctx = console_context(request)
    fleet = _fleet(user)
    token = request.query.get("page_token", "")
    invoices, txns = await asyncio.gather(
        ctx.call(ctx.core.invoice.ListInvoices, invoice_pb2.ListInvoicesRequest(
            account_id=fleet, page_size=INVOICE_PAGE_SIZE, page_token=token), user),
        ctx.call(ctx.core.account.ListTransactions, account_pb2.ListTransactionsRequest(
            account_id=fleet, page_size=50), user))
    recharges = [t for t in txns.transactions if t.kind == account_pb2.TRANSACTION_KIND_RECHARGE][:10]
    return _render("invoices.html", request, {
        "invoices": invoices.invoices, "next_page_token": invoices.next_page_token,
        "first_page": not token, "recharges": recharges, "error": error, "notice": notice,
        "month": fleet_report.previous_month(ctx.clock.now()), "form_id": secrets.token_urlsafe(16),
        "state_zh": INVOICE_STATE_ZH, "kind_zh": INVOICE_KIND_ZH, "type_zh": INVOICE_TYPE_ZH,
        "when": _local}, status=status)


@requires(Role.FLEET_MANAGER)
async def invoices(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    notice = "发票申请已提交。" if request.query.get("requested") else ""
    return await _invoices_page(request, user, notice=notice)


def _buyer(form: Mapping[str, str]) -> invoice_pb2.Buyer:
    name = (form.get("buyer_name") or "").strip()
    taxpayer = (form.get("taxpayer_id") or "").strip().upper()
    if not 1 <= len(name) <= 100:
        raise FormError("buyer_name", "请填写购买方名称（最多 100 字）")
    if taxpayer and not _TAXPAYER_ID.fullmatch(taxpayer):
        raise FormError("taxpayer_id", "纳税人识别号为 15-20 位大写字母和数字")
    return invoice_pb2.Buyer(name=name, taxpayer_id=taxpayer)


@requires(Role.FLEET_MANAGER)
async def request_invoice(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    """A consumption invoice for a month (专票 or 普票), or an ordinary 不征税
    invoice for a recharge; the core refuses the second kind for money the
    first already covers, and the page says so in Chinese."""
    ctx = console_context(request)
    form = await request.post()
    values = _text(form)
    kind = values.get("kind")
    message = invoice_pb2.RequestInvoiceRequest(request_id=f"console-invoice-{_form_id(form)}",
                                                account_id=_fleet(user))
    try:
        message.buyer.CopyFrom(_buyer(values))
        if kind == "consumption":
            month = values.get("month", "")
            if not _MONTH.fullmatch(month):
                raise FormError("month", "月份格式应为 YYYY-MM")
            message.kind, message.month = invoice_pb2.INVOICE_KIND_CONSUMPTION, month
            special = values.get("type") == "special"
            if special and not message.buyer.taxpayer_id:
                raise FormError("taxpayer_id", "专用发票必须填写纳税人识别号")
            message.type = invoice_pb2.INVOICE_TYPE_SPECIAL if special else invoice_pb2.INVOICE_TYPE_ORDINARY
        elif kind == "recharge":
            recharge = values.get("recharge_id", "")
            if not _UUID.fullmatch(recharge):
                raise FormError("recharge_id", "请选择一笔充值")
            message.kind, message.recharge_id = invoice_pb2.INVOICE_KIND_RECHARGE, recharge
            message.type = invoice_pb2.INVOICE_TYPE_ORDINARY
        else:
            raise FormError("kind", "请选择发票类型")
    except FormError as error:
        await audit(request, user, "fleet.RequestInvoice", None, "INVALID_ARGUMENT " + error.field)
        return await _invoices_page(request, user, error=error.message, status=400)
    try:
        got = await ctx.call(ctx.core.invoice.RequestInvoice, message, user)
    except CoreRefusal as refusal:
        await audit(request, user, "fleet.RequestInvoice", _fleet(user), refusal.reason)
        return await _invoices_page(request, user, error=refusal_text(refusal), status=409)
    await audit(request, user, "fleet.RequestInvoice", got.invoice.invoice_id, "OK")
    return _see_other(f"{MAIN_PAGE}invoices?requested=1")


@requires(Role.FLEET_MANAGER)
async def invoice_detail(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    ctx = console_context(request)
    invoice_id = request.match_info["invoice_id"]
    if not _UUID.fullmatch(invoice_id):
        raise web.HTTPNotFound()
    try:
        got = await ctx.call(ctx.core.invoice.GetInvoice, invoice_pb2.GetInvoiceRequest(
            invoice_id=invoice_id), user)
    except CoreRefusal as refusal:
        if refusal.reason != "INVOICE_NOT_FOUND":
            raise
        raise web.HTTPNotFound() from None
    if got.invoice.account_id != user.account_uid:  # another fleet's: as if it did not exist
        raise web.HTTPNotFound()
    entries = list(got.invoice.list_entries)
    return _render("invoice.html", request, {
        "invoice": got.invoice, "entries": entries[:REPORT_PAGE_SIZE],
        "more_entries": max(0, len(entries) - REPORT_PAGE_SIZE), "state_zh": INVOICE_STATE_ZH,
        "kind_zh": INVOICE_KIND_ZH, "type_zh": INVOICE_TYPE_ZH, "when": _local})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, index)
    router.add_get(MAIN_PAGE + "vehicles/new", new_vehicle)
    router.add_post(MAIN_PAGE + "vehicles", issue_vehicle)
    router.add_post(MAIN_PAGE + "cards/{card_id}/status", card_status)
    router.add_get(MAIN_PAGE + "cards/{card_id}/controls", card_controls)
    router.add_post(MAIN_PAGE + "cards/{card_id}/controls", set_card_controls)
    router.add_get(MAIN_PAGE + "topup", topup_form)
    router.add_post(MAIN_PAGE + "topup", topup_upload)
    router.add_get(MAIN_PAGE + "topup/{batch_id}", topup_preview)
    router.add_post(MAIN_PAGE + "topup/{batch_id}", topup_confirm)
    router.add_get(MAIN_PAGE + "report", report)
    router.add_get(MAIN_PAGE + "statements", statements)
    router.add_get(MAIN_PAGE + "statements/{month}.{kind:csv|pdf}", statement_file)
    router.add_get(MAIN_PAGE + "invoices", invoices)
    router.add_post(MAIN_PAGE + "invoices", request_invoice)
    router.add_get(MAIN_PAGE + "invoices/{invoice_id}", invoice_detail)
