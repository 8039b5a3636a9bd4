"""History: a year of past pump cycles and recharges behind a seeded data set.

The scale target ("1 000 000 cards and 10 000 000 journal entries loaded")
is about what the hot path meets in a database that has been in service: big
journal, holds, idempotency, usage and points tables and their indexes, not
only big cards and accounts tables. This module writes, for the cards of a
data set, exactly the rows the server would have written for those past
operations, so every constraint holds and `fuelcard verify` passes:

* per confirmed sale: an fc.holds row (CONFIRMED), a purchase entry (kind 2,
  money) and a points-earned entry (kind 3), a points lot, the usage
  counters of its card and account for its day, the account's monthly spend,
  and the idempotency keys (with their stored answers) of its Authorize and
  its Confirm;
* one card in CANCEL_EVERY also has a CANCELLED hold (no entry; usage 0);
* per recharge: an fc.recharges row, its entry (kind 1) and its idempotency
  key;
* the accounts' balances and points balances moved by all of that.

Sizes: the data set's journal holds `entries` rows in all, counting the
opening recharge per account the seeder writes; the rest is split into sales
(two entries each) and recharges (one each) in the ratio SALES_PER_RECHARGE
to 1, spread evenly over cards and accounts and at random over the past year.

It runs inside PostgreSQL (INSERT ... SELECT over generate_series, one set-
based statement per table and chunk): no row crosses the wire, which is
faster than COPY from Python. Chunks are ranges of whole accounts, each one
transaction (so the ledger adds up after every chunk), recorded in
loadtest.history_chunks: an interrupted load resumes where it stopped. Two
connections load chunks in parallel. The tables are vacuumed and analysed at
the end, as autovacuum would have left a database in service.

Not modelled (documented in BENCHMARKS.md): tier changes (the history keeps
every account under the first tier's threshold for the uniform layout; a
fleet account's first confirm of a run re-evaluates its tier, as in
service), the exact running balance in recharges.balance_after_fen and in
the stored answers (the opening balance is used), redemptions, and expired
holds.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg

from fuelcard_loadtest.scenarios import Layout

SALES_PER_RECHARGE = 4
CANCEL_EVERY = 20
CHUNK_ACCOUNTS = 20_000
HISTORY_DAYS = 365
# A sale: a 50-500 yuan hold settled at 30-100 % of it (as the generator does).
HOLD_MIN_FEN, HOLD_MAX_FEN = 5_000, 50_000
RECHARGE_MIN_FEN, RECHARGE_MAX_FEN = 10_000, 200_000
UNIT_PRICE_FEN = 785
STATIONS = 20_000
# Channels of history recharges: bank card, WeChat Pay, Alipay, e-CNY.
CLEARING = ("CHANNEL_CLEARING_BANK_CARD", "CHANNEL_CLEARING_WECHAT_PAY",
            "CHANNEL_CLEARING_ALIPAY", "CHANNEL_CLEARING_ECNY")
BIG_TABLES = ("fc.accounts", "fc.holds", "fc.journal", "fc.idempotency_keys", "fc.usage",
              "fc.points_lots", "fc.monthly_spend", "fc.recharges")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS loadtest.history_chunks (
    tag     integer NOT NULL,
    chunk   integer NOT NULL,
    entries bigint  NOT NULL,
    seconds double precision NOT NULL,
    PRIMARY KEY (tag, chunk)
);
"""

# What the history writes per table; any other column must have a default or
# be nullable (checked first, like the seeder's).
WRITES = {
    "holds": {"uid", "account_id", "card_id", "spender_account_id", "usage_day", "state",
              "amount_fen", "settled_fen", "station_id", "terminal_id", "nozzle", "product",
              "created_at", "expires_at", "closed_at", "volume_ml", "unit_price_fen",
              "points_earned", "confirmed_late"},
    "journal": {"kind", "asset", "debit_account_id", "credit_account_id", "amount", "hold_id",
                "recharge_id", "created_at"},
    "points_lots": {"account_id", "points", "remaining", "earned_at", "expires_at"},
    "idempotency_keys": {"caller", "request_id", "operation", "request_hash", "response",
                         "created_at"},
    "usage": {"scope_kind", "scope_id", "day", "amount_fen"},
    "monthly_spend": {"account_id", "month", "spend_fen"},
    "recharges": {"uid", "account_id", "channel", "channel_txn_id", "amount_fen",
                  "balance_after_fen", "created_at"},
}


