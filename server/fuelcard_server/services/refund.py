"""RefundService: refunds of confirmed sales (退款, issue 14).

A back-office action: admin only, so a terminal cannot give a sale's money
back on its own (a disputed sale is settled by a person who saw the
receipt); the POS reverses what it never sold with
TransactionService.ReverseAuthorization instead. The money, points and tier
are decided in sql/functions/refunds.sql; the rpc decorator audits every
call (the hold is its target). Above step_up_sale_refund_above_fen the
administrator needs a one-time code (STEP_UP_KIND_SALE_REFUND, subject: the
hold), consumed in the refund's own transaction (stepup.gate)."""

from __future__ import annotations

from typing import Any

import grpc
from fuelcard.v1 import refund_pb2, refund_pb2_grpc

from fuelcard_server import errors, stepup
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

REASON_MAX_CHARS = 500
# A refund is of one sale, which is at most an authorization.
REFUND_CALL = (
    "fc.refund_sale(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_hold_uid => %(hold_uid)s::uuid,"
    " p_amount_fen => %(amount_fen)s::bigint, p_reason => %(reason)s,"
    " p_refunded_by => %(actor)s, p_now => %(now)s::timestamptz)")
REFUND_SQL = "SELECT " + REFUND_CALL
STEP_UP_REFUND_SQL = stepup.gate(REFUND_CALL)
LIST_SQL = """
    SELECT fc.sale_refund_json(r => r) FROM fc.sale_refunds r
     WHERE r.hold_id = (SELECT id FROM fc.holds WHERE uid = %(hold_uid)s::uuid)
     ORDER BY r.id"""
HOLD_EXISTS_SQL = "SELECT 1 FROM fc.holds WHERE uid = %(hold_uid)s::uuid"


def refund_message(d: dict[str, Any]) -> refund_pb2.SaleRefund:
    r = refund_pb2.SaleRefund(
        refund_id=d["refund_id"], hold_id=d["hold_id"], account_id=d["account_id"],
        amount_fen=d["amount_fen"], refunded_total_fen=d["refunded_total_fen"],
        points_taken_back=d["points_taken"], points_shortfall=d["points_shortfall"],
        reason=d["reason"], refunded_by=d["refunded_by"], entry_id=d["entry_id"])
    r.create_time.FromMicroseconds(d["create_us"])
    return r


class RefundService(Servicer, refund_pb2_grpc.RefundServiceServicer):

    @rpc(Role.ADMIN)
    async def RefundSale(self, request: refund_pb2.RefundSaleRequest, context: Ctx
                         ) -> refund_pb2.RefundSaleResponse:
        v = Violations()
        v.request_id(request.request_id)
        hold_id = v.uuid("hold_id", request.hold_id)
        v.amount("amount_fen", request.amount_fen, self.d.settings.max_authorize_fen)
        v.text("reason", request.reason, required=True, max_chars=REASON_MAX_CHARS, multiline=True)
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        caller, now = self.d.caller(context), self.d.clock.now()
        identity = self.d.identity()
        params = {"caller": caller, "request_id": request.request_id,
                  "request_hash": self.d.fingerprint("refund_sale", request), "hold_uid": hold_id,
                  "amount_fen": request.amount_fen, "reason": request.reason,
                  "actor": identity.key or identity.name, "now": now}
        if request.amount_fen > self.d.settings.step_up_sale_refund_above_fen:
            gate = self.d.step_ups.gate_params(
                caller, request.request_id, "refund_sale", True, stepup.SALE_REFUND, hold_id,
                request.amount_fen, challenge, request.step_up.code, now)
            d = stepup.check_answer(await self.d.db.call(STEP_UP_REFUND_SQL, gate | params))
        else:
            d = await self.d.db.call(REFUND_SQL, params)
        if "refund" not in d:
            raise errors.internal()
        return refund_pb2.RefundSaleResponse(refund=refund_message(d["refund"]),
                                             balance_fen=d["balance_fen"])

    @rpc(Role.ADMIN)
    async def ListSaleRefunds(self, request: refund_pb2.ListSaleRefundsRequest, context: Ctx
                              ) -> refund_pb2.ListSaleRefundsResponse:
        v = Violations()
        hold_id = v.uuid("hold_id", request.hold_id)
        v.raise_if_any()
        # A listing: the read pool (the replica when configured), as the
        # other services' listings.
        if await self.d.reads.fetch_one(HOLD_EXISTS_SQL, {"hold_uid": hold_id}) is None:
            raise errors.not_found("HOLD_NOT_FOUND", "hold")
        rows = await self.d.reads.fetch_all(LIST_SQL, {"hold_uid": hold_id})
        return refund_pb2.ListSaleRefundsResponse(refunds=[refund_message(r[0]) for r in rows])
