"""Issue 14, item 4: posted prices (SetPrice/ListPrices), a confirm whose
figures do not add up (recorded on the sale, the sale stands), and a card's
litre caps: per fill and per day, checked at authorize at the posted price
and counted at confirm with the measured volume."""

from __future__ import annotations

import datetime as dt

import grpc
from fuelcard.v1 import common_pb2, control_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, assert_ledger_ok, expect

G92 = common_pb2.PRODUCT_GASOLINE_92
G95 = common_pb2.PRODUCT_GASOLINE_95


def _post(server: RunningServer, price_fen: int, product: common_pb2.Product.ValueType = G92,
          ago: dt.timedelta = dt.timedelta(hours=1)) -> control_pb2.SetPriceResponse:
    request = control_pb2.SetPriceRequest(
        request_id=builders.rid("price"), station_id="KM-001", product=product,
        effective_time=cb.ts(server.clock.now() - ago), unit_price_fen=price_fen)
    response: control_pb2.SetPriceResponse = cb.control(server).SetPrice(request)
    return response


def _figures(db: Conn, hold_id: str) -> tuple[bool, bool, bool]:
    row = db.execute("SELECT amount_mismatch, price_mismatch, volume_counted FROM fc.holds"
                     " WHERE uid = %s", (hold_id,)).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_prices_are_posted_listed_and_the_latest_in_force_applies(server: RunningServer) -> None:
    _post(server, 780, ago=dt.timedelta(days=2))
    posted = _post(server, 800).price
    assert (posted.station_id, posted.product, posted.unit_price_fen) == ("KM-001", G92, 800)
    _post(server, 820, ago=-dt.timedelta(days=1))          # tomorrow's: not yet in force
    listed = cb.control(server).ListPrices(control_pb2.ListPricesRequest(station_id="KM-001"))
    assert [p.unit_price_fen for p in listed.prices] == [820, 800, 780]
    expect(lambda: cb.control(server).SetPrice(control_pb2.SetPriceRequest(
        request_id=builders.rid("price"), station_id="KM-001", product=G92,
        effective_time=cb.ts(server.clock.now()), unit_price_fen=0)),
        grpc.StatusCode.INVALID_ARGUMENT, field="unit_price_fen")


def test_a_confirm_whose_figures_do_not_add_up_is_recorded_and_stands(
        server: RunningServer, db: Conn) -> None:
    _post(server, 800)
    card = builders.open_card(server, balance_fen=100_000)
    # 10 L at 8.00 yuan is 8 000 fen: agrees with the amount and the posted price.
    ok = builders.confirm(server, cb.approved(server, card, 9_000).hold_id, 8_000,
                          volume_ml=10_000, unit_price_fen=800)
    assert _figures(db, ok.hold.hold_id) == (False, False, False)
    # 10 L at 7.85 is 7 850 fen, not 8 000; and 7.85 is not the posted 8.00.
    off = builders.confirm(server, cb.approved(server, card, 9_000).hold_id, 8_000,
                           volume_ml=10_000, unit_price_fen=785)
    assert off.decision == common_pb2.DECISION_APPROVED
    assert off.hold.settled_fen == 8_000
    assert _figures(db, off.hold.hold_id) == (True, True, False)
    # Within one fen is agreement (10.001 L at 8.00 is 8 000.8 fen).
    near = builders.confirm(server, cb.approved(server, card, 9_000).hold_id, 8_000,
                            volume_ml=10_001, unit_price_fen=800)
    assert _figures(db, near.hold.hold_id) == (False, False, False)
    assert_ledger_ok(server.database_url)


def test_litre_caps_per_fill_and_per_day(server: RunningServer, db: Conn) -> None:
    _post(server, 800)
    card = builders.open_card(server, balance_fen=1_000_000)
    set_ = cb.control(server).SetVolumeLimits(control_pb2.SetVolumeLimitsRequest(
        request_id=builders.rid("vol"), actor_account_id=card.account_id, card_id=card.card_id,
        limits=control_pb2.VolumeLimits(per_fill_ml=50_000, daily_ml=80_000)))
    assert (set_.limits.per_fill_ml, set_.limits.daily_ml, set_.limits.monthly_ml) == (
        50_000, 80_000, 0)
    # 400.01 yuan at 8.00 is more than 50 L.
    assert cb.declined(server, card, 40_001) == common_pb2.DECLINE_REASON_LIMIT_VOLUME_PER_FILL
    hold = cb.approved(server, card, 40_000)
    done = builders.confirm(server, hold.hold_id, 40_000, volume_ml=50_000, unit_price_fen=800)
    assert _figures(db, done.hold.hold_id) == (False, False, True)
    assert db.execute("SELECT sum(volume_ml) FROM fc.volume_usage").fetchone() == (50_000,)
    # 30 L left today: 300 yuan is 37.5 L, 240 yuan is 30 L.
    assert cb.declined(server, card, 30_000) == common_pb2.DECLINE_REASON_LIMIT_VOLUME_DAILY
    hold = cb.approved(server, card, 24_000)
    builders.confirm(server, hold.hold_id, 24_000, volume_ml=30_000, unit_price_fen=800)
    got = cb.get_limits(server, card=card.card_id)
    assert (got.volume_limits.per_fill_ml, got.volume_limits.daily_ml) == (50_000, 80_000)
    assert (got.used_today_ml, got.used_this_month_ml) == (80_000, 80_000)
    # The day is used up: without a posted price (95 has none) it declines too.
    assert cb.declined(server, card, 100, product=G95) == common_pb2.DECLINE_REASON_LIMIT_VOLUME_DAILY
    assert_ledger_ok(server.database_url)


def test_without_a_posted_price_a_litre_cap_counts_at_confirm(server: RunningServer,
                                                              db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000_000)
    cb.control(server).SetVolumeLimits(control_pb2.SetVolumeLimitsRequest(
        request_id=builders.rid("vol"), actor_account_id=card.account_id, card_id=card.card_id,
        limits=control_pb2.VolumeLimits(monthly_ml=20_000)))
    hold = cb.approved(server, card, 50_000)          # no price: cannot be turned into litres
    builders.confirm(server, hold.hold_id, 50_000, volume_ml=62_000, unit_price_fen=806)
    assert cb.declined(server, card, 100) == common_pb2.DECLINE_REASON_LIMIT_VOLUME_MONTHLY
    assert_ledger_ok(server.database_url)
