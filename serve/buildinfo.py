"""``kit-build.json``: what a locally built model folder was made from, so a rebuild can be skipped.

The builders in ``scripts/`` write it last, inside the staged folder, so a folder that has it is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST = "kit-build.json"


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest in ``out``, or None when the folder or file is missing or unreadable."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_up_to_date(out: Path, manifest: dict[str, Any], input_key: str) -> bool:
    """Whether ``out`` was built from the same inputs by the same builder version.

    Args:
        out: output folder.
        manifest: the current inputs; must hold ``input_key`` and ``builder_version``.
        input_key: the manifest field that fingerprints the inputs (e.g. ``source_sha256``).

    Returns:
        True when both recorded fields match and the weights (``model.safetensors``) exist.
    """
    recorded = read_manifest(out)
    return (
        recorded is not None
        and recorded.get(input_key) == manifest[input_key]
        and recorded.get("builder_version") == manifest["builder_version"]
        and (out / "model.safetensors").is_file()
    )
