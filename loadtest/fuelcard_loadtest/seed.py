"""Seeding: accounts, cards and opening balances, COPYed straight into fc.

Going through the API would take minutes for 100 000 cards (three RPCs per
card); COPY takes seconds. The rows are exactly what the API would have
written, so `fuelcard verify` holds afterwards:

* fc.accounts with balance_fen = the opening recharge,
* fc.account_holders (a placeholder name, no personal data),
* fc.cards with pan_index = PanIndex(key).of(pan) and the masked number,
* fc.recharges (channel COUNTER) and one fc.journal row per recharge
  (kind 1, money) debiting CHANNEL_CLEARING_COUNTER and crediting the account.

Card numbers are never stored: they are a function of (dataset tag, card
index), so every generator process rebuilds them. The side table
loadtest.cards keeps (tag, i, pan_index, account uid) for pgbench, which
cannot compute an HMAC, and loadtest.datasets lets a later run on the same
database reuse the data set instead of seeding it again.

With history_entries, a year of past sales and recharges follows (see
history.py), so the tables the hot path touches have the size of a database
in service.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from fuelcard_server.cards import ISSUER_PREFIX, PanIndex, luhn_check_digit, mask

from fuelcard_loadtest import history
from fuelcard_loadtest.scenarios import Layout

# A 19-digit number: issuer prefix (4) + dataset tag (3) + card index (11) + check.
MAX_TAG = 999
MAX_CARDS = 10**11
SEED_CHANNEL = 5  # CHANNEL_COUNTER
SEED_CLEARING = "CHANNEL_CLEARING_COUNTER"
CHUNK_ROWS = 20_000

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS loadtest;
CREATE TABLE IF NOT EXISTS loadtest.datasets (
    tag        integer PRIMARY KEY CHECK (tag BETWEEN 1 AND 999),
    scenario   text        NOT NULL,
    cards      integer     NOT NULL,
    accounts   integer     NOT NULL,
    probe      bytea       NOT NULL,   -- pan_index of card 0: detects a changed key
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS loadtest.cards (
    tag         integer NOT NULL,
    i           integer NOT NULL,
    pan_index   bytea   NOT NULL,
    account_uid uuid    NOT NULL,
    PRIMARY KEY (tag, i)
);
-- history_entries: journal entries the data set was seeded with (0: only the
-- opening recharges); complete: false while its history is still loading.
ALTER TABLE loadtest.datasets
    ADD COLUMN IF NOT EXISTS history_entries bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS complete        boolean NOT NULL DEFAULT true;
"""


def card_number(tag: int, i: int) -> str:
    """The card number of card `i` of data set `tag`: Luhn-valid, 19 digits."""
    payload = f"{ISSUER_PREFIX}{tag:03d}{i:011d}"
    return payload + luhn_check_digit(payload)


def account_uid(tag: int, account: int) -> str:
    """The public id of account `account` of data set `tag`."""
    return f"10ad7e57-{tag:04x}-4000-8000-{account:012x}"


def _card_uid(tag: int, i: int) -> str:
    return f"10adca2d-{tag:04x}-4000-8000-{i:012x}"


def _recharge_uid(tag: int, account: int) -> str:
    return f"10ad2ec8-{tag:04x}-4000-8000-{account:012x}"


@dataclass(frozen=True)
class Dataset:
    tag: int
    scenario: str
    cards: int
    accounts: int
    reused: bool = False
    seconds: float = 0.0
    history_entries: int = 0
    complete: bool = True

    @property
    def layout(self) -> Layout:
        return Layout(self.scenario, self.cards)


def _ids(conn: psycopg.Connection[Any], table: str, n: int) -> list[int]:
    """Reserve n values of the table's identity sequence (COPY may write
    identity columns, like INSERT ... OVERRIDING SYSTEM VALUE)."""
    rows = conn.execute(
        "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
        (table, n)).fetchall()
    return [int(r[0]) for r in rows]


# What the seeder writes per table; anything else must have a default or be
# nullable, or the schema has moved on without the seeder (checked first).
WRITES = {
    "accounts": {"id", "uid", "kind", "balance_fen", "created_at"},
    "account_holders": {"account_id", "name"},
    "cards": {"id", "uid", "account_id", "pan_index", "masked", "created_at"},
    "recharges": {"id", "uid", "account_id", "channel", "channel_txn_id", "amount_fen",
                  "balance_after_fen", "created_at"},
    "journal": {"kind", "asset", "debit_account_id", "credit_account_id", "amount",
                "recharge_id", "created_at"},
}


