"""Issue 3, round 2: authorize looks up limit raises only where one can be in
force (fc.accounts.raises_end_at, the latest end of any raise of the account
or its cards, kept by a trigger on fc.limit_raises). The parent's caps, and
its raises, must still bind a sub-account's card exactly as before; a raise
on the parent's own card must not lift the parent's account caps."""

from __future__ import annotations

import datetime as dt

from fuelcard.v1 import account_pb2, common_pb2

from tests.plugins.server import RunningServer
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn

DAILY = common_pb2.DECLINE_REASON_LIMIT_DAILY


def test_a_parents_raise_binds_its_childrens_cards_inside_its_window(
        server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 2_000_000, [cb.SHARED],
                          account_type=account_pb2.ACCOUNT_TYPE_FAMILY)
    parent, child = fleet.parent_id, fleet.subs[0]
    cb.set_limits(server, parent, account=parent, daily=30_000)
    assert cb.declined(server, child, 30_001) == DAILY
    # A raise on the parent's own card marks the parent account but lifts
    # only that card's caps: the child stays under the parent's daily cap.
    start = cb.local_now(server) + dt.timedelta(days=1)
    end = start + dt.timedelta(days=1)
    cb.grant_raise(server, parent, start - dt.timedelta(days=1), end, card=fleet.parent.card_id,
                   daily=500_000)
    assert cb.declined(server, child, 30_001) == DAILY
    cb.grant_raise(server, parent, start, end, account=parent, daily=100_000)
    marked = db.execute("SELECT raises_end_at FROM fc.accounts a WHERE a.uid = %s",
                        (parent,)).fetchone()
    assert marked == (end,)
    assert cb.declined(server, child, 30_001) == DAILY       # not yet in force

    cb.advance_to_local(server, start)
    cb.sale(server, child, 60_000)                             # the raised cap
    assert cb.declined(server, child, 40_001) == DAILY
    cb.advance_to_local(server, end)                           # the end is exclusive
    assert cb.declined(server, child, 30_001) == DAILY
    cb.sale(server, child, 30_000)
    cb.assert_verified(server)
