"""Churn warning (流失预警): a risk score per card from recency, frequency
and amount trends, and the cards most at risk.

For each card, as of a day:
  recency   days since its last sale, relative to its own usual gap
            between sales (a weekly driver silent for three weeks is late;
            a monthly one is not);
  frequency sales in the last WINDOW days against its average per WINDOW
            days over the PRIOR windows before;
  amount    spend in the last WINDOW days against the same average.
The score is a logistic combination with fixed, hand-set weights (nothing
is fitted to the generated truth, so its AUC there is an honest test).

Ranking quality: on generated data, AUC against the cards the generator
made churn, (a) as of the last day and (b) as an early warning 30 days
before it, counting only churners that were still buying then.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fuelcard_analytics.reports import (
    Output,
    TooLittleHistory,
    _plt,
    _save,
    day_of,
    write_csv,
)
from fuelcard_analytics.warehouse import Store

WINDOW_DAYS = 42
PRIOR_WINDOWS = 3
EARLY_DAYS = 30
# A card is judged once its sales span the recent window and the prior ones.
HISTORY_NEEDED_DAYS = WINDOW_DAYS * (PRIOR_WINDOWS + 1) + 1
TOP = 20
WEIGHTS = (1.1, 1.6, 0.8)   # recency, frequency drop, amount drop
BIAS = -2.0

SALES_SQL = "SELECT card_id, date_key, amount_fen FROM fact_sale"
TRUTH_SQL = "SELECT card_id, churner, churn_day FROM generated_truth"
HAS_TRUTH_SQL = ("SELECT count(*) FROM information_schema.tables"
                 " WHERE table_name = 'generated_truth' AND table_schema = current_schema()")


@dataclass(frozen=True)
class Scored:
    card_id: str
    score: float
    recency_days: int
    recent_sales: int
    prior_sales_per_window: float
    recent_fen: int
    prior_fen_per_window: float


def score_cards(sales: dict[str, list[tuple[dt.date, int]]], as_of: dt.date) -> list[Scored]:
    """Scores of the cards with enough history before as_of."""
    recent_from = as_of - dt.timedelta(days=WINDOW_DAYS)
    prior_from = recent_from - dt.timedelta(days=WINDOW_DAYS * PRIOR_WINDOWS)
    out = []
    for card, history in sales.items():
        past = [(d, a) for d, a in history if d <= as_of]
        if not past or past[0][0] > prior_from:
            continue  # too new to judge
        recent = [(d, a) for d, a in past if d > recent_from]
        prior = [(d, a) for d, a in past if prior_from < d <= recent_from]
        if not prior:
            continue  # already gone before the window: nothing left to warn about
        gap = (WINDOW_DAYS * PRIOR_WINDOWS) / len(prior)
        recency = (as_of - past[-1][0]).days
        prior_n = len(prior) / PRIOR_WINDOWS
        prior_fen = sum(a for _, a in prior) / PRIOR_WINDOWS
        recent_fen = sum(a for _, a in recent)
        r_recency = float(np.log1p(recency / gap))
        r_freq = 1.0 - (len(recent) + 0.5) / (prior_n + 0.5)
        r_amount = 1.0 - (recent_fen + 100) / (prior_fen + 100)
        z = BIAS + WEIGHTS[0] * r_recency + WEIGHTS[1] * r_freq + WEIGHTS[2] * r_amount
        out.append(Scored(card, float(1 / (1 + np.exp(-z))), recency, len(recent), prior_n,
                          recent_fen, prior_fen))
    return out


def auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    s = np.array(scores)
    y = np.array(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def roc(scores: list[float], labels: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.array(scores))
    y = np.array(labels, dtype=bool)[order]
    tpr = np.concatenate([[0], np.cumsum(y) / max(1, y.sum())])
    fpr = np.concatenate([[0], np.cumsum(~y) / max(1, (~y).sum())])
    return fpr, tpr


@dataclass(frozen=True)
class ChurnQuality:
    auc_last_day: float
    auc_early: float
    churners: int
    cards: int

    def text(self) -> str:
        return (f"churn AUC {self.auc_last_day:.3f} as of the last day,"
                f" {self.auc_early:.3f} as an early warning {EARLY_DAYS} days before"
                f" ({self.churners} generated churners among {self.cards} scored cards)")


def run(store: Store, out: Path) -> tuple[Output, ChurnQuality | None]:
    sales: dict[str, list[tuple[dt.date, int]]] = defaultdict(list)
    for card, key, amount in store.query(SALES_SQL):
        sales[card].append((day_of(key), int(amount)))
    if not sales:
        raise TooLittleHistory("churn", HISTORY_NEEDED_DAYS, 0)
    for history in sales.values():
        history.sort()
    last = max(h[-1][0] for h in sales.values())
    scored = sorted(score_cards(sales, last), key=lambda c: -c.score)
    if not scored:  # no card has a history long enough to judge
        first = min(h[0][0] for h in sales.values())
        raise TooLittleHistory("churn", HISTORY_NEEDED_DAYS, (last - first).days + 1)
    table = [[c.card_id, round(c.score, 4), c.recency_days, c.recent_sales,
              round(c.prior_sales_per_window, 2), c.recent_fen, int(c.prior_fen_per_window)]
             for c in scored]
    path = write_csv(out / "churn_scores.csv",
                     ["card_id", "risk", "recency_days", f"sales_last_{WINDOW_DAYS}d",
                      f"sales_per_{WINDOW_DAYS}d_before", f"spend_fen_last_{WINDOW_DAYS}d",
                      f"spend_fen_per_{WINDOW_DAYS}d_before"], table)
    # the watch list: still-active cards (a sale in the last 90 days) at most risk
    watch = [c for c in scored if c.recency_days <= 90][:TOP]
    write_csv(out / "churn_top.csv", ["card_id", "risk", "recency_days",
                                      f"sales_last_{WINDOW_DAYS}d",
                                      f"sales_per_{WINDOW_DAYS}d_before"],
              [[c.card_id, round(c.score, 4), c.recency_days, c.recent_sales,
                round(c.prior_sales_per_window, 2)] for c in watch])
    truth: dict[str, tuple[bool, dt.date | None]] = {}
    if store.query(HAS_TRUTH_SQL)[0][0]:  # a live warehouse has no generated truth
        truth = {c: (bool(ch), d) for c, ch, d in store.query(TRUTH_SQL)}
    quality = None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if truth:
        labels = [truth.get(c.card_id, (False, None))[0] for c in scored]
        early_day = last - dt.timedelta(days=EARLY_DAYS)
        early = [c for c in score_cards(sales, early_day)
                 if not truth.get(c.card_id, (False, None))[0]
                 or (truth[c.card_id][1] or last) > early_day]
        early_labels = [truth.get(c.card_id, (False, None))[0] for c in early]
        quality = ChurnQuality(auc([c.score for c in scored], labels),
                               auc([c.score for c in early], early_labels), sum(labels),
                               len(scored))
        for name, cards, ys in (("last day", scored, labels), (f"{EARLY_DAYS} days early",
                                                               early, early_labels)):
            fpr, tpr = roc([c.score for c in cards], ys)
            ax.plot(fpr, tpr, label=f"{name}: AUC {auc([c.score for c in cards], ys):.3f}")
        ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("Churn warning on the generated churners (ROC)")
        ax.legend(fontsize=8)
    else:
        ax.hist([c.score for c in scored], bins=30, color="#1f77b4")
        ax.set_xlabel("risk score")
        ax.set_ylabel("cards")
        ax.set_title("Churn risk scores")
    png = _save(fig, out / "churn.png")
    summary = (quality.text() if quality else f"{len(scored)} cards scored") + (
        f"; highest risk: {', '.join(c.card_id[:8] for c in watch[:5])}")
    return Output("churn", path, png, summary), quality
