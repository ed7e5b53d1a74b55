"""`make bench-serve` for real at a tiny size: SmolLM2 on vLLM (CPU) behind the real gateway, vLLM's own
benchmark client at concurrency 1 and 2, through the gateway and direct. Checks that the JSON, the PNG and
the cost table are written and agree with each other and with the gateway's usage ledger. No speed
assertions: throughput on 2 shared cores moves by 2x between runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_serve.py"
PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 16, 8
PRICE, REFERENCE = 2.5, 5.0

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    tmp = tmp_path_factory.mktemp("bench_serve")
    argv = [
        sys.executable, str(SCRIPT), "--profile", "cpu-demo", "--concurrency", "1", "2",
        "--num-prompts", str(PROMPTS), "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
        "--gpu-hourly-price", str(PRICE), "--reference-price", str(REFERENCE),
        "--out-dir", str(tmp / "out"), "--work-dir", str(tmp / "work"), "--no-readme",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return done, tmp


def test_it_runs_and_stops_vllm_and_the_gateway(bench_run):
    done, tmp = bench_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, url in _result(tmp)["urls"].items():
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
            pytest.fail(f"{name} still answers at {url}")


def _result(tmp: Path) -> dict:
    [path] = (tmp / "out").glob("serve-cpu-demo-*.json")
    return json.loads(path.read_text())


def test_json_has_every_run_and_the_counts_agree_with_the_gateway_s_ledger(bench_run):
    done, tmp = bench_run
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(tmp)
    runs = {(r["target"], r["concurrency"]): r for r in result["runs"]}
    assert sorted(runs) == [("direct", 1), ("direct", 2), ("gateway", 1), ("gateway", 2)]
    assert result["problems"] == []
    for (target, concurrency), run in runs.items():
        assert run["thinking"] == "none"
        assert (run["completed"], run["failed"]) == (PROMPTS, 0)
        assert run["total_output_tokens"] == PROMPTS * OUTPUT_LEN  # ignore_eos held through the gateway
        assert run["output_tokens_per_s"] > 0 and run["ttft_p99_ms"] >= run["ttft_p50_ms"] > 0
        assert run["vllm_bench_result"]["max_concurrency"] == concurrency
        flags = run["argv"]
        assert flags[flags.index("--backend") + 1] == "openai-chat"
        assert flags[flags.index("--max-concurrency") + 1] == str(concurrency)
        if target == "gateway":
            # The gateway recorded exactly these requests (by vLLM's request ids) with these tokens.
            assert run["ledger"] == {
                "rows": PROMPTS,
                "completion_tokens": PROMPTS * OUTPUT_LEN,
                "reasoning_tokens": 0,
                "not_ok": 0,
            }
    urls = {target: runs[(target, 1)]["argv"][runs[(target, 1)]["argv"].index("--base-url") + 1]
            for target in ("gateway", "direct")}  # fmt: skip
    assert urls["gateway"] != urls["direct"]
    assert any("no thinking switch" in note for note in result["notes"])
    assert result["measured_on"].startswith("CPU, SmolLM2-135M-Instruct, this machine")


def test_cost_rows_follow_from_the_gateway_runs(bench_run):
    done, tmp = bench_run
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(tmp)
    assert result["cost"]["hourly_price"] == PRICE and result["cost"]["reference_price"] == REFERENCE
    assert (result["cost"]["accelerators"], result["cost"]["unit"]) == (1, "CPU machine")
    gateway = {r["concurrency"]: r for r in result["runs"] if r["target"] == "gateway"}
    direct = {r["concurrency"]: r for r in result["runs"] if r["target"] == "direct"}
    assert [row["concurrency"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        c = row["concurrency"]
        tok_s = gateway[c]["output_tokens_per_s"]
        assert row["cost_per_1m_output"] == pytest.approx(PRICE / (tok_s * 3600) * 1e6)
        assert row["cost_vs_reference"] == pytest.approx(row["cost_per_1m_output"] / REFERENCE)
        assert row["output_tokens_per_s_change_pct"] == pytest.approx(
            (tok_s / direct[c]["output_tokens_per_s"] - 1) * 100
        )
        assert row["ttft_p50_added_ms"] == pytest.approx(gateway[c]["ttft_p50_ms"] - direct[c]["ttft_p50_ms"])
        # The printed table carries the same cost.
        assert f"| {c} | n/a | {tok_s:,.1f} |" in done.stdout
        assert f"{row['cost_per_1m_output']:,.2f} ({row['cost_vs_reference']:.1f}x) | 5.00 |" in done.stdout
    assert result["cost"]["break_even_tokens_per_s"] == pytest.approx(PRICE * 1e6 / (REFERENCE * 3600))


def test_png_is_written(bench_run):
    done, tmp = bench_run
    assert done.returncode == 0, done.stderr[-3000:]
    [png] = (tmp / "out").glob("serve-cpu-demo-*.png")
    assert png.name == _result(tmp)["png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
