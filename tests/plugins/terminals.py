"""A terminal over mutual TLS, for security tests: it signs on for its
working key, MACs its requests with a fresh counter each, and makes PIN
blocks; and a fixture with an admin-made, funded card."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server import keys

from tests.plugins import logscan
from tests.plugins.server import TlsServer
from tests.support.ledger_asserts import unpack


def expect(err: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    e = unpack(err)
    assert (e.code, e.reason, len(e.infos)) == (code, reason, 1), (e.code, e.message)


def rid() -> str:
    return f"sec-{uuid.uuid4().hex[:20]}"


@dataclass
class Terminal:
    """A POS terminal: its channel, signed-on working key and counter."""

    pos: transaction_pb2_grpc.TransactionServiceStub
    name: str
    station: str
    working: keys.WorkingKey
    counter: itertools.count[int]

    def authorize(self, card_number: str, amount_fen: int, *, request_id: str | None = None,
                  counter: int | None = None, tamper: bool = False,
                  station: str | None = None, pin: bytes | None = None,
                  pin_card: str | None = None) -> transaction_pb2.AuthorizeRequest:
        req = transaction_pb2.AuthorizeRequest(
            request_id=request_id or rid(), card_number=card_number, amount_fen=amount_fen,
            station_id=station or self.station, terminal_id=self.name, nozzle=2,
            product=common_pb2.PRODUCT_GASOLINE_95, key_version=self.working.version,
            terminal_counter=counter if counter is not None else next(self.counter))
        if pin is not None:
            req.pin_block = self.pin_block(pin, pin_card or card_number)
        fields = ("Authorize", req.request_id, req.card_number, req.amount_fen, req.station_id,
                  req.terminal_id, req.nozzle, req.product, req.key_version,
                  req.terminal_counter, req.pin_block)
        req.mac = self.mac(req.terminal_counter, *fields)
        if tamper:
            req.amount_fen += 1  # the MAC was made over the smaller amount
        return req

    def confirm(self, hold_id: str, final_fen: int) -> transaction_pb2.ConfirmRequest:
        req = transaction_pb2.ConfirmRequest(
            request_id=rid(), hold_id=hold_id, final_amount_fen=final_fen, volume_ml=1000,
            unit_price_fen=800, key_version=self.working.version,
            terminal_counter=next(self.counter))
        req.mac = self.mac(req.terminal_counter, "Confirm", req.request_id, req.hold_id,
                           req.final_amount_fen, req.volume_ml, req.unit_price_fen,
                           req.key_version, req.terminal_counter)
        return req

    def pin_block(self, pin: bytes, card_number: str) -> bytes:
        return keys.encrypt_pin_block(keys.pin_key(self.working), pin, card_number)

    def mac(self, counter: int, *fields: bytes | str | int) -> bytes:
        return keys.mac(keys.session_key(self.working, counter), keys.canonical(*fields))


def sign_on(server: TlsServer, stem: str, name: str, station: str) -> Terminal:
    channel = server.channel(stem)
    answer = security_pb2_grpc.SecurityServiceStub(channel).SignOn(
        security_pb2.SignOnRequest(terminal_id=name))
    working = keys.WorkingKey(name, answer.key_version, answer.valid_from.ToDatetime(dt.UTC),
                              answer.valid_until.ToDatetime(dt.UTC), answer.working_key)
    return Terminal(transaction_pb2_grpc.TransactionServiceStub(channel), name, station, working,
                    itertools.count(answer.last_counter + 1))


@dataclass
class Fixture:
    server: TlsServer
    admin: account_pb2_grpc.AccountServiceStub
    admin_funding: funding_pb2_grpc.FundingServiceStub
    t1: Terminal
    account_id: str
    card_number: str


@pytest.fixture
def setup(tls_server: TlsServer) -> Iterator[Fixture]:
    admin_channel = tls_server.channel("admin-ops")
    admin = account_pb2_grpc.AccountServiceStub(admin_channel)
    funding = funding_pb2_grpc.FundingServiceStub(admin_channel)
    opened = admin.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="安全测试")))
    account_id = opened.account.account_id
    issued = admin.IssueCard(account_pb2.IssueCardRequest(request_id=rid(), account_id=account_id))
    logscan.register("card number", issued.card_number)
    funding.Recharge(funding_pb2.RechargeRequest(
        request_id=rid(), account_id=account_id, channel=funding_pb2.CHANNEL_COUNTER,
        channel_txn_id=f"ctr-{uuid.uuid4().hex}", amount_fen=100_000))
    t1 = sign_on(tls_server, "pos-KM-001-T1", "KM-001-T1", "KM-001")
    yield Fixture(tls_server, admin, funding, t1, account_id, issued.card_number)
