"""Issue 4, scope of use (使用范围): which stations, which products, which
areas (电子围栏, geo-fences as circles and polygons checked against the
station's registered location) and which local hours a card may buy in; who
may set it. Everything through gRPC against the real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import grpc
from fuelcard.v1 import common_pb2, control_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.builders import FundedCard
from tests.support.ledger_asserts import Conn, count, expect

PD = grpc.StatusCode.PERMISSION_DENIED
IA = grpc.StatusCode.INVALID_ARGUMENT
STATION = common_pb2.DECLINE_REASON_STATION_NOT_ALLOWED
PRODUCT = common_pb2.DECLINE_REASON_PRODUCT_NOT_ALLOWED
FENCE = common_pb2.DECLINE_REASON_OUTSIDE_GEOFENCE
HOURS = common_pb2.DECLINE_REASON_OUTSIDE_HOURS
DIESEL = common_pb2.PRODUCT_DIESEL_0

# Kunming (昆明), Yunnan: the fleet's home. 1 degree of latitude is ~111.2 km.
KUNMING = (25.04, 102.71)
KM_DEGREE_LAT = 111.195


def _vehicle(server: RunningServer) -> tuple[str, FundedCard]:
    fleet = cb.open_fleet(server, 1_000_000, [cb.SHARED])
    return fleet.parent_id, fleet.subs[0]


def _point(lat: float, lon: float) -> control_pb2.GeoPoint:
    return control_pb2.GeoPoint(latitude=lat, longitude=lon)


def _circle(lat: float, lon: float, radius_m: int) -> control_pb2.GeoFence:
    return control_pb2.GeoFence(circle=control_pb2.GeoCircle(center=_point(lat, lon),
                                                             radius_m=radius_m))


def _polygon(*vertices: tuple[float, float]) -> control_pb2.GeoFence:
    return control_pb2.GeoFence(polygon=control_pb2.GeoPolygon(
        vertices=[_point(lat, lon) for lat, lon in vertices]))


def _window(start: str, end: str) -> control_pb2.HourWindow:
    def minute(hhmm: str) -> int:
        h, m = hhmm.split(":")
        return int(h) * 60 + int(m)
    return control_pb2.HourWindow(start_minute=minute(start), end_minute=minute(end))


def test_station_allow_list(server: RunningServer, db: Conn) -> None:
    parent, card = _vehicle(server)
    answer = cb.set_scope(server, parent, card.card_id, station_ids=["KM-001", "KM-002"])
    assert list(answer.scope.station_ids) == ["KM-001", "KM-002"]

    assert cb.declined(server, card, 10_000, station="KM-003") == STATION
    assert cb.declined(server, card, 10_000, station="BJ-001") == STATION
    # A decline reserves nothing.
    assert count(db, "holds") == 0
    assert cb.balance_of(server, parent) == (1_000_000, 0)
    assert cb.get_limits(server, card=card.card_id).used_today_fen == 0
    cb.approved(server, card, 10_000, station="KM-001")
    cb.approved(server, card, 10_000, station="KM-002")

    # The scope is replaced as a whole; an empty one restricts nothing.
    cb.set_scope(server, parent, card.card_id, station_ids=["KM-003"])
    assert cb.declined(server, card, 10_000, station="KM-001") == STATION
    cb.approved(server, card, 10_000, station="KM-003")
    cb.set_scope(server, parent, card.card_id)
    cb.approved(server, card, 10_000, station="BJ-001")
    cb.assert_verified(server)


def test_product_allow_list(server: RunningServer) -> None:
    parent, truck = _vehicle(server)
    cb.set_scope(server, parent, truck.card_id,
                 products=[DIESEL, common_pb2.PRODUCT_DIESEL_MINUS_10])
    for product in (common_pb2.PRODUCT_GASOLINE_92, common_pb2.PRODUCT_GASOLINE_95,
                    common_pb2.PRODUCT_GASOLINE_98, common_pb2.PRODUCT_SHOP):
        assert cb.declined(server, truck, 10_000, product=product) == PRODUCT
    hold = cb.approved(server, truck, 10_000, product=DIESEL)
    assert hold.product == DIESEL
    cb.approved(server, truck, 10_000, product=common_pb2.PRODUCT_DIESEL_MINUS_10)
    # Another card of the same fleet is not restricted by this one's scope.
    other = cb.issue_card(server, truck.account_id)
    cb.approved(server, other, 10_000, product=common_pb2.PRODUCT_GASOLINE_95)
    expect(lambda: cb.set_scope(server, parent, truck.card_id, products=[99]), IA,
           field="scope.products[0]")
    cb.assert_verified(server)


def test_circle_geofence_around_kunming(server: RunningServer) -> None:
    parent, card = _vehicle(server)
    lat, lon = KUNMING
    registered = cb.register_station(server, "KM-001", 25.0389, 102.7183, "昆明北京路加油站")
    assert (registered.station_id, registered.name) == ("KM-001", "昆明北京路加油站")
    assert (registered.location.latitude, registered.location.longitude) == (25.0389, 102.7183)
    # Due north of the centre, just inside and just outside 50 km.
    cb.register_station(server, "KM-N49", lat + 49.5 / KM_DEGREE_LAT, lon)
    cb.register_station(server, "KM-N51", lat + 50.5 / KM_DEGREE_LAT, lon)
    cb.register_station(server, "QJ-001", 25.49, 103.80)     # Qujing, ~120 km east
    cb.register_station(server, "BJ-001", 39.9042, 116.4074)  # Beijing
    cb.set_scope(server, parent, card.card_id, geofences=[_circle(lat, lon, 50_000)])

    cb.approved(server, card, 10_000, station="KM-001")
    cb.approved(server, card, 10_000, station="KM-N49")
    assert cb.declined(server, card, 10_000, station="KM-N51") == FENCE
    assert cb.declined(server, card, 10_000, station="QJ-001") == FENCE
    assert cb.declined(server, card, 10_000, station="BJ-001") == FENCE
    # A station the network cannot place is outside every fence.
    assert cb.declined(server, card, 10_000, station="KM-999") == FENCE

    # Registering again moves a station: KM-001 "moves" to Beijing.
    cb.register_station(server, "KM-001", 39.9042, 116.4074)
    assert cb.declined(server, card, 10_000, station="KM-001") == FENCE
    # Several fences: inside any one is enough.
    cb.set_scope(server, parent, card.card_id,
                 geofences=[_circle(lat, lon, 50_000), _circle(39.9042, 116.4074, 30_000)])
    cb.approved(server, card, 10_000, station="BJ-001")
    cb.approved(server, card, 10_000, station="KM-N49")
    assert cb.declined(server, card, 10_000, station="QJ-001") == FENCE
    cb.assert_verified(server)


def test_polygon_geofence_including_a_concave_one(server: RunningServer) -> None:
    parent, card = _vehicle(server)
    cb.register_station(server, "KM-001", 25.0389, 102.7183)
    cb.register_station(server, "QJ-001", 25.49, 103.80)
    cb.register_station(server, "BJ-001", 39.9042, 116.4074)
    # A rectangle around Kunming's main urban area.
    city = _polygon((24.85, 102.55), (24.85, 102.95), (25.25, 102.95), (25.25, 102.55))
    cb.set_scope(server, parent, card.card_id, geofences=[city])
    cb.approved(server, card, 10_000, station="KM-001")
    assert cb.declined(server, card, 10_000, station="QJ-001") == FENCE
    assert cb.declined(server, card, 10_000, station="BJ-001") == FENCE

    # An L shape: the notch between its legs is outside although it lies
    # within the bounding box.
    cb.register_station(server, "KM-SOUTH", 24.90, 102.90)
    cb.register_station(server, "KM-WEST", 25.20, 102.60)
    cb.register_station(server, "KM-NOTCH", 25.20, 102.90)
    ell = _polygon((24.80, 102.50), (24.80, 103.00), (25.00, 103.00), (25.00, 102.70),
                   (25.30, 102.70), (25.30, 102.50))
    cb.set_scope(server, parent, card.card_id, geofences=[ell])
    cb.approved(server, card, 10_000, station="KM-SOUTH")
    cb.approved(server, card, 10_000, station="KM-WEST")
    assert cb.declined(server, card, 10_000, station="KM-NOTCH") == FENCE
    assert cb.declined(server, card, 10_000, station="KM-001") == FENCE  # 25.04N 102.72E: the notch
    cb.assert_verified(server)


def test_hours_including_a_window_past_midnight(server: RunningServer) -> None:
    parent, card = _vehicle(server)
    # Night deliveries only: 22:00-06:00 Shanghai time. It is 16:00 there now.
    cb.set_scope(server, parent, card.card_id, hours=[_window("22:00", "06:00")])
    assert cb.declined(server, card, 10_000) == HOURS
    cb.advance_to_local(server, dt.datetime(2026, 11, 25, 21, 59))
    assert cb.declined(server, card, 10_000) == HOURS
    cb.advance_to_local(server, dt.datetime(2026, 11, 25, 22, 0))
    builders.cancel(server, cb.approved(server, card, 10_000).hold_id)
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 5, 59))
    builders.cancel(server, cb.approved(server, card, 10_000).hold_id)
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 6, 0))
    assert cb.declined(server, card, 10_000) == HOURS

    # Two windows (any one), one of them running to the end of the day.
    cb.set_scope(server, parent, card.card_id,
                 hours=[_window("07:00", "09:00"), _window("20:00", "24:00")])
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 8, 30))
    builders.cancel(server, cb.approved(server, card, 10_000).hold_id)
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 9, 0))
    assert cb.declined(server, card, 10_000) == HOURS
    cb.advance_to_local(server, dt.datetime(2026, 11, 26, 23, 59))
    builders.cancel(server, cb.approved(server, card, 10_000).hold_id)
    cb.advance_to_local(server, dt.datetime(2026, 11, 27, 0, 0))
    assert cb.declined(server, card, 10_000) == HOURS

    expect(lambda: cb.set_scope(server, parent, card.card_id, hours=[_window("08:00", "08:00")]),
           IA, "HOURS_INVALID", field="scope.hours[0]")
    cb.assert_verified(server)


def test_scope_rules_combine_in_a_fixed_order(server: RunningServer) -> None:
    parent, card = _vehicle(server)
    cb.register_station(server, "KM-001", 25.0389, 102.7183)
    cb.register_station(server, "BJ-001", 39.9042, 116.4074)
    cb.set_limits(server, parent, card=card.card_id, txn=5_000)
    cb.set_scope(server, parent, card.card_id, station_ids=["KM-001", "BJ-001"], products=[DIESEL],
                 geofences=[_circle(*KUNMING, 30_000)], hours=[_window("06:00", "22:00")])
    gas = common_pb2.PRODUCT_GASOLINE_92
    # Each refusal names the first rule broken: station, product, fence, hours, caps.
    assert cb.declined(server, card, 9_000, station="KM-002", product=gas) == STATION
    assert cb.declined(server, card, 9_000, station="BJ-001", product=gas) == PRODUCT
    assert cb.declined(server, card, 9_000, station="BJ-001", product=DIESEL) == FENCE
    assert cb.declined(server, card, 9_000, station="KM-001", product=DIESEL) == \
        common_pb2.DECLINE_REASON_LIMIT_PER_TRANSACTION
    cb.approved(server, card, 5_000, station="KM-001", product=DIESEL)
    cb.advance_to_local(server, dt.datetime(2026, 11, 25, 23, 0))
    assert cb.declined(server, card, 9_000, station="KM-001", product=DIESEL) == HOURS
    cb.assert_verified(server)


def test_only_the_parent_sets_a_cards_scope(server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 500_000, [cb.SHARED, cb.ALLOCATED])
    card, sibling = fleet.subs
    stranger = cb.open_fleet(server, 0, [cb.SHARED])
    cb.set_scope(server, fleet.parent_id, card.card_id, station_ids=["KM-001"])
    before = count(db, "control_changes")
    for actor in (card.account_id, sibling.account_id, stranger.parent_id):
        expect(lambda actor=actor: cb.set_scope(server, actor, card.card_id),  # type: ignore[misc]
               PD, "NOT_THE_CONTROLLING_ACCOUNT")
    # A parent cannot reach into another fleet.
    expect(lambda: cb.set_scope(server, fleet.parent_id, stranger.subs[0].card_id), PD,
           "NOT_THE_CONTROLLING_ACCOUNT")
    assert count(db, "control_changes") == before
    assert cb.declined(server, card, 1_000, station="KM-002") == STATION

    # A top-level account sets the scope of its own card.
    own = builders.open_card(server, balance_fen=100_000)
    cb.set_scope(server, own.account_id, own.card_id, station_ids=["KM-001"])
    assert cb.declined(server, own, 1_000, station="KM-002") == STATION
    cb.approved(server, own, 1_000, station="KM-001")
    change = cb.changes(server, own.account_id)[0]
    assert (change.kind, change.actor_account_id, change.card_id) == (
        "scope", own.account_id, own.card_id)
    cb.assert_verified(server)


def test_malformed_scopes_and_stations_are_refused(server: RunningServer, db: Conn) -> None:
    parent, card = _vehicle(server)
    bad_fences = {
        "scope.geofences[0].circle.radius_m": _circle(*KUNMING, 0),
        "scope.geofences[0].circle.center.latitude": _circle(91.0, 102.0, 1_000),
        "scope.geofences[0].polygon.vertices": _polygon((25.0, 102.0), (25.1, 102.1)),
        "scope.geofences[0].polygon.vertices[2].longitude": _polygon(
            (25.0, 102.0), (25.1, 102.1), (25.2, 181.0)),
        "scope.geofences[0]": control_pb2.GeoFence(),
    }
    for field, fence in bad_fences.items():
        expect(lambda fence=fence: cb.set_scope(server, parent, card.card_id,  # type: ignore[misc]
                                                geofences=[fence]), IA, field=field)
    expect(lambda: cb.register_station(server, "KM-X", -90.5, 102.0), IA,
           field="station.location.latitude")
    expect(lambda: cb.control(server).RegisterStation(control_pb2.RegisterStationRequest(
        station=control_pb2.Station(station_id="KM-X", name="x"))), IA, field="station.location")
    assert count(db, "stations") == 0
    assert count(db, "control_changes") == 0
    cb.approved(server, card, 1_000, station="anywhere")
    cb.assert_verified(server)
