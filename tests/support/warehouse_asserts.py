"""The analytics warehouse reconciles with the server's journal, account by
account: its facts (sales, recharges, refunds, allocations, points) net to
what the journal says each account holds."""

from __future__ import annotations

from typing import Any

from fuelcard_analytics.warehouse import Store

from tests.support.ledger_asserts import Conn

# Per customer account, from the journal: recharged (kind 1 credits),
# refunded (kind 8 debits), spent (kind 2 debits less kind 10 money credits:
# sales net of their refunds), allocated in / out
# (kind 5), the money balance and the points balance.
JOURNAL_SQL = """
SELECT a.uid::text,
       coalesce(sum(j.amount) FILTER (WHERE j.kind = 1 AND j.credit_account_id = a.id), 0),
       coalesce(sum(j.amount) FILTER (WHERE j.kind = 8 AND j.debit_account_id = a.id), 0),
       coalesce(sum(j.amount) FILTER (WHERE j.kind = 2 AND j.debit_account_id = a.id), 0)
       - coalesce(sum(j.amount) FILTER (WHERE j.kind = 10 AND j.asset = 1
                                          AND j.credit_account_id = a.id), 0),
       coalesce(sum(j.amount) FILTER (WHERE j.kind = 5 AND j.credit_account_id = a.id), 0),
       coalesce(sum(j.amount) FILTER (WHERE j.kind = 5 AND j.debit_account_id = a.id), 0),
       coalesce(sum(CASE WHEN j.credit_account_id = a.id THEN j.amount ELSE -j.amount END)
                FILTER (WHERE j.asset = 1), 0),
       coalesce(sum(CASE WHEN j.credit_account_id = a.id THEN j.amount ELSE -j.amount END)
                FILTER (WHERE j.asset = 2), 0),
       a.balance_fen, a.points_balance
  FROM fc.accounts a
  JOIN fc.journal j ON a.id IN (j.debit_account_id, j.credit_account_id)
 WHERE a.kind <> 100
 GROUP BY a.id"""

WAREHOUSE_SQL = """
SELECT coalesce(m.account_id, p.account_id), coalesce(m.recharged_fen, 0),
       coalesce(m.refunded_fen, 0), coalesce(m.spent_fen, 0), coalesce(m.allocated_in_fen, 0),
       coalesce(m.allocated_out_fen, 0), coalesce(m.balance_fen, 0), coalesce(p.balance, 0)
  FROM account_money m FULL OUTER JOIN account_points p ON p.account_id = m.account_id"""


def journal_by_account(db: Conn) -> dict[str, tuple[int, ...]]:
    """account uid -> (recharged, refunded, spent, allocated in, allocated
    out, money balance, points balance), checked against the stored balances."""
    out = {}
    for row in db.execute(JOURNAL_SQL).fetchall():
        values = tuple(int(v) for v in row[1:])
        assert values[5:7] == values[7:9], f"journal and stored balance differ for {row[0]}"
        out[str(row[0])] = values[:7]
    return out


def warehouse_by_account(store: Store) -> dict[str, tuple[int, ...]]:
    rows: list[tuple[Any, ...]] = store.query(WAREHOUSE_SQL)
    return {str(r[0]): tuple(int(v) for v in r[1:]) for r in rows}


def assert_warehouse_matches_journal(store: Store, db: Conn) -> dict[str, tuple[int, ...]]:
    """Every account's facts equal its journal; returns the journal's view."""
    journal = journal_by_account(db)
    warehouse = warehouse_by_account(store)
    differ = {a: (journal.get(a), warehouse.get(a)) for a in journal.keys() | warehouse.keys()
              if journal.get(a) != warehouse.get(a)}
    assert not differ, differ
    # and the refunds, one fact each, shortfalls included
    refunds = {(str(r[0]), int(r[1]), int(r[2])) for r in db.execute(
        "SELECT uid::text, amount_fen, debited_fen FROM fc.refunds").fetchall()}
    facts = {(str(r[0]), int(r[1]), int(r[2])) for r in store.query(
        "SELECT refund_id, amount_fen, debited_fen FROM fact_refund")}
    assert facts == refunds
    sales = db.execute("SELECT count(*), coalesce(sum(settled_fen), 0) FROM fc.holds"
                       " WHERE state = 2").fetchone()
    assert sales is not None
    assert [tuple(int(v) for v in r) for r in store.query(
        "SELECT count(*), coalesce(sum(amount_fen), 0) FROM fact_sale")] == [tuple(sales)]
    return journal
