"""Deployment hygiene (issue 15, item 8): the embedded PostgreSQL demands a
password of every connection; a load balancer can ask a server whether it is
alive and ready over plain HTTP, with no client certificate."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
from fuelcard_server import roles
from fuelcard_server.clock import ManualClock
from fuelcard_server.embedded import EmbeddedPostgres

from tests.plugins.database import PostgresCluster
from tests.plugins.proxy import TcpProxy
from tests.plugins.server import ServerThread, make_settings


def get(url: str) -> tuple[int, str]:
    """Status and body of a plain HTTP GET (no TLS, no certificate)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as refused:
        return int(refused.code), refused.read().decode()


def test_the_embedded_cluster_refuses_a_connection_without_the_password(
        pg_cluster: PostgresCluster) -> None:
    pg = pg_cluster.embedded
    if pg is None:
        pytest.fail("this test is about the embedded PostgreSQL: unset FUELCARD_TEST_DATABASE_URL")
    assert pg.passfile.stat().st_mode & 0o777 == 0o600
    assert "scram-sha-256" in (pg.pgdata / "pg_hba.conf").read_text()
    assert "trust" not in (pg.pgdata / "pg_hba.conf").read_text()
    # with the password file (as the URLs it gives name it): in
    with psycopg.connect(pg.url("postgres")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    no_password = str(pg.data_dir / "no-such-passfile")
    for url in (pg.url("postgres"), pg.url("postgres", tcp=True),
                roles.as_role(pg_cluster.admin_url)):
        bare = psycopg.conninfo.make_conninfo(url, passfile=no_password)
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(bare, connect_timeout=5).close()
        wrong = psycopg.conninfo.make_conninfo(url, passfile=no_password, password="guessed")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(wrong, connect_timeout=5).close()


def test_healthz_and_readyz_over_plain_http_follow_the_database(database_url: str, tmp_path: Path,
                                                                 dev_certs: Path) -> None:
    # A server that takes gRPC over mutual TLS only: the probes need no certificate.
    port = psycopg.conninfo.conninfo_to_dict(database_url).get("port") or 5432
    with TcpProxy(f"127.0.0.1:{port}") as link:
        proxied = psycopg.conninfo.make_conninfo(database_url, host="127.0.0.1",
                                                 port=link.target.rpartition(":")[2])
        settings = make_settings(tmp_path, metrics_listen="127.0.0.1:0", health_interval_s=0.2,
                                 connect_timeout_s=1.0, insecure=False, tls_dir=dev_certs)
        thread = ServerThread(settings, proxied,
                              ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)))
        thread.start()
        try:
            base = f"http://127.0.0.1:{thread.server.metrics_port}"
            assert get(f"{base}/healthz") == (200, "ok\n")
            status, body = get(f"{base}/readyz")
            assert status == 200
            assert json.loads(body) == {"ready": True, "database": "up", "replica": "none",
                                        "stopping": False}
            link.down()
            deadline = time.monotonic() + 20
            while get(f"{base}/readyz")[0] == 200:
                assert time.monotonic() < deadline, "/readyz never noticed the database was gone"
                time.sleep(0.05)
            status, body = get(f"{base}/readyz")
            assert (status, json.loads(body)["database"]) == (503, "down")
            assert get(f"{base}/healthz") == (200, "ok\n")  # alive, not ready
            link.up()
            deadline = time.monotonic() + 20
            while get(f"{base}/readyz")[0] != 200:
                assert time.monotonic() < deadline, "/readyz never saw the database back"
                time.sleep(0.05)
            assert get(f"{base}/nothing")[0] == 404
        finally:
            thread.stop()


def test_a_cluster_made_with_trust_is_switched_to_passwords(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "postgres")
    pg.start()
    try:
        # as a cluster initialised before this change: trust, no password file
        hba = pg.pgdata / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        pg.passfile.unlink()
        pg.stop()
        url = pg.start()
        assert "scram-sha-256" in hba.read_text() and "trust" not in hba.read_text()
        assert pg.passfile.stat().st_mode & 0o777 == 0o600
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        with psycopg.connect(roles.as_role(url)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (roles.SERVING,)
        bare = psycopg.conninfo.make_conninfo(url, passfile=str(tmp_path / "none"))
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(bare, connect_timeout=5).close()
    finally:
        pg.stop()
