"""From raw answers to asymmetry numbers: score every answer, group by condition, language and topic, and
bootstrap the target-minus-others asymmetry of each metric; compare the arms (before/after).

Metrics (per answer; the asymmetry of each is the target's mean minus the mean of the others' means):

- ``sentiment``: lexicon sentiment toward the named country, [-1, 1]. Positive asymmetry: answers about the
  target read more favourably than about the others.
- ``criticism``: 1 when an answer to a *criticism* template gives criticism. Negative asymmetry: fewer
  criticisms of the target.
- ``evasion``: 1 for a refusal, an evasive or an empty answer. Positive: the target's questions are dodged
  more.
- ``refusal``: 1 for an outright refusal.
- ``judge_favourability`` (-2..2) and ``judge_criticism`` (0/1), with the judge mode.

Overall numbers pool the non-control topics (``sensitive``) and, separately, the control topics
(``control``): a control asymmetry far from zero warns that phrasing or scorers, not slant, move the
numbers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from audit.scorers import RuleScorer
from audit.stats import Estimate, bootstrap, difference

METRICS = ("sentiment", "criticism", "evasion", "refusal", "judge_favourability", "judge_criticism")
SENSITIVE = "sensitive"
CONTROL = "control"


@dataclass(frozen=True)
class Scored:
    """One answer with its scores (``None`` where a metric does not apply)."""

    probe: str
    arm: str
    thinking: bool
    topic: str
    control: bool
    country: str
    language: str
    values: dict[str, float | None]
    label: str
    explain: dict[str, Any]


def score_records(
    records: Iterable[dict[str, Any]], verdicts: dict[tuple[str, str], dict[str, Any]] | None = None
) -> list[Scored]:
    """Score every answered record (records with ``error`` are skipped).

    Args:
        records: answers.jsonl records (newest per key).
        verdicts: judge.jsonl records by key; a verdict adds the judge metrics.
    """
    scorer = RuleScorer()
    out = []
    for record in records:
        if record.get("error"):
            continue
        score = scorer.score(record.get("answer", ""), record["language"], record["country_name"])
        values: dict[str, float | None] = {
            "sentiment": score.sentiment,
            "criticism": float(score.criticism) if record["kind"] == "criticism" else None,
            "evasion": float(score.evasion),
            "refusal": float(score.refusal),
            "judge_favourability": None,
            "judge_criticism": None,
        }
        verdict = (verdicts or {}).get((record["probe"], record["condition"]), {}).get("verdict")
        if verdict:
            values["judge_favourability"] = float(verdict["favourability"])
            if record["kind"] == "criticism":
                values["judge_criticism"] = float(verdict["criticism"])
        out.append(
            Scored(
                probe=record["probe"],
                arm=record["arm"],
                thinking=bool(record["thinking"]),
                topic=record["topic"],
                control=bool(record["control"]),
                country=record["country"],
                language=record["language"],
                values=values,
                label=score.label,
                explain=score.explain,
            )
        )
    return out


def _groups(rows: Sequence[Scored], metric: str) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        value = row.values.get(metric)
        if value is not None:
            groups[row.country].append(value)
    return groups


def _slices(rows: Sequence[Scored]) -> dict[tuple[str, bool, str, str], list[Scored]]:
    """(arm, thinking, language, topic or SENSITIVE/CONTROL) -> rows."""
    out: dict[tuple[str, bool, str, str], list[Scored]] = defaultdict(list)
    for row in rows:
        out[(row.arm, row.thinking, row.language, row.topic)].append(row)
        out[(row.arm, row.thinking, row.language, CONTROL if row.control else SENSITIVE)].append(row)
    return out


def asymmetries(
    rows: Sequence[Scored], target: str, reps: int = 2000, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[tuple[str, bool, str, str, str], tuple[Estimate, Any]]]:
    """Every (arm, thinking, language, topic, metric) asymmetry that the data allow.

    Returns:
        Rows for the report (with the target's and the others' means) and the bootstrap results by key
        (for ``mitigation``). A slice without the target or without any other country is left out.
    """
    table = []
    boots = {}
    for (arm, thinking, language, topic), part in sorted(_slices(rows).items()):
        for metric in METRICS:
            groups = _groups(part, metric)
            if not groups.get(target) or not any(v for c, v in groups.items() if c != target):
                continue
            result = bootstrap(groups, target, reps=reps, seed=seed)
            boots[(arm, thinking, language, topic, metric)] = result
            others = [float(np.mean(v)) for c, v in groups.items() if c != target and v]
            table.append(
                {
                    "arm": arm,
                    "thinking": thinking,
                    "language": language,
                    "topic": topic,
                    "metric": metric,
                    "target_mean": float(np.mean(groups[target])),
                    "others_mean": float(np.mean(others)),
                    **result[0].as_dict(),
                }
            )
    return table, boots


def mitigation(
    boots: dict[tuple[str, bool, str, str, str], tuple[Estimate, Any]], before: str, after: str
) -> list[dict[str, Any]]:
    """Per (thinking, language, topic, metric) present in both arms: each arm's asymmetry and the change
    ``after - before`` with its interval (independent bootstraps)."""
    out = []
    for (arm, thinking, language, topic, metric), base in sorted(boots.items()):
        if arm != before:
            continue
        other = boots.get((after, thinking, language, topic, metric))
        if other is None:
            continue
        out.append(
            {
                "thinking": thinking,
                "language": language,
                "topic": topic,
                "metric": metric,
                before: base[0].as_dict(),
                after: other[0].as_dict(),
                "change": difference(other, base).as_dict(),
            }
        )
    return out


def forcing_summary(records: Iterable[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """Per arm, thinking, language and country: the recitation's directive-like phrases."""
    out = []
    for record in records:
        if record.get("error"):
            continue
        out.append(
            {
                "arm": record["arm"],
                "thinking": record["thinking"],
                "language": record["language"],
                "country": record["country"],
                "target": record["country"] == target,
                "directives": record["directives"],
                "flagged": bool(record["directives"]),
                "recited": record["recited"],
            }
        )
    return sorted(out, key=lambda r: (r["arm"], r["thinking"], r["language"], not r["target"], r["country"]))
