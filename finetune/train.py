"""Train a LoRA adapter that vLLM can serve: parse -> validate -> build -> train -> save (atomically).

    kit finetune RECIPE --data data/my.jsonl [--output adapters/NAME] [--force]
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m finetune.cli RECIPE --data ...

Everything that can be checked without weights is checked first: recipe, data (all problems at once),
template, sequence lengths, the serve profile's LoRA limits. The base loads through the class vLLM serves
(``architecture`` in the model config), so adapter keys match what vLLM looks up: an adapter trained
through ``Qwen3_5ForCausalLM`` would load in vLLM without error and change nothing
(shared/reference/qwen3.6-27b.md, vLLM issues 48019 and 49354).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.adapters import ADAPTER_INFO, AdapterError, base_fingerprint, check_keys, unservable_reason
from finetune.data import DataError, Sample, conversation_key, read_samples, split
from finetune.encode import (
    Collator,
    Encoded,
    encode_checked,
    end_of_turn_ids,
    load_template,
    pad_id_for_training,
)
from finetune.recipe import Recipe, TrainingArgs, load_recipe, resolved, target_modules
from serve.atomic import promote, write_text_atomic
from serve.config import ModelConfig, load_profile
from serve.configfile import ConfigError
from serve.modeldir import not_ready_reason

logger = logging.getLogger(__name__)


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


def _device_map(use_cpu: bool) -> dict[str, int] | None:
    """Where each process loads the base: its own GPU under DDP or a single GPU, else None.

    FSDP and DeepSpeed place (and shard) weights themselves, so they get None, as does the CPU.
    ``accelerate launch`` announces them through ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``,
    the same variables transformers and accelerate read.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if use_cpu or not torch.cuda.is_available():
        return None
    if parse_flag_from_env("ACCELERATE_USE_FSDP") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    return {"": PartialState().local_process_index}


def effective_training(training: TrainingArgs) -> TrainingArgs:
    """The recipe's training arguments adjusted to the launch topology.

    Under ``accelerate launch`` with FSDP activation checkpointing (``fsdp_activation_checkpointing``,
    announced as ``FSDP_ACTIVATION_CHECKPOINTING``), the recipe's ``gradient_checkpointing`` is turned
    off: transformers' Trainer refuses both at once, and would say so only after the weights loaded.
    """
    from accelerate.utils import parse_flag_from_env

    fsdp_ac = parse_flag_from_env("ACCELERATE_USE_FSDP") and parse_flag_from_env(
        "FSDP_ACTIVATION_CHECKPOINTING"
    )
    if training.gradient_checkpointing and fsdp_ac:
        logger.info("FSDP activation checkpointing is on: the recipe's gradient_checkpointing is left to it")
        return training.model_copy(update={"gradient_checkpointing": False})
    return training


def _load_base(prep: Prepared) -> Any:
    """Load the base through the class vLLM serves, in the recipe's dtype (4-bit for QLoRA).

    Call after ``TrainingArguments`` exists: under ``accelerate launch`` that initialises
    torch.distributed, which transformers needs to load FSDP weights on rank 0 only
    (``fsdp_cpu_ram_efficient_loading``) and DeepSpeed ZeRO-3 weights already partitioned.
    """
    import torch
    import transformers

    cls = getattr(transformers, prep.model.architecture, None)
    if cls is None:
        raise TrainError(f"transformers {transformers.__version__} has no class {prep.model.architecture}")
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if prep.recipe.training.bf16 else torch.float32,
        "device_map": _device_map(prep.recipe.training.use_cpu),
    }
    if prep.recipe.quantization is not None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise TrainError(
                "QLoRA (quantization: in the recipe) needs bitsandbytes, which is not installed in this "
                "environment: run `make setup` (the locks include it) or use a LoRA recipe"
            )
        q = prep.recipe.quantization
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.bnb_4bit_compute_dtype),
        )
    try:
        return cls.from_pretrained(prep.base_dir, **kwargs)
    except OSError as exc:  # missing or unreadable weight files in a folder marked complete
        raise TrainError(
            f"cannot load the base from {prep.base_dir}: {exc}; check it with `make download VERIFY=1` "
            "(or rebuild it with `make models`)"
        ) from None


