"""Audit retention: which rotated audit files have outlived ``audit.retention``, and removing them.

Owns the rules for deleting evidence on a timer. They are deliberately narrow, because a
removal is irreversible and a verifier must still be able to vouch for what is left:

* **Only rotated files, only from the front.** The live file is never touched. Files are taken
  in chain order (`files.order_by_chain`), oldest first, and planning stops at the first file
  that may not go: removing a file from the middle would leave a hole no verifier can explain.
* **Expired** means the file's *last* record (its sealing checkpoint) is older than
  ``now - retention``. ``retention`` zero means keep everything.
* **Only files that verify.** Each candidate must verify on its own (hash chain, header,
  checkpoint signatures against the log's public keys, `verify.verify_files` with
  ``require_sealed``), end in a signed ``audit.checkpoint`` covering its last record (its
  final checkpoint), chain to the file removed just before it, and be chained to by the file
  after it (that file's ``audit.continue`` header names its last ``seq`` and hash). A file
  that fails any of this is *kept and reported* (`RetentionPlan.problem`) — evidence of
  tampering is not deleted by a timer — and nothing after it is removed either.
* **Holds.** ``may_remove(last_seq)`` lets the gateway keep files the syslog forwarder has not
  delivered yet; a file whose successor does not exist yet (the live file after a rotation
  before its first record) is held too. Held files are not problems (`RetentionPlan.held`).
* **Written before removed.** `apply_plan` first writes the ``audit.retention`` records of
  each file through the live `AuditLog` (``file``, ``first_seq``, ``last_seq``, ``last_hash``,
  ``last_ts``, ``records``, ``retention``, ``reason="expired"``) and the checkpoint that signs
  them, in one `AuditLog.record_retention` call: nothing comes between the records and that
  ``reason="retention"`` checkpoint, and `verify` honours a retention record only when it is
  so signed (a record someone else laid into the log, signed by a later ``start``
  checkpoint, explains nothing). That call returns only once the records and the checkpoint
  are fsynced; only then are the files unlinked (the ``.pub`` keys stay). A file whose
  records could not all be written, signed or synced is not removed. **In batches:** one
  call covers at most `BATCH_REMOVALS` (50) files and `writer.MAX_RETENTION_RECORDS` (100)
  records, each batch with its own checkpoint and one fsync, its files removed before the
  next batch is written, so the writer's lock (which every `AuditLog.emit` on the event loop
  waits for) is never held for a whole run. A failed batch ends the run; a file whose
  carried records alone exceed one call is kept, with an error. ``first_seq`` is the first
  seq the file accounts for: 1 for
  the file that starts the log, else its header's ``prev_seq`` + 1 (normally its first
  record's seq), so that the retention records of successive removals cover seq 1 on without
  a hole; `verify` accepts the missing head of the log exactly then.
* **Coverage is carried forward.** The retention records explaining earlier removals live in
  whatever file was live when they were written, and that file expires in its turn. So
  before a file's ``expired`` record, `apply_plan` restates the coverage of the retention
  records *inside* that file as ``reason="carried"`` records (overlapping and adjacent ranges
  merged: normally a single record, seq 1 to the file's ``prev_seq``; ``file`` names the
  first and last file of the range, ``last_hash``/``last_ts`` those of its last record,
  ``records`` their sum). Only records that `verify` honours are carried: the file has just
  verified on its own, sealed, so they are signed, and each must be plausible (stated
  retention >= 7 days, old enough at its own ``ts``). Nothing is ever carried from a file's
  header or name: a file whose predecessors were deleted by hand, without retention records,
  carries nothing, and the log keeps failing ``verify --complete`` however long it runs.

Planning and removal are blocking file work: the gateway runs them with `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from gatewayd.audit import files
from gatewayd.audit.chain import GENESIS_PREV, is_hash, parse_line
from gatewayd.audit.events import EventName
from gatewayd.audit.signing import AuditKeyError, default_public_key_paths, load_public_keys
from gatewayd.audit.verify import (
    RETENTION_CARRIED,
    RETENTION_EXPIRED,
    RemovedRange,
    VerifyResult,
    verify_files,
)
from gatewayd.audit.writer import (
    MAX_RETENTION_RECORDS,
    AuditLog,
    OperationalLogger,
    describe_os_error,
)
from gatewayd.files import atomic_write, fsync_directory

log = logging.getLogger(__name__)

_CHECKPOINT: Final = EventName.AUDIT_CHECKPOINT.value
_START: Final = EventName.AUDIT_START.value
_CONTINUE: Final = EventName.AUDIT_CONTINUE.value
_RETENTION: Final = EventName.AUDIT_RETENTION.value

# Files removed per `AuditLog.record_retention` call (each with its own checkpoint and fsync):
# the writer's lock, and so every emit, waits for one call, never for a whole run.
BATCH_REMOVALS: Final = 50

MayRemove = Callable[[int], bool]  # given a file's last seq: may it go (e.g. delivered)?


@dataclass(frozen=True)
class Carried:
    """Earlier removals a file's own retention records accounted for: restated before it goes."""

    file: str  # "first … last" when several removed files are merged
    first_seq: int
    last_seq: int
    last_hash: str
    last_ts: str
    records: int
    retention: str  # as the (last) record carried stated it


