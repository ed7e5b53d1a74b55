"""Real vLLM (CPU) + the real gateway, each stack started once for a run of tests that use it.

A stack fixture (``smollm2``, ``qwen3_5_tiny``, ``qwen3_5_tiny_bare``) starts its stack for the first test
that asks for it and stops it after the last test of an unbroken run of tests that use it, so modules next
to each other share one vLLM start (pytest's module scope would start one per module; session scope would
keep each stack running through every later module). A test marked ``stops_stack`` (it stops its vLLM)
is moved after every other test that uses the same stack.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.config import load_profile
from serve.gateway.keys import KeyPolicy, KeyStore
from serve.modeldir import not_ready_reason
from serve.supervisor import Stack, run_stack

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveStack:
    stack: Stack
    key: str
    keys_db: Path
    adapters_dir: Path | None = None

    @property
    def gateway(self) -> str:
        return self.stack.gateway_url

    @property
    def vllm(self) -> str:
        """vLLM's base URL (``http://localhost`` on its socket: use ``vllm_client()`` to reach it)."""
        return self.stack.vllm_url

    def vllm_client(self, timeout: float = 30) -> httpx.Client:
        """A client that reaches vLLM directly, bypassing the gateway (over its Unix socket)."""
        return self.stack.vllm_client(timeout)

    @property
    def model(self) -> str:
        return self.stack.served_model_name

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}


def new_key(live: LiveStack, name: str, policy: KeyPolicy | None = None, timeout_s: float = 15) -> str:
    """A key of its own for one test (``policy``: unlimited by default), once the gateway's key cache
    accepts it (it refreshes from the database within seconds)."""
    key = KeyStore(live.keys_db).create(name, policy or KeyPolicy())
    deadline = time.monotonic() + timeout_s
    while httpx.get(live.gateway + "/v1/models", headers={"x-api-key": key}).status_code != 200:
        assert time.monotonic() < deadline, f"the gateway did not accept the new key within {timeout_s} s"
        time.sleep(0.2)
    return key


def ledger_row(keys_db: Path, request_id: str, timeout_s: float = 15) -> dict[str, Any]:
    """The ``usage_ledger`` row of ``request_id``, waiting for the gateway's batched writer to insert it."""
    deadline = time.monotonic() + timeout_s
    while True:
        with sqlite3.connect(keys_db, timeout=30) as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute(
                "SELECT * FROM usage_ledger WHERE request_id = ?", (request_id,)
            ).fetchall()
        if rows:
            assert len(rows) == 1, f"{len(rows)} ledger rows for {request_id}"
            return dict(rows[0])
        assert time.monotonic() < deadline, f"no ledger row for {request_id} after {timeout_s} s"
        time.sleep(0.2)


def vllm_metrics(live: LiveStack, *names: str) -> tuple[float, ...]:
    """Each of vLLM's Prometheus metrics ``names`` (e.g. ``vllm:num_requests_running``) summed over its
    label sets, from one scrape of its /metrics (gauges it refreshes once per engine step)."""
    with live.vllm_client() as client:
        text = client.get(live.vllm + "/metrics").text
    sums = []
    for name in names:
        pattern = rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$"
        values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
        assert values, f"{name} not in vLLM's /metrics"
        sums.append(sum(values))
    return tuple(sums)


def vllm_gauge(live: LiveStack, name: str) -> float:
    """Sum of a vLLM Prometheus metric (e.g. ``vllm:num_requests_running``) over its label sets."""
    return vllm_metrics(live, name)[0]


def vllm_requests(live: LiveStack) -> tuple[float, float, float]:
    """vLLM's ``(running, waiting, generation tokens so far)``, from one scrape."""
    running, waiting, tokens = vllm_metrics(
        live, "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:generation_tokens_total"
    )
    return running, waiting, tokens


