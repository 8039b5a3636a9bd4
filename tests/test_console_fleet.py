"""Issue 19: the fleet manager's console (车队管理).

First the parts without a browser: the forms (yuan, litres, scope and a
typed geo-fence into the core's messages), the batch top-up file and its
preview, the chart, the report's fill flags through the core, and the
lookup query against the real PostgreSQL. Then the console itself in a real browser."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from fuelcard.v1 import account_pb2, common_pb2, control_pb2, invoice_pb2
from fuelcard_console import fleet_forms, fleet_report, fleet_topup
from fuelcard_console.auth import Role
from fuelcard_console.fleet_forms import FormError
from playwright.sync_api import Browser, FilePayload, Page
from playwright.sync_api import expect as expect_page

from tests.plugins import logscan
from tests.plugins.console import LoginHelper, RunningConsole, StepUpHelper
from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn

ALLOCATED = account_pb2.FUNDING_MODE_ALLOCATED
SHARED = account_pb2.FUNDING_MODE_SHARED


# --- forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "fen"), [
    ("300", 30_000), ("125.50", 12_550), ("0.01", 1), ("1,234.5", 123_450), ("￥8", 800), (" 7.1 ", 710)])
def test_yuan_are_read_exactly_into_fen(text: str, fen: int) -> None:
    assert fleet_forms.yuan_to_fen(text, "amount") == fen


@pytest.mark.parametrize("text", ["", "-5", "1.234", "1e3", "abc", "12.", "0x10", "NaN"])
def test_bad_amounts_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(FormError) as caught:
        fleet_forms.yuan_to_fen(text, "limit_daily")
    assert caught.value.field == "limit_daily"
    assert "金额" in caught.value.message


def test_zero_is_no_cap_but_not_an_amount_to_move() -> None:
    assert fleet_forms.optional_yuan("", "x") == 0
    assert fleet_forms.optional_yuan("0", "x") == 0
    with pytest.raises(FormError, match="大于 0"):
        fleet_forms.yuan_to_fen("0.00", "amount", allow_zero=False)


def test_litres_become_millilitres() -> None:
    assert fleet_forms.optional_litres("60", "litre_fill") == 60_000
    assert fleet_forms.optional_litres("45.125", "litre_fill") == 45_125
    assert fleet_forms.optional_litres(" ", "litre_fill") == 0
    with pytest.raises(FormError) as caught:
        fleet_forms.optional_litres("1.2345", "litre_daily")
    assert caught.value.field == "litre_daily"


def test_hours_read_as_the_core_takes_them_with_wrap_past_midnight() -> None:
    windows = fleet_forms.hour_windows("07:00-19:30，22:00-06:00, 20:00-24:00, 21:00-00:00")
    assert [(w.start_minute, w.end_minute) for w in windows] == [
        (420, 1170), (1320, 360), (1200, 1440), (1260, 1440)]
    for bad in ("7-19", "25:00-26:00", "08:00-08:00", "08:61-09:00"):
        with pytest.raises(FormError) as caught:
            fleet_forms.hour_windows(bad)
        assert caught.value.field == "hours"
    assert fleet_forms.describe_hours([420, 1170, 1320, 360]) == "07:00-19:30，22:00-06:00"


def _vehicle(**fields: str) -> dict[str, str]:
    return {"label": "云A·12345", **fields}


def test_a_circle_fence_is_the_shape_set_card_scope_takes() -> None:
    form = fleet_forms.vehicle_form(_vehicle(
        fence="circle", fence_lat="25.0389", fence_lng="102.7183", fence_radius_m="5000",
        stations="KM-001, KM-002 KM-001", hours="06:00-22:00", litre_fill="60", limit_daily="800"),
        [str(common_pb2.PRODUCT_DIESEL_0)])
    scope = form.scope
    assert list(scope.station_ids) == ["KM-001", "KM-002"]
    assert list(scope.products) == [common_pb2.PRODUCT_DIESEL_0]
    assert [(w.start_minute, w.end_minute) for w in scope.hours] == [(360, 1320)]
    (fence,) = scope.geofences
    assert fence.WhichOneof("shape") == "circle"
    assert (fence.circle.center.latitude, fence.circle.center.longitude, fence.circle.radius_m) == (
        25.0389, 102.7183, 5000)
    assert form.volume == control_pb2.VolumeLimits(per_fill_ml=60_000)
    assert form.limits == control_pb2.SpendingLimits(daily_fen=80_000)
    assert form.funding_mode == ALLOCATED
    assert form.holder_name == "云A·12345"  # no driver named: the plate
    assert (form.has_limits, form.has_volume, form.has_scope) == (True, True, True)


def test_a_polygon_fence_and_its_mistakes() -> None:
    form = fleet_forms.vehicle_form(_vehicle(
        fence="polygon", fence_polygon="25.05,102.65\n25.05 102.75\n\n25.00，102.70\n",
        funding_mode="shared"), [])
    (fence,) = form.scope.geofences
    assert [(p.latitude, p.longitude) for p in fence.polygon.vertices] == [
        (25.05, 102.65), (25.05, 102.75), (25.00, 102.70)]
    assert form.funding_mode == SHARED
    assert not form.has_limits and not form.has_volume
    cases = [
        (dict(fence="polygon", fence_polygon="25,102\n26,103"), "fence_polygon"),
        (dict(fence="polygon", fence_polygon="25,102,3\n26,103\n27,104"), "fence_polygon"),
        (dict(fence="circle", fence_lat="95", fence_lng="102", fence_radius_m="10"), "fence_lat"),
        (dict(fence="circle", fence_lat="25", fence_lng="east", fence_radius_m="10"), "fence_lng"),
        (dict(fence="circle", fence_lat="25", fence_lng="102", fence_radius_m="0"), "fence_radius_m"),
        (dict(fence="circle", fence_lat="25", fence_lng="102", fence_radius_m="2.5"), "fence_radius_m"),
        (dict(fence="square"), "fence"),
        (dict(label=" "), "label"),
        (dict(funding_mode="borrowed"), "funding_mode"),
        (dict(stations="KM 001;站 1"), "stations"),
    ]
    for fields, field in cases:
        with pytest.raises(FormError) as caught:
            fleet_forms.vehicle_form(_vehicle(**fields), [])
        assert caught.value.field == field, fields
    with pytest.raises(FormError) as caught:
        fleet_forms.vehicle_form(_vehicle(), ["99"])
    assert caught.value.field == "products"
    no_fence = fleet_forms.vehicle_form(_vehicle(fence="none", fence_lat="garbage"), [])
    assert not no_fence.has_scope


def test_the_controls_in_force_fill_the_form_and_read_back_the_same() -> None:
    limits = control_pb2.SpendingLimits(per_transaction_fen=100_050, monthly_fen=800_000)
    volume = control_pb2.VolumeLimits(per_fill_ml=45_500, daily_ml=120_000)
    # as fc.cards keeps them
    fences = [{"circle": [25.04, 102.72, 5000]}, {"polygon": [[1, 2], [3, 4], [5, 6]]}]
    values = fleet_forms.prefill(limits, volume, ["KM-001", "KM-002"], fences, [360, 1320, 1380, 300])
    assert values == {
        "limit_txn": "1000.50", "limit_daily": "", "limit_monthly": "8000", "litre_fill": "45.5",
        "litre_daily": "120", "litre_monthly": "", "stations": "KM-001, KM-002",
        "hours": "06:00-22:00, 23:00-05:00", "fence": "circle", "fence_lat": "25.04",
        "fence_lng": "102.72", "fence_radius_m": "5000"}
    back = fleet_forms.controls_form(values, [str(common_pb2.PRODUCT_GASOLINE_95)])
    assert back.limits == limits and back.volume == volume
    assert list(back.scope.station_ids) == ["KM-001", "KM-002"]
    assert [(w.start_minute, w.end_minute) for w in back.scope.hours] == [(360, 1320), (1380, 300)]
    assert back.scope.geofences[0].circle.radius_m == 5000  # the first fence only
    polygon = fleet_forms.prefill(control_pb2.SpendingLimits(), control_pb2.VolumeLimits(), None,
                                  [{"polygon": [[25.05, 102.65], [25.05, 102.75], [25, 102.7]]}], None)
    assert polygon["fence"] == "polygon"
    assert polygon["fence_polygon"] == "25.05,102.65\n25.05,102.75\n25,102.7"
    assert not fleet_forms.controls_form(fleet_forms.prefill(
        control_pb2.SpendingLimits(), control_pb2.VolumeLimits(), None, None, None), []).has_scope


def test_money_is_shown_exactly() -> None:
    assert fleet_forms.fen_to_yuan(123_456_789) == "1,234,567.89"
    assert fleet_forms.fen_to_yuan(-5) == "-0.05"
    assert fleet_forms.ml_to_litres(12_345) == "12.35"


# --- the batch top-up file -----------------------------------------------------------------


A, B, C = ("0e0a6c4e-0000-4000-8000-00000000000a", "0e0a6c4e-0000-4000-8000-00000000000b",
           "0e0a6c4e-0000-4000-8000-00000000000c")
FLEET = [fleet_topup.Vehicle(A, "云A·12345", ALLOCATED), fleet_topup.Vehicle(B, "云A·D7788", ALLOCATED),
         fleet_topup.Vehicle(C, "云A·SHARE", SHARED)]


def test_a_file_in_utf8_with_a_header_or_gbk_without_one() -> None:
    utf8 = "\ufeff车牌,金额\n云A·12345,300\n\n云A·D7788, 125.50\n".encode()
    lines = fleet_topup.parse_csv(fleet_topup.decode(utf8))
    assert [(x.line_number, x.vehicle, x.amount) for x in lines] == [
        (2, "云A·12345", "300"), (4, "云A·D7788", "125.50")]
    gbk = "云A·12345\t300\r\n云A·D7788\t1.5\r\n".replace("·", "").encode("gbk")
    lines = fleet_topup.parse_csv(fleet_topup.decode(gbk))
    assert [(x.vehicle, x.amount) for x in lines] == [("云A12345", "300"), ("云AD7788", "1.5")]
    with pytest.raises(FormError, match="没有充值行"):
        fleet_topup.parse_csv("车牌,金额\n")
    with pytest.raises(FormError, match="最多 1000 行"):
        fleet_topup.parse_csv("".join(f"云A·{i},1\n" for i in range(1001)))
    with pytest.raises(FormError, match="文件太大"):
        fleet_topup.decode(b"x" * (fleet_topup.MAX_FILE_BYTES + 1))


def test_the_preview_says_what_is_wrong_with_each_line() -> None:
    text = (f"vehicle,amount\n云A·12345,300\n{B.upper()},125.50\n云A·SHARE,10\n云A·NOPE,10\n"
            f"云A·D7788,abc\n{A},1\n,5\n云A·D7788,0\n")
    pv = fleet_topup.preview(fleet_topup.parse_csv(text), FLEET)
    got = [(x.line_number, x.label, x.account_id, x.amount_fen, x.error) for x in pv.lines]
    assert got == [
        (2, "云A·12345", A, 30_000, ""),
        (3, "云A·D7788", B, 12_550, ""),
        (4, "云A·SHARE", C, 1_000, "这辆车共用车队余额，不能单独充值"),
        (5, "", "", 1_000, "车队里没有这辆车"),
        (6, "云A·D7788", B, 0, "金额格式不对：请填写元，最多两位小数，如 300 或 125.50"),
        (7, "云A·12345", A, 100, "同一辆车出现了两次"),
        (8, "", "", 500, "缺少车辆"),
        (9, "云A·D7788", B, 0, "金额必须大于 0"),
    ]
    assert not pv.ok and pv.error_count == 6
    assert pv.total_fen == 42_550  # the good lines only
    good = fleet_topup.preview(fleet_topup.parse_csv("云A·12345,300\n云A·D7788,1\n"), FLEET)
    assert good.ok and good.total_fen == 30_100
    assert fleet_topup.lookup_keys(fleet_topup.parse_csv(text)) == (
        ["云A·12345", "云A·D7788", "云A·NOPE", "云A·SHARE"], [A, B.lower()])


def test_two_vehicles_with_one_plate_must_be_named_by_id() -> None:
    twins = [*FLEET, fleet_topup.Vehicle(C.replace("c", "d"), "云A·12345", ALLOCATED)]
    pv = fleet_topup.preview(fleet_topup.parse_csv(f"云A·12345,1\n{A},2\n"), twins)
    assert [x.error for x in pv.lines] == ["有多辆车用这个车牌：请写账户编号", ""]


def test_pending_batches_are_the_uploaders_and_expire() -> None:
    store = fleet_topup.PendingBatches(ttl=dt.timedelta(minutes=30), max_batches=2)
    t0 = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    pv = fleet_topup.preview(fleet_topup.parse_csv("云A·12345,1\n"), FLEET)
    first = store.add("user-1", "fleet-1", pv, t0)
    assert store.get(first.batch_id, "user-1", t0) is first
    assert store.get(first.batch_id, "user-2", t0) is None  # another user's: not found
    # the request_id is chosen once: every confirm of this batch sends the same
    assert first.request_id.startswith("console-topup-") and len(first.request_id) <= 64
    second = store.add("user-1", "fleet-1", pv, t0)
    assert second.request_id != first.request_id
    store.add("user-1", "fleet-1", pv, t0)  # over the bound: the oldest goes
    assert store.get(first.batch_id, "user-1", t0) is None
    assert store.get(second.batch_id, "user-1", t0 + dt.timedelta(minutes=30)) is second
    assert store.get(second.batch_id, "user-1", t0 + dt.timedelta(minutes=31)) is None
    assert len(store) == 0


# --- anomaly flags and the chart -----------------------------------------------------------


HISTORY = control_pb2.VEHICLE_ANOMALY_ABOVE_HISTORY
OVER_TANK = control_pb2.VEHICLE_ANOMALY_OVER_TANK
OUTSIDE_HOURS = control_pb2.VEHICLE_ANOMALY_OUTSIDE_HOURS


def _cost(label: str, spend: int, *anomalies: control_pb2.VehicleAnomaly.ValueType
          ) -> control_pb2.VehicleCost:
    return control_pb2.VehicleCost(account_id=f"id-{label}", label=label, spend_fen=spend,
                                   volume_ml=spend, sale_count=1 if spend else 0,
                                   anomalies=list(anomalies))


def test_the_chart_has_chinese_labels_and_marks_the_flagged() -> None:
    top = [_cost("云A·12345", 25_000, HISTORY), _cost("云A·D7788", 20_000), _cost("云A·<idle>", 0)]
    svg = fleet_report.chart_svg(top, "车辆加油费用")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "Noto Sans CJK SC" in svg and "车辆加油费用" in svg
    assert svg.index("云A·12345") < svg.index("云A·D7788")  # in the core's order, biggest first
    assert "250.00 元 ⚠" in svg and "200.00 元<" in svg
    assert svg.count('fill="#c62828"') == 1  # the flagged one in red
    assert "idle" not in svg  # no spend, no bar
    assert "本期没有消费" in fleet_report.chart_svg([], "x")
    many = [_cost(f"云A·{i:05d}", 1_000 - i) for i in range(fleet_report.CHART_ROWS + 5)]
    assert fleet_report.chart_svg(many, "x").count("<rect") == fleet_report.CHART_ROWS


def test_every_anomaly_has_chinese_words() -> None:
    kinds = [k for k in control_pb2.VehicleAnomaly.values() if k]
    assert sorted(fleet_report.FLAG_TEXT_ZH) == sorted(kinds)
    assert fleet_report.flag_text(_cost("云A·1", 10, OVER_TANK, OUTSIDE_HOURS)) == [
        "单次加油量超过油箱容量", "在工作时间以外加油"]
    # a kind a newer core adds is still shown, by its number
    line = _cost("云A·1", 10)
    line.anomalies.append(control_pb2.VehicleAnomaly.ValueType(9))
    assert fleet_report.flag_text(line) == ["异常 9"]


def test_months_in_the_business_time_zone() -> None:
    start, end = fleet_report.month_bounds("2026-12")
    assert start.astimezone(dt.UTC) == dt.datetime(2026, 11, 30, 16, tzinfo=dt.UTC)
    assert end.astimezone(dt.UTC) == dt.datetime(2026, 12, 31, 16, tzinfo=dt.UTC)
    # 2026-11-30 17:00 UTC is already December in Shanghai
    assert fleet_report.previous_month(dt.datetime(2026, 11, 30, 17, tzinfo=dt.UTC)) == "2026-11"
    assert fleet_report.this_month(dt.datetime(2026, 11, 30, 17, tzinfo=dt.UTC)) == "2026-12"


# --- the console's queries against the real database -----------------------------------------


def _key(db: Conn, uid: str) -> int:
    row = db.execute("SELECT id FROM fc.accounts WHERE uid = %s::uuid", (uid,)).fetchone()
    assert row is not None
    return int(row[0])


def test_the_report_flags_big_fills_and_fills_outside_hours(server: RunningServer) -> None:
    """The fill flags on sales made through the core: a fill above the tank
    stated, a fill outside the working hours (by day and by night shift);
    a cancelled hold is no fill, and another fleet's fills are not counted."""
    fleet = cb.open_fleet(server, 1_000_000, [SHARED, SHARED], labels=["云A·00001", "云A·00002"])
    a, b = fleet.subs
    other = cb.open_fleet(server, 1_000_000, [SHARED])
    day0 = cb.local_now(server).replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)
    cb.advance_to_local(server, day0 + dt.timedelta(hours=5, minutes=59))  # before 06:00
    cb.sale(server, a, 10_000, volume_ml=12_000)
    cb.sale(server, other.subs[0], 10_000, volume_ml=250_000)  # another fleet's: not counted
    cb.advance_to_local(server, day0 + dt.timedelta(hours=12))
    cb.sale(server, a, 90_000, volume_ml=210_000)  # above a 200-litre tank
    cb.sale(server, b, 5_000, volume_ml=6_000)
    builders.cancel(server, cb.approved(server, b, 50_000).hold_id)  # cancelled: not a fill
    cb.advance_to_local(server, day0 + dt.timedelta(hours=22))  # 22:00: outside 06:00-22:00
    cb.sale(server, b, 5_000, volume_ml=6_000)

    def report(**shape: Any) -> dict[str, tuple[int, list[int]]]:
        start, end = cb.ts(day0), cb.ts(day0 + dt.timedelta(days=1))
        got = cb.control(server).GetFleetCostReport(control_pb2.GetFleetCostReportRequest(
            parent_account_id=fleet.parent_id, start_time=start, end_time=end, **shape))
        return {x.account_id: (x.max_fill_volume_ml, list(x.anomalies)) for x in got.vehicles}

    # the defaults: a 200-litre tank, 06:00-22:00
    assert report() == {a.account_id: (210_000, [OVER_TANK, OUTSIDE_HOURS]),
                        b.account_id: (6_000, [OUTSIDE_HOURS])}
    # a night shift (22:00-06:00) and a 300-litre tank: the noon fills are the ones outside
    assert report(tank_capacity_ml=300_000, working_hours_start_minute=1320,
                  working_hours_end_minute=360) == {a.account_id: (210_000, [OUTSIDE_HOURS]),
                                                    b.account_id: (6_000, [OUTSIDE_HOURS])}
    # 05:59-22:01: every fill inside
    assert report(working_hours_start_minute=359, working_hours_end_minute=1321) == {
        a.account_id: (210_000, [OVER_TANK]), b.account_id: (6_000, [])}


