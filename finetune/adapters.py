"""The adapter checks fine-tuning shares with serving; they live in :mod:`serve.adapters`.

Serving runs them before vLLM starts, so they belong to ``serve`` (which must not import ``finetune``);
this module re-exports them for the fine-tune code (recipe targets, training, merge).
"""

from __future__ import annotations

from serve.adapters import (
    ADAPTER_INFO,
    ADAPTER_WEIGHTS,
    AdapterError,
    KeyCheck,
    Report,
    base_fingerprint,
    check_adapter,
    check_keys,
    unservable_reason,
)

__all__ = [
    "ADAPTER_INFO",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "KeyCheck",
    "Report",
    "base_fingerprint",
    "check_adapter",
    "check_keys",
    "unservable_reason",
]
