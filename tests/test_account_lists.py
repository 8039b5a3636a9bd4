"""AccountService.ListSubAccounts and ListCards (issue 18 item 3): a fleet's
vehicles and an account's cards, keyset-paged per AIP-132, over the real
server and database."""

from __future__ import annotations

import grpc
from fuelcard.v1 import account_pb2

from tests.plugins.server import RunningServer, TlsServer
from tests.support import control_builders as cb
from tests.support.ledger_asserts import Conn, expect

IA = grpc.StatusCode.INVALID_ARGUMENT


def _all_sub_accounts(server: RunningServer, parent: str, page_size: int
                      ) -> tuple[list[str], int]:
    ids: list[str] = []
    token, pages = "", 0
    while True:
        page = server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
            parent_account_id=parent, page_size=page_size, page_token=token))
        pages += 1
        assert len(page.accounts) <= page_size
        ids += [a.account_id for a in page.accounts]
        token = page.next_page_token
        if not token:
            return ids, pages


def test_sub_accounts_come_oldest_first_in_pages_and_only_the_parents(server: RunningServer) -> None:
    parent = cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE, name="昆明顺达物流")
    other = cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE, name="另一车队")
    plates = [f"云A·{n:05d}" for n in range(5)]
    opened = [cb.open_account(server, parent=parent.account_id, mode=cb.SHARED, label=p).account_id
              for p in plates]
    cb.open_account(server, parent=other.account_id, mode=cb.SHARED, label="云B·99999")

    ids, pages = _all_sub_accounts(server, parent.account_id, 2)
    assert ids == opened
    assert pages == 3
    first = server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
        parent_account_id=parent.account_id))
    assert [a.label for a in first.accounts] == plates
    assert all(a.parent_account_id == parent.account_id for a in first.accounts)
    assert first.next_page_token == ""
    # A page exactly full at the end says so with an empty token, not an empty page after.
    exact = server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
        parent_account_id=parent.account_id, page_size=5))
    assert len(exact.accounts) == 5 and exact.next_page_token == ""
    # An account without sub-accounts lists none.
    none = server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
        parent_account_id=opened[0]))
    assert list(none.accounts) == [] and none.next_page_token == ""


def test_cards_of_an_account_whatever_their_status(server: RunningServer) -> None:
    account = cb.open_account(server, account_pb2.ACCOUNT_TYPE_PERSONAL)
    cards = [cb.issue_card(server, account.account_id).card_id for _ in range(3)]
    cb.issue_card(server, cb.open_account(server, account_pb2.ACCOUNT_TYPE_PERSONAL).account_id)
    server.accounts.UpdateCardStatus(account_pb2.UpdateCardStatusRequest(
        request_id=cb.new_uuid(), card_id=cards[1], status=account_pb2.CARD_STATUS_BLOCKED))

    page = server.accounts.ListCards(account_pb2.ListCardsRequest(
        account_id=account.account_id, page_size=2))
    assert [c.card_id for c in page.cards] == cards[:2]
    assert page.cards[1].status == account_pb2.CARD_STATUS_BLOCKED
    assert all("*" in c.masked_card_number for c in page.cards)
    rest = server.accounts.ListCards(account_pb2.ListCardsRequest(
        account_id=account.account_id, page_size=2, page_token=page.next_page_token))
    assert [c.card_id for c in rest.cards] == cards[2:]
    assert rest.next_page_token == ""


def test_bad_list_requests_are_refused_with_the_field(server: RunningServer) -> None:
    parent = cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE).account_id
    expect(lambda: server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest()),
           IA, field="parent_account_id")
    expect(lambda: server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
        parent_account_id=parent, page_size=501)), IA, "PAGE_SIZE_INVALID")
    expect(lambda: server.accounts.ListCards(account_pb2.ListCardsRequest(
        account_id=parent, page_token="not-a-token")), IA, "PAGE_TOKEN_INVALID")
    expect(lambda: server.accounts.ListCards(account_pb2.ListCardsRequest(account_id=cb.new_uuid())),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    expect(lambda: server.accounts.ListSubAccounts(account_pb2.ListSubAccountsRequest(
        parent_account_id=cb.new_uuid())), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_terminals_may_not_list(tls_server: TlsServer) -> None:
    from fuelcard.v1 import account_pb2_grpc
    pos = account_pb2_grpc.AccountServiceStub(tls_server.channel("pos-KM-001-T1"))
    reviewer = account_pb2_grpc.AccountServiceStub(tls_server.channel("reviewer-risk"))
    expect(lambda: pos.ListCards(account_pb2.ListCardsRequest(account_id=cb.new_uuid())),
           grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
    expect(lambda: reviewer.ListCards(account_pb2.ListCardsRequest(account_id=cb.new_uuid())),
           grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


def test_lists_run_on_the_read_pool_never_the_transaction_pool(server: RunningServer, db: Conn) -> None:
    parent = cb.open_account(server, account_pb2.ACCOUNT_TYPE_CORPORATE).account_id
    vehicle = cb.open_account(server, parent=parent, mode=cb.SHARED, label="云A·1").account_id
    card = cb.issue_card(server, vehicle).card_id
    for _ in range(3):  # every connection of the read pool has run one at least once
        assert [a.account_id for a in server.accounts.ListSubAccounts(
            account_pb2.ListSubAccountsRequest(parent_account_id=parent)).accounts] == [vehicle]
        assert [c.card_id for c in server.accounts.ListCards(
            account_pb2.ListCardsRequest(account_id=vehicle)).cards] == [card]
    by_pool: dict[str, list[str]] = {}
    for application, query in db.execute(
            "SELECT application_name, query FROM pg_stat_activity WHERE application_name LIKE 'fuelcard%'"):
        by_pool.setdefault(application, []).append(query)
    pages = ("ORDER BY a.id LIMIT", "ORDER BY c.id LIMIT")
    assert any(p in q for q in by_pool["fuelcard-reads-w0"] for p in pages), by_pool
    assert not any(p in q for q in by_pool.get("fuelcard-w0", []) for p in pages), by_pool
