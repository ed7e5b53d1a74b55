"""The gateway's metrics: a flush adds many latencies to the histogram at once (``observe_all``), and
the exposition must be what ``observe`` on each would have made, in-process and in multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serve.gateway.metrics import GatewayMetrics, observe_all

# Bounds hit exactly, between bounds, under the first, past the last (+Inf), and repeated values.
VALUES = [0.0004, 0.005, 0.0051, 0.01, 0.3, 0.3, 0.3, 2.5, 7.0, 599.0, 600.0, 601.0, 10_000.0]


def _exposition(many: bool) -> str:
    registry = CollectorRegistry()
    histogram = Histogram("h", "test", ["route"], buckets=(0.005, 0.01, 0.25, 2.5, 600), registry=registry)
    child = histogram.labels("/v1/chat/completions")
    if many:
        observe_all(child, VALUES)
        observe_all(child, [])
    else:
        for value in VALUES:
            child.observe(value)
    return "\n".join(
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    )


def test_observe_all_makes_the_exposition_observe_one_by_one_makes():
    assert _exposition(many=True) == _exposition(many=False)
    assert 'h_bucket{le="0.005",route="/v1/chat/completions"} 2.0' in _exposition(many=True)


_MULTIPROCESS = """
import sys
from serve.gateway.metrics import GatewayMetrics
from tests.test_gateway_metrics import VALUES
metrics = GatewayMetrics()
for value in VALUES:
    if sys.argv[1] == "many":
        metrics.request_done("/v1/chat/completions", 200, value)
    else:
        metrics.latency.labels("/v1/chat/completions").observe(value)
        metrics.requests.labels("/v1/chat/completions", "200").inc()
print(metrics.render()[0].decode())
"""


def test_a_flush_in_multiprocess_mode_matches_observe_one_by_one(tmp_path: Path):
    """Multiprocess mode (several uvicorn workers) keeps values in files: the aggregated flush must
    write the same sums and bucket counts there."""
    out = {}
    for mode in ("many", "each"):
        folder = tmp_path / mode
        folder.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
        run = subprocess.run(
            [sys.executable, "-c", _MULTIPROCESS, mode], env=env, capture_output=True, text=True, check=True
        )
        out[mode] = sorted(line for line in run.stdout.splitlines() if "request_duration" in line)
    assert out["many"] == out["each"]
    assert any('le="0.005"' in line and line.endswith(" 2.0") for line in out["many"]), out["many"]
    assert any("_count" in line and line.endswith(f" {float(len(VALUES))}") for line in out["many"])


def test_a_flush_pushes_what_was_gathered_once():
    metrics = GatewayMetrics()
    for value in VALUES:
        metrics.request_done("/v1/messages", 200, value)
    metrics.flush()
    metrics.flush()  # nothing new: nothing added twice
    text = generate_latest(metrics.registry).decode()
    assert f'kit_gateway_request_duration_seconds_count{{route="/v1/messages"}} {float(len(VALUES))}' in text
    assert 'kit_gateway_requests_total{route="/v1/messages",status="200"} 13.0' in text


def test_token_counters_add_up_per_key_model_and_type():
    metrics = GatewayMetrics()
    metrics.add_usage("alice", "m", 10, 5, 0)
    metrics.add_usage("alice", "m", 1, 2, 3)
    metrics.add_usage("bob", "m", 4, 0, 0)
    metrics.flush()
    metrics.add_usage("alice", "m", 100, 0, 0)  # after a flush: added to what was pushed
    text = metrics.render()[0].decode()
    assert 'kit_gateway_tokens_total{key="alice",model="m",type="prompt"} 111.0' in text
    assert 'kit_gateway_tokens_total{key="alice",model="m",type="completion"} 7.0' in text
    assert 'kit_gateway_tokens_total{key="alice",model="m",type="reasoning"} 3.0' in text
    assert 'kit_gateway_tokens_total{key="bob",model="m",type="prompt"} 4.0' in text
    assert 'key="bob",model="m",type="completion"' not in text  # no series for a count never seen
