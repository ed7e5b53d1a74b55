"""LoRA on the tiny Qwen3.6-architecture model: keys vLLM will use, refusals, resume, merge (CPU, seconds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.merge import merge
from finetune.recipe import Recipe
from finetune.train import run
from serve.adapters import ADAPTER_WEIGHTS, AdapterError, check_adapter

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "qwen3_5-tiny"
GOOD = ROOT / "tests" / "fixtures" / "data" / "good.jsonl"
BAD = ROOT / "tests" / "fixtures" / "data" / "bad.jsonl"
RECIPE = "qwen3_5-tiny_lora-cpu"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "tiny-adapter"
    info = run(ROOT, RECIPE, GOOD, out)
    assert info is not None and info["global_step"] == 6
    return out


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        return list(handle.keys())


def test_adapter_keys_use_the_served_class_s_names_and_skip_vision_and_mtp(adapter):
    keys = _keys(adapter)
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert {"q_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "down_proj"} <= modules
    assert not any(".visual." in k or "mtp." in k or "embed" in k or "lm_head" in k for k in keys)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "kit/qwen3_5-tiny" and config["r"] == 8
    assert (adapter / "resolved_config.yaml").is_file() and (adapter / "chat_template.jinja").is_file()
    info = json.loads((adapter / "kit-adapter.json").read_text())
    assert info["eval_loss"] is not None
    assert [e["step"] for e in info["eval_history"]] == [2, 4, 6], "eval loss every eval_steps"
    assert list(adapter.parent.glob("tiny-adapter.checkpoints/runs/*/events.out.tfevents.*")), "TensorBoard"
    assert not list(adapter.parent.glob("tiny-adapter.checkpoints/checkpoint-*")), "checkpoints cleaned up"


def test_check_adapter_passes_and_catches_the_causal_lm_prefix(adapter, tmp_path):
    report = check_adapter(adapter, TINY, "kit/qwen3_5-tiny", 8)
    assert report.problems == []
    assert len(report.passed) == 6, report.passed
    wrong = tmp_path / "wrong"
    shutil.copytree(adapter, wrong)
    tensors = load_file(str(wrong / ADAPTER_WEIGHTS))
    renamed = {k.replace("model.language_model.layers", "model.layers"): v for k, v in tensors.items()}
    save_file(renamed, str(wrong / ADAPTER_WEIGHTS))
    report = check_adapter(wrong, TINY, "kit/qwen3_5-tiny", 8)
    assert any("causal-LM naming" in p and "silently" in p for p in report.problems)
    fixed = check_adapter(wrong, TINY, "kit/qwen3_5-tiny", 8, fix=True)
    assert fixed.problems == [] and "rewrote" in fixed.notes[0]
    assert any("LoRA modules name language-model weights of the served base" in line for line in fixed.passed)
    assert sorted(_keys(wrong)) == sorted(_keys(adapter))


def test_check_adapter_refuses_rank_base_and_unservable_modules(adapter, tmp_path):
    assert any("exceeds" in p for p in check_adapter(adapter, TINY, "kit/qwen3_5-tiny", 1).problems)
    assert any("profile serves" in p for p in check_adapter(adapter, TINY, "Qwen/Qwen3.6-27B", 8).problems)
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert any("modules_to_save" in p for p in check_adapter(other, TINY, "kit/qwen3_5-tiny", 8).problems)


def _variant(adapter: Path, folder: Path, *, add: dict | None = None, config: dict | None = None) -> Path:
    """A copy of ``adapter`` with extra tensors and adapter_config.json fields."""
    shutil.copytree(adapter, folder)
    if add:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        save_file({**tensors, **add}, str(folder / ADAPTER_WEIGHTS))
    if config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    return folder


def test_check_adapter_refuses_lora_on_the_vision_tower_full_tensors_and_hidden_ranks(adapter, tmp_path):
    # Each of these loaded as "can be served" before: the check only asked whether the module existed.
    def problems(folder: Path) -> list[str]:
        return check_adapter(folder, TINY, "kit/qwen3_5-tiny", 8).problems

    vision = _variant(
        adapter,
        tmp_path / "vision",
        add={
            "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight": torch.zeros(8, 32),
            "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight": torch.zeros(96, 8),
        },
    )
    assert any("vision tower" in p for p in problems(vision)), problems(vision)
    embed = _variant(
        adapter,
        tmp_path / "embed",
        add={"base_model.model.model.language_model.embed_tokens.base_layer.weight": torch.zeros(1024, 64)},
    )
    assert any("not LoRA matrices" in p for p in problems(embed)), problems(embed)
    ranky = _variant(adapter, tmp_path / "ranky", config={"rank_pattern": {"q_proj": 64}})
    assert any("rank 64" in p and "exceeds" in p for p in problems(ranky)), problems(ranky)
    hidden = _variant(
        adapter,
        tmp_path / "hidden",
        add={
            "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(16, 64),
        },
    )
    assert any("weights have rank 16" in p for p in problems(hidden)), problems(hidden)


def test_check_adapter_reports_a_broken_config_or_a_missing_base_instead_of_a_traceback(adapter, tmp_path):
    broken = _variant(adapter, tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    report = check_adapter(broken, TINY, "kit/qwen3_5-tiny", 8)
    assert report.problems and "not a valid peft adapter config" in report.problems[0]
    report = check_adapter(adapter, tmp_path / "no-base", "kit/qwen3_5-tiny", 8)
    assert report.problems and "not on disk" in report.problems[0]


def test_recipes_may_not_target_embeddings_or_the_head():
    with pytest.raises(ValueError, match="vLLM cannot serve"):
        Recipe(
            base_model="qwen3_5-tiny",
            serve_profile="cpu-qwen3_5-tiny",
            lora={"target_modules": ["q_proj", "lm_head"]},
        )


def test_an_existing_adapter_is_not_overwritten_without_force(adapter):
    from finetune.train import TrainError

    before = (adapter / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(TrainError, match="--force"):
        run(ROOT, RECIPE, GOOD, adapter)
    assert (adapter / ADAPTER_WEIGHTS).read_bytes() == before


def test_merge_keeps_dtype_padded_vocab_and_mtp_and_changes_the_model(adapter, tmp_path):
    import transformers

    trained = tmp_path / "adapter"
    shutil.copytree(adapter, trained)
    template = (trained / "chat_template.jinja").read_text() + "{#- the training template #}"
    (trained / "chat_template.jinja").write_text(template)
    out = tmp_path / "merged"
    facts = merge(ROOT, trained, out)
    assert (out / "chat_template.jinja").read_text() == template, "merged models keep the training template"
    assert facts["embedding_shape"] == [1024, 64] and facts["mtp_tensors"] == 15
    assert facts["dtype"] == "bfloat16"
    assert abs(facts["merged_bytes"] / facts["base_bytes"] - 1) < 0.05
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sum(k.startswith("mtp.") for k in index["weight_map"]) == 15
    for name in ("chat_template.jinja", "tokenizer.json", "generation_config.json", "kit-build.json"):
        assert (out / name).is_file(), name
    base = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32)
    merged = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits)
    assert merged.get_output_embeddings().weight.shape == base.get_output_embeddings().weight.shape


@pytest.fixture()
def merge_root(tmp_path) -> Path:
    """A kit root with its own copy of the tiny base, for tests that break the base."""
    root = tmp_path / "kit"
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(TINY, root / "models" / "qwen3_5-tiny")
    return root


@pytest.fixture()
def no_weight_loads(monkeypatch) -> None:
    """Fail the test if the base or the adapter weights start loading."""
    import peft
    import transformers

    def loads(*args, **kwargs):
        raise AssertionError("weights were loaded before the base was checked")

    monkeypatch.setattr(transformers.Qwen3_5ForConditionalGeneration, "from_pretrained", loads)
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", loads)


def test_merge_refuses_a_base_the_adapter_was_not_trained_on_before_loading_weights(
    adapter, merge_root, no_weight_loads
):
    config = merge_root / "models" / "qwen3_5-tiny" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_theta": 1234.0}))
    out = merge_root / "merged"
    with pytest.raises(AdapterError, match="trained on other weights") as caught:
        merge(merge_root, adapter, out)
    assert "base fingerprint" in str(caught.value) and "make check-adapter" in str(caught.value)
    assert not out.exists()
    result = _kit(merge_root, "merge", str(adapter), "--output", str(out))
    assert result.returncode == 1 and "trained on other weights" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("build", ["is incomplete", "make models"]),  # no kit-build.json: the build did not finish
        ("hub", ["not a verified download", "make download MODEL=qwen3_5-tiny"]),  # no completion marker
    ],
)
def test_merge_refuses_an_incomplete_base_before_loading_weights(
    adapter, merge_root, no_weight_loads, source, expected
):
    base = merge_root / "models" / "qwen3_5-tiny"
    if source == "build":
        (base / "kit-build.json").unlink()
    else:
        model = merge_root / "configs" / "models" / "qwen3_5-tiny.yaml"
        model.write_text(model.read_text().replace("source: build", "source: hub"))
    with pytest.raises(AdapterError, match="cannot merge") as caught:
        merge(merge_root, adapter, merge_root / "merged")
    for text in expected:
        assert text in str(caught.value)
    assert not (merge_root / "merged").exists()


def test_merge_needs_the_recorded_base_fingerprint(adapter, tmp_path, no_weight_loads):
    trained = tmp_path / "adapter"
    shutil.copytree(adapter, trained)
    info = json.loads((trained / "kit-adapter.json").read_text())
    del info["base_fingerprint"]
    (trained / "kit-adapter.json").write_text(json.dumps(info))
    with pytest.raises(AdapterError, match="lacks base_model / base_fingerprint"):
        merge(ROOT, trained, tmp_path / "merged")


def test_a_killed_run_resumes_to_the_same_final_step(tmp_path):
    out = tmp_path / "resumed"
    cmd = [
        sys.executable,
        "-m",
        "finetune.cli",
        "--root",
        str(ROOT),
        "finetune",
        RECIPE,
        "--data",
        str(GOOD),
        "--output",
        str(out),
    ]
    first = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoints = out.with_name("resumed.checkpoints")
    deadline = time.monotonic() + 240
    while not (checkpoints / "checkpoint-2" / "trainer_state.json").is_file():
        assert first.poll() is None, "the first run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not out.exists(), "a killed run leaves no adapter where a complete one is expected"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(GOOD.read_text().splitlines(keepends=True)[1:]))
    mixed = subprocess.run([*cmd[:-3], str(other), *cmd[-2:]], capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 1 and "different data" in mixed.stderr, mixed.stderr[-2000:]
    assert (checkpoints / "checkpoint-2").is_dir(), "a refused resume keeps the checkpoints"
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    info = json.loads((out / "kit-adapter.json").read_text())
    assert info["resumed"] is True and info["global_step"] == 6


def test_validate_data_reports_every_bad_line_and_trains_nothing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "--root",
            str(ROOT),
            "validate-data",
            RECIPE,
            "--data",
            str(BAD),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    problems = [p.removeprefix("error: ") for p in result.stderr.splitlines()]
    lines = {int(p.split(":")[1]) for p in problems if p.startswith(str(BAD) + ":")}
    assert lines == set(range(3, 16)), result.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "--root",
            str(ROOT),
            "validate-data",
            RECIPE,
            "--data",
            str(GOOD),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "assistant tokens carry the loss" in ok.stdout


def test_make_finetune_accelerate_ddp_trains_on_two_processes_and_writes_once(tmp_path):
    # The multi-process path users take on GPUs (`make finetune ACCELERATE=ddp`), here as two CPU
    # processes over gloo: every rank trains, only the main one writes the adapter and reports.
    out = tmp_path / "ddp-adapter"
    result = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "finetune",
            f"RECIPE={RECIPE}",
            f"DATA={GOOD}",
            f"OUTPUT={out}",
            "ACCELERATE=ddp",
            "NUM_PROCESSES=2",
            "ACCELERATE_ARGS=--mixed_precision no",
            f"VENV={Path(sys.executable).parent.parent}",
        ],
        cwd=ROOT,
        # torch's elastic launcher makes a torchelastic_* log folder in TMPDIR and leaves it there.
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("adapter: ") == 1, result.stdout
    assert result.stderr.count("data ok:") == 1, "only the main rank logs"
    info = json.loads((out / "kit-adapter.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 6
    assert not out.with_name("ddp-adapter.partial").exists()
    report = check_adapter(out, TINY, "kit/qwen3_5-tiny", 8)
    assert not report.problems, report.problems


def test_qlora_recipe_trains_on_a_4bit_base_and_its_adapter_merges_into_the_full_base(tmp_path):
    # The path of qwen3.6-27b_qlora (bitsandbytes NF4 base + LoRA), run on the CPU with the tiny model.
    import transformers

    out = tmp_path / "qlora"
    info = run(ROOT, "qwen3_5-tiny_qlora-cpu", GOOD, out)
    assert info is not None and info["global_step"] == 4
    assert not check_adapter(out, TINY, "kit/qwen3_5-tiny", 8).problems
    keys = _keys(out)
    assert keys and all(".language_model." in k for k in keys)
    assert not any(k.endswith((".absmax", ".quant_map")) or "quant_state" in k for k in keys)
    merged_dir = tmp_path / "qlora-merged"
    facts = merge(ROOT, out, merged_dir)
    assert facts["dtype"] == "bfloat16" and facts["mtp_tensors"] == 15
    base = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32)
    merged = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits)


def test_fsdp_activation_checkpointing_replaces_the_recipe_s_gradient_checkpointing(monkeypatch):
    # configs/accelerate/fsdp2.yaml turns on FSDP's activation checkpointing; the 27B recipes turn on
    # gradient_checkpointing. transformers' Trainer refuses the pair, so the recipe's yields.
    from finetune.recipe import TrainingArgs
    from finetune.train import effective_training

    recipe = TrainingArgs(gradient_checkpointing=True)
    assert effective_training(recipe).gradient_checkpointing is True
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert effective_training(recipe).gradient_checkpointing is False
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    assert effective_training(recipe).gradient_checkpointing is True


@pytest.fixture()
def root_without_weights(tmp_path) -> Path:
    """A kit root whose tiny base has its config and tokenizer but no weights (a download in progress)."""
    root = tmp_path / "kit"
    shutil.copytree(ROOT / "configs", root / "configs")
    ignore = shutil.ignore_patterns("*.safetensors", "kit-build.json")  # no weights, no completion marker
    shutil.copytree(TINY, root / "models" / "qwen3_5-tiny", ignore=ignore)
    return root


def _kit(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_validate_data_reports_both_files_at_once_and_needs_no_weights(root_without_weights, tmp_path):
    def line(user: str, answer: str) -> str:
        return json.dumps(
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        )

    train = tmp_path / "train.jsonl"
    train.write_text(
        "\n".join(
            [
                line("Hi", "Hello."),
                '{"messages": [',  # bad JSON
                line("Long?", "word " * 3000),  # over max_seq_length 1024 after tokenisation
                line("Bye", "Goodbye."),
            ]
        )
        + "\n"
    )
    evals = tmp_path / "eval.jsonl"
    evals.write_text(
        json.dumps(
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
        )
        + "\n"
        + line("Hi", "Hello.")  # the same as train line 1
        + "\n"
    )
    result = _kit(
        root_without_weights, "validate-data", RECIPE, "--data", str(train), "--eval-data", str(evals)
    )
    assert result.returncode == 2, result.stderr
    where = {p.split(": ")[0].removeprefix("error:\n") for p in result.stderr.splitlines() if ".jsonl:" in p}
    assert where == {f"{train}:2", f"{train}:3", f"{evals}:1", f"{evals}:2"}, result.stderr
    assert f"EVAL_DATA={evals}" in result.stderr.splitlines()[-1]
    good = tmp_path / "good.jsonl"
    good.write_text(line("Hi", "Hello.") + "\n" + line("Bye", "Goodbye.") + "\n")
    ok = _kit(root_without_weights, "validate-data", RECIPE, "--data", str(good))
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
    train_run = _kit(root_without_weights, "finetune", RECIPE, "--data", str(good))
    assert train_run.returncode == 1 and "make models" in train_run.stderr, train_run.stderr
    assert "Traceback" not in train_run.stderr


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (".*visual.*qkv", "vision tower"),
        ("nothing_proj", "matches no module"),
        (".*embed_tokens", "embedding"),
    ],
)
def test_lora_targets_are_checked_on_the_meta_device_before_any_weight_loads(
    root_without_weights, tmp_path, targets, message
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        (ROOT / "configs" / "finetune" / f"{RECIPE}.yaml")
        .read_text()
        .replace("  r: 8\n", f"  r: 8\n  target_modules: {json.dumps(targets)}\n")
    )
    result = _kit(root_without_weights, "validate-data", str(recipe), "--data", str(GOOD))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_kit_up_hands_each_adapter_s_recorded_template_kwargs_to_the_gateway(tmp_path):
    from serve.supervisor import adapter_chat_template_kwargs, gateway_env

    def adapter(name: str, info: str | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if info is not None:
            (folder / "kit-adapter.json").write_text(info)
        return folder

    modules = {
        "plain": adapter(
            "plain", json.dumps({"serving": {"chat_template_kwargs": {"enable_thinking": False}}})
        ),
        "thinks": adapter("thinks", json.dumps({"serving": {}})),
        "foreign": adapter("foreign", None),
        "broken": adapter("broken", "{oops"),
    }
    kwargs = adapter_chat_template_kwargs(modules)
    assert kwargs == {"plain": {"enable_thinking": False}}
    env = gateway_env("http://127.0.0.1:1", 2, tmp_path / "k.sqlite", ["m"], chat_template_kwargs=kwargs)
    assert json.loads(env["KIT_GATEWAY_DEFAULT_CHAT_TEMPLATE_KWARGS"]) == kwargs


def test_the_readme_s_recipe_for_serving_a_merged_model_gives_a_ready_profile(adapter, tmp_path):
    # README "Serving a merged model": a model config with source: build pointing at the merge output,
    # and a profile naming it. Shown here with the 27B's own config file, edited as the README says.
    import yaml

    from serve.config import load_profile
    from serve.modeldir import not_ready_reason
    from serve.render import render

    root = tmp_path / "kit"
    shutil.copytree(ROOT / "configs", root / "configs")
    (root / "models").mkdir()
    (root / "models" / "qwen3_5-tiny").symlink_to(TINY)
    merge(root, adapter, root / "adapters" / "my-merged")
    model = yaml.safe_load((ROOT / "configs" / "models" / "qwen3.6-27b.yaml").read_text())
    model.pop("revision")
    model |= {
        "name": "my-merged",
        "source": "build",
        "build_command": "make merge ADAPTER=adapters/my",
        "local_dir": "adapters/my-merged",
        "served_model_name": "my-merged",
    }
    (root / "configs" / "models" / "my-merged.yaml").write_text(yaml.safe_dump(model))
    profile = yaml.safe_load((ROOT / "configs" / "serve" / "h200.yaml").read_text()) | {"model": "my-merged"}
    profile["vllm"]["max_model_len"] = 1024  # the tiny stand-in has 4096 positions, the 27B 262,144
    (root / "configs" / "serve" / "h200-my-merged.yaml").write_text(yaml.safe_dump(profile))
    resolved = load_profile(root, "h200-my-merged")
    assert not_ready_reason(resolved) is None
    command = render(resolved).shell()
    assert str(root / "adapters" / "my-merged") in command and "--served-model-name my-merged" in command


def test_serving_an_adapter_of_another_base_fails_before_vllm_starts(adapter):
    # The tiny qwen3_5 adapter under the SmolLM2 profile: vLLM would fail ~30 s into start-up with a
    # traceback; the kit refuses at once and says why.
    for verb in ("serve", "up"):
        started = time.monotonic()
        result = _kit(ROOT, verb, "cpu-demo-lora", "--adapter", f"tiny={adapter}")
        assert result.returncode == 2, result.stderr
        assert "adapters that profile cpu-demo-lora cannot serve" in result.stderr
        assert "profile serves 'HuggingFaceTB/SmolLM2-135M-Instruct'" in result.stderr
        assert "Traceback" not in result.stderr and "starting vLLM" not in result.stdout
        assert time.monotonic() - started < 60
