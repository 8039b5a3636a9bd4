"""One settings object: defaults, then environment (FUELCARD_*), then flags.

Validated once at start; a bad value stops the server with a message naming
the setting, not a stack trace an hour later.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fuelcard_server.gm import Sm2PrivateKey
from fuelcard_server.keys import ROOT_KEY_ENV, EnvKeyProvider, FileKeyProvider, KeyProvider


class SettingsError(ValueError):
    pass


@dataclass
class Settings:
    listen: str = "127.0.0.1:50051"
    # None: start an embedded PostgreSQL in data_dir.
    database_url: str | None = None
    data_dir: Path = Path("data")
    workers: int = 1
    pool_min: int = 4
    pool_max: int = 16
    pool_timeout_s: float = 5.0
    hold_ttl_s: int = 30 * 60
    expiry_interval_s: float = 1.0
    expiry_batch: int = 500
    # The network's per-transaction ceiling at the pump (10 000 yuan).
    max_authorize_fen: int = 1_000_000
    # The largest single recharge a channel may report (50 000 yuan).
    max_recharge_fen: int = 5_000_000
    max_points_redeem: int = 100_000_000
    # Key of the card-number blind index (hex). None: read or create
    # data_dir/card-index.key.
    card_index_key_hex: str | None = field(default=None, repr=False)
    grace_s: float = 10.0
    # Mutual TLS: the server's certificate and key, and the CA that signs
    # client certificates. Default: data_dir/certs (see `fuelcard certs`).
    tls_dir: Path | None = None
    # Plaintext without client identities, for development on loopback only
    # (--insecure); the default is mutual TLS.
    insecure: bool = False
    # Terminals must MAC authorize/confirm/cancel (with TLS on).
    require_mac: bool = True
    # The root of the key hierarchy (hex) from the environment, else a 0600
    # file: default data_dir/root.key, created on first use (development; in
    # production an HSM-backed KeyProvider takes its place).
    root_key_file: Path | None = None
    # The server's SM2 signing key (hex, 0600 file), for signing answers to
    # payment adapters. Default data_dir/server-sm2.key, created on first use.
    signing_key_file: Path | None = None
    # The event stream (events.py): how often the sequencer looks for newly
    # committed outbox rows, how many it positions per transaction, and how
    # long sequenced events are kept for consumers (then pruned).
    event_interval_s: float = 0.2
    event_batch: int = 2000
    event_retention_s: int = 7 * 24 * 3600

    ENV_PREFIX = "FUELCARD_"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        s = cls()
        for f in dataclasses.fields(cls):
            key = cls.ENV_PREFIX + f.name.upper()
            if key in env:
                s.set(f.name, env[key])
        return s

    def set(self, name: str, raw: str | int | float | Path | None) -> None:
        f = {f.name: f for f in dataclasses.fields(self)}.get(name)
        if f is None:
            raise SettingsError(f"unknown setting {name}")
        if raw is None:
            return
        current = getattr(self, name)
        text = str(raw)
        kind = str(f.type)  # e.g. "int", "Path | None" (annotations are strings here)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError
                value: object = text.lower() in ("1", "true", "yes", "on")
            elif isinstance(current, int):
                value = int(text)
            elif isinstance(current, float):
                value = float(text)
            elif isinstance(current, Path) or kind.startswith("Path"):
                value = Path(text)
            else:
                value = text
        except ValueError:
            raise SettingsError(f"{name}: cannot read {raw!r} as {type(current).__name__}") from None
        setattr(self, name, value)

    def validate(self) -> Settings:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SettingsError(f"listen: expected HOST:PORT, got {self.listen!r}")
        checks = [
            (self.workers >= 1, "workers must be >= 1"),
            (1 <= self.pool_min <= self.pool_max, "need 1 <= pool_min <= pool_max"),
            (self.pool_max <= 200, "pool_max must be <= 200"),
            (self.pool_timeout_s > 0, "pool_timeout_s must be > 0"),
            (self.hold_ttl_s >= 10, "hold_ttl_s must be >= 10 seconds"),
            (self.expiry_interval_s > 0, "expiry_interval_s must be > 0"),
            (self.expiry_batch >= 1, "expiry_batch must be >= 1"),
            (self.max_authorize_fen > 0, "max_authorize_fen must be > 0"),
            (self.max_recharge_fen > 0, "max_recharge_fen must be > 0"),
            (self.grace_s >= 0, "grace_s must be >= 0"),
            (self.event_interval_s > 0, "event_interval_s must be > 0"),
            (1 <= self.event_batch <= 100_000, "event_batch must be 1..100000"),
            (self.event_retention_s >= 60, "event_retention_s must be >= 60"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        host = self.host_port[0]
        if self.insecure and not (host == "localhost" or host.startswith("127.") or host == "::1"):
            raise SettingsError("insecure (plaintext) serving is for loopback only: "
                                f"cannot listen on {host} without TLS")
        if self.card_index_key_hex is not None:
            try:
                if len(bytes.fromhex(self.card_index_key_hex)) < 16:
                    raise ValueError
            except ValueError:
                raise SettingsError("card_index_key_hex: need at least 32 hex digits") from None
        return self

    def card_index_key(self) -> bytes:
        """The blind-index key; created on first use in data_dir if not given."""
        if self.card_index_key_hex is not None:
            return bytes.fromhex(self.card_index_key_hex)
        path = self.data_dir / "card-index.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(32))
            tmp.chmod(0o600)
            tmp.replace(path)
        return bytes.fromhex(path.read_text().strip())

    def key_provider(self) -> KeyProvider:
        if os.environ.get(ROOT_KEY_ENV):
            return EnvKeyProvider()
        path = self.root_key_file or self.data_dir / "root.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return FileKeyProvider(path)

    def signing_key(self) -> Sm2PrivateKey:
        path = self.signing_key_file or self.data_dir / "server-sm2.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(Sm2PrivateKey.generate().to_hex())
        return Sm2PrivateKey.from_hex(path.read_text().strip())

    @property
    def certs_dir(self) -> Path:
        return self.tls_dir if self.tls_dir is not None else self.data_dir / "certs"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)
