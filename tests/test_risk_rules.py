"""Issue #6: every rule kind of the risk engine, through gRPC - a rule set is
loaded with RiskService.LoadRuleSet, then Authorize says what fired."""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

import grpc
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    points_pb2,
    points_pb2_grpc,
    risk_pb2,
)

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, expect, scalar, snapshot
from tests.support.risk_helpers import approved, authorize, fired, load_rules, risk, rule, station

SEC = dt.timedelta(seconds=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
NIGHT: dict[str, Any] = {"from": "23:00", "to": "05:00"}
BAD_NIGHT: dict[str, Any] = {"from": "25:00", "to": "05:00"}


def test_without_a_rule_set_nothing_is_scored(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    auth = authorize(server, card, 40_000)
    assert approved(auth)
    assert not auth.HasField("risk")


def test_amount_threshold_suspends_with_rules_and_score(server: RunningServer, db: Conn) -> None:
    load_rules(server, [rule("AMT-1000", "amount", min_amount_fen=100_000, score=70)])
    card = builders.open_card(server, balance_fen=500_000)
    below = authorize(server, card, 99_999)
    assert approved(below)
    assert below.risk.decision == risk_pb2.RISK_DECISION_APPROVE
    assert (below.risk.score, fired(below)) == (0, [])
    assert below.risk.rule_set_version >= 1

    at = authorize(server, card, 100_000)
    assert at.decision == common_pb2.DECISION_REVIEW
    assert at.hold.state == common_pb2.HOLD_STATE_SUSPENDED
    assert at.risk.decision == risk_pb2.RISK_DECISION_REVIEW
    assert (at.risk.score, fired(at), at.risk.fallback) == (70, ["AMT-1000"], False)
    # The money of the suspended hold is reserved.
    assert account_row(db, card.account_id)["held_fen"] == 199_999
    assert at.available_fen == 500_000 - 199_999
    assert_ledger_ok(server.database_url)


def test_tier_and_account_type_scopes(server: RunningServer) -> None:
    load_rules(server, [
        rule("AMT-CORP", "amount", action="decline", min_amount_fen=10_000,
             account_types=["corporate"]),
        rule("AMT-GOLD", "amount", action="decline", min_amount_fen=10_000, tiers=[3, 4]),
    ])
    personal = builders.open_card(server, balance_fen=100_000)
    corporate = builders.open_card(server, balance_fen=100_000,
                                   account_type=account_pb2.ACCOUNT_TYPE_CORPORATE)
    assert approved(authorize(server, personal, 20_000))  # tier 1, personal: neither applies
    declined = authorize(server, corporate, 20_000)
    assert declined.decision == common_pb2.DECISION_DECLINED
    assert declined.decline_reason == common_pb2.DECLINE_REASON_RISK_DECLINED
    assert fired(declined) == ["AMT-CORP"]
    assert not declined.HasField("hold")


def test_daily_cumulative_amount(server: RunningServer) -> None:
    load_rules(server, [rule("DAY-500", "daily_amount", action="decline", min_total_fen=50_000)])
    card = builders.open_card(server, balance_fen=500_000)
    assert approved(authorize(server, card, 30_000))
    assert approved(authorize(server, card, 19_999))           # 49 999 today
    over = authorize(server, card, 1)                          # 50 000
    assert over.decline_reason == common_pb2.DECLINE_REASON_RISK_DECLINED
    assert fired(over) == ["DAY-500"]
    server.advance(DAY)                                        # a new local day
    assert approved(authorize(server, card, 30_000))


def test_weekly_cumulative_amount(server: RunningServer) -> None:
    load_rules(server, [rule("WEEK-1000", "weekly_amount", action="decline",
                             min_total_fen=100_000)])
    card = builders.open_card(server, balance_fen=1_000_000)
    assert approved(authorize(server, card, 40_000))           # day 0
    server.advance(3 * DAY)
    assert approved(authorize(server, card, 40_000))           # day 3
    server.advance(3 * DAY)
    assert approved(authorize(server, card, 19_999))           # day 6: 99 999 in 7 days
    assert fired(authorize(server, card, 1)) == ["WEEK-1000"]  # 100 000
    server.advance(DAY)                                        # day 7: day 0 left the week
    assert approved(authorize(server, card, 40_000))           # 40 000 + 19 999 + 40 000


def test_velocity_count_per_window(server: RunningServer) -> None:
    load_rules(server, [rule("VEL-3-10MIN", "velocity", action="decline", min_count=3,
                             window_s=600)])
    card = builders.open_card(server, balance_fen=500_000)
    assert approved(authorize(server, card, 1_000))
    server.advance(100 * SEC)
    assert approved(authorize(server, card, 1_000))
    third = authorize(server, card, 1_000)
    assert third.decline_reason == common_pb2.DECLINE_REASON_RISK_DECLINED
    assert fired(third) == ["VEL-3-10MIN"]
    server.advance(501 * SEC)   # the first left the window; the declined one never counted
    assert approved(authorize(server, card, 1_000))


def test_minimum_interval_between_authorizations(server: RunningServer) -> None:
    load_rules(server, [rule("INT-60S", "min_interval", action="decline", min_interval_s=60)])
    card = builders.open_card(server, balance_fen=500_000)
    assert approved(authorize(server, card, 1_000))
    server.advance(59 * SEC)
    too_soon = authorize(server, card, 1_000)
    assert fired(too_soon) == ["INT-60S"]
    assert too_soon.decision == common_pb2.DECISION_DECLINED
    server.advance(SEC)         # 60 s after the last approved one
    assert approved(authorize(server, card, 1_000))


def test_impossible_travel(server: RunningServer) -> None:
    station(server, "KM-001", 25.04, 102.71)        # Kunming
    station(server, "BJ-001", 39.90, 116.40)        # Beijing, ~2 100 km away
    station(server, "KM-002", 25.10, 102.80)        # ~11 km from KM-001
    load_rules(server, [rule("TRAVEL", "impossible_travel", max_speed_kmh=500,
                             min_distance_km=50)])
    card = builders.open_card(server, balance_fen=500_000)
    assert approved(authorize(server, card, 1_000, "KM-001", "KM-001-T1"))
    server.advance(HOUR)
    assert approved(authorize(server, card, 1_000, "KM-002", "KM-002-T1"))  # near: fine
    server.advance(HOUR)
    flew = authorize(server, card, 1_000, "BJ-001", "BJ-001-T1")            # 2 100 km in 1 h
    assert flew.decision == common_pb2.DECISION_REVIEW
    assert fired(flew) == ["TRAVEL"]
    server.advance(6 * HOUR)
    assert approved(authorize(server, card, 1_000, "BJ-001", "BJ-001-T1"))  # same place
    server.advance(5 * HOUR)
    # 2 100 km in 5 h is 420 km/h: under the rule's 500.
    assert approved(authorize(server, card, 1_000, "KM-001", "KM-001-T1"))
    # A station without coordinates tells nothing about distance.
    server.advance(HOUR)
    assert approved(authorize(server, card, 1_000, "XX-404", "XX-404-T1"))


def test_first_use_at_a_new_terminal(server: RunningServer) -> None:
    load_rules(server, [rule("NEW-TERM", "new_terminal", min_prior_uses=2)])
    card = builders.open_card(server, balance_fen=500_000)
    # A new card: every terminal is new, but it has no history to differ from.
    assert approved(authorize(server, card, 1_000, terminal="KM-001-T1"))
    server.advance(HOUR)
    assert approved(authorize(server, card, 1_000, terminal="KM-001-T2"))
    server.advance(HOUR)
    assert approved(authorize(server, card, 1_000, terminal="KM-001-T1"))  # known
    server.advance(HOUR)
    new = authorize(server, card, 1_000, terminal="KM-001-T7")
    assert (new.decision, fired(new)) == (common_pb2.DECISION_REVIEW, ["NEW-TERM"])
    server.advance(HOUR)
    # Suspended holds count as uses: T7 is known now.
    assert approved(authorize(server, card, 1_000, terminal="KM-001-T7"))


def test_watch_lists(server: RunningServer) -> None:
    load_rules(server, [
        rule("WATCH-ST", "watchlist", stations=["KM-666"]),
        rule("WATCH-T", "watchlist", action="decline", terminals=["KM-001-T9"]),
    ])
    card = builders.open_card(server, balance_fen=500_000)
    assert approved(authorize(server, card, 1_000, "KM-001", "KM-001-T1"))
    at_station = authorize(server, card, 1_000, "KM-666", "KM-666-T1")
    assert (at_station.decision, fired(at_station)) == (common_pb2.DECISION_REVIEW, ["WATCH-ST"])
    at_terminal = authorize(server, card, 1_000, "KM-001", "KM-001-T9")
    assert at_terminal.decline_reason == common_pb2.DECLINE_REASON_RISK_DECLINED
    assert fired(at_terminal) == ["WATCH-T"]


def test_repeated_declines_card_testing(server: RunningServer) -> None:
    load_rules(server, [rule("DECL-2", "decline_streak", min_declines=2, window_s=600)])
    card = builders.open_card(server, balance_fen=1_000)
    assert approved(authorize(server, card, 100))
    for _ in range(2):   # someone probing the balance
        poor = authorize(server, card, 5_000)
        assert poor.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
        assert not poor.HasField("risk")   # a business decline comes first
    after = authorize(server, card, 100)
    assert (after.decision, fired(after)) == (common_pb2.DECISION_REVIEW, ["DECL-2"])
    server.advance(601 * SEC)
    assert approved(authorize(server, card, 100))


def test_large_amount_at_night(server: RunningServer) -> None:
    load_rules(server, [rule("NIGHT", "night_amount", min_amount_fen=50_000, **NIGHT)])
    card = builders.open_card(server, balance_fen=1_000_000)
    # The clock starts at 08:00 UTC = 16:00 in Asia/Shanghai.
    assert approved(authorize(server, card, 60_000))
    server.advance(10 * HOUR)                                   # 02:00 local
    night = authorize(server, card, 60_000)
    assert (night.decision, fired(night)) == (common_pb2.DECISION_REVIEW, ["NIGHT"])
    assert approved(authorize(server, card, 49_999))
    server.advance(3 * HOUR)                                    # 05:00 local: day again
    assert approved(authorize(server, card, 60_000))
    server.advance(18 * HOUR)                                   # 23:00 local
    assert fired(authorize(server, card, 60_000)) == ["NIGHT"]


def test_points_redemption_spike(server: RunningServer) -> None:
    load_rules(server, [rule("POINTS", "points_redemption", min_points=150, window_s=3600)])
    card = builders.open_card(server, balance_fen=1_000_000)
    hold = authorize(server, card, 30_000).hold
    builders.confirm(server, hold.hold_id, 30_000)             # earns 300 points
    server.advance(HOUR)
    points_pb2_grpc.PointsServiceStub(server.channel).RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid("redeem"), account_id=card.account_id, points=100,
        description="mall"))
    assert approved(authorize(server, card, 1_000))             # 100 redeemed: under 150
    server.advance(10 * SEC)
    points_pb2_grpc.PointsServiceStub(server.channel).RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid("redeem"), account_id=card.account_id, points=60,
        description="mall"))
    spike = authorize(server, card, 1_000)                     # 160 in the last hour
    assert (spike.decision, fired(spike)) == (common_pb2.DECISION_REVIEW, ["POINTS"])
    server.advance(HOUR)
    assert approved(authorize(server, card, 1_000))


