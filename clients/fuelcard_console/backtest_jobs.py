"""Backtests run beside the page, not inside its request.

A backtest replays thousands of holds through the rule engine in Python: about
0.6 ms each with the default rule set (5 000 holds: 2.9-4.6 s, on the shared
2-core development machine, 2026-12-06), so seconds for a full slice. The page
must answer at once, so the replay is a
job: the first request starts it and waits a moment (a small slice is done by
then and shown at once); otherwise the page says the backtest is running and
reloads itself until the result is there. Results are kept a few minutes per
(rule set, bounds), in this edge process's memory - a result is reproducible,
so losing it on a restart costs only a rerun. One replay runs at a time per
edge, so officers pressing the button cannot take the edge's CPU from the other
pages.

The replay runs in a child process (a ProcessPoolExecutor of one worker), not a
thread: in a thread it held the GIL in turns with the pages, and a backtest page
that had just started one took 313-348 ms at 10 000 vehicles (the loadtest's
console run). The worker is started on the first backtest (an edge whose risk
officer never backtests has no extra process) and stopped with the edge; it is
spawned, not forked, as a fork of a process with gRPC's threads is not safe.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from fuelcard_console.context import Console
from fuelcard_console.rule_backtest import BacktestResult, Bounds

FRESH_S = 300  # a result older than this is run again
KEEP = 32  # results kept per edge
WAIT_S = 0.1  # how long a page waits for a job it started before saying "running" (within its 300 ms)


@dataclass(frozen=True)
class JobKey:
    digest: str  # the rule set's (a draft and the version it became share it)
    bounds: Bounds


@dataclass
class Job:
    task: asyncio.Task[BacktestResult]
    started: dt.datetime


class BacktestJobs:
    def __init__(self) -> None:
        self.jobs: OrderedDict[JobKey, Job] = OrderedDict()
        self.one_at_a_time = asyncio.Semaphore(1)
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        """The edge's replay process: one worker, so one replay at a time even when a job
        cancelled here (evicted, or the edge stopping) still runs in it."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        """Cancel the jobs and stop the worker. A replay under way is not waited for (it is
        bounded by MAX_HOLDS); its process exits when it is done."""
        for job in self.jobs.values():
            job.task.cancel()
        self.jobs.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def result(self, key: JobKey, now: dt.datetime,
                     run: Callable[[], Awaitable[BacktestResult]]) -> tuple[BacktestResult | None, Job]:
        """The result for `key` if there is a fresh one (waiting WAIT_S for a job just started);
        else None and the running job."""
        job = self.jobs.get(key)
        stale = job is not None and job.task.done() and (
            job.task.cancelled() or job.task.exception() is not None
            or (now - job.started).total_seconds() > FRESH_S)
        if job is None or stale:
            async def guarded() -> BacktestResult:
                async with self.one_at_a_time:
                    try:
                        return await run()
                    except BrokenProcessPool:
                        # the worker died (killed, out of memory): the next job starts another
                        self._pool = None
                        raise
            job = Job(asyncio.create_task(guarded(), name="console-backtest"), now)
            self.jobs[key] = job
            while len(self.jobs) > KEEP:
                _, old = self.jobs.popitem(last=False)
                old.task.cancel()
        self.jobs.move_to_end(key)
        if not job.task.done():
            await asyncio.wait({job.task}, timeout=WAIT_S)
        if job.task.done():
            return job.task.result(), job  # a failure raises here, to the error page
        return None, job


_BY_CONSOLE: dict[int, tuple[weakref.ref[Console], BacktestJobs]] = {}


def jobs_of(console: Console) -> BacktestJobs:
    """The edge's jobs (one Console per edge process; a test starts several in turn)."""
    entry = _BY_CONSOLE.get(id(console))
    if entry is None or entry[0]() is not console:
        for key in [k for k, (ref, _) in _BY_CONSOLE.items() if ref() is None]:
            del _BY_CONSOLE[key]  # consoles gone (stopped edges)
        entry = (weakref.ref(console), BacktestJobs())
        _BY_CONSOLE[id(console)] = entry
    return entry[1]


def close_jobs(console: Console) -> None:
    """Stop the edge's backtests and their worker process (the app's cleanup)."""
    entry = _BY_CONSOLE.pop(id(console), None)
    if entry is not None:
        entry[1].close()
