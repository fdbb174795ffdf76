"""Certificate tooling: the device CA, the server CA and TLS server certificates, device
certificates bound to a user, the device revocation list, SSH keys, and the files an
administrator hands out.

This module owns the X.509 profile of every certificate gatewayd issues, the encoding of a
device's identity inside its certificate, and the on-disk formats. It is a library: the demo
uses it, `gatewayd.ca` (the CA directory behind ``gatewayd certs …``) and the HTTPS listener's
CRL loading build on it. Functions that touch files are synchronous; async callers run them
with ``asyncio.to_thread``.

Two separate CAs, on purpose
    The **device CA** signs only device (TLS client) certificates; its certificate is what
    ``https.client_ca_file`` points at. The **server CA** signs only the gateway's TLS server
    certificate and is what staff PCs trust in their browser. Keeping them apart means a
    device certificate can never be used as a server certificate and vice versa, and trusting
    the server CA on a PC does not make every device certificate a trusted server. Each CA
    carries an ``extendedKeyUsage`` limiting what it may certify (clientAuth resp. serverAuth,
    honoured by Windows and OpenSSL), and a server CA can carry name constraints (``permitted``)
    so that, installed in 50 browsers, it cannot vouch for any other web site even if its key
    leaks.

Device identity encoding (read back by ``device_identity_from_cert``)
    * **device id** = the subject ``commonName``; the subject ``serialNumber`` attribute
      (2.5.4.5, "serial number of the device") repeats it. Device ids are host-name-like:
      1-64 ASCII letters, digits, ``.`` and ``-``, starting with a letter or digit (so they fit
      PrintableString and never need escaping in logs). Compared case-sensitively.
    * **bound user** = exactly one ``subjectAltName`` URI ``gatewayd:user:<user>``, where
      ``<user>`` is the directory's canonical user name, UTF-8, percent-encoded with every
      byte outside ``A-Z a-z 0-9 - . _ ~`` written as ``%XX`` (upper-case hex). Only this
      canonical spelling is accepted on read, so one user has exactly one encoding
      (``%61lice`` is refused, not read as ``alice``). A device certificate without such a URI
      is an unbound (shared) device: ``user`` is ``None``. Two such URIs are refused.
    * a device certificate has ``extendedKeyUsage = clientAuth`` and ``basicConstraints CA:FALSE``;
      anything else is refused by ``device_identity_from_cert``.

Files (PEM is the usual ``-----BEGIN …-----`` text)
    * ``<stem>.crt`` — certificate, PEM, mode ``0644``;
    * ``<stem>.key`` — private key, PKCS#8 PEM (encrypted with ``BestAvailableEncryption`` when a
      passphrase is given), mode ``0600`` from creation (no window where it is readable),
      written atomically (temporary file, ``fsync``, link/rename, ``fsync`` of the directory);
    * ``<device>.p12`` — PKCS#12 with the device key and certificate (not the CA: importing a
      self-signed CA from a .p12 would make Windows offer to trust it as a root), friendly name
      ``"<device> (<user>)"``, encrypted with PBES2 (PBKDF2-HMAC-SHA256, AES-256-CBC) and an
      HMAC-SHA256 MAC: what Windows 10 1709+/11, macOS and Firefox import. ``legacy_p12=True``
      writes 3DES/SHA-1 instead, only for old systems that cannot read the modern form.
      Mode ``0600``.

Revocation list (``new_crl`` / ``read_crl``)
    An X.509 v2 CRL signed by the device CA, PEM, with a ``cRLNumber`` that grows by one per
    list, an ``authorityKeyIdentifier``, ``thisUpdate``/``nextUpdate`` (default one year), and
    one entry per revoked serial with its revocation date and, unless "unspecified", a
    ``reasonCode`` (RFC 5280 5.3.1 asks to leave that one out). ``thisUpdate`` of each new list
    is strictly later, in whole seconds, than the previous one's: OpenSSL keeps every CRL a
    running listener has loaded and uses the one with the latest ``thisUpdate``.

SSH keys (``new_ssh_key``): Ed25519, private key in OpenSSH's own format (what ``sshd`` and
``ssh-keygen -s`` read), public key as one ``authorized_keys``-style line.

All X.509 keys generated here are ECDSA P-256, signed with SHA-256. A CA brought from elsewhere
(for example Active Directory Certificate Services) may have an RSA key; ``load_ca`` accepts it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import secrets
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final
from urllib.parse import quote, unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gatewayd.files import atomic_write

DEVICE_USER_URI_PREFIX: Final = "gatewayd:user:"

DEFAULT_CA_LIFETIME: Final = timedelta(days=3650)
# Mozilla's "intermediate" TLS profile (which the HTTPS listener is graded against) allows at
# most 366 days; browsers accept 397 and Apple refuses more than 825. 365 satisfies all three.
DEFAULT_SERVER_LIFETIME: Final = timedelta(days=365)
# A telework PC is re-issued with the yearly inventory; two years leaves a margin.
DEFAULT_DEVICE_LIFETIME: Final = timedelta(days=730)
# PCs with a slightly slow clock must accept a certificate issued "just now".
BACKDATE: Final = timedelta(minutes=5)

MIN_P12_PASSWORD_LENGTH: Final = 8
MAX_USER_LENGTH: Final = 256

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
_DNS_NAME = re.compile(
    r"(?:\*\.)?(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)
_CANONICAL_USER_PART = re.compile(r"(?:[A-Za-z0-9_.~-]|%[0-9A-F]{2})+")
# No 0/O, 1/l/I: the password is read off a screen and typed on the PC being set up.
_P12_PASSWORD_ALPHABET: Final = "".join(
    c for c in string.ascii_letters + string.digits if c not in "0O1lI"
)

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CertError(Exception):
    """A certificate, key or name is unusable; the message says which and why."""


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What a verified device certificate says: its device id and the user it is bound to.

    ``serial`` is the certificate's serial number: sessions record it so that revoking one
    superseded certificate of a PC ends only the sessions made with that certificate. It is
    not part of equality: two certificates of one PC for one user are the same identity.
    """

    device_id: str
    user: str | None
    serial: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class CertAndKey:
    """A certificate with its private key (a CA, a server or a device)."""

    cert: x509.Certificate
    key: CaPrivateKey


