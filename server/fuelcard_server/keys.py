"""The three-tier key hierarchy (三级密钥体制), PIN blocks and PIN hashes.

Pure logic: no database, no clock, no logging. Whatever decides by time
takes `now` (a timezone-aware datetime); storage is a protocol.

    root key (KeyProvider: env var or 0600 file in development, an HSM later)
      └─ working key per terminal and version (工作密钥): random 16 bytes, stored
         only sealed (SM4-GCM) under a key derived from the root key; a new
         version becomes current every period (a day), the previous one stays
         accepted for an overlap, older ones are refused (按日轮换)
           ├─ session key per transaction (会话密钥逐笔更新): SM3-KDF of the
           │  working key and the terminal's transaction counter; it MACs the
           │  request (HMAC-SM3)
           └─ PIN key: SM3-KDF of the working key; encrypts the PIN block (SM4)

Besides the working keys, the root key wraps the data key (key_custody.py),
which the PIN pepper, the card-number segment keys and the step-up key come
from; so pin_pepper() and card_numbers.CardVault are given the data key, and a
new root key (`fuelcard keys rotate-root`) re-wraps rather than re-keys.

PINs are stored only as a salted, peppered scrypt hash. Functions that see a
PIN return it as bytes and keep no copy: callers drop it as soon as the check
is done, and never log it.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fuelcard_server import gm

WORKING_KEY_SIZE = gm.SM4_KEY_SIZE
SESSION_KEY_SIZE = gm.SM4_KEY_SIZE
MAC_SIZE = gm.SM3_DIGEST_SIZE
PIN_BLOCK_SIZE = gm.SM4_BLOCK_SIZE
ROOT_KEY_MIN_BYTES = 16
ROOT_KEY_MAX_BYTES = 64
ROOT_KEY_ENV = "FUELCARD_ROOT_KEY_HEX"
# 中国标准时间: the network's day starts at midnight in Beijing.
CHINA_TIME = dt.timezone(dt.timedelta(hours=8), "CST")


class WeakKeyError(ValueError):
    """A root key that is missing, short, malformed, exposed or looks made up."""


class KeyNotAccepted(Exception):
    """A working key version that is unknown, not yet valid or no longer
    accepted. The server answers UNAUTHENTICATED and changes nothing."""


class PinBlockError(ValueError):
    """A PIN block that does not decode: wrong key, wrong card or malformed.
    The message never contains PIN digits."""


def canonical(*parts: bytes | str | int) -> bytes:
    """An unambiguous encoding of a tuple of fields, for MAC input, KDF info
    and associated data: each field as a type tag, a 4-byte length and its
    bytes (str as UTF-8, int as signed big-endian), so no two different tuples
    encode alike (b"ab", b"c" vs b"a", b"bc")."""
    out = bytearray()
    for part in parts:
        if isinstance(part, bytes):
            tag, raw = b"b", part
        elif isinstance(part, str):
            tag, raw = b"s", part.encode()
        elif isinstance(part, int) and not isinstance(part, bool):
            tag, raw = b"i", part.to_bytes(part.bit_length() // 8 + 1, "big", signed=True)
        else:
            raise TypeError(f"canonical: unsupported field type {type(part).__name__}")
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


# --- the root key -----------------------------------------------------------

# Well-known keys that must never be a root key (the SM4 standard's test key).
_KNOWN_KEYS = frozenset({bytes.fromhex("0123456789abcdeffedcba9876543210")})


def check_root_key(key: bytes) -> bytes:
    """`key` if it may serve as a root key, else WeakKeyError.

    A guard against placeholders, not an entropy test: 16 to 64 bytes, at
    least half of them distinct, not a counting sequence, not a published test
    key. Generate root keys with `secrets.token_hex(32)`."""
    if not ROOT_KEY_MIN_BYTES <= len(key) <= ROOT_KEY_MAX_BYTES:
        raise WeakKeyError(
            f"a root key is {ROOT_KEY_MIN_BYTES} to {ROOT_KEY_MAX_BYTES} bytes, not {len(key)}"
        )
    if len(set(key)) < len(key) // 2:
        raise WeakKeyError("the root key repeats bytes: a placeholder, not a random key")
    steps = {(key[i + 1] - key[i]) % 256 for i in range(len(key) - 1)}
    if len(steps) == 1 or key in _KNOWN_KEYS:
        raise WeakKeyError("the root key is a counting sequence or a published test key")
    return key


def _parse_hex_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise WeakKeyError(f"{source}: the root key must be hexadecimal") from None
    return check_root_key(key)


class KeyProvider(Protocol):
    """Where the root key comes from. Development: an environment variable or
    a file; production: an HSM behind the same interface."""

    def root_key(self) -> bytes: ...


class EnvKeyProvider:
    """The root key from FUELCARD_ROOT_KEY_HEX (hex), checked when made."""

    def __init__(self, environ: Mapping[str, str] | None = None, name: str = ROOT_KEY_ENV) -> None:
        env = os.environ if environ is None else environ
        text = env.get(name)
        if not text:
            raise WeakKeyError(f"{name} is not set")
        self._key = _parse_hex_key(text, name)

    def root_key(self) -> bytes:
        return self._key

    def __repr__(self) -> str:
        return "EnvKeyProvider(<root key hidden>)"


class FileKeyProvider:
    """The root key from a file holding it in hex, readable by its owner only
    (mode 0600 or 0400, owned by this user); checked when made."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise WeakKeyError(f"{self.path}: cannot open the root key file ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise WeakKeyError(f"{self.path}: the root key file is not a regular file")
            if st.st_mode & 0o077:
                raise WeakKeyError(
                    f"{self.path}: the root key file is readable by others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
                )
            if st.st_uid != os.geteuid():
                raise WeakKeyError(f"{self.path}: the root key file belongs to another user")
            text = os.read(fd, 4 * ROOT_KEY_MAX_BYTES).decode("ascii", errors="replace")
        finally:
            os.close(fd)
        self._key = _parse_hex_key(text, str(self.path))

    def root_key(self) -> bytes:
        return self._key

    def __repr__(self) -> str:
        return f"FileKeyProvider({str(self.path)!r})"


