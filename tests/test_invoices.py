"""Issue 19, item 2: monthly statements and invoices (统一开票), through gRPC
against the real PostgreSQL.

The clock starts on 2026-11-25 (UTC); sales are made in November (business
time, Asia/Shanghai) and the clock is then moved into December, so that
November is a finished month that can be invoiced."""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    invoice_pb2,
    invoice_pb2_grpc,
)
from fuelcard_server import verify
from pypdf import PdfReader

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.builders import rid
from tests.support.ledger_asserts import Conn, expect, unpack

FP = grpc.StatusCode.FAILED_PRECONDITION
MONTH = "2026-11"
BUYER = invoice_pb2.Buyer(name="昆明顺达物流有限公司", taxpayer_id="91530100MA6K123456")
CONSUMPTION = invoice_pb2.INVOICE_KIND_CONSUMPTION
RECHARGE = invoice_pb2.INVOICE_KIND_RECHARGE


def stub(server: RunningServer) -> invoice_pb2_grpc.InvoiceServiceStub:
    return invoice_pb2_grpc.InvoiceServiceStub(server.channel)


def into_december(server: RunningServer) -> None:
    cb.advance_to_local(server, dt.datetime(2026, 12, 1, 0, 30))


def fleet_with_sales(server: RunningServer) -> tuple[cb.Fleet, str]:
    """A fleet with a SHARED and an ALLOCATED vehicle, a batch top-up and
    sales of two products in November; the id of the fleet's recharge."""
    fleet = cb.open_fleet(server, 0, [cb.SHARED, cb.ALLOCATED], labels=["云A·12345", "云A·D7788"])
    recharge = builders.recharge(server, fleet.parent_id, 200_000).recharge.recharge_id
    shared, allocated = fleet.subs
    cb.batch_top_up(server, fleet.parent_id, [(allocated.account_id, 50_000)])
    cb.sale(server, shared, 30_001, volume_ml=38_220)
    cb.sale(server, shared, 10_000, volume_ml=12_739)
    hold = cb.approved(server, allocated, 20_000, product=common_pb2.PRODUCT_DIESEL_0)
    builders.confirm(server, hold.hold_id, 19_999, volume_ml=26_000)
    cb.sale(server, fleet.parent, 777, volume_ml=1_000)
    return fleet, recharge


def request(server: RunningServer, account: str, kind: int, request_id: str | None = None,
            **fields: Any) -> invoice_pb2.Invoice:
    response = stub(server).RequestInvoice(invoice_pb2.RequestInvoiceRequest(
        request_id=request_id or rid("inv"), account_id=account, kind=kind, buyer=BUYER,  # type: ignore[arg-type]
        **fields))
    invoice: invoice_pb2.Invoice = response.invoice
    return invoice


def journal_totals(db: Conn, parent_uid: str, start: dt.datetime, end: dt.datetime
                   ) -> dict[int, int]:
    """SUM over fc.journal of the family's money movements in [start, end),
    by kind, each counted once (movements between two family accounts are
    allocations, kind 5)."""
    rows = db.execute(
        """WITH fam AS (SELECT id FROM fc.accounts WHERE uid = %(p)s::uuid
                        OR parent_id = (SELECT id FROM fc.accounts WHERE uid = %(p)s::uuid))
           SELECT kind, sum(amount)::bigint FROM fc.journal
            WHERE asset = 1 AND created_at >= %(s)s AND created_at < %(e)s
              AND (debit_account_id IN (SELECT id FROM fam) OR credit_account_id IN (SELECT id FROM fam))
            GROUP BY kind""", {"p": parent_uid, "s": start, "e": end}).fetchall()
    return {int(k): int(v) for k, v in rows}


