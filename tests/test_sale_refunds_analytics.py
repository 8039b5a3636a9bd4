"""Sale refunds in the analytics sidecar (issue 14): the refund's journal
entry streams as LEDGER_ENTRY_KIND_SALE_REFUND, the warehouse books it
(fact_sale_refund, and its points), the accounts still reconcile with the
journal, and the fleet cost report shows a refunded sale at its net cost."""

from __future__ import annotations

import csv
from pathlib import Path

from fuelcard.v1 import account_pb2, refund_pb2, refund_pb2_grpc
from fuelcard_analytics import reports
from fuelcard_analytics.follow import Target, follow
from fuelcard_analytics.warehouse import Warehouse, open_store

from tests.plugins.server import RunningServer
from tests.support import builders, control_builders
from tests.support.ledger_asserts import Conn, assert_ledger_ok
from tests.support.warehouse_asserts import assert_warehouse_matches_journal


def test_the_warehouse_books_sale_refunds_and_fleet_costs_are_net(
        server: RunningServer, db: Conn, tmp_path: Path) -> None:
    refunds = refund_pb2_grpc.RefundServiceStub(server.channel)
    card = builders.open_card(server, balance_fen=50_000)
    sale = control_builders.sale(server, card, 30_000).hold
    refunds.RefundSale(refund_pb2.RefundSaleRequest(
        request_id=builders.rid("refund"), hold_id=sale.hold_id, amount_fen=12_000,
        reason="pump calibration"))
    fleet = control_builders.open_fleet(server, 80_000, [account_pb2.FUNDING_MODE_SHARED],
                                        labels=["云A·55555"])
    truck_sale = control_builders.sale(server, fleet.subs[0], 20_000).hold
    refunds.RefundSale(refund_pb2.RefundSaleRequest(
        request_id=builders.rid("refund"), hold_id=truck_sale.hold_id, amount_fen=5_000,
        reason="disputed"))
    assert_ledger_ok(server.database_url)

    path = tmp_path / "w.duckdb"
    store = open_store(str(path))
    try:
        follow(Target(server.target), Warehouse(store), keep_following=False, log=lambda _: None)
        booked = store.query("SELECT hold_id, account_id, amount_fen FROM fact_sale_refund"
                             " ORDER BY entry_id")
        assert booked == [(sale.hold_id, card.account_id, 12_000),
                          (truck_sale.hold_id, fleet.parent_id, 5_000)]
        journal = assert_warehouse_matches_journal(store, db)
        assert journal[card.account_id][2] == 30_000 - 12_000   # spent, net of the refund
        assert journal[card.account_id][5] == 50_000 - 18_000
        out = reports.fleet_costs(store, tmp_path)
        with out.csv.open() as f:
            rows = list(csv.DictReader(f))
        [truck] = [r for r in rows if r["label"] == "云A·55555"]
        assert int(truck["spend_fen"]) == 15_000
    finally:
        store.close()
