"""The load-test harness, for real: a short run against a live server, its
report, and the ledger check that must catch a lost fen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from fuelcard_loadtest import cli, ledger
from fuelcard_loadtest.seed import account_uid, card_number
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


def test_card_numbers_are_deterministic_and_luhn_valid() -> None:
    assert card_number(3, 12) == card_number(3, 12)
    assert card_number(3, 12) != card_number(4, 12)
    assert all(is_valid_pan(card_number(tag, i)) for tag in (1, 999) for i in (0, 1, 99_999))
    assert len(card_number(1, 0)) == 19


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
               SELECT 2, 1, h.account_id, fc.system_account('FUEL_SALES'), 1, h.id, now()
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
