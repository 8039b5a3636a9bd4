"""Issue #6: backtests on a generated history - the Python evaluator agrees
with the one inside fc.authorize, the default rule set suspends under 0.3 %
of legitimate sales and catches the generated fraud, and the CLI (`fuelcard
risk backtest`, `fuelcard risk load`) does the same from the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fuelcard.v1 import risk_pb2
from fuelcard_server import cli
from fuelcard_server.risk import backtest
from fuelcard_server.risk.model import RuleSet, load_text, parse
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, assert_ledger_ok, scalar, snapshot
from tests.support.risk_helpers import risk
from tests.support.risk_history import generate

DEFAULT = Path(cli.__file__).parent / "risk" / "default_rules.toml"


def _review_only(rs: RuleSet) -> RuleSet:
    """The same rules, suspending where they would decline: every
    authorization then leaves a hold to compare."""
    rules = tuple(dataclasses.replace(r, action="review" if r.action == "decline" else r.action)
                  for r in rs.rules)
    return dataclasses.replace(rs, rules=rules, decline_score=1_000_000)


@pytest.mark.slow
def test_backtest_on_a_generated_history(server: RunningServer, db: Conn,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    default = load_text(DEFAULT.read_text(encoding="utf-8"), "toml")
    assert len(default.rules) >= 25
    live = _review_only(default)
    risk(server).LoadRuleSet(risk_pb2.LoadRuleSetRequest(
        request_id=builders.rid("rules"), document=json.dumps(live.to_document()),
        format=risk_pb2.RULE_FORMAT_JSON))
    history = generate(server)
    assert history.legitimate >= 340

    # 1. The Python evaluator (backtests) and the SQL one (fc.authorize) agree
    #    on every transaction of the history: same rules fired, same decision.
    replayed = backtest.run(server.database_url, live, keep=True)
    in_sql = {uid: (tuple(rules), suspended) for uid, rules, suspended in db.execute(
        "SELECT uid::text, risk_rules, review_state IS NOT NULL FROM fc.holds")}
    assert len(replayed.replayed) == len(in_sql) == history.legitimate + history.fraudulent
    for r in replayed.replayed:
        assert in_sql[r.hold_uid] == (r.verdict.rules, r.verdict.decision == "REVIEW"), r
    assert sum(1 for rules, _ in in_sql.values() if rules) > 10   # rules did fire

    # 2. The default set against the same history.
    report = backtest.run(server.database_url, default, keep=True)
    assert report.legitimate == history.legitimate
    assert report.legit_suspended_share < backtest.TARGET_LEGIT_SUSPENDED
    assert report.legit_declined == 0
    caught = {r.hold_uid for r in report.replayed if r.verdict.decision != "APPROVE"}
    assert len(caught & history.fraud_holds) >= 5
    for rule_id in ("VEL-1H-5", "TRAVEL-IMPOSSIBLE", "NIGHT-VERY-LARGE", "WATCH-TERMINAL",
                    "AMT-VERY-LARGE-PERSONAL"):
        assert report.per_rule[rule_id].fired >= 1, rule_id
    assert report.per_rule["WATCH-STATION"].fired == 0

    # 3. The same from the command line.
    assert cli.main(["risk", "backtest", "--rules", str(DEFAULT),
                     "--database-url", server.database_url]) == 0
    out = capsys.readouterr().out
    assert f"transactions replayed: {report.transactions}" in out
    assert "VEL-1H-5" in out and "meets" in out
    assert_ledger_ok(server.database_url)


def test_every_default_rule_is_documented() -> None:
    table = (Path(cli.__file__).parents[2] / "RISK.md").read_text(encoding="utf-8")
    documented = {line.split("|")[1].strip() for line in table.splitlines()
                  if line.startswith("| ") and line.count("|") == 7}
    default = load_text(DEFAULT.read_text(encoding="utf-8"), "toml")
    assert {r.rule_id for r in default.rules} <= documented
    assert len(default.rules) >= 25


def test_cli_load_validates_then_puts_the_set_in_force(server: RunningServer, db: Conn,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[rules]]\nid = "A"\nkind = "teleport"\n')
    before = snapshot(db)
    assert cli.main(["risk", "load", str(bad), "--database-url", server.database_url]) == 2
    assert "rules[0].kind" in capsys.readouterr().err
    assert snapshot(db) == before
    assert cli.main(["risk", "load", "--database-url", server.database_url]) == 0
    assert "rule set 'default' version 1 in force: 29 rules" in capsys.readouterr().out
    assert scalar(db, "SELECT name FROM fc.risk_rule_sets s JOIN fc.risk_active a"
                  " ON a.rule_set_id = s.id") == "default"
    assert scalar(db, "SELECT count(*) FROM fc.audit_log WHERE method = 'cli/fuelcard risk load'"
                  " AND actor LIKE 'cli:%%'") == 1
    assert scalar(db, "SELECT actor FROM fc.risk_rule_changes") .startswith("cli:")


_params = {
    "amount": st.fixed_dictionaries({"min_amount_fen": st.integers(1, 10**9)}),
    "velocity": st.fixed_dictionaries({"min_count": st.integers(2, 64),
                                       "window_s": st.integers(1, 604_800)}),
    "impossible_travel": st.fixed_dictionaries({"max_speed_kmh": st.floats(1, 2000),
                                                "min_distance_km": st.floats(0, 20000)}),
    "watchlist": st.fixed_dictionaries({"stations": st.lists(st.text("AB-0123", min_size=1,
                                                                     max_size=8), min_size=1)}),
    "night_amount": st.fixed_dictionaries({"min_amount_fen": st.integers(1, 10**9),
                                           "from": st.sampled_from(["00:00", "23:30"]),
                                           "to": st.sampled_from(["05:00", "06:15"])}),
}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(sorted(_params)).flatmap(
    lambda k: st.tuples(st.just(k), _params[k], st.sampled_from(["score", "review", "decline"]),
                        st.integers(0, 100))), max_size=8))
def test_documents_round_trip(rules: list[tuple[str, dict[str, object], str, int]]) -> None:
    doc = {"name": "h", "fallback": "decline", "review_score": 50, "decline_score": 90,
           "rules": [{"id": f"R{i}", "kind": k, "action": a, "score": s, **p}
                     for i, (k, p, a, s) in enumerate(rules)]}
    rs = parse(doc)
    assert parse(json.loads(json.dumps(rs.to_document()))) == rs
    rows = rs.rows()
    assert [r["ord"] for r in rows] == list(range(1, len(rules) + 1))
    assert all(r["widx"] == 0 or rs.windows[r["widx"] - 1] == r["window_s"] for r in rows)
