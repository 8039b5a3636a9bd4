"""The POS client as a real terminal: mutual TLS, sign-on, MACs and a
durable transaction counter, against the real server (tls_server) and a real
PostgreSQL. Bad links are played by the TCP proxy (TLS passes through it);
tampered state is edited in its SQLite file, as an attacker or a restored
backup would."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    transaction_pb2,
)
from fuelcard_pos.client import (
    PosClient,
    PosError,
    PosPending,
    RetryEvent,
    RetryPolicy,
    SignOnEvent,
    mask_card_number,
)
from fuelcard_pos.outbox import Outbox
from fuelcard_pos.terminal import TerminalStore, canonical, mac_input, sign, strip_auth
from fuelcard_pos.terminal import WorkingKey as PosWorkingKey
from fuelcard_server import keys, verify

from tests.plugins.proxy import TcpProxy
from tests.plugins.server import TlsServer

Db = psycopg.Connection[tuple[Any, ...]]

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2, total_timeout_s=5.0)
# Enough to outlast the channel's reconnect backoff after the link returns.
RECOVER = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=0.5,
                      total_timeout_s=8.0)
STATION, TERMINAL = "KM-001", "KM-001-T1"
FUELCARD_POS = Path(sys.executable).parent / "fuelcard-pos"


def rid() -> str:
    return f"pos-sec-{uuid.uuid4().hex[:20]}"


@dataclass
class Site:
    """A TLS server, a funded card on it, and a place for POS state files."""

    server: TlsServer
    account_id: str
    card_number: str
    dir: Path

    def client(self, stem: str = "pos-KM-001-T1", *, state: Path | TerminalStore | None = None,
               target: str | None = None, clock: Callable[[], dt.datetime] | None = None,
               **options: Any) -> PosClient:
        certs = self.server.certs
        options.setdefault("retry", FAST)
        return PosClient(target or self.server.target, ca_file=certs / "ca.pem",
                         cert_file=certs / f"{stem}.pem", key_file=certs / f"{stem}.key",
                         state=state, clock=clock or self.server.clock.now, **options)


@pytest.fixture
def site(tls_server: TlsServer, tmp_path: Path) -> Site:
    admin_channel = tls_server.channel("admin-ops")
    admin = account_pb2_grpc.AccountServiceStub(admin_channel)
    opened = admin.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="终端测试")))
    account_id = opened.account.account_id
    issued = admin.IssueCard(account_pb2.IssueCardRequest(request_id=rid(), account_id=account_id))
    funding_pb2_grpc.FundingServiceStub(admin_channel).Recharge(funding_pb2.RechargeRequest(
        request_id=rid(), account_id=account_id, channel=funding_pb2.CHANNEL_COUNTER,
        channel_txn_id=f"ctr-{uuid.uuid4().hex}", amount_fen=100_000))
    return Site(tls_server, account_id, issued.card_number, tmp_path)


def server_counter(db: Db, terminal: str = TERMINAL) -> int:
    row = db.execute("SELECT last_counter FROM fc.terminals WHERE station_id = %s AND terminal_id = %s",
                     (STATION, terminal)).fetchone()
    return int(row[0]) if row is not None else 0


def holds_of(db: Db, account_id: str) -> list[tuple[str, int, int]]:
    rows = db.execute(
        "SELECT h.uid::text, h.amount_fen, h.state FROM fc.holds h"
        " JOIN fc.accounts a ON a.id = h.account_id WHERE a.uid = %s ORDER BY h.id",
        (account_id,)).fetchall()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def confirm_keys(db: Db) -> list[str]:
    rows = db.execute("SELECT request_id FROM fc.idempotency_keys WHERE operation = 'confirm'"
                      " ORDER BY created_at, request_id").fetchall()
    return [str(r[0]) for r in rows]


def reasons(events: list[SignOnEvent]) -> list[str]:
    return [e.reason for e in events]


# -- the MAC, byte for byte --------------------------------------------------------

def test_the_client_macs_exactly_as_the_server_checks() -> None:
    """fuelcard_pos.terminal is a separate implementation (the POS does not
    ship the server): it must agree with fuelcard_server.keys on every byte."""
    for value in (0, 1, -1, 127, 128, 255, 256, -129, 2**31, 2**63 - 1, "", "油站 KM-001", b"",
                  b"\x00\xff"):
        assert canonical(value) == keys.canonical(value), value
    valid_from = dt.datetime(2026, 11, 24, 16, 0, tzinfo=dt.UTC)
    ours = PosWorkingKey("KM-001-T1", 20_417, valid_from, valid_from + dt.timedelta(hours=25),
                         bytes(range(16)))
    theirs = keys.WorkingKey("KM-001-T1", 20_417, valid_from, valid_from + dt.timedelta(hours=25),
                             bytes(range(16)))
    assert ours.key.hex() not in repr(ours)
    requests: list[Any] = [
        transaction_pb2.AuthorizeRequest(
            request_id="r-1", card_number="6222021234567890123", amount_fen=30_000,
            station_id=STATION, terminal_id=TERMINAL, nozzle=12,
            product=common_pb2.PRODUCT_DIESEL_MINUS_10),
        transaction_pb2.ConfirmRequest(request_id="r-2", hold_id=str(uuid.uuid4()),
                                       final_amount_fen=25_150, volume_ml=32_038,
                                       unit_price_fen=785),
        transaction_pb2.CancelRequest(request_id="r-3", hold_id=str(uuid.uuid4())),
    ]
    for counter in (1, 255, 256, 2**40 + 3, 2**63 - 1):
        for request in requests:
            signed = sign(request, ours, counter)
            assert (signed.key_version, signed.terminal_counter) == (20_417, counter)
            if isinstance(signed, transaction_pb2.AuthorizeRequest):
                fields: tuple[bytes | str | int, ...] = (
                    "Authorize", signed.request_id, signed.card_number, signed.amount_fen,
                    signed.station_id, signed.terminal_id, signed.nozzle, signed.product,
                    signed.key_version, signed.terminal_counter, signed.pin_block)
            elif isinstance(signed, transaction_pb2.ConfirmRequest):
                fields = ("Confirm", signed.request_id, signed.hold_id, signed.final_amount_fen,
                          signed.volume_ml, signed.unit_price_fen, signed.key_version,
                          signed.terminal_counter)
            else:
                fields = ("Cancel", signed.request_id, signed.hold_id, signed.key_version,
                          signed.terminal_counter)
            assert mac_input(signed) == keys.canonical(*fields)
            session = keys.session_key(theirs, counter)
            assert keys.verify_mac(session, keys.canonical(*fields), signed.mac)
            assert strip_auth(signed) == request
            assert not request.mac  # signing works on a copy


# -- the secure pump cycle -----------------------------------------------------------

def test_pump_cycle_over_mutual_tls_with_macs(site: Site, db: Db) -> None:
    state = site.dir / "pos" / "terminal.sqlite3"
    events: list[SignOnEvent] = []
    with site.client(state=state, on_sign_on=events.append) as pos:
        assert (pos.terminal_id, pos.station_id, pos.is_terminal) == (TERMINAL, STATION, True)
        bal = pos.balance(site.card_number)  # a read: no MAC, no sign-on yet
        assert bal.balance.available_fen == 100_000 and events == []

        # station and terminal come from the certificate
        auth = pos.authorize(site.card_number, 30_000, nozzle=3,
                             product=common_pb2.PRODUCT_GASOLINE_95)
        assert auth.decision == common_pb2.DECISION_APPROVED
        assert (auth.hold.station_id, auth.hold.terminal_id, auth.hold.nozzle) == (
            STATION, TERMINAL, 3)
        assert auth.hold.masked_card_number == mask_card_number(site.card_number)
        [signed_on] = events
        assert (signed_on.reason, signed_on.server_last_counter, signed_on.counter) == (
            "no working key", 0, 0)
        assert pos.get_hold(auth.hold.hold_id).state == common_pb2.HOLD_STATE_AUTHORIZED

        done = pos.confirm(auth.hold.hold_id, 25_150, volume_ml=32_038, unit_price_fen=785)
        assert done.decision == common_pb2.DECISION_APPROVED
        assert (done.hold.settled_fen, done.balance_fen) == (25_150, 74_850)

        second = pos.authorize(site.card_number, 10_000, request_id="pos-sec-resend-1")
        # the same request again, as a new call: signed with a fresh counter,
        # and still the same request, answered from the server's record
        again = pos.authorize(site.card_number, 10_000, request_id="pos-sec-resend-1")
        assert again == second
        assert pos.cancel(second.hold.hold_id).hold.state == common_pb2.HOLD_STATE_CANCELLED

        assert pos.store is not None
        # five counters handed out; the replay did not advance the server's
        assert pos.store.last_counter(TERMINAL) == 5
        assert server_counter(db) == 5
        assert len(events) == 1
        stored = pos.store.working_key(TERMINAL)
        assert stored is not None and stored.version == signed_on.key_version
        for text in (repr(stored), repr(signed_on), repr(events), repr(pos.store)):
            assert stored.key.hex() not in text and repr(stored.key) not in text

    assert [h[1:] for h in holds_of(db, site.account_id)] == [
        (30_000, common_pb2.HOLD_STATE_CONFIRMED), (10_000, common_pb2.HOLD_STATE_CANCELLED)]
    # the working key is on disk: for its owner only
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert verify.run(site.server.database_url) == []


def test_a_retry_resends_the_same_counter_and_mac(site: Site, db: Db) -> None:
    """The first attempt is applied but its answer is lost: the retry carries
    the same counter and MAC, and the server answers it from its record."""
    events: list[RetryEvent] = []
    with TcpProxy(site.server.target) as proxy:

        def let_the_answer_through(event: RetryEvent) -> None:
            events.append(event)
            assert proxy.answer_held.wait(5)
            proxy.resume()

        with site.client(target=proxy.target, deadline_s=0.5,
                         on_retry=let_the_answer_through) as pos:
            pos.sign_on()
            proxy.hang()
            auth = pos.authorize(site.card_number, 12_000)
            assert auth.decision == common_pb2.DECISION_APPROVED
            assert [(e.method, e.attempt, e.code) for e in events] == [
                ("Authorize", 1, grpc.StatusCode.DEADLINE_EXCEEDED)]
            assert pos.store is not None and pos.store.last_counter(TERMINAL) == 1
    assert server_counter(db) == 1
    assert holds_of(db, site.account_id) == [
        (auth.hold.hold_id, 12_000, common_pb2.HOLD_STATE_AUTHORIZED)]


# -- the counter across restarts -----------------------------------------------------

def test_the_counter_survives_a_restart(site: Site, db: Db) -> None:
    state = site.dir / "terminal.sqlite3"
    with site.client(state=state) as pos:
        auth = pos.authorize(site.card_number, 20_000)
        pos.confirm(auth.hold.hold_id, 15_000)
    assert server_counter(db) == 2

    # the POS restarts: same key (no sign-on), counter continues above 2
    events: list[SignOnEvent] = []
    with site.client(state=state, on_sign_on=events.append) as pos:
        auth = pos.authorize(site.card_number, 20_000)
        assert auth.decision == common_pb2.DECISION_APPROVED
        assert pos.cancel(auth.hold.hold_id).hold.state == common_pb2.HOLD_STATE_CANCELLED
        assert pos.store is not None and pos.store.last_counter(TERMINAL) == 4
    assert events == []
    assert server_counter(db) == 4
    with TerminalStore(state) as store:  # the counter is on disk, not only in memory
        assert store.last_counter(TERMINAL) == 4


def test_a_rolled_back_counter_is_refused_once_then_resynced(site: Site, db: Db) -> None:
    state = site.dir / "terminal.sqlite3"
    with site.client(state=state) as pos:
        for _ in range(3):
            pos.authorize(site.card_number, 1_000)
    assert server_counter(db) == 3
    # a restored backup / an edited file: the counter goes back to 1
    with sqlite3.connect(state) as edit:
        edit.execute("UPDATE pos_terminal SET last_counter = 1 WHERE terminal_id = ?", (TERMINAL,))
    holds_before = holds_of(db, site.account_id)

    events: list[SignOnEvent] = []
    with site.client(state=state, on_sign_on=events.append) as pos:
        with pytest.raises(PosError) as refused:
            pos.authorize(site.card_number, 2_000, request_id="pos-sec-after-rollback")
        assert (refused.value.code, refused.value.reason) == (
            grpc.StatusCode.UNAUTHENTICATED, "COUNTER_REPLAYED")
        assert refused.value.resendable and not refused.value.retryable
        assert holds_of(db, site.account_id) == holds_before  # nothing happened
        # re-synced from SignOn.last_counter
        [resync] = events
        assert (resync.reason, resync.server_last_counter, resync.counter) == (
            "COUNTER_REPLAYED", 3, 3)
        assert pos.store is not None and pos.store.last_counter(TERMINAL) == 3

        fresh = pos.authorize(site.card_number, 2_000)
        assert fresh.decision == common_pb2.DECISION_APPROVED
        assert server_counter(db) == 4
        # the refused request itself was never applied: sent again, it goes through
        resent = pos.authorize(site.card_number, 2_000, request_id="pos-sec-after-rollback")
        assert resent.decision == common_pb2.DECISION_APPROVED
        assert resent.hold.hold_id != fresh.hold.hold_id
        assert len(events) == 1
    assert server_counter(db) == 5
    assert len(holds_of(db, site.account_id)) == len(holds_before) + 2

    # rolled back again, and the refused request is a confirm: the sale is
    # kept in the outbox (no verdict was given) and the next flush delivers it
    with sqlite3.connect(state) as edit:
        edit.execute("UPDATE pos_terminal SET last_counter = 0 WHERE terminal_id = ?", (TERMINAL,))
    with Outbox(site.dir / "outbox.sqlite3") as outbox, \
            site.client(state=state, outbox=outbox, on_sign_on=events.append) as pos:
        with pytest.raises(PosPending) as kept:
            pos.confirm(fresh.hold.hold_id, 1_500)
        assert (kept.value.cause.code, kept.value.cause.reason) == (
            grpc.StatusCode.UNAUTHENTICATED, "COUNTER_REPLAYED")
        assert reasons(events)[1:] == ["COUNTER_REPLAYED"]
        report = outbox.flush(pos)
        [delivered] = report.delivered
        assert isinstance(delivered.response, transaction_pb2.ConfirmResponse)
        assert delivered.response.hold.settled_fen == 1_500
        assert report.complete and len(outbox) == 0
    assert confirm_keys(db) == [kept.value.request_id]
    assert server_counter(db) == 6  # 5, the re-synced counter, then the flush


def test_a_counter_overtaken_by_a_later_one_is_re_signed(site: Site, db: Db) -> None:
    """Two clients (threads, processes) on one state file never share a
    counter, but a later counter may reach the server first: the earlier
    request is refused as a replay, and the client re-signs it (its state is
    not behind the server's, so this is no rollback) instead of failing."""
    state = site.dir / "terminal.sqlite3"
    overtaking: list[transaction_pb2.AuthorizeResponse] = []
    events: list[SignOnEvent] = []
    with TcpProxy(site.server.target) as proxy, site.client(state=state) as second:

        def overtake(event: RetryEvent) -> None:
            # the first attempt (counter 1) did not get through; counter 2 does
            if not overtaking:
                overtaking.append(second.authorize(site.card_number, 5_000))
                assert server_counter(db) == 2
                proxy.up()

        with site.client(state=state, target=proxy.target, retry=RECOVER, on_retry=overtake,
                         on_sign_on=events.append) as first:
            first.sign_on()
            proxy.down()
            auth = first.authorize(site.card_number, 7_000)
            assert auth.decision == common_pb2.DECISION_APPROVED
            assert reasons(events) == ["requested", "COUNTER_REPLAYED"]
            assert (events[1].server_last_counter, events[1].counter) == (2, 2)
            assert first.store is not None and first.store.last_counter(TERMINAL) == 3
    assert server_counter(db) == 3
    assert [h[1] for h in holds_of(db, site.account_id)] == [5_000, 7_000]


# -- keys: expiry, rotation, damage ---------------------------------------------------

def test_the_working_key_is_renewed_when_expired_refused_or_damaged(site: Site, db: Db) -> None:
    state = site.dir / "terminal.sqlite3"
    events: list[SignOnEvent] = []
    with site.client(state=state, on_sign_on=events.append) as pos:
        pos.authorize(site.card_number, 1_000)
        [first] = events
        # a day later by both clocks: valid_until has passed, sign on first
        site.server.clock.advance(dt.timedelta(days=1))
        assert pos.authorize(site.card_number, 1_000).decision == common_pb2.DECISION_APPROVED
        assert reasons(events) == ["no working key", "key expired"]
        assert events[1].key_version == first.key_version + 1

    # a terminal whose clock lags: it believes its key is still good; the
    # server refuses it (KEY_NOT_ACCEPTED), the client signs on and resends
    lagging = site.server.clock.now()
    site.server.clock.advance(dt.timedelta(days=2))
    with site.client(state=state, clock=lambda: lagging, on_sign_on=events.append) as pos:
        assert pos.authorize(site.card_number, 1_000).decision == common_pb2.DECISION_APPROVED
        assert reasons(events)[2:] == ["KEY_NOT_ACCEPTED"]
        assert events[2].key_version == first.key_version + 3

    # a damaged stored key: MAC_INVALID, sign on, resend
    with sqlite3.connect(state) as edit:
        edit.execute("UPDATE pos_terminal SET working_key = zeroblob(16)")
    with site.client(state=state, on_sign_on=events.append) as pos:
        assert pos.authorize(site.card_number, 1_000).decision == common_pb2.DECISION_APPROVED
        assert reasons(events)[3:] == ["MAC_INVALID"]
    assert len(holds_of(db, site.account_id)) == 4
    with TerminalStore(state) as store:
        assert server_counter(db) == store.last_counter(TERMINAL)


# -- the outbox on a secure link -----------------------------------------------------

def test_outbox_delivers_over_tls_a_confirm_queued_while_the_link_was_down(
        site: Site, db: Db) -> None:
    path = site.dir / "pos.sqlite3"  # outbox and terminal state in one file
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.1,
                         total_timeout_s=3.0)
    with TcpProxy(site.server.target) as proxy:
        with Outbox(path) as outbox, site.client(state=path, target=proxy.target, deadline_s=0.5,
                                                 retry=policy, outbox=outbox) as pos:
            auth = pos.authorize(site.card_number, 30_000)
            proxy.down()
            with pytest.raises(PosPending) as caught:
                pos.confirm(auth.hold.hold_id, 25_150, volume_ml=32_038, unit_price_fen=785)
            pending = caught.value
            assert pending.cause.code == grpc.StatusCode.UNAVAILABLE
            [entry] = outbox.pending()
            queued = entry.request
            assert isinstance(queued, transaction_pb2.ConfirmRequest)
            assert (queued.request_id, queued.final_amount_fen) == (pending.request_id, 25_150)
            # kept without the failed send's counter and MAC
            assert (queued.key_version, queued.terminal_counter, queued.mac) == (0, 0, b"")
            # the confirm's counter was reserved (on disk) before it was sent
            assert pos.store is not None and pos.store.last_counter(TERMINAL) == 2
        assert server_counter(db) == 1

        # the POS restarts with the link back; a new sale goes first, so the
        # queued confirm's old counter is below the server's by now
        proxy.up()
        events: list[SignOnEvent] = []
        with Outbox(path) as outbox, site.client(state=path, target=proxy.target, retry=RECOVER,
                                                 outbox=outbox, on_sign_on=events.append) as pos:
            other = pos.authorize(site.card_number, 5_000)
            assert server_counter(db) == 3
            report = outbox.flush(pos)
            assert report.complete
            [delivered] = report.delivered
            assert delivered.entry.request_id == pending.request_id
            assert isinstance(delivered.response, transaction_pb2.ConfirmResponse)
            assert (delivered.response.decision, delivered.response.balance_fen) == (
                common_pb2.DECISION_APPROVED, 74_850)
            assert len(outbox) == 0
            assert pos.store is not None and pos.store.last_counter(TERMINAL) == 4
        assert events == []  # the stored key served; no replay refusals on the way
    assert server_counter(db) == 4
    assert confirm_keys(db) == [pending.request_id]
    assert holds_of(db, site.account_id) == [
        (auth.hold.hold_id, 30_000, common_pb2.HOLD_STATE_CONFIRMED),
        (other.hold.hold_id, 5_000, common_pb2.HOLD_STATE_AUTHORIZED)]


