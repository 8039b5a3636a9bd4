"""The `fuelcard-pos` command as a person at a station uses it, run as a real
process against a real server: the request id of every call (and a lost
answer resent with it), --json anywhere, the outbox listed, retried and
dropped, a PIN that is never echoed, and a reader that closes the pipe.
Bad links are played by the TCP proxy (tests/plugins/proxy.py)."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fuelcard.v1 import common_pb2, security_pb2, security_pb2_grpc, transaction_pb2
from fuelcard_pos import cli
from fuelcard_pos.client import PosClient
from fuelcard_pos.outbox import Outbox

from tests.plugins.proxy import TcpProxy
from tests.plugins.server import RunningServer
from tests.plugins.terminals import Fixture
from tests.support import builders

Db = psycopg.Connection[tuple[Any, ...]]

FUELCARD_POS = Path(sys.executable).parent / "fuelcard-pos"
STATION, TERMINAL = "KM-001", "KM-001-T1"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
PIN = "246810"


@pytest.fixture
def proxy(server: RunningServer) -> Iterator[TcpProxy]:
    with TcpProxy(server.target) as p:
        yield p


class Pos:
    """Runs `fuelcard-pos` against one target, with its own outbox file,
    and checks that no card number ever reaches its output."""

    def __init__(self, target: str, tmp_path: Path, secrets: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.target = target
        self.secrets = secrets
        self.outbox = tmp_path / "outbox.sqlite3"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FUELCARD_")}
        self.env["FUELCARD_POS_OUTBOX"] = str(self.outbox)
        self.env.update(env or {})

    def run(self, *args: str, expect: int, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        # A session of its own: no controlling terminal, as under a POS
        # service manager (getpass cannot open /dev/tty there).
        done = subprocess.run([str(FUELCARD_POS), "--target", self.target, *args],
                              capture_output=True, text=True, timeout=60, env=self.env,
                              input=stdin, check=False, start_new_session=True)
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        for secret in self.secrets:
            assert secret not in done.stdout + done.stderr, "a secret was printed"
        return done

    def json(self, *args: str, expect: int, stdin: str | None = None) -> dict[str, Any]:
        """The command with --json (last: after the command's own options)."""
        return self.parsed(*args, "--json", expect=expect, stdin=stdin)

    def parsed(self, *args: str, expect: int, stdin: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.run(*args, expect=expect, stdin=stdin).stdout)
        return obj


def holds_of(db: Db, card: builders.FundedCard) -> list[tuple[str, int]]:
    rows = db.execute("SELECT h.uid::text, h.state FROM fc.holds h JOIN fc.accounts a"
                      " ON a.id = h.account_id WHERE a.uid = %s ORDER BY h.id",
                      (card.account_id,)).fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]


def printed_request_id(text: str) -> str:
    found = re.findall(rf"^  request_id ({UUID})$", text, re.MULTILINE)
    assert len(found) == 1, text
    return str(found[0])


# -- request ids ------------------------------------------------------------------

