"""The `fuelcard` command: the transaction server and the tools that run it.

Its help lists the commands from the parsers themselves (build_parser), so it
names only real ones; tests/test_embedded_restart.py runs each with --help.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg

from fuelcard_server import (
    audit,
    event_backfill,
    journal_commands,
    key_commands,
    logs,
    migrations,
    privacy_commands,
    roles,
    verify,
)
from fuelcard_server.db import one_shot
from fuelcard_server.embedded import EmbeddedPostgres
from fuelcard_server.gm import Sm2PrivateKey, Sm2PublicKey
from fuelcard_server.risk.model import RuleSet
from fuelcard_server.settings import Settings, SettingsError

log = logging.getLogger("fuelcard")

DEFAULT_RULES = Path(__file__).parent / "risk" / "default_rules.toml"


def _add_database_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a TOML file of settings (name = value, names as "
                   "in fuelcard_server.settings; env FUELCARD_CONFIG); environment and flags "
                   "override it")
    p.add_argument("--database-url", help="PostgreSQL URL (default: embedded PostgreSQL in "
                   "--data-dir; env FUELCARD_DATABASE_URL)")
    p.add_argument("--data-dir", type=Path, help="where the embedded database and keys live "
                   "(default ./data; env FUELCARD_DATA_DIR)")


def _settings(args: argparse.Namespace) -> Settings:
    s = Settings.from_env(config=getattr(args, "config", None))
    for name in ("listen", "database_url", "migrate_database_url", "data_dir", "workers",
                 "hold_ttl_s", "pool_max", "pool_min", "tls_dir", "replica_url", "replica_max_lag_s",
                 "metrics_listen", "otlp_endpoint",
                 "trace_sample_ratio", "access_log_sample", "log_level"):
        value = getattr(args, name, None)
        if value is not None:
            s.set(name, value)
    if getattr(args, "tls_dir", None) is not None or getattr(args, "tls", False):
        s.insecure = False
    if getattr(args, "insecure", False):
        s.insecure = True
    if getattr(args, "no_tracing", False):
        s.tracing = False
    return s.validate()


def _database(s: Settings) -> tuple[str, EmbeddedPostgres | None]:
    if s.database_url:
        return s.database_url, None
    pg = EmbeddedPostgres(s.data_dir / "postgres")
    url = pg.start()
    log.info("embedded PostgreSQL ready (data in %s, port %d)", pg.pgdata, pg.port)
    return url, pg


def _run_worker(s: Settings, url: str, demo: bool, port_file: str | None,
                worker: int = 0) -> None:
    """One serving process: its own loop, pools, telemetry and gRPC server."""
    import uvloop

    from fuelcard_server.app import FuelcardServer
    from fuelcard_server.telemetry import Telemetry

    logs.configure(s.log_level.upper())
    telemetry = Telemetry.from_settings(s, worker)
    telemetry.install_global()  # other modules' get_meter()/get_tracer() export with ours

    async def main() -> None:
        server = FuelcardServer(s, url, worker=worker, telemetry=telemetry)
        port = await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if port_file:
            await asyncio.to_thread(Path(port_file).write_text, str(port))
        if demo:
            from fuelcard_server import demo as demo_data
            made = await demo_data.seed(f"127.0.0.1:{port}",
                                        None if s.insecure else s.certs_dir)
            print(demo_data.banner(s.host_port[0], port, made,
                                   None if s.insecure else s.certs_dir), flush=True)
        await stop.wait()
        log.info("shutting down: draining in-flight calls")
        await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def demo_certs(directory: Path) -> None:
    """Development certificates for the demo: the server, an admin service
    (to create the demo data) and one terminal (to try the POS client)."""
    from fuelcard_server.certs import DevPki
    from fuelcard_server.identity import Role

    pki = DevPki(directory)
    if (directory / "admin-demo-admin.pem").exists():
        return
    pki.server()
    pki.client(Role.ADMIN, "demo-admin")
    pki.client(Role.POS, "KM-001-T1", "KM-001")


def cmd_serve(args: argparse.Namespace) -> int:
    s = _settings(args)
    if s.workers > 1 and s.host_port[1] == 0:
        raise SettingsError("--workers > 1 needs a fixed port to share")
    if args.demo and not s.insecure:
        demo_certs(s.certs_dir)
    url, pg = _database(s)
    try:
        migrations.migrate(s.migrate_database_url or url)
        if pg is not None:
            # migrated as the embedded cluster's superuser; served as the
            # role that cannot rewrite history (roles.py)
            url = roles.as_role(url)
        if s.workers == 1:
            _run_worker(s, url, args.demo, args.port_file)
            return 0
        s.ensure_keys()  # made once here, never raced by the workers
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_run_worker, name=f"fuelcard-worker-{i}",
                             args=(s, url, args.demo and i == 0,
                                   args.port_file if i == 0 else None, i))
                 for i in range(s.workers)]
        for p in procs:
            p.start()

        def forward(signum: int, _frame: object) -> None:
            for p in procs:
                if p.pid is not None and p.is_alive():
                    os.kill(p.pid, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        for p in procs:
            p.join()
        return max((p.exitcode or 0) for p in procs)
    finally:
        if pg is not None:
            pg.stop_if_started_here()


def cmd_certs(args: argparse.Namespace) -> int:
    from fuelcard_server.certs import DevPki
    from fuelcard_server.identity import Role

    pki = DevPki(args.dir)
    pki.ensure_ca()
    made = [pki.server()]
    for spec in args.terminal:
        station, _, terminal = spec.partition("/")
        if not station or not terminal:
            raise SettingsError(f"--terminal: expected STATION/TERMINAL, got {spec!r}")
        made.append(pki.client(Role.POS, terminal, station))
    for spec in args.adapter:
        channel, _, name = spec.partition("/")
        if not channel or not name:
            raise SettingsError(f"--adapter: expected CHANNEL/NAME, got {spec!r}")
        made.append(pki.client(Role.ADAPTER, name, channel))
    for role in (Role.ADMIN, Role.REVIEWER, Role.ANALYTICS):
        for name in getattr(args, role.value):
            made.append(pki.client(role, name))
    print(f"CA: {pki.ca_cert_path}")
    for issued in made:
        print(f"{issued.cert}  (key {issued.key})")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    s = _settings(args)
    url, pg = _database(s)
    try:
        if args.status or args.dry_run:
            plan = migrations.status(url)
            if args.status:
                print("\n".join(plan.describe()))
            if args.dry_run:
                todo = ([f"{migrations.LEGACY_MIGRATIONS[-1]} recorded as the baseline"] if plan.legacy
                        else []) + [m.name for m in plan.pending] + [f"functions/{f.name}"
                                                                      for f in plan.changed]
                todo += [migrations.PRIVILEGES_FILE] if plan.privileges_changed else []
                print("would apply: " + (", ".join(todo) if todo else "nothing (up to date)"))
            return 0
        applied = migrations.migrate(url)
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        return 0
    finally:
        if pg is not None:
            pg.stop_if_started_here()


def cmd_verify(args: argparse.Namespace) -> int:
    s = _settings(args)
    url, pg = _database(s)
    try:
        violations = verify.run(url)
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    for check in verify.CHECKS:
        bad = next((v for v in violations if v.check == check.name), None)
        print(f"{'FAIL' if bad else 'ok  '} {check.name}: {check.description}")
        if bad:
            for sample in bad.samples:
                print(f"       {sample}")
    if violations:
        print(f"{len(violations)} invariant(s) violated", file=sys.stderr)
        return 1
    print(f"all {len(verify.CHECKS)} invariants hold")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """One retention pass now, until nothing more is due (the servers run
    it in the background too; this one waits its turn for nothing: if a
    server holds the lock, it says so and stops)."""
    from fuelcard_server.clock import SystemClock
    from fuelcard_server.db import Database
    from fuelcard_server.retention import Retention

    s = _settings(args)
    url, pg = _database(s)

    async def run() -> tuple[int, int, bool]:
        db = Database(url, min_size=1, max_size=1, timeout_s=s.pool_timeout_s,
                      connect_timeout_s=s.connect_timeout_s, name="fuelcard-prune")
        await db.open()
        try:
            retention = Retention(db, SystemClock(), s)
            keys = step_ups = 0
            while True:
                pruned = await retention.run_once()
                keys += pruned.idempotency_keys
                step_ups += pruned.step_up_challenges
                if pruned.busy or not pruned.capped:
                    return keys, step_ups, pruned.busy
        finally:
            await db.close()

    try:
        keys, step_ups, busy = asyncio.run(run())
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    print(f"deleted {keys} idempotency keys and {step_ups} step-up challenges")
    if busy:
        print("another process is pruning right now; it carries on", file=sys.stderr)
    return 0


def _anchor(text: str) -> tuple[int, bytes] | Path:
    """ID:HASH (a head noted by hand), or an anchor file (`audit anchor`)."""
    record, colon, digest = text.partition(":")
    if not (colon and record.isdigit()):
        return Path(text)
    try:
        value = (int(record), bytes.fromhex(digest))
    except ValueError:
        value = (0, b"")
    if value[0] < 1 or len(value[1]) != 32:
        raise argparse.ArgumentTypeError("expected ID:HASH, e.g. 42:<64 hex digits>")
    return value


def _server_key(s: Settings) -> Sm2PrivateKey | None:
    """The server's SM2 key if it exists (never made here: a key made by
    this command would not be the one the server signs with)."""
    return s.signing_key() if s.signing_key_path.exists() else None


def _anchors_of(path: Path, s: Settings, public_hex: str | None, journal: bool = False
                ) -> tuple[list[tuple[int, bytes]], int]:
    """The heads anchored in an anchor file, each signature checked; or ([],
    exit code) after saying why they cannot be trusted."""
    from fuelcard_server import audit_anchor

    if public_hex is not None:
        try:
            public = Sm2PublicKey.from_hex(public_hex)
        except ValueError:
            print("fuelcard: --public-key: not an SM2 public key (128 hex digits)",
                  file=sys.stderr)
            return [], 2
    else:
        key = _server_key(s)
        if key is None:
            print(f"fuelcard: no server key at {s.signing_key_path}: pass --public-key "
                  "(SecurityService.GetServerSigningKey)", file=sys.stderr)
            return [], 2
        public = key.public_key
    try:
        anchors = audit_anchor.read(path, public,
                                    audit_anchor.JOURNAL if journal else audit_anchor.AUDIT)
    except audit_anchor.AnchorError as exc:
        print(f"FAIL {exc}")
        print(f"anchor file not trusted: {exc}", file=sys.stderr)
        return [], 1
    except OSError as exc:
        print(f"fuelcard: cannot read the anchor file: {exc.strerror or exc}", file=sys.stderr)
        return [], 2
    return [(a.record_id, a.hash) for a in anchors], 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    s = _settings(args)
    anchor: tuple[int, bytes] | None = None
    anchors: list[tuple[int, bytes]] = []
    if isinstance(args.anchor, Path):
        anchors, code = _anchors_of(args.anchor, s, args.public_key)
        if code:
            return code
        if not anchors:
            print(f"FAIL {args.anchor}: no anchor in it")
            print("anchor file holds no anchor: nothing to check the log against",
                  file=sys.stderr)
            return 1
    else:
        anchor = args.anchor
    url, pg = _database(s)
    try:
        report = audit.walk(url, anchor, anchors)
    except psycopg.Error as exc:
        print(f"fuelcard: cannot read the audit log: {exc.diag.message_primary or exc}",
              file=sys.stderr)
        return 2
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    if report.problems:
        for problem in report.problems:
            print(f"FAIL {problem}")
        first = report.problems[0]
        print(f"audit log broken at record {first.record_id}: {first.detail} "
              f"({len(report.problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"audit log intact: {report.records} record(s); head {report.head_id}:"
          f"{report.head_hash.hex()}"
          + (f"; extends all {len(anchors)} anchored head(s)" if anchors else ""))
    return 0


def cmd_audit_anchor(args: argparse.Namespace) -> int:
    """Append the chain's head, signed, to the anchor file - only if the
    chain is intact and still extends every head anchored there before."""
    from fuelcard_server import audit_anchor

    s = _settings(args)
    key = _server_key(s)
    if key is None:
        print(f"fuelcard: no server key at {s.signing_key_path} (the server makes it when it "
              "first starts; --data-dir or signing_key_file names where it is)", file=sys.stderr)
        return 2
    anchors: list[tuple[int, bytes]] = []
    if args.file.exists():
        anchors, code = _anchors_of(args.file, s, None)
        if code:
            return code
    url, pg = _database(s)
    try:
        report = audit.walk(url, anchors=anchors)
    except psycopg.Error as exc:
        print(f"fuelcard: cannot read the audit log: {exc.diag.message_primary or exc}",
              file=sys.stderr)
        return 2
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    if report.problems:
        for problem in report.problems:
            print(f"FAIL {problem}")
        first = report.problems[0]
        print(f"not anchored: audit log broken at record {first.record_id}: {first.detail}",
              file=sys.stderr)
        return 1
    head = f"{report.head_id}:{report.head_hash.hex()}"
    if report.head_id == 0:
        print("audit log empty: nothing to anchor")
        return 0
    if anchors and anchors[-1] == (report.head_id, report.head_hash):
        print(f"head {head} is already anchored in {args.file}")
        return 0
    try:
        audit_anchor.append(args.file, audit_anchor.Anchor.make(
            key, report.head_id, report.head_hash, dt.datetime.now(dt.UTC)))
    except OSError as exc:
        print(f"fuelcard: cannot write the anchor file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"anchored head {head} in {args.file}")
    return 0


def _rules_file(path: Path, s: Settings) -> RuleSet:
    """Read and validate a rule set file (TOML, or JSON by its suffix)."""
    from fuelcard_server.errors import ApiError
    from fuelcard_server.risk.model import load_text

    fmt = "json" if path.suffix.lower() == ".json" else "toml"
    try:
        return load_text(path.read_text(encoding="utf-8"), fmt,
                         allow_fault=s.risk_fault_injection)
    except ApiError as exc:
        lines = [f"  {v.field}: {v.description} ({v.reason})" for v in exc.violations]
        raise SettingsError(f"{path}: invalid rule set, nothing changed:\n" + "\n".join(lines)) \
            from None
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror}") from None


def cmd_risk_load(args: argparse.Namespace) -> int:
    import datetime as dt
    import getpass
    import hashlib
    import uuid

    from fuelcard_server.audit import APPEND_SQL
    from fuelcard_server.locks import AUDIT_LOCK
    from fuelcard_server.services.risk import LOAD_SQL, load_args

    s = _settings(args)
    path = DEFAULT_RULES if args.file is None else Path(args.file)
    rule_set = _rules_file(path, s)
    actor = f"cli:{getpass.getuser()}"
    url, pg = _database(s)
    try:
        with one_shot(url, autocommit=True) as conn, conn.transaction():
            row = conn.execute(LOAD_SQL, {
                "caller": "cli", "request_id": f"cli-risk-load-{uuid.uuid4().hex}",
                "request_hash": hashlib.sha256(rule_set.digest().encode()).digest(),
                **load_args(rule_set, actor), "now": dt.datetime.now(dt.UTC)}).fetchone()
            # the change in the hash-chained audit trail too, in the same transaction
            conn.execute(APPEND_SQL, {"lock": AUDIT_LOCK, "actor": actor,
                                      "method": "cli/fuelcard risk load", "target": None,
                                      "outcome": "OK"})
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    assert row is not None
    info, changes = row[0]["rule_set"], row[0]["changes"]
    print(f"rule set {info['name']!r} version {info['version']} in force: {info['rules']} rules"
          f" (added {len(changes['added'])}, removed {len(changes['removed'])},"
          f" changed {len(changes['changed'])})")
    return 0


def cmd_risk_backtest(args: argparse.Namespace) -> int:
    import datetime as dt

    from fuelcard_server.risk import backtest

    s = _settings(args)
    rule_set = _rules_file(Path(args.rules), s)
    url, pg = _database(s)
    try:
        report = backtest.run(
            url, rule_set,
            since=dt.datetime.fromisoformat(args.since) if args.since else None,
            until=dt.datetime.fromisoformat(args.until) if args.until else None)
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    print("\n".join(report.lines()))
    return 0


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected YYYY-MM-DD") from None


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Reconcile a channel's daily settlement file (issue 8): exit 0 when
    everything matches, 1 on any break, 2 if the file cannot be read.
    Amounts are printed in yuan and times in Beijing time, as on the bills."""
    from fuelcard_adapters.channels import CHANNELS, by_name
    from fuelcard_adapters.neutral import FormatError

    from fuelcard_server import reconcile

    if getattr(args, "breaks_command", None) is not None:
        return _cmd_reconcile_breaks(args)
    missing = [flag for flag, value in (("--channel", args.channel), ("--date", args.date),
                                        ("--file", args.file)) if value is None]
    if missing:
        print(f"fuelcard reconcile: {', '.join(missing)} required (or: reconcile breaks "
              "list|resolve)", file=sys.stderr)
        return 2
    try:
        files = by_name(args.channel)
    except KeyError:
        print(f"fuelcard: unknown channel {args.channel!r} (one of {', '.join(CHANNELS)}, any case)",
              file=sys.stderr)
        return 2
    name = _channel_name(files.channel)
    s = _settings(args)
    url, pg = _database(s)
    try:
        result = reconcile.reconcile(url, files, args.date, args.file, now=dt.datetime.now(dt.UTC),
                                     report=args.report, show=args.show)
    except (FormatError, UnicodeDecodeError, OSError) as exc:
        print(f"fuelcard: {args.file}: {exc}", file=sys.stderr)
        return 2
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    warning = result.date_warning(args.date)
    if warning:
        print(f"fuelcard: warning: {args.file.name}: {warning}", file=sys.stderr)
    yuan = reconcile.yuan
    print(f"reconciliation run {result.run_id}: {name} {args.date} ({args.file.name})")
    print(f"  theirs {result.theirs:>9} records: paid {yuan(result.theirs_paid_fen)} yuan, refunded "
          f"{yuan(result.theirs_refunded_fen)} yuan, fees {yuan(result.theirs_fee_fen)} yuan")
    print(f"  ours   {result.ours:>9} records: paid {yuan(result.ours_paid_fen)} yuan, refunded "
          f"{yuan(result.ours_refunded_fen)} yuan")
    for outcome, n in result.counts.items():
        print(f"  {outcome:<16} {n:>9}")
    for line in result.breaks:
        print(f"  {line}")
    if result.break_count > len(result.breaks):
        print(f"  ... {result.break_count - len(result.breaks)} more "
              "(--report FILE lists every transaction)")
    if result.break_count:
        print(f"{result.break_count} break(s), stored for follow-up "
              "(fuelcard reconcile breaks list)", file=sys.stderr)
        return 1
    print("no breaks")
    return 0


