"""Step-up verification (多因素认证): high-risk operations - a large recharge,
a limit raise, an admin PIN reset, the reveal of a card number - run only
with a one-time code sent to the holder's phone, bound to the operation,
used once, within its time and attempts. Each refused attempt changes
nothing (but a wrong code's attempt count)."""

from __future__ import annotations

import datetime as dt
import functools
import json
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    funding_pb2,
    funding_pb2_grpc,
    security_pb2,
    security_pb2_grpc,
    step_up_pb2,
    transaction_pb2_grpc,
)
from fuelcard_server import keys
from fuelcard_server.clock import ManualClock
from google.protobuf import timestamp_pb2

from tests.plugins import logscan
from tests.plugins.server import RunningServer, ServerThread, TlsServer, make_settings
from tests.plugins.terminals import Terminal, sign_on
from tests.support.ledger_asserts import Conn, account_row, assert_ledger_ok, expect, scalar, snapshot
from tests.support.otp_fake import FakeOtpSender

PHONE = "13812345678"
THRESHOLD_FEN = 100_000
PIN = b"246810"


def rid() -> str:
    return f"su-{uuid.uuid4().hex[:20]}"


@dataclass
class Env:
    server: TlsServer
    sender: FakeOtpSender
    accounts: account_pb2_grpc.AccountServiceStub
    funding: funding_pb2_grpc.FundingServiceStub
    control: control_pb2_grpc.ControlServiceStub
    security: security_pb2_grpc.SecurityServiceStub
    account_id: str
    card_id: str
    card_number: str

    def challenge(self, kind: step_up_pb2.StepUpKind.ValueType, subject: str, amount_fen: int = 0
                  ) -> step_up_pb2.StepUp:
        answer = self.security.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
            request_id=rid(), kind=kind, subject_id=subject, amount_fen=amount_fen))
        return step_up_pb2.StepUp(challenge_id=answer.challenge_id,
                                  code=self.sender.code(answer.challenge_id))

    def recharge_request(self, amount_fen: int, step_up: step_up_pb2.StepUp | None = None,
                         request_id: str | None = None) -> funding_pb2.RechargeRequest:
        return funding_pb2.RechargeRequest(
            request_id=request_id or rid(), account_id=self.account_id,
            channel=funding_pb2.CHANNEL_COUNTER, channel_txn_id=f"ctr-{uuid.uuid4().hex}",
            amount_fen=amount_fen, step_up=step_up)


@pytest.fixture
def env(database_url: str, tmp_path: Path, dev_certs: Path) -> Iterator[Env]:
    settings = make_settings(tmp_path, insecure=False, tls_dir=dev_certs,
                             step_up_recharge_above_fen=THRESHOLD_FEN, step_up_limit_raises=True)
    clock = ManualClock(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC))
    thread = ServerThread(settings, database_url, clock)
    sender = FakeOtpSender()
    thread.server.otp_sender = sender
    port = thread.start()
    handle = TlsServer(f"127.0.0.1:{port}", database_url, clock, dev_certs)
    try:
        channel = handle.channel("admin-ops")
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        opened = accounts.OpenAccount(account_pb2.OpenAccountRequest(
            request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
            holder=account_pb2.Holder(name="步进测试", phone=PHONE)))
        issued = accounts.IssueCard(account_pb2.IssueCardRequest(
            request_id=rid(), account_id=opened.account.account_id))
        logscan.register("card number", issued.card_number)
        logscan.register("phone", PHONE)
        yield Env(handle, sender, accounts, funding_pb2_grpc.FundingServiceStub(channel),
                  control_pb2_grpc.ControlServiceStub(channel),
                  security_pb2_grpc.SecurityServiceStub(channel), opened.account.account_id,
                  issued.card.card_id, issued.card_number)
    finally:
        for ch in handle.channels:
            ch.close()
        thread.stop()


def without(snap: dict[str, tuple[int, str | None]], *tables: str
            ) -> dict[str, tuple[int, str | None]]:
    return {k: v for k, v in snap.items() if k not in tables}


# --- recharges -----------------------------------------------------------------