@dataclass(frozen=True, slots=True)
class PemFiles:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class DeviceFiles:
    cert: Path
    key: Path
    p12: Path
    p12_password: str


# --- names --------------------------------------------------------------------------------


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it follows the device id grammar, else raise CertError."""
    if _DEVICE_ID.fullmatch(device_id) is None:
        raise CertError(
            f"device id {device_id!r}: expected 1-64 letters, digits, '.' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def check_user_name(user: str) -> str:
    """Return ``user`` if it can be bound to a device, else raise CertError."""
    if not user or len(user) > MAX_USER_LENGTH:
        raise CertError(f"user name must have 1-{MAX_USER_LENGTH} characters")
    if user != user.strip() or any(not ch.isprintable() for ch in user):
        raise CertError(f"user name {user!r}: no control characters or surrounding spaces")
    return user


def user_to_uri(user: str) -> str:
    """The SAN URI that binds a device certificate to ``user`` (see module docstring)."""
    return DEVICE_USER_URI_PREFIX + quote(check_user_name(user), safe="", encoding="utf-8")


def user_from_uri(uri: str) -> str | None:
    """The user of a ``gatewayd:user:`` URI; None for other URIs; CertError if malformed."""
    if uri[: len(DEVICE_USER_URI_PREFIX)].lower() != DEVICE_USER_URI_PREFIX:
        return None
    if not uri.startswith(DEVICE_USER_URI_PREFIX):  # URI schemes are case-insensitive
        raise CertError(f"device user URI {uri!r} must be spelled {DEVICE_USER_URI_PREFIX!r}")
    encoded = uri[len(DEVICE_USER_URI_PREFIX):]
    if _CANONICAL_USER_PART.fullmatch(encoded) is None:
        raise CertError(f"device user URI {uri!r} is not canonically percent-encoded")
    try:
        user = unquote(encoded, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise CertError(f"device user URI {uri!r} is not UTF-8") from None
    # One user, one spelling: a URI that encodes characters it need not is refused.
    if user_to_uri(user) != uri:
        raise CertError(f"device user URI {uri!r} is not canonically percent-encoded")
    return user


def parse_subject_alt_name(name: str) -> x509.GeneralName:
    """``"127.0.0.1"``/``"::1"`` → IPAddress, ``"gw.ward.local"`` → DNSName (lower-cased)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    dns = name.lower().rstrip(".")
    if len(dns) > 253 or _DNS_NAME.fullmatch(dns) is None:
        raise CertError(f"{name!r} is neither an IP address nor an ASCII DNS name")
    return x509.DNSName(dns)


