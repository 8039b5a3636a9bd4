"""The load-test harness, for real: a short run against a live server, its
report, and the ledger check that must catch a lost fen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fuelcard_loadtest import cli, history, ledger, seed
from fuelcard_loadtest.seed import account_uid, card_number
from fuelcard_server import verify
from fuelcard_server.cards import is_valid_pan

from tests.plugins.server import TEST_KEY_HEX, RunningServer

PERCENTILE_KEYS = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")


def _run(server: RunningServer, tmp_path: Path, name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / f"{name}.json"
    code = cli.main([
        "--target", server.target, "--database-url", server.database_url,
        "--card-index-key-hex", TEST_KEY_HEX, "--scenario", "mixed", "--cards", "300",
        "--processes", "2", "--channels", "2", "--warmup-s", "0.5", "--drain-s", "5",
        "--no-progress", "--seed", "7", "--report", str(report), *extra])
    return code, json.loads(report.read_text())


def test_help_lists_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """--help used to crash on the "%" in a scenario's description."""
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "70 % personal" in " ".join(out.split())


def test_card_numbers_are_deterministic_and_luhn_valid() -> None:
    assert card_number(3, 12) == card_number(3, 12)
    assert card_number(3, 12) != card_number(4, 12)
    assert all(is_valid_pan(card_number(tag, i)) for tag in (1, 999) for i in (0, 1, 99_999))
    assert len(card_number(1, 0)) == 19


