"""The demo's risk rules as a newcomer meets them: a script that authorizes
twice in a row on one demo card is declined by the minimum-interval rule, and
the banner `fuelcard serve --demo` prints says so, with advice that works
(wait that long, or use another card).

The demo data is seeded through the public API by fuelcard_server.demo, as
`serve --demo` does; the series goes through the real `fuelcard-pos`
command. The server's clock is a ManualClock, so "wait N s" is a move of the
clock, not a sleep.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from fuelcard_server import demo

from tests.plugins.server import RunningServer

FUELCARD_POS = Path(sys.executable).parent / "fuelcard-pos"


def pos(server: RunningServer, tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUELCARD_")}
    env["FUELCARD_POS_OUTBOX"] = str(tmp_path / "outbox.sqlite3")
    done = subprocess.run([str(FUELCARD_POS), "--target", server.target, "--json", *args],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.stdout, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, answer


def authorize(server: RunningServer, tmp_path: Path, card: str) -> tuple[int, dict[str, Any]]:
    return pos(server, tmp_path, "authorize", card, "20000", "--station", "KM-001",
               "--terminal", "KM-001-T1")


def test_a_scripted_series_on_one_card_is_declined_by_the_interval_rule_as_the_banner_says(
        server: RunningServer, tmp_path: Path) -> None:
    made = asyncio.run(demo.seed(server.target))
    text = demo.banner("127.0.0.1", 50051, made, None)

    # What the banner tells the newcomer, read the way they would read it.
    advice = re.search(r"scripted tests on one card are declined by the interval rule (\S+): "
                       r"wait (\d+) s between authorizations on one card or use another card", text)
    assert advice is not None, text
    rule_id, wait_s = advice.group(1), int(advice.group(2))
    assert re.search(rf"^  {re.escape(rule_id)} +an authorization less than \d+ s after the card's "
                     r"previous one: DECLINED \(RISK_DECLINED\)$", text, re.MULTILINE), text
    for card, _ in made:
        assert f"card {card.card_number}" in text

    first, second = made[0][0].card_number, made[1][0].card_number
    code, answer = authorize(server, tmp_path, first)
    assert (code, answer["decision"]) == (0, "DECISION_APPROVED"), answer
    hold_id = answer["hold"]["hold_id"]
    code, answer = pos(server, tmp_path, "confirm", hold_id, "18000")
    assert (code, answer["decision"]) == (0, "DECISION_APPROVED"), answer

    # The script's next fill, at machine speed: declined by that rule.
    code, answer = authorize(server, tmp_path, first)
    assert (code, answer["decision"], answer["decline_reason"]) == (
        1, "DECISION_DECLINED", "DECLINE_REASON_RISK_DECLINED"), answer
    assert rule_id in answer["risk"]["fired_rules"]  # plaintext dev link: the rules are shown

    # "or use another card": the next card goes through at once
    code, answer = authorize(server, tmp_path, second)
    assert (code, answer["decision"]) == (0, "DECISION_APPROVED"), answer

    # "wait N s": short of it, an interval rule still fires; after it, none does
    server.advance(dt.timedelta(seconds=wait_s - 1))
    code, answer = authorize(server, tmp_path, second)
    assert any(r.startswith("INT-") for r in answer["risk"]["fired_rules"]), answer
    server.advance(dt.timedelta(seconds=wait_s))
    code, answer = authorize(server, tmp_path, first)
    assert (code, answer["decision"]) == (0, "DECISION_APPROVED"), answer
    assert not any(r.startswith("INT-") for r in answer["risk"].get("fired_rules", [])), answer


def test_the_banner_names_every_rule_that_paces_a_card() -> None:
    rules = demo.demo_rule_set()
    text = demo.banner("127.0.0.1", 50051, [(c, f"acct-{i}") for i, c in enumerate(demo.DEMO_CARDS)],
                       Path("data/certs"))
    pacing = [r for r in rules.rules if r.kind in ("min_interval", "velocity", "decline_streak")]
    assert {r.kind for r in pacing} == {"min_interval", "velocity", "decline_streak"}
    for r in pacing:
        assert re.search(rf"^  {re.escape(r.rule_id)} ", text, re.MULTILINE), r.rule_id
    assert f"a risk score of {rules.review_score} suspends" in text
    assert f"{rules.decline_score} declines it" in text
    # with TLS, the terminal's files of the demo layout and the reflection example
    assert "--cert data/certs/pos-KM-001-T1.pem" in text
    assert "grpcurl -cacert data/certs/ca.pem -cert data/certs/pos-KM-001-T1.pem" in text
