"""Header rewriting between client, gateway and upstream (sans-IO: pure functions, no await).

Owns what an upstream application sees of a client's request headers, and what a client sees
of an upstream's response headers. Nothing here touches a socket; `proxy.py` applies the
results.

Request side (`upstream_request_headers`), in this order:

1. header names that are not RFC 9110 tokens are dropped (nginx ``ignore_invalid_headers``);
2. every name is compared in a *canonical spelling*: ASCII lower case with ``_`` read as
   ``-``, because CGI/WSGI/PHP upstreams turn ``X-Gatewayd-User`` and ``X_Gatewayd_User``
   into the same ``HTTP_X_GATEWAYD_USER`` variable; so every rule below also catches the
   underscore and mixed-case spellings of a name;
3. dropped: hop-by-hop headers (``Connection`` and every header it names, ``Keep-Alive``,
   ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``); every
   ``X-Gatewayd-*`` header (only the gateway speaks for the user); client-claimed addresses
   (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP`` and the other client-IP headers that
   frameworks trust); request overrides that would let an upstream act on another method or
   path than the one the policy decided on (``X-HTTP-Method-Override``, ``X-Original-URL``…);
   ``Host`` and ``Expect`` (the gateway's client library sets the upstream's own ``Host``, and
   the gateway answers ``100-continue`` itself, see `proxy.defer_continue`); the WebSocket
   handshake headers (each leg of a proxied WebSocket does its own handshake, see
   `proxy.proxy_websocket`);
4. the gateway's session cookie is cut out of ``Cookie`` (all ``Cookie`` headers are joined
   into one, as RFC 9113 asks when going from HTTP/2 to HTTP/1.1);
5. added: ``X-Forwarded-For`` (the peer address only, never a client-supplied chain),
   ``X-Forwarded-Proto`` (``https``), ``X-Forwarded-Host`` (the gateway's own public host,
   `public_authority` of ``https.public_url``: never the client's ``Host``, which upstreams
   build absolute links from — password-reset mails, redirects — and which a client can set
   to anything), the equivalent RFC 7239 ``Forwarded``,
   ``X-Gatewayd-User``, ``X-Gatewayd-Groups`` (sorted, comma-separated) and
   ``X-Gatewayd-Assertion`` (the signed JWT from `assertion.py`).

Identity values are sent as they are when they are printable ASCII; any other character, and
``%`` and ``,`` (the group separator), is percent-encoded as UTF-8, so a directory name can
never break a header line or forge an extra group. The assertion JWT carries the exact values.

Response side (`downstream_response_headers`): hop-by-hop headers dropped as above, the
upstream's ``Server`` and ``Date`` replaced by the gateway's (as nginx and Envoy do, so
internal server versions do not leak), and any ``Set-Cookie`` for the gateway's session cookie
dropped so an upstream can neither read, overwrite nor shadow it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict, MultiMapping

from gatewayd.identity.principal import Principal

SESSION_COOKIE: Final = "__Host-gatewayd_session"
USER_HEADER: Final = "X-Gatewayd-User"
GROUPS_HEADER: Final = "X-Gatewayd-Groups"
ASSERTION_HEADER: Final = "X-Gatewayd-Assertion"
IDENTITY_PREFIX: Final = "x-gatewayd-"

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Canonical spellings (lower case, '-' for '_'). Hop-by-hop per RFC 9110 section 7.6.1, plus
# the obsolete Proxy-Connection that old clients still send.
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}
)
_HOP_BY_HOP_PREFIX: Final = "proxy-"

# Addresses a client could claim for itself; frameworks trust each of these somewhere.
_CLIENT_ADDRESS: Final = frozenset(
    {"forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip",
     "cf-connecting-ip", "fastly-client-ip", "x-original-forwarded-for"}
)
_CLIENT_ADDRESS_PREFIX: Final = "x-forwarded-"

# Headers some frameworks (Symfony, IIS rewrite, Rails, Express method-override) use to act on
# another path or method than the request line's: a way around path rules and read_only.
_REQUEST_OVERRIDES: Final = frozenset(
    {"x-original-url", "x-rewrite-url", "x-http-method-override", "x-http-method",
     "x-method-override", "x-http-destinationurl"}
)

# Set by the gateway's HTTP client for the upstream leg, never copied from the client.
_GATEWAY_SET: Final = frozenset({"host", "expect"})

# Each WebSocket leg negotiates key, version, extensions and subprotocol itself.
_WEBSOCKET_HANDSHAKE: Final = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
     "sec-websocket-accept", "sec-websocket-protocol"}
)

# Upstream response headers the gateway replaces with its own.
_REPLACED_IN_RESPONSE: Final = frozenset({"server", "date"})

# Characters of identity values sent unencoded: printable ASCII except '%' (the escape
# character) and ',' (the group separator).
_PLAIN_VALUE_CHARS: Final = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"%", ","}


def canonical_name(name: str) -> str:
    """The spelling header rules compare: ASCII lower case, ``_`` read as ``-``."""
    return name.lower().replace("_", "-")


def is_valid_name(name: str) -> bool:
    """True for an RFC 9110 token (the only legal header field name)."""
    return _TOKEN.fullmatch(name) is not None


def is_gateway_header(name: str) -> bool:
    """True for any spelling of an ``X-Gatewayd-*`` header (only the gateway may send one)."""
    return canonical_name(name).startswith(IDENTITY_PREFIX)


def _connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """Canonical names listed in every ``Connection`` header: hop-by-hop for this hop only."""
    # "connection" has no '-', so the only names whose canonical spelling is "connection" are
    # its case variants: exactly what the case-insensitive getall finds, in one lookup
    # instead of a canonical_name() per header.
    values = headers.getall("Connection", ())
    if not values:
        return _NOTHING_NAMED
    if len(values) == 1:
        return _connection_value_tokens(values[0])
    return frozenset().union(*map(_connection_value_tokens, values))


# Nearly every message carries "keep-alive", "close" or "Upgrade"; bounded (peer input).
@functools.lru_cache(maxsize=256)
def _connection_value_tokens(value: str) -> frozenset[str]:
    return frozenset(canonical_name(token.strip()) for token in value.split(",") if token.strip())


_NOTHING_NAMED: Final[frozenset[str]] = frozenset()


def _is_hop_by_hop(canonical: str, connection_named: frozenset[str]) -> bool:
    return (
        canonical in _HOP_BY_HOP
        or canonical.startswith(_HOP_BY_HOP_PREFIX)
        or canonical in connection_named
    )


def _dropped_from_request(canonical: str, connection_named: frozenset[str]) -> bool:
    return (
        _is_hop_by_hop(canonical, connection_named)
        or canonical.startswith(IDENTITY_PREFIX)
        or canonical in _CLIENT_ADDRESS
        or canonical.startswith(_CLIENT_ADDRESS_PREFIX)
        or canonical in _REQUEST_OVERRIDES
        or canonical in _GATEWAY_SET
        or canonical in _WEBSOCKET_HANDSHAKE
        or canonical == "cookie"  # re-added below without the session cookie
    )


# What happens to a client request header, by name (before the names its Connection header
# lists, which vary per request and are checked on top).
_KEEP: Final = 0
_DROP: Final = 1
_COOKIE: Final = 2


# Header names repeat on every request of every browser, and classifying one (token regex,
# canonical spelling, eight rule checks) costs about a microsecond: memoised, bounded
# because names are client input. A pure function of the name, so nothing is shared but
# the answer.
@functools.lru_cache(maxsize=1024)
def _request_header_rule(name: str) -> tuple[int, str]:
    """(_KEEP | _DROP | _COOKIE, canonical name) for a client request header name."""
    if not is_valid_name(name):
        return _DROP, ""
    canonical = canonical_name(name)
    if canonical == "cookie":
        return _COOKIE, canonical
    return (_DROP if _dropped_from_request(canonical, _NOTHING_NAMED) else _KEEP), canonical


@functools.lru_cache(maxsize=1024)
def _response_header_rule(name: str) -> tuple[bool, str]:
    """(dropped whatever Connection says, canonical name) for an upstream response header."""
    canonical = canonical_name(name)
    return (_is_hop_by_hop(canonical, _NOTHING_NAMED) or canonical in _REPLACED_IN_RESPONSE,
            canonical)


def _cookie_name(pair: str) -> str:
    """Name of one ``name=value`` cookie pair. A pair without ``=`` is a nameless cookie whose
    value browsers send bare, and some servers read that bare value as a name: so treat the
    whole pair as the name when matching."""
    name, _, _ = pair.partition("=")
    return name.strip()


def is_session_cookie_name(name: str) -> bool:
    """Case-insensitive, like browsers' ``__Host-`` prefix matching: no look-alike survives."""
    return name.lower() == SESSION_COOKIE.lower()


