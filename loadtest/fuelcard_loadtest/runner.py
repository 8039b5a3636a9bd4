"""One run: (start a server,) seed, drive, check the ledger, (measure the
ceilings,) report."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import psycopg
from fuelcard_server.settings import Settings

from fuelcard_loadtest import (
    ceilings,
    controls,
    dbstats,
    ledger,
    profile,
    report,
    risk_rules,
    seed,
    server,
    terminals,
    worker,
)
from fuelcard_loadtest.scenarios import SCENARIOS, Mix
from fuelcard_loadtest.stats import Merged


class RunError(RuntimeError):
    pass


class UsageError(RunError):
    """Bad options: nothing was run."""


@dataclass
class Options:
    scenario: str = "uniform"
    cards: int | None = None
    concurrency: int = 64
    rate: float | None = None
    duration_s: float = 30.0
    warmup_s: float = 2.0
    drain_s: float = 10.0
    processes: int = 2
    channels: int = 8
    pump_min_ms: float = 0.0
    pump_max_ms: float = 20.0
    cancel_share: float | None = None
    recharge_share: float | None = None
    redeem_share: float | None = None
    target: str | None = None
    database_url: str | None = None
    data_dir: Path | None = None
    workers: int = 2
    pool_max: int | None = None
    card_index_key_hex: str | None = None
    ceilings: bool = False
    ceilings_duration_s: float | None = None
    report: Path | None = None
    plot: Path | None = None
    profile_dir: Path | None = None
    progress: bool = True
    rpc_timeout_s: float = 10.0
    max_inflight: int = 20_000
    max_ops: int = 50_000_000
    bucket_s: float | None = None
    reseed: bool = False
    history_entries: int = 0
    history_jobs: int = 2
    # caps, a geo-fence, products and hours on every card (production: on)
    controls: bool = True
    # production mode is the default: mutual TLS, signed-on terminals, MACs;
    # insecure: the plaintext development listener and unsigned requests
    insecure: bool = False
    # with --target: the directory of the CA (ca.pem, ca.key) that issued the
    # server's certificate; without: default DATA_DIR/loadtest-certs
    tls_dir: Path | None = None
    # open loop, production: terminals in all (closed loop: one per operation in flight)
    terminals: int = 64
    # a risk rule set file to put in force before the run (risk_rules.py)
    risk_rules: str | None = None
    keep: bool = False
    seed: int | None = None
    argv: list[str] = field(default_factory=list)

    def mix(self) -> Mix:
        base = SCENARIOS[self.scenario].mix
        return Mix(cancel=base.cancel if self.cancel_share is None else self.cancel_share,
                   recharge=base.recharge if self.recharge_share is None else self.recharge_share,
                   redeem=base.redeem if self.redeem_share is None else self.redeem_share,
                   reverse=base.reverse, refund=base.refund, overrun=base.overrun)

    def validate(self) -> Options:
        problems = []
        if self.scenario not in SCENARIOS:
            problems.append(f"unknown scenario {self.scenario!r} (one of {', '.join(SCENARIOS)})")
        if self.cards is not None and not 1 <= self.cards < seed.MAX_CARDS:
            problems.append("--cards must be >= 1")
        if self.rate is None and not 1 <= self.concurrency <= 100_000:
            problems.append("--concurrency must be between 1 and 100000")
        if self.rate is not None and not 0 < self.rate <= 1_000_000:
            problems.append("--rate must be > 0 and <= 1000000 per second")
        if not 0 < self.duration_s <= 24 * 3600:
            problems.append("--duration-s must be > 0 and at most a day")
        if self.warmup_s < 0 or self.drain_s < 0:
            problems.append("--warmup-s and --drain-s must be >= 0")
        if not 1 <= self.processes <= 64 or not 1 <= self.channels <= 256:
            problems.append("--processes must be 1-64 and --channels 1-256")
        if not 0 <= self.pump_min_ms <= self.pump_max_ms <= 600_000:
            problems.append("need 0 <= --pump-min-ms <= --pump-max-ms")
        mix = self.mix() if self.scenario in SCENARIOS else Mix()
        if not (0 <= mix.cancel <= 1 and mix.recharge >= 0 and mix.redeem >= 0
                and mix.recharge + mix.redeem < 1):
            problems.append("shares must be in [0, 1] and recharge + redeem < 1")
        if (self.target is None) == (self.database_url is not None) and self.target is None:
            problems.append("--database-url needs --target (without --target a server is started)")
        if self.target is not None and self.database_url is None:
            problems.append("--target needs --database-url (for seeding and the ledger check)")
        if self.target is not None and not _loopback_target(self.target):
            problems.append(f"--target must be a loopback address, not {self.target!r}")
        if self.database_url is not None and not _loopback_url(self.database_url):
            problems.append("--database-url must point at a Unix socket or a loopback address")
        if self.history_entries < 0 or not 1 <= self.history_jobs <= 16:
            problems.append("--history-entries must be >= 0 and --history-jobs 1-16")
        if self.insecure and self.tls_dir is not None:
            problems.append("--tls-dir and --insecure exclude each other")
        if self.target is not None and not self.insecure and self.tls_dir is None:
            problems.append("--target needs --tls-dir (the CA that issued the server's"
                            " certificate, with its key) or --insecure")
        if not 1 <= self.terminals <= 10_000:
            problems.append("--terminals must be 1-10000")
        if self.rpc_timeout_s <= 0 or self.max_inflight < 1 or self.max_ops < 1:
            problems.append("--rpc-timeout-s, --max-inflight and --max-ops must be positive")
        if problems:
            raise UsageError("; ".join(problems))
        return self


def _loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_target(target: str) -> bool:
    host, _, port = target.rpartition(":")
    return port.isdigit() and _loopback_host(host)


def _loopback_url(url: str) -> bool:
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return False
    hosts = str(info.get("host") or "").split(",")
    hostaddr = str(info.get("hostaddr") or "")
    return (all(h == "" or h.startswith("/") or _loopback_host(h) for h in hosts)
            and (hostaddr == "" or _loopback_host(hostaddr)))


# -- one phase: several generator processes -----------------------------------

@dataclass
class Phase:
    workload: str
    results: list[dict[str, Any]]
    merged: Merged
    started_wall: float
    resources: dict[str, float]
    # what PostgreSQL wrote during the window (dbstats.FIELDS); None: not read
    database: dict[str, int] | None = None

    @property
    def measured_s(self) -> float:
        return float(max(r["measured_s"] for r in self.results))

    @property
    def cycles(self) -> int:
        return sum(r["cycles"] for r in self.results)

    def total(self, key: str) -> int:
        return sum(int(r[key]) for r in self.results)

    def errors(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for r in self.results:
            c.update(r["errors"])
        return dict(c)

    def seen(self) -> ledger.Seen:
        return ledger.Seen(self.total("confirmed_fen"), self.total("confirmed_count"),
                           self.total("recharged_fen"), self.total("recharge_count"),
                           self.total("redeemed_points"), self.total("refunded_fen"),
                           self.total("refund_count"), self.total("reversed"))


@dataclass
class Watch:
    """Processes whose CPU and memory we read during a phase, and the
    database whose WAL and commits we count (dbstats.py)."""

    server_pids: Callable[[], list[int]] = list
    # the roots whose trees' CPU (with reaped children) is the server's and PostgreSQL's
    server_root: Callable[[], int | None] = lambda: None
    postgres_root: Callable[[], int | None] = lambda: None
    database_url: str | None = None

    def cpu(self) -> tuple[float | None, float | None]:
        """CPU seconds so far of the server's and PostgreSQL's processes;
        None for what this run cannot see (an external server)."""
        srv, pg = self.server_root(), self.postgres_root()
        return (None if srv is None else server.tree_cpu_seconds(srv),
                None if pg is None else server.tree_cpu_seconds(pg))


class Progress:
    def __init__(self, out: TextIO, enabled: bool, label: str, total_s: float) -> None:
        self.out, self.enabled, self.label, self.total_s = out, enabled, label, total_s
        self.tty = out.isatty()
        self.last_print = 0.0
        self.last_cycles = 0
        self.last_t = time.monotonic()
        self.t0 = time.monotonic()

    def show(self, snaps: dict[int, dict[str, Any]], rss_mb: float) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last_print < (1.0 if self.tty else 5.0):
            return
        cycles = sum(s["cycles"] for s in snaps.values())
        rate = (cycles - self.last_cycles) / max(now - self.last_t, 1e-9)
        self.last_cycles, self.last_t, self.last_print = cycles, now, now
        ok = sum(s["ok"] for s in snaps.values())
        declined = sum(s["declined"] for s in snaps.values())
        errors = sum(s["errors"] for s in snaps.values())
        phase = "measuring" if any(s["in_window"] for s in snaps.values()) else "warm-up"
        line = (f"{self.label}: {now - self.t0:5.1f}/{self.total_s:.0f} s {phase}  cycles {cycles}"
                f" ({rate:.0f}/s)  ok {ok}  declined {declined}  errors {errors}"
                + (f"  server RSS {rss_mb:.0f} MB" if rss_mb else ""))
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def end(self) -> None:
        if self.enabled and self.tty and self.last_print:
            self.out.write("\n")
            self.out.flush()


@dataclass
class Sample:
    """CPU seconds so far of the server, PostgreSQL and the generator
    processes, the machine's jiffies, the time, and the database's counters."""

    server_s: float | None
    postgres_s: float | None
    generator_s: float
    machine: tuple[float, float, float]
    t: float
    db: dbstats.Snapshot | None


def _sample(watch: Watch, generator_pids: list[int], reader: dbstats.Reader | None) -> Sample:
    server_s, postgres_s = watch.cpu()
    return Sample(server_s, postgres_s, server.cpu_seconds(generator_pids), server.machine_cpu(),
                  time.monotonic(), reader.snapshot() if reader is not None else None)


def _resources(s0: Sample, s1: Sample) -> tuple[dict[str, float], dict[str, int] | None]:
    wall = max(s1.t - s0.t, 1e-9)
    busy = s1.machine[0] - s0.machine[0]
    steal = s1.machine[1] - s0.machine[1]
    total = max(s1.machine[2] - s0.machine[2], 1e-9)
    resources = {
        "window_s": wall,
        "generator_cpu_per_s": (s1.generator_s - s0.generator_s) / wall,
        "machine_busy_pct": 100.0 * busy / total,
        "machine_steal_pct": 100.0 * steal / total,
    }
    if s0.server_s is not None and s1.server_s is not None:
        resources["server_cpu_per_s"] = (s1.server_s - s0.server_s) / wall
    if s0.postgres_s is not None and s1.postgres_s is not None:
        resources["postgres_cpu_per_s"] = (s1.postgres_s - s0.postgres_s) / wall
    delta = s1.db.minus(s0.db) if s1.db is not None and s0.db is not None else None
    return resources, delta


def drive(opts: Options, *, workload: str, target: str, dataset: seed.Dataset | None,
          run_id: str, duration_s: float, out: TextIO, label: str, watch: Watch,
          closed: bool, on_start: Callable[[], None] | None = None,
          tls: tuple[Path, Path] | None = None) -> Phase:
    """One phase. `tls`: (the run's terminal certificates, the CA's
    directory) in production mode."""
    ctx = multiprocessing.get_context("spawn")
    queue: Any = ctx.Queue()
    go = ctx.Event()
    start_at: Any = ctx.Value("d", 0.0)
    n = opts.processes
    rate = None if closed else opts.rate
    bucket_s = opts.bucket_s or max(1.0, duration_s / 120.0)
    base_seed = opts.seed if opts.seed is not None else secrets.randbits(32)
    configs = []
    for i in range(n):
        share = opts.concurrency // n + (1 if i < opts.concurrency % n else 0)
        lanes = share if rate is None else opts.terminals // n + (1 if i < opts.terminals % n else 0)
        configs.append(worker.WorkerConfig(
            index=i, target=target, channels=opts.channels, workload=workload,
            scenario=dataset.scenario if dataset else opts.scenario,
            tag=dataset.tag if dataset else 0, cards=dataset.cards if dataset else 1,
            concurrency=share if rate is None else 0,
            rate=(rate / n) if rate is not None else 0.0,
            phase_s=(i / rate) if rate is not None else 0.0,
            warmup_s=opts.warmup_s, duration_s=duration_s, drain_s=opts.drain_s,
            pump_min_ms=opts.pump_min_ms, pump_max_ms=opts.pump_max_ms, mix=opts.mix(),
            run_id=run_id, rpc_timeout_s=opts.rpc_timeout_s,
            max_inflight=max(1, opts.max_inflight // n), max_ops=max(1, opts.max_ops // n),
            bucket_s=bucket_s, seed=base_seed + 7919 * i,
            terminal_certs=str(tls[0]) if tls else None, tls_dir=str(tls[1]) if tls else None,
            terminals=max(lanes, 1) if tls else 0))
    configs = [c for c in configs if c.concurrency > 0 or c.rate > 0]
    procs = [ctx.Process(target=worker.main, args=(c, queue, go, start_at),
                         name=f"fuelcard-loadtest-{c.index}", daemon=True) for c in configs]
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    snaps: dict[int, dict[str, Any]] = {}
    progress = Progress(out, opts.progress, label, opts.warmup_s + duration_s)
    rss_max = rss_sum_max = 0.0
    resources: dict[str, float] = {}
    database: dict[str, int] | None = None
    reader = dbstats.Reader(watch.database_url) if watch.database_url else None
    try:
        ready: set[int] = set()
        deadline = time.monotonic() + 120
        while len(ready) < len(procs):
            kind, index, payload = _next(queue, procs, deadline, "generator start-up")
            if kind == "ready":
                ready.add(index)
            elif kind == "failed":
                raise RunError(f"generator process {index} failed:\n{payload}")
        generator_pids = [p.pid for p in procs if p.pid is not None]
        started_wall = time.time() + 0.3
        start_at.value = started_wall
        go.set()
        if on_start:
            on_start()
        time.sleep(max(started_wall + opts.warmup_s - time.time(), 0))
        s0 = _sample(watch, generator_pids, reader)
        s1: Sample | None = None
        end_of_window = s0.t + duration_s
        deadline = end_of_window + opts.drain_s + worker.RESOLVE_BUDGET_S + 60
        while len(results) < len(procs):
            if time.monotonic() > deadline:
                raise RunError("generator processes did not finish in time")
            if s1 is None and time.monotonic() >= end_of_window:
                s1 = _sample(watch, generator_pids, reader)
            pids = watch.server_pids()
            rss = [server.rss_mb(p) for p in pids]
            if rss:
                rss_max = max(rss_max, *rss)
                rss_sum_max = max(rss_sum_max, sum(rss))
            wake = time.monotonic() + 0.5
            if s1 is None:  # wake at the window's end, to sample it on time
                wake = min(wake, max(end_of_window, time.monotonic() + 0.01))
            try:
                kind, index, payload = _next(queue, procs, min(deadline, wake), "the run",
                                             allow_timeout=True)
            except TimeoutError:
                progress.show(snaps, sum(rss))
                continue
            if kind == "progress":
                snaps[index] = payload
                progress.show(snaps, sum(rss))
            elif kind == "done":
                results[index] = payload
            elif kind == "failed":
                raise RunError(f"generator process {index} failed:\n{payload}")
        progress.end()
        if s1 is None:
            s1 = _sample(watch, generator_pids, reader)
        resources, database = _resources(s0, s1)
        resources["server_rss_mb_max"] = rss_max
        resources["server_rss_mb_sum_max"] = rss_sum_max
    finally:
        progress.end()
        go.set()
        _reap(procs, queue)
        queue.close()
        queue.join_thread()
        if reader is not None:
            reader.close()
    merged = Merged(bucket_s)
    ordered = [results[i] for i in sorted(results)]
    for r in ordered:
        merged.add(r["stats"])
    return Phase(workload, ordered, merged, started_wall, resources, database)


def _reap(procs: list[Any], queue: Any, timeout_s: float = 30.0) -> None:
    """Wait for the generator processes, reading the queue meanwhile (a child
    exits only once its queued messages are flushed); terminate stragglers."""
    import queue as queue_module

    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        with contextlib.suppress(queue_module.Empty, OSError, ValueError):
            queue.get(timeout=0.2)
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(timeout=10)


def _next(queue: Any, procs: list[Any], deadline: float, what: str,
          allow_timeout: bool = False) -> tuple[str, int, Any]:
    import queue as queue_module

    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if allow_timeout:
                raise TimeoutError
            raise RunError(f"generator processes did not answer in time ({what})")
        try:
            item: tuple[str, int, Any] = queue.get(timeout=min(remaining, 0.5))
            return item
        except queue_module.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RunError(f"generator process {dead[0].name} died"
                               f" (exit {dead[0].exitcode})") from None
            if allow_timeout and time.monotonic() >= deadline:
                raise TimeoutError from None


# -- the whole run ---------------------------------------------------------------

def _key(opts: Options, data_dir: Path | None) -> bytes:
    if opts.card_index_key_hex:
        return bytes.fromhex(opts.card_index_key_hex)
    s = Settings.from_env()
    if data_dir is not None:
        s.data_dir = data_dir
    if s.card_index_key_hex is None and not (s.data_dir / "card-index.key").exists() \
            and opts.target is not None:
        raise RunError("cannot find the card index key: give --card-index-key-hex, set"
                       " FUELCARD_CARD_INDEX_KEY_HEX, or --data-dir of the server")
    return s.card_index_key()


def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 1024 / 1024
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(mem_gb, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def run(opts: Options, out: TextIO | None = None) -> dict[str, Any]:
    """Run everything; return the report (report["passed"] says whether the
    run passed)."""
    opts.validate()
    out = out or sys.stdout
    scenario = SCENARIOS[opts.scenario]
    cards = opts.cards or scenario.default_cards
    run_id = dt.datetime.now(dt.UTC).strftime("%m%d%H%M%S") + secrets.token_hex(2)
    load_avg = os.getloadavg()
    local: server.LocalServer | None = None
    made_dir: Path | None = None
    watch = Watch()
    tls_dir = opts.tls_dir.resolve() if opts.tls_dir is not None else None
    run_certs: Path | None = None

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    try:
        if opts.target is None:
            data_dir = opts.data_dir
            if data_dir is None:
                made_dir = data_dir = Path(tempfile.mkdtemp(prefix="fuelcard-loadtest-"))
            data_dir = data_dir.resolve()
            key = _key(opts, data_dir)
            if not opts.insecure:
                tls_dir = tls_dir or data_dir / "loadtest-certs"
                terminals.server_pki(tls_dir)
            local = server.LocalServer(data_dir, workers=opts.workers, pool_max=opts.pool_max,
                                       tls_dir=tls_dir)
            say(f"starting fuelcard serve ({opts.workers} processes"
                f"{', plaintext' if opts.insecure else ', mutual TLS, MACs required'})"
                f" on the embedded PostgreSQL in {data_dir} ...")
            local.start()
            target, url = local.target, local.database_url()
            say(f"server ready on {target}")
            srv = local
            pg = srv.postgres
            watch = Watch(server_pids=srv.worker_pids,
                          server_root=lambda: srv.proc.pid if srv.proc else None,
                          postgres_root=lambda: server.postmaster_pid(pg), database_url=url)
        else:
            assert opts.database_url is not None
            target, url = opts.target, opts.database_url
            key = _key(opts, opts.data_dir)
            watch = Watch(database_url=url)
            if tls_dir is not None:
                try:
                    terminals.check_ca(tls_dir)
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
        try:
            dataset = seed.seed(url, key, opts.scenario, cards, reuse=not opts.reseed,
                                history_entries=opts.history_entries,
                                history_jobs=opts.history_jobs, log=say)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        database_mb = _database_mb(url)
        if opts.controls:
            controls.apply(url, dataset.tag, f"LT-{run_id}", log=say)
        else:
            controls.clear(url, dataset.tag, log=say)
        if opts.risk_rules:
            risk_rules.apply(url, opts.risk_rules, log=say)
        closed = opts.rate is None
        profiler: profile.Profiler | None = None
        if opts.profile_dir is not None:
            profiler = profile.Profiler(opts.profile_dir, run_id)

        def start_profile() -> None:
            if profiler is not None:
                profiler.start(watch.server_pids(), opts.warmup_s, opts.duration_s)

        tls: tuple[Path, Path] | None = None
        if tls_dir is not None:
            names = _terminal_names(opts, run_id)
            say(f"production mode: mutual TLS; {len(names)} terminal certificates issued; each"
                " terminal signs on and MACs every terminal request")
            run_certs = terminals.issue_terminals(tls_dir, ledger.station(run_id), names)
            tls = (run_certs, tls_dir)
        since = ledger.marks(url)
        main = drive(opts, workload="pump", target=target, dataset=dataset, run_id=run_id,
                     duration_s=opts.duration_s, out=out, label=opts.scenario, watch=watch,
                     closed=closed, on_start=start_profile, tls=tls)
        profile_summary = profiler.finish() if profiler is not None else None
        say("ledger check: fuelcard verify, and the run's money against the journal ...")
        money = ledger.check(url, run_id, main.seen(), since=since, run_verify=True)
        ceiling: dict[str, Any] | None = None
        if opts.ceilings:
            ceiling = _ceilings(opts, target, url, dataset, run_id, out, say, tls)
        r = _report(opts, main, dataset, target, run_id, money, ceiling,
                    local.workers if local else None)
        r["database_mb"] = database_mb
        r["load_avg_start"] = [round(x, 2) for x in load_avg]
        r["security"] = _security(url, run_id, main, tls is not None)
        r["server_command"] = local.command if local is not None else None
        if profile_summary is not None:
            r["profile"] = profile_summary
        out.write(report.table(r))
        if opts.report is not None:
            opts.report.parent.mkdir(parents=True, exist_ok=True)
            opts.report.write_text(json.dumps(r, indent=2, sort_keys=False) + "\n")
            say(f"report written to {opts.report}")
        if opts.plot is not None:
            opts.plot.parent.mkdir(parents=True, exist_ok=True)
            report.plot(r, main.merged, opts.plot)
            say(f"plot written to {opts.plot}")
        return r
    finally:
        if run_certs is not None:
            terminals.remove_terminals(run_certs)
        if local is not None:
            local.stop()
        if made_dir is not None and not opts.keep:
            shutil.rmtree(made_dir, ignore_errors=True)
        elif made_dir is not None:
            say(f"data kept in {made_dir}")


def _database_mb(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return round(int(row[0]) / 1e6, 1)


def _terminal_names(opts: Options, run_id: str) -> list[str]:
    """Every terminal of the run: closed loop, one per operation in flight;
    open loop, --terminals (and, for the closed-loop ceiling, as many as it
    has operations in flight); split over the generator processes as
    drive() splits them."""
    totals = [opts.concurrency] if opts.rate is None else [opts.terminals, opts.concurrency]
    n = opts.processes
    names = []
    for i in range(n):
        share = max(t // n + (1 if i < t % n else 0) for t in totals)
        names += [terminals.terminal_name(run_id, i, k) for k in range(max(share, 1))]
    return names


TERMINALS_SQL = """
SELECT count(*), coalesce(sum(last_counter), 0) FROM fc.terminals WHERE station_id = %s
"""


def _security(url: str, run_id: str, main: Phase, production: bool) -> dict[str, Any]:
    """How the run talked to the server: mutual TLS and MACs or neither;
    the requests the generator signed, and the counters the server advanced
    for the run's terminals (one per MAC'd request it accepted)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(TERMINALS_SQL, (ledger.station(run_id),)).fetchone()
    assert row is not None
    return {"mode": "production" if production else "insecure", "mutual_tls": production,
            "macs": production, "terminals": main.total("terminals"),
            "mac_requests": main.total("mac_requests"),
            "server_terminals": int(row[0]), "server_counters_advanced": int(row[1])}


