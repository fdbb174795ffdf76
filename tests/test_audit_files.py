"""Tests for gatewayd.audit.files: streaming lines, tails, names, chain order."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import files

JST = ZoneInfo("Asia/Tokyo")


def test_iter_lines_numbers_lines_and_flags_a_torn_end(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"one\ntwo\nthr")
    got = [(line.number, line.data, line.terminated) for line in files.iter_lines(path)]
    assert got == [(1, b"one", True), (2, b"two", True), (3, b"thr", False)]


def test_iter_lines_skips_over_long_lines_without_loading_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 8)
    path = tmp_path / "f"
    path.write_bytes(b"short\n" + b"x" * 50 + b"\nafter\n" + b"y" * 30)
    got = [(line.number, line.data, line.terminated) for line in files.iter_lines(path)]
    assert got == [(1, b"short", True), (2, None, True), (3, b"after", True), (4, None, False)]


@pytest.mark.parametrize(
    ("content", "last", "torn"),
    [
        (b"", None, 0),
        (b"a\nb\n", b"b", 0),
        (b"a\nb\nhalf", b"b", 4),
        (b"only\n", b"only", 0),
        (b"torn only", None, 9),
        (b"a\n\n", b"", 0),
    ],
)
def test_read_tail(tmp_path: Path, content: bytes, last: bytes | None, torn: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    tail = files.read_tail(path)
    assert (tail.last_line, tail.torn_bytes, tail.size) == (last, torn, len(content))


def test_read_tail_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "_READ_CHUNK", 3)
    path = tmp_path / "f"
    path.write_bytes(b"first line\nsecond, longer line\npartial")
    tail = files.read_tail(path)
    assert tail.last_line == b"second, longer line"
    assert tail.torn_offset == len(b"first line\nsecond, longer line\n")


def test_copy_range_returns_digest(tmp_path: Path) -> None:
    source, target = tmp_path / "s", tmp_path / "t"
    source.write_bytes(b"keep\ntorn bytes")
    digest = files.copy_range(source, 5, target)
    assert target.read_bytes() == b"torn bytes"
    assert digest == hashlib.sha256(b"torn bytes").hexdigest()
    with pytest.raises(FileExistsError):
        files.copy_range(source, 5, target)  # never overwrites


def test_rotated_names_sort_by_time_and_never_collide(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    moment = datetime(2026, 11, 27, 10, 15, 0, 1, tzinfo=JST)
    first = files.rotated_path(live, moment)
    assert first.name == "audit.log.20261127T101500.000001"
    first.touch()
    second = files.rotated_path(live, moment)
    assert second.name == "audit.log.20261127T101500.000001-1"
    second.touch()
    (tmp_path / "audit.log.pub").touch()
    files.quarantine_path(live, moment).touch()
    live.touch()
    assert files.rotated_siblings(live) == [first, second]
    assert files.live_path_of(second) == live
    assert files.live_path_of(live) == live


def test_order_by_chain_uses_first_seq_not_names(tmp_path: Path) -> None:
    def make(name: str, content: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    late = make("a", b'{"seq":20}\n')
    early = make("z", b'{"seq":3}\n{"seq":4}\n')
    damaged = make("m", b"garbage\n" + b'{"seq":9}\n')  # first parseable record counts
    empty = make("e", b"")
    assert files.order_by_chain([late, empty, early, damaged]) == [early, damaged, late, empty]
