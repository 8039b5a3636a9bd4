"""Key custody: the server's key set, tied to its database, carried from host
to host sealed under a passphrase, and rotated.

The key set is what a host needs besides the database to serve its cards:

    root key        data_dir/root.key (0600) or FUELCARD_ROOT_KEY_HEX; an HSM in
                    production. It only wraps: the terminal working keys
                    (fc.terminal_keys) and the data key (fc.wrapped_keys).
    card-index key  data_dir/card-index.key: the blind index of card numbers
                    (fc.cards.pan_index) and the request fingerprints.
    signing key     data_dir/server-sm2.key: the SM2 key that signs answers to
                    payment adapters and audit anchors.

The data key lives in the database, sealed under the root key. The PIN
pepper, the card-number segment keys and the step-up code key are derived
from it, not from the root key, so the root key can change without touching a
PIN hash (the PINs are not known, they could not be re-hashed) or a sealed
card number. For a database that already held cards or working keys when
custody began, the data key is the root key of that day: everything peppered
or sealed before stays valid. A new database gets a random one.

The database keeps a check value of each key of the set (an HMAC-SM3 of a
fixed label under the key; never the key). The first server to start records
them; a server whose keys differ refuses to start and names the key that
differs, where it used to make itself new keys and answer CARD_NOT_FOUND for
every card. N servers share one set: `fuelcard keys export` on one host,
`fuelcard keys import` on each of the others.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg

from fuelcard_server import gm, keys
from fuelcard_server.card_numbers import CardNumberMismatch, CardVault
from fuelcard_server.cards import PanIndex
from fuelcard_server.db import one_shot
from fuelcard_server.gm import Sm2PrivateKey
from fuelcard_server.settings import Settings, SettingsError

KEY_NAMES = ("root", "card-index", "signing")
DATA_KEY = "data"
PASSPHRASE_ENV = "FUELCARD_KEYS_PASSPHRASE"
PASSPHRASE_MIN_CHARS = 12
EXPORT_FORMAT = "fuelcard-key-set/v1"
# scrypt at 2^17 x 8: 128 MiB and about half a second per try on the
# project's machine, so a stolen export resists a search of passphrases far
# longer than a PIN hash (2^14) does. An import accepts 2^15..2^20.
EXPORT_SCRYPT_N = 2**17
EXPORT_SCRYPT_R = 8
EXPORT_SCRYPT_P = 1
PENDING_FILE = "key-set.pending"

Conn = psycopg.Connection[tuple[Any, ...]]


class KeyCustodyError(SettingsError):
    """A key set that does not fit the database, an export that does not
    open, a key file that cannot be written. Messages name keys and files,
    never show a key."""


def check_value(name: str, key: bytes) -> str:
    """The public check value of one key of the set: 16 hex digits of an
    HMAC-SM3 of a fixed label under the key. Tells a wrong key from the right
    one and nothing more."""
    return gm.hmac_sm3(key, keys.canonical("fuelcard/check-value/v1", name))[:8].hex()


@dataclass(frozen=True)
class KeySet:
    root: bytes = field(repr=False)
    card_index: bytes = field(repr=False)
    signing: Sm2PrivateKey = field(repr=False)

    def check_values(self) -> dict[str, str]:
        return {"root": check_value("root", self.root),
                "card-index": check_value("card-index", self.card_index),
                "signing": check_value("signing", self.signing.secret)}

    def to_json(self) -> str:
        return json.dumps({"root": self.root.hex(), "card-index": self.card_index.hex(),
                           "signing": self.signing.to_hex()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KeySet:
        try:
            d = json.loads(text)
            root = keys.check_root_key(bytes.fromhex(d["root"]))
            card_index = bytes.fromhex(d["card-index"])
            signing = Sm2PrivateKey.from_hex(d["signing"])
        except (ValueError, KeyError, TypeError) as exc:
            # the messages of check_root_key and from_hex describe, never quote
            raise KeyCustodyError(f"not a key set: {exc}") from None
        if len(card_index) < 16:
            raise KeyCustodyError("not a key set: the card-index key is shorter than 16 bytes")
        return cls(root, card_index, signing)

    def __repr__(self) -> str:
        return f"KeySet(check values {self.check_values()})"


class LoadedKey:
    """A keys.KeyProvider over a key already in memory (from a KeySetStore,
    or the unwrapped data key)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def root_key(self) -> bytes:
        return self._key

    def __repr__(self) -> str:
        return "LoadedKey(<hidden>)"


