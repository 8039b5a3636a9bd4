"""A synchronous POS client for TransactionService, made for flaky links.

Every mutating call (authorize, confirm, cancel) chooses ONE request_id and
sends it on every attempt, so the server applies the operation at most once
however many times the link makes us resend it. Attempts have a deadline each;
failed attempts are retried with exponential backoff and jitter, within a
bounded number of attempts and a bounded total time, and only for codes that
say "try again" (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED). A
server-sent google.rpc.RetryInfo delay is honoured.

Errors surface as `PosError` with the gRPC code, the google.rpc.ErrorInfo
reason and the google.rpc.BadRequest field violations. A business decline is
not an error: it is a response whose `decision` is DECISION_DECLINED.

Given an `Outbox`, a confirm or cancel that still fails with a retryable code
once the retries are spent is written to the outbox with its request_id and
`PosPending` is raised: the sale is not lost, `Outbox.flush` delivers it later.
An Authorize whose retries run out on a retryable code has an outcome the
terminal never learned: the client queues a reversal of it
(ReverseAuthorization naming its request_id) in the outbox by itself, so
money it may have held is released (or the Authorize, arriving late, is
declined REVERSED), and raises the Authorize's error as before.

Secure link. With a client certificate (`cert_file`, `key_file`, and the CA
that signed the server's certificate, `ca_file`) the client talks mutual TLS
and is a terminal: the certificate names it (CN) and its station (O). It signs
on (SecurityService.SignOn) for its working key when it has none, when the
key's valid_until has passed by `clock`, and when the server refuses the key
(UNAUTHENTICATED KEY_NOT_ACCEPTED, or MAC_INVALID: a damaged stored key), and
MACs every Authorize, Confirm and Cancel with a fresh transaction counter
(fuelcard_pos.terminal). The counter and the key live in a `TerminalStore`
(`state`), so the counter keeps rising across restarts; a counter is stored
before the request carrying it is sent, and sign-on lifts it to the server's
last accepted one. Retries of one call resend the same counter and MAC (the
server answers a resend from its idempotency record before it looks at the
counter); a request refused for its key or counter is re-signed with a fresh
counter and sent again, at most twice per call. If the server has accepted a
counter this terminal's state never handed out (the state was rolled back or
restored, or the certificate is used elsewhere), the request is refused with
PosError UNAUTHENTICATED COUNTER_REPLAYED once, the client re-syncs from
SignOn.last_counter, and the next request (or a resend of the same one)
goes through. Without a certificate the link is plaintext and nothing is
MACed: development against a loopback server only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

import grpc
from fuelcard.v1 import (
    common_pb2,
    security_pb2,
    security_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)
from google.protobuf.message import Message

# The errors live in a module of their own, which the outbox imports too
# (the outbox never imports the client); they stay importable from here.
from fuelcard_pos.errors import (
    RESYNC_REASONS,
    RETRYABLE_CODES,
    FieldViolation,
    PosError,
    PosPending,
)
from fuelcard_pos.outbox import FlushReport, Outbox, OutboxFull
from fuelcard_pos.terminal import (
    TerminalStore,
    WorkingKey,
    certificate_identity,
    sign,
    strip_auth,
)

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_TARGET",
    "RESYNC_REASONS",
    "RETRYABLE_CODES",
    "FieldViolation",
    "PosClient",
    "PosError",
    "PosPending",
    "RetryEvent",
    "RetryPolicy",
    "SignOnEvent",
    "mask_card_number",
]

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_DEADLINE_S = 3.0
# Re-signed sends of one request after a refusal for one of RESYNC_REASONS, at most.
MAX_RESIGNS = 2
# Sign on this long before the working key's valid_until (local clock).
DEFAULT_KEY_REFRESH_MARGIN = dt.timedelta(minutes=1)

# An attempt with less time than this left is not worth starting.
MIN_ATTEMPT_S = 0.05

# Channel options for a POS on a mobile or DSL link. The server allows pings
# every 10 s without calls; 30 s finds a dead link before the next sale.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Come back quickly once the link returns; our own retries pace the calls.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 1 * 1024 * 1024),
    ("grpc.primary_user_agent", "fuelcard-pos/0.1"),
)


def mask_card_number(card_number: str) -> str:
    """'6222 **** **** 1234': the only form of a card number we ever show."""
    digits = card_number.strip()
    if len(digits) < 12:
        return "*" * len(digits)
    return f"{digits[:4]} **** **** {digits[-4:]}"


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    # Wall-clock budget for one call, all attempts and pauses included.
    total_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if self.total_timeout_s <= 0:
            raise ValueError("total_timeout_s must be positive")

    def backoff_s(self, failed_attempts: int, rng: random.Random,
                  server_delay_s: float | None = None) -> float:
        """The pause after `failed_attempts` failures: equal jitter around an
        exponential base (so pauses never collapse to zero), and never
        shorter than what the server asked for in RetryInfo."""
        base = min(self.max_backoff_s,
                   self.initial_backoff_s * self.multiplier ** max(0, failed_attempts - 1))
        delay = base / 2 + rng.uniform(0, base / 2)
        if server_delay_s is not None:
            delay = max(delay, server_delay_s)
        return delay


@dataclass(frozen=True)
class RetryEvent:
    """Told to `on_retry` before each pause: attempt `attempt` failed with `code`."""

    method: str
    request_id: str | None
    attempt: int
    code: grpc.StatusCode
    reason: str
    delay_s: float


@dataclass(frozen=True)
class SignOnEvent:
    """A sign-on (签到) this client made; never carries the key itself."""

    terminal_id: str
    key_version: int
    valid_from: dt.datetime
    valid_until: dt.datetime
    # The last counter the server had accepted from this terminal.
    server_last_counter: int
    # The terminal's counter after the sign-on: the next request uses more.
    counter: int
    # Why: "no working key", "key expired", "requested", or the refusal
    # (KEY_NOT_ACCEPTED, MAC_INVALID, COUNTER_REPLAYED) that prompted it.
    reason: str


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
TReq = TypeVar("TReq", transaction_pb2.AuthorizeRequest, transaction_pb2.ConfirmRequest,
               transaction_pb2.CancelRequest, transaction_pb2.ReverseAuthorizationRequest)


class PosClient:
    """TransactionService for a POS terminal. Thread-safe; close it (or use
    it as a context manager) to release the channel (and the terminal state
    it opened itself).

    TLS: `ca_file` (PEM roots; None: gRPC's default roots), `cert_file` and
    `key_file` (this terminal's certificate and key: a certificate of role
    pos makes the client a terminal that signs on and MACs), `server_name`
    (override the name checked against the server's certificate). With none
    of them the channel is plaintext.

    Terminal: `state` is the TerminalStore (or its file) that keeps the
    counter and the working key; None keeps them in memory, which is correct
    but signs on in every process. `terminal_id` overrides the certificate's
    CN; `clock` (aware datetimes) is the local time the key's valid_until is
    judged by, `key_refresh_margin` how early to sign on before it;
    `on_sign_on` hears of every sign-on (never the key)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, deadline_s: float = DEFAULT_DEADLINE_S,
                 retry: RetryPolicy | None = None, outbox: Outbox | None = None,
                 channel_options: Sequence[tuple[str, int | str]] = (),
                 on_retry: Callable[[RetryEvent], None] | None = None,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                 key_file: str | Path | None = None, server_name: str | None = None,
                 state: TerminalStore | str | Path | None = None,
                 terminal_id: str | None = None,
                 clock: Callable[[], dt.datetime] = _utc_now,
                 on_sign_on: Callable[[SignOnEvent], None] | None = None,
                 key_refresh_margin: dt.timedelta = DEFAULT_KEY_REFRESH_MARGIN) -> None:
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        if cert_file is None and state is not None:
            raise ValueError("a terminal state needs a terminal certificate (cert_file, key_file)")
        self.target = target
        self.deadline_s = deadline_s
        self.retry = retry or RetryPolicy()
        self.outbox = outbox
        self.on_retry = on_retry
        self.on_sign_on = on_sign_on
        self.key_refresh_margin = key_refresh_margin
        self._rng = rng or random.Random()
        self._rng_lock = threading.Lock()
        self._sleep = sleep
        self._clock = clock
        options = dict(DEFAULT_CHANNEL_OPTIONS)
        options.update(dict(channel_options))

        # terminal identity and state (before the channel: nothing to undo)
        self.terminal_id: str | None = None
        self.station_id: str | None = None
        self.store: TerminalStore | None = None
        self._owns_store = False
        self._key: WorkingKey | None = None
        self._clock_ignored_for: WorkingKey | None = None
        self._key_lock = threading.RLock()
        self.last_sign_on: SignOnEvent | None = None
        credentials: grpc.ChannelCredentials | None = None
        if cert_file is not None or ca_file is not None:
            root = Path(ca_file).read_bytes() if ca_file is not None else None
            chain = Path(cert_file).read_bytes() if cert_file is not None else None
            private = Path(key_file).read_bytes() if key_file is not None else None
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=private, certificate_chain=chain)
            if server_name:
                options["grpc.ssl_target_name_override"] = server_name
            role, cn, scope = certificate_identity(chain) if chain is not None else ("", "", "")
            if role == "pos" or (chain is not None and terminal_id):
                self.terminal_id = terminal_id or cn
                self.station_id = scope or None
                if not self.terminal_id:
                    raise ValueError("the certificate names no terminal (no CN)")
                if isinstance(state, TerminalStore):
                    self.store = state
                else:
                    self.store = TerminalStore(":memory:" if state is None else state)
                    self._owns_store = True
        if state is not None and self.store is None:
            raise ValueError("a terminal state needs a terminal certificate (role pos)")
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=list(options.items()))
        else:
            self._channel = grpc.secure_channel(target, credentials,
                                                options=list(options.items()))
        self._stub = transaction_pb2_grpc.TransactionServiceStub(self._channel)
        self._security = security_pb2_grpc.SecurityServiceStub(self._channel)
        self._closed = False

    @property
    def is_terminal(self) -> bool:
        """Whether this client is a terminal (its certificate's role is pos)
        that signs on and MACs its requests."""
        return self.store is not None

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._channel.close()
            if self._owns_store and self.store is not None:
                self.store.close()

    def __enter__(self) -> PosClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pump cycle ----------------------------------------------------

    def authorize(self, card_number: str, amount_fen: int, station_id: str | None = None,
                  terminal_id: str | None = None, nozzle: int = 1,
                  product: common_pb2.Product.ValueType = common_pb2.PRODUCT_GASOLINE_92,
                  *, request_id: str | None = None, deadline_s: float | None = None,
                  ) -> transaction_pb2.AuthorizeResponse:
        """Reserve `amount_fen` before the nozzle is lifted. Returns the
        response whether approved or declined; raises PosError on errors.
        The station and terminal default to the ones the certificate names."""
        station_id = station_id if station_id is not None else self.station_id
        terminal_id = terminal_id if terminal_id is not None else self.terminal_id
        if station_id is None or terminal_id is None:
            raise ValueError("station_id and terminal_id are needed: no certificate names them")
        request = transaction_pb2.AuthorizeRequest(
            request_id=request_id or new_request_id(), card_number=card_number,
            amount_fen=amount_fen, station_id=station_id, terminal_id=terminal_id,
            nozzle=nozzle, product=product)
        try:
            return self._mutate("Authorize", self._stub.Authorize, request, deadline_s)
        except PosError as exc:
            self._queue_reversal(request.request_id, exc)
            raise

    def confirm(self, hold_id: str, final_amount_fen: int, volume_ml: int = 0,
                unit_price_fen: int = 0, *, request_id: str | None = None,
                deadline_s: float | None = None) -> transaction_pb2.ConfirmResponse:
        """Settle the hold for what was delivered. Raises PosPending if the
        link stayed down and the confirm went to the outbox."""
        request = transaction_pb2.ConfirmRequest(
            request_id=request_id or new_request_id(), hold_id=hold_id,
            final_amount_fen=final_amount_fen, volume_ml=volume_ml,
            unit_price_fen=unit_price_fen)
        return self.send_confirm(request, deadline_s=deadline_s)

    def cancel(self, hold_id: str, *, request_id: str | None = None,
               deadline_s: float | None = None) -> transaction_pb2.CancelResponse:
        """Release the hold. Raises PosPending if it went to the outbox."""
        request = transaction_pb2.CancelRequest(request_id=request_id or new_request_id(),
                                                hold_id=hold_id)
        return self.send_cancel(request, deadline_s=deadline_s)

    def reverse_authorization(self, original_request_id: str, *, request_id: str | None = None,
                              deadline_s: float | None = None
                              ) -> transaction_pb2.ReverseAuthorizationResponse:
        """Reverse the Authorize sent with `original_request_id` (冲正): its
        hold is released, or it is declined if it arrives later. Raises
        PosPending if the reversal went to the outbox."""
        request = transaction_pb2.ReverseAuthorizationRequest(
            request_id=request_id or new_request_id(), original_request_id=original_request_id)
        return self.send_reversal(request, deadline_s=deadline_s)

    def balance(self, card_number: str, *, deadline_s: float | None = None
                ) -> transaction_pb2.GetCardBalanceResponse:
        return self._call("GetCardBalance", self._stub.GetCardBalance,
                          transaction_pb2.GetCardBalanceRequest(card_number=card_number),
                          None, deadline_s)

    def get_hold(self, hold_id: str, *, deadline_s: float | None = None) -> common_pb2.Hold:
        response = self._call("GetHold", self._stub.GetHold,
                              transaction_pb2.GetHoldRequest(hold_id=hold_id), None, deadline_s)
        return response.hold

    # -- fully built requests (the outbox resends through these) -----------

    def send_confirm(self, request: transaction_pb2.ConfirmRequest, *,
                     deadline_s: float | None = None, queue: bool = True
                     ) -> transaction_pb2.ConfirmResponse:
        self._require_request_id(request.request_id)
        try:
            return self._mutate("Confirm", self._stub.Confirm, request, deadline_s)
        except PosError as exc:
            self._queue_or_raise("confirm", request, exc, queue)

    def send_cancel(self, request: transaction_pb2.CancelRequest, *,
                    deadline_s: float | None = None, queue: bool = True
                    ) -> transaction_pb2.CancelResponse:
        self._require_request_id(request.request_id)
        try:
            return self._mutate("Cancel", self._stub.Cancel, request, deadline_s)
        except PosError as exc:
            self._queue_or_raise("cancel", request, exc, queue)

    def send_reversal(self, request: transaction_pb2.ReverseAuthorizationRequest, *,
                      deadline_s: float | None = None, queue: bool = True
                      ) -> transaction_pb2.ReverseAuthorizationResponse:
        self._require_request_id(request.request_id)
        try:
            return self._mutate("ReverseAuthorization", self._stub.ReverseAuthorization, request,
                                deadline_s)
        except PosError as exc:
            self._queue_or_raise("reverse", request, exc, queue)

    def flush_outbox(self) -> FlushReport:
        """Deliver what the outbox holds; see Outbox.flush."""
        if self.outbox is None:
            raise RuntimeError("this client has no outbox")
        return self.outbox.flush(self)

    # -- terminal security ---------------------------------------------------

    def sign_on(self, *, deadline_s: float | None = None) -> SignOnEvent:
        """Sign on now (签到): fetch the current working key and re-sync the
        counter with the server's. Done on its own when needed."""
        with self._key_lock:
            return self._sign_on_locked("requested", deadline_s)

    def _terminal(self) -> tuple[str, TerminalStore]:
        if self.store is None or self.terminal_id is None:
            raise RuntimeError("this client has no terminal certificate (plaintext mode)")
        return self.terminal_id, self.store

    def _sign_on_locked(self, reason: str, deadline_s: float | None) -> SignOnEvent:
        terminal_id, store = self._terminal()
        answer = self._call("SignOn", self._security.SignOn,
                            security_pb2.SignOnRequest(terminal_id=terminal_id), None, deadline_s)
        working = WorkingKey(terminal_id, answer.key_version,
                             answer.valid_from.ToDatetime(dt.UTC),
                             answer.valid_until.ToDatetime(dt.UTC), answer.working_key)
        now = self._clock()
        counter = store.signed_on(working, answer.last_counter, now)
        self._key = working
        # A key that is stale by our clock the moment we get it: our clock is
        # off, so let the server judge this key (it says KEY_NOT_ACCEPTED).
        self._clock_ignored_for = None if self._fresh(working, now) else working
        event = SignOnEvent(terminal_id, working.version, working.valid_from,
                            working.valid_until, answer.last_counter, counter, reason)
        self.last_sign_on = event
        if self.on_sign_on is not None:
            self.on_sign_on(event)
        return event

    def _fresh(self, key: WorkingKey, now: dt.datetime) -> bool:
        return now < key.valid_until - self.key_refresh_margin

    def _working_key(self, deadline_s: float | None) -> WorkingKey:
        terminal_id, store = self._terminal()
        with self._key_lock:
            key = self._key or store.working_key(terminal_id)
            if key is None:
                self._sign_on_locked("no working key", deadline_s)
            elif key is not self._clock_ignored_for and not self._fresh(key, self._clock()):
                self._sign_on_locked("key expired", deadline_s)
            else:
                self._key = key
            assert self._key is not None
            return self._key

    def _signed(self, request: TReq, deadline_s: float | None) -> tuple[TReq, WorkingKey]:
        """The request with the key version, a freshly reserved counter (on
        disk before this returns) and its MAC."""
        terminal_id, store = self._terminal()
        key = self._working_key(deadline_s)
        return sign(request, key, store.reserve(terminal_id)), key

    def _resync(self, exc: PosError, used: WorkingKey, deadline_s: float | None) -> bool:
        """After a refusal of a signed request: fix what can be fixed by a
        sign-on. True if the request should be re-signed and sent again."""
        if exc.code != grpc.StatusCode.UNAUTHENTICATED or exc.reason not in RESYNC_REASONS:
            return False
        terminal_id, store = self._terminal()
        with self._key_lock:
            if exc.reason == "COUNTER_REPLAYED":
                handed_out = store.last_counter(terminal_id)
                event = self._sign_on_locked(exc.reason, deadline_s)
                # The server has seen a counter we never handed out: our state
                # is behind (rolled back, restored, or a second device). Say so
                # once; the counter is re-synced for the next request.
                return event.server_last_counter <= handed_out
            if self._key is used:  # another thread may have signed on already
                self._sign_on_locked(exc.reason, deadline_s)
            return True

    def _mutate(self, method: str, fn: grpc.UnaryUnaryMultiCallable[TReq, Resp], request: TReq,
                deadline_s: float | None) -> Resp:
        """A terminal request: MACed on a secure link, with one counter for
        all the retries of a send."""
        if self._closed:
            raise RuntimeError("the PosClient is closed")
        if self.store is None:
            return self._call(method, fn, request, request.request_id, deadline_s)
        resigns = 0
        while True:
            signed, key = self._signed(request, deadline_s)
            try:
                return self._call(method, fn, signed, request.request_id, deadline_s)
            except PosError as exc:
                if resigns >= MAX_RESIGNS or not self._resync(exc, key, deadline_s):
                    raise
            resigns += 1

    # -- machinery ---------------------------------------------------------

    @staticmethod
    def _require_request_id(request_id: str) -> None:
        if not request_id:
            raise ValueError("a mutating request needs its request_id before it is sent")

    def _queue_reversal(self, original_request_id: str, exc: PosError) -> None:
        """After an Authorize whose outcome is unknown (a retryable error
        once the retries are spent), queue its reversal; best effort: a full
        or broken outbox leaves the hold to expire on its own."""
        if not exc.retryable or self.outbox is None:
            return
        with contextlib.suppress(OutboxFull, sqlite3.Error):
            self.outbox.enqueue(transaction_pb2.ReverseAuthorizationRequest(
                request_id=new_request_id(), original_request_id=original_request_id))

    def _queue_or_raise(self, operation: Literal["confirm", "cancel", "reverse"],
                        request: transaction_pb2.ConfirmRequest | transaction_pb2.CancelRequest
                        | transaction_pb2.ReverseAuthorizationRequest,
                        exc: PosError, queue: bool) -> NoReturn:
        if not (queue and exc.resendable and self.outbox is not None):
            raise exc
        try:
            # what to do, not how one send was signed: the flush signs afresh
            entry_id = self.outbox.enqueue(strip_auth(request))
        except (OutboxFull, sqlite3.Error) as not_kept:
            # neither delivered nor kept: the caller must know it failed
            raise exc from not_kept
        hold_id = "" if isinstance(request, transaction_pb2.ReverseAuthorizationRequest) else (
            request.hold_id)
        raise PosPending(operation, request.request_id, hold_id, entry_id, exc) from exc

    def _call(self, method: str, fn: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req,
              request_id: str | None, deadline_s: float | None) -> Resp:
        if self._closed:
            raise RuntimeError("the PosClient is closed")
        policy = self.retry
        per_attempt = deadline_s if deadline_s is not None else self.deadline_s
        if per_attempt <= 0:
            raise ValueError("deadline_s must be positive")
        give_up_at = time.monotonic() + policy.total_timeout_s
        attempt = 0
        while True:
            attempt += 1
            remaining = give_up_at - time.monotonic()
            try:
                response: Resp = fn(request, timeout=max(MIN_ATTEMPT_S, min(per_attempt, remaining)))
                return response
            except grpc.RpcError as rpc_error:
                error = PosError.from_rpc_error(rpc_error, method=method, request_id=request_id,
                                                attempts=attempt)
            if not error.retryable or attempt >= policy.max_attempts:
                raise error
            with self._rng_lock:
                delay = policy.backoff_s(attempt, self._rng, error.retry_delay_s)
            if time.monotonic() + delay + MIN_ATTEMPT_S > give_up_at:
                raise error
            if self.on_retry is not None:
                self.on_retry(RetryEvent(method, request_id, attempt, error.code, error.reason,
                                         delay))
            self._sleep(delay)

