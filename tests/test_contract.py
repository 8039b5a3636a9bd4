"""The contract: buf lint, no breaking change against the released v1, and
committed stubs that match what the pinned generator makes of proto/."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RELEASED = ROOT / "contract" / "fuelcard-v1.binpb"


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_buf_lint_passes() -> None:
    res = _run(str(BIN / "buf"), "lint")
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_breaking_change_against_released_contract() -> None:
    assert RELEASED.exists(), "the released v1 image is committed (scripts/release-contract)"
    res = _run(str(BIN / "buf"), "breaking", "--against", str(RELEASED))
    assert res.returncode == 0, res.stdout + res.stderr


def test_committed_stubs_match_generated(tmp_path: Path) -> None:
    res = subprocess.run(["bash", "scripts/gen-stubs", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr
    committed = ROOT / "stubs" / "fuelcard" / "v1"
    fresh = tmp_path / "fuelcard" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    assert names, "the generator produced nothing"
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs, run scripts/gen-stubs: {mismatch + errors}"
