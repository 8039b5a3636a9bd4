"""`fuelcard-loadtest ab`: the same load run against two checkouts,
alternated (A B, B A, A B, ...: which side goes first changes every pair, so
a drift in what else the machine does favours neither), with a markdown
table of every run and the medians.

    fuelcard-loadtest ab --a /work/wt-base --b . [--runs 3] [--label-a main --label-b lever]
        [--markdown ab.md] [--work-dir DIR] -- --scenario uniform --cards 20000 --duration-s 15

Each side runs in its own checkout's virtual environment (DIR/.venv): its
server code, its SQL, its dependencies. The load generator is, by default,
this one (`--generator self`: this package on the side's Python path ahead
of the side's own), so that the measuring instrument is the same on both
sides and only the server differs; `--generator each` runs each side's own
`fuelcard-loadtest` instead. Each side keeps its data directory for all its
runs (under --work-dir): its first run seeds it (a `--reseed` among the run
options applies to that first run only), the others reuse the data set.
--args-a/--args-b add options to one side only: `--a . --b .
--args-a=--insecure` measures what production mode costs on one checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fuelcard_loadtest

# The options ab sets itself on every run.
OWN_OPTIONS = ("--data-dir", "--report")


@dataclass(frozen=True)
class Side:
    label: str
    checkout: Path
    data_dir: Path
    # run options of this side only, after the common ones
    extra: tuple[str, ...] = ()

    def python(self) -> Path:
        return self.checkout / ".venv" / "bin" / "python"


def loadtest_dir() -> Path:
    """The directory holding this fuelcard_loadtest package."""
    return Path(fuelcard_loadtest.__file__).resolve().parents[1]


def command(side: Side, args: Sequence[str], report: Path, generator: str
            ) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    tail = [*args, *side.extra, "--data-dir", str(side.data_dir), "--report", str(report),
            *([] if "--no-progress" in args else ["--no-progress"])]
    if generator == "each":
        return [str(side.checkout / ".venv" / "bin" / "fuelcard-loadtest"), *tail], env
    env["PYTHONPATH"] = os.pathsep.join(
        [str(loadtest_dir()), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return [str(side.python()), "-m", "fuelcard_loadtest.cli", *tail], env


def run_one(side: Side, args: Sequence[str], report: Path, log: Path, generator: str,
            say: Callable[[str], None]) -> dict[str, Any]:
    """One load run of one side; its JSON report with what ab adds (side,
    exit code, load average before it, wall time)."""
    cmd, env = command(side, args, report, generator)
    load = os.getloadavg()
    t0 = time.monotonic()
    report.unlink(missing_ok=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False).returncode
    if code == 2 or not report.exists():
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{side.label}: the run failed (exit {code}); {log}:\n{tail}")
    r: dict[str, Any] = json.loads(report.read_text())
    r["ab"] = {"side": side.label, "checkout": str(side.checkout), "exit": code,
               "load_avg_before": [round(x, 2) for x in load],
               "wall_s": round(time.monotonic() - t0, 1), "log": str(log)}
    say(f"  {side.label}: {r['throughput_per_s']:.1f} cycles/s,"
        f" {'passed' if r.get('passed') else 'FAILED'} (load average {load[0]:.2f} before)")
    return r


# -- figures of a report -----------------------------------------------------------

def _res(key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(r: dict[str, Any]) -> float | None:
        v = (r.get("resources") or {}).get(key)
        return None if v is None else float(v)
    return get


def _latency(rpc: str, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(r: dict[str, Any]) -> float | None:
        v = (r.get("latency") or {}).get(rpc, {}).get(key)
        return None if v is None else float(v)
    return get


def _ratio(r: dict[str, Any]) -> float | None:
    c = r.get("ceilings")
    return None if not c else float(c["ratio_vs_framework"])


def _passed(r: dict[str, Any]) -> float | None:
    return 1.0 if r.get("passed") else 0.0


def _load(r: dict[str, Any]) -> float | None:
    ab = r.get("ab") or {}
    load = ab.get("load_avg_before") or r.get("load_avg_start")
    return None if not load else float(load[0])


# (column, how to read it, decimals)
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], float | None], int]] = [
    ("cycles/s", lambda r: float(r["throughput_per_s"]), 1),
    ("server µs/cycle", _res("server_cpu_us_per_cycle"), 0),
    ("PostgreSQL µs/cycle", _res("postgres_cpu_us_per_cycle"), 0),
    ("generator µs/cycle", _res("generator_cpu_us_per_cycle"), 0),
    ("WAL B/cycle", _res("wal_bytes_per_cycle"), 0),
    ("WAL records/cycle", _res("wal_records_per_cycle"), 1),
    # full-page images (≈ 8 kB each): the first change of a page after a checkpoint
    ("WAL FPI/cycle", _res("wal_fpi_per_cycle"), 2),
    ("commits/cycle", _res("commits_per_cycle"), 2),
    ("WAL flushes/cycle", _res("wal_flushes_per_cycle"), 2),
    ("authorize p50 ms", _latency("authorize", "p50_ms"), 2),
    ("authorize p99 ms", _latency("authorize", "p99_ms"), 2),
    ("confirm p99 ms", _latency("confirm", "p99_ms"), 2),
    ("÷ (no-op/2)", _ratio, 3),
    ("ledger ok", _passed, 0),
    ("load avg", _load, 2),
]


def _cell(v: float | None, digits: int, column: str) -> str:
    if v is None:
        return "–"
    if column == "ledger ok":
        return "yes" if v >= 1 else "NO"
    return f"{v:,.{digits}f}".replace(",", " ")


def median(reports: Sequence[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]
           ) -> float | None:
    values = [v for v in (get(r) for r in reports) if v is not None]
    return float(statistics.median(values)) if values else None


def table(groups: Sequence[tuple[str, Sequence[dict[str, Any]]]], order: Sequence[dict[str, Any]]
          ) -> str:
    """Markdown: every run in the order it ran, then each group's medians
    (ledger: the share of its runs that passed), then B ÷ A of two groups."""
    head = ["run", "side", *(c for c, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(order, 1):
        side = (r.get("ab") or {}).get("side", r.get("scenario", ""))
        lines.append("| " + " | ".join([str(i), side, *(_cell(get(r), d, c)
                                                         for c, get, d in COLUMNS)]) + " |")
    medians: list[list[float | None]] = []
    for label, reports in groups:
        row = [median(reports, get) for _, get, _ in COLUMNS]
        medians.append(row)
        cells = [_cell(v, d, c) for v, (c, _, d) in zip(row, COLUMNS, strict=True)]
        passed = sum(1 for r in reports if r.get("passed"))
        cells[[c for c, _, _ in COLUMNS].index("ledger ok")] = f"{passed}/{len(reports)}"
        lines.append("| " + " | ".join(["**median**", f"**{label}**", *cells]) + " |")
    if len(groups) == 2:
        cells = []
        for a, b, (c, _, _) in zip(medians[0], medians[1], COLUMNS, strict=True):
            shown = a and b is not None and c not in ("ledger ok", "load avg")
            cells.append(f"{b / a:.3f}" if shown and a and b is not None else "")
        lines.append("| " + " | ".join(["ratio", f"{groups[1][0]} ÷ {groups[0][0]}", *cells])
                     + " |")
    return "\n".join(lines) + "\n"


def _mode(r: dict[str, Any]) -> str:
    sec = r.get("security") or {}
    if sec:
        mode = "mutual TLS + MACs" if sec.get("mutual_tls") else "plaintext, no MACs"
    else:
        mode = "plaintext, no MACs" if r.get("insecure", True) else "?"
    return f"{mode}, controls {'on' if r.get('controls') else 'off'}"


def conditions(reports: Sequence[dict[str, Any]]) -> str:
    """What ran, where, when, under what load; each side's mode, commits
    and command."""
    if not reports:
        return ""
    r = reports[0]
    loads = [v for v in (_load(x) for x in reports) if v is not None]
    machine = r.get("machine") or {}
    text = (f"{r['scenario']}, {r['mode']} loop"
            + (f" c={r['concurrency']}" if r.get("concurrency") else f" {r.get('rate_per_s')}/s")
            + f", {r['cards']} cards, {r['duration_s']:.0f} s measured per run,"
            f" {r.get('server_workers')} server processes; {machine.get('cpus')} CPUs"
            f" ({machine.get('cpu_model')}), shared; load average before the runs"
            f" {min(loads, default=0):.2f}–{max(loads, default=0):.2f};"
            f" started {str(r.get('started_at', '?'))[:16]} UTC.\n")
    seen: set[str] = set()
    for x in reports:
        side = str((x.get("ab") or {}).get("side", x.get("scenario", "?")))
        if side in seen:
            continue
        seen.add(side)
        text += (f"- {side}: {_mode(x)}; server commit {x.get('server_commit')}, generator"
                 f" {x.get('commit')}; `{x.get('command')}`\n")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuelcard-loadtest ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="checkout A (with its .venv)")
    p.add_argument("--b", type=Path, required=True, help="checkout B (with its .venv)")
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    p.add_argument("--args-a", default="", metavar="OPTIONS",
                   help="run options for side A only, e.g. \"--insecure --no-controls\"")
    p.add_argument("--args-b", default="", metavar="OPTIONS", help="run options for side B only")
    p.add_argument("--runs", type=int, default=3, help="runs of each side (default 3)")
    p.add_argument("--work-dir", type=Path,
                   help="data directories (a/, b/), reports and logs; kept (default: a temporary"
                   " one, removed afterwards unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--generator", choices=("self", "each"), default="self",
                   help="self: this load generator on both sides (default); each: each"
                   " checkout's own fuelcard-loadtest")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    p.add_argument("--json", type=Path, help="write every run's report here (a JSON list)")
    return p


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    mine, run_args = split_args(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(mine)
    clash = [o for o in OWN_OPTIONS if any(a == o or a.startswith(o + "=") for a in run_args)]
    if clash:
        p.error(f"ab sets {', '.join(clash)} itself: leave it out of the run options")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.label_a == args.label_b:
        p.error("--label-a and --label-b must differ")
    for d in (args.a, args.b):
        if not (d / ".venv" / "bin" / "python").exists():
            p.error(f"{d} has no .venv (run scripts/bootstrap there)")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fuelcard-ab-"))
    work = work.resolve()
    (work / "reports").mkdir(parents=True, exist_ok=True)
    sides = (Side(args.label_a, args.a.resolve(), work / "a", tuple(shlex.split(args.args_a))),
             Side(args.label_b, args.b.resolve(), work / "b", tuple(shlex.split(args.args_b))))

    def say(text: str) -> None:
        print(text, flush=True)

    reseed = "--reseed" in run_args
    plain = [a for a in run_args if a != "--reseed"]
    order: list[dict[str, Any]] = []
    by_side: dict[str, list[dict[str, Any]]] = {s.label: [] for s in sides}
    try:
        for i in range(args.runs):
            pair = sides if i % 2 == 0 else sides[::-1]
            for side in pair:
                n = len(by_side[side.label]) + 1
                first = n == 1
                say(f"run {len(order) + 1}/{2 * args.runs}: {side.label} #{n} ({side.checkout})"
                    + (" — seeds or reuses its data set" if first else ""))
                stem = f"{side.label}-{n}".replace("/", "_")
                r = run_one(side, [*plain, *(["--reseed"] if reseed and first else [])],
                            work / "reports" / f"{stem}.json", work / "reports" / f"{stem}.log",
                            args.generator, say)
                order.append(r)
                by_side[side.label].append(r)
    finally:
        if order:
            text = table([(s.label, by_side[s.label]) for s in sides], order)
            text = text + "\n" + conditions(order)
            say("")
            say(text)
            write_outputs(args, text, order, say)
        clean_up(args, work, say)
    return 0 if all(r.get("passed") for r in order) else 1


def write_outputs(args: argparse.Namespace, text: str, order: Sequence[dict[str, Any]],
                  say: Callable[[str], None]) -> None:
    """--markdown: the table; --json: every run's report without its timelines (ab and targets)."""
    if args.markdown is not None:
        args.markdown.write_text(text)
        say(f"table written to {args.markdown}")
    if args.json is not None:
        args.json.write_text(json.dumps(
            [{k: v for k, v in r.items() if k not in ("timeline", "throughput_timeline")}
             for r in order], indent=2) + "\n")


def clean_up(args: argparse.Namespace, work: Path, say: Callable[[str], None]) -> None:
    """A temporary work directory goes; a given one (or --keep) stays (ab and targets)."""
    if args.work_dir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"work directory kept: {work}")
