"""`fuelcard-api serve`: the JSON API for apps and mini-programs, as its own
process in front of the core (put it behind the TLS-terminating reverse
proxy, which must pass the client's address as the connection's: the per-IP
rate limit reads the peer address)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from fuelcard_console.context import Console, ConsoleSettings
from fuelcard_console.views import install

from fuelcard_api.app import Api, ApiSettings

log = logging.getLogger("fuelcard_api")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuelcard-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the JSON API (OpenAPI document at /openapi.json)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    p.add_argument("--target", default=os.environ.get("FUELCARD_TARGET", "127.0.0.1:50051"),
                   help="the core's gRPC address (env FUELCARD_TARGET)")
    p.add_argument("--certs", type=Path, required=True,
                   help="directory with ca.pem and the API's admin certificate STEM.pem/.key "
                        "(`fuelcard certs --admin fuelcard-api`)")
    p.add_argument("--as", dest="cert_name", default="admin-fuelcard-api", metavar="STEM",
                   help="the certificate's file stem in --certs (default admin-fuelcard-api)")
    p.add_argument("--database-url", dest="database_url",
                   default=os.environ.get("FUELCARD_DATABASE_URL"),
                   help="the core's database, for principals and sessions (env FUELCARD_DATABASE_URL)")
    p.add_argument("--session-ttl-s", dest="session_ttl_s", type=int, default=1800,
                   help="a session's life in seconds (default 1800)")
    p.add_argument("--ip-rate", dest="ip_rate", type=float, default=20.0, help="requests/s per IP")
    p.add_argument("--ip-burst", dest="ip_burst", type=int, default=60)
    p.add_argument("--principal-rate", dest="principal_rate", type=float, default=5.0,
                   help="requests/s per logged-in principal")
    p.add_argument("--principal-burst", dest="principal_burst", type=int, default=30)
    p.add_argument("--port-file", dest="port_file", help="write the bound port here once serving")
    # the operator console, mounted under /console/ (fuelcard_console)
    p.add_argument("--reports-database-url", dest="reports_database_url",
                   default=os.environ.get("FUELCARD_REPORTS_DATABASE_URL"),
                   help="the console's reports and long lists read only this (the read replica or the "
                        "warehouse; default: --database-url) (env FUELCARD_REPORTS_DATABASE_URL)")
    p.add_argument("--reviewer-as", dest="reviewer_cert_name", metavar="STEM",
                   help="a reviewer certificate's file stem in --certs, for the console's hold reviews "
                        "(`fuelcard certs --reviewer console`)")
    p.add_argument("--core-metrics-url", dest="core_metrics_url",
                   help="the core's Prometheus scrape (http://HOST:PORT/metrics) for the console's SRE page")
    p.add_argument("--console-http", dest="console_http", action="store_true",
                   help="console cookies without the Secure flag: only for a development edge reached "
                        "over plain HTTP on loopback (behind the TLS proxy, leave it off)")
    u = sub.add_parser("console-user", help="console users (the operator console's logins)")
    usub = u.add_subparsers(dest="action", required=True)
    add = usub.add_parser("add", help="make a console user; prints the password and TOTP secret once")
    add.add_argument("--login", required=True)
    add.add_argument("--role", required=True,
                     help="fleet_manager, holder, reviewer, finance, risk_officer or sre")
    add.add_argument("--account", dest="account_id",
                     help="fleet_manager / holder: the account (UUID) they have authority over")
    add.add_argument("--password-stdin", dest="password_stdin", action="store_true",
                     help="read the password from standard input (default: generate one)")
    dis = usub.add_parser("disable", help="stop a console user from logging in; ends their sessions")
    dis.add_argument("--login", required=True)
    for q in (add, dis):
        q.add_argument("--database-url", dest="database_url",
                       default=os.environ.get("FUELCARD_DATABASE_URL"),
                       help="the core's database (env FUELCARD_DATABASE_URL)")
    return parser


async def serve(settings: ApiSettings, host: str, port: int, port_file: str | None,
                console_settings: ConsoleSettings | None = None) -> None:
    api = Api(settings)
    await api.start()
    app = api.app()
    if console_settings is not None:
        install(app, Console(console_settings))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    log.info("fuelcard-api serving on %s:%s", host, bound)
    if port_file:
        await asyncio.to_thread(Path(port_file).write_text, str(bound))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await api.stop()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    if not args.database_url:
        print("fuelcard-api: --database-url (or FUELCARD_DATABASE_URL) is required", file=sys.stderr)
        return 2
    if args.command == "console-user":
        return console_user(args)
    host, _, port = args.listen.rpartition(":")
    certs: Path = args.certs
    settings = ApiSettings(
        target=args.target, ca=certs / "ca.pem", cert=certs / f"{args.cert_name}.pem",
        key=certs / f"{args.cert_name}.key", database_url=args.database_url,
        session_ttl_s=args.session_ttl_s, ip_rate=args.ip_rate, ip_burst=args.ip_burst,
        principal_rate=args.principal_rate, principal_burst=args.principal_burst)
    reviewer = args.reviewer_cert_name
    console = ConsoleSettings(
        target=args.target, database_url=args.database_url, ca=settings.ca, cert=settings.cert,
        key=settings.key, reviewer_cert=certs / f"{reviewer}.pem" if reviewer else None,
        reviewer_key=certs / f"{reviewer}.key" if reviewer else None,
        reports_database_url=args.reports_database_url, metrics_url=args.core_metrics_url,
        cookie_secure=not args.console_http)
    asyncio.run(serve(settings, host or "127.0.0.1", int(port), args.port_file, console))
    return 0


def console_user(args: argparse.Namespace) -> int:
    from fuelcard_console import users

    by = f"cli:{os.environ.get('USER', 'unknown')}"
    try:
        if args.action == "disable":
            user_id, ended = users.disable(args.database_url, login=args.login, by=by)
            print(f"disabled console user {user_id}; {ended} session(s) ended")
            return 0
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
        made = users.add(args.database_url, login=args.login, role=args.role, account_id=args.account_id,
                         password=password, by=by)
    except users.ConsoleUserError as exc:
        print(f"fuelcard-api: {exc}", file=sys.stderr)
        return 1
    # shown once: only the password's hash is kept, and the secret is never printed again
    print(f"console user {made.login} ({made.role.value}) id {made.user_id}")
    if password is None:
        print(f"password:    {made.password}")
    print(f"TOTP secret: {made.totp_secret}")
    print(f"TOTP URI:    {made.totp_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
