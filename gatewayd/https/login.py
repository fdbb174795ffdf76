"""Sign-in, step-up and sign-out: the gateway's state-changing endpoints.

Owns the three forms of DESIGN.md and what each does to sessions and the audit log:

``GET/POST /.gatewayd/login``
    One form with user name, password and TOTP code. Every wrong factor, an unknown or
    disabled user and a replayed code get the *same* page and status (401) with one generic
    message; only back-off/lockout (429, "wait") and an unreachable directory (503) differ,
    and those depend on the typed name and the source, never on whether the account exists.
    Success mints a **new** session id in the registry (a cookie the browser already had is
    never adopted; a live session it named is ended first), writes ``auth.success`` and
    ``session.start`` — both before the cookie is set, so with ``audit.on_failure = "deny"`` a
    login that cannot be recorded does not happen — and redirects (303) to ``next`` after
    `safe_next`.
``GET/POST /.gatewayd/stepup``
    A fresh TOTP code (the authenticator accepts each code once) renews the session's MFA
    time, then back to ``next``.
``GET/POST /.gatewayd/logout``
    GET only shows a confirmation (a link or an image must not sign anyone out); POST ends
    the session server-side (its WebSockets close with it, ``session.end`` is written), expires
    the cookie and sends ``Clear-Site-Data`` so the browser drops cached pages, cookies and
    storage of every application behind the gateway — the back button shows nothing.

Every POST passes `csrf.cross_origin_reason` and a CSRF token bound to the browser (login:
the ``__Host-gatewayd_csrf`` cookie; step-up and logout: the session). Form bodies go
through `forms.read_form`: garbage gets a 4xx page, never a 500.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web

from gatewayd.audit import AuditWriteError
from gatewayd.certs import DeviceIdentity
from gatewayd.https import pages
from gatewayd.https.auth import (
    CSRF_COOKIE,
    csrf_cookie_header,
    expired_cookie_header,
    looks_like_session_id,
    request_cookie_values,
    session_cookie_header,
    set_cookie,
    wants_html,
)
from gatewayd.https.context import FrontendContext
from gatewayd.https.csrf import CsrfTokens, cross_origin_reason
from gatewayd.https.flow import FRONTEND, error_page, respond, session_fields, unavailable
from gatewayd.https.forms import FormError, read_form
from gatewayd.https.headers import SESSION_COOKIE
from gatewayd.https.redirects import safe_next
from gatewayd.identity.authenticator import LoginResult
from gatewayd.identity.directory import MAX_PASSWORD_CHARS, MAX_USERNAME_CHARS
from gatewayd.sessions import PerUserLimit, SeatsFull, Session
from gatewayd.state.store import StateUnavailable
from gatewayd.tasks import within

log = logging.getLogger(__name__)

MAX_FORM_BYTES: Final = 8 * 1024
# Field name -> most characters accepted (`forms.read_form`); read-only views.
LOGIN_FIELDS: Final = MappingProxyType({
    "username": MAX_USERNAME_CHARS, "password": MAX_PASSWORD_CHARS, "code": 16,
    "csrf_token": 128, "next": 2048,
})
STEPUP_FIELDS: Final = MappingProxyType({"code": 16, "csrf_token": 128, "next": 2048})
LOGOUT_FIELDS: Final = MappingProxyType({"csrf_token": 128})
CLEAR_SITE_DATA: Final = '"cache", "cookies", "storage"'
# The authenticator bounds its own time; this only guards against a wedged backend.
AUTH_TIMEOUT: Final = 30.0

THROTTLED_MESSAGE: Final = "Too many failed attempts. Wait a while before you try again."
UNAVAILABLE_MESSAGE: Final = "Sign-in is temporarily unavailable. Try again in a few minutes."


def query_value(request: web.BaseRequest, name: str) -> str | None:
    """One query parameter read from the raw target (never through yarl's repairs)."""
    query = request.raw_path.partition("?")[2]
    try:
        for key, value in parse_qsl(query, errors="strict", max_num_fields=32):
            if key == name:
                return value
    except (UnicodeDecodeError, ValueError):
        return None
    return None


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/html")


def _redirect(location: str, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": location})


def allowed_origins(request: web.BaseRequest, public_url: str) -> frozenset[str]:
    """This gateway's origins: the configured public URL and the origin the browser used."""
    host = request.headers.get("Host", "")
    return frozenset({public_url.lower().rstrip("/"), f"https://{host}".lower()})


class AuthPages:
    """Handlers of the sign-in, step-up and sign-out endpoints."""

    def __init__(self, ctx: FrontendContext, csrf: CsrfTokens) -> None:
        self._ctx = ctx
        self._csrf = csrf

    # --- sign-in -------------------------------------------------------------------------

    async def login_form(self, request: web.Request, session: Session | None) -> web.Response:
        next_path = safe_next(query_value(request, "next"))
        if session is not None:
            return _redirect(next_path, 302)  # already signed in
        notice = "You have signed out." if query_value(request, "signed_out") else None
        return self._login_page(request, next_path, notice=notice)

    def _login_page(self, request: web.BaseRequest, next_path: str, *, status: int = 200,
                    error: str | None = None, notice: str | None = None,
                    username: str = "") -> web.Response:
        binding = _csrf_binding(request)
        token = self._csrf.issue("login", binding)
        response = _html(pages.login_page(csrf_token=token, next_path=next_path, error=error,
                                          notice=notice, username=username), status)
        set_cookie(response, csrf_cookie_header(binding))
        return response

    async def login_submit(self, request: web.Request, old: Session | None,
                           device: DeviceIdentity | None) -> web.Response:
        try:
            form = await read_form(request, max_bytes=MAX_FORM_BYTES, limits=LOGIN_FIELDS)
        except FormError as exc:
            return self._form_error(request, exc)
        next_path = safe_next(form["next"])
        refusal = self._refuse_forgery(request, form["csrf_token"], "login",
                                       _existing_binding(request))
        if refusal is not None:
            return self._login_page(request, next_path, status=403, error=refusal)
        source_ip = request.remote or ""
        result = await self._authenticate(form, source_ip)
        if not result.ok or result.principal is None:
            return self._login_failed(request, result, form=form, next_path=next_path,
                                      source_ip=source_ip, device=device)
        if old is not None:
            self._ctx.sessions.end(old, "logout")  # the browser signs in afresh
        return await self._start_session(request, result, next_path, source_ip, device)

    async def _authenticate(self, form: Mapping[str, str], source_ip: str) -> LoginResult:
        try:
            return await within(
                self._ctx.authenticator.login(
                    form["username"], form["password"], form["code"], source_ip,
                    self._ctx.wall_clock().timestamp(),
                ),
                AUTH_TIMEOUT,
            )
        except TimeoutError:
            return LoginResult(ok=False, principal=None, reason="directory_unavailable")
        except Exception:  # fail closed; the authenticator is not supposed to raise
            log.exception("authenticator failed")
            return LoginResult(ok=False, principal=None, reason="directory_unavailable")

    def _login_failed(self, request: web.Request, result: LoginResult, *,
                      form: Mapping[str, str], next_path: str, source_ip: str,
                      device: DeviceIdentity | None) -> web.Response:
        username = form["username"]
        try:
            # The name as typed is recorded only when it names a real account: people type
            # their password into the user-name field, and the audit log is kept for years.
            self._ctx.record_auth(
                frontend=FRONTEND, user=result.user or None, source_ip=source_ip,
                ok=False, reason=result.detail or result.reason,
                locked=result.reason == "locked" or result.lockout_started,
                device=device.device_id if device else None,
            )
        except AuditWriteError:
            return unavailable(request)
        if result.reason in ("throttled", "locked"):
            response = self._login_page(request, next_path, status=429,
                                        error=THROTTLED_MESSAGE, username=username)
            if result.retry_after:
                response.headers["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
            return response
        if result.reason == "directory_unavailable":
            return self._login_page(request, next_path, status=503, error=UNAVAILABLE_MESSAGE,
                                    username=username)
        # bad_credentials and replayed_code alike: one page, one message, one status.
        return self._login_page(request, next_path, status=401,
                                error=pages.GENERIC_LOGIN_ERROR, username=username)

    async def _start_session(self, request: web.Request, result: LoginResult,
                             next_path: str, source_ip: str,
                             device: DeviceIdentity | None) -> web.Response:
        assert result.principal is not None
        ctx = self._ctx
        principal = result.principal
        device_id = device.device_id if device else None
        try:
            raw_id, session = await ctx.sessions.admit(
                principal, frontend=FRONTEND, source_ip=source_ip, device=device_id,
                device_user=device.user if device else None,
                device_serial=device.serial if device else None, replace_oldest=True,
            )
        except (SeatsFull, PerUserLimit) as exc:
            return self._limit_reached(request, exc, principal.user, source_ip, device_id)
        except StateUnavailable:  # multi-node: no seat can be counted without Redis
            try:
                ctx.record_auth(frontend=FRONTEND, user=principal.user, source_ip=source_ip,
                                ok=False, reason="state_unavailable", device=device_id)
            except AuditWriteError:
                return unavailable(request)
            return self._login_page(request, next_path, status=503, error=UNAVAILABLE_MESSAGE,
                                    username=principal.user)
        try:
            ctx.record_auth(frontend=FRONTEND, user=principal.user, source_ip=source_ip,
                            ok=True, device=device_id, session=session.handle)
            ctx.audit.emit("session.start", **session_fields(session, device))
        except AuditWriteError:
            ctx.sessions.end(session, "logout")  # never usable: it could not be recorded
            return unavailable(request)
        ctx.metrics.sessions_active.labels(FRONTEND).set(ctx.sessions.active(FRONTEND))
        response = _redirect(next_path)
        set_cookie(response, session_cookie_header(raw_id))
        set_cookie(response, expired_cookie_header(CSRF_COOKIE))
        return response

    def _limit_reached(self, request: web.Request, exc: SeatsFull | PerUserLimit, user: str,
                       source_ip: str, device: str | None) -> web.Response:
        seats = isinstance(exc, SeatsFull)
        reason = "seats_full" if seats else "per_user_limit"
        try:
            self._ctx.record_auth(frontend=FRONTEND, user=user, source_ip=source_ip,
                                  ok=False, reason=reason, device=device)
        except AuditWriteError:
            return unavailable(request)
        if seats:
            message = str(exc)  # the same sentence the SSH listener sends
        else:
            message = (f"You already have {exc.limit} active session(s). Sign out there "
                       "first; an abandoned session ends by itself after the idle timeout.")
        return respond(request, 503 if seats else 409, title="Cannot sign in now",
                       message=message, error=reason)

    # --- step-up -------------------------------------------------------------------------

    async def stepup_form(self, request: web.Request, session: Session) -> web.Response:
        next_path = safe_next(query_value(request, "next"))
        return self._stepup_page(session, next_path)

    def _stepup_page(self, session: Session, next_path: str, *, status: int = 200,
                     error: str | None = None) -> web.Response:
        return _html(pages.stepup_page(
            user=session.user, next_path=next_path, error=error,
            csrf_token=self._csrf.issue("stepup", session.handle),
            logout_token=self._csrf.issue("logout", session.handle),
        ), status)

    async def stepup_submit(self, request: web.Request, session: Session,
                            device: DeviceIdentity | None) -> web.Response:
        try:
            form = await read_form(request, max_bytes=MAX_FORM_BYTES, limits=STEPUP_FIELDS)
        except FormError as exc:
            return self._form_error(request, exc)
        next_path = safe_next(form["next"])
        refusal = self._refuse_forgery(request, form["csrf_token"], "stepup", session.handle)
        if refusal is not None:
            return self._stepup_page(session, next_path, status=403, error=refusal)
        result = await self._step_up(session, form["code"])
        device_id = device.device_id if device else None
        try:
            self._ctx.record_auth(
                frontend=FRONTEND, user=session.user, source_ip=request.remote or "",
                ok=result.ok, step_up=True,
                locked=result.reason == "locked" or result.lockout_started,
                reason="step_up" if result.ok else f"step_up: {result.detail or result.reason}",
                device=device_id, session=session.handle,
            )
        except AuditWriteError:
            return unavailable(request)
        if result.ok:
            if result.principal is not None:
                session.principal = result.principal  # the directory's current groups
            self._ctx.sessions.mark_mfa(session)
            # A privilege change gets a new session id (OWASP): a copy of the old cookie, made
            # before the fresh code was typed, cannot use the stepped-up session.
            response = _redirect(next_path)
            set_cookie(response, session_cookie_header(self._ctx.sessions.rotate(session)))
            return response
        return self._stepup_failed(session, result, next_path)

    def _stepup_failed(self, session: Session, result: LoginResult,
                       next_path: str) -> web.Response:
        if result.reason in ("throttled", "locked"):
            response = self._stepup_page(session, next_path, status=429,
                                         error=THROTTLED_MESSAGE)
            if result.retry_after:
                response.headers["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
            return response
        if result.reason == "directory_unavailable":
            return self._stepup_page(session, next_path, status=503, error=UNAVAILABLE_MESSAGE)
        return self._stepup_page(session, next_path, status=401,
                                 error=pages.GENERIC_STEPUP_ERROR)

    async def _step_up(self, session: Session, code: str) -> LoginResult:
        try:
            return await within(
                self._ctx.authenticator.step_up(
                    session.principal, code, session.source_ip,
                    self._ctx.wall_clock().timestamp(),
                ),
                AUTH_TIMEOUT,
            )
        except TimeoutError:
            return LoginResult(ok=False, principal=None, reason="directory_unavailable")
        except Exception:
            log.exception("step-up check failed")
            return LoginResult(ok=False, principal=None, reason="directory_unavailable")

    # --- sign-out ------------------------------------------------------------------------

    async def logout_form(self, request: web.Request, session: Session | None) -> web.Response:
        if session is None:
            return _redirect(pages.LOGIN_PATH, 302)
        token = self._csrf.issue("logout", session.handle)
        return _html(pages.logout_page(user=session.user, csrf_token=token))

    async def logout_submit(self, request: web.Request, session: Session | None) -> web.Response:
        try:
            form = await read_form(request, max_bytes=MAX_FORM_BYTES, limits=LOGOUT_FIELDS)
        except FormError as exc:
            return self._form_error(request, exc)
        if session is not None:
            refusal = self._refuse_forgery(request, form["csrf_token"], "logout",
                                           session.handle)
            if refusal is not None:
                token = self._csrf.issue("logout", session.handle)
                return _html(pages.logout_page(user=session.user, csrf_token=token), 403)
            self._ctx.sessions.end(session, "logout")
        response = _redirect(f"{pages.LOGIN_PATH}?signed_out=1")
        set_cookie(response, expired_cookie_header(SESSION_COOKIE))
        response.headers["Clear-Site-Data"] = CLEAR_SITE_DATA
        return response

    # --- shared --------------------------------------------------------------------------

    def _refuse_forgery(self, request: web.BaseRequest, token: str, purpose: str,
                        binding: str | None) -> str | None:
        """Why this form post is refused as possibly forged, or None."""
        origins = allowed_origins(request, self._ctx.settings.https.public_url)
        cross = cross_origin_reason(request.headers, origins)
        if cross is not None:
            log.info("refused a cross-origin %s post: %s", purpose, cross)
            return "This form was sent from another site and was refused."
        if not self._csrf.check(token, purpose, binding):
            return "This form has expired. Please try again."
        return None

    def _form_error(self, request: web.BaseRequest, exc: FormError) -> web.Response:
        if wants_html(request.headers):
            body = pages.message_page(title="Form refused", message=exc.message,
                                      links=(("/", "Back to the portal"),))
            return _html(body, exc.status)
        return error_page(request, exc.status, "bad_form")


def _existing_binding(request: web.BaseRequest) -> str | None:
    for value in request_cookie_values(request, CSRF_COOKIE):
        if looks_like_session_id(value):
            return value
    return None


def _csrf_binding(request: web.BaseRequest) -> str:
    """The browser's pre-session CSRF cookie value, or a new one (same shape as a session id).

    Reused when present so that two open sign-in tabs both work.
    """
    return _existing_binding(request) or secrets.token_urlsafe(32)
