"""A copy of every audit record to a central syslog collector (``[audit.forward]``).

Owns the forwarder: reading records from the audit files in chain order, turning each into an
RFC 5424 message, sending it over UDP (RFC 5426), TCP (RFC 6587 octet counting) or TCP+TLS
(RFC 5425, octet counting too; the collector's certificate must chain to ``ca_file`` alone,
the system CA store is not used), and remembering what the collector has.

**The audit files are the disk buffer.** Nothing is queued in memory: records are streamed
from disk in batches, at most `WINDOW_RECORDS` of them sent and not yet acknowledged. The last
record the collector has (``seq`` and ``hash``) is kept in ``STATE_DIR/audit-forward.cursor``
(JSON, replaced atomically, at most once a second and at close); after an outage or a restart
sending resumes right after it, in order, following rotation into rotated files. A first start
(no cursor) sends every record on disk. A cursor whose record no longer exists (retention
removed its file) or does not match the log (another log's cursor) restarts from the oldest
record on disk, with a warning naming how many records the collector can never get; the
collector then counts as having only the record before the oldest one on disk (retention and
the backlog follow). A cursor whose record the log does not have resumes without resending
only when its ``prev`` (kept in the cursor) confirms where: the record it chained from is in
the log, directly before the log's next record — resume after it — or is the log's last
record (a write rolled back, or a power cut with ``fsync = "interval"`` that took the log's
last record after it was sent: the cursor was fsynced, the log was not) — resume at the log's
end; either with a warning. Every other cursor the log cannot confirm counts as a mismatch,
and everything on disk is sent again (duplicates, no gap): a power cut that lost several
records (whether or not the writer wrote the same seqs again), a cursor without ``prev``, and
a cursor past the log's end that does not follow its last record — a foreign one (another
node's or another log's state dir) with a higher seq than the whole log is one.

**Delivery: at least once, in order; duplicates possible, gaps not.** Syslog has no
application-level acknowledgement, so with TCP and TLS the kernel's is used: on Linux
``SIOCOUTQ`` gives the bytes the peer has not yet acknowledged. The forwarder does TLS itself
(``ssl.SSLObject`` over memory BIOs on a plain TCP transport), so it knows exactly which
ciphertext bytes carry which record: the stream offset where each record's bytes end is
noted, and acknowledged = bytes handed to the transport - the transport's buffer - SIOCOUTQ.
A record counts as delivered (and the cursor may move over it) only once every byte of it is
acknowledged, while nothing unread from the collector is waiting (``FIONREAD`` = 0; it could
be its goodbye) and the collector has not closed. When the connection fails or the collector
closes it (EOF or TLS close_notify: RFC 5425 §5.3 — a collector going down gracefully should
half-close and read on until we close), the forwarder stops, reconnects every
``reconnect_interval``, and resends from the last delivered record: what was sent and not yet
acknowledged arrives twice. Collectors deduplicate by ``seq`` (with ``node``; the structured
data carries both ``seq`` and ``hash``). What the kernel acknowledged but a collector that
crashed never read is lost to it — a limit of syslog itself (RELP would be needed); the audit
file still has it, and `delivered_through` is only as good as that acknowledgement.

**A write the log rolled back** (``fsync = "always"``, the fsync failed after a complete
write, the writer cut the file back and wrote the next record where it stood): the reader may
have read and sent that line in between — it cannot know how far the writer's data is durable
without the writer's help — and a sent record cannot be taken back, so the collector may hold
a record the log does not (the log's ``audit.recovery`` record names its seq). Records that
are in the log are never skipped: every record read must chain from the one before it, the
file must not shrink below the reading position, and otherwise reading starts again after
the delivered record (see `RecordReader`).

**UDP** cannot know delivery at all: a record counts as delivered once the datagram is sent.
One datagram per record, cut at `UDP_MAX_BYTES` (2048, the size RFC 5426 §3.2 says every
receiver SHOULD accept) at a UTF-8 boundary: the structured data (``seq``, ``hash``) always
survives, a long record's JSON does not. Test networks only, as CONFIGURATION.md says.

**Message layout** (RFC 5424): ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID
[gatewayd@32473 seq="…" hash="…"] BOM JSON`` — TIMESTAMP is the record's ``ts``, HOSTNAME its
``node``, MSGID its ``event`` (header fields reduced to printable US-ASCII and cut to the RFC's
lengths, ``-`` if empty), the message the record's line exactly as stored (so the collector can
check the hash). PRI = facility * 8 + severity; the severity per event is data:

=====================  ============================================================
severity               events
=====================  ============================================================
3 err                  ``audit.recovery``
4 warning              ``auth.failure``, ``auth.locked``, ``access.deny``, ``tunnel.deny``
5 notice               ``admin.session_kill``, ``config.reload``, ``user.disable``,
                       ``user.enable``, ``cert.revoke``, ``mfa.enroll``, ``audit.retention``,
                       ``audit.read``
6 info                 every other event
=====================  ============================================================

and any record with ``status = "failure"`` is at least a warning (a rejected reload).

**Operational log** (the logger passed in): collector up (with the backlog and how long it
was down; a TCP/TLS collector counts as up once it acknowledged a record or the connection
lasted `UP_AFTER` seconds, so one that accepts and hangs up at once stays down) and down
(once per outage, with the reason and the backlog; a hang-up before any acknowledgement right
after the TLS handshake asks whether the collector requires a client certificate), a refused
TLS certificate, a lost or mismatched cursor, a file that changed under the reader. Never a
record's content. Metrics: ``gatewayd_audit_forward_backlog``
(records written to the audit log and not yet delivered; a seq lost by a failed write counts
until a later record is delivered) and ``gatewayd_audit_forward_connected``.

A forwarding failure never affects the gateway: the audit file is the record, this is a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import ssl
import struct
import termios
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Final, Literal

from gatewayd.audit import files
from gatewayd.audit.chain import is_hash, parse_line
from gatewayd.files import atomic_write
from gatewayd.tasks import cancel_and_wait, within

if TYPE_CHECKING:
    from gatewayd.audit.writer import OperationalLogger
    from gatewayd.config import AuditForwardSettings, Settings
    from gatewayd.metrics import Metrics

Protocol = Literal["udp", "tcp", "tls"]

# ----------------------------------------------------------------------------- the message

FACILITIES: Final = MappingProxyType({
    "auth": 4, "authpriv": 10, "daemon": 3, **{f"local{n}": 16 + n for n in range(8)},
})
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6
SEVERITY_BY_EVENT: Final[Mapping[str, int]] = MappingProxyType({
    "audit.recovery": ERR,
    "auth.failure": WARNING, "auth.locked": WARNING, "access.deny": WARNING,
    "tunnel.deny": WARNING,
    "admin.session_kill": NOTICE, "config.reload": NOTICE, "user.disable": NOTICE,
    "user.enable": NOTICE, "cert.revoke": NOTICE, "mfa.enroll": NOTICE, "audit.retention": NOTICE,
    "audit.read": NOTICE,
})
SD_ID: Final = "gatewayd@32473"  # 32473: the example enterprise number of RFC 5612
BOM: Final = b"\xef\xbb\xbf"
UDP_MAX_BYTES: Final = 2048
_HOSTNAME_MAX, _APP_NAME_MAX, _MSGID_MAX = 255, 48, 32


def severity_of(record: Mapping[str, Any]) -> int:
    severity = SEVERITY_BY_EVENT.get(str(record.get("event")), INFO)
    if record.get("status") == "failure":
        severity = min(severity, WARNING)
    return severity


def header_token(value: object, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII (others become ``_``), cut, or ``-``."""
    text = "".join(ch if "!" <= ch <= "~" else "_" for ch in str(value))[:limit]
    return text or "-"


