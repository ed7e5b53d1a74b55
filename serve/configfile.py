"""Load a YAML file into a pydantic model and report every problem with its file and line.

Each shipped YAML maps onto one typed schema; validation happens here, before anything starts or any
weight loads, and all problems are reported at once (the torchtune ``ConfigError`` / vLLM
``validate_parsed_serve_args`` habit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Schema = TypeVar("Schema", bound=BaseModel)


class ConfigError(Exception):
    """A configuration could not be used. ``problems`` holds one ``file:line: field: message`` per issue."""

    def __init__(self, problems: list[str], hint: str = "", title: str = "invalid configuration") -> None:
        self.problems = problems
        self.hint = hint
        text = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{title}:\n{text}" + (f"\n{hint}" if hint else ""))


def _line_index(node: yaml.Node | None, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    """Record the 1-based line of every mapping key and sequence item below ``node``."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            out[path] = key_node.start_mark.line + 1
            _line_index(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            out[path] = item.start_mark.line + 1
            _line_index(item, path, out)


def _line_for(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    """The line of the longest prefix of ``loc`` that appears in the file (1 when none does)."""
    for end in range(len(loc), 0, -1):
        key = tuple(str(p) if not isinstance(p, int) else p for p in loc[:end])
        if key in lines:
            return lines[key]
    return 1


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs (``vllm.max_model_len=32768``) as ``{dotted key: YAML value}``.

    Raises:
        ConfigError: a pair without ``=`` or with an empty key.
    """
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {pair!r}: expected KEY=VALUE, e.g. --set vllm.max_num_seqs=64"])
        result[key] = yaml.safe_load(value)
    return result


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted == "a.b"``, creating mappings on the way."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted}: '{part}' is not a mapping"])
    node[last] = value


def load_yaml(path: Path, schema: type[Schema], overrides: dict[str, Any] | None = None) -> Schema:
    """Parse ``path`` and validate it as ``schema``.

    Args:
        path: a YAML file holding one mapping.
        schema: the pydantic model to fill.
        overrides: dotted keys (``vllm.port``) set on top of the file, for CLI precedence
            (defaults < YAML < CLI).

    Returns:
        The validated model.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or fails validation; every problem is
            listed as ``file:line: field: message``.
    """
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: expected a mapping of settings, got {type(data).__name__}"])
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    lines: dict[tuple[Any, ...], int] = {}
    _line_index(root, (), lines)
    try:
        return schema.model_validate(data, context={"source": path})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            field = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{path}:{_line_for(loc, lines)}: {field}: {err['msg']}")
        raise ConfigError(problems) from None
