"""Tests for gatewayd.audit.index: the console's sparse on-disk index of the audit log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import AuditLog, files
from gatewayd.audit.chain import canonical_json, record_hash
from gatewayd.audit.index import BLOCK_RECORDS, AuditIndex, SearchPage
from gatewayd.audit.query import RecordFilter, query_records

JST = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 27, 9, 0, tzinfo=JST)
USERS = ("alice", "bob", "carol", "田中")


class Clock:
    """Each reading is one minute after the previous one (never the wall clock)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def emit_some(log: AuditLog, count: int, start: int = 0) -> None:
    for n in range(start, start + count):
        user = USERS[n % len(USERS)]
        if n % 5 == 0:
            log.emit("access.deny", user=user, source_ip="192.0.2.11", service="files",
                     method="POST", path=f"/files/{n}", rule="hr-only", reason="group hr")
        elif n % 7 == 0:
            log.emit("auth.failure", user=user, source_ip="203.0.113.9", device=f"dev-{n % 3}")
        else:
            log.emit("access.allow", user=user, source_ip="192.0.2.10", service="approval",
                     method="GET", path=f"/approval/{n}", rule="staff", status=200,
                     device=f"dev-{n % 3}", session=f"s{n % 4}")


def new_log(directory: Path, clock: Clock, **options: Any) -> AuditLog:
    return AuditLog(directory / "audit.log", node="gw1", signing_key_path=directory / "key",
                    clock=clock, fsync="interval", **options)


async def write_log(directory: Path, count: int, **options: Any) -> Path:
    log = new_log(directory, Clock(), **options)
    await log.start()
    emit_some(log, count)
    await log.close()
    return log.path


def log_files(live: Path) -> list[Path]:
    """The log's files in chain order (oldest first)."""
    return files.order_by_chain([*files.rotated_siblings(live), live])


def all_records(live: Path, flt: RecordFilter | None = None) -> list[dict[str, Any]]:
    return list(query_records(log_files(live), flt or RecordFilter()))


def collect(index: AuditIndex, flt: RecordFilter, limit: int) -> tuple[list[dict[str, Any]], int]:
    """Page through every match (newest first); return the records and the number of pages."""
    found: list[dict[str, Any]] = []
    before: int | None = None
    pages = 0
    while True:
        page = index.search(flt, before_seq=before, limit=limit)
        pages += 1
        assert len(page.records) <= limit
        found.extend(page.records)
        if page.next_before_seq is None:
            return found, pages
        assert before is None or page.next_before_seq < before  # always progresses
        before = page.next_before_seq


@pytest.fixture
async def rotated_log(tmp_path: Path) -> Path:
    """About 120 records over several files (size rotation), written by the real AuditLog."""
    return await write_log(tmp_path / "logs", 120, rotate_bytes=6000, checkpoint_every=16)


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit-index"


FILTERS = [
    pytest.param(RecordFilter(), id="all"),
    pytest.param(RecordFilter(user="alice"), id="user"),
    pytest.param(RecordFilter(user="田中"), id="japanese-user"),
    pytest.param(RecordFilter(event="access.*"), id="event-pattern"),
    pytest.param(RecordFilter(device="dev-1"), id="device"),
    pytest.param(RecordFilter(session="s2"), id="session"),
    pytest.param(RecordFilter(source_ip="203.0.113.9"), id="source-ip"),
    pytest.param(RecordFilter(result="failure"), id="result-failure"),
    pytest.param(RecordFilter(result="success", user="bob"), id="result-success-user"),
    pytest.param(RecordFilter(text="APPROVAL/1"), id="text"),
    pytest.param(RecordFilter(since=T0 + timedelta(minutes=30),
                              until=T0 + timedelta(minutes=70)), id="time-window"),
    pytest.param(RecordFilter(user="nobody"), id="no-match"),
]


@pytest.mark.parametrize("flt", FILTERS)
@pytest.mark.parametrize("limit", [1, 7, 50])
async def test_search_pages_equal_a_full_query_newest_first(
    rotated_log: Path, index_dir: Path, flt: RecordFilter, limit: int
) -> None:
    assert len(log_files(rotated_log)) >= 3  # rotation happened: several files are searched
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    found, _ = collect(index, flt, limit)
    expected = list(reversed(all_records(rotated_log, flt)))
    assert [r["seq"] for r in found] == [r["seq"] for r in expected]
    assert found == expected  # the records themselves, parsed from the audit files


