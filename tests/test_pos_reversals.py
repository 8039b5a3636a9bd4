"""The POS client reverses by itself an Authorize whose outcome it never
learned (issue 14, item 2): the reversal waits in the outbox until the
server answers it. Bad links are played by the TCP proxy
(tests/plugins/proxy.py) between the client and a real server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    transaction_pb2,
)
from fuelcard_pos import cli
from fuelcard_pos.client import PosClient, PosError, RetryPolicy
from fuelcard_pos.outbox import Outbox

from tests.plugins.proxy import TcpProxy
from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, scalar

STATION, TERMINAL = "KM-001", "KM-001-T1"
FAST = RetryPolicy(max_attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1, total_timeout_s=3.0)
RECOVER = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.5,
                      total_timeout_s=8.0)


@pytest.fixture
def proxy(server: RunningServer) -> Iterator[TcpProxy]:
    with TcpProxy(server.target) as p:
        yield p


def test_an_authorize_whose_answer_was_lost_is_reversed_from_the_outbox(
        server: RunningServer, proxy: TcpProxy, db: Conn, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox, \
            PosClient(proxy.target, deadline_s=0.4, retry=FAST, outbox=outbox) as pos:
        pos.balance(card.card_number)  # connect through the proxy first
        proxy.hang()
        with pytest.raises(PosError) as caught:
            pos.authorize(card.card_number, 30_000, STATION, TERMINAL, request_id="auth-lost-9")
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server did hold the money; the terminal never learned the hold id.
        assert account_row(db, card.account_id)["held_fen"] == 30_000
        [entry] = outbox.pending()
        assert entry.operation == "reverse" and entry.hold_id == ""
        assert isinstance(entry.request, transaction_pb2.ReverseAuthorizationRequest)
        assert entry.request.original_request_id == "auth-lost-9"

        proxy.resume()
        pos.retry = RECOVER
        report = outbox.flush(pos)
        [delivered] = report.delivered
        assert isinstance(delivered.response, transaction_pb2.ReverseAuthorizationResponse)
        assert delivered.response.outcome == transaction_pb2.REVERSAL_OUTCOME_RELEASED
        assert report.complete and len(outbox) == 0
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert scalar(db, "SELECT state FROM fc.holds") == common_pb2.HOLD_STATE_CANCELLED
    assert_ledger_ok(server.database_url)


def test_a_reversal_sent_before_the_authorize_arrived_declines_it(
        server: RunningServer, proxy: TcpProxy, db: Conn, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        with PosClient(proxy.target, deadline_s=0.4, retry=FAST, outbox=outbox) as pos:
            proxy.down()
            with pytest.raises(PosError) as caught:
                pos.authorize(card.card_number, 30_000, STATION, TERMINAL,
                              request_id="auth-never-9")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert [e.operation for e in outbox.pending()] == ["reverse"]
        proxy.up()
        with PosClient(proxy.target, retry=RECOVER, outbox=outbox) as pos:
            [delivered] = outbox.flush(pos).delivered
            assert isinstance(delivered.response, transaction_pb2.ReverseAuthorizationResponse)
            assert delivered.response.outcome == (
                transaction_pb2.REVERSAL_OUTCOME_AHEAD_OF_AUTHORIZE)
            # The Authorize, resent late (a copy stuck in the network): declined.
            late = pos.authorize(card.card_number, 30_000, STATION, TERMINAL,
                                 request_id="auth-never-9")
        assert late.decision == common_pb2.DECISION_DECLINED
        assert late.decline_reason == common_pb2.DECLINE_REASON_REVERSED
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert scalar(db, "SELECT count(*) FROM fc.holds") == 0
    assert_ledger_ok(server.database_url)


def test_an_outbox_of_the_first_schema_is_upgraded_and_keeps_its_entries(tmp_path: Path) -> None:

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            operation TEXT NOT NULL CHECK (operation IN ('confirm', 'cancel')),
            request_id TEXT NOT NULL UNIQUE, hold_id TEXT NOT NULL, payload BLOB NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'failed')),
            created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            last_attempt_at REAL, last_error TEXT NOT NULL DEFAULT '',
            error_code TEXT NOT NULL DEFAULT '', error_reason TEXT NOT NULL DEFAULT '');
        PRAGMA user_version = 1;""")
    cancel = transaction_pb2.CancelRequest(request_id="cancel-1", hold_id="h-1")
    old.execute("INSERT INTO outbox (operation, request_id, hold_id, payload, created_at)"
                " VALUES ('cancel', 'cancel-1', 'h-1', ?, 1.0)", (cancel.SerializeToString(),))
    old.commit()
    old.close()
    with Outbox(path) as outbox:
        outbox.enqueue(transaction_pb2.ReverseAuthorizationRequest(
            request_id="rev-1", original_request_id="auth-1"))
        assert [(e.operation, e.request_id) for e in outbox.pending()] == [
            ("cancel", "cancel-1"), ("reverse", "rev-1")]


