"""What an integrator can discover without the Python source: server
reflection over the mutual-TLS demo (the README's grpcurl example, done with
the grpc_reflection client because grpcurl is not installed here), the
released contract image, and the README's table of services.

The server is started on exactly the certificate layout `fuelcard serve
--demo --tls` makes (fuelcard_server.cli.demo_certs), so the file names the
README gives to grpcurl are the ones that work.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fuelcard_server.app import SERVICE_NAMES
from fuelcard_server.cli import demo_certs
from fuelcard_server.clock import ManualClock
from google.protobuf import descriptor_pb2, descriptor_pool
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
