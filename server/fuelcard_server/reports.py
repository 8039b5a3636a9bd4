"""Report queries: read-only, never on a money movement's path."""

from __future__ import annotations

import datetime as dt
import uuid
import zoneinfo
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fuelcard.v1 import control_pb2

from fuelcard_server import errors
from fuelcard_server.db import Database
from fuelcard_server.rollups import ROLLUP_MAX_LAG

# How many earlier periods of the same length make a vehicle's baseline, and
# how far above it spend must be to be flagged (异常开支预警).
BASELINE_PERIODS = 6
MIN_BASELINE_PERIODS = 3
ANOMALY_FACTOR = 2
# A vehicle spending this many times the fleet's median is flagged too.
FLEET_MEDIAN_FACTOR = 3
# What the fill flags assume when the caller states nothing: a 200 L tank (a heavy truck's),
# working hours 06:00-22:00 (business time).
DEFAULT_TANK_ML = 200_000
DEFAULT_WORK_START_MINUTE = 6 * 60
DEFAULT_WORK_END_MINUTE = 22 * 60

PARENT_SQL = "SELECT id FROM fc.accounts WHERE uid = %s::uuid AND kind <> fc.account_kind_system()"

# A fill outside the working hours, for the sales of the period (k = 0) only. The business
# time zone is read once per statement (an uncorrelated subquery).
_OUTSIDE = """(k = 0 AND NOT fc.within_hours(
                   p_minute => fc.minute_of_day(p_at => closed_at, p_tz => (SELECT fc.business_tz())),
                   p_start => %(work_start)s, p_end => %(work_end)s))"""