def _channel_name(channel: int) -> str:
    from fuelcard_adapters.channels import CHANNELS

    return next(name for name, files in CHANNELS.items() if files.channel == channel)


def _cmd_reconcile_breaks(args: argparse.Namespace) -> int:
    """`reconcile breaks list|resolve`: the follow-up ReconciliationService
    offers, straight on the database (the SQL the service runs), for finance
    staff at the server's console."""
    import getpass

    from fuelcard_adapters.channels import CHANNELS, by_name

    from fuelcard_server import reconcile

    channel = 0
    if getattr(args, "channel", None):
        try:
            channel = by_name(args.channel).channel
        except KeyError:
            print(f"fuelcard: unknown channel {args.channel!r} (one of {', '.join(CHANNELS)}, "
                  "any case)", file=sys.stderr)
            return 2
    names = {files.channel: name for name, files in CHANNELS.items()}
    if args.breaks_command == "list" and args.limit < 1:
        print("fuelcard: --limit must be >= 1", file=sys.stderr)
        return 2
    # who, for the audit trail (and the break's resolved_by)
    by = getattr(args, "by", None) or f"cli:{getpass.getuser()}"
    s = _settings(args)
    url, pg = _database(s)
    try:
        if args.breaks_command == "list":
            found = reconcile.list_breaks(url, by=by, channel=channel, day=args.date,
                                          include_resolved=args.all, limit=args.limit)
            for line in reconcile.break_lines(found, names):
                print(line)
            print(f"{len(found)} break(s)" + ("" if args.all else " open"), file=sys.stderr)
            return 0
        try:
            resolved = reconcile.resolve_break(url, args.break_id, args.resolution, by,
                                               now=dt.datetime.now(dt.UTC),
                                               request_id=args.request_id)
        except reconcile.BreakError as exc:
            print(f"fuelcard: break {args.break_id}: {exc.reason}", file=sys.stderr)
            return 1
        for line in reconcile.break_lines([resolved], names):
            print(line)
        return 0
    finally:
        if pg is not None:
            pg.stop_if_started_here()


