"""RiskService: rule sets (admins) and the review of suspended holds
(reviewers)."""

from __future__ import annotations

import json
from typing import Any

import grpc
from fuelcard.v1 import risk_pb2, risk_pb2_grpc

from fuelcard_server import wire
from fuelcard_server.errors import FieldViolation
from fuelcard_server.identity import Role
from fuelcard_server.locks import RISK_RULES_LOCK
from fuelcard_server.risk import metrics as risk_metrics
from fuelcard_server.risk.model import FALLBACKS, RuleSet, load_text
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

MAX_DOCUMENT_CHARS = 1024 * 1024
MAX_NOTE_CHARS = 500
MAX_PAGE = 500

LOAD_SQL = (
    "SELECT fc.risk_load(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_lock => %(lock)s, p_actor => %(actor)s,"
    " p_name => %(name)s, p_document => %(document)s::jsonb, p_digest => %(digest)s,"
    " p_fallback => %(fallback)s::smallint, p_review_score => %(review_score)s,"
    " p_decline_score => %(decline_score)s, p_windows => %(windows)s::integer[],"
    " p_has_points => %(has_points)s, p_rules => %(rules)s::jsonb, p_now => %(now)s::timestamptz)")
ACTIVATE_SQL = (
    "SELECT fc.risk_activate(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_lock => %(lock)s, p_actor => %(actor)s,"
    " p_version => %(version)s, p_now => %(now)s::timestamptz)")
ACTIVE_SQL = "SELECT fc.risk_set_json(p_id => rule_set_id) FROM fc.risk_active"
REVIEW_SQL = (
    "SELECT fc.review_hold(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_hold_uid => %(hold_uid)s::uuid,"
    " p_approve => %(approve)s, p_reviewer => %(reviewer)s, p_note => %(note)s,"
    " p_now => %(now)s::timestamptz, p_ttl => %(ttl)s::interval)")
SUSPENDED_SQL = """
    SELECT h.id, fc.hold_json(h => h), h.risk_score, h.risk_rules
      FROM fc.holds h
     WHERE h.state = fc.hold_state_suspended() AND h.id > %s
     ORDER BY h.id LIMIT %s"""


def load_args(rule_set: RuleSet, actor: str) -> dict[str, Any]:
    """fc.risk_load's arguments but caller, request_id, request_hash and now."""
    return {"lock": RISK_RULES_LOCK, "actor": actor, "name": rule_set.name,
            "document": json.dumps(rule_set.to_document()), "digest": rule_set.digest(),
            "fallback": FALLBACKS[rule_set.fallback], "review_score": rule_set.review_score,
            "decline_score": rule_set.decline_score, "windows": rule_set.windows,
            "has_points": rule_set.has_points, "rules": json.dumps(rule_set.rows())}


def rule_set_info(d: dict[str, Any]) -> risk_pb2.RuleSetInfo:
    info = risk_pb2.RuleSetInfo(
        version=d["version"], name=d["name"], digest=d["digest"], rule_count=d["rules"],
        document_json=json.dumps(d["document"], ensure_ascii=False, sort_keys=True),
        created_by=d["created_by"], active=d["active"], activated_by=d["activated_by"] or "")
    info.create_time.FromMicroseconds(d["create_us"])
    if d["activate_us"] is not None:
        info.activate_time.FromMicroseconds(d["activate_us"])
    return info


def changes(d: dict[str, Any]) -> risk_pb2.RuleChanges:
    return risk_pb2.RuleChanges(added=d["added"], removed=d["removed"], changed=d["changed"])


