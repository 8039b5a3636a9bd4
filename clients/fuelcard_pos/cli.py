"""`fuelcard-pos`: the POS client from a shell.

    fuelcard-pos [--target HOST:PORT] [--ca FILE --cert FILE --key FILE]
                 [--state FILE] [--deadline-s S] [--json] COMMAND ...

Commands: authorize, confirm, cancel, reverse (an Authorize by its request id,
冲正), balance, hold, sign-on, and the outbox's
`outbox list|retry|drop|flush` (`outbox-flush` is `outbox flush`).
Output is human-readable by default; with --json (anywhere on the command
line, before or after the command), exactly one JSON object goes to stdout
(responses as google.protobuf.json_format.MessageToDict with the proto field
names, plus "request_id"; errors as {"error": {...}}).

Request ids: authorize, confirm and cancel print the request id they sent,
answered or not (with --json, "request_id"). When an answer is lost (a
timeout, the link dropped), send the same command again with
`--request-id ID`: the server applies a request id once and answers every
resend with the first answer, so the resend never makes a second hold or a
second sale.

PIN: `authorize ... --pin` asks for the card's PIN on the terminal (getpass,
not echoed); `--pin-stdin` reads it from the first line of stdin. A PIN given
as `--pin VALUE` is refused (it would show in `ps` and the shell history).
The PIN is only ever sent as an SM4 PIN block under the terminal's PIN key
(fuelcard_pos.pin), so it needs the terminal certificate; it is never printed
or logged.

A closed stdout (`fuelcard-pos outbox list | head -1`) is not an error: the
rest of the output is dropped and the exit code is still the command's.

Secure link: --ca (the CA of the server's certificate), --cert and --key (the
terminal's certificate and key; env FUELCARD_POS_CA, FUELCARD_POS_CERT,
FUELCARD_POS_KEY) make the command a terminal on mutual TLS: it signs on for
its working key when needed and MACs authorize, confirm and cancel. The
certificate names the terminal and its station (authorize's --terminal and
--station default to them). The counter and the working key are kept in
--state (env FUELCARD_POS_STATE; default: the outbox file), a file only its
owner can read; the key is never printed. Without --cert the link is
plaintext, for development against a loopback server, and nothing is MACed.

Card numbers are only ever shown masked ("6222 **** **** 1234"), including
the one given on the command line: everything this program prints, argparse's
own messages included, passes through a scrubber first.

Exit codes:
    0  approved / ok
    1  declined (a business decline: insufficient funds, card blocked, ...)
    2  usage error or INVALID_ARGUMENT
    3  any other RPC error (NOT_FOUND, FAILED_PRECONDITION, UNAVAILABLE, ...)
    4  pending: the confirm/cancel could not be delivered and is kept in the
       outbox; `fuelcard-pos outbox-flush` delivers it
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import getpass
import json
import os
import re
import sqlite3
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from fuelcard.v1 import common_pb2, transaction_pb2
from google.protobuf import json_format
from google.protobuf.message import Message

from fuelcard_pos.client import (
    DEFAULT_DEADLINE_S,
    DEFAULT_TARGET,
    MAX_RESIGNS,
    PosClient,
    PosError,
    PosPending,
    RetryPolicy,
    mask_card_number,
    new_request_id,
)
from fuelcard_pos.outbox import FlushReport, Outbox, OutboxEntry
from fuelcard_pos.pin import PIN_MAX_DIGITS, PIN_MIN_DIGITS, encrypt_pin_block, valid_pin
from fuelcard_pos.terminal import certificate_identity, sign

EXIT_OK = 0
EXIT_DECLINED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_PENDING = 4

TARGET_ENV = "FUELCARD_TARGET"
OUTBOX_ENV = "FUELCARD_POS_OUTBOX"
CA_ENV = "FUELCARD_POS_CA"
CERT_ENV = "FUELCARD_POS_CERT"
KEY_ENV = "FUELCARD_POS_KEY"
STATE_ENV = "FUELCARD_POS_STATE"

PRODUCTS: dict[str, common_pb2.Product.ValueType] = {
    "92": common_pb2.PRODUCT_GASOLINE_92,
    "92#": common_pb2.PRODUCT_GASOLINE_92,
    "95": common_pb2.PRODUCT_GASOLINE_95,
    "95#": common_pb2.PRODUCT_GASOLINE_95,
    "98": common_pb2.PRODUCT_GASOLINE_98,
    "98#": common_pb2.PRODUCT_GASOLINE_98,
    "0": common_pb2.PRODUCT_DIESEL_0,
    "0#": common_pb2.PRODUCT_DIESEL_0,
    "0#diesel": common_pb2.PRODUCT_DIESEL_0,
    "diesel": common_pb2.PRODUCT_DIESEL_0,
    "-10": common_pb2.PRODUCT_DIESEL_MINUS_10,
    "-10#": common_pb2.PRODUCT_DIESEL_MINUS_10,
    "-10#diesel": common_pb2.PRODUCT_DIESEL_MINUS_10,
    "gas": common_pb2.PRODUCT_GAS,
    "lng": common_pb2.PRODUCT_GAS,
    "cng": common_pb2.PRODUCT_GAS,
    "shop": common_pb2.PRODUCT_SHOP,
}
# Long digit runs are card numbers (16-19 digits) until proven otherwise.
_DIGIT_RUN = re.compile(r"(?<!\d)\d{16,19}(?!\d)")
_CARDISH_ARG = re.compile(r"\d[\d\s-]{10,}\d")


class Output:
    """Everything printed goes through here, and is scrubbed of card numbers."""

    def __init__(self, secrets: Sequence[str], stdout: IO[str] | None = None,
                 stderr: IO[str] | None = None) -> None:
        # longest first, so a number is masked whole and not a piece of it
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._closed: set[IO[str]] = set()

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, mask_card_number(secret))
        return _DIGIT_RUN.sub(lambda m: mask_card_number(m.group(0)), text)

    def out(self, text: str) -> None:
        self._write(self._stdout, self.scrub(text) + "\n")

    def err(self, text: str) -> None:
        self._write(self._stderr, self.scrub(text) + "\n")

    def raw(self, text: str, to_stderr: bool) -> None:
        self._write(self._stderr if to_stderr else self._stdout, self.scrub(text))

    def _write(self, stream: IO[str], text: str) -> None:
        """Write and flush; a reader that went away (`| head -1`) ends the
        output, not the command: a confirm whose answer nobody reads has
        still been made, and the exit code must still say how it went."""
        if stream in self._closed:
            return
        try:
            stream.write(text)
            stream.flush()
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EINVAL):
                raise
            self._closed.add(stream)
            _discard_rest(stream)


def _discard_rest(stream: IO[str]) -> None:
    """Point a closed stream's file descriptor at /dev/null, so that what is
    still buffered (flushed again at exit) goes nowhere instead of raising
    BrokenPipeError from the interpreter's shutdown."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return  # not a file (e.g. a StringIO in tests): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _cardish_args(argv: Sequence[str]) -> list[str]:
    """Arguments that might be card numbers, to mask wherever they show up."""
    found: list[str] = []
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if _CARDISH_ARG.fullmatch(value.strip()):
            found.append(value.strip())
            digits = re.sub(r"\D", "", value)
            if digits != value.strip():
                found.append(digits)
    return found


