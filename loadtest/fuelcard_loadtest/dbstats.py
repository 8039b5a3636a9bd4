"""What PostgreSQL wrote during the measured window: WAL bytes (from the
WAL insert position, exact), WAL records and WAL flushes (pg_stat_wal),
commits and rollbacks of the server's database (pg_stat_database).

The cumulative statistics are flushed by each backend at most once a second
(PostgreSQL 15+), so a reading lags by up to a second of work; the lag is
the same at both ends of a steady window and cancels in the difference,
leaving an error of a few per cent on a 15-second window. The WAL position
has no lag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

SNAPSHOT_SQL = """
SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn,
       w.wal_records, w.wal_fpi, w.wal_sync, w.wal_write,
       d.xact_commit, d.xact_rollback
  FROM pg_stat_wal w, pg_stat_database d
 WHERE d.datname = current_database()
"""

FIELDS = ("wal_bytes", "wal_records", "wal_fpi", "wal_flushes", "wal_writes", "commits",
          "rollbacks")


@dataclass(frozen=True)
class Snapshot:
    values: tuple[int, ...]

    def minus(self, earlier: Snapshot) -> dict[str, int]:
        return {k: a - b for k, a, b in zip(FIELDS, self.values, earlier.values, strict=True)}


class Reader:
    """One autocommit connection that reads snapshots (its own queries are
    two commits per window: negligible)."""

    def __init__(self, url: str) -> None:
        self.conn: psycopg.Connection[Any] = psycopg.connect(url, autocommit=True)

    def snapshot(self) -> Snapshot | None:
        try:
            row = self.conn.execute(SNAPSHOT_SQL).fetchone()
        except psycopg.Error:
            return None
        return None if row is None else Snapshot(tuple(int(v) for v in row))

    def close(self) -> None:
        self.conn.close()


def per_cycle(delta: dict[str, int], cycles: float) -> dict[str, float]:
    """The report's per-cycle figures of a window's delta."""
    n = max(cycles, 1e-9)
    return {"wal_bytes_per_cycle": delta["wal_bytes"] / n,
            "wal_records_per_cycle": delta["wal_records"] / n,
            # full-page images: the first change of a page after a checkpoint
            # writes the whole page, so a window with a checkpoint in it writes more
            "wal_fpi_per_cycle": delta["wal_fpi"] / n,
            "commits_per_cycle": delta["commits"] / n,
            "wal_flushes_per_cycle": delta["wal_flushes"] / n}
