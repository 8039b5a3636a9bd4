"""Personal data sealed at rest (issue 15, item 5): a holder's phone and ID
number are not readable in the database without the key; the server still
finds and uses them; a data-subject export gives everything held about a
holder; erasure of a closed account removes the personal data and leaves the
ledger whole (`verify` stays clean)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, security_pb2, security_pb2_grpc, step_up_pb2
from fuelcard_server import cli, verify
from fuelcard_server.stepup import FileOtpSender

from tests.plugins.server import TEST_KEY_HEX, RunningServer, ServerThread
from tests.support import builders
from tests.support.ledger_asserts import expect

PHONE = "13987654321"
ID_NUMBER = "53010219850101123X"

Conn = psycopg.Connection[tuple[object, ...]]


def holder_row(db: Conn, account_id: str) -> str:
    row = db.execute("SELECT h::text FROM fc.account_holders h JOIN fc.accounts a ON a.id = h.account_id"
                     " WHERE a.uid = %s", (account_id,)).fetchone()
    assert row is not None
    return str(row[0])


def every_row_of_schema_fc(db: Conn) -> str:
    """Every row of every table in schema fc, as text (a database dump, as far
    as personal data goes)."""
    tables = [str(r[0]) for r in db.execute(
        "SELECT c.oid::regclass FROM pg_class c WHERE c.relnamespace = 'fc'::regnamespace"
        " AND c.relkind = 'r'").fetchall()]
    out = []
    for table in tables:
        out += [str(r[0]) for r in db.execute(f"SELECT t::text FROM {table} t").fetchall()]
    return "\n".join(out)


def step_up(server: RunningServer, account_id: str) -> step_up_pb2.StepUp:
    """A step-up code for exporting `account_id`'s data (development mode: the
    code is in the file outbox)."""
    security = security_pb2_grpc.SecurityServiceStub(server.channel)
    answer = security.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
        request_id=builders.rid("su"), kind=step_up_pb2.STEP_UP_KIND_HOLDER_DATA_EXPORT,
        subject_id=account_id))
    code = FileOtpSender(server.settings.data_dir / "otp-outbox.jsonl").read_code(answer.challenge_id)
    assert code is not None
    return step_up_pb2.StepUp(challenge_id=answer.challenge_id, code=code)


def close_card(server: RunningServer, card_id: str) -> None:
    server.accounts.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
        request_id=builders.rid("close"), card_id=card_id, status=account_pb2.CARD_STATUS_CLOSED))


def test_phone_and_id_number_are_not_readable_in_the_database(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, phone=PHONE, id_number=ID_NUMBER)
    row = holder_row(db, card.account_id)
    # sealed and indexed, and no digit run of either in the row
    assert "\\x01" in row  # a sealed value (format version 1) is there
    for secret in (PHONE, ID_NUMBER, PHONE[-7:], ID_NUMBER[-8:], ID_NUMBER[:10]):
        assert secret not in row
    # nor anywhere else in schema fc (the idempotency table, the audit log ...)
    dump = every_row_of_schema_fc(db)
    assert PHONE not in dump and ID_NUMBER not in dump and PHONE[-7:] not in dump
    # the server still reads them (masked in the answer)
    account = server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id)).account
    assert (account.holder.phone, account.holder.id_number) == ("139****4321", "5301**********123X")


def test_a_sealed_value_moved_to_another_holder_does_not_open(server: RunningServer, db: Conn) -> None:
    one = builders.open_card(server, phone=PHONE)
    other = builders.open_card(server, phone="13700001111")
    db.execute("UPDATE fc.account_holders SET phone_sealed = (SELECT h.phone_sealed FROM fc.account_holders h"
               " JOIN fc.accounts a ON a.id = h.account_id WHERE a.uid = %s)"
               " WHERE account_id = (SELECT id FROM fc.accounts WHERE uid = %s)",
               (one.account_id, other.account_id))
    expect(lambda: server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=other.account_id)),
           grpc.StatusCode.DATA_LOSS, "HOLDER_DATA_DAMAGED")


def test_plaintext_left_by_an_upgrade_is_sealed(server: RunningServer, db: Conn,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    card = builders.open_card(server)
    # as migration 0009 leaves a row of an older database
    db.execute("UPDATE fc.account_holders SET phone_plaintext = %s, id_number_plaintext = %s"
               " WHERE account_id = (SELECT id FROM fc.accounts WHERE uid = %s)",
               (PHONE, ID_NUMBER, card.account_id))
    # served meanwhile from the plaintext
    account = server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id)).account
    assert account.holder.phone == "139****4321"
    monkeypatch.setenv("FUELCARD_CARD_INDEX_KEY_HEX", TEST_KEY_HEX)
    assert cli.main(["privacy", "seal", "--database-url", server.database_url,
                     "--data-dir", str(server.settings.data_dir), "--batch", "1"]) == 0
    assert "sealed the personal data of 1 holders" in capsys.readouterr().out
    row = holder_row(db, card.account_id)
    assert PHONE not in row and ID_NUMBER not in row
    account = server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id)).account
    assert (account.holder.phone, account.holder.id_number) == ("139****4321", "5301**********123X")
    # a step-up code still goes to the (now sealed) phone, found by the blind index too
    assert cli.main(["privacy", "export", "--phone", PHONE, "--database-url", server.database_url,
                     "--data-dir", str(server.settings.data_dir)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["account"]["account_id"] == card.account_id
    assert exported["account"]["holder_phone"] == PHONE


def test_a_server_seals_plaintext_when_it_starts(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server)
    db.execute("UPDATE fc.account_holders SET phone_plaintext = %s"
               " WHERE account_id = (SELECT id FROM fc.accounts WHERE uid = %s)",
               (PHONE, card.account_id))
    assert PHONE in holder_row(db, card.account_id)
    # a second server on the same database and key set (an upgraded host starting)
    other = ServerThread(server.settings, server.database_url, server.clock)
    other.start()
    other.stop()
    assert PHONE not in holder_row(db, card.account_id)
    account = server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id)).account
    assert account.holder.phone == "139****4321"


def test_export_needs_a_step_up_and_returns_everything_held(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=20_000, phone=PHONE, id_number=ID_NUMBER)
    auth = builders.authorize(server, card, 5_000)
    builders.confirm(server, auth.hold.hold_id, 4_000)
    request = account_pb2.ExportHolderDataRequest(request_id=builders.rid("export"),
                                                  account_id=card.account_id)
    expect(lambda: server.accounts.ExportHolderData(request), grpc.StatusCode.FAILED_PRECONDITION,
           "STEP_UP_REQUIRED")
    request.step_up.CopyFrom(step_up(server, card.account_id))
    answer = server.accounts.ExportHolderData(request)
    data = json.loads(answer.data_json)
    account = data["account"]
    assert (account["holder_phone"], account["holder_id_number"]) == (PHONE, ID_NUMBER)
    assert account["holder_name"].startswith("测试用户")
    assert not any(k.endswith(("_sealed", "_index", "_plaintext")) for k in account)
    # cards masked only
    assert [c["card_id"] for c in data["cards"]] == [card.card_id]
    assert card.card_number not in answer.data_json
    assert data["cards"][0]["masked_card_number"].endswith(card.card_number[-4:])
    # the recharge and the purchase, signed from the account's side
    money = [t["amount"] for t in data["transactions"] if t["asset"] == 1]
    assert 20_000 in money and -4_000 in money
    assert [h["hold_id"] for h in data["holds"]] == [auth.hold.hold_id]
    assert data["points"]["balance"] == account["points_balance"]
    # the audit records about the account (its opening, this export's step-up ...)
    methods = {a["method"] for a in data["audit"]}
    assert "/fuelcard.v1.AccountService/OpenAccount" in methods
    assert [s["kind"] for s in data["step_ups"]] == [step_up_pb2.STEP_UP_KIND_HOLDER_DATA_EXPORT]


def test_erasure_of_a_closed_account_keeps_the_ledger_whole(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=10_000, phone=PHONE, id_number=ID_NUMBER)
    auth = builders.authorize(server, card, 10_000)
    builders.confirm(server, auth.hold.hold_id, 10_000)
    erase = account_pb2.EraseHolderDataRequest(request_id=builders.rid("erase"), account_id=card.account_id)
    # an open account (its card active) is refused, and nothing changes
    before = holder_row(db, card.account_id)
    expect(lambda: server.accounts.EraseHolderData(erase), grpc.StatusCode.FAILED_PRECONDITION,
           "ACCOUNT_NOT_CLOSED")
    assert holder_row(db, card.account_id) == before
    journal = db.execute("SELECT j::text FROM fc.journal j ORDER BY id").fetchall()

    close_card(server, card.card_id)
    answer = server.accounts.EraseHolderData(erase)
    assert answer.account_id == card.account_id and not answer.already_erased
    row = db.execute(
        "SELECT h.name, h.phone_sealed, h.phone_index, h.id_number_sealed, h.id_number_index,"
        " h.erased_at IS NOT NULL, a.label, a.status FROM fc.account_holders h"
        " JOIN fc.accounts a ON a.id = h.account_id WHERE a.uid = %s", (card.account_id,)).fetchone()
    assert row == ("erased", None, None, None, None, True, "", account_pb2.ACCOUNT_STATUS_FROZEN)
    account = server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id)).account
    assert (account.holder.name, account.holder.phone, account.holder.id_number) == ("erased", "", "")
    # the ledger is as it was, and whole
    assert db.execute("SELECT j::text FROM fc.journal j ORDER BY id").fetchall() == journal
    server.chain_journal()
    assert verify.run(server.database_url) == []
    # again: nothing to do
    assert server.accounts.EraseHolderData(erase).already_erased


def test_erasure_of_an_account_with_money_is_refused(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=1_000, phone=PHONE)
    close_card(server, card.card_id)
    expect(lambda: server.accounts.EraseHolderData(account_pb2.EraseHolderDataRequest(
        request_id=builders.rid("erase"), account_id=card.account_id)),
        grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_NOT_CLOSED")


def test_cli_erase_refuses_an_open_account_and_erases_a_closed_one(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    card = builders.open_card(server, phone=PHONE, id_number=ID_NUMBER)
    monkeypatch.setenv("FUELCARD_CARD_INDEX_KEY_HEX", TEST_KEY_HEX)
    flags = ["--database-url", server.database_url, "--data-dir", str(server.settings.data_dir)]
    assert cli.main(["privacy", "erase", "--id-number", ID_NUMBER.lower(), *flags]) == 1
    assert "ACCOUNT_NOT_CLOSED" in capsys.readouterr().err
    close_card(server, card.card_id)
    out = tmp_path / "export.json"
    assert cli.main(["privacy", "export", "--account", card.account_id, "--out", str(out), *flags]) == 0
    assert out.stat().st_mode & 0o077 == 0
    assert json.loads(out.read_text())["account"]["holder_id_number"] == ID_NUMBER
    assert cli.main(["privacy", "erase", "--account", card.account_id, *flags]) == 0
    assert "erased" in capsys.readouterr().out
    # erased: the phone finds nobody now
    assert cli.main(["privacy", "export", "--phone", PHONE, *flags]) == 1
    with psycopg.connect(server.database_url) as conn:
        audited = conn.execute("SELECT method, outcome FROM fc.audit_log WHERE target = %s::uuid"
                               " AND method LIKE 'cli/%%' ORDER BY id", (card.account_id,)).fetchall()
    assert audited == [("cli/fuelcard privacy erase", "ACCOUNT_NOT_CLOSED"),
                       ("cli/fuelcard privacy export", "OK"), ("cli/fuelcard privacy erase", "OK")]
