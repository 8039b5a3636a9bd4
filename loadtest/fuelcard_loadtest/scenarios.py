"""Workloads: how cards hang on accounts, and what mix of operations runs.

Every generator process rebuilds the same layout from (scenario, cards), so
no card list has to be shipped between processes.
"""

from __future__ import annotations

from dataclasses import dataclass

# Account kinds as stored in fc.accounts.kind (AccountType in the proto).
PERSONAL, CORPORATE, FAMILY = 1, 2, 3

FAMILY_CARDS = 3
FLEET_CARDS = 50


@dataclass(frozen=True)
class Mix:
    """Shares of the operations. recharge and redeem are shares of all
    operations; cancel is the share of pump cycles ended by Cancel instead of
    Confirm, reverse the share ended by a reversal naming the Authorize's
    request id (ReverseAuthorization); overrun the share of confirmed cycles
    whose pump ran a little past its preset (confirmed above the hold, within
    the server's tolerance); refund the share of confirmed sales then refunded
    in part (RefundService.RefundSale)."""

    cancel: float = 0.0
    recharge: float = 0.0
    redeem: float = 0.0
    reverse: float = 0.0
    refund: float = 0.0
    overrun: float = 0.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    default_cards: int
    mix: Mix


SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (
        Scenario("uniform", "one personal account per card, a random card per cycle",
                 100_000, Mix()),
        Scenario("hot-fleet", "ONE corporate account funding every card, all pumping at once"
                 " (the advisory-lock contention case)", 500, Mix()),
        Scenario("mixed", "70 % personal, 10 % family (3 cards), 20 % fleets (50 cards);"
                 " pump cycles with cancels, reversals, overruns, recharges, points"
                 " redemptions and sale refunds",
                 100_000, Mix(cancel=0.10, recharge=0.08, redeem=0.05, reverse=0.03,
                              refund=0.03, overrun=0.02)),
    )
}


@dataclass(frozen=True)
class Layout:
    """Which account each card draws on. Cards and accounts are numbered
    from 0; the layout is a pure function of (scenario, cards)."""

    scenario: str
    cards: int

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}")
        if self.cards < 1:
            raise ValueError("need at least one card")

    # mixed: [0, personal) personal, then families of 3, then fleets of 50
    @property
    def _personal(self) -> int:
        return self.cards * 7 // 10

    @property
    def _family_cards(self) -> int:
        return min(self.cards - self._personal, self.cards // 10)

    @property
    def _families(self) -> int:
        return -(-self._family_cards // FAMILY_CARDS)

    @property
    def accounts(self) -> int:
        if self.scenario == "uniform":
            return self.cards
        if self.scenario == "hot-fleet":
            return 1
        fleet_cards = self.cards - self._personal - self._family_cards
        return self._personal + self._families + -(-fleet_cards // FLEET_CARDS)

    def account_of(self, card: int) -> int:
        if self.scenario == "uniform":
            return card
        if self.scenario == "hot-fleet":
            return 0
        if card < self._personal:
            return card
        if card < self._personal + self._family_cards:
            return self._personal + (card - self._personal) // FAMILY_CARDS
        rest = card - self._personal - self._family_cards
        return self._personal + self._families + rest // FLEET_CARDS

    def kind_of(self, account: int) -> int:
        if self.scenario == "uniform":
            return PERSONAL
        if self.scenario == "hot-fleet":
            return CORPORATE
        if account < self._personal:
            return PERSONAL
        if account < self._personal + self._families:
            return FAMILY
        return CORPORATE

    def opening_balance_fen(self, account: int) -> int:
        """Enough for many runs: a cycle settles at most 500 yuan."""
        if self.scenario == "hot-fleet":
            return 10**12
        return {PERSONAL: 5_000_000, FAMILY: 10_000_000,
                CORPORATE: 500_000_000}[self.kind_of(account)]
