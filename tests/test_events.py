"""The event stream (issue 9): every committed movement and change reaches
EventService.StreamEvents in commit order, with gap-free positions, resumable
from any cursor; a transaction that commits late is never skipped."""

from __future__ import annotations

import queue
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from fuelcard.v1 import account_pb2, common_pb2, control_pb2, events_pb2, events_pb2_grpc

from tests.plugins.server import RunningServer, TlsServer
from tests.support import builders, control_builders
from tests.support.ledger_asserts import expect, unpack

Event = events_pb2.Event


def stream(server: RunningServer, after: int = 0, max_batch: int = 0) -> list[Event]:
    """Every event after `after`, up to what has committed (follow=False)."""
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    out: list[Event] = []
    for message in stub.StreamEvents(events_pb2.StreamEventsRequest(
            after_position=after, follow=False, max_batch=max_batch), timeout=30):
        assert message.head_position >= message.events[-1].position
        out.extend(message.events)
    return out


def ledger_totals(db: psycopg.Connection[Any]) -> dict[tuple[int, int], int]:
    rows = db.execute("SELECT kind, asset, sum(amount)::bigint FROM fc.journal GROUP BY 1, 2")
    return {(k, a): int(s) for k, a, s in rows.fetchall()}


def test_every_movement_and_change_is_streamed_once_in_order(
        server: RunningServer, db: psycopg.Connection[Any]) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    sold = builders.authorize(server, builders.FundedCard(card.account_id, card.card_id,
                                                          card.card_number), 20_000)
    builders.confirm(server, sold.hold.hold_id, 15_000, volume_ml=19_100, unit_price_fen=785)
    dropped = builders.authorize(server, card, 5_000)
    builders.cancel(server, dropped.hold.hold_id)
    server.accounts.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
        request_id=builders.rid("block"), card_id=card.card_id,
        status=account_pb2.CARD_STATUS_BLOCKED))
    control_builders.control(server).RegisterStation(control_pb2.RegisterStationRequest(
        station=control_pb2.Station(station_id="KM-001", name="昆明一站",
                                    location=control_pb2.GeoPoint(latitude=25.04,
                                                                  longitude=102.71))))

    events = stream(server, max_batch=3)
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    kinds = [e.WhichOneof("payload") for e in events]
    # authorize writes nothing to the stream: a hold is streamed when it changes state
    assert kinds == ["account", "card", "ledger_entry",            # open, issue, recharge
                     "ledger_entry", "ledger_entry", "hold",       # confirm: sale, points, state
                     "hold",                                       # cancel
                     "card", "station"]
    recharge, sale, points = events[2].ledger_entry, events[3].ledger_entry, events[4].ledger_entry
    assert (recharge.kind, recharge.asset, recharge.amount) == (
        events_pb2.LEDGER_ENTRY_KIND_RECHARGE, events_pb2.ASSET_MONEY, 50_000)
    assert recharge.credit_account_id == card.account_id and recharge.debit_account_id == ""
    assert recharge.debit_system_code == "CHANNEL_CLEARING_WECHAT_PAY"
    assert recharge.channel == 2 and recharge.recharge_id
    assert (sale.kind, sale.amount, sale.credit_system_code) == (
        events_pb2.LEDGER_ENTRY_KIND_PURCHASE, 15_000, "FUEL_SALES")
    assert sale.hold_id == sold.hold.hold_id
    assert (points.asset, points.amount) == (events_pb2.ASSET_POINTS, 150)
    confirmed, cancelled = events[5].hold, events[6].hold
    assert confirmed.state == common_pb2.HOLD_STATE_CONFIRMED
    assert (confirmed.settled_fen, confirmed.volume_ml, confirmed.unit_price_fen,
            confirmed.points_earned) == (15_000, 19_100, 785, 150)
    assert (confirmed.card_id, confirmed.spender_account_id, confirmed.station_id,
            confirmed.product) == (card.card_id, card.account_id, "KM-001",
                                   common_pb2.PRODUCT_GASOLINE_92)
    assert confirmed.HasField("create_time") and confirmed.HasField("close_time")
    assert (cancelled.state, cancelled.settled_fen, cancelled.amount_fen) == (
        common_pb2.HOLD_STATE_CANCELLED, 0, 5_000)
    assert cancelled.HasField("close_time") and cancelled.hold_id == dropped.hold.hold_id
    assert events[7].card.status == account_pb2.CARD_STATUS_BLOCKED
    assert events[8].station.station.location.latitude == 25.04
    # one transaction's events are consecutive and share its id
    assert len({e.transaction_id for e in events[3:6]}) == 1
    assert events[2].transaction_id != events[3].transaction_id

    # resuming from any cursor gives exactly the rest
    assert stream(server, after=4) == events[4:]
    assert stream(server, after=len(events)) == []
    # the sum of the streamed entries is the ledger
    streamed: dict[tuple[int, int], int] = {}
    for e in events:
        if e.WhichOneof("payload") == "ledger_entry":
            key = (e.ledger_entry.kind, e.ledger_entry.asset)
            streamed[key] = streamed.get(key, 0) + e.ledger_entry.amount
    assert streamed == ledger_totals(db)
    # nothing personal in the stream
    blob = b"".join(e.SerializeToString() for e in events)
    assert card.card_number.encode() not in blob and "测试用户".encode() not in blob


