"""Tests for gatewayd.https.headers: what upstreams and clients see of each other's headers."""

from __future__ import annotations

import urllib.parse

import pytest
from multidict import CIMultiDict

from gatewayd.https.headers import (
    ASSERTION_HEADER,
    GROUPS_HEADER,
    SESSION_COOKIE,
    USER_HEADER,
    canonical_name,
    downstream_response_headers,
    groups_value,
    header_safe,
    is_gateway_header,
    is_websocket_upgrade,
    public_authority,
    strip_session_cookie,
    upstream_request_headers,
    websocket_subprotocols,
)
from gatewayd.identity.principal import Principal

ALICE = Principal("alice", frozenset({"telework-staff", "ward-a"}))


def rewrite(*pairs: tuple[str, str], principal: Principal = ALICE,
            client_ip: str = "198.51.100.7") -> CIMultiDict[str]:
    return upstream_request_headers(
        CIMultiDict(pairs), principal=principal, assertion="jwt.assert.ion",
        client_ip=client_ip, forwarded_host="gw.example.jp",
    )


def lowered_names(headers: CIMultiDict[str]) -> list[str]:
    return [name.lower() for name in headers]


# --- spoofed identity headers: every spelling is dropped -------------------------------------

SPOOFED_IDENTITY = [
    "X-Gatewayd-User", "x-gatewayd-user", "X-GATEWAYD-USER", "X_Gatewayd_User",
    "x_gatewayd_user", "X-Gatewayd_User", "X_GATEWAYD-USER", "x-GaTeWaYd-UsEr",
    "X-Gatewayd-Groups", "X-GATEWAYD-GROUPS", "x_gatewayd_groups", "X-Gatewayd-groups",
    "X-Gatewayd-Assertion", "x_gatewayd_assertion", "X-GATEWAYD_ASSERTION",
    "x-gatewayd-anything", "X-Gatewayd-Device", "X-Gatewayd-", "x_gatewayd_",
    "X-Gatewayd-User-Id", "X-Gatewayd-Admin", "x-gatewayd-x-gatewayd-user",
]


@pytest.mark.parametrize("name", SPOOFED_IDENTITY)
def test_spoofed_identity_header_never_reaches_upstream(name: str) -> None:
    headers = rewrite((name, "mayor"), (name, "mayor,security-auditors"))
    assert "mayor" not in headers.values() and all("mayor" not in v for v in headers.values())
    gateway_names = [n for n in lowered_names(headers) if canonical_name(n).startswith("x-gatewayd-")]
    assert sorted(gateway_names) == ["x-gatewayd-assertion", "x-gatewayd-groups",
                                     "x-gatewayd-user"]
    assert headers.getall(USER_HEADER) == ["alice"]
    assert headers.getall(GROUPS_HEADER) == ["telework-staff,ward-a"]
    assert headers.getall(ASSERTION_HEADER) == ["jwt.assert.ion"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [(name, True) for name in SPOOFED_IDENTITY]
    + [("X-Gateway-User", False), ("X-Gatewayduser", False), ("Gatewayd-User", False),
       ("X-Forwarded-User", False), ("XX-Gatewayd-User", False), ("X Gatewayd User", False),
       ("Remote-User", False)],
)
def test_is_gateway_header(name: str, expected: bool) -> None:
    assert is_gateway_header(name) is expected


@pytest.mark.parametrize(
    "name",
    ["X-Gatewayd-User ", " X-Gatewayd-User", "X-Gatewayd-User:", "X-Gatewayd\tUser",
     "X-Gatewayd-Usér", "X-Gatewayd-User\x00", "Bad Name", "", "\uff38-Gatewayd-User"],
)
def test_invalid_header_names_are_dropped(name: str) -> None:
    headers = rewrite((name, "mayor"), ("Accept", "text/html"))
    assert name not in headers
    assert all("mayor" not in value for value in headers.values())
    assert headers["Accept"] == "text/html"


# --- forwarding and client-claimed addresses -------------------------------------------------

CLIENT_ADDRESS_CLAIMS = [
    "X-Forwarded-For", "x-forwarded-for", "X_Forwarded_For", "X-FORWARDED-FOR",
    "X-Forwarded-Proto", "X_Forwarded_Proto", "X-Forwarded-Host", "x_forwarded_host",
    "X-Forwarded-Port", "X-Forwarded-Server", "X-Forwarded-Prefix", "X-Forwarded-Ssl",
    "Forwarded", "FORWARDED", "X-Real-IP", "X_Real_Ip", "x-real-ip", "X-Client-IP",
    "True-Client-IP", "X-Cluster-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP",
    "X-Original-Forwarded-For",
]


