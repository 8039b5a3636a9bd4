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
reviews = _meter.create_counter(
    "fuelcard.risk.reviews", unit="{hold}", description="suspended holds reviewed, by verdict")


def record(risk: dict[str, Any]) -> None:
    """Count one assessment (the `risk` object fc.authorize answers)."""
    decisions.add(1, {"decision": str(risk.get("decision", ""))})
    if risk.get("fallback"):
        fallbacks.add(1)
