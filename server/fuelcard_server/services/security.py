"""SecurityService: terminal sign-on (签到) for working keys, PINs, channel
keys, step-up challenges and the audited reveal of a card number."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc
from fuelcard.v1 import funding_pb2, security_pb2, security_pb2_grpc

from fuelcard_server import errors, gm, keys, stepup
from fuelcard_server.card_numbers import CardNumberMismatch
from fuelcard_server.db import Database
from fuelcard_server.identity import Role
from fuelcard_server.privacy import mask_phone
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import ID_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)

STEP_UP_KINDS = frozenset({stepup.RECHARGE, stepup.PIN_RESET, stepup.LIMIT_RAISE,
                           stepup.REVEAL_CARD_NUMBER, stepup.ANOMALY, stepup.HOLDER_DATA_EXPORT,
                           stepup.SALE_REFUND, stepup.PHONE_CHANGE})
PHONE_MIN_CHARS, PHONE_MAX_CHARS = 5, 20
STEP_UP_MAX_AMOUNT_FEN = 10**12
# An admin console's key id: its working key is kept apart from any terminal's.
ADMIN_KEY_PREFIX = "admin/"
# The card-number field of an admin console's PIN block: all zeros (the
# console does not hold the card number).
NO_PAN = "0" * 13
RESET_PIN_SQL = stepup.gate(
    "fc.reset_pin(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_card_uid => %(card_uid)s::uuid,"
    " p_pin_hash => %(pin_hash)s, p_now => %(now)s::timestamptz)")
# A phone change behind the step-up gate: its code went to the old phone.
CHANGE_HOLDER_PHONE_SQL = stepup.gate(
    "fc.change_holder_phone(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_account_uid => %(account_uid)s::uuid,"
    " p_phone_sealed => %(phone_sealed)s, p_phone_index => %(phone_index)s,"
    " p_seal_key_id => %(seal_key_id)s, p_now => %(now)s::timestamptz)")
CARD_NUMBER_PARTS_SQL = "SELECT fc.card_number_parts(p_card_uid => %(card_uid)s::uuid)"


REGISTER_CHANNEL_KEY_SQL = """
    INSERT INTO fc.channel_keys (channel, public_key_hex, registered_at) VALUES (%s, %s, %s)
    ON CONFLICT (channel) DO UPDATE
       SET public_key_hex = excluded.public_key_hex, registered_at = excluded.registered_at
    RETURNING public_key_hex"""
CHANNEL_KEY_SQL = "SELECT public_key_hex FROM fc.channel_keys WHERE channel = %s::smallint"
CHANNELS = frozenset(v for v in funding_pb2.Channel.values() if v != funding_pb2.CHANNEL_UNSPECIFIED)

# How long a server process trusts what it read from fc.channel_keys. A key
# registered or replaced through RegisterChannelKey takes effect at once in
# the process that served the call (it drops its cached entry); other server
# processes (workers sharing the port, other hosts) pick it up within this
# many seconds. Rotate a channel key with that in mind: keep the adapter
# signing with the old key for CHANNEL_KEY_TTL_S after registering the new one.
CHANNEL_KEY_TTL_S = 30.0


class ChannelKeys:
    """The SM2 public keys registered for payment channels, cached so that a
    recharge does not read fc.channel_keys. "No key registered" is cached
    too (a flood of signed notifications for an unregistered channel does
    not reach the database either)."""

    def __init__(self, db: Database, ttl_s: float = CHANNEL_KEY_TTL_S,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self.ttl_s = ttl_s
        self._now = now
        self._entries: dict[int, tuple[float, gm.Sm2PublicKey | None]] = {}
        # Bumped by invalidate(): a read that started before a key change
        # must not put the old key back into the cache when it completes.
        self._generation = 0

    async def get(self, channel: int) -> gm.Sm2PublicKey | None:
        """The key registered for `channel`, or None."""
        entry = self._entries.get(channel)
        if entry is not None and self._now() < entry[0]:
            return entry[1]
        generation = self._generation
        row = await self._db.fetch_one(CHANNEL_KEY_SQL, (channel,))
        # The table only holds validated keys (RegisterChannelKey, and a CHECK
        # on the form); a point edited off the curve raises: INTERNAL.
        key = gm.Sm2PublicKey.from_hex(row[0]) if row is not None else None
        if generation == self._generation:
            self._entries[channel] = (self._now() + self.ttl_s, key)
        return key

    def invalidate(self, channel: int) -> None:
        """Forget `channel`'s key: the next get() reads the database."""
        self._generation += 1
        self._entries.pop(channel, None)


_CHANNEL_KEYS: weakref.WeakKeyDictionary[Database, ChannelKeys] = weakref.WeakKeyDictionary()


def channel_keys(db: Database) -> ChannelKeys:
    """The channel key cache of the server using `db` (one per server: the
    servicers of one server share their Database, and so this cache, which
    RegisterChannelKey invalidates and Recharge reads)."""
    cache = _CHANNEL_KEYS.get(db)
    if cache is None:
        cache = _CHANNEL_KEYS[db] = ChannelKeys(db)
    return cache


