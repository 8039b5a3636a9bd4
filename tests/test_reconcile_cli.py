"""Issue 20, item 7: reconciliation as finance staff use it. The sample
settlement file of every channel in docs/examples/ parses; `fuelcard
reconcile` shows yuan and Beijing time as the bills do, takes channel names
in any case, warns when the file's dates are not --date; and its breaks are
listed and resolved from the command line."""

from __future__ import annotations

import csv
import datetime as dt
import getpass
import re
import uuid
from pathlib import Path

import psycopg
import pytest
from fuelcard_adapters.channels import CHANNELS, by_name
from fuelcard_adapters.neutral import Kind, Status
from fuelcard_server import audit, cli

from tests.plugins.server import TEST_KEY_HEX

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
DAY = dt.date(2026, 11, 25)
SAMPLES = {"WECHAT_PAY": "settlement-wechat-pay-2026-11-25.csv",
           "ALIPAY": "settlement-alipay-2026-11-25.csv",
           "BANK_CARD": "settlement-bank-card-2026-11-25.txt",
           "ECNY": "settlement-ecny-2026-11-25.txt"}
BREAK_ID = re.compile(r"^([0-9a-f-]{36})  ", re.MULTILINE)


@pytest.fixture(autouse=True)
def _card_index_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings validation wants the card index key even for reconcile.
    monkeypatch.setenv("FUELCARD_CARD_INDEX_KEY_HEX", TEST_KEY_HEX)


def test_every_channel_has_a_sample() -> None:
    assert set(SAMPLES) == set(CHANNELS)
    assert sorted(p.name for p in EXAMPLES.glob("settlement-*")) == sorted(SAMPLES.values())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_sample_file_parses_with_its_channels_reader(name: str) -> None:
    files = by_name(name)
    with (EXAMPLES / SAMPLES[name]).open(encoding=files.encoding, newline="") as f:
        records = list(files.parse_bill(f))
    assert {r.business_date for r in records} == {DAY}
    assert {r.channel for r in records} == {files.channel}
    paid = sorted(r.amount_fen for r in records if r.kind is Kind.PAYMENT and r.status is Status.SUCCESS)
    assert paid == [12345, 20000, 50000]
    refund = [r for r in records if r.kind is Kind.REFUND]
    assert [(r.amount_fen, r.status) for r in refund] == [(2345, Status.SUCCESS)]
    # the refund names the payment it returns money from
    assert refund[0].original_channel_txn_id in {r.channel_txn_id for r in records}
    # every format but Alipay's (completed trades only) also lists a failed one
    assert sum(r.status is Status.FAILED for r in records) == (0 if name == "ALIPAY" else 1)


def _reconcile(url: str, channel: str, day: str, sample: str, *extra: str) -> list[str]:
    return ["reconcile", "--database-url", url, "--channel", channel, "--date", day,
            "--file", str(EXAMPLES / sample), *extra]


@pytest.mark.parametrize("spelling", ["WECHAT_PAY", "wechat_pay", "Wechat_Pay", "channel_wechat_pay"])
def test_channel_names_in_any_case_and_yuan_and_beijing_time(
        database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], spelling: str) -> None:
    report = tmp_path / "report.csv"
    # nothing of ours is booked: every record of the file is a break
    code = cli.main(_reconcile(database_url, spelling, str(DAY), SAMPLES["WECHAT_PAY"],
                               "--report", str(report)))
    out = capsys.readouterr()
    assert code == 1, out.err
    assert "WECHAT_PAY 2026-11-25" in out.out
    # 200.00 + 123.45 + 500.00 paid, 23.45 refunded, in yuan
    assert "paid 823.45 yuan, refunded 23.45 yuan" in out.out
    assert "123.45" in out.out and "12345" not in out.out.replace("20261125", "")
    assert "warning" not in out.err  # the file is the one for --date
    with report.open(encoding="utf-8") as f:
        rows = {row["channel_txn_id"]: row for row in csv.DictReader(f)}
    second = rows["4220261125WE00000002"]
    assert second["theirs_amount_yuan"] == "123.45" and second["theirs_fee_yuan"] == "0.74"
    # 12:30:05 Beijing time on the bill, 04:30:05 UTC in the database
    assert second["theirs_time_beijing"] == "2026-11-25 12:30:05"
    assert rows["4220261125WE00000003"]["theirs_time_beijing"] == "2026-11-25 23:59:05"


