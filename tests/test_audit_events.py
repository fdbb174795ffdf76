"""Tests for gatewayd.audit.events: names, field schema, escaping and value checks."""

from __future__ import annotations

import enum
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.audit.events import (
    CONTEXT_FIELDS,
    EVENT_NAMES,
    INTERNAL_EVENTS,
    INTERNAL_FIELDS,
    MAX_TEXT_CHARS,
    RECORD_KEYS,
    SECRET_FIELD_PATTERN,
    EventName,
    FieldError,
    SecretFieldError,
    UnknownEventError,
    check_event_name,
    display_text,
    escape_text,
    needs_escape,
    normalize_fields,
    unescape_text,
)

DESIGN_EVENTS = {
    "auth.success", "auth.failure", "auth.locked", "session.start", "session.end",
    "access.allow", "access.deny", "access.step_up", "tunnel.open", "tunnel.close",
    "tunnel.deny", "admin.session_kill", "config.reload", "mfa.enroll", "audit.checkpoint",
}
DESIGN_FIELDS = {
    "user", "source_ip", "device", "session", "frontend", "service", "method", "path", "dest",
    "rule", "reason", "status", "bytes_up", "bytes_down", "duration_ms",
}


def test_event_names_cover_the_interface_contract() -> None:
    assert DESIGN_EVENTS <= EVENT_NAMES
    assert {"audit.read", "cert.issue", "cert.revoke", "audit.retention"} <= EVENT_NAMES
    assert {e.value for e in EventName} == EVENT_NAMES
    for name in EVENT_NAMES:
        assert re.fullmatch(r"[a-z][a-z_]*\.[a-z_]+", name), name  # area.action (ssh_cert.issue)


def test_context_fields_cover_the_contract_and_never_look_secret() -> None:
    assert set(CONTEXT_FIELDS) >= DESIGN_FIELDS
    for name in CONTEXT_FIELDS:
        assert not SECRET_FIELD_PATTERN.search(name), name
    assert not set(RECORD_KEYS) & set(INTERNAL_FIELDS)


def test_event_name_checks() -> None:
    assert check_event_name(EventName.AUTH_SUCCESS) == "auth.success"
    assert type(check_event_name(EventName.AUTH_SUCCESS)) is str
    with pytest.raises(UnknownEventError):
        check_event_name("auth.sucess")
    for internal in INTERNAL_EVENTS:
        with pytest.raises(UnknownEventError, match="AuditLog itself"):
            check_event_name(internal)
        assert check_event_name(internal, internal=True) == internal


ESCAPES = [
    ("alice", "alice"),
    ("山田　太郎", "山田　太郎"),  # non-ASCII text and the ideographic space stay readable
    ("a\nb", "a\\x0ab"),
    ("a\rb", "a\\x0db"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("nul\x00", "nul\\x00"),
    ("del\x7f", "del\\x7f"),
    ("c1\x85", "c1\\x85"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("bidi\u202e", "bidi\\u202e"),
    ("zw\u200b", "zw\\u200b"),
    ("tag\U000e0041", "tag\\U000e0041"),
    ("lone\udcff", "lone\\udcff"),
    ("TOKYO\\alice", "TOKYO\\alice"),  # a lone backslash stays as it is
    ("look\\x0a", "look\\\\x0a"),  # ... unless it would read as an escape
    ("two\\\\", "two\\\\\\"),  # the last backslash is followed by nothing
    ("end\\\n", "end\\\\\\x0a"),
]


@pytest.mark.parametrize(("raw", "stored"), ESCAPES)
def test_escape_table(raw: str, stored: str) -> None:
    assert escape_text(raw) == stored
    assert not any(needs_escape(ch) for ch in stored)
    assert unescape_text(stored) == raw


@given(st.text(st.characters(exclude_categories=())))
def test_escaping_is_printable_and_reversible(raw: str) -> None:
    stored = escape_text(raw, limit=10**6)
    assert not any(needs_escape(ch) for ch in stored)  # no control/format/separator chars
    assert unescape_text(stored) == raw


def test_truncation_keeps_escapes_whole_and_counts_what_was_left_out() -> None:
    assert escape_text("x" * MAX_TEXT_CHARS) == "x" * MAX_TEXT_CHARS
    assert escape_text("x" * (MAX_TEXT_CHARS + 5)) == "x" * MAX_TEXT_CHARS + "…[+5 chars]"
    cut = escape_text("ab" + "\n" * 10, limit=10)
    assert cut == "ab\\x0a\\x0a…[+8 chars]"  # never half an escape


def test_display_text_escapes_controls_but_keeps_backslashes() -> None:
    assert display_text("plain \\x0a text") == "plain \\x0a text"
    assert display_text("evil\x1b]0;title\x07") == "evil\\x1b]0;title\\x07"
    assert display_text("日本語") == "日本語"


class Frontend(enum.Enum):
    HTTPS = "https"


def test_normalize_fields_converts_and_checks_values() -> None:
    clean = normalize_fields({
        "user": "alice\n", "source_ip": ipaddress.ip_address("2001:db8::1"),
        "frontend": Frontend.HTTPS, "status": 403, "duration_ms": 12.6, "device": None,
    })
    assert clean == {"user": "alice\\x0a", "source_ip": "2001:db8::1", "frontend": "https",
                     "status": 403, "duration_ms": 13}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"bytes_up": True}, TypeError),
        ({"bytes_up": "12"}, TypeError),
        ({"bytes_up": -1}, ValueError),
        ({"bytes_up": 2**63}, ValueError),
        ({"duration_ms": float("nan")}, ValueError),
        ({"user": 42}, TypeError),
        ({"user": b"alice"}, TypeError),
        ({"path": object()}, TypeError),
        ({"colour": "blue"}, FieldError),
        ({"ts": "2026-01-01T00:00:00+09:00"}, FieldError),
        ({"covers_seq": 1}, FieldError),  # internal only
        ({"password": "hunter2"}, SecretFieldError),
        ({"totp": "123456"}, SecretFieldError),
        ({"Session_Cookie": "x"}, SecretFieldError),
        ({"refresh_token": "x"}, SecretFieldError),
    ],
)
def test_normalize_fields_rejects(fields: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        normalize_fields(fields)


def test_status_is_an_http_code_or_an_outcome_word() -> None:
    assert normalize_fields({"status": 403}) == {"status": 403}
    assert normalize_fields({"status": "failure"}) == {"status": "failure"}
    with pytest.raises(TypeError):
        normalize_fields({"status": True})
    with pytest.raises(ValueError):
        normalize_fields({"status": -1})


def test_internal_fields_only_with_internal_flag() -> None:
    assert normalize_fields({"covers_seq": 3, "key_id": "ab"}, internal=True) == {
        "covers_seq": 3, "key_id": "ab"}
