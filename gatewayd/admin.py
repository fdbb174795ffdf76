"""Admin API on a unix socket: list and kill sessions, reload, status.

Owns the socket (``admin.socket``, ``0660`` with group ``admin.group``, or ``0600`` without
one) and its small JSON API, which `gatewayd sessions|reload|status` (gatewayd.admin_cli) call:

====================  =========================================================================
``GET /v1/status``    version, node, readiness, listeners, sessions per frontend, seats
``GET /v1/sessions``  live sessions (``?user=NAME`` filters), oldest first
``POST /v1/kill``     ``{"session": HANDLE}`` | ``{"user": NAME}`` | ``{"device": ID}``, and an
                      optional ``"reason"``; ends the matching sessions (reason ``admin_kill``)
``POST /v1/reload``   like SIGHUP; answers whether the new configuration was applied
====================  =========================================================================

Who may call is decided by the file system (mode and group of the socket), as for
``docker.sock`` or ``systemd``'s private socket; the daemon only *attributes*: each request's
caller uid comes from the kernel (``SO_PEERCRED``), not from anything the client says, and goes
into the audit record (``admin.session_kill`` with ``operator``). Every bad request gets a 4xx
with a one-line ``error``, never a traceback.

A kill goes through `SessionRegistry.end`, which closes every WebSocket, SSH channel and tunnel
of the session at once; an HTTP request of a killed session already in flight finishes, and
the next one is refused (its cookie no longer resolves).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol

import structlog
from aiohttp import web

from gatewayd import __version__
from gatewayd.audit import AuditWriteError
from gatewayd.config import AdminSettings
from gatewayd.metrics import server_name_only
from gatewayd.sessions import Session, SessionRegistry

log = structlog.get_logger("gatewayd.admin")

MAX_REASON_CHARS: Final = 200
MAX_REQUEST_BYTES: Final = 4096
FRONTENDS: Final = ("https", "ssh")


class AdminSocketError(Exception):
    """The admin socket cannot be set up; the message names the path and the cause."""


class AdminTarget(Protocol):
    """What the admin API needs of the Gateway (kept narrow so tests can see the contract)."""

    sessions: SessionRegistry

    def clock(self) -> float: ...
    def wall_clock(self) -> datetime: ...
    async def reload(self) -> bool: ...
    async def readiness(self) -> tuple[bool, str]: ...
    def admin_status(self) -> dict[str, object]: ...
    def record_admin_kill(self, *, operator: str, selector: tuple[str, str], reason: str,
                          sessions: list[Session]) -> None: ...


TARGET: Final = web.AppKey("gatewayd.admin.target", AdminTarget)


# --- who is calling --------------------------------------------------------------------------


def peer_operator(request: web.Request) -> str:
    """``uid=1000(alice)`` of the process at the other end of the socket, from the kernel."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return "uid=?"
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return f"uid={uid}({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid={uid}"


# --- views -----------------------------------------------------------------------------------


def session_view(session: Session, now: float, wall: datetime) -> dict[str, object]:
    """One row of `gatewayd sessions list`: times as RFC 3339, never the session secret."""

    def at(clock_seconds: float) -> str:
        return (wall - timedelta(seconds=now - clock_seconds)).isoformat(timespec="seconds")

    return {
        "id": session.handle,
        "user": session.user,
        "device": session.device,
        "source_ip": session.source_ip,
        "frontend": session.frontend,
        "started": at(session.created),
        "last_activity": at(session.last_seen),
        "bytes_up": session.bytes_up,
        "bytes_down": session.bytes_down,
        "open_tunnels": session.open_tunnels,
    }


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


