"""`fuelcard-loadtest targets`: issue 17's targets in one command.

Per round: a uniform closed-loop run with same-run ceilings (no-op RPC and
pgbench), then a hot-fleet closed-loop run and an open-loop uniform run at
half the cycles/s that round's uniform run reached (these two alternate
which goes first). `--runs` rounds; the table gives every run and each
target against the medians: PostgreSQL CPU per cycle ≤ 1 000 µs, WAL per
cycle ≤ 4 000 bytes and server CPU per cycle ≤ 900 µs (uniform); uniform
cycles/s ≥ 0.33 × (no-op RPC/s ÷ 2); hot-fleet ≥ 90 % of uniform;
open-loop p99 ≤ 10 ms; every run's ledger check passes. Production mode
(mutual TLS, MACs, controls) unless the run options say otherwise.

    fuelcard-loadtest targets [--runs 3] [--duration-s 15] [--cards 20000] [--checkout DIR]
        [--markdown FILE] -- <more run options, e.g. --workers 1>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuelcard_loadtest import ab


@dataclass(frozen=True)
class Target:
    text: str
    measured: Callable[[dict[str, list[dict[str, Any]]]], float | None]
    show: Callable[[float], str]
    met: Callable[[float], bool]


def _med(kind: str, get: Callable[[dict[str, Any]], float | None]
         ) -> Callable[[dict[str, list[dict[str, Any]]]], float | None]:
    return lambda runs: ab.median(runs[kind], get)


def _open_p99(r: dict[str, Any]) -> float | None:
    lat = r.get("latency") or {}
    values = [lat[rpc]["p99_ms"] for rpc in ("authorize", "confirm") if rpc in lat]
    return max(values) if values else None


def _hot_share(runs: dict[str, list[dict[str, Any]]]) -> float | None:
    hot = ab.median(runs["hot-fleet"], lambda r: float(r["throughput_per_s"]))
    uni = ab.median(runs["uniform"], lambda r: float(r["throughput_per_s"]))
    return hot / uni if hot is not None and uni else None


def _ledgers(runs: dict[str, list[dict[str, Any]]]) -> float | None:
    every = [r for rs in runs.values() for r in rs]
    return sum(1 for r in every if r.get("passed")) / len(every) if every else None


TARGETS = [
    Target("PostgreSQL CPU per cycle ≤ 1 000 µs (uniform)",
           _med("uniform", ab._res("postgres_cpu_us_per_cycle")), lambda v: f"{v:.0f} µs",
           lambda v: v <= 1000),
    Target("WAL per cycle ≤ 4 000 bytes (uniform)", _med("uniform", ab._res("wal_bytes_per_cycle")),
           lambda v: f"{v:.0f} B", lambda v: v <= 4000),
    Target("server CPU per cycle ≤ 900 µs (uniform)",
           _med("uniform", ab._res("server_cpu_us_per_cycle")), lambda v: f"{v:.0f} µs",
           lambda v: v <= 900),
    Target("uniform cycles/s ≥ 0.33 × (no-op RPC/s ÷ 2), same run", _med("uniform", ab._ratio),
           lambda v: f"{v:.3f} ×", lambda v: v >= 0.33),
    Target("hot-fleet cycles/s ≥ 90 % of uniform", _hot_share, lambda v: f"{100 * v:.0f} %",
           lambda v: v >= 0.9),
    Target("open-loop p99 ≤ 10 ms at half the uniform maximum (worse of authorize, confirm)",
           _med("open", _open_p99), lambda v: f"{v:.2f} ms", lambda v: v <= 10.0),
    Target("every run's ledger check passes", _ledgers, lambda v: f"{100 * v:.0f} % of runs",
           lambda v: v >= 1.0),
]


def target_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| target | measured (median) | |", "|---|---|---|"]
    for t in TARGETS:
        v = t.measured(runs)
        lines.append(f"| {t.text} | {'–' if v is None else t.show(v)} |"
                     f" {'–' if v is None else 'met' if t.met(v) else '**missed**'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuelcard-loadtest targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--duration-s", type=float, default=15.0, help="per run (default 15)")
    p.add_argument("--ceilings-duration-s", type=float, default=10.0,
                   help="each same-run ceiling of the uniform runs (default 10)")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop (default 64)")
    p.add_argument("--cards", type=int, default=100_000,
                   help="cards of the uniform runs, closed and open loop (default 100000)")
    p.add_argument("--hot-cards", type=int, default=500,
                   help="cards of the hot-fleet runs, all on one account (default 500)")
    p.add_argument("--checkout", type=Path,
                   help="the checkout whose server to measure (default: this one)")
    p.add_argument("--work-dir", type=Path, help="data directory, reports and logs; kept"
                   " (default: a temporary one, removed afterwards unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    p.add_argument("--json", type=Path, help="write every run's report here (a JSON list)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    mine, run_args = ab.split_args(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(mine)
    owned = ("--scenario", "--rate", "--concurrency", "--duration-s", "--ceilings", "--cards",
             *ab.OWN_OPTIONS)
    clash = [o for o in owned if any(a == o or a.startswith(o + "=") for a in run_args)]
    if clash:
        p.error(f"targets sets {', '.join(clash)} itself")
    if args.runs < 1 or args.duration_s <= 0:
        p.error("need --runs >= 1 and --duration-s > 0")
    checkout = (args.checkout or ab.loadtest_dir().parent).resolve()
    if not (checkout / ".venv" / "bin" / "python").exists():
        p.error(f"{checkout} has no .venv")
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="fuelcard-targets-"))).resolve()
    (work / "reports").mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, flush=True)

    common = ["--duration-s", f"{args.duration_s:g}", *run_args]
    closed = ["--concurrency", str(args.concurrency)]
    cards = ["--cards", str(args.cards)]
    runs: dict[str, list[dict[str, Any]]] = {"uniform": [], "hot-fleet": [], "open": []}
    order: list[dict[str, Any]] = []
    reseed = "--reseed" in common
    common = [a for a in common if a != "--reseed"]

    def one(kind: str, extra: list[str]) -> dict[str, Any]:
        n = len(runs[kind]) + 1
        side = ab.Side(kind, checkout, work / "data")
        first = not runs[kind]
        say(f"run {len(order) + 1}/{3 * args.runs}: {kind} #{n}")
        r = ab.run_one(side, [*common, *extra,
                              *(["--reseed"] if reseed and first and kind != "open" else [])],
                       work / "reports" / f"{kind}-{n}.json", work / "reports" / f"{kind}-{n}.log",
                       "self", say)
        runs[kind].append(r)
        order.append(r)
        return r

    try:
        for i in range(args.runs):
            uniform = one("uniform", ["--scenario", "uniform", *cards, *closed, "--ceilings",
                                      "--ceilings-duration-s", f"{args.ceilings_duration_s:g}"])
            rate = max(uniform["throughput_per_s"] / 2, 1.0)
            others: list[tuple[str, list[str]]] = [
                ("hot-fleet", ["--scenario", "hot-fleet", "--cards", str(args.hot_cards), *closed]),
                ("open", ["--scenario", "uniform", *cards, "--rate", f"{rate:.1f}"])]
            for kind, extra in (others if i % 2 == 0 else others[::-1]):
                one(kind, extra)
    finally:
        if order:
            text = ("### Targets (medians)\n\n" + target_table(runs) + "\n### Runs\n\n"
                    + ab.table([(k, v) for k, v in runs.items() if v], order) + "\n"
                    + ab.conditions(runs["uniform"] or order))
            say("")
            say(text)
            ab.write_outputs(args, text, order, say)
        ab.clean_up(args, work, say)
    return 0 if all(r.get("passed") for r in order) else 1
