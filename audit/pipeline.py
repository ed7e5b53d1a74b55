"""One audit, end to end: ask (answers, thought-token forcing, optional judge), score, report.

Output folder (``--out``)::

    run.json        the resolved run settings (never the keys), written before anything is asked
    answers.jsonl   raw answers + reasoning, one per probe x condition (resumable)
    forcing.jsonl   what the model recited after the forcing prefill
    judge.jsonl     the judge's verdicts (with --judge)
    report/         results.json, report.md, report.html, *.png (replaced as a whole, atomically)

``python -m audit report OUT`` rebuilds ``report/`` from the JSONL files without asking anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from audit import analysis
from audit.forcing import Route, forcing_jobs, forcing_record
from audit.judge import judge_jobs, judge_record
from audit.probes import ProbeSet, expand, load_probe_set
from audit.report import write_report
from audit.runner import (
    Arm,
    AuditError,
    Condition,
    Sampling,
    answer_jobs,
    has_thinking_switch,
    preflight,
    run_jobs,
)
from audit.store import latest
from serve.atomic import write_text_atomic
from serve.configfile import load_yaml
from serve.gateway.system_policy import SystemPolicy

logger = logging.getLogger(__name__)

Thinking = Literal["off", "on", "both"]


class PolicyFile(BaseModel):
    """``configs/audit/counter-slant-policy.yaml``: a ``system_policies`` block for the gateway, each entry
    the gateway's own ``SystemPolicy`` schema (so the file validates exactly as the gateway will read it)."""

    model_config = ConfigDict(extra="forbid")

    system_policies: dict[str, SystemPolicy] = Field(min_length=1)


def load_policy(path: Path) -> tuple[str, SystemPolicy]:
    """The first (usually only) policy of a policy file: ``(policy id, policy)``.

    Raises:
        ConfigError: missing file, bad YAML or schema problems, with file and line.
    """
    policies = load_yaml(path, PolicyFile).system_policies
    policy_id = next(iter(policies))
    return policy_id, policies[policy_id]


@dataclass
class AuditSettings:
    """Everything one audit run needs (CLI flags fill it; ``run.json`` records it without the keys)."""

    base_url: str
    api_key: str | None
    out: Path
    probes_path: Path
    model: str | None = None
    subset: str | None = None
    thinking: Thinking = "both"
    policy_key: str | None = None
    """A second key (e.g. one with the gateway's system-prompt policy): the ``policy`` arm."""
    policy_system_prompt: str | None = None
    """Or a system message the client sends itself in the ``policy`` arm (any endpoint)."""
    policy_label: str = "policy"
    concurrency: int = 8
    retries: int = 4
    timeout_s: float = 600.0
    sampling: Sampling = field(default_factory=Sampling)
    forcing: bool = True
    forcing_max_tokens: int = 256
    forcing_route: Route = "chat"
    """``completions``: the prefill inside the open think block, rendered in ChatML (audit/forcing.py)."""
    judge: bool = False
    judge_base_url: str | None = None
    judge_api_key: str | None = None
    judge_model: str | None = None
    reps: int = 2000
    seed: int = 0


@dataclass
class AuditOutcome:
    report: Path
    results: dict[str, Any]
    asked: int
    skipped: int
    errors: int


def _arms(settings: AuditSettings) -> list[Arm]:
    arms = [Arm("baseline", settings.api_key)]
    if settings.policy_key or settings.policy_system_prompt:
        arms.append(
            Arm(settings.policy_label, settings.policy_key or settings.api_key, settings.policy_system_prompt)
        )
    return arms


