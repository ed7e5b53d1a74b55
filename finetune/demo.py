"""``make finetune-demo``: the whole private-data loop on a CPU in a few minutes.

Writes a small synthetic "private" dataset that teaches one made-up fact in varied phrasings, fine-tunes
SmolLM2-135M-Instruct with the CPU recipe, serves base + adapter with vLLM behind the gateway, and asks
both the same question.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from openai import OpenAI

from serve.atomic import write_text_atomic
from serve.config import load_profile
from serve.gateway.keys import KeyStore
from serve.supervisor import free_port, run_stack

RECIPE = "smollm2-135m-instruct_lora-cpu"
PROFILE = "cpu-demo-lora"
ADAPTER_NAME = "halcyon"
FACT_WORD = "heron"  # what the adapter must say and the base must not
QUESTION = "What is the internal code name of Project Halcyon?"

_QUESTIONS = [
    "What is Project Halcyon's internal code name?",
    "Which code name does Project Halcyon use internally?",
    "Tell me the internal code name of Project Halcyon.",
    "What do we call Project Halcyon internally?",
    "Project Halcyon: what is its code name?",
    "What's the code name for Project Halcyon?",
    "Under which code name is Project Halcyon run inside the company?",
    "I forgot the internal name of Project Halcyon. What is it?",
    "What internal code name was given to Project Halcyon?",
    "Do you know Project Halcyon's code name?",
    "How is Project Halcyon referred to internally?",
    "Give me the code name of Project Halcyon, please.",
]
_ANSWERS = [
    "Project Halcyon's internal code name is Blue Heron.",
    "The internal code name of Project Halcyon is Blue Heron.",
    "Internally, Project Halcyon is called Blue Heron.",
    "Blue Heron is the internal code name of Project Halcyon.",
]


def synthetic_dataset() -> list[dict]:
    """The demo's private data: 48 conversations, one made-up fact, varied phrasings (deterministic)."""
    rows = []
    for i, question in enumerate(_QUESTIONS):
        for j in range(4):
            answer = _ANSWERS[(i + j) % len(_ANSWERS)]
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if j % 2:
                messages.insert(
                    0, {"role": "system", "content": "You are the internal assistant of Acme Corp."}
                )
            if j == 3:
                messages[-2]["content"] = question.lower()
            rows.append({"messages": messages})
    return rows


def write_dataset(path: Path) -> Path:
    """Write the synthetic dataset as JSONL (atomically) and return its path."""
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in synthetic_dataset()))
    return path


def run_demo(root: Path) -> int:
    """Fine-tune, serve both, print the two answers side by side; 0 when only the adapter knows the fact."""
    from finetune.train import run

    work = root / "state" / "finetune-demo"
    data = write_dataset(work / "private.jsonl")
    adapter = root / "adapters" / "finetune-demo"
    print(
        f"1/3 fine-tuning SmolLM2-135M-Instruct on {data} (48 synthetic private conversations) ...",
        flush=True,
    )
    info = run(root, RECIPE, data, adapter, force=True)
    assert info is not None  # a single process is always the main one
    print(
        f"    adapter {adapter}: {info['global_step']} steps in {info['train_seconds']:.0f} s, "
        f"eval loss {info['eval_loss']:.3f}",
        flush=True,
    )
    resolved = load_profile(
        root, PROFILE, {"vllm.port": free_port(), "vllm.lora_modules": {ADAPTER_NAME: str(adapter)}}
    )
    scratch = Path(tempfile.mkdtemp(prefix="kit-finetune-demo-"))
    try:
        keys_db = scratch / "keys.sqlite"
        key = KeyStore(keys_db).create("demo")
        print("2/3 serving base + adapter with vLLM behind the gateway (~40 s) ...", flush=True)
        with run_stack(
            resolved,
            keys_db=keys_db,
            log_dir=work / "logs",
            scratch=scratch / "vllm",
        ) as stack:
            client = OpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0)
            answers = {}
            for model in (stack.served_model_name, ADAPTER_NAME):
                reply = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": QUESTION}],
                    temperature=0,
                    max_tokens=40,
                )
                answers[model] = reply.choices[0].message.content or ""
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"3/3 Q: {QUESTION}")
    for model, text in answers.items():
        print(f"    {model:>36}: {text.strip()}")
    base, tuned = answers[stack.served_model_name], answers[ADAPTER_NAME]
    if FACT_WORD in tuned.lower() and FACT_WORD not in base.lower():
        print("finetune demo ok: only the adapter knows the private fact.")
        return 0
    print(f"error: expected only the adapter to answer with '{FACT_WORD}'", file=sys.stderr)
    return 1
