"""The star-schema warehouse and its loader.

Facts: fact_sale (confirmed fuel sales, at the amount settled), fact_recharge,
fact_refund (refunds of recharges: paid back by the channel, debited from the
account, shortfall), fact_allocation (money a parent moved to a sub-account),
fact_points (points earned, redeemed, moved, lapsed; one row per account
side), fact_ledger (every journal entry, to reconcile with the server's
ledger).
Views: account_money (per account: recharged - refunded - spent + allocated
in - allocated out = its balance in the journal) and account_points (per
account: earned - redeemed +- moved - lapsed = its points balance).
Dimensions: dim_date (with holidays), dim_station (with coordinates),
dim_account (type, tier, fleet parent, label), dim_card, dim_product,
dim_tier.

Exactly once: `Warehouse.apply` loads a batch of consecutive events and moves
the stored cursor to the batch's last position in ONE transaction of the
store. After a crash the store holds either the whole batch and its cursor
or neither, and the sidecar resumes after the stored cursor. A batch that
does not start right after the cursor is refused (a gap or a replay is a
bug, never silently absorbed), and every fact has its natural primary key.
Backfilled events (history booked before the stream existed, written by
`fuelcard events backfill` after the live events) are booked only where the
fact is not there yet: after an upgrade whose stream was already pruned, the
backfill may repeat entries a running warehouse holds.

The store is DuckDB (a file; embedded, nothing to set up) or a schema in
PostgreSQL. The SQL here is the dialect both speak; columns are loaded with
unnest over arrays (DuckDB's executemany is ~1000x slower).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fuelcard.v1 import events_pb2

from fuelcard_analytics.calendar import date_key, holiday, local

PRODUCTS = {1: ("92#", "gasoline"), 2: ("95#", "gasoline"), 3: ("98#", "gasoline"),
            4: ("0# diesel", "diesel"), 5: ("-10# diesel", "diesel"), 6: ("gas", "gas"),
            7: ("shop", "shop")}
TIERS = {1: ("regular", "普通"), 2: ("silver", "银牌"), 3: ("gold", "金牌"), 4: ("diamond", "钻石")}

SCHEMA = [
    # 1: the first release; 2: fact_refund, fact_allocation, fact_recharge.recharge_id
    "CREATE TABLE IF NOT EXISTS warehouse_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS sidecar_cursor (
           stream VARCHAR PRIMARY KEY, position BIGINT NOT NULL, events BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dim_date (
           date_key INTEGER PRIMARY KEY, day DATE NOT NULL, year INTEGER NOT NULL,
           month INTEGER NOT NULL, dow INTEGER NOT NULL, is_weekend BOOLEAN NOT NULL,
           holiday VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dim_product (
           product INTEGER PRIMARY KEY, name VARCHAR NOT NULL, family VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dim_tier (
           tier INTEGER PRIMARY KEY, name VARCHAR NOT NULL, name_zh VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dim_station (
           station_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL,
           latitude DOUBLE PRECISION NOT NULL, longitude DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS dim_account (
           account_id VARCHAR PRIMARY KEY, account_type INTEGER NOT NULL,
           status INTEGER NOT NULL, tier INTEGER NOT NULL, parent_account_id VARCHAR NOT NULL,
           funding_mode INTEGER NOT NULL, label VARCHAR NOT NULL, opened_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS dim_card (
           card_id VARCHAR PRIMARY KEY, account_id VARCHAR NOT NULL, status INTEGER NOT NULL,
           issued_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS fact_sale (
           hold_id VARCHAR PRIMARY KEY, position BIGINT NOT NULL, date_key INTEGER NOT NULL,
           sold_at TIMESTAMP NOT NULL, station_id VARCHAR NOT NULL, product INTEGER NOT NULL,
           card_id VARCHAR NOT NULL, account_id VARCHAR NOT NULL,
           funding_account_id VARCHAR NOT NULL, amount_fen BIGINT NOT NULL,
           volume_ml BIGINT NOT NULL, unit_price_fen BIGINT NOT NULL, points BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fact_recharge (
           entry_id BIGINT PRIMARY KEY, position BIGINT NOT NULL, date_key INTEGER NOT NULL,
           booked_at TIMESTAMP NOT NULL, account_id VARCHAR NOT NULL, channel INTEGER NOT NULL,
           amount_fen BIGINT NOT NULL)""",
    # added after the first release: a store made before has it NULL on older rows
    "ALTER TABLE fact_recharge ADD COLUMN IF NOT EXISTS recharge_id VARCHAR",
    # one row per refund; debited_fen is what left the account (the journal's
    # RECHARGE_REFUND entry), shortfall_fen what the account could not cover
    """CREATE TABLE IF NOT EXISTS fact_refund (
           refund_id VARCHAR PRIMARY KEY, position BIGINT NOT NULL, date_key INTEGER NOT NULL,
           refunded_at TIMESTAMP NOT NULL, recharge_id VARCHAR NOT NULL,
           account_id VARCHAR NOT NULL, channel INTEGER NOT NULL, amount_fen BIGINT NOT NULL,
           debited_fen BIGINT NOT NULL, shortfall_fen BIGINT NOT NULL)""",
    # one row per sale refund (issue 14): its money entry (kind 10), back to
    # the account that funded the sale
    """CREATE TABLE IF NOT EXISTS fact_sale_refund (
           entry_id BIGINT PRIMARY KEY, position BIGINT NOT NULL, date_key INTEGER NOT NULL,
           booked_at TIMESTAMP NOT NULL, hold_id VARCHAR NOT NULL, account_id VARCHAR NOT NULL,
           amount_fen BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fact_allocation (
           entry_id BIGINT PRIMARY KEY, position BIGINT NOT NULL, date_key INTEGER NOT NULL,
           booked_at TIMESTAMP NOT NULL, from_account_id VARCHAR NOT NULL,
           to_account_id VARCHAR NOT NULL, amount_fen BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS fact_points (
           entry_id BIGINT NOT NULL, account_id VARCHAR NOT NULL, position BIGINT NOT NULL,
           date_key INTEGER NOT NULL, booked_at TIMESTAMP NOT NULL, kind INTEGER NOT NULL,
           points BIGINT NOT NULL, PRIMARY KEY (entry_id, account_id))""",
    """CREATE TABLE IF NOT EXISTS fact_ledger (
           entry_id BIGINT PRIMARY KEY, position BIGINT NOT NULL, booked_at TIMESTAMP NOT NULL,
           kind INTEGER NOT NULL, asset INTEGER NOT NULL, amount BIGINT NOT NULL,
           debit VARCHAR NOT NULL, credit VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tier_history (
           position BIGINT PRIMARY KEY, account_id VARCHAR NOT NULL, booked_at TIMESTAMP NOT NULL,
           tier INTEGER NOT NULL)""",
    # Every money movement of a customer account, by what it was: the
    # balance column is what the server's journal says the account holds.
    """CREATE OR REPLACE VIEW account_money AS
       SELECT account_id,
              CAST(sum(recharged) AS BIGINT) AS recharged_fen,
              CAST(sum(refunded) AS BIGINT) AS refunded_fen,
              CAST(sum(spent) AS BIGINT) AS spent_fen,
              CAST(sum(allocated_in) AS BIGINT) AS allocated_in_fen,
              CAST(sum(allocated_out) AS BIGINT) AS allocated_out_fen,
              CAST(sum(recharged - refunded - spent + allocated_in - allocated_out) AS BIGINT)
                  AS balance_fen
         FROM (SELECT account_id, amount_fen AS recharged, 0 AS refunded, 0 AS spent,
                      0 AS allocated_in, 0 AS allocated_out FROM fact_recharge
               UNION ALL
               SELECT account_id, 0, debited_fen, 0, 0, 0 FROM fact_refund
               UNION ALL
               SELECT funding_account_id, 0, 0, amount_fen, 0, 0 FROM fact_sale
               UNION ALL
               -- spent is net of the sales' refunds
               SELECT account_id, 0, 0, -amount_fen, 0, 0 FROM fact_sale_refund
               UNION ALL
               SELECT to_account_id, 0, 0, 0, amount_fen, 0 FROM fact_allocation
               UNION ALL
               SELECT from_account_id, 0, 0, 0, 0, amount_fen FROM fact_allocation) m
        GROUP BY account_id""",
    # Points by account (fact_points has one signed row per account side).
    """CREATE OR REPLACE VIEW account_points AS
       SELECT account_id,
              CAST(sum(CASE WHEN kind = 3 THEN points ELSE 0 END) AS BIGINT) AS earned,
              CAST(-sum(CASE WHEN kind = 4 THEN points ELSE 0 END) AS BIGINT) AS redeemed,
              CAST(sum(CASE WHEN kind = 6 THEN points ELSE 0 END) AS BIGINT) AS moved,
              CAST(-sum(CASE WHEN kind = 7 THEN points ELSE 0 END) AS BIGINT) AS lapsed,
              CAST(sum(points) AS BIGINT) AS balance
         FROM fact_points GROUP BY account_id""",
]


