"""Card numbers in sealed segments (card_numbers.py): the parts round-trip,
and a part moved, swapped or made under another root key is refused."""

from __future__ import annotations

import pytest
from fuelcard_server import keys
from fuelcard_server.card_numbers import CardNumberMismatch, CardVault, segments
from fuelcard_server.cards import PanIndex

ROOT = bytes.fromhex("3f9c2b7e4d1a6058c7e2f19b0a4d8e6371c5a09e2b84d6f3e1a7c9b5d2f08e64")
OTHER_ROOT = bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f9013579bdf2468ace0fdb97531eca86420")
INDEX = PanIndex(b"k" * 8 + b"0123456789abcdef")


class Root:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def root_key(self) -> bytes:
        return keys.check_root_key(self.key)


@pytest.mark.parametrize("pan", ["9860000000000000016", "6222020200112233"])
def test_segments_cover_the_number_and_none_holds_most_of_it(pan: str) -> None:
    parts = segments(pan)
    assert "".join(parts) == pan
    assert all(len(p) <= len(pan) // 2 for p in parts)


def test_the_parts_round_trip_and_are_bound_to_their_card_and_slot() -> None:
    vault = CardVault(Root(ROOT), INDEX)
    pan, other = "9860000000000000016", "9860000000000000024"
    sealed = vault.seal(pan)
    assert all(pan[6:12].encode() not in s for s in sealed)
    assert vault.open(INDEX.of(pan), vault.root_key_id, sealed) == pan
    with pytest.raises(CardNumberMismatch):  # another card's index
        vault.open(INDEX.of(other), vault.root_key_id, sealed)
    with pytest.raises(CardNumberMismatch):  # two segments swapped
        vault.open(INDEX.of(pan), vault.root_key_id, [sealed[1], sealed[0], *sealed[2:]])
    mixed = vault.seal(other)
    with pytest.raises(CardNumberMismatch):  # a part of another card
        vault.open(INDEX.of(pan), vault.root_key_id, [*sealed[:2], mixed[2], sealed[3]])
    stranger = CardVault(Root(OTHER_ROOT), INDEX)
    with pytest.raises(CardNumberMismatch):  # another root key
        stranger.open(INDEX.of(pan), vault.root_key_id, sealed)
