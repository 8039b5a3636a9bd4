"""FundingService: top-ups reported by payment adapters.

Recharge notifications are signed (SM2) by the channel's adapter and every
answer (Recharge, RefundRecharge, GetRecharge) is signed by the server; the
signing inputs are defined below and in funding.proto (RechargeRequest.signature,
RechargeResponse.signature, GetRechargeResponse.signature).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import grpc
from fuelcard.v1 import funding_pb2, funding_pb2_grpc

from fuelcard_server import errors, gm, keys, stepup, wire
from fuelcard_server.identity import Caller, Role
from fuelcard_server.services.handling import Deps, Servicer, rpc
from fuelcard_server.services.security import channel_keys
from fuelcard_server.validation import ID_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

CHANNELS = frozenset(v for v in funding_pb2.Channel.values() if v != funding_pb2.CHANNEL_UNSPECIFIED)
# Channels whose money the operator's own staff take in (cash or transfer at
# a counter): an admin may book these unsigned. Every other channel's money
# is a payment only that channel's adapter can vouch for (with its signature).
OPERATOR_CHANNELS = frozenset({funding_pb2.CHANNEL_COUNTER})

# Signed answers this process remembers, so that a replay (the same request,
# or the channel's second notice of a payment) gets the original answer byte
# for byte: SM2 is randomised, and signing the same fields again would give
# other (equally valid) signature bytes. Beyond these, or from another server
# process, a replay is signed afresh over the same fields. Entries are 32 +
# 64 bytes plus overhead: about 3 MB.
SIGNED_ANSWERS = 10_000

RECHARGE_CALL = (
    "fc.recharge(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_account_uid => %(account_uid)s::uuid,"
    " p_channel => %(channel)s::smallint, p_channel_txn_id => %(channel_txn_id)s,"
    " p_amount_fen => %(amount_fen)s::bigint, p_now => %(now)s::timestamptz)")
RECHARGE_SQL = "SELECT " + RECHARGE_CALL
# A recharge above the step-up threshold: the same call behind the step-up
# gate (stepup.gate). A channel's second notice of a payment already booked
# (same channel_txn_id) needs no code: it gets the original answer, or
# CHANNEL_TXN_REUSED.
STEP_UP_RECHARGE_SQL = (
    "WITH s AS MATERIALIZED (SELECT fc.consume_step_up(p_caller => %(step_up_caller)s,"
    " p_request_id => %(step_up_request_id)s, p_operation => %(step_up_operation)s,"
    " p_required => %(step_up_required)s::boolean AND NOT EXISTS"
    " (SELECT 1 FROM fc.recharges WHERE channel = %(channel)s::smallint"
    " AND channel_txn_id = %(channel_txn_id)s),"
    " p_kind => %(step_up_kind)s::smallint, p_subject => %(step_up_subject)s::uuid,"
    " p_amount => %(step_up_amount)s::bigint, p_challenge => %(step_up_challenge)s::uuid,"
    " p_code_hash => %(step_up_code_hash)s, p_now => %(step_up_now)s::timestamptz) AS refusal)"
    " SELECT CASE WHEN s.refusal IS NULL THEN " + RECHARGE_CALL +
    " ELSE jsonb_build_object('step_up_refusal', s.refusal) END FROM s")
GET_RECHARGE_SQL = (
    "SELECT fc.recharge_json(r => r),"
    " (SELECT coalesce(sum(f.amount_fen), 0)::bigint FROM fc.refunds f WHERE f.recharge_id = r.id)"
    " FROM fc.recharges r WHERE r.channel = %s::smallint AND r.channel_txn_id = %s")
REFUND_SQL = (
    "SELECT fc.refund_recharge(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_channel => %(channel)s::smallint,"
    " p_channel_txn_id => %(channel_txn_id)s, p_channel_refund_id => %(channel_refund_id)s,"
    " p_amount_fen => %(amount_fen)s::bigint, p_refunded_total_fen => %(refunded_total_fen)s::bigint,"
    " p_now => %(now)s::timestamptz)")


def recharge_signing_input(request: funding_pb2.RechargeRequest) -> bytes:
    """What an adapter signs: fields 1-5 of the request, in the tagged
    encoding of keys.canonical (text as sent, enums and amounts as integers)."""
    return keys.canonical("Recharge", request.request_id, request.account_id, request.channel,
                          request.channel_txn_id, request.amount_fen)


def recharge_response_signing_input(request: funding_pb2.RechargeRequest,
                                    response: funding_pb2.RechargeResponse) -> bytes:
    """What the server signs: the payment the request notified (fields 2-5 of
    the request, as sent: this binds the answer to it, also when DECLINED,
    which carries no recharge) and fields 1-4 of the response, the recharge's
    fields one by one (an unset recharge encodes its defaults, "" and 0; a set
    one has a recharge_id). Not the request_id: a channel's second notice of a
    payment, under a new request_id, gets the original answer."""
    r = response.recharge
    return keys.canonical(
        "RechargeResponse", request.account_id, request.channel, request.channel_txn_id,
        request.amount_fen, response.decision, response.decline_reason,
        r.recharge_id, r.account_id, r.channel, r.channel_txn_id, r.amount_fen,
        r.create_time.seconds, r.create_time.nanos, response.balance_fen)


def get_recharge_signing_input(request: funding_pb2.GetRechargeRequest,
                               response: funding_pb2.GetRechargeResponse) -> bytes:
    """What the server signs for GetRecharge: the transaction asked about
    (fields 1-2 of the request, as sent) and the recharge, field by field,
    with what channels refunded of it (funding.proto)."""
    r = response.recharge
    return keys.canonical(
        "GetRechargeResponse", request.channel, request.channel_txn_id,
        r.recharge_id, r.account_id, r.channel, r.channel_txn_id, r.amount_fen,
        r.create_time.seconds, r.create_time.nanos, response.refunded_fen)


def refund_signing_input(request: funding_pb2.RefundRechargeRequest) -> bytes:
    """What an adapter signs for a refund: fields 1-6 of the request."""
    return keys.canonical("RefundRecharge", request.request_id, request.channel,
                          request.channel_txn_id, request.channel_refund_id, request.amount_fen,
                          request.refunded_total_fen)


def refund_response_signing_input(request: funding_pb2.RefundRechargeRequest,
                                  response: funding_pb2.RefundRechargeResponse) -> bytes:
    """What the server signs for a refund: the refund the request notified
    (fields 2-6, as sent) and the refund as recorded (see funding.proto)."""
    f = response.refund
    return keys.canonical(
        "RefundRechargeResponse", request.channel, request.channel_txn_id,
        request.channel_refund_id, request.amount_fen, request.refunded_total_fen,
        f.refund_id, f.recharge_id, f.account_id, f.amount_fen, f.debited_fen, f.shortfall_fen,
        f.create_time.seconds, f.create_time.nanos, response.balance_fen)


def _own_channel(caller: Caller, channel: funding_pb2.Channel.ValueType) -> None:
    """An adapter acts only for the channel its certificate names."""
    if caller.role is Role.ADAPTER and (
            funding_pb2.Channel.Name(channel).removeprefix("CHANNEL_") != caller.scope):
        raise errors.permission_denied("CHANNEL_MISMATCH")


class FundingService(Servicer, funding_pb2_grpc.FundingServiceServicer):

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self._signed: OrderedDict[bytes, bytes] = OrderedDict()

    @rpc(Role.ADAPTER, Role.ADMIN)
    async def Recharge(self, request: funding_pb2.RechargeRequest, context: Ctx
                       ) -> funding_pb2.RechargeResponse:
        v = Violations()
        v.request_id(request.request_id)
        account_id = v.uuid("account_id", request.account_id)
        v.enum("channel", request.channel, CHANNELS)
        v.text("channel_txn_id", request.channel_txn_id, required=True, max_chars=ID_MAX_CHARS)
        v.amount("amount_fen", request.amount_fen, self.d.settings.max_recharge_fen)
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        _own_channel(self.d.identity(), request.channel)
        # Before anything is written: a refused notification changes nothing.
        await self._check_signature(request)
        caller, now = self.d.caller(context), self.d.clock.now()
        params = {"caller": caller, "request_id": request.request_id,
                  "request_hash": self.d.fingerprint("recharge", request), "account_uid": account_id,
                  "channel": request.channel, "channel_txn_id": request.channel_txn_id,
                  "amount_fen": request.amount_fen, "now": now}
        # A step-up is a person confirming what they typed. A payment its
        # channel's adapter notified, signed (checked above), was made and
        # authenticated at the channel: a bank transfer of any size is
        # credited, never held back for a code the adapter cannot supply.
        if (request.amount_fen > self.d.settings.step_up_recharge_above_fen
                and self.d.identity().role is not Role.ADAPTER):
            gate = self.d.step_ups.gate_params(
                caller, request.request_id, "recharge", True, stepup.RECHARGE, account_id,
                request.amount_fen, challenge, request.step_up.code, now)
            d = stepup.check_answer(await self.d.db.call(STEP_UP_RECHARGE_SQL, gate | params))
        else:
            d = await self.d.db.call(RECHARGE_SQL, params)
        response = funding_pb2.RechargeResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            balance_fen=d["balance_fen"], refund_payment=bool(d.get("refund_payment")),
            settlement_exception_id=d.get("settlement_exception_id") or "")
        if "recharge" in d:
            response.recharge.CopyFrom(wire.recharge(d["recharge"]))
        # Every answer, first or replayed, approved or declined, is signed.
        response.signature = self._sign(recharge_response_signing_input(request, response))
        return response

    def _sign(self, data: bytes) -> bytes:
        """The server's signature of an answer: the remembered one if this
        exact answer (same payment, same fields) was signed before."""
        digest = gm.sm3(data)
        signature = self._signed.get(digest)
        if signature is not None:
            self._signed.move_to_end(digest)
            return signature
        signature = self._signed[digest] = gm.sm2_sign(self.d.signing_key, data)
        if len(self._signed) > SIGNED_ANSWERS:
            self._signed.popitem(last=False)
        return signature

    @rpc(Role.ADAPTER, Role.ADMIN)
    async def RefundRecharge(self, request: funding_pb2.RefundRechargeRequest, context: Ctx
                             ) -> funding_pb2.RefundRechargeResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.enum("channel", request.channel, CHANNELS)
        v.text("channel_txn_id", request.channel_txn_id, required=True, max_chars=ID_MAX_CHARS)
        v.text("channel_refund_id", request.channel_refund_id, required=True,
               max_chars=ID_MAX_CHARS)
        if (request.amount_fen != 0) == (request.refunded_total_fen != 0):
            v.add("amount_fen", "set exactly one of amount_fen and refunded_total_fen",
                  "AMOUNT_ONE_OF")
        elif request.amount_fen:
            v.amount("amount_fen", request.amount_fen, self.d.settings.max_recharge_fen)
        else:
            v.amount("refunded_total_fen", request.refunded_total_fen,
                     self.d.settings.max_recharge_fen)
        v.raise_if_any()
        _own_channel(self.d.identity(), request.channel)
        await self._check_signature(request)
        d = await self.d.db.call(REFUND_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("refund", request), "channel": request.channel,
            "channel_txn_id": request.channel_txn_id, "channel_refund_id": request.channel_refund_id,
            "amount_fen": request.amount_fen, "refunded_total_fen": request.refunded_total_fen,
            "now": self.d.clock.now()})
        response = funding_pb2.RefundRechargeResponse(refund=wire.refund(d["refund"]),
                                                      balance_fen=d["balance_fen"])
        response.signature = self._sign(refund_response_signing_input(request, response))
        return response

    async def _check_signature(
            self, request: funding_pb2.RechargeRequest | funding_pb2.RefundRechargeRequest) -> None:
        """An adapter's notification must carry a valid SM2 signature by the
        key registered for its channel. An admin need not sign a booking on
        an operator channel (OPERATOR_CHANNELS: staff at a counter), but a
        bank, WeChat Pay, Alipay or e-CNY payment must arrive signed by that
        channel's adapter, whoever relays it: unsigned from an admin it is
        PERMISSION_DENIED SIGNATURE_MISSING. Development mode (plaintext
        loopback, no identities) need not sign. A signature any caller sends
        is checked all the same, so adapter code can be tried against a dev
        server.

        SM2 verify runs in C (gmssl_pyx) but holds the GIL for about 0.5 ms,
        as does signing the answer: about 1 ms of one core per recharge,
        acceptable for recharges (payment notifications, far rarer than pump
        transactions); never do this on the authorize/confirm path. The channel
        key comes from a per-process cache (security.ChannelKeys, 30 s)."""
        if not request.signature:
            role = self.d.identity().role
            if role is Role.ADAPTER:
                raise errors.unauthenticated(
                    "SIGNATURE_MISSING", "recharge notifications must carry the channel's SM2 signature")
            if role is Role.ADMIN and request.channel not in OPERATOR_CHANNELS:
                raise errors.ApiError(
                    grpc.StatusCode.PERMISSION_DENIED, "SIGNATURE_MISSING",
                    "staff may book only counter top-ups unsigned; a payment on this channel"
                    " must carry its adapter's SM2 signature")
            return
        key = await channel_keys(self.d.db).get(request.channel)
        if key is None:
            raise errors.failed_precondition("CHANNEL_KEY_NOT_REGISTERED")
        data = (recharge_signing_input(request) if isinstance(request, funding_pb2.RechargeRequest)
                else refund_signing_input(request))
        if not gm.sm2_verify(key, data, request.signature):
            raise errors.unauthenticated(
                "SIGNATURE_INVALID", "the notification's SM2 signature does not verify")

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
        response = funding_pb2.GetRechargeResponse(recharge=wire.recharge(row[0]),
                                                   refunded_fen=row[1])
        response.signature = self._sign(get_recharge_signing_input(request, response))
        return response