def test_vehicle_lookup_finds_the_fleets_own_by_plate_or_id(
        server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 0, [ALLOCATED, SHARED], labels=["云A·00001", "云A·00002"])
    stranger = cb.open_fleet(server, 0, [ALLOCATED], labels=["云A·00001"])
    lines = fleet_topup.parse_csv(f"云A·00001,1\n{fleet.subs[1].account_id},2\n"
                                  f"{stranger.subs[0].account_id},3\n")
    labels, ids = fleet_topup.lookup_keys(lines)
    rows = db.execute(fleet_topup.VEHICLES_SQL, {"parent": _key(db, fleet.parent_id), "labels": labels,
                                                 "ids": ids}).fetchall()
    found = [fleet_topup.Vehicle(r[0], r[1], r[2]) for r in rows]
    assert sorted(v.account_id for v in found) == sorted(s.account_id for s in fleet.subs)
    pv = fleet_topup.preview(lines, found)
    assert [x.error for x in pv.lines] == ["", "这辆车共用车队余额，不能单独充值", "车队里没有这辆车"]


# --- the console in a real browser ---------------------------------------------------------

IN_STATION, OUT_STATION = "KM-FENCE-IN", "KM-FENCE-OUT"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "console" / "fleet_manager.png"
BUYER_TAXPAYER_ID = "91530100MA6K123456"


