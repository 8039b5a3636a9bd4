"""States, modes and kinds are named once: the SQL constant functions of
sql/functions/states.sql and the enums of fuelcard_server.states both hold the
proto enums' values, and the SQL names cost nothing when a statement runs."""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import psycopg
from fuelcard.v1 import (
    account_pb2,
    common_pb2,
    control_pb2,
    events_pb2,
    funding_pb2,
    points_pb2,
    risk_pb2,
    security_pb2,
    settlement_pb2,
    step_up_pb2,
    transaction_pb2,
)
from fuelcard_server import migrations, sql_source, states

PROTO_MODULES: tuple[ModuleType, ...] = (
    account_pb2, common_pb2, control_pb2, events_pb2, funding_pb2, points_pb2, risk_pb2,
    security_pb2, settlement_pb2, step_up_pb2, transaction_pb2)

# The SQL constants the proto has no enum for, and the Python values they name.
SQL_ONLY: dict[str, int] = {
    "account_kind_system": states.ACCOUNT_KIND_SYSTEM,
    "review_state_pending": states.ReviewState.PENDING,
    "review_state_approved": states.ReviewState.APPROVED,
    "review_state_rejected": states.ReviewState.REJECTED,
    "principal_kind_holder": states.PrincipalKind.HOLDER,
    "principal_kind_fleet_manager": states.PrincipalKind.FLEET_MANAGER,
}


def proto_values() -> dict[str, int]:
    """Every value of every fuelcard.v1 enum by its name (unique in the
    package, as proto3 scopes enum values there)."""
    values: dict[str, int] = {}
    for module in PROTO_MODULES:
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            for value in enum.values:
                assert value.name not in values, value.name
                values[value.name] = value.number
    return values


def sql_constants() -> list[str]:
    """The constant functions states.sql defines, without the schema."""
    [states_file] = [f for f in migrations.function_files() if f.name == "states.sql"]
    return [d.name.removeprefix("fc.") for d in sql_source.functions(states_file.sql)]


def test_every_sql_constant_is_the_proto_value_of_its_name(
        db: psycopg.Connection[tuple[Any, ...]]) -> None:
    names = sql_constants()
    assert "hold_state_suspended" in names and "funding_mode_shared" in names
    proto = proto_values()
    in_database = {}
    for name in names:
        row = db.execute(f"SELECT fc.{name}()").fetchone()
        assert row is not None
        in_database[name] = row[0]
    expected = {name: SQL_ONLY[name] if name in SQL_ONLY else proto.get(name.upper())
                for name in names}
    assert in_database == expected
    assert sorted(n for n in names if n in SQL_ONLY) == sorted(SQL_ONLY)


def test_every_python_enum_is_its_proto_enum() -> None:
    proto = proto_values()
    for enum, proto_name in states.PROTO_ENUMS.items():
        short = proto_name.removeprefix("fuelcard.v1.")
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", short).upper() + "_"
        assert prefix.removesuffix("_") == re.sub(r"(?<!^)(?=[A-Z])", "_", enum.__name__).upper()
        members = {prefix + m.name: int(m) for m in enum}
        family = {k: v for k, v in proto.items()
                  if k.startswith(prefix) and (k != prefix + "UNSPECIFIED" or k in members)}
        assert members == family, enum.__name__


def test_the_python_enums_cover_every_sql_family() -> None:
    """A value named in SQL has its Python name too (or is SQL-only)."""
    python: set[str] = set()
    for enum in states.PROTO_ENUMS:
        python |= {f"{re.sub(r'(?<!^)(?=[A-Z])', '_', enum.__name__).lower()}_{m.name.lower()}"
                   for m in enum}
    for name in sql_constants():
        if name not in SQL_ONLY:
            assert name in python, name


def test_a_constant_is_folded_into_the_plan(db: psycopg.Connection[tuple[Any, ...]]) -> None:
    """Inlined when planned: the plan holds the number, and a partial index
    written with the number serves the named query."""
    db.execute("SET enable_seqscan = off")
    plan = "\n".join(str(r[0]) for r in db.execute(
        "EXPLAIN (VERBOSE, COSTS OFF) SELECT id FROM fc.holds"
        " WHERE state = fc.hold_state_suspended() AND id > 0"))
    assert "hold_state_suspended" not in plan
    assert "holds_suspended" in plan, plan
    plan = "\n".join(str(r[0]) for r in db.execute(
        "EXPLAIN (COSTS OFF) SELECT account_id FROM fc.holds"
        " WHERE state IN (fc.hold_state_authorized(), fc.hold_state_suspended())"
        " AND expires_at <= now() ORDER BY expires_at LIMIT 10"))
    assert "holds_expiring" in plan, plan