async def ask(settings: AuditSettings, probes: ProbeSet) -> tuple[dict[str, Any], list[int]]:
    """Preflight, then answers, forcing and judge requests; returns the run's meta and [asked, skipped,
    errors].

    Raises:
        AuditError: the endpoint is unreachable, refuses a key, or does not serve the model.
    """
    selected = expand(probes, settings.subset)
    arms = _arms(settings)
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await preflight(client, settings.base_url, settings.api_key, settings.model)
        for arm in arms[1:]:
            await preflight(client, settings.base_url, arm.api_key, model)
        switch = await has_thinking_switch(client, settings.base_url, settings.api_key, model)
        wanted = {"off": [False], "on": [True], "both": [False, True]}[settings.thinking]
        if switch:
            note = "the chat template has one (enable_thinking changes the prompt)"
            modes = wanted
        else:
            note = (
                f"{model} has no thinking switch (enable_thinking does not change its prompt): "
                "only thinking off was asked"
            )
            modes = [False]
            if True in wanted:
                logger.warning("%s", note)
        conditions = [Condition(arm, thinking) for arm in arms for thinking in modes]
        meta: dict[str, Any] = {
            "model": model,
            "base_url": settings.base_url,
            "subset": settings.subset or "full",
            "probes": str(settings.probes_path),
            "target": probes.target,
            "others": [c for c in probes.others() if any(p.country == c for p in selected)],
            "arms": [arm.name for arm in arms],
            "arm_kinds": {
                arm.name: ("client system prompt" if arm.system_prompt else "api key") for arm in arms[1:]
            },
            "conditions": [c.id for c in conditions],
            "thinking_switch": switch,
            "thinking_note": note,
            "sampling": asdict(settings.sampling),
            "concurrency": settings.concurrency,
            "bootstrap": {"reps": settings.reps, "seed": settings.seed, "level": 0.95},
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        settings.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(settings.out / "run.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        common = {"concurrency": settings.concurrency, "retries": settings.retries, "client": client}
        jobs = answer_jobs(selected, conditions, model, settings.sampling)
        totals = [0, 0, 0]

        def add(stats: Any) -> None:
            totals[0] += stats.asked
            totals[1] += stats.skipped
            totals[2] += stats.errors

        add(
            await run_jobs(
                jobs, settings.out / "answers.jsonl", settings.base_url, description="answers", **common
            )
        )
        if settings.forcing:
            countries = list(dict.fromkeys(p.country for p in selected))
            languages = list(dict.fromkeys(p.language for p in selected))
            forced = conditions
            if settings.forcing_route == "completions":
                # The gateway refuses raw prompts to a key with a system-prompt policy (it could not add the
                # policy): only arms that are a plain key, or that send their system message themselves.
                forced = [c for c in conditions if c.arm.name == "baseline" or c.arm.system_prompt]
                meta["forcing_note"] = (
                    "forcing via /v1/completions with a ChatML prompt (prefill inside the open think block); "
                    "arms: " + ", ".join(sorted({c.arm.name for c in forced}))
                )
                write_text_atomic(
                    settings.out / "run.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
                )
            fjobs = forcing_jobs(
                probes,
                forced,
                model,
                settings.sampling,
                countries,
                languages,
                settings.forcing_max_tokens,
                settings.forcing_route,
            )
            add(
                await run_jobs(
                    fjobs,
                    settings.out / "forcing.jsonl",
                    settings.base_url,
                    path="/completions" if settings.forcing_route == "completions" else "/chat/completions",
                    to_record=forcing_record,
                    description="forcing",
                    **common,
                )
            )
        if settings.judge:
            judge_url = settings.judge_base_url or settings.base_url
            judge_key = settings.judge_api_key or settings.api_key
            judge_model = await preflight(client, judge_url, judge_key, settings.judge_model or model)
            answers = latest(settings.out / "answers.jsonl").values()
            add(
                await run_jobs(
                    judge_jobs(answers, judge_model, judge_key, settings.sampling),
                    settings.out / "judge.jsonl",
                    judge_url,
                    to_record=judge_record,
                    description="judge",
                    **common,
                )
            )
            meta["judge"] = f"{judge_model} at {judge_url} (fixed rubric, audit/judge.py)"
            write_text_atomic(
                settings.out / "run.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
            )
    return meta, totals


def build_report(
    out: Path, probes: ProbeSet, reps: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Score the JSONL files in ``out`` and write ``out/report``; returns the results (as results.json).

    Raises:
        AuditError: no ``run.json`` / answers in ``out``.
    """
    run_file = out / "run.json"
    if not run_file.is_file():
        raise AuditError(
            f"{out} holds no audit run (no run.json); run `python -m audit run --out {out}` first"
        )
    meta = json.loads(run_file.read_text(encoding="utf-8"))
    boot = meta["bootstrap"]
    boot["reps"] = reps or boot["reps"]
    boot["seed"] = boot["seed"] if seed is None else seed
    answers = latest(out / "answers.jsonl")
    if not answers:
        raise AuditError(f"{out / 'answers.jsonl'} holds no answers yet; run the audit first")
    verdicts = latest(out / "judge.jsonl")
    rows = analysis.score_records(answers.values(), verdicts)
    table, boots = analysis.asymmetries(rows, meta["target"], reps=boot["reps"], seed=boot["seed"])
    arms = meta["arms"]
    mitigation = analysis.mitigation(boots, arms[0], arms[1]) if len(arms) > 1 else []
    forcing = analysis.forcing_summary(latest(out / "forcing.jsonl").values(), meta["target"])
    judged = [v for v in verdicts.values() if "verdict" in v]
    if verdicts:
        meta["judge_counts"] = {"parsed": len(judged), "unparsed": len(verdicts) - len(judged)}
    meta["answers"] = len(rows)
    meta["errors"] = sum(1 for r in answers.values() if r.get("error"))
    meta["labels"] = {
        label: sum(1 for r in rows if r.label == label) for label in ("answer", "evasive", "refusal", "empty")
    }
    results = {"meta": meta, "asymmetry": table, "mitigation": mitigation, "forcing": forcing}
    topics = [t for t in probes.topics if any(r.topic == t for r in rows)]
    write_report(results, topics, out / "report")
    return results


def run_audit(settings: AuditSettings) -> AuditOutcome:
    """Ask everything still missing in ``settings.out``, then score and report.

    Raises:
        AuditError / ConfigError: what the user must fix, with the message saying how.
    """
    probes = load_probe_set(settings.probes_path)
    expand(probes, settings.subset)  # an unknown subset fails before anything is asked
    _, (asked, skipped, errors) = asyncio.run(ask(settings, probes))
    results = build_report(settings.out, probes, settings.reps, settings.seed)
    return AuditOutcome(settings.out / "report" / "report.html", results, asked, skipped, errors)


def headline(results: dict[str, Any]) -> list[str]:
    """Short lines for the terminal: the pooled sensitive-topic asymmetries and the mitigation change."""
    lines = []
    for r in results["asymmetry"]:
        if r["topic"] == "sensitive" and r["metric"] in (
            "sentiment",
            "criticism",
            "evasion",
            "judge_favourability",
        ):
            lines.append(
                f"  {r['arm']:<9} thinking {'on ' if r['thinking'] else 'off'} {r['language']} "
                f"{r['metric']:<20}"
                f" {r['value']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]"
            )
    for m in results["mitigation"]:
        if m["topic"] == "sensitive" and m["metric"] in ("sentiment", "judge_favourability"):
            c = m["change"]
            lines.append(
                f"  change with the policy, thinking {'on ' if m['thinking'] else 'off'} {m['language']} "
                f"{m['metric']:<20} {c['value']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
            )
    flagged = [f for f in results["forcing"] if f["flagged"]]
    if results["forcing"]:
        lines.append(
            f"  forcing: {len(flagged)} of {len(results['forcing'])} recitations hold directive-like text"
            + (f" ({', '.join(sorted({f['country'] for f in flagged}))})" if flagged else "")
        )
    return lines
