"""Failover, switchover and node-loss drills under pump load, and what they measure.

A drill runs pump cycles (authorize, then confirm) from several POS clients
against the cluster's `fuelcard serve` processes, inflicts one fault on the
cluster (ha_cluster.HaCluster), waits for the load to run again, delivers the
confirms the POS outboxes kept, and measures:

  - RTO: the time without an approval at the pump, i.e. the longest gap
    between two approved authorizes (all clients together) around the fault;
  - RPO: acknowledged confirms lost, i.e. confirms a POS was told succeeded
    whose hold is not settled for that amount on the new primary (must be 0);
  - failed confirms: confirms that failed for good (neither acknowledged nor
    kept in the outbox); a switchover must have none.

`python -m fuelcard_loadtest.ha_drills measure` runs each kind of fault
several times on a fresh cluster and prints the figures (BENCHMARKS.md), and
the cost of synchronous replication on cycles/s (A/B: the three-node cluster
with a synchronous standby against the primary alone).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
from fuelcard.v1 import account_pb2, account_pb2_grpc, common_pb2, funding_pb2, funding_pb2_grpc
from fuelcard_pos.client import PosClient, PosError, PosPending, RetryPolicy
from fuelcard_pos.outbox import Outbox

from fuelcard_loadtest.ha_cluster import HaCluster, running

STATION, TERMINAL = "KM-001", "KM-001-T1"
# Below the step-up threshold of a recharge (20 000 yuan); at 1-5 yuan a
# fill-up, a card lasts thousands of cycles.
START_FEN = 1_900_000


@dataclass(frozen=True)
class Card:
    account_id: str
    card_number: str


def open_cards(target: str, count: int, balance_fen: int = START_FEN) -> list[Card]:
    """Accounts with one funded card each, through the admin RPCs."""
    cards = []
    with grpc.insecure_channel(target) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        for i in range(count):
            opened = accounts.OpenAccount(account_pb2.OpenAccountRequest(
                request_id=f"ha-open-{uuid.uuid4().hex}", type=account_pb2.ACCOUNT_TYPE_PERSONAL,
                holder=account_pb2.Holder(name=f"演练车队 {i}")), timeout=30)
            issued = accounts.IssueCard(account_pb2.IssueCardRequest(
                request_id=f"ha-card-{uuid.uuid4().hex}", account_id=opened.account.account_id),
                timeout=30)
            funded = funding.Recharge(funding_pb2.RechargeRequest(
                request_id=f"ha-recharge-{uuid.uuid4().hex}", account_id=opened.account.account_id,
                channel=funding_pb2.CHANNEL_BANK_CARD, channel_txn_id=f"ha-{uuid.uuid4().hex}",
                amount_fen=balance_fen), timeout=30)
            if funded.decision != common_pb2.DECISION_APPROVED:
                raise RuntimeError(f"the drill's recharge was declined: {funded.decline_reason}")
            cards.append(Card(opened.account.account_id, issued.card_number))
    return cards


@dataclass
class Tally:
    """One POS client's view of the drill."""
    approvals: list[float] = field(default_factory=list)  # monotonic times of approvals
    cycles: int = 0  # authorize + acknowledged confirm
    acked: dict[str, tuple[str, int]] = field(default_factory=dict)  # hold -> (account, fen)
    pending: dict[str, tuple[str, int]] = field(default_factory=dict)  # in the outbox
    failed_confirms: list[str] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    longest_call_s: float = 0.0