# -- argument parsing -------------------------------------------------------

def _product(text: str) -> common_pb2.Product.ValueType:
    key = text.strip().lower().replace(" ", "")
    if key in PRODUCTS:
        return PRODUCTS[key]
    name = text.strip().upper()
    for candidate in (name, f"PRODUCT_{name}"):
        try:
            value = common_pb2.Product.Value(candidate)
        except ValueError:
            continue
        if value != common_pb2.PRODUCT_UNSPECIFIED:
            return value
    raise argparse.ArgumentTypeError(
        f"unknown product {text!r}; use one of {', '.join(sorted(PRODUCTS))}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def default_outbox_path() -> Path:
    if os.environ.get(OUTBOX_ENV):
        return Path(os.environ[OUTBOX_ENV])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fuelcard-pos" / "outbox.sqlite3"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class UsageError(Exception):
    """A command line that cannot work (exit 2), found after parsing."""


@dataclass(frozen=True)
class Link:
    """How to reach the server: plaintext (no cert) or a terminal on mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    state: Path | None = None
    terminal_id: str = ""
    station_id: str = ""

    @property
    def secure(self) -> bool:
        return self.cert is not None


def resolve_link(args: argparse.Namespace) -> Link:
    """The link the options and environment ask for, checked before any
    call: the files exist and the certificate names a terminal."""
    ca, cert, key = args.ca, args.cert, args.key
    if cert is None and key is None:
        if ca is not None:
            raise UsageError("--ca (FUELCARD_POS_CA) needs --cert and --key: a terminal connects "
                             "with its own certificate; without all three the link is plaintext "
                             "(development)")
        return Link()
    if cert is None or key is None:
        raise UsageError("--cert and --key go together (FUELCARD_POS_CERT, FUELCARD_POS_KEY)")
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag}: no such file: {path}")
    try:
        role, name, scope = certificate_identity(cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--cert: not a PEM certificate: {cert} ({exc})") from None
    if role != "pos" or not name:
        raise UsageError(f"--cert: {cert} is not a POS terminal certificate")
    state = args.state or getattr(args, "outbox", None) or default_outbox_path()
    return Link(ca, cert, key, state, name, scope)


def _has_cert(argv: Sequence[str]) -> bool:
    """Whether a terminal certificate is configured (--cert or its env), to
    know before parsing whether authorize may take --station and --terminal
    from it."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--cert", default=os.environ.get(CERT_ENV) or None)
    try:
        known, _ = pre.parse_known_args(list(argv))
    except argparse.ArgumentError:
        return False  # the real parser reports it
    return bool(known.cert)


# The value of a bare `--pin`: ask. Not a possible PIN (PINs are digits).
_ASK_PIN = "ask"