def root_key_id(root: bytes) -> str:
    """A short public fingerprint of a root key (16 hex digits), recorded with
    what it wraps so a changed root key is reported as such."""
    return gm.hmac_sm3(root, b"fuelcard/root-key-id")[:8].hex()


def _derive(key: bytes, label: str, *context: bytes | str | int, length: int = 16) -> bytes:
    return gm.sm3_kdf(key, canonical("fuelcard", label, *context), length)


def pin_pepper(provider: KeyProvider) -> bytes:
    """The secret mixed into every PIN hash (from the data key the server
    passes as `provider`): a stolen database alone does not allow a search
    of the small PIN space."""
    return _derive(provider.root_key(), "pin-pepper/v1", length=32)


# --- working keys -----------------------------------------------------------


def _aware(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("`now` must be timezone-aware")
    return now


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """Working key versions by time: version v is current from
    epoch + v·period to epoch + (v+1)·period, and accepted until `overlap`
    after that. Default: a new version every day at midnight Beijing time,
    the previous one accepted for the first hour of the new day."""

    period: dt.timedelta = dt.timedelta(days=1)
    overlap: dt.timedelta = dt.timedelta(hours=1)
    epoch: dt.datetime = dt.datetime(1970, 1, 1, tzinfo=CHINA_TIME)

    def __post_init__(self) -> None:
        if self.period <= dt.timedelta(0):
            raise ValueError("the rotation period must be positive")
        if not dt.timedelta(0) <= self.overlap < self.period:
            raise ValueError("the overlap must be at least 0 and shorter than the period")
        _aware(self.epoch)

    def version_at(self, now: dt.datetime) -> int:
        return (_aware(now) - self.epoch) // self.period

    def window(self, version: int) -> tuple[dt.datetime, dt.datetime]:
        """(valid_from, valid_until) of a version: current from valid_from,
        accepted until valid_until (exclusive), which is one period plus the
        overlap later."""
        start = self.epoch + version * self.period
        return start, start + self.period + self.overlap


_UNIX_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _micros(t: dt.datetime) -> int:
    """Exact microseconds since 1970 (no float), the same in any time zone."""
    return (_aware(t) - _UNIX_EPOCH) // dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class WrappedWorkingKey:
    """What is stored: the working key sealed under the root key's wrapping
    key. Every other field is bound to the seal as associated data, so editing
    the window, the version or the terminal makes the key unusable."""

    terminal_id: str
    version: int
    valid_from: dt.datetime
    valid_until: dt.datetime
    root_key_id: str
    sealed: bytes = field(repr=False)

    def aad(self) -> bytes:
        return canonical(
            "fuelcard/working-key/v1",
            self.terminal_id,
            self.version,
            _micros(self.valid_from),
            _micros(self.valid_until),
            self.root_key_id,
        )


@dataclass(frozen=True, slots=True)
class WorkingKey:
    """An unwrapped working key. Lives in memory only."""

    terminal_id: str
    version: int
    valid_from: dt.datetime
    valid_until: dt.datetime
    key: bytes = field(repr=False)

    def accepted_at(self, now: dt.datetime) -> bool:
        return self.valid_from <= _aware(now) < self.valid_until


class WorkingKeyStore(Protocol):
    """Storage of wrapped working keys, one per (terminal_id, version)."""

    def get(self, terminal_id: str, version: int) -> WrappedWorkingKey | None: ...

    def add(self, key: WrappedWorkingKey) -> WrappedWorkingKey:
        """Store `key` unless one with the same (terminal_id, version) exists
        (INSERT ... ON CONFLICT DO NOTHING), and return the stored one: two
        servers rotating at once agree on a single key."""
        ...


class WorkingKeys:
    """Working keys of all terminals: made on first use in each period,
    stored wrapped, checked against their window on every use."""

    def __init__(
        self, provider: KeyProvider, store: WorkingKeyStore, policy: RotationPolicy | None = None
    ) -> None:
        root = provider.root_key()
        self._wrap_key = _derive(root, "wrap/v1")
        self._root_id = root_key_id(root)
        self._store = store
        self.policy = policy or RotationPolicy()

    def on(self, store: WorkingKeyStore) -> WorkingKeys:
        """These working keys over another store (the same root and policy):
        a server keeps one store per station, since a terminal is named by
        its station and its id together (two stations may both have a "T1")."""
        scoped = copy.copy(self)
        scoped._store = store
        return scoped

    def _unwrap(self, wrapped: WrappedWorkingKey) -> WorkingKey:
        if wrapped.root_key_id != self._root_id:
            raise KeyNotAccepted(
                f"working key {wrapped.terminal_id}/{wrapped.version} was wrapped under "
                f"another root key ({wrapped.root_key_id})"
            )
        try:
            key = gm.unseal(self._wrap_key, wrapped.sealed, wrapped.aad())
        except gm.AuthenticationError:
            raise KeyNotAccepted(
                f"working key {wrapped.terminal_id}/{wrapped.version} failed authentication"
            ) from None
        if len(key) != WORKING_KEY_SIZE:
            raise KeyNotAccepted(f"working key {wrapped.terminal_id}/{wrapped.version} is malformed")
        return WorkingKey(wrapped.terminal_id, wrapped.version, wrapped.valid_from, wrapped.valid_until, key)

    def wrap(self, terminal_id: str, version: int, key: bytes) -> WrappedWorkingKey:
        """A new wrapped working key (not stored) with the policy's window."""
        if len(key) != WORKING_KEY_SIZE:
            raise ValueError("a working key is 16 bytes")
        valid_from, valid_until = self.policy.window(version)
        unsealed = WrappedWorkingKey(terminal_id, version, valid_from, valid_until, self._root_id, b"")
        sealed = gm.seal(self._wrap_key, key, unsealed.aad())
        return WrappedWorkingKey(terminal_id, version, valid_from, valid_until, self._root_id, sealed)

    def rewrap(self, wrapped: WrappedWorkingKey, new_root: KeyProvider) -> WrappedWorkingKey:
        """`wrapped` sealed anew under `new_root`'s wrapping key, with the same
        terminal, version and window (root-key rotation: the working key, and
        so every MAC and PIN block made with it, stays the same)."""
        working = self._unwrap(wrapped)
        root = new_root.root_key()
        unsealed = WrappedWorkingKey(wrapped.terminal_id, wrapped.version, wrapped.valid_from,
                                     wrapped.valid_until, root_key_id(root), b"")
        sealed = gm.seal(_derive(root, "wrap/v1"), working.key, unsealed.aad())
        return WrappedWorkingKey(unsealed.terminal_id, unsealed.version, unsealed.valid_from,
                                 unsealed.valid_until, unsealed.root_key_id, sealed)

    def current(self, terminal_id: str, now: dt.datetime) -> WorkingKey:
        """The working key current at `now`, made and stored if this period has
        none yet (that is the daily rotation: no scheduler needed)."""
        version = self.policy.version_at(now)
        wrapped = self._store.get(terminal_id, version)
        if wrapped is None:
            new = self.wrap(terminal_id, version, secrets.token_bytes(WORKING_KEY_SIZE))
            wrapped = self._store.add(new)
        key = self._unwrap(wrapped)
        if not key.accepted_at(now):
            raise KeyNotAccepted(f"working key {terminal_id}/{version} is outside its window")
        return key

    def accepted(self, terminal_id: str, version: int, now: dt.datetime) -> WorkingKey:
        """The working key a terminal names in a request, if accepted at `now`:
        the current version, or the previous one during the overlap. Anything
        else (older, future, unknown, tampered with) raises KeyNotAccepted."""
        current = self.policy.version_at(now)
        if version not in (current, current - 1):
            raise KeyNotAccepted(f"working key {terminal_id}/{version} is not accepted now")
        wrapped = self._store.get(terminal_id, version)
        if wrapped is None:
            raise KeyNotAccepted(f"working key {terminal_id}/{version} does not exist")
        key = self._unwrap(wrapped)
        if not key.accepted_at(now):
            raise KeyNotAccepted(f"working key {terminal_id}/{version} is not accepted now")
        return key


# --- session keys and MACs --------------------------------------------------

COUNTER_MAX = 2**63 - 1


def session_key(working: WorkingKey, counter: int) -> bytes:
    """The per-transaction key: SM3-KDF(working key, terminal, version,
    counter). The counter is the terminal's transaction counter; that it only
    increases (no replay) is the server's check, against its stored value."""
    if not 0 <= counter <= COUNTER_MAX:
        raise ValueError("the transaction counter is a non-negative 63-bit integer")
    return _derive(working.key, "session/v1", working.terminal_id, working.version, counter)


def mac(key: bytes, data: bytes) -> bytes:
    """HMAC-SM3 of canonical request bytes (see canonical()): 32 bytes."""
    return gm.hmac_sm3(key, data)


def verify_mac(key: bytes, data: bytes, tag: bytes) -> bool:
    """Whether `tag` is mac(key, data); constant-time."""
    return hmac.compare_digest(gm.hmac_sm3(key, data), tag)


# --- PIN blocks -------------------------------------------------------------
#
# ISO 9564-1 format 0, widened to SM4's 16-byte block. 32 nibbles each:
#
#   PIN field  C N P P P P (P P P P P P P P) F F ... F     C = 0 (format 0),
#              0 1 2 .. 2+N-1               .. 31         N = PIN length 4..12,
#                                                         P = PIN digits, F = fill 0xF
#   PAN field  0 0 ... 0 (20 nibbles) A A A A A A A A A A A A
#                                    20 ........................ 31
#              A = the 12 rightmost digits of the card number, check digit excluded
#
#   clear block = PIN field XOR PAN field;  PIN block = SM4-ECB(PIN key, clear block)
#
# The PAN lands on fill nibbles only (the PIN ends by nibble 13), so a block
# decoded with another card number fails the fill check instead of yielding a
# wrong PIN. The PIN key is SM3-KDF(working key, "pin/v1", terminal, version).

PIN_MIN_DIGITS = 4
PIN_MAX_DIGITS = 12


def pin_key(working: WorkingKey) -> bytes:
    return _derive(working.key, "pin/v1", working.terminal_id, working.version)


def _pan_nibbles(pan: str) -> list[int]:
    if not (pan.isascii() and pan.isdigit() and len(pan) >= 13):
        raise PinBlockError("the card number must be at least 13 digits")
    return [0] * 20 + [ord(c) - 48 for c in pan[-13:-1]]


def _nibbles_to_bytes(nibbles: list[int]) -> bytes:
    return bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, len(nibbles), 2))


