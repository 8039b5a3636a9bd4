"""fuelcard-adapters: the notification service and its keys.

  fuelcard-adapters serve --config notify.toml [--listen 127.0.0.1:8080]
                          [--tls-cert FILE --tls-key FILE] [--trusted-proxy IP ...]
  fuelcard-adapters keygen --out FILE    an adapter's SM2 key (prints the public
                                         key to register with RegisterChannelKey)

The configuration (TOML) names the core, and for each channel served its
adapter certificate (mutual TLS to the core), its adapter SM2 key and the
channel's own keys; relative paths are read from the configuration file's
directory:

  [core]
  target = "core.internal:50051"
  ca = "tls/ca.pem"

  [channels.wechat]                      # POST /notify/wechat
  cert = "tls/adapter-wechat-gw.pem"     # the adapter certificate and its key
  key = "tls/adapter-wechat-gw.key"
  signing_key = "keys/wechat-adapter.json"   # fuelcard-adapters keygen
  apiv3_key = "keys/wechat-apiv3.txt"        # the 32-character APIv3 key
  platform_keys = { "5157F09E..." = "keys/wechatpay-platform.pem" }  # by Wechatpay-Serial

  [channels.alipay]                      # POST /notify/alipay
  ...cert, key, signing_key...
  app_id = "2021..."
  seller_id = "2088..."
  alipay_public_key = "keys/alipay-public.pem"   # RSA2 (PEM) or SM2 (hex)

  [channels.unionpay]                    # POST /notify/unionpay (backUrl)
  ...cert, key, signing_key...
  mer_id = "898..."
  certificates = { "69629715588" = "keys/unionpay-sign.pem" }  # signMethod 01, by certId
  secure_key = "keys/unionpay-secure-key.txt"                   # signMethod 12

  [channels.ecny]                        # POST /notify/ecny
  ...cert, key, signing_key...
  institution_public_key = "keys/ecny-institution.hex"          # SM2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric import rsa
from fuelcard.v1 import funding_pb2_grpc, security_pb2, security_pb2_grpc

from fuelcard_adapters import alipay, bankcard, ecny, wechat
from fuelcard_adapters.core import AsyncCoreClient, CoreClient
from fuelcard_adapters.framework import Adapter, ChannelMapping
from fuelcard_adapters.http_service import (
    MAX_BODY,
    MAX_INFLIGHT,
    NotifyService,
    Route,
    server_ssl_context,
    start,
)
from fuelcard_adapters.signing import Sm2Signer, load_channel_key

log = logging.getLogger("fuelcard_adapters")

# The gRPC channel to the core reconnects quickly after an outage (the
# default backoff grows to two minutes, and every notification meanwhile
# would be answered "retry" although the core is back).
GRPC_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000))
CHANNEL_NAMES = ("wechat", "alipay", "unionpay", "ecny")


class ConfigError(Exception):
    pass


def write_signing_key(path: Path) -> Sm2Signer:
    key = Sm2Signer.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"secret_hex": key.secret.hex(), "public_hex": key.public_hex}, f)
    return key


def read_signing_key(path: Path) -> Sm2Signer:
    data = json.loads(path.read_text())
    return Sm2Signer(bytes.fromhex(data["secret_hex"]), bytes.fromhex(data["public_hex"]))


class _Config:
    def __init__(self, path: Path) -> None:
        self.base = path.parent
        with path.open("rb") as f:
            self.data = tomllib.load(f)

    def path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{what}: a file path is required")
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def read(self, section: dict[str, Any], name: str, where: str) -> bytes:
        return self.path(section.get(name), f"{where}.{name}").read_bytes()

    def text(self, section: dict[str, Any], name: str, where: str) -> str:
        value = section.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{name} is required")
        return value


def _mapping(name: str, c: dict[str, Any], cfg: _Config) -> ChannelMapping:
    where = f"channels.{name}"
    if name == "wechat":
        keys = {serial: load_channel_key(cfg.path(p, f"{where}.platform_keys").read_bytes())
                for serial, p in dict(c.get("platform_keys") or {}).items()}
        apiv3 = cfg.read(c, "apiv3_key", where).strip()
        if len(apiv3) != 32 or not keys:
            raise ConfigError(f"{where}: apiv3_key must be 32 bytes and platform_keys not empty")
        return wechat.WeChatPay(keys, apiv3)
    if name == "alipay":
        return alipay.Alipay(load_channel_key(cfg.read(c, "alipay_public_key", where)),
                             cfg.text(c, "app_id", where), seller_id=str(c.get("seller_id", "")))
    if name == "unionpay":
        certs: dict[str, rsa.RSAPublicKey] = {}
        for cert_id, p in dict(c.get("certificates") or {}).items():
            key = load_channel_key(cfg.path(p, f"{where}.certificates").read_bytes())
            if not isinstance(key, rsa.RSAPublicKey):
                raise ConfigError(f"{where}.certificates: RSA certificates only")
            certs[cert_id] = key
        secure = cfg.read(c, "secure_key", where).decode().strip() if c.get("secure_key") else ""
        sm2 = load_channel_key(cfg.read(c, "sm2_public_key", where)) if c.get("sm2_public_key") \
            else b""
        if not (certs or secure or sm2) or not isinstance(sm2, bytes):
            raise ConfigError(f"{where}: certificates, secure_key or sm2_public_key is required")
        return bankcard.BankCard(cfg.text(c, "mer_id", where), certs, secure, sm2)
    if name == "ecny":
        key = load_channel_key(cfg.read(c, "institution_public_key", where))
        if not isinstance(key, bytes):
            raise ConfigError(f"{where}.institution_public_key: e-CNY signs with SM2 (hex)")
        return ecny.Ecny(key)
    raise ConfigError(f"channels.{name}: unknown channel (known: {', '.join(CHANNEL_NAMES)})")


def _connect_async(target: str, creds: grpc.ChannelCredentials, channel: int, key: Sm2Signer,
                   core_key: bytes) -> tuple[AsyncCoreClient, grpc.aio.Channel]:
    aio = grpc.aio.secure_channel(target, creds, options=GRPC_OPTIONS)
    # (the generated stub, given an aio channel, is the asyncio stub)
    return AsyncCoreClient(funding_pb2_grpc.FundingServiceStub(aio), channel, key, core_key,
                           attempts=3, timeout_s=1.5), aio


def build_routes(config_path: Path) -> tuple[list[Route], list[grpc.Channel]]:
    """Every configured channel's adapter, connected to the core."""
    cfg = _Config(config_path)
    core = cfg.data.get("core") or {}
    target = cfg.text(core, "target", "core")
    ca = cfg.read(core, "ca", "core")
    routes: list[Route] = []
    channels: list[grpc.Channel] = []
    for name, section in dict(cfg.data.get("channels") or {}).items():
        mapping = _mapping(name, section, cfg)
        where = f"channels.{name}"
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=cfg.read(section, "key", where),
            certificate_chain=cfg.read(section, "cert", where))
        ch = grpc.secure_channel(target, creds, options=GRPC_OPTIONS)
        channels.append(ch)
        core_key_hex = core.get("signing_key_hex") or security_pb2_grpc.SecurityServiceStub(
            ch).GetServerSigningKey(security_pb2.GetServerSigningKeyRequest(), timeout=10,
                                    wait_for_ready=True).public_key_hex
        signing_key = read_signing_key(cfg.path(section.get("signing_key"), f"{where}.signing_key"))
        core_key = bytes.fromhex(core_key_hex)
        client = CoreClient(funding_pb2_grpc.FundingServiceStub(ch), mapping.channel, signing_key,
                            core_key, attempts=3, timeout_s=1.5)
        connect = functools.partial(_connect_async, target, creds, mapping.channel, signing_key,
                                    core_key)
        routes.append(Route(name, Adapter(mapping, client), connect))
    if not routes:
        raise ConfigError("no [channels.*] section: nothing to serve")
    return routes, channels