def _ceilings(opts: Options, target: str, url: str, dataset: seed.Dataset, run_id: str,
              out: TextIO, say: Callable[[str], None],
              tls: tuple[Path, Path] | None) -> dict[str, Any]:
    seconds = opts.ceilings_duration_s or opts.duration_s
    say(f"ceiling 1/2: framework, no-op health Check RPC, closed loop c={opts.concurrency} ...")
    fw = drive(replace(opts, rate=None), workload="health", target=target, dataset=None,
               run_id=run_id, duration_s=seconds, out=out, label="framework", watch=Watch(),
               closed=True, tls=tls)
    fw_latency = fw.merged.latency().get("health", {})
    fw_rate = fw.cycles / fw.measured_s
    say(f"ceiling 2/2: database, pgbench -c {opts.concurrency} for {seconds:.0f} s ...")
    pg = ceilings.run_pgbench(url, dataset.tag, dataset.cards, opts.concurrency, seconds,
                              terminals=tls is not None)
    return {
        "framework": {"rpc_per_s": round(fw_rate, 1), "p50_ms": fw_latency.get("p50_ms", 0.0),
                      "p99_ms": fw_latency.get("p99_ms", 0.0),
                      "errors": fw.errors(), "duration_s": round(fw.measured_s, 2),
                      "concurrency": opts.concurrency},
        "pgbench": pg.as_dict(),
        "pgbench_script": pg.script,
    }


