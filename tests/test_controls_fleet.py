"""Issue 4, corporate fleets (企业/车队账户): sub-accounts with ALLOCATED or
SHARED funding, their cards, batch top-up (批量充值) and the per-vehicle cost
report with its anomaly flag (异常开支预警). Everything through gRPC against
the real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import grpc
from fuelcard.v1 import account_pb2, common_pb2, control_pb2

from tests.plugins.server import RunningServer
from tests.support import builders
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, count, expect

FP = grpc.StatusCode.FAILED_PRECONDITION
IA = grpc.StatusCode.INVALID_ARGUMENT


def test_parent_opens_sub_accounts_with_a_funding_mode_and_a_plate(server: RunningServer) -> None:
    parent = cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE, name="昆明顺达物流有限公司")
    shared = cb.open_account(server, parent=parent.account_id, mode=cb.SHARED, label="云A·12345")
    allocated = cb.open_account(server, parent=parent.account_id, mode=cb.ALLOCATED,
                                label="云A·D7788")

    assert parent.parent_account_id == ""
    assert parent.funding_mode == account_pb2.FUNDING_MODE_UNSPECIFIED
    for sub, mode, plate in ((shared, cb.SHARED, "云A·12345"), (allocated, cb.ALLOCATED, "云A·D7788")):
        got = cb.get_account(server, sub.account_id)
        assert got.parent_account_id == parent.account_id
        assert got.funding_mode == mode
        assert got.label == plate
        # A sub-account is of its parent's type.
        assert got.type == account_pb2.ACCOUNT_TYPE_CORPORATE
        assert (got.balance.balance_fen, got.balance.held_fen) == (0, 0)

    # Cards are issued on the sub-accounts.
    card = cb.issue_card(server, shared.account_id)
    got_card = server.accounts.GetCard(account_pb2.GetCardRequest(card_id=card.card_id)).card
    assert got_card.account_id == shared.account_id

    # One level deep only; a sub-account needs a mode, a top-level one must not have one.
    expect(lambda: cb.open_account(server, parent=shared.account_id, mode=cb.ALLOCATED),
           FP, "PARENT_NOT_TOP_LEVEL")
    expect(lambda: cb.open_account(server, parent=parent.account_id), IA, field="funding_mode")
    expect(lambda: cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE, mode=cb.SHARED),
           IA, "FUNDING_MODE_WITHOUT_PARENT")
    expect(lambda: cb.open_account(server, parent=cb.new_uuid(), mode=cb.SHARED),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    cb.assert_verified(server)


def test_shared_card_reserves_on_the_parent_allocated_card_on_its_own(
        server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 100_000, [cb.SHARED, cb.ALLOCATED])
    shared, allocated = fleet.subs
    assert cb.batch_top_up(server, fleet.parent_id, [(allocated.account_id, 30_000)]).decision == \
        cb.APPROVED

    # SHARED: the hold reserves the parent's money; the card and spender are the vehicle's.
    auth = cb.authorize(server, shared, 20_000)
    assert auth.decision == cb.APPROVED
    assert auth.hold.account_id == fleet.parent_id
    assert auth.hold.card_id == shared.card_id
    assert auth.available_fen == 100_000 - 30_000 - 20_000
    assert cb.balance_of(server, fleet.parent_id) == (70_000, 20_000)
    assert cb.balance_of(server, shared.account_id) == (0, 0)
    done = builders.confirm(server, auth.hold.hold_id, 15_000)
    assert done.decision == cb.APPROVED
    assert done.balance_fen == 55_000
    assert cb.balance_of(server, fleet.parent_id) == (55_000, 0)
    assert cb.balance_of(server, shared.account_id) == (0, 0)
    # The purchase is debited from the parent.
    debited = db.execute(
        "SELECT a.uid::text FROM fc.journal j JOIN fc.accounts a ON a.id = j.debit_account_id"
        " WHERE j.kind = 2").fetchall()
    assert debited == [(fleet.parent_id,)]

    # ALLOCATED: its own money, however rich the parent.
    hold = cb.approved(server, allocated, 25_000)
    assert hold.account_id == allocated.account_id
    assert cb.balance_of(server, allocated.account_id) == (30_000, 25_000)
    assert cb.balance_of(server, fleet.parent_id) == (55_000, 0)
    assert cb.declined(server, allocated, 5_001) == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    # The SHARED vehicle is bounded by the parent's available money.
    assert cb.declined(server, shared, 55_001) == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert cb.approved(server, shared, 55_000).account_id == fleet.parent_id

    # A SHARED sub-account holds no money: it cannot be recharged.
    before = count(db, "journal")
    expect(lambda: builders.recharge(server, shared.account_id, 10_000), FP,
           "ACCOUNT_USES_PARENT_BALANCE")
    assert count(db, "journal") == before
    assert count(db, "recharges") == 1  # the parent's
    # An ALLOCATED one may be.
    assert builders.recharge(server, allocated.account_id, 1_000).balance_fen == 31_000
    cb.assert_verified(server)


def test_a_frozen_parent_stops_every_vehicle(server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 100_000, [cb.SHARED, cb.ALLOCATED])
    shared, allocated = fleet.subs
    cb.batch_top_up(server, fleet.parent_id, [(allocated.account_id, 50_000)])
    db.execute("UPDATE fc.accounts SET status = 2 WHERE uid = %s", (fleet.parent_id,))
    for card in (shared, allocated, fleet.parent):
        assert cb.declined(server, card, 1_000) == common_pb2.DECLINE_REASON_ACCOUNT_FROZEN
    frozen = cb.batch_top_up(server, fleet.parent_id, [(allocated.account_id, 1_000)])
    assert frozen.decline_reason == common_pb2.DECLINE_REASON_ACCOUNT_FROZEN
    assert count(db, "holds") == 0
    db.execute("UPDATE fc.accounts SET status = 1 WHERE uid = %s", (fleet.parent_id,))
    cb.approved(server, shared, 1_000)
    cb.approved(server, allocated, 1_000)
    cb.assert_verified(server)


def test_card_balance_of_a_shared_card_is_the_parents(server: RunningServer) -> None:
    fleet = cb.open_fleet(server, 100_000, [cb.SHARED])
    shared = fleet.subs[0]
    cb.approved(server, shared, 30_000)
    got = builders.balance(server, shared)
    assert (got.balance.balance_fen, got.balance.held_fen, got.balance.available_fen) == (
        100_000, 30_000, 70_000)


def test_batch_top_up_moves_every_line_and_is_idempotent(server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 500_000, [cb.ALLOCATED, cb.ALLOCATED, cb.ALLOCATED])
    a, b, c = (s.account_id for s in fleet.subs)
    request = cb.top_up_request(fleet.parent_id, [(c, 30_000), (a, 10_000), (b, 20_000)])
    stub = cb.control(server)
    first = stub.BatchTopUp(request)
    assert first.decision == cb.APPROVED
    assert first.decline_reason == common_pb2.DECLINE_REASON_UNSPECIFIED
    assert (first.total_fen, first.parent_balance_fen) == (60_000, 440_000)
    assert [cb.balance_of(server, x)[0] for x in (a, b, c)] == [10_000, 20_000, 30_000]
    assert cb.balance_of(server, fleet.parent_id)[0] == 440_000
    assert count(db, "journal", "kind = 5") == 3

    # The sub-account's history shows the allocation; the parent's the debit.
    txns = server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=a)).transactions
    assert [(t.kind, t.amount_fen) for t in txns] == [(account_pb2.TRANSACTION_KIND_ALLOCATION, 10_000)]
    parent_txns = server.accounts.ListTransactions(account_pb2.ListTransactionsRequest(
        account_id=fleet.parent_id)).transactions
    assert sorted(t.amount_fen for t in parent_txns
                  if t.kind == account_pb2.TRANSACTION_KIND_ALLOCATION) == [-30_000, -20_000, -10_000]

    # Resent: the same answer, nothing moves twice.
    again = stub.BatchTopUp(request)
    assert again == first
    assert [cb.balance_of(server, x)[0] for x in (a, b, c)] == [10_000, 20_000, 30_000]
    assert cb.balance_of(server, fleet.parent_id)[0] == 440_000
    assert count(db, "journal", "kind = 5") == 3
    # The same request_id for another batch is refused and changes nothing.
    other = cb.top_up_request(fleet.parent_id, [(a, 99)], request_id=request.request_id)
    expect(lambda: stub.BatchTopUp(other), FP, "REQUEST_ID_REUSED")
    assert cb.balance_of(server, a)[0] == 10_000
    cb.assert_verified(server)


def test_batch_top_up_without_the_money_moves_nothing(server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 100_000, [cb.ALLOCATED, cb.ALLOCATED, cb.SHARED])
    a, b, shared = fleet.subs
    short = cb.batch_top_up(server, fleet.parent_id, [(a.account_id, 60_000),
                                                      (b.account_id, 40_001)])
    assert short.decision == cb.DECLINED
    assert short.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert (short.total_fen, short.parent_balance_fen) == (100_001, 100_000)
    assert cb.balance_of(server, a.account_id) == (0, 0)
    assert cb.balance_of(server, b.account_id) == (0, 0)
    assert cb.balance_of(server, fleet.parent_id) == (100_000, 0)
    assert count(db, "journal", "kind = 5") == 0

    # Money held by a SHARED vehicle's open hold is not available to allocate.
    hold = cb.approved(server, shared, 60_000)
    held = cb.batch_top_up(server, fleet.parent_id, [(a.account_id, 40_001)])
    assert held.decline_reason == common_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
    assert count(db, "journal", "kind = 5") == 0
    builders.cancel(server, hold.hold_id)
    # Exactly all of it fits.
    ok = cb.batch_top_up(server, fleet.parent_id, [(a.account_id, 60_000), (b.account_id, 40_000)])
    assert (ok.decision, ok.parent_balance_fen) == (cb.APPROVED, 0)
    cb.assert_verified(server)


def test_batch_top_up_refuses_lines_that_are_not_its_allocated_sub_accounts(
        server: RunningServer, db: Conn) -> None:
    fleet = cb.open_fleet(server, 1_000_000, [cb.ALLOCATED, cb.SHARED])
    mine, shared = fleet.subs
    stranger_fleet = cb.open_fleet(server, 0, [cb.ALLOCATED])
    top_level = cb.open_account(server, account_pb2.ACCOUNT_TYPE_PERSONAL)

    for bad in (shared.account_id, stranger_fleet.subs[0].account_id, top_level.account_id,
                fleet.parent_id):
        # The valid line must not move either: all or nothing.
        expect(lambda bad=bad: cb.batch_top_up(server, fleet.parent_id,  # type: ignore[misc]
                                               [(mine.account_id, 1_000), (bad, 1_000)]),
               FP, "NOT_AN_ALLOCATED_SUB_ACCOUNT")
    expect(lambda: cb.batch_top_up(server, fleet.parent_id,
                                   [(mine.account_id, 1_000), (cb.new_uuid(), 1_000)]),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    # A vehicle cannot top itself up from another fleet's parent either.
    expect(lambda: cb.batch_top_up(server, stranger_fleet.parent_id, [(mine.account_id, 1)]),
           FP, "NOT_AN_ALLOCATED_SUB_ACCOUNT")
    assert count(db, "journal", "kind = 5") == 0
    assert cb.balance_of(server, mine.account_id) == (0, 0)
    assert cb.balance_of(server, fleet.parent_id) == (1_000_000, 0)

    # Duplicate lines are a malformed request.
    e = expect(lambda: cb.batch_top_up(server, fleet.parent_id,
                                       [(mine.account_id, 1_000), (mine.account_id, 2_000)]),
               IA, "LINE_DUPLICATE", field="lines[1].account_id")
    assert e.fields == ["lines[1].account_id"]
    expect(lambda: cb.batch_top_up(server, fleet.parent_id, []), IA, field="lines")
    expect(lambda: cb.batch_top_up(server, fleet.parent_id, [(mine.account_id, 0)]), IA,
           field="lines[0].amount_fen")
    assert count(db, "journal", "kind = 5") == 0
    cb.assert_verified(server)


# --------------------------------------------------------------------------
# Per-vehicle cost report
# --------------------------------------------------------------------------

def _report(server: RunningServer, parent: str, start: dt.datetime, end: dt.datetime
            ) -> dict[str, control_pb2.VehicleCost]:
    response = cb.control(server).GetFleetCostReport(control_pb2.GetFleetCostReportRequest(
        parent_account_id=parent, start_time=cb.ts(start), end_time=cb.ts(end)))
    labels = [v.label for v in response.vehicles]
    assert labels == sorted(labels), "lines are ordered by label"
    return {v.label: v for v in response.vehicles}


def _line(v: control_pb2.VehicleCost) -> tuple[int, int, int, int, bool]:
    return v.spend_fen, v.volume_ml, v.sale_count, v.baseline_spend_fen, v.anomaly


def test_fleet_cost_report_per_vehicle_with_anomaly_flag(server: RunningServer) -> None:
    day = dt.timedelta(days=1)
    t0 = server.clock.now()
    fleet = cb.open_fleet(server, 1_000_000, [cb.SHARED, cb.ALLOCATED, cb.SHARED],
                          labels=["云A·00001", "云A·00002", "云A·00004"])
    a, b, idle = fleet.subs
    cb.batch_top_up(server, fleet.parent_id, [(b.account_id, 200_000)])
    other_fleet = cb.open_fleet(server, 500_000, [cb.SHARED], labels=["云A·00001"])

    # Four days of steady spend: 100.00 yuan a day each.
    late: builders.FundedCard | None = None
    for k in range(4):
        cb.advance_to_local(server, t0 + k * day + dt.timedelta(hours=1))
        cb.sale(server, a, 10_000, volume_ml=12_000)
        cb.sale(server, b, 10_000, volume_ml=12_000)
        cb.sale(server, other_fleet.subs[0], 90_000)
        if k == 2:
            # A vehicle that joined two periods before the report.
            late_sub = cb.open_account(server, parent=fleet.parent_id, mode=cb.SHARED,
                                       label="云A·00003")
            late = cb.issue_card(server, late_sub.account_id)
        if late is not None:
            cb.sale(server, late, 1_000, volume_ml=1_200)
    assert late is not None

    # The reported day: A spends 2.5x its mean, B exactly 2x, the newcomer 50x.
    cb.advance_to_local(server, t0 + 4 * day + dt.timedelta(hours=2))
    cb.sale(server, a, 12_000, volume_ml=15_000)
    partly = cb.approved(server, a, 20_000)
    builders.confirm(server, partly.hold_id, 13_000, volume_ml=16_000)
    builders.cancel(server, cb.approved(server, a, 30_000).hold_id)  # cancelled: not spend
    cb.approved(server, a, 40_000)  # still open: not spend
    cb.sale(server, b, 20_000, volume_ml=25_000)
    cb.sale(server, late, 50_000, volume_ml=60_000)

    report = _report(server, fleet.parent_id, t0 + 4 * day, t0 + 5 * day)
    assert set(report) == {"云A·00001", "云A·00002", "云A·00003", "云A·00004"}
    assert report["云A·00001"].account_id == a.account_id
    assert _line(report["云A·00001"]) == (25_000, 31_000, 2, 10_000, True)
    assert _line(report["云A·00002"]) == (20_000, 25_000, 1, 10_000, False)
    # Two earlier periods (the first only partly: it joined an hour into it), a
    # mean of 10.00 yuan, but too little history to call anything an anomaly.
    assert _line(report["云A·00003"]) == (50_000, 60_000, 1, 1_000, False)
    assert _line(report["云A·00004"]) == (0, 0, 0, 0, False)
    assert report["云A·00004"].account_id == idle.account_id

    # An ordinary earlier day is not flagged.
    earlier = _report(server, fleet.parent_id, t0 + 3 * day, t0 + 4 * day)
    assert _line(earlier["云A·00001"]) == (10_000, 12_000, 1, 10_000, False)
    assert _line(earlier["云A·00003"]) == (1_000, 1_200, 1, 1_000, False)

    # A longer period sums the days.
    whole = _report(server, fleet.parent_id, t0, t0 + 5 * day)
    assert whole["云A·00001"].spend_fen == 4 * 10_000 + 25_000
    assert whole["云A·00001"].sale_count == 6
    assert not whole["云A·00001"].anomaly

    expect(lambda: _report(server, fleet.parent_id, t0 + day, t0), IA, field="end_time")
    expect(lambda: _report(server, cb.new_uuid(), t0, t0 + day), grpc.StatusCode.NOT_FOUND)
    cb.assert_verified(server)


def test_fleet_cost_report_pages_with_the_fleets_summary(server: RunningServer) -> None:
    """Pages of a report over gRPC: each vehicle once, in label or spend
    order, the anomalous ones alone, the summary and top spenders of the
    whole fleet on every page; bad shapes refused, naming the field."""
    t0 = server.clock.now()
    labels = [f"云A·{i:05d}" for i in range(7)]
    fleet = cb.open_fleet(server, 2_000_000, [cb.SHARED] * 7, labels=labels)
    cb.advance_to_local(server, t0 + dt.timedelta(hours=1))
    spends = [3_000, 1_000, 0, 2_000, 30_000, 1_000, 4_000]  # the median of six: 2_500
    for sub, spend in zip(fleet.subs, spends, strict=True):
        if spend:
            cb.sale(server, sub, spend, volume_ml=spend)
    start, end = cb.ts(t0), cb.ts(t0 + dt.timedelta(days=1))

    def pages(**shape: object) -> tuple[list[str], control_pb2.GetFleetCostReportResponse]:
        seen: list[str] = []
        token = ""
        while True:
            got = cb.control(server).GetFleetCostReport(control_pb2.GetFleetCostReportRequest(
                parent_account_id=fleet.parent_id, start_time=start, end_time=end, page_size=3,
                page_token=token, top_spenders_count=2, **shape))  # type: ignore[arg-type]
            assert len(got.vehicles) <= 3
            assert [x.label for x in got.top_spenders] == ["云A·00004", "云A·00006"]
            s = got.summary
            assert (s.vehicle_count, s.anomalous_vehicle_count, s.spend_fen, s.sale_count,
                    s.median_spend_fen) == (7, 1, 41_000, 6, 2_500)
            seen += [x.label for x in got.vehicles]
            if not got.next_page_token:
                return seen, got
            token = got.next_page_token

    by_label, _ = pages()
    assert by_label == labels
    by_spend, _ = pages(order=control_pb2.FLEET_COST_ORDER_SPEND_DESCENDING)
    assert by_spend == ["云A·00004", "云A·00006", "云A·00000", "云A·00003", "云A·00001", "云A·00005",
                        "云A·00002"]
    flagged, last = pages(anomalies_only=True)
    assert flagged == ["云A·00004"]  # 30_000 >= 3 x 2_500
    assert list(last.vehicles[0].anomalies) == [control_pb2.VEHICLE_ANOMALY_ABOVE_FLEET_MEDIAN]
    whole = cb.control(server).GetFleetCostReport(control_pb2.GetFleetCostReportRequest(
        parent_account_id=fleet.parent_id, start_time=start, end_time=end))
    assert len(whole.vehicles) == 7 and not whole.next_page_token and not whole.top_spenders

    def refused(field: str, reason: str, **shape: object) -> None:
        request = control_pb2.GetFleetCostReportRequest(
            parent_account_id=fleet.parent_id, start_time=start, end_time=end,
            **shape)  # type: ignore[arg-type]
        expect(lambda: cb.control(server).GetFleetCostReport(request), IA, reason, field)

    refused("page_size", "PAGE_SIZE_INVALID", page_size=501)
    refused("page_size", "PAGE_SIZE_INVALID", page_size=-1)
    refused("page_token", "PAGE_TOKEN_INVALID", page_token="next")
    refused("top_spenders_count", "VALUE_TOO_LARGE", top_spenders_count=101)
    refused("tank_capacity_ml", "VALUE_NEGATIVE", tank_capacity_ml=-1)
    refused("working_hours_end_minute", "WORKING_HOURS_INVALID", working_hours_start_minute=360,
            working_hours_end_minute=360)
    refused("working_hours_start_minute", "WORKING_HOURS_INVALID", working_hours_start_minute=1440,
            working_hours_end_minute=60)
    refused("order", "ENUM_VALUE_INVALID", order=7)
