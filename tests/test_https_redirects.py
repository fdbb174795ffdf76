"""Tests for gatewayd.https.redirects: next= never leads off this origin."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.https.redirects import MAX_NEXT_LENGTH, safe_next

KEPT = [
    "/",
    "/groupware/",
    "/groupware/mail/inbox",
    "/approval/requests/42?tab=history&x=1",
    "/files/%E6%97%A5%E5%A0%B1.xlsx",
    "/files/a%20b",
    "/chat/#room",
    "/.gatewayd/userinfo",
    "/path;with=params",
    "/a/./b",  # odd but same-origin: the policy refuses it later if it matters
]

REFUSED = [
    None,
    "",
    "//evil.example",
    "//evil.example/groupware/",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\\/evil.example",
    "https://evil.example/",
    "http://evil.example",
    "HTTPS://evil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "evil.example",
    "groupware/",
    "?next=//evil",
    "#frag",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r/evil.example",
    "/ /evil.example",
    "/%2F%2Fevil.example",
    "/%2f/evil.example",
    "%2F%2Fevil.example",
    "/%5Cevil.example",
    "/%5cevil.example",
    "/%252F%252Fevil.example",
    "/%25252F%25252Fevil.example",
    "/%09/evil.example",
    "/%0d%0a/evil.example",
    "/groupware\\..\\..\\evil",
    "/gr\u00f6upware/",
    "/\u3000/evil",
    "/\uff0f\uff0fevil.example",
    "/\x00",
    "/\x7f",
    "/" + "a" * MAX_NEXT_LENGTH,
    "/.gatewayd/login",
    "/.gatewayd/login?next=/groupware/",
    "/.gatewayd/logout",
    "/.gatewayd/stepup?next=/x",
]


@pytest.mark.parametrize("value", KEPT)
def test_same_origin_paths_are_kept(value: str) -> None:
    assert safe_next(value) == value


@pytest.mark.parametrize("value", REFUSED)
def test_anything_else_leads_to_the_portal(value: str | None) -> None:
    assert safe_next(value) == "/"


@given(st.text(max_size=80))
def test_result_is_always_an_origin_relative_path(value: str) -> None:
    result = safe_next(value)
    assert result == "/" or result == value
    assert result.startswith("/")
    assert not result.startswith(("//", "/\\"))
    assert result.isascii() and result.isprintable() and " " not in result and "\\" not in result
