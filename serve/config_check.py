"""The config.json cross-check: the model YAML's ``architecture_numbers`` (what the memory planner works
from before anything is downloaded) against the downloaded checkpoint's ``config.json``, field by field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serve.config import ResolvedProfile
from serve.configfile import ConfigError

# config.json fields compared with architecture_numbers (same names).
_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attn_output_gate",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
    "mamba_ssm_dtype",
    "mtp_num_hidden_layers",
    "max_position_embeddings",
)


def _config_values(config: dict[str, Any]) -> dict[str, Any]:
    """The values of ``config.json`` that :class:`ArchitectureNumbers` holds (text_config first)."""
    text = config.get("text_config") or config
    values: dict[str, Any] = {}
    for name in _CONFIG_FIELDS:
        if name in text:
            values[name] = text[name]
        elif name == "head_dim" and "hidden_size" in text and "num_attention_heads" in text:
            values[name] = text["hidden_size"] // text["num_attention_heads"]
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tie is not None:
        values["tie_word_embeddings"] = tie
    layer_types = text.get("layer_types")
    if isinstance(layer_types, list):
        values["num_full_attention_layers"] = sum(t == "full_attention" for t in layer_types)
        values["num_linear_attention_layers"] = sum(t == "linear_attention" for t in layer_types)
    elif "num_hidden_layers" in text:
        values["num_full_attention_layers"] = text["num_hidden_layers"]
        values["num_linear_attention_layers"] = 0
    quant = config.get("quantization_config") or text.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        values["weight_dtype"] = "fp8"
    else:
        dtype = (
            text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype")
        )
        if dtype is not None:
            values["weight_dtype"] = dtype
    return values


def check_config_json(resolved: ResolvedProfile) -> Path | None:
    """Compare the model YAML's ``architecture_numbers`` with the downloaded ``config.json``.

    Returns:
        The ``config.json`` checked, or None when there is none yet (or no numbers to check).

    Raises:
        ConfigError: a field differs (each one named with both values), or the file is not valid JSON.
    """
    arch = resolved.model.architecture_numbers
    path = resolved.model_dir / "config.json"
    if arch is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: not readable JSON: {exc}"], hint="re-download the model") from None
    yaml_path = f"configs/models/{resolved.model.name}.yaml"
    ours = arch.model_dump()
    problems = [
        f"{yaml_path}: architecture_numbers.{name}: {ours[name]!r}, but {path} says {value!r}"
        for name, value in _config_values(config).items()
        if name in ours and ours[name] is not None and ours[name] != value
    ]
    problems += [
        f"{yaml_path}: architecture_numbers.{name}: {ours[name]!r}, but {path} has no {name}"
        for name in ("linear_num_key_heads", "mamba_ssm_dtype")
        if ours[name] is not None and name not in _config_values(config)
    ]
    if problems:
        raise ConfigError(
            problems,
            hint=f"the numbers in {yaml_path} describe another checkpoint than {resolved.model_dir}: "
            "copy the values from its config.json into architecture_numbers (and its source:), or "
            "download the checkpoint the config names (make download)",
            title="the model config's architecture numbers do not match the downloaded config.json",
        )
    return path
