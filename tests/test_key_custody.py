"""Key custody (key_custody.py) as operators meet it: hosts (data directories)
against one real PostgreSQL, real gRPC, the `fuelcard keys` commands.

A host with other keys refuses to start; keys exported on one host and
imported on another serve the same cards; root-key and card-index-key
rotations keep every card, PIN and terminal key working; card numbers come
from the CSPRNG and a replayed IssueCard shows no full number."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
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
    security_pb2,
    security_pb2_grpc,
    transaction_pb2,
)
from fuelcard_server import cli, key_custody, keys
from fuelcard_server.app import FuelcardServer
from fuelcard_server.card_numbers import CardVault
from fuelcard_server.cards import ISSUER_PREFIX, PanIndex, is_valid_pan, luhn_check_digit, new_card_number
from fuelcard_server.clock import ManualClock
from fuelcard_server.key_custody import FileKeySetStore, KeyCustodyError
from fuelcard_server.settings import Settings

from tests.plugins import logscan
from tests.plugins.server import RunningServer, ServerThread, TlsServer, make_settings
from tests.plugins.terminals import Terminal, rid, sign_on
from tests.support import builders
from tests.support.ledger_asserts import Conn, scalar, unpack

FUELCARD = str(Path(sys.executable).parent / "fuelcard")
NOW = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)
PASSPHRASE = "correct horse battery staple"
PIN = b"246810"


@pytest.fixture(autouse=True)
def _no_root_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each host keeps its root key in its data directory, as the default does.
    monkeypatch.delenv(keys.ROOT_KEY_ENV, raising=False)
    monkeypatch.delenv(key_custody.PASSPHRASE_ENV, raising=False)


def host_settings(data_dir: Path, **overrides: Any) -> Settings:
    """A host whose keys all live in its data directory (the test servers
    elsewhere share a fixed card-index key through a setting)."""
    return make_settings(data_dir, card_index_key_hex=None, **overrides)


@contextlib.contextmanager
def host(database_url: str, data_dir: Path) -> Iterator[RunningServer]:
    """A server on `data_dir` (plaintext, loopback) against the database."""
    settings = host_settings(data_dir)
    clock = ManualClock(NOW)
    thread = ServerThread(settings, database_url, clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningServer(f"127.0.0.1:{port}", database_url, clock, settings, thread.server,
                            thread.loop, channel)
    finally:
        channel.close()
        thread.stop()


@contextlib.contextmanager
def tls_host(database_url: str, data_dir: Path, certs: Path) -> Iterator[TlsServer]:
    """A server on `data_dir` with mutual TLS, for terminals."""
    settings = host_settings(data_dir, insecure=False, tls_dir=certs)
    thread = ServerThread(settings, database_url, ManualClock(NOW))
    port = thread.start()
    handle = TlsServer(f"127.0.0.1:{port}", database_url, ManualClock(NOW), certs)
    try:
        yield handle
    finally:
        for ch in handle.channels:
            ch.close()
        thread.stop()


def refusal_to_start(database_url: str, data_dir: Path) -> str:
    """The message a server on `data_dir` stops with (it must stop)."""
    server = FuelcardServer(host_settings(data_dir), database_url, clock=ManualClock(NOW))
    with pytest.raises(KeyCustodyError) as refused:
        asyncio.run(server.start())
    return str(refused.value)


def fuelcard(*argv: str | Path) -> int:
    return cli.main([str(a) for a in argv])


def passphrase_file(tmp_path: Path, text: str = PASSPHRASE) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(text + "\n")
    return path


def key_files(data_dir: Path) -> dict[str, str]:
    return {n: (data_dir / n).read_text() for n in ("root.key", "card-index.key", "server-sm2.key")}


def find(server: RunningServer, card_number: str) -> transaction_pb2.GetCardBalanceResponse:
    answer: transaction_pb2.GetCardBalanceResponse = server.pos.GetCardBalance(
        transaction_pb2.GetCardBalanceRequest(card_number=card_number))
    return answer


# --- the key set is tied to the database --------------------------------


def test_a_host_with_other_keys_refuses_to_start_and_names_the_keys(
        database_url: str, tmp_path: Path) -> None:
    with host(database_url, tmp_path / "a") as a:
        card = builders.open_card(a, balance_fen=1_000)
    a_keys = key_files(tmp_path / "a")
    message = refusal_to_start(database_url, tmp_path / "b")
    b_keys = key_files(tmp_path / "b")
    assert "root key" in message and "card-index key" in message and "signing key" in message
    assert "fuelcard keys import" in message
    for secret in [*a_keys.values(), *b_keys.values(), card.card_number]:
        assert secret.strip() not in message
    # The check values are recorded, never the keys.
    with psycopg.connect(database_url, autocommit=True) as db:
        recorded: dict[str, str] = dict(db.execute(
            "SELECT key_name, check_value FROM fc.key_check_values").fetchall())
        dumped = json.dumps(db.execute("SELECT to_jsonb(w) FROM fc.wrapped_keys w").fetchall())
    assert set(recorded) == {"root", "card-index", "signing"}
    for secret in a_keys.values():
        assert secret.strip() not in json.dumps(recorded) + dumped
    # Host A still starts and still finds its card: nothing was overwritten.
    with host(database_url, tmp_path / "a") as a:
        assert find(a, card.card_number).balance.balance_fen == 1_000


def test_serve_and_keys_check_refuse_a_host_with_other_keys(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with host(database_url, tmp_path / "a"):
        pass
    assert fuelcard("keys", "check", "--database-url", database_url, "--data-dir", tmp_path / "a") == 0
    assert "is the database's" in capsys.readouterr().out
    # As an operator meets it: `fuelcard serve` exits with the message, no traceback.
    proc = subprocess.run(
        [FUELCARD, "serve", "--insecure", "--listen", "127.0.0.1:0", "--database-url", database_url,
         "--data-dir", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "the root key, the card-index key and the signing key differ" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fuelcard("keys", "check", "--database-url", database_url, "--data-dir", tmp_path / "b") == 2
    assert "the root key, the card-index key and the signing key differ" in capsys.readouterr().err


def test_one_key_differing_is_named_alone(database_url: str, tmp_path: Path) -> None:
    with host(database_url, tmp_path / "a"):
        pass
    (tmp_path / "b").mkdir()
    for name in ("root.key", "server-sm2.key"):
        (tmp_path / "b" / name).write_text((tmp_path / "a" / name).read_text())
        (tmp_path / "b" / name).chmod(0o600)
    message = refusal_to_start(database_url, tmp_path / "b")
    assert "the card-index key differs" in message
    assert "root key" not in message and "signing key" not in message


# --- export and import --------------------------------------------------


def test_keys_exported_on_one_host_and_imported_on_another_serve_the_same_cards(
        database_url: str, tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    secret = passphrase_file(tmp_path)
    export = tmp_path / "keys.sealed"
    with host(database_url, a_dir) as a:
        card = builders.open_card(a, balance_fen=2_500)
        assert fuelcard("keys", "export", "--data-dir", a_dir, "--out", export,
                        "--passphrase-file", secret) == 0
        # The export holds no key in the clear, and only its owner reads it.
        text = export.read_text()
        for key in key_files(a_dir).values():
            assert key.strip() not in text
        assert export.stat().st_mode & 0o077 == 0
        # A wrong passphrase installs nothing.
        wrong = tmp_path / "wrong"
        wrong.write_text("not the passphrase at all\n")
        assert fuelcard("keys", "import", "--data-dir", b_dir, "--in", export,
                        "--passphrase-file", wrong) == 2
        assert not b_dir.exists()
        assert fuelcard("keys", "import", "--data-dir", b_dir, "--in", export,
                        "--passphrase-file", secret) == 0
        assert key_files(b_dir) == key_files(a_dir)
        # Both hosts serve at once, from one database: N servers, one key set.
        with host(database_url, b_dir) as b:
            got = find(b, card.card_number)
            assert (got.card_id, got.balance.balance_fen) == (card.card_id, 2_500)
            # A card issued through B is found through A.
            issued = b.accounts.IssueCard(account_pb2.IssueCardRequest(
                request_id=builders.rid("card"), account_id=card.account_id))
            logscan.register("card number", issued.card_number)
            assert find(a, issued.card_number).card_id == issued.card.card_id


def test_an_import_does_not_overwrite_other_keys_without_replace(
        database_url: str, tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    secret = passphrase_file(tmp_path)
    export = tmp_path / "keys.sealed"
    with host(database_url, a_dir) as a:
        card = builders.open_card(a)
    assert fuelcard("keys", "export", "--data-dir", a_dir, "--out", export,
                    "--passphrase-file", secret) == 0
    refusal_to_start(database_url, b_dir)  # made keys of its own in b, then stopped
    b_own = key_files(b_dir)
    assert fuelcard("keys", "import", "--data-dir", b_dir, "--in", export,
                    "--passphrase-file", secret) == 2
    assert key_files(b_dir) == b_own
    assert fuelcard("keys", "import", "--data-dir", b_dir, "--in", export, "--replace",
                    "--passphrase-file", secret) == 0
    with host(database_url, b_dir) as b:
        assert find(b, card.card_number).card_id == card.card_id


def test_an_export_is_bound_to_its_passphrase_and_to_every_byte(tmp_path: Path) -> None:
    key_set = FileKeySetStore(host_settings(tmp_path)).load()
    text = key_custody.export_sealed(key_set, PASSPHRASE)
    assert key_custody.import_sealed(text, PASSPHRASE).check_values() == key_set.check_values()
    with pytest.raises(KeyCustodyError, match="wrong passphrase"):
        key_custody.import_sealed(text, PASSPHRASE + "!")
    # A weaker KDF or other check values written into the header: refused.
    for edit in ({"kdf": {**json.loads(text)["kdf"], "n": 2**16}},
                 {"check_values": {"root": "00" * 8, "card-index": "00" * 8, "signing": "00" * 8}}):
        edited = json.dumps({**json.loads(text), **edit})
        with pytest.raises(KeyCustodyError):
            key_custody.import_sealed(edited, PASSPHRASE)
    with pytest.raises(KeyCustodyError, match="at least 12"):
        key_custody.export_sealed(key_set, "short")


# --- rotations ----------------------------------------------------------


def _set_pin(server: TlsServer, t: Terminal, card_number: str) -> None:
    security_pb2_grpc.SecurityServiceStub(server.channel("pos-KM-001-T1")).SetCardPin(
        security_pb2.SetCardPinRequest(card_number=card_number, key_version=t.working.version,
                                       new_pin_block=t.pin_block(PIN, card_number)))


def test_rotate_root_keeps_every_card_pin_and_terminal_key_working(
        database_url: str, tmp_path: Path, dev_certs: Path, db: Conn) -> None:
    data_dir = tmp_path / "a"
    with tls_host(database_url, data_dir, dev_certs) as server:
        admin = account_pb2_grpc.AccountServiceStub(server.channel("admin-ops"))
        funding = funding_pb2_grpc.FundingServiceStub(server.channel("admin-ops"))
        opened = admin.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
            holder=account_pb2.Holder(name="轮换测试")))
        issued = admin.IssueCard(account_pb2.IssueCardRequest(
            request_id=rid(), account_id=opened.account.account_id))
        logscan.register("card number", issued.card_number)
        funding.Recharge(funding_pb2.RechargeRequest(
            request_id=rid(), account_id=opened.account.account_id,
            channel=funding_pb2.CHANNEL_COUNTER, channel_txn_id=f"ctr-{rid()}", amount_fen=100_000))
        t1 = sign_on(server, "pos-KM-001-T1", "KM-001-T1", "KM-001")
        _set_pin(server, t1, issued.card_number)
        before = t1.pos.Authorize(t1.authorize(issued.card_number, 5_000, pin=PIN))
        assert before.decision == common_pb2.DECISION_APPROVED
    old = key_files(data_dir)
    old_ids = set(db.execute("SELECT root_key_id FROM fc.terminal_keys").fetchall())

    assert fuelcard("keys", "rotate-root", "--database-url", database_url, "--data-dir", data_dir) == 0

    new = key_files(data_dir)
    assert new["root.key"] != old["root.key"]
    assert (new["card-index.key"], new["server-sm2.key"]) == (old["card-index.key"], old["server-sm2.key"])
    assert not (data_dir / key_custody.PENDING_FILE).exists()
    new_ids = set(db.execute("SELECT root_key_id FROM fc.terminal_keys").fetchall())
    assert new_ids == {(keys.root_key_id(bytes.fromhex(new["root.key"])),)} and new_ids != old_ids
    with tls_host(database_url, data_dir, dev_certs) as server:
        # The terminal's working key from before the rotation still MACs and
        # carries PIN blocks: re-wrapped, not replaced.
        again = sign_on(server, "pos-KM-001-T1", "KM-001-T1", "KM-001")
        assert (again.working.version, again.working.key) == (t1.working.version, t1.working.key)
        wrong = again.pos.Authorize(again.authorize(issued.card_number, 5_000, pin=b"111111"))
        right = again.pos.Authorize(again.authorize(issued.card_number, 5_000, pin=PIN))
        assert wrong.decline_reason == common_pb2.DECLINE_REASON_WRONG_PIN
        assert right.decision == common_pb2.DECISION_APPROVED
    # The stored card number still opens (RevealCardNumber's parts): its
    # segment keys come from the data key, re-wrapped, not replaced.
    served = key_custody.open_key_set(database_url, FileKeySetStore(host_settings(data_dir)).load())
    parts = scalar(db, "SELECT fc.card_number_parts(p_card_uid => %s::uuid)",
                   (issued.card.card_id,))
    vault = CardVault(served.data, PanIndex(served.card_index))
    assert vault.open(bytes.fromhex(parts["pan_index"]), parts["root_key_id"],
                      [bytes.fromhex(v) for v in parts["sealed"]]) == issued.card_number
    # The old root key opens nothing any more: a host still holding it is refused.
    stale = tmp_path / "stale"
    stale.mkdir()
    for name, text in old.items():
        (stale / name).write_text(text)
        (stale / name).chmod(0o600)
    assert "the root key differs" in refusal_to_start(database_url, stale)


def test_a_database_from_before_custody_keeps_its_pins_and_card_numbers(
        database_url: str, tmp_path: Path, dev_certs: Path, db: Conn) -> None:
    data_dir = tmp_path / "a"
    with tls_host(database_url, data_dir, dev_certs) as server:
        admin = account_pb2_grpc.AccountServiceStub(server.channel("admin-ops"))
        opened = admin.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
            holder=account_pb2.Holder(name="升级测试")))
        issued = admin.IssueCard(account_pb2.IssueCardRequest(
            request_id=rid(), account_id=opened.account.account_id))
        logscan.register("card number", issued.card_number)
        funding_pb2_grpc.FundingServiceStub(server.channel("admin-ops")).Recharge(
            funding_pb2.RechargeRequest(
                request_id=rid(), account_id=opened.account.account_id,
                channel=funding_pb2.CHANNEL_COUNTER, channel_txn_id=f"ctr-{rid()}",
                amount_fen=100_000))
        _set_pin(server, sign_on(server, "pos-KM-001-T1", "KM-001-T1", "KM-001"),
                 issued.card_number)
    store = FileKeySetStore(host_settings(data_dir))
    data = key_custody.open_key_set(database_url, store.load()).data.root_key()
    # A new database's data key is random, not the root key ...
    assert data != store.load().root
    # ... but before custody, PIN hashes and card numbers were keyed from the
    # root key itself. Make this database look so: its data key becomes the
    # root key, nothing custody recorded is left, and the working keys
    # (wrapped under the other root) go: terminals sign on afresh.
    (data_dir / "root.key").write_text(data.hex())
    for table in ("key_check_values", "wrapped_keys", "terminal_keys"):
        db.execute(f"DELETE FROM fc.{table}")
    with tls_host(database_url, data_dir, dev_certs) as server:
        t1 = sign_on(server, "pos-KM-001-T1", "KM-001-T1", "KM-001")
        wrong = t1.pos.Authorize(t1.authorize(issued.card_number, 5_000, pin=b"111111"))
        right = t1.pos.Authorize(t1.authorize(issued.card_number, 5_000, pin=PIN))
        assert wrong.decline_reason == common_pb2.DECLINE_REASON_WRONG_PIN
        assert right.decision == common_pb2.DECISION_APPROVED
    served = key_custody.open_key_set(database_url, store.load())
    assert served.data.root_key() == data
    parts = scalar(db, "SELECT fc.card_number_parts(p_card_uid => %s::uuid)",
                   (issued.card.card_id,))
    vault = CardVault(served.data, PanIndex(served.card_index))
    assert vault.open(bytes.fromhex(parts["pan_index"]), parts["root_key_id"],
                      [bytes.fromhex(v) for v in parts["sealed"]]) == issued.card_number


def test_rotate_root_from_an_interrupted_run_installs_the_staged_key(
        database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "a"
    with host(database_url, data_dir) as a:
        card = builders.open_card(a, balance_fen=700)
    store = FileKeySetStore(host_settings(data_dir))
    # A crash between the database's commit and the files: staged, not promoted.
    promoted: list[bool] = []
    store.promote = lambda: promoted.append(True)  # type: ignore[method-assign]
    key_custody.rotate_root(database_url, store, say=lambda _: None)
    assert promoted and (data_dir / key_custody.PENDING_FILE).exists()
    assert "the root key differs" in refusal_to_start(database_url, data_dir)
    assert fuelcard("keys", "rotate-root", "--database-url", database_url, "--data-dir", data_dir) == 0
    with host(database_url, data_dir) as a:
        assert find(a, card.card_number).balance.balance_fen == 700


class Interrupted(Exception):
    pass


def test_rotate_card_index_keeps_every_card_findable_and_resumes(
        database_url: str, tmp_path: Path, db: Conn) -> None:
    data_dir = tmp_path / "a"
    with host(database_url, data_dir) as a:
        cards = [builders.open_card(a, balance_fen=100 * (i + 1)) for i in range(5)]
    old_index: dict[int, bytes] = dict(db.execute("SELECT id, pan_index FROM fc.cards").fetchall())
    old_key = key_files(data_dir)["card-index.key"]
    store = FileKeySetStore(host_settings(data_dir))
    seen: list[tuple[int, int]] = []

    def stop_after_first_batch(done: int, total: int) -> None:
        seen.append((done, total))
        raise Interrupted

    with pytest.raises(Interrupted):
        key_custody.rotate_card_index(database_url, store, batch=2, progress=stop_after_first_batch)
    assert seen == [(2, 5)]
    moved: dict[int, bytes] = dict(db.execute("SELECT id, pan_index FROM fc.cards").fetchall())
    assert sum(moved[i] != old_index[i] for i in old_index) == 2
    # Half re-indexed: no server may serve (half the cards would be missing).
    assert "rotation is under way" in refusal_to_start(database_url, data_dir)
    assert key_files(data_dir)["card-index.key"] == old_key
    # Nor may the root key rotate meanwhile, nor the half-used key be installed.
    before = key_files(data_dir)
    assert fuelcard("keys", "rotate-root", "--database-url", database_url, "--data-dir", data_dir) == 2
    assert key_files(data_dir) == before

    progress: list[tuple[int, int]] = []
    done = key_custody.rotate_card_index(database_url, store, batch=2,
                                         progress=lambda d, t: progress.append((d, t)))
    assert done == 3 and progress == [(2, 3), (3, 3)]
    assert key_files(data_dir)["card-index.key"] != old_key
    assert not (data_dir / key_custody.PENDING_FILE).exists()
    assert scalar(db, "SELECT count(*) FROM fc.card_index_rotation") == 0
    now_index: dict[int, bytes] = dict(db.execute("SELECT id, pan_index FROM fc.cards").fetchall())
    assert all(now_index[i] != old_index[i] for i in old_index)
    with host(database_url, data_dir) as a:
        for i, card in enumerate(cards):
            got = find(a, card.card_number)
            assert (got.card_id, got.balance.balance_fen) == (card.card_id, 100 * (i + 1))


def test_rotate_card_index_command_prints_progress(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "a"
    with host(database_url, data_dir) as a:
        cards = [builders.open_card(a) for _ in range(3)]
    assert fuelcard("keys", "rotate-card-index", "--batch", "2", "--database-url", database_url,
                    "--data-dir", data_dir) == 0
    out = capsys.readouterr().out
    assert "re-indexed 2 of 3 cards" in out and "re-indexed 3 of 3 cards" in out
    for card in cards:
        assert card.card_number not in out
    with host(database_url, data_dir) as a:
        assert [find(a, c.card_number).card_id for c in cards] == [c.card_id for c in cards]


def test_a_rotation_refuses_keys_it_could_not_replace(database_url: str, tmp_path: Path) -> None:
    # A card-index key from a setting cannot be replaced by a file: refused
    # before the database moves.
    with host(database_url, tmp_path / "a") as a:
        builders.open_card(a)
    settings = dataclasses.replace(host_settings(tmp_path / "a"),
                                   card_index_key_hex=key_files(tmp_path / "a")["card-index.key"])
    with pytest.raises(KeyCustodyError, match="card_index_key_hex"):
        key_custody.rotate_card_index(database_url, FileKeySetStore(settings))
    with psycopg.connect(database_url, autocommit=True) as db:
        assert scalar(db, "SELECT count(*) FROM fc.card_index_rotation") == 0


# --- card numbers -------------------------------------------------------


def test_generated_numbers_carry_the_bin_a_luhn_digit_and_no_pattern() -> None:
    numbers = [new_card_number() for _ in range(2000)]
    assert all(is_valid_pan(n) and n.startswith(ISSUER_PREFIX) and len(n) == 19 for n in numbers)
    assert len(set(numbers)) == len(numbers)
    # Every random position takes every digit.
    for position in range(len(ISSUER_PREFIX), 18):
        assert {n[position] for n in numbers} == set("0123456789")
    assert luhn_check_digit(numbers[0][:-1]) == numbers[0][-1]


def test_an_issue_card_replay_shows_only_the_masked_number(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    request = account_pb2.IssueCardRequest(request_id=builders.rid("card"), account_id=card.account_id)
    first = server.accounts.IssueCard(request)
    logscan.register("card number", first.card_number)
    assert is_valid_pan(first.card_number) and first.card_number.startswith(ISSUER_PREFIX)
    replay = server.accounts.IssueCard(request)
    assert replay.card_number == ""
    assert replay.card == first.card
    assert first.card.masked_card_number[-4:] == first.card_number[-4:]
    assert first.card_number.encode() not in replay.SerializeToString()
    stored = json.dumps(db.execute("SELECT response FROM fc.idempotency_keys").fetchall())
    assert first.card_number not in stored


def test_the_same_request_data_gives_another_number(server: RunningServer, db: Conn) -> None:
    # Numbers were once derived from the card-index key, the caller and the
    # request id: once the idempotency key was pruned, the same request made
    # the same number again (CARD_NUMBER_IN_USE), and anyone with the key and
    # the table could rebuild every number. Now each number is drawn afresh.
    card = builders.open_card(server)
    request = account_pb2.IssueCardRequest(request_id=builders.rid("card"), account_id=card.account_id)
    first = server.accounts.IssueCard(request)
    db.execute("DELETE FROM fc.idempotency_keys WHERE request_id = %s", (request.request_id,))
    second = server.accounts.IssueCard(request)
    for n in (first.card_number, second.card_number):
        logscan.register("card number", n)
        assert is_valid_pan(n) and n.startswith(ISSUER_PREFIX)
    assert first.card_number != second.card_number
    assert first.card.card_id != second.card.card_id


def test_a_card_number_in_use_is_refused_not_replaced(server: RunningServer) -> None:
    card = builders.open_card(server)
    with pytest.raises(grpc.RpcError) as e:
        server.accounts.IssueCard(account_pb2.IssueCardRequest(
            request_id=builders.rid("card"), account_id=card.account_id,
            card_number=card.card_number))
    assert unpack(e.value).reason == "CARD_NUMBER_IN_USE"