# --- where a host keeps its key set ---------------------------------------


class KeySetStore(Protocol):
    """Where a host keeps its key set: the KMS/HSM interface. FileKeySetStore
    (0600 files in the data directory) is the development implementation; a
    KMS- or HSM-backed store gives the same keys to the server (an HSM whose
    keys never leave it raises on export and import instead)."""

    def load(self, *, create: bool = True) -> KeySet:
        """The host's key set; made on first use if `create`, else
        KeyCustodyError when a key is missing."""
        ...

    def install(self, key_set: KeySet, *, replace: bool = False) -> None:
        """Make `key_set` this host's; KeyCustodyError if the host holds a
        different key and not `replace`."""
        ...

    def stage(self, key_set: KeySet) -> None:
        """Keep the set a rotation moves to, before the database moves."""
        ...

    def staged(self) -> KeySet | None: ...

    def promote(self) -> None:
        """Install the staged set (the database has moved to it) and forget it."""
        ...


def _write_secret(path: Path, text: str) -> None:
    """Replace `path` with `text`, mode 0600, all at once (a reader sees the
    old file or the new one) and durably (a crash after this returns keeps
    the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileKeySetStore:
    """The key set as the server has always kept it: root.key (or
    FUELCARD_ROOT_KEY_HEX), card-index.key (or the card_index_key_hex
    setting) and server-sm2.key, 0600 files in the data directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root_path = settings.root_key_file or settings.data_dir / "root.key"
        self.card_index_path = settings.data_dir / "card-index.key"
        self.signing_path = settings.signing_key_path
        self.pending_path = settings.data_dir / PENDING_FILE

    @property
    def _root_from_env(self) -> bool:
        return bool(os.environ.get(keys.ROOT_KEY_ENV))

    def files(self) -> list[Path]:
        """The files of the set on this host (what to back up)."""
        return [p for p, elsewhere in ((self.root_path, self._root_from_env),
                                       (self.card_index_path, self.settings.card_index_key_hex),
                                       (self.signing_path, False)) if not elsewhere]

    def load(self, *, create: bool = True) -> KeySet:
        s = self.settings
        if not create:
            for path in self.files():
                if not path.exists():
                    raise KeyCustodyError(f"no key at {path}: this host has no key set yet")
        return KeySet(s.key_provider().root_key(), s.card_index_key(), s.signing_key())

    def install(self, key_set: KeySet, *, replace: bool = False) -> None:
        s = self.settings
        if self._root_from_env and s.key_provider().root_key() != key_set.root:
            raise KeyCustodyError(f"the root key comes from {keys.ROOT_KEY_ENV} and is not this "
                                  "set's: unset it to keep the root key in a file")
        if s.card_index_key_hex is not None and s.card_index_key() != key_set.card_index:
            raise KeyCustodyError("the card-index key comes from the card_index_key_hex setting "
                                  "and is not this set's: remove the setting")
        wanted = {self.root_path: key_set.root.hex(), self.card_index_path: key_set.card_index.hex(),
                  self.signing_path: key_set.signing.to_hex()}
        writes = {p: text for p, text in wanted.items() if p in self.files()}
        if not replace:
            for path, text in writes.items():
                if path.exists() and path.read_text().strip() != text:
                    raise KeyCustodyError(f"{path} holds another key: pass --replace to overwrite "
                                          "it (after backing it up)")
        for path, text in writes.items():
            _write_secret(path, text)

    def stage(self, key_set: KeySet) -> None:
        # A key that comes from the environment or a setting cannot be
        # replaced by a file: refused here, before the database moves.
        s = self.settings
        if self._root_from_env and s.key_provider().root_key() != key_set.root:
            raise KeyCustodyError(f"the root key comes from {keys.ROOT_KEY_ENV}: unset it and keep "
                                  "the root key in a file to rotate it")
        if s.card_index_key_hex is not None and s.card_index_key() != key_set.card_index:
            raise KeyCustodyError("the card-index key comes from the card_index_key_hex setting: "
                                  "remove the setting and keep the key in a file to rotate it")
        _write_secret(self.pending_path, key_set.to_json())

    def staged(self) -> KeySet | None:
        if not self.pending_path.exists():
            return None
        return KeySet.from_json(self.pending_path.read_text())

    def promote(self) -> None:
        staged = self.staged()
        if staged is not None:
            self.install(staged, replace=True)
            self.pending_path.unlink()