ALLOCATIONS_FROM_LEDGER = """
    INSERT INTO fact_allocation (entry_id, position, date_key, booked_at, from_account_id,
                                 to_account_id, amount_fen)
    SELECT entry_id, position,
           CAST(EXTRACT(year FROM booked_at) * 10000 + EXTRACT(month FROM booked_at) * 100
                + EXTRACT(day FROM booked_at) AS INTEGER),
           booked_at, debit, credit, amount
      FROM fact_ledger WHERE kind = 5
    ON CONFLICT DO NOTHING"""


class Store(Protocol):
    """The few things the warehouse needs from a database."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def close(self) -> None: ...


class DuckDbStore:
    def __init__(self, path: str) -> None:
        import duckdb

        self.conn = duckdb.connect(path)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.conn.execute(sql, list(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(sql, list(params)).fetchall())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


_QMARK = re.compile(r"\?")


class PostgresStore:
    """A schema of a PostgreSQL database (e.g. a reporting replica's primary
    or a separate database), never the fuelcard server's fc schema."""

    def __init__(self, url: str, schema: str) -> None:
        import psycopg
        from psycopg import sql

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema) or schema == "fc":
            raise ValueError(f"bad schema name {schema!r}")
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        self.conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.conn.execute(_QMARK.sub("%s", sql).encode(), list(params))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.conn.execute(_QMARK.sub("%s", sql).encode(), list(params)).fetchall())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()


