"""The HTTPS frontend: the aiohttp application, its endpoints, and the TLS listener.

Owns the request pipeline of the HTTPS listener and its lifecycle:

1. `guard.guarded` — nothing unexpected reaches a client as a traceback, and the whole
   request head is within ``https.max_header_size``;
2. the caller — the device certificate of this connection (`tls.ConnectionDevices`: read once
   per connection, revocation checked per request) and the session of the cookie
   (`auth.resolve_session`, the Cookie headers parsed once per request), touched as activity;
3. dispatch on the exact raw path: the gateway's own endpoints (table below, anything else
   under ``/.gatewayd/`` that the policy does not route is a 404 like any unrouted path), else
   the protected flow (`flow.RequestFlow`) for a session, or the sign-in redirect / 401 JSON.

These steps run in one handler behind one catch-all route, not as aiohttp middlewares: each
middleware layer costs an await on every request (see `guard.guarded`).

=============================== ============ ====================================================
path                            methods      what
=============================== ============ ====================================================
``/``                           GET          portal (session)
``/.gatewayd/login``            GET, POST    sign-in form / submit (`login`)
``/.gatewayd/stepup``           GET, POST    fresh-code form / submit (session)
``/.gatewayd/logout``           GET, POST    confirmation / sign-out
``/.gatewayd/userinfo``         GET          JSON: user, groups, device, timeouts (session)
``/.gatewayd/jwks.json``        GET          the assertion JWT's public keys (public)
``/.gatewayd/assets/gatewayd.css`` GET       the pages' stylesheet (public)
``/.gatewayd/ssh/certificate``  POST         an SSH user certificate for a public key (`sshcert`)
``/.gatewayd/admin/…``          GET, POST    the audit console (`console`; policy service ``admin``)
=============================== ============ ====================================================

**Connections.** The listener accepts on its own socket (not aiohttp's ``TCPSite``) so that
``https.max_connections`` and ``max_connections_per_source`` are checked at accept, before
the TLS handshake (`gatewayd.ssh.admission.Admission`, the SSH listener's code): a flood
costs an ``accept()`` and a ``close()``. An admitted connection holds its slot until it
closes (or its handshake fails).

**Drain** (`begin_drain`, SIGTERM): the socket closes; open WebSockets close with 1001
"going away" (a browser reconnects, to another node behind the balancer); requests in flight
run on (`in_flight` counts them, the Gateway waits up to ``gateway.shutdown_grace``); a new
request on a kept-alive connection gets 503 with ``Retry-After`` and ``Connection: close``.

Dispatch compares the raw path exactly (no decoding, no trailing-slash repair): an encoded
spelling of a gateway endpoint is not that endpoint, it is a path for the policy to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from gatewayd.certs import DeviceIdentity
from gatewayd.https import pages
from gatewayd.https.auth import remember_cookies, resolve_session, wants_html
from gatewayd.https.console import CONSOLE_PREFIX, AuditConsole, ConsoleContext
from gatewayd.https.context import FrontendContext
from gatewayd.https.csrf import CsrfTokens
from gatewayd.https.flow import (
    Channels,
    RequestFlow,
    audit_refuses,
    error_page,
    respond,
    unavailable,
)
from gatewayd.https.guard import GuardedAppRunner, add_security_headers, guarded
from gatewayd.https.headers import SESSION_COOKIE
from gatewayd.https.login import AuthPages, query_value
from gatewayd.https.portal import portal_entries
from gatewayd.https.proxy import defer_continue
from gatewayd.https.redirects import safe_next
from gatewayd.https.sshcert import SshCertificates
from gatewayd.https.tls import ConnectionDevices, DeviceRevokedError, ServerContext
from gatewayd.sessions import Session
from gatewayd.ssh.admission import Admission
from gatewayd.state.store import StateUnavailable
from gatewayd.tasks import cancel_and_wait

log = logging.getLogger(__name__)

USERINFO_PATH: Final = "/.gatewayd/userinfo"
JWKS_PATH: Final = "/.gatewayd/jwks.json"
RECHECK_INTERVAL: Final = 10.0  # seconds between re-decisions of open WebSockets
# aiohttp bounds each header line (and the request line) itself; the whole head is bounded by
# https.max_header_size in guard.guarded.
MAX_REQUEST_LINE: Final = 8190
MAX_HEADERS: Final = 100
# Allocations between two young-generation collections while serving (CPython's default is
# 700); see `tune_gc_for_serving`.
SERVING_GC_THRESHOLD: Final = 7000
HANDSHAKE_TIMEOUT: Final = 10.0  # seconds a TLS handshake may take before the socket closes
CLOSE_WAIT: Final = 2.0  # seconds `close` gives requests still running (after the drain)
DRAIN_RETRY_AFTER: Final = 10  # seconds a browser is told to wait during a drain
LISTEN_BACKLOG: Final = 512


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector cheap for a long-running proxy. Process-wide.

    Measured under load (bench/README.md): with CPython's defaults the collector took about
    a tenth of gatewayd's CPU per proxied request, and each full collection paused the loop
    for tens of milliseconds. Two reasons. (1) Full collections walk every object of the
    process, and a gateway holds many more than a bare proxy (configuration, policy,
    libraries) — objects that live as long as the process. ``gc.freeze()`` moves what exists
    once the node is up out of the collector's sight; reference counting still frees those
    objects, only cycles among them would outlive their use. (2) Every request allocates a
    few hundred container objects, so the young generation filled every dozen requests and
    promoted the objects of the requests still in flight; a larger first threshold lets most
    of them die young. Frozen at most once per process (a test process starts many
    frontends), after a collection so no garbage is made immortal.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
    young, middle, old = gc.get_threshold()
    if young < SERVING_GC_THRESHOLD:
        gc.set_threshold(SERVING_GC_THRESHOLD, middle, old)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent this request: the verified device of the connection and the live session."""

    session: Session | None
    device: DeviceIdentity | None


