"""The database edge: a connection pool and one call per operation.

Every mutating RPC is one `SELECT fc.<operation>(...)` round trip: the
function checks idempotency, takes the advisory lock, decides and writes, and
returns its answer as jsonb. PostgreSQL errors are translated into ApiErrors
here, so no handler ever sees a psycopg exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from typing import Any, LiteralString

import grpc
import psycopg
import psycopg.errors
from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from fuelcard_server import errors

log = logging.getLogger(__name__)

# Positional (`%s`) or named (`%(name)s`: every fc.* call passes its
# arguments by name, tests/test_sql_calls.py).
Params = tuple[Any, ...] | Mapping[str, Any]

# Unique violations that mean "a concurrent duplicate won the race": the
# transaction rolled back, and running it again returns the winner's answer.
# cards_pan_index_key: two IssueCards of one number (a duplicate IssueCard
# derives the same generated number) - the rerun replays or says CARD_NUMBER_IN_USE.
_RACE_CONSTRAINTS = frozenset({"idempotency_keys_pkey", "one_recharge_per_channel_txn",
                               "cards_pan_index_key",
                               # two refunds of one channel refund id on two accounts' locks
                               "one_refund_per_channel_refund"})
_RACE_RETRIES = 3

# A span per statement, named for the fc.* function or table it touches
# (computed once per statement text).
_SPAN_NAMES: dict[str, str] = {}
_FIRST_OBJECT = re.compile(r"\b(fc\.\w+|pg_\w+)")
# Without tracing, no span machinery at all (not even a no-op span).
_NO_SPAN = contextlib.nullcontext()


def span_name(sql: str) -> str:
    name = _SPAN_NAMES.get(sql)
    if name is None:
        found = _FIRST_OBJECT.search(sql)
        name = _SPAN_NAMES[sql] = "db " + (found.group(1) if found else "query")
    return name


def tracing_on(tracer: trace.Tracer) -> bool:
    return not isinstance(tracer, trace.NoOpTracer)


def _span(tracer: trace.Tracer | None, sql: str) -> contextlib.AbstractContextManager[object]:
    # A child span only under a span that is recorded (sampled): an unsampled
    # RPC costs no span per statement.
    if tracer is None or not trace.get_current_span().is_recording():
        return _NO_SPAN
    return tracer.start_as_current_span(span_name(sql), kind=trace.SpanKind.CLIENT)


# The refusals worth remembering are those of an idempotent call: one that
# names its caller, request_id and fingerprint (and its time, for the key's
# retention). The operation the key is filed under is the function called
# with them, e.g. "confirm" for fc.confirm (what fc.remember files its
# answers under, so fc.replay_guarded classes both alike).
_KEY_PARAMS = ("caller", "request_id", "request_hash", "now")
_IDEMPOTENT_CALL = re.compile(
    r"\bfc\.(\w+)\(p_caller => %\(caller\)s, p_request_id => %\(request_id\)s,"
    r" p_request_hash => %\(request_hash\)s")
_OPERATIONS: dict[str, str | None] = {}
REMEMBER_REFUSAL_SQL = (
    "SELECT fc.remember_refusal(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_operation => %(operation)s, p_request_hash => %(request_hash)s,"
    " p_sqlstate => %(sqlstate)s, p_reason => %(reason)s, p_field => %(field)s,"
    " p_now => %(now)s::timestamptz)")


def idempotent_operation(sql: str) -> str | None:
    """The operation of an idempotent fc.* call (None: not one)."""
    if sql not in _OPERATIONS:
        found = _IDEMPOTENT_CALL.search(sql)
        _OPERATIONS[sql] = found.group(1) if found else None
    return _OPERATIONS[sql]


# When a statement is run again (once, on another pooled connection): only
# when the link broke, so the statement may have died with it, or when the
# server rolled the transaction back for a concurrency reason (class 40:
# deadlock victim, serialisation failure) - both safe, as every fc.*
# function is idempotent on its request_id. psycopg raises OperationalError
# for these but also for our own refusals (class FC is unknown to it and
# maps to OperationalError) and for deadline cancels (57014); running those
# again made every refused payment cost two statements.
_LINK_LOST_STATES = frozenset({"57P01", "57P02", "57P03"})  # shutdown, crash, starting


def may_run_again(exc: psycopg.Error) -> bool:
    """True for a broken link (no SQLSTATE: the client lost it; class 08;
    the server going down) or a concurrency rollback (class 40); False for
    a statement the database refused."""
    state = exc.sqlstate
    return (state is None or state.startswith(("08", "40"))
            or state in _LINK_LOST_STATES)


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
        # DETAIL names the field, or several, one a line (a batch's lines that each break
        # the same rule): one violation each.
        return errors.invalid([errors.FieldViolation(f, reason.lower().replace("_", " "), reason)
                               for f in field.split("\n")])
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return errors.ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                               "the database work was cancelled at the deadline")
    # ReadOnlySqlTransaction: a write on a node that is no longer the
    # primary (a failover demoted it under a pooled connection); it did not
    # run, and the caller may retry once health says SERVING again.
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown
                  | psycopg.errors.CannotConnectNow | psycopg.errors.ReadOnlySqlTransaction):
        return errors.unavailable("DATABASE_UNAVAILABLE", "the database is unavailable")
    log.error("unexpected database error sqlstate=%s class=%s constraint=%s", state,
              type(exc).__name__, diag.constraint_name)
    return errors.internal()


class PooledConnection(psycopg.AsyncConnection[tuple[Any, ...]]):
    """A connection of a Database's pool. It keeps one cursor for the pool's
    one-statement calls: `conn.execute` made a cursor per statement (its own
    adapters map and query state), about a quarter of the client CPU psycopg
    spent per call. A cursor is reset by each execute; it lives and dies with
    its connection."""

    _statements: psycopg.AsyncCursor[tuple[Any, ...]] | None = None

    def statements(self) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        cur = self._statements
        if cur is None or cur.closed:
            cur = self._statements = self.cursor()
        return cur


class Database:
    """A pool and the calls through it.

    `available` is the health probe's verdict (health.py): while it says the
    database is down, calls fail at once with UNAVAILABLE instead of each
    waiting out the pool timeout; the probe notices the database's return.
    """

    def __init__(self, url: str, *, min_size: int, max_size: int, timeout_s: float,
                 connect_timeout_s: float = 3.0, name: str = "fuelcard",
                 tracer: trace.Tracer | None = None, read_only: bool = False) -> None:
        self.url = url
        self.name = name
        # Only reads go through this pool: any statement may be retried.
        self.read_only = read_only
        self.available = True
        # What calls are told while `available` is False.
        self.unavailable_reason = ("DATABASE_UNAVAILABLE", "the database is unavailable")
        self.tracer = tracer if tracer is not None and tracing_on(tracer) else None
        self._pool_args: dict[str, Any] = dict(
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout_s)),
                    "application_name": name},
            # bounded: callers past this many waiting get UNAVAILABLE at once
            max_waiting=max_size * 64,
            # keep trying to reconnect while the database is away
            reconnect_timeout=24 * 3600.0,
            name=name,
            connection_class=PooledConnection,
        )
        self.connect_timeout_s = connect_timeout_s
        self.pool: AsyncConnectionPool[PooledConnection] = AsyncConnectionPool(url, **self._pool_args)
        # Old pools being closed in the background after renew().
        self._retiring: set[asyncio.Task[None]] = set()

    def refuse(self, reason: str, message: str) -> None:
        """Fail every call at once with UNAVAILABLE `reason` until resume()."""
        self.unavailable_reason = (reason, message)
        self.available = False

    def resume(self) -> None:
        self.available = True

    def _down(self) -> errors.ApiError:
        return errors.unavailable(*self.unavailable_reason)

    def pool_stats(self) -> dict[str, int]:
        """The current pool's statistics (renew() replaces the pool)."""
        return self.pool.get_stats()

    def pool_waiting(self) -> int:
        return int(self.pool.get_stats().get("requests_waiting", 0))

    async def open(self, wait_s: float = 30.0) -> None:
        await self.pool.open(wait=True, timeout=wait_s)

    async def close(self) -> None:
        await self.pool.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def renew(self) -> bool:
        """Replace the pool with a fresh one and say whether a statement now
        succeeds through it (one connection made and asked within
        connect_timeout_s).

        Why not drain() or check(): after an outage, or a failover that moved
        the primary to another node, the old pool's connection attempts are
        in exponential back-off (1 s, 2 s, 4 s ... with jitter); drain() only
        replaces connections it holds, and it holds none after the database
        vanished, so the first approval came 0-7 s after the database could
        have given one, and calls waited for a connection until their
        deadline. A fresh pool connects now (the multi-host URL with
        target_session_attrs=read-write finds the new primary). Calls still
        holding a connection of the old pool finish on it; the old pool is
        closed in the background."""
        old = self.pool
        self.pool = AsyncConnectionPool(self.url, **self._pool_args)
        await self.pool.open(wait=False)
        task = asyncio.create_task(old.close(timeout=self.connect_timeout_s),
                                   name=f"{self.name}-retire-pool")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                async with self.pool.connection() as conn:
                    await conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError):
            return False
        return True

    async def call(self, sql: LiteralString, params: Params) -> dict[str, Any]:
        """Run one statement returning a single jsonb value.

        A connection that turns out dead (the database restarted since it was
        pooled) is retried once on a fresh one: safe, because every fc.*
        function is idempotent on its request_id (a statement that did commit
        before the link broke answers the retry with its first answer)."""
        if not self.available:
            raise self._down()
        with _span(self.tracer, sql):
            broken_retry = True
            attempt = 0
            while True:
                try:
                    row = await self._one(sql, params)
                except psycopg.errors.UniqueViolation as exc:
                    attempt += 1
                    if exc.diag.constraint_name in _RACE_CONSTRAINTS and attempt < _RACE_RETRIES:
                        continue
                    raise translate(exc) from None
                except (PoolTimeout, TooManyRequests, PoolClosed) as exc:  # OperationalErrors
                    # with no SQLSTATE, like a lost link: caught first, never retried
                    raise self._pool_refusal(exc) from None
                except psycopg.OperationalError as exc:
                    if broken_retry and self.available and may_run_again(exc):
                        broken_retry = False
                        continue
                    await self._remember_refusal(sql, params, exc)
                    raise translate(exc) from None
                except psycopg.Error as exc:
                    await self._remember_refusal(sql, params, exc)
                    raise translate(exc) from None
                assert row is not None and row[0] is not None, "fc functions always answer"
                result: dict[str, Any] = row[0]
                return result

    # The pool's getconn/putconn rather than its connection() context: that
    # one also enters the connection's own context, whose exit commits (or
    # rolls back) through the connection's lock and wait loop - a round of
    # bookkeeping for nothing on these autocommit connections. putconn still
    # replaces a connection left broken or mid-statement (a cancelled call).

    async def _one(self, sql: LiteralString, params: Params) -> tuple[Any, ...] | None:
        pool = self.pool
        conn = await pool.getconn()
        try:
            cur = conn.statements()
            await cur.execute(sql, params, prepare=True)
            return await cur.fetchone()
        finally:
            await pool.putconn(conn)

    async def _all(self, sql: LiteralString, params: Params) -> list[tuple[Any, ...]]:
        pool = self.pool
        conn = await pool.getconn()
        try:
            cur = conn.statements()
            await cur.execute(sql, params, prepare=True)
            return await cur.fetchall()
        finally:
            await pool.putconn(conn)

    async def _remember_refusal(self, sql: LiteralString, params: Params, exc: psycopg.Error) -> None:
        """Store a permanent refusal as the request's answer (sql/functions/
        idempotency.sql, fc.remember_refusal, says why it is a second
        statement and which refusals it keeps). Only an idempotent call's
        refusal of class FC, not one fc.replay replayed; best effort: if it
        cannot be stored, a retry is decided afresh, as before."""
        state = exc.sqlstate
        if (state is None or not state.startswith("FC") or state == "FCUA0"
                or exc.diag.message_hint == "replayed" or not isinstance(params, Mapping)):
            return
        operation = idempotent_operation(sql)
        if operation is None or not all(k in params for k in _KEY_PARAMS):
            return
        try:
            async with self.pool.connection() as conn:
                await conn.execute(REMEMBER_REFUSAL_SQL, {
                    "caller": params["caller"], "request_id": params["request_id"],
                    "operation": operation, "request_hash": params["request_hash"],
                    "sqlstate": state, "reason": exc.diag.message_primary or "",
                    "field": exc.diag.message_detail or "", "now": params["now"]}, prepare=True)
        except (psycopg.Error, PoolTimeout, TooManyRequests, PoolClosed) as failure:
            log.warning("refusal not remembered (%s)", type(failure).__name__)

    def _pool_refusal(self, exc: psycopg.OperationalError) -> errors.ApiError:
        if not self.available:
            return self._down()
        if isinstance(exc, PoolClosed):
            return errors.unavailable("SERVER_STOPPING", "the server is stopping; retry")
        if isinstance(exc, TooManyRequests):
            return errors.unavailable("DATABASE_BUSY",
                                      "too many calls are waiting for a database connection")
        return errors.unavailable("DATABASE_BUSY", "no database connection became free in time")

    async def fetch_all(self, sql: LiteralString, params: Params) -> list[tuple[Any, ...]]:
        if not self.available:
            raise self._down()
        with _span(self.tracer, sql):
            broken_retry = self.read_only
            while True:
                try:
                    return await self._all(sql, params)
                except (PoolTimeout, TooManyRequests, PoolClosed) as exc:  # OperationalErrors
                    # with no SQLSTATE, like a lost link: caught first, never retried
                    raise self._pool_refusal(exc) from None
                except psycopg.OperationalError as exc:
                    if broken_retry and self.available and may_run_again(exc):  # a read: safe
                        broken_retry = False
                        continue
                    raise translate(exc) from None
                except psycopg.Error as exc:
                    raise translate(exc) from None

    async def fetch_one(self, sql: LiteralString, params: Params) -> tuple[Any, ...] | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None


# Connections outside any pool, for the two kinds of work a Database does
# not fit: a health probe, and a one-off command. Named, so that each use
# says why it does not go through a pool.

async def probe_connection(url: str, name: str, connect_timeout_s: float
                           ) -> psycopg.AsyncConnection[tuple[Any, ...]]:
    """A connection of a health probe's own (health.py): a pool whose
    connections are all busy is not a database that is down, and a probe
    that waited for a pooled connection would say it is."""
    return await psycopg.AsyncConnection.connect(
        url, autocommit=True, application_name=name,
        connect_timeout=max(1, round(connect_timeout_s)))


def one_shot(url: str, *, autocommit: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
    """One synchronous connection for one command of the `fuelcard` CLI
    (or `verify.run`); used as `with one_shot(url) as conn:`, it is closed
    when the block ends. These run once, outside any event loop, and some
    need a transaction over several statements (a REPEATABLE READ snapshot
    for the checks, a rule set and its audit record together), which the
    pool's one-statement calls do not give."""
    return psycopg.connect(url, autocommit=autocommit)