def test_scores_add_up_to_the_review_and_decline_thresholds(server: RunningServer) -> None:
    load_rules(server, [
        rule("A", "amount", action="score", score=30, min_amount_fen=10_000),
        rule("B", "amount", action="score", score=30, min_amount_fen=20_000),
        rule("C", "amount", action="score", score=40, min_amount_fen=30_000),
    ], review_score=60, decline_score=100)
    card = builders.open_card(server, balance_fen=500_000)
    one = authorize(server, card, 10_000)
    assert (one.decision, one.risk.score, fired(one)) == (common_pb2.DECISION_APPROVED, 30, ["A"])
    two = authorize(server, card, 20_000)
    assert (two.decision, two.risk.score) == (common_pb2.DECISION_REVIEW, 60)
    three = authorize(server, card, 30_000)
    assert (three.decision, three.risk.score, fired(three)) == (
        common_pb2.DECISION_DECLINED, 100, ["A", "B", "C"])


def test_rule_changes_take_effect_at_once_and_are_recorded(server: RunningServer,
                                                           db: Conn) -> None:
    card = builders.open_card(server, balance_fen=500_000)
    first = load_rules(server, [rule("AMT", "amount", min_amount_fen=50_000)], name="v1")
    assert list(first.changes.added) == ["AMT"]
    assert fired(authorize(server, card, 50_000)) == ["AMT"]
    second = load_rules(server, [rule("AMT", "amount", min_amount_fen=60_000),
                                 rule("WATCH", "watchlist", stations=["X"])], name="v2")
    assert second.rule_set.version == first.rule_set.version + 1
    assert (list(second.changes.added), list(second.changes.changed),
            list(second.changes.removed)) == (["WATCH"], ["AMT"], [])
    server.advance(HOUR)
    assert fired(authorize(server, card, 50_000)) == []          # no restart needed
    active = risk(server).GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest()).rule_set
    assert (active.version, active.name, active.rule_count, active.active) == (
        second.rule_set.version, "v2", 2, True)
    assert json.loads(active.document_json)["rules"][0]["min_amount_fen"] == 60_000
    # Roll back, then switch the engine off.
    back = risk(server).ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(
        request_id=builders.rid("act"), version=first.rule_set.version))
    assert back.rule_set.version == first.rule_set.version
    assert fired(authorize(server, card, 50_000)) == ["AMT"]
    risk(server).ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=builders.rid("act"),
                                                                 version=0))
    assert not authorize(server, card, 50_000).HasField("risk")
    assert not risk(server).GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest()).HasField(
        "rule_set")
    # Who changed what, when.
    log = db.execute("SELECT action, rule_set_id, previous_id, actor, details, created_at"
                     " FROM fc.risk_rule_changes ORDER BY id").fetchall()
    assert [r[0] for r in log] == ["load", "load", "activate", "deactivate"]
    assert log[1][4] == {"added": ["WATCH"], "removed": [], "changed": ["AMT"]}
    assert log[3][4] == {"added": [], "removed": ["AMT"], "changed": []}
    assert all(r[3] == "development" and r[5] is not None for r in log)
    # Each call is also in the hash-chained audit trail.
    assert scalar(db, "SELECT count(*) FROM fc.audit_log"
                  " WHERE method LIKE '/fuelcard.v1.RiskService/%%'") >= 4
    expect(lambda: risk(server).ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(
        request_id=builders.rid("act"), version=999)), grpc.StatusCode.NOT_FOUND,
        "RULE_SET_NOT_FOUND")


