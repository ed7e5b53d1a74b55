"""Merge a LoRA adapter into its base: one checkpoint vLLM serves without ``--enable-lora``.

What a plain ``merge_and_unload`` + ``save_pretrained`` loses, and this puts back or checks:
- ``mtp.*`` tensors: transformers drops them on load, so they are copied from the base (else MTP
  speculative decoding breaks; docs/reference.md#lora-on-qwen36-the-key-prefix-trap);
- the padded vocabulary: embedding and output shapes must equal the base's (some merge paths shrink them
  to the tokenizer's size);
- tokenizer, generation and preprocessor configs: copied from the base; the chat template is the one
  the adapter was trained with (``chat_template.jinja`` in the adapter folder), else the base's;
- the base dtype, and a size within a few percent of the base.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from finetune.adapters import ADAPTER_INFO, AdapterError, base_fingerprint
from serve.atomic import atomic_dir
from serve.buildinfo import MANIFEST as BUILD_MANIFEST
from serve.config import ModelConfig, load_model_config
from serve.modeldir import model_not_ready_reason

logger = logging.getLogger(__name__)

SIZE_TOLERANCE = 0.05  # merged / base size may differ by this fraction (LoRA adds nothing once merged)
_MTP_FILE = "model-mtp.safetensors"
_CARRIED = ("*.json", "*.jinja", "*.txt", "*.model")
_NOT_CARRIED = {"model.safetensors.index.json", "config.json", "kit-build.json", "kit-download.json"}


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _mtp_tensors(base_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                if name.startswith("mtp."):
                    out[name] = handle.get_tensor(name)
    return out


def _add_mtp(staging: Path, mtp: dict[str, Any]) -> None:
    """Write the base's MTP tensors beside the merged weights and list them in the index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file(mtp, str(staging / _MTP_FILE), metadata={"format": "pt"})
    index_path = staging / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
    else:
        weight_map: dict[str, str] = {}
        for shard in sorted(staging.glob("*.safetensors")):
            if shard.name == _MTP_FILE:
                continue
            with safe_open(str(shard), framework="pt") as handle:
                weight_map.update({k: shard.name for k in handle.keys()})  # noqa: SIM118
        index = {"metadata": {}, "weight_map": weight_map}
    index["weight_map"].update({k: _MTP_FILE for k in mtp})
    index["metadata"]["total_size"] = _weights_bytes(staging)
    index_path.write_text(json.dumps(index, indent=2) + "\n")


def check_base(root: Path, adapter_dir: Path) -> tuple[ModelConfig, Path]:
    """The base ``adapter_dir`` was trained on, checked before any weight loads (as training and
    ``check-adapter`` do): complete on disk, and the very weights the adapter was trained on.

    Args:
        root: the kit folder holding ``configs/``.
        adapter_dir: an adapter written by ``make finetune`` (it has ``kit-adapter.json``).

    Returns:
        The base's model config and its folder.

    Raises:
        AdapterError: no or unreadable ``kit-adapter.json``; the base folder is not a verified download
            or a complete build (the message names the command that fixes it); its base fingerprint
            differs from the one the adapter recorded.
        ConfigError: the recorded base model has no valid model config.
    """
    info_path = adapter_dir / ADAPTER_INFO
    if not info_path.is_file():
        raise AdapterError(f"{info_path} not found: merge needs an adapter trained by `make finetune`")
    try:
        info = json.loads(info_path.read_text())
        base_model, recorded = info["base_model"], info["base_fingerprint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(
            f"{info_path} is unreadable or lacks base_model / base_fingerprint ({exc!r}): merge needs the "
            "kit-adapter.json that `make finetune` writes; retrain the adapter with `make finetune`"
        ) from None
    model_cfg = load_model_config(root / "configs", base_model)
    base_dir = model_cfg.local_dir if model_cfg.local_dir.is_absolute() else root / model_cfg.local_dir
    reason = model_not_ready_reason(model_cfg, base_dir)
    if reason:
        raise AdapterError(f"cannot merge {adapter_dir} into its base {model_cfg.name}: {reason}")
    actual = base_fingerprint(base_dir)
    if recorded != actual:
        raise AdapterError(
            f"{adapter_dir} was trained on other weights than {base_dir} holds (base fingerprint "
            f"{str(recorded)[:12]}... in {info_path}, {actual[:12]}... on disk): merging would bake the "
            f"adapter into a model it never saw. Put back the base it was trained on (`make check-adapter "
            f"ADAPTER={adapter_dir}` shows the same check), or retrain it on this base with `make finetune`"
        )
    return model_cfg, base_dir


