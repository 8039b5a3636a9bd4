"""Which failures the server runs a statement again for: a broken link (the
statement may have died with the connection) or a concurrency rollback,
never a refusal. Our own refusals (SQLSTATE class FC) and deadline cancels
arrive from psycopg as OperationalError, as a dead connection does; a retry
of those ran every refused payment twice. Counted with a sequence,
which a rolled-back statement still advances."""

from __future__ import annotations

import asyncio

import grpc
import psycopg
import pytest
from fuelcard_server import errors
from fuelcard_server.db import Database, may_run_again

from tests.support.ledger_asserts import Conn

RUNS_SQL = "SELECT last_value FROM fc_test.runs"


@pytest.fixture
def counted(db: Conn) -> Conn:
    db.execute("CREATE SCHEMA fc_test")
    db.execute("CREATE SEQUENCE fc_test.runs")
    # Refused: counts its run, then raises like an fc.* refusal.
    db.execute("""CREATE FUNCTION fc_test.refuse() RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM nextval('fc_test.runs');
            RAISE EXCEPTION USING ERRCODE = 'FCFP0', MESSAGE = 'HOLD_ALREADY_CONFIRMED',
                DETAIL = 'hold_id';
        END $$""")
    # The first run loses its connection; the second answers.
    db.execute("""CREATE FUNCTION fc_test.lose_link_once() RETURNS jsonb LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('fc_test.runs') = 1 THEN
                PERFORM pg_terminate_backend(pg_backend_pid());
            END IF;
            RETURN '{"ok": true}';
        END $$""")
    return db


def _call(url: str, sql: str) -> dict[str, object] | errors.ApiError:
    async def go() -> dict[str, object] | errors.ApiError:
        database = Database(url, min_size=1, max_size=1, timeout_s=10.0)
        await database.open()
        try:
            return await database.call(sql, ())
        except errors.ApiError as exc:
            return exc
        finally:
            await database.close()
    return asyncio.run(go())


def test_a_refusal_runs_once(database_url: str, counted: Conn) -> None:
    answer = _call(database_url, "SELECT fc_test.refuse()")
    assert isinstance(answer, errors.ApiError)
    assert (answer.code, answer.reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                            "HOLD_ALREADY_CONFIRMED")
    assert counted.execute(RUNS_SQL).fetchone() == (1,)


def test_a_lost_link_is_retried_once_on_a_fresh_connection(database_url: str,
                                                           counted: Conn) -> None:
    assert _call(database_url, "SELECT fc_test.lose_link_once()") == {"ok": True}
    assert counted.execute(RUNS_SQL).fetchone() == (2,)


def test_only_a_broken_link_or_a_concurrency_rollback_may_run_again(database_url: str) -> None:
    def error_of(sql: str) -> psycopg.Error:
        with psycopg.connect(database_url, autocommit=True) as conn:
            with pytest.raises(psycopg.Error) as caught:
                conn.execute(sql)
            return caught.value
    refused = error_of("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'FCFP0',"
                       " MESSAGE = 'X'; END $$")
    cancelled = error_of("SET statement_timeout = 50; SELECT pg_sleep(5)")
    killed = error_of("SELECT pg_terminate_backend(pg_backend_pid())")
    serialisation = error_of("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$")
    assert isinstance(refused, psycopg.OperationalError)  # why the check exists
    assert isinstance(cancelled, psycopg.errors.QueryCanceled)
    assert not may_run_again(refused) and not may_run_again(cancelled)
    assert may_run_again(killed), killed.sqlstate
    assert may_run_again(serialisation)


def test_a_call_past_the_pools_waiting_limit_is_busy_at_once_not_retried(
        database_url: str) -> None:
    # psycopg_pool refuses a caller past max_waiting with TooManyRequests, an
    # OperationalError without SQLSTATE, like a lost link: it was retried
    # and then answered DATABASE_UNAVAILABLE, as if the database were gone.
    async def go() -> list[dict[str, object] | errors.ApiError]:
        database = Database(database_url, min_size=1, max_size=1, timeout_s=10.0)
        await database.open()
        held = await database.pool.getconn()  # the only connection: everyone waits
        try:
            async def one() -> dict[str, object] | errors.ApiError:
                try:
                    return await database.call("SELECT '{}'::jsonb", ())
                except errors.ApiError as exc:
                    return exc
            waiting = [asyncio.create_task(one()) for _ in range(64)]  # max_waiting
            for _ in range(1000):  # all 64 queued (within 10 s)
                if database.pool_waiting() >= 64:
                    break
                await asyncio.sleep(0.01)
            assert database.pool_waiting() == 64
            refused = await one()  # the 65th
            await database.pool.putconn(held)
            return [refused, *await asyncio.gather(*waiting)]
        finally:
            await database.close()
    refused, *served = asyncio.run(go())
    assert isinstance(refused, errors.ApiError)
    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_BUSY")
    assert served == [{}] * 64
