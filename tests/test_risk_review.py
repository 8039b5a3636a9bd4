"""Issue #6: suspension for manual review (暂挂 + 人工审核) end to end, and what
reviewers, terminals and admins may do."""

from __future__ import annotations

import datetime as dt
import functools

import grpc
from fuelcard.v1 import common_pb2, risk_pb2, risk_pb2_grpc, transaction_pb2

from tests.plugins.server import RunningServer
from tests.plugins.terminals import Fixture
from tests.plugins.terminals import expect as expect_tls
from tests.plugins.terminals import rid as tls_rid
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, expect, scalar, snapshot
from tests.support.risk_helpers import authorize, load_rules, risk, rule

MIN = dt.timedelta(minutes=1)


def _hold(server: RunningServer, hold_id: str) -> common_pb2.Hold:
    hold: common_pb2.Hold = server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold_id)).hold
    return hold


def _review(server: RunningServer, hold_id: str, verdict: risk_pb2.ReviewVerdict.ValueType,
            request_id: str | None = None) -> risk_pb2.ReviewHoldResponse:
    response: risk_pb2.ReviewHoldResponse = risk(server).ReviewHold(risk_pb2.ReviewHoldRequest(
        request_id=request_id or builders.rid("review"), hold_id=hold_id, verdict=verdict,
        note="called the driver"))
    return response


