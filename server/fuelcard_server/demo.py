"""Demo data, created through the public API like any client would.

Idempotent: every request has a fixed request_id, so running it twice
creates nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    funding_pb2,
    funding_pb2_grpc,
    transaction_pb2,
    transaction_pb2_grpc,
)


@dataclass(frozen=True)
class DemoCard:
    holder: str
    card_number: str
    recharge_fen: int
    account_type: account_pb2.AccountType.ValueType


# Luhn-valid numbers under the demo issuer prefix; printed for the reader.
DEMO_CARDS = (
    DemoCard("张伟 (personal)", "9860000000000000016", 80_000, account_pb2.ACCOUNT_TYPE_PERSONAL),
    DemoCard("李娜 (family main card)", "9860000000000000024", 150_000,
             account_pb2.ACCOUNT_TYPE_FAMILY),
    DemoCard("顺丰车队 fleet", "9860000000000000032", 2_000_000,
             account_pb2.ACCOUNT_TYPE_CORPORATE),
)


async def seed(target: str) -> list[tuple[DemoCard, str]]:
    """Create the demo accounts and cards; return (card, account_id)."""
    made = []
    async with grpc.aio.insecure_channel(target) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        pos = transaction_pb2_grpc.TransactionServiceStub(channel)
        for i, card in enumerate(DEMO_CARDS, start=1):
            opened = await accounts.OpenAccount(account_pb2.OpenAccountRequest(
                request_id=f"demo-open-{i}", type=card.account_type,
                holder=account_pb2.Holder(name=card.holder)))
            account_id = opened.account.account_id
            await accounts.IssueCard(account_pb2.IssueCardRequest(
                request_id=f"demo-card-{i}", account_id=account_id, card_number=card.card_number))
            await funding.Recharge(funding_pb2.RechargeRequest(
                request_id=f"demo-recharge-{i}", account_id=account_id,
                channel=funding_pb2.CHANNEL_WECHAT_PAY, channel_txn_id=f"demo-wx-{i:04d}",
                amount_fen=card.recharge_fen))
            made.append((card, account_id))
        # One completed sale, so history and points have something to show.
        auth = await pos.Authorize(transaction_pb2.AuthorizeRequest(
            request_id="demo-auth-1", card_number=DEMO_CARDS[0].card_number, amount_fen=30_000,
            station_id="KM-001", terminal_id="KM-001-T1", nozzle=3,
            product=common_pb2.PRODUCT_GASOLINE_92))
        if auth.decision == common_pb2.DECISION_APPROVED:
            await pos.Confirm(transaction_pb2.ConfirmRequest(
                request_id="demo-confirm-1", hold_id=auth.hold.hold_id, final_amount_fen=25_120,
                volume_ml=32_000, unit_price_fen=785))
    return made