def family_balance(db: Conn, parent_uid: str, before: dt.datetime) -> int:
    row = db.execute(
        """WITH fam AS (SELECT id FROM fc.accounts WHERE uid = %(p)s::uuid
                        OR parent_id = (SELECT id FROM fc.accounts WHERE uid = %(p)s::uuid))
           SELECT coalesce(sum(CASE WHEN credit_account_id IN (SELECT id FROM fam) THEN amount ELSE 0 END)
                         - sum(CASE WHEN debit_account_id IN (SELECT id FROM fam) THEN amount ELSE 0 END), 0)
             FROM fc.journal WHERE asset = 1 AND created_at < %(b)s""",
        {"p": parent_uid, "b": before}).fetchone()
    assert row is not None
    return int(row[0])


def test_statement_totals_equal_the_journal_to_the_fen(server: RunningServer, db: Conn) -> None:
    # October: money in before the month, so that the opening balance is not 0
    fleet = cb.open_fleet(server, 0, [cb.SHARED, cb.ALLOCATED], labels=["云A·12345", "云A·D7788"])
    shared, allocated = fleet.subs
    builders.recharge(server, fleet.parent_id, 123_456)
    cb.advance_to_local(server, dt.datetime(2026, 12, 1, 9, 0))
    # December: sales, a top-up, a refund, a December recharge
    paid = builders.recharge(server, fleet.parent_id, 80_001)
    cb.batch_top_up(server, fleet.parent_id, [(allocated.account_id, 40_000)])
    cb.sale(server, shared, 12_345, volume_ml=15_432)
    cb.sale(server, allocated, 9_999, volume_ml=12_001)
    cb.sale(server, fleet.parent, 101, volume_ml=130)
    server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=rid("refund"), channel=funding_pb2.CHANNEL_WECHAT_PAY,
        channel_txn_id=paid.recharge.channel_txn_id, channel_refund_id="wx-refund-1",
        amount_fen=5_003))
    cb.advance_to_local(server, dt.datetime(2027, 1, 1, 0, 5))
    # January: movements after the month do not belong in it
    cb.sale(server, shared, 500, volume_ml=600)

    got = stub(server).GetStatement(invoice_pb2.GetStatementRequest(
        account_id=fleet.parent_id, month="2026-12", format=invoice_pb2.STATEMENT_FORMAT_CSV))
    s = got.statement
    start, end = s.start_time.ToDatetime(dt.UTC), s.end_time.ToDatetime(dt.UTC)
    assert start == dt.datetime(2026, 11, 30, 16, 0, tzinfo=dt.UTC)  # Shanghai midnight
    assert end == dt.datetime(2026, 12, 31, 16, 0, tzinfo=dt.UTC)
    j = journal_totals(db, fleet.parent_id, start, end)
    t = s.totals
    assert t.recharges_fen == j[1] == 80_001
    assert t.sales_fen == t.sales_charged_fen == j[2] == 12_345 + 9_999 + 101
    assert t.refunds_fen == j[8] == 5_003
    assert t.transfers_fen == 0 and j[5] == 40_000  # inside the family: nets out
    assert t.opening_balance_fen == family_balance(db, fleet.parent_id, start) == 123_456
    assert t.closing_balance_fen == family_balance(db, fleet.parent_id, end)
    assert t.closing_balance_fen == 123_456 + 80_001 - 5_003 - (12_345 + 9_999 + 101)
    assert t.sales_volume_ml == 15_432 + 12_001 + 130 and t.sale_count == 3

    lines = {line.label or "parent": line for line in s.lines}
    assert list(lines) == ["parent", "云A·12345", "云A·D7788"]
    for line in s.lines:  # each line balances on its own
        assert line.closing_balance_fen == (
            line.opening_balance_fen + line.recharges_fen + line.transfers_fen - line.refunds_fen
            - line.sales_charged_fen + line.other_fen)
    # the SHARED vehicle's sales are its own, paid from the parent's balance
    assert (lines["云A·12345"].sales_fen, lines["云A·12345"].sales_charged_fen) == (12_345, 0)
    assert lines["parent"].sales_charged_fen == 12_345 + 101
    assert lines["云A·D7788"].transfers_fen == 40_000 and lines["parent"].transfers_fen == -40_000

    csv_text = got.content.decode("utf-8-sig")
    assert got.content_type.startswith("text/csv")
    last = csv_text.strip().splitlines()[-1].split(",")
    assert last[1] == "合计" and last[-1] == f"{t.closing_balance_fen / 100:.2f}"
    assert "云A·D7788" in csv_text

    pdf = stub(server).GetStatement(invoice_pb2.GetStatementRequest(
        account_id=fleet.parent_id, month="2026-12", format=invoice_pb2.STATEMENT_FORMAT_PDF))
    assert pdf.content_type == "application/pdf" and pdf.content.startswith(b"%PDF")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.content)).pages)
    # the reader spaces out CJK glyphs (and pads some with NULs): compare without them
    text = "".join(ch for ch in text if not ch.isspace() and ch != "\x00")
    assert "月结对账单" in text and "合计" in text and "云A·D7788" in text
    assert f"{t.closing_balance_fen / 100:.2f}" in text and f"{t.sales_fen / 100:.2f}" in text

    expect(lambda: stub(server).GetStatement(invoice_pb2.GetStatementRequest(
        account_id=shared.account_id, month="2026-12")), FP, "NOT_A_TOP_LEVEL_ACCOUNT")
    expect(lambda: stub(server).GetStatement(invoice_pb2.GetStatementRequest(
        account_id=fleet.parent_id, month="2026-13")), grpc.StatusCode.INVALID_ARGUMENT,
        "MONTH_MALFORMED", field="month")


