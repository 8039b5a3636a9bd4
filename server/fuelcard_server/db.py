"""The database edge: a connection pool and one call per operation.

Every mutating RPC is one `SELECT fc.<operation>(...)` round trip: the
function checks idempotency, takes the advisory lock, decides and writes, and
returns its answer as jsonb. PostgreSQL errors are translated into ApiErrors
here, so no handler ever sees a psycopg exception.
"""

from __future__ import annotations

import logging
from typing import Any, LiteralString

import grpc
import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from fuelcard_server import errors

log = logging.getLogger(__name__)

Params = tuple[Any, ...] | dict[str, Any]

# Unique violations that mean "a concurrent duplicate won the race": the
# transaction rolled back, and running it again returns the winner's answer.
# cards_pan_index_key: two IssueCards of one number (a duplicate IssueCard
# derives the same generated number) - the rerun replays or says CARD_NUMBER_IN_USE.
_RACE_CONSTRAINTS = frozenset({"idempotency_keys_pkey", "one_recharge_per_channel_txn",
                               "cards_pan_index_key",
                               # two refunds of one channel refund id on two accounts' locks
                               "one_refund_per_channel_refund"})
_RACE_RETRIES = 3


def translate(exc: psycopg.Error) -> errors.ApiError:
    diag = exc.diag
    state = exc.sqlstate or ""
    reason = diag.message_primary or "INTERNAL"
    field = diag.message_detail or ""
    if state == "FCNF0":
        return errors.not_found(reason, field.replace("_number", "").replace("_id", "") or "object")
    if state == "FCFP0":
        return errors.failed_precondition(reason)
    if state == "FCPD0":
        return errors.permission_denied(reason)
    if state == "FCUA0":
        return errors.unauthenticated(reason, "the request's authentication was refused")
    if state == "FCIA0":
        return errors.invalid([errors.FieldViolation(field, reason.lower().replace("_", " "),
                                                     reason)])
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return errors.ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                               "the database work was cancelled at the deadline")
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown
                  | psycopg.errors.CannotConnectNow):
        return errors.unavailable("DATABASE_UNAVAILABLE", "the database is unavailable")
    log.error("unexpected database error sqlstate=%s class=%s constraint=%s", state,
              type(exc).__name__, diag.constraint_name)
    return errors.internal()


class Database:
    def __init__(self, url: str, *, min_size: int, max_size: int, timeout_s: float) -> None:
        self.url = url
        self.pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            open=False,
            kwargs={"autocommit": True},
            # bounded: callers past this many waiting get UNAVAILABLE at once
            max_waiting=max_size * 64,
            name="fuelcard",
        )

    async def open(self, wait_s: float = 30.0) -> None:
        await self.pool.open(wait=True, timeout=wait_s)

    async def close(self) -> None:
        await self.pool.close()

    async def call(self, sql: LiteralString, params: tuple[Any, ...]) -> dict[str, Any]:
        """Run one statement returning a single jsonb value."""
        for attempt in range(_RACE_RETRIES):
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(sql, params, prepare=True)
                    row = await cur.fetchone()
            except psycopg.errors.UniqueViolation as exc:
                if exc.diag.constraint_name in _RACE_CONSTRAINTS and attempt + 1 < _RACE_RETRIES:
                    continue
                raise translate(exc) from None
            except PoolTimeout:  # an OperationalError too: catch it first
                raise errors.unavailable("DATABASE_BUSY",
                                         "no database connection became free in time") from None
            except psycopg.Error as exc:
                raise translate(exc) from None
            assert row is not None and row[0] is not None, "fc functions always answer"
            result: dict[str, Any] = row[0]
            return result
        raise AssertionError("unreachable")

    async def fetch_all(self, sql: LiteralString, params: Params) -> list[tuple[Any, ...]]:
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, params, prepare=True)
                return await cur.fetchall()
        except PoolTimeout:  # an OperationalError too: catch it first
            raise errors.unavailable("DATABASE_BUSY",
                                     "no database connection became free in time") from None
        except psycopg.Error as exc:
            raise translate(exc) from None

    async def fetch_one(self, sql: LiteralString, params: Params) -> tuple[Any, ...] | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None