@dataclass(frozen=True)
class Removal:
    """A rotated file that has expired, verifies, and may be removed."""

    path: Path
    first_seq: int  # the first seq it accounts for (see the module docstring)
    last_seq: int  # its final checkpoint
    last_hash: str
    last_ts: str
    records: int
    carried: tuple[Carried, ...] = ()  # coverage of the retention records inside it


@dataclass(frozen=True)
class Kept:
    """An expired file that stays, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class RetentionPlan:
    removals: tuple[Removal, ...] = ()
    problem: Kept | None = None  # kept because it does not verify: report it to security staff
    held: Kept | None = None  # kept for now (not delivered yet, no successor yet, time budget)


@dataclass(frozen=True)
class RetentionOutcome:
    plan: RetentionPlan
    removed: tuple[Removal, ...] = ()
    error: str | None = None  # why planned removals did not happen


class _KeepFileError(Exception):
    """Internal: this expired file may not be removed; ``problem`` False means merely held."""

    def __init__(self, reason: str, *, problem: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.problem = problem


def format_retention(retention: timedelta) -> str:
    """The retention in the configuration's duration syntax ("365d"), for the record."""
    seconds = int(retention.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _record(line: bytes | None, what: str) -> dict[str, Any]:
    record = parse_line(line) if line is not None else None
    if record is None:
        raise _KeepFileError(f"its {what} is not a readable record")
    return record


def _last_record(path: Path) -> dict[str, Any]:
    tail = files.read_tail(path)
    if tail.torn_bytes:
        raise _KeepFileError("it ends with an incomplete line")
    return _record(tail.last_line, "last line")


def _is_expired(last: dict[str, Any], cutoff: datetime) -> bool:
    try:
        moment = datetime.fromisoformat(last["ts"])
    except (TypeError, ValueError) as exc:
        raise _KeepFileError("its last record has no readable ts") from exc
    if moment.tzinfo is None:
        raise _KeepFileError("its last record's ts has no UTC offset")
    return moment < cutoff


def _check_sealed(path: Path, last: dict[str, Any], keys: Sequence[Path]) -> VerifyResult:
    """Verify the file on its own and return the result. Raises _KeepFileError if it fails."""
    try:
        result = verify_files([path], list(keys), require_sealed=True)
    except (AuditKeyError, OSError) as exc:
        raise _KeepFileError(f"it cannot be verified: {exc}") from exc
    if not result.ok:
        raise _KeepFileError(f"it does not verify ({result.kind}): {result.problem}")
    checkpoint = result.last_checkpoint
    if (last["event"] != _CHECKPOINT or checkpoint is None or checkpoint.seq != last["seq"]
            or result.last_seq != last["seq"]):
        raise _KeepFileError("its last record is not a signed checkpoint covering the file")
    return result


def _file_label(name: str, *, first: bool) -> str:
    parts = name.split(" … ")
    return parts[0] if first else parts[-1]


def _carried(retentions: Sequence[RemovedRange], first_seq: int) -> tuple[Carried, ...]:
    """The coverage of a file's honoured retention records (`VerifyResult.retentions`), merged.

    Only ranges before the file's own ``first_seq`` (all of them, in an honest log). Ranges
    that overlap (a removal recorded twice) or touch are merged into one.
    """
    ranges = sorted((r for r in retentions if r.last_seq < first_seq),
                    key=lambda r: (r.first_seq, r.last_seq))
    merged: list[list[RemovedRange]] = []
    for removed in ranges:
        if merged and removed.first_seq <= max(r.last_seq for r in merged[-1]) + 1:
            merged[-1].append(removed)
        else:
            merged.append([removed])
    carried: list[Carried] = []
    for group in merged:
        last = max(group, key=lambda r: (r.last_seq, r.seq))
        distinct = {(r.first_seq, r.last_seq): r.records for r in group}
        first_file = _file_label(group[0].file, first=True)
        last_file = _file_label(last.file, first=False)
        carried.append(Carried(
            file=first_file if first_file == last_file else f"{first_file} … {last_file}",
            first_seq=group[0].first_seq, last_seq=last.last_seq, last_hash=last.last_hash,
            last_ts=last.last_ts, records=sum(distinct.values()), retention=last.retention,
        ))
    return tuple(carried)


def _first_accounted_seq(header: dict[str, Any]) -> int:
    """1 for the file that starts the log, else its audit.continue header's prev_seq + 1."""
    if header["event"] == _START and header["prev"] == GENESIS_PREV:
        return 1
    prev_seq = header.get("prev_seq")
    if header["event"] != _CONTINUE or not isinstance(prev_seq, int):
        raise _KeepFileError("it does not begin with a header record")
    return prev_seq + 1


def _check_links(header: dict[str, Any], before: Removal | None) -> None:
    """The file must chain to the one removed just before it in this plan."""
    if before is None:
        return
    if header["prev"] != before.last_hash or header.get("prev_seq") != before.last_seq:
        raise _KeepFileError(f"its header does not chain to {before.path.name} (seq "
                        f"{before.last_seq}): a file between them is missing")


def _check_successor(last: dict[str, Any], successor: Path) -> None:
    """The next file must begin with a header naming this file's last record.

    That header is what `verify` later matches against the retention record's ``last_hash``;
    if it did not chain here, removing this file would leave a log nobody can vouch for.
    """
    if not successor.is_file() or successor.stat().st_size == 0:
        raise _KeepFileError(f"the next file {successor.name} has no records yet", problem=False)
    head = parse_line(files.read_first_line(successor) or b"")
    if (head is None or head.get("event") != _CONTINUE or head.get("prev") != last["hash"]
            or head.get("prev_seq") != last["seq"]):
        raise _KeepFileError(f"the next file {successor.name} does not begin with an "
                             f"audit.continue chained to its last record (seq {last['seq']})")


def _removal(
    path: Path, successor: Path, before: Removal | None, *, cutoff: datetime,
    keys: Sequence[Path], may_remove: MayRemove | None,
) -> Removal | None:
    """The removal of ``path``, None if it has not expired; raises _KeepFileError to keep it."""
    last = _last_record(path)
    if not _is_expired(last, cutoff):
        return None
    verified = _check_sealed(path, last, keys)
    header = _record(files.read_first_line(path), "first line")
    first_seq = _first_accounted_seq(header)
    _check_links(header, before)
    _check_successor(last, successor)
    if not is_hash(last["hash"]):
        raise _KeepFileError("its last record has no valid hash")
    if may_remove is not None and not may_remove(last["seq"]):
        raise _KeepFileError(f"held: seq {last['seq']} not yet delivered", problem=False)
    return Removal(path=path, first_seq=first_seq, last_seq=last["seq"],
                   last_hash=last["hash"], last_ts=last["ts"], records=verified.records,
                   carried=_carried(verified.retentions, first_seq))


def plan_retention(
    log_path: Path, retention: timedelta, now: datetime, *,
    may_remove: MayRemove | None = None, budget_seconds: float | None = None,
    stop: Callable[[], bool] | None = None, trusted_key_ids: Collection[str] | None = None,
) -> RetentionPlan:
    """Which rotated files of ``log_path`` to remove now (see the module docstring).

    ``budget_seconds`` bounds the scan: files not reached in time are held for the next run.
    ``stop`` is asked before each file (the gateway is shutting down: a thread cannot be
    cancelled, so it must stop itself rather than delay the exit for the whole budget).
    """
    if retention <= timedelta(0):
        return RetentionPlan()
    if now.tzinfo is None:
        raise ValueError("retention needs a timezone-aware now")
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    chain = files.order_by_chain(files.rotated_siblings(log_path))
    keys = _trusted_keys(default_public_key_paths(log_path), trusted_key_ids)
    cutoff = now - retention
    removals: list[Removal] = []
    for index, path in enumerate(chain):
        successor = chain[index + 1] if index + 1 < len(chain) else log_path
        if deadline is not None and time.monotonic() > deadline:
            return RetentionPlan(tuple(removals), held=Kept(path, "time budget used up"))
        if stop is not None and stop():
            return RetentionPlan(tuple(removals), held=Kept(path, "stopped"))
        try:
            removal = _removal(path, successor, removals[-1] if removals else None,
                               cutoff=cutoff, keys=keys, may_remove=may_remove)
        except _KeepFileError as keep:
            kept = Kept(path, keep.reason)
            return (RetentionPlan(tuple(removals), problem=kept) if keep.problem
                    else RetentionPlan(tuple(removals), held=kept))
        except OSError as exc:
            return RetentionPlan(tuple(removals),
                                 problem=Kept(path, f"unreadable: {describe_os_error(exc)}"))
        if removal is None:
            break  # not expired: nor is anything after it in practice, and it stays anyway
        removals.append(removal)
    return RetentionPlan(tuple(removals))


def _trusted_keys(paths: Sequence[Path], trusted: Collection[str] | None) -> list[Path]:
    """The public keys beside the log that may vouch for a file before it is removed.

    Anyone who can write the log directory can put a key there; a file signed with it would
    verify, and retention would then re-sign its removal with the gateway's own key. So the
    gateway passes the ids of the keys it has itself signed with (`remember_audit_key`), and a
    key beside the log that is not one of them vouches for nothing: its files are kept and
    reported. None (tests, tools): every key beside the log.
    """
    if trusted is None:
        return list(paths)
    kept = []
    for path in paths:
        try:
            ring = load_public_keys([path])
        except AuditKeyError:
            continue  # unreadable or not a key: it vouches for nothing either
        if set(ring) <= set(trusted):
            kept.append(path)
    return kept


AUDIT_KEYS_FORMAT: Final = "gatewayd-audit-keys-v1"


def remember_audit_key(store: Path, key_id: str) -> frozenset[str]:
    """Add ``key_id`` to the ids of the keys this gateway has signed its log with, kept in
    ``store`` (``STATE_DIR/audit-keys.json``, ``0600``: the state directory, not the log
    directory a log reader may write), and return them all. Blocking (file I/O)."""
    known: set[str] = set()
    try:
        data = json.loads(store.read_text())
        if isinstance(data, dict) and data.get("format") == AUDIT_KEYS_FORMAT:
            known = {k for k in data.get("key_ids", []) if isinstance(k, str) and is_hash(k)}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:  # damaged: start again from the key in use (kept,
        log.warning("audit key list %s unreadable (%s); trusting only the current key",
                    store, exc)  # never widened: older files are then kept, not removed)
    if key_id not in known:
        known.add(key_id)
        atomic_write(store, json.dumps({"format": AUDIT_KEYS_FORMAT,
                                        "key_ids": sorted(known)}, indent=2).encode() + b"\n",
                     mode=0o600, overwrite=True)
    return frozenset(known)


def plan_removals(
    log_path: Path, retention: timedelta, now: datetime, *, may_remove: MayRemove | None = None,
) -> list[Removal]:
    """Just the files `plan_retention` would remove now, oldest first."""
    return list(plan_retention(log_path, retention, now, may_remove=may_remove).removals)


def _notes(removal: Removal, retention: timedelta) -> list[dict[str, Any]]:
    """A removal's audit.retention records: its carried ranges, then its own expired record."""
    notes: list[dict[str, Any]] = [
        {"reason": RETENTION_CARRIED, "file": c.file, "first_seq": c.first_seq,
         "last_seq": c.last_seq, "last_hash": c.last_hash, "last_ts": c.last_ts,
         "records": c.records, "retention": c.retention}
        for c in removal.carried
    ]
    notes.append({"reason": RETENTION_EXPIRED, "file": removal.path.name,
                  "first_seq": removal.first_seq, "last_seq": removal.last_seq,
                  "last_hash": removal.last_hash, "last_ts": removal.last_ts,
                  "records": removal.records, "retention": format_retention(retention)})
    return notes


def _batches(
    removals: Sequence[Removal], retention: timedelta
) -> list[tuple[list[Removal], list[dict[str, Any]]]]:
    """Consecutive removals, at most `BATCH_REMOVALS` and `MAX_RETENTION_RECORDS` notes each
    (a removal's notes never split); a removal with too many notes on its own ends the list."""
    batches: list[tuple[list[Removal], list[dict[str, Any]]]] = []
    for removal in removals:
        notes = _notes(removal, retention)
        if len(notes) > MAX_RETENTION_RECORDS:
            break
        if (not batches or len(batches[-1][0]) >= BATCH_REMOVALS
                or len(batches[-1][1]) + len(notes) > MAX_RETENTION_RECORDS):
            batches.append(([], []))
        batches[-1][0].append(removal)
        batches[-1][1].extend(notes)
    return batches


def _record_batch(
    audit: AuditLog, removals: Sequence[Removal], notes: Sequence[dict[str, Any]]
) -> tuple[list[Removal], str | None]:
    """Write, sign and sync one batch's records; the removals all of whose records are on disk.

    One `AuditLog.record_retention` call: the records and their ``reason="retention"``
    checkpoint, with nothing between them (the only way `verify` honours them), fsynced.
    """
    try:
        outcome = audit.record_retention(notes)
    except RuntimeError as exc:  # the log was closed
        return [], f"audit.retention records not written: {exc}"
    if not outcome.signed:
        return [], outcome.error or "the audit.retention records were not signed"
    recorded: list[Removal] = []
    left = outcome.written
    for removal in removals:
        count = len(removal.carried) + 1  # its notes (`_notes`)
        if left < count:
            break
        left -= count
        recorded.append(removal)
    error = None
    if len(recorded) < len(removals):
        error = (f"audit.retention for {removals[len(recorded)].path.name} not written: "
                 f"{outcome.error or 'unknown error'}")
    return recorded, error


def _remove(removals: Sequence[Removal], logger: OperationalLogger) -> list[Removal]:
    removed: list[Removal] = []
    for removal in removals:
        try:
            removal.path.unlink()
        except OSError as exc:
            logger.error("audit file not removed", file=str(removal.path),
                         error=describe_os_error(exc))
            continue
        removed.append(removal)
        logger.info("audit file removed by retention", file=str(removal.path),
                    first_seq=removal.first_seq, last_seq=removal.last_seq,
                    last_ts=removal.last_ts,
                    carried=[[c.first_seq, c.last_seq] for c in removal.carried])
    return removed


def apply_plan(
    audit: AuditLog, plan: RetentionPlan, retention: timedelta, logger: OperationalLogger
) -> RetentionOutcome:
    """Record, sign and sync the removals, then remove the files (see the module docstring).

    Batch by batch (`_batches`): each batch's records and checkpoint are written in one
    `AuditLog.record_retention` call, which returns only once they are on disk, and only then
    are that batch's files removed; the writer's lock is free between batches. A batch that
    fails stops the run (the files after it stay: removal is only ever from the front).
    """
    if plan.problem is not None:
        logger.error("audit file kept: it does not verify, so retention will not remove it "
                     "nor anything after it", file=str(plan.problem.path),
                     reason=plan.problem.reason)
    if not plan.removals:
        return RetentionOutcome(plan)
    removed: list[Removal] = []
    error: str | None = None
    batches = _batches(plan.removals, retention)
    batched = sum(len(batch) for batch, _ in batches)
    for batch, notes in batches:
        recorded, error = _record_batch(audit, batch, notes)
        done = _remove(recorded, logger)
        removed.extend(done)
        if done:
            try:
                fsync_directory(audit.path.parent)
            except OSError as exc:
                logger.warning("fsync of the audit directory failed",
                               error=describe_os_error(exc))
        if error is not None or len(done) < len(batch):
            break
    if error is None and batched < len(plan.removals):
        error = (f"{plan.removals[batched].path.name} restates more earlier removals than "
                 f"one call may record ({MAX_RETENTION_RECORDS} records): kept")
    if error is not None:
        logger.error("audit retention stopped before removing files", error=error)
    return RetentionOutcome(plan, tuple(removed), error)


def run_retention(
    audit: AuditLog, retention: timedelta, now: datetime, logger: OperationalLogger, *,
    may_remove: MayRemove | None = None, budget_seconds: float | None = None,
    stop: Callable[[], bool] | None = None, trusted_key_ids: Collection[str] | None = None,
) -> RetentionOutcome:
    """Plan and apply retention for ``audit``'s log; nothing when ``retention`` is zero."""
    plan = plan_retention(audit.path, retention, now, may_remove=may_remove,
                          budget_seconds=budget_seconds, stop=stop,
                          trusted_key_ids=trusted_key_ids)
    if stop is not None and stop():
        return RetentionOutcome(plan, error="stopped before removing files")
    return apply_plan(audit, plan, retention, logger)
