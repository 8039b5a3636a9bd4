"""Reconciliation benchmark (issue 8): one channel day of N records (default
1 000 000) reconciled against our records, on the embedded PostgreSQL.

  .venv/bin/python -m fuelcard_loadtest.reconcile_bench [--records N]
      [--channel WECHAT_PAY] [--repeat 3] [--keep DIR]

Our side: N neutral settlement records of the day (payments, 5% refunds)
plus 10% as many on each neighbouring day, COPYed straight into
fc.settlement_records (the table reconciliation reads; making them through
N Recharge RPCs would measure the RPCs). Their side: the same records as the
channel's file (channel_files), with 10 breaks of each kind planted. Timed:
`reconcile.reconcile` end to end (read and parse the file, COPY it in, join,
store breaks, write the per-transaction report), each run checked to find
exactly the planted breaks. Also timed on their own: parsing the file
(no database) and writing it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
from fuelcard_adapters.channels import by_name
from fuelcard_adapters.neutral import SHANGHAI, Kind, NeutralRecord, Status
from fuelcard_server import migrations, reconcile
from fuelcard_server.embedded import EmbeddedPostgres

from fuelcard_loadtest import channel_files
from fuelcard_loadtest.server import cpu_seconds, tree

_TICKS = os.sysconf("SC_CLK_TCK")

DAY = dt.date(2026, 11, 25)
PLANTED = 10  # of each break kind


def records(channel: int, day: dt.date, n: int, rng: random.Random, prefix: str
            ) -> Iterator[NeutralRecord]:
    start = dt.datetime.combine(day, dt.time(), SHANGHAI)
    payments: list[tuple[str, int]] = []
    for i in range(n):
        at = start + dt.timedelta(seconds=i * 86_399 // max(n, 1))
        if i % 20 == 19 and payments:
            txn, amount = payments[rng.randrange(len(payments))]
            yield NeutralRecord(channel, Kind.REFUND, f"R{prefix}{i:019d}", max(amount // 2, 1), at,
                                Status.SUCCESS, 0, txn)
        else:
            txn = f"{prefix}{i:020d}"
            amount = rng.randrange(1_000, 100_000)
            payments.append((txn, amount))
            yield NeutralRecord(channel, Kind.PAYMENT, txn, amount, at, Status.SUCCESS, amount * 6 // 1000)


def seed(url: str, recs: Sequence[NeutralRecord]) -> None:
    with psycopg.connect(url) as conn, conn.cursor() as cur, cur.copy(
            "COPY fc.settlement_records (channel, kind, channel_txn_id, txn_uid,"
            " original_channel_txn_id, amount_fen, status, occurred_at, business_date)"
            " FROM STDIN") as copy:
        for r in recs:
            copy.write_row((r.channel, r.kind.value, r.channel_txn_id, uuid.uuid4(),
                            r.original_channel_txn_id, r.amount_fen, r.status.value, r.time,
                            r.business_date))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE fc.settlement_records")


def _postgres_cpu_s(postmaster: int) -> float:
    """CPU seconds of PostgreSQL: the postmaster with its reaped children
    (finished backends: utime+stime+cutime+cstime) and the live ones."""
    total = 0.0
    with open(f"/proc/{postmaster}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / _TICKS
    return total + cpu_seconds(tree(postmaster)[1:])


def plant(ours: list[NeutralRecord], channel: int, rng: random.Random, status: bool
          ) -> tuple[list[NeutralRecord], dict[str, int]]:
    theirs = list(ours)
    picks = rng.sample(range(len(theirs)), PLANTED * 3)
    for i in picks[:PLANTED]:
        theirs[i] = dataclasses.replace(theirs[i], amount_fen=theirs[i].amount_fen + 1)
    if status:
        for i in picks[PLANTED:2 * PLANTED]:
            theirs[i] = dataclasses.replace(theirs[i], status=Status.FAILED)
    drop = set(picks[2 * PLANTED:])
    theirs = [r for i, r in enumerate(theirs) if i not in drop]
    at = dt.datetime.combine(DAY, dt.time(12), SHANGHAI)
    theirs += [NeutralRecord(channel, Kind.PAYMENT, f"X{i:020d}", 500, at, Status.SUCCESS)
               for i in range(PLANTED)]
    expected = {"missing_ours": PLANTED, "missing_theirs": PLANTED, "amount_mismatch": PLANTED,
                "status_mismatch": PLANTED if status else 0}
    return theirs, expected


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--channel", default="WECHAT_PAY")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", type=Path, help="keep the database and files here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop PostgreSQL on the way out
    files = by_name(args.channel)
    rng = random.Random(8)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fuelcard-recon-"))
    work.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(work / "postgres")
    url = pg.start()
    try:
        migrations.migrate(url)
        t = time.perf_counter()
        ours = list(records(files.channel, DAY, args.records, rng, "D"))
        neighbours = [*records(files.channel, DAY - dt.timedelta(days=1), args.records // 10, rng, "P"),
                      *records(files.channel, DAY + dt.timedelta(days=1), args.records // 10, rng, "N")]
        seed(url, ours + neighbours)
        print(f"seeded {len(ours) + len(neighbours)} records of ours in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        theirs, expected = plant(ours, files.channel, rng, status=args.channel.upper() != "ALIPAY")
        path = work / f"{args.channel.lower()}-{DAY}.txt"
        t = time.perf_counter()
        channel_files.write(args.channel, theirs, DAY, path)
        print(f"wrote {len(theirs)} records as {args.channel} ({path.stat().st_size >> 20} MiB) in "
              f"{time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        with path.open(encoding=files.encoding, newline="") as f:
            parsed = sum(1 for _ in files.parse_bill(f))
        parse_s = time.perf_counter() - t
        print(f"parse only: {parsed} records in {parse_s:.1f} s")
        runs: list[float] = []
        for i in range(args.repeat):
            postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
            pg_cpu, py_cpu = _postgres_cpu_s(postmaster), time.process_time()
            t = time.perf_counter()
            result = reconcile.reconcile(url, files, DAY, path, now=dt.datetime.now(dt.UTC),
                                         report=work / "report.csv")
            runs.append(time.perf_counter() - t)
            time.sleep(0.5)  # the backend exits and is reaped: its CPU lands in the postmaster's
            cpu = (f"cpu python {time.process_time() - py_cpu:.1f} s, "
                   f"postgres {_postgres_cpu_s(postmaster) - pg_cpu:.1f} s")
            got = {k: result.counts[k] for k in reconcile.BREAK_KINDS}
            assert got == expected, (got, expected)
            assert result.counts["matched"] == args.records - sum(
                n for k, n in expected.items() if k != "missing_ours"), result.counts
            print(f"run {i + 1}: {runs[-1]:.1f} s  {cpu}  {result.counts}  phases "
                  + " ".join(f"{k} {v:.1f}" for k, v in result.phases_s.items()), flush=True)
        print(f"reconcile {args.channel} {args.records} records: median {statistics.median(runs):.1f} s"
              f" (runs {', '.join(f'{r:.1f}' for r in runs)}), parse alone {parse_s:.1f} s")
    finally:
        pg.stop(mode="fast")
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