def test_a_large_recharge_needs_a_step_up_and_a_small_one_does_not(env: Env, db: Conn) -> None:
    approved = env.funding.Recharge(env.recharge_request(THRESHOLD_FEN))
    assert approved.decision == common_pb2.DECISION_APPROVED
    before = snapshot(db)
    expect(lambda: env.funding.Recharge(env.recharge_request(THRESHOLD_FEN + 1)),
           grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    assert snapshot(db) == before

    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 300_000)
    # The code went to the holder's phone; the server kept only a keyed hash.
    assert env.sender.sent[-1].destination == PHONE
    row = scalar(db, "SELECT t::text FROM fc.step_up_challenges t")
    assert step_up.code not in row and PHONE not in row
    request = env.recharge_request(300_000, step_up)
    answer = env.funding.Recharge(request)
    assert answer.decision == common_pb2.DECISION_APPROVED
    assert account_row(db, env.account_id)["balance_fen"] == THRESHOLD_FEN + 300_000
    assert_ledger_ok(env.server.database_url)

    # A retry of the same operation gets the first answer, with or without
    # the (spent) code.
    again = env.funding.Recharge(request)
    request.ClearField("step_up")
    bare = env.funding.Recharge(request)
    assert again.recharge.recharge_id == bare.recharge.recharge_id == answer.recharge.recharge_id
    assert account_row(db, env.account_id)["balance_fen"] == THRESHOLD_FEN + 300_000

    # The channel's second notice of the same payment, under a new request_id,
    # gets the original answer without a code.
    notice = funding_pb2.RechargeRequest()
    notice.CopyFrom(request)
    notice.request_id = rid()
    assert env.funding.Recharge(notice).recharge.recharge_id == answer.recharge.recharge_id
    # The code is used: another recharge cannot ride on it.
    before = snapshot(db)
    e = expect(lambda: env.funding.Recharge(env.recharge_request(300_000, step_up)),
               grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert e.infos[0].metadata["cause"] == "USED"
    assert snapshot(db) == before


def test_a_code_for_one_amount_does_not_authorise_another(env: Env, db: Conn) -> None:
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 150_000)
    before = snapshot(db)
    for amount in (1_000_000, 150_001):
        request = env.recharge_request(amount, step_up)
        e = expect(functools.partial(env.funding.Recharge, request),
                   grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
        assert e.infos[0].metadata["cause"] == "MISMATCH"
    # Nor another kind of operation on the same subject.
    e = expect(lambda: env.control.GrantTemporaryRaise(control_pb2.GrantTemporaryRaiseRequest(
        request_id=rid(), actor_account_id=env.account_id, account_id=env.account_id,
        limits=control_pb2.SpendingLimits(per_transaction_fen=150_000, daily_fen=150_000,
                                          monthly_fen=150_000),
        start_time=_ts(0), end_time=_ts(3600), step_up=step_up)),
        grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert e.infos[0].metadata["cause"] == "MISMATCH"
    assert snapshot(db) == before
    # The right operation still goes through with it.
    answer = env.funding.Recharge(env.recharge_request(150_000, step_up))
    assert answer.decision == common_pb2.DECISION_APPROVED


def test_wrong_codes_are_bounded_and_change_nothing_else(env: Env, db: Conn) -> None:
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000)
    wrong = f"{(int(step_up.code) + 1) % 1_000_000:06d}"
    before = snapshot(db)
    causes = []
    for _ in range(3):
        e = expect(lambda: env.funding.Recharge(env.recharge_request(
            200_000, step_up_pb2.StepUp(challenge_id=step_up.challenge_id, code=wrong))),
            grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
        causes.append(e.infos[0].metadata["cause"])
    assert causes == ["WRONG_CODE"] * 3
    # Out of attempts: now even the right code is refused.
    e = expect(lambda: env.funding.Recharge(env.recharge_request(200_000, step_up)),
               grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert e.infos[0].metadata["cause"] == "ATTEMPTS_EXHAUSTED"
    assert without(snapshot(db), "step_up_challenges") == without(before, "step_up_challenges")
    assert scalar(db, "SELECT attempts FROM fc.step_up_challenges") == 3


def test_an_expired_code_is_refused(env: Env, db: Conn) -> None:
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000)
    env.server.clock.advance(dt.timedelta(minutes=5))
    before = snapshot(db)
    e = expect(lambda: env.funding.Recharge(env.recharge_request(200_000, step_up)),
               grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert e.infos[0].metadata["cause"] == "EXPIRED"
    assert snapshot(db) == before


def test_an_unknown_challenge_or_a_malformed_code_is_refused(env: Env, db: Conn) -> None:
    before = snapshot(db)
    e = expect(lambda: env.funding.Recharge(env.recharge_request(
        200_000, step_up_pb2.StepUp(challenge_id=str(uuid.uuid4()), code="123456"))),
        grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    assert e.infos[0].metadata["cause"] == "UNKNOWN_CHALLENGE"
    expect(lambda: env.funding.Recharge(env.recharge_request(
        200_000, step_up_pb2.StepUp(challenge_id=str(uuid.uuid4()), code="12a45"))),
        grpc.StatusCode.INVALID_ARGUMENT, "STEP_UP_CODE_MALFORMED", field="step_up.code")
    assert snapshot(db) == before


def test_one_code_serves_one_of_two_concurrent_recharges(env: Env, db: Conn) -> None:
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 500_000)
    results: list[str] = []
    start = threading.Barrier(4)

    def attempt() -> None:
        request = env.recharge_request(500_000, step_up)
        start.wait()
        try:
            env.funding.Recharge(request, timeout=30)
            results.append("OK")
        except grpc.RpcError as err:
            results.append(str(err.code()))

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["OK"] + [str(grpc.StatusCode.PERMISSION_DENIED)] * 3
    assert account_row(db, env.account_id)["balance_fen"] == 500_000
    assert_ledger_ok(env.server.database_url)


# --- challenges ------------------------------------------------------------------


def test_a_challenge_needs_a_phone_and_is_rate_limited(env: Env, db: Conn) -> None:
    opened = env.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="无电话")))
    expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, opened.account.account_id, 1),
           grpc.StatusCode.FAILED_PRECONDITION, "NO_PHONE_ON_FILE")
    expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_PIN_RESET, env.account_id),
           grpc.StatusCode.NOT_FOUND, "SUBJECT_NOT_FOUND")  # a PIN reset is about a card
    request = security_pb2.CreateStepUpChallengeRequest(
        request_id=rid(), kind=step_up_pb2.STEP_UP_KIND_RECHARGE, subject_id=env.account_id,
        amount_fen=200_000)
    first = env.security.CreateStepUpChallenge(request)
    assert first.masked_destination == "138****5678" and first.max_attempts == 3
    # A retry is the same challenge, and sends no second code.
    assert env.security.CreateStepUpChallenge(request).challenge_id == first.challenge_id
    assert len(env.sender.sent) == 1
    for _ in range(4):
        env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000)
    before = snapshot(db)
    expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000),
           grpc.StatusCode.FAILED_PRECONDITION, "TOO_MANY_STEP_UPS")
    assert snapshot(db) == before
    env.server.clock.advance(dt.timedelta(minutes=16))
    env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000)


