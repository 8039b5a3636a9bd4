"""The check after every run: the ledger is consistent, and the money that
moved is exactly the money the generator saw confirmed.

A run's rows are recognisable without a time window: its holds carry
station_id "LT-<run id>", its recharges channel_txn_id "lt-<run id>-...", its
redemptions description "LT-<run id>"; its sale refunds and reversals name its
holds. So other traffic on the same database
(pgbench, other runs) does not disturb the comparison. The highest ids taken
before the run (Marks) only keep the queries from reading the whole history:
rows of the run can only have larger ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from fuelcard_server import verify

MARKS_SQL = """
SELECT (SELECT coalesce(max(id), 0) FROM fc.journal), (SELECT coalesce(max(id), 0) FROM fc.holds),
       (SELECT coalesce(max(id), 0) FROM fc.recharges)
"""

MOVED_SQL = """
WITH sales AS MATERIALIZED (
    -- A sale is its purchase entry and, for an overrun the balance could not
    -- pay in full, its receivable entry (kind 12, also to FUEL_SALES): one
    -- sale, counted once, for the sum.
    SELECT j.hold_id, j.amount FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id
     WHERE j.id > %(j0)s AND h.id > %(h0)s AND h.station_id = %(station)s
       AND j.kind IN (2, 12) AND j.asset = 1
       AND j.credit_account_id = (SELECT fc.system_account(p_code => 'FUEL_SALES'))),
-- sale refunds (issue 14): money back from FUEL_SALES to the account that paid
refunds AS MATERIALIZED (
    SELECT j.amount FROM fc.journal j JOIN fc.holds h ON h.id = j.hold_id
     WHERE j.id > %(j0)s AND h.id > %(h0)s AND h.station_id = %(station)s
       AND j.kind = 10 AND j.asset = 1 AND j.credit_account_id = h.account_id
       AND j.debit_account_id = (SELECT fc.system_account(p_code => 'FUEL_SALES'))),
-- holds released by a reversal: the reversal's stored answer names them
reversed AS MATERIALIZED (
    SELECT k.request_id FROM fc.idempotency_keys k
     WHERE k.operation = 'reverse_authorization' AND k.request_id LIKE %(rid)s
       AND k.response->>'outcome' = 'RELEASED'),
topups AS MATERIALIZED (
    SELECT j.amount FROM fc.journal j JOIN fc.recharges r ON r.id = j.recharge_id
     WHERE j.id > %(j0)s AND r.id > %(r0)s AND r.channel_txn_id LIKE %(txn)s
       AND j.kind = 1 AND j.asset = 1 AND j.credit_account_id = r.account_id)
SELECT
  (SELECT coalesce(sum(amount), 0) FROM sales),
  (SELECT count(DISTINCT hold_id) FROM sales),
  (SELECT coalesce(sum(amount), 0) FROM topups),
  (SELECT count(*) FROM fc.recharges WHERE id > %(r0)s AND channel_txn_id LIKE %(txn)s),
  (SELECT coalesce(sum(amount), 0) FROM fc.journal
    WHERE id > %(j0)s AND kind = 4 AND asset = 2 AND description = %(station)s),
  (SELECT count(*) FROM fc.holds WHERE id > %(h0)s AND station_id = %(station)s AND state = 1),
  (SELECT coalesce(sum(amount), 0) FROM refunds),
  (SELECT count(*) FROM refunds),
  (SELECT count(*) FROM reversed)
"""


@dataclass(frozen=True)
class Marks:
    """Highest journal, hold and recharge ids before a run."""

    journal: int = 0
    holds: int = 0
    recharges: int = 0


def marks(url: str) -> Marks:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(MARKS_SQL).fetchone()
    assert row is not None
    return Marks(int(row[0]), int(row[1]), int(row[2]))


@dataclass(frozen=True)
class Seen:
    """What the generator got APPROVED answers for."""

    confirmed_fen: int = 0
    confirmed_count: int = 0
    recharged_fen: int = 0
    recharge_count: int = 0
    redeemed_points: int = 0
    refunded_fen: int = 0
    refund_count: int = 0
    # holds released by ReverseAuthorization (outcome RELEASED)
    reversed: int = 0


@dataclass
class LedgerResult:
    verify_ok: bool
    violations: list[dict[str, Any]]
    seen: Seen
    ledger: Seen
    open_holds: int
    since: Marks = field(default_factory=Marks)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "verify_ok": self.verify_ok, "violations": self.violations,
                "generator": asdict(self.seen), "ledger": asdict(self.ledger),
                "open_holds": self.open_holds, "since": asdict(self.since),
                "problems": self.problems}


def station(run_id: str) -> str:
    return f"LT-{run_id}"


def moved(url: str, run_id: str, since: Marks | None = None) -> tuple[Seen, int]:
    """The run's money as booked in the journal, and its holds still open."""
    since = since or Marks()
    with psycopg.connect(url, autocommit=True) as conn:
        # hash joins over the run's rows; never a nested loop over the journal
        conn.execute("SET enable_nestloop = off")
        row = conn.execute(MOVED_SQL, {
            "station": station(run_id), "txn": f"lt-{run_id}-%", "j0": since.journal,
            "h0": since.holds, "r0": since.recharges, "rid": f"{run_id}-%"}).fetchone()
    assert row is not None
    values = [int(v) for v in row]
    return Seen(values[0], values[1], values[2], values[3], values[4], values[6], values[7],
                values[8]), values[5]


def check(url: str, run_id: str, seen: Seen, *, since: Marks | None = None,
          run_verify: bool = True) -> LedgerResult:
    violations = verify.run(url) if run_verify else []
    booked, open_holds = moved(url, run_id, since)
    result = LedgerResult(
        verify_ok=not violations,
        violations=[{"check": v.check, "description": v.description,
                     "samples": [list(map(str, s)) for s in v.samples[:5]]} for v in violations],
        seen=seen, ledger=booked, open_holds=open_holds, since=since or Marks())
    for v in violations:
        result.problems.append(f"fuelcard verify: {v.check} violated ({v.description}):"
                               f" e.g. {v.samples[:3]}")
    pairs = (("confirmed fen", seen.confirmed_fen, booked.confirmed_fen),
             ("confirmed sales", seen.confirmed_count, booked.confirmed_count),
             ("recharged fen", seen.recharged_fen, booked.recharged_fen),
             ("recharges", seen.recharge_count, booked.recharge_count),
             ("redeemed points", seen.redeemed_points, booked.redeemed_points),
             ("refunded fen", seen.refunded_fen, booked.refunded_fen),
             ("sale refunds", seen.refund_count, booked.refund_count),
             ("reversed holds", seen.reversed, booked.reversed))
    for what, generator, ledger in pairs:
        if generator != ledger:
            result.problems.append(f"{what}: the generator saw {generator}, the journal has"
                                   f" {ledger} (difference {ledger - generator})")
    if open_holds:
        result.problems.append(f"{open_holds} hold(s) of this run are still AUTHORIZED")
    return result
