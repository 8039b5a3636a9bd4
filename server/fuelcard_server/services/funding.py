"""FundingService: top-ups reported by payment adapters."""

from __future__ import annotations

from typing import Any

import grpc
from fuelcard.v1 import funding_pb2, funding_pb2_grpc

from fuelcard_server import errors, wire
from fuelcard_server.identity import Caller, Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import ID_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

CHANNELS = frozenset(v for v in funding_pb2.Channel.values() if v != funding_pb2.CHANNEL_UNSPECIFIED)

RECHARGE_SQL = (
    "SELECT fc.recharge(%s, %s, %s, %s::uuid, %s::smallint, %s, %s::bigint, %s::timestamptz)")
GET_RECHARGE_SQL = (
    "SELECT fc.recharge_json(r) FROM fc.recharges r"
    " WHERE r.channel = %s::smallint AND r.channel_txn_id = %s")


def _own_channel(caller: Caller, channel: funding_pb2.Channel.ValueType) -> None:
    """An adapter acts only for the channel its certificate names."""
    if caller.role is Role.ADAPTER and (
            funding_pb2.Channel.Name(channel).removeprefix("CHANNEL_") != caller.scope):
        raise errors.permission_denied("CHANNEL_MISMATCH")


class FundingService(Servicer, funding_pb2_grpc.FundingServiceServicer):

    @rpc(Role.ADAPTER, Role.ADMIN)
    async def Recharge(self, request: funding_pb2.RechargeRequest, context: Ctx
                       ) -> funding_pb2.RechargeResponse:
        v = Violations()
        v.request_id(request.request_id)
        account_id = v.uuid("account_id", request.account_id)
        v.enum("channel", request.channel, CHANNELS)
        v.text("channel_txn_id", request.channel_txn_id, required=True, max_chars=ID_MAX_CHARS)
        v.amount("amount_fen", request.amount_fen, self.d.settings.max_recharge_fen)
        v.raise_if_any()
        _own_channel(self.d.identity(), request.channel)
        d = await self.d.db.call(RECHARGE_SQL, (
            self.d.caller(context), request.request_id, self.d.fingerprint("recharge", request),
            account_id, request.channel, request.channel_txn_id, request.amount_fen,
            self.d.clock.now()))
        response = funding_pb2.RechargeResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            balance_fen=d["balance_fen"])
        if "recharge" in d:
            response.recharge.CopyFrom(wire.recharge(d["recharge"]))
        return response

    @rpc(Role.ADAPTER, Role.ADMIN)
    async def GetRecharge(self, request: funding_pb2.GetRechargeRequest, context: Ctx
                          ) -> funding_pb2.GetRechargeResponse:
        v = Violations()
        v.enum("channel", request.channel, CHANNELS)
        v.text("channel_txn_id", request.channel_txn_id, required=True, max_chars=ID_MAX_CHARS)
        v.raise_if_any()
        _own_channel(self.d.identity(), request.channel)
        row = await self.d.db.fetch_one(GET_RECHARGE_SQL, (request.channel, request.channel_txn_id))
        if row is None:
            raise errors.not_found("RECHARGE_NOT_FOUND", "recharge")
        return funding_pb2.GetRechargeResponse(recharge=wire.recharge(row[0]))
