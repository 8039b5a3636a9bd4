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
import statistics
import uuid
import zoneinfo
from typing import LiteralString

import psycopg
import pytest
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



# The fills of the period per vehicle, for the fill flags: also straight from fc.holds.
HOLDS_FILLS_SQL: LiteralString = """
    SELECT v.uid::text, h.volume_ml, h.closed_at
      FROM fc.holds h JOIN fc.accounts v ON v.id = h.spender_account_id
     WHERE v.parent_id = %(parent)s AND h.state = fc.hold_state_confirmed()
       AND h.closed_at >= %(start)s AND h.closed_at < %(end)s"""
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")


def within(minute: int, start: int, end: int) -> bool:
    return start <= minute < end if start < end else minute >= start or minute < end


def reference(conn: Conn, parent_uid: str, start: dt.datetime, end: dt.datetime,
              rules: reports.AnomalyRules) -> list[reports.VehicleCost]:
    """Every line of the report, by label, with its anomalies, computed here
    in Python from what fc.holds holds."""
    parent = conn.execute("SELECT id FROM fc.accounts WHERE uid = %s::uuid", (parent_uid,)).fetchone()
    assert parent is not None
    rows = conn.execute(HOLDS_FLEET_COST_SQL, {
        "parent": parent[0], "start": start, "end": end, "span_s": (end - start).total_seconds(),
        "baseline": reports.BASELINE_PERIODS}).fetchall()
    biggest: dict[str, int] = {}
    late: set[str] = set()
    for uid, volume, closed in conn.execute(HOLDS_FILLS_SQL, {"parent": parent[0], "start": start,
                                                            "end": end}).fetchall():
        assert isinstance(uid, str) and isinstance(volume, int) and isinstance(closed, dt.datetime)
        biggest[uid] = max(biggest.get(uid, 0), volume)
        local = closed.astimezone(SHANGHAI)
        if not within(local.hour * 60 + local.minute, rules.work_start_minute, rules.work_end_minute):
            late.add(uid)
    spends = [int(str(r[2])) for r in rows if int(str(r[2])) > 0]
    median = int(statistics.median(spends)) if spends else 0
    out = []
    for uid, label, spend, volume, count, history, periods in rows:
        assert isinstance(history, int) and isinstance(periods, int) and isinstance(spend, int)
        uid = str(uid)
        kinds = []
        if periods >= reports.MIN_BASELINE_PERIODS and spend * periods > reports.ANOMALY_FACTOR * history:
            kinds.append(reports.VehicleAnomaly.ABOVE_HISTORY)
        if median and spend >= reports.FLEET_MEDIAN_FACTOR * median:
            kinds.append(reports.VehicleAnomaly.ABOVE_FLEET_MEDIAN)
        if biggest.get(uid, 0) > rules.tank_ml:
            kinds.append(reports.VehicleAnomaly.OVER_TANK)
        if uid in late:
            kinds.append(reports.VehicleAnomaly.OUTSIDE_HOURS)
        out.append(reports.VehicleCost(uid, str(label), spend, int(str(volume)), int(str(count)),
                                       history // periods if periods else 0, biggest.get(uid, 0),
                                       tuple(kinds)))
    return out


def random_rules(rng: random.Random) -> reports.AnomalyRules:
    """A tank some fills exceed, and working hours by day, by night (over
    midnight) or to the minute."""
    start, end = rng.choice([(360, 1320), (1320, 360), (rng.randrange(1440), rng.randrange(1, 1441))])
    if start == end:
        start, end = 360, 1320
    return reports.AnomalyRules(tank_ml=rng.choice([20_000, 50_000, 74_000, 200_000]),
                                work_start_minute=start, work_end_minute=end)


def summary_of(lines: list[reports.VehicleCost]) -> reports.FleetCostSummary:
    spends = [x.spend_fen for x in lines if x.spend_fen > 0]
    return reports.FleetCostSummary(
        vehicle_count=len(lines), anomalous_vehicle_count=sum(1 for x in lines if x.anomalies),
        spend_fen=sum(x.spend_fen for x in lines), volume_ml=sum(x.volume_ml for x in lines),
        sale_count=sum(x.sale_count for x in lines),
        median_spend_fen=int(statistics.median(spends)) if spends else 0)