async def test_page_shape_and_scanned_count(rotated_log: Path, index_dir: Path) -> None:
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    everything = all_records(rotated_log)
    page = index.search(RecordFilter(), limit=10)
    assert isinstance(page, SearchPage)
    assert [r["seq"] for r in page.records] == [r["seq"] for r in everything[::-1][:10]]
    assert page.scanned == 10
    assert page.next_before_seq == everything[-10]["seq"]
    last = index.search(RecordFilter(), before_seq=3, limit=10)
    assert [r["seq"] for r in last.records] == [2, 1]
    assert last.next_before_seq is None
    with pytest.raises(ValueError, match="limit"):
        index.search(RecordFilter(), limit=0)


async def test_record_and_bounds(rotated_log: Path, index_dir: Path) -> None:
    index = AuditIndex(rotated_log, index_dir)
    everything = all_records(rotated_log)
    assert index.bounds() == (1, everything[-1]["seq"])  # first use refreshes by itself
    for expected in everything:
        assert index.record(expected["seq"]) == expected
    assert index.record(0) is None
    assert index.record(everything[-1]["seq"] + 1) is None


async def test_empty_or_missing_log(tmp_path: Path, index_dir: Path) -> None:
    index = AuditIndex(tmp_path / "nothing" / "audit.log", index_dir)
    index.refresh()
    assert index.bounds() is None
    assert index.search(RecordFilter()) == SearchPage([], None, 0)
    assert index.record(1) is None


async def test_refresh_follows_a_running_log_through_rotation(
    tmp_path: Path, index_dir: Path
) -> None:
    log = new_log(tmp_path / "logs", Clock(), rotate_bytes=4000, checkpoint_every=10)
    await log.start()
    index = AuditIndex(log.path, index_dir)
    for round_ in range(6):
        emit_some(log, 15, start=round_ * 15)
        index.refresh()
        found, _ = collect(index, RecordFilter(), 25)
        assert found == list(reversed(all_records(log.path)))
    await log.close()
    index.refresh()
    assert collect(index, RecordFilter(), 25)[0] == list(reversed(all_records(log.path)))
    # One index file per audit file, nothing else.
    assert len(list(index_dir.glob("*.idx"))) == len(log_files(log.path))
    assert sorted(p.name for p in index_dir.iterdir()) == sorted(
        p.name for p in index_dir.glob("*.idx"))


