"""Latency recording (HdrHistogram, microseconds) and merging across processes.

Each generator process keeps one full-precision histogram per RPC for the
whole run and a coarse one per RPC per time bucket (for latency over time).
They travel to the parent as HdrHistogram's compressed encoding and are added
together there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes: anything slower is recorded as two minutes
DIGITS = 3
SERIES_DIGITS = 2

PERCENTILES = (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("p999_ms", 99.9))


def new_histogram(digits: int = DIGITS) -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def record(h: HdrHistogram, seconds: float) -> None:
    us = int(seconds * 1_000_000)
    h.record_value(min(max(us, LOWEST_US), HIGHEST_US))


def summary(h: HdrHistogram) -> dict[str, float]:
    """count, percentiles and max in milliseconds."""
    count = int(h.get_total_count())
    out: dict[str, float] = {"count": count}
    for name, p in PERCENTILES:
        out[name] = round(h.get_value_at_percentile(p) / 1000.0, 3) if count else 0.0
    out["max_ms"] = round(h.get_max_value() / 1000.0, 3) if count else 0.0
    out["mean_ms"] = round(h.get_mean_value() / 1000.0, 3) if count else 0.0
    return out


def percentile_curve(h: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, latency ms) points for a distribution plot."""
    points: list[tuple[float, float]] = []
    if not h.get_total_count():
        return points
    p = 0.0
    while p < 99.9999:
        points.append((p, h.get_value_at_percentile(p) / 1000.0))
        # evenly spaced on the 1/(1-p) axis
        remaining = 100.0 - p
        p = 100.0 - remaining / 1.25 if remaining > 1e-4 else 100.0
    points.append((100.0, h.get_max_value() / 1000.0))
    return points


@dataclass
class Recorder:
    """What one generator process measured."""

    bucket_s: float
    hists: dict[str, HdrHistogram] = field(default_factory=dict)
    series: dict[str, dict[int, HdrHistogram]] = field(default_factory=dict)
    cycles_by_bucket: dict[int, int] = field(default_factory=dict)

    def latency(self, rpc: str, seconds: float, at_s: float) -> None:
        """One answered call of `rpc` that took `seconds`, started `at_s`
        seconds into the measured window."""
        h = self.hists.get(rpc)
        if h is None:
            h = self.hists[rpc] = new_histogram()
        record(h, seconds)
        bucket = max(int(at_s // self.bucket_s), 0)
        per = self.series.setdefault(rpc, {})
        hb = per.get(bucket)
        if hb is None:
            hb = per[bucket] = new_histogram(SERIES_DIGITS)
        record(hb, seconds)

    def cycle_done(self, at_s: float) -> None:
        bucket = max(int(at_s // self.bucket_s), 0)
        self.cycles_by_bucket[bucket] = self.cycles_by_bucket.get(bucket, 0) + 1

    def encode(self) -> dict[str, Any]:
        return {
            "hists": {rpc: h.encode() for rpc, h in self.hists.items()},
            "series": {rpc: {b: h.encode() for b, h in per.items()}
                       for rpc, per in self.series.items()},
            "cycles_by_bucket": dict(self.cycles_by_bucket),
        }


@dataclass
class Merged:
    """Histograms of all generator processes added together."""

    bucket_s: float
    hists: dict[str, HdrHistogram] = field(default_factory=dict)
    series: dict[str, dict[int, HdrHistogram]] = field(default_factory=dict)
    cycles_by_bucket: dict[int, int] = field(default_factory=dict)

    def add(self, encoded: dict[str, Any]) -> None:
        for rpc, blob in encoded["hists"].items():
            h = self.hists.get(rpc)
            if h is None:
                h = self.hists[rpc] = new_histogram()
            h.decode_and_add(blob)
        for rpc, per in encoded["series"].items():
            mine = self.series.setdefault(rpc, {})
            for bucket, blob in per.items():
                hb = mine.get(bucket)
                if hb is None:
                    hb = mine[bucket] = new_histogram(SERIES_DIGITS)
                hb.decode_and_add(blob)
        for bucket, n in encoded["cycles_by_bucket"].items():
            self.cycles_by_bucket[bucket] = self.cycles_by_bucket.get(bucket, 0) + n

    def latency(self) -> dict[str, dict[str, float]]:
        return {rpc: summary(h) for rpc, h in sorted(self.hists.items())}

    def timeline(self) -> dict[str, list[dict[str, float]]]:
        """Per RPC, per time bucket: start second, count, p50, p99, max (ms)."""
        out: dict[str, list[dict[str, float]]] = {}
        for rpc, per in sorted(self.series.items()):
            rows = []
            for bucket in sorted(per):
                h = per[bucket]
                rows.append({"t_s": round(bucket * self.bucket_s, 3),
                             "count": int(h.get_total_count()),
                             "p50_ms": h.get_value_at_percentile(50) / 1000.0,
                             "p99_ms": h.get_value_at_percentile(99) / 1000.0,
                             "max_ms": h.get_max_value() / 1000.0})
            out[rpc] = rows
        return out
