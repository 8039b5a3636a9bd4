"""Reads of an account's journal and holds, newest first, keyset-paged.

Report-type reads: they run on their own, never inside a money movement, so
they can later be pointed at a replica.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from fuelcard_server import errors
from fuelcard_server.db import Database

ASSET_MONEY = 1
ASSET_POINTS = 2
NO_TOKEN = 2**63 - 1

ACCOUNT_ID_SQL = "SELECT id FROM fc.accounts WHERE uid = %s::uuid AND kind <> fc.account_kind_system()"

# Two index scans (credits, debits) merged: an OR over both columns would scan
# the whole journal of a busy account.
JOURNAL_PAGE_SQL = """
    SELECT id, kind, signed, hold_uid, recharge_uid, description, fc.ts(p => created_at)
      FROM ((SELECT j.id, j.kind, j.amount AS signed, j.hold_id, j.recharge_id,
                    j.description, j.created_at
               FROM fc.journal j
              WHERE j.credit_account_id = %(account)s AND j.asset = %(asset)s
                AND j.id < %(before)s
              ORDER BY j.id DESC LIMIT %(limit)s)
            UNION ALL
            (SELECT j.id, j.kind, -j.amount, j.hold_id, j.recharge_id, j.description,
                    j.created_at
               FROM fc.journal j
              WHERE j.debit_account_id = %(account)s AND j.asset = %(asset)s
                AND j.id < %(before)s
              ORDER BY j.id DESC LIMIT %(limit)s)) moves
      LEFT JOIN LATERAL (SELECT uid::text AS hold_uid FROM fc.holds WHERE id = moves.hold_id) h ON true
      LEFT JOIN LATERAL (SELECT uid::text AS recharge_uid FROM fc.recharges
                          WHERE id = moves.recharge_id) r ON true
     ORDER BY id DESC LIMIT %(limit)s"""

# An account's holds: those reserving its money, and those its cards made
# (a SHARED member's holds reserve its parent's money).
HOLDS_PAGE_SQL = """
    SELECT h.id, fc.hold_json(h => h) FROM fc.holds h
     WHERE (h.account_id = %(account)s OR h.spender_account_id = %(account)s)
       AND h.id < %(before)s
       AND (%(state)s = 0 OR h.state = %(state)s)
     ORDER BY h.id DESC LIMIT %(limit)s"""


@dataclass(frozen=True)
class JournalLine:
    id: int
    kind: int
    signed_amount: int
    hold_id: str
    recharge_id: str
    description: str
    create_us: int


async def account_key(db: Database, account_uid: uuid.UUID) -> int:
    row = await db.fetch_one(ACCOUNT_ID_SQL, (account_uid,))
    if row is None:
        raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
    key: int = row[0]
    return key


def _page(rows: list[Any], page_size: int) -> tuple[list[Any], str]:
    if len(rows) > page_size:
        rows = rows[:page_size]
        return rows, str(rows[-1][0])
    return rows, ""


async def journal_page(db: Database, account_uid: uuid.UUID, asset: int, page_size: int,
                       before: int | None) -> tuple[list[JournalLine], str]:
    account = await account_key(db, account_uid)
    rows = await db.fetch_all(JOURNAL_PAGE_SQL, {
        "account": account, "asset": asset, "before": before or NO_TOKEN, "limit": page_size + 1})
    page, token = _page(rows, page_size)
    return [JournalLine(r[0], r[1], r[2], r[3] or "", r[4] or "", r[5], r[6]) for r in page], token


async def holds_page(db: Database, account_uid: uuid.UUID, state: int, page_size: int,
                     before: int | None) -> tuple[list[dict[str, Any]], str]:
    account = await account_key(db, account_uid)
    rows = await db.fetch_all(HOLDS_PAGE_SQL, {
        "account": account, "state": state, "before": before or NO_TOKEN,
        "limit": page_size + 1})
    page, token = _page(rows, page_size)
    return [r[1] for r in page], token
