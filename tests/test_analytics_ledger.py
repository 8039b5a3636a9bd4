"""The warehouse books every money movement the server makes after a sale or
a recharge, so that its facts reconcile with the journal account by account:
full and partial confirms, cancels, a zero confirm, a late confirm, channel
payments through the channel simulators and their refunds (covered, short,
not covered at all), a fleet's allocations and shared-funding sales, points
earned, redeemed and pooled."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fuelcard.v1 import (
    account_pb2,
    events_pb2,
    events_pb2_grpc,
    points_pb2,
    security_pb2,
    security_pb2_grpc,
)
from fuelcard_adapters.core import CoreClient
from fuelcard_adapters.framework import Adapter
from fuelcard_adapters.signing import Sm2Signer
from fuelcard_analytics import cli, reports
from fuelcard_analytics.follow import Target, follow
from fuelcard_analytics.warehouse import Warehouse, open_store

from tests.plugins.server import RunningServer
from tests.support import builders, control_builders
from tests.support.channel_simulators import AlipaySim, BankCardSim, Notice, Simulator, WeChatSim
from tests.support.ledger_asserts import Conn
from tests.support.warehouse_asserts import assert_warehouse_matches_journal


class Channel:
    """A channel simulator and its adapter, talking to the real server."""

    def __init__(self, server: RunningServer, sim: Simulator) -> None:
        security = security_pb2_grpc.SecurityServiceStub(server.channel)
        key = Sm2Signer.generate()
        security.RegisterChannelKey(security_pb2.RegisterChannelKeyRequest(
            channel=sim.channel, public_key_hex=key.public_hex))  # type: ignore[arg-type]
        core_key = bytes.fromhex(security.GetServerSigningKey(
            security_pb2.GetServerSigningKeyRequest()).public_key_hex)
        self.sim = sim
        self.adapter = Adapter(sim.mapping(), CoreClient(server.funding, sim.channel, key,
                                                         core_key, sleep=lambda _s: None))

    def pay(self, account_id: str, amount_fen: int) -> Notice:
        paid = self.sim.pay(account_id, amount_fen)
        assert self.sim.taken(self.adapter.handle(paid.request))
        return paid

    def refund(self, paid: Notice, amount_fen: int) -> Notice:
        refund = self.sim.refund(paid, amount_fen)
        assert self.sim.taken(self.adapter.handle(refund.request))
        return refund


def sync(server: RunningServer, spec: str) -> None:
    store = open_store(spec)
    try:
        follow(Target(server.target), Warehouse(store), keep_following=False, log=lambda _: None)
    finally:
        store.close()


def test_the_warehouse_reconciles_with_the_journal_per_account(
        server: RunningServer, db: Conn, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    wechat, alipay, bank = (Channel(server, WeChatSim()), Channel(server, AlipaySim()),
                            Channel(server, BankCardSim()))
    a = builders.open_card(server)
    paid_a = wechat.pay(a.account_id, 50_000)
    sale = builders.authorize(server, a, 10_000).hold
    builders.confirm(server, sale.hold_id, 10_000)
    partial = builders.authorize(server, a, 8_000).hold
    builders.confirm(server, partial.hold_id, 5_432, volume_ml=6_920)
    builders.cancel(server, builders.authorize(server, a, 3_000).hold.hold_id)
    builders.confirm(server, builders.authorize(server, a, 2_500).hold.hold_id, 0)  # nothing sold
    late = builders.authorize(server, a, 2_000).hold
    server.advance(dt.timedelta(hours=2))
    assert server.expire_holds() == 1
    builders.confirm(server, late.hold_id, 1_500)  # the pump reported after expiry
    wechat.refund(paid_a, 4_000)  # covered: all of it debited
    server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid("redeem"), account_id=a.account_id, points=5,
        description="mall order"))

    b = builders.open_card(server)
    paid_b = alipay.pay(b.account_id, 20_000)
    builders.confirm(server, builders.authorize(server, b, 15_000).hold.hold_id, 15_000)
    builders.authorize(server, b, 3_000)  # an open hold: its money may not be refunded
    alipay.refund(paid_b, 10_000)  # 2 000 debited, 8 000 short
    alipay.refund(paid_b, 1_000)   # nothing left: no journal entry at all, all short

    fleet = control_builders.open_fleet(
        server, 0, [account_pb2.FUNDING_MODE_ALLOCATED, account_pb2.FUNDING_MODE_SHARED])
    bank.pay(fleet.parent_id, 30_000)
    control_builders.batch_top_up(server, fleet.parent_id, [(fleet.subs[0].account_id, 7_000)])
    builders.confirm(server, builders.authorize(server, fleet.subs[0], 4_000).hold.hold_id, 3_210)
    builders.confirm(server, builders.authorize(server, fleet.subs[1], 6_000).hold.hold_id, 6_000)

    family = control_builders.open_fleet(server, 0, [account_pb2.FUNDING_MODE_SHARED],
                                         account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    wechat.pay(family.parent_id, 9_000)
    member = family.subs[0]
    builders.confirm(server, builders.authorize(server, member, 8_000).hold.hold_id, 8_000)
    earned = control_builders.points_of(server, member.account_id)
    assert earned > 0
    control_builders.transfer_points(server, member.account_id, family.parent_id, earned)

    store_path = tmp_path / "w.duckdb"
    sync(server, str(store_path))
    # the same in a PostgreSQL store
    sync(server, server.database_url)
    pg = open_store(server.database_url)
    try:
        assert_warehouse_matches_journal(pg, db)
    finally:
        pg.close()
    store = open_store(str(store_path))
    try:
        journal = assert_warehouse_matches_journal(store, db)
        assert journal[family.parent_id][6] == earned  # pooled points arrived
        # every kind of movement was there to book
        assert journal[a.account_id][:6] == (50_000, 4_000, 16_932, 0, 0, 29_068)
        assert journal[b.account_id][:6] == (20_000, 2_000, 15_000, 0, 0, 3_000)
        assert journal[fleet.parent_id][3:6] == (0, 7_000, 30_000 - 7_000 - 6_000)
        assert journal[fleet.subs[0].account_id][:6] == (0, 0, 3_210, 7_000, 0, 3_790)
        refunds = store.query("SELECT amount_fen, debited_fen, shortfall_fen, channel"
                              " FROM fact_refund ORDER BY amount_fen DESC")
        assert refunds == [(10_000, 2_000, 8_000, alipay.sim.channel),
                           (4_000, 4_000, 0, wechat.sim.channel),
                           (1_000, 0, 1_000, alipay.sim.channel)]
        # refunds name the recharge they reverse
        assert store.query(
            "SELECT count(*) FROM fact_refund f JOIN fact_recharge r"
            " ON r.recharge_id = f.recharge_id") == [(3,)]
        # the channel report nets them out
        output = reports.channel_recharges(store, tmp_path / "reports")
        lines = output.csv.read_text().splitlines()
        assert lines[0].startswith("month,channel,recharged_fen,refunded_fen,debited_fen")
        alipay_line = next(x for x in lines if ",ALIPAY," in x).split(",")
        assert alipay_line[2:7] == ["20000", "11000", "2000", "9000", "9000"]
        assert output.png.stat().st_size > 100
        # A store made by the first release had its allocations in
        # fact_ledger alone: opening it with this one books them.
        store.execute("DELETE FROM fact_allocation")
        store.execute("DELETE FROM warehouse_version")
        Warehouse(store)
        assert store.query("SELECT version FROM warehouse_version") == [(2,)]
        assert_warehouse_matches_journal(store, db)
    finally:
        store.close()
    assert cli.main(["totals", "--store", str(store_path)]) == 0
    held = db.execute("SELECT sum(balance_fen), sum(points_balance) FROM fc.accounts").fetchone()
    assert held is not None
    assert f"held {held[0]} fen; points outstanding {held[1]}" in capsys.readouterr().out
    # the refund's own event, also for the one that moved no money
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    streamed = [e for m in stub.StreamEvents(events_pb2.StreamEventsRequest()) for e in m.events]
    assert sorted(e.refund.debited_fen for e in streamed if e.HasField("refund")) == [
        0, 2_000, 4_000]
    assert {e.ledger_entry.kind for e in streamed if e.HasField("ledger_entry")} == {
        events_pb2.LEDGER_ENTRY_KIND_RECHARGE, events_pb2.LEDGER_ENTRY_KIND_PURCHASE,
        events_pb2.LEDGER_ENTRY_KIND_POINTS_EARNED, events_pb2.LEDGER_ENTRY_KIND_POINTS_REDEEMED,
        events_pb2.LEDGER_ENTRY_KIND_ALLOCATION, events_pb2.LEDGER_ENTRY_KIND_POINTS_TRANSFER,
        events_pb2.LEDGER_ENTRY_KIND_RECHARGE_REFUND}
    assert not any(e.backfilled for e in streamed)


def test_the_recharges_report_has_one_row_per_month_and_channel(tmp_path: Path) -> None:
    """Recharges on several days of one month, and one the next month: the
    default store (DuckDB) divides integers exactly, so a month computed as
    date_key / 100 would split the days into rows of their own."""
    store = open_store(str(tmp_path / "w.duckdb"))
    try:
        Warehouse(store)
        for i, date_key in enumerate((20260105, 20260120, 20260131, 20260201)):
            store.execute(
                "INSERT INTO fact_recharge (entry_id, position, date_key, booked_at, account_id,"
                " channel, amount_fen) VALUES (?, ?, ?, TIMESTAMP '2026-01-05 08:00:00', 'a', 2,"
                " ?)", (i + 1, i + 1, date_key, 1_000 * (i + 1)))
        lines = reports.channel_recharges(store, tmp_path / "reports").csv.read_text().splitlines()
    finally:
        store.close()
    assert [line.split(",")[:3] for line in lines[1:]] == [
        ["2026-01", "WECHAT_PAY", "6000"], ["2026-02", "WECHAT_PAY", "4000"]]
