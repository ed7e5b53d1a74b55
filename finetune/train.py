"""Train a LoRA adapter that vLLM can serve: validate -> load -> train -> save (atomically).

    kit finetune RECIPE --data data/my.jsonl [--output adapters/NAME] [--force]
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m finetune.cli finetune RECIPE --data ...

Everything that can be checked without weights is checked first (``finetune.prepare``): recipe, data
(all problems at once), template, sequence lengths, LoRA targets, the serve profile's LoRA limits. The
base loads through the class vLLM serves (``architecture`` in the model config), so adapter keys match
what vLLM looks up: an adapter trained through ``Qwen3_5ForCausalLM`` would load in vLLM without error
and change nothing (docs/reference.md#lora-on-qwen36-the-key-prefix-trap, vLLM issues 48019 and 49354).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.adapters import ADAPTER_INFO, AdapterError, base_fingerprint, check_keys, unservable_reason
from finetune.encode import Collator, Encoded
from finetune.prepare import Prepared, TrainError, prepare
from finetune.recipe import TrainingArgs, resolved, target_modules
from serve.atomic import promote, write_text_atomic

logger = logging.getLogger(__name__)


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
    eval_history = [
        {"step": entry["step"], "eval_loss": round(entry["eval_loss"], 6)}
        for entry in trainer.state.log_history
        if "eval_loss" in entry
    ]
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
        "eval_history": eval_history,
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
