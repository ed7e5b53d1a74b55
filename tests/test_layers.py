"""The package layering: ``finetune`` builds on ``serve``; ``serve`` never imports ``finetune``.

Serving must run (and be installed) without the training stack, and a change in fine-tuning must not be
able to break ``kit serve``. The ``kit`` console script composes both in ``finetune.cli``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree``, function-level and ``TYPE_CHECKING`` ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_serve_never_imports_finetune():
    files = sorted((ROOT / "serve").rglob("*.py"))
    assert len(files) > 10, "the serve package was not found"
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if module == "finetune" or module.startswith("finetune.")
    ]
    assert not offenders, (
        "serve/ must not import finetune/ (move what both need into serve/, or compose in finetune.cli):\n"
        + "\n".join(offenders)
    )


def test_the_kit_console_script_is_the_composed_cli():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kit"] == "finetune.cli:main"
    from finetune.cli import build_parser

    usage = build_parser().format_usage()  # "usage: kit [-h] ... {download,serve,...} ..."
    verbs = set(usage[usage.index("{") + 1 : usage.index("}")].split(","))
    assert {"serve", "up", "gateway", "key", "download", "demo", "validate"} <= verbs
    assert {"finetune", "validate-data", "check-adapter", "merge", "finetune-demo"} <= verbs
