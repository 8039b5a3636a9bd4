"""Spending controls on every card of a data set (--controls), so that the
authorize path pays for what a real fleet card costs: a per-transaction,
daily and monthly cap on the card and on its account (read against the usage
counters), a geo-fence checked against the station's location, a product
list and an hours window. None of them binds: the caps are far above what
the generator spends, the fence contains the station, every product and
hour is allowed. Only their cost is measured.

Controls are on by default (as on a production fleet); a run without them
(--no-controls) clears them from its data set, which an earlier run may have
set. Both touch only the rows not already in the wanted state: a run on a
reused data set then writes nothing before it measures (no dead rows for
autovacuum to clean up during the window)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

# Kunming; the fence is a 50 km circle around the run's station.
STATION_LAT, STATION_LON = 25.0389, 102.7183
FENCE = '[{"circle": [25.0389, 102.7183, 50000]}]'
CAP_TXN_FEN = 5_000_000
CAP_DAILY_FEN = 10**12
CAP_MONTHLY_FEN = 10**13

CARDS_SQL = """
    UPDATE fc.cards c
       SET limit_txn_fen = %(txn)s, limit_daily_fen = %(daily)s, limit_monthly_fen = %(monthly)s,
           scope_fences = %(fence)s::jsonb, scope_products = '{1,2,3,4,5,6,7}',
           scope_hours = '{0,1440}'
      FROM loadtest.cards l
     WHERE l.tag = %(tag)s AND l.pan_index = c.pan_index
       AND (c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen, c.scope_fences,
            c.scope_products, c.scope_hours)
           IS DISTINCT FROM (%(txn)s::bigint, %(daily)s::bigint, %(monthly)s::bigint,
                             %(fence)s::jsonb, '{1,2,3,4,5,6,7}'::smallint[], '{0,1440}'::integer[])"""
ACCOUNTS_SQL = """
    UPDATE fc.accounts a
       SET limit_txn_fen = %(txn)s, limit_daily_fen = %(daily)s, limit_monthly_fen = %(monthly)s
     WHERE a.id IN (SELECT c.account_id FROM fc.cards c
                      JOIN loadtest.cards l ON l.pan_index = c.pan_index WHERE l.tag = %(tag)s)
       AND (a.limit_txn_fen, a.limit_daily_fen, a.limit_monthly_fen)
           IS DISTINCT FROM (%(txn)s::bigint, %(daily)s::bigint, %(monthly)s::bigint)"""
CLEAR_CARDS_SQL = """
    UPDATE fc.cards c
       SET limit_txn_fen = NULL, limit_daily_fen = NULL, limit_monthly_fen = NULL,
           scope_fences = NULL, scope_products = NULL, scope_hours = NULL
      FROM loadtest.cards l
     WHERE l.tag = %(tag)s AND l.pan_index = c.pan_index
       AND num_nonnulls(c.limit_txn_fen, c.limit_daily_fen, c.limit_monthly_fen, c.scope_fences,
                        c.scope_products, c.scope_hours) > 0"""
CLEAR_ACCOUNTS_SQL = """
    UPDATE fc.accounts a
       SET limit_txn_fen = NULL, limit_daily_fen = NULL, limit_monthly_fen = NULL
     WHERE a.id IN (SELECT c.account_id FROM fc.cards c
                      JOIN loadtest.cards l ON l.pan_index = c.pan_index WHERE l.tag = %(tag)s)
       AND num_nonnulls(a.limit_txn_fen, a.limit_daily_fen, a.limit_monthly_fen) > 0"""
STATION_SQL = """
    INSERT INTO fc.stations (station_id, name, latitude, longitude)
    VALUES (%s, 'loadtest station', %s, %s) ON CONFLICT (station_id) DO NOTHING"""


def apply(url: str, tag: int, station_id: str, log: Callable[[str], None] = print) -> None:
    params = {"txn": CAP_TXN_FEN, "daily": CAP_DAILY_FEN, "monthly": CAP_MONTHLY_FEN,
              "fence": FENCE, "tag": tag}
    with psycopg.connect(url) as conn:
        conn.execute(STATION_SQL, (station_id, STATION_LAT, STATION_LON))
        cards = conn.execute(CARDS_SQL, params).rowcount
        accounts = conn.execute(ACCOUNTS_SQL, params).rowcount
        conn.commit()
    log(f"controls: caps, geo-fence, products and hours on the data set's cards ({cards} changed),"
        f" caps on its accounts ({accounts} changed); station {station_id} registered")


def clear(url: str, tag: int, log: Callable[[str], None] = print) -> None:
    """No controls on the data set's cards and accounts."""
    with psycopg.connect(url) as conn:
        cards = conn.execute(CLEAR_CARDS_SQL, {"tag": tag}).rowcount
        accounts = conn.execute(CLEAR_ACCOUNTS_SQL, {"tag": tag}).rowcount
        conn.commit()
    if cards or accounts:
        log(f"controls: cleared from {cards} cards and {accounts} accounts (--no-controls)")
