"""The CA directory behind ``gatewayd certs``: its layout, the index of issued certificates,
and the operations (init, issue, revoke, re-sign the CRL) that keep them consistent.

Layout of the directory (default ``certs/``; on the gateway host e.g. ``/etc/gatewayd/tls``):

================================  =========  ==================================================
file                              mode       what
================================  =========  ==================================================
``device-ca.crt``, ``.key``       0644/0600  device CA → ``https.client_ca_file``
``devices.crl``                   0644       its revocation list → ``https.crl_file``
``index.json``                    0644       every certificate issued here, and revocations
``server-ca.crt``, ``.key``       0644/0600  server CA for staff browsers (none if self-signed)
``server.crt``, ``server.key``    0644/0600  the gateway's TLS certificate → ``https.cert_file``
``ssh-user-ca``, ``.pub``         0600/0644  SSH user CA, OpenSSH format
``ssh-host-ed25519.key``, ``.pub`` 0600/0644 the gateway's SSH host key, OpenSSH format
``devices/<id>.p12|.crt|.key``    0600/0644  what to install on device ``<id>`` (dir 0700)
``issued/<serial>.crt``           0644       a copy of every certificate ever issued here
``.lock``                         0600       writers hold an exclusive ``flock`` on it
================================  =========  ==================================================

Index (``index.json``, replaced atomically, readable by the gateway)::

    {"format": "gatewayd-ca-index-v1",
     "crl": {"number": 4, "this_update": "2026-11-27T08:05:56Z",
             "next_update": "2027-11-27T08:05:56Z"},
     "certificates": [
       {"serial": "3f0c…", "kind": "device", "name": "pc-0042", "user": "alice",
        "names": [], "not_before": "2026-11-27T08:05:56Z", "not_after": "2028-11-27T08:10:56Z",
        "sha256": "9a1f…", "issued_at": "2026-11-27T08:10:56Z", "issued_by": "admin1",
        "revoked_at": null, "revocation_reason": null, "revoked_by": null}]}

``kind`` is ``device`` (``name`` = device id, ``user`` = the bound user or null for a shared
device) or ``server`` (``name`` = first DNS name or IP address, ``names`` = all of them).
``serial`` is lower-case hex; times are UTC, RFC 3339 with ``Z``; ``issued_by`` /
``revoked_by`` name the operator (``admin1 (sudo as root)``).

Consistency: the index is the source of truth and the CRL is derived from it (every revoked
device certificate, whatever its expiry). A new certificate enters the index before its files
are written (anything that could reach a PC can be revoked); a revocation enters the index
before the CRL is re-signed (a crash in between loses nothing: ``gatewayd certs crl --renew``
re-derives the list). CA keys are never overwritten: ``init`` refuses a directory that holds
one, and every key file is created with ``O_EXCL``.

Audit: this directory belongs to the CA administrator, the audit log to the daemon. The
gateway reads ``index.json`` beside ``https.crl_file`` and writes ``cert.issue`` / ``cert.revoke``
for every certificate / revocation it has not audited yet (see `gatewayd.emergency`).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from gatewayd.certs import (
    DEFAULT_CRL_LIFETIME,
    DEFAULT_DEVICE_LIFETIME,
    DEFAULT_SERVER_LIFETIME,
    REVOCATION_REASONS,
    CertAndKey,
    CertError,
    CrlInfo,
    DeviceFiles,
    Revocation,
    certificates_pem,
    check_device_id,
    check_user_name,
    crl_pem,
    device_identity_from_cert,
    fingerprint,
    issue_device_cert,
    issue_server_cert,
    load_ca,
    load_certificates,
    new_crl,
    new_device_ca,
    new_server_ca,
    new_ssh_key,
    next_crl_time,
    parse_subject_alt_name,
    read_crl,
    save_device,
    save_pair,
    self_signed_server_cert,
    serial_hex,
    ssh_private_key,
    ssh_public_key,
)
from gatewayd.files import atomic_write

INDEX_FORMAT: Final = "gatewayd-ca-index-v1"
INDEX_FILE: Final = "index.json"
CRL_FILE: Final = "devices.crl"
DEVICE_CA: Final = "device-ca"
SERVER_CA: Final = "server-ca"
SERVER: Final = "server"
SSH_USER_CA: Final = "ssh-user-ca"
SSH_HOST_KEY: Final = "ssh-host-ed25519.key"
DEVICES_DIR: Final = "devices"
ISSUED_DIR: Final = "issued"
LOCK_FILE: Final = ".lock"
MAX_DAYS: Final = 3650
MAX_CRL_NUMBER: Final = 2**159 - 1  # RFC 5280 5.2.3: at most 20 octets
# A serial typed by hand must be long enough that it cannot hit the wrong certificate.
MIN_SERIAL_PREFIX: Final = 8

Kind = Literal["device", "server"]
Status = Literal["valid", "expired", "revoked"]


class CaError(Exception):
    """The operation was refused (exit 1): the message says why and what to do instead."""


class CaUsageError(CaError):
    """The inputs cannot be used (exit 2): a bad name, a directory that is not a CA, …"""


def _utc_text(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: object, where: str) -> datetime:
    if not isinstance(text, str):
        raise CaError(f"{where}: expected a UTC time")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise CaError(f"{where}: expected a UTC time like 2026-11-27T08:10:56Z") from None


def _optional_time(value: object, where: str) -> datetime | None:
    return None if value is None else _parse_time(value, where)


# --- the index ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One certificate issued from this directory (see the module docstring)."""

    serial: int
    kind: Kind
    name: str
    user: str | None
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    sha256: str
    issued_at: datetime
    issued_by: str
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    revoked_by: str | None = None

    def status(self, now: datetime) -> Status:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.not_after else "valid"

    def to_json(self) -> dict[str, object]:
        return {
            "serial": serial_hex(self.serial), "kind": self.kind, "name": self.name,
            "user": self.user, "names": list(self.names),
            "not_before": _utc_text(self.not_before), "not_after": _utc_text(self.not_after),
            "sha256": self.sha256, "issued_at": _utc_text(self.issued_at),
            "issued_by": self.issued_by,
            "revoked_at": _utc_text(self.revoked_at) if self.revoked_at else None,
            "revocation_reason": self.revocation_reason, "revoked_by": self.revoked_by,
        }

    @classmethod
    def from_json(cls, data: object, where: str) -> IndexEntry:
        if not isinstance(data, dict):
            raise CaError(f"{where}: expected an object")
        try:
            serial = int(str(data["serial"]), 16)
            kind = data["kind"]
            if kind not in ("device", "server"):
                raise CaError(f"{where}.kind: expected device or server")
            names = data.get("names", [])
            if not isinstance(names, list):
                raise CaError(f"{where}.names: expected a list")
            text_fields = [data["name"], data["sha256"], data["issued_by"], *names]
            optional = [data.get("user"), data.get("revocation_reason"), data.get("revoked_by")]
            if (not all(isinstance(v, str) for v in text_fields)
                    or not all(v is None or isinstance(v, str) for v in optional)):
                raise CaError(f"{where}: malformed entry")
            return cls(
                serial=serial, kind=kind, name=data["name"], user=data.get("user"),
                names=tuple(names),
                not_before=_parse_time(data["not_before"], f"{where}.not_before"),
                not_after=_parse_time(data["not_after"], f"{where}.not_after"),
                sha256=data["sha256"],
                issued_at=_parse_time(data["issued_at"], f"{where}.issued_at"),
                issued_by=data["issued_by"],
                revoked_at=_optional_time(data.get("revoked_at"), f"{where}.revoked_at"),
                revocation_reason=data.get("revocation_reason"),
                revoked_by=data.get("revoked_by"),
            )
        except (KeyError, ValueError) as exc:
            raise CaError(f"{where}: malformed entry ({exc!r})") from None


@dataclass(frozen=True, slots=True)
class Index:
    """The whole index: every certificate, and the number and times of the current CRL."""

    certificates: tuple[IndexEntry, ...] = ()
    crl_number: int = 0
    crl_this_update: datetime | None = None
    crl_next_update: datetime | None = None

    def by_serial(self) -> dict[int, IndexEntry]:
        return {entry.serial: entry for entry in self.certificates}

    def devices(self, device_id: str) -> list[IndexEntry]:
        return [e for e in self.certificates if e.kind == "device" and e.name == device_id]

    def revocations(self) -> list[Revocation]:
        """What the CRL must list: every revoked device certificate."""
        return [Revocation(e.serial, e.revoked_at, e.revocation_reason or "unspecified")
                for e in self.certificates if e.kind == "device" and e.revoked_at is not None]

    def to_json(self) -> dict[str, object]:
        return {
            "format": INDEX_FORMAT,
            "crl": {"number": self.crl_number,
                    "this_update": _utc_text(self.crl_this_update) if self.crl_this_update
                    else None,
                    "next_update": _utc_text(self.crl_next_update) if self.crl_next_update
                    else None},
            "certificates": [entry.to_json() for entry in self.certificates],
        }


def parse_index(text: str, source: str) -> Index:
    """Validate the text of an ``index.json``; raise CaError naming the problem."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CaError(f"{source}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise CaError(f"{source}: not a {INDEX_FORMAT} file")
    crl = data.get("crl")
    certificates = data.get("certificates")
    if not isinstance(crl, dict) or not isinstance(certificates, list):
        raise CaError(f"{source}: crl must be an object and certificates a list")
    number = crl.get("number")
    if not isinstance(number, int) or isinstance(number, bool) or number < 0:
        raise CaError(f"{source}: crl.number must be a non-negative integer")
    entries = tuple(IndexEntry.from_json(item, f"{source}: certificates[{i}]")
                    for i, item in enumerate(certificates))
    return Index(entries, number,
                 _optional_time(crl.get("this_update"), f"{source}: crl.this_update"),
                 _optional_time(crl.get("next_update"), f"{source}: crl.next_update"))


def read_index(path: Path) -> Index:
    """Read ``index.json`` (blocking). A missing file raises FileNotFoundError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise CaError(f"{path}: cannot read: {exc}") from None
    return parse_index(text, str(path))


def entry_for(cert: x509.Certificate, kind: Kind, *, operator: str, now: datetime,
              names: Sequence[str] = ()) -> IndexEntry:
    """The index entry of a certificate just issued."""
    if kind == "device":
        identity = device_identity_from_cert(cert)
        name, user = identity.device_id, identity.user
    else:
        name, user = names[0], None
    return IndexEntry(
        serial=cert.serial_number, kind=kind, name=name, user=user, names=tuple(names),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        sha256=fingerprint(cert), issued_at=now, issued_by=operator,
    )


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitResult:
    created: tuple[Path, ...]
    server: IndexEntry | None
    self_signed: bool


@dataclass(frozen=True, slots=True)
class IssuedDevice:
    entry: IndexEntry
    files: DeviceFiles
    still_valid: tuple[IndexEntry, ...]  # earlier certificates of the device, not revoked


@dataclass(frozen=True, slots=True)
class IssuedServer:
    entry: IndexEntry
    cert: Path
    key: Path
    self_signed: bool


@dataclass(frozen=True, slots=True)
class RevokeResult:
    revoked: tuple[IndexEntry, ...]
    crl: CrlInfo
    crl_path: Path


@dataclass(frozen=True, slots=True)
class CrlStatus:
    """The CRL on disk compared with the index (for ``list`` and ``crl``)."""

    info: CrlInfo | None
    problem: str | None  # why the file cannot be used or is out of step, else None


# --- the directory ------------------------------------------------------------------------


def _permitted_for(names: Sequence[str]) -> list[str]:
    """Default name constraints of a server CA: exactly the names it was created for."""
    permitted = []
    for name in names:
        general = parse_subject_alt_name(name)
        if isinstance(general, x509.IPAddress):
            address = general.value
            permitted.append(str(ipaddress.ip_network(address)))
        else:
            permitted.append(str(general.value))
    return permitted


def _owner_ids(user: str | None) -> tuple[int, int] | None:
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CaUsageError(f"no such system user {user!r} (--key-owner)") from None
    return entry.pw_uid, entry.pw_gid


def _organization(ca_cert: x509.Certificate) -> str | None:
    """The CA's organisation name, repeated in what it issues (set once, at init)."""
    names = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(names[0].value) if names else None


def _days(days: int | None, default: timedelta) -> timedelta:
    if days is None:
        return default
    if not 1 <= days <= MAX_DAYS:
        raise CaUsageError(f"--days must be between 1 and {MAX_DAYS}")
    return timedelta(days=days)


class CaDirectory:
    """One CA directory. Every method is blocking (file I/O, key generation, flock)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # --- paths -----------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def index_path(self) -> Path:
        return self.path / INDEX_FILE

    @property
    def crl_path(self) -> Path:
        return self.path / CRL_FILE

    @property
    def device_ca_cert(self) -> Path:
        return self.path / f"{DEVICE_CA}.crt"

    # --- reading ---------------------------------------------------------------------------

    def index(self) -> Index:
        """The index; CaUsageError when the directory was never initialised."""
        try:
            return read_index(self.index_path)
        except FileNotFoundError:
            raise CaUsageError(f"{self.path} is not a gatewayd CA directory (no {INDEX_FILE}); "
                               "create one with: gatewayd certs init") from None

    def crl_status(self, index: Index, now: datetime | None = None) -> CrlStatus:
        """Read and verify the CRL against the device CA and the index."""
        now = now or datetime.now(UTC)
        try:
            ca_certs = load_certificates(self.device_ca_cert)
            info = read_crl(self.crl_path.read_bytes(), ca_certs, source=str(self.crl_path))
        except (OSError, CertError) as exc:
            return CrlStatus(None, str(exc) if isinstance(exc, CertError)
                             else f"{self.crl_path}: {exc.strerror}")
        if info.number < index.crl_number or set(info.revoked) != {
                r.serial for r in index.revocations()}:
            return CrlStatus(info, "the CRL does not match the index (an interrupted "
                                   "revocation?): run gatewayd certs crl --renew")
        if info.next_update is not None and info.next_update <= now:
            return CrlStatus(info, "the CRL has expired: the gateway refuses every device "
                                   "certificate until you run gatewayd certs crl --renew")
        return CrlStatus(info, None)

    # --- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers: two administrators issuing at once must not lose an entry."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_index(self, index: Index) -> None:
        text = json.dumps(index.to_json(), indent=2, ensure_ascii=False) + "\n"
        atomic_write(self.index_path, text.encode("utf-8"), mode=0o644, overwrite=True)

    def _keep_copy(self, cert: x509.Certificate) -> None:
        path = self.path / ISSUED_DIR / f"{serial_hex(cert.serial_number)}.crt"
        atomic_write(path, certificates_pem([cert]), mode=0o644, overwrite=False)

    def _load_device_ca(self) -> CertAndKey:
        try:
            return load_ca(self.device_ca_cert, self.file(f"{DEVICE_CA}.key"))
        except CertError as exc:
            raise CaUsageError(f"cannot use the device CA: {exc}") from None

    def _sign_crl(self, index: Index, ca: CertAndKey, crl_days: int | None,
                  min_number: int = 0) -> tuple[Index, CrlInfo]:
        """Write ``index`` with the next CRL number (at least ``min_number``), then the CRL."""
        valid_for = _days(crl_days, DEFAULT_CRL_LIFETIME)
        this_update = next_crl_time(index.crl_this_update)
        # Only when hundreds of lists were signed within minutes: a list whose thisUpdate is
        # in the future would be "not yet valid" to OpenSSL, so wait for it.
        delay = (this_update - datetime.now(UTC)).total_seconds()
        if delay > 0:
            time.sleep(delay)
        number = max(index.crl_number + 1, min_number)
        index = replace(index, crl_number=number, crl_this_update=this_update,
                        crl_next_update=this_update + valid_for)
        crl = new_crl(ca, index.revocations(), number=index.crl_number, this_update=this_update,
                      valid_for=valid_for)
        self._write_index(index)
        atomic_write(self.crl_path, crl_pem(crl), mode=0o644, overwrite=True)
        return index, read_crl(crl_pem(crl), [ca.cert], source=str(self.crl_path))

    def init(
        self, *, server_names: Sequence[str], organization: str | None = None,
        self_signed: bool = False, permitted: Sequence[str] = (), key_owner: str | None = None,
        crl_days: int | None = None, operator: str, now: datetime | None = None,
    ) -> InitResult:
        """Create the CAs, the server certificate, SSH keys, an empty CRL and the index.

        ``server_names`` empty: no server CA or certificate (the server certificate comes from
        elsewhere, e.g. a public CA). Refuses (CaError) a directory that already holds a CA.
        """
        now = now or datetime.now(UTC)
        owner = _owner_ids(key_owner)
        existing = [name for name in (f"{DEVICE_CA}.key", f"{SERVER_CA}.key", SSH_USER_CA,
                                      INDEX_FILE)
                    if (self.path / name).exists()]
        if existing:
            raise CaError(f"{self.path} already holds a CA ({', '.join(existing)}); init never "
                          "replaces CA keys that devices and browsers already trust. Use "
                          "another --dir, or issue-device / issue-server / revoke here.")
        if permitted and (self_signed or not server_names):
            raise CaUsageError("--permit applies to a server CA (not with --self-signed or "
                               "without --server-name)")
        self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        created: list[Path] = []
        with self._locked():
            device_ca = new_device_ca(organization, now=now)
            files = save_pair(device_ca, self.path, DEVICE_CA)
            created += [files.cert, files.key]
            created += self._write_ssh_keys(owner)
            index = Index()
            server_entry = None
            if server_names:
                issued, server_ca = self._new_server_material(
                    server_names, organization, self_signed, permitted, now)
                if server_ca is not None:
                    files = save_pair(server_ca, self.path, SERVER_CA)
                    created += [files.cert, files.key]
                server_entry = entry_for(issued.cert, "server", operator=operator, now=now,
                                         names=server_names)
                index = replace(index, certificates=(server_entry,))
                self._keep_copy(issued.cert)
                files = save_pair(issued, self.path, SERVER)
                self._give(files.key, owner)
                created += [files.cert, files.key]
            index, _ = self._sign_crl(index, device_ca, crl_days)
            created += [self.crl_path, self.index_path]
        (self.path / DEVICES_DIR).mkdir(mode=0o700, exist_ok=True)
        return InitResult(tuple(created), server_entry, self_signed)

    def _new_server_material(
        self, names: Sequence[str], organization: str | None, self_signed: bool,
        permitted: Sequence[str], now: datetime,
    ) -> tuple[CertAndKey, CertAndKey | None]:
        try:
            if self_signed:
                return self_signed_server_cert(names, organization=organization, now=now), None
            server_ca = new_server_ca(list(permitted) or _permitted_for(names), organization,
                                      now=now)
            return issue_server_cert(server_ca, names, organization=organization,
                                     now=now), server_ca
        except CertError as exc:
            raise CaUsageError(str(exc)) from None

    def _write_ssh_keys(self, owner: tuple[int, int] | None) -> list[Path]:
        written = []
        # Both go to the daemon's user: the host key for the SSH listener, the user CA key for
        # the portal, which signs short-lived SSH user certificates with it (ssh.user_ca_key_file).
        for stem, comment, give in ((SSH_USER_CA, "gatewayd SSH user CA", True),
                                    (SSH_HOST_KEY, "gatewayd SSH host key", True)):
            key = new_ssh_key()
            private = self.path / stem
            atomic_write(private, ssh_private_key(key), mode=0o600, overwrite=False)
            public = self.path / (stem.removesuffix(".key") + ".pub")
            atomic_write(public, ssh_public_key(key, comment), mode=0o644, overwrite=False)
            if give:
                self._give(private, owner)
            written += [private, public]
        return written

    @staticmethod
    def _give(path: Path, owner: tuple[int, int] | None) -> None:
        """Hand a key the daemon must read (server TLS key, SSH host key) to its user."""
        if owner is not None:
            os.chown(path, *owner)

    def issue_device(
        self, device_id: str, user: str | None, *, days: int | None = None, renew: bool = False,
        legacy_p12: bool = False, operator: str, now: datetime | None = None,
    ) -> IssuedDevice:
        """Issue a device certificate and write ``devices/<id>.crt|.key|.p12``.

        A device that already has a valid certificate needs ``renew`` (a second PC under the
        same id is almost always a typo); the earlier certificate stays valid until it
        expires or is revoked, so a PC keeps working until the new one is installed.
        """
        now = now or datetime.now(UTC)
        try:
            check_device_id(device_id)
            if user is not None:
                check_user_name(user)
        except CertError as exc:
            raise CaUsageError(str(exc)) from None
        valid_for = _days(days, DEFAULT_DEVICE_LIFETIME)
        with self._locked():
            index = self.index()
            ca = self._load_device_ca()
            clash = sorted({e.name for e in index.certificates if e.kind == "device"
                            and e.name != device_id and e.name.lower() == device_id.lower()})
            if clash:
                raise CaUsageError(f"device id {device_id!r} differs only in case from "
                                   f"{clash[0]!r}; device ids are case-sensitive")
            live = tuple(e for e in index.devices(device_id) if e.status(now) == "valid")
            if live and not renew:
                newest = max(live, key=lambda e: e.not_after)
                raise CaError(
                    f"{device_id} already has a valid certificate (serial "
                    f"{serial_hex(newest.serial)}, bound to {newest.user or 'nobody'}, expires "
                    f"{newest.not_after:%Y-%m-%d}); use --renew to issue another one")
            try:
                issued = issue_device_cert(ca, device_id, user, valid_for=valid_for, now=now,
                                           organization=_organization(ca.cert))
            except CertError as exc:
                raise CaUsageError(str(exc)) from None
            entry = entry_for(issued.cert, "device", operator=operator, now=now)
            self._keep_copy(issued.cert)
            self._write_index(replace(index, certificates=(*index.certificates, entry)))
            files = save_device(issued, self.path / DEVICES_DIR, legacy_p12=legacy_p12,
                                overwrite=True)
        return IssuedDevice(entry, files, live)

    def issue_server(
        self, names: Sequence[str], *, days: int | None = None, stem: str = SERVER,
        renew: bool = False, key_owner: str | None = None, operator: str,
        now: datetime | None = None,
    ) -> IssuedServer:
        """Issue ``<stem>.crt|.key`` from the server CA (self-signed if there is none)."""
        now = now or datetime.now(UTC)
        owner = _owner_ids(key_owner)
        valid_for = _days(days, DEFAULT_SERVER_LIFETIME)
        cert_path, key_path = self.path / f"{stem}.crt", self.path / f"{stem}.key"
        with self._locked():
            index = self.index()
            if (cert_path.exists() or key_path.exists()) and not renew:
                raise CaError(f"{cert_path} already exists; use --renew to replace it (restart "
                              "the gateway afterwards), or --out for another node's certificate")
            self_signed = not self.file(f"{SERVER_CA}.key").exists()
            try:
                if self_signed:
                    organization = _organization(load_certificates(self.device_ca_cert)[0])
                    issued = self_signed_server_cert(names, valid_for=valid_for, now=now,
                                                     organization=organization)
                else:
                    server_ca = load_ca(self.file(f"{SERVER_CA}.crt"),
                                        self.file(f"{SERVER_CA}.key"))
                    issued = issue_server_cert(server_ca, names, valid_for=valid_for, now=now,
                                               organization=_organization(server_ca.cert))
            except CertError as exc:
                raise CaUsageError(str(exc)) from None
            entry = entry_for(issued.cert, "server", operator=operator, now=now, names=names)
            self._keep_copy(issued.cert)
            self._write_index(replace(index, certificates=(*index.certificates, entry)))
            files = save_pair(issued, self.path, stem, overwrite=True)
            self._give(files.key, owner)
        return IssuedServer(entry, files.cert, files.key, self_signed)

    def find(self, index: Index, target: str) -> list[IndexEntry]:
        """The device certificates ``target`` names: a device id, else a serial (prefix).

        A device id names every certificate ever issued to that PC that is not revoked yet,
        expired ones included: "revoke pc-0042" must leave nothing of that PC accepted, even
        by a gateway whose clock is wrong. When all are revoked, the newest is returned (the
        caller reports it as already revoked).
        """
        by_device = index.devices(target)
        if by_device:
            return [e for e in by_device if e.revoked_at is None] or [
                max(by_device, key=lambda e: e.not_after)]
        text = target.lower().replace(":", "").removeprefix("0x")
        if len(text) < MIN_SERIAL_PREFIX or any(c not in "0123456789abcdef" for c in text):
            raise CaError(f"no device {target!r} in the index (a serial needs at least "
                          f"{MIN_SERIAL_PREFIX} hex digits)")
        matches = [e for e in index.certificates if serial_hex(e.serial).startswith(text)]
        if not matches:
            raise CaError(f"no device or certificate serial {target!r} in the index")
        if len(matches) > 1:
            raise CaError(f"serial prefix {target!r} matches {len(matches)} certificates; "
                          "give more digits")
        return matches

    def revoke(
        self, target: str, *, reason: str = "unspecified", operator: str,
        crl_days: int | None = None, now: datetime | None = None,
    ) -> RevokeResult:
        """Revoke every certificate of device ``target`` not revoked yet (or the one serial)."""
        now = now or datetime.now(UTC)
        if reason not in REVOCATION_REASONS:
            raise CaUsageError(f"unknown reason {reason!r}: one of "
                               f"{', '.join(REVOCATION_REASONS)}")
        with self._locked():
            index = self.index()
            found = self.find(index, target)
            servers = [e for e in found if e.kind == "server"]
            if servers:
                raise CaError(f"{serial_hex(servers[0].serial)} is a server certificate; "
                              "browsers do not read this CRL. Replace it with issue-server "
                              "--renew (and a new server CA if its key leaked).")
            todo = [e for e in found if e.revoked_at is None]
            if not todo:
                done = found[0]
                raise CaError(f"{done.name} ({serial_hex(done.serial)}) is already revoked "
                              f"since {done.revoked_at:%Y-%m-%d %H:%M} UTC")
            ca = self._load_device_ca()
            wanted = {e.serial for e in todo}
            revoked = tuple(replace(e, revoked_at=now, revocation_reason=reason,
                                    revoked_by=operator) for e in todo)
            updated = {e.serial: e for e in revoked}
            index = replace(index, certificates=tuple(
                updated.get(e.serial, e) if e.serial in wanted else e
                for e in index.certificates))
            _, info = self._sign_crl(index, ca, crl_days)
        return RevokeResult(revoked, info, self.crl_path)

    def renew_crl(self, *, crl_days: int | None = None, min_number: int = 0) -> CrlInfo:
        """Re-sign the CRL from the index with a new number and a fresh nextUpdate.

        ``min_number``: after restoring this directory from a backup, the gateways have seen
        higher CRL numbers than the restored index knows and refuse an older list (rollback
        protection); the new list must be numbered above what they saw.
        """
        if not 0 <= min_number <= MAX_CRL_NUMBER:
            raise CaUsageError(f"--min-number must be between 0 and {MAX_CRL_NUMBER}")
        with self._locked():
            index = self.index()
            _, info = self._sign_crl(index, self._load_device_ca(), crl_days, min_number)
        return info