def test_consumption_invoice_then_no_recharge_invoice_for_the_same_money(
        server: RunningServer, db: Conn, tmp_path: Path) -> None:
    fleet, recharge = fleet_with_sales(server)
    # November has not ended yet
    expect(lambda: request(server, fleet.parent_id, CONSUMPTION, month=MONTH,
                           type=invoice_pb2.INVOICE_TYPE_SPECIAL), FP, "MONTH_NOT_ENDED")
    into_december(server)
    inv = request(server, fleet.parent_id, CONSUMPTION, month=MONTH, type=invoice_pb2.INVOICE_TYPE_SPECIAL)
    assert inv.state == invoice_pb2.INVOICE_STATE_REQUESTED
    assert inv.type == invoice_pb2.INVOICE_TYPE_SPECIAL and inv.consolidated
    assert inv.total_fen == 30_001 + 10_000 + 19_999 + 777
    assert inv.amount_fen + inv.tax_fen == inv.total_fen
    items = {i.name: i for i in inv.items}
    assert sorted(items) == ["*柴油*0#", "*汽油*92#"]
    gas = items["*汽油*92#"]
    assert (gas.unit, gas.quantity_ml, gas.quantity) == ("升", 38_220 + 12_739 + 1_000, "51.959")
    assert (gas.tax_rate, gas.tax_rate_bp) == ("13%", 1300)
    assert gas.total_fen == 30_001 + 10_000 + 777
    # tax per list entry, rounded half up: 13/113 of 40 001 = 4 601.88 -> 4 602; of 777 = 89.39 -> 89
    entries = {(e.label, e.name): e for e in inv.list_entries}
    assert entries[("云A·12345", "*汽油*92#")].tax_fen == 4_602
    assert entries[("", "*汽油*92#")].tax_fen == 89
    assert gas.tax_fen == 4_602 + 89 and gas.amount_fen == gas.total_fen - gas.tax_fen
    assert items["*柴油*0#"].tax_fen == 2_301  # 13/113 of 19 999 = 2 300.82
    assert sum(i.tax_fen for i in inv.items) == inv.tax_fen
    assert sum(i.amount_fen for i in inv.items) == inv.amount_fen
    # unit price before tax, per litre
    # unit price before tax, per litre, 8 decimals: price x litres gives back the amount
    assert abs(Decimal(gas.unit_price) * Decimal(gas.quantity) - Decimal(gas.amount_fen) / 100) < Decimal(
        "0.01")
    assert len(gas.unit_price.split(".")[1]) == 8

    doc = json.loads(inv.document_json)
    assert doc["gmfnsrsbh"] == BUYER.taxpayer_id and doc["fppz"] == "增值税专用发票"
    assert {m["slv"] for m in doc["mxxx"]} == {"13%"} and doc["sfhz"] is True
    assert all(len(m["sphfwssflbm"]) == 19 and m["sl"] and m["dw"] == "升" for m in doc["mxxx"])

    # the same money at recharge: refused, with one ErrorInfo, nothing written
    before = db.execute("SELECT count(*) FROM fc.invoices").fetchone()
    expect(lambda: request(server, fleet.parent_id, RECHARGE, recharge_id=recharge), FP,
           "INVOICING_MODE_CONFLICT")
    assert db.execute("SELECT count(*) FROM fc.invoices").fetchone() == before
    # a month without sales has nothing to invoice
    expect(lambda: request(server, fleet.parent_id, CONSUMPTION, month="2026-10"), FP,
           "NOTHING_TO_INVOICE")
    # nor twice the same month
    expect(lambda: request(server, fleet.parent_id, CONSUMPTION, month=MONTH), FP,
           "MONTH_ALREADY_INVOICED")
    # the database itself refuses an invoice of the other kind, whatever the code does
    with pytest.raises(Exception, match="invoice_follows_account_mode"):
        db.execute("""INSERT INTO fc.invoices (account_id, kind, invoice_type, recharge_id, buyer_name,
                          amount_fen, tax_fen, total_fen, created_at, requested_by)
                      SELECT account_id, 1, 1, (SELECT id FROM fc.recharges WHERE uid = %s::uuid), 'x',
                             1, 0, 1, now(), 'test' FROM fc.invoices LIMIT 1""", (recharge,))
    db.rollback()

    issued = stub(server).IssueInvoice(invoice_pb2.IssueInvoiceRequest(
        request_id=rid("issue"), invoice_id=inv.invoice_id)).invoice
    assert issued.state == invoice_pb2.INVOICE_STATE_ISSUED and len(issued.invoice_number) == 20
    written = server.settings.data_dir / "invoices" / f"{inv.invoice_id}.json"
    assert json.loads(written.read_text("utf-8"))["fphm"] == issued.invoice_number
    assert verify.run(server.database_url) == []


