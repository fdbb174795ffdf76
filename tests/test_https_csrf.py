"""Tests for gatewayd.https.csrf: form tokens and the Origin / Sec-Fetch-Site check."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gatewayd.https.csrf import DEFAULT_MAX_AGE, CsrfTokens, cross_origin_reason, public_origins


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(clock: Clock) -> CsrfTokens:
    return CsrfTokens(clock=clock, key=b"k" * 32)


def test_a_token_checks_for_its_purpose_and_binding(tokens: CsrfTokens) -> None:
    token = tokens.issue("login", "browser-1")
    assert tokens.check(token, "login", "browser-1")


@pytest.mark.parametrize(("purpose", "binding"), [
    ("logout", "browser-1"),   # another form
    ("login", "browser-2"),    # another browser
    ("login", None),           # no binding cookie at all
    ("login", ""),
])
def test_a_token_does_not_check_elsewhere(tokens: CsrfTokens, purpose: str, binding: str | None) -> None:
    assert not tokens.check(tokens.issue("login", "browser-1"), purpose, binding)


def test_tokens_expire(tokens: CsrfTokens, clock: Clock) -> None:
    token = tokens.issue("stepup", "s")
    clock.now += DEFAULT_MAX_AGE
    assert tokens.check(token, "stepup", "s")
    clock.now += 1
    assert not tokens.check(token, "stepup", "s")


def test_another_process_key_does_not_check(clock: Clock) -> None:
    token = CsrfTokens(clock=clock).issue("login", "b")
    assert not CsrfTokens(clock=clock).check(token, "login", "b")


@pytest.mark.parametrize("mangle", [
    lambda t: "",
    lambda t: t + "x",
    lambda t: t[:-1],
    lambda t: t.replace("v1.", "v2.", 1),
    lambda t: "v1.9999999999999." + t.split(".")[2],  # forged issue time
    lambda t: "v1.-5." + t.split(".")[2],
    lambda t: "v1." + t.split(".")[1],
    lambda t: t.upper(),
    lambda t: "é" * 40,
    lambda t: "x" * 5000,
])
def test_mangled_tokens_fail(tokens: CsrfTokens, mangle: object) -> None:
    token = tokens.issue("login", "b")
    assert callable(mangle)
    assert not tokens.check(mangle(token), "login", "b")


ORIGINS = frozenset({"https://gw.example", "https://127.0.0.1:8443"})


@pytest.mark.parametrize(("headers", "refused"), [
    ({}, False),                                              # curl: token alone decides
    ({"Origin": "https://gw.example"}, False),
    ({"Origin": "HTTPS://GW.EXAMPLE"}, False),
    ({"Origin": "https://127.0.0.1:8443"}, False),
    ({"Sec-Fetch-Site": "same-origin"}, False),
    ({"Sec-Fetch-Site": "none"}, False),
    ({"Origin": "https://gw.example", "Sec-Fetch-Site": "same-origin"}, False),
    ({"Origin": "https://evil.example"}, True),
    ({"Origin": "http://gw.example"}, True),                  # downgraded scheme
    ({"Origin": "https://gw.example:444"}, True),
    ({"Origin": "https://gw.example.evil.example"}, True),
    ({"Origin": "null"}, True),                               # sandboxed iframe, data: URL
    ({"Origin": ""}, True),
    ({"Sec-Fetch-Site": "cross-site"}, True),
    ({"Sec-Fetch-Site": "same-site"}, True),                  # a sibling host is not us
    ({"Origin": "https://gw.example", "Sec-Fetch-Site": "cross-site"}, True),
])
def test_origin_check(headers: dict[str, str], refused: bool) -> None:
    assert (cross_origin_reason(CIMultiDict(headers), ORIGINS) is not None) == refused


def test_duplicate_origin_headers_are_refused() -> None:
    headers = CIMultiDict([("Origin", "https://gw.example"), ("Origin", "https://evil.example")])
    assert cross_origin_reason(headers, ORIGINS) == "several Origin headers"


@pytest.mark.parametrize(("public_url", "origin"), [
    ("https://gw.example", "https://gw.example"),
    ("https://GW.Example/", "https://gw.example"),
    ("https://gw.example:443", "https://gw.example"),  # a browser's Origin never says :443
    ("https://gw.example:8443", "https://gw.example:8443"),
    ("https://[2001:db8::1]:443", "https://[2001:db8::1]"),
])
def test_public_origins(public_url: str, origin: str) -> None:
    assert public_origins(public_url) == frozenset({origin})


@pytest.mark.parametrize(("headers", "refused"), [
    ({}, False),
    ({"Origin": "https://gw.example"}, False),
    ({"Origin": "https://127.0.0.1:8443"}, True),  # the address typed, not the public URL
    ({"Origin": "https://files.gw.example"}, True),
    ({"Sec-Fetch-Site": "same-site"}, True),
])
def test_proxied_writes_accept_only_the_public_origin(headers: dict[str, str],
                                                      refused: bool) -> None:
    origins = public_origins("https://gw.example:443")
    assert (cross_origin_reason(CIMultiDict(headers), origins) is not None) == refused
