"""Building blocks for tests: accounts, cards and money, made through the API."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from typing import TypeAlias

from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    funding_pb2,
    transaction_pb2,
)

from tests.plugins import logscan
from tests.plugins.server import RunningServer

_seq = itertools.count(1)


def rid(prefix: str = "req") -> str:
    """A fresh request_id."""
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class FundedCard:
    account_id: str
    card_id: str
    card_number: str


AccountType: TypeAlias = account_pb2.AccountType.ValueType
Channel: TypeAlias = funding_pb2.Channel.ValueType


def open_card(server: RunningServer, balance_fen: int = 0,
              account_type: AccountType = account_pb2.ACCOUNT_TYPE_PERSONAL,
              phone: str = "", id_number: str = "") -> FundedCard:
    """Open an account, issue a card on it, and recharge it to balance_fen."""
    n = next(_seq)
    logscan.register("phone", phone)
    logscan.register("ID number", id_number)
    opened = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid("open"), type=account_type,
        holder=account_pb2.Holder(name=f"测试用户 {n}", phone=phone, id_number=id_number)))
    account_id = opened.account.account_id
    issued = server.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=rid("card"), account_id=account_id))
    logscan.register("card number", issued.card_number)
    if balance_fen:
        recharge(server, account_id, balance_fen)
    return FundedCard(account_id, issued.card.card_id, issued.card_number)


def recharge(server: RunningServer, account_id: str, amount_fen: int,
             channel: Channel = funding_pb2.CHANNEL_WECHAT_PAY) -> funding_pb2.RechargeResponse:
    response: funding_pb2.RechargeResponse = server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=rid("recharge"), account_id=account_id, channel=channel,
        channel_txn_id=f"wx-{uuid.uuid4().hex}", amount_fen=amount_fen))
    assert response.decision == common_pb2.DECISION_APPROVED
    return response


def authorize_request(card: FundedCard, amount_fen: int, request_id: str | None = None,
                      station: str = "KM-001", terminal: str = "KM-001-T1",
                      nozzle: int = 3) -> transaction_pb2.AuthorizeRequest:
    return transaction_pb2.AuthorizeRequest(
        request_id=request_id or rid("auth"), card_number=card.card_number,
        amount_fen=amount_fen, station_id=station, terminal_id=terminal, nozzle=nozzle,
        product=common_pb2.PRODUCT_GASOLINE_92)


def authorize(server: RunningServer, card: FundedCard, amount_fen: int
              ) -> transaction_pb2.AuthorizeResponse:
    response: transaction_pb2.AuthorizeResponse = server.pos.Authorize(
        authorize_request(card, amount_fen))
    return response


def confirm(server: RunningServer, hold_id: str, final_fen: int, request_id: str | None = None,
            volume_ml: int = 10_000, unit_price_fen: int = 785) -> transaction_pb2.ConfirmResponse:
    response: transaction_pb2.ConfirmResponse = server.pos.Confirm(transaction_pb2.ConfirmRequest(
        request_id=request_id or rid("confirm"), hold_id=hold_id, final_amount_fen=final_fen,
        volume_ml=volume_ml, unit_price_fen=unit_price_fen))
    return response


def cancel(server: RunningServer, hold_id: str, request_id: str | None = None
           ) -> transaction_pb2.CancelResponse:
    response: transaction_pb2.CancelResponse = server.pos.Cancel(transaction_pb2.CancelRequest(
        request_id=request_id or rid("cancel"), hold_id=hold_id))
    return response


def balance(server: RunningServer, card: FundedCard) -> transaction_pb2.GetCardBalanceResponse:
    response: transaction_pb2.GetCardBalanceResponse = server.pos.GetCardBalance(
        transaction_pb2.GetCardBalanceRequest(card_number=card.card_number))
    return response
