"""The per-vehicle cost report (车辆费用报表) of the fleet console: the core's
GetFleetCostReport lines, the fills behind them (read from the reports
database, never the primary), the anomaly flags (异常开支预警) and the chart.

What is flagged, and why each flag is worth a look:
- HISTORY: spend far above the vehicle's own earlier periods (the core's
  flag: at least twice its mean over at least three earlier periods);
- FLEET_MEDIAN: spend at least FLEET_MEDIAN_FACTOR times the median of the
  fleet's vehicles that spent anything in the period (a vehicle doing much
  more than its peers, even without a history);
- OVER_TANK: a single fill of more litres than the tank the manager states
  for the report (default DEFAULT_TANK_L): fuel that cannot all have gone
  into this vehicle;
- OUTSIDE_HOURS: fills outside the fleet's working hours (local time,
  Asia/Shanghai; default 06:00-22:00), when vehicles should be parked.
"""

from __future__ import annotations

import datetime as dt
import html
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fuelcard_console.fleet_forms import fen_to_yuan

BUSINESS_TZ = dt.timezone(dt.timedelta(hours=8))  # Asia/Shanghai: no DST
FLEET_MEDIAN_FACTOR = 3
DEFAULT_TANK_L = 200
DEFAULT_WORK_START = 6 * 60
DEFAULT_WORK_END = 22 * 60
CHART_ROWS = 20

FLAG_TEXT_ZH = {
    "HISTORY": "开支远高于该车历史均值",
    "FLEET_MEDIAN": f"开支超过车队中位数的 {FLEET_MEDIAN_FACTOR} 倍",
    "OVER_TANK": "单次加油量超过油箱容量",
    "OUTSIDE_HOURS": "在工作时间以外加油",
}

# Per vehicle of the fleet, in [start, end): the largest fill, the fills above
# the tank and the fills outside the working hours. The same sales as the
# core's report: confirmed holds, by the vehicle that spent (spender).
FILLS_SQL = """
    SELECT v.uid::text,
           coalesce(max(h.volume_ml), 0)::bigint,
           count(*) FILTER (WHERE h.volume_ml > %(tank_ml)s),
           count(*) FILTER (WHERE NOT (
               CASE WHEN %(work_start)s < %(work_end)s
                    THEN m.minute >= %(work_start)s AND m.minute < %(work_end)s
                    ELSE m.minute >= %(work_start)s OR m.minute < %(work_end)s END))
      FROM fc.accounts v
      JOIN fc.holds h ON h.spender_account_id = v.id
      CROSS JOIN LATERAL (SELECT (extract(hour FROM h.closed_at AT TIME ZONE 'Asia/Shanghai') * 60
                                  + extract(minute FROM h.closed_at AT TIME ZONE 'Asia/Shanghai')
                                  )::integer AS minute) m
     WHERE v.parent_id = %(parent)s
       AND h.state = fc.hold_state_confirmed()
       AND h.closed_at >= %(start)s AND h.closed_at < %(end)s
     GROUP BY v.uid"""