def merge(root: Path, adapter_dir: Path, output: Path, *, force: bool = False) -> dict[str, Any]:
    """Merge ``adapter_dir`` into its base and write ``output`` atomically.

    The base is checked first (:func:`check_base`): nothing loads when it is incomplete or not the one
    the adapter was trained on.

    Args:
        root: the kit folder holding ``configs/``.
        adapter_dir: an adapter written by ``make finetune``.
        output: the merged model folder to write.
        force: replace ``output`` if it exists.

    Returns:
        Facts about the merge (shapes, sizes, mtp tensors carried), also saved as ``kit-merge.json``.

    Raises:
        AdapterError: the base is missing, incomplete or other weights (:func:`check_base`), or the shape
            or size checks failed (nothing is written then).
        ConfigError: the recorded base model has no valid model config.
        FileExistsError: ``output`` exists and ``force`` is False.
    """
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists: pass --force (FORCE=1) to replace it")
    model_cfg, base_dir = check_base(root, adapter_dir)
    import torch
    import transformers
    from peft import PeftModel

    config = json.loads((base_dir / "config.json").read_text())
    dtype = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    cls = getattr(transformers, model_cfg.architecture)
    base = cls.from_pretrained(base_dir, dtype=dtype)
    embed_shape = tuple(base.get_input_embeddings().weight.shape)
    head_shape = tuple(base.get_output_embeddings().weight.shape)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if tuple(merged.get_input_embeddings().weight.shape) != embed_shape:
        raise AdapterError(
            f"merged embedding shape {tuple(merged.get_input_embeddings().weight.shape)} != base "
            f"{embed_shape}: the padded vocabulary must be kept"
        )
    mtp = _mtp_tensors(base_dir)
    base_bytes = _weights_bytes(base_dir)
    with atomic_dir(output, replace=force) as staging:
        merged.save_pretrained(staging)
        if mtp:
            _add_mtp(staging, mtp)
        # The template the adapter was trained with (what `h200-lora` serves adapters with) goes with
        # the merged weights, so the merged model sees the prompts it learned on.
        trained_template = adapter_dir / "chat_template.jinja"
        if trained_template.is_file():
            shutil.copy2(trained_template, staging / "chat_template.jinja")
        for pattern in _CARRIED:
            for path in base_dir.glob(pattern):
                if path.name not in _NOT_CARRIED and not (staging / path.name).exists():
                    shutil.copy2(path, staging / path.name)
        merged_bytes = _weights_bytes(staging)
        ratio = merged_bytes / base_bytes
        if abs(ratio - 1) > SIZE_TOLERANCE:
            raise AdapterError(
                f"merged weights are {merged_bytes:,} bytes vs base {base_bytes:,} ({ratio:.3f}x): "
                "dtype or vocabulary changed"
            )
        facts = {
            "base_model": model_cfg.name,
            "adapter": str(adapter_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "embedding_shape": list(embed_shape),
            "lm_head_shape": list(head_shape),
            "mtp_tensors": len(mtp),
            "base_bytes": base_bytes,
            "merged_bytes": merged_bytes,
        }
        (staging / "kit-merge.json").write_text(json.dumps(facts, indent=2) + "\n")
        # Marks the folder complete for `make serve` (a model config with source: build can point at it).
        (staging / BUILD_MANIFEST).write_text(json.dumps({"builder": "merge", **facts}, indent=2) + "\n")
    logger.info("merged %s into %s (%d mtp tensors carried)", adapter_dir, output, len(mtp))
    return facts