@pytest.mark.slow
def test_smoke_run_reports_and_a_planted_loss_fails_the_ledger_check(
        server: RunningServer, tmp_path: Path) -> None:
    plot = tmp_path / "run.png"
    code, r = _run(server, tmp_path, "run", "--concurrency", "8", "--duration-s", "3",
                   "--ceilings", "--ceilings-duration-s", "1", "--plot", str(plot))
    assert code == 0, r["failures"]

    for key in ("scenario", "duration_s", "ok", "declined", "errors", "throughput_per_s",
                "latency", "ledger", "ceilings"):
        assert key in r, key
    assert r["scenario"] == "mixed" and r["passed"] and r["failures"] == []
    assert 2.5 <= r["duration_s"] <= 10
    assert r["errors"] == {} and r["unresolved"] == []
    assert r["cycles"] > 0 and r["throughput_per_s"] > 0 and r["ok"] > r["cycles"]
    for rpc in ("authorize", "confirm"):
        s = r["latency"][rpc]
        values = [s[k] for k in PERCENTILE_KEYS]
        assert s["count"] > 0 and values[0] > 0, (rpc, s)
        assert values == sorted(values), (rpc, s)
    assert r["latency"]["confirm"]["count"] >= r["cycles"]

    led = r["ledger"]
    assert led["ok"] and led["verify_ok"] and led["open_holds"] == 0
    assert led["generator"] == led["ledger"]
    assert led["generator"]["confirmed_fen"] > 0 and led["generator"]["confirmed_count"] >= r["cycles"]

    c = r["ceilings"]
    assert c["framework"]["rpc_per_s"] > 0 and c["pgbench"]["cycles_per_s"] > 0
    assert c["pgbench"]["failed"] == 0
    assert c["ratio_vs_framework"] > 0 and c["ratio_vs_pgbench"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    seen = ledger.Seen(**led["generator"])
    since = ledger.Marks(**led["since"])
    assert ledger.check(server.database_url, r["run_id"], seen, since=since).ok

    # Plant a lost fen: one more fen of sales booked for one of the run's holds.
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,
                                       hold_id, created_at)
               SELECT 2, 1, h.account_id, fc.system_account(p_code => 'FUEL_SALES'), 1, h.id, now()
                 FROM fc.holds h WHERE h.station_id = %s AND h.state = 2 LIMIT 1""",
            (ledger.station(r["run_id"]),))
    planted = ledger.check(server.database_url, r["run_id"], seen, since=since)
    assert not planted.ok and not planted.verify_ok
    assert planted.ledger.confirmed_fen == seen.confirmed_fen + 1
    assert any("confirmed fen" in p and "difference 1" in p for p in planted.problems)
    assert {v["check"] for v in planted.violations} >= {"balance_equals_journal"}

    # A balance changed behind the ledger's back fails verify on its own, and
    # a run on a ledger that does not add up exits non-zero (open loop here).
    with psycopg.connect(server.database_url, autocommit=True) as conn:
        conn.execute("UPDATE fc.accounts SET balance_fen = balance_fen - 1 WHERE uid = %s",
                     (account_uid(r["dataset_tag"], 0),))
    code, again = _run(server, tmp_path, "again", "--rate", "60", "--duration-s", "1.5")
    assert code == 1 and not again["passed"]
    assert again["mode"] == "open" and again["open_loop"]["dropped"] == 0
    assert again["seed_reused"] and again["dataset_tag"] == r["dataset_tag"]
    assert not again["ledger"]["verify_ok"]
    # the second run's own money still adds up: only the planted rows are wrong
    assert again["ledger"]["generator"] == again["ledger"]["ledger"]


@pytest.mark.slow
def test_history_fills_the_tables_and_keeps_the_ledger_exact(
        server: RunningServer, tmp_path: Path) -> None:
    """The scale run's history generator at a tiny size: the planned counts,
    every row a past operation would have left, and `fuelcard verify` green;
    then a run on top of it passes its ledger check and reuses the data set."""
    key = bytes.fromhex(TEST_KEY_HEX)
    url = server.database_url
    dataset = seed.seed(url, key, "mixed", 1_000, history_entries=10_000, log=lambda _: None)
    assert dataset.complete and not dataset.reused
    plan = history.Plan.of(dataset.layout, 10_000)
    assert plan.sales > 0 and plan.recharges > 0
    assert dataset.accounts + 2 * plan.sales + plan.recharges == 10_000
    cancels = sum(plan.cancels_of(c) for c in range(1_000))

    with psycopg.connect(url, autocommit=True) as conn:
        def count(sql: str) -> int:
            row = conn.execute(sql.encode(), {"tag": dataset.tag}).fetchone()
            assert row is not None
            return int(row[0])

        accounts = ("SELECT a.id FROM fc.accounts a"
                    " WHERE a.uid::text LIKE '10ad7e57-' || lpad(to_hex(%(tag)s::integer), 4, '0') || '-%%'")
        assert count(f"SELECT count(*) FROM ({accounts}) x") == dataset.accounts
        assert count(f"SELECT count(*) FROM fc.journal WHERE credit_account_id IN ({accounts})"
                     f" OR debit_account_id IN ({accounts})") == 10_000
        assert count(f"SELECT count(*) FROM fc.holds WHERE account_id IN ({accounts})"
                     " AND state = 2") == plan.sales
        assert count(f"SELECT count(*) FROM fc.holds WHERE account_id IN ({accounts})"
                     " AND state = 3") == cancels
        assert count(f"SELECT count(*) FROM fc.recharges WHERE account_id IN ({accounts})"
                     ) == dataset.accounts + plan.recharges
        assert count(f"SELECT count(*) FROM fc.points_lots WHERE account_id IN ({accounts})"
                     ) == plan.sales
        assert count("SELECT count(*) FROM fc.idempotency_keys") >= (
            2 * (plan.sales + cancels) + plan.recharges)
        assert count("SELECT count(*) FROM fc.usage") >= plan.sales  # (card, day) at least
        assert count("SELECT count(DISTINCT month) FROM fc.monthly_spend") >= 12
        assert count("SELECT count(*) FROM fc.holds WHERE closed_at > now()") == 0
    assert verify.run(url) == []

    # Loading again finds it; a run on it passes the ledger check.
    again = seed.seed(url, key, "mixed", 1_000, history_entries=10_000, log=lambda _: None)
    assert again.reused and again.tag == dataset.tag
    code, r = _run(server, tmp_path, "history", "--cards", "1000", "--history-entries", "10000",
                   "--rate", "40", "--duration-s", "1")
    assert code == 0, r["failures"]
    assert r["seed_reused"] and r["dataset_tag"] == dataset.tag
    assert r["history_entries"] == 10_000 and r["database_mb"] > 0


def test_history_refuses_fewer_entries_than_opening_recharges(
        server: RunningServer, tmp_path: Path) -> None:
    code = cli.main(["--target", server.target, "--database-url", server.database_url,
                     "--card-index-key-hex", TEST_KEY_HEX, "--cards", "100",
                     "--history-entries", "99", "--duration-s", "1", "--no-progress"])
    assert code == 2
