"""An embedded PostgreSQL for zero-setup runs and tests.

The binaries come from the `pgserver` wheel, so a fresh machine needs nothing
installed. We drive initdb/pg_ctl ourselves rather than through pgserver's
own server class so that we choose the settings that matter here: durability
on (fsync, synchronous_commit), a TCP port on loopback for pgbench and
replicas, a Unix socket for the server's own connections, and enough
connections for several worker processes.

The postmaster outlives the process that starts it (pg_ctl detaches it): a
`fuelcard serve` killed with SIGKILL leaves it running. So the starter is
recorded (`owner`: pid and start time), and the next start adopts a
postmaster whose starter is gone: it is used, and stopped when that process
is done, instead of being left running for good. A postmaster.pid whose pid
now belongs to another process (the cluster died with its machine or
container, and the pid was handed out again) is removed, so that the
cluster starts instead of waiting on a server that is not there; so is one
naming a zombie (a postmaster killed and never reaped: a container's init
may never do it).

It is for development and single-node use. Still, any local user could
connect to a `trust` cluster as its superuser, so every connection (socket
and TCP, replication too) needs a password (SCRAM-SHA-256): at the first
start the passwords of the superuser and of the serving role (roles.SERVING)
are made at random and kept in `pgpass` in the data directory (mode 0600,
libpq's password file format), and pg_hba.conf is rewritten to demand them.
A cluster made before (trust) is converted the same way when next started.
The URLs it gives name that file (`passfile=`), so whatever connects with
them - the server, `fuelcard migrate`, the tests - authenticates.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; when we are root it runs as this user.
SYSTEM_USER = "fuelcard-pg"
DATABASE = "fuelcard"
SUPERUSER = "postgres"
PASSFILE = "pgpass"
# Every connection, local or over TCP, ordinary or replication, by password.
HBA = """\
# Written by fuelcard (embedded.py): password (SCRAM-SHA-256) authentication for
# every connection. The passwords are in the data directory's pgpass (0600).
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


