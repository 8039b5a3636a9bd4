"""The database roles of least privilege (issue 15; sql/privileges.sql).

- OWNER (NOLOGIN) owns schema fc: its tables, functions and triggers.
  `fuelcard migrate` acts as it (a superuser, or an admin that is a member).
- SERVING (LOGIN) is what `fuelcard serve` connects as: it reads, calls the
  entry points (SECURITY DEFINER, owned by OWNER) and writes a few tables of
  its own, so it cannot alter a table, disable a trigger, or update or
  delete the journal, the audit log or a balance.

With the embedded PostgreSQL the server migrates as the superuser and serves
as SERVING by itself (`as_role`); with an external database the operator
gives a URL for each (README, "Least privilege").
"""

from __future__ import annotations

import psycopg

OWNER = "fuelcard_owner"
SERVING = "fuelcard_app"


def as_role(url: str, role: str = SERVING) -> str:
    """The same database URL, logging in as `role` (no password: for the
    embedded PostgreSQL and test clusters, which trust local connections)."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["user"] = role
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo(**info)  # type: ignore[arg-type]
