"""Risk rules for load tests (--risk-rules FILE): put a rule set in force
before the run, so every authorization pays for scoring it.

`generate(n)` makes a realistic-looking set of n rules over every rule kind
(amounts, daily/weekly sums, velocity, interval, travel, new terminal, watch
lists, decline streaks, night amounts, points redemptions; some scoped to
tiers or account types). Every rule is score-only and the review threshold
is out of reach, so rules fire (and cost what firing costs) but never change
a decision: the load test's pump cycles stay the same and only the engine's
cost is measured.

    python -m fuelcard_loadtest.risk_rules 200 > loadtest/risk-rules-200.json
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from typing import Any

import psycopg

LOAD_SQL = (
    "SELECT fc.risk_load(p_caller => %(caller)s, p_request_id => %(request_id)s,"
    " p_request_hash => %(request_hash)s, p_lock => %(lock)s, p_actor => %(actor)s,"
    " p_name => %(name)s, p_document => %(document)s::jsonb, p_digest => %(digest)s,"
    " p_fallback => %(fallback)s::smallint, p_review_score => %(review_score)s,"
    " p_decline_score => %(decline_score)s, p_windows => %(windows)s::integer[],"
    " p_has_points => %(has_points)s, p_rules => %(rules)s::jsonb, p_now => now())")

WINDOWS_S = (60, 300, 600, 1800, 3600, 6 * 3600, 86400, 7 * 86400)


def generate(n: int, seed: int = 200) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds: list[Callable[[], dict[str, Any]]] = [
        lambda: {"kind": "amount", "min_amount_fen": rng.randrange(50_000, 1_000_000, 5_000)},
        lambda: {"kind": "daily_amount", "min_total_fen": rng.randrange(100_000, 5_000_000, 10_000)},
        lambda: {"kind": "weekly_amount",
                 "min_total_fen": rng.randrange(500_000, 20_000_000, 50_000)},
        lambda: {"kind": "velocity", "min_count": rng.randrange(2, 40),
                 "window_s": rng.choice(WINDOWS_S)},
        lambda: {"kind": "min_interval", "min_interval_s": rng.randrange(5, 600)},
        lambda: {"kind": "impossible_travel", "max_speed_kmh": float(rng.randrange(100, 900)),
                 "min_distance_km": float(rng.randrange(10, 300))},
        lambda: {"kind": "new_terminal", "min_prior_uses": rng.randrange(1, 20)},
        lambda: {"kind": "watchlist",
                 "stations": [f"WATCH-{rng.randrange(10**6):06d}" for _ in range(20)],
                 "terminals": [f"WATCH-T-{rng.randrange(10**6):06d}" for _ in range(20)]},
        lambda: {"kind": "decline_streak", "min_declines": rng.randrange(2, 16),
                 "window_s": rng.choice(WINDOWS_S)},
        lambda: {"kind": "night_amount", "min_amount_fen": rng.randrange(50_000, 500_000, 5_000),
                 "from": f"{rng.choice([22, 23, 0, 1]):02d}:00",
                 "to": f"{rng.choice([4, 5, 6]):02d}:00"},
        lambda: {"kind": "points_redemption", "min_points": rng.randrange(1_000, 100_000, 1_000),
                 "window_s": rng.choice(WINDOWS_S[2:])},
    ]
    rules = []
    for i in range(n):
        rule: dict[str, Any] = {"id": f"LT-{i:03d}", "action": "score",
                                "score": rng.randrange(1, 5), **kinds[i % len(kinds)]()}
        if rng.random() < 0.3:
            rule["tiers"] = sorted(rng.sample([1, 2, 3, 4], rng.randrange(1, 4)))
        if rng.random() < 0.3:
            rule["account_types"] = sorted(rng.sample(["personal", "corporate", "family"],
                                                      rng.randrange(1, 3)))
        rules.append(rule)
    return {"name": f"loadtest-{n}", "fallback": "review", "review_score": 1_000_000,
            "decline_score": 1_000_000, "rules": rules}


def apply(url: str, path: str, log: Callable[[str], None] = print) -> None:
    """Validate the rule set file and put it in force (one transaction);
    "none" puts no rule set in force (for A/B runs on one data directory)."""
    import hashlib
    import uuid

    from fuelcard_server.locks import RISK_RULES_LOCK
    from fuelcard_server.risk.model import FALLBACKS, load_text

    if path == "none":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "SELECT fc.risk_activate(p_caller => %(caller)s, p_request_id => %(request_id)s,"
                " p_request_hash => %(request_hash)s, p_lock => %(lock)s, p_actor => %(actor)s,"
                " p_version => 0, p_now => now())",
                {"caller": "loadtest", "request_id": f"lt-rules-{uuid.uuid4().hex}",
                 "request_hash": b"none", "lock": RISK_RULES_LOCK, "actor": "loadtest"})
        log("no risk rule set in force")
        return

    with open(path, encoding="utf-8") as f:
        text = f.read()
    rs = load_text(text, "json" if path.endswith(".json") else "toml")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(LOAD_SQL, {
            "caller": "loadtest", "request_id": f"lt-rules-{uuid.uuid4().hex}",
            "request_hash": hashlib.sha256(text.encode()).digest(), "lock": RISK_RULES_LOCK,
            "actor": "loadtest", "name": rs.name, "document": json.dumps(rs.to_document()),
            "digest": rs.digest(), "fallback": FALLBACKS[rs.fallback],
            "review_score": rs.review_score, "decline_score": rs.decline_score,
            "windows": rs.windows, "has_points": rs.has_points, "rules": json.dumps(rs.rows())})
    log(f"risk rule set {rs.name!r} in force: {len(rs.rules)} rules")


if __name__ == "__main__":
    json.dump(generate(int(sys.argv[1]) if len(sys.argv) > 1 else 200), sys.stdout, indent=1)
    sys.stdout.write("\n")
