"""A sparse on-disk index of the audit log for the console: newest-first pages without a full read.

Owns `AuditIndex` (refresh / search / record / bounds) and its files under the directory the
caller gives (the console uses ``STATE_DIR/audit-index/``). Nothing is ever written next to
the audit log, and only this module's own files (``*.idx``, temporary ``.*.tmp``) in the index
directory are created, replaced or removed.

**What is indexed.** Every audit file of the log (the live file and its rotated siblings, see
`files`) is cut into *blocks* of at most `BLOCK_RECORDS` lines or `BLOCK_BYTES` bytes (whichever
comes first, so one block read is bounded even for long lines). For each block the index keeps
six integers: byte offset, number of lines, lowest and highest ``seq``, earliest and latest
``ts`` (epoch microseconds). Per file it keeps a header: file name, device and inode, size and
mtime, the first record's ``seq`` and ``hash`` and the last indexed record's offset, ``seq``
and ``hash``. That is 48 bytes per block: about 94 KB per million records at ~250 bytes a
record (measured figures in tests/test_audit_index.py and the report).

**Identity and refresh.** `refresh` lists the log's files and ``stat``s each; an unchanged
file (same device, inode, size, mtime) costs nothing more. A file that grew is checked (its
first record and the last indexed record must still be where the index says) and only the new
complete lines are indexed; a torn final line is left until it is completed. A file that was
rewritten, truncated or replaced (different inode, first record, or last indexed record) is
re-indexed from scratch. A live file renamed by rotation keeps its inode and first record, so
its index is reused under the new name. Files removed (retention) lose their index file.
Between refreshes, a search reads each indexed file by its device and inode, not by its name:
a live file renamed by rotation since the last `refresh` is found under its new name (the
rotated siblings are looked through for that inode), so a search that does not refresh
between pages (the console's export) still reads every record it indexed.
Indexing parses every line once (about 40-70 MB, 100-200k records, per second on the
development VM), so the first `refresh` of a large log takes a while: ``max_seconds`` spreads
it over several calls, newest files first, and `complete` tells the caller (the console can
say "indexing older records…"; `progress` is the share of the log's bytes indexed).

**Index files** (one per audit file, ``<sha256>.idx``): a JSON header line with a format
`VERSION` and the log path, then the block table as little-endian int64s. They are written to
a temporary file and renamed (atomic; no fsync — a file lost in a crash is just rebuilt). A
file that is unreadable, of another version, of another log, or inconsistent is removed and
its audit file re-indexed. The index only says *where to look*: records returned are always
parsed from the audit file itself, and a block whose bytes do not start and end on a line
boundary (or whose file is gone) marks its file for re-indexing at the next `refresh`.

**Search** (`search`) walks files and blocks newest first, skips blocks that cannot hold a
record in the time window or below ``before_seq`` using the block table alone, and reads each
remaining block backwards in memory (one block at a time). Work per call is bounded: at most
``max_scan`` records (default `MAX_SCAN`, 200,000) are examined; if the cap is reached the
page holds what was found so far and ``next_before_seq`` lets the caller continue below the
last examined record. ``next_before_seq`` is None only when nothing older remains *in what
could be read*: a search never silently returns fewer records — ``SearchPage.complete`` is
False when a block could not be read as the index describes it (its file was removed or
rewritten since the last `refresh`) or when the scan reached the end of an index that does
not yet cover every file (a `refresh` with ``max_seconds`` that did not finish); the caller
refreshes and searches again, or says the result is incomplete. Search is
not verification (the console shows chain status separately); lines that are not records, or
records without an integer ``seq``, are skipped and counted in ``SearchPage.malformed``.

"Newest first" is the order written, last line first, with files in chain order (by their
lowest ``seq``); the writer guarantees that ``seq`` grows along it. In a damaged log whose
seqs do not grow, pages still never return a record twice or crash, but records out of seq
order may be left out of ``before_seq`` pages — verify the log (``gatewayd audit verify``).
All public methods are blocking (file I/O): call them through ``asyncio.to_thread``. An
internal lock makes concurrent calls from several threads safe.

Memory: the per-file headers (a few hundred bytes each) are kept; a file's block table is
read from its index file when that file is searched (48 bytes per block) and dropped after.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Final

from gatewayd.audit import files
from gatewayd.audit.chain import parse_line
from gatewayd.audit.query import RecordFilter, record_time

VERSION: Final = 1
BLOCK_RECORDS: Final = 512
BLOCK_BYTES: Final = 256 * 1024
MAX_SCAN: Final = 200_000
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 1000

_MAGIC: Final = "gatewayd-audit-index"
_FIELDS_PER_BLOCK: Final = 6  # offset, lines, min_seq, max_seq, min_ts, max_ts
_INT64_MAX: Final = 2**63 - 1
_INT64_MIN: Final = -(2**63)
_HEADER_MAX_BYTES: Final = 64 * 1024
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


@dataclass(frozen=True)
class SearchPage:
    records: list[dict[str, Any]]
    next_before_seq: int | None  # None when there is nothing older
    scanned: int  # records examined (the console shows "searched N records")
    malformed: int = 0  # lines skipped because they are not records (or have no seq)
    # False: records may be missing — part of the log could not be read as the index says
    # (a file removed or rewritten since the last refresh), or the index does not cover
    # every file yet and the scan reached its end. Refresh and search again.
    complete: bool = True


@dataclass
class _Block:
    offset: int
    lines: int
    min_seq: int = _INT64_MAX
    max_seq: int = _INT64_MIN
    min_ts: int = _INT64_MAX
    max_ts: int = _INT64_MIN

    def add(self, seq: int | None, ts: int | None) -> None:
        self.lines += 1
        if seq is not None:
            self.min_seq, self.max_seq = min(self.min_seq, seq), max(self.max_seq, seq)
        if ts is not None:
            self.min_ts, self.max_ts = min(self.min_ts, ts), max(self.max_ts, ts)

    def as_ints(self) -> tuple[int, ...]:
        return (self.offset, self.lines, self.min_seq, self.max_seq, self.min_ts, self.max_ts)


class _Table:
    """A file's block table as packed int64s (48 bytes per block, not a tuple per block)."""

    def __init__(self, ints: array.array[int]) -> None:
        self._ints = ints

    def __len__(self) -> int:
        return len(self._ints) // _FIELDS_PER_BLOCK

    def __getitem__(self, position: int) -> tuple[int, ...]:
        start = position * _FIELDS_PER_BLOCK
        return tuple(self._ints[start:start + _FIELDS_PER_BLOCK])

    def rows(self) -> list[list[int]]:
        return [list(self[i]) for i in range(len(self))]