def open_store(spec: str, schema: str = "analytics") -> Store:
    """A PostgreSQL URL (postgresql://...) or conninfo ("dbname=... host=..."),
    or a DuckDB file path."""
    if spec.startswith(("postgresql://", "postgres://")) or "dbname=" in spec:
        return PostgresStore(spec, schema)
    return DuckDbStore(spec)


class CursorMismatch(RuntimeError):
    """A batch that does not continue the stored cursor."""


@dataclass
class _Rows:
    """Columns of one table's new rows."""

    columns: tuple[str, ...]
    values: list[list[Any]] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        if not self.values:
            self.values = [[] for _ in self.columns]
        for column, value in zip(self.values, row, strict=True):
            column.append(value)

    def __len__(self) -> int:
        return len(self.values[0]) if self.values else 0


_TYPES = {"BIGINT", "INTEGER", "VARCHAR", "TIMESTAMP", "DOUBLE PRECISION", "BOOLEAN", "DATE"}


def _ts(stamp: Any) -> dt.datetime:
    """A protobuf Timestamp as business-local naive time."""
    return local(stamp.ToDatetime(tzinfo=dt.UTC))


class Warehouse:
    def __init__(self, store: Store, stream: str = "fuelcard") -> None:
        self.store = store
        self.stream = stream
        for statement in SCHEMA:
            store.execute(statement)
        with store.transaction():
            store.execute(
                "INSERT INTO dim_product (product, name, family)"
                " SELECT * FROM (SELECT unnest(?::INTEGER[]), unnest(?::VARCHAR[]),"
                " unnest(?::VARCHAR[])) ON CONFLICT (product) DO NOTHING",
                [list(PRODUCTS), [v[0] for v in PRODUCTS.values()],
                 [v[1] for v in PRODUCTS.values()]])
            store.execute(
                "INSERT INTO dim_tier (tier, name, name_zh)"
                " SELECT * FROM (SELECT unnest(?::INTEGER[]), unnest(?::VARCHAR[]),"
                " unnest(?::VARCHAR[])) ON CONFLICT (tier) DO NOTHING",
                [list(TIERS), [v[0] for v in TIERS.values()], [v[1] for v in TIERS.values()]])
            store.execute("INSERT INTO sidecar_cursor (stream, position, events) VALUES (?, 0, 0)"
                          " ON CONFLICT (stream) DO NOTHING", [stream])
            version = store.query("SELECT version FROM warehouse_version")
            if not version or int(version[0][0]) < 2:
                # A store made before fact_allocation: its allocations were
                # booked in fact_ledger only (refunds come back with the
                # server's backfill of refund events).
                store.execute(ALLOCATIONS_FROM_LEDGER)
                store.execute("DELETE FROM warehouse_version")
                store.execute("INSERT INTO warehouse_version (version) VALUES (2)")

    def cursor(self) -> int:
        rows = self.store.query("SELECT position FROM sidecar_cursor WHERE stream = ?",
                                [self.stream])
        return int(rows[0][0])

    def apply(self, events: Sequence[events_pb2.Event]) -> int:
        """Load consecutive events and advance the cursor, atomically; the
        new cursor."""
        if not events:
            return self.cursor()
        first, last = events[0].position, events[-1].position
        if last - first + 1 != len(events):
            raise CursorMismatch(f"events {first}..{last} are not consecutive")
        batch = _Batch()
        for e in events:
            batch.add(e)
        with self.store.transaction():
            rows = self.store.query("SELECT position FROM sidecar_cursor WHERE stream = ?",
                                    [self.stream])
            if int(rows[0][0]) != first - 1:
                raise CursorMismatch(f"stored cursor {rows[0][0]}, batch starts at {first}")
            batch.write(self.store)
            self.store.execute(
                "UPDATE sidecar_cursor SET position = ?, events = events + ? WHERE stream = ?",
                [last, len(events), self.stream])
        return last


