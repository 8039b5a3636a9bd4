"""The per-vehicle cost report (车辆费用报表) of the fleet console: one page
of the core's GetFleetCostReport (which reads its replica), with the flags
the core finds (异常开支预警) in Chinese, and the chart of the biggest
spenders.

The core computes every flag, the fleet's sums and median, and the page in
one pass over the fleet, so a page of a 10 000-vehicle fleet costs the
console 50 lines, not 10 000. What is flagged, and why each flag is worth a
look (the proto's VehicleAnomaly):
- ABOVE_HISTORY: spend far above the vehicle's own earlier periods;
- ABOVE_FLEET_MEDIAN: spend at least three times the median of the fleet's
  vehicles that spent anything in the period (a vehicle doing much more than
  its peers, even without a history);
- OVER_TANK: a single fill of more litres than the tank the manager states
  for the report (default DEFAULT_TANK_L): fuel that cannot all have gone
  into this vehicle;
- OUTSIDE_HOURS: fills outside the fleet's working hours (Beijing time;
  default 06:00-22:00), when vehicles should be parked.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass

from fuelcard.v1 import control_pb2

from fuelcard_console.fleet_forms import fen_to_yuan

BUSINESS_TZ = dt.timezone(dt.timedelta(hours=8))  # Asia/Shanghai: no DST
DEFAULT_TANK_L = 200
DEFAULT_WORK_START = 6 * 60
DEFAULT_WORK_END = 22 * 60
CHART_ROWS = 20

FLAG_TEXT_ZH = {
    control_pb2.VEHICLE_ANOMALY_ABOVE_HISTORY: "开支远高于该车历史均值",
    control_pb2.VEHICLE_ANOMALY_ABOVE_FLEET_MEDIAN: "开支超过车队中位数的 3 倍",
    control_pb2.VEHICLE_ANOMALY_OVER_TANK: "单次加油量超过油箱容量",
    control_pb2.VEHICLE_ANOMALY_OUTSIDE_HOURS: "在工作时间以外加油",
}


@dataclass(frozen=True)
class Settings:
    """What the manager holds the fleet to in the report's form."""

    tank_ml: int = DEFAULT_TANK_L * 1000
    work_start: int = DEFAULT_WORK_START
    work_end: int = DEFAULT_WORK_END


def flag_text(line: control_pb2.VehicleCost) -> list[str]:
    """The line's anomalies in Chinese (one the console does not know yet
    is still shown, by its number)."""
    return [FLAG_TEXT_ZH.get(a, f"异常 {int(a)}") for a in line.anomalies]


def chart_svg(top: Sequence[control_pb2.VehicleCost], title: str) -> str:
    """A horizontal bar chart of the biggest spenders (the core's
    top_spenders, biggest first), as inline SVG: Chinese labels in Noto Sans
    CJK (the browser's fonts; nothing is fetched), flagged vehicles in red."""
    top = [x for x in top if x.spend_fen > 0][:CHART_ROWS]
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
        colour = "#c62828" if x.anomalies else "#1565c0"
        name = esc(x.label or "(无车牌)")
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{name}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{length}" height="{row_h - 8}" fill="{colour}">'
                     f'<title>{esc(x.label)}：{fen_to_yuan(x.spend_fen)} 元</title></rect>')
        parts.append(f'<text x="{left + length + 6}" y="{y + 15}">{fen_to_yuan(x.spend_fen)} 元'
                     f'{" ⚠" if x.anomalies else ""}</text>')
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
