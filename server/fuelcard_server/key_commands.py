"""`fuelcard keys ...`: export, import, check and rotate the key set
(key_custody.py holds the logic; this is the command line around it)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg

from fuelcard_server import key_custody
from fuelcard_server.db import one_shot
from fuelcard_server.key_custody import FileKeySetStore, KeyCustodyError

_SOURCES = (f"--passphrase-file FILE, else the environment variable {key_custody.PASSPHRASE_ENV}, "
            "else a prompt")


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> str:
    if args.passphrase_file is not None:
        try:
            lines = Path(args.passphrase_file).read_text().splitlines()
        except OSError as exc:
            raise KeyCustodyError(f"{args.passphrase_file}: {exc.strerror}") from None
        return lines[0] if lines else ""
    if os.environ.get(key_custody.PASSPHRASE_ENV):
        return os.environ[key_custody.PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise KeyCustodyError(f"no passphrase: give one ({_SOURCES})")
    first = getpass.getpass("passphrase: ")
    if confirm and getpass.getpass("passphrase again: ") != first:
        raise KeyCustodyError("the passphrases differ")
    return first


def _store(args: argparse.Namespace) -> FileKeySetStore:
    from fuelcard_server import cli

    return FileKeySetStore(cli._settings(args))


def _with_database(args: argparse.Namespace, run: Callable[[str, FileKeySetStore], int]) -> int:
    from fuelcard_server import cli

    s = cli._settings(args)
    url, pg = cli._database(s)
    try:
        return run(url, FileKeySetStore(s))
    except psycopg.Error as exc:
        print(f"fuelcard: database error: {exc.diag.message_primary or exc}", file=sys.stderr)
        return 2
    finally:
        if pg is not None:
            pg.stop_if_started_here()


def cmd_export(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.force:
        raise KeyCustodyError(f"{out} exists: pass --force to overwrite it")
    key_set = _store(args).load(create=False)
    text = key_custody.export_sealed(key_set, _passphrase(args, confirm=True))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"key set sealed in {out} (check values {key_set.check_values()}); keep it apart "
          "from the database backups, and the passphrase apart from both")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        text = Path(args.in_file).read_text()
    except OSError as exc:
        raise KeyCustodyError(f"{args.in_file}: {exc.strerror}") from None
    key_set = key_custody.import_sealed(text, _passphrase(args, confirm=False))
    store = _store(args)
    store.install(key_set, replace=args.replace)
    print(f"key set installed in {store.settings.data_dir} (check values "
          f"{key_set.check_values()})")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    def run(url: str, store: FileKeySetStore) -> int:
        key_set = store.load(create=False)
        with one_shot(url, autocommit=True) as conn, conn.transaction():
            key_custody.check_key_set(conn, key_set)
        print(f"this host's key set is the database's (check values {key_set.check_values()})")
        return 0
    return _with_database(args, run)


def cmd_rotate_root(args: argparse.Namespace) -> int:
    def run(url: str, store: FileKeySetStore) -> int:
        key_custody.rotate_root(url, store, say=print)
        print("export the key set again and import it on every other host before they start")
        return 0
    return _with_database(args, run)


def cmd_rotate_card_index(args: argparse.Namespace) -> int:
    def progress(done: int, total: int) -> None:
        print(f"re-indexed {done} of {total} cards", flush=True)

    def run(url: str, store: FileKeySetStore) -> int:
        key_custody.rotate_card_index(url, store, batch=args.batch, progress=progress, say=print)
        print("export the key set again and import it on every other host before they start")
        return 0
    return _with_database(args, run)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               add_database_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `keys` command group, under `sub` (cli.build_parser)."""
    p = sub.add_parser("keys", help="the key set: export, import, check, rotate (README, Key "
                       "custody)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)

    def passphrase_flag(q: argparse.ArgumentParser) -> None:
        q.add_argument("--passphrase-file", dest="passphrase_file", type=Path, metavar="FILE",
                       help=f"read the passphrase from FILE's first line (else env "
                       f"{key_custody.PASSPHRASE_ENV}, else a prompt)")

    q = keys_sub.add_parser("export", help="seal this host's key set under a passphrase "
                            "(SM4-GCM, scrypt) into a file, to import on other hosts or keep "
                            "as the keys' backup")
    add_database_flags(q)
    q.add_argument("--out", type=Path, required=True, help="the file to write (mode 0600)")
    q.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    passphrase_flag(q)
    q.set_defaults(func=cmd_export)

    q = keys_sub.add_parser("import", help="install a key set exported by `keys export` on "
                            "this host (its data directory)")
    add_database_flags(q)
    q.add_argument("--in", dest="in_file", type=Path, required=True, help="the exported file")
    q.add_argument("--replace", action="store_true",
                   help="overwrite keys this host already holds (back them up first)")
    passphrase_flag(q)
    q.set_defaults(func=cmd_import)

    q = keys_sub.add_parser("check", help="whether this host's key set is the one the database "
                            "was made with (non-zero exit naming the key that differs)")
    add_database_flags(q)
    q.set_defaults(func=cmd_check)

    q = keys_sub.add_parser("rotate-root", help="a new root key: re-wrap every working key and "
                            "the data key under it (servers stopped)")
    add_database_flags(q)
    q.set_defaults(func=cmd_rotate_root)

    q = keys_sub.add_parser("rotate-card-index", help="a new card-index key: re-index every "
                            "card in batches, with progress; resumable (servers stopped)")
    add_database_flags(q)
    q.add_argument("--batch", type=int, default=1000,
                   help="cards per transaction (default 1000)")
    q.set_defaults(func=cmd_rotate_card_index)