@dataclass
class _FileEntry:
    """What the index knows about one audit file (the header of its index file)."""

    name: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    indexed_end: int = 0  # end of the last complete line indexed
    first_seq: int | None = None
    first_hash: str | None = None
    last_offset: int | None = None  # start of the last indexed line that was a record
    last_seq: int | None = None
    last_hash: str | None = None
    min_seq: int = _INT64_MAX
    max_seq: int = _INT64_MIN
    records: int = 0
    malformed: int = 0
    blocks: int = 0
    stale: bool = False  # a read found the file differs from the index: rebuild on refresh

    def to_json(self, log_path: Path) -> dict[str, Any]:
        return {
            "magic": _MAGIC, "version": VERSION, "log": str(log_path), "name": self.name,
            "dev": self.dev, "ino": self.ino, "size": self.size, "mtime_ns": self.mtime_ns,
            "indexed_end": self.indexed_end, "first_seq": self.first_seq,
            "first_hash": self.first_hash, "last_offset": self.last_offset,
            "last_seq": self.last_seq, "last_hash": self.last_hash, "min_seq": self.min_seq,
            "max_seq": self.max_seq, "records": self.records, "malformed": self.malformed,
            "blocks": self.blocks,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _FileEntry:
        def count(key: str) -> int:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(key)
            return value

        def optional(key: str, kind: type) -> Any:
            value = data[key]
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ValueError(key)
            return value

        name = data["name"]
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise ValueError("name")
        return cls(
            name=name, dev=count("dev"), ino=count("ino"), size=count("size"),
            mtime_ns=count("mtime_ns"), indexed_end=count("indexed_end"),
            first_seq=optional("first_seq", int), first_hash=optional("first_hash", str),
            last_offset=optional("last_offset", int), last_seq=optional("last_seq", int),
            last_hash=optional("last_hash", str), min_seq=count("min_seq"),
            max_seq=count("max_seq"), records=count("records"), malformed=count("malformed"),
            blocks=count("blocks"),
        )

    @property
    def order_key(self) -> tuple[bool, int, str]:
        """Chain order: by lowest seq (normally the first record's), files without records
        last."""
        empty = self.min_seq > self.max_seq
        return (empty, 0 if empty else self.min_seq, self.name)


@dataclass
class _Scan:
    """State of one search call."""

    flt: RecordFilter
    before_seq: int | None
    limit: int
    max_scan: int
    since_us: int | None
    until_us: int | None
    found: list[dict[str, Any]] = field(default_factory=list)
    scanned: int = 0
    malformed: int = 0
    lowest_examined: int | None = None
    unreadable: bool = False  # a block or block table could not be read: records missing

    @property
    def done(self) -> bool:
        return len(self.found) >= self.limit or self.scanned >= self.max_scan

    def block_may_match(self, block: tuple[int, ...]) -> bool:
        _, lines, min_seq, _, min_ts, max_ts = block
        if lines == 0:
            return False
        if self.before_seq is not None and min_seq >= self.before_seq:
            return False
        if self.since_us is not None and max_ts < self.since_us:
            return False
        return self.until_us is None or min_ts < self.until_us


def _epoch_us(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding at window edges)."""
    return (moment - _EPOCH) // _MICROSECOND


def _record_ts_us(record: dict[str, Any]) -> int | None:
    moment = record_time(record)
    return None if moment is None else _epoch_us(moment)


def _record_seq(record: dict[str, Any] | None) -> int | None:
    """The record's ``seq`` if it is an integer the block table can hold, else None."""
    seq = record.get("seq") if record is not None else None
    if isinstance(seq, int) and not isinstance(seq, bool) and _INT64_MIN < seq < _INT64_MAX:
        return seq
    return None


class AuditIndex:
    """Sparse index of one audit log (see the module docstring); blocking, thread-safe."""

    def __init__(self, log_path: Path, index_dir: Path, *, max_scan: int = MAX_SCAN,
                 block_records: int = BLOCK_RECORDS, block_bytes: int = BLOCK_BYTES) -> None:
        self._log_path = Path(log_path)
        self._dir = Path(index_dir)
        if self._dir.absolute() == self._log_path.parent.absolute():
            raise ValueError("the audit index needs its own directory, not the log's")
        self._max_scan = max_scan
        self._block_records = block_records
        self._block_bytes = block_bytes
        self._lock = threading.RLock()
        self._entries: dict[str, _FileEntry] = {}  # by audit file name
        self._loaded = False
        self._complete = False
        self._progress = 0.0
        self._moved: dict[tuple[int, int], Path] = {}  # renamed since the last refresh
        self.bytes_read = 0  # audit-file bytes read by search/record (tests, diagnostics)

    # ------------------------------------------------------------------ public API

    def refresh(self, *, max_seconds: float | None = None) -> None:
        """Bring the index up to date with the log's files (incremental; cheap if unchanged).

        Files are brought up to date newest first. With ``max_seconds``, no further file is
        started once that much time has passed — but every call finishes at least one file
        that needed work, and a file in progress is finished (rotation bounds its size) — so
        a first indexing of a large log can be spread over several calls while recent
        records are already searchable; `complete` says whether every file is up to date.
        Without it, the call returns only when all files are.
        """
        started = time.monotonic()
        with self._lock:
            self._ensure_dir()
            self._load_once()
            self._moved.clear()
            current = self._stat_audit_files()
            self._reconcile(current)
            self._complete = False
            try:
                worked = False
                for path in self._newest_first(current):
                    if (worked and max_seconds is not None
                            and time.monotonic() - started > max_seconds):
                        return  # at least one file progressed: every call moves forward
                    worked = self._refresh_file(path, current[path]) or worked
                self._complete = True
            finally:
                self._progress = self._indexed_share(current)

    @property
    def complete(self) -> bool:
        """Whether the last `refresh` brought every file of the log up to date."""
        return self._complete

    @property
    def progress(self) -> float:
        """Share (0.0-1.0) of the log's bytes that the last `refresh` left indexed."""
        return 1.0 if self._complete else self._progress

    def _indexed_share(self, current: dict[Path, os.stat_result]) -> float:
        total = sum(st.st_size for st in current.values())
        done = 0
        for path, st in current.items():
            entry = self._entries.get(path.name)
            if entry is not None and not entry.stale and entry.ino == st.st_ino:
                done += min(entry.indexed_end, st.st_size)
        return 1.0 if total == 0 else done / total

    def search(self, flt: RecordFilter, *, before_seq: int | None = None,
               limit: int = DEFAULT_LIMIT) -> SearchPage:
        """Matching records newest first, all with ``seq < before_seq`` (see module doc).

        ``limit`` is capped at `MAX_LIMIT`; at most ``max_scan`` records are examined."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        scan = _Scan(
            flt=flt, before_seq=before_seq, limit=min(limit, MAX_LIMIT), max_scan=self._max_scan,
            since_us=None if flt.since is None else _epoch_us(flt.since),
            until_us=None if flt.until is None else _epoch_us(flt.until),
        )
        with self._lock:
            self._ensure_loaded()
            exhausted = self._scan_newest_first(scan)
            # Unindexed files are the oldest (refresh goes newest first): only a scan that
            # reached the end of the index can have missed records in them.
            complete = not scan.unreadable and (self._complete or not exhausted)
        return SearchPage(records=scan.found, next_before_seq=self._next_before(scan, exhausted),
                          scanned=scan.scanned, malformed=scan.malformed, complete=complete)

    def record(self, seq: int) -> dict[str, Any] | None:
        """The record with this ``seq``, read from its audit file via the index; or None."""
        with self._lock:
            self._ensure_loaded()
            for entry in self._entries_newest_first():
                if not entry.min_seq <= seq <= entry.max_seq:
                    continue
                table = self._read_block_table(entry)
                for position in range(len(table)):
                    _, _, low, high, _, _ = table[position]
                    if not low <= seq <= high:
                        continue
                    for record in self._read_block(entry, table, position) or ():
                        if record is not None and _record_seq(record) == seq:
                            return record
        return None

    def bounds(self) -> tuple[int, int] | None:
        """Lowest and highest indexed ``seq``, or None when nothing is indexed."""
        with self._lock:
            self._ensure_loaded()
            indexed = [e for e in self._entries.values() if e.min_seq <= e.max_seq]
            if not indexed:
                return None
            return min(e.min_seq for e in indexed), max(e.max_seq for e in indexed)

    @property
    def index_bytes(self) -> int:
        """Total size of this index's files on disk."""
        return sum(p.stat().st_size for p in self._dir.glob("*.idx") if p.is_file())

    # ------------------------------------------------------------------ search internals

    def _entries_newest_first(self) -> list[_FileEntry]:
        return sorted(self._entries.values(), key=lambda e: e.order_key, reverse=True)

    def _scan_newest_first(self, scan: _Scan) -> bool:
        """Fill ``scan``; True if every candidate record was examined (nothing older left)."""
        for entry in self._entries_newest_first():
            if entry.min_seq > entry.max_seq:
                continue  # no record in this file
            if scan.before_seq is not None and entry.min_seq >= scan.before_seq:
                continue
            table = self._read_block_table(entry)
            if len(table) != entry.blocks:
                scan.unreadable = True  # its index file is gone or damaged: refresh
            for position in range(len(table) - 1, -1, -1):
                if not scan.block_may_match(table[position]):
                    continue
                if not self._scan_block(entry, table, position, scan):
                    return False
        return True

    def _scan_block(self, entry: _FileEntry, table: _Table, position: int,
                    scan: _Scan) -> bool:
        """Examine one block newest first; False when the page is full or the cap reached."""
        lines = self._read_block(entry, table, position)
        if lines is None:
            scan.unreadable = True  # never silently fewer records: the page says so
            return True
        for record in reversed(lines):
            seq = _record_seq(record)
            if record is None or seq is None:
                scan.malformed += 1
                continue
            if scan.before_seq is not None and seq >= scan.before_seq:
                continue
            if scan.done:
                return False
            scan.scanned += 1
            # min, not "last": next pages then only go down, so no record comes twice.
            if scan.lowest_examined is None or seq < scan.lowest_examined:
                scan.lowest_examined = seq
            if scan.flt.matches(record):
                scan.found.append(record)
        return not scan.done

    def _next_before(self, scan: _Scan, exhausted: bool) -> int | None:
        if exhausted or scan.lowest_examined is None:
            return None
        low = self.bounds()
        if low is not None and scan.lowest_examined <= low[0]:
            return None
        return scan.lowest_examined

    def _read_block(self, entry: _FileEntry, table: _Table,
                    position: int) -> list[dict[str, Any] | None] | None:
        """The lines of one block parsed from the audit file (None for a line that is no
        record). A block that no longer starts and ends on line boundaries, or whose file is
        gone, marks the file stale and gives None (the caller must say records are missing):
        the index is a hint, never the evidence."""
        offset, lines = table[position][0], table[position][1]
        end = table[position + 1][0] if position + 1 < len(table) else entry.indexed_end
        parsed: list[dict[str, Any] | None] = []
        try:
            with self._open_audit_file(entry) as stream:
                if offset > 0:
                    stream.seek(offset - 1)
                    self.bytes_read += 1
                    if stream.read(1) != b"\n":
                        entry.stale = True
                        return None
                while stream.tell() < end:
                    chunk = stream.readline(min(files.MAX_LINE_BYTES + 1, end - stream.tell()))
                    self.bytes_read += len(chunk)
                    if not chunk.endswith(b"\n"):
                        if len(chunk) <= files.MAX_LINE_BYTES:
                            entry.stale = True  # cut short: the file changed under us
                            return None
                        _skip_line(stream, end)
                        parsed.append(None)
                        continue
                    parsed.append(parse_line(chunk[:-1]))
        except OSError:
            entry.stale = True
            return None
        if len(parsed) != lines:
            entry.stale = True
            return None
        return parsed

    def _open_audit_file(self, entry: _FileEntry) -> IO[bytes]:
        """The audit file ``entry`` indexed, found by device and inode: under its name, or —
        renamed by rotation since the last `refresh` — under its new one. OSError if gone."""
        identity = (entry.dev, entry.ino)
        moved = self._moved.get(identity)
        for path in (self._log_path.with_name(entry.name), *([moved] if moved else [])):
            stream = _open_if_same(path, identity)
            if stream is not None:
                return stream
        for path in [*files.rotated_siblings(self._log_path), self._log_path]:
            stream = _open_if_same(path, identity)
            if stream is not None:
                self._moved[identity] = path
                return stream
        raise FileNotFoundError(f"{entry.name} (inode {entry.ino}) is no longer in the log")

    # ------------------------------------------------------------------ block tables

    def _read_block_table(self, entry: _FileEntry) -> _Table:
        """The block table of ``entry`` from its index file ([] and stale if unreadable)."""
        want = entry.blocks * _FIELDS_PER_BLOCK * 8
        try:
            with self._index_path(entry.name).open("rb") as stream:
                header = stream.readline(_HEADER_MAX_BYTES)
                raw = stream.read(want + 1)
        except OSError:
            entry.stale = True
            return _Table(array.array("q"))
        ints = array.array("q")
        if len(raw) != want or not header.endswith(b"\n"):
            entry.stale = True
            return _Table(ints)
        ints.frombytes(raw)
        if sys.byteorder != "little":
            ints.byteswap()
        return _Table(ints)

    # ------------------------------------------------------------------ refresh internals

    def _ensure_dir(self) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _ensure_loaded(self) -> None:
        """Before the first `refresh`, answer from a full refresh rather than from nothing."""
        if not self._loaded:
            self.refresh()

    def _load_once(self) -> None:
        if not self._loaded:
            self._load_index_files()
            self._loaded = True

    def _index_path(self, name: str) -> Path:
        digest = hashlib.sha256(f"{self._log_path}\0{name}".encode("utf-8", "surrogateescape"))
        return self._dir / f"{digest.hexdigest()[:32]}.idx"

    def _newest_first(self, current: dict[Path, os.stat_result]) -> list[Path]:
        """The live file, then rotated files by name descending (named by first record time;
        a ``-N`` suffix sorts after its base name, as it was started later)."""
        rotated = sorted((p for p in current if p != self._log_path), key=lambda p: p.name,
                         reverse=True)
        return [self._log_path, *rotated] if self._log_path in current else rotated

    def _stat_audit_files(self) -> dict[Path, os.stat_result]:
        paths = files.rotated_siblings(self._log_path)
        paths.append(self._log_path)
        current: dict[Path, os.stat_result] = {}
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue  # removed meanwhile (retention, rotation in progress)
            if stat.S_ISREG(st.st_mode):
                current[path] = st
        return current

    def _load_index_files(self) -> None:
        """Read the headers of existing index files; drop those that cannot be trusted."""
        for path in self._dir.glob("*.idx"):
            entry = self._load_header(path)
            if entry is None or self._index_path(entry.name) != path:
                self._remove(path)
                continue
            self._entries[entry.name] = entry

    def _load_header(self, path: Path) -> _FileEntry | None:
        try:
            with path.open("rb") as stream:
                header = json.loads(stream.readline(_HEADER_MAX_BYTES))
            if (not isinstance(header, dict) or header.get("magic") != _MAGIC
                    or header.get("version") != VERSION
                    or header.get("log") != str(self._log_path)):
                return None
            entry = _FileEntry.from_json(header)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        if entry.blocks and not self._index_path(entry.name).exists():
            return None
        self._read_block_table(entry)
        return None if entry.stale else entry

    def _reconcile(self, current: dict[Path, os.stat_result]) -> None:
        """Forget files that are gone; re-attach the index of a file renamed by rotation."""
        by_name = {path.name: st for path, st in current.items()}
        orphans: dict[tuple[int, int], tuple[_FileEntry, _Table]] = {}
        for name, entry in list(self._entries.items()):
            st = by_name.get(name)
            if st is not None and (st.st_dev, st.st_ino) == (entry.dev, entry.ino):
                continue
            del self._entries[name]
            table = self._read_block_table(entry)
            if not entry.stale:
                orphans[(entry.dev, entry.ino)] = (entry, table)
            self._remove(self._index_path(name))
        for path, st in current.items():
            found = orphans.get((st.st_dev, st.st_ino))
            if path.name in self._entries or found is None:
                continue
            old, table = found
            if self._same_start(path, old):
                adopted = replace(old, name=path.name)
                self._entries[path.name] = adopted
                self._write_index(adopted, table.rows())

    def _refresh_file(self, path: Path, st: os.stat_result) -> bool:
        """Bring one file's index up to date; False if nothing had to be done."""
        entry = self._entries.get(path.name)
        if (entry is not None and not entry.stale and entry.dev == st.st_dev
                and entry.ino == st.st_ino and entry.size == st.st_size
                and entry.mtime_ns == st.st_mtime_ns):
            return False  # the common case: nothing changed
        blocks: list[list[int]] | None = None
        if entry is not None and self._can_extend(entry, path, st):
            table = self._read_block_table(entry)
            if not entry.stale and len(table) == entry.blocks:
                blocks = table.rows()
        if entry is None or blocks is None:
            # New, rewritten, replaced or untrustworthy: index the file from its start.
            entry, blocks = _FileEntry(name=path.name, dev=st.st_dev, ino=st.st_ino, size=0,
                                       mtime_ns=0), []
        try:
            self._index_from(entry, blocks, path)
        except OSError:
            return True  # gone or unreadable now; the next refresh tries again
        entry.size, entry.mtime_ns = st.st_size, st.st_mtime_ns
        entry.blocks = len(blocks)
        self._entries[path.name] = entry
        self._write_index(entry, blocks)
        return True

    def _same_start(self, path: Path, entry: _FileEntry) -> bool:
        first = files.read_first_line(path)
        record = parse_line(first) if first is not None else None
        return (_record_seq(record) == entry.first_seq
                and (record or {}).get("hash") == entry.first_hash)

    def _can_extend(self, entry: _FileEntry, path: Path, st: os.stat_result) -> bool:
        """Whether the indexed part of ``path`` is still exactly what the index describes."""
        if entry.indexed_end == 0:
            return not entry.stale
        if entry.stale or (entry.dev, entry.ino) != (st.st_dev, st.st_ino):
            return False
        if st.st_size < entry.indexed_end or not self._same_start(path, entry):
            return False
        if entry.last_offset is None:
            return entry.indexed_end == 0 or entry.records == 0
        try:
            with path.open("rb") as stream:
                stream.seek(entry.last_offset)
                line = stream.readline(files.MAX_LINE_BYTES + 1)
        except OSError:
            return False
        record = parse_line(line[:-1]) if line.endswith(b"\n") else None
        return (record is not None and _record_seq(record) == entry.last_seq
                and record.get("hash") == entry.last_hash)

    def _index_from(self, entry: _FileEntry, blocks: list[list[int]], path: Path) -> None:
        """Index the complete lines of ``path`` after ``entry.indexed_end``."""
        current = _Block(*blocks[-1][:2], *blocks[-1][2:]) if blocks else None
        current_bytes = entry.indexed_end - current.offset if current is not None else 0
        with path.open("rb") as stream:
            stream.seek(entry.indexed_end)
            offset = entry.indexed_end
            for line, data in _complete_lines(stream):
                if (current is None or current.lines >= self._block_records
                        or current_bytes >= self._block_bytes):
                    if current is not None:
                        _store(blocks, current)
                    current, current_bytes = _Block(offset, 0), 0
                    blocks.append(list(current.as_ints()))
                self._note_line(entry, current, offset, data)
                offset += line
                current_bytes += line
            entry.indexed_end = offset
        if current is not None:
            _store(blocks, current)

    def _note_line(self, entry: _FileEntry, block: _Block, offset: int,
                   data: bytes | None) -> None:
        record = parse_line(data) if data is not None else None
        seq = _record_seq(record)
        if record is None or seq is None:
            entry.malformed += 1
            block.add(None, None)
            return
        ts = _record_ts_us(record)
        block.add(seq, ts)
        entry.records += 1
        entry.min_seq, entry.max_seq = min(entry.min_seq, seq), max(entry.max_seq, seq)
        record_hash = record.get("hash")
        if entry.first_seq is None and offset == 0:
            entry.first_seq = seq
            entry.first_hash = record_hash if isinstance(record_hash, str) else None
        entry.last_offset, entry.last_seq = offset, seq
        entry.last_hash = record_hash if isinstance(record_hash, str) else None

    def _write_index(self, entry: _FileEntry, blocks: list[list[int]]) -> None:
        target = self._index_path(entry.name)
        ints = array.array("q", (value for block in blocks for value in block))
        if sys.byteorder != "little":
            ints.byteswap()
        header = json.dumps(entry.to_json(self._log_path), separators=(",", ":"))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(header.encode() + b"\n")
                out.write(ints.tobytes())
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()


def _open_if_same(path: Path, identity: tuple[int, int]) -> IO[bytes] | None:
    """``path`` opened for reading if it is the file with this (device, inode), else None."""
    try:
        stream = path.open("rb")
    except OSError:
        return None
    try:
        st = os.fstat(stream.fileno())
    except OSError:
        st = None
    if st is not None and (st.st_dev, st.st_ino) == identity:
        return stream
    stream.close()
    return None


def _store(blocks: list[list[int]], block: _Block) -> None:
    """Write ``block``'s final values into the table's row for it."""
    for row in reversed(blocks):
        if row[0] == block.offset:
            row[:] = list(block.as_ints())
            return


def _complete_lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(length with newline, data without it) of each complete line from the stream position;
    data is None for a line over `files.MAX_LINE_BYTES` (consumed, never held). Stops before a
    torn final line, which is indexed once it is complete."""
    while True:
        chunk = stream.readline(files.MAX_LINE_BYTES + 1)
        if chunk.endswith(b"\n"):
            yield len(chunk), chunk[:-1]
            continue
        if len(chunk) <= files.MAX_LINE_BYTES:
            return  # end of file, or a torn final line
        length = len(chunk)
        while not chunk.endswith(b"\n"):
            chunk = stream.readline(files.MAX_LINE_BYTES)
            if not chunk:
                return  # an over-long torn line: not complete yet
            length += len(chunk)
        yield length, None


def _skip_line(stream: IO[bytes], end: int) -> None:
    """Consume the rest of an over-long line, not past ``end``."""
    while stream.tell() < end:
        chunk = stream.readline(min(files.MAX_LINE_BYTES, end - stream.tell()))
        if not chunk or chunk.endswith(b"\n"):
            return