@pytest.mark.parametrize("name", CLIENT_ADDRESS_CLAIMS)
def test_client_address_claims_are_replaced(name: str) -> None:
    headers = rewrite((name, "10.0.0.1"))
    assert "10.0.0.1" not in ",".join(headers.values())
    assert headers.getall("X-Forwarded-For") == ["198.51.100.7"]
    assert headers.getall("X-Forwarded-Proto") == ["https"]
    assert headers.getall("X-Forwarded-Host") == ["gw.example.jp"]
    assert headers.getall("Forwarded") == ['for=198.51.100.7;host=gw.example.jp;proto=https']


@pytest.mark.parametrize(("public_url", "authority"), [
    ("https://gateway.example.jp", "gateway.example.jp"),
    ("https://Gateway.Example.JP/", "gateway.example.jp"),
    ("https://gateway.example.jp:443", "gateway.example.jp"),  # browsers never write :443
    ("https://localhost:8443", "localhost:8443"),
    ("https://[2001:db8::1]", "[2001:db8::1]"),
    ("https://[2001:db8::1]:443", "[2001:db8::1]"),
    ("https://[2001:db8::443]", "[2001:db8::443]"),
])
def test_public_authority(public_url: str, authority: str) -> None:
    """X-Forwarded-Host and Forwarded host= name the gateway's public host (https.public_url),
    as a browser writes it in Host."""
    assert public_authority(public_url) == authority


@pytest.mark.parametrize(
    ("client_ip", "host", "forwarded"),
    [("192.0.2.1", "gw.example.jp", "for=192.0.2.1;host=gw.example.jp;proto=https"),
     ("2001:db8::1", "gw.example.jp", 'for="[2001:db8::1]";host=gw.example.jp;proto=https'),
     ("192.0.2.1", "gw.example.jp:8443", 'for=192.0.2.1;host="gw.example.jp:8443";proto=https')],
)
def test_forwarded_element_is_quoted_per_rfc7239(client_ip: str, host: str,
                                                 forwarded: str) -> None:
    headers = upstream_request_headers(CIMultiDict(), principal=ALICE, assertion="a",
                                       client_ip=client_ip, forwarded_host=host)
    assert headers["Forwarded"] == forwarded
    assert headers["X-Forwarded-For"] == client_ip


REQUEST_OVERRIDES = [
    "X-HTTP-Method-Override", "X_HTTP_Method_Override", "x-http-method", "X-Method-Override",
    "X-Original-URL", "X_Original_URL", "X-Rewrite-URL", "X-HTTP-DestinationURL",
]


@pytest.mark.parametrize("name", REQUEST_OVERRIDES)
def test_method_and_path_overrides_are_dropped(name: str) -> None:
    """read_only and path rules decide on the request line; an upstream must not act on
    another method or path than the one decided on."""
    headers = rewrite((name, "DELETE"), (name, "/approval/admin"))
    assert all(canonical_name(n) != canonical_name(name) for n in headers)


# --- hop-by-hop ------------------------------------------------------------------------------