# The sales of the period (k = 0) and of the baseline before it (k = 1), per vehicle, in three
# disjoint parts read in one snapshot (cost_rollup.py):
#   rolled: whole business months and days of the rollup (purchase entries up to its
#           watermark; months and days in the business time zone, as reports ask for them);
#   edges:  the parts of a day a range starts or ends inside, from the rolled sales of that
#           vehicle and day in fc.holds (through holds_by_spender, between the day's first and
#           last hold id: fc.holds has no time index, and the pump path must not pay for one);
#   tail:   the purchase entries past the watermark (the rollup's lag), from the journal.
# The whole-day and part-day pieces are cut in Python (cost_pieces). Ends with `lines`, one row
# per vehicle, which FLAGGED_SQL flags, sums and pages.
ROLLUP_LINES_SQL = """
    WITH vehicles AS (
        SELECT id, uid, label, created_at FROM fc.accounts WHERE parent_id = %(parent)s),
    rolled AS (
        SELECT p.k, c.vehicle_id, c.spend_fen, c.volume_ml, c.sale_count, c.max_fill_ml,
               -- fill_minutes is sorted (verify checks it): against working hours by day, its
               -- first and last minute tell; a night shift's gap needs a look inside (a
               -- subquery a row costs more than the rest of the report: only then)
               p.k = 0 AND CASE WHEN %(work_start)s < %(work_end)s
                   THEN c.fill_minutes[1] < %(work_start)s
                        OR c.fill_minutes[cardinality(c.fill_minutes)] >= %(work_end)s
                   ELSE EXISTS (
                       SELECT FROM unnest(c.fill_minutes) m
                        WHERE NOT fc.within_hours(p_minute => m, p_start => %(work_start)s,
                                                  p_end => %(work_end)s)) END AS outside
          FROM unnest(%(pk)s::integer[], %(pgrain)s::smallint[], %(plo)s::timestamptz[],
                      %(phi)s::timestamptz[]) p (k, grain, lo, hi)
          JOIN fc.vehicle_costs c ON c.grain = p.grain AND c.bucket >= p.lo AND c.bucket < p.hi
          JOIN vehicles v ON v.id = c.vehicle_id),
    edges AS (
        SELECT e.k, h.spender_account_id AS vehicle_id, h.settled_fen, h.volume_ml, h.closed_at
          FROM unnest(%(ek)s::integer[], %(elo)s::timestamptz[], %(ehi)s::timestamptz[]) e (k, lo, hi)
          JOIN fc.vehicle_costs c ON c.grain = 1
                                 AND c.bucket = date_trunc('day', e.lo, (SELECT fc.business_tz()))
          JOIN vehicles v ON v.id = c.vehicle_id
          JOIN fc.holds h ON h.spender_account_id = c.vehicle_id
                         AND h.id BETWEEN c.first_hold_id AND c.last_hold_id
         WHERE h.state = fc.hold_state_confirmed()
           AND h.closed_at >= e.lo AND h.closed_at < e.hi
           AND NOT EXISTS (
               SELECT FROM fc.journal j
                WHERE j.hold_id = h.id AND j.kind = fc.ledger_entry_kind_purchase()
                  AND j.id > (SELECT rolled_id FROM fc.cost_rollup_state))),
    tail AS (
        -- through the watermark as a lateral parameter: a range scan of the journal's key,
        -- and each hold by its key (OFFSET 0 keeps the planner, which cannot tell how far
        -- behind the rollup is, from hashing the whole of fc.holds for a short lag)
        SELECT r.k, h.spender_account_id AS vehicle_id, h.settled_fen, h.volume_ml, h.closed_at
          FROM fc.cost_rollup_state w
         CROSS JOIN LATERAL (SELECT j.hold_id FROM fc.journal j
                              WHERE j.id > w.rolled_id AND j.kind = fc.ledger_entry_kind_purchase()
                              OFFSET 0) j
         CROSS JOIN LATERAL (SELECT h.spender_account_id, h.settled_fen, h.volume_ml, h.closed_at,
                                    h.state
                               FROM fc.holds h WHERE h.id = j.hold_id OFFSET 0) h
          JOIN vehicles v ON v.id = h.spender_account_id
          JOIN (VALUES (0, %(start)s::timestamptz, %(end)s::timestamptz),
                       (1, %(base)s::timestamptz, %(start)s::timestamptz)) r (k, lo, hi)
            ON h.closed_at >= r.lo AND h.closed_at < r.hi
         WHERE h.state = fc.hold_state_confirmed()),
    sales AS (
        SELECT k, vehicle_id, spend_fen, volume_ml, sale_count, max_fill_ml, outside FROM rolled
        UNION ALL
        SELECT k, vehicle_id, settled_fen, volume_ml, 1, volume_ml, """ + _OUTSIDE + """
          FROM (SELECT * FROM edges UNION ALL SELECT * FROM tail) one),
    per_vehicle AS (
        SELECT vehicle_id,
               sum(spend_fen) FILTER (WHERE k = 0) AS spend,
               sum(volume_ml) FILTER (WHERE k = 0) AS volume,
               sum(sale_count) FILTER (WHERE k = 0) AS sales,
               sum(spend_fen) FILTER (WHERE k = 1) AS history,
               max(max_fill_ml) FILTER (WHERE k = 0) AS max_fill,
               bool_or(outside) AS outside
          FROM sales GROUP BY vehicle_id),
    lines AS (
        SELECT v.uid::text AS uid, v.label,
               coalesce(s.spend, 0)::bigint AS spend, coalesce(s.volume, 0)::bigint AS volume,
               coalesce(s.sales, 0)::bigint AS sales, coalesce(s.history, 0)::bigint AS history,
               -- earlier periods the vehicle existed in (a period it joined part-way
               -- through counts: its sales do), up to the baseline count
               least(%(baseline)s, greatest(0, ceil(extract(epoch FROM
                     (%(start)s::timestamptz - v.created_at)) / %(span_s)s)))::integer AS periods,
               coalesce(s.max_fill, 0)::bigint AS max_fill, coalesce(s.outside, false) AS outside
          FROM vehicles v LEFT JOIN per_vehicle s ON s.vehicle_id = v.id)"""

# The rollup's lag (read it only within rollups.ROLLUP_MAX_LAG), and the business time zone.
LAG_SQL = ("SELECT coalesce((SELECT max(id) FROM fc.journal), 0)"
           " - (SELECT rolled_id FROM fc.cost_rollup_state), fc.business_tz()")
