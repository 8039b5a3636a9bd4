"""Risk rules as data: the typed model of a rule set, its file format, and its
validation.

A rule set is a TOML or JSON document:

    name = "default"
    fallback = "review"       # what an engine fault decides: "review" or "decline"
    review_score = 60         # total score of the fired rules that suspends for review
    decline_score = 100       # ... that declines

    [[rules]]
    id = "AMT-LARGE"          # unique, 1-64 characters [A-Za-z0-9_.-]
    kind = "amount"           # see KINDS
    action = "review"         # "score" (only adds its score), "review" or "decline"
    score = 30                # added to the total when the rule fires
    description = "..."       # free text, for people
    min_amount_fen = 300000   # the kind's parameters (see KINDS)
    tiers = [1, 2]            # optional: only for these member tiers (1-4)
    account_types = ["personal"]  # optional: personal, corporate, family

A rule that fires with action "review" suspends the authorization, "decline"
declines it, whatever the total; otherwise the total score decides against
review_score and decline_score.

`parse` validates everything and raises ApiError INVALID_ARGUMENT naming each
bad field (rules[3].window_s) - nothing is stored unless the whole set is
valid. `RuleSet.rows()` is what fc.risk_load stores; fc.risk_assess (SQL)
and fuelcard_server.risk.engine (Python, for backtests) evaluate it the same
way.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fuelcard_server import errors
from fuelcard_server.errors import FieldViolation
from fuelcard_server.states import AccountType, RiskDecision
from fuelcard_server.validation import printable

# Limits the card state can answer exactly (fc.risk_card_state keeps the last
# 64 authorization times, 16 decline times, 7 local days, 32 terminals).
MAX_VELOCITY_COUNT = 64
MAX_DECLINES = 16
MAX_WINDOW_S = 7 * 24 * 3600
MAX_RULES = 1000
MAX_LIST = 10_000
MAX_FEN = 10**12
ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")

# A rule's action: 0 when it only scores, else the decision it forces.
ACTIONS: dict[str, int] = {"score": 0, "review": RiskDecision.REVIEW, "decline": RiskDecision.DECLINE}
ACTION_NAMES = {v: k for k, v in ACTIONS.items()}
FALLBACKS: dict[str, int] = {"review": RiskDecision.REVIEW, "decline": RiskDecision.DECLINE}
ACCOUNT_TYPES: dict[str, int] = {t.name.lower(): t for t in AccountType}
ACCOUNT_TYPE_NAMES = {v: k for k, v in ACCOUNT_TYPES.items()}


@dataclass(frozen=True)
class Kind:
    code: int
    # parameter name -> (type, required)
    params: Mapping[str, tuple[type, bool]]
    summary: str


KINDS: dict[str, Kind] = {
    "amount": Kind(1, {"min_amount_fen": (int, True)}, "amount >= min_amount_fen"),
    "daily_amount": Kind(2, {"min_total_fen": (int, True)},
                         "card's authorized amount today (local day), with this one, >= min_total_fen"),
    "weekly_amount": Kind(3, {"min_total_fen": (int, True)},
                          "card's authorized amount over the last 7 local days, with this one,"
                          " >= min_total_fen"),
    "velocity": Kind(4, {"min_count": (int, True), "window_s": (int, True)},
                     "card's authorizations in the last window_s, with this one, >= min_count"),
    "min_interval": Kind(5, {"min_interval_s": (int, True)},
                         "less than min_interval_s since the card's previous authorization"),
    "impossible_travel": Kind(6, {"max_speed_kmh": (float, True), "min_distance_km": (float, False)},
                              "the card's previous station is >= min_distance_km away and"
                              " reaching it needs more than max_speed_kmh"),
    "new_terminal": Kind(7, {"min_prior_uses": (int, False)},
                         "a terminal the card has not used recently, on a card used"
                         " >= min_prior_uses times"),
    "watchlist": Kind(8, {"stations": (list, False), "terminals": (list, False)},
                      "station or terminal on the list"),
    "decline_streak": Kind(9, {"min_declines": (int, True), "window_s": (int, True)},
                           "the card was declined >= min_declines times in the last window_s"),
    "night_amount": Kind(10, {"min_amount_fen": (int, True), "from": (str, True), "to": (str, True)},
                         "amount >= min_amount_fen between from and to (local time, HH:MM)"),
    "points_redemption": Kind(11, {"min_points": (int, True), "window_s": (int, True)},
                              "the card's account redeemed >= min_points in the last window_s"),
    # Test only (setting risk_fault_injection): its evaluation fails inside
    # the engine (a division by zero), to prove the fallback.
    "fault": Kind(99, {}, "always fails (fault injection, tests only)"),
}
KIND_NAMES = {k.code: name for name, k in KINDS.items()}
COMMON_KEYS = frozenset({"id", "kind", "action", "score", "description", "tiers", "account_types"})


@dataclass(frozen=True)
class Rule:
    rule_id: str
    kind: str
    action: str
    score: int
    description: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    tiers: tuple[int, ...] | None = None
    account_types: tuple[str, ...] | None = None

    # Derived columns (what SQL evaluates).
    @property
    def threshold(self) -> int:
        p = self.params
        match self.kind:
            case "amount" | "night_amount":
                return int(p["min_amount_fen"])
            case "daily_amount" | "weekly_amount":
                return int(p["min_total_fen"])
            case "velocity":
                return int(p["min_count"])
            case "impossible_travel":
                return round(float(p.get("min_distance_km", 0.0)) * 1000)
            case "new_terminal":
                return int(p.get("min_prior_uses", 1))
            case "decline_streak":
                return int(p["min_declines"])
            case "points_redemption":
                return int(p["min_points"])
        return 0

    @property
    def window_s(self) -> int:
        if self.kind == "min_interval":
            return int(self.params["min_interval_s"])
        return int(self.params.get("window_s", 0))

    @property
    def windowed(self) -> bool:
        return self.kind in ("velocity", "decline_streak", "points_redemption")

    def minutes(self) -> tuple[int, int]:
        if self.kind != "night_amount":
            return 0, 0
        return _minute(str(self.params["from"])), _minute(str(self.params["to"]))

    def to_document(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.rule_id, "kind": self.kind, "action": self.action,
                             "score": self.score}
        if self.description:
            d["description"] = self.description
        d.update(self.params)
        if self.tiers is not None:
            d["tiers"] = list(self.tiers)
        if self.account_types is not None:
            d["account_types"] = list(self.account_types)
        return d


@dataclass(frozen=True)
class RuleSet:
    name: str
    fallback: str
    review_score: int
    decline_score: int
    rules: tuple[Rule, ...]

    @property
    def windows(self) -> list[int]:
        """The distinct windows of windowed rules; a rule's widx is its
        1-based position here."""
        return sorted({r.window_s for r in self.rules if r.windowed})

    @property
    def has_points(self) -> bool:
        return any(r.kind == "points_redemption" for r in self.rules)

    def to_document(self) -> dict[str, Any]:
        return {"name": self.name, "fallback": self.fallback, "review_score": self.review_score,
                "decline_score": self.decline_score,
                "rules": [r.to_document() for r in self.rules]}

    def digest(self) -> str:
        body = json.dumps(self.to_document(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()

    def rows(self) -> list[dict[str, Any]]:
        """The rules as fc.risk_rules columns."""
        widx = {w: i + 1 for i, w in enumerate(self.windows)}
        out = []
        for ord_, r in enumerate(self.rules, start=1):
            minute_from, minute_to = r.minutes()
            out.append({
                "ord": ord_, "rule_id": r.rule_id, "kind": KINDS[r.kind].code,
                "action": ACTIONS[r.action], "score": r.score,
                "tiers": list(r.tiers) if r.tiers is not None else None,
                "account_kinds": ([ACCOUNT_TYPES[t] for t in r.account_types]
                                  if r.account_types is not None else None),
                "threshold": r.threshold, "window_s": r.window_s,
                "widx": widx.get(r.window_s, 0) if r.windowed else 0,
                "speed_kmh": float(r.params.get("max_speed_kmh", 0.0)),
                "minute_from": minute_from, "minute_to": minute_to,
                "stations": list(r.params.get("stations", [])),
                "terminals": list(r.params.get("terminals", [])),
            })
        return out


def _minute(hhmm: str) -> int:
    m = HHMM.fullmatch(hhmm)
    assert m is not None
    return int(m.group(1)) * 60 + int(m.group(2))


# --- reading and validating ----------------------------------------------------


def load_text(text: str, fmt: str, *, allow_fault: bool = False) -> RuleSet:
    """Parse a TOML or JSON document (fmt "toml" / "json") and validate it."""
    try:
        doc: Any = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.invalid([FieldViolation("document", f"not valid {fmt}: {exc}",
                                             "RULES_UNREADABLE")]) from None
    return parse(doc, allow_fault=allow_fault)


def parse(doc: Any, *, allow_fault: bool = False) -> RuleSet:
    """Validate a decoded document; ApiError INVALID_ARGUMENT naming every
    bad field."""
    bad = _Problems()
    fail = bad.add

    if not isinstance(doc, dict):
        raise errors.invalid([FieldViolation("document", "must be a table/object",
                                             "RULES_UNREADABLE")])
    unknown = set(doc) - {"name", "fallback", "review_score", "decline_score", "rules"}
    for key in sorted(unknown):
        fail(key, "unknown key", "RULES_KEY_UNKNOWN")
    name = doc.get("name", "")
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not name.isprintable():
        fail("name", "1-128 characters, no control characters", "RULES_NAME_INVALID")
    fallback = doc.get("fallback", "review")
    if fallback not in FALLBACKS:
        fail("fallback", "\"review\" or \"decline\" (an engine fault never approves)",
             "RULES_FALLBACK_INVALID")
    scores = {}
    for key, default in (("review_score", 60), ("decline_score", 100)):
        value = doc.get(key, default)
        if not _is_int(value) or not 1 <= value <= 1_000_000:
            fail(key, "an integer 1-1000000", "RULES_SCORE_INVALID")
            value = default
        scores[key] = value
    if scores["decline_score"] < scores["review_score"]:
        fail("decline_score", "must be >= review_score", "RULES_SCORE_INVALID")
    raw_rules = doc.get("rules", [])
    if not isinstance(raw_rules, list) or len(raw_rules) > MAX_RULES:
        fail("rules", f"a list of at most {MAX_RULES} rules", "RULES_INVALID")
        raw_rules = []
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rules):
        rule = _rule(f"rules[{i}]", raw, bad, allow_fault)
        if rule is not None:
            if rule.rule_id in seen:
                fail(f"rules[{i}].id", "duplicate rule id", "RULE_ID_DUPLICATE")
            seen.add(rule.rule_id)
            rules.append(rule)
    if bad.items:
        raise errors.invalid(bad.items)
    return RuleSet(str(name), str(fallback), scores["review_score"], scores["decline_score"],
                   tuple(rules))


class _Problems:
    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, where: str, what: str, reason: str = "RULE_PARAM_INVALID") -> None:
        self.items.append(FieldViolation(where, what, reason))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rule(where: str, raw: Any, problems: _Problems, allow_fault: bool) -> Rule | None:
    fail = problems.add
    if not isinstance(raw, dict):
        fail(where, "must be a table/object", "RULE_INVALID")
        return None
    n_bad = len(problems.items)
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not ID.fullmatch(rule_id):
        fail(f"{where}.id", "1-64 characters of A-Z a-z 0-9 _ . -", "RULE_ID_INVALID")
    kind_name = raw.get("kind")
    kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
    if kind is None or not isinstance(kind_name, str) or (kind_name == "fault" and not allow_fault):
        fail(f"{where}.kind", f"one of {', '.join(k for k in KINDS if k != 'fault')}",
             "RULE_KIND_UNKNOWN")
        return None
    action = raw.get("action", "score")
    if action not in ACTIONS:
        fail(f"{where}.action", "\"score\", \"review\" or \"decline\"", "RULE_ACTION_INVALID")
    score = raw.get("score", 0)
    if not _is_int(score) or not 0 <= score <= 1_000_000:
        fail(f"{where}.score", "an integer 0-1000000", "RULE_SCORE_INVALID")
    description = raw.get("description", "")
    if (not isinstance(description, str) or len(description) > 1000
            or not printable(description, multiline=True)):
        fail(f"{where}.description", "text up to 1000 characters, no control characters "
             "other than line breaks and tabs", "RULE_PARAM_INVALID")
    tiers = raw.get("tiers")
    if tiers is not None and (not isinstance(tiers, list) or not tiers
                              or not all(_is_int(t) and 1 <= t <= 4 for t in tiers)):
        fail(f"{where}.tiers", "a non-empty list of tiers 1-4")
    types = raw.get("account_types")
    if types is not None and (not isinstance(types, list) or not types
                              or not all(t in ACCOUNT_TYPES for t in types)):
        fail(f"{where}.account_types", "a non-empty list of personal, corporate, family")
    params: dict[str, Any] = {}
    for key in sorted(set(raw) - COMMON_KEYS - set(kind.params)):
        fail(f"{where}.{key}", f"not a parameter of kind {kind_name}", "RULE_PARAM_UNKNOWN")
    for key, (typ, required) in kind.params.items():
        if key not in raw:
            if required:
                fail(f"{where}.{key}", "is required", "RULE_PARAM_MISSING")
            continue
        value = raw[key]
        ok = _check_param(kind_name, key, typ, value)
        if ok is not None:
            fail(f"{where}.{key}", ok)
            continue
        params[key] = float(value) if typ is float else value
    if kind_name == "watchlist" and not (params.get("stations") or params.get("terminals")):
        fail(f"{where}.stations", "a watchlist rule lists at least one station or terminal",
             "RULE_PARAM_MISSING")
    if len(problems.items) != n_bad:
        return None
    return Rule(str(rule_id), kind_name, action, score, description, params,
                tuple(tiers) if tiers is not None else None,
                tuple(types) if types is not None else None)


def _check_param(kind: str, key: str, typ: type, value: Any) -> str | None:
    """What is wrong with one parameter value, or None."""
    if typ is int:
        if not _is_int(value):
            return "an integer"
        limits = {
            "min_amount_fen": (1, MAX_FEN), "min_total_fen": (1, MAX_FEN),
            "min_count": (2, MAX_VELOCITY_COUNT), "window_s": (1, MAX_WINDOW_S),
            "min_interval_s": (1, MAX_WINDOW_S), "min_prior_uses": (0, 1_000_000),
            "min_declines": (1, MAX_DECLINES), "min_points": (1, 10**12),
        }[key]
        if not limits[0] <= value <= limits[1]:
            return f"between {limits[0]} and {limits[1]}"
        return None
    if typ is float:
        if not (_is_int(value) or isinstance(value, float)):
            return "a number"
        hi = 2000.0 if key == "max_speed_kmh" else 20000.0
        lo = 1.0 if key == "max_speed_kmh" else 0.0
        if not lo <= float(value) <= hi:
            return f"between {lo:g} and {hi:g}"
        return None
    if typ is str:
        if not isinstance(value, str) or not HHMM.fullmatch(value):
            return "a local time HH:MM"
        return None
    if typ is list:
        if (not isinstance(value, list) or len(value) > MAX_LIST
                or not all(isinstance(v, str) and 1 <= len(v) <= 64 and v.isprintable()
                           for v in value)):
            return f"a list of at most {MAX_LIST} ids of 1-64 characters, no control characters"
        return None
    return "unsupported"
