"""Versioned SQL migrations, applied in order and recorded in a table.

Files are `sql/NNNN_name.sql`. An applied migration is never edited: its
checksum is recorded, and a changed file stops the server instead of silently
diverging from what the database holds.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
from dataclasses import dataclass

import psycopg

from fuelcard_server.locks import MIGRATION_LOCK

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    found = []
    for entry in importlib.resources.files("fuelcard_server.sql").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(Migration(int(name[:4]), name[:-4], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    assert versions == list(range(1, len(found) + 1)), f"migration numbering has gaps: {versions}"
    return found


def migrate(url: str, *, up_to: int | None = None) -> list[str]:
    """Apply pending migrations (those numbered up to `up_to`, if given: an
    upgrade test stops part way); return the names applied."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS public.fuelcard_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {row[0]: row[1] for row in
                    conn.execute("SELECT version, checksum FROM public.fuelcard_migrations")}
            for m in available():
                if up_to is not None and m.version > up_to:
                    break
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise RuntimeError(
                            f"migration {m.name} was changed after it was applied")
                    continue
                log.info("applying migration %s", m.name)
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute(
                        "INSERT INTO public.fuelcard_migrations (version, name, checksum) "
                        "VALUES (%s, %s, %s)", (m.version, m.name, m.checksum))
                applied_now.append(m.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now
