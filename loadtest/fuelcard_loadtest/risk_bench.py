"""What scoring costs on the authorize path (issue #6): ≤ 1 ms at p99 with
200 active rules is the target.

Two measurements on a throwaway embedded PostgreSQL (or --database-url):

1. fc.risk_assess alone, timed inside the database (clock_timestamp around
   each call, no network, no commit): the evaluation itself - features once,
   then one SELECT over all rules - for cards with a full history.
2. fc.authorize end to end from a client (one round trip and commit per
   call, as the server makes it), in alternating blocks with the 200-rule
   set in force and with no rule set, so both modes see the same machine
   load; the difference of the percentiles is what scoring adds.

    python -m fuelcard_loadtest.risk_bench [--rules loadtest/risk-rules-200.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from fuelcard_loadtest import risk_rules

AUTHORIZE_SQL = (
    "SELECT fc.authorize(p_caller => 'bench', p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_pan_index => %(pan_index)s, p_amount_fen => 1000::bigint,"
    " p_station_id => %(station_id)s, p_terminal_id => %(terminal_id)s, p_nozzle => 1,"
    " p_product => 1::smallint, p_now => %(now)s::timestamptz, p_ttl => interval '30 minutes',"
    " p_counter => NULL::bigint, p_pin_ok => NULL::boolean)")
ACTIVATE_SQL = (
    "SELECT fc.risk_activate(p_caller => 'bench', p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_lock => -6, p_actor => 'bench', p_version => %(version)s,"
    " p_now => now())")
ASSESS_LOOP_SQL = """
CREATE OR REPLACE FUNCTION pg_temp.assess_us(p_cards bigint[], p_n integer, p_now timestamptz)
RETURNS double precision[] LANGUAGE plpgsql AS $$
DECLARE
    v_out double precision[] := '{}';
    v_t0 timestamptz;
    v_card bigint;
BEGIN
    FOR i IN 1..p_n LOOP
        v_card := p_cards[1 + i % cardinality(p_cards)];
        v_t0 := clock_timestamp();
        PERFORM fc.risk_assess(p_card_id => v_card, p_tier => 1::smallint,
                               p_account_kind => 1::smallint, p_spender_id => v_card,
                               p_amount => 1000, p_station => 'KM-001', p_terminal => 'KM-001-T1',
                               p_now => p_now, p_local => p_now AT TIME ZONE 'Asia/Shanghai');
        v_out := v_out || extract(epoch FROM clock_timestamp() - v_t0) * 1e6;
    END LOOP;
    RETURN v_out;
END $$"""


def backend_cpu_s(pid: int) -> float:
    """CPU seconds of a PostgreSQL backend (same machine): robust where wall
    time is not, on a loaded machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(pct(values, 0.50), 1), "p90": round(pct(values, 0.90), 1),
            "p99": round(pct(values, 0.99), 1), "mean": round(statistics.fmean(values), 1)}


def setup(conn: psycopg.Connection[Any], cards: int) -> list[tuple[int, bytes]]:
    conn.execute("INSERT INTO fc.stations VALUES ('KM-001', 'bench', 25.04, 102.71),"
                 " ('KM-002', 'bench 2', 25.10, 102.80) ON CONFLICT DO NOTHING")
    made = []
    for i in range(cards):
        row = conn.execute("INSERT INTO fc.accounts (kind, balance_fen, created_at)"
                           " VALUES (1, 1000000000000, now()) RETURNING id").fetchone()
        assert row is not None
        pan = hashlib.sha256(f"bench-{uuid.uuid4()}".encode()).digest()
        card = conn.execute("INSERT INTO fc.cards (account_id, pan_index, masked, created_at)"
                            " VALUES (%s, %s, %s, now()) RETURNING id",
                            (row[0], pan, f"**** {i:04d}")).fetchone()
        assert card is not None
        made.append((card[0], pan))
    return made