def _fleet_parent(server: RunningServer, balance_fen: int) -> str:
    parent = cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE, name="昆明顺达物流有限公司")
    if balance_fen:
        builders.recharge(server, parent.account_id, balance_fen)
    return parent.account_id


def _post_price(server: RunningServer, station: str, fen_per_litre: int) -> None:
    cb.control(server).SetPrice(control_pb2.SetPriceRequest(
        request_id=builders.rid("price"), station_id=station, product=common_pb2.PRODUCT_GASOLINE_92,
        effective_time=cb.ts(server.clock.now() - dt.timedelta(hours=1)), unit_price_fen=fen_per_litre))


def _upload(page: Page, content: bytes) -> None:
    page.set_input_files("input[name=file]", files=FilePayload(name="topup.csv", mimeType="text/csv",
                                                               buffer=content))


def _post_again(page: Page) -> tuple[int, str]:
    """POST to the page's own path once more, as a double click or a resent
    form would (with the session's CSRF token, from the page): the status of
    the answer and the path it ended on (redirects followed, as a browser does)."""
    got: list[Any] = page.evaluate("""async () => {
        const token = document.querySelector('input[name=csrf_token]').value;
        const r = await fetch(location.pathname,
                              {method: 'POST', body: new URLSearchParams({csrf_token: token})});
        return [r.status, new URL(r.url).pathname]; }""")
    return int(got[0]), str(got[1])


