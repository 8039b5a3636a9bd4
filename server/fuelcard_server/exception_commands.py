"""`fuelcard exceptions list|get|resolve`: finance follows up the settlement
exceptions (fuel delivered or money collected that the ledger could not book
as asked) from a shell, straight on the database, as ReconciliationService's
ListSettlementExceptions, GetSettlementException and
ResolveSettlementException do over gRPC (the same SQL and stored function).

A resolution is idempotent on its request id (--request-id; a fresh one per
run by default) and goes into the hash-chained audit trail in the same
transaction, with the operating-system user as the actor, as `fuelcard risk
load` does."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import hashlib
import sys
import uuid
from collections.abc import Callable
from typing import Any

import psycopg

from fuelcard_server.audit import APPEND_SQL
from fuelcard_server.db import one_shot, translate
from fuelcard_server.locks import AUDIT_LOCK
from fuelcard_server.services.reconciliation import (
    GET_SETTLEMENT_SQL,
    LIST_SETTLEMENT_SQL,
    RESOLUTION_MAX_CHARS,
    RESOLVE_SETTLEMENT_SQL,
)
from fuelcard_server.settings import Settings
from fuelcard_server.validation import Violations

# Names on the command line -> SettlementExceptionState / Kind numbers.
STATES = {"all": 0, "open": 1, "resolved": 2, "settled": 3}
KINDS = {"all": 0, "late-confirm": 1, "overrun": 2, "channel-payment": 3}
KIND_NAMES = {1: "LATE_CONFIRM_NO_FUNDS", 2: "OVERRUN_SHORTFALL", 3: "CHANNEL_PAYMENT_REFUSED"}
METHOD = "cli/fuelcard exceptions resolve"

SettingsOf = Callable[[argparse.Namespace], Settings]
DatabaseOf = Callable[[Settings], tuple[str, Any]]


def _time(micros: int | None) -> str:
    if micros is None:
        return ""
    return dt.datetime.fromtimestamp(micros / 1e6, dt.UTC).isoformat(timespec="seconds")


def line(d: dict[str, Any]) -> str:
    """One exception on one line, for `list`."""
    about = f"hold {d['hold_id']}" if d["hold_id"] else f"payment {d['channel_txn_id']}"
    return (f"{d['exception_id']}  {d['state']:<8} {KIND_NAMES.get(d['kind'], d['kind'])}"
            f"  {d['amount_fen']} fen  account {d['account_id']}  {about}"
            f"  {_time(d['create_us'])}")


def details(d: dict[str, Any]) -> list[str]:
    """Every field of one exception, one per line, for `get` and `resolve`."""
    rows = [("exception_id", d["exception_id"]), ("state", d["state"]),
            ("kind", KIND_NAMES.get(d["kind"], str(d["kind"]))), ("reason", d["reason"]),
            ("amount_fen", d["amount_fen"]), ("account_id", d["account_id"]),
            ("hold_id", d["hold_id"]), ("recharge_id", d["recharge_id"]),
            ("channel", d["channel"]), ("channel_txn_id", d["channel_txn_id"]),
            ("created", _time(d["create_us"])), ("closed", _time(d["resolve_us"])),
            ("resolved_by", d["resolved_by"]), ("resolution", d["resolution"])]
    return [f"{name:<15} {'' if value is None else value}" for name, value in rows]


def _limit(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 1000):
        raise argparse.ArgumentTypeError("expected 1-1000")
    return int(text)


def _refused(exc: psycopg.Error) -> int:
    error = translate(exc)
    print(f"fuelcard: {error.code.name} {error.reason}: {error.message}", file=sys.stderr)
    return 1


def cmd_list(url: str, args: argparse.Namespace) -> int:
    before = 2**63 - 1
    if args.page_token:
        if not (args.page_token.isascii() and args.page_token.isdigit()):
            print("fuelcard: --page-token must be a token a previous list printed", file=sys.stderr)
            return 2
        before = int(args.page_token)
    with one_shot(url) as conn:
        rows = conn.execute(LIST_SETTLEMENT_SQL, {
            "state": STATES[args.state], "kind": KINDS[args.kind], "before": before,
            "limit": args.limit + 1}).fetchall()
    for _, d in rows[:args.limit]:
        print(line(d))
    if len(rows) > args.limit:
        print(f"more: --page-token {rows[args.limit - 1][0]}")
    if not rows:
        print("no settlement exceptions")
    return 0


def cmd_get(url: str, args: argparse.Namespace) -> int:
    v = Violations()
    uid = v.uuid("exception_id", args.exception_id)
    if uid is None:
        print("fuelcard: the exception id must be a UUID", file=sys.stderr)
        return 2
    with one_shot(url) as conn:
        row = conn.execute(GET_SETTLEMENT_SQL, {"uid": uid}).fetchone()
    if row is None or row[0] is None:
        print("fuelcard: NOT_FOUND SETTLEMENT_EXCEPTION_NOT_FOUND", file=sys.stderr)
        return 1
    print("\n".join(details(row[0])))
    return 0


def cmd_resolve(url: str, args: argparse.Namespace) -> int:
    v = Violations()
    uid = v.uuid("exception_id", args.exception_id)
    v.text("note", args.note, required=True, max_chars=RESOLUTION_MAX_CHARS, multiline=True)
    if args.request_id is not None:
        v.request_id(args.request_id)
    if v.items:
        for bad in v.items:
            print(f"fuelcard: {bad.field} {bad.description}", file=sys.stderr)
        return 2
    actor = f"cli:{getpass.getuser()}"
    request_id = args.request_id or f"cli-resolve-{uuid.uuid4().hex}"
    params = {
        "caller": "cli", "request_id": request_id,
        "request_hash": hashlib.sha256(f"{uid}\0{args.note}".encode()).digest(),
        "exception_uid": uid, "resolution": args.note, "resolved_by": actor,
        "now": dt.datetime.now(dt.UTC)}
    try:
        with one_shot(url, autocommit=True) as conn, conn.transaction():
            row = conn.execute(RESOLVE_SETTLEMENT_SQL, params).fetchone()
            # the resolution in the hash-chained audit trail, in the same transaction
            conn.execute(APPEND_SQL, {"lock": AUDIT_LOCK, "actor": actor, "method": METHOD,
                                      "target": uid, "outcome": "OK"})
    except psycopg.Error as exc:
        if not (exc.sqlstate or "").startswith("FC"):
            raise
        return _refused(exc)
    assert row is not None
    print("\n".join(details(row[0]["settlement_exception"])))
    return 0


def add_parser(sub: Any, database_flags: Callable[[argparse.ArgumentParser], None],
               settings_of: SettingsOf, database_of: DatabaseOf) -> None:
    """The `exceptions` command group, on cli.py's subparsers."""
    p = sub.add_parser("exceptions", help="settlement exceptions: list, show, resolve")
    group = p.add_subparsers(dest="exceptions_command", required=True)

    def command(run: Callable[[str, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def go(args: argparse.Namespace) -> int:
            url, pg = database_of(settings_of(args))
            try:
                return run(url, args)
            finally:
                if pg is not None:
                    pg.stop_if_started_here()
        return go

    q = group.add_parser("list", help="exceptions newest first (default: the open ones)")
    database_flags(q)
    q.add_argument("--state", choices=sorted(STATES), default="open")
    q.add_argument("--kind", choices=sorted(KINDS), default="all")
    q.add_argument("--limit", type=_limit, default=50, help="at most this many, 1-1000 (default 50)")
    q.add_argument("--page-token", dest="page_token", help="from a previous list's 'more:' line")
    q.set_defaults(func=command(cmd_list))

    q = group.add_parser("get", help="every field of one exception")
    database_flags(q)
    q.add_argument("exception_id")
    q.set_defaults(func=command(cmd_get))

    q = group.add_parser("resolve", help="close an OPEN exception with what was done about it")
    database_flags(q)
    q.add_argument("exception_id")
    q.add_argument("--note", required=True, help="what was done (1-500 characters), e.g. "
                   "'collected from the fleet by invoice 2026-118'")
    q.add_argument("--request-id", dest="request_id",
                   help="idempotency key: the same key and note again answer as the first time")
    q.set_defaults(func=command(cmd_resolve))

