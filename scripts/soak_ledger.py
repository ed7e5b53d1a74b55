"""The usage ledger's proof: a bounded load with the upstream killed and restarted in the middle, then every
sent request reconciled with its ledger row.

    make soak-ledger                                      # 10,000 requests against real vLLM on the CPU
    make soak-ledger SOAK_ARGS="--upstream fake"          # the same against a fake upstream (real SSE)
    .venv/bin/python scripts/soak_ledger.py --requests 300 --upstream fake --json /tmp/soak.json

Starts the upstream on a Unix socket in a fresh work folder (real vLLM with ``--profile``, default
``cpu-qwen3_5-tiny``, through ``serve.supervisor.start_vllm``; or ``soak_ledger_upstream.py``), creates a
key ``soak``, starts the real gateway (``python -m serve.cli gateway``, 2 workers, its SQLite database in
the work folder), and sends the plan of ``soak_ledger_load.py``: non-streamed and streamed chat
completions, long streams, and clients that leave streams and non-streamed requests early, 32 at a
time. From request ``--kill-at`` (a fraction of the load) on, as soon as a long stream is mid-way, the
upstream's process group gets SIGKILL with requests in flight; the next ``--outage-requests`` go out
while it is down (503 from the gateway), then it is started again on the same socket and waited for,
and the rest of the load follows. The gateway is then stopped with SIGTERM (each worker flushes its
ledger batch on the way out), and ``soak_ledger_reconcile.py`` checks the ``usage_ledger`` table plus
any ``ledger-spill-*.jsonl`` rows against what the client saw.

Prints a summary table, writes ``bench/soak-ledger-<date>.json`` (``--json`` to choose), and exits 1 on
any lost, duplicated, unknown or contradicting row, or when the run did not exercise what it claims
(nothing in flight at the kill, no 503 during the outage, no client leaving early, nothing answered
after the restart).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from soak_ledger_load import Outage, Seen, plan, run_load
from soak_ledger_reconcile import Report, format_table, read_rows, reconcile
from soak_ledger_stack import (
    FakeUpstream,
    Upstream,
    VllmUpstream,
    gateway_log_counts,
    git_commit,
    start_soak_gateway,
)

from serve.gateway.keys import KeyStore
from serve.supervisor import Child

ROOT = Path(__file__).resolve().parents[1]
KEY_NAME = "soak"


def _phases(seen: list[Seen]) -> dict[str, dict[str, int]]:
    """Per phase, how many requests ended how (``result`` or ``result status``)."""
    phases: dict[str, Counter[str]] = {}
    for one in seen:
        label = one.result if one.status is None else f"{one.result} {one.status}"
        phases.setdefault(one.phase, Counter())[label] += 1
    order = ("before", "at_kill", "outage", "after")
    return {p: dict(phases[p].most_common()) for p in order if p in phases}


def coverage_problems(seen: list[Seen], outage: Outage) -> list[str]:
    """What the run failed to exercise (the proof proves nothing without it)."""
    problems = []
    if outage.streams_mid_way_at_kill == 0 or outage.in_flight_at_kill == 0:
        problems.append(
            f"the upstream was killed with {outage.in_flight_at_kill} requests in flight and "
            f"{outage.streams_mid_way_at_kill} streams mid-way: nothing was cut off"
        )
    if not any(s.phase == "outage" and s.status == 503 for s in seen):
        problems.append("no request got 503 while the upstream was down: the kill did not take")
    if not any(s.result == "left_early" for s in seen):
        problems.append("no client left early")
    if not any(s.phase == "after" and s.result == "complete" and s.status == 200 for s in seen):
        problems.append("nothing was answered after the restart")
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000, help="requests in the load (default 10000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--upstream", choices=("vllm", "fake"), default="vllm")
    parser.add_argument("--profile", default="cpu-qwen3_5-tiny", help="serve profile for --upstream vllm")
    parser.add_argument("--token-delay-ms", type=float, default=5.0, help="per token, --upstream fake")
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="fraction of the load sent before the kill"
    )
    parser.add_argument(
        "--outage-requests", type=int, default=None, help="requests sent while it is down (default 3%%)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the load's mix of kinds")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway on failure)")
    parser.add_argument("--json", type=Path, default=None, help="default: bench/soak-ledger-<date>.json")
    args = parser.parse_args(argv)
    if args.requests < 10 or not 0 < args.kill_at < 1:
        parser.error("--requests must be at least 10 and --kill-at within (0, 1)")
    if args.outage_requests is None:
        args.outage_requests = max(1, args.requests * 3 // 100)
    kill_at = int(args.requests * args.kill_at)
    if not 1 <= args.outage_requests <= args.requests - kill_at - 1:
        parser.error("--outage-requests must leave at least one request for after the restart")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = git_commit()  # the code that runs (others may commit while it does)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kit-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    keys_db = workdir / "gw.sqlite"
    key = KeyStore(keys_db).create(KEY_NAME)
    upstream: Upstream = (
        VllmUpstream(args.profile, workdir)
        if args.upstream == "vllm"
        else FakeUpstream(workdir, args.token_delay_ms)
    )
    run_id = os.urandom(4).hex()
    specs = plan(args.requests, run_id, args.seed)
    kill_at = int(args.requests * args.kill_at)
    gateway: Child | None = None
    gateway_log = workdir / "logs" / "gateway.log"
    print(f"upstream: {upstream.description}, on a Unix socket", flush=True)
    print(f"work folder: {workdir}", flush=True)
    try:
        first_start_s = upstream.start()
        print(f"upstream ready after {first_start_s:.1f} s", flush=True)
        gateway, gateway_url = start_soak_gateway(upstream, keys_db, gateway_log)
        print(
            f"gateway ready at {gateway_url} (2 workers); sending {args.requests} requests, "
            f"{args.concurrency} at a time; SIGKILL of the upstream from request {kill_at} on, once a "
            "long stream is mid-way",
            flush=True,
        )
        outage = Outage(kill_at, args.outage_requests, upstream.kill, upstream.start)
        result = run_load(gateway_url, key, upstream.model, specs, args.concurrency, outage)
        assert outage.restart_s is not None
        print(
            f"load done in {result.elapsed_s:.1f} s; the upstream was back {outage.restart_s:.1f} s after "
            "its restart began; stopping the gateway (SIGTERM)",
            flush=True,
        )
        gateway.stop(grace_s=60)
        gateway_exit = gateway.process.returncode
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
    rows = read_rows(f"sqlite:///{keys_db}", keys_db.parent)
    report = reconcile(result.seen, rows, KEY_NAME, upstream.model, outage.window)
    coverage = coverage_problems(result.seen, outage)
    log_counts = gateway_log_counts(gateway_log)
    problems = list(coverage)
    if gateway_exit != 0:
        problems.append(f"the gateway exited with {gateway_exit} after SIGTERM")
    ok = report.ok and not problems
    restart_s = outage.restart_s or 0.0
    summary = _summary(args, upstream, first_start_s, result.elapsed_s, restart_s, outage, report, problems)
    print(summary, flush=True)
    out = args.json or ROOT / "bench" / f"soak-ledger-{datetime.now(UTC):%Y-%m-%d}.json"
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "ok": ok,
        "problems": problems,
        "upstream": {
            "kind": upstream.kind,
            "description": upstream.description,
            "model": upstream.model,
            "first_start_s": round(first_start_s, 2),
            "restart_s": round(restart_s, 2),
        },
        "gateway": {"workers": 2, "exit_code": gateway_exit, "log": log_counts},
        "load": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "seed": args.seed,
            "kinds": dict(Counter(s.kind for s in specs).most_common()),
            "kill_at": kill_at,
            "outage_requests": args.outage_requests,
            "killed_after_requests": outage.outage_start,
            "in_flight_at_kill": outage.in_flight_at_kill,
            "streams_mid_way_at_kill": outage.streams_mid_way_at_kill,
            "elapsed_s": round(result.elapsed_s, 2),
            "requests_per_s": round(args.requests / result.elapsed_s, 1),
            "requests_per_s_without_restart": round(
                args.requests / max(result.elapsed_s - restart_s, 1e-9), 1
            ),
            "timeline_s": {k: round(v, 2) for k, v in result.timeline.items()},
            "phases": _phases(result.seen),
        },
        "reconcile": report.to_json(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"FAILED; logs and the database are in {workdir}", file=sys.stderr, flush=True)
    return 0 if ok else 1


def _summary(
    args: argparse.Namespace,
    upstream: Upstream,
    first_start_s: float,
    elapsed_s: float,
    restart_s: float,
    outage: Outage,
    report: Report,
    problems: list[str],
) -> str:
    rate = args.requests / elapsed_s
    lines = [
        "",
        f"upstream:  {upstream.description}; first start {first_start_s:.1f} s",
        f"outage:    SIGKILL after {outage.outage_start} requests, {outage.in_flight_at_kill} in flight "
        f"({outage.streams_mid_way_at_kill} long streams mid-way); {args.outage_requests} sent while down; "
        f"back after {restart_s:.1f} s",
        f"load:      {args.requests} requests in {elapsed_s:.1f} s ({rate:.1f} requests/s; "
        f"{args.requests / (elapsed_s - restart_s):.1f} without the restart), "
        f"{args.concurrency} in flight",
        "",
        format_table(report),
        "",
        f"ledger:    {report.rows_db + report.rows_spilled} rows ({report.rows_db} in usage_ledger, "
        f"{report.rows_spilled} from spill files) for {report.sent} requests sent",
        f"reconcile: lost {len(report.lost)}, duplicated {len(report.duplicated)}, "
        f"unknown {len(report.unknown)}, contradicting {len(report.mismatches)}; "
        f"accepted by the kill-time race rule {report.race_accepted}; left before the gateway read "
        f"the body {report.body_unread}; "
        f"client transport errors {report.transport_errors}",
    ]
    for mismatch in report.mismatches[:10]:
        lines.append(f"  {mismatch.request_id}: {mismatch.problem}")
    for problem in problems:
        lines.append(f"problem:   {problem}")
    lines.append(
        "RESULT:    "
        + ("OK, every request has exactly one right row" if report.ok and not problems else "FAILED")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
