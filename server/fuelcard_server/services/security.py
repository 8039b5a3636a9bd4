"""SecurityService: terminal sign-on (签到) for working keys."""

from __future__ import annotations

from typing import Any

import grpc
from fuelcard.v1 import funding_pb2, security_pb2, security_pb2_grpc

from fuelcard_server import errors, gm
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import ID_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]


REGISTER_CHANNEL_KEY_SQL = """
    INSERT INTO fc.channel_keys (channel, public_key_hex, registered_at) VALUES (%s, %s, %s)
    ON CONFLICT (channel) DO UPDATE
       SET public_key_hex = excluded.public_key_hex, registered_at = excluded.registered_at
    RETURNING public_key_hex"""
CHANNELS = frozenset(v for v in funding_pb2.Channel.values() if v != funding_pb2.CHANNEL_UNSPECIFIED)


class SecurityService(Servicer, security_pb2_grpc.SecurityServiceServicer):
    @rpc(Role.POS)
    async def SignOn(self, request: security_pb2.SignOnRequest, context: Ctx
                     ) -> security_pb2.SignOnResponse:
        v = Violations()
        v.text("terminal_id", request.terminal_id, required=True, max_chars=ID_MAX_CHARS)
        v.raise_if_any()
        caller = self.d.identity()
        if not self.d.tls:
            # Keys go only to a terminal its certificate names, over TLS.
            raise errors.failed_precondition("SIGN_ON_NEEDS_TLS")
        if request.terminal_id != caller.name:
            raise errors.permission_denied("TERMINAL_MISMATCH")
        working = await self.d.terminal_keys.current(caller.name, self.d.clock.now())
        response = security_pb2.SignOnResponse(
            key_version=working.version, working_key=working.key,
            last_counter=await self.d.terminal_keys.last_counter(caller.name))
        response.valid_from.FromDatetime(working.valid_from)
        response.valid_until.FromDatetime(working.valid_until)
        return response

    @rpc(Role.ADMIN)
    async def RegisterChannelKey(self, request: security_pb2.RegisterChannelKeyRequest,
                                 context: Ctx) -> security_pb2.RegisterChannelKeyResponse:
        v = Violations()
        v.enum("channel", request.channel, CHANNELS)
        key = None
        try:
            key = gm.Sm2PublicKey.from_hex(request.public_key_hex)
        except ValueError:
            v.add("public_key_hex", "must be an SM2 public key: 128 hex digits, a point on the curve",
                  "PUBLIC_KEY_INVALID")
        v.raise_if_any()
        assert key is not None
        row = await self.d.db.fetch_one(REGISTER_CHANNEL_KEY_SQL, (
            request.channel, key.to_hex(), self.d.clock.now()))
        assert row is not None
        return security_pb2.RegisterChannelKeyResponse(public_key_hex=row[0])

    @rpc(Role.ADAPTER, Role.ADMIN)
    async def GetServerSigningKey(self, request: security_pb2.GetServerSigningKeyRequest,
                                  context: Ctx) -> security_pb2.GetServerSigningKeyResponse:
        return security_pb2.GetServerSigningKeyResponse(
            public_key_hex=self.d.signing_key.public_key.to_hex())