def test_fleet_manager_issues_a_fenced_card_and_invoices_the_month(
        console: RunningConsole, page: Page, login: LoginHelper, db: Conn) -> None:
    server = console.server
    fleet = _fleet_parent(server, 500_000)
    cb.register_station(server, IN_STATION, 25.0400, 102.7200, name="昆明北京路站")
    cb.register_station(server, OUT_STATION, 25.5000, 103.5000, name="曲靖站")  # ~90 km away
    for station in (IN_STATION, OUT_STATION):
        _post_price(server, station, 800)  # 8.00 yuan a litre
    name, password, _ = console.make_user(Role.FLEET_MANAGER, account_uid=fleet)
    login(page, name, password)
    assert page.url.endswith("/console/fleet/")
    expect_page(page.locator("#available")).to_have_text("5,000.00")

    # Issue a vehicle card: a SHARED vehicle (it spends the fleet's balance), 50 litres a
    # fill at most, a 1,000-yuan cap a sale, and a 5 km circle around the in-fence station.
    page.click("text=开车辆卡")
    page.fill("input[name=label]", "云A·F0001")
    page.select_option("select[name=funding_mode]", "shared")
    page.fill("input[name=limit_txn]", "1000")
    page.fill("input[name=litre_fill]", "50")
    page.check("input[name=fence][value=circle]")
    page.fill("input[name=fence_lat]", "25.0400")
    page.fill("input[name=fence_lng]", "102.7200")
    page.fill("input[name=fence_radius_m]", "5000")
    with page.expect_navigation():
        page.click("#vehicle-form button[type=submit]")
    expect_page(page.locator("#issued-controls")).to_contain_text("单次 50.00 升")
    expect_page(page.locator("#issued-controls")).to_contain_text("半径 5000 米")
    number = page.locator("#card-number").inner_text().strip()
    logscan.register("card number", number)
    card_id = page.locator("#card-id").inner_text().strip()
    sub = db.execute("SELECT a.uid::text FROM fc.cards c JOIN fc.accounts a ON a.id = c.account_id"
                     " WHERE c.uid = %s::uuid", (card_id,)).fetchone()
    assert sub is not None
    card = builders.FundedCard(sub[0], card_id, number)

    # At the pump: outside the fence declined; inside, more than 50 litres declined; inside
    # within the caps approved and confirmed.
    assert cb.declined(server, card, 30_000, station=OUT_STATION) == \
        common_pb2.DECLINE_REASON_OUTSIDE_GEOFENCE
    assert cb.declined(server, card, 40_001, station=IN_STATION) == \
        common_pb2.DECLINE_REASON_LIMIT_VOLUME_PER_FILL
    hold = cb.approved(server, card, 30_000, station=IN_STATION)
    assert builders.confirm(server, hold.hold_id, 30_000, volume_ml=37_500).decision == cb.APPROVED

    # Two more vehicles, so that the picture of the main page shows a fleet: one with money
    # of its own (a batch top-up), one with its card blocked.
    truck = cb.open_account(server, parent=fleet, mode=cb.ALLOCATED, label="云A·F0002")
    cb.issue_card(server, truck.account_id)
    cb.batch_top_up(server, fleet, [(truck.account_id, 80_000)])
    van = cb.open_account(server, parent=fleet, mode=cb.SHARED, label="云A·F0003")
    server.accounts.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
        request_id=builders.rid("block"), card_id=cb.issue_card(server, van.account_id).card_id,
        status=account_pb2.CARD_STATUS_BLOCKED))

    # The main page lists the vehicle with its caps and scope; its picture for the docs.
    page.goto("/console/fleet/")
    row = page.locator("#vehicles tr", has_text="云A·F0001")
    expect_page(row).to_contain_text("1,000.00 / 不限 / 不限")
    expect_page(row).to_contain_text("50.00 / 不限 / 不限")
    expect_page(row).to_contain_text("电子围栏：1 个")
    expect_page(page.locator("#available")).to_have_text("3,900.00")
    expect_page(page.locator("#vehicles tr", has_text="云A·F0002")).to_contain_text("800.00")
    expect_page(page.locator("#vehicles tr", has_text="云A·F0003")).to_contain_text("已暂停")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    # Unblock the blocked card from the list.
    with page.expect_navigation():
        page.locator("#vehicles tr", has_text="云A·F0003").locator("button", has_text="恢复").click()
    expect_page(page.locator("#vehicles tr", has_text="云A·F0003")).to_contain_text("正常")

    # Change the card's controls: the form shows what is in force; 30 litres a fill now.
    with page.expect_navigation():
        page.locator("#vehicles tr", has_text="云A·F0001").locator("a.edit").click()
    controls = page.locator("#controls-form")
    expect_page(controls.locator("input[name=litre_fill]")).to_have_value("50")
    expect_page(controls.locator("input[name=limit_txn]")).to_have_value("1000")
    expect_page(controls.locator("input[name=fence_radius_m]")).to_have_value("5000")
    controls.locator("input[name=litre_fill]").fill("30")
    with page.expect_navigation():
        controls.locator("button[type=submit]").click()
    expect_page(page.locator("#form-notice")).to_contain_text("已保存")
    expect_page(page.locator("#controls-form input[name=litre_fill]")).to_have_value("30")
    # 37.5 litres: over the new cap; the fence is still in force.
    assert cb.declined(server, card, 30_000, station=IN_STATION) == \
        common_pb2.DECLINE_REASON_LIMIT_VOLUME_PER_FILL
    assert cb.declined(server, card, 20_000, station=OUT_STATION) == \
        common_pb2.DECLINE_REASON_OUTSIDE_GEOFENCE

    # The cost report shows the sale, with its chart.
    page.click("text=费用报表")
    line = page.locator("#report-lines tr", has_text="云A·F0001")
    expect_page(line).to_contain_text("300.00")
    expect_page(line).to_contain_text("37.50")
    expect_page(page.locator("#report-chart svg")).to_contain_text("云A·F0001")
    expect_page(page.locator("#report-total")).to_have_text("300.00")
    expect_page(page.locator("#flagged-count")).to_have_text("0")
    # With a 30-litre tank stated, the 37.5-litre fill is flagged, and the chart marks it.
    page.fill("input[name=tank_l]", "30")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    expect_page(page.locator("#flagged-count")).to_have_text("1")
    expect_page(page.locator("#report-lines tr.flagged")).to_contain_text("单次加油量超过油箱容量")
    expect_page(page.locator("#report-chart svg rect[fill='#c62828']")).to_have_count(1)

    # December: November can be invoiced. Six days on, the session has expired: log in again.
    cb.advance_to_local(server, dt.datetime(2026, 12, 1, 9, 0))
    login(page, name, password)
    page.goto("/console/fleet/invoices")
    form = page.locator("#consumption-form")
    expect_page(form.locator("input[name=month]")).to_have_value("2026-11")
    form.locator("select[name=type]").select_option("special")
    form.locator("input[name=buyer_name]").fill("昆明顺达物流有限公司")
    form.locator("input[name=taxpayer_id]").fill(BUYER_TAXPAYER_ID)
    with page.expect_navigation():
        form.locator("button[type=submit]").click()
    expect_page(page.locator("#invoice-notice")).to_contain_text("发票申请已提交")
    invoice_row = page.locator("#invoices tbody tr").first
    expect_page(invoice_row).to_contain_text("消费（汇总）")
    expect_page(invoice_row).to_contain_text("增值税专用发票")
    expect_page(invoice_row).to_contain_text("300.00")

    # The same money cannot be invoiced again at recharge: the core refuses, in Chinese.
    recharge = page.locator("#recharges .recharge-form").first
    recharge.locator("input[name=buyer_name]").fill("昆明顺达物流有限公司")
    with page.expect_navigation():
        recharge.locator("button[type=submit]").click()
    expect_page(page.locator("#invoice-error")).to_contain_text("同一笔钱不能在充值时再开一次发票")
    kinds = db.execute("SELECT i.kind FROM fc.invoices i JOIN fc.accounts a ON a.id = i.account_id"
                       " WHERE a.uid = %s::uuid", (fleet,)).fetchall()
    assert kinds == [(invoice_pb2.INVOICE_KIND_CONSUMPTION,)]

    # The invoice: the fuel line in litres at 13 %, and its list by vehicle.
    with page.expect_navigation():
        page.locator("#invoices tbody tr a").first.click()
    item = page.locator("#invoice-items tbody tr").first
    expect_page(item).to_contain_text("*汽油*92#")
    expect_page(item).to_contain_text("升")
    expect_page(item).to_contain_text("37.500")
    expect_page(item).to_contain_text("13%")
    expect_page(page.locator("#invoice-list")).to_contain_text("云A·F0001")

    # The statement of November, and its CSV.
    page.goto("/console/fleet/statements?month=2026-11")
    expect_page(page.locator("#statement-lines")).to_contain_text("云A·F0001")
    for kind, magic in (("csv", "\ufeff".encode()), ("pdf", b"%PDF")):
        with page.expect_download() as download:
            page.click(f"#statement-{kind}")
        assert download.value.suggested_filename == f"statement-2026-11.{kind}"
        saved = download.value.path()
        assert Path(saved).read_bytes().startswith(magic)


