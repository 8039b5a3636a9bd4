"""Database.renew(): after the database went away, a fresh pool that works at
once, instead of the old one's reconnects in exponential back-off; and a
verdict that is true only when a statement went through (health says
SERVING only then). A PostgreSQL of this module's own, stopped and started."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuelcard_server import errors
from fuelcard_server.db import Database
from fuelcard_server.embedded import EmbeddedPostgres

from tests.plugins.database import control_postgres, postgres_running


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    # Outside pytest's base temp directory: the PostgreSQL user must reach it.
    with tempfile.TemporaryDirectory(prefix="fuelcard-renew-") as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        control_postgres(pg, "start")
        try:
            yield pg
        finally:
            if postgres_running(pg):
                control_postgres(pg, "stop", "immediate")


def test_renew_says_no_while_the_database_is_down_and_gives_a_working_pool_after(
        own_pg: EmbeddedPostgres) -> None:
    async def scenario() -> None:
        db = Database(own_pg.url(), min_size=2, max_size=4, timeout_s=0.5, connect_timeout_s=1.0)
        await db.open()
        try:
            assert await db.fetch_one("SELECT 1", ()) == (1,)
            await asyncio.to_thread(control_postgres, own_pg, "stop", "immediate")
            # the pooled connections died with it; the pool cannot lend one
            with pytest.raises(errors.ApiError):
                await db.fetch_one("SELECT 1", ())
            first = db.pool
            # no database: not a pool that would serve, and health stays NOT_SERVING
            assert await db.renew() is False
            assert db.pool is not first
            await asyncio.to_thread(control_postgres, own_pg, "start")
            before = db.pool
            assert await db.renew() is True
            assert db.pool is not before
            # what renew() said is what a call finds
            assert await db.fetch_one("SELECT 2", ()) == (2,)
            # the pool metrics follow the new pool (the old one is emptied)
            assert db.pool_stats().get("pool_size", 0) >= 1
            # the replaced pools are closed in the background, not leaked
            await asyncio.sleep(0)
            for _ in range(50):
                if first.closed and before.closed:
                    break
                await asyncio.sleep(0.1)
            assert first.closed and before.closed
        finally:
            await db.close()

    asyncio.run(scenario())
