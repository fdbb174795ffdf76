"""Short-lived SSH user certificates for users signed in to the portal with MFA.

Owns what a certificate the gateway issues looks like — the contract with the SSH listener
(`gatewayd.ssh.auth` verifies exactly this shape) — and the checks before one is issued:

* **The user's key** (`parse_public_key`): one ``authorized_keys``-style line
  ``TYPE BASE64 [comment]`` and nothing else — no options, no second key, no certificate,
  no private key. Accepted: ``ssh-ed25519``, ``ecdsa-sha2-nistp256/384/521`` and ``ssh-rsa``
  of 3072 to 8192 bits (NIST SP 800-57 puts 2048-bit RSA at end of life for new keys;
  larger than 8192 adds login cost for no benefit). DSA (dropped by OpenSSH 9.8), FIDO
  ``sk-`` keys and anything else are refused, each with a `PublicKeyError` naming why.
* **The certificate** (`issue_user_certificate`): an OpenSSH user certificate signed by the
  Ed25519 key at ``ssh.user_ca_key_file`` with

  - exactly one principal, the user name;
  - key id ``"<user> <device id or -> <portal session handle>"`` (three fields, single
    spaces; `key_id` refuses values that would make it ambiguous), so the SSH listener
    knows the device the portal login verified (``device: registered`` rules work for
    tunnels) and the audit trail links the SSH session to the portal session;
  - the extension ``permit-port-forwarding`` only (no pty, no agent or X11 forwarding, no
    user rc) and no critical options. No ``source-address``: the browser and the SSH
    client of one PC often leave by different addresses (IPv6 for the browser and IPv4 for
    ssh on a dual-stack line, carrier-grade NAT pools on mobile lines), so binding would
    refuse good logins, while the certificate is already short-lived and every tunnel is
    judged by the policy against the SSH connection's own source address;
  - valid from 60 s ago (`CLOCK_SKEW`: a client clock slightly behind; the SSH listener
    reads the issue time back as ``valid_after + CLOCK_SKEW`` and takes ``valid_after`` as
    the MFA time of a certificate whose portal session is gone) until the portal session's
    absolute end at the latest (``session.created + sessions.absolute_timeout``): logging
    in to the portal never buys SSH access beyond the session it was issued from;
  - a random 64-bit serial, for the audit record and the SSH server's log.

Reading the CA key and signing are blocking (a file read) and run in a thread. Measured on
the development machine: checking a pasted key 8 µs (RSA-3072: 13 µs), reading the CA key
and signing 78 µs (the Ed25519 signature alone about 35 µs), 181 µs through
``asyncio.to_thread``: the thread is for the disk, not for the maths.

* **Who may have one** (`allowed_tunnels`): only a user whose policy allows at least one
  TCP service destination now — the same `decide()` the SSH listener makes per tunnel, for
  this user, device, source address, time and MFA age.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import secrets
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncssh
from cryptography.hazmat.primitives.asymmetric import rsa

from gatewayd.files import exposure
from gatewayd.policy import AccessRequest, Policy
from gatewayd.ssh.destinations import AllowedTunnel, allowed_destinations

if TYPE_CHECKING:

    from gatewayd.identity.principal import Principal

# Key types a user may bring. RSA keys are checked for size after decoding.
ALLOWED_KEY_TYPES: Final = frozenset({
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "ssh-rsa",
})
MIN_RSA_BITS: Final = 3072
MAX_RSA_BITS: Final = 8192
MAX_KEY_LINE: Final = 16 * 1024
CLOCK_SKEW: Final = 60  # seconds a certificate is valid before "now" (client clocks lag)
MIN_LIFETIME: Final = 60  # seconds: a session about to expire gets no certificate
EXTENSIONS: Final = ("permit-port-forwarding",)
_TOKEN: Final = re.compile(r"[!-~]+")  # printable ASCII without space: one key-id field
_CERT_SUFFIX: Final = "-cert-v01@openssh.com"


class PublicKeyError(ValueError):
    """The pasted text is not a public key the gateway signs; the message says why."""


class CaKeyError(Exception):
    """The SSH user CA key cannot be used (missing, unreadable, exposed, not a key)."""


@dataclass(frozen=True, slots=True)
class UserKey:
    """A checked public key: the asyncssh key, its algorithm and SHA256 fingerprint."""

    key: asyncssh.SSHKey
    algorithm: str
    fingerprint: str  # "SHA256:…", as ssh-keygen -l prints it


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A signed certificate and the facts the audit record and the page show."""

    line: str  # "ssh-ed25519-cert-v01@openssh.com AAAA… comment", no newline
    serial: int
    key_id: str
    principal: str
    valid_after: int  # Unix seconds
    valid_before: int
    key_fingerprint: str  # of the user's key (SHA256:…)
    ca_fingerprint: str

    @property
    def valid_before_text(self) -> str:
        return datetime.fromtimestamp(self.valid_before, UTC).isoformat().replace("+00:00", "Z")


