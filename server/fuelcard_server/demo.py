"""Demo data, created through the public API like any client would.

Idempotent: every request has a fixed request_id, so running it twice
creates nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from fuelcard.v1 import (
    account_pb2,
    account_pb2_grpc,
    funding_pb2,
    funding_pb2_grpc,
    risk_pb2,
    risk_pb2_grpc,
)

DEFAULT_RULES = Path(__file__).parent / "risk" / "default_rules.toml"


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


def _channel(target: str, certs: Path | None) -> grpc.aio.Channel:
    if certs is None:
        return grpc.aio.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "admin-demo-admin.key").read_bytes(),
        certificate_chain=(certs / "admin-demo-admin.pem").read_bytes())
    return grpc.aio.secure_channel(target, creds)


async def seed(target: str, certs: Path | None = None) -> list[tuple[DemoCard, str]]:
    """Create the demo accounts and cards as an admin service (with the
    demo's admin certificate when TLS is on); return (card, account_id)."""
    made = []
    async with _channel(target, certs) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        funding = funding_pb2_grpc.FundingServiceStub(channel)
        for i, card in enumerate(DEMO_CARDS, start=1):
            opened = await accounts.OpenAccount(account_pb2.OpenAccountRequest(
                request_id=f"demo-open-{i}", type=card.account_type,
                holder=account_pb2.Holder(name=card.holder)))
            account_id = opened.account.account_id
            await accounts.IssueCard(account_pb2.IssueCardRequest(
                request_id=f"demo-card-{i}", account_id=account_id, card_number=card.card_number))
            # A counter top-up: the one channel staff may book unsigned (a
            # WeChat Pay or bank payment comes signed by its adapter).
            await funding.Recharge(funding_pb2.RechargeRequest(
                request_id=f"demo-counter-{i}", account_id=account_id,
                channel=funding_pb2.CHANNEL_COUNTER, channel_txn_id=f"demo-ctr-{i:04d}",
                amount_fen=card.recharge_fen))
            made.append((card, account_id))
        # The default risk rule set, in force for the demo (the same request
        # id each run: a second run replays it).
        await risk_pb2_grpc.RiskServiceStub(channel).LoadRuleSet(risk_pb2.LoadRuleSetRequest(
            request_id="demo-risk-default", document=DEFAULT_RULES.read_text(encoding="utf-8"),
            format=risk_pb2.RULE_FORMAT_TOML))
    return made