# -- who may do what -----------------------------------------------------------------

def test_a_terminal_of_another_station_cannot_authorize_here(site: Site, db: Db) -> None:
    with site.client("pos-KM-002-T9", state=site.dir / "t9.sqlite3") as pos:
        assert (pos.terminal_id, pos.station_id) == ("KM-002-T9", "KM-002")
        with pytest.raises(PosError) as refused:
            pos.authorize(site.card_number, 10_000, station_id=STATION)
        assert (refused.value.code, refused.value.reason, refused.value.attempts) == (
            grpc.StatusCode.PERMISSION_DENIED, "TERMINAL_MISMATCH", 1)
        assert not refused.value.resendable
        assert holds_of(db, site.account_id) == []
        # at its own station the same terminal is fine
        assert pos.authorize(site.card_number, 10_000).hold.station_id == "KM-002"


def test_plaintext_and_tls_options_are_checked(dev_certs: Path, tmp_path: Path) -> None:
    target = "127.0.0.1:9"  # nothing is sent
    with pytest.raises(ValueError, match="go together"):
        PosClient(target, cert_file=dev_certs / "pos-KM-001-T1.pem")
    with pytest.raises(ValueError, match="terminal certificate"):
        PosClient(target, state=tmp_path / "s.sqlite3")
    with PosClient(target, retry=FAST) as plain, pytest.raises(ValueError, match="station_id"):
        plain.authorize("6222021234567890123", 1_000)  # no certificate names the terminal
    assert not plain.is_terminal
    # TLS with a certificate that names no terminal: no sign-on, no MACs
    ca, cert, key = (dev_certs / n for n in ("ca.pem", "admin-ops.pem", "admin-ops.key"))
    with PosClient(target, ca_file=ca, cert_file=cert, key_file=key) as other:
        assert (other.is_terminal, other.terminal_id, other.station_id) == (False, None, None)
    with pytest.raises(ValueError, match="role pos"):
        PosClient(target, ca_file=ca, cert_file=cert, key_file=key, state=tmp_path / "s.sqlite3")


