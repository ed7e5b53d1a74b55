"""Is a model's local folder ready to serve? If not, say which command fixes it."""

from __future__ import annotations

import json
from pathlib import Path

from serve.buildinfo import MANIFEST
from serve.config import ModelConfig, ResolvedProfile
from serve.download import MANIFEST as DOWNLOAD_MANIFEST
from serve.download import MARKER as DOWNLOAD_MARKER
from serve.download import completion_problem


def _snapshot_mismatch(model: ModelConfig, folder: Path) -> str | None:
    """Why a verified download in ``folder`` is not the snapshot ``model`` pins (None when it is).

    ``make download REPO=org/Name`` writes into ``models/<name>/``, which may be a model config's
    ``local_dir``; without this check those weights would be served under the config's model id.
    """
    recorded = json.loads((folder / DOWNLOAD_MANIFEST).read_text(encoding="utf-8"))
    repo_id, revision = recorded.get("repo_id"), recorded.get("revision")
    found, expected = None, None
    if repo_id != model.repo_id:
        found, expected = f"repo {repo_id}", f"repo {model.repo_id}"
    elif model.revision is not None and revision != model.revision:
        found, expected = f"{repo_id} at revision {revision}", f"revision {model.revision}"
    if found is None:
        return None
    config = f"configs/models/{model.name}.yaml"
    return (
        f"model folder {folder} holds {found} (its {DOWNLOAD_MANIFEST}), but {config} expects "
        f"{expected}, served as {model.served_model_name!r}. Fix: re-download it with "
        f"`make download MODEL={model.name}`, or give the other weights their own model config "
        f"(configs/models/<name>.yaml with their repo_id, revision and a local_dir of their own) and a "
        "serve profile naming it"
    )


def model_not_ready_reason(model: ModelConfig, folder: Path) -> str | None:
    """Why ``folder`` cannot be served (or merged into) as ``model`` yet, with the fixing command.

    A built model is ready when its folder holds ``config.json`` and ``kit-build.json`` (written last).
    A downloaded model is ready only with a valid completion marker (``serve.download``), which is
    written after every file was verified, and only when its manifest records the repo id (and, where
    the config pins one, the revision) of ``model``.

    Args:
        model: the model config the folder should hold.
        folder: the model's folder (``local_dir`` resolved against the kit root).

    Returns:
        A message saying what is wrong and which command fixes it; None when the folder is ready.
    """
    if model.source == "build":
        fix = f"build it with `make models` ({model.build_command})"
        marker = folder / MANIFEST
    else:
        fix = f"download it with `make download MODEL={model.name}`"
        marker = folder / DOWNLOAD_MARKER
    if not folder.is_dir():
        return f"model folder {folder} does not exist: {fix}"
    if model.source == "hub":
        problem = completion_problem(folder)
        if problem:
            return f"model folder {folder} is not a verified download: {problem}. Fix: {fix}"
        return _snapshot_mismatch(model, folder)
    if not (folder / "config.json").is_file() or not marker.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        return f"model folder {folder} is incomplete (has: {', '.join(present) or 'nothing'}): {fix}"
    return None


def not_ready_reason(resolved: ResolvedProfile) -> str | None:
    """Why ``resolved.model_dir`` cannot be served yet, with the command that fixes it; None when ready.

    Args:
        resolved: the serve profile (its model config and resolved model folder).

    Returns:
        See :func:`model_not_ready_reason`.
    """
    return model_not_ready_reason(resolved.model, resolved.model_dir)