@dataclass(frozen=True)
class Plan:
    """How many sales and recharges, and which card and account get how many."""

    cards: int
    accounts: int
    entries: int        # journal entries of the data set in all
    sales: int          # confirmed sales (two entries each)
    recharges: int      # history recharges (one entry each)

    @classmethod
    def of(cls, layout: Layout, entries: int) -> Plan:
        history = entries - layout.accounts
        if history < 0:
            raise ValueError(f"--history-entries must be at least the number of accounts"
                             f" ({layout.accounts}): each has its opening recharge")
        sales = history * SALES_PER_RECHARGE // (2 * SALES_PER_RECHARGE + 1)
        return cls(layout.cards, layout.accounts, entries, sales, history - 2 * sales)

    def sales_of(self, card: int) -> int:
        return self.sales // self.cards + (1 if card < self.sales % self.cards else 0)

    def cancels_of(self, card: int) -> int:
        return 1 if card % CANCEL_EVERY == 0 else 0

    def recharges_of(self, account: int) -> int:
        return self.recharges // self.accounts + (1 if account < self.recharges % self.accounts
                                                  else 0)

    def entries_of(self, cards: range, accounts: range) -> int:
        return (sum(2 * self.sales_of(c) for c in cards)
                + sum(self.recharges_of(a) for a in accounts))


@dataclass(frozen=True)
class Chunk:
    index: int
    accounts: range
    cards: range


def chunks(layout: Layout, size: int = CHUNK_ACCOUNTS) -> Iterator[Chunk]:
    """Ranges of whole accounts and the (contiguous) cards drawing on them."""
    card = 0
    for index, a0 in enumerate(range(0, layout.accounts, size)):
        a1 = min(a0 + size, layout.accounts)
        c0 = card
        while card < layout.cards and layout.account_of(card) < a1:
            card += 1
        yield Chunk(index, range(a0, a1), range(c0, card))


# -- the SQL of one chunk ------------------------------------------------------

CARDS_SQL = """
CREATE TEMP TABLE hc ON COMMIT DROP AS
SELECT lc.i, c.id AS card_id, c.uid AS card_uid, c.masked, c.account_id, a.uid AS account_uid,
       a.balance_fen, ('x' || right(a.uid::text, 12))::bit(48)::bigint AS a_index,
       %(base_sales)s + (lc.i < %(extra_sales)s)::int AS n_sales,
       (lc.i %% %(cancel_every)s = 0)::int AS n_cancels
  FROM loadtest.cards lc
  JOIN fc.cards c ON c.pan_index = lc.pan_index
  JOIN fc.accounts a ON a.id = c.account_id
 WHERE lc.tag = %(tag)s AND lc.i >= %(c0)s AND lc.i < %(c1)s
"""

HOLDS_TABLE_SQL = "CREATE TEMP TABLE hh ON COMMIT DROP AS SELECT * FROM fc.holds WITH NO DATA"
HOLDS_SQL = """
WITH h AS (
    INSERT INTO fc.holds (uid, account_id, card_id, spender_account_id, usage_day, state,
                          amount_fen, settled_fen, station_id, terminal_id, nozzle, product,
                          created_at, expires_at, closed_at, volume_ml, unit_price_fen,
                          points_earned, confirmed_late)
    SELECT gen_random_uuid(), x.account_id, x.card_id, x.account_id,
           (x.t AT TIME ZONE %(tz)s)::date, x.state, x.amount,
           CASE WHEN x.state = 2 THEN x.settled ELSE 0 END,
           x.station, x.station || '-T' || (x.nozzle %% 8), x.nozzle, x.product,
           x.t, x.t + interval '30 minutes', x.t + x.pump,
           CASE WHEN x.state = 2 THEN x.settled * 1000 / %(price)s ELSE 0 END,
           CASE WHEN x.state = 2 THEN %(price)s ELSE 0 END,
           CASE WHEN x.state = 2 THEN (x.settled / 100) * %(permille)s / 1000 ELSE 0 END,
           false
      FROM (SELECT hc.card_id, hc.account_id, r.state, r.amount, r.t, r.pump, r.nozzle, r.product,
                   floor(r.amount * (0.3 + 0.7 * r.f))::bigint AS settled,
                   'S' || lpad(r.station::text, 5, '0') AS station
              FROM hc CROSS JOIN LATERAL generate_series(1, hc.n_sales + hc.n_cancels) k
              CROSS JOIN LATERAL (
                SELECT CASE WHEN k > hc.n_sales THEN 3 ELSE 2 END::smallint AS state,
                       %(amin)s + floor(random() * (%(amax)s - %(amin)s + 1))::bigint AS amount,
                       random() AS f,
                       %(start)s::timestamptz + random() * %(span)s::interval AS t,
                       make_interval(secs => 60 + floor(random() * 240)) AS pump,
                       floor(random() * %(stations)s)::int AS station,
                       1 + floor(random() * 12)::int AS nozzle,
                       (1 + floor(random() * 4))::smallint AS product) r
             ORDER BY r.t) x
    RETURNING *)
INSERT INTO hh SELECT * FROM h
"""

