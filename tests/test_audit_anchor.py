"""Anchoring the audit chain's head outside the database (issue 5, "Privacy
and audit"): `fuelcard audit anchor` appends the head, signed with the
server's SM2 key, to a file the operator keeps elsewhere; `fuelcard audit
verify --anchor FILE` fails once the chain no longer extends every anchored
head - a log cut short, or rewritten by someone with database rights who
recomputed every hash (which the chain alone cannot show) - and when a line
of the file was edited or made without the server's key.

Through the real server (its audited admin calls make the records) and the
command's code path; the attacks disable the append-only trigger as the
database superuser."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuelcard.v1 import account_pb2
from fuelcard_server import audit, audit_anchor, cli, gm, keys

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn


@pytest.fixture
def logged(server: RunningServer) -> Iterator[RunningServer]:
    """A development server (its admin calls are audited) with a few records."""
    card = builders.open_card(server)
    server.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=card.account_id))
    yield server


def more_records(server: RunningServer) -> None:
    card = builders.open_card(server)
    server.accounts.GetCard(account_pb2.GetCardRequest(card_id=card.card_id))


def fuelcard(server: RunningServer, *args: str) -> int:
    """The `fuelcard` command on the test server's database and data
    directory (where its SM2 key is)."""
    return cli.main([*args, "--database-url", server.database_url,
                     "--data-dir", str(server.settings.data_dir)])


def head(db: Conn) -> tuple[int, bytes]:
    row = db.execute("SELECT id, hash FROM fc.audit_log ORDER BY id DESC LIMIT 1").fetchone()
    assert row is not None
    return row[0], bytes(row[1])


def server_key(server: RunningServer) -> gm.Sm2PrivateKey:
    return gm.Sm2PrivateKey.from_hex(
        (server.settings.data_dir / "server-sm2.key").read_text().strip())


def test_anchors_are_signed_heads_appended_to_the_file(
        logged: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors = tmp_path / "elsewhere" / "audit-anchors.jsonl"
    anchors.parent.mkdir()
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    first = head(db)
    # Nothing new: nothing appended.
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    more_records(logged)
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    second = head(db)
    assert second[0] > first[0]
    lines = anchors.read_text().splitlines()
    assert len(lines) == 2
    public = server_key(logged).public_key
    for line, (record_id, digest) in zip(lines, (first, second), strict=True):
        d = json.loads(line)
        assert (d["format"], d["record_id"], d["hash"]) == (audit_anchor.FORMAT, record_id,
                                                            digest.hex())
        # The documented signing input, built here.
        at = dt.datetime.fromisoformat(d["anchored_at"])
        micros = (at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        signed = keys.canonical("AuditAnchor", record_id, digest, micros)
        assert gm.sm2_verify(public, signed, bytes.fromhex(d["signature"]))
    capsys.readouterr()
    assert fuelcard(logged, "audit", "verify", "--anchor", str(anchors)) == 0
    assert "extends all 2 anchored head(s)" in capsys.readouterr().out
    # Checked on a machine without the server's private key: its public key.
    assert cli.main(["audit", "verify", "--database-url", logged.database_url,
                     "--data-dir", str(tmp_path / "no-keys-here"), "--anchor", str(anchors),
                     "--public-key", public.to_hex()]) == 0


def test_a_log_cut_short_fails_against_its_anchor(
        logged: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors = tmp_path / "anchors"
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    last, _ = head(db)
    db.execute("ALTER TABLE fc.audit_log DISABLE TRIGGER audit_log_append_only")
    db.execute("DELETE FROM fc.audit_log WHERE id >= %s", (last - 1,))
    db.execute("ALTER TABLE fc.audit_log ENABLE TRIGGER audit_log_append_only")
    assert audit.verify(logged.database_url) == []  # the chain alone cannot tell
    capsys.readouterr()
    assert fuelcard(logged, "audit", "verify", "--anchor", str(anchors)) == 1
    out = capsys.readouterr()
    assert f"audit log broken at record {last}: is missing" in out.err, out.err
    # Nor will it anchor the shortened chain.
    before = anchors.read_bytes()
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 1
    assert anchors.read_bytes() == before


def test_a_rewritten_chain_fails_against_an_earlier_anchor(
        logged: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Record 2 deleted, the later ones renumbered and rechained with the
    log's own functions; new records added on top, so the head moves on."""
    anchors = tmp_path / "anchors"
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    anchored, _ = head(db)
    more_records(logged)
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    db.execute("ALTER TABLE fc.audit_log DISABLE TRIGGER audit_log_append_only")
    db.execute("DELETE FROM fc.audit_log WHERE id = 2")
    db.execute("UPDATE fc.audit_log SET id = id - 1 WHERE id > 2")  # ascending: no clash
    last, _ = head(db)
    for record_id in range(2, last + 1):
        db.execute("""
            UPDATE fc.audit_log l
               SET prev_hash = p.hash,
                   hash = fc.sm3(p_data => p.hash || fc.audit_canonical(
                       p_id => l.id, p_created_at => l.created_at, p_actor => l.actor,
                       p_method => l.method, p_target => l.target, p_outcome => l.outcome))
              FROM fc.audit_log p WHERE p.id = l.id - 1 AND l.id = %s""", (record_id,))
    db.execute("SELECT setval(pg_get_serial_sequence('fc.audit_log', 'id'), %s)", (last,))
    db.execute("ALTER TABLE fc.audit_log ENABLE TRIGGER audit_log_append_only")
    more_records(logged)
    assert audit.verify(logged.database_url) == []
    capsys.readouterr()
    assert fuelcard(logged, "audit", "verify", "--anchor", str(anchors)) == 1
    out = capsys.readouterr()
    assert f"audit log broken at record {anchored}: has a different hash" in out.err, out.err
    lines = anchors.read_text().splitlines()
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 1
    assert anchors.read_text().splitlines() == lines


