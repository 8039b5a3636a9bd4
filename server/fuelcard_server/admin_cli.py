"""`fuelcard admin`: everyday operator work over gRPC with the admin
certificate - accounts, cards, limits, scope, batch top-up from a CSV file,
reconciliation breaks, channel exceptions, rule sets and hold reviews - and
the JSON API's principals.

It is a client of the running server like any other: every rule, every
idempotency key and every audit record stays in the server. Each mutation
sends a fresh request_id unless --request-id repeats one (a command that got
no answer is retried with the same id and gets the first answer, never a
second change).

Amounts are typed and shown in yuan (元, two decimals) for people; --json
prints the gRPC responses as proto3 JSON (amounts in fen; int64 fields as
strings, as proto3 JSON says) for scripts.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

import grpc
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    control_pb2,
    control_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    step_up_pb2,
)
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

DEFAULT_TARGET = "127.0.0.1:50051"
# BatchTopUp takes at most this many lines per request (control.py): a longer
# file goes in chunks, each its own request and transaction.
TOP_UP_CHUNK = 1000
MAX_FEN = 10**12
BEIJING = dt.timezone(dt.timedelta(hours=8))

ACCOUNT_TYPES = {"personal": account_pb2.ACCOUNT_TYPE_PERSONAL,
                 "corporate": account_pb2.ACCOUNT_TYPE_CORPORATE,
                 "fleet": account_pb2.ACCOUNT_TYPE_CORPORATE,
                 "family": account_pb2.ACCOUNT_TYPE_FAMILY}
FUNDING_MODES = {"shared": account_pb2.FUNDING_MODE_SHARED,
                 "allocated": account_pb2.FUNDING_MODE_ALLOCATED}
CARD_STATUSES = {"block": account_pb2.CARD_STATUS_BLOCKED, "unblock": account_pb2.CARD_STATUS_ACTIVE,
                 "close": account_pb2.CARD_STATUS_CLOSED}
PRODUCTS = {"92": common_pb2.PRODUCT_GASOLINE_92, "95": common_pb2.PRODUCT_GASOLINE_95,
            "98": common_pb2.PRODUCT_GASOLINE_98, "0": common_pb2.PRODUCT_DIESEL_0,
            "-10": common_pb2.PRODUCT_DIESEL_MINUS_10}


class UsageError(Exception):
    """A command line or input file the command cannot use (exit 2)."""


# --- amounts and output ---------------------------------------------------------


def fen(text: str, *, allow_zero: bool = False) -> int:
    """Yuan as typed ("500", "12.5", "0.01") to fen, exactly: no float ever
    touches money."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise UsageError(f"not an amount in yuan: {text!r}") from None
    cents = value * 100
    if cents != cents.to_integral_value() or not value.is_finite():
        raise UsageError(f"at most two decimals (fen): {text!r}")
    result = int(cents)
    if result < 0 or (result == 0 and not allow_zero) or result > MAX_FEN:
        raise UsageError(f"amount out of range: {text!r}")
    return result


def yuan(amount_fen: int) -> str:
    sign = "-" if amount_fen < 0 else ""
    return f"{sign}{abs(amount_fen) // 100}.{abs(amount_fen) % 100:02d}"


def _width(text: str) -> int:
    # CJK characters take two columns in a terminal (plate numbers, names).
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max([_width(h)] + [_width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for line in [list(headers)] + [list(r) for r in rows]:
        out.write("  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(line, widths, strict=True))
                  .rstrip() + "\n")


def _json(message: Message | dict[str, Any] | list[Any]) -> str:
    if isinstance(message, Message):
        return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True),
                          ensure_ascii=False, indent=2)
    return json.dumps(message, ensure_ascii=False, indent=2)


