"""The audit trail (issue 5, "Privacy and audit"): every internal/admin RPC
and every read of personal data leaves one record - who, what, when, about
which object, with what outcome - in an append-only, SM3 hash-chained log;
the POS hot path leaves none; and `fuelcard audit verify` finds a record
edited, deleted or moved by someone with direct database access.

All through the real server and PostgreSQL: the attacks disable the
append-only triggers as the superuser, as an intruder with the database
password would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    funding_pb2,
    funding_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server import audit, gm
from fuelcard_server.certs import DevPki
from fuelcard_server.identity import Role
from fuelcard_server.services.account import AccountService
from fuelcard_server.services.control import ControlService
from fuelcard_server.services.funding import FundingService
from fuelcard_server.services.points import PointsService
from fuelcard_server.services.security import SecurityService
from fuelcard_server.services.transaction import TransactionService

from tests.plugins.database import PostgresCluster
from tests.plugins.server import TEST_KEY_HEX, RunningServer, ServerThread, TlsServer
from tests.plugins.terminals import sign_on
from tests.support import builders
from tests.support.ledger_asserts import Conn, expect
from tests.support.row_lock import wait_queued

FUELCARD = str(Path(sys.executable).parent / "fuelcard")
ACCOUNTS = "/fuelcard.v1.AccountService/"
PHONE = "13912345678"
ID_NUMBER = "110101199003071234"
# Digit runs as long as a phone, ID or card number.
LONG_DIGITS = re.compile(r"\d{11,}")
UUIDS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class Row:
    id: int
    actor: str
    method: str
    target: str | None
    outcome: str


def rows(db: Conn, after: int = 0) -> list[Row]:
    found = db.execute(
        "SELECT id, actor, method, target::text, outcome FROM fc.audit_log WHERE id > %s"
        " ORDER BY id", (after,)).fetchall()
    return [Row(*r) for r in found]


def last_id(db: Conn) -> int:
    row = db.execute("SELECT coalesce(max(id), 0) FROM fc.audit_log").fetchone()
    assert row is not None
    value: int = row[0]
    return value


def assert_no_personal_data(db: Conn, *secrets: str) -> None:
    """No audit row, in any column, carries one of `secrets` or any digit
    run long enough to be a card number, phone or ID number."""
    found = db.execute("SELECT t::text, concat_ws('|', id, created_at, actor, method, target,"
                       " outcome) FROM fc.audit_log t").fetchall()
    assert found
    for whole, readable in found:
        for secret in secrets:
            assert secret not in whole, whole
        # a random uuid can hold a long digit run of its own
        assert not LONG_DIGITS.search(UUIDS.sub("<uuid>", readable)), readable


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FUELCARD, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX})


# --------------------------------------------------------------------------
# SM3 in SQL: the chain is extended by a PL/pgSQL SM3; it must be SM3
# --------------------------------------------------------------------------

def test_sql_sm3_gives_the_standard_answers_and_agrees_with_gm(db: Conn) -> None:
    def sql_sm3(data: bytes) -> bytes:
        row = db.execute("SELECT fc.sm3(p_data => %(data)s)", {"data": data}).fetchone()
        assert row is not None
        return bytes(row[0])

    # GB/T 32905-2016, appendix A
    assert sql_sm3(b"abc").hex() == (
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0")
    assert sql_sm3(b"abcd" * 16).hex() == (
        "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732")
    # every padding case: around one and two blocks, and a long message
    for n in [*range(0, 130), 1000]:
        data = os.urandom(n)
        assert sql_sm3(data) == gm.sm3(data), n


def test_every_rpc_has_a_full_method_name() -> None:
    for servicer in (TransactionService, FundingService, PointsService, AccountService,
                     ControlService, SecurityService):
        base = next(c for c in servicer.__mro__ if c.__module__.endswith("_pb2_grpc"))
        service = base.__name__.removesuffix("Servicer")
        for name in (n for n in vars(base) if not n.startswith("_")):
            assert audit.method_name(servicer, name) == f"/fuelcard.v1.{service}/{name}"


# --------------------------------------------------------------------------
# What is recorded
# --------------------------------------------------------------------------

def test_development_mode_records_admin_calls_and_reads_of_personal_data(
        server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, 10_000, phone=PHONE, id_number=ID_NUMBER)
    a, c = card.account_id, card.card_id
    unknown = str(uuid.uuid4())
    server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=a))
    server.accounts.GetCard(account_pb2.GetCardRequest(card_id=c))
    server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(account_id=a))
    points_pb2_grpc.PointsServiceStub(server.channel).GetPointsBalance(
        points_pb2.GetPointsBalanceRequest(account_id=a))
    expect(lambda: server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=unknown)),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    # personal data sent where an id belongs is refused - and not recorded
    bad_phone = expect(lambda: server.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=PHONE)), grpc.StatusCode.INVALID_ARGUMENT)
    bad_card = expect(lambda: server.accounts.GetCard(
        account_pb2.GetCardRequest(card_id=card.card_number)), grpc.StatusCode.INVALID_ARGUMENT)

    assert [(r.actor, r.method, r.target, r.outcome) for r in rows(db)] == [
        ("development", ACCOUNTS + "OpenAccount", a, "OK"),  # the account it made
        ("development", ACCOUNTS + "IssueCard", a, "OK"),
        # the recharge (FundingService) is adapter traffic: not recorded
        ("development", ACCOUNTS + "GetAccount", a, "OK"),
        ("development", ACCOUNTS + "GetCard", c, "OK"),
        ("development", ACCOUNTS + "ListTransactions", a, "OK"),
        ("development", "/fuelcard.v1.PointsService/GetPointsBalance", a, "OK"),
        ("development", ACCOUNTS + "GetAccount", unknown, "NOT_FOUND ACCOUNT_NOT_FOUND"),
        ("development", ACCOUNTS + "GetAccount", None, f"INVALID_ARGUMENT {bad_phone.reason}"),
        ("development", ACCOUNTS + "GetCard", None, f"INVALID_ARGUMENT {bad_card.reason}"),
    ]
    assert [r.id for r in rows(db)] == list(range(1, 10))
    created = db.execute("SELECT min(created_at), max(created_at) FROM fc.audit_log").fetchone()
    assert created is not None and created[0] <= created[1]
    assert_no_personal_data(db, PHONE, ID_NUMBER, card.card_number)
    assert audit.verify(server.database_url) == []


def test_the_pos_hot_path_writes_no_audit_record(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, 100_000)
    before = last_id(db)
    held = builders.authorize(server, card, 5_000)
    assert held.decision == common_pb2.DECISION_APPROVED
    builders.confirm(server, held.hold.hold_id, 4_000)
    second = builders.authorize(server, card, 5_000)
    builders.cancel(server, second.hold.hold_id)
    declined = builders.authorize(server, card, 500_000)  # more than the balance
    assert declined.decision == common_pb2.DECISION_DECLINED
    expect(lambda: server.pos.Authorize(builders.authorize_request(
        builders.FundedCard(card.account_id, card.card_id, "1234"), 100)),
        grpc.StatusCode.INVALID_ARGUMENT)
    builders.balance(server, card)
    server.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=held.hold.hold_id))
    builders.recharge(server, card.account_id, 1_000)
    assert last_id(db) == before


def _reviewer_and_nobody(certs: Path) -> None:
    pki = DevPki(certs)
    if not (certs / "reviewer-audit-rev.pem").exists():
        pki.client(Role.REVIEWER, "audit-rev")
    if not (certs / "nobody.pem").exists():  # signed by our CA, but names no role
        pki._issue("nobody", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nobody"),
                                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                           "janitor")]), server=False)


def test_tls_callers_are_recorded_by_role_including_refusals(tls_server: TlsServer) -> None:
    _reviewer_and_nobody(tls_server.certs)
    admin_channel = tls_server.channel("admin-ops")
    admin = account_pb2_grpc.AccountServiceStub(admin_channel)
    opened = admin.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="审计测试", phone=PHONE, id_number=ID_NUMBER)))
    a = opened.account.account_id
    issued = admin.IssueCard(account_pb2.IssueCardRequest(request_id=builders.rid(), account_id=a))
    funding_pb2_grpc.FundingServiceStub(admin_channel).Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid(), account_id=a, channel=funding_pb2.CHANNEL_COUNTER,
        channel_txn_id=f"ctr-{uuid.uuid4().hex}", amount_fen=50_000))
    # an internal service reading a balance by card number: the record names the card's id
    transaction_pb2_grpc.TransactionServiceStub(admin_channel).GetCardBalance(
        transaction_pb2.GetCardBalanceRequest(card_number=issued.card_number))

    reviewer = account_pb2_grpc.AccountServiceStub(tls_server.channel("reviewer-audit-rev"))
    reviewer.GetAccount(account_pb2.GetAccountRequest(account_id=a))
    expect(lambda: reviewer.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
        request_id=builders.rid(), card_id=issued.card.card_id,
        status=account_pb2.CARD_STATUS_BLOCKED)), grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED")
    analytics_channel = tls_server.channel("analytics-bi")
    points_pb2_grpc.PointsServiceStub(analytics_channel).GetPointsBalance(
        points_pb2.GetPointsBalanceRequest(account_id=a))
    expect(lambda: account_pb2_grpc.AccountServiceStub(analytics_channel).GetAccount(
        account_pb2.GetAccountRequest(account_id=a)), grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED")

    # a terminal and an adapter reaching for internal RPCs: refused and recorded
    pos_channel = tls_server.channel("pos-KM-001-T1")
    expect(lambda: account_pb2_grpc.AccountServiceStub(pos_channel).GetAccount(
        account_pb2.GetAccountRequest(account_id=a)), grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED")
    expect(lambda: control_pb2_grpc.ControlServiceStub(
        tls_server.channel("adapter-wechat-gw")).GetSpendingLimits(
        control_pb2.GetSpendingLimitsRequest(account_id=a)), grpc.StatusCode.PERMISSION_DENIED,
        "ROLE_NOT_ALLOWED")
    # a certificate of ours that names no role
    expect(lambda: account_pb2_grpc.AccountServiceStub(tls_server.channel("nobody")).GetAccount(
        account_pb2.GetAccountRequest(account_id=a)), grpc.StatusCode.UNAUTHENTICATED,
        "NO_CLIENT_IDENTITY")

    # a terminal's routine traffic is not recorded: sign-on, its holds, and
    # the hot path - paid, or refused for want of a MAC
    t1 = sign_on(tls_server, "pos-KM-001-T1", "KM-001-T1", "KM-001")
    held = t1.pos.Authorize(t1.authorize(issued.card_number, 1_000))
    assert held.decision == common_pb2.DECISION_APPROVED
    t1.pos.Confirm(t1.confirm(held.hold.hold_id, 800))
    t1.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=held.hold.hold_id))
    unsigned = transaction_pb2.AuthorizeRequest(
        request_id=builders.rid(), card_number=issued.card_number, amount_fen=1_000,
        station_id="KM-001", terminal_id="KM-001-T1", nozzle=1,
        product=common_pb2.PRODUCT_GASOLINE_95)
    expect(lambda: t1.pos.Authorize(unsigned), grpc.StatusCode.UNAUTHENTICATED)
    # nor is anyone else's attempt at the hot path (it is never audited)
    expect(lambda: transaction_pb2_grpc.TransactionServiceStub(admin_channel).Authorize(unsigned),
           grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")

    with psycopg.connect(tls_server.database_url, autocommit=True) as db:
        denied = "PERMISSION_DENIED ROLE_NOT_ALLOWED"
        assert [(r.actor, r.method, r.target, r.outcome) for r in rows(db)] == [
            ("admin::ops", ACCOUNTS + "OpenAccount", a, "OK"),
            ("admin::ops", ACCOUNTS + "IssueCard", a, "OK"),
            ("admin::ops", "/fuelcard.v1.FundingService/Recharge", a, "OK"),
            ("admin::ops", "/fuelcard.v1.TransactionService/GetCardBalance",
             issued.card.card_id, "OK"),
            ("reviewer::audit-rev", ACCOUNTS + "GetAccount", a, "OK"),
            ("reviewer::audit-rev", ACCOUNTS + "UpdateCardStatus", issued.card.card_id, denied),
            ("analytics::bi", "/fuelcard.v1.PointsService/GetPointsBalance", a, "OK"),
            ("analytics::bi", ACCOUNTS + "GetAccount", a, denied),
            ("pos:KM-001:KM-001-T1", ACCOUNTS + "GetAccount", a, denied),
            ("adapter:WECHAT_PAY:wechat-gw", "/fuelcard.v1.ControlService/GetSpendingLimits",
             a, denied),
            ("unidentified", ACCOUNTS + "GetAccount", a,
             "UNAUTHENTICATED NO_CLIENT_IDENTITY"),
        ]
        assert_no_personal_data(db, PHONE, ID_NUMBER, issued.card_number)
    assert audit.verify(tls_server.database_url) == []


def test_a_call_that_cannot_be_audited_is_not_answered(server: RunningServer, db: Conn) -> None:
    """Fail closed: personal data is never handed out unrecorded."""
    card = builders.open_card(server, 10_000)
    before = last_id(db)
    # the log refuses every new row (an attacker, a full disk, a broken constraint)
    db.execute("ALTER TABLE fc.audit_log ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
    expect(lambda: server.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=card.account_id)),
        grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
    # a call that fails anyway keeps its own error
    expect(lambda: server.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=str(uuid.uuid4()))),
        grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    # the pumps keep working: the hot path is not audited
    assert builders.authorize(server, card, 1_000).decision == common_pb2.DECISION_APPROVED
    db.execute("ALTER TABLE fc.audit_log DROP CONSTRAINT refuse_all")
    server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id))
    assert [(r.id, r.method, r.outcome) for r in rows(db, before)] == [
        (before + 1, ACCOUNTS + "GetAccount", "OK")]
    assert audit.verify(server.database_url) == []


def test_a_call_cancelled_midway_is_recorded(server: RunningServer, db: Conn) -> None:
    """A read that outlives its deadline (the accounts table is locked) is
    cancelled on the server; it is recorded all the same."""
    card = builders.open_card(server)
    before = last_id(db)
    with psycopg.connect(server.database_url) as blocker:
        blocker.execute("LOCK TABLE fc.accounts IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(grpc.RpcError) as err:
            server.accounts.GetAccount(account_pb2.GetAccountRequest(
                account_id=card.account_id), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while last_id(db) == before and time.monotonic() < deadline:
            time.sleep(0.02)
        blocker.rollback()
    # CANCELLED when gRPC cancels the call first, DEADLINE_EXCEEDED when the
    # server's own deadline watch stops the statement first: both are true
    [(method, target, outcome)] = [(r.method, r.target, r.outcome) for r in rows(db, before)]
    assert (method, target) == (ACCOUNTS + "GetAccount", card.account_id)
    assert outcome.split()[0] in ("CANCELLED", "DEADLINE_EXCEEDED"), outcome
    assert audit.verify(server.database_url) == []


def test_concurrent_admin_calls_on_two_servers_keep_one_unbroken_chain(
        server: RunningServer, db: Conn) -> None:
    """Two server processes' worth of pools and loops on one database, eight
    client threads each: appends are serialised, so no two records share a
    place in the chain and no id is skipped."""
    card = builders.open_card(server)
    before = last_id(db)
    other = ServerThread(server.settings, server.database_url, server.clock)
    port = other.start()
    channels = [server.channel, grpc.insecure_channel(f"127.0.0.1:{port}")]
    threads_per_server, calls_per_thread = 8, 25
    barrier = threading.Barrier(2 * threads_per_server)
    failures: list[BaseException] = []

    def hammer(channel: grpc.Channel) -> None:
        stub = account_pb2_grpc.AccountServiceStub(channel)
        request = account_pb2.GetAccountRequest(account_id=card.account_id)
        try:
            barrier.wait(timeout=30)
            for _ in range(calls_per_thread):
                stub.GetAccount(request, timeout=30)
        except BaseException as exc:
            failures.append(exc)

    try:
        threads = [threading.Thread(target=hammer, args=(channels[i % 2],))
                   for i in range(2 * threads_per_server)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        channels[1].close()
        other.stop()
    assert failures == []
    added = rows(db, before)
    total = 2 * threads_per_server * calls_per_thread
    assert [r.id for r in added] == list(range(before + 1, before + total + 1))
    assert {(r.method, r.target, r.outcome) for r in added} == {
        (ACCOUNTS + "GetAccount", card.account_id, "OK")}
    links = db.execute("SELECT count(DISTINCT prev_hash), count(DISTINCT hash) FROM fc.audit_log"
                       ).fetchone()
    assert links == (before + total, before + total)
    assert audit.verify(server.database_url) == []


# --------------------------------------------------------------------------
# Attacks on the log
# --------------------------------------------------------------------------

@pytest.fixture
def logged(server: RunningServer, db: Conn) -> Iterator[RunningServer]:
    """A server whose log holds six records: 1 OpenAccount, 2 IssueCard,
    3 GetAccount, 4 GetAccount (NOT_FOUND), 5 GetCard, 6 ListHolds."""
    card = builders.open_card(server)
    server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id))
    expect(lambda: server.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=str(uuid.uuid4()))), grpc.StatusCode.NOT_FOUND)
    server.accounts.GetCard(account_pb2.GetCardRequest(card_id=card.card_id))
    server.accounts.ListHolds(account_pb2.ListHoldsRequest(account_id=card.account_id))
    assert [r.id for r in rows(db)] == [1, 2, 3, 4, 5, 6]
    yield server


def test_the_log_refuses_update_delete_and_truncate(logged: RunningServer, db: Conn) -> None:
    for statement in ("UPDATE fc.audit_log SET outcome = 'OK' WHERE id = 4",
                      "DELETE FROM fc.audit_log WHERE id = 6",
                      "TRUNCATE fc.audit_log"):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            db.execute(statement.encode())
    assert [r.id for r in rows(db)] == [1, 2, 3, 4, 5, 6]
    assert rows(db)[3].outcome == "NOT_FOUND ACCOUNT_NOT_FOUND"


def _edit(db: Conn) -> None:
    db.execute("UPDATE fc.audit_log SET outcome = 'OK' WHERE id = 4")


def _edit_the_actor(db: Conn) -> None:
    db.execute("UPDATE fc.audit_log SET actor = 'admin::somebody-else' WHERE id = 4")


def _delete(db: Conn) -> None:
    db.execute("DELETE FROM fc.audit_log WHERE id = 4")


def _delete_and_relink(db: Conn) -> None:
    """Delete record 4 and point record 5 at record 3: the ids still gap
    and record 5's hash no longer matches what it now says."""
    db.execute("DELETE FROM fc.audit_log WHERE id = 4")
    db.execute("UPDATE fc.audit_log SET prev_hash = (SELECT hash FROM fc.audit_log WHERE id = 3)"
               " WHERE id = 5")