def _columns(conn: psycopg.Connection[Any]) -> dict[str, set[str]]:
    """Existing columns of the fc tables we write; raise if one we do not
    write is required."""
    rows = conn.execute(
        "SELECT table_name::text, column_name::text,"
        "       is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO'"
        "       AND is_generated = 'NEVER'"
        "  FROM information_schema.columns"
        " WHERE table_schema = 'fc' AND table_name = ANY(%s)", (list(WRITES),)).fetchall()
    found: dict[str, set[str]] = {t: set() for t in WRITES}
    missing = []
    for table, column, required in rows:
        found[table].add(column)
        if required and column not in WRITES[table]:
            missing.append(f"fc.{table}.{column}")
    if missing:
        raise RuntimeError("the schema has required columns the seeder does not fill: "
                           + ", ".join(missing) + " (update fuelcard_loadtest/seed.py)")
    return found


def _copy(conn: psycopg.Connection[Any], statement: str,
          lines: Iterator[str]) -> None:
    with conn.cursor() as cur, cur.copy(statement.encode()) as copy:
        buf = io.StringIO()
        for n, line in enumerate(lines, 1):
            buf.write(line)
            if n % CHUNK_ROWS == 0:
                copy.write(buf.getvalue())
                buf = io.StringIO()
        if buf.tell():
            copy.write(buf.getvalue())


def ensure_schema(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)


def find(url: str, scenario: str, cards: int, key: bytes,
         history_entries: int = 0) -> Dataset | None:
    """A data set of this shape seeded earlier with this key (complete ones
    first; an incomplete one is a history load to resume)."""
    probe_for = PanIndex(key)
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT d.tag, d.accounts, d.probe, d.complete FROM loadtest.datasets d"
            " WHERE d.scenario = %s AND d.cards = %s AND d.history_entries = %s"
            "   AND EXISTS (SELECT 1 FROM fc.cards c WHERE c.pan_index = d.probe)"
            " ORDER BY d.complete DESC, d.tag DESC", (scenario, cards, history_entries)).fetchall()
    for tag, accounts, probe, complete in rows:
        if bytes(probe) == probe_for.of(card_number(tag, 0)):
            return Dataset(tag, scenario, cards, accounts, reused=True,
                           history_entries=history_entries, complete=bool(complete))
    return None


def _load_history(url: str, found: Dataset, log: Callable[[str], None],
                  jobs: int) -> float:
    loaded = history.load(url, found.tag, found.layout, found.history_entries, jobs=jobs,
                          log=log)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE loadtest.datasets SET complete = true WHERE tag = %s", (found.tag,))
    return loaded.seconds


