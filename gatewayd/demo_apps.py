"""Demo upstream applications: the office systems ``gatewayd demo`` puts behind the gateway.

Owns four small aiohttp applications, each on its own loopback port as a separate office
system would be, each serving under its service's path prefix (the gateway forwards paths
unchanged):

* **groupware** ``/groupware/`` — schedule and mail list pages for the signed-in user;
* **approval** ``/approval/`` — approval requests: ``GET /approval/requests`` (list),
  ``GET /approval/requests/{id}``, ``POST /approval/requests/{id}/approve`` which records who
  approved (from ``X-Gatewayd-User``) and when; a second approval is 409;
* **files** ``/files/`` — an in-memory WebDAV-like store: GET/HEAD, PUT, DELETE, MKCOL,
  PROPFIND (Depth 0 or 1, RFC 4918 multistatus XML), OPTIONS;
* **chat** ``/chat/`` — one WebSocket room at ``/chat/ws``; each message is broadcast as JSON
  ``{"type": "message", "from": <X-Gatewayd-User>, "text": …, "ts": …}``.

Beside them, one small TCP service per TCP destination of the shipped policy
(`DEMO_TCP_DESTINATIONS`: the SMB file server, IMAPS and SMTP submission, alice's and bob's
office PCs), which the demo's SSH listener reaches through ``ssh.address_overrides``
(`DemoApps.tcp`). Each answers an HTTP request with a one-line page naming itself (so
``curl http://127.0.0.1:8445/`` through ``ssh -L 8445:fileserver.ward.local:445`` shows
where the tunnel went) and otherwise greets and echoes every byte (``nc``).

Every app answers ``GET <prefix>whoami`` with JSON: the ``X-Gatewayd-*`` request headers it
received (any spelling that the gateway's rule would catch: lower-cased with ``_`` read as
``-``, starting with ``x-gatewayd-``), the ``X-Forwarded-*`` headers, the cookie names (so one
can see the gateway's session cookie never arrives), and whether ``X-Gatewayd-Assertion``
verified against the gateway's JWKS (via ``gatewayd.https.assertion.verify_assertion``).

These apps trust ``X-Gatewayd-User`` as real office systems behind a gateway do, which is
only safe when nothing but the gateway can reach them: ``start_demo_apps`` therefore refuses
any address that is not loopback. Pages are server-rendered HTML with no external resources
and a strict ``Content-Security-Policy`` (the chat's script is served from the app itself).
All state lives in the app objects; nothing survives ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import ipaddress
import json
import logging
import ssl
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from aiohttp import web

from gatewayd.https.assertion import InvalidAssertionError, verify_assertion
from gatewayd.tasks import within

log = logging.getLogger(__name__)

SERVICES: Final = ("groupware", "approval", "files", "chat")
IDENTITY_PREFIX: Final = "x-gatewayd-"
USER_HEADER: Final = "X-Gatewayd-User"
ASSERTION_HEADER: Final = "X-Gatewayd-Assertion"
FORWARDED_HEADERS: Final = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")

JWKS_TIMEOUT: Final = 5.0
# After a token fails to verify, the JWKS is fetched again (the gateway may have rotated its
# key), but not more often than this: a stream of forged tokens must not become a stream of
# requests to the gateway.
JWKS_REFRESH_INTERVAL: Final = 10.0
DEFAULT_MAX_FILE_SIZE: Final = 16 * 1024**2
DEFAULT_MAX_STORE_SIZE: Final = 64 * 1024**2
CHAT_HISTORY: Final = 50
CHAT_MAX_MESSAGE: Final = 2000
APPROVAL_MAX_COMMENT: Final = 500

CSP: Final = (
    "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
STYLE: Final = """\
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #222; }
header { border-bottom: 1px solid #ccc; margin-bottom: 1rem; padding-bottom: .5rem; }
header .who { float: right; color: #555; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left; }
.status-approved { color: #060; } .status-pending { color: #a60; }
#log { border: 1px solid #ccc; height: 20rem; overflow-y: auto; padding: .5rem; }
#log .system { color: #777; font-style: italic; }
"""
CHAT_JS: Final = """\
"use strict";
const log = document.getElementById("log");
const form = document.getElementById("send");
const input = document.getElementById("text");
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const socket = new WebSocket(scheme + "//" + location.host + form.dataset.ws);
function show(line, cls) {
  const p = document.createElement("p");
  if (cls) p.className = cls;
  p.textContent = line;
  log.appendChild(p);
  log.scrollTop = log.scrollHeight;
}
socket.onmessage = (event) => {
  const m = JSON.parse(event.data);
  const at = new Date(m.ts * 1000).toLocaleTimeString();
  if (m.type === "message") show(at + " " + m.from + ": " + m.text);
  else show(at + " " + m.user + " " + m.type + "ed", "system");
};
socket.onclose = (event) => show("disconnected (" + event.code + ")", "system");
form.onsubmit = (event) => {
  event.preventDefault();
  if (input.value) { socket.send(input.value); input.value = ""; }
};
"""

JsonObject = dict[str, Any]
JwksSource = Mapping[str, Any] | str | Callable[[], Awaitable[Mapping[str, Any]]]
"""A key set (``{"keys": [...]}``), a URL to fetch it from, or a coroutine function
returning it (for a gateway whose port is known only after the apps started)."""


# --- the gateway's assertion --------------------------------------------------------------


class AssertionTrust:
    """What the demo apps need to verify ``X-Gatewayd-Assertion``: the issuer and the JWKS.

    Shared by the four apps. The JWKS is cached; a token that fails to verify triggers one
    re-fetch (key rotation), at most every ``JWKS_REFRESH_INTERVAL`` seconds.
    """

    def __init__(self, *, clock: Callable[[], float], ssl_context: ssl.SSLContext | None) -> None:
        self._clock = clock
        self._ssl = ssl_context
        self._source: JwksSource | None = None
        self.issuer: str | None = None
        self._cached: Mapping[str, Any] | None = None
        self._failure: InvalidAssertionError | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    def configure(self, source: JwksSource | None, issuer: str | None) -> None:
        """Point at a (new) gateway; forgets the cached key set."""
        self._source, self.issuer = source, issuer
        self._cached, self._failure, self._fetched_at = None, None, float("-inf")

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def verify(self, token: str, audience: str) -> JsonObject:
        """The claims of a valid token; raises InvalidAssertionError otherwise."""
        if self._source is None or self.issuer is None:
            raise InvalidAssertionError("no gateway JWKS/issuer configured")
        jwks = await self._key_set(refresh=False)
        try:
            return self._check(token, jwks, audience)
        except InvalidAssertionError:
            if self._clock() - self._fetched_at < JWKS_REFRESH_INTERVAL:
                raise
        return self._check(token, await self._key_set(refresh=True), audience)

    def _check(self, token: str, jwks: Mapping[str, Any], audience: str) -> JsonObject:
        assert self.issuer is not None
        return verify_assertion(token, jwks, issuer=self.issuer, audience=audience,
                                now=self._clock())

    async def _key_set(self, *, refresh: bool) -> Mapping[str, Any]:
        async with self._lock:  # one fetch at a time; the others use its result
            recent = self._clock() - self._fetched_at < JWKS_REFRESH_INTERVAL
            if self._cached is None and self._failure is not None and recent:
                raise self._failure  # a gateway that is down is not asked on every request
            if self._cached is None or (refresh and not recent):
                self._fetched_at = self._clock()
                try:
                    self._cached = await self._load()  # a failed refresh keeps the old keys
                except InvalidAssertionError as exc:
                    self._failure = exc
                    raise
                self._failure = None
            return self._cached

    async def _load(self) -> Mapping[str, Any]:
        source = self._source
        if isinstance(source, Mapping):
            return source
        try:
            if isinstance(source, str):
                return await self._fetch(source)
            assert source is not None
            return await within(source(), JWKS_TIMEOUT)
        except InvalidAssertionError:
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            raise InvalidAssertionError(f"JWKS unavailable: {exc!r}") from None

    async def _fetch(self, url: str) -> Mapping[str, Any]:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
            )
        ssl_option: ssl.SSLContext | bool = self._ssl if self._ssl is not None else True
        async with self._http.get(url, ssl=ssl_option) as response:
            if response.status != 200:
                raise InvalidAssertionError(f"JWKS unavailable: {url} answered {response.status}")
            document = await response.json(content_type=None)
        if not isinstance(document, dict):
            raise InvalidAssertionError("JWKS unavailable: not a JSON object")
        return document


# --- shared pieces ------------------------------------------------------------------------

TRUST: Final = web.AppKey("trust", AssertionTrust)
SERVICE: Final = web.AppKey("service", str)
CLOCK: Final = web.AppKey[Callable[[], float]]("clock")


def is_identity_header(name: str) -> bool:
    """The gateway's rule for its own headers (DESIGN.md), applied to what arrived here."""
    return name.lower().replace("_", "-").startswith(IDENTITY_PREFIX)


def _joined(request: web.Request, wanted: Callable[[str], bool]) -> dict[str, str]:
    """Header name (as received) → value; repeated headers joined with ", " as HTTP does."""
    found: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        if wanted(name):
            found.setdefault(name, []).append(value)
    return {name: ", ".join(values) for name, values in found.items()}


def request_user(request: web.Request) -> str | None:
    user = request.headers.get(USER_HEADER, "").strip()
    return user or None


async def assertion_report(request: web.Request, user: str | None) -> JsonObject:
    token = request.headers.get(ASSERTION_HEADER)
    report: JsonObject = {"present": token is not None, "verified": False, "claims": None,
                          "error": None, "subject_matches_user_header": None}
    if token is None:
        report["error"] = "no X-Gatewayd-Assertion header"
        return report
    try:
        claims = await request.app[TRUST].verify(token, request.app[SERVICE])
    except InvalidAssertionError as exc:
        report["error"] = str(exc)
        return report
    report.update(verified=True, claims=claims,
                  subject_matches_user_header=claims.get("sub") == user)
    return report


async def whoami(request: web.Request) -> web.Response:
    """What this upstream was told about the request: identity headers and the assertion."""
    user = request_user(request)
    body = {
        "service": request.app[SERVICE],
        "method": request.method,
        "path": request.path,
        "headers": _joined(request, is_identity_header),
        "forwarded": _joined(request, lambda n: n.lower() in {h.lower() for h in
                                                               FORWARDED_HEADERS}),
        "cookies": sorted(request.cookies),
        "assertion": await assertion_report(request, user),
    }
    return web.json_response(body, dumps=_pretty_json)


def _pretty_json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)


def wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def page(request: web.Request, title: str, body: str, *, status: int = 200,
         scripts: tuple[str, ...] = ()) -> web.Response:
    """A complete HTML page; ``title`` is escaped here, ``body`` must already be escaped."""
    service = request.app[SERVICE]
    user = request_user(request)
    who = f"signed in as {html.escape(user)}" if user else "no user (not through the gateway?)"
    script_tags = "".join(
        f'<script src="/{service}/static/{html.escape(name)}" defer></script>' for name in scripts
    )
    text = (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)} — {service}</title>"
        f'<link rel="stylesheet" href="/{service}/static/style.css">{script_tags}</head>'
        f'<body><header><span class="who">{who}</span>'
        f'<a href="/">portal</a> · <a href="/{service}/">{service}</a></header>'
        f"<h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    return web.Response(text=text, status=status, content_type="text/html")


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:  # a WebSocket or streamed reply has sent its headers already
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


async def style(request: web.Request) -> web.Response:
    return web.Response(text=STYLE, content_type="text/css")


def base_app(service: str, trust: AssertionTrust, clock: Callable[[], float],
             client_max_size: int = 1024**2) -> web.Application:
    app = web.Application(middlewares=[security_headers], client_max_size=client_max_size)
    app[SERVICE] = service
    app[TRUST] = trust
    app[CLOCK] = clock
    app.router.add_get(f"/{service}/whoami", whoami)
    app.router.add_get(f"/{service}/static/style.css", style)
    return app


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# --- groupware ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Appointment:
    day: str
    time: str
    title: str
    place: str


@dataclass(frozen=True, slots=True)
class Mail:
    id: int
    sender: str
    subject: str
    received: str
    body: str


SCHEDULE: Final = (
    Appointment("Mon", "09:30", "Section meeting", "Room 3B / web conference"),
    Appointment("Tue", "14:00", "Disaster-prevention drill review", "Web conference"),
    Appointment("Wed", "10:00", "Budget hearing preparation", "Room 5A"),
    Appointment("Fri", "16:00", "Weekly report due", "—"),
)
MAILBOX: Final = (
    Mail(1, "general-affairs@ward.local", "Telework schedule for next month", "09:12",
         "Please enter your telework days in the schedule by Friday."),
    Mail(2, "finance@ward.local", "Approval needed: request 42", "10:40",
         "Request 42 (printer toner) is waiting for a manager's approval."),
    Mail(3, "it-helpdesk@ward.local", "Your device certificate", "11:05",
         "Your telework PC certificate is valid for two years; we renew it with the inventory."),
)


def groupware_app(trust: AssertionTrust, clock: Callable[[], float]) -> web.Application:
    app = base_app("groupware", trust, clock)
    app.router.add_get("/groupware/", groupware_index)
    app.router.add_get("/groupware/schedule", groupware_schedule)
    app.router.add_get("/groupware/mail/", groupware_inbox_redirect)
    app.router.add_get("/groupware/mail/inbox", groupware_inbox)
    app.router.add_get(r"/groupware/mail/{id:\d+}", groupware_mail)
    return app


async def groupware_index(request: web.Request) -> web.Response:
    body = ('<ul><li><a href="/groupware/schedule">Schedule</a></li>'
            '<li><a href="/groupware/mail/inbox">Mail</a></li>'
            '<li><a href="/groupware/whoami">What the gateway told this system</a></li></ul>')
    return page(request, "Groupware", body)


async def groupware_schedule(request: web.Request) -> web.Response:
    rows = "".join(
        f"<tr><td>{a.day}</td><td>{a.time}</td><td>{html.escape(a.title)}</td>"
        f"<td>{html.escape(a.place)}</td></tr>" for a in SCHEDULE
    )
    owner = html.escape(request_user(request) or "nobody")
    body = (f"<p>This week for {owner}.</p><table><tr><th>Day</th><th>Time</th>"
            f"<th>What</th><th>Where</th></tr>{rows}</table>")
    return page(request, "Schedule", body)


async def groupware_inbox_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/groupware/mail/inbox")


async def groupware_inbox(request: web.Request) -> web.Response:
    rows = "".join(
        f'<tr><td>{m.received}</td><td>{html.escape(m.sender)}</td>'
        f'<td><a href="/groupware/mail/{m.id}">{html.escape(m.subject)}</a></td></tr>'
        for m in MAILBOX
    )
    body = f"<table><tr><th>Received</th><th>From</th><th>Subject</th></tr>{rows}</table>"
    return page(request, "Inbox", body)


async def groupware_mail(request: web.Request) -> web.Response:
    wanted = int(request.match_info["id"])
    mail = next((m for m in MAILBOX if m.id == wanted), None)
    if mail is None:
        return page(request, "No such mail", "<p>This message does not exist.</p>", status=404)
    body = (f"<p>From {html.escape(mail.sender)}, {mail.received}</p>"
            f"<p>{html.escape(mail.body)}</p>")
    return page(request, mail.subject, body)


# --- approval -----------------------------------------------------------------------------


@dataclass(slots=True)
class ApprovalRequest:
    id: int
    title: str
    amount_yen: int
    requested_by: str
    approved_by: str | None = None
    approved_at: float | None = None
    comment: str = ""
    assertion_verified: bool = False

    def as_json(self) -> JsonObject:
        return {
            "id": self.id, "title": self.title, "amount_yen": self.amount_yen,
            "requested_by": self.requested_by,
            "status": "approved" if self.approved_by else "pending",
            "approved_by": self.approved_by,
            "approved_at": iso(self.approved_at) if self.approved_at is not None else None,
            "comment": self.comment, "assertion_verified": self.assertion_verified,
        }


REQUESTS: Final = web.AppKey("requests", dict[int, ApprovalRequest])


def initial_requests() -> dict[int, ApprovalRequest]:
    return {
        42: ApprovalRequest(42, "Printer toner for the welfare section", 38_500, "alice"),
        43: ApprovalRequest(43, "Business trip: disaster-prevention conference", 62_000, "alice"),
        44: ApprovalRequest(44, "Laptop battery replacement (tw-pc-017)", 14_300, "carol"),
    }


def approval_app(trust: AssertionTrust, clock: Callable[[], float]) -> web.Application:
    app = base_app("approval", trust, clock, client_max_size=64 * 1024)
    app[REQUESTS] = initial_requests()
    app.router.add_get("/approval/", approval_index)
    app.router.add_get("/approval/requests", approval_list)
    app.router.add_get(r"/approval/requests/{id:\d+}", approval_detail)
    app.router.add_post(r"/approval/requests/{id:\d+}/approve", approval_approve)
    return app


async def approval_index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/approval/requests")


def _status_cell(item: ApprovalRequest) -> str:
    if item.approved_by is None:
        return '<span class="status-pending">pending</span>'
    return f'<span class="status-approved">approved by {html.escape(item.approved_by)}</span>'


async def approval_list(request: web.Request) -> web.Response:
    items = sorted(request.app[REQUESTS].values(), key=lambda r: r.id)
    if wants_json(request):
        return web.json_response({"requests": [r.as_json() for r in items]})
    rows = "".join(
        f'<tr><td><a href="/approval/requests/{r.id}">{r.id}</a></td>'
        f"<td>{html.escape(r.title)}</td><td>¥{r.amount_yen:,}</td>"
        f"<td>{html.escape(r.requested_by)}</td><td>{_status_cell(r)}</td></tr>"
        for r in items
    )
    body = ("<table><tr><th>No.</th><th>Request</th><th>Amount</th><th>By</th>"
            f"<th>Status</th></tr>{rows}</table>")
    return page(request, "Approval requests", body)


def _lookup(request: web.Request) -> ApprovalRequest:
    item = request.app[REQUESTS].get(int(request.match_info["id"]))
    if item is None:
        raise web.HTTPNotFound(text="no such approval request")
    return item


async def approval_detail(request: web.Request) -> web.Response:
    item = _lookup(request)
    if wants_json(request):
        return web.json_response(item.as_json())
    action = (
        f'<form method="post" action="/approval/requests/{item.id}/approve">'
        '<label>Comment <input name="comment" maxlength="500"></label> '
        "<button>Approve</button></form>"
        if item.approved_by is None
        else f"<p>Approved at {iso(item.approved_at or 0)}"
        f"{': ' + html.escape(item.comment) if item.comment else ''}</p>"
    )
    body = (f"<p>{html.escape(item.title)}: ¥{item.amount_yen:,}, requested by "
            f"{html.escape(item.requested_by)}. Status: {_status_cell(item)}.</p>{action}")
    return page(request, f"Request {item.id}", body)


async def approval_approve(request: web.Request) -> web.Response:
    """Record the approval by the user the gateway names; 409 if it was already approved."""
    item = _lookup(request)
    user = request_user(request)
    if user is None:
        raise web.HTTPForbidden(text="no X-Gatewayd-User: only the gateway may send approvals")
    form = await request.post()
    comment = str(form.get("comment", "")).strip()[:APPROVAL_MAX_COMMENT]
    if item.approved_by is not None:
        raise web.HTTPConflict(text=f"request {item.id} was already approved by {item.approved_by}")
    assertion = await assertion_report(request, user)
    item.approved_by, item.approved_at, item.comment = user, request.app[CLOCK](), comment
    item.assertion_verified = bool(
        assertion["verified"] and assertion["subject_matches_user_header"]
    )
    log.info("approval %d approved by %s", item.id, user)
    if wants_json(request):
        return web.json_response(item.as_json())
    raise web.HTTPSeeOther(f"/approval/requests/{item.id}")


# --- files --------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredFile:
    data: bytes
    content_type: str
    modified: float

    @property
    def etag(self) -> str:
        # From the content, not the time: two uploads in the same millisecond still differ.
        return f'"{hashlib.sha256(self.data).hexdigest()[:32]}"'


@dataclass(slots=True)
class FileStore:
    """Paths are relative to ``/files/`` without a trailing slash; ``""`` is the root."""

    max_file_size: int
    max_store_size: int
    files: dict[str, StoredFile] = field(default_factory=dict)
    collections: set[str] = field(default_factory=lambda: {""})

    def used(self) -> int:
        return sum(len(f.data) for f in self.files.values())

    def children(self, collection: str) -> Iterator[str]:
        prefix = collection + "/" if collection else ""
        for path in sorted(self.collections | self.files.keys()):
            if path and path.startswith(prefix) and "/" not in path[len(prefix):]:
                yield path

    def remove_tree(self, path: str) -> None:
        prefix = path + "/"
        for name in [p for p in self.files if p == path or p.startswith(prefix)]:
            del self.files[name]
        self.collections -= {c for c in self.collections if c == path or c.startswith(prefix)}


STORE: Final = web.AppKey("store", FileStore)
FILES_METHODS: Final = ("GET", "HEAD", "PUT", "DELETE", "MKCOL", "PROPFIND", "OPTIONS")


def initial_store(max_file_size: int, max_store_size: int, now: float) -> FileStore:
    store = FileStore(max_file_size, max_store_size)
    store.collections |= {"shared", "shared/minutes"}
    store.files["shared/readme.txt"] = StoredFile(
        b"Shared folder of the section. Managers may upload; staff may read.\n",
        "text/plain; charset=utf-8", now)
    store.files["shared/budget.xlsx"] = StoredFile(
        b"PK\x03\x04 (demo spreadsheet placeholder)",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", now)
    store.files["shared/minutes/2026-04-01.txt"] = StoredFile(
        b"Section meeting minutes: telework rota agreed.\n",
        "text/plain; charset=utf-8", now)
    return store


def files_app(trust: AssertionTrust, clock: Callable[[], float], *, max_file_size: int,
              max_store_size: int) -> web.Application:
    # The body limit is enforced while reading PUT bodies (413), not by aiohttp's form parser.
    app = base_app("files", trust, clock, client_max_size=max_file_size)
    app[STORE] = initial_store(max_file_size, max_store_size, clock())
    app.router.add_route("*", "/files", files_root_redirect)
    app.router.add_route("*", "/files/{path:.*}", files_dispatch)
    return app


async def files_root_redirect(request: web.Request) -> web.Response:
    raise web.HTTPMovedPermanently("/files/")


def store_path(request: web.Request) -> tuple[str, bool]:
    """(path inside the store, whether the URL named a collection); 400 for unsafe paths."""
    raw = request.match_info["path"]
    trailing = raw.endswith("/") or raw == ""
    segments = raw.rstrip("/").split("/") if raw.rstrip("/") else []
    for segment in segments:
        if segment in {"", ".", ".."} or "\x00" in segment or "\\" in segment:
            raise web.HTTPBadRequest(text="invalid path")
    return "/".join(segments), trailing


def href(path: str, collection: bool) -> str:
    url = "/files/" + quote(path, safe="/")
    return url + "/" if collection and path else url


async def files_dispatch(request: web.Request) -> web.StreamResponse:
    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
        "GET": files_get, "HEAD": files_get, "PUT": files_put, "DELETE": files_delete,
        "MKCOL": files_mkcol, "PROPFIND": files_propfind, "OPTIONS": files_options,
    }
    handler = handlers.get(request.method)
    if handler is None:
        raise web.HTTPMethodNotAllowed(request.method, FILES_METHODS)
    return await handler(request)


async def files_options(request: web.Request) -> web.Response:
    return web.Response(headers={"DAV": "1", "Allow": ", ".join(FILES_METHODS),
                                 "MS-Author-Via": "DAV"})


async def files_get(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    path, _ = store_path(request)
    if path in store.collections:
        return _listing(request, store, path)
    stored = store.files.get(path)
    if stored is None:
        raise web.HTTPNotFound(text="no such file")
    headers = {"ETag": stored.etag, "Last-Modified": formatdate(stored.modified, usegmt=True)}
    if request.headers.get("If-None-Match") == stored.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=stored.data, headers={**headers, "Content-Type": stored.content_type})


def _listing(request: web.Request, store: FileStore, path: str) -> web.Response:
    rows = []
    for child in store.children(path):
        name = child.rsplit("/", 1)[-1]
        is_collection = child in store.collections
        size = "" if is_collection else f"{len(store.files[child].data):,} bytes"
        label = html.escape(name + ("/" if is_collection else ""))
        rows.append(f'<tr><td><a href="{html.escape(href(child, is_collection))}">{label}'
                    f"</a></td><td>{size}</td></tr>")
    body = (f"<table><tr><th>Name</th><th>Size</th></tr>{''.join(rows)}</table>"
            "<p>Upload with WebDAV (managers): <code>curl -T FILE URL</code> through the "
            "gateway, or map the folder as a network drive.</p>")
    return page(request, "/files/" + path, body)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


async def files_put(request: web.Request) -> web.Response:
    store = request.app[STORE]
    path, trailing = store_path(request)
    if trailing or path in store.collections:
        raise web.HTTPMethodNotAllowed("PUT", FILES_METHODS, text="cannot PUT a collection")
    if _parent(path) not in store.collections:
        raise web.HTTPConflict(text="the parent collection does not exist (MKCOL it first)")
    data = await _read_limited(request, store, replacing=store.files.get(path))
    created = path not in store.files
    content_type = request.headers.get("Content-Type", "application/octet-stream")
    store.files[path] = StoredFile(data, content_type, request.app[CLOCK]())
    headers = {"ETag": store.files[path].etag}
    return web.Response(status=201 if created else 204, headers=headers)


async def _read_limited(request: web.Request, store: FileStore,
                        replacing: StoredFile | None) -> bytes:
    """Read a PUT body, refusing (413) more than the per-file or whole-store limit."""
    room = store.max_store_size - store.used() + (len(replacing.data) if replacing else 0)
    limit = min(store.max_file_size, room)
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(limit, request.content_length)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(limit, size)
        chunks.append(chunk)
    return b"".join(chunks)


async def files_delete(request: web.Request) -> web.Response:
    store = request.app[STORE]
    path, _ = store_path(request)
    if path == "":
        raise web.HTTPForbidden(text="the root collection cannot be deleted")
    if path not in store.files and path not in store.collections:
        raise web.HTTPNotFound(text="no such file")
    store.remove_tree(path)
    return web.Response(status=204)


async def files_mkcol(request: web.Request) -> web.Response:
    store = request.app[STORE]
    path, _ = store_path(request)
    if path in store.collections or path in store.files:
        raise web.HTTPMethodNotAllowed("MKCOL", FILES_METHODS, text="already exists")
    if _parent(path) not in store.collections:
        raise web.HTTPConflict(text="the parent collection does not exist")
    if request.content_length:
        raise web.HTTPUnsupportedMediaType(text="MKCOL takes no body")
    store.collections.add(path)
    return web.Response(status=201)


async def files_propfind(request: web.Request) -> web.Response:
    """Depth 0 or 1 multistatus with the live properties; infinite depth is refused (403)."""
    store = request.app[STORE]
    path, _ = store_path(request)
    if path not in store.collections and path not in store.files:
        raise web.HTTPNotFound(text="no such file")
    depth = request.headers.get("Depth", "infinity").strip().lower()
    if depth not in {"0", "1"}:
        return web.Response(status=403, content_type="application/xml", text=(
            '<?xml version="1.0" encoding="utf-8"?>\n'
            '<D:error xmlns:D="DAV:"><D:propfind-finite-depth/></D:error>\n'))
    await request.read()  # the requested property names do not matter: all are returned
    paths = [path]
    if depth == "1" and path in store.collections:
        paths.extend(store.children(path))
    return web.Response(status=207, body=multistatus(store, paths),
                        content_type="application/xml", charset="utf-8")


def multistatus(store: FileStore, paths: list[str]) -> bytes:
    ET.register_namespace("D", "DAV:")
    root = ET.Element("{DAV:}multistatus")
    for path in paths:
        is_collection = path in store.collections
        response = ET.SubElement(root, "{DAV:}response")
        ET.SubElement(response, "{DAV:}href").text = href(path, is_collection)
        propstat = ET.SubElement(response, "{DAV:}propstat")
        prop = ET.SubElement(propstat, "{DAV:}prop")
        ET.SubElement(prop, "{DAV:}displayname").text = path.rsplit("/", 1)[-1]
        kind = ET.SubElement(prop, "{DAV:}resourcetype")
        if is_collection:
            ET.SubElement(kind, "{DAV:}collection")
        else:
            stored = store.files[path]
            ET.SubElement(prop, "{DAV:}getcontentlength").text = str(len(stored.data))
            ET.SubElement(prop, "{DAV:}getcontenttype").text = stored.content_type
            ET.SubElement(prop, "{DAV:}getetag").text = stored.etag
            ET.SubElement(prop, "{DAV:}getlastmodified").text = formatdate(
                stored.modified, usegmt=True)
        ET.SubElement(propstat, "{DAV:}status").text = "HTTP/1.1 200 OK"
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + document


# --- chat ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ChatRoom:
    members: set[web.WebSocketResponse] = field(default_factory=set)
    history: deque[JsonObject] = field(default_factory=lambda: deque(maxlen=CHAT_HISTORY))

    async def broadcast(self, event: JsonObject, *, keep: bool) -> None:
        if keep:
            self.history.append(event)
        text = json.dumps(event, ensure_ascii=False)
        for member in list(self.members):
            # A member that went away meanwhile is dropped by its own handler.
            with contextlib.suppress(ConnectionError, RuntimeError):
                await member.send_str(text)


ROOM: Final = web.AppKey("room", ChatRoom)


def chat_app(trust: AssertionTrust, clock: Callable[[], float]) -> web.Application:
    app = base_app("chat", trust, clock)
    app[ROOM] = ChatRoom()
    app.router.add_get("/chat/", chat_page)
    app.router.add_get("/chat/static/chat.js", chat_script)
    app.router.add_get("/chat/ws", chat_socket)
    app.on_shutdown.append(close_chat_members)
    return app


async def chat_page(request: web.Request) -> web.Response:
    body = ('<div id="log"></div><form id="send" data-ws="/chat/ws">'
            '<input id="text" maxlength="2000" autocomplete="off" autofocus> '
            "<button>Send</button></form>")
    return page(request, "Section chat", body, scripts=("chat.js",))


async def chat_script(request: web.Request) -> web.Response:
    return web.Response(text=CHAT_JS, content_type="text/javascript")


async def chat_socket(request: web.Request) -> web.WebSocketResponse:
    """One member of the room; the sender of each message is the gateway-named user."""
    user = request_user(request)
    if user is None:
        raise web.HTTPForbidden(text="no X-Gatewayd-User: only the gateway may connect")
    room, clock = request.app[ROOM], request.app[CLOCK]
    socket = web.WebSocketResponse(heartbeat=30.0, max_msg_size=16 * 1024)
    await socket.prepare(request)
    for event in room.history:
        await socket.send_str(json.dumps(event, ensure_ascii=False))
    room.members.add(socket)
    try:
        await room.broadcast({"type": "join", "user": user, "ts": clock()}, keep=False)
        async for message in socket:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue  # binary frames are not chat; errors end the loop by themselves
            text = message.data.strip()[:CHAT_MAX_MESSAGE]
            if text:
                await room.broadcast({"type": "message", "from": user, "text": text,
                                      "ts": clock()}, keep=True)
    finally:
        room.members.discard(socket)
        await room.broadcast({"type": "leave", "user": user, "ts": clock()}, keep=False)
    return socket


async def close_chat_members(app: web.Application) -> None:
    for member in list(app[ROOM].members):
        await member.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")


# --- running them -------------------------------------------------------------------------


# The shipped policy's TCP destinations (policies/10-services.yaml), alice's and bob's office
# PCs by their demo ``office_pc`` attributes.
DEMO_TCP_DESTINATIONS: Final[Mapping[str, str]] = MappingProxyType({
    "fileserver.ward.local:445": "SMB file server",
    "mail.ward.local:993": "IMAPS mail server",
    "mail.ward.local:587": "SMTP submission server",
    "pc-0042.ward.local:3389": "alice's office PC (remote desktop)",
    "pc-0107.ward.local:3389": "bob's office PC (remote desktop)",
})
TCP_FIRST_BYTES_WAIT: Final = 0.5  # seconds to wait for an HTTP request before greeting
_HTTP_METHODS: Final = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"OPTIONS ")


