"""How far behind the read replica is, and whether report reads may use it.

The replica (a streaming standby, `replica_url`) serves reports, histories,
reconciliation and risk listings and the event stream. Two ways it fails
them: it cannot be reached (DOWN), or it is reachable but too far behind
the primary (LAGGING: past `replica_max_lag_s` it would show a cardholder a
history without their last fill-up). Either way the read pool is closed to
calls (they fail at once with UNAVAILABLE REPLICA_UNAVAILABLE or
REPLICA_LAGGING) and the services that read through it report NOT_SERVING,
while the payment services, which never read the replica, stay SERVING.
A lagging replica is read again once its lag is under half the limit (no
flapping while it hovers at the limit).

Why not fall back to the primary when the replica lags: lag usually comes
from the primary writing faster than the standby replays (a batch top-up, an
expiry sweep, a vacuum) or from long report queries on the standby; moving
the report load onto the primary at exactly that moment takes CPU and I/O
from the payments that the replica exists to protect, and a fallback that
keeps serving hides the fault from the load balancer. NOT_SERVING lets the
balancer send report calls to a worker whose replica is healthy, and the
on-call SRE sees it (health, `fuelcard_replica_lag_seconds`).

The lag, in seconds, is measured on the standby as
`now() - pg_last_xact_replay_timestamp()`: the age of the last transaction
it replayed. Alone that is wrong when the primary is idle: no commits, so
the last replayed one grows old while the standby is fully caught up. So
the health probe also samples the primary's WAL position (its own
connection, each probe) and:

  - a standby that has replayed past the primary's latest sampled position
    is caught up: lag 0;
  - otherwise the lag is at most the age of the last replayed commit, and at
    most the time since the newest sample the standby has replayed past
    (everything the primary had written by then is on the standby): the
    smaller bound. The second keeps a write after a long idle spell from
    reading as a lag of the whole idle spell.
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass, field

# The standby's view of itself, one round trip. replay_age_s is NULL before
# the standby has replayed any transaction since it started.
STANDBY_SQL = """
    SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text,
           pg_last_wal_receive_lsn()::text,
           extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"""

# Samples of the primary's WAL position kept (each probe adds one): about
# an hour at the default 1 s probe interval. A standby behind all of them is
# judged by its replay age alone (or the span of the samples), which is far
# past any sensible max lag anyway.
SAMPLES_MAX = 4096


class ReplicaState(enum.Enum):
    OK = "ok"
    LAGGING = "lagging"
    DOWN = "down"
    # reachable, but not in recovery: a failover promoted it
    PROMOTED = "promoted"


# The primary's standbys, one row each: name (application_name), sync_state
# (sync, async, potential, quorum), replay lag in bytes (NULL before the
# standby has replayed anything) and in seconds (NULL when nothing was
# replayed lately: the standby is idle and caught up).
REPLICATION_SQL = """
    SELECT application_name, sync_state,
           pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8,
           extract(epoch FROM replay_lag)::float8,
           inet_server_addr()::text, inet_server_port()
    FROM pg_stat_replication RIGHT JOIN (SELECT 1) one ON true"""


@dataclass(frozen=True)
class StandbyLag:
    name: str
    sync_state: str
    lag_bytes: float
    lag_s: float


@dataclass(frozen=True)
class ReplicationView:
    """What the primary says of itself and its standbys."""
    primary: str  # host:port of the node the primary's probe reached
    standbys: tuple[StandbyLag, ...]

    @classmethod
    def from_rows(cls, rows: list[tuple[object, ...]]) -> ReplicationView:
        primary = ""
        standbys = []
        for name, sync_state, lag_bytes, lag_s, addr, port in rows:
            primary = f"{str(addr or 'local').split('/')[0]}:{port or ''}"
            if name is None:  # the RIGHT JOIN's row when there is no standby
                continue
            standbys.append(StandbyLag(str(name), str(sync_state),
                                       float(str(lag_bytes)) if lag_bytes is not None else 0.0,
                                       float(str(lag_s)) if lag_s is not None else 0.0))
        return cls(primary, tuple(sorted(standbys, key=lambda x: x.name)))

    @property
    def sync_standby(self) -> str | None:
        """The synchronous standby's name; None: commits are not protected
        by a second copy (no standby, or none in sync)."""
        return next((x.name for x in self.standbys if x.sync_state in ("sync", "quorum")), None)


def parse_lsn(text: str) -> int:
    """A pg_lsn's text form (16/B374D848) as an integer."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass
class StandbyStatus:
    in_recovery: bool
    replay_lsn: int | None
    receive_lsn: int | None
    # now() - pg_last_xact_replay_timestamp() on the standby, seconds
    replay_age_s: float | None

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> StandbyStatus:
        in_recovery, replay, receive, age = row
        return cls(bool(in_recovery), parse_lsn(str(replay)) if replay else None,
                   parse_lsn(str(receive)) if receive else None,
                   float(str(age)) if age is not None else None)


@dataclass
class LagMeter:
    """Primary WAL samples (monotonic time, LSN) and the lag computed from them."""

    samples: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=SAMPLES_MAX))

    def note_primary(self, at: float, lsn: int) -> None:
        self.samples.append((at, lsn))

    def lag_s(self, standby: StandbyStatus, now: float) -> float:
        if not standby.in_recovery:
            return 0.0  # not a standby (promoted, or the primary itself): nothing to replay
        replayed = standby.replay_lsn
        age = standby.replay_age_s
        if not self.samples:
            # No view of the primary (it is down, or just started): the
            # standby's own idle guard - all it received is replayed.
            if replayed is not None and replayed == standby.receive_lsn:
                return 0.0
            return max(age, 0.0) if age is not None else math.inf
        if replayed is not None and replayed >= self.samples[-1][1]:
            return 0.0
        bound = math.inf
        if replayed is not None:
            for at, lsn in reversed(self.samples):
                if lsn <= replayed:
                    bound = max(now - at, 0.0)
                    break
        if age is not None:
            bound = min(bound, max(age, 0.0))
        if math.isinf(bound):
            # behind every sample and no replayed commit to date it by: at
            # least as old as the oldest sample
            bound = max(now - self.samples[0][0], 0.0)
        return bound
