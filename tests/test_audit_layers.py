"""The audit is a layer on top of serve: ``audit`` may import ``serve``; ``serve`` never imports ``audit``,
and ``audit`` never needs ``finetune``. Nothing runs at import time."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.test_layers import _imported_modules

ROOT = Path(__file__).resolve().parent.parent


def _offenders(package: str, forbidden: str) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no {package}/ package"
    return [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if module == forbidden or module.startswith(forbidden + ".")
    ]


def test_serve_never_imports_audit():
    assert not _offenders("serve", "audit")


def test_audit_never_imports_finetune():
    assert not _offenders("audit", "finetune")


def test_importing_the_audit_does_no_work():
    """Importing every audit module loads no lexicon, no plotting library and opens no file or socket."""
    code = (
        "import sys, audit.cli, audit.demo, audit.pipeline, audit.forcing, audit.judge;"
        "heavy = {'matplotlib', 'vaderSentiment', 'cnsenti', 'jieba'};"
        "heavy &= {m.split('.')[0] for m in sys.modules};"
        "print(sorted(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
