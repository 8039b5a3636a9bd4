"""No card number, phone or ID number leaves the server unmasked: not in an
answer that does not need it, not in an error, not in a log line."""

from __future__ import annotations

import logging

import grpc
import pytest
from fuelcard.v1 import account_pb2, transaction_pb2
from fuelcard_server.logs import JsonFormatter
from fuelcard_server.privacy import mask_id_number, mask_phone, scrub

from tests.plugins.server import RunningServer
from tests.support import builders

PHONE = "13812345678"
ID_NUMBER = "110101199003071234"


def test_answers_mask_phone_and_id_number(server: RunningServer) -> None:
    card = builders.open_card(server, balance_fen=10_000, phone=PHONE, id_number=ID_NUMBER)
    account = server.accounts.GetAccount(
        account_pb2.GetAccountRequest(account_id=card.account_id)).account
    assert account.holder.phone == "138****5678"
    assert account.holder.id_number == "1101**********1234"
    got = server.accounts.GetCard(account_pb2.GetCardRequest(card_id=card.card_id)).card
    assert got.masked_card_number == f"{card.card_number[:4]} **** **** {card.card_number[-4:]}"
    assert card.card_number not in str(got) + str(account)


def test_errors_never_echo_the_card_number(server: RunningServer) -> None:
    unknown = "9860000000000000099"  # Luhn-invalid on purpose, then a valid unknown one
    for number in (unknown, "9860000000000000040"):
        with pytest.raises(grpc.RpcError) as err:
            server.pos.GetCardBalance(transaction_pb2.GetCardBalanceRequest(card_number=number))
        rpc_error = err.value
        assert isinstance(rpc_error, grpc.Call)
        text = str(rpc_error.details()) + str(rpc_error.trailing_metadata())
        assert number not in text


def test_server_logs_carry_no_personal_data(server: RunningServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    card = builders.open_card(server, balance_fen=50_000, phone=PHONE, id_number=ID_NUMBER)
    auth = builders.authorize(server, card, 20_000)
    builders.confirm(server, auth.hold.hold_id, 15_000)
    with pytest.raises(grpc.RpcError):
        server.pos.GetCardBalance(transaction_pb2.GetCardBalanceRequest(
            card_number="9860000000000000040"))
    formatter = JsonFormatter()
    written = "\n".join(formatter.format(r) for r in caplog.records)
    for secret in (card.card_number, PHONE, ID_NUMBER, "9860000000000000040"):
        assert secret not in written


def test_scrubber_masks_long_digit_runs_in_free_text() -> None:
    line = f"card 9860000000000000016 phone {PHONE} id {ID_NUMBER} amount 30000"
    cleaned = scrub(line)
    for secret in ("9860000000000000016", PHONE, ID_NUMBER):
        assert secret not in cleaned
    assert "amount 30000" in cleaned  # short numbers are not personal data


def test_masks() -> None:
    assert mask_phone(PHONE) == "138****5678"
    assert mask_id_number(ID_NUMBER) == "1101**********1234"
    assert mask_phone("123") == "***"


def test_trace_and_span_ids_are_written_whole_even_when_they_hold_long_digit_runs() -> None:
    # One random trace id in about twenty holds a run of eleven or more decimal
    # digits; masked, the line could no longer be joined to its trace.
    trace_id = "6da210883165091a234c2300611688bd"
    span_id = "123456789012345a"
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "card 9860000000000000016",
                               None, None)
    record.trace_id = trace_id
    record.span_id = span_id
    record.request_id = "rid-9860000000000000016"
    written = JsonFormatter().format(record)
    assert f'"trace_id": "{trace_id}"' in written
    assert f'"span_id": "{span_id}"' in written
    assert "9860000000000000016" not in written  # message and request_id still scrubbed
    # a trace_id field that is not a hex id is free text and scrubbed
    record.trace_id = "card 9860000000000000016"
    assert "9860000000000000016" not in JsonFormatter().format(record)


def test_a_callers_trace_id_with_room_for_a_card_number_is_scrubbed() -> None:
    # A traceparent is the caller's choice: a POS that builds it from the
    # transaction could put the card number in it.
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "authorize failed", None, None)
    record.trace_id = "0000000000000000" + "9860000000000016"
    assert "9860000000000016" not in JsonFormatter().format(record)
