"""The AuditLog: appends hash-chained audit records, signs checkpoints, rotates, resumes.

Owns the live audit file and the chain state (next ``seq``, last ``hash``). Records are
assembled and rendered by a private structlog pipeline (stamp ``seq``/``node`` → link
``prev``/``hash`` → canonical JSON renderer) whose wrapped "logger" is the file sink; nothing
is configured globally. Operational messages about the log itself (a record not written, a
failed rotation, an error in the periodic task) go to the ``logger`` passed in — the gateway's
configured operational logger — or, by default, to a private JSON-lines logger on stderr;
structlog's global ``get_logger``/``configure`` are never used (no process-wide state).

Guarantees and rules (security staff and operators rely on these):

* **Written before acknowledged.** `emit` appends synchronously; it returns only after the
  line reached the OS (``fsync="interval"``) or the disk (``fsync="always"``).
* **Failures are loud and fail closed.** If a record cannot be written, `emit` raises
  `AuditWriteError` (``on_failure="deny"``) or logs and returns None (``"continue"``); the
  failure is counted in ``gatewayd_audit_write_errors_total`` and `healthy` turns False until
  a later write succeeds. Partial bytes of a failed write are truncated away so the file never
  holds half a line.
* **seq is never reused; the chain never forks.** A failed record keeps its ``seq`` (it is
  simply absent) and the next record chains from the last record actually written. After the
  next successful write — and in any case before the next checkpoint, so a rotated file or a
  closed run accounts for its own gaps — the log adds ``audit.recovery`` records, one per
  contiguous range of lost seqs (``lost_from``/``lost_to``), with the reason and the error.
  `verify_files` accepts a seq gap with an intact chain only when such a record names exactly
  that gap; any other gap is reported as ``deleted``.
* **Every file begins with a header.** A new log's first record is ``audit.start``; every
  later file (rotation, a live file moved or deleted while open, a restart that found no live
  file) begins with ``audit.continue`` (``prev`` and ``prev_seq``: the previous file's last
  record; ``reason``: why the file was started). A file that begins with anything else lost
  its first lines, and `verify_files` says so.
* **Start and stop are recorded.** `start` writes an ``audit.start`` record (key id in use;
  whether this is a new log, a restart after a clean shutdown, or after a crash); `close`
  always ends the log with a checkpoint with ``reason="close"``.
* **Checkpoints** (``audit.checkpoint``) sign ``(covers_hash, covers_seq, key_id, node,
  reason, ts)`` with Ed25519 (the version 2 message of `signing`, so the reason cannot be
  rewritten) every ``checkpoint_interval`` seconds and every ``checkpoint_every`` records
  (only if something new was written), at start when the resumed log does not end in one
  (``reason="start"``: signs what a crashed run left), before rotation (``reason="rotation"``,
  always the last record of a rotated file), on close (``reason="close"``), and right after
  the ``audit.retention`` records of `record_retention` (``reason="retention"``: the only
  checkpoint `verify_files` accepts as signing them, so a record laid into the log by someone
  else and signed by a later ``start`` or ``interval`` checkpoint never excuses a removal).
  A checkpoint that would be the first record of a new live file is preceded by that file's
  header, and signs up to it.
* **Rotation** by size (when the live file has reached ``rotate_bytes``) or by day (when a
  record's calendar day in ``timezone`` differs from the previous record's) renames the
  sealed file to ``<name>.<first record time>`` (see `files`) and continues the chain in a
  new live file.
* **Resume.** `start` continues ``seq``/``prev`` from the end of the existing log; a torn
  final line is moved aside and recorded, an untrustworthy head refuses start-up with
  `AuditResumeError` (rules in `resume`).
* **The live file is watched.** Each write checks that the path still names the open file; if
  it was moved or deleted (logrotate, an operator, an intruder) a new file is started at the
  path, chained to the last record, and an ``audit.recovery`` record says so.

Call it from the event loop; an internal lock also makes calls from executor threads safe.

**Cost on the event loop** (measured, deliberately not acted on yet: whether writes move to a
writer thread is the lead's decision). `emit` writes — and with ``fsync="always"`` fsyncs —
synchronously on the calling thread, normally the event loop, which serves nothing else
meanwhile. Measured 2026-11-27 on the development VM (2 vCPU AMD EPYC, ext4 on the virtio disk
``/dev/vda``, Python 3.11.7, shared with other test runs, load average 2-3): one
``access.allow`` record with 9 fields, ``time.perf_counter_ns`` around each `emit`, 3,000
emits paced 1 ms apart on a running loop (periodic task active), 5 rounds, ranges over rounds:

* ``fsync="always"``: median 0.23-0.80 ms, p99 0.45-6.9 ms (typically about 5 ms); the fsync
  alone has a median of 0.17-0.63 ms.
* ``fsync="interval"`` (1 s): median 0.05-0.08 ms, p99 0.14-0.28 ms; the periodic task then
  blocks the loop for one fsync of 0.9-2.6 ms once per second in which records were written.
* Back to back (no pause between emits): ``"always"`` median 0.18-0.24 ms, p99 3.7-5.2 ms;
  ``"interval"`` median 0.025 ms, p99 0.06 ms.

So ``"always"`` costs about 0.2-0.8 ms of loop time per record with multi-millisecond tails,
``"interval"`` about a tenth of that plus a short stall each second, at the price of up to
``fsync_interval`` of acknowledged records lost on power failure.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Self
from zoneinfo import ZoneInfo

import structlog

from gatewayd.audit import files
from gatewayd.audit.chain import GENESIS_PREV, canonical_json, record_hash
from gatewayd.audit.events import (
    RECORD_KEYS,
    EventName,
    check_event_name,
    escape_text,
    normalize_fields,
)
from gatewayd.audit.resume import ResumePoint, find_resume_point, lock_for_writing
from gatewayd.audit.signing import (
    CHECKPOINT_REASONS,
    key_id,
    load_or_create_signing_key,
    publish_public_key,
    sign_checkpoint,
)
from gatewayd.files import fsync_directory

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gatewayd.metrics import Metrics

FsyncMode = Literal["always", "interval"]
FailurePolicy = Literal["deny", "continue"]

_CHECKPOINT: Final = EventName.AUDIT_CHECKPOINT.value
_RECOVERY: Final = EventName.AUDIT_RECOVERY.value
_START: Final = EventName.AUDIT_START.value
_CONTINUE: Final = EventName.AUDIT_CONTINUE.value
_RESTART_IN_NEW_FILE: Final = "restart: the live file was missing or empty"
# Checkpoints that mark the end of something (a file, a run) are written even right after
# another checkpoint, so that "ends with a close checkpoint" reliably means a clean shutdown.
_SEALING_REASONS: Final = frozenset({"rotation", "close"})
_ROTATION_RETRY_SECONDS: Final = 60.0
_RETENTION: Final = EventName.AUDIT_RETENTION.value
# The reason of the checkpoint `AuditLog.record_retention` writes right after its records.
RETENTION_CHECKPOINT: Final = "retention"
# The most audit.retention records one `AuditLog.record_retention` call writes: every record
# (and the emits waiting for the lock) is held up by the whole call, so the caller splits a
# long run into calls of at most this many, each with its own checkpoint.
MAX_RETENTION_RECORDS: Final = 100
DEFAULT_TIMEZONE: Final = ZoneInfo("Asia/Tokyo")  # the office's zone; ZoneInfo is immutable


@dataclass(frozen=True)
class RetentionRecords:
    """What `AuditLog.record_retention` wrote."""

    written: int  # how many of the notes were written (the first ones, in order)
    signed: bool  # the reason="retention" checkpoint right after them was written
    error: str | None = None  # why not all were written and signed


@dataclass(frozen=True)
class AuditRecord:
    """A record as written: the chain keys plus the context fields."""

    seq: int
    event: str
    ts: str
    node: str
    prev: str
    hash: str
    fields: Mapping[str, str | int]

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> AuditRecord:
        extra = {k: v for k, v in record.items() if k not in RECORD_KEYS}
        return cls(
            seq=record["seq"], event=record["event"], ts=record["ts"], node=record["node"],
            prev=record["prev"], hash=record["hash"], fields=MappingProxyType(extra),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            **self.fields, "ts": self.ts, "seq": self.seq, "event": self.event,
            "node": self.node, "prev": self.prev, "hash": self.hash,
        }


class OperationalLogger(Protocol):
    """What the AuditLog needs of a logger for its own operational messages.

    Any structlog bound logger fits (generic, filtering or stdlib flavour), so the gateway can
    hand in the logger it configured (format, level, bound node name) and those messages land
    in the same stream as the rest of the operational log.
    """

    def info(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def warning(self, event: str, *args: Any, **kw: Any) -> Any: ...

    def error(self, event: str, *args: Any, **kw: Any) -> Any: ...


def _private_stderr_logger() -> OperationalLogger:
    """JSON lines on stderr, built with every setting explicit.

    ``structlog.get_logger``/``configure`` would read or change process-wide state (and so
    depend on whoever configured structlog last); spelling out processors, wrapper and context
    class means nothing global is consulted, even lazily on first use.
    """
    logger: OperationalLogger = structlog.wrap_logger(
        structlog.PrintLogger(sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    ).bind(logger="gatewayd.audit")
    return logger


class AuditConfigError(ValueError):
    """An `AuditLog` option that cannot work, such as a zero or negative interval.

    A ValueError subclass so existing ``except ValueError`` callers keep working, while the
    gateway's start-up can tell a bad audit setting from any other ValueError and name it.
    """


class AuditWriteError(Exception):
    """A record could not be written. ``seq`` was consumed and will show as a gap."""

    def __init__(self, event: str, seq: int | None, error: OSError) -> None:
        self.event = event
        self.seq = seq
        self.error = error
        where = f" (seq {seq})" if seq is not None else ""
        super().__init__(f"audit record {event}{where} not written: {describe_os_error(error)}")


def describe_os_error(error: OSError) -> str:
    code = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error)
    return f"{code}: {text}" if code else text


class _AppendError(Exception):
    def __init__(self, event: str, seq: int, error: OSError) -> None:
        super().__init__(event, seq, error)
        self.event = event
        self.seq = seq
        self.error = error


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching or overlapping seq ranges joined: each is then one gap on disk."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(last, merged[-1][1]))
        else:
            merged.append((first, last))
    return merged


@dataclass
class _Incident:
    """Problems not yet recorded in the log; written as audit.recovery records (`notes`)."""

    reasons: list[str] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)  # merged seq ranges, ascending
    error: str = ""
    extra: dict[str, str | int] = field(default_factory=dict)

    def add_reason(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def add_lost(self, seq: int) -> None:
        self.lost = _merge_ranges([*self.lost, (seq, seq)])

    def absorb(self, older: _Incident) -> None:
        """Take back what an unwritten note of ``older`` would have said (older comes first)."""
        self.reasons[:0] = [r for r in older.reasons if r not in self.reasons]
        self.lost = _merge_ranges([*older.lost, *self.lost])
        self.error = self.error or older.error
        self.extra = {**older.extra, **self.extra}

    def notes(self) -> list[dict[str, object]]:
        """The audit.recovery records to write: one per contiguous range of lost seqs.

        One per range because `verify_files` accepts a seq gap only when a recovery record
        names exactly that gap (``lost_from``-``lost_to``); a single record spanning two gaps
        would also claim the records written between them. The first note carries the reasons,
        the error and the extra details (e.g. the quarantined torn line).
        """
        notes: list[dict[str, object]] = []
        for index, span in enumerate(self.lost or [None]):
            reasons = list(self.reasons) if index == 0 else []
            fields: dict[str, object] = {"error": self.error or None}
            if span is not None:
                first, last = span
                reasons.append(
                    f"records not written: seq {first}" if first == last
                    else f"records not written: seq {first}-{last}"
                )
                fields.update(lost_from=first, lost_to=last)
            fields["reason"] = "; ".join(reasons)
            notes.append({**fields, **self.extra} if index == 0 else fields)
        return notes


class _FileSink:
    """The structlog "wrapped logger": its one method appends a rendered line."""

    def __init__(self, append: Callable[[str, dict[str, Any]], AuditRecord]) -> None:
        self._append = append

    def msg(self, line: str, *, record: dict[str, Any]) -> AuditRecord:
        return self._append(line, record)


def _canonical_serializer(obj: Any, **_ignored: Any) -> str:
    # structlog passes default=<repr fallback>; ignoring it is deliberate: a value that did
    # not pass events.normalize_fields must fail loudly, never be repr()'d into evidence.
    return canonical_json(obj)


class AuditLog:
    """The tamper-evident audit log of one gateway node. See the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        node: str,
        signing_key_path: Path,
        fsync: FsyncMode = "always",
        fsync_interval: float = 1.0,
        rotate_bytes: int | None = None,
        rotate_daily: bool = False,
        timezone: tzinfo = DEFAULT_TIMEZONE,
        checkpoint_interval: float = 60.0,
        checkpoint_every: int = 1000,
        on_failure: FailurePolicy = "deny",
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] | None = None,
        logger: OperationalLogger | None = None,
    ) -> None:
        """See the module docstring for the options.

        ``logger`` receives the log's operational messages (a record not written, a failed
        rotation, an error in the periodic task); pass the gateway's configured logger. The
        default is a private JSON-lines logger on stderr: never structlog's global one.
        """
        _check_options(
            fsync=fsync, fsync_interval=fsync_interval, rotate_bytes=rotate_bytes,
            checkpoint_interval=checkpoint_interval, checkpoint_every=checkpoint_every,
            on_failure=on_failure, node=node,
        )
        self._path = Path(path)
        self._node = escape_text(node)
        self._signing_key_path = Path(signing_key_path)
        self._fsync_mode: FsyncMode = fsync
        self._fsync_interval = fsync_interval
        self._rotate_bytes = rotate_bytes
        self._rotate_daily = rotate_daily
        self._tz = timezone
        self._checkpoint_interval = checkpoint_interval
        self._checkpoint_every = checkpoint_every
        self._on_failure: FailurePolicy = on_failure
        self._metrics = metrics
        self._clock: Callable[[], datetime] = clock or (lambda: datetime.now(timezone))
        self._log: OperationalLogger = logger if logger is not None else _private_stderr_logger()
        self._lock = threading.Lock()
        self._renderer = structlog.processors.JSONRenderer(serializer=_canonical_serializer)
        self._pipeline = structlog.wrap_logger(
            _FileSink(self._append_line),
            processors=[self._stamp, self._link, self._render],
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=True,
        ).bind()  # bound now, with everything explicit: no global structlog config is read
        self._state: Literal["new", "running", "closed"] = "new"
        self._healthy = False
        self._task: asyncio.Task[None] | None = None
        self._key: Ed25519PrivateKey | None = None
        self._key_id = ""
        # Chain state.
        self._next_seq = 1
        self._prev = GENESIS_PREV
        self._last_seq = 0  # last seq actually written (0: nothing yet)
        self._last_event: str | None = None
        self._last_reason: str | None = None
        self._since_checkpoint = 0
        self._incident: _Incident | None = None
        # Live file state.
        self._fd: int | None = None
        self._writer_lock: int | None = None  # flock on <name>.lock while running
        self._file_id: tuple[int, int] = (0, 0)
        self._size = 0
        self._truncate_pending = False
        self._first_ts: datetime | None = None  # ts of the live file's first record
        self._new_file_reason = _RESTART_IN_NEW_FILE  # why the next new live file is started
        self._file_day: date | None = None  # day of the live file's last record
        self._unsynced = False
        self._defer_fsync = False  # record_retention: one fsync for the whole call
        self._rotation_retry_at = 0.0

    # ----------------------------------------------------------------- public API

    @property
    def path(self) -> Path:
        return self._path

    @property
    def key_id(self) -> str:
        """Fingerprint of the checkpoint signing key (empty before `start`)."""
        return self._key_id

    @property
    def healthy(self) -> bool:
        """True while running and the last write succeeded; gate new logins on it."""
        return self._state == "running" and self._healthy

    async def start(self) -> None:
        """Load/create the key, resume the chain, open the file, start the periodic task."""
        with self._lock:
            self._start_locked()
        self._task = asyncio.create_task(
            self._run_periodic(), name=f"gatewayd.audit.periodic:{self._path}"
        )

    def emit(self, event: str, **fields: object) -> AuditRecord | None:
        """Append one record. Unknown events/fields raise (ValueError/TypeError).

        Returns the record, or None when it could not be written and ``on_failure`` is
        ``"continue"``; with ``"deny"`` a failed write raises `AuditWriteError`.
        """
        name = check_event_name(event)
        clean = normalize_fields(fields)
        with self._lock:
            self._require_running()
            now = self._now()
            self._rotate_if_due(now)
            try:
                record = self._write(name, clean, now)
            except _AppendError as failed:
                self._note_write_failure(failed)
                if self._on_failure == "deny":
                    # When the new file's header failed, this record got no seq at all.
                    seq = failed.seq if failed.event == name else None
                    raise AuditWriteError(name, seq, failed.error) from failed.error
                return None
            self._after_success(now)
            return record

    def record_retention(self, notes: Sequence[Mapping[str, object]]) -> RetentionRecords:
        """Append one ``audit.retention`` record per note, then the checkpoint signing them.

        All under one hold of the lock: no other record, no rotation and no other checkpoint
        (count, interval) comes between the records and their ``reason="retention"``
        checkpoint, which is what `verify_files` requires before it honours them. At most
        `MAX_RETENTION_RECORDS` notes per call (more raise ValueError before anything is
        written): the lock, and so every `emit`, waits for the whole call, so a long run is
        split by the caller into calls that each get their own checkpoint. The records are not
        fsynced one by one (even with ``fsync="always"``): the file is fsynced once, after the
        checkpoint, and `RetentionRecords.signed` is True only if that fsync succeeded — the
        records and their checkpoint are then on disk, and the caller may act on them.
        A rotation that is due happens before the first record. Stops at the first note not
        written (the checkpoint then signs those that were), and without a checkpoint if the
        live file was moved or deleted meanwhile (the records would not be in one file with
        it). Never raises for a failed write, whatever ``on_failure`` says: the caller removes
        files only when `RetentionRecords.signed` is True and then only for the notes written.
        Unknown fields raise (ValueError/TypeError) before anything is written.
        """
        if len(notes) > MAX_RETENTION_RECORDS:
            raise ValueError(f"record_retention writes at most {MAX_RETENTION_RECORDS} "
                             f"records per call, got {len(notes)}")
        name = check_event_name(_RETENTION)
        cleaned = [normalize_fields(dict(note)) for note in notes]
        with self._lock:
            self._require_running()
            now = self._now()
            self._rotate_if_due(now)
            self._defer_fsync = True
            try:
                outcome = self._write_retention_locked(name, cleaned, now)
            finally:
                self._defer_fsync = False
            if self._unsynced:
                self._sync_locked()  # the records written, whatever the outcome
            if outcome.signed and self._unsynced:
                return RetentionRecords(outcome.written, False, "syncing the records to disk "
                                        "failed: they may be lost in a crash")
        return outcome

    def _write_retention_locked(
        self, name: str, cleaned: Sequence[Mapping[str, str | int]], now: datetime
    ) -> RetentionRecords:
        written, error = 0, None
        for fields in cleaned:
            if written and self._starting_new_file():
                return RetentionRecords(written, False, f"the live file {self._path.name} "
                                        "was moved or deleted while writing them")
            try:
                self._write(name, fields, now)
            except _AppendError as failed:
                self._note_write_failure(failed)
                error = f"audit.retention not written: {describe_os_error(failed.error)}"
                break
            written += 1
        if written == 0:
            return RetentionRecords(0, False, error or "no records given")
        if self._starting_new_file():
            return RetentionRecords(written, False, f"the live file {self._path.name} "
                                    "was moved or deleted while writing them")
        failed_checkpoint = self._checkpoint_locked(RETENTION_CHECKPOINT, now)
        if failed_checkpoint is not None:
            return RetentionRecords(written, False, "the checkpoint signing them failed: "
                                    f"{describe_os_error(failed_checkpoint.error)}")
        return RetentionRecords(written, True, error)

    def checkpoint(self) -> None:
        """Write a signed checkpoint now (no-op if nothing was written since the last one)."""
        with self._lock:
            self._require_running()
            failed = self._checkpoint_locked("manual", self._now())
        if failed is not None and self._on_failure == "deny":
            raise AuditWriteError(_CHECKPOINT, failed.seq, failed.error) from failed.error

    async def close(self) -> None:
        """Stop the periodic task, write the final checkpoint, fsync and close the file."""
        if self._state != "running":
            self._state = "closed"
            return
        try:
            await self._stop_periodic()
        finally:
            with self._lock:
                failed = self._close_locked()
        if failed is not None and self._on_failure == "deny":
            raise AuditWriteError(_CHECKPOINT, failed.seq, failed.error) from failed.error

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------- lifecycle

    def _require_running(self) -> None:
        if self._state != "running":
            raise RuntimeError(f"AuditLog {self._path} is {self._state}, not running")

    def _now(self) -> datetime:
        moment = self._clock()
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise ValueError("the audit clock must return timezone-aware datetimes")
        return moment.astimezone(self._tz)

    def _start_locked(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"AuditLog {self._path} was already started")
        self._path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._writer_lock = lock_for_writing(self._path)
        try:
            self._open_chain()
        except BaseException:
            self._close_file()
            self._release_writer_lock()
            raise

    def _open_chain(self) -> None:
        self._key = load_or_create_signing_key(self._signing_key_path)
        self._key_id = key_id(self._key.public_key())
        publish_public_key(self._path, self._key)
        now = self._now()
        point = self._resume(now)
        previous_run = self._describe_previous_run(torn=point.torn is not None)
        self._open_live_file()
        self._state = "running"
        self._healthy = True
        start = {"reason": previous_run, "key_id": self._key_id}
        if self._last_seq == 0:
            # A new chain: audit.start is the first record of the log, so it is the header of
            # the first file and must precede even the note about a torn line moved aside.
            self._write_internal(_START, start, now, header=True)
            if self._incident is not None:
                self._write_recovery_note(now)
            return
        if self._incident is not None:
            self._write_recovery_note(now)
        if self._last_event != _CHECKPOINT:
            self._checkpoint_locked("start", now)  # sign what a crashed run left unsigned
        self._write_internal(_START, start, now)

    def _release_writer_lock(self) -> None:
        fd, self._writer_lock = self._writer_lock, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def _describe_previous_run(self, *, torn: bool) -> str:
        """How the log we continue ended: tells security staff about crashes and restarts."""
        if self._last_seq == 0 and not torn:
            return "new audit log"
        if self._last_event == _CHECKPOINT and self._last_reason == "close" and not torn:
            return f"restart; the previous run closed cleanly at seq {self._last_seq}"
        return (
            f"restart after an unclean shutdown: the log ended at seq {self._last_seq} "
            "without a close checkpoint"
        )

    async def _stop_periodic(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we are being cancelled ourselves: let it propagate
            # otherwise it is just the periodic task's own cancellation, which we asked for

    def _close_locked(self) -> _AppendError | None:
        failed = self._checkpoint_locked("close", self._now())
        self._sync_locked()
        self._close_file()
        self._release_writer_lock()
        self._state = "closed"
        self._healthy = False
        return failed

    # ----------------------------------------------------------------- periodic task

    async def _run_periodic(self) -> None:
        """Interval checkpoints, interval fsync, and closing yesterday's file when idle."""
        loop = asyncio.get_running_loop()
        next_checkpoint = loop.time() + self._checkpoint_interval
        next_sync = loop.time() + self._fsync_interval
        syncing = self._fsync_mode == "interval"
        while True:
            deadline = min(next_checkpoint, next_sync) if syncing else next_checkpoint
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            tick = loop.time()
            try:
                with self._lock:
                    now = self._now()
                    self._rotate_if_due(now)
                    if syncing and tick >= next_sync:
                        self._sync_locked()
                    if tick >= next_checkpoint:
                        self._checkpoint_locked("interval", now)
            except Exception:  # keep checkpointing: one bad tick must not end the task
                self._log.error("audit periodic task error", path=str(self._path),
                                exc_info=True)
            if syncing and tick >= next_sync:
                next_sync = tick + self._fsync_interval
            if tick >= next_checkpoint:
                next_checkpoint = tick + self._checkpoint_interval

    # ----------------------------------------------------------------- resume

    def _resume(self, now: datetime) -> ResumePoint:
        point = find_resume_point(self._path, now)
        if point.head is not None:
            self._continue_from(point)
        if point.torn is not None:
            incident = self._incident_for_update()
            incident.add_reason(
                "incomplete final line (torn write: crash or full disk) moved aside at start"
            )
            incident.extra.update(
                quarantine=point.torn.quarantine.name, discarded_bytes=point.torn.size,
                discarded_sha256=point.torn.sha256,
            )
            # The torn line was a record that never fully reached the disk: its seq is lost.
            incident.add_lost(self._next_seq)
            self._next_seq += 1
        return point

    def _continue_from(self, point: ResumePoint) -> None:
        head = point.head
        assert head is not None
        self._new_file_reason = _RESTART_IN_NEW_FILE
        self._next_seq = head["seq"] + 1
        self._prev = head["hash"]
        self._last_seq = head["seq"]
        self._last_event = head["event"]
        self._last_reason = head.get("reason")
        if point.head_in_live_file:
            self._file_day = point.head_day
            self._first_ts = point.live_first_time

    # ----------------------------------------------------------------- writing

    def _write(
        self, event: str, fields: Mapping[str, str | int], now: datetime, *, header: bool = False
    ) -> AuditRecord:
        """Append one record; first the header of a new live file if this record starts one.

        ``header`` marks the record as such a header itself. Raises `_AppendError` for the
        record or for the header it needed (the latter leaves this record without a seq).
        """
        if not header and self._starting_new_file():
            self._write_header(now)
        result = self._pipeline.msg(event, ts=self._format_ts(now), **fields)
        if not isinstance(result, AuditRecord):  # the sink always returns one
            raise TypeError(f"audit sink returned {type(result).__name__}")
        return result

    def _starting_new_file(self) -> bool:
        """Whether the next record would be the first line of the live file.

        Opens the live file first (a new one after rotation, or when it was moved or deleted).
        An OSError is not raised here but left for `_append_line` to meet again, so the failure
        is charged to the record's own seq like every other failed write.
        """
        try:
            self._ensure_open()
        except OSError:
            return False
        return self._size == 0

    def _write_header(self, now: datetime) -> None:
        """Begin a new file with a record that ties it to the chain (see `events`).

        Without it a file whose first lines were deleted would look like a file that simply
        starts later; `verify_files` reports a file that does not begin with a header.
        """
        if self._last_seq == 0:  # nothing written yet (audit.start failed): a new log's header
            fields: dict[str, object] = {"reason": "new audit log", "key_id": self._key_id}
            event = _START
        else:
            fields = {"reason": self._new_file_reason, "prev_seq": self._last_seq}
            event = _CONTINUE
        clean = normalize_fields(fields, internal=True)
        self._write(check_event_name(event, internal=True), clean, now, header=True)

    def _format_ts(self, now: datetime) -> str:
        return now.isoformat(timespec="microseconds")

    # structlog processors: each adds its keys to the event dict.
    def _stamp(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["seq"] = self._next_seq
        self._next_seq += 1  # consumed now, whether or not the write succeeds
        event_dict["node"] = self._node
        return event_dict

    def _link(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        event_dict["prev"] = self._prev
        event_dict["hash"] = record_hash(event_dict)
        return event_dict

    def _render(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        line = self._renderer(logger, method, event_dict)
        return (line,), {"record": dict(event_dict)}

    def _append_line(self, line: str, record: dict[str, Any]) -> AuditRecord:
        data = (line + "\n").encode("utf-8")
        try:
            if self._fd is None or self._truncate_pending:
                # `_starting_new_file` already checked the path just before this record; only
                # what it could not finish (an open or truncate that failed) is retried here.
                self._ensure_open()
            self._write_all(data)
            if self._fsync_mode == "always" and not self._defer_fsync:
                assert self._fd is not None
                os.fsync(self._fd)
        except OSError as exc:
            self._roll_back_partial_write()
            raise _AppendError(record["event"], record["seq"], exc) from exc
        self._size += len(data)
        self._unsynced = self._fsync_mode == "interval" or self._defer_fsync
        self._advance_chain(record)
        if self._metrics is not None:
            self._metrics.audit_event(record["event"])
        return AuditRecord.from_dict(record)

    def _advance_chain(self, record: Mapping[str, Any]) -> None:
        self._prev = record["hash"]
        self._last_seq = record["seq"]
        self._last_event = record["event"]
        self._last_reason = record.get("reason")
        self._since_checkpoint = 0 if record["event"] == _CHECKPOINT else self._since_checkpoint + 1
        if self._first_ts is None:
            self._first_ts = datetime.fromisoformat(record["ts"])
        self._file_day = _day_of(record["ts"])
        self._healthy = True

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if written <= 0:
                raise OSError(errno.EIO, "write returned no progress")
            view = view[written:]

    def _roll_back_partial_write(self) -> None:
        """Cut off any bytes of a failed write so the file never holds half a record."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._truncate_pending = True  # retried before the next write

    def _ensure_open(self) -> None:
        if self._fd is not None:
            if self._truncate_pending:
                os.ftruncate(self._fd, self._size)
                self._truncate_pending = False
            if self._live_file_is_ours():
                return
            self._close_file()
            self._incident_for_update().add_reason(
                f"live audit file {self._path.name} was moved or deleted while open; "
                "continued in a new file"
            )
            self._new_file_reason = "the live file was moved or deleted while open"
        self._open_live_file()

    def _live_file_is_ours(self) -> bool:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != self._file_id:
            return False
        self._size = st.st_size  # rollback point for this write; keeps foreign bytes visible
        return True

    def _open_live_file(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd = fd
        self._file_id = (st.st_dev, st.st_ino)
        self._size = st.st_size
        if st.st_size == 0:
            self._first_ts = None
            self._file_day = None
            fsync_directory(self._path.parent)  # the new file's name must survive a crash
            self._republish_public_key()

    def _republish_public_key(self) -> None:
        """Put ``<log>.pub`` back if it went missing (e.g. with a deleted directory)."""
        if self._key is None:
            return
        try:
            publish_public_key(self._path, self._key)
        except OSError as exc:  # not worth failing a record over; the key id is in every cp
            incident = self._incident_for_update()
            incident.add_reason(f"could not rewrite the public key next to {self._path.name}")
            incident.error = describe_os_error(exc)

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        self._truncate_pending = False
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self._log.warning(
                    "closing audit file failed", path=str(self._path),
                    error=describe_os_error(exc),
                )

    def _sync_locked(self) -> None:
        if self._fd is None or not self._unsynced:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._healthy = False
            self._count_error()
            incident = self._incident_for_update()
            incident.add_reason("fsync failed: records since the last fsync may be lost")
            incident.error = describe_os_error(exc)
            return
        self._unsynced = False

    # ----------------------------------------------------------------- failures

    def _incident_for_update(self) -> _Incident:
        if self._incident is None:
            self._incident = _Incident()
        return self._incident

    def _count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.audit_write_errors.inc()

    def _note_write_failure(self, failed: _AppendError) -> None:
        self._healthy = False
        self._count_error()
        incident = self._incident_for_update()
        incident.add_lost(failed.seq)
        incident.error = describe_os_error(failed.error)
        self._log.error(
            "audit record not written", audit_event=failed.event, seq=failed.seq,
            error=incident.error, path=str(self._path),
        )

    def _write_internal(
        self, event: str, fields: Mapping[str, object], now: datetime, *, header: bool = False
    ) -> _AppendError | None:
        clean = normalize_fields(fields, internal=True)
        try:
            self._write(check_event_name(event, internal=True), clean, now, header=header)
        except _AppendError as failed:
            self._note_write_failure(failed)
            return failed
        return None

    def _write_recovery_note(self, now: datetime) -> None:
        incident, self._incident = self._incident, None
        if incident is None:
            return
        for index, fields in enumerate(incident.notes()):
            if self._write_internal(_RECOVERY, fields, now) is not None:
                # This note failed (its own seq is now lost too): keep everything not yet said
                # for the next try — all of it if the first note failed, else the later ranges.
                unsaid = incident if index == 0 else _Incident(
                    lost=incident.lost[index:], error=incident.error
                )
                self._incident_for_update().absorb(unsaid)
                return

    def _after_success(self, now: datetime) -> None:
        if self._incident is not None:
            self._write_recovery_note(now)
        if self._since_checkpoint >= self._checkpoint_every:
            self._checkpoint_locked("count", now)

    # ----------------------------------------------------------------- checkpoints

    def _checkpoint_locked(self, reason: str, now: datetime) -> _AppendError | None:
        if self._incident is not None:
            # Explain lost seqs before signing past them: a checkpoint (above all the one that
            # seals a rotated file or a run) must not cover a gap its file never accounts for.
            self._write_recovery_note(now)
        if self._last_seq == 0:
            return None  # nothing was ever written: nothing to sign
        if self._last_event == _CHECKPOINT and (
            reason not in _SEALING_REASONS or self._last_reason == reason
        ):
            return None  # already covered
        if self._starting_new_file():
            # The checkpoint would begin a new live file (the last one was rotated, moved or
            # deleted): its header comes first, so the checkpoint signs up to the header.
            try:
                self._write_header(now)
            except _AppendError as failed:
                self._note_write_failure(failed)
                return failed
            if self._incident is not None:
                self._write_recovery_note(now)  # why the new file (moved or deleted)
        assert self._key is not None and reason in CHECKPOINT_REASONS
        ts = self._format_ts(now)
        signature = sign_checkpoint(
            self._key, node=self._node, seq=self._last_seq, hash_hex=self._prev, ts=ts,
            reason=reason,
        )
        fields = {
            "covers_seq": self._last_seq,
            "covers_hash": self._prev,
            "key_id": self._key_id,
            "sig": signature,
            "reason": reason,
        }
        return self._write_internal(_CHECKPOINT, fields, now)

    # ----------------------------------------------------------------- rotation

    def _rotation_due(self, now: datetime) -> bool:
        if self._fd is None or self._size == 0:
            return False
        if self._rotate_bytes is not None and self._size >= self._rotate_bytes:
            return True
        return (
            self._rotate_daily
            and self._file_day is not None
            and now.astimezone(self._tz).date() != self._file_day
        )

    def _rotate_if_due(self, now: datetime) -> None:
        if self._rotation_due(now) and time.monotonic() >= self._rotation_retry_at:
            self._rotate(now)

    def _rotate(self, now: datetime) -> None:
        if self._checkpoint_locked("rotation", now) is not None:
            self._rotation_retry_at = time.monotonic() + _ROTATION_RETRY_SECONDS
            return  # the sealing checkpoint failed (already counted): keep the current file
        assert self._fd is not None
        try:
            os.fsync(self._fd)
            target = files.rotated_path(self._path, self._first_ts or now)
            os.rename(self._path, target)
            fsync_directory(self._path.parent)
        except OSError as exc:
            self._rotation_retry_at = time.monotonic() + _ROTATION_RETRY_SECONDS
            incident = self._incident_for_update()
            incident.add_reason(f"rotation of {self._path.name} failed; still writing to it")
            incident.error = describe_os_error(exc)
            self._log.error(
                "audit log rotation failed", path=str(self._path), error=incident.error
            )
            return
        self._close_file()
        self._new_file_reason = "rotation"
        self._unsynced = False
        self._size = 0
        self._first_ts = None
        self._file_day = None


def _check_options(
    *,
    fsync: str, fsync_interval: float, rotate_bytes: int | None, checkpoint_interval: float,
    checkpoint_every: int, on_failure: str, node: str,
) -> None:
    if fsync not in ("always", "interval"):
        raise AuditConfigError(f"audit fsync must be 'always' or 'interval', not {fsync!r}")
    if on_failure not in ("deny", "continue"):
        raise AuditConfigError(
            f"audit on_failure must be 'deny' or 'continue', not {on_failure!r}"
        )
    _check_seconds("fsync_interval", fsync_interval)
    _check_seconds("checkpoint_interval", checkpoint_interval)
    if checkpoint_every < 1:
        raise AuditConfigError(
            f"audit checkpoint_every must be at least 1 record, got {checkpoint_every!r}"
        )
    if rotate_bytes is not None and rotate_bytes <= 0:
        raise AuditConfigError(
            f"audit rotate_bytes must be positive (or None for no size rotation), "
            f"got {rotate_bytes!r}"
        )
    if not node:
        raise AuditConfigError("audit node must name this gateway node, got an empty name")


def _check_seconds(name: str, value: float) -> None:
    """Refuse an interval the periodic task cannot honour.

    Zero or negative would make it wake up without pause (a busy loop that starves the event
    loop); NaN compares false to everything and behaves like zero; infinity never fires, so
    checkpoints or fsyncs would silently stop.
    """
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise AuditConfigError(
            f"audit {name} must be a positive, finite number of seconds, got {value!r}"
        )


def _day_of(ts: str) -> date:
    return datetime.fromisoformat(ts).date()  # ts is already in the log's timezone
