"""Fine-tune recipes (``configs/finetune/*.yaml``): what to train, validated before any weight loads.

Field names are the libraries' own: peft's ``r`` / ``lora_alpha`` / ``lora_dropout`` / ``target_modules``,
transformers ``TrainingArguments``' ``learning_rate``, ``per_device_train_batch_size``... The hardware
topology (DDP, FSDP2, ZeRO-3) lives apart, in ``configs/accelerate/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.adapters import unservable_reason
from serve.config import ModelConfig, load_model_config
from serve.configfile import ConfigError, load_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraArgs(_Strict):
    """peft ``LoraConfig`` fields."""

    r: int = Field(default=16, ge=1, le=512)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: str | list[str] | None = None
    """None takes the model config's ``lora.target_modules``."""

    @field_validator("target_modules")
    @classmethod
    def _servable(cls, targets: str | list[str] | None) -> str | list[str] | None:
        """Module names that are plainly unservable fail here; patterns are matched against the model on
        the meta device before training (``finetune.prepare.check_targets``)."""
        names = [targets] if isinstance(targets, str) else targets or []
        for name in names:
            reason = unservable_reason(name)
            if reason:
                raise ValueError(f"must not include {name!r}: vLLM cannot serve LoRA on {reason}")
        return targets


class QuantizationArgs(_Strict):
    """bitsandbytes 4-bit loading for QLoRA (transformers ``BitsAndBytesConfig`` fields).

    Meant for GPUs; bitsandbytes >= 0.48 also runs it on the CPU, which the tests use on the tiny model.
    """

    load_in_4bit: Literal[True] = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16"] = "bfloat16"


class DataArgs(_Strict):
    """How the JSONL becomes training sequences."""

    max_seq_length: int = Field(default=4096, ge=16)
    """Longer samples are reported by validation, never silently truncated."""
    eval_fraction: float = Field(default=0.05, ge=0, lt=1)
    eval_file: Path | None = None
    """A separate eval JSONL; overrides ``eval_fraction``."""
    seed: int = 0


class TrainingArgs(_Strict):
    """A subset of transformers ``TrainingArguments``, same names and meanings."""

    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(default=1, ge=1)
    per_device_eval_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = Field(default=0, ge=0)
    """Whole steps, or a fraction of all steps when below 1 (transformers v5 semantics)."""
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = Field(default=10, ge=1)
    eval_steps: int = Field(default=50, ge=1)
    save_steps: int = Field(default=50, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    seed: int = 0
    use_cpu: bool = False
    ddp_find_unused_parameters: bool = False
    """Under DDP every LoRA weight gets a gradient each step; True would add a graph walk per step."""


class Recipe(_Strict):
    """One fine-tune recipe."""

    base_model: str
    """A ``configs/models/`` name; training loads the class vLLM serves (``architecture``)."""
    serve_profile: str
    """The ``configs/serve/`` profile the adapter will be served with (its limits are checked)."""
    chat_template: Path | None = None
    """Training template with ``{% generation %}`` markers; None uses the model's own, which must have
    them. Serve the adapter with the same template (``vllm.chat_template``)."""
    lora: LoraArgs = LoraArgs()
    quantization: QuantizationArgs | None = None
    data: DataArgs = DataArgs()
    training: TrainingArgs = TrainingArgs()


def load_recipe(root: Path, name_or_path: str) -> tuple[Recipe, ModelConfig, Path]:
    """Load a recipe by name (``configs/finetune/<name>.yaml``) or path, and its base model config.

    Returns:
        (recipe, base model config, recipe path).

    Raises:
        ConfigError: missing or invalid recipe or model config (all problems, with file and line).
    """
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"} and "/" not in name_or_path:
        path = root / "configs" / "finetune" / f"{name_or_path}.yaml"
    if not path.is_file():
        existing = sorted(p.stem for p in (root / "configs" / "finetune").glob("*.yaml"))
        raise ConfigError([f"{path}: no such recipe"], hint=f"available recipes: {', '.join(existing)}")
    recipe = load_yaml(path, Recipe)
    model = load_model_config(root / "configs", recipe.base_model)
    if recipe.lora.target_modules is None and model.lora is None:
        raise ConfigError([f"{path}:1: lora.target_modules: not set here nor in the model config"])
    return recipe, model, path


def target_modules(recipe: Recipe, model: ModelConfig) -> str | list[str]:
    """The effective peft ``target_modules``."""
    if recipe.lora.target_modules is not None:
        return recipe.lora.target_modules
    assert model.lora is not None
    return model.lora.target_modules


def resolved(recipe: Recipe, extra: dict[str, Any]) -> dict[str, Any]:
    """The recipe as plain data plus ``extra`` facts, for ``resolved_config.yaml`` beside the adapter."""
    data = recipe.model_dump(mode="json")
    data.update(extra)
    return data
