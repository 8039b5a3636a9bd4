"""Issue 20, item 9: `fuelcard serve` with the embedded PostgreSQL, killed
with SIGKILL and started again at once, as a supervisor would; and
`fuelcard --help`, which lists only commands that exist.

The postmaster outlives a killed server (pg_ctl detaches it): the next start
adopts it, serves from it, and stops it on its way out, so none is left
running. A postmaster.pid left by a cluster that died with its machine,
whose pid now belongs to another process, does not keep the cluster from
starting (nor is that process signalled). Real subprocesses, a real data
directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import account_pb2, account_pb2_grpc
from fuelcard_server.embedded import SYSTEM_USER

from tests.plugins import logscan
from tests.plugins.server import TEST_KEY_HEX
from tests.support import builders

FUELCARD = str(Path(sys.executable).parent / "fuelcard")
START_S = 180  # an upper bound on a start (initdb and migrations on a shared machine), not a measure


def _alive(pid: int) -> bool:
    """A process that runs (a zombie nobody reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 60
    while _alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} is still there"
        time.sleep(0.1)


def _cluster_processes(pgdata: Path) -> list[int]:
    """PostgreSQL processes of this cluster (they all work in its directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.path.realpath(os.readlink(entry / "cwd")) == os.path.realpath(pgdata):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])


class Serve:
    """One `fuelcard serve --insecure` on the embedded PostgreSQL in `data`."""

    def __init__(self, data: Path, name: str) -> None:
        self.port_file = data / f"grpc-port-{name}"
        self.log = data / f"serve-{name}.log"
        env = {**os.environ, "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX}
        env.pop("FUELCARD_DATABASE_URL", None)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [FUELCARD, "serve", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(data),
                 "--port-file", str(self.port_file)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_S
        while not (self.port_file.exists() and self.port_file.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"fuelcard serve did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.target = f"127.0.0.1:{self.port_file.read_text()}"
        self._fed = False

    def output(self) -> str:
        return self.log.read_text()

    def _done(self) -> None:
        if not getattr(self, "_fed", True):
            self._fed = True
            logscan.feed("fuelcard serve", self.output())

    def kill(self, reap: bool = True) -> None:
        """SIGKILL, as the OOM killer or `kill -9` does: the command has no
        chance to stop anything. Not reaped: its zombie stays (as under a
        parent that never waits) until kill() is called again."""
        if self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if reap:
            self.proc.wait(timeout=60)
            self._done()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._done()
        return code


@contextmanager
def serving(data: Path, name: str) -> Iterator[Serve]:
    serve = Serve(data, name)
    try:
        yield serve
    finally:
        serve.kill()


def _open_account(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        opened = account_pb2_grpc.AccountServiceStub(channel).OpenAccount(
            account_pb2.OpenAccountRequest(request_id=builders.rid(),
                                           type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                                           holder=account_pb2.Holder(name="重启测试")), timeout=30)
    account_id: str = opened.account.account_id
    return account_id


def _get_account(target: str, account_id: str) -> account_pb2.Account:
    with grpc.insecure_channel(target) as channel:
        account: account_pb2.Account = account_pb2_grpc.AccountServiceStub(channel).GetAccount(
            account_pb2.GetAccountRequest(account_id=account_id), timeout=30).account
    return account


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: PostgreSQL runs as another user when we
    # are root and must traverse every parent, and a pytest session starting
    # meanwhile takes the others' access to /tmp/pytest-of-USER away again.
    with tempfile.TemporaryDirectory(prefix="fuelcard-restart-") as tmp:
        yield Path(tmp)
        # whatever happened, no cluster of this test is left running
        for pid in _cluster_processes(Path(tmp) / "postgres" / "pgdata"):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_server_restarts_at_once_and_leaves_no_postmaster(data_dir: Path) -> None:
    pgdata = data_dir / "postgres" / "pgdata"
    with serving(data_dir, "first") as first:
        account_id = _open_account(first.target)
        postmaster = _postmaster_pid(pgdata)
        first.kill(reap=False)
        _wait_gone(first.proc.pid)
        # What a killed server leaves: its postmaster, running on.
        assert _alive(postmaster)

        with serving(data_dir, "second") as second:
            # Serves at once, from the same cluster (adopted, not a second
            # one), though the killed server's zombie is still there.
            assert _zombie(first.proc.pid)
            assert _get_account(second.target, account_id).account_id == account_id
            assert _postmaster_pid(pgdata) == postmaster
            assert "adopting it" in second.output()
            assert second.stop() == 0
    # ...and stops it on its way out.
    _wait_gone(postmaster)
    assert not (pgdata / "postmaster.pid").exists()
    assert _cluster_processes(pgdata) == []

    # A clean start and stop of its own leaves nothing either, and adopts nothing.
    with serving(data_dir, "third") as third:
        assert _get_account(third.target, account_id).account_id == account_id
        assert "adopting" not in third.output()
        assert third.stop() == 0
    assert _cluster_processes(pgdata) == []


def test_a_stale_postmaster_pid_naming_another_process_does_not_block_the_start(
        data_dir: Path) -> None:
    pgdata = data_dir / "postgres" / "pgdata"
    with serving(data_dir, "first") as first:
        account_id = _open_account(first.target)
        postmaster = _postmaster_pid(pgdata)
        first.kill()
    # The machine dies: the postmaster and its children with it.
    os.kill(postmaster, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while _cluster_processes(pgdata):
        assert time.monotonic() < deadline, _cluster_processes(pgdata)
        time.sleep(0.1)
    # After the reboot its pid belongs to another process of the same user.
    # (a fresh Python switches user and execs: a fork with gRPC's threads
    # about, not followed at once by exec, can crash; see plugins/database.py)
    switch = (f"e = pwd.getpwnam({SYSTEM_USER!r}); os.setgroups([]); os.setgid(e.pw_gid); "
              "os.setuid(e.pw_uid); " if os.geteuid() == 0 else "")
    other = subprocess.Popen([sys.executable, "-c", f"import os, pwd; {switch}"
                              "os.execvp('sleep', ['sleep', '600'])"])
    try:
        lines = (pgdata / "postmaster.pid").read_text().split("\n")
        (pgdata / "postmaster.pid").write_text("\n".join([str(other.pid), *lines[1:]]))

        with serving(data_dir, "second") as second:
            # the account, committed before the crash, is there
            assert _get_account(second.target, account_id).account_id == account_id
            assert f"postmaster.pid names pid {other.pid}, which is not its postmaster" \
                in second.output()
            assert second.stop() == 0
        assert _cluster_processes(pgdata) == []
        # the process that had the pid was never signalled
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(timeout=30)


def _help(*command: str) -> str:
    res = subprocess.run([FUELCARD, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, (command, res.stderr)
    assert res.stdout.startswith(" ".join(("usage: fuelcard", *command))), res.stdout[:200]
    return res.stdout


def _listed(help_text: str) -> list[str]:
    """The commands a help text lists under its positional arguments (an
    argparse listing: four spaces, the name, its help)."""
    section = help_text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", section, re.MULTILINE)


def test_help_lists_only_commands_that_exist_and_each_takes_help() -> None:
    top = _help()
    commands = _listed(top)
    assert {"serve", "migrate", "verify", "audit", "risk", "events"} <= set(commands)
    ran: list[str] = []
    pending: list[tuple[str, ...]] = [(c,) for c in commands]
    while pending:
        command = pending.pop()
        text = _help(*command)
        ran.append(" ".join(command))
        if "positional arguments:" in text:
            pending.extend((*command, sub) for sub in _listed(text) if sub not in command)
    assert {"audit verify", "audit anchor", "risk load", "risk backtest", "events backfill"} <= set(ran)
    # Every example the help gives names a real command, which takes --help.
    examples = re.findall(r"^  fuelcard ((?:[a-z][a-z-]* ?)+)", top.split("examples:", 1)[1],
                          re.MULTILINE)
    assert examples
    for words in examples:
        command = tuple(words.split())
        assert " ".join(command) in ran, command
    # What the description once named a command is none (a `serve` flag): it is refused.
    res = subprocess.run([FUELCARD, "demo"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "invalid choice: 'demo'" in res.stderr, res.stderr
