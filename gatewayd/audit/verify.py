"""Verifying audit files: the hash chain, the seq order, and the checkpoint signatures.

Owns `verify_files` and the rules for what counts as tampering. Files are streamed line by
line and put in chain order by the ``seq`` of their first record (`files.order_by_chain`), so
shell globs and out-of-order arguments work; the order used is reported.

Verification stops at the FIRST problem and reports its kind (`Problem`), the first bad
``seq``, the file and line:

* ``malformed`` — not a record: bad UTF-8/JSON, missing keys, over-long or torn final line
  (first_bad_seq: the seq expected at that line); or an empty file given as a log that is
  not the live file of a rotated file also given (first_bad_seq None): every file the writer
  starts begins with a header, and only the live file may be empty (after a rotation, before
  its first record). An empty live file is a warning.
* ``edited`` — the bytes no longer match the record's hash (first_bad_seq: that record), or a
  record was replaced and re-hashed so the next ``prev`` no longer matches (first_bad_seq: the
  replaced record).
* ``deleted`` — a seq gap where the next record's ``prev`` is not the last hash
  (first_bad_seq: the first missing seq); a seq gap with an intact chain that no
  ``audit.recovery`` record accounts for (see below; first_bad_seq: the first missing seq); or
  a file that does not begin with a header record (first_bad_seq: the seq of its first
  record). Every file the writer starts begins with a header — ``audit.start`` with
  ``prev`` = 64 zeros for a new log, ``audit.continue`` for any later file — so a file that
  begins with anything else lost its first lines: deleting the head of a file, even of a
  closed and signed log, leaves every remaining link and signature intact and would otherwise
  pass. (``audit.start`` in the middle of a file is an ordinary restart.)
* ``reordered`` — a record appears out of seq order. first_bad_seq: the first seq out of place.
* ``inserted`` — a forged record spliced in, even with a correctly recomputed hash (the next
  genuine record chains around it). first_bad_seq: the forged record's seq.
* ``truncated`` — a later file chains to records cut off the end of the previous file (which
  therefore does not end in its rotation checkpoint). first_bad_seq: the first missing seq.
* ``missing_file`` — the previous file ends sealed by a rotation checkpoint but the next file
  does not chain to it: a whole rotated file is missing. first_bad_seq: the first missing seq.
* ``bad_signature`` — a checkpoint's signature is invalid or made by a key not given.
  first_bad_seq: the checkpoint. A checkpoint is signed (`signing`, version 2) over its
  ``covers_hash``, ``covers_seq``, ``key_id``, ``node``, ``reason`` and ``ts``, so changing
  any of them (its reason, say) invalidates it. A signature over the version 1 message
  (``covers_hash``, ``covers_seq``, ``node``, ``ts`` only: logs written before version 2)
  is accepted too, with a warning, but such a checkpoint never counts as retention's
  checkpoint (below): its reason is not signed.
* ``checkpoint_mismatch`` — a checkpoint claims a seq/hash that is not the chain's.
  first_bad_seq: the checkpoint.
* ``restarted`` — a second chain (``prev`` = 64 zeros) starts mid-stream.
* ``unsealed`` — only with ``require_sealed``: records after the last checkpoint.
  first_bad_seq: the first unsigned record.

Not problems, but reported as warnings (the result stays ok):

* a **seq gap with an intact chain** (the record after the gap has ``prev`` = hash of the
  record before it) **that a later** ``audit.recovery`` **record names exactly**
  (``lost_from``-``lost_to`` = the gap): the writer allocated those seqs but could not write
  them (disk full, torn write at a crash) and said so. Without such a record the gap is
  ``deleted``: someone able to write the file can delete records after the last checkpoint
  and re-link the rest, which leaves exactly this shape. A gap at the start of the first file
  given is known from the header (seq 1 for ``audit.start``, ``prev_seq`` + 1 for
  ``audit.continue``). The recovery record may come later than the gap (files after it), so
  unexplained gaps are reported when the files given are exhausted.
* **records after the last checkpoint**: normal for the live file of a running gateway; they
  are protected by the hash chain only, so someone able to write the file could remove or
  rewrite them undetectably until the next checkpoint. Pass ``require_sealed=True``
  (``--sealed``) for archived logs, which must end in a checkpoint.
* **checkpoints with a version 1 signature** (see ``bad_signature``): counted, and they
  sign what they cover, but their reason is unsigned, so none is retention's checkpoint.
* a chain that starts mid-way (first record's ``prev`` is not 64 zeros): earlier files were
  not given, so they cannot be checked. With ``require_complete=True`` this is a
  ``missing_file`` problem instead (first_bad_seq: 1), unless retention explains it:
* **files removed by retention** (see `retention`). The oldest file given begins with
  ``audit.continue`` (``prev_seq`` P, ``prev`` H) and the files given hold ``audit.retention``
  records whose ranges (``first_seq``-``last_seq``) together cover every seq 1-P, every one
  of them ending at P naming ``last_hash`` = H. Ranges may overlap (a removal recorded twice
  because the first attempt failed) but none may reach past P into the records given. Such a
  missing head is accepted and reported as a note (in ``warnings`` and, itemised, in
  ``removed``). A retention record counts only if it is **signed by retention's own
  checkpoint**: the first ``audit.checkpoint`` after it in the chain has ``reason``
  ``"retention"`` under a version 2 signature (which signs the reason), and every record
  between the two is another ``audit.retention`` or an ``audit.recovery`` (no
  ``audit.start``, no ``audit.continue``, nothing else). That is
  exactly what `AuditLog.record_retention` writes, under one hold of the writer's lock, and
  files are removed only after that checkpoint is written, so an honest removal always
  qualifies. The hash chain alone is unkeyed: anyone able to write the log directory can
  append a re-hashed "retention" record to the live file while the gateway is stopped, and
  the gateway's own ``start`` checkpoint (which signs what a crashed run left) or any later
  checkpoint would then sign it; such a record is followed by ``audit.start`` or by a
  checkpoint of another reason, and explains nothing; the reason is signed, so rewriting a
  ``start`` checkpoint's reason to ``"retention"`` breaks its signature. A retention record
  must also be plausible: its stated ``retention`` is at least 7 days and the removed
  records' last ``ts`` (``last_ts``) was at least that old at the record's own ``ts``. A
  retention record that fails these rules explains nothing: the head is reported as missing
  as before, with the reason. The retention records are themselves in the chain, so
  deleting them breaks the chain.
  Two reasons are honoured: ``expired`` (one removed file, ``first_seq`` = its own first seq)
  and ``carried`` (the coverage of retention records that were *inside* a file being removed,
  restated in the live file just before that file's own ``expired`` record, so that removing
  the file that explains earlier removals does not remove the explanation). The verifier
  cannot see the records a ``carried`` range stood for — they went with the file — so it holds
  it to the same rules (signed by retention's checkpoint, plausible); `retention` writes one
  only from the retention records of the file it removes that meet these rules there, never
  from the file's header, and writes it in the same run as its ``expired`` record, signed by
  the same ``reason="retention"`` checkpoint.
  `VerifyResult.retentions` lists the retention records that met these rules.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gatewayd.audit import files
from gatewayd.audit.chain import GENESIS_PREV, LineDefect, check_line, is_hash, parse_line
from gatewayd.audit.events import EventName
from gatewayd.audit.signing import (
    CHECKPOINT_VERSION,
    LEGACY_CHECKPOINT_VERSION,
    AuditKeyError,
    checkpoint_signature_version,
    default_public_key_paths,
    load_public_keys,
)
from gatewayd.config import parse_duration

_CHECKPOINT = EventName.AUDIT_CHECKPOINT.value
_START = EventName.AUDIT_START.value
_CONTINUE = EventName.AUDIT_CONTINUE.value
_RECOVERY = EventName.AUDIT_RECOVERY.value
_RETENTION = EventName.AUDIT_RETENTION.value
# The shortest retention the configuration accepts; a record claiming less is implausible.
MIN_RETENTION: Final = timedelta(days=7)
# audit.retention reasons: a file removed, or the coverage of the retention records that were
# inside a removed file, restated in the live file (see the module docstring).
RETENTION_EXPIRED: Final = "expired"
RETENTION_CARRIED: Final = "carried"
# The reason of the checkpoint that retention writes right after its records (writer.py).
RETENTION_CHECKPOINT: Final = "retention"
_RETENTION_REASONS: Final = frozenset({RETENTION_EXPIRED, RETENTION_CARRIED})


class Problem(enum.StrEnum):
    MALFORMED = "malformed"
    EDITED = "edited"
    DELETED = "deleted"
    REORDERED = "reordered"
    INSERTED = "inserted"
    TRUNCATED = "truncated"
    MISSING_FILE = "missing_file"
    BAD_SIGNATURE = "bad_signature"
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"
    RESTARTED = "restarted"
    UNSEALED = "unsealed"


@dataclass(frozen=True)
class CheckpointInfo:
    seq: int
    ts: str
    reason: str
    covers_seq: int
    key_id: str
    file: Path


@dataclass(frozen=True)
class RemovedRange:
    """An ``audit.retention`` record: a rotated file removed after its retention period."""

    seq: int  # the audit.retention record's own seq
    ts: str  # when it was removed (the retention record's ts)
    file: str  # the removed file's name ("first … last" for a carried range of several)
    first_seq: int
    last_seq: int
    last_hash: str
    last_ts: str  # ts of the removed file's last record
    retention: str
    recorded_in: Path  # the file holding the retention record
    reason: str = RETENTION_EXPIRED  # or RETENTION_CARRIED
    records: int = 0  # records the removed range held (as the record states)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "ts": self.ts, "file": self.file, "first_seq": self.first_seq,
            "last_seq": self.last_seq, "last_hash": self.last_hash, "last_ts": self.last_ts,
            "retention": self.retention, "recorded_in": str(self.recorded_in),
            "reason": self.reason, "records": self.records,
        }


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # records verified (before the problem, if any)
    first_bad_seq: int | None
    problem: str  # empty when ok
    kind: Problem | None = None
    file: Path | None = None
    line: int | None = None
    files: tuple[Path, ...] = ()  # in the (chain) order they were verified
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    last_checkpoint: CheckpointInfo | None = None
    unsigned_tail: int = 0  # records after the last checkpoint
    gaps: tuple[tuple[int, int], ...] = ()  # seq ranges never written (chain intact)
    warnings: tuple[str, ...] = ()
    key_ids: tuple[str, ...] = ()
    removed: tuple[RemovedRange, ...] = ()  # files before the first given, removed by retention
    # Every audit.retention record in the files that retention's checkpoint signs and that is
    # plausible (chain order).
    retentions: tuple[RemovedRange, ...] = ()

    def to_json(self) -> dict[str, Any]:
        cp = self.last_checkpoint
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "kind": self.kind.value if self.kind else None,
            "problem": self.problem,
            "file": str(self.file) if self.file else None,
            "line": self.line,
            "files": [str(p) for p in self.files],
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "checkpoints": self.checkpoints,
            "last_checkpoint": None if cp is None else {
                "seq": cp.seq, "ts": cp.ts, "reason": cp.reason, "covers_seq": cp.covers_seq,
                "key_id": cp.key_id, "file": str(cp.file),
            },
            "unsigned_tail": self.unsigned_tail,
            "gaps": [list(g) for g in self.gaps],
            "warnings": list(self.warnings),
            "key_ids": list(self.key_ids),
            "removed": [r.to_json() for r in self.removed],
        }


@dataclass(frozen=True)
class _Found:
    kind: Problem
    seq: int | None
    detail: str


@dataclass(frozen=True)
class _Head:
    """The first record verified, when it does not begin a new log (prev is not zeros)."""

    seq: int
    prev: str
    prev_seq: int | None  # from its audit.continue header; None if it is not one
    path: Path


@dataclass
class _ChainState:
    """What the verifier knows after the records accepted so far."""

    keyring: Mapping[str, Ed25519PublicKey]
    last_seq: int | None = None
    last_hash: str | None = None
    before_last_hash: str | None = None
    last_event: str | None = None
    last_reason: str | None = None
    last_file: Path | None = None
    records: int = 0
    first_seq: int | None = None
    checkpoints: int = 0
    legacy_checkpoints: int = 0  # of them, signed with the version 1 message
    last_checkpoint: CheckpointInfo | None = None
    unsigned: int = 0
    first_unsigned: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)  # explained by audit.recovery
    # Gaps with an intact chain not (yet) explained: (first, last) -> where it was seen.
    pending: dict[tuple[int, int], tuple[Path, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    head: _Head | None = None  # set when the chain starts mid-way
    # audit.retention records signed by retention's own checkpoint (module docstring).
    retentions: list[RemovedRange] = field(default_factory=list)
    # Those since the last checkpoint, waiting for it; and why others were refused.
    awaiting: list[RemovedRange] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    removed: list[RemovedRange] = field(default_factory=list)  # those that explain the head

    @property
    def expected_seq(self) -> int | None:
        return None if self.last_seq is None else self.last_seq + 1

    def accept(self, record: Mapping[str, Any], path: Path, signature_version: int | None) -> None:
        """Take a record that passed the checks (``signature_version``: a checkpoint's)."""
        seq = record["seq"]
        self.before_last_hash, self.last_hash = self.last_hash, record["hash"]
        self.last_seq = seq
        self.last_event = record["event"]
        reason = record.get("reason")
        self.last_reason = reason if isinstance(reason, str) else None
        self.last_file = path
        self.records += 1
        if self.first_seq is None:
            self.first_seq = seq
        if record["event"] == _RECOVERY:
            self._explain(record, path)
        self._track_retention(record, path, signature_version)
        if record["event"] == _CHECKPOINT:
            self.checkpoints += 1
            if signature_version == LEGACY_CHECKPOINT_VERSION:
                self.legacy_checkpoints += 1
            self.last_checkpoint = CheckpointInfo(
                seq=seq, ts=record["ts"], reason=self.last_reason or "",
                covers_seq=record["covers_seq"], key_id=record["key_id"], file=path,
            )
            self.unsigned, self.first_unsigned = 0, None
        else:
            self.unsigned += 1
            if self.first_unsigned is None:
                self.first_unsigned = seq

    def _track_retention(
        self, record: Mapping[str, Any], path: Path, signature_version: int | None
    ) -> None:
        """Hold retention records until their checkpoint; honour them only if it is theirs
        (reason "retention", which only a version 2 signature vouches for)."""
        event = record["event"]
        if event == _RETENTION:
            removed = _removed_range(record, path)
            if removed is not None:
                self.awaiting.append(removed)
            return
        if event == _RECOVERY or not self.awaiting:
            return
        if (event == _CHECKPOINT and self.last_reason == RETENTION_CHECKPOINT
                and signature_version == CHECKPOINT_VERSION):
            self.retentions.extend(self.awaiting)
        else:
            if event != _CHECKPOINT:
                what = f"{event} seq {record['seq']}"
            elif self.last_reason == RETENTION_CHECKPOINT:
                what = ("a checkpoint whose version 1 signature does not sign its reason "
                        f"{RETENTION_CHECKPOINT!r}")
            else:
                what = f"a checkpoint with reason {self.last_reason!r}"
            self.refused.extend(
                f"audit.retention seq {r.seq} is followed by {what}, not by the "
                f"reason={RETENTION_CHECKPOINT!r} checkpoint retention writes right after "
                "its records: not written by retention" for r in self.awaiting)
        self.awaiting.clear()

    def gap(self, first: int, last: int, path: Path, line: int) -> None:
        """Note a seq gap with an intact chain; it stays a problem until a recovery names it."""
        self.pending[(first, last)] = (path, line)

    def _explain(self, recovery: Mapping[str, Any], path: Path) -> None:
        first, last = recovery.get("lost_from"), recovery.get("lost_to")
        if not (isinstance(first, int) and isinstance(last, int)):
            return
        where = self.pending.pop((first, last), None)
        if where is None:
            return  # a gap before the files given, or not a gap at all: nothing to excuse
        self.gaps.append((first, last))
        self.warnings.append(
            f"{_span(first, last)} absent in {where[0].name} but the chain is intact across "
            f"the gap: never written, as audit.recovery seq {recovery['seq']} in {path.name} "
            "records (write failure or torn write)"
        )


def _removed_range(record: Mapping[str, Any], path: Path) -> RemovedRange | None:
    """The range an audit.retention record names, or None if it lacks a field (ignored)."""
    values = {name: record.get(name) for name in
              ("first_seq", "last_seq", "last_hash", "last_ts", "retention", "file", "records")}
    first, last, count = values["first_seq"], values["last_seq"], values["records"]
    reason = record.get("reason")
    if not (isinstance(first, int) and isinstance(last, int) and 0 < first <= last
            and is_hash(values["last_hash"]) and reason in _RETENTION_REASONS
            and all(isinstance(values[k], str) for k in ("last_ts", "retention", "file"))):
        return None
    return RemovedRange(
        seq=record["seq"], ts=record["ts"], file=str(values["file"]), first_seq=first,
        last_seq=last, last_hash=str(values["last_hash"]), last_ts=str(values["last_ts"]),
        retention=str(values["retention"]), recorded_in=path, reason=str(reason),
        records=count if isinstance(count, int) and not isinstance(count, bool) else 0,
    )


def _implausible(removed: RemovedRange) -> str | None:
    """Why a retention record cannot have been an honest expiry, or None if it can.

    The record states the retention in force and the removed file's last ``ts``: a file
    younger than that retention at the time of removal, or a retention shorter than the
    configuration allows, means the removal was not what the record calls it.
    """
    try:
        retention = parse_duration(removed.retention)
        # TypeError: a last_ts without an offset (ts itself is checked to have one).
        age = datetime.fromisoformat(removed.ts) - datetime.fromisoformat(removed.last_ts)
    except (ValueError, TypeError):
        return (f"audit.retention seq {removed.seq} has an unreadable retention "
                f"{removed.retention!r} or last_ts {removed.last_ts!r}")
    if retention < MIN_RETENTION:
        return (f"audit.retention seq {removed.seq} claims a retention of {removed.retention}, "
                "shorter than the 7 days the configuration allows")
    if age < retention:
        return (f"audit.retention seq {removed.seq} removed {removed.file} (last record "
                f"{removed.last_ts}) on {removed.ts}, before the stated retention of "
                f"{removed.retention} had passed")
    return None


def _honoured(state: _ChainState) -> tuple[list[RemovedRange], list[str]]:
    """The retention records that count (signed by retention's checkpoint, plausible), and
    why not others."""
    honoured: list[RemovedRange] = []
    reasons = list(state.refused)
    reasons.extend(f"audit.retention seq {r.seq} is not yet signed by a checkpoint"
                   for r in state.awaiting)
    for removed in state.retentions:
        why = _implausible(removed)
        if why is not None:
            reasons.append(why)
            continue
        honoured.append(removed)
    return honoured, reasons


def _removal_chain(state: _ChainState, head: _Head) -> list[RemovedRange] | str:
    """The retention records that together removed seq 1..head.prev_seq, or why there are none.

    They must be signed by retention's checkpoint and plausible (`_honoured`); their ranges must
    together cover every seq in 1..prev_seq (overlaps allowed: a removal recorded twice), none
    may reach past prev_seq, and every one ending at prev_seq must name the hash the head
    chains to. Returned: the records of a cover, by ``first_seq``.
    """
    if head.prev_seq is None:
        return f"{head.path.name} does not begin with audit.continue"
    prev_seq = head.prev_seq
    honoured, reasons = _honoured(state)
    usable: list[RemovedRange] = []
    for removed in honoured:
        if removed.first_seq > prev_seq:
            continue  # a removal recorded but not done: that file is among those given
        if removed.last_seq > prev_seq:
            reasons.append(f"audit.retention seq {removed.seq} claims seq "
                           f"{removed.first_seq}-{removed.last_seq} removed, but "
                           f"{head.path.name} continues from seq {prev_seq}")
            continue
        if removed.last_seq == prev_seq and removed.last_hash != head.prev:
            reasons.append(f"audit.retention seq {removed.seq} names a last hash "
                           f"{_short(removed.last_hash)}, not the {_short(head.prev)} that "
                           f"{head.path.name} chains to")
            return "; ".join(reasons)
        usable.append(removed)
    chain: list[RemovedRange] = []
    cursor = 1
    for removed in sorted(usable, key=lambda r: (r.first_seq, -r.last_seq, r.seq)):
        if removed.first_seq > cursor:
            break
        if removed.last_seq >= cursor:
            chain.append(removed)
            cursor = removed.last_seq + 1
    if cursor <= prev_seq:
        reasons.append(f"no audit.retention record accounts for seq {cursor} on")
        return "; ".join(reasons)
    return chain


def _settle_head(state: _ChainState, *, require_complete: bool) -> _Found | None:
    """Account for a chain that starts mid-way: removed by retention, or earlier files missing."""
    head = state.head
    if head is None:
        return None
    chain = _removal_chain(state, head)
    if isinstance(chain, list):
        state.removed = chain
        state.warnings.append(_retention_note(chain))
        return None
    if not require_complete:
        state.warnings.append(
            f"the chain starts at seq {head.seq} in {head.path.name}, not at the beginning of "
            "the log: earlier files were not given and are not checked"
            + (f" (not removed by retention: {chain})"
               if state.retentions or state.refused or state.awaiting else "")
        )
        return None
    return _Found(Problem.MISSING_FILE, 1,
                  f"the log begins with {head.path.name} at seq {head.seq}, chained to earlier "
                  f"records that are neither given nor removed by retention ({chain})")


def _retention_note(chain: Sequence[RemovedRange]) -> str:
    first, last = chain[0], chain[-1]
    expired = sum(1 for r in chain if r.reason == RETENTION_EXPIRED)
    files_text = "1 file" if expired == 1 else f"{expired} files"
    if expired < len(chain):
        files_text += " and the earlier removals carried forward"
    by = (f"audit.retention seq {first.seq}" if len(chain) == 1
          else f"audit.retention seq {first.seq}, …, {last.seq}")
    newest = max(chain, key=lambda r: r.seq)
    return (f"records 1-{last.last_seq:,} ({files_text}, the newest record of {last.last_ts}) "
            f"were removed by retention ({last.retention}), the last on {newest.ts} ({by}); "
            "the chain is verified from there")


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


def _is_header(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` may begin a file: a new log's audit.start, or audit.continue."""
    if record["event"] == _START:
        return bool(record["prev"] == GENESIS_PREV)
    if record["event"] == _CONTINUE:
        prev_seq = record.get("prev_seq")
        return (isinstance(prev_seq, int) and not isinstance(prev_seq, bool)
                and 0 < prev_seq < record["seq"])
    return False


def _short(hash_hex: str) -> str:
    return hash_hex[:12] + "…"


def _seq_appears_after(path: Path, line_number: int, seq: int) -> bool:
    """Whether a record with ``seq`` occurs in ``path`` after line ``line_number``."""
    for line in files.iter_lines(path):
        if line.number <= line_number or line.data is None:
            continue
        record = parse_line(line.data)
        if record is not None and record.get("seq") == seq:
            return True
    return False


class _Verifier:
    def __init__(self, keyring: Mapping[str, Ed25519PublicKey]) -> None:
        self.state = _ChainState(keyring)

    def feed(self, path: Path, line: files.Line, *, file_start: bool) -> _Found | None:
        state = self.state
        if line.data is None:
            return _Found(Problem.MALFORMED, state.expected_seq,
                          f"line longer than {files.MAX_LINE_BYTES} bytes")
        if not line.terminated:
            return _Found(Problem.MALFORMED, state.expected_seq,
                          "final line is incomplete (no newline): a torn write or a cut file")
        check = check_line(line.data)
        if check.defect is LineDefect.MALFORMED or check.record is None:
            return _Found(Problem.MALFORMED, state.expected_seq, f"not a record: {check.detail}")
        record = check.record
        if check.defect is LineDefect.EDITED:
            return _Found(Problem.EDITED, record["seq"],
                          f"record seq {record['seq']} was modified: {check.detail}")
        if line.number == 1 and not _is_header(record):
            return _Found(Problem.DELETED, record["seq"],
                          f"{path.name} begins with seq {record['seq']} ({record['event']}), "
                          "not with a header record (audit.start of a new log or "
                          "audit.continue): the records before it were deleted")
        found = self._check_link(record, path, line.number, file_start)
        version = None
        if found is None and record["event"] == _CHECKPOINT:
            checked = self._check_checkpoint(record)
            if isinstance(checked, _Found):
                found = checked
            else:
                version = checked
        if found is None:
            state.accept(record, path, version)
        return found

    def _check_link(
        self, record: Mapping[str, Any], path: Path, line_number: int, file_start: bool
    ) -> _Found | None:
        state = self.state
        seq, prev = record["seq"], record["prev"]
        if state.last_seq is None or state.last_hash is None:
            self._check_start(record, path, line_number)
            return None
        if prev == state.last_hash:
            return self._check_linked_seq(seq, path, line_number)
        if prev == GENESIS_PREV:
            return _Found(Problem.RESTARTED, seq,
                          f"a new chain (prev = zeros) starts at seq {seq}: the log was reset "
                          "or records of another log were mixed in")
        if seq <= state.last_seq:
            return self._classify_backwards(seq, prev, line_number)
        if seq == state.last_seq + 1:
            last = state.last_seq
            return _Found(Problem.EDITED, last,
                          f"prev of seq {seq} ({_short(prev)}) is not the hash of seq {last}: "
                          f"record {last} was replaced and re-hashed (or seq {seq}'s prev edited)")
        return self._classify_missing(seq, path, line_number, file_start)

    def _check_linked_seq(self, seq: int, path: Path, line_number: int) -> _Found | None:
        """The record chains to the last one; its seq must still increase (gaps noted)."""
        last = self.state.last_seq
        assert last is not None
        if seq > last + 1:
            self.state.gap(last + 1, seq - 1, path, line_number)
        if seq > last:
            return None
        return _Found(Problem.INSERTED, seq,
                      f"record seq {seq} chains to seq {last} but does not increase seq: "
                      "a forged record")

    def _classify_backwards(self, seq: int, prev: str, line_number: int) -> _Found:
        """The chain breaks and seq goes back: something was inserted or moved."""
        state = self.state
        last = state.last_seq
        if prev == state.before_last_hash:
            return _Found(Problem.INSERTED, last,
                          f"record seq {last} just before line {line_number} was inserted: "
                          f"the next record (seq {seq}) chains to the record before it")
        return _Found(Problem.REORDERED, seq,
                      f"record seq {seq} appears after seq {last}: records were moved")

    def _check_start(self, record: Mapping[str, Any], path: Path, line_number: int) -> None:
        """The first record verified: a gap before it is known from its header, if any."""
        seq, prev = record["seq"], record["prev"]
        if prev == GENESIS_PREV:
            if seq > 1:
                self.state.gap(1, seq - 1, path, line_number)
            return
        prev_seq = record.get("prev_seq") if record["event"] == _CONTINUE else None
        self.state.head = _Head(seq=seq, prev=prev, path=path,
                                prev_seq=prev_seq if _is_header(record) else None)
        if isinstance(prev_seq, int) and prev_seq + 1 < seq:
            self.state.gap(prev_seq + 1, seq - 1, path, line_number)

    def _classify_missing(
        self, seq: int, path: Path, line_number: int, file_start: bool
    ) -> _Found:
        state = self.state
        assert state.last_seq is not None
        missing = state.last_seq + 1
        span = f"seq {missing}" if missing == seq - 1 else f"seq {missing}-{seq - 1}"
        previous = state.last_file.name if state.last_file else "the previous file"
        if file_start:
            sealed = state.last_event == _CHECKPOINT and state.last_reason == "rotation"
            if sealed:
                return _Found(Problem.MISSING_FILE, missing,
                              f"{previous} is sealed at seq {state.last_seq} but {path.name} "
                              f"starts at seq {seq} chained to a record not given: a whole "
                              f"rotated file ({span}) is missing")
            return _Found(Problem.TRUNCATED, missing,
                          f"{previous} ends at seq {state.last_seq} without its sealing "
                          f"checkpoint, and {path.name} chains to a later record: {span} "
                          f"were cut off the end of {previous}")
        if _seq_appears_after(path, line_number, missing):
            return _Found(Problem.REORDERED, missing,
                          f"seq {missing} appears later in {path.name}: records were moved")
        return _Found(Problem.DELETED, missing,
                      f"{span} missing: seq {seq} chains to a record that is not there")

    def _check_checkpoint(self, record: Mapping[str, Any]) -> _Found | int:
        """The problem with a checkpoint, or the version of the message its signature signs."""
        state = self.state
        seq = record["seq"]
        covers_seq, covers_hash = record.get("covers_seq"), record.get("covers_hash")
        kid, sig = record.get("key_id"), record.get("sig")
        if not (isinstance(covers_seq, int) and is_hash(covers_hash)
                and isinstance(kid, str) and isinstance(sig, str)):
            return _Found(Problem.BAD_SIGNATURE, seq,
                          f"checkpoint seq {seq} lacks covers_seq/covers_hash/key_id/sig")
        assert isinstance(covers_hash, str)
        chain_seq = state.last_seq if state.last_seq is not None else covers_seq
        if covers_hash != record["prev"] or covers_seq != chain_seq or covers_seq >= seq:
            return _Found(Problem.CHECKPOINT_MISMATCH, seq,
                          f"checkpoint seq {seq} claims seq {covers_seq} / "
                          f"{_short(covers_hash)} but the chain there is seq {chain_seq} / "
                          f"{_short(record['prev'])}")
        key = state.keyring.get(kid)
        if key is None:
            return _Found(Problem.BAD_SIGNATURE, seq,
                          f"checkpoint seq {seq} is signed by key {kid[:16]}…, which is not "
                          "among the public keys given")
        reason = record.get("reason")
        version = checkpoint_signature_version(
            key, sig, node=record["node"], seq=covers_seq, hash_hex=covers_hash,
            ts=record["ts"], reason=reason if isinstance(reason, str) else None)
        if version is None:
            return _Found(Problem.BAD_SIGNATURE, seq,
                          f"checkpoint seq {seq} has an invalid signature: it (its reason, "
                          f"time or key id), or the records up to seq {covers_seq}, were "
                          "forged")
        return version


def _keyring(
    paths: Sequence[Path], public_key: Path | Sequence[Path] | None
) -> Mapping[str, Ed25519PublicKey]:
    if public_key is None:
        lives = dict.fromkeys(files.live_path_of(p) for p in paths)
        key_paths = [k for live in lives for k in default_public_key_paths(live)]
        if not key_paths:
            names = ", ".join(f"{live}.pub" for live in lives)
            raise AuditKeyError(f"no public key found ({names}); pass one with --key")
    elif isinstance(public_key, Path):
        key_paths = [public_key]
    else:
        key_paths = list(public_key)
    return load_public_keys(key_paths)


def _lines_in_chain_order(
    paths: Sequence[Path],
) -> Iterator[tuple[Path, files.Line | None, bool]]:
    """(file, line, is the first line of a file after the first file); line None: the file
    is empty."""
    for index, path in enumerate(paths):
        empty = True
        for line in files.iter_lines(path):
            yield path, line, index > 0 and empty
            empty = False
        if empty:
            yield path, None, False


def _empty_file(path: Path, paths: Sequence[Path], state: _ChainState) -> _Found | None:
    """An empty file given as a log: a problem, unless it is the live file of a rotated file
    given (the writer creates the live file after a rotation only with its first record, and
    a failed first write leaves it empty)."""
    if any(other != path and files.live_path_of(other) == path for other in paths):
        state.warnings.append(f"{path.name} is empty: the live file has no records yet")
        return None
    return _Found(Problem.MALFORMED, None,
                  f"{path.name} is empty: every audit file begins with a header record, and "
                  "only the live file of the log may be empty (an empty file given as a log "
                  "is not one of its files)")


def verify_files(
    paths: Sequence[Path],
    public_key: Path | Sequence[Path] | None = None,
    *,
    require_sealed: bool = False,
    require_complete: bool = False,
) -> VerifyResult:
    """Verify audit files (any order) against the public key(s); stop at the first problem.

    ``public_key`` None means the ``<log>.pub`` (and archived ``<log>.pub.*``) next to the
    files. ``require_complete``: the files are the whole log, so a chain starting mid-way is
    a problem unless retention records account for the files before it. Raises
    `FileNotFoundError`/`OSError` for unreadable files and `AuditKeyError` for missing or
    unreadable keys (usage errors, not verdicts).
    """
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a readable file")
    keyring = _keyring(paths, public_key)
    ordered = tuple(files.order_by_chain(paths))
    verifier = _Verifier(keyring)
    for path, line, file_start in _lines_in_chain_order(ordered):
        if line is None:
            found = _empty_file(path, ordered, verifier.state)
        else:
            found = verifier.feed(path, line, file_start=file_start)
        if found is not None:
            _settle_head(verifier.state, require_complete=False)  # for its warning only
            return _result(verifier.state, ordered=ordered, keyring=keyring, found=found, path=path,
                           line=None if line is None else line.number)
    state = verifier.state
    found = _settle_head(state, require_complete=require_complete)
    if found is not None and state.head is not None:
        return _result(state, ordered=ordered, keyring=keyring, found=found,
                       path=state.head.path, line=1)
    if state.pending:
        (first, last), (gap_path, gap_line) = min(state.pending.items())
        found = _Found(Problem.DELETED, first,
                       f"{_span(first, last)} missing: the chain links around the gap but no "
                       "audit.recovery record names it as lost: records were deleted and the "
                       "rest re-linked")
        return _result(state, ordered=ordered, keyring=keyring, found=found, path=gap_path,
                       line=gap_line)
    if require_sealed and state.unsigned and state.first_unsigned is not None:
        found = _Found(Problem.UNSEALED, state.first_unsigned,
                       f"{state.unsigned} records from seq {state.first_unsigned} on come after "
                       "the last checkpoint; a closed or archived log must end with one")
        return _result(state, ordered=ordered, keyring=keyring, found=found,
                       path=state.last_file, line=None)
    if state.unsigned:
        state.warnings.append(
            f"the last {state.unsigned} records (seq {state.first_unsigned}-{state.last_seq}) "
            "come after the last checkpoint and are protected by the hash chain only: normal "
            "for the live file of a running gateway; an archived log should end with a checkpoint"
        )
    if state.records == 0:
        state.warnings.append("no records in the files given")
    return _result(state, ordered=ordered, keyring=keyring, found=None, path=None, line=None)


def _result(
    state: _ChainState,
    *, ordered: tuple[Path, ...], keyring: Mapping[str, Ed25519PublicKey],
    found: _Found | None, path: Path | None, line: int | None,
) -> VerifyResult:
    where = f"{path.name}:{line}: " if path is not None and line is not None else ""
    warnings = list(state.warnings)
    if state.legacy_checkpoints:
        warnings.append(
            f"{state.legacy_checkpoints} checkpoint(s) carry a version 1 signature "
            "(gatewayd-audit-checkpoint-v1), written before checkpoints signed their reason "
            "and key id: they sign the records they cover, but none of them counts as "
            "retention's checkpoint")
    return VerifyResult(
        ok=found is None,
        records=state.records,
        first_bad_seq=found.seq if found else None,
        problem=f"{where}{found.detail}" if found else "",
        kind=found.kind if found else None,
        file=path if found else None,
        line=line if found else None,
        files=ordered,
        first_seq=state.first_seq,
        last_seq=state.last_seq,
        checkpoints=state.checkpoints,
        last_checkpoint=state.last_checkpoint,
        unsigned_tail=state.unsigned,
        gaps=tuple(state.gaps),
        warnings=tuple(warnings),
        key_ids=tuple(keyring),
        removed=tuple(state.removed),
        retentions=tuple(_honoured(state)[0]),
    )
