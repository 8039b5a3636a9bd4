"""The right approver (issue 15 item 6): a limit raise on a sub-account or its
card is approved by a code sent to whoever has authority over it - the fleet's
manager, a family's main-card holder - never to the person being limited; and
whether a change is a raise is decided under the account lock, so a lowering
racing a raise cannot let it through without a code."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    step_up_pb2,
)
from fuelcard_api import principals
from fuelcard_server.clock import ManualClock

from tests.plugins import logscan
from tests.plugins.server import ServerThread, TlsServer, make_settings
from tests.support.ledger_asserts import Conn, expect, scalar, unpack
from tests.support.otp_fake import FakeOtpSender

MANAGER_PHONE = "13700000001"
DRIVER_PHONE = "13700000002"
MAIN_PHONE = "13700000003"
SECOND_PHONE = "13700000004"


def rid() -> str:
    return f"ap-{uuid.uuid4().hex[:20]}"


def _limits(txn: int, daily: int, monthly: int) -> control_pb2.SpendingLimits:
    return control_pb2.SpendingLimits(per_transaction_fen=txn, daily_fen=daily, monthly_fen=monthly)


@dataclass
class Env:
    url: str
    sender: FakeOtpSender
    accounts: account_pb2_grpc.AccountServiceStub
    control: control_pb2_grpc.ControlServiceStub
    security: security_pb2_grpc.SecurityServiceStub

    def open(self, kind: account_pb2.AccountType.ValueType, phone: str, parent: str = "") -> str:
        opened = self.accounts.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=rid(), type=kind, holder=account_pb2.Holder(name="审批测试", phone=phone),
            parent_account_id=parent,
            funding_mode=account_pb2.FUNDING_MODE_SHARED if parent else account_pb2.FUNDING_MODE_UNSPECIFIED))
        account_id: str = opened.account.account_id
        return account_id

    def card(self, account_id: str) -> str:
        issued = self.accounts.IssueCard(account_pb2.IssueCardRequest(request_id=rid(),
                                                                      account_id=account_id))
        logscan.register("card number", issued.card_number)
        card_id: str = issued.card.card_id
        return card_id

    def challenge(self, kind: step_up_pb2.StepUpKind.ValueType, subject: str, amount_fen: int = 0
                  ) -> tuple[step_up_pb2.StepUp, str]:
        """The step-up and the phone its code went to."""
        answer = self.security.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
            request_id=rid(), kind=kind, subject_id=subject, amount_fen=amount_fen))
        [sent] = [s for s in self.sender.sent if s.challenge_id == answer.challenge_id]
        return step_up_pb2.StepUp(challenge_id=answer.challenge_id, code=sent.code), sent.destination

    def set_limits(self, actor: str, card: str, limits: control_pb2.SpendingLimits,
                   step_up: step_up_pb2.StepUp | None = None) -> control_pb2.SetSpendingLimitsResponse:
        answer: control_pb2.SetSpendingLimitsResponse = self.control.SetSpendingLimits(
            control_pb2.SetSpendingLimitsRequest(request_id=rid(), actor_account_id=actor,
                                                 card_id=card, limits=limits, step_up=step_up))
        return answer


@pytest.fixture
def env(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[Env]:
    settings = make_settings(tmp_path, insecure=False, tls_dir=dev_certs, step_up_limit_raises=True)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    sender = FakeOtpSender()
    thread.server.otp_sender = sender
    port = thread.start()
    handle = TlsServer(f"127.0.0.1:{port}", database_url, clock, dev_certs)
    for phone in (MANAGER_PHONE, DRIVER_PHONE, MAIN_PHONE, SECOND_PHONE):
        logscan.register("phone", phone)
    try:
        channel = handle.channel("admin-ops")
        yield Env(database_url, sender, account_pb2_grpc.AccountServiceStub(channel),
                  control_pb2_grpc.ControlServiceStub(channel),
                  security_pb2_grpc.SecurityServiceStub(channel))
    finally:
        for ch in handle.channels:
            ch.close()
        thread.stop()


def _fleet(env: Env) -> tuple[str, str, str]:
    """A fleet (its account has no phone) whose manager principal has one,
    and a vehicle card whose driver has one: (fleet, vehicle, card)."""
    fleet = env.open(account_pb2.ACCOUNT_TYPE_CORPORATE, "")
    principals.add(env.url, login=f"mgr-{uuid.uuid4().hex[:8]}", kind="fleet_manager", account_id=fleet,
                   password="manager-password", phone=MANAGER_PHONE, by="test")
    vehicle = env.open(account_pb2.ACCOUNT_TYPE_CORPORATE, DRIVER_PHONE, parent=fleet)
    return fleet, vehicle, env.card(vehicle)


def test_a_fleet_vehicle_raise_is_approved_by_the_manager_and_not_the_driver(env: Env, db: Conn) -> None:
    fleet, _, card = _fleet(env)
    env.set_limits(fleet, card, _limits(50_000, 100_000, 1_000_000))  # no caps yet: not a raise
    raised = _limits(80_000, 100_000, 1_000_000)

    # The driver can get codes to their own phone (a PIN reset of their card);
    # none of them approves the raise.
    driver_step_up, to = env.challenge(step_up_pb2.STEP_UP_KIND_PIN_RESET, card)
    assert to == DRIVER_PHONE
    expect(lambda: env.set_limits(fleet, card, raised, driver_step_up),
           grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    # The raise's own code goes to the manager, never to the driver.
    step_up, to = env.challenge(step_up_pb2.STEP_UP_KIND_LIMIT_RAISE, card, 1_000_000)
    assert to == MANAGER_PHONE
    assert all(s.destination != DRIVER_PHONE for s in env.sender.sent
               if s.kind == step_up_pb2.STEP_UP_KIND_LIMIT_RAISE)
    assert scalar(db, "SELECT limit_txn_fen FROM fc.cards WHERE uid = %s", (card,)) == 50_000
    assert env.set_limits(fleet, card, raised, step_up).limits.per_transaction_fen == 80_000
    assert scalar(db, "SELECT limit_txn_fen FROM fc.cards WHERE uid = %s", (card,)) == 80_000


def test_a_vehicle_without_a_phone_is_approved_by_its_manager(env: Env) -> None:
    fleet = env.open(account_pb2.ACCOUNT_TYPE_CORPORATE, "")
    vehicle = env.open(account_pb2.ACCOUNT_TYPE_CORPORATE, "", parent=fleet)
    card = env.card(vehicle)
    # No manager with a phone yet: nowhere to send the code.
    expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_LIMIT_RAISE, card, 0),
           grpc.StatusCode.FAILED_PRECONDITION, "NO_PHONE_ON_FILE")
    principals.add(env.url, login=f"mgr-{uuid.uuid4().hex[:8]}", kind="fleet_manager", account_id=fleet,
                   password="manager-password", phone=MANAGER_PHONE, by="test")
    _, to = env.challenge(step_up_pb2.STEP_UP_KIND_LIMIT_RAISE, card, 0)
    assert to == MANAGER_PHONE


def test_a_family_secondary_card_raise_goes_to_the_main_holder(env: Env, db: Conn) -> None:
    main = env.open(account_pb2.ACCOUNT_TYPE_FAMILY, MAIN_PHONE)
    second = env.open(account_pb2.ACCOUNT_TYPE_FAMILY, SECOND_PHONE, parent=main)
    card = env.card(second)
    env.set_limits(main, card, _limits(10_000, 20_000, 200_000))
    step_up, to = env.challenge(step_up_pb2.STEP_UP_KIND_LIMIT_RAISE, card, 200_000)
    assert to == MAIN_PHONE
    # The secondary holder's own requests still go to their own phone.
    _, own = env.challenge(step_up_pb2.STEP_UP_KIND_PIN_RESET, card)
    assert own == SECOND_PHONE
    assert env.set_limits(main, card, _limits(10_000, 30_000, 200_000), step_up).limits.daily_fen == 30_000
    assert scalar(db, "SELECT limit_daily_fen FROM fc.cards WHERE uid = %s", (card,)) == 30_000


def _lock_waiters(db: Conn) -> int:
    n: int = scalar(db, "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'")
    return n


def test_a_lowering_racing_a_raise_cannot_skip_the_step_up(env: Env, db: Conn) -> None:
    fleet, _, card = _fleet(env)
    env.set_limits(fleet, card, _limits(0, 300_000, 0))
    # A lowering to 100_000 is under way: it holds the account lock, not yet
    # committed. Meanwhile a change "to 300_000" arrives: against the caps it
    # sees before the lock that is no raise; against the lowered caps it is.
    with psycopg.connect(env.url) as lowering:
        lowering.execute(
            "SELECT fc.set_limits(p_caller => 'race', p_request_id => 'lower-1',"
            " p_request_hash => %s, p_actor_uid => %s::uuid, p_card_uid => %s::uuid,"
            " p_account_uid => NULL, p_txn => 0, p_daily => 100000, p_monthly => 0,"
            " p_now => now(), p_step_up => true, p_challenge => NULL, p_code_hash => NULL)",
            (b"\x01" * 32, fleet, card))
        outcome: list[object] = []

        def raise_without_code() -> None:
            try:
                outcome.append(env.set_limits(fleet, card, _limits(0, 300_000, 0)))
            except grpc.RpcError as e:
                outcome.append(unpack(e))

        racer = threading.Thread(target=raise_without_code)
        racer.start()
        deadline = time.monotonic() + 30
        while _lock_waiters(db) == 0:  # the raise is waiting for the lock
            assert time.monotonic() < deadline, "the racing raise never reached the lock"
            time.sleep(0.01)
        lowering.commit()
        racer.join(30)
    [answer] = outcome
    assert not isinstance(answer, control_pb2.SetSpendingLimitsResponse), "raised without a code"
    assert getattr(answer, "reason", None) == "STEP_UP_REQUIRED"
    assert scalar(db, "SELECT limit_daily_fen FROM fc.cards WHERE uid = %s", (card,)) == 100_000


OLD_PHONE, NEW_PHONE = "13600000005", "13600000006"


def test_a_phone_change_needs_a_code_sent_to_the_old_phone_and_is_audited(env: Env, db: Conn) -> None:
    logscan.register("phone", OLD_PHONE)
    logscan.register("phone", NEW_PHONE)
    account = env.open(account_pb2.ACCOUNT_TYPE_PERSONAL, OLD_PHONE)

    def change(step_up: step_up_pb2.StepUp | None, request_id: str
               ) -> security_pb2.ChangeHolderPhoneResponse:
        answer: security_pb2.ChangeHolderPhoneResponse = env.security.ChangeHolderPhone(
            security_pb2.ChangeHolderPhoneRequest(request_id=request_id, account_id=account,
                                                  phone=NEW_PHONE, step_up=step_up))
        return answer

    def phone() -> str:
        """The holder's phone, as GetAccount shows it (masked)."""
        got = env.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=account))
        masked: str = got.account.holder.phone
        return masked

    expect(lambda: change(None, rid()), grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    step_up, to = env.challenge(step_up_pb2.STEP_UP_KIND_PHONE_CHANGE, account)
    assert to == OLD_PHONE
    wrong = step_up_pb2.StepUp(challenge_id=step_up.challenge_id,
                               code=f"{(int(step_up.code) + 1) % 1_000_000:06d}")
    expect(lambda: change(wrong, rid()), grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert phone() == "136****0005"
    request_id = rid()
    answer = change(step_up, request_id)
    assert answer.account_id == account and answer.masked_phone == "136****0006"
    assert phone() == "136****0006"
    # Sealed at rest, as every holder's phone: not readable in the database.
    assert scalar(db, "SELECT h.phone_plaintext IS NULL AND h.phone_sealed IS NOT NULL"
                      " FROM fc.account_holders h JOIN fc.accounts a ON a.id = h.account_id"
                      " WHERE a.uid = %s", (account,))
    # A retry gets the first answer, without a fresh code; the code is used up.
    assert change(step_up, request_id) == answer
    expect(lambda: change(step_up, rid()), grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    rows = db.execute("SELECT actor, target::text, outcome FROM fc.audit_log WHERE method ="
                      " '/fuelcard.v1.SecurityService/ChangeHolderPhone' ORDER BY id").fetchall()
    assert [r[2] for r in rows] == [
        "FAILED_PRECONDITION STEP_UP_REQUIRED", "PERMISSION_DENIED STEP_UP_FAILED", "OK", "OK",
        "PERMISSION_DENIED STEP_UP_FAILED"]
    assert {r[1] for r in rows} == {account}
    # The next code goes to the new phone.
    _, to = env.challenge(step_up_pb2.STEP_UP_KIND_PIN_RESET, env.card(account))
    assert to == NEW_PHONE
