"""Assertions on the ledger and on rich gRPC errors, shared by the semantic
tests of issue 2.

Everything here reads the real database or the real status trailer: no mocks.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import psycopg
from fuelcard_server import verify
from fuelcard_server.clock import ManualClock
from fuelcard_server.settings import Settings
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.plugins.database import PostgresCluster
from tests.plugins.server import RunningServer, ServerThread, make_settings

Conn = psycopg.Connection[tuple[Any, ...]]
T = TypeVar("T")

DOMAIN = "fuelcard.v1"
START = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)


# --------------------------------------------------------------------------
# Rich errors
# --------------------------------------------------------------------------

@dataclass
class RichError:
    """An RPC error with its google.rpc details unpacked."""

    code: grpc.StatusCode
    message: str
    infos: list[Any]  # google.rpc.ErrorInfo
    bad_request: Any | None  # google.rpc.BadRequest
    raw: bytes  # the whole serialized google.rpc.Status

    @property
    def reason(self) -> str:
        assert len(self.infos) == 1, f"expected exactly one ErrorInfo, got {len(self.infos)}"
        reason: str = self.infos[0].reason
        return reason

    @property
    def fields(self) -> list[str]:
        if self.bad_request is None:
            return []
        return [v.field for v in self.bad_request.field_violations]


def unpack(err: grpc.RpcError) -> RichError:
    status = rpc_status.from_call(cast(grpc.Call, err))
    assert status is not None, f"{err.code()} carries no google.rpc.Status: {err.details()}"
    infos: list[Any] = []
    bad: Any | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            assert bad is None, "more than one BadRequest"
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    for info in infos:
        assert info.domain == DOMAIN, info
    return RichError(err.code(), status.message, infos, bad, status.SerializeToString())


def rpc_error(call: Callable[[], object]) -> RichError:
    """Run a call that must fail; return its unpacked status."""
    try:
        answer = call()
    except grpc.RpcError as err:
        return unpack(err)
    raise AssertionError(f"expected an RPC error, got an answer: {answer}")


def expect(call: Callable[[], object], code: grpc.StatusCode, reason: str | None = None,
           field: str | None = None) -> RichError:
    """The call fails with `code`, exactly one ErrorInfo, and (if given) that
    reason and a BadRequest violation naming `field`."""
    e = rpc_error(call)
    assert e.code == code, (e.code, e.message, e.fields)
    assert len(e.infos) == 1, e.infos
    if reason is not None:
        assert e.reason == reason, (e.reason, e.fields)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert e.bad_request is not None and e.fields, "INVALID_ARGUMENT without BadRequest"
    if field is not None:
        assert field in e.fields, (field, e.fields)
    return e


# --------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------

def fc_tables(db: Conn) -> list[str]:
    rows = db.execute(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'fc' AND table_type = 'BASE TABLE' ORDER BY table_name").fetchall()
    return [r[0] for r in rows]


def snapshot(db: Conn) -> dict[str, tuple[int, str | None]]:
    """Row count and an md5 over every row of every table of schema fc but
    the audit log: a refused internal call changes nothing, and is audited
    (test_audit.py checks the audit log itself). Nothing but the refusal
    itself, remembered under its request_id (issue 14, item 8:
    test_remembered_refusals.py checks those keys), so they are left out."""
    out: dict[str, tuple[int, str | None]] = {}
    for table in fc_tables(db):
        if table == "audit_log":
            continue
        row = db.execute(
            psycopg.sql.SQL(
                "SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM fc.{} t"
                " WHERE {}"
            ).format(psycopg.sql.Identifier(table),
                     psycopg.sql.SQL("NOT (t.response ? 'refusal')" if table == "idempotency_keys"
                                     else "true"))).fetchone()
        assert row is not None
        out[table] = (row[0], row[1])
    return out


def account_row(db: Conn, account_uid: str) -> dict[str, Any]:
    cur = db.execute(
        "SELECT id, balance_fen, held_fen, points_balance, status, max_balance_fen, receivable_fen"
        " FROM fc.accounts WHERE uid = %s", (account_uid,))
    row = cur.fetchone()
    assert row is not None, account_uid
    names = [c.name for c in cur.description or []]
    return dict(zip(names, row, strict=True))


def scalar(db: Conn, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = db.execute(query.encode(), params).fetchone()
    assert row is not None
    return row[0]


def count(db: Conn, table: str, where: str = "true", params: tuple[Any, ...] = ()) -> int:
    n: int = scalar(db, f"SELECT count(*) FROM fc.{table} WHERE {where}", params)
    return n


def assert_ledger_ok(url: str) -> None:
    violations = verify.run(url)
    assert violations == [], [(v.check, v.samples) for v in violations]


# --------------------------------------------------------------------------
# A server shared by many tests (module scope), for cases that change nothing
# --------------------------------------------------------------------------

@contextmanager
def shared_server(cluster: PostgresCluster, template: str, tmp: Path, name: str,
                  **overrides: Any) -> Iterator[RunningServer]:
    """A server on its own fresh database, outside the function-scoped
    `server` fixture: for module-scoped fixtures and Hypothesis machines."""
    url = cluster.create_database(name, template=template)
    settings: Settings = make_settings(tmp, **overrides)
    clock = ManualClock(START)
    thread = ServerThread(settings, url, clock)
    port = thread.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    try:
        yield RunningServer(target, url, clock, settings, thread.server, thread.loop, channel)
    finally:
        channel.close()
        thread.stop()
        cluster.drop_database(name)
