"""The three-tier key hierarchy (fuelcard_server.keys): root key providers,
working key rotation with overlap, wrapping, session keys and MACs, PIN blocks
and PIN hashes. Time is injected (`now`); storage is an in-memory dict."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import multiprocessing
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from fuelcard_server import gm, keys
from fuelcard_server.keys import CHINA_TIME, KeyNotAccepted, PinBlockError, WeakKeyError

ROOT_HEX = "5c0ffee5" + secrets.token_hex(28)
OTHER_ROOT_HEX = secrets.token_hex(32)
TERMINAL = "ST0042-POS01"
PAN = "9860123456789012345"
# 10:00 on 1 March 2026, Beijing time.
DAY1 = dt.datetime(2026, 3, 1, 10, 0, tzinfo=CHINA_TIME)
MIDNIGHT = dt.datetime(2026, 3, 2, 0, 0, tzinfo=CHINA_TIME)
H = dt.timedelta(hours=1)
US = dt.timedelta(microseconds=1)


class MemoryStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], keys.WrappedWorkingKey] = {}

    def get(self, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
        return self.rows.get((terminal_id, version))

    def add(self, key: keys.WrappedWorkingKey) -> keys.WrappedWorkingKey:
        return self.rows.setdefault((key.terminal_id, key.version), key)


def provider(hex_key: str = ROOT_HEX) -> keys.EnvKeyProvider:
    return keys.EnvKeyProvider({keys.ROOT_KEY_ENV: hex_key})


def working_keys(store: MemoryStore | None = None, root_hex: str = ROOT_HEX) -> keys.WorkingKeys:
    return keys.WorkingKeys(provider(root_hex), store if store is not None else MemoryStore())


# --- root key providers -----------------------------------------------------


def test_env_provider_reads_and_hides_the_root_key() -> None:
    p = provider()
    assert p.root_key() == bytes.fromhex(ROOT_HEX)
    assert ROOT_HEX not in repr(p)
    assert keys.EnvKeyProvider({keys.ROOT_KEY_ENV: f"  {ROOT_HEX.upper()}\n"}).root_key() == p.root_key()


@pytest.mark.parametrize(
    "value",
    [
        "",  # unset
        secrets.token_hex(15),  # 120 bits: too short
        secrets.token_hex(65),  # too long
        "not hex at all, not hex at all!!",
        "00" * 32,  # a placeholder
        "ab" * 16,
        bytes(range(32)).hex(),  # a counting sequence
        bytes(range(100, 68, -1)).hex(),
        "0123456789abcdeffedcba9876543210",  # the SM4 standard's test key
    ],
)
def test_env_provider_refuses_weak_keys(value: str) -> None:
    with pytest.raises(WeakKeyError):
        keys.EnvKeyProvider({keys.ROOT_KEY_ENV: value} if value else {})


def test_file_provider_wants_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    path.write_text(ROOT_HEX + "\n")
    for mode in (0o600, 0o400):
        path.chmod(mode)
        assert keys.FileKeyProvider(path).root_key() == bytes.fromhex(ROOT_HEX)
    for mode in (0o644, 0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(WeakKeyError, match="chmod 600"):
            keys.FileKeyProvider(path)
    with pytest.raises(WeakKeyError):
        keys.FileKeyProvider(tmp_path / "missing.key")
    with pytest.raises(WeakKeyError):
        keys.FileKeyProvider(tmp_path)
    weak = tmp_path / "weak.key"
    weak.write_text("00" * 32)
    weak.chmod(0o600)
    with pytest.raises(WeakKeyError):
        keys.FileKeyProvider(weak)
    path.chmod(0o600)
    assert ROOT_HEX not in repr(keys.FileKeyProvider(path))


def test_file_provider_reads_through_a_symlink(tmp_path: Path) -> None:
    """Secret mounts (Kubernetes, systemd credentials) are symlinks: the mode
    that counts is the target's."""
    target = tmp_path / "root.key"
    target.write_text(ROOT_HEX)
    target.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert keys.FileKeyProvider(link).root_key() == bytes.fromhex(ROOT_HEX)


