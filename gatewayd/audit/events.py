"""Audit event vocabulary: event names, the field schema, and how field values are made safe.

Owns the single table of event names (`EventName`, exported as `EVENT_NAMES`), the table of
field names with their value kinds (`CONTEXT_FIELDS` for callers, `INTERNAL_FIELDS` for the
records the audit log writes about itself), the refusal of secret-looking field names, and the
escaping/bounding of text values so that one record is always exactly one printable line.

The internal events include the **file headers**: every audit file begins with one, so that a
file whose first lines were deleted is detectable (see `verify`). A brand-new log begins with
``audit.start``; any later file (rotation, a live file moved or deleted while open, a restart
that found no live file) begins with ``audit.continue``, whose ``prev`` is the hash and
``prev_seq`` the seq of the previous file's last record.

Escaping rule (documented because readers of the log depend on it): every character whose
Unicode category is Cc (C0/C1 controls, DEL), Cf (format: bidi overrides, zero-width chars),
Cs (lone surrogates), Zl or Zp (U+2028/U+2029) is written as ``\\xNN``, ``\\uNNNN`` or
``\\UNNNNNNNN`` (lower-case hex). A literal backslash is doubled only when it would otherwise
be read as the start of such an escape (followed by ``x``, ``u``, ``U`` or another backslash),
so ordinary values such as ``TOKYO\\alice`` stay readable and `unescape_text` inverts the rule
exactly. Text longer than `MAX_TEXT_CHARS` (after escaping) is cut at an escape boundary and
ends with the marker ``…[+N chars]`` (N = characters of the original value left out).
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
import unicodedata
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final


class EventName(enum.StrEnum):
    """Every audit event name; adding an event means adding one line here."""

    AUTH_SUCCESS = "auth.success"
    AUTH_FAILURE = "auth.failure"
    AUTH_LOCKED = "auth.locked"
    SESSION_START = "session.start"
    SESSION_END = "session.end"
    ACCESS_ALLOW = "access.allow"
    ACCESS_DENY = "access.deny"
    ACCESS_STEP_UP = "access.step_up"
    ACCESS_END = "access.end"  # how an audited request's transfer ended (after access.allow)
    TUNNEL_OPEN = "tunnel.open"
    TUNNEL_CLOSE = "tunnel.close"
    TUNNEL_DENY = "tunnel.deny"
    ADMIN_SESSION_KILL = "admin.session_kill"
    CONFIG_RELOAD = "config.reload"
    MFA_ENROLL = "mfa.enroll"
    CERT_ISSUE = "cert.issue"
    CERT_REVOKE = "cert.revoke"
    USER_DISABLE = "user.disable"  # `gatewayd users disable`: the account emergency stop
    USER_ENABLE = "user.enable"  # `gatewayd users enable`: the gateway's block lifted
    SSH_CERT_ISSUE = "ssh_cert.issue"  # the portal issued an SSH user certificate
    AUDIT_READ = "audit.read"
    AUDIT_RETENTION = "audit.retention"
    # Written only by the AuditLog itself (see INTERNAL_EVENTS).
    AUDIT_CHECKPOINT = "audit.checkpoint"
    AUDIT_START = "audit.start"  # a run began; the first record of a new log is one
    AUDIT_CONTINUE = "audit.continue"  # first record of a file that continues the chain
    AUDIT_RECOVERY = "audit.recovery"


EVENT_NAMES: Final[frozenset[str]] = frozenset(e.value for e in EventName)

# Callers may not forge these: a checkpoint carries a signature only the log can make, and the
# start, continue and recovery records describe the log itself.
INTERNAL_EVENTS: Final[frozenset[str]] = frozenset(
    {EventName.AUDIT_CHECKPOINT.value, EventName.AUDIT_START.value,
     EventName.AUDIT_CONTINUE.value, EventName.AUDIT_RECOVERY.value}
)


class FieldKind(enum.Enum):
    TEXT = "text"
    COUNT = "count"  # a non-negative integer
    TEXT_OR_COUNT = "text_or_count"  # an integer stays an integer, anything else is text


# Keys every record has; the AuditLog sets them, callers cannot.
RECORD_KEYS: Final[tuple[str, ...]] = ("ts", "seq", "event", "node", "prev", "hash")

_T, _N, _TN = FieldKind.TEXT, FieldKind.COUNT, FieldKind.TEXT_OR_COUNT

CONTEXT_FIELDS: Final[Mapping[str, FieldKind]] = MappingProxyType(
    {
        "user": _T,  # the account concerned (for admin actions: the target user)
        "operator": _T,  # who performed an admin action
        "source_ip": _T,
        "device": _T,  # device id / certificate serial of the client device
        "session": _T,  # the registry's session id, never the cookie value
        "frontend": _T,  # https | ssh | admin
        "service": _T,
        "method": _T,
        "path": _T,
        "dest": _T,  # host:port of a tunnel
        "rule": _T,  # id of the policy rule that decided
        "reason": _T,
        "error": _T,
        "serial": _T,  # certificate serial (cert.issue / cert.revoke / ssh_cert.issue)
        "fingerprint": _T,  # ssh_cert.issue: SHA256 fingerprint of the certified key
        "valid_before": _T,  # ssh_cert.issue: end of validity, RFC 3339
        "status": _TN,  # HTTP status code (integer), or an outcome word such as "failure"
        "bytes_up": _N,
        "bytes_down": _N,
        "duration_ms": _N,
        # audit.retention: a rotated file removed after its retention period (see `retention`).
        "file": _T,  # the removed file's name
        "first_seq": _N,  # expired: the removed file's first seq; carried: start of the range
        "last_seq": _N,  # seq of its last record (its final, signed checkpoint)
        "last_hash": _T,  # hash of that record: the next file's header chains to it
        "last_ts": _T,  # ts of that record: what the file's age was measured from
        "records": _N,  # records the file held
        "retention": _T,  # the retention in force, as configured ("365d")
        # admin.session_kill made in the audit console: "console" (the admin socket: absent).
        "via": _T,
        # audit.read (the audit console): what was read, with which filter; `records` returned.
        "view": _T,  # search | record | export | report
        "record_seq": _N,  # view=record: the seq opened
        "before_seq": _N,  # search paging: records older than this seq
        "format": _T,  # view=export: csv | jsonl
        "month": _T,  # view=report: YYYY-MM
        "filter_user": _T,
        "filter_device": _T,
        "filter_event": _T,
        "filter_service": _T,
        "filter_result": _T,  # success | failure
        "filter_session": _T,
        "filter_source_ip": _T,
        "filter_text": _T,
        "filter_since": _T,  # RFC 3339, inclusive
        "filter_until": _T,  # RFC 3339, exclusive
    }
)

INTERNAL_FIELDS: Final[Mapping[str, FieldKind]] = MappingProxyType(
    {
        **CONTEXT_FIELDS,
        "covers_seq": _N,  # checkpoint: seq of the last record it signs
        "covers_hash": _T,  # checkpoint: hash of that record
        "key_id": _T,  # checkpoint, start: SHA-256 fingerprint of the signing public key
        "sig": _T,  # checkpoint: base64 Ed25519 signature
        "lost_from": _N,  # recovery: first seq that was allocated but never written
        "lost_to": _N,  # recovery: last such seq
        "discarded_bytes": _N,  # recovery: size of a torn final line moved aside at start
        "discarded_sha256": _T,
        "quarantine": _T,  # recovery: file name the torn bytes were moved to
        "prev_seq": _N,  # continue: seq of the previous file's last record (its hash = prev)
    }
)

# Field names that smell of credentials. Unknown names are rejected anyway; this pattern gives
# the caller a precise error and guards the schema itself (a test checks no context field
# matches it).
SECRET_FIELD_PATTERN: Final = re.compile(
    r"pass|pwd|secret|token|cookie|otp|code|key|credential|private|pin$|authorization|bearer",
    re.IGNORECASE,
)

MAX_TEXT_CHARS: Final = 1024
MAX_COUNT: Final = 2**63 - 1

_ESCAPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_ESCAPE_STARTERS: Final = frozenset("xuU\\")
_UNESCAPE_PATTERN: Final = re.compile(
    r"\\(?:\\|x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8}))"
)


class UnknownEventError(ValueError):
    """An event name outside `EVENT_NAMES` (a programming error)."""


class FieldError(ValueError):
    """A field name outside the schema, or one the caller may not set."""


class SecretFieldError(FieldError):
    """A field name that looks like a credential: such values must never reach the log."""


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def needs_escape(ch: str) -> bool:
    """Whether `escape_text` writes ``ch`` as an escape (controls, format chars, separators)."""
    return unicodedata.category(ch) in _ESCAPED_CATEGORIES


def _escaped_pieces(text: str) -> list[str]:
    """One output piece per input character, following the module's escaping rule."""
    pieces = [_escape_char(ch) if needs_escape(ch) else ch for ch in text]
    # Right to left, so a backslash sees the final form of what follows it.
    for i in range(len(pieces) - 2, -1, -1):
        if pieces[i] == "\\" and pieces[i + 1][0] in _ESCAPE_STARTERS:
            pieces[i] = "\\\\"
    return pieces


