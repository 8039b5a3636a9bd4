"""Building blocks for risk engine tests: rule sets loaded through
RiskService, stations, and authorizations with a chosen station/terminal."""

from __future__ import annotations

import json
from typing import Any

from fuelcard.v1 import (
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
    transaction_pb2,
)

from tests.plugins.server import RunningServer
from tests.support import builders


def risk(server: RunningServer) -> risk_pb2_grpc.RiskServiceStub:
    return risk_pb2_grpc.RiskServiceStub(server.channel)


def load_rules(server: RunningServer, rules: list[dict[str, Any]], *, fallback: str = "review",
               review_score: int = 60, decline_score: int = 100,
               name: str = "test") -> risk_pb2.LoadRuleSetResponse:
    """Put a rule set in force (JSON document)."""
    doc = {"name": name, "fallback": fallback, "review_score": review_score,
           "decline_score": decline_score, "rules": rules}
    response: risk_pb2.LoadRuleSetResponse = risk(server).LoadRuleSet(risk_pb2.LoadRuleSetRequest(
        request_id=builders.rid("rules"), document=json.dumps(doc),
        format=risk_pb2.RULE_FORMAT_JSON))
    return response


def rule(rule_id: str, kind: str, action: str = "review", score: int = 60,
         **params: Any) -> dict[str, Any]:
    return {"id": rule_id, "kind": kind, "action": action, "score": score, **params}


def station(server: RunningServer, station_id: str, lat: float, lon: float) -> None:
    control_pb2_grpc.ControlServiceStub(server.channel).RegisterStation(
        control_pb2.RegisterStationRequest(station=control_pb2.Station(
            station_id=station_id, name=station_id,
            location=control_pb2.GeoPoint(latitude=lat, longitude=lon))))


def authorize(server: RunningServer, card: builders.FundedCard, amount_fen: int,
              station: str = "KM-001", terminal: str = "KM-001-T1"
              ) -> transaction_pb2.AuthorizeResponse:
    response: transaction_pb2.AuthorizeResponse = server.pos.Authorize(
        builders.authorize_request(card, amount_fen, station=station, terminal=terminal))
    return response


def fired(response: transaction_pb2.AuthorizeResponse) -> list[str]:
    return list(response.risk.fired_rules)


def approved(response: transaction_pb2.AuthorizeResponse) -> bool:
    return response.decision == common_pb2.DECISION_APPROVED