def _parse_permitted(entry: str) -> x509.GeneralName:
    """A name-constraint subtree: an IP network (``"127.0.0.0/8"``) or a DNS suffix."""
    if "/" in entry:
        try:
            return x509.IPAddress(ipaddress.ip_network(entry))
        except ValueError:
            raise CertError(f"{entry!r} is not an IP network") from None
    general = parse_subject_alt_name(entry)
    if not isinstance(general, x509.DNSName) or general.value.startswith("*."):
        raise CertError(f"{entry!r}: permitted names are DNS suffixes or IP networks (a.b.c.d/n)")
    return general


# --- issuing ------------------------------------------------------------------------------


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now.astimezone(UTC)


def _new_leaf_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())




def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _subject(
    common_name: str, organization: str | None, *extra: x509.NameAttribute[str]
) -> x509.Name:
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    attributes.extend(extra)
    return x509.Name(attributes)


def new_ca(
    common_name: str,
    *,
    purpose: x509.ObjectIdentifier,
    organization: str | None = None,
    permitted: Sequence[str] = (),
    valid_for: timedelta = DEFAULT_CA_LIFETIME,
    now: datetime | None = None,
) -> CertAndKey:
    """A self-signed CA (P-256) that may only certify ``purpose`` (an EKU OID).

    ``purpose`` is ``ExtendedKeyUsageOID.CLIENT_AUTH`` for the device CA and ``SERVER_AUTH``
    for the server CA. ``permitted`` (server CA) lists DNS suffixes and IP networks the CA may
    vouch for; when given, every IP address outside the listed networks is excluded too.
    ``pathLenConstraint = 0``: these CAs sign leaves only, never another CA.
    """
    start = _now(now)
    key = _new_leaf_key()
    name = _subject(common_name, organization)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
    )
    if permitted:
        builder = builder.add_extension(_name_constraints(permitted), critical=True)
    return CertAndKey(builder.sign(key, hashes.SHA256()), key)


def new_device_ca(
    organization: str | None = None, *, valid_for: timedelta = DEFAULT_CA_LIFETIME,
    now: datetime | None = None,
) -> CertAndKey:
    """The CA that signs device certificates (``https.client_ca_file``)."""
    return new_ca("gatewayd device CA", purpose=ExtendedKeyUsageOID.CLIENT_AUTH,
                  organization=organization, valid_for=valid_for, now=now)


def new_server_ca(
    permitted: Sequence[str] = (), organization: str | None = None, *,
    valid_for: timedelta = DEFAULT_CA_LIFETIME, now: datetime | None = None,
) -> CertAndKey:
    """The CA that signs the gateway's TLS server certificate (trusted by staff browsers)."""
    return new_ca("gatewayd server CA", purpose=ExtendedKeyUsageOID.SERVER_AUTH,
                  organization=organization, permitted=permitted, valid_for=valid_for, now=now)