def test_a_gateway_outage_is_unavailable(env: Env) -> None:
    env.sender.failing = True
    expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000),
           grpc.StatusCode.UNAVAILABLE, "OTP_NOT_SENT")


def _challenge_request(env: Env) -> security_pb2.CreateStepUpChallengeRequest:
    return security_pb2.CreateStepUpChallengeRequest(
        request_id=rid(), kind=step_up_pb2.STEP_UP_KIND_RECHARGE, subject_id=env.account_id,
        amount_fen=200_000)


def test_a_retry_after_a_gateway_failure_gets_a_fresh_code(env: Env, db: Conn) -> None:
    """OTP_NOT_SENT is UNAVAILABLE: clients retry with the same request_id.
    The retry sends a code (under a new challenge id: the first was never
    answered), the code works, and a further retry sends none."""
    request = _challenge_request(env)
    env.sender.failing = True
    expect(lambda: env.security.CreateStepUpChallenge(request),
           grpc.StatusCode.UNAVAILABLE, "OTP_NOT_SENT")
    env.sender.failing = False
    answer = env.security.CreateStepUpChallenge(request)
    step_up = step_up_pb2.StepUp(challenge_id=answer.challenge_id,
                                 code=env.sender.code(answer.challenge_id))
    assert env.security.CreateStepUpChallenge(request).challenge_id == answer.challenge_id
    assert len(env.sender.sent) == 1
    assert scalar(db, "SELECT count(*) FROM fc.step_up_challenges") == 1
    approved = env.funding.Recharge(env.recharge_request(200_000, step_up))
    assert approved.decision == common_pb2.DECISION_APPROVED


