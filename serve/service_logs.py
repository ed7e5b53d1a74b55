"""``kit logs``: the last lines of the service's logs (``state/logs``), and following them as they grow."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from serve.service import LOG_NAMES, ServiceError, ServicePaths, read_from


def tail_lines(path: Path, count: int, block: int = 65536) -> list[str]:
    """The last ``count`` lines of ``path`` (read from the end: logs grow large).

    Raises:
        FileNotFoundError: no such file.
    """
    if count <= 0:
        return []
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        position = handle.tell()
        data = b""
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    return data.decode(errors="replace").splitlines()[-count:]


def log_paths(paths: ServicePaths, which: str) -> list[Path]:
    """The log files for ``which`` (``all`` or one of ``LOG_NAMES``).

    Raises:
        ServiceError: an unknown name.
    """
    if which == "all":
        return [paths.log(name) for name in LOG_NAMES]
    if which not in LOG_NAMES:
        raise ServiceError(f"no log named {which!r}; choose one of all, {', '.join(LOG_NAMES)}", 2)
    return [paths.log(which)]


def show_logs(paths: ServicePaths, which: str, count: int, out: TextIO) -> list[Path]:
    """Print the last ``count`` lines of each log of ``which``, each under a ``==> path <==`` header.

    Returns:
        The log files (existing or not) for ``follow_logs``.

    Raises:
        ServiceError: no log exists yet, or an unknown name.
    """
    files = log_paths(paths, which)
    present = [path for path in files if path.is_file()]
    if not present:
        raise ServiceError(f"no logs yet ({', '.join(map(str, files))}); `make start` writes them")
    for path in present:
        if len(files) > 1:
            print(f"==> {path} <==", file=out)
        for line in tail_lines(path, count):
            print(line, file=out)
    out.flush()
    return files


def follow_logs(
    files: list[Path], poll_s: float = 0.5, keep_going: Callable[[], bool] = lambda: True
) -> Iterator[tuple[Path, str]]:
    """``(file, text)`` as whole lines are appended to ``files`` (like ``tail -F``: a file that appears
    later is followed from its start, one that shrinks, e.g. truncated, from its new end).

    Args:
        files: the logs, followed from their ends at the time of this call.
        poll_s: seconds between looks.
        keep_going: checked before each look; the iterator ends when it returns False.
    """
    offsets = {path: path.stat().st_size if path.exists() else 0 for path in files}
    return _follow(offsets, poll_s, keep_going)


def _follow(
    offsets: dict[Path, int], poll_s: float, keep_going: Callable[[], bool]
) -> Iterator[tuple[Path, str]]:
    files = list(offsets)
    while keep_going():
        for path in files:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                offsets[path] = 0
                continue
            if size < offsets[path]:
                offsets[path] = size
            if size > offsets[path]:
                text, offsets[path] = read_from(path, offsets[path])
                if text:
                    yield path, text
        time.sleep(poll_s)