# --- a passphrase-sealed export -------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase.encode(), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * n * r * p + 2**20, dklen=gm.SM4_KEY_SIZE)


def _header_aad(header: dict[str, Any]) -> bytes:
    return keys.canonical("fuelcard/key-set-export/v1", json.dumps(header, sort_keys=True))


def export_sealed(key_set: KeySet, passphrase: str) -> str:
    """The key set as JSON text, sealed (SM4-GCM) under a key scrypt derives
    from `passphrase`. The header (format, KDF and its parameters, the check
    values) is bound to the seal: a file edited anywhere does not open."""
    if len(passphrase) < PASSPHRASE_MIN_CHARS:
        raise KeyCustodyError(f"a passphrase is at least {PASSPHRASE_MIN_CHARS} characters")
    salt = secrets.token_bytes(16)
    header: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "kdf": {"name": "scrypt", "n": EXPORT_SCRYPT_N, "r": EXPORT_SCRYPT_R, "p": EXPORT_SCRYPT_P,
                "salt": _b64(salt)},
        "check_values": key_set.check_values(),
    }
    kek = _scrypt(passphrase, salt, EXPORT_SCRYPT_N, EXPORT_SCRYPT_R, EXPORT_SCRYPT_P)
    sealed = gm.seal(kek, key_set.to_json().encode(), _header_aad(header))
    return json.dumps({**header, "sealed": _b64(sealed)}, indent=1) + "\n"


def import_sealed(text: str, passphrase: str) -> KeySet:
    """The key set in an export_sealed() text; KeyCustodyError if the file
    is not one, was altered, or the passphrase is wrong."""
    try:
        d = json.loads(text)
        sealed = base64.b64decode(d.pop("sealed"), validate=True)
        kdf = d["kdf"]
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        salt = base64.b64decode(kdf["salt"], validate=True)
        if d["format"] != EXPORT_FORMAT or kdf["name"] != "scrypt":
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise KeyCustodyError(f"not a {EXPORT_FORMAT} export") from None
    if not (2**15 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16
            and len(salt) >= 16):
        raise KeyCustodyError("the export's KDF parameters are out of range")
    try:
        plain = gm.unseal(_scrypt(passphrase, salt, n, r, p), sealed, _header_aad(d))
    except gm.AuthenticationError:
        raise KeyCustodyError("the export does not open: wrong passphrase, or the file was "
                              "altered") from None
    key_set = KeySet.from_json(plain.decode())
    if key_set.check_values() != d.get("check_values"):
        raise KeyCustodyError("the export's check values do not match its keys")
    return key_set


# --- the key set and the database -----------------------------------------

RECORD_SQL = """INSERT INTO fc.key_check_values (key_name, check_value) VALUES (%s, %s)
                ON CONFLICT (key_name) DO NOTHING"""