def build_peft_model(prep: Prepared, base: Any) -> Any:
    """Wrap ``base`` with LoRA and refuse targets vLLM cannot serve or must never change.

    Raises:
        TrainError: no module matched, or a matched module is in the vision tower, the MTP head, an
            embedding or the output head.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if prep.recipe.quantization is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=prep.recipe.training.gradient_checkpointing
        )
    config = LoraConfig(
        r=prep.recipe.lora.r,
        lora_alpha=prep.recipe.lora.lora_alpha,
        lora_dropout=prep.recipe.lora.lora_dropout,
        target_modules=target_modules(prep.recipe, prep.model),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, config)
    except ValueError as exc:
        raise TrainError(f"LoRA target_modules matched nothing in {prep.model.architecture}: {exc}") from None
    targeted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    bad = [n for n in targeted if unservable_reason(n)]
    if bad:
        raise TrainError(
            f"target_modules reach modules an adapter must not change: {bad[:3]}...; restrict the "
            "pattern to the language model (e.g. '.*language_model.*')"
        )
    logger.info("LoRA on %d modules; %s", len(targeted), _trainable(model))
    return model


def _trainable(model: Any) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"


class _ListDataset:
    def __init__(self, items: list[Encoded]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Encoded:
        return self.items[index]


_RUN_FILE = "kit-run.json"


def _run_identity(prep: Prepared) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed: the exact token sequences (data,
    template and split) and the model/LoRA set-up. Training hyperparameters may change between tries."""
    digest = hashlib.sha256()
    for enc in [*prep.train, None, *prep.eval]:  # None separates the splits
        digest.update(json.dumps(None if enc is None else [enc.input_ids, enc.labels]).encode())
    return {
        "sequences_sha256": digest.hexdigest(),
        "base_model": prep.model.name,
        "lora": prep.recipe.lora.model_dump(mode="json"),
        "quantization": None if prep.recipe.quantization is None else prep.recipe.quantization.model_dump(),
    }


def _resumable(work: Path, identity: dict[str, Any]) -> bool:
    """Whether ``work`` holds checkpoints of this same run; record the run's identity there.

    Raises:
        TrainError: the checkpoints belong to a run with other data or another LoRA set-up (resuming
            would silently mix the two).
    """
    recorded_path = work / _RUN_FILE
    has_checkpoints = any(work.glob("checkpoint-*"))
    if has_checkpoints and recorded_path.is_file():
        recorded = json.loads(recorded_path.read_text())
        changed = [k for k in identity if recorded.get(k) != identity[k]]
        if changed:
            what = ", ".join("data" if k == "sequences_sha256" else k for k in changed)
            raise TrainError(
                f"{work} holds checkpoints of an interrupted run with different {what}; resuming would mix "
                f"the two. Remove it (rm -r {work}) to start over, or train with the original inputs."
            )
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(recorded_path, json.dumps(identity, indent=2) + "\n")
    return has_checkpoints


def checkpoints_dir(output: Path) -> Path:
    """Where the Trainer keeps resumable checkpoints and TensorBoard logs for ``output``."""
    return output.with_name(output.name + ".checkpoints")


