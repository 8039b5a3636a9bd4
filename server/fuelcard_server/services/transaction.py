"""TransactionService: authorize / confirm / cancel at the pump."""

from __future__ import annotations

from typing import Any

import grpc
from fuelcard.v1 import common_pb2, transaction_pb2, transaction_pb2_grpc
from opentelemetry import metrics

from fuelcard_server import errors, wire
from fuelcard_server.identity import Role
from fuelcard_server.risk import metrics as risk_metrics
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import ID_MAX_CHARS, NOZZLE_MAX, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

PRODUCTS = frozenset(v for v in common_pb2.Product.values() if v != common_pb2.PRODUCT_UNSPECIFIED)
# Generous bounds for what a pump can report, to refuse garbage early.
MAX_VOLUME_ML = 10_000_000
MAX_UNIT_PRICE_FEN = 1_000_000

AUTHORIZE_SQL = (
    "SELECT fc.authorize(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_pan_index => %(pan_index)s,"
    " p_amount_fen => %(amount_fen)s::bigint, p_station_id => %(station_id)s,"
    " p_terminal_id => %(terminal_id)s, p_nozzle => %(nozzle)s::integer,"
    " p_product => %(product)s::smallint, p_now => %(now)s::timestamptz, p_ttl => %(ttl)s::interval,"
    " p_counter => %(counter)s::bigint, p_pin_ok => %(pin_ok)s::boolean)")
CONFIRM_SQL = (
    "SELECT fc.confirm(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_hold_uid => %(hold_uid)s::uuid,"
    " p_final_fen => %(final_fen)s::bigint, p_volume_ml => %(volume_ml)s::bigint,"
    " p_unit_price_fen => %(unit_price_fen)s::bigint, p_now => %(now)s::timestamptz,"
    " p_station => %(station)s, p_terminal => %(terminal)s, p_counter => %(counter)s::bigint)")
CANCEL_SQL = (
    "SELECT fc.cancel(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_hold_uid => %(hold_uid)s::uuid,"
    " p_now => %(now)s::timestamptz, p_station => %(station)s, p_terminal => %(terminal)s,"
    " p_counter => %(counter)s::bigint)")
REVERSE_SQL = (
    "SELECT fc.reverse_authorization(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_original_request_id => %(original_request_id)s,"
    " p_now => %(now)s::timestamptz, p_station => %(station)s, p_terminal => %(terminal)s,"
    " p_counter => %(counter)s::bigint)")
REVERSAL_OUTCOMES = {
    name.removeprefix("REVERSAL_OUTCOME_"): value
    for name, value in transaction_pb2.ReversalOutcome.items() if value}
# A terminal is (station, terminal id): a "T1" of another station does not own the hold.
GET_TERMINAL_HOLD_SQL = (
    "SELECT fc.hold_json(h => h) FROM fc.holds h"
    " WHERE h.uid = %s::uuid AND h.station_id = %s AND h.terminal_id = %s")
GET_HOLD_SQL = "SELECT fc.hold_json(h => h) FROM fc.holds h WHERE h.uid = %s::uuid"
# The money is the funding account's (the parent's, for a SHARED card); the
# points are the card's own account's.
CARD_BALANCE_SQL = """
    SELECT c.uid::text, c.masked, f.uid::text, f.balance_fen, f.held_fen, a.points_balance
      FROM fc.cards c
      JOIN fc.accounts a ON a.id = c.account_id
      JOIN fc.accounts f
        ON f.id = CASE WHEN a.funding_mode = fc.funding_mode_shared() THEN a.parent_id ELSE a.id END
     WHERE c.pan_index = %s"""


# Confirms whose figures do not add up (fc.note_sale_figures, recorded on the
# hold): volume x unit price more than one fen from the amount, or a unit
# price other than the station's posted price. The sale stands (the pump's
# amount is what was charged); a pump or price board to look at.
sale_figures_off = metrics.get_meter("fuelcard.pump").create_counter(
    "fuelcard.pump.sale_figures_off", unit="{sale}",
    description="confirmed sales whose amount is not volume x unit price (amount) or whose"
    " unit price is not the posted price (price)")


def overrun_above_tolerance(exception_id: str) -> errors.ApiError:
    """A confirm past the hold by more than the overrun tolerance: nothing
    booked, the hold still open, the excess recorded as the settlement
    exception named in the metadata for finance to follow up."""
    return errors.ApiError(
        grpc.StatusCode.FAILED_PRECONDITION, "OVERRUN_ABOVE_TOLERANCE",
        "the final amount exceeds the hold by more than the overrun tolerance; nothing was"
        " booked and the excess is recorded as a settlement exception",
        metadata={"settlement_exception_id": exception_id})


