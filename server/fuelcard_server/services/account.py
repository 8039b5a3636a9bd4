"""AccountService: opening accounts, issuing cards, and account reads for
internal services."""

from __future__ import annotations

from typing import Any

import grpc
from fuelcard.v1 import account_pb2, account_pb2_grpc

from fuelcard_server import cards, errors, history, wire
from fuelcard_server.identity import Role
from fuelcard_server.services.handling import Servicer, rpc
from fuelcard_server.validation import NAME_MAX_CHARS, Violations

Ctx = grpc.aio.ServicerContext[Any, Any]

ACCOUNT_TYPES = frozenset({account_pb2.ACCOUNT_TYPE_PERSONAL, account_pb2.ACCOUNT_TYPE_CORPORATE,
                           account_pb2.ACCOUNT_TYPE_FAMILY})
CARD_STATUSES = frozenset({account_pb2.CARD_STATUS_ACTIVE, account_pb2.CARD_STATUS_BLOCKED,
                           account_pb2.CARD_STATUS_CLOSED})
PHONE_MAX_CHARS = 20
ID_NUMBER_MAX_CHARS = 32

OPEN_ACCOUNT_SQL = (
    "SELECT fc.open_account(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_kind => %(kind)s::smallint, p_name => %(name)s,"
    " p_phone => %(phone)s, p_id_number => %(id_number)s, p_parent_uid => %(parent_uid)s::uuid,"
    " p_funding_mode => %(funding_mode)s::smallint, p_label => %(label)s,"
    " p_now => %(now)s::timestamptz)")
SUB_ACCOUNT_MODES = frozenset({account_pb2.FUNDING_MODE_ALLOCATED, account_pb2.FUNDING_MODE_SHARED})
LABEL_MAX_CHARS = 50
ISSUE_CARD_CALL = (
    "fc.issue_card(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_account_uid => %(account_uid)s::uuid,"
    " p_pan_index => %(pan_index)s, p_masked => %(masked)s, p_now => %(now)s::timestamptz)")
ISSUE_CARD_SQL = "SELECT " + ISSUE_CARD_CALL
# Issue, then store the number's sealed segments and sealed whole
# (card_numbers.py), in one statement and so one transaction.
ISSUE_AND_STORE_CARD_SQL = (
    "WITH i AS MATERIALIZED (SELECT " + ISSUE_CARD_CALL + " AS d)"
    " SELECT fc.store_card_number(p_issued => i.d, p_pan_index => %(pan_index)s,"
    " p_root_key_id => %(root_key_id)s, p_sealed => %(sealed)s::bytea[]) FROM i")
UPDATE_CARD_STATUS_SQL = (
    "SELECT fc.update_card_status(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_card_uid => %(card_uid)s::uuid,"
    " p_status => %(status)s::smallint, p_now => %(now)s::timestamptz)")
GET_ACCOUNT_SQL = ("SELECT fc.account_json(a => a) FROM fc.accounts a"
                   " WHERE a.uid = %s::uuid AND a.kind <> fc.account_kind_system()")
GET_CARD_SQL = "SELECT fc.card_json(c => c) FROM fc.cards c WHERE c.uid = %s::uuid"
# Keyset pages, oldest first (a fleet's vehicles in the order they were added):
# the page token is the last id seen. Indexes (parent_id, id) and
# (account_id, id) (migration 0005) serve each page without a sort.
SUB_ACCOUNTS_PAGE_SQL = """
    SELECT a.id, fc.account_json(a => a) FROM fc.accounts a
     WHERE a.parent_id = %(parent)s AND a.id > %(after)s
     ORDER BY a.id LIMIT %(limit)s"""
CARDS_PAGE_SQL = """
    SELECT c.id, fc.card_json(c => c) FROM fc.cards c
     WHERE c.account_id = %(account)s AND c.id > %(after)s
     ORDER BY c.id LIMIT %(limit)s"""

# journal kind -> TransactionKind
_TXN_KIND = {1: account_pb2.TRANSACTION_KIND_RECHARGE, 2: account_pb2.TRANSACTION_KIND_PURCHASE,
             5: account_pb2.TRANSACTION_KIND_ALLOCATION,
             8: account_pb2.TRANSACTION_KIND_RECHARGE_REFUND,
             # kind 12 on a customer's account is only ever a repayment (the
             # overrun's own entry is between RECEIVABLES and FUEL_SALES)
             12: account_pb2.TRANSACTION_KIND_OVERRUN_REPAYMENT}