def test_invalid_rule_sets_change_nothing(server: RunningServer, db: Conn) -> None:
    load_rules(server, [rule("AMT", "amount", min_amount_fen=50_000)])
    before = snapshot(db)
    cases = [
        ([rule("X", "teleport")], "RULE_KIND_UNKNOWN", "rules[0].kind"),
        ([rule("X", "fault")], "RULE_KIND_UNKNOWN", "rules[0].kind"),   # tests only
        ([rule("X", "velocity", min_count=3)], "RULE_PARAM_MISSING", "rules[0].window_s"),
        ([rule("X", "velocity", min_count=65, window_s=60)], "RULE_PARAM_INVALID",
         "rules[0].min_count"),
        ([rule("X", "amount", min_amount_fen="lots")], "RULE_PARAM_INVALID",
         "rules[0].min_amount_fen"),
        ([rule("X", "amount", min_amount_fen=1, colour="red")], "RULE_PARAM_UNKNOWN",
         "rules[0].colour"),
        ([rule("X", "night_amount", min_amount_fen=1, **BAD_NIGHT)],
         "RULE_PARAM_INVALID", "rules[0].from"),
        ([rule("X", "amount", min_amount_fen=1), rule("X", "amount", min_amount_fen=2)],
         "RULE_ID_DUPLICATE", "rules[1].id"),
        ([rule("X", "amount", action="shrug", min_amount_fen=1)], "RULE_ACTION_INVALID",
         "rules[0].action"),
        ([rule("X", "watchlist")], "RULE_PARAM_MISSING", "rules[0].stations"),
        ([rule("X", "amount", min_amount_fen=1, tiers=[5])], "RULE_PARAM_INVALID",
         "rules[0].tiers"),
        # PostgreSQL text and jsonb cannot hold NUL (these were INTERNAL)
        ([rule("X", "amount", min_amount_fen=1, description="big\x00")], "RULE_PARAM_INVALID",
         "rules[0].description"),
        ([rule("X", "watchlist", stations=["KM\x00001"])], "RULE_PARAM_INVALID",
         "rules[0].stations"),
    ]
    for rules, reason, field in cases:
        expect(functools.partial(load_rules, server, rules), grpc.StatusCode.INVALID_ARGUMENT,
               reason, field)
    expect(lambda: load_rules(server, [], fallback="approve"), grpc.StatusCode.INVALID_ARGUMENT,
           "RULES_FALLBACK_INVALID", "fallback")
    expect(lambda: load_rules(server, [], name="night\x00"), grpc.StatusCode.INVALID_ARGUMENT,
           "RULES_NAME_INVALID", "name")
    expect(lambda: risk(server).LoadRuleSet(risk_pb2.LoadRuleSetRequest(
        request_id=builders.rid("r"), document='name = "a\\u0000b"',
        format=risk_pb2.RULE_FORMAT_TOML)), grpc.StatusCode.INVALID_ARGUMENT,
        "RULES_NAME_INVALID", "name")
    expect(lambda: risk(server).LoadRuleSet(risk_pb2.LoadRuleSetRequest(
        request_id=builders.rid("r"), document="name = [", format=risk_pb2.RULE_FORMAT_TOML)),
        grpc.StatusCode.INVALID_ARGUMENT, "RULES_UNREADABLE", "document")
    assert snapshot(db) == before
    # A description may run over several lines, as a TOML multi-line string does.
    described = load_rules(server, [rule("X", "amount", min_amount_fen=1,
                                         description="large amounts:\n\tsee the runbook")])
    assert described.rule_set.version > 0