def test_recharge_invoice_then_no_consumption_invoice_and_red_letter_after_refund(
        server: RunningServer, db: Conn) -> None:
    fleet, recharge = fleet_with_sales(server)
    expect(lambda: request(server, fleet.parent_id, RECHARGE, recharge_id=recharge,
                           type=invoice_pb2.INVOICE_TYPE_SPECIAL), FP, "SPECIAL_INVOICE_NOT_AT_RECHARGE")
    inv = request(server, fleet.parent_id, RECHARGE, recharge_id=recharge)
    assert (inv.total_fen, inv.tax_fen, inv.amount_fen) == (200_000, 0, 200_000)
    assert [(i.name, i.tax_rate, i.tax_code) for i in inv.items] == [
        ("*预付卡销售和充值*加油卡充值", "不征税", "6010000000000000000")]
    assert not inv.consolidated and inv.type == invoice_pb2.INVOICE_TYPE_ORDINARY
    into_december(server)
    expect(lambda: request(server, fleet.parent_id, CONSUMPTION, month=MONTH), FP,
           "INVOICING_MODE_CONFLICT")
    expect(lambda: request(server, fleet.parent_id, RECHARGE, recharge_id=recharge), FP,
           "RECHARGE_ALREADY_INVOICED")
    # reversal needs an issued invoice
    expect(lambda: stub(server).ReverseInvoice(invoice_pb2.ReverseInvoiceRequest(
        request_id=rid("rev"), invoice_id=inv.invoice_id, reason="x")), FP, "INVOICE_NOT_ISSUED")
    issued = stub(server).IssueInvoice(invoice_pb2.IssueInvoiceRequest(
        request_id=rid("issue"), invoice_id=inv.invoice_id)).invoice
    assert issued.state == invoice_pb2.INVOICE_STATE_ISSUED

    # the channel refunds part of the recharge: the issued invoice is now too large
    paid = db.execute("SELECT channel_txn_id FROM fc.recharges WHERE uid = %s::uuid",
                      (recharge,)).fetchone()
    assert paid is not None
    server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=rid("refund"), channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=paid[0],
        channel_refund_id="wx-refund-2", amount_fen=30_000))
    got = stub(server).GetInvoice(invoice_pb2.GetInvoiceRequest(invoice_id=inv.invoice_id)).invoice
    assert got.refunded_since_fen == 30_000
    reverse = invoice_pb2.ReverseInvoiceRequest(request_id=rid("rev"), invoice_id=inv.invoice_id,
                                                reason="充值部分退款")
    red = stub(server).ReverseInvoice(reverse).invoice
    assert red.state == invoice_pb2.INVOICE_STATE_RED_LETTER
    assert red.red_letter_number and red.red_letter_number != red.invoice_number
    assert stub(server).ReverseInvoice(reverse).invoice == red  # a retry: the same answer
    # what is left of the recharge may be invoiced again, at recharge only
    again = request(server, fleet.parent_id, RECHARGE, recharge_id=recharge)
    assert again.total_fen == 170_000 and again.invoice_id != inv.invoice_id
    listed = stub(server).ListInvoices(invoice_pb2.ListInvoicesRequest(
        account_id=fleet.parent_id, page_size=1))
    assert [i.invoice_id for i in listed.invoices] == [again.invoice_id] and listed.next_page_token
    rest = stub(server).ListInvoices(invoice_pb2.ListInvoicesRequest(
        account_id=fleet.parent_id, page_size=1, page_token=listed.next_page_token))
    assert [i.invoice_id for i in rest.invoices] == [inv.invoice_id] and not rest.next_page_token
    assert verify.run(server.database_url) == []