# --- the user's public key -------------------------------------------------------------------


def parse_public_key(text: str) -> UserKey:
    """Check one pasted public-key line (see the module docstring); raise PublicKeyError."""
    if len(text) > MAX_KEY_LINE:
        raise PublicKeyError("The public key is too long.")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise PublicKeyError("No public key was given. Paste the one line of your .pub file.")
    if any("PRIVATE KEY" in line for line in lines):
        raise PublicKeyError("This is a PRIVATE key: never paste it anywhere. Generate a new "
                             "key pair and paste the one line of the .pub file.")
    if len(lines) > 1:
        raise PublicKeyError("Paste exactly one public key (one line of your .pub file).")
    fields = lines[0].split(None, 2)
    algorithm = fields[0]
    _check_algorithm(algorithm)
    if len(fields) < 2:
        raise PublicKeyError(f"The {algorithm} key has no key data after its type.")
    blob = _decode_blob(fields[1])
    if _blob_algorithm(blob) != algorithm:
        raise PublicKeyError("The key data does not match the key type in front of it.")
    try:
        key = asyncssh.import_public_key(f"{algorithm} {fields[1]}")
    except (asyncssh.KeyImportError, ValueError):
        raise PublicKeyError(f"The {algorithm} key data is damaged.") from None
    if key.get_algorithm() != algorithm or key.public_data != blob:
        raise PublicKeyError("The key data does not match the key type in front of it.")
    _check_size(key)
    return UserKey(key, algorithm, key.get_fingerprint("sha256"))


def _check_algorithm(algorithm: str) -> None:
    if algorithm in ALLOWED_KEY_TYPES:
        return
    if algorithm.endswith(_CERT_SUFFIX):
        raise PublicKeyError("This is a certificate, not a public key. Paste the public key "
                             "(the .pub file without -cert in its name).")
    if algorithm == "ssh-dss":
        raise PublicKeyError("DSA keys are not accepted (they are insecure and OpenSSH dropped "
                             "them). Generate an Ed25519 key: ssh-keygen -t ed25519")
    if algorithm.startswith("sk-"):
        raise PublicKeyError("Security-key (FIDO) keys are not accepted here. Use an Ed25519 "
                             "key: ssh-keygen -t ed25519")
    if _TOKEN.fullmatch(algorithm) and len(algorithm) <= 64 and "-" in algorithm:
        raise PublicKeyError(f"Key type {algorithm} is not accepted. Use Ed25519 "
                             "(ssh-keygen -t ed25519), ECDSA, or RSA of 3072 bits or more.")
    raise PublicKeyError("This is not an OpenSSH public key. Paste the one line of your .pub "
                         "file; it starts with ssh-ed25519, ecdsa-sha2- or ssh-rsa.")


def _decode_blob(data: str) -> bytes:
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise PublicKeyError("The key data is not valid base64 (was the line cut or "
                             "changed?).") from None


