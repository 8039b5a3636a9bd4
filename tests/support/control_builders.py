"""Building blocks for the tests of issue 4 (account hierarchy and spending
controls): fleets, families, limits, scopes and stations, made through the
real gRPC API against the real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    points_pb2,
    transaction_pb2,
)
from fuelcard_server import verify
from google.protobuf import timestamp_pb2

from tests.plugins import logscan
from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.builders import FundedCard, rid

AccountType: TypeAlias = account_pb2.AccountType.ValueType
FundingMode: TypeAlias = account_pb2.FundingMode.ValueType
Product: TypeAlias = common_pb2.Product.ValueType
Reason: TypeAlias = common_pb2.DeclineReason.ValueType

SHARED = account_pb2.FUNDING_MODE_SHARED
ALLOCATED = account_pb2.FUNDING_MODE_ALLOCATED
APPROVED = common_pb2.DECISION_APPROVED
DECLINED = common_pb2.DECISION_DECLINED
BUSINESS_TZ = dt.timezone(dt.timedelta(hours=8))  # Asia/Shanghai has no DST

_seq = itertools.count(1)


def control(server: RunningServer, channel: grpc.Channel | None = None
            ) -> control_pb2_grpc.ControlServiceStub:
    return control_pb2_grpc.ControlServiceStub(channel or server.channel)


def local_now(server: RunningServer) -> dt.datetime:
    """The server clock's time in the business time zone."""
    return server.clock.now().astimezone(BUSINESS_TZ)


def advance_to_local(server: RunningServer, when: dt.datetime) -> None:
    """Move the clock forward to a wall-clock moment in Shanghai."""
    target = when.replace(tzinfo=BUSINESS_TZ) if when.tzinfo is None else when
    delta = target - server.clock.now()
    assert delta >= dt.timedelta(0), f"the clock cannot go back to {target}"
    server.advance(delta)


def ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


# --------------------------------------------------------------------------
# Accounts and cards
# --------------------------------------------------------------------------

def open_account(server: RunningServer, account_type: AccountType = account_pb2.ACCOUNT_TYPE_CORPORATE,
                 parent: str = "", mode: FundingMode = account_pb2.FUNDING_MODE_UNSPECIFIED,
                 label: str = "", name: str | None = None) -> account_pb2.Account:
    n = next(_seq)
    response = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid("open"),
        type=account_pb2.ACCOUNT_TYPE_UNSPECIFIED if parent else account_type,
        holder=account_pb2.Holder(name=name or f"车队 {n}"), parent_account_id=parent,
        funding_mode=mode, label=label))
    account: account_pb2.Account = response.account
    return account


def issue_card(server: RunningServer, account_id: str) -> FundedCard:
    issued = server.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=rid("card"), account_id=account_id))
    logscan.register("card number", issued.card_number)
    return FundedCard(account_id, issued.card.card_id, issued.card_number)


@dataclass(frozen=True)
class Fleet:
    """A parent account with a card of its own and sub-accounts, one card each."""

    parent: FundedCard
    subs: list[FundedCard]

    @property
    def parent_id(self) -> str:
        return self.parent.account_id


def open_fleet(server: RunningServer, balance_fen: int, modes: list[FundingMode],
               account_type: AccountType = account_pb2.ACCOUNT_TYPE_CORPORATE,
               labels: list[str] | None = None) -> Fleet:
    parent = open_account(server, account_type)
    parent_card = issue_card(server, parent.account_id)
    if balance_fen:
        builders.recharge(server, parent.account_id, balance_fen)
    subs = []
    for i, mode in enumerate(modes):
        label = labels[i] if labels else f"云A·{10000 + i}"
        sub = open_account(server, parent=parent.account_id, mode=mode, label=label)
        subs.append(issue_card(server, sub.account_id))
    return Fleet(parent_card, subs)


def get_account(server: RunningServer, account_id: str) -> account_pb2.Account:
    account: account_pb2.Account = server.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=account_id)).account
    return account


def balance_of(server: RunningServer, account_id: str) -> tuple[int, int]:
    """(balance_fen, held_fen) of an account."""
    b = get_account(server, account_id).balance
    return b.balance_fen, b.held_fen


def points_of(server: RunningServer, account_id: str) -> int:
    n: int = server.points.GetPointsBalance(
        points_pb2.GetPointsBalanceRequest(account_id=account_id)).points_balance
    return n


# --------------------------------------------------------------------------
# At the pump
# --------------------------------------------------------------------------

def auth_request(card: FundedCard, amount_fen: int, station: str = "KM-001",
                 product: Product = common_pb2.PRODUCT_GASOLINE_92,
                 request_id: str | None = None) -> transaction_pb2.AuthorizeRequest:
    return transaction_pb2.AuthorizeRequest(
        request_id=request_id or rid("auth"), card_number=card.card_number, amount_fen=amount_fen,
        station_id=station, terminal_id=f"{station}-T1", nozzle=2, product=product)


def authorize(server: RunningServer, card: FundedCard, amount_fen: int, station: str = "KM-001",
              product: Product = common_pb2.PRODUCT_GASOLINE_92) -> transaction_pb2.AuthorizeResponse:
    response: transaction_pb2.AuthorizeResponse = server.pos.Authorize(
        auth_request(card, amount_fen, station, product))
    return response


