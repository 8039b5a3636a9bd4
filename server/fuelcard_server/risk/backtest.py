"""Backtesting: replay stored transactions through a candidate rule set and
count, per rule, what it would have declined or suspended - so a rule's
false-positive cost is known before it goes live.

What is replayed: every hold in fc.holds (each authorization that reserved
money, approved or suspended), in the order they were made, with the card
state rebuilt as fc.risk_note builds it, the stations' coordinates and the
points redemptions from the journal. Authorizations declined at the time
left no hold and are not replayed (so decline_streak rules see no history
here). The member tier is the account's current one.

"Legitimate" = the hold was settled (CONFIRMED) and not rejected by a
reviewer: a sale that went through. The target is that a rule set suspends
or declines under 0.3 % of them.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from fuelcard_server.risk.engine import Authorization, CardState, Engine, Verdict
from fuelcard_server.risk.model import RuleSet
from fuelcard_server.states import HoldState, ReviewState

TARGET_LEGIT_SUSPENDED = 0.003

HOLDS_SQL = """
    SELECT h.id, h.uid::text, h.card_id, h.spender_account_id, s.tier, s.kind, h.amount_fen,
           h.station_id, h.terminal_id, h.created_at, h.state, h.review_state
      FROM fc.holds h JOIN fc.accounts s ON s.id = h.spender_account_id
     WHERE h.created_at >= %s AND h.created_at < %s
     ORDER BY h.created_at, h.id"""
STATIONS_SQL = "SELECT station_id, latitude, longitude FROM fc.stations"
REDEMPTIONS_SQL = ("SELECT debit_account_id, created_at, amount FROM fc.journal"
                   " WHERE kind = fc.ledger_entry_kind_points_redeemed()")
TZ_SQL = "SELECT fc.business_tz()"


@dataclass
class RuleStats:
    fired: int = 0
    declined: int = 0      # fired on a transaction the set would decline
    suspended: int = 0     # ... would suspend
    legit_hit: int = 0     # fired on a legitimate transaction declined or suspended


@dataclass
class Replayed:
    hold_uid: str
    legitimate: bool
    verdict: Verdict


@dataclass
class Report:
    transactions: int = 0
    legitimate: int = 0
    declined: int = 0
    suspended: int = 0
    legit_declined: int = 0
    legit_suspended: int = 0
    per_rule: dict[str, RuleStats] = field(default_factory=dict)
    replayed: list[Replayed] = field(default_factory=list)

    @property
    def legit_suspended_share(self) -> float:
        return self.legit_suspended / self.legitimate if self.legitimate else 0.0

    @property
    def legit_declined_share(self) -> float:
        return self.legit_declined / self.legitimate if self.legitimate else 0.0

    def lines(self) -> list[str]:
        out = [f"{'rule':<28} {'fired':>8} {'declined':>9} {'suspended':>10} {'legit hit':>10}"]
        for rule_id, s in self.per_rule.items():
            out.append(f"{rule_id:<28} {s.fired:>8} {s.declined:>9} {s.suspended:>10}"
                       f" {s.legit_hit:>10}")
        ok = "meets" if self.legit_suspended_share < TARGET_LEGIT_SUSPENDED else "MISSES"
        out += [
            "",
            f"transactions replayed: {self.transactions}  (legitimate: {self.legitimate})",
            f"would decline: {self.declined}   would suspend: {self.suspended}",
            f"legitimate suspended: {self.legit_suspended} ({self.legit_suspended_share:.3%});"
            f" legitimate declined: {self.legit_declined} ({self.legit_declined_share:.3%})",
            f"target: under {TARGET_LEGIT_SUSPENDED:.1%} of legitimate transactions suspended:"
            f" {ok}",
        ]
        return out


def replay(rows: list[tuple[Any, ...]], engine: Engine, keep: bool = False) -> Report:
    report = Report(per_rule={r.rule_id: RuleStats() for r in engine.rule_set.rules})
    states: dict[int, CardState] = defaultdict(CardState)
    for (_, uid, card_id, spender_id, tier, kind, amount, station, terminal, created_at,
         state, review_state) in rows:
        a = Authorization(card_id, spender_id, tier, kind, amount, station, terminal, created_at)
        st = states[card_id]
        verdict = engine.assess(st, a)
        engine.note(st, a, held=True)  # it did happen: the state follows history
        legit = state == HoldState.CONFIRMED and review_state != ReviewState.REJECTED
        report.transactions += 1
        report.legitimate += legit
        report.declined += verdict.decision == "DECLINE"
        report.suspended += verdict.decision == "REVIEW"
        hit = verdict.decision != "APPROVE"
        report.legit_declined += legit and verdict.decision == "DECLINE"
        report.legit_suspended += legit and verdict.decision == "REVIEW"
        for rule_id in verdict.rules:
            s = report.per_rule.setdefault(rule_id, RuleStats())
            s.fired += 1
            s.declined += verdict.decision == "DECLINE"
            s.suspended += verdict.decision == "REVIEW"
            s.legit_hit += legit and hit
        if keep:
            report.replayed.append(Replayed(uid, legit, verdict))
    return report


def run(url: str, rule_set: RuleSet, *, since: dt.datetime | None = None,
        until: dt.datetime | None = None, keep: bool = False) -> Report:
    """Backtest `rule_set` against the transactions stored in `url`."""
    since = since or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    until = until or dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
    with psycopg.connect(url) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = conn.execute(TZ_SQL).fetchone()
        tz = ZoneInfo(row[0] if row else "Asia/Shanghai")
        stations = {s: (lat, lon) for s, lat, lon in conn.execute(STATIONS_SQL)}
        redemptions: dict[int, list[tuple[dt.datetime, int]]] = defaultdict(list)
        if rule_set.has_points:
            for account_id, at, points in conn.execute(REDEMPTIONS_SQL):
                redemptions[account_id].append((at, points))
        rows = conn.execute(HOLDS_SQL, (since, until)).fetchall()
    engine = Engine(rule_set, stations, tz, redemptions)
    return replay(rows, engine, keep)
