"""Cost arithmetic, result parsing, the table and the plot of ``make bench-serve`` (no processes, no vLLM).

``scripts/bench_serve.py`` runs vLLM's own benchmark client and hands its result dicts here:

- ``parse_run`` turns one ``vllm bench serve`` result (``vllm/benchmarks/serve.py``, ``benchmark()``) into
  the figures the kit reports (``RunFigures``).
- ``cost_per_1m_output_tokens`` converts throughput into money per million output tokens.
- ``build_rows`` pairs each gateway run with the direct run of the same thinking mode and concurrency:
  the gateway's overhead and the cost per 1M output tokens beside the reference API price.
- ``render_table`` writes the markdown block for the README, ``plot`` the PNG.

Money has no currency of its own here: prices per hour and per 1M tokens are in whatever currency they are
given in, and the results are in the same one.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

REFERENCE_PRICE_PER_1M_OUTPUT = 7.80
"""Reference API price per 1M output tokens: the published output price of a comparable hosted Qwen
flagship, as stated in issue #10. Thinking tokens are billed there as output tokens."""

DEFAULT_HOURLY_PRICE = 3.00
"""Price of one GPU (or, for a CPU profile, the whole machine) per hour when none is given: an assumed
round figure, not a quote. Set ``GPU_HOURLY_PRICE`` to what you pay."""

SECONDS_PER_HOUR = 3600
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M output tokens

Target = Literal["direct", "gateway"]
Thinking = Literal["on", "off", "none"]
"""``on``/``off``: ``chat_template_kwargs.enable_thinking`` sent with every request; ``none``: the model
has no thinking switch (no reasoning parser in its model config), nothing is sent."""

PERCENTILES = (50, 99)
"""Percentiles asked of ``vllm bench serve`` (``--metric-percentiles 50,99``)."""


def cost_per_1m_output_tokens(hourly_price: float, accelerators: int, output_tokens_per_s: float) -> float:
    """Cost of one million output tokens at a measured throughput.

    ``cost = hourly_price x accelerators / (output_tokens_per_s x 3600) x 1e6``: the hardware is paid by
    the hour whether busy or not, so this is the cost when the server is kept at the measured load for the
    whole hour (idle time makes each token dearer).

    Args:
        hourly_price: price of one accelerator (GPU; for a CPU profile the whole machine) per hour.
        accelerators: how many are paid for (tensor x pipeline x data parallel GPUs; 1 CPU machine).
        output_tokens_per_s: output (completion) tokens per second across all requests, thinking tokens
            included: they are generated, and billed, like any other output token.

    Returns:
        Price per 1M output tokens, in the currency of ``hourly_price``.

    Raises:
        ValueError: a negative price, fewer than one accelerator, or a throughput that is not positive.
    """
    if hourly_price < 0 or accelerators < 1:
        raise ValueError(f"need a price >= 0 and >= 1 accelerator, got {hourly_price} and {accelerators}")
    if not output_tokens_per_s > 0:
        raise ValueError(f"output throughput must be positive, got {output_tokens_per_s} tokens/s")
    return hourly_price * accelerators / (output_tokens_per_s * SECONDS_PER_HOUR) * TOKENS_PER_PRICE_UNIT


def break_even_tokens_per_s(hourly_price: float, accelerators: int, reference_price: float) -> float:
    """Output tokens/s at which the hardware costs what the reference API charges per 1M output tokens.

    The inverse of ``cost_per_1m_output_tokens``: ``hourly_price x accelerators x 1e6 / (reference x 3600)``.

    Raises:
        ValueError: ``reference_price`` is not positive.
    """
    if not reference_price > 0:
        raise ValueError(f"reference price must be positive, got {reference_price}")
    return hourly_price * accelerators * TOKENS_PER_PRICE_UNIT / (reference_price * SECONDS_PER_HOUR)


