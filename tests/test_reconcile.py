"""Issue 8: reconciliation (对账) of each channel's daily file against our
neutral settlement records: a clean file has no breaks; every kind of break
planted in a generated file is found, reported, stored, and followed up
through ReconciliationService (admin only, audited)."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import funding_pb2, settlement_pb2, settlement_pb2_grpc
from fuelcard_adapters.channels import by_name
from fuelcard_adapters.neutral import SHANGHAI, FormatError, Kind, NeutralRecord, Status
from fuelcard_loadtest import channel_files
from fuelcard_server import cli, reconcile

from tests.plugins.server import TEST_KEY_HEX, RunningServer, TlsServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, count, snapshot, unpack
from tests.support.row_lock import twins_behind_row_lock

DAY = dt.date(2026, 11, 25)  # the server fixtures' clock starts at 16:00 Beijing time that day
CHANNELS = ("WECHAT_PAY", "ALIPAY", "BANK_CARD", "ECNY")


def txn_id(name: str) -> str:
    """An id of the channel's shape (the bank-card file has 21 characters)."""
    return "7" + uuid.uuid4().int.__str__()[:20] if name == "BANK_CARD" else f"42{uuid.uuid4().hex}"


def ours(db: Conn, channel: int) -> list[NeutralRecord]:
    """Our settlement records, as the channel would list them (with a fee)."""
    return [NeutralRecord(channel, Kind(k), txn, amount, at, Status(st), amount * 6 // 1000, orig)
            for k, txn, amount, at, st, orig in db.execute(
                "SELECT kind, channel_txn_id, amount_fen, occurred_at, status,"
                " original_channel_txn_id FROM fc.settlement_records WHERE channel = %s"
                " ORDER BY id", (channel,))]


def seed(server: RunningServer, name: str, payments: int = 6) -> list[str]:
    """Recharges (and two refunds) through the server; their channel ids."""
    channel = by_name(name).channel
    card = builders.open_card(server)
    ids = []
    for i in range(payments):
        txn = txn_id(name)
        server.funding.Recharge(funding_pb2.RechargeRequest(
            request_id=builders.rid("rc"), account_id=card.account_id,
            channel=channel, channel_txn_id=txn, amount_fen=10_000 + i))  # type: ignore[arg-type]
        ids.append(txn)
    for txn in ids[:2]:
        server.funding.RefundRecharge(funding_pb2.RefundRechargeRequest(
            request_id=builders.rid("rf"), channel=channel,  # type: ignore[arg-type]
            channel_txn_id=txn, channel_refund_id=txn_id(name), amount_fen=1_000))
    return ids


def run(url: str, name: str, records: list[NeutralRecord], tmp_path: Path, *,
        day: dt.date = DAY, report: Path | None = None) -> reconcile.Result:
    path = channel_files.write(name, records, day, tmp_path / f"{name}-{day}.txt")
    return reconcile.reconcile(url, by_name(name), day, path, now=dt.datetime.now(dt.UTC),
                               report=report)


@pytest.mark.parametrize("name", CHANNELS)
def test_a_clean_file_has_no_breaks(server: RunningServer, db: Conn, tmp_path: Path,
                                    name: str) -> None:
    seed(server, name)
    records = ours(db, by_name(name).channel)
    assert len(records) == 8
    result = run(server.database_url, name, records, tmp_path, report=tmp_path / "report.csv")
    assert result.counts == {"matched": 8, "missing_ours": 0, "missing_theirs": 0,
                             "amount_mismatch": 0, "status_mismatch": 0}
    assert (result.theirs, result.ours, result.break_count) == (8, 8, 0)
    assert result.theirs_paid_fen == result.ours_paid_fen == sum(10_000 + i for i in range(6))
    assert result.theirs_refunded_fen == result.ours_refunded_fen == 2_000
    assert result.theirs_fee_fen == sum(r.fee_fen for r in records)
    assert count(db, "reconciliation_breaks") == 0
    with (tmp_path / "report.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 8 and {line["outcome"] for line in lines} == {"matched"}


@pytest.mark.parametrize("name", CHANNELS)
def test_every_kind_of_break_is_found_and_stored(server: RunningServer, db: Conn, tmp_path: Path,
                                                 name: str) -> None:
    seed(server, name)
    channel = by_name(name).channel
    records = ours(db, channel)
    at = dt.datetime(2026, 11, 25, 12, 0, tzinfo=SHANGHAI)
    dropped = records.pop(1)                                           # missing theirs
    records[2] = dataclasses.replace(records[2], amount_fen=records[2].amount_fen + 1)  # amount
    extra = NeutralRecord(channel, Kind.PAYMENT, txn_id(name), 777, at, Status.SUCCESS, 4)
    closed = NeutralRecord(channel, Kind.PAYMENT, txn_id(name), 555, at, Status.FAILED)
    records += [extra]                                                 # missing ours
    expected = {"missing_theirs": [dropped.channel_txn_id], "missing_ours": [extra.channel_txn_id],
                "amount_mismatch": [records[2].channel_txn_id]}
    if name != "ALIPAY":  # its bill lists completed transactions only: no status to disagree on
        records[3] = dataclasses.replace(records[3], status=Status.FAILED)  # status
        records.append(closed)  # failed and unknown to us: nothing moved on either side
        expected["status_mismatch"] = [records[3].channel_txn_id]
    result = run(server.database_url, name, records, tmp_path, report=tmp_path / "report.csv")
    found = {k: sorted(b.channel_txn_id for b in result.breaks if b.outcome == k)
             for k in reconcile.BREAK_KINDS}
    assert found == {k: sorted(expected.get(k, [])) for k in reconcile.BREAK_KINDS}
    assert result.break_count == len(expected)
    # every one of ours not broken, and the failed one nobody booked
    assert result.counts["matched"] == 8 - (len(expected) - 1) + (1 if name != "ALIPAY" else 0)
    stored = db.execute(
        "SELECT kind, channel_txn_id, ours_amount_fen, theirs_amount_fen, business_date"
        " FROM fc.reconciliation_breaks WHERE resolved_at IS NULL ORDER BY kind").fetchall()
    assert sorted((reconcile.OUTCOMES[k], t) for k, t, *_ in stored) == sorted(
        (k, v[0]) for k, v in expected.items())
    amount_row = next(r for r in stored if r[0] == 3)
    assert amount_row[3] == amount_row[2] + 1 and amount_row[4] == DAY
    with (tmp_path / "report.csv").open() as f:
        outcomes = sorted(line["outcome"] for line in csv.DictReader(f))
    assert outcomes.count("matched") == result.counts["matched"]
    assert sorted(o for o in outcomes if o != "matched") == sorted(expected)
    # Reconciling the same day again replaces its open breaks, not adds to them.
    again = run(server.database_url, name, records, tmp_path)
    assert again.break_count == result.break_count
    assert count(db, "reconciliation_breaks") == len(expected)
    assert count(db, "reconciliation_runs") == 2


def test_a_transaction_across_midnight_is_matched_and_an_old_break_closed(
        server: RunningServer, db: Conn, tmp_path: Path) -> None:
    name, channel = "WECHAT_PAY", funding_pb2.CHANNEL_WECHAT_PAY
    seed(server, name, payments=2)
    # 2026-11-26 00:00:01 Beijing: on our next day, on the channel's day 25.
    server.advance(dt.timedelta(hours=8, seconds=1))
    late = txn_id(name)
    server.funding.Recharge(funding_pb2.RechargeRequest(
        request_id=builders.rid("rc"), account_id=builders.open_card(server).account_id,
        channel=channel, channel_txn_id=late, amount_fen=3_000))
    records = ours(db, channel)
    # Our day 26 reconciled first, against a file without it: missing theirs.
    first = run(server.database_url, name, [], tmp_path, day=DAY + dt.timedelta(days=1))
    assert [(b.outcome, b.channel_txn_id) for b in first.breaks] == [("missing_theirs", late)]
    # The channel booked it at 23:59:59 on the 25th: its file of the 25th has it.
    late_rec = next(r for r in records if r.channel_txn_id == late)
    theirs = [dataclasses.replace(r, time=r.time - dt.timedelta(seconds=2)) if r is late_rec else r
              for r in records if r.business_date == DAY or r is late_rec]
    result = run(server.database_url, name, theirs, tmp_path)
    assert result.break_count == 0, result.breaks
    assert result.counts["matched"] == len(theirs) == 5
    # ... which closes the open break of the 26th.
    assert db.execute("SELECT resolved_by, resolution FROM fc.reconciliation_breaks").fetchall() == [
        ("reconcile", f"matched in the channel file of {DAY}")]


def test_a_truncated_or_foreign_file_is_refused_and_nothing_stored(
        server: RunningServer, db: Conn, tmp_path: Path) -> None:
    seed(server, "WECHAT_PAY", payments=2)
    path = channel_files.write("WECHAT_PAY", ours(db, funding_pb2.CHANNEL_WECHAT_PAY), DAY,
                               tmp_path / "bill.csv")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    before = snapshot(db)
    cases = {"truncated": "".join(lines[:-2]), "no summary": "".join(lines[:-1]),
             "not a WeChat bill": "a,b,c\r\n", "an amount with 3 decimals":
                 "".join(lines).replace("`100.00,", "`100.001,")}
    for label, text in cases.items():
        path.write_text(text, encoding="utf-8")
        with pytest.raises(FormatError):
            reconcile.reconcile(server.database_url, by_name("WECHAT_PAY"), DAY, path,
                                now=dt.datetime.now(dt.UTC))
        assert snapshot(db) == before, label


def test_the_command_exits_non_zero_on_breaks(server: RunningServer, db: Conn, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FUELCARD_CARD_INDEX_KEY_HEX", TEST_KEY_HEX)
    seed(server, "ECNY", payments=3)
    records = ours(db, funding_pb2.CHANNEL_ECNY)
    clean = channel_files.write("ECNY", records, DAY, tmp_path / "clean.txt")
    broken = channel_files.write("ECNY", records[1:], DAY, tmp_path / "broken.txt")
    args = ["reconcile", "--database-url", server.database_url, "--channel", "ecny",
            "--date", str(DAY), "--file"]
    assert cli.main([*args, str(clean)]) == 0
    assert "no breaks" in capsys.readouterr().out
    assert cli.main([*args, str(broken)]) == 1
    out = capsys.readouterr()
    assert "missing_theirs" in out.out and records[0].channel_txn_id in out.out
    assert "1 break(s)" in out.err
    (tmp_path / "bad.txt").write_text("nonsense\n")
    assert cli.main([*args, str(tmp_path / "bad.txt")]) == 2
    assert cli.main(["reconcile", "--database-url", server.database_url, "--channel", "paypal",
                     "--date", str(DAY), "--file", str(clean)]) == 2


# --- following up: ReconciliationService -------------------------------------


@pytest.fixture
def breaks(tls_server: TlsServer, db: Conn, tmp_path: Path) -> Iterator[list[str]]:
    """Three breaks of a WeChat day, found through the command's code path."""
    admin = tls_server.channel("admin-ops")
    from fuelcard.v1 import (
        account_pb2,
        account_pb2_grpc,
        funding_pb2_grpc,
        security_pb2,
        security_pb2_grpc,
    )
    from fuelcard_server import gm, keys
    accounts = account_pb2_grpc.AccountServiceStub(admin)
    account = accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=builders.rid("open"), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="对账"))).account.account_id
    # WeChat Pay payments arrive signed by the WeChat Pay adapter.
    key = gm.Sm2PrivateKey.generate()
    security_pb2_grpc.SecurityServiceStub(admin).RegisterChannelKey(
        security_pb2.RegisterChannelKeyRequest(channel=funding_pb2.CHANNEL_WECHAT_PAY,
                                               public_key_hex=key.public_key.to_hex()))
    funding = funding_pb2_grpc.FundingServiceStub(tls_server.channel("adapter-wechat-gw"))
    for i in range(4):
        req = funding_pb2.RechargeRequest(
            request_id=builders.rid("rc"), account_id=account,
            channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=txn_id("WECHAT_PAY"),
            amount_fen=100 + i)
        req.signature = gm.sm2_sign(key, keys.canonical(
            "Recharge", req.request_id, req.account_id, req.channel, req.channel_txn_id,
            req.amount_fen))
        funding.Recharge(req)
    records = ours(db, funding_pb2.CHANNEL_WECHAT_PAY)
    records[1] = dataclasses.replace(records[1], amount_fen=1)
    records[2] = dataclasses.replace(records[2], status=Status.PROCESSING)
    result = run(tls_server.database_url, "WECHAT_PAY", records[1:], tmp_path)
    assert result.break_count == 3
    yield [b.channel_txn_id for b in result.breaks]