def _name_constraints(permitted: Sequence[str]) -> x509.NameConstraints:
    subtrees = [_parse_permitted(entry) for entry in permitted]
    has_ip = any(isinstance(tree, x509.IPAddress) for tree in subtrees)
    # RFC 5280 constrains only the name types listed: without an exclusion, a CA permitted
    # "ward.local" could still vouch for any IP address.
    excluded: list[x509.GeneralName] | None = None
    if not has_ip:
        excluded = [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                    x509.IPAddress(ipaddress.ip_network("::/0"))]
    return x509.NameConstraints(permitted_subtrees=subtrees, excluded_subtrees=excluded)


def _check_within_constraints(ca_cert: x509.Certificate, names: Sequence[x509.GeneralName]) -> None:
    """Refuse at issue time what every client would refuse at connect time."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    permitted = list(constraints.permitted_subtrees or [])
    excluded = list(constraints.excluded_subtrees or [])
    for name in names:
        if any(_in_subtree(name, tree) for tree in excluded) or (
            any(type(tree) is type(name) for tree in permitted)
            and not any(_in_subtree(name, tree) for tree in permitted)
        ):
            raise CertError(f"{name.value} is outside the name constraints of the issuing CA")


def _in_subtree(name: x509.GeneralName, tree: x509.GeneralName) -> bool:
    if isinstance(name, x509.DNSName) and isinstance(tree, x509.DNSName):
        value, suffix = name.value.lower(), tree.value.lower().lstrip(".")
        return value == suffix or value.endswith("." + suffix)
    if isinstance(name, x509.IPAddress) and isinstance(tree, x509.IPAddress):
        network = tree.value
        return (isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)
                and name.value in network)
    return False


def _leaf_builder(
    ca: CertAndKey, subject: x509.Name, public: ec.EllipticCurvePublicKey,
    valid_for: timedelta, now: datetime | None,
) -> x509.CertificateBuilder:
    start = _now(now)
    # A leaf outliving its CA fails validation on some clients; end with the CA instead.
    end = min(start + valid_for, ca.cert.not_valid_after_utc)
    if end <= start:
        raise CertError("the issuing CA has expired")
    ca_public = ca.cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertError("the CA key must be ECDSA or RSA")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
                       critical=False)
    )


def issue_server_cert(
    ca: CertAndKey, names: Sequence[str], *, organization: str | None = None,
    valid_for: timedelta = DEFAULT_SERVER_LIFETIME, now: datetime | None = None,
) -> CertAndKey:
    """A TLS server certificate for ``names`` (DNS names and/or IP addresses, first = CN)."""
    if not names:
        raise CertError("a server certificate needs at least one DNS name or IP address")
    general = [parse_subject_alt_name(name) for name in names]
    _check_within_constraints(ca.cert, general)
    key = _new_leaf_key()
    cn = str(general[0].value)
    builder = (
        _leaf_builder(ca, _subject(cn, organization), key.public_key(), valid_for, now)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
    )
    return CertAndKey(builder.sign(ca.key, hashes.SHA256()), key)


def issue_device_cert(
    ca: CertAndKey, device_id: str, user: str | None, *, organization: str | None = None,
    valid_for: timedelta = DEFAULT_DEVICE_LIFETIME, now: datetime | None = None,
) -> CertAndKey:
    """A device (TLS client) certificate for ``device_id``, bound to ``user`` (None = shared)."""
    check_device_id(device_id)
    key = _new_leaf_key()
    subject = _subject(device_id, organization,
                       x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id))
    builder = _leaf_builder(ca, subject, key.public_key(), valid_for, now).add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    if user is not None:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(user_to_uri(user))])
        builder = builder.add_extension(san, critical=False)
    return CertAndKey(builder.sign(ca.key, hashes.SHA256()), key)


# --- reading back -------------------------------------------------------------------------


def device_identity_from_cert(cert: x509.Certificate) -> DeviceIdentity:
    """Read (device id, bound user) from a device certificate whose chain was already verified.

    Raises CertError when the certificate is not a well-formed gatewayd device certificate
    (no clientAuth, a CA, no or several common names, a serialNumber that differs from the
    common name, several or malformed ``gatewayd:user:`` URIs).
    """
    _require_client_leaf(cert)
    device_id = _single_common_name(cert)
    for attribute in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        if attribute.value != device_id:
            raise CertError("subject serialNumber differs from the device id (commonName)")
    users = [user for uri in _san_uris(cert) if (user := user_from_uri(uri)) is not None]
    if len(users) > 1:
        raise CertError("device certificate binds more than one user")
    return DeviceIdentity(device_id, users[0] if users else None, cert.serial_number)


def device_identity_from_der(der: bytes) -> DeviceIdentity:
    """``device_identity_from_cert`` for ``SSLObject.getpeercert(binary_form=True)``."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise CertError(f"not a DER certificate: {exc}") from None
    return device_identity_from_cert(cert)


