"""One settings object: defaults, then an optional TOML file (--config or
FUELCARD_CONFIG), then environment (FUELCARD_*), then flags.

Validated once at start; a bad value stops the server with a message naming
the setting, not a stack trace an hour later.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import secrets
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuelcard_server.gm import Sm2PrivateKey
from fuelcard_server.keys import ROOT_KEY_ENV, EnvKeyProvider, FileKeyProvider, KeyProvider


class SettingsError(ValueError):
    pass


# os.link's answers on a filesystem without hard links (some SMB/FUSE mounts).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
# No duration setting (a name ending in _s) may exceed ten years.
DURATION_MAX_S = 10 * 365 * 24 * 3600
# How long a process waits for the secret another one is writing.
SECRET_WAIT_S = 10.0


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The content of a 0600 secret file, made with make() if it is absent.

    Several processes may start at once on a fresh data directory (`serve
    --workers N`), so the file appears complete or not at all, and the first
    writer wins: the secret is written to a private temporary file, then
    hard-linked into place, which fails if another process got there first.
    Replacing instead would let two workers each keep a different key."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(make())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                _place_once_without_links(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text()


def _place_once_without_links(tmp: Path, path: Path) -> None:
    """The first-writer-wins placement without hard links: a lock file made
    with O_EXCL elects one writer, which renames its file into place (a
    rename is atomic: readers see all of it or nothing) unless one is there
    already; the others wait for the file to appear."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        deadline = time.monotonic() + SECRET_WAIT_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise SettingsError(
                    f"{path.name} did not appear within {SECRET_WAIT_S:.0f} s while another "
                    f"process held {lock}; if no other fuelcard process is starting, remove "
                    "that lock file") from None
            time.sleep(0.01)
        return
    try:
        if not path.exists():  # a writer before us may have placed it and left
            os.replace(tmp, path)
    finally:
        lock.unlink(missing_ok=True)


