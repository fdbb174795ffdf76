"""Tests for gatewayd.audit.resume: finding the chain head of an existing log."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import GENESIS_PREV, AuditResumeError, canonical_json, record_hash
from gatewayd.audit.resume import find_resume_point, lock_for_writing

JST = ZoneInfo("Asia/Tokyo")
NOW = datetime(2026, 11, 28, 8, 0, tzinfo=JST)


def chain(count: int, start: int = 1, prev: str = GENESIS_PREV) -> list[dict[str, Any]]:
    records = []
    for seq in range(start, start + count):
        body: dict[str, Any] = {"ts": f"2026-11-27T09:{seq:02d}:00.000000+09:00", "seq": seq,
                "event": "auth.success", "node": "gw1", "prev": prev, "user": f"u{seq}"}
        record = {**body, "hash": record_hash(body)}
        records.append(record)
        prev = str(record["hash"])
    return records


def rehashed(record: dict[str, Any]) -> bytes:
    return canonical_json({**record, "hash": record_hash(record)}).encode()


def write(path: Path, records: list[dict[str, Any]], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(canonical_json(r).encode() + b"\n" for r in records) + tail)


def test_writer_lock_is_exclusive_and_released_with_its_fd(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    fd = lock_for_writing(live)
    with pytest.raises(AuditResumeError, match="another process"):
        lock_for_writing(live)
    os.close(fd)
    os.close(lock_for_writing(live))


def test_brand_new_log(tmp_path: Path) -> None:
    point = find_resume_point(tmp_path / "audit.log", NOW)
    assert point.head is None and point.torn is None
    (tmp_path / "audit.log").touch()  # empty counts as new too
    assert find_resume_point(tmp_path / "audit.log", NOW).head is None


def test_head_is_the_last_record_of_the_live_file(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    records = chain(3)
    write(live, records)
    point = find_resume_point(live, NOW)
    assert point.head == records[-1]
    assert point.head_in_live_file
    assert point.live_first_time == datetime(2026, 11, 27, 9, 1, tzinfo=JST)
    assert str(point.head_day) == "2026-11-27"


def test_torn_tail_is_copied_aside_and_cut_off(tmp_path: Path) -> None:
    live = tmp_path / "audit.log"
    records = chain(2)
    write(live, records, tail=b'{"seq":3,"ev')
    point = find_resume_point(live, NOW)
    assert point.head == records[-1]
    assert point.torn is not None
    assert point.torn.quarantine.name == "audit.log.torn-20261128T080000.000000"
    assert point.torn.quarantine.read_bytes() == b'{"seq":3,"ev'
    assert (point.torn.size, point.torn.sha256) == (12, hashlib.sha256(b'{"seq":3,"ev').hexdigest())
    assert live.read_bytes().endswith(b"}\n")


def test_missing_live_file_resumes_from_highest_seq_not_newest_name(tmp_path: Path) -> None:
    first = chain(2)
    second = chain(2, start=3, prev=first[-1]["hash"])
    # names deliberately disagree with chain order (a clock that went backwards)
    write(tmp_path / "audit.log.20261127T090000.000000", second)
    write(tmp_path / "audit.log.20261127T100000.000000", first)
    point = find_resume_point(tmp_path / "audit.log", NOW)
    assert point.head == second[-1]
    assert not point.head_in_live_file


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: canonical_json({**r, "user": "mallory"}).encode() + b"\n",
        lambda r: b"garbage\n",
        lambda r: canonical_json(r).replace('"u2"', '"\\ud800"').encode() + b"\n",
        lambda r: b"[" * 100_000 + b"\n",
        lambda r: rehashed({**r, "ts": "not a time"}) + b"\n",
    ],
    ids=["edited", "garbage", "lone-surrogate", "deep-nesting", "bad-ts"],
)
def test_untrustworthy_heads_refuse(tmp_path: Path, damage: Any) -> None:
    live = tmp_path / "audit.log"
    records = chain(2)
    write(live, records[:1])
    with live.open("ab") as stream:
        stream.write(damage(records[1]))
    with pytest.raises(AuditResumeError, match="refusing"):
        find_resume_point(live, NOW)

    live.unlink()
    rotated = tmp_path / "audit.log.20261127T090000.000000"
    write(rotated, records[:1])
    with rotated.open("ab") as stream:
        stream.write(damage(records[1]))
    with pytest.raises(AuditResumeError):
        find_resume_point(live, NOW)


def test_a_hostile_first_line_does_not_crash_resume(tmp_path: Path) -> None:
    """The first record only names the rotated file; a bad one must not stop the reader."""
    live = tmp_path / "audit.log"
    records = chain(2)
    live.write_bytes(b"[" * 100_000 + b"\n" + canonical_json(records[1]).encode() + b"\n")
    point = find_resume_point(live, NOW)
    assert point.head == records[1] and point.live_first_time is None
