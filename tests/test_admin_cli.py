"""`fuelcard admin` end to end against a real mutual-TLS server: a fleet
with two vehicles set up in one command per step, then listed with the list
RPCs; the batch top-up's preview and confirmation; errors as exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fuelcard.v1 import account_pb2
from fuelcard_server import cli

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders
from tests.support.ledger_asserts import Conn


def admin(tls: TlsServer, capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> str:
    got = cli.main(["admin", *argv, "--target", tls.target, "--certs", str(tls.certs)])
    out, err = capsys.readouterr()
    assert got == code, (out, err)
    return out if code == 0 else err


def admin_json(tls: TlsServer, capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    return json.loads(admin(tls, capsys, *argv, "--json"))


def test_a_fleet_with_two_vehicles_in_one_command_per_step(
        tls_server: TlsServer, server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    t = tls_server
    fleet = admin_json(t, capsys, "accounts", "open", "--type", "fleet", "--name", "昆明顺达物流")
    assert isinstance(fleet, dict)
    parent = fleet["account"]["account_id"]
    vehicles = []
    for plate in ("云A·12345", "云A·D7788"):
        v = admin_json(t, capsys, "accounts", "open", "--parent", parent, "--mode", "allocated",
                       "--name", "司机", "--label", plate)
        assert isinstance(v, dict)
        vehicles.append(v["account"]["account_id"])
    cards = []
    for vehicle in vehicles:
        c = admin_json(t, capsys, "cards", "issue", vehicle)
        assert isinstance(c, dict)
        assert c["card"]["account_id"] == vehicle
        cards.append(c["card"]["card_id"])
    limits = admin_json(t, capsys, "limits", "set", "--actor", parent, "--account", vehicles[0],
                        "--per-txn", "300", "--daily", "800.50")
    assert limits == {"limits": {"per_transaction_fen": "30000", "daily_fen": "80050"}}
    # the parent's money comes from a recharge (a payment channel's job, not the CLI's): through
    # a development-mode server on the same database
    builders.recharge(server, parent, 200_000)
    # top-up: preview, then done (--yes: no prompt)
    out = admin(t, capsys, "topup", "--parent", parent, "--line", f"{vehicles[0]}=500",
                "--line", f"{vehicles[1]}=300.25", "--yes")
    assert "2 line(s), total 800.25" in out
    assert "parent balance now 1199.75" in out

    # listed with the list RPCs: the vehicles with their balances, each one's card
    table = admin(t, capsys, "accounts", "list", "--parent", parent)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["ACCOUNT", "TYPE", "LABEL"]
    assert [line.split()[0] for line in lines[1:]] == vehicles
    assert "云A·12345" in lines[1] and "500.00" in lines[1]
    assert "云A·D7788" in lines[2] and "300.25" in lines[2]
    # page by page, with progress on stderr
    assert cli.main(["admin", "accounts", "list", "--parent", parent, "--page-size", "1", "--target",
                     t.target, "--certs", str(t.certs)]) == 0
    paged, progress = capsys.readouterr()
    assert paged == table
    # (the in-process server's JSON log lines share stderr)
    assert [line for line in progress.splitlines() if not line.startswith("{")][:2] == [
        "1 accounts so far", "2 accounts in all"]
    listed = admin_json(t, capsys, "accounts", "list", "--parent", parent)
    assert isinstance(listed, list)
    assert [a["balance"]["balance_fen"] for a in listed] == ["50000", "30025"]
    for vehicle, card in zip(vehicles, cards, strict=True):
        got = admin_json(t, capsys, "cards", "list", vehicle)
        assert isinstance(got, list)
        assert [c["card_id"] for c in got] == [card]
        assert "*" in got[0]["masked_card_number"]
    shown = admin(t, capsys, "limits", "get", "--account", vehicles[0])
    assert "300.00" in shown and "800.50" in shown

    history = admin(t, capsys, "accounts", "history", vehicles[0]).splitlines()
    assert history[0].split() == ["TIME", "KIND", "AMOUNT", "TRANSACTION"]
    assert [line.split()[2:4] for line in history[1:]] == [["allocation", "500.00"]]
    blocked = admin_json(t, capsys, "cards", "block", cards[1])
    assert isinstance(blocked, dict) and blocked["card"]["status"] == "CARD_STATUS_BLOCKED"
    assert "active" in admin(t, capsys, "cards", "unblock", cards[1]).splitlines()[1]

    # scope: products, hours and a fence, replaced whole
    out = admin(t, capsys, "scope", "set", "--actor", parent, "--card", cards[0], "--product", "92",
                "--product", "0", "--hours", "06:00-22:00", "--circle", "25.04,102.71,30000")
    assert out == ("stations: any; products: gasoline_92, diesel_0; fences: 1; hour windows: 1\n")
    err = admin(t, capsys, "scope", "set", "--actor", parent, "--card", cards[0], "--hours", "6-22",
                code=2)
    assert "HH:MM-HH:MM" in err

    # for people: a table, and the full number once, to print on the card
    issued = admin(t, capsys, "cards", "issue", vehicles[1])
    header, row, number_line = issued.splitlines()
    assert header.split() == ["CARD", "ACCOUNT", "NUMBER", "STATUS", "ISSUED"]
    number = number_line.rpartition(" ")[2]
    assert number_line.startswith("card number (shown once") and number.isdigit() and 16 <= len(number) <= 19
    assert number not in row and number[-4:] in row  # the table shows it masked


def test_top_up_from_a_csv_asks_first_and_refuses_bad_files(
        tls_server: TlsServer, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = tls_server
    fleet = admin_json(t, capsys, "accounts", "open", "--type", "corporate", "--name", "车队")
    assert isinstance(fleet, dict)
    parent = fleet["account"]["account_id"]
    v = admin_json(t, capsys, "accounts", "open", "--parent", parent, "--mode", "allocated",
                   "--name", "司机", "--label", "云A·1")
    assert isinstance(v, dict)
    vehicle = v["account"]["account_id"]
    sheet = tmp_path / "topup.csv"
    sheet.write_text(f"account_id,amount_yuan,label\n{vehicle},12.34,云A·1\n", encoding="utf-8")

    # not a terminal and no --yes: nothing moves
    err = admin(t, capsys, "topup", "--parent", parent, "--csv", str(sheet), code=2)
    assert "--yes" in err
    # a terminal that answers no: nothing moves either
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli.main(["admin", "topup", "--parent", parent, "--csv", str(sheet), "--target", t.target,
                     "--certs", str(t.certs)]) == 1
    out, _ = capsys.readouterr()
    assert "12.34" in out and "warning: the parent does not have that much" in out
    balance = admin_json(t, capsys, "accounts", "get", vehicle)
    assert isinstance(balance, dict)
    assert "balance_fen" not in balance["account"]["balance"]  # proto3 JSON omits a zero
    # answered yes, the server refuses: the parent has no money (exit 1, the reason said)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert cli.main(["admin", "topup", "--parent", parent, "--csv", str(sheet), "--target", t.target,
                     "--certs", str(t.certs)]) == 1
    _, err = capsys.readouterr()
    assert "top-up declined (insufficient_funds) after 0/1 line(s)" in err

    bad = tmp_path / "bad.csv"
    bad.write_text(f"account_id,amount_yuan\n{vehicle},1.234\n", encoding="utf-8")
    err = admin(t, capsys, "topup", "--parent", parent, "--csv", str(bad), "--yes", code=2)
    assert "bad.csv:2" in err and "two decimals" in err
    err = admin(t, capsys, "cards", "list", "not-a-uuid", code=1)
    assert "INVALID_ARGUMENT" in err and "account_id" in err


def test_the_console_script_runs_admin_over_tls(tls_server: TlsServer) -> None:
    exe = Path(sys.executable).parent / "fuelcard"
    done = subprocess.run([str(exe), "admin", "accounts", "open", "--type", "personal", "--name", "张伟",
                           "--json", "--target", tls_server.target, "--certs", str(tls_server.certs)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["account"]["holder"]["name"] == "张伟"
    # without a certificate: refused by the command, not by a stack trace
    done = subprocess.run([str(exe), "admin", "rules", "show", "--target", tls_server.target],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert done.returncode == 2 and "no admin certificate" in done.stderr


def test_principal_add_makes_a_login_with_a_hashed_password(
        server: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        db: Conn) -> None:
    fleet = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_CORPORATE,
        holder=account_pb2.Holder(name="车队"))).account.account_id

    def add(*argv: str, password: str = "s3cret-enough\n") -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(password))
        return cli.main(["admin", "principal", "add", "--database-url", server.database_url,
                         "--password-stdin", "--account", fleet, *argv])

    assert add("--login", "fleet.boss", "--kind", "fleet_manager", "--json") == 0
    made = json.loads(capsys.readouterr().out)
    assert (made["login"], made["kind"], made["account_id"]) == ("fleet.boss", "fleet_manager", fleet)
    stored = db.execute("SELECT password_hash FROM fc.principals WHERE login = 'fleet.boss'").fetchone()
    assert stored is not None and stored[0].startswith("scrypt$") and "s3cret" not in stored[0]
    from fuelcard_api.principals import check_password
    assert check_password("s3cret-enough", stored[0]) and not check_password("s3cret-enougH", stored[0])
    # taken, too short a password, not a fleet's account: refused, nothing stored
    assert add("--login", "fleet.boss", "--kind", "holder") == 1
    assert add("--login", "other", "--kind", "holder", password="short\n") == 1
    vehicle = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), parent_account_id=fleet,
        funding_mode=account_pb2.FUNDING_MODE_SHARED,
        holder=account_pb2.Holder(name="司机"))).account.account_id
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret-enough\n"))
    assert cli.main(["admin", "principal", "add", "--database-url", server.database_url, "--password-stdin",
                     "--account", vehicle, "--login", "not.a.fleet", "--kind", "fleet_manager"]) == 1
    err = capsys.readouterr().err
    assert "that login is taken" in err and "8-256 characters" in err and "top-level corporate" in err
    assert db.execute("SELECT count(*) FROM fc.principals").fetchone() == (1,)

    # disabled: no more logins (the JSON API's tests show its sessions end), audited
    assert cli.main(["admin", "principal", "disable", "--login", "fleet.boss", "--database-url",
                     server.database_url]) == 0
    assert "disabled fleet.boss" in capsys.readouterr().out
    assert db.execute("SELECT disabled_at IS NOT NULL FROM fc.principals").fetchone() == (True,)
    assert cli.main(["admin", "principal", "disable", "--login", "fleet.boss", "--database-url",
                     server.database_url]) == 1
    assert db.execute("SELECT count(*) FROM fc.audit_log WHERE method LIKE '/fuelcard.api/%%Principal'"
                      ).fetchone() == (2,)


def test_rules_reviews_breaks_and_exceptions_over_tls(
        tls_server: TlsServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    t = tls_server
    rules = Path(cli.__file__).parent / "risk" / "default_rules.toml"
    first = admin_json(t, capsys, "rules", "load", str(rules))
    assert isinstance(first, dict)
    # a second version goes in force at once; `activate` puts the first back
    second = tmp_path / "second.toml"
    second.write_text(rules.read_text(encoding="utf-8").replace('name = "default"', 'name = "second"', 1),
                      encoding="utf-8")
    out = admin(t, capsys, "rules", "load", str(second))
    assert "second" in out.splitlines()[1] and "in force" in out
    version = first["rule_set"]["version"]
    out = admin(t, capsys, "rules", "activate", str(version))
    assert out.splitlines()[1].split()[:2] == [str(version), "default"] and "yes" in out.splitlines()[1]
    shown = admin_json(t, capsys, "rules", "show")
    assert isinstance(shown, dict)
    assert (shown["rule_set"]["version"], shown["rule_set"]["name"]) == (version, "default")
    # nothing suspended, broken or exceptional on a fresh database: headers only, [] for scripts
    for group in ("reviews", "breaks", "exceptions"):
        assert admin_json(t, capsys, group, "list") == []
        assert len(admin(t, capsys, group, "list").splitlines()) == 1
    err = admin(t, capsys, "reviews", "approve", "00000000-0000-4000-8000-000000000000",
                "--as", "reviewer-risk", code=1)
    assert "NOT_FOUND" in err
    # a review is a reviewer's decision: the admin certificate is refused
    err = admin(t, capsys, "reviews", "approve", "00000000-0000-4000-8000-000000000000", code=1)
    assert "PERMISSION_DENIED ROLE_NOT_ALLOWED" in err
    err = admin(t, capsys, "rules", "load", str(tmp_path / "missing.toml"), code=2)
    assert "cannot read" in err
