"""Semantic 8: bad input changes nothing.

Every case sends one bad request through the real stubs and checks the
status (INVALID_ARGUMENT with a BadRequest naming the field, NOT_FOUND, or
FAILED_PRECONDITION with its ErrorInfo reason), that no error echoes a card
number, and that every table of schema fc is exactly as it was before.

The cases share one server and database (module scope): none of them may
change it, and each checks that itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, common_pb2, funding_pb2, points_pb2, transaction_pb2
from fuelcard_server.cards import luhn_check_digit
from google.protobuf.message import Message

from tests.plugins.database import PostgresCluster
from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import (
    Conn,
    RichError,
    assert_ledger_ok,
    expect,
    rpc_error,
    shared_server,
    snapshot,
)

IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
FP = grpc.StatusCode.FAILED_PRECONDITION
I64_MAX = 2**63 - 1
I64_MIN = -(2**63)
I32_MAX = 2**31 - 1
I32_MIN = -(2**31)


def _pan(prefix: str, length: int = 19) -> str:
    body = (prefix + "0" * length)[: length - 1]
    return body + luhn_check_digit(body)


@dataclass
class World:
    server: RunningServer
    db: Conn
    card: builders.FundedCard
    closed_card: builders.FundedCard
    open_hold: str
    confirmed_hold: str
    cancelled_hold: str
    channel_txn: str
    used_request_id: str
    system_account: str

    @property
    def secrets(self) -> list[str]:
        return [self.card.card_number, self.closed_card.card_number]


@pytest.fixture(scope="module")
def world(pg_cluster: PostgresCluster, migrated_template: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("bad-input")
    with shared_server(pg_cluster, migrated_template, tmp, f"fuelcard_bad_input_{uuid.uuid4().hex[:8]}"
                       ) as server, psycopg.connect(server.database_url, autocommit=True) as db:
        card = builders.open_card(server, balance_fen=100_000)
        issued = server.accounts.IssueCard(account_pb2.IssueCardRequest(
            request_id=builders.rid("card"), account_id=card.account_id))
        closed = builders.FundedCard(card.account_id, issued.card.card_id, issued.card_number)
        server.accounts.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
            request_id=builders.rid("close"), card_id=closed.card_id,
            status=account_pb2.CARD_STATUS_CLOSED))
        open_hold = builders.authorize(server, card, 20_000).hold.hold_id
        confirmed = builders.authorize(server, card, 20_000).hold.hold_id
        builders.confirm(server, confirmed, 15_000)
        cancelled = builders.authorize(server, card, 20_000).hold.hold_id
        builders.cancel(server, cancelled)
        txn = f"wx-{uuid.uuid4().hex}"
        used = builders.rid("used")
        server.funding.Recharge(funding_pb2.RechargeRequest(
            request_id=used, account_id=card.account_id, channel=funding_pb2.CHANNEL_WECHAT_PAY,
            channel_txn_id=txn, amount_fen=1_000))
        builders.authorize(server, card, 100)  # a few points worth of history
        row = db.execute("SELECT uid::text FROM fc.accounts WHERE system_code = 'FUEL_SALES'"
                         ).fetchone()
        assert row is not None
        yield World(server, db, card, closed, open_hold, confirmed, cancelled, txn, used, row[0])


# --------------------------------------------------------------------------
# Request builders: a valid request, with one thing changed
# --------------------------------------------------------------------------

def auth(w: World, **changes: Any) -> Callable[[], object]:
    req = builders.authorize_request(w.card, 1_000)
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.pos.Authorize(req)


def conf(w: World, **changes: Any) -> Callable[[], object]:
    req = transaction_pb2.ConfirmRequest(request_id=builders.rid("c"), hold_id=w.open_hold,
                                         final_amount_fen=1_000, volume_ml=1_000, unit_price_fen=785)
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.pos.Confirm(req)


def canc(w: World, **changes: Any) -> Callable[[], object]:
    req = transaction_pb2.CancelRequest(request_id=builders.rid("x"), hold_id=w.open_hold)
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.pos.Cancel(req)


def rech(w: World, **changes: Any) -> Callable[[], object]:
    req = funding_pb2.RechargeRequest(request_id=builders.rid("r"), account_id=w.card.account_id,
                                      channel=funding_pb2.CHANNEL_ALIPAY,
                                      channel_txn_id=f"ali-{uuid.uuid4().hex}", amount_fen=1_000)
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.funding.Recharge(req)


def redeem(w: World, **changes: Any) -> Callable[[], object]:
    req = points_pb2.RedeemPointsRequest(request_id=builders.rid("p"), account_id=w.card.account_id,
                                         points=1, description="mall")
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.points.RedeemPoints(req)


def open_acct(w: World, name: str = "张三", phone: str = "", id_number: str = "",
              **changes: Any) -> Callable[[], object]:
    req = account_pb2.OpenAccountRequest(
        request_id=builders.rid("o"), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name=name, phone=phone, id_number=id_number))
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.accounts.OpenAccount(req)


def issue(w: World, **changes: Any) -> Callable[[], object]:
    req = account_pb2.IssueCardRequest(request_id=builders.rid("i"), account_id=w.card.account_id)
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.accounts.IssueCard(req)


def status(w: World, **changes: Any) -> Callable[[], object]:
    req = account_pb2.UpdateCardStatusRequest(request_id=builders.rid("s"), card_id=w.card.card_id,
                                              status=account_pb2.CARD_STATUS_BLOCKED)
    for k, v in changes.items():
        setattr(req, k, v)
    return lambda: w.server.accounts.UpdateCardStatus(req)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[World], Callable[[], object]]
    code: grpc.StatusCode
    reason: str | None = None
    field: str | None = None


UNKNOWN = "0b6c5a53-7e1f-4b8e-9a49-3b1c2f6d0e11"
MALFORMED_IDS = [
    ("empty", ""),
    ("word", "not-a-uuid"),
    ("short", "0b6c5a53-7e1f-4b8e-9a49-3b1c2f6d0e1"),
    ("long", "0b6c5a53-7e1f-4b8e-9a49-3b1c2f6d0e111"),
    ("non-hex", "0b6c5a53-7e1f-4b8e-9a49-3b1c2f6d0e1z"),
    ("urn", "urn:0b6c5a537e1f4b8e9a493b1c2f6d0e11"),
    ("hyphens-moved", "0b6c5a537e1f4b8e9a49-3b1c2f6d0e11---"),
    ("braces", "{0b6c5a53-7e1f-4b8e9a493b1c2f6d0e11}"),
    ("nul", "0b6c5a53-7e1f-4b8e-9a49-3b1c2f6d0e1\x00"),
    ("sql", "'; DROP TABLE fc.journal; --aaaaaaaa"),
]
BAD_REQUEST_IDS = [
    ("missing", ""),
    ("65-chars", "r" * 65),
    ("space", "req 1"),
    ("non-ascii", "请求-1"),
    ("control", "req\x01"),
    ("huge", "r" * 100_000),
]
BAD_PANS = [
    ("empty", ""),
    ("bad-luhn", "6222020200112233441"),
    ("15-digits", _pan("622202", 15)),
    ("20-digits", _pan("622202", 20)),
    ("letters", "6222abcd00112233440"),
    ("spaces", "6222 0202 0011 2233"),
    ("fullwidth-digits", "６２２２０２０２００１１２２３３４４０"),
]


def _with(builder: Callable[..., Callable[[], object]], **changes: Any
          ) -> Callable[[World], Callable[[], object]]:
    return lambda w: builder(w, **changes)


def _read(service: str, method: str, make: Callable[[World], Message]
          ) -> Callable[[World], Callable[[], object]]:
    def call(w: World) -> Callable[[], object]:
        req = make(w)
        stub = getattr(w.server, service)
        return lambda: getattr(stub, method)(req)
    return call


def _flipped(w: World) -> str:
    pan = w.card.card_number
    return pan[:-1] + str((int(pan[-1]) + 1) % 10)


def _cases() -> list[Case]:
    c: list[Case] = []
    # --- Authorize ---------------------------------------------------------
    for amount, reason in [(0, "AMOUNT_NOT_POSITIVE"), (-1, "AMOUNT_NOT_POSITIVE"),
                           (I64_MIN, "AMOUNT_NOT_POSITIVE"), (1_000_001, "AMOUNT_TOO_LARGE"),
                           (I64_MAX, "AMOUNT_TOO_LARGE")]:
        c.append(Case(f"authorize-amount-{amount}", _with(auth, amount_fen=amount), IA, reason,
                      "amount_fen"))
    for name, rid in BAD_REQUEST_IDS:
        c.append(Case(f"authorize-request_id-{name}", _with(auth, request_id=rid), IA, None,
                      "request_id"))
    for name, pan in BAD_PANS:
        c.append(Case(f"authorize-card-{name}", _with(auth, card_number=pan), IA, None,
                      "card_number"))
    c.append(Case("authorize-card-flipped-check-digit",
                  lambda w: auth(w, card_number=_flipped(w)), IA, "CARD_NUMBER_MALFORMED",
                  "card_number"))
    c.append(Case("authorize-card-unknown", _with(auth, card_number=_pan("622848")),
                  NF, "CARD_NOT_FOUND"))
    for fld in ("station_id", "terminal_id"):
        for name, text, reason in [("empty", "", "FIELD_MISSING"), ("blank", "   ", "FIELD_MISSING"),
                                   ("65-chars", "s" * 65, "FIELD_TOO_LONG"),
                                   ("100k-chars", "站" * 100_000, "FIELD_TOO_LONG"),
                                   ("control", "KM\x00001", "FIELD_MALFORMED"),
                                   ("newline", "KM\n001", "FIELD_MALFORMED")]:
            c.append(Case(f"authorize-{fld}-{name}", _with(auth, **{fld: text}), IA, reason, fld))
    for nozzle, reason in [(-1, "VALUE_NEGATIVE"), (I32_MIN, "VALUE_NEGATIVE"),
                           (1_000, "VALUE_TOO_LARGE"), (I32_MAX, "VALUE_TOO_LARGE")]:
        c.append(Case(f"authorize-nozzle-{nozzle}", _with(auth, nozzle=nozzle), IA, reason,
                      "nozzle"))
    for product in (common_pb2.PRODUCT_UNSPECIFIED, 99, -1):
        c.append(Case(f"authorize-product-{product}", _with(auth, product=product), IA,
                      "ENUM_VALUE_INVALID", "product"))
    # --- Confirm ----------------------------------------------------------
    for name, bad_id in MALFORMED_IDS:
        c.append(Case(f"confirm-hold_id-{name}", _with(conf, hold_id=bad_id), IA, None, "hold_id"))
    c.append(Case("confirm-hold-unknown", _with(conf, hold_id=UNKNOWN), NF, "HOLD_NOT_FOUND"))
    for amount, reason in [(-1, "AMOUNT_NEGATIVE"), (I64_MIN, "AMOUNT_NEGATIVE"),
                           (I64_MAX, "AMOUNT_TOO_LARGE"), (1_000_001, "AMOUNT_TOO_LARGE")]:
        # (Above the hold is an overrun, no longer bad input: tests/test_overruns.py.)
        c.append(Case(f"confirm-final-{amount}", _with(conf, final_amount_fen=amount), IA, reason,
                      "final_amount_fen"))
    for fld in ("volume_ml", "unit_price_fen"):
        for value, reason in [(-1, "VALUE_NEGATIVE"), (I64_MIN, "VALUE_NEGATIVE"),
                              (I64_MAX, "VALUE_TOO_LARGE")]:
            c.append(Case(f"confirm-{fld}-{value}", _with(conf, **{fld: value}), IA, reason, fld))
    for name, rid in BAD_REQUEST_IDS[:3]:
        c.append(Case(f"confirm-request_id-{name}", _with(conf, request_id=rid), IA, None,
                      "request_id"))
    c.append(Case("confirm-confirmed-hold", lambda w: conf(w, hold_id=w.confirmed_hold),
                  FP, "HOLD_ALREADY_CONFIRMED"))
    c.append(Case("confirm-cancelled-hold", lambda w: conf(w, hold_id=w.cancelled_hold),
                  FP, "HOLD_CANCELLED"))
    c.append(Case("confirm-request_id-reused", lambda w: conf(w, request_id=w.used_request_id),
                  FP, "REQUEST_ID_REUSED"))
    # --- Cancel -------------------------------------------------------------
    for name, bad_id in MALFORMED_IDS[:6]:
        c.append(Case(f"cancel-hold_id-{name}", _with(canc, hold_id=bad_id), IA, None, "hold_id"))
    c.append(Case("cancel-hold-unknown", _with(canc, hold_id=UNKNOWN), NF, "HOLD_NOT_FOUND"))
    c.append(Case("cancel-request_id-missing", _with(canc, request_id=""),
                  IA, "REQUEST_ID_MISSING", "request_id"))
    c.append(Case("cancel-confirmed-hold", lambda w: canc(w, hold_id=w.confirmed_hold),
                  FP, "HOLD_ALREADY_CONFIRMED"))
    c.append(Case("cancel-request_id-reused", lambda w: canc(w, request_id=w.used_request_id),
                  FP, "REQUEST_ID_REUSED"))
    # --- Recharge -----------------------------------------------------------
    for amount, reason in [(0, "AMOUNT_NOT_POSITIVE"), (-1, "AMOUNT_NOT_POSITIVE"),
                           (I64_MIN, "AMOUNT_NOT_POSITIVE"), (5_000_001, "AMOUNT_TOO_LARGE"),
                           (I64_MAX, "AMOUNT_TOO_LARGE")]:
        c.append(Case(f"recharge-amount-{amount}", _with(rech, amount_fen=amount), IA, reason,
                      "amount_fen"))
    for channel in (funding_pb2.CHANNEL_UNSPECIFIED, 99):
        c.append(Case(f"recharge-channel-{channel}", _with(rech, channel=channel), IA,
                      "ENUM_VALUE_INVALID", "channel"))
    for name, text, reason in [("empty", "", "FIELD_MISSING"), ("65-chars", "t" * 65, "FIELD_TOO_LONG"),
                               ("control", "t\x07", "FIELD_MALFORMED")]:
        c.append(Case(f"recharge-channel_txn_id-{name}", _with(rech, channel_txn_id=text), IA,
                      reason, "channel_txn_id"))
    for name, bad_id in MALFORMED_IDS[:6]:
        c.append(Case(f"recharge-account_id-{name}", _with(rech, account_id=bad_id), IA, None,
                      "account_id"))
    c.append(Case("recharge-account-unknown", _with(rech, account_id=UNKNOWN),
                  NF, "ACCOUNT_NOT_FOUND"))
    c.append(Case("recharge-system-account", lambda w: rech(w, account_id=w.system_account),
                  NF, "ACCOUNT_NOT_FOUND"))
    c.append(Case("recharge-request_id-missing", _with(rech, request_id=""),
                  IA, "REQUEST_ID_MISSING", "request_id"))
    c.append(Case("recharge-channel-txn-reused",
                  lambda w: rech(w, channel=funding_pb2.CHANNEL_WECHAT_PAY,
                                 channel_txn_id=w.channel_txn, amount_fen=999),
                  FP, "CHANNEL_TXN_REUSED"))
    c.append(Case("recharge-request_id-reused", lambda w: rech(w, request_id=w.used_request_id),
                  FP, "REQUEST_ID_REUSED"))
    # --- RedeemPoints --------------------------------------------------------
    for points, reason in [(0, "AMOUNT_NOT_POSITIVE"), (-5, "AMOUNT_NOT_POSITIVE"),
                           (I64_MIN, "AMOUNT_NOT_POSITIVE"), (100_000_001, "AMOUNT_TOO_LARGE"),
                           (I64_MAX, "AMOUNT_TOO_LARGE")]:
        c.append(Case(f"redeem-points-{points}", _with(redeem, points=points), IA, reason,
                      "points"))
    c.append(Case("redeem-description-201", _with(redeem, description="d" * 201),
                  IA, "FIELD_TOO_LONG", "description"))
    c.append(Case("redeem-description-control", _with(redeem, description="a\x1bb"),
                  IA, "FIELD_MALFORMED", "description"))
    for name, bad_id in MALFORMED_IDS[:6]:
        c.append(Case(f"redeem-account_id-{name}", _with(redeem, account_id=bad_id), IA, None,
                      "account_id"))
    c.append(Case("redeem-account-unknown", _with(redeem, account_id=UNKNOWN),
                  NF, "ACCOUNT_NOT_FOUND"))
    c.append(Case("redeem-system-account", lambda w: redeem(w, account_id=w.system_account),
                  NF, "ACCOUNT_NOT_FOUND"))
    c.append(Case("redeem-request_id-missing", _with(redeem, request_id=""),
                  IA, "REQUEST_ID_MISSING", "request_id"))
    # --- OpenAccount ---------------------------------------------------------
    for kind in (account_pb2.ACCOUNT_TYPE_UNSPECIFIED, 100, 99):
        c.append(Case(f"open-type-{kind}", _with(open_acct, type=kind), IA,
                      "ENUM_VALUE_INVALID", "type"))
    for name, text, reason in [("empty", "", "FIELD_MISSING"), ("blank", " ", "FIELD_MISSING"),
                               ("101-chars", "名" * 101, "FIELD_TOO_LONG"),
                               ("control", "张\x00三", "FIELD_MALFORMED")]:
        c.append(Case(f"open-name-{name}", _with(open_acct, name=text), IA, reason, "holder.name"))
    for name, text in [("letters", "1381234567a"), ("short", "1234"), ("21-digits", "1" * 21),
                       ("plus", "+8613812345678")]:
        c.append(Case(f"open-phone-{name}", _with(open_acct, phone=text), IA, "PHONE_MALFORMED",
                      "holder.phone"))
    for name, text in [("symbols", "1101-0119"), ("33-chars", "1" * 33)]:
        c.append(Case(f"open-id_number-{name}", _with(open_acct, id_number=text), IA,
                      "ID_NUMBER_MALFORMED", "holder.id_number"))
    c.append(Case("open-request_id-missing", _with(open_acct, request_id=""),
                  IA, "REQUEST_ID_MISSING", "request_id"))
    c.append(Case("open-request_id-reused", lambda w: open_acct(w, request_id=w.used_request_id),
                  FP, "REQUEST_ID_REUSED"))
    # --- IssueCard -----------------------------------------------------------
    for name, bad_id in MALFORMED_IDS[:8]:
        c.append(Case(f"issue-account_id-{name}", _with(issue, account_id=bad_id), IA, None,
                      "account_id"))
    c.append(Case("issue-account-unknown", _with(issue, account_id=UNKNOWN),
                  NF, "ACCOUNT_NOT_FOUND"))
    c.append(Case("issue-system-account", lambda w: issue(w, account_id=w.system_account),
                  NF, "ACCOUNT_NOT_FOUND"))
    for name, pan in BAD_PANS[1:]:
        c.append(Case(f"issue-card-{name}", _with(issue, card_number=pan), IA,
                      "CARD_NUMBER_MALFORMED", "card_number"))
    c.append(Case("issue-card-in-use", lambda w: issue(w, card_number=w.card.card_number),
                  FP, "CARD_NUMBER_IN_USE"))
    c.append(Case("issue-request_id-missing", _with(issue, request_id=""),
                  IA, "REQUEST_ID_MISSING", "request_id"))
    # --- UpdateCardStatus ----------------------------------------------------
    for card_status in (account_pb2.CARD_STATUS_UNSPECIFIED, 4, 99):
        c.append(Case(f"status-{card_status}", _with(status, status=card_status), IA,
                      "ENUM_VALUE_INVALID", "status"))
    for name, bad_id in MALFORMED_IDS[:6]:
        c.append(Case(f"status-card_id-{name}", _with(status, card_id=bad_id), IA, None,
                      "card_id"))
    c.append(Case("status-card-unknown", _with(status, card_id=UNKNOWN), NF, "CARD_NOT_FOUND"))
    c.append(Case("status-reopen-closed",
                  lambda w: status(w, card_id=w.closed_card.card_id,
                                   status=account_pb2.CARD_STATUS_ACTIVE),
                  FP, "CARD_CLOSED"))
    c.append(Case("status-request_id-missing", _with(status, request_id=""),
                  IA, "REQUEST_ID_MISSING", "request_id"))
    # --- Reads --------------------------------------------------------------
    acc, pos, pts, fund = "accounts", "pos", "points", "funding"
    reads: list[tuple[str, str, str, Callable[[World], Message], grpc.StatusCode, str | None,
                      str | None]] = [
        ("get-account-unknown", acc, "GetAccount",
         lambda w: account_pb2.GetAccountRequest(account_id=UNKNOWN), NF, "ACCOUNT_NOT_FOUND", None),
        ("get-account-system", acc, "GetAccount",
         lambda w: account_pb2.GetAccountRequest(account_id=w.system_account), NF, None, None),
        ("get-account-malformed", acc, "GetAccount",
         lambda w: account_pb2.GetAccountRequest(account_id="urn:0b6c5a537e1f4b8e9a493b1c2f6d0e11"),
         IA, "ID_MALFORMED", "account_id"),
        ("get-card-unknown", acc, "GetCard",
         lambda w: account_pb2.GetCardRequest(card_id=UNKNOWN), NF, "CARD_NOT_FOUND", None),
        ("get-card-malformed", acc, "GetCard",
         lambda w: account_pb2.GetCardRequest(card_id="x"), IA, "ID_MALFORMED", "card_id"),
        ("get-hold-unknown", pos, "GetHold",
         lambda w: transaction_pb2.GetHoldRequest(hold_id=UNKNOWN), NF, "HOLD_NOT_FOUND", None),
        ("get-hold-missing", pos, "GetHold",
         lambda w: transaction_pb2.GetHoldRequest(), IA, "ID_MISSING", "hold_id"),
        ("balance-bad-luhn", pos, "GetCardBalance",
         lambda w: transaction_pb2.GetCardBalanceRequest(card_number=_flipped(w)), IA,
         "CARD_NUMBER_MALFORMED", "card_number"),
        ("balance-unknown", pos, "GetCardBalance",
         lambda w: transaction_pb2.GetCardBalanceRequest(card_number=_pan("622848")), NF,
         "CARD_NOT_FOUND", None),
        ("list-holds-page-size-neg", acc, "ListHolds",
         lambda w: account_pb2.ListHoldsRequest(account_id=w.card.account_id, page_size=-1), IA,
         "PAGE_SIZE_INVALID", "page_size"),
        ("list-holds-page-size-501", acc, "ListHolds",
         lambda w: account_pb2.ListHoldsRequest(account_id=w.card.account_id, page_size=501), IA,
         "PAGE_SIZE_INVALID", "page_size"),
        ("list-holds-state-99", acc, "ListHolds",
         lambda w: account_pb2.ListHoldsRequest(account_id=w.card.account_id,
                                                state=common_pb2.HoldState.ValueType(99)), IA,
         "ENUM_VALUE_INVALID", "state"),
        ("list-holds-token-junk", acc, "ListHolds",
         lambda w: account_pb2.ListHoldsRequest(account_id=w.card.account_id, page_token="abc"), IA,
         "PAGE_TOKEN_INVALID", "page_token"),
        ("list-holds-token-overflow", acc, "ListHolds",
         lambda w: account_pb2.ListHoldsRequest(account_id=w.card.account_id,
                                                page_token="99999999999999999999"), IA,
         "PAGE_TOKEN_INVALID", "page_token"),
        ("list-holds-token-over-int64", acc, "ListHolds",
         lambda w: account_pb2.ListHoldsRequest(account_id=w.card.account_id,
                                                page_token=str(2**63)), IA,
         "PAGE_TOKEN_INVALID", "page_token"),
        ("points-history-token-over-int64", pts, "ListPointsHistory",
         lambda w: points_pb2.ListPointsHistoryRequest(account_id=w.card.account_id,
                                                       page_token="9999999999999999999"), IA,
         "PAGE_TOKEN_INVALID", "page_token"),
        ("list-txns-unknown", acc, "ListTransactions",
         lambda w: account_pb2.ListTransactionsRequest(account_id=UNKNOWN), NF, "ACCOUNT_NOT_FOUND",
         None),
        ("list-txns-token-negative", acc, "ListTransactions",
         lambda w: account_pb2.ListTransactionsRequest(account_id=w.card.account_id, page_token="-1"),
         IA, "PAGE_TOKEN_INVALID", "page_token"),
        ("points-history-unknown", pts, "ListPointsHistory",
         lambda w: points_pb2.ListPointsHistoryRequest(account_id=UNKNOWN), NF, "ACCOUNT_NOT_FOUND",
         None),
        ("points-history-page-size", pts, "ListPointsHistory",
         lambda w: points_pb2.ListPointsHistoryRequest(account_id=w.card.account_id,
                                                       page_size=I32_MIN), IA,
         "PAGE_SIZE_INVALID", "page_size"),
        ("points-balance-unknown", pts, "GetPointsBalance",
         lambda w: points_pb2.GetPointsBalanceRequest(account_id=UNKNOWN), NF, "ACCOUNT_NOT_FOUND",
         None),
        ("get-recharge-unknown", fund, "GetRecharge",
         lambda w: funding_pb2.GetRechargeRequest(channel=funding_pb2.CHANNEL_ALIPAY,
                                                  channel_txn_id="nope"), NF, "RECHARGE_NOT_FOUND",
         None),
        ("get-recharge-channel-unspecified", fund, "GetRecharge",
         lambda w: funding_pb2.GetRechargeRequest(channel_txn_id=w.channel_txn), IA,
         "ENUM_VALUE_INVALID", "channel"),
    ]
    for case_id, service, method, make, code, why, field_name in reads:
        c.append(Case(case_id, _read(service, method, make), code, why, field_name))
    return c


CASES = _cases()


def _no_secret_in(e: RichError, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in e.message
        assert secret.encode() not in e.raw
        if e.bad_request is not None:
            for v in e.bad_request.field_violations:
                assert secret not in v.description


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(world: World, case: Case) -> None:
    before = snapshot(world.db)
    e = expect(case.call(world), case.code, case.reason, case.field)
    assert e.message, "the status says what is wrong"
    _no_secret_in(e, world.secrets)
    assert snapshot(world.db) == before


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_bad_field_is_named_at_once(world: World) -> None:
    before = snapshot(world.db)
    req = transaction_pb2.AuthorizeRequest(request_id="", card_number="123", amount_fen=-5,
                                           station_id="", terminal_id="t" * 65, nozzle=-1,
                                           product=common_pb2.PRODUCT_UNSPECIFIED)
    e = expect(lambda: world.server.pos.Authorize(req), IA)
    assert set(e.fields) == {"request_id", "card_number", "amount_fen", "station_id",
                             "terminal_id", "nozzle", "product"}
    assert e.bad_request is not None
    for v in e.bad_request.field_violations:
        assert v.description and v.reason
    assert snapshot(world.db) == before


def _send(w: World, req: Message) -> object:
    if isinstance(req, transaction_pb2.AuthorizeRequest):
        return w.server.pos.Authorize(req)
    if isinstance(req, transaction_pb2.GetCardBalanceRequest):
        return w.server.pos.GetCardBalance(req)
    assert isinstance(req, account_pb2.IssueCardRequest)
    return w.server.accounts.IssueCard(req)


def test_bad_card_numbers_are_never_echoed(world: World) -> None:
    """Whatever the card number, no error, message or violation repeats it."""
    before = snapshot(world.db)
    near = world.card.card_number[:-1] + str((int(world.card.card_number[-1]) + 3) % 10)
    unknown = _pan("622848")
    for pan in (near, unknown, world.card.card_number + "0", "9" * 40):
        requests: list[Message] = [
            builders.authorize_request(builders.FundedCard("", "", pan), 100),
            transaction_pb2.GetCardBalanceRequest(card_number=pan),
            account_pb2.IssueCardRequest(request_id=builders.rid(), account_id=UNKNOWN,
                                         card_number=pan),
        ]
        for req in requests:
            e = rpc_error(partial(_send, world, req))
            assert e.code in (IA, NF), e.code
            _no_secret_in(e, [pan, pan[-12:], *world.secrets])
    assert snapshot(world.db) == before


def test_oversized_request_is_refused_before_it_reaches_the_server(world: World) -> None:
    before = snapshot(world.db)
    req = builders.authorize_request(world.card, 100)
    req.station_id = "s" * (2 * 1024 * 1024)
    try:
        world.server.pos.Authorize(req)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        raise AssertionError("a 2 MiB request was accepted")
    assert snapshot(world.db) == before


def test_world_is_still_usable(world: World) -> None:
    """The refused requests left the ledger as it was: the open hold still
    confirms, and the invariants hold."""
    assert_ledger_ok(world.server.database_url)
    bal = builders.balance(world.server, world.card).balance
    assert (bal.balance_fen, bal.held_fen) == (100_000 + 1_000 - 15_000, 20_000 + 100)
