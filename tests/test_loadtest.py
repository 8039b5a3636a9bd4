"""The load-test harness, for real: a short run against a live server, its
report, and the ledger check that must catch a lost fen; the production
mode (mutual TLS, signed-on terminals, MACs) that is the default, the
per-cycle database and CPU figures, and the A/B driver."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fuelcard_loadtest import cli, history, ledger, seed, targets
from fuelcard_loadtest.seed import account_uid, card_number
from fuelcard_server import verify
from fuelcard_server.cards import is_valid_pan

from tests.plugins.server import TEST_KEY_HEX, RunningServer, TlsServer

PERCENTILE_KEYS = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")
ROOT = Path(__file__).resolve().parents[1]
# what a run's report gives per pump cycle (resources)
PER_CYCLE = ("wal_bytes_per_cycle", "wal_records_per_cycle", "commits_per_cycle",
             "wal_flushes_per_cycle")
CPU_PER_CYCLE = ("server_cpu_us_per_cycle", "postgres_cpu_us_per_cycle",
                 "generator_cpu_us_per_cycle")
TINY = ("--scenario", "uniform", "--cards", "40", "--concurrency", "4", "--processes", "1",
        "--warmup-s", "0.3", "--drain-s", "5", "--no-progress", "--seed", "7")


def _run(server: RunningServer, tmp_path: Path, name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """A run against the plaintext test server: --insecure."""
    report = tmp_path / f"{name}.json"
    code = cli.main([
        "--insecure", "--target", server.target, "--database-url", server.database_url,
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
    code = cli.main(["--insecure", "--target", server.target, "--database-url", server.database_url,
                     "--card-index-key-hex", TEST_KEY_HEX, "--cards", "100",
                     "--history-entries", "99", "--duration-s", "1", "--no-progress"])
    assert code == 2


def _plausible_per_cycle(r: dict[str, Any], keys: tuple[str, ...]) -> None:
    res = r["resources"]
    for key in keys:
        assert key in res, key
    assert 100 < res["wal_bytes_per_cycle"] < 1_000_000, res
    assert 1 < res["wal_records_per_cycle"] < 10_000, res
    # authorize and confirm are a commit each; the statistics lag by up to a second
    assert 0.5 < res["commits_per_cycle"] < 50, res
    assert 0 < res["wal_flushes_per_cycle"] < 50, res
    assert r["database_window"]["wal_bytes"] > 0 and r["database_window"]["commits"] > 0


def test_the_default_run_is_mutual_tls_with_macs_and_reports_per_cycle_costs(
        tmp_path: Path) -> None:
    """No --target: the server the load test starts serves mutual TLS and
    requires MACs; every terminal signs on and MACs its requests, and the
    server advanced a counter for each of them (which it does only for a
    terminal certificate's MAC'd request). Controls are on."""
    report = tmp_path / "default.json"
    # Not under tmp_path: PostgreSQL runs as another user when we are root and
    # must traverse the data directory's parents, and pytest keeps its own
    # base directory owner-only (and resets it when another session starts).
    with tempfile.TemporaryDirectory(prefix="fuelcard-loadtest-test-") as tmp:
        data = Path(tmp) / "data"
        code = cli.main([*TINY, "--duration-s", "3", "--data-dir", str(data),
                         "--report", str(report), "--ceilings", "--ceilings-duration-s", "1"])
        certs = data / "loadtest-certs"
        kept = sorted(p.name for p in certs.iterdir())
    r = json.loads(report.read_text())
    assert code == 0, r["failures"]
    assert r["passed"] and r["insecure"] is False and r["controls"] is True
    command = r["server_command"]
    assert "--tls-dir" in command and "--insecure" not in command
    sec = r["security"]
    assert sec["mode"] == "production" and sec["mutual_tls"] and sec["macs"]
    assert sec["terminals"] == sec["server_terminals"] == 4
    assert sec["mac_requests"] >= 2 * r["cycles"] > 0
    assert sec["server_counters_advanced"] == sec["mac_requests"]
    assert r["errors"] == {} and r["ledger"]["ok"]
    _plausible_per_cycle(r, PER_CYCLE + CPU_PER_CYCLE)
    # the same-run ceilings: the no-op RPC over the terminals' TLS channels, and
    # pgbench passing a terminal and a counter as the server does for one
    c = r["ceilings"]
    assert c["framework"]["rpc_per_s"] > 0 and c["framework"]["errors"] == {}
    assert c["pgbench"]["cycles_per_s"] > 0 and c["pgbench"]["failed"] == 0
    assert not {"authorize.p_counter", "confirm.p_counter", "confirm.p_terminal"} & set(
        c["pgbench"]["null_parameters"])
    for key in CPU_PER_CYCLE:
        assert 10 < r["resources"][key] < 1_000_000, (key, r["resources"])
    # the run's terminal certificates are gone; the CA's, the server's and the admin's stay
    assert kept == ["admin-loadtest.key", "admin-loadtest.pem", "ca.key", "ca.pem", "server.key",
                    "server.pem"]


def test_insecure_still_runs_plaintext_and_unsigned(server: RunningServer, tmp_path: Path) -> None:
    code, r = _run(server, tmp_path, "insecure", *TINY, "--duration-s", "2", "--no-controls")
    assert code == 0, r["failures"]
    assert r["insecure"] is True and r["controls"] is False
    sec = r["security"]
    assert sec["mode"] == "insecure" and not sec["mutual_tls"] and not sec["macs"]
    assert sec["mac_requests"] == 0 and sec["server_counters_advanced"] == 0
    assert r["cycles"] > 0 and r["server_command"] is None
    # an external server: the database's figures and the generator's CPU, not the server's
    _plausible_per_cycle(r, (*PER_CYCLE, "generator_cpu_us_per_cycle"))
    assert "server_cpu_us_per_cycle" not in r["resources"]
    assert "postgres_cpu_us_per_cycle" not in r["resources"]


def test_a_target_needs_its_ca_or_insecure(server: RunningServer, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--target", server.target, "--database-url", server.database_url,
            "--card-index-key-hex", TEST_KEY_HEX, "--duration-s", "1", "--no-progress"]
    assert cli.main(base) == 2
    assert "--target needs --tls-dir" in capsys.readouterr().err
    assert cli.main([*base, "--tls-dir", str(tmp_path)]) == 2
    assert "no ca.pem or ca.key there" in capsys.readouterr().err


def test_ab_alternates_two_checkouts_and_tabulates_them(
        tls_server: TlsServer, tmp_path: Path) -> None:
    """`ab` with this checkout on both sides, one run each, against a mutual
    TLS server (--target: no server start-up to wait for); side two's own
    option turns its controls off."""
    markdown, every = tmp_path / "ab.md", tmp_path / "ab.json"
    code = cli.main([
        "ab", "--a", str(ROOT), "--b", str(ROOT), "--runs", "1", "--label-a", "one",
        "--label-b", "two", "--args-b=--no-controls", "--work-dir", str(tmp_path / "ab"),
        "--markdown", str(markdown),
        "--json", str(every), "--",
        "--target", tls_server.target, "--database-url", tls_server.database_url,
        "--tls-dir", str(tls_server.certs), "--card-index-key-hex", TEST_KEY_HEX,
        *TINY, "--duration-s", "1"])
    runs = json.loads(every.read_text())
    assert code == 0, [r["failures"] for r in runs]
    assert [r["ab"]["side"] for r in runs] == ["one", "two"]
    assert [r["controls"] for r in runs] == [True, False]
    assert all(r["passed"] and r["security"]["macs"] for r in runs)
    assert runs[1]["seed_reused"] and runs[1]["dataset_tag"] == runs[0]["dataset_tag"]
    lines = markdown.read_text().splitlines()
    assert lines[0].startswith("| run | side | cycles/s | server µs/cycle | PostgreSQL µs/cycle")
    assert "WAL B/cycle" in lines[0] and "commits/cycle" in lines[0] and "load avg" in lines[0]
    rows = [line for line in lines if line.startswith("| ")][1:]
    assert [row.split(" | ")[1] for row in rows] == ["one", "two", "**one**", "**two**",
                                                     "two ÷ one"]
    medians = [row for row in rows if row.startswith("| **median**")]
    assert all("| 1/1 |" in row for row in medians)
    cycles = [float(row.split(" | ")[2].replace(" ", "")) for row in rows[:2]]
    assert cycles == [round(r["throughput_per_s"], 1) for r in runs]
    text = markdown.read_text()
    assert "- one: mutual TLS + MACs, controls on;" in text
    assert "- two: mutual TLS + MACs, controls off;" in text


def test_the_targets_table_says_met_or_missed_against_the_medians() -> None:
    def run(cycles: float, pg: float, wal: float, srv: float, ratio: float | None, p99: float,
            passed: bool = True) -> dict[str, Any]:
        return {"throughput_per_s": cycles, "passed": passed,
                "resources": {"postgres_cpu_us_per_cycle": pg, "wal_bytes_per_cycle": wal,
                              "server_cpu_us_per_cycle": srv},
                "ceilings": {"ratio_vs_framework": ratio} if ratio is not None else None,
                "latency": {"authorize": {"p99_ms": p99}, "confirm": {"p99_ms": p99 / 2}}}

    runs = {"uniform": [run(500, 900, 5000, 800, 0.35, 30), run(400, 1100, 3000, 1000, 0.30, 30),
                        run(450, 950, 4500, 850, 0.34, 30)],
            "hot-fleet": [run(420, 1, 1, 1, None, 1), run(400, 1, 1, 1, None, 1)],
            "open": [run(225, 1, 1, 1, None, 9.0), run(225, 1, 1, 1, None, 12.0, passed=False)]}
    rows = targets.target_table(runs).splitlines()[2:]
    assert rows == [
        "| PostgreSQL CPU per cycle ≤ 1 000 µs (uniform) | 950 µs | met |",
        "| WAL per cycle ≤ 4 000 bytes (uniform) | 4500 B | **missed** |",
        "| server CPU per cycle ≤ 900 µs (uniform) | 850 µs | met |",
        "| uniform cycles/s ≥ 0.33 × (no-op RPC/s ÷ 2), same run | 0.340 × | met |",
        "| hot-fleet cycles/s ≥ 90 % of uniform | 91 % | met |",
        "| open-loop p99 ≤ 10 ms at half the uniform maximum (worse of authorize, confirm)"
        " | 10.50 ms | **missed** |",
        "| every run's ledger check passes | 86 % of runs | **missed** |"]