class CostLine(Protocol):
    """A line of GetFleetCostReport (control_pb2.VehicleCost)."""

    @property
    def account_id(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def spend_fen(self) -> int: ...
    @property
    def volume_ml(self) -> int: ...
    @property
    def sale_count(self) -> int: ...
    @property
    def baseline_spend_fen(self) -> int: ...
    @property
    def anomaly(self) -> bool: ...


@dataclass(frozen=True)
class Fills:
    max_fill_ml: int = 0
    over_tank: int = 0
    outside_hours: int = 0


@dataclass(frozen=True)
class ReportLine:
    account_id: str
    label: str
    spend_fen: int
    volume_ml: int
    sale_count: int
    baseline_spend_fen: int
    fills: Fills
    flags: tuple[str, ...]

    @property
    def flag_text(self) -> list[str]:
        return [FLAG_TEXT_ZH[f] for f in self.flags]


@dataclass(frozen=True)
class Settings:
    tank_ml: int = DEFAULT_TANK_L * 1000
    work_start: int = DEFAULT_WORK_START
    work_end: int = DEFAULT_WORK_END


def fleet_median(spends: Sequence[int]) -> int:
    """The median spend of the vehicles that spent anything (idle vehicles
    would drag it to 0 and flag every vehicle that drove)."""
    active = [s for s in spends if s > 0]
    return int(statistics.median(active)) if active else 0


def flag(vehicles: Sequence[CostLine], fills: dict[str, Fills]) -> list[ReportLine]:
    """The report's lines with their flags."""
    median = fleet_median([v.spend_fen for v in vehicles])
    out = []
    for v in vehicles:
        f = fills.get(v.account_id, Fills())
        flags = []
        if v.anomaly:
            flags.append("HISTORY")
        if median and v.spend_fen >= FLEET_MEDIAN_FACTOR * median:
            flags.append("FLEET_MEDIAN")
        if f.over_tank:
            flags.append("OVER_TANK")
        if f.outside_hours:
            flags.append("OUTSIDE_HOURS")
        out.append(ReportLine(
            account_id=v.account_id, label=v.label, spend_fen=v.spend_fen, volume_ml=v.volume_ml,
            sale_count=v.sale_count, baseline_spend_fen=v.baseline_spend_fen, fills=f,
            flags=tuple(flags)))
    return out


def chart_svg(lines: Sequence[ReportLine], title: str) -> str:
    """A horizontal bar chart of the top CHART_ROWS vehicles by spend, as
    inline SVG: Chinese labels in Noto Sans CJK (the browser's fonts; nothing
    is fetched), flagged vehicles in red."""
    top = sorted((x for x in lines if x.spend_fen > 0), key=lambda x: (-x.spend_fen, x.label))
    top = top[:CHART_ROWS]
    row_h, left, width, bar_w = 24, 150, 720, 440
    height = 60 + row_h * max(1, len(top))
    biggest = max((x.spend_fen for x in top), default=0)
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{esc(title)}" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="Noto Sans CJK SC, Noto Sans CJK, Source Han Sans SC, sans-serif" font-size="13">',
        f'<text x="{width // 2}" y="20" text-anchor="middle" font-size="15">{esc(title)}</text>',
    ]
    if not top:
        parts.append(f'<text x="{width // 2}" y="48" text-anchor="middle">本期没有消费</text>')
    for i, x in enumerate(top):
        y = 34 + i * row_h
        length = max(1, round(bar_w * x.spend_fen / biggest)) if biggest else 0
        colour = "#c62828" if x.flags else "#1565c0"
        name = esc(x.label or "(无车牌)")
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{name}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{length}" height="{row_h - 8}" fill="{colour}">'
                     f'<title>{esc(x.label)}：{fen_to_yuan(x.spend_fen)} 元</title></rect>')
        parts.append(f'<text x="{left + length + 6}" y="{y + 15}">{fen_to_yuan(x.spend_fen)} 元'
                     f'{" ⚠" if x.flags else ""}</text>')
    legend_y = height - 10
    parts.append(f'<text x="{left}" y="{legend_y}" fill="#555">单位：元；红色为有异常标记的车辆</text>')
    parts.append("</svg>")
    return "".join(parts)


def month_bounds(month: str) -> tuple[dt.datetime, dt.datetime]:
    """'2026-11' -> its start and end (exclusive) in the business time zone."""
    year, number = (int(p) for p in month.split("-"))
    start = dt.datetime(year, number, 1, tzinfo=BUSINESS_TZ)
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=BUSINESS_TZ)
    return start, end


def previous_month(now: dt.datetime) -> str:
    local = now.astimezone(BUSINESS_TZ)
    first = local.replace(day=1)
    last = first - dt.timedelta(days=1)
    return f"{last.year:04d}-{last.month:02d}"


def this_month(now: dt.datetime) -> str:
    local = now.astimezone(BUSINESS_TZ)
    return f"{local.year:04d}-{local.month:02d}"


class ReportCache:
    """Reports computed in the last TTL, by fleet, period and settings.

    A big fleet's report costs the core seconds (GetFleetCostReport reads
    the period and six periods before it, for the baseline), and its 50-row
    pages, the flagged-only view and the chart all read the same lines: the
    first view computes them, the next minute reuses them. Reports read a
    replica anyway, so a minute old is within what they promise. Bounded."""

    def __init__(self, ttl: dt.timedelta = dt.timedelta(seconds=60), max_entries: int = 64) -> None:
        self._ttl, self._max = ttl, max_entries
        self._items: dict[tuple[object, ...], tuple[dt.datetime, list[ReportLine]]] = {}

    def get(self, key: tuple[object, ...], now: dt.datetime) -> list[ReportLine] | None:
        hit = self._items.get(key)
        if hit is None or now - hit[0] > self._ttl or now < hit[0]:
            return None
        return hit[1]

    def put(self, key: tuple[object, ...], lines: list[ReportLine], now: dt.datetime) -> None:
        if key not in self._items and len(self._items) >= self._max:
            del self._items[min(self._items, key=lambda k: self._items[k][0])]
        self._items[key] = (now, lines)


REPORTS = ReportCache()
