"""High-availability drills on a real cluster (scripts/ha-up): etcd, three
PostgreSQL nodes under Patroni, pgBackRest, two `fuelcard serve` processes.

One cluster for the module (bringing it up takes ≈ 25 s), reused by each
drill in turn; each drill leaves it whole (three members, a synchronous
standby) for the next. The engines are installed by ha-up from the package
registries: if that is impossible the fixture fails with the installer's
message; these drills are never skipped.

  - a postmaster crash of the primary under pump load: a standby is
    promoted, the servers follow by themselves, no acknowledged confirm is
    lost (RPO 0), the time without an approval (RTO) stays within 5 s;
  - a planned switchover: no confirm fails beyond the POS's own retries;
  - a backup and a point-in-time restore into a fresh cluster: verify is
    clean and the balances are the source's at that time;
  - the other city's standby lost and rebuilt from the backup.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from fuelcard_loadtest import ha_cluster, ha_drills
from fuelcard_loadtest.ha_cluster import HaCluster
from fuelcard_loadtest.ha_drills import Card
from fuelcard_server.health import READS_HEALTH_NAME as READS
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow

FUELCARD = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fuelcard"
BALANCES_SQL = "SELECT uid::text, balance_fen, held_fen FROM fc.accounts ORDER BY uid"


@pytest.fixture(scope="module")
def cluster() -> Iterator[HaCluster]:
    with ha_cluster.running(servers=2) as c:
        yield c


@pytest.fixture(scope="module")
def cards(cluster: HaCluster) -> list[Card]:
    return ha_drills.open_cards(f"127.0.0.1:{cluster.servers[0]['port']}", 30)


def _serving(target: str, service: str = "") -> bool:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _check_drill(result: ha_drills.DrillResult, cluster: HaCluster, rto_max_s: float) -> None:
    assert result.problems == []
    assert result.new_leader != result.old_leader
    assert result.acked > 0
    # RPO: every confirm a POS was told succeeded is settled on the new primary
    assert result.lost == [], f"{len(result.lost)} acknowledged confirms lost"
    assert result.rto_s <= rto_max_s, result.line()
    # nothing hangs: a call, its retries included, ends within the POS's budget
    assert result.longest_call_s < ha_drills.PumpLoad.RETRY.total_timeout_s + 2.0, result.line()
    res = ha_drills.verify(cluster, FUELCARD)
    assert res.returncode == 0, res.stdout + res.stderr
    for s in cluster.servers:
        assert _serving(f"127.0.0.1:{s['port']}")


def test_postmaster_crash_fails_over_with_nothing_lost(
        cluster: HaCluster, cards: list[Card], tmp_path: Path) -> None:
    result = ha_drills.drill(cluster, "crash", cards, tmp_path)
    print(result.line())
    _check_drill(result, cluster, rto_max_s=5.0)
    # the crashed node came back as a standby (Patroni rewound it), not as a
    # second primary
    members = {m.name: m.role for m in cluster.members()}
    assert members[result.old_leader] in ("sync_standby", "replica"), members
    assert members[result.new_leader] == "leader"
    # Report reads were on node2, the synchronous standby that was promoted:
    # each server noticed (PROMOTED), refused them for a moment, and now
    # reads a node that is a standby again; its metrics name the new
    # primary's synchronous standby.
    assert result.new_leader == "node2"
    sync = cluster.sync_standby()
    for i, srv in enumerate(cluster.servers):
        log = (cluster.root / "logs" / f"server{i}.log").read_text()
        assert "read replica promoted" in log
        deadline = time.monotonic() + 20
        while True:
            metrics = _metrics(srv["metrics"])
            if (metrics.get("fuelcard_replica_standby") == 1.0
                    and metrics.get(f'fuelcard_replication_sync_standbys{{name="{sync}"}}') == 1.0
                    and _serving(f"127.0.0.1:{srv['port']}", READS)):
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.2)
        primary = cluster.node(result.new_leader).pg_port
        assert metrics[f'fuelcard_db_primary{{node="127.0.0.1:{primary}"}}'] == 1.0


def test_switchover_fails_no_confirm(cluster: HaCluster, cards: list[Card], tmp_path: Path) -> None:
    result = ha_drills.drill(cluster, "switchover", cards, tmp_path)
    print(result.line())
    # ≈ 2.5 s measured (BENCHMARKS.md); what a switchover must not do is fail
    # a confirm, so the bound here is the POS's retry budget
    _check_drill(result, cluster, rto_max_s=ha_drills.PumpLoad.RETRY.total_timeout_s)
    # planned: the POS retries cover the hand-over, nothing had to wait in an outbox
    assert result.failed_confirms == []
    assert result.pending == 0, result.line()


def _balances(url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(BALANCES_SQL).fetchall()


def test_backup_and_point_in_time_restore(cluster: HaCluster, cards: list[Card],
                                          tmp_path: Path) -> None:
    cluster.backup("full")
    info = cluster.backup_info()
    assert info["status"]["message"] == "ok" and info["backup"], info
    # traffic after the backup, a moment T, then more traffic: the restore
    # to T must have the first and not the second
    target = f"127.0.0.1:{cluster.servers[1]['port']}"
    ha_drills.cycles_per_s(cluster, cards, tmp_path, 1.0, clients=2)
    with psycopg.connect(cluster.database_url, autocommit=True) as conn:
        at = conn.execute("SELECT clock_timestamp()::text").fetchone()
        assert at is not None
        at_time = str(at[0])
        expected = conn.execute(BALANCES_SQL).fetchall()
    time.sleep(0.2)
    ha_drills.cycles_per_s(cluster, cards, tmp_path, 1.0, clients=2)
    after = _balances(cluster.database_url)
    assert after != expected, "no traffic after T: the restore would prove nothing"
    with psycopg.connect(cluster.database_url, autocommit=True) as conn:
        # close the segment holding T and wait for the archive to have it
        row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        assert row is not None
        deadline = time.monotonic() + 30
        while True:
            archived = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
            if archived is not None and archived[0] is not None and str(archived[0]) >= row[0]:
                break
            assert time.monotonic() < deadline, "the WAL segment holding T was never archived"
            time.sleep(0.1)
    restored_dir, port, _pid = cluster.restore_at(at_time)
    try:
        url = f"postgresql://{ha_cluster.SUPERUSER}@127.0.0.1:{port}/{ha_cluster.DATABASE}"
        assert _balances(url) == expected
        res = ha_drills.verify(cluster, FUELCARD, url)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        cluster.stop_postgres(restored_dir)
    assert _serving(target)


def test_other_city_standby_lost_and_rebuilt_from_backup(
        cluster: HaCluster, cards: list[Card], tmp_path: Path) -> None:
    far = next(n for n in cluster.nodes if n.city == "city-b")
    assert {m.name: m.role for m in cluster.members()}[far.name] == "replica"
    cluster.lose_node(far.name)
    cluster.wipe_node(far.name)
    # payments go on without it: it was never the synchronous standby
    cycles = ha_drills.cycles_per_s(cluster, cards, tmp_path, 2.0, clients=2)
    assert cycles > 0
    assert cluster.sync_standby() is not None
    # a marker written while it is gone must reach it after the rebuild
    marker = f"rebuilt-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.ha_drill_marks (mark text)")
        conn.execute("INSERT INTO public.ha_drill_marks VALUES (%s)", (marker,))
    log_path = cluster.root / "logs" / f"{far.name}.log"
    log_before = log_path.stat().st_size
    cluster.start_node(far.name)
    cluster.wait_healthy(120)
    with log_path.open() as f:
        f.seek(log_before)
        assert "replica has been created using pgbackrest" in f.read()
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(cluster.node_url(far.name), autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), EXISTS (SELECT 1 FROM "
                               "public.ha_drill_marks WHERE mark = %s)", (marker,)).fetchone()
        assert row is not None and row[0] is True
        if row[1]:
            break
        assert time.monotonic() < deadline, "the rebuilt standby never caught up"
        time.sleep(0.2)
