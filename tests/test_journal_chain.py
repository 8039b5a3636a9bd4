"""The journal's SM3 hash chain (issue 15; journal_chain.py).

Entries are chained after they commit, by the server's background job, in
id order; `verify` (and `fuelcard journal verify`) recompute the chain and
name the first broken link; `fuelcard journal anchor` keeps signed heads
outside the database. The pump path writes no chain row.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import psycopg
import pytest
from fuelcard.v1 import points_pb2
from fuelcard_server import audit_anchor, cli, gm, journal_chain, keys, verify

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, scalar


def _sales(server: RunningServer, n: int = 3) -> builders.FundedCard:
    card = builders.open_card(server, balance_fen=100_000)
    for _ in range(n):
        hold = builders.authorize(server, card, 5_000).hold
        builders.confirm(server, hold.hold_id, 4_000)
    server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid(), account_id=card.account_id, points=5))
    return card


def fuelcard(server: RunningServer, *args: str) -> int:
    return cli.main([*args, "--database-url", server.database_url,
                     "--data-dir", str(server.settings.data_dir)])


def _chain_all(server: RunningServer) -> None:
    for _ in range(10):
        if server.chain_journal() == 0:
            return
    raise AssertionError("the chain job kept finding entries")


def _unchained(db: Conn) -> int:
    n: int = scalar(db, "SELECT count(*) FROM fc.journal j WHERE NOT EXISTS"
                        " (SELECT 1 FROM fc.journal_chain c WHERE c.entry_id = j.id)")
    return n


def test_the_pump_path_writes_no_chain_row_and_the_job_chains_every_entry(
        server: RunningServer, db: Conn) -> None:
    _sales(server)
    entries = scalar(db, "SELECT count(*) FROM fc.journal")
    assert entries >= 7
    assert scalar(db, "SELECT count(*) FROM fc.journal_chain") == 0
    assert server.chain_journal() == entries
    assert _unchained(db) == 0
    report = journal_chain.walk(server.database_url)
    assert (report.chained, report.unchained, report.problems) == (entries, 0, [])
    assert verify.run(server.database_url) == []


def test_each_hash_is_sm3_of_the_previous_and_the_documented_encoding(
        server: RunningServer, db: Conn) -> None:
    _sales(server, 1)
    _chain_all(server)
    prev = bytes(32)
    rows = db.execute("SELECT j.id, j.kind, j.asset, j.debit_account_id, j.credit_account_id,"
                      " j.amount, j.hold_id, j.recharge_id, j.description, j.created_at, c.hash"
                      " FROM fc.journal j JOIN fc.journal_chain c ON c.entry_id = j.id"
                      " ORDER BY j.id").fetchall()
    assert len(rows) >= 3
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    for (entry_id, kind, asset, debit, credit, amount, hold_id, recharge_id, description,
         created_at, stored) in rows:
        micros = (created_at - epoch) // dt.timedelta(microseconds=1)
        encoded = keys.canonical("JournalEntry/1", entry_id, kind, asset, debit, credit, amount,
                                 hold_id or 0, recharge_id or 0, description, micros)
        prev = gm.sm3(prev + encoded)
        assert bytes(stored) == prev, entry_id


@pytest.mark.parametrize(("edit", "kind"), [
    ("UPDATE fc.journal SET description = 'edited' WHERE id = %(id)s", "edited"),
    ("UPDATE fc.journal SET created_at = created_at - interval '1 day' WHERE id = %(id)s",
     "edited"),
    ("DELETE FROM fc.journal WHERE id = %(id)s", "deleted"),
])
def test_an_edited_or_deleted_entry_is_found_by_verify(
        server: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        edit: str, kind: str) -> None:
    _sales(server)
    _chain_all(server)
    target = scalar(db, "SELECT id FROM fc.journal WHERE kind = 4")  # a redemption: mid-chain
    db.execute("ALTER TABLE fc.journal DISABLE TRIGGER journal_append_only")
    db.execute(edit.encode(), {"id": target})
    db.execute("ALTER TABLE fc.journal ENABLE TRIGGER journal_append_only")
    violations = {v.check: v for v in verify.run(server.database_url)}
    assert "journal_chain_intact" in violations
    assert violations["journal_chain_intact"].samples[0][:2] == (target, kind)
    capsys.readouterr()
    assert fuelcard(server, "journal", "verify") == 1
    out = capsys.readouterr()
    assert f"journal chain broken at entry {target}" in out.err, out.err


def test_an_entry_inserted_below_the_head_is_found(server: RunningServer, db: Conn) -> None:
    _sales(server, 1)
    _chain_all(server)
    db.execute("INSERT INTO fc.journal (id, kind, asset, debit_account_id, credit_account_id,"
               " amount, description, created_at) OVERRIDING SYSTEM VALUE"
               " SELECT 0, 4, 2, a.id, fc.system_account(p_code => 'POINTS_REDEEMED'), 1,"
               " 'backdated', now() FROM fc.accounts a WHERE a.kind <> 100 LIMIT 1")
    problems = journal_chain.walk(server.database_url).problems
    assert [(p.entry_id, p.kind) for p in problems] == [(0, "unchained")]


def test_a_disabled_guard_is_found_by_verify(server: RunningServer, db: Conn) -> None:
    _sales(server, 1)
    db.execute("ALTER TABLE fc.journal DISABLE TRIGGER ALL")
    violations = {v.check: v for v in verify.run(server.database_url)}
    assert set(violations) == {"append_only_triggers_enabled"}
    assert {r[1] for r in violations["append_only_triggers_enabled"].samples} == {
        "journal_append_only", "journal_no_truncate"}
    db.execute("ALTER TABLE fc.journal ENABLE TRIGGER ALL")
    assert verify.run(server.database_url) == []


def test_an_id_still_in_flight_holds_the_chain_back_and_a_rolled_back_one_is_passed(
        server: RunningServer, db: Conn) -> None:
    """Chained in id order: an entry whose transaction has not committed yet
    is not skipped (the chain waits for it); an id whose transaction rolled
    back is passed over once every older transaction has ended."""
    card = _sales(server, 1)
    _chain_all(server)
    insert = ("INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
              " description, created_at) SELECT 4, 2, id, fc.system_account(p_code =>"
              " 'POINTS_REDEEMED'), 1, %s, now() FROM fc.accounts WHERE uid = %s RETURNING id")
    # A transaction that takes an id and rolls back: the id is never used.
    with psycopg.connect(server.database_url) as other:
        rolled_back = scalar(other, insert, ("rolled back", card.account_id))
        other.rollback()
    # One that takes the next id and stays open while later sales commit.
    slow = psycopg.connect(server.database_url)
    try:
        in_flight = scalar(slow, insert, ("slow", card.account_id))
        assert in_flight == rolled_back + 1
        hold = builders.authorize(server, card, 1_000).hold
        builders.confirm(server, hold.hold_id, 1_000)
        head = scalar(db, "SELECT max(entry_id) FROM fc.journal_chain")
        for _ in range(5):
            server.chain_journal()
        # nothing past the rolled-back id while the slow one may still commit
        assert scalar(db, "SELECT max(entry_id) FROM fc.journal_chain") == head
        assert head == rolled_back - 1
        slow.commit()
    finally:
        slow.close()
    for _ in range(5):
        server.chain_journal()
    assert _unchained(db) == 0
    assert scalar(db, "SELECT count(*) FROM fc.journal_chain WHERE entry_id = %s",
                  (rolled_back,)) == 0
    assert scalar(db, "SELECT count(*) FROM fc.journal_chain WHERE entry_id = %s",
                  (in_flight,)) == 1
    # (the hand-made entries leave the balances behind: only the chain is checked)
    assert journal_chain.walk(server.database_url).problems == []


def test_a_chain_rewritten_wholesale_fails_against_its_anchor(
        server: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _sales(server)
    _chain_all(server)
    anchors = tmp_path / "elsewhere" / "journal-anchors.jsonl"
    anchors.parent.mkdir()
    assert fuelcard(server, "journal", "anchor", "--file", str(anchors)) == 0
    head_id, head_hash = db.execute(
        "SELECT entry_id, hash FROM fc.journal_chain ORDER BY entry_id DESC LIMIT 1").fetchone() \
        or (0, b"")
    line = json.loads(anchors.read_text())
    assert (line["format"], line["record_id"], line["hash"]) == (
        audit_anchor.JOURNAL.format, head_id, bytes(head_hash).hex())
    at = dt.datetime.fromisoformat(line["anchored_at"])
    micros = (at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    public = gm.Sm2PrivateKey.from_hex(
        (server.settings.data_dir / "server-sm2.key").read_text().strip()).public_key
    assert gm.sm2_verify(public, keys.canonical("JournalAnchor", head_id, bytes(head_hash), micros),
                         bytes.fromhex(line["signature"]))
    # An audit anchor file is not a journal one.
    assert fuelcard(server, "journal", "verify", "--anchor", str(anchors)) == 0
    assert fuelcard(server, "audit", "verify", "--anchor", str(anchors)) == 1
    # Someone with the owner's rights edits an entry and recomputes the chain.
    for table in ("fc.journal", "fc.journal_chain"):
        db.execute(f"ALTER TABLE {table} DISABLE TRIGGER ALL".encode())
    db.execute("UPDATE fc.journal SET description = 'rewritten' WHERE kind = 4")
    db.execute("DELETE FROM fc.journal_chain")
    for table in ("fc.journal", "fc.journal_chain"):
        db.execute(f"ALTER TABLE {table} ENABLE TRIGGER ALL".encode())
    _chain_all(server)
    assert verify.run(server.database_url) == []  # consistent in itself
    capsys.readouterr()
    assert fuelcard(server, "journal", "verify", "--anchor", str(anchors)) == 1
    out = capsys.readouterr()
    assert f"entry {head_id}: has another hash than the anchor" in out.out, out.out
    assert fuelcard(server, "journal", "anchor", "--file", str(anchors)) == 1