def test_an_edited_or_forged_anchor_line_is_not_trusted(
        logged: RunningServer, db: Conn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchors = tmp_path / "anchors"
    assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 0
    genuine = anchors.read_text()
    record_id, digest = head(db)
    # Someone who can write the file but lacks the server's key moves the
    # anchor back to fit a shortened chain: signed by another key, or not re-signed.
    other_key = gm.Sm2PrivateKey.generate()
    at = dt.datetime.now(dt.UTC)
    forged = audit_anchor.Anchor.make(other_key, 1, head_bytes(db, 1), at).to_line()
    edited = json.loads(genuine)
    edited["record_id"], edited["hash"] = 1, head_bytes(db, 1).hex()
    for label, text in {"other key": forged, "edited": json.dumps(edited) + "\n",
                        "garbage": genuine + "not an anchor\n"}.items():
        anchors.write_text(text)
        capsys.readouterr()
        assert fuelcard(logged, "audit", "verify", "--anchor", str(anchors)) == 1, label
        out = capsys.readouterr()
        assert "anchor file not trusted" in out.err, (label, out.err)
        assert fuelcard(logged, "audit", "anchor", "--file", str(anchors)) == 1, label
        assert anchors.read_text() == text, label
    # A missing file cannot be read (exit 2); an empty one checks nothing:
    # refused rather than passed.
    assert fuelcard(logged, "audit", "verify", "--anchor", str(tmp_path / "absent")) == 2
    anchors.write_text("")
    assert fuelcard(logged, "audit", "verify", "--anchor", str(anchors)) == 1
    anchors.write_text(genuine)
    assert fuelcard(logged, "audit", "verify", "--anchor", str(anchors)) == 0
    assert audit_anchor.read(anchors, server_key(logged).public_key)[0].record_id == record_id
    assert audit_anchor.read(anchors, server_key(logged).public_key)[0].hash == digest


def head_bytes(db: Conn, record_id: int) -> bytes:
    row = db.execute("SELECT hash FROM fc.audit_log WHERE id = %s", (record_id,)).fetchone()
    assert row is not None
    return bytes(row[0])