async def test_rotation_reuses_the_index_of_the_renamed_live_file(
    tmp_path: Path, index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    log = new_log(tmp_path / "logs", clock, rotate_daily=True)
    await log.start()
    emit_some(log, 40)
    index = AuditIndex(log.path, index_dir)
    index.refresh()
    clock.now += timedelta(days=1)
    emit_some(log, 1)  # a new day: the live file is renamed, a new one started
    assert len(log_files(log.path)) == 2
    indexed_from: list[tuple[str, int]] = []
    real = AuditIndex._index_from

    def spy(self: AuditIndex, entry: Any, blocks: list[list[int]], path: Path) -> None:
        indexed_from.append((path.name, entry.indexed_end))
        real(self, entry, blocks, path)

    monkeypatch.setattr(AuditIndex, "_index_from", spy)
    index.refresh()
    rotated = [name for name, start in indexed_from if name != "audit.log"]
    # The rotated file was only extended (its closing checkpoint), not read from byte 0.
    assert all(start > 0 for name, start in indexed_from if name in rotated)
    assert collect(index, RecordFilter(), 50)[0] == list(reversed(all_records(log.path)))
    await log.close()


async def test_a_search_without_refresh_after_rotation_still_finds_everything(
    tmp_path: Path, index_dir: Path
) -> None:
    """The live file renamed by rotation is found by its inode, page after page, without a
    refresh in between (as the console's export pages): nothing silently left out."""
    clock = Clock()
    log = new_log(tmp_path / "logs", clock, rotate_daily=True)
    await log.start()
    emit_some(log, 40)
    index = AuditIndex(log.path, index_dir, block_records=16)
    index.refresh()
    flt = RecordFilter(event="access.allow")
    expected = list(reversed(all_records(log.path, flt)))
    first = index.search(flt, limit=5)
    assert first.records == expected[:5] and first.complete
    clock.now += timedelta(days=1)
    emit_some(log, 1)  # a new day: the live file is renamed, a new one started
    assert len(log_files(log.path)) == 2
    rest: list[dict[str, Any]] = []
    before = first.next_before_seq
    while before is not None:  # no refresh: the index still names the old live file
        page = index.search(flt, before_seq=before, limit=7)
        assert page.complete
        rest.extend(page.records)
        before = page.next_before_seq
    assert first.records + rest == expected
    page = index.search(flt, limit=1000)
    assert page.records == expected and page.complete
    await log.close()


async def test_a_file_removed_before_refresh_makes_the_page_incomplete(
    rotated_log: Path, index_dir: Path
) -> None:
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    log_files(rotated_log)[0].unlink()  # retention, between refresh and search
    page = index.search(RecordFilter(), limit=1000)
    assert not page.complete  # fewer records, and it says so
    assert page.records == list(reversed(all_records(rotated_log)))
    index.refresh()
    assert index.search(RecordFilter(), limit=1000).complete


async def test_an_unfinished_refresh_says_how_far_it_got(
    rotated_log: Path, index_dir: Path
) -> None:
    index = AuditIndex(rotated_log, index_dir)
    index.refresh(max_seconds=0)  # one file, the live one, then it stops
    assert not index.complete and 0 < index.progress < 1
    page = index.search(RecordFilter(), limit=1000)
    assert not page.complete and page.next_before_seq is None
    full = index.search(RecordFilter(), limit=1)  # a full page, from indexed files only
    assert full.complete
    while not index.complete:
        index.refresh(max_seconds=0)
    assert index.progress == 1.0
    assert index.search(RecordFilter(), limit=1000).complete


async def test_refresh_is_cheap_when_nothing_changed(
    rotated_log: Path, index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    before = {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()}
    opened: list[str] = []
    real_open = Path.open

    def spy_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy_open)
    index.refresh()
    assert opened == []  # stat only: no audit file and no index file read or written
    monkeypatch.undo()
    assert {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()} == before


async def test_retention_removes_files(rotated_log: Path, index_dir: Path) -> None:
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    oldest = log_files(rotated_log)[0]
    assert oldest.name != "audit.log"
    oldest.unlink()
    index.refresh()
    remaining = all_records(rotated_log)
    assert index.bounds() == (remaining[0]["seq"], remaining[-1]["seq"])
    assert collect(index, RecordFilter(), 50)[0] == list(reversed(remaining))
    assert len(list(index_dir.glob("*.idx"))) == len(log_files(rotated_log))


async def test_torn_line_is_indexed_once_complete(rotated_log: Path, index_dir: Path) -> None:
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    last = all_records(rotated_log)[-1]
    record = {"ts": "2026-11-27T12:00:00+09:00", "seq": last["seq"] + 1, "event": "auth.success",
              "node": "gw1", "prev": last["hash"], "user": "dave"}
    record["hash"] = record_hash(record)
    line = canonical_json(record).encode() + b"\n"
    with rotated_log.open("ab") as out:
        out.write(line[:20])
    index.refresh()
    assert index.bounds() == (1, last["seq"])
    with rotated_log.open("ab") as out:
        out.write(line[20:])
    index.refresh()
    assert index.bounds() == (1, last["seq"] + 1)
    assert index.search(RecordFilter(user="dave")).records == [record]


async def test_a_replaced_live_file_is_reindexed(tmp_path: Path, index_dir: Path) -> None:
    live = await write_log(tmp_path / "a", 30)
    index = AuditIndex(live, index_dir)
    index.refresh()
    other = await write_log(tmp_path / "b", 10)
    shutil.copyfile(other, live)  # same name, different content (and maybe the same size)
    index.refresh()
    assert collect(index, RecordFilter(), 50)[0] == list(reversed(all_records(other)))


async def test_a_same_size_rewrite_is_caught_when_read(tmp_path: Path, index_dir: Path) -> None:
    """stat() cannot see a rewrite that keeps size and mtime; reading the block can."""
    live = await write_log(tmp_path / "logs", 30)
    index = AuditIndex(live, index_dir)
    index.refresh()
    stat = live.stat()
    data = live.read_bytes()
    shifted = b"\n" + data[:-1]  # every line now starts one byte later
    live.write_bytes(shifted)
    os.utime(live, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    page = index.search(RecordFilter())
    assert page.records == []  # nothing is returned from a block that no longer fits
    assert not page.complete  # ... and the page says records are missing
    index.refresh()  # the file was marked stale: rebuilt from the bytes now there
    assert collect(index, RecordFilter(), 50)[0] == list(reversed(all_records(live)))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "other-version"])