def tcp_service(name: str, destination: str
                ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A connection handler: a one-line HTTP page for an HTTP client, else greet and echo."""
    text = f"gatewayd demo: {name} ({destination}), reached through an SSH tunnel.\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                first = await within(reader.read(65536), TCP_FIRST_BYTES_WAIT)
            except TimeoutError:
                first = b""
            if first.startswith(_HTTP_METHODS):
                body = text.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: " + str(len(body)).encode() +
                             b"\r\nConnection: close\r\n\r\n" + body)
            else:
                writer.write(text.replace("\n", " What you type comes back.\r\n").encode() + first)
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            writer.close()

    return handle


class DemoApps:
    """The running demo upstreams: ``urls[service]`` is the origin to put in
    ``upstreams.<service>.url``; ``url(service)`` adds the path prefix; ``tcp[destination]``
    is the ``host:port`` to put in ``ssh.address_overrides``."""

    def __init__(self, runners: dict[str, web.AppRunner], urls: dict[str, str],
                 apps: dict[str, web.Application], trust: AssertionTrust, *,
                 tcp_servers: list[asyncio.Server] | None = None,
                 tcp: Mapping[str, str] | None = None) -> None:
        self._runners = runners
        self.urls: Mapping[str, str] = urls
        self.apps: Mapping[str, web.Application] = apps
        self._trust = trust
        self._tcp_servers = tcp_servers or []
        self.tcp: Mapping[str, str] = MappingProxyType(dict(tcp or {}))

    def url(self, service: str) -> str:
        return f"{self.urls[service]}/{service}/"

    def configure_gateway(self, jwks_source: JwksSource | None, issuer: str | None) -> None:
        """Tell the apps which gateway to trust (e.g. once its port is known)."""
        self._trust.configure(jwks_source, issuer)

    async def close(self) -> None:
        """Stop every app (chat members get 1001 going away) and the JWKS client."""
        try:
            for server in self._tcp_servers:
                server.close()
            for runner in self._runners.values():
                await runner.cleanup()
        finally:
            await self._trust.close()

    async def __aenter__(self) -> DemoApps:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _require_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"demo apps trust X-Gatewayd-User and must only listen on loopback, not {host!r}"
        )


async def start_demo_apps(
    host: str = "127.0.0.1",
    jwks_source: JwksSource | None = None,
    *,
    issuer: str | None = None,
    jwks_ssl: ssl.SSLContext | None = None,
    clock: Callable[[], float] = time.time,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    max_store_size: int = DEFAULT_MAX_STORE_SIZE,
) -> DemoApps:
    """Start the four demo apps on free loopback ports.

    ``jwks_source`` and ``issuer`` (the gateway's ``https.public_url``) say how to verify
    ``X-Gatewayd-Assertion``; both may be given later with ``DemoApps.configure_gateway``.
    ``jwks_ssl`` verifies an ``https://`` JWKS URL (e.g. against the demo's server CA).
    ``clock`` (Unix seconds) timestamps approvals and messages and checks token expiry.
    """
    _require_loopback(host)
    trust = AssertionTrust(clock=clock, ssl_context=jwks_ssl)
    trust.configure(jwks_source, issuer)
    apps = {
        "groupware": groupware_app(trust, clock),
        "approval": approval_app(trust, clock),
        "files": files_app(trust, clock, max_file_size=max_file_size,
                           max_store_size=max_store_size),
        "chat": chat_app(trust, clock),
    }
    runners: dict[str, web.AppRunner] = {}
    urls: dict[str, str] = {}
    servers: list[asyncio.Server] = []
    tcp: dict[str, str] = {}
    try:
        for service, app in apps.items():
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            runners[service] = runner
            await runner.setup()
            site = web.TCPSite(runner, host, 0)
            await site.start()
            urls[service] = _origin(runner)
        for destination, name in DEMO_TCP_DESTINATIONS.items():
            server = await asyncio.start_server(tcp_service(name, destination), host, 0)
            servers.append(server)
            tcp[destination] = f"{host}:{server.sockets[0].getsockname()[1]}"
    except BaseException:
        await DemoApps(runners, urls, apps, trust, tcp_servers=servers, tcp=tcp).close()
        raise
    return DemoApps(runners, urls, apps, trust, tcp_servers=servers, tcp=tcp)


def _origin(runner: web.AppRunner) -> str:
    address = runner.addresses[0]
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