SALE_ENTRIES_SQL = """
INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, hold_id,
                        created_at)
SELECT e.kind, e.asset, e.debit, e.credit, e.amount, e.hold_id, e.at
  FROM hh, LATERAL (VALUES (2::smallint, 1::smallint, hh.account_id, %(sales_account)s::bigint,
                            hh.settled_fen, hh.id, hh.closed_at),
                           (3::smallint, 2::smallint, %(issued_account)s::bigint,
                            hh.spender_account_id, hh.points_earned, hh.id, hh.closed_at))
                   e (kind, asset, debit, credit, amount, hold_id, at)
 WHERE hh.state = 2
 ORDER BY hh.closed_at, hh.id, e.kind
"""

LOTS_SQL = """
INSERT INTO fc.points_lots (account_id, points, remaining, earned_at, expires_at)
SELECT spender_account_id, points_earned, points_earned, closed_at,
       closed_at + make_interval(months => %(validity)s)
  FROM hh WHERE state = 2 ORDER BY closed_at
"""

# The answers the server stored: Authorize's (the hold still AUTHORIZED) and
# Confirm's or Cancel's (the hold closed).
HOLD_KEYS_SQL = """
INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response,
                                 created_at)
SELECT '', gen_random_uuid()::text, k.operation,
       sha256(convert_to(hh.uid::text || k.operation, 'UTF8')),
       CASE k.operation WHEN 'authorize' THEN
           jsonb_build_object('decision', 'APPROVED', 'hold', k.hold,
                              'available_fen', hc.balance_fen - hh.amount_fen)
       WHEN 'confirm' THEN
           jsonb_build_object('decision', 'APPROVED', 'hold', k.hold,
                              'points_earned', hh.points_earned, 'balance_fen', hc.balance_fen)
       ELSE jsonb_build_object('hold', k.hold) END,
       k.at
  FROM hh JOIN hc ON hc.card_id = hh.card_id,
  LATERAL (SELECT jsonb_build_object(
                 'hold_id', hh.uid, 'account_id', hc.account_uid, 'card_id', hc.card_uid,
                 'masked_card_number', hc.masked, 'amount_fen', hh.amount_fen,
                 'station_id', hh.station_id, 'terminal_id', hh.terminal_id,
                 'nozzle', hh.nozzle, 'product', hh.product,
                 'create_us', (extract(epoch FROM hh.created_at) * 1000000)::bigint,
                 'expire_us', (extract(epoch FROM hh.expires_at) * 1000000)::bigint,
                 'confirmed_late', false) AS base) b,
  LATERAL (VALUES
      ('authorize', hh.created_at,
       b.base || jsonb_build_object('state', 1, 'settled_fen', 0, 'close_us', NULL::bigint,
                                    'volume_ml', 0, 'unit_price_fen', 0, 'points_earned', 0)),
      (CASE hh.state WHEN 2 THEN 'confirm' ELSE 'cancel' END, hh.closed_at,
       b.base || jsonb_build_object(
           'state', hh.state, 'settled_fen', hh.settled_fen,
           'close_us', (extract(epoch FROM hh.closed_at) * 1000000)::bigint,
           'volume_ml', hh.volume_ml, 'unit_price_fen', hh.unit_price_fen,
           'points_earned', hh.points_earned))) k (operation, at, hold)
 ORDER BY k.at
"""

# What the holds charged, per card and per account and day (a cancelled hold
# charged its amount and gave it back: its counter stays, at 0), and the
# accounts' monthly spend. ON CONFLICT: a day or month already counted
# (other data on the same accounts) is added to, as the server would.
USAGE_SQL = """
INSERT INTO fc.usage (scope_kind, scope_id, day, amount_fen)
SELECT 1, card_id, usage_day, sum(settled_fen) FROM hh GROUP BY card_id, usage_day
UNION ALL
SELECT 2, spender_account_id, usage_day, sum(settled_fen) FROM hh
 GROUP BY spender_account_id, usage_day
ORDER BY 1, 2, 3
ON CONFLICT (scope_kind, scope_id, day)
DO UPDATE SET amount_fen = fc.usage.amount_fen + excluded.amount_fen
"""