def _blob_algorithm(blob: bytes) -> str | None:
    """The type name the SSH wire format puts first in the key data."""
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > 64 or len(blob) < 4 + length:
        return None
    try:
        return blob[4:4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None


def _check_size(key: asyncssh.SSHKey) -> None:
    public = key.pyca_key
    if isinstance(public, rsa.RSAPublicKey):
        bits = public.key_size
        if bits < MIN_RSA_BITS:
            raise PublicKeyError(f"This RSA key has {bits} bits; at least {MIN_RSA_BITS} are "
                                 "needed. Better: an Ed25519 key (ssh-keygen -t ed25519).")
        if bits > MAX_RSA_BITS:
            raise PublicKeyError(f"This RSA key has {bits} bits; at most {MAX_RSA_BITS} are "
                                 "accepted. Better: an Ed25519 key (ssh-keygen -t ed25519).")


# --- the certificate -------------------------------------------------------------------------


def key_id(user: str, device: str | None, session_handle: str) -> str:
    """``"<user> <device or -> <session handle>"``; ValueError if a field has a space."""
    fields = (user, device or "-", session_handle)
    for value in fields:
        if not _TOKEN.fullmatch(value):
            raise ValueError(f"{value!r} cannot be a field of an SSH certificate key id")
    return " ".join(fields)


def load_ca_key(path: Path) -> asyncssh.SSHKey:
    """The SSH user CA's private key (blocking). Raises CaKeyError."""
    try:
        problem = exposure(path, "the SSH user CA key")
        if problem is not None:
            raise CaKeyError(problem)
        data = path.read_bytes()
    except OSError as exc:
        raise CaKeyError(f"cannot read the SSH user CA key {path}: {exc.strerror}") from None
    try:
        return asyncssh.import_private_key(data)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise CaKeyError(f"the SSH user CA key {path} cannot be used: {exc}") from None


def issue_user_certificate(
    ca_key_file: Path, user_key: UserKey, *, user: str, device: str | None,
    session_handle: str, now: float, lifetime_left: float,
) -> IssuedCertificate:
    """Sign ``user_key`` for ``user`` (blocking: reads the CA key; run it in a thread).

    ``now`` is wall-clock Unix seconds; ``lifetime_left`` the seconds until the portal
    session's absolute end. Raises ValueError when the session is (nearly) over or a key-id
    field is unusable, CaKeyError when the CA key is.
    """
    if lifetime_left < MIN_LIFETIME:
        raise ValueError("the session ends too soon for a certificate")
    identity = key_id(user, device, session_handle)
    ca = load_ca_key(ca_key_file)
    serial = secrets.randbits(64)
    valid_after = int(now) - CLOCK_SKEW
    valid_before = int(now + lifetime_left)  # rounded down: never past the session's end
    certificate = ca.generate_user_certificate(
        user_key.key, identity, serial=serial, principals=[user],
        valid_after=valid_after, valid_before=valid_before,
        permit_x11_forwarding=False, permit_agent_forwarding=False,
        permit_port_forwarding=True, permit_pty=False, permit_user_rc=False,
        comment=f"{user}@gatewayd",
    )
    line = certificate.export_certificate("openssh").decode("ascii").strip()
    return IssuedCertificate(
        line=line, serial=serial, key_id=identity, principal=user,
        valid_after=valid_after, valid_before=valid_before,
        key_fingerprint=user_key.fingerprint, ca_fingerprint=ca.get_fingerprint("sha256"),
    )


# --- who may have one ------------------------------------------------------------------------


def allowed_tunnels(
    policy: Policy, *, principal: Principal, device: str | None, device_user: str | None,
    source: ipaddress.IPv4Address | ipaddress.IPv6Address, now: datetime, mfa_age: float,
) -> list[AllowedTunnel]:
    """Every TCP destination `decide()` allows this user now (see `allowed_destinations`)."""
    return allowed_destinations(policy, AccessRequest(
        user=principal.user, groups=principal.groups, attributes=principal.attributes,
        device=device, device_user=device_user, frontend="ssh", service="", source=source,
        now=now, mfa_age=mfa_age,
    ))
