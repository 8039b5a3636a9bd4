"""Issue #6: the two evaluators agree - fc.authorize's (SQL, live) and
fuelcard_server.risk.engine's (Python, backtests) - on random rule sets and
random sequences of authorizations, declines included. Called at the
database function the server calls (fc.authorize), many examples fast."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from fuelcard_server.locks import RISK_RULES_LOCK
from fuelcard_server.risk.engine import Authorization, CardState, Engine
from fuelcard_server.risk.model import FALLBACKS, RuleSet, parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STATIONS = {"S-A": (25.04, 102.71), "S-B": (25.20, 102.90), "S-C": (39.90, 116.40)}
START = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)
AUTHORIZE_SQL = (
    "SELECT fc.authorize(p_caller => 't', p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_pan_index => %(pan_index)s,"
    " p_amount_fen => %(amount_fen)s::bigint, p_station_id => %(station_id)s,"
    " p_terminal_id => %(terminal_id)s, p_nozzle => 1, p_product => 1::smallint,"
    " p_now => %(now)s::timestamptz, p_ttl => interval '30 minutes', p_counter => NULL::bigint,"
    " p_pin_ok => NULL::boolean)")
LOAD_SQL = (
    "SELECT fc.risk_load(p_caller => 't', p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_lock => %(lock)s, p_actor => 't', p_name => %(name)s,"
    " p_document => %(document)s::jsonb, p_digest => %(digest)s,"
    " p_fallback => %(fallback)s::smallint, p_review_score => %(review_score)s,"
    " p_decline_score => %(decline_score)s, p_windows => %(windows)s::integer[],"
    " p_has_points => %(has_points)s, p_rules => %(rules)s::jsonb, p_now => %(now)s::timestamptz)")

windows = st.sampled_from([30, 120, 600, 3600, 86400])
rule_params: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "amount": st.fixed_dictionaries({"min_amount_fen": st.integers(1_000, 60_000)}),
    "daily_amount": st.fixed_dictionaries({"min_total_fen": st.integers(10_000, 200_000)}),
    "weekly_amount": st.fixed_dictionaries({"min_total_fen": st.integers(20_000, 400_000)}),
    "velocity": st.fixed_dictionaries({"min_count": st.integers(2, 5), "window_s": windows}),
    "min_interval": st.fixed_dictionaries({"min_interval_s": st.sampled_from([5, 20, 40, 200, 1800])}),
    "impossible_travel": st.fixed_dictionaries({
        "max_speed_kmh": st.floats(20, 900), "min_distance_km": st.floats(0, 50)}),
    "new_terminal": st.fixed_dictionaries({"min_prior_uses": st.integers(0, 4)}),
    "watchlist": st.fixed_dictionaries({"terminals": st.just(["T3"])}),
    "decline_streak": st.fixed_dictionaries({"min_declines": st.integers(1, 3),
                                             "window_s": windows}),
    "night_amount": st.fixed_dictionaries({
        "min_amount_fen": st.integers(1_000, 30_000),
        "from": st.sampled_from(["00:00", "22:00", "16:30"]),
        "to": st.sampled_from(["05:00", "18:00"])}),
}
a_rule = st.sampled_from(sorted(rule_params)).flatmap(
    lambda kind: st.tuples(st.just(kind), rule_params[kind],
                           st.sampled_from(["score", "review", "decline"]), st.integers(0, 60)))
a_step = st.tuples(st.sampled_from([0, 0, 5, 20, 40, 100, 200, 1800, 7200, 30000, 90000]),  # s later
                   st.integers(1_000, 60_000), st.sampled_from(sorted(STATIONS)),
                   st.sampled_from(["T1", "T2", "T3"]), st.integers(0, 1))      # card 0 or 1


def _rule_set(rules: list[tuple[str, dict[str, Any], str, int]]) -> RuleSet:
    return parse({"name": "h", "fallback": "review", "review_score": 60, "decline_score": 100,
                  "rules": [{"id": f"R{i}", "kind": k, "action": a, "score": s, **p}
                            for i, (k, p, a, s) in enumerate(rules)]})


def _card(conn: psycopg.Connection[Any]) -> tuple[int, int, bytes]:
    row = conn.execute("INSERT INTO fc.accounts (kind, balance_fen, created_at)"
                       " VALUES (1, 100000000, now()) RETURNING id").fetchone()
    assert row is not None
    pan = uuid.uuid4().bytes
    card = conn.execute("INSERT INTO fc.cards (account_id, pan_index, masked, created_at)"
                        " VALUES (%s, %s, '****', now()) RETURNING id", (row[0], pan)).fetchone()
    assert card is not None
    return card[0], row[0], pan


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=st.lists(a_rule, min_size=3, max_size=12),
       steps=st.lists(a_step, min_size=5, max_size=30))
def test_sql_and_python_evaluators_agree(database_url: str,
                                         rules: list[tuple[str, dict[str, Any], str, int]],
                                         steps: list[tuple[int, int, str, str, int]]) -> None:
    rs = _rule_set(rules)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for sid, (lat, lon) in STATIONS.items():
            conn.execute("INSERT INTO fc.stations VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (sid, sid, lat, lon))
        conn.execute(LOAD_SQL, {
            "request_id": uuid.uuid4().hex, "request_hash": b"h", "lock": RISK_RULES_LOCK,
            "name": rs.name, "document": json.dumps(rs.to_document()), "digest": rs.digest(),
            "fallback": FALLBACKS[rs.fallback], "review_score": rs.review_score,
            "decline_score": rs.decline_score, "windows": rs.windows, "has_points": rs.has_points,
            "rules": json.dumps(rs.rows()), "now": START})
        cards = [_card(conn), _card(conn)]
        engine = Engine(rs, STATIONS, ZoneInfo("Asia/Shanghai"))
        states = [CardState(), CardState()]
        now = START
        for seconds, amount, sid, terminal, which in steps:
            now += dt.timedelta(seconds=seconds)
            card_id, account_id, pan = cards[which]
            request_id = uuid.uuid4().hex
            row = conn.execute(AUTHORIZE_SQL, {
                "request_id": request_id, "request_hash": hashlib.sha256(pan).digest(),
                "pan_index": pan, "amount_fen": amount, "station_id": sid,
                "terminal_id": f"{sid}-{terminal}", "now": now}).fetchone()
            assert row is not None
            sql = row[0]["risk"]
            a = Authorization(card_id, account_id, 1, 1, amount, sid, f"{sid}-{terminal}", now)
            expected = engine.assess(states[which], a)
            engine.note(states[which], a, held=expected.decision != "DECLINE")
            assert (sql["decision"], tuple(sql["rules"]), sql["score"]) == (
                expected.decision, expected.rules, expected.score), (rs, steps)
