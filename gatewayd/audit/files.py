"""The audit log on disk: file names, streaming lines, reading the tail, ordering files.

Owns the file layout next to the live log ``<dir>/<name>`` (e.g. ``audit.log``):

* ``<name>.YYYYmmddTHHMMSS.ffffff`` — a **rotated file**, named after the ``ts`` of its first
  record in the log's timezone (so the names sort chronologically and a daily file's name
  starts with its day). If that name is taken (two files starting in the same microsecond, a
  frozen test clock) ``-1``, ``-2``, … is appended. Readers never rely on names for order:
  `order_by_chain` sorts by the first record's ``seq``.
* ``<name>.torn-YYYYmmddTHHMMSS.ffffff`` — the incomplete final line found at start after a
  crash, moved aside byte for byte (see `AuditLog.start`).
* ``<name>.pub`` / ``<name>.pub.<id>`` — public keys (see `signing`).
* ``<name>.lock`` — the single-writer lock (see `resume.lock_for_writing`).

Reading is streaming: `iter_lines` reads one line at a time and never holds more than
`MAX_LINE_BYTES` of one line; `read_tail` seeks from the end.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Final

from gatewayd.audit.chain import parse_line

# Far above any record the writer produces (about 30 fields of at most 1024 escaped chars).
MAX_LINE_BYTES: Final = 1 << 20
_READ_CHUNK: Final = 64 * 1024
_STAMP_FORMAT: Final = "%Y%m%dT%H%M%S.%f"
_STAMP_PATTERN: Final = r"\d{8}T\d{6}\.\d{6}"
_ORDER_PROBE_LINES: Final = 64
# What a shell glob such as ``audit.log*`` also picks up beside the log files: public keys,
# the writer's lock, quarantined torn lines, an atomic write's temporary file.
_NOT_A_LOG: Final = re.compile(
    r".*(\.pub|\.pub\.[0-9a-f]{16}|\.torn-[0-9T.]+(-\d+)?|\.tmp|\.lock)"
)


@dataclass(frozen=True)
class Line:
    """One line of a file: ``data`` without its newline, or None when it was too long."""

    number: int  # 1-based
    data: bytes | None
    terminated: bool  # False only for a final line without "\n" (torn write or cut file)


def iter_lines(path: Path) -> Iterator[Line]:
    """Stream the lines of ``path``; an over-long line is skipped and reported as data=None."""
    with path.open("rb") as stream:
        number = 0
        while True:
            chunk = stream.readline(MAX_LINE_BYTES + 1)
            if not chunk:
                return
            number += 1
            if len(chunk) > MAX_LINE_BYTES:
                terminated = _skip_rest_of_line(stream, chunk)
                yield Line(number, None, terminated)
                continue
            if chunk.endswith(b"\n"):
                yield Line(number, chunk[:-1], True)
            else:
                yield Line(number, chunk, False)


def _skip_rest_of_line(stream: IO[bytes], chunk: bytes) -> bool:
    """Consume the remainder of an over-long line; True if it ended with a newline."""
    while not chunk.endswith(b"\n"):
        chunk = stream.readline(MAX_LINE_BYTES)
        if not chunk:
            return False
    return True


@dataclass(frozen=True)
class Tail:
    """The end of a file: its last complete line and where a trailing partial line starts."""

    last_line: bytes | None  # without "\n" (at most MAX_LINE_BYTES); None if no complete line
    torn_offset: int  # end of the last complete line = start of any torn bytes
    size: int

    @property
    def torn_bytes(self) -> int:
        return self.size - self.torn_offset


def _rfind_newline(stream: IO[bytes], end: int) -> int:
    """Offset of the last newline before ``end``, or -1; reads backwards in chunks."""
    position = end
    while position > 0:
        step = min(_READ_CHUNK, position)
        position -= step
        stream.seek(position)
        found = stream.read(step).rfind(b"\n")
        if found >= 0:
            return position + found
    return -1


def read_tail(path: Path) -> Tail:
    """Find the last complete line of ``path`` and any bytes after it, reading from the end."""
    with path.open("rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        last_newline = _rfind_newline(stream, size)
        if last_newline < 0:
            return Tail(None, 0, size)
        start = _rfind_newline(stream, last_newline) + 1
        stream.seek(start)
        # An over-long last line is returned cut short; it then fails every record check.
        line = stream.read(min(last_newline - start, MAX_LINE_BYTES))
    return Tail(line, last_newline + 1, size)


def copy_range(source: Path, start: int, target: Path) -> str:
    """Copy ``source`` from ``start`` to its end into a new file ``target``; return SHA-256."""
    digest = hashlib.sha256()
    with source.open("rb") as src:
        src.seek(start)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            while chunk := src.read(_READ_CHUNK):
                digest.update(chunk)
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    return digest.hexdigest()


def read_first_line(path: Path) -> bytes | None:
    for line in iter_lines(path):
        return line.data if line.terminated else None
    return None


def stamp(moment: datetime) -> str:
    return moment.strftime(_STAMP_FORMAT)


def _first_free(candidate: Path) -> Path:
    if not candidate.exists():
        return candidate
    for n in range(1, 1_000_000):
        numbered = candidate.with_name(f"{candidate.name}-{n}")
        if not numbered.exists():
            return numbered
    raise FileExistsError(f"no free rotated name for {candidate}")


def rotated_path(live: Path, first_record_time: datetime) -> Path:
    """A free rotated-file name for the live file whose first record has that time."""
    return _first_free(live.with_name(f"{live.name}.{stamp(first_record_time)}"))


def quarantine_path(live: Path, now: datetime) -> Path:
    return _first_free(live.with_name(f"{live.name}.torn-{stamp(now)}"))


def _rotated_pattern(live: Path) -> re.Pattern[str]:
    return re.compile(re.escape(live.name) + r"\." + _STAMP_PATTERN + r"(?:-\d+)?")


def rotated_siblings(live: Path) -> list[Path]:
    """Rotated files of ``live`` in its directory, sorted by name."""
    if not live.parent.is_dir():
        return []
    pattern = _rotated_pattern(live)
    return sorted(p for p in live.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def live_path_of(path: Path) -> Path:
    """The live log a (possibly rotated) file belongs to: strips the rotation suffix."""
    match = re.fullmatch(r"(.+)\." + _STAMP_PATTERN + r"(?:-\d+)?", path.name)
    return path.with_name(match.group(1)) if match else path


def first_seq(path: Path) -> int | None:
    """The ``seq`` of the first parseable record among the first lines of ``path``."""
    for line in iter_lines(path):
        if line.number > _ORDER_PROBE_LINES:
            return None
        record = parse_line(line.data) if line.data is not None else None
        seq = record.get("seq") if record else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            return seq
    return None


def order_by_chain(paths: Sequence[Path]) -> list[Path]:
    """Sort files by the ``seq`` of their first record, so the order of arguments is free.

    Files whose first records cannot be read (empty, damaged) go last, by name; a verifier
    will then report exactly what is wrong with them.
    """

    def key(path: Path) -> tuple[bool, int, str]:
        seq = first_seq(path)
        return (seq is None, seq or 0, str(path))

    return sorted(paths, key=key)


def is_log_name(name: str) -> bool:
    """False for the files that live beside the log but hold no records (see `_NOT_A_LOG`)."""
    return _NOT_A_LOG.fullmatch(name) is None
