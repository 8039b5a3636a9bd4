"""The known-answer vectors of docs/TERMINAL_PROTOCOL.md, recomputed with
the server's own code, so that the document a terminal vendor builds from
cannot drift from what the server does.

The MAC vectors go further than keys.canonical: the fields a MAC covers are
captured from the TransactionService handlers themselves (the arguments they
hand to the MAC check), so a change of field order on the server breaks this
test, not a terminal in the field.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import types
from pathlib import Path
from typing import Any, cast

import pytest
from fuelcard.v1 import transaction_pb2
from fuelcard_server import gm, keys
from fuelcard_server.identity import Caller, Role
from fuelcard_server.services.transaction import TransactionService
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

DOC = Path(__file__).resolve().parent.parent / "docs" / "TERMINAL_PROTOCOL.md"
Value = str | int | bytes
Vector = dict[str, Value]

# What the document promises to cover: each prefix must name at least one vector.
KINDS = ("canonical/", "kdf/", "session-key/", "pin-key", "pin-block", "mac/authorize",
         "mac/confirm", "mac/cancel", "mac/reverse-authorization")
REQUESTS: dict[str, type[Message]] = {
    "Authorize": transaction_pb2.AuthorizeRequest,
    "Confirm": transaction_pb2.ConfirmRequest,
    "Cancel": transaction_pb2.CancelRequest,
    "ReverseAuthorization": transaction_pb2.ReverseAuthorizationRequest,
}


def parse_value(key: str, text: str) -> Value:
    """The document's value syntax: `_hex` keys hold bytes, quoted values are
    JSON strings, anything else is a decimal integer."""
    if key.endswith("_hex"):
        return bytes.fromhex(text)
    if text.startswith('"'):
        value = json.loads(text)
        assert isinstance(value, str), (key, text)
        return value
    return int(text)


def parse_vectors(text: str) -> dict[str, Vector]:
    vectors: dict[str, Vector] = {}
    for body in re.findall(r"^```vector\n(.*?)^```$", text, re.S | re.M):
        vector: Vector = {}
        for line in body.splitlines():
            key, sep, raw = line.partition("=")
            assert sep, f"not a `key = value` line: {line!r}"
            key = key.strip()
            assert key not in vector, f"{key} twice in a vector"
            vector[key] = parse_value(key, raw.strip())
        name = vector.pop("name")
        assert isinstance(name, str) and name not in vectors, name
        vectors[name] = vector
    return vectors


VECTORS = parse_vectors(DOC.read_text(encoding="utf-8"))


def named(prefix: str) -> list[str]:
    return sorted(n for n in VECTORS if n.startswith(prefix))


def b(v: Vector, key: str) -> bytes:
    value = v[key]
    assert isinstance(value, bytes), key
    return value


def s(v: Vector, key: str) -> str:
    value = v[key]
    assert isinstance(value, str), key
    return value


def i(v: Vector, key: str) -> int:
    value = v[key]
    assert isinstance(value, int), key
    return value


def working_key(v: Vector) -> keys.WorkingKey:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # the window plays no part in derivations
    return keys.WorkingKey(s(v, "terminal_id"), i(v, "key_version"), now, now,
                           b(v, "working_key_hex"))


def test_the_document_has_vectors_of_every_kind() -> None:
    for kind in KINDS:
        assert named(kind), f"no {kind} vector in {DOC.name}"


def test_vector_syntax() -> None:
    assert parse_vectors('```vector\nname = "x"\na_hex =\nb = "\\u6cb9"\nc = 0\n```\n') == {
        "x": {"a_hex": b"", "b": "油", "c": 0}}
    with pytest.raises(AssertionError):
        parse_vectors('```vector\nname = "x"\nno equals sign\n```\n')


@pytest.mark.parametrize("name", named("canonical/"))
def test_canonical_encoding(name: str) -> None:
    v = VECTORS[name]
    value = v["value_hex"] if v["type"] == "bytes" else v["value"]
    assert {"int": int, "str": str, "bytes": bytes}[s(v, "type")] is type(value)
    assert keys.canonical(value) == b(v, "encoded_hex")


@pytest.mark.parametrize("name", named("kdf/"))
def test_kdf(name: str) -> None:
    v = VECTORS[name]
    out = b(v, "output_hex")
    assert len(out) == i(v, "length")
    assert gm.sm3_kdf(b(v, "z_hex"), b"", i(v, "length")) == out
    # The GB/T 32918.4 KDF: the first block is SM3(Z || 00000001).
    assert out[:32] == gm.sm3(b(v, "z_hex") + b"\x00\x00\x00\x01")


@pytest.mark.parametrize("name", named("session-key/"))
def test_session_key(name: str) -> None:
    v = VECTORS[name]
    info = keys.canonical("fuelcard", "session/v1", s(v, "terminal_id"), i(v, "key_version"),
                          i(v, "terminal_counter"))
    assert info == b(v, "info_hex")
    session = keys.session_key(working_key(v), i(v, "terminal_counter"))
    assert session == b(v, "session_key_hex")
    # The document's formula, KDF(working_key || info, 16), says the same.
    assert gm.sm3_kdf(b(v, "working_key_hex") + info, b"", 16) == session


def test_pin_key() -> None:
    v = VECTORS["pin-key"]
    info = keys.canonical("fuelcard", "pin/v1", s(v, "terminal_id"), i(v, "key_version"))
    assert info == b(v, "info_hex")
    assert keys.pin_key(working_key(v)) == b(v, "pin_key_hex")
    assert gm.sm3_kdf(b(v, "working_key_hex") + info, b"", 16) == b(v, "pin_key_hex")


def test_pin_block() -> None:
    v = VECTORS["pin-block"]
    pin, pan, key = s(v, "pin").encode(), s(v, "card_number"), b(v, "pin_key_hex")
    assert keys.encode_pin_block(pin, pan) == b(v, "clear_block_hex")
    assert keys.encrypt_pin_block(key, pin, pan) == b(v, "pin_block_hex")
    assert keys.decrypt_pin_block(key, b(v, "pin_block_hex"), pan) == pin
    # The PIN key of the pin-key vector is the one this block is under.
    assert key == b(VECTORS["pin-key"], "pin_key_hex")


class _MacFields(Exception):
    def __init__(self, fields: tuple[bytes | str | int, ...]) -> None:
        super().__init__("captured")
        self.fields = fields


def server_mac_fields(rpc: str, request: Message, terminal: str, station: str
                      ) -> tuple[bytes | str | int, ...]:
    """The fields the server's handler for `rpc` MACs, in its order: the
    handler runs (validation included) up to its MAC check, which records
    what it was given and stops the call."""

    async def terminal_auth(mac: bytes, key_version: int, counter: int,
                            *fields: bytes | str | int) -> tuple[str, int]:
        raise _MacFields(fields)

    deps = types.SimpleNamespace(
        settings=types.SimpleNamespace(max_authorize_fen=1_000_000),
        identity=lambda: Caller(Role.POS, terminal, station),
        terminal_auth=terminal_auth)
    servicer = TransactionService(cast(Any, deps))
    handler = getattr(TransactionService, rpc).__wrapped__  # the handler without the rpc wrapper
    with pytest.raises(_MacFields) as captured:
        asyncio.run(handler(servicer, request, None))
    return captured.value.fields


def request_of(v: Vector) -> Message:
    request = REQUESTS[s(v, "rpc")]()
    for field in request.DESCRIPTOR.fields:
        key = field.name + ("_hex" if field.type == field.TYPE_BYTES else "")
        if key in v:
            setattr(request, field.name, v[key])
        else:
            assert field.name == "mac", f"the vector lacks {key}"
    return request


@pytest.mark.parametrize("name", named("mac/"))
def test_mac(name: str) -> None:
    v = VECTORS[name]
    request = request_of(v)
    terminal = s(v, "terminal_id") if "terminal_id" in v else "KM-001-T1"
    fields = server_mac_fields(s(v, "rpc"), request, terminal, "KM-001")
    mac_input = keys.canonical(*fields)
    assert mac_input == b(v, "mac_input_hex")
    working = keys.WorkingKey(terminal, i(v, "key_version"), dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                              dt.datetime(2026, 1, 1, tzinfo=dt.UTC), b(v, "working_key_hex"))
    session = keys.session_key(working, i(v, "terminal_counter"))
    assert session == b(v, "session_key_hex")
    assert keys.mac(session, mac_input) == b(v, "mac_hex")
    assert len(b(v, "mac_hex")) == keys.MAC_SIZE == 32
    assert keys.verify_mac(session, mac_input, b(v, "mac_hex"))


def _table_row(rpc: str) -> list[str]:
    """The field names of an RPC's MAC input in the document's table."""
    m = re.search(rf'^ *\| {rpc} \| E\("{rpc}", ([a-z_, ]+)\) \|$', DOC.read_text(encoding="utf-8"),
                  re.M)
    assert m, f"no MAC layout row for {rpc}"
    return [f.strip() for f in m.group(1).split(",")]


@pytest.mark.parametrize("rpc", sorted(REQUESTS))
def test_mac_layout_table_matches_the_server(rpc: str) -> None:
    # A request whose every field holds a value no other field holds, so the
    # captured values name the fields they came from.
    request = REQUESTS[rpc]()
    names: dict[bytes | str | int, str] = {}
    descriptors: list[FieldDescriptor] = [cast(FieldDescriptor, f) for f in request.DESCRIPTOR.fields]
    for n, field in enumerate(descriptors, start=1):
        if field.name == "mac":
            continue
        value: bytes | str | int
        if field.name in ("terminal_id", "station_id"):
            value = {"terminal_id": "KM-001-T1", "station_id": "KM-001"}[field.name]
        elif field.name == "card_number":
            value = "6222021234567890128"
        elif field.name == "hold_id":
            value = "3f1c2a9e-5b7d-4e21-9a63-0c8d4f6b2e15"
        elif field.name == "product":
            value = 3
        elif field.type == field.TYPE_STRING:
            value = f"{field.name}-{n}"
        elif field.type == field.TYPE_BYTES:
            value = bytes([n]) * 16
        else:
            value = 100 + n
        setattr(request, field.name, value)
        names[value] = field.name
    fields = server_mac_fields(rpc, request, "KM-001-T1", "KM-001")
    assert fields[0] == rpc
    assert [names[f] for f in fields[1:]] == _table_row(rpc)


def test_annotated_mac_input_is_the_vector() -> None:
    """The field-by-field breakdown in the document adds up to its vector."""
    m = re.search(r"^```annotated\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.S | re.M)
    assert m, "no annotated MAC input"
    hex_text = "".join(line.split("#")[0].replace(" ", "") for line in m.group(1).splitlines())
    assert bytes.fromhex(hex_text) == b(VECTORS["mac/cancel"], "mac_input_hex")
