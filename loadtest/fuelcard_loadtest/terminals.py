"""Production mode of the generator: mutual TLS and signed-on terminals.

In production every pump terminal holds its own client certificate (role
pos, CN its terminal id, O its station), keeps its own connection, signs on
for a working key and MACs every Authorize, Confirm, Cancel and reversal
with a fresh transaction counter (clients/fuelcard_pos/terminal.py has the
protocol; the server refuses a counter at or below the last one, so a
terminal has one request in flight at a time). The generator does the
same: one certificate, channel and counter per terminal, a terminal per
closed-loop task (open loop: a pool of them). Recharges, redemptions and
refunds are back-office calls: they go over an admin certificate's channel.

The certificates come from a development CA (fuelcard_server.certs.DevPki)
in one directory: made once for a server the load test starts; for a
--target it is the directory of the CA that issued the server's
certificate (ca.pem and ca.key), so that terminal certificates can be issued.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from fuelcard.v1 import security_pb2, security_pb2_grpc, transaction_pb2
from fuelcard_pos.terminal import WorkingKey, mac, mac_input, session_key
from fuelcard_server.certs import DevPki
from fuelcard_server.identity import Role

ADMIN_NAME = "loadtest"
ADMIN_STEM = f"admin-{ADMIN_NAME}"

TerminalRequest = (transaction_pb2.AuthorizeRequest | transaction_pb2.ConfirmRequest
                   | transaction_pb2.CancelRequest | transaction_pb2.ReverseAuthorizationRequest)


def terminal_name(run_id: str, process: int, k: int) -> str:
    return f"LT-{run_id}-{process}-{k}"


def stem(name: str) -> str:
    """The file stem DevPki gives a terminal's certificate."""
    return f"{Role.POS.value}-{name}"


def server_pki(certs: Path) -> None:
    """The CA, the server's certificate and the generator's admin
    certificate (made once, kept)."""
    pki = DevPki(certs)
    pki.server()
    if not (certs / f"{ADMIN_STEM}.pem").exists():
        pki.client(Role.ADMIN, ADMIN_NAME)


def check_ca(certs: Path) -> None:
    missing = [n for n in ("ca.pem", "ca.key") if not (certs / n).exists()]
    if missing:
        raise ValueError(f"--tls-dir {certs}: no {' or '.join(missing)} there: the generator"
                         " issues its terminals' certificates from the server's CA")


def issue_terminals(certs: Path, station: str, names: list[str]) -> Path:
    """Client certificates for this run's terminals, in a subdirectory of
    `certs` (removed after the run by `remove_terminals`); the CA's files
    are shared by hard link or copy so DevPki finds them there."""
    run_dir = certs / f"run-{station}"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "ca.key"):
        target = run_dir / name
        if not target.exists():
            shutil.copy2(certs / name, target)
    pki = DevPki(run_dir)
    for name in names:
        pki.client(Role.POS, name, station)
    if not (certs / f"{ADMIN_STEM}.pem").exists():
        DevPki(certs).client(Role.ADMIN, ADMIN_NAME)
    return run_dir


def remove_terminals(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)


def credentials(certs: Path, file_stem: str, ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=(certs / f"{file_stem}.key").read_bytes(),
        certificate_chain=(certs / f"{file_stem}.pem").read_bytes())


@dataclass
class Signer:
    """A signed-on terminal's working key and counter."""

    name: str
    working: WorkingKey
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    signed: int = 0

    def sign(self, request: TerminalRequest) -> None:
        """Give `request` (in place) the key version, the next counter and
        its MAC. A resend gets a new counter: the server's fingerprint of a
        request leaves these three out, so a replay is still a replay."""
        request.key_version = self.working.version
        request.terminal_counter = next(self.counter)
        request.mac = mac(session_key(self.working, request.terminal_counter), mac_input(request))
        self.signed += 1


async def sign_on(channel: grpc.aio.Channel, name: str) -> Signer:
    stub = security_pb2_grpc.SecurityServiceStub(channel)
    answer = await stub.SignOn(security_pb2.SignOnRequest(terminal_id=name), timeout=30)
    working = WorkingKey(name, answer.key_version, answer.valid_from.ToDatetime(dt.UTC),
                         answer.valid_until.ToDatetime(dt.UTC), answer.working_key)
    return Signer(name, working, itertools.count(answer.last_counter + 1))