RECORDED_SQL = "SELECT key_name, check_value FROM fc.key_check_values"
ROTATION_SQL = "SELECT new_check_value, after_card_id FROM fc.card_index_rotation"
WRAPPED_SQL = "SELECT root_key_id, sealed FROM fc.wrapped_keys WHERE key_name = %s"
ADD_WRAPPED_SQL = """INSERT INTO fc.wrapped_keys (key_name, root_key_id, sealed) VALUES (%s, %s, %s)
                     ON CONFLICT (key_name) DO NOTHING"""
HOLDS_SEALED_DATA_SQL = """SELECT EXISTS (SELECT 1 FROM fc.cards)
                               OR EXISTS (SELECT 1 FROM fc.terminal_keys)"""


def _recorded(conn: Conn) -> dict[str, str]:
    return {str(name): str(value) for name, value in conn.execute(RECORDED_SQL).fetchall()}


def _describe(names: list[str]) -> str:
    words = [f"the {n} key" for n in names]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def check_key_set(conn: Conn, key_set: KeySet) -> None:
    """Record the set's check values if the database has none yet, then
    KeyCustodyError unless they are the recorded ones and no card-index
    rotation is half done."""
    mine = key_set.check_values()
    for name in KEY_NAMES:
        conn.execute(RECORD_SQL, (name, mine[name]))
    recorded = _recorded(conn)
    differ = [n for n in KEY_NAMES if recorded.get(n) != mine[n]]
    if differ:
        detail = "; ".join(f"{n}: {mine[n]} here, {recorded.get(n)} in the database" for n in differ)
        raise KeyCustodyError(
            f"this host's key set is not the one the database was made with: {_describe(differ)} "
            f"differ{'s' if len(differ) == 1 else ''} (check values {detail}). With these keys no "
            "card, PIN or terminal key would be found. Import the database's key set (`fuelcard "
            "keys export` on a host that serves it, then `fuelcard keys import --replace` here); "
            "README, Key custody")
    rotation = conn.execute(ROTATION_SQL).fetchone()
    if rotation is not None:
        raise KeyCustodyError(
            f"a card-index key rotation is under way (cards up to id {rotation[1]} re-indexed): "
            "finish it with `fuelcard keys rotate-card-index` before serving")


def _wrapping_key(root: bytes) -> bytes:
    return gm.sm3_kdf(root, keys.canonical("fuelcard", "wrapped-key/v1"), gm.SM4_KEY_SIZE)


def _wrapped_aad(name: str, root_key_id: str) -> bytes:
    return keys.canonical("fuelcard/wrapped-key/v1", name, root_key_id)


def _wrap(root: bytes, name: str, key: bytes) -> tuple[str, bytes]:
    rid = keys.root_key_id(root)
    return rid, gm.seal(_wrapping_key(root), key, _wrapped_aad(name, rid))


def data_key(conn: Conn, root: bytes) -> bytes:
    """The data key, unwrapped; made (and stored wrapped) on first use."""
    row = conn.execute(WRAPPED_SQL, (DATA_KEY,)).fetchone()
    if row is None:
        legacy = conn.execute(HOLDS_SEALED_DATA_SQL).fetchone()
        # PIN hashes and sealed card numbers made before custody are keyed
        # from the root key itself: that root key becomes the data key.
        key = root if legacy is not None and legacy[0] else secrets.token_bytes(32)
        conn.execute(ADD_WRAPPED_SQL, (DATA_KEY, *_wrap(root, DATA_KEY, key)))
        row = conn.execute(WRAPPED_SQL, (DATA_KEY,)).fetchone()
        assert row is not None
    rid, sealed = str(row[0]), bytes(row[1])
    try:
        return gm.unseal(_wrapping_key(root), sealed, _wrapped_aad(DATA_KEY, rid))
    except gm.AuthenticationError:
        raise KeyCustodyError("the data key in the database does not open under this root "
                              "key") from None


