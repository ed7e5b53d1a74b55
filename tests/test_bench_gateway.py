"""`make bench-gateway` end to end at a tiny size (1 round x 0.5 s): the fake upstream, the real gateway,
the JSON it writes and the README table. No speed assertions: performance is a benchmark, not a test."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gateway.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    return importlib.import_module("bench_gateway")


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False


def test_a_tiny_run_writes_every_run_and_the_readme_table_and_stops_its_processes(tmp_path, bench):
    readme = tmp_path / "README.md"
    readme.write_text(f"# kit\n\n{bench.README_START}\nold table\n{bench.README_END}\n\nafter\n")
    # An earlier run of the same day (UTC; tomorrow's too, should the day turn during the run) stays.
    today = datetime.now(UTC)
    earlier = {tmp_path / f"gateway-{(today + timedelta(days=d)).strftime('%Y-%m-%d')}.json" for d in (0, 1)}
    for path in earlier:
        path.write_text("an earlier run\n")
    args = ["--rounds", "1", "--duration", "0.5", "--out-dir", str(tmp_path), "--readme", str(readme)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]

    [out] = set(tmp_path.glob("gateway-*.json")) - earlier
    assert all(path.read_text() == "an earlier run\n" for path in earlier)
    result = json.loads(out.read_text())
    assert result["file"] == out.name == f"gateway-{result['date']}-2.json"
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left
    assert result["config"]["rounds"] == 1 and result["config"]["duration_s"] == 0.5
    assert {"nproc", "cpu_model", "other_cores_before", "other_cores_median"} <= result["machine"].keys()
    assert result["code"]["commit"]
    scenarios = [s.name for s in bench.SCENARIOS]
    assert sorted((r["scenario"], r["target"]) for r in result["runs"]) == sorted(
        (s, t) for s in scenarios for t in ("direct", "gateway")
    )
    for run in result["runs"]:
        assert run["requests"] > 0 and run["errors"] == 0, run
        assert {"loadgen_s", "upstream_s", "gateway_s", "other_s", "other_cores"} <= run["cpu"].keys()
        assert run["total_p50_ms"] <= run["total_p99_ms"]
        assert ("gateway_cpu_ms_per_req" in run) == (run["target"] == "gateway")
    for name, row in result["summary"].items():
        assert {"direct", "gateway", "added", "ratio"} <= row["rps"].keys(), name
        assert row["gateway_cpu_ms_per_req"] is not None
    assert result["summary"]["st_c16"]["first_p50_ms"]["gateway"] is not None  # TTFT through the gateway
    # The key carries every limit the key store understands (and only those).
    assert set(result["config"]["key_limits"]) <= set(bench.GENEROUS_LIMITS)

    table = bench.render_table(result)
    assert table.startswith("| figure | direct | through the gateway | added |\n|---|---|---|---|\n")
    assert len(re.findall(r"^\| ", table, re.M)) == 1 + 7  # the header and seven figures
    assert f"bench/{out.name}" in table
    text = readme.read_text()
    assert f"{bench.README_START}\n{table}\n{bench.README_END}" in text
    assert "old table" not in text and text.endswith("\nafter\n")

    for pgid in map(int, re.findall(r"process group (\d+)", done.stderr)):
        assert not _group_alive(pgid), f"process group {pgid} still runs"


def test_readme_without_markers_is_refused(tmp_path, bench):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(RuntimeError, match="bench-gateway"):
        bench.update_readme(readme, "| table |")


def test_percentiles_are_exact_nearest_rank(bench):
    percentile = importlib.import_module("bench_gateway_loadgen").percentile  # beside bench_gateway
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
