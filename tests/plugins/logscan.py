"""The logs of the whole test run, grepped for personal data.

Every log record of the run, at DEBUG, is formatted by the server's own JSON
formatter (fuelcard_server.logs: the line as it would be written, after
desensitising) and kept in a file; output of server subprocesses that tests
capture is added with `feed()`. Builders `register()` every card number,
phone number and ID number they seed. At the end of the session the file is
searched for each of them: any hit fails the run (exit status 1), naming the
kind of value and the logger, never the value itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from fuelcard_server.logs import JsonFormatter, JsonHandler

# Shorter values are not personal data here (amounts, ids, ports).
MIN_CHARS = 7


@dataclass(frozen=True)
class Leak:
    kind: str  # card number | phone | ID number
    source: str  # a logger name, or where fed output came from
    masked: str


class Scanner:
    """Captured log lines and the seeded values to look for in them."""

    def __init__(self, path: Path, formatter: logging.Formatter | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = path.open("a", encoding="utf-8")
        self.seeded: dict[str, str] = {}
        self.handler = _Handler(self)
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(formatter or JsonFormatter())

    def register(self, kind: str, *values: str) -> None:
        with self._lock:
            for value in values:
                if value and len(value) >= MIN_CHARS:
                    self.seeded[value] = kind

    def write(self, source: str, line: str) -> None:
        with self._lock:
            self._file.write(json.dumps({"source": source, "line": line}) + "\n")
            self._file.flush()

    def feed(self, source: str, text: str) -> None:
        """Output a test captured from a server subprocess (its stderr)."""
        for line in text.splitlines():
            self.write(source, line)

    def leaks(self) -> list[Leak]:
        with self._lock:
            self._file.flush()
            seeded = dict(self.seeded)
        found: list[Leak] = []
        with self.path.open(encoding="utf-8") as f:
            for raw in f:
                entry = json.loads(raw)
                for value, kind in seeded.items():
                    if value in entry["line"]:
                        found.append(Leak(kind, entry["source"], value[:3] + "***" + value[-2:]))
        return found

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Handler(logging.Handler):
    def __init__(self, scanner: Scanner) -> None:
        super().__init__(logging.DEBUG)
        self.scanner = scanner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.scanner.write(record.name, self.format(record))
        except Exception:
            self.handleError(record)


_SESSION: Scanner | None = None


def register(kind: str, *values: str) -> None:
    """Note seeded personal data (kind: card number, phone, ID number)."""
    if _SESSION is not None:
        _SESSION.register(kind, *values)


def feed(source: str, text: str) -> None:
    if _SESSION is not None:
        _SESSION.feed(source, text)


def session_scanner() -> Scanner | None:
    return _SESSION


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION
    if _SESSION is not None:
        return
    directory = Path(tempfile.mkdtemp(prefix="fuelcard-logscan-"))
    _SESSION = Scanner(directory / "logs.jsonl")
    _attach()


def _attach() -> None:
    """Put the session's handler (back) on the root logger at DEBUG.

    A test that runs a command in-process (cli.main) has the command's
    logs.configure() replace the root handlers, which would silently end the
    scan for every later test; its stderr handler also outlives the test's
    captured stream. Before each test both are undone."""
    assert _SESSION is not None
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler is not _SESSION.handler and (isinstance(handler, JsonHandler) or (
                type(handler) is logging.StreamHandler
                and isinstance(handler.formatter, JsonFormatter))):
            root.removeHandler(handler)
    if _SESSION.handler not in root.handlers:
        root.addHandler(_SESSION.handler)
    root.setLevel(logging.DEBUG)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _SESSION is not None:
        _attach()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SESSION is None:
        return
    leaks = _SESSION.leaks()
    session.config.stash[_LEAKS] = leaks
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    leaks = terminalreporter.config.stash.get(_LEAKS, [])
    if leaks:
        terminalreporter.section("logscan: personal data in the logs", red=True)
        for leak in leaks[:50]:
            terminalreporter.write_line(f"{leak.kind} {leak.masked} in a line from {leak.source}")
        terminalreporter.write_line(f"{len(leaks)} leak(s): the run fails")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _SESSION
    if _SESSION is not None:
        logging.getLogger().removeHandler(_SESSION.handler)
        _SESSION.close()
        shutil.rmtree(_SESSION.path.parent, ignore_errors=True)
        _SESSION = None


_LEAKS = pytest.StashKey[list[Leak]]()
