"""``POST /.gatewayd/ssh/certificate`` and the portal's "SSH tunnels" section.

Owns the HTTP side of SSH user certificates: who may ask, how the request is read and
checked, and what is answered. The certificate itself (its shape, the key checks, the policy
question "may this user open any tunnel now") is `gatewayd.ssh.certificate`.

Who may ask: a live portal session (every portal session began with password + TOTP). Without
one: the sign-in redirect for a browser, 401 JSON for a script, as everywhere in the portal.
The certificate is issued only when the user's policy allows at least one TCP destination
right now (else 403 "your policy allows no SSH tunnels"), and is valid at most until the
portal session's absolute end. A portal session whose certificates the SSH listener revoked
(an administrator killed one of its SSH sessions: `SshFrontend.session_ended`) gets 403
``ssh_revoked`` instead of certificates that would be refused on arrival.

Request bodies (at most 16 KiB, else 413):

* ``application/x-www-form-urlencoded`` (the portal's form): ``public_key`` and
  ``csrf_token``. The token is **required** (purpose ``ssh_certificate``, bound to the
  session's handle) — any site can make a browser send a form post.
* ``application/json`` (scripts): ``{"public_key": "ssh-ed25519 AAAA…"}``. **No token**: a
  page on another site cannot send this media type without a CORS preflight, and the gateway
  never answers a preflight with CORS permission (its endpoints allow no ``OPTIONS``), so a
  browser never sends such a request cross-origin; the session cookie is ``SameSite=Lax``
  besides. Every other media type (``text/plain``, ``multipart/form-data``, which other sites
  *can* send) is refused with 415.

For both, ``Origin`` and ``Sec-Fetch-Site`` are checked exactly as for the sign-in and
sign-out forms when present (`csrf.cross_origin_reason`): another origin is refused (403).

Answers: a browser navigation (`auth.wants_html`) gets an HTML page with the certificate and
how to use it; anything else gets the certificate as ``text/plain``, one line and a newline,
ready for ``> ~/.ssh/gatewayd-cert.pub``. Refusals are the gateway's usual HTML page or JSON
``{"error", "message"}``: 400 for a key that is refused (the message says why), 403 forged
or no tunnels, 413, 415, and **404** ``ssh_certificates_disabled`` when ``ssh.enabled`` is
false or ``ssh.user_ca_key_file`` is unset — the gateway does not offer certificates, as if
the endpoint did not exist, but with a reason an operator can act on. A CA key that cannot
be read is 503 (logged), never a 500. Every certificate is audited (``ssh_cert.issue``:
user, device, session handle, serial, the key's SHA256 fingerprint, valid_before — never the
key) before it is handed out; if that record cannot be written, no certificate (503).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from gatewayd.audit import AuditWriteError
from gatewayd.client_config import local_ports
from gatewayd.https import pages
from gatewayd.https.auth import wants_html
from gatewayd.https.csrf import CsrfTokens, cross_origin_reason
from gatewayd.https.flow import audit_refuses, peer_address, respond, unavailable
from gatewayd.https.forms import FormError, read_body, read_form
from gatewayd.https.login import allowed_origins
from gatewayd.ssh.certificate import (
    MAX_KEY_LINE,
    MIN_LIFETIME,
    CaKeyError,
    IssuedCertificate,
    PublicKeyError,
    UserKey,
    allowed_tunnels,
    issue_user_certificate,
    key_id,
    parse_public_key,
)
from gatewayd.ssh.destinations import AllowedTunnel

if TYPE_CHECKING:
    from pathlib import Path

    from gatewayd.certs import DeviceIdentity
    from gatewayd.https.context import FrontendContext
    from gatewayd.sessions import Session

log = logging.getLogger(__name__)

CSRF_PURPOSE: Final = "ssh_certificate"
MAX_BODY: Final = 16 * 1024
JSON_TYPE: Final = "application/json"
FORM_FIELDS: Final = {"public_key": MAX_KEY_LINE, "csrf_token": 128}
NO_TUNNELS: Final = "Your policy allows no SSH tunnels."


class CallerView(Protocol):
    """What the endpoint needs of `app.Caller` (structural: no import of the app module)."""

    @property
    def session(self) -> Session | None: ...
    @property
    def device(self) -> DeviceIdentity | None: ...


class Refused(Exception):  # noqa: N818 - control flow inside this module, not an error class
    """An answer other than a certificate: status, error word and message."""

    def __init__(self, status: int, error: str, message: str,
                 extra: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.extra = extra


class SshCertificates:
    """The certificate endpoint and the portal section, for one HTTPS frontend."""

    def __init__(self, ctx: FrontendContext, csrf: CsrfTokens) -> None:
        self._ctx = ctx
        self._csrf = csrf

    @property
    def enabled(self) -> bool:
        ssh = self._ctx.settings.ssh
        return ssh.enabled and ssh.user_ca_key_file is not None

    # --- the portal section --------------------------------------------------------------

    def portal_section(self, request: web.BaseRequest, session: Session,
                       device: DeviceIdentity | None) -> pages.SshSection | None:
        """The "SSH tunnels" section of the portal, or None when certificates are off."""
        if not self.enabled:
            return None
        try:
            tunnels = self._tunnels(request, session, device)
        except Refused:
            tunnels = []
        return self._section(session, tunnels)

    def _section(self, session: Session, tunnels: list[AllowedTunnel]) -> pages.SshSection:
        settings = self._ctx.settings
        ports = local_ports((t.service, t.destination, t.port) for t in tunnels)
        return pages.SshSection(
            user=session.user,
            host=urlsplit(settings.https.public_url).hostname or "gateway",
            port=settings.ssh.listen.port,
            tunnels=[pages.SshTunnel(t.service, t.description, t.destination,
                                     ports[(t.service, t.destination)]) for t in tunnels],
            csrf_token=self._csrf.issue(CSRF_PURPOSE, session.handle),
        )

    # --- the endpoint --------------------------------------------------------------------

    async def handle(self, request: web.Request, caller: CallerView) -> web.StreamResponse:
        session = caller.session
        if session is None:
            return _login_required(request)
        if audit_refuses(self._ctx):
            return unavailable(request)
        try:
            issued, tunnels = await self._issue(request, session, caller.device)
        except Refused as refused:
            return respond(request, refused.status, title=_TITLES[refused.status],
                           message=refused.message, error=refused.error,
                           extra=dict(refused.extra or {}))
        except AuditWriteError:
            return unavailable(request)  # a credential nobody recorded is never handed out
        if wants_html(request.headers):
            return self._page(issued, session, tunnels)
        return web.Response(text=issued.line + "\n", content_type="text/plain")

    async def _issue(self, request: web.Request, session: Session,
                     device: DeviceIdentity | None) -> tuple[IssuedCertificate,
                                                              list[AllowedTunnel]]:
        ca_key_file = self._ctx.settings.ssh.user_ca_key_file
        if not self._ctx.settings.ssh.enabled or ca_key_file is None:
            raise Refused(404, "ssh_certificates_disabled",
                          "This gateway does not issue SSH certificates (ssh.enabled or "
                          "ssh.user_ca_key_file is not set). Use your password and "
                          "authenticator code with ssh instead.")
        self._refuse_cross_origin(request)
        if self._revoked_for_ssh(session):
            raise Refused(403, "ssh_revoked", "An administrator ended the SSH sessions of this "
                          "sign-in, so its certificates are no longer accepted. Sign out, sign "
                          "in again, then ask for a new certificate.")
        user_key = await self._read_key(request, session)
        tunnels = self._tunnels(request, session, device)
        device_id = device.device_id if device else None
        lifetime_left = self._lifetime_left(session)
        try:
            key_id(session.user, device_id, session.handle)
        except ValueError:
            raise Refused(403, "unusable_user_name", "Your user name cannot be written into "
                          "an SSH certificate; ask the help desk.") from None
        issued = await self._sign(ca_key_file, user_key, session, device_id, lifetime_left)
        if session.ended is not None:  # signed out (or killed) while the key was signed
            raise Refused(403, "session_ended", "Your portal session has ended. Sign in again, "
                          "then ask for a certificate.")
        self._ctx.audit.emit(
            "ssh_cert.issue", frontend="https", user=session.user,
            source_ip=request.remote or session.source_ip, device=device_id,
            session=session.handle,
            serial=str(issued.serial), fingerprint=issued.key_fingerprint,
            valid_before=issued.valid_before_text,
        )
        return issued, tunnels

    def _revoked_for_ssh(self, session: Session) -> bool:
        """Whether the SSH listener refuses this portal session's certificates (revoked).

        Read from the gateway's SSH frontend when there is one (``ctx.ssh.revoked``, a
        `gatewayd.ssh.auth.RevokedSessions`); the context protocol does not name it, as the
        HTTPS frontend runs without SSH too.
        """
        revoked = getattr(getattr(self._ctx, "ssh", None), "revoked", None)
        return revoked is not None and session.handle in revoked

    def _refuse_cross_origin(self, request: web.BaseRequest) -> None:
        origins = allowed_origins(request, self._ctx.settings.https.public_url)
        reason = cross_origin_reason(request.headers, origins)
        if reason is not None:
            log.info("refused a cross-origin SSH certificate request: %s", reason)
            raise Refused(403, "forbidden_origin", "This request was sent from another site "
                          "and was refused.")

    async def _read_key(self, request: web.Request, session: Session) -> UserKey:
        media_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if media_type == JSON_TYPE:
            body = await read_body(request, MAX_BODY)
            if body is None:
                raise Refused(413, "too_large", "The request is too large (16 KiB at most).")
            text = _json_key(body)
        else:
            try:
                form = await read_form(request, max_bytes=MAX_BODY, limits=FORM_FIELDS)
            except FormError as exc:
                if exc.status == 415:
                    raise Refused(415, "unsupported_media_type", "Send the key as a form "
                                  "(application/x-www-form-urlencoded) or as JSON "
                                  '(application/json: {"public_key": "..."}).') from None
                raise Refused(exc.status, "bad_request", exc.message) from None
            if not self._csrf.check(form["csrf_token"], CSRF_PURPOSE, session.handle):
                raise Refused(403, "csrf", "This form has expired. Reload the portal and try "
                              "again.")
            text = form["public_key"]
        try:
            return parse_public_key(text)
        except PublicKeyError as exc:
            raise Refused(400, "bad_public_key", str(exc)) from None

    def _tunnels(self, request: web.BaseRequest, session: Session,
                 device: DeviceIdentity | None) -> list[AllowedTunnel]:
        """The tunnels the policy allows now; Refused 403 when there are none."""
        ctx = self._ctx
        source = peer_address(request.remote or "")
        if source is None:
            raise Refused(403, "no_tunnels", NO_TUNNELS)
        def tunnels_at(age: float) -> list[AllowedTunnel]:
            return allowed_tunnels(
                ctx.policy, principal=session.principal,
                device=device.device_id if device else None,
                device_user=device.user if device else None,
                source=source, now=ctx.wall_clock(), mfa_age=age)

        try:
            tunnels = tunnels_at(session.mfa_age(ctx.clock()))
            if tunnels:
                return tunnels
            fresher = tunnels_at(0.0)
        except Exception:  # fail closed: a policy error issues nothing
            log.exception("policy evaluation for SSH tunnels failed")
            raise Refused(403, "no_tunnels", NO_TUNNELS) from None
        if fresher:
            target = pages.stepup_url(pages.PORTAL_PATH)
            raise Refused(403, "step_up_required", "Your SSH tunnels need a fresh "
                          f"authenticator code: confirm it at {target}, then ask again.",
                          extra={"step_up_url": target})
        raise Refused(403, "no_tunnels", NO_TUNNELS)

    def _lifetime_left(self, session: Session) -> float:
        registry = self._ctx.sessions
        left = registry.absolute_timeout - (self._ctx.clock() - session.created)
        if left < MIN_LIFETIME:
            raise Refused(403, "session_ending", "Your portal session ends in less than a "
                          "minute. Sign in again, then ask for a certificate.")
        return left

    async def _sign(self, ca_key_file: Path, user_key: UserKey, session: Session,
                    device_id: str | None, lifetime_left: float) -> IssuedCertificate:
        now = self._ctx.wall_clock().timestamp()
        try:
            # Off the loop: the CA key is read from disk on every issue (a replaced key
            # takes effect at once); signing itself is ~35 µs.
            return await asyncio.to_thread(
                issue_user_certificate, ca_key_file, user_key, user=session.user,
                device=device_id, session_handle=session.handle, now=now,
                lifetime_left=lifetime_left)
        except CaKeyError as exc:
            log.error("SSH certificate not issued: %s", exc)
            raise Refused(503, "ssh_ca_unavailable", "The gateway cannot issue SSH "
                          "certificates right now; the administrators have been told in "
                          "the log. Use your password and authenticator code.") from None

    def _page(self, issued: IssuedCertificate, session: Session,
              tunnels: list[AllowedTunnel]) -> web.Response:
        zone = self._ctx.policy.timezone
        until = datetime.fromtimestamp(issued.valid_before, UTC).astimezone(zone)
        body = pages.ssh_certificate_page(
            section=self._section(session, tunnels), certificate=issued.line,
            valid_until=f"{until:%Y-%m-%d %H:%M} ({zone.key})", key_id=issued.key_id,
            serial=issued.serial, logout_token=self._csrf.issue("logout", session.handle))
        return web.Response(text=body, content_type="text/html")


_TITLES: Final = {
    400: "Key refused", 403: "Not allowed", 404: "Not offered", 413: "Too large",
    415: "Unsupported request", 503: "Unavailable",
}


def _login_required(request: web.BaseRequest) -> web.Response:
    """As the portal does: a browser signs in first, a script gets 401 JSON."""
    target = pages.login_url(pages.PORTAL_PATH)
    if wants_html(request.headers):
        return web.Response(status=303, headers={"Location": target})
    response = web.json_response(
        {"error": "unauthenticated", "message": "Sign in first.", "login_url": target},
        status=401)
    response.headers["WWW-Authenticate"] = f'Gatewayd realm="gatewayd", login="{target}"'
    return response


def _json_key(body: bytes) -> str:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "bad_request", "The body is not valid JSON.") from None
    if not isinstance(document, dict) or not isinstance(document.get("public_key"), str):
        raise Refused(400, "bad_request", 'Send {"public_key": "ssh-ed25519 AAAA..."}.')
    key: str = document["public_key"]
    return key
