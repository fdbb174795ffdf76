"""The hash chain: canonical form of a record, its hash, and checking one stored line.

Owns the byte-level definition every reader and writer of the log must agree on:

* **Canonical form** of a record: JSON with keys sorted, no whitespace (``","`` and ``":"``
  separators), non-ASCII characters written as UTF-8 (``ensure_ascii=False``), no NaN or
  infinity, encoded as UTF-8. Values are only text and integers (see `events`), which have a
  single JSON spelling, so any implementation can reproduce it.
* **hash** = lower-case hex SHA-256 of the canonical form of the record *without* its
  ``hash`` key. That form includes ``prev``, so each hash covers the previous hash.
* **prev** = the ``hash`` of the previous record written; the first record of a brand-new
  log has ``prev`` = 64 zeros (`GENESIS_PREV`).
* A stored line is exactly the canonical form of the full record (hash included) followed by
  ``"\\n"``. A reader therefore also checks that the line *is* canonical: a change that parses
  to the same value (added whitespace, ``\\u0061`` for ``a``, duplicate keys) is still a
  change to the evidence.
* A record is a flat JSON object: every value is text or an integer (the only kinds `events`
  produces) and ``ts`` is an ISO 8601 time with a UTC offset. Anything else — nested arrays or
  objects, floats, ``true``/``null`` — is not a record this log wrote.

Reading is defensive because a log file is untrusted input: a hostile line (a lone surrogate
such as ``"\\ud800"`` that cannot be encoded back to UTF-8, JSON nested 100,000 levels deep
that exhausts the parser's recursion limit) is reported as a `LineDefect`, never raised, so
that ``verify``, ``query`` and start-up give a verdict instead of a traceback.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

GENESIS_PREV: Final = "0" * 64

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def canonical_json(record: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``record`` (raises on values JSON cannot spell canonically)."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 hex over the canonical form of ``record`` minus its ``hash`` key."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def is_hash(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


class LineDefect(enum.Enum):
    """Why a stored line is not a trustworthy record."""

    MALFORMED = "malformed"  # not a record at all: bad UTF-8/JSON, missing keys, torn
    EDITED = "edited"  # a well-formed record whose bytes no longer match its hash


@dataclass(frozen=True)
class LineCheck:
    """Result of checking one line on its own (chain links are checked by the verifier)."""

    record: dict[str, Any] | None  # the parsed record when it is well-formed
    defect: LineDefect | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.defect is None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_scalar(value: object) -> bool:
    """Text or an integer: the only values a record holds (bool is an int, but never written)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _is_timestamp(value: object) -> bool:
    """An ISO 8601 time with an offset, as the writer spells ``ts``.

    Checked here so that readers which turn ``ts`` into a datetime (start-up computes the day
    of the head record for daily rotation) never meet a value they cannot parse.
    """
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).utcoffset() is not None
    except ValueError:
        return False


def _shape_problem(record: dict[str, Any]) -> str | None:
    """Name the first required key that is missing or of the wrong type, if any."""
    checks: tuple[tuple[str, bool], ...] = (
        ("ts", _is_timestamp(record.get("ts"))),
        ("seq", _is_count(record.get("seq")) and record.get("seq") != 0),
        ("event", isinstance(record.get("event"), str)),
        ("node", isinstance(record.get("node"), str)),
        ("prev", is_hash(record.get("prev"))),
        ("hash", is_hash(record.get("hash"))),
    )
    for key, good in checks:
        if not good:
            return f"missing or invalid {key!r}"
    return None


def _load_object(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse a line into a flat JSON object of text/integer values, or explain why not.

    Catches RecursionError on purpose: the JSON parser recurses once per nesting level, so a
    line of ``[[[[…`` exhausts the interpreter's recursion limit, and that must read as "not a
    record", not crash the reader. Nested values are refused for the same reason further on:
    re-encoding them (canonical form, query output) would recurse again.
    """
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    for key, item in value.items():
        if not _is_scalar(item):
            return None, f"value of {_printable(key)!r} is not text or an integer"
    return value, ""


def _printable(text: str) -> str:
    """``text`` with anything that cannot be shown or UTF-8 encoded (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse_line(line: bytes) -> dict[str, Any] | None:
    """Best-effort parse of a line into a flat JSON object (no integrity checks); None if not.

    Used where records are only looked at (query, ordering files), so nothing is required of
    the keys; values must still be text or integers, which keeps hostile nesting out of every
    reader.
    """
    return _load_object(line)[0]


def _decode(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse a line into a JSON object with the required keys, or explain why not."""
    record, problem = _load_object(line)
    if record is None:
        return None, problem
    shape = _shape_problem(record)
    return (None, shape) if shape is not None else (record, "")


def check_line(line: bytes) -> LineCheck:
    """Check one stored line (without its newline): well-formed, canonical, hash matches."""
    record, problem = _decode(line)
    if record is None:
        return LineCheck(None, LineDefect.MALFORMED, problem)
    try:
        canonical = canonical_json(record).encode("utf-8")
    except UnicodeEncodeError:
        # A JSON escape of a lone surrogate ("\\ud800") parses, but no UTF-8 text can hold
        # it: the writer escapes such characters as text, so this line is not one it wrote.
        return LineCheck(None, LineDefect.MALFORMED,
                         "not canonical JSON (a lone surrogate cannot be encoded as UTF-8)")
    if canonical != line:
        return LineCheck(record, LineDefect.EDITED, "bytes differ from the canonical form")
    if record_hash(record) != record["hash"]:
        return LineCheck(record, LineDefect.EDITED, "hash does not match the record's content")
    return LineCheck(record)
