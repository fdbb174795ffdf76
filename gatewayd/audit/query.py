"""Searching audit files for security staff: filters, streaming, and the table layout.

Owns `RecordFilter` (shared by the CLI, the export and the console's `index.AuditIndex`), the
result vocabulary (`record_result`), `query_records`/`query_files` (a streaming filter over
records; files are read line by line in chain order, never whole) and the aligned table the
CLI prints. Query does not check integrity —
run `verify_files` (``gatewayd audit verify``) for that; lines that are not records are skipped
and reported through ``on_malformed``.

Filter semantics (`RecordFilter`; every given filter must match):

* ``user``, ``device``, ``session``, ``source_ip`` match exactly, compared in the stored,
  escaped form (so ``TOKYO\\alice`` or a name with control characters can be searched as
  typed); ``service`` matches exactly.
* ``event`` matches exactly, or as a shell-style pattern when it contains ``*``, ``?`` or ``[``
  (``access.*``).
* ``since`` is inclusive and ``until`` exclusive, both timezone-aware; a record without a
  readable ``ts`` never matches a time window.
* ``result`` is ``success`` or ``failure`` as decided by `record_result` (below).
* ``text`` is a case-insensitive (Unicode casefold) substring of any value of the record as
  the console and the CLI display it (`display_text`; integers in decimal), keys excluded.

**Result vocabulary** (`record_result`, the rule is the same for query, export and the
console). A record is a ``failure`` when any of these hold:

* its event is a refusal: ``auth.failure``, ``auth.locked``, ``access.deny``, ``tunnel.deny``;
* its ``status`` is an integer >= 400 (an HTTP error, e.g. ``access.end`` with 502);
* its ``status`` is an outcome word meaning it did not happen: ``failure``, ``failed``,
  ``error``, ``denied``, ``no_match`` (``config.reload`` that failed, an admin session kill
  that matched nothing);
* it carries an ``error`` field (a transfer or tunnel that ended with an error).

It is *neither* (matches no ``result`` filter) when its event is ``access.step_up`` — a
challenge, not an outcome: the step-up's own ``auth.success``/``auth.failure`` says how it
went — or one of the log's own records (``audit.start``, ``audit.continue``,
``audit.checkpoint``, ``audit.recovery``), which describe the log rather than an action.
Every other record is a ``success``.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from gatewayd.audit import files
from gatewayd.audit.chain import parse_line
from gatewayd.audit.events import (
    INTERNAL_EVENTS,
    EventName,
    display_text,
    escape_text,
    needs_escape,
)

MalformedCallback = Callable[[Path, int], None]

RESULTS: Final = ("success", "failure")
FAILURE_EVENTS: Final = frozenset({
    EventName.AUTH_FAILURE.value, EventName.AUTH_LOCKED.value, EventName.ACCESS_DENY.value,
    EventName.TUNNEL_DENY.value,
})
FAILURE_STATUS_WORDS: Final = frozenset({"failure", "failed", "error", "denied", "no_match"})
NEITHER_EVENTS: Final = frozenset({EventName.ACCESS_STEP_UP.value, *INTERNAL_EVENTS})


def record_result(record: Mapping[str, Any]) -> str | None:
    """``"failure"``, ``"success"`` or None (neither) — the rule in the module docstring."""
    event = record.get("event")
    if event in NEITHER_EVENTS:
        return None
    status = record.get("status")
    if (
        event in FAILURE_EVENTS
        or (isinstance(status, int) and not isinstance(status, bool) and status >= 400)
        or (isinstance(status, str) and status.lower() in FAILURE_STATUS_WORDS)
        or record.get("error") not in (None, "")
    ):
        return "failure"
    return "success"


def displayed_value(value: object) -> str:
    """A record value as the CLI table and the console show it (controls escaped)."""
    return display_text(value if isinstance(value, str) else str(value))


@dataclass(frozen=True)
class RecordFilter:
    user: str | None = None
    event: str | None = None
    service: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    device: str | None = None
    session: str | None = None
    source_ip: str | None = None
    result: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        for name, moment in (("since", self.since), ("until", self.until)):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware")
        if self.result is not None and self.result not in RESULTS:
            raise ValueError(f"result must be one of {', '.join(RESULTS)}, not {self.result!r}")

    def matches(self, record: Mapping[str, Any]) -> bool:
        for key in ("user", "device", "session", "source_ip"):
            wanted: str | None = getattr(self, key)
            if wanted is not None and record.get(key) != escape_text(wanted):
                return False
        if self.service is not None and record.get("service") != self.service:
            return False
        if self.event is not None and not _event_matches(self.event, record.get("event")):
            return False
        if self.result is not None and record_result(record) != self.result:
            return False
        if self.text and not _contains_text(record, self.text.casefold()):
            return False
        return self._in_time_window(record)

    @property
    def has_time_window(self) -> bool:
        return self.since is not None or self.until is not None

    def _in_time_window(self, record: Mapping[str, Any]) -> bool:
        if self.since is None and self.until is None:
            return True
        moment = record_time(record)
        if moment is None:
            return False  # a record without a readable time cannot be placed in a window
        if self.since is not None and moment < self.since:
            return False
        return self.until is None or moment < self.until


def _contains_text(record: Mapping[str, Any], folded: str) -> bool:
    return any(folded in displayed_value(value).casefold() for value in record.values())


def _event_matches(pattern: str, event: object) -> bool:
    if not isinstance(event, str):
        return False
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(event, pattern)
    return event == pattern


def record_time(record: Mapping[str, Any]) -> datetime | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return moment if moment.utcoffset() is not None else None


def query_files(
    paths: Sequence[Path],
    *,
    user: str | None = None,
    event: str | None = None,
    service: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    device: str | None = None,
    session: str | None = None,
    source_ip: str | None = None,
    result: str | None = None,
    text: str | None = None,
    on_malformed: MalformedCallback | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the records of ``paths`` (in chain order) that match every given filter."""
    wanted = RecordFilter(user=user, event=event, service=service, since=since, until=until,
                          device=device, session=session, source_ip=source_ip, result=result,
                          text=text)
    return query_records(paths, wanted, on_malformed=on_malformed)