def test_undelivered_challenges_do_not_count_toward_the_rate_limit(env: Env) -> None:
    env.sender.failing = True
    for _ in range(5):
        expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000),
               grpc.StatusCode.UNAVAILABLE, "OTP_NOT_SENT")
    env.sender.failing = False
    for _ in range(5):
        env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000)
    expect(lambda: env.challenge(step_up_pb2.STEP_UP_KIND_RECHARGE, env.account_id, 200_000),
           grpc.StatusCode.FAILED_PRECONDITION, "TOO_MANY_STEP_UPS")


def test_concurrent_retries_after_a_gateway_failure_send_one_code(env: Env) -> None:
    """Two retries of a failed challenge at once: one sends a fresh code;
    the other, arriving while that send is under way, is told to ask again
    (not OK: that code may yet fail). Afterwards both see the one challenge."""
    request = _challenge_request(env)
    env.sender.failing = True
    expect(lambda: env.security.CreateStepUpChallenge(request),
           grpc.StatusCode.UNAVAILABLE, "OTP_NOT_SENT")
    env.sender.failing = False
    env.sender.held = threading.Event()
    first: list[str] = []
    sender = threading.Thread(target=lambda: first.append(
        env.security.CreateStepUpChallenge(request, timeout=30).challenge_id))
    sender.start()
    try:
        deadline = time.monotonic() + 5
        while not env.sender.waiting and time.monotonic() < deadline:
            time.sleep(0.01)  # until the first retry reaches the (held) gateway
        assert env.sender.waiting == 1, "the retry sent no code"
        expect(lambda: env.security.CreateStepUpChallenge(request, timeout=30),
               grpc.StatusCode.UNAVAILABLE, "OTP_NOT_SENT")
    finally:
        env.sender.held.set()
        sender.join(30)
    assert first and env.sender.code(first[0])
    assert env.security.CreateStepUpChallenge(request).challenge_id == first[0]
    assert [s.challenge_id for s in env.sender.sent] == first


def test_terminals_cannot_ask_for_challenges(env: Env) -> None:
    stub = security_pb2_grpc.SecurityServiceStub(env.server.channel("pos-KM-001-T1"))
    expect(lambda: stub.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
        request_id=rid(), kind=step_up_pb2.STEP_UP_KIND_RECHARGE, subject_id=env.account_id,
        amount_fen=200_000)), grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")


def test_development_codes_go_to_a_private_file(server: RunningServer) -> None:
    stub = security_pb2_grpc.SecurityServiceStub(server.channel)
    opened = server.accounts.OpenAccount(account_pb2.OpenAccountRequest(
        request_id=rid(), type=account_pb2.ACCOUNT_TYPE_PERSONAL,
        holder=account_pb2.Holder(name="开发", phone=PHONE)))
    answer = stub.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
        request_id=rid(), kind=step_up_pb2.STEP_UP_KIND_RECHARGE,
        subject_id=opened.account.account_id, amount_fen=200_000))
    path = server.settings.data_dir / "otp-outbox.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert PHONE not in text
    entry = json.loads(text.splitlines()[-1])
    assert entry["challenge_id"] == answer.challenge_id and entry["to"] == "138****5678"
    assert len(entry["code"]) == 6 and entry["code"].isdigit()


# --- limit raises ------------------------------------------------------------------


def _ts(offset_s: int) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=offset_s))
    return t


def _limits(txn: int, daily: int, monthly: int) -> control_pb2.SpendingLimits:
    return control_pb2.SpendingLimits(per_transaction_fen=txn, daily_fen=daily, monthly_fen=monthly)


