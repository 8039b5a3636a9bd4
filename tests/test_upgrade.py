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
            row = conn.execute(OPEN_ACCOUNT_SQL, (
                "upgrade-test", "open-1", b"\x01" * 32, 1, "Holder", "", "", None, 0, "",
                now)).fetchone()
            assert row is not None
            conn.execute(RECHARGE_SQL, (
                "upgrade-test", "recharge-1", b"\x02" * 32, row[0]["account_id"], CHANNEL_WECHAT,
                "wx-before-upgrade", 10_000, now))
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