async def _serve(args: argparse.Namespace) -> None:
    routes, channels = build_routes(Path(args.config))
    if args.core_client == "blocking":
        routes = [dataclasses.replace(r, connect=None) for r in routes]
    service = NotifyService(routes, max_body=args.max_body, trusted_proxies=args.trusted_proxy,
                            max_inflight=args.max_inflight)
    host, _, port = args.listen.rpartition(":")
    ssl_context = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    runner, bound = await start(service, host or "0.0.0.0", int(port), ssl_context)
    log.info("notification service on %s:%d (%s), channels: %s", host, bound,
             "TLS" if ssl_context else "plain HTTP", ", ".join(f"/notify/{r.name}" for r in routes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    for ch in channels:
        ch.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuelcard-adapters", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="the notification service (HTTP in, core gRPC out)")
    s.add_argument("--config", required=True, help="the TOML configuration (see above)")
    s.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    s.add_argument("--tls-cert", help="serve TLS with this certificate chain (PEM)")
    s.add_argument("--tls-key", help="... and its private key")
    s.add_argument("--max-body", type=int, default=MAX_BODY,
                   help="largest notification body in bytes; larger is answered 413")
    s.add_argument("--core-client", choices=("asyncio", "blocking"), default="asyncio",
                   help="core calls on grpc.aio in the loop, or blocking gRPC on a thread pool")
    s.add_argument("--max-inflight", type=int, default=MAX_INFLIGHT,
                   help="notifications served at once; more are answered 'retry' at once")
    s.add_argument("--trusted-proxy", action="append", default=[], metavar="IP",
                   help="a reverse proxy whose X-Forwarded-For is believed (repeatable)")
    s.add_argument("--log-level", default="INFO")
    k = sub.add_parser("keygen", help="a new adapter SM2 key (file mode 0600)")
    k.add_argument("--out", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "keygen":
        key = write_signing_key(Path(args.out))
        print(key.public_hex)
        return 0
    if bool(args.tls_cert) != bool(args.tls_key):
        print("fuelcard-adapters: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        uvloop.run(_serve(args))
    except (ConfigError, OSError, ValueError, KeyError) as exc:
        print(f"fuelcard-adapters: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
