"""Emergency stop: a revoked device or a disabled user loses every open session within seconds.

Two administrator commands feed it; both run where the daemon's audit log is out of reach:

* ``gatewayd certs revoke DEVICE`` re-signs the device CRL (``https.crl_file``) and updates the
  ``index.json`` beside it (`gatewayd.ca`);
* ``gatewayd users disable USER`` sets ``disabled = true`` in the users file (file backend),
  blocks USER in the gateway (``STATE_DIR/user-blocks.json``, every backend:
  `gatewayd.identity.blocks`) and appends a request to the **disable journal**
  ``STATE_DIR/user-disable.json``; ``gatewayd users enable USER`` lifts the block.

`EmergencyStop.check` — run by the gateway every `WATCH_INTERVAL` seconds and on SIGHUP —
picks both up:

1. a changed CRL is verified and loaded into the listener's TLS context (new handshakes with a
   revoked certificate fail, open connections fail their next read: `gatewayd.https.tls`),
   and the sessions made with a newly revoked certificate end (``session.end`` reason
   ``device_revoked``). A session that recorded its certificate's serial ends when that serial
   is revoked — so ``certs revoke SERIAL`` of a superseded certificate leaves the PC's sessions
   on its new certificate alone, while ``certs revoke DEVICE`` revokes every serial of the PC
   and so ends all of them. A session without a recorded serial ends when any certificate of
   its device is revoked (the device of a serial comes from the index): never a stolen PC left
   signed in. A list older than one this gateway has enforced (or another list under the same
   number) is refused, across restarts too: the newest list per issuing CA is recorded in
   ``STATE_DIR/device-crl-state.json`` and the gateway will not start on an older one
   (`CrlRollbackError`);
2. each pending disable request ends the user's sessions (``user_disabled``), is audited as
   ``user.disable`` (user, operator, reason), and is marked done;
3. a changed users file runs the directory refresh at once instead of at the next
   ``directory.refresh_interval`` (a hand edit that disables or deletes someone:
   ``directory_revoked``; `still_entitled` says whether a refreshed principal still holds
   any allowed group or name);
4. the gateway's user blocks (`gatewayd.identity.blocks.UserBlocks.sync`): pending blocks
   (and blocks the shared state lost) are published to the shared state (Redis, with
   ``state.backend = "redis"``) and the cluster's list merged into this node's file; every
   open session of a blocked user on this node ends (``user_disabled``) — blocks made on
   another node too; each lifted block is audited as ``user.enable`` (user, operator,
   reason) and only then takes effect (published, marked done). A list that cannot be read
   or published is logged once and tried again next round (sign-ins that need the shared
   list are refused meanwhile: ``state_unavailable``; with an unreadable local file the
   cluster's blocks are still enforced);
   Each part of a round (1. to 5.) is guarded: one that fails, whatever the error, is logged and
   the others still run (a hostile value in the shared list cannot stop the CRL, the
   disable requests, the users-file refresh or the certificate auditing);
5. certificates issued or revoked without an audit record yet get ``cert.issue`` /
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

Writers hold an exclusive ``flock`` on ``user-disable.json.lock`` (the blocks file's writers
too). The lock is created with ``O_EXCL`` and only a lock this call created is handed to the
state directory's owner; an existing one must be a plain file with one link owned by that
owner (or by a non-root caller): a root-owned file the daemon's account renamed to the
lock's name is refused, never given away. The command holds it across its users-file edit,
the block and the journal append, and the daemon reads the journal and the users file's
signature under it: the daemon never sees the disabled account without the request that
explains it, so those sessions end as ``user_disabled`` rather than ``directory_revoked``.

Cert audit marks (``STATE_DIR/cert-audit.json``, ``0600``)::

    {"format": "gatewayd-cert-audit-v1", "issued": ["3f0c…", …], "revoked": ["3f0c…", …]}

CRL high-water marks (``STATE_DIR/device-crl-state.json``, ``0600``), per issuing CA (its key
identifier: a new device CA starts its own numbering)::

    {"format": "gatewayd-device-crl-v1",
     "highest": {"<issuer key id hex>": {"number": 7, "sha256": "<of the list's DER>"}}}

A list is refused when its number is lower than the one recorded for its CA, or equal with
other contents: a CA directory restored from a backup numbers its next list like one already
published, and that list may lack revocations made since.

Handshake refusals: the HTTPS listener reports a client certificate that fails verification
(revoked, expired, another CA, wrong key usage) to `EmergencyStop.tls_refused`, which writes
``auth.failure`` (``frontend`` https, ``reason`` ``device_cert_revoked`` /
``device_cert_expired`` / ``device_cert_untrusted`` / ``device_cert_wrong_purpose`` / …,
``error`` OpenSSL's text). At most `TLS_AUDIT_BURST` such records per `TLS_AUDIT_WINDOW`; a
flood beyond that is summed up in one ``device_cert_refusals_unrecorded`` record per window.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import ssl
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

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
from gatewayd.identity.principal import Principal
from gatewayd.policy import Policy
from gatewayd.policy.conditions import SubjectsCondition
from gatewayd.sessions import Session, SessionRegistry
from gatewayd.state.store import StateUnavailable

if TYPE_CHECKING:
    from gatewayd.identity.blocks import UserBlocks

log = logging.getLogger(__name__)
_T = TypeVar("_T")

WATCH_INTERVAL: Final = 1.0  # seconds; the promise to administrators is "within 5 seconds"
JOURNAL_FILE: Final = "user-disable.json"
JOURNAL_FORMAT: Final = "gatewayd-user-disable-v1"
CERT_AUDIT_FILE: Final = "cert-audit.json"
CERT_AUDIT_FORMAT: Final = "gatewayd-cert-audit-v1"
KEEP_DONE: Final = 500  # finished disable requests kept in the journal for reference
LOCK_WAIT: Final = 2.0  # seconds the daemon waits for a command holding the journal lock
EXPIRY_WARNING_EVERY: Final = 86_400.0  # seconds between repeated "CRL expires soon" warnings
CRL_STATE_FILE: Final = "device-crl-state.json"
CRL_STATE_FORMAT: Final = "gatewayd-device-crl-v1"
# Refused device certificates are audited one by one up to this many per window; a client
# (or scanner) hammering the listener with a bad certificate must not flood the audit log.
TLS_AUDIT_BURST: Final = 20
TLS_AUDIT_WINDOW: Final = 60.0  # seconds
# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) → the reason audited for a refused device.
TLS_REFUSAL_REASONS: Final[Mapping[int, str]] = MappingProxyType({
    2: "device_cert_untrusted",  # UNABLE_TO_GET_ISSUER_CERT
    3: "device_crl_unusable",  # UNABLE_TO_GET_CRL (no list for that CA)
    7: "device_cert_untrusted",  # CERT_SIGNATURE_FAILURE
    9: "device_cert_not_yet_valid",
    10: "device_cert_expired",
    11: "device_crl_unusable",  # CRL_NOT_YET_VALID
    12: "device_crl_unusable",  # CRL_HAS_EXPIRED: every device is refused, renew the list
    18: "device_cert_untrusted",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "device_cert_untrusted",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "device_cert_untrusted",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY: another CA
    21: "device_cert_untrusted",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "device_cert_revoked",
    26: "device_cert_wrong_purpose",  # INVALID_PURPOSE: no clientAuth
})
TLS_REFUSAL_OTHER: Final = "device_cert_invalid"
TLS_REFUSALS_UNRECORDED: Final = "device_cert_refusals_unrecorded"


class CrlRollbackError(ValueError):
    """The device CRL is older than one this gateway has enforced: it would un-revoke."""


class JournalError(Exception):
    """The disable journal cannot be read or written; the message names the file."""


class AuditEmit(Protocol):
    """`AuditLog.emit`'s shape (raises AuditWriteError when the record cannot be written)."""

    def __call__(self, event: str, /, **fields: object) -> object: ...