# The same `lines` from fc.holds alone (the rollup lagging too far).
HOLDS_LINES_SQL = """
    WITH vehicles AS (
        SELECT id, uid, label, created_at FROM fc.accounts WHERE parent_id = %(parent)s),
    sales AS (
        SELECT h.spender_account_id AS vehicle, h.settled_fen, h.volume_ml, h.closed_at,
               CASE WHEN h.closed_at >= %(start)s::timestamptz THEN 0 ELSE 1 END AS k
          FROM fc.holds h JOIN vehicles v ON v.id = h.spender_account_id
         WHERE h.state = fc.hold_state_confirmed()
           AND h.closed_at >= %(base)s::timestamptz AND h.closed_at < %(end)s::timestamptz),
    lines AS (
        SELECT v.uid::text AS uid, v.label,
               coalesce(sum(s.settled_fen) FILTER (WHERE s.k = 0), 0)::bigint AS spend,
               coalesce(sum(s.volume_ml) FILTER (WHERE s.k = 0), 0)::bigint AS volume,
               count(s.vehicle) FILTER (WHERE s.k = 0) AS sales,
               coalesce(sum(s.settled_fen) FILTER (WHERE s.k = 1), 0)::bigint AS history,
               least(%(baseline)s, greatest(0, ceil(extract(epoch FROM
                     (%(start)s::timestamptz - v.created_at)) / %(span_s)s)))::integer AS periods,
               coalesce(max(s.volume_ml) FILTER (WHERE s.k = 0), 0)::bigint AS max_fill,
               coalesce(bool_or(""" + _OUTSIDE.replace("k = 0", "s.k = 0").replace(
                   "p_at => closed_at", "p_at => s.closed_at") + """), false) AS outside
          FROM vehicles v LEFT JOIN sales s ON s.vehicle = v.id
         GROUP BY v.id, v.uid, v.label, v.created_at)"""

# After `lines`: each vehicle's anomalies, the fleet's summary, the requested page and the top
# spenders, in one statement (one snapshot, one pass over the fleet): a page of a big fleet's
# report costs the fleet's sums, never the building and sending of every line. Rows:
# part 0, the summary (spend, volume, sales: the fleet's sums); part 1, the page; part 2, the
# top spenders; each in order n.
FLAGGED_SQL = """,
    med AS (
        -- the median of the vehicles that spent anything (idle ones would drag it to 0 and
        -- flag every vehicle that drove): the mean of the two middle ones, rounded down
        SELECT coalesce((min(spend) FILTER (WHERE n = (c + 1) / 2)
                         + min(spend) FILTER (WHERE n = c / 2 + 1)) / 2, 0)::bigint AS fen
          FROM (SELECT spend, row_number() OVER (ORDER BY spend) AS n, count(*) OVER () AS c
                  FROM lines WHERE spend > 0) active),
    flagged AS (
        SELECT l.*, array_remove(ARRAY[
                   CASE WHEN l.periods >= %(min_periods)s
                             AND l.spend * l.periods > %(history_factor)s * l.history
                        THEN %(above_history)s::integer END,
                   CASE WHEN m.fen > 0 AND l.spend >= %(median_factor)s * m.fen
                        THEN %(above_fleet_median)s::integer END,
                   CASE WHEN l.max_fill > %(tank_ml)s THEN %(over_tank)s::integer END,
                   CASE WHEN l.outside THEN %(outside_hours)s::integer END], NULL) AS anomalies
          FROM lines l CROSS JOIN med m),
    shown AS (
        SELECT f.*, row_number() OVER (ORDER BY CASE WHEN %(by_spend)s THEN -f.spend ELSE 0 END,
                                                f.label, f.uid) AS n
          FROM flagged f WHERE NOT %(anomalies_only)s OR cardinality(f.anomalies) > 0),
    top AS (
        SELECT f.*, row_number() OVER (ORDER BY f.spend DESC, f.label, f.uid) AS n
          FROM flagged f WHERE f.spend > 0)
    SELECT 0 AS part, 0::bigint AS n, NULL::text, NULL::text, coalesce(sum(spend), 0)::bigint,
           coalesce(sum(volume), 0)::bigint, coalesce(sum(sales), 0)::bigint, 0::bigint, 0, 0::bigint,
           NULL::integer[], count(*)::integer,
           (count(*) FILTER (WHERE cardinality(anomalies) > 0))::integer,
           (SELECT fen FROM med), (SELECT count(*) FROM shown)::integer
      FROM flagged
    UNION ALL
    SELECT 1, n, uid, label, spend, volume, sales, history, periods, max_fill, anomalies,
           NULL, NULL, NULL, NULL
      FROM shown WHERE n > %(offset)s AND (%(limit)s::bigint IS NULL OR n <= %(offset)s + %(limit)s)
    UNION ALL
    SELECT 2, n, uid, label, spend, volume, sales, history, periods, max_fill, anomalies,
           NULL, NULL, NULL, NULL
      FROM top WHERE n <= %(top)s
     ORDER BY 1, 2"""

