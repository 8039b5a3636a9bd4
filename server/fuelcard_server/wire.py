"""Translation between the database functions' jsonb answers and protobuf.

The fc.* functions answer in jsonb with enum values as numbers or as the
names the proto uses without their prefix; these functions build the typed
messages. No logic lives here.
"""

from __future__ import annotations

from typing import Any

from fuelcard.v1 import account_pb2, common_pb2, funding_pb2, points_pb2, risk_pb2

from fuelcard_server import privacy

_DECISION = {"APPROVED": common_pb2.DECISION_APPROVED, "DECLINED": common_pb2.DECISION_DECLINED,
             "REVIEW": common_pb2.DECISION_REVIEW}
_RISK_DECISION = {"APPROVE": risk_pb2.RISK_DECISION_APPROVE, "REVIEW": risk_pb2.RISK_DECISION_REVIEW,
                  "DECLINE": risk_pb2.RISK_DECISION_DECLINE}
_DECLINE = {
    name.removeprefix("DECLINE_REASON_"): value
    for name, value in common_pb2.DeclineReason.items()
}
CURRENCY = "CNY"


def decision(d: dict[str, Any]) -> common_pb2.Decision.ValueType:
    return _DECISION[d["decision"]]


def decline_reason(d: dict[str, Any]) -> common_pb2.DeclineReason.ValueType:
    reason = d.get("decline_reason")
    return _DECLINE[reason] if reason else common_pb2.DECLINE_REASON_UNSPECIFIED


def hold(d: dict[str, Any]) -> common_pb2.Hold:
    h = common_pb2.Hold(
        hold_id=d["hold_id"],
        account_id=d["account_id"],
        card_id=d["card_id"],
        masked_card_number=d["masked_card_number"],
        state=d["state"],
        amount_fen=d["amount_fen"],
        settled_fen=d["settled_fen"],
        station_id=d["station_id"],
        terminal_id=d["terminal_id"],
        nozzle=d["nozzle"],
        product=d["product"],
        volume_ml=d["volume_ml"],
        unit_price_fen=d["unit_price_fen"],
        points_earned=d["points_earned"],
        confirmed_late=d["confirmed_late"],
    )
    h.create_time.FromMicroseconds(d["create_us"])
    h.expire_time.FromMicroseconds(d["expire_us"])
    if d["close_us"] is not None:
        h.close_time.FromMicroseconds(d["close_us"])
    return h


def balance(balance_fen: int, held_fen: int) -> common_pb2.Balance:
    return common_pb2.Balance(balance_fen=balance_fen, held_fen=held_fen,
                              available_fen=balance_fen - held_fen, currency_code=CURRENCY)


def account(d: dict[str, Any]) -> account_pb2.Account:
    a = account_pb2.Account(
        account_id=d["account_id"],
        type=d["type"],
        status=d["status"],
        tier=d["tier"],
        balance=balance(d["balance_fen"], d["held_fen"]),
        points_balance=d["points_balance"],
        holder=account_pb2.Holder(
            name=d["holder_name"],
            phone=privacy.mask_phone(d["holder_phone"]),
            id_number=privacy.mask_id_number(d["holder_id_number"]),
        ),
    )
    a.create_time.FromMicroseconds(d["create_us"])
    a.parent_account_id = d.get("parent_account_id") or ""
    a.funding_mode = d.get("funding_mode", 0)
    a.label = d.get("label", "")
    return a


def card(d: dict[str, Any]) -> account_pb2.Card:
    c = account_pb2.Card(card_id=d["card_id"], account_id=d["account_id"],
                         masked_card_number=d["masked_card_number"], status=d["status"])
    c.create_time.FromMicroseconds(d["create_us"])
    return c


def recharge(d: dict[str, Any]) -> funding_pb2.Recharge:
    r = funding_pb2.Recharge(recharge_id=d["recharge_id"], account_id=d["account_id"],
                             channel=d["channel"], channel_txn_id=d["channel_txn_id"],
                             amount_fen=d["amount_fen"])
    r.create_time.FromMicroseconds(d["create_us"])
    return r


def refund(d: dict[str, Any]) -> funding_pb2.Refund:
    f = funding_pb2.Refund(refund_id=d["refund_id"], recharge_id=d["recharge_id"],
                           account_id=d["account_id"], channel=d["channel"],
                           channel_txn_id=d["channel_txn_id"],
                           channel_refund_id=d["channel_refund_id"], amount_fen=d["amount_fen"],
                           debited_fen=d["debited_fen"], shortfall_fen=d["shortfall_fen"])
    f.create_time.FromMicroseconds(d["create_us"])
    return f


# fc.journal kind -> PointsEntryKind, for the points asset
POINTS_KIND = {3: points_pb2.POINTS_ENTRY_KIND_EARN, 4: points_pb2.POINTS_ENTRY_KIND_REDEEM,
               6: points_pb2.POINTS_ENTRY_KIND_TRANSFER, 7: points_pb2.POINTS_ENTRY_KIND_EXPIRE}


def points_entry(d: dict[str, Any]) -> points_pb2.PointsEntry:
    """From a journal entry's jsonb; `kind` is the journal's kind."""
    e = points_pb2.PointsEntry(entry_id=d["entry_id"], kind=POINTS_KIND[d["kind"]],
                               points=d["points"],
                               hold_id=d.get("hold_id") or "",
                               description=d.get("description") or "")
    e.create_time.FromMicroseconds(d["create_us"])
    return e


def risk_decision(d: dict[str, Any]) -> risk_pb2.RiskDecision.ValueType:
    return _RISK_DECISION[d["decision"]]


def risk_assessment(d: dict[str, Any]) -> risk_pb2.RiskAssessment:
    return risk_pb2.RiskAssessment(
        decision=_RISK_DECISION[d["decision"]], score=min(d["score"], 2**31 - 1),
        fired_rules=d["rules"], rule_set_version=d["version"], fallback=d["fallback"])