def _report(opts: Options, main: Phase, dataset: seed.Dataset, target: str, run_id: str,
            money: ledger.LedgerResult, ceiling: dict[str, Any] | None,
            server_workers: int | None) -> dict[str, Any]:
    measured = main.measured_s
    cycles = main.cycles
    throughput = cycles / measured
    ok, declined = main.total("ok"), main.total("declined")
    errors = main.errors()
    rpcs = ok + declined + sum(v for k, v in errors.items() if k != "CLIENT_BACKLOG")
    unresolved = [u for r in main.results for u in r["unresolved"]]
    failures = list(money.problems)
    if unresolved:
        failures.append(f"{len(unresolved)} request(s) with unknown outcome: {unresolved[:5]}")
    if cycles == 0:
        failures.append("no pump cycle completed")
    ops: Counter[str] = Counter()
    for result in main.results:
        ops.update(result["ops"])
    res = dict(main.resources)
    if cycles and res:
        # CPU and database counters over the same window, divided by the
        # cycles per second of the measured window
        for who in ("server", "postgres", "generator"):
            if f"{who}_cpu_per_s" in res:
                res[f"{who}_cpu_us_per_cycle"] = res[f"{who}_cpu_per_s"] / throughput * 1e6
        if main.database is not None:
            window_cycles = throughput * res["window_s"]
            res.update(dbstats.per_cycle(main.database, window_cycles))
    r: dict[str, Any] = {
        "scenario": opts.scenario,
        "controls": opts.controls,
        "insecure": opts.insecure,
        "risk_rules": opts.risk_rules,
        "mode": "closed" if opts.rate is None else "open",
        "concurrency": opts.concurrency if opts.rate is None else None,
        "rate_per_s": opts.rate,
        "duration_s": round(measured, 3),
        "warmup_s": opts.warmup_s,
        "ok": ok,
        "declined": declined,
        "errors": errors,
        "cycles": cycles,
        "throughput_per_s": round(throughput, 2),
        "rpc_per_s": round(rpcs / measured, 2),
        "ops": dict(ops),
        "latency": main.merged.latency(),
        "passed": not failures,
        "failures": failures,
        "ledger": money.as_dict(),
        "ceilings": None,
        "resources": {k: round(v, 3) for k, v in res.items()},
        "database_window": main.database,
        "cards": dataset.cards,
        "accounts": dataset.accounts,
        "dataset_tag": dataset.tag,
        "seed_s": round(dataset.seconds, 2),
        "seed_reused": dataset.reused,
        "history_entries": dataset.history_entries,
        "processes": opts.processes,
        "channels": opts.channels,
        "server_workers": server_workers,
        "pump_ms": [opts.pump_min_ms, opts.pump_max_ms],
        "mix": vars(opts.mix()),
        "target": target,
        "run_id": run_id,
        "started_at": dt.datetime.fromtimestamp(main.started_wall, dt.UTC).isoformat(),
        "machine": _machine(),
        "command": " ".join(opts.argv) if opts.argv else None,
        "commit": git_commit(Path(__file__).resolve().parents[2]),
        "server_commit": git_commit(Path(server_package_file()).resolve().parents[2]),
        "unresolved": unresolved,
        "error_samples": [s for r in main.results for s in r["error_samples"]][:10],
        "open_loop": None if opts.rate is None else {
            "dropped": main.total("dropped"),
            "max_schedule_lag_ms": round(max(r["max_schedule_lag_ms"] for r in main.results), 3)},
        "timeline": main.merged.timeline(),
        "throughput_timeline": [
            {"t_s": round(b * main.merged.bucket_s, 3), "cycles_per_s": n / main.merged.bucket_s}
            for b, n in sorted(main.merged.cycles_by_bucket.items())
            # whole buckets inside the window only: the last one is cut short
            if (b + 1) * main.merged.bucket_s <= measured + 1e-6],
    }
    if ceiling is not None:
        fw = ceiling["framework"]["rpc_per_s"]
        pg = ceiling["pgbench"]["cycles_per_s"]
        ceiling["ratio_vs_framework"] = round(throughput / (fw / 2), 3) if fw else 0.0
        ceiling["ratio_vs_pgbench"] = round(throughput / pg, 3) if pg else 0.0
        ceiling["framework_cycles_per_s"] = round(fw / 2, 1)
        r["ceilings"] = ceiling
    return r


def server_package_file() -> str:
    import fuelcard_server

    return str(fuelcard_server.__file__)


def git_commit(cwd: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd,
                             capture_output=True, text=True, timeout=10, check=False)
        if res.returncode == 0:
            return res.stdout.strip()
    return None