async def test_untrusted_index_files_are_rebuilt(
    rotated_log: Path, index_dir: Path, damage: str
) -> None:
    AuditIndex(rotated_log, index_dir).refresh()
    for path in index_dir.glob("*.idx"):
        data = path.read_bytes()
        header, _, table = data.partition(b"\n")
        meta = json.loads(header)
        if damage == "garbage":
            path.write_bytes(b"\x00not an index\n" + os.urandom(64))
        elif damage == "truncated":
            path.write_bytes(data[:-5])
        elif damage == "foreign":
            meta["log"] = "/somewhere/else/audit.log"
            path.write_bytes(json.dumps(meta).encode() + b"\n" + table)
        else:
            meta["version"] = 99
            path.write_bytes(json.dumps(meta).encode() + b"\n" + table)
    (index_dir / "unrelated.txt").write_text("kept")
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    assert collect(index, RecordFilter(), 50)[0] == list(reversed(all_records(rotated_log)))
    assert (index_dir / "unrelated.txt").read_text() == "kept"  # not ours: left alone


async def test_a_lying_block_table_never_changes_content(
    rotated_log: Path, index_dir: Path
) -> None:
    """Block offsets moved by a few bytes (still valid JSON headers): records still come from
    the audit file, the damaged file is marked stale and rebuilt on the next refresh."""
    AuditIndex(rotated_log, index_dir).refresh()
    for path in index_dir.glob("*.idx"):
        header, _, table = path.read_bytes().partition(b"\n")
        ints = bytearray(table)
        for at in range(48, len(ints), 48):
            ints[at] = (ints[at] + 3) % 256  # shift every block offset but the first
        path.write_bytes(header + b"\n" + bytes(ints))
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    truth = {r["seq"]: r for r in all_records(rotated_log)}
    for record in collect(index, RecordFilter(), 50)[0]:
        assert truth[record["seq"]] == record
    index.refresh()
    assert collect(index, RecordFilter(), 50)[0] == list(reversed(truth.values()))


async def test_malformed_lines_are_skipped_and_counted(tmp_path: Path, index_dir: Path) -> None:
    live = await write_log(tmp_path / "logs", 20)
    lines = live.read_bytes().split(b"\n")
    lines[5] = b"{not json"
    lines[9] = b'{"seq": "nine"}'
    live.write_bytes(b"\n".join(lines))
    index = AuditIndex(live, index_dir)
    index.refresh()
    found, _ = collect(index, RecordFilter(), 100)
    assert len(found) == len(lines) - 1 - 2
    page = index.search(RecordFilter(), limit=100)
    assert page.malformed == 2


async def test_scan_cap_bounds_one_call(rotated_log: Path, index_dir: Path) -> None:
    index = AuditIndex(rotated_log, index_dir, max_scan=25)
    index.refresh()
    total = len(all_records(rotated_log))
    page = index.search(RecordFilter(user="nobody"))
    assert page.records == [] and page.scanned == 25
    assert page.next_before_seq is not None
    found, pages = collect(index, RecordFilter(user="nobody"), 10)
    assert found == [] and pages == -(-total // 25)
    # The cap also applies while matches are being found.
    alice, _ = collect(index, RecordFilter(user="alice"), 50)
    assert alice == list(reversed(all_records(rotated_log, RecordFilter(user="alice"))))


async def test_index_is_written_only_under_index_dir(rotated_log: Path, index_dir: Path) -> None:
    before = sorted(p.name for p in rotated_log.parent.iterdir())
    index = AuditIndex(rotated_log, index_dir)
    index.refresh()
    index.search(RecordFilter(text="x"))
    assert sorted(p.name for p in rotated_log.parent.iterdir()) == before
    assert index_dir.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in index_dir.iterdir())


# ---------------------------------------------------------------------- a big log

BIG_RECORDS = 200_000


@dataclass
class BigLog:
    live: Path
    index_dir: Path
    last_seq: int
    index_seconds: float


