"""A `fuelcard serve` subprocess on the embedded PostgreSQL, for runs without
--target, and /proc readings (CPU seconds, RSS) of the processes involved."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuelcard_server.embedded import EmbeddedPostgres

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_sockets(port: int) -> int:
    """How many sockets listen on this TCP port (one per SO_REUSEPORT worker)."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def tree(pid: int) -> list[int]:
    found = [pid]
    i = 0
    while i < len(found) and i < 10_000:
        found.extend(children(found[i]))
        i += 1
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def reaped_cpu_seconds(pid: int) -> float:
    """CPU of `pid`'s children that have exited and been waited for (the
    kernel adds it to the parent's cutime and cstime): a backend or worker
    that ended during a window keeps counting."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / _TICKS
    return 0.0


def tree_cpu_seconds(root: int | None) -> float:
    """CPU seconds so far of a process, its live descendants and the
    children it has reaped."""
    if root is None:
        return 0.0
    return cpu_seconds(tree(root)) + reaped_cpu_seconds(root)


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 1e6
    return 0.0


def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return float(busy), float(steal), float(busy + idle + iowait + steal)


def postmaster_pid(pg: EmbeddedPostgres) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    return None


@dataclass
class LocalServer:
    """`fuelcard serve` on 127.0.0.1 with `workers` processes sharing a port."""

    data_dir: Path
    workers: int = 2
    pool_max: int | None = None
    # mutual TLS with the certificates in this directory (terminals must
    # MAC their requests, as in production); None: the plaintext
    # development listener, no terminal authentication
    tls_dir: Path | None = None
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    command: list[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def postgres(self) -> EmbeddedPostgres:
        return EmbeddedPostgres(self.data_dir / "postgres")

    def database_url(self) -> str:
        return self.postgres.url()

    def start(self, timeout_s: float = 180.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        port_file = self.data_dir / "loadtest-serve.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "fuelcard_server.cli", "serve",
               "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir),
               "--workers", str(self.workers), "--port-file", str(port_file)]
        env = {k: v for k, v in os.environ.items() if k != "FUELCARD_DATABASE_URL"}
        if self.tls_dir is None:
            cmd.append("--insecure")
        else:
            cmd += ["--tls-dir", str(self.tls_dir)]
            env["FUELCARD_REQUIRE_MAC"] = "true"
        if self.pool_max is not None:
            cmd += ["--pool-max", str(self.pool_max),
                    "--pool-min", str(min(4, self.pool_max))]
        self.command = cmd[1:]
        self.log_path = self.log_path or self.data_dir / "loadtest-serve.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fuelcard serve exited with {self.proc.returncode};"
                                   f" see {self.log_path}")
            if port_file.exists() and listening_sockets(self.port) >= self.workers:
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fuelcard serve did not start within {timeout_s:.0f} s;"
                           f" see {self.log_path}")

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        kids = [p for p in children(self.proc.pid) if _is_server_worker(p)]
        return kids or [self.proc.pid]

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _is_server_worker(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"spawn_main" in f.read()
    return False