def encode_pin_block(pin: bytes, pan: str) -> bytes:
    """The clear 16-byte PIN block of `pin` (ASCII digits) for card `pan`."""
    if not (PIN_MIN_DIGITS <= len(pin) <= PIN_MAX_DIGITS and pin.isdigit()):
        raise PinBlockError(f"a PIN is {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits")
    pin_field = [0, len(pin), *(c - 48 for c in pin)]
    pin_field += [0xF] * (32 - len(pin_field))
    return _nibbles_to_bytes([a ^ b for a, b in zip(pin_field, _pan_nibbles(pan), strict=True)])


def decode_pin_block(block: bytes, pan: str) -> bytes:
    """The PIN (ASCII digits) in a clear PIN block for card `pan`;
    PinBlockError if anything in the block is off."""
    if len(block) != PIN_BLOCK_SIZE:
        raise PinBlockError("a PIN block is 16 bytes")
    nib = [n for b in block for n in (b >> 4, b & 0xF)]
    nib = [a ^ b for a, b in zip(nib, _pan_nibbles(pan), strict=True)]
    length = nib[1]
    if nib[0] != 0 or not PIN_MIN_DIGITS <= length <= PIN_MAX_DIGITS:
        raise PinBlockError("not a format-0 PIN block")
    digits = nib[2 : 2 + length]
    if any(d > 9 for d in digits) or any(f != 0xF for f in nib[2 + length :]):
        raise PinBlockError("malformed PIN block (wrong key or wrong card number?)")
    return bytes(48 + d for d in digits)


