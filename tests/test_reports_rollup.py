"""The fleet cost report over the cost rollup (issue 19, cost_rollup.py):
exact to the fen against the query it replaced, which read every confirmed
hold, on seeded random sales, whatever the rollup's lag, and across the
edges of its day and month buckets."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import random
import uuid
from typing import LiteralString

import psycopg
from fuelcard_server import reports, roles, verify
from fuelcard_server.cost_rollup import CostRollup
from fuelcard_server.db import Database

from tests.plugins.server import RunningServer
from tests.support import builders

Conn = psycopg.Connection[tuple[object, ...]]
UTC = dt.UTC
NOW = dt.datetime(2026, 11, 20, 9, 30, tzinfo=UTC)

# The report's query before the rollup: every confirmed hold of the fleet over the period
# and the baseline, straight from fc.holds. The reference the rollup must match.
HOLDS_FLEET_COST_SQL: LiteralString = """
    WITH vehicles AS (
        SELECT id, uid, label, created_at FROM fc.accounts WHERE parent_id = %(parent)s),
    sales AS (
        SELECT h.spender_account_id AS vehicle, h.settled_fen, h.volume_ml,
               CASE WHEN h.closed_at >= %(start)s::timestamptz THEN -1
                    ELSE floor(extract(epoch FROM (%(start)s::timestamptz - h.closed_at))
                               / %(span_s)s)::integer END AS periods_back
          FROM fc.holds h JOIN vehicles v ON v.id = h.spender_account_id
         WHERE h.state = fc.hold_state_confirmed()
           AND h.closed_at >= %(start)s::timestamptz - %(span_s)s * %(baseline)s * interval '1 second'
           AND h.closed_at < %(end)s::timestamptz)
    SELECT v.uid::text, v.label,
           coalesce(sum(s.settled_fen) FILTER (WHERE s.periods_back < 0), 0)::bigint,
           coalesce(sum(s.volume_ml) FILTER (WHERE s.periods_back < 0), 0)::bigint,
           count(s.vehicle) FILTER (WHERE s.periods_back < 0),
           coalesce(sum(s.settled_fen) FILTER (WHERE s.periods_back >= 0), 0)::bigint,
           -- earlier periods the vehicle existed in (a period it joined part-way
           -- through counts: its sales do), up to the baseline count
           least(%(baseline)s, greatest(0, ceil(extract(epoch FROM
                 (%(start)s::timestamptz - v.created_at)) / %(span_s)s)))::integer
      FROM vehicles v LEFT JOIN sales s ON s.vehicle = v.id
     GROUP BY v.id, v.uid, v.label, v.created_at
     ORDER BY v.label, v.uid"""



def reference(conn: Conn, parent_uid: str, start: dt.datetime, end: dt.datetime
              ) -> list[reports.VehicleCost]:
    parent = conn.execute("SELECT id FROM fc.accounts WHERE uid = %s::uuid", (parent_uid,)).fetchone()
    assert parent is not None
    rows = conn.execute(HOLDS_FLEET_COST_SQL, {
        "parent": parent[0], "start": start, "end": end, "span_s": (end - start).total_seconds(),
        "baseline": reports.BASELINE_PERIODS}).fetchall()
    out = []
    for uid, label, spend, volume, count, history, periods in rows:
        assert isinstance(history, int) and isinstance(periods, int) and isinstance(spend, int)
        out.append(reports.VehicleCost(str(uid), str(label), spend, int(str(volume)), int(str(count)),
                                       history // periods if periods else 0,
                                       reports.is_anomaly(spend, history, periods)))
    return out


def seed(conn: Conn, rng: random.Random, vehicles: int, sales: int) -> str:
    """A fleet with random confirmed sales over 150 days (several a vehicle and day) (and some holds that
    never sold), rows written as the core leaves them: each sale a confirmed
    hold and a purchase entry. Holds and entries are inserted in shuffled
    order, so hold ids, entry ids and times do not run together, and some
    sales are late confirms (the entry written after closed_at)."""
    parent = conn.execute(
        "INSERT INTO fc.accounts (kind, created_at, label) VALUES (2, %s, 'fleet') RETURNING id, uid",
        (NOW - dt.timedelta(days=500),)).fetchone()
    assert parent is not None
    ids: list[tuple[object, object]] = []
    for n in range(vehicles):
        created = NOW - dt.timedelta(days=rng.choice([500, 300, 100, 20]))
        row = conn.execute(
            "INSERT INTO fc.accounts (kind, created_at, parent_id, funding_mode, label)"
            " VALUES (2, %s, %s, 2, %s) RETURNING id", (created, parent[0], f"V{n:03}")).fetchone()
        assert row is not None
        card_row = conn.execute(
            "INSERT INTO fc.cards (account_id, pan_index, masked, created_at)"
            " VALUES (%s, %s, '9860 **** **** 0000', %s) RETURNING id",
            (row[0], hashlib.sha256(f"{row[0]}".encode()).digest(), created)).fetchone()
        assert card_row is not None
        ids.append((row[0], card_row[0]))
    holds = []
    for _ in range(sales):
        vehicle, card = rng.choice(ids)
        closed = NOW - dt.timedelta(seconds=rng.randrange(150 * 86400), microseconds=rng.randrange(10**6))
        state = 2 if rng.random() < 0.9 else 3
        holds.append((vehicle, card, state, closed))
    rng.shuffle(holds)
    entries = []
    for vehicle, card, state, closed in holds:
        settled = rng.randrange(1, 60000) if state == 2 else 0
        row = conn.execute("""
            INSERT INTO fc.holds (account_id, card_id, state, amount_fen, settled_fen, station_id,
                                  terminal_id, nozzle, product, created_at, expires_at, closed_at,
                                  volume_ml, unit_price_fen, spender_account_id, usage_day)
            VALUES (%(parent)s, %(card)s, %(state)s, 60000, %(settled)s, 'KM-001', 'KM-001-T1', 1, 1,
                    %(closed)s - interval '5 min', %(closed)s + interval '25 min', %(closed)s,
                    %(volume)s, 800, %(vehicle)s, %(closed)s::date)
            RETURNING id""", {"parent": parent[0], "card": card, "state": state, "settled": settled,
                              "closed": closed, "vehicle": vehicle,
                              "volume": settled * 1000 // 800 if state == 2 else 0}).fetchone()
        assert row is not None
        if state == 2:
            late = dt.timedelta(hours=rng.choice([0, 0, 0, 30]))
            entries.append((row[0], settled, closed + late))
    rng.shuffle(entries)
    for hold, settled, at in entries:
        conn.execute("""
            INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,
                                    created_at)
            VALUES (fc.ledger_entry_kind_purchase(), fc.asset_money(), %s,
                    fc.system_account(p_code => 'FUEL_SALES'), %s, %s, %s)""", (parent[0], settled, hold, at))
    return str(parent[1])


def chain_to(conn: Conn, entry_id: int) -> None:
    """Mark the journal chained up to entry_id (the rollup's bound), hashes
    aside: the chain's own tests check those."""
    conn.execute("INSERT INTO fc.journal_chain (entry_id, hash)"
                 " SELECT id, sha256(id::text::bytea) FROM fc.journal WHERE id <= %s"
                 " ON CONFLICT DO NOTHING", (entry_id,))


def ranges(rng: random.Random) -> list[tuple[dt.datetime, dt.datetime]]:
    """Report periods: calendar months and days (on the rollup's bucket
    bounds), and random ones from an hour to 90 days (cut anywhere)."""
    out = [(dt.datetime(2026, 10, 1, tzinfo=UTC), dt.datetime(2026, 11, 1, tzinfo=UTC)),
           (dt.datetime(2026, 9, 1, tzinfo=UTC), dt.datetime(2026, 9, 2, tzinfo=UTC)),
           (dt.datetime(2026, 10, 26, 16, tzinfo=UTC), dt.datetime(2026, 11, 25, 16, tzinfo=UTC))]
    for _ in range(12):
        start = NOW - dt.timedelta(seconds=rng.randrange(100 * 86400), microseconds=rng.randrange(10**6))
        span = dt.timedelta(seconds=rng.choice([3600, 86400, 30 * 86400, 90 * 86400, rng.randrange(
            3600, 90 * 86400)]))
        out.append((start, start + span))
    return out


def test_fleet_costs_match_the_holds_at_any_rollup_lag(database_url: str, db: Conn) -> None:
    rng = random.Random(19)
    parent = seed(db, rng, vehicles=6, sales=1500)
    last = db.execute("SELECT max(id) FROM fc.journal").fetchone()
    assert last is not None and isinstance(last[0], int)
    top = last[0]
    periods = ranges(rng)

    async def scenario() -> None:
        database = Database(database_url, min_size=1, max_size=1, timeout_s=30)
        await database.open()
        try:
            async def check(stage: str) -> None:
                for start, end in periods:
                    want = reference(db, parent, start, end)
                    # through the rollup and the entries past it, however many
                    got = await reports.fleet_costs(database, uuid.UUID(parent), start, end,
                                                    max_lag=top)
                    assert got == want, (stage, start, end)
                    # from the holds alone while the rollup lags behind more than max_lag
                    got = await reports.fleet_costs(database, uuid.UUID(parent), start, end,
                                                    max_lag=0)
                    assert got == want, (stage, start, end)

            await check("nothing rolled")
            rollup = CostRollup(database, batch=97)
            assert await rollup.run_once() == 0          # the chain is at 0: nothing is final
            chain_to(db, top // 3)
            assert await rollup.run_once() == top // 3
            await check("a third rolled")
            chain_to(db, top)
            # One batch of 97: most still past the watermark.
            assert await database.fetch_one("SELECT fc.roll_up_costs(p_limit => 97)", {}) == (97,)
            await check("a third and a batch rolled")
            assert await rollup.run_once() == top - top // 3 - 97
            await check("all rolled")
            assert await rollup.run_once() == 0
            rolled = db.execute("SELECT rolled_id FROM fc.cost_rollup_state").fetchone()
            assert rolled == (top,)
            # verify recomputes the rollup (its other checks fail on these rows written
            # straight into the tables: no balances moved).
            assert "cost_rollup_matches_sales" not in {v.check for v in verify.run(database_url)}
            db.execute("UPDATE fc.vehicle_costs SET volume_ml = volume_ml + 1"
                       " WHERE (vehicle_id, grain, bucket) IN"
                       " (SELECT vehicle_id, grain, bucket FROM fc.vehicle_costs LIMIT 1)")
            assert "cost_rollup_matches_sales" in {v.check for v in verify.run(database_url)}
        finally:
            await database.close()

    asyncio.run(scenario())


def test_cost_pieces_cut_a_range_into_whole_buckets_and_part_days() -> None:
    """The pieces tile [lo, hi) with no gap or overlap; whole pieces start
    and end on their grain's UTC bounds; each part lies inside one UTC day
    (the report reads it through that day's rollup row)."""
    rng = random.Random(1919)
    cases = [(dt.datetime(2026, 1, 1, tzinfo=UTC), dt.datetime(2026, 3, 1, tzinfo=UTC)),
             (dt.datetime(2026, 1, 31, 23, tzinfo=UTC), dt.datetime(2026, 2, 1, 1, tzinfo=UTC)),
             (dt.datetime(9999, 12, 30, tzinfo=UTC), dt.datetime(9999, 12, 31, 1, tzinfo=UTC))]
    for _ in range(300):
        lo = NOW - dt.timedelta(seconds=rng.randrange(400 * 86400), microseconds=rng.randrange(10**6))
        cases.append((lo, lo + dt.timedelta(seconds=rng.randrange(1, 200 * 86400))))
    for lo, hi in cases:
        pieces = reports.cost_pieces(lo, hi)
        spans = sorted([(a, b) for _, a, b in pieces.whole] + pieces.partial)
        top = min(hi, dt.datetime(9999, 12, 1, tzinfo=UTC))  # no sale closes later
        if lo >= top:
            assert spans == [], (lo, hi)
            continue
        assert spans[0][0] == min(lo, top) and spans[-1][1] == top, (lo, hi)
        assert all(b1 == a2 for (_, b1), (a2, _) in itertools.pairwise(spans)), (lo, hi)
        assert all(a < b for a, b in spans)
        for grain, a, b in pieces.whole:
            for t in (a, b):
                assert t.time() == dt.time(0) and (grain == reports.GRAIN_DAY or t.day == 1)
        for a, b in pieces.partial:
            day = a.replace(hour=0, minute=0, second=0, microsecond=0)
            assert b <= day + dt.timedelta(days=1)


def test_the_serving_role_rolls_up_sales_the_chain_has_passed(server: RunningServer, db: Conn) -> None:
    """The job as a serving process runs it (roles.SERVING: fc.roll_up_costs
    is an entry point), on sales made through the server."""
    card = builders.open_card(server, balance_fen=80_000)
    for final in (25_150, 3_000):
        builders.confirm(server, builders.authorize(server, card, 30_000).hold.hold_id, final)

    async def roll_up() -> int:
        database = Database(roles.as_role(server.database_url), min_size=1, max_size=1, timeout_s=30)
        await database.open()
        try:
            return await CostRollup(database).run_once()
        finally:
            await database.close()

    assert server.chain_journal() > 0
    assert asyncio.run(roll_up()) > 0
    rows = db.execute("""
        SELECT c.grain, c.spend_fen, c.sale_count FROM fc.vehicle_costs c
          JOIN fc.accounts a ON a.id = c.vehicle_id WHERE a.uid = %s::uuid ORDER BY c.grain""",
                      (card.account_id,)).fetchall()
    assert rows == [(1, 28_150, 2), (2, 28_150, 2)]
    assert asyncio.run(roll_up()) == 0
    assert "cost_rollup_matches_sales" not in {v.check for v in verify.run(server.database_url)}
