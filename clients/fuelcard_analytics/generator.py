"""A year of realistic history, as the events the server would stream.

Known structure, so the reports and models can be judged against it:
  * stations around Kunming with coordinates: a dense city centre and
    stations along the highways out of town, of lognormal popularity;
  * personal drivers, families (a main card and secondary cards on SHARED
    sub-accounts, points pooled to the main account monthly) and fleets
    (trucks on SHARED sub-accounts, labelled by plate);
  * a daily cycle (morning and evening peaks for drivers, working hours for
    fleets), a weekly cycle (Friday and weekend trips; fleets rest on
    Sundays), public holidays (the travel rush on the eve, fleets idle;
    fewer trips during the Spring Festival itself), and growth of ~10 % a
    year;
  * churners: ~12 % of drivers and families fade out over ~75 days and
    stop inside the last two months;
  * a few fleet vehicles whose spend triples in the last 30 days (the
    anomalies the fleet report must flag).

The events go into the warehouse through Warehouse.apply, the loader the
live stream uses. Ground truth (who churns, which vehicles are anomalous)
is kept apart in generated_truth, for scoring the models only.
"""

from __future__ import annotations

import datetime as dt
import heapq
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fuelcard.v1 import control_pb2, events_pb2

from fuelcard_analytics.calendar import BUSINESS_TZ, eve, holiday
from fuelcard_analytics.warehouse import Store, Warehouse

GENERATED_STREAM = "generated"
# the messages, untyped: the generator sets enum fields from plain numbers
_pb: Any = events_pb2
CENTRE = (25.04, 102.71)  # Kunming
PRICE_FEN_PER_L = {1: 760, 2: 812, 3: 900, 4: 735}
TIER_MIN_SPEND_FEN = [(4, 5_000_000), (3, 2_000_000), (2, 500_000), (1, 0)]
TIER_MULTIPLIER_PERMILLE = {1: 1000, 2: 1200, 3: 1500, 4: 2000}
CHANNELS = [1, 2, 3, 4, 5]
CHANNEL_WEIGHTS = [0.15, 0.45, 0.30, 0.05, 0.05]

WEEKLY = {  # Monday .. Sunday
    "personal": [0.90, 0.88, 0.92, 0.98, 1.25, 1.15, 0.92],
    "family": [0.85, 0.85, 0.88, 0.95, 1.20, 1.30, 1.10],
    "fleet": [1.10, 1.12, 1.12, 1.10, 1.05, 0.65, 0.35],
}

TRUTH_SQL = """CREATE TABLE IF NOT EXISTS generated_truth (
    card_id VARCHAR PRIMARY KEY, account_id VARCHAR NOT NULL, segment VARCHAR NOT NULL,
    churner BOOLEAN NOT NULL, churn_day DATE, anomaly BOOLEAN NOT NULL)"""


@dataclass(frozen=True)
class YearConfig:
    start: dt.date = dt.date(2025, 11, 25)
    days: int = 365
    stations: int = 30
    drivers: int = 1800
    families: int = 300
    fleets: int = 12
    seed: int = 7
    churn_share: float = 0.12
    anomalies: int = 4


def day_multiplier(day: dt.date, segment: str) -> float:
    m = WEEKLY[segment][day.weekday()]
    name = holiday(day)
    if segment == "fleet":
        if name:
            m *= 0.35
    elif name == "Spring Festival":
        m *= 0.75
    elif name:
        first = not holiday(day - dt.timedelta(days=1))
        m *= 1.45 if first else 1.12
    elif eve(day):
        m *= 1.6
    return m


@dataclass
class _Card:
    card_id: str
    account_id: str       # the spender (the card's account)
    funder_id: str        # whose money (the parent for SHARED sub-accounts)
    segment: str
    rate: float           # sales per day on an ordinary day
    product: int
    home: int
    opened: int           # day index the card appears
    churn_day: int | None = None
    anomaly: bool = False


@dataclass
class _Account:
    account_id: str
    type: int
    parent: str = ""
    mode: int = 0
    label: str = ""
    tier: int = 1
    balance_fen: int = 0
    points: int = 0
    spend: list[tuple[int, int]] = field(default_factory=list)  # (day, fen)