def test_batch_top_up_preview_then_confirm_with_step_up(
        console: RunningConsole, page: Page, login: LoginHelper, step_up: StepUpHelper, db: Conn) -> None:
    server = console.server
    fleet = cb.open_fleet(server, 100_000, [ALLOCATED, ALLOCATED, SHARED],
                          labels=["云A·T0001", "云A·T0002", "云A·T0003"])
    a, b, shared = fleet.subs
    name, password, secret = console.make_user(Role.FLEET_MANAGER, account_uid=fleet.parent_id)
    login(page, name, password)

    # A file with a mistake. The preview is behind the TOTP step-up; it says which line is
    # wrong, and there is nothing to confirm.
    page.goto("/console/fleet/topup")
    _upload(page, "车牌,金额\n云A·T0001,300\n云A·T0003,50\n".encode())
    with page.expect_navigation():
        page.click("main form button[type=submit]")
    step_up(page, secret)
    expect_page(page.locator("#topup-lines")).to_contain_text("这辆车共用车队余额，不能单独充值")
    expect_page(page.locator("#topup-confirm")).to_have_count(0)
    bad_preview = page.url.removeprefix(console.base_url)
    assert bad_preview.startswith("/console/fleet/topup/")
    assert _post_again(page) == (400, bad_preview)  # forcing a confirm moves nothing either
    assert cb.balance_of(server, a.account_id) == (0, 0)

    # A good file (GBK, as a spreadsheet saves it): previewed, then confirmed.
    page.goto("/console/fleet/topup")
    _upload(page, "云A·T0001,300\r\n云A·T0002,125.50\r\n".encode("gb18030"))
    with page.expect_navigation():
        page.click("main form button[type=submit]")
    expect_page(page.locator("#topup-total")).to_have_text("425.50")
    expect_page(page.locator("#topup-lines tbody tr.ok")).to_have_count(2)
    preview_url = page.url
    # Six minutes later the step-up has lapsed: confirming asks for it again first, and
    # nothing moves until it is done.
    console.advance(dt.timedelta(minutes=6))
    with page.expect_navigation():
        page.click("#topup-confirm button")
    assert page.url.split("?")[0] == console.url("/console/step-up")
    assert cb.balance_of(server, a.account_id) == (0, 0)  # the click moved nothing
    step_up(page, secret)
    assert page.url == preview_url
    with page.expect_navigation():
        page.click("#topup-confirm button")
    expect_page(page.locator("#topup-result")).to_contain_text("充值成功：共 425.50 元")
    assert cb.balance_of(server, a.account_id) == (30_000, 0)
    assert cb.balance_of(server, b.account_id) == (12_550, 0)
    assert cb.balance_of(server, fleet.parent_id) == (100_000 - 42_550, 0)
    allocations = "SELECT count(*) FROM fc.journal WHERE kind = 5"
    assert db.execute(allocations).fetchone() == (2,)
    # A double submit is the same request_id: the core answers it again, nothing moves twice.
    preview_path = preview_url.removeprefix(console.base_url)
    assert _post_again(page) == (200, preview_path)  # the preview with the first answer again
    assert cb.balance_of(server, a.account_id) == (30_000, 0)
    assert cb.balance_of(server, fleet.parent_id) == (100_000 - 42_550, 0)
    assert db.execute(allocations).fetchone() == (2,)
    assert cb.balance_of(server, shared.account_id) == (0, 0)
    audited = db.execute("SELECT count(*) FROM fc.audit_log WHERE method = '/fuelcard.console/fleet.TopUp'"
                         " AND outcome = 'OK'").fetchone()
    assert audited == (2,)


