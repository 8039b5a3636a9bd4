"""The PIN block a terminal sends with Authorize (transaction.proto
`pin_block`), byte for byte as the server decodes it (fuelcard_server.keys):

    PIN field  0 N P P P P ... F F   (32 nibbles: 0, the PIN length N, the
                                      digits, then fill 0xF)
    PAN field  0 ... 0 (20 nibbles), then the 12 rightmost digits of the
               card number, check digit excluded
    clear block = PIN field XOR PAN field (16 bytes)
    PIN block   = SM4-ECB(PIN key, clear block)
    PIN key     = SM3-KDF(working key, E("fuelcard", "pin/v1", terminal, key version))

The PIN is handed in as a bytearray and wiped by the caller once the block is
made; it is never printed, logged or kept.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fuelcard_pos.terminal import WorkingKey, _sm3_kdf, canonical

__all__ = ["PIN_MAX_DIGITS", "PIN_MIN_DIGITS", "encrypt_pin_block", "pin_key", "valid_pin"]

PIN_MIN_DIGITS = 4
PIN_MAX_DIGITS = 12
PIN_KEY_SIZE = 16


def valid_pin(pin: bytes | bytearray) -> bool:
    return PIN_MIN_DIGITS <= len(pin) <= PIN_MAX_DIGITS and all(48 <= c <= 57 for c in pin)


def pin_key(working: WorkingKey) -> bytes:
    """The terminal's PIN key for this working key."""
    info = canonical("fuelcard", "pin/v1", working.terminal_id, working.version)
    return _sm3_kdf(working.key, info, PIN_KEY_SIZE)


def _clear_block(pin: bytes | bytearray, card_number: str) -> bytes:
    if not valid_pin(pin):
        raise ValueError(f"a PIN is {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits")
    if not (card_number.isascii() and card_number.isdigit() and len(card_number) >= 13):
        raise ValueError("the card number must be at least 13 digits")
    pin_field = [0, len(pin), *(c - 48 for c in pin)]
    pin_field += [0xF] * (32 - len(pin_field))
    pan_field = [0] * 20 + [ord(c) - 48 for c in card_number[-13:-1]]
    nibbles = [a ^ b for a, b in zip(pin_field, pan_field, strict=True)]
    return bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, 32, 2))


def encrypt_pin_block(working: WorkingKey, pin: bytes | bytearray, card_number: str) -> bytes:
    """The 16-byte encrypted PIN block of `pin` (ASCII digits) for the card,
    under this working key's PIN key."""
    encryptor = Cipher(algorithms.SM4(pin_key(working)), modes.ECB()).encryptor()
    return encryptor.update(_clear_block(pin, card_number)) + encryptor.finalize()