class RiskService(Servicer, risk_pb2_grpc.RiskServiceServicer):

    def _actor(self) -> str:
        caller = self.d.identity()
        return caller.key or caller.name

    @rpc(Role.ADMIN)
    async def LoadRuleSet(self, request: risk_pb2.LoadRuleSetRequest, context: Ctx
                          ) -> risk_pb2.LoadRuleSetResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.enum("format", request.format, (risk_pb2.RULE_FORMAT_TOML, risk_pb2.RULE_FORMAT_JSON))
        if not request.document or len(request.document) > MAX_DOCUMENT_CHARS:
            v.add("document", f"1-{MAX_DOCUMENT_CHARS} characters", "RULES_UNREADABLE")
        v.raise_if_any()
        fmt = "toml" if request.format == risk_pb2.RULE_FORMAT_TOML else "json"
        rule_set = load_text(request.document, fmt,
                             allow_fault=self.d.settings.risk_fault_injection)
        d = await self.d.db.call(LOAD_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("risk_load", request),
            **load_args(rule_set, self._actor()), "now": self.d.clock.now()})
        return risk_pb2.LoadRuleSetResponse(rule_set=rule_set_info(d["rule_set"]),
                                            changes=changes(d["changes"]))

    @rpc(Role.ADMIN)
    async def ActivateRuleSet(self, request: risk_pb2.ActivateRuleSetRequest, context: Ctx
                              ) -> risk_pb2.ActivateRuleSetResponse:
        v = Violations()
        v.request_id(request.request_id)
        if request.version < 0:
            v.add("version", "a version from LoadRuleSet, or 0 for none", "VALUE_NEGATIVE")
        v.raise_if_any()
        d = await self.d.db.call(ACTIVATE_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("risk_activate", request), "lock": RISK_RULES_LOCK,
            "actor": self._actor(), "version": request.version, "now": self.d.clock.now()})
        response = risk_pb2.ActivateRuleSetResponse(changes=changes(d["changes"]))
        if d["rule_set"] is not None:
            response.rule_set.CopyFrom(rule_set_info(d["rule_set"]))
        return response

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def GetActiveRuleSet(self, request: risk_pb2.GetActiveRuleSetRequest, context: Ctx
                               ) -> risk_pb2.GetActiveRuleSetResponse:
        row = await self.d.db.fetch_one(ACTIVE_SQL, ())
        response = risk_pb2.GetActiveRuleSetResponse()
        if row is not None:
            response.rule_set.CopyFrom(rule_set_info(row[0]))
        return response

    @rpc(Role.REVIEWER, Role.ADMIN)
    async def ListSuspendedHolds(self, request: risk_pb2.ListSuspendedHoldsRequest, context: Ctx
                                 ) -> risk_pb2.ListSuspendedHoldsResponse:
        v = Violations()
        size = request.page_size or 50
        if not 0 <= request.page_size <= MAX_PAGE:
            v.add("page_size", f"must be 0-{MAX_PAGE}", "PAGE_SIZE_INVALID")
        after = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        rows = await self.d.reads.fetch_all(SUSPENDED_SQL, (after or 0, size + 1))
        response = risk_pb2.ListSuspendedHoldsResponse()
        for _, hold, score, rules in rows[:size]:
            response.holds.add(hold=wire.hold(hold), risk_score=score, fired_rules=rules)
        if len(rows) > size:
            response.next_page_token = str(rows[size - 1][0])
        return response

    @rpc(Role.REVIEWER)
    async def ReviewHold(self, request: risk_pb2.ReviewHoldRequest, context: Ctx
                         ) -> risk_pb2.ReviewHoldResponse:
        v = Violations()
        v.request_id(request.request_id)
        hold_id = v.uuid("hold_id", request.hold_id)
        v.enum("verdict", request.verdict,
               (risk_pb2.REVIEW_VERDICT_APPROVE, risk_pb2.REVIEW_VERDICT_REJECT))
        if len(request.note) > MAX_NOTE_CHARS:
            v.items.append(FieldViolation("note", f"at most {MAX_NOTE_CHARS} characters",
                                          "NOTE_TOO_LONG"))
        else:  # no control characters (PostgreSQL text cannot hold NUL)
            v.text("note", request.note, required=False, max_chars=MAX_NOTE_CHARS,
                   multiline=True)
        v.raise_if_any()
        approve = request.verdict == risk_pb2.REVIEW_VERDICT_APPROVE
        d = await self.d.db.call(REVIEW_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("review_hold", request), "hold_uid": hold_id,
            "approve": approve, "reviewer": self._actor(), "note": request.note,
            "now": self.d.clock.now(), "ttl": self.d.hold_ttl})
        if not d.get("replayed"):
            risk_metrics.reviews.add(1, {"verdict": "approve" if approve else "reject"})
        return risk_pb2.ReviewHoldResponse(hold=wire.hold(d["hold"]))