def authorize(conn: psycopg.Connection[Any], pan: bytes, at: dt.datetime, i: int) -> float:
    t0 = time.perf_counter()
    conn.execute(AUTHORIZE_SQL, {"request_id": f"b-{uuid.uuid4().hex}",
                                 "request_hash": hashlib.sha256(pan).digest(), "pan_index": pan,
                                 "station_id": "KM-001" if i % 3 else "KM-002",
                                 "terminal_id": f"KM-001-T{i % 5}", "now": at},
                 prepare=True).fetchone()
    return (time.perf_counter() - t0) * 1e6


def run(url: str, rules_path: str, *, cards: int, calls: int, blocks: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        made = setup(conn, cards)
        risk_rules.apply(url, rules_path, log=lambda _s: None)
        version = conn.execute("SELECT rule_set_id FROM fc.risk_active").fetchone()
        assert version is not None
        at = dt.datetime(2026, 11, 25, 2, 0, tzinfo=dt.UTC)
        # History: every card 70 authorizations a few minutes apart (full arrays).
        for k in range(70):
            for _, pan in made:
                authorize(conn, pan, at, k)
            at += dt.timedelta(minutes=7)
        conn.execute(ASSESS_LOOP_SQL)
        ids = [c for c, _ in made]
        pid_row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert pid_row is not None
        cpu: dict[str, list[float]] = {"rules": [], "none": []}
        for mode in ("rules", "none", "rules", "none"):
            conn.execute(ACTIVATE_SQL, {"request_id": f"act-{uuid.uuid4().hex}", "request_hash": b"x",
                                        "version": version[0] if mode == "rules" else 0})
            c0 = backend_cpu_s(pid_row[0])
            row = conn.execute("SELECT pg_temp.assess_us(%s, %s, %s)", (ids, calls, at)).fetchone()
            cpu[mode].append((backend_cpu_s(pid_row[0]) - c0) / calls * 1e6)
            assert row is not None
            out.setdefault(f"assess_us_{mode}", []).extend(row[0])
        # End to end, alternating blocks.
        lat: dict[str, list[float]] = {"rules": [], "none": []}
        auth_cpu: dict[str, list[float]] = {"rules": [], "none": []}
        i = 0
        for b in range(blocks):
            mode = "rules" if b % 2 == 0 else "none"
            conn.execute(ACTIVATE_SQL, {"request_id": f"act-{uuid.uuid4().hex}", "request_hash": b"x",
                                        "version": version[0] if mode == "rules" else 0})
            c0 = backend_cpu_s(pid_row[0])
            for _ in range(calls // 4):
                at += dt.timedelta(seconds=3)
                lat[mode].append(authorize(conn, made[i % len(made)][1], at, i))
                i += 1
            auth_cpu[mode].append((backend_cpu_s(pid_row[0]) - c0) / (calls // 4) * 1e6)
    return {"assess_in_db_us": {m: summary(out[f"assess_us_{m}"]) for m in ("rules", "none")},
            "authorize_client_us": {m: summary(v) for m, v in lat.items()},
            "assess_backend_cpu_us_per_call": {m: round(statistics.median(v), 1)
                                               for m, v in cpu.items()},
            "authorize_backend_cpu_us_per_call": {m: round(statistics.median(v), 1)
                                                  for m, v in auth_cpu.items()},
            "cards": cards}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rules", default=str(Path(__file__).parents[1] / "risk-rules-200.json"))
    p.add_argument("--database-url", help="a scratch database (default: embedded PostgreSQL)")
    p.add_argument("--cards", type=int, default=200)
    p.add_argument("--calls", type=int, default=4000)
    p.add_argument("--blocks", type=int, default=8)
    args = p.parse_args()
    if args.database_url:
        result = run(args.database_url, args.rules, cards=args.cards, calls=args.calls,
                     blocks=args.blocks)
    else:
        from fuelcard_server import migrations
        from fuelcard_server.embedded import EmbeddedPostgres

        with tempfile.TemporaryDirectory(prefix="fuelcard-risk-bench-") as tmp:
            pg = EmbeddedPostgres(Path(tmp))
            url = pg.start()
            try:
                migrations.migrate(url)
                result = run(url, args.rules, cards=args.cards, calls=args.calls,
                             blocks=args.blocks)
            finally:
                pg.stop(mode="immediate")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
