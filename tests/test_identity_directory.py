"""Tests for gatewayd.identity.directory: the shared input rules and the protocol."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.identity.directory import (
    MAX_PASSWORD_CHARS,
    MAX_USERNAME_CHARS,
    Directory,
    lookup_key,
    normalize_password,
)
from gatewayd.identity.filedir import FileDirectory


@pytest.mark.parametrize(
    ("typed", "key"),
    [
        ("alice", "alice"),
        ("Alice", "alice"),
        ("ALICE", "alice"),
        (" alice ", "alice"),
        ("alice\u3000", "alice"),  # ideographic space from a Japanese IME
        ("\uff41\uff4c\uff49\uff43\uff45", "alice"),  # full-width letters
        ("\uff21\uff2c\uff29\uff23\uff25", "alice"),
        ("a.b_c-d@ward", "a.b_c-d@ward"),
        ("Straße", "strasse"),
        ("", None),
        ("   ", None),
        ("ali\x00ce", None),
        ("alice\n", "alice"),  # outer whitespace, including a newline, is stripped
        ("ali\nce", None),
        ("ali\u202ece", None),  # bidi override
        ("a" * MAX_USERNAME_CHARS, "a" * MAX_USERNAME_CHARS),
        ("a" * (MAX_USERNAME_CHARS + 1), None),
    ],
)
def test_lookup_key(typed: str, key: str | None) -> None:
    assert lookup_key(typed) == key


@pytest.mark.parametrize(
    ("password", "normalized"),
    [
        ("correct horse", "correct horse"),
        (" leading and trailing ", " leading and trailing "),  # blanks are part of a password
        ("\uff11\uff12\uff13", "123"),  # full-width digits
        ("Pa\u00dfwort", "Pa\u00dfwort"),  # no case folding in passwords
        ("", None),
        ("with\x00nul", None),
        ("x" * MAX_PASSWORD_CHARS, "x" * MAX_PASSWORD_CHARS),
        ("x" * (MAX_PASSWORD_CHARS + 1), None),
    ],
)
def test_normalize_password(password: str, normalized: str | None) -> None:
    assert normalize_password(password) == normalized


def test_file_backend_implements_the_protocol(tmp_path: Path) -> None:
    assert isinstance(FileDirectory(tmp_path / "users.toml", timeout=1), Directory)
