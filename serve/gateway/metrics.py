"""Prometheus metrics of one gateway app, in a registry of its own (no process-global state).

With several uvicorn workers, set ``PROMETHEUS_MULTIPROC_DIR`` (``kit gateway`` does): every worker writes
its values there and ``/metrics`` aggregates them (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_TOKEN_TYPES = ("prompt", "completion", "reasoning")
"""The ``type`` label of ``kit_gateway_tokens``, in ``add_usage``'s order."""
# Seconds the gateway spends on a request, streaming included: from first byte in to last byte out.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def observe_all(histogram: Histogram, values: Sequence[float]) -> None:
    """Add ``values`` to one (labelled) histogram as ``observe`` on each would, in one update of the sum
    and one of each bucket that got any.

    In multiprocess mode every update of a value takes a lock, checks the process id (a ``getpid``
    system call) and writes the worker's file; ``observe`` does two per value. prometheus_client has no
    public way to add several observations at once, so this uses the child's ``_sum``, ``_buckets`` and
    ``_upper_bounds`` (prometheus_client ``metrics.py``, ``Histogram.observe``);
    tests/test_gateway_metrics.py checks that the exposition matches ``observe`` one by one.
    """
    if not values:
        return
    bounds = histogram._upper_bounds  # ends with +Inf: every value finds its bucket
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1  # the first bound >= value, as observe picks
    histogram._sum.inc(sum(values))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


class GatewayMetrics:
    """The gateway's counters. Label values are bounded: routes from the allowlist, models that the
    upstream accepted (it answers 404 for any other), key names (created by an admin).

    The per-request figures (requests, latency, in flight, tokens) are gathered in plain dicts and pushed
    into the Prometheus metrics by ``flush`` (every 0.25 s by the app, and before every ``/metrics``
    answer): a Prometheus update costs microseconds in multiprocess mode, times several per request, so
    a flush makes one per label set and bucket (``observe_all``), not one per request.
    """

    def __init__(self) -> None:
        self.in_flight_now = 0
        self._requests: dict[tuple[str, str], int] = {}
        self._latencies: dict[str, list[float]] = {}
        self._tokens: dict[tuple[str, str], list[int]] = {}  # (key, model): [prompt, completion, reasoning]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kit_gateway_requests", "Requests answered", ["route", "status"], registry=r)
        self.latency = Histogram(
            "kit_gateway_request_duration_seconds",
            "Time to the last byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "kit_gateway_requests_in_flight", "Requests being served", registry=r, multiprocess_mode="livesum"
        )
        self.upstream_errors = Counter(
            "kit_gateway_upstream_errors", "Upstream failures by kind", ["kind"], registry=r
        )
        self.client_disconnects = Counter(
            "kit_gateway_client_disconnects", "Streams the client left early (upstream cancelled)", registry=r
        )
        # Per key name (bounded: the keys an admin created), model and type (prompt, completion, reasoning).
        self.tokens = Counter(
            "kit_gateway_tokens", "Tokens reported by the upstream", ["key", "model", "type"], registry=r
        )
        self.rate_limited = Counter(
            "kit_gateway_rate_limited", "Requests refused by a key's limits", ["key", "limit"], registry=r
        )

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request (pushed at the next ``flush``)."""
        key = (route, str(status))
        self._requests[key] = self._requests.get(key, 0) + 1
        latencies = self._latencies.get(route)
        if latencies is None:
            self._latencies[route] = [seconds]
        else:
            latencies.append(seconds)

    def add_usage(self, key: str, model: str, prompt: int, completion: int, reasoning: int) -> None:
        """Count one request's tokens for a key and model (pushed at the next ``flush``)."""
        counts = self._tokens.get((key, model))
        if counts is None:
            self._tokens[(key, model)] = [prompt, completion, reasoning]
        else:
            counts[0] += prompt
            counts[1] += completion
            counts[2] += reasoning

    def flush(self) -> None:
        """Push what was gathered since the last flush into the Prometheus metrics."""
        requests, self._requests = self._requests, {}
        latencies, self._latencies = self._latencies, {}
        tokens, self._tokens = self._tokens, {}
        for (route, status), count in requests.items():
            self.requests.labels(route, status).inc(count)
        for route, values in latencies.items():
            observe_all(self.latency.labels(route), values)
        for (key, model), counts in tokens.items():
            for kind, count in zip(_TOKEN_TYPES, counts, strict=True):
                if count:
                    self.tokens.labels(key, model, kind).inc(count)
        self.in_flight.set(self.in_flight_now)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type; aggregates all workers in multiprocess mode."""
        self.flush()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
