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

FLEET_COST_SQL = """
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
                      end: dt.datetime) -> list[VehicleCost]:
    row = await db.fetch_one(PARENT_SQL, (parent_uid,))
    if row is None:
        raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
    span_s = (end - start).total_seconds()
    rows = await db.fetch_all(FLEET_COST_SQL, {
        "parent": row[0], "start": start, "end": end, "span_s": span_s,
        "baseline": BASELINE_PERIODS})
    out = []
    for uid, label, spend, volume, count, history, periods in rows:
        baseline = history // periods if periods else 0
        out.append(VehicleCost(uid, label, spend, volume, count, baseline,
                               is_anomaly(spend, history, periods)))
    return out