def strip_session_cookie(cookie_values: Iterable[str]) -> str | None:
    """Join ``Cookie`` header values into one, without the gateway's session cookie.

    Returns None when nothing is left (the upstream then gets no ``Cookie`` header at all).
    """
    kept = [
        pair.strip()
        for value in cookie_values
        for pair in value.split(";")
        if pair.strip() and not is_session_cookie_name(_cookie_name(pair))
    ]
    return "; ".join(kept) if kept else None


def _percent_encode_unsafe(text: str) -> str:
    return "".join(
        ch if ch in _PLAIN_VALUE_CHARS else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in text
    )


def header_safe(value: str) -> str:
    """An identity value as a header value: unchanged if it is printable ASCII without ``%``
    or ``,``, else percent-encoded UTF-8 for exactly the characters that are not. Surrounding
    spaces are encoded too, because header parsers strip them."""
    if (
        value.isascii() and value.isprintable()  # printable ASCII is exactly 0x20-0x7E
        and "%" not in value and "," not in value
        and value[:1] != " " and value[-1:] != " "
    ):
        return value  # the common case, decided without looking at each character
    core = value.strip(" ")
    if not core:
        return "%20" * len(value)
    leading = len(value) - len(value.lstrip(" "))
    trailing = len(value) - len(value.rstrip(" "))
    return "%20" * leading + _percent_encode_unsafe(core) + "%20" * trailing


