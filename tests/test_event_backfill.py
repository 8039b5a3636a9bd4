"""`fuelcard events backfill` on an upgraded database: money booked before
the event stream existed (and refunds booked before refunds had events of
their own) reaches the warehouse, which then matches the journal account by
account, both for a sidecar that followed the stream since the upgrade and
for one that starts from position 0. The backfill runs in small batches
while the server serves (with payments going on at the same time), can stop
and go on, two runs at once share the work, and a run after it is done
writes nothing."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, events_pb2, events_pb2_grpc, funding_pb2, points_pb2
from fuelcard_analytics.follow import Target, follow
from fuelcard_analytics.warehouse import Warehouse, open_store
from fuelcard_server import cli, event_backfill, migrations, verify
from fuelcard_server.clock import ManualClock
from psycopg import sql

from tests.plugins.database import PostgresCluster
from tests.plugins.server import RunningServer, ServerThread, make_settings
from tests.support import builders, control_builders
from tests.support.ledger_asserts import Conn
from tests.support.warehouse_asserts import (
    assert_warehouse_matches_journal,
    journal_by_account,
    warehouse_by_account,
)

DATABASE = "fc_backfill"
MINUTE = dt.timedelta(minutes=1)


@contextlib.contextmanager
def serving(url: str, data_dir: Path, clock: ManualClock) -> Iterator[RunningServer]:
    data_dir.mkdir(parents=True, exist_ok=True)
    # Servers of one test share a key set (kept beside their data
    # directories): other keys would be refused by the database.
    settings = make_settings(data_dir, root_key_file=data_dir.parent / "root.key",
                             signing_key_file=data_dir.parent / "server-sm2.key")
    thread = ServerThread(settings, url, clock)
    port = thread.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    try:
        yield RunningServer(target, url, clock, settings, thread.server, thread.loop, channel)
    finally:
        channel.close()
        thread.stop()


def refund(server: RunningServer, recharge: funding_pb2.RechargeResponse, amount_fen: int
           ) -> funding_pb2.RefundRechargeResponse:
    response: funding_pb2.RefundRechargeResponse = server.funding.RefundRecharge(
        funding_pb2.RefundRechargeRequest(
            request_id=builders.rid("refund"), channel=recharge.recharge.channel,
            channel_txn_id=recharge.recharge.channel_txn_id,
            channel_refund_id=f"rf-{uuid.uuid4().hex}", amount_fen=amount_fen))
    return response


def book_some(server: RunningServer, card: builders.FundedCard, tag: int) -> None:
    """A recharge, a sale, a partial sale, a cancel and a refund on a card."""
    paid = builders.recharge(server, card.account_id, 30_000 + tag)
    server.advance(MINUTE)
    builders.confirm(server, builders.authorize(server, card, 5_000).hold.hold_id, 5_000)
    server.advance(MINUTE)
    builders.confirm(server, builders.authorize(server, card, 4_000).hold.hold_id, 1_234 + tag)
    builders.cancel(server, builders.authorize(server, card, 2_000).hold.hold_id)
    server.advance(MINUTE)
    refund(server, paid, 3_000)
    server.advance(MINUTE)


def sync(server: RunningServer, path: Path) -> None:
    store = open_store(str(path))
    try:
        follow(Target(server.target), Warehouse(store), keep_following=False, log=lambda _: None)
    finally:
        store.close()


def matches(path: Path, db: Conn) -> bool:
    store = open_store(str(path))
    try:
        return warehouse_by_account(store) == journal_by_account(db)
    finally:
        store.close()


@contextlib.contextmanager
def booked_without_events(url: str, *, refunds_only: bool = False) -> Iterator[None]:
    """Money booked inside this block leaves no trace in the event stream, as
    on a database that did not have the stream's triggers yet: none at all
    (the released migrations before 0009_events), or, with `refunds_only`,
    only the refunds' (0009 applied, 0012_refund_events_backfill not yet:
    a refund's journal entry was streamed, the refund itself was not).

    The stream is fed by the outbox triggers alone (no stored function
    writes fc.outbox on a booking), so switching them off gives exactly what
    those releases wrote: no fc.outbox rows, hence no fc.events rows and
    fc.event_head untouched, and the positions that are given stay gap-free
    (deleting the rows afterwards would leave holes the sequencer never
    leaves). The triggers are found by what their function writes, so one
    added later is switched off too. Nothing may be serving when the block
    is entered or left (ALTER TABLE waits for every transaction on the table).
    """
    with psycopg.connect(url, autocommit=True) as db:
        triggers = db.execute(
            "SELECT n.nspname, c.relname, t.tgname FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE NOT t.tgisinternal AND p.prosrc ~* 'insert\\s+into\\s+fc\\.outbox'"
            "   AND (NOT %s OR t.tgrelid = 'fc.refunds'::regclass)"
            " ORDER BY 1, 2, 3", (refunds_only,)).fetchall()
        assert triggers, "no outbox trigger found: the simulation would stream everything"

        def switch(action: str) -> None:
            for schema, table, name in triggers:
                db.execute(sql.SQL("ALTER TABLE {} {} TRIGGER {}").format(
                    sql.Identifier(schema, table), sql.SQL(action), sql.Identifier(name)))

        switch("DISABLE")
        try:
            yield
        finally:
            switch("ENABLE")


def record_what_predates_the_stream(url: str) -> None:
    """fc.event_backfill as 0012_refund_events_backfill left it on a database
    that had served with 0009 (and before it) for a while: per source, the
    last id the stream does not have. Journal: just below the lowest entry
    the stream or the outbox holds, else the journal's last id; accounts
    (system accounts aside), cards: the last id, those opened since 0009
    included (a dimension written twice is one row in the warehouse);
    stations: all of them, if any; refunds: every one so far (they had no
    events before 0012). Nothing is written yet (done_id 0). The same
    computation as 0012's DO block, without its lock: nothing is serving; read
    through today's stream, whose events keep the entry's id (ref_id, no
    payload) and whose sale rows (outbox kind 7) stand for their entries."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("""
            UPDATE fc.event_backfill b SET through_id = m.through_id, done_id = 0
              FROM (VALUES
                (1, coalesce(least(
                        (SELECT min(coalesce(ref_id, (payload ->> 'entry_id')::bigint))
                           FROM fc.events WHERE kind = 1),
                        (SELECT min(ref_id) FROM fc.outbox WHERE kind = 1),
                        (SELECT min(j.id) FROM fc.outbox o JOIN fc.journal j ON j.hold_id = o.ref_id
                          WHERE o.kind = 7)) - 1,
                     (SELECT max(id) FROM fc.journal), 0)),
                (3, coalesce((SELECT max(id) FROM fc.accounts WHERE kind <> 100), 0)),
                (4, coalesce((SELECT max(id) FROM fc.cards), 0)),
                (5, CASE WHEN EXISTS (SELECT FROM fc.stations) THEN 1 ELSE 0 END),
                (6, coalesce((SELECT max(id) FROM fc.refunds), 0))) AS m (source, through_id)
             WHERE b.source = m.source""")


def test_backfill_brings_the_history_from_before_the_stream_into_the_warehouse(
        pg_cluster: PostgresCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = pg_cluster.create_database(DATABASE)
    clock = ManualClock(dt.datetime(2026, 3, 2, 1, 0, tzinfo=dt.UTC))
    try:
        migrations.migrate(url)
        # 1. Before the stream: money of every kind, and a station.
        with booked_without_events(url), serving(url, tmp_path / "s1", clock) as server:
            control_builders.register_station(server, "KM-001", 25.04, 102.71)
            old = [builders.open_card(server) for _ in range(3)]
            for i, card in enumerate(old):
                book_some(server, card, i)
            fleet = control_builders.open_fleet(server, 20_000, [account_pb2.FUNDING_MODE_ALLOCATED])
            control_builders.batch_top_up(server, fleet.parent_id, [(fleet.subs[0].account_id, 6_000)])
            server.advance(MINUTE)
            builders.confirm(server, builders.authorize(server, fleet.subs[0], 3_000).hold.hold_id,
                             2_500)
            server.points.RedeemPoints(points_pb2.RedeemPointsRequest(
                request_id=builders.rid("redeem"), account_id=old[0].account_id, points=3,
                description="mall order"))
        # 2. The stream without refund events, running for a while: its
        #    events, some positioned, some still in the outbox; refunds only
        #    as journal entries.
        with booked_without_events(url, refunds_only=True), \
                serving(url, tmp_path / "s2", clock) as server:
            book_some(server, old[1], 10)
            assert server.sequence_events() > 0
            book_some(server, builders.open_card(server), 11)
        # 3. The upgrade that completed the stream; the server serves again.
        record_what_predates_the_stream(url)
        with serving(url, tmp_path / "s3", clock) as server, \
                psycopg.connect(url, autocommit=True) as db:
            book_some(server, old[2], 20)
            following = tmp_path / "following.duckdb"
            sync(server, following)
            assert not matches(following, db), "history is missing before the backfill"

            # Backfill in small batches while payments go on; stop after two
            # batches, then go on.
            stop = threading.Event()
            errors: list[BaseException] = []

            def pay() -> None:
                try:
                    card = builders.open_card(server, balance_fen=1_000_000)
                    while not stop.is_set():
                        hold = builders.authorize(server, card, 900).hold
                        builders.confirm(server, hold.hold_id, 700)
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

            payer = threading.Thread(target=pay)
            payer.start()
            try:
                first = event_backfill.run(url, batch=5, max_backlog=10, now=clock.now,
                                           max_batches=2)
                with psycopg.connect(url) as conn:
                    assert not all(s.done for s in event_backfill.progress(conn))
                # the rest by two runs at once (an operator's second terminal)
                with ThreadPoolExecutor(2) as pool:
                    runs = [pool.submit(event_backfill.run, url, batch=5, max_backlog=10,
                                        now=clock.now) for _ in range(2)]
                    rest = sum(r.result(timeout=120) for r in runs)
            finally:
                stop.set()
                payer.join(timeout=60)
            assert not errors, errors
            assert first > 0 and rest > 0
            with psycopg.connect(url) as conn:
                assert all(s.done for s in event_backfill.progress(conn))

            fresh = tmp_path / "fresh.duckdb"
            for path in (following, fresh):
                sync(server, path)
                store = open_store(str(path))
                try:
                    assert_warehouse_matches_journal(store, db)
                    assert store.query("SELECT station_id FROM dim_station") == [("KM-001",)]
                finally:
                    store.close()

            # Again: nothing to write, nothing new in the outbox or the stream.
            server.sequence_events()
            head = db.execute("SELECT last_position FROM fc.event_head").fetchone()
            assert event_backfill.run(url, batch=5, now=clock.now) == 0
            assert cli.main(["events", "backfill", "--database-url", url]) == 0
            printed = capsys.readouterr().out
            assert "nothing to write (done)" in printed and "refunds: done (5 of 5)" in printed
            assert db.execute("SELECT count(*) FROM fc.outbox").fetchone() == (0,)
            assert db.execute("SELECT last_position FROM fc.event_head").fetchone() == head

            # Backfilled events: flagged, after the live ones, in booking order;
            # none for an entry the stream already had.
            stub = events_pb2_grpc.EventServiceStub(server.channel)
            streamed = [e for m in stub.StreamEvents(events_pb2.StreamEventsRequest())
                        for e in m.events]
            backfilled = [e for e in streamed if e.backfilled]
            assert backfilled and not any(
                e.backfilled for e in streamed[:streamed.index(backfilled[0])])
            timed = [e.occur_time.ToDatetime() for e in backfilled
                     if e.WhichOneof("payload") in ("ledger_entry", "account", "card", "refund")]
            assert timed == sorted(timed)
            entries = [e.ledger_entry.entry_id for e in streamed if e.HasField("ledger_entry")]
            assert len(entries) == len(set(entries))
            total = db.execute("SELECT count(*) FROM fc.journal").fetchone()
            assert total == (len(entries),)
            refunds = [e.refund.refund_id for e in streamed if e.HasField("refund")]
            assert len(refunds) == len(set(refunds)) == 6
        assert verify.run(url) == []
    finally:
        pg_cluster.drop_database(DATABASE)


def test_a_backfilled_card_never_undoes_a_change_positioned_before_it(
        server: RunningServer, db: Conn, tmp_path: Path) -> None:
    """A card blocked by a transaction that wrote its outbox row before the
    backfill wrote the card's, and committed after: the change is positioned
    first, and the backfilled card, described when positioned, says blocked
    too (described when written, it would say active and win)."""
    card = builders.open_card(server)
    # as if the card had been issued before the stream existed
    db.execute("UPDATE fc.event_backfill SET through_id = (SELECT max(id) FROM fc.cards)"
               " WHERE source = 4")
    with psycopg.connect(server.database_url) as racing:
        racing.execute("UPDATE fc.cards SET status = 2 WHERE uid = %s", (card.card_id,))
        assert db.execute("SELECT fc.backfill_events(p_limit => 100)").fetchone() == (1,)
        racing.commit()
    path = tmp_path / "w.duckdb"
    sync(server, path)
    store = open_store(str(path))
    try:
        assert store.query("SELECT status FROM dim_card WHERE card_id = ?", [card.card_id]) == [
            (account_pb2.CARD_STATUS_BLOCKED,)]
    finally:
        store.close()
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    cards = [(e.backfilled, e.card.status) for m in stub.StreamEvents(
        events_pb2.StreamEventsRequest()) for e in m.events if e.HasField("card")]
    assert cards == [(False, account_pb2.CARD_STATUS_ACTIVE), (False, account_pb2.CARD_STATUS_BLOCKED),
                     (True, account_pb2.CARD_STATUS_BLOCKED)]


def test_a_range_that_ends_in_a_gap_is_reported_done(server: RunningServer, db: Conn) -> None:
    """The journal's pre-stream range ends in ids no row has (transactions
    that rolled back): once everything that exists is written, --status says
    done, not "to do" for ever."""
    builders.open_card(server)
    db.execute("UPDATE fc.event_backfill SET through_id = (SELECT max(id) + 5 FROM fc.cards)"
               " WHERE source = 4")
    assert event_backfill.run(server.database_url) == 1
    assert [s.name for s in event_backfill.progress(db) if not s.done] == []
    assert event_backfill.run(server.database_url) == 0  # and nothing written twice