class PumpLoad:
    """POS clients in threads, each with its own outbox, spread over the targets."""

    def __init__(self, targets: list[str], cards: list[Card], outbox_dir: Path,
                 clients: int = 4, deadline_s: float = 1.0) -> None:
        self.targets, self.cards, self.deadline_s = targets, cards, deadline_s
        self.tallies = [Tally() for _ in range(clients)]
        self.outboxes = [Outbox(outbox_dir / f"pos-{i}-{uuid.uuid4().hex[:6]}.sqlite3")
                         for i in range(clients)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._pump, args=(i,), name=f"pump-{i}",
                                          daemon=True) for i in range(clients)]

    # A POS's own retries: pauses of 0.25 s, then 0.5 s (equal jitter: 0.25-
    # 0.5 s), for up to 8 s, which covers a planned switchover (≈ 2.5 s
    # without a primary); past that a confirm goes to the outbox
    # (PosPending) and the pump carries on. Pauses capped at 0.5 s: a pump
    # asleep in a long pause when the database returns is time without an
    # approval that the database did not cause (with a 1.5 s cap the crash
    # drill's RTO was ≈ 1 s longer on a loaded machine).
    RETRY = RetryPolicy(max_attempts=20, initial_backoff_s=0.25, max_backoff_s=0.5,
                        total_timeout_s=8.0)

    def _pump(self, i: int) -> None:
        rng = random.Random(i)
        tally, outbox = self.tallies[i], self.outboxes[i]
        target = self.targets[i % len(self.targets)]
        with PosClient(target, deadline_s=self.deadline_s, retry=self.RETRY,
                       outbox=outbox) as pos:
            while not self._stop.is_set():
                card = rng.choice(self.cards)
                amount = rng.randrange(100, 500)
                started = time.monotonic()
                try:
                    auth = pos.authorize(card.card_number, amount, STATION, TERMINAL)
                    if auth.decision != common_pb2.DECISION_APPROVED:
                        tally.errors[f"declined {auth.decline_reason}"] += 1
                        continue
                    tally.approvals.append(time.monotonic())
                    final = rng.randrange(1, amount + 1)
                    hold = auth.hold.hold_id
                    try:
                        pos.confirm(hold, final, volume_ml=1_000, unit_price_fen=785)
                        tally.acked[hold] = (card.account_id, final)
                        tally.cycles += 1
                    except PosPending:
                        tally.pending[hold] = (card.account_id, final)
                    except PosError as exc:
                        tally.failed_confirms.append(f"{exc.code.name} {exc.reason}")
                except PosError as exc:
                    tally.errors[f"{exc.code.name} {exc.reason}"] += 1
                    time.sleep(0.02)
                finally:
                    tally.longest_call_s = max(tally.longest_call_s, time.monotonic() - started)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def approvals(self) -> list[float]:
        return sorted(t for tally in self.tallies for t in tally.approvals)

    def approvals_since(self, at: float) -> int:
        return sum(1 for tally in self.tallies for t in tally.approvals if t >= at)

    def longest_gap_s(self, start: float, end: float) -> float:
        """The longest time without an approval within [start, end]."""
        times = [start, *(t for t in self.approvals() if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))

    def flush_outboxes(self, target: str) -> list[str]:
        """Deliver what the outboxes kept; returns what could not be."""
        problems = []
        with PosClient(target, retry=RetryPolicy(max_attempts=5, total_timeout_s=20.0)) as pos:
            for outbox, tally in zip(self.outboxes, self.tallies, strict=True):
                report = outbox.flush(pos)
                if not report.complete:
                    problems.append(f"outbox not drained: {report}")
                outbox.close()
                del tally  # delivered confirms stay in tally.pending (settled now)
        return problems

    def expected_settled(self) -> dict[str, int]:
        """Per account: what the POS clients were told was settled, plus
        what their outboxes delivered afterwards."""
        out: dict[str, int] = collections.defaultdict(int)
        for tally in self.tallies:
            for account, fen in (*tally.acked.values(), *tally.pending.values()):
                out[account] += fen
        return dict(out)


def lost_confirms(url: str, load: PumpLoad) -> list[str]:
    """Acknowledged confirms whose hold is not settled for the acknowledged
    amount on the database now: the RPO, in confirms."""
    acked = {hold: fen for tally in load.tallies for hold, (_acc, fen) in tally.acked.items()}
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT uid::text, settled_fen FROM fc.holds WHERE uid = ANY(%s::uuid[])"
                            " AND closed_at IS NOT NULL", (list(acked),)).fetchall()
    found = {str(uid): int(fen) for uid, fen in rows}
    return [hold for hold, fen in acked.items() if found.get(hold) != fen]


