"""Streaming reverse proxy: pooled upstream clients, HTTP streaming, and the WebSocket bridge.

Owns the bytes between a client that the frontend has already authenticated and authorised
and the upstream application. The frontend's request handler decides *whether* to proxy and
builds the upstream headers (`headers.upstream_request_headers`); this module decides *how*:

* `UpstreamPool` keeps one aiohttp `ClientSession` per configured upstream (keep-alive pool,
  ``upstreams.<name>.connect_timeout`` / ``read_timeout``, the upstream's TLS CA), no cookie
  jar (the pool is shared by every user: a jar would hand one user's cookies to the next),
  no redirects followed, no decompression (bytes pass through exactly, ``Content-Encoding``
  and ``Content-Length`` stay true), no proxy from the environment.
* `proxy_http` streams the request body up and the response body down chunk by chunk with
  back-pressure on both legs: memory per request is a few socket buffers, whatever the size.
* `proxy_websocket` bridges a client WebSocket to an upstream WebSocket until either side
  closes or the session ends.

Every call ends with exactly one ``on_finish(ProxyOutcome)`` — whatever happened, including
cancellation — so the frontend can close its ``access.allow`` record and observe metrics.

Outcomes, as nginx users know them (``error`` is a fixed word, safe for audit and logs):

==================================  ======  ===============================================
situation                           status  ``error``
==================================  ======  ===============================================
completed                           (any)   None
target not ``/path?query``          400     ``bad_request_target``
broken chunked framing from client  400     ``bad_request_body``
TRACE / CONNECT                     405     ``method_not_allowed``
body over ``max_body``              413     ``request_too_large`` (by Content-Length before
                                            contacting the upstream, or while streaming)
client silent while uploading       408     ``client_timeout``
client gone before a response       499     ``client_disconnected`` (nginx's 499; nobody
                                            receives it)
handler cancelled (shutdown)        499     ``cancelled``
connection refused                  502     ``upstream_refused`` (immediate)
DNS / no route / other socket error 502     ``upstream_unreachable``
no connection in ``connect_timeout`` 502    ``upstream_connect_timeout`` (CONFIGURATION.md:
                                            an upstream that cannot be reached is a 502)
TLS verification failed             502     ``upstream_tls_error``
closed before response headers      502     ``upstream_disconnected``
malformed / oversized headers       502     ``upstream_bad_response``
no response in ``read_timeout``     504     ``upstream_timeout``
==================================  ======  ===============================================

WebSocket (`proxy_websocket`): 101 once bridged, then ``error`` is None for a clean close by
either side, ``session_ended`` when the session ended, ``client_disconnected`` /
``upstream_disconnected`` for a peer that vanished; before bridging, 401 ``session_ended``
(raced a logout), 400 ``not_websocket``, the upstream's own 4xx or 502
``upstream_refused_websocket`` for a refused handshake, and the 502/504 rows above.

Once the response has started the status cannot change any more: if the upstream then dies,
stalls past ``read_timeout`` or sends a broken body, the client connection is **aborted**
(never ended cleanly, so the client sees a truncated transfer, not a complete short file) and
``error`` says why (``upstream_disconnected``, ``upstream_timeout``,
``upstream_bad_response``). A client that goes away mid-stream, or stops reading for
``send_timeout`` (nginx ``send_timeout``), ends the transfer quietly with
``client_disconnected`` / ``client_timeout``: no traceback, no error log.

An idempotent request whose pooled keep-alive connection turns out to have been closed by the
upstream is retried once on a fresh connection (aiohttp does this itself, RFC 9112 section
9.3.1.1; a streamed body already partly sent is never replayed), as nginx does with
``proxy_next_upstream error``, so upstream keep-alive races do not show as 502s.

``Expect: 100-continue``: the listener's route takes `defer_continue` as its
``expect_handler``, so aiohttp no longer answers ``100 Continue`` before the handler runs;
`proxy_http` sends it when it starts passing the body on — after authentication, decide()
and the audit record, after the ``Content-Length`` check — so a client that is signed out,
refused or over the limit gets its final answer without ever being invited to send the body.

Client disconnects: aiohttp does not cancel handlers by default, so a disconnect is noticed at
the next write to the client. Run the app with ``handler_cancellation=True`` (AppRunner) to
stop waiting on a slow upstream as soon as the client is gone; both modes end quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from gatewayd.config import UpstreamSettings
from gatewayd.https.guard import PROXIED
from gatewayd.https.headers import (
    canonical_name,
    downstream_response_headers,
    websocket_subprotocols,
)
from gatewayd.tasks import within

log = logging.getLogger(__name__)

DEFAULT_SEND_TIMEOUT: Final = 60.0  # nginx send_timeout / client_body_timeout
DEFAULT_WS_MAX_MESSAGE: Final = 4 * 1024 * 1024
DEFAULT_WS_HEARTBEAT: Final = 30.0
WS_CLOSE_TIMEOUT: Final = 2.0  # how long a close handshake may take before the socket is cut
RETIRE_GRACE: Final = 5.0  # a replaced upstream stays open at least this long after a reload
_REFUSED_METHODS: Final = frozenset({"TRACE", "CONNECT"})
# Headers the client library must write itself for the upstream leg of a WebSocket.
_WS_LEG_HEADERS: Final = frozenset(
    {"connection", "upgrade", "sec-websocket-key", "sec-websocket-version",
     "sec-websocket-extensions", "sec-websocket-protocol", "sec-websocket-accept"}
)
# Close codes a peer may put in a close frame (RFC 6455 7.4.1; 1005/1006/1015 are reserved
# for reporting, never sent). Anything else received is forwarded as 1000.
_SENDABLE_CLOSE_CODES: Final = (
    frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))
)


@dataclass(frozen=True, slots=True)
class ProxyOutcome:
    """How one proxied request or WebSocket ended (see the table in the module docstring).

    status: what the client got (101 for a bridged WebSocket).
    bytes_up / bytes_down: body (or WebSocket payload) bytes client→upstream / upstream→client.
    duration: seconds from the call to the end of the transfer.
    error: None when the transfer completed, else a fixed reason word.
    """

    status: int
    bytes_up: int
    bytes_down: int
    duration: float
    error: str | None


OnFinish = Callable[[ProxyOutcome], None]
"""Called exactly once per proxied request; must not block or raise (it is logged if it does)."""

ErrorResponse = Callable[[int, str], web.StreamResponse]
"""Builds the response the gateway itself sends for ``(status, error)``: 405/408/413/502/504."""


def plain_error_response(status: int, error: str) -> web.StreamResponse:
    """Default gateway error response: short text, not cached, like nginx's error pages."""
    reason = _REASONS.get(status, "Error")
    return web.Response(
        status=status,
        text=f"{status} {reason}\n",
        headers={"Cache-Control": "no-store"},
    )