def _page(rows: list[Any], size: int) -> tuple[list[Any], str]:
    """The page's rows, and the token for the next page (empty on the last)."""
    if len(rows) > size:
        return rows[:size], str(rows[size - 1][0])
    return rows, ""


class AccountService(Servicer, account_pb2_grpc.AccountServiceServicer):

    async def _account(self, account_id: str) -> account_pb2.Account:
        row = await self.d.db.fetch_one(GET_ACCOUNT_SQL, (account_id,))
        if row is None:
            raise errors.not_found("ACCOUNT_NOT_FOUND", "account")
        return wire.account(row[0])

    @rpc(Role.ADMIN)
    async def OpenAccount(self, request: account_pb2.OpenAccountRequest, context: Ctx
                          ) -> account_pb2.OpenAccountResponse:
        v = Violations()
        v.request_id(request.request_id)
        parent = None
        if request.parent_account_id:
            parent = v.uuid("parent_account_id", request.parent_account_id)
            v.enum("funding_mode", request.funding_mode, SUB_ACCOUNT_MODES)
            if request.type:  # a sub-account is of its parent's type
                v.enum("type", request.type, ACCOUNT_TYPES)
        else:
            v.enum("type", request.type, ACCOUNT_TYPES)
            if request.funding_mode:
                v.add("funding_mode", "only sub-accounts have a funding mode",
                      "FUNDING_MODE_WITHOUT_PARENT")
        v.text("label", request.label, required=False, max_chars=LABEL_MAX_CHARS)
        v.text("holder.name", request.holder.name, required=True, max_chars=NAME_MAX_CHARS)
        phone, id_number = request.holder.phone, request.holder.id_number
        if phone and not (phone.isascii() and phone.isdigit() and 5 <= len(phone) <= PHONE_MAX_CHARS):
            v.add("holder.phone", "must be 5-20 digits", "PHONE_MALFORMED")
        if id_number and not (id_number.isascii() and id_number.isalnum()
                              and len(id_number) <= ID_NUMBER_MAX_CHARS):
            v.add("holder.id_number", "must be up to 32 letters or digits", "ID_NUMBER_MALFORMED")
        v.raise_if_any()
        d = await self.d.db.call(OPEN_ACCOUNT_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("open_account", request), "kind": request.type,
            "name": request.holder.name, "phone": phone, "id_number": id_number,
            "parent_uid": parent, "funding_mode": request.funding_mode, "label": request.label,
            "now": self.d.clock.now()})
        return account_pb2.OpenAccountResponse(account=await self._account(d["account_id"]))

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def GetAccount(self, request: account_pb2.GetAccountRequest, context: Ctx
                         ) -> account_pb2.GetAccountResponse:
        v = Violations()
        v.uuid("account_id", request.account_id)
        v.raise_if_any()
        return account_pb2.GetAccountResponse(account=await self._account(request.account_id))

    @rpc(Role.ADMIN)
    async def IssueCard(self, request: account_pb2.IssueCardRequest, context: Ctx
                        ) -> account_pb2.IssueCardResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("account_id", request.account_id)
        if request.card_number:
            v.card_number("card_number", request.card_number)
        v.raise_if_any()
        caller = self.d.caller(context)
        # A generated number is random (a clash with a card in use, about one
        # in 10^14 per card held, answers CARD_NUMBER_IN_USE; nothing is
        # remembered, so the same request may simply be sent again).
        pan = request.card_number or cards.new_card_number()
        pan_index = self.d.pan_index.of(pan)
        d = await self.d.db.call(ISSUE_AND_STORE_CARD_SQL, {
            "caller": caller, "request_id": request.request_id,
            "request_hash": self.d.fingerprint("issue_card", request),
            "account_uid": request.account_id, "pan_index": pan_index, "masked": cards.mask(pan),
            "now": self.d.clock.now(), "root_key_id": self.d.card_vault.root_key_id,
            "sealed": self.d.card_vault.seal(pan)})
        # The full number is in the first answer only: a replay (the number
        # drawn for it is not the card's) shows the masked one, in `card`.
        return account_pb2.IssueCardResponse(card=wire.card(d["card"]),
                                             card_number="" if d.get("replayed") else pan)

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def GetCard(self, request: account_pb2.GetCardRequest, context: Ctx
                      ) -> account_pb2.GetCardResponse:
        v = Violations()
        v.uuid("card_id", request.card_id)
        v.raise_if_any()
        row = await self.d.db.fetch_one(GET_CARD_SQL, (request.card_id,))
        if row is None:
            raise errors.not_found("CARD_NOT_FOUND", "card")
        return account_pb2.GetCardResponse(card=wire.card(row[0]))

    @rpc(Role.ADMIN)
    async def UpdateCardStatus(self, request: account_pb2.UpdateCardStatusRequest, context: Ctx
                               ) -> account_pb2.UpdateCardStatusResponse:
        v = Violations()
        v.request_id(request.request_id)
        v.uuid("card_id", request.card_id)
        v.enum("status", request.status, CARD_STATUSES)
        v.raise_if_any()
        d = await self.d.db.call(UPDATE_CARD_STATUS_SQL, {
            "caller": self.d.caller(context), "request_id": request.request_id,
            "request_hash": self.d.fingerprint("update_card_status", request),
            "card_uid": request.card_id, "status": request.status, "now": self.d.clock.now()})
        return account_pb2.UpdateCardStatusResponse(card=wire.card(d["card"]))

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def ListHolds(self, request: account_pb2.ListHoldsRequest, context: Ctx
                        ) -> account_pb2.ListHoldsResponse:
        v = Violations()
        account_id = v.uuid("account_id", request.account_id)
        size = v.page_size("page_size", request.page_size)
        before = v.page_token("page_token", request.page_token)
        if request.state not in (0, 1, 2, 3, 4, 5, 6):  # 5, 6: SUSPENDED, REJECTED (risk)
            v.add("state", "must be a defined HoldState", "ENUM_VALUE_INVALID")
        v.raise_if_any()
        assert account_id is not None
        holds, token = await history.holds_page(self.d.reads, account_id, request.state, size, before)
        return account_pb2.ListHoldsResponse(holds=[wire.hold(h) for h in holds],
                                             next_page_token=token)

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def ListTransactions(self, request: account_pb2.ListTransactionsRequest, context: Ctx
                               ) -> account_pb2.ListTransactionsResponse:
        v = Violations()
        account_id = v.uuid("account_id", request.account_id)
        size = v.page_size("page_size", request.page_size)
        before = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        assert account_id is not None
        lines, token = await history.journal_page(self.d.reads, account_id, history.ASSET_MONEY,
                                                  size, before)
        response = account_pb2.ListTransactionsResponse(next_page_token=token)
        for line in lines:
            t = response.transactions.add(
                transaction_id=str(line.id), kind=_TXN_KIND[line.kind],
                amount_fen=line.signed_amount, hold_id=line.hold_id, recharge_id=line.recharge_id)
            t.create_time.FromMicroseconds(line.create_us)
        return response

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def ListSubAccounts(self, request: account_pb2.ListSubAccountsRequest, context: Ctx
                              ) -> account_pb2.ListSubAccountsResponse:
        v = Violations()
        parent_id = v.uuid("parent_account_id", request.parent_account_id)
        size = v.page_size("page_size", request.page_size)
        after = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        assert parent_id is not None
        # A listing, not a money movement: the read pool (the replica when
        # configured), as ListHolds and ListChannelExceptions.
        parent = await history.account_key(self.d.reads, parent_id)
        rows = await self.d.reads.fetch_all(SUB_ACCOUNTS_PAGE_SQL, {
            "parent": parent, "after": after or 0, "limit": size + 1})
        page, token = _page(rows, size)
        return account_pb2.ListSubAccountsResponse(accounts=[wire.account(r[1]) for r in page],
                                                   next_page_token=token)

    @rpc(Role.ADMIN, Role.REVIEWER)
    async def ListCards(self, request: account_pb2.ListCardsRequest, context: Ctx
                        ) -> account_pb2.ListCardsResponse:
        v = Violations()
        account_id = v.uuid("account_id", request.account_id)
        size = v.page_size("page_size", request.page_size)
        after = v.page_token("page_token", request.page_token)
        v.raise_if_any()
        assert account_id is not None
        account = await history.account_key(self.d.reads, account_id)
        rows = await self.d.reads.fetch_all(CARDS_PAGE_SQL, {
            "account": account, "after": after or 0, "limit": size + 1})
        page, token = _page(rows, size)
        return account_pb2.ListCardsResponse(cards=[wire.card(r[1]) for r in page],
                                             next_page_token=token)