def bin_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to
    tell it from a later process given the same pid; None if there is no
    such process, or only its zombie (killed, and not reaped by its parent).
    Without /proc: "" for any live process."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # after the command name, which is in parentheses and may hold anything:
    # the state, and starttime as the 20th field
    after_name = fields.rsplit(")", 1)[1].split()
    return None if after_name[0] == "Z" else after_name[19]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedPostgres:
    """A PostgreSQL cluster in `data_dir`, started on demand."""

    def __init__(self, data_dir: Path, *, port: int | None = None,
                 settings: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self._requested_port = port
        self._extra = settings or {}
        self._started_here = False
        self._user = SYSTEM_USER if os.geteuid() == 0 else None
        # Unix socket paths are limited to ~107 bytes: keep the socket short.
        digest = hashlib.sha1(str(self.data_dir).encode()).hexdigest()[:12]
        self.socket_dir = Path(tempfile.gettempdir()) / f"fuelcard-pg-{digest}"

    # -- paths and addresses -------------------------------------------------
    @property
    def port(self) -> int:
        return int((self.data_dir / "port").read_text())

    @property
    def owner_file(self) -> Path:
        """Who started the running postmaster: "PID STARTTIME"."""
        return self.data_dir / "owner"

    @property
    def passfile(self) -> Path:
        """The cluster's passwords (libpq's password file format, mode 0600)."""
        return self.data_dir / PASSFILE

    def url(self, database: str = DATABASE, *, tcp: bool = False) -> str:
        # The password file, not the password: a URL ends up in process
        # listings and error messages; the file stays 0600 in the data dir.
        if tcp:
            return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}?passfile={self.passfile}"
        return (f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"
                f"&passfile={self.passfile}")

    def passwords(self) -> dict[str, str]:
        """The password of each role in the password file."""
        out = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.passfile.read_text().splitlines():
                if line and not line.startswith("#"):
                    *_, user, password = line.split(":", 4)
                    out[user] = password
        return out

    # -- lifecycle -----------------------------------------------------------
    def _run(self, *args: str, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(bin_dir() / args[0]), *args[1:]]
        # Drop root's group too: a directory's group bits would otherwise
        # apply instead of the "other" bits we opened up.
        ids: dict[str, Any] = {}
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd="/",
                             timeout=120, env=None if env is None else {**os.environ, **env}, **ids)
        if check and res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def _prepare_permissions(self) -> None:
        if self._user is None:
            return
        try:
            pwd.getpwnam(self._user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", self._user], check=True, capture_output=True)
        entry = pwd.getpwnam(self._user)
        # The postgres user must traverse every parent of the data and binaries.
        for path in (self.data_dir, bin_dir()):
            for parent in [path, *path.parents]:
                mode = parent.stat().st_mode
                wanted = mode | stat.S_IXOTH | stat.S_IROTH
                if mode != wanted:
                    parent.chmod(wanted)
        for path in (bin_dir().parent / "lib", bin_dir().parent / "share", bin_dir()):
            for root, dirs, files in os.walk(path):
                for name in dirs:
                    p = Path(root) / name
                    p.chmod(p.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
                for name in files:
                    p = Path(root) / name
                    p.chmod(p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path == bin_dir() else 0))
        for p in (self.data_dir, self.socket_dir):
            os.chown(p, entry.pw_uid, entry.pw_gid)
        if self.pgdata.exists():
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _write_conf(self, port: int) -> None:
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            "shared_buffers": "256MB",
            # Durable: a confirmed payment survives a crash.
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "max_wal_size": "2GB",
            "checkpoint_timeout": "15min",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",
            "logging_collector": "off",
            **self._extra,
        }
        text = "".join(f"{k} = {v}\n" for k, v in conf.items())
        target = self.pgdata / "fuelcard.conf"
        target.write_text(text)
        main = self.pgdata / "postgresql.conf"
        if "include_if_exists = 'fuelcard.conf'" not in main.read_text():
            with main.open("a") as f:
                f.write("\ninclude_if_exists = 'fuelcard.conf'\n")
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(target, entry.pw_uid, entry.pw_gid)

    def is_running(self) -> bool:
        if not (self.pgdata / "postmaster.pid").exists() or self._stale_lock() is not None:
            return False
        res = self._run("pg_ctl", "-D", str(self.pgdata), "status", check=False)
        return res.returncode == 0

    def _stale_lock(self) -> int | None:
        """The pid in postmaster.pid if it looks alive but is no postmaster
        of this cluster; None when it is one, is gone, or cannot be told."""
        return self._stale_pid(self.pgdata / "postmaster.pid")

    def _stale_pid(self, lock: Path) -> int | None:
        """The pid a lock file names if it is a zombie (a crashed postmaster
        nobody reaped: a container's init may never do it) or a live process
        that does not work in this cluster's directory (as a postmaster and
        its children do). pg_ctl and PostgreSQL take any of those for a
        running postmaster: pg_ctl would say "running" and signal it, and
        PostgreSQL would refuse to start."""
        try:
            pid = int(lock.read_text().split("\n", 1)[0])
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):  # no lock, no such process, no /proc
            return None
        if state == "Z":
            return pid
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # not ours to read: PostgreSQL ignores other users' pids too
            return None
        return None if os.path.realpath(cwd) == os.path.realpath(self.pgdata) else pid

    def _clear_stale_lock(self) -> None:
        """Remove the lock files (the data directory's, the socket's) that
        name a pid which is not a postmaster of this cluster any more."""
        for lock in (self.pgdata / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")):
            pid = self._stale_pid(lock)
            if pid is not None:
                log.warning("embedded PostgreSQL: %s names pid %d, which is not its postmaster "
                            "any more (gone, or another process); removing it", lock.name, pid)
                lock.unlink(missing_ok=True)

    def _claim(self) -> None:
        """Record this process as the one that stops the postmaster."""
        pid = os.getpid()
        self.owner_file.write_text(f"{pid} {_process_start(pid)}\n")
        self._started_here = True

    def _owner_alive(self) -> int | None:
        """The pid of the process that started the running postmaster, if it
        is still there; None if it is gone (or unknown)."""
        try:
            pid_text, _, start = self.owner_file.read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        return pid if _process_start(pid) == start else None

    def start(self) -> str:
        """Start (initialising if needed) and return the database URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o777)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising embedded PostgreSQL in %s", self.pgdata)
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)
            # Passwords from the start: no moment of `trust`. initdb reads the
            # superuser's from a file the PostgreSQL user can read, removed after.
            self._write_passfile()
            pwfile = self.data_dir / "initdb-pwfile"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.passwords()[SUPERUSER] + "\n")
            if self._user:
                entry = pwd.getpwnam(self._user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            try:
                self._run("initdb", "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=scram-sha-256",
                          f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C", "--no-instructions")
            finally:
                pwfile.unlink(missing_ok=True)
        self._clear_stale_lock()
        if self.is_running():
            owner = self._owner_alive()
            if owner is not None:
                # another fuelcard process uses it (e.g. `migrate` next to
                # `serve`): it stops it, not we
                log.info("embedded PostgreSQL already running on port %s (started by pid %d)",
                         self.port, owner)
            else:
                log.warning("embedded PostgreSQL on port %s was left running by a process that "
                            "is gone (killed?): adopting it, to stop it when done", self.port)
                self._claim()
        else:
            port = self._requested_port
            if port is None:
                saved = self.data_dir / "port"
                port = int(saved.read_text()) if saved.exists() else _free_port()
                if not _port_free(port):
                    port = _free_port()
            self._write_conf(port)
            (self.data_dir / "port").write_text(str(port))
            res = self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60",
                            "-l", str(self.pgdata / "server.log"), "start", check=False)
            if res.returncode != 0:
                logtail = ""
                with contextlib.suppress(OSError):
                    logtail = (self.pgdata / "server.log").read_text()[-2000:]
                raise RuntimeError(f"embedded PostgreSQL failed to start: {res.stderr}\n{logtail}")
            self._claim()
        self._ensure_database()
        self._require_passwords()
        return self.url()

    def _write_passfile(self) -> None:
        from fuelcard_server.roles import SERVING

        lines = [f"*:*:*:{user}:{secrets.token_urlsafe(24)}\n" for user in (SUPERUSER, SERVING)]
        tmp = self.passfile.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# fuelcard: the embedded PostgreSQL's passwords (made at init)\n" + "".join(lines))
        os.replace(tmp, self.passfile)

    def _require_passwords(self) -> None:
        """Make every connection need a password (module docstring): the
        passwords made and set once, pg_hba.conf rewritten and reloaded."""
        from fuelcard_server.roles import SERVING

        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() == HBA:
            if SUPERUSER not in self.passwords():
                raise RuntimeError(f"{self.passfile} is missing or damaged: the embedded PostgreSQL "
                                   "demands passwords that are no longer known")
            return
        if (self.pgdata / "standby.signal").exists():
            return  # read-only; a standby has its primary's roles and pg_hba.conf
        if SUPERUSER not in self.passwords():
            self._write_passfile()
        passwords = self.passwords()
        # A new cluster: the superuser's password is set (initdb), the serving
        # role's not yet. One made before: still trust. Set both, then demand them.
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {})"
                                 " THEN CREATE ROLE {} LOGIN; END IF; END $$").format(
                sql.Literal(SERVING), sql.Identifier(SERVING)))
            for user in (SUPERUSER, SERVING):
                conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(passwords[user])))
        hba.write_text(HBA)
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(hba, entry.pw_uid, entry.pw_gid)
        self._run("pg_ctl", "-D", str(self.pgdata), "reload")
        # The postmaster re-reads pg_hba.conf on the signal, not before
        # pg_ctl returns: wait until a connection without the password fails.
        bare = psycopg.conninfo.make_conninfo(self.url("postgres"), passfile=str(self.data_dir / "none"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                psycopg.connect(bare, connect_timeout=5).close()
            except psycopg.OperationalError:
                return
            time.sleep(0.05)
        raise RuntimeError("embedded PostgreSQL did not take up password authentication")

    def create_standby(self, primary: EmbeddedPostgres) -> None:
        """Make this (new) cluster a streaming standby of `primary`, which
        must be running: a base backup over the replication protocol
        (pg_basebackup -R writes standby.signal and primary_conninfo). Then
        `start()` runs it read-only, replaying the primary's WAL."""
        if (self.pgdata / "PG_VERSION").exists():
            raise RuntimeError(f"{self.pgdata} already holds a cluster")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o777)
        self._prepare_permissions()
        # The password in the child's environment (the PostgreSQL user cannot
        # read our 0600 file); -R writes it into the standby's own
        # postgresql.auto.conf (its data directory, 0700), for streaming.
        self._run("pg_basebackup", "-D", str(self.pgdata), "-h", "127.0.0.1",
                  "-p", str(primary.port), "-U", SUPERUSER, "-X", "stream", "-R",
                  "--checkpoint=fast", "--no-sync",
                  env={"PGPASSWORD": primary.passwords()[SUPERUSER]})
        # the standby has the primary's roles: the same passwords
        shutil.copyfile(primary.passfile, self.passfile)
        self.passfile.chmod(0o600)

    def _ensure_database(self) -> None:
        psql = [str(bin_dir() / "psql"), "-X", "-q", "-At", "-h", str(self.socket_dir),
                "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"]
        env = {**os.environ, "PGPASSFILE": str(self.passfile)}
        deadline = time.monotonic() + 30
        while True:
            res = subprocess.run([*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                                 capture_output=True, text=True, env=env)
            if res.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded PostgreSQL not answering: {res.stderr}")
            time.sleep(0.2)
        if res.stdout.strip() != "1":
            subprocess.run([*psql, "-c", f"CREATE DATABASE {DATABASE}"], check=True,
                           capture_output=True, env=env)

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-m", mode, "stop",
                      check=False)
        self.owner_file.unlink(missing_ok=True)
        # The socket directory lives in the system temp dir: do not leave it.
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def stop_if_started_here(self) -> None:
        if self._started_here:
            self.stop()
