"""The database ceiling: pgbench running the SQL of one pump cycle.

One pgbench transaction = the statement the server sends for Authorize
(`SELECT fc.authorize(...)`) and, if approved, the one it sends for Confirm
(`SELECT fc.confirm(...)`), each its own autocommit transaction and each a
prepared statement (-M prepared), as the server does. pgbench cannot compute
the HMAC blind index, so the card is picked from the side table
loadtest.cards (tag, i, pan_index) inside the authorize statement. There is
no pump time: this is what PostgreSQL alone can do, with no network
framework and no Python in the way.

(The framework ceiling, a no-op RPC on the same server stack, is driven by
the same generator as the scenarios: workload "health" in worker.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from fuelcard_server.embedded import bin_dir

from fuelcard_loadtest.worker import AMOUNT_MAX_FEN, AMOUNT_MIN_FEN, UNIT_PRICE_FEN

STATION = "PGBENCH"

# What pgbench passes for each parameter the server fills, by parameter
# name. The statements follow the functions' current signatures (read from
# the database), so a new parameter does not break the ceiling: parameters
# not named here get NULL, which is what the server sends for the terminal
# authentication fields in development mode (plaintext on loopback); in
# production mode the terminal's fields are filled (below).
AUTHORIZE_ARGS = {
    "p_caller": "''",
    "p_request_id": "'pgb-' || gen_random_uuid()",
    "p_request_hash": "'\\x00'::bytea",
    "p_pan_index": "(SELECT pan_index FROM loadtest.cards WHERE tag = {tag} AND i = :i)",
    "p_amount_fen": ":amount::bigint",
    "p_station_id": "'{station}'",
    "p_terminal_id": "'{station}-T'",
    "p_nozzle": "1",
    "p_product": "1::smallint",
    "p_now": "now()",
    "p_ttl": "interval '30 minutes'",
}
CONFIRM_ARGS = {
    "p_caller": "''",
    "p_request_id": "'pgb-' || gen_random_uuid()",
    "p_request_hash": "'\\x00'::bytea",
    "p_hold_uid": ":hold_id::uuid",
    "p_final_fen": ":final::bigint",
    "p_volume_ml": "(:final * 1000 / {price})::bigint",
    "p_unit_price_fen": "{price}::bigint",
    "p_now": "now()",
}

# Production mode: the server passes the terminal (station and terminal id
# from its certificate) and the request's counter, and the functions advance
# the terminal's counter (fc.admit) and check that a hold belongs to the
# terminal that settles it. pgbench does the same, one terminal per client,
# the counter a microsecond clock (rising within each client).
COUNTER = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
TERMINAL = "'{station}-T' || :client_id"
AUTHORIZE_TERMINAL_ARGS = {"p_terminal_id": TERMINAL, "p_counter": COUNTER}
CONFIRM_TERMINAL_ARGS = {"p_station": "'{station}'", "p_terminal": TERMINAL, "p_counter": COUNTER}

SCRIPT = """\\set i random(0, {last})
\\set amount random({amin}, {amax})
\\set final random(:amount * 3 / 10, :amount - 1)
SELECT coalesce(r->'hold'->>'hold_id', '') AS hold_id, (r->>'decision' = 'APPROVED')::int AS ok
  FROM (SELECT {authorize} AS r) s \\gset