def test_raising_a_limit_needs_a_step_up_and_lowering_does_not(env: Env, db: Conn) -> None:
    def set_limits(limits: control_pb2.SpendingLimits, step_up: step_up_pb2.StepUp | None = None
                   ) -> control_pb2.SetSpendingLimitsResponse:
        answer: control_pb2.SetSpendingLimitsResponse = env.control.SetSpendingLimits(
            control_pb2.SetSpendingLimitsRequest(
                request_id=rid(), actor_account_id=env.account_id, card_id=env.card_id,
                limits=limits, step_up=step_up))
        return answer

    # No caps yet: setting caps only lowers them.
    set_limits(_limits(50_000, 100_000, 1_000_000))
    set_limits(_limits(40_000, 100_000, 900_000))
    before = snapshot(db)
    for raised in (_limits(60_000, 100_000, 900_000), _limits(40_000, 0, 900_000)):
        expect(functools.partial(set_limits, raised), grpc.StatusCode.FAILED_PRECONDITION,
               "STEP_UP_REQUIRED")
    assert snapshot(db) == before
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_LIMIT_RAISE, env.card_id, 900_000)
    assert set_limits(_limits(60_000, 100_000, 900_000), step_up).limits.per_transaction_fen == 60_000
    assert scalar(db, "SELECT limit_txn_fen FROM fc.cards WHERE uid = %s", (env.card_id,)) == 60_000

    # The same on an account's caps.
    env.control.SetSpendingLimits(control_pb2.SetSpendingLimitsRequest(
        request_id=rid(), actor_account_id=env.account_id, account_id=env.account_id,
        limits=_limits(0, 0, 2_000_000)))  # no caps yet: not a raise
    before = snapshot(db)
    expect(lambda: env.control.SetSpendingLimits(control_pb2.SetSpendingLimitsRequest(
        request_id=rid(), actor_account_id=env.account_id, account_id=env.account_id,
        limits=_limits(0, 0, 3_000_000))), grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    assert snapshot(db) == before

    before = snapshot(db)
    expect(lambda: env.control.GrantTemporaryRaise(control_pb2.GrantTemporaryRaiseRequest(
        request_id=rid(), actor_account_id=env.account_id, card_id=env.card_id,
        limits=_limits(80_000, 200_000, 0), start_time=_ts(0), end_time=_ts(3600))),
        grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    assert snapshot(db) == before
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_LIMIT_RAISE, env.card_id, 0)
    granted = env.control.GrantTemporaryRaise(control_pb2.GrantTemporaryRaiseRequest(
        request_id=rid(), actor_account_id=env.account_id, card_id=env.card_id,
        limits=_limits(80_000, 200_000, 0), step_up=step_up, start_time=_ts(0),
        end_time=_ts(3600)))
    assert granted.raise_id


# --- admin PIN reset ---------------------------------------------------------------


def _console(env: Env) -> Terminal:
    """The admin console, signed on for its own working key."""
    return sign_on(env.server, "admin-ops", "admin/ops", "")


def _reset(env: Env, console: Terminal, pin: bytes, step_up: step_up_pb2.StepUp | None,
           request_id: str | None = None) -> security_pb2.ResetCardPinResponse:
    block = keys.encrypt_pin_block(keys.pin_key(console.working), pin, "0" * 13)
    answer: security_pb2.ResetCardPinResponse = env.security.ResetCardPin(
        security_pb2.ResetCardPinRequest(
            request_id=request_id or rid(), card_id=env.card_id,
            key_version=console.working.version, new_pin_block=block, step_up=step_up))
    return answer


def test_an_admin_resets_a_locked_pin_with_a_step_up(env: Env, db: Conn) -> None:
    t1 = sign_on(env.server, "pos-KM-001-T1", "KM-001-T1", "KM-001")
    env.funding.Recharge(env.recharge_request(50_000))
    pos_security = security_pb2_grpc.SecurityServiceStub(env.server.channel("pos-KM-001-T1"))
    pos_security.SetCardPin(security_pb2.SetCardPinRequest(
        card_number=env.card_number, key_version=t1.working.version,
        new_pin_block=t1.pin_block(PIN, env.card_number)))
    for _ in range(3):
        t1.pos.Authorize(t1.authorize(env.card_number, 1_000, pin=b"000000"))
    assert scalar(db, "SELECT locked_at IS NOT NULL FROM fc.card_pins") is True

    console = _console(env)
    before = snapshot(db)
    expect(lambda: _reset(env, console, b"1357", None), grpc.StatusCode.FAILED_PRECONDITION,
           "STEP_UP_REQUIRED")
    # A block under a terminal's PIN key (not the console's) does not decode...
    expect(lambda: _reset(env, t1, b"1357", None), grpc.StatusCode.INVALID_ARGUMENT,
           "PIN_BLOCK_INVALID")
    # ...and terminals may not reset PINs at all.
    pos_stub = security_pb2_grpc.SecurityServiceStub(env.server.channel("pos-KM-001-T1"))
    expect(lambda: pos_stub.ResetCardPin(security_pb2.ResetCardPinRequest(
        request_id=rid(), card_id=env.card_id, new_pin_block=b"\0" * 16)),
        grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    assert snapshot(db) == before
    # A code for another card's reset does not do either.
    other = env.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=rid(), account_id=env.account_id))
    before = snapshot(db)
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_PIN_RESET, other.card.card_id)
    expect(lambda: _reset(env, console, b"1357", step_up), grpc.StatusCode.PERMISSION_DENIED,
           "STEP_UP_FAILED")
    assert without(snapshot(db), "step_up_challenges") == without(before, "step_up_challenges")

    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_PIN_RESET, env.card_id)
    request_id = rid()
    assert _reset(env, console, b"1357", step_up, request_id).card_id == env.card_id
    assert scalar(db, "SELECT (failed_attempts, locked_at IS NULL)::text FROM fc.card_pins"
                  " p JOIN fc.cards c ON c.id = p.card_id WHERE c.uid = %s",
                  (env.card_id,)) == "(0,t)"
    assert _reset(env, console, b"1357", None, request_id).card_id == env.card_id  # a retry
    pos: transaction_pb2_grpc.TransactionServiceStub = t1.pos
    assert pos.Authorize(t1.authorize(env.card_number, 1_000, pin=PIN)).decline_reason == \
        common_pb2.DECLINE_REASON_WRONG_PIN
    assert pos.Authorize(t1.authorize(env.card_number, 1_000, pin=b"1357")).decision == \
        common_pb2.DECISION_APPROVED
    # Audited, with the card as the target, refusals included.
    outcomes = db.execute(
        "SELECT outcome FROM fc.audit_log WHERE method = '/fuelcard.v1.SecurityService/ResetCardPin'"
        " AND target = %s ORDER BY id", (env.card_id,)).fetchall()
    assert [o[0] for o in outcomes] == [
        "FAILED_PRECONDITION STEP_UP_REQUIRED", "INVALID_ARGUMENT PIN_BLOCK_INVALID",
        "PERMISSION_DENIED ROLE_NOT_ALLOWED", "PERMISSION_DENIED STEP_UP_FAILED", "OK", "OK"]


