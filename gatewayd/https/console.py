"""The audit console at ``/.gatewayd/admin/``: search the audit log, see who is connected,
end a session, check the chain, download a search, open the usage report.

Owns the console's pages (server-rendered Jinja2 templates in ``gatewayd/templates/``,
autoescaped, no script at all), their input validation, the ``audit.read`` records and the
console's session kill. Routes, all below ``CONSOLE_PREFIX``:

============================== ====== ============================================================
path                           method what
============================== ====== ============================================================
``""``                         GET    search form; with a query, results newest first
                                      (``before_seq`` pages to older records)
``records/<seq>``              GET    one record, every field, links to its session / user /
                                      device
``sessions``                   GET    who is connected now, an "end session" form per session
``sessions/kill``              POST   end one session (CSRF token + reason required)
``chain``                      GET    last signed checkpoint, verified with the public key
``export.{csv,jsonl}``         GET    the current search as a streamed download
``report``                     GET    the monthly usage report (``?month=YYYY-MM``)
``console.css``                GET    the console's table styles (the portal's are narrow)
============================== ====== ============================================================

**Authorisation is the policy's, not the console's.** Every console request runs through the
same `RequestFlow` as a proxied request (`_ConsoleFlow` overrides only the final step: instead
of proxying an allowed request it serves the page): authentication by the frontend, the
cross-origin check for writes, the pure ``decide()`` for service ``admin``, ``access.deny``
pages and the step-up redirect when the rule's ``mfa_max_age`` is exceeded. A path the policy
routes to any other service is a 404 here. ``[console] enabled = false`` makes every console
URL a 404 for everyone.

**Reading is audited, before it is shown.** A search, a record view, an export, a chain view
and a report view each write ``audit.read`` (the reader's session fields, ``view``, the
filter as ``filter_*`` fields, ``records`` returned) *before* the page is sent — also when it
found nothing (a record that does not exist, a month without records: a read that found
nothing is still a read); if it cannot be written the answer is 503, whatever
``audit.on_failure`` says (a reader nobody can later name is what the rule is there to
prevent). An export is recorded before its first byte, so its record carries the filter but
not the count. The sessions page shows the gateway's live state, not the audit log, and is
not recorded (as the admin socket's session list).

**Input.** Every number in a URL (``before_seq``, ``records/<seq>``, a report month) is
ASCII digits, `SEQ_DIGITS` / ``YYYY-MM`` (``\\d`` and ``str.isdigit`` also accept other
Unicode digits); a report year lies in `MONTH_YEARS`. Bad input is a 400 page, never a 500.

**Kill.** The same audit record and end reason as the admin socket's ``POST /v1/kill``:
``admin.session_kill`` (``operator`` = the auditor's user name, ``via = "console"``) via
`Gateway.record_admin_kill`, written before the session ends (503 and nothing ended if it
cannot be written), then ``SessionRegistry.end(session, "admin_kill")``. An auditor cannot end
the session they are using from the console (that is what "Sign out" is for; it also keeps a
slip of the mouse from locking the investigator out mid-investigation).

**Chain status** (`ChainWatch`) follows the live file incrementally: each view reads only the
bytes appended since the previous view, checks each new record's hash and its link to the one
before, and verifies each new checkpoint's Ed25519 signature with the log's public key (and
that it covers the record just before it). The first view after start reads the live file
once (it is bounded by ``audit.rotate_size`` and by the daily rotation); rotation restarts
the watch on the new file. It never re-reads the whole log per page view.

**Threads.** Blocking work (index, chain, report) runs in the console's *own* small thread
pool (`WORKERS` threads, never the loop's default executor, which logins use for TOTP and
directory look-ups), in one `_Lane` per kind: at most one index call, one chain check and
one report build at a time. A request whose kind of work is running waits on the event loop
(no thread) up to `BUSY_WAIT`, then gets 503 "busy, try again"; work that outlives its
timeout (``SEARCH_TIMEOUT``, ``CHAIN_TIMEOUT``, ``REPORT_TIMEOUT`` → 503) keeps its lane busy
until its thread returns, so slow work never piles up threads. `AuditConsole.close` shuts
the pool down (the gateway's stop should call it; otherwise it goes with the console).

The search index (`gatewayd.audit.index.AuditIndex`, in ``state_dir/audit-index``) is one per
console, i.e. per Gateway; each request refreshes it incrementally with at most
`REFRESH_SECONDS` of indexing, so a first indexing of a large log is spread over page views
while the search page says "Indexing: N % done, results may be incomplete". A search page
whose index read was incomplete (a file rotated away or removed meanwhile) says so.

**Export** streams one index page per thread call (bounded by records scanned, not found).
A CSV/JSONL download that cannot finish (a timeout, the log changed under it,
`EXPORT_MAX_RECORDS`) ends with a visible ``EXPORT INCOMPLETE: <why>`` line (JSONL:
``{"export_incomplete": true, ...}``) and a clean end of the body; nothing keeps scanning
after the download ended. An export is refused (503) while the index is still being built.

**Report**: one build at a time, kept per month (`REPORT_CACHE` months) while the log's files
are unchanged (the live file's growth counts only while it may hold records of that month);
a file removed by rotation or retention during a build means one retry, then a 503.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import csv
import io
import json
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import jinja2
from aiohttp import web

from gatewayd.admin import session_view
from gatewayd.audit import AuditWriteError
from gatewayd.audit.chain import parse_line, record_hash
from gatewayd.audit.files import read_first_line, rotated_siblings
from gatewayd.audit.query import RecordFilter, record_time
from gatewayd.audit.signing import (
    AuditKeyError,
    default_public_key_paths,
    load_public_keys,
    signature_valid,
)
from gatewayd.https import pages
from gatewayd.https.context import FrontendContext
from gatewayd.https.csrf import CsrfTokens
from gatewayd.https.flow import Channels, RequestFlow, audit_fields, respond
from gatewayd.https.forms import FormError, read_form
from gatewayd.https.guard import GATEWAY_PAGE_HEADERS, NO_STORE, PROXIED
from gatewayd.tasks import within

if TYPE_CHECKING:
    from gatewayd.audit.index import AuditIndex, SearchPage
    from gatewayd.certs import DeviceIdentity
    from gatewayd.policy import AccessRequest, Decision
    from gatewayd.report import UsageReport
    from gatewayd.sessions import Session

T = TypeVar("T")

CONSOLE_PREFIX: Final = "/.gatewayd/admin/"
SERVICE: Final = "admin"
VIA: Final = "console"  # the admin.session_kill marker of a kill made here
KILL_PURPOSE: Final = "console-kill"  # CSRF token purpose of the kill form

MAX_FIELD_CHARS: Final = 256  # user, device, event, service, session, source_ip
MAX_TEXT_CHARS: Final = 200  # free-text search
MAX_REASON_CHARS: Final = 200  # a kill's reason (the admin socket allows the same)
MAX_FORM_BYTES: Final = 4096
SEARCH_TIMEOUT: Final = 20.0  # seconds for one index refresh + search (a worker thread)
REFRESH_SECONDS: Final = 5.0  # index refresh per request; a first indexing goes on next time
CHAIN_TIMEOUT: Final = 20.0
REPORT_TIMEOUT: Final = 60.0
REPORT_CACHE: Final = 12  # usage reports (months) kept rendered
BUSY_WAIT: Final = 2.0  # seconds a request waits (on the loop) for its kind of work to free
WORKERS: Final = 3  # the console's own threads: one per lane (index, chain, report)
EXPORT_BATCH: Final = 500  # records fetched (and rendered) per worker-thread call
EXPORT_MAX_RECORDS: Final = 1_000_000  # a download stops here (the CLI exists for more)
CHAIN_MAX_LINES: Final = 2_000_000  # lines one chain view reads; the next view goes on
REPORT_CSP: Final = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                     "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
RESULTS: Final = ("success", "failure")
FORM_KEYS: Final = ("user", "device", "event", "service", "result", "session", "source_ip",
                    "text", "from", "to")
# The one rule for a number in a URL: ASCII digits only (``\d`` and str.isdigit() also accept
# other Unicode digits, which int() then refuses or reads differently).
SEQ_DIGITS: Final = "[0-9]{1,19}"
MONTH_YEARS: Final = (2000, 2999)  # a report month's year (a later one overflows datetime)
_HANDLE = re.compile(r"[0-9a-f]{8,64}")
_SEQ = re.compile(SEQ_DIGITS)
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_RECORD = re.compile(rf"records/({SEQ_DIGITS})")

# Wider pages and tables, on top of the portal's stylesheet (a file next to the templates
# would not be packaged: pyproject packages templates/*.html only).
CONSOLE_CSS: Final = """\
main.console { max-width: 90rem; }
nav.console a { margin-right: 1rem; }
form.search { display: grid; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr));
              gap: 0 1rem; align-items: end; }
