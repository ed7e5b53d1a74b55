"""Atomic writes: an output is either complete or absent, never half-written.

A file goes to a temporary sibling and is renamed over the target (``os.replace`` is atomic within one
file system, POSIX). A folder is built as a hidden sibling and renamed into place at the end; on failure
the partial folder is removed and an existing target is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def unused_path(path: Path) -> Path:
    """``path`` when nothing is there, else the first of ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ...
    that is free: a second benchmark run on the same day keeps the first one's file instead of replacing
    it.

    Args:
        path: the preferred file name (e.g. ``bench/gateway-2026-12-04.json``).

    Returns:
        A path in the same folder that does not exist (yet: pair it with ``write_text_atomic``).
    """
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: target file; its parent folder is created if missing.
        text: the whole new content.
        mode: permission bits for the new file (e.g. ``0o600`` for secrets); default from the umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``mkdir``/``open`` would have given
    (``mkdtemp``/``mkstemp`` create 0700/0600, which would make a shared model folder unreadable)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def promote(staging: Path, target: Path, *, replace: bool = False) -> None:
    """Move a finished folder ``staging`` to ``target`` (same file system), old target out last.

    Args:
        staging: the complete new folder.
        target: where it belongs.
        replace: swap out an existing ``target`` (deleted only once the new one is in place).

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is False.
    """
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    _usual_modes(staging)
    if target.exists():
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def atomic_dir(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to ``target`` when the block succeeds.

    Args:
        target: the final folder.
        replace: when ``target`` exists, swap it out for the new one (the old one is deleted only after
            the new one is in place); when False an existing target raises ``FileExistsError``.

    Yields:
        The temporary folder to fill (same file system as ``target``).

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is False.
    """
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        yield staging
        promote(staging, target, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