# --- revealing a card number ---------------------------------------------------------


def test_revealing_a_card_number_needs_a_step_up_and_is_audited(env: Env, db: Conn) -> None:
    def reveal(step_up: step_up_pb2.StepUp | None, card_id: str | None = None,
               request_id: str | None = None) -> security_pb2.RevealCardNumberResponse:
        answer: security_pb2.RevealCardNumberResponse = env.security.RevealCardNumber(
            security_pb2.RevealCardNumberRequest(request_id=request_id or rid(),
                                                 card_id=card_id or env.card_id, step_up=step_up))
        return answer

    expect(lambda: reveal(None), grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    # The request_id of an answered operation of another kind opens nothing.
    recharged = env.recharge_request(1_000)
    env.funding.Recharge(recharged)
    expect(lambda: reveal(None, request_id=recharged.request_id),
           grpc.StatusCode.FAILED_PRECONDITION, "STEP_UP_REQUIRED")
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_REVEAL_CARD_NUMBER, env.card_id)
    request_id = rid()
    assert reveal(step_up, request_id=request_id).card_number == env.card_number
    # A retry of the same request reads again; any other use of the code is refused.
    assert reveal(step_up, request_id=request_id).card_number == env.card_number
    expect(lambda: reveal(step_up), grpc.StatusCode.PERMISSION_DENIED, "STEP_UP_FAILED")
    # Every other answer shows the masked form only.
    card = env.accounts.GetCard(account_pb2.GetCardRequest(card_id=env.card_id)).card
    assert card.masked_card_number == f"{env.card_number[:4]} **** **** {env.card_number[-4:]}"
    outcomes = db.execute(
        "SELECT outcome FROM fc.audit_log WHERE target = %s"
        " AND method = '/fuelcard.v1.SecurityService/RevealCardNumber' ORDER BY id",
        (env.card_id,)).fetchall()
    assert [o[0] for o in outcomes] == ["FAILED_PRECONDITION STEP_UP_REQUIRED",
                                        "FAILED_PRECONDITION STEP_UP_REQUIRED", "OK", "OK",
                                        "PERMISSION_DENIED STEP_UP_FAILED"]


