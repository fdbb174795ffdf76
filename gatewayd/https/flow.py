"""The per-request flow of an authenticated request: route → check origin → decide → record
→ act.

Owns what happens between "this request belongs to session S" and "the upstream's bytes are
flowing" (DESIGN.md, data flow of one HTTPS request)::

    policy.http_service_for(Host, raw path)            which service (None: no route / ambiguous)
    csrf.cross_origin_reason                            writes and WebSocket upgrades only: a
                                                        browser request from another origin
                                                        (sibling subdomains included) is a 403
                                                        ``cross_origin`` before decide()
    AccessRequest(user, groups, attributes, device,    everything decide() may look at; the
                  device_user, "https", service, host,  device is the one verified on *this*
                  method, raw path, source, now,        connection, mfa_age comes from the
                  mfa_age)                              session
    decide(policy, request)                             pure; an exception here is a deny
    metrics + audit                                     access.deny / access.step_up always,
                                                        access.allow for writes (or all)
    deny page (403/404/400) | step-up | proxy           obligations: read_only → 403 for a
                                                        write or a WebSocket, max_upload →
                                                        the proxy's 413

Audited requests (writes and WebSockets; every request with ``audit.http_requests = "all"``)
are recorded twice. ``access.allow`` is written *before* the first byte goes upstream: if it
cannot be written and ``audit.on_failure = "deny"``, the request is refused with 503 and never
proxied, so no write reaches an upstream unrecorded, and a crash mid-transfer still leaves the
record. ``access.end`` is written when the transfer ends, with status, bytes, duration and the
proxy's error word if it failed (best effort: the write has happened by then). Every record
names the address of *this* request's connection (the session may have started elsewhere)
and the device of the session. Paths are audited without their query string (queries carry
tokens and personal data; the audit log is kept for years and cannot be edited).

``Expect: 100-continue`` is answered only once the request has been authenticated, decided,
allowed and recorded (`proxy.defer_continue` on the route, `proxy.proxy_http` when it starts
reading the body): a client that is signed out or refused never gets invited to send its body.

A proxied HTTP request is tied to its session while it runs (`_cut_on_session_end`): a kill,
logout or expiry cuts a long download or upload at once instead of letting it finish.
WebSockets are tied to their session (`Channels`): the session's end (logout, kill, expiry,
shutdown) closes them through the session's closers, and `Channels.recheck` re-decides every
open socket against the current policy and clock — after a reload and periodically, so a
rule that now denies (a new deny rule, the approval system's closing hour) closes the socket
within seconds. Only a *deny* closes a socket: a rule's MFA freshness is checked when the
socket opens, as for any other request.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from multidict import MultiMapping

from gatewayd.audit import AuditWriteError
from gatewayd.https import pages
from gatewayd.https.auth import wants_html
from gatewayd.https.context import FrontendContext
from gatewayd.https.csrf import cross_origin_reason, public_origins
from gatewayd.https.headers import (
    is_websocket_upgrade,
    public_authority,
    upstream_request_headers,
)
from gatewayd.https.proxy import (
    ProxyOutcome,
    Upstream,
    proxy_http,
    proxy_websocket,
)
from gatewayd.https.redirects import safe_next
from gatewayd.policy import READ_METHODS, AccessRequest, Decision, Policy, decide
from gatewayd.policy.paths import AmbiguousPathError, normalize_path, strip_query
from gatewayd.sessions import Session

if TYPE_CHECKING:
    from gatewayd.certs import DeviceIdentity

log = logging.getLogger(__name__)

FRONTEND: Final = "https"
INTERNAL_ERROR_DECISION: Final = Decision("deny", None, "internal error while deciding")
CROSS_ORIGIN: Final = "cross_origin"  # the access.deny reason of a refused cross-origin write


def audit_refuses(ctx: FrontendContext) -> bool:
    """Fail closed: with ``audit.on_failure = "deny"`` nothing new happens unrecorded."""
    return ctx.settings.audit.on_failure == "deny" and not ctx.audit.healthy


def session_fields(session: Session, device: DeviceIdentity | None) -> dict[str, object]:
    """The audit context of a session: who, from where it signed in, on which device.

    The device is the one verified on this connection, else the one the session is bound to:
    every record of a device's session names the device.
    """
    return {
        "frontend": FRONTEND,
        "user": session.user,
        "source_ip": session.source_ip,
        "session": session.handle,
        "device": device.device_id if device is not None else session.device,
    }


def audit_fields(request: web.Request, session: Session, device: DeviceIdentity | None,
                 service: str | None) -> dict[str, object]:
    """The audit context of one request: the session's fields, but ``source_ip`` of this
    request's connection (not the address the session signed in from), the service, method
    and path (without the query: it carries tokens and personal data)."""
    return {**session_fields(session, device), "source_ip": request.remote,
            "service": service, "method": request.method,
            "path": strip_query(request.raw_path)}


@functools.lru_cache(maxsize=1024)
def peer_address(remote: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The TCP peer address as decide() takes it, or None if it is not one.

    Memoised: a browser sends many requests from one address (and keep-alive connections
    from it), and `ipaddress` parsing was a noticeable share of the per-request policy
    work. Bounded: addresses come from the network.
    """
    try:
        return ipaddress.ip_address(remote)
    except ValueError:
        return None