def state_dir_owner(state_dir: Path) -> tuple[int, int] | None:
    """When root writes into the daemon's state directory, the files go to its owner."""
    if os.geteuid() != 0:
        return None
    st = state_dir.stat()
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def read_state_file(path: Path) -> str:
    """The text of a state file (FileNotFoundError when absent; OSError / UnicodeDecodeError).

    Root reads these too, in a directory the daemon's account owns: no symlink is followed
    and only a regular file is read (a FIFO planted there must not hang the command).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return handle.read().decode("utf-8")


def read_state_json(path: Path, file_format: str, *lists: str) -> dict[str, Any] | None:
    """A JSON state file of ``file_format`` whose ``lists`` keys hold lists (None when the file
    does not exist); JournalError, naming the file, for anything else."""
    try:
        text = read_state_file(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise JournalError(f"cannot read {path}: {exc}") from None
    try:
        data: Any = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise JournalError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != file_format \
            or not all(isinstance(data.get(key), list) for key in lists):
        raise JournalError(f"{path} is not a {file_format} file")
    return data


def _check_lock_file(path: Path, st: os.stat_result, dir_uid: int) -> None:
    """Refuse a lock file that is not our own plain file (JournalError).

    Root runs ``users disable`` in a directory the daemon's account owns: a hard link planted
    under the lock's name (to ``/etc/shadow``, say), or a root-owned file that account
    renamed to the lock's name, must not be used (nor given away). So: a regular file with
    one link, owned by the state directory's owner — or by whoever runs this, unless that is
    root in a directory root does not own (the daemon could not use a root-owned lock).
    """
    euid = os.geteuid()
    allowed = {dir_uid} if euid == 0 else {dir_uid, euid}
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in allowed:
        raise JournalError(f"refusing the lock {path}: not a plain file of the state "
                           "directory's owner with one link (remove it)")


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
        # Never through a symlink, never blocking on a FIFO, never a terminal: the daemon's
        # account owns this directory and may have planted anything under the lock's name.
        # Only a lock file this call created is handed to the directory's owner (O_EXCL):
        # an existing one is used only if it is already that owner's (`_check_lock_file`).
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        fd, created = -1, False
        try:
            for _ in range(3):  # removed between the two opens: create it after all
                try:
                    fd, created = os.open(self._lock_path, flags | os.O_CREAT | os.O_EXCL,
                                          0o600), True
                    break
                except FileExistsError:
                    pass
                try:
                    fd = os.open(self._lock_path, flags)
                    break
                except FileNotFoundError:
                    continue
            else:
                raise OSError(f"{self._lock_path} keeps appearing and disappearing")
        except OSError as exc:
            raise JournalError(f"cannot open the lock {self._lock_path}: {exc}") from None
        try:
            owner = state_dir_owner(self.state_dir)
            st = os.fstat(fd)
            if created:
                if owner is not None and st.st_uid != owner[0]:
                    os.fchown(fd, *owner)  # a lock root made must stay usable by the daemon
            else:
                _check_lock_file(self._lock_path, st, self.state_dir.stat().st_uid)
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
        data = read_state_json(self.path, JOURNAL_FORMAT, "requests")
        if data is None:
            return []
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
                     owner=state_dir_owner(self.state_dir))


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


# --- the highest CRL number enforced, per issuing CA ---------------------------------------


@dataclass(frozen=True, slots=True)
class CrlMark:
    """What is remembered of an enforced list: its number and a digest of its contents."""

    number: int
    sha256: str

    @classmethod
    def of(cls, loaded: LoadedCrl) -> CrlMark:
        der = x509.load_pem_x509_crl(loaded.pem).public_bytes(serialization.Encoding.DER)
        return cls(loaded.info.number, hashlib.sha256(der).hexdigest())


def crl_issuer_id(pem: bytes) -> str:
    """Which CA signed a (verified) list: its authority key identifier, hex.

    Numbers are only comparable between lists of one CA: a device CA replaced at the end of
    its life starts again at 1. A list without the extension is keyed by its issuer name.
    """
    crl = x509.load_pem_x509_crl(pem)
    try:
        key_id = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        key_id = None
    if key_id is not None and key_id.key_identifier:
        return key_id.key_identifier.hex()
    return "name:" + hashlib.sha256(crl.issuer.public_bytes()).hexdigest()


def rollback_problem(mark: CrlMark, seen: CrlMark | None) -> str | None:
    """Why a list must not replace the one enforced before (``seen``), or None."""
    if seen is None or mark.number > seen.number:
        return None
    if mark.number < seen.number:
        return f"CRL #{mark.number} is older than #{seen.number}"
    if mark.sha256 != seen.sha256:
        return (f"CRL #{mark.number} is not the list #{seen.number} already enforced (two "
                "lists with one number: a CA directory restored from a backup?)")
    return None


class CrlHighWater:
    """``STATE_DIR/device-crl-state.json``: the highest CRL number enforced, per issuer."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CRL_STATE_FILE

    def load(self) -> dict[str, CrlMark]:
        try:
            data: Any = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise JournalError(f"cannot read {self.path}: {exc}") from None
        try:
            if data["format"] != CRL_STATE_FORMAT:
                raise ValueError(data["format"])
            marks = {issuer: CrlMark(item["number"], item["sha256"])
                     for issuer, item in data["highest"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            marks = None
        if marks is None or not all(
                isinstance(k, str) and type(m.number) is int and m.number >= 0
                and isinstance(m.sha256, str) for k, m in marks.items()):
            raise JournalError(f"{self.path} is not a {CRL_STATE_FORMAT} file")
        return marks

    def save(self, highest: Mapping[str, CrlMark]) -> None:
        data = {"format": CRL_STATE_FORMAT,
                "highest": {issuer: {"number": mark.number, "sha256": mark.sha256}
                            for issuer, mark in sorted(highest.items())}}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, (json.dumps(data, indent=1) + "\n").encode("ascii"),
                     mode=0o600, overwrite=True)


class RefusalBudget:
    """How many handshake refusals are audited one by one in the current window."""

    def __init__(self, clock: Callable[[], float], burst: int = TLS_AUDIT_BURST,
                 window: float = TLS_AUDIT_WINDOW) -> None:
        self._clock = clock
        self._burst = burst
        self._window = window
        self._started = clock()
        self._recorded = 0
        self._unrecorded: collections.Counter[str] = collections.Counter()

    def admit(self, reason: str) -> bool:
        """True: audit this one; False: it is only counted (the window's budget is spent)."""
        self._roll()
        if self._recorded < self._burst:
            self._recorded += 1
            return True
        self._unrecorded[reason] += 1
        return False

    def unrecorded(self) -> dict[str, int]:
        """Refusals not audited one by one, once their window is over (then forgotten)."""
        if self._clock() - self._started < self._window or not self._unrecorded:
            return {}
        counts = dict(self._unrecorded)
        self._unrecorded.clear()
        return counts

    def _roll(self) -> None:
        now = self._clock()
        if now - self._started >= self._window:
            self._started, self._recorded = now, 0


def tls_refusal_reason(verify_code: int) -> str:
    """The audit reason for an OpenSSL verification error code of a client certificate."""
    return TLS_REFUSAL_REASONS.get(verify_code, TLS_REFUSAL_OTHER)


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
    blocked_sessions: int = 0  # sessions of users blocked by the gateway (user_disabled)
    enabled: int = 0  # blocks lifted (user.enable written)


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
        clock: Callable[[], float] = time.monotonic,
        blocks: UserBlocks | None = None,
    ) -> None:
        self._https = settings.https
        self._blocks = blocks
        self._sessions = sessions
        self._emit = emit
        self._refresh_directory = refresh_directory
        self._users_file = settings.directory.file if settings.directory.backend == "file" else None
        self._journal = DisableJournal(settings.gateway.state_dir)
        self._marks = CertAuditMarks(settings.gateway.state_dir)
        self._high_water = CrlHighWater(settings.gateway.state_dir)
        # issuer id -> highest CRL number enforced; read from the state file on first use
        # (the watcher may look at the CRL before `attach`), guarded: threads and loop share it.
        self._highest: dict[str, CrlMark] | None = None
        self._highest_lock = threading.Lock()
        self._refusals = RefusalBudget(clock)
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

    @property
    def index(self) -> Index | None:
        """The CA index beside the CRL as last read (None until read, or without a CRL)."""
        return self._index

    def attach(self, context: ServerContext) -> None:
        """The listener's TLS context: its CRL is the baseline, later lists are applied to it.

        Blocking (reads and writes the small state file): called once, at start. Raises
        `CrlRollbackError` (the gateway does not start) when the context's list is older than
        one this gateway has enforced before, and JournalError when that record is unreadable.
        """
        self._context = context
        # The listener's DeviceConnection reports client certificates refused in the handshake
        # through this hook (declared by gatewayd.https.tls.ServerContext as ``on_refused``).
        context.on_refused = self.tls_refused
        if context.crl is None:
            return
        try:
            highest = self._enforced()
        except JournalError as exc:
            raise CrlRollbackError(
                f"{exc}; it records the newest device CRL this gateway has enforced, which an "
                "older list must not replace. Restore it, or remove it if you know it cannot "
                "be recovered") from None
        issuer, mark = crl_issuer_id(context.crl.pem), CrlMark.of(context.crl)
        seen = highest.get(issuer)
        problem = rollback_problem(mark, seen)
        if problem is not None and seen is not None:
            raise CrlRollbackError(
                f"https.crl_file {self._crl_file}: {problem}, which this gateway has enforced "
                f"({self._high_water.path}); a rolled-back list would un-revoke devices. Put "
                "the current devices.crl back; after restoring the CA directory from a "
                "backup, revoke again what was revoked since, then: gatewayd certs crl "
                f"--renew --min-number {seen.number + 1}")
        self._crl_signature = context.crl.signature
        self._crl_info = context.crl.info
        self._remember(issuer, mark)
        self._warn_expiry(context.crl.info)

    def _enforced(self) -> dict[str, CrlMark]:
        """The newest list enforced per issuer (blocking: read once, then kept)."""
        with self._highest_lock:
            if self._highest is None:
                self._highest = self._high_water.load()
            return dict(self._highest)

    def _remember(self, issuer: str, mark: CrlMark) -> None:
        """Record ``mark`` as enforced (blocking). A failed write is logged: the list is in
        force anyway; only the protection across a restart is weaker until the next one."""
        try:
            with self._highest_lock:
                if self._highest is None:
                    self._highest = self._high_water.load()
                seen = self._highest.get(issuer)
                if seen is not None and mark.number <= seen.number:
                    return
                self._highest[issuer] = mark
                self._high_water.save(self._highest)
        except (OSError, JournalError) as exc:
            self._report_once(f"high-water:{exc}", f"cannot record device CRL #{mark.number} "
                              f"as enforced in {self._high_water.path}: {exc}")

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

    async def _part(self, name: str, work: Callable[[], Awaitable[_T]], default: _T) -> _T:
        """One part of a round: whatever goes wrong in it (a bug, a hostile value in the
        shared state) is logged and the round goes on — never skips the other parts."""
        try:
            return await work()
        except Exception:
            log.exception("emergency stop: %s failed; the rest of the round went on", name)
            return default

    async def _check(self, force: bool) -> Outcome:
        polled = await asyncio.to_thread(self._poll, force)
        outcome = Outcome()
        if polled.index is not None:
            self._index, self._audit_due = polled.index, True
        if polled.crl is not None:
            crl = polled.crl
            outcome.device_sessions = await self._part(
                "the device CRL", lambda: self._apply_crl(crl), 0)
        outcome.user_sessions = await self._part(
            "disable requests", lambda: self._stop_users(polled.pending), 0)
        if self._blocks is not None:
            blocks = self._blocks
            outcome.blocked_sessions, outcome.enabled = await self._part(
                "user blocks", lambda: self._apply_blocks(blocks), (0, 0))
        if polled.users_signature != self._users_signature:
            first = self._users_signature is None
            self._users_signature = polled.users_signature
            if not first:
                outcome.directory_sessions = await self._part(
                    "the directory refresh", self._refresh_directory, 0)
        if self._audit_due:
            outcome.audited = await self._part(
                "certificate auditing", self._audit_certificates, 0)

        async def summaries() -> None:
            self._audit_unrecorded_refusals()
            if self._crl_info is not None:
                self._warn_expiry(self._crl_info)  # at most daily while close to lapsing

        await self._part("handshake-refusal summaries", summaries, None)
        if (outcome.device_sessions or outcome.user_sessions or outcome.directory_sessions
                or outcome.blocked_sessions):
            log.warning("emergency stop ended sessions: %d of revoked devices, %d of disabled "
                        "users, %d after a users-file change, %d of blocked users",
                        outcome.device_sessions, outcome.user_sessions,
                        outcome.directory_sessions, outcome.blocked_sessions)
        return outcome

    def _poll(self, force: bool) -> _Polled:
        """Blocking part of a round: stat and, if changed, read the files."""
        crl = index = None
        try:
            crl = self._poll_crl(force)
            # The index after the CRL: `certs revoke` writes the index first, so the index
            # read here always knows every serial of the CRL read above.
            index = self._poll_index()
        except Exception:  # the journal below must still be read
            log.exception("emergency stop: cannot look at the device CRL or its index")
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
        try:
            highest = self._enforced()
        except JournalError as exc:
            self._report_once("high-water", str(exc))
            highest = {}
        problem = rollback_problem(CrlMark.of(loaded), highest.get(crl_issuer_id(loaded.pem)))
        previous = self._crl_info
        if problem is None and previous is not None and loaded.info.number < previous.number:
            problem = f"CRL #{loaded.info.number} is older than #{previous.number}"
        if problem is not None:
            self._report_once(f"crl:{signature}", f"new device CRL not loaded: {problem}, "
                              "which is in force")
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
        await asyncio.to_thread(self._remember, crl_issuer_id(loaded.pem), CrlMark.of(loaded))
        return self._end_revoked_sessions(set(loaded.info.revoked) - before)

    def _end_revoked_sessions(self, serials: set[int]) -> int:
        """End the sessions made with any of ``serials`` (see the module docstring, 1.)."""
        if not serials:
            return 0
        entries = self._index.by_serial() if self._index is not None else {}
        devices = {entry.name for serial in serials
                   if (entry := entries.get(serial)) is not None and entry.kind == "device"}
        victims = [s for s in self._sessions.sessions() if _made_with(s, serials, devices)]
        for session in victims:
            self._sessions.end(session, "device_revoked")
        return len(victims)

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

    async def _apply_blocks(self, blocks: UserBlocks) -> tuple[int, int]:
        """The gateway's blocks (`gatewayd.identity.blocks`): end blocked users' sessions,
        audit lifted blocks as ``user.enable``, publish and mirror the list (4. above)."""
        try:
            sync = await blocks.sync()
            self._reported.discard("blocks")
        except (OSError, JournalError, StateUnavailable) as exc:
            self._report_once("blocks", f"cannot update the user blocks: {exc}")
            sync = None
        except Exception as exc:  # whatever it is, the sessions below still end
            log.exception("cannot update the user blocks")
            self._report_once("blocks", f"cannot update the user blocks: {exc!r}")
            sync = None
        # Whatever this node knows now, even when the shared list could not be read.
        victims = [s for s in self._sessions.sessions() if blocks.blocked_locally(s.user)]
        for session in victims:
            self._sessions.end(session, "user_disabled")
        if sync is None:
            return len(victims), 0
        done = [id_ for id_ in sync.published
                if id_ not in {lift.id for lift in sync.lifts}]
        for lift in sync.lifts:
            try:
                self._emit("user.enable", user=lift.user, operator=lift.operator,
                           reason=lift.reason, status="success")
            except AuditWriteError:
                log.error("audit write failed; user.enable for %s will be retried", lift.user)
                continue
            done.append(lift.id)
        superseded = []
        try:
            superseded = await blocks.finish(done, sync,
                                             lambda: self._journal.locked(wait=LOCK_WAIT))
        except (OSError, TimeoutError, JournalError) as exc:
            # Published again next round (idempotent) and user.enable written once more.
            log.error("cannot update %s: %s", blocks.file.path, exc)
        for lift in superseded:  # audited before it was tried: say that it lifted nothing
            try:
                self._emit("user.enable", user=lift.user, operator=lift.operator,
                           reason=lift.reason, status="failure",
                           error="superseded: the account was blocked again elsewhere after "
                                 "the block this lift names; that newer block stays")
            except AuditWriteError:
                log.error("audit write failed; the superseded lift of %s is only logged",
                          lift.user)
        return len(victims), sum(1 for lift in sync.lifts if lift.id in done
                                 and lift not in superseded)

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

    # --- handshake refusals ----------------------------------------------------------------

    def tls_refused(self, verify_code: int, verify_message: str, source_ip: str) -> None:
        """A client certificate failed verification in a TLS handshake: audit why.

        Called by the HTTPS listener on the event loop once asyncio's handshake with
        ``source_ip`` failed (`ServerContext.report_refusal`): never raises.
        """
        reason = tls_refusal_reason(verify_code)
        try:
            if self._refusals.admit(reason):
                self._emit("auth.failure", frontend="https", reason=reason,
                           source_ip=source_ip, error=verify_message, status="failure")
        except AuditWriteError:
            log.error("audit write failed; refused device certificate (%s) not recorded",
                      reason)
        except Exception:
            log.exception("cannot audit a refused device certificate")

    def _audit_unrecorded_refusals(self) -> None:
        counts = self._refusals.unrecorded()
        if not counts:
            return
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        try:
            self._emit("auth.failure", frontend="https", reason=TLS_REFUSALS_UNRECORDED,
                       error=f"more device certificates refused in the TLS handshake than "
                             f"audited one by one ({TLS_AUDIT_BURST} per "
                             f"{TLS_AUDIT_WINDOW:.0f} s): {summary}",
                       status="failure")
        except AuditWriteError:
            log.error("audit write failed; %s refused device certificates not recorded",
                      sum(counts.values()))

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