# -- the command line --------------------------------------------------------------

def test_cli_over_mutual_tls(site: Site, db: Db) -> None:
    certs = site.server.certs
    state = site.dir / "cli-state.sqlite3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUELCARD_")}
    env.update(FUELCARD_POS_CA=str(certs / "ca.pem"), FUELCARD_POS_KEY=str(certs / "pos-KM-001-T1.key"),
               FUELCARD_POS_OUTBOX=str(site.dir / "cli-outbox.sqlite3"))
    outputs: list[str] = []

    def run(*args: str, expect: int, env_extra: dict[str, str] | None = None) -> str:
        done = subprocess.run([str(FUELCARD_POS), "--target", site.server.target, *args],
                              capture_output=True, text=True, timeout=60,
                              env={**env, **(env_extra or {})}, check=False)
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        assert site.card_number not in done.stdout + done.stderr, "card number leaked"
        outputs.append(done.stdout + done.stderr)
        return done.stdout + done.stderr

    secure = ("--cert", str(certs / "pos-KM-001-T1.pem"), "--state", str(state))
    signed = json.loads(run("--json", *secure, "sign-on", expect=0))
    assert (signed["terminal_id"], signed["station_id"], signed["counter"]) == (
        TERMINAL, STATION, 0)

    # --station and --terminal come from the certificate; cert via the env
    auth = json.loads(run("--json", "authorize", site.card_number, "30000", "--product", "95",
                          expect=0, env_extra={"FUELCARD_POS_CERT": secure[1],
                                               "FUELCARD_POS_STATE": str(state)}))
    assert auth["decision"] == "DECISION_APPROVED"
    assert auth["hold"]["masked_card_number"] == mask_card_number(site.card_number)
    hold_id = auth["hold"]["hold_id"]
    human = run(*secure, "confirm", hold_id, "25150", expect=0)
    assert "APPROVED" in human and "CONFIRMED" in human
    again = json.loads(run("--json", *secure, "cancel", hold_id, expect=3))
    assert (again["error"]["code"], again["error"]["reason"]) == (
        "FAILED_PRECONDITION", "HOLD_ALREADY_CONFIRMED")
    declined = run(*secure, "authorize", site.card_number, "90000", expect=1)
    assert "INSUFFICIENT_FUNDS" in declined and mask_card_number(site.card_number) in declined
    with TerminalStore(state) as store:
        assert store.last_counter(TERMINAL) == server_counter(db) == 4
        key = store.working_key(TERMINAL)
    assert key is not None
    for out in outputs:
        assert key.key.hex() not in out.lower()

    # usage errors, before anything is sent
    assert "--cert" in run("--ca", str(certs / "ca.pem"), "balance", site.card_number, expect=2,
                           env_extra={"FUELCARD_POS_KEY": ""})
    assert "--key" in run("--cert", secure[1], "balance", site.card_number, expect=2,
                          env_extra={"FUELCARD_POS_KEY": ""})
    assert "no such file" in run("--cert", str(certs / "missing.pem"), "balance",
                                 site.card_number, expect=2)
    assert "sign-on needs" in run("sign-on", expect=2,
                                  env_extra={"FUELCARD_POS_CA": "", "FUELCARD_POS_KEY": ""})
    # plaintext dev mode still needs --station (no certificate names it)
    assert "--station" in run("authorize", site.card_number, "100", "--terminal", TERMINAL,
                              expect=2, env_extra={"FUELCARD_POS_CA": "", "FUELCARD_POS_KEY": ""})
