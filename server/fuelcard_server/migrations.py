"""The database's schema and stored logic, brought up to date by `fuelcard migrate`.

Two kinds of SQL file, as Flyway has versioned and repeatable migrations:

- `sql/migrations/NNNN_name.sql`: schema only (tables, indexes, constraints,
  backfills, and the DROP FUNCTION a changed signature needs). Applied once, in
  order, and recorded with a checksum; an applied one is never edited, and a
  changed file stops the run instead of silently diverging from the database.
- `sql/functions/<area>.sql`: every stored function and trigger, each defined
  in exactly one file. A file is re-applied whenever its checksum differs from
  the one recorded, after the migrations, in a fixed order (by file name).

Then `sql/privileges.sql`, after every run that applied anything and
whenever it changed (its checksum is kept with the files'): who owns
schema fc and what the serving role may do (issue 15). It cannot be a
numbered migration: re-creating a function resets its SECURITY DEFINER, and
a new table or function is owned by whoever made it.

One run is one transaction under an advisory lock: two concurrent runs
serialise, and the second finds nothing left to do. A database at the
released migration 0017 (before the squash into `0001_baseline`) is recognised
and recorded as at the baseline, without re-running anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.resources
import logging
from dataclasses import dataclass, field

import psycopg

from fuelcard_server.locks import MIGRATION_LOCK

log = logging.getLogger(__name__)

MIGRATIONS_DIR = "migrations"
FUNCTIONS_DIR = "functions"
PRIVILEGES_FILE = "privileges.sql"

# The released migrations that 0001_baseline squashes, in order. A database
# that recorded exactly these is at the baseline's schema.
LEGACY_MIGRATIONS: tuple[str, ...] = (
    "0001_ledger", "0002_controls", "0003_security", "0004_audit", "0005_plan_cache",
    "0006_step_up_card_segments", "0007_risk", "0008_channels", "0009_events",
    "0010_channel_exceptions", "0011_retention", "0012_refund_events_backfill",
    "0013_cycle_cost", "0014_resolve_replay", "0015_pin_change_counts",
    "0016_points_expiry_job_locks", "0017_step_up_resend",
)
BASELINE_VERSION = 1

_BOOKKEEPING = (
    """CREATE TABLE IF NOT EXISTS public.fuelcard_migrations (
           version    integer PRIMARY KEY,
           name       text NOT NULL,
           checksum   text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS public.fuelcard_function_files (
           file       text PRIMARY KEY,
           checksum   text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now())""",
)


def _checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return _checksum(self.sql)


@dataclass(frozen=True)
class FunctionFile:
    name: str  # e.g. "holds.sql"
    sql: str

    @property
    def checksum(self) -> str:
        return _checksum(self.sql)


def available() -> list[Migration]:
    """The numbered migrations in the package, in order."""
    found = []
    for entry in importlib.resources.files("fuelcard_server.sql").joinpath(MIGRATIONS_DIR).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(Migration(int(name[:4]), name[:-4], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    assert versions == list(range(1, len(found) + 1)), f"migration numbering has gaps: {versions}"
    return found


def function_files() -> list[FunctionFile]:
    """The repeatable function files, in the fixed order they are applied."""
    found = [FunctionFile(entry.name, entry.read_text(encoding="utf-8"))
             for entry in importlib.resources.files("fuelcard_server.sql").joinpath(FUNCTIONS_DIR).iterdir()
             if entry.name.endswith(".sql")]
    found.sort(key=lambda f: f.name)
    return found


@dataclass
class Plan:
    """What a database holds and what a run does (or did) to it."""

    applied: list[tuple[int, str, dt.datetime]] = field(default_factory=list)
    functions: list[tuple[str, dt.datetime]] = field(default_factory=list)
    legacy: bool = False  # recorded as the released 0017: becomes the baseline
    pending: list[Migration] = field(default_factory=list)
    changed: list[FunctionFile] = field(default_factory=list)
    # privileges.sql changed since it was last applied (it is also applied
    # whenever anything else is)
    privileges_changed: bool = False

    @property
    def up_to_date(self) -> bool:
        return not (self.legacy or self.pending or self.changed or self.privileges_changed)

    def describe(self) -> list[str]:
        lines = []
        if self.legacy:
            lines.append("legacy: released migrations 0001-0017 recorded; "
                         "becomes 0001_baseline with nothing re-run")
        lines += [f"applied: {name} ({at:%Y-%m-%d %H:%M:%S %Z})" for _, name, at in self.applied]
        lines += [f"pending: {m.name}" for m in self.pending]
        lines += [f"changed: functions/{f.name}" for f in self.changed]
        if self.privileges_changed:
            lines.append(f"changed: {PRIVILEGES_FILE}")
        current = {f.name for f in self.changed}
        lines += [f"current: functions/{name}" for name, _ in self.functions if name not in current]
        return lines


class MigrationError(RuntimeError):
    """The database cannot be brought up to date by this code."""


def _read(conn: psycopg.Connection[tuple[object, ...]]) -> Plan:
    plan = Plan()
    recorded = conn.execute(
        "SELECT version, name, checksum, applied_at FROM public.fuelcard_migrations ORDER BY version"
    ).fetchall()
    names = tuple(str(r[1]) for r in recorded)
    if names and names[0] == LEGACY_MIGRATIONS[0]:
        if names != LEGACY_MIGRATIONS:
            raise MigrationError(
                f"this database stopped at the released migration {names[-1]}: upgrade it with the "
                f"release that ends at {LEGACY_MIGRATIONS[-1]} first")
        plan.legacy = True
        recorded = []
    done = {int(str(r[0])): str(r[2]) for r in recorded}
    plan.applied = [(int(str(r[0])), str(r[1]), r[3]) for r in recorded]  # type: ignore[misc]
    for m in available():
        if m.version in done:
            if done[m.version] != m.checksum:
                raise MigrationError(f"migration {m.name} was changed after it was applied")
        elif plan.legacy and m.version == BASELINE_VERSION:
            continue
        else:
            plan.pending.append(m)
    files = {str(r[0]): (str(r[1]), r[2]) for r in
             conn.execute("SELECT file, checksum, applied_at FROM public.fuelcard_function_files")}
    # privileges.sql's checksum is kept with the function files' (under its
    # own name, which no function file has)
    privileges = files.pop(PRIVILEGES_FILE, None)
    plan.privileges_changed = privileges is None or privileges[0] != _checksum(privileges_sql())
    plan.functions = sorted((name, at) for name, (_, at) in files.items())  # type: ignore[misc]
    plan.changed = [f for f in function_files()
                    if f.name not in files or files[f.name][0] != f.checksum]
    return plan


def _apply(conn: psycopg.Connection[tuple[object, ...]], plan: Plan) -> None:
    if plan.legacy:
        baseline = available()[BASELINE_VERSION - 1]
        log.info("database at the released migration %s: recorded as %s",
                 LEGACY_MIGRATIONS[-1], baseline.name)
        conn.execute("DELETE FROM public.fuelcard_migrations")
        conn.execute("INSERT INTO public.fuelcard_migrations (version, name, checksum) "
                     "VALUES (%(version)s, %(name)s, %(checksum)s)",
                     {"version": baseline.version, "name": baseline.name,
                      "checksum": baseline.checksum})
    for m in plan.pending:
        log.info("applying migration %s", m.name)
        conn.execute(m.sql.encode())
        conn.execute("INSERT INTO public.fuelcard_migrations (version, name, checksum) "
                     "VALUES (%(version)s, %(name)s, %(checksum)s)",
                     {"version": m.version, "name": m.name, "checksum": m.checksum})
    # Bodies are checked when called, not when created (as pg_dump restores
    # them), so the files need no order among themselves beyond what a
    # trigger or an index names, which its own file creates first.
    conn.execute("SET LOCAL check_function_bodies = off")
    for f in plan.changed:
        log.info("applying functions/%s", f.name)
        conn.execute(f.sql.encode())
        conn.execute(
            "INSERT INTO public.fuelcard_function_files (file, checksum) "
            "VALUES (%(file)s, %(checksum)s) ON CONFLICT (file) DO UPDATE "
            "SET checksum = excluded.checksum, applied_at = now()",
            {"file": f.name, "checksum": f.checksum})
    log.info("applying %s", PRIVILEGES_FILE)
    conn.execute(privileges_sql().encode())
    conn.execute(
        "INSERT INTO public.fuelcard_function_files (file, checksum) "
        "VALUES (%(file)s, %(checksum)s) ON CONFLICT (file) DO UPDATE "
        "SET checksum = excluded.checksum, applied_at = now()",
        {"file": PRIVILEGES_FILE, "checksum": _checksum(privileges_sql())})


def privileges_sql() -> str:
    """Ownership and grants of schema fc: the owner role owns everything, the
    serving role may read and call the entry points (sql/privileges.sql)."""
    return importlib.resources.files("fuelcard_server.sql").joinpath(PRIVILEGES_FILE).read_text(
        encoding="utf-8")


def _run(url: str, *, apply: bool) -> Plan:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%(key)s)", {"key": MIGRATION_LOCK})
        for ddl in _BOOKKEEPING:
            conn.execute(ddl)
        plan = _read(conn)
        if apply and not plan.up_to_date:
            _apply(conn, plan)
    return plan


def status(url: str) -> Plan:
    """What is applied, pending and changed; changes nothing."""
    return _run(url, apply=False)


def migrate(url: str) -> list[str]:
    """Bring the database up to date in one transaction; return what was
    applied (migration names, then `functions/<file>`)."""
    plan = _run(url, apply=True)
    done = [m.name for m in plan.pending] + [f"functions/{f.name}" for f in plan.changed]
    if plan.privileges_changed and not done and not plan.legacy:
        done.append(PRIVILEGES_FILE)
    if plan.legacy:
        done.insert(0, f"{LEGACY_MIGRATIONS[-1]} recorded as {available()[BASELINE_VERSION - 1].name}")
    return done
