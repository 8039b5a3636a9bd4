"""Database fixtures: a real PostgreSQL, never a mock.

One PostgreSQL per test session: the embedded one (pgserver binaries) in a
temporary directory, or the server at FUELCARD_TEST_DATABASE_URL. The schema
is migrated once into a template database; each test gets a fresh copy of it
(CREATE DATABASE ... TEMPLATE), so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from fuelcard_server import migrations
from fuelcard_server.embedded import EmbeddedPostgres
from psycopg import sql

TEMPLATE = "fuelcard_test_template"
_counter = itertools.count(1)


@dataclass
class PostgresCluster:
    """A running PostgreSQL we may create databases on."""

    admin_url: str  # a URL to the maintenance database
    embedded: EmbeddedPostgres | None

    def url_for(self, database: str) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.admin_url)
        info["dbname"] = database
        return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            if template:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)))
            else:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    external = os.environ.get("FUELCARD_TEST_DATABASE_URL")
    if external:
        yield PostgresCluster(external, None)
        return
    with tempfile.TemporaryDirectory(prefix="fuelcard-test-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp))
        pg.start()
        try:
            yield PostgresCluster(pg.url("postgres"), pg)
        finally:
            pg.stop(mode="immediate")


@pytest.fixture(scope="session")
def migrated_template(pg_cluster: PostgresCluster) -> str:
    url = pg_cluster.create_database(TEMPLATE)
    migrations.migrate(url)
    return TEMPLATE


@pytest.fixture
def database_url(pg_cluster: PostgresCluster, migrated_template: str) -> Iterator[str]:
    """A freshly migrated, empty database for this test."""
    name = f"fuelcard_test_{os.getpid()}_{next(_counter)}"
    url = pg_cluster.create_database(name, template=migrated_template)
    yield url
    pg_cluster.drop_database(name)


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A direct connection to the test database, for asserting on rows."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def control_postgres(pg: EmbeddedPostgres, action: str, mode: str = "fast",
                     primary: EmbeddedPostgres | None = None) -> None:
    """Start or stop an embedded PostgreSQL (or make it a standby of
    `primary`) from a fresh Python process.

    Once gRPC has threads in this process, a fork() that is not followed at
    once by exec (as subprocess does to switch to the PostgreSQL user when
    we are root) can crash in gRPC's fork handlers; a plain child process
    (vfork + exec) is safe, and it does the user switch itself."""
    import subprocess
    import sys

    calls = {"start": "start()", "stop": f"stop(mode={mode!r})",
             "standby": f"create_standby(EmbeddedPostgres(Path({str(primary and primary.data_dir)!r})))"}
    script = ("from pathlib import Path; from fuelcard_server.embedded import EmbeddedPostgres; "
              f"EmbeddedPostgres(Path({str(pg.data_dir)!r})).{calls[action]}")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180)
    if res.returncode != 0:
        raise RuntimeError(f"postgres {action} failed: {res.stderr[-2000:]}")


def postgres_running(pg: EmbeddedPostgres) -> bool:
    return (pg.pgdata / "postmaster.pid").exists()
