"""Issue #6: the engine under concurrency (a burst cannot slip past velocity or
interval rules, across two servers on one database), and its fallback when
evaluation fails (never a blind approval; counted in metrics)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import common_pb2, transaction_pb2, transaction_pb2_grpc
from fuelcard_server.settings import Settings
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.plugins.server import RunningServer, ServerThread, make_settings, same_keys
from tests.support import builders
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok
from tests.support.risk_helpers import fired, load_rules, rule

BURST = 24


@pytest.fixture
def server_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, risk_fault_injection=True)


@pytest.fixture
def second_server(server: RunningServer, tmp_path: Path) -> Iterator[grpc.Channel]:
    """Another server on the same database: its own pool and loop, as a
    second worker process would have."""
    thread = ServerThread(make_settings(tmp_path / "second", **same_keys(server.settings)),
                          server.database_url, server.clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        thread.stop()


def _burst(stubs: list[transaction_pb2_grpc.TransactionServiceStub], card: builders.FundedCard,
           amount_fen: int) -> list[transaction_pb2.AuthorizeResponse]:
    start = threading.Barrier(BURST)

    def one(i: int) -> transaction_pb2.AuthorizeResponse:
        req = builders.authorize_request(card, amount_fen, terminal=f"KM-001-T{i % 4}")
        start.wait()
        response: transaction_pb2.AuthorizeResponse = stubs[i % len(stubs)].Authorize(req)
        return response

    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(one, range(BURST)))


def test_burst_cannot_slip_past_a_velocity_rule(server: RunningServer,
                                                second_server: grpc.Channel, db: Conn) -> None:
    load_rules(server, [rule("VEL-3", "velocity", action="decline", min_count=3, window_s=600)])
    card = builders.open_card(server, balance_fen=1_000_000)
    stubs = [server.pos, transaction_pb2_grpc.TransactionServiceStub(second_server)]
    answers = _burst(stubs, card, 1_000)
    ok = [a for a in answers if a.decision == common_pb2.DECISION_APPROVED]
    declined = [a for a in answers if a.decision == common_pb2.DECISION_DECLINED]
    assert len(ok) == 2, [a.decision for a in answers]
    assert len(declined) == BURST - 2
    assert all(a.decline_reason == common_pb2.DECLINE_REASON_RISK_DECLINED
               and fired(a) == ["VEL-3"] for a in declined)
    assert account_row(db, card.account_id)["held_fen"] == 2_000
    state = db.execute("SELECT n_auths, cardinality(auth_times), cardinality(decline_times)"
                       " FROM fc.risk_card_state").fetchone()
    assert state == (2, 2, 16)   # 22 declines, the last 16 kept
    assert_ledger_ok(server.database_url)


def test_burst_cannot_slip_past_a_minimum_interval(server: RunningServer,
                                                   second_server: grpc.Channel, db: Conn) -> None:
    load_rules(server, [rule("INT-60", "min_interval", action="decline", min_interval_s=60)])
    card = builders.open_card(server, balance_fen=1_000_000)
    stubs = [server.pos, transaction_pb2_grpc.TransactionServiceStub(second_server)]
    answers = _burst(stubs, card, 1_000)
    assert sum(a.decision == common_pb2.DECISION_APPROVED for a in answers) == 1
    assert all(fired(a) == ["INT-60"] for a in answers
               if a.decision == common_pb2.DECISION_DECLINED)
    assert account_row(db, card.account_id)["held_fen"] == 1_000
    server.advance(dt.timedelta(seconds=60))
    assert sum(a.decision == common_pb2.DECISION_APPROVED
               for a in _burst(stubs, card, 1_000)) == 1


def _fallbacks(reader: InMemoryMetricReader) -> dict[str, int]:
    out: dict[str, int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            if sm.scope.name != "fuelcard.risk":
                continue
            for m in sm.metrics:
                for p in m.data.data_points:
                    key = m.name + "".join(f"[{v!s}]" for v in (p.attributes or {}).values())
                    out[key] = out.get(key, 0) + int(p.value)  # type: ignore[union-attr]
    return out


@pytest.mark.parametrize(("fallback", "decision", "state"), [
    ("decline", common_pb2.DECISION_DECLINED, None),
    ("review", common_pb2.DECISION_REVIEW, common_pb2.HOLD_STATE_SUSPENDED),
])
def test_engine_fault_applies_the_fallback_never_approves(
        server: RunningServer, db: Conn, metric_reader: InMemoryMetricReader, fallback: str,
        decision: common_pb2.Decision.ValueType, state: common_pb2.HoldState.ValueType | None
) -> None:
    load_rules(server, [rule("AMT", "amount", min_amount_fen=1_000_000),
                        rule("BROKEN", "fault")], fallback=fallback)
    before = _fallbacks(metric_reader)
    card = builders.open_card(server, balance_fen=100_000)
    request = builders.authorize_request(card, 10_000)
    auth = server.pos.Authorize(request)
    assert auth.decision == decision
    assert auth.risk.fallback
    assert list(auth.risk.fired_rules) == ["ENGINE_FAULT"]
    if state is None:
        assert auth.decline_reason == common_pb2.DECLINE_REASON_RISK_DECLINED
        assert not auth.HasField("hold")
        assert account_row(db, card.account_id)["held_fen"] == 0
    else:
        assert auth.hold.state == state
        assert account_row(db, card.account_id)["held_fen"] == 10_000
    after = _fallbacks(metric_reader)
    assert after.get("fuelcard.risk.fallbacks", 0) == before.get("fuelcard.risk.fallbacks", 0) + 1
    key = "fuelcard.risk.decisions[" + ("DECLINE" if state is None else "REVIEW") + "]"
    assert after.get(key, 0) == before.get(key, 0) + 1
    # A replay answers the same without counting again.
    assert server.pos.Authorize(request) == auth
    assert _fallbacks(metric_reader) == after
    assert_ledger_ok(server.database_url)


def test_fault_rules_need_the_test_setting(server: RunningServer) -> None:
    # This module's server allows them; the default refuses them
    # (test_risk_rules.test_invalid_rule_sets_change_nothing).
    assert load_rules(server, [rule("BROKEN", "fault")]).rule_set.rule_count == 1
