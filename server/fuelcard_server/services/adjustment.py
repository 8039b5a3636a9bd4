"""AdjustmentService: manual adjustments under dual control (issue 14).

One admin proposes a credit or a debit of an account with a reason; a
second, different admin approves it (booked at once, journal kind 9 against
the ADJUSTMENTS system account, under the account's lock) or rejects it.
The decisions are made in sql/functions/adjustments.sql; who is who is the
caller's certificate identity (Caller.key), so in development mode, where
every caller is the same "development", nothing can be approved: dual
control needs two identities. An edge acting for people (the operator
console, with the on-behalf-of metadata) is recorded as "<certificate> for
console_user:<uuid>": each person is one identity. Admin only; the rpc decorator audits every
call (the adjustment is its target)."""

from __future__ import annotations

from typing import Any, LiteralString

import grpc
from fuelcard.v1 import adjustment_pb2, adjustment_pb2_grpc

from fuelcard_server import errors
from fuelcard_server.audit import actor_of
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

DIRECTIONS = frozenset(v for v in adjustment_pb2.AdjustmentDirection.values()
                       if v != adjustment_pb2.ADJUSTMENT_DIRECTION_UNSPECIFIED)
STATES = frozenset(v for v in adjustment_pb2.AdjustmentState.values()
                   if v != adjustment_pb2.ADJUSTMENT_STATE_UNSPECIFIED)
# A correction, not a payment: large, but bounded (10 million yuan).
AMOUNT_MAX_FEN = 1_000_000_000
TEXT_MAX_CHARS = 500
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000

PROPOSE_SQL = (
    "SELECT fc.propose_adjustment(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_account_uid => %(account_uid)s::uuid,"
    " p_direction => %(direction)s::smallint, p_amount_fen => %(amount_fen)s::bigint,"
    " p_reason => %(reason)s, p_proposed_by => %(actor)s, p_now => %(now)s::timestamptz)")
APPROVE_SQL = (
    "SELECT fc.approve_adjustment(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_adjustment_uid => %(adjustment_uid)s::uuid,"
    " p_note => %(note)s, p_decided_by => %(actor)s, p_now => %(now)s::timestamptz)")
REJECT_SQL = (
    "SELECT fc.reject_adjustment(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_adjustment_uid => %(adjustment_uid)s::uuid,"
    " p_note => %(note)s, p_decided_by => %(actor)s, p_now => %(now)s::timestamptz)")
GET_SQL = "SELECT fc.adjustment_json(a => a) FROM fc.adjustments a WHERE a.uid = %(uid)s::uuid"
LIST_SQL = """
    SELECT a.id, fc.adjustment_json(a => a) FROM fc.adjustments a
     WHERE (%(state)s = 0 OR a.state = %(state)s)
       AND (%(account_uid)s::uuid IS NULL
            OR a.account_id = (SELECT id FROM fc.accounts WHERE uid = %(account_uid)s::uuid))
       AND a.id < %(before)s
     ORDER BY a.id DESC LIMIT %(limit)s"""


def adjustment_message(d: dict[str, Any]) -> adjustment_pb2.Adjustment:
    a = adjustment_pb2.Adjustment(
        adjustment_id=d["adjustment_id"], account_id=d["account_id"], direction=d["direction"],
        amount_fen=d["amount_fen"], reason=d["reason"], state=d["state"],
        proposed_by=d["proposed_by"], decided_by=d["decided_by"] or "",
        decision_note=d["decision_note"] or "", entry_id=d["entry_id"] or 0)
    a.propose_time.FromMicroseconds(d["propose_us"])
    if d["decide_us"] is not None:
        a.decide_time.FromMicroseconds(d["decide_us"])
    return a