MONTHLY_SQL = """
INSERT INTO fc.monthly_spend (account_id, month, spend_fen)
SELECT spender_account_id, date_trunc('month', closed_at AT TIME ZONE %(tz)s)::date,
       sum(settled_fen)
  FROM hh WHERE state = 2 GROUP BY 1, 2 ORDER BY 1, 2
ON CONFLICT (account_id, month)
DO UPDATE SET spend_fen = fc.monthly_spend.spend_fen + excluded.spend_fen
"""

RECHARGES_TABLE_SQL = (
    "CREATE TEMP TABLE hr ON COMMIT DROP AS SELECT * FROM fc.recharges WITH NO DATA")
RECHARGES_SQL = """
WITH r AS (
    INSERT INTO fc.recharges (uid, account_id, channel, channel_txn_id, amount_fen,
                              balance_after_fen, created_at)
    SELECT gen_random_uuid(), a.account_id, x.channel,
           'hist-' || %(tag)s || '-' || a.a_index || '-' || k, x.amount, a.balance_fen + x.amount,
           x.t
      FROM (SELECT DISTINCT ON (account_id) account_id, a_index, balance_fen FROM hc
             ORDER BY account_id) a
     CROSS JOIN LATERAL generate_series(1, %(base_recharges)s
                                        + (a.a_index < %(extra_recharges)s)::int) k
     CROSS JOIN LATERAL (
        SELECT (1 + (a.a_index + k) %% 4)::smallint AS channel,
               %(rmin)s + floor(random() * (%(rmax)s - %(rmin)s + 1))::bigint AS amount,
               %(start)s::timestamptz + random() * %(span)s::interval AS t) x
     ORDER BY x.t
    RETURNING *)
INSERT INTO hr SELECT * FROM r
"""

RECHARGE_ENTRIES_SQL = """
INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount, recharge_id,
                        created_at)
SELECT 1, 1, (%(clearing)s::bigint[])[channel], account_id, amount_fen, id, created_at
  FROM hr ORDER BY created_at, id
"""

RECHARGE_KEYS_SQL = """
INSERT INTO fc.idempotency_keys (caller, request_id, operation, request_hash, response,
                                 created_at)
SELECT '', gen_random_uuid()::text, 'recharge', sha256(convert_to(hr.uid::text, 'UTF8')),
       jsonb_build_object('decision', 'APPROVED', 'balance_fen', hr.balance_after_fen,
           'recharge', jsonb_build_object(
               'recharge_id', hr.uid, 'account_id', a.uid, 'channel', hr.channel,
               'channel_txn_id', hr.channel_txn_id, 'amount_fen', hr.amount_fen,
               'create_us', (extract(epoch FROM hr.created_at) * 1000000)::bigint)),
       hr.created_at
  FROM hr JOIN fc.accounts a ON a.id = hr.account_id ORDER BY hr.created_at
"""

BALANCES_SQL = """
UPDATE fc.accounts a
   SET balance_fen = a.balance_fen + d.money, points_balance = a.points_balance + d.points
  FROM (SELECT account_id, sum(money) AS money, sum(points) AS points FROM (
            SELECT account_id, -settled_fen AS money, 0 AS points FROM hh WHERE state = 2
            UNION ALL
            SELECT spender_account_id, 0, points_earned FROM hh WHERE state = 2
            UNION ALL
            SELECT account_id, amount_fen, 0 FROM hr) m
         GROUP BY account_id) d
 WHERE a.id = d.account_id
"""


@dataclass
class Loaded:
    entries: int
    chunks: int
    seconds: float


def _check_columns(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT table_name::text, column_name::text"
        "  FROM information_schema.columns"
        " WHERE table_schema = 'fc' AND table_name = ANY(%s)"
        "   AND is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO'"
        "   AND is_generated = 'NEVER'", (list(WRITES),)).fetchall()
    missing = [f"fc.{t}.{c}" for t, c in rows if c not in WRITES[t]]
    if missing:
        raise RuntimeError("the schema has required columns the history does not fill: "
                           + ", ".join(missing) + " (update fuelcard_loadtest/history.py)")
    parents = conn.execute(
        "SELECT count(*) FROM fc.accounts WHERE parent_id IS NOT NULL").fetchone()
    assert parents is not None
    # Sub-accounts would need their parents' usage counters too; the layouts
    # have none. (Refuse rather than write counters verify would reject.)
    if int(parents[0]):
        raise RuntimeError("history: sub-accounts are not modelled")