def _time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=dt.UTC).astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def _enum(enum_type: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum_type.Name(value)
        return name.removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the connection -------------------------------------------------------------


@dataclass
class Admin:
    """Stubs over one channel with the admin certificate."""

    channel: grpc.Channel

    def __post_init__(self) -> None:
        self.accounts = account_pb2_grpc.AccountServiceStub(self.channel)
        self.control = control_pb2_grpc.ControlServiceStub(self.channel)
        self.risk = risk_pb2_grpc.RiskServiceStub(self.channel)
        self.recon = settlement_pb2_grpc.ReconciliationServiceStub(self.channel)


def connect(args: argparse.Namespace) -> Admin:
    target = args.target or os.environ.get("FUELCARD_TARGET") or DEFAULT_TARGET
    if args.insecure:
        return Admin(grpc.insecure_channel(target))
    certs = args.certs or os.environ.get("FUELCARD_CERTS")
    cert, key, ca = args.cert, args.key, args.ca
    if certs:
        directory = Path(certs)
        cert = cert or directory / f"{args.cert_name}.pem"
        key = key or directory / f"{args.cert_name}.key"
        ca = ca or directory / "ca.pem"
    if not (cert and key and ca):
        raise UsageError("no admin certificate: give --certs DIR (from `fuelcard certs --admin NAME`), "
                         "or --cert, --key and --ca, or --insecure for a development server")
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(), private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the certificate: {exc.filename}") from None
    return Admin(grpc.secure_channel(target, credentials))


def _rid(args: argparse.Namespace) -> str:
    return args.request_id or str(uuid.uuid4())


def _pages(fetch: Callable[[str], Any], items: str, limit: int) -> Iterator[Any]:
    """Every item of a paged list (AIP-132), at most `limit`; a count on
    stderr after each page when there is more than one (a fleet of 10 000
    vehicles is 20 pages)."""
    token, seen, pages = "", 0, 0
    while True:
        page = fetch(token)
        pages += 1
        for item in getattr(page, items):
            if seen >= limit:
                return
            seen += 1
            yield item
        token = page.next_page_token
        if pages > 1 or token:
            noun = items.replace("_", " ")
            _progress(f"{seen} {noun} so far" if token else f"{seen} {noun} in all")
        if not token:
            return


# --- accounts and cards -----------------------------------------------------------

ACCOUNT_HEADERS = ("ACCOUNT", "TYPE", "LABEL", "HOLDER", "BALANCE", "HELD", "FUNDING", "STATUS")


def _account_row(a: account_pb2.Account) -> list[str]:
    return [a.account_id, _enum(account_pb2.AccountType, a.type, "ACCOUNT_TYPE_"), a.label,
            a.holder.name, yuan(a.balance.balance_fen), yuan(a.balance.held_fen),
            _enum(account_pb2.FundingMode, a.funding_mode, "FUNDING_MODE_") if a.funding_mode else "own",
            _enum(account_pb2.AccountStatus, a.status, "ACCOUNT_STATUS_")]


CARD_HEADERS = ("CARD", "ACCOUNT", "NUMBER", "STATUS", "ISSUED")


def _card_row(c: account_pb2.Card) -> list[str]:
    return [c.card_id, c.account_id, c.masked_card_number,
            _enum(account_pb2.CardStatus, c.status, "CARD_STATUS_"), _time(c.create_time)]


def accounts_open(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    if args.parent and not args.mode:
        raise UsageError("a sub-account (--parent) needs --mode shared or allocated")
    if not args.parent and not args.type:
        raise UsageError("a top-level account needs --type (personal, corporate/fleet, family)")
    request = account_pb2.OpenAccountRequest(
        request_id=_rid(args),
        holder=account_pb2.Holder(name=args.name, phone=args.phone or "", id_number=args.id_number or ""),
        parent_account_id=args.parent or "", label=args.label or "")
    if args.type:
        request.type = ACCOUNT_TYPES[args.type]
    if args.mode:
        request.funding_mode = FUNDING_MODES[args.mode]
    response = a.accounts.OpenAccount(request)
    if args.json:
        out.write(_json(response) + "\n")
    else:
        table(ACCOUNT_HEADERS, [_account_row(response.account)], out)
    return 0


def accounts_get(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    response = a.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=args.account_id))
    if args.json:
        out.write(_json(response) + "\n")
    else:
        table(ACCOUNT_HEADERS, [_account_row(response.account)], out)
    return 0


def accounts_list(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    found = list(_pages(lambda token: a.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
        parent_account_id=args.parent, page_size=args.page_size, page_token=token)),
        "accounts", args.limit))
    if args.json:
        out.write(_json([json_format.MessageToDict(x, preserving_proto_field_name=True) for x in found])
                  + "\n")
    else:
        table(ACCOUNT_HEADERS, [_account_row(x) for x in found], out)
        _progress(f"{len(found)} sub-account(s)")
    return 0


def accounts_history(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    found = list(_pages(lambda token: a.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=args.account_id, page_size=args.page_size, page_token=token)),
        "transactions", args.limit))
    if args.json:
        out.write(_json([json_format.MessageToDict(x, preserving_proto_field_name=True) for x in found])
                  + "\n")
    else:
        table(("TIME", "KIND", "AMOUNT", "TRANSACTION"),
              [[_time(t.create_time), _enum(account_pb2.TransactionKind, t.kind, "TRANSACTION_KIND_"),
                yuan(t.amount_fen), t.transaction_id] for t in found], out)
    return 0