class SecurityService(Servicer, security_pb2_grpc.SecurityServiceServicer):
    @rpc(Role.POS, Role.ADMIN)
    async def SignOn(self, request: security_pb2.SignOnRequest, context: Ctx
                     ) -> security_pb2.SignOnResponse:
        v = Violations()
        v.text("terminal_id", request.terminal_id, required=True, max_chars=ID_MAX_CHARS)
        v.raise_if_any()
        caller = self.d.identity()
        if not self.d.tls:
            # Keys go only to a terminal its certificate names, over TLS.
            raise errors.failed_precondition("SIGN_ON_NEEDS_TLS")
        # An admin console signs on under its own key id, apart from terminals.
        key_id = caller.name if caller.role is Role.POS else ADMIN_KEY_PREFIX + caller.name
        if request.terminal_id != key_id or (caller.role is Role.POS
                                             and key_id.startswith(ADMIN_KEY_PREFIX)):
            raise errors.permission_denied("TERMINAL_MISMATCH")
        working = await self.d.terminal_keys.current(caller.scope, key_id, self.d.clock.now())
        response = security_pb2.SignOnResponse(
            key_version=working.version, working_key=working.key,
            last_counter=await self.d.terminal_keys.last_counter(caller.scope, key_id))
        response.valid_from.FromDatetime(working.valid_from)
        response.valid_until.FromDatetime(working.valid_until)
        return response

    @rpc(Role.POS)
    async def SetCardPin(self, request: security_pb2.SetCardPinRequest, context: Ctx
                         ) -> security_pb2.SetCardPinResponse:
        v = Violations()
        v.card_number("card_number", request.card_number)
        if len(request.new_pin_block) != keys.PIN_BLOCK_SIZE:
            v.add("new_pin_block", "must be one 16-byte PIN block", "PIN_BLOCK_INVALID")
        if request.old_pin_block and len(request.old_pin_block) != keys.PIN_BLOCK_SIZE:
            v.add("old_pin_block", "must be one 16-byte PIN block", "PIN_BLOCK_INVALID")
        v.raise_if_any()
        if not self.d.tls:
            raise errors.failed_precondition("PIN_NEEDS_TERMINAL_KEY")
        caller = self.d.identity()
        await self.d.pins.set(caller.scope, caller.name, request.key_version, request.card_number,
                              self.d.pan_index.of(request.card_number), request.new_pin_block,
                              request.old_pin_block, self.d.clock.now())
        return security_pb2.SetCardPinResponse()

    @rpc(Role.ADMIN)
    async def RegisterChannelKey(self, request: security_pb2.RegisterChannelKeyRequest,
                                 context: Ctx) -> security_pb2.RegisterChannelKeyResponse:
        v = Violations()
        v.enum("channel", request.channel, CHANNELS)
        key = None
        try:
            key = gm.Sm2PublicKey.from_hex(request.public_key_hex)
        except ValueError:
            v.add("public_key_hex", "must be an SM2 public key: 128 hex digits, a point on the curve",
                  "PUBLIC_KEY_INVALID")
        v.raise_if_any()
        assert key is not None
        row = await self.d.db.fetch_one(REGISTER_CHANNEL_KEY_SQL, (
            request.channel, key.to_hex(), self.d.clock.now()))
        assert row is not None
        # Committed (autocommit): from now on this process verifies with the
        # new key; other processes within CHANNEL_KEY_TTL_S.
        channel_keys(self.d.db).invalidate(request.channel)
        return security_pb2.RegisterChannelKeyResponse(public_key_hex=row[0])

    @rpc(Role.ADAPTER, Role.ADMIN)
    async def GetServerSigningKey(self, request: security_pb2.GetServerSigningKeyRequest,
                                  context: Ctx) -> security_pb2.GetServerSigningKeyResponse:
        return security_pb2.GetServerSigningKeyResponse(
            public_key_hex=self.d.signing_key.public_key.to_hex())

    @rpc(Role.ADMIN, Role.ADAPTER)
    async def CreateStepUpChallenge(self, request: security_pb2.CreateStepUpChallengeRequest,
                                    context: Ctx) -> security_pb2.CreateStepUpChallengeResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.enum("kind", request.kind, STEP_UP_KINDS)
        subject = v.uuid("subject_id", request.subject_id)
        v.non_negative("amount_fen", request.amount_fen, STEP_UP_MAX_AMOUNT_FEN)
        v.raise_if_any()
        assert subject is not None
        challenge = await self.d.step_ups.create(
            self.d.caller(context), request.request_id, request.kind, subject, request.amount_fen,
            self.d.clock.now())
        response = security_pb2.CreateStepUpChallengeResponse(
            challenge_id=challenge.challenge_id, masked_destination=challenge.masked_destination,
            max_attempts=challenge.max_attempts)
        response.expire_time.FromMicroseconds(challenge.expire_us)
        return response

    @rpc(Role.ADMIN)
    async def ResetCardPin(self, request: security_pb2.ResetCardPinRequest, context: Ctx
                           ) -> security_pb2.ResetCardPinResponse:
        v = Violations()
        v.request_id(request.request_id)
        card_id = v.uuid("card_id", request.card_id)
        if len(request.new_pin_block) != keys.PIN_BLOCK_SIZE:
            v.add("new_pin_block", "must be one 16-byte PIN block", "PIN_BLOCK_INVALID")
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        if not self.d.tls:
            # The block is read with the key of the console its certificate names.
            raise errors.failed_precondition("PIN_NEEDS_TERMINAL_KEY")
        caller, now = self.d.identity(), self.d.clock.now()
        working = await self.d.terminal_keys.accepted(caller.scope, ADMIN_KEY_PREFIX + caller.name,
                                                      request.key_version, now)
        try:
            pin = keys.decrypt_pin_block(keys.pin_key(working), request.new_pin_block, NO_PAN)
        except keys.PinBlockError:
            raise errors.invalid([errors.FieldViolation(
                "new_pin_block", "does not decode to a PIN of 4-12 digits",
                "PIN_BLOCK_INVALID")]) from None
        hashed = await asyncio.to_thread(keys.hash_pin, pin, pepper=self.d.pins.pepper)
        del pin
        key = self.d.caller(context)
        d = stepup.check_answer(await self.d.db.call(RESET_PIN_SQL, (
            self.d.step_ups.gate_params(key, request.request_id, "reset_pin", True,
                                        stepup.PIN_RESET, card_id, 0, challenge,
                                        request.step_up.code, now)
            | {"caller": key, "request_id": request.request_id,
               "request_hash": self.d.fingerprint("reset_pin", request), "card_uid": card_id,
               "pin_hash": hashed, "now": now})))
        return security_pb2.ResetCardPinResponse(card_id=d["card_id"])

    @rpc(Role.ADMIN)
    async def RevealCardNumber(self, request: security_pb2.RevealCardNumberRequest,
                               context: Ctx) -> security_pb2.RevealCardNumberResponse:
        v = Violations()
        v.request_id(request.request_id)
        card_id = v.uuid("card_id", request.card_id)
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        assert card_id is not None
        await self.d.step_ups.verify(self.d.caller(context), request.request_id,
                                     stepup.REVEAL_CARD_NUMBER, card_id, 0, challenge,
                                     request.step_up.code, self.d.clock.now())
        row = await self.d.db.fetch_one(CARD_NUMBER_PARTS_SQL, {"card_uid": card_id})
        if row is None or row[0] is None:
            raise errors.not_found("CARD_NOT_FOUND", "card")
        parts = row[0]
        if parts["root_key_id"] is None or None in parts["sealed"]:
            # e.g. seeded straight into the database by the load generator
            raise errors.failed_precondition("CARD_NUMBER_NOT_STORED")
        try:
            pan = self.d.card_vault.open(bytes.fromhex(parts["pan_index"]), parts["root_key_id"],
                                         [bytes.fromhex(x) for x in parts["sealed"]])
        except CardNumberMismatch:
            log.error("stored card number parts do not agree (card %s)", request.card_id)
            raise errors.ApiError(grpc.StatusCode.DATA_LOSS, "CARD_NUMBER_DAMAGED",
                                  "the stored card number does not verify") from None
        return security_pb2.RevealCardNumberResponse(card_id=request.card_id, card_number=pan)

    @rpc(Role.ADMIN)
    async def ChangeHolderPhone(self, request: security_pb2.ChangeHolderPhoneRequest, context: Ctx
                                ) -> security_pb2.ChangeHolderPhoneResponse:
        """Step-up to the old phone rather than dual control by two admins:
        the person who holds the number on file agrees, and one insider
        alone cannot redirect a holder's codes (as two colluding could)."""
        v = Violations()
        v.request_id(request.request_id)
        account_id = v.uuid("account_id", request.account_id)
        phone = request.phone
        if not (phone.isascii() and phone.isdigit() and PHONE_MIN_CHARS <= len(phone) <= PHONE_MAX_CHARS):
            v.add("phone", f"must be {PHONE_MIN_CHARS}-{PHONE_MAX_CHARS} digits", "PHONE_MALFORMED")
        challenge = v.step_up("step_up", request)
        v.raise_if_any()
        caller, now = self.d.caller(context), self.d.clock.now()
        sealed = self.d.holder_seal.seal("phone", phone)
        d = stepup.check_answer(await self.d.db.call(CHANGE_HOLDER_PHONE_SQL, (
            self.d.step_ups.gate_params(caller, request.request_id, "change_holder_phone", True,
                                        stepup.PHONE_CHANGE, account_id, 0, challenge,
                                        request.step_up.code, now)
            | {"caller": caller, "request_id": request.request_id,
               "request_hash": self.d.fingerprint("change_holder_phone", request),
               "account_uid": account_id, "phone_sealed": sealed.sealed,
               "phone_index": sealed.index, "seal_key_id": self.d.holder_seal.key_id, "now": now})))
        return security_pb2.ChangeHolderPhoneResponse(account_id=str(d["account_id"]),
                                                      masked_phone=mask_phone(phone))
