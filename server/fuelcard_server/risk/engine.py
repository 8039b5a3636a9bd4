"""The rule evaluator in Python: the same features and the same decisions as
fc.risk_assess / fc.risk_note (sql/functions/risk.sql), for backtests.

The SQL evaluator scores live authorizations under the account lock; this one
replays history (fuelcard_server.risk.backtest). tests/test_risk_backtest.py
checks that the two agree on the same history.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from fuelcard_server.risk.model import ACCOUNT_TYPES, ACTIONS, Rule, RuleSet
from fuelcard_server.states import RiskDecision

AUTH_TIMES_KEPT = 64
DECLINES_KEPT = 16
DAYS_KEPT = 7
TERMINALS_KEPT = 32
EARTH_RADIUS_M = 6371008.8


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """fc.distance_m: haversine on a sphere."""
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(
        math.sin(math.radians(lat2 - lat1) / 2) ** 2
        + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2))
        * math.sin(math.radians(lon2 - lon1) / 2) ** 2))


def _us(t: dt.datetime) -> int:
    return (t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@dataclass
class CardState:
    """fc.risk_card_state."""

    n_auths: int = 0
    last_at: dt.datetime | None = None
    last_lat: float | None = None
    last_lon: float | None = None
    auth_times: list[dt.datetime] = field(default_factory=list)
    day_list: list[dt.date] = field(default_factory=list)
    day_fens: list[int] = field(default_factory=list)
    terminals: list[str] = field(default_factory=list)
    decline_times: list[dt.datetime] = field(default_factory=list)


@dataclass(frozen=True)
class Authorization:
    """One authorization as the engine sees it."""

    card_id: int
    spender_account_id: int
    tier: int
    account_kind: int  # 1 personal, 2 corporate, 3 family
    amount_fen: int
    station_id: str
    terminal_id: str
    at: dt.datetime


@dataclass(frozen=True)
class Verdict:
    decision: str  # APPROVE | REVIEW | DECLINE
    score: int
    rules: tuple[str, ...]
    fallback: bool = False


@dataclass
class Engine:
    rule_set: RuleSet
    stations: Mapping[str, tuple[float, float]]
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Shanghai"))
    # points redeemed per account: (time, points), any order
    redemptions: Mapping[int, Sequence[tuple[dt.datetime, int]]] = field(default_factory=dict)

    def assess(self, st: CardState, a: Authorization) -> Verdict:
        try:
            return self._assess(st, a)
        except Exception:
            decision = "DECLINE" if self.rule_set.fallback == "decline" else "REVIEW"
            return Verdict(decision, 0, ("ENGINE_FAULT",), fallback=True)

    def _assess(self, st: CardState, a: Authorization) -> Verdict:
        rs = self.rule_set
        local = a.at.astimezone(self.tz)
        day = local.date()
        minute = local.hour * 60 + local.minute
        day_fen = sum(f for d, f in zip(st.day_list, st.day_fens, strict=True) if d == day)
        week_fen = sum(f for d, f in zip(st.day_list, st.day_fens, strict=True)
                       if d > day - dt.timedelta(days=7))
        since_us = _us(a.at) - _us(st.last_at) if st.last_at is not None else None
        dist_m = None
        if st.last_lat is not None and st.last_lon is not None and a.station_id in self.stations:
            lat, lon = self.stations[a.station_id]
            dist_m = distance_m(st.last_lat, st.last_lon, lat, lon)
        new_terminal = a.terminal_id not in st.terminals
        counts, declines, points = {}, {}, {}
        for w in rs.windows:
            since = a.at - dt.timedelta(seconds=w)
            counts[w] = sum(1 for t in st.auth_times if t > since)
            declines[w] = sum(1 for t in st.decline_times if t > since)
            if rs.has_points:
                points[w] = sum(p for t, p in self.redemptions.get(a.spender_account_id, ())
                                if since < t <= a.at)
        fired: list[Rule] = []
        for r in rs.rules:
            if r.tiers is not None and a.tier not in r.tiers:
                continue
            if r.account_types is not None and a.account_kind not in (
                    ACCOUNT_TYPES[t] for t in r.account_types):
                continue
            if self._fires(r, a, st, day_fen, week_fen, since_us, dist_m, new_terminal, minute,
                           counts, declines, points):
                fired.append(r)
        score = sum(r.score for r in fired)
        action = max((ACTIONS[r.action] for r in fired), default=0)
        if action == RiskDecision.DECLINE or score >= rs.decline_score:
            decision = "DECLINE"
        elif action == RiskDecision.REVIEW or score >= rs.review_score:
            decision = "REVIEW"
        else:
            decision = "APPROVE"
        return Verdict(decision, score, tuple(r.rule_id for r in fired))

    @staticmethod
    def _fires(r: Rule, a: Authorization, st: CardState, day_fen: int, week_fen: int,
               since_us: int | None, dist_m: float | None, new_terminal: bool, minute: int,
               counts: Mapping[int, int], declines: Mapping[int, int],
               points: Mapping[int, int]) -> bool:
        match r.kind:
            case "amount":
                return a.amount_fen >= r.threshold
            case "daily_amount":
                return day_fen + a.amount_fen >= r.threshold
            case "weekly_amount":
                return week_fen + a.amount_fen >= r.threshold
            case "velocity":
                return counts[r.window_s] + 1 >= r.threshold
            case "min_interval":
                return since_us is not None and since_us < r.window_s * 1_000_000
            case "impossible_travel":
                if dist_m is None or since_us is None:
                    return False
                speed = float(r.params["max_speed_kmh"])
                return dist_m >= r.threshold and dist_m * 3.6e6 > speed * max(since_us, 1_000_000)
            case "new_terminal":
                return new_terminal and st.n_auths >= r.threshold
            case "watchlist":
                return (a.station_id in r.params.get("stations", ())
                        or a.terminal_id in r.params.get("terminals", ()))
            case "decline_streak":
                return declines[r.window_s] >= r.threshold
            case "night_amount":
                lo, hi = r.minutes()
                inside = lo <= minute < hi if lo <= hi else (minute >= lo or minute < hi)
                return a.amount_fen >= r.threshold and inside
            case "points_redemption":
                return points[r.window_s] >= r.threshold
            case "fault":
                return 1 // r.threshold > 0
        raise AssertionError(f"unknown kind {r.kind}")

    def note(self, st: CardState, a: Authorization, *, held: bool) -> None:
        """fc.risk_note: a hold made (approved or suspended), or a decline."""
        # Kept oldest first, never before the last one (as SQL does).
        if not held:
            at = max(a.at, st.decline_times[-1]) if st.decline_times else a.at
            st.decline_times = [*st.decline_times, at][-DECLINES_KEPT:]
            return
        day = a.at.astimezone(self.tz).date()
        st.n_auths += 1
        st.last_at = a.at
        coords = self.stations.get(a.station_id)
        st.last_lat, st.last_lon = coords if coords is not None else (None, None)
        at = max(a.at, st.auth_times[-1]) if st.auth_times else a.at
        st.auth_times = [*st.auth_times, at][-AUTH_TIMES_KEPT:]
        if st.day_list and st.day_list[0] == day:
            st.day_fens = [st.day_fens[0] + a.amount_fen, *st.day_fens[1:]]
        else:
            st.day_list = [day, *st.day_list][:DAYS_KEPT]
            st.day_fens = [a.amount_fen, *st.day_fens][:DAYS_KEPT]
        st.terminals = [a.terminal_id, *(t for t in st.terminals if t != a.terminal_id)
                        ][:TERMINALS_KEPT]