def test_a_transaction_that_commits_late_is_not_skipped(server: RunningServer,
                                                         database_url: str) -> None:
    first = builders.open_card(server)
    second = builders.open_card(server)
    before = stream(server)
    cursor = before[-1].position

    def recharge_in(conn: psycopg.Connection[Any], account_id: str, amount: int) -> None:
        conn.execute(
            "SELECT fc.recharge(p_caller => '', p_request_id => %(request_id)s,"
            " p_request_hash => '\\x00', p_account_uid => %(account_uid)s::uuid,"
            " p_channel => 2::smallint, p_channel_txn_id => %(channel_txn_id)s,"
            " p_amount_fen => %(amount_fen)s, p_now => now())",
            {"request_id": builders.rid("late"), "account_uid": account_id,
             "channel_txn_id": f"wx-{uuid.uuid4().hex}", "amount_fen": amount})

    with psycopg.connect(database_url) as early, psycopg.connect(database_url) as late:
        # `late` writes first (lower journal and outbox ids) and commits last
        recharge_in(late, first.account_id, 111)
        recharge_in(early, second.account_id, 222)
        early.commit()
        seen = stream(server, after=cursor)
        assert [e.ledger_entry.amount for e in seen] == [222]
        cursor = seen[-1].position
        late.commit()
    ids = server.run(lambda: _journal_ids(server))
    assert ids[111] < ids[222], "the late transaction holds the lower journal id"
    after = stream(server, after=cursor)
    assert [e.ledger_entry.amount for e in after] == [111]
    assert after[0].position == cursor + 1


async def _journal_ids(server: RunningServer) -> dict[int, int]:
    db = server.server._db
    assert db is not None
    rows = await db.fetch_all("SELECT amount, id FROM fc.journal WHERE kind = 1", ())
    return {int(a): int(i) for a, i in rows}


def test_concurrent_writers_give_gap_free_positions(server: RunningServer,
                                                    db: psycopg.Connection[Any]) -> None:
    cards = [builders.open_card(server, balance_fen=100_000) for _ in range(4)]
    errors: list[BaseException] = []

    def pump(card: builders.FundedCard) -> None:
        try:
            for _ in range(15):
                hold = builders.authorize(server, card, 1_000).hold
                builders.confirm(server, hold.hold_id, 700)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    seen: list[Event] = []
    threads = [threading.Thread(target=pump, args=(c,)) for c in cards]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):  # read while they write
        seen += stream(server, after=seen[-1].position if seen else 0)
    for t in threads:
        t.join()
    assert not errors
    seen += stream(server, after=seen[-1].position)
    assert [e.position for e in seen] == list(range(1, len(seen) + 1))
    sales = [e for e in seen if e.WhichOneof("payload") == "ledger_entry"
             and e.ledger_entry.kind == events_pb2.LEDGER_ENTRY_KIND_PURCHASE]
    assert len(sales) == 60 and len({e.ledger_entry.entry_id for e in sales}) == 60
    # per account, the stream's order is the order its (sequential) sales happened in
    for card in cards:
        made = [e.hold.hold_id for e in seen if e.WhichOneof("payload") == "hold"
                and e.hold.card_id == card.card_id]
        rows = db.execute("SELECT h.uid::text FROM fc.holds h JOIN fc.cards c ON c.id = h.card_id"
                          " WHERE c.uid = %s::uuid ORDER BY h.id", (card.card_id,)).fetchall()
        assert made == [r[0] for r in rows]


