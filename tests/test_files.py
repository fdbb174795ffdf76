"""Tests for gatewayd.files: private files from the first byte, atomic and durable replacement."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from gatewayd.files import atomic_write, exposure


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400])
def test_atomic_write_creates_with_the_final_mode_despite_the_umask(tmp_path: Path, mode: int) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "f", b"data", mode=mode, overwrite=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode
    assert (tmp_path / "f").read_bytes() == b"data"


def test_without_overwrite_an_existing_file_is_kept(tmp_path: Path) -> None:
    atomic_write(tmp_path / "key", b"first", mode=0o600, overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "key", b"second", mode=0o600, overwrite=False)
    assert (tmp_path / "key").read_bytes() == b"first"
    atomic_write(tmp_path / "key", b"second", mode=0o600, overwrite=True)
    assert (tmp_path / "key").read_bytes() == b"second"


def test_a_planted_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "key").symlink_to(victim)
    atomic_write(tmp_path / "key", b"secret", mode=0o600, overwrite=True)
    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "key").is_symlink()


def test_no_temporary_file_is_left_behind(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a", b"1", mode=0o600, overwrite=False)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "a", b"2", mode=0o600, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.json"
    big_a, big_b = b"a" * 1_000_000, b"b" * 1_000_000
    atomic_write(path, big_a, mode=0o600, overwrite=True)
    seen: set[int] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            seen.add(len(set(data)) if data else 0)
            assert data in (big_a, big_b)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(20):
        atomic_write(path, big_b if i % 2 else big_a, mode=0o600, overwrite=True)
    stop.set()
    reader.join()
    assert seen == {1}


@pytest.mark.parametrize(("mode", "exposed"), [(0o600, False), (0o400, False), (0o640, True),
                                               (0o604, True), (0o660, True)])
def test_exposure(tmp_path: Path, mode: int, exposed: bool) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"k")
    path.chmod(mode)
    problem = exposure(path, "test key")
    assert (problem is not None) == exposed
    if exposed:
        assert problem == f"test key {path} is accessible by group/others (mode {mode:04o}); run chmod 600 on it"
