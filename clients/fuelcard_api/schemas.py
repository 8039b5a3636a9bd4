"""The JSON shapes of the API (JSON Schema 2020-12, as OpenAPI 3.1 uses),
and the conversions from the core's protobuf messages into them.

Amounts are integers in fen (分, 1/100 yuan), as in the core: no float ever
carries money. Times are RFC 3339 strings in UTC. Card numbers are always
masked; the API never sees a full one.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fuelcard.v1 import account_pb2, control_pb2
from google.protobuf.timestamp_pb2 import Timestamp

UUID = {"type": "string", "format": "uuid"}
FEN = {"type": "integer", "format": "int64", "minimum": 0, "description": "fen (1/100 yuan)"}
TIME = {"type": "string", "format": "date-time"}
PAGE_TOKEN = {"type": "string", "description": "Opaque; pass next_page_token back unchanged. "
              "Empty on the last page."}


def _obj(properties: dict[str, Any], required: list[str] | None = None,
         description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "required": required if required is not None else list(properties),
                              "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str, field: str) -> dict[str, Any]:
    return _obj({field: {"type": "array", "items": ref(item)}, "next_page_token": PAGE_TOKEN})


LIMITS = _obj({"per_transaction_fen": FEN, "daily_fen": FEN, "monthly_fen": FEN}, required=[],
              description="Spending caps in fen; 0 or absent: no cap.")
STEP_UP = _obj({"challenge_id": UUID, "code": {"type": "string", "pattern": "^[0-9]{6}$"}},
               description="The challenge from POST /v1/step-up-challenges and the code the "
                           "holder received by SMS.")

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _obj({"error": _obj({
        "status": {"type": "integer", "description": "the HTTP status, repeated"},
        "reason": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$",
                   "description": "machine-readable, e.g. STEP_UP_REQUIRED, INSUFFICIENT_FUNDS"},
        "message": {"type": "string"},
        "fields": {"type": "array", "items": _obj({"field": {"type": "string"},
                                                   "description": {"type": "string"}})},
    }, required=["status", "reason", "message"])}),
    "LoginRequest": _obj({"login": {"type": "string", "minLength": 3, "maxLength": 64},
                          "password": {"type": "string", "minLength": 1, "maxLength": 256}}),
    "Principal": _obj({"principal_id": UUID,
                       "kind": {"type": "string", "enum": ["holder", "fleet_manager"]},
                       "account_id": {**UUID, "description": "the account it has authority over "
                                      "(and that account's sub-accounts)"}}),
    "Session": _obj({"token": {"type": "string", "description": "send as `Authorization: Bearer "
                               "<token>`; it stops working at expire_time or on logout"},
                     "expire_time": TIME, "principal": ref("Principal")}),
    "Balance": _obj({"balance_fen": {"type": "integer", "format": "int64"},
                     "held_fen": {"type": "integer", "format": "int64"},
                     "available_fen": {"type": "integer", "format": "int64"}}),
    "Account": _obj({
        "account_id": UUID,
        "type": {"type": "string", "enum": ["personal", "corporate", "family"]},
        "status": {"type": "string", "enum": ["active", "frozen"]},
        "holder_name": {"type": "string"},
        "label": {"type": "string", "description": "a vehicle's plate, a family member's name"},
        "parent_account_id": {"type": "string", "description": "empty for a top-level account"},
        "funding_mode": {"type": "string", "enum": ["own", "shared", "allocated"]},
        "balance": ref("Balance"),
        "points_balance": {"type": "integer", "format": "int64"},
        "create_time": TIME}),
    "Me": _obj({"principal": ref("Principal"), "account": ref("Account")}),
    "AccountPage": _page("Account", "accounts"),
    "Card": _obj({"card_id": UUID, "account_id": UUID,
                  "masked_card_number": {"type": "string", "examples": ["6222 **** **** 1234"]},
                  "status": {"type": "string", "enum": ["active", "blocked", "closed"]},
                  "create_time": TIME}),
    "CardPage": _page("Card", "cards"),
    "Transaction": _obj({
        "transaction_id": {"type": "string"},
        "kind": {"type": "string", "enum": ["recharge", "purchase", "allocation", "recharge_refund"]},
        "amount_fen": {"type": "integer", "format": "int64",
                       "description": "signed change of the balance: positive credits it"},
        "create_time": TIME}),
    "TransactionPage": _page("Transaction", "transactions"),
    "Limits": LIMITS,
    "LimitsView": _obj({"limits": ref("Limits"), "effective_limits": ref("Limits"),
                        "used_today_fen": FEN, "used_this_month_fen": FEN,
                        "raise_end_time": {"type": ["string", "null"], "format": "date-time"}}),
    "StepUp": STEP_UP,
    "SetLimitsRequest": _obj({"limits": ref("Limits"), "step_up": ref("StepUp")}, required=["limits"],
                             description="New standing caps (they replace the old ones). A raise "
                                         "(a higher cap, or one removed) needs step_up."),
    "StepUpChallengeRequest": _obj({
        "kind": {"type": "string", "enum": ["limit_raise"]},
        "subject_id": {**UUID, "description": "the account or card the raise is for"},
        "amount_fen": {**FEN, "description": "the highest cap the raise sets; 0 if it leaves a cap "
                       "unset"}}),
    "StepUpChallenge": _obj({"challenge_id": UUID, "expire_time": TIME,
                             "masked_destination": {"type": "string", "examples": ["138****5678"]},
                             "max_attempts": {"type": "integer"}}),
    "RaiseRequest": _obj({"limits": ref("Limits"), "start_time": TIME, "end_time": TIME,
                          "step_up": ref("StepUp")},
                         description="A temporary raise: these caps from start_time to end_time "
                                     "(at most 90 days). Always needs step_up."),
    "Raise": _obj({"raise_id": {"type": "string"}}),
    "PointsTransferRequest": _obj({"from_account_id": UUID, "to_account_id": UUID,
                                   "points": {"type": "integer", "format": "int64", "minimum": 1}}),
    "PointsTransfer": _obj({"from_points_balance": {"type": "integer", "format": "int64"},
                            "to_points_balance": {"type": "integer", "format": "int64"}}),
    "TopUpRequest": _obj({"lines": {"type": "array", "minItems": 1, "maxItems": 1000, "items": _obj({
        "account_id": {**UUID, "description": "a sub-account (vehicle) with its own balance"},
        "amount_fen": {**FEN, "minimum": 1}})}},
        description="Moves money from the principal's account to its ALLOCATED sub-accounts, all "
                    "lines or none."),
    "TopUpResult": _obj({"total_fen": FEN, "parent_balance_fen": {"type": "integer", "format": "int64"}}),
}


# --- protobuf to JSON -----------------------------------------------------------------------


def time_json(ts: Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")


def _name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return "unspecified"


def account_json(a: account_pb2.Account) -> dict[str, Any]:
    return {
        "account_id": a.account_id, "type": _name(account_pb2.AccountType, a.type, "ACCOUNT_TYPE_"),
        "status": _name(account_pb2.AccountStatus, a.status, "ACCOUNT_STATUS_"),
        "holder_name": a.holder.name, "label": a.label, "parent_account_id": a.parent_account_id,
        "funding_mode": (_name(account_pb2.FundingMode, a.funding_mode, "FUNDING_MODE_")
                         if a.funding_mode else "own"),
        "balance": {"balance_fen": a.balance.balance_fen, "held_fen": a.balance.held_fen,
                    "available_fen": a.balance.balance_fen - a.balance.held_fen},
        "points_balance": a.points_balance, "create_time": time_json(a.create_time)}


def card_json(c: account_pb2.Card) -> dict[str, Any]:
    return {"card_id": c.card_id, "account_id": c.account_id, "masked_card_number": c.masked_card_number,
            "status": _name(account_pb2.CardStatus, c.status, "CARD_STATUS_"),
            "create_time": time_json(c.create_time)}


def transaction_json(t: account_pb2.Transaction) -> dict[str, Any]:
    return {"transaction_id": t.transaction_id,
            "kind": _name(account_pb2.TransactionKind, t.kind, "TRANSACTION_KIND_"),
            "amount_fen": t.amount_fen, "create_time": time_json(t.create_time)}


def limits_json(s: control_pb2.SpendingLimits) -> dict[str, Any]:
    return {"per_transaction_fen": s.per_transaction_fen, "daily_fen": s.daily_fen,
            "monthly_fen": s.monthly_fen}
