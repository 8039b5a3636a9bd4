"""Card PINs on the server: PIN blocks in, a verdict out.

A PIN arrives only as an SM4 PIN block under the sending terminal's PIN key
and is stored only as a salted, peppered scrypt hash (keys.hash_pin). The
clear PIN exists for the length of one check and is never logged. scrypt is
slow on purpose (~30 ms of CPU), so it runs in a worker thread (hashlib's
scrypt releases the GIL) and only for requests that carry a PIN block.
"""

from __future__ import annotations

import asyncio
import datetime as dt

from fuelcard_server import errors, keys
from fuelcard_server.db import Database
from fuelcard_server.terminals import TerminalKeys

PIN_HASH_SQL = """
    SELECT c.id, p.pin_hash FROM fc.cards c LEFT JOIN fc.card_pins p ON p.card_id = c.id
     WHERE c.pan_index = %s"""
CHANGE_PIN_SQL = (
    "SELECT fc.change_pin(p_card_id => %(card_id)s, p_had_pin => %(had_pin)s,"
    " p_old_ok => %(old_ok)s, p_pin_hash => %(pin_hash)s, p_now => %(now)s::timestamptz)")


class Pins:
    def __init__(self, db: Database, terminal_keys: TerminalKeys, pepper: bytes) -> None:
        self._db = db
        self._keys = terminal_keys
        self._pepper = pepper

    @property
    def pepper(self) -> bytes:
        return self._pepper

    async def _clear_pin(self, station_id: str, terminal_id: str, key_version: int, block: bytes,
                         card_number: str, now: dt.datetime) -> bytes | None:
        """The PIN in a block, or None if the block does not decode (wrong
        key, wrong card, malformed: all count as a wrong PIN)."""
        working = await self._keys.accepted(station_id, terminal_id, key_version, now)
        try:
            return keys.decrypt_pin_block(keys.pin_key(working), block, card_number)
        except keys.PinBlockError:
            return None

    async def _matches(self, pin: bytes | None, stored: str) -> bool:
        if pin is None:
            return False
        return await asyncio.to_thread(keys.verify_pin, pin, stored, pepper=self._pepper)

    async def verdict(self, station_id: str, terminal_id: str, key_version: int, block: bytes,
                      card_number: str, pan_index: bytes, now: dt.datetime) -> bool | None:
        """Whether the block holds the card's PIN; None if the card has no
        PIN (or is unknown: authorize answers that)."""
        row = await self._db.fetch_one(PIN_HASH_SQL, (pan_index,))
        if row is None or row[1] is None:
            return None
        pin = await self._clear_pin(station_id, terminal_id, key_version, block, card_number, now)
        ok = await self._matches(pin, row[1])
        del pin
        return ok

    async def set(self, station_id: str, terminal_id: str, key_version: int, card_number: str,
                  pan_index: bytes, new_block: bytes, old_block: bytes, now: dt.datetime) -> None:
        """Set a card's first PIN, or change it given the current one. A
        wrong current PIN counts towards the card's PIN lock, as at the pump,
        and a locked card is refused: only an operator's reset unlocks it."""
        row = await self._db.fetch_one(PIN_HASH_SQL, (pan_index,))
        if row is None:
            raise errors.not_found("CARD_NOT_FOUND", "card")
        card_id, stored = row
        # The new PIN first, and always: decoding or hashing it only once the
        # old one matched would tell a right guess from a wrong one (by the
        # answer for a bad new block, or by the time a hash takes), lock or
        # no lock.
        new = await self._clear_pin(station_id, terminal_id, key_version, new_block, card_number, now)
        if new is None:
            raise errors.invalid([errors.FieldViolation(
                "new_pin_block", "does not decode to a PIN of 4-12 digits", "PIN_BLOCK_INVALID")])
        hashed = await asyncio.to_thread(keys.hash_pin, new, pepper=self._pepper)
        del new
        old_ok: bool | None = None
        if stored is not None and old_block:
            old = await self._clear_pin(station_id, terminal_id, key_version, old_block, card_number, now)
            old_ok = await self._matches(old, stored)
            del old
        answer = await self._db.fetch_one(CHANGE_PIN_SQL, {
            "card_id": card_id, "had_pin": stored is not None, "old_ok": old_ok, "pin_hash": hashed,
            "now": now})
        refusal = answer[0] if answer is not None else None
        if refusal == "PIN_LOCKED":
            raise errors.failed_precondition("PIN_LOCKED")
        if refusal is not None:  # WRONG_PIN, PIN_REQUIRED
            raise errors.failed_precondition("OLD_PIN_WRONG")