def test_suspended_hold_is_approved_by_a_reviewer_then_confirmed(server: RunningServer,
                                                                  db: Conn) -> None:
    load_rules(server, [rule("BIG", "amount", min_amount_fen=100_000, score=65)])
    card = builders.open_card(server, balance_fen=300_000)
    auth = authorize(server, card, 150_000)
    assert auth.decision == common_pb2.DECISION_REVIEW
    hold = auth.hold
    assert hold.state == common_pb2.HOLD_STATE_SUSPENDED
    assert not hold.HasField("close_time")
    # The POS may not settle it while it waits.
    expect(lambda: builders.confirm(server, hold.hold_id, 100_000),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_SUSPENDED")
    # The money stays reserved.
    assert builders.balance(server, card).balance.available_fen == 150_000

    listed = risk(server).ListSuspendedHolds(risk_pb2.ListSuspendedHoldsRequest())
    assert [(h.hold.hold_id, h.risk_score, list(h.fired_rules)) for h in listed.holds] == [
        (hold.hold_id, 65, ["BIG"])]

    server.advance(10 * MIN)
    review_id = builders.rid("review")
    approved = _review(server, hold.hold_id, risk_pb2.REVIEW_VERDICT_APPROVE, review_id).hold
    assert approved.state == common_pb2.HOLD_STATE_AUTHORIZED
    # The pump gets a full window from the approval.
    assert approved.expire_time.ToDatetime(dt.UTC) == server.clock.now() + 30 * MIN
    # A retry of the review replays; a second review is refused.
    assert _review(server, hold.hold_id, risk_pb2.REVIEW_VERDICT_APPROVE, review_id).hold == approved
    expect(lambda: _review(server, hold.hold_id, risk_pb2.REVIEW_VERDICT_REJECT),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_NOT_SUSPENDED")
    # The POS polls GetHold, sees AUTHORIZED, delivers and confirms.
    assert _hold(server, hold.hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED
    done = builders.confirm(server, hold.hold_id, 120_000)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.balance_fen == 180_000
    assert not risk(server).ListSuspendedHolds(risk_pb2.ListSuspendedHoldsRequest()).holds
    row = db.execute("SELECT review_state, reviewed_by, review_note, risk_rules FROM fc.holds"
                     " WHERE uid = %s", (hold.hold_id,)).fetchone()
    assert row == (2, "development", "called the driver", ["BIG"])
    assert_ledger_ok(server.database_url)


def test_rejected_hold_releases_the_money(server: RunningServer, db: Conn) -> None:
    load_rules(server, [rule("BIG", "amount", min_amount_fen=100_000)])
    card = builders.open_card(server, balance_fen=300_000)
    hold = authorize(server, card, 150_000).hold
    rejected = _review(server, hold.hold_id, risk_pb2.REVIEW_VERDICT_REJECT).hold
    assert rejected.state == common_pb2.HOLD_STATE_REJECTED
    assert rejected.close_time.ToDatetime(dt.UTC) == server.clock.now()
    assert account_row(db, card.account_id)["held_fen"] == 0
    expect(lambda: builders.confirm(server, hold.hold_id, 100_000),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_REJECTED")
    # Cancelling a rejected hold changes nothing, like an expired one.
    assert builders.cancel(server, hold.hold_id).hold.state == common_pb2.HOLD_STATE_REJECTED
    # Its room in the daily usage is given back too (verify checks the counters).
    assert scalar(db, "SELECT sum(amount_fen) FROM fc.usage WHERE scope_kind = 1") == 0
    assert_ledger_ok(server.database_url)


def test_unreviewed_suspension_expires_and_can_never_be_confirmed(server: RunningServer,
                                                                   db: Conn) -> None:
    load_rules(server, [rule("BIG", "amount", min_amount_fen=100_000)])
    card = builders.open_card(server, balance_fen=300_000)
    hold = authorize(server, card, 150_000).hold
    server.advance(30 * MIN)
    expect(lambda: _review(server, hold.hold_id, risk_pb2.REVIEW_VERDICT_APPROVE),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED")
    assert server.expire_holds() == 1
    assert _hold(server, hold.hold_id).state == common_pb2.HOLD_STATE_EXPIRED
    assert account_row(db, card.account_id)["held_fen"] == 0
    # An expired AUTHORIZED hold may be confirmed late; an expired suspended
    # one was never approved, so no fuel can have been sold on it.
    expect(lambda: builders.confirm(server, hold.hold_id, 100_000),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_SUSPENDED")
    assert_ledger_ok(server.database_url)


def test_the_pos_may_cancel_a_suspended_hold(server: RunningServer, db: Conn) -> None:
    load_rules(server, [rule("BIG", "amount", min_amount_fen=100_000)])
    card = builders.open_card(server, balance_fen=300_000)
    hold = authorize(server, card, 150_000).hold
    assert builders.cancel(server, hold.hold_id).hold.state == common_pb2.HOLD_STATE_CANCELLED
    assert account_row(db, card.account_id)["held_fen"] == 0
    expect(lambda: _review(server, hold.hold_id, risk_pb2.REVIEW_VERDICT_APPROVE),
           grpc.StatusCode.FAILED_PRECONDITION, "HOLD_NOT_SUSPENDED")
    assert_ledger_ok(server.database_url)


def test_suspended_holds_page_oldest_first(server: RunningServer) -> None:
    load_rules(server, [rule("ANY", "amount", min_amount_fen=1)])
    card = builders.open_card(server, balance_fen=300_000)
    ids = [authorize(server, card, 1_000).hold.hold_id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = risk(server).ListSuspendedHolds(risk_pb2.ListSuspendedHoldsRequest(
            page_size=2, page_token=token))
        seen += [h.hold.hold_id for h in page.holds]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    expect(lambda: risk(server).ListSuspendedHolds(risk_pb2.ListSuspendedHoldsRequest(
        page_token="x")), grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID")
    expect(lambda: risk(server).ReviewHold(risk_pb2.ReviewHoldRequest(
        request_id=builders.rid("r"), hold_id=ids[0])), grpc.StatusCode.INVALID_ARGUMENT,
        "ENUM_VALUE_INVALID", "verdict")


def test_a_note_with_control_characters_is_invalid_argument(server: RunningServer,
                                                            db: Conn) -> None:
    """PostgreSQL text cannot hold NUL: a note with one was INTERNAL (psycopg
    DataError). Notes follow the rule of every free-text field: no control
    characters; the refusal names the note and changes nothing."""
    load_rules(server, [rule("ANY", "amount", min_amount_fen=1)])
    card = builders.open_card(server, balance_fen=300_000)
    hold_id = authorize(server, card, 1_000).hold.hold_id
    before = snapshot(db)
    for note in ("ok\x00", "called\x07", "x" * 501):
        request = risk_pb2.ReviewHoldRequest(request_id=builders.rid("r"), hold_id=hold_id,
                                             verdict=risk_pb2.REVIEW_VERDICT_APPROVE, note=note)
        expect(functools.partial(risk(server).ReviewHold, request),
               grpc.StatusCode.INVALID_ARGUMENT, None, "note")
    assert snapshot(db) == before
    assert _hold(server, hold_id).state == common_pb2.HOLD_STATE_SUSPENDED
    # A note may run over several lines (line breaks and tabs are not refused).
    note = "called the driver:\r\n\tconfirmed at the pump\n"
    risk(server).ReviewHold(risk_pb2.ReviewHoldRequest(
        request_id=builders.rid("r"), hold_id=hold_id, verdict=risk_pb2.REVIEW_VERDICT_APPROVE,
        note=note))
    assert _hold(server, hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED


def test_roles_reviewers_review_admins_load_terminals_neither(setup: Fixture, db: Conn) -> None:
    server = setup.server
    admin = risk_pb2_grpc.RiskServiceStub(server.channel("admin-ops"))
    reviewer = risk_pb2_grpc.RiskServiceStub(server.channel("reviewer-risk"))
    pos = risk_pb2_grpc.RiskServiceStub(server.channel("pos-KM-001-T1"))
    doc = '[[rules]]\nid = "BIG"\nkind = "amount"\naction = "review"\nmin_amount_fen = 10000\n'
    name = 'name = "t"\n'
    load = risk_pb2.LoadRuleSetRequest(request_id=tls_rid(), document=name + doc,
                                       format=risk_pb2.RULE_FORMAT_TOML)
    for stub in (reviewer, pos):
        try:
            stub.LoadRuleSet(load)
            raise AssertionError("only admins load rules")
        except grpc.RpcError as err:
            expect_tls(err, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    admin.LoadRuleSet(load)
    auth = setup.t1.pos.Authorize(setup.t1.authorize(setup.card_number, 20_000))
    assert auth.decision == common_pb2.DECISION_REVIEW
    review = risk_pb2.ReviewHoldRequest(request_id=tls_rid(), hold_id=auth.hold.hold_id,
                                        verdict=risk_pb2.REVIEW_VERDICT_APPROVE)
    for stub in (pos, admin):
        try:
            stub.ReviewHold(review)
            raise AssertionError("only reviewers review")
        except grpc.RpcError as err:
            expect_tls(err, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    # The reviewer sees why; the terminal was told the decision only.
    assert [(h.hold.hold_id, list(h.fired_rules)) for h in reviewer.ListSuspendedHolds(
        risk_pb2.ListSuspendedHoldsRequest()).holds] == [(auth.hold.hold_id, ["BIG"])]
    assert auth.risk == risk_pb2.RiskAssessment(decision=risk_pb2.RISK_DECISION_REVIEW)
    assert reviewer.ReviewHold(review).hold.state == common_pb2.HOLD_STATE_AUTHORIZED
    confirmed = setup.t1.pos.Confirm(setup.t1.confirm(auth.hold.hold_id, 20_000))
    assert confirmed.decision == common_pb2.DECISION_APPROVED
    assert scalar(db, "SELECT reviewed_by FROM fc.holds WHERE uid = %s",
                  (auth.hold.hold_id,)) == "reviewer::risk"
    assert scalar(db, "SELECT created_by FROM fc.risk_rule_sets") == "admin::ops"
    assert scalar(db, "SELECT count(*) FROM fc.audit_log WHERE actor = 'reviewer::risk'"
                  " AND method = '/fuelcard.v1.RiskService/ReviewHold' AND outcome = 'OK'"
                  " AND target = %s", (auth.hold.hold_id,)) == 1
