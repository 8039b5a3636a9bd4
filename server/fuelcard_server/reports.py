"""Report queries: read-only, never on a money movement's path."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from fuelcard_server import errors
from fuelcard_server.db import Database

# How many earlier periods of the same length make a vehicle's baseline, and
# how far above it spend must be to be flagged (异常开支预警).
BASELINE_PERIODS = 6
MIN_BASELINE_PERIODS = 3
ANOMALY_FACTOR = 2

PARENT_SQL = "SELECT id FROM fc.accounts WHERE uid = %s::uuid AND kind <> fc.account_kind_system()"

# The sales of the period (k = 0) and of the baseline before it (k = 1), per vehicle, in three
# disjoint parts read in one snapshot (cost_rollup.py):
#   rolled: whole UTC months and days of the rollup (purchase entries up to its watermark);
#   edges:  the parts of a day a range starts or ends inside, from the rolled sales of that
#           vehicle and day in fc.holds (through holds_by_spender, between the day's first and
#           last hold id: fc.holds has no time index, and the pump path must not pay for one);
#   tail:   the purchase entries past the watermark (the rollup's lag), from the journal.
# The whole-day and part-day pieces are cut in Python (cost_pieces).
FLEET_COST_SQL = """
    WITH vehicles AS (
        SELECT id, uid, label, created_at FROM fc.accounts WHERE parent_id = %(parent)s),
    rolled AS (
        SELECT p.k, c.vehicle_id, c.spend_fen, c.volume_ml, c.sale_count
          FROM unnest(%(pk)s::integer[], %(pgrain)s::smallint[], %(plo)s::timestamptz[],
                      %(phi)s::timestamptz[]) p (k, grain, lo, hi)
          JOIN fc.vehicle_costs c ON c.grain = p.grain AND c.bucket >= p.lo AND c.bucket < p.hi
          JOIN vehicles v ON v.id = c.vehicle_id),
    edges AS (
        SELECT e.k, h.spender_account_id AS vehicle_id, h.settled_fen, h.volume_ml
          FROM unnest(%(ek)s::integer[], %(elo)s::timestamptz[], %(ehi)s::timestamptz[]) e (k, lo, hi)
          JOIN fc.vehicle_costs c ON c.grain = 1 AND c.bucket = date_trunc('day', e.lo, 'UTC')
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
        SELECT r.k, h.spender_account_id AS vehicle_id, h.settled_fen, h.volume_ml
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
        SELECT k, vehicle_id, spend_fen, volume_ml, sale_count FROM rolled
        UNION ALL
        SELECT k, vehicle_id, settled_fen, volume_ml, 1 FROM edges
        UNION ALL
        SELECT k, vehicle_id, settled_fen, volume_ml, 1 FROM tail),
    per_vehicle AS (
        SELECT vehicle_id,
               sum(spend_fen) FILTER (WHERE k = 0) AS spend,
               sum(volume_ml) FILTER (WHERE k = 0) AS volume,
               sum(sale_count) FILTER (WHERE k = 0) AS sales,
               sum(spend_fen) FILTER (WHERE k = 1) AS history
          FROM sales GROUP BY vehicle_id)
    SELECT v.uid::text, v.label,
           coalesce(s.spend, 0)::bigint, coalesce(s.volume, 0)::bigint, coalesce(s.sales, 0)::bigint,
           coalesce(s.history, 0)::bigint,
           -- earlier periods the vehicle existed in (a period it joined part-way
           -- through counts: its sales do), up to the baseline count
           least(%(baseline)s, greatest(0, ceil(extract(epoch FROM
                 (%(start)s::timestamptz - v.created_at)) / %(span_s)s)))::integer
      FROM vehicles v LEFT JOIN per_vehicle s ON s.vehicle_id = v.id
     ORDER BY v.label, v.uid"""

# How far behind the newest journal entry the rollup may be for the report to read it. Further
# behind (a database that has just been migrated, before the job has caught up: some seconds
# per 100 000 sales) the entries past the watermark cost more than the rollup saves, and the
# report reads every hold instead, as it did before the rollup: exact either way.
ROLLUP_MAX_LAG = 50_000
LAG_SQL = ("SELECT coalesce((SELECT max(id) FROM fc.journal), 0)"
           " - (SELECT rolled_id FROM fc.cost_rollup_state)")
# The report from fc.holds alone (the rollup lagging too far).
HOLDS_FLEET_COST_SQL = """
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


# The rollup's grains (fc.vehicle_costs.grain).
GRAIN_DAY = 1
GRAIN_MONTH = 2
_DAY = dt.timedelta(days=1)
# Ranges are cut off here, so that no bucket bound runs past year 9999 (a request may reach
# its end): no sale closes this late (closed_at is the server's clock).
_LAST = dt.datetime(9999, 12, 1, tzinfo=dt.UTC)


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
    lo <= bucket < hi) and the parts of days left at its ends (lo, hi)."""
    whole: list[tuple[int, dt.datetime, dt.datetime]]
    partial: list[tuple[dt.datetime, dt.datetime]]


def cost_pieces(lo: dt.datetime, hi: dt.datetime) -> CostPieces:
    lo, hi = min(lo.astimezone(dt.UTC), _LAST), min(hi.astimezone(dt.UTC), _LAST)
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


@dataclass(frozen=True)
class VehicleCost:
    account_id: str
    label: str
    spend_fen: int
    volume_ml: int
    sale_count: int
    baseline_spend_fen: int
    anomaly: bool


def is_anomaly(spend_fen: int, history_fen: int, history_periods: int) -> bool:
    """Spend far above the vehicle's own history: at least ANOMALY_FACTOR
    times its mean over enough earlier periods."""
    if history_periods < MIN_BASELINE_PERIODS:
        return False
    return spend_fen * history_periods > ANOMALY_FACTOR * history_fen


async def fleet_costs(db: Database, parent_uid: uuid.UUID, start: dt.datetime,
                      end: dt.datetime, max_lag: int = ROLLUP_MAX_LAG) -> list[VehicleCost]:
    row = await db.fetch_one(PARENT_SQL, (parent_uid,))
    if row is None:
        raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
    span_s = (end - start).total_seconds()
    base = start - (end - start) * BASELINE_PERIODS
    whole: list[tuple[int, int, dt.datetime, dt.datetime]] = []
    partial: list[tuple[int, dt.datetime, dt.datetime]] = []
    for k, (lo, hi) in enumerate(((start, end), (base, start))):
        pieces = cost_pieces(lo, hi)
        whole += [(k, *p) for p in pieces.whole]
        partial += [(k, *p) for p in pieces.partial]
    lag = await db.fetch_one(LAG_SQL, {})
    assert lag is not None
    if lag[0] > max_lag:
        rows = await db.fetch_all(HOLDS_FLEET_COST_SQL, {
            "parent": row[0], "start": start, "end": end, "span_s": span_s,
            "baseline": BASELINE_PERIODS})
    else:
        rows = await db.fetch_all(FLEET_COST_SQL, {
            "parent": row[0], "start": start, "end": end, "base": base, "span_s": span_s,
            "baseline": BASELINE_PERIODS,
            "pk": [p[0] for p in whole], "pgrain": [p[1] for p in whole],
            "plo": [p[2] for p in whole], "phi": [p[3] for p in whole],
            "ek": [p[0] for p in partial], "elo": [p[1] for p in partial],
            "ehi": [p[2] for p in partial]})
    out = []
    for uid, label, spend, volume, count, history, periods in rows:
        baseline = history // periods if periods else 0
        out.append(VehicleCost(uid, label, spend, volume, count, baseline,
                               is_anomaly(spend, history, periods)))
    return out