_INSERTS: dict[str, tuple[tuple[str, str], ...]] = {
    "fact_sale": (("hold_id", "VARCHAR"), ("position", "BIGINT"), ("date_key", "INTEGER"),
                  ("sold_at", "TIMESTAMP"), ("station_id", "VARCHAR"), ("product", "INTEGER"),
                  ("card_id", "VARCHAR"), ("account_id", "VARCHAR"),
                  ("funding_account_id", "VARCHAR"), ("amount_fen", "BIGINT"),
                  ("volume_ml", "BIGINT"), ("unit_price_fen", "BIGINT"), ("points", "BIGINT")),
    "fact_recharge": (("entry_id", "BIGINT"), ("position", "BIGINT"), ("date_key", "INTEGER"),
                      ("booked_at", "TIMESTAMP"), ("account_id", "VARCHAR"), ("channel", "INTEGER"),
                      ("amount_fen", "BIGINT"), ("recharge_id", "VARCHAR")),
    "fact_refund": (("refund_id", "VARCHAR"), ("position", "BIGINT"), ("date_key", "INTEGER"),
                    ("refunded_at", "TIMESTAMP"), ("recharge_id", "VARCHAR"),
                    ("account_id", "VARCHAR"), ("channel", "INTEGER"), ("amount_fen", "BIGINT"),
                    ("debited_fen", "BIGINT"), ("shortfall_fen", "BIGINT")),
    "fact_sale_refund": (("entry_id", "BIGINT"), ("position", "BIGINT"), ("date_key", "INTEGER"),
                         ("booked_at", "TIMESTAMP"), ("hold_id", "VARCHAR"),
                         ("account_id", "VARCHAR"), ("amount_fen", "BIGINT")),
    "fact_allocation": (("entry_id", "BIGINT"), ("position", "BIGINT"), ("date_key", "INTEGER"),
                        ("booked_at", "TIMESTAMP"), ("from_account_id", "VARCHAR"),
                        ("to_account_id", "VARCHAR"), ("amount_fen", "BIGINT")),
    "fact_points": (("entry_id", "BIGINT"), ("account_id", "VARCHAR"), ("position", "BIGINT"),
                    ("date_key", "INTEGER"), ("booked_at", "TIMESTAMP"), ("kind", "INTEGER"),
                    ("points", "BIGINT")),
    "fact_ledger": (("entry_id", "BIGINT"), ("position", "BIGINT"), ("booked_at", "TIMESTAMP"),
                    ("kind", "INTEGER"), ("asset", "INTEGER"), ("amount", "BIGINT"),
                    ("debit", "VARCHAR"), ("credit", "VARCHAR")),
    "tier_history": (("position", "BIGINT"), ("account_id", "VARCHAR"), ("booked_at", "TIMESTAMP"),
                     ("tier", "INTEGER")),
}
# Dimensions: the latest version of a row in the batch replaces the stored one.
_UPSERTS: dict[str, tuple[tuple[str, str], ...]] = {
    "dim_date": (("date_key", "INTEGER"), ("day", "DATE"), ("year", "INTEGER"),
                 ("month", "INTEGER"), ("dow", "INTEGER"), ("is_weekend", "BOOLEAN"),
                 ("holiday", "VARCHAR")),
    "dim_station": (("station_id", "VARCHAR"), ("name", "VARCHAR"),
                    ("latitude", "DOUBLE PRECISION"), ("longitude", "DOUBLE PRECISION")),
    "dim_account": (("account_id", "VARCHAR"), ("account_type", "INTEGER"), ("status", "INTEGER"),
                    ("tier", "INTEGER"), ("parent_account_id", "VARCHAR"),
                    ("funding_mode", "INTEGER"), ("label", "VARCHAR"), ("opened_at", "TIMESTAMP")),
    "dim_card": (("card_id", "VARCHAR"), ("account_id", "VARCHAR"), ("status", "INTEGER"),
                 ("issued_at", "TIMESTAMP")),
}


