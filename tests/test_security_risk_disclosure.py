"""What a terminal learns from the risk engine (issue 5 x issue 6): the
decision and a coarse decline reason, never the rules that fired or the
score - a tampered terminal could otherwise probe the rule set by trying
amounts. Reviewers still see both on the suspended-hold listing, and the
metrics count every fired rule. Through mutual TLS as a real terminal
(signed-on, MACed requests)."""

from __future__ import annotations

import json

from fuelcard.v1 import common_pb2, risk_pb2, risk_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.plugins.terminals import Fixture, rid
from tests.support.ledger_asserts import Conn, account_row


def rule_counts(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    """fuelcard.risk.rules_fired so far, by (rule, decision)."""
    out: dict[tuple[str, str], int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name != "fuelcard.risk.rules_fired":
                    continue
                for p in m.data.data_points:
                    attrs = p.attributes or {}
                    key = (str(attrs["rule"]), str(attrs["decision"]))
                    out[key] = out.get(key, 0) + int(p.value)  # type: ignore[union-attr]
    return out


def test_a_terminal_gets_the_decision_only_and_reviewers_get_the_rules(
        setup: Fixture, db: Conn, metric_reader: InMemoryMetricReader) -> None:
    admin_risk = risk_pb2_grpc.RiskServiceStub(setup.server.channel("admin-ops"))
    document = {"name": "probe", "fallback": "review", "review_score": 60, "decline_score": 100,
                "rules": [
                    {"id": "BIG-SPEND", "kind": "amount", "action": "review", "score": 65,
                     "min_amount_fen": 20_000},
                    {"id": "HUGE-SPEND", "kind": "amount", "action": "decline", "score": 100,
                     "min_amount_fen": 40_000}]}
    loaded = admin_risk.LoadRuleSet(risk_pb2.LoadRuleSetRequest(
        request_id=rid(), document=json.dumps(document), format=risk_pb2.RULE_FORMAT_JSON))
    assert loaded.rule_set.version >= 1
    before = rule_counts(metric_reader)
    t1 = setup.t1

    small = t1.pos.Authorize(t1.authorize(setup.card_number, 1_000))
    assert small.decision == common_pb2.DECISION_APPROVED
    assert small.risk == risk_pb2.RiskAssessment(decision=risk_pb2.RISK_DECISION_APPROVE)

    review_request = t1.authorize(setup.card_number, 20_000)
    review = t1.pos.Authorize(review_request)
    assert review.decision == common_pb2.DECISION_REVIEW
    assert review.hold.state == common_pb2.HOLD_STATE_SUSPENDED
    # Only the decision: no score, no rule ids, no rule set version, no fallback flag.
    assert review.risk == risk_pb2.RiskAssessment(decision=risk_pb2.RISK_DECISION_REVIEW)
    assert b"BIG-SPEND" not in review.SerializeToString()
    # A resend gets the original answer, redacted the same way.
    assert t1.pos.Authorize(review_request) == review

    declined = t1.pos.Authorize(t1.authorize(setup.card_number, 40_000))
    assert (declined.decision, declined.decline_reason) == (
        common_pb2.DECISION_DECLINED, common_pb2.DECLINE_REASON_RISK_DECLINED)
    assert declined.risk == risk_pb2.RiskAssessment(decision=risk_pb2.RISK_DECISION_DECLINE)
    assert b"SPEND" not in declined.SerializeToString()
    assert not declined.HasField("hold")
    assert account_row(db, setup.account_id)["held_fen"] == 21_000

    # The reviewer sees why the hold waits.
    reviewer = risk_pb2_grpc.RiskServiceStub(setup.server.channel("reviewer-risk"))
    listed = reviewer.ListSuspendedHolds(risk_pb2.ListSuspendedHoldsRequest())
    assert [(h.hold.hold_id, h.risk_score, list(h.fired_rules)) for h in listed.holds] == [
        (review.hold.hold_id, 65, ["BIG-SPEND"])]
    # Operators see every fired rule in the metrics, the replay not counted twice.
    after = rule_counts(metric_reader)
    fired = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    assert {k: v for k, v in fired.items() if v} == {
        ("BIG-SPEND", "REVIEW"): 1, ("BIG-SPEND", "DECLINE"): 1, ("HUGE-SPEND", "DECLINE"): 1}
