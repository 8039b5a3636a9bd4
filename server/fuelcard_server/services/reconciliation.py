"""ReconciliationService: finance staff follow up what `fuelcard reconcile`
found. Admin only; the rpc decorator audits every call."""

from __future__ import annotations

import datetime as dt
from typing import Any

import grpc
from fuelcard.v1 import funding_pb2, settlement_pb2, settlement_pb2_grpc

from fuelcard_server import errors
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

CHANNELS = frozenset(v for v in funding_pb2.Channel.values() if v != funding_pb2.CHANNEL_UNSPECIFIED)
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000
RESOLUTION_MAX_CHARS = 500

LIST_SQL = """
    SELECT b.id, fc.break_json(b => b) FROM fc.reconciliation_breaks b
     WHERE (%(channel)s = 0 OR b.channel = %(channel)s)
       AND (%(day)s::date IS NULL OR b.business_date = %(day)s::date)
       AND (%(all)s OR b.resolved_at IS NULL)
       AND b.id < %(before)s
     ORDER BY b.id DESC LIMIT %(limit)s"""
RESOLVE_SQL = (
    "SELECT fc.resolve_break(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_break_uid => %(break_uid)s::uuid,"
    " p_resolution => %(resolution)s, p_resolved_by => %(resolved_by)s,"
    " p_now => %(now)s::timestamptz)")

EXCEPTION_STATES = frozenset(v for v in settlement_pb2.ChannelExceptionState.values()
                             if v != settlement_pb2.CHANNEL_EXCEPTION_STATE_UNSPECIFIED)
# fc.channel_exceptions.reason -> ChannelExceptionKind
EXCEPTION_KINDS = {"REFUND_SHORTFALL": settlement_pb2.CHANNEL_EXCEPTION_KIND_REFUND_SHORTFALL}
LIST_EXCEPTIONS_SQL = """
    SELECT x.id, fc.channel_exception_json(x => x) FROM fc.channel_exceptions x
     WHERE (%(channel)s = 0 OR x.channel = %(channel)s)
       AND (%(state)s = 0 OR (x.resolved_at IS NULL) = (%(state)s = 1))
       AND x.id < %(before)s
     ORDER BY x.id DESC LIMIT %(limit)s"""
RESOLVE_EXCEPTION_SQL = (
    "SELECT fc.resolve_channel_exception(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_exception_uid => %(exception_uid)s::uuid,"
    " p_resolution => %(resolution)s, p_resolved_by => %(resolved_by)s,"
    " p_now => %(now)s::timestamptz)")

# Settlement exceptions (issue 14): fc.settlement_exceptions.kind and the state
# fc.settlement_exception_json names -> the enums.
SETTLEMENT_KINDS = frozenset(v for v in settlement_pb2.SettlementExceptionKind.values()
                             if v != settlement_pb2.SETTLEMENT_EXCEPTION_KIND_UNSPECIFIED)
SETTLEMENT_STATES = {"OPEN": settlement_pb2.SETTLEMENT_EXCEPTION_STATE_OPEN,
                     "RESOLVED": settlement_pb2.SETTLEMENT_EXCEPTION_STATE_RESOLVED,
                     "SETTLED": settlement_pb2.SETTLEMENT_EXCEPTION_STATE_SETTLED}
LIST_SETTLEMENT_SQL = """
    SELECT x.id, fc.settlement_exception_json(x => x) FROM fc.settlement_exceptions x
     WHERE (%(state)s = 0
            OR (%(state)s = 1 AND x.resolved_at IS NULL)
            OR (%(state)s = 2 AND x.resolved_by IS NOT NULL)
            OR (%(state)s = 3 AND x.resolved_at IS NOT NULL AND x.resolved_by IS NULL))
       AND (%(kind)s = 0 OR x.kind = %(kind)s)
       AND x.id < %(before)s
     ORDER BY x.id DESC LIMIT %(limit)s"""
GET_SETTLEMENT_SQL = (
    "SELECT fc.settlement_exception_json(x => x) FROM fc.settlement_exceptions x"
    " WHERE x.uid = %(uid)s::uuid")
RESOLVE_SETTLEMENT_SQL = (
    "SELECT fc.resolve_settlement_exception(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_exception_uid => %(exception_uid)s::uuid,"
    " p_resolution => %(resolution)s, p_resolved_by => %(resolved_by)s,"
    " p_now => %(now)s::timestamptz)")


def settlement_exception_message(d: dict[str, Any]) -> settlement_pb2.SettlementException:
    x = settlement_pb2.SettlementException(
        exception_id=d["exception_id"], kind=d["kind"], account_id=d["account_id"],
        hold_id=d["hold_id"] or "", recharge_id=d["recharge_id"] or "",
        channel=d["channel"] or 0,  # type: ignore[arg-type]
        channel_txn_id=d["channel_txn_id"] or "",
        amount_fen=d["amount_fen"], reason=d["reason"], state=SETTLEMENT_STATES[d["state"]],
        resolution=d["resolution"] or "", resolved_by=d["resolved_by"] or "")
    x.create_time.FromMicroseconds(d["create_us"])
    if d["resolve_us"] is not None:
        x.resolve_time.FromMicroseconds(d["resolve_us"])
    return x