def synthesize(live: Path, count: int) -> int:
    """Append ``count`` correctly chained records after the real log's last record."""
    last = json.loads(live.read_bytes().rsplit(b"\n", 2)[-2])
    seq, prev = last["seq"], last["hash"]
    moment = datetime.fromisoformat(last["ts"])
    chunk: list[bytes] = []
    with live.open("ab") as out:
        for n in range(count):
            seq += 1
            moment += timedelta(seconds=1)
            record: dict[str, Any] = {
                "ts": moment.isoformat(timespec="microseconds"), "seq": seq,
                "event": "access.allow", "node": "gw1", "prev": prev,
                "user": USERS[n % 4], "source_ip": "192.0.2.10", "service": "approval",
                "method": "GET", "path": f"/approval/doc/{n}", "rule": "staff", "status": 200,
            }
            if n == count // 2:
                record["user"] = "needle"
            body = canonical_json(record)
            prev = hashlib.sha256(body.encode()).hexdigest()
            record["hash"] = prev
            chunk.append(canonical_json(record).encode() + b"\n")
            if len(chunk) == 4096:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))
    return seq


@pytest.fixture(scope="module")
def big_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigLog]:
    directory = tmp_path_factory.mktemp("big")
    live = asyncio.run(write_log(directory / "logs", 200))
    last_seq = synthesize(live, BIG_RECORDS)
    index_dir = directory / "index"
    started = time.perf_counter()
    AuditIndex(live, index_dir).refresh()
    yield BigLog(live, index_dir, last_seq, time.perf_counter() - started)


def test_big_log_index_is_small(big_log: BigLog) -> None:
    index = AuditIndex(big_log.live, big_log.index_dir)
    index.refresh()  # loads the existing index: nothing to do
    size = index.index_bytes
    per_million = size * 1_000_000 / big_log.last_seq
    log_bytes = big_log.live.stat().st_size
    print(f"\nindexed {big_log.last_seq} records ({log_bytes / 1e6:.1f} MB) in "
          f"{big_log.index_seconds:.2f} s; index {size} bytes = {per_million / 1024:.1f} KiB "
          "per 1M records")
    assert size < log_bytes / 1000  # sparse: far below 0.1 % of the log
    assert per_million < 200 * 1024
    assert index.bounds() == (1, big_log.last_seq)