FLEET_COST_SQL = ROLLUP_LINES_SQL + FLAGGED_SQL
HOLDS_FLEET_COST_SQL = HOLDS_LINES_SQL + FLAGGED_SQL


# The rollup's grains (fc.vehicle_costs.grain).
GRAIN_DAY = 1
GRAIN_MONTH = 2
_DAY = dt.timedelta(days=1)
# Ranges are cut off here, so that no bucket bound runs past year 9999 (a request may reach
# its end): no sale closes this late (closed_at is the server's clock).
_LAST = dt.datetime(9999, 12, 1, tzinfo=dt.UTC)  # (in any time zone still year 9999)


def _next_month(t: dt.datetime) -> dt.datetime:
    return t.replace(year=t.year + t.month // 12, month=t.month % 12 + 1)


def _ceil_day(t: dt.datetime) -> dt.datetime:
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    return day if day == t else day + _DAY


def _ceil_month(t: dt.datetime) -> dt.datetime:
    month = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return month if month == t else _next_month(month)


@dataclass(frozen=True)
class CostPieces:
    """[lo, hi) cut into whole rollup buckets (grain, lo, hi: buckets with
    lo <= bucket < hi) and the parts of days left at its ends (lo, hi). A
    report over business days (the console's) has no parts."""
    whole: list[tuple[int, dt.datetime, dt.datetime]]
    partial: list[tuple[dt.datetime, dt.datetime]]


def cost_pieces(lo: dt.datetime, hi: dt.datetime, tz: dt.tzinfo) -> CostPieces:
    """Days and months are the business time zone's (tz), as the rollup's buckets are."""
    lo, hi = min(lo, _LAST).astimezone(tz), min(hi, _LAST).astimezone(tz)
    if hi <= lo:
        return CostPieces([], [])
    day_lo, day_hi = _ceil_day(lo), _ceil_day(hi)
    if hi < day_hi:
        day_hi -= _DAY
    if day_hi <= day_lo:  # no whole day: the part of one day, or parts of two
        cut = min(day_lo, hi)
        return CostPieces([], [(a, b) for a, b in ((lo, cut), (cut, hi)) if a < b])
    whole: list[tuple[int, dt.datetime, dt.datetime]] = []
    month_lo = _ceil_month(day_lo)
    month_hi = day_hi.replace(day=1)
    if month_lo < month_hi:
        whole += [(GRAIN_MONTH, month_lo, month_hi), (GRAIN_DAY, day_lo, month_lo),
                  (GRAIN_DAY, month_hi, day_hi)]
    else:
        whole.append((GRAIN_DAY, day_lo, day_hi))
    partial = [(a, b) for a, b in ((lo, day_lo), (day_hi, hi)) if a < b]
    return CostPieces([(g, a, b) for g, a, b in whole if a < b], partial)


class VehicleAnomaly(IntEnum):
    """Why a vehicle's line deserves a look (异常开支预警); the numbers of the
    proto's VehicleAnomaly, which FLAGGED_SQL returns."""

    ABOVE_HISTORY = control_pb2.VEHICLE_ANOMALY_ABOVE_HISTORY
    ABOVE_FLEET_MEDIAN = control_pb2.VEHICLE_ANOMALY_ABOVE_FLEET_MEDIAN
    OVER_TANK = control_pb2.VEHICLE_ANOMALY_OVER_TANK
    OUTSIDE_HOURS = control_pb2.VEHICLE_ANOMALY_OUTSIDE_HOURS


@dataclass(frozen=True)
class AnomalyRules:
    """What the fill flags hold a fleet to: its vehicles' tank, and its
    working hours [start, end) in minutes of the business day (start > end:
    a night shift)."""

    tank_ml: int = DEFAULT_TANK_ML
    work_start_minute: int = DEFAULT_WORK_START_MINUTE
    work_end_minute: int = DEFAULT_WORK_END_MINUTE


@dataclass(frozen=True)
class ReportPage:
    """Which lines to return: `limit` from `offset` (None: all) of the
    vehicles in label order or biggest spend first, all of them or the
    anomalous ones only; and the `top_spenders` biggest spenders."""

    offset: int = 0
    limit: int | None = None
    anomalies_only: bool = False
    by_spend: bool = False
    top_spenders: int = 0


@dataclass(frozen=True)
class VehicleCost:
    account_id: str
    label: str
    spend_fen: int
    volume_ml: int
    sale_count: int
    baseline_spend_fen: int
    max_fill_ml: int
    anomalies: tuple[VehicleAnomaly, ...]

    @property
    def anomaly(self) -> bool:
        """Spend far above the vehicle's own history."""
        return VehicleAnomaly.ABOVE_HISTORY in self.anomalies


@dataclass(frozen=True)
class FleetCostSummary:
    vehicle_count: int
    anomalous_vehicle_count: int
    spend_fen: int
    volume_ml: int
    sale_count: int
    median_spend_fen: int


@dataclass(frozen=True)
class FleetCostReport:
    vehicles: list[VehicleCost]
    top_spenders: list[VehicleCost]
    summary: FleetCostSummary
    # the page's end, when lines follow it
    next_offset: int | None


def _line(row: tuple[Any, ...]) -> VehicleCost:
    _, _, uid, label, spend, volume, count, history, periods, max_fill, anomalies, *_ = row
    return VehicleCost(uid, label, spend, volume, count, history // periods if periods else 0,
                       max_fill, tuple(VehicleAnomaly(a) for a in anomalies))


async def fleet_costs(db: Database, parent_uid: uuid.UUID, start: dt.datetime, end: dt.datetime,
                      rules: AnomalyRules = AnomalyRules(), page: ReportPage = ReportPage(),
                      max_lag: int = ROLLUP_MAX_LAG) -> FleetCostReport:
    row = await db.fetch_one(PARENT_SQL, (parent_uid,))
    if row is None:
        raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
    span_s = (end - start).total_seconds()
    base = start - (end - start) * BASELINE_PERIODS
    params: dict[str, object] = {
        "parent": row[0], "start": start, "end": end, "base": base, "span_s": span_s,
        "baseline": BASELINE_PERIODS, "min_periods": MIN_BASELINE_PERIODS,
        "history_factor": ANOMALY_FACTOR, "median_factor": FLEET_MEDIAN_FACTOR,
        "tank_ml": rules.tank_ml, "work_start": rules.work_start_minute,
        "work_end": rules.work_end_minute,
        **{name.lower(): int(kind) for name, kind in VehicleAnomaly.__members__.items()},
        "offset": page.offset, "limit": page.limit, "anomalies_only": page.anomalies_only,
        "by_spend": page.by_spend, "top": page.top_spenders}
    lag = await db.fetch_one(LAG_SQL, {})
    assert lag is not None
    if lag[0] > max_lag:
        rows = await db.fetch_all(HOLDS_FLEET_COST_SQL, params)
    else:
        whole: list[tuple[int, int, dt.datetime, dt.datetime]] = []
        partial: list[tuple[int, dt.datetime, dt.datetime]] = []
        for k, (lo, hi) in enumerate(((start, end), (base, start))):
            pieces = cost_pieces(lo, hi, zoneinfo.ZoneInfo(lag[1]))
            whole += [(k, *p) for p in pieces.whole]
            partial += [(k, *p) for p in pieces.partial]
        rows = await db.fetch_all(FLEET_COST_SQL, {
            **params, "pk": [p[0] for p in whole], "pgrain": [p[1] for p in whole],
            "plo": [p[2] for p in whole], "phi": [p[3] for p in whole],
            "ek": [p[0] for p in partial], "elo": [p[1] for p in partial],
            "ehi": [p[2] for p in partial]})
    head = rows[0]
    assert head[0] == 0
    summary = FleetCostSummary(vehicle_count=head[11], anomalous_vehicle_count=head[12],
                               spend_fen=head[4], volume_ml=head[5], sale_count=head[6],
                               median_spend_fen=head[13])
    shown: int = head[14]
    vehicles = [_line(r) for r in rows if r[0] == 1]
    end_of_page = page.offset + len(vehicles)
    return FleetCostReport(
        vehicles=vehicles, top_spenders=[_line(r) for r in rows if r[0] == 2], summary=summary,
        next_offset=end_of_page if page.limit is not None and end_of_page < shown else None)
