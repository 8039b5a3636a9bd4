"""PointsService: balances, history and redemption of loyalty points."""

from __future__ import annotations

from typing import Any

import grpc
from fuelcard.v1 import points_pb2, points_pb2_grpc

from fuelcard_server import errors, history, wire
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import TEXT_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

REDEEM_SQL = (
    "SELECT fc.redeem_points(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_account_uid => %(account_uid)s::uuid,"
    " p_points => %(points)s::bigint, p_description => %(description)s,"
    " p_now => %(now)s::timestamptz)")
POINTS_BALANCE_SQL = ("SELECT points_balance FROM fc.accounts"
                      " WHERE uid = %s::uuid AND kind <> fc.account_kind_system()")



class PointsService(Servicer, points_pb2_grpc.PointsServiceServicer):

    @rpc(Role.ADMIN, Role.ANALYTICS)
    async def GetPointsBalance(self, request: points_pb2.GetPointsBalanceRequest, context: Ctx
                               ) -> points_pb2.GetPointsBalanceResponse:
        v = Violations()
        account_id = v.uuid("account_id", request.account_id)
        v.raise_if_any()
        row = await self.d.db.fetch_one(POINTS_BALANCE_SQL, (account_id,))
        if row is None:
            raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
        return points_pb2.GetPointsBalanceResponse(points_balance=row[0])

    @rpc(Role.ADMIN, Role.ANALYTICS)
    async def ListPointsHistory(self, request: points_pb2.ListPointsHistoryRequest, context: Ctx
                                ) -> points_pb2.ListPointsHistoryResponse:
        v = Violations()
        account_id = v.uuid("account_id", request.account_id)
        size = v.page_size("page_size", request.page_size)
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        assert account_id is not None
        lines, token = await history.journal_page(self.d.reads, account_id, history.ASSET_POINTS,
                                                  size, before)
        response = points_pb2.ListPointsHistoryResponse(next_page_token=token)
        for line in lines:
            entry = response.entries.add(entry_id=str(line.id), kind=wire.POINTS_KIND[line.kind],
                                         points=line.signed_amount, hold_id=line.hold_id,
                                         description=line.description)
            entry.create_time.FromMicroseconds(line.create_us)
        return response

    @rpc(Role.ADMIN)
    async def RedeemPoints(self, request: points_pb2.RedeemPointsRequest, context: Ctx
                           ) -> points_pb2.RedeemPointsResponse:
        v = Violations()
        v.request_id(request.request_id)
        account_id = v.uuid("account_id", request.account_id)
        v.amount("points", request.points, self.d.settings.max_points_redeem)
        v.text("description", request.description, required=False, max_chars=TEXT_MAX_CHARS)
        v.raise_if_any()
        d = await self.d.db.call(REDEEM_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("redeem", request), "account_uid": account_id,
            "points": request.points, "description": request.description,
            "now": self.d.clock.now()})
        response = points_pb2.RedeemPointsResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            points_balance=d["points_balance"])
        if "entry" in d:
            response.entry.CopyFrom(wire.points_entry(d["entry"]))
        return response