_REASONS: Final = MappingProxyType({
    400: "Bad Request", 401: "Unauthorized", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 502: "Bad Gateway", 504: "Gateway Timeout",
})


# --- the pool --------------------------------------------------------------------------------


class Upstream:
    """One configured upstream: its settings and its pooled client session.

    Obtained from `UpstreamPool.get`; pass it to `proxy_http` / `proxy_websocket`. A handle
    replaced by a reload keeps working for requests already holding it.
    """

    def __init__(self, name: str, settings: UpstreamSettings, session: aiohttp.ClientSession):
        self.name = name
        self.settings = settings
        self.session = session
        self._origin = URL(settings.url)
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        """Requests and WebSockets currently using this upstream."""
        return self._active

    def url_for(self, raw_target: str) -> URL:
        """The upstream URL for an origin-form request target (path + query), unchanged.

        ``encoded=True``: the exact bytes the policy decided on go upstream, never a
        re-encoded variant another server could read differently. Any other target form
        (absolute URL, authority, ``*``) raises ValueError: pasted after the origin it could
        name another host.
        """
        if not is_origin_form(raw_target):
            raise ValueError(f"not an origin-form request target: {raw_target[:80]!r}")
        return URL(f"{self._origin}{raw_target}", encoded=True)

    def lease(self) -> _Lease:
        """Mark one request as using this upstream (a retired upstream closes when idle)."""
        return _Lease(self)

    def _acquire(self) -> None:
        self._active += 1
        if self._active == 1:
            self._idle.clear()

    def _release(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _Lease:
    """`Upstream.lease`: a plain class rather than @contextmanager, which costs a generator
    and two extra calls on every proxied request."""

    __slots__ = ("_upstream",)

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream

    def __enter__(self) -> None:
        self._upstream._acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._upstream._release()


def is_origin_form(raw_target: str) -> bool:
    """``/path[?query]`` (RFC 9112 section 3.2.1), the only target form proxied."""
    return raw_target.startswith("/")


class UpstreamConfigError(Exception):
    """An upstream cannot be set up (e.g. its ``tls_ca_file`` is unreadable)."""


def _client_timeout(settings: UpstreamSettings) -> aiohttp.ClientTimeout:
    connect = settings.connect_timeout.total_seconds()
    return aiohttp.ClientTimeout(
        total=None,  # a 1 GiB download may take long; silence is what read_timeout limits
        connect=connect,  # includes the TLS handshake
        sock_connect=connect,
        sock_read=settings.read_timeout.total_seconds(),  # between two reads, like nginx
    )


def _ssl_context(settings: UpstreamSettings) -> ssl.SSLContext | bool:
    """Blocking (reads CA files): run in a thread."""
    if not settings.url.startswith("https://"):
        return True  # unused for http://
    try:
        return ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamConfigError(f"tls_ca_file {settings.tls_ca_file}: {exc}") from exc


def _open_session(settings: UpstreamSettings, tls: ssl.SSLContext | bool) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        ssl=tls,
        limit=0,  # like nginx: no cap that would queue users behind each other
        keepalive_timeout=15.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=_client_timeout(settings),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
        # Send only what the client sent (plus what headers.py adds): no invented
        # User-Agent, Accept or Accept-Encoding.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        raise_for_status=False,
    )


