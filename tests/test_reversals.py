"""Reversal by request id (冲正, issue 14 item 2): the POS names the Authorize
whose answer it lost by that Authorize's request_id. An open hold is
released; a confirmed one is refused; an Authorize that has not arrived yet
finds a tombstone and is declined REVERSED, reserving nothing. Races with
the Authorize itself (both orders, real threads) never leave money held;
a race with a Confirm of the same hold has exactly one winner."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from fuelcard.v1 import common_pb2, transaction_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import (
    Conn,
    account_row,
    assert_ledger_ok,
    expect,
    scalar,
    snapshot,
    unpack,
)
from tests.support.row_lock import wait_queued

FP = grpc.StatusCode.FAILED_PRECONDITION
RELEASED = transaction_pb2.REVERSAL_OUTCOME_RELEASED
ALREADY_CLOSED = transaction_pb2.REVERSAL_OUTCOME_ALREADY_CLOSED
NOTHING_HELD = transaction_pb2.REVERSAL_OUTCOME_NOTHING_HELD
AHEAD = transaction_pb2.REVERSAL_OUTCOME_AHEAD_OF_AUTHORIZE


def _reverse(server: RunningServer, original_request_id: str, request_id: str | None = None
             ) -> transaction_pb2.ReverseAuthorizationResponse:
    answer: transaction_pb2.ReverseAuthorizationResponse = server.pos.ReverseAuthorization(
        transaction_pb2.ReverseAuthorizationRequest(
            request_id=request_id or builders.rid("rev"), original_request_id=original_request_id))
    return answer


def _authorize(server: RunningServer, card: builders.FundedCard, amount_fen: int,
               request_id: str) -> transaction_pb2.AuthorizeResponse:
    answer: transaction_pb2.AuthorizeResponse = server.pos.Authorize(
        builders.authorize_request(card, amount_fen, request_id=request_id))
    return answer


def _open_holds(db: Conn, account_id: str) -> int:
    return int(scalar(db, "SELECT count(*) FROM fc.holds h JOIN fc.accounts a ON a.id = h.account_id"
                          " WHERE a.uid = %s AND h.state IN (1, 5)", (account_id,)))


def test_an_open_hold_is_released_by_its_authorize_request_id(server: RunningServer,
                                                              db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    auth = _authorize(server, card, 30_000, "auth-lost-1")
    assert account_row(db, card.account_id)["held_fen"] == 30_000
    answer = _reverse(server, "auth-lost-1", request_id="rev-1")
    assert answer.outcome == RELEASED
    assert answer.hold.hold_id == auth.hold.hold_id
    assert answer.hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert account_row(db, card.account_id)["held_fen"] == 0
    # Idempotent: the same reversal again gets its first answer, changes nothing.
    before = snapshot(db)
    assert _reverse(server, "auth-lost-1", request_id="rev-1") == answer
    assert snapshot(db) == before
    # Another reversal of it finds the hold closed.
    again = _reverse(server, "auth-lost-1")
    assert again.outcome == ALREADY_CLOSED
    assert again.hold.state == common_pb2.HOLD_STATE_CANCELLED
    # The Authorize's own retry still gets its first answer (the hold id).
    assert _authorize(server, card, 30_000, "auth-lost-1") == auth
    assert_ledger_ok(server.database_url)


def test_a_reversal_ahead_of_its_authorize_declines_it(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    ahead = _reverse(server, "auth-late-1")
    assert ahead.outcome == AHEAD
    assert not ahead.HasField("hold")
    # The Authorize arrives: declined REVERSED whatever it carries, nothing held.
    late = _authorize(server, card, 30_000, "auth-late-1")
    assert late.decision == common_pb2.DECISION_DECLINED
    assert late.decline_reason == common_pb2.DECLINE_REASON_REVERSED
    assert not late.HasField("hold")
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert scalar(db, "SELECT count(*) FROM fc.holds") == 0
    # Its retries, and a second reversal, say the same.
    assert _authorize(server, card, 30_000, "auth-late-1").decline_reason == (
        common_pb2.DECLINE_REASON_REVERSED)
    assert _reverse(server, "auth-late-1").outcome == AHEAD
    assert_ledger_ok(server.database_url)


def test_a_declined_authorize_held_nothing(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000)
    auth = _authorize(server, card, 30_000, "auth-poor-1")
    assert auth.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert _reverse(server, "auth-poor-1").outcome == NOTHING_HELD
    assert_ledger_ok(server.database_url)


def test_a_confirmed_sale_is_not_reversed(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    auth = _authorize(server, card, 30_000, "auth-sold-1")
    builders.confirm(server, auth.hold.hold_id, 20_000)
    before = snapshot(db)
    expect(lambda: _reverse(server, "auth-sold-1"), FP, "HOLD_ALREADY_CONFIRMED")
    assert snapshot(db) == before
    # A reversal cannot name itself.
    expect(lambda: _reverse(server, "rev-x", request_id="rev-x"),
           grpc.StatusCode.INVALID_ARGUMENT, None, "original_request_id")
    assert_ledger_ok(server.database_url)


def test_a_reversal_naming_a_confirm_is_refused(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    auth = _authorize(server, card, 30_000, builders.rid("auth"))
    builders.confirm(server, auth.hold.hold_id, 20_000, request_id="confirm-1")
    expect(lambda: _reverse(server, "confirm-1"), FP, "NOT_AN_AUTHORIZATION")
    assert_ledger_ok(server.database_url)


@pytest.mark.parametrize("first", ["authorize", "reversal"])
def test_a_reversal_racing_its_authorize_never_leaves_money_held(
        server: RunningServer, db: Conn, first: str) -> None:
    """Both calls at once, on real threads, the one named `first` submitted
    first; repeated so that both interleavings occur. Whatever the order:
    either the Authorize held and the reversal released it, or the reversal
    came first and the Authorize was declined REVERSED."""
    card = builders.open_card(server, balance_fen=1_000_000)
    for i in range(12):
        original = f"auth-race-{first}-{i}"
        with ThreadPoolExecutor(2) as pool:
            if first == "authorize":
                a = pool.submit(_authorize, server, card, 10_000, original)
                r = pool.submit(_reverse, server, original)
            else:
                r = pool.submit(_reverse, server, original)
                a = pool.submit(_authorize, server, card, 10_000, original)
            auth, rev = a.result(30), r.result(30)
        if rev.outcome == AHEAD:
            assert auth.decline_reason == common_pb2.DECLINE_REASON_REVERSED
        else:
            assert rev.outcome == RELEASED, rev
            assert auth.decision == common_pb2.DECISION_APPROVED
            assert rev.hold.hold_id == auth.hold.hold_id
        assert _open_holds(db, card.account_id) == 0
        assert account_row(db, card.account_id)["held_fen"] == 0
    assert_ledger_ok(server.database_url)


def test_a_reversal_waiting_behind_its_authorize_releases_the_hold(server: RunningServer,
                                                                   db: Conn) -> None:
    """Deterministic order: the Authorize is held inside the database (its
    account row locked from the side) when the reversal arrives; the
    reversal's tombstone waits on the Authorize's key, then finds its
    hold."""
    card = builders.open_card(server, balance_fen=50_000)
    with ThreadPoolExecutor(2) as pool, psycopg.connect(server.database_url) as holder:
        holder.execute("SELECT 1 FROM fc.accounts WHERE uid = %s FOR UPDATE", (card.account_id,))
        auth = pool.submit(_authorize, server, card, 10_000, "auth-held-1")
        wait_queued(server.database_url, 1, [auth])
        rev = pool.submit(_reverse, server, "auth-held-1")
        # The reversal finds no key yet: it writes the tombstone and answers.
        ahead = rev.result(30)
        holder.rollback()
        late = auth.result(30)
    assert ahead.outcome == AHEAD
    # The Authorize's own key insert collided with the tombstone; its retry
    # replays it: declined REVERSED, its hold rolled back.
    assert late.decline_reason == common_pb2.DECLINE_REASON_REVERSED
    assert _open_holds(db, card.account_id) == 0
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert_ledger_ok(server.database_url)


def test_a_reversal_racing_a_confirm_has_one_winner(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000_000)
    wins = {"confirm": 0, "reversal": 0}
    for i in range(10):
        original = f"auth-cr-{i}"
        hold_id = _authorize(server, card, 10_000, original).hold.hold_id

        def confirm(hold_id: str) -> str:
            try:
                builders.confirm(server, hold_id, 8_000)
                return "confirm"
            except grpc.RpcError as e:
                assert (unpack(e).code, unpack(e).reason) == (FP, "HOLD_CANCELLED"), e
                return "lost"

        def reverse(original: str) -> str:
            try:
                assert _reverse(server, original).outcome == RELEASED
                return "reversal"
            except grpc.RpcError as e:
                assert (unpack(e).code, unpack(e).reason) == (FP, "HOLD_ALREADY_CONFIRMED"), e
                return "lost"

        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(f.result(30) for f in [pool.submit(confirm, hold_id),
                                                  pool.submit(reverse, original)])
        assert outcomes.count("lost") == 1, outcomes
        winner = next(o for o in outcomes if o != "lost")
        wins[winner] += 1
        state = scalar(db, "SELECT state FROM fc.holds WHERE uid = %s", (hold_id,))
        assert state == (2 if winner == "confirm" else 3)
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert account_row(db, card.account_id)["balance_fen"] == 1_000_000 - 8_000 * wins["confirm"]
    assert_ledger_ok(server.database_url)
