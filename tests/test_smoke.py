"""The shortest path through the product: a pump cycle end to end."""

from __future__ import annotations

from fuelcard.v1 import common_pb2
from fuelcard_server import verify

from tests.plugins.server import RunningServer
from tests.support import builders


def test_pump_cycle_moves_money_and_points(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    auth = builders.authorize(server, card, 30_000)
    assert auth.decision == common_pb2.DECISION_APPROVED
    assert auth.available_fen == 20_000
    done = builders.confirm(server, auth.hold.hold_id, 25_150)
    assert done.decision == common_pb2.DECISION_APPROVED
    assert done.hold.state == common_pb2.HOLD_STATE_CONFIRMED
    assert done.points_earned == 251
    bal = builders.balance(server, card)
    assert (bal.balance.balance_fen, bal.balance.held_fen, bal.points_balance) == (24_850, 0, 251)
    assert verify.run(server.database_url) == []
