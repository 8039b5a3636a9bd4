"""Terminal identity = (station, terminal) (issue 15 item 7): two stations
that both name a terminal "T1" have their own working keys and counters and
cannot confirm, cancel or read each other's holds; and a retry re-signed under
the next key version is the same request. Over mutual TLS, as terminals
connect."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import transaction_pb2
from fuelcard_server.certs import DevPki
from fuelcard_server.identity import Role

from tests.plugins.server import TlsServer
from tests.plugins.terminals import Fixture, Terminal, expect, rid, sign_on
from tests.support.ledger_asserts import Conn, scalar

NAME = "T1"


@dataclass
class TwoStations:
    setup: Fixture
    a: Terminal
    b: Terminal


@pytest.fixture
def stations(setup: Fixture, tmp_path: Path) -> Iterator[TwoStations]:
    """Terminal "T1" of station S-A and terminal "T1" of station S-B, each
    with its own certificate from the server's development CA."""
    certs = tmp_path / "two-t1"
    certs.mkdir()
    for f in ("ca.pem", "ca.key"):
        shutil.copy(setup.server.certs / f, certs / f)
    pki = DevPki(certs)
    for station in ("S-A", "S-B"):
        issued = pki.client(Role.POS, NAME, station)
        issued.cert.rename(certs / f"pos-T1-{station}.pem")
        issued.key.rename(certs / f"pos-T1-{station}.key")
    handle = TlsServer(setup.server.target, setup.server.database_url, setup.server.clock, certs)
    try:
        yield TwoStations(setup, sign_on(handle, "pos-T1-S-A", NAME, "S-A"),
                          sign_on(handle, "pos-T1-S-B", NAME, "S-B"))
    finally:
        for ch in handle.channels:
            ch.close()


def _cancel(t: Terminal, hold_id: str) -> transaction_pb2.CancelRequest:
    req = transaction_pb2.CancelRequest(request_id=rid(), hold_id=hold_id,
                                        key_version=t.working.version,
                                        terminal_counter=next(t.counter))
    req.mac = t.mac(req.terminal_counter, "Cancel", req.request_id, req.hold_id, req.key_version,
                    req.terminal_counter)
    return req


def _counter(db: Conn, station: str) -> int:
    n: int = scalar(db, "SELECT last_counter FROM fc.terminals WHERE station_id = %s AND terminal_id = %s",
                    (station, NAME))
    return n


def test_two_stations_t1_have_their_own_keys_and_counters(stations: TwoStations, db: Conn) -> None:
    a, b, card = stations.a, stations.b, stations.setup.card_number
    assert a.working.key != b.working.key
    for _ in range(3):
        assert a.pos.Authorize(a.authorize(card, 1_000)).hold.hold_id
    assert _counter(db, "S-A") == 3
    # S-B's T1 starts its own count at 1: S-A's counter does not make it a replay.
    assert b.pos.Authorize(b.authorize(card, 1_000)).hold.hold_id
    assert (_counter(db, "S-A"), _counter(db, "S-B")) == (3, 1)
    # A request MACed under S-A's key does not pass as S-B's T1.
    with pytest.raises(grpc.RpcError) as err:
        b.pos.Authorize(a.authorize(card, 1_000, station="S-B"))
    expect(err.value, grpc.StatusCode.UNAUTHENTICATED, "MAC_INVALID")


def test_a_t1_cannot_touch_another_stations_t1_holds(stations: TwoStations, db: Conn) -> None:
    a, b, card = stations.a, stations.b, stations.setup.card_number
    hold = a.pos.Authorize(a.authorize(card, 5_000)).hold
    for call in (lambda: b.pos.Cancel(_cancel(b, hold.hold_id)),
                 lambda: b.pos.Confirm(b.confirm(hold.hold_id, 4_000))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        expect(err.value, grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_HOLD")
    with pytest.raises(grpc.RpcError) as err:
        b.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id))
    expect(err.value, grpc.StatusCode.NOT_FOUND, "HOLD_NOT_FOUND")
    assert scalar(db, "SELECT state FROM fc.holds WHERE uid = %s", (hold.hold_id,)) == 1
    # Its own terminal still can.
    assert a.pos.GetHold(transaction_pb2.GetHoldRequest(hold_id=hold.hold_id)).hold.hold_id == hold.hold_id
    assert a.pos.Confirm(a.confirm(hold.hold_id, 4_000)).hold.hold_id == hold.hold_id


def _next_period(t: Terminal, server: TlsServer) -> Terminal:
    """Past the daily rotation (16:00 UTC), inside the old key's overlap: the
    terminal signs on again and gets the next key version."""
    server.clock.advance(dt.timedelta(hours=8, minutes=10))
    again = sign_on(server, f"pos-{t.name}", t.name, t.station)
    assert again.working.version == t.working.version + 1
    return again


def test_a_retry_re_signed_under_the_next_key_version_gets_the_first_answer(setup: Fixture) -> None:
    t1, card = setup.t1, setup.card_number
    plain, with_pin = rid(), rid()
    first = t1.pos.Authorize(t1.authorize(card, 2_000, request_id=plain))
    t1.pos.Authorize(t1.authorize(card, 2_000, request_id=with_pin, pin=b"1234"))
    again = _next_period(t1, setup.server)
    retry = again.pos.Authorize(again.authorize(card, 2_000, request_id=plain))
    assert retry == first
    # A PIN block is encrypted under the key: re-encrypted under the next
    # version it is another request (docs/TERMINAL_PROTOCOL.md, section 8).
    with pytest.raises(grpc.RpcError) as err:
        again.pos.Authorize(again.authorize(card, 2_000, request_id=with_pin, pin=b"1234"))
    expect(err.value, grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED")