def test_card_numbers_live_sealed_in_segments_apart(env: Env, db: Conn) -> None:
    pan = env.card_number
    card_id = scalar(db, "SELECT id FROM fc.cards WHERE uid = %s", (env.card_id,))
    for schema in ("fc_pan_seg1", "fc_pan_seg2", "fc_pan_seg3", "fc_pan_vault"):
        owner = scalar(db, "SELECT tableowner FROM pg_tables WHERE schemaname = %s"
                       " AND tablename = 'sealed'", (schema,))
        assert owner == schema
        sealed = bytes(scalar(db, f"SELECT sealed FROM {schema}.sealed WHERE card_id = %s",
                              (card_id,)))
        assert pan[-8:].encode() not in sealed and pan[4:10].encode() not in sealed
    # Nowhere in the database, in any schema, is the number (or its middle) in clear.
    tables = db.execute(
        "SELECT table_schema, table_name FROM information_schema.tables WHERE table_type ="
        " 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
    for schema, table in tables:
        rows = db.execute(f'SELECT t::text FROM "{schema}"."{table}" t').fetchall()
        assert not any(pan[4:-4] in r[0] for r in rows), (schema, table)


def test_a_tampered_or_missing_card_number_is_not_revealed(env: Env, db: Conn) -> None:
    other = env.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=rid(), account_id=env.account_id))
    # Someone with write access moves another card's middle segment over.
    db.execute("UPDATE fc_pan_seg2.sealed SET sealed = (SELECT s.sealed FROM fc_pan_seg2.sealed s"
               " JOIN fc.cards c ON c.id = s.card_id WHERE c.uid = %s)"
               " WHERE card_id = (SELECT id FROM fc.cards WHERE uid = %s)",
               (other.card.card_id, env.card_id))
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_REVEAL_CARD_NUMBER, env.card_id)
    expect(lambda: env.security.RevealCardNumber(security_pb2.RevealCardNumberRequest(
        request_id=rid(), card_id=env.card_id, step_up=step_up)),
        grpc.StatusCode.DATA_LOSS, "CARD_NUMBER_DAMAGED")
    # A card seeded straight into fc.cards (the load generator's COPY) has no parts.
    seeded = scalar(db, "INSERT INTO fc.cards (account_id, pan_index, masked, created_at)"
                    " SELECT account_id, '\\x01'::bytea, '9860 **** **** 0000', now() FROM fc.cards"
                    " WHERE uid = %s RETURNING uid::text", (env.card_id,))
    step_up = env.challenge(step_up_pb2.STEP_UP_KIND_REVEAL_CARD_NUMBER, seeded)
    expect(lambda: env.security.RevealCardNumber(security_pb2.RevealCardNumberRequest(
        request_id=rid(), card_id=seeded, step_up=step_up)),
        grpc.StatusCode.FAILED_PRECONDITION, "CARD_NUMBER_NOT_STORED")



def test_a_challenge_is_audited_whoever_asks(env: Env, db: Conn) -> None:
    stub = security_pb2_grpc.SecurityServiceStub(env.server.channel("adapter-wechat-gw"))
    stub.CreateStepUpChallenge(security_pb2.CreateStepUpChallengeRequest(
        request_id=rid(), kind=step_up_pb2.STEP_UP_KIND_RECHARGE, subject_id=env.account_id,
        amount_fen=200_000))
    row = db.execute("SELECT actor, target::text, outcome FROM fc.audit_log WHERE method ="
                     " '/fuelcard.v1.SecurityService/CreateStepUpChallenge' ORDER BY id DESC"
                     " LIMIT 1").fetchone()
    assert row == ("adapter:WECHAT_PAY:wechat-gw", env.account_id, "OK")
