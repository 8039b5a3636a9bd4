"""Stored functions as source: every function is defined once, in its area's
file, and the database holds exactly what the files say; numbered migrations
hold schema only; a database at the released 0017 upgrades to the same schema
a fresh one gets, with its money intact.

tests/fixtures/schema_0017.sql is a dump of a database migrated by the
released 0001-0017 (as contract/ holds the released proto image): the upgrade
starts from what production databases really hold.
"""

from __future__ import annotations

import collections
import datetime as dt
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fuelcard_server import embedded, migrations, sql_source, verify
from fuelcard_server.locks import AUDIT_LOCK
from psycopg.types.json import Jsonb

from tests.plugins.database import PostgresCluster

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY_DUMP = FIXTURES / "schema_0017.sql"
MAX_BODY_LINES = 70
PERSONAL = 1
WECHAT = 2


def _tool(name: str) -> str:
    return str(embedded.bin_dir() / name)


def _conninfo(url: str) -> dict[str, Any]:
    return psycopg.conninfo.conninfo_to_dict(url)


def _libpq_args(url: str) -> list[str]:
    return [psycopg.conninfo.make_conninfo(**_conninfo(url))]


def schema_dump(url: str) -> str:
    res = subprocess.run([_tool("pg_dump"), "--schema-only", *_libpq_args(url)],
                         capture_output=True, text=True, timeout=120, check=True)
    return res.stdout


def load_legacy(url: str) -> None:
    subprocess.run([_tool("psql"), "-q", "-v", "ON_ERROR_STOP=1", "-f", str(LEGACY_DUMP),
                    *_libpq_args(url)], capture_output=True, text=True, timeout=120, check=True)


def _call(conn: psycopg.Connection[tuple[Any, ...]], function: str, **args: Any) -> Any:
    named = ", ".join(f"p_{k} => %({k})s" for k in args)
    row = conn.execute(f"SELECT fc.{function}({named})",
                       {k: Jsonb(v) if isinstance(v, dict) else v for k, v in args.items()}
                       ).fetchone()
    assert row is not None
    return row[0]


def book_history(url: str) -> None:
    """Money of every kind, through the released functions themselves: an open
    hold with its usage counters, a confirmed sale with its points lot, a
    cancel, a channel refund, risk notes, sequenced events and an audit
    record."""
    now = dt.datetime(2026, 11, 30, 2, 0, tzinfo=dt.UTC)
    keys = iter(range(1, 1000))

    def common() -> dict[str, Any]:
        n = next(keys)
        return {"caller": "upgrade-test", "request_id": f"r-{n}", "request_hash": bytes([n]) * 32,
                "now": now + dt.timedelta(seconds=n)}

    def authorize(pan: bytes, amount: int) -> Any:
        n = next(keys)
        return _call(conn, "authorize", **common(), pan_index=pan, amount_fen=amount,
                     station_id="S1", terminal_id="T1", nozzle=1, product=1,
                     ttl=dt.timedelta(minutes=30), counter=n, pin_ok=True)

    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(2):
            opened = _call(conn, "open_account", **common(), kind=PERSONAL, name=f"Holder {i}",
                           phone="", id_number="", parent_uid=None, funding_mode=0, label="")
            pan = bytes([0x40 + i]) * 32
            _call(conn, "issue_card", **common(), account_uid=opened["account_id"], pan_index=pan,
                  masked="9860 **** **** 0001")
            _call(conn, "recharge", **common(), account_uid=opened["account_id"], channel=WECHAT,
                  channel_txn_id=f"wx-{i}", amount_fen=100_000)
            open_hold = authorize(pan, 5_000)
            assert open_hold["decision"] == "APPROVED", open_hold
            sale = authorize(pan, 30_000)
            _call(conn, "confirm", **common(), hold_uid=sale["hold"]["hold_id"], final_fen=25_000,
                  volume_ml=31_250, unit_price_fen=800, terminal="T1", counter=next(keys))
            cancelled = authorize(pan, 1_000)
            _call(conn, "cancel", **common(), hold_uid=cancelled["hold"]["hold_id"], terminal="T1",
                  counter=next(keys))
            _call(conn, "refund_recharge", **common(), channel=WECHAT, channel_txn_id=f"wx-{i}",
                  channel_refund_id=f"wx-refund-{i}", amount_fen=1_000, refunded_total_fen=1_000)
        conn.execute("SELECT fc.audit_append(p_lock => %(lock)s, p_actor => 'upgrade-test',"
                     " p_method => 'Test', p_target => %(target)s, p_outcome => 'OK')",
                     {"lock": AUDIT_LOCK, "target": uuid.uuid4()})
        conn.execute("SELECT fc.sequence_events(p_now => %(now)s, p_limit => 1000)", {"now": now})
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM fc.holds WHERE state = 1), (SELECT count(*) FROM fc.usage),"
            " (SELECT count(*) FROM fc.points_lots), (SELECT count(*) FROM fc.refunds),"
            " (SELECT count(*) FROM fc.risk_card_state), (SELECT count(*) FROM fc.events),"
            " (SELECT count(*) FROM fc.audit_log)").fetchone()
        assert counts is not None and all(c > 0 for c in counts), counts


