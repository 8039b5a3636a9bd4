"""Risk engine metrics (OpenTelemetry metrics API; exporters are wired by the
server's telemetry setup - without one these are no-ops)."""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

_meter = metrics.get_meter("fuelcard.risk")

decisions = _meter.create_counter(
    "fuelcard.risk.decisions", unit="{authorization}",
    description="risk engine decisions on authorizations, by decision")
fallbacks = _meter.create_counter(
    "fuelcard.risk.fallbacks", unit="{authorization}",
    description="authorizations decided by the fallback because the engine failed")
rules_fired = _meter.create_counter(
    "fuelcard.risk.rules_fired", unit="{authorization}",
    description="authorizations suspended or declined by the risk engine, by each rule that"
    " fired and the decision (terminals are not told which rules fired: this and the review"
    " listing are where operators see it)")
reviews = _meter.create_counter(
    "fuelcard.risk.reviews", unit="{hold}", description="suspended holds reviewed, by verdict")


def record(risk: dict[str, Any]) -> None:
    """Count one assessment (the `risk` object fc.authorize answers)."""
    decision = str(risk.get("decision", ""))
    decisions.add(1, {"decision": decision})
    # Only where the rules changed the outcome (REVIEW, DECLINE: rare): an
    # add costs ~6 us with an SDK provider, and score-only rules may fire by
    # the dozen on approvals. Rule ids come from the rule set in force
    # (bounded: MAX_RULES per set).
    if decision != "APPROVE":
        for rule_id in risk.get("rules") or ():
            rules_fired.add(1, {"rule": str(rule_id), "decision": decision})
    if risk.get("fallback"):
        fallbacks.add(1)
