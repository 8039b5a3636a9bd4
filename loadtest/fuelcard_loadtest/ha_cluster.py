"""A high-availability fuelcard cluster on loopback, and the faults the drills inflict on it.

What `scripts/ha-up` brings up (docs/OPERATIONS.md explains the topology):

  - one etcd (Debian `etcd-server`): the distributed configuration store
    Patroni keeps its leader key in;
  - three PostgreSQL nodes under Patroni: node1 and node2 in the "same city"
    (one is the primary, the other its synchronous standby), node3 in the
    "other city" (tag nosync: only ever an asynchronous standby);
  - pgBackRest: every WAL segment the primary finishes is archived
    (archive_command), a full backup is taken at start, and a lost standby is
    rebuilt from the backup (Patroni's create_replica_methods);
  - N `fuelcard serve` processes that reach the primary through a libpq
    multi-host URL with target_session_attrs=read-write.

Why PostgreSQL 15 from Debian and not the pgserver wheel's 16: the backup
engine. Debian's pgBackRest (2.45) cannot read a PostgreSQL 16 control file
("unexpected control version = 1300"), and Barman, the other engine Debian
ships (3.4), predates 16 too; Barman from PyPI reads 16 but backs up through
a replication slot and a pg_receivewal it must keep running against
whichever node is primary, and rebuilds no standby by itself. pgBackRest on
15 has archive-push/archive-get, point-in-time restore across timelines and
a delta restore Patroni calls to rebuild a replica. fuelcard's schema and
functions run unchanged on 15 (the drills migrate and run them there).

Everything is installed by `install()` from the package registries (apt-get,
pip) and nothing else; a part that cannot be installed raises HaError (the
drills fail with its message, they never skip). PostgreSQL's initdb refuses to
run as root, so the cluster runs as a system user of its own (OS_USER), with
`setpriv` (which keeps the pid, so the pids recorded are the processes'
own). Every port is on 127.0.0.1 and was free when chosen.

Security on loopback: pg_hba trusts 127.0.0.1 (a drill cluster on one
machine); production uses scram-sha-256 over hostssl, per docs/OPERATIONS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ETCD = Path("/usr/bin/etcd")
PGBACKREST = Path("/usr/bin/pgbackrest")
APT_PACKAGES = ("etcd-server", "pgbackrest", "postgresql-15")
PATRONI_VERSION = "4.1.5"
# A venv of the system Python (/usr/bin/python3), not of the project's: the
# cluster's user must be able to read and run it, and a pyenv Python under
# /root is not readable by anyone else.
PATRONI_VENV = Path(f"/opt/fuelcard-ha/patroni-{PATRONI_VERSION}")
OS_USER = "fuelcard-pg"
SCOPE = "fuelcard"
STANZA = "fuelcard"
DATABASE = "fuelcard"
SUPERUSER = "postgres"
STATE_FILE = "cluster.json"

# Patroni's timing (bootstrap.dcs). primary_start_timeout 0: a crashed
# primary's postmaster is not restarted in place (≈ 14 s with the default)
# but failed over at once to the synchronous standby; ttl 20 (Patroni's
# minimum): a node that vanishes whole loses the leader key within 20 s;
# loop_wait 1 (a crashed postmaster is seen within a second) and
# retry_timeout 5 bound how long a decision waits (loop_wait + 2 x
# retry_timeout must stay under ttl).
DCS_TIMING = {"ttl": 20, "loop_wait": 1, "retry_timeout": 5, "primary_start_timeout": 0}


class HaError(RuntimeError):
    """A part of the HA cluster could not be installed or started; the
    message says which and how to see why."""


# The processes this one started, kept so that they are reaped (and Python
# does not warn of a child still running when its Popen is collected).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], *, what: str, timeout: float = 600.0,
         env: dict[str, str] | None = None) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HaError(f"{what}: {exc}") from None
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        raise HaError(f"{what} failed (exit {res.returncode}):\n" + "\n".join(tail))
    return res.stdout


def install(log: Any = print) -> None:
    """Install what the cluster runs on, from the package registries only;
    a no-op when everything is there. Raises HaError when something cannot
    be installed (not root, no registry, a package refused)."""
    missing = [p for p, binary in zip(APT_PACKAGES, (ETCD, PGBACKREST, PG_BIN / "postgres"),
                                      strict=True) if not binary.exists()]
    patroni = PATRONI_VENV / "bin" / "patroni"
    if (missing or not patroni.exists()) and os.geteuid() != 0:
        raise HaError(f"the HA cluster needs {', '.join(missing) or 'Patroni'} installed; run "
                      "scripts/ha-up once as root (it installs them with apt-get and pip)")
    if missing:
        log(f"ha: installing {' '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], what="apt-get update", env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
             what=f"apt-get install {' '.join(missing)}", env=env)
        still = [p for p, b in zip(APT_PACKAGES, (ETCD, PGBACKREST, PG_BIN / "postgres"),
                                   strict=True) if not b.exists()]
        if still:
            raise HaError(f"apt-get installed {' '.join(missing)} but {' '.join(still)} "
                          "left no binary where expected")
    if not patroni.exists():
        log(f"ha: installing Patroni {PATRONI_VERSION} (pip, venv of /usr/bin/python3)")
        system_python = shutil.which("python3", path="/usr/bin")
        if system_python is None:
            raise HaError("no /usr/bin/python3 to build Patroni's venv from")
        if subprocess.run([system_python, "-c", "import ensurepip, venv"],
                          capture_output=True).returncode != 0:
            # Debian splits venv support out of python3
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "python3-venv"],
                 what="apt-get install python3-venv", env=env)
        shutil.rmtree(PATRONI_VENV, ignore_errors=True)
        _run([system_python, "-m", "venv", str(PATRONI_VENV)], what="python3 -m venv (Patroni)")
        _run([str(PATRONI_VENV / "bin" / "pip"), "install", "-q",
              f"patroni[etcd3,psycopg3]=={PATRONI_VERSION}"], what="pip install patroni")
        if not patroni.exists():
            raise HaError(f"pip installed Patroni but {patroni} is missing")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            _run(["useradd", "--system", "--user-group", "--no-create-home",
                  "--shell", "/usr/sbin/nologin", OS_USER], what=f"useradd {OS_USER}")


def _as_cluster_user() -> list[str]:
    """The prefix that runs a command as the cluster's OS user (none when
    not root: the caller's own user then owns the cluster)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", "--"]


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        ent = pwd.getpwnam(OS_USER)
        os.chown(path, ent.pw_uid, ent.pw_gid)


