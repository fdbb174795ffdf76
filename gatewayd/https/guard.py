"""The HTTPS listener's outer guard: limits, security headers, and no 500 for bad input.

Owns everything that happens to a request before and after the gateway's own logic:

* **Parser errors** (a malformed request line or header, a header line over the limit, too
  many headers) are answered by aiohttp before any middleware runs, as a 400 and with a
  logged traceback. `GuardedAppRunner` installs a request handler that answers them with
  **431** (header too large / too many) or **400**, a fixed text body that echoes nothing
  back, and one log line without a traceback — a client's garbage is not a server error.
* **Header size** (`guarded`): aiohttp bounds each header line; the *total* size of the
  request head is bounded here by ``https.max_header_size`` (431).
* **Unexpected exceptions** (`guarded`): logged once with the traceback (that is a bug),
  answered with a generic 500 page that shows nothing internal; a client that went away
  mid-request is not logged as an error at all.
* **No stack versions** (`add_security_headers`, `_GuardedRequestHandler`): aiohttp stamps
  ``Server: Python/3.x aiohttp/3.y`` on every response it prepares; the gateway answers
  ``Server: gatewayd`` instead, without a version (nginx's ``server_tokens off``). That holds
  for proxied responses too: `headers.downstream_response_headers` already drops the
  upstream's own ``Server`` (as nginx and Envoy do), so the only value left to replace is
  aiohttp's.
* **Security headers** (`add_security_headers`, an ``on_response_prepare`` hook): every
  gateway page gets HSTS (one year), a script-free CSP with ``frame-ancestors 'none'``,
  ``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy``,
  ``Cross-Origin-Opener-Policy`` and ``Cache-Control: no-store`` — a page behind the login
  must never come back from the browser cache after sign-out. Proxied responses are the
  upstream's own; they get HSTS, and ``Cache-Control: no-store`` only when the upstream said
  nothing about caching (what it serves is per user).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import Final

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

PROXIED: Final = web.RequestKey("gatewayd.proxied", bool)  # the response is the upstream's

HSTS: Final = "max-age=31536000"
CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
GATEWAY_PAGE_HEADERS: Final = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), payment=()"),
)
NO_STORE: Final = "no-store"
SERVER_NAME: Final = "gatewayd"  # what the listener calls itself: no version, no stack

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# --- security headers -------------------------------------------------------------------------


def _hsts_applies(request: web.Request) -> bool:
    """HSTS for every name but ``localhost``: a browser that pinned HTTPS for localhost would
    break every other development server on that machine (IP literals are ignored by
    browsers anyway, RFC 6797 section 8.1)."""
    return _hsts_applies_to(request.headers.get("Host", ""))


# Every response asks this of the same few Host values; bounded, the header is client input.
@functools.lru_cache(maxsize=256)
def _hsts_applies_to(host_header: str) -> bool:
    host = (host_header.rpartition(":")[0] or host_header).lower().rstrip(".")
    return not (host == "localhost" or host.endswith(".localhost"))


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    # aiohttp has set its own Server (setdefault) just before this hook runs.
    if headers.get("Server", SERVER_SOFTWARE) == SERVER_SOFTWARE:
        headers["Server"] = SERVER_NAME
    if _hsts_applies(request):
        headers.setdefault("Strict-Transport-Security", HSTS)
    if request.get(PROXIED):
        if "Cache-Control" not in headers and "Expires" not in headers:
            headers["Cache-Control"] = NO_STORE
        return
    headers.update(GATEWAY_PAGE_HEADERS)  # each replaces any value of that name, in one call
    if "Cache-Control" not in headers:
        headers["Cache-Control"] = NO_STORE
        headers["Pragma"] = "no-cache"


# --- middlewares ------------------------------------------------------------------------------


def request_head_size(request: web.BaseRequest) -> int:
    """Bytes of the request line plus header lines, as they came over the wire (near enough)."""
    line = len(request.method) + len(request.raw_path) + len("  HTTP/1.1\r\n")
    raw = request.raw_headers
    # ": " and CRLF per header line; the lengths summed in C rather than a generator.
    return line + sum(map(len, itertools.chain.from_iterable(raw))) + 4 * len(raw) + 2


def guarded(handler: Handler, *, max_header_size: int, too_large: Handler,
            server_error: Handler) -> Handler:
    """``handler`` behind the head-size limit and the catch-all for unexpected errors.

    What the HTTPS listener routes every request to: one coroutine, not two aiohttp
    middlewares, which would cost a coroutine and a partial each, plus the extra one aiohttp
    adds to any application that has middlewares — a measurable share of a proxied request.
    """

    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        try:
            if request_head_size(request) > max_header_size:
                return await too_large(request)
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except (ConnectionResetError, BrokenPipeError):
            return _client_went_away(request)
        except Exception:
            return await _unexpected_error(request, server_error)

    return guarded_handler


def _client_went_away(request: web.Request) -> web.StreamResponse:
    # The client went away; nobody is left to answer, and it is not our failure.
    log.debug("client disconnected during %s", request.method)
    return web.Response(status=499)


async def _unexpected_error(request: web.Request, server_error: Handler) -> web.StreamResponse:
    """Log the exception being handled (a bug) with its traceback; answer generically."""
    log.exception("unexpected error in the HTTPS frontend (method %s)", request.method)
    return await server_error(request)


# --- parser errors ----------------------------------------------------------------------------

PARSER_ERROR_BODIES: Final = MappingProxyType({
    400: "400 Bad Request: the request could not be read.\n",
    431: "431 Request Header Fields Too Large: the request headers are too large.\n",
})


def parser_error_status(exc: BaseException | None) -> int:
    """431 for a header line over the limit or too many headers; 400 for anything else."""
    if isinstance(exc, LineTooLong):
        return 431
    if isinstance(exc, HttpProcessingError) and "Too many headers" in str(exc.message):
        return 431
    return 400


class _GuardedRequestHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            # The application's on_response_prepare hook does not run for these.
            fallback = super().handle_error(request, status, exc, message)
            fallback.headers["Server"] = SERVER_NAME
            return fallback
        status = parser_error_status(exc)
        log.info("refused an unreadable request from %s: %s", request.remote, status)
        if request.writer.output_size > 0:  # same rule as aiohttp: too late to answer
            raise ConnectionError("response already started")
        response = web.Response(status=status, text=PARSER_ERROR_BODIES[status])
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = NO_STORE
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class _GuardedServer(web.Server):
    def __call__(self) -> RequestHandler:
        # web.Server keeps its loop and handler options in private attributes; this mirrors
        # web.Server.__call__ with our handler class.
        return _GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors with 400/431 (see module doc)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )
