"""A model-based test: Hypothesis drives random sequences of authorize,
confirm, cancel, recharge, redeem, retries and clock moves + expiry sweeps
against one real server and database, and after every step a plain Python
model of balance / held / points / hold states must match what the server
reports. At the end of every run `fuelcard verify` must find nothing.

Derandomized: a failure replays identically on the next run.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from fuelcard.v1 import account_pb2, common_pb2, funding_pb2, points_pb2, transaction_pb2
from fuelcard_server import verify
from google.protobuf.message import Message
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from tests.plugins.database import PostgresCluster
from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import shared_server, unpack

AUTHORIZED = common_pb2.HOLD_STATE_AUTHORIZED
CONFIRMED = common_pb2.HOLD_STATE_CONFIRMED
CANCELLED = common_pb2.HOLD_STATE_CANCELLED
EXPIRED = common_pb2.HOLD_STATE_EXPIRED
TTL = dt.timedelta(minutes=30)


@dataclass
class ModelHold:
    amount: int
    state: int
    expires: dt.datetime


class LedgerMachine(RuleBasedStateMachine):
    server: ClassVar[RunningServer]
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.card = builders.open_card(self.server)
        self.balance = 0
        self.points = 0
        self.model: dict[str, ModelHold] = {}
        self.exceptions: set[str] = set()
        # The last mutating call and its answer, for the retry rule.
        self.last: tuple[Callable[[], Message], Message] | None = None

    # ---------------------------------------------------------------- helpers
    @property
    def held(self) -> int:
        return sum(h.amount for h in self.model.values() if h.state == AUTHORIZED)

    def now(self) -> dt.datetime:
        return self.server.clock.now()

    def sweep_model(self) -> None:
        for h in self.model.values():
            if h.state == AUTHORIZED and h.expires <= self.now():
                h.state = EXPIRED

    def remember(self, call: Callable[[], Message]) -> Message:
        answer = call()
        self.last = (call, answer)
        return answer

    # ------------------------------------------------------------------ rules
    @initialize(amount=st.integers(50_000, 400_000))
    def opening_balance(self, amount: int) -> None:
        self.recharge(amount)

    @rule(amount=st.integers(1, 200_000))
    def recharge(self, amount: int) -> None:
        req = funding_pb2.RechargeRequest(
            request_id=builders.rid("m-r"), account_id=self.card.account_id,
            channel=funding_pb2.CHANNEL_BANK_CARD,
            channel_txn_id=f"m-{uuid.uuid4().hex}", amount_fen=amount)
        answer = self.remember(lambda: self.server.funding.Recharge(req))
        assert isinstance(answer, funding_pb2.RechargeResponse)
        assert answer.decision == common_pb2.DECISION_APPROVED
        self.balance += amount
        assert answer.balance_fen == self.balance

    @rule(target=holds, amount=st.one_of(st.integers(1, 60_000), st.integers(1, 60_000),
                                         st.integers(60_001, 250_000)))
    def authorize(self, amount: int) -> Any:
        req = builders.authorize_request(self.card, amount, request_id=builders.rid("m-a"))
        answer = self.remember(lambda: self.server.pos.Authorize(req))
        assert isinstance(answer, transaction_pb2.AuthorizeResponse)
        # The server releases the account's expired holds only when the
        # money is short, then looks again.
        if self.balance - self.held < amount:
            self.sweep_model()
        if self.balance - self.held < amount:
            assert answer.decision == common_pb2.DECISION_DECLINED
            assert answer.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
            assert answer.available_fen == self.balance - self.held
            return multiple()
        assert answer.decision == common_pb2.DECISION_APPROVED, answer
        hold_id: str = answer.hold.hold_id
        self.model[hold_id] = ModelHold(amount, AUTHORIZED, self.now() + TTL)
        assert answer.available_fen == self.balance - self.held
        return hold_id

    @rule(hold_id=holds, share=st.sampled_from([0, 1, 37, 50, 99, 100]))
    def confirm(self, hold_id: str, share: int) -> None:
        h = self.model[hold_id]
        final = h.amount * share // 100
        req = transaction_pb2.ConfirmRequest(request_id=builders.rid("m-c"), hold_id=hold_id,
                                             final_amount_fen=final, volume_ml=final,
                                             unit_price_fen=785)
        if h.state in (CONFIRMED, CANCELLED):
            try:
                self.server.pos.Confirm(req)
            except grpc.RpcError as err:
                e = unpack(err)
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION
                assert e.reason == ("HOLD_ALREADY_CONFIRMED" if h.state == CONFIRMED
                                    else "HOLD_CANCELLED")
                return
            raise AssertionError("confirm of a closed hold was accepted")
        answer = self.remember(lambda: self.server.pos.Confirm(req))
        assert isinstance(answer, transaction_pb2.ConfirmResponse)
        if final == 0:
            assert answer.decision == common_pb2.DECISION_APPROVED
            if h.state == AUTHORIZED:
                h.state = CANCELLED
        elif h.state == EXPIRED and self.balance - self.held < final:
            assert answer.decision == common_pb2.DECISION_DECLINED
            assert answer.decline_reason == common_pb2.DECLINE_REASON_HOLD_EXPIRED
            assert answer.settlement_exception_id
            self.exceptions.add(answer.settlement_exception_id)
        else:
            late = h.state == EXPIRED or h.expires <= self.now()
            assert answer.decision == common_pb2.DECISION_APPROVED, answer
            assert answer.hold.confirmed_late == late
            assert answer.points_earned == final // 100
            h.state = CONFIRMED
            self.balance -= final
            self.points += final // 100
        assert answer.hold.state == h.state
        assert answer.balance_fen == self.balance

    @rule(hold_id=holds)
    def cancel(self, hold_id: str) -> None:
        h = self.model[hold_id]
        req = transaction_pb2.CancelRequest(request_id=builders.rid("m-x"), hold_id=hold_id)
        if h.state == CONFIRMED:
            try:
                self.server.pos.Cancel(req)
            except grpc.RpcError as err:
                assert unpack(err).reason == "HOLD_ALREADY_CONFIRMED"
                return
            raise AssertionError("cancel of a confirmed hold was accepted")
        answer = self.remember(lambda: self.server.pos.Cancel(req))
        assert isinstance(answer, transaction_pb2.CancelResponse)
        if h.state == AUTHORIZED:
            h.state = CANCELLED
        assert answer.hold.state == h.state

    @rule(points=st.integers(1, 400))
    def redeem(self, points: int) -> None:
        req = points_pb2.RedeemPointsRequest(request_id=builders.rid("m-p"),
                                             account_id=self.card.account_id, points=points)
        answer = self.remember(lambda: self.server.points.RedeemPoints(req))
        assert isinstance(answer, points_pb2.RedeemPointsResponse)
        if points > self.points:
            assert answer.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_POINTS
        else:
            assert answer.decision == common_pb2.DECISION_APPROVED
            self.points -= points
        assert answer.points_balance == self.points

    @rule(minutes=st.integers(1, 40))
    def advance_and_expire(self, minutes: int) -> None:
        self.server.advance(dt.timedelta(minutes=minutes))
        due = sum(1 for h in self.model.values() if h.state == AUTHORIZED and h.expires <= self.now())
        # The sweep also serves earlier runs' accounts in this database.
        assert self.server.expire_holds() >= due
        self.sweep_model()

    @rule()
    def retry_last(self) -> None:
        """A POS retry over a bad link: the same request again changes
        nothing and gets the same answer."""
        if self.last is None:
            return
        call, answer = self.last
        assert call() == answer

    # ------------------------------------------------------------- invariants
    @invariant()
    def server_agrees_with_model(self) -> None:
        got = builders.balance(self.server, self.card)
        assert (got.balance.balance_fen, got.balance.held_fen, got.points_balance) == (
            self.balance, self.held, self.points)
        assert got.balance.available_fen == self.balance - self.held

    @invariant()
    def hold_states_agree(self) -> None:
        listed = self.server.accounts.ListHolds(account_pb2.ListHoldsRequest(
            account_id=self.card.account_id, page_size=500)).holds
        assert {h.hold_id: h.state for h in listed} == {k: h.state for k, h in self.model.items()}

    def teardown(self) -> None:
        violations = verify.run(self.server.database_url)
        assert violations == [], [(v.check, v.samples) for v in violations]


@pytest.fixture(scope="module")
def model_server(pg_cluster: PostgresCluster, migrated_template: str,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp: Path = tmp_path_factory.mktemp("model")
    with shared_server(pg_cluster, migrated_template, tmp,
                       f"fuelcard_model_{uuid.uuid4().hex[:8]}") as server:
        yield server


@pytest.mark.slow
def test_ledger_matches_a_simple_model(model_server: RunningServer) -> None:
    LedgerMachine.server = model_server
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=30, stateful_step_count=50, derandomize=True, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        print_blob=True))
