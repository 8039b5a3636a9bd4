"""What one pump cycle costs inside PostgreSQL, on several databases at once.

`python -m fuelcard_loadtest.sqlcost DATA_DIR...` starts the embedded
PostgreSQL of each `fuelcard-loadtest --data-dir` (servers stopped), then
runs blocks of pump cycles on one connection per database, alternating the
databases block by block so they share the machine's noise: the statements
the server sends (`SELECT fc.authorize(...)`, then `SELECT fc.confirm(...)`,
prepared), on random cards of the data set, one at a time. It prints per
database the latency percentiles of each call (round trip on a Unix socket,
commit included), the shared-buffer misses and hits per cycle of client
backends (pg_stat_io: blocks PostgreSQL had to fetch from the OS, the cost of
a database bigger than its buffers; autovacuum's are not counted), the WAL
and full-page images per cycle (pg_stat_wal), and the CPU time the backend
itself spent per cycle (/proc/PID/schedstat of the connection's backend: on
a loaded machine the figure to trust, where latencies measure the queue). Counters are cluster-wide:
stop the servers first. --ab-set NAME=VALUE adds, per database, a second
connection with that session setting, alternated with the plain one.

The call follows the server's AUTHORIZE_SQL / CONFIRM_SQL parameters (by
name): a change to those needs the same change in _cycle.

Used for the scale comparison in BENCHMARKS.md, where the end-to-end p99 on
a loaded machine is dominated by scheduling. The cycles are real sales
(station SQLCOST): `fuelcard verify` holds afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from fuelcard_server.embedded import EmbeddedPostgres
from fuelcard_server.services.transaction import AUTHORIZE_SQL, CONFIRM_SQL

STATION = "SQLCOST"


@dataclass
class Target:
    data_dir: Path
    label: str
    pg: EmbeddedPostgres
    conn: psycopg.Connection[Any]
    pans: list[bytes]
    authorize_ms: list[float] = field(default_factory=list)
    confirm_ms: list[float] = field(default_factory=list)
    reads: int = 0
    hits: int = 0
    wal_bytes: int = 0
    wal_fpi: int = 0
    cpu_ns: int = 0
    cycles: int = 0
    started_here: bool = False


def _wal(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """WAL written by the cluster, and its full-page images (the first change
    of a page after a checkpoint logs the whole page)."""
    row = conn.execute("SELECT wal_bytes, wal_fpi FROM pg_stat_wal").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _cpu_ns(conn: psycopg.Connection[Any]) -> int:
    """CPU time the connection's backend has used so far (the scheduler's
    nanoseconds: finer than /proc/PID/stat's clock ticks)."""
    with open(f"/proc/{conn.info.backend_pid}/schedstat") as f:
        return int(f.read().split()[0])


