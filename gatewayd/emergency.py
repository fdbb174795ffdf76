"""Emergency stop: a revoked device or a disabled user loses every open session within seconds.

Two administrator commands feed it; both run where the daemon's audit log is out of reach:

* ``gatewayd certs revoke DEVICE`` re-signs the device CRL (``https.crl_file``) and updates the
  ``index.json`` beside it (`gatewayd.ca`);
* ``gatewayd users disable USER`` sets ``disabled = true`` in the users file (file backend) and
  appends a request to the **disable journal** ``STATE_DIR/user-disable.json``.

`EmergencyStop.check` — run by the gateway every `WATCH_INTERVAL` seconds and on SIGHUP —
picks both up:

1. a changed CRL is verified and loaded into the listener's TLS context (new handshakes with a
   revoked certificate fail, open connections fail their next read: `gatewayd.https.tls`),
   and every open session of a device with a newly revoked certificate ends
   (``session.end`` reason ``device_revoked``). The device of a serial comes from the index;
   a revoked certificate of a device ends all of that device's sessions — also those made with
   a newer certificate of the same PC (sessions do not record serials), which costs one
   sign-in when a superseded certificate is revoked and never leaves a stolen one signed in;
2. each pending disable request ends the user's sessions (``user_disabled``), is audited as
   ``user.disable`` (user, operator, reason), and is marked done;
3. a changed users file runs the directory refresh at once instead of at the next
   ``directory.refresh_interval`` (a hand edit that disables or deletes someone:
   ``directory_revoked``);
4. certificates issued or revoked without an audit record yet get ``cert.issue`` /
   ``cert.revoke`` (from ``index.json`` beside the CRL, and the CRL itself, which is what the
   gateway enforces). The daemon cannot write into the CA directory, so which serials it has
   audited is kept in ``STATE_DIR/cert-audit.json``. A record is written before it is marked:
   a crash in between repeats a record rather than losing one.

Disable journal (``STATE_DIR/user-disable.json``, ``0600``, owned by the state directory's
owner — the daemon's user — even when root runs the command)::

    {"format": "gatewayd-user-disable-v1",
     "requests": [{"id": "<16 hex>", "user": "alice", "operator": "admin1 (sudo as root)",
                   "requested_at": "2026-11-27T08:10:56Z", "reason": "laptop stolen",
                   "done": false}]}

Writers hold an exclusive ``flock`` on ``user-disable.json.lock``. The command holds it across
its users-file edit and the journal append, and the daemon reads the journal and the users
file's signature under it: the daemon never sees the disabled account without the request that
explains it, so those sessions end as ``user_disabled`` rather than ``directory_revoked``.

Cert audit marks (``STATE_DIR/cert-audit.json``, ``0600``)::

    {"format": "gatewayd-cert-audit-v1", "issued": ["3f0c…", …], "revoked": ["3f0c…", …]}
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

from gatewayd.audit import AuditWriteError
from gatewayd.ca import INDEX_FILE, CaError, Index, IndexEntry, read_index
from gatewayd.certs import CrlInfo, serial_hex
from gatewayd.config import Settings
from gatewayd.files import atomic_write
from gatewayd.https.tls import (
    FileSignature,
    LoadedCrl,
    ServerContext,
    TlsConfigError,
    crl_expiry_warning,
    file_signature,
    read_device_crl,
)
from gatewayd.identity.directory import lookup_key
from gatewayd.sessions import SessionRegistry

log = logging.getLogger(__name__)

WATCH_INTERVAL: Final = 1.0  # seconds; the promise to administrators is "within 5 seconds"
JOURNAL_FILE: Final = "user-disable.json"
JOURNAL_FORMAT: Final = "gatewayd-user-disable-v1"
CERT_AUDIT_FILE: Final = "cert-audit.json"
CERT_AUDIT_FORMAT: Final = "gatewayd-cert-audit-v1"
KEEP_DONE: Final = 500  # finished disable requests kept in the journal for reference
LOCK_WAIT: Final = 2.0  # seconds the daemon waits for a command holding the journal lock
EXPIRY_WARNING_EVERY: Final = 86_400.0  # seconds between repeated "CRL expires soon" warnings


class JournalError(Exception):
    """The disable journal cannot be read or written; the message names the file."""


class AuditEmit(Protocol):
    """`AuditLog.emit`'s shape (raises AuditWriteError when the record cannot be written)."""

    def __call__(self, event: str, /, **fields: object) -> object: ...


