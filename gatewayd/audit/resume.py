"""Where an existing audit log ends: finding the chain head to continue from at start.

Owns the start-up rules (security staff rely on them being conservative):

* The chain continues from the last complete record of the live file, or — when the live file
  is missing or empty (the daemon stopped right after a rotation) — from the rotated sibling
  whose last record has the highest ``seq``. No head at all means a brand-new chain.
* An **incomplete final line** (a torn write: crash or full disk mid-record) is copied byte for
  byte to ``<name>.torn-<time>`` and cut off the live file, so new records start on a fresh
  line. The caller records this in an ``audit.recovery`` record and counts the torn record's
  seq as lost (it is never reused).
* If the head line is not a valid record (edited, garbage, or a rotated file that does not end
  in a readable record) start-up is **refused** with `AuditResumeError`: continuing from an
  untrusted head would launder tampering into a valid-looking chain. An operator must run
  ``gatewayd audit verify`` and move the damaged file aside.

* **One writer per log.** `lock_for_writing` takes an exclusive ``flock`` on
  ``<name>.lock``; a second process (an overlapping restart, a misconfigured second node)
  would otherwise fork the chain, so it is refused. The lock disappears with the process.

Only the head is checked here (start-up must stay fast on a large file); the full chain is
the job of `verify_files`.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from gatewayd.audit import files
from gatewayd.audit.chain import check_line
from gatewayd.files import fsync_directory


class AuditResumeError(Exception):
    """The existing log cannot be continued safely; an operator must look at it first."""


@dataclass(frozen=True)
class TornTail:
    """An incomplete final line that was moved aside."""

    quarantine: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class ResumePoint:
    head: Mapping[str, Any] | None  # the record to chain from; None for a brand-new log
    head_in_live_file: bool
    live_first_time: datetime | None  # ts of the live file's first record (rotated name)
    torn: TornTail | None

    @property
    def head_day(self) -> date | None:
        """Calendar day of the head record (its ts is already in the log's timezone)."""
        return datetime.fromisoformat(self.head["ts"]).date() if self.head else None


def lock_for_writing(live: Path) -> int:
    """Take the single-writer lock of ``live``; returns the fd to keep open while writing."""
    lock_path = live.with_name(live.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditResumeError(
            f"{live} is being written by another process (it holds {lock_path}); two "
            "writers would fork the hash chain"
        ) from None
    except OSError:
        os.close(fd)
        raise
    return fd


def find_resume_point(live: Path, now: datetime) -> ResumePoint:
    """Locate the chain head for ``live``; quarantines a torn final line as a side effect."""
    tail = _live_tail(live)
    torn = _quarantine_torn_tail(live, tail, now) if tail and tail.torn_bytes else None
    if tail is not None and tail.last_line is not None:
        head = _trusted_head(tail.last_line, live)
        return ResumePoint(head, True, _time_of_first_record(live), torn)
    rotated = _newest_rotated_head(live)
    rotated_head = _trusted_head(rotated[1], rotated[0]) if rotated else None
    return ResumePoint(rotated_head, False, None, torn)


def _live_tail(live: Path) -> files.Tail | None:
    try:
        if live.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    return files.read_tail(live)


def _quarantine_torn_tail(live: Path, tail: files.Tail, now: datetime) -> TornTail:
    target = files.quarantine_path(live, now)
    digest = files.copy_range(live, tail.torn_offset, target)
    os.truncate(live, tail.torn_offset)
    fsync_directory(live.parent)
    return TornTail(target, tail.torn_bytes, digest)


def _trusted_head(line: bytes, origin: Path) -> Mapping[str, Any]:
    check = check_line(line)
    if not check.ok or check.record is None:
        raise AuditResumeError(
            f"the last record of {origin} is not a valid audit record ({check.detail}); "
            "refusing to continue the chain from it. Run `gatewayd audit verify` and move "
            "the damaged file aside"
        )
    return check.record


def _newest_rotated_head(live: Path) -> tuple[Path, bytes] | None:
    """(file, last line) of the rotated sibling whose last record has the highest seq."""
    best: tuple[int, Path, bytes] | None = None
    for path in files.rotated_siblings(live):
        line = files.read_tail(path).last_line
        record = check_line(line).record if line is not None else None
        if line is None or record is None:
            raise AuditResumeError(
                f"rotated audit file {path} does not end with a readable record; run "
                "`gatewayd audit verify` and move damaged files aside before starting"
            )
        if best is None or record["seq"] > best[0]:
            best = (record["seq"], path, line)
    return (best[1], best[2]) if best else None


def _time_of_first_record(path: Path) -> datetime | None:
    line = files.read_first_line(path)
    record = check_line(line).record if line is not None else None
    if record is None:
        return None
    try:
        return datetime.fromisoformat(record["ts"])
    except ValueError:
        return None