async def check_pages(database: Database, parent: str, start: dt.datetime, end: dt.datetime,
                      rules: reports.AnomalyRules, want: list[reports.VehicleCost], max_lag: int) -> None:
    """Every page shape walks the lines it selects once each, in its order,
    with the whole fleet's summary and top spenders on every page."""
    summary = summary_of(want)
    top = sorted((x for x in want if x.spend_fen > 0), key=lambda x: (-x.spend_fen, x.label, x.account_id))
    for anomalies_only, by_spend, size in itertools.product((False, True), (False, True), (1, 4)):
        selected = [x for x in want if x.anomalies or not anomalies_only]
        if by_spend:
            selected.sort(key=lambda x: (-x.spend_fen, x.label, x.account_id))
        walked: list[reports.VehicleCost] = []
        offset: int | None = 0
        while offset is not None:
            page = reports.ReportPage(offset=offset, limit=size, anomalies_only=anomalies_only,
                                      by_spend=by_spend, top_spenders=3)
            got = await reports.fleet_costs(database, uuid.UUID(parent), start, end, rules, page,
                                            max_lag=max_lag)
            assert got.summary == summary and got.top_spenders == top[:3]
            assert len(got.vehicles) <= size
            walked += got.vehicles
            offset = got.next_offset
            assert len(walked) < 100  # bounded: six vehicles
        assert walked == selected, (anomalies_only, by_spend, size)


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
        # the first vehicle drives most: far above the fleet's median
        vehicle, card = rng.choices(ids, weights=[8] + [1] * (len(ids) - 1))[0]
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
    rules_of = [random_rules(rng) for _ in periods]

    async def scenario() -> None:
        database = Database(database_url, min_size=1, max_size=1, timeout_s=30)
        await database.open()
        try:
            async def check(stage: str) -> None:
                seen: set[reports.VehicleAnomaly] = set()
                for (start, end), rules in zip(periods, rules_of, strict=True):
                    want = reference(db, parent, start, end, rules)
                    seen.update(a for x in want for a in x.anomalies)
                    for lag in (top, 0):
                        # through the rollup and the entries past it, however many (max_lag=top);
                        # from the holds alone while the rollup lags behind more (max_lag=0)
                        got = await reports.fleet_costs(database, uuid.UUID(parent), start, end,
                                                        rules, max_lag=lag)
                        assert got.vehicles == want, (stage, start, end, lag)
                        assert got.summary == summary_of(want) and got.next_offset is None
                    await check_pages(database, parent, start, end, rules, want, top)
                assert seen == set(reports.VehicleAnomaly)  # every flag was put to the test

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
            row = db.execute("SELECT vehicle_id, grain, bucket, volume_ml, max_fill_ml, fill_minutes"
                             " FROM fc.vehicle_costs WHERE NOT 1439 = ANY (fill_minutes) LIMIT 1").fetchone()
            assert row is not None
            key = {"v": row[0], "g": row[1], "b": row[2]}
            for tamper in ("volume_ml = volume_ml + 1", "max_fill_ml = max_fill_ml + 1",
                           "fill_minutes = fill_minutes || 1439::smallint"):
                db.execute(f"UPDATE fc.vehicle_costs SET {tamper}"
                           " WHERE (vehicle_id, grain, bucket) = (%(v)s, %(g)s, %(b)s)", key)
                assert "cost_rollup_matches_sales" in {v.check for v in verify.run(database_url)}, tamper
                db.execute("UPDATE fc.vehicle_costs SET volume_ml = %(vol)s, max_fill_ml = %(fill)s,"
                           " fill_minutes = %(minutes)s"
                           " WHERE (vehicle_id, grain, bucket) = (%(v)s, %(g)s, %(b)s)",
                           {**key, "vol": row[3], "fill": row[4], "minutes": row[5]})
                assert "cost_rollup_matches_sales" not in {v.check for v in verify.run(database_url)}
        finally:
            await database.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("tz", [SHANGHAI, dt.UTC, zoneinfo.ZoneInfo("America/New_York")])
def test_cost_pieces_cut_a_range_into_whole_buckets_and_part_days(tz: dt.tzinfo) -> None:
    """The pieces tile [lo, hi) with no gap or overlap; whole pieces start
    and end on their grain's bounds in the business time zone (one with
    daylight saving time too); each part lies inside one business day (the
    report reads it through that day's rollup row); business days have no
    parts."""
    rng = random.Random(1919)
    cases = [(dt.datetime(2026, 1, 1, tzinfo=UTC), dt.datetime(2026, 3, 1, tzinfo=UTC)),
             (dt.datetime(2026, 1, 31, 23, tzinfo=UTC), dt.datetime(2026, 2, 1, 1, tzinfo=UTC)),
             (dt.datetime(2026, 3, 7, tzinfo=tz), dt.datetime(2026, 3, 9, tzinfo=tz)),
             (dt.datetime(9999, 12, 30, tzinfo=UTC), dt.datetime(9999, 12, 31, 1, tzinfo=UTC))]
    for _ in range(300):
        lo = NOW - dt.timedelta(seconds=rng.randrange(400 * 86400), microseconds=rng.randrange(10**6))
        cases.append((lo, lo + dt.timedelta(seconds=rng.randrange(1, 200 * 86400))))
    for _ in range(50):
        day = (NOW - dt.timedelta(days=rng.randrange(400))).astimezone(tz).date()
        lo = dt.datetime.combine(day, dt.time(), tz)
        hi = dt.datetime.combine(day + dt.timedelta(days=rng.randrange(1, 200)), dt.time(), tz)
        assert reports.cost_pieces(lo, hi, tz).partial == [], (lo, hi)
        cases.append((lo, hi))
    for lo, hi in cases:
        pieces = reports.cost_pieces(lo, hi, tz)
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
                local = t.astimezone(tz)
                assert local.time() == dt.time(0) and (grain == reports.GRAIN_DAY or local.day == 1)
        for a, b in pieces.partial:
            day_start = dt.datetime.combine(a.astimezone(tz).date(), dt.time(), tz)
            assert b <= dt.datetime.combine(day_start.date() + dt.timedelta(days=1), dt.time(), tz)


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
