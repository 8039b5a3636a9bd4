"""The SRE's page: the core's health, replica lag, throughput and latency
(sampled by fuelcard_console.sre, which says where each number comes from),
refreshed in place every few seconds by static/console.js."""

from __future__ import annotations

import datetime as dt
import math

from aiohttp import web

from fuelcard_console.auth import ConsoleUser, Role, requires
from fuelcard_console.charts import Series, line_chart
from fuelcard_console.context import console_context
from fuelcard_console.sre import SERVICE_ZH, STATUS_ZH, Sample
from fuelcard_console.views import render

MAIN_PAGE = "/console/sre/"
REFRESH_S = 5
BEIJING = dt.timezone(dt.timedelta(hours=8))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(MAIN_PAGE, main)


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return "> 10 s" if math.isinf(value) else f"≤ {value:g} ms"


def _charts(samples: list[Sample]) -> list[str]:
    labels = [s.at.astimezone(BEIJING).strftime("%H:%M:%S") for s in samples]
    charts = [line_chart("吞吐量（每秒）", labels, [
        Series("数据库事务/秒", [s.db_tps for s in samples]),
        Series("RPC 调用/秒", [s.rpc_per_s for s in samples])], y_unit="次/秒")]
    latency = [(s.p50_ms, s.p99_ms) for s in samples]
    charts.append(line_chart("RPC 延迟（毫秒）", labels, [
        Series("P50 延迟", [p50 if p50 is None or math.isfinite(p50) else None for p50, _ in latency]),
        Series("P99 延迟", [p99 if p99 is None or math.isfinite(p99) else None for _, p99 in latency])],
        y_unit="毫秒"))
    charts.append(line_chart("副本延迟（秒）", labels, [
        Series("报表副本回放延迟", [s.reports_lag_s for s in samples]),
        Series("备库最大延迟", [max((b.lag_s for b in s.standbys), default=None) for s in samples])],
        y_unit="秒"))
    return charts


@requires(Role.SRE)
async def main(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
    sampler = console_context(request).console.sre
    latest = sampler.latest
    if latest is None:  # the edge just started: take the first sample now
        latest = await sampler.sample_once()
    samples = list(sampler.samples)
    return render("sre/main.html", request, {
        "sample": latest, "refresh_s": REFRESH_S,
        "at": latest.at.astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S"),
        "health": [(SERVICE_ZH.get(name, name), name, status, STATUS_ZH.get(status, status))
                   for name, status in latest.health],
        "p50": _ms(latest.p50_ms), "p99": _ms(latest.p99_ms),
        "metrics_configured": console_context(request).settings.metrics_url is not None,
        "charts": _charts(samples)})