@dataclass
class Settings:
    listen: str = "127.0.0.1:50051"
    # None: start an embedded PostgreSQL in data_dir.
    database_url: str | None = None
    # What `serve` migrates with before serving, when database_url is the
    # serving role's (which may not change the schema: README, "Least
    # privilege"); None: it migrates with database_url. The embedded
    # PostgreSQL needs neither: migrated as its superuser, served as
    # roles.SERVING.
    migrate_database_url: str | None = field(default=None, repr=False)
    data_dir: Path = Path("data")
    workers: int = 1
    pool_min: int = 4
    # Per worker. On the two cores measured (issue 17, BENCHMARKS.md) 8 took
    # ~9 % less PostgreSQL CPU per pump cycle than 16 (fewer backends woken,
    # warmer caches) at the same server CPU; 4 saved no more in PostgreSQL
    # and cost the server more (calls queueing for a connection).
    pool_max: int = 8
    # How long a call may wait for a connection of a busy pool. A database
    # that is gone does not make calls wait this long: the health probe
    # notices within health_interval_s + connect_timeout_s, and calls then
    # fail at once (UNAVAILABLE) until it is back.
    pool_timeout_s: float = 5.0
    connect_timeout_s: float = 3.0
    # A read replica (streaming standby) for report and history reads; None:
    # they use a small pool of their own on the primary, never the
    # transaction pool.
    replica_url: str | None = field(default=None, repr=False)
    read_pool_max: int = 4
    # A replica further behind the primary than this (seconds) is not read:
    # report and history calls fail fast (UNAVAILABLE REPLICA_LAGGING) and
    # the services that read it report NOT_SERVING until it catches up (no
    # fallback to the primary: see replication.py). Probed every
    # health_interval_s; read again once under half of it.
    replica_max_lag_s: float = 30.0
    # A replica that was readable is taken out (NOT_SERVING, reads refused)
    # only after this many probes in a row could not reach it: one dropped
    # connection or a probe that timed out on a busy replica is not an
    # outage, and flapping health makes load balancers and pagers flap too.
    # At start, one failed probe is enough (nothing says it was readable).
    replica_down_after_probes: int = 3
    # Bounded concurrency per priority class (服务降级): RPCs in flight in one
    # process. Past its limit a class is refused at once with
    # RESOURCE_EXHAUSTED and a retry hint; while payments are in flight and
    # the transaction pool has waiters, every lower class is refused too.
    # False: no priority classes at all (to measure what they are worth).
    load_shedding: bool = True
    max_inflight_payments: int = 1024
    max_inflight_funding: int = 64
    max_inflight_admin: int = 32
    max_inflight_reports: int = 4
    # Open StreamEvents calls per process: a stream lives for hours, so it is
    # counted here rather than against max_inflight_reports (its opening is
    # shed like a report call). A sidecar and one spare.
    max_event_streams: int = 2
    # Reports started per second per process (a token bucket): a cheap
    # report run back-to-back would otherwise take a CPU share no cap on
    # concurrency bounds. 0: no rate limit.
    max_reports_per_s: float = 200.0
    shed_retry_ms: int = 500
    # How often the database is probed for the health service.
    health_interval_s: float = 1.0
    # Observability: a Prometheus scrape endpoint (HOST:PORT; worker i of
    # --workers N listens on PORT+i), OTLP/gRPC export of traces and metrics
    # (e.g. http://127.0.0.1:4317), and the share of root traces sampled
    # (parent-based: a caller's sampled traceparent is always followed).
    metrics_listen: str | None = None
    otlp_endpoint: str | None = None
    tracing: bool = True
    trace_sample_ratio: float = 0.05
    metrics_interval_s: float = 15.0
    log_level: str = "INFO"
    # The share of RPCs that get an access line (method, code, duration,
    # caller role): small, as a payment storm must not become a log storm,
    # but never silent. 1.0 logs every call; 0 none.
    access_log_sample: float = 0.01
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
    # Step-up verification (多因素认证, stepup.py): recharges above this many
    # fen need a one-time code (0: every recharge).
    step_up_recharge_above_fen: int = 2_000_000
    # Sale refunds (RefundService.RefundSale) above this many fen need a
    # one-time code from an administrator (0: every refund).
    step_up_sale_refund_above_fen: int = 100_000
    # Limit raises (a higher or removed cap, a temporary raise) need one.
    step_up_limit_raises: bool = True
    # A code's life and the wrong codes it allows.
    otp_ttl_s: int = 300
    otp_max_attempts: int = 3
    # Development delivery of codes (FileOtpSender): a 0600 JSON-lines file,
    # default data_dir/otp-outbox.jsonl. Production plugs an SMS gateway in.
    otp_outbox_file: Path | None = None
    # Risk engine: accept the test-only rule kind "fault", whose evaluation
    # fails inside the engine (to exercise the fallback). Never in production.
    risk_fault_injection: bool = False
    # The event stream (events.py): how often the sequencer looks for newly
    # committed outbox rows, how many it positions per transaction, and how
    # long sequenced events are kept for consumers (then pruned).
    event_interval_s: float = 0.2
    event_batch: int = 2000
    event_retention_s: int = 7 * 24 * 3600
    # The journal's hash chain (journal_chain.py): how often the background
    # job chains newly committed entries (the window of entries not yet
    # chained is about this long) and how many per transaction.
    journal_chain_interval_s: float = 1.0
    journal_chain_batch: int = 5000
    # Retention (retention.py, README "Retention"): how long idempotency keys
    # answer replays. Keys of operations whose replay the ledger itself stops
    # from moving money twice (authorize, confirm, cancel, review, recharge,
    # refund: nearly all keys) are kept 7 days: well past a POS outbox's
    # retries (minutes to hours; a station offline over a long weekend), a
    # channel's re-notifications (WeChat Pay and Alipay retry for about 25
    # hours), settlement files (T+1, re-run over a weekend: T+3) and a hold's
    # life (30 min; an Authorize key is never deleted while its hold is live).
    idempotency_retention_s: int = 7 * 24 * 3600
    # Keys of every other operation (batch top-up, points redemption and
    # pooling, account opening, ...: a replay without its key would run
    # again): about 13 months, past a yearly re-run of a finance batch.
    # 0: kept for ever.
    idempotency_retention_unguarded_s: int = 400 * 24 * 3600
    # Step-up challenges, expired or used, are kept this long (never less
    # than the per-subject rate limit's window or a code's life).
    step_up_retention_s: int = 24 * 3600
    # How often each server process runs the retention job, rows deleted per
    # statement (one short transaction each), and statements per run at most
    # (a run that hits the cap runs again at the next expiry sweep).
    retention_interval_s: float = 60.0
    retention_batch: int = 1000
    retention_batches_max: int = 20

    ENV_PREFIX = "FUELCARD_"
    CONFIG_ENV = "FUELCARD_CONFIG"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, config: Path | None = None) -> Settings:
        """Defaults, then the config file (if any), then the environment."""
        env = dict(os.environ if env is None else env)
        s = cls()
        if config is None and env.get(cls.CONFIG_ENV):
            config = Path(env[cls.CONFIG_ENV])
        if config is not None:
            s.load_file(config)
        for f in dataclasses.fields(cls):
            key = cls.ENV_PREFIX + f.name.upper()
            if key in env:
                s.set(f.name, env[key])
        return s

    def load_file(self, path: Path) -> None:
        """A TOML file of `name = value` lines, names as in this class."""
        try:
            table = tomllib.loads(path.read_text())
        except OSError as exc:
            raise SettingsError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path}: not TOML ({exc})") from None
        for name, value in table.items():
            if isinstance(value, dict | list):
                raise SettingsError(f"config file {path}: {name} must be a plain value")
            if name not in {f.name for f in dataclasses.fields(self)}:
                raise SettingsError(f"config file {path}: unknown setting {name}")
            self.set(name, str(value).lower() if isinstance(value, bool) else value)

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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                # float() reads "inf" and "nan": an interval of inf sleeps for ever
                raise SettingsError(f"{f.name} must be a finite number, got {value}")
            if f.name.endswith("_s") and isinstance(value, int | float) \
                    and value > DURATION_MAX_S:
                # times are computed with these (now - retention): keep them in range
                raise SettingsError(f"{f.name} must be at most {DURATION_MAX_S} (10 years)")
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
            (self.connect_timeout_s > 0, "connect_timeout_s must be > 0"),
            (1 <= self.read_pool_max <= 50, "read_pool_max must be between 1 and 50"),
            (min(self.max_inflight_payments, self.max_inflight_funding, self.max_inflight_admin,
                 self.max_inflight_reports) >= 1, "max_inflight_* must be >= 1"),
            (self.max_inflight_payments >= max(self.max_inflight_funding, self.max_inflight_admin,
                                               self.max_inflight_reports),
             "max_inflight_payments must be the largest: payments go first"),
            (self.max_reports_per_s >= 0, "max_reports_per_s must be >= 0"),
            (1 <= self.max_event_streams <= 64, "max_event_streams must be between 1 and 64"),
            (0 < self.shed_retry_ms <= 60_000, "shed_retry_ms must be between 1 and 60000"),
            (self.health_interval_s > 0, "health_interval_s must be > 0"),
            (self.replica_max_lag_s > 0, "replica_max_lag_s must be > 0"),
            (1 <= self.replica_down_after_probes <= 100,
             "replica_down_after_probes must be between 1 and 100"),
            (0.0 <= self.trace_sample_ratio <= 1.0, "trace_sample_ratio must be between 0 and 1"),
            (self.metrics_interval_s > 0, "metrics_interval_s must be > 0"),
            (0.0 <= self.access_log_sample <= 1.0, "access_log_sample must be between 0 and 1"),
            (self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
             "log_level must be DEBUG, INFO, WARNING or ERROR"),
            (self.step_up_recharge_above_fen >= 0, "step_up_recharge_above_fen must be >= 0"),
            (self.step_up_sale_refund_above_fen >= 0, "step_up_sale_refund_above_fen must be >= 0"),
            (30 <= self.otp_ttl_s <= 3600, "otp_ttl_s must be 30..3600"),
            (1 <= self.otp_max_attempts <= 10, "otp_max_attempts must be 1..10"),
            (self.event_interval_s > 0, "event_interval_s must be > 0"),
            (1 <= self.event_batch <= 100_000, "event_batch must be 1..100000"),
            (self.journal_chain_interval_s > 0, "journal_chain_interval_s must be > 0"),
            (1 <= self.journal_chain_batch <= 100_000, "journal_chain_batch must be 1..100000"),
            (self.event_retention_s >= 60, "event_retention_s must be >= 60"),
            (self.idempotency_retention_s >= max(24 * 3600, 2 * self.hold_ttl_s),
             "idempotency_retention_s must be >= 86400 (a day of channel retries) and >= "
             "2 x hold_ttl_s"),
            (self.idempotency_retention_unguarded_s == 0
             or self.idempotency_retention_unguarded_s >= self.idempotency_retention_s,
             "idempotency_retention_unguarded_s must be 0 (for ever) or >= "
             "idempotency_retention_s"),
            (self.step_up_retention_s >= 3600, "step_up_retention_s must be >= 3600"),
            (self.retention_interval_s > 0, "retention_interval_s must be > 0"),
            (1 <= self.retention_batch <= 100_000, "retention_batch must be 1..100000"),
            (1 <= self.retention_batches_max <= 1000, "retention_batches_max must be 1..1000"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        host = self.host_port[0]
        if self.insecure and not (host == "localhost" or host.startswith("127.") or host == "::1"):
            raise SettingsError("insecure (plaintext) serving is for loopback only: "
                                f"cannot listen on {host} without TLS")
        if self.metrics_listen is not None:
            m_host, _, m_port = self.metrics_listen.rpartition(":")
            if not m_host or not m_port.isdigit() or not 0 <= int(m_port) <= 65535:
                raise SettingsError(f"metrics_listen: expected HOST:PORT, got {self.metrics_listen!r}")
        if self.otlp_endpoint is not None and "://" not in self.otlp_endpoint:
            raise SettingsError("otlp_endpoint: expected a URL such as http://127.0.0.1:4317, "
                                f"got {self.otlp_endpoint!r}")
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
        text = secret_file(self.data_dir / "card-index.key", lambda: secrets.token_hex(32))
        return bytes.fromhex(text.strip())

    def key_provider(self) -> KeyProvider:
        if os.environ.get(ROOT_KEY_ENV):
            return EnvKeyProvider()
        path = self.root_key_file or self.data_dir / "root.key"
        secret_file(path, lambda: secrets.token_hex(32))
        return FileKeyProvider(path)

    def signing_key(self) -> Sm2PrivateKey:
        path = self.signing_key_path
        text = secret_file(path, lambda: Sm2PrivateKey.generate().to_hex())
        return Sm2PrivateKey.from_hex(text.strip())

    def ensure_keys(self) -> None:
        """Create every key this server makes for itself, so that workers
        started afterwards only ever read them."""
        self.card_index_key()
        self.key_provider()
        self.signing_key()

    @property
    def signing_key_path(self) -> Path:
        """Where the server's SM2 signing key is (made there on first use)."""
        return self.signing_key_file or self.data_dir / "server-sm2.key"

    @property
    def certs_dir(self) -> Path:
        return self.tls_dir if self.tls_dir is not None else self.data_dir / "certs"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)