def sd_param_value(value: object) -> str:
    """Escape a PARAM-VALUE: ``"``, ``\\`` and ``]`` get a backslash (RFC 5424 §6.3.3)."""
    return "".join("\\" + ch if ch in '"\\]' else ch for ch in str(value))


def syslog_timestamp(ts: object) -> str:
    """The record's ``ts`` as an RFC 5424 TIMESTAMP (at most 6 fraction digits), or ``-``."""
    try:
        moment = datetime.fromisoformat(str(ts))
    except ValueError:
        return "-"
    if moment.utcoffset() is None:
        return "-"
    return moment.isoformat(timespec="microseconds")


def format_message(record: Mapping[str, Any], line: bytes, *, facility: str,
                   app_name: str) -> bytes:
    """One RFC 5424 message for a stored record (``line``: its JSON as on disk)."""
    pri = FACILITIES[facility] * 8 + severity_of(record)
    sd = (f'[{SD_ID} seq="{sd_param_value(record.get("seq"))}" '
          f'hash="{sd_param_value(record.get("hash"))}"]')
    header = (f"<{pri}>1 {syslog_timestamp(record.get('ts'))} "
              f"{header_token(record.get('node', ''), _HOSTNAME_MAX)} "
              f"{header_token(app_name, _APP_NAME_MAX)} - "
              f"{header_token(record.get('event', ''), _MSGID_MAX)} {sd} ")
    return header.encode("ascii") + BOM + line


