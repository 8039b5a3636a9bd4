"""`fuelcard-analytics`: the analytics sidecar.

  follow    follow the server's event stream into the warehouse, for ever
            (kill it any time: it resumes after the last batch it stored)
  sync      the same, but stop once caught up
  generate  load a generated year of history into a (new) warehouse
  report    write the reports, the forecast and the churn warning: a CSV
            and a PNG each, and print what they found
  totals    print the warehouse's ledger totals, cursor, and the money and
            points the accounts hold by its facts

The warehouse is a DuckDB file (--store PATH, default analytics.duckdb) or a
schema of a PostgreSQL database (--store postgresql://... --schema NAME).
Reports that need a longer history than the warehouse holds (the forecast:
86 days of sales, the churn warning: 169) are skipped with a message saying
so; the others are made.

Examples (tests/test_analytics_edges.py runs each one):
  fuelcard-analytics generate --store year.duckdb --drivers 300 --families 40 --fleets 3
  fuelcard-analytics report --store year.duckdb --out reports
  fuelcard-analytics generate --store month.duckdb --days 30 --drivers 300 --families 40
  fuelcard-analytics report --store month.duckdb --out month-reports
  fuelcard-analytics sync --target 127.0.0.1:50051 --insecure --store live.duckdb
  fuelcard-analytics follow --target 127.0.0.1:50051 --certs-dir data/certs --name analytics-bi
  fuelcard-analytics totals --store year.duckdb
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from fuelcard_analytics import churn, forecast
from fuelcard_analytics.follow import Target, follow
from fuelcard_analytics.generator import YearConfig, generate
from fuelcard_analytics.reports import REPORTS, TooLittleHistory, history_days
from fuelcard_analytics.warehouse import Store, Warehouse, open_store

ALL = [*REPORTS, "forecast", "churn"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuelcard-analytics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def store_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--store", default="analytics.duckdb",
                       help="DuckDB file, or a postgresql:// URL (default analytics.duckdb)")
        q.add_argument("--schema", default="analytics",
                       help="schema to use in PostgreSQL (default analytics)")

    for name in ("follow", "sync"):
        q = sub.add_parser(name, help=f"{name} the event stream")
        store_args(q)
        q.add_argument("--target", required=True, help="HOST:PORT of the fuelcard server")
        q.add_argument("--insecure", action="store_true", help="plaintext (loopback development)")
        q.add_argument("--certs-dir", type=Path, help="directory with ca.pem and NAME.pem/.key")
        q.add_argument("--name", default="analytics",
                       help="certificate file stem in --certs-dir (default analytics)")
        q.add_argument("--max-batch", type=int, default=500, help="events per batch (default 500)")
        q.add_argument("--quiet", action="store_true", help="no line per batch")
    q = sub.add_parser(
        "generate", help="load a generated year of history",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a generated history (a year by default) into a new warehouse.",
        epilog="examples:\n"
               "  fuelcard-analytics generate --store small.duckdb --days 120 --drivers 200 --families 20\n"
               "  fuelcard-analytics generate --store week.duckdb --days 7 --stations 5 --drivers 50")
    store_args(q)
    defaults = YearConfig()
    for field in ("days", "stations", "drivers", "families", "fleets", "seed"):
        q.add_argument(f"--{field}", type=int, default=getattr(defaults, field))
    q = sub.add_parser(
        "report", help="write the reports (CSV + PNG)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the reports, a CSV and a PNG each; those the warehouse's history "
                    "is too short for are skipped, saying what they need.",
        epilog="examples:\n"
               "  fuelcard-analytics report tiers heatmap --store small.duckdb --out reports\n"
               "  fuelcard-analytics report forecast churn --store year.duckdb --out reports")
    store_args(q)
    q.add_argument("names", nargs="*", choices=[*ALL, []], default=[],
                   help=f"which (default all): {', '.join(ALL)}")
    q.add_argument("--out", type=Path, default=Path("reports"), help="output directory")
    q = sub.add_parser("totals", help="ledger totals and cursor of the warehouse")
    store_args(q)
    q.add_argument("--stream", default="fuelcard")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = open_store(args.store, args.schema)
    try:
        if args.command in ("follow", "sync"):
            if not args.insecure and args.certs_dir is None:
                print("fuelcard-analytics: give --certs-dir (mutual TLS) or --insecure",
                      file=sys.stderr)
                return 2
            target = Target(args.target, None if args.insecure else args.certs_dir, args.name)
            log = (lambda _: None) if args.quiet else (lambda m: print(m, flush=True))
            try:
                cursor = follow(target, Warehouse(store), keep_following=args.command == "follow",
                                max_batch=args.max_batch, log=log)
            except grpc.RpcError as exc:
                print(f"fuelcard-analytics: stream refused: {exc.code().name}"
                      f" {exc.details()}", file=sys.stderr)
                return 1
            print(f"caught up at position {cursor}", flush=True)
        elif args.command == "generate":
            config = YearConfig(days=args.days, stations=args.stations, drivers=args.drivers,
                                families=args.families, fleets=args.fleets, seed=args.seed)
            generate(store, config, log=lambda m: print(m, flush=True))
        elif args.command == "report":
            Warehouse(store)  # brings a store made by an older release up to date first
            return _report(store, args.names, args.out)
        elif args.command == "totals":
            rows = store.query("SELECT kind, asset, count(*), sum(amount) FROM fact_ledger"
                               " GROUP BY kind, asset ORDER BY kind, asset")
            stored = store.query("SELECT position, events FROM sidecar_cursor WHERE stream = ?",
                                 [args.stream])
            print(f"cursor {stored[0][0] if stored else 0}")
            for kind, asset, n, total in rows:
                print(f"kind {kind} asset {asset}: {n} entries, {int(total)}")
            Warehouse(store, args.stream)  # the views, on a store made by an older release
            money = store.query("SELECT count(*), sum(recharged_fen), sum(refunded_fen),"
                                " sum(spent_fen), sum(balance_fen) FROM account_money")[0]
            points = store.query("SELECT sum(balance) FROM account_points")[0][0]
            print(f"accounts {money[0]}: recharged {int(money[1] or 0)}, refunded"
                  f" {int(money[2] or 0)}, spent {int(money[3] or 0)}, held"
                  f" {int(money[4] or 0)} fen; points outstanding {int(points or 0)}")
    finally:
        store.close()
    return 0


def _report(store: Store, names: list[str], out: Path) -> int:
    """The reports asked for (all by default). On a young warehouse those
    that need a longer history are skipped with a message: exit 0 when all
    were asked for and the rest were made, 1 when one named is not made."""
    days = history_days(store)
    if days == 0:
        print("fuelcard-analytics: the warehouse holds no sales yet: nothing to report (fill it"
              " with sync, follow or generate first)", file=sys.stderr)
        return 1
    skipped: list[TooLittleHistory] = []
    for name in names or ALL:
        try:
            if name == "forecast":
                output, _ = forecast.run(store, out)
            elif name == "churn":
                output, _ = churn.run(store, out)
            else:
                output = REPORTS[name](store, out)
        except TooLittleHistory as exc:
            skipped.append(exc)
            print(f"{name}: not made: it {exc}", flush=True)
            continue
        print(f"{output.name}: {output.summary}\n  {output.csv}\n  {output.png}", flush=True)
    if skipped:
        print(f"fuelcard-analytics: the warehouse holds {days} days of sales; not made yet: "
              + ", ".join(f"{e.report} (from {e.needed_days} days)" for e in skipped),
              file=sys.stderr)
    return 1 if skipped and names else 0


if __name__ == "__main__":
    sys.exit(main())