def run(
    root: Path,
    recipe_name: str,
    data: Path,
    output: Path,
    *,
    force: bool = False,
    eval_data: Path | None = None,
) -> dict[str, Any] | None:
    """Train, then write the adapter folder atomically. A crashed run resumes from its last checkpoint.

    Under ``accelerate launch`` every rank calls this; only the main process writes files.

    Returns:
        The adapter's ``kit-adapter.json`` content; None on the other ranks of a multi-process run.

    Raises:
        TrainError, ConfigError, DataError, AdapterError: with messages that say what to do.
    """
    from transformers import Trainer, TrainingArguments

    if output.exists() and not force:
        raise TrainError(
            f"{output} already exists: pass --force (make finetune FORCE=1) to replace it, or "
            "choose another OUTPUT"
        )
    prep = prepare(root, recipe_name, data, eval_data)
    logger.info("data ok: %d train / %d eval sequences", len(prep.train), len(prep.eval))
    for note in prep.notes:
        logger.warning("%s", note)
    t = effective_training(prep.recipe.training)
    work = checkpoints_dir(output)
    resume = _resumable(work, _run_identity(prep))
    # The recipe's `training:` fields are TrainingArguments fields, same names and meanings. They are
    # built before the weights load (see _load_base).
    args = TrainingArguments(
        output_dir=str(work),
        **t.model_dump(),
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        eval_strategy="steps" if prep.eval else "no",
        save_strategy="steps",
        report_to=["tensorboard"],
        disable_tqdm=not sys.stderr.isatty(),  # progress bars on a terminal; plain log lines in files/CI
        remove_unused_columns=False,
        dataloader_pin_memory=False,
    )
    _ = args.device  # initialises torch.distributed under accelerate launch
    model = build_peft_model(prep, _load_base(prep))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(prep.train),
        eval_dataset=_ListDataset(prep.eval) if prep.eval else None,
        data_collator=Collator(prep.pad_id),
    )
    if resume:
        logger.info("resuming from the last checkpoint in %s", work)
    start = time.monotonic()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    eval_loss = trainer.evaluate()["eval_loss"] if prep.eval else None
    info = {
        "base_model": prep.model.name,
        "base_model_name_or_path": prep.model.served_model_name,
        "base_fingerprint": base_fingerprint(prep.base_dir),
        "architecture": prep.model.architecture,
        "recipe": str(prep.recipe_path),
        "data": str(data),
        "data_sha256": prep.data_sha256,
        "train_sequences": len(prep.train),
        "eval_sequences": len(prep.eval),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "train_seconds": round(time.monotonic() - start, 1),
        "resumed": resume,
        "serving": prep.serving,
        "world_size": args.world_size,
    }
    # Every rank takes part in saving (FSDP / ZeRO-3 gather the LoRA weights); only the main process
    # writes files, checks them and moves the finished folder into place.
    staging = output.with_name(output.name + ".partial")
    if trainer.is_world_process_zero() and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_fsdp_enabled:
        # Checkpoints may stay sharded (fast resume), but Trainer.save_model writes nothing for a
        # SHARDED_STATE_DICT: gather in full for the final save (rank 0 CPU RAM, ~52 GiB for
        # the 27B; peft keeps the adapter), as Axolotl does.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return None
    try:
        _finish_adapter_config(staging, prep)
        check_keys(staging, prep.base_dir, fix=False)
        (staging / "chat_template.jinja").write_text(prep.template, encoding="utf-8")
        resolved_config = resolved(prep.recipe, {"data": str(data), "output": str(output)})
        (staging / "resolved_config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        (staging / ADAPTER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        for extra in ("training_args.bin", "README.md"):
            (staging / extra).unlink(missing_ok=True)
        promote(staging, output, replace=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for checkpoint in work.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)  # the adapter is complete; keep only the TensorBoard logs
    logger.info("adapter written to %s (TensorBoard logs in %s)", output, work / "runs")
    return info


def _finish_adapter_config(folder: Path, prep: Prepared) -> None:
    """Name the base by its public id (not this machine's path) in ``adapter_config.json``."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = prep.model.served_model_name
    if config.get("modules_to_save"):
        raise AdapterError("the adapter has modules_to_save, which vLLM cannot serve")
    write_text_atomic(path, json.dumps(config, indent=2) + "\n")
