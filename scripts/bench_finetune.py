"""Benchmark LoRA training throughput and peak memory (results to bench/finetune-*.json and stdout).

    python scripts/bench_finetune.py                                  # SmolLM2 recipe on this machine
    python scripts/bench_finetune.py --model qwen3_5-tiny --seq-len 512
    python scripts/bench_finetune.py --full-size-qwen3.6 --seq-len 2048 [--no-fast-kernels]   # one GPU

``--full-size-qwen3.6`` builds Qwen3.6-27B's architecture with random bf16 weights from the numbers in
docs/reference.md#qwen36-27b-architecture-configjson (no download) and trains bf16 LoRA with gradient
checkpointing.
``--no-fast-kernels`` hides flash-linear-attention / causal-conv1d so transformers takes its torch
fallback for the Gated DeltaNet layers (it picks the implementation when it is imported).
Timed steps follow warm-up steps; tokens/s counts every input token of the timed steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `serve` when run as a script from anywhere (also on a bare GPU box)

from serve.atomic import write_text_atomic  # noqa: E402  (standard library only)

# Qwen3.6-27B text and vision sizes (docs/reference.md, from the checkpoint's config.json).
QWEN36_TEXT = {
    "hidden_size": 5120,
    "num_hidden_layers": 64,
    "intermediate_size": 17408,
    "vocab_size": 248320,
    "num_attention_heads": 24,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "attn_output_gate": True,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 48,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
}
QWEN36_VISION = {"depth": 27, "hidden_size": 1152, "out_hidden_size": 5120}


def _block_fast_kernels() -> None:
    for name in ("fla", "causal_conv1d"):
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import fla` raise ImportError


def full_size_config():
    """Qwen3.6-27B's architecture as a transformers config (random weights; no download)."""
    import transformers

    text = dict(QWEN36_TEXT)
    text["layer_types"] = text.pop("layer_types") * (text["num_hidden_layers"] // 4)
    return transformers.Qwen3_5Config(text_config=text, vision_config=QWEN36_VISION)


def _full_size_model(device: str):
    import torch
    import transformers
    import yaml

    config = full_size_config()
    with torch.device(device):
        model = transformers.Qwen3_5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    # Read the targets with plain YAML: this path runs on a bare GPU image (torch, transformers, peft,
    # pyyaml) without the kit's own dependencies.
    model_config = yaml.safe_load((ROOT / "configs" / "models" / "qwen3.6-27b.yaml").read_text())
    return model, model_config["lora"]["target_modules"]


def _local_model(name: str, device: str, bf16: bool):
    import torch
    import transformers

    from serve.config import load_model_config

    cfg = load_model_config(ROOT / "configs", name)
    cls = getattr(transformers, cfg.architecture)
    model = cls.from_pretrained(ROOT / cfg.local_dir, dtype=torch.bfloat16 if bf16 else torch.float32).to(
        device
    )
    assert cfg.lora is not None
    return model, cfg.lora.target_modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a configs/models/ name")
    parser.add_argument("--full-size-qwen3.6", dest="full", action="store_true")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 weights (always on with --full-size-qwen3.6)"
    )
    parser.add_argument("--no-fast-kernels", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args(argv)
    if args.no_fast_kernels:
        _block_fast_kernels()
    import torch
    from peft import LoraConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.full:
        model, targets = _full_size_model(device)
        name = "qwen3.6-27b-random"
    else:
        model, targets = _local_model(args.model, device, args.bf16)
        name = args.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets, task_type="CAUSAL_LM")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, min(vocab, 32000), (args.batch, args.seq_len), generator=generator).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            timings.append(time.perf_counter() - start)
    seconds = sum(timings)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    result = {
        "model": name,
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": "bfloat16" if args.full or args.bf16 else "float32",
        "seq_len": args.seq_len,
        "batch": args.batch,
        "lora_r": args.r,
        "fast_kernels": (not args.no_fast_kernels) and importlib.util.find_spec("fla") is not None,
        "timed_steps": args.steps,
        "tokens_per_s": round(args.batch * args.seq_len * args.steps / seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 3),
        "peak_memory_gib": round(peak / 1024**3, 2),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "process max RSS",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-seq{args.seq_len}{'-nofast' if args.no_fast_kernels else ''}"
    write_text_atomic(args.out / f"finetune-{tag}.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(
        f"| {result['model']} | {result['device']} | {result['dtype']} | {args.seq_len} | "
        f"{result['fast_kernels']} | {result['tokens_per_s']} | {result['peak_memory_gib']} GiB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
