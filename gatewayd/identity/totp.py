"""TOTP second factor: encrypted-at-rest secrets, enrollment, verification, replay cache.

Owns three things:

* **The key file** ``STATE_DIR/totp.key`` (mode ``0600``): one line
  ``gatewayd-totp-key-v1 <base64 of 32 random bytes>``, an AES-256 key. Created (``O_EXCL``,
  ``0600`` from birth) only while no secret exists; a key readable by group or others is
  refused, as OpenSSH refuses such private keys.
* **The secrets file** ``STATE_DIR/totp-secrets.json`` (mode ``0600``), JSON::

      {"format": "gatewayd-totp-secrets-v1",
       "key_id": "<16 hex: which key encrypted these>",
       "users": {"alice": {"user": "alice", "enrollment": "<32 hex>",
                           "enrolled_at": "2026-11-27T08:10:56Z", "operator": "root",
                           "replaced": false, "audited": false,
                           "nonce": "<base64, 12 bytes>", "ciphertext": "<base64>"}}}

  Each secret (160 bits from the CSPRNG, RFC 4226's recommended length) is sealed with
  AES-256-GCM; the associated data binds it to the user and the enrollment id, so copying
  one user's ciphertext onto another account makes decryption fail instead of logging in.
  Writers (``gatewayd mfa enroll`` and the daemon marking an enrollment audited) hold an
  exclusive ``flock`` on ``totp-secrets.json.lock`` and replace the file atomically.
* **Verification** (`TotpVerifier`): RFC 6238 with SHA-1, 6 digits, 30-second steps and ±1
  step of clock drift; all three candidate codes are always computed and compared in constant
  time (a dummy secret stands in for users without one). A code is accepted **once**: the
  step is claimed with ``StateStore.add_once`` — shared by every node — and the two steps
  before it are burned too, so after a login with the current code neither it nor an older
  still-valid code (e.g. shoulder-surfed a minute ago) can be used again.

Auditing ``mfa.enroll``: the daemon holds the audit log, so the CLI cannot write to it. The
CLI writes the enrollment with ``audited: false``; the daemon emits ``mfa.enroll`` for every
pending enrollment (at start, every few seconds from `TotpVerifier.watch_enrollments`, and —
the guarantee — before a pending secret is ever used to verify a code), then marks it
audited. So every secret that ever let someone in has its ``mfa.enroll`` record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NamedTuple, Protocol, TypeVar

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gatewayd.files import exposure, fsync_directory
from gatewayd.identity.directory import lookup_key
from gatewayd.state.store import StateStore
from gatewayd.tasks import within

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_FILE: Final = "totp.key"
SECRETS_FILE: Final = "totp-secrets.json"
KEY_PREFIX: Final = "gatewayd-totp-key-v1 "
STORE_FORMAT: Final = "gatewayd-totp-secrets-v1"
AAD_PREFIX: Final = b"gatewayd-totp-v1\x00"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
SECRET_BYTES: Final = 20
DIGITS: Final = 6
PERIOD: Final = 30
DRIFT_STEPS: Final = 1
# A claimed step must stay claimed while any clock within the drift window could accept it.
REPLAY_TTL: Final = float((2 * DRIFT_STEPS + 2) * PERIOD)


class TotpStoreError(Exception):
    """The key or secrets file is missing, unsafe, corrupt, or does not match: fail closed."""


class AlreadyEnrolled(Exception):  # noqa: N818 - a condition the CLI reports, not a fault
    """The user already has a TOTP secret (re-enrolling needs an explicit replace)."""


class Enrollment(NamedTuple):
    """What a new enrollment hands to the person: the secret and its ``otpauth://`` URI."""

    secret: str  # base32, as authenticator apps expect for manual entry
    uri: str


@dataclass(frozen=True, slots=True)
class EnrollmentRecord:
    """Metadata of one stored enrollment (never the secret)."""

    user: str
    enrollment: str
    enrolled_at: str
    operator: str
    replaced: bool
    audited: bool


class AuditEmit(Protocol):
    """`AuditLog.emit`'s shape: write one audit record (may raise AuditWriteError)."""

    def __call__(self, event: str, /, **fields: object) -> object: ...


def key_id(key: bytes) -> str:
    """A short public fingerprint of the AES key, stored with the secrets it encrypted."""
    return hashlib.sha256(b"gatewayd-totp-key-id\x00" + key).hexdigest()[:16]