def still_entitled(policy: Policy, principal: Principal) -> bool:
    """Whether any allow rule of ``policy`` could still admit ``principal``.

    For the directory refresh (issue 4: "a user removed from all allowed groups … loses their
    open sessions … ``directory_revoked``"): a person whose groups no longer give any role —
    moved to another department, left every telework group — is signed out at the next
    refresh instead of keeping a session that policy would deny request by request. Only the
    rule's subjects count (users, groups, roles compiled into both, case-insensitively, as
    `decide` compares them); an allow rule for everyone (``subjects: "*"``) entitles everyone.
    Time, network, method and destination conditions do not: outside office hours a session
    stays, it is just denied.
    """
    user = principal.user.casefold()
    groups = frozenset(group.casefold() for group in principal.groups)
    for rule in policy.rules:
        if rule.effect != "allow":
            continue
        subjects = [c for c in rule.conditions if isinstance(c, SubjectsCondition)]
        if all(user in c.users or not c.groups.isdisjoint(groups) for c in subjects):
            return True
    return False


def _made_with(session: Session, serials: set[int], devices: set[str]) -> bool:
    """Whether ``session`` signed in with one of ``serials`` (of one of ``devices``).

    Without a recorded serial, any revoked certificate of its device counts: fail closed.
    """
    if session.device_serial is not None:
        return session.device_serial in serials
    return session.device is not None and session.device in devices


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
