"""`fuelcard-loadtest`: drive a fuelcard server with pump cycles and measure it.

Without --target it starts its own server (`fuelcard serve` on the embedded
PostgreSQL, in a temporary or the given --data-dir) and stops it afterwards.
By default the run is production-like: the server serves mutual TLS and
requires terminal MACs, every generator terminal has its own certificate,
signs on and MACs every Authorize/Confirm/Cancel, and every card carries
spending controls; --insecure (plaintext, unsigned) and --no-controls turn
that off. The report gives, per pump cycle, the CPU of the server,
PostgreSQL and the generator, and the WAL bytes, WAL records, commits and
WAL flushes of the measured window.
Exit status: 0 when the run passed (ledger consistent, every fen the server
moved is one the generator saw confirmed, every outcome known), 1 when it
failed, 2 on bad arguments.

Examples:
  fuelcard-loadtest --scenario uniform --concurrency 64 --duration-s 30 --ceilings \\
      --report uniform.json --plot uniform.png
  fuelcard-loadtest --scenario hot-fleet --concurrency 64
  fuelcard-loadtest --scenario uniform --rate 400          # open loop
  fuelcard-loadtest --insecure --no-controls               # the old plaintext mode

Three more commands (each has --help):
  fuelcard-loadtest ab --a DIR_A --b DIR_B [--runs 3] -- <run options>
      alternated A/B runs of two checkouts, with a markdown table of medians
  fuelcard-loadtest targets [--runs 3] [--duration-s 15]
      issue 17's targets: uniform, hot-fleet and open loop at half the maximum
  fuelcard-loadtest console --vehicles 10000 --data-dir /tmp/console-bench
      the operator console's pages in a browser, on a 10 000-vehicle fleet
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg

from fuelcard_loadtest import ab, targets
from fuelcard_loadtest.runner import Options, UsageError, run
from fuelcard_loadtest.scenarios import SCENARIOS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuelcard-loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--scenario", choices=sorted(SCENARIOS), default="uniform",
                   # argparse %-formats help: a description's "70 %" must not reach it raw
                   help="; ".join(f"{s.name}: {s.description}" for s in SCENARIOS.values())
                   .replace("%", "%%"))
    w.add_argument("--cards", type=int, help="cards to seed (default: uniform and mixed 100000,"
                   " hot-fleet 500)")
    load = w.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=64,
                      help="closed loop: operations in flight (default 64)")
    load.add_argument("--rate", type=float, help="open loop: operations started per second, on a"
                      " fixed timetable; latency counts from the scheduled start")
    w.add_argument("--duration-s", type=float, default=30.0, help="measured seconds (default 30)")
    w.add_argument("--warmup-s", type=float, default=2.0,
                   help="seconds of load before measuring (default 2)")
    w.add_argument("--drain-s", type=float, default=10.0,
                   help="at most this long for in-flight operations after the end (default 10)")
    w.add_argument("--pump-min-ms", type=float, default=0.0,
                   help="pump time between authorize and confirm: minimum (default 0)")
    w.add_argument("--pump-max-ms", type=float, default=20.0,
                   help="pump time: maximum (default 20)")
    w.add_argument("--cancel-share", type=float,
                   help="share of pump cycles ended by Cancel (scenario default)")
    w.add_argument("--recharge-share", type=float, help="share of operations that are recharges")
    w.add_argument("--redeem-share", type=float,
                   help="share of operations that are points redemptions")
    w.add_argument("--max-ops", type=int, default=50_000_000,
                   help="at most this many operations in all (default 50000000)")
    w.add_argument("--seed", type=int, help="random seed of the generator")

    g = p.add_argument_group("generator")
    g.add_argument("--processes", type=int, default=2, help="generator processes (default 2)")
    g.add_argument("--channels", type=int, default=8,
                   help="--insecure: gRPC channels (TCP connections) per process (default 8);"
                   " production mode has a channel per terminal")
    g.add_argument("--rpc-timeout-s", type=float, default=10.0, help="deadline per RPC (default 10)")
    g.add_argument("--max-inflight", type=int, default=20_000,
                   help="open loop: arrivals outstanding before new ones are dropped")

    s = p.add_argument_group("server and data")
    s.add_argument("--target", help="HOST:PORT of a running server (loopback only)")
    s.add_argument("--database-url", help="its database (with --target)")
    s.add_argument("--card-index-key-hex",
                   help="the server's card index key (default: env FUELCARD_CARD_INDEX_KEY_HEX"
                   " or DATA_DIR/card-index.key)")
    s.add_argument("--data-dir", type=Path, help="data directory of the server to start (default:"
                   " a temporary one, removed afterwards); with --target: where its key is")
    s.add_argument("--workers", type=int, default=2,
                   help="server processes to start (default 2)")
    s.add_argument("--pool-max", type=int, help="database connections per server process")
    s.add_argument("--reseed", action="store_true",
                   help="seed a new data set even if one of this shape exists")
    s.add_argument("--history-entries", type=int, default=0,
                   help="also load a year of past sales and recharges so that the data set's"
                   " journal holds this many entries (the scale run: --cards 1000000"
                   " --history-entries 10000000); kept with --data-dir")
    s.add_argument("--history-jobs", type=int, default=2,
                   help="database connections loading the history in parallel (default 2)")
    s.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                   help="put caps, a geo-fence, products and hours on every card (none binds:"
                   " measures what the checks cost; default on, as in production)")
    s.add_argument("--insecure", action="store_true",
                   help="plaintext and unsigned: the server's development listener, no client"
                   " certificates, no terminal MACs (default: mutual TLS and MACs)")
    s.add_argument("--tls-dir", type=Path,
                   help="the development CA (ca.pem, ca.key; fuelcard certs) the generator issues"
                   " its terminal certificates from; needed with --target unless --insecure"
                   " (default for a started server: DATA_DIR/loadtest-certs, made once)")
    s.add_argument("--terminals", type=int, default=64,
                   help="open loop: terminals in all, an arrival waits for a free one (closed"
                   " loop: one per operation in flight) (default 64)")
    s.add_argument("--risk-rules", metavar="FILE",
                   help="put this risk rule set (TOML or .json) in force before the run, e.g."
                   " loadtest/risk-rules-200.json; \"none\": none in force")
    s.add_argument("--keep", action="store_true", help="keep the temporary data directory")

    o = p.add_argument_group("output")
    o.add_argument("--ceilings", action="store_true",
                   help="also measure the framework (no-op RPC) and database (pgbench) ceilings")
    o.add_argument("--ceilings-duration-s", type=float,
                   help="seconds for each ceiling (default: --duration-s)")
    o.add_argument("--report", type=Path, help="write the JSON report here")
    o.add_argument("--plot", type=Path, help="write a PNG of latency over time and distribution")
    o.add_argument("--profile-dir", type=Path,
                   help="py-spy the server processes during the measured window, into this dir")
    o.add_argument("--no-progress", action="store_true", help="no live progress line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "ab":
        return ab.main(args_list[1:])
    if args_list and args_list[0] == "targets":
        return targets.main(args_list[1:])
    if args_list[:1] == ["console"]:
        # the console pages in a browser (issue 19): a bench of its own, see console_bench.py
        from fuelcard_loadtest import console_bench

        return console_bench.main(args_list[1:])
    args = build_parser().parse_args(args_list)
    opts = Options(
        scenario=args.scenario, cards=args.cards, concurrency=args.concurrency, rate=args.rate,
        duration_s=args.duration_s, warmup_s=args.warmup_s, drain_s=args.drain_s,
        processes=args.processes, channels=args.channels, pump_min_ms=args.pump_min_ms,
        pump_max_ms=args.pump_max_ms, cancel_share=args.cancel_share,
        recharge_share=args.recharge_share, redeem_share=args.redeem_share,
        target=args.target, database_url=args.database_url, data_dir=args.data_dir,
        workers=args.workers, pool_max=args.pool_max, card_index_key_hex=args.card_index_key_hex,
        ceilings=args.ceilings, ceilings_duration_s=args.ceilings_duration_s,
        report=args.report, plot=args.plot, profile_dir=args.profile_dir,
        progress=not args.no_progress, rpc_timeout_s=args.rpc_timeout_s,
        max_inflight=args.max_inflight, max_ops=args.max_ops, reseed=args.reseed,
        controls=args.controls, insecure=args.insecure, tls_dir=args.tls_dir,
        terminals=args.terminals, history_entries=args.history_entries,
        history_jobs=args.history_jobs, risk_rules=args.risk_rules,
        keep=args.keep, seed=args.seed,
        argv=["fuelcard-loadtest", *args_list])
    try:
        result = run(opts)
    except UsageError as exc:
        print(f"fuelcard-loadtest: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, psycopg.Error, OSError, subprocess.SubprocessError) as exc:
        print(f"fuelcard-loadtest: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