def _require_client_leaf(cert: x509.Certificate) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertError("not a device certificate: no extendedKeyUsage clientAuth") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertError("not a device certificate: no extendedKeyUsage clientAuth")
    with contextlib.suppress(x509.ExtensionNotFound):
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertError("not a device certificate: it is a CA certificate")


def _single_common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise CertError("device certificate must have exactly one subject commonName")
    return check_device_id(names[0].value)


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def verify_device_cert(
    cert: x509.Certificate, ca_certs: Iterable[x509.Certificate], *, now: datetime | None = None
) -> DeviceIdentity:
    """Verify ``cert`` against the device CA(s) (chain, validity, clientAuth) and read it.

    The TLS frontend lets OpenSSL verify the chain during the handshake; this is for tools and
    tests that hold a certificate outside a handshake (e.g. ``gatewayd certs verify``).

    The Web PKI client profile requires a ``subjectAltName`` on the leaf; a shared device's
    certificate has none (no bound user), and OpenSSL accepts it in the handshake, so here the
    extension is allowed to be absent too. Everything else stays the Web PKI default.
    """
    leaf_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    verifier = (
        PolicyBuilder().store(Store(list(ca_certs))).time(_now(now))
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=leaf_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise CertError(f"device certificate does not verify: {exc}") from None
    return device_identity_from_cert(cert)


# --- serialising --------------------------------------------------------------------------


def generate_p12_password(length: int = 16) -> str:
    """A random password for a .p12, from an alphabet without look-alike characters."""
    return "".join(secrets.choice(_P12_PASSWORD_ALPHABET) for _ in range(length))


def pkcs12_bytes(
    item: CertAndKey, password: str, *, friendly_name: str, legacy: bool = False
) -> bytes:
    """The PKCS#12 bundle of ``item`` (key + certificate only; see module docstring)."""
    if len(password) < MIN_P12_PASSWORD_LENGTH:
        raise CertError(f"the .p12 password needs at least {MIN_P12_PASSWORD_LENGTH} characters")
    pbes, mac = (
        (pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC, hashes.SHA1())  # noqa: S303 - opt-in legacy
        if legacy else (pkcs12.PBES.PBESv2SHA256AndAES256CBC, hashes.SHA256())
    )
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(600_000 if not legacy else 50_000)  # legacy PBKDF is slow on old systems
        .key_cert_algorithm(pbes)
        .hmac_hash(mac)
        .build(password.encode("utf-8"))
    )
    return pkcs12.serialize_key_and_certificates(
        friendly_name.encode("utf-8"), item.key, item.cert, None, encryption
    )