def accelerator_count(
    vllm_build: str, tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1
) -> tuple[int, str]:
    """How many accelerators a profile pays for, and what they are.

    Args:
        vllm_build: the profile's ``vllm_build`` (``cuda`` or ``cpu``).
        tensor_parallel / pipeline_parallel / data_parallel: the profile's parallel sizes; vLLM uses
            ``tp x pp`` GPUs per replica and ``dp`` replicas.

    Returns:
        ``(count, unit)``: ``(tp x pp x dp, "GPU")`` for cuda, ``(1, "CPU machine")`` for cpu (the whole
        machine is what is paid by the hour).

    Raises:
        ValueError: a parallel size below 1.
    """
    sizes = (tensor_parallel, pipeline_parallel, data_parallel)
    if min(sizes) < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tp={sizes[0]} pp={sizes[1]} dp={sizes[2]}")
    if vllm_build == "cpu":
        return 1, "CPU machine"
    return math.prod(sizes), "GPU"


def data_parallel_from_args(extra_args: Sequence[str]) -> int:
    """``--data-parallel-size`` (or ``-dp``) from vLLM flags passed through verbatim, else 1.

    Raises:
        ValueError: the flag has no integer value.
    """
    for i, arg in enumerate(extra_args):
        name, _, value = arg.partition("=")
        if name in ("--data-parallel-size", "-dp"):
            if not value:
                value = extra_args[i + 1] if i + 1 < len(extra_args) else ""
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name} needs an integer, got {value!r}") from None
    return 1


@dataclass(frozen=True)
class RunFigures:
    """One ``vllm bench serve`` run: one target, one thinking mode, one concurrency.

    Times are milliseconds; throughputs are per second over the run's wall time (``duration_s``).
    """

    target: Target
    thinking: Thinking
    concurrency: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    e2el_p50_ms: float


def parse_run(raw: dict[str, Any], target: Target, thinking: Thinking, concurrency: int) -> RunFigures:
    """The figures of one ``vllm bench serve`` result dict (what ``--save-result`` writes).

    Args:
        raw: the result of ``vllm.benchmarks.serve.main``; needs ``completed``, ``failed``, ``duration``,
            ``total_input_tokens``, ``total_output_tokens``, ``output_throughput``,
            ``request_throughput`` and ``p50_/p99_`` of ttft and tpot, ``p50_`` of itl and e2el
            (``--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99``).
        target / thinking / concurrency: what was run (``max_concurrency`` in ``raw`` must agree).

    Raises:
        ValueError: a field is missing (the run was not asked for those percentiles) or
            ``max_concurrency`` disagrees.
    """
    needed = {
        "completed": "completed",
        "failed": "failed",
        "duration_s": "duration",
        "total_input_tokens": "total_input_tokens",
        "total_output_tokens": "total_output_tokens",
        "output_tokens_per_s": "output_throughput",
        "requests_per_s": "request_throughput",
        "ttft_p50_ms": "p50_ttft_ms",
        "ttft_p99_ms": "p99_ttft_ms",
        "tpot_p50_ms": "p50_tpot_ms",
        "tpot_p99_ms": "p99_tpot_ms",
        "itl_p50_ms": "p50_itl_ms",
        "e2el_p50_ms": "p50_e2el_ms",
    }
    missing = sorted(key for key in needed.values() if key not in raw)
    if missing:
        raise ValueError(
            f"vllm bench serve result lacks {', '.join(missing)} (run it with --percentile-metrics "
            "ttft,tpot,itl,e2el --metric-percentiles 50,99)"
        )
    if raw.get("max_concurrency") not in (None, concurrency):
        raise ValueError(f"result is for concurrency {raw['max_concurrency']}, expected {concurrency}")
    values: dict[str, Any] = {name: raw[key] for name, key in needed.items()}
    for name in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
        values[name] = int(values[name])
    for name in needed:
        if name not in ("completed", "failed", "total_input_tokens", "total_output_tokens"):
            values[name] = float(values[name])
    return RunFigures(target=target, thinking=thinking, concurrency=concurrency, **values)


def _change(gateway: float, direct: float) -> float | None:
    """Relative change in percent, None where the direct figure is 0."""
    return (gateway / direct - 1) * 100 if direct else None