# --- rotation and overlap ---------------------------------------------------


def test_policy_versions_are_days_in_beijing_time() -> None:
    policy = keys.RotationPolicy()
    v = policy.version_at(DAY1)
    assert v == (dt.date(2026, 3, 1) - dt.date(1970, 1, 1)).days
    assert policy.version_at(MIDNIGHT - US) == v
    assert policy.version_at(MIDNIGHT) == v + 1
    # 16:00 UTC is midnight in Beijing.
    assert policy.version_at(dt.datetime(2026, 3, 1, 16, 0, tzinfo=dt.UTC)) == v + 1
    assert policy.window(v + 1) == (MIDNIGHT, MIDNIGHT + dt.timedelta(days=1) + H)
    with pytest.raises(ValueError):
        policy.version_at(dt.datetime(2026, 3, 1, 10, 0))  # naive
    for overlap in (dt.timedelta(days=1), -H):
        with pytest.raises(ValueError):
            keys.RotationPolicy(overlap=overlap)


def test_current_key_is_made_once_per_day_and_rotates() -> None:
    store = MemoryStore()
    wk = working_keys(store)
    k1 = wk.current(TERMINAL, DAY1)
    assert k1.version == wk.policy.version_at(DAY1)
    assert len(k1.key) == 16
    assert wk.current(TERMINAL, DAY1 + 5 * H) == k1
    assert wk.current(TERMINAL, MIDNIGHT - US) == k1
    k2 = wk.current(TERMINAL, MIDNIGHT)
    assert k2.version == k1.version + 1
    assert k2.key != k1.key
    assert wk.current("ST0042-POS02", DAY1).key != k1.key  # per terminal
    assert len(store.rows) == 3


def test_previous_version_is_accepted_during_the_overlap_only() -> None:
    wk = working_keys()
    old = wk.current(TERMINAL, DAY1)
    new = wk.current(TERMINAL, MIDNIGHT)
    # A terminal mid-rotation still MACs with yesterday's key.
    assert wk.accepted(TERMINAL, old.version, MIDNIGHT + 30 * dt.timedelta(minutes=1)) == old
    assert wk.accepted(TERMINAL, old.version, MIDNIGHT + H - US) == old
    with pytest.raises(KeyNotAccepted):
        wk.accepted(TERMINAL, old.version, MIDNIGHT + H)
    assert wk.accepted(TERMINAL, new.version, MIDNIGHT + H) == new


def test_older_future_and_unknown_versions_are_refused() -> None:
    wk = working_keys()
    day0 = wk.current(TERMINAL, DAY1 - dt.timedelta(days=1))
    day1 = wk.current(TERMINAL, DAY1)
    day2 = wk.current(TERMINAL, DAY1 + dt.timedelta(days=1))
    now = DAY1 + dt.timedelta(days=1)
    with pytest.raises(KeyNotAccepted):
        wk.accepted(TERMINAL, day0.version, now)  # two days old
    with pytest.raises(KeyNotAccepted):
        wk.accepted(TERMINAL, day1.version, now)  # yesterday's, after the overlap
    with pytest.raises(KeyNotAccepted):
        wk.accepted(TERMINAL, day2.version, DAY1)  # tomorrow's
    with pytest.raises(KeyNotAccepted):
        wk.accepted("ST0099-POS01", day2.version, now)  # never issued
    with pytest.raises(KeyNotAccepted):
        wk.accepted(TERMINAL, -1, now)
    assert wk.accepted(TERMINAL, day2.version, now) == day2


