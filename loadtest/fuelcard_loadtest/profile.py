"""Optional py-spy profile of the server processes during the measured window
(`--profile-dir`): one collapsed-stack file per server process (py-spy's raw
format, which speedscope and flamegraph.pl read), and a summary of where the
samples fell."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

TOP = 15


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, directory: Path, run_id: str, rate: int = 97) -> None:
        self.directory = directory
        self.run_id = run_id
        self.rate = rate
        self.procs: list[tuple[int, Path, subprocess.Popen[bytes]]] = []
        self.timer: threading.Timer | None = None
        self.duration_s = 0.0
        self.lock = threading.Lock()

    def start(self, pids: list[int], delay_s: float, duration_s: float) -> None:
        """Sample `pids` for `duration_s`, starting `delay_s` from now."""
        exe = py_spy()
        if exe is None or not pids:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.duration_s = duration_s

        def launch() -> None:
            with self.lock:
                for pid in pids:
                    raw = self.directory / f"server-{self.run_id}-{pid}.txt"
                    cmd = [exe, "record", "--pid", str(pid), "--duration",
                           str(max(int(duration_s), 1)), "--rate", str(self.rate),
                           "--nonblocking", "--format", "raw", "--output", str(raw)]
                    self.procs.append((pid, raw, subprocess.Popen(
                        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

        self.timer = threading.Timer(delay_s, launch)
        self.timer.daemon = True
        self.timer.start()

    def finish(self) -> dict[str, Any]:
        if self.timer is not None:
            self.timer.join(timeout=self.duration_s + 60)
        summary: dict[str, Any] = {"files": [], "processes": []}
        with self.lock:
            for pid, raw, proc in self.procs:
                try:
                    proc.wait(timeout=self.duration_s + 60)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=10)
                if raw.exists():
                    summary["files"].append(str(raw))
                    summary["processes"].append({"pid": pid, **summarize(raw)})
        return summary


def _function(frame: str) -> str:
    # "handler (fuelcard_server/services/transaction.py:57)" -> without the line
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path})" if path else name


def summarize(raw: Path) -> dict[str, Any]:
    """Top functions by own samples and by samples anywhere on the stack."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            anywhere[f] += count
    def top(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "pct": round(100.0 * n / total, 1)} for f, n in c.most_common(TOP)]

    return {"samples": total, "self": top(own) if total else [],
            "inclusive": top(anywhere) if total else []}