@dataclass(frozen=True)
class Row:
    """One line of the cost table: a thinking mode at a concurrency, through the gateway, vs direct."""

    thinking: Thinking
    concurrency: int
    gateway: RunFigures
    direct: RunFigures | None
    output_tokens_per_s_change_pct: float | None
    """Gateway vs direct output throughput, percent (negative: the gateway is slower)."""
    ttft_p50_added_ms: float | None
    tpot_p50_added_ms: float | None
    cost_per_1m_output: float
    """From the gateway run's output throughput (the deployment path)."""
    reference_price: float
    cost_vs_reference: float
    """``cost_per_1m_output / reference_price`` (below 1: cheaper than the reference API)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_rows(
    runs: Iterable[RunFigures], hourly_price: float, accelerators: int, reference_price: float
) -> list[Row]:
    """Pair every gateway run with the direct run of the same thinking mode and concurrency.

    Returns:
        Rows ordered by thinking mode (as first seen) then concurrency; a gateway run without a direct
        twin has ``direct`` and the overhead fields None.

    Raises:
        ValueError: a gateway run produced no output tokens (its cost is undefined), or the reference price
            is not positive.
    """
    if not reference_price > 0:
        raise ValueError(f"reference price must be positive, got {reference_price}")
    runs = list(runs)
    direct = {(r.thinking, r.concurrency): r for r in runs if r.target == "direct"}
    modes = list(dict.fromkeys(r.thinking for r in runs))
    rows = []
    for gateway in sorted(
        (r for r in runs if r.target == "gateway"), key=lambda r: (modes.index(r.thinking), r.concurrency)
    ):
        twin = direct.get((gateway.thinking, gateway.concurrency))
        cost = cost_per_1m_output_tokens(hourly_price, accelerators, gateway.output_tokens_per_s)
        rows.append(
            Row(
                thinking=gateway.thinking,
                concurrency=gateway.concurrency,
                gateway=gateway,
                direct=twin,
                output_tokens_per_s_change_pct=(
                    _change(gateway.output_tokens_per_s, twin.output_tokens_per_s) if twin else None
                ),
                ttft_p50_added_ms=gateway.ttft_p50_ms - twin.ttft_p50_ms if twin else None,
                tpot_p50_added_ms=gateway.tpot_p50_ms - twin.tpot_p50_ms if twin else None,
                cost_per_1m_output=cost,
                reference_price=reference_price,
                cost_vs_reference=cost / reference_price,
            )
        )
    return rows


THINKING_LABEL = {"on": "on", "off": "off", "none": "n/a"}


def _num(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def _money(value: float) -> str:
    return f"{value:,.2f}" if value >= 0.995 else f"{value:.3f}"


def _overhead(row: dict[str, Any]) -> str:
    if row["direct"] is None:
        return "no direct run"
    change, added = row["output_tokens_per_s_change_pct"], row["ttft_p50_added_ms"]
    return f"{_num(change, 1, True)} %, {_num(added, 0, True)} ms"


def _thinking_share(ledger: dict[str, int] | None) -> str:
    """``185 of 256 tokens``: reasoning among the billed completion tokens, from the gateway's ledger."""
    if not ledger:
        return "-"
    return f"{ledger['reasoning_tokens']:,} of {ledger['completion_tokens']:,} tokens"