def test_concurrent_rotation_agrees_on_one_key() -> None:
    """Two servers both find no key for today and both make one: the store
    keeps the first, and both use it."""

    class RacyStore(MemoryStore):
        def get(self, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
            return None  # every reader misses, as in a race

    store = RacyStore()
    a, b = working_keys(store), working_keys(store)
    assert a.current(TERMINAL, DAY1) == b.current(TERMINAL, DAY1)
    assert len(store.rows) == 1


# --- wrapping ---------------------------------------------------------------


def test_wrapped_keys_are_stored_encrypted() -> None:
    store = MemoryStore()
    k = working_keys(store).current(TERMINAL, DAY1)
    (wrapped,) = store.rows.values()
    assert k.key not in wrapped.sealed
    assert k.key.hex() not in repr(wrapped) + repr(k)
    assert wrapped.root_key_id == keys.root_key_id(bytes.fromhex(ROOT_HEX))


def test_wrapped_keys_do_not_open_under_another_root_key() -> None:
    store = MemoryStore()
    k = working_keys(store).current(TERMINAL, DAY1)
    other = working_keys(store, OTHER_ROOT_HEX)
    with pytest.raises(KeyNotAccepted, match="another root key"):
        other.accepted(TERMINAL, k.version, DAY1)
    # Even with the root key id rewritten to match, the seal does not open.
    ((slot, wrapped),) = store.rows.items()
    store.rows[slot] = dataclasses.replace(
        wrapped, root_key_id=keys.root_key_id(bytes.fromhex(OTHER_ROOT_HEX))
    )
    with pytest.raises(KeyNotAccepted, match="authentication"):
        other.accepted(TERMINAL, k.version, DAY1)


def _tampered(wrapped: keys.WrappedWorkingKey) -> list[keys.WrappedWorkingKey]:
    flipped = bytearray(wrapped.sealed)
    flipped[20] ^= 0x80
    return [
        dataclasses.replace(wrapped, sealed=bytes(flipped)),
        dataclasses.replace(wrapped, sealed=wrapped.sealed[:-1]),
        dataclasses.replace(wrapped, valid_until=wrapped.valid_until + dt.timedelta(days=30)),
        dataclasses.replace(wrapped, valid_from=wrapped.valid_from - H),
    ]


def test_wrapped_keys_detect_tampering() -> None:
    store = MemoryStore()
    wk = working_keys(store)
    k = wk.current(TERMINAL, DAY1)
    ((slot, wrapped),) = store.rows.items()
    for bad in _tampered(wrapped):
        store.rows[slot] = bad
        with pytest.raises(KeyNotAccepted):
            wk.accepted(TERMINAL, k.version, DAY1)
    # Another terminal's key copied onto this terminal's row does not open either.
    other = wk.wrap("ST0099-POS01", k.version, os.urandom(16))
    store.rows[slot] = dataclasses.replace(other, terminal_id=TERMINAL)
    with pytest.raises(KeyNotAccepted):
        wk.accepted(TERMINAL, k.version, DAY1)
    store.rows[slot] = wrapped
    assert wk.accepted(TERMINAL, k.version, DAY1) == k


def test_window_survives_a_time_zone_round_trip() -> None:
    """A database hands timestamps back in UTC: the same instants still authenticate."""
    store = MemoryStore()
    wk = working_keys(store)
    k = wk.current(TERMINAL, DAY1)
    ((slot, wrapped),) = store.rows.items()
    store.rows[slot] = dataclasses.replace(
        wrapped,
        valid_from=wrapped.valid_from.astimezone(dt.UTC),
        valid_until=wrapped.valid_until.astimezone(dt.UTC),
    )
    assert wk.accepted(TERMINAL, k.version, DAY1).key == k.key


# --- session keys and MACs --------------------------------------------------


def test_session_keys_differ_per_counter_terminal_and_version() -> None:
    wk = working_keys()
    k = wk.current(TERMINAL, DAY1)
    sessions = {keys.session_key(k, c) for c in range(1000)}
    assert len(sessions) == 1000
    assert all(len(s) == 16 for s in sessions)
    assert keys.session_key(k, 7) == keys.session_key(k, 7)
    other_terminal = dataclasses.replace(k, terminal_id="ST0042-POS02")
    assert keys.session_key(other_terminal, 7) != keys.session_key(k, 7)
    assert keys.session_key(wk.current(TERMINAL, MIDNIGHT), 7) != keys.session_key(k, 7)
    assert keys.pin_key(k) not in sessions
    for bad in (-1, 2**63):
        with pytest.raises(ValueError):
            keys.session_key(k, bad)


def test_mac_verifies_and_rejects_any_flipped_bit() -> None:
    k = working_keys().current(TERMINAL, DAY1)
    sk = keys.session_key(k, 41)
    data = keys.canonical("Authorize", TERMINAL, k.version, 41, "9860****2345", 30_000)
    tag = keys.mac(sk, data)
    assert len(tag) == 32 and tag == gm.hmac_sm3(sk, data)
    assert keys.verify_mac(sk, data, tag)
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not keys.verify_mac(sk, bytes(flipped), tag)
    for i in range(len(tag) * 8):
        flipped = bytearray(tag)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not keys.verify_mac(sk, data, bytes(flipped))
    assert not keys.verify_mac(sk, data, tag[:16])
    assert not keys.verify_mac(sk, data, b"")
    assert not keys.verify_mac(keys.session_key(k, 42), data, tag)  # another counter's key


def test_canonical_encoding_is_unambiguous() -> None:
    assert keys.canonical(b"ab", b"c") != keys.canonical(b"a", b"bc")
    assert keys.canonical("1") != keys.canonical(1) != keys.canonical(b"1")
    assert keys.canonical(-1) != keys.canonical(255)
    assert keys.canonical() == b""
    with pytest.raises(TypeError):
        keys.canonical(True)
    with pytest.raises(TypeError):
        keys.canonical(1.5)  # type: ignore[arg-type]


# --- PIN blocks -------------------------------------------------------------


def test_pin_block_layout() -> None:
    """PIN 1234 for card 9860123456789012345: PIN field 0 4 1 2 3 4 F..F,
    PAN field 0 x 20 then 345678901234 (12 rightmost digits, check digit
    excluded); the clear block is their XOR."""
    block = keys.encode_pin_block(b"1234", PAN)
    assert block.hex().upper() == "041234FFFFFFFFFFFFFF" + "CBA9876FEDCB"
    assert keys.decode_pin_block(block, PAN) == b"1234"


@pytest.mark.parametrize("pin", [b"0000", b"1234", b"98765", b"000123", b"1234567890", b"999999999999"])
def test_pin_block_round_trip(pin: bytes) -> None:
    k = working_keys().current(TERMINAL, DAY1)
    enc = keys.encrypt_pin_block(keys.pin_key(k), pin, PAN)
    assert len(enc) == 16 and pin not in enc
    assert keys.decrypt_pin_block(keys.pin_key(k), enc, PAN) == pin


def _nibbles(block: bytes) -> list[int]:
    return [n for b in block for n in (b >> 4, b & 0xF)]


def _from_nibbles(nib: list[int]) -> bytes:
    return bytes((nib[i] << 4) | nib[i + 1] for i in range(0, 32, 2))


def test_malformed_pin_blocks_are_rejected() -> None:
    good = _nibbles(keys.encode_pin_block(b"987654", PAN))
    bad_blocks = []
    for index, value in [
        (0, 1),  # format control nibble not 0
        (1, 3),  # PIN length 3
        (1, 13),  # PIN length 13
        (1, 5),  # length 5: the sixth digit is read as fill
        (1, 7),  # length 7: a fill nibble is read as a digit
        (3, 0xA),  # a PIN nibble that is not a digit
        (10, 0xE),  # a fill nibble that is not F
    ]:
        nib = list(good)
        nib[index] = value
        bad_blocks.append(_from_nibbles(nib))
    for block in bad_blocks:
        with pytest.raises(PinBlockError) as err:
            keys.decode_pin_block(block, PAN)
        assert "987654" not in str(err.value)
    with pytest.raises(PinBlockError):
        keys.decode_pin_block(_from_nibbles(good)[:15], PAN)
    # Another card's number: the fill no longer decodes.
    with pytest.raises(PinBlockError):
        keys.decode_pin_block(_from_nibbles(good), "9860123456789012355")
    assert keys.decode_pin_block(_from_nibbles(good), PAN) == b"987654"


def test_pin_block_under_a_wrong_key_or_card_is_rejected() -> None:
    wk = working_keys()
    k = wk.current(TERMINAL, DAY1)
    enc = keys.encrypt_pin_block(keys.pin_key(k), b"246810", PAN)
    other = keys.pin_key(wk.current(TERMINAL, MIDNIGHT))
    with pytest.raises(PinBlockError):
        keys.decrypt_pin_block(other, enc, PAN)
    with pytest.raises(PinBlockError):
        keys.decrypt_pin_block(keys.pin_key(k), enc, "6222021234567890123")
    with pytest.raises(PinBlockError):
        keys.decrypt_pin_block(keys.pin_key(k), enc[:8], PAN)


@pytest.mark.parametrize(
    ("pin", "pan"), [(b"123", PAN), (b"1234567890123", PAN), (b"12a4", PAN), (b"1234", "123456789012")]
)
def test_pin_block_encoding_refuses_bad_input(pin: bytes, pan: str) -> None:
    with pytest.raises(PinBlockError):
        keys.encode_pin_block(pin, pan)


# --- PIN hashes -------------------------------------------------------------

FAST = keys.PinHashCost(n=2**10, r=8, p=1)


def test_pin_hash_verifies_with_default_cost() -> None:
    pepper = keys.pin_pepper(provider())
    stored = keys.hash_pin(b"135790", pepper=pepper)
    assert stored.startswith("scrypt-sm3$16384$8$1$")
    assert "135790" not in stored
    assert keys.verify_pin(b"135790", stored, pepper=pepper)
    assert not keys.verify_pin(b"135791", stored, pepper=pepper)


def test_pin_hash_is_salted_and_peppered() -> None:
    pepper = keys.pin_pepper(provider())
    a, b = keys.hash_pin(b"1234", pepper=pepper, cost=FAST), keys.hash_pin(b"1234", pepper=pepper, cost=FAST)
    assert a != b
    assert keys.verify_pin(b"1234", a, pepper=pepper) and keys.verify_pin(b"1234", b, pepper=pepper)
    for wrong in (b"1235", b"12345", b"123", b"", b"4321"):
        assert not keys.verify_pin(wrong, a, pepper=pepper)
    other_pepper = keys.pin_pepper(provider(OTHER_ROOT_HEX))
    assert other_pepper != pepper
    assert not keys.verify_pin(b"1234", a, pepper=other_pepper)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "bcrypt$x",
        "scrypt-sm3$16384$8$1$salt",
        "scrypt-sm3$1000$8$1$AAAA$AAAA",
        "scrypt-sm3$16384$8$1$!!$AAAA",
    ],
)
def test_pin_hash_refuses_malformed_values(stored: str) -> None:
    with pytest.raises(ValueError):
        keys.verify_pin(b"1234", stored, pepper=b"p" * 32)


