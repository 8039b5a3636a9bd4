"""ControlService: fleets, families, limits, scope of use, points pooling."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from typing import Any

import grpc
from fuelcard.v1 import control_pb2, control_pb2_grpc

from fuelcard_server import history, reports, stepup, wire
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.services.transaction import PRODUCTS
from fuelcard_server.validation import ID_MAX_CHARS, NAME_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_LIMIT_FEN = 10**12
MAX_TOP_UP_LINES = 1000
MAX_SCOPE_STATIONS = 200
MAX_FENCES = 20
MAX_POLYGON_VERTICES = 200
MAX_RADIUS_M = 2_000_000
MAX_RAISE = dt.timedelta(days=90)
MAX_REPORT_SPAN = dt.timedelta(days=366)

BATCH_TOP_UP_SQL = (
    "SELECT fc.batch_top_up(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_parent_uid => %(parent_uid)s::uuid,"
    " p_lines => %(lines)s::jsonb, p_now => %(now)s::timestamptz)")
# The step-up gate of a raise runs inside fc.set_limits, under the account
# lock: whether the change is a raise is decided there (issue 15).
SET_LIMITS_SQL = (
    "SELECT fc.set_limits(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_actor_uid => %(actor_uid)s::uuid,"
    " p_card_uid => %(card_uid)s::uuid, p_account_uid => %(account_uid)s::uuid,"
    " p_txn => %(txn)s::bigint, p_daily => %(daily)s::bigint, p_monthly => %(monthly)s::bigint,"
    " p_now => %(now)s::timestamptz, p_step_up => %(step_up)s::boolean,"
    " p_challenge => %(challenge)s::uuid, p_code_hash => %(code_hash)s)")
GRANT_RAISE_CALL = (
    "fc.grant_raise(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_actor_uid => %(actor_uid)s::uuid,"
    " p_card_uid => %(card_uid)s::uuid, p_account_uid => %(account_uid)s::uuid,"
    " p_txn => %(txn)s::bigint, p_daily => %(daily)s::bigint, p_monthly => %(monthly)s::bigint,"
    " p_starts => %(starts)s::timestamptz, p_ends => %(ends)s::timestamptz,"
    " p_now => %(now)s::timestamptz)")
STEP_UP_GRANT_RAISE_SQL = stepup.gate(GRANT_RAISE_CALL)
GET_LIMITS_SQL = (
    "SELECT fc.get_limits(p_card_uid => %(card_uid)s::uuid, p_account_uid => %(account_uid)s::uuid,"
    " p_now => %(now)s::timestamptz)")
GRANT_RAISE_SQL = "SELECT " + GRANT_RAISE_CALL
SET_SCOPE_SQL = (
    "SELECT fc.set_scope(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_actor_uid => %(actor_uid)s::uuid,"
    " p_card_uid => %(card_uid)s::uuid, p_stations => %(stations)s::text[],"
    " p_products => %(products)s::smallint[], p_fences => %(fences)s::jsonb,"
    " p_hours => %(hours)s::integer[], p_now => %(now)s::timestamptz)")
TRANSFER_POINTS_SQL = (
    "SELECT fc.transfer_points(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_from_uid => %(from_uid)s::uuid,"
    " p_to_uid => %(to_uid)s::uuid, p_points => %(points)s::bigint, p_now => %(now)s::timestamptz)")
SET_PRICE_SQL = (
    "SELECT fc.set_price(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_station_id => %(station_id)s,"
    " p_product => %(product)s::smallint, p_effective => %(effective)s::timestamptz,"
    " p_unit_price_fen => %(unit_price_fen)s::bigint, p_now => %(now)s::timestamptz)")
LIST_PRICES_SQL = """
    SELECT fc.price_json(p => p) FROM fc.prices p
     WHERE p.station_id = %(station_id)s AND (%(product)s::smallint = 0 OR p.product = %(product)s)
     ORDER BY p.effective_at DESC, p.product LIMIT 500"""
SET_VOLUME_LIMITS_SQL = (
    "SELECT fc.set_volume_limits(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_actor_uid => %(actor_uid)s::uuid,"
    " p_card_uid => %(card_uid)s::uuid, p_fill_ml => %(fill_ml)s::bigint,"
    " p_daily_ml => %(daily_ml)s::bigint, p_monthly_ml => %(monthly_ml)s::bigint,"
    " p_now => %(now)s::timestamptz)")
# Bounds to refuse garbage early: a posted price of 10 000 yuan a litre, a cap
# of ten million litres.
MAX_PRICE_FEN = 1_000_000
MAX_VOLUME_ML = 10**10
REGISTER_STATION_SQL = """
    INSERT INTO fc.stations (station_id, name, latitude, longitude) VALUES (%s, %s, %s, %s)
    ON CONFLICT (station_id) DO UPDATE
       SET name = excluded.name, latitude = excluded.latitude, longitude = excluded.longitude
    RETURNING station_id, name, latitude, longitude"""
CHANGES_SQL = """
    SELECT c.id, actor.uid::text, c.kind, card.uid::text, target.uid::text, c.details::text,
           fc.ts(p => c.created_at)
      FROM fc.control_changes c
      JOIN fc.accounts actor ON actor.id = c.actor_account_id
      JOIN fc.accounts target ON target.id = c.account_id
      LEFT JOIN fc.cards card ON card.id = c.card_id
     WHERE (target.id = %(account)s OR target.parent_id = %(account)s) AND c.id < %(before)s
     ORDER BY c.id DESC LIMIT %(limit)s"""


def _limits(d: dict[str, Any]) -> control_pb2.SpendingLimits:
    return control_pb2.SpendingLimits(per_transaction_fen=d["per_transaction_fen"] or 0,
                                      daily_fen=d["daily_fen"] or 0,
                                      monthly_fen=d["monthly_fen"] or 0)


def _raise_amount(limits: control_pb2.SpendingLimits) -> int:
    """What a limit raise's step-up is bound to: the highest cap it sets, or
    0 if it leaves any cap unset (no cap) - see StepUpKind."""
    caps = (limits.per_transaction_fen, limits.daily_fen, limits.monthly_fen)
    return 0 if 0 in caps else max(caps)


def _check_limits(v: Violations, field: str, limits: control_pb2.SpendingLimits) -> None:
    v.non_negative(f"{field}.per_transaction_fen", limits.per_transaction_fen, MAX_LIMIT_FEN)
    v.non_negative(f"{field}.daily_fen", limits.daily_fen, MAX_LIMIT_FEN)
    v.non_negative(f"{field}.monthly_fen", limits.monthly_fen, MAX_LIMIT_FEN)


def _check_point(v: Violations, field: str, p: control_pb2.GeoPoint) -> None:
    if not (math.isfinite(p.latitude) and -90 <= p.latitude <= 90):
        v.add(f"{field}.latitude", "must be -90..90", "LATITUDE_INVALID")
    if not (math.isfinite(p.longitude) and -180 <= p.longitude <= 180):
        v.add(f"{field}.longitude", "must be -180..180", "LONGITUDE_INVALID")


def _target(v: Violations, request: Any) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    which = request.WhichOneof("target")
    if which is None:
        v.add("target", "card_id or account_id is required", "TARGET_MISSING")
        return None, None
    value = v.uuid(which, getattr(request, which))
    return (value, None) if which == "card_id" else (None, value)


def _time(v: Violations, field: str, request: Any) -> dt.datetime | None:
    if not request.HasField(field):
        v.add(field, "is required", "FIELD_MISSING")
        return None
    return v.timestamp(field, getattr(request, field))


class ControlService(Servicer, control_pb2_grpc.ControlServiceServicer):

    @rpc(Role.ADMIN)
    async def BatchTopUp(self, request: control_pb2.BatchTopUpRequest, context: Ctx
                         ) -> control_pb2.BatchTopUpResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("parent_account_id", request.parent_account_id)
        if not 1 <= len(request.lines) <= MAX_TOP_UP_LINES:
            v.add("lines", f"must have 1-{MAX_TOP_UP_LINES} lines", "LINES_COUNT_INVALID")
        seen: set[uuid.UUID] = set()
        lines = []
        for i, line in enumerate(request.lines):
            account = v.uuid(f"lines[{i}].account_id", line.account_id)
            v.amount(f"lines[{i}].amount_fen", line.amount_fen, self.d.settings.max_recharge_fen)
            if account is not None:
                if account in seen:
                    v.add(f"lines[{i}].account_id", "appears twice", "LINE_DUPLICATE")
                seen.add(account)
                lines.append({"uid": str(account), "amount": line.amount_fen})
        v.raise_if_any()
        d = await self.d.db.call(BATCH_TOP_UP_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("batch_top_up", request),
            "parent_uid": request.parent_account_id, "lines": json.dumps(lines),
            "now": self.d.clock.now()})
        return control_pb2.BatchTopUpResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            total_fen=d["total_fen"], parent_balance_fen=d["parent_balance_fen"])

    @rpc(Role.ADMIN)
    async def SetSpendingLimits(self, request: control_pb2.SetSpendingLimitsRequest, context: Ctx
                                ) -> control_pb2.SetSpendingLimitsResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("actor_account_id", request.actor_account_id)
        card, account = _target(v, request)
        _check_limits(v, "limits", request.limits)
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        lim = request.limits
        caller, now = self.d.caller(context), self.d.clock.now()
        d = stepup.check_answer(await self.d.db.call(SET_LIMITS_SQL, {
            "caller": caller, "request_id": request.request_id,
            "request_hash": self.d.fingerprint("set_limits", request),
            "actor_uid": request.actor_account_id, "card_uid": card, "account_uid": account,
            "txn": lim.per_transaction_fen, "daily": lim.daily_fen, "monthly": lim.monthly_fen,
            "now": now, "step_up": self.d.settings.step_up_limit_raises, "challenge": challenge,
            "code_hash": (self.d.step_ups.code_hash(challenge, request.step_up.code)
                          if challenge is not None else None)}))
        return control_pb2.SetSpendingLimitsResponse(limits=_limits(d["limits"]))

    @rpc(Role.ADMIN)
    async def GetSpendingLimits(self, request: control_pb2.GetSpendingLimitsRequest, context: Ctx
                                ) -> control_pb2.GetSpendingLimitsResponse:
        v = Violations()
        card, account = _target(v, request)
        v.raise_if_any()
        row = await self.d.db.fetch_one(GET_LIMITS_SQL, {
            "card_uid": card, "account_uid": account, "now": self.d.clock.now()})
        assert row is not None
        d = row[0]
        response = control_pb2.GetSpendingLimitsResponse(
            limits=_limits(d["limits"]), effective_limits=_limits(d["effective"]),
            used_today_fen=d["used_today_fen"], used_this_month_fen=d["used_this_month_fen"])
        if d["raise_end_us"] is not None:
            response.raise_end_time.FromMicroseconds(d["raise_end_us"])
        if "volume_limits" in d:   # a card
            response.volume_limits.CopyFrom(_volume_limits(d["volume_limits"]))
            response.used_today_ml = d["used_today_ml"]
            response.used_this_month_ml = d["used_this_month_ml"]
        return response

    @rpc(Role.ADMIN)
    async def GrantTemporaryRaise(self, request: control_pb2.GrantTemporaryRaiseRequest,
                                  context: Ctx) -> control_pb2.GrantTemporaryRaiseResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("actor_account_id", request.actor_account_id)
        card, account = _target(v, request)
        _check_limits(v, "limits", request.limits)
        start = _time(v, "start_time", request)
        end = _time(v, "end_time", request)
        if start and end and not (start < end and end - start <= MAX_RAISE):
            v.add("end_time", "must be after start_time and at most 90 days later",
                  "RAISE_WINDOW_INVALID")
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        lim = request.limits
        caller, now = self.d.caller(context), self.d.clock.now()
        params = {"caller": caller, "request_id": request.request_id,
                  "request_hash": self.d.fingerprint("grant_raise", request),
                  "actor_uid": request.actor_account_id, "card_uid": card, "account_uid": account,
                  "txn": lim.per_transaction_fen, "daily": lim.daily_fen, "monthly": lim.monthly_fen,
                  "starts": start, "ends": end, "now": now}
        if self.d.settings.step_up_limit_raises:
            d = stepup.check_answer(await self.d.db.call(STEP_UP_GRANT_RAISE_SQL, (
                self.d.step_ups.gate_params(caller, request.request_id, "grant_raise", True,
                                            stepup.LIMIT_RAISE, card or account,
                                            _raise_amount(lim), challenge, request.step_up.code,
                                            now) | params)))
        else:
            d = await self.d.db.call(GRANT_RAISE_SQL, params)
        return control_pb2.GrantTemporaryRaiseResponse(raise_id=d["raise_id"])

    @rpc(Role.ADMIN)
    async def SetCardScope(self, request: control_pb2.SetCardScopeRequest, context: Ctx
                           ) -> control_pb2.SetCardScopeResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("actor_account_id", request.actor_account_id)
        v.uuid("card_id", request.card_id)
        scope = request.scope
        if len(scope.station_ids) > MAX_SCOPE_STATIONS:
            v.add("scope.station_ids", f"at most {MAX_SCOPE_STATIONS}", "TOO_MANY_STATIONS")
        for i, station in enumerate(scope.station_ids):
            v.text(f"scope.station_ids[{i}]", station, required=True, max_chars=ID_MAX_CHARS)
        for i, product in enumerate(scope.products):
            v.enum(f"scope.products[{i}]", product, PRODUCTS)
        if len(scope.geofences) > MAX_FENCES:
            v.add("scope.geofences", f"at most {MAX_FENCES}", "TOO_MANY_FENCES")
        fences: list[dict[str, Any]] = []
        for i, fence in enumerate(scope.geofences):
            field = f"scope.geofences[{i}]"
            if fence.HasField("circle"):
                _check_point(v, f"{field}.circle.center", fence.circle.center)
                if not 0 < fence.circle.radius_m <= MAX_RADIUS_M:
                    v.add(f"{field}.circle.radius_m", f"must be 1-{MAX_RADIUS_M}", "RADIUS_INVALID")
                c = fence.circle
                fences.append({"circle": [c.center.latitude, c.center.longitude, c.radius_m]})
            elif fence.HasField("polygon"):
                points = fence.polygon.vertices
                if not 3 <= len(points) <= MAX_POLYGON_VERTICES:
                    v.add(f"{field}.polygon.vertices", f"must have 3-{MAX_POLYGON_VERTICES}",
                          "POLYGON_INVALID")
                for j, p in enumerate(points):
                    _check_point(v, f"{field}.polygon.vertices[{j}]", p)
                fences.append({"polygon": [[p.latitude, p.longitude] for p in points]})
            else:
                v.add(field, "needs a circle or a polygon", "FENCE_SHAPE_MISSING")
        hours: list[int] = []
        for i, w in enumerate(scope.hours):
            if not (0 <= w.start_minute <= 1439 and 1 <= w.end_minute <= 1440
                    and w.start_minute != w.end_minute):
                v.add(f"scope.hours[{i}]", "start 0-1439, end 1-1440, start != end",
                      "HOURS_INVALID")
            hours += [w.start_minute, w.end_minute]
        v.raise_if_any()
        d = await self.d.db.call(SET_SCOPE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("set_scope", request),
            "actor_uid": request.actor_account_id, "card_uid": request.card_id,
            "stations": list(scope.station_ids) or None, "products": list(scope.products) or None,
            "fences": json.dumps(fences) if fences else None, "hours": hours or None,
            "now": self.d.clock.now()})
        del d  # the stored answer only confirms; the scope is what was asked for
        return control_pb2.SetCardScopeResponse(scope=scope)

    @rpc(Role.ADMIN)
    async def RegisterStation(self, request: control_pb2.RegisterStationRequest, context: Ctx
                              ) -> control_pb2.RegisterStationResponse:
        v = Violations()
        s = request.station
        v.text("station.station_id", s.station_id, required=True, max_chars=ID_MAX_CHARS)
        v.text("station.name", s.name, required=True, max_chars=NAME_MAX_CHARS)
        if not s.HasField("location"):
            v.add("station.location", "is required", "FIELD_MISSING")
        _check_point(v, "station.location", s.location)
        v.raise_if_any()
        row = await self.d.db.fetch_one(REGISTER_STATION_SQL, (
            s.station_id, s.name, s.location.latitude, s.location.longitude))
        assert row is not None
        return control_pb2.RegisterStationResponse(station=control_pb2.Station(
            station_id=row[0], name=row[1],
            location=control_pb2.GeoPoint(latitude=row[2], longitude=row[3])))

    @rpc(Role.ADMIN)
    async def TransferPoints(self, request: control_pb2.TransferPointsRequest, context: Ctx
                             ) -> control_pb2.TransferPointsResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("from_account_id", request.from_account_id)
        v.uuid("to_account_id", request.to_account_id)
        v.amount("points", request.points, self.d.settings.max_points_redeem)
        v.raise_if_any()
        d = await self.d.db.call(TRANSFER_POINTS_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("transfer_points", request),
            "from_uid": request.from_account_id, "to_uid": request.to_account_id,
            "points": request.points, "now": self.d.clock.now()})
        return control_pb2.TransferPointsResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            from_points_balance=d["from_points_balance"], to_points_balance=d["to_points_balance"])

    @rpc(Role.ADMIN, Role.ANALYTICS)
    async def GetFleetCostReport(self, request: control_pb2.GetFleetCostReportRequest,
                                 context: Ctx) -> control_pb2.GetFleetCostReportResponse:
        v = Violations()
        parent = v.uuid("parent_account_id", request.parent_account_id)
        start = _time(v, "start_time", request)
        end = _time(v, "end_time", request)
        if start and end and not (start < end and end - start <= MAX_REPORT_SPAN):
            v.add("end_time", "must be after start_time, at most 366 days later",
                  "PERIOD_INVALID")
        rules, page = _report_shape(v, request)
        v.raise_if_any()
        assert parent and start and end
        report = await reports.fleet_costs(self.d.reads, parent, start, end, rules, page)
        s = report.summary
        return control_pb2.GetFleetCostReportResponse(
            vehicles=[_vehicle_cost(x) for x in report.vehicles],
            next_page_token="" if report.next_offset is None else str(report.next_offset),
            summary=control_pb2.FleetCostSummary(
                vehicle_count=s.vehicle_count, anomalous_vehicle_count=s.anomalous_vehicle_count,
                spend_fen=s.spend_fen, volume_ml=s.volume_ml, sale_count=s.sale_count,
                median_spend_fen=s.median_spend_fen),
            top_spenders=[_vehicle_cost(x) for x in report.top_spenders])

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def ListControlChanges(self, request: control_pb2.ListControlChangesRequest,
                                 context: Ctx) -> control_pb2.ListControlChangesResponse:
        v = Violations()
        account = v.uuid("account_id", request.account_id)
        size = v.page_size("page_size", request.page_size)
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        assert account is not None
        key = await history.account_key(self.d.reads, account)
        rows = await self.d.reads.fetch_all(CHANGES_SQL, {
            "account": key, "before": before or history.NO_TOKEN, "limit": size + 1})
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = str(rows[-1][0])
        response = control_pb2.ListControlChangesResponse(next_page_token=token)
        for _, actor, kind, card, target, details, created in rows:
            change = response.changes.add(actor_account_id=actor, kind=kind, card_id=card or "",
                                          account_id=target, details_json=details)
            change.create_time.FromMicroseconds(created)
        return response

    @rpc(Role.ADMIN)
    async def SetPrice(self, request: control_pb2.SetPriceRequest, context: Ctx
                       ) -> control_pb2.SetPriceResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.text("station_id", request.station_id, required=True, max_chars=ID_MAX_CHARS)
        v.enum("product", request.product, PRODUCTS)
        effective = v.timestamp("effective_time", request.effective_time)
        v.amount("unit_price_fen", request.unit_price_fen, MAX_PRICE_FEN)
        v.raise_if_any()
        d = await self.d.db.call(SET_PRICE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("set_price", request),
            "station_id": request.station_id, "product": request.product,
            "effective": effective, "unit_price_fen": request.unit_price_fen,
            "now": self.d.clock.now()})
        return control_pb2.SetPriceResponse(price=_price(d["price"]))

    @rpc(Role.ADMIN)
    async def ListPrices(self, request: control_pb2.ListPricesRequest, context: Ctx
                         ) -> control_pb2.ListPricesResponse:
        v = Violations()
        v.text("station_id", request.station_id, required=True, max_chars=ID_MAX_CHARS)
        if request.product:
            v.enum("product", request.product, PRODUCTS)
        v.raise_if_any()
        rows = await self.d.reads.fetch_all(LIST_PRICES_SQL, {
            "station_id": request.station_id, "product": request.product})
        return control_pb2.ListPricesResponse(prices=[_price(r[0]) for r in rows])

    @rpc(Role.ADMIN)
    async def SetVolumeLimits(self, request: control_pb2.SetVolumeLimitsRequest, context: Ctx
                              ) -> control_pb2.SetVolumeLimitsResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("actor_account_id", request.actor_account_id)
        card = v.uuid("card_id", request.card_id)
        lim = request.limits
        v.non_negative("limits.per_fill_ml", lim.per_fill_ml, MAX_VOLUME_ML)
        v.non_negative("limits.daily_ml", lim.daily_ml, MAX_VOLUME_ML)
        v.non_negative("limits.monthly_ml", lim.monthly_ml, MAX_VOLUME_ML)
        v.raise_if_any()
        d = await self.d.db.call(SET_VOLUME_LIMITS_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("set_volume_limits", request),
            "actor_uid": request.actor_account_id, "card_uid": card,
            "fill_ml": lim.per_fill_ml, "daily_ml": lim.daily_ml, "monthly_ml": lim.monthly_ml,
            "now": self.d.clock.now()})
        return control_pb2.SetVolumeLimitsResponse(limits=_volume_limits(d["limits"]))


def _volume_limits(d: dict[str, Any]) -> control_pb2.VolumeLimits:
    return control_pb2.VolumeLimits(per_fill_ml=d["per_fill_ml"], daily_ml=d["daily_ml"],
                                    monthly_ml=d["monthly_ml"])


def _price(d: dict[str, Any]) -> control_pb2.Price:
    price = control_pb2.Price(station_id=d["station_id"], product=d["product"],
                              unit_price_fen=d["unit_price_fen"], set_by=d["set_by"])
    price.effective_time.FromMicroseconds(d["effective_us"])
    return price


# The most top spenders a cost report returns (a chart's bars, not a list: lists page).
TOP_SPENDERS_MAX = 100
# The largest tank a report may state: 100 000 litres, past any road tanker.
TANK_CAPACITY_MAX_ML = 100_000_000
MINUTES_A_DAY = 24 * 60


def _report_shape(v: Violations, request: control_pb2.GetFleetCostReportRequest
                  ) -> tuple[reports.AnomalyRules, reports.ReportPage]:
    """The anomaly rules and the page a cost report request asks for."""
    v.non_negative("tank_capacity_ml", request.tank_capacity_ml, TANK_CAPACITY_MAX_ML)
    v.non_negative("top_spenders_count", request.top_spenders_count, TOP_SPENDERS_MAX)
    ws, we = request.working_hours_start_minute, request.working_hours_end_minute
    if ws or we:
        if not 0 <= ws < MINUTES_A_DAY:
            v.add("working_hours_start_minute", "must be 0-1439", "WORKING_HOURS_INVALID")
        if not 0 < we <= MINUTES_A_DAY or we == ws:
            v.add("working_hours_end_minute", "must be 1-1440 and differ from the start",
                  "WORKING_HOURS_INVALID")
    else:
        ws, we = reports.DEFAULT_WORK_START_MINUTE, reports.DEFAULT_WORK_END_MINUTE
    if request.order not in control_pb2.FleetCostOrder.values():
        v.add("order", "must be one of the defined values", "ENUM_VALUE_INVALID")
    # 0: every line (the report before paging); else a page of the usual sizes
    limit = v.page_size("page_size", request.page_size) if request.page_size else None
    offset = v.page_token("page_token", request.page_token) or 0
    rules = reports.AnomalyRules(tank_ml=request.tank_capacity_ml or reports.DEFAULT_TANK_ML,
                                 work_start_minute=ws, work_end_minute=we)
    page = reports.ReportPage(
        offset=offset, limit=limit, anomalies_only=request.anomalies_only,
        by_spend=request.order == control_pb2.FLEET_COST_ORDER_SPEND_DESCENDING,
        top_spenders=request.top_spenders_count)
    return rules, page


def _vehicle_cost(x: reports.VehicleCost) -> control_pb2.VehicleCost:
    return control_pb2.VehicleCost(
        account_id=x.account_id, label=x.label, spend_fen=x.spend_fen, volume_ml=x.volume_ml,
        sale_count=x.sale_count, baseline_spend_fen=x.baseline_spend_fen, anomaly=x.anomaly,
        max_fill_volume_ml=x.max_fill_ml,
        anomalies=[control_pb2.VehicleAnomaly.ValueType(int(a)) for a in x.anomalies])