def query_records(
    paths: Sequence[Path], wanted: RecordFilter, *, on_malformed: MalformedCallback | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the records of ``paths`` (in chain order) that ``wanted`` matches (streaming)."""
    for path in files.order_by_chain(paths):
        for line in files.iter_lines(path):
            record = parse_line(line.data) if line.data is not None and line.terminated else None
            if record is None:
                if on_malformed is not None:
                    on_malformed(path, line.number)
                continue
            if wanted.matches(record):
                yield record


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code > 0xFFFF:  # JSON spells astral characters as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def json_line(value: Mapping[str, Any], *, compact: bool = False) -> str:
    """One-line JSON for a terminal or a pipe: readable UTF-8, but every character that
    `events.escape_text` would escape (they can only occur inside JSON strings) is written as
    a \\u escape, so a tampered file cannot drive the terminal through our output.
    ``compact`` drops the blanks after ``,`` and ``:``."""
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=separators)
    if text.isprintable():
        return text
    return "".join(_json_escape(ch) if needs_escape(ch) else ch for ch in text)


# ---------------------------------------------------------------------- table layout

_COLUMNS: Final = (("TIME", 25), ("SEQ", 8), ("EVENT", 18), ("USER", 14), ("SOURCE", 15),
                   ("SERVICE", 10), ("TARGET", 32), ("DETAIL", 0))
_SHOWN_IN_COLUMNS: Final = frozenset(
    {"ts", "seq", "event", "user", "source_ip", "service", "method", "path", "dest"}
)
# Never useful on screen (and long); --json shows them.
_HIDDEN: Final = frozenset({"prev", "hash", "node", "sig", "covers_hash", "discarded_sha256"})
_DETAIL_ORDER: Final = (
    "rule", "reason", "status", "error", "operator", "session", "device", "frontend",
    "serial", "bytes_up", "bytes_down", "duration_ms", "covers_seq", "key_id", "lost_from",
    "lost_to", "prev_seq", "quarantine", "discarded_bytes",
)


def _time_cell(record: Mapping[str, Any]) -> str:
    moment = record_time(record)
    if moment is None:
        return str(record.get("ts", "?"))
    return moment.isoformat(sep=" ", timespec="seconds")


def _target_cell(record: Mapping[str, Any]) -> str:
    method, path, dest = record.get("method"), record.get("path"), record.get("dest")
    if method is not None or path is not None:
        return " ".join(str(v) for v in (method, path) if v is not None)
    return str(dest) if dest is not None else ""


def _detail_value(key: str, value: object) -> str:
    if key == "key_id" and isinstance(value, str):
        value = value[:16] + "…"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if any(ch.isspace() or ch in '="' for ch in text) or text == "":
        text = json.dumps(text, ensure_ascii=False)
    return f"{key}={text}"


def _detail_cell(record: Mapping[str, Any]) -> str:
    rest = [k for k in record if k not in _SHOWN_IN_COLUMNS and k not in _HIDDEN]
    ordered = [k for k in _DETAIL_ORDER if k in rest] + sorted(
        k for k in rest if k not in _DETAIL_ORDER
    )
    return " ".join(_detail_value(k, record[k]) for k in ordered)


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _layout(cells: Sequence[str]) -> str:
    parts: list[str] = []
    for (title, width), cell in zip(_COLUMNS, cells, strict=True):
        text = display_text(cell)  # the file is untrusted: no raw controls to the terminal
        parts.append(text.rjust(width) if title == "SEQ" else text.ljust(width))
    # Values are never cut (evidence); a longer value just shifts the rest of its row.
    return " ".join(parts).rstrip()


def table_header() -> str:
    return _layout([title for title, _ in _COLUMNS])


def table_row(record: Mapping[str, Any]) -> str:
    return _layout([
        _time_cell(record),
        _cell(record.get("seq")),
        _cell(record.get("event")),
        _cell(record.get("user")),
        _cell(record.get("source_ip")),
        _cell(record.get("service")),
        _cell(_target_cell(record)),
        _detail_cell(record),
    ])