def respond(request: web.BaseRequest, status: int, *, title: str, message: str,
            details: tuple[str, ...] = (), error: str | None = None,
            extra: dict[str, Any] | None = None) -> web.Response:
    """A gateway answer: an HTML page for a browser navigation, JSON for everything else."""
    if wants_html(request.headers):
        body = pages.message_page(title=title, message=message, details=details)
        return web.Response(status=status, text=body, content_type="text/html")
    payload: dict[str, Any] = {"error": error or title.lower().replace(" ", "_"),
                               "message": message}
    payload.update(extra or {})
    return web.json_response(payload, status=status)


@dataclass(eq=False, slots=True)
class Channel:
    """One open WebSocket: the request it was allowed as, and how to close it."""

    session: Session
    access: AccessRequest
    close: Callable[[str], None]


class Channels:
    """Open WebSockets, re-decided when the policy or the clock may have changed the answer."""

    def __init__(self) -> None:
        self._open: set[Channel] = set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, channel: Channel) -> Callable[[], None]:
        self._open.add(channel)
        return lambda: self._open.discard(channel)

    def close_all(self, reason: str) -> int:
        """Close every open socket with ``reason`` (the drain: ``shutdown`` → 1001)."""
        channels, self._open = self._open, set()
        for channel in channels:
            channel.close(reason)
        return len(channels)

    def recheck(self, policy: Policy, now: datetime, clock: float) -> int:
        """Close every socket the policy now denies; returns how many were closed."""
        closed = 0
        for channel in list(self._open):
            access = replace(channel.access, now=now,
                             mfa_age=channel.session.mfa_age(clock))
            try:
                decision = decide(policy, access)
            except Exception:
                log.exception("policy recheck failed; closing the WebSocket")
                decision = INTERNAL_ERROR_DECISION
            if decision.decision == "deny":
                self._open.discard(channel)
                channel.close("policy_changed")
                closed += 1
        return closed


def _cut_on_session_end(request: web.Request, session: Session,
                        record: Callable[[ProxyOutcome], None]
                        ) -> Callable[[ProxyOutcome], None]:
    """Tie a proxied request to its session: if the session ends (kill, logout, expiry,
    revocation) while the request runs — a long download, a slow upload — the client's
    connection is cut at once rather than when the transfer ends. Returns the ``on_finish``
    for `proxy_http`, which unties the request and then records it."""
    transport = request.transport
    if transport is None:
        return record

    def cut(reason: str) -> None:
        log.info("cut a request in flight: its session ended (%s)", reason)
        transport.abort()

    untie = session.add_closer(cut)

    def finish(outcome: ProxyOutcome) -> None:
        untie()
        record(outcome)

    return finish


