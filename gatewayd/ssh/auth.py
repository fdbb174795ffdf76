"""Who may open an SSH connection: the two ways in, both with two factors.

Owns the checks of the SSH listener's authentication (the listener, `gatewayd.ssh.server`,
wires them to asyncssh and turns their verdicts into sessions and audit records):

* **keyboard-interactive**: one round with two prompts, echo off — the directory password
  and the TOTP code (`KBDINT_CHALLENGE`). `read_responses` accepts exactly two answers of
  bounded size; anything else is a failed attempt, never an exception. The pair then goes to
  `Authenticator.login`, the very check of the HTTPS sign-in form (regulation, lockout,
  replay protection, uniform failures and timing).
* **user certificates** issued by the portal (`gatewayd.ssh.certificate`): an OpenSSH user
  certificate signed by the SSH user CA (``ssh.user_ca_key_file``; the listener derives the
  public key from it), exactly one principal — the user name the client logs in as —, inside
  its validity window by the gateway's clock, key id ``"<user> <device or -> <portal session
  handle>"`` naming that same user, and the ``permit-port-forwarding`` extension and nothing
  else (`check_certificate`). The certificate proves the MFA of the portal login that issued
  it; on top of that the account must still exist and be enabled (a directory lookup) and
  not be blocked by the gateway (``user_blocked``: `Authenticator.lookup`), the
  device the key id names must not be revoked (`device_revoked`: the device CRL in force
  and the CA index, as the HTTPS listener enforces them), and the portal session must not
  have been ended by a revocation (`RevokedSessions`: admin kill, sign-out, disable, device
  revocation — its certificates die with it, as its cookie did). The listener runs these
  checks for the query and again for the signed attempt (`check_validity` once more right
  before the session starts); `issued_at` tells it whether a certificate predates its start
  (revocations are in memory: see `gatewayd.ssh.server`, "Revocations and restarts").

Plain public keys are refused: a key on its own is one factor.
"""

from __future__ import annotations

import base64
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Final

import asyncssh
from asyncssh.public_key import SSHOpenSSHCertificate

from gatewayd.ca import Index
from gatewayd.certs import CrlInfo
from gatewayd.identity.directory import MAX_PASSWORD_CHARS, MAX_USERNAME_CHARS
from gatewayd.ssh.certificate import CLOCK_SKEW

MAX_CODE_CHARS: Final = 16
KbdIntPrompts = tuple[tuple[str, bool], ...]
KbdIntChallenge = tuple[str, str, str, KbdIntPrompts]
KBDINT_CHALLENGE: Final[KbdIntChallenge] = (
    "gatewayd sign-in",
    "Your directory password, then the 6-digit code of your authenticator app.",
    "",
    (("Password: ", False), ("TOTP code: ", False)),
)
PORT_FORWARDING: Final = "permit-port-forwarding"
CERT_TYPE_USER: Final = 1
MAX_TIME: Final = 253402300799  # 9999-12-31T23:59:59Z; OpenSSH writes 2**64-1 for "forever"
# A device id as `gatewayd certs issue-device` names devices, and a portal session handle
# (`Session.handle`: 16 hex digits; up to 64 accepted).
_DEVICE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
_HANDLE: Final = re.compile(r"[0-9a-f]{8,64}")
# A certificate issued before a revocation of its device was issued on trust that no longer
# holds. The slack covers the issuer's backdating of ``valid_after`` (clock skew).
REVOCATION_SLACK: Final = timedelta(minutes=5)
# Portal sessions whose end revokes the SSH certificates they issued.
REVOKING_END_REASONS: Final = frozenset(
    {"logout", "admin_kill", "user_disabled", "device_revoked", "directory_revoked"})
MAX_REVOKED: Final = 100_000


@dataclass(frozen=True, slots=True)
class KbdIntAnswer:
    password: str
    code: str


def read_responses(responses: Sequence[object]) -> KbdIntAnswer | None:
    """The password and code of a keyboard-interactive reply, or None if it is malformed.

    Exactly two strings, each within its limit (the HTTPS form's limits): a reply with one,
    three or a megabyte of answers is a failed attempt, not a crash.
    """
    if len(responses) != 2:
        return None
    password, code = responses
    if not isinstance(password, str) or not isinstance(code, str):
        return None
    if len(password) > MAX_PASSWORD_CHARS or len(code) > MAX_CODE_CHARS:
        return None
    return KbdIntAnswer(password, code.strip())


