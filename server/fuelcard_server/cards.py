"""Card numbers (PANs): validation, masking, generation and the blind index.

fc.cards never holds a card number: it keeps a keyed hash of it (the blind
index, HMAC-SM3) to find the card, and a masked form to show. The number
itself is kept only sealed, in segments that live apart (card_numbers.py).
"""

from __future__ import annotations

import hmac
import secrets

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


def new_card_number(length: int = PAN_MAX_DIGITS) -> str:
    """A new card number: the issuer's BIN, random digits from the operating
    system's CSPRNG, and the Luhn check digit. Nothing about the request goes
    in: a number derived from request data (as numbers once were, from the
    card-index key, the caller and the request id) can be rebuilt by whoever
    holds that key and the idempotency table."""
    if not PAN_MIN_DIGITS <= length <= PAN_MAX_DIGITS:
        raise ValueError(f"a card number is {PAN_MIN_DIGITS} to {PAN_MAX_DIGITS} digits")
    payload = ISSUER_PREFIX + "".join(secrets.choice("0123456789")
                                      for _ in range(length - len(ISSUER_PREFIX) - 1))
    return payload + luhn_check_digit(payload)


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