@dataclass(frozen=True)
class ServingKeys:
    """What a server process serves with, once the key set is checked."""

    root: keys.KeyProvider
    data: keys.KeyProvider
    card_index: bytes = field(repr=False)
    signing: Sm2PrivateKey = field(repr=False)


def open_key_set(database_url: str, key_set: KeySet) -> ServingKeys:
    """Check `key_set` against the database (recording it on a first start)
    and unwrap the data key; KeyCustodyError if the set does not fit."""
    with one_shot(database_url, autocommit=True) as conn, conn.transaction():
        check_key_set(conn, key_set)
        data = data_key(conn, key_set.root)
    return ServingKeys(LoadedKey(key_set.root), LoadedKey(data), key_set.card_index,
                       key_set.signing)


# --- rotations ---------------------------------------------------------------

TERMINAL_KEYS_SQL = """
    SELECT station_id, terminal_id, version, valid_from, valid_until, root_key_id, sealed
      FROM fc.terminal_keys ORDER BY station_id, terminal_id, version FOR UPDATE"""
UPDATE_TERMINAL_KEY_SQL = """
    UPDATE fc.terminal_keys SET root_key_id = %s, sealed = %s
     WHERE station_id = %s AND terminal_id = %s AND version = %s"""
UPDATE_WRAPPED_SQL = "UPDATE fc.wrapped_keys SET root_key_id = %s, sealed = %s WHERE key_name = %s"
LOCK_CHECK_VALUE_SQL = "SELECT check_value FROM fc.key_check_values WHERE key_name = %s FOR UPDATE"
SET_CHECK_VALUE_SQL = """UPDATE fc.key_check_values SET check_value = %s, recorded_at = now()
                          WHERE key_name = %s"""


def _new_root() -> bytes:
    while True:  # a random key fails the placeholder guard about never; loop all the same
        try:
            return keys.check_root_key(secrets.token_bytes(32))
        except keys.WeakKeyError:
            continue


def _lock_check_value(conn: Conn, name: str, current: KeySet) -> None:
    """Lock the recorded check value of `name` until the transaction ends;
    KeyCustodyError unless it is still `current`'s (another rotation ran
    since the check)."""
    row = conn.execute(LOCK_CHECK_VALUE_SQL, (name,)).fetchone()
    if row is None or row[0] != current.check_values()[name]:
        raise KeyCustodyError(f"the {name} key changed in the database meanwhile (another "
                              "rotation?): nothing changed here")


def _finish_interrupted(conn: Conn, store: KeySetStore, name: str) -> bool:
    """Whether a rotation of `name` had moved the database but not the files
    (a crash in between): then the staged set is installed now."""
    staged = store.staged()
    if staged is None:
        return False
    moved_to = staged.check_values()[name]
    # A staged set whose key `name` is this host's is another rotation's
    # (a card-index rotation under way keeps the root key): not ours to install.
    if moved_to == store.load(create=False).check_values()[name] \
            or _recorded(conn).get(name) != moved_to:
        return False
    store.promote()
    return True


