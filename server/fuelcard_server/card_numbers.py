"""Card numbers stored in segments that live apart (分段存储).

fc.cards keeps the blind index (to find a card) and the masked form (to show
it). Besides, at issue, the number is cut into three segments; each is
sealed (SM4-GCM) under its own key derived from the data key and stored in
its own schema, owned by its own NOLOGIN role (fc_pan_seg1..3, 0006); the
whole number, sealed under a fourth derived key, goes to a fourth schema
(fc_pan_vault). Every sealed value is bound (associated data) to the card's
blind index and to its part number, so none can be moved to another card or
slot. No single table, schema or database dump shows a usable number, and
without the root key (never in the database), which the data key is sealed
under (key_custody.py), none of them shows any digit.

RevealCardNumber (admin, step-up, audited) is the only reader: it unseals the
segments and the whole number and returns the number only if they agree and
match the blind index.
"""

from __future__ import annotations

from fuelcard_server import gm, keys
from fuelcard_server.cards import PanIndex

PARTS = ("segment-1", "segment-2", "segment-3", "whole")


class CardNumberMismatch(Exception):
    """The stored parts of a card number do not agree (tampered with, or made
    under another root key)."""


def segments(pan: str) -> tuple[str, str, str]:
    """The number cut in three, at a third and two thirds of its length."""
    a, b = len(pan) // 3, 2 * len(pan) // 3
    return pan[:a], pan[a:b], pan[b:]


class CardVault:
    # `provider` gives the data key (key_custody.ServingKeys.data). The id
    # stored with each part is that key's id, in a column named root_key_id:
    # before key custody the data key was the root key itself.
    def __init__(self, provider: keys.KeyProvider, index: PanIndex) -> None:
        root = provider.root_key()
        self.root_key_id = keys.root_key_id(root)
        self._keys = [gm.sm3_kdf(root, keys.canonical("fuelcard", "pan-store/v1", part), 16)
                      for part in PARTS]
        self._index = index

    @staticmethod
    def _aad(part: str, pan_index: bytes) -> bytes:
        return keys.canonical("fuelcard/pan/v1", part, pan_index)

    def seal(self, pan: str) -> list[bytes]:
        """Sealed segments 1-3 and the sealed whole number, in that order."""
        pan_index = self._index.of(pan)
        values = [*segments(pan), pan]
        return [gm.seal(key, value.encode(), self._aad(part, pan_index))
                for key, part, value in zip(self._keys, PARTS, values, strict=True)]

    def open(self, pan_index: bytes, root_key_id: str, sealed: list[bytes]) -> str:
        """The number from its stored parts; CardNumberMismatch unless every
        part unseals and they agree with each other and with the index."""
        if root_key_id != self.root_key_id or len(sealed) != len(PARTS):
            raise CardNumberMismatch("stored under another root key")
        try:
            values = [gm.unseal(key, value, self._aad(part, pan_index)).decode()
                      for key, part, value in zip(self._keys, PARTS, sealed, strict=True)]
        except (gm.AuthenticationError, UnicodeDecodeError):
            raise CardNumberMismatch("a stored part failed authentication") from None
        pan = values[3]
        if "".join(values[:3]) != pan or self._index.of(pan) != pan_index:
            raise CardNumberMismatch("the stored parts disagree")
        return pan
