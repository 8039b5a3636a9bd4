"""Why a hold was suspended, in words (zh-CN), for the review queue.

ListSuspendedHolds gives the ids of the rules that fired (e.g.
AMT-VERY-LARGE-PERSONAL); a reviewer needs what each one means. The words are
made from the rule's kind and parameters in the rule set in force
(GetActiveRuleSet's normalised document; RISK.md "Rule kinds"), plus the
rule's own description when it has one. A rule no longer in force (the set
changed since the hold was suspended) is named by its id, said to be so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fuelcard_console.ops_labels import yuan

ENGINE_FAULT = "ENGINE_FAULT"
ACTIONS_ZH = {"score": "计分", "review": "暂挂审核", "decline": "拒绝"}


def _duration(seconds: Any) -> str:
    s = int(seconds)
    if s % 86400 == 0:
        return f"{s // 86400} 天"
    if s % 3600 == 0:
        return f"{s // 3600} 小时"
    if s % 60 == 0:
        return f"{s // 60} 分钟"
    return f"{s} 秒"


def _describe_kind(kind: str, p: Mapping[str, Any]) -> str:
    match kind:
        case "amount":
            return f"单笔金额 ≥ {yuan(p['min_amount_fen'])} 元"
        case "daily_amount":
            return f"该卡当日累计授权金额（含本笔）≥ {yuan(p['min_total_fen'])} 元"
        case "weekly_amount":
            return f"该卡近 7 日累计授权金额（含本笔）≥ {yuan(p['min_total_fen'])} 元"
        case "velocity":
            return f"该卡 {_duration(p['window_s'])}内授权次数（含本笔）≥ {p['min_count']} 次"
        case "min_interval":
            return f"距该卡上一次授权不足 {_duration(p['min_interval_s'])}"
        case "impossible_travel":
            return (f"与上一次授权的油站相距 ≥ {p.get('min_distance_km', 0)} 公里，"
                    f"到达所需时速超过 {p['max_speed_kmh']} 公里/小时（疑似异地盗刷）")
        case "new_terminal":
            return f"常用卡（已使用 ≥ {p.get('min_prior_uses', 1)} 次）在不常用的终端上使用"
        case "watchlist":
            return "油站或终端在观察名单上"
        case "decline_streak":
            return f"该卡 {_duration(p['window_s'])}内已被拒绝 ≥ {p['min_declines']} 次（疑似试卡）"
        case "night_amount":
            return f"夜间 {p['from']}-{p['to']} 单笔金额 ≥ {yuan(p['min_amount_fen'])} 元"
        case "points_redemption":
            return f"该账户 {_duration(p['window_s'])}内兑换积分 ≥ {p['min_points']} 分"
    return f"规则类型 {kind}"


def rules_by_id(document_json: str) -> dict[str, dict[str, Any]]:
    """The rules of a rule set's normalised document, by id ({} if none)."""
    if not document_json:
        return {}
    doc = json.loads(document_json)
    return {str(r["id"]): r for r in doc.get("rules", []) if isinstance(r, dict) and "id" in r}


def describe(rule_id: str, rules: Mapping[str, Mapping[str, Any]]) -> str:
    """One fired rule, in words."""
    if rule_id == ENGINE_FAULT:
        return "风控引擎评估失败，按规则集的兜底策略暂挂（ENGINE_FAULT）"
    rule = rules.get(rule_id)
    if rule is None:
        return f"{rule_id}（该规则已不在当前生效的规则集中）"
    try:
        words = _describe_kind(str(rule.get("kind", "")), rule)
    except (KeyError, TypeError, ValueError):
        words = f"规则类型 {rule.get('kind', '?')}"
    action = ACTIONS_ZH.get(str(rule.get("action", "")), str(rule.get("action", "")))
    tail = f"（{action}，{rule.get('score', 0)} 分）"
    description = str(rule.get("description") or "")
    return f"{rule_id}：{words}{tail}" + (f" — {description}" if description else "")
