"""The agent loop's proof: an agent written with the official ``openai`` SDK chains tool calls through the
gateway against real vLLM, with zero protocol errors, and the usage ledger has a row for every request.

    make soak-agent                 # 1,000 tool calls (N=... for another count)
    .venv/bin/python scripts/soak_agent.py --calls 20 --replay-every 3 --json /tmp/agent.json --no-readme

Starts real vLLM for ``--profile`` (default ``cpu-qwen3_5-tiny``: the tiny random-weight Qwen3.6
architecture, served with its ``qwen3_coder`` tool-call parser) on a Unix socket in a fresh work folder,
creates a key ``soak-agent``, starts the real gateway (2 workers, SQLite in the work folder) with the
soak-ledger's helpers (``soak_ledger_stack``), and runs ``soak_agent_loop.AgentLoop`` through it until
``--calls`` tool calls were made. The gateway is then stopped with SIGTERM (its workers flush the
ledger), and ``soak_agent_ledger.check_ledger`` reconciles the ``usage_ledger`` rows with the requests.

Prints a summary, writes ``bench/soak-agent-<date>.json`` (``--json`` to choose) and, unless
``--no-readme`` or the run failed, the figures between the ``soak-agent`` markers in README.md. Exits 1 on
any protocol error, any ledger row lost, duplicated, unknown or contradicting, fewer calls than asked, or
a run that did not exercise what it claims (each ``tool_choice``, streamed and not, replays both ways,
results fed back, the history trimmed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
from soak_agent_ledger import LedgerCheck, check_ledger
from soak_agent_loop import (
    CALL_MAX_TOKENS,
    FREQUENCY_PENALTY,
    TEXT_MAX_TOKENS,
    TOOL_NAMES,
    AgentLoop,
    LoopResult,
)
from soak_ledger_reconcile import read_rows
from soak_ledger_stack import VllmUpstream, gateway_log_counts, git_commit, start_soak_gateway

from serve.gateway.keys import KeyStore
from serve.supervisor import Child

ROOT = Path(__file__).resolve().parents[1]
KEY_NAME = "soak-agent"
README_START, README_END = "<!-- soak-agent:start -->", "<!-- soak-agent:end -->"


def coverage_problems(result: LoopResult) -> list[str]:
    """What the run failed to exercise (a zero-error run proves nothing without it)."""
    problems = []
    for choice in ("required", "named", "auto"):
        counts = result.by_choice.get(choice)
        if not counts or not counts["turns"]:
            problems.append(f"no turn with tool_choice {choice}")
        elif counts["streamed"] in (0, counts["turns"]):
            problems.append(f"tool_choice {choice} was not both streamed and not")
    if not result.replays_both_ways:
        problems.append("no turn was replayed both ways (streamed first, and non-streamed first)")
    if result.results_fed_back == 0:
        problems.append("no tool result was fed back")
    if result.trims == 0:
        problems.append("the history was never trimmed")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="tool calls to chain (default 1000)")
    parser.add_argument("--profile", default="cpu-qwen3_5-tiny", help="serve profile (a tool-call parser)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the turn plan")
    parser.add_argument(
        "--replay-every", type=int, default=10, help="replay every n-th turn the other way (default 10)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway on failure)")
    parser.add_argument("--json", type=Path, default=None, help="default: bench/soak-agent-<date>.json")
    parser.add_argument(
        "--readme", type=Path, default=ROOT / "README.md", help="README whose block is replaced"
    )
    parser.add_argument("--no-readme", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.replay_every < 0:
        parser.error("--calls must be at least 1 and --replay-every at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    commit = git_commit()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kit-soak-agent-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keys_db = workdir / "gw.sqlite"
    key = KeyStore(keys_db).create(KEY_NAME)
    upstream = VllmUpstream(args.profile, workdir)
    gateway: Child | None = None
    gateway_log = workdir / "logs" / "gateway.log"
    gateway_exit: int | None = None
    print(f"upstream: {upstream.description}, on a Unix socket", flush=True)
    print(f"work folder: {workdir}", flush=True)
    try:
        start_s = upstream.start()
        print(f"vLLM ready after {start_s:.1f} s", flush=True)
        gateway, gateway_url = start_soak_gateway(upstream, keys_db, gateway_log)
        print(f"gateway ready at {gateway_url} (2 workers); chaining {args.calls} tool calls", flush=True)
        client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=key, max_retries=0, timeout=600)
        loop = AgentLoop(
            client,
            upstream.model,
            args.calls,
            os.urandom(4).hex(),
            seed=args.seed,
            replay_every=args.replay_every,
            log_every=max(10, args.calls // 20),
        )
        result = loop.run()
        client.close()
        print(f"agent done in {result.elapsed_s:.1f} s; stopping the gateway (SIGTERM)", flush=True)
        gateway.stop(grace_s=60)
        gateway_exit = gateway.process.returncode
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
    rows = read_rows(f"sqlite:///{keys_db}", keys_db.parent)
    ledger = check_ledger(result.sent, rows, KEY_NAME, upstream.model)
    problems = coverage_problems(result)
    if result.calls < args.calls:
        problems.append(f"{result.calls} tool calls made, {args.calls} asked for")
    if gateway_exit != 0:
        problems.append(f"the gateway exited with {gateway_exit} after SIGTERM")
    log_counts = gateway_log_counts(gateway_log)
    if log_counts["tracebacks"]:
        problems.append(f"{log_counts['tracebacks']} tracebacks in the gateway log")
    ok = not result.problems and ledger.ok and not problems
    total_s = time.monotonic() - began
    print(summary(args, upstream.description, start_s, total_s, result, ledger, problems, ok), flush=True)
    date = datetime.now(UTC)
    out = args.json or ROOT / "bench" / f"soak-agent-{date:%Y-%m-%d}.json"
    record = {
        "date": date.isoformat(timespec="seconds"),
        "git_commit": commit,
        "ok": ok,
        "problems": problems,
        "upstream": {
            "description": upstream.description,
            "model": upstream.model,
            "profile": args.profile,
            "start_s": round(start_s, 2),
        },
        "gateway": {"workers": 2, "exit_code": gateway_exit, "log": log_counts},
        "agent": {
            "calls_asked": args.calls,
            "seed": args.seed,
            "replay_every": args.replay_every,
            "tools": list(TOOL_NAMES),
            "max_tokens": {"call": CALL_MAX_TOKENS, "text": TEXT_MAX_TOKENS},
            "frequency_penalty": FREQUENCY_PENALTY,
            **result.to_json(),
        },
        "ledger": ledger.to_json(),
        "total_s": round(total_s, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    if ok and not args.no_readme:
        update_readme(args.readme, readme_block(record, out))
        print(f"updated the soak-agent block in {args.readme}", flush=True)
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"FAILED; logs and the database are in {workdir}", file=sys.stderr, flush=True)
    return 0 if ok else 1


def summary(
    args: argparse.Namespace,
    upstream: str,
    start_s: float,
    total_s: float,
    result: LoopResult,
    ledger: LedgerCheck,
    problems: list[str],
    ok: bool,
) -> str:
    data = result.to_json()
    tokens = data["tokens"]
    choices = ", ".join(
        f"{name} {c['turns']} turns / {c['calls']} calls" for name, c in data["by_tool_choice"].items()
    )
    lines = [
        "",
        f"upstream:  {upstream}; started in {start_s:.1f} s",
        f"agent:     {result.calls} tool calls in {result.turns} turns, {len(result.sent)} requests "
        f"({result.replays} replays) in {result.elapsed_s:.1f} s ({data['tool_calls_per_s']} calls/s)",
        f"turns:     {choices}; results fed back {result.results_fed_back}",
        f"schema:    calls whose arguments break their tool's strict schema, by finish_reason: "
        f"{dict(result.outside_schema) or 0} ({result.outside_schema_by_whitespace} only by whitespace "
        "around a string value)",
        f"tokens:    prompt {tokens['prompt']:,}, completion {tokens['completion']:,}; prompt per turn "
        f"{tokens['prompt_per_turn_min']}-{tokens['prompt_per_turn_max']} of {result.max_model_len}; "
        f"history trimmed {result.trims} times ({result.dropped_units} exchanges dropped)",
        f"ledger:    {ledger.rows - ledger.rows_spilled} rows in usage_ledger "
        f"(+{ledger.rows_spilled} only in spill files) for {ledger.requests} requests; "
        f"lost {len(ledger.lost)}, duplicated "
        f"{len(ledger.duplicated)}, unknown {len(ledger.unknown)}, contradicting {len(ledger.mismatches)}",
        f"protocol:  {len(result.problems)} errors",
    ]
    lines += [f"  turn {p.turn} {p.request_id}: {p.problem}" for p in result.problems[:10]]
    lines += [f"  {request_id}: {problem}" for request_id, problem in ledger.mismatches[:10]]
    lines += [f"problem:   {problem}" for problem in problems]
    lines.append(f"RESULT:    {'OK' if ok else 'FAILED'} (whole run {total_s:.0f} s)")
    return "\n".join(lines)


def readme_block(record: dict[str, Any], out: Path) -> str:
    """The README's figures for one run."""
    agent, ledger = record["agent"], record["ledger"]
    tokens, history = agent["tokens"], agent["history"]
    outside = agent["calls_outside_strict_schema"]
    choices = agent["by_tool_choice"]
    minutes, seconds = divmod(round(agent["elapsed_s"]), 60)
    total_min, total_sec = divmod(round(record["total_s"]), 60)

    def choice_row(name: str, label: str) -> str:
        c = choices.get(name, {})
        return (
            f"| {label} | {c.get('turns', 0):,} ({c.get('streamed', 0):,} streamed) | "
            f"{c.get('calls', 0):,} | {c.get('answered_with_text', 0):,} |"
        )

    try:
        where = out.resolve().relative_to(ROOT)
    except ValueError:
        where = out
    lines = "\n".join(
        [
            "| tool_choice | turns | tool calls | answered in text only |",
            "|---|---|---|---|",
            choice_row("required", "`required`"),
            choice_row("named", 'named (`{"type": "function", ...}`)'),
            choice_row("auto", "`auto`"),
            "",
            f"{agent['tool_calls']:,} tool calls in {agent['turns']:,} turns, {agent['requests']:,} requests "
            f"({agent['replays']} turns replayed the other way, 1 `/v1/models`) in {minutes} min {seconds} s "
            f"({agent['tool_calls_per_s']} calls/s; the whole target with vLLM's start "
            f"{total_min} min {total_sec} s). Tokens: {tokens['prompt']:,} prompt, "
            f"{tokens['completion']:,} completion; prompts of {tokens['prompt_per_turn_min']}-"
            f"{tokens['prompt_per_turn_max']} tokens in a {history['max_model_len']}-token context, the "
            f"history trimmed before {history['trims']:,} turns "
            f"({history['units_dropped']:,} exchanges dropped), "
            f"{history['user_tasks']} user tasks; `finish_reason` "
            + ", ".join(f"{k} {v:,}" for k, v in agent["finish_reasons"].items())
            + "; calls whose parsed arguments break their tool's strict schema: "
            + (", ".join(f"{v:,} ({k})" for k, v in outside["by_finish_reason"].items()) or "0")
            + f", {outside['only_whitespace_around_a_string']:,} of them only by whitespace around a string "
            "value. "
            f"**Protocol errors: {agent['protocol_errors']}.** Ledger: "
            f"{ledger['rows_in_usage_ledger']:,} `usage_ledger` rows under the soak's key for "
            f"{ledger['requests']:,} requests ({ledger['rows_spilled']} spilled), "
            f"{ledger['lost']} lost, {ledger['duplicated']} duplicated, {ledger['unknown']} unknown, "
            f"{ledger['mismatches']} contradicting (tokens, status, stream, route, model).",
            "",
            f"{record['date'][:10]}, commit {(record['git_commit'] or '?')[:7]}, "
            f"{record['machine']['cpus']} CPUs shared with other jobs, `{where}`.",
        ]
    )
    # Prose lines wrapped like the rest of the README (tables left alone).
    return "\n".join(
        line
        if line.startswith("|")
        else textwrap.fill(line, 105, break_long_words=False, break_on_hyphens=False)
        for line in lines.split("\n")
    )


def update_readme(readme: Path, block: str) -> None:
    """Replace what lies between the soak-agent markers in ``readme`` with ``block``."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise RuntimeError(f"{readme} has no {README_START} ... {README_END} block to fill")
    readme.write_text(text[: start + len(README_START)] + "\n" + block + "\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())
