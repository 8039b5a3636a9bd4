"""Terminal keys on the server side: working keys kept sealed in the
database, unsealed on demand, and the MAC check of terminal requests.

keys.py holds the key logic (windows, sealing, session keys); this module
feeds it from PostgreSQL. A process keeps the sealed keys it has read in a
bounded cache, so the authorize path reads the database for a terminal's key
once per day, not once per request.

A terminal is named by its station and its id together, (station_id,
terminal_id): the station is its certificate's O, the id its CN. Two stations
that both call a terminal "T1" have separate keys and counters. The key
derivations of the protocol (session and PIN keys) keep the terminal id alone:
the working keys themselves differ.
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
     WHERE station_id = %s AND terminal_id = %s AND version = %s"""
ADD_KEY_SQL = """
    INSERT INTO fc.terminal_keys (station_id, terminal_id, version, valid_from, valid_until, root_key_id,
                                  sealed)
    VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (station_id, terminal_id, version) DO NOTHING
    RETURNING 1"""
LAST_COUNTER_SQL = "SELECT last_counter FROM fc.terminals WHERE station_id = %s AND terminal_id = %s"


class _CacheStore:
    """What this process has read, by (station, terminal, version)."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[str, str, int], keys.WrappedWorkingKey] = OrderedDict()

    def get(self, station_id: str, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
        return self.entries.get((station_id, terminal_id, version))

    def put(self, station_id: str, key: keys.WrappedWorkingKey) -> None:
        entry = (station_id, key.terminal_id, key.version)
        self.entries[entry] = key
        self.entries.move_to_end(entry)
        while len(self.entries) > CACHE_ENTRIES:
            self.entries.popitem(last=False)


class _StationStore:
    """keys.WorkingKeyStore (sync, as keys.WorkingKeys wants) over one
    station's part of the cache; TerminalKeys fills it from the database first."""

    def __init__(self, cache: _CacheStore, station_id: str) -> None:
        self._cache = cache
        self._station = station_id

    def get(self, terminal_id: str, version: int) -> keys.WrappedWorkingKey | None:
        return self._cache.get(self._station, terminal_id, version)

    def add(self, key: keys.WrappedWorkingKey) -> keys.WrappedWorkingKey:
        self._cache.put(self._station, key)
        return key


class TerminalKeys:
    def __init__(self, db: Database, provider: keys.KeyProvider,
                 policy: keys.RotationPolicy | None = None) -> None:
        self._db = db
        self._store = _CacheStore()
        self._keys = keys.WorkingKeys(provider, _StationStore(self._store, ""), policy)
        self._unsealed: OrderedDict[tuple[str, str, int], keys.WorkingKey] = OrderedDict()

    async def _load(self, station_id: str, terminal_id: str, version: int) -> bool:
        if self._store.get(station_id, terminal_id, version) is not None:
            return True
        row = await self._db.fetch_one(KEY_SQL, (station_id, terminal_id, version))
        if row is None:
            return False
        self._store.put(station_id, keys.WrappedWorkingKey(terminal_id, version, row[0], row[1], row[2],
                                                           bytes(row[3])))
        return True

    async def current(self, station_id: str, terminal_id: str, now: dt.datetime) -> keys.WorkingKey:
        """Today's working key of a terminal, made on its first sign-on of
        the day: that is the daily rotation, with no scheduler."""
        version = self._keys.policy.version_at(now)
        if not await self._load(station_id, terminal_id, version):
            new = self._keys.wrap(terminal_id, version, secrets.token_bytes(keys.WORKING_KEY_SIZE))
            # Two processes may make one at once: the first stored wins.
            await self._db.fetch_one(ADD_KEY_SQL, (
                station_id, new.terminal_id, new.version, new.valid_from, new.valid_until,
                new.root_key_id, new.sealed))
            await self._load(station_id, terminal_id, version)
        return self._keys.on(_StationStore(self._store, station_id)).current(terminal_id, now)

    async def accepted(self, station_id: str, terminal_id: str, version: int, now: dt.datetime
                       ) -> keys.WorkingKey:
        # Unsealing costs ~35 us (more than the MAC itself): keep what was
        # unsealed, and apply the same rule (current or previous version,
        # inside its window) to it on every use.
        entry = (station_id, terminal_id, version)
        key = self._unsealed.get(entry)
        if (key is not None and key.accepted_at(now)
                and 0 <= self._keys.policy.version_at(now) - version <= 1):
            return key
        await self._load(station_id, terminal_id, version)
        try:
            key = self._keys.on(_StationStore(self._store, station_id)).accepted(terminal_id, version, now)
        except keys.KeyNotAccepted:
            raise unauthenticated("KEY_NOT_ACCEPTED",
                                  "the working key version is not accepted now; sign on") from None
        self._unsealed[entry] = key
        self._unsealed.move_to_end(entry)
        while len(self._unsealed) > CACHE_ENTRIES:
            self._unsealed.popitem(last=False)
        return key

    async def last_counter(self, station_id: str, terminal_id: str) -> int:
        row = await self._db.fetch_one(LAST_COUNTER_SQL, (station_id, terminal_id))
        return int(row[0]) if row else 0

    async def check_mac(self, station_id: str, terminal_id: str, version: int, counter: int, mac: bytes,
                        now: dt.datetime, *fields: bytes | str | int) -> None:
        """Raise UNAUTHENTICATED unless `mac` is the session-key MAC of
        `fields` (see security.proto for the layout)."""
        if not 1 <= counter <= keys.COUNTER_MAX:
            raise unauthenticated("COUNTER_INVALID", "the terminal counter must be 1..2^63-1")
        working = await self.accepted(station_id, terminal_id, version, now)
        session = keys.session_key(working, counter)
        if not keys.verify_mac(session, keys.canonical(*fields), mac):
            raise unauthenticated("MAC_INVALID", "the request's MAC does not verify")
