"""Issue 20, item 3: every error readable.

Bytes that are not a request message (corrupt wire format, a string field
that is not UTF-8) and requests with hundreds of bad fields both answer
INVALID_ARGUMENT with exactly one ErrorInfo, and a BadRequest small enough
for gRPC's trailers; and they change nothing. Through real gRPC on loopback:
the raw bytes go out on a generic channel call with no serializer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
from fuelcard.v1 import (
    common_pb2,
    control_pb2,
    events_pb2,
    events_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
    transaction_pb2,
)
from fuelcard_server.errors import (
    FIELD_CHARS_MAX,
    VIOLATION_COUNT_KEY,
    VIOLATIONS_LISTED,
    FieldViolation,
    invalid,
)
from fuelcard_server.health import SERVICE_NAMES
from fuelcard_server.validation import LOCATE_FIELDS_MAX, undecodable
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, RichError, rpc_error, snapshot

IA = grpc.StatusCode.INVALID_ARGUMENT
# Not a message of any type: a tag whose varint never ends.
CORRUPT = b"\xff\xff\xff"
# A status this size fits the trailers of every gRPC client (8 KiB is the
# smallest default limit, and the status travels base64-encoded, next to a
# grpc-message that repeats its message).
STATUS_BYTES_MAX = 4096
AUTHORIZE = "/fuelcard.v1.TransactionService/Authorize"
BATCH_TOP_UP = "/fuelcard.v1.ControlService/BatchTopUp"
STREAM_EVENTS = "/fuelcard.v1.EventService/StreamEvents"


def _methods() -> Iterator[tuple[str, bool]]:
    """(path, whether its answers stream) of every RPC the server serves."""
    pool = descriptor_pool.Default()
    for service in SERVICE_NAMES:
        for method in pool.FindServiceByName(service).methods:
            yield f"/{service}/{method.name}", method.server_streaming


def _send_raw(server: RunningServer, path: str, data: bytes, streaming: bool = False) -> RichError:
    """Send `data` byte for byte as the request of `path`; the call must fail."""
    # no serializers: bytes go out as they are, and come back as they are
    if streaming:
        stream = server.channel.unary_stream(path, None, None)
        return rpc_error(lambda: list(stream(data, timeout=30)))
    call = server.channel.unary_unary(path, None, None)
    return rpc_error(lambda: call(data, timeout=30))


def _assert_malformed(e: RichError, field: str, reason: str) -> None:
    assert e.code == IA, (e.code, e.message)
    assert len(e.infos) == 1 and e.infos[0].domain == "fuelcard.v1", e.infos
    assert e.reason == "MALFORMED_REQUEST"
    assert e.bad_request is not None
    assert [(v.field, v.reason) for v in e.bad_request.field_violations] == [(field, reason)]


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


def test_corrupt_bytes_to_every_rpc_answer_invalid_argument(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    before = snapshot(db)
    methods = list(_methods())
    assert (AUTHORIZE, False) in methods and (STREAM_EVENTS, True) in methods
    for path, streaming in methods:
        e = _send_raw(server, path, CORRUPT, streaming)
        _assert_malformed(e, "", "WIRE_FORMAT_CORRUPT")
        assert e.message.startswith("the request is not a valid fuelcard.v1."), e.message
    assert snapshot(db) == before

    # The guard lets real requests through, unary and streaming.
    assert builders.authorize(server, card, 1_000).decision == common_pb2.DECISION_APPROVED
    server.sequence_events()
    answers = list(events_pb2_grpc.EventServiceStub(server.channel).StreamEvents(
        events_pb2.StreamEventsRequest(after_position=0, follow=False), timeout=30))
    assert answers and answers[-1].events


def test_a_string_that_is_not_utf8_is_named(server: RunningServer, db: Conn) -> None:
    card = builders.open_card(server, balance_fen=50_000)
    fleet = cb.open_fleet(server, 100_000, [cb.ALLOCATED])
    before = snapshot(db)

    # The card number of an otherwise good Authorize; the answer never echoes it.
    good = builders.authorize_request(card, 1_000).SerializeToString()
    number = card.card_number.encode()
    bad = _replace_once(good, number, b"\xff" + number[1:])
    with_bad_number = transaction_pb2.AuthorizeRequest()
    try:
        with_bad_number.ParseFromString(bad)
        raise AssertionError("protobuf took a string that is not UTF-8")
    except DecodeError:
        pass
    e = _send_raw(server, AUTHORIZE, bad)
    _assert_malformed(e, "card_number", "FIELD_NOT_UTF8")
    assert card.card_number[1:].encode() not in e.raw

    # Deep in a batch: the path names the line.
    sub = fleet.subs[0].account_id
    request = cb.top_up_request(fleet.parent_id, [(sub, 100), (str(uuid.uuid4()), 100),
                                                  ("bad-line-account", 100)])
    bad = _replace_once(request.SerializeToString(), b"bad-line-account", b"bad-line-acco\xc3(t")
    e = _send_raw(server, BATCH_TOP_UP, bad)
    _assert_malformed(e, "lines[2].account_id", "FIELD_NOT_UTF8")

    # Cut short in the middle of the second line.
    data = request.SerializeToString()
    cut = data[:data.index(b"bad-line-account") - 40]
    e = _send_raw(server, BATCH_TOP_UP, cut)
    _assert_malformed(e, "lines[1]", "WIRE_FORMAT_CORRUPT")

    # And in a stream's request: a cursor field whose varint never ends.
    e = _send_raw(server, STREAM_EVENTS, b"\x08\xff\xff", streaming=True)
    _assert_malformed(e, "after_position", "WIRE_FORMAT_CORRUPT")

    assert snapshot(db) == before
    # the same batch, decodable: it moves money (so the one above was refused for its bytes alone)
    good_batch = cb.top_up_request(fleet.parent_id, [(sub, 100)])
    assert cb.control(server).BatchTopUp(good_batch).decision == cb.APPROVED


def test_a_thousand_bad_lines_answer_a_bounded_invalid_argument(server: RunningServer,
                                                                db: Conn) -> None:
    fleet = cb.open_fleet(server, 100_000, [cb.ALLOCATED])
    before = snapshot(db)
    lines = [(f"not-an-account-{i}", 0) for i in range(1_000)]
    request = cb.top_up_request(fleet.parent_id, lines)
    e = rpc_error(lambda: cb.control(server).BatchTopUp(request, timeout=60))
    assert e.code == IA, (e.code, e.message)
    assert len(e.infos) == 1 and e.reason == "ID_MALFORMED"
    # every line has two bad fields: all counted, the first 20 listed
    assert e.infos[0].metadata[VIOLATION_COUNT_KEY] == "2000"
    assert e.message == f"2000 fields are invalid; the first {VIOLATIONS_LISTED} are listed"
    assert e.fields == [f"lines[{i // 2}].{'account_id' if i % 2 == 0 else 'amount_fen'}"
                        for i in range(VIOLATIONS_LISTED)]
    assert len(e.raw) < STATUS_BYTES_MAX, len(e.raw)
    assert snapshot(db) == before


def test_up_to_twenty_violations_are_all_listed_by_name() -> None:
    def violations(n: int) -> list[FieldViolation]:
        return [FieldViolation(f"lines[{i}].amount_fen", "must be positive", "AMOUNT_NOT_POSITIVE")
                for i in range(n)]

    listed = invalid(violations(VIOLATIONS_LISTED))
    assert listed.message == "invalid request: " + ", ".join(
        f"lines[{i}].amount_fen" for i in range(VIOLATIONS_LISTED))
    assert listed.metadata == {VIOLATION_COUNT_KEY: str(VIOLATIONS_LISTED)}

    over = invalid(violations(VIOLATIONS_LISTED + 1))
    assert over.message == f"{VIOLATIONS_LISTED + 1} fields are invalid; the first 20 are listed"
    assert len(over.violations) == VIOLATIONS_LISTED + 1  # the CLI prints them all
    status = over.to_status()
    assert status.code == IA
    assert len(status.trailing_metadata) == 1  # grpc-status-details-bin

    # All listed, but their names too long for the message: the count.
    long_names = invalid([FieldViolation(f"{i}" + "x" * 200, "unknown key", "RULES_KEY_UNKNOWN")
                          for i in range(10)])
    assert long_names.message == "10 fields are invalid; all are listed"
    assert len(long_names.to_status().trailing_metadata[0][1]) < STATUS_BYTES_MAX


def test_the_search_for_the_bad_field_is_bounded() -> None:
    # More fields than the search looks at, then a bad string: the whole request is named.
    descriptor = control_pb2.BatchTopUpRequest.DESCRIPTOR
    many = control_pb2.BatchTopUpRequest(request_id="r", lines=[
        control_pb2.TopUpLine(amount_fen=1) for _ in range(LOCATE_FIELDS_MAX)])
    tail = control_pb2.BatchTopUpRequest(parent_account_id="xx").SerializeToString()
    data = many.SerializeToString() + _replace_once(tail, b"xx", b"\xff\xff")
    assert undecodable(descriptor, data) == FieldViolation(
        "", undecodable(descriptor, CORRUPT).description, "WIRE_FORMAT_CORRUPT")
    # the same bad string after fewer fields is found
    few = control_pb2.BatchTopUpRequest(request_id="r", lines=[control_pb2.TopUpLine(amount_fen=1)])
    found = undecodable(descriptor, few.SerializeToString() + _replace_once(tail, b"xx", b"\xff\xff"))
    assert (found.field, found.reason) == ("parent_account_id", "FIELD_NOT_UTF8")


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=199), st.binary(max_size=4))
def test_any_bytes_protobuf_refuses_get_a_violation(tail: bytes, at: int, noise: bytes) -> None:
    """Whatever bytes arrive, finding the bad field never raises, and names
    a field of the message (or the whole request)."""
    good = control_pb2.BatchTopUpRequest(
        request_id="r-1", parent_account_id="p", lines=[control_pb2.TopUpLine(
            account_id="账户", amount_fen=5)] * 3).SerializeToString()
    for data in (tail, good[:at] + noise + good[at:]):
        try:
            control_pb2.BatchTopUpRequest.FromString(data)
            continue
        except DecodeError:
            pass
        v = undecodable(control_pb2.BatchTopUpRequest.DESCRIPTOR, data)
        assert v.reason in ("WIRE_FORMAT_CORRUPT", "FIELD_NOT_UTF8")
        assert v.field.split("[")[0].split(".")[0] in ("", "request_id", "parent_account_id", "lines")


def test_long_field_names_from_the_caller_are_clipped(server: RunningServer, db: Conn) -> None:
    """A rule set document names its unknown keys: a caller's own strings,
    of any length, that would otherwise swell the status past the limits."""
    before = snapshot(db)
    document = json.dumps({"name": "x", **{f"{i}-" + "k" * 20_000: 1 for i in range(30)}})
    e = rpc_error(lambda: risk_pb2_grpc.RiskServiceStub(server.channel).LoadRuleSet(
        risk_pb2.LoadRuleSetRequest(request_id=builders.rid(), document=document,
                                    format=risk_pb2.RULE_FORMAT_JSON), timeout=30))
    assert e.code == IA and len(e.infos) == 1 and e.reason == "RULES_KEY_UNKNOWN"
    assert e.infos[0].metadata[VIOLATION_COUNT_KEY] == "30"
    listed = len(e.fields)
    assert 1 <= listed <= VIOLATIONS_LISTED
    assert e.message == f"30 fields are invalid; the first {listed} are listed"
    assert all(f.startswith(f"{i}-kkk") and len(f) <= FIELD_CHARS_MAX
               for i, f in zip(sorted(range(30), key=lambda i: f"{i}-"), e.fields, strict=False))
    assert len(e.raw) < STATUS_BYTES_MAX, len(e.raw)
    assert snapshot(db) == before