def seed(url: str, key: bytes, scenario: str, cards: int, *, reuse: bool = True,
         history_entries: int = 0, history_jobs: int = 2,
         log: Callable[[str], None] = print) -> Dataset:
    """Seed (or reuse) a data set of `cards` cards laid out for `scenario`;
    with history_entries, also a year of history (see history.py) so that
    its journal holds that many entries."""
    if not 1 <= cards < MAX_CARDS:
        raise ValueError(f"cards must be between 1 and {MAX_CARDS - 1}")
    layout = Layout(scenario, cards)
    if history_entries:
        history.Plan.of(layout, history_entries)  # refuses too few entries
    ensure_schema(url)
    if reuse:
        found = find(url, scenario, cards, key, history_entries)
        if found is not None and found.complete:
            log(f"seed: reusing data set {found.tag} ({scenario}, {cards} cards,"
                f" {found.accounts} accounts"
                + (f", {history_entries} journal entries)" if history_entries else ")"))
            return found
        if found is not None:
            log(f"seed: resuming the history of data set {found.tag}")
            seconds = _load_history(url, found, log, history_jobs)
            return replace(found, reused=False, seconds=seconds, complete=True)
    started = time.monotonic()
    pan_index = PanIndex(key)
    created = dt.datetime.now(dt.UTC)
    if history_entries:
        # the accounts were opened before their history
        created -= dt.timedelta(days=history.HISTORY_DAYS + 2)
    now = created.isoformat()
    n_accounts = layout.accounts
    with psycopg.connect(url) as conn:
        # one seeder at a time picks the next tag
        conn.execute("LOCK TABLE loadtest.datasets IN EXCLUSIVE MODE")
        row = conn.execute("SELECT coalesce(max(tag), 0) + 1 FROM loadtest.datasets").fetchone()
        assert row is not None
        tag = int(row[0])
        if tag > MAX_TAG:
            raise RuntimeError("loadtest.datasets is full (999 tags): use a fresh database")
        columns = _columns(conn)
        with_after = "balance_after_fen" in columns["recharges"]
        clearing_row = conn.execute("SELECT fc.system_account(p_code => %(code)s)",
                                   {"code": SEED_CLEARING}).fetchone()
        assert clearing_row is not None and clearing_row[0] is not None
        clearing = int(clearing_row[0])

        account_ids = _ids(conn, "fc.accounts", n_accounts)
        card_ids = _ids(conn, "fc.cards", cards)
        recharge_ids = _ids(conn, "fc.recharges", n_accounts)
        balances = [layout.opening_balance_fen(a) for a in range(n_accounts)]
        pans = [card_number(tag, i) for i in range(cards)]
        indexes = [pan_index.of(p).hex() for p in pans]

        _copy(conn, "COPY fc.accounts (id, uid, kind, balance_fen, created_at) FROM STDIN",
              (f"{account_ids[a]}\t{account_uid(tag, a)}\t{layout.kind_of(a)}\t{balances[a]}"
               f"\t{now}\n" for a in range(n_accounts)))
        _copy(conn, "COPY fc.account_holders (account_id, name) FROM STDIN",
              (f"{account_ids[a]}\tloadtest {tag}-{a}\n" for a in range(n_accounts)))
        _copy(conn, "COPY fc.cards (id, uid, account_id, pan_index, masked, created_at) FROM STDIN",
              (f"{card_ids[i]}\t{_card_uid(tag, i)}\t{account_ids[layout.account_of(i)]}"
               f"\t\\\\x{indexes[i]}\t{mask(pans[i])}\t{now}\n" for i in range(cards)))
        after = ", balance_after_fen" if with_after else ""
        _copy(conn, "COPY fc.recharges (id, uid, account_id, channel, channel_txn_id, amount_fen,"
              f" created_at{after}) FROM STDIN",
              (f"{recharge_ids[a]}\t{_recharge_uid(tag, a)}\t{account_ids[a]}\t{SEED_CHANNEL}"
               f"\tloadtest-seed-{tag}-{a}\t{balances[a]}\t{now}"
               + (f"\t{balances[a]}\n" if with_after else "\n") for a in range(n_accounts)))
        _copy(conn, "COPY fc.journal (kind, asset, debit_account_id, credit_account_id, amount,"
              " recharge_id, created_at) FROM STDIN",
              (f"1\t1\t{clearing}\t{account_ids[a]}\t{balances[a]}\t{recharge_ids[a]}\t{now}\n"
               for a in range(n_accounts)))
        _copy(conn, "COPY loadtest.cards (tag, i, pan_index, account_uid) FROM STDIN",
              (f"{tag}\t{i}\t\\\\x{indexes[i]}\t{account_uid(tag, layout.account_of(i))}\n"
               for i in range(cards)))
        conn.execute(
            "INSERT INTO loadtest.datasets (tag, scenario, cards, accounts, probe,"
            " history_entries, complete) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (tag, scenario, cards, n_accounts, bytes.fromhex(indexes[0]), history_entries,
             not history_entries))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE fc.accounts, fc.cards, fc.recharges, fc.journal, loadtest.cards")
    seconds = time.monotonic() - started
    log(f"seed: data set {tag} ({scenario}): {cards} cards on {n_accounts} accounts"
        f" in {seconds:.1f} s")
    dataset = Dataset(tag, scenario, cards, n_accounts, reused=False, seconds=seconds,
                      history_entries=history_entries, complete=not history_entries)
    if history_entries:
        seconds += _load_history(url, dataset, log, history_jobs)
        dataset = replace(dataset, seconds=seconds, complete=True)
    return dataset