def test_follow_delivers_what_commits_after_the_stream_opened(server: RunningServer) -> None:
    card = builders.open_card(server)
    cursor = stream(server)[-1].position
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    call = stub.StreamEvents(events_pb2.StreamEventsRequest(after_position=cursor, follow=True),
                             timeout=30)
    got: queue.Queue[events_pb2.StreamEventsResponse] = queue.Queue()

    def read() -> None:
        try:
            for message in call:
                got.put(message)
        except grpc.RpcError:
            pass  # cancelled below

    reader = threading.Thread(target=read)
    reader.start()
    try:
        builders.recharge(server, card.account_id, 4_321)
        # the background sequencer's round (its timer is off in tests); a
        # following stream never positions events itself
        assert server.sequence_events() == 1
        message = got.get(timeout=10)
        assert [e.ledger_entry.amount for e in message.events] == [4_321]
        assert message.events[0].position == cursor + 1
    finally:
        call.cancel()  # type: ignore[no-untyped-call]
        reader.join(timeout=10)


def test_bad_cursors_are_refused(server: RunningServer) -> None:
    builders.open_card(server)
    stub = events_pb2_grpc.EventServiceStub(server.channel)

    def first(request: events_pb2.StreamEventsRequest) -> object:
        return next(iter(stub.StreamEvents(request, timeout=10)))

    expect(lambda: first(events_pb2.StreamEventsRequest(after_position=-1)),
           grpc.StatusCode.INVALID_ARGUMENT, "AFTER_POSITION_NEGATIVE", "after_position")
    expect(lambda: first(events_pb2.StreamEventsRequest(max_batch=5001)),
           grpc.StatusCode.INVALID_ARGUMENT, "MAX_BATCH_OUT_OF_RANGE", "max_batch")
    server.sequence_events()
    expect(lambda: first(events_pb2.StreamEventsRequest(after_position=10_000)),
           grpc.StatusCode.FAILED_PRECONDITION, "CURSOR_AHEAD_OF_STREAM")


def test_pruned_events_expire_old_cursors(server: RunningServer, db: psycopg.Connection[Any]
                                          ) -> None:
    import datetime as dt
    builders.open_card(server, balance_fen=1_000)
    assert server.sequence_events() == 3
    server.advance(dt.timedelta(days=8))  # past the 7-day retention
    builders.recharge(server, builders.open_card(server).account_id, 500)
    assert server.run(lambda: server.server._sequencer.prune_once()) == 3  # type: ignore[union-attr]
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    expect(lambda: next(iter(stub.StreamEvents(events_pb2.StreamEventsRequest(after_position=1),
                                               timeout=10))),
           grpc.StatusCode.FAILED_PRECONDITION, "CURSOR_EXPIRED")
    rest = stream(server, after=3)
    assert [e.position for e in rest] == [4, 5, 6]
    assert db.execute("SELECT min(position) FROM fc.events").fetchone() == (4,)