@dataclass(frozen=True)
class Decoding:
    """What :func:`wait_decoding` saw: the request's tokens at the look that found it decoding, and every
    look as ``(seconds since the first look, seconds the scrape took, running, waiting, tokens)``."""

    tokens: float
    looks: list[tuple[float, float, float, float, float]]

    def describe(self) -> str:
        """The looks, for a failure message."""
        return "; ".join(
            f"+{t:.1f}s (took {took:.1f}s) r={r:.0f} w={w:.0f} tokens={n:.0f}"
            for t, took, r, w, n in self.looks
        )


def wait_decoding(
    live: LiveStack,
    tokens_before: float,
    timeout_s: float = 60,
    meanwhile: Callable[[], object] | None = None,
) -> Decoding:
    """Wait until vLLM has generated tokens since ``tokens_before`` (its ``generation_tokens_total``, taken
    when it was idle): the test's one request decodes. ``meanwhile`` runs between looks (read a stream on).

    Returns:
        The tokens generated since ``tokens_before`` at that look (the request's tokens so far) and every
        look.

    Raises:
        AssertionError: not within ``timeout_s`` seconds, with the readings.
    """
    start = time.monotonic()
    looks: list[tuple[float, float, float, float, float]] = []
    while True:
        before_look = time.monotonic()
        running, waiting, tokens = vllm_requests(live)
        now = time.monotonic()
        looks.append((before_look - start, now - before_look, running, waiting, tokens - tokens_before))
        if tokens > tokens_before:
            return Decoding(tokens - tokens_before, looks)
        assert now - start < timeout_s, (
            f"vLLM never decoded the request within {timeout_s} s; last looks: {looks[-5:]}"
        )
        if meanwhile is not None:
            meanwhile()
        time.sleep(0.1)


def leave_mid_generation(
    live: LiveStack, attempt: Callable[[float], Decoding], max_tokens: int, what: str, attempts: int = 3
) -> tuple[float, Decoding]:
    """Run ``attempt`` (send the one request of ``max_tokens`` with ``ignore_eos``, :func:`wait_decoding`,
    then leave) once vLLM is idle, again while vLLM had already generated all ``max_tokens`` at the first
    look that saw the request decode: then the client could not leave mid-generation and the run says
    nothing about an abort. A CI runner saw 1,900 of 1,900 tokens at that look once; these failures show
    the looks' timings.

    Args:
        attempt: called with vLLM's ``generation_tokens_total`` while idle; returns what it saw.
        what: the request, for messages (``"a stream"``).

    Returns:
        ``(tokens_before, decoding)`` of the attempt whose client left before the end.

    Raises:
        AssertionError: every attempt saw the request only once it had ended.
    """
    seen: list[str] = []
    for _ in range(attempts):
        tokens_before = wait_idle(live, 60, "vLLM was still busy with an earlier request")
        decoding = attempt(tokens_before)
        if decoding.tokens < max_tokens:
            return tokens_before, decoding
        seen.append(decoding.describe())
    raise AssertionError(
        f"in {attempts} attempts the test first saw {what} decode only when vLLM had generated all "
        f"{max_tokens} tokens, so the client never left mid-generation; looks per attempt: {seen}"
    )