def _reorder(db: Conn) -> None:
    """Records 4 and 5 swap places."""
    db.execute("UPDATE fc.audit_log SET id = 1000 WHERE id = 4")
    db.execute("UPDATE fc.audit_log SET id = 4 WHERE id = 5")
    db.execute("UPDATE fc.audit_log SET id = 5 WHERE id = 1000")


def _backdate(db: Conn) -> None:
    db.execute("UPDATE fc.audit_log SET created_at = created_at - interval '1 day' WHERE id = 4")


ATTACKS: dict[str, tuple[Callable[[Conn], None], str]] = {
    "edit the outcome": (_edit, "edited"),
    "edit the actor": (_edit_the_actor, "edited"),
    "backdate": (_backdate, "edited"),
    "delete": (_delete, "missing"),
    "delete and relink": (_delete_and_relink, "missing"),
    "reorder": (_reorder, "unlinked"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_tampering_is_found_and_the_record_named(logged: RunningServer, db: Conn,
                                                 attack: str) -> None:
    tamper, kind = ATTACKS[attack]
    assert run_cli("audit", "verify", "--database-url", logged.database_url).returncode == 0
    db.execute("ALTER TABLE fc.audit_log DISABLE TRIGGER audit_log_append_only")
    tamper(db)
    db.execute("ALTER TABLE fc.audit_log ENABLE TRIGGER audit_log_append_only")

    problems = audit.verify(logged.database_url)
    assert problems, attack
    assert (problems[0].record_id, problems[0].kind) == (4, kind), problems
    # nothing before the tampered record is blamed
    assert all(p.record_id >= 4 for p in problems)

    cli = run_cli("audit", "verify", "--database-url", logged.database_url)
    assert cli.returncode == 1, cli.stdout
    assert "audit log broken at record 4:" in cli.stderr, cli.stderr
    assert "FAIL record 4:" in cli.stdout


def test_a_rewritten_chain_is_caught_by_an_anchor(logged: RunningServer, db: Conn) -> None:
    """An intruder who deletes a record and recomputes every later hash
    leaves a chain consistent in itself; the head noted earlier (outside the
    database) gives it away."""
    intact = run_cli("audit", "verify", "--database-url", logged.database_url)
    assert intact.returncode == 0, intact.stderr
    head = intact.stdout.strip().rsplit(" ", 1)[-1]
    assert head.startswith("6:") and bytes.fromhex(head[2:]) == _hash_of(db, 6)
    assert run_cli("audit", "verify", "--database-url", logged.database_url,
                   "--anchor", head).returncode == 0

    db.execute("ALTER TABLE fc.audit_log DISABLE TRIGGER audit_log_append_only")
    db.execute("DELETE FROM fc.audit_log WHERE id = 4")
    db.execute("UPDATE fc.audit_log SET id = id - 1 WHERE id > 4")  # ascending: no clash
    for record_id in (4, 5):  # rechain with the log's own functions
        db.execute("""
            UPDATE fc.audit_log l
               SET prev_hash = p.hash,
                   hash = fc.sm3(p_data => p.hash || fc.audit_canonical(
                       p_id => l.id, p_created_at => l.created_at, p_actor => l.actor,
                       p_method => l.method, p_target => l.target, p_outcome => l.outcome))
              FROM fc.audit_log p WHERE p.id = l.id - 1 AND l.id = %s""", (record_id,))
    db.execute("ALTER TABLE fc.audit_log ENABLE TRIGGER audit_log_append_only")

    assert audit.verify(logged.database_url) == []  # the chain alone cannot tell
    anchor_id, digest = head.split(":")
    problems = audit.verify(logged.database_url, (int(anchor_id), bytes.fromhex(digest)))
    assert [(p.record_id, p.kind) for p in problems] == [(6, "anchor")]
    cli = run_cli("audit", "verify", "--database-url", logged.database_url, "--anchor", head)
    assert cli.returncode == 1
    assert "audit log broken at record 6:" in cli.stderr


def _hash_of(db: Conn, record_id: int) -> bytes:
    row = db.execute("SELECT hash FROM fc.audit_log WHERE id = %s", (record_id,)).fetchone()
    assert row is not None
    return bytes(row[0])


def test_cli_on_the_embedded_database_and_on_an_unmigrated_one(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    data = tmp_path / "data"
    assert run_cli("migrate", "--data-dir", str(data)).returncode == 0
    res = run_cli("audit", "verify", "--data-dir", str(data))
    assert (res.returncode, res.stdout.strip()) == (0, "audit log intact: 0 record(s); head 0:"
                                                       + "00" * 32), res.stderr
    name = f"fuelcard_audit_unmigrated_{os.getpid()}"
    url = pg_cluster.create_database(name)
    try:
        res = run_cli("audit", "verify", "--database-url", url)
        assert res.returncode == 2
        assert "cannot read the audit log" in res.stderr
    finally:
        pg_cluster.drop_database(name)


def test_a_call_cancelled_by_shutdown_keeps_its_audit_record(server: RunningServer,
                                                               db: Conn) -> None:
    # Found in review: stop() cancels the calls still running when the grace
    # ends, and each writes a CANCELLED record as it unwinds; but grpc's stop
    # returned before they had unwound (the cancel of their statement is a
    # round trip), stop() found nothing to drain and closed the pools, and
    # the records were lost. An audited call (RedeemPoints, development
    # mode) waits on its account's lock from the side when the server stops.
    card = builders.open_card(server, balance_fen=0)
    account_id = db.execute("SELECT id FROM fc.accounts WHERE uid = %s",
                            (card.account_id,)).fetchone()
    assert account_id is not None
    seen: list[grpc.StatusCode] = []

    def redeem() -> None:
        try:
            server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
                request_id=builders.rid("redeem"), account_id=card.account_id, points=10),
                timeout=30)
        except grpc.RpcError as exc:
            seen.append(exc.code())

    with psycopg.connect(server.database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", account_id)
        caller = threading.Thread(target=redeem)
        caller.start()
        wait_queued(server.database_url, 1)
        server.run(lambda: server.server.stop(grace_s=0.3))
        holder.execute("SELECT pg_advisory_unlock_all()")
        caller.join(30)
    assert seen and seen[0] != grpc.StatusCode.OK
    assert db.execute("SELECT outcome FROM fc.audit_log WHERE method ="
                      " '/fuelcard.v1.PointsService/RedeemPoints'").fetchall() == [("CANCELLED",)]
