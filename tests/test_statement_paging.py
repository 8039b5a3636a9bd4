"""A month's statement paged (AIP-132) and read from the statement rollup
(statement_rollup.py), through gRPC against the real PostgreSQL.

Paging: every line exactly once, in the statement's order, the same lines
as the unpaged statement, and the whole month's totals on every page.
The rollup: the lines it gives equal those read from the month's journal
(fc.statement_lines, the reference), to the fen, at every watermark: with
nothing rolled, the rollup stopped part-way (entries past the watermark),
and all rolled; across a month boundary, with recharges, allocations,
sales, refunds of recharges and of sales. `fuelcard verify` checks the
rollup's rows against the journal.

The clock starts on 2026-11-25 (UTC)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
from fuelcard.v1 import funding_pb2, invoice_pb2, invoice_pb2_grpc, refund_pb2, refund_pb2_grpc
from fuelcard_server import statements, verify
from fuelcard_server.db import Database
from fuelcard_server.statement_rollup import StatementRollup

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.builders import rid
from tests.support.ledger_asserts import Conn, expect

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MONTHS = ("2026-10", "2026-11", "2026-12", "2027-01")
LABELS = ["云A·30005", "云A·30001", "云A·30004", "云A·30002", "云A·30003", "云A·30006"]
CHECK = "statement_rollup_matches_journal"


def stub(server: RunningServer) -> invoice_pb2_grpc.InvoiceServiceStub:
    return invoice_pb2_grpc.InvoiceServiceStub(server.channel)


def get(server: RunningServer, parent: str, month: str, **fields: object
        ) -> invoice_pb2.GetStatementResponse:
    response: invoice_pb2.GetStatementResponse = stub(server).GetStatement(
        invoice_pb2.GetStatementRequest(account_id=parent, month=month, **fields))  # type: ignore[arg-type]
    return response


def busy_fleet(server: RunningServer) -> cb.Fleet:
    """A fleet of SHARED and ALLOCATED vehicles with every kind of money
    movement in November, on both sides of the Shanghai midnight that ends
    it, and in December and January."""
    modes = [cb.SHARED, cb.ALLOCATED, cb.SHARED, cb.ALLOCATED, cb.ALLOCATED, cb.SHARED]
    fleet = cb.open_fleet(server, 0, modes, labels=LABELS)
    subs = fleet.subs
    paid = builders.recharge(server, fleet.parent_id, 300_007)
    cb.batch_top_up(server, fleet.parent_id, [(subs[1].account_id, 40_000),
                                              (subs[3].account_id, 25_500)])
    cb.sale(server, subs[0], 12_345, volume_ml=15_432)
    cb.sale(server, subs[1], 9_999, volume_ml=12_001)
    sold = cb.sale(server, subs[2], 7_001, volume_ml=8_800)
    cb.sale(server, fleet.parent, 101, volume_ml=130)
    server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=rid("refund"), channel=funding_pb2.CHANNEL_WECHAT_PAY,
        channel_txn_id=paid.recharge.channel_txn_id, channel_refund_id="wx-refund-stmt",
        amount_fen=5_003))
    refund_pb2_grpc.RefundServiceStub(server.channel).RefundSale(refund_pb2.RefundSaleRequest(
        request_id=rid("sale-refund"), hold_id=sold.hold.hold_id, amount_fen=1_000,
        reason="pump over-read, ticket 77"))
    cb.advance_to_local(server, dt.datetime(2026, 11, 30, 23, 59, 30))
    cb.sale(server, subs[3], 3_333, volume_ml=4_100)            # November's last minute
    cb.advance_to_local(server, dt.datetime(2026, 12, 1, 0, 0, 30))
    cb.sale(server, subs[3], 2_222, volume_ml=2_700)            # December's first
    builders.recharge(server, fleet.parent_id, 50_000)
    cb.batch_top_up(server, fleet.parent_id, [(subs[4].account_id, 10_000)])
    cb.sale(server, subs[4], 4_444, volume_ml=5_500)
    cb.sale(server, subs[5], 6_666, volume_ml=8_000)
    cb.advance_to_local(server, dt.datetime(2027, 1, 2, 10, 0))
    cb.sale(server, subs[0], 555, volume_ml=700)
    return fleet


def chain_all(server: RunningServer) -> None:
    while server.chain_journal() > 0:
        pass


def rolled_and_reference(db: Conn, parent: str, month: str
                         ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The lines from the rollup (in the statement's order) and from the
    month's journal."""
    params = {"p": parent, "m": f"{month}-01"}
    rolled = db.execute(
        "SELECT * FROM fc.statement_lines_rolled(p_account_id => (SELECT id FROM fc.accounts"
        " WHERE uid = %(p)s::uuid), p_month => %(m)s::date) ORDER BY NOT top_level, label, account_uid",
        params).fetchall()
    journal = db.execute(
        "SELECT * FROM fc.statement_lines(p_account_id => (SELECT id FROM fc.accounts"
        " WHERE uid = %(p)s::uuid), p_month => %(m)s::date)", params).fetchall()
    return rolled, journal