def cmd_events_backfill(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.max_backlog < 0:
        print("fuelcard: --batch must be >= 1 and --max-backlog >= 0", file=sys.stderr)
        return 2
    s = _settings(args)
    url, pg = _database(s)
    try:
        if not args.status:
            written = event_backfill.run(url, batch=args.batch, max_backlog=args.max_backlog,
                                         log=lambda m: print(m, flush=True))
            print(f"{written} events written" if written else "nothing to write (done)")
        with one_shot(url) as conn:
            for source in event_backfill.progress(conn):
                state = "done" if source.done else "to do"
                print(f"{source.name}: {state} ({source.done_id} of {source.through_id})")
    finally:
        if pg is not None:
            pg.stop_if_started_here()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuelcard", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The fuel card transaction server and the tools that run it.\n"
                    "`fuelcard COMMAND --help` says more about each command.",
        epilog="examples:\n"
               "  fuelcard serve --insecure --demo   a development server with demo cards "
               "(plaintext, loopback)\n"
               "  fuelcard serve                     mutual TLS, embedded PostgreSQL in ./data\n"
               "  fuelcard migrate                   apply pending migrations, then exit\n"
               "  fuelcard audit verify              check the audit log's hash chain")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    _add_database_flags(p)
    p.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    p.add_argument("--hold-ttl-s", type=int, dest="hold_ttl_s",
                   help="seconds before an unconfirmed hold is released (default 1800)")
    p.add_argument("--pool-max", type=int, dest="pool_max",
                   help="database connections per process (default 8)")
    p.add_argument("--pool-min", type=int, dest="pool_min")
    p.add_argument("--tls", action="store_true",
                   help="mutual TLS with the certificates in DATA_DIR/certs (the default)")
    p.add_argument("--tls-dir", type=Path, help="mutual TLS with the certificates in this "
                   "directory: server.pem, server.key, ca.pem")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext without client identities, loopback only (development)")
    p.add_argument("--migrate-database-url", dest="migrate_database_url",
                   help="a URL of the schema owner (or an admin that is a member of "
                   "fuelcard_owner) to migrate with before serving, when --database-url is the "
                   "serving role fuelcard_app's (env FUELCARD_MIGRATE_DATABASE_URL; README, "
                   "\"Least privilege\")")
    p.add_argument("--replica-url", dest="replica_url",
                   help="a streaming replica for report and history reads (env "
                   "FUELCARD_REPLICA_URL)")
    p.add_argument("--replica-max-lag-s", type=float, dest="replica_max_lag_s",
                   help="past this lag (seconds, default 30) the replica is not read: report "
                   "reads (health name fuelcard.v1.Reads) go NOT_SERVING until it catches up")
    p.add_argument("--metrics-listen", dest="metrics_listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (worker i of "
                   "--workers N on PORT+i)")
    p.add_argument("--otlp-endpoint", dest="otlp_endpoint", metavar="URL",
                   help="export traces and metrics over OTLP/gRPC, e.g. http://127.0.0.1:4317")
    p.add_argument("--trace-sample-ratio", type=float, dest="trace_sample_ratio",
                   help="share of root traces kept (default 0.05; a caller's sampled "
                   "traceparent is always followed)")
    p.add_argument("--access-log-sample", type=float, dest="access_log_sample",
                   help="share of RPCs given an access log line, 0..1 (default 0.01; env "
                   "FUELCARD_ACCESS_LOG_SAMPLE)")
    p.add_argument("--no-tracing", action="store_true", help="create no spans at all")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO (default), WARNING, ERROR")
    p.add_argument("--demo", action="store_true", help="create demo accounts and cards")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("certs", help="create a development CA, server and client certificates")
    p.add_argument("--dir", type=Path, required=True, help="where to write them")
    p.add_argument("--terminal", action="append", default=[], metavar="STATION/TERMINAL",
                   help="a POS terminal certificate, e.g. KM-001/KM-001-T1 (repeatable)")
    p.add_argument("--adapter", action="append", default=[], metavar="CHANNEL/NAME",
                   help="a payment adapter certificate, e.g. WECHAT_PAY/wechat-gw (repeatable)")
    for role in ("admin", "reviewer", "analytics"):
        p.add_argument(f"--{role}", action="append", default=[], metavar="NAME",
                       help=f"an internal {role} service certificate (repeatable)")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("migrate", help="apply pending schema migrations, then every changed function file")
    _add_database_flags(p)
    p.add_argument("--status", action="store_true",
                   help="list applied and pending migrations and current and changed function files")
    p.add_argument("--dry-run", action="store_true", help="say what a run would apply; change nothing")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("verify", help="check every ledger invariant; non-zero exit on violation")
    _add_database_flags(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", help="delete idempotency keys and step-up challenges past "
                       "their retention now (servers do it in the background)")
    _add_database_flags(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("audit", help="the audit trail")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser("verify", help="check the audit log's hash chain; non-zero exit "
                             "naming the first broken record")
    _add_database_flags(p)
    p.add_argument("--anchor", type=_anchor, metavar="FILE|ID:HASH",
                   help="an anchor file written by `audit anchor` (every line's signature is "
                   "checked, and the chain must still extend every anchored head), or a record "
                   "id and its hash noted earlier (the head this command printed): also "
                   "catches a log cut short or rewritten wholesale")
    p.add_argument("--public-key", dest="public_key", metavar="HEX",
                   help="the server's SM2 public key (X || Y, 128 hex digits) to check an anchor "
                   "file with; default: from the server's key in the data directory")
    p.set_defaults(func=cmd_audit_verify)
    p = audit_sub.add_parser("anchor", help="append the audit chain's head (record id and hash, "
                             "signed with the server's SM2 key) to an append-only anchor file "
                             "kept outside the database; refuses if the chain is broken or no "
                             "longer extends a head anchored there")
    _add_database_flags(p)
    p.add_argument("--file", type=Path, required=True,
                   help="the anchor file (created if absent; lines are only ever appended): "
                   "keep it, or copies of it, where database administrators cannot write")
    p.set_defaults(func=cmd_audit_anchor)

    journal_commands.add_parsers(sub, _add_database_flags)

    p = sub.add_parser("risk", help="the risk engine's rule sets")
    risk_sub = p.add_subparsers(dest="risk_command", required=True)
    p = risk_sub.add_parser("load", help="validate a rule set file and put it in force (no "
                            "restart); an invalid file changes nothing")
    _add_database_flags(p)
    p.add_argument("file", nargs="?", help="TOML (or .json) rule set; default: the default set")
    p.set_defaults(func=cmd_risk_load)
    p = risk_sub.add_parser("backtest", help="replay stored transactions through a rule set "
                            "and report, per rule, what it would decline or suspend")
    _add_database_flags(p)
    p.add_argument("--rules", required=True, help="TOML (or .json) rule set file")
    p.add_argument("--since", help="only transactions from this ISO time on")
    p.add_argument("--until", help="only transactions before this ISO time")
    p.set_defaults(func=cmd_risk_backtest)
    p = sub.add_parser(
        "reconcile", help="reconcile a channel's daily settlement file (non-zero exit on any "
        "break); `reconcile breaks list|resolve` follows up the breaks",
        description="Amounts are shown in yuan and times in Beijing time, as on the bills.")
    _add_database_flags(p)
    p.add_argument("--channel", help="BANK_CARD, WECHAT_PAY, ALIPAY or ECNY (any case)")
    p.add_argument("--date", type=_date, help="the business day, YYYY-MM-DD (Beijing time)")
    p.add_argument("--file", type=Path, help="the channel's file, in its format")
    p.add_argument("--report", type=Path,
                   help="write every transaction and its outcome here (CSV, yuan, Beijing time)")
    p.add_argument("--show", type=int, default=50, help="breaks to print (default 50)")
    p.set_defaults(func=cmd_reconcile)
    recon_sub = p.add_subparsers(dest="reconcile_command")
    breaks_p = recon_sub.add_parser("breaks", help="the breaks reconciliation found")
    breaks_sub = breaks_p.add_subparsers(dest="breaks_command", required=True)
    q = breaks_sub.add_parser("list", help="open breaks, newest first (yuan, Beijing time)")
    _add_database_flags(q)
    q.add_argument("--channel", help="only this channel: BANK_CARD, WECHAT_PAY, ALIPAY or ECNY "
                   "(any case)")
    q.add_argument("--date", type=_date, help="only this business day, YYYY-MM-DD")
    q.add_argument("--all", action="store_true", help="resolved breaks too")
    q.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    q = breaks_sub.add_parser("resolve", help="mark a break resolved, saying how")
    _add_database_flags(q)
    q.add_argument("break_id", help="the break's id, as `breaks list` prints it")
    q.add_argument("--resolution", required=True, help="what was done about it (free text)")
    q.add_argument("--by", help="who resolved it, for the break and the audit trail "
                   "(default cli:<login name>)")
    q.add_argument("--request-id", dest="request_id",
                   help="repeat a resolve that got no answer: the same id answers the first result")

    p = sub.add_parser("events", help="the analytics event stream")
    events_sub = p.add_subparsers(dest="events_command", required=True)
    p = events_sub.add_parser(
        "backfill", help="write stream events for the history booked before the stream "
        "existed (an upgraded database); batched, resumable, safe while the server serves")
    _add_database_flags(p)
    p.add_argument("--batch", type=int, default=2000,
                   help="history rows per batch, one short transaction each (default 2000)")
    p.add_argument("--max-backlog", type=int, default=20_000, dest="max_backlog",
                   help="unpositioned outbox rows at most before the next batch (default 20000)")
    p.add_argument("--status", action="store_true", help="only print the progress")
    p.set_defaults(func=cmd_events_backfill)

    key_commands.add_parser(sub, _add_database_flags)
    privacy_commands.add_parser(sub, _add_database_flags)

    # Settlement exceptions: list, get, resolve (exception_commands.py).
    from fuelcard_server import exception_commands
    exception_commands.add_parser(sub, _add_database_flags, _settings, _database)

    # `fuelcard admin ...`: operator work over gRPC with the admin certificate
    # (admin_cli.py holds the whole group).
    from fuelcard_server import admin_cli
    admin_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure()
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"fuelcard: bad setting: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