def usable_username(username: str) -> bool:
    """A user name worth asking the directory about (bounded, printable)."""
    return 0 < len(username) <= MAX_USERNAME_CHARS and username.isprintable()


# --- certificates ------------------------------------------------------------------------------


class CertificateRefused(Exception):  # noqa: N818 - a verdict, like PermissionError
    """The certificate is not one the gateway accepts; ``detail`` is the audit word."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class KeyId:
    """What the portal wrote into a certificate's key id."""

    user: str
    device: str | None
    portal_session: str


@dataclass(frozen=True, slots=True)
class CertificateClaims:
    """A certificate that passed `check_certificate` (the account checks come after)."""

    user: str
    device: str | None
    portal_session: str
    serial: int
    valid_after: datetime
    valid_before: datetime


def parse_key_id(text: str) -> KeyId | None:
    """``"<user> <device or -> <portal session handle>"`` (single spaces), else None."""
    fields = text.split(" ")
    if len(fields) != 3:
        return None
    user, device, handle = fields
    if not user or not usable_username(user):
        return None
    if device != "-" and not _DEVICE.fullmatch(device):
        return None
    if not _HANDLE.fullmatch(handle):
        return None
    return KeyId(user, None if device == "-" else device, handle)


@dataclass(frozen=True, slots=True)
class OpenSshCertificate:
    """An OpenSSH certificate from an auth request: asyncssh's object (signature verified,
    principals, options, signing key) and the fields asyncssh keeps private, read here from
    the blob (PROTOCOL.certkeys)."""

    cert: SSHOpenSSHCertificate
    serial: int
    cert_type: int
    key_id: str
    valid_after: int
    valid_before: int


# Fields between the nonce and the serial, per certified key type (PROTOCOL.certkeys).
_KEY_FIELDS: Final = MappingProxyType({
    b"ssh-ed25519-cert-v01@openssh.com": 1,
    b"ecdsa-sha2-nistp256-cert-v01@openssh.com": 2,
    b"ecdsa-sha2-nistp384-cert-v01@openssh.com": 2,
    b"ecdsa-sha2-nistp521-cert-v01@openssh.com": 2,
    b"ssh-rsa-cert-v01@openssh.com": 2,
    b"sk-ssh-ed25519-cert-v01@openssh.com": 2,
    b"sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": 3,
})
MAX_CERT_BYTES: Final = 16 * 1024


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise ValueError("truncated")
        chunk, self._pos = self._data[self._pos:end], end
        return chunk

    def uint32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def uint64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.uint32())


def _fields(key_data: bytes) -> tuple[bytes, int, int, str, int, int]:
    reader = _Reader(key_data)
    algorithm = reader.string()
    reader.string()  # nonce
    for _ in range(_KEY_FIELDS[algorithm]):
        reader.string()
    serial, cert_type = reader.uint64(), reader.uint32()
    key_id = reader.string().decode("utf-8")
    reader.string()  # principals (asyncssh decodes them)
    return algorithm, serial, cert_type, key_id, reader.uint64(), reader.uint64()


def decode_certificate(key_data: bytes) -> OpenSshCertificate | None:
    """The OpenSSH certificate in a public-key auth request, or None for anything else."""
    if len(key_data) > MAX_CERT_BYTES:
        return None
    try:
        algorithm, serial, cert_type, key_id, after, before = _fields(key_data)
        text = algorithm + b" " + base64.b64encode(key_data)
        cert = asyncssh.import_certificate(text)
    except (KeyError, ValueError, UnicodeDecodeError, asyncssh.KeyImportError):
        return None
    if not isinstance(cert, SSHOpenSSHCertificate):
        return None
    return OpenSshCertificate(cert, serial, cert_type, key_id, after, before)


def same_key(one: asyncssh.SSHKey, other: asyncssh.SSHKey) -> bool:
    return bool(one.public_data == other.public_data)