def approved(server: RunningServer, card: FundedCard, amount_fen: int, station: str = "KM-001",
             product: Product = common_pb2.PRODUCT_GASOLINE_92) -> common_pb2.Hold:
    """Authorize and insist on approval; the hold."""
    response = authorize(server, card, amount_fen, station, product)
    assert response.decision == APPROVED, common_pb2.DeclineReason.Name(response.decline_reason)
    hold: common_pb2.Hold = response.hold
    return hold


def declined(server: RunningServer, card: FundedCard, amount_fen: int, station: str = "KM-001",
             product: Product = common_pb2.PRODUCT_GASOLINE_92) -> Reason:
    """Authorize and insist on a decline; its reason."""
    response = authorize(server, card, amount_fen, station, product)
    assert response.decision == DECLINED, response
    assert not response.HasField("hold")
    return response.decline_reason


def sale(server: RunningServer, card: FundedCard, amount_fen: int, volume_ml: int = 10_000,
         station: str = "KM-001") -> transaction_pb2.ConfirmResponse:
    """An authorized and confirmed sale of exactly amount_fen."""
    hold = approved(server, card, amount_fen, station)
    done = builders.confirm(server, hold.hold_id, amount_fen, volume_ml=volume_ml)
    assert done.decision == APPROVED
    return done


# --------------------------------------------------------------------------
# Controls
# --------------------------------------------------------------------------

def limits(txn: int = 0, daily: int = 0, monthly: int = 0) -> control_pb2.SpendingLimits:
    return control_pb2.SpendingLimits(per_transaction_fen=txn, daily_fen=daily, monthly_fen=monthly)


def set_limits(server: RunningServer, actor: str, *, card: str = "", account: str = "",
               txn: int = 0, daily: int = 0, monthly: int = 0
               ) -> control_pb2.SetSpendingLimitsResponse:
    request = control_pb2.SetSpendingLimitsRequest(
        request_id=rid("limits"), actor_account_id=actor, limits=limits(txn, daily, monthly))
    if card:
        request.card_id = card
    else:
        request.account_id = account
    response: control_pb2.SetSpendingLimitsResponse = control(server).SetSpendingLimits(request)
    return response


def get_limits(server: RunningServer, *, card: str = "", account: str = ""
               ) -> control_pb2.GetSpendingLimitsResponse:
    request = control_pb2.GetSpendingLimitsRequest()
    if card:
        request.card_id = card
    else:
        request.account_id = account
    response: control_pb2.GetSpendingLimitsResponse = control(server).GetSpendingLimits(request)
    return response


def caps(spending: control_pb2.SpendingLimits) -> tuple[int, int, int]:
    return spending.per_transaction_fen, spending.daily_fen, spending.monthly_fen


def grant_raise(server: RunningServer, actor: str, start: dt.datetime, end: dt.datetime, *,
                card: str = "", account: str = "", txn: int = 0, daily: int = 0, monthly: int = 0
                ) -> control_pb2.GrantTemporaryRaiseResponse:
    request = control_pb2.GrantTemporaryRaiseRequest(
        request_id=rid("raise"), actor_account_id=actor, limits=limits(txn, daily, monthly),
        start_time=ts(start), end_time=ts(end))
    if card:
        request.card_id = card
    else:
        request.account_id = account
    response: control_pb2.GrantTemporaryRaiseResponse = control(server).GrantTemporaryRaise(request)
    return response


def set_scope(server: RunningServer, actor: str, card: str, **scope: Any
              ) -> control_pb2.SetCardScopeResponse:
    response: control_pb2.SetCardScopeResponse = control(server).SetCardScope(
        control_pb2.SetCardScopeRequest(request_id=rid("scope"), actor_account_id=actor,
                                        card_id=card, scope=control_pb2.CardScope(**scope)))
    return response


def register_station(server: RunningServer, station_id: str, latitude: float, longitude: float,
                     name: str | None = None) -> control_pb2.Station:
    station: control_pb2.Station = control(server).RegisterStation(
        control_pb2.RegisterStationRequest(station=control_pb2.Station(
            station_id=station_id, name=name or f"加油站 {station_id}",
            location=control_pb2.GeoPoint(latitude=latitude, longitude=longitude)))).station
    return station


def top_up_request(parent: str, lines: list[tuple[str, int]], request_id: str | None = None
                   ) -> control_pb2.BatchTopUpRequest:
    return control_pb2.BatchTopUpRequest(
        request_id=request_id or rid("batch"), parent_account_id=parent,
        lines=[control_pb2.TopUpLine(account_id=a, amount_fen=n) for a, n in lines])


def batch_top_up(server: RunningServer, parent: str, lines: list[tuple[str, int]]
                 ) -> control_pb2.BatchTopUpResponse:
    response: control_pb2.BatchTopUpResponse = control(server).BatchTopUp(
        top_up_request(parent, lines))
    return response


def transfer_points(server: RunningServer, from_account: str, to_account: str, points: int,
                    request_id: str | None = None) -> control_pb2.TransferPointsResponse:
    response: control_pb2.TransferPointsResponse = control(server).TransferPoints(
        control_pb2.TransferPointsRequest(request_id=request_id or rid("pool"),
                                          from_account_id=from_account, to_account_id=to_account,
                                          points=points))
    return response


def changes(server: RunningServer, account_id: str) -> list[control_pb2.ControlChange]:
    response = control(server).ListControlChanges(
        control_pb2.ListControlChangesRequest(account_id=account_id, page_size=500))
    return list(response.changes)


def assert_verified(server: RunningServer) -> None:
    violations = verify.run(server.database_url)
    assert violations == [], [(v.check, v.samples) for v in violations]


def new_uuid() -> str:
    return str(uuid.uuid4())