def groups_value(groups: Iterable[str]) -> str:
    """``X-Gatewayd-Groups``: sorted, each `header_safe`, comma-separated (empty if none)."""
    if isinstance(groups, frozenset):
        return _groups_value_memo(groups)
    return ",".join(header_safe(group) for group in sorted(groups))


# A session's groups are one frozenset object (its hash is cached) sent with every request.
@functools.lru_cache(maxsize=1024)
def _groups_value_memo(groups: frozenset[str]) -> str:
    return ",".join(header_safe(group) for group in sorted(groups))


# The same client address and host on every request of a session; bounded (client input).
@functools.lru_cache(maxsize=1024)
def _forwarded_element(client_ip: str, host: str, proto: str) -> str:
    """RFC 7239 ``Forwarded`` element; IPv6 addresses bracketed, values quoted when needed."""
    node = f"[{client_ip}]" if ":" in client_ip else client_ip
    parts = (("for", node), ("host", host), ("proto", proto))
    return ";".join(f"{key}={_forwarded_value(value)}" for key, value in parts)


def _forwarded_value(value: str) -> str:
    if _TOKEN.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# One public URL per gateway, asked for on every proxied request.
@functools.lru_cache(maxsize=8)
def public_authority(public_url: str) -> str:
    """``host[:port]`` of ``https.public_url`` as a browser writes it in ``Host`` and
    ``Origin``: lower case, the default port 443 left out. The configuration has validated
    the URL as ``https://host[:port]`` (no path, no credentials)."""
    authority = public_url.strip().rstrip("/").partition("://")[2].lower()
    return authority.removesuffix(":443")


def upstream_request_headers(
    client_headers: MultiMapping[str],
    *,
    principal: Principal,
    assertion: str,
    client_ip: str,
    forwarded_host: str,
    proto: str = "https",
) -> CIMultiDict[str]:
    """The headers to send upstream for one proxied request (see the module docstring).

    ``client_headers`` is the client's request headers with duplicates (aiohttp's
    ``request.headers``). ``client_ip`` is the TCP peer address. ``forwarded_host`` is the
    gateway's public host (`public_authority`): never the client's ``Host``, because
    upstreams build absolute links (password-reset mails…) from it.
    ``assertion`` is the signed JWT for this user and service.
    """
    connection_named = _connection_tokens(client_headers)
    headers: CIMultiDict[str] = CIMultiDict()
    cookies: list[str] = []
    for name, value in client_headers.items():
        rule, canonical = _request_header_rule(name)
        if rule == _KEEP:
            if canonical not in connection_named:
                headers.add(name, value)
        elif rule == _COOKIE:
            cookies.append(value)
    if cookies:
        cookie = strip_session_cookie(cookies)
        if cookie is not None and "cookie" not in connection_named:
            headers.add("Cookie", cookie)
    # Added, not set: the loop above let no client header of these names through.
    headers.extend((
        ("X-Forwarded-For", client_ip),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", forwarded_host),
        ("Forwarded", _forwarded_element(client_ip, forwarded_host, proto)),
        (USER_HEADER, header_safe(principal.user)),
        (GROUPS_HEADER, groups_value(principal.groups)),
        (ASSERTION_HEADER, assertion),
    ))
    return headers


def _set_cookie_is_session(value: str) -> bool:
    first_pair = value.partition(";")[0]
    return is_session_cookie_name(_cookie_name(first_pair))


def downstream_response_headers(upstream_headers: MultiMapping[str]) -> CIMultiDict[str]:
    """The upstream response headers a client may see (see the module docstring)."""
    connection_named = _connection_tokens(upstream_headers)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers.items():
        dropped, canonical = _response_header_rule(name)
        if dropped or canonical in connection_named:
            continue
        if canonical == "set-cookie" and _set_cookie_is_session(value):
            continue
        headers.add(name, value)
    return headers


def _tokens(headers: MultiMapping[str], name: str) -> list[str]:
    return [
        token.strip().lower()
        for value in headers.getall(name, ())
        for token in value.split(",")
        if token.strip()
    ]


def is_websocket_upgrade(method: str, headers: MultiMapping[str]) -> bool:
    """True for a WebSocket opening handshake (RFC 6455 section 4.1): a GET with
    ``Upgrade: websocket`` and ``Connection: upgrade`` (tokens, any case, in any list)."""
    return (
        method == "GET"
        and "Upgrade" in headers  # the common case, in one lookup
        and "websocket" in _tokens(headers, "Upgrade")
        and "upgrade" in _tokens(headers, "Connection")
    )


def websocket_subprotocols(headers: MultiMapping[str]) -> tuple[str, ...]:
    """The subprotocols a client offers (``Sec-WebSocket-Protocol``), in its order."""
    offered = [
        token.strip()
        for value in headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
    ]
    return tuple(token for token in offered if _TOKEN.fullmatch(token))
