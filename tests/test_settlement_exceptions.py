"""Settlement exceptions as a resource (issue 14, item 6): the late confirms
that found the money gone are listed (paged, by state and kind), read and
resolved once with a note through ReconciliationService and `fuelcard
exceptions`; idempotent on request_id, admin only, audited; a late confirm
that pays after all closes one as SETTLED; `fuelcard verify` finds an open
one nobody could reach."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest
from fuelcard.v1 import common_pb2, settlement_pb2, settlement_pb2_grpc
from fuelcard_server import cli, verify

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, assert_ledger_ok, expect
from tests.support.row_lock import twins_behind_row_lock, wait_queued

OPEN = settlement_pb2.SETTLEMENT_EXCEPTION_STATE_OPEN
RESOLVED = settlement_pb2.SETTLEMENT_EXCEPTION_STATE_RESOLVED
SETTLED = settlement_pb2.SETTLEMENT_EXCEPTION_STATE_SETTLED
LATE = settlement_pb2.SETTLEMENT_EXCEPTION_KIND_LATE_CONFIRM_NO_FUNDS
FP = grpc.StatusCode.FAILED_PRECONDITION
MIN = dt.timedelta(minutes=1)
RESOLVE = "/fuelcard.v1.ReconciliationService/ResolveSettlementException"


def _late_confirm(server: RunningServer, sale_fen: int) -> tuple[builders.FundedCard, str, str]:
    """A hold that expired, whose money another sale spent, confirmed late:
    the card, the hold and the settlement exception it left."""
    card = builders.open_card(server, balance_fen=sale_fen)
    hold = builders.authorize(server, card, sale_fen).hold
    server.advance(31 * MIN)
    other = builders.authorize(server, card, sale_fen).hold  # releases the expired hold
    builders.confirm(server, other.hold_id, sale_fen)
    late = builders.confirm(server, hold.hold_id, sale_fen)
    assert late.decision == common_pb2.DECISION_DECLINED
    assert late.decline_reason == common_pb2.DECLINE_REASON_HOLD_EXPIRED
    return card, hold.hold_id, late.settlement_exception_id


def _stub(tls_server: TlsServer, name: str = "admin-ops"
          ) -> settlement_pb2_grpc.ReconciliationServiceStub:
    return settlement_pb2_grpc.ReconciliationServiceStub(tls_server.channel(name))


def _resolve(stub: settlement_pb2_grpc.ReconciliationServiceStub, exception_id: str, note: str,
             request_id: str | None = None) -> settlement_pb2.SettlementException:
    answer = stub.ResolveSettlementException(settlement_pb2.ResolveSettlementExceptionRequest(
        request_id=request_id or builders.rid("rs"), exception_id=exception_id, resolution=note))
    exception: settlement_pb2.SettlementException = answer.settlement_exception
    return exception


def test_exceptions_are_listed_read_and_resolved_once(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    made = [_late_confirm(server, 1_000 * (i + 1)) for i in range(3)]
    stub = _stub(tls_server)

    every = stub.ListSettlementExceptions(settlement_pb2.ListSettlementExceptionsRequest())
    assert [x.exception_id for x in every.settlement_exceptions] == [m[2] for m in reversed(made)]
    assert not every.next_page_token
    first = every.settlement_exceptions[-1]
    card, hold_id, exception_id = made[0]
    assert (first.kind, first.state, first.account_id, first.hold_id, first.amount_fen,
            first.reason, first.recharge_id, first.channel_txn_id, first.channel) == (
        LATE, OPEN, card.account_id, hold_id, 1_000, "HOLD_EXPIRED_INSUFFICIENT_FUNDS", "", "", 0)
    assert first.create_time.seconds > 0 and not first.HasField("resolve_time")
    got = stub.GetSettlementException(settlement_pb2.GetSettlementExceptionRequest(
        exception_id=exception_id)).settlement_exception
    assert got == first

    # Paged two at a time, with the filters; a kind no flow records yet lists nothing.
    page = stub.ListSettlementExceptions(settlement_pb2.ListSettlementExceptionsRequest(
        state=OPEN, kind=LATE, page_size=2))
    rest = stub.ListSettlementExceptions(settlement_pb2.ListSettlementExceptionsRequest(
        state=OPEN, kind=LATE, page_size=2, page_token=page.next_page_token))
    assert [x.amount_fen for x in page.settlement_exceptions] == [3_000, 2_000]
    assert [x.amount_fen for x in rest.settlement_exceptions] == [1_000]
    assert not rest.next_page_token
    assert not stub.ListSettlementExceptions(settlement_pb2.ListSettlementExceptionsRequest(
        kind=settlement_pb2.SETTLEMENT_EXCEPTION_KIND_OVERRUN_SHORTFALL)).settlement_exceptions

    # Resolve: OPEN -> RESOLVED with the note and the actor; the same request
    # again answers the same; another resolution is refused, and so is its retry.
    rid = builders.rid("rs")
    done = _resolve(stub, exception_id, "collected from the holder, ticket 4712", rid)
    assert (done.state, done.resolution, done.resolved_by) == (
        RESOLVED, "collected from the holder, ticket 4712", "admin::ops")
    assert done.resolve_time.seconds > 0
    assert _resolve(stub, exception_id, "collected from the holder, ticket 4712", rid) == done
    again = builders.rid("rs")
    for _ in range(2):
        expect(lambda: _resolve(stub, exception_id, "again", again), FP,
               "SETTLEMENT_EXCEPTION_ALREADY_RESOLVED")
    expect(lambda: _resolve(stub, made[1][2], "collected from the holder, ticket 4712", rid), FP,
           "REQUEST_ID_REUSED")
    assert stub.GetSettlementException(settlement_pb2.GetSettlementExceptionRequest(
        exception_id=exception_id)).settlement_exception == done

    # A late confirm that finds the money after all settles the sale and
    # closes its exception as SETTLED: no note, no resolver, not resolvable.
    card2, hold2, exception2 = made[1]
    builders.recharge(server, card2.account_id, 5_000)
    paid = builders.confirm(server, hold2, 2_000)
    assert paid.decision == common_pb2.DECISION_APPROVED and paid.hold.confirmed_late
    settled = stub.GetSettlementException(settlement_pb2.GetSettlementExceptionRequest(
        exception_id=exception2)).settlement_exception
    assert (settled.state, settled.resolution, settled.resolved_by) == (SETTLED, "", "")
    assert settled.HasField("resolve_time")
    expect(lambda: _resolve(stub, exception2, "written off"), FP,
           "SETTLEMENT_EXCEPTION_ALREADY_RESOLVED")
    by_state = {state: [x.exception_id for x in stub.ListSettlementExceptions(
        settlement_pb2.ListSettlementExceptionsRequest(state=state)).settlement_exceptions]
        for state in (OPEN, RESOLVED, SETTLED)}
    assert by_state == {OPEN: [made[2][2]], RESOLVED: [exception_id], SETTLED: [exception2]}

    expect(lambda: stub.GetSettlementException(settlement_pb2.GetSettlementExceptionRequest(
        exception_id=str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND, "SETTLEMENT_EXCEPTION_NOT_FOUND")
    expect(lambda: _resolve(stub, str(uuid.uuid4()), "x"), grpc.StatusCode.NOT_FOUND,
           "SETTLEMENT_EXCEPTION_NOT_FOUND")

    # Audited with the actor and the exception as the target, refusals too.
    audited = db.execute("SELECT actor, target::text, outcome FROM fc.audit_log"
                         " WHERE method = %s ORDER BY id", (RESOLVE,)).fetchall()
    assert audited[:4] == [
        ("admin::ops", exception_id, "OK"), ("admin::ops", exception_id, "OK"),
        ("admin::ops", exception_id, "FAILED_PRECONDITION SETTLEMENT_EXCEPTION_ALREADY_RESOLVED"),
        ("admin::ops", exception_id, "FAILED_PRECONDITION SETTLEMENT_EXCEPTION_ALREADY_RESOLVED")]
    assert db.execute("SELECT resolution, resolved_by FROM fc.settlement_exceptions"
                      " WHERE resolved_by IS NOT NULL").fetchall() == [
        ("collected from the holder, ticket 4712", "admin::ops")]
    assert_ledger_ok(server.database_url)


def test_two_resolutions_at_once_one_wins(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    _, _, exception_id = _late_confirm(server, 3_000)
    ops, other = _stub(tls_server), _stub(tls_server)

    def resolve(stub: settlement_pb2_grpc.ReconciliationServiceStub, note: str
                ) -> settlement_pb2.SettlementException | grpc.RpcError:
        try:
            return _resolve(stub, exception_id, note)
        except grpc.RpcError as err:
            return err

    # Both queue behind the row lock held from the side, then race for it.
    with ThreadPoolExecutor(2) as pool, psycopg.connect(server.database_url) as holder:
        holder.execute("SELECT 1 FROM fc.settlement_exceptions WHERE uid = %s FOR UPDATE",
                       (exception_id,))
        futures = [pool.submit(resolve, ops, "first note"), pool.submit(resolve, other, "second")]
        wait_queued(server.database_url, 2, futures)
        holder.rollback()
        answers = [f.result(timeout=30) for f in futures]
    won = [a for a in answers if isinstance(a, settlement_pb2.SettlementException)]
    lost = [a for a in answers if isinstance(a, grpc.RpcError)]
    assert len(won) == 1 and len(lost) == 1, answers
    assert lost[0].code() == FP
    stored = db.execute("SELECT resolution FROM fc.settlement_exceptions WHERE uid = %s",
                        (exception_id,)).fetchall()
    assert stored == [(won[0].resolution,)]

    # Twins of one request (a retry sent while the first was in flight) all
    # get the first's answer.
    _, _, exception_id = _late_confirm(server, 4_000)
    request = settlement_pb2.ResolveSettlementExceptionRequest(
        request_id=builders.rid("rs"), exception_id=exception_id, resolution="twin note")
    stub = _stub(tls_server)
    twins = twins_behind_row_lock(server.database_url, "settlement_exceptions", exception_id,
                                  functools.partial(stub.ResolveSettlementException, request))
    results = [f.result() for f in twins]
    assert all(r == results[0] for r in results)
    assert results[0].settlement_exception.state == RESOLVED
    assert_ledger_ok(server.database_url)


def test_only_admins_follow_up_and_bad_requests_are_named(
        server: RunningServer, tls_server: TlsServer) -> None:
    _, _, exception_id = _late_confirm(server, 2_000)
    for name in ("adapter-wechat-gw", "analytics-bi", "reviewer-risk", "pos-KM-001-T1"):
        stub = _stub(tls_server, name)
        calls: list[Callable[[], object]] = [
            functools.partial(stub.ListSettlementExceptions,
                              settlement_pb2.ListSettlementExceptionsRequest()),
            functools.partial(stub.GetSettlementException,
                              settlement_pb2.GetSettlementExceptionRequest(exception_id=exception_id)),
            functools.partial(_resolve, stub, exception_id, "x")]
        for call in calls:
            expect(call, grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    stub = _stub(tls_server)
    expect(lambda: stub.ListSettlementExceptions(settlement_pb2.ListSettlementExceptionsRequest(
        state=9, kind=9, page_size=1001, page_token="x")),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT, field="page_token")
    e = expect(lambda: stub.ResolveSettlementException(
        settlement_pb2.ResolveSettlementExceptionRequest(
            request_id="bad id", exception_id="nope", resolution="")),
        grpc.StatusCode.INVALID_ARGUMENT)
    assert set(e.fields) == {"request_id", "exception_id", "resolution"}
    expect(lambda: stub.GetSettlementException(settlement_pb2.GetSettlementExceptionRequest(
        exception_id="12")), grpc.StatusCode.INVALID_ARGUMENT, field="exception_id")
    assert stub.GetSettlementException(settlement_pb2.GetSettlementExceptionRequest(
        exception_id=exception_id)).settlement_exception.state == OPEN
    assert_ledger_ok(server.database_url)


def test_the_cli_lists_reads_and_resolves(server: RunningServer, db: Conn,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    made = [_late_confirm(server, 1_500), _late_confirm(server, 2_500)]
    url = ["--database-url", server.database_url]

    assert cli.main(["exceptions", "list", *url, "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{made[1][2]}  OPEN     LATE_CONFIRM_NO_FUNDS  2500 fen")
    assert out[1].startswith("more: --page-token ")
    assert cli.main(["exceptions", "list", *url, "--limit", "1",
                     "--page-token", out[1].split()[-1]]) == 0
    assert capsys.readouterr().out.startswith(f"{made[0][2]}  OPEN")

    assert cli.main(["exceptions", "get", *url, made[0][2]]) == 0
    shown = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()
                 if len(line.split(maxsplit=1)) == 2)
    assert (shown["state"], shown["amount_fen"], shown["hold_id"], shown["account_id"]) == (
        "OPEN", "1500", made[0][1], made[0][0].account_id)

    resolve = ["exceptions", "resolve", *url, made[0][2], "--note", "invoiced, 2026-118",
               "--request-id", "cli-r-1"]
    assert cli.main(resolve) == 0
    assert "RESOLVED" in capsys.readouterr().out
    assert cli.main(resolve) == 0  # the same request: the same answer
    assert "invoiced, 2026-118" in capsys.readouterr().out
    assert cli.main(["exceptions", "resolve", *url, made[0][2], "--note", "again"]) == 1
    assert "SETTLEMENT_EXCEPTION_ALREADY_RESOLVED" in capsys.readouterr().err
    assert cli.main(["exceptions", "get", *url, str(uuid.uuid4())]) == 1
    capsys.readouterr()
    assert cli.main(["exceptions", "list", *url, "--state", "resolved"]) == 0
    assert capsys.readouterr().out.startswith(f"{made[0][2]}  RESOLVED")
    rows = db.execute("SELECT actor, method, target::text, outcome FROM fc.audit_log"
                      " WHERE method LIKE 'cli/%%' ORDER BY id").fetchall()
    assert [r[1:] for r in rows] == [("cli/fuelcard exceptions resolve", made[0][2], "OK")] * 2
    assert rows[0][0].startswith("cli:")
    assert_ledger_ok(server.database_url)


def test_verify_finds_an_open_exception_nobody_can_reach(server: RunningServer, db: Conn) -> None:
    """An overrun shortfall (kind 2) recorded against a hold of another
    account: listed under the wrong account, so nobody chases the right one."""
    card = builders.open_card(server, balance_fen=1_000)
    stranger = builders.open_card(server, balance_fen=100)
    sale = builders.authorize(server, card, 1_000).hold
    builders.confirm(server, sale.hold_id, 1_000)
    assert_ledger_ok(server.database_url)
    db.execute("INSERT INTO fc.settlement_exceptions (kind, hold_id, account_id, amount_fen, reason,"
               " created_at) SELECT 2, h.id, a.id, 10, 'OVERRUN_SHORTFALL', now()"
               " FROM fc.holds h, fc.accounts a WHERE h.uid = %s AND a.uid = %s",
               (sale.hold_id, stranger.account_id))
    found = [v.check for v in verify.run(server.database_url)]
    assert found == ["open_settlement_exceptions_reachable"]
