"""Model aliases: the model id a client insists on (``claude-sonnet-4-5``, ``gpt-4o``, anything
configured) mapped to a model or adapter the server serves.

Aliases come from the gateway settings (``model_aliases``: ``kit up`` fills it from each served model's
``aliases`` in ``configs/models/<model>.yaml``, and ``configs/gateway.yaml`` may add more). A key's
allowed models are checked against the served model an alias resolves to, and the ledger records that
model. An exact alias wins over a pattern (``*`` globs, first match in the order configured); ``/v1/models``
lists the exact aliases of models the key may use (a pattern is not a model id a client can pick).
"""

from __future__ import annotations

import fnmatch
from typing import Any


class Aliases:
    """Resolves client model ids.

    Args:
        mapping: alias or glob pattern -> served model id or adapter name.
    """

    def __init__(self, mapping: dict[str, str]) -> None:
        self.exact = {alias: target for alias, target in mapping.items() if "*" not in alias}
        self.patterns = [(alias, target) for alias, target in mapping.items() if "*" in alias]

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    def resolve(self, model: str) -> str | None:
        """The served model ``model`` stands for, or None when it is no alias."""
        target = self.exact.get(model)
        if target is not None:
            return target
        for pattern, target in self.patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return target
        return None

    def listing_entries(self, served: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``/v1/models`` entries for the exact aliases whose target is in ``served`` (entries already
        filtered to what the key may use)."""
        by_id = {entry.get("id"): entry for entry in served}
        added = []
        for alias, target in self.exact.items():
            entry = by_id.get(target)
            if entry is not None and alias not in by_id:
                added.append({**entry, "id": alias, "root": target, "parent": target})
        return added
