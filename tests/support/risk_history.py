"""A generated transaction history for backtests: ordinary drivers and fleets
around Kunming buying fuel for four weeks, plus a few fraudulent cards (a
cloned card drained in bursts, a card used in Kunming and Beijing an hour
apart, large purchases at night, a skimmed terminal), made through the API
with the ManualClock moved to each event.

Legitimate fills are confirmed (after a reviewer's approval if the engine
suspended them); fraudulent ones are cancelled, so "legitimate" in the
backtest (a settled sale) means exactly the generated legitimate ones."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

from fuelcard.v1 import account_pb2, common_pb2, risk_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support.risk_helpers import authorize, risk, station

# (id, latitude, longitude): stations around Kunming, and far away.
LOCAL_STATIONS = [(f"KM-{i:03d}", 24.90 + 0.03 * (i % 7), 102.60 + 0.04 * (i // 7))
                  for i in range(1, 15)]
FAR_STATIONS = [("BJ-001", 39.90, 116.40), ("SH-001", 31.23, 121.47)]
SKIMMED_TERMINAL = "WATCH-TERMINAL-0001"


@dataclass(order=True)
class Event:
    at: dt.datetime
    seq: int
    card: builders.FundedCard = field(compare=False)
    amount_fen: int = field(compare=False)
    station: str = field(compare=False)
    terminal: str = field(compare=False)
    fraud: bool = field(compare=False)


@dataclass
class History:
    legitimate: int = 0
    fraudulent: int = 0
    fraud_holds: set[str] = field(default_factory=set)
    legit_holds: set[str] = field(default_factory=set)


def _local_day_time(start: dt.datetime, day: int, rng: random.Random) -> dt.datetime:
    # 07:00-21:59 in Asia/Shanghai (UTC+8) = 23:00-13:59 UTC of the day before/of
    minutes = rng.randrange(7 * 60, 22 * 60)
    local_midnight = (start + dt.timedelta(hours=8)).replace(hour=0, minute=0, second=0,
                                                             microsecond=0)
    return (local_midnight + dt.timedelta(days=day, minutes=minutes, seconds=rng.randrange(60))
            - dt.timedelta(hours=8))


def generate(server: RunningServer, *, cards: int = 40, days: int = 28,
             seed: int = 6) -> History:
    rng = random.Random(seed)
    for sid, lat, lon in LOCAL_STATIONS + FAR_STATIONS:
        station(server, sid, lat, lon)
    start = server.clock.now() + dt.timedelta(days=1)
    events: list[Event] = []
    seq = 0

    def add(at: dt.datetime, card: builders.FundedCard, amount: int, sid: str, terminal: str,
            fraud: bool) -> None:
        nonlocal seq
        seq += 1
        events.append(Event(at, seq, card, amount, sid, terminal, fraud))

    for i in range(cards):
        corporate = i % 7 == 0
        card = builders.open_card(
            server, balance_fen=5_000_000 if corporate else 1_000_000,
            account_type=(account_pb2.ACCOUNT_TYPE_CORPORATE if corporate
                          else account_pb2.ACCOUNT_TYPE_FAMILY if i % 5 == 0
                          else account_pb2.ACCOUNT_TYPE_PERSONAL))
        for _ in range(3 if corporate else 0):   # a fleet's month of diesel
            builders.recharge(server, card.account_id, 5_000_000)
        home = rng.sample(LOCAL_STATIONS, 3)
        day = rng.randrange(0, 3)
        while day < days:
            sid = rng.choice(home)[0]
            terminal = f"{sid}-T{rng.randrange(1, 4)}"
            amount = (rng.randrange(150_000, 350_000) if corporate
                      else rng.randrange(20_000, 60_000))
            at = _local_day_time(start, day, rng)
            add(at, card, amount, sid, terminal, False)
            if rng.random() < 0.03:   # topping up a jerrycan a few minutes later
                add(at + dt.timedelta(minutes=rng.randrange(3, 8)), card, 5_000, sid, terminal,
                    False)
            day += rng.randrange(1, 3) if corporate else rng.randrange(2, 6)

    # Fraud: a cloned card drained at several stations within an hour.
    cloned = builders.open_card(server, balance_fen=1_000_000)
    t0 = _local_day_time(start, 10, rng)
    for k in range(6):
        sid = LOCAL_STATIONS[k][0]
        add(t0 + dt.timedelta(minutes=9 * k), cloned, 40_000, sid, f"{sid}-T1", True)
    # Impossible travel: Kunming, then Beijing an hour later.
    traveller = builders.open_card(server, balance_fen=1_000_000)
    t1 = _local_day_time(start, 12, rng)
    add(t1, traveller, 30_000, "KM-001", "KM-001-T1", False)
    add(t1 + dt.timedelta(hours=1), traveller, 45_000, "BJ-001", "BJ-001-T1", True)
    # Large amounts at night on a stolen personal card.
    night = builders.open_card(server, balance_fen=2_000_000)
    local_midnight = (start + dt.timedelta(hours=8)).replace(hour=0, minute=0, second=0,
                                                             microsecond=0)
    for k in range(2):
        at = local_midnight + dt.timedelta(days=15 + k, hours=2) - dt.timedelta(hours=8)
        add(at, night, 550_000, "KM-002", "KM-002-T1", True)
    # A skimmed terminal.
    victim = builders.open_card(server, balance_fen=1_000_000)
    add(_local_day_time(start, 20, rng), victim, 30_000, "KM-003", SKIMMED_TERMINAL, True)

    history = History()
    for e in sorted(events):
        if e.at > server.clock.now():
            server.advance(e.at - server.clock.now())
        auth = authorize(server, e.card, e.amount_fen, e.station, e.terminal)
        assert auth.decision in (common_pb2.DECISION_APPROVED, common_pb2.DECISION_REVIEW), auth
        hold_id = auth.hold.hold_id
        if e.fraud:
            builders.cancel(server, hold_id)
            history.fraudulent += 1
            history.fraud_holds.add(hold_id)
            continue
        if auth.decision == common_pb2.DECISION_REVIEW:
            risk(server).ReviewHold(risk_pb2.ReviewHoldRequest(
                request_id=builders.rid("rv"), hold_id=hold_id,
                verdict=risk_pb2.REVIEW_VERDICT_APPROVE))
        builders.confirm(server, hold_id, e.amount_fen)
        history.legitimate += 1
        history.legit_holds.add(hold_id)
    return history
