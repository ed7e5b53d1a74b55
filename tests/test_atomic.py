"""serve/atomic.py: outputs are complete or absent, and a benchmark's second run of a day keeps the first."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.atomic import unused_path, write_text_atomic


def test_unused_path_is_the_name_itself_when_free(tmp_path: Path) -> None:
    assert unused_path(tmp_path / "gateway-2026-12-04.json") == tmp_path / "gateway-2026-12-04.json"


def test_unused_path_numbers_past_every_taken_name(tmp_path: Path) -> None:
    (tmp_path / "gateway-2026-12-04.json").write_text("first")
    assert unused_path(tmp_path / "gateway-2026-12-04.json") == tmp_path / "gateway-2026-12-04-2.json"
    (tmp_path / "gateway-2026-12-04-2.json").write_text("second")
    assert unused_path(tmp_path / "gateway-2026-12-04.json") == tmp_path / "gateway-2026-12-04-3.json"
    assert (tmp_path / "gateway-2026-12-04.json").read_text() == "first"


def test_write_text_atomic_replaces_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new", mode=0o600)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(target, "\udcff")  # a lone surrogate cannot be written as UTF-8
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
