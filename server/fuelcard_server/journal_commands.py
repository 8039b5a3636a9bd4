"""`fuelcard journal verify` and `fuelcard journal anchor`: the journal's
hash chain (journal_chain.py) checked, and its head anchored outside the
database, as `fuelcard audit verify` / `audit anchor` do for the audit log."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg

from fuelcard_server import audit_anchor, journal_chain


def _report(url: str, anchors: list[tuple[int, bytes]]) -> journal_chain.Report | int:
    try:
        return journal_chain.walk(url, anchors)
    except psycopg.Error as exc:
        print(f"fuelcard: cannot read the journal: {exc.diag.message_primary or exc}",
              file=sys.stderr)
        return 2


def _broken(report: journal_chain.Report, prefix: str) -> int:
    for problem in report.problems:
        print(f"FAIL {problem}")
    first = report.problems[0]
    print(f"{prefix}journal chain broken at entry {first.entry_id}: {first.detail} "
          f"({len(report.problems)} problem(s))", file=sys.stderr)
    return 1


def cmd_verify(args: argparse.Namespace) -> int:
    from fuelcard_server import cli

    s = cli._settings(args)
    anchors: list[tuple[int, bytes]] = []
    if args.anchor is not None:
        anchors, code = cli._anchors_of(args.anchor, s, args.public_key, journal=True)
        if code:
            return code
        if not anchors:
            print(f"FAIL {args.anchor}: no anchor in it")
            print("anchor file holds no anchor: nothing to check the chain against",
                  file=sys.stderr)
            return 1
    url, pg = cli._database(s)
    try:
        report = _report(url, anchors)
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    if isinstance(report, int):
        return report
    if report.problems:
        return _broken(report, "")
    print(f"journal chain intact: {report.chained} entr{'y' if report.chained == 1 else 'ies'}"
          f" chained, head {report.head_id}:{report.head_hash.hex()}; {report.unchained} newer"
          " not chained yet" + (f"; extends all {len(anchors)} anchored head(s)" if anchors else ""))
    return 0


def cmd_anchor(args: argparse.Namespace) -> int:
    """Append the chain's head, signed, to the anchor file - only if the
    chain is intact and still extends every head anchored there before."""
    from fuelcard_server import cli

    s = cli._settings(args)
    key = cli._server_key(s)
    if key is None:
        print(f"fuelcard: no server key at {s.signing_key_path} (the server makes it when it "
              "first starts; --data-dir or signing_key_file names where it is)", file=sys.stderr)
        return 2
    anchors: list[tuple[int, bytes]] = []
    if args.file.exists():
        anchors, code = cli._anchors_of(args.file, s, None, journal=True)
        if code:
            return code
    url, pg = cli._database(s)
    try:
        report = _report(url, anchors)
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    if isinstance(report, int):
        return report
    if report.problems:
        return _broken(report, "not anchored: ")
    head = f"{report.head_id}:{report.head_hash.hex()}"
    if report.head_id == 0:
        print("journal chain empty: nothing to anchor")
        return 0
    if anchors and anchors[-1] == (report.head_id, report.head_hash):
        print(f"head {head} is already anchored in {args.file}")
        return 0
    try:
        audit_anchor.append(args.file, audit_anchor.Anchor.make(
            key, report.head_id, report.head_hash, dt.datetime.now(dt.UTC), audit_anchor.JOURNAL))
    except OSError as exc:
        print(f"fuelcard: cannot write the anchor file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"anchored head {head} in {args.file}")
    return 0


def add_parsers(sub: argparse._SubParsersAction,  # type: ignore[type-arg]
                add_database_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("journal", help="the journal's SM3 hash chain")
    journal_sub = p.add_subparsers(dest="journal_command", required=True)
    p = journal_sub.add_parser("verify", help="recompute the journal's hash chain; non-zero exit "
                               "naming the first broken link")
    add_database_flags(p)
    p.add_argument("--anchor", type=Path, metavar="FILE",
                   help="an anchor file written by `journal anchor`: every line's signature is "
                   "checked, and the chain must still extend every anchored head (catches a "
                   "chain cut short or rewritten wholesale)")
    p.add_argument("--public-key", dest="public_key", metavar="HEX",
                   help="the server's SM2 public key (X || Y, 128 hex digits) to check an anchor "
                   "file with; default: from the server's key in the data directory")
    p.set_defaults(func=cmd_verify)
    p = journal_sub.add_parser("anchor", help="append the journal chain's head (entry id and "
                               "hash, signed with the server's SM2 key) to an append-only anchor "
                               "file kept outside the database; refuses if the chain is broken "
                               "or no longer extends a head anchored there")
    add_database_flags(p)
    p.add_argument("--file", type=Path, required=True,
                   help="the anchor file (created if absent; lines are only ever appended): "
                   "keep it, or copies of it, where database administrators cannot write")
    p.set_defaults(func=cmd_anchor)