def test_a_reviewer_cannot_top_up_a_fleet(
        console: RunningConsole, browser: Browser, page: Page, login: LoginHelper,
        step_up: StepUpHelper, db: Conn) -> None:
    server = console.server
    fleet = cb.open_fleet(server, 100_000, [ALLOCATED], labels=["云A·R0001"])
    vehicle = fleet.subs[0]
    # The fleet manager previews a batch (not confirmed).
    manager, manager_password, manager_secret = console.make_user(Role.FLEET_MANAGER,
                                                                  account_uid=fleet.parent_id)
    login(page, manager, manager_password)
    page.goto("/console/fleet/topup")
    _upload(page, "云A·R0001,500\n".encode())
    with page.expect_navigation():
        page.click("main form button[type=submit]")
    step_up(page, manager_secret)
    batch_path = page.url.removeprefix(console.base_url)
    assert batch_path.startswith("/console/fleet/topup/")

    # A reviewer, even stepped up, gets 403 on every fleet page and on the confirm itself.
    other = browser.new_context(base_url=console.base_url, locale="zh-CN")
    try:
        reviewer_page = other.new_page()
        reviewer, reviewer_password, reviewer_secret = console.make_user(Role.REVIEWER)
        login(reviewer_page, reviewer, reviewer_password)
        reviewer_page.goto("/console/step-up?next=/console/")
        step_up(reviewer_page, reviewer_secret)
        for path in ("/console/fleet/", "/console/fleet/topup", batch_path):
            response = reviewer_page.goto(path)
            assert response is not None and response.status == 403, path
        expect_page(reviewer_page.locator("main")).to_contain_text("无权")
        assert _post_again(reviewer_page) == (403, batch_path)  # POST to the batch's confirm
    finally:
        other.close()
    assert cb.balance_of(server, vehicle.account_id) == (0, 0)
    assert cb.balance_of(server, fleet.parent_id) == (100_000, 0)
    assert db.execute("SELECT count(*) FROM fc.journal WHERE kind = 5").fetchone() == (0,)
    refused = db.execute("SELECT count(*) FROM fc.audit_log WHERE method = '/fuelcard.console/Forbidden'"
                         " AND actor LIKE 'console:reviewer:%' AND outcome = 'PERMISSION_DENIED POST'"
                         ).fetchone()
    assert refused == (1,)