def test_requests_are_idempotent(server: RunningServer, db: Conn) -> None:
    fleet, _ = fleet_with_sales(server)
    into_december(server)
    request_id = rid("inv")
    first = request(server, fleet.parent_id, CONSUMPTION, request_id, month=MONTH)
    assert request(server, fleet.parent_id, CONSUMPTION, request_id, month=MONTH) == first
    assert db.execute("SELECT count(*) FROM fc.invoices").fetchone() == (1,)
    # the same key for another request is refused
    expect(lambda: request(server, fleet.parent_id, CONSUMPTION, request_id, month="2026-10"),
           FP, "REQUEST_ID_REUSED")
    issue = invoice_pb2.IssueInvoiceRequest(request_id=rid("issue"), invoice_id=first.invoice_id)
    issued = stub(server).IssueInvoice(issue).invoice
    assert stub(server).IssueInvoice(issue).invoice == issued
    expect(lambda: stub(server).IssueInvoice(invoice_pb2.IssueInvoiceRequest(
        request_id=rid("issue"), invoice_id=first.invoice_id)), FP, "INVOICE_NOT_REQUESTED")


def test_two_simultaneous_requests_for_the_same_month_make_one_invoice(
        server: RunningServer, db: Conn) -> None:
    fleet, _ = fleet_with_sales(server)
    into_december(server)
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def ask() -> None:
        barrier.wait()
        try:
            outcomes.append(request(server, fleet.parent_id, CONSUMPTION, month=MONTH))
        except grpc.RpcError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [o for o in outcomes if isinstance(o, invoice_pb2.Invoice)]
    refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(made) == 1 and len(refused) == 1
    lost = unpack(refused[0])
    assert (lost.code, lost.reason) == (FP, "MONTH_ALREADY_INVOICED")
    assert db.execute("SELECT count(*) FROM fc.invoices").fetchone() == (1,)


