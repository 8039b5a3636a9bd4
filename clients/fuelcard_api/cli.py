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
    return parser


async def serve(settings: ApiSettings, host: str, port: int, port_file: str | None) -> None:
    api = Api(settings)
    await api.start()
    runner = web.AppRunner(api.app(), access_log=None)
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
    host, _, port = args.listen.rpartition(":")
    certs: Path = args.certs
    settings = ApiSettings(
        target=args.target, ca=certs / "ca.pem", cert=certs / f"{args.cert_name}.pem",
        key=certs / f"{args.cert_name}.key", database_url=args.database_url,
        session_ttl_s=args.session_ttl_s, ip_rate=args.ip_rate, ip_burst=args.ip_burst,
        principal_rate=args.principal_rate, principal_burst=args.principal_burst)
    asyncio.run(serve(settings, host or "127.0.0.1", int(port), args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
