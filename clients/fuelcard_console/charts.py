"""Charts as inline SVG, drawn on the server: Chinese titles, axis labels and
legends set in "Noto Sans CJK SC" (Debian's fonts-noto-cjk, which
scripts/bootstrap installs), nothing fetched from a CDN, no script. A page
puts the returned markup in its template with `|safe` (every text in it is
escaped here)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

FONT = "'Noto Sans CJK SC', 'Noto Sans SC', sans-serif"
COLOURS = ("#0b6e4f", "#d97706", "#2563eb", "#b42318", "#7c3aed")


@dataclass(frozen=True)
class Series:
    label: str  # shown in the legend (Chinese welcome)
    points: Sequence[float | None]  # one per x label; None: no value at that point


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return float(step * exponent)
    return float(10 * exponent)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def line_chart(title: str, x_labels: Sequence[str], series: Sequence[Series], *, y_unit: str = "",
               width: int = 560, height: int = 240) -> str:
    """A line chart: one line per series over the same x labels."""
    left, right, top, bottom = 56, 24, 44, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series for v in s.points if v is not None and math.isfinite(v)]
    y_max = _nice_max(max(values, default=0.0))
    n = max(len(x_labels), 1)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - min(v, y_max) / y_max)

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{escape(title, {chr(34): "&quot;"})}" font-family="{FONT}">',
             f'<text x="{left}" y="18" font-size="15" font-weight="bold">{escape(title)}</text>']
    for k in range(5):  # the y grid and its labels
        v = y_max * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#d9e2ec" stroke-width="1"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{escape(_fmt(v))}</text>')
    if y_unit:
        parts.append(f'<text x="{left - 6}" y="{top - 8}" font-size="11" text-anchor="end">'
                     f'{escape(y_unit)}</text>')
    shown = max(1, math.ceil(n / 6))  # at most about six x labels
    for i, label in enumerate(x_labels):
        if i % shown == 0 or i == n - 1:
            anchor = "end" if i == n - 1 and n > 1 else "middle"
            parts.append(f'<text x="{x(i):.1f}" y="{height - bottom + 16}" font-size="11" '
                         f'text-anchor="{anchor}">{escape(label)}</text>')
    for j, s in enumerate(series):
        colour = COLOURS[j % len(COLOURS)]
        runs: list[list[str]] = [[]]
        for i, point in enumerate(s.points):
            if point is None or not math.isfinite(point):
                runs.append([])
                continue
            runs[-1].append(f"{x(i):.1f},{y(point):.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour}"/>')
            elif run:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                             f'points="{" ".join(run)}"/>')
        lx = left + j * 150
        parts.append(f'<rect x="{lx}" y="{height - 16}" width="12" height="4" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 16}" y="{height - 10}" font-size="12">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, labels: Sequence[str], series: Sequence[Series], *, y_unit: str = "",
              width: int = 560, height: int = 300, flagged: Sequence[bool] = ()) -> str:
    """Grouped bars: one group per label, one bar per series. `flagged[i]`
    marks group i (an anomaly: its label drawn in red with a ⚠)."""
    left, right, top, bottom = 64, 12, 44, 96
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series for v in s.points if v is not None and math.isfinite(v)]
    y_max = _nice_max(max(values, default=0.0))
    n, k = max(len(labels), 1), max(len(series), 1)
    group_w = plot_w / n
    bar_w = max(1.0, group_w * 0.8 / k)

    def y(v: float) -> float:
        return top + plot_h * (1 - max(0.0, min(v, y_max)) / y_max)

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{escape(title, {chr(34): "&quot;"})}" font-family="{FONT}">',
             f'<text x="{left}" y="18" font-size="15" font-weight="bold">{escape(title)}</text>']
    for step in range(5):
        v = y_max * step / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                     'stroke="#d9e2ec" stroke-width="1"/>')
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{escape(_fmt(v))}</text>')
    if y_unit:
        parts.append(f'<text x="{left - 6}" y="{top - 8}" font-size="11" text-anchor="end">'
                     f'{escape(y_unit)}</text>')
    shown = max(1, math.ceil(n / 12))
    for i, label in enumerate(labels):
        x0 = left + i * group_w + group_w * 0.1
        for j, s in enumerate(series):
            point = s.points[i] if i < len(s.points) else None
            if point is None or not math.isfinite(point):
                continue
            parts.append(f'<rect x="{x0 + j * bar_w:.1f}" y="{y(point):.1f}" width="{bar_w:.1f}" '
                         f'height="{top + plot_h - y(point):.1f}" fill="{COLOURS[j % len(COLOURS)]}"/>')
        if i % shown == 0:
            flag = i < len(flagged) and flagged[i]
            cx = left + (i + 0.5) * group_w
            parts.append(f'<text x="{cx:.1f}" y="{top + plot_h + 14}" font-size="11" text-anchor="end" '
                         f'transform="rotate(-35 {cx:.1f} {top + plot_h + 14})"'
                         f'{" fill=" + chr(34) + "#b42318" + chr(34) if flag else ""}>'
                         f'{escape(("⚠ " if flag else "") + label)}</text>')
    for j, s in enumerate(series):
        lx = left + j * 150
        parts.append(f'<rect x="{lx}" y="{height - 14}" width="12" height="8" '
                     f'fill="{COLOURS[j % len(COLOURS)]}"/>')
        parts.append(f'<text x="{lx + 16}" y="{height - 6}" font-size="12">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