def escape_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Escape control/format characters and bound the length (see the module docstring)."""
    if "\\" not in text and text.isprintable() and len(text) <= limit:
        return text  # fast path: the common, harmless value
    pieces = _escaped_pieces(text)
    out: list[str] = []
    used = 0
    for index, piece in enumerate(pieces):
        if used + len(piece) > limit:
            out.append(f"…[+{len(pieces) - index} chars]")
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)


def unescape_text(text: str) -> str:
    """Invert `escape_text` (for a value that was not truncated)."""

    def replace(match: re.Match[str]) -> str:
        hex_digits = match.group(1) or match.group(2) or match.group(3)
        return chr(int(hex_digits, 16)) if hex_digits else "\\"

    return _UNESCAPE_PATTERN.sub(replace, text)


def display_text(text: str) -> str:
    """Make any text safe for a terminal: escape controls, leave backslashes alone.

    Used for values read back from a log file, which may have been written by something other
    than this module (a tampered or foreign file), so nothing in them is trusted.
    """
    if text.isprintable():
        return text
    return "".join(_escape_char(ch) if needs_escape(ch) else ch for ch in text)


def _text_value(name: str, value: object) -> str:
    if isinstance(value, str):  # includes StrEnum members
        return escape_text(str(value))
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, enum.Enum) and isinstance(value.value, str):
        return escape_text(value.value)
    raise TypeError(f"audit field {name!r} takes text, not {type(value).__name__}")


def _count_value(name: str, value: object) -> int:
    # bool is an int subclass, but True as a byte count is always a bug.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"audit field {name!r} takes an integer, not {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"audit field {name!r} must be finite, got {value!r}")
        # Integers only: a float's text form is not canonical across JSON implementations.
        value = round(value)
    if not 0 <= value <= MAX_COUNT:
        raise ValueError(f"audit field {name!r} must be between 0 and 2**63-1, got {value}")
    return value


def check_event_name(event: str, *, internal: bool = False) -> str:
    """Return the event name as a plain str, or raise for unknown / caller-forbidden names."""
    name = str(event)
    if name not in EVENT_NAMES:
        raise UnknownEventError(f"unknown audit event {name!r}")
    if name in INTERNAL_EVENTS and not internal:
        raise UnknownEventError(f"audit event {name!r} is written by the AuditLog itself")
    return name


def normalize_fields(
    fields: Mapping[str, object], *, internal: bool = False
) -> dict[str, str | int]:
    """Validate field names and values; return JSON-ready, escaped, bounded values.

    ``None`` means "not known" and the field is left out. ``internal`` admits the fields
    the AuditLog writes about itself (checkpoint signatures, recovery details).
    """
    schema = INTERNAL_FIELDS if internal else CONTEXT_FIELDS
    clean: dict[str, str | int] = {}
    for name, value in fields.items():
        if name not in schema:
            if SECRET_FIELD_PATTERN.search(name):
                raise SecretFieldError(
                    f"refusing audit field {name!r}: secrets (passwords, codes, cookies, "
                    "tokens, keys) are never logged"
                )
            reserved = " (set by the AuditLog)" if name in RECORD_KEYS else ""
            raise FieldError(f"unknown audit field {name!r}{reserved}")
        if value is None:
            continue
        clean[name] = _typed_value(name, schema[name], value)
    return clean


def _typed_value(name: str, kind: FieldKind, value: object) -> str | int:
    if kind is FieldKind.COUNT:
        return _count_value(name, value)
    if kind is FieldKind.TEXT_OR_COUNT and isinstance(value, int) and not isinstance(value, bool):
        return _count_value(name, value)
    return _text_value(name, value)
