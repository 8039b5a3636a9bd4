"""Terminal keys on the server side: working keys kept sealed in the
database, unsealed on demand, and the MAC check of terminal requests.

keys.py holds the key logic (windows, sealing, session keys); this module
feeds it from PostgreSQL. A process keeps the sealed keys it has read in a
bounded cache, so the authorize path reads the database for a terminal's key
once per day, not once per request.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections import OrderedDict

from fuelcard_server import keys
from fuelcard_server.db import Database
from fuelcard_server.errors import unauthenticated

CACHE_ENTRIES = 20_000

KEY_SQL = """
    SELECT valid_from, valid_until, root_key_id, sealed FROM fc.terminal_keys
     WHERE terminal_id = %s AND version = %s"""
ADD_KEY_SQL = """
    INSERT INTO fc.terminal_keys (terminal_id, version, valid_from, valid_until, root_key_id, sealed)
    VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (terminal_id, version) DO NOTHING
    RETURNING 1"""
LAST_COUNTER_SQL = "SELECT last_counter FROM fc.terminals WHERE terminal_id = %s"


class _CacheStore:
    """keys.WorkingKeyStore over what this process has read (sync, as
    keys.WorkingKeys wants); TerminalKeys fills it from the database first."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[str, int], keys.WrappedWorkingKey] = OrderedDict()

    def get(self, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
        return self.entries.get((terminal_id, version))

    def add(self, key: keys.WrappedWorkingKey) -> keys.WrappedWorkingKey:
        self.put(key)
        return key

    def put(self, key: keys.WrappedWorkingKey) -> None:
        self.entries[(key.terminal_id, key.version)] = key
        self.entries.move_to_end((key.terminal_id, key.version))
        while len(self.entries) > CACHE_ENTRIES:
            self.entries.popitem(last=False)


class TerminalKeys:
    def __init__(self, db: Database, provider: keys.KeyProvider,
                 policy: keys.RotationPolicy | None = None) -> None:
        self._db = db
        self._store = _CacheStore()
        self._keys = keys.WorkingKeys(provider, self._store, policy)
        self._unsealed: OrderedDict[tuple[str, int], keys.WorkingKey] = OrderedDict()

    async def _load(self, terminal_id: str, version: int) -> bool:
        if self._store.get(terminal_id, version) is not None:
            return True
        row = await self._db.fetch_one(KEY_SQL, (terminal_id, version))
        if row is None:
            return False
        self._store.put(keys.WrappedWorkingKey(terminal_id, version, row[0], row[1], row[2],
                                               bytes(row[3])))
        return True

    async def current(self, terminal_id: str, now: dt.datetime) -> keys.WorkingKey:
        """Today's working key of a terminal, made on its first sign-on of
        the day: that is the daily rotation, with no scheduler."""
        version = self._keys.policy.version_at(now)
        if not await self._load(terminal_id, version):
            new = self._keys.wrap(terminal_id, version, secrets.token_bytes(keys.WORKING_KEY_SIZE))
            # Two processes may make one at once: the first stored wins.
            await self._db.fetch_one(ADD_KEY_SQL, (
                new.terminal_id, new.version, new.valid_from, new.valid_until, new.root_key_id,
                new.sealed))
            await self._load(terminal_id, version)
        return self._keys.current(terminal_id, now)

    async def accepted(self, terminal_id: str, version: int, now: dt.datetime) -> keys.WorkingKey:
        # Unsealing costs ~35 us (more than the MAC itself): keep what was
        # unsealed, and apply the same rule (current or previous version,
        # inside its window) to it on every use.
        key = self._unsealed.get((terminal_id, version))
        if (key is not None and key.accepted_at(now)
                and 0 <= self._keys.policy.version_at(now) - version <= 1):
            return key
        await self._load(terminal_id, version)
        try:
            key = self._keys.accepted(terminal_id, version, now)
        except keys.KeyNotAccepted:
            raise unauthenticated("KEY_NOT_ACCEPTED",
                                  "the working key version is not accepted now; sign on") from None
        self._unsealed[(terminal_id, version)] = key
        self._unsealed.move_to_end((terminal_id, version))
        while len(self._unsealed) > CACHE_ENTRIES:
            self._unsealed.popitem(last=False)
        return key

    async def last_counter(self, terminal_id: str) -> int:
        row = await self._db.fetch_one(LAST_COUNTER_SQL, (terminal_id,))
        return int(row[0]) if row else 0

    async def check_mac(self, terminal_id: str, version: int, counter: int, mac: bytes,
                        now: dt.datetime, *fields: bytes | str | int) -> None:
        """Raise UNAUTHENTICATED unless `mac` is the session-key MAC of
        `fields` (see security.proto for the layout)."""
        if not 1 <= counter <= keys.COUNTER_MAX:
            raise unauthenticated("COUNTER_INVALID", "the terminal counter must be 1..2^63-1")
        working = await self.accepted(terminal_id, version, now)
        session = keys.session_key(working, counter)
        if not keys.verify_mac(session, keys.canonical(*fields), mac):
            raise unauthenticated("MAC_INVALID", "the request's MAC does not verify")


