"""What an integrator can discover without the Python source: server
reflection over the mutual-TLS demo (the README's grpcurl example, done with
the grpc_reflection client because grpcurl is not installed here), the
released contract image, and the README's table of services.

The server is started on exactly the certificate layout `fuelcard serve
--demo --tls` makes (fuelcard_server.cli.demo_certs), so the file names the
README gives to grpcurl are the ones that work.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fuelcard_server import demo
from fuelcard_server.cli import demo_certs
from fuelcard_server.clock import ManualClock
from fuelcard_server.health import SERVICE_NAMES
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.plugins.server import ServerThread, make_settings

ROOT = Path(__file__).resolve().parent.parent
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def proto_services() -> dict[str, list[str]]:
    """Every service declared in proto/ and its RPCs, read from the text
    (what an integrator holds), not from the generated code."""
    services: dict[str, list[str]] = {}
    for path in sorted((ROOT / "proto" / "fuelcard" / "v1").glob("*.proto")):
        current = None
        for line in path.read_text(encoding="utf-8").splitlines():
            if m := re.match(r"service (\w+) \{", line):
                current = f"fuelcard.v1.{m.group(1)}"
                services[current] = []
            elif (m := re.match(r"\s+rpc (\w+)\(", line)) and current is not None:
                services[current].append(m.group(1))
            elif line.startswith("}"):
                current = None
    return services


@pytest.fixture
def demo_tls(database_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A server on mutual TLS with the demo's certificates in DATA_DIR/certs."""
    data_dir = tmp_path / "data"
    certs = data_dir / "certs"
    demo_certs(certs)
    settings = make_settings(data_dir, insecure=False)
    assert settings.certs_dir == certs  # the default place `serve --tls` looks in
    thread = ServerThread(settings, database_url,
                          ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)))
    port = thread.start()
    try:
        yield f"127.0.0.1:{port}", certs
    finally:
        thread.stop()


def terminal_channel(target: str, certs: Path) -> grpc.Channel:
    """As the README's grpcurl line: -cacert ca.pem -cert/-key of the demo
    terminal KM-001-T1."""
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "pos-KM-001-T1.key").read_bytes(),
        certificate_chain=(certs / "pos-KM-001-T1.pem").read_bytes()))


def test_reflection_lists_and_describes_every_service_over_mutual_tls(
        demo_tls: tuple[str, Path]) -> None:
    target, certs = demo_tls
    with terminal_channel(target, certs) as channel:
        reflected = ProtoReflectionDescriptorDatabase(channel)
        # `grpcurl ... list`
        listed = set(reflected.get_services())
        assert listed == {*proto_services(), HEALTH, REFLECTION}
        assert listed == {*SERVICE_NAMES, HEALTH, REFLECTION}
        # `grpcurl ... describe fuelcard.v1.<Service>`: every RPC of proto/,
        # resolved with its request type from what the server sends
        pool = descriptor_pool.DescriptorPool(reflected)
        for name, rpcs in proto_services().items():
            service = pool.FindServiceByName(name)
            assert [m.name for m in service.methods] == rpcs, name
        authorize = pool.FindMethodByName("fuelcard.v1.TransactionService.Authorize")
        assert authorize.input_type.full_name == "fuelcard.v1.AuthorizeRequest"
        assert "card_number" in authorize.input_type.fields_by_name


