"""An upgrade keeps every invariant: a database holding money booked before a
migration still verifies after it, which is what a production upgrade meets
(a fresh test database only ever sees the migrations all at once)."""

from __future__ import annotations

import datetime as dt

import psycopg
from fuelcard_server import migrations, verify
from fuelcard_server.services.account import OPEN_ACCOUNT_SQL
from fuelcard_server.services.funding import RECHARGE_SQL

from tests.plugins.database import PostgresCluster

DATABASE = "fc_upgrade"
CHANNEL_WECHAT = 2


def test_recharges_booked_before_the_channels_migration_get_settlement_records(
        pg_cluster: PostgresCluster) -> None:
    url = pg_cluster.create_database(DATABASE)
    try:
        everything = migrations.available()
        channels = next(m for m in everything if m.name.endswith("_channels"))
        with psycopg.connect(url, autocommit=True) as conn:
            # what migrate() does, stopping short of the channels migration
            migrations.migrate(url, up_to=channels.version - 1)
            now = dt.datetime.now(dt.UTC)
            row = conn.execute(OPEN_ACCOUNT_SQL, {
                "caller": "upgrade-test", "request_id": "open-1", "request_hash": b"\x01" * 32,
                "kind": 1, "name": "Holder", "phone": "", "id_number": "", "parent_uid": None,
                "funding_mode": 0, "label": "", "now": now}).fetchone()
            assert row is not None
            conn.execute(RECHARGE_SQL, {
                "caller": "upgrade-test", "request_id": "recharge-1", "request_hash": b"\x02" * 32,
                "account_uid": row[0]["account_id"], "channel": CHANNEL_WECHAT,
                "channel_txn_id": "wx-before-upgrade", "amount_fen": 10_000, "now": now})
            assert conn.execute("SELECT count(*) FROM fc.recharges").fetchone() == (1,)
        applied = migrations.migrate(url)
        assert channels.name in applied
        with psycopg.connect(url) as conn:
            records = conn.execute(
                "SELECT kind, channel, channel_txn_id, amount_fen FROM fc.settlement_records"
            ).fetchall()
        assert records == [(1, CHANNEL_WECHAT, "wx-before-upgrade", 10_000)]
        assert verify.run(url) == []
    finally:
        pg_cluster.drop_database(DATABASE)


def test_a_channel_exception_resolved_by_hand_keeps_its_mark_through_the_upgrade(
        pg_cluster: PostgresCluster) -> None:
    """Before ResolveChannelException existed the only way to mark an
    exception followed up was SQL (resolved_at). The migration that adds the
    RPC requires a note and a resolver on every resolved row: it must give the
    hand-marked ones theirs, not fail the upgrade."""
    url = pg_cluster.create_database(DATABASE)
    try:
        everything = migrations.available()
        exceptions = next(m for m in everything if m.name.endswith("_channel_exceptions"))
        migrations.migrate(url, up_to=exceptions.version - 1)
        now = dt.datetime.now(dt.UTC)
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(OPEN_ACCOUNT_SQL, {
                "caller": "upgrade-test", "request_id": "open-1", "request_hash": b"\x01" * 32,
                "kind": 1, "name": "Holder", "phone": "", "id_number": "", "parent_uid": None,
                "funding_mode": 0, "label": "", "now": now}).fetchone()
            assert row is not None
            conn.execute(RECHARGE_SQL, {
                "caller": "upgrade-test", "request_id": "recharge-1", "request_hash": b"\x02" * 32,
                "account_uid": row[0]["account_id"], "channel": CHANNEL_WECHAT,
                "channel_txn_id": "wx-before-upgrade", "amount_fen": 10_000, "now": now})
            # a refund the account could not cover at all, as fc.refund_recharge
            # records it, then marked followed up by hand
            conn.execute(
                "INSERT INTO fc.refunds (recharge_id, account_id, channel, channel_refund_id,"
                " amount_fen, debited_fen, balance_after_fen, created_at)"
                " SELECT id, account_id, channel, 'wx-refund-1', 500, 0, 10000, %s"
                " FROM fc.recharges", (now,))
            conn.execute(
                "INSERT INTO fc.channel_exceptions (refund_id, account_id, channel, amount_fen,"
                " reason, created_at, resolved_at) SELECT id, account_id, channel, 500,"
                " 'REFUND_SHORTFALL', %s, %s FROM fc.refunds", (now, now))
        assert exceptions.name in migrations.migrate(url)
        with psycopg.connect(url) as conn:
            resolved = conn.execute("SELECT resolution IS NOT NULL, resolved_by"
                                    " FROM fc.channel_exceptions").fetchall()
        assert resolved == [(True, "migration")]
    finally:
        pg_cluster.drop_database(DATABASE)
