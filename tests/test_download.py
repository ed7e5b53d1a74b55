"""`make download` against a local hub-compatible server: the real huggingface_hub client, real bytes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from serve.config import DownloadSettings, load_model_config, load_profile
from serve.configfile import load_yaml
from serve.download import MANIFEST, MARKER, DownloadError, Target, completion_problem, download
from serve.modeldir import model_not_ready_reason, not_ready_reason
from tests.hub_server import COMMIT, make_app, tiny_repo

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "qwen3_5-tiny"
WANTED = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
}


@pytest.fixture
def settings() -> DownloadSettings:
    return load_yaml(ROOT / "configs" / "download.yaml", DownloadSettings)


@pytest.fixture
def hub(serve_aiohttp, monkeypatch, tmp_path):
    assert (TINY / "model.safetensors").is_file(), "make test builds models/qwen3_5-tiny first"
    repo = tiny_repo(TINY)
    server = serve_aiohttp(make_app(repo))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return repo


def target(tmp_path: Path, revision: str | None = COMMIT, licenses=("apache-2.0",)) -> Target:
    return Target("kit/qwen3_5-tiny", revision, tmp_path / "models" / "tiny", list(licenses), "qwen3_5-tiny")


def fetched(repo) -> list[str]:
    return [name for method, name, _ in repo.log if method == "GET"]


def test_clean_download_then_a_rerun_that_fetches_nothing(hub, settings, tmp_path):
    lines: list[str] = []
    outcome = download(target(tmp_path), settings, echo=lines.append)
    local = tmp_path / "models" / "tiny"
    assert outcome is not None and not outcome.already_complete
    assert set(fetched(hub)) == WANTED  # README.md and original/ are left out
    for name in WANTED:
        path = local / name
        assert path.is_file() and not path.is_symlink()
        assert path.read_bytes() == hub.files[name]
    manifest = json.loads((local / MANIFEST).read_text())
    assert manifest["repo_id"] == "kit/qwen3_5-tiny" and manifest["revision"] == COMMIT
    assert {f["path"] for f in manifest["files"]} == WANTED
    assert completion_problem(local) is None
    assert "MB/s" in lines[-1] and "files verified" in lines[-1]

    hub.log.clear()
    lines.clear()
    again = download(target(tmp_path), settings, echo=lines.append)
    assert again is not None and again.already_complete
    assert fetched(hub) == []
    assert "nothing downloaded" in lines[-1]


def test_a_dropped_connection_resumes_from_where_it_broke(hub, settings, tmp_path, monkeypatch):
    # huggingface_hub reads in 10 MB chunks and resumes from the last whole chunk; the tiny shard is 1.8 MB,
    # so use 64 KiB chunks to make it span many, as a real 4 GB shard does.
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    size = len(hub.files["model.safetensors"])
    hub.abort_at["model.safetensors"] = size // 2
    hub.abort_times = 1
    download(target(tmp_path), settings, echo=lambda _: None)
    ranges = [rng for method, name, rng in hub.log if method == "GET" and name == "model.safetensors"]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert size // 2 - 64 * 1024 <= resumed_at <= size // 2, "the retry asks only for what is missing"
    local = tmp_path / "models" / "tiny"
    assert (local / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert completion_problem(local) is None


def test_an_interrupted_run_keeps_finished_files_and_the_next_run_completes(hub, settings, tmp_path):
    """huggingface_hub >= 2 deletes a partial file when a run gives up (its PR 4228), so the next run
    fetches that file again from its start; every finished file is kept and not fetched again."""
    hub.abort_at["model.safetensors"] = len(hub.files["model.safetensors"]) // 2
    with pytest.raises(DownloadError, match="run the same command again"):
        download(target(tmp_path), settings, echo=lambda _: None)
    local = tmp_path / "models" / "tiny"
    assert not (local / MARKER).exists()
    assert "no completion marker" in completion_problem(local)
    assert (local / "config.json").is_file()

    hub.abort_at.clear()
    hub.log.clear()
    download(target(tmp_path), settings, echo=lambda _: None)
    assert fetched(hub) == ["model.safetensors"]
    assert (local / "model.safetensors").read_bytes() == hub.files["model.safetensors"]
    assert completion_problem(local) is None


def test_corrupted_bytes_are_named_and_no_marker_is_written(hub, settings, tmp_path):
    hub.corrupt.add("model.safetensors")
    with pytest.raises(DownloadError) as caught:
        download(target(tmp_path), settings, echo=lambda _: None)
    message = str(caught.value)
    assert "model.safetensors" in message and "sha256" in message
    local = tmp_path / "models" / "tiny"
    assert not (local / MARKER).exists()
    assert not (local / "model.safetensors").exists(), "the bad copy is removed so a re-run fetches it"

    hub.corrupt.clear()
    download(target(tmp_path), settings, echo=lambda _: None)
    assert completion_problem(local) is None


def test_corruption_after_success_is_caught_by_verify_and_unmarks_the_copy(hub, settings, tmp_path):
    download(target(tmp_path), settings, echo=lambda _: None)
    local = tmp_path / "models" / "tiny"
    shard = local / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=r"model\.safetensors"):
        download(target(tmp_path), settings, reverify=True, echo=lambda _: None)
    assert completion_problem(local) is not None


def test_an_incomplete_previous_attempt_is_detected_and_finished(hub, settings, tmp_path):
    local = tmp_path / "models" / "tiny"
    local.mkdir(parents=True)
    shutil.copy(TINY / "config.json", local / "config.json")
    (local / "model.safetensors").write_bytes(hub.files["model.safetensors"][:1000])
    assert "no completion marker" in completion_problem(local)
    download(target(tmp_path), settings, echo=lambda _: None)
    assert completion_problem(local) is None
    assert (local / "model.safetensors").read_bytes() == hub.files["model.safetensors"]


def test_too_little_disk_space_is_refused_before_any_transfer(hub, settings, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("serve.download.shutil.disk_usage", lambda _: usage(10**9, 10**9, 10**6))
    with pytest.raises(DownloadError) as caught:
        download(target(tmp_path), settings, echo=lambda _: None)
    assert caught.value.exit_code == 4
    assert "not enough disk space" in str(caught.value) and "nothing was fetched" in str(caught.value)
    assert fetched(hub) == []
    assert not (tmp_path / "models" / "tiny").exists()


def test_a_licence_outside_the_allowlist_is_refused_unless_accepted(hub, settings, tmp_path):
    hub.license = "llama3"
    with pytest.raises(DownloadError) as caught:
        download(target(tmp_path), settings, echo=lambda _: None)
    assert caught.value.exit_code == 3
    assert "llama3" in str(caught.value) and "--accept-license" in str(caught.value)
    assert fetched(hub) == []
    download(target(tmp_path), settings, accept_license=True, echo=lambda _: None)
    assert completion_problem(tmp_path / "models" / "tiny") is None


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("gated", r"is gated: accept its terms"),
        ("token", "HF_TOKEN"),
        ("repo", "not found"),
        ("revision", "does not exist"),
        ("unreachable", "cannot reach"),
    ],
)
def test_hub_errors_become_hints(hub, settings, tmp_path, monkeypatch, fault, expected):
    goal = target(tmp_path)
    if fault == "gated":
        hub.gated = True
    elif fault == "token":
        hub.token = "hf_secret"
    elif fault == "repo":
        goal = Target("kit/no-such-repo", COMMIT, goal.local_dir, goal.allowed_licenses)
    elif fault == "revision":
        goal = target(tmp_path, revision="f" * 40)
    else:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DownloadError, match=re.escape(expected)):
        download(goal, settings, echo=lambda _: None)
    if fault == "token":
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        download(goal, settings, echo=lambda _: None)
        assert completion_problem(goal.local_dir) is None


def test_dry_run_lists_the_files_and_fetches_nothing(hub, settings, tmp_path):
    lines: list[str] = []
    download(target(tmp_path), settings, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert all(name in text for name in WANTED) and "README.md" not in text
    assert "to fetch" in text and "GiB" in text
    assert fetched(hub) == []
    assert not (tmp_path / "models" / "tiny").exists()


def test_offline_mode_accepts_a_complete_copy_only(hub, settings, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="unset HF_HUB_OFFLINE"):
        download(target(tmp_path), settings, echo=lambda _: None)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    download(target(tmp_path), settings, echo=lambda _: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    lines: list[str] = []
    download(target(tmp_path), settings, echo=lines.append)
    assert hub.log == [] and "offline" in lines[-1]


# The tiny model's folder stands in for the 27B's: a context within its positions, and no memory plan
# (its architecture numbers are not the 27B's); the download checks are what these tests are about.
TINY_FITS = ("--set", "vllm.max_model_len=1024", "--set", "plan.check=false")


def _kit(root: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _kit_root(tmp_path: Path) -> Path:
    root = tmp_path / "kit"
    shutil.copytree(ROOT / "configs", root / "configs")
    return root


def test_cli_download_then_serve_accepts_only_a_verified_copy_of_the_configured_snapshot(hub, tmp_path):
    root = _kit_root(tmp_path)
    env = {**os.environ}
    # `make serve` refuses a folder that merely looks like a model.
    local = root / "models" / "qwen3.6-27b"
    local.mkdir(parents=True)
    shutil.copy(TINY / "config.json", local / "config.json")
    refused = _kit(root, "serve", "h200", *TINY_FITS, env=env)
    assert refused.returncode == 2
    assert "not a verified download" in refused.stderr and "make download MODEL=qwen3.6-27b" in refused.stderr

    # `make download REPO=someone/Qwen3.6-27B` writes a verified copy into models/qwen3.6-27b, the h200
    # profile's folder: serving it would name other weights Qwen/Qwen3.6-27B, so it is refused.
    hub.repo_id = "someone/Qwen3.6-27B"
    got = _kit(root, "download", "--repo", "someone/Qwen3.6-27B", "--revision", COMMIT, env=env)
    assert got.returncode == 0, got.stderr
    assert "files verified" in got.stdout and completion_problem(local) is None
    other_repo = _kit(root, "serve", "h200", *TINY_FITS, env=env)
    assert other_repo.returncode == 2, other_repo.stderr
    assert "holds repo someone/Qwen3.6-27B" in other_repo.stderr
    assert "expects repo Qwen/Qwen3.6-27B" in other_repo.stderr
    assert "make download MODEL=qwen3.6-27b" in other_repo.stderr and "Traceback" not in other_repo.stderr

    # `make download REVISION=<sha>`: the configured repo, but not the revision the config pins.
    shutil.rmtree(local)
    hub.repo_id = "Qwen/Qwen3.6-27B"
    got = _kit(root, "download", "qwen3.6-27b", "--revision", COMMIT, env=env)
    assert got.returncode == 0, got.stderr
    assert completion_problem(local) is None
    pinned = load_model_config(root / "configs", "qwen3.6-27b").revision
    assert pinned is not None and pinned != COMMIT
    other_revision = _kit(root, "serve", "h200", *TINY_FITS, env=env)
    assert other_revision.returncode == 2, other_revision.stderr
    assert f"Qwen/Qwen3.6-27B at revision {COMMIT}" in other_revision.stderr
    assert f"expects revision {pinned}" in other_revision.stderr
    assert "make download MODEL=qwen3.6-27b" in other_revision.stderr

    # Pinned on the snapshot that was downloaded, the verified folder is ready to serve.
    config = root / "configs" / "models" / "qwen3.6-27b.yaml"
    config.write_text(config.read_text().replace(pinned, COMMIT))
    assert not_ready_reason(load_profile(root, "h200", {"vllm.max_model_len": 1024})) is None
    dry = _kit(root, "serve", "h200", *TINY_FITS, "--dry-run", env=env)
    assert dry.returncode == 0 and f"vllm serve {local}" in dry.stdout


def _verified_copy(folder: Path, repo_id: str, revision: str) -> Path:
    """A folder holding what a finished download leaves: one file, its manifest and the marker over it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    manifest = {
        "repo_id": repo_id,
        "revision": revision,
        "license": "apache-2.0",
        "files": [{"path": "config.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}],
    }
    text = json.dumps(manifest, indent=2) + "\n"
    (folder / MANIFEST).write_text(text)
    (folder / MARKER).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")
    assert completion_problem(folder) is None
    return folder


OTHER_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("model", "repo_id", "revision", "expected"),
    [
        ("qwen3.6-27b", "Qwen/Qwen3.6-27B", "pinned", None),
        ("qwen3.6-27b", "someone/Qwen3.6-27B", "pinned", "holds repo someone/Qwen3.6-27B"),
        ("qwen3.6-27b", "Qwen/Qwen3.6-27B", OTHER_SHA, f"Qwen/Qwen3.6-27B at revision {OTHER_SHA}"),
        # No revision pinned in its config: the repo id alone decides.
        ("qwen3.6-27b-fp8", "Qwen/Qwen3.6-27B-FP8", OTHER_SHA, None),
        ("qwen3.6-27b-fp8", "Qwen/Qwen3.6-27B", OTHER_SHA, "holds repo Qwen/Qwen3.6-27B "),
    ],
)
def test_a_verified_download_is_ready_only_as_the_snapshot_its_config_names(
    tmp_path, model, repo_id, revision, expected
):
    config = load_model_config(ROOT / "configs", model)
    if revision == "pinned":
        assert config.revision is not None
        revision = config.revision
    folder = _verified_copy(tmp_path / model, repo_id, revision)
    reason = model_not_ready_reason(config, folder)
    if expected is None:
        assert reason is None
        return
    assert reason is not None and expected in reason
    wanted = f"revision {config.revision}" if config.repo_id == repo_id else f"repo {config.repo_id}"
    assert f"but configs/models/{model}.yaml expects {wanted}" in reason
    assert f"served as {config.served_model_name!r}" in reason
    assert f"`make download MODEL={model}`" in reason and "their own model config" in reason


def test_cli_exit_codes_for_licence_and_dry_run(hub, tmp_path):
    root = _kit_root(tmp_path)
    hub.license = "other"
    refused = _kit(root, "download", "--repo", "kit/qwen3_5-tiny", env=dict(os.environ))
    assert refused.returncode == 3 and "--accept-license" in refused.stderr
    listing = _kit(
        root, "download", "--repo", "kit/qwen3_5-tiny", "--dry-run", "--accept-license", env=dict(os.environ)
    )
    assert listing.returncode == 0 and "model.safetensors" in listing.stdout
    assert not (root / "models").exists()


def test_disk_full_mid_way_is_a_hint_and_leaves_no_marker(hub, settings, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("huggingface_hub.snapshot_download", full)
    with pytest.raises(DownloadError, match="is full") as caught:
        download(target(tmp_path), settings, echo=lambda _: None)
    assert caught.value.exit_code == 4 and "resumes" in str(caught.value)
    assert not (tmp_path / "models" / "tiny" / MARKER).exists()


def test_config_only_fetches_the_small_files_then_the_full_run_adds_only_the_weights(hub, settings, tmp_path):
    # `make download CONFIG_ONLY=1`: enough to validate fine-tune data before the 52 GiB arrive.
    lines: list[str] = []
    download(target(tmp_path), settings, config_only=True, echo=lines.append)
    local = tmp_path / "models" / "tiny"
    assert set(fetched(hub)) == WANTED - {"model.safetensors"}
    assert (local / "tokenizer.json").read_bytes() == hub.files["tokenizer.json"]
    assert not (local / "model.safetensors").exists()
    assert completion_problem(local) is not None, "a config-only copy is never marked complete"
    assert "No weights yet" in lines[-1]
    hub.log.clear()
    outcome = download(target(tmp_path), settings, echo=lambda _: None)
    assert outcome is not None and fetched(hub) == ["model.safetensors"]
    assert completion_problem(local) is None