def test_an_unknown_channel_is_refused_naming_the_known_ones(
        database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_reconcile(database_url, "paypal", str(DAY), SAMPLES["ECNY"])) == 2
    assert "BANK_CARD" in capsys.readouterr().err


def test_a_file_for_another_day_is_warned_about(database_url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_reconcile(database_url, "ecny", "2026-11-26", SAMPLES["ECNY"])) == 1
    err = capsys.readouterr().err
    assert "warning" in err
    assert "5 of 5 records in the file are not dated 2026-11-26" in err
    assert "the file holds 2026-11-25" in err


def test_breaks_are_listed_and_resolved_from_the_command_line(
        database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_reconcile(database_url, "Bank_Card", str(DAY), SAMPLES["BANK_CARD"])) == 1
    capsys.readouterr()
    listing = ["reconcile", "breaks", "list", "--database-url", database_url]
    assert cli.main([*listing, "--channel", "bank_card", "--date", str(DAY)]) == 0
    out = capsys.readouterr()
    ids = BREAK_ID.findall(out.out)
    # four payments (one failed: it moved no money, so it is no break) and a refund
    assert len(ids) == 4, out.out
    assert "4 break(s) open" in out.err
    assert "BANK_CARD 2026-11-25 missing_ours" in out.out
    assert "theirs       123.45 SUCCESS    2026-11-25 12:30:05" in out.out
    # another channel or day has none
    assert cli.main([*listing, "--channel", "ECNY"]) == 0
    assert BREAK_ID.findall(capsys.readouterr().out) == []

    request_id = str(uuid.uuid4())
    resolve = ["reconcile", "breaks", "resolve", ids[0], "--database-url", database_url,
               "--resolution", "booked by hand, voucher 2026-118", "--by", "finance-li",
               "--request-id", request_id]
    assert cli.main(resolve) == 0
    assert "resolved by finance-li: booked by hand, voucher 2026-118" in capsys.readouterr().out
    # the same request again answers the first result; another is refused
    assert cli.main(resolve) == 0
    capsys.readouterr()
    assert cli.main([*resolve[:-1], str(uuid.uuid4())]) == 1
    assert "BREAK_ALREADY_RESOLVED" in capsys.readouterr().err
    unknown = str(uuid.uuid4())
    assert cli.main([*resolve[:3], unknown, *resolve[4:-2]]) == 1
    assert "BREAK_NOT_FOUND" in capsys.readouterr().err
    assert cli.main([*resolve[:3], "not-an-id", *resolve[4:-2]]) == 1
    assert "BREAK_ID_MALFORMED" in capsys.readouterr().err

    assert cli.main(listing) == 0
    assert sorted(BREAK_ID.findall(capsys.readouterr().out)) == sorted(ids[1:])
    assert cli.main([*listing, "--all"]) == 0
    assert len(BREAK_ID.findall(capsys.readouterr().out)) == 4
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT resolved_by, resolution FROM fc.reconciliation_breaks"
                           " WHERE uid = %s", (ids[0],)).fetchone()
        trail = conn.execute("SELECT actor, method, target::text, outcome FROM fc.audit_log"
                             " ORDER BY id").fetchall()
    assert row == ("finance-li", "booked by hand, voucher 2026-118")
    # audited as the service's calls are, refusals too, in an unbroken chain
    resolve_method = "/fuelcard.v1.ReconciliationService/ResolveBreak"
    assert [t for t in trail if t[1] == resolve_method] == [
        ("cli:finance-li", resolve_method, ids[0], "OK"),
        ("cli:finance-li", resolve_method, ids[0], "OK"),  # the replay
        ("cli:finance-li", resolve_method, ids[0], "FAILED_PRECONDITION BREAK_ALREADY_RESOLVED"),
        ("cli:finance-li", resolve_method, unknown, "NOT_FOUND BREAK_NOT_FOUND"),
        ("cli:finance-li", resolve_method, None, "INVALID_ARGUMENT BREAK_ID_MALFORMED")]
    login = f"cli:{getpass.getuser()}"
    assert {(t[0], t[3]) for t in trail if t[1].endswith("/ListBreaks")} == {(login, "OK")}
    assert audit.verify(database_url) == []


def test_reconcile_without_its_flags_says_what_is_missing(
        database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reconcile", "--database-url", database_url, "--channel", "ecny"]) == 2
    assert "--date, --file required" in capsys.readouterr().err
