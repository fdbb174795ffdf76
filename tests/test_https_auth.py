"""Tests for gatewayd.https.auth: cookie parsing, session resolution, navigation detection."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gatewayd.https.auth import (
    REQUEST_COOKIES,
    cookie_values,
    looks_like_session_id,
    remember_cookies,
    request_cookie_values,
    resolve_session,
    session_cookie_header,
    wants_html,
)
from gatewayd.identity.principal import Principal
from gatewayd.sessions import SessionRegistry

NAME = "__Host-gatewayd_session"


@pytest.mark.parametrize(("headers", "expected"), [
    ([], []),
    ([("Cookie", f"{NAME}=abc")], ["abc"]),
    ([("Cookie", f"a=1; {NAME}=abc; b=2")], ["abc"]),
    ([("Cookie", f'{NAME}="abc"')], ["abc"]),
    ([("Cookie", f"{NAME}=one; {NAME}=two")], ["one", "two"]),
    ([("Cookie", f"{NAME}=one"), ("Cookie", f"{NAME}=two")], ["one", "two"]),
    ([("Cookie", f"{NAME.lower()}=x")], []),          # names are case-sensitive
    ([("Cookie", f"x{NAME}=x")], []),
    ([("Cookie", f"{NAME}")], []),                    # no '=': not this cookie
    ([("Cookie", ";;; =; ==; bad cookie; " + f"{NAME}=ok")], ["ok"]),
    ([("Cookie", f"{NAME}=a=b")], ["a=b"]),
])
def test_cookie_values(headers: list[tuple[str, str]], expected: list[str]) -> None:
    assert cookie_values(CIMultiDict(headers), NAME) == expected


def test_a_requests_cookies_are_parsed_once() -> None:
    request = make_mocked_request("GET", "/", headers=CIMultiDict(
        [("Cookie", f"a=1; {NAME}=one"), ("Cookie", f"{NAME}=two; __Host-gatewayd_csrf=c")]))
    assert REQUEST_COOKIES not in request
    assert list(request_cookie_values(request, NAME)) == ["one", "two"]
    parsed = request[REQUEST_COOKIES]
    assert list(request_cookie_values(request, "__Host-gatewayd_csrf")) == ["c"]
    assert list(request_cookie_values(request, "absent")) == []
    assert request[REQUEST_COOKIES] is parsed  # the later reads used the first parse


def test_the_callers_parse_is_the_one_later_readers_use() -> None:
    request = make_mocked_request("GET", "/", headers=CIMultiDict(
        [("Cookie", f"{NAME}=s; __Host-gatewayd_csrf=c")]))
    cookies = remember_cookies(request)
    assert cookies == {NAME: ["s"], "__Host-gatewayd_csrf": ["c"]}
    assert request_cookie_values(request, "__Host-gatewayd_csrf") is cookies["__Host-gatewayd_csrf"]


@pytest.mark.parametrize(("value", "ok"), [
    ("A" * 43, True), ("a-_9" * 10 + "abc", True), ("A" * 42, False), ("A" * 44, False),
    ("A" * 42 + "=", False), ("A" * 42 + "/", False), ("", False), ("\u3042" * 43, False),
])
def test_session_id_shape(value: str, ok: bool) -> None:
    assert looks_like_session_id(value) is ok


@pytest.fixture
def registry() -> SessionRegistry:
    return SessionRegistry(idle_timeout=900, absolute_timeout=36000, max_concurrent=10,
                           per_user=5, clock=lambda: 100.0, on_end=lambda s, r: None)


def test_resolve_tries_each_value_and_honours_the_device(registry: SessionRegistry) -> None:
    raw, session = registry.create(Principal("alice"), frontend="https", source_ip="192.0.2.1",
                                   device="pc-1", device_user="alice")
    assert resolve_session(registry, ["Z" * 43, raw], "pc-1") is session
    assert resolve_session(registry, [raw], None) is None
    assert resolve_session(registry, [raw], "pc-2") is None
    assert resolve_session(registry, ["junk", raw[:-1]], "pc-1") is None
    plain_raw, plain = registry.create(Principal("bob"), frontend="https",
                                       source_ip="192.0.2.2")
    assert resolve_session(registry, [plain_raw], None) is plain
    assert resolve_session(registry, [plain_raw], "pc-9") is plain


def test_resolve_stops_after_a_few_cookies(registry: SessionRegistry) -> None:
    raw, _ = registry.create(Principal("alice"), frontend="https", source_ip="192.0.2.1")
    assert resolve_session(registry, ["Z" * 43] * 10 + [raw], None) is None


def test_session_cookie_flags() -> None:
    header = session_cookie_header("A" * 43)
    assert header == f"{NAME}={'A' * 43}; Path=/; Secure; HttpOnly; SameSite=Lax"
    assert "Domain" not in header and "Max-Age" not in header


@pytest.mark.parametrize(("headers", "html"), [
    ({"Sec-Fetch-Mode": "navigate"}, True),
    ({"Sec-Fetch-Mode": "navigate", "Accept": "application/json"}, True),
    ({"Sec-Fetch-Mode": "cors", "Accept": "text/html"}, False),
    ({"Sec-Fetch-Mode": "no-cors"}, False),
    ({"Sec-Fetch-Mode": "websocket"}, False),
    ({"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, True),
    ({"Accept": "application/json"}, False),
    ({"Accept": "*/*"}, False),
    ({}, False),
])
def test_wants_html(headers: dict[str, str], html: bool) -> None:
    assert wants_html(CIMultiDict(headers)) is html
