"""Real vLLM (CPU) + the real gateway, started once per test module."""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serve.config import load_profile
from serve.gateway.keys import KeyStore
from serve.modeldir import not_ready_reason
from serve.supervisor import Stack, run_stack

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LiveStack:
    stack: Stack
    key: str
    keys_db: Path

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


def vllm_gauge(live: LiveStack, name: str) -> float:
    """Sum of a vLLM Prometheus gauge (e.g. ``vllm:num_requests_running``) over its label sets."""
    with live.vllm_client() as client:
        text = client.get(live.vllm + "/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)]
    assert values, f"{name} not in vLLM's /metrics"
    return sum(values)


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
    resolved = load_profile(ROOT, profile, overrides)
    reason = not_ready_reason(resolved)
    assert reason is None, f"{reason} (make test builds the models first)"
    keys_db = tmp / "keys.sqlite"
    key = KeyStore(keys_db).create("integration")
    with run_stack(resolved, keys_db=keys_db, log_dir=tmp / "logs", scratch=tmp / "scratch") as stack:
        yield LiveStack(stack, key, keys_db)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    yield from start_live_stack("cpu-demo", tmp_path_factory.mktemp("smollm2"))


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


@pytest.fixture(scope="module")
def qwen3_5_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    tmp = tmp_path_factory.mktemp("qwen3_5")
    yield from start_live_stack("cpu-qwen3_5-tiny", tmp, tiny_adapters(tmp))


@pytest.fixture(scope="module")
def qwen3_5_tiny_bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    """The tiny qwen3_5 model served as ``qwen3_5_tiny`` serves it (its reasoning and tool-call parsers),
    without the LoRA adapters: for tests of the API surface, which do not need a training run first."""
    yield from start_live_stack("cpu-qwen3_5-tiny", tmp_path_factory.mktemp("qwen3_5_bare"))
