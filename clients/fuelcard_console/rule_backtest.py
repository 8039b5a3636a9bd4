"""The backtest report of the risk officer's page: the server's own backtest
(fuelcard_server.risk.backtest, what `fuelcard risk backtest` runs), over a
bounded slice of recent history read from the reports database.

Bounded both ways, so that a page answers on a year of sales: the last `days`
days, and of those at most the `max_holds` most recent holds. The card state
the rules see is rebuilt from the replayed holds only (as the CLI rebuilds it
from the holds it replays), so rules about a card's past see no history from
before the slice: the report says where the slice starts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from fuelcard_server.db import Database
from fuelcard_server.risk import backtest
from fuelcard_server.risk.engine import Engine
from fuelcard_server.risk.model import MAX_WINDOW_S, RuleSet

DEFAULT_DAYS = 7
MAX_DAYS = 90
DEFAULT_HOLDS = 2_000
MAX_HOLDS = 50_000

# backtest.HOLDS_SQL's columns, newest `limit` of the window (holds_created_brin finds the
# window), then put back in the order they were made.
HOLDS_SQL = """
    SELECT * FROM (
        SELECT h.id, h.uid::text, h.card_id, h.spender_account_id, s.tier, s.kind, h.amount_fen,
               h.station_id, h.terminal_id, h.created_at, h.state, h.review_state
          FROM fc.holds h JOIN fc.accounts s ON s.id = h.spender_account_id
         WHERE h.created_at >= %(since)s AND h.created_at < %(until)s
         ORDER BY h.created_at DESC, h.id DESC
         LIMIT %(limit)s) recent
     ORDER BY created_at, id"""
STATIONS_SQL = "SELECT station_id, latitude, longitude FROM fc.stations"
# points redemptions within the longest window a rule may look back over, before the slice
REDEMPTIONS_SQL = ("SELECT debit_account_id, created_at, amount FROM fc.journal"
                   " WHERE kind = fc.ledger_entry_kind_points_redeemed()"
                   " AND created_at >= %(since)s AND created_at < %(until)s")
TZ_SQL = "SELECT fc.business_tz()"


@dataclass(frozen=True)
class Bounds:
    days: int = DEFAULT_DAYS
    max_holds: int = DEFAULT_HOLDS

    @classmethod
    def parse(cls, days: str | None, max_holds: str | None) -> Bounds:
        """From the page's query; out-of-range or unreadable values are clamped or defaulted
        (a report, not a form: it always answers)."""
        def number(text: str | None, default: int, hi: int) -> int:
            try:
                value = int(text) if text else default
            except ValueError:
                value = default
            return min(max(value, 1), hi)
        return cls(number(days, DEFAULT_DAYS, MAX_DAYS), number(max_holds, DEFAULT_HOLDS, MAX_HOLDS))


@dataclass(frozen=True)
class BacktestResult:
    report: backtest.Report
    since: dt.datetime
    until: dt.datetime
    bounds: Bounds
    # True when the window held more holds than max_holds: the oldest were left out
    truncated: bool
    first_replayed: dt.datetime | None

    @property
    def meets_target(self) -> bool:
        return self.report.legit_suspended_share < backtest.TARGET_LEGIT_SUSPENDED


async def run(reports: Database, rule_set: RuleSet, now: dt.datetime, bounds: Bounds,
              replay_in: Executor | None = None) -> BacktestResult:
    """Replay the slice of history through `rule_set`, in `replay_in` (the page's: a worker
    process, see backtest_jobs; None: a thread of the event loop's default executor)."""
    since, until = now - dt.timedelta(days=bounds.days), now
    row = await reports.fetch_one(TZ_SQL, {})
    tz = ZoneInfo(row[0] if row else "Asia/Shanghai")
    stations = {s: (lat, lon) for s, lat, lon in await reports.fetch_all(STATIONS_SQL, {})}
    redemptions: dict[int, list[tuple[dt.datetime, int]]] = defaultdict(list)
    if rule_set.has_points:
        for account_id, at, points in await reports.fetch_all(REDEMPTIONS_SQL, {
                "since": since - dt.timedelta(seconds=MAX_WINDOW_S), "until": until}):
            redemptions[account_id].append((at, points))
    rows: list[tuple[Any, ...]] = await reports.fetch_all(
        HOLDS_SQL, {"since": since, "until": until, "limit": bounds.max_holds + 1})
    truncated = len(rows) > bounds.max_holds
    if truncated:
        rows = rows[1:]  # the oldest one, beyond the bound
    engine = Engine(rule_set, stations, tz, redemptions)
    # the replay is plain Python over up to MAX_HOLDS rows: off the event loop
    report = await asyncio.get_running_loop().run_in_executor(replay_in, backtest.replay, rows, engine)
    return BacktestResult(report, since, until, bounds, truncated, rows[0][9] if rows else None)