def _server_keys(data_dir: str, start: Any, hard_links: bool) -> tuple[str, str, str]:
    """In a fresh process: the keys a server worker would use from data_dir."""
    from fuelcard_server.settings import Settings

    if not hard_links:  # a filesystem without them (some SMB/FUSE mounts) answers EPERM
        def no_link(*args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        os.link = no_link
    start.wait(timeout=60)  # every process reaches here, then all race at once
    s = Settings(data_dir=Path(data_dir))
    provider = s.key_provider()
    assert isinstance(provider, keys.FileKeyProvider)
    root = provider.root_key()
    return (s.card_index_key().hex(), root.hex(), s.signing_key().to_hex())


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_workers_starting_together_on_a_fresh_data_dir_agree_on_one_set_of_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool) -> None:
    # `serve --workers N` on a fresh directory: a worker that read a key file
    # half written, lost an O_EXCL race or kept a key another replaced would
    # crash or look cards up under the wrong blind-index key.
    monkeypatch.delenv(keys.ROOT_KEY_ENV, raising=False)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(8)
        with ctx.Pool(8) as pool:
            found = pool.starmap(_server_keys,
                                 [(str(tmp_path / "data"), start, hard_links)] * 8)
    assert len(set(found)) == 1, "workers disagree on the keys"
    for name in ("card-index.key", "root.key", "server-sm2.key"):
        assert os.stat(tmp_path / "data" / name).st_mode & 0o077 == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "card-index.key", "root.key", "server-sm2.key"], "temporary files left behind"