def _terminal(tls: TlsServer, stem: str, state: Path) -> PosClient:
    certs = tls.certs
    return PosClient(tls.target, ca_file=certs / "ca.pem", cert_file=certs / f"{stem}.pem",
                     key_file=certs / f"{stem}.key", state=state, clock=tls.clock.now, retry=FAST)


def test_a_terminal_reverses_over_mutual_tls_with_a_mac_and_only_its_own(
        tls_server: TlsServer, db: Conn, tmp_path: Path) -> None:
    admin = tls_server.channel("admin-ops")
    opened = account_pb2_grpc.AccountServiceStub(admin).OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="冲正测试")))
    account_id = opened.account.account_id
    issued = account_pb2_grpc.AccountServiceStub(admin).IssueCard(account_pb2.IssueCardRequest(
        request_id=builders.rid("card"), account_id=account_id))
    funding_pb2_grpc.FundingServiceStub(admin).Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("ctr"), account_id=account_id, channel=funding_pb2.CHANNEL_COUNTER,
        channel_txn_id=f"ctr-{builders.rid()}", amount_fen=100_000))
    with _terminal(tls_server, "pos-KM-001-T1", tmp_path / "t1.sqlite3") as t1, \
            _terminal(tls_server, "pos-KM-001-T2", tmp_path / "t2.sqlite3") as t2:
        auth = t1.authorize(issued.card_number, 30_000, request_id="t1-auth-1")
        counter = int(scalar(db, "SELECT last_counter FROM fc.terminals"
                                 " WHERE station_id = %s AND terminal_id = %s", (STATION, "KM-001-T1")))
        # Another terminal naming the same request id names its own (unsent)
        # Authorize: a tombstone under its key, T1's hold untouched.
        assert t2.reverse_authorization("t1-auth-1").outcome == (
            transaction_pb2.REVERSAL_OUTCOME_AHEAD_OF_AUTHORIZE)
        assert account_row(db, account_id)["held_fen"] == 30_000
        # T1's own reversal: MACed with the next counter, and the hold released.
        answer = t1.reverse_authorization("t1-auth-1")
        assert answer.outcome == transaction_pb2.REVERSAL_OUTCOME_RELEASED
        assert answer.hold.hold_id == auth.hold.hold_id
        assert int(scalar(db, "SELECT last_counter FROM fc.terminals"
                              " WHERE station_id = %s AND terminal_id = %s",
                          (STATION, "KM-001-T1"))) == counter + 1
    assert account_row(db, account_id)["held_fen"] == 0
    assert_ledger_ok(tls_server.database_url)


def test_the_pos_command_line_reverses_by_request_id(
        server: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    monkeypatch.setenv("FUELCARD_POS_OUTBOX", str(tmp_path / "outbox.sqlite3"))
    where = ("--station", STATION, "--terminal", TERMINAL)
    assert cli.main(["--target", server.target, "--json", "authorize", card.card_number, "20000",
                     *where, "--request-id", "cli-auth-1"]) == 0
    capsys.readouterr()
    assert cli.main(["--target", server.target, "--json", "reverse", "cli-auth-1"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["outcome"] == "REVERSAL_OUTCOME_RELEASED"
    assert answer["hold"]["state"] == "HOLD_STATE_CANCELLED"
    assert answer["request_id"]
    assert account_row(db, card.account_id)["held_fen"] == 0
    assert_ledger_ok(server.database_url)
