"""Is a model's local folder ready to serve? If not, say which command fixes it."""

from __future__ import annotations

from serve.buildinfo import MANIFEST
from serve.config import ResolvedProfile


def not_ready_reason(resolved: ResolvedProfile) -> str | None:
    """Why ``resolved.model_dir`` cannot be served yet, with the command that fixes it; None when ready.

    A folder counts as ready when it holds a ``config.json`` (built models also write ``kit-build.json``
    last, so a half-built folder never has it).
    """
    model = resolved.model
    folder = resolved.model_dir
    if model.source == "build":
        fix = f"build it with `make models` ({model.build_command})"
        marker = folder / MANIFEST
    else:
        fix = f"download it with `make download MODEL={model.name}`"
        marker = folder / "config.json"
    if not folder.is_dir():
        return f"model folder {folder} does not exist: {fix}"
    if not (folder / "config.json").is_file() or not marker.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        return f"model folder {folder} is incomplete (has: {', '.join(present) or 'nothing'}): {fix}"
    return None
