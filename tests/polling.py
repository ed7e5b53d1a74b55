"""Waiting in tests for something another process or thread does: one polling helper for the suite."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], object],
    timeout_s: float = 10.0,
    message: str = "condition not met in time",
    interval_s: float = 0.05,
) -> None:
    """Poll ``condition()`` every ``interval_s`` seconds until it is truthy.

    Raises:
        AssertionError: with ``message`` once ``timeout_s`` seconds have passed.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(interval_s)