def test_a_database_at_0017_upgrades_to_the_schema_a_fresh_one_gets(
        pg_cluster: PostgresCluster, migrated_template: str) -> None:
    url = pg_cluster.create_database("fc_upgrade_0017")
    try:
        load_legacy(url)
        book_history(url)
        # (verify checks the current schema, which names tables and columns
        # later migrations add: it runs after the upgrade, and the balances
        # are compared across it)
        with psycopg.connect(url) as conn:
            before = conn.execute(
                "SELECT id, balance_fen, held_fen, points_balance FROM fc.accounts ORDER BY id"
            ).fetchall()
        applied = migrations.migrate(url)
        assert applied[0] == "0017_step_up_resend recorded as 0001_baseline"
        # then the migrations after the baseline, then every function file
        later = [m.name for m in migrations.available()[1:]]
        assert applied[1:1 + len(later)] == later
        assert all(name.startswith("functions/") for name in applied[1 + len(later):])
        assert migrations.migrate(url) == []
        assert verify.run(url) == []
        with psycopg.connect(url) as conn:
            after = conn.execute(
                "SELECT id, balance_fen, held_fen, points_balance FROM fc.accounts ORDER BY id"
            ).fetchall()
            recorded = conn.execute("SELECT version, name FROM public.fuelcard_migrations").fetchall()
        # every account as it was; what the upgrade adds is system accounts (no stored money)
        assert after[:len(before)] == before
        assert all(row[1:] == (0, 0, 0) for row in after[len(before):])
        assert recorded == [(m.version, m.name) for m in migrations.available()]
        assert schema_dump(url) == schema_dump(pg_cluster.url_for(migrated_template))
    finally:
        pg_cluster.drop_database("fc_upgrade_0017")