def test_big_log_pages_read_only_a_few_blocks(big_log: BigLog) -> None:
    index = AuditIndex(big_log.live, big_log.index_dir)
    index.refresh()
    log_bytes = big_log.live.stat().st_size
    block_bytes = log_bytes / (big_log.last_seq / BLOCK_RECORDS)
    timings = {}
    for name, before in (("first", None), ("middle", big_log.last_seq // 2),
                         ("near-start", 1000)):
        index.bytes_read = 0
        started = time.perf_counter()
        page = index.search(RecordFilter(), before_seq=before, limit=50)
        timings[name] = time.perf_counter() - started
        assert len(page.records) == 50
        top = big_log.last_seq if before is None else before - 1
        assert [r["seq"] for r in page.records] == list(range(top, top - 50, -1))
        assert index.bytes_read <= 2 * block_bytes + 2  # one or two blocks, not the log
    index.bytes_read = 0
    assert index.record(big_log.last_seq // 3) is not None
    assert index.bytes_read <= block_bytes * 1.5
    print("\npage timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))


def test_big_log_time_window_seeks(big_log: BigLog) -> None:
    index = AuditIndex(big_log.live, big_log.index_dir)
    index.refresh()
    middle = index.record(big_log.last_seq // 2)
    assert middle is not None
    moment = datetime.fromisoformat(middle["ts"])
    index.bytes_read = 0
    page = index.search(RecordFilter(until=moment), limit=20)
    assert page.records[0]["seq"] == middle["seq"] - 1
    assert index.bytes_read < 3 * 256 * 1024


def test_big_log_search_work_is_capped(big_log: BigLog) -> None:
    index = AuditIndex(big_log.live, big_log.index_dir, max_scan=50_000)
    index.refresh()
    started = time.perf_counter()
    page = index.search(RecordFilter(user="needle"))
    seconds = time.perf_counter() - started
    assert page.records == [] and page.scanned == 50_000
    assert page.next_before_seq == big_log.last_seq - 50_000 + 1
    found, _ = collect(index, RecordFilter(user="needle"), 50)
    assert [r["user"] for r in found] == ["needle"]
    print(f"\n50k records scanned without a match in {seconds * 1000:.0f} ms")


async def test_hostile_values_do_not_break_the_index(tmp_path: Path, index_dir: Path) -> None:
    live = await write_log(tmp_path / "logs", 10)
    with live.open("ab") as out:
        out.write(b'{"seq":' + str(10**30).encode() + b',"ts":"2026-11-27T10:00:00+09:00"}\n')
        out.write(b'{"seq":-5,"ts":"0001-01-01T00:00:00+14:00","event":"x"}\n')
        out.write(b'{"seq":99,"ts":"9999-12-31T23:59:59-12:00","event":"y"}\n')
        out.write(b"[" * 100_000 + b"\n")
    index = AuditIndex(live, index_dir)
    index.refresh()
    page = index.search(RecordFilter(), limit=100)
    # Newest first means last written first: a damaged log's seqs are not re-sorted.
    assert [r["seq"] for r in page.records[:4]] == [99, -5, 12, 11]
    assert page.malformed == 2
    assert index.bounds() == (-5, 99)
    assert index.record(99) == {"seq": 99, "ts": "9999-12-31T23:59:59-12:00", "event": "y"}


def test_index_dir_must_not_be_the_log_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="own directory"):
        AuditIndex(tmp_path / "audit.log", tmp_path)


async def test_file_order_does_not_depend_on_a_readable_first_line(
    tmp_path: Path, index_dir: Path
) -> None:
    live = await write_log(tmp_path / "logs", 60, rotate_bytes=5000)
    oldest = log_files(live)[0]
    data = oldest.read_bytes()
    oldest.write_bytes(b"damaged first line\n" + data.split(b"\n", 1)[1])
    index = AuditIndex(live, index_dir)
    found, _ = collect(index, RecordFilter(), 40)
    assert [r["seq"] for r in found] == [r["seq"] for r in reversed(all_records(live))]


async def test_pages_of_a_log_with_seqs_out_of_order_never_repeat(
    tmp_path: Path, index_dir: Path
) -> None:
    live = await write_log(tmp_path / "logs", 30)
    lines = live.read_bytes().split(b"\n")[:-1]
    lines[10], lines[20] = lines[20], lines[10]  # a damaged (reordered) log
    live.write_bytes(b"\n".join(lines) + b"\n")
    index = AuditIndex(live, index_dir)
    found, _ = collect(index, RecordFilter(), 4)
    seqs = [r["seq"] for r in found]
    assert len(seqs) == len(set(seqs))


def test_big_log_search_memory_is_bounded(big_log: BigLog) -> None:
    """Peak memory of a search does not grow with the records examined: one block at a time."""
    index = AuditIndex(big_log.live, big_log.index_dir, max_scan=20_000)
    index.refresh()
    peaks = []
    for _ in range(2):
        tracemalloc.start()
        try:
            page = index.search(RecordFilter(text="no such text"))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert page.scanned == 20_000
    # 20,000 records are about 7 MB of log; a block is 512 of them.
    print(f"\nsearch peak memory {max(peaks) / 1024:.0f} KiB")
    assert max(peaks) < 3 * 1024 * 1024, peaks


async def test_refresh_with_a_time_budget_indexes_newest_files_first(
    rotated_log: Path, index_dir: Path
) -> None:
    chain = log_files(rotated_log)
    index = AuditIndex(rotated_log, index_dir)
    index.refresh(max_seconds=0)  # one file per call: the budget is checked between files
    assert not index.complete
    newest = list(reversed(all_records(rotated_log)))
    live_only = list(reversed(list(query_records([chain[-1]], RecordFilter()))))
    assert collect(index, RecordFilter(), 50)[0] == live_only
    calls = 1
    while not index.complete:
        index.refresh(max_seconds=0)
        calls += 1
        assert calls <= len(chain)
    assert calls == len(chain)  # one file per call, newest first
    assert collect(index, RecordFilter(), 50)[0] == newest


async def test_refresh_and_search_in_threads_while_the_log_is_written(
    tmp_path: Path, index_dir: Path
) -> None:
    log = new_log(tmp_path / "logs", Clock(), rotate_bytes=3000, checkpoint_every=7)
    await log.start()
    index = AuditIndex(log.path, index_dir)

    def look() -> list[int]:
        index.refresh()
        return [r["seq"] for r in index.search(RecordFilter(), limit=30).records]

    for round_ in range(15):
        emit_some(log, 7, start=round_ * 7)
        seqs, (low, high) = await asyncio.gather(
            asyncio.to_thread(look), asyncio.to_thread(lambda: index.bounds() or (0, 0)))
        assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs)
        assert low <= high
    await log.close()
    index.refresh()
    assert collect(index, RecordFilter(), 40)[0] == list(reversed(all_records(log.path)))
