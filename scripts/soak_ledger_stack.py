"""What both soaks start (`make soak-ledger`, `make soak-agent`): an upstream model server on a Unix
socket in the soak's work folder, that can be killed and started again (real vLLM for a serve profile,
or the fake of ``soak_ledger_upstream.py``), and the real gateway in front of it (``python -m serve.cli
gateway``, its SQLite key and ledger database in the work folder)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from serve.config import load_profile
from serve.modeldir import not_ready_reason
from serve.supervisor import (
    Child,
    StartupError,
    free_port,
    gateway_env,
    http_client,
    prepare_uds,
    scratch_env,
    start_gateway,
    start_vllm,
    vllm_address,
    wait_gateway_ready,
    wait_vllm_ready,
)

ROOT = Path(__file__).resolve().parents[1]


class Upstream:
    """A model server in its own process group on a Unix socket, that can be killed and started again."""

    kind = ""
    description = ""
    model = ""
    url = "http://localhost"  # on a socket the URL only names the Host header

    def __init__(self, uds: Path) -> None:
        self.uds = uds
        self.child: Child | None = None

    def start(self) -> float:
        """Start it and wait until it answers; returns the seconds taken."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL its whole process group (no graceful anything) and reap it."""
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.process.pid, signal.SIGKILL)
        self.child.process.wait()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


class VllmUpstream(Upstream):
    """Real vLLM for a serve profile, started the way ``make up`` starts it."""

    kind = "vllm"

    def __init__(self, profile: str, workdir: Path, overrides: dict[str, object] | None = None) -> None:
        super().__init__(workdir / "run" / "vllm.sock")
        self.resolved = load_profile(ROOT, profile, {**(overrides or {}), "vllm.uds": str(self.uds)})
        reason = not_ready_reason(self.resolved)
        if reason:
            raise SystemExit(f"error: {reason} (make models builds the CPU models)")
        self.url, _ = vllm_address(self.resolved.profile.vllm)
        self.model = self.resolved.model.served_model_name
        self.description = (
            f"real vLLM, profile {profile} ({self.resolved.profile.hardware}), model {self.model}"
        )
        self.log = workdir / "logs" / "vllm.log"
        self.env = scratch_env(workdir / "scratch")

    def start(self) -> float:
        start = time.monotonic()
        self.child = start_vllm(self.resolved, self.log, self.env)
        wait_vllm_ready(self.child, self.url, self.model, self.resolved.profile.startup_timeout_s, self.uds)
        return time.monotonic() - start


class FakeUpstream(Upstream):
    """``soak_ledger_upstream.py``: vLLM's chat completions with real SSE, no model."""

    kind = "fake"

    def __init__(self, workdir: Path, token_delay_ms: float) -> None:
        super().__init__(workdir / "run" / "fake.sock")
        import soak_ledger_upstream

        self.model = soak_ledger_upstream.MODEL
        self.description = (
            f"fake upstream (scripts/soak_ledger_upstream.py, real SSE, {token_delay_ms} ms/token)"
        )
        self.argv = [
            sys.executable,
            str(Path(__file__).with_name("soak_ledger_upstream.py")),
            "--uds",
            str(self.uds),
            "--token-delay-ms",
            str(token_delay_ms),
        ]
        self.log = workdir / "logs" / "upstream.log"

    def start(self, timeout_s: float = 60) -> float:
        start = time.monotonic()
        prepare_uds(self.uds)
        self.child = Child("fake-upstream", self.argv, dict(os.environ), self.log)
        with http_client(self.uds, timeout=5) as client:
            while time.monotonic() - start < timeout_s:
                self.child.check_alive()
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.url + "/health").status_code == 200:
                        return time.monotonic() - start
                time.sleep(0.05)
        raise StartupError(f"the fake upstream did not answer within {timeout_s:.0f} s; see {self.log}")


def git_commit() -> str | None:
    """HEAD, with ``+dirty`` when tracked files under ``serve/`` differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "serve"], cwd=ROOT, check=False)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode else "")


def start_soak_gateway(
    upstream: Upstream, keys_db: Path, log_path: Path, workers: int = 2, timeout_s: float = 120
) -> tuple[Child, str]:
    """Start the real gateway in front of ``upstream`` on a free loopback port and wait for ``/readyz``;
    returns it and its base URL."""
    port = free_port(below_ephemeral=True)
    env = gateway_env(upstream.url, port, keys_db, [upstream.model], workers, "127.0.0.1", None, upstream.uds)
    gateway = start_gateway(env, log_path)
    url = f"http://127.0.0.1:{port}"
    wait_gateway_ready(gateway, url, timeout_s=timeout_s)
    return gateway, url


def gateway_log_counts(path: Path) -> dict[str, int]:
    """Tracebacks and ledger trouble in a gateway log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return {
        "tracebacks": text.count("Traceback (most recent call last)"),
        "ledger_warnings": sum(1 for line in text.splitlines() if "ledger" in line and "WARNING" in line),
        "ledger_spilled": text.count("could not write"),
    }
