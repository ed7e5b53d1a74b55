"""The behaviour audit end to end against real vLLM on CPU (SmolLM2-135M-Instruct) through the real gateway,
on the smallest subset: two keys (one with the counter-slant system-prompt policy), answers + forcing,
statistics, the report files and plots, resumption after a simulated crash, and the policy's effect on
what reaches vLLM (longer prompts in usage, its id in the ledger). The numbers mean nothing on a 135M model;
the test checks the pipeline, not a finding. About 2-3 minutes (vLLM's start is most of it)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from audit.demo import demo_stack
from audit.forcing import forcing_jobs, forcing_record
from audit.pipeline import AuditSettings, run_audit
from audit.probes import load_probe_set
from audit.runner import Arm, Condition, Sampling, run_jobs
from audit.scorers import RuleScorer
from audit.stats import asymmetry
from audit.store import answered, read_records

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run_model(out: Path) -> str:
    return str(json.loads((out / "run.json").read_text(encoding="utf-8"))["model"])


def test_audit_end_to_end_on_real_vllm_with_and_without_the_policy(tmp_path):
    out = tmp_path / "audit"
    with demo_stack(tmp_path / "stack") as demo:
        settings = AuditSettings(
            base_url=demo.stack.gateway_url + "/v1",
            api_key=demo.baseline_key,
            out=out,
            probes_path=ROOT / "configs" / "audit" / "probes.yaml",
            subset="tiny",
            thinking="both",
            policy_key=demo.policy_key,
            concurrency=8,
            sampling=Sampling(max_tokens=12, max_tokens_thinking=12),
            forcing_max_tokens=12,
            reps=300,
        )
        first = run_audit(settings)
        # tiny: 3 countries x 2 topics x 1 template x 2 languages = 12 probes, x 2 arms; SmolLM2 has no
        # thinking switch, so only thinking off; forcing: 3 countries x 2 languages x 2 arms.
        assert (first.asked, first.errors) == (24 + 12, 0)

        # A crash: the last 3 answers lost, a 4th cut mid-line. The rerun asks exactly those 4.
        answers = out / "answers.jsonl"
        lines = answers.read_text(encoding="utf-8").splitlines(keepends=True)
        answers.write_text("".join(lines[:-4]) + lines[-4][:25], encoding="utf-8")
        assert len(answered(answers)) == 20
        second = run_audit(settings)
        assert (second.asked, second.skipped) == (4, 32)
        assert len(answered(answers)) == 24

        # Forcing on the completions route: SmolLM2 speaks ChatML too, so the rendered prompt is its own.
        probes = load_probe_set(settings.probes_path)
        baseline = Condition(Arm("baseline", demo.baseline_key), thinking=False)
        jobs = forcing_jobs(
            probes, [baseline], run_model(out), settings.sampling, ["china", "usa"], ["en"], 12, "completions"
        )
        stats = asyncio.run(
            run_jobs(
                jobs,
                tmp_path / "forcing-raw.jsonl",
                settings.base_url,
                path="/completions",
                to_record=forcing_record,
            )
        )
        assert (stats.asked, stats.errors) == (2, 0)
        raw = {r["country"]: r for r in read_records(tmp_path / "forcing-raw.jsonl")}
        assert raw["china"]["route"] == "completions" and raw["china"]["recited"]
        assert raw["china"]["usage"]["prompt_tokens"] > 30

    results = json.loads((out / "report" / "results.json").read_text(encoding="utf-8"))
    meta = results["meta"]
    assert meta["thinking_switch"] is False and "no thinking switch" in meta["thinking_note"]
    assert meta["conditions"] == ["baseline/thinking-off", "policy/thinking-off"]
    assert meta["answers"] == 24

    # The policy reached vLLM: every policy-arm prompt is longer than the same probe's baseline prompt
    # (the counter-slant text is ~150 tokens), and the ledger names the policy for that key only.
    tokens: dict[str, dict[str, int]] = defaultdict(dict)
    records = {(r["probe"], r["condition"]): r for r in read_records(answers)}
    for (probe, _), record in records.items():
        tokens[probe][record["arm"]] = record["usage"]["prompt_tokens"]
    assert len(tokens) == 12
    for probe, by_arm in tokens.items():
        assert by_arm["policy"] > by_arm["baseline"] + 50, (probe, by_arm)
    with sqlite3.connect(tmp_path / "stack" / "keys.sqlite") as db:
        rows = db.execute(
            "SELECT key_name, policy_id, count(*) FROM usage_ledger WHERE route = '/v1/chat/completions' "
            "AND status = 200 GROUP BY key_name, policy_id"
        ).fetchall()
    by_key = {(name, policy): n for name, policy, n in rows}
    assert by_key.get(("audit-policy", "counter-slant"), 0) >= 12 + 6  # answers + forcing (+ reruns)
    assert not any(policy for (name, policy) in by_key if name == "audit-baseline")

    # Statistics: one asymmetry recomputed by hand from the raw answers equals the report's.
    scorer = RuleScorer()
    groups: dict[str, list[float]] = defaultdict(list)
    for record in records.values():
        if record["arm"] == "baseline" and record["language"] == "en" and record["topic"] == "human_rights":
            groups[record["country"]].append(
                scorer.score(record["answer"], "en", record["country_name"]).sentiment
            )
    row = next(
        r
        for r in results["asymmetry"]
        if (r["arm"], r["thinking"], r["language"], r["topic"], r["metric"])
        == ("baseline", False, "en", "human_rights", "sentiment")
    )
    assert row["value"] == pytest.approx(asymmetry(groups, "china"))
    assert row["low"] <= row["value"] <= row["high"]
    assert results["mitigation"] and all("change" in m for m in results["mitigation"])
    assert len(results["forcing"]) == 12 and all(f["recited"] for f in results["forcing"])

    report = out / "report"
    for name in ("report.md", "report.html", "asymmetry_baseline_thinking-off.png", "mitigation.png"):
        assert (report / name).is_file(), name
    assert (report / "mitigation.png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in (report / "report.html").read_text(encoding="utf-8")
