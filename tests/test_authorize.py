"""Semantic 1: Authorize reserves money under the account's advisory lock;
available = balance - active holds; concurrent authorizations never spend the
same money."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
from fuelcard.v1 import account_pb2, common_pb2, transaction_pb2, transaction_pb2_grpc
from fuelcard_server import verify

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count
from tests.support.row_lock import wait_queued


def _set_status(server: RunningServer, card: builders.FundedCard,
                status: account_pb2.CardStatus.ValueType) -> account_pb2.UpdateCardStatusResponse:
    response: account_pb2.UpdateCardStatusResponse = server.accounts.UpdateCardStatus(
        account_pb2.UpdateCardStatusRequest(request_id=builders.rid("status"),
                                            card_id=card.card_id, status=status))
    return response


def test_approve_reserves_and_reports_the_hold(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    req = builders.authorize_request(card, 12_345, station="KM-007", terminal="KM-007-T2", nozzle=11)
    auth = server.pos.Authorize(req)
    assert auth.decision == common_pb2.DECISION_APPROVED
    assert auth.decline_reason == common_pb2.DECLINE_REASON_UNSPECIFIED
    assert auth.available_fen == 50_000 - 12_345
    hold = auth.hold
    assert hold.state == common_pb2.HOLD_STATE_AUTHORIZED
    assert (hold.amount_fen, hold.settled_fen) == (12_345, 0)
    assert (hold.account_id, hold.card_id) == (card.account_id, card.card_id)
    assert (hold.station_id, hold.terminal_id, hold.nozzle) == ("KM-007", "KM-007-T2", 11)
    assert hold.product == common_pb2.PRODUCT_GASOLINE_92
    assert hold.masked_card_number.endswith(card.card_number[-4:])
    assert card.card_number not in hold.masked_card_number
    created = hold.create_time.ToDatetime(dt.UTC)
    assert created == server.clock.now()
    assert hold.expire_time.ToDatetime(dt.UTC) - created == dt.timedelta(minutes=30)
    assert not hold.HasField("close_time")

    bal = builders.balance(server, card).balance
    assert (bal.balance_fen, bal.held_fen, bal.available_fen) == (50_000, 12_345, 37_655)
    assert bal.currency_code == "CNY"
    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (50_000, 12_345)
    # A reservation moves no money: no journal row for it.
    assert count(db, "journal", "hold_id IS NOT NULL") == 0
    got = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id)).hold
    assert got == hold
    assert_ledger_ok(server.database_url)


def test_available_is_balance_minus_active_holds(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    first = builders.authorize(server, card, 6_000)
    assert first.decision == common_pb2.DECISION_APPROVED
    assert first.available_fen == 4_000
    # 4 001 no longer fits beside the first hold ...
    over = builders.authorize(server, card, 4_001)
    assert over.decision == common_pb2.DECISION_DECLINED
    assert over.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert not over.HasField("hold")
    assert over.available_fen == 4_000
    # ... exactly 4 000 does, leaving nothing.
    exact = builders.authorize(server, card, 4_000)
    assert exact.decision == common_pb2.DECISION_APPROVED
    assert exact.available_fen == 0
    assert builders.authorize(server, card, 1).decline_reason == \
        common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    # Cancelling a hold frees exactly its amount.
    builders.cancel(server, first.hold.hold_id)
    bal = builders.balance(server, card).balance
    assert (bal.balance_fen, bal.held_fen, bal.available_fen) == (10_000, 4_000, 6_000)
    assert builders.authorize(server, card, 6_000).decision == common_pb2.DECISION_APPROVED
    assert_ledger_ok(server.database_url)


def test_decline_on_empty_account_reserves_nothing(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    declined = builders.authorize(server, card, 100)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert declined.available_fen == 0
    assert count(db, "holds") == 0
    assert account_row(db, card.account_id)["held_fen"] == 0


def test_two_cards_on_one_account_share_its_money(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    issued = server.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=builders.rid("card"), account_id=card.account_id))
    second = builders.FundedCard(card.account_id, issued.card.card_id, issued.card_number)
    assert builders.authorize(server, card, 7_000).decision == common_pb2.DECISION_APPROVED
    other = builders.authorize(server, second, 3_001)
    assert other.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert builders.authorize(server, second, 3_000).available_fen == 0


def test_blocked_card_is_declined_and_unblocking_restores_it(server: RunningServer,
                                                            db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    blocked = _set_status(server, card, account_pb2.CARD_STATUS_BLOCKED)
    assert blocked.card.status == account_pb2.CARD_STATUS_BLOCKED
    declined = builders.authorize(server, card, 1_000)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_CARD_BLOCKED
    assert not declined.HasField("hold")
    assert count(db, "holds") == 0
    assert account_row(db, card.account_id)["held_fen"] == 0

    assert _set_status(server, card, account_pb2.CARD_STATUS_ACTIVE).card.status == \
        account_pb2.CARD_STATUS_ACTIVE
    assert builders.authorize(server, card, 1_000).decision == common_pb2.DECISION_APPROVED



def test_a_block_committed_while_authorize_waited_for_the_lock_applies(
        server: RunningServer, database_url: str) -> None:
    # Found in review: authorize read the card before the account lock only,
    # and approved a card blocked by the request ahead of it. Deterministic:
    # a side connection holds the card row, so the block takes the account
    # lock and waits on the row; the authorize reads the card (still active)
    # and queues on the account lock; then the side lets go.
    card = builders.open_card(server, 10_000)
    with ThreadPoolExecutor(2) as pool:
        with psycopg.connect(database_url) as holder:
            holder.execute("SELECT 1 FROM fc.cards WHERE uid = %s FOR UPDATE", (card.card_id,))
            blocked = pool.submit(lambda: server.accounts.UpdateCardStatus(
                account_pb2.UpdateCardStatusRequest(
                    request_id=builders.rid("blk"), card_id=card.card_id,
                    status=account_pb2.CARD_STATUS_BLOCKED)))
            wait_queued(database_url, 1, [blocked])
            answer = pool.submit(lambda: builders.authorize(server, card, 1_000))
            wait_queued(database_url, 2, [blocked, answer])
            holder.rollback()
        assert blocked.result(20).card.status == account_pb2.CARD_STATUS_BLOCKED
        decision = answer.result(20)
    assert (decision.decision, decision.decline_reason) == (
        common_pb2.DECISION_DECLINED, common_pb2.DECLINE_REASON_CARD_BLOCKED)
    assert not decision.HasField("hold")

def test_closed_card_is_declined_for_good(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    _set_status(server, card, account_pb2.CARD_STATUS_CLOSED)
    declined = builders.authorize(server, card, 1_000)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_CARD_CLOSED
    assert count(db, "holds") == 0
    try:
        _set_status(server, card, account_pb2.CARD_STATUS_ACTIVE)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        raise AssertionError("a closed card was reopened")
    assert builders.authorize(server, card, 1_000).decline_reason == \
        common_pb2.DECLINE_REASON_CARD_CLOSED


def test_frozen_account_is_declined(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    db.execute("UPDATE fc.accounts SET status = 2 WHERE uid = %s", (card.account_id,))
    declined = builders.authorize(server, card, 1_000)
    assert declined.decline_reason == common_pb2.DECLINE_REASON_ACCOUNT_FROZEN
    assert count(db, "holds") == 0


def test_200_concurrent_authorizations_approve_exactly_37(server: RunningServer,
                                                          db: Conn) -> None:
    """The issue's example: 200 x 100.00 yuan against 3 700.00 yuan, all at
    once from many threads over several connections."""
    card = builders.open_card(server, balance_fen=370_000)
    threads, per_thread, n_channels = 50, 4, 5
    channels = [grpc.insecure_channel(server.target) for _ in range(n_channels)]
    stubs = [transaction_pb2_grpc.TransactionServiceStub(c) for c in channels]
    start = threading.Barrier(threads)

    def worker(i: int) -> list[transaction_pb2.AuthorizeResponse]:
        stub = stubs[i % n_channels]
        requests = [builders.authorize_request(card, 10_000, terminal=f"T{i}-{k}")
                    for k in range(per_thread)]
        start.wait(timeout=30)
        # Futures: a thread's requests are in flight together, not in turn.
        futures = [stub.Authorize.future(r, timeout=60) for r in requests]
        return [f.result() for f in futures]

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            answers = [a for batch in pool.map(worker, range(threads)) for a in batch]
    finally:
        for c in channels:
            c.close()

    assert len(answers) == threads * per_thread == 200
    approved = [a for a in answers if a.decision == common_pb2.DECISION_APPROVED]
    declined = [a for a in answers if a.decision == common_pb2.DECISION_DECLINED]
    assert len(approved) == 37
    assert len(declined) == 163
    assert {a.decline_reason for a in declined} == {common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS}
    assert len({a.hold.hold_id for a in approved}) == 37
    # Each approval saw the money left after the ones serialised before it.
    assert sorted(a.available_fen for a in approved) == [10_000 * k for k in range(37)]

    row = account_row(db, card.account_id)
    assert (row["balance_fen"], row["held_fen"]) == (370_000, 370_000)
    assert count(db, "holds", "state = 1") == 37
    assert count(db, "holds") == 37
    bal = builders.balance(server, card).balance
    assert (bal.balance_fen, bal.held_fen, bal.available_fen) == (370_000, 370_000, 0)
    assert verify.run(server.database_url) == []
