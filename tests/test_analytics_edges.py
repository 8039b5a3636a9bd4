"""Issue 20, item 8: the analytics sidecar's rough edges. A young warehouse
gives the reports it can and says which need more history (no traceback);
Chinese plate labels render with a CJK font; `generate --days 30` works; and
every example in every `--help` text of fuelcard-analytics runs."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from fuelcard.v1 import control_pb2, control_pb2_grpc
from fuelcard_analytics import cli, reports
from fuelcard_analytics.generator import YearConfig, generate
from fuelcard_analytics.warehouse import open_store

from tests.plugins.server import RunningServer, TlsServer

PLATE = "云A·10097"
SMALL_MONTH = ["--days", "30", "--stations", "6", "--drivers", "120", "--families", "15",
               "--fleets", "2"]


# -- a CJK font for plate labels -----------------------------------------------------------


def _render(title: str, path: Path) -> None:
    plt = reports._plt()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.bar([0, 1], [3, 4])
    ax.set_xticks([0, 1], [PLATE, "云B·10195"])
    ax.set_title(title)
    reports._save(fig, path)


def test_a_cjk_font_is_found_and_chinese_labels_render_without_missing_glyphs(
        tmp_path: Path) -> None:
    from matplotlib import font_manager

    family = reports.cjk_font()
    assert family is not None, "no CJK font: scripts/bootstrap installs fonts-noto-cjk"
    path = font_manager.findfont(font_manager.FontProperties(family=family),
                                 fallback_to_default=False)
    assert family.split()[0].lower() in Path(path).name.lower() or "cjk" in path.lower(), path
    assert reports._label(PLATE, "fallback") == PLATE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" is a UserWarning
        _render(f"车队 {PLATE}", tmp_path / "plates.png")
    assert (tmp_path / "plates.png").read_bytes().startswith(b"\x89PNG")


def test_without_the_cjk_font_the_same_chart_would_warn(tmp_path: Path) -> None:
    """The check above can fail: DejaVu Sans alone has no 云."""
    plt = reports._plt()
    with plt.rc_context({"font.family": ["DejaVu Sans"]}), \
            pytest.warns(UserWarning, match="missing from font"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.set_title(PLATE)
        fig.savefig(tmp_path / "tofu.png")
        plt.close(fig)


# -- a young warehouse ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`generate --days 30`: a month of history."""
    path = tmp_path_factory.mktemp("month") / "month.duckdb"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main(["generate", "--store", str(path), *SMALL_MONTH]) == 0
    assert "generated" in printed.getvalue()
    return path


def test_generate_30_days_makes_a_month_of_sales_with_chinese_plates(month: Path) -> None:
    store = open_store(str(month))
    try:
        assert reports.history_days(store) == 30
        labels = {r[0] for r in store.query(
            "SELECT label FROM dim_account WHERE account_type = 2 AND parent_account_id <> ''")}
        churn_days = [r[0] for r in store.query(
            "SELECT churn_day FROM generated_truth WHERE churner")]
    finally:
        store.close()
    assert labels and all(re.fullmatch(r"云[A-H]·\d{5}", label) for label in labels), labels
    # churners stop inside the month (a year's rule, "the last two months", cut short)
    start = YearConfig().start
    assert churn_days and all(start < d < start + dt.timedelta(days=30) for d in churn_days)


def test_a_young_warehouse_gives_the_reports_it_can_and_says_what_the_rest_need(
        month: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports"
    assert cli.main(["report", "--store", str(month), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "forecast: not made: it needs 86 days of sales, the warehouse holds 30" in printed.out
    assert "churn: not made: it needs 169 days of sales, the warehouse holds 30" in printed.out
    assert "not made yet: forecast (from 86 days), churn (from 169 days)" in printed.err
    made = sorted(p.stem for p in out.glob("*.png"))
    assert made == ["channel_recharges", "fleet_costs", "points_liability", "station_heatmap",
                    "station_sales", "tiers"]
    assert PLATE[:2] in (out / "fleet_costs.csv").read_text(encoding="utf-8")
    # asked for by name, a report that cannot be made is a failure
    assert cli.main(["report", "forecast", "--store", str(month), "--out", str(out)]) == 1
    assert "forecast: not made" in capsys.readouterr().out


def test_an_empty_warehouse_says_there_is_nothing_to_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--store", str(tmp_path / "new.duckdb"), "--out",
                     str(tmp_path / "r")]) == 1
    assert "holds no sales yet" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_week_is_enough_for_generate(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "week.duckdb"))
    try:
        generate(store, YearConfig(days=7, stations=3, drivers=30, families=4, fleets=1),
                 log=lambda _: None)
        assert reports.history_days(store) == 7
    finally:
        store.close()


# -- every example of every --help ---------------------------------------------------------


def _help_texts() -> list[str]:
    parser = cli.build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for sub in getattr(action, "choices", {}).values():
            texts.append(sub.format_help())
    return texts


def _examples() -> list[list[str]]:
    found: list[list[str]] = []
    for text in _help_texts():
        for line in text.splitlines():
            if line.strip().startswith("fuelcard-analytics "):
                argv = shlex.split(line.strip())
                if argv not in found:
                    found.append(argv)
    return found


def test_the_help_texts_have_examples_of_every_command() -> None:
    commands = {argv[1] for argv in _examples()}
    assert commands == {"follow", "sync", "generate", "report", "totals"}


def test_every_help_example_runs(server: RunningServer, tls_server: TlsServer, dev_certs: Path,
                                 tmp_path: Path) -> None:
    # what the examples expect around them: a server on 127.0.0.1:50051
    # (here: the test servers' ports), the analytics caller's certificates
    # in data/certs, something in the event stream
    certs = tmp_path / "data" / "certs"
    certs.mkdir(parents=True)
    for name in ("ca.pem", "analytics-bi.pem", "analytics-bi.key"):
        shutil.copy(dev_certs / name, certs / name)
    control_pb2_grpc.ControlServiceStub(tls_server.channel("admin-ops")).RegisterStation(
        control_pb2.RegisterStationRequest(station=control_pb2.Station(
            station_id="KM-077", name="昆明 77",
            location=control_pb2.GeoPoint(latitude=25.0, longitude=102.7))))
    examples = _examples()
    # histories first, then what reads them
    examples.sort(key=lambda argv: argv[1] != "generate")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for argv in examples:
        secure = "--certs-dir" in argv
        target = tls_server.target if secure else server.target
        args = [target if a == "127.0.0.1:50051" else a for a in argv[1:]]
        cmd = [sys.executable, "-W", "error::UserWarning", "-m", "fuelcard_analytics.cli", *args]
        if argv[1] == "follow":  # follows for ever: until its first batch is applied
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            try:
                assert proc.stdout is not None
                first = proc.stdout.readline()
                assert first.startswith("applied ") and "through position" in first, first
                assert proc.poll() is None  # still following
            finally:
                proc.kill()
                proc.communicate(timeout=30)
            continue
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, (argv, res.stdout[-2000:], res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (argv, res.stderr)
    assert (tmp_path / "reports" / "forecast.png").exists()
    assert (tmp_path / "month-reports" / "tiers.png").exists()