form.search input, form.search select { width: 100%; padding: .35rem; font-size: .95rem; }
table { border-collapse: collapse; width: 100%; font-size: .9rem; margin: 1rem 0; }
th, td { border-bottom: 1px solid var(--line); padding: .3rem .5rem; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th { font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
#sessions th, #sessions td { white-space: nowrap; overflow-wrap: normal; }
form.kill { display: flex; gap: .5rem; align-items: center; }
form.kill input[type=text] { width: 10rem; padding: .3rem; }
form.kill button { margin: 0; padding: .3rem .8rem; background: #b00020; }
.ok { border-left: 4px solid #2e7d32; padding: .5rem .75rem; background: #2e7d3214; }
"""

# Shown first on a record's page, in this order; the rest alphabetically.
DETAIL_ORDER: Final = ("seq", "ts", "event", "user", "operator", "device", "source_ip",
                       "session", "frontend", "service", "method", "path", "dest", "rule",
                       "reason", "status", "error")


class ConsoleContext(FrontendContext, Protocol):
    """The gateway as the console sees it: the frontend's view plus the admin kill record."""

    def record_admin_kill(self, *, operator: str, selector: tuple[str, str], reason: str,
                          sessions: list[Session], via: str | None = None) -> None: ...


class ConsoleInputError(ValueError):
    """A query or form value the console cannot use: a 400 page with this message."""


class ConsoleBusyError(Exception):
    """The console cannot take this work now (its kind of work is running): a 503 page."""


# --- the search form -------------------------------------------------------------------------


def _text_value(query: Mapping[str, str], name: str, limit: int) -> str | None:
    value = query.get(name, "").strip()
    if not value:
        return None
    if len(value) > limit:
        raise ConsoleInputError(f"{name}: at most {limit} characters")
    if not value.isprintable():
        raise ConsoleInputError(f"{name}: control characters are not allowed")
    return value


def parse_local_time(value: str | None, zone: ZoneInfo, name: str) -> datetime | None:
    """A ``datetime-local`` value (``2026-11-24T09:30``) in the audit timezone."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConsoleInputError(
            f"{name}: expected a date and time such as 2026-11-24T09:30") from None
    if moment.tzinfo is not None:
        raise ConsoleInputError(f"{name}: give a local time without a timezone")
    return moment.replace(tzinfo=zone)


def local_input(moment: datetime, zone: ZoneInfo) -> str:
    """``moment`` as a ``datetime-local`` value in ``zone``."""
    return moment.astimezone(zone).strftime("%Y-%m-%dT%H:%M")


@dataclass(frozen=True)
class SearchForm:
    """A validated search: what was typed (to fill the form again) and the filter."""

    user: str | None = None
    device: str | None = None
    event: str | None = None
    service: str | None = None
    result: str | None = None
    session: str | None = None
    source_ip: str | None = None
    text: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_seq: int | None = None
    raw: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, query: Mapping[str, str], zone: ZoneInfo) -> SearchForm:
        """Raises ConsoleInputError with a message for the person."""
        names = ("user", "device", "event", "service", "session", "source_ip")
        values = {name: _text_value(query, name, MAX_FIELD_CHARS) for name in names}
        result = _text_value(query, "result", 16)
        if result is not None and result not in RESULTS:
            raise ConsoleInputError("result: choose success or failure")
        since = parse_local_time(_text_value(query, "from", 40), zone, "from")
        until = parse_local_time(_text_value(query, "to", 40), zone, "to")
        if since is not None and until is not None and until <= since:
            raise ConsoleInputError("to: must be later than from")
        return cls(
            **values, result=result, text=_text_value(query, "text", MAX_TEXT_CHARS),
            since=since, until=until, before_seq=_before_seq(query.get("before_seq")),
            raw={k: query.get(k, "").strip() for k in FORM_KEYS},
        )

    @property
    def submitted(self) -> bool:
        return any(self.raw.values()) or self.before_seq is not None

    def record_filter(self) -> RecordFilter:
        return RecordFilter(user=self.user, device=self.device, event=self.event,
                            service=self.service, result=self.result, session=self.session,
                            source_ip=self.source_ip, text=self.text, since=self.since,
                            until=self.until)

    def audit_fields(self) -> dict[str, object]:
        """The filter as ``audit.read`` fields (only those given)."""
        fields: dict[str, object] = {
            f"filter_{name}": value for name, value in (
                ("user", self.user), ("device", self.device), ("event", self.event),
                ("service", self.service), ("result", self.result), ("session", self.session),
                ("source_ip", self.source_ip), ("text", self.text),
                ("since", self.since.isoformat() if self.since else None),
                ("until", self.until.isoformat() if self.until else None),
            ) if value is not None
        }
        if self.before_seq is not None:
            fields["before_seq"] = self.before_seq
        return fields

    def query_string(self, before_seq: int | None = None) -> str:
        pairs = [(k, v) for k, v in self.raw.items() if v]
        if before_seq is not None:
            pairs.append(("before_seq", str(before_seq)))
        return urlencode(pairs)


def _before_seq(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    if _SEQ.fullmatch(value) is None:
        raise ConsoleInputError("before_seq: expected a record number")
    return int(value)


def parse_month(value: str | None, now: datetime) -> tuple[str, datetime, datetime]:
    """``YYYY-MM`` (default: the month of ``now``) → (label, first instant, next month's)."""
    if not value:
        value = now.strftime("%Y-%m")
    match = _MONTH.fullmatch(value)
    low, high = MONTH_YEARS
    if (match is None or not 1 <= int(match.group(2)) <= 12
            or not low <= int(match.group(1)) <= high):
        raise ConsoleInputError(
            f"month: expected a month such as 2026-11 (years {low}-{high})")
    year, month = int(match.group(1)), int(match.group(2))
    start = datetime(year, month, 1, tzinfo=now.tzinfo)
    days = calendar.monthrange(year, month)[1]
    return value, start, start + timedelta(days=days)


# --- chain status ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainStatus:
    """What the chain page shows."""

    file: str
    records_checked: int  # since the console started watching this file
    last_seq: int | None
    checkpoint_seq: int | None  # the last checkpoint record's own seq
    checkpoint_covers: int | None
    checkpoint_ts: str | None
    checkpoint_key: str | None
    verified: bool  # the last checkpoint's signature (and everything read) checked out
    unsigned: int  # records after the last checkpoint
    problem: str | None


class ChainWatch:
    """Incremental verification of the live audit file (see module docstring). Thread-safe;
    the work runs in a worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset(None)

    def _reset(self, identity: tuple[int, int] | None) -> None:
        self._identity = identity  # (st_dev, st_ino) of the file watched
        self._offset = 0
        self._prev_hash: str | None = None
        self._last_seq: int | None = None
        self._checked = 0
        self._checkpoint: dict[str, Any] | None = None
        self._unsigned = 0
        self._problem: str | None = None

    def status(self, live: Path) -> ChainStatus:
        with self._lock:
            self._follow(live)
            cp = self._checkpoint
            return ChainStatus(
                file=live.name, records_checked=self._checked, last_seq=self._last_seq,
                checkpoint_seq=cp["seq"] if cp else None,
                checkpoint_covers=cp.get("covers_seq") if cp else None,
                checkpoint_ts=cp["ts"] if cp else None,
                checkpoint_key=cp.get("key_id") if cp else None,
                verified=cp is not None and self._problem is None,
                unsigned=self._unsigned, problem=self._problem)

    def _follow(self, live: Path) -> None:
        try:
            stat = live.stat()
        except OSError as exc:
            self._problem = f"cannot read {live.name}: {exc.strerror}"
            return
        identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity or stat.st_size < self._offset:
            self._reset(identity)  # a new file (rotation): start over on it
        keyring = self._keyring(live)
        with live.open("rb") as stream:
            stream.seek(self._offset)
            for _ in range(CHAIN_MAX_LINES):
                line = stream.readline()
                if not line.endswith(b"\n"):
                    break  # a record being written: read it next time
                self._offset += len(line)
                self._check(line[:-1], keyring)

    def _keyring(self, live: Path) -> Mapping[str, Any]:
        try:
            return load_public_keys(default_public_key_paths(live))
        except AuditKeyError as exc:
            self._problem = str(exc)
            return {}

    def _check(self, line: bytes, keyring: Mapping[str, Any]) -> None:
        record = parse_line(line)
        if record is None or not isinstance(record.get("seq"), int):
            self._fail(f"an unreadable line after seq {self._last_seq}")
            return
        seq = record["seq"]
        if record.get("hash") != record_hash(record):
            self._fail(f"seq {seq}: the record does not match its hash (edited)")
        elif self._prev_hash is not None and record.get("prev") != self._prev_hash:
            self._fail(f"seq {seq}: does not chain to the record before it")
        if record.get("event") == "audit.checkpoint":
            self._check_checkpoint(record, keyring)
        else:
            self._unsigned += 1
        self._prev_hash, self._last_seq = record.get("hash"), seq
        self._checked += 1

    def _check_checkpoint(self, record: dict[str, Any], keyring: Mapping[str, Any]) -> None:
        self._checkpoint, self._unsigned = record, 0
        seq, covers, covers_hash = record["seq"], record.get("covers_seq"), record.get(
            "covers_hash")
        key = keyring.get(str(record.get("key_id")))
        if key is None:
            self._fail(f"checkpoint seq {seq}: signed by a key that is not the log's")
        elif not isinstance(covers, int) or not isinstance(covers_hash, str) or not (
                signature_valid(key, str(record.get("sig")), node=str(record.get("node")),
                                seq=covers, hash_hex=covers_hash, ts=str(record.get("ts")),
                                reason=_text_or_none(record.get("reason")))):
            self._fail(f"checkpoint seq {seq}: the signature is not valid")
        elif self._prev_hash is not None and (covers_hash != self._prev_hash
                                              or covers != self._last_seq):
            self._fail(f"checkpoint seq {seq}: does not cover the record before it")

    def _fail(self, problem: str) -> None:
        if self._problem is None:  # the first problem is the one to investigate
            self._problem = problem


# --- the console's threads ---------------------------------------------------------------------


class _Lane:
    """One kind of console work (index, chain, report) in the console's own executor, at most
    one at a time. A request whose kind of work is running waits for it *on the event loop*
    (no thread held) for up to ``wait`` seconds, then gets ConsoleBusyError (503). Work that
    outlives its timeout keeps its lane busy until its thread returns, so threads never pile
    up behind a slow call, and the loop's default executor (logins: TOTP, directory look-ups)
    is never used by the console."""

    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._executor = executor
        self._running: concurrent.futures.Future[Any] | None = None

    async def run(self, work: Callable[[], T], seconds: float, *, wait: float) -> T:
        """``work()`` in a thread of this lane, bounded by ``seconds`` (TimeoutError)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self._running is not None and not self._running.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ConsoleBusyError
            await asyncio.wait([asyncio.wrap_future(self._running)], timeout=remaining)
        try:
            future = self._executor.submit(work)
        except RuntimeError:  # shut down: the gateway is stopping
            raise ConsoleBusyError from None
        self._running = future
        return await within(asyncio.wrap_future(future), seconds)


class _ExportText:
    """An export rendered batch by batch (one worker-thread call each): the CSV header once,
    and the final line that says an export is incomplete."""

    def __init__(self, suffix: str) -> None:
        from gatewayd.audit import export  # noqa: PLC0415 - the index's sibling

        self.csv = suffix == "csv"
        self._iter_csv, self._iter_jsonl = export.iter_csv, export.iter_jsonl
        self._header = "".join(export.iter_csv((), bom=False)) if self.csv else ""
        self._first = True

    def batch(self, records: Iterable[Mapping[str, Any]]) -> str:
        if not self.csv:
            return "".join(self._iter_jsonl(records))
        text = "".join(self._iter_csv(records, bom=self._first))
        if not self._first:
            text = text.removeprefix(self._header)
        self._first = False
        return text

    def incomplete(self, reason: str, written: int) -> str:
        """The last line of an export that stopped early: visible in any viewer."""
        head = self.batch(()) if self.csv and self._first else ""
        message = (f"EXPORT INCOMPLETE: {reason}. {written} records were written above; "
                   "the rest of the search is missing.")
        if not self.csv:
            return json.dumps({"export_incomplete": True, "reason": reason,
                               "records": written}, sort_keys=True) + "\n"
        buffer = io.StringIO()
        csv.writer(buffer, dialect="excel", lineterminator="\r\n").writerow([message])
        return head + buffer.getvalue()


# --- the console -----------------------------------------------------------------------------


Serve = Callable[..., Awaitable[web.StreamResponse]]
Page = Callable[["_Reader"], Awaitable[web.StreamResponse]]


class _ConsoleFlow(RequestFlow):
    """The proxied-request flow (authentication, origin check, decide, deny, step-up), whose
    last step serves a console page instead of proxying."""

    def __init__(self, ctx: FrontendContext, serve: Serve) -> None:
        super().__init__(ctx, Channels())
        self._serve = serve

    def _proxy(
        self, request: web.Request, *, session: Session, device: DeviceIdentity | None,
        service: str, access: AccessRequest, decision: Decision, websocket: bool, writes: bool,
    ) -> Awaitable[web.StreamResponse]:
        return self._serve(request, session=session, device=device, service=service,
                           websocket=websocket)


@dataclass(frozen=True)
class _Reader:
    """Who is reading (the audit context of this request)."""

    request: web.Request
    session: Session
    device: DeviceIdentity | None

    def fields(self) -> dict[str, object]:
        return audit_fields(self.request, self.session, self.device, SERVICE)


class AuditConsole:
    """The console of one gateway (see module docstring)."""

    def __init__(self, ctx: ConsoleContext, csrf: CsrfTokens) -> None:
        self._ctx = ctx
        self._csrf = csrf
        self._flow = _ConsoleFlow(ctx, self._serve)
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gatewayd", "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
            lstrip_blocks=True)
        self._index: AuditIndex | None = None
        self._chain = ChainWatch()
        # The console's own threads (never the loop's default executor, which logins use),
        # one lane per kind of work; shut down by `close` (or when the console is dropped).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=WORKERS, thread_name_prefix="gatewayd-console")
        weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        self._index_lane = _Lane(self._executor)
        self._chain_lane = _Lane(self._executor)
        self._report_lane = _Lane(self._executor)
        self._exports: set[threading.Event] = set()  # the stop flag of each running export
        # month → (what the log's files looked like, the rendered report or None: empty);
        # used only in the report lane.
        self._reports: dict[str, tuple[tuple[object, ...], str | None]] = {}

    def close(self) -> None:
        """Stop the console's work: running exports end after their current batch, queued
        work is dropped, and the threads end when their current call returns (no wait)."""
        for stop in list(self._exports):
            stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: web.Request, session: Session,
                     device: DeviceIdentity | None) -> web.StreamResponse:
        """A request below ``CONSOLE_PREFIX`` of a signed-in session."""
        if not self._ctx.settings.console.enabled:
            return _not_found(request)
        return await self._flow.handle(request, session, device)

    # --- dispatch (after the policy allowed) ---------------------------------------------

    async def _serve(self, request: web.Request, *, session: Session,
                     device: DeviceIdentity | None, service: str,
                     websocket: bool) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        if service != SERVICE or websocket or not path.startswith(CONSOLE_PREFIX):
            return _not_found(request)
        route = self._route(path[len(CONSOLE_PREFIX):])
        if route is None:
            return _not_found(request)
        allowed, handler = route
        if ("GET" if request.method == "HEAD" else request.method) != allowed:
            response = respond(request, 405, title="Method not allowed",
                               message="This page does not accept that kind of request.",
                               error="method_not_allowed")
            response.headers["Allow"] = "GET, HEAD" if allowed == "GET" else allowed
            return response
        return await self._answer(request, handler, _Reader(request, session, device))

    def _route(self, sub: str) -> tuple[str, Page] | None:
        """(the one method allowed, the page) for a path below the prefix; None: no page."""
        if sub == "sessions/kill":
            return "POST", self._kill
        record = _RECORD.fullmatch(sub)
        if record is not None:
            seq = int(record.group(1))
            return "GET", lambda reader: self._record(reader, seq)
        page = {
            "": self._search, "sessions": self._sessions, "chain": self._chain_page,
            "export.csv": self._export_csv, "export.jsonl": self._export_jsonl,
            "report": self._report, "console.css": self._stylesheet,
        }.get(sub)
        return None if page is None else ("GET", page)

    async def _answer(self, request: web.Request, handler: Page, reader: _Reader
                      ) -> web.StreamResponse:
        """The page, or the 400 / 503 its failure calls for (never a 500 for bad input)."""
        try:
            return await handler(reader)
        except ConsoleInputError as bad:
            return respond(request, 400, title="Cannot search like that", message=str(bad),
                           error="bad_request")
        except AuditWriteError:
            return _unaudited(request)
        except ConsoleBusyError as busy:
            response = respond(
                request, 503, title="The console is busy",
                message=str(busy) or "Another search or report is running. Try again in a "
                                     "few seconds.", error="busy")
            response.headers["Retry-After"] = "5"
            return response
        except TimeoutError:
            return respond(request, 503, title="Search took too long",
                           message="The audit log could not be searched in time. Narrow the "
                                   "search (a time range, a user) and try again.",
                           error="search_timeout")

    # --- search and record ---------------------------------------------------------------

    async def _search(self, reader: _Reader) -> web.StreamResponse:
        zone = self._ctx.settings.audit.zone
        form = SearchForm.parse(reader.request.query, zone)
        page: SearchPage | None = None
        indexing: int | None = None
        if form.submitted:
            found, indexing = await self._in_index(lambda index: (index.search(
                form.record_filter(), before_seq=form.before_seq,
                limit=self._ctx.settings.console.page_size), _indexing(index)))
            self._audit_read(reader, "search", records=len(found.records),
                             **form.audit_fields())
            page = found
        rows = [_row(record, zone) for record in page.records] if page else []
        older = (form.query_string(page.next_before_seq)
                 if page is not None and page.next_before_seq is not None else None)
        return self._html("search.html", reader, form=form.raw, page=page, rows=rows,
                          older=older, query=form.query_string(), indexing=indexing,
                          paged=form.before_seq is not None, results=RESULTS,
                          zone=zone.key, report_month=self._ctx.wall_clock().astimezone(
                              zone).strftime("%Y-%m"))

    async def _record(self, reader: _Reader, seq: int) -> web.StreamResponse:
        record = await self._in_index(lambda index: index.record(seq))
        self._audit_read(reader, "record", records=0 if record is None else 1,
                         record_seq=seq)
        if record is None:
            return respond(reader.request, 404, title="No such record",
                           message=f"There is no audit record {seq}.", error="not_found")
        zone = self._ctx.settings.audit.zone
        return self._html("record.html", reader, seq=seq, fields=_detail_fields(record),
                          links=_record_links(record, zone), when=_local_time(record, zone))

    # --- export --------------------------------------------------------------------------

    async def _export_csv(self, reader: _Reader) -> web.StreamResponse:
        return await self._export(reader, "csv", "text/csv")

    async def _export_jsonl(self, reader: _Reader) -> web.StreamResponse:
        return await self._export(reader, "jsonl", "application/x-ndjson")

    async def _export(self, reader: _Reader, suffix: str, content_type: str
                      ) -> web.StreamResponse:
        """The search as a streamed download, newest first, one index page per worker-thread
        call (each bounded by the records it scans, not by what it finds). Once the first
        byte is sent the status cannot change: an export that stops early (timeout, the log
        changed under it, `EXPORT_MAX_RECORDS`) ends with an ``EXPORT INCOMPLETE`` line and a
        clean end of the body, never a silent short file or a hung download."""
        form = SearchForm.parse(reader.request.query, self._ctx.settings.audit.zone)
        flt = form.record_filter()
        indexing = await self._in_index(_indexing)  # refreshed once, up front
        if indexing is not None:
            return respond(reader.request, 503, title="Still indexing",
                           message=f"The audit log is still being indexed ({indexing} % "
                                   "done); a download now would leave out older records. "
                                   "Try again in a few minutes.", error="indexing")
        self._audit_read(reader, "export", format=suffix, **form.audit_fields())
        response = web.StreamResponse(headers={
            "Content-Type": f"{content_type}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="audit-export.{suffix}"'})
        await response.prepare(reader.request)
        text, stop = _ExportText(suffix), threading.Event()
        self._exports.add(stop)
        try:
            problem, written = await self._stream_export(response, text, flt,
                                                         form.before_seq, stop)
        finally:
            stop.set()
            self._exports.discard(stop)
        if problem is not None:
            await response.write(text.incomplete(problem, written).encode("utf-8"))
        await response.write_eof()
        return response

    async def _stream_export(self, response: web.StreamResponse, text: _ExportText,
                             flt: RecordFilter, cursor: int | None, stop: threading.Event
                             ) -> tuple[str | None, int]:
        """Write the export's batches; (why it stopped early or None, records written)."""
        written = 0
        while True:
            if written >= EXPORT_MAX_RECORDS:
                return (f"stopped at {EXPORT_MAX_RECORDS} records, the most one download "
                        "holds (gatewayd audit export has no limit)"), written
            limit = min(EXPORT_BATCH, EXPORT_MAX_RECORDS - written)
            before = cursor

            def hop(before: int | None = before, limit: int = limit) -> tuple[
                    str, int | None, int, bool]:
                return self._export_hop(text, flt, before, limit, stop)

            try:
                # A search between two batches waits its turn; it never breaks the download.
                chunk, cursor, count, complete = await self._index_lane.run(
                    hop, SEARCH_TIMEOUT, wait=SEARCH_TIMEOUT)
            except TimeoutError:
                return "the audit log could not be read in time", written
            except ConsoleBusyError:
                return "the console was busy or the gateway is stopping", written
            if chunk:
                await response.write(chunk.encode("utf-8"))
            written += count
            if not complete:
                return ("part of the audit log changed while it was read (rotation or "
                        "retention); export again"), written
            if cursor is None:
                return None, written

    def _export_hop(self, text: _ExportText, flt: RecordFilter, before_seq: int | None,
                    limit: int, stop: threading.Event) -> tuple[str, int | None, int, bool]:
        """One index page of the export, rendered (blocking): (text, next cursor, records,
        complete). No refresh: the pages go down from where the export started."""
        if stop.is_set():  # the download already ended
            return "", None, 0, False
        page = self._open_index().search(flt, before_seq=before_seq, limit=limit)
        return text.batch(page.records), page.next_before_seq, len(page.records), page.complete

    # --- live sessions and kill ----------------------------------------------------------

    async def _sessions(self, reader: _Reader) -> web.StreamResponse:
        """Who is connected now. This is the gateway's live state, not the audit log, so it
        writes no ``audit.read`` (the admin socket's session list does not either)."""
        ctx = self._ctx
        now, wall = ctx.clock(), ctx.wall_clock()
        rows = sorted((session_view(s, now, wall) for s in ctx.sessions.sessions()),
                      key=lambda row: (str(row["user"]), str(row["started"])))
        return self._html("sessions.html", reader, rows=rows, own=reader.session.handle,
                          token=self._csrf.issue(KILL_PURPOSE, reader.session.handle),
                          killed=reader.request.query.get("killed", "")[:64],
                          max_reason=MAX_REASON_CHARS)

    async def _kill(self, reader: _Reader) -> web.StreamResponse:
        request = reader.request
        try:
            form = await read_form(request, max_bytes=MAX_FORM_BYTES, limits={
                "csrf_token": 128, "session": 64, "reason": MAX_REASON_CHARS * 4})
        except FormError as bad:
            return respond(request, bad.status, title="Form refused", message=bad.message,
                           error="bad_form")
        if not self._csrf.check(form["csrf_token"], KILL_PURPOSE, reader.session.handle):
            return respond(request, 403, title="Form expired",
                           message="The form expired or did not come from this console. "
                                   "Open the sessions page again and retry.",
                           error="csrf")
        handle, reason = form["session"].strip().lower(), " ".join(form["reason"].split())
        if _HANDLE.fullmatch(handle) is None:
            raise ConsoleInputError("session: expected a session id from the list")
        if not reason or len(reason) > MAX_REASON_CHARS or not reason.isprintable():
            raise ConsoleInputError(
                f"reason: say why, in one line of at most {MAX_REASON_CHARS} characters")
        if handle == reader.session.handle:
            raise ConsoleInputError("This is your own session: use Sign out instead")
        victims = [s for s in self._ctx.sessions.sessions() if s.handle == handle]
        if not victims:
            return respond(request, 404, title="No such session",
                           message="That session has already ended.", error="not_found")
        # Audit before acting (as the admin socket): raises AuditWriteError → 503, no kill.
        self._ctx.record_admin_kill(operator=reader.session.user, selector=("session", handle),
                                    reason=reason, sessions=victims, via=VIA)
        for victim in victims:
            self._ctx.sessions.end(victim, "admin_kill")
        return web.Response(status=303, headers={
            "Location": f"{CONSOLE_PREFIX}sessions?{urlencode({'killed': handle})}"})

    # --- chain, report, stylesheet -------------------------------------------------------

    async def _chain_page(self, reader: _Reader) -> web.StreamResponse:
        live = self._ctx.audit.path
        status = await self._chain_lane.run(lambda: self._chain.status(live), CHAIN_TIMEOUT,
                                            wait=BUSY_WAIT)
        # Seqs, the checkpoint and problem text are audit data: the view is recorded.
        self._audit_read(reader, "chain", records=status.records_checked)
        return self._html("chain.html", reader, status=status)

    async def _report(self, reader: _Reader) -> web.StreamResponse:
        settings = self._ctx.settings
        zone = settings.audit.zone
        label, since, until = parse_month(reader.request.query.get("month"),
                                          self._ctx.wall_clock().astimezone(zone))
        try:
            from gatewayd.report import (  # noqa: PLC0415 - a large module, rarely used
                EmptyPeriodError,
                build_usage,
                render_html,
            )
        except ImportError:
            return respond(reader.request, 404, title="No usage report",
                           message="The usage report is not installed on this gateway.",
                           error="not_found")
        live = self._ctx.audit.path

        def build(paths: list[Path]) -> str | None:
            try:
                report: UsageReport = build_usage(
                    paths, since=since, until=until, seats=settings.sessions.max_concurrent,
                    zone=zone)
            except EmptyPeriodError:
                return None
            return str(render_html(report))

        # What the report depends on besides the files: the seat limit and the zone, both
        # reloadable — a cached report of another contract size must not be served.
        key = f"{label} seats={settings.sessions.max_concurrent} zone={zone.key}"
        body = await self._report_lane.run(
            lambda: self._report_body(key, live, until, build), REPORT_TIMEOUT,
            wait=BUSY_WAIT)
        if body is None:  # a read that found nothing is still a read
            self._audit_read(reader, "report", month=label, records=0)
            return respond(reader.request, 404, title="No usage in that month",
                           message=f"The audit log has no records for {label}.",
                           error="not_found")
        self._audit_read(reader, "report", month=label)
        response = web.Response(text=body, content_type="text/html")
        # The report is one self-contained document whose styles (and matplotlib's SVG) are
        # inline, which the gateway's page CSP forbids: it gets the same headers with inline
        # styles allowed (still no script, no requests, no framing) — set here, in full,
        # because the response hook leaves the headers of a response so marked alone.
        reader.request[PROXIED] = True
        response.headers.update(GATEWAY_PAGE_HEADERS)
        response.headers["Content-Security-Policy"] = REPORT_CSP
        response.headers["Cache-Control"] = NO_STORE
        return response

    def _report_body(self, key: str, live: Path, until: datetime,
                     build: Callable[[list[Path]], str | None]) -> str | None:
        """The month's report (None: no records), from the cache (``key``: the month and the
        settings the report shows) while the log's files are as they were, else built
        (blocking; in the report lane, one at a time). A file that rotation or retention
        removes mid-build means one more try, then a 503."""
        for _ in range(2):
            paths = [*rotated_siblings(live), live]
            try:
                shape = _log_shape(paths, live, until)
                cached = self._reports.get(key)
                if cached is not None and cached[0] == shape:
                    return cached[1]
                body = build(paths)
            except OSError:
                continue  # a file went away between listing and reading it
            self._reports.pop(key, None)
            self._reports[key] = (shape, body)
            while len(self._reports) > REPORT_CACHE:
                del self._reports[next(iter(self._reports))]  # the oldest built
            return body
        raise ConsoleBusyError("The audit log's files changed while the report was being "
                               "built (rotation or retention). Try again.")

    async def _stylesheet(self, reader: _Reader) -> web.StreamResponse:
        response = web.Response(text=CONSOLE_CSS, content_type="text/css")
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    # --- helpers -------------------------------------------------------------------------

    def _audit_read(self, reader: _Reader, view: str, **fields: object) -> None:
        """``audit.read``, before anything is shown; AuditWriteError when not written."""
        written = self._ctx.audit.emit("audit.read", **reader.fields(), view=view, **fields)
        if written is None:  # on_failure = "continue" swallowed it: still refuse to show
            raise AuditWriteError("audit.read", None, OSError("audit.read was not written"))

    async def _in_index(self, work: Callable[[AuditIndex], T]) -> T:
        """Refresh the index (incremental, at most about `REFRESH_SECONDS` of indexing: a
        first indexing of a large log goes on at the next request) and run ``work`` on it,
        in the index lane."""

        def run() -> T:
            index = self._open_index()
            index.refresh(max_seconds=REFRESH_SECONDS)
            return work(index)

        return await self._index_lane.run(run, SEARCH_TIMEOUT, wait=BUSY_WAIT)

    def _open_index(self) -> AuditIndex:
        from gatewayd.audit.index import AuditIndex  # noqa: PLC0415 - only the console uses it

        settings = self._ctx.settings
        if self._index is None:
            self._index = AuditIndex(self._ctx.audit.path,
                                     settings.gateway.state_dir / "audit-index")
        return self._index

    def _html(self, template: str, reader: _Reader, **values: Any) -> web.Response:
        body = self._templates.get_template(template).render(
            prefix=CONSOLE_PREFIX, user=reader.session.user, stylesheet=pages.STYLESHEET_PATH,
            **values)
        return web.Response(text=body, content_type="text/html")


def _indexing(index: AuditIndex) -> int | None:
    """None when the index covers the whole log, else how far its indexing is (percent)."""
    return None if index.complete else min(99, int(index.progress * 100))


def _log_shape(paths: list[Path], live: Path, until: datetime) -> tuple[object, ...]:
    """What a month's cached report depends on: every rotated file as it is, and the live
    file — with its size only while it may hold records of the month (it started before the
    month ended), so a past month's report is not rebuilt for every new record."""
    first = read_first_line(live)
    record = parse_line(first) if first is not None else None
    started = record_time(record) if record is not None else None
    shape: list[object] = []
    for path in paths:
        st = path.stat()
        if path == live and started is not None and started >= until:
            shape.append((path.name, st.st_dev, st.st_ino))
        else:
            shape.append((path.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(shape)


# --- what the pages show ---------------------------------------------------------------------


def _local_time(record: Mapping[str, Any], zone: ZoneInfo) -> str:
    moment = record_time(record)
    if moment is None:
        return str(record.get("ts", "?"))
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def _row(record: Mapping[str, Any], zone: ZoneInfo) -> dict[str, object]:
    method, path, dest = record.get("method"), record.get("path"), record.get("dest")
    target = " ".join(str(v) for v in (method, path) if v is not None) or (dest or "")
    outcome = record.get("status", record.get("reason", ""))
    return {"seq": record.get("seq"), "time": _local_time(record, zone),
            "event": record.get("event", ""), "user": record.get("user", ""),
            "device": record.get("device", ""), "source": record.get("source_ip", ""),
            "service": record.get("service", ""), "target": target,
            "outcome": "" if outcome is None else outcome}


def _detail_fields(record: Mapping[str, Any]) -> list[tuple[str, object]]:
    first = [(k, record[k]) for k in DETAIL_ORDER if k in record]
    rest = sorted((k, v) for k, v in record.items() if k not in DETAIL_ORDER)
    return first + rest


def _record_links(record: Mapping[str, Any], zone: ZoneInfo) -> list[tuple[str, str]]:
    links = []
    if record.get("session"):
        links.append(("This session", urlencode({"session": record["session"]})))
    moment = record_time(record)
    if record.get("user") and moment is not None:
        day = moment.astimezone(zone).replace(hour=0, minute=0, second=0, microsecond=0)
        links.append(("This user that day", urlencode({
            "user": record["user"], "from": local_input(day, zone),
            "to": local_input(day + timedelta(days=1), zone)})))
    if record.get("device"):
        links.append(("This device", urlencode({"device": record["device"]})))
    return links


def _not_found(request: web.Request) -> web.Response:
    return respond(request, 404, title="Not found",
                   message="No service is published at this address.", error="not_found")


def _unaudited(request: web.Request) -> web.Response:
    return respond(request, 503, title="Temporarily unavailable",
                   message="Reading the audit log must itself be recorded, and the record "
                           "could not be written. Nothing was shown.",
                   error="audit_unavailable")


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