def test_roles_over_mutual_tls(tls_server: TlsServer) -> None:
    """Admin requests and issues; analytics reads statements and invoices but
    cannot ask for an invoice; a reviewer or a terminal reads nothing."""
    admin = invoice_pb2_grpc.InvoiceServiceStub(tls_server.channel("admin-ops"))
    accounts = account_pb2_grpc.AccountServiceStub(tls_server.channel("admin-ops"))
    opened = accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid("open"), type=account_pb2.ACCOUNT_TYPE_CORPORATE,
        holder=account_pb2.Holder(name="昆明顺达物流有限公司"))).account
    statement = invoice_pb2.GetStatementRequest(account_id=opened.account_id, month=MONTH)
    assert admin.GetStatement(statement).statement.totals.closing_balance_fen == 0
    analytics = invoice_pb2_grpc.InvoiceServiceStub(tls_server.channel("analytics-bi"))
    assert analytics.GetStatement(statement).statement.account_id == opened.account_id
    ask = invoice_pb2.RequestInvoiceRequest(request_id=rid("inv"), account_id=opened.account_id,
                                            kind=CONSUMPTION, month=MONTH, buyer=BUYER)
    expect(lambda: analytics.RequestInvoice(ask), grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    for name in ("reviewer-risk", "pos-KM-001-T1"):
        other = invoice_pb2_grpc.InvoiceServiceStub(tls_server.channel(name))
        expect(lambda: other.GetStatement(statement), grpc.StatusCode.PERMISSION_DENIED,  # noqa: B023
               "ROLE_NOT_ALLOWED")
    # the admin may ask (November has not ended on the test clock)
    expect(lambda: admin.RequestInvoice(ask), FP, "MONTH_NOT_ENDED")


def test_family_statement_totals_equal_the_journal(server: RunningServer, db: Conn) -> None:
    family = cb.open_fleet(server, 0, [cb.SHARED], account_type=account_pb2.ACCOUNT_TYPE_FAMILY,
                           labels=["副卡 妈妈"])
    builders.recharge(server, family.parent_id, 50_000)
    cb.sale(server, family.subs[0], 8_888, volume_ml=11_111)
    cb.sale(server, family.parent, 1_234, volume_ml=1_500)
    s = stub(server).GetStatement(invoice_pb2.GetStatementRequest(
        account_id=family.parent_id, month=MONTH)).statement
    start, end = s.start_time.ToDatetime(dt.UTC), s.end_time.ToDatetime(dt.UTC)
    j = journal_totals(db, family.parent_id, start, end)
    assert (s.totals.recharges_fen, s.totals.sales_fen) == (j[1], j[2]) == (50_000, 10_122)
    assert s.totals.closing_balance_fen == family_balance(db, family.parent_id, end) == 50_000 - 10_122
    assert [(line.label, line.sales_fen) for line in s.lines] == [("", 1_234), ("副卡 妈妈", 8_888)]


def test_tax_is_rounded_half_up_in_whole_fen(db: Conn) -> None:
    """fc.vat_in against exact decimal arithmetic, for every amount up to
    20 000 fen at 13 % and 9 %."""
    for rate_bp in (1300, 900):
        rows = db.execute("SELECT t, fc.vat_in(p_total_fen => t, p_rate_bp => %(rate)s)"
                          " FROM generate_series(1::bigint, 20000) t", {"rate": rate_bp}).fetchall()
        for total, tax in rows:
            exact = Decimal(total) * rate_bp / (10000 + rate_bp)
            assert tax == int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)), (total, rate_bp)
            # the platform's tolerance: amount x rate differs from the tax by at most 6 fen
            assert abs((total - tax) * Decimal(rate_bp) / 10000 - tax) <= 6