def test_events_pruned_after_a_stream_started_end_it_instead_of_being_skipped(
        server: RunningServer, db: psycopg.Connection[Any]) -> None:
    # The cursor is checked against the pruned horizon when a stream opens;
    # events pruned after that (a stream behind by the retention) were
    # skipped silently. Played by deleting the first events without moving
    # the horizon, as if pruned between the check and the read.
    builders.open_card(server, balance_fen=1_000)
    builders.open_card(server, balance_fen=1_000)
    assert server.sequence_events() == 6
    db.execute("DELETE FROM fc.events WHERE position <= 3")
    stub = events_pb2_grpc.EventServiceStub(server.channel)
    received: list[int] = []
    with pytest.raises(grpc.RpcError) as err:
        for message in stub.StreamEvents(events_pb2.StreamEventsRequest(after_position=0),
                                         timeout=10):
            received += [e.position for e in message.events]
    assert received == []
    assert (unpack(err.value).code, unpack(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CURSOR_EXPIRED")
    assert [e.position for e in stream(server, after=3)] == [4, 5, 6]

def test_only_analytics_and_admin_callers_may_stream(tls_server: TlsServer) -> None:
    request = events_pb2.StreamEventsRequest()
    for name in ("analytics-bi", "admin-ops"):
        stub = events_pb2_grpc.EventServiceStub(tls_server.channel(name))
        assert list(stub.StreamEvents(request, timeout=10)) == []
    for name in ("pos-KM-001-T1", "adapter-wechat-gw"):
        stub = events_pb2_grpc.EventServiceStub(tls_server.channel(name))
        expect(lambda s=stub: list(s.StreamEvents(request, timeout=10)),  # type: ignore[misc]
               grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


def test_event_streams_are_admitted_like_other_report_calls(database_url: str,
                                                            tmp_path: Path) -> None:
    """StreamEvents is outside the unary rpc decorator, so it admits itself:
    past max_event_streams a stream is refused at once (RESOURCE_EXHAUSTED
    OVERLOADED with a RetryInfo hint, like every shed call), a stream's slot
    comes back when the client cancels it, and the server stops with one
    open. Idle following streams take nothing from the transaction pool the
    pumps need: they never run the sequencer (only the background loop
    does), they read positioned events through the read pool."""
    import datetime as dt
    import time

    from fuelcard_server.clock import ManualClock
    from google.rpc import error_details_pb2, status_pb2

    from tests.plugins.server import ServerThread, make_settings
    settings = make_settings(tmp_path, load_shedding=True, max_event_streams=2,
                             max_reports_per_s=0)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    port = thread.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    server = RunningServer(f"127.0.0.1:{port}", database_url, clock, settings, thread.server,
                           thread.loop, channel)
    stub = events_pb2_grpc.EventServiceStub(channel)
    calls: list[Any] = []
    ended: queue.Queue[grpc.StatusCode] = queue.Queue()
    readers: list[threading.Thread] = []

    def follow() -> None:
        """Open a following stream; return once its first batch arrived."""
        call = stub.StreamEvents(events_pb2.StreamEventsRequest(follow=True), timeout=60)
        calls.append(call)
        first: queue.Queue[object] = queue.Queue()

        def read() -> None:
            try:
                for message in call:
                    first.put(message)
            except grpc.RpcError as exc:
                first.put(exc)
                ended.put(exc.code())
        readers.append(threading.Thread(target=read))
        readers[-1].start()
        got = first.get(timeout=30)
        if isinstance(got, grpc.RpcError):
            raise got
        assert isinstance(got, events_pb2.StreamEventsResponse)

    try:
        builders.open_card(server)
        assert server.sequence_events() > 0
        follow()
        follow()
        for _ in range(4):
            refused = expect(lambda: next(iter(stub.StreamEvents(
                events_pb2.StreamEventsRequest(follow=True), timeout=10))),
                grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
            retry = [d for d in status_pb2.Status.FromString(refused.raw).details
                     if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert len(retry) == 1
        # Both streams are idle now: they look for events on the read pool
        # (and wait for the sequencer's rounds), never on the transaction pool.
        db, reads = thread.server._db, thread.server._reads
        assert db is not None and reads is not None
        before = db.pool.get_stats().get("requests_num", 0)
        read_before = reads.pool.get_stats().get("requests_num", 0)
        deadline = time.monotonic() + 30
        while reads.pool.get_stats().get("requests_num", 0) < read_before + 8:
            assert time.monotonic() < deadline, "idle streams stopped looking for events"
            time.sleep(0.05)
        assert db.pool.get_stats().get("requests_num", 0) == before, \
            "idle streams used the transaction pool"
        # A cancelled stream gives its slot back.
        calls[0].cancel()
        readers[0].join(timeout=10)
        assert ended.get(timeout=10) == grpc.StatusCode.CANCELLED
        while True:
            try:
                follow()
                break
            except grpc.RpcError as exc:  # the slot is released as the handler unwinds
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "a cancelled stream kept its slot"
                time.sleep(0.05)
    finally:
        thread.stop()  # two streams still open: stop ends them
        for r in readers:
            r.join(10)
        channel.close()
    assert not any(r.is_alive() for r in readers)