def render_table(result: dict[str, Any]) -> str:
    """The markdown block for one profile: the table and a caption saying what was measured where.

    Args:
        result: what ``scripts/bench_serve.py`` writes to ``bench/serve-<profile>-<date>.json``
            (``rows`` as ``Row.to_dict``, ``runs`` with each gateway run's ``ledger`` totals, ``cost``,
            ``config``, ``measured_on``, ``notes``...).
    """
    cost, cfg = result["cost"], result["config"]
    lines = [
        f"**{result['measured_on']}** (profile `{result['profile']}`, {result['date']})",
        "",
        "| concurrency | thinking | output tok/s | of which thinking (ledger) | requests/s | TTFT p50 / p99 "
        "| TPOT p50 / p99 | gateway vs direct: tok/s, TTFT p50 | cost / 1M output tokens | reference API |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ledgers = {
        (r["thinking"], r["concurrency"]): r.get("ledger") for r in result["runs"] if r["target"] == "gateway"
    }
    for row in result["rows"]:
        g = row["gateway"]
        lines.append(
            f"| {row['concurrency']} | {THINKING_LABEL[row['thinking']]} | {_num(g['output_tokens_per_s'])} "
            f"| {_thinking_share(ledgers.get((row['thinking'], row['concurrency'])))} "
            f"| {_num(g['requests_per_s'], 2)} "
            f"| {_num(g['ttft_p50_ms'], 0)} / {_num(g['ttft_p99_ms'], 0)} ms "
            f"| {_num(g['tpot_p50_ms'], 0)} / {_num(g['tpot_p99_ms'], 0)} ms "
            f"| {_overhead(row)} "
            f"| {_money(row['cost_per_1m_output'])} ({row['cost_vs_reference']:.1f}x) "
            f"| {_money(row['reference_price'])} |"
        )
    caption = (
        f"Through the gateway (figures) and direct to vLLM (overhead column), `vllm bench serve` "
        f"{cfg['vllm_version']}, `--backend openai-chat`, random prompts of {cfg['input_len']} tokens, "
        f"{cfg['output_len']} output tokens each (`ignore_eos`), {cfg['num_prompts_label']} per run. "
        f"Cost at {_money(cost['hourly_price'])} per {cost['unit']}-hour x {cost['accelerators']} "
        f"({cost['hourly_price_source']}); reference {_money(cost['reference_price'])} per 1M output "
        f"tokens ({cost['reference_price_source']}); break-even at "
        f"{_num(cost['break_even_tokens_per_s'])} output tok/s. {' '.join(result['notes'])} "
        f"Every run: `bench/{result['file']}`, plot `bench/{result['png']}`."
    )
    lines += ["", textwrap.fill(caption, width=105, break_on_hyphens=False, break_long_words=False)]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Write a PNG: output tokens/s (gateway and direct) and cost per 1M output tokens vs concurrency.

    Raises:
        ImportError: matplotlib is not installed (it is in the kit's ``dev`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f.name for f in fields(RunFigures)]
    runs = [RunFigures(**{name: r[name] for name in names}) for r in result["runs"]]
    modes = list(dict.fromkeys(r.thinking for r in runs))
    concurrencies = sorted({r.concurrency for r in runs})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colour = {mode: f"C{i}" for i, mode in enumerate(modes)}  # one colour per thinking mode, both panels
    for mode in modes:
        suffix = "" if mode == "none" else f", thinking {mode}"
        for target, style in (("gateway", "o-"), ("direct", "s--")):
            points = sorted(
                (r.concurrency, r.output_tokens_per_s)
                for r in runs
                if r.thinking == mode and r.target == target
            )
            if points:
                left.plot(*zip(*points, strict=True), style, color=colour[mode], label=f"{target}{suffix}")
    for mode in modes:
        suffix = "" if mode == "none" else f" (thinking {mode})"
        points = sorted(
            (r["concurrency"], r["cost_per_1m_output"]) for r in result["rows"] if r["thinking"] == mode
        )
        if points:
            right.plot(
                *zip(*points, strict=True),
                "o-",
                color=colour[mode],
                label=f"self-hosted, via gateway{suffix}",
            )
    reference = result["cost"]["reference_price"]
    right.axhline(reference, color="grey", linestyle=":", label=f"reference API ({_money(reference)})")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrent requests")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("output tokens/s")
    left.set_ylim(bottom=0)
    left.set_title("throughput")
    cost = result["cost"]
    right.set_ylabel("cost per 1M output tokens")
    right.set_yscale("log")
    right.set_title(
        f"cost at {_money(cost['hourly_price'])} per {cost['unit']}-hour x {cost['accelerators']}"
    )
    fig.suptitle(f"{result['measured_on']}: profile {result['profile']}, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