def check_certificate(
    parsed: OpenSshCertificate, *, username: str, ca: asyncssh.SSHKey, now: datetime,
) -> CertificateClaims:
    """The claims of a certificate the gateway's CA issued for ``username``; else refused.

    Checked here, by the gateway's clock: signer, certificate type, principal, validity,
    key id and extensions. asyncssh verifies the CA's signature over the certificate and the
    client's signature with the certified key afterwards.
    """
    cert = parsed.cert
    if not same_key(cert.signing_key, ca):
        raise CertificateRefused("certificate_unknown_ca")
    if parsed.cert_type != CERT_TYPE_USER:
        raise CertificateRefused("certificate_not_user")
    if list(cert.principals) != [username]:
        raise CertificateRefused("certificate_principal")
    valid_after = datetime.fromtimestamp(min(parsed.valid_after, MAX_TIME), UTC)
    valid_before = datetime.fromtimestamp(min(parsed.valid_before, MAX_TIME), UTC)
    check_validity(valid_after, valid_before, now)
    key_id = parse_key_id(parsed.key_id)
    if key_id is None or key_id.user != username:
        raise CertificateRefused("certificate_key_id")
    if set(cert.options) != {PORT_FORWARDING} or cert.options[PORT_FORWARDING] is not True:
        raise CertificateRefused("certificate_options")
    return CertificateClaims(username, key_id.device, key_id.portal_session, parsed.serial,
                             valid_after, valid_before)


def check_validity(valid_after: datetime, valid_before: datetime, now: datetime) -> None:
    """Refuse a certificate outside its validity window (by the gateway's clock)."""
    if not valid_after <= now < valid_before:
        raise CertificateRefused("certificate_expired" if now >= valid_before
                                 else "certificate_not_yet_valid")


def issued_at(claims: CertificateClaims) -> datetime:
    """When the portal signed the certificate: it backdates ``valid_after`` by `CLOCK_SKEW`."""
    return claims.valid_after + timedelta(seconds=CLOCK_SKEW)


def device_revoked(crl: CrlInfo | None, index: Index | None, device: str,
                   issued: datetime) -> bool:
    """Whether ``device`` lost its trust after a certificate ``issued`` then was made.

    True when a certificate of the device is on the CRL in force and its revocation is not
    clearly older than the SSH certificate (a superseded device certificate revoked long
    before does not condemn the device's current one), or when the CRL lists a serial of the
    device whose revocation time the index does not know. No CRL or no index: no device
    trust is configured, nothing to check (as on the HTTPS listener).
    """
    if crl is None or index is None:
        return False
    for entry in index.devices(device):
        if entry.serial not in crl.revoked:
            continue
        if entry.revoked_at is None or entry.revoked_at >= issued - REVOCATION_SLACK:
            return True
    return False


def device_owner(index: Index | None, device: str) -> str | None:
    """The user the device's newest certificate is bound to (``device_user`` for policies)."""
    if index is None:
        return None
    entries = [entry for entry in index.devices(device) if entry.revoked_at is None]
    if not entries:
        return None
    return max(entries, key=lambda entry: entry.issued_at).user


class RevokedSessions:
    """Portal session handles whose certificates are refused, until they would expire anyway.

    In memory, per node: a restart forgets them. The listener makes up for that by refusing
    every certificate issued before it started whose portal session is not live
    (`gatewayd.ssh.server`, "certificate_predates_restart"). Bounded: the oldest entries go
    first. Each entry keeps the end reason of the revocation (``reason``), so a session that
    raced the revocation ends with the same reason as its siblings.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[str, tuple[float, str]] = {}

    def revoke(self, handle: str, lifetime: float, reason: str = "logout") -> None:
        now = self._clock()
        if len(self._until) >= MAX_REVOKED:
            self._until = {h: e for h, e in self._until.items() if e[0] > now}
            while len(self._until) >= MAX_REVOKED:
                del self._until[next(iter(self._until))]
        self._until[handle] = (now + lifetime, reason)

    def reason(self, handle: str) -> str | None:
        """The end reason that revoked ``handle``, or None if it is not revoked."""
        entry = self._until.get(handle)
        return entry[1] if entry is not None and self._clock() < entry[0] else None

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, str) and self.reason(handle) is not None
