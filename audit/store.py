"""Append-only JSONL of raw answers, keyed by ``(probe id, condition)``: the audit's resume point.

Each finished request is one line, appended and flushed as soon as it is answered, so a crash loses at
most the requests in flight. A run that starts again reads the file, skips every key that already has an
answer, and asks only the rest. A line cut short by a crash (or any line that is not a JSON object with
the key fields) is skipped with a warning naming its line number, and the file is given its missing
newline before anything is appended, so the next record starts on a line of its own. Records with an
``error`` field are not answers: a rerun asks those again, and the newest record of a key wins.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Key = tuple[str, str]
"""``(probe id, condition id)``."""


def record_key(record: dict[str, Any]) -> Key:
    return (str(record["probe"]), str(record["condition"]))


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed record of ``path`` in file order (none when the file does not exist).

    Malformed lines (a partial line left by a crash, a hand edit) are skipped with a warning giving
    ``path:line``; they never stop a run or a report.
    """
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record_key(record)
            except (ValueError, KeyError, TypeError):
                logger.warning("%s:%d: not a complete record (cut short by a crash?); skipped", path, number)
                continue
            if isinstance(record, dict):
                yield record


def latest(path: Path) -> dict[Key, dict[str, Any]]:
    """The newest record per key (a retried request's answer replaces its earlier error)."""
    return {record_key(r): r for r in read_records(path)}


def answered(path: Path) -> set[Key]:
    """Keys whose newest record is an answer, not an error: what a rerun skips."""
    return {key for key, record in latest(path).items() if not record.get("error")}


class Appender:
    """Appends records to a JSONL file, one flushed line each (one writer per file: the audit's event
    loop; not safe for several processes at once)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A crash can leave a last line without its newline: end it first, so the next record starts on
        # its own line (the partial one is then skipped on read).
        if path.exists() and path.stat().st_size:
            with path.open("rb") as handle:
                handle.seek(-1, os.SEEK_END)
                needs_newline = handle.read(1) != b"\n"
            if needs_newline:
                with path.open("ab") as handle:
                    handle.write(b"\n")
        self._handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
