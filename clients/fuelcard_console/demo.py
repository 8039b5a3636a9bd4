"""The console in the demo (scripts/demo): one console user per role, with
the logins printed, and the HTTP edge serving the console on loopback.

`python -m fuelcard_console.demo serve --data-dir data --target HOST:PORT`
runs next to `fuelcard serve --demo --tls --data-dir data`: it waits for the
demo data (the same fixed request ids: it replays the server's seeding, or
seeds first), makes the six users (again: a login that exists is kept),
prints the URL and the logins, and serves until Ctrl-C.
`python -m fuelcard_console.demo totp LOGIN --data-dir data` prints a demo
user's current TOTP code (for the step-up, without an authenticator app).

Development only: the passwords and TOTP secrets are fixed and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pyotp
from fuelcard_api.app import ApiSettings
from fuelcard_api.cli import serve
from fuelcard_server import demo as demo_data
from fuelcard_server.certs import DevPki
from fuelcard_server.db import one_shot
from fuelcard_server.embedded import EmbeddedPostgres
from fuelcard_server.identity import Role as CertRole

from fuelcard_console import users
from fuelcard_console.auth import Role
from fuelcard_console.context import ConsoleSettings

# (login, role, which demo account; password and TOTP secret fixed for the demo)
DEMO_USERS = (
    ("demo.fleet", Role.FLEET_MANAGER, "顺丰车队 fleet"),
    ("demo.family", Role.HOLDER, "李娜 (family main card)"),
    ("demo.reviewer", Role.REVIEWER, None),
    ("demo.finance", Role.FINANCE, None),
    ("demo.risk", Role.RISK_OFFICER, None),
    ("demo.sre", Role.SRE, None),
)
DEMO_PASSWORD = "demo-console-2026"
# base32; a fixed one so that the README and the banner can name it
DEMO_TOTP_SECRET = "FUELCARDDEMOTWOZEROTWOSIXCONSOLE"
ADMIN_CERT = "admin-demo-admin"
REVIEWER_CERT = "reviewer-console"


def database_url(data_dir: Path) -> str:
    return EmbeddedPostgres(data_dir / "postgres").url()


async def demo_accounts(target: str, certs: Path) -> dict[str, str]:
    """The demo accounts by holder name: the seeding replayed (same request
    ids), retried while the server's own seeding is still under way."""
    deadline = time.monotonic() + 60
    while True:
        try:
            made = await demo_data.seed(target, certs)
            return {card.holder: account_id for card, account_id in made}
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def make_users(url: str, accounts: dict[str, str]) -> list[tuple[str, Role]]:
    made = []
    for login, role, holder in DEMO_USERS:
        try:
            users.add(url, login=login, role=role.value, account_id=accounts[holder] if holder else None,
                      password=DEMO_PASSWORD, totp_secret=DEMO_TOTP_SECRET, by="demo")
        except users.ConsoleUserError as exc:
            if "taken" not in str(exc):
                raise
        made.append((login, role))
    return made


def banner(listen: str, made: list[tuple[str, Role]]) -> str:
    from fuelcard_console.auth import ROLE_NAMES_ZH

    lines = [f"\nthe operator console (运营控制台): http://{listen}/console/",
             f"  password of every demo login: {DEMO_PASSWORD}"]
    lines += [f"  {login:<14} {role.value:<13} {ROLE_NAMES_ZH[role]}" for login, role in made]
    lines += [f"  step-up (TOTP) secret of every demo login: {DEMO_TOTP_SECRET}",
              "  the current code: .venv/bin/python -m fuelcard_console.demo totp demo.fleet --data-dir data"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuelcard_console.demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="demo users, then the edge with the console")
    s.add_argument("--data-dir", type=Path, default=Path("data"))
    s.add_argument("--target", required=True, help="the demo core's gRPC address")
    s.add_argument("--listen", default="127.0.0.1:8080")
    s.add_argument("--core-metrics-url", dest="metrics_url", help="the demo core's Prometheus scrape")
    t = sub.add_parser("totp", help="a demo user's current TOTP code")
    t.add_argument("login")
    t.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    url = database_url(args.data_dir)
    if args.command == "totp":
        with one_shot(url) as conn:
            row = conn.execute("SELECT totp_secret FROM fc.console_users WHERE login = %s",
                               (args.login,)).fetchone()
        if row is None:
            print(f"no console user {args.login}", file=sys.stderr)
            return 1
        print(pyotp.TOTP(row[0]).now())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    certs = args.data_dir / "certs"
    if not (certs / f"{REVIEWER_CERT}.pem").exists():
        DevPki(certs).client(CertRole.REVIEWER, "console")
    accounts = asyncio.run(demo_accounts(args.target, certs))
    made = make_users(url, accounts)
    print(banner(args.listen, made), flush=True)
    host, _, port = args.listen.rpartition(":")
    api = ApiSettings(target=args.target, ca=certs / "ca.pem", cert=certs / f"{ADMIN_CERT}.pem",
                      key=certs / f"{ADMIN_CERT}.key", database_url=url)
    console = ConsoleSettings(
        target=args.target, database_url=url, ca=api.ca, cert=api.cert, key=api.key,
        reviewer_cert=certs / f"{REVIEWER_CERT}.pem", reviewer_key=certs / f"{REVIEWER_CERT}.key",
        metrics_url=args.metrics_url, cookie_secure=False)  # plain HTTP on loopback: the demo only
    asyncio.run(serve(api, host, int(port), None, console))
    return 0


if __name__ == "__main__":
    sys.exit(main())