def octet_frame(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 / RFC 5425 §4.3 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d " % len(message) + message


def udp_datagram(message: bytes) -> bytes:
    """Cut to `UDP_MAX_BYTES`, never inside a UTF-8 character."""
    if len(message) <= UDP_MAX_BYTES:
        return message
    cut = UDP_MAX_BYTES
    while cut > 0 and message[cut] & 0xC0 == 0x80:  # a continuation byte: back to its start
        cut -= 1
    return message[:cut]


# ----------------------------------------------------------------------------- the cursor


@dataclass(frozen=True)
class Cursor:
    """The last record the collector has: its ``seq``, ``hash`` and (when known) ``prev``, the
    hash it chained from. ``prev`` finds where to resume when that record is not in the log
    (a write the log rolled back, see `RecordReader.locate`); it does not take part in
    comparisons."""

    seq: int
    hash: str
    prev: str | None = field(default=None, compare=False)


def read_cursor(path: Path) -> Cursor | None:
    """The saved cursor, or None (missing). Raises ValueError for a damaged file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not JSON") from exc
    seq = value.get("seq") if isinstance(value, dict) else None
    digest = value.get("hash") if isinstance(value, dict) else None
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 and is_hash(digest)):
        raise ValueError(f"{path}: no valid seq/hash")
    prev = value.get("prev")  # absent from cursors written before it was kept
    return Cursor(seq, str(digest), str(prev) if is_hash(prev) else None)


def write_cursor(path: Path, cursor: Cursor) -> None:
    """Atomically and durably (tmp, fsync, rename, fsync of the directory)."""
    value = {"seq": cursor.seq, "hash": cursor.hash}
    if cursor.prev is not None:
        value["prev"] = cursor.prev
    data = json.dumps(value).encode() + b"\n"
    atomic_write(path, data, mode=0o640, overwrite=True)


# ----------------------------------------------------------------------------- reading records


@dataclass(frozen=True)
class Position:
    """Where reading stands: in the file ``file_id`` (dev, inode) at ``offset``, just after
    the record ``last`` (None: before the first record of that file)."""

    file_id: tuple[int, int]
    offset: int
    last: Cursor | None


@dataclass(frozen=True)
class Entry:
    """One record read from disk, ready to send, and where reading stands after it."""

    seq: int
    hash: str
    prev: str
    message: bytes  # the RFC 5424 message (unframed)
    after: Position

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.seq, self.hash, self.prev)


@dataclass(frozen=True)
class Located:
    """Where `RecordReader.locate` put the reader, and why."""

    position: Position | None  # None: the log has no file yet
    problem: str | None = None  # the cursor could not be used (restarted at the oldest record)
    missing: int = 0  # records the collector can never get (retention removed them)
    notice: str | None = None  # the cursor was used, but not as it stood: what happened
    # What the collector has of this log, when that is not the cursor (`replaces_delivered`):
    # after a problem the record before the oldest one on disk (None if unknown), for a
    # cursor just past the log's end (its prev is the log's last record) that last record.
    delivered: Cursor | None = None
    replaces_delivered: bool = False


class ChainBreakError(Exception):
    """What the reader read no longer follows on from what it read before: the file was cut
    back (the writer rolled back a write whose fsync failed, or someone truncated it), or a
    position pointed into another file. Reading must start again from the delivered cursor
    (`RecordReader.locate`)."""


def chain_files(live: Path) -> list[Path]:
    """Every file of the log (rotated ones and the live one), in chain order."""
    paths = files.rotated_siblings(live)
    if live.is_file():
        paths.append(live)
    return files.order_by_chain(paths)


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return (stat.st_dev, stat.st_ino)


def _live_id(live: Path) -> tuple[int, int] | None:
    try:
        return _file_id(live.stat())
    except FileNotFoundError:
        return None


def _record_keys(line: bytes) -> dict[str, Any] | None:
    record = parse_line(line)
    if record is None:
        return None
    seq = record.get("seq")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq > 0):
        return None
    return record if is_hash(record.get("hash")) else None


_PROBE_LINES: Final = 64  # as many as `files.first_seq` looks at


def _first_record(path: Path) -> dict[str, Any] | None:
    """The first record among the first lines of ``path`` (as `files.first_seq` finds it)."""
    for line in files.iter_lines(path):
        if line.number > _PROBE_LINES:
            return None
        record = (_record_keys(line.data) if line.data is not None and line.terminated
                  else None)
        if record is not None:
            return record
    return None


def _cursor_before(record: Mapping[str, Any]) -> Cursor | None:
    """The record ``record`` chains from, as a cursor (None for the log's first record)."""
    prev, seq = record.get("prev"), record["seq"]
    prev_seq = record.get("prev_seq")  # an audit.continue header names it
    if not (isinstance(prev_seq, int) and not isinstance(prev_seq, bool) and prev_seq > 0):
        prev_seq = seq - 1
    return Cursor(prev_seq, str(prev)) if prev_seq > 0 and is_hash(prev) else None


@dataclass(frozen=True)
class _Seen:
    """A record met while looking for a cursor, and the offset just after its line."""

    seq: int
    hash: str
    offset: int


class RecordReader:
    """Streams records after a position, across rotation; blocking: call it from a thread.

    Only complete lines are consumed (a line being written is read on a later call); a file
    that is no longer the live one (rotated, or moved away) is read to its end before the
    next file of the chain (the one whose first record follows the last read) is opened.

    Every record read must chain from the one read before it (its ``prev`` is that record's
    ``hash``; a seq the writer lost leaves the chain intact), and the open file must not
    shrink below the position: otherwise `read_batch` raises `ChainBreakError`. That is how a
    write the writer rolled back is noticed (``fsync = "always"``: the line was written, the
    fsync failed, the file was cut back and the next record written where it stood). The
    reader may have read that line in between — nothing tells a reader how far the writer's
    data is durable, so it cannot wait for that without help from the writer — and a record
    already sent cannot be taken back: the collector may then hold a record the log does not
    (the log's ``audit.recovery`` record names its seq). Records that are in the log are not
    skipped: the caller locates the delivered cursor again and reads on from there.
    """

    def __init__(self, live: Path, *, facility: str, app_name: str) -> None:
        self._live = live
        self._facility = facility
        self._app_name = app_name
        self._stream: IO[bytes] | None = None
        self._file_id = (0, 0)
        self._offset = 0
        self._last: Cursor | None = None
        self._sealed = False  # the open file is no longer the live one
        self.skipped = 0  # lines that were not records (reported by the caller)
        self._skipped_at_last = 0  # `skipped` when the last record was read

    def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def tell(self) -> Position | None:
        return Position(self._file_id, self._offset, self._last) if self._stream else None

    # --- positioning

    def locate(self, cursor: Cursor | None) -> Located:
        """Put the reader just after ``cursor``, or where the module docstring says when the
        cursor cannot be used as it stands:

        * its record is not in the log, but the record it chained from is, directly before
          the next record of the log (a write rolled back after it was sent, or lost with the
          writer's last unsynced lines): just after that record (`Located.notice`);
        * it is past the log's end and its ``prev`` is the hash of the log's last record (the
          record right after the log's end was sent, then rolled back or lost by a power cut
          while the fsynced cursor survived): at the log's last record (`Located.notice`);
        * its record is gone (retention), does not match (another log's cursor), or it is
          past the log's end without that confirmation (several records lost, a foreign
          cursor, a cursor without ``prev``): at the oldest record (`Located.problem`). When
          the gone record is exactly the one before the oldest (by its hash), nothing is
          missing and it is no problem.

        A rotation while this looks can make the cursor look foreign: then it looks once more.
        """
        before = _live_id(self._live)
        try:
            located = self._locate_once(cursor)
        except FileNotFoundError:  # a file rotated away while listed: look once more
            located = None
        if located is None or (located.problem is not None and _live_id(self._live) != before):
            located = self._locate_once(cursor)
        return located

    def _locate_once(self, cursor: Cursor | None) -> Located:
        self.close()
        chain = chain_files(self._live)
        if not chain:
            self._last = cursor
            return Located(None)
        if cursor is None:
            return self._restart(chain, None)
        for index in reversed(range(len(chain))):
            first = files.first_seq(chain[index])
            if first is not None and first <= cursor.seq:
                return self._find_in(chain, index, cursor)
        oldest = _first_record(chain[0])
        if oldest is not None and oldest.get("prev") == cursor.hash:
            self._open(chain[0], 0, cursor)  # the cursor's record was the one before it
            return Located(self.tell())
        oldest_seq = oldest["seq"] if oldest is not None else cursor.seq + 1
        return self._restart(chain, f"the record after cursor seq {cursor.seq} is no longer "
                             "on disk", missing=max(0, oldest_seq - cursor.seq - 1))

    def _restart(self, chain: list[Path], problem: str | None, missing: int = 0) -> Located:
        self._open(chain[0], 0, None)
        oldest = _first_record(chain[0])
        return Located(self.tell(), problem, missing,
                       delivered=_cursor_before(oldest) if oldest is not None else None,
                       replaces_delivered=problem is not None)

    def _find_in(self, chain: list[Path], index: int, cursor: Cursor) -> Located:
        """Open ``chain[index]`` just after the record ``cursor`` (see `locate`)."""
        path = chain[index]
        mismatch = (f"cursor seq {cursor.seq} (hash {cursor.hash[:12]}…) does not match the "
                    "audit log")
        seen: _Seen | None = None  # the last record before the cursor's seq
        with path.open("rb") as stream:
            offset = 0
            for line in iter(lambda: stream.readline(files.MAX_LINE_BYTES + 1), b""):
                offset += len(line)
                if not line.endswith(b"\n"):
                    break
                record = _record_keys(line[:-1])
                if record is None:
                    continue
                if record["seq"] < cursor.seq:
                    seen = _Seen(record["seq"], record["hash"], offset)
                    continue
                if record["seq"] == cursor.seq and record["hash"] == cursor.hash:
                    self._open(path, offset, cursor)
                    return Located(self.tell())
                if (cursor.prev is not None and seen is not None and seen.hash == cursor.prev
                        and record.get("prev") == seen.hash):
                    self._open(path, seen.offset, Cursor(seen.seq, seen.hash))
                    return Located(self.tell(), notice=(
                        f"the collector has seq {cursor.seq}, which the audit log does not "
                        "(written, then lost: see the log's audit.recovery record); resuming "
                        f"after seq {seen.seq}, the record it followed"))
                return self._restart(chain, mismatch)
        if index != len(chain) - 1 or seen is None:
            return self._restart(chain, mismatch)
        if cursor.prev is not None and cursor.prev == seen.hash:
            # The cursor's record followed the log's last one and the log lost it.
            head = Cursor(seen.seq, seen.hash)
            self._open(path, seen.offset, head)
            return Located(self.tell(), notice=(
                f"the collector has seq {cursor.seq}, which follows the audit log's last "
                f"record (seq {seen.seq}) but is not in the log (a write rolled back, or lost "
                'by a power cut with fsync = "interval"); resuming at the end of the log'),
                delivered=head, replaces_delivered=True)
        # Past the log's end and not confirmed by its prev: several records lost, or a foreign
        # cursor (another node's or another log's state dir). Skipping to the end would be a gap.
        return self._restart(chain, (
            f"cursor seq {cursor.seq} is past the audit log's last record (seq {seen.seq}) "
            "and does not follow it"))

    def seek(self, position: Position) -> bool:
        """Back to an earlier position of this run; False if its file is gone (or a file that
        now has its inode does not begin before ``position.last``: not the same file)."""
        self.close()
        last = position.last
        if last is None:
            return False  # the start of a file: `locate` finds it by seq
        for path in chain_files(self._live):
            with contextlib.suppress(OSError):
                if _file_id(path.stat()) == position.file_id:
                    first = files.first_seq(path)
                    if first is None or first > last.seq:
                        return False  # inode reused by a newer file
                    self._open(path, position.offset, last)
                    return _file_id(os.fstat(self._fileno())) == position.file_id
        return False

    def _open(self, path: Path, offset: int, last: Cursor | None) -> None:
        self.close()
        stream = path.open("rb")
        stream.seek(offset)
        self._stream = stream
        self._file_id = _file_id(os.fstat(stream.fileno()))
        self._offset = offset
        self._last = last
        self._sealed = False
        self._skipped_at_last = self.skipped

    def _fileno(self) -> int:
        assert self._stream is not None
        return self._stream.fileno()

    # --- reading

    def read_batch(self, max_records: int, max_bytes: int) -> list[Entry]:
        """Up to ``max_records`` records (about ``max_bytes`` at most) after the position.
        Raises `ChainBreakError` (see the class docstring); the reader is then closed."""
        batch: list[Entry] = []
        size = 0
        try:
            while len(batch) < max_records and size < max_bytes:
                entry = self._next()
                if entry is None:
                    break
                batch.append(entry)
                size += len(entry.message)
        except ChainBreakError:
            self.skipped = self._skipped_at_last  # what followed the break was a fragment
            self.close()
            raise
        return batch

    def _next(self) -> Entry | None:
        while True:
            if self._stream is None and not self._open_next():
                return None
            assert self._stream is not None
            line = self._stream.readline(files.MAX_LINE_BYTES + 1)
            if not line.endswith(b"\n"):
                self._stream.seek(self._offset)  # an incomplete line: read it again later
                if len(line) > files.MAX_LINE_BYTES:
                    self._skip_long_line()
                    continue
                size = os.fstat(self._fileno()).st_size
                if size < self._offset:
                    raise ChainBreakError(f"the audit file shrank to {size} bytes, below the "
                                          f"reading position {self._offset}")
                if self._sealed:
                    self.close()  # complete: on to the next file of the chain
                    continue
                if self._check_sealed():
                    continue  # read once more before leaving it (see `_check_sealed`)
                return None
            self._offset += len(line)
            entry = self._entry(line[:-1])
            if entry is not None:
                return entry

    def _skip_long_line(self) -> None:
        """Not a line the writer produces: pass over it once it is complete."""
        assert self._stream is not None
        while chunk := self._stream.readline(files.MAX_LINE_BYTES):
            self._offset += len(chunk)
            if chunk.endswith(b"\n"):
                self.skipped += 1
                return
        self._stream.seek(self._offset)

    def _check_sealed(self) -> bool:
        """At the end of the open file: has it stopped being the live file? The writer renames
        a file only after its last write, so one more read after this turned True sees all
        of it; the file is left only at the end of that read."""
        try:
            self._sealed = _file_id(self._live.stat()) != self._file_id
        except FileNotFoundError:
            self._sealed = True
        return self._sealed

    def _entry(self, line: bytes) -> Entry | None:
        record = _record_keys(line)
        if record is None:
            self.skipped += 1
            return None
        last = self._last
        if last is not None and record["seq"] <= last.seq:
            return None  # already read (a file listed twice while it was being rotated)
        prev = record.get("prev")
        if last is not None and prev != last.hash:
            raise ChainBreakError(f"seq {record['seq']} does not chain from seq {last.seq} "
                                  "read before it")
        self._last = Cursor(record["seq"], record["hash"], prev if is_hash(prev) else None)
        self._skipped_at_last = self.skipped
        message = format_message(record, line, facility=self._facility, app_name=self._app_name)
        return Entry(record["seq"], record["hash"], str(prev), message,
                     Position(self._file_id, self._offset, self._last))

    def _open_next(self) -> bool:
        """Open the file whose first record follows the last one read; False if none yet."""
        after = self._last.seq if self._last is not None else 0
        for path in chain_files(self._live):
            first = files.first_seq(path)
            if first is None or first <= after:
                continue
            try:
                self._open(path, 0, self._last)
            except FileNotFoundError:
                return False  # rotated away between listing and opening: next poll
            return True
        return False


def head_seq(live: Path) -> int | None:
    """The seq of the last complete record of the live file (None if there is none)."""
    try:
        tail = files.read_tail(live)
    except FileNotFoundError:
        return None
    record = _record_keys(tail.last_line) if tail.last_line is not None else None
    return int(record["seq"]) if record is not None else None


# ----------------------------------------------------------------------------- the connection


class LinkError(Exception):
    """The connection to the collector failed or was closed by it."""


class LinkRefusedError(LinkError):
    """The collector could not be reached or did not pass the TLS checks."""


_TCP_USER_TIMEOUT_MS: Final = 30_000  # unacknowledged data this long = the collector is gone


def _ioctl_int(fd: int, request: int) -> int:
    result = fcntl.ioctl(fd, request, struct.pack("i", 0))
    return int(struct.unpack("i", result)[0])


class _StreamProtocol(asyncio.Protocol):
    """The plain TCP transport's protocol: hands every byte received to the link at once (so
    nothing from the collector waits unseen in a buffer) and runs write flow control."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self._link.received(data)

    def eof_received(self) -> bool:
        self._link.lost("the collector closed the connection")
        return True  # keep our side open until we close it

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.lost(f"connection lost: {exc}" if exc else "connection closed")
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class Link:
    """One TCP or TLS connection to the collector, with the bytes it acknowledged."""

    def __init__(self, context: ssl.SSLContext | None, server_name: str | None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = (context.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                      server_hostname=server_name) if context else None)
        self._protocol = _StreamProtocol(self)
        self._transport: asyncio.Transport | None = None
        self._sent = 0  # bytes handed to the transport since the connection was made
        self._acked = 0
        self._handshaking = context is not None
        self.closed: str | None = None  # why the link is unusable
        self.changed = asyncio.Event()  # data or closure arrived

    @classmethod
    async def open(cls, host: str, port: int, *, context: ssl.SSLContext | None,
                   server_name: str | None, seconds: float) -> Link:
        link = cls(context, server_name)
        try:
            await within(link._connect(host, port), seconds)
        except TimeoutError:
            link.abort()
            raise LinkRefusedError(f"no connection within {seconds:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            link.abort()
            raise LinkRefusedError(f"collector certificate refused: {exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            link.abort()
            raise LinkRefusedError(str(exc) or type(exc).__name__) from None
        except BaseException:  # cancelled while connecting (a stop): leave no socket behind
            link.abort()
            raise
        return link

    async def _connect(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: self._protocol, host, port)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        # Each on its own: one the platform (or uvloop's socket) refuses must not cost the other.
        with contextlib.suppress(OSError, AttributeError, NotImplementedError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _TCP_USER_TIMEOUT_MS)
        with contextlib.suppress(OSError, AttributeError, NotImplementedError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._tls is not None:
            await self._handshake(self._tls)

    async def _handshake(self, tls: ssl.SSLObject) -> None:
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_tls()
                if self.closed is not None:
                    raise OSError(f"during the TLS handshake: {self.closed}") from None
                self.changed.clear()
                await self.changed.wait()
                continue
            self._flush_tls()
            self._handshaking = False
            self._read_tls(tls)  # what came with the server's last flight (session tickets)
            return

    def _flush_tls(self) -> None:
        data = self._outgoing.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
            self._sent += len(data)

    # --- called by the protocol

    def received(self, data: bytes) -> None:
        if self._tls is not None:
            self._incoming.write(data)
            if not self._handshaking:
                self._read_tls(self._tls)
        # Plain TCP: a collector has nothing to say; the bytes are dropped.
        self.changed.set()

    def _read_tls(self, tls: ssl.SSLObject) -> None:
        """Process what TLS received: session tickets, key updates, close_notify."""
        try:
            while tls.read(16384):
                pass  # application data from a collector means nothing: dropped
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.lost("the collector closed the TLS session")
        except ssl.SSLError as exc:
            self.lost(f"TLS error: {exc}")
        self._flush_tls()  # e.g. a KeyUpdate reply: counted in the byte stream like the rest

    def lost(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        self.changed.set()

    # --- the sender's side

    def send(self, data: bytes) -> int:
        """Queue ``data``; returns the stream offset where its bytes end."""
        if self.closed is not None or self._transport is None:
            raise LinkError(self.closed or "not connected")
        if self._tls is not None:
            self._tls.write(data)
            self._flush_tls()
        else:
            self._transport.write(data)
            self._sent += len(data)
        return self._sent

    async def drain(self) -> None:
        await self._protocol.writable.wait()
        if self.closed is not None:
            raise LinkError(self.closed)

    def acknowledged(self) -> int:
        """Stream offset up to which the collector's kernel acknowledged every byte."""
        transport = self._transport
        if self.closed is not None or transport is None or transport.is_closing():
            return self._acked
        sock = transport.get_extra_info("socket")
        try:
            fd = sock.fileno()
            unread = _ioctl_int(fd, termios.FIONREAD)
            unacked = _ioctl_int(fd, termios.TIOCOUTQ)  # = SIOCOUTQ on Linux
        except (OSError, AttributeError):
            return self._acked
        if unread == 0:  # something unread could be the collector's goodbye: decide later
            pending = transport.get_write_buffer_size() + unacked
            self._acked = max(self._acked, self._sent - pending)
        return self._acked

    def close(self) -> None:
        """Our orderly goodbye: TLS close_notify, then the transport flushes and closes."""
        if self._tls is not None and self.closed is None and not self._handshaking:
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush_tls()
        self.lost("closed by us")
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.lost("aborted")
        if self._transport is not None:
            self._transport.abort()


# ----------------------------------------------------------------------------- the forwarder

WINDOW_RECORDS: Final = 512  # sent and not yet acknowledged, at most
BATCH_RECORDS: Final = 128
BATCH_BYTES: Final = 256 * 1024
POLL_INTERVAL: Final = 0.15  # seconds between looks at the live file when caught up
ACK_POLL_INTERVAL: Final = 0.02  # ... and at SIOCOUTQ while records wait for their ACK
PERSIST_INTERVAL: Final = 1.0
CONNECT_TIMEOUT: Final = 10.0
UP_AFTER: Final = 10.0  # seconds a connection must last to count as up without an ACK


def _closed_early(reason: str, *, tls: bool) -> str:
    """Why a connection ended before the collector acknowledged anything: a collector that
    accepts and then hangs up at once (a TLS 1.3 collector refusing us for want of a client
    certificate without an alert, a load balancer with no backend) says nothing more."""
    if reason not in ("the collector closed the connection", "the collector closed the TLS "
                      "session", "connection closed") and not reason.startswith("connection "
                                                                                 "lost"):
        return reason  # it names its cause (e.g. a TLS alert)
    if tls:
        return (f"{reason} right after the TLS handshake, before acknowledging any record — "
                "does it require a client certificate?")
    return f"{reason} before acknowledging any record"


@dataclass
class _InFlight:
    cursor: Cursor
    end: int  # stream offset where the record's bytes end
    after: Position


class AuditForwarder:
    """Sends every audit record to the collector; see the module docstring."""

    def __init__(
        self, *, log_path: Path, cursor_path: Path, protocol: Protocol, host: str, port: int,
        context: ssl.SSLContext | None = None, server_name: str | None = None,
        facility: str = "authpriv", app_name: str = "gatewayd",
        reconnect_interval: float = 5.0, poll_interval: float = POLL_INTERVAL,
        metrics: Metrics | None = None, logger: OperationalLogger,
    ) -> None:
        if protocol == "tls" and context is None:
            raise ValueError('protocol "tls" needs an SSL context')
        if facility not in FACILITIES:
            raise ValueError(f"unknown syslog facility {facility!r}")
        self._live = log_path
        self._cursor_path = cursor_path
        self._protocol: Protocol = protocol
        self._host, self._port = host, port
        self._context = context if protocol == "tls" else None
        self._server_name = server_name or host
        self._reconnect = reconnect_interval
        self._poll = poll_interval
        self._metrics = metrics
        self._log = logger
        self._reader = RecordReader(log_path, facility=facility, app_name=app_name)
        self._delivered: Cursor | None = None
        self._delivered_at: Position | None = None  # reader position after it (this run)
        self._persisted: Cursor | None = None
        self._persisted_when = 0.0
        self._head = 0
        self._in_flight: deque[_InFlight] = deque()
        self._link: Link | None = None
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._down_since: float | None = None
        self._up = False
        self._reported_skips = 0
        self._closing = False

    # --- public

    def delivered_through(self) -> int:
        """The highest seq the collector acknowledged (0: none yet). Retention may remove a
        file only once this has reached its last record."""
        return self._delivered.seq if self._delivered is not None else 0

    @property
    def backlog(self) -> int:
        return max(0, self._head - self.delivered_through())

    @property
    def connected(self) -> bool:
        return self._up

    def wake(self) -> None:
        """A record was written: look at the file now rather than at the next poll."""
        self._wakeup.set()

    async def start(self) -> None:
        try:
            self._delivered = await asyncio.to_thread(read_cursor, self._cursor_path)
        except (OSError, ValueError) as exc:
            self._log.warning("audit forwarding: cursor unreadable; resending every record on "
                              "disk", path=str(self._cursor_path), error=str(exc))
        self._persisted = self._delivered
        self._set_connected(False)
        self._tasks = [
            asyncio.create_task(self._run(), name="gatewayd.audit.forward"),
            asyncio.create_task(self._watch_head(), name="gatewayd.audit.forward.backlog"),
        ]

    async def close(self, grace: float) -> None:
        """Give the collector up to ``grace`` seconds for what is still on disk, then stop
        and save the cursor. Call after the audit log wrote its last record."""
        if not self._tasks:
            return
        try:
            await within(self._delivered_everything(), max(0.0, grace))
        except TimeoutError:
            self._log.warning("audit forwarding: stopping with records not delivered; they "
                              "are sent at the next start", backlog=self.backlog)
        self._closing = True
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)
        await self._persist(force=True)
        await asyncio.to_thread(self._reader.close)
        self._set_connected(False)

    # --- the sending loop

    async def _run(self) -> None:
        while True:
            try:
                await self._rewind()
                await self._deliver_until_down()
            except LinkError as exc:
                self._went_down(str(exc))
            except (OSError, ValueError) as exc:  # a file or socket surprise: retry later
                self._went_down(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # a bug must not end forwarding for good: log, retry
                self._log.error("audit forwarding failed unexpectedly; retrying",
                                error=type(exc).__name__, exc_info=True)
                self._went_down(type(exc).__name__)
            finally:
                self._drop_link()
            await asyncio.sleep(self._reconnect)

    async def _deliver_until_down(self) -> None:
        if self._protocol == "udp":
            await self._send_udp()
            return
        self._link = await Link.open(self._host, self._port, context=self._context,
                                     server_name=self._server_name, seconds=CONNECT_TIMEOUT)
        await self._pump(self._link)

    async def _pump(self, link: Link) -> None:
        """Send and confirm until the link fails. The collector counts as up (logged, gauge)
        only once it acknowledged a record or the connection lasted `UP_AFTER` seconds: one
        that accepts and hangs up at once is still down, and why is said once."""
        loop = asyncio.get_running_loop()
        opened = loop.time()
        while True:
            if link.closed is not None:
                raise LinkError(link.closed if self._up
                                else _closed_early(link.closed, tls=self._context is not None))
            confirmed = self._confirm(link.acknowledged())
            if not self._up and (confirmed or loop.time() - opened >= UP_AFTER):
                self._came_up()
            await self._persist()
            room = WINDOW_RECORDS - len(self._in_flight)
            try:
                batch = (await asyncio.to_thread(self._reader.read_batch,
                                                 min(room, BATCH_RECORDS), BATCH_BYTES)
                         if room > 0 else [])
            except ChainBreakError as exc:
                await self._relocate(exc)  # in flight: sent again (the collector dedups)
                continue
            self._report_skips()
            for entry in batch:
                end = link.send(octet_frame(entry.message))
                self._in_flight.append(_InFlight(entry.cursor, end, entry.after))
                self._head = max(self._head, entry.seq)
            if batch:
                await link.drain()
                continue
            await self._pause(ACK_POLL_INTERVAL if self._in_flight else self._poll, link)

    async def _send_udp(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(self._host, self._port))
        try:
            self._came_up()
            while True:
                try:
                    batch = await asyncio.to_thread(self._reader.read_batch, BATCH_RECORDS,
                                                    BATCH_BYTES)
                except ChainBreakError as exc:
                    await self._relocate(exc)
                    continue
                self._report_skips()
                for entry in batch:
                    transport.sendto(udp_datagram(entry.message))
                    # UDP cannot know more: handed to the kernel counts as delivered.
                    self._delivered, self._delivered_at = entry.cursor, entry.after
                    self._head = max(self._head, entry.seq)
                self._update_backlog()
                await self._persist()
                if not batch:
                    await self._pause(self._poll, None)
        finally:
            transport.close()

    async def _pause(self, seconds: float, link: Link | None) -> None:
        """Sleep until woken, until the link changes, or ``seconds``."""
        waits = [self._wakeup.wait()] + ([link.changed.wait()] if link is not None else [])
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
        self._wakeup.clear()
        if link is not None and link.closed is None:
            link.changed.clear()

    def _confirm(self, acknowledged: int) -> bool:
        """Everything whose bytes the collector acknowledged is delivered (True: something
        was)."""
        flight = self._in_flight
        confirmed = False
        while flight and flight[0].end <= acknowledged:
            done = flight.popleft()
            self._delivered, self._delivered_at = done.cursor, done.after
            confirmed = True
        self._update_backlog()
        return confirmed

    async def _rewind(self) -> None:
        """Back to just after the last delivered record: what was in flight is sent again."""
        self._in_flight.clear()
        located = await asyncio.to_thread(self._seek_delivered)
        if located is not None:
            self._report_located(located)
            if located.replaces_delivered:  # the cursor said more than the collector has
                self._delivered = located.delivered
            self._delivered_at = located.position
            self._update_backlog()

    async def _relocate(self, exc: ChainBreakError) -> None:
        """The file changed under the reader (`ChainBreakError`): find the delivered record
        again by seq and hash, and read on from there."""
        self._log.warning("audit forwarding: the audit file changed under the reader (a write "
                          "rolled back?); reading again after the last delivered record",
                          problem=str(exc), delivered_seq=self.delivered_through())
        self._delivered_at = None  # a position taken before the change may be wrong now
        await self._rewind()

    def _seek_delivered(self) -> Located | None:
        position = self._delivered_at
        if position is not None and self._reader.seek(position):
            return None
        return self._reader.locate(self._delivered)

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()  # orderly: a collector reading on until our FIN loses nothing
        self._set_connected(False)

    # --- the cursor, the backlog, the log

    async def _persist(self, *, force: bool = False) -> None:
        cursor = self._delivered
        if cursor is None or cursor == self._persisted:
            return
        now = time.monotonic()
        if not force and now - self._persisted_when < PERSIST_INTERVAL:
            return
        self._persisted_when = now
        try:
            await asyncio.to_thread(write_cursor, self._cursor_path, cursor)
        except OSError as exc:
            self._log.warning("audit forwarding: cursor not saved", path=str(self._cursor_path),
                              error=str(exc))
            return
        self._persisted = cursor

    async def _watch_head(self) -> None:
        """Keep the backlog gauge true while nothing is sent (the collector is down)."""
        while True:
            try:
                head = await asyncio.to_thread(head_seq, self._live)
            except OSError:
                head = None
            if head is not None:
                self._head = max(self._head, head)
            self._update_backlog()
            await asyncio.sleep(self._poll)

    async def _delivered_everything(self) -> None:
        while True:
            head = await asyncio.to_thread(head_seq, self._live)
            if head is not None:
                self._head = max(self._head, head)
            self._update_backlog()
            link = self._link
            linked = link is not None and link.closed is None
            if self.backlog == 0 or not (linked or self.connected):
                return  # nothing left, or nobody to give it to (next start sends it)
            self.wake()
            await asyncio.sleep(ACK_POLL_INTERVAL)

    def _update_backlog(self) -> None:
        if self._metrics is not None:
            self._metrics.audit_forward_backlog.set(self.backlog)

    def _set_connected(self, up: bool) -> None:
        self._up = up
        if self._metrics is not None:
            self._metrics.audit_forward_connected.set(1 if up else 0)

    def _came_up(self) -> None:
        self._set_connected(True)
        down_for = (None if self._down_since is None
                    else round(time.monotonic() - self._down_since, 1))
        self._down_since = None
        self._log.info("audit forwarding: collector connected", protocol=self._protocol,
                       collector=f"{self._host}:{self._port}", backlog=self.backlog,
                       down_seconds=down_for)

    def _went_down(self, reason: str) -> None:
        self._set_connected(False)
        if self._closing:
            return
        if self._down_since is not None:
            return  # said once per outage
        self._down_since = time.monotonic()
        self._log.warning("audit forwarding: collector unreachable; records wait in the audit "
                          "files", collector=f"{self._host}:{self._port}", reason=reason,
                          backlog=self.backlog, retry_seconds=self._reconnect)

    def _report_located(self, located: Located) -> None:
        if located.problem is not None:
            self._log.warning("audit forwarding: starting again from the oldest record on disk",
                              problem=located.problem, missing_records=located.missing)
        if located.notice is not None:
            self._log.warning("audit forwarding: the cursor does not match the audit log "
                              "exactly", notice=located.notice)

    def _report_skips(self) -> None:
        skipped = self._reader.skipped
        if skipped > self._reported_skips:
            self._log.warning("audit forwarding: lines that are not audit records were skipped",
                              path=str(self._live), skipped=skipped - self._reported_skips)
            self._reported_skips = skipped


# ----------------------------------------------------------------------------- from the config

CURSOR_NAME: Final = "audit-forward.cursor"


class ForwardConfigError(ValueError):
    """``[audit.forward]`` names a file that cannot be used (a CA, a certificate, a key)."""


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` (already validated by the config) into its parts."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def client_context(forward: AuditForwardSettings) -> ssl.SSLContext:
    """TLS 1.2+ towards the collector: its certificate must chain to ``ca_file`` — only to it,
    the system's CA store is not loaded — and name ``server_name`` (or the host); our own
    certificate if the collector wants one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no default CAs, unlike
    context.check_hostname = True  # create_default_context (both already the defaults here,
    context.verify_mode = ssl.CERT_REQUIRED  # said so nobody has to look it up)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=forward.ca_file)
        if forward.cert_file is not None:
            context.load_cert_chain(forward.cert_file, forward.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ForwardConfigError(f"audit.forward: TLS files unusable: {exc}") from None
    return context


def forwarder_from_settings(settings: Settings, *, metrics: Metrics | None,
                            logger: OperationalLogger) -> AuditForwarder:
    """The forwarder ``[audit.forward]`` describes (raises ForwardConfigError)."""
    forward = settings.audit.forward
    host, port = split_host_port(forward.address)
    return AuditForwarder(
        log_path=settings.audit.path, cursor_path=settings.gateway.state_dir / CURSOR_NAME,
        protocol=forward.protocol, host=host, port=port,
        context=client_context(forward) if forward.protocol == "tls" else None,
        server_name=forward.server_name or host, facility=forward.facility,
        app_name=forward.app_name,
        reconnect_interval=forward.reconnect_interval.total_seconds(),
        metrics=metrics, logger=logger,
    )