def private_key_pem(key: CaPrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def certificates_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


# --- files --------------------------------------------------------------------------------


def write_private_key(
    path: Path, key: CaPrivateKey, *, passphrase: bytes | None = None, overwrite: bool = False
) -> None:
    atomic_write(path, private_key_pem(key, passphrase), mode=0o600, overwrite=overwrite)


def write_certificates(
    path: Path, certs: Sequence[x509.Certificate], *, overwrite: bool = True
) -> None:
    atomic_write(path, certificates_pem(certs), mode=0o644, overwrite=overwrite)


def save_pair(
    item: CertAndKey, directory: Path, stem: str, *, passphrase: bytes | None = None,
    overwrite: bool = False,
) -> PemFiles:
    """Write ``<stem>.key`` (0600) then ``<stem>.crt`` (0644) into ``directory``."""
    files = PemFiles(cert=directory / f"{stem}.crt", key=directory / f"{stem}.key")
    # Key first: a certificate without its key is useless, a key without its certificate can
    # be re-certified.
    write_private_key(files.key, item.key, passphrase=passphrase, overwrite=overwrite)
    write_certificates(files.cert, [item.cert], overwrite=overwrite)
    return files


def save_device(
    item: CertAndKey, directory: Path, *, p12_password: str | None = None,
    legacy_p12: bool = False, overwrite: bool = False,
) -> DeviceFiles:
    """Write ``<device>.key``, ``<device>.crt`` and ``<device>.p12``; return paths + password.

    Without ``p12_password`` a random one is generated (see ``generate_p12_password``); give
    it to the person setting up the PC separately from the file.
    """
    identity = device_identity_from_cert(item.cert)
    password = p12_password if p12_password is not None else generate_p12_password()
    friendly = f"{identity.device_id} ({identity.user or 'shared'})"
    bundle = pkcs12_bytes(item, password, friendly_name=friendly, legacy=legacy_p12)
    pair = save_pair(item, directory, identity.device_id, overwrite=overwrite)
    p12 = directory / f"{identity.device_id}.p12"
    atomic_write(p12, bundle, mode=0o600, overwrite=overwrite)
    return DeviceFiles(cert=pair.cert, key=pair.key, p12=p12, p12_password=password)


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    certs = load_certificates(path)
    return certs[0]


def load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise CertError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:
        raise CertError(f"{path}: not a PEM certificate file") from None
    return certs


def load_ca(cert_path: Path, key_path: Path, *, passphrase: bytes | None = None) -> CertAndKey:
    """Load a CA written by ``save_pair`` (or brought from elsewhere: ECDSA or RSA)."""
    cert = load_certificate(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), passphrase)
    except OSError as exc:
        raise CertError(f"{key_path}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise CertError(f"{key_path}: cannot load the private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertError(f"{key_path}: the CA key must be ECDSA or RSA")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CertError(f"{key_path} is not the key of {cert_path}")
    if not _is_ca(cert):
        raise CertError(f"{cert_path} is not a CA certificate")
    return CertAndKey(cert, key)


def _spki(public: object) -> bytes:
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return b""
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


# --- a self-signed server certificate -----------------------------------------------------


def self_signed_server_cert(
    names: Sequence[str], *, organization: str | None = None,
    valid_for: timedelta = DEFAULT_SERVER_LIFETIME, now: datetime | None = None,
) -> CertAndKey:
    """A self-signed TLS server certificate for ``names``, for sites without a server CA.

    It is not a CA (``CA:FALSE``, no ``keyCertSign``): a PC told to trust it trusts these
    names on this one key and nothing else, so it needs no name constraints.
    """
    if not names:
        raise CertError("a server certificate needs at least one DNS name or IP address")
    general = [parse_subject_alt_name(name) for name in names]
    key = _new_leaf_key()
    public = key.public_key()
    start = _now(now)
    subject = _subject(str(general[0].value), organization)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return CertAndKey(builder.sign(key, hashes.SHA256()), key)


def serial_hex(serial: int) -> str:
    """How serial numbers are written everywhere in gatewayd: lower-case hex, no separators."""
    return f"{serial:x}"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex (what Windows and browsers can show)."""
    return cert.fingerprint(hashes.SHA256()).hex()


# --- revocation lists ---------------------------------------------------------------------

# The RFC 5280 reasons an administrator picks from (certificateHold is left out on purpose:
# a "suspended" device certificate that can be un-revoked is not something to offer here).
REVOCATION_REASONS: Final[Mapping[str, x509.ReasonFlags | None]] = MappingProxyType({
    "unspecified": None,  # RFC 5280 5.3.1: omit reasonCode rather than write "unspecified"
    "key-compromise": x509.ReasonFlags.key_compromise,  # stolen or lost PC, leaked .p12
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,  # the person left or moved
    "superseded": x509.ReasonFlags.superseded,  # replaced by a renewed certificate
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,  # PC retired
})
_REASON_WORDS: Final[Mapping[x509.ReasonFlags, str]] = MappingProxyType(
    {flag: word for word, flag in REVOCATION_REASONS.items() if flag is not None}
)
# A list must not lapse while nobody is looking: OpenSSL refuses every device once nextUpdate
# has passed. Every revocation re-signs the list; `gatewayd certs crl --renew` (monthly timer)
# keeps it fresh when nothing is revoked for a long time, and the gateway warns 30 days ahead.
DEFAULT_CRL_LIFETIME: Final = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class Revocation:
    """One entry of a revocation list: which serial, since when, and why."""

    serial: int
    revoked_at: datetime
    reason: str  # a key of REVOCATION_REASONS


@dataclass(frozen=True, slots=True)
class CrlInfo:
    """What a verified revocation list says."""

    number: int
    this_update: datetime
    next_update: datetime | None
    revoked: Mapping[int, str]  # serial -> reason word (REVOCATION_REASONS key or OpenSSL's)


def next_crl_time(previous: datetime | None, now: datetime | None = None) -> datetime:
    """``thisUpdate`` for a new list: backdated like certificates, after ``previous``.

    Whole seconds, and at least one second after the previous list's ``thisUpdate`` (see the
    module docstring). Signing many lists within ``BACKDATE`` can make this a moment in the
    future; the caller must wait until then before publishing, or the list is "not yet valid".
    """
    start = _now(now).replace(microsecond=0) - BACKDATE
    if previous is not None:
        start = max(start, previous.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1))
    return start


def new_crl(
    ca: CertAndKey, revocations: Iterable[Revocation], *, number: int, this_update: datetime,
    valid_for: timedelta = DEFAULT_CRL_LIFETIME,
) -> x509.CertificateRevocationList:
    """A CRL of ``ca`` listing ``revocations`` (see the module docstring for its profile)."""
    if number < 0:
        raise CertError("the CRL number must not be negative")
    ca_public = ca.cert.public_key()
    if not isinstance(ca_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertError("the CA key must be ECDSA or RSA")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(this_update)
        .next_update(this_update + valid_for)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
                       critical=False)
    )
    for item in sorted(revocations, key=lambda r: r.serial):
        if item.reason not in REVOCATION_REASONS:
            raise CertError(f"unknown revocation reason {item.reason!r}")
        entry = (x509.RevokedCertificateBuilder().serial_number(item.serial)
                 .revocation_date(item.revoked_at.astimezone(UTC).replace(microsecond=0)))
        flag = REVOCATION_REASONS[item.reason]
        if flag is not None:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def read_crl(data: bytes, ca_certs: Iterable[x509.Certificate], *, source: str) -> CrlInfo:
    """Parse a PEM or DER CRL and check that one of ``ca_certs`` issued and signed it.

    A list from another CA, or with a bad signature, raises CertError: loaded into OpenSSL it
    would either be ignored or make every handshake fail.
    """
    try:
        crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
               else x509.load_der_x509_crl(data))
    except ValueError:
        raise CertError(f"{source}: not a certificate revocation list") from None
    signed = False
    for ca_cert in ca_certs:
        public = ca_cert.public_key()
        if (ca_cert.subject == crl.issuer
                and isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
                and crl.is_signature_valid(public)):
            signed = True
            break
    if not signed:
        raise CertError(f"{source}: not issued and signed by the device CA")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    revoked = {entry.serial_number: _reason_word(entry) for entry in crl}
    return CrlInfo(number, crl.last_update_utc, crl.next_update_utc,
                   MappingProxyType(revoked))


def _reason_word(entry: x509.RevokedCertificate) -> str:
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return "unspecified"
    return _REASON_WORDS.get(flag, flag.value)


# --- SSH keys -----------------------------------------------------------------------------


def new_ssh_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def ssh_private_key(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The key in OpenSSH's private key format (``-----BEGIN OPENSSH PRIVATE KEY-----``)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def ssh_public_key(key: ed25519.Ed25519PrivateKey, comment: str) -> bytes:
    """``ssh-ed25519 AAAA… comment`` plus a newline, as in ``*.pub`` and ``authorized_keys``."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    return line + b" " + comment.encode("utf-8") + b"\n"