HOP_BY_HOP = [
    ("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
    ("Trailer", "Expires"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
    ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Authenticate", "Basic"), ("proxy_authorization", "Basic x"),
    ("Transfer_Encoding", "chunked"), ("keep_alive", "1"), ("Host", "evil.example"),
    ("Expect", "100-continue"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ("Sec-WebSocket-Protocol", "chat"),
]


@pytest.mark.parametrize(("name", "value"), HOP_BY_HOP)
def test_hop_by_hop_and_gateway_set_headers_are_dropped(name: str, value: str) -> None:
    headers = rewrite((name, value), ("Accept-Language", "ja"))
    assert all(canonical_name(n) != canonical_name(name) for n in headers)
    assert headers["Accept-Language"] == "ja"


@pytest.mark.parametrize(
    ("connection", "named", "kept"),
    [("close, X-Custom", "X-Custom", "Accept"),
     ("X-Custom", "x-custom", "Accept"),
     ("x_custom", "X-Custom", "Accept"),
     ("Keep-Alive,  X-A , X-B", "X-B", "Accept")],
)
def test_headers_named_by_connection_are_dropped(connection: str, named: str,
                                                 kept: str) -> None:
    headers = rewrite(("Connection", connection), (named, "1"), (kept, "2"))
    assert named not in headers and "Connection" not in headers
    assert headers[kept] == "2"


@pytest.mark.parametrize("spelling", ["connection", "CONNECTION", "Connection"])
def test_every_connection_header_counts_in_any_case(spelling: str) -> None:
    headers = rewrite((spelling, "X-A"), ("Connection", "X-B"), ("X-A", "1"), ("X-B", "2"),
                      ("X-C", "3"))
    assert "X-A" not in headers and "X-B" not in headers and headers["X-C"] == "3"


def test_what_one_requests_connection_drops_is_kept_in_the_next() -> None:
    """Header rules are memoised per name; what Connection names is per request."""
    first = rewrite(("Connection", "X-Custom"), ("X-Custom", "1"))
    second = rewrite(("X-Custom", "2"))
    assert "X-Custom" not in first and second["X-Custom"] == "2"


def test_connection_cannot_drop_the_gateways_own_headers() -> None:
    headers = rewrite(("Connection", "X-Gatewayd-User, X-Forwarded-For, X-Gatewayd-Assertion"))
    assert headers[USER_HEADER] == "alice"
    assert headers["X-Forwarded-For"] == "198.51.100.7"
    assert headers[ASSERTION_HEADER] == "jwt.assert.ion"


def test_end_to_end_headers_are_kept_in_order_with_duplicates() -> None:
    headers = rewrite(("Accept", "text/html"), ("X-App", "1"), ("X-App", "2"),
                      ("Authorization", "Bearer app-token"), ("Content-Length", "5"),
                      ("Content-Type", "text/plain"), ("X_App_Underscore", "ok"),
                      ("Origin", "https://gw.example.jp"))
    assert headers.getall("X-App") == ["1", "2"]
    assert headers["Authorization"] == "Bearer app-token"  # the app's own auth is not ours
    assert headers["Content-Length"] == "5" and headers["Content-Type"] == "text/plain"
    assert headers["X_App_Underscore"] == "ok"  # underscores alone are not suspicious
    assert headers["Origin"] == "https://gw.example.jp"


# --- the session cookie ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cookies", "expected"),
    [
        ([f"{SESSION_COOKIE}=s3cret"], None),
        ([f"{SESSION_COOKIE}=s3cret; app=1"], "app=1"),
        ([f"app=1; {SESSION_COOKIE}=s3cret; b=2"], "app=1; b=2"),
        ([f"app=1;{SESSION_COOKIE}=s3cret"], "app=1"),
        ([f" {SESSION_COOKIE} = s3cret ;app=1"], "app=1"),
        (["app=1", f"{SESSION_COOKIE}=s3cret"], "app=1"),  # split Cookie headers (HTTP/2)
        ([f"{SESSION_COOKIE}=a; {SESSION_COOKIE}=b; x=1"], "x=1"),  # every copy
        ([f"{SESSION_COOKIE.lower()}=s3cret; x=1"], "x=1"),  # case look-alike
        ([f"{SESSION_COOKIE.upper()}=s3cret; x=1"], "x=1"),
        ([f"{SESSION_COOKIE}; x=1"], "x=1"),  # nameless cookie whose value is the name
        (["__Host-gatewayd_session_x=1; gatewayd_session=2"],
         "__Host-gatewayd_session_x=1; gatewayd_session=2"),  # other names are the app's
        (["a=1; ; b=2;"], "a=1; b=2"),
        ([], None),
        ([""], None),
    ],
)
def test_strip_session_cookie(cookies: list[str], expected: str | None) -> None:
    assert strip_session_cookie(cookies) == expected


@pytest.mark.parametrize("name", ["Cookie", "cookie", "COOKIE"])
def test_session_cookie_never_reaches_upstream(name: str) -> None:
    headers = rewrite((name, f"{SESSION_COOKIE}=s3cret; app=1"), (name, "b=2"))
    assert headers.getall("Cookie") == ["app=1; b=2"]
    assert "s3cret" not in ";".join(headers.values())


def test_cookie_header_is_omitted_when_only_the_session_cookie_was_sent() -> None:
    assert "Cookie" not in rewrite(("Cookie", f"{SESSION_COOKIE}=s3cret"))


# --- identity values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [("alice", "alice"), ("TOKYO\\alice", "TOKYO\\alice"), ("a.b-c_d@ward.local", "a.b-c_d@ward.local"),
     ("Domain Users", "Domain Users"), ("田中", "%E7%94%B0%E4%B8%AD"),
     ("a,b", "a%2Cb"), ("100%", "100%25"), ("x\r\nX-Gatewayd-User: mayor", "x%0D%0AX-Gatewayd-User: mayor"),
     ("tab\there", "tab%09here"), (" padded ", "%20padded%20"), ("  ", "%20%20"), ("", ""),
     ("\x7f", "%7F"), ("é", "%C3%A9")],
)
def test_header_safe(value: str, encoded: str) -> None:
    assert header_safe(value) == encoded
    assert urllib.parse.unquote(encoded) == value  # reversible for upstreams that decode
    assert all(0x20 <= ord(ch) < 0x7F for ch in encoded)


