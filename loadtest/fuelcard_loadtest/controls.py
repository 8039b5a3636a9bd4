"""Spending controls on every card of a data set (--controls), so that the
authorize path pays for what a real fleet card costs: a per-transaction,
daily and monthly cap on the card and on its account (read against the usage
counters), a geo-fence checked against the station's location, a product
list and an hours window. None of them binds: the caps are far above what
the generator spends, the fence contains the station, every product and
hour is allowed. Only their cost is measured."""

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
     WHERE l.tag = %(tag)s AND l.pan_index = c.pan_index"""
ACCOUNTS_SQL = """
    UPDATE fc.accounts a
       SET limit_txn_fen = %(txn)s, limit_daily_fen = %(daily)s, limit_monthly_fen = %(monthly)s
     WHERE a.id IN (SELECT c.account_id FROM fc.cards c
                      JOIN loadtest.cards l ON l.pan_index = c.pan_index WHERE l.tag = %(tag)s)"""
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
    log(f"controls: caps, geo-fence, products and hours on {cards} cards, caps on"
        f" {accounts} accounts; station {station_id} registered")
