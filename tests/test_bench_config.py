"""The full-size Qwen3.6-27B architecture that `make bench-finetune` builds on a GPU, checked on the meta
device here (no memory): parameter count and LoRA targets as the real checkpoint has them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
import transformers

from serve.config import load_model_config

ROOT = Path(__file__).resolve().parent.parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_finetune", ROOT / "scripts" / "bench_finetune.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_size_architecture_has_27b_parameters_and_the_config_targets_match():
    config = _bench_module().full_size_config()
    assert config.text_config.layer_types.count("linear_attention") == 48
    assert config.text_config.layer_types.count("full_attention") == 16
    with torch.device("meta"):
        model = transformers.Qwen3_5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    # 51.8 GiB of bf16 in the checkpoint (docs/reference.md) = ~27.8e9 values, ~0.4e9 of them MTP (not built).
    assert 26.5e9 < params < 28.5e9, params
    lora = load_model_config(ROOT / "configs", "qwen3.6-27b").lora
    assert lora is not None and isinstance(lora.target_modules, str)
    pattern = re.compile(lora.target_modules)
    targeted = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)
    ]
    # GDN layers: in_proj_qkv, in_proj_z, out_proj (+3 MLP); attention layers: q, k, v, o (+3 MLP).
    assert len(targeted) == 48 * 6 + 16 * 7
    assert not any(".visual." in n for n in targeted)


def test_the_27b_recipe_validates_data_from_config_and_tokenizer_files_alone(tmp_path):
    # What `make download CONFIG_ONLY=1` leaves: the full-size config and the tokenizer, no weights.
    # validate-data then checks the LoRA targets on the meta device and the data with the 27B recipe's
    # template. (The tokenizer here is the tiny model's, which has the same special tokens.)
    import json
    import shutil
    import subprocess
    import sys

    root = tmp_path / "kit"
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "scripts" / "assets", root / "scripts" / "assets")
    local = root / "models" / "qwen3.6-27b"
    local.mkdir(parents=True)
    full = _bench_module().full_size_config()
    full.architectures = ["Qwen3_5ForConditionalGeneration"]
    full.save_pretrained(local)
    tiny = ROOT / "models" / "qwen3_5-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, local / name)
    data = tmp_path / "data.jsonl"
    good = ROOT / "tests" / "fixtures" / "data" / "good.jsonl"
    data.write_text(good.read_text())
    kit = [sys.executable, "-m", "finetune.cli", "--root", str(root)]
    result = subprocess.run(
        [*kit, "validate-data", "qwen3.6-27b_lora", "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ") and "assistant tokens carry the loss" in result.stdout
    assert json.loads((local / "config.json").read_text())["text_config"]["num_hidden_layers"] == 64