def readme_grpcurl() -> tuple[dict[str, str], list[list[str]]]:
    """The README's grpcurl example: its certificate flags and each call's
    arguments after the target."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    flags = re.search(r'^C="(.*)"$', readme, re.MULTILINE)
    assert flags is not None, "the README's grpcurl example sets C"
    words = shlex.split(flags.group(1))
    files = dict(zip(words[::2], words[1::2], strict=True))
    calls = []
    for line in re.findall(r"^grpcurl \$C (.*)$", readme, re.MULTILINE):
        args = shlex.split(line)
        data = args[args.index("-d") + 1] if "-d" in args else None
        rest = [a for a in args if a not in ("-d", data)]
        assert rest[0] == "127.0.0.1:50051", line  # the demo's port
        calls.append([*rest[1:], *([data] if data is not None else [])])
    return files, calls


def test_the_readme_grpcurl_example_works_against_the_demo(demo_tls: tuple[str, Path]) -> None:
    """Each grpcurl line of the README, done as grpcurl does it: methods and
    messages from reflection, requests from the JSON given with -d."""
    target, certs = demo_tls
    files, calls = readme_grpcurl()
    assert set(files) == {"-cacert", "-cert", "-key"}
    for path in files.values():  # the files `scripts/demo` (--data-dir data) makes
        assert path.startswith("data/certs/") and (certs / Path(path).name).is_file(), path
    assert [c[0] for c in calls] == ["list", "describe", "fuelcard.v1.TransactionService/GetCardBalance",
                                     "grpc.health.v1.Health/Check"]
    made = asyncio.run(demo.seed(target, certs))
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / Path(files["-cacert"]).name).read_bytes(),
        private_key=(certs / Path(files["-key"]).name).read_bytes(),
        certificate_chain=(certs / Path(files["-cert"]).name).read_bytes())
    answers: dict[str, dict[str, Any]] = {}
    with grpc.secure_channel(target, creds) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        for call in calls:
            if call[0] == "list":
                assert "fuelcard.v1.TransactionService" in ProtoReflectionDescriptorDatabase(
                    channel).get_services()
            elif call[0] == "describe":
                assert pool.FindServiceByName(call[1]).methods_by_name
            else:
                service, method_name = call[0].rsplit("/", 1)
                method = pool.FindServiceByName(service).methods_by_name[method_name]
                request_class = message_factory.GetMessageClass(method.input_type)
                response_class = message_factory.GetMessageClass(method.output_type)
                request = json_format.Parse(call[1], request_class())
                invoke = channel.unary_unary(f"/{service}/{method_name}",
                                             request_serializer=lambda m: m.SerializeToString(),
                                             response_deserializer=response_class.FromString)
                answers[call[0]] = json_format.MessageToDict(invoke(request, timeout=10),
                                                             preserving_proto_field_name=True)
    balance = answers["fuelcard.v1.TransactionService/GetCardBalance"]
    card, account_id = made[0]
    assert json.loads(calls[2][1])["card_number"] == card.card_number  # a demo card
    assert (balance["account_id"], balance["balance"]["balance_fen"]) == (
        account_id, str(card.recharge_fen))
    assert answers["grpc.health.v1.Health/Check"] == {"status": "SERVING"}


def test_reflection_needs_a_client_certificate(demo_tls: tuple[str, Path]) -> None:
    # Mutual TLS covers reflection too: without a client certificate the
    # handshake fails before any service is listed.
    target, certs = demo_tls
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    with grpc.secure_channel(target, creds) as channel, pytest.raises(grpc.RpcError) as err:
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_released_contract_holds_every_proto() -> None:
    # buf breaking guards only what the image holds: a proto missing from it
    # could lose fields without CI noticing (four were missing once).
    image = descriptor_pb2.FileDescriptorSet.FromString(
        (ROOT / "contract" / "fuelcard-v1.binpb").read_bytes())
    in_image = {f.name for f in image.file if f.name.startswith("fuelcard/")}
    in_proto = {f"fuelcard/v1/{p.name}" for p in (ROOT / "proto" / "fuelcard" / "v1").glob("*.proto")}
    assert in_image == in_proto
    released = {f"{f.package}.{s.name}": [m.name for m in s.method]
                for f in image.file for s in f.service}
    for name, rpcs in released.items():
        assert set(rpcs) <= set(proto_services()[name]), name


def test_readme_table_names_every_service_and_rpc() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+Service)` \|[^|]*\|(.*)\|$",
                                                         readme, re.MULTILINE)}
    for name, rpcs in proto_services().items():
        short = name.removeprefix("fuelcard.v1.")
        assert short in rows, f"README's services table lacks {short}"
        assert re.findall(r"`(\w+)`", rows[short]) == rpcs, short