def _state_dir_owner(state_dir: Path) -> tuple[int, int] | None:
    """When root writes into the daemon's state directory, the files go to its owner."""
    if os.geteuid() != 0:
        return None
    st = state_dir.stat()
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


# --- the disable journal (shared by `gatewayd users disable` and the daemon) ---------------


@dataclass(frozen=True, slots=True)
class DisableRequest:
    """One ``gatewayd users disable`` run, waiting for (or done by) the daemon."""

    id: str
    user: str
    operator: str
    requested_at: str
    reason: str | None
    done: bool

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "user": self.user, "operator": self.operator,
                "requested_at": self.requested_at, "reason": self.reason, "done": self.done}


def _request(item: object, where: str) -> DisableRequest:
    if not isinstance(item, dict):
        raise JournalError(f"{where}: expected an object")
    texts = [item.get(key) for key in ("id", "user", "operator", "requested_at")]
    reason, done = item.get("reason"), item.get("done")
    if (not all(isinstance(t, str) for t in texts) or not isinstance(done, bool)
            or not (reason is None or isinstance(reason, str))):
        raise JournalError(f"{where}: malformed request")
    return DisableRequest(str(texts[0]), str(texts[1]), str(texts[2]), str(texts[3]),
                          reason, done)


class DisableJournal:
    """``STATE_DIR/user-disable.json`` and its lock (blocking; the daemon uses threads)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / JOURNAL_FILE
        self._lock_path = state_dir / (JOURNAL_FILE + ".lock")

    @contextlib.contextmanager
    def locked(self, wait: float | None = None) -> Iterator[None]:
        """Hold the journal's exclusive lock; TimeoutError after ``wait`` seconds if given."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            owner = _state_dir_owner(self.state_dir)
            if owner is not None:
                os.fchown(fd, *owner)  # a lock file root made must stay usable by the daemon
            self._acquire(fd, wait)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _acquire(fd: int, wait: float | None) -> None:
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        # Bounded: a command stuck while holding the lock must not stall the emergency stop
        # of every other device and user.
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("disable journal is locked") from None
                time.sleep(0.02)

    def requests(self) -> list[DisableRequest]:
        """Every request in the journal (hold the lock for a consistent view with edits)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise JournalError(f"cannot read {self.path}: {exc}") from None
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JournalError(f"{self.path}: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT or not isinstance(
                data.get("requests"), list):
            raise JournalError(f"{self.path} is not a {JOURNAL_FORMAT} file")
        return [_request(item, f"{self.path}: requests[{i}]")
                for i, item in enumerate(data["requests"])]

    def add(self, user: str, *, operator: str, reason: str | None,
            now: datetime | None = None) -> DisableRequest:
        """Append a pending request (the caller holds the lock)."""
        request = DisableRequest(
            id=secrets.token_hex(8), user=user, operator=operator,
            requested_at=(now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            reason=reason, done=False)
        self._save([*self.requests(), request])
        return request

    def mark_done(self, ids: Iterable[str]) -> None:
        """Mark requests done (takes the lock); old finished ones are dropped."""
        wanted = set(ids)
        with self.locked(wait=LOCK_WAIT):
            items = [DisableRequest(r.id, r.user, r.operator, r.requested_at, r.reason,
                                    r.done or r.id in wanted) for r in self.requests()]
            pending = [r for r in items if not r.done]
            finished = [r for r in items if r.done][-KEEP_DONE:]
            self._save(sorted([*finished, *pending], key=items.index))

    def _save(self, items: list[DisableRequest]) -> None:
        data = {"format": JOURNAL_FORMAT, "requests": [r.to_json() for r in items]}
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        atomic_write(self.path, text.encode("utf-8"), mode=0o600, overwrite=True,
                     owner=_state_dir_owner(self.state_dir))


# --- which certificates the daemon has audited ----------------------------------------------


class CertAuditMarks:
    """``STATE_DIR/cert-audit.json``: serials whose cert.issue / cert.revoke are written."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CERT_AUDIT_FILE

    def load(self) -> tuple[set[int], set[int]]:
        try:
            data: Any = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return set(), set()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JournalError(f"cannot read {self.path}: {exc}") from None
        try:
            if data["format"] != CERT_AUDIT_FORMAT:
                raise ValueError(data["format"])
            return ({int(s, 16) for s in data["issued"]}, {int(s, 16) for s in data["revoked"]})
        except (KeyError, TypeError, ValueError):
            raise JournalError(f"{self.path} is not a {CERT_AUDIT_FORMAT} file") from None

    def save(self, issued: set[int], revoked: set[int]) -> None:
        data = {"format": CERT_AUDIT_FORMAT,
                "issued": sorted(serial_hex(s) for s in issued),
                "revoked": sorted(serial_hex(s) for s in revoked)}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode("ascii"),
                     mode=0o600, overwrite=True)