def encrypt_pin_block(key: bytes, pin: bytes, pan: str) -> bytes:
    """What a terminal sends: the PIN block under the PIN key (SM4, one block)."""
    return gm.sm4_ecb_encrypt(key, encode_pin_block(pin, pan), pad=False)


def decrypt_pin_block(key: bytes, enc: bytes, pan: str) -> bytes:
    """The PIN (ASCII digits) in an encrypted PIN block. Use it for the check
    and drop it; never log it."""
    if len(enc) != PIN_BLOCK_SIZE:
        raise PinBlockError("an encrypted PIN block is 16 bytes")
    return decode_pin_block(gm.sm4_ecb_decrypt(key, enc, pad=False), pan)


# --- PIN hashes -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PinHashCost:
    """scrypt's cost. Default n=2^14, r=8, p=1: 16 MiB and ~35 ms of one core
    per hash on the project's machine, the usual interactive setting. Run it
    off the event loop (hashlib releases the GIL)."""

    n: int = 2**14
    r: int = 8
    p: int = 1

    def __post_init__(self) -> None:
        if not (
            2 <= self.n <= 2**20 and self.n & (self.n - 1) == 0 and 1 <= self.r <= 32 and 1 <= self.p <= 16
        ):
            raise ValueError("scrypt cost out of range")