def test_lists_are_paged(console: RunningConsole, page: Page, login: LoginHelper) -> None:
    server = console.server
    fleet = _fleet_parent(server, 0)
    count = fleet_report.CHART_ROWS + 31  # 51: over a report page, three vehicle pages
    for i in range(count):
        sub = cb.open_account(server, parent=fleet, mode=cb.SHARED, label=f"云A·P{i:04d}")
        cb.issue_card(server, sub.account_id)
    name, password, _ = console.make_user(Role.FLEET_MANAGER, account_uid=fleet)
    login(page, name, password)
    seen: list[str] = []
    for size in (20, 20, 11):
        plates = page.locator("#vehicles td.plate").all_inner_texts()
        assert len(plates) == size
        seen += plates
        next_link = page.locator("a[rel=next]")
        if size == 11:
            expect_page(next_link).to_have_count(0)
        else:
            with page.expect_navigation():
                next_link.click()
    assert seen == [f"云A·P{i:04d}" for i in range(count)]  # each once, oldest first

    page.goto("/console/fleet/report")
    expect_page(page.locator("#report-lines tbody tr")).to_have_count(50)
    with page.expect_navigation():
        page.click("a[rel=next]")
    expect_page(page.locator("#report-lines tbody tr")).to_have_count(1)
    expect_page(page.locator("#report-chart svg")).to_contain_text("本期没有消费")
    with page.expect_navigation():
        page.locator("p.pager a", has_text="首页").click()
    expect_page(page.locator("#report-lines tbody tr")).to_have_count(50)
    expect_page(page.locator("p.pager a", has_text="首页")).to_have_count(0)
    # A bad period is refused on the page, naming what is wrong.
    response = page.goto("/console/fleet/report?start=2026-11-20&end=2026-11-01")
    assert response is not None and response.status == 400
    expect_page(page.locator("main .error")).to_contain_text("结束日期不能早于开始日期")

    # The statement of the month: 52 lines (the fleet's own and 51 vehicles), 50 a page, each
    # page with the whole month's totals.
    builders.recharge(server, fleet, 12_345)
    page.goto("/console/fleet/statements?month=2026-11")
    rows = page.locator("#statement-lines tbody tr")
    expect_page(rows).to_have_count(50)
    expect_page(rows.first).to_contain_text("车队主账户")
    expect_page(page.locator("#statement-closing")).to_have_text("123.45")
    expect_page(page.locator("a[rel=prev]")).to_have_count(0)
    with page.expect_navigation():
        page.click("a[rel=next]")
    expect_page(rows).to_have_count(2)
    expect_page(rows.last).to_contain_text(f"云A·P{count - 1:04d}")
    expect_page(page.locator("#statement-closing")).to_have_text("123.45")
    expect_page(page.locator("a[rel=next]")).to_have_count(0)
    with page.expect_navigation():
        page.click("a[rel=prev]")
    expect_page(rows).to_have_count(50)
    expect_page(rows.first).to_contain_text("车队主账户")
