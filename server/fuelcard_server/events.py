"""The event stream: the sequencer that gives committed outbox rows their
stream positions, and the translation of fc.events rows into Events.

How events get there and why their order is commit order:
sql/functions/events.sql (its header). Here:

* `Sequencer.run_once` - one bounded batch, under an advisory lock so one
  process at a time positions events (the others skip the round). Only the
  background loop of each server process runs it (jobs.py `event_loop`),
  every `event_interval_s`, on the transaction pool: one connection per
  round whatever the number of open streams. A stream never runs it.
* A stream that has caught up (follow=False) asks the loop for a round now
  (`round`) and waits for one that started after it asked: what committed
  before the call is then positioned. Requests that arrive together share
  one round.
* Waiters (following streams) are woken after every round of this process
  (whatever it positioned: another process may have positioned events), and
  otherwise look again after at most `POLL_S`, on the read pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from fuelcard.v1 import control_pb2, events_pb2

from fuelcard_server.clock import Clock
from fuelcard_server.db import Database
from fuelcard_server.locks import EVENT_SEQUENCER_LOCK
from fuelcard_server.states import HoldState

log = logging.getLogger(__name__)

SEQUENCE_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.sequence_events(p_now => %(now)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
PRUNE_SQL = (
    "SELECT CASE WHEN pg_try_advisory_xact_lock(%(lock)s)"
    " THEN fc.prune_events(p_before => %(before)s::timestamptz, p_limit => %(limit)s) ELSE -1 END")
# Events are rendered as they are read, from the ids and scalars the sequencer kept: journal
# entries and holds as columns (see _payload), the rest, and events positioned before
# migration 0012 (stored then), as a jsonb payload.
READ_SQL = "SELECT * FROM fc.read_events(p_after => %s, p_limit => %s)"
# fc.read_events' columns after (position, xid, kind, occur_us, payload, backfilled): a
# journal entry's, then a hold's, named as the payload keys event() reads.
_ENTRY_KEYS = ("entry_id", "kind", "asset", "amount", "debit_account_id", "debit_system_code",
               "credit_account_id", "credit_system_code", "hold_id", "recharge_id", "channel",
               "description")
_HOLD_KEYS = ("hold_id", "state", "account_id", "spender_account_id", "card_id", "amount_fen",
              "station_id", "terminal_id", "nozzle", "product", "create_us", "expire_us",
              "close_us")
# the settlement, final once CONFIRMED
_SETTLEMENT_KEYS = ("settled_fen", "volume_ml", "unit_price_fen", "points_earned",
                    "confirmed_late")
_ENTRY_AT = 6
_HOLD_AT = _ENTRY_AT + len(_ENTRY_KEYS)
_SETTLEMENT_AT = _HOLD_AT + len(_HOLD_KEYS)
HEAD_SQL = "SELECT last_position, pruned_through FROM fc.event_head"

# Longest an open stream waits before it looks for events positioned by
# another server process.
POLL_S = 0.25
# Longest a caught-up stream waits for the round it asked for (the loop is
# busy or the database slow): then it looks again and asks again.
ROUND_WAIT_S = 5.0
PRUNE_EVERY_S = 60.0
# Batches pruned per round at most: 100 x event_batch (2000) a minute keeps
# up with ~3 300 events/s, far above what the server commits.
PRUNE_BATCHES_MAX = 100


class Sequencer:
    def __init__(self, db: Database, clock: Clock, batch: int, retention_s: int,
                 reads: Database | None = None) -> None:
        # Positions are given and pruned on the primary; the stream reads them
        # through the read pool (the replica when configured), never through
        # the transaction pool the pumps need.
        self.db = db
        self.reads = reads if reads is not None else db
        self.clock = clock
        self.batch = batch
        self.retention = dt.timedelta(seconds=retention_s)
        # Set (and replaced) after every round.
        self._wake = asyncio.Event()
        # A stream asked for a round now (the loop's pause ends early).
        self._asked = asyncio.Event()
        # Rounds started and the latest finished, with what it positioned.
        self._started = 0
        self._finished = 0
        self._result = -1

    async def run_once(self) -> int:
        """Position one batch; how many events, or -1 if another process is
        sequencing right now. Called by the background loop (and tests)."""
        self._started += 1
        serial = self._started
        self._asked.clear()  # this round serves every request made before it
        count = -1
        try:
            row = await self.db.fetch_one(SEQUENCE_SQL, {
                "lock": EVENT_SEQUENCER_LOCK, "now": self.clock.now(), "limit": self.batch})
            assert row is not None
            count = int(row[0])
        finally:  # a failed round wakes its waiters too (as -1: look again)
            if serial > self._finished:
                self._finished, self._result = serial, count
            self._wake.set()
            self._wake = asyncio.Event()
        return count

    async def pause(self, timeout_s: float) -> None:
        """The background loop's wait between rounds: timeout_s, or until a
        stream asks for a round."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._asked.wait(), timeout_s)

    async def round(self, timeout_s: float = ROUND_WAIT_S) -> int:
        """Ask the background loop for a round and wait for one that started
        after this call: how many events it positioned; -1 if another process
        was sequencing, the round failed, or none finished within timeout_s."""
        target = self._started + 1
        self._asked.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._finished < target:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return -1
            await self.wait(remaining)
        return self._result

    async def prune_once(self) -> int:
        """Delete one batch of events older than the retention."""
        row = await self.db.fetch_one(PRUNE_SQL, {
            "lock": EVENT_SEQUENCER_LOCK, "before": self.clock.now() - self.retention,
            "limit": self.batch})
        assert row is not None
        pruned: int = row[0]
        return pruned

    async def wait(self, timeout_s: float = POLL_S) -> None:
        """Until this process's next round ends, or timeout_s."""
        wake = self._wake
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout_s)

    async def head(self) -> tuple[int, int]:
        """(last position given, last position pruned)."""
        row = await self.reads.fetch_one(HEAD_SQL, ())
        assert row is not None
        return int(row[0]), int(row[1])

    async def read(self, after: int, limit: int) -> list[events_pb2.Event]:
        rows = await self.reads.fetch_all(READ_SQL, (after, limit))
        return [event(r[0], r[1], r[2], r[3], _payload(r)) for r in rows]


