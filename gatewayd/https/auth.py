"""Who is asking: the session cookie, the session it names, and how to answer the unknown.

Owns the cookie contract of DESIGN.md — ``__Host-gatewayd_session``: ``Secure``, ``HttpOnly``,
``SameSite=Lax``, ``Path=/``, no ``Domain`` (the ``__Host-`` prefix makes browsers enforce
the last three, so no sibling host can plant or shadow it) and no ``Max-Age`` (it dies with
the browser; the server's idle and absolute timeouts are what count) — plus the pre-session
cookie ``__Host-gatewayd_csrf`` that binds the login form's CSRF token to one browser.

Resolving a session (`resolve_session`) never trusts the cookie beyond using it as a lookup
key: values that cannot be a session id (wrong length or alphabet) are not even hashed, a
cookie for an ended or expired session resolves to nothing, and a session bound to a device
certificate resolves only on a connection that presents that same device — a cookie copied
to another machine does not carry the device with it. Several cookies of the same name (a
browser with stale ones) are each tried; none is ever *adopted*: session ids are only minted
by the registry at login (no session fixation).

`wants_html` decides between a browser navigation (redirect to the sign-in page) and a
script, XHR or API client (401 JSON naming the sign-in URL), from ``Sec-Fetch-Mode`` and
``Accept``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from aiohttp import web
from multidict import MultiMapping

from gatewayd.https.headers import SESSION_COOKIE
from gatewayd.sessions import Session, SessionRegistry

CSRF_COOKIE: Final = "__Host-gatewayd_csrf"
_TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
MAX_COOKIES_TRIED: Final = 4
# This request's cookies (`request_cookie_values`): name -> values, parsed once per request.
REQUEST_COOKIES: Final = web.RequestKey[Mapping[str, Sequence[str]]]("cookies")


def parse_cookies(headers: MultiMapping[str]) -> dict[str, list[str]]:
    """Every cookie of the request's Cookie headers: name -> its values, in order.

    Parsed by hand (``name=value`` pairs split on ``;``) rather than with
    ``http.cookies``, which silently drops a whole header at the first pair it dislikes —
    one odd cookie of an upstream application must not log a user out.
    """
    cookies: dict[str, list[str]] = {}
    for header in headers.getall("Cookie", ()):
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep:
                cookies.setdefault(key.strip(), []).append(value.strip().strip('"'))
    return cookies


def cookie_values(headers: MultiMapping[str], name: str) -> list[str]:
    """Every value of cookie ``name`` in ``headers``, in order (see `parse_cookies`)."""
    return parse_cookies(headers).get(name, [])


def remember_cookies(request: web.BaseRequest) -> Mapping[str, Sequence[str]]:
    """Parse the request's Cookie headers and keep the result on the request.

    Called once per request by the listener's caller step, before anything else reads a
    cookie; storing unconditionally spares the hot path a failed lookup.
    """
    cookies = request[REQUEST_COOKIES] = parse_cookies(request.headers)
    return cookies


def request_cookie_values(request: web.BaseRequest, name: str) -> Sequence[str]:
    """`cookie_values` of a request, from the parse `remember_cookies` kept (made here if
    nothing has parsed this request's cookies yet).

    The session cookie is read for every request and the CSRF cookie on the sign-in path,
    sometimes twice (the form and its error page): one parse serves them all.
    """
    cookies = request.get(REQUEST_COOKIES)
    if cookies is None:
        cookies = remember_cookies(request)
    return cookies.get(name, ())


def looks_like_session_id(value: str) -> bool:
    return _TOKEN_SHAPE.fullmatch(value) is not None


def resolve_session(
    registry: SessionRegistry, candidates: Iterable[str], device: str | None
) -> Session | None:
    """The live session named by one of the cookie values, if it may be used from here."""
    for value in list(candidates)[:MAX_COOKIES_TRIED]:
        if not looks_like_session_id(value):
            continue
        session = registry.get(value)
        if session is not None and session.device in (None, device):
            return session
    return None


def session_cookie_header(raw_id: str) -> str:
    return f"{SESSION_COOKIE}={raw_id}; Path=/; Secure; HttpOnly; SameSite=Lax"


def csrf_cookie_header(value: str) -> str:
    return f"{CSRF_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Lax"


def expired_cookie_header(name: str) -> str:
    return f"{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"


def set_cookie(response: web.StreamResponse, header_value: str) -> None:
    """Add one Set-Cookie line exactly as written (aiohttp's cookie jar would re-quote it)."""
    response.headers.add("Set-Cookie", header_value)


def wants_html(headers: MultiMapping[str]) -> bool:
    """True for a browser navigation (show pages, redirect); False for scripts and APIs.

    ``Sec-Fetch-Mode`` decides when present (every current browser sends it); otherwise an
    ``Accept`` that names ``text/html`` means a browser or something acting like one.
    """
    mode = headers.get("Sec-Fetch-Mode")
    if mode is not None:
        return mode.strip().lower() == "navigate"
    return "text/html" in headers.get("Accept", "").lower()