def normalize_code(code: str) -> str | None:
    """The 6 ASCII digits of a typed code, or None.

    Users type ``123 456`` as shown in their app, or full-width digits from a Japanese IME;
    both are accepted. Anything else is not a code.
    """
    if len(code) > 32:
        return None
    digits = "".join(unicodedata.normalize("NFKC", code).split())
    if len(digits) != DIGITS or not digits.isascii() or not digits.isdigit():
        return None
    return digits


def time_step(now: float) -> int:
    return int(now // PERIOD)


# --- files ------------------------------------------------------------------------------------


def _give_to_state_dir_owner(path: Path, state_dir: Path) -> None:
    """When root runs the CLI, hand new files to the daemon's user (the state dir's owner)."""
    if os.geteuid() != 0:
        return
    owner = state_dir.stat()
    if owner.st_uid != 0:
        os.chown(path, owner.st_uid, owner.st_gid)


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600 from birth, durably.

    ``exclusive``: create ``path`` itself and fail if it exists (a key is never overwritten);
    otherwise write a temporary file and rename it over ``path`` (readers never see half).
    """
    target = path if exclusive else path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _give_to_state_dir_owner(target, path.parent)
        if target != path:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    fsync_directory(path.parent)


def _check_private(path: Path, what: str) -> None:
    problem = exposure(path, what)
    if problem is not None:
        raise TotpStoreError(problem)


def read_key(path: Path) -> bytes:
    """Read the AES key file; raise `TotpStoreError` if missing, unsafe or malformed."""
    try:
        _check_private(path, "TOTP key file")
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TotpStoreError(f"cannot read TOTP key file {path}: {exc}") from None
    if not text.startswith(KEY_PREFIX):
        raise TotpStoreError(f"TOTP key file {path} is not a gatewayd TOTP key")
    try:
        key = base64.b64decode(text[len(KEY_PREFIX):].strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise TotpStoreError(f"TOTP key file {path} does not hold a {KEY_BYTES}-byte key")
    return key


def create_key(path: Path) -> bytes:
    """Create a new random key file (fails if one appeared meanwhile)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    line = KEY_PREFIX + base64.b64encode(key).decode("ascii") + "\n"
    _write_private(path, line.encode("ascii"), exclusive=True)
    return key


# --- the secrets store (blocking; the daemon calls it from worker threads) ----------------------


class SecretStore:
    """The encrypted TOTP secrets of one node's state directory."""

    def __init__(self, state_dir: Path, *, issuer: str = "gatewayd") -> None:
        self.state_dir = state_dir
        self.issuer = issuer
        self.key_path = state_dir / KEY_FILE
        self.path = state_dir / SECRETS_FILE
        self._lock_path = state_dir / (SECRETS_FILE + ".lock")
        self._cache_lock = threading.Lock()
        self._cache: tuple[tuple[int, int, int, int], dict[str, Any]] | None = None
        self._key: bytes | None = None

    # --- reading -----------------------------------------------------------------------------

    def record(self, user: str) -> EnrollmentRecord | None:
        """The enrollment metadata of ``user`` (any spelling), or None."""
        found = self._entry(user)
        return None if found is None else _record(found[1])

    def records(self) -> list[EnrollmentRecord]:
        return [_record(e) for e in self._users(self._load()).values()]

    def secret(self, user: str) -> bytes | None:
        """The decrypted secret of ``user``, or None when not enrolled."""
        found = self._entry(user)
        return None if found is None else self._decrypt(*found)

    def current_code(self, user: str, now: float | None = None) -> str:
        """The code ``user``'s app shows now (demo and tests only)."""
        secret = self.secret(user)
        if secret is None:
            raise KeyError(user)
        now = datetime.now(UTC).timestamp() if now is None else now
        return _otp(secret).generate_otp(time_step(now))

    # --- writing -----------------------------------------------------------------------------

    def enroll(self, user: str, *, operator: str = "unknown", replace: bool = False,
               now: datetime | None = None) -> Enrollment:
        """Give ``user`` a new random secret; returns it with its ``otpauth://`` URI.

        ``user`` must be the canonical name from the directory (it is shown in the app).
        Raises `AlreadyEnrolled` unless ``replace``; the new enrollment is pending audit.
        """
        name = lookup_key(user)
        if name is None:
            raise ValueError(f"unusable user name {user!r}")
        with self._exclusive():
            key = self._key_for_writing()
            data = self._load_or_empty(key)
            users = self._users(data)
            if name in users and not replace:
                raise AlreadyEnrolled(user)
            secret = secrets.token_bytes(SECRET_BYTES)
            enrollment = secrets.token_hex(16)
            nonce = secrets.token_bytes(NONCE_BYTES)
            sealed = AESGCM(key).encrypt(nonce, secret, _aad(name, enrollment))
            users[name] = {
                "user": user, "enrollment": enrollment,
                "enrolled_at": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "operator": operator, "replaced": name in users, "audited": False,
                "nonce": base64.b64encode(nonce).decode("ascii"),
                "ciphertext": base64.b64encode(sealed).decode("ascii"),
            }
            self._save(data)
        encoded = base64.b32encode(secret).decode("ascii")
        uri = _otp(secret).provisioning_uri(name=user, issuer_name=self.issuer)
        return Enrollment(encoded, uri)

    def mark_audited(self, user: str, enrollment: str) -> bool:
        """Record that ``mfa.enroll`` was written for this enrollment (if still current)."""
        with self._exclusive():
            data = self._load()
            entry = self._users(data).get(lookup_key(user) or "")
            if entry is None or entry["enrollment"] != enrollment or entry["audited"]:
                return False
            entry["audited"] = True
            self._save(data)
            return True

    def remove(self, user: str) -> bool:
        """Delete ``user``'s secret (lost phone, leaver); True if there was one."""
        with self._exclusive():
            data = self._load()
            if self._users(data).pop(lookup_key(user) or "", None) is None:
                return False
            self._save(data)
            return True

    # --- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # A lock file root created must stay usable by the daemon marking audits.
            _give_to_state_dir_owner(self._lock_path, self.state_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _key_for_writing(self) -> bytes:
        if self.key_path.exists() or self.path.exists():
            # Never mint a new key beside existing secrets: they would become unreadable.
            return self._read_key()
        self._key = create_key(self.key_path)
        return self._key

    def _read_key(self) -> bytes:
        if self._key is None:
            self._key = read_key(self.key_path)
        return self._key

    def _load_or_empty(self, key: bytes) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": STORE_FORMAT, "key_id": key_id(key), "users": {}}
        return self._load()

    def _load(self) -> dict[str, Any]:
        """The parsed secrets file (cached until it changes on disk); {} users if absent."""
        with self._cache_lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                return {"format": STORE_FORMAT, "users": {}}
            except OSError as exc:
                raise TotpStoreError(f"cannot read {self.path}: {exc.strerror}") from None
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self._cache is None or self._cache[0] != signature:
                self._cache = (signature, self._parse())
            return copy.deepcopy(self._cache[1])  # callers may modify their copy

    def _parse(self) -> dict[str, Any]:
        _check_private(self.path, "TOTP secrets file")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TotpStoreError(f"cannot read {self.path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            raise TotpStoreError(f"{self.path} is not a {STORE_FORMAT} file")
        if not isinstance(data.get("users"), dict):
            raise TotpStoreError(f"{self.path}: users must be an object")
        if data.get("key_id") != key_id(self._read_key()):
            raise TotpStoreError(f"{self.path} was encrypted with a different key than "
                                 f"{self.key_path}")
        for name, entry in data["users"].items():
            if not _well_formed(name, entry):
                raise TotpStoreError(f"{self.path}: malformed entry for {name!r}")
        return data

    def _save(self, data: Mapping[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
        _write_private(self.path, text.encode("ascii"), exclusive=False)

    @staticmethod
    def _users(data: Mapping[str, Any]) -> dict[str, Any]:
        users: dict[str, Any] = data["users"]
        return users

    def _entry(self, user: str) -> tuple[str, Mapping[str, Any]] | None:
        name = lookup_key(user)
        if name is None:
            return None
        entry: Mapping[str, Any] | None = self._users(self._load()).get(name)
        return None if entry is None else (name, entry)

    def _decrypt(self, name: str, entry: Mapping[str, Any]) -> bytes:
        # The associated data uses the name the entry was found under, never a name read from
        # the entry itself: an entry moved to another account must fail to decrypt.
        try:
            nonce = base64.b64decode(entry["nonce"], validate=True)
            sealed = base64.b64decode(entry["ciphertext"], validate=True)
            return AESGCM(self._read_key()).decrypt(nonce, sealed,
                                                    _aad(name, str(entry["enrollment"])))
        except (KeyError, TypeError, ValueError, binascii.Error, InvalidTag):
            raise TotpStoreError(f"{self.path}: the secret of {name!r} does not decrypt "
                                 "(corrupted or tampered)") from None


_ENTRY_TYPES: Final[Mapping[str, type]] = MappingProxyType({
    "user": str, "enrollment": str, "enrolled_at": str, "operator": str, "replaced": bool,
    "audited": bool, "nonce": str, "ciphertext": str,
})


def _well_formed(name: str, entry: object) -> bool:
    return (
        lookup_key(name) == name and isinstance(entry, dict)
        and all(isinstance(entry.get(k), t) for k, t in _ENTRY_TYPES.items())
        and lookup_key(entry["user"]) == name
    )


def _aad(name: str, enrollment: str) -> bytes:
    return AAD_PREFIX + name.encode("utf-8") + b"\x00" + enrollment.encode("ascii")


def _otp(secret: bytes) -> pyotp.TOTP:
    return pyotp.TOTP(base64.b32encode(secret).decode("ascii"), digits=DIGITS, interval=PERIOD)


def _record(entry: Mapping[str, Any]) -> EnrollmentRecord:
    return EnrollmentRecord(
        user=str(entry["user"]), enrollment=str(entry["enrollment"]),
        enrolled_at=str(entry["enrolled_at"]), operator=str(entry["operator"]),
        replaced=bool(entry["replaced"]), audited=bool(entry["audited"]),
    )


# --- verification (async, in the daemon) ----------------------------------------------------


def _replay_key(user: str, step: int) -> str:
    # Hashed: keys live in a store shared with other nodes and must not carry raw input.
    digest = hashlib.sha256((lookup_key(user) or user).encode("utf-8")).hexdigest()[:32]
    return f"totp:used:{digest}:{step}"


class TotpVerifier:
    """Checks codes against `SecretStore` and claims them once in the shared `StateStore`."""

    def __init__(self, store: SecretStore, state: StateStore, *, audit_emit: AuditEmit,
                 timeout: float = 5.0) -> None:
        self.store = store
        self.state = state
        self.timeout = timeout
        self._emit = audit_emit
        self._dummy = _otp(secrets.token_bytes(SECRET_BYTES))

    async def enrolled(self, user: str) -> bool:
        return await self._off_loop(self.store.record, user) is not None

    async def verify(self, user: str | None, code: str, now: float) -> int | None:
        """The time step ``code`` belongs to if it is valid for ``user`` now, else None.

        Does not claim the code (see `consume`). ``user`` None (unknown user) or a user without
        a secret costs the same work against a dummy secret and returns None. Raises
        `TotpStoreError` when the store cannot be read (fail closed).
        """
        secret = await self._secret_after_audit(user) if user is not None else None
        otp = _otp(secret) if secret is not None else self._dummy
        typed = normalize_code(code)
        current = time_step(now)
        matched: int | None = None
        for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
            # No early exit and a constant-time compare: timing says nothing about the code.
            if hmac.compare_digest(otp.generate_otp(step), typed or "") and secret is not None:
                matched = step
        return matched

    async def consume(self, user: str, step: int) -> bool:
        """Claim ``step`` for ``user`` once, cluster-wide; False if it was already used.

        After a successful claim the earlier steps of the drift window are burned as well.
        Raises `StateUnavailable` when the shared store cannot answer (at any of the claims):
        the caller refuses the login, since a replay could not be ruled out.
        """
        if not await self.state.add_once(_replay_key(user, step), REPLAY_TTL):
            return False
        for older in range(step - 2 * DRIFT_STEPS, step):
            await self.state.add_once(_replay_key(user, older), REPLAY_TTL)
        return True

    # --- auditing enrollments ------------------------------------------------------------------

    async def flush_enrollments(self) -> int:
        """Emit ``mfa.enroll`` for every pending enrollment, then mark it audited."""
        records = await self._off_loop(self.store.records)
        count = 0
        for record in records:
            if not record.audited:
                count += await self._audit(record)
        return count

    async def watch_enrollments(self, interval: float) -> None:
        """Flush pending enrollments every ``interval`` s (a named task owned by the Gateway)."""
        while True:
            try:
                await self.flush_enrollments()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not audit pending TOTP enrollments; will retry")
            await asyncio.sleep(interval)

    async def _secret_after_audit(self, user: str) -> bytes | None:
        record = await self._off_loop(self.store.record, user)
        if record is None:
            return None
        if not record.audited:
            await self._audit(record)  # the guarantee: no unaudited secret is ever used
        return await self._off_loop(self.store.secret, user)

    async def _audit(self, record: EnrollmentRecord) -> int:
        # Written before marking: a crash in between re-emits (duplicate) rather than loses it.
        self._emit("mfa.enroll", user=record.user, operator=record.operator,
                   reason="replaced_secret" if record.replaced else "new_secret",
                   status="success")
        marked = await self._off_loop(self.store.mark_audited, record.user, record.enrollment)
        return 1 if marked else 0

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await within(asyncio.to_thread(fn, *args), self.timeout)
        except TimeoutError:
            raise TotpStoreError(f"TOTP store not read within {self.timeout}s") from None