# --- the watcher ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Polled:
    """What one look at the files found (read in a worker thread)."""

    crl: LoadedCrl | None  # a new verified CRL, else None
    index: Index | None  # a changed index, else None
    pending: tuple[DisableRequest, ...]
    users_signature: FileSignature | None


@dataclass(slots=True)
class Outcome:
    """What one `EmergencyStop.check` did (for tests and logs)."""

    device_sessions: int = 0
    user_sessions: int = 0
    directory_sessions: int = 0
    audited: int = 0


def _signature(path: Path) -> FileSignature | None:
    try:
        return file_signature(path.stat())
    except OSError:
        return None


class EmergencyStop:
    """Watches the CRL, its index, the disable journal and the users file (one per Gateway)."""

    def __init__(
        self, settings: Settings, sessions: SessionRegistry, *, emit: AuditEmit,
        refresh_directory: Callable[[], Awaitable[int]],
    ) -> None:
        self._https = settings.https
        self._sessions = sessions
        self._emit = emit
        self._refresh_directory = refresh_directory
        self._users_file = settings.directory.file if settings.directory.backend == "file" else None
        self._journal = DisableJournal(settings.gateway.state_dir)
        self._marks = CertAuditMarks(settings.gateway.state_dir)
        crl_file = settings.https.crl_file if settings.https.enabled else None
        self._crl_file = crl_file
        self._index_file = crl_file.parent / INDEX_FILE if crl_file is not None else None
        self._context: ServerContext | None = None
        self._crl_signature: FileSignature | None = None
        self._crl_info: CrlInfo | None = None
        self._index_signature: FileSignature | None = None
        self._index: Index | None = None
        self._users_signature: FileSignature | None = None
        self._audited: tuple[set[int], set[int]] | None = None
        self._audit_due = True
        self._reported: set[str] = set()  # problems already logged (not every second)
        self._next_expiry_warning = 0.0
        self._round = asyncio.Lock()

    # --- wiring ----------------------------------------------------------------------------

    @property
    def context(self) -> ServerContext | None:
        """The listener's TLS context once attached (None without an HTTPS listener)."""
        return self._context

    @property
    def crl(self) -> CrlInfo | None:
        """The device CRL in force (None without ``https.crl_file``)."""
        return self._crl_info

    def attach(self, context: ServerContext) -> None:
        """The listener's TLS context: its CRL is the baseline, later lists are applied to it."""
        self._context = context
        if context.crl is not None:
            self._crl_signature = context.crl.signature
            self._crl_info = context.crl.info
            self._warn_expiry(context.crl.info)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Check every ``interval`` seconds (a named task owned by the Gateway)."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("emergency stop check failed; will retry")
            await asyncio.sleep(interval)

    # --- one round -------------------------------------------------------------------------

    async def check(self, *, force: bool = False) -> Outcome:
        """Look at every source once and act on what changed (``force``: re-read the CRL)."""
        # One round at a time: the SIGHUP round and the timer's must not both act on the same
        # pending request (two user.disable records) or the same new CRL.
        async with self._round:
            return await self._check(force)

    async def _check(self, force: bool) -> Outcome:
        polled = await asyncio.to_thread(self._poll, force)
        outcome = Outcome()
        if polled.index is not None:
            self._index, self._audit_due = polled.index, True
        if polled.crl is not None:
            outcome.device_sessions = await self._apply_crl(polled.crl)
        outcome.user_sessions = await self._stop_users(polled.pending)
        if polled.users_signature != self._users_signature:
            first = self._users_signature is None
            self._users_signature = polled.users_signature
            if not first:
                outcome.directory_sessions = await self._refresh_directory()
        if self._audit_due:
            outcome.audited = await self._audit_certificates()
        if self._crl_info is not None:
            self._warn_expiry(self._crl_info)  # at most daily while the list is close to lapsing
        if outcome.device_sessions or outcome.user_sessions or outcome.directory_sessions:
            log.warning("emergency stop ended sessions: %d of revoked devices, %d of disabled "
                        "users, %d after a users-file change", outcome.device_sessions,
                        outcome.user_sessions, outcome.directory_sessions)
        return outcome

    def _poll(self, force: bool) -> _Polled:
        """Blocking part of a round: stat and, if changed, read the files."""
        crl = self._poll_crl(force)
        # The index after the CRL: `certs revoke` writes the index first, so the index read
        # here always knows every serial of the CRL read above.
        index = self._poll_index()
        pending: tuple[DisableRequest, ...] = ()
        users_signature = self._users_signature
        try:
            with self._journal.locked(wait=LOCK_WAIT):
                pending = tuple(r for r in self._journal.requests() if not r.done)
                if self._users_file is not None:
                    users_signature = _signature(self._users_file)
            self._reported.discard("journal")
        except (OSError, TimeoutError, JournalError) as exc:
            self._report_once("journal", f"cannot read the disable journal: {exc}")
            if self._users_file is not None:  # a broken journal must not hide a hand edit
                users_signature = _signature(self._users_file)
        return _Polled(crl, index, pending, users_signature)

    def _poll_crl(self, force: bool) -> LoadedCrl | None:
        if self._crl_file is None:
            return None
        signature = _signature(self._crl_file)
        if signature == self._crl_signature and not force:
            return None
        try:
            loaded = read_device_crl(self._https)
        except TlsConfigError as exc:
            # The list in force stays: a broken new file must not un-revoke anything.
            self._report_once(f"crl:{signature}", f"new device CRL not loaded: {exc}")
            return None
        previous = self._crl_info
        if previous is not None and loaded.info.number < previous.number:
            self._report_once(f"crl:{signature}", f"device CRL number {loaded.info.number} is "
                              f"older than the one in force ({previous.number}); not loaded")
            return None
        return loaded

    def _poll_index(self) -> Index | None:
        if self._index_file is None:
            return None
        signature = _signature(self._index_file)
        if signature == self._index_signature:
            return None
        self._index_signature = signature
        try:
            index = read_index(self._index_file)
        except FileNotFoundError:
            self._report_once("index", f"{self._index_file} not found: revoked devices lose "
                              "their connections but sessions are not named, and issuance "
                              "is not audited")
            return None
        except CaError as exc:
            self._report_once(f"index:{signature}", f"cannot read the CA index: {exc}")
            return None
        return index

    async def _apply_crl(self, loaded: LoadedCrl) -> int:
        before = set(self._crl_info.revoked) if self._crl_info is not None else set()
        if self._context is not None:
            try:
                await asyncio.to_thread(self._context.apply_crl, loaded)
            except (ssl.SSLError, OSError) as exc:
                self._report_once(f"crl:{loaded.signature}", f"device CRL not loaded: {exc}")
                return 0
        self._crl_signature, self._crl_info = loaded.signature, loaded.info
        self._audit_due = True
        self._warn_expiry(loaded.info, again=True)
        log.info("device CRL %d loaded: %d revoked", loaded.info.number, len(loaded.info.revoked))
        entries = self._index.by_serial() if self._index is not None else {}
        devices = sorted({entry.name for serial in set(loaded.info.revoked) - before
                          if (entry := entries.get(serial)) is not None
                          and entry.kind == "device"})
        ended = 0
        for device in devices:
            victims = [s for s in self._sessions.sessions() if s.device == device]
            for session in victims:
                self._sessions.end(session, "device_revoked")
            ended += len(victims)
        return ended

    async def _stop_users(self, pending: tuple[DisableRequest, ...]) -> int:
        ended, done = 0, []
        for request in pending:
            key = lookup_key(request.user)
            victims = [s for s in self._sessions.sessions()
                       if key is not None and lookup_key(s.user) == key]
            for session in victims:  # first: the stop must not wait for the audit log
                self._sessions.end(session, "user_disabled")
            ended += len(victims)
            try:
                self._emit("user.disable", user=request.user, operator=request.operator,
                           reason=request.reason, status="success")
            except AuditWriteError:
                log.error("audit write failed; user.disable for %s will be retried",
                          request.user)
                continue
            done.append(request.id)
        if done:
            try:
                await asyncio.to_thread(self._journal.mark_done, done)
            except (OSError, TimeoutError, JournalError) as exc:
                # Re-done next round: ending no sessions and a second user.disable record.
                log.error("cannot mark disable requests done: %s", exc)
        return ended

    async def _audit_certificates(self) -> int:
        """cert.issue / cert.revoke for what the index and the CRL show and no record has."""
        if self._index is None and self._crl_info is None:
            self._audit_due = False
            return 0
        if self._audited is None:
            try:
                self._audited = await asyncio.to_thread(self._marks.load)
            except JournalError as exc:
                self._report_once("marks", str(exc))
                return 0
        issued, revoked = self._audited
        entries = self._index.by_serial() if self._index is not None else {}
        written = 0
        try:
            for entry in entries.values():
                if entry.serial not in issued:
                    self._emit("cert.issue", **_issue_fields(entry))
                    issued.add(entry.serial)
                    written += 1
            for serial, reason in (self._crl_info.revoked.items() if self._crl_info else ()):
                if serial not in revoked:
                    self._emit("cert.revoke", **_revoke_fields(serial, reason,
                                                               entries.get(serial)))
                    revoked.add(serial)
                    written += 1
            self._audit_due = False
        except AuditWriteError:
            log.error("audit write failed; certificate records will be retried")
        if written:
            try:
                await asyncio.to_thread(self._marks.save, issued, revoked)
            except OSError as exc:
                log.error("cannot save %s: %s", CERT_AUDIT_FILE, exc)
        return written

    # --- logging ---------------------------------------------------------------------------

    def _report_once(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.error("%s", message)

    def _warn_expiry(self, info: CrlInfo, *, again: bool = False) -> None:
        now = time.monotonic()
        if not again and now < self._next_expiry_warning:
            return
        warning = crl_expiry_warning(info, datetime.now(UTC))
        if warning is not None:
            self._next_expiry_warning = now + EXPIRY_WARNING_EVERY
            log.warning("%s", warning)


def _issue_fields(entry: IndexEntry) -> dict[str, object]:
    what = (f"device certificate until {entry.not_after:%Y-%m-%d}" if entry.kind == "device"
            else f"server certificate for {', '.join(entry.names)} until "
                 f"{entry.not_after:%Y-%m-%d}")
    return {"device": entry.name if entry.kind == "device" else None, "user": entry.user,
            "serial": serial_hex(entry.serial), "operator": entry.issued_by, "reason": what,
            "status": "success"}


def _revoke_fields(serial: int, reason: str, entry: IndexEntry | None) -> dict[str, object]:
    return {"device": entry.name if entry is not None else None,
            "user": entry.user if entry is not None else None,
            "serial": serial_hex(serial),
            "operator": entry.revoked_by if entry is not None else None,
            "reason": reason, "status": "success"}
