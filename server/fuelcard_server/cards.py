"""Card numbers (PANs): validation, masking, generation and the blind index.

fc.cards never holds a card number: it keeps a keyed hash of it (the blind
index, HMAC-SM3) to find the card, and a masked form to show. The number
itself is kept only sealed, in segments that live apart (card_numbers.py).
"""

from __future__ import annotations

import hmac

PAN_MIN_DIGITS = 16
PAN_MAX_DIGITS = 19
# Issuer prefix (BIN) of the cards this network generates.
ISSUER_PREFIX = "9860"


def luhn_check_digit(payload: str) -> str:
    """The Luhn check digit to append to `payload` (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = ord(ch) - 48
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def is_valid_pan(pan: str) -> bool:
    return (
        PAN_MIN_DIGITS <= len(pan) <= PAN_MAX_DIGITS
        and pan.isascii()
        and pan.isdigit()
        and luhn_check_digit(pan[:-1]) == pan[-1]
    )


def mask(pan: str) -> str:
    """'6222 **** **** 1234': the first four and last four digits only."""
    return f"{pan[:4]} **** **** {pan[-4:]}"


class PanIndex:
    """Keyed blind index of card numbers: HMAC-SM3 (OpenSSL, microseconds)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the card index key must be at least 16 bytes")
        self._key = key

    def of(self, pan: str) -> bytes:
        return hmac.new(self._key, pan.encode("ascii"), "sm3").digest()

    def generate(self, seed: str, length: int = 19) -> str:
        """A Luhn-valid card number derived from `seed` (e.g. the issuing
        request's caller and request_id), so a replayed IssueCard yields the
        same number without the number ever being stored."""
        digest = hmac.new(self._key, b"pan-generate:" + seed.encode(), "sm3").digest()
        body_len = length - len(ISSUER_PREFIX) - 1
        body = str(int.from_bytes(digest, "big"))[-body_len:].rjust(body_len, "0")
        payload = ISSUER_PREFIX + body
        return payload + luhn_check_digit(payload)