def test_a_database_stopped_before_0017_is_refused(pg_cluster: PostgresCluster) -> None:
    url = pg_cluster.create_database("fc_upgrade_partial")
    try:
        load_legacy(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM public.fuelcard_migrations WHERE version = 17")
        with pytest.raises(migrations.MigrationError, match="0016_points_expiry_job_locks"):
            migrations.migrate(url)
    finally:
        pg_cluster.drop_database("fc_upgrade_partial")


def _file_definitions() -> dict[str, list[tuple[str, sql_source.FunctionDefinition]]]:
    defined: dict[str, list[tuple[str, sql_source.FunctionDefinition]]] = collections.defaultdict(list)
    for f in migrations.function_files():
        for d in sql_source.functions(f.sql):
            defined[d.name].append((f.name, d))
    return defined


def test_every_function_in_the_database_is_its_file_s_definition(
        db: psycopg.Connection[tuple[Any, ...]]) -> None:
    in_files: dict[str, list[str]] = collections.defaultdict(list)
    for name, places in _file_definitions().items():
        in_files[name] = sorted(d.body for _, d in places)
    in_database: dict[str, list[str]] = collections.defaultdict(list)
    for name, body in db.execute(
            "SELECT n.nspname || '.' || p.proname, p.prosrc FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname LIKE 'fc%'"):
        in_database[name].append(body)
    assert sorted(in_database) == sorted(in_files), "functions missing from the files or the database"
    differing = [name for name in in_files if sorted(in_database[name]) != in_files[name]]
    assert differing == []


def test_each_function_is_defined_once_and_no_migration_defines_logic() -> None:
    twice = {name: [f for f, _ in places] for name, places in _file_definitions().items()
             if len(places) > 1 and not name.startswith("fc_pan_")}
    assert twice == {}
    for m in migrations.available():
        assert sql_source.defines_logic(m.sql) == [], f"{m.name} defines stored logic"


def test_no_function_body_is_longer_than_it_takes_to_read() -> None:
    long = {name: d.body.count("\n") for name, places in _file_definitions().items()
            for _, d in places if d.body.count("\n") > MAX_BODY_LINES}
    assert long == {}


def test_the_source_checks_catch_what_they_guard() -> None:
    """The checks above would pass vacuously if the parsing found nothing."""
    assert sql_source.defines_logic(
        "-- CREATE FUNCTION in a comment is fine\nALTER TABLE fc.x ADD c int;") == []
    assert sql_source.defines_logic(
        "DO $$ BEGIN EXECUTE 'CREATE OR REPLACE FUNCTION fc.f() ...'; END $$;") != []
    found = sql_source.functions(
        "CREATE FUNCTION fc.a(p int) RETURNS int LANGUAGE sql AS 'SELECT ''x'';';\n"
        "-- CREATE FUNCTION fc.fake()\n"
        "CREATE OR REPLACE FUNCTION fc.b() RETURNS int LANGUAGE plpgsql AS $b$ BEGIN RETURN 1; END $b$;")
    assert [(d.name, d.body) for d in found] == [
        ("fc.a", "SELECT 'x';"), ("fc.b", " BEGIN RETURN 1; END ")]
    assert sum(len(places) for places in _file_definitions().values()) >= 100


def test_migrate_is_a_no_op_the_second_time_and_reapplies_a_changed_file(
        pg_cluster: PostgresCluster, migrated_template: str) -> None:
    url = pg_cluster.create_database("fc_migrate_twice", template=migrated_template)
    try:
        assert migrations.migrate(url) == []
        assert migrations.status(url).up_to_date
        with psycopg.connect(url, autocommit=True) as conn:
            # what a deploy of a changed holds.sql looks like to the database,
            # and a function body someone edited by hand
            conn.execute("UPDATE public.fuelcard_function_files SET checksum = 'old'"
                         " WHERE file = 'holds.sql'")
            conn.execute("CREATE OR REPLACE FUNCTION fc.hold_json(h fc.holds) RETURNS jsonb"
                         " LANGUAGE sql AS 'SELECT NULL::jsonb'")
        plan = migrations.status(url)
        assert [f.name for f in plan.changed] == ["holds.sql"] and not plan.pending
        assert "changed: functions/holds.sql" in plan.describe()
        assert migrations.migrate(url) == ["functions/holds.sql"]
        with psycopg.connect(url) as conn:
            body = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'hold_json'").fetchone()
        assert body is not None and "NULL::jsonb" not in body[0]
    finally:
        pg_cluster.drop_database("fc_migrate_twice")


def test_two_concurrent_migrations_serialise(pg_cluster: PostgresCluster) -> None:
    url = pg_cluster.create_database("fc_migrate_race")
    try:
        results: list[list[str]] = []
        failures: list[BaseException] = []
        barrier = threading.Barrier(2)

        def run() -> None:
            barrier.wait()
            try:
                results.append(migrations.migrate(url))
            except BaseException as exc:  # reported below
                failures.append(exc)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert failures == []
        assert sorted(len(r) for r in results)[0] == 0, "the second run found work left"
        assert sorted(len(r) for r in results)[1] == (len(migrations.available())
                                                      + len(migrations.function_files()))
        assert verify.run(url) == []
    finally:
        pg_cluster.drop_database("fc_migrate_race")