# --- the demo's certificates --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoPki:
    """Paths of the demo's certificates (all under one directory)."""

    server_ca: PemFiles
    device_ca: PemFiles
    server: PemFiles
    device: DeviceFiles


DEMO_SERVER_NAMES: Final = ("localhost", "127.0.0.1", "::1")
DEMO_SERVER_PERMITTED: Final = ("localhost", "127.0.0.0/8", "::1/128")


def ensure_demo_pki(
    directory: Path, *, device_id: str, user: str, p12_password: str,
    server_names: Sequence[str] = DEMO_SERVER_NAMES, now: datetime | None = None,
) -> DemoPki:
    """Create the demo's CAs and certificates in ``directory``, keeping CAs that exist.

    The CAs survive restarts so a browser that was told to trust the demo server CA, or that
    imported the demo device .p12, keeps working. The server certificate is re-issued at
    every call (names or ports may change). The server CA is constrained to loopback names:
    trusting it cannot expose a browser to anything but this machine. The device certificate
    is issued when missing.
    """
    server_ca = _load_or_create_ca(
        directory, "server-ca", lambda: new_server_ca(DEMO_SERVER_PERMITTED, now=now)
    )
    device_ca = _load_or_create_ca(directory, "device-ca", lambda: new_device_ca(now=now))
    server = save_pair(issue_server_cert(server_ca, server_names, now=now), directory, "server",
                       overwrite=True)
    device_dir = directory / "devices"
    device_files = DeviceFiles(
        cert=device_dir / f"{device_id}.crt", key=device_dir / f"{device_id}.key",
        p12=device_dir / f"{device_id}.p12", p12_password=p12_password,
    )
    if _device_outdated(device_files, device_ca.cert, DeviceIdentity(device_id, user), now):
        device_files = save_device(
            issue_device_cert(device_ca, device_id, user, now=now), device_dir,
            p12_password=p12_password, overwrite=True,
        )
    return DemoPki(
        server_ca=PemFiles(directory / "server-ca.crt", directory / "server-ca.key"),
        device_ca=PemFiles(directory / "device-ca.crt", directory / "device-ca.key"),
        server=server, device=device_files,
    )


def _load_or_create_ca(directory: Path, stem: str, create: Callable[[], CertAndKey]) -> CertAndKey:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    if cert_path.exists() and key_path.exists():
        return load_ca(cert_path, key_path)
    ca = create()
    save_pair(ca, directory, stem, overwrite=True)
    return ca


def _device_outdated(
    files: DeviceFiles, ca_cert: x509.Certificate, wanted: DeviceIdentity, now: datetime | None
) -> bool:
    """True unless the stored device files are valid, for ``wanted``, and open with the password."""
    try:
        identity = verify_device_cert(load_certificate(files.cert), [ca_cert], now=now)
        key, cert, _ = pkcs12.load_key_and_certificates(
            files.p12.read_bytes(), files.p12_password.encode("utf-8")
        )
    except (CertError, OSError, ValueError):
        return True
    return identity != wanted or cert != load_certificate(files.cert) or key is None