def test_every_call_prints_its_request_id_and_a_lost_answer_is_resent_with_it(
        server: RunningServer, proxy: TcpProxy, db: Db, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    pos = Pos(proxy.target, tmp_path, [card.card_number])
    where = ("--station", STATION, "--terminal", TERMINAL)

    # The server makes the hold, but its answer never comes back. This run
    # is main() in this process: its channel shares the connection a client
    # with the same options opened first (gRPC's subchannel pool), so the
    # answer, not the connection's handshake, is what the proxy holds back.
    monkeypatch.setenv("FUELCARD_POS_OUTBOX", str(pos.outbox))
    with PosClient(proxy.target) as warm:
        warm.balance(card.card_number)
        proxy.hang()
        code = cli.main(["--target", proxy.target, "--max-attempts", "1", "--deadline-s", "1",
                         "authorize", card.card_number, "30000", *where])
        assert proxy.answer_held.wait(10)
        proxy.resume()
    lost = capsys.readouterr()
    assert code == 3, lost
    assert card.card_number not in lost.out + lost.err
    assert "DEADLINE_EXCEEDED" in lost.err
    request_id = printed_request_id(lost.err)
    assert f"--request-id {request_id}" in lost.err  # what to do about it
    [(hold_id, state)] = holds_of(db, card)
    assert state == common_pb2.HOLD_STATE_AUTHORIZED

    # Sent again with the printed id: the first answer, not a second hold.
    again = pos.json("authorize", card.card_number, "30000", *where, "--request-id", request_id,
                     expect=0)
    assert (again["request_id"], again["hold"]["hold_id"]) == (request_id, hold_id)
    assert holds_of(db, card) == [(hold_id, common_pb2.HOLD_STATE_AUTHORIZED)]

    # Every call says which id it sent: answered, declined or refused.
    declined = pos.run("authorize", card.card_number, "90000", *where, expect=1)
    assert "INSUFFICIENT_FUNDS" in declined.stdout
    declined_id = printed_request_id(declined.stdout)
    assert declined_id != request_id
    confirmed = pos.run("confirm", hold_id, "25150", expect=0)
    confirm_id = printed_request_id(confirmed.stdout)
    assert confirm_id not in (request_id, declined_id)
    refused = pos.run("cancel", hold_id, expect=3)
    assert "HOLD_ALREADY_CONFIRMED" in refused.stderr
    printed_request_id(refused.stderr)
    assert "--request-id" not in refused.stderr  # a definitive answer: nothing to resend
    refused_json = pos.json("cancel", hold_id, "--request-id", "cancel-once-more", expect=3)
    assert refused_json["request_id"] == refused_json["error"]["request_id"] == "cancel-once-more"
    # the confirm's id answers the confirm again, from the server's store
    replay = pos.json("confirm", hold_id, "25150", "--request-id", confirm_id, expect=0)
    assert (replay["request_id"], replay["hold"]["state"]) == (confirm_id, "HOLD_STATE_CONFIRMED")
    assert builders.balance(server, card).balance.balance_fen == 50_000 - 25_150


# -- --json anywhere ----------------------------------------------------------------

def test_json_is_accepted_before_and_after_the_command(server: RunningServer,
                                                        tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=12_300)
    pos = Pos(server.target, tmp_path, [card.card_number])
    for args in (("--json", "balance", card.card_number),
                 ("balance", "--json", card.card_number),
                 ("balance", card.card_number, "--json")):
        assert pos.parsed(*args, expect=0)["balance"]["balance_fen"] == 12_300, args
    for args in (("--json", "outbox", "list"), ("outbox", "--json", "list"),
                 ("outbox", "list", "--json")):
        assert pos.parsed(*args, expect=0) == {"outbox": str(pos.outbox), "entries": []}, args
    hold = pos.parsed("authorize", card.card_number, "--json", "10000", "--station", STATION,
                    "--terminal", TERMINAL, expect=0)["hold"]
    assert hold["amount_fen"] == 10_000
    # and without it, the human form
    human = pos.run("balance", card.card_number, expect=0).stdout
    assert "123.00 CNY" in human
    with pytest.raises(json.JSONDecodeError):
        json.loads(human)


# -- the outbox -----------------------------------------------------------------------

def test_outbox_entries_are_listed_retried_and_dropped(server: RunningServer, proxy: TcpProxy,
                                                       db: Db, tmp_path: Path) -> None:
    card = builders.open_card(server, balance_fen=90_000)
    a, b, c = (builders.authorize(server, card, 20_000).hold.hold_id for _ in range(3))
    missing = str(uuid.uuid4())
    pos = Pos(proxy.target, tmp_path, [card.card_number])
    fast = ("--max-attempts", "1", "--deadline-s", "1")

    proxy.down()
    queued = [pos.json(*fast, "confirm", a, "15000", expect=4),
              pos.json(*fast, "confirm", missing, "100", expect=4),
              pos.json(*fast, "cancel", b, expect=4)]
    listed = pos.json("outbox", "list", expect=0)["entries"]
    assert [(e["entry_id"], e["operation"], e["hold_id"], e["request_id"], e["state"])
            for e in listed] == [
        (q["outbox_entry_id"], q["operation"], q["hold_id"], q["request_id"], "pending")
        for q in queued]
    assert listed[0]["final_amount_fen"] == 15_000
    human = pos.run("outbox", "list", expect=0).stdout
    assert "3 entries (3 pending, 0 failed)" in human
    for q in queued:
        assert f"request_id {q['request_id']}" in human
    entry_a, entry_missing, entry_b = (q["outbox_entry_id"] for q in queued)

    # retry one entry, by id, while the link is still down: nothing moves
    still_down = pos.json(*fast, "outbox", "retry", str(entry_a), expect=3)
    assert [f["entry_id"] for f in still_down["failed"]] == [entry_a]
    assert len(pos.json("outbox", "list", expect=0)["entries"]) == 3

    proxy.up()
    retried = pos.json("--max-attempts", "10", "outbox", "retry", str(entry_a), expect=0)
    [delivered] = retried["delivered"]
    assert (delivered["entry_id"], delivered["request_id"]) == (entry_a, queued[0]["request_id"])
    assert delivered["response"]["hold"]["state"] == "HOLD_STATE_CONFIRMED"
    assert [e["entry_id"] for e in pos.json("outbox", "list", expect=0)["entries"]] == [
        entry_missing, entry_b]

    # a flush delivers the cancel and keeps the confirm of no hold, failed
    flushed = pos.json("--max-attempts", "10", "outbox", "flush", expect=3)
    assert [d["entry_id"] for d in flushed["delivered"]] == [entry_b]
    [failed] = pos.json("outbox", "list", "--state", "failed", expect=0)["entries"]
    assert (failed["entry_id"], failed["error_code"], failed["error_reason"]) == (
        entry_missing, "NOT_FOUND", "HOLD_NOT_FOUND")
    again = pos.json("outbox", "retry", expect=3)
    assert [(f["entry_id"], f["error"]["reason"]) for f in again["failed"]] == [
        (entry_missing, "HOLD_NOT_FOUND")]
    assert again["delivered"] == []

    # the operator drops the failed entry; a second drop finds nothing
    dropped = pos.json("outbox", "drop", str(entry_missing), expect=0)
    assert [d["request_id"] for d in dropped["dropped"]] == [queued[1]["request_id"]]
    assert pos.json("outbox", "list", expect=0)["entries"] == []
    assert pos.json("outbox", "drop", str(entry_missing), expect=3)["not_found"] == [entry_missing]

    # a pending entry is a sale not yet delivered: dropped only with --force
    proxy.down()
    pending = pos.json(*fast, "confirm", c, "9000", expect=4)
    kept = pos.run("outbox", "drop", str(pending["outbox_entry_id"]), expect=2)
    assert "--force" in kept.stdout
    assert len(pos.json("outbox", "list", expect=0)["entries"]) == 1
    pos.json("outbox", "drop", "--force", str(pending["outbox_entry_id"]), expect=0)
    assert pos.json("outbox", "list", expect=0)["entries"] == []
    proxy.up()

    states = dict(holds_of(db, card))
    assert (states[a], states[b], states[c]) == (
        common_pb2.HOLD_STATE_CONFIRMED, common_pb2.HOLD_STATE_CANCELLED,
        common_pb2.HOLD_STATE_AUTHORIZED)


# -- the PIN --------------------------------------------------------------------------------

def set_pin(fx: Fixture) -> None:
    security_pb2_grpc.SecurityServiceStub(fx.server.channel("pos-KM-001-T1")).SetCardPin(
        security_pb2.SetCardPinRequest(card_number=fx.card_number, key_version=fx.t1.working.version,
                                       new_pin_block=fx.t1.pin_block(PIN.encode(), fx.card_number)))


def terminal_pos(fx: Fixture, tmp_path: Path) -> Pos:
    certs = fx.server.certs
    return Pos(fx.server.target, tmp_path, [fx.card_number, PIN], env={
        "FUELCARD_POS_CA": str(certs / "ca.pem"), "FUELCARD_POS_CERT": str(certs / "pos-KM-001-T1.pem"),
        "FUELCARD_POS_KEY": str(certs / "pos-KM-001-T1.key"),
        "FUELCARD_POS_STATE": str(tmp_path / "state.sqlite3")})


def test_a_pin_read_from_stdin_authorizes_and_is_never_printed(setup: Fixture, db: Db,
                                                               tmp_path: Path) -> None:
    set_pin(setup)
    pos = terminal_pos(setup, tmp_path)
    card = setup.card_number

    without = pos.json("authorize", card, "5000", expect=1)
    assert without["decline_reason"] == "DECLINE_REASON_PIN_REQUIRED"
    wrong = pos.json("authorize", card, "5000", "--pin-stdin", expect=1, stdin="135790\n")
    assert wrong["decline_reason"] == "DECLINE_REASON_WRONG_PIN"
    right = pos.json("authorize", card, "5000", "--pin-stdin", expect=0, stdin=f"{PIN}\n")
    assert right["decision"] == "DECISION_APPROVED"
    hold_id = right["hold"]["hold_id"]
    assert db.execute("SELECT failed_attempts FROM fc.card_pins").fetchone() == (0,)

    # refused before anything is sent, without repeating what was typed
    on_line = pos.run("authorize", card, "5000", "--pin", PIN, expect=2)
    assert "--pin-stdin" in on_line.stderr
    no_tty = pos.run("authorize", card, "5000", "--pin", expect=2)
    assert "--pin-stdin" in no_tty.stderr
    short = pos.run("authorize", card, "5000", "--pin-stdin", expect=2, stdin="12\n")
    assert "4 to 12 digits" in short.stderr
    plain = Pos(setup.server.target, tmp_path, [card, PIN])
    assert "certificate" in plain.run("authorize", card, "5000", "--station", STATION,
                                      "--terminal", TERMINAL, "--pin-stdin", expect=2,
                                      stdin=f"{PIN}\n").stderr
    assert db.execute("SELECT count(*) FROM fc.holds").fetchone() == (1,)
    assert pos.json("hold", hold_id, expect=0)["state"] == "HOLD_STATE_AUTHORIZED"


def test_a_pin_asked_on_the_terminal_is_not_echoed(setup: Fixture, tmp_path: Path) -> None:
    set_pin(setup)
    pos = terminal_pos(setup, tmp_path)
    master, slave = os.openpty()
    # The child makes the pty its controlling terminal (getpass reads
    # /dev/tty), then becomes fuelcard-pos.
    become = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
              "os.execv(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen(
        [sys.executable, "-c", become, str(FUELCARD_POS), "--target", pos.target, "--json",
         "authorize", setup.card_number, "5000", "--pin"],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pos.env,
        start_new_session=True)
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"PIN: " not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 1)[0]:
                seen += os.read(master, 1024)
        os.write(master, f"{PIN}\n".encode())
        stdout, stderr = proc.communicate(timeout=60)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the terminal's other side is gone
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0, (stdout, stderr, seen)
    assert json.loads(stdout)["decision"] == "DECISION_APPROVED"
    for text in (seen, stdout, stderr):
        assert PIN.encode() not in text, "the PIN was echoed or printed"
        assert setup.card_number.encode() not in text


# -- a closed pipe --------------------------------------------------------------------------

def test_a_reader_that_closes_the_pipe_ends_the_output_quietly(tmp_path: Path) -> None:
    pos = Pos("127.0.0.1:1", tmp_path, [])
    # More than a pipe holds (64 KiB), so the writer is still writing when
    # `head` has its line and goes: the next write meets a closed pipe.
    with Outbox(pos.outbox) as outbox:
        for n in range(800):
            outbox.enqueue(transaction_pb2.ConfirmRequest(
                request_id=str(uuid.uuid4()), hold_id=str(uuid.uuid4()), final_amount_fen=100 + n))
    for head, mode in (("head -n 1", ()), ("head -c 100", ("--json",))):
        script = (f'"{FUELCARD_POS}" {" ".join(mode)} outbox list | {head}; '
                  'exit "${PIPESTATUS[0]}"')
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                              env=pos.env, check=False)
        assert (done.returncode, done.stderr) == (0, ""), (head, done.stderr[-2000:])
        if mode:
            assert len(done.stdout) == 100 and done.stdout.startswith('{"outbox": "')
        else:
            assert done.stdout == f"outbox {pos.outbox}: 800 entries (800 pending, 0 failed)\n"