def _record(d: dict[str, Any], side: str, channel: int, kind: int, txn: str
            ) -> settlement_pb2.SettlementRecord:
    m = settlement_pb2.SettlementRecord(
        channel=channel,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        channel_txn_id=txn, original_channel_txn_id=d[f"{side}_original"] or "",
        amount_fen=d[f"{side}_amount_fen"], status=d[f"{side}_status"])
    if side == "ours":
        m.txn_id = d["ours_txn_id"] or ""
        m.business_date = d["ours_business_date"] or ""
    else:
        m.fee_fen = d["theirs_fee_fen"] or 0
    m.time.FromMicroseconds(d[f"{side}_us"])
    return m


def break_message(d: dict[str, Any]) -> settlement_pb2.ReconciliationBreak:
    b = settlement_pb2.ReconciliationBreak(
        break_id=d["break_id"], channel=d["channel"], business_date=d["business_date"],
        kind=d["kind"], resolved=d["resolve_us"] is not None, resolution=d["resolution"] or "",
        resolved_by=d["resolved_by"] or "")
    for side, field in (("ours", b.ours), ("theirs", b.theirs)):
        if d[f"{side}_amount_fen"] is not None:
            field.CopyFrom(_record(d, side, d["channel"], d["record_kind"], d["channel_txn_id"]))
    b.create_time.FromMicroseconds(d["create_us"])
    if d["resolve_us"] is not None:
        b.resolve_time.FromMicroseconds(d["resolve_us"])
    return b


def channel_exception_message(d: dict[str, Any]) -> settlement_pb2.ChannelException:
    resolved = d["resolve_us"] is not None
    x = settlement_pb2.ChannelException(
        exception_id=d["exception_id"], channel=d["channel"],
        kind=EXCEPTION_KINDS.get(d["reason"], settlement_pb2.CHANNEL_EXCEPTION_KIND_UNSPECIFIED),
        account_id=d["account_id"], refund_id=d["refund_id"], recharge_id=d["recharge_id"],
        channel_txn_id=d["channel_txn_id"], channel_refund_id=d["channel_refund_id"],
        amount_fen=d["amount_fen"],
        state=(settlement_pb2.CHANNEL_EXCEPTION_STATE_RESOLVED if resolved
               else settlement_pb2.CHANNEL_EXCEPTION_STATE_OPEN),
        resolution=d["resolution"] or "", resolved_by=d["resolved_by"] or "")
    x.create_time.FromMicroseconds(d["create_us"])
    if resolved:
        x.resolve_time.FromMicroseconds(d["resolve_us"])
    return x