def test_pages_walk_every_line_once_with_the_whole_months_totals(server: RunningServer) -> None:
    fleet = busy_fleet(server)
    whole = get(server, fleet.parent_id, "2026-11")
    assert len(whole.statement.lines) == 7 and whole.total_size == 7
    assert whole.next_page_token == ""  # no page_size: every line, as before paging
    assert [line.label for line in whole.statement.lines] == ["", *sorted(LABELS)]

    for size in (1, 3, 7):
        seen: list[invoice_pb2.StatementLine] = []
        token, pages = "", 0
        while True:
            page = get(server, fleet.parent_id, "2026-11", page_size=size, page_token=token)
            pages += 1
            assert len(page.statement.lines) <= size
            assert page.statement.totals == whole.statement.totals
            assert page.total_size == 7
            seen += page.statement.lines
            token = page.next_page_token
            if not token:
                break
        assert seen == list(whole.statement.lines), size
        assert pages == -(-7 // size)

    # A document has every line whatever the page; the lines are still one page.
    paged_csv = get(server, fleet.parent_id, "2026-11", page_size=2,
                    format=invoice_pb2.STATEMENT_FORMAT_CSV)
    assert len(paged_csv.statement.lines) == 2 and paged_csv.next_page_token
    whole_csv = get(server, fleet.parent_id, "2026-11", format=invoice_pb2.STATEMENT_FORMAT_CSV)
    assert paged_csv.content == whole_csv.content
    assert all(label in paged_csv.content.decode("utf-8-sig") for label in LABELS)


def test_bad_page_size_or_token_is_invalid_argument(server: RunningServer) -> None:
    fleet = busy_fleet(server)
    other = cb.open_fleet(server, 0, [cb.SHARED], labels=["云A·99999"])
    first = get(server, fleet.parent_id, "2026-11", page_size=2)
    for size in (-1, 1001):
        expect(lambda: get(server, fleet.parent_id, "2026-11", page_size=size),  # noqa: B023
               INVALID, "PAGE_SIZE_INVALID", field="page_size")
    # A token of another family (of another page size is fine: it names a line).
    other_token = get(server, other.parent_id, "2026-11", page_size=1).next_page_token
    assert other_token
    for token in ("abc", "-5", "1" * 20, other_token):
        expect(lambda: get(server, fleet.parent_id, "2026-11", page_size=2,
                           page_token=token),  # noqa: B023
               INVALID, "PAGE_TOKEN_INVALID", field="page_token")
    # nothing changed: the same first page as before
    assert get(server, fleet.parent_id, "2026-11", page_size=2) == first


def test_rollup_statement_equals_the_journals_at_every_watermark(
        server: RunningServer, db: Conn, database_url: str) -> None:
    fleet = busy_fleet(server)
    chain_all(server)
    top = db.execute("SELECT max(id) FROM fc.journal").fetchone()
    assert top is not None and isinstance(top[0], int)
    # the sales of the second fleet are no part of the first's statement
    cb.open_fleet(server, 0, [cb.SHARED], labels=["云A·99999"])

    async def scenario() -> None:
        database = Database(database_url, min_size=1, max_size=1, timeout_s=30)
        await database.open()
        try:
            async def check(stage: str) -> None:
                for month in MONTHS:
                    rolled, journal = rolled_and_reference(db, fleet.parent_id, month)
                    assert rolled == journal and len(rolled) == 7, (stage, month)
                    day = dt.date.fromisoformat(f"{month}-01")
                    parent = uuid.UUID(fleet.parent_id)
                    via_rollup = await statements.statement(database, parent, day, max_lag=top[0])
                    via_journal = await statements.statement(database, parent, day, max_lag=None)
                    assert via_rollup == via_journal, (stage, month)
                    assert via_rollup.totals == statements.Line(
                        "", "", False, *[sum(r[i] for r in journal) for i in range(3, 13)])  # type: ignore[misc]

            await check("nothing rolled")
            rollup = StatementRollup(database, batch=7)
            db.execute("SELECT fc.roll_up_statements(p_limit => %s)", (top[0] // 3,))
            await check("a third rolled")
            db.execute("SELECT fc.roll_up_statements(p_limit => 1)")
            await check("a third and one rolled")
            assert await rollup.run_once() == top[0] - top[0] // 3 - 1
            await check("all rolled")
            assert await rollup.run_once() == 0
            assert db.execute("SELECT rolled_id FROM fc.statement_rollup_state").fetchone() == top
        finally:
            await database.close()

    asyncio.run(scenario())
    # November through the rollup and gRPC: the journal's totals, to the fen
    s = get(server, fleet.parent_id, "2026-11", page_size=2).statement
    assert s.totals.sales_fen == 12_345 + 9_999 + 7_001 + 101 + 3_333
    assert s.totals.sale_count == 5 and s.totals.refunds_fen == 5_003
    assert s.totals.recharges_fen == 300_007 and s.totals.transfers_fen == 0
    assert s.totals.other_fen == 1_000  # the sale refund, back to the balance that paid
    assert s.totals.closing_balance_fen == (300_007 - 5_003 - (12_345 + 9_999 + 7_001 + 101 + 3_333)
                                            + 1_000)


def test_verify_checks_the_rollup_against_the_journal(
        server: RunningServer, db: Conn, database_url: str) -> None:
    busy_fleet(server)
    chain_all(server)
    db.execute("SELECT fc.roll_up_statements(p_limit => 1000000)")
    rows = db.execute("SELECT count(*) FROM fc.statement_movements").fetchone()
    assert rows is not None and rows[0] > 7
    assert CHECK not in {v.check for v in verify.run(database_url)}
    db.execute("UPDATE fc.statement_movements SET sales_fen = sales_fen + 1"
               " WHERE (account_id, month) IN (SELECT account_id, month FROM fc.statement_movements"
               " WHERE sale_count > 0 LIMIT 1)")
    assert CHECK in {v.check for v in verify.run(database_url)}
