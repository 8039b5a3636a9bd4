"""Manual adjustments under dual control (issue 14, item 7): one admin
proposes a credit or a debit with a reason, a second, different admin
approves (booked once, journal kind 9 against ADJUSTMENTS, never below the
held amount) or rejects it; nobody approves their own; idempotent on
request_id; admin only; audited; `fuelcard verify` clean, and it finds an
approval that was not booked."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, adjustment_pb2, adjustment_pb2_grpc
from fuelcard_server import verify
from fuelcard_server.certs import DevPki
from fuelcard_server.identity import Role

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders, control_builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, count, expect
from tests.support.row_lock import twins_behind_row_lock, wait_queued

CREDIT = adjustment_pb2.ADJUSTMENT_DIRECTION_CREDIT
DEBIT = adjustment_pb2.ADJUSTMENT_DIRECTION_DEBIT
PROPOSED = adjustment_pb2.ADJUSTMENT_STATE_PROPOSED
APPROVED = adjustment_pb2.ADJUSTMENT_STATE_APPROVED
REJECTED = adjustment_pb2.ADJUSTMENT_STATE_REJECTED
FP = grpc.StatusCode.FAILED_PRECONDITION
Stub = adjustment_pb2_grpc.AdjustmentServiceStub


@pytest.fixture(scope="module", autouse=True)
def more_admins(dev_certs: Path) -> Iterator[None]:
    """Two more admins besides admin-ops: dual control needs people."""
    pki = DevPki(dev_certs)
    for name in ("finance", "controller"):
        pki.client(Role.ADMIN, name)
    yield


def _stub(tls: TlsServer, name: str) -> Stub:
    return Stub(tls.channel(name))


def _propose(stub: Stub, account_id: str, direction: adjustment_pb2.AdjustmentDirection.ValueType,
             amount: int, reason: str = "double charge at KM-001, ticket 4711",
             request_id: str | None = None) -> adjustment_pb2.Adjustment:
    answer = stub.ProposeAdjustment(adjustment_pb2.ProposeAdjustmentRequest(
        request_id=request_id or builders.rid("adj"), account_id=account_id,
        direction=direction, amount_fen=amount, reason=reason))
    adjustment: adjustment_pb2.Adjustment = answer.adjustment
    return adjustment


def _approve(stub: Stub, adjustment_id: str, request_id: str | None = None,
             note: str = "checked against the receipt") -> adjustment_pb2.ApproveAdjustmentResponse:
    answer: adjustment_pb2.ApproveAdjustmentResponse = stub.ApproveAdjustment(
        adjustment_pb2.ApproveAdjustmentRequest(request_id=request_id or builders.rid("ok"),
                                                adjustment_id=adjustment_id, note=note))
    return answer


def _reject(stub: Stub, adjustment_id: str, request_id: str | None = None
            ) -> adjustment_pb2.Adjustment:
    answer = stub.RejectAdjustment(adjustment_pb2.RejectAdjustmentRequest(
        request_id=request_id or builders.rid("no"), adjustment_id=adjustment_id, note="no"))
    adjustment: adjustment_pb2.Adjustment = answer.adjustment
    return adjustment


def _entries(db: Conn) -> list[tuple[object, ...]]:
    return db.execute(
        "SELECT j.amount, d.uid::text, coalesce(d.system_code, ''), c.uid::text,"
        " coalesce(c.system_code, ''), a.uid::text FROM fc.journal j"
        " JOIN fc.accounts d ON d.id = j.debit_account_id"
        " JOIN fc.accounts c ON c.id = j.credit_account_id"
        " JOIN fc.adjustments a ON a.id = j.adjustment_id WHERE j.kind = 9 ORDER BY j.id").fetchall()


def test_a_credit_and_a_debit_need_a_second_admin(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    ops, finance = _stub(tls_server, "admin-ops"), _stub(tls_server, "admin-finance")
    system = db.execute("SELECT uid::text FROM fc.accounts WHERE system_code = 'ADJUSTMENTS'"
                        ).fetchone()
    assert system is not None

    rid = builders.rid("adj")
    credit = _propose(ops, card.account_id, CREDIT, 2_500, request_id=rid)
    assert (credit.state, credit.account_id, credit.direction, credit.amount_fen,
            credit.proposed_by, credit.decided_by, credit.entry_id) == (
        PROPOSED, card.account_id, CREDIT, 2_500, "admin::ops", "", 0)
    assert credit.propose_time.seconds > 0 and not credit.HasField("decide_time")
    # Proposing books nothing; the same request again is the same proposal.
    assert account_row(db, card.account_id)["balance_fen"] == 10_000
    assert _propose(ops, card.account_id, CREDIT, 2_500, request_id=rid) == credit
    expect(lambda: _propose(ops, card.account_id, CREDIT, 2_501, request_id=rid), FP,
           "REQUEST_ID_REUSED")
    assert count(db, "adjustments") == 1

    # Nobody approves their own: refused, and so is the retry; still PROPOSED.
    own = builders.rid("ok")
    for _ in range(2):
        expect(lambda: _approve(ops, credit.adjustment_id, own), grpc.StatusCode.PERMISSION_DENIED,
               "OWN_ADJUSTMENT")
    got = ops.GetAdjustment(adjustment_pb2.GetAdjustmentRequest(
        adjustment_id=credit.adjustment_id)).adjustment
    assert got == credit

    # A second admin approves: booked at once against ADJUSTMENTS.
    rid = builders.rid("ok")
    approved = _approve(finance, credit.adjustment_id, rid)
    assert approved.balance_fen == 12_500
    a = approved.adjustment
    assert (a.state, a.decided_by, a.decision_note) == (
        APPROVED, "admin::finance", "checked against the receipt")
    assert a.entry_id > 0 and a.decide_time.seconds > 0
    assert _approve(finance, credit.adjustment_id, rid) == approved  # a replay
    expect(lambda: _approve(_stub(tls_server, "admin-controller"), credit.adjustment_id), FP,
           "ADJUSTMENT_ALREADY_DECIDED")
    expect(lambda: _reject(finance, credit.adjustment_id), FP, "ADJUSTMENT_ALREADY_DECIDED")

    # A debit the other way round: finance proposes, ops approves.
    debit = _propose(finance, card.account_id, DEBIT, 500, reason="fee refunded twice")
    done = _approve(ops, debit.adjustment_id)
    assert done.balance_fen == 12_000 and done.adjustment.state == APPROVED
    assert _entries(db) == [
        (2_500, system[0], "ADJUSTMENTS", card.account_id, "", credit.adjustment_id),
        (500, card.account_id, "", system[0], "ADJUSTMENTS", debit.adjustment_id)]
    assert builders.balance(server, card).balance.balance_fen == 12_000

    # Audited: who did what to which adjustment, refusals too.
    audited = db.execute(
        "SELECT actor, method, target::text, outcome FROM fc.audit_log"
        " WHERE method LIKE '/fuelcard.v1.AdjustmentService/%%' ORDER BY id").fetchall()
    approve = "/fuelcard.v1.AdjustmentService/ApproveAdjustment"
    assert audited[0] == ("admin::ops", "/fuelcard.v1.AdjustmentService/ProposeAdjustment",
                          card.account_id, "OK")
    assert [(r[0], r[2], r[3]) for r in audited if r[1] == approve][:3] == [
        ("admin::ops", credit.adjustment_id, "PERMISSION_DENIED OWN_ADJUSTMENT"),
        ("admin::ops", credit.adjustment_id, "PERMISSION_DENIED OWN_ADJUSTMENT"),
        ("admin::finance", credit.adjustment_id, "OK")]
    assert_ledger_ok(server.database_url)


def test_a_debit_never_takes_held_money_and_a_refusal_leaves_it_proposed(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000)
    ops, finance = _stub(tls_server, "admin-ops"), _stub(tls_server, "admin-finance")
    hold = builders.authorize(server, card, 8_000).hold
    debit = _propose(ops, card.account_id, DEBIT, 3_000)
    rid = builders.rid("ok")
    for _ in range(2):
        expect(lambda: _approve(finance, debit.adjustment_id, rid), FP,
               "ADJUSTMENT_EXCEEDS_AVAILABLE")
    assert (account_row(db, card.account_id)["balance_fen"], count(db, "journal", "kind = 9")) == (
        10_000, 0)
    # The hold goes; the same approval request is still refused (remembered,
    # issue 14 item 8); a new one decides afresh and books it.
    builders.cancel(server, hold.hold_id)
    expect(lambda: _approve(finance, debit.adjustment_id, rid), FP, "ADJUSTMENT_EXCEEDS_AVAILABLE")
    assert _approve(finance, debit.adjustment_id).balance_fen == 7_000
    # Exactly the available amount may go, not a fen more.
    builders.authorize(server, card, 2_000)
    edge = _propose(ops, card.account_id, DEBIT, 5_001)
    expect(lambda: _approve(finance, edge.adjustment_id), FP, "ADJUSTMENT_EXCEEDS_AVAILABLE")
    exact = _propose(ops, card.account_id, DEBIT, 5_000)
    assert _approve(finance, exact.adjustment_id).balance_fen == 2_000
    assert account_row(db, card.account_id)["held_fen"] == 2_000
    # A credit above the maximum balance is refused the same way.
    db.execute("UPDATE fc.accounts SET max_balance_fen = 3_000 WHERE uid = %s", (card.account_id,))
    big = _propose(ops, card.account_id, CREDIT, 1_001)
    expect(lambda: _approve(finance, big.adjustment_id), FP, "MAX_BALANCE_EXCEEDED")
    assert _approve(finance, _propose(ops, card.account_id, CREDIT, 1_000).adjustment_id
                    ).balance_fen == 3_000
    # The proposer withdraws the refused one.
    assert _reject(ops, big.adjustment_id).state == REJECTED
    expect(lambda: _approve(finance, big.adjustment_id), FP, "ADJUSTMENT_ALREADY_DECIDED")
    assert_ledger_ok(server.database_url)


def test_two_admins_approving_at_once_book_it_once(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000)
    ops = _stub(tls_server, "admin-ops")
    deciders = [_stub(tls_server, "admin-finance"), _stub(tls_server, "admin-controller")]
    adj = _propose(ops, card.account_id, CREDIT, 700)

    def approve(stub: Stub) -> adjustment_pb2.ApproveAdjustmentResponse | grpc.RpcError:
        try:
            return _approve(stub, adj.adjustment_id)
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(2) as pool, psycopg.connect(server.database_url) as holder:
        holder.execute("SELECT 1 FROM fc.adjustments WHERE uid = %s FOR UPDATE",
                       (adj.adjustment_id,))
        futures = [pool.submit(approve, stub) for stub in deciders]
        wait_queued(server.database_url, 2, futures)
        holder.rollback()
        answers = [f.result(timeout=30) for f in futures]
    won = [a for a in answers if isinstance(a, adjustment_pb2.ApproveAdjustmentResponse)]
    lost = [a for a in answers if isinstance(a, grpc.RpcError)]
    assert len(won) == 1 and len(lost) == 1, answers
    assert lost[0].code() == FP
    assert won[0].balance_fen == 1_700
    assert count(db, "journal", "kind = 9") == 1

    # An approval racing a rejection: one decides, the other is refused.
    adj = _propose(ops, card.account_id, DEBIT, 100)
    with ThreadPoolExecutor(2) as pool, psycopg.connect(server.database_url) as holder:
        holder.execute("SELECT 1 FROM fc.adjustments WHERE uid = %s FOR UPDATE",
                       (adj.adjustment_id,))
        approving = pool.submit(approve, deciders[0])
        rejecting = pool.submit(_reject, deciders[1], adj.adjustment_id)
        wait_queued(server.database_url, 2, [approving, rejecting])
        holder.rollback()
        first = approving.result(timeout=30)
        rejected = rejecting.exception(timeout=30) is None
    assert isinstance(first, grpc.RpcError) == rejected
    assert count(db, "journal", "kind = 9") == (1 if rejected else 2)

    # Twins of one approval (a retry sent while the first was in flight):
    # one booking, every twin the first's answer.
    adj = _propose(ops, card.account_id, CREDIT, 300)
    request = adjustment_pb2.ApproveAdjustmentRequest(request_id=builders.rid("ok"),
                                                      adjustment_id=adj.adjustment_id)
    twins = twins_behind_row_lock(server.database_url, "adjustments", adj.adjustment_id,
                                  functools.partial(deciders[0].ApproveAdjustment, request))
    results = [f.result() for f in twins]
    assert all(r == results[0] for r in results) and results[0].adjustment.state == APPROVED
    assert count(db, "journal", "kind = 9") == (2 if rejected else 3)
    assert_ledger_ok(server.database_url)


def test_listing_roles_bad_input_and_accounts_that_cannot_be_adjusted(
        server: RunningServer, tls_server: TlsServer) -> None:
    ops, finance = _stub(tls_server, "admin-ops"), _stub(tls_server, "admin-finance")
    card = builders.open_card(server, balance_fen=1_000)
    other = builders.open_card(server)
    made = [_propose(ops, card.account_id, CREDIT, 100 * (i + 1)) for i in range(3)]
    made.append(_propose(ops, other.account_id, CREDIT, 50))
    _approve(finance, made[0].adjustment_id)

    def ids(**filters: object) -> list[str]:
        return [a.adjustment_id for a in finance.ListAdjustments(
            adjustment_pb2.ListAdjustmentsRequest(**filters)).adjustments]  # type: ignore[arg-type]

    assert ids() == [a.adjustment_id for a in reversed(made)]
    assert ids(state=PROPOSED, account_id=card.account_id) == [made[2].adjustment_id,
                                                                made[1].adjustment_id]
    assert ids(state=APPROVED) == [made[0].adjustment_id]
    page = finance.ListAdjustments(adjustment_pb2.ListAdjustmentsRequest(page_size=3))
    assert len(page.adjustments) == 3 and page.next_page_token
    assert ids(page_token=page.next_page_token, page_size=3) == [made[0].adjustment_id]

    # Accounts without money of their own, and unknown ones.
    fleet = control_builders.open_fleet(server, 5_000, [account_pb2.FUNDING_MODE_SHARED])
    expect(lambda: _propose(ops, fleet.subs[0].account_id, CREDIT, 10), FP,
           "ACCOUNT_USES_PARENT_BALANCE")
    expect(lambda: _propose(ops, str(uuid.uuid4()), CREDIT, 10), grpc.StatusCode.NOT_FOUND,
           "ACCOUNT_NOT_FOUND")
    expect(lambda: _approve(finance, str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND,
           "ADJUSTMENT_NOT_FOUND")
    expect(lambda: finance.GetAdjustment(adjustment_pb2.GetAdjustmentRequest(
        adjustment_id=str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND, "ADJUSTMENT_NOT_FOUND")

    e = expect(lambda: ops.ProposeAdjustment(adjustment_pb2.ProposeAdjustmentRequest(
        request_id="", account_id="x", amount_fen=0, reason=" ")), grpc.StatusCode.INVALID_ARGUMENT)
    assert set(e.fields) == {"request_id", "account_id", "direction", "amount_fen", "reason"}
    expect(lambda: _propose(ops, card.account_id, DEBIT, 1_000_000_001), grpc.StatusCode.INVALID_ARGUMENT,
           "AMOUNT_TOO_LARGE", field="amount_fen")
    expect(lambda: finance.ApproveAdjustment(adjustment_pb2.ApproveAdjustmentRequest(
        request_id="r", adjustment_id="nope")), grpc.StatusCode.INVALID_ARGUMENT, field="adjustment_id")

    for name in ("adapter-wechat-gw", "analytics-bi", "reviewer-risk", "pos-KM-001-T1"):
        stub = _stub(tls_server, name)
        expect(lambda: _propose(stub, card.account_id, CREDIT, 10),  # noqa: B023
               grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
        expect(lambda: _approve(stub, made[1].adjustment_id),  # noqa: B023
               grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
        expect(lambda: stub.ListAdjustments(adjustment_pb2.ListAdjustmentsRequest()),  # noqa: B023
               grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert_ledger_ok(server.database_url)


def test_without_identities_nothing_can_be_approved(server: RunningServer, db: Conn) -> None:
    """Development mode (no TLS): every caller is the same 'development', so
    dual control cannot be met and no adjustment is ever booked."""
    card = builders.open_card(server, balance_fen=1_000)
    stub = Stub(server.channel)
    adj = _propose(stub, card.account_id, CREDIT, 100)
    assert adj.proposed_by == "development"
    expect(lambda: _approve(stub, adj.adjustment_id), grpc.StatusCode.PERMISSION_DENIED,
           "OWN_ADJUSTMENT")
    assert count(db, "journal", "kind = 9") == 0
    assert_ledger_ok(server.database_url)


def test_verify_finds_an_approval_that_was_not_booked(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=1_000)
    ops, finance = _stub(tls_server, "admin-ops"), _stub(tls_server, "admin-finance")
    booked = _propose(ops, card.account_id, CREDIT, 100)
    _approve(finance, booked.adjustment_id)
    pending = _propose(ops, card.account_id, CREDIT, 200)
    assert_ledger_ok(server.database_url)
    db.execute("UPDATE fc.adjustments SET state = 2, decided_by = 'admin::finance',"
               " decided_at = now() WHERE uid = %s", (pending.adjustment_id,))
    assert [v.check for v in verify.run(server.database_url)] == ["adjustments_booked_once"]
    # ...and one booked twice (a second entry moving the same money).
    db.execute("UPDATE fc.adjustments SET state = 3 WHERE uid = %s", (pending.adjustment_id,))
    db.execute("INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
               " adjustment_id, created_at) SELECT kind, asset, debit_account_id,"
               " credit_account_id, amount, adjustment_id, created_at FROM fc.journal"
               " WHERE kind = 9")
    db.execute("UPDATE fc.accounts SET balance_fen = balance_fen + 100 WHERE uid = %s",
               (card.account_id,))
    assert [v.check for v in verify.run(server.database_url)] == ["adjustments_booked_once"]