def build_parser(output: Output, terminal_cert: bool = False) -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def _print_message(self, message: str, file: object = None) -> None:
            if message:
                output.raw(message, to_stderr=file is not sys.stdout)

    parser = Parser(
        prog="fuelcard-pos",
        description="POS client of the fuelcard transaction server.",
        epilog="exit codes: 0 ok, 1 declined, 2 usage/invalid argument, 3 other RPC error, "
               "4 pending in the outbox")
    parser.add_argument("--target", default=os.environ.get(TARGET_ENV) or DEFAULT_TARGET,
                        help=f"server HOST:PORT (env {TARGET_ENV}; default {DEFAULT_TARGET})")
    parser.add_argument("--deadline-s", type=_positive_float, default=DEFAULT_DEADLINE_S,
                        help="deadline of each attempt, in seconds (default %(default)s)")
    parser.add_argument("--max-attempts", type=_positive_int, default=RetryPolicy.max_attempts,
                        help="attempts per call on retryable errors (default %(default)s)")
    parser.add_argument("--total-timeout-s", type=_positive_float,
                        default=RetryPolicy.total_timeout_s,
                        help="time budget per call, retries included (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (also accepted after the command)")
    parser.add_argument("--ca", type=Path, default=_env_path(CA_ENV), metavar="FILE",
                        help=f"CA certificate (PEM) the server's certificate must chain to "
                             f"(env {CA_ENV})")
    parser.add_argument("--cert", type=Path, default=_env_path(CERT_ENV), metavar="FILE",
                        help=f"this terminal's certificate (PEM); without it the link is "
                             f"plaintext, for development (env {CERT_ENV})")
    parser.add_argument("--key", type=Path, default=_env_path(KEY_ENV), metavar="FILE",
                        help=f"this terminal's private key (PEM) (env {KEY_ENV})")
    parser.add_argument("--state", type=Path, default=_env_path(STATE_ENV), metavar="FILE",
                        help=f"the terminal's counter and working key (env {STATE_ENV}; "
                             "default: the outbox file)")
    # --json after the command too: each command's parser knows it, with no
    # default of its own, so that it never resets a --json given before.
    json_anywhere = argparse.ArgumentParser(add_help=False)
    json_anywhere.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                               help="print one JSON object")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)

    def command(name: str, help_text: str, group: Any = commands) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = group.add_parser(name, help=help_text,
                                                         parents=[json_anywhere])
        return made

    def outbox_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--outbox", type=Path, default=None,
                       help=f"outbox file (env {OUTBOX_ENV}; default {default_outbox_path()})")

    p = command("authorize", "reserve an amount before the nozzle is lifted")
    p.add_argument("card", metavar="CARD", help="card number (never printed)")
    p.add_argument("amount_fen", metavar="AMOUNT_FEN", type=int, help="amount to reserve, in fen")
    p.add_argument("--station", required=not terminal_cert, default=None,
                   help="station id (with --cert: default the certificate's)")
    p.add_argument("--terminal", required=not terminal_cert, default=None,
                   help="terminal id (with --cert: default the certificate's)")
    p.add_argument("--nozzle", type=int, default=1, help="nozzle number (default 1)")
    p.add_argument("--product", type=_product, default=common_pb2.PRODUCT_GASOLINE_92,
                   help="92|95|98|0#diesel|-10#diesel|gas|shop (default 92)")
    p.add_argument("--request-id", default=None,
                   help="idempotency key (default: a new UUID); give the printed one again to "
                        "resend a request whose answer was lost")
    p.add_argument("--pin", nargs="?", const=_ASK_PIN, default=None, metavar=_ASK_PIN,
                   help="ask for the card's PIN (not echoed; needs --cert)")
    p.add_argument("--pin-stdin", action="store_true",
                   help="read the card's PIN from the first line of stdin (needs --cert)")

    p = command("confirm", "settle a hold for the amount delivered")
    p.add_argument("hold_id", metavar="HOLD_ID")
    p.add_argument("final_fen", metavar="FINAL_FEN", type=int, help="amount delivered, in fen")
    p.add_argument("--volume-ml", type=int, default=0, help="volume delivered, ml")
    p.add_argument("--unit-price-fen", type=int, default=0, help="price per litre, fen")
    p.add_argument("--request-id", default=None,
                   help="idempotency key (default: a new UUID); give the printed one again to "
                        "resend a request whose answer was lost")
    outbox_options(p)
    p.add_argument("--no-outbox", action="store_true",
                   help="fail instead of queueing when the server cannot be reached")

    p = command("cancel", "release a hold")
    p.add_argument("hold_id", metavar="HOLD_ID")
    p.add_argument("--request-id", default=None,
                   help="idempotency key (default: a new UUID); give the printed one again to "
                        "resend a request whose answer was lost")
    outbox_options(p)
    p.add_argument("--no-outbox", action="store_true",
                   help="fail instead of queueing when the server cannot be reached")

    p = command("reverse", "reverse an Authorize whose answer was lost, by its request id (冲正)")
    p.add_argument("original_request_id", metavar="AUTHORIZE_REQUEST_ID")
    p.add_argument("--request-id", default=None,
                   help="idempotency key of the reversal itself (default: a new UUID)")
    outbox_options(p)
    p.add_argument("--no-outbox", action="store_true",
                   help="fail instead of queueing when the server cannot be reached")

    p = command("balance", "the balance behind a card")
    p.add_argument("card", metavar="CARD", help="card number (never printed)")

    p = command("hold", "read a hold")
    p.add_argument("hold_id", metavar="HOLD_ID")

    p = command("outbox-flush", "deliver queued confirms and cancels (= outbox flush)")
    outbox_options(p)

    p = command("outbox", "list, deliver, retry or drop queued confirms and cancels")
    actions = p.add_subparsers(dest="outbox_command", required=True, metavar="ACTION",
                               parser_class=Parser)
    p = command("list", "the entries, oldest first, with their request ids and last errors",
                actions)
    outbox_options(p)
    p.add_argument("--state", choices=("pending", "failed"), default=None,
                   help="only pending or only failed entries")
    p = command("flush", "deliver the pending entries in order (failed ones stay)", actions)
    outbox_options(p)
    p = command("retry", "send entries again now, failed ones included; delivered ones leave",
                actions)
    outbox_options(p)
    p.add_argument("entry_ids", metavar="ENTRY_ID", type=int, nargs="*",
                   help="the entries to send (default: all, oldest first)")
    p = command("drop", "remove entries (an operator has dealt with them)", actions)
    outbox_options(p)
    p.add_argument("entry_ids", metavar="ENTRY_ID", type=int, nargs="+")
    p.add_argument("--force", action="store_true",
                   help="also drop pending entries: a dropped confirm is a sale the server "
                        "never books")

    command("sign-on", "sign on now (needs --cert): fetch the working key and re-sync the "
                       "counter (the key is never shown)")
    return parser