\\if :ok
SELECT {confirm};
\\endif
"""

SIGNATURES_SQL = """
SELECT p.proargnames::text[],
       ARRAY(SELECT format_type(t.oid, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY
                    AS a(oid, n) JOIN pg_type t ON t.oid = a.oid ORDER BY a.n)
  FROM pg_proc p JOIN pg_namespace ns ON ns.oid = p.pronamespace
 WHERE ns.nspname = 'fc' AND p.proname = %s
"""


def _server_arity(name: str) -> int | None:
    """How many arguments the server passes to fc.<name> (its SQL constant,
    which names each one: `p_x => ...`)."""
    try:
        from fuelcard_server.services import transaction
    except ImportError:
        return None
    text = str(getattr(transaction, f"{name.upper()}_SQL", ""))
    return text.count("=>") or None


def _call(conn: psycopg.Connection[Any], name: str, known: dict[str, str],
          nulls: list[str]) -> str:
    """`fc.<name>(p_x => ...)` with pgbench's values for the parameters we
    know and typed NULLs for the others, by name as the server passes them."""
    overloads = [(list(names or []), list(types)) for names, types in
                 conn.execute(SIGNATURES_SQL, (name,)).fetchall()]
    if not overloads:
        raise RuntimeError(f"fc.{name} does not exist in this database")
    arity = _server_arity(name)
    matching = [o for o in overloads if len(o[1]) == arity] or overloads
    names, types = max(matching, key=lambda o: len(o[1]))
    args = []
    for i, sql_type in enumerate(types):
        arg = names[i] if i < len(names) else ""
        if arg in known:
            value = known[arg]
        else:
            value = f"NULL::{sql_type}"
            nulls.append(f"{name}.{arg or i}")
        args.append(f"{arg} => {value}" if arg else value)
    return f"fc.{name}({', '.join(args)})"


@dataclass(frozen=True)
class PgbenchResult:
    cycles_per_s: float
    transactions: int
    failed: int
    latency_avg_ms: float
    clients: int
    duration_s: float
    command: str
    script: str
    nulls: list[str]

    def as_dict(self) -> dict[str, object]:
        return {"cycles_per_s": self.cycles_per_s, "transactions": self.transactions,
                "failed": self.failed, "latency_avg_ms": self.latency_avg_ms,
                "clients": self.clients, "duration_s": self.duration_s,
                "command": self.command, "null_parameters": self.nulls}


def script(url: str, tag: int, cards: int, terminals: bool = False) -> tuple[str, list[str]]:
    """The pgbench script of one pump cycle, and the parameters it passes as
    NULL; `terminals`: as the server calls the functions for a terminal
    over mutual TLS (its station, terminal id and counter)."""
    nulls: list[str] = []
    values = {"tag": tag, "station": STATION, "price": UNIT_PRICE_FEN}
    authorize_args = {**AUTHORIZE_ARGS, **(AUTHORIZE_TERMINAL_ARGS if terminals else {})}
    confirm_args = {**CONFIRM_ARGS, **(CONFIRM_TERMINAL_ARGS if terminals else {})}
    with psycopg.connect(url, autocommit=True) as conn:
        authorize = _call(conn, "authorize",
                          {k: v.format(**values) for k, v in authorize_args.items()}, nulls)
        confirm = _call(conn, "confirm",
                        {k: v.format(**values) for k, v in confirm_args.items()}, nulls)
    text = SCRIPT.format(last=cards - 1, amin=AMOUNT_MIN_FEN, amax=AMOUNT_MAX_FEN,
                         authorize=authorize, confirm=confirm)
    return text, nulls


def _env(url: str) -> dict[str, str]:
    info = psycopg.conninfo.conninfo_to_dict(url)
    env = dict(os.environ)
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"),
                     ("dbname", "PGDATABASE"), ("password", "PGPASSWORD"),
                     ("passfile", "PGPASSFILE")):
        value = info.get(key)
        if value is not None:
            env[var] = str(value)
    return env


def run_pgbench(url: str, tag: int, cards: int, clients: int, duration_s: float,
                threads: int = 2, terminals: bool = False) -> PgbenchResult:
    text, nulls = script(url, tag, cards, terminals)
    with tempfile.TemporaryDirectory(prefix="fuelcard-pgbench-") as tmp:
        path = Path(tmp) / "cycle.sql"
        path.write_text(text)
        seconds = max(round(duration_s), 1)
        cmd = [str(bin_dir() / "pgbench"), "-n", "-M", "prepared", "-c", str(clients),
               "-j", str(max(1, min(threads, clients))), "-T", str(seconds), "-f", str(path)]
        res = subprocess.run(cmd, env=_env(url), capture_output=True, text=True,
                             timeout=seconds + 120, check=False)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"pgbench failed (exit {res.returncode}):\n{out[-3000:]}")
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    latency = re.search(r"latency average = ([0-9.]+) ms", out)
    if tps is None or processed is None:
        raise RuntimeError(f"cannot read pgbench's output:\n{out[-3000:]}")
    return PgbenchResult(
        cycles_per_s=float(tps.group(1)), transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        latency_avg_ms=float(latency.group(1)) if latency else 0.0,
        clients=clients, duration_s=float(seconds),
        command=" ".join([*cmd[:1], "...", *cmd[1:-1], "cycle.sql"]), script=text, nulls=nulls)