def _blocks(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    # Client backends only (pg_stat_io, PostgreSQL 16): the servers are
    # stopped, so that is this connection, without autovacuum's reads.
    row = conn.execute("SELECT coalesce(sum(reads), 0), coalesce(sum(hits), 0) FROM pg_stat_io"
                       " WHERE backend_type = 'client backend'").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _open(data_dir: Path, samples: int, rng: random.Random, setting: str | None = None) -> Target:
    pg = EmbeddedPostgres(data_dir / "postgres")
    started = not pg.is_running()
    if started:
        pg.start()
    conn = psycopg.connect(pg.url(), autocommit=True)
    label = str(data_dir)
    if setting is not None:
        name, _, value = setting.partition("=")
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        label += f" {name}={value}"
    row = conn.execute("SELECT tag, cards FROM loadtest.datasets WHERE complete"
                       " ORDER BY cards DESC LIMIT 1").fetchone()
    assert row is not None, f"no data set in {data_dir}"
    tag, cards = int(row[0]), int(row[1])
    picks = [rng.randrange(cards) for _ in range(samples)]
    rows = conn.execute("SELECT i, pan_index FROM loadtest.cards WHERE tag = %s AND i = ANY(%s)",
                        (tag, picks)).fetchall()
    by_i = {int(i): bytes(p) for i, p in rows}
    return Target(data_dir, label, pg, conn, [by_i[i] for i in picks], started_here=started)


def _cycle(t: Target, pan: bytes, rng: random.Random) -> None:
    now = dt.datetime.now(dt.UTC)
    amount = rng.randint(5_000, 50_000)
    t0 = time.perf_counter()
    row = t.conn.execute(AUTHORIZE_SQL.encode(), {
        "caller": "", "request_id": f"sqlcost-{uuid.uuid4()}", "request_hash": os.urandom(32),
        "pan_index": pan, "amount_fen": amount, "station_id": STATION,
        "terminal_id": f"{STATION}-T", "nozzle": 1, "product": 1, "now": now,
        "ttl": dt.timedelta(minutes=30), "counter": None, "pin_ok": None}, prepare=True).fetchone()
    t1 = time.perf_counter()
    assert row is not None
    answer = row[0]
    t.authorize_ms.append((t1 - t0) * 1000)
    if answer.get("decision") != "APPROVED":
        return
    final = rng.randint(amount * 3 // 10, amount - 1)
    t2 = time.perf_counter()
    t.conn.execute(CONFIRM_SQL.encode(), {
        "caller": "", "request_id": f"sqlcost-{uuid.uuid4()}", "request_hash": os.urandom(32),
        "hold_uid": answer["hold"]["hold_id"], "final_fen": final,
        "volume_ml": final * 1000 // 785, "unit_price_fen": 785, "now": dt.datetime.now(dt.UTC),
        "station": None, "terminal": None, "counter": None}, prepare=True)
    t.confirm_ms.append((time.perf_counter() - t2) * 1000)
    t.cycles += 1


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuelcard_loadtest.sqlcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dirs", nargs="+", type=Path)
    p.add_argument("--blocks", type=int, default=6, help="blocks per database (default 6)")
    p.add_argument("--block-cycles", type=int, default=300, help="cycles per block (default 300)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ab-set", metavar="NAME=VALUE",
                   help="also run each database with this session setting (e.g."
                   " wal_compression=pglz), alternated with the plain one")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    n = args.blocks * args.block_cycles
    targets: list[Target] = []
    try:
        for d in args.data_dirs:
            targets.append(_open(d, n, rng))
            if args.ab_set:
                targets.append(_open(d, n, rng, args.ab_set))
        for b in range(args.blocks):
            for t in targets:
                r0, h0 = _blocks(t.conn)
                w0, f0 = _wal(t.conn)
                c0 = _cpu_ns(t.conn)
                for pan in t.pans[b * args.block_cycles:(b + 1) * args.block_cycles]:
                    _cycle(t, pan, rng)
                c1 = _cpu_ns(t.conn)
                r1, h1 = _blocks(t.conn)
                w1, f1 = _wal(t.conn)
                t.cpu_ns += c1 - c0
                t.wal_bytes += w1 - w0
                t.wal_fpi += f1 - f0
                t.reads += r1 - r0
                t.hits += h1 - h0
        print(f"{'database':60} {'cycles':>6} {'auth p50':>8} {'p90':>6} {'p99':>6}"
              f" {'conf p50':>8} {'p90':>6} {'p99':>6} {'reads/cycle':>11} {'hits/cycle':>10}"
              f" {'WAL kB/cycle':>12} {'FPI/cycle':>9} {'CPU us/cycle':>12}")
        for t in targets:
            a, c = t.authorize_ms, t.confirm_ms
            print(f"{t.label:60} {t.cycles:6d} {statistics.median(a):8.2f}"
                  f" {_pct(a, .9):6.2f} {_pct(a, .99):6.2f} {statistics.median(c):8.2f}"
                  f" {_pct(c, .9):6.2f} {_pct(c, .99):6.2f} {t.reads / max(t.cycles, 1):11.1f}"
                  f" {t.hits / max(t.cycles, 1):10.1f}"
                  f" {t.wal_bytes / 1000 / max(t.cycles, 1):12.1f} {t.wal_fpi / max(t.cycles, 1):9.1f}"
                  f" {t.cpu_ns / 1000 / max(t.cycles, 1):12.0f}")
    finally:
        for t in targets:
            t.conn.close()
            if t.started_here:
                t.pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