def _params(conn: psycopg.Connection[Any], tag: int, plan: Plan,
            end: dt.datetime) -> dict[str, Any]:
    def one(sql: str, **params: Any) -> Any:
        row = conn.execute(sql, params).fetchone()
        assert row is not None and row[0] is not None, sql
        return row[0]

    return {
        "tag": tag, "tz": one("SELECT fc.business_tz()"),
        "permille": int(one("SELECT multiplier_permille FROM fc.tier_rules WHERE tier = 1")),
        "validity": int(one("SELECT value FROM fc.config WHERE key = 'points_validity_months'")),
        "sales_account": int(one("SELECT fc.system_account(p_code => 'FUEL_SALES')")),
        "issued_account": int(one("SELECT fc.system_account(p_code => 'POINTS_ISSUED')")),
        "clearing": [int(one("SELECT fc.system_account(p_code => %(code)s)", code=code))
                     for code in CLEARING],
        "price": UNIT_PRICE_FEN, "amin": HOLD_MIN_FEN, "amax": HOLD_MAX_FEN,
        "rmin": RECHARGE_MIN_FEN, "rmax": RECHARGE_MAX_FEN, "stations": STATIONS,
        "cancel_every": CANCEL_EVERY,
        "start": end - dt.timedelta(days=HISTORY_DAYS), "span": dt.timedelta(days=HISTORY_DAYS),
        "base_sales": plan.sales // plan.cards, "extra_sales": plan.sales % plan.cards,
        "base_recharges": plan.recharges // plan.accounts,
        "extra_recharges": plan.recharges % plan.accounts,
    }


def _load_chunk(url: str, params: dict[str, Any], plan: Plan, chunk: Chunk) -> int:
    started = time.monotonic()
    expected = plan.entries_of(chunk.cards, chunk.accounts)
    p = {**params, "c0": chunk.cards.start, "c1": chunk.cards.stop}
    with psycopg.connect(url) as conn:
        # One chunk is one transaction; losing its commit on a crash loses
        # only work the resume redoes.
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET work_mem = '64MB'")
        conn.execute(CARDS_SQL, p)
        conn.execute(HOLDS_TABLE_SQL)
        conn.execute(HOLDS_SQL, p)
        written = conn.execute(SALE_ENTRIES_SQL, p).rowcount
        conn.execute(LOTS_SQL, p)
        conn.execute(HOLD_KEYS_SQL, p)
        conn.execute(USAGE_SQL, p)
        conn.execute(MONTHLY_SQL, p)
        conn.execute(RECHARGES_TABLE_SQL)
        conn.execute(RECHARGES_SQL, p)
        written += conn.execute(RECHARGE_ENTRIES_SQL, p).rowcount
        conn.execute(RECHARGE_KEYS_SQL, p)
        conn.execute(BALANCES_SQL, p)
        if written != expected:
            raise RuntimeError(f"history chunk {chunk.index}: wrote {written} entries,"
                               f" planned {expected}")
        conn.execute("INSERT INTO loadtest.history_chunks (tag, chunk, entries, seconds)"
                     " VALUES (%s, %s, %s, %s)",
                     (params["tag"], chunk.index, written, time.monotonic() - started))
        conn.commit()
    return written


def load(url: str, tag: int, layout: Layout, entries: int, *, end: dt.datetime | None = None,
         jobs: int = 2, chunk_accounts: int = CHUNK_ACCOUNTS,
         log: Callable[[str], None] = print) -> Loaded:
    """Write the history of data set `tag` (resuming an interrupted load) so
    that its journal holds `entries` entries; vacuum and analyse."""
    plan = Plan.of(layout, entries)
    end = end or dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
        _check_columns(conn)
        params = _params(conn, tag, plan, end)
        done = {int(r[0]) for r in conn.execute(
            "SELECT chunk FROM loadtest.history_chunks WHERE tag = %s", (tag,)).fetchall()}
    todo = [c for c in chunks(layout, chunk_accounts) if c.index not in done]
    total = len(todo) + len(done)
    log(f"history: {plan.sales} sales and {plan.recharges} recharges on {plan.cards} cards"
        f" ({entries} journal entries in all), {len(todo)} of {total} chunks to load")
    written = 0
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_load_chunk, url, params, plan, c) for c in todo]
        for n, future in enumerate(futures, 1):
            written += future.result()
            elapsed = time.monotonic() - started
            log(f"history: {n + len(done)}/{total} chunks, {written} entries in {elapsed:.0f} s"
                f" ({written / max(elapsed, 1e-9):.0f} entries/s)")
    log("history: VACUUM ANALYZE ...")
    with psycopg.connect(url, autocommit=True) as conn:
        for table in BIG_TABLES:
            conn.execute(f"VACUUM (ANALYZE) {table}".encode())
    seconds = time.monotonic() - started
    log(f"history: loaded in {seconds:.0f} s")
    return Loaded(written, len(todo), seconds)
