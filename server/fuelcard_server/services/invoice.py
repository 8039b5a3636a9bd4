"""InvoiceService: monthly statements and invoices (统一开票).

Admin callers (the fleet manager's console reaches these through the JSON
API, as an admin principal acting for the account); statements and invoice
reads also analytics callers. Statements and lists read the read pool (the
replica when configured); requests and state changes go to the primary
through stored functions (sql/functions/tax_invoices.sql), which enforce that
no money is invoiced twice. The provider (invoices.InvoiceProvider) is
called before its answer is recorded; it is idempotent on the invoice id.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import grpc
from fuelcard.v1 import invoice_pb2, invoice_pb2_grpc

from fuelcard_server import errors, invoices, statements
from fuelcard_server.db import Database
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Deps, Servicer, rpc
from fuelcard_server.validation import Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
BUYER_NAME_MAX_CHARS = 100
REASON_MAX_CHARS = 200
TAXPAYER_ID = re.compile(r"[0-9A-Z]{15,20}")
KINDS = frozenset({invoice_pb2.INVOICE_KIND_RECHARGE, invoice_pb2.INVOICE_KIND_CONSUMPTION})
TYPES = frozenset({invoice_pb2.INVOICE_TYPE_ORDINARY, invoice_pb2.INVOICE_TYPE_SPECIAL})
STATES = frozenset(v for v in invoice_pb2.InvoiceState.values()
                   if v != invoice_pb2.INVOICE_STATE_UNSPECIFIED)
FORMATS = frozenset(invoice_pb2.StatementFormat.values())

REQUEST_SQL = (
    "SELECT fc.request_invoice(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_account_uid => %(account)s::uuid,"
    " p_kind => %(kind)s::smallint, p_type => %(type)s::smallint, p_month => %(month)s::date,"
    " p_recharge_uid => %(recharge)s::uuid, p_buyer_name => %(buyer_name)s,"
    " p_buyer_tax_id => %(buyer_tax_id)s, p_requested_by => %(requested_by)s,"
    " p_now => %(now)s::timestamptz)")
ADVANCE_SQL = (
    "SELECT fc.advance_invoice(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_invoice_uid => %(invoice)s::uuid,"
    " p_to_state => %(to_state)s::smallint, p_number => %(number)s, p_reason => %(reason)s,"
    " p_now => %(now)s::timestamptz)")
GET_SQL = "SELECT fc.invoice_json(i => i) FROM fc.invoices i WHERE i.uid = %(uid)s::uuid"
LIST_SQL = """
    SELECT i.id, fc.invoice_json(i => i) FROM fc.invoices i
     WHERE i.account_id = (SELECT id FROM fc.accounts WHERE uid = %(account)s::uuid)
       AND (%(state)s = 0 OR i.state = %(state)s)
       AND i.id < %(before)s
     ORDER BY i.id DESC LIMIT %(limit)s"""


def _line(line: statements.Line) -> invoice_pb2.StatementLine:
    return invoice_pb2.StatementLine(
        account_id=line.account_id, label=line.label, top_level=line.top_level,
        opening_balance_fen=line.opening_fen, recharges_fen=line.recharges_fen,
        transfers_fen=line.transfers_fen, sales_fen=line.sales_fen,
        sales_volume_ml=line.sales_volume_ml, sale_count=line.sale_count,
        sales_charged_fen=line.sales_charged_fen, refunds_fen=line.refunds_fen,
        other_fen=line.other_fen, closing_balance_fen=line.closing_fen)


def invoice_message(d: dict[str, Any], full: bool = True) -> invoice_pb2.Invoice:
    m = invoice_pb2.Invoice(
        invoice_id=d["invoice_id"], account_id=d["account_id"], kind=d["kind"], type=d["type"],
        state=d["state"], month=d["month"] or "", recharge_id=d["recharge_id"] or "",
        buyer=invoice_pb2.Buyer(name=d["buyer_name"], taxpayer_id=d["buyer_taxpayer_id"]),
        consolidated=bool(d["entries"]), amount_fen=d["amount_fen"], tax_fen=d["tax_fen"],
        total_fen=d["total_fen"], invoice_number=d["invoice_number"] or "",
        red_letter_number=d["red_letter_number"] or "",
        reversal_reason=d["reversal_reason"] or "", refunded_since_fen=d["refunded_since_fen"])
    for t in d["items"]:
        m.items.add(line_number=t["line_no"], name=t["name"], tax_code=t["tax_code"],
                    product=t["product"] or 0, unit=t["unit"], quantity_ml=t["quantity_ml"],
                    quantity=invoices.litres(t["quantity_ml"]),
                    unit_price=invoices.unit_price(t["amount_fen"], t["quantity_ml"]),
                    amount_fen=t["amount_fen"], tax_rate=invoices.tax_rate(t["tax_rate_bp"]),
                    tax_rate_bp=t["tax_rate_bp"] or 0, tax_fen=t["tax_fen"], total_fen=t["total_fen"])
    if full:
        for e in d["entries"]:
            m.list_entries.add(line_number=e["line_no"], account_id=e["account_id"],
                               label=e["label"], name=e["name"], product=e["product"],
                               quantity_ml=e["quantity_ml"], sale_count=e["sale_count"],
                               amount_fen=e["amount_fen"], tax_fen=e["tax_fen"],
                               total_fen=e["total_fen"])
        m.document_json = invoices.document_json(d)
    m.create_time.FromMicroseconds(d["create_us"])
    if d["issue_us"] is not None:
        m.issue_time.FromMicroseconds(d["issue_us"])
    if d["reverse_us"] is not None:
        m.reverse_time.FromMicroseconds(d["reverse_us"])
    return m


class InvoiceService(Servicer, invoice_pb2_grpc.InvoiceServiceServicer):

    def __init__(self, deps: Deps, provider: invoices.InvoiceProvider | None = None) -> None:
        super().__init__(deps)
        self.provider = provider or invoices.DirectoryInvoiceProvider(
            deps.settings.data_dir / "invoices")

    @rpc(Role.ADMIN, Role.ANALYTICS)
    async def GetStatement(self, request: invoice_pb2.GetStatementRequest, context: Ctx
                           ) -> invoice_pb2.GetStatementResponse:
        v = Violations()
        account = v.uuid("account_id", request.account_id)
        month = statements.parse_month(request.month)
        if month is None:
            v.add("month", "must be YYYY-MM", "MONTH_MALFORMED")
        v.enum("format", request.format, FORMATS)
        # No page_size: every line, as before paging (v1 may only grow).
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            v.add("page_size", f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
        after = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        assert account is not None and month is not None
        s = await statements.statement(self.d.reads, account, month,
                                       page_size=request.page_size, after=after)
        response = invoice_pb2.GetStatementResponse(statement=invoice_pb2.Statement(
            account_id=s.account_id, holder_name=s.holder_name, month=s.month,
            lines=[_line(line) for line in s.lines], totals=_line(s.totals)),
            total_size=s.line_count)
        if s.next_after is not None:
            response.next_page_token = str(s.next_after)
        response.statement.start_time.FromDatetime(s.start)
        response.statement.end_time.FromDatetime(s.end)
        if request.format and request.page_size:
            # a document has every line, whatever the page
            s = await statements.statement(self.d.reads, account, month)
        if request.format == invoice_pb2.STATEMENT_FORMAT_CSV:
            response.content, response.content_type = statements.to_csv(s), "text/csv; charset=utf-8"
        elif request.format == invoice_pb2.STATEMENT_FORMAT_PDF:
            # fpdf2 is CPU-bound: off the event loop
            response.content = await asyncio.to_thread(statements.to_pdf, s)
            response.content_type = "application/pdf"
        return response

    @rpc(Role.ADMIN)
    async def RequestInvoice(self, request: invoice_pb2.RequestInvoiceRequest, context: Ctx
                             ) -> invoice_pb2.RequestInvoiceResponse:
        v = Violations()
        v.request_id(request.request_id)
        account = v.uuid("account_id", request.account_id)
        v.enum("kind", request.kind, KINDS)
        if request.type:
            v.enum("type", request.type, TYPES)
        month = recharge = None
        if request.kind == invoice_pb2.INVOICE_KIND_CONSUMPTION:
            month = statements.parse_month(request.month)
            if month is None:
                v.add("month", "must be YYYY-MM", "MONTH_MALFORMED")
        elif request.kind == invoice_pb2.INVOICE_KIND_RECHARGE:
            recharge = v.uuid("recharge_id", request.recharge_id)
        v.text("buyer.name", request.buyer.name, required=True, max_chars=BUYER_NAME_MAX_CHARS)
        tax_id = request.buyer.taxpayer_id
        if tax_id and not TAXPAYER_ID.fullmatch(tax_id):
            v.add("buyer.taxpayer_id", "15-20 upper-case letters and digits", "TAXPAYER_ID_MALFORMED")
        if request.type == invoice_pb2.INVOICE_TYPE_SPECIAL and not tax_id:
            v.add("buyer.taxpayer_id", "a special invoice needs the buyer's taxpayer id",
                  "TAXPAYER_ID_REQUIRED")
        v.raise_if_any()
        caller = self.d.identity()
        d = await self.d.db.call(REQUEST_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("request_invoice", request), "account": account,
            "kind": request.kind, "type": request.type or invoice_pb2.INVOICE_TYPE_ORDINARY,
            "month": month, "recharge": recharge, "buyer_name": request.buyer.name,
            "buyer_tax_id": tax_id, "requested_by": caller.key or caller.name,
            "now": self.d.clock.now()})
        if "invoice" not in d:
            raise errors.internal()
        return invoice_pb2.RequestInvoiceResponse(invoice=invoice_message(d["invoice"]))

    async def _fetch(self, invoice_id: uuid.UUID, db: Database) -> dict[str, Any]:
        row = await db.fetch_one(GET_SQL, {"uid": invoice_id})
        if row is None:
            raise errors.not_found("INVOICE_NOT_FOUND", "invoice")
        found: dict[str, Any] = row[0]
        return found

    @rpc(Role.ADMIN, Role.ANALYTICS)
    async def GetInvoice(self, request: invoice_pb2.GetInvoiceRequest, context: Ctx
                         ) -> invoice_pb2.GetInvoiceResponse:
        v = Violations()
        invoice_id = v.uuid("invoice_id", request.invoice_id)
        v.raise_if_any()
        assert invoice_id is not None
        return invoice_pb2.GetInvoiceResponse(invoice=invoice_message(
            await self._fetch(invoice_id, self.d.reads)))

    @rpc(Role.ADMIN, Role.ANALYTICS)
    async def ListInvoices(self, request: invoice_pb2.ListInvoicesRequest, context: Ctx
                           ) -> invoice_pb2.ListInvoicesResponse:
        v = Violations()
        account = v.uuid("account_id", request.account_id)
        if request.state:
            v.enum("state", request.state, STATES)
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            v.add("page_size", f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        size = request.page_size or PAGE_SIZE_DEFAULT
        rows = await self.d.reads.fetch_all(LIST_SQL, {
            "account": account, "state": request.state,
            "before": before if before is not None else 2**63 - 1, "limit": size + 1})
        response = invoice_pb2.ListInvoicesResponse(
            invoices=[invoice_message(row[1], full=False) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = str(rows[size - 1][0])
        return response

    async def _advance(self, operation: str, request: Any, context: Ctx, to_state: int,
                       reason: str | None) -> dict[str, Any]:
        v = Violations()
        v.request_id(request.request_id)
        invoice_id = v.uuid("invoice_id", request.invoice_id)
        if reason is not None:
            v.text("reason", reason, required=True, max_chars=REASON_MAX_CHARS)
        v.raise_if_any()
        assert invoice_id is not None
        # the primary: the state decides whether the provider is called
        found = await self._fetch(invoice_id, self.d.db)
        number: str | None = None
        # Only an invoice in the state before: anything else is a replay of a
        # request that went through, or a refusal (the stored function says which).
        if found["state"] == to_state - 1:
            doc = invoices.document(found)
            if to_state == invoice_pb2.INVOICE_STATE_ISSUED:
                number = await self.provider.issue(doc)
            else:
                number = await self.provider.reverse(doc, found["invoice_number"], reason or "")
        d = await self.d.db.call(ADVANCE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint(operation, request), "invoice": invoice_id,
            "to_state": to_state, "number": number, "reason": reason, "now": self.d.clock.now()})
        if "invoice" not in d:
            raise errors.internal()
        result: dict[str, Any] = d["invoice"]
        return result

    @rpc(Role.ADMIN)
    async def IssueInvoice(self, request: invoice_pb2.IssueInvoiceRequest, context: Ctx
                           ) -> invoice_pb2.IssueInvoiceResponse:
        d = await self._advance("issue_invoice", request, context,
                                invoice_pb2.INVOICE_STATE_ISSUED, None)
        return invoice_pb2.IssueInvoiceResponse(invoice=invoice_message(d))

    @rpc(Role.ADMIN)
    async def ReverseInvoice(self, request: invoice_pb2.ReverseInvoiceRequest, context: Ctx
                             ) -> invoice_pb2.ReverseInvoiceResponse:
        d = await self._advance("reverse_invoice", request, context,
                                invoice_pb2.INVOICE_STATE_RED_LETTER, request.reason)
        return invoice_pb2.ReverseInvoiceResponse(invoice=invoice_message(d))