def verify(cluster: HaCluster, fuelcard: Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    """`fuelcard verify` against the primary (or `url`), with the servers' keys."""
    return subprocess.run([str(fuelcard), "verify", "--database-url", url or cluster.database_url,
                           "--data-dir", str(cluster.root / "server")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FUELCARD_LOG_LEVEL": "WARNING"})


@dataclass
class DrillResult:
    kind: str
    old_leader: str
    new_leader: str
    rto_s: float
    lost: list[str]  # acknowledged confirms lost (RPO)
    acked: int
    pending: int
    failed_confirms: list[str]
    longest_call_s: float
    errors: dict[str, int]
    problems: list[str]

    def line(self) -> str:
        return (f"{self.kind:10} {self.old_leader}->{self.new_leader}  RTO {self.rto_s:5.2f} s  "
                f"RPO {len(self.lost)}  acked {self.acked}  outbox {self.pending}  "
                f"failed {len(self.failed_confirms)}  longest call {self.longest_call_s:.2f} s")


def drill(cluster: HaCluster, kind: str, cards: list[Card], outbox_dir: Path, *,
          before_s: float = 2.0, after_approvals: int = 50, timeout_s: float = 60.0,
          clients: int = 4) -> DrillResult:
    """One fault under pump load: "crash" (kill -9 of the primary's
    postmaster), "node" (the primary's whole node: Patroni and PostgreSQL)
    or "switchover" (planned, to the synchronous standby). Returns once the
    load runs again, the outboxes are delivered and the cluster is whole
    again (a lost node restarted and rejoined)."""
    targets = [f"127.0.0.1:{s['port']}" for s in cluster.servers]
    old = cluster.wait_leader()
    cluster.wait_healthy()
    load = PumpLoad(targets, cards, outbox_dir, clients=clients)
    load.start()
    problems: list[str] = []
    try:
        time.sleep(before_s)
        if load.approvals_since(0) == 0:
            problems.append("no approval before the fault")
        fault_at = time.monotonic()
        if kind == "crash":
            cluster.crash_postmaster(old)
        elif kind == "node":
            cluster.lose_node(old)
        elif kind == "switchover":
            cluster.switchover()
        else:
            raise ValueError(kind)
        new = cluster.wait_leader(timeout_s, other_than=old)
        # the load is back: enough approvals after the new leader took over
        deadline = time.monotonic() + timeout_s
        while load.approvals_since(fault_at) < after_approvals:
            if time.monotonic() > deadline:
                problems.append(f"the load did not recover within {timeout_s:.0f} s")
                break
            time.sleep(0.1)
        end = time.monotonic()
    finally:
        load.stop()
    rto = load.longest_gap_s(fault_at - 0.5, end)
    problems += load.flush_outboxes(targets[0])
    lost = lost_confirms(cluster.database_url, load)
    if kind == "node":
        cluster.start_node(old)  # it rejoins as a standby (pg_rewind if needed)
    cluster.wait_healthy(120)
    errors: collections.Counter[str] = collections.Counter()
    for t in load.tallies:
        errors.update(t.errors)
    return DrillResult(
        kind, old, new, rto, lost, sum(len(t.acked) for t in load.tallies),
        sum(len(t.pending) for t in load.tallies),
        [f for t in load.tallies for f in t.failed_confirms],
        max(t.longest_call_s for t in load.tallies), dict(errors), problems)


def cycles_per_s(cluster: HaCluster, cards: list[Card], outbox_dir: Path, seconds: float,
                 clients: int = 4) -> float:
    targets = [f"127.0.0.1:{s['port']}" for s in cluster.servers]
    load = PumpLoad(targets, cards, outbox_dir, clients=clients)
    load.start()
    time.sleep(1.0)  # warm up
    before = sum(t.cycles for t in load.tallies)
    time.sleep(seconds)
    after = sum(t.cycles for t in load.tallies)
    load.stop()
    load.flush_outboxes(targets[0])
    return (after - before) / seconds


def measure(rounds: int, ab_seconds: float, ab_rounds: int, servers: int,
            ab_clients: int = 4) -> dict[str, object]:
    fuelcard = Path(sys.executable).parent / "fuelcard"
    out: dict[str, object] = {}
    with running(servers=servers) as cluster, tempfile.TemporaryDirectory() as tmp:
        cards = open_cards(f"127.0.0.1:{cluster.servers[0]['port']}", 40)
        results = []
        for kind in ("crash", "node", "switchover"):
            for _ in range(rounds):
                r = drill(cluster, kind, cards, Path(tmp))
                print(r.line(), flush=True)
                results.append(r)
        out["drills"] = [r.__dict__ for r in results]
        res = verify(cluster, fuelcard)
        out["verify_exit"] = res.returncode
        # A/B: the same cluster, alternately with its synchronous standby
        # (three nodes) and as the primary alone (both standbys stopped:
        # non-strict synchronous mode then commits on one node).
        ab: dict[str, list[float]] = {"sync": [], "single": []}
        for _ in range(ab_rounds):
            cluster.wait_healthy()
            ab["sync"].append(cycles_per_s(cluster, cards, Path(tmp), ab_seconds, ab_clients))
            leader = cluster.wait_leader()
            standbys = [n.name for n in cluster.nodes if n.name != leader]
            for name in standbys:
                cluster.stop_node(name)
            time.sleep(3)
            ab["single"].append(cycles_per_s(cluster, cards, Path(tmp), ab_seconds, ab_clients))
            for name in standbys:
                cluster.start_node(name)
        print(f"cycles/s sync {ab['sync']} single {ab['single']}", flush=True)
        out["ab"] = ab
        out["load_average"] = os.getloadavg()
    summary = {}
    for kind in ("crash", "node", "switchover"):
        rtos = [r.rto_s for r in results if r.kind == kind]
        if not rtos:
            continue
        summary[kind] = {"rto_median_s": statistics.median(rtos), "rto_max_s": max(rtos),
                         "rpo_max": max(len(r.lost) for r in results if r.kind == kind)}
    out["summary"] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ha-drills", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("measure", help="RTO/RPO over several faults of each kind, and the A/B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ab-seconds", type=float, default=20.0)
    p.add_argument("--ab-rounds", type=int, default=2)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--ab-clients", type=int, default=4, help="POS clients during the A/B")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)
    figures = measure(args.rounds, args.ab_seconds, args.ab_rounds, args.servers, args.ab_clients)
    print(json.dumps(figures["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