def rotate_root(database_url: str, store: KeySetStore, say: Callable[[str], None]) -> None:
    """A new root key: every terminal working key and the data key are
    re-wrapped under it in one transaction, with the new check value, then
    the new key replaces the old on this host. Every card, PIN and terminal
    key keeps working; the old root key opens nothing in the database
    afterwards. (Expired working keys too: one transaction, at most a few
    million short rows for a large network's year, is simpler than a second
    resumable job for keys no terminal may use again.)"""
    with one_shot(database_url, autocommit=True) as conn:
        if _finish_interrupted(conn, store, "root"):
            say("an interrupted rotation had moved the database: installed its new root key")
            return
        current = store.load(create=False)
        with conn.transaction():
            check_key_set(conn, current)
        new = dataclasses.replace(current, root=_new_root())
        # On this host before the database moves: a crash after the commit
        # finds the new key here (the next run installs it), never lost.
        store.stage(new)
        old_keys = keys.WorkingKeys(LoadedKey(current.root), _NoStore())
        new_root = LoadedKey(new.root)
        old_id = keys.root_key_id(current.root)
        with conn.transaction():
            _lock_check_value(conn, "root", current)
            moved = skipped = 0
            for station, tid, version, valid_from, valid_until, rid, sealed in \
                    conn.execute(TERMINAL_KEYS_SQL).fetchall():
                if rid != old_id:
                    skipped += 1  # wrapped under some older root: unusable already
                    continue
                wrapped = keys.WrappedWorkingKey(tid, version, valid_from, valid_until, rid, bytes(sealed))
                try:
                    fresh = old_keys.rewrap(wrapped, new_root)
                except keys.KeyNotAccepted as exc:
                    raise KeyCustodyError(f"cannot re-wrap: {exc}") from None
                conn.execute(UPDATE_TERMINAL_KEY_SQL,
                             (fresh.root_key_id, fresh.sealed, station, tid, version))
                moved += 1
            data = data_key(conn, current.root)
            conn.execute(UPDATE_WRAPPED_SQL, (*_wrap(new.root, DATA_KEY, data), DATA_KEY))
            conn.execute(SET_CHECK_VALUE_SQL, (new.check_values()["root"], "root"))
        store.promote()
    say(f"root key rotated: {moved} working keys and the data key re-wrapped"
        + (f" ({skipped} wrapped under an older root key left alone)" if skipped else "")
        + f"; new check value {new.check_values()['root']}")


