"""The replica lag arithmetic (replication.py) on the cases a live standby
shows only by chance: a write after a long idle spell, a standby that has
replayed nothing since it started, no view of the primary."""

from __future__ import annotations

import math

from fuelcard_server.replication import SAMPLES_MAX, LagMeter, ReplicationView, StandbyStatus, parse_lsn


def _standby(replay: int | None, age_s: float | None, receive: int | None = None,
             in_recovery: bool = True) -> StandbyStatus:
    return StandbyStatus(in_recovery, replay, replay if receive is None else receive, age_s)


def test_lsn_text_is_read_as_a_position() -> None:
    assert parse_lsn("0/0") == 0
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert parse_lsn("1/0") > parse_lsn("0/FFFFFFFF")


def test_caught_up_is_zero_however_old_the_last_commit() -> None:
    meter = LagMeter()
    meter.note_primary(100.0, 5_000)
    # idle for an hour: the last replayed commit is an hour old
    assert meter.lag_s(_standby(5_000, 3600.0), 100.5) == 0.0


def test_a_write_after_an_idle_spell_is_not_an_idle_spell_of_lag() -> None:
    meter = LagMeter()
    for t in range(100, 110):
        meter.note_primary(float(t), 5_000)  # idle
    meter.note_primary(110.0, 6_000)  # one write
    # the standby has not replayed it yet; its last commit is an hour old
    assert math.isclose(meter.lag_s(_standby(5_000, 3600.0), 110.2), 1.2)


def test_a_standby_truly_behind_reports_its_replay_age() -> None:
    meter = LagMeter()
    for t in range(100, 200):
        meter.note_primary(float(t), t * 1_000)  # busy primary
    # replayed up to the position of t=150 (49 s ago); its last commit
    # replayed is 49.5 s old: the smaller bound
    assert math.isclose(meter.lag_s(_standby(150_000, 49.5), 199.0), 49.0)
    # a commit replayed recently bounds it tighter
    assert math.isclose(meter.lag_s(_standby(150_000, 3.0), 199.0), 3.0)


def test_without_a_view_of_the_primary_the_standby_judges_itself() -> None:
    meter = LagMeter()
    assert meter.lag_s(_standby(7_000, 600.0), 1.0) == 0.0  # all received is replayed
    assert meter.lag_s(_standby(7_000, 12.0, receive=9_000), 1.0) == 12.0
    assert meter.lag_s(_standby(7_000, None, receive=9_000), 1.0) == math.inf
    assert meter.lag_s(_standby(None, None, in_recovery=False), 1.0) == 0.0  # not a standby


def test_behind_every_sample_with_nothing_replayed_is_at_least_their_span() -> None:
    meter = LagMeter()
    meter.note_primary(10.0, 8_000)
    meter.note_primary(20.0, 9_000)
    assert meter.lag_s(_standby(7_000, None), 25.0) == 15.0


def test_the_samples_are_bounded() -> None:
    meter = LagMeter()
    for t in range(SAMPLES_MAX + 10):
        meter.note_primary(float(t), t)
    assert len(meter.samples) == SAMPLES_MAX and meter.samples[0] == (10.0, 10)


def test_the_primarys_view_names_its_synchronous_standby() -> None:
    rows: list[tuple[object, ...]] = [
        ("node3", "async", 8192.0, 0.4, "127.0.0.1/32", 5433),
        ("node2", "sync", 0.0, None, "127.0.0.1/32", 5433),
    ]
    view = ReplicationView.from_rows(rows)
    assert view.primary == "127.0.0.1:5433"
    assert [(x.name, x.sync_state, x.lag_bytes, x.lag_s) for x in view.standbys] == [
        ("node2", "sync", 0.0, 0.0), ("node3", "async", 8192.0, 0.4)]
    assert view.sync_standby == "node2"


def test_a_primary_alone_has_no_synchronous_standby() -> None:
    # the RIGHT JOIN's one row of NULLs: the primary, and no standby
    view = ReplicationView.from_rows([(None, None, None, None, "127.0.0.1/32", 5433)])
    assert view.primary == "127.0.0.1:5433" and view.standbys == ()
    assert view.sync_standby is None
    # standbys that are all asynchronous protect no commit either
    only_async = ReplicationView.from_rows([("node3", "async", 0.0, 0.0, "127.0.0.1/32", 5433)])
    assert only_async.sync_standby is None