_PIN_HASH_SCHEME = "scrypt-sm3"


def _scrypt(pin: bytes, pepper: bytes, salt: bytes, cost: PinHashCost) -> bytes:
    # The pepper keys an HMAC over the PIN first: without it, the hash alone
    # does not allow a search of the PIN space.
    return hashlib.scrypt(
        gm.hmac_sm3(pepper, pin),
        salt=salt,
        n=cost.n,
        r=cost.r,
        p=cost.p,
        maxmem=256 * cost.n * cost.r * cost.p + 2**20,
        dklen=32,
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_pin(pin: bytes, *, pepper: bytes, cost: PinHashCost | None = None) -> str:
    """A self-describing hash of `pin` to store:
    'scrypt-sm3$n$r$p$salt$hash' (salt 16 random bytes, unpadded base64)."""
    cost = cost or PinHashCost()
    salt = secrets.token_bytes(16)
    digest = _scrypt(pin, pepper, salt, cost)
    return f"{_PIN_HASH_SCHEME}${cost.n}${cost.r}${cost.p}${_b64(salt)}${_b64(digest)}"


def verify_pin(pin: bytes, stored: str, *, pepper: bytes) -> bool:
    """Whether `pin` matches a hash_pin() value; constant-time comparison.
    ValueError if `stored` is not such a value."""
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != _PIN_HASH_SCHEME:
            raise ValueError(scheme)
        cost = PinHashCost(int(n), int(r), int(p))
        salt, digest = _unb64(salt_b64), _unb64(digest_b64)
    except (ValueError, binascii.Error):
        raise ValueError("not a PIN hash") from None
    return hmac.compare_digest(_scrypt(pin, pepper, salt, cost), digest)