class ReconciliationService(Servicer, settlement_pb2_grpc.ReconciliationServiceServicer):

    @rpc(Role.ADMIN)
    async def ListBreaks(self, request: settlement_pb2.ListBreaksRequest, context: Ctx
                         ) -> settlement_pb2.ListBreaksResponse:
        v = Violations()
        if request.channel:
            v.enum("channel", request.channel, CHANNELS)
        day: dt.date | None = None
        if request.business_date:
            try:
                day = dt.date.fromisoformat(request.business_date)
            except ValueError:
                v.add("business_date", "must be YYYY-MM-DD", "DATE_MALFORMED")
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            v.add("page_size", f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        size = request.page_size or PAGE_SIZE_DEFAULT
        rows = await self.d.reads.fetch_all(LIST_SQL, {
            "channel": request.channel, "day": day, "all": request.include_resolved,
            "before": before if before is not None else 2**63 - 1, "limit": size + 1})
        response = settlement_pb2.ListBreaksResponse(
            breaks=[break_message(row[1]) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = str(rows[size - 1][0])
        return response

    @rpc(Role.ADMIN)
    async def ResolveBreak(self, request: settlement_pb2.ResolveBreakRequest, context: Ctx
                           ) -> settlement_pb2.ResolveBreakResponse:
        v = Violations()
        v.request_id(request.request_id)
        break_id = v.uuid("break_id", request.break_id)
        v.text("resolution", request.resolution, required=True, max_chars=RESOLUTION_MAX_CHARS)
        v.raise_if_any()
        caller = self.d.identity()
        d = await self.d.db.call(RESOLVE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("resolve_break", request), "break_uid": break_id,
            "resolution": request.resolution, "resolved_by": caller.key or caller.name,
            "now": self.d.clock.now()})
        if "break" not in d:
            raise errors.internal()
        return settlement_pb2.ResolveBreakResponse(reconciliation_break=break_message(d["break"]))

    @rpc(Role.ADMIN)
    async def ListChannelExceptions(self, request: settlement_pb2.ListChannelExceptionsRequest,
                                    context: Ctx) -> settlement_pb2.ListChannelExceptionsResponse:
        v = Violations()
        if request.channel:
            v.enum("channel", request.channel, CHANNELS)
        if request.state:
            v.enum("state", request.state, EXCEPTION_STATES)
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            v.add("page_size", f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        size = request.page_size or PAGE_SIZE_DEFAULT
        # A report-type read: the read pool (the replica when configured).
        rows = await self.d.reads.fetch_all(LIST_EXCEPTIONS_SQL, {
            "channel": request.channel, "state": request.state,
            "before": before if before is not None else 2**63 - 1, "limit": size + 1})
        response = settlement_pb2.ListChannelExceptionsResponse(
            channel_exceptions=[channel_exception_message(row[1]) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = str(rows[size - 1][0])
        return response

    @rpc(Role.ADMIN)
    async def ResolveChannelException(
            self, request: settlement_pb2.ResolveChannelExceptionRequest, context: Ctx
    ) -> settlement_pb2.ResolveChannelExceptionResponse:
        v = Violations()
        v.request_id(request.request_id)
        exception_id = v.uuid("exception_id", request.exception_id)
        v.text("resolution", request.resolution, required=True, max_chars=RESOLUTION_MAX_CHARS)
        v.raise_if_any()
        caller = self.d.identity()
        d = await self.d.db.call(RESOLVE_EXCEPTION_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("resolve_channel_exception", request),
            "exception_uid": exception_id, "resolution": request.resolution,
            "resolved_by": caller.key or caller.name, "now": self.d.clock.now()})
        if "channel_exception" not in d:
            raise errors.internal()
        return settlement_pb2.ResolveChannelExceptionResponse(
            channel_exception=channel_exception_message(d["channel_exception"]))

    @rpc(Role.ADMIN)
    async def ListSettlementExceptions(
            self, request: settlement_pb2.ListSettlementExceptionsRequest, context: Ctx
    ) -> settlement_pb2.ListSettlementExceptionsResponse:
        v = Violations()
        if request.state:
            v.enum("state", request.state, SETTLEMENT_STATES.values())
        if request.kind:
            v.enum("kind", request.kind, SETTLEMENT_KINDS)
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            v.add("page_size", f"must be 0-{PAGE_SIZE_MAX}", "PAGE_SIZE_INVALID")
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        size = request.page_size or PAGE_SIZE_DEFAULT
        rows = await self.d.reads.fetch_all(LIST_SETTLEMENT_SQL, {
            "state": request.state, "kind": request.kind,
            "before": before if before is not None else 2**63 - 1, "limit": size + 1})
        response = settlement_pb2.ListSettlementExceptionsResponse(
            settlement_exceptions=[settlement_exception_message(row[1]) for row in rows[:size]])
        if len(rows) > size:
            response.next_page_token = str(rows[size - 1][0])
        return response

    @rpc(Role.ADMIN)
    async def GetSettlementException(
            self, request: settlement_pb2.GetSettlementExceptionRequest, context: Ctx
    ) -> settlement_pb2.GetSettlementExceptionResponse:
        v = Violations()
        uid = v.uuid("exception_id", request.exception_id)
        v.raise_if_any()
        # The primary: a resolution made a moment ago shows at once.
        row = await self.d.db.fetch_one(GET_SETTLEMENT_SQL, {"uid": uid})
        if row is None or row[0] is None:
            raise errors.not_found("SETTLEMENT_EXCEPTION_NOT_FOUND", "settlement exception")
        return settlement_pb2.GetSettlementExceptionResponse(
            settlement_exception=settlement_exception_message(row[0]))

    @rpc(Role.ADMIN)
    async def ResolveSettlementException(
            self, request: settlement_pb2.ResolveSettlementExceptionRequest, context: Ctx
    ) -> settlement_pb2.ResolveSettlementExceptionResponse:
        v = Violations()
        v.request_id(request.request_id)
        exception_id = v.uuid("exception_id", request.exception_id)
        v.text("resolution", request.resolution, required=True, max_chars=RESOLUTION_MAX_CHARS,
               multiline=True)
        v.raise_if_any()
        caller = self.d.identity()
        d = await self.d.db.call(RESOLVE_SETTLEMENT_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("resolve_settlement_exception", request),
            "exception_uid": exception_id, "resolution": request.resolution,
            "resolved_by": caller.key or caller.name, "now": self.d.clock.now()})
        if "settlement_exception" not in d:
            raise errors.internal()
        return settlement_pb2.ResolveSettlementExceptionResponse(
            settlement_exception=settlement_exception_message(d["settlement_exception"]))
