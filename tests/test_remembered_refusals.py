"""Idempotency remembers permanent refusals (issue 14, item 8), as Stripe
remembers a 4xx: a request refused for good is refused again, with the same
error, when retried with the same request_id and payload (another payload is
still REQUEST_ID_REUSED); the refusals that invite the same request later and
transient failures (deadline, lost link) are not remembered, so the retry is
decided afresh. (test_adjustments.py shows a remembered refusal outliving the
state that caused it: the approval refused for held money stays refused after
the hold goes.)"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from typing import Any

import grpc
import psycopg
import pytest
from fuelcard.v1 import common_pb2, funding_pb2, settlement_pb2, settlement_pb2_grpc, transaction_pb2
from fuelcard_server import db as fcdb
from fuelcard_server.services import (
    account,
    adjustment,
    control,
    funding,
    points,
    reconciliation,
    risk,
    security,
    transaction,
)

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, assert_ledger_ok, count, expect
from tests.support.row_lock import QUEUED_SQL, twins_behind_row_lock

FP = grpc.StatusCode.FAILED_PRECONDITION
MIN = dt.timedelta(minutes=1)


def _stored(db: Conn, request_id: str) -> list[tuple[Any, ...]]:
    return db.execute("SELECT operation, response FROM fc.idempotency_keys WHERE request_id = %s",
                      (request_id,)).fetchall()


def test_a_refused_confirm_is_refused_again_with_the_same_error(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    hold = builders.authorize(server, card, 5_000).hold
    builders.cancel(server, hold.hold_id)
    rid = builders.rid("confirm")
    first = expect(lambda: builders.confirm(server, hold.hold_id, 4_000, request_id=rid), FP,
                   "HOLD_CANCELLED")
    assert _stored(db, rid) == [("confirm", {"refusal": {
        "sqlstate": "FCFP0", "reason": "HOLD_CANCELLED", "field": "hold_id"}})]
    again = expect(lambda: builders.confirm(server, hold.hold_id, 4_000, request_id=rid), FP,
                   "HOLD_CANCELLED")
    assert again.raw == first.raw  # the whole status, message and details alike
    # Another payload under the key is a reuse, as for any stored answer.
    expect(lambda: builders.confirm(server, hold.hold_id, 3_999, request_id=rid), FP,
           "REQUEST_ID_REUSED")
    # A refusal the database answers rather than raises (an overrun beyond the
    # tolerance, whose settlement exception must commit) is remembered too.
    other = builders.authorize(server, card, 1_000).hold
    rid = builders.rid("confirm")
    for _ in range(2):
        expect(lambda: builders.confirm(server, other.hold_id, 2_001, request_id=rid),
               grpc.StatusCode.FAILED_PRECONDITION, "OVERRUN_ABOVE_TOLERANCE")
    assert len(_stored(db, rid)) == 1
    assert builders.confirm(server, other.hold_id, 1_000).decision == common_pb2.DECISION_APPROVED
    assert_ledger_ok(server.database_url)


def test_a_refund_before_its_payment_is_not_remembered(server: RunningServer, db: Conn) -> None:
    """RECHARGE_NOT_FOUND: the channel's refund came first; the adapter sends
    the same request again once the payment is booked, and it goes through."""
    card = builders.open_card(server)
    txn = f"wx-{uuid.uuid4().hex}"
    refund = funding_pb2.RefundRechargeRequest(
        request_id=builders.rid("rf"), channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=txn,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=300)
    expect(lambda: server.funding.RefundRecharge(refund), grpc.StatusCode.NOT_FOUND,
           "RECHARGE_NOT_FOUND")
    assert _stored(db, refund.request_id) == []
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("rc"), account_id=card.account_id,
        channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=txn, amount_fen=1_000))
    done = server.funding.RefundRecharge(refund).refund
    assert (done.amount_fen, done.shortfall_fen) == (300, 0)
    assert_ledger_ok(server.database_url)


def test_a_request_stopped_at_its_deadline_is_decided_again(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    hold = builders.authorize(server, card, 5_000).hold
    account_id = db.execute("SELECT id FROM fc.accounts WHERE uid = %s",
                            (card.account_id,)).fetchone()
    assert account_id is not None
    request = transaction_pb2.ConfirmRequest(request_id=builders.rid("confirm"), hold_id=hold.hold_id,
                                             final_amount_fen=4_000, volume_ml=5_000,
                                             unit_price_fen=800)
    with psycopg.connect(server.database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", account_id)  # the account's lock
        with pytest.raises(grpc.RpcError) as err:
            server.pos.Confirm(request, timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server cancels its statement at the deadline: nothing waits any more
        deadline = time.monotonic() + 20
        while holder.execute(QUEUED_SQL).fetchone() != (0,):
            assert time.monotonic() < deadline, "the cancelled confirm still waits"
            time.sleep(0.01)
        holder.execute("SELECT pg_advisory_unlock(%s)", account_id)
    assert _stored(db, request.request_id) == []
    assert server.pos.Confirm(request).decision == common_pb2.DECISION_APPROVED
    assert count(db, "journal", "kind = 2") == 1
    assert_ledger_ok(server.database_url)


def test_twins_of_a_refused_request_get_one_refusal(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000)
    hold = builders.authorize(server, card, 1_000).hold
    server.advance(31 * MIN)
    builders.confirm(server, builders.authorize(server, card, 1_000).hold.hold_id, 1_000)
    exception_id = builders.confirm(server, hold.hold_id, 1_000).settlement_exception_id
    stub = settlement_pb2_grpc.ReconciliationServiceStub(server.channel)
    stub.ResolveSettlementException(settlement_pb2.ResolveSettlementExceptionRequest(
        request_id=builders.rid("rs"), exception_id=exception_id, resolution="first"))
    request = settlement_pb2.ResolveSettlementExceptionRequest(
        request_id=builders.rid("rs"), exception_id=exception_id, resolution="second")
    twins = twins_behind_row_lock(server.database_url, "settlement_exceptions", exception_id,
                                  functools.partial(stub.ResolveSettlementException, request))
    for twin in twins:
        err = twin.exception()
        assert isinstance(err, grpc.RpcError) and err.code() == FP
    assert len(_stored(db, request.request_id)) == 1
    expect(lambda: stub.ResolveSettlementException(request), FP,
           "SETTLEMENT_EXCEPTION_ALREADY_RESOLVED")
    assert_ledger_ok(server.database_url)


@pytest.mark.parametrize(("sqlstate", "reason", "kept"), [
    ("FCFP0", "HOLD_CANCELLED", True),
    ("FCNF0", "CARD_NOT_FOUND", True),
    ("FCPD0", "NOT_YOUR_HOLD", True),
    ("FCIA0", "FINAL_AMOUNT_EXCEEDS_HOLD", True),
    ("FCFP0", "REQUEST_ID_REUSED", False),    # the key is another request's
    ("FCUA0", "COUNTER_REPLAYED", False),     # the sending was refused, not the request
    ("FCNF0", "RECHARGE_NOT_FOUND", False),   # a refund before its payment: sent again later
    ("FCFP0", "TOO_MANY_STEP_UPS", False),    # a rate limit
    ("40001", "SERIALIZATION_FAILURE", False),
])
def test_which_refusals_are_remembered(db: Conn, sqlstate: str, reason: str, kept: bool) -> None:
    rid = builders.rid("r")
    row = db.execute(
        "SELECT fc.remember_refusal(p_caller => 'c', p_request_id => %s, p_operation => 'confirm',"
        " p_request_hash => '\\x00', p_sqlstate => %s, p_reason => %s, p_field => 'f',"
        " p_now => now())", (rid, sqlstate, reason)).fetchone()
    assert row == (kept,)
    assert len(_stored(db, rid)) == int(kept)


def test_every_idempotent_call_names_the_operation_its_function_files_answers_under() -> None:
    """The server files a refusal under the operation of the function it
    called (db.idempotent_operation), which must be what that function's own
    fc.remember uses: fc.replay_guarded classes both alike, and a step-up's
    'already answered' check looks the key up by it."""
    found = {}
    for module in (account, adjustment, control, funding, points, reconciliation, risk,
                   security, transaction):
        for name, value in vars(module).items():
            if isinstance(value, str) and "p_request_hash => %(request_hash)s" in value:
                found[f"{module.__name__}.{name}"] = fcdb.idempotent_operation(value)
    assert found and all(found.values()), found
    assert found["fuelcard_server.services.transaction.CONFIRM_SQL"] == "confirm"
    assert found["fuelcard_server.services.adjustment.APPROVE_SQL"] == "approve_adjustment"
