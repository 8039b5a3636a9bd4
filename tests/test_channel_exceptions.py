"""Following up channel exceptions (a refund the account could not cover)
through ReconciliationService: listed by channel and state, page by page;
resolved once with a note (OPEN -> RESOLVED), idempotent on request_id,
admin only, audited with the actor; `fuelcard verify` stays green."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import psycopg
import pytest
from fuelcard.v1 import funding_pb2, settlement_pb2, settlement_pb2_grpc
from fuelcard_server import verify

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, unpack
from tests.support.row_lock import twins_behind_row_lock

OPEN = settlement_pb2.CHANNEL_EXCEPTION_STATE_OPEN
RESOLVED = settlement_pb2.CHANNEL_EXCEPTION_STATE_RESOLVED


@dataclass(frozen=True)
class Shortfall:
    account_id: str
    channel: funding_pb2.Channel.ValueType
    channel_txn_id: str
    refund: funding_pb2.Refund


def _shortfall(server: RunningServer, channel: funding_pb2.Channel.ValueType,
               held_fen: int) -> Shortfall:
    """A card recharged 10 000 fen, held_fen of it held at a pump, then the
    whole recharge refunded by the channel: the held money is not taken back."""
    card = builders.open_card(server)
    txn = f"tx-{uuid.uuid4().hex}"
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("rc"), account_id=card.account_id, channel=channel,
        channel_txn_id=txn, amount_fen=10_000))
    builders.authorize(server, card, held_fen)
    refund = server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
        request_id=builders.rid("rf"), channel=channel, channel_txn_id=txn,
        channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=10_000)).refund
    assert refund.shortfall_fen == held_fen
    return Shortfall(card.account_id, channel, txn, refund)


def _stub(tls_server: TlsServer, name: str = "admin-ops"
          ) -> settlement_pb2_grpc.ReconciliationServiceStub:
    return settlement_pb2_grpc.ReconciliationServiceStub(tls_server.channel(name))


def test_exceptions_are_listed_filtered_paged_and_resolved_once(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    wechat = [_shortfall(server, funding_pb2.CHANNEL_WECHAT_PAY, 1_000 * (i + 1))
              for i in range(3)]
    alipay = _shortfall(server, funding_pb2.CHANNEL_ALIPAY, 700)
    stub = _stub(tls_server)

    every = stub.ListChannelExceptions(settlement_pb2.ListChannelExceptionsRequest())
    assert [x.channel_refund_id for x in every.channel_exceptions] == [
        s.refund.channel_refund_id for s in reversed([*wechat, alipay])]  # newest first
    assert not every.next_page_token
    first = every.channel_exceptions[-1]
    s = wechat[0]
    assert (first.channel, first.kind, first.state, first.amount_fen, first.account_id,
            first.refund_id, first.recharge_id, first.channel_txn_id) == (
        funding_pb2.CHANNEL_WECHAT_PAY, settlement_pb2.CHANNEL_EXCEPTION_KIND_REFUND_SHORTFALL,
        OPEN, 1_000, s.account_id, s.refund.refund_id, s.refund.recharge_id, s.channel_txn_id)
    assert uuid.UUID(first.exception_id) and first.create_time.seconds > 0
    assert not first.HasField("resolve_time") and first.resolution == first.resolved_by == ""

    # Filter by channel; page through the channel's three, two at a time.
    page = stub.ListChannelExceptions(settlement_pb2.ListChannelExceptionsRequest(
        channel=funding_pb2.CHANNEL_WECHAT_PAY, page_size=2))
    rest = stub.ListChannelExceptions(settlement_pb2.ListChannelExceptionsRequest(
        channel=funding_pb2.CHANNEL_WECHAT_PAY, page_size=2, page_token=page.next_page_token))
    assert [x.amount_fen for x in page.channel_exceptions] == [3_000, 2_000]
    assert [x.amount_fen for x in rest.channel_exceptions] == [1_000]
    assert not rest.next_page_token

    # Resolve: OPEN -> RESOLVED with the note and the actor; a replay of the
    # request answers the same; a second resolution is an illegal transition.
    req = settlement_pb2.ResolveChannelExceptionRequest(
        request_id=builders.rid("rx"), exception_id=first.exception_id,
        resolution="shortfall collected from the holder, ticket 4712")
    done = stub.ResolveChannelException(req).channel_exception
    assert (done.state, done.resolution, done.resolved_by) == (RESOLVED, req.resolution,
                                                               "admin::ops")
    assert done.resolve_time.seconds > 0 and done.amount_fen == 1_000
    assert stub.ResolveChannelException(req).channel_exception == done
    with pytest.raises(grpc.RpcError) as err:
        stub.ResolveChannelException(settlement_pb2.ResolveChannelExceptionRequest(
            request_id=builders.rid("rx"), exception_id=first.exception_id, resolution="again"))
    assert (unpack(err.value).code, unpack(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CHANNEL_EXCEPTION_ALREADY_RESOLVED")
    # The same request_id with another payload changes nothing.
    with pytest.raises(grpc.RpcError) as err:
        stub.ResolveChannelException(settlement_pb2.ResolveChannelExceptionRequest(
            request_id=req.request_id, exception_id=every.channel_exceptions[0].exception_id,
            resolution=req.resolution))
    assert (unpack(err.value).code, unpack(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
    assert db.execute("SELECT resolution, resolved_by FROM fc.channel_exceptions"
                      " WHERE resolved_at IS NOT NULL").fetchall() == [
        (req.resolution, "admin::ops")]

    # Filter by state.
    opened = stub.ListChannelExceptions(settlement_pb2.ListChannelExceptionsRequest(state=OPEN))
    closed = stub.ListChannelExceptions(settlement_pb2.ListChannelExceptionsRequest(
        state=RESOLVED))
    assert len(opened.channel_exceptions) == 3 and all(
        x.state == OPEN for x in opened.channel_exceptions)
    assert [x for x in closed.channel_exceptions] == [done]
    assert [x.exception_id for x in stub.ListChannelExceptions(
        settlement_pb2.ListChannelExceptionsRequest(channel=funding_pb2.CHANNEL_ALIPAY,
                                                    state=OPEN)).channel_exceptions] == [
        every.channel_exceptions[0].exception_id]

    # Audited with the actor and the exception as the target, failures too.
    audited = db.execute("SELECT actor, method, target::text, outcome FROM fc.audit_log"
                         " WHERE method LIKE '%%ChannelException%%' ORDER BY id").fetchall()
    method = "/fuelcard.v1.ReconciliationService/ResolveChannelException"
    assert (audited[0][0], audited[0][1]) == (
        "admin::ops", "/fuelcard.v1.ReconciliationService/ListChannelExceptions")
    resolves = [a for a in audited if a[1] == method]
    assert resolves[0] == ("admin::ops", method, first.exception_id, "OK")
    assert [a[3] for a in resolves[1:]] == ["OK", "FAILED_PRECONDITION CHANNEL_EXCEPTION_ALREADY_RESOLVED",
                                            "FAILED_PRECONDITION REQUEST_ID_REUSED"]
    assert verify.run(server.database_url) == []


def test_only_admins_follow_up_and_bad_requests_change_nothing(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    shortfall = _shortfall(server, funding_pb2.CHANNEL_WECHAT_PAY, 2_000)
    exception_id = str(db.execute("SELECT uid FROM fc.channel_exceptions").fetchone()[0])  # type: ignore[index]
    for name in ("adapter-wechat-gw", "analytics-bi", "reviewer-risk"):
        stub = _stub(tls_server, name)
        calls: list[Callable[[], object]] = [
            functools.partial(stub.ListChannelExceptions,
                              settlement_pb2.ListChannelExceptionsRequest()),
            functools.partial(stub.ResolveChannelException,
                              settlement_pb2.ResolveChannelExceptionRequest(
                                  request_id="r-1", exception_id=exception_id, resolution="x"))]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert (unpack(err.value).code, unpack(err.value).reason) == (
                grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"), name
    admin = _stub(tls_server)
    for bad, field in (
            (settlement_pb2.ResolveChannelExceptionRequest(
                request_id="r-2", exception_id="nope", resolution="x"), "exception_id"),
            (settlement_pb2.ResolveChannelExceptionRequest(
                request_id="r-3", exception_id=exception_id, resolution=" "), "resolution"),
            (settlement_pb2.ResolveChannelExceptionRequest(
                request_id="r-4", exception_id=exception_id, resolution="x" * 501),
             "resolution"),
            (settlement_pb2.ResolveChannelExceptionRequest(
                exception_id=exception_id, resolution="x"), "request_id")):
        with pytest.raises(grpc.RpcError) as err:
            admin.ResolveChannelException(bad)
        assert unpack(err.value).code == grpc.StatusCode.INVALID_ARGUMENT
        assert unpack(err.value).fields == [field]
    for list_bad, field in (
            (settlement_pb2.ListChannelExceptionsRequest(state=7), "state"),  # type: ignore[arg-type]
            (settlement_pb2.ListChannelExceptionsRequest(channel=99), "channel"),  # type: ignore[arg-type]
            (settlement_pb2.ListChannelExceptionsRequest(page_size=1001), "page_size"),
            (settlement_pb2.ListChannelExceptionsRequest(page_token="x1"), "page_token")):
        with pytest.raises(grpc.RpcError) as err:
            admin.ListChannelExceptions(list_bad)
        assert unpack(err.value).fields == [field]
    with pytest.raises(grpc.RpcError) as err:
        admin.ResolveChannelException(settlement_pb2.ResolveChannelExceptionRequest(
            request_id="r-5", exception_id=str(uuid.uuid4()), resolution="x"))
    assert (unpack(err.value).code, unpack(err.value).reason) == (
        grpc.StatusCode.NOT_FOUND, "CHANNEL_EXCEPTION_NOT_FOUND")
    # Nothing changed.
    assert db.execute("SELECT resolved_at, resolution, amount_fen FROM fc.channel_exceptions"
                      ).fetchall() == [(None, None, shortfall.refund.shortfall_fen)]


def test_a_resolution_needs_its_note_and_actor(server: RunningServer,
                                                             db: Conn) -> None:
    """The table refuses a resolved exception without its note or actor."""
    _shortfall(server, funding_pb2.CHANNEL_ECNY, 500)
    with pytest.raises(psycopg.errors.CheckViolation, match="channel_exception_resolved_with_a_note"):
        db.execute("UPDATE fc.channel_exceptions SET resolved_at = now()")


def test_the_same_resolution_sent_twice_at_once_answers_both_the_same(
        server: RunningServer, tls_server: TlsServer, db: Conn) -> None:
    _shortfall(server, funding_pb2.CHANNEL_WECHAT_PAY, 1_500)
    exception_id = str(db.execute("SELECT uid FROM fc.channel_exceptions").fetchone()[0])  # type: ignore[index]
    stub = _stub(tls_server)
    req = settlement_pb2.ResolveChannelExceptionRequest(
        request_id=builders.rid("rx"), exception_id=exception_id, resolution="collected")
    futures = twins_behind_row_lock(tls_server.database_url, "channel_exceptions",
                                    exception_id, lambda: stub.ResolveChannelException(req))
    answers = [f.result().channel_exception for f in futures]  # none failed
    assert all(a == answers[0] for a in answers) and answers[0].state == RESOLVED
    assert db.execute("SELECT count(*) FROM fc.idempotency_keys WHERE request_id = %s",
                      (req.request_id,)).fetchone() == (1,)
