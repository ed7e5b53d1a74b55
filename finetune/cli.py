"""``kit``, the console script: serve's verbs plus the fine-tune verbs (finetune, validate-data,
check-adapter, merge, finetune-demo).

The composition lives here, not in ``serve.cli``, so that serving never imports fine-tuning: this module
builds serve's parser, adds its verbs and lets ``kit validate`` load the recipes too. Run it as ``kit``
or ``python -m finetune.cli`` (what ``make finetune ACCELERATE=...`` launches on every rank).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune.recipe import load_recipe
from serve import cli as serve_cli
from serve.config import load_profile

DEFAULT_RECIPE = "smollm2-135m-instruct_lora-cpu"


def _fail(exc: Exception, code: int) -> int:
    text = str(exc)
    print(f"error:\n{text}" if "\n" in text else f"error: {text}", file=sys.stderr)
    return code


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a LoRA adapter from a JSONL of chat conversations (recipe from configs/finetune/)."""
    from finetune.adapters import AdapterError
    from finetune.data import DataError
    from finetune.train import TrainError, run

    output = args.output or args.root / "adapters" / args.data.stem
    if os.environ.get("RANK", "0") != "0":
        # Under `accelerate launch` every rank runs this; only the main one talks (as transformers'
        # own log_level_replica does), so each line appears once.
        import transformers

        logging.getLogger().setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
    try:
        info = run(args.root, args.recipe, args.data, output, force=args.force, eval_data=args.eval_data)
    except DataError as exc:
        return _fail(exc, 2)
    except (TrainError, AdapterError) as exc:
        return _fail(exc, 1)
    if info is None:  # another rank of a multi-process run; the main process reports
        return 0
    eval_loss = "n/a (no eval split)" if info["eval_loss"] is None else f"{info['eval_loss']:.4f}"
    print(
        f"adapter: {output}  (steps {info['global_step']}, train loss {info['train_loss']:.4f}, "
        f"eval loss {eval_loss})"
    )
    profile = yaml.safe_load((output / "resolved_config.yaml").read_text())["serve_profile"]
    print(
        f"next: make check-adapter ADAPTER={output}, then make up PROFILE={profile} "
        f'ADAPTERS="{output.name}={output}" and call model "{output.name}"'
    )
    return 0


def cmd_validate_data(args: argparse.Namespace) -> int:
    """Check a JSONL against a recipe (structure, template, lengths) without loading any weights."""
    from finetune.data import DataError
    from finetune.prepare import TrainError, prepare

    try:
        prep = prepare(args.root, args.recipe, args.data, args.eval_data, need_weights=False)
    except DataError as exc:
        return _fail(exc, 2)
    except TrainError as exc:
        return _fail(exc, 1)
    lengths = [len(e.input_ids) for e in prep.train + prep.eval]
    trained = sum(sum(1 for x in e.labels if x != -100) for e in prep.train)
    print(
        f"ok: {len(prep.train)} train / {len(prep.eval)} eval conversations; tokens per sequence "
        f"{min(lengths)}-{max(lengths)} (max_seq_length {prep.recipe.data.max_seq_length}); "
        f"{trained} assistant tokens carry the loss"
    )
    for note in prep.notes:
        print(f"note: {note}")
    return 0


def cmd_check_adapter(args: argparse.Namespace) -> int:
    """Check an adapter against the serve profile it will run under: rank, modules, key names, base."""
    from serve.adapters import check_adapter

    profile_name = args.profile
    if profile_name is None:
        resolved_config = args.adapter / "resolved_config.yaml"
        if not resolved_config.is_file():
            print(
                f"error: {resolved_config} not found: say which serve profile with --profile", file=sys.stderr
            )
            return 2
        profile_name = yaml.safe_load(resolved_config.read_text())["serve_profile"]
    profile = load_profile(args.root, profile_name)
    report = check_adapter(
        args.adapter,
        profile.model_dir,
        profile.model.served_model_name,
        profile.profile.vllm.max_lora_rank,
        fix=args.fix,
    )
    for line in report.passed:
        print(f"ok: {line}")
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        for problem in report.problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 1
    print(
        f"{args.adapter} can be served by profile {profile_name}; in vLLM: --enable-lora --lora-modules "
        f'NAME={args.adapter} (make up PROFILE={profile_name} ADAPTERS="NAME={args.adapter}")'
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base (base dtype, padded vocab and mtp.* kept) into a new folder."""
    from finetune.adapters import AdapterError
    from finetune.merge import merge

    output = args.output or args.adapter.with_name(args.adapter.name + "-merged")
    try:
        facts = merge(args.root, args.adapter, output, force=args.force)
    except (AdapterError, FileExistsError) as exc:
        return _fail(exc, 1)
    print(
        f"merged: {output} ({facts['merged_bytes'] / 1e6:.1f} MB, {facts['dtype']}, "
        f"{facts['mtp_tensors']} mtp tensors carried)"
    )
    return 0


def cmd_finetune_demo(args: argparse.Namespace) -> int:
    """Fine-tune SmolLM2 on a synthetic private fact, serve base + adapter, compare their answers."""
    from finetune.demo import run_demo

    return run_demo(args.root)


def add_verbs(verb: Callable[[str, Any], argparse.ArgumentParser]) -> None:
    """Register the fine-tune verbs on ``kit``'s parser (``verb(name, function)`` adds a sub-command)."""
    sub = verb("finetune", cmd_finetune)
    sub.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help="configs/finetune/ name or a path")
    sub.add_argument("--data", type=Path, required=True, help="JSONL of {'messages': [...]} lines")
    sub.add_argument("--eval-data", type=Path, help="separate eval JSONL (else a split of --data)")
    sub.add_argument("--output", type=Path, help="adapter folder (default adapters/<data file stem>)")
    sub.add_argument("--force", action="store_true", help="replace an existing adapter folder")
    sub = verb("validate-data", cmd_validate_data)
    sub.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE)
    sub.add_argument("--data", type=Path, required=True)
    sub.add_argument("--eval-data", type=Path)
    sub = verb("check-adapter", cmd_check_adapter)
    sub.add_argument("adapter", type=Path)
    sub.add_argument("--profile", help="the serve profile it will run under (default: its recipe's)")
    sub.add_argument("--fix", action="store_true", help="rewrite causal-LM key names to the served class's")
    sub = verb("merge", cmd_merge)
    sub.add_argument("adapter", type=Path)
    sub.add_argument("--output", type=Path)
    sub.add_argument("--force", action="store_true")
    verb("finetune-demo", cmd_finetune_demo)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``kit`` parser: serve's verbs, the fine-tune verbs, and recipes in ``kit validate``.

    Returns:
        The parser; ``args.func(args)`` runs the chosen verb.
    """
    recipes = serve_cli.ConfigKind(folder="finetune", noun="recipes", load=load_recipe)
    return serve_cli.build_parser(add_verbs=add_verbs, validate_also=[recipes])


def main(argv: list[str] | None = None) -> int:
    """The ``kit`` console script: run one verb of the full parser (see ``serve.cli.main``).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    return serve_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