def cards_issue(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    response = a.accounts.IssueCard(account_pb2.IssueCardRequest(
        request_id=_rid(args), account_id=args.account_id, card_number=args.card_number or ""))
    if args.json:
        out.write(_json(response) + "\n")
    else:
        table(CARD_HEADERS, [_card_row(response.card)], out)
        # The full number is shown once, for printing the card; never again.
        # It is the command's output (stdout), never a log or progress line.
        out.write(f"card number (shown once, for printing): {response.card_number}\n")
    return 0


def cards_list(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    found = list(_pages(lambda token: a.accounts.ListCards(account_pb2.ListCardsRequest(
        account_id=args.account_id, page_size=args.page_size, page_token=token)), "cards", args.limit))
    if args.json:
        out.write(_json([json_format.MessageToDict(x, preserving_proto_field_name=True) for x in found])
                  + "\n")
    else:
        table(CARD_HEADERS, [_card_row(x) for x in found], out)
    return 0


def cards_status(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    response = a.accounts.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
        request_id=_rid(args), card_id=args.card_id, status=CARD_STATUSES[args.cards_command]))
    if args.json:
        out.write(_json(response) + "\n")
    else:
        table(CARD_HEADERS, [_card_row(response.card)], out)
    return 0


# --- limits and scope -------------------------------------------------------------


def _limits(args: argparse.Namespace) -> control_pb2.SpendingLimits:
    return control_pb2.SpendingLimits(
        per_transaction_fen=fen(args.per_txn) if args.per_txn else 0,
        daily_fen=fen(args.daily) if args.daily else 0,
        monthly_fen=fen(args.monthly) if args.monthly else 0)


def _step_up(args: argparse.Namespace) -> step_up_pb2.StepUp | None:
    if bool(args.challenge) != bool(args.code):
        raise UsageError("--challenge and --code go together")
    return step_up_pb2.StepUp(challenge_id=args.challenge, code=args.code) if args.challenge else None


def _caps(s: control_pb2.SpendingLimits) -> list[str]:
    return [yuan(x) if x else "-" for x in (s.per_transaction_fen, s.daily_fen, s.monthly_fen)]


def limits_set(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    request = control_pb2.SetSpendingLimitsRequest(request_id=_rid(args), actor_account_id=args.actor,
                                                   limits=_limits(args))
    if args.card:
        request.card_id = args.card
    else:
        request.account_id = args.account
    step_up = _step_up(args)
    if step_up is not None:
        request.step_up.CopyFrom(step_up)
    response = a.control.SetSpendingLimits(request)
    if args.json:
        out.write(_json(response) + "\n")
    else:
        table(("PER TXN", "DAILY", "MONTHLY"), [_caps(response.limits)], out)
    return 0


def limits_get(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    request = control_pb2.GetSpendingLimitsRequest()
    if args.card:
        request.card_id = args.card
    else:
        request.account_id = args.account
    r = a.control.GetSpendingLimits(request)
    if args.json:
        out.write(_json(r) + "\n")
    else:
        table(("", "PER TXN", "DAILY", "MONTHLY"),
              [["standing", *_caps(r.limits)], ["in force", *_caps(r.effective_limits)]], out)
        out.write(f"used today {yuan(r.used_today_fen)}, this month {yuan(r.used_this_month_fen)}\n")
    return 0


def _hours(text: str) -> control_pb2.HourWindow:
    try:
        start, end = text.split("-")
        sh, sm = (int(x) for x in start.split(":"))
        eh, em = (int(x) for x in end.split(":"))
    except ValueError:
        raise UsageError(f"--hours: expected HH:MM-HH:MM, got {text!r}") from None
    return control_pb2.HourWindow(start_minute=sh * 60 + sm, end_minute=eh * 60 + em)


def _circle(text: str) -> control_pb2.GeoFence:
    try:
        lat, lon, radius = text.split(",")
        center = control_pb2.GeoPoint(latitude=float(lat), longitude=float(lon))
        return control_pb2.GeoFence(circle=control_pb2.GeoCircle(center=center, radius_m=int(radius)))
    except ValueError:
        raise UsageError(f"--circle: expected LAT,LON,RADIUS_M, got {text!r}") from None


def scope_set(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    try:
        products = [PRODUCTS[p] for p in args.product]
    except KeyError as exc:
        raise UsageError(f"--product: one of {', '.join(PRODUCTS)}, got {exc.args[0]!r}") from None
    scope = control_pb2.CardScope(station_ids=args.station, products=products,
                                  geofences=[_circle(c) for c in args.circle],
                                  hours=[_hours(h) for h in args.hours])
    response = a.control.SetCardScope(control_pb2.SetCardScopeRequest(
        request_id=_rid(args), actor_account_id=args.actor, card_id=args.card, scope=scope))
    if args.json:
        out.write(_json(response) + "\n")
    else:
        s = response.scope
        out.write(f"stations: {', '.join(s.station_ids) or 'any'}; products: "
                  f"{', '.join(_enum(common_pb2.Product, p, 'PRODUCT_') for p in s.products) or 'any'}; "
                  f"fences: {len(s.geofences) or 'none'}; hour windows: {len(s.hours) or 'any time'}\n")
    return 0


# --- batch top-up -------------------------------------------------------------------


def read_top_up_csv(path: Path | None, lines: Sequence[str]) -> list[tuple[str, str, int]]:
    """(account id, label, fen) per line: a CSV file with the columns
    account_id and amount_yuan (label optional), and/or ACCOUNT=YUAN words."""
    found: list[tuple[str, str, int]] = []
    if path is not None:
        try:
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                missing = {"account_id", "amount_yuan"} - set(reader.fieldnames or ())
                if missing:
                    raise UsageError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                                     "(header: account_id,amount_yuan[,label])")
                for n, row in enumerate(reader, start=2):
                    try:
                        found.append((row["account_id"].strip(), (row.get("label") or "").strip(),
                                      fen(row["amount_yuan"])))
                    except UsageError as exc:
                        raise UsageError(f"{path}:{n}: {exc}") from None
        except OSError as exc:
            raise UsageError(f"cannot read {exc.filename}") from None
    for word in lines:
        account, sep, amount = word.partition("=")
        if not sep:
            raise UsageError(f"--line: expected ACCOUNT=YUAN, got {word!r}")
        found.append((account.strip(), "", fen(amount)))
    if not found:
        raise UsageError("nothing to top up: give --csv FILE or --line ACCOUNT=YUAN")
    return found


def top_up(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    lines = read_top_up_csv(args.csv, args.line)
    total = sum(x[2] for x in lines)
    parent = a.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=args.parent)).account
    # The preview: what will move, and whether the parent has it.
    if not args.json:
        shown = lines if len(lines) <= args.show else lines[:args.show]
        table(("ACCOUNT", "LABEL", "AMOUNT"), [[x[0], x[1], yuan(x[2])] for x in shown], out)
        if len(shown) < len(lines):
            out.write(f"... and {len(lines) - len(shown)} more line(s)\n")
        available = parent.balance.balance_fen - parent.balance.held_fen
        out.write(f"{len(lines)} line(s), total {yuan(total)} from {parent.holder.name} "
                  f"({args.parent}), available {yuan(available)}\n")
        if available < total:
            out.write("warning: the parent does not have that much: the server will refuse it\n")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("not a terminal: confirm with --yes")
        if input("top up? [y/N] ").strip().lower() not in ("y", "yes"):
            _progress("nothing done")
            return 1
    base = _rid(args)
    chunks = [lines[i:i + TOP_UP_CHUNK] for i in range(0, len(lines), TOP_UP_CHUNK)]
    done, responses = 0, []
    for i, chunk in enumerate(chunks):
        # One request id per chunk, derived from the run's: repeating the
        # command with the same --request-id replays every chunk that went in.
        request_id = base if len(chunks) == 1 else f"{base[:56]}-{i}"
        response = a.control.BatchTopUp(control_pb2.BatchTopUpRequest(
            request_id=request_id, parent_account_id=args.parent,
            lines=[control_pb2.TopUpLine(account_id=x[0], amount_fen=x[2]) for x in chunk]))
        responses.append(response)
        if response.decision != common_pb2.DECISION_APPROVED:
            # all lines of this chunk or none: the earlier chunks stand
            reason = _enum(common_pb2.DeclineReason, response.decline_reason, "DECLINE_REASON_")
            print(f"fuelcard admin: top-up declined ({reason}) after {done}/{len(lines)} line(s)",
                  file=sys.stderr)
            if args.json:
                out.write(_json([json_format.MessageToDict(r, preserving_proto_field_name=True)
                                 for r in responses]) + "\n")
            return 1
        done += len(chunk)
        if len(chunks) > 1:
            _progress(f"topped up {done}/{len(lines)} line(s)")
    last = responses[-1]
    if args.json:
        out.write(_json([json_format.MessageToDict(r, preserving_proto_field_name=True)
                         for r in responses]) + "\n")
    else:
        out.write(f"done: {len(lines)} line(s), {yuan(total)}; parent balance now "
                  f"{yuan(last.parent_balance_fen)}\n")
    return 0


# --- breaks, exceptions, rule sets, reviews ----------------------------------------------


def breaks_list(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    found = list(_pages(lambda token: a.recon.ListBreaks(settlement_pb2.ListBreaksRequest(
        include_resolved=args.all, page_token=token)), "breaks", args.limit))
    if args.json:
        out.write(_json([json_format.MessageToDict(b, preserving_proto_field_name=True) for b in found])
                  + "\n")
    else:
        table(("BREAK", "DATE", "KIND", "CHANNEL TXN", "OURS", "THEIRS", "RESOLVED"),
              [[b.break_id, b.business_date, _enum(settlement_pb2.BreakKind, b.kind, "BREAK_KIND_"),
                b.ours.channel_txn_id or b.theirs.channel_txn_id,
                yuan(b.ours.amount_fen) if b.HasField("ours") else "-",
                yuan(b.theirs.amount_fen) if b.HasField("theirs") else "-",
                "yes" if b.resolved else ""] for b in found], out)
    return 0


def breaks_resolve(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    r = a.recon.ResolveBreak(settlement_pb2.ResolveBreakRequest(
        request_id=_rid(args), break_id=args.break_id, resolution=args.resolution))
    out.write(_json(r) + "\n" if args.json else f"resolved {r.reconciliation_break.break_id}\n")
    return 0


def exceptions_list(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    state = (settlement_pb2.CHANNEL_EXCEPTION_STATE_UNSPECIFIED if args.all
             else settlement_pb2.CHANNEL_EXCEPTION_STATE_OPEN)
    found = list(_pages(lambda token: a.recon.ListChannelExceptions(
        settlement_pb2.ListChannelExceptionsRequest(state=state, page_token=token)),
        "channel_exceptions", args.limit))
    if args.json:
        out.write(_json([json_format.MessageToDict(x, preserving_proto_field_name=True) for x in found])
                  + "\n")
    else:
        table(("EXCEPTION", "KIND", "ACCOUNT", "AMOUNT", "STATE", "OPENED"),
              [[x.exception_id, _enum(settlement_pb2.ChannelExceptionKind, x.kind, "CHANNEL_EXCEPTION_KIND_"),
                x.account_id, yuan(x.amount_fen),
                _enum(settlement_pb2.ChannelExceptionState, x.state, "CHANNEL_EXCEPTION_STATE_"),
                _time(x.create_time)] for x in found], out)
    return 0


def exceptions_resolve(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    r = a.recon.ResolveChannelException(settlement_pb2.ResolveChannelExceptionRequest(
        request_id=_rid(args), exception_id=args.exception_id, resolution=args.resolution))
    out.write(_json(r) + "\n" if args.json else f"resolved {r.channel_exception.exception_id}\n")
    return 0


def _rule_set(info: risk_pb2.RuleSetInfo, out: TextIO) -> None:
    table(("VERSION", "NAME", "RULES", "ACTIVE", "CREATED", "BY"),
          [[str(info.version), info.name, str(info.rule_count), "yes" if info.active else "",
            _time(info.create_time), info.created_by]], out)


def rules_show(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    r = a.risk.GetActiveRuleSet(risk_pb2.GetActiveRuleSetRequest())
    if args.json:
        out.write(_json(r) + "\n")
    else:
        _rule_set(r.rule_set, out)
    return 0


def rules_load(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    path: Path = args.file
    try:
        document = path.read_text(encoding="utf-8")
    except OSError:
        raise UsageError(f"cannot read {path}") from None
    fmt = risk_pb2.RULE_FORMAT_JSON if path.suffix == ".json" else risk_pb2.RULE_FORMAT_TOML
    r = a.risk.LoadRuleSet(risk_pb2.LoadRuleSetRequest(request_id=_rid(args), document=document,
                                                       format=fmt))
    if args.json:
        out.write(_json(r) + "\n")
    else:
        _rule_set(r.rule_set, out)
        out.write(f"in force; added {len(r.changes.added)}, removed {len(r.changes.removed)}, "
                  f"changed {len(r.changes.changed)} rule(s) (`rules activate VERSION` puts an "
                  "earlier version back)\n")
    return 0


def rules_activate(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    r = a.risk.ActivateRuleSet(risk_pb2.ActivateRuleSetRequest(request_id=_rid(args),
                                                               version=args.version))
    if args.json:
        out.write(_json(r) + "\n")
    else:
        _rule_set(r.rule_set, out)
    return 0


def reviews_list(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    found = list(_pages(lambda token: a.risk.ListSuspendedHolds(risk_pb2.ListSuspendedHoldsRequest(
        page_token=token)), "holds", args.limit))
    if args.json:
        out.write(_json([json_format.MessageToDict(x, preserving_proto_field_name=True) for x in found])
                  + "\n")
    else:
        table(("HOLD", "CARD", "STATION", "AMOUNT", "SCORE", "RULES", "TIME"),
              [[x.hold.hold_id, x.hold.masked_card_number, x.hold.station_id, yuan(x.hold.amount_fen),
                str(x.risk_score), ",".join(x.fired_rules), _time(x.hold.create_time)] for x in found], out)
    return 0


def reviews_decide(a: Admin, args: argparse.Namespace, out: TextIO) -> int:
    verdict = (risk_pb2.REVIEW_VERDICT_APPROVE if args.reviews_command == "approve"
               else risk_pb2.REVIEW_VERDICT_REJECT)
    r = a.risk.ReviewHold(risk_pb2.ReviewHoldRequest(request_id=_rid(args), hold_id=args.hold_id,
                                                     verdict=verdict, note=args.note or ""))
    out.write(_json(r) + "\n" if args.json else f"{args.reviews_command}d {args.hold_id}\n")
    return 0


# --- principals of the JSON API (straight on the database) ----------------------------------


def _database_url(args: argparse.Namespace) -> str:
    url: str | None = args.database_url or os.environ.get("FUELCARD_DATABASE_URL")
    if not url:
        raise UsageError("--database-url (or FUELCARD_DATABASE_URL) is required")
    return url


def principal_disable(args: argparse.Namespace, out: TextIO) -> int:
    import getpass

    from fuelcard_api import principals

    try:
        principal_id, ended = principals.disable(_database_url(args), login=args.login,
                                                 by=f"cli:{getpass.getuser()}")
    except principals.PrincipalError as exc:
        print(f"fuelcard admin: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out.write(_json({"principal_id": principal_id, "sessions_ended": ended}) + "\n")
    else:
        out.write(f"disabled {args.login} ({principal_id}); {ended} session(s) ended\n")
    return 0


def principal_add(args: argparse.Namespace, out: TextIO) -> int:
    import getpass

    from fuelcard_api import principals

    if args.principal_command == "disable":
        return principal_disable(args, out)
    url = _database_url(args)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UsageError("the passwords differ")
    try:
        made = principals.add(url, login=args.login, kind=args.kind, account_id=args.account,
                              password=password, phone=args.phone or "",
                              by=f"cli:{getpass.getuser()}")
    except principals.PrincipalError as exc:
        print(f"fuelcard admin: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out.write(_json({"principal_id": made.principal_id, "login": made.login, "kind": made.kind,
                         "account_id": made.account_id}) + "\n")
    else:
        table(("PRINCIPAL", "LOGIN", "KIND", "ACCOUNT"),
              [[made.principal_id, made.login, made.kind, made.account_id]], out)
    return 0


# --- the command line -------------------------------------------------------------------------


def _connection_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection")
    g.add_argument("--target", help=f"the server, HOST:PORT (env FUELCARD_TARGET; default {DEFAULT_TARGET})")
    g.add_argument("--certs", help="directory of `fuelcard certs`: ca.pem and the client "
                   "certificates (env FUELCARD_CERTS)")
    g.add_argument("--as", dest="cert_name", default="admin-ops", metavar="STEM",
                   help="the certificate in --certs: STEM.pem and STEM.key (default admin-ops; "
                        "hold reviews take a reviewer's, e.g. reviewer-risk)")
    g.add_argument("--cert", type=Path, help="the admin client certificate (PEM)")
    g.add_argument("--key", type=Path, help="its private key")
    g.add_argument("--ca", type=Path, help="the CA that signed the server's certificate")
    g.add_argument("--insecure", action="store_true", help="plaintext, for `fuelcard serve --insecure`")
    common.add_argument("--json", action="store_true", help="print proto3 JSON for scripts (fen)")
    common.add_argument("--request-id", dest="request_id",
                        help="repeat a change that got no answer: the same id gets the first answer")
    return common


def _listing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=10_000, help="at most this many (default 10000)")
    p.add_argument("--page-size", dest="page_size", type=int, default=0,
                   help="per request (default: the server's)")


def add_parser(sub: Any) -> None:
    """The `admin` command group, on `fuelcard`'s subparsers."""
    c = _connection_flags()
    admin = sub.add_parser("admin", help="operator work over gRPC with the admin certificate: accounts, "
                           "cards, limits, scope, batch top-up, breaks, exceptions, rule sets, reviews",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    admin.set_defaults(func=run)
    groups = admin.add_subparsers(dest="admin_command", required=True, metavar="GROUP")

    g = groups.add_parser("accounts", help="open, read and list accounts").add_subparsers(
        dest="accounts_command", required=True)
    p = g.add_parser("open", parents=[c], help="open an account, or a sub-account with --parent")
    p.add_argument("--type", choices=sorted(ACCOUNT_TYPES), help="for a top-level account")
    p.add_argument("--name", dest="name", required=True, help="the holder: person or company")
    p.add_argument("--phone", help="the holder's mobile (step-up codes go there)")
    p.add_argument("--id-number", dest="id_number", help="ID card number or social credit code")
    p.add_argument("--parent", help="open a sub-account (vehicle, family member) of this account")
    p.add_argument("--mode", choices=sorted(FUNDING_MODES), help="a sub-account's funding")
    p.add_argument("--label", help="e.g. the vehicle's plate")
    p.set_defaults(admin_func=accounts_open)
    p = g.add_parser("get", parents=[c], help="an account and its balance")
    p.add_argument("account_id")
    p.set_defaults(admin_func=accounts_get)
    p = g.add_parser("list", parents=[c], help="the sub-accounts of a parent (a fleet's vehicles)")
    p.add_argument("--parent", required=True)
    _listing(p)
    p.set_defaults(admin_func=accounts_list)
    p = g.add_parser("history", parents=[c], help="an account's settled transactions, newest first")
    p.add_argument("account_id")
    _listing(p)
    p.set_defaults(admin_func=accounts_history)

    g = groups.add_parser("cards", help="issue, list, block, unblock and close cards").add_subparsers(
        dest="cards_command", required=True)
    p = g.add_parser("issue", parents=[c], help="issue a card on an account")
    p.add_argument("account_id")
    p.add_argument("--card-number", dest="card_number", help="pre-printed stock; default: generated")
    p.set_defaults(admin_func=cards_issue)
    p = g.add_parser("list", parents=[c], help="the cards of an account")
    p.add_argument("account_id")
    _listing(p)
    p.set_defaults(admin_func=cards_list)
    for verb in CARD_STATUSES:
        p = g.add_parser(verb, parents=[c], help=f"{verb} a card")
        p.add_argument("card_id")
        p.set_defaults(admin_func=cards_status)

    g = groups.add_parser("limits", help="spending caps of a vehicle, member or card").add_subparsers(
        dest="limits_command", required=True)
    p = g.add_parser("set", parents=[c], help="set the caps (yuan); an omitted cap means none")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--card")
    target.add_argument("--account")
    p.add_argument("--actor", required=True, help="the parent account making the change")
    p.add_argument("--per-txn", dest="per_txn", help="per transaction, yuan")
    p.add_argument("--daily", help="per day, yuan")
    p.add_argument("--monthly", help="per month, yuan")
    p.add_argument("--challenge", help="a raise's step-up challenge id")
    p.add_argument("--code", help="the code the holder received")
    p.set_defaults(admin_func=limits_set)
    p = g.add_parser("get", parents=[c], help="the caps, those in force, and what was used")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--card")
    target.add_argument("--account")
    p.set_defaults(admin_func=limits_get)

    g = groups.add_parser("scope", help="where, what and when a card may buy").add_subparsers(
        dest="scope_command", required=True)
    p = g.add_parser("set", parents=[c], help="replace a card's scope (nothing given: anywhere)")
    p.add_argument("--actor", required=True, help="the parent account making the change")
    p.add_argument("--card", required=True)
    p.add_argument("--station", action="append", default=[], help="a station id (repeatable)")
    p.add_argument("--product", action="append", default=[], help=f"one of {', '.join(PRODUCTS)}")
    p.add_argument("--circle", action="append", default=[], help="a geo-fence LAT,LON,RADIUS_M")
    p.add_argument("--hours", action="append", default=[], help="a window HH:MM-HH:MM (Beijing)")
    p.set_defaults(admin_func=scope_set)

    p = groups.add_parser("topup", parents=[c], help="batch top-up (批量充值) of sub-accounts from a "
                          "parent, from a CSV file (account_id,amount_yuan[,label]) and/or --line; "
                          "shows a preview and asks before moving money")
    p.add_argument("--parent", required=True)
    p.add_argument("--csv", type=Path)
    p.add_argument("--line", action="append", default=[], metavar="ACCOUNT=YUAN")
    p.add_argument("--yes", action="store_true", help="do not ask (scripts)")
    p.add_argument("--show", type=int, default=20, help="preview lines shown (default 20)")
    p.set_defaults(admin_func=top_up)

    g = groups.add_parser("breaks", help="reconciliation breaks").add_subparsers(
        dest="breaks_command", required=True)
    p = g.add_parser("list", parents=[c], help="open breaks, newest first")
    p.add_argument("--all", action="store_true", help="resolved ones too")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(admin_func=breaks_list)
    p = g.add_parser("resolve", parents=[c])
    p.add_argument("break_id")
    p.add_argument("--resolution", required=True)
    p.set_defaults(admin_func=breaks_resolve)

    g = groups.add_parser("exceptions", help="settlement exceptions (refund shortfalls)").add_subparsers(
        dest="exceptions_command", required=True)
    p = g.add_parser("list", parents=[c], help="open exceptions, newest first")
    p.add_argument("--all", action="store_true", help="resolved ones too")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(admin_func=exceptions_list)
    p = g.add_parser("resolve", parents=[c])
    p.add_argument("exception_id")
    p.add_argument("--resolution", required=True)
    p.set_defaults(admin_func=exceptions_resolve)

    g = groups.add_parser("rules", help="the risk engine's rule sets").add_subparsers(
        dest="rules_command", required=True)
    p = g.add_parser("show", parents=[c], help="the rule set in force")
    p.set_defaults(admin_func=rules_show)
    p = g.add_parser("load", parents=[c], help="validate a rule set (TOML or .json) and put it in force")
    p.add_argument("file", type=Path)
    p.set_defaults(admin_func=rules_load)
    p = g.add_parser("activate", parents=[c], help="put a stored version back in force (a rollback)")
    p.add_argument("version", type=int)
    p.set_defaults(admin_func=rules_activate)

    g = groups.add_parser("reviews", help="holds the risk engine suspended").add_subparsers(
        dest="reviews_command", required=True)
    p = g.add_parser("list", parents=[c], help="the queue, oldest first")
    p.add_argument("--limit", type=int, default=1000)
    p.set_defaults(admin_func=reviews_list)
    for verb in ("approve", "reject"):
        p = g.add_parser(verb, parents=[c])
        p.add_argument("hold_id")
        p.add_argument("--note", help="why")
        p.set_defaults(admin_func=reviews_decide)

    g = groups.add_parser("principal", help="who may log in to the JSON API (fuelcard-api)"
                          ).add_subparsers(dest="principal_command", required=True)
    p = g.add_parser("add", help="a holder or fleet manager with authority over an account "
                     "(straight on the database); asks for the password")
    p.add_argument("--database-url", dest="database_url", help="env FUELCARD_DATABASE_URL")
    p.add_argument("--login", required=True, help="what the person types to log in")
    p.add_argument("--kind", required=True, choices=("holder", "fleet_manager"))
    p.add_argument("--account", required=True, help="the account it has authority over (and its "
                   "sub-accounts)")
    p.add_argument("--phone", help="where its step-up codes go")
    p.add_argument("--password-stdin", dest="password_stdin", action="store_true",
                   help="read the password from the first line of stdin")
    p.add_argument("--json", action="store_true")
    p.set_defaults(admin_func=None, principal=True)
    p = g.add_parser("disable", help="stop a principal from logging in and end its sessions")
    p.add_argument("--database-url", dest="database_url", help="env FUELCARD_DATABASE_URL")
    p.add_argument("--login", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(admin_func=None, principal=True)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run one `fuelcard admin` command: 0 done, 1 refused by the server
    (or declined at the prompt), 2 a usage problem."""
    out = out or sys.stdout
    try:
        if getattr(args, "principal", False):
            return principal_add(args, out)
        admin = connect(args)
        try:
            code: int = args.admin_func(admin, args, out)
            return code
        finally:
            admin.channel.close()
    except UsageError as exc:
        print(f"fuelcard admin: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"fuelcard admin: {describe(exc)}", file=sys.stderr)
        return 1


def describe(exc: grpc.RpcError) -> str:
    """The status, its reason and the fields at fault (never the request)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code = exc.code() if isinstance(exc, grpc.Call) else None
    text = f"{code.name if code else 'ERROR'}"
    status = rpc_status.from_call(exc) if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else ""
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                text += f" {info.reason}"
            elif detail.Unpack(bad):
                details += "; " + "; ".join(f"{v.field}: {v.description}" for v in bad.field_violations)
    return f"{text}: {details}" if details else text
