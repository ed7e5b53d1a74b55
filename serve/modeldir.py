"""Is a model's local folder ready to serve? If not, say which command fixes it."""

from __future__ import annotations

from serve.buildinfo import MANIFEST
from serve.config import ResolvedProfile
from serve.download import MARKER as DOWNLOAD_MARKER
from serve.download import completion_problem


def not_ready_reason(resolved: ResolvedProfile) -> str | None:
    """Why ``resolved.model_dir`` cannot be served yet, with the command that fixes it; None when ready.

    A built model is ready when its folder holds ``config.json`` and ``kit-build.json`` (written last).
    A downloaded model is ready only with a valid completion marker (``serve.download``), which is
    written after every file was verified.
    """
    model = resolved.model
    folder = resolved.model_dir
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
        return f"model folder {folder} is not a verified download: {problem}. Fix: {fix}" if problem else None
    if not (folder / "config.json").is_file() or not marker.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        return f"model folder {folder} is incomplete (has: {', '.join(present) or 'nothing'}): {fix}"
    return None
