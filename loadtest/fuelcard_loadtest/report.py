"""The human-readable table and the plot of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fuelcard_loadtest.stats import Merged, percentile_curve

RPC_ORDER = ("authorize", "confirm", "cancel", "recharge", "redeem", "health")


def _n(x: float) -> str:
    return f"{x:,.0f}".replace(",", " ")


def _opt(x: float | None, digits: int) -> str:
    """A figure, or "?" for one the run could not read (an external server's CPU)."""
    return "?" if x is None else f"{x:.{digits}f}"


def _rpc_rows(latency: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"  {'rpc':<10} {'count':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8}"
             f" {'max':>8}   (ms)"]
    for rpc in sorted(latency, key=lambda r: RPC_ORDER.index(r) if r in RPC_ORDER else 99):
        s = latency[rpc]
        lines.append(f"  {rpc:<10} {_n(s['count']):>9} {s['p50_ms']:>8.2f} {s['p90_ms']:>8.2f}"
                     f" {s['p99_ms']:>8.2f} {s['p999_ms']:>8.2f} {s['max_ms']:>8.2f}")
    return lines


def table(r: dict[str, Any]) -> str:
    mode = (f"closed loop, concurrency {r['concurrency']}" if r["mode"] == "closed"
            else f"open loop, {r['rate_per_s']:g} arrivals/s")
    sec = r.get("security") or {}
    security = ("mutual TLS, MACs" if sec.get("mutual_tls") else "plaintext, no MACs") + \
        (", controls" if r.get("controls") else ", no controls")
    lines = [
        "",
        f"fuelcard-loadtest  scenario {r['scenario']}  ({mode}; {security})",
        f"  {r['cards']} cards on {r['accounts']} accounts; {r['processes']} generator processes"
        + (f", {sec['terminals']} terminals (a channel each)" if sec.get("mutual_tls")
           else f" x {r['channels']} channels") + f"; target {r['target']}"
        f" ({r['server_workers'] or '?'} server processes)",
        *([f"  history: {_n(r['history_entries'])} journal entries in the data set;"
           f" database {r.get('database_mb', 0):,.0f} MB"] if r.get("history_entries") else []),
        f"  measured {r['duration_s']:.1f} s after {r['warmup_s']:g} s warm-up;"
        f" pump time {r['pump_ms'][0]:g}-{r['pump_ms'][1]:g} ms",
        "",
        f"  cycles (authorize+confirm approved) {_n(r['cycles'])}"
        f"   throughput {r['throughput_per_s']:.1f} cycles/s   all RPCs {r['rpc_per_s']:.1f}/s",
        f"  ok {_n(r['ok'])}   declined {_n(r['declined'])}   errors {_n(sum(r['errors'].values()))}"
        + (f"  {r['errors']}" if r["errors"] else ""),
    ]
    if r.get("open_loop"):
        o = r["open_loop"]
        lines.append(f"  open loop: dropped arrivals {o['dropped']}, worst scheduler lag"
                     f" {o['max_schedule_lag_ms']:.1f} ms")
    lines += ["", *_rpc_rows(r["latency"])]
    res = r.get("resources") or {}
    if res:
        lines += ["", "  CPU during the measured window (seconds of CPU per second):"
                  f" server {_opt(res.get('server_cpu_per_s'), 2)},"
                  f" postgres {_opt(res.get('postgres_cpu_per_s'), 2)},"
                  f" generator {res.get('generator_cpu_per_s', 0):.2f};"
                  f" machine busy {res.get('machine_busy_pct', 0):.0f} %,"
                  f" steal {res.get('machine_steal_pct', 0):.1f} %"]
        if res.get("server_rss_mb_max"):
            lines.append(f"  server RSS max {res['server_rss_mb_max']:.0f} MB per process"
                         f" (sum {res.get('server_rss_mb_sum_max', 0):.0f} MB)")
        if "generator_cpu_us_per_cycle" in res:
            lines.append(f"  per cycle: server {_opt(res.get('server_cpu_us_per_cycle'), 0)} µs CPU,"
                         f" postgres {_opt(res.get('postgres_cpu_us_per_cycle'), 0)} µs,"
                         f" generator {res['generator_cpu_us_per_cycle']:.0f} µs")
        if "wal_bytes_per_cycle" in res:
            lines.append(f"  per cycle: WAL {res['wal_bytes_per_cycle']:.0f} bytes in"
                         f" {res['wal_records_per_cycle']:.1f} records"
                         f" ({res.get('wal_fpi_per_cycle', 0):.2f} full-page images),"
                         f" {res['commits_per_cycle']:.2f} commits,"
                         f" {res['wal_flushes_per_cycle']:.2f} WAL flushes")
    c = r.get("ceilings")
    if c:
        lines += ["", "  ceilings, measured in this run:"]
        f = c["framework"]
        lines.append(f"    framework (no-op health Check RPC, same generator): {f['rpc_per_s']:.1f} RPC/s"
                     f" (p99 {f['p99_ms']:.2f} ms) -> {f['rpc_per_s'] / 2:.1f} cycles/s;"
                     f"  ratio {c['ratio_vs_framework']:.2f}")
        p = c["pgbench"]
        lines.append(f"    database (pgbench, same SQL, -c {p['clients']}): {p['cycles_per_s']:.1f}"
                     f" cycles/s;  ratio {c['ratio_vs_pgbench']:.2f}")
    led = r["ledger"]
    g, b = led["generator"], led["ledger"]
    lines += ["", f"  ledger: verify {'ok' if led['verify_ok'] else 'FAILED'};"
              f" confirmed {_n(g['confirmed_fen'])} fen in {_n(g['confirmed_count'])} sales"
              f" (journal {_n(b['confirmed_fen'])} fen in {_n(b['confirmed_count'])});"
              f" recharged {_n(g['recharged_fen'])} fen (journal {_n(b['recharged_fen'])});"
              f" redeemed {_n(g['redeemed_points'])} points (journal {_n(b['redeemed_points'])});"
              f" refunded {_n(g['refunded_fen'])} fen in {_n(g['refund_count'])} sale refunds"
              f" (journal {_n(b['refunded_fen'])} fen in {_n(b['refund_count'])});"
              f" {_n(g['reversed'])} holds reversed (server {_n(b['reversed'])})"]
    if sec.get("mutual_tls"):
        lines.append(f"  terminals: {sec['terminals']} signed on; {_n(sec['mac_requests'])} requests"
                     f" MAC'd; the server advanced their counters {_n(sec['server_counters_advanced'])}"
                     f" times")
    for problem in r["failures"]:
        lines.append(f"  FAIL: {problem}")
    lines.append(f"  result: {'PASS' if r['passed'] else 'FAIL'}")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], merged: Merged, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")

    fig, (ax_time, ax_dist) = plt.subplots(2, 1, figsize=(11, 9))
    title = (f"{r['scenario']}, " + (f"closed loop c={r['concurrency']}" if r["mode"] == "closed"
                                     else f"open loop {r['rate_per_s']:g}/s")
             + f": {r['throughput_per_s']:.0f} cycles/s")
    fig.suptitle(title)
    timeline = r["timeline"]
    for rpc in ("authorize", "confirm", "cancel", "recharge", "redeem", "health"):
        rows = timeline.get(rpc)
        if not rows:
            continue
        t = [row["t_s"] for row in rows]
        line, = ax_time.plot(t, [row["p99_ms"] for row in rows], label=f"{rpc} p99")
        ax_time.plot(t, [row["p50_ms"] for row in rows], linestyle="--", color=line.get_color(),
                     label=f"{rpc} p50")
    ax_time.set_yscale("log")
    ax_time.yaxis.set_major_formatter(plain)
    ax_time.set_xlabel("seconds into the measured window")
    ax_time.set_ylabel("latency (ms)")
    ax_time.grid(True, which="both", alpha=0.3)
    tput = r.get("throughput_timeline") or []
    if tput:
        ax_rate = ax_time.twinx()
        ax_rate.plot([p["t_s"] for p in tput], [p["cycles_per_s"] for p in tput], color="grey",
                     alpha=0.5, label="cycles/s")
        ax_rate.set_ylabel("cycles/s")
        ax_rate.set_ylim(bottom=0)
        ax_rate.legend(loc="upper right", fontsize="small")
    ax_time.legend(loc="upper left", fontsize="small", ncol=2)
    ax_time.set_title("latency over time (p50 dashed, p99 solid)")

    for rpc, h in sorted(merged.hists.items()):
        curve = percentile_curve(h)
        if not curve:
            continue
        xs = [1.0 / max(1.0 - p / 100.0, 1e-6) for p, _ in curve]
        ax_dist.plot(xs, [v for _, v in curve], label=rpc)
    ax_dist.set_xscale("log")
    ax_dist.set_yscale("log")
    ax_dist.yaxis.set_major_formatter(plain)
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    ax_dist.set_xticks(ticks)
    ax_dist.set_xticklabels(["0", "50", "90", "99", "99.9", "99.99", "99.999"])
    ax_dist.set_xlabel("percentile")
    ax_dist.set_ylabel("latency (ms)")
    ax_dist.grid(True, which="both", alpha=0.3)
    ax_dist.legend(fontsize="small")
    ax_dist.set_title("latency distribution (HdrHistogram)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