@dataclass
class Node:
    name: str
    city: str
    pg_port: int
    rest_port: int
    pid: int | None = None  # Patroni's

    def data_dir(self, root: Path) -> Path:
        return root / self.name / "data"


@dataclass
class Member:
    """One member as Patroni's /cluster reports it."""
    name: str
    role: str  # leader, sync_standby, replica (standby_leader never here)
    state: str  # running, streaming, starting, stopped, ...
    port: int
    lag: int | None  # bytes behind the leader's WAL (None: unknown)
    timeline: int | None


@dataclass
class HaCluster:
    root: Path
    etcd_port: int = 0
    etcd_peer_port: int = 0
    etcd_pid: int | None = None
    nodes: list[Node] = field(default_factory=list)
    servers: list[dict[str, Any]] = field(default_factory=list)  # {port, metrics, pid}

    # ---- state on disk (ha-down, and drills in other processes, read it)

    def save(self) -> None:
        state = asdict(self)
        state["root"] = str(self.root)
        path = self.root / STATE_FILE
        path.write_text(json.dumps(state, indent=2))
        path.chmod(0o600)

    @classmethod
    def load(cls, root: Path) -> HaCluster:
        state = json.loads((root / STATE_FILE).read_text())
        return cls(root=Path(state["root"]), etcd_port=state["etcd_port"],
                   etcd_peer_port=state["etcd_peer_port"], etcd_pid=state["etcd_pid"],
                   nodes=[Node(**n) for n in state["nodes"]], servers=state["servers"])

    # ---- addresses

    @property
    def database_url(self) -> str:
        """The primary, wherever it is: libpq tries the hosts in order and
        keeps the first that accepts writes."""
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in self.nodes)
        return (f"postgresql://{SUPERUSER}@{hosts}/{DATABASE}"
                "?target_session_attrs=read-write&connect_timeout=2")

    @property
    def replica_url(self) -> str:
        """Report reads: the first of the hosts that is a standby, same city
        first (node2: the synchronous standby at start), then the other
        city. A failover promotes node2 under the read pool: the server's
        replica probe sees a node no longer in recovery, refuses reads and
        reconnects, which finds node3 (health.py, replication.py)."""
        order = [self.nodes[1], self.nodes[2], self.nodes[0]]
        hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in order)
        return (f"postgresql://{SUPERUSER}@{hosts}/{DATABASE}"
                "?target_session_attrs=standby&connect_timeout=2")

    def node_url(self, name: str, database: str = DATABASE) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.node(name).pg_port}/{database}"

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def pgbackrest_conf(self) -> Path:
        return self.root / "pgbackrest" / "pgbackrest.conf"

    # ---- bring up

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        cities = [("node1", "city-a"), ("node2", "city-a"), ("node3", "city-b")]
        self.nodes = [Node(name, city, free_port(), free_port()) for name, city in cities]
        for sub in ("etcd", "run", "logs", "pgbackrest", "pgbackrest/repo", "pgbackrest/log",
                    "pgbackrest/lock", "pgbackrest/spool", *[n.name for n in self.nodes]):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700 if sub != "run" else 0o755)
            _chown(d)
        self._write_pgbackrest_conf()
        for n in self.nodes:
            self._write_patroni_conf(n)
        self.save()

    def _write_pgbackrest_conf(self) -> None:
        first = self.nodes[0]
        b = self.root / "pgbackrest"
        self.pgbackrest_conf.write_text(
            "[global]\n"
            f"repo1-path={b / 'repo'}\n"
            "repo1-retention-full=2\n"
            f"log-path={b / 'log'}\n"
            f"lock-path={b / 'lock'}\n"
            f"spool-path={b / 'spool'}\n"
            "log-level-console=warn\n"
            "log-level-file=info\n"
            "start-fast=y\n"
            "compress-type=gz\n"
            "compress-level=1\n"
            f"\n[{STANZA}]\n"
            # the node a command is run for is given on its command line
            # (--pg1-path/--pg1-port); these are only defaults
            f"pg1-path={first.data_dir(self.root)}\n"
            f"pg1-port={first.pg_port}\n"
            f"pg1-socket-path={self.root / 'run'}\n"
            f"pg1-user={SUPERUSER}\n")
        self.pgbackrest_conf.chmod(0o644)

    def _pgbackrest(self, *args: str) -> list[str]:
        return [str(PGBACKREST), f"--config={self.pgbackrest_conf}", f"--stanza={STANZA}", *args]

    def _write_patroni_conf(self, n: Node) -> None:
        # archive_command and restore_command run in the data directory
        # (PostgreSQL's working directory), so "$PWD" names the node's own:
        # one setting in the DCS serves every node, whichever is primary.
        archive = " ".join(self._pgbackrest('--pg1-path="$PWD"', "archive-push", '"%p"'))
        restore = " ".join(self._pgbackrest('--pg1-path="$PWD"', "archive-get", "%f", '"%p"'))
        hba = ["local all all trust", "host all all 127.0.0.1/32 trust",
               "host replication all 127.0.0.1/32 trust"]
        conf: dict[str, Any] = {
            "scope": SCOPE,
            "namespace": "/fuelcard-ha/",
            "name": n.name,
            "restapi": {"listen": f"127.0.0.1:{n.rest_port}",
                        "connect_address": f"127.0.0.1:{n.rest_port}"},
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd_port}"]},
            "bootstrap": {
                "dcs": {
                    **DCS_TIMING,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    # Zero loss: a commit returns only once the synchronous
                    # standby has it, and only that standby may be promoted.
                    # Not strict: with no standby left the primary goes on
                    # alone, unprotected (docs/OPERATIONS.md, "Zero loss").
                    "synchronous_mode": True,
                    "synchronous_mode_strict": False,
                    "synchronous_node_count": 1,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_connections": 200,
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "256MB",
                            "hot_standby_feedback": "on",
                            "archive_mode": "on",
                            "archive_command": archive,
                            "archive_timeout": 60,
                            "synchronous_commit": "on",
                            "shared_buffers": "128MB",
                            "unix_socket_directories": str(self.root / "run"),
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{n.pg_port}",
                "connect_address": f"127.0.0.1:{n.pg_port}",
                "data_dir": str(n.data_dir(self.root)),
                "bin_dir": str(PG_BIN),
                "pgpass": str(self.root / n.name / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER},
                    "replication": {"username": SUPERUSER},
                    "rewind": {"username": SUPERUSER},
                },
                "pg_hba": hba,
                "parameters": {"unix_socket_directories": str(self.root / "run")},
                # A new or wiped standby is restored from the latest backup
                # (then replays the archive and streams the rest); a
                # basebackup from the primary only if there is no backup.
                "create_replica_methods": ["pgbackrest", "basebackup"],
                "pgbackrest": {
                    "command": " ".join(self._pgbackrest(
                        f"--pg1-path={n.data_dir(self.root)}", "--delta", "restore")),
                    "keep_data": True,
                    "no_params": True,
                },
                "recovery_conf": {"restore_command": restore},
            },
            # The other city's standby never becomes the synchronous one: a
            # commit would then wait for a cross-city round trip.
            "tags": {"nosync": n.city != "city-a", "nofailover": False, "city": n.city},
        }
        path = self.root / n.name / "patroni.yml"
        path.write_text(json.dumps(conf, indent=2))  # YAML is a superset of JSON
        _chown(path)

    def _spawn(self, cmd: list[str], log_name: str) -> int:
        logf = open(self.root / "logs" / log_name, "ab")  # noqa: SIM115 - the child keeps it
        env = {"PATH": f"{PG_BIN}:/usr/bin:/bin", "HOME": str(self.root), "LANG": "C.UTF-8",
               "PGUSER": SUPERUSER}
        proc = subprocess.Popen([*_as_cluster_user(), *cmd], stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                start_new_session=True)
        logf.close()
        _CHILDREN[proc.pid] = proc
        return proc.pid

    def start_etcd(self) -> None:
        e = self.etcd_port
        self.etcd_pid = self._spawn(
            [str(ETCD), "--name", "fuelcard-ha", "--data-dir", str(self.root / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{e}",
             "--advertise-client-urls", f"http://127.0.0.1:{e}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
             "--initial-cluster", f"fuelcard-ha=http://127.0.0.1:{self.etcd_peer_port}",
             "--log-level", "warn"], "etcd.log")
        self.save()
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                body = urllib.request.urlopen(f"http://127.0.0.1:{e}/health", timeout=2).read()
                if b"true" in body:
                    return
            if time.monotonic() > deadline or not _alive(self.etcd_pid):
                raise HaError(f"etcd did not become healthy; see {self.root / 'logs/etcd.log'}")
            time.sleep(0.2)

    def start_node(self, name: str) -> None:
        n = self.node(name)
        n.pid = self._spawn([str(PATRONI_VENV / "bin" / "patroni"),
                             str(self.root / n.name / "patroni.yml")], f"{n.name}.log")
        self.save()

    # ---- what Patroni says

    def members(self) -> list[Member]:
        """The cluster as the first Patroni that answers sees it."""
        last: Exception | None = None
        for n in self.nodes:
            try:
                raw = urllib.request.urlopen(f"http://127.0.0.1:{n.rest_port}/cluster",
                                             timeout=2).read()
            except (OSError, urllib.error.URLError) as exc:
                last = exc
                continue
            out = []
            for m in json.loads(raw).get("members", []):
                lag = m.get("lag")
                out.append(Member(m["name"], m["role"], m["state"], int(m["port"]),
                                  lag if isinstance(lag, int) else None, m.get("timeline")))
            return out
        raise HaError(f"no Patroni REST API answers ({last})")

    def leader(self) -> str | None:
        with contextlib.suppress(HaError):
            for m in self.members():
                if m.role == "leader" and m.state == "running":
                    return m.name
        return None

    def sync_standby(self) -> str | None:
        with contextlib.suppress(HaError):
            for m in self.members():
                if m.role == "sync_standby" and m.state in ("streaming", "running"):
                    return m.name
        return None

    def wait_healthy(self, timeout_s: float = 120.0, *, members: int = 3) -> None:
        """Until a leader, a synchronous standby and every other member streaming."""
        deadline = time.monotonic() + timeout_s
        seen: list[Member] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(HaError):
                seen = self.members()
                roles = sorted(m.role for m in seen if m.state in ("running", "streaming"))
                if len(roles) == members and "leader" in roles and (
                        members == 1 or "sync_standby" in roles) and all(
                        self._node_healthy(self.node(m.name)) for m in seen):
                    return
            time.sleep(0.5)
        raise HaError(f"the cluster did not become healthy in {timeout_s:.0f} s: {seen}; "
                      f"see {self.root / 'logs'}")

    def _node_healthy(self, n: Node) -> bool:
        """The node's own Patroni says its PostgreSQL runs (the DCS may still
        list a member that was lost until its key expires)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.rest_port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_leader(self, timeout_s: float = 60.0, *, other_than: str | None = None) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            name = self.leader()
            if name is not None and name != other_than:
                return name
            time.sleep(0.2)
        raise HaError(f"no leader (other than {other_than}) within {timeout_s:.0f} s")

    # ---- backups

    def _leader_node(self) -> Node:
        name = self.leader()
        if name is None:
            raise HaError("no leader to run the command on")
        return self.node(name)

    def backrest(self, *args: str, pg_path: Path | None = None, repo_only: bool = False,
                 timeout: float = 300.0) -> str:
        """Run a pgBackRest command as the cluster's user, for the primary
        (or, for a restore, into the directory `pg_path`; `repo_only`: a
        command about the repository alone, such as info)."""
        if repo_only:
            where = []
        elif pg_path is None:
            n = self._leader_node()
            where = [f"--pg1-path={n.data_dir(self.root)}", f"--pg1-port={n.pg_port}"]
        else:
            where = [f"--pg1-path={pg_path}"]
        return _run([*_as_cluster_user(), *self._pgbackrest(*where, *args)],
                    what=f"pgbackrest {' '.join(args)}", timeout=timeout)

    def backup(self, kind: str = "full") -> None:
        self.backrest(f"--type={kind}", "backup")

    def backup_info(self) -> dict[str, Any]:
        info: list[dict[str, Any]] = json.loads(self.backrest("--output=json", "info",
                                                                         repo_only=True))
        return info[0]

    def restore_at(self, target_time: str, name: str = "restored") -> tuple[Path, int, int]:
        """Restore the latest backup before `target_time` plus the archived
        WAL up to it into a fresh data directory, and start it alone
        (promoted). Returns (data dir, port, postmaster pid)."""
        d = self.root / name
        if d.exists():
            self.stop_postgres(d)
            shutil.rmtree(d)
        d.mkdir(mode=0o700)
        _chown(d)
        self.backrest("--type=time", f"--target={target_time}", "--target-action=promote",
                      "restore", pg_path=d)
        # The restored files carry Patroni's settings for the node it was
        # backed up from (port, hba file, archiving, synchronous standby
        # names): overridden on the command line so it starts alone and
        # never waits for a standby nor pushes WAL into the live archive.
        port = free_port()
        # A restore_command that names this directory (pgBackRest's own
        # names the configuration's default node).
        restore = " ".join(self._pgbackrest(f"--pg1-path={d}", "archive-get", "%f", '"%p"'))
        pid = self._spawn([
            str(PG_BIN / "postgres"), "-D", str(d), "-c", f"port={port}",
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root / 'run'}",
            "-c", f"hba_file={d / 'pg_hba.conf'}", "-c", f"ident_file={d / 'pg_ident.conf'}",
            "-c", "archive_mode=off", "-c", "synchronous_standby_names=",
            "-c", f"restore_command={restore}", "-c", "primary_conninfo=",
            "-c", "cluster_name=restored"], f"{name}.log")
        url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(psycopg.Error), psycopg.connect(url, connect_timeout=2) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return d, port, pid
            if time.monotonic() > deadline or not _alive(pid):
                raise HaError(f"the restored cluster did not come up promoted; see "
                              f"{self.root / 'logs' / (name + '.log')}")
            time.sleep(0.3)

    def stop_postgres(self, data_dir: Path) -> None:
        pidfile = data_dir / "postmaster.pid"
        if pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                _stop(int(pidfile.read_text().split()[0]), 20.0)

    # ---- faults

    def postmaster_pid(self, name: str) -> int:
        text = (self.node(name).data_dir(self.root) / "postmaster.pid").read_text()
        return int(text.split()[0])

    def crash_postmaster(self, name: str) -> None:
        """kill -9 of the node's postmaster: Patroni lives and sees it gone."""
        os.kill(self.postmaster_pid(name), signal.SIGKILL)

    def lose_node(self, name: str) -> None:
        """The whole node at once: Patroni and PostgreSQL (kill -9 both), so
        nothing hands the leader key over; it expires (ttl)."""
        n = self.node(name)
        pm = None
        with contextlib.suppress(OSError, ValueError):
            pm = self.postmaster_pid(name)
        if n.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.pid, signal.SIGKILL)
        if pm is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pm), signal.SIGKILL)
        if n.pid is not None:
            _wait_gone([n.pid], 10.0)
        n.pid = None
        self.save()

    def stop_node(self, name: str) -> None:
        n = self.node(name)
        if n.pid is not None:
            _stop(n.pid, 60.0)
            n.pid = None
            self.save()

    def wipe_node(self, name: str) -> None:
        d = self.node(name).data_dir(self.root)
        shutil.rmtree(d, ignore_errors=True)

    def switchover(self, candidate: str | None = None) -> str:
        """A planned switchover to the synchronous standby (or `candidate`)."""
        leader = self._leader_node()
        target = candidate or self.sync_standby()
        if target is None:
            raise HaError("no synchronous standby to switch over to")
        req = urllib.request.Request(
            f"http://127.0.0.1:{leader.rest_port}/switchover", method="POST",
            data=json.dumps({"leader": leader.name, "candidate": target}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=60).read()
        except urllib.error.HTTPError as exc:
            raise HaError(f"switchover refused: {exc.code} {exc.read().decode()[:300]}") from None
        return target

    # ---- fuelcard on it

    def create_database(self) -> None:
        leader = self._leader_node()
        with psycopg.connect(self.node_url(leader.name, "postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (DATABASE,)).fetchone()
            if exists is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def start_servers(self, count: int, fuelcard: Path) -> None:
        data = self.root / "server"
        data.mkdir(exist_ok=True)
        data.chmod(0o700)
        for i in range(count):
            port, metrics = free_port(), free_port()
            logf = open(self.root / "logs" / f"server{i}.log", "ab")  # noqa: SIM115
            proc = subprocess.Popen(
                [str(fuelcard), "serve", "--insecure", "--listen", f"127.0.0.1:{port}",
                 "--metrics-listen", f"127.0.0.1:{metrics}", "--database-url", self.database_url,
                 "--data-dir", str(data)],
                # A probe every 0.25 s (one short query per process): a
                # failover is noticed, and the pool renewed, within a
                # quarter of a second of the new primary accepting writes.
                env={**os.environ, "FUELCARD_REPLICA_URL": self.replica_url,
                     "FUELCARD_HEALTH_INTERVAL_S": "0.25"},
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
            logf.close()
            _CHILDREN[proc.pid] = proc
            self.servers.append({"port": port, "metrics": metrics, "pid": proc.pid})
            self.save()
        for i, srv in enumerate(self.servers):
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError), \
                        socket.create_connection(("127.0.0.1", srv["port"]), timeout=1):
                    break
                if time.monotonic() > deadline or not _alive(srv["pid"]):
                    raise HaError(f"fuelcard serve {i} did not start listening; see "
                                  f"{self.root / 'logs' / f'server{i}.log'}")
                time.sleep(0.1)

    # ---- tear down

    def down(self, *, keep: bool = False, fast: bool = False) -> None:
        """Stop everything; `fast`: kill -9 instead of orderly shutdowns (a
        drill's teardown, whose data is thrown away: ≈ 15 s sooner)."""
        if fast:
            self._kill_all()
            if not keep:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        _stop_all([int(s["pid"]) for s in self.servers], 30.0)
        # Patroni stops its PostgreSQL on SIGTERM; all at once (≈ 4 s each)
        _stop_all([n.pid for n in self.nodes if n.pid is not None], 60.0)
        for d in self.root.iterdir() if self.root.exists() else []:
            if (d / "postmaster.pid").exists():
                self.stop_postgres(d)
            if (d / "data" / "postmaster.pid").exists():
                self.stop_postgres(d / "data")
        if self.etcd_pid is not None:
            _stop_all([self.etcd_pid], 20.0)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


    def _kill_all(self) -> None:
        # Patroni runs each postmaster in a session of its own (so that it
        # outlives Patroni), hence the postmaster.pid files as well as the
        # process groups; a killed postmaster's backends exit by themselves.
        postmasters = []
        for d in [n.data_dir(self.root) for n in self.nodes] + list(
                self.root.iterdir() if self.root.exists() else []):
            with contextlib.suppress(OSError, ValueError, IndexError):
                postmasters.append(int((d / "postmaster.pid").read_text().split()[0]))
        groups = [int(s["pid"]) for s in self.servers] + [
            n.pid for n in self.nodes if n.pid is not None] + (
            [self.etcd_pid] if self.etcd_pid is not None else [])
        for pid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for pid in postmasters:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        # (the postmasters are not our children: once killed, nothing of
        # theirs needs waiting for)
        _wait_gone(groups, 10.0)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    if pid in _CHILDREN:
        return _CHILDREN[pid].poll() is None
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child (another process started it): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop(pid: int, timeout_s: float) -> None:
    _stop_all([pid], timeout_s)


def _stop_all(pids: list[int], timeout_s: float) -> None:
    """SIGTERM to each, then SIGKILL to those still there after timeout_s."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(left, 10.0)
    for pid in pids:
        _reap(pid)


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    """Wait (bounded) for killed children to be gone and reap them: a kill
    is delivered asynchronously, and a child never waited for stays a zombie
    (and Python warns when its Popen is collected still "running")."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _reap(pid)


def up(root: Path, *, servers: int, fuelcard: Path | None = None,
       log: Any = print) -> HaCluster:
    """Install what is missing, then start etcd, node1 (bootstraps the
    cluster), take the stanza and a first full backup, start node2 and node3
    (restored from that backup, then streaming), create and migrate the
    database, and start `servers` fuelcard processes."""
    install(log)
    if (root / STATE_FILE).exists():
        raise HaError(f"{root} holds a cluster already: scripts/ha-down --dir {root} first")
    cluster = HaCluster(root)
    try:
        cluster.prepare()
        started = time.monotonic()
        cluster.start_etcd()
        cluster.start_node("node1")
        cluster.wait_healthy(120, members=1)
        log(f"ha: node1 leads ({time.monotonic() - started:.1f} s)")
        cluster.backrest("stanza-create")
        cluster.backup("full")
        log(f"ha: first full backup taken ({time.monotonic() - started:.1f} s)")
        cluster.start_node("node2")
        cluster.start_node("node3")
        cluster.wait_healthy(180)
        log(f"ha: three nodes streaming ({time.monotonic() - started:.1f} s)")
        cluster.create_database()
        fc = fuelcard or Path(sys.executable).parent / "fuelcard"
        _run([str(fc), "migrate", "--database-url", cluster.database_url],
             what="fuelcard migrate", env={**os.environ, "FUELCARD_LOG_LEVEL": "WARNING"})
        if servers:
            cluster.start_servers(servers, fc)
    except BaseException:
        cluster.down(keep=True)
        raise
    return cluster


@contextlib.contextmanager
def running(servers: int = 0) -> Iterator[HaCluster]:
    """A cluster in a fresh directory, torn down afterwards (the drills' fixture)."""
    # Under /tmp, not pytest's tmp_path: the cluster's user must be able to
    # reach its directories, and pytest's base directory is the caller's alone.
    root = Path(tempfile.mkdtemp(prefix="fuelcard-ha-"))
    cluster = up(root, servers=servers)
    try:
        yield cluster
    finally:
        cluster.down(fast=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ha", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="install what is missing and start the cluster")
    p_up.add_argument("--dir", type=Path, default=Path("/tmp/fuelcard-ha"))
    p_up.add_argument("--servers", type=int, default=2, help="fuelcard serve processes")
    p_down = sub.add_parser("down", help="stop everything ha-up started")
    p_down.add_argument("--dir", type=Path, default=Path("/tmp/fuelcard-ha"))
    p_down.add_argument("--keep", action="store_true", help="keep the data directories")
    sub.add_parser("install", help="only install what the cluster needs")
    p_status = sub.add_parser("status", help="Patroni's view of the members")
    p_status.add_argument("--dir", type=Path, default=Path("/tmp/fuelcard-ha"))
    args = parser.parse_args(argv)
    try:
        if args.cmd == "install":
            install()
        elif args.cmd == "up":
            cluster = up(args.dir.resolve(), servers=args.servers)
            print(f"database (primary):  {cluster.database_url}")
            print(f"database (standbys): {cluster.replica_url}")
            for m in cluster.members():
                print(f"  {m.name:6} {cluster.node(m.name).city:7} port {m.port:5} {m.role:12} {m.state}")
            for s in cluster.servers:
                print(f"fuelcard serve: 127.0.0.1:{s['port']} (metrics :{s['metrics']}, pid {s['pid']})")
            print(f"stop with: scripts/ha-down --dir {cluster.root}")
        elif args.cmd == "status":
            cluster = HaCluster.load(args.dir.resolve())
            for m in cluster.members():
                print(f"{m.name:6} {m.role:12} {m.state:10} lag={m.lag} timeline={m.timeline}")
        else:
            root = args.dir.resolve()
            if not (root / STATE_FILE).exists():
                print(f"ha-down: no cluster in {root}", file=sys.stderr)
                return 1
            HaCluster.load(root).down(keep=args.keep)
    except HaError as exc:
        print(f"ha: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