@pytest.mark.parametrize(
    ("groups", "value"),
    [(set(), ""), ({"b", "a"}, "a,b"), ({"ward,admins", "staff"}, "staff,ward%2Cadmins"),
     ({"総務課", "telework-staff"}, "telework-staff,%E7%B7%8F%E5%8B%99%E8%AA%B2")],
)
def test_groups_value_is_sorted_and_cannot_forge_a_group(groups: set[str], value: str) -> None:
    assert groups_value(groups) == value


def test_user_with_control_characters_cannot_inject_a_header_line() -> None:
    mallory = Principal("mallory\r\nX-Gatewayd-User: mayor", frozenset({"a\nb"}))
    headers = rewrite(principal=mallory)
    assert all("\r" not in v and "\n" not in v for v in headers.values())
    assert headers.getall(USER_HEADER) == ["mallory%0D%0AX-Gatewayd-User: mayor"]
    assert headers[GROUPS_HEADER] == "a%0Ab"


def test_empty_groups_are_sent_as_an_empty_header() -> None:
    headers = rewrite(principal=Principal("bob"))
    assert headers.getall(GROUPS_HEADER) == [""]


# --- response side ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("set_cookie", "kept"),
    [
        (f"{SESSION_COOKIE}=evil; Path=/; Secure; HttpOnly", False),
        (f"{SESSION_COOKIE.lower()}=evil; Path=/", False),
        (f" {SESSION_COOKIE} =evil", False),
        (f"{SESSION_COOKIE}", False),  # nameless cookie carrying the name as its value
        (f"{SESSION_COOKIE}; Path=/", False),
        ("app_session=1; Path=/", True),
        (f"other=1; Comment={SESSION_COOKIE}=x", True),  # only the cookie's own name counts
        ("__Host-gatewayd_session2=1", True),
    ],
)
def test_upstream_cannot_set_the_session_cookie(set_cookie: str, kept: bool) -> None:
    upstream = CIMultiDict([("Set-Cookie", set_cookie), ("Set-Cookie", "keep=1")])
    headers = downstream_response_headers(upstream)
    expected = [set_cookie, "keep=1"] if kept else ["keep=1"]
    assert headers.getall("Set-Cookie") == expected


@pytest.mark.parametrize(
    "name",
    ["Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
     "Proxy-Authenticate", "Proxy-Connection", "Server", "Date", "X-Named-By-Connection"],
)
def test_response_hop_by_hop_and_replaced_headers_are_dropped(name: str) -> None:
    upstream = CIMultiDict([(name, "v"), ("Connection", "X-Named-By-Connection"),
                            ("Content-Type", "text/html"), ("Content-Length", "12"),
                            ("Cache-Control", "private"), ("Location", "/next"),
                            ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    headers = downstream_response_headers(upstream)
    assert name not in headers
    assert headers["Content-Type"] == "text/html" and headers["Content-Length"] == "12"
    assert headers["Cache-Control"] == "private" and headers["Location"] == "/next"
    assert headers.getall("Set-Cookie") == ["a=1", "b=2"]


# --- WebSocket detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "pairs", "expected"),
    [
        ("GET", [("Upgrade", "websocket"), ("Connection", "Upgrade")], True),
        ("GET", [("Upgrade", "WebSocket"), ("Connection", "keep-alive, Upgrade")], True),
        ("GET", [("Upgrade", "websocket"), ("Connection", "keep-alive"),
                 ("Connection", "upgrade")], True),
        ("GET", [("Upgrade", "h2c, websocket"), ("Connection", "upgrade")], True),
        ("POST", [("Upgrade", "websocket"), ("Connection", "Upgrade")], False),
        ("GET", [("Upgrade", "websocket")], False),
        ("GET", [("Connection", "Upgrade")], False),
        ("GET", [("Upgrade", "h2c"), ("Connection", "Upgrade")], False),
        ("GET", [("Upgrade", "websocketx"), ("Connection", "Upgrade")], False),
        ("GET", [], False),
    ],
)
def test_is_websocket_upgrade(method: str, pairs: list[tuple[str, str]], expected: bool) -> None:
    assert is_websocket_upgrade(method, CIMultiDict(pairs)) is expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [(["chat.v2, chat.v1"], ("chat.v2", "chat.v1")), (["a", "b,c"], ("a", "b", "c")),
     ([" a ,, b "], ("a", "b")), (["bad proto, ok"], ("ok",)), ([], ())],
)
def test_websocket_subprotocols(values: list[str], expected: tuple[str, ...]) -> None:
    headers = CIMultiDict([("Sec-WebSocket-Protocol", v) for v in values])
    assert websocket_subprotocols(headers) == expected