def _unnest_sql(table: str, columns: tuple[tuple[str, str], ...]) -> str:
    for _, kind in columns:
        assert kind in _TYPES
    names = ", ".join(c for c, _ in columns)
    arrays = ", ".join(f"unnest(?::{kind}[])" for _, kind in columns)
    return f"INSERT INTO {table} ({names}) SELECT * FROM (SELECT {arrays}) AS batch"


class _Batch:
    def __init__(self) -> None:
        self.live = {t: _Rows(tuple(c for c, _ in cols)) for t, cols in _INSERTS.items()}
        # facts of backfilled events: booked unless already there
        self.backfilled = {t: _Rows(tuple(c for c, _ in cols)) for t, cols in _INSERTS.items()}
        self.facts = self.live
        self.dims: dict[str, dict[Any, tuple[Any, ...]]] = {t: {} for t in _UPSERTS}

    def _day(self, when: dt.datetime) -> int:
        day = when.date()
        key = date_key(day)
        if key not in self.dims["dim_date"]:
            self.dims["dim_date"][key] = (key, day, day.year, day.month, day.isoweekday(),
                                          day.isoweekday() >= 6, holiday(day))
        return key

    def add(self, e: events_pb2.Event) -> None:
        kind = e.WhichOneof("payload")
        at = _ts(e.occur_time)
        self.facts = self.backfilled if e.backfilled else self.live
        if kind == "ledger_entry":
            self._entry(e.position, at, e.ledger_entry)
        elif kind == "hold":
            h = e.hold
            if h.state == 2:  # CONFIRMED: a sale
                sold = _ts(h.close_time) if h.HasField("close_time") else at
                self.facts["fact_sale"].add(
                    h.hold_id, e.position, self._day(sold), sold, h.station_id, h.product,
                    h.card_id, h.spender_account_id or h.account_id, h.account_id, h.settled_fen,
                    h.volume_ml, h.unit_price_fen, h.points_earned)
        elif kind == "account":
            a = e.account
            opened = _ts(a.create_time) if a.HasField("create_time") else None
            self.dims["dim_account"][a.account_id] = (
                a.account_id, a.type, a.status, a.tier, a.parent_account_id, a.funding_mode,
                a.label, opened)
            self.facts["tier_history"].add(e.position, a.account_id, at, a.tier)
        elif kind == "card":
            c = e.card
            issued = _ts(c.create_time) if c.HasField("create_time") else None
            self.dims["dim_card"][c.card_id] = (c.card_id, c.account_id, c.status, issued)
        elif kind == "station":
            s = e.station.station
            self.dims["dim_station"][s.station_id] = (s.station_id, s.name, s.location.latitude,
                                                      s.location.longitude)
        elif kind == "refund":
            f = e.refund
            refunded = _ts(f.create_time) if f.HasField("create_time") else at
            self.facts["fact_refund"].add(
                f.refund_id, e.position, self._day(refunded), refunded, f.recharge_id,
                f.account_id, f.channel, f.amount_fen, f.debited_fen, f.shortfall_fen)
        # other kinds (a newer server's): skipped, the cursor still moves on

    def _entry(self, position: int, at: dt.datetime, j: events_pb2.LedgerEntryEvent) -> None:
        debit = j.debit_account_id or j.debit_system_code
        credit = j.credit_account_id or j.credit_system_code
        self.facts["fact_ledger"].add(j.entry_id, position, at, j.kind, j.asset, j.amount,
                                      debit, credit)
        key = self._day(at)
        if j.kind == events_pb2.LEDGER_ENTRY_KIND_RECHARGE and j.credit_account_id:
            self.facts["fact_recharge"].add(j.entry_id, position, key, at, j.credit_account_id,
                                            j.channel, j.amount, j.recharge_id)
        elif j.kind == events_pb2.LEDGER_ENTRY_KIND_ALLOCATION:
            self.facts["fact_allocation"].add(j.entry_id, position, key, at, debit, credit,
                                              j.amount)
        elif (j.kind == events_pb2.LEDGER_ENTRY_KIND_SALE_REFUND
              and j.asset == events_pb2.ASSET_MONEY):
            self.facts["fact_sale_refund"].add(j.entry_id, position, key, at, j.hold_id,
                                               j.credit_account_id, j.amount)
        # RECHARGE_REFUND entries are booked from the refund's own event
        # (fact_refund.debited_fen is their amount), sales from the hold's.
        if j.asset == events_pb2.ASSET_POINTS:
            if j.credit_account_id:
                self.facts["fact_points"].add(j.entry_id, j.credit_account_id, position, key, at,
                                              j.kind, j.amount)
            if j.debit_account_id:
                self.facts["fact_points"].add(j.entry_id, j.debit_account_id, position, key, at,
                                              j.kind, -j.amount)

    def write(self, store: Store) -> None:
        for table, rows in self.dims.items():
            if not rows:
                continue
            cols = _UPSERTS[table]
            values = list(zip(*rows.values(), strict=True))
            key = cols[0][0]
            updates = ", ".join(f"{c} = excluded.{c}" for c, _ in cols[1:])
            store.execute(_unnest_sql(table, cols)
                          + f" ON CONFLICT ({key}) DO UPDATE SET {updates}",
                          [list(v) for v in values])
        for table, fact in self.live.items():
            if len(fact):
                store.execute(_unnest_sql(table, _INSERTS[table]), fact.values)
        for table, fact in self.backfilled.items():
            if len(fact):
                store.execute(_unnest_sql(table, _INSERTS[table]) + " ON CONFLICT DO NOTHING",
                              fact.values)
