"""Issue 19: the fleet manager's console (车队管理).

First the parts without a browser: the forms (yuan, litres, scope and a
typed geo-fence into the core's messages), the batch top-up file and its
preview, the anomaly flags and the chart, and the report and lookup queries
against the real PostgreSQL. Then the console itself in a real browser."""

from __future__ import annotations

import datetime as dt

import pytest
from fuelcard.v1 import account_pb2, common_pb2, control_pb2
from fuelcard_console import fleet_forms, fleet_report, fleet_topup
from fuelcard_console.fleet_forms import FormError

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


def _cost(label: str, spend: int, anomaly: bool = False) -> control_pb2.VehicleCost:
    return control_pb2.VehicleCost(account_id=f"id-{label}", label=label, spend_fen=spend,
                                   volume_ml=spend, sale_count=1 if spend else 0, anomaly=anomaly)


def test_each_flag_and_only_it() -> None:
    costs = [_cost("云A·1", 10_000), _cost("云A·2", 12_000), _cost("云A·3", 29_999),
             _cost("云A·4", 30_000), _cost("云A·5", 0), _cost("云A·6", 9_000, anomaly=True)]
    # the median of those that spent: 10_000, 12_000, 29_999, 30_000, 9_000 -> 12_000
    assert fleet_report.fleet_median([c.spend_fen for c in costs]) == 12_000
    fills = {"id-云A·1": fleet_report.Fills(80_000, 1, 0), "id-云A·2": fleet_report.Fills(40_000, 0, 2)}
    lines = {x.label: x.flags for x in fleet_report.flag(costs, fills)}
    assert lines == {"云A·1": ("OVER_TANK",), "云A·2": ("OUTSIDE_HOURS",), "云A·3": (),
                     "云A·4": (), "云A·5": (), "云A·6": ("HISTORY",)}
    # three that spent: 10_000, 12_000 and 36_000 (the median 12_000, three times it reached)
    lines = {x.label: x.flags for x in fleet_report.flag([*costs[:2], _cost("云A·7", 36_000)], {})}
    assert lines == {"云A·1": (), "云A·2": (), "云A·7": ("FLEET_MEDIAN",)}
    lines = {x.label: x.flags for x in fleet_report.flag([*costs[:2], _cost("云A·7", 35_999)], {})}
    assert lines["云A·7"] == ()
    assert fleet_report.fleet_median([0, 0]) == 0
    assert all(not x.flags for x in fleet_report.flag([_cost("云A·1", 0)], {}))


def test_the_chart_has_chinese_labels_and_marks_the_flagged() -> None:
    lines = fleet_report.flag([_cost("云A·12345", 25_000, anomaly=True), _cost("云A·D7788", 20_000),
                               _cost("云A·<idle>", 0)], {})
    svg = fleet_report.chart_svg(lines, "车辆加油费用")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "Noto Sans CJK SC" in svg and "车辆加油费用" in svg
    assert svg.index("云A·12345") < svg.index("云A·D7788")  # by spend, biggest first
    assert "250.00 元 ⚠" in svg and "200.00 元<" in svg
    assert svg.count('fill="#c62828"') == 1  # the flagged one in red
    assert "idle" not in svg  # no spend, no bar
    assert "本期没有消费" in fleet_report.chart_svg([], "x")


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


def test_fills_query_counts_big_fills_and_fills_outside_hours(
        server: RunningServer, db: Conn) -> None:
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
    start, end = day0, day0 + dt.timedelta(days=1)
    params = {"parent": _key(db, fleet.parent_id), "start": start, "end": end, "tank_ml": 200_000,
              "work_start": 360, "work_end": 1320}
    rows = {r[0]: r[1:] for r in db.execute(fleet_report.FILLS_SQL, params).fetchall()}
    assert rows == {a.account_id: (210_000, 1, 1), b.account_id: (6_000, 0, 1)}
    # a night shift (22:00-06:00): the noon fills are the ones outside it
    night = {r[0]: r[3] for r in db.execute(fleet_report.FILLS_SQL, {
        **params, "work_start": 1320, "work_end": 360}).fetchall()}
    assert night == {a.account_id: 1, b.account_id: 1}


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
