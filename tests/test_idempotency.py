"""Every mutating RPC is idempotent on request_id: the same request again
gets the same answer and nothing happens twice; the same request_id with a
different request is refused (FAILED_PRECONDITION, REQUEST_ID_REUSED) and
changes nothing. Recharge is also idempotent on (channel, channel_txn_id)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    risk_pb2,
    transaction_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server.cards import luhn_check_digit
from fuelcard_server.services.transaction import AUTHORIZE_SQL, CONFIRM_SQL
from google.protobuf.message import Message

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import (
    Conn,
    account_row,
    assert_ledger_ok,
    count,
    expect,
    scalar,
    snapshot,
)
from tests.support.risk_helpers import load_rules, risk, rule

FP = grpc.StatusCode.FAILED_PRECONDITION


def _replays_and_refuses_reuse(db: Conn, send: Callable[[Any], Message], request: Message,
                               different: Message,
                               as_replayed: Callable[[Message], Message] = lambda m: m) -> Message:
    """Send `request` twice and `different` under the same request_id: the
    second answer equals the first (as as_replayed() shows it), and neither
    the replay nor the reuse changes a single row."""
    first = send(request)
    after_first = snapshot(db)
    replayed = as_replayed(first)
    assert send(request) == replayed
    assert snapshot(db) == after_first, "a replay changed the database"
    e = expect(lambda: send(different), FP, "REQUEST_ID_REUSED")
    assert e.bad_request is None
    assert e.infos[0].domain == "fuelcard.v1"
    assert snapshot(db) == after_first, "a refused reuse changed the database"
    # And the original request still replays after the refused reuse.
    assert send(request) == replayed
    return first


def _without_card_number(first: Message) -> Message:
    """An IssueCard answer as a replay gives it: the full number is in the
    first answer only; a replay shows the masked one (in `card`)."""
    assert isinstance(first, account_pb2.IssueCardResponse)
    replay = account_pb2.IssueCardResponse()
    replay.CopyFrom(first)
    replay.ClearField("card_number")
    return replay


def test_authorize(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    rid = builders.rid("auth")
    request = builders.authorize_request(card, 10_000, request_id=rid)
    different = builders.authorize_request(card, 10_001, request_id=rid)
    first = _replays_and_refuses_reuse(db, server.pos.Authorize, request, different)
    assert isinstance(first, transaction_pb2.AuthorizeResponse)
    assert first.decision == common_pb2.DECISION_APPROVED
    assert count(db, "holds") == 1
    assert account_row(db, card.account_id)["held_fen"] == 10_000
    # Other fields count too: another nozzle is another request.
    expect(lambda: server.pos.Authorize(
        builders.authorize_request(card, 10_000, request_id=rid, nozzle=4)), FP, "REQUEST_ID_REUSED")


def test_authorize_decline_is_replayed_as_it_was(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=5_000)
    request = builders.authorize_request(card, 10_000)
    declined = server.pos.Authorize(request)
    assert declined.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    builders.recharge(server, card.account_id, 10_000)
    # The retry answers what was decided, rather than deciding again.
    assert server.pos.Authorize(request) == declined
    assert count(db, "holds") == 0


def test_confirm(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    rid = builders.rid("confirm")

    def req(final: int) -> transaction_pb2.ConfirmRequest:
        return transaction_pb2.ConfirmRequest(request_id=rid, hold_id=hold.hold_id,
                                              final_amount_fen=final, volume_ml=1, unit_price_fen=1)

    _replays_and_refuses_reuse(db, server.pos.Confirm, req(20_000), req(19_999))
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (30_000, 0, 200)
    assert count(db, "journal", "kind = 2") == 1


def test_cancel(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    other = builders.authorize(server, card, 1_000).hold
    rid = builders.rid("cancel")
    _replays_and_refuses_reuse(
        db, server.pos.Cancel, transaction_pb2.CancelRequest(request_id=rid, hold_id=hold.hold_id),
        transaction_pb2.CancelRequest(request_id=rid, hold_id=other.hold_id))
    assert account_row(db, card.account_id)["held_fen"] == 1_000
    assert builders.balance(server, card).balance.available_fen == 49_000


def test_recharge(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    rid = builders.rid("recharge")
    txn = f"ali-{uuid.uuid4().hex}"

    def req(amount: int, txn_id: str = txn) -> funding_pb2.RechargeRequest:
        return funding_pb2.RechargeRequest(request_id=rid, account_id=card.account_id,
                                           channel=funding_pb2.CHANNEL_ALIPAY,
                                           channel_txn_id=txn_id, amount_fen=amount)

    _replays_and_refuses_reuse(db, server.funding.Recharge, req(8_800), req(8_801))
    expect(lambda: server.funding.Recharge(req(8_800, txn_id=txn + "-2")), FP, "REQUEST_ID_REUSED")
    assert account_row(db, card.account_id)["balance_fen"] == 8_800
    assert count(db, "recharges") == 1
    assert count(db, "journal", "kind = 1") == 1


def test_redeem_points(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    builders.confirm(server, builders.authorize(server, card, 30_000).hold.hold_id, 30_000)
    rid = builders.rid("redeem")

    def req(points: int) -> points_pb2.RedeemPointsRequest:
        return points_pb2.RedeemPointsRequest(request_id=rid, account_id=card.account_id,
                                              points=points, description="mall order 1")

    first = _replays_and_refuses_reuse(db, server.points.RedeemPoints, req(120), req(121))
    assert isinstance(first, points_pb2.RedeemPointsResponse)
    assert first.points_balance == 180
    assert account_row(db, card.account_id)["points_balance"] == 180
    assert count(db, "journal", "kind = 4") == 1


def test_open_account(server: RunningServer, db: Conn) -> None:
    rid = builders.rid("open")

    def req(name: str) -> account_pb2.OpenAccountRequest:
        return account_pb2.OpenAccountRequest(
            request_id=rid, type=account_pb2.ACCOUNT_TYPE_CORPORATE,
            holder=account_pb2.Holder(name=name, phone="13812345678", id_number="110101199003071234"))

    before = count(db, "accounts")
    first = _replays_and_refuses_reuse(db, server.accounts.OpenAccount, req("昆明车队"), req("昆明车队2"))
    assert isinstance(first, account_pb2.OpenAccountResponse)
    assert first.account.holder.phone == "138****5678"
    assert count(db, "accounts") == before + 1
    assert count(db, "account_holders") == 1


def test_issue_card(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    other = builders.open_card(server)
    rid = builders.rid("card")
    first = _replays_and_refuses_reuse(
        db, server.accounts.IssueCard,
        account_pb2.IssueCardRequest(request_id=rid, account_id=card.account_id),
        account_pb2.IssueCardRequest(request_id=rid, account_id=other.account_id),
        _without_card_number)
    assert isinstance(first, account_pb2.IssueCardResponse)
    # The generated number, in the first answer, works.
    assert first.card_number and first.card.masked_card_number
    got = server.pos.GetCardBalance(transaction_pb2.GetCardBalanceRequest(
        card_number=first.card_number))
    assert got.card_id == first.card.card_id
    assert count(db, "cards", "account_id = %s", (account_row(db, card.account_id)["id"],)) == 2


def test_issue_card_with_a_given_number(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    rid = builders.rid("card")
    number = "622202020011223344" + luhn_check_digit("622202020011223344")
    other = "4111111111111111"
    first = _replays_and_refuses_reuse(
        db, server.accounts.IssueCard,
        account_pb2.IssueCardRequest(request_id=rid, account_id=card.account_id, card_number=number),
        account_pb2.IssueCardRequest(request_id=rid, account_id=card.account_id, card_number=other),
        _without_card_number)
    assert isinstance(first, account_pb2.IssueCardResponse)
    assert first.card_number == number
    # The same number under a new request_id is another card: refused.
    e = expect(lambda: server.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=builders.rid("card"), account_id=card.account_id, card_number=number)),
        FP, "CARD_NUMBER_IN_USE")
    assert number not in e.message


def test_update_card_status(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000)
    rid = builders.rid("status")

    def req(status: account_pb2.CardStatus.ValueType) -> account_pb2.UpdateCardStatusRequest:
        return account_pb2.UpdateCardStatusRequest(request_id=rid, card_id=card.card_id,
                                                   status=status)

    first = _replays_and_refuses_reuse(db, server.accounts.UpdateCardStatus,
                                       req(account_pb2.CARD_STATUS_BLOCKED),
                                       req(account_pb2.CARD_STATUS_CLOSED))
    assert isinstance(first, account_pb2.UpdateCardStatusResponse)
    assert first.card.status == account_pb2.CARD_STATUS_BLOCKED
    assert scalar(db, "SELECT status FROM fc.cards WHERE uid = %s", (card.card_id,)) == 2


def test_request_id_is_not_shared_across_operations(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    rid = builders.rid("shared")
    hold = server.pos.Authorize(builders.authorize_request(card, 1_000, request_id=rid)).hold
    before = snapshot(db)
    expect(lambda: builders.cancel(server, hold.hold_id, request_id=rid), FP, "REQUEST_ID_REUSED")
    expect(lambda: builders.confirm(server, hold.hold_id, 1_000, request_id=rid), FP,
           "REQUEST_ID_REUSED")
    expect(lambda: server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=rid, account_id=card.account_id, channel=funding_pb2.CHANNEL_BANK_CARD,
        channel_txn_id="b-1", amount_fen=1)), FP, "REQUEST_ID_REUSED")
    assert snapshot(db) == before
    assert builders.balance(server, card).balance.held_fen == 1_000


# --------------------------------------------------------------------------
# Recharge: idempotent on (channel, channel_txn_id) as well
# --------------------------------------------------------------------------

def _recharge(server: RunningServer, account_id: str, txn: str, amount: int,
              channel: funding_pb2.Channel.ValueType = funding_pb2.CHANNEL_WECHAT_PAY,
              request_id: str | None = None) -> funding_pb2.RechargeResponse:
    response: funding_pb2.RechargeResponse = server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=request_id or builders.rid("recharge"), account_id=account_id, channel=channel,
        channel_txn_id=txn, amount_fen=amount))
    return response


def test_recharge_is_idempotent_on_the_channel_txn_under_a_new_request_id(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    txn = f"wx-{uuid.uuid4().hex}"
    first = _recharge(server, card.account_id, txn, 20_000)
    assert first.decision == common_pb2.DECISION_APPROVED
    # The money moves in between: the channel's second notice still gets the
    # original answer, and credits nothing.
    builders.confirm(server, builders.authorize(server, card, 5_000).hold.hold_id, 5_000)
    again = _recharge(server, card.account_id, txn, 20_000)
    assert again == first
    assert account_row(db, card.account_id)["balance_fen"] == 15_000
    assert count(db, "recharges") == 1
    assert count(db, "journal", "kind = 1") == 1
    got = server.funding.GetRecharge(funding_pb2.GetRechargeRequest(
        channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=txn))
    assert got.recharge == first.recharge
    # The same channel txn id on another channel is another payment.
    other = _recharge(server, card.account_id, txn, 1_000, channel=funding_pb2.CHANNEL_ALIPAY)
    assert other.recharge.recharge_id != first.recharge.recharge_id
    assert account_row(db, card.account_id)["balance_fen"] == 16_000
    assert_ledger_ok(server.database_url)


def test_request_id_of_a_channel_replay_is_bound_to_it(server: RunningServer, db: Conn) -> None:
    """A request_id answered by a channel-txn replay is used up like any
    other: reusing it for a different recharge is refused."""
    card = builders.open_card(server)
    txn = f"wx-{uuid.uuid4().hex}"
    first = _recharge(server, card.account_id, txn, 20_000)
    rid = builders.rid("again")
    assert _recharge(server, card.account_id, txn, 20_000, request_id=rid) == first
    before = snapshot(db)
    expect(lambda: _recharge(server, card.account_id, f"wx-{uuid.uuid4().hex}", 7_000,
                             request_id=rid), FP, "REQUEST_ID_REUSED")
    assert snapshot(db) == before
    assert _recharge(server, card.account_id, txn, 20_000, request_id=rid) == first


@pytest.mark.parametrize("change", ["amount", "account"])
def test_channel_txn_reused_for_a_different_recharge_is_refused(
        server: RunningServer, db: Conn, change: str) -> None:
    card = builders.open_card(server)
    other = builders.open_card(server)
    txn = f"wx-{uuid.uuid4().hex}"
    _recharge(server, card.account_id, txn, 20_000)
    before = snapshot(db)
    account = other.account_id if change == "account" else card.account_id
    amount = 20_001 if change == "amount" else 20_000
    e = expect(lambda: _recharge(server, account, txn, amount), FP, "CHANNEL_TXN_REUSED")
    assert e.bad_request is None
    assert snapshot(db) == before
    assert account_row(db, other.account_id)["balance_fen"] == 0


# --------------------------------------------------------------------------
# Concurrent duplicates: one effect, every answer the same
# --------------------------------------------------------------------------

@dataclass
class Stubs:
    pos: transaction_pb2_grpc.TransactionServiceStub
    funding: funding_pb2_grpc.FundingServiceStub
    points: points_pb2_grpc.PointsServiceStub
    accounts: account_pb2_grpc.AccountServiceStub


@pytest.fixture
def stubs(server: RunningServer) -> Iterator[list[Stubs]]:
    channels = [grpc.insecure_channel(server.target) for _ in range(4)]
    try:
        yield [Stubs(transaction_pb2_grpc.TransactionServiceStub(c),
                     funding_pb2_grpc.FundingServiceStub(c),
                     points_pb2_grpc.PointsServiceStub(c),
                     account_pb2_grpc.AccountServiceStub(c)) for c in channels]
    finally:
        for c in channels:
            c.close()


def _all_at_once(server: RunningServer, stubs: list[Stubs], send: Callable[[Stubs], Message],
                 gate_sql: str, gate_params: tuple[Any, ...] = (), n: int = 20,
                 as_replayed: Callable[[Message], Message] = lambda m: m) -> list[Message]:
    """Send n copies at once, and make them really overlap in the database:
    a transaction of ours holds a lock (`gate_sql`) that each copy needs
    after its idempotency check, until as many copies as the server's pool
    allows are queued on it; then it lets go and they race."""
    want = min(n, server.settings.pool_max)
    with ThreadPoolExecutor(max_workers=n) as pool, \
            psycopg.connect(server.database_url, autocommit=True) as gate:
        with gate.transaction():
            gate.execute(gate_sql.encode(), gate_params)
            futures = [pool.submit(send, stubs[i % len(stubs)]) for i in range(n)]
            deadline = time.monotonic() + 20
            while scalar(gate, "SELECT count(*) FROM pg_locks WHERE NOT granted") < want:
                assert time.monotonic() < deadline, "the copies never queued on the gate"
                time.sleep(0.01)
        # The gate's transaction has ended: the queued copies race now.
        answers = [f.result(timeout=60) for f in futures]
    assert all(as_replayed(a) == as_replayed(answers[0]) for a in answers), \
        "concurrent duplicates got different answers"
    return answers


ACCOUNT_LOCK = "SELECT pg_advisory_xact_lock(id) FROM fc.accounts WHERE uid = %s"


def test_concurrent_duplicate_authorize_makes_one_hold(server: RunningServer, db: Conn,
                                                       stubs: list[Stubs]) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    request = builders.authorize_request(card, 10_000)
    answers = _all_at_once(server, stubs, lambda s: s.pos.Authorize(request, timeout=30),
                           ACCOUNT_LOCK, (card.account_id,))
    assert isinstance(answers[0], transaction_pb2.AuthorizeResponse)
    assert answers[0].decision == common_pb2.DECISION_APPROVED
    assert count(db, "holds") == 1
    assert account_row(db, card.account_id)["held_fen"] == 10_000
    assert_ledger_ok(server.database_url)


def test_concurrent_duplicate_confirm_settles_once(server: RunningServer, db: Conn,
                                                   stubs: list[Stubs]) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    request = transaction_pb2.ConfirmRequest(request_id=builders.rid("confirm"), hold_id=hold.hold_id,
                                             final_amount_fen=25_000, volume_ml=1, unit_price_fen=1)
    answers = _all_at_once(server, stubs, lambda s: s.pos.Confirm(request, timeout=30),
                           ACCOUNT_LOCK, (card.account_id,))
    assert isinstance(answers[0], transaction_pb2.ConfirmResponse)
    assert answers[0].hold.state == common_pb2.HOLD_STATE_CONFIRMED
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"], row["points_balance"]) == (25_000, 0, 250)
    assert count(db, "journal", "kind = 2") == 1
    assert_ledger_ok(server.database_url)


def test_concurrent_duplicate_confirm_zero_cancels_once(server: RunningServer, db: Conn,
                                                        stubs: list[Stubs]) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    request = transaction_pb2.ConfirmRequest(request_id=builders.rid("confirm"), hold_id=hold.hold_id,
                                             final_amount_fen=0)
    answers = _all_at_once(server, stubs, lambda s: s.pos.Confirm(request, timeout=30),
                           ACCOUNT_LOCK, (card.account_id,))
    assert isinstance(answers[0], transaction_pb2.ConfirmResponse)
    assert answers[0].hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert account_row(db, card.account_id)["held_fen"] == 0


def test_concurrent_duplicate_cancel(server: RunningServer, db: Conn, stubs: list[Stubs]) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 30_000).hold
    request = transaction_pb2.CancelRequest(request_id=builders.rid("cancel"), hold_id=hold.hold_id)
    answers = _all_at_once(server, stubs, lambda s: s.pos.Cancel(request, timeout=30),
                           ACCOUNT_LOCK, (card.account_id,))
    assert isinstance(answers[0], transaction_pb2.CancelResponse)
    assert answers[0].hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert count(db, "idempotency_keys", "operation = 'cancel'") == 1


def test_concurrent_duplicate_recharge_credits_once(server: RunningServer, db: Conn,
                                                    stubs: list[Stubs]) -> None:
    card = builders.open_card(server)
    request = funding_pb2.RechargeRequest(
        request_id=builders.rid("recharge"), account_id=card.account_id,
        channel=funding_pb2.CHANNEL_ECNY, channel_txn_id=f"ecny-{uuid.uuid4().hex}", amount_fen=9_900)
    _all_at_once(server, stubs, lambda s: s.funding.Recharge(request, timeout=30),
                 ACCOUNT_LOCK, (card.account_id,))
    assert account_row(db, card.account_id)["balance_fen"] == 9_900
    assert count(db, "recharges") == 1
    assert_ledger_ok(server.database_url)


def test_concurrent_channel_notices_under_new_request_ids_credit_once(
        server: RunningServer, db: Conn, stubs: list[Stubs]) -> None:
    card = builders.open_card(server)
    txn = f"ecny-{uuid.uuid4().hex}"

    def send(s: Stubs) -> Message:
        response: Message = s.funding.Recharge(funding_pb2.RechargeRequest(
            request_id=builders.rid("notice"), account_id=card.account_id,
            channel=funding_pb2.CHANNEL_ECNY, channel_txn_id=txn, amount_fen=9_900), timeout=30)
        return response

    answers = _all_at_once(server, stubs, send,
                           ACCOUNT_LOCK, (card.account_id,))
    assert isinstance(answers[0], funding_pb2.RechargeResponse)
    assert answers[0].balance_fen == 9_900
    assert account_row(db, card.account_id)["balance_fen"] == 9_900
    assert count(db, "recharges") == 1
    assert_ledger_ok(server.database_url)


def test_concurrent_duplicate_redeem_spends_once(server: RunningServer, db: Conn,
                                                 stubs: list[Stubs]) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    builders.confirm(server, builders.authorize(server, card, 30_000).hold.hold_id, 30_000)
    request = points_pb2.RedeemPointsRequest(request_id=builders.rid("redeem"),
                                             account_id=card.account_id, points=100)
    _all_at_once(server, stubs, lambda s: s.points.RedeemPoints(request, timeout=30),
                 ACCOUNT_LOCK, (card.account_id,))
    assert account_row(db, card.account_id)["points_balance"] == 200
    assert_ledger_ok(server.database_url)


def test_concurrent_duplicate_open_account_opens_one(server: RunningServer, db: Conn,
                                                     stubs: list[Stubs]) -> None:
    before = count(db, "accounts")
    request = account_pb2.OpenAccountRequest(request_id=builders.rid("open"),
                                             type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                                             holder=account_pb2.Holder(name="并发"))
    _all_at_once(server, stubs, lambda s: s.accounts.OpenAccount(request, timeout=30),
                 "LOCK TABLE fc.accounts IN SHARE MODE")
    assert count(db, "accounts") == before + 1


def test_concurrent_duplicate_issue_card_issues_one(server: RunningServer, db: Conn,
                                                    stubs: list[Stubs]) -> None:
    card = builders.open_card(server)
    request = account_pb2.IssueCardRequest(request_id=builders.rid("card"),
                                           account_id=card.account_id)
    answers = _all_at_once(server, stubs, lambda s: s.accounts.IssueCard(request, timeout=30),
                           "LOCK TABLE fc.cards IN SHARE MODE", as_replayed=_without_card_number)
    assert count(db, "cards") == 2
    # One copy made the card and shows its number; the others are replays.
    numbers = [a.card_number for a in answers if isinstance(a, account_pb2.IssueCardResponse)]
    assert len(numbers) == len(answers) and len([n for n in numbers if n]) == 1


def test_concurrent_duplicate_update_card_status(server: RunningServer, db: Conn,
                                                 stubs: list[Stubs]) -> None:
    card = builders.open_card(server)
    request = account_pb2.UpdateCardStatusRequest(request_id=builders.rid("status"),
                                                  card_id=card.card_id,
                                                  status=account_pb2.CARD_STATUS_BLOCKED)
    _all_at_once(server, stubs, lambda s: s.accounts.UpdateCardStatus(request, timeout=30),
                 ACCOUNT_LOCK, (card.account_id,))
    assert count(db, "idempotency_keys", "operation = 'update_card_status'") == 1


def _pump_call(db: Conn, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    row = db.execute(sql, params).fetchone()
    assert row is not None
    answer: dict[str, Any] = row[0]
    return answer


def test_pump_answers_are_stored_compact_and_replayed_whole(server: RunningServer, db: Conn) -> None:
    # The pump's keys store the answer without its hold (fc.compact_answer) and a replay
    # rebuilds it from the hold row (fc.expand_answer): the replay must be the first answer
    # to the byte, the authorize's too after its hold was settled, a risk verdict and a sale
    # whose figures do not add up (amount_mismatch) included. A REVIEW is stored whole (a
    # reviewer's approval moves its hold's expiry) and replays as it was after the approval.
    load_rules(server, [rule("BIG", "amount", min_amount_fen=100_000, score=65)])
    card = builders.open_card(server, balance_fen=300_000)
    pan_index = scalar(db, "SELECT pan_index FROM fc.cards WHERE uid = %s", (card.card_id,))
    now = dt.datetime.now(dt.UTC)

    def auth(amount: int) -> dict[str, Any]:
        return {"caller": "", "request_id": builders.rid("auth"), "request_hash": b"a" * 32,
                "pan_index": pan_index, "amount_fen": amount, "station_id": "S1",
                "terminal_id": "T1", "nozzle": 2, "product": 1, "now": now,
                "ttl": dt.timedelta(minutes=30), "counter": None, "pin_ok": None}

    sale, big = auth(30_000), auth(150_000)
    authorized = _pump_call(db, AUTHORIZE_SQL, sale)
    assert authorized["decision"] == "APPROVED" and "risk" in authorized
    review = _pump_call(db, AUTHORIZE_SQL, big)
    assert review["decision"] == "REVIEW"
    risk(server).ReviewHold(risk_pb2.ReviewHoldRequest(
        request_id=builders.rid("review"), hold_id=review["hold"]["hold_id"],
        verdict=risk_pb2.REVIEW_VERDICT_APPROVE, note="ok"))
    conf = {"caller": "", "request_id": builders.rid("confirm"), "request_hash": b"c" * 32,
            "hold_uid": authorized["hold"]["hold_id"], "final_fen": 20_000, "volume_ml": 9_000,
            "unit_price_fen": 785, "now": now, "station": None, "terminal": None, "counter": None}
    confirmed = _pump_call(db, CONFIRM_SQL, conf)
    assert confirmed["amount_mismatch"] is True and confirmed["hold"]["state"] == 2
    assert _pump_call(db, AUTHORIZE_SQL, sale) == {**authorized, "replayed": True}
    assert _pump_call(db, AUTHORIZE_SQL, big) == {**review, "replayed": True}
    assert _pump_call(db, CONFIRM_SQL, conf) == {**confirmed, "replayed": True}
    sizes = db.execute("SELECT pg_column_size(k.*) FROM fc.idempotency_keys k"
                       " WHERE request_id = ANY(%s)", ([sale["request_id"], conf["request_id"]],)
                       ).fetchall()
    assert len(sizes) == 2 and all(size <= 200 for (size,) in sizes), sizes
