"""The backtest's chart: per rule, how often it fired and how often on a
legitimate sale it would have stopped, as inline SVG with Chinese labels
(nothing fetched; the font is the CJK one the console's pages name)."""

from __future__ import annotations

import html

from fuelcard_server.risk.backtest import Report
from markupsafe import Markup

MAX_BARS = 20
FONT = "Noto Sans CJK SC, Noto Sans CJK JP, sans-serif"


def rule_bars(report: Report) -> Markup:
    """Horizontal bars, the rules that fired most first (at most MAX_BARS)."""
    rules = sorted(report.per_rule.items(), key=lambda kv: (-kv[1].fired, kv[0]))[:MAX_BARS]
    top = max((s.fired for _, s in rules), default=0) or 1
    label_w, bar_w, row_h, head = 210, 420, 26, 46
    height = head + row_h * len(rules) + 10
    out = [f'<svg class="chart" role="img" aria-label="各规则触发次数" xmlns="http://www.w3.org/2000/svg"'
           f' width="{label_w + bar_w + 90}" height="{height}" font-family="{FONT}" font-size="12">',
           '<text x="0" y="16" font-size="14" font-weight="bold">各规则触发次数（回测）</text>',
           '<rect x="0" y="26" width="12" height="10" fill="#4a78c2"/><text x="16" y="35">触发</text>',
           '<rect x="70" y="26" width="12" height="10" fill="#d0553b"/>'
           '<text x="86" y="35">拦截的正常交易</text>']
    for i, (rule_id, s) in enumerate(rules):
        y = head + i * row_h
        fired_w = round(bar_w * s.fired / top)
        legit_w = round(bar_w * s.legit_hit / top)
        out += [f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{html.escape(rule_id)}</text>',
                f'<rect x="{label_w}" y="{y + 3}" width="{fired_w}" height="9" fill="#4a78c2"/>',
                f'<rect x="{label_w}" y="{y + 13}" width="{legit_w}" height="9" fill="#d0553b"/>',
                f'<text x="{label_w + max(fired_w, legit_w) + 6}" y="{y + 15}">{s.fired} / {s.legit_hit}'
                '</text>']
    out.append("</svg>")
    return Markup("".join(out))