class UpstreamPool:
    """The upstreams of ``upstreams.<name>``, each with its own pooled ClientSession.

    Build with ``await UpstreamPool.open(settings.upstreams)`` inside the running loop; close
    with ``await pool.close()`` after the HTTPS listener has stopped. ``await
    pool.reconfigure(new_settings.upstreams)`` on reload: unchanged upstreams keep their
    pools; changed or removed ones are retired — requests and WebSockets already using them
    finish on the old pool, which closes when idle.
    """

    def __init__(self, tls_timeout: float = 5.0) -> None:
        self._upstreams: dict[str, Upstream] = {}
        self._retired: set[Upstream] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._tls_timeout = tls_timeout

    @classmethod
    async def open(
        cls, upstreams: Mapping[str, UpstreamSettings], *, tls_timeout: float = 5.0
    ) -> UpstreamPool:
        pool = cls(tls_timeout)
        await pool.reconfigure(upstreams)
        return pool

    def get(self, name: str) -> Upstream | None:
        """The upstream for a service name, or None if none is configured."""
        return self._upstreams.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._upstreams)

    async def reconfigure(self, upstreams: Mapping[str, UpstreamSettings]) -> None:
        """Apply new upstream settings. All-or-nothing: if any new upstream cannot be set up
        (`UpstreamConfigError`), nothing changes."""
        changed = {
            name: settings for name, settings in upstreams.items()
            if name not in self._upstreams or self._upstreams[name].settings != settings
        }
        contexts = await self._tls_contexts(changed)
        replaced = [up for name, up in self._upstreams.items()
                    if name not in upstreams or name in changed]
        for name, settings in changed.items():
            self._upstreams[name] = Upstream(name, settings, _open_session(settings,
                                                                           contexts[name]))
        for upstream in replaced:
            if self._upstreams.get(upstream.name) is upstream:
                del self._upstreams[upstream.name]
            self._retire(upstream)

    async def _tls_contexts(
        self, upstreams: Mapping[str, UpstreamSettings]
    ) -> dict[str, ssl.SSLContext | bool]:
        contexts: dict[str, ssl.SSLContext | bool] = {}
        for name, settings in upstreams.items():
            try:
                contexts[name] = await within(
                    asyncio.to_thread(_ssl_context, settings), self._tls_timeout
                )
            except TimeoutError as exc:
                raise UpstreamConfigError(f"upstreams.{name}: CA file read timed out") from exc
            except UpstreamConfigError as exc:
                raise UpstreamConfigError(f"upstreams.{name}: {exc}") from exc
        return contexts

    def _retire(self, upstream: Upstream) -> None:
        self._retired.add(upstream)
        task = asyncio.get_running_loop().create_task(
            self._close_when_idle(upstream), name=f"gatewayd-upstream-retire-{upstream.name}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, upstream: Upstream) -> None:
        # The grace covers a handler that fetched the handle just before the reload and has
        # not leased it yet.
        await asyncio.sleep(RETIRE_GRACE)
        await upstream.wait_idle()
        self._retired.discard(upstream)
        await upstream.session.close()

    async def close(self) -> None:
        """Close every pool now, retired ones included (in-flight transfers are cut)."""
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        upstreams = [*self._upstreams.values(), *self._retired]
        self._upstreams, self._retired = {}, set()
        for upstream in upstreams:
            await upstream.session.close()


# --- shared bookkeeping ----------------------------------------------------------------------


@dataclass(slots=True)
class _Progress:
    started: float
    status: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    response_started: bool = False

    def fail(self, error: str) -> None:
        if self.error is None:  # the first cause is the one worth recording
            self.error = error

    def outcome(self, now: float) -> ProxyOutcome:
        return ProxyOutcome(self.status, self.bytes_up, self.bytes_down,
                            max(0.0, now - self.started), self.error)


class _SendTimeout:
    """``send_timeout`` for every write of one response, with one timer per response.

    ``async with asyncio.timeout(t)`` around each write arms and cancels a loop timer and
    looks up the running task every time: three times for a small response (headers, body,
    end), which showed in the proxy's per-request cost. Here entering the context only writes
    down when the current write must have finished; one timer, armed once, looks at that
    deadline when it fires: if the write in progress started later, the timer waits for that
    write's own deadline; if it is overdue, it cancels the task, and leaving the context turns
    that cancellation into TimeoutError — as `asyncio.timeout` does, including leaving a
    cancellation that came from elsewhere alone. Between writes (while waiting for the
    upstream, which has its own ``read_timeout``) no deadline is set and the timer does
    nothing. Use in the task that created it; `close` when the transfer ends.
    """

    __slots__ = ("_cancelling", "_deadline", "_expired", "_handle", "_loop", "_task",
                 "_timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("_SendTimeout must be used inside a task")
        self._loop = loop
        self._task = task
        self._timeout = timeout
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False
        self._cancelling = 0

    def __enter__(self) -> None:
        self._deadline = self._loop.time() + self._timeout
        self._cancelling = self._task.cancelling()
        if self._handle is None:
            self._handle = self._loop.call_at(self._deadline, self._check)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._deadline = None
        if self._expired:
            self._expired = False
            if (self._task.uncancel() <= self._cancelling
                    and exc_type is asyncio.CancelledError):
                raise TimeoutError from exc

    def _check(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return  # between writes; the next write arms the timer again
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._check)
            return
        self._expired = True
        self._task.cancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _report(on_finish: OnFinish, progress: _Progress, loop: asyncio.AbstractEventLoop) -> None:
    try:
        on_finish(progress.outcome(loop.time()))
    except Exception:
        # The response is already on its way; a broken callback must not turn it into a 500.
        log.exception("proxy on_finish callback failed")


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort_client(request: web.BaseRequest) -> None:
    """Cut the client connection so a started response can never look complete."""
    transport = request.transport
    if transport is not None:
        transport.abort()


# Failures before the upstream's response headers, most specific first.
_PRE_RESPONSE_FAILURES: Final[tuple[tuple[type[BaseException], int, str], ...]] = (
    (aiohttp.ClientSSLError, 502, "upstream_tls_error"),
    (aiohttp.ConnectionTimeoutError, 502, "upstream_connect_timeout"),
    (TimeoutError, 504, "upstream_timeout"),  # SocketTimeoutError: read_timeout
    (aiohttp.ClientConnectorError, 502, "upstream_unreachable"),
    (aiohttp.ServerDisconnectedError, 502, "upstream_disconnected"),
    (aiohttp.ClientOSError, 502, "upstream_disconnected"),
    (aiohttp.ClientResponseError, 502, "upstream_bad_response"),
    (aiohttp.ClientPayloadError, 502, "upstream_bad_response"),
)


def _classify(exc: BaseException) -> tuple[int, str]:
    """(status, error) for a failure before the upstream's response headers arrived."""
    if (
        isinstance(exc, aiohttp.ClientConnectorError)
        and not isinstance(exc, aiohttp.ClientSSLError)
        and exc.os_error.errno == errno.ECONNREFUSED
    ):
        return 502, "upstream_refused"
    for kind, status, error in _PRE_RESPONSE_FAILURES:
        if isinstance(exc, kind):
            return status, error
    return 502, "upstream_error"


def _mid_stream_error(exc: BaseException) -> str:
    """Error word for an upstream failure after the response started."""
    if isinstance(exc, TimeoutError):
        return "upstream_timeout"
    if isinstance(exc, aiohttp.ClientPayloadError):
        # Content-Length or chunked framing not completed: the upstream stopped mid-body.
        return "upstream_disconnected"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "upstream_disconnected"
    return "upstream_bad_response"


# --- Expect: 100-continue --------------------------------------------------------------------

CONTINUE_LINE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
EXPECTATION_FAILED_TEXT: Final = "417 Expectation Failed: only 100-continue is understood.\n"


def _expects_continue(request: web.BaseRequest) -> bool:
    return request.headers.get(hdrs.EXPECT, "").strip().lower() == "100-continue"


async def defer_continue(request: web.Request) -> web.StreamResponse | None:
    """The listener route's ``expect_handler``: never answer ``100 Continue`` up front.

    aiohttp's default handler sends it before the request handler runs, which invites a
    client that is signed out, refused or over a limit to send its whole body. This one sends
    nothing: `proxy_http` sends the 100 when it starts reading the body (any other handler
    that reads one calls `send_continue` first), and every other answer (401, 403, 413…) is
    a final response without it (RFC 9110 section 10.1.1). An expectation other than
    ``100-continue`` gets 417, as from aiohttp; HTTP/1.0 has no expectations.
    """
    if request.version < HttpVersion11 or _expects_continue(request):
        return None
    response = web.Response(status=417, text=EXPECTATION_FAILED_TEXT,
                            headers={"Cache-Control": "no-store"})
    response.force_close()  # a body may follow that nobody will read
    return response


def send_continue(request: web.BaseRequest) -> None:
    """Answer a pending ``Expect: 100-continue``: the client may now send its body.

    For a handler that has decided to read the body (see `defer_continue`); call it before
    the response has started — a 1xx inside a response would corrupt it. Written straight
    to the transport, synchronously, so nothing can come between the checks and the bytes.
    Nothing is sent when body bytes have already arrived (curl stops waiting after a second
    and sends anyway; RFC 9110 section 10.1.1 lets the server leave the 100 out then).
    """
    if (not _expects_continue(request) or request.version < HttpVersion11
            or request.content.total_bytes or request.content.is_eof()):
        return
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.write(CONTINUE_LINE)


# --- HTTP ------------------------------------------------------------------------------------


class _BodyRefusedError(Exception):
    """Raised inside the request-body generator; the reason is in the progress record."""


async def _request_body(
    request: web.BaseRequest, progress: _Progress, *, max_body: int, send_timeout: float
) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as it arrives, counted against ``max_body``.
    ``progress.bytes_up`` counts what was passed on: never the chunk that crossed the limit.
    Iterated first when the upstream connection is up and the request head sent: the moment
    to answer the client's ``Expect: 100-continue``."""
    if not progress.response_started:  # an upstream may answer before it reads a body
        send_continue(request)
    while True:
        try:
            async with asyncio.timeout(send_timeout):
                chunk = await request.content.readany()
        except TimeoutError:
            progress.fail("client_timeout")
            raise _BodyRefusedError from None
        except ConnectionError:
            progress.fail("client_disconnected")
            raise _BodyRefusedError from None
        except HttpProcessingError:  # broken chunked framing, body shorter than announced
            progress.fail("bad_request_body")
            raise _BodyRefusedError from None
        if not chunk:
            return
        if progress.bytes_up + len(chunk) > max_body:
            progress.fail("request_too_large")
            raise _BodyRefusedError
        progress.bytes_up += len(chunk)
        yield chunk


_BODY_STATUS: Final = MappingProxyType({"request_too_large": 413, "client_timeout": 408,
                                        "bad_request_body": 400, "client_disconnected": 499})


async def proxy_http(
    request: web.Request,
    *,
    upstream: Upstream,
    headers: MultiMapping[str],
    max_body: int,
    on_finish: OnFinish,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    error_response: ErrorResponse = plain_error_response,
) -> web.StreamResponse:
    """Proxy one HTTP request to ``upstream``, streaming both bodies; return the response.

    request: the client's request; its method and raw target (path + query, exactly as
        received: the frontend must have refused ambiguous paths before deciding) are sent.
    upstream: from `UpstreamPool.get` for the routed service.
    headers: the upstream request headers (`headers.upstream_request_headers`).
    max_body: largest request body in bytes (``https.max_body`` or a policy ``max_upload``);
        a larger Content-Length gets 413 before the upstream is contacted, a chunked body is
        counted while streaming and cut at the limit.
    on_finish: called once with the `ProxyOutcome`, after the last byte or the failure.
    send_timeout: longest wait for the client to accept response bytes or to send more body.
    error_response: renders the gateway's own error responses (default: short text).

    The returned response has already been sent when it is the upstream's; an error response
    from ``error_response`` is returned unsent for aiohttp to send.
    """
    loop = asyncio.get_running_loop()
    progress = _Progress(started=loop.time())

    def refuse(status: int, error: str) -> web.StreamResponse:
        progress.status = status
        progress.fail(error)
        response = error_response(status, error)
        if request.body_exists and not request.content.is_eof():
            # The unread rest of the body is still on the wire: whatever renders the error,
            # this connection must not carry another request (aiohttp still drains it for
            # a while so the client can read the response, as nginx's lingering close does).
            response.force_close()
        return response

    # All in this one coroutine down to the relay: every await layer is paid per request.
    upstream._acquire()
    try:
        if request.method in _REFUSED_METHODS:
            return refuse(405, "method_not_allowed")
        if not is_origin_form(request.raw_path):
            return refuse(400, "bad_request_target")
        if request.content_length is not None and request.content_length > max_body:
            return refuse(413, "request_too_large")
        body = (_request_body(request, progress, max_body=max_body, send_timeout=send_timeout)
                if request.body_exists else None)
        try:
            upstream_response = await upstream.session.request(
                request.method, upstream.url_for(request.raw_path), headers=headers,
                data=body, allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            body_error = progress.error
            if body_error is not None and body_error in _BODY_STATUS:
                # The client's body, not the upstream, failed.
                return refuse(_BODY_STATUS[body_error], body_error)
            return refuse(*_classify(exc))
        sending = _SendTimeout(loop, send_timeout)
        try:
            return await _relay_response(request, upstream_response, sending, progress)
        finally:
            sending.close()
            if progress.error is None:
                upstream_response.release()  # fully read: the connection goes back to the pool
            else:
                upstream_response.close()  # a half-read connection is never reused
    except asyncio.CancelledError:
        progress.fail("client_disconnected" if _client_gone(request) else "cancelled")
        if not progress.response_started:
            progress.status = 499
        raise
    finally:
        upstream._release()
        _report(on_finish, progress, loop)


async def _relay_response(
    request: web.Request,
    upstream_response: aiohttp.ClientResponse,
    sending: _SendTimeout,
    progress: _Progress,
) -> web.StreamResponse:
    """Send the upstream's status and headers, then its body as it arrives.

    One coroutine for headers and body: each extra await layer is paid on every request.
    """
    response = web.StreamResponse(
        status=upstream_response.status,
        reason=upstream_response.reason,
        headers=downstream_response_headers(upstream_response.headers),
    )
    progress.status = upstream_response.status
    progress.response_started = True
    request[PROXIED] = True  # the upstream's page: its own CSP etc. stand, not the gateway's
    try:
        with sending:
            await response.prepare(request)
    except (ConnectionError, TimeoutError):
        progress.fail("client_disconnected")
        _abort_client(request)
        return response
    content = upstream_response.content
    while True:
        try:
            chunk = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            progress.fail(_mid_stream_error(exc))
            _abort_client(request)
            return response
        try:
            with sending:
                if not chunk:
                    await response.write_eof()
                    return response
                await response.write(chunk)
        except ConnectionError:
            progress.fail("client_disconnected")
            return response
        except TimeoutError:
            progress.fail("client_timeout")
            _abort_client(request)
            return response
        progress.bytes_down += len(chunk)


# --- WebSocket -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Leg:
    """One side of the bridge and what ended it."""

    name: str  # "client" | "upstream"
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
    close_code: int | None = None  # the peer's close code, if it sent a close frame
    close_message: str = ""
    failed: bool = False  # ended without a close frame (dropped, heartbeat lost, error)
    payload_bytes: int = 0  # message payload received from this leg and passed on


def _payload_size(message: aiohttp.WSMessage) -> int:
    data = message.data
    return len(data.encode("utf-8")) if isinstance(data, str) else len(data)


async def _pump(source: _Leg, sink: _Leg, on_message: Callable[[], None] | None) -> _Leg:
    """Forward messages from ``source`` to ``sink`` until ``source`` ends; return ``source``
    with what ended it. A failure to send means ``sink`` has gone."""
    while True:
        message = await source.ws.receive()
        kind = message.type
        try:
            if kind is aiohttp.WSMsgType.TEXT:
                await sink.ws.send_str(message.data)
            elif kind is aiohttp.WSMsgType.BINARY:
                await sink.ws.send_bytes(message.data)
            elif kind is aiohttp.WSMsgType.CLOSE:
                source.close_code, source.close_message = message.data, message.extra or ""
                return source
            elif kind in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                          aiohttp.WSMsgType.ERROR):
                source.failed = True
                return source
            else:  # PING/PONG are answered by autoping; nothing else reaches here
                continue
        except ConnectionError:
            sink.failed = True
            return sink
        source.payload_bytes += _payload_size(message)
        if on_message is not None:
            _notify(on_message)


def _notify(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        # Activity accounting must not tear down a user's chat.
        log.exception("proxy on_client_message callback failed")


def _sendable(code: int | None) -> int:
    return code if code in _SENDABLE_CLOSE_CODES else aiohttp.WSCloseCode.OK


async def _close(leg: _Leg, code: int, message: str) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(WS_CLOSE_TIMEOUT):
            await leg.ws.close(code=code, message=message.encode("utf-8")[:123])


def _session_close_code(reason: str) -> int:
    # A gateway restart is "going away" (clients may reconnect); any other end of the session
    # (logout, kill, expiry, policy change) is a policy decision the client must not retry.
    if reason == "shutdown":
        return aiohttp.WSCloseCode.GOING_AWAY
    return aiohttp.WSCloseCode.POLICY_VIOLATION


async def _end_bridge(
    ended: _Leg | str, client: _Leg, upstream: _Leg, progress: _Progress
) -> None:
    """Close both legs for whatever ended the bridge (a leg, or a session end reason)."""
    if isinstance(ended, str):
        progress.fail("session_ended")
        code = _session_close_code(ended)
        await asyncio.gather(_close(client, code, ended), _close(upstream, code, ended))
        return
    other = upstream if ended is client else client
    if ended.failed:
        progress.fail(f"{ended.name}_disconnected")
        code = (aiohttp.WSCloseCode.BAD_GATEWAY if ended is upstream
                else aiohttp.WSCloseCode.GOING_AWAY)
        await asyncio.gather(_close(other, code, ""), _close(ended, code, ""))
        return
    # A clean close from one side is passed on with its code and reason, then answered.
    await _close(other, _sendable(ended.close_code), ended.close_message)
    await _close(ended, _sendable(ended.close_code), "")


def _upstream_ws_headers(headers: MultiMapping[str]) -> CIMultiDict[str]:
    return CIMultiDict(
        (name, value) for name, value in headers.items()
        if canonical_name(name) not in _WS_LEG_HEADERS
    )


async def proxy_websocket(
    request: web.Request,
    *,
    upstream: Upstream,
    headers: MultiMapping[str],
    session_ended: asyncio.Future[str],
    on_finish: OnFinish,
    on_client_message: Callable[[], None] | None = None,
    max_message_size: int = DEFAULT_WS_MAX_MESSAGE,
    heartbeat: float = DEFAULT_WS_HEARTBEAT,
    error_response: ErrorResponse = plain_error_response,
) -> web.StreamResponse:
    """Bridge the client's WebSocket to the upstream's until one side closes or the session
    ends; return the (already finished) client WebSocket response.

    The upstream handshake happens first, so a refused or failing upstream gives the client a
    plain 502/504 (or the upstream's own 4xx refusal), never an open socket that dies. Each
    leg does its own handshake (key, extensions); the subprotocol the upstream picks from the
    client's offer is the one the client gets. Messages are relayed with back-pressure, pings
    are answered per leg, ``heartbeat`` pings detect dead peers (instead of an idle timeout:
    a quiet chat is not a dead chat), close codes and reasons are passed through.

    session_ended: a future the frontend resolves with the session's end reason; the bridge
        then closes both legs with 1008 and that reason (1001 for ``"shutdown"``). Glue::

            ended = asyncio.get_running_loop().create_future()
            remove = session.add_closer(lambda r: ended.done() or ended.set_result(r))
            try:
                return await proxy_websocket(request, ..., session_ended=ended, ...)
            finally:
                remove()

    on_client_message: called per message the client sends (user activity: e.g. touch the
        session so a user active only in chat is not logged out as idle).
    headers: as for `proxy_http`; handshake headers in it are ignored.
    """
    loop = asyncio.get_running_loop()
    progress = _Progress(started=loop.time())
    try:
        with upstream.lease():
            return await _proxy_websocket(
                request, upstream=upstream, headers=headers, session_ended=session_ended,
                on_client_message=on_client_message, max_message_size=max_message_size,
                heartbeat=heartbeat, error_response=error_response, progress=progress,
            )
    except asyncio.CancelledError:
        progress.fail("client_disconnected" if _client_gone(request) else "cancelled")
        if not progress.response_started:
            progress.status = 499
        raise
    finally:
        _report(on_finish, progress, loop)


def _websocket_refusal(
    request: web.Request, session_ended: asyncio.Future[str]
) -> tuple[int, str] | None:
    """Why the gateway refuses this upgrade before contacting the upstream, if it does."""
    if session_ended.done():
        return 401, "session_ended"  # raced a logout: the client must log in again
    if not is_origin_form(request.raw_path):
        return 400, "bad_request_target"
    if not web.WebSocketResponse().can_prepare(request).ok:
        return 400, "not_websocket"
    return None


async def _proxy_websocket(
    request: web.Request,
    *,
    upstream: Upstream,
    headers: MultiMapping[str],
    session_ended: asyncio.Future[str],
    on_client_message: Callable[[], None] | None,
    max_message_size: int,
    heartbeat: float,
    error_response: ErrorResponse,
    progress: _Progress,
) -> web.StreamResponse:
    def refuse(status: int, error: str) -> web.StreamResponse:
        progress.status = status
        progress.fail(error)
        return error_response(status, error)

    refusal = _websocket_refusal(request, session_ended)
    if refusal is not None:
        return refuse(*refusal)
    try:
        upstream_ws = await upstream.session.ws_connect(
            upstream.url_for(request.raw_path),
            headers=_upstream_ws_headers(headers),
            protocols=websocket_subprotocols(request.headers),
            autoclose=False, autoping=True, heartbeat=heartbeat, max_msg_size=max_message_size,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WS_CLOSE_TIMEOUT),
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The upstream's own refusal (401/403/404) is more useful than a generic 502.
        status = exc.status if 400 <= exc.status < 500 else 502
        return refuse(status, "upstream_refused_websocket")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return refuse(*_classify(exc))
    async with upstream_ws:
        client_ws = web.WebSocketResponse(
            protocols=(upstream_ws.protocol,) if upstream_ws.protocol else (),
            autoclose=False, autoping=True, heartbeat=heartbeat, max_msg_size=max_message_size,
        )
        request[PROXIED] = True
        try:
            await client_ws.prepare(request)
        except ConnectionError:
            progress.fail("client_disconnected")
            progress.status = 499
            return client_ws
        progress.status = 101
        progress.response_started = True
        await _bridge(_Leg("client", client_ws), _Leg("upstream", upstream_ws),
                      session_ended, on_client_message, progress)
    return client_ws


async def _bridge(
    client: _Leg,
    upstream: _Leg,
    session_ended: asyncio.Future[str],
    on_client_message: Callable[[], None] | None,
    progress: _Progress,
) -> None:
    up = asyncio.create_task(_pump(client, upstream, on_client_message), name="gatewayd-ws-up")
    down = asyncio.create_task(_pump(upstream, client, None), name="gatewayd-ws-down")
    tasks: set[asyncio.Future[object]] = {up, down, session_ended}  # type: ignore[arg-type]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if session_ended in done:
            ended: _Leg | str = (
                "ended" if session_ended.cancelled() else session_ended.result()
            )
        else:
            ended = (up if up in done else down).result()
        await _end_bridge(ended, client, upstream, progress)
    except asyncio.CancelledError:
        await asyncio.gather(_close(client, aiohttp.WSCloseCode.GOING_AWAY, ""),
                             _close(upstream, aiohttp.WSCloseCode.GOING_AWAY, ""))
        raise
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        progress.bytes_up, progress.bytes_down = client.payload_bytes, upstream.payload_bytes