class RequestFlow:
    """Route, decide, record and act for one authenticated request (see module docstring)."""

    def __init__(self, ctx: FrontendContext, channels: Channels) -> None:
        self._ctx = ctx
        self._channels = channels

    async def handle(
        self, request: web.Request, session: Session, device: DeviceIdentity | None
    ) -> web.StreamResponse:
        ctx = self._ctx
        if audit_refuses(ctx):
            return unavailable(request)
        policy = ctx.policy
        raw_target = request.raw_path
        host = request.headers.get("Host")
        service = policy.http_service_for(host, raw_target)
        websocket = is_websocket_upgrade(request.method, request.headers)
        # A WebSocket is a write channel: both directions carry whatever the page sends.
        writes = websocket or request.method not in READ_METHODS
        if writes:
            cross = cross_origin_reason(request.headers,
                                        public_origins(ctx.settings.https.public_url))
            if cross is not None:
                return self._refuse_cross_origin(request, cross,
                                                 audit_fields(request, session, device, service))
        access = self._access_request(request, session, device, service, host)
        decision = _decide(policy, access) if access is not None else INTERNAL_ERROR_DECISION
        ctx.metrics.policy_decision(FRONTEND, service, decision.decision)
        if decision.decision == "deny":
            return self._deny(request, decision, audit_fields(request, session, device, service),
                              _deny_status(service, raw_target))
        if decision.decision == "step_up":
            return self._step_up(request, decision,
                                 audit_fields(request, session, device, service))
        if decision.obligations.read_only and writes:
            # decide() never allows a write method under a read-only rule (defence in depth
            # here), but it sees a WebSocket as the GET it starts with.
            refused = Decision("deny", decision.rule, READ_ONLY_WEBSOCKET if websocket
                               else READ_ONLY)
            return self._deny(request, refused, audit_fields(request, session, device, service),
                              403)
        assert service is not None and access is not None  # decide() denies service None
        return await self._proxy(request, session=session, device=device, service=service,
                                 access=access, decision=decision, websocket=websocket,
                                 writes=writes)

    # --- building the request ------------------------------------------------------------

    def _access_request(
        self, request: web.Request, session: Session, device: DeviceIdentity | None,
        service: str | None, host: str | None,
    ) -> AccessRequest | None:
        source = peer_address(request.remote or "")
        if source is None:
            return None  # no usable peer address: decide() could not judge "source" rules
        principal = session.principal
        return AccessRequest(
            user=principal.user, groups=principal.groups, attributes=principal.attributes,
            device=device.device_id if device else None,
            device_user=device.user if device else None,
            frontend=FRONTEND, service=service, host=host, method=request.method,
            path=request.raw_path, source=source, now=self._ctx.wall_clock(),
            mfa_age=session.mfa_age(self._ctx.clock()),
        )

    # --- deny and step-up ----------------------------------------------------------------

    def _deny(self, request: web.Request, decision: Decision, fields: dict[str, object],
              status: int) -> web.StreamResponse:
        seq = self._audit_deny(decision, fields, status)
        title, message, error = DENY_PAGES[status]
        # The person gets the rule's description and a support reference, never the rule id.
        notice = pages.deny_notice(self._ctx.policy, decision, status,
                                   session=str(fields["session"]), audit_seq=seq)
        return respond(request, status, title=title, message=message,
                       details=notice.details, error=error, extra=notice.fields)

    def _audit_deny(self, decision: Decision, fields: dict[str, object],
                    status: int) -> int | None:
        """Record the refusal; its seq (the help desk's reference), None if not written."""
        try:
            record = self._ctx.audit.emit("access.deny", **fields, rule=decision.rule,
                                          reason=decision.reason, status=status)
        except AuditWriteError:
            log.error("access.deny could not be audited")  # denied anyway
            return None
        return record.seq if record is not None else None

    def _refuse_cross_origin(self, request: web.Request, why: str,
                             fields: dict[str, object]) -> web.StreamResponse:
        """403 for a write or WebSocket a browser sent from another origin (see `csrf`)."""
        log.info("refused a cross-origin %s: %s", request.method, why)
        self._audit_deny(Decision("deny", None, CROSS_ORIGIN), fields, 403)
        return respond(
            request, 403, title="Request refused",
            message="This request was sent from another site, so it was refused. Open the "
                    "page through the gateway's own address and try again.",
            details=(why,), error=CROSS_ORIGIN, extra={"reason": CROSS_ORIGIN, "detail": why},
        )

    def _step_up(self, request: web.Request, decision: Decision,
                 fields: dict[str, object]) -> web.StreamResponse:
        try:
            self._ctx.audit.emit("access.step_up", **fields, rule=decision.rule,
                                 reason=decision.reason, status=401)
        except AuditWriteError:
            return unavailable(request)  # a step-up leads to an action: record it or refuse
        target = pages.stepup_url(_return_path(request))
        if wants_html(request.headers):
            # A form post cannot be replayed by a redirect: 303 turns it into a GET.
            status = 302 if request.method in ("GET", "HEAD") else 303
            return web.Response(status=status, headers={"Location": target})
        response = web.json_response(
            {"error": "step_up_required", "message": "A fresh authenticator code is needed.",
             "reason": pages.step_up_reason(self._ctx.policy, decision),
             "step_up_url": target}, status=401)
        response.headers["WWW-Authenticate"] = f'Gatewayd realm="gatewayd", step_up="{target}"'
        return response

    # --- proxying ------------------------------------------------------------------------

    def _proxy(
        self, request: web.Request, *, session: Session, device: DeviceIdentity | None,
        service: str, access: AccessRequest, decision: Decision, websocket: bool, writes: bool,
    ) -> Awaitable[web.StreamResponse]:
        """The transfer to await. Not a coroutine itself: it hands back the proxy's own, so a
        proxied request pays for one await layer less."""
        ctx = self._ctx
        upstream = ctx.upstreams.get(service)
        if upstream is None:
            not_configured = Decision("deny", decision.rule,
                                      f"no upstream is configured for service {service!r}")
            return _answered(self._deny_unconfigured(
                request, not_configured, audit_fields(request, session, device, service)))
        settings = ctx.settings
        # An allowed read that is not audited needs no audit context: most requests.
        fields = (audit_fields(request, session, device, service)
                  if writes or settings.audit.http_requests == "all" else None)
        if fields is not None and not self._record_allow(fields, decision):
            return _answered(unavailable(request))
        headers = upstream_request_headers(
            request.headers, principal=session.principal,
            assertion=ctx.signer.token_for(session=session.id_hash, audience=service,
                                           principal=session.principal,
                                           device=device.device_id if device else None),
            client_ip=request.remote or "",
            forwarded_host=public_authority(settings.https.public_url),
        )
        record = self._recorder(session, fields, decision, service)
        if websocket:
            return self._proxy_websocket(request, session=session, access=access,
                                         upstream=upstream, headers=headers, record=record)
        limit = settings.https.max_body
        if decision.obligations.max_upload is not None:
            limit = min(limit, decision.obligations.max_upload)
        return proxy_http(request, upstream=upstream, headers=headers, max_body=limit,
                          on_finish=_cut_on_session_end(request, session, record),
                          error_response=lambda s, e: error_page(request, s, e))

    def _deny_unconfigured(self, request: web.Request, decision: Decision,
                           fields: dict[str, object]) -> web.StreamResponse:
        try:
            self._ctx.audit.emit("access.deny", **fields, rule=decision.rule,
                                 reason=decision.reason, status=502)
        except AuditWriteError:
            log.error("access.deny could not be audited")
        return error_page(request, 502, "upstream_not_configured")

    async def _proxy_websocket(
        self, request: web.Request, *, session: Session, access: AccessRequest,
        upstream: Upstream, headers: MultiMapping[str], record: Callable[[ProxyOutcome], None],
    ) -> web.StreamResponse:
        ctx = self._ctx
        ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def close(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        remove_closer = session.add_closer(close)
        forget = self._channels.add(Channel(session, access, close))
        try:
            return await proxy_websocket(
                request, upstream=upstream, headers=headers, session_ended=ended,
                on_finish=record, on_client_message=lambda: ctx.sessions.touch(session),
                error_response=lambda s, e: error_page(request, s, e),
            )
        finally:
            forget()
            remove_closer()

    def _record_allow(self, fields: dict[str, object], decision: Decision) -> bool:
        """Write ``access.allow`` before anything goes upstream. False when it could not be
        written and ``audit.on_failure = "deny"``: the request must then not be proxied."""
        try:
            self._ctx.audit.emit("access.allow", **fields, rule=decision.rule)
        except AuditWriteError:
            log.error("access.allow could not be audited; refused (service %s)",
                      fields["service"])
            return False
        return True

    def _recorder(
        self, session: Session, fields: dict[str, object] | None, decision: Decision,
        service: str,
    ) -> Callable[[ProxyOutcome], None]:
        """What ends a proxied request: bytes, the duration metric and, when ``fields`` is
        given (the request is audited), its ``access.end`` record."""
        ctx = self._ctx

        def record(outcome: ProxyOutcome) -> None:
            session.add_bytes(up=outcome.bytes_up, down=outcome.bytes_down)
            ctx.metrics.proxy_duration(service, outcome.duration)
            if fields is None:
                return
            try:
                ctx.audit.emit(
                    "access.end", **fields, rule=decision.rule, status=outcome.status,
                    bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down,
                    duration_ms=round(outcome.duration * 1000), error=outcome.error,
                )
            except AuditWriteError:
                # The transfer has happened; its access.allow record is already written.
                log.error("access.end could not be audited (service %s)", service)

        return record


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


def _decide(policy: Policy, access: AccessRequest) -> Decision:
    try:
        return decide(policy, access)
    except Exception:  # fail closed: a bug in policy evaluation is a deny, never an allow
        log.exception("decide() failed; denying")
        return INTERNAL_ERROR_DECISION


def _deny_status(service: str | None, raw_target: str) -> int:
    if service is not None:
        return 403
    try:
        normalize_path(raw_target)
    except AmbiguousPathError:
        return 400
    return 404


def _return_path(request: web.Request) -> str:
    """Where the step-up should lead back to: the URL itself for a GET; for a form post (which
    cannot be replayed) the page the form was on, when that page is ours."""
    if request.method in ("GET", "HEAD"):
        return safe_next(request.raw_path)
    referer = request.headers.get("Referer", "")
    origin = f"https://{request.headers.get('Host', '')}"
    if referer.startswith(origin + "/"):
        return safe_next(referer[len(origin):])
    return pages.PORTAL_PATH


READ_ONLY: Final = "the rule allows reading only"
READ_ONLY_WEBSOCKET: Final = "the rule allows reading only, and a WebSocket is a write channel"

# status → (title, message, JSON error word) of a policy refusal.
DENY_PAGES: Final[Mapping[int, tuple[str, str, str]]] = MappingProxyType({
    400: ("Address refused",
          "The address could be read in more than one way, so it was refused.",
          "ambiguous_path"),
    404: ("Not found", "No service is published at this address.", "not_found"),
    403: ("Access denied", "You may not do this here.", "forbidden"),
})

ERROR_PAGES: Final[Mapping[int, tuple[str, str]]] = MappingProxyType({
    400: ("Bad request", "The request could not be read."),
    405: ("Method not allowed", "This kind of request is never forwarded."),
    408: ("Request timeout", "The upload stalled and was stopped."),
    413: ("Too large", "The upload is larger than allowed here."),
    415: ("Unsupported form", "The form was sent in a way the gateway does not accept."),
    429: ("Too many attempts", "Too many attempts. Wait a little and try again."),
    431: ("Request too large", "The request headers are too large."),
    499: ("Client closed request", "The request was abandoned."),
    500: ("Something went wrong", "The gateway could not complete this request."),
    502: ("Service unavailable", "The service did not answer. Try again in a moment."),
    503: ("Temporarily unavailable", "The gateway cannot serve this request right now."),
    504: ("Service timeout", "The service took too long to answer."),
})


def error_page(request: web.BaseRequest, status: int, error: str) -> web.Response:
    title, message = ERROR_PAGES.get(status, ("Error", "The request failed."))
    return respond(request, status, title=title, message=message, error=error)


def unavailable(request: web.BaseRequest) -> web.Response:
    return error_page(request, 503, "audit_unavailable")