def _payload(row: Sequence[Any]) -> dict[str, Any]:
    """A fc.read_events row's payload, as event() reads it."""
    kind, stored, backfilled = row[2], row[4], row[5]
    if stored is not None:
        p: dict[str, Any] = stored
        return p
    if kind == 1:
        p = dict(zip(_ENTRY_KEYS, row[_ENTRY_AT:_HOLD_AT], strict=True))
    else:
        p = dict(zip(_HOLD_KEYS, row[_HOLD_AT:_SETTLEMENT_AT], strict=True))
        if p["state"] == HoldState.CONFIRMED:
            p.update(zip(_SETTLEMENT_KEYS, row[_SETTLEMENT_AT:], strict=True))
    if backfilled:
        p["backfill"] = True
    return p


def _ts(message: Any, name: str, micros: int | None) -> None:
    if micros is not None:
        getattr(message, name).FromMicroseconds(micros)


def event(position: int, xid: int, kind: int, occur_us: int, p: dict[str, Any]) -> events_pb2.Event:
    """An fc.events row as an Event."""
    e = events_pb2.Event(position=position, transaction_id=xid,
                         backfilled=bool(p.get("backfill")))
    e.occur_time.FromMicroseconds(occur_us)
    if kind == 1:
        e.ledger_entry.CopyFrom(events_pb2.LedgerEntryEvent(
            entry_id=p["entry_id"], kind=p["kind"], asset=p["asset"], amount=p["amount"],
            debit_account_id=_text(p, "debit_account_id", "debit_system_code"),
            debit_system_code=p["debit_system_code"] or "",
            credit_account_id=_text(p, "credit_account_id", "credit_system_code"),
            credit_system_code=p["credit_system_code"] or "",
            hold_id=p["hold_id"] or "", recharge_id=p["recharge_id"] or "",
            description=p["description"] or ""))
        if p["channel"] is not None:
            e.ledger_entry.channel = p["channel"]
    elif kind == 2:
        h = e.hold
        h.hold_id = p["hold_id"]
        h.state = p["state"]
        h.account_id = p["account_id"]
        h.spender_account_id = p["spender_account_id"]
        h.card_id = p["card_id"]
        h.amount_fen = p["amount_fen"]
        h.station_id = p["station_id"]
        h.terminal_id = p["terminal_id"]
        h.nozzle = p["nozzle"]
        h.product = p["product"]
        _ts(h, "create_time", p["create_us"])
        _ts(h, "expire_time", p["expire_us"])
        _ts(h, "close_time", p["close_us"])
        if "settled_fen" in p:
            h.settled_fen = p["settled_fen"]
            h.volume_ml = p["volume_ml"]
            h.unit_price_fen = p["unit_price_fen"]
            h.points_earned = p["points_earned"]
            h.confirmed_late = p["confirmed_late"]
    elif kind == 3:
        a = e.account
        a.account_id = p["account_id"]
        a.type = p["type"]
        a.status = p["status"]
        a.tier = p["tier"]
        a.parent_account_id = p["parent_account_id"] or ""
        a.funding_mode = p["funding_mode"]
        a.label = p["label"] or ""
        _ts(a, "create_time", p["create_us"])
    elif kind == 4:
        c = e.card
        c.card_id = p["card_id"]
        c.account_id = p["account_id"]
        c.status = p["status"]
        _ts(c, "create_time", p["create_us"])
    elif kind == 5:
        e.station.station.CopyFrom(control_pb2.Station(
            station_id=p["station_id"], name=p["name"],
            location=control_pb2.GeoPoint(latitude=p["latitude"], longitude=p["longitude"])))
    elif kind == 6:
        f = e.refund
        f.refund_id = p["refund_id"]
        f.recharge_id = p["recharge_id"]
        f.account_id = p["account_id"]
        f.channel = p["channel"]
        f.amount_fen = p["amount_fen"]
        f.debited_fen = p["debited_fen"]
        f.shortfall_fen = p["shortfall_fen"]
        _ts(f, "create_time", p["create_us"])
    else:  # a kind this server version does not know how to describe
        log.warning("event %d of unknown kind %d sent without payload", position, kind)
    return e


def _text(p: dict[str, Any], account: str, system: str) -> str:
    """A customer account's uid; empty for a system account (named by code)."""
    return "" if p[system] else str(p[account])