def test_breaks_are_listed_resolved_once_and_audited(tls_server: TlsServer, db: Conn,
                                                     breaks: list[str], tmp_path: Path) -> None:
    stub = settlement_pb2_grpc.ReconciliationServiceStub(tls_server.channel("admin-ops"))
    listed = stub.ListBreaks(settlement_pb2.ListBreaksRequest(
        channel=funding_pb2.CHANNEL_WECHAT_PAY, business_date=str(DAY))).breaks
    assert sorted(b.theirs.channel_txn_id or b.ours.channel_txn_id for b in listed) == sorted(breaks)
    kinds = {b.kind: b for b in listed}
    assert set(kinds) == {settlement_pb2.BREAK_KIND_MISSING_THEIRS,
                          settlement_pb2.BREAK_KIND_AMOUNT_MISMATCH,
                          settlement_pb2.BREAK_KIND_STATUS_MISMATCH}
    mismatch = kinds[settlement_pb2.BREAK_KIND_AMOUNT_MISMATCH]
    assert (mismatch.theirs.amount_fen, mismatch.ours.amount_fen) == (1, 101)
    assert mismatch.ours.txn_id and mismatch.ours.business_date == str(DAY)
    missing = kinds[settlement_pb2.BREAK_KIND_MISSING_THEIRS]
    assert not missing.HasField("theirs") and missing.ours.amount_fen == 100
    # Paging.
    first = stub.ListBreaks(settlement_pb2.ListBreaksRequest(page_size=2))
    rest = stub.ListBreaks(settlement_pb2.ListBreaksRequest(page_size=2,
                                                            page_token=first.next_page_token))
    assert len(first.breaks) == 2 and len(rest.breaks) == 1 and not rest.next_page_token
    # Resolve: idempotent on request_id; a second resolution is refused.
    req = settlement_pb2.ResolveBreakRequest(request_id=builders.rid("res"),
                                             break_id=mismatch.break_id,
                                             resolution="channel corrected the amount, ticket 4711")
    done = stub.ResolveBreak(req).reconciliation_break
    assert done.resolved and done.resolved_by == "admin::ops" and done.resolution == req.resolution
    assert stub.ResolveBreak(req).reconciliation_break == done
    with pytest.raises(grpc.RpcError) as err:
        stub.ResolveBreak(settlement_pb2.ResolveBreakRequest(
            request_id=builders.rid("res"), break_id=mismatch.break_id, resolution="again"))
    assert (unpack(err.value).code, unpack(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "BREAK_ALREADY_RESOLVED")
    open_now = stub.ListBreaks(settlement_pb2.ListBreaksRequest()).breaks
    assert mismatch.break_id not in {b.break_id for b in open_now} and len(open_now) == 2
    assert len(stub.ListBreaks(settlement_pb2.ListBreaksRequest(include_resolved=True)).breaks) == 3
    # Audited, with the break as the target.
    audited = db.execute("SELECT method, target::text, outcome FROM fc.audit_log"
                         " WHERE method LIKE '%%ResolveBreak' ORDER BY id").fetchall()
    assert audited[0] == ("/fuelcard.v1.ReconciliationService/ResolveBreak", mismatch.break_id, "OK")
    assert audited[-1][2] == "FAILED_PRECONDITION BREAK_ALREADY_RESOLVED"
    # Reconciling the day again does not raise the resolved break again.
    assert count(db, "reconciliation_breaks") == 3



def test_the_same_resolution_sent_twice_at_once_answers_both_the_same(
        tls_server: TlsServer, db: Conn, breaks: list[str]) -> None:
    stub = settlement_pb2_grpc.ReconciliationServiceStub(tls_server.channel("admin-ops"))
    break_id = stub.ListBreaks(settlement_pb2.ListBreaksRequest()).breaks[0].break_id
    req = settlement_pb2.ResolveBreakRequest(request_id=builders.rid("res"), break_id=break_id,
                                             resolution="written off, ticket 4713")
    futures = twins_behind_row_lock(tls_server.database_url, "reconciliation_breaks", break_id,
                                    lambda: stub.ResolveBreak(req))
    answers = [f.result().reconciliation_break for f in futures]  # none failed
    assert all(a == answers[0] for a in answers) and answers[0].resolved
    assert db.execute("SELECT count(*) FROM fc.reconciliation_breaks"
                      " WHERE resolved_at IS NOT NULL").fetchone() == (1,)


def test_only_admins_may_follow_up_breaks(tls_server: TlsServer, breaks: list[str],
                                          dev_certs: Path) -> None:
    stub = settlement_pb2_grpc.ReconciliationServiceStub(tls_server.channel("adapter-wechat-gw"))
    for call in (lambda: stub.ListBreaks(settlement_pb2.ListBreaksRequest()),
                 lambda: stub.ResolveBreak(settlement_pb2.ResolveBreakRequest(
                     request_id="r-1", break_id=str(uuid.uuid4()), resolution="x"))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert (unpack(err.value).code, unpack(err.value).reason) == (
            grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    admin = settlement_pb2_grpc.ReconciliationServiceStub(tls_server.channel("admin-ops"))
    for bad in (settlement_pb2.ResolveBreakRequest(request_id="r-2", break_id="nope",
                                                   resolution="x"),
                settlement_pb2.ResolveBreakRequest(request_id="r-3", break_id=str(uuid.uuid4()),
                                                   resolution="")):
        with pytest.raises(grpc.RpcError) as err:
            admin.ResolveBreak(bad)
        assert unpack(err.value).code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        admin.ResolveBreak(settlement_pb2.ResolveBreakRequest(
            request_id="r-4", break_id=str(uuid.uuid4()), resolution="x"))
    assert unpack(err.value).code == grpc.StatusCode.NOT_FOUND