class _NoStore:
    """keys.WorkingKeys wants a store; rotation only unwraps and re-wraps."""

    def get(self, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
        return None

    def add(self, key: keys.WrappedWorkingKey) -> keys.WrappedWorkingKey:
        return key


UNINDEXABLE_SQL = """
    SELECT count(*) FROM fc.cards c
     WHERE (fc_pan_vault.get(p_card_id => c.id)).sealed IS NULL
        OR (fc_pan_seg1.get(p_card_id => c.id)).sealed IS NULL
        OR (fc_pan_seg2.get(p_card_id => c.id)).sealed IS NULL
        OR (fc_pan_seg3.get(p_card_id => c.id)).sealed IS NULL"""
START_ROTATION_SQL = "INSERT INTO fc.card_index_rotation (new_check_value) VALUES (%s)"
LOCK_ROTATION_SQL = "SELECT new_check_value, after_card_id FROM fc.card_index_rotation FOR UPDATE"
CARD_BATCH_SQL = """
    SELECT c.id, c.pan_index, (fc_pan_vault.get(p_card_id => c.id)).root_key_id,
           ARRAY[(fc_pan_seg1.get(p_card_id => c.id)).sealed,
                 (fc_pan_seg2.get(p_card_id => c.id)).sealed,
                 (fc_pan_seg3.get(p_card_id => c.id)).sealed,
                 (fc_pan_vault.get(p_card_id => c.id)).sealed]
      FROM fc.cards c WHERE c.id > %(after)s ORDER BY c.id LIMIT %(batch)s"""
REINDEX_SQL = ("SELECT fc.reindex_card(p_card_id => %(card_id)s, p_pan_index => %(pan_index)s,"
               " p_root_key_id => %(root_key_id)s, p_sealed => %(sealed)s::bytea[])")
ADVANCE_SQL = "UPDATE fc.card_index_rotation SET after_card_id = %s"
CARDS_AFTER_SQL = "SELECT count(*) FROM fc.cards WHERE id > %s"
END_ROTATION_SQL = "DELETE FROM fc.card_index_rotation"


def rotate_card_index(database_url: str, store: KeySetStore, *, batch: int = 1000,
                      progress: Callable[[int, int], None] = lambda done, total: None,
                      say: Callable[[str], None] = lambda line: None) -> int:
    """Every card's blind index under a new card-index key, `batch` cards per
    transaction; progress(done, total) after each. Resumable: the last card
    moved is recorded with each batch and the new key is kept on this host
    before the first, so a run that stops (crash, Ctrl-C) is finished by the
    next. Servers must be stopped meanwhile (they refuse to start while a
    rotation is under way): a card moved is not found under the old key.
    Returns the number of cards re-indexed by this run."""
    if batch < 1:
        raise KeyCustodyError("the batch is at least 1 card")
    with one_shot(database_url, autocommit=True) as conn:
        rotation = conn.execute(ROTATION_SQL).fetchone()
        if rotation is None and _finish_interrupted(conn, store, "card-index"):
            say("an interrupted rotation had moved every card: installed its new card-index key")
            return 0
        current = store.load(create=False)
        staged = store.staged()
        if rotation is None:
            with conn.transaction():
                check_key_set(conn, current)
                unindexable = conn.execute(UNINDEXABLE_SQL).fetchone()
                if unindexable is not None and unindexable[0]:
                    raise KeyCustodyError(
                        f"{unindexable[0]} cards have no stored number (seeded without one, e.g. by "
                        "the load generator): they cannot be re-indexed; nothing changed")
                new = dataclasses.replace(current, card_index=secrets.token_bytes(32))
                store.stage(new)
                conn.execute(START_ROTATION_SQL, (new.check_values()["card-index"],))
            staged = new
        else:
            if staged is None or staged.check_values()["card-index"] != rotation[0]:
                raise KeyCustodyError(
                    "a card-index rotation is under way, started with a key this host does not hold "
                    "(its pending key set is missing or another): run it on the host that started it")
            recorded = _recorded(conn)
            if recorded.get("card-index") != current.check_values()["card-index"]:
                raise KeyCustodyError("this host's card-index key is not the database's")
            say(f"resuming the rotation after card id {rotation[1]}")
        data = LoadedKey(data_key(conn, current.root))
        old_vault = CardVault(data, PanIndex(current.card_index))
        new_index = PanIndex(staged.card_index)
        new_vault = CardVault(data, new_index)
        start_row = conn.execute(ROTATION_SQL).fetchone()
        assert start_row is not None
        left = conn.execute(CARDS_AFTER_SQL, (start_row[1],)).fetchone()
        total = int(left[0]) if left else 0
        done = 0
        while True:
            with conn.transaction():
                row = conn.execute(LOCK_ROTATION_SQL).fetchone()
                assert row is not None
                cards = conn.execute(CARD_BATCH_SQL, {"after": row[1], "batch": batch}).fetchall()
                for card_id, pan_index, rid, sealed in cards:
                    if rid is None or None in sealed:
                        raise KeyCustodyError(f"card id {card_id} has no stored number: cannot "
                                              "re-index it (the rotation stays resumable)")
                    try:
                        pan = old_vault.open(bytes(pan_index), rid, [bytes(v) for v in sealed])
                    except CardNumberMismatch as exc:
                        raise KeyCustodyError(f"card id {card_id}: {exc}") from None
                    conn.execute(REINDEX_SQL, {
                        "card_id": card_id, "pan_index": new_index.of(pan),
                        "root_key_id": new_vault.root_key_id, "sealed": new_vault.seal(pan)})
                    del pan
                if cards:
                    conn.execute(ADVANCE_SQL, (cards[-1][0],))
            if not cards:
                break
            done += len(cards)
            progress(done, total)
        with conn.transaction():
            _lock_check_value(conn, "card-index", current)
            conn.execute(SET_CHECK_VALUE_SQL, (staged.check_values()["card-index"], "card-index"))
            conn.execute(END_ROTATION_SQL)
        store.promote()
    say(f"card-index key rotated: {done} cards re-indexed by this run; new check value "
        f"{staged.check_values()['card-index']}")
    return done

