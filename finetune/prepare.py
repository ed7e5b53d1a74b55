"""Everything a fine-tune checks before any weight loads: recipe, profile limits, LoRA targets (on the meta
device), both data files (all problems at once), template and tokenised sequences.

``make validate-data`` runs only this; ``make finetune`` runs it first. It needs the base's config and
tokenizer files, not its weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.adapters import unservable_reason
from finetune.data import DataError, Sample, conversation_key, read_samples, split
from finetune.encode import Encoded, encode_checked, end_of_turn_ids, load_template, pad_id_for_training
from finetune.recipe import Recipe, load_recipe, target_modules
from serve.config import ModelConfig, load_profile
from serve.configfile import ConfigError
from serve.modeldir import not_ready_reason


class TrainError(Exception):
    """A fine-tune that cannot start or finish; the message says what to do."""


@dataclass
class Prepared:
    """Everything validated before any weight loads."""

    recipe: Recipe
    recipe_path: Path
    model: ModelConfig
    base_dir: Path
    tokenizer: Any
    template: str
    train: list[Encoded]
    eval: list[Encoded]
    pad_id: int
    data_sha256: str
    max_lora_rank: int | None
    serving: dict[str, Any]
    """How the adapter should be called, recorded in ``kit-adapter.json`` (``serving``) and applied by the
    gateway under ``kit up``: ``{"chat_template_kwargs": {"enable_thinking": False}}`` when a thinking
    template trained answers without reasoning (non-thinking mode)."""
    notes: list[str]
    """Things the operator should know that do not stop training."""


def thinking_decision(samples: list[Sample], template: str) -> tuple[dict[str, Any], list[str]]:
    """Whether the adapter is a thinking or a non-thinking one, and notes about reasoning the template drops.

    With a template that has ``enable_thinking`` (Qwen3.6), a final answer without ``reasoning_content``
    renders the empty ``<think></think>`` into the prompt, as ``enable_thinking: false`` does when
    serving; so data without any reasoning trains the non-thinking mode, and the adapter must be called
    with thinking off. Reasoning on turns before the last user message is dropped by the template (as
    the stock Qwen3.6 template does when serving, unless ``preserve_thinking``).

    Returns:
        ``(serving defaults, notes)``.
    """
    if "enable_thinking" not in template:
        return {}, []
    final = sum(1 for s in samples if s.messages[-1].get("reasoning_content"))
    notes = []
    earlier = 0
    for sample in samples:
        last_user = max(i for i, m in enumerate(sample.messages) if m["role"] == "user")
        earlier += any(m.get("reasoning_content") for m in sample.messages[:last_user])
    if earlier:
        notes.append(
            f"{earlier} conversations have reasoning_content on assistant turns before the last user "
            "message; the template drops it there (as the stock Qwen3.6 template does when serving), so "
            "those turns train without their thinking"
        )
    if final == 0:
        notes.append(
            "no final answer has reasoning_content: this trains the non-thinking mode; the adapter is "
            'recorded to be called with chat_template_kwargs {"enable_thinking": false} (kit up applies it)'
        )
        return {"chat_template_kwargs": {"enable_thinking": False}}, notes
    if final < len(samples):
        notes.append(
            f"{final} of {len(samples)} final answers have reasoning_content: the others train the "
            "non-thinking mode; the adapter is served with thinking on (the default)"
        )
    return {}, notes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(
    root: Path, recipe_name: str, data: Path, eval_data: Path | None = None, *, need_weights: bool = True
) -> Prepared:
    """Validate recipe, base model folder, LoRA targets, data and template; tokenize everything.

    Args:
        need_weights: False for ``validate-data``: the base's config and tokenizer files suffice, so data
            can be checked before a 52 GiB download finishes.

    Raises:
        ConfigError: recipe, model or profile problems, LoRA targets vLLM cannot serve.
        DataError: every data problem of the train and eval files at once (file:line), including
            over-long samples and train/eval overlap.
        TrainError: the base model is not on disk, or the adapter would exceed the profile's limits.
    """
    from transformers import AutoTokenizer, GenerationConfig

    recipe, model, recipe_path = load_recipe(root, recipe_name)
    profile = load_profile(root, recipe.serve_profile)
    if profile.model.name != model.name:
        raise ConfigError(
            [
                f"{recipe_path}: serve_profile {recipe.serve_profile!r} serves {profile.model.name}, "
                f"not the recipe's base_model {model.name}"
            ]
        )
    if need_weights:
        reason = not_ready_reason(profile)
        if reason:
            raise TrainError(reason)
    else:
        missing = [f for f in _CONFIG_FILES if not (profile.model_dir / f).is_file()]
        if missing:
            fix = (
                f"`make download MODEL={model.name} CONFIG_ONLY=1` (a few MB, no weights)"
                if model.source == "hub"
                else "`make models`"
            )
            raise TrainError(
                f"{profile.model_dir / missing[0]} not found: checking data needs the base's config and "
                f"tokenizer files; fetch them with {fix}"
            )
    max_rank = profile.profile.vllm.max_lora_rank
    if max_rank is not None and recipe.lora.r > max_rank:
        raise ConfigError(
            [
                f"{recipe_path}: lora.r {recipe.lora.r} exceeds max_lora_rank {max_rank} of serve "
                f"profile {recipe.serve_profile}; vLLM would refuse the adapter"
            ]
        )
    target_problems = check_targets(model, profile.model_dir, target_modules(recipe, model))
    if target_problems:
        raise ConfigError([f"{recipe_path}: lora.target_modules: {p}" for p in target_problems])
    template_path = recipe.chat_template
    if template_path is not None and not template_path.is_absolute():
        template_path = root / template_path
    if template_path is not None and not template_path.is_file():
        raise ConfigError([f"{recipe_path}: chat_template: {template_path} not found"])

    problems: list[str] = []
    train_samples, found = _read(data)
    problems += found
    eval_path = eval_data or recipe.data.eval_file
    eval_samples: list[Sample] = []
    if eval_path is not None:
        eval_samples, found = _read(eval_path)
        problems += found + _overlap(train_samples, data, eval_samples, eval_path)
    elif train_samples:
        train_samples, eval_samples = split(train_samples, recipe.data.eval_fraction, recipe.data.seed)
    tokenizer = AutoTokenizer.from_pretrained(profile.model_dir)
    template = load_template(template_path, tokenizer)
    end_ids = end_of_turn_ids(tokenizer, GenerationConfig.from_pretrained(profile.model_dir).eos_token_id)
    encoded: dict[str, list[Encoded]] = {}
    for name, group, path in (("train", train_samples, data), ("eval", eval_samples, eval_path or data)):
        encoded[name], found = encode_checked(
            group, tokenizer, template, recipe.data.max_seq_length, path, end_ids
        )
        problems += found
    if problems:
        files = f"DATA={data}" + (f" EVAL_DATA={eval_path}" if eval_path is not None else "")
        raise DataError(
            problems,
            data,
            f"Fix these lines and run `make validate-data {files}` again; nothing was trained.",
        )
    return Prepared(
        recipe,
        recipe_path,
        model,
        profile.model_dir,
        tokenizer,
        template,
        encoded["train"],
        encoded["eval"],
        pad_id_for_training(tokenizer, end_ids),
        _sha256(data),
        max_rank,
        *thinking_decision(train_samples, template),
    )


# What validate-data needs of the base: AutoConfig, AutoTokenizer, GenerationConfig.
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")


def _read(path: Path) -> tuple[list[Sample], list[str]]:
    try:
        return read_samples(path)
    except DataError as exc:  # missing, unreadable or empty file
        return [], exc.problems


def _overlap(train: list[Sample], train_path: Path, evals: list[Sample], eval_path: Path) -> list[str]:
    """Eval conversations that are also training conversations (the eval loss would flatter the model)."""
    first = {conversation_key(s): s.line for s in train}
    return [
        f"{eval_path}:{s.line}: the same conversation as {train_path}:{first[key]}; train and eval "
        "must not share conversations"
        for s in evals
        if (key := conversation_key(s)) in first
    ]


def check_targets(model: ModelConfig, model_dir: Path, targets: str | list[str]) -> list[str]:
    """Match peft ``target_modules`` against the served class built on the meta device (no memory, no
    weights: well under a second for the 27B), so a bad pattern fails before minutes of loading.

    Returns:
        Problems: no module matched, or matched modules vLLM cannot serve (:func:`unservable_reason`).
    """
    import torch
    import transformers
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    cls = getattr(transformers, model.architecture, None)
    if cls is None:
        return [f"transformers {transformers.__version__} has no class {model.architecture}"]
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = cls._from_config(config)
    lora = LoraConfig(target_modules=targets)
    matched = [n for n, _ in skeleton.named_modules() if n and check_target_module_exists(lora, n)]
    if not matched:
        return [f"{targets!r} matches no module of {model.architecture}"]
    bad = [(n, r) for n in matched if (r := unservable_reason(n))]
    if bad:
        return [
            f"{targets!r} reaches {bad[0][1]} ({bad[0][0]} and {len(bad) - 1} more); restrict the pattern "
            "to the language model (e.g. '.*language_model.*\\.(q_proj|...)')"
        ]
    return []