class AdjustmentService(Servicer, adjustment_pb2_grpc.AdjustmentServiceServicer):

    def _actor(self) -> str:
        # The certificate's identity and, for an edge (the operator console),
        # the person it acts for: two console users share the edge's
        # certificate, and dual control must still tell them apart.
        return actor_of(self.d.identity())

    async def _decide(self, sql: LiteralString, operation: str,
                      request: adjustment_pb2.ApproveAdjustmentRequest
                      | adjustment_pb2.RejectAdjustmentRequest, context: Ctx) -> dict[str, Any]:
        v = Violations()
        v.request_id(request.request_id)
        uid = v.uuid("adjustment_id", request.adjustment_id)
        v.text("note", request.note, required=False, max_chars=TEXT_MAX_CHARS, multiline=True)
        v.raise_if_any()
        d = await self.d.db.call(sql, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint(operation, request), "adjustment_uid": uid,
            "note": request.note, "actor": self._actor(), "now": self.d.clock.now()})
        if "adjustment" not in d:
            raise errors.internal()
        return d

    @rpc(Role.ADMIN)
    async def ProposeAdjustment(self, request: adjustment_pb2.ProposeAdjustmentRequest,
                                context: Ctx) -> adjustment_pb2.ProposeAdjustmentResponse:
        v = Violations()
        v.request_id(request.request_id)
        account = v.uuid("account_id", request.account_id)
        v.enum("direction", request.direction, DIRECTIONS)
        v.amount("amount_fen", request.amount_fen, AMOUNT_MAX_FEN)
        v.text("reason", request.reason, required=True, max_chars=TEXT_MAX_CHARS, multiline=True)
        v.raise_if_any()
        d = await self.d.db.call(PROPOSE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("propose_adjustment", request),
            "account_uid": account, "direction": request.direction,
            "amount_fen": request.amount_fen, "reason": request.reason, "actor": self._actor(),
            "now": self.d.clock.now()})
        if "adjustment" not in d:
            raise errors.internal()
        return adjustment_pb2.ProposeAdjustmentResponse(adjustment=adjustment_message(d["adjustment"]))

    @rpc(Role.ADMIN)
    async def ApproveAdjustment(self, request: adjustment_pb2.ApproveAdjustmentRequest,
                                context: Ctx) -> adjustment_pb2.ApproveAdjustmentResponse:
        d = await self._decide(APPROVE_SQL, "approve_adjustment", request, context)
        return adjustment_pb2.ApproveAdjustmentResponse(
            adjustment=adjustment_message(d["adjustment"]), balance_fen=d["balance_fen"])

    @rpc(Role.ADMIN)
    async def RejectAdjustment(self, request: adjustment_pb2.RejectAdjustmentRequest,
                               context: Ctx) -> adjustment_pb2.RejectAdjustmentResponse:
        d = await self._decide(REJECT_SQL, "reject_adjustment", request, context)
        return adjustment_pb2.RejectAdjustmentResponse(adjustment=adjustment_message(d["adjustment"]))

    @rpc(Role.ADMIN)
    async def GetAdjustment(self, request: adjustment_pb2.GetAdjustmentRequest,
                            context: Ctx) -> adjustment_pb2.GetAdjustmentResponse:
        v = Violations()
        uid = v.uuid("adjustment_id", request.adjustment_id)
        v.raise_if_any()
        # The primary: the decider reads what they are about to approve.
        row = await self.d.db.fetch_one(GET_SQL, {"uid": uid})
        if row is None:
            raise errors.not_found("ADJUSTMENT_NOT_FOUND", "adjustment")
        return adjustment_pb2.GetAdjustmentResponse(adjustment=adjustment_message(row[0]))

    @rpc(Role.ADMIN)
    async def ListAdjustments(self, request: adjustment_pb2.ListAdjustmentsRequest,
                              context: Ctx) -> adjustment_pb2.ListAdjustmentsResponse:
        v = Violations()
        if request.state:
            v.enum("state", request.state, STATES)
        account = v.uuid("account_id", request.account_id) if request.account_id else None
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            v.add("page_size", f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        size = request.page_size or PAGE_SIZE_DEFAULT
        rows = await self.d.reads.fetch_all(LIST_SQL, {
            "state": request.state, "account_uid": account,
            "before": before if before is not None else 2**63 - 1, "limit": size + 1})
        response = adjustment_pb2.ListAdjustmentsResponse(
            adjustments=[adjustment_message(row[1]) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = str(rows[size - 1][0])
        return response
