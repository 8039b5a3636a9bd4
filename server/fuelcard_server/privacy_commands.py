"""`fuelcard privacy seal|export|erase`: the holders' personal data from the
command line (holder_data.py holds the logic; AccountService.ExportHolderData
and EraseHolderData serve the same over gRPC). Export and erasure are
written to the audit trail, as the RPCs are; the export is the operator's on
the database host, so it asks no step-up (the RPC does)."""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from fuelcard_server import holder_data
from fuelcard_server.audit import APPEND_SQL
from fuelcard_server.db import one_shot
from fuelcard_server.holder_data import HolderSeal
from fuelcard_server.key_custody import FileKeySetStore, KeyCustodyError, open_key_set
from fuelcard_server.locks import AUDIT_LOCK
from fuelcard_server.privacy import scrub


def _with_seal(args: argparse.Namespace, run: Callable[[str, HolderSeal], int]) -> int:
    from fuelcard_server import cli

    s = cli._settings(args)
    url, pg = cli._database(s)
    try:
        served = open_key_set(url, FileKeySetStore(s).load(create=False))
        return run(url, HolderSeal(served.data))
    except KeyCustodyError as exc:
        print(f"fuelcard: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        # The database's words about what failed (an fc.* reason such as
        # ACCOUNT_NOT_CLOSED), never a value of the request.
        print(f"fuelcard: {exc.diag.message_primary or type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        if pg is not None:
            pg.stop_if_started_here()


def _audit(conn: psycopg.Connection[Any], method: str, target: str, outcome: str) -> None:
    conn.execute(APPEND_SQL, {"lock": AUDIT_LOCK, "actor": scrub(f"cli:{getpass.getuser()}"),
                              "method": method, "target": target, "outcome": outcome})


def _account(args: argparse.Namespace, conn: psycopg.Connection[Any], seal: HolderSeal) -> str | None:
    """The account named by --account, or found by --phone / --id-number
    (blind index); None (and a message) if none or several are found."""
    if args.account:
        return str(uuid.UUID(args.account))
    row = conn.execute(holder_data.HOLDER_ACCOUNTS_SQL,
                       seal.lookup_params(args.phone or "", args.id_number or "")).fetchone()
    found = [str(u) for u in (row[0] if row else [])]
    if len(found) != 1:
        print(f"fuelcard: {len(found)} accounts have that holder data; name one with --account "
              f"({', '.join(found) or 'none'})", file=sys.stderr)
        return None
    return found[0]


def cmd_seal(args: argparse.Namespace) -> int:
    def run(url: str, seal: HolderSeal) -> int:
        n = holder_data.seal_plaintext(url, seal, args.batch)
        print(f"sealed the personal data of {n} holders")
        return 0
    return _with_seal(args, run)


def cmd_export(args: argparse.Namespace) -> int:
    def run(url: str, seal: HolderSeal) -> int:
        with one_shot(url, autocommit=True) as conn, conn.transaction():
            account = _account(args, conn, seal)
            if account is None:
                return 1
            row = conn.execute(holder_data.HOLDER_EXPORT_SQL, (account,)).fetchone()
            found = row is not None and row[0] is not None
            _audit(conn, "cli/fuelcard privacy export", account, "OK" if found else "NOT_FOUND")
        if not found:
            print("fuelcard: no such account", file=sys.stderr)
            return 1
        assert row is not None
        text = json.dumps(seal.opened_export(row[0]), ensure_ascii=False, indent=2, sort_keys=True)
        if args.out is None:
            print(text)
        else:
            # personal data: readable by its owner only
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            print(f"exported to {args.out}")
        return 0
    return _with_seal(args, run)


def cmd_erase(args: argparse.Namespace) -> int:
    def run(url: str, seal: HolderSeal) -> int:
        with one_shot(url, autocommit=True) as conn:
            with conn.transaction():
                account = _account(args, conn, seal)
            if account is None:
                return 1
            try:
                with conn.transaction():
                    row = conn.execute(holder_data.ERASE_HOLDER_SQL, {
                        "account_uid": account, "now": dt.datetime.now(dt.UTC)}).fetchone()
                    _audit(conn, "cli/fuelcard privacy erase", account, "OK")
            except psycopg.Error as exc:
                # the refusal is audited too
                with conn.transaction():
                    _audit(conn, "cli/fuelcard privacy erase", account,
                           exc.diag.message_primary or "ERROR")
                raise
        assert row is not None
        d = row[0]
        print(f"account {d['account_id']}: personal data "
              f"{'was already erased' if d['already'] else 'erased'}")
        return 0
    return _with_seal(args, run)


def add_parser(sub: Any, add_database_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("privacy", help="holders' personal data: seal, export, erase")
    privacy_sub = p.add_subparsers(dest="privacy_command", required=True)

    q = privacy_sub.add_parser("seal", help="seal the phone and ID numbers an upgrade left in "
                               "plaintext (the server also does it when it starts)")
    add_database_flags(q)
    q.add_argument("--batch", type=int, default=holder_data.SEAL_BATCH,
                   help=f"rows per transaction (default {holder_data.SEAL_BATCH})")
    q.set_defaults(func=cmd_seal)

    for name, func, text in (
            ("export", cmd_export, "everything held about a holder, as JSON (audited)"),
            ("erase", cmd_erase, "erase the personal data of a closed account (audited)")):
        q = privacy_sub.add_parser(name, help=text)
        add_database_flags(q)
        who = q.add_mutually_exclusive_group(required=True)
        who.add_argument("--account", help="the account id (uuid)")
        who.add_argument("--phone", help="find the account by its holder's phone")
        who.add_argument("--id-number", dest="id_number",
                         help="find the account by its holder's ID number")
        if name == "export":
            q.add_argument("--out", type=Path, help="write the JSON here (mode 0600), not to stdout")
        q.set_defaults(func=func)