def wait_idle(live: LiveStack, timeout_s: float, message: str) -> float:
    """Wait until vLLM runs and queues no request; returns its generation token count then.

    Raises:
        AssertionError: ``message`` and the last readings, when not idle within ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    readings: list[tuple[float, float, float]] = []
    while True:
        running, waiting, tokens = vllm_requests(live)
        readings.append((running, waiting, tokens))
        if running == 0 and waiting == 0:
            return tokens
        assert time.monotonic() < deadline, (
            f"{message} (after {timeout_s} s; last (running, waiting, generation tokens) readings: "
            f"{readings[-5:]})"
        )
        time.sleep(0.2)


def assert_generation_stopped(
    live: LiveStack, tokens_before: float, at_leave: Decoding, max_tokens: int, what: str
) -> None:
    """After the client of the one running request (``ignore_eos``, ``max_tokens``) left: vLLM goes idle
    having generated fewer than ``max_tokens``. Without an abort it generates exactly ``max_tokens``,
    so any shortfall is the abort; how soon it lands depends on the machine (a loaded CI runner let a
    non-streamed request run 1,689 of 1,900 tokens before it), which the failure message shows.

    Args:
        tokens_before: vLLM's ``generation_tokens_total`` when it was idle before the request.
        at_leave: what :func:`wait_decoding` saw before the client left (the request's tokens then).
        what: the request, for the message (``"a non-streamed answer"``).

    Raises:
        AssertionError: vLLM still busy after 90 s, or it generated all ``max_tokens`` (or none).
    """
    left = time.monotonic()
    generated = wait_idle(live, 90, f"vLLM kept generating {what} for a client that left") - tokens_before
    assert 0 < generated < max_tokens, (
        f"vLLM generated {generated:.0f} of {max_tokens} tokens of {what} ({at_leave.tokens:.0f} when the "
        f"client left, idle {time.monotonic() - left:.1f} s later); looks before it left: "
        f"{at_leave.describe()}"
    )


@dataclass(frozen=True)
class Listener:
    """A listening socket held by a process."""

    pid: int
    comm: str
    """The process's name (``VLLM::Worker``...)."""
    kind: str
    """``tcp`` or ``unix``."""
    address: str
    """``ip:port``, or the socket's path (empty for an abstract or unnamed Unix socket)."""


def _tcp_address(hex_address: str, family: socket.AddressFamily) -> str:
    ip, port = hex_address.split(":")
    raw = bytes.fromhex(ip)
    # /proc/net/tcp{,6} print each 32-bit word of the address in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"


def listening_sockets(pgid: int) -> list[Listener]:
    """Every listening TCP and Unix socket held by a process of the process group ``pgid`` (Linux /proc)."""
    owners: dict[str, tuple[int, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            comm = (proc / "comm").read_text().strip()
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owners[target[len("socket:[") : -1]] = (int(proc.name), comm)
        except OSError:  # the process ended while we looked
            continue
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owners:  # 0A: TCP_LISTEN
                found.append(Listener(*owners[fields[9]], "tcp", _tcp_address(fields[1], family)))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000 and fields[6] in owners:  # __SO_ACCEPTCON: listening
            found.append(Listener(*owners[fields[6]], "unix", fields[7] if len(fields) > 7 else ""))
    return found


def start_live_stack(profile: str, tmp: Path, adapters: dict[str, Path] | None = None) -> Iterator[LiveStack]:
    # vLLM on a socket of this module's own (the kit's default is state/run/vllm.sock, shared by every
    # `make up` of the checkout).
    overrides: dict[str, object] = {"vllm.uds": str(tmp / "run" / "vllm.sock")}
    if adapters:
        overrides["vllm.lora_modules"] = {name: str(path) for name, path in adapters.items()}
        # Runtime loading (POST /v1/adapters/load) from the folder the adapters were trained into.
        overrides["adapters_dir"] = str(tmp)
    resolved = load_profile(ROOT, profile, overrides)
    reason = not_ready_reason(resolved)
    assert reason is None, f"{reason} (make test builds the models first)"
    keys_db = tmp / "keys.sqlite"
    key = KeyStore(keys_db).create("integration")
    with run_stack(resolved, keys_db=keys_db, log_dir=tmp / "logs", scratch=tmp / "scratch") as stack:
        yield LiveStack(stack, key, keys_db, tmp if adapters else None)


STACK_FIXTURES = ("smollm2", "qwen3_5_tiny", "qwen3_5_tiny_bare")


@dataclass
class SharedStacks:
    """The stacks running now, by fixture name, and how to stop each."""

    running: dict[str, tuple[LiveStack, Iterator[LiveStack]]] = field(default_factory=dict)
    """Each running stack and the generator that started it (resuming it stops the stack)."""
    failed: dict[str, BaseException] = field(default_factory=dict)
    """A stack that failed to start, so the rest of its run fails at once instead of starting it again."""

    def get(self, name: str, start: Callable[[], Iterator[LiveStack]]) -> LiveStack:
        """The running stack ``name``, started with ``start`` (a generator that yields it once) if none."""
        if name in self.failed:
            raise RuntimeError(f"the {name} stack failed to start for an earlier test") from self.failed[name]
        if name not in self.running:
            starting = start()
            try:
                self.running[name] = (next(starting), starting)
            except BaseException as error:
                self.failed[name] = error
                raise
        return self.running[name][0]

    def stop_unused(self, needed: set[str]) -> None:
        """Stop every running stack whose name is not in ``needed`` (and forget failed starts)."""
        self.failed = {n: e for n, e in self.failed.items() if n in needed}
        for name in [n for n in self.running if n not in needed]:
            _, starting = self.running.pop(name)
            next(starting, None)  # runs the generator's cleanup: the stack stops


_SHARED = pytest.StashKey[SharedStacks]()


def _shared(config: pytest.Config) -> SharedStacks:
    return config.stash.setdefault(_SHARED, SharedStacks())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stops_stack: the test stops its stack's vLLM; it runs after the stack's other users"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move each ``stops_stack`` test after the last other test that uses the same stack."""
    for item in [i for i in items if i.get_closest_marker("stops_stack")]:
        used = set(getattr(item, "fixturenames", ())) & set(STACK_FIXTURES)
        items.remove(item)
        last = max(
            (n for n, other in enumerate(items) if used & set(getattr(other, "fixturenames", ()))),
            default=len(items) - 1,
        )
        items.insert(last + 1, item)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After each test, stop the stacks the next test does not use."""
    if _SHARED in item.config.stash:
        needed = set(getattr(nextitem, "fixturenames", ())) if nextitem is not None else set()
        _shared(item.config).stop_unused(needed)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop whatever still runs (an interrupted or failed session)."""
    if _SHARED in session.config.stash:
        _shared(session.config).stop_unused(set())


@pytest.fixture
def smollm2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveStack:
    return _shared(request.config).get(
        "smollm2", lambda: start_live_stack("cpu-demo", tmp_path_factory.mktemp("smollm2"))
    )


def tiny_adapters(tmp: Path) -> dict[str, Path]:
    """A LoRA trained on the tiny qwen3_5 model (seconds), and a copy renamed to the causal-LM key prefix
    (the trap: vLLM loads it and changes nothing)."""
    from safetensors.torch import load_file, save_file

    from finetune.train import run

    good = tmp / "tiny-lora"
    run(ROOT, "qwen3_5-tiny_lora-cpu", ROOT / "tests" / "fixtures" / "data" / "good.jsonl", good)
    wrong = tmp / "tiny-lora-causal-lm-keys"
    shutil.copytree(good, wrong)
    weights = wrong / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace("model.language_model.", "model."): v for k, v in tensors.items()}, str(weights))
    return {"tiny-lora": good, "tiny-lora-causal-lm-keys": wrong}


def _start_tiny_with_adapters(tmp: Path) -> Iterator[LiveStack]:
    yield from start_live_stack("cpu-qwen3_5-tiny", tmp, tiny_adapters(tmp))


@pytest.fixture
def qwen3_5_tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveStack:
    return _shared(request.config).get(
        "qwen3_5_tiny", lambda: _start_tiny_with_adapters(tmp_path_factory.mktemp("qwen3_5"))
    )


@pytest.fixture
def qwen3_5_tiny_bare(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LiveStack:
    """The tiny qwen3_5 model served as ``qwen3_5_tiny`` serves it (its reasoning and tool-call parsers),
    without the LoRA adapters: for tests of the API surface, which do not need a training run first."""
    return _shared(request.config).get(
        "qwen3_5_tiny_bare",
        lambda: start_live_stack("cpu-qwen3_5-tiny", tmp_path_factory.mktemp("qwen3_5_bare")),
    )
