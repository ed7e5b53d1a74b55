"""`kit start | status | logs | stop` (make start ...): the real stack in the background, one vLLM start.

start returns once vLLM answered and the gateway is ready; status shows it healthy with the model; a real
chat answers through the gateway; stop lets a request in flight finish (the drain), then no process of
the service is left: none of its PIDs, none of its process groups, no vllm_launcher or engine core.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import Stream
from openai.types.chat import ChatCompletionChunk

from serve import processes as procs
from serve import service
from serve.gateway.keys import KeyStore
from serve.supervisor import free_port
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def kit(
    root: Path, env: dict[str, str], *argv: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", "--root", str(root), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def alive(pid: int, start_ticks: int) -> bool:
    info = procs.read_process(pid)
    return info is not None and info.alive and info.start_ticks == start_ticks


def in_groups(pgids: set[int]) -> list[procs.ProcessInfo]:
    infos = (procs.read_process(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [i for i in infos if i is not None and i.alive and i.pgid in pgids]


SHUTDOWN_LINES = ("uvicorn.error: Received SIGTERM", "uvicorn.error: Shutting down")


def sigterm_time(gateway_log: Path) -> float:
    """When the gateway first logged its SIGTERM (seconds since the epoch; its log's timestamps are local
    time, like this process's): the earliest ``Received SIGTERM`` (uvicorn's parent of several workers,
    which handles signals between health checks of its workers, up to 5 s each) or ``Shutting down``
    (a worker, or the one server process)."""
    stamps = [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in gateway_log.read_text().splitlines()
        if any(marker in line for marker in SHUTDOWN_LINES)
    ]
    if not stamps:
        raise AssertionError(f"no {' or '.join(SHUTDOWN_LINES)} line in {gateway_log}")
    return min(stamps)


ARMED_CLI = (
    "import sys, time\n"
    "from serve import cli\n"
    "print('imported', flush=True)\n"
    "delay_s = float(sys.stdin.readline())\n"
    "time.sleep(delay_s)\n"
    "print(f'runs at {time.time():.3f}', flush=True)\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)
"""``python -m serve.cli ARGV`` with its interpreter started and ``serve.cli`` imported ahead of time: it
reads a delay in seconds from its stdin, sleeps it, prints when it runs (``runs at <epoch seconds>``) and
runs ``cli.main(ARGV)``."""


class ArmedCli:
    """A ``kit`` command started ahead (``ARMED_CLI``), armed to run after a delay, its output collected."""

    def __init__(self, root: Path, env: dict[str, str], *argv: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", ARMED_CLI, "--root", str(root), *argv],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        ready = self.process.stdout.readline()
        assert ready == "imported\n", ready + self.process.stdout.read()
        self.armed_at: float | None = None

    def arm(self, delay_s: float) -> None:
        """Let the command run ``delay_s`` seconds from now, whatever this process does meanwhile."""
        assert self.process.stdin is not None
        self.armed_at = time.time()
        self.process.stdin.write(f"{delay_s}\n")
        self.process.stdin.close()

    def output(self, timeout: float) -> tuple[int, list[tuple[float, str]]]:
        """Wait for the command (killed after ``timeout`` seconds); its exit code and each line of its
        output (stdout and stderr) with when this process read it (seconds since the epoch)."""
        assert self.process.stdout is not None
        timer = threading.Timer(timeout, self.process.kill)
        timer.start()
        try:
            lines = [(time.time(), line.rstrip("\n")) for line in self.process.stdout]
            return self.process.wait(), lines
        finally:
            timer.cancel()

    def close(self) -> None:
        """End the command if it never ran or still runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def test_start_status_chat_drain_stop_leaves_nothing(tmp_path):
    # A kit folder of the test's own (configs and models from the checkout): its state/ holds this
    # service's record, logs, key database and vLLM socket, so a service of the checkout is untouched.
    root = tmp_path / "kit"
    root.mkdir()
    for name in ("configs", "models"):
        (root / name).symlink_to(ROOT / name)
    key = KeyStore(root / "state" / "gateway.sqlite").create("service")
    port = free_port(below_ephemeral=True)
    env = {
        **os.environ,
        "KIT_ROOT": str(root),
        "KIT_GATEWAY_PORT": str(port),
        "KIT_GATEWAY_HOST": "127.0.0.1",
        "TMPDIR": str(tmp_path),
        "KIT_GATEWAY_SHUTDOWN_TIMEOUT_S": "180",
    }
    env.pop(procs.SERVICE_ID_ENV, None)
    paths = service.ServicePaths.under(root)
    try:
        started = kit(root, env, "start", "cpu-demo", timeout=900)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "running in the background" in started.stdout and "`make stop` stops both" in started.stdout

        again = kit(root, env, "start", "cpu-demo")
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr

        status = kit(root, env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "running, ready: profile cpu-demo" in status.stdout
        assert "/health 200" in status.stdout and "/readyz 200" in status.stdout
        assert f"models    {MODEL}" in status.stdout and "adapters  (none loaded)" in status.stdout
        assert "GPU       " in status.stdout

        record = service.read_record(paths)
        assert record is not None
        processes = procs.service_processes(record.service_id)
        commands = [" ".join(p.cmdline) for p in processes]
        assert any("serve.vllm_launcher" in c for c in commands), commands
        assert any(c.endswith("serve.cli gateway") for c in commands), commands
        groups = {p.pgid for p in processes}
        assert len(groups) == 3, "supervisor, vLLM and the gateway each lead a process group"
        for process in processes:
            assert f"{process.pid} " in status.stdout

        logs = kit(root, env, "logs", "service", "-n", "20")
        assert logs.returncode == 0 and "ready: models" in logs.stdout

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
        )
        assert "paris" in (reply.choices[0].message.content or "").lower()

        # A request in flight when stop begins is answered in full: the gateway and vLLM drain. It is
        # streamed, so its first chunk proves it runs in vLLM, and sized to ~60 s of this machine's decode
        # speed, measured here from a 64-token stream (14-34 tok/s on a 2-core box, 7 on a loaded CI
        # runner, far more elsewhere), so it still streams after `kit stop` has signalled (its interpreter
        # started ahead: see `stopper` below), and ends within the drain window, set to 180 s for this
        # service. The speed counts tokens, not chunks: vLLM merges several tokens into one
        # chunk whenever its reader falls behind, which a loaded machine makes common (CI once measured
        # 7 "tok/s" from chunks and the sized stream ended before the SIGTERM).
        probe_tokens = 64
        content_at: list[float] = []
        probe_usage = None

        def counting(max_tokens: int, **options: Any) -> Stream[ChatCompletionChunk]:
            """A stream of exactly ``max_tokens`` tokens (``ignore_eos``), usage in its last chunk."""
            return client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Count to one hundred."}],
                max_tokens=max_tokens,
                extra_body={"ignore_eos": True},
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )

        for chunk in counting(probe_tokens):
            if chunk.choices and chunk.choices[0].delta.content:
                content_at.append(time.monotonic())
            probe_usage = chunk.usage or probe_usage
        assert probe_usage is not None and probe_usage.completion_tokens == probe_tokens, probe_usage
        # The first content chunk carries at least one token; the rest came after it.
        decode_rate = (probe_tokens - 1) / max(content_at[-1] - content_at[0], 1e-3)
        tokens = max(probe_tokens, min(1900, int(60 * decode_rate)))
        drained: dict[str, object] = {}
        first_chunk = threading.Event()
        last_chunk_at = [0.0]

        # `kit stop` (debug output on: each step's time), its interpreter started and its modules imported
        # now, armed by the request itself once the gateway has answered its headers (the request is in
        # flight there and in vLLM), to run 3 s later in its own process. CI twice saw the stop come late
        # when this test started it at the request's first chunk (`python -m serve.cli stop` printed its
        # first line 47 s, then 62 s later, right after the request ended; 2-3 s on this machine), the
        # cause not shown: whether the new interpreter or this test process stalled, neither is now
        # between the request and the SIGTERM. If a stop is late again, its lines show which step took
        # the time.
        stopper = ArmedCli(root, env, "-v", "stop")

        def long_request() -> None:
            stream = counting(tokens, timeout=300)
            stopper.arm(3.0)
            for chunk in stream:
                first_chunk.set()
                last_chunk_at[0] = time.time()
                if chunk.choices and chunk.choices[0].finish_reason:
                    drained["finish_reason"] = chunk.choices[0].finish_reason
                if chunk.usage:
                    drained["tokens"] = chunk.usage.completion_tokens

        worker = threading.Thread(target=long_request)
        worker.start()
        try:
            assert first_chunk.wait(60), f"the request never streamed: {drained}"
            code, stop_lines = stopper.output(record.stop_timeout_s + 60)
        finally:
            stopper.close()
        worker.join(240)
        armed_at = stopper.armed_at
        assert armed_at is not None
        stop_output = "\n".join(f"{at - armed_at:+7.1f} s  {line}" for at, line in stop_lines)
        assert code == 0, stop_output
        assert "no process of the service is left" in stop_output
        assert "stop: found the supervisor (running) and" in stop_output, "-v shows the stop's steps"
        assert drained == {"finish_reason": "length", "tokens": tokens}, (
            "the in-flight request was not drained"
        )
        signalled = sigterm_time(paths.log("gateway"))
        gateway_log = paths.log("gateway").read_text()
        # In flight at the SIGTERM, as the gateway saw it: the request's access line (written once its
        # answer ended) comes after the first shutdown line. And as this test saw it: its last chunk
        # arrived after the SIGTERM.
        shutdown_at = min(gateway_log.index(marker) for marker in SHUTDOWN_LINES if marker in gateway_log)
        request_line = gateway_log.rindex('"path": "/v1/chat/completions"')
        assert last_chunk_at[0] > signalled and request_line > shutdown_at, (
            f"the request ({tokens} tokens at {decode_rate:.1f} tok/s) ended "
            f"{signalled - last_chunk_at[0]:.1f} s before the gateway's SIGTERM, which came "
            f"{signalled - armed_at:.1f} s after the stop was armed; the stop printed (seconds after it "
            f"was armed):\n{stop_output}\nservice.log:\n{paths.log('service').read_text()[-3000:]}"
            f"\ngateway.log:\n{gateway_log[-3000:]}"
        )
    finally:
        if paths.record.exists():  # a failure above: stop whatever runs
            kit(root, env, "stop", timeout=300)

    # Nothing of it is left: not by marker, not by PID, not in its process groups, no vLLM launcher or
    # engine core of this kit folder.
    assert procs.service_processes(record.service_id) == []
    assert not any(alive(p.pid, p.start_ticks) for p in processes)
    assert in_groups(groups) == []
    leftovers = subprocess.run(["pgrep", "-af", "vllm_launcher"], capture_output=True, text=True).stdout
    assert str(root) not in leftovers, leftovers
    assert not paths.record.exists()
    assert record.vllm_uds is None or not Path(record.vllm_uds).exists()
    status = kit(root, env, "status")
    assert status.returncode == 3 and "not running" in status.stdout