# -- rendering --------------------------------------------------------------

def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True,
                                     unquote_int64_if_possible=True)


def yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d} CNY"


def _enum(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def decline_name(value: common_pb2.DeclineReason.ValueType) -> str:
    return _enum(common_pb2.DeclineReason.Name(value), "DECLINE_REASON_")


def state_name(value: common_pb2.HoldState.ValueType) -> str:
    return _enum(common_pb2.HoldState.Name(value), "HOLD_STATE_")


def product_name(value: common_pb2.Product.ValueType) -> str:
    return _enum(common_pb2.Product.Name(value), "PRODUCT_")


def error_dict(exc: PosError) -> dict[str, Any]:
    return {
        "code": exc.code.name,
        "reason": exc.reason,
        "message": exc.message,
        "field_violations": [{"field": v.field, "description": v.description,
                              "reason": v.reason} for v in exc.field_violations],
        "attempts": exc.attempts,
        "request_id": exc.request_id or "",
    }


def hold_lines(hold: common_pb2.Hold) -> list[str]:
    lines = [
        f"  hold       {hold.hold_id}",
        f"  state      {state_name(hold.state)}",
        f"  card       {hold.masked_card_number}",
        f"  reserved   {yuan(hold.amount_fen)}",
    ]
    if hold.state == common_pb2.HOLD_STATE_CONFIRMED:
        lines.append(f"  settled    {yuan(hold.settled_fen)}"
                     + ("  (confirmed late)" if hold.confirmed_late else ""))
        lines.append(f"  volume     {hold.volume_ml / 1000:.3f} L at {yuan(hold.unit_price_fen)}/L")
        lines.append(f"  points     {hold.points_earned}")
    lines.append(f"  where      station {hold.station_id}, terminal {hold.terminal_id}, "
                 f"nozzle {hold.nozzle}, {product_name(hold.product)}")
    if hold.HasField("expire_time") and hold.state == common_pb2.HOLD_STATE_AUTHORIZED:
        lines.append(f"  expires    {hold.expire_time.ToJsonString()}")
    if hold.HasField("close_time"):
        lines.append(f"  closed     {hold.close_time.ToJsonString()}")
    return lines


class Command:
    """One invocation: parsed arguments, output, and the client."""

    def __init__(self, args: argparse.Namespace, output: Output, link: Link) -> None:
        self.args = args
        self.output = output
        self.link = link
        self.json: bool = args.json
        # Chosen here, before anything is sent, so that it can be printed
        # whatever becomes of the call (answered, refused, or lost).
        self.request_id: str = getattr(args, "request_id", None) or new_request_id()

    def client(self, outbox: Outbox | None = None) -> PosClient:
        link = self.link
        return PosClient(self.args.target, deadline_s=self.args.deadline_s,
                         retry=RetryPolicy(max_attempts=self.args.max_attempts,
                                           total_timeout_s=self.args.total_timeout_s),
                         outbox=outbox, ca_file=link.ca, cert_file=link.cert, key_file=link.key,
                         state=link.state if link.secure else None)

    def emit(self, obj: dict[str, Any], human: Sequence[str]) -> None:
        if self.json:
            self.output.out(json.dumps(obj, ensure_ascii=False, sort_keys=False))
        else:
            for line in human:
                self.output.out(line)

    @property
    def mutating(self) -> bool:
        return self.args.command in MUTATING

    def fail(self, exc: PosError) -> int:
        code = EXIT_USAGE if exc.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_ERROR
        request_id = exc.request_id or (self.request_id if self.mutating else "")
        if self.json:
            error = {**error_dict(exc), "request_id": request_id}
            obj: dict[str, Any] = {"error": error}
            if request_id:
                obj["request_id"] = request_id
            self.output.out(json.dumps(obj, ensure_ascii=False))
        else:
            self.output.err(f"error: {exc.code.name}"
                            + (f" {exc.reason}" if exc.reason else "")
                            + (f": {exc.message}" if exc.message else ""))
            for v in exc.field_violations:
                self.output.err(f"  {v.field}: {v.description}"
                                + (f" ({v.reason})" if v.reason else ""))
            if request_id:
                self.output.err(f"  request_id {request_id}")
                if exc.resendable:
                    self.output.err(f"  the answer may be lost: send the same command again with "
                                    f"--request-id {request_id} (the server answers it once)")
        return code

    def emit_answer(self, message: Message, human: list[str]) -> None:
        """A mutating call's answer, with the request id it was sent under."""
        self.emit({**to_dict(message), "request_id": self.request_id},
                  [*human, f"  request_id {self.request_id}"])

    def pending(self, p: PosPending, outbox_path: Path) -> int:
        self.emit(
            {"pending": True, "operation": p.operation, "hold_id": p.hold_id,
             "request_id": p.request_id, "outbox": str(outbox_path),
             "outbox_entry_id": p.outbox_entry_id, "error": error_dict(p.cause)},
            [f"PENDING  {p.operation} of hold {p.hold_id} could not be delivered "
             f"({p.cause.code.name}); kept in the outbox",
             f"  outbox     {outbox_path} (entry {p.outbox_entry_id})",
             f"  request_id {p.request_id}",
             "  run `fuelcard-pos outbox-flush` to deliver it"])
        return EXIT_PENDING

    def outbox_path(self) -> Path:
        path: Path | None = self.args.outbox
        return path if path is not None else default_outbox_path()

    # -- commands ----------------------------------------------------------

    def authorize(self) -> int:
        a = self.args
        station = a.station if a.station is not None else self.link.station_id or None
        terminal = a.terminal if a.terminal is not None else self.link.terminal_id or None
        missing = [flag for flag, value in (("--station", station), ("--terminal", terminal))
                   if value is None]
        if missing:
            raise UsageError("authorize: the following arguments are required: "
                             + ", ".join(missing))
        assert station is not None and terminal is not None
        pin = self.read_pin()
        try:
            if pin is None:
                with self.client() as client:
                    r = client.authorize(a.card, a.amount_fen, station, terminal, a.nozzle,
                                         a.product, request_id=self.request_id)
            else:
                with self.pin_client() as pin_client:
                    r = pin_client.authorize_with_pin(
                        a.card, pin, a.amount_fen, station, terminal, a.nozzle, a.product,
                        request_id=self.request_id)
        finally:
            if pin is not None:
                pin[:] = bytes(len(pin))  # wiped: it is no longer needed anywhere
        approved = r.decision == common_pb2.DECISION_APPROVED
        if approved:
            human = ["APPROVED", *hold_lines(r.hold), f"  available  {yuan(r.available_fen)}"]
        elif r.decision == common_pb2.DECISION_REVIEW:   # risk engine: suspended (暂挂)
            human = ["AWAITING REVIEW  do not deliver; check the hold until it is AUTHORIZED",
                     *hold_lines(r.hold)]
        else:
            human = [f"DECLINED  {decline_name(r.decline_reason)}",
                     f"  card       {mask_card_number(a.card)}",
                     f"  asked      {yuan(a.amount_fen)}",
                     f"  available  {yuan(r.available_fen)}"]
        self.emit_answer(r, human)
        return EXIT_OK if approved else EXIT_DECLINED

    def read_pin(self) -> bytearray | None:
        """The PIN asked for by --pin or --pin-stdin, as a bytearray the
        caller wipes; None without them. Never echoed, printed or logged."""
        a = self.args
        if a.pin is None and not a.pin_stdin:
            return None
        if a.pin is not None and a.pin != _ASK_PIN:
            raise UsageError("--pin takes no value (a PIN on the command line shows in ps and the "
                             "shell history): give --pin alone to be asked, or --pin-stdin")
        if a.pin is not None and a.pin_stdin:
            raise UsageError("--pin and --pin-stdin: choose one")
        if not self.link.secure:
            raise UsageError("a PIN needs the terminal certificate (--ca, --cert, --key): it is "
                             "sent only as a PIN block under the terminal's PIN key")
        if a.pin_stdin:
            pin = bytearray(sys.stdin.buffer.readline().rstrip(b"\r\n"))
        else:
            with warnings.catch_warnings():
                # getpass falls back to an echoing read from stdin when there
                # is no terminal; a PIN must never be echoed, so refuse that.
                warnings.simplefilter("error", getpass.GetPassWarning)
                try:
                    pin = bytearray(getpass.getpass("PIN: ").encode())
                except getpass.GetPassWarning:
                    raise UsageError("--pin needs a terminal to ask on (its input is not "
                                     "echoed); use --pin-stdin") from None
                except EOFError:
                    raise UsageError("no PIN was entered") from None
        if not valid_pin(pin):
            pin[:] = bytes(len(pin))
            raise UsageError(f"a PIN is {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits")
        return pin

    def pin_client(self) -> PinTerminal:
        link = self.link
        return PinTerminal(self.args.target, deadline_s=self.args.deadline_s,
                           retry=RetryPolicy(max_attempts=self.args.max_attempts,
                                             total_timeout_s=self.args.total_timeout_s),
                           ca_file=link.ca, cert_file=link.cert, key_file=link.key,
                           state=link.state)

    def _with_outbox(self, send: Callable[[PosClient], int]) -> int:
        if self.args.no_outbox:
            with self.client() as client:
                return send(client)
        path = self.outbox_path()
        with Outbox(path) as outbox, self.client(outbox) as client:
            try:
                return send(client)
            except PosPending as p:
                return self.pending(p, path)

    def confirm(self) -> int:
        a = self.args

        def send(client: PosClient) -> int:
            r = client.confirm(a.hold_id, a.final_fen, a.volume_ml, a.unit_price_fen,
                               request_id=self.request_id)
            return self._confirmed(r)

        return self._with_outbox(send)

    def _confirmed(self, r: transaction_pb2.ConfirmResponse) -> int:
        approved = r.decision == common_pb2.DECISION_APPROVED
        if approved:
            human = [f"APPROVED  {state_name(r.hold.state)}", *hold_lines(r.hold),
                     f"  earned     {r.points_earned} points",
                     f"  balance    {yuan(r.balance_fen)}"]
        else:
            human = [f"DECLINED  {decline_name(r.decline_reason)}", *hold_lines(r.hold),
                     f"  settlement exception {r.settlement_exception_id}: the driver must "
                     "pay another way"]
        self.emit_answer(r, human)
        return EXIT_OK if approved else EXIT_DECLINED

    def cancel(self) -> int:
        a = self.args

        def send(client: PosClient) -> int:
            r = client.cancel(a.hold_id, request_id=self.request_id)
            self.emit_answer(r, [f"OK  {state_name(r.hold.state)}", *hold_lines(r.hold)])
            return EXIT_OK

        return self._with_outbox(send)

    def reverse(self) -> int:
        a = self.args

        def send(client: PosClient) -> int:
            r = client.reverse_authorization(a.original_request_id, request_id=self.request_id)
            outcome = transaction_pb2.ReversalOutcome.Name(r.outcome).removeprefix(
                "REVERSAL_OUTCOME_")
            lines = [f"OK  {outcome}"]
            if r.HasField("hold"):
                lines += hold_lines(r.hold)
            self.emit_answer(r, lines)
            return EXIT_OK

        return self._with_outbox(send)

    def balance(self) -> int:
        with self.client() as client:
            r = client.balance(self.args.card)
        self.emit(to_dict(r), [
            f"card       {r.masked_card_number}",
            f"account    {r.account_id}",
            f"balance    {yuan(r.balance.balance_fen)}",
            f"held       {yuan(r.balance.held_fen)}",
            f"available  {yuan(r.balance.available_fen)}",
            f"points     {r.points_balance}",
        ])
        return EXIT_OK

    def hold(self) -> int:
        with self.client() as client:
            h = client.get_hold(self.args.hold_id)
        self.emit(to_dict(h), hold_lines(h))
        return EXIT_OK

    def sign_on(self) -> int:
        if not self.link.secure:
            raise UsageError("sign-on needs a terminal certificate (--ca, --cert, --key)")
        with self.client() as client:
            e = client.sign_on()
        self.emit(
            {"terminal_id": e.terminal_id, "station_id": self.link.station_id,
             "key_version": e.key_version, "valid_from": e.valid_from.isoformat(),
             "valid_until": e.valid_until.isoformat(),
             "server_last_counter": e.server_last_counter, "counter": e.counter,
             "state": str(self.link.state)},
            [f"SIGNED ON  terminal {e.terminal_id}, station {self.link.station_id}",
             f"  key        version {e.key_version}, valid {e.valid_from.isoformat()} "
             f"until {e.valid_until.isoformat()}",
             f"  counter    {e.counter} (server's last {e.server_last_counter})",
             f"  state      {self.link.state}"])
        return EXIT_OK

    def outbox_flush(self) -> int:
        path = self.outbox_path()
        with Outbox(path) as outbox, self.client(outbox) as client:
            report = outbox.flush(client)
            failed_total = len(outbox.failed())
        self.emit(flush_dict(report, path, failed_total), flush_lines(report, path, failed_total))
        return EXIT_OK if report.complete else EXIT_ERROR

    def outbox(self) -> int:
        return OUTBOX_ACTIONS[self.args.outbox_command](self)

    def outbox_list(self) -> int:
        path = self.outbox_path()
        with Outbox(path) as outbox:
            entries = outbox.entries(self.args.state)
        pending = sum(e.state == "pending" for e in entries)
        self.emit({"outbox": str(path), "entries": [_listed_dict(e) for e in entries]},
                  [f"outbox {path}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                   f"({pending} pending, {len(entries) - pending} failed)",
                   *(_listed_line(e) for e in entries)])
        return EXIT_OK

    def outbox_retry(self) -> int:
        """Send the chosen entries (or all) again now, in order, failed ones
        included: for an operator who has fixed what made them fail. A
        delivered entry leaves the outbox; one that fails again stays as it
        was; a link still down stops the run (nothing overtakes an entry)."""
        path = self.outbox_path()
        delivered: list[tuple[OutboxEntry, Message]] = []
        errors: list[tuple[OutboxEntry, PosError]] = []
        with Outbox(path) as outbox, self.client() as client:
            chosen, not_found = _choose(outbox.entries(), self.args.entry_ids)
            not_tried = list(chosen)
            for entry in chosen:
                not_tried.remove(entry)
                request = entry.request
                try:
                    response: Message
                    if isinstance(request, transaction_pb2.ConfirmRequest):
                        response = client.send_confirm(request, queue=False)
                    elif isinstance(request, transaction_pb2.ReverseAuthorizationRequest):
                        response = client.send_reversal(request, queue=False)
                    else:
                        response = client.send_cancel(request, queue=False)
                except PosError as exc:
                    errors.append((entry, exc))
                    if exc.resendable:
                        break
                    continue
                outbox.discard(entry.id)
                delivered.append((entry, response))
        lines = [f"outbox {path}: delivered {len(delivered)}, failed again {len(errors)}"
                 + (f", not tried {len(not_tried)}" if not_tried else "")]
        lines += [f"  delivered  entry {e.id} {e.operation} hold {e.hold_id} "
                  f"(request_id {e.request_id})" for e, _ in delivered]
        lines += [f"  FAILED     entry {e.id} {e.operation} hold {e.hold_id} "
                  f"(request_id {e.request_id}): {exc}" for e, exc in errors]
        lines += [f"  no entry {n}" for n in not_found]
        self.emit({"outbox": str(path),
                   "delivered": [{**_entry_dict(e), "response": to_dict(r)} for e, r in delivered],
                   "failed": [{**_entry_dict(e), "error": error_dict(exc)} for e, exc in errors],
                   "not_tried": [_entry_dict(e) for e in not_tried],
                   "not_found": not_found}, lines)
        return EXIT_OK if not (errors or not_found or not_tried) else EXIT_ERROR

    def outbox_drop(self) -> int:
        path = self.outbox_path()
        dropped: list[OutboxEntry] = []
        refused: list[OutboxEntry] = []
        with Outbox(path) as outbox:
            chosen, not_found = _choose(outbox.entries(), self.args.entry_ids)
            for entry in chosen:
                if entry.state == "pending" and not self.args.force:
                    refused.append(entry)
                elif outbox.discard(entry.id):
                    dropped.append(entry)
                else:
                    not_found.append(entry.id)  # dropped meanwhile by another process
        lines = [f"outbox {path}: dropped {len(dropped)}"]
        lines += [f"  dropped    entry {e.id} {e.state} {e.operation} hold {e.hold_id} "
                  f"(request_id {e.request_id})" for e in dropped]
        lines += [f"  kept       entry {e.id} {e.operation} hold {e.hold_id}: still pending, not "
                  "delivered yet (--force drops it: the server never gets it)" for e in refused]
        lines += [f"  no entry {n}" for n in not_found]
        self.emit({"outbox": str(path), "dropped": [_listed_dict(e) for e in dropped],
                   "refused_pending": [_entry_dict(e) for e in refused],
                   "not_found": not_found}, lines)
        if refused:
            return EXIT_USAGE
        return EXIT_ERROR if not_found else EXIT_OK


class PinTerminal(PosClient):
    """A PosClient that authorizes with a PIN block. The block is made under
    the PIN key of the very working key the request is signed with, and made
    again if a refused key or counter makes the client sign on and re-sign:
    a block under a stale key would decode to garbage and count as a wrong
    PIN toward the card's lock."""

    def __enter__(self) -> PinTerminal:
        return self

    def authorize_with_pin(self, card_number: str, pin: bytearray, amount_fen: int,
                           station_id: str, terminal_id: str, nozzle: int,
                           product: common_pb2.Product.ValueType, *, request_id: str
                           ) -> transaction_pb2.AuthorizeResponse:
        if self.store is None or self.terminal_id is None:
            raise UsageError("a PIN needs the terminal certificate (--cert)")
        request = transaction_pb2.AuthorizeRequest(
            request_id=request_id, card_number=card_number, amount_fen=amount_fen,
            station_id=station_id, terminal_id=terminal_id, nozzle=nozzle, product=product)
        resigns = 0
        while True:
            key = self._working_key(None)
            request.pin_block = encrypt_pin_block(key, pin, card_number)
            signed = sign(request, key, self.store.reserve(self.terminal_id))
            try:
                return self._call("Authorize", self._stub.Authorize, signed, request_id, None)
            except PosError as exc:
                if resigns >= MAX_RESIGNS or not self._resync(exc, key, None):
                    raise
            resigns += 1


def _choose(entries: list[OutboxEntry], ids: Sequence[int]) -> tuple[list[OutboxEntry], list[int]]:
    """The entries named (all when none are), oldest first, and the ids of
    none."""
    if not ids:
        return entries, []
    by_id = {e.id: e for e in entries}
    return ([by_id[i] for i in sorted(set(ids)) if i in by_id],
            [i for i in dict.fromkeys(ids) if i not in by_id])


def _time(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _listed_dict(entry: OutboxEntry) -> dict[str, Any]:
    request = entry.request
    out = {**_entry_dict(entry), "state": entry.state, "created_at": _time(entry.created_at),
           "last_attempt_at": _time(entry.last_attempt_at), "error_code": entry.error_code,
           "error_reason": entry.error_reason, "last_error": entry.last_error}
    if isinstance(request, transaction_pb2.ConfirmRequest):
        out["final_amount_fen"] = request.final_amount_fen
    return out


def _listed_line(entry: OutboxEntry) -> str:
    request = entry.request
    if isinstance(request, transaction_pb2.ConfirmRequest):
        what = f"confirm {yuan(request.final_amount_fen)}"
    elif isinstance(request, transaction_pb2.ReverseAuthorizationRequest):
        what = f"reverse {request.original_request_id}"
    else:
        what = "cancel"
    line = (f"  {entry.id:>5}  {entry.state:<7}  {what:<20}  hold {entry.hold_id}  "
            f"request_id {entry.request_id}  queued {_time(entry.created_at)}  "
            f"attempts {entry.attempts}")
    if entry.error_code:
        line += f"  last error {entry.error_code}" + (f" {entry.error_reason}"
                                                      if entry.error_reason else "")
    return line


def _entry_dict(entry: OutboxEntry) -> dict[str, Any]:
    return {"entry_id": entry.id, "operation": entry.operation, "hold_id": entry.hold_id,
            "request_id": entry.request_id, "attempts": entry.attempts}


def flush_dict(report: FlushReport, path: Path, failed_total: int) -> dict[str, Any]:
    return {
        "outbox": str(path),
        "delivered": [{**_entry_dict(d.entry), "response": to_dict(d.response)}
                      for d in report.delivered],
        "failed": [{**_entry_dict(e), "error": error_dict(exc)} for e, exc in report.failed],
        "remaining": report.remaining,
        "failed_total": failed_total,
        "stopped_by": error_dict(report.stopped_by) if report.stopped_by else None,
    }


def flush_lines(report: FlushReport, path: Path, failed_total: int) -> list[str]:
    lines = [f"outbox {path}: delivered {len(report.delivered)}, failed {len(report.failed)}, "
             f"still pending {report.remaining}"]
    for d in report.delivered:
        outcome = "APPROVED"
        if isinstance(d.response, transaction_pb2.ConfirmResponse) and \
                d.response.decision == common_pb2.DECISION_DECLINED:
            outcome = (f"DECLINED {decline_name(d.response.decline_reason)}, settlement exception "
                       f"{d.response.settlement_exception_id}")
        lines.append(f"  delivered  {d.entry.operation} hold {d.entry.hold_id} "
                     f"(request_id {d.entry.request_id}): "
                     f"{outcome}, {state_name(d.response.hold.state)}")
    for entry, exc in report.failed:
        lines.append(f"  FAILED     {entry.operation} hold {entry.hold_id} "
                     f"(request_id {entry.request_id}): {exc}")
    if report.stopped_by is not None:
        lines.append(f"  stopped: {report.stopped_by}")
    if failed_total:
        lines.append(f"  {failed_total} failed entr{'y' if failed_total == 1 else 'ies'} in the "
                     "outbox need an operator")
    return lines


COMMANDS: dict[str, Callable[[Command], int]] = {
    "authorize": Command.authorize,
    "confirm": Command.confirm,
    "cancel": Command.cancel,
    "reverse": Command.reverse,
    "balance": Command.balance,
    "hold": Command.hold,
    "outbox-flush": Command.outbox_flush,
    "outbox": Command.outbox,
    "sign-on": Command.sign_on,
}
OUTBOX_ACTIONS: dict[str, Callable[[Command], int]] = {
    "list": Command.outbox_list,
    "flush": Command.outbox_flush,
    "retry": Command.outbox_retry,
    "drop": Command.outbox_drop,
}
# The commands that send a request id (and print it).
MUTATING = frozenset({"authorize", "confirm", "cancel", "reverse"})


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    output = Output(_cardish_args(args_list))
    parser = build_parser(output, terminal_cert=_has_cert(args_list))
    args = parser.parse_args(args_list)
    try:
        link = resolve_link(args)
    except UsageError as exc:
        output.err(f"{parser.prog}: error: {exc}")
        return EXIT_USAGE
    command = Command(args, output, link)
    try:
        return COMMANDS[args.command](command)
    except UsageError as exc:
        output.err(f"{parser.prog}: error: {exc}")
        return EXIT_USAGE
    except PosError as exc:
        return command.fail(exc)
    except ValueError as exc:  # e.g. a bad --request-id before anything is sent
        output.err(f"error: {exc}")
        return EXIT_USAGE
    except (OSError, sqlite3.Error) as exc:  # the outbox or state file
        output.err(f"error: local storage: {exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
