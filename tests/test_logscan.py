"""The log scanner (tests/plugins/logscan.py) can fail: it finds a planted
card number, phone or ID number in captured log lines and subprocess output,
and a run that leaks one exits non-zero."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest
from fuelcard_server.logs import JsonFormatter

from tests.plugins import logscan

PAN = "9860000000000000016"
PHONE = "13912345678"
ID_NUMBER = "11010119900307123X"


def test_a_planted_leak_is_found_and_a_desensitised_line_is_not(tmp_path: Path) -> None:
    raw = logscan.Scanner(tmp_path / "raw.jsonl", logging.Formatter("%(message)s"))
    clean = logscan.Scanner(tmp_path / "clean.jsonl", JsonFormatter())
    logger = logging.getLogger(f"logscan-probe-{uuid.uuid4().hex}")
    logger.propagate = False
    for scanner in (raw, clean):
        scanner.register("card number", PAN)
        scanner.register("phone", PHONE)
        scanner.register("ID number", ID_NUMBER)
        logger.addHandler(scanner.handler)
    logger.warning("card %s of holder %s (id %s) declined", PAN, PHONE, ID_NUMBER)
    raw.feed("a server's stderr", f"authorize card_number={PAN}")
    found = {(leak.kind, leak.source) for leak in raw.leaks()}
    assert found == {("card number", logger.name), ("phone", logger.name),
                     ("ID number", logger.name), ("card number", "a server's stderr")}
    assert all(PAN not in leak.masked for leak in raw.leaks())
    assert clean.leaks() == []  # the server's formatter masked them all
    for scanner in (raw, clean):
        logger.removeHandler(scanner.handler)
        scanner.close()


def test_the_session_captures_every_record_at_debug() -> None:
    scanner = logscan.session_scanner()
    assert scanner is not None
    # letters only: the formatter masks long digit runs, which a random hex
    # string holds now and then
    marker = "logscan-marker-" + uuid.uuid4().hex.translate(str.maketrans("0123456789",
                                                                          "ghijklmnop"))
    logging.getLogger("fuelcard_server.some.module").debug("%s", marker)
    assert marker in scanner.path.read_text()


def test_a_run_that_leaks_fails(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(test_leaky=f'''
import logging
from tests.plugins import logscan

def test_seeds_and_leaks():
    logscan.register("card number", "{PAN}")
    logscan.feed("a server's stderr", "card_number={PAN}")

def test_logs_masked():
    logscan.register("phone", "{PHONE}")
    logging.getLogger("x").info("phone %s", "{PHONE}")
''')
    result = pytester.runpytest_subprocess("-p", "tests.plugins.logscan", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*logscan: personal data in the logs*",
                                 "card number 986***16 in a line from a server's stderr",
                                 "1 leak(s): the run fails"])