class TransactionService(Servicer, transaction_pb2_grpc.TransactionServiceServicer):

    @rpc(Role.POS)
    async def Authorize(self, request: transaction_pb2.AuthorizeRequest, context: Ctx
                        ) -> transaction_pb2.AuthorizeResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.card_number("card_number", request.card_number)
        v.amount("amount_fen", request.amount_fen, self.d.settings.max_authorize_fen)
        v.text("station_id", request.station_id, required=True, max_chars=ID_MAX_CHARS)
        v.text("terminal_id", request.terminal_id, required=True, max_chars=ID_MAX_CHARS)
        v.non_negative("nozzle", request.nozzle, NOZZLE_MAX)
        v.enum("product", request.product, PRODUCTS)
        v.raise_if_any()
        caller = self.d.identity()
        if caller.role is Role.POS and (request.station_id != caller.scope
                                        or request.terminal_id != caller.name):
            raise errors.permission_denied("TERMINAL_MISMATCH")
        _, _, counter = await self.d.terminal_auth(
            request.mac, request.key_version, request.terminal_counter,
            "Authorize", request.request_id, request.card_number, request.amount_fen,
            request.station_id, request.terminal_id, request.nozzle, request.product,
            request.key_version, request.terminal_counter, request.pin_block)
        pan_index = self.d.pan_index.of(request.card_number)
        pin_ok = None
        if request.pin_block:
            if caller.role is not Role.POS or not self.d.tls:
                # Only a terminal named by its certificate has a PIN key.
                raise errors.failed_precondition("PIN_NEEDS_TERMINAL_KEY")
            pin_ok = await self.d.pins.verdict(caller.scope, caller.name, request.key_version,
                                               request.pin_block, request.card_number,
                                               pan_index, self.d.clock.now())
        d = await self.d.db.call(AUTHORIZE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("authorize", request), "pan_index": pan_index,
            "amount_fen": request.amount_fen, "station_id": request.station_id,
            "terminal_id": request.terminal_id, "nozzle": request.nozzle, "product": request.product,
            "now": self.d.clock.now(), "ttl": self.d.hold_ttl, "counter": counter, "pin_ok": pin_ok})
        response = transaction_pb2.AuthorizeResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            available_fen=d["available_fen"])
        if "hold" in d:
            response.hold.CopyFrom(wire.hold(d["hold"]))
        if "risk" in d:
            if caller.role is Role.POS:
                # The decision only: a terminal must not learn which rules
                # fired or how close it came (transaction.proto, risk).
                response.risk.decision = wire.risk_decision(d["risk"])
            else:
                response.risk.CopyFrom(wire.risk_assessment(d["risk"]))
            if not d.get("replayed"):
                risk_metrics.record(d["risk"])
        return response

    @rpc(Role.POS)
    async def Confirm(self, request: transaction_pb2.ConfirmRequest, context: Ctx
                      ) -> transaction_pb2.ConfirmResponse:
        v = Violations()
        v.request_id(request.request_id)
        hold_id = v.uuid("hold_id", request.hold_id)
        v.amount("final_amount_fen", request.final_amount_fen,
                 self.d.settings.max_authorize_fen, allow_zero=True)
        v.non_negative("volume_ml", request.volume_ml, MAX_VOLUME_ML)
        v.non_negative("unit_price_fen", request.unit_price_fen, MAX_UNIT_PRICE_FEN)
        v.raise_if_any()
        station, terminal, counter = await self.d.terminal_auth(
            request.mac, request.key_version, request.terminal_counter,
            "Confirm", request.request_id, request.hold_id, request.final_amount_fen,
            request.volume_ml, request.unit_price_fen, request.key_version,
            request.terminal_counter)
        d = await self.d.db.call(CONFIRM_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("confirm", request), "hold_uid": hold_id,
            "final_fen": request.final_amount_fen, "volume_ml": request.volume_ml,
            "unit_price_fen": request.unit_price_fen, "now": self.d.clock.now(),
            "station": station, "terminal": terminal, "counter": counter})
        if d.get("overrun_refusal") == "OVERRUN_ABOVE_TOLERANCE":
            # fc.confirm answers this refusal rather than raising it: the
            # exception it records must commit (a raise would roll it back),
            # and the answer is remembered for a retry like any other.
            raise overrun_above_tolerance(str(d["settlement_exception_id"]))
        if (d.get("amount_mismatch") or d.get("price_mismatch")) and not d.get("replayed"):
            sale_figures_off.add(1, {"amount": bool(d.get("amount_mismatch")),
                                     "price": bool(d.get("price_mismatch"))})
        return transaction_pb2.ConfirmResponse(
            decision=wire.decision(d), decline_reason=wire.decline_reason(d),
            hold=wire.hold(d["hold"]), points_earned=d["points_earned"],
            balance_fen=d["balance_fen"],
            settlement_exception_id=d.get("settlement_exception_id") or "",
            receivable_fen=d.get("receivable_fen") or 0)

    @rpc(Role.POS)
    async def Cancel(self, request: transaction_pb2.CancelRequest, context: Ctx
                     ) -> transaction_pb2.CancelResponse:
        v = Violations()
        v.request_id(request.request_id)
        hold_id = v.uuid("hold_id", request.hold_id)
        v.raise_if_any()
        station, terminal, counter = await self.d.terminal_auth(
            request.mac, request.key_version, request.terminal_counter,
            "Cancel", request.request_id, request.hold_id, request.key_version,
            request.terminal_counter)
        d = await self.d.db.call(CANCEL_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("cancel", request), "hold_uid": hold_id,
            "now": self.d.clock.now(), "station": station, "terminal": terminal, "counter": counter})
        return transaction_pb2.CancelResponse(hold=wire.hold(d["hold"]))

    @rpc(Role.POS)
    async def ReverseAuthorization(self, request: transaction_pb2.ReverseAuthorizationRequest,
                                   context: Ctx) -> transaction_pb2.ReverseAuthorizationResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.request_id(request.original_request_id, "original_request_id")
        if request.original_request_id == request.request_id:
            # The reversal's own key would be the tombstone.
            v.add("original_request_id", "must differ from request_id", "REQUEST_ID_REUSED")
        v.raise_if_any()
        station, terminal, counter = await self.d.terminal_auth(
            request.mac, request.key_version, request.terminal_counter,
            "ReverseAuthorization", request.request_id, request.original_request_id,
            request.key_version, request.terminal_counter)
        # The original's key is the caller's, as the Authorize stored it: a
        # terminal reverses only its own authorizations.
        d = await self.d.db.call(REVERSE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("reverse_authorization", request),
            "original_request_id": request.original_request_id, "now": self.d.clock.now(),
            "station": station, "terminal": terminal, "counter": counter})
        response = transaction_pb2.ReverseAuthorizationResponse(
            outcome=REVERSAL_OUTCOMES[d["outcome"]])
        if "hold" in d:
            response.hold.CopyFrom(wire.hold(d["hold"]))
        return response

    @rpc(Role.POS, Role.ADMIN, Role.REVIEWER)
    async def GetHold(self, request: transaction_pb2.GetHoldRequest, context: Ctx
                      ) -> transaction_pb2.GetHoldResponse:
        v = Violations()
        hold_id = v.uuid("hold_id", request.hold_id)
        v.raise_if_any()
        caller = self.d.identity()
        if caller.role is Role.POS:  # a terminal sees its own holds only
            row = await self.d.db.fetch_one(GET_TERMINAL_HOLD_SQL, (hold_id, caller.scope, caller.name))
        else:
            row = await self.d.db.fetch_one(GET_HOLD_SQL, (hold_id,))
        if row is None:
            raise errors.not_found("HOLD_NOT_FOUND", "hold")
        return transaction_pb2.GetHoldResponse(hold=wire.hold(row[0]))

    @rpc(Role.POS, Role.ADMIN)
    async def GetCardBalance(self, request: transaction_pb2.GetCardBalanceRequest, context: Ctx
                             ) -> transaction_pb2.GetCardBalanceResponse:
        v = Violations()
        v.card_number("card_number", request.card_number)
        v.raise_if_any()
        row = await self.d.db.fetch_one(CARD_BALANCE_SQL,
                                        (self.d.pan_index.of(request.card_number),))
        if row is None:
            raise errors.not_found("CARD_NOT_FOUND", "card")
        card_id, masked, account_id, balance_fen, held_fen, points = row
        return transaction_pb2.GetCardBalanceResponse(
            card_id=card_id, masked_card_number=masked, account_id=account_id,
            balance=wire.balance(balance_fen, held_fen), points_balance=points)