Endpoint = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


class _Counted(asyncio.Protocol):
    """aiohttp's per-connection protocol, plus a call of ``release`` when the connection is
    gone (its `Admission` slot). Only delegates: aiohttp does all the work."""

    __slots__ = ("_inner", "_release")

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release = release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._release()


class HttpsFrontend:
    """The HTTPS listener of one gateway. `start` / `stop_accepting` / `close`."""

    def __init__(self, ctx: FrontendContext, *, console: ConsoleContext | None = None) -> None:
        self._ctx = ctx
        self.csrf = CsrfTokens(clock=ctx.clock)
        self.channels = Channels()
        self._flow = RequestFlow(ctx, self.channels)
        # The audit console below /.gatewayd/admin/ (`console`): given the gateway's admin
        # kill record (`ConsoleContext`); without it those paths are ordinary policy paths.
        self._console = AuditConsole(console, self.csrf) if console is not None else None
        self._auth = AuthPages(ctx, self.csrf)
        self._ssh_certs = SshCertificates(ctx, self.csrf)
        self._runner: GuardedAppRunner | None = None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        https = ctx.settings.https
        self.admission = Admission.for_https(
            total=https.max_connections, per_source=https.max_connections_per_source,
            registry=ctx.metrics.registry)
        self.in_flight = 0  # requests being handled now (the drain waits for them)
        self.draining = False
        self._recheck: asyncio.Task[None] | None = None
        self._device_certs = True  # until start() knows whether the TLS context asks
        self._devices = ConnectionDevices()  # each connection's certificate, read once
        # Multi-node (gatewayd.sessions_shared): cookies of sessions another node made, or
        # that Redis must re-confirm, are fetched before the synchronous lookup. One node has
        # no such step: its lookup stays a dict lookup.
        self._prepare_sessions: Callable[[Iterable[str]], Awaitable[None]] | None = getattr(
            ctx.sessions, "prepare", None)
        self._endpoints: dict[str, dict[str, Endpoint]] = {
            pages.PORTAL_PATH: {"GET": self._portal},
            pages.LOGIN_PATH: {"GET": self._login_form, "POST": self._login_submit},
            pages.STEPUP_PATH: {"GET": self._stepup_form, "POST": self._stepup_submit},
            pages.LOGOUT_PATH: {"GET": self._logout_form, "POST": self._logout_submit},
            USERINFO_PATH: {"GET": self._userinfo},
            JWKS_PATH: {"GET": self._jwks},
            pages.STYLESHEET_PATH: {"GET": self._stylesheet},
            pages.SSH_CERTIFICATE_PATH: {"POST": self._ssh_certs.handle},
        }

    # --- lifecycle -----------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(add_security_headers)
        app.router.add_route("*", "/{tail:.*}", guarded(
            self._counted_dispatch, max_header_size=self._ctx.settings.https.max_header_size,
            too_large=self._headers_too_large, server_error=self._server_error,
        ), expect_handler=defer_continue)  # 100 Continue only once allowed: see proxy.py
        return app

    async def start(self, ssl_context: ssl.SSLContext) -> int:
        """Listen on ``https.listen``; returns the bound port (for port 0)."""
        settings = self._ctx.settings
        # The drain has waited for requests already; `close` gives stragglers CLOSE_WAIT.
        runner = GuardedAppRunner(
            self.build_app(), access_log=None, shutdown_timeout=CLOSE_WAIT,
            max_line_size=MAX_REQUEST_LINE, max_headers=MAX_HEADERS,
            max_field_size=settings.https.max_header_size,
        )
        await runner.setup()
        listen = settings.https.listen
        try:
            family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
            sock = socket.create_server((listen.host, listen.port), family=family,
                                        backlog=LISTEN_BACKLOG)
        except BaseException:
            with contextlib.suppress(Exception):
                await runner.cleanup()
            raise
        sock.setblocking(False)
        self._runner, self._sock = runner, sock
        # The connection's certificate is only worth reading when the handshake asked for one.
        self._device_certs = ssl_context.verify_mode != ssl.CERT_NONE
        loop = asyncio.get_running_loop()
        self._accepting = loop.create_task(self._accept_forever(sock, ssl_context),
                                           name="gatewayd.https.accept")
        self._recheck = loop.create_task(self._recheck_forever(),
                                         name="gatewayd.https.websocket-recheck")
        tune_gc_for_serving()  # the HTTPS listener is the last thing a node starts
        return int(sock.getsockname()[1])

    async def _accept_forever(self, sock: socket.socket, ssl_context: ssl.SSLContext) -> None:
        await self.admission.accept_forever(
            sock, lambda conn, source: self._serve(conn, source, ssl_context),
            self._handshakes, "gatewayd.https.handshake")

    async def _serve(self, conn: socket.socket, source: str, ssl_context: ssl.SSLContext
                     ) -> None:
        """TLS handshake of one admitted connection, then aiohttp serves it; the admission
        slot is released when the connection closes, or here if the handshake fails."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release(source)

        runner = self._runner
        if runner is None or runner.server is None:
            conn.close()
            release()
            return
        server = runner.server
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Counted(server(), release), sock=conn, ssl=ssl_context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except asyncio.CancelledError:
            conn.close()
            release()
            raise
        except Exception as exc:  # a failed handshake closes the socket; nothing to serve
            log.debug("https connection from %s failed its handshake: %s", source, exc)
            conn.close()
            release()
            if isinstance(exc, ssl.SSLCertVerificationError) \
                    and isinstance(ssl_context, ServerContext):
                ssl_context.report_refusal(exc, source)  # audited, with the address

    async def stop_accepting(self) -> None:
        """Close the listening socket; requests in flight continue (see `close`)."""
        task, self._accepting = self._accepting, None
        if task is not None:
            await cancel_and_wait([task])
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def begin_drain(self) -> None:
        """SIGTERM: stop accepting, close WebSockets (1001), answer new requests 503."""
        self.draining = True
        await self.stop_accepting()
        closed = self.channels.close_all("shutdown")
        if closed:
            log.info("closed %d WebSocket(s) for the shutdown", closed)

    async def close(self) -> None:
        """Release everything: handshakes, the recheck, connections (CLOSE_WAIT for requests
        still running — the Gateway's drain has waited ``gateway.shutdown_grace`` already)."""
        await self.stop_accepting()
        tasks, self._handshakes = self._handshakes, set()
        task, self._recheck = self._recheck, None
        if task is not None:
            tasks.add(task)
        await cancel_and_wait(tasks)
        if self._console is not None:  # exports still streaming end with their marker line
            self._console.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def policy_changed(self) -> int:
        """Re-decide every open WebSocket now (after a reload); returns how many closed."""
        return self.channels.recheck(self._ctx.policy, self._ctx.wall_clock(), self._ctx.clock())

    async def _recheck_forever(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_INTERVAL)
            try:
                self.policy_changed()
            except Exception:  # keep rechecking; one bad round must not end the task
                log.exception("WebSocket policy recheck failed")

    # --- pipeline ------------------------------------------------------------------------

    def _caller(self, request: web.Request) -> Caller:
        """Raises DeviceRevokedError when the connection's device certificate is now revoked."""
        device = None
        if self._device_certs:
            transport = request.transport
            device = self._devices.device(transport.get_extra_info("ssl_object")
                                          if transport is not None else None)
        candidates = remember_cookies(request).get(SESSION_COOKIE)
        session = None
        if candidates:
            session = resolve_session(self._ctx.sessions, candidates,
                                      device.device_id if device else None)
            if session is not None:
                self._ctx.sessions.touch(session)
        return Caller(session, device)

    async def _counted_dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return self._shutting_down(request)
        self.in_flight += 1
        try:
            return await self._dispatch(request)
        finally:
            self.in_flight -= 1

    def _shutting_down(self, request: web.Request) -> web.StreamResponse:
        """A request that arrived during the drain: come back soon (to another node, or to
        this one once it has restarted); this connection closes after the answer."""
        response = respond(request, 503, title="The gateway is restarting",
                           message="The gateway is shutting down; try again in a moment.",
                           error="shutting_down")
        response.headers["Retry-After"] = str(DRAIN_RETRY_AFTER)
        response.force_close()
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if self._prepare_sessions is not None:
            try:
                await self._prepare_sessions(remember_cookies(request).get(SESSION_COOKIE, ()))
            except StateUnavailable:  # cannot tell whether the session still exists
                return error_page(request, 503, "state_unavailable")
        try:
            caller = self._caller(request)
        except DeviceRevokedError as revoked:
            return self._device_revoked(request, str(revoked))
        path = request.raw_path.partition("?")[0]
        endpoint = self._endpoints.get(path)
        if endpoint is None:
            if caller.session is None:
                return self._login_required(request)
            return await self._protected(request, path, caller.session, caller.device)
        method = "GET" if request.method == "HEAD" else request.method
        handler = endpoint.get(method)
        if handler is None:
            response = error_page(request, 405, "method_not_allowed")
            allowed = set(endpoint) | ({"HEAD"} if "GET" in endpoint else set())
            response.headers["Allow"] = ", ".join(sorted(allowed))
            return response
        return await handler(request, caller)

    def _protected(self, request: web.Request, path: str, session: Session,
                   device: DeviceIdentity | None) -> Awaitable[web.StreamResponse]:
        """The audit console or the proxied flow. Not a coroutine itself: the caller awaits
        the one it hands back (one await layer less on every proxied request)."""
        if self._console is not None and path.startswith(CONSOLE_PREFIX):
            return self._console.handle(request, session, device)
        return self._flow.handle(request, session, device)

    def _login_required(self, request: web.Request) -> web.StreamResponse:
        """No session: a browser goes to the sign-in page, anything else gets 401 JSON."""
        navigating = request.method in ("GET", "HEAD")
        next_path = safe_next(request.raw_path) if navigating else pages.PORTAL_PATH
        target = pages.login_url(next_path)
        if wants_html(request.headers):
            return web.Response(status=302 if navigating else 303, headers={"Location": target})
        response = web.json_response(
            {"error": "unauthenticated", "message": "Sign in first.", "login_url": target},
            status=401,
        )
        response.headers["WWW-Authenticate"] = f'Gatewayd realm="gatewayd", login="{target}"'
        return response

    def _device_revoked(self, request: web.Request, device: str) -> web.StreamResponse:
        """The device was revoked after this connection's handshake: answer once, then close
        the connection (a new one fails the handshake against the current list)."""
        log.info("refused a request on a connection of revoked device %s", device)
        response = respond(request, 403, title="Device revoked",
                           message="This device's certificate has been revoked. "
                                   "Contact the help desk.", error="device_revoked")
        response.force_close()
        return response

    async def _server_error(self, request: web.Request) -> web.StreamResponse:
        return error_page(request, 500, "internal_error")

    async def _headers_too_large(self, request: web.Request) -> web.StreamResponse:
        return error_page(request, 431, "headers_too_large")

    # --- endpoints -----------------------------------------------------------------------

    async def _portal(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        session = caller.session
        if session is None:
            return self._login_required(request)
        if audit_refuses(self._ctx):
            return unavailable(request)
        ctx = self._ctx
        entries = portal_entries(
            ctx.policy, session=session, device=caller.device, source_ip=request.remote or "",
            host=request.headers.get("Host"), now=ctx.wall_clock(),
            mfa_age=session.mfa_age(ctx.clock()), configured=ctx.upstreams.names(),
        )
        body = pages.portal_page(
            user=session.user, display_name=session.principal.attributes.get("display_name"),
            entries=entries, device=caller.device.device_id if caller.device else None,
            logout_token=self.csrf.issue("logout", session.handle),
            ssh=self._ssh_certs.portal_section(request, session, caller.device),
        )
        return web.Response(text=body, content_type="text/html")

    async def _login_form(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        return await self._auth.login_form(request, caller.session)

    async def _login_submit(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        if audit_refuses(self._ctx):
            return unavailable(request)
        return await self._auth.login_submit(request, caller.session, caller.device)

    async def _stepup_form(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        if caller.session is None:
            return self._login_required_for_stepup(request)
        return await self._auth.stepup_form(request, caller.session)

    async def _stepup_submit(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        if caller.session is None:
            return self._login_required_for_stepup(request)
        if audit_refuses(self._ctx):
            return unavailable(request)
        return await self._auth.stepup_submit(request, caller.session, caller.device)

    def _login_required_for_stepup(self, request: web.Request) -> web.StreamResponse:
        """Signed out meanwhile: sign in (a full login is a fresh MFA), then go on."""
        next_path = safe_next(query_value(request, "next"))
        target = pages.login_url(next_path)
        if wants_html(request.headers):
            return web.Response(status=303, headers={"Location": target})
        return web.json_response({"error": "unauthenticated", "login_url": target}, status=401)

    async def _logout_form(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        return await self._auth.logout_form(request, caller.session)

    async def _logout_submit(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        return await self._auth.logout_submit(request, caller.session)

    async def _userinfo(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        session = caller.session
        if session is None:
            return self._login_required(request)
        now = self._ctx.clock()
        registry = self._ctx.sessions
        idle_left = registry.idle_timeout - (now - session.last_seen)
        absolute_left = registry.absolute_timeout - (now - session.created)
        return web.json_response({
            "user": session.user,
            "groups": sorted(session.principal.groups),
            "device": caller.device.device_id if caller.device else None,
            "device_user": caller.device.user if caller.device else None,
            "session": session.handle,
            "mfa_age_seconds": round(session.mfa_age(now)),
            "idle_timeout_seconds": round(max(0.0, idle_left)),
            "expires_in_seconds": round(max(0.0, absolute_left)),
        })

    async def _jwks(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        response = web.json_response(self._ctx.signer.jwks())
        response.headers["Cache-Control"] = "public, max-age=300"
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    async def _stylesheet(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        response = web.Response(text=pages.STYLESHEET, content_type="text/css")
        response.headers["Cache-Control"] = "public, max-age=3600"
        return response
