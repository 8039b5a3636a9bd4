"""Demo data, created through the public API like any client would, and the
banner `fuelcard serve --demo` prints.

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

from fuelcard_server.risk.model import Rule, RuleSet, load_text

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


# -- the banner ----------------------------------------------------------------
# Someone trying the demo with a script (authorize, confirm, authorize again
# on the same card) meets the risk rules within seconds: a second
# authorization a moment after the first is declined RISK_DECLINED, and the
# terminal is not told which rule fired (transaction.proto, risk). So the
# banner says which rules pace a card, read from the very document the demo
# loads, so that it cannot drift from the rules in force.

_PACE_KINDS = ("min_interval", "velocity", "decline_streak")


def _span(seconds: int) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _effect(rule: Rule) -> str:
    if rule.action == "decline":
        return "DECLINED (RISK_DECLINED)"
    if rule.action == "review":
        return "hold SUSPENDED for review (DECISION_REVIEW)"
    return f"+{rule.score} to the risk score"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _pace_line(rule: Rule) -> str:
    if rule.kind == "min_interval":
        what = f"an authorization less than {rule.window_s} s after the card's previous one"
    elif rule.kind == "velocity":
        what = f"the {_ordinal(rule.threshold)} authorization of one card within {_span(rule.window_s)}"
    else:
        what = f"an authorization after {rule.threshold} declines of the card within {_span(rule.window_s)}"
    if rule.account_types:
        what += f" ({'/'.join(rule.account_types)} cards)"
    return f"  {rule.rule_id:<20} {what}: {_effect(rule)}"


def demo_rule_set() -> RuleSet:
    """The rule set the demo puts in force (DEFAULT_RULES)."""
    return load_text(DEFAULT_RULES.read_text(encoding="utf-8"), "toml")


def interval_wait_s(rules: RuleSet) -> int:
    """How long to wait between authorizations on one card so that no
    minimum-interval rule fires (0 if there is none)."""
    return max((r.window_s for r in rules.rules if r.kind == "min_interval"), default=0)


def risk_lines(rules: RuleSet) -> list[str]:
    """What the banner says about the rules that pace one card."""
    lines = [f"risk rules in force (rule set {rules.name!r}, {DEFAULT_RULES.name}) that pace one card:"]
    lines += [_pace_line(r) for r in rules.rules if r.kind in _PACE_KINDS]
    lines.append(f"  a risk score of {rules.review_score} suspends the hold for review, "
                 f"{rules.decline_score} declines it")
    declining = sorted((r for r in rules.rules if r.kind == "min_interval" and r.action == "decline"),
                       key=lambda r: r.window_s)
    if declining:
        lines.append(f"scripted tests on one card are declined by the interval rule {declining[-1].rule_id}: "
                     f"wait {interval_wait_s(rules)} s between authorizations on one card or use "
                     "another card")
    return lines


def banner(host: str, port: int, made: list[tuple[DemoCard, str]], certs: Path | None) -> str:
    """The text `fuelcard serve --demo` prints once the demo data is in."""
    lines = [f"\nfuelcard is serving on {host}:{port} with demo data:"]
    lines += [f"  card {card.card_number}  account {account_id}  {card.holder}"
              for card, account_id in made]
    pos = f".venv/bin/fuelcard-pos --target 127.0.0.1:{port}"
    if certs is not None:
        pos += (f" --ca {certs / 'ca.pem'} --cert {certs / 'pos-KM-001-T1.pem'}"
                f" --key {certs / 'pos-KM-001-T1.key'} --state {certs.parent / 'pos-state.sqlite3'}")
    first = made[0][0].card_number
    lines += ["", "try (as terminal KM-001-T1 of station KM-001):",
              f"  {pos} balance {first}",
              f"  {pos} authorize {first} 20000 --station KM-001 --terminal KM-001-T1"]
    if certs is not None:
        lines.append(f"  grpcurl -cacert {certs / 'ca.pem'} -cert {certs / 'pos-KM-001-T1.pem'}"
                     f" -key {certs / 'pos-KM-001-T1.key'} 127.0.0.1:{port} list")
    lines += ["", *risk_lines(demo_rule_set()), "Ctrl-C stops the server."]
    return "\n".join(lines)
