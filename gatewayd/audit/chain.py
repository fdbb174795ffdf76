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
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
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


def _shape_problem(record: dict[str, Any]) -> str | None:
    """Name the first required key that is missing or of the wrong type, if any."""
    checks: tuple[tuple[str, bool], ...] = (
        ("ts", isinstance(record.get("ts"), str)),
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


def parse_line(line: bytes) -> dict[str, Any] | None:
    """Best-effort parse of a line into a JSON object (no integrity checks); None if not one."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _decode(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """Parse a line into a JSON object with the required keys, or explain why not."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason})"
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    shape = _shape_problem(record)
    return (None, shape) if shape is not None else (record, "")


def check_line(line: bytes) -> LineCheck:
    """Check one stored line (without its newline): well-formed, canonical, hash matches."""
    record, problem = _decode(line)
    if record is None:
        return LineCheck(None, LineDefect.MALFORMED, problem)
    try:
        canonical = canonical_json(record)
    except ValueError as exc:  # NaN/Infinity: not something the writer can produce
        return LineCheck(None, LineDefect.MALFORMED, f"not canonical JSON ({exc})")
    if canonical.encode("utf-8") != line:
        return LineCheck(record, LineDefect.EDITED, "bytes differ from the canonical form")
    if record_hash(record) != record["hash"]:
        return LineCheck(record, LineDefect.EDITED, "hash does not match the record's content")
    return LineCheck(record)