class Generator:
    def __init__(self, config: YearConfig) -> None:
        self.c = config
        self.rng = np.random.default_rng(config.seed)
        self.rnd = random.Random(config.seed)
        self.accounts: dict[str, _Account] = {}
        self.cards: list[_Card] = []
        self.entry_id = 0
        self._queue: list[tuple[dt.datetime, int, events_pb2.Event]] = []
        self._seq = 0

    # --- identities and time ---------------------------------------------------
    def _uid(self) -> str:
        return str(uuid.UUID(int=self.rnd.getrandbits(128), version=4))

    def _at(self, day: int, hour: float) -> dt.datetime:
        base = dt.datetime.combine(self.c.start + dt.timedelta(days=day), dt.time(0),
                                   tzinfo=BUSINESS_TZ)
        return base + dt.timedelta(hours=hour)

    def _emit(self, when: dt.datetime, event: events_pb2.Event) -> None:
        event.occur_time.FromDatetime(when.astimezone(dt.UTC))
        self._seq += 1
        heapq.heappush(self._queue, (when, self._seq, event))

    # --- the network -----------------------------------------------------------
    def stations(self) -> list[tuple[str, float, float, float]]:
        out = []
        for i in range(self.c.stations):
            if i < self.c.stations * 0.6:  # the city
                lat = CENTRE[0] + self.rng.normal(0, 0.045)
                lon = CENTRE[1] + self.rng.normal(0, 0.055)
                weight = float(self.rng.lognormal(0.3, 0.45))
            else:  # along the highways out of town
                angle = self.rnd.choice([0.3, 1.9, 3.4, 4.8]) + self.rng.normal(0, 0.08)
                r = float(self.rng.uniform(0.12, 0.5))
                lat, lon = CENTRE[0] + r * np.sin(angle), CENTRE[1] + r * np.cos(angle)
                weight = float(self.rng.lognormal(-0.2, 0.5))
            out.append((f"KM-{i + 1:03d}", float(lat), float(lon), weight))
        return out

    def _open(self, day: int, kind: int, parent: str = "", mode: int = 0, label: str = "",
              tier: int = 1) -> _Account:
        a = _Account(self._uid(), kind, parent, mode, label, tier)
        self.accounts[a.account_id] = a
        e = events_pb2.Event()
        when = self._at(day, 7.0) if day > 0 else self._at(0, 0.01)
        e.account.CopyFrom(_pb.AccountEvent(
            account_id=a.account_id, type=kind, status=1, tier=tier, parent_account_id=parent,
            funding_mode=mode, label=label))
        e.account.create_time.FromDatetime(when.astimezone(dt.UTC))
        self._emit(when, e)
        return a

    def _issue(self, day: int, account: _Account, funder: _Account, segment: str, rate: float,
               product: int, home: int) -> _Card:
        card = _Card(self._uid(), account.account_id, funder.account_id, segment, rate, product,
                     home, day)
        e = events_pb2.Event()
        when = self._at(day, 7.5) if day > 0 else self._at(0, 0.02)
        e.card.CopyFrom(_pb.CardEvent(card_id=card.card_id, account_id=account.account_id,
                                             status=1))
        e.card.create_time.FromDatetime(when.astimezone(dt.UTC))
        self._emit(when, e)
        self.cards.append(card)
        return card

    def _opening_day(self) -> int:
        # 70 % are customers already; the rest join through the year (growth),
        # the last month aside (a short history, `--days 30`: on day 1)
        return 0 if self.rnd.random() < 0.7 else self.rnd.randrange(1, max(2, self.c.days - 30))

    def _tier_for(self, yearly_fen: float) -> int:
        return next(t for t, floor in TIER_MIN_SPEND_FEN if yearly_fen >= floor)

    def population(self, weights: np.ndarray) -> None:
        n_st = len(weights)
        p = weights / weights.sum()

        def car_product() -> int:
            return int(self.rng.choice([1, 2, 3], p=[0.6, 0.32, 0.08]))

        def rate(mean: float) -> float:
            return float(self.rng.gamma(3.0, mean / 3.0))

        for _ in range(self.c.drivers):
            day, r = self._opening_day(), rate(1 / 6.5)
            a = self._open(day, 1, tier=self._tier_for(r * 365 * 30_000))
            self._issue(day, a, a, "personal", r, car_product(), int(self.rng.choice(n_st, p=p)))
        for _ in range(self.c.families):
            day, r = self._opening_day(), rate(1 / 7.5)
            main = self._open(day, 3, tier=self._tier_for(r * 365 * 30_000 * 2))
            home = int(self.rng.choice(n_st, p=p))
            self._issue(day, main, main, "family", r, car_product(), home)
            for member in range(self.rnd.choice([1, 1, 2])):
                sub = self._open(day, 3, parent=main.account_id, mode=2,
                                 label=("spouse", "child")[member])
                self._issue(day, sub, main, "family", rate(1 / 9), car_product(), home)
        for f in range(self.c.fleets):
            parent = self._open(0, 2, tier=4)
            depot = int(self.rng.choice(n_st, p=p))
            for v in range(self.rnd.randint(5, 22)):
                sub = self._open(0 if v < 4 else self._opening_day(), 2,
                                 parent=parent.account_id, mode=2,
                                 # a Yunnan plate, as fleets label their trucks
                                 label=f"云{'ABCDEFGH'[f % 8]}·{10000 + 97 * f + v}")
                self._issue(0, sub, parent, "fleet", rate(1 / 2.8), 4, depot)
        drivers = [c for c in self.cards if c.segment != "fleet"]
        for c in self.rng.choice(len(drivers), int(len(drivers) * self.c.churn_share),
                                 replace=False):
            # inside the last two months (all of a shorter history)
            low = max(1, self.c.days - 60)
            drivers[int(c)].churn_day = int(self.rng.integers(low, max(low + 1, self.c.days - 4)))
        fleet = [c for c in self.cards if c.segment == "fleet" and c.opened == 0]
        for c in self.rng.choice(len(fleet), min(self.c.anomalies, len(fleet)), replace=False):
            fleet[int(c)].anomaly = True

    # --- money -----------------------------------------------------------------
    def _entry(self, when: dt.datetime, kind: int, asset: int, amount: int, *,
               debit: str = "", debit_code: str = "", credit: str = "", credit_code: str = "",
               hold_id: str = "", channel: int = 0, description: str = "") -> None:
        self.entry_id += 1
        e = events_pb2.Event()
        e.ledger_entry.CopyFrom(_pb.LedgerEntryEvent(
            entry_id=self.entry_id, kind=kind, asset=asset, amount=amount,
            debit_account_id=debit, debit_system_code=debit_code, credit_account_id=credit,
            credit_system_code=credit_code, hold_id=hold_id,
            recharge_id=self._uid() if kind == 1 else "", channel=channel,
            description=description))
        self._emit(when, e)

    def _sale(self, card: _Card, when: dt.datetime, day: int, station: str, price: int) -> None:
        funder, spender = self.accounts[card.funder_id], self.accounts[card.account_id]
        if card.product == 4:
            volume_ml = int(np.clip(self.rng.normal(210, 60), 60, 450) * 1000)
        else:
            volume_ml = int(np.clip(self.rng.normal(38, 9), 10, 70) * 1000)
        amount = volume_ml * price // 1000
        if funder.balance_fen < amount:
            top_up = (self.rnd.choice([2_000_000, 3_000_000, 5_000_000]) if funder.type == 2
                      else self.rnd.choice([50_000, 100_000, 100_000, 200_000]))
            top_up = max(top_up, amount)
            channel = self.rnd.choices(CHANNELS, CHANNEL_WEIGHTS)[0]
            codes = {1: "BANK_CARD", 2: "WECHAT_PAY", 3: "ALIPAY", 4: "ECNY", 5: "COUNTER"}
            paid = max(when - dt.timedelta(minutes=self.rnd.randint(3, 600)), self._at(day, 0.0))
            self._entry(paid, 1, 1, top_up,
                        debit_code=f"CHANNEL_CLEARING_{codes[channel]}",
                        credit=funder.account_id, channel=channel)
            funder.balance_fen += top_up
        funder.balance_fen -= amount
        spender.spend.append((day, amount))
        hold_id = self._uid()
        self._entry(when, 2, 1, amount, debit=funder.account_id, credit_code="FUEL_SALES",
                    hold_id=hold_id)
        points = (amount // 100) * TIER_MULTIPLIER_PERMILLE[spender.tier] // 1000
        if points:
            self._entry(when, 3, 2, points, debit_code="POINTS_ISSUED",
                        credit=spender.account_id, hold_id=hold_id)
            spender.points += points
        e = events_pb2.Event()
        h: Any = e.hold
        h.hold_id, h.state, h.account_id = hold_id, 2, funder.account_id
        h.spender_account_id, h.card_id, h.amount_fen = spender.account_id, card.card_id, amount
        h.station_id, h.terminal_id, h.nozzle = station, f"{station}-T{1 + card.home % 4}", 1
        h.product, h.settled_fen, h.volume_ml = card.product, amount, volume_ml
        h.unit_price_fen, h.points_earned = price, points
        utc = when.astimezone(dt.UTC)
        h.create_time.FromDatetime(utc - dt.timedelta(minutes=3))
        h.expire_time.FromDatetime(utc + dt.timedelta(minutes=27))
        h.close_time.FromDatetime(utc)
        self._emit(when, e)
        if spender.points > 3000 and self.rnd.random() < 0.04:
            redeem = self.rnd.choice([1000, 2000, 3000])
            self._entry(when + dt.timedelta(minutes=30), 4, 2, redeem, debit=spender.account_id,
                        credit_code="POINTS_REDEEMED", description="points mall")
            spender.points -= redeem

    def _month_end(self, day: int) -> None:
        when = self._at(day, 23.9)
        for a in self.accounts.values():
            if a.parent and a.points and self.accounts[a.parent].type == 3:  # 积分合并
                self._entry(when, 6, 2, a.points, debit=a.account_id, credit=a.parent,
                            description="points pooled")
                self.accounts[a.parent].points += a.points
                a.points = 0
            if a.type == 2 and not a.parent:
                continue
            recent = sum(f for d, f in a.spend if d > day - 90)
            tier = self._tier_for(recent * 365 / 90)
            if a.spend and tier != a.tier:
                a.tier = tier
                e = events_pb2.Event()
                e.account.CopyFrom(_pb.AccountEvent(
                    account_id=a.account_id, type=a.type, status=1, tier=tier,
                    parent_account_id=a.parent, funding_mode=a.mode, label=a.label))
                self._emit(when, e)

    def _price(self, product: int, day: int) -> int:
        # national price adjustments every ~60 days, within a few per cent
        step = day // 60
        drift_pct = [0, 2, -1, 3, 1, -2, 0][step % 7]
        return PRICE_FEN_PER_L[product] * (100 + drift_pct) // 100

    # --- the year ----------------------------------------------------------------
    def events(self) -> Iterator[events_pb2.Event]:
        st = self.stations()
        for sid, lat, lon, _ in st:
            e = events_pb2.Event()
            e.station.station.CopyFrom(control_pb2.Station(
                station_id=sid, name=f"Kunming {sid}",
                location=control_pb2.GeoPoint(latitude=lat, longitude=lon)))
            self._emit(self._at(0, 0.0), e)
        weights = np.array([w for *_, w in st])
        self.population(weights)
        p = weights / weights.sum()
        days = [self.c.start + dt.timedelta(days=d) for d in range(self.c.days)]
        segments = ("personal", "family", "fleet")
        mult = {s: np.array([day_multiplier(d, s) for d in days]) for s in segments}
        trend = np.exp(0.10 * np.arange(self.c.days) / 365)
        for d in range(self.c.days):
            for card in self.cards:
                if d < card.opened:
                    continue
                lam = card.rate * mult[card.segment][d] * trend[d]
                if card.churn_day is not None:
                    fade = (card.churn_day - d) / 75
                    lam *= 0.0 if d >= card.churn_day else min(1.0, 0.15 + fade)
                if card.anomaly and d >= self.c.days - 30:
                    lam *= 3
                for _ in range(int(self.rng.poisson(lam))):
                    if card.segment == "fleet":
                        hour = float(self.rng.uniform(6, 20))
                    else:
                        hour = float(np.clip(self.rng.choice([8.0, 12.5, 18.0], p=[0.35, 0.2, 0.45])
                                             + self.rng.normal(0, 1.6), 0, 23.9))
                    home = self.rng.random() < 0.7
                    station = card.home if home else int(self.rng.choice(len(st), p=p))
                    self._sale(card, self._at(d, hour), d, st[station][0],
                               self._price(card.product, d))
            if days[d].month != (days[d] + dt.timedelta(days=1)).month:
                self._month_end(d)
            # everything up to the end of this day is final: hand it out in order
            horizon = self._at(d + 1, 0.0)
            while self._queue and self._queue[0][0] < horizon:
                yield heapq.heappop(self._queue)[2]
        while self._queue:
            yield heapq.heappop(self._queue)[2]

    def truth_rows(self) -> list[tuple[str, str, str, bool, dt.date | None, bool]]:
        return [(c.card_id, c.account_id, c.segment, c.churn_day is not None,
                 None if c.churn_day is None else self.c.start + dt.timedelta(days=c.churn_day),
                 c.anomaly) for c in self.cards]


def generate(store: Store, config: YearConfig, batch: int = 5000,
             log: Callable[[str], None] = print) -> int:
    """Load a generated year into the store (stream 'generated'); the number
    of events."""
    warehouse = Warehouse(store, GENERATED_STREAM)
    if warehouse.cursor() != 0:
        raise RuntimeError("this store already holds a generated year")
    gen = Generator(config)
    pending: list[events_pb2.Event] = []
    position = 0
    for e in gen.events():
        position += 1
        e.position = position
        pending.append(e)
        if len(pending) >= batch:
            warehouse.apply(pending)
            pending = []
            if position % (batch * 20) == 0:
                log(f"generated {position} events")
    warehouse.apply(pending)
    store.execute(TRUTH_SQL)
    rows = gen.truth_rows()
    with store.transaction():
        store.execute(
            "INSERT INTO generated_truth SELECT * FROM (SELECT unnest(?::VARCHAR[]),"
            " unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), unnest(?::BOOLEAN[]), unnest(?::DATE[]),"
            " unnest(?::BOOLEAN[])) AS t", [list(col) for col in zip(*rows, strict=True)])
    log(f"generated {position} events: {config.stations} stations, {len(gen.cards)} cards,"
        f" {len(gen.accounts)} accounts")
    return position
