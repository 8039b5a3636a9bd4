"""Least privilege in the database (issue 15): the role the server serves as
cannot rewrite history.

Every server these tests start connects as roles.SERVING (tests/plugins/
server.py), as `fuelcard serve` does with the embedded PostgreSQL; here the
role itself tries what an attacker holding its password would: disable the
journal's guard, edit or delete entries, the audit log or a balance, or
take the owner's rights. Each attempt must fail for want of privilege, and
leave the ledger as it was.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from fuelcard.v1 import points_pb2
from fuelcard_server import migrations, roles, verify
from fuelcard_server.embedded import EmbeddedPostgres

from tests.plugins.database import PostgresCluster
from tests.plugins.server import TEST_KEY_HEX, RunningServer
from tests.support import builders
from tests.support.ledger_asserts import Conn, scalar

SERVER_SOURCE = Path(__file__).parent.parent / "server" / "fuelcard_server"
FUELCARD = str(Path(sys.executable).parent / "fuelcard")

REFUSED = [
    "ALTER TABLE fc.journal DISABLE TRIGGER ALL",
    "ALTER TABLE fc.journal DISABLE TRIGGER journal_append_only",
    "ALTER TABLE fc.audit_log DISABLE TRIGGER ALL",
    "DROP TRIGGER journal_append_only ON fc.journal",
    "ALTER TABLE fc.accounts DROP CONSTRAINT held_within_balance",
    "UPDATE fc.journal SET amount = amount + 1",
    "UPDATE fc.journal SET description = 'edited' WHERE id = (SELECT min(id) FROM fc.journal)",
    "DELETE FROM fc.journal",
    "TRUNCATE fc.journal",
    "INSERT INTO fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
    " description, created_at) SELECT 4, 2, 1, 2, 1, 'forged', now()",
    "UPDATE fc.audit_log SET outcome = 'OK'",
    "DELETE FROM fc.audit_log",
    "UPDATE fc.accounts SET balance_fen = balance_fen + 100000",
    "UPDATE fc.holds SET amount_fen = 1",
    "UPDATE fc.journal_chain SET hash = hash",
    "DELETE FROM fc.journal_chain",
    # the guard's function replaced by one that lets everything through
    "CREATE OR REPLACE FUNCTION fc.refuse_change() RETURNS trigger LANGUAGE plpgsql"
    " AS $$ BEGIN RETURN NEW; END $$",
    "SET ROLE fuelcard_owner",
    "SET session_replication_role = replica",  # would skip every trigger
    # an internal helper called directly runs as its caller: its write is refused
    "SELECT fc.lapse_points_locked(p_account_id => (SELECT min(id) FROM fc.accounts),"
    " p_now => now() + interval '100 years')",
]


def _ledger(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    hold = builders.authorize(server, card, 20_000).hold
    builders.confirm(server, hold.hold_id, 18_000)
    server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
        request_id=builders.rid(), account_id=card.account_id, points=10))
    assert server.chain_journal() > 0


def _fingerprint(db: Conn) -> tuple[object, ...]:
    row = db.execute(
        "SELECT (SELECT md5(string_agg(j::text, ',' ORDER BY j.id)) FROM fc.journal j),"
        " (SELECT md5(string_agg(a::text, ',' ORDER BY a.id)) FROM fc.accounts a),"
        " (SELECT count(*) FROM fc.audit_log), (SELECT count(*) FROM fc.journal_chain),"
        " (SELECT md5(string_agg(t.tgname::text || t.tgenabled::text, ',' ORDER BY t.tgname))"
        "    FROM pg_trigger t WHERE t.tgrelid = 'fc.journal'::regclass)").fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("statement", REFUSED)
def test_the_serving_role_cannot_rewrite_history(server: RunningServer, db: Conn,
                                                 statement: str) -> None:
    _ledger(server)
    before = _fingerprint(db)
    with psycopg.connect(roles.as_role(server.database_url), autocommit=True) as app:
        assert scalar(app, "SELECT current_user") == roles.SERVING
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(statement.encode())
    assert _fingerprint(db) == before
    assert verify.run(server.database_url) == []


def test_the_server_connects_as_the_serving_role(server: RunningServer, db: Conn) -> None:
    builders.open_card(server, balance_fen=1_000)
    users = {r[0] for r in db.execute(
        "SELECT usename FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'fuelcard-%'")}
    assert users == {roles.SERVING}


def test_the_serving_role_owns_nothing_and_cannot_become_the_owner(db: Conn) -> None:
    assert scalar(db, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'fc'") \
        == roles.OWNER
    not_owned = db.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = 'fc'::regnamespace"
        " AND relowner <> 'fuelcard_owner'::regrole UNION ALL"
        " SELECT proname FROM pg_proc WHERE pronamespace = 'fc'::regnamespace"
        " AND proowner <> 'fuelcard_owner'::regrole").fetchall()
    assert not_owned == []
    assert scalar(db, "SELECT rolcanlogin FROM pg_roles WHERE rolname = 'fuelcard_owner'") is False
    assert scalar(db, "SELECT pg_has_role('fuelcard_app', 'fuelcard_owner', 'MEMBER')") is False
    for table, privilege in (("fc.journal", "UPDATE"), ("fc.journal", "DELETE"),
                             ("fc.journal", "TRUNCATE"), ("fc.journal", "INSERT"),
                             ("fc.audit_log", "UPDATE"), ("fc.accounts", "UPDATE"),
                             ("fc.journal_chain", "UPDATE"), ("fc.journal_chain", "DELETE")):
        assert scalar(db, "SELECT has_table_privilege('fuelcard_app', %s, %s)",
                      (table, privilege)) is False, (table, privilege)
    assert scalar(db, "SELECT has_table_privilege('fuelcard_app', 'fc.journal', 'SELECT')") is True


def _called_from_python() -> set[str]:
    names: set[str] = set()
    for path in SERVER_SOURCE.rglob("*.py"):
        names |= set(re.findall(r"\bfc\.([a-z_0-9]+)\(", path.read_text(encoding="utf-8")))
    return names


def test_every_writing_function_the_server_calls_is_an_entry_point(db: Conn) -> None:
    """The serving role writes only through SECURITY DEFINER entry points
    (sql/privileges.sql lists them): a new writing function the Python calls
    but the list lacks would fail for want of privilege."""
    # (fc.reindex_card: called by `fuelcard keys rotate-card-index` only, as
    # an administrator; the serving role may not re-index cards)
    called = _called_from_python() - {"reindex_card"}
    assert {"authorize", "confirm", "recharge", "audit_append"} <= called
    rows = db.execute(
        "SELECT proname, provolatile, prosecdef, proconfig, has_function_privilege("
        "'fuelcard_app', oid, 'EXECUTE'), has_function_privilege('public', oid, 'EXECUTE')"
        " FROM pg_proc WHERE pronamespace = 'fc'::regnamespace AND proname = ANY(%s)",
        (sorted(called),)).fetchall()
    assert {r[0] for r in rows} >= {"authorize", "confirm"}
    for name, volatility, definer, config, app_may, public_may in rows:
        if volatility == "v":
            assert definer, f"fc.{name} writes but is not SECURITY DEFINER"
        if definer:
            assert config == ["search_path=pg_catalog, fc, pg_temp"], name
            assert app_may and not public_may, name


def test_embedded_serve_migrates_as_admin_and_serves_as_the_serving_role(tmp_path: Path) -> None:
    """`fuelcard serve` with the embedded PostgreSQL: migrated by the
    cluster's superuser, served as fuelcard_app, with no setup."""
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [FUELCARD, "serve", "--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
         "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": "/usr/bin:/bin", "FUELCARD_CARD_INDEX_KEY_HEX": TEST_KEY_HEX})
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        url = EmbeddedPostgres(tmp_path / "postgres").url()
        with psycopg.connect(url, autocommit=True) as conn:
            users = {r[0] for r in conn.execute(
                "SELECT usename FROM pg_stat_activity WHERE application_name LIKE 'fuelcard-w%'")}
        assert users == {roles.SERVING}
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def _definer(url: str, function: str) -> bool:
    with psycopg.connect(url) as conn:
        value: bool = scalar(conn, "SELECT bool_and(prosecdef) FROM pg_proc WHERE proname = %s"
                             " AND pronamespace = 'fc'::regnamespace", (function,))
    return value


def test_a_reapplied_function_file_keeps_its_entry_points(
        pg_cluster: PostgresCluster, migrated_template: str) -> None:
    """CREATE OR REPLACE FUNCTION resets SECURITY DEFINER: privileges.sql is
    applied again after every run that re-creates functions, and whenever it
    changed itself."""
    url = pg_cluster.create_database("fc_privileges_again", template=migrated_template)
    try:
        assert _definer(url, "confirm")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE public.fuelcard_function_files SET checksum = 'old'"
                         " WHERE file = 'holds.sql'")
        assert migrations.migrate(url) == ["functions/holds.sql"]
        assert _definer(url, "confirm")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER FUNCTION fc.confirm SECURITY INVOKER")
            conn.execute("UPDATE public.fuelcard_function_files SET checksum = 'old'"
                         " WHERE file = 'privileges.sql'")
        assert not _definer(url, "confirm")
        plan = migrations.status(url)
        assert plan.privileges_changed and "changed: privileges.sql" in plan.describe()
        assert migrations.migrate(url) == ["privileges.sql"]
        assert _definer(url, "confirm")
        assert migrations.migrate(url) == []
    finally:
        pg_cluster.drop_database("fc_privileges_again")
