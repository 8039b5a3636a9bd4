"""The warehouse reports: each a CSV and a PNG chart.

  fleet-costs     per-vehicle cost over the last period with anomaly flags
  station-sales   sales per station and product per day
  tiers           tier distribution (accounts and their spend)
  points          points liability month by month
  recharges       recharges per channel per month, net of their refunds
  heatmap         sales density by station location

Queries are plain SQL over the star schema (DuckDB or PostgreSQL); the
arithmetic over days is done here, in integers for money.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuelcard_analytics.warehouse import PRODUCTS, TIERS, Store

# The server's rule (fuelcard_server.reports): spend at least ANOMALY_FACTOR
# times the vehicle's own mean over at least MIN_BASELINE_PERIODS earlier
# periods (of up to BASELINE_PERIODS).
BASELINE_PERIODS = 6
MIN_BASELINE_PERIODS = 3
ANOMALY_FACTOR = 2


def day_of(key: int) -> dt.date:
    return dt.date(key // 10000, key // 100 % 100, key % 100)


class TooLittleHistory(ValueError):
    """A report the warehouse's history is too short for (a young warehouse:
    a new network, or a sidecar that started following lately)."""

    def __init__(self, report: str, needed_days: int, has_days: int) -> None:
        super().__init__(f"needs {needed_days} days of sales, the warehouse holds {has_days}")
        self.report, self.needed_days, self.has_days = report, needed_days, has_days


HISTORY_SQL = "SELECT min(date_key), max(date_key) FROM fact_sale"


def history_days(store: Store) -> int:
    """How many days of sales the warehouse spans (0: none yet)."""
    first, last = store.query(HISTORY_SQL)[0]
    if first is None or last is None:
        return 0
    return (day_of(int(last)) - day_of(int(first))).days + 1


# Fonts with the Chinese characters of plates (云A·10097) and names, best
# first; Debian's fonts-noto-cjk (scripts/bootstrap installs it) gives the
# first. Latin text keeps its usual face; CJK characters come from these.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC",
                "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                "Droid Sans Fallback", "AR PL UMing CN")
_CJK_FILE_HINTS = ("cjk", "sourcehan", "wqy", "droidsansfallback", "uming", "ukai")
_cjk_family: list[str | None] = []  # found once per process


def cjk_font() -> str | None:
    """The family name of a CJK font matplotlib can use, or None. Font
    files installed after matplotlib built its font cache are not in it:
    they are looked for on disk and added."""
    if _cjk_family:
        return _cjk_family[0]
    from matplotlib import font_manager

    def known() -> str | None:
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((family for family in CJK_FAMILIES if family in names), None)

    found = known()
    if found is None:
        for path in font_manager.findSystemFonts():
            if any(hint in Path(path).name.lower() for hint in _CJK_FILE_HINTS):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue  # unreadable: the next one
        found = known()
    _cjk_family.append(found)
    return found


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cjk = cjk_font()
    if cjk is not None:
        # (a list in font.family: matplotlib falls back along it glyph by
        # glyph; the generic "sans-serif" would resolve to one font only)
        plt.rcParams["font.family"] = ["DejaVu Sans", cjk]
    return plt


def _label(text: str, fallback: str) -> str:
    """A chart label: as it is when a CJK font is there to draw it (or it
    is plain ASCII), else the fallback (no squares for missing glyphs)."""
    if text and (text.isascii() or cjk_font() is not None):
        return text
    return fallback


def _legend(ax: Any, **options: Any) -> None:
    """A legend, if anything is labelled (an empty one warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


@dataclass(frozen=True)
class Output:
    name: str
    csv: Path
    png: Path
    summary: str


# --- fleet cost -------------------------------------------------------------------

# A sale's cost is what it cost after its refunds (issue 14).
FLEET_SQL = """
    SELECT v.parent_account_id, v.account_id, v.label, s.date_key,
           s.amount_fen - coalesce(r.refunded, 0), s.volume_ml
      FROM fact_sale s
      LEFT JOIN (SELECT hold_id, sum(amount_fen) AS refunded FROM fact_sale_refund
                  GROUP BY hold_id) r ON r.hold_id = s.hold_id
      JOIN dim_account v ON v.account_id = s.account_id
      JOIN dim_account p ON p.account_id = v.parent_account_id
     WHERE p.account_type = 2"""


def fleet_costs(store: Store, out: Path, period_days: int = 30) -> Output:
    rows = store.query(FLEET_SQL)
    last = max((r[3] for r in rows), default=None)
    table: list[list[Any]] = []
    if last is not None:
        end = day_of(last)
        spend: dict[tuple[str, str, str], list[int]] = defaultdict(
            lambda: [0] * (BASELINE_PERIODS + 1))
        volume: dict[tuple[str, str, str], int] = defaultdict(int)
        count: dict[tuple[str, str, str], int] = defaultdict(int)
        first_seen: dict[tuple[str, str, str], int] = {}
        for parent, vehicle, label, key, amount, vol in rows:
            back = (end - day_of(key)).days // period_days
            k = (parent, vehicle, label)
            first_seen[k] = max(first_seen.get(k, 0), back)
            if back <= BASELINE_PERIODS:
                spend[k][back] += amount
            if back == 0:
                volume[k] += vol
                count[k] += 1
        for k, periods in sorted(spend.items(), key=lambda kv: (kv[0][0], kv[0][2])):
            history = sum(periods[1:])
            n = min(BASELINE_PERIODS, first_seen[k])
            baseline = history // n if n else 0
            anomaly = n >= MIN_BASELINE_PERIODS and periods[0] * n > ANOMALY_FACTOR * history
            # Litres and the average price paid per litre, as fleet managers
            # read a fuel bill (Sinopec and WEX statements show both).
            per_litre = round(periods[0] * 1000 / volume[k]) if volume[k] else 0
            table.append([k[0], k[1], k[2], periods[0], volume[k], f"{volume[k] / 1000:.3f}",
                          per_litre, count[k], baseline, anomaly])
    path = write_csv(out / "fleet_costs.csv",
                     ["fleet_account_id", "vehicle_account_id", "label", "spend_fen",
                      "volume_ml", "litres", "fen_per_litre", "sales", "baseline_spend_fen",
                      "anomaly"], table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    shown = sorted(table, key=lambda r: -r[3])[:40]
    x = np.arange(len(shown))
    ax.bar(x - 0.2, [r[8] / 100 for r in shown], 0.4, color="#bbbbbb", label="baseline (mean)")
    ax.bar(x + 0.2, [r[3] / 100 for r in shown], 0.4,
           color=["#d62728" if r[9] else "#1f77b4" for r in shown], label="last period")
    ax.set_xticks(x, [_label(r[2], r[1][:8]) for r in shown], rotation=75, fontsize=7)
    ax.set_ylabel("yuan")
    ax.set_title(f"Fleet cost per vehicle, last {period_days} days (red: anomaly, "
                 f">= {ANOMALY_FACTOR}x own baseline)")
    _legend(ax)
    png = _save(fig, out / "fleet_costs.png")
    flagged = [r for r in table if r[9]]
    litres = sum(r[4] for r in table) / 1000
    return Output("fleet-costs", path, png, f"{len(table)} vehicles, {litres:,.1f} L,"
                  f" {len(flagged)} flagged: "
                  + ", ".join(r[2] or r[1] for r in flagged))


# --- sales per station and product per day -----------------------------------------

STATION_SALES_SQL = """
    SELECT date_key, station_id, product, count(*), sum(volume_ml), sum(amount_fen)
      FROM fact_sale GROUP BY date_key, station_id, product ORDER BY date_key, station_id, product"""


def station_sales(store: Store, out: Path) -> Output:
    rows = store.query(STATION_SALES_SQL)
    table = [[day_of(k).isoformat(), s, PRODUCTS.get(p, (str(p),))[0], n, int(v), int(a)]
             for k, s, p, n, v, a in rows]
    path = write_csv(out / "station_sales.csv",
                     ["day", "station_id", "product", "sales", "volume_ml", "amount_fen"], table)
    by_product: dict[str, dict[dt.date, float]] = defaultdict(lambda: defaultdict(float))
    for k, _, p, _, v, _ in rows:
        by_product[PRODUCTS.get(p, (str(p),))[0]][day_of(k)] += int(v) / 1000
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, series in sorted(by_product.items()):
        days = sorted(series)
        ax.plot(days, [series[d] for d in days], label=name, linewidth=0.9)
    ax.set_ylabel("litres per day")
    ax.set_title("Network fuel volume per day and product")
    _legend(ax, ncol=4, fontsize=8)
    png = _save(fig, out / "station_sales.png")
    stations = len({r[1] for r in rows})
    return Output("station-sales", path, png,
                  f"{len(table)} rows: {stations} stations x {len(by_product)} products"
                  f" over {len({r[0] for r in rows})} days")


# --- tiers ----------------------------------------------------------------------------

TIERS_SQL = """
    SELECT a.tier, count(*), coalesce(sum(s.spend), 0)
      FROM dim_account a
      LEFT JOIN (SELECT account_id, sum(amount_fen) AS spend FROM fact_sale GROUP BY account_id) s
        ON s.account_id = a.account_id
     WHERE a.account_type <> 2 OR a.parent_account_id = ''
     GROUP BY a.tier ORDER BY a.tier"""


def tiers(store: Store, out: Path) -> Output:
    rows = store.query(TIERS_SQL)
    total = sum(r[1] for r in rows) or 1
    table = [[t, TIERS.get(t, (str(t), ""))[0], TIERS.get(t, ("", str(t)))[1], n,
              round(100 * n / total, 1), int(spend)] for t, n, spend in rows]
    path = write_csv(out / "tiers.csv", ["tier", "name", "name_zh", "accounts", "share_pct",
                                         "spend_fen"], table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r[1] for r in table], [r[3] for r in table], color="#8c6d31")
    for i, r in enumerate(table):
        ax.annotate(f"{r[4]}%", (i, r[3]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("accounts")
    ax.set_title("Member tier distribution")
    png = _save(fig, out / "tiers.png")
    return Output("tiers", path, png, ", ".join(f"{r[1]} {r[3]} ({r[4]}%)" for r in table))


# --- points liability -------------------------------------------------------------------

POINTS_SQL = "SELECT date_key, kind, sum(points) FROM fact_points GROUP BY date_key, kind"


def points_liability(store: Store, out: Path) -> Output:
    rows = store.query(POINTS_SQL)
    months: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for key, kind, points in rows:
        months[day_of(key).strftime("%Y-%m")][kind] += int(points)
    table = []
    outstanding = 0
    for month in sorted(months):
        m = months[month]
        earned, redeemed, expired = m.get(3, 0), -m.get(4, 0), -m.get(7, 0)
        outstanding += sum(m.values())
        table.append([month, earned, redeemed, expired, outstanding])
    path = write_csv(out / "points_liability.csv",
                     ["month", "earned", "redeemed", "expired", "outstanding_at_month_end"], table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(table))
    ax.bar(x - 0.2, [r[1] for r in table], 0.4, label="earned", color="#2ca02c")
    ax.bar(x + 0.2, [r[2] for r in table], 0.4, label="redeemed", color="#ff7f0e")
    ax.plot(x, [r[4] for r in table], color="#000000", marker="o", label="outstanding (liability)")
    ax.set_xticks(x, [r[0] for r in table], rotation=45, fontsize=8)
    ax.set_ylabel("points")
    ax.set_title("Points liability")
    _legend(ax, fontsize=8)
    png = _save(fig, out / "points_liability.png")
    return Output("points", path, png, f"outstanding {outstanding} points"
                  f" after {len(table)} months")


# --- recharges and their refunds per channel ---------------------------------------------

CHANNELS = {1: "BANK_CARD", 2: "WECHAT_PAY", 3: "ALIPAY", 4: "ECNY", 5: "COUNTER"}
RECHARGES_SQL = """
    SELECT CAST(floor(date_key / 100.0) AS INTEGER) AS month, channel,
           CAST(sum(recharged) AS BIGINT),
           CAST(sum(refunded) AS BIGINT), CAST(sum(debited) AS BIGINT),
           CAST(sum(shortfall) AS BIGINT)
      FROM (SELECT date_key, channel, amount_fen AS recharged, 0 AS refunded, 0 AS debited,
                   0 AS shortfall FROM fact_recharge
            UNION ALL
            SELECT date_key, channel, 0, amount_fen, debited_fen, shortfall_fen
              FROM fact_refund) m
     GROUP BY 1, 2 ORDER BY 1, 2"""
# (DuckDB's "/" on integers is a true division: floor of a decimal quotient
# gives the month in both stores)


def channel_recharges(store: Store, out: Path) -> Output:
    """Per month and channel: recharged, refunded by the channel, of which
    debited from the accounts and short (a channel exception each), and the
    channel's net (recharged - refunded). Refunds are by refund date."""
    table: list[tuple[str, str, int, int, int, int, int]] = []
    for month, channel, recharged, refunded, debited, shortfall in store.query(RECHARGES_SQL):
        m = int(month)
        table.append((f"{m // 100}-{m % 100:02d}", CHANNELS.get(int(channel), str(channel)),
                      int(recharged), int(refunded), int(debited), int(shortfall),
                      int(recharged) - int(refunded)))
    path = write_csv(out / "channel_recharges.csv",
                     ["month", "channel", "recharged_fen", "refunded_fen", "debited_fen",
                      "shortfall_fen", "net_fen"], table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    months = sorted({r[0] for r in table})
    x = np.arange(len(months))
    channels = sorted({r[1] for r in table})
    width = 0.8 / max(1, len(channels))
    for i, channel in enumerate(channels):
        by_month = {r[0]: r for r in table if r[1] == channel}
        ax.bar(x + i * width, [by_month[m][6] / 100 if m in by_month else 0 for m in months],
               width, label=f"{channel} net")
        ax.scatter(x + i * width, [-by_month[m][3] / 100 if m in by_month else 0
                                   for m in months], marker="v", color="#d62728", s=12)
    ax.set_xticks(x + 0.4 - width / 2, months, rotation=45, fontsize=8)
    ax.set_ylabel("yuan (triangles: refunds)")
    ax.set_title("Recharges per channel, net of refunds")
    _legend(ax, fontsize=7)
    png = _save(fig, out / "channel_recharges.png")
    refunded = sum(r[3] for r in table)
    short = sum(r[5] for r in table)
    return Output("recharges", path, png,
                  f"recharged {yuan(sum(r[2] for r in table))}, refunded {yuan(refunded)}"
                  f" (of which {yuan(short)} not covered by the accounts)")


# --- heat map ------------------------------------------------------------------------------

HEAT_SQL = """
    SELECT st.station_id, st.name, st.latitude, st.longitude, count(s.hold_id),
           coalesce(sum(s.volume_ml), 0)
      FROM dim_station st LEFT JOIN fact_sale s ON s.station_id = st.station_id
     GROUP BY st.station_id, st.name, st.latitude, st.longitude ORDER BY st.station_id"""


def heatmap(store: Store, out: Path) -> Output:
    rows = store.query(HEAT_SQL)
    table = [[sid, name, lat, lon, n, int(v)] for sid, name, lat, lon, n, v in rows]
    path = write_csv(out / "station_heatmap.csv",
                     ["station_id", "name", "latitude", "longitude", "sales", "volume_ml"], table)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    if table:
        lat = np.array([r[2] for r in table])
        lon = np.array([r[3] for r in table])
        vol = np.array([r[5] for r in table], dtype=float) / 1000
        pad = 0.05
        gx, gy = np.meshgrid(np.linspace(lon.min() - pad, lon.max() + pad, 160),
                             np.linspace(lat.min() - pad, lat.max() + pad, 160))
        bw = max(0.02, 0.12 * float(np.ptp(lat) + np.ptp(lon)) / 2)
        density = np.zeros_like(gx)
        for x, y, w in zip(lon, lat, vol, strict=True):
            density += w * np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * bw ** 2))
        ax.imshow(density, origin="lower", cmap="inferno", aspect="auto",
                  extent=(gx.min(), gx.max(), gy.min(), gy.max()))
        ax.scatter(lon, lat, s=10 + 200 * vol / max(vol.max(), 1), facecolors="none",
                   edgecolors="#00e5ff", linewidths=0.8)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title("Sales density by station location (litres)")
    png = _save(fig, out / "station_heatmap.png")
    top = sorted(table, key=lambda r: -r[5])[:3]
    return Output("heatmap", path, png, f"{len(table)} stations; busiest "
                  + ", ".join(f"{r[0]} ({r[5] // 1000} L)" for r in top))


REPORTS: dict[str, Callable[[Store, Path], Output]] = {
    "fleet-costs": fleet_costs,
    "station-sales": station_sales,
    "tiers": tiers,
    "points": points_liability,
    "recharges": channel_recharges,
    "heatmap": heatmap,
}