async def status_view(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    ready, why = await target.readiness()
    return web.json_response({**target.admin_status(), "ready": ready, "readiness": why})


async def sessions_view(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    user = request.query.get("user")
    now, wall = target.clock(), target.wall_clock()
    rows = [session_view(s, now, wall) for s in target.sessions.sessions()
            if user is None or s.user == user]
    return web.json_response({"sessions": rows})


async def kill_view(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    body = await _json_object(request)
    selector = _kill_selector(body)
    reason = _kill_reason(body)
    victims = _matching_sessions(target.sessions, *selector)
    operator = peer_operator(request)
    # Audit before acting: if the record cannot be written (on_failure = "deny" raises), no
    # session is killed by an operator nobody can later name.
    try:
        target.record_admin_kill(operator=operator, selector=selector, reason=reason,
                                 sessions=victims)
    except AuditWriteError:
        raise _error(web.HTTPServiceUnavailable,
                     "the audit log cannot be written; nothing was killed") from None
    for session in victims:
        target.sessions.end(session, "admin_kill")
    log.info("sessions killed", operator=operator, selector=selector[0], count=len(victims))
    return web.json_response({"killed": [s.handle for s in victims]})


async def reload_view(request: web.Request) -> web.Response:
    target = request.app[TARGET]
    log.info("reload requested", operator=peer_operator(request))
    applied = await target.reload()
    return web.json_response({"applied": applied}, status=200)


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
        raise _error(web.HTTPRequestEntityTooLarge, "request body too large")
    try:
        body = await request.json()
    except ValueError:
        raise _error(web.HTTPBadRequest, "expected a JSON object") from None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "expected a JSON object")
    return body


def _kill_selector(body: dict[str, Any]) -> tuple[str, str]:
    given = [(key, body[key]) for key in ("session", "user", "device") if key in body]
    if len(given) != 1:
        raise _error(web.HTTPBadRequest, "give exactly one of session, user, device")
    key, value = given[0]
    if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
        raise _error(web.HTTPBadRequest, f"{key}: expected a non-empty name")
    return key, value


def _kill_reason(body: dict[str, Any]) -> str:
    reason = body.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise _error(web.HTTPBadRequest,
                     f"reason: expected one line of at most {MAX_REASON_CHARS} characters")
    return reason


def _matching_sessions(registry: SessionRegistry, kind: str, value: str) -> list[Session]:
    field = {"session": "handle", "user": "user", "device": "device"}[kind]
    return [s for s in registry.sessions() if getattr(s, field) == value]


@web.middleware
async def _clear_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """404/405 as JSON too; an unexpected error is a 500 with one line, never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": exc.reason}, status=exc.status, headers=allow)
    except Exception:
        log.exception("admin request failed", path=request.path)
        return web.json_response({"error": "internal error (see the gateway log)"}, status=500)


def admin_app(target: AdminTarget) -> web.Application:
    app = web.Application(middlewares=[_clear_errors], client_max_size=MAX_REQUEST_BYTES)
    app.on_response_prepare.append(server_name_only)
    app[TARGET] = target
    app.router.add_get("/v1/status", status_view)
    app.router.add_get("/v1/sessions", sessions_view)
    app.router.add_post("/v1/kill", kill_view)
    app.router.add_post("/v1/reload", reload_view)
    return app


# --- the socket ------------------------------------------------------------------------------


def _group_id(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise AdminSocketError(
            f"admin.group: group {name!r} does not exist (create it — systemd/gatewayd.sysusers "
            'does — or set admin.group = "" for a socket only root and gatewayd can use)'
        ) from None


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket left by a crashed gateway; refuse if a gateway still answers on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AdminSocketError(f"admin.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AdminSocketError(f"admin.socket: {path} is in use (is another gatewayd running?)")


class AdminServer:
    """The admin socket's lifecycle: bind with the right mode before anyone can connect."""

    def __init__(self, settings: AdminSettings, target: AdminTarget) -> None:
        self._settings = settings
        self._target = target
        self._runner: web.AppRunner | None = None

    @property
    def path(self) -> Path:
        return self._settings.socket

    async def start(self) -> None:
        path, gid = self._settings.socket, _group_id(self._settings.group)
        if not path.parent.is_dir():
            raise AdminSocketError(f"admin.socket: directory {path.parent} does not exist")
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask for the bind: the socket never exists with a wider mode, not even briefly.
            old_umask = os.umask(0o117 if gid is not None else 0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise AdminSocketError(f"admin.socket: {path}: {exc.strerror or exc}") from None
        runner = web.AppRunner(admin_app(self._target), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            with contextlib.suppress(OSError):
                self._settings.socket.unlink()


def status_fields(*, node: str, sessions: SessionRegistry, seats: int,
                  listeners: dict[str, str | None], reload_ok: bool) -> dict[str, object]:
    """The static part of ``/v1/status`` (the Gateway adds readiness)."""
    return {
        "version": __version__,
        "node": node,
        "listeners": listeners,
        "sessions": {frontend: sessions.active(frontend) for frontend in FRONTENDS},
        "seats": {"in_use": sessions.seats_taken(), "limit": seats},  # shared seats once
        "config_last_reload_success": reload_ok,
    }
