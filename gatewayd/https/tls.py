"""TLS for the HTTPS listener: the server `SSLContext` and the device identity of a connection.

Owns the gateway's TLS profile and the reading of client (device) certificates.

Profile: Mozilla "intermediate" (Server Side TLS 5.7): TLS 1.2 and 1.3 only; for TLS 1.2 only
ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (no RSA key exchange, so no ROBOT; no
CBC, no SHA-1 MACs); TLS 1.3 with OpenSSL's default suites, which are exactly Mozilla's three;
key-exchange groups X25519, P-256 and P-384 only; no compression, no session tickets (the
ticket key would never rotate in a long-running daemon), no client-initiated renegotiation,
and the client's cipher preference (Mozilla: "server preference: no" — clients know best
whether they have AES hardware).

Python's `ssl` module cannot set the list of key-exchange groups (``set_groups`` only arrives
in Python 3.13), so `_restrict_groups` calls OpenSSL's ``SSL_CTX_set1_groups_list`` through
ctypes, after checking — by reading the context's options back through OpenSSL and comparing
them with what Python reports — that it really holds the context's ``SSL_CTX*``. If anything
about that check fails, it falls back to `SSLContext.set_ecdh_curve("prime256v1")`: P-256 only,
still within the profile.

Client certificates (``https.client_cert``): ``off`` asks for none; ``optional`` asks and
verifies a presented one against ``https.client_ca_file`` (a browser without one still gets
in, as a device-less client); ``required`` refuses the handshake without a valid one. A
verified certificate is read with `gatewayd.certs.device_identity_from_cert`; one that chains
to the device CA but is not a well-formed device certificate yields no device (and is logged).
The listener reads it once per connection (`ConnectionDevices`), not once per request.

Revocation (``https.crl_file``): the device CA's CRL is checked by OpenSSL at every handshake
(``VERIFY_CRL_CHECK_LEAF``), so a revoked certificate fails the handshake (asyncio closes such a
connection without sending OpenSSL's alert: the browser shows a connection error). Only a list
signed by a CA of ``client_ca_file`` is loaded (`gatewayd.certs.read_crl`): a foreign or forged
list would make OpenSSL fail every handshake or be ignored. A new list is loaded into the
running context without a restart (`ServerContext.apply_crl`, called by the gateway's watcher
when the file changes and on SIGHUP): OpenSSL keeps every list it was given and uses the one
with the latest ``thisUpdate``, so a rolled-back file never un-revokes anything in a running
gateway (the watcher also refuses a lower CRL number). Handshakes done before a revocation
are not re-run by OpenSSL; each connection is a `DeviceConnection`, which checks its peer's
serial against the context's current list whenever that list changes and fails its next
read — a keep-alive connection of a stolen laptop is cut at its next request, not at its idle
timeout. A request already read before the list changed (pipelined, or in the same read) is
caught by `ConnectionDevices.device`, which checks the serial on every request.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import sys
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gatewayd.certs import (
    CertError,
    CrlInfo,
    DeviceIdentity,
    device_identity_from_cert,
    load_certificates,
    read_crl,
)
from gatewayd.config import HttpsSettings

log = logging.getLogger(__name__)

# Mozilla intermediate, TLS 1.2 part, OpenSSL names, in Mozilla's order. The DHE suites of
# older profile versions are left out: they need a DH parameter file, and every client
# that speaks TLS 1.2 also speaks ECDHE.
INTERMEDIATE_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
INTERMEDIATE_GROUPS: Final = "X25519:P-256:P-384"
FALLBACK_CURVE: Final = "prime256v1"

_SSL_CTRL_SET_GROUPS_LIST: Final = 92  # OpenSSL's SSL_CTRL_SET_GROUPS_LIST

CLIENT_CERT_MODES: Final = MappingProxyType({
    "off": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
})


class TlsConfigError(Exception):
    """The certificate, key or client CA cannot be loaded; the message names the file."""


@dataclass(frozen=True, slots=True)
class TlsProfile:
    """What `server_context` actually configured (for logs and tests)."""

    groups: str  # "X25519:P-256:P-384", or "prime256v1" after the fallback


FileSignature = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
CRL_EXPIRY_WARNING: Final = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class LoadedCrl:
    """A device CRL read from ``https.crl_file`` and verified against the device CA."""

    pem: bytes
    info: CrlInfo
    signature: FileSignature  # of the file it was read from, to notice the next change


def file_signature(st: os.stat_result) -> FileSignature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_device_crl(settings: HttpsSettings) -> LoadedCrl:
    """Read and verify ``https.crl_file`` (blocking); TlsConfigError names what is wrong."""
    path, ca_file = settings.crl_file, settings.client_ca_file
    if path is None or ca_file is None:
        raise TlsConfigError("https: crl_file needs client_ca_file")
    try:
        with path.open("rb") as handle:
            signature = file_signature(os.fstat(handle.fileno()))
            data = handle.read()
        ca_certs = load_certificates(ca_file)
        info = read_crl(data, ca_certs, source=str(path))
    except OSError as exc:
        raise TlsConfigError(f"https: crl_file {path}: {exc.strerror or exc}") from None
    except CertError as exc:
        raise TlsConfigError(f"https: crl_file: {exc}") from None
    if not data.lstrip().startswith(b"-----"):  # DER (read_crl accepted it): OpenSSL wants PEM
        data = x509.load_der_x509_crl(data).public_bytes(serialization.Encoding.PEM)
    return LoadedCrl(data, info, signature)


def crl_expiry_warning(info: CrlInfo, now: datetime) -> str | None:
    """A warning when the list lapses within 30 days: then OpenSSL refuses every device."""
    if info.next_update is None or info.next_update - now > CRL_EXPIRY_WARNING:
        return None
    if info.next_update <= now:
        return (f"the device CRL expired at {info.next_update:%Y-%m-%d %H:%M} UTC: every device "
                "certificate is refused; run gatewayd certs crl --renew")
    return (f"the device CRL expires at {info.next_update:%Y-%m-%d %H:%M} UTC; after that every "
            "device certificate is refused. Run gatewayd certs crl --renew (monthly timer)")


class DeviceConnection(ssl.SSLObject):
    """A server-side TLS connection that fails its next read once its device is revoked.

    Instances are made by `ServerContext.wrap_bio` (asyncio's SSL transport), never directly.
    The check costs an integer comparison per read until the context's list changes; then
    the peer certificate's serial is read once and compared.
    """

    _seen_generation = 0
    _serial: int | None = None
    _serial_known = False

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except ssl.SSLCertVerificationError as exc:
            # asyncio drops this error without a trace (and without sending OpenSSL's alert):
            # the help desk needs "certificate has expired" / "certificate revoked" somewhere.
            # The audit record is written by the listener, which knows the peer's address
            # (`ServerContext.report_refusal`, from gatewayd.https.app); this object does not.
            log.warning("TLS client certificate refused: %s", exc.verify_message)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> bytes:
        context = self.context
        if isinstance(context, ServerContext) and context.generation != self._seen_generation:
            self._seen_generation = context.generation
            if context.revoked and self._peer_serial() in context.revoked:
                raise ssl.SSLError("the client's device certificate was revoked")
        return super().read(len, buffer)

    def _peer_serial(self) -> int | None:
        if not self._serial_known:
            der = self.getpeercert(binary_form=True)
            self._serial = x509.load_der_x509_certificate(der).serial_number if der else None
            self._serial_known = True
        return self._serial


class ServerContext(ssl.SSLContext):
    """The listener's SSLContext, plus the device CRL it enforces (see module docstring)."""

    sslobject_class = DeviceConnection
    crl: LoadedCrl | None = None
    revoked: frozenset[int] = frozenset()
    generation = 0  # bumped by every apply_crl: connections re-check their peer then
    # Told (verify code, OpenSSL's text, the peer's address) of each refused device
    # certificate, for the audit log (EmergencyStop.tls_refused); it never raises.
    on_refused: Callable[[int, str, str], None] | None = None

    def report_refusal(self, error: ssl.SSLCertVerificationError, source_ip: str) -> None:
        """The listener's handshake with ``source_ip`` failed on the client certificate."""
        if self.on_refused is not None:
            self.on_refused(error.verify_code, error.verify_message, source_ip)

    def apply_crl(self, crl: LoadedCrl) -> None:
        """Give OpenSSL a verified list (blocking: a temporary file) and enforce it."""
        # ssl can load a CRL only from a file, and loading the verified bytes (not the
        # path, which may have been replaced meanwhile) is what makes the check mean anything.
        with tempfile.NamedTemporaryFile(prefix="gatewayd-crl-", suffix=".pem") as copy:
            copy.write(crl.pem)
            copy.flush()
            self.load_verify_locations(cafile=copy.name)
        self.crl = crl
        self.revoked = frozenset(crl.info.revoked)
        self.generation += 1


def server_context(settings: HttpsSettings) -> tuple[ServerContext, TlsProfile]:
    """Build the listener's SSLContext from ``https.*``; raise TlsConfigError on bad files."""
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    groups = _restrict_groups(context)
    _load_server_certificate(context, settings)
    _configure_client_certificates(context, settings)
    return context, TlsProfile(groups=groups)


def _load_server_certificate(context: ssl.SSLContext, settings: HttpsSettings) -> None:
    for key, path in (("cert_file", settings.cert_file), ("key_file", settings.key_file)):
        _require_readable(key, path)
    try:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"https: cert_file {settings.cert_file} / key_file {settings.key_file}: "
            f"not a matching PEM certificate and key ({exc})"
        ) from None


def _require_readable(key: str, path: Path) -> None:
    """Name the file and the problem (OpenSSL's own errors name neither)."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise TlsConfigError(f"https: {key} {path}: {exc.strerror or exc}") from None


def _configure_client_certificates(context: ServerContext, settings: HttpsSettings) -> None:
    context.verify_mode = CLIENT_CERT_MODES[settings.client_cert]
    if settings.client_cert == "off" or settings.client_ca_file is None:
        return
    _require_readable("client_ca_file", settings.client_ca_file)
    try:
        context.load_verify_locations(cafile=settings.client_ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"https: client_ca_file {settings.client_ca_file}: cannot load the device CA ({exc})"
        ) from None
    if settings.crl_file is None:
        log.warning("https.crl_file is not set: a revoked device certificate is still accepted")
        return
    # Without a list for the device CA, CRL_CHECK_LEAF refuses every device: the list is
    # loaded before the flag can matter (this context is not listening yet).
    loaded = read_device_crl(settings)
    try:
        context.apply_crl(loaded)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"https: crl_file {settings.crl_file}: cannot load ({exc})") from None
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _restrict_groups(context: ssl.SSLContext) -> str:
    """Limit key exchange to Mozilla's groups; see the module docstring for why ctypes."""
    if _set_groups_list(context, INTERMEDIATE_GROUPS):
        return INTERMEDIATE_GROUPS
    log.warning("cannot set TLS groups through OpenSSL; using P-256 only")
    context.set_ecdh_curve(FALLBACK_CURVE)
    return FALLBACK_CURVE


def _set_groups_list(context: ssl.SSLContext, groups: str) -> bool:
    # Only where PySSLContext's layout is known (PyObject_HEAD, then SSL_CTX *): CPython 3.11
    # to 3.14. Elsewhere, or if the layout check below fails, the P-256 fallback is used.
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 14):
        return False
    try:
        import _ssl  # noqa: PLC0415 - the C module that links libssl, only needed here

        library = ctypes.CDLL(_ssl.__file__)
        get_options = library.SSL_CTX_get_options
        control = library.SSL_CTX_ctrl
    except (OSError, AttributeError, ImportError):
        return False
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    control.restype = ctypes.c_long
    control.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    # PySSLContext starts with PyObject_HEAD followed by the SSL_CTX pointer.
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or get_options(pointer) != int(context.options):
        return False  # not the layout we expect: touch nothing
    return bool(control(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")))


TlsConnection = ssl.SSLObject | ssl.SSLSocket


class DeviceRevokedError(Exception):
    """The connection's device certificate was revoked after its handshake."""


@dataclass(frozen=True, slots=True)
class _PeerDevice:
    device: DeviceIdentity | None  # None: no certificate, or not a usable device certificate
    serial: int | None  # of the certificate presented, usable or not


_NO_PEER: Final = _PeerDevice(None, None)


def device_of(ssl_object: TlsConnection | None) -> DeviceIdentity | None:
    """The verified device certificate's identity on this connection, or None.

    OpenSSL has already verified the chain against the device CA (the context only asks for
    client certificates when ``client_cert`` is not ``off``), so a certificate returned here is
    trusted; whether it is a well-formed *device* certificate is checked by `certs`.
    Parses the certificate on every call: per request, use `ConnectionDevices`.
    """
    peer = _read_peer(ssl_object)
    return peer.device if peer is not None else None


def _read_peer(ssl_object: TlsConnection | None) -> _PeerDevice | None:
    """The peer's certificate as far as the frontend cares; None while it cannot be read
    (no TLS, handshake not complete, connection gone) — nothing worth remembering."""
    if ssl_object is None:
        return None
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        return None
    if not der:
        return _NO_PEER
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        log.warning("client certificate is not a usable device certificate: %s", exc)
        return _NO_PEER
    try:
        return _PeerDevice(device_identity_from_cert(cert), cert.serial_number)
    except CertError as exc:
        log.warning("client certificate is not a usable device certificate: %s", exc)
        return _PeerDevice(None, cert.serial_number)


class ConnectionDevices:
    """The device of each TLS connection, parsed once per connection, revocation checked on
    every request.

    Reading and parsing the peer certificate was a per-request cost although it cannot change
    on a connection (renegotiation is off). What can change is the device CRL: `device`
    compares the remembered serial with the context's current revoked set on every call (a
    set lookup), so a request that was already buffered when the list changed — which
    `DeviceConnection.read` cannot stop — is refused too. Entries are held weakly: a closed
    connection's entry goes with its SSL object. One instance per listener (no module state).
    """

    def __init__(self) -> None:
        self._peers: weakref.WeakKeyDictionary[TlsConnection, _PeerDevice] = (
            weakref.WeakKeyDictionary()
        )

    def __len__(self) -> int:
        return len(self._peers)

    def device(self, ssl_object: TlsConnection | None) -> DeviceIdentity | None:
        """The connection's device (see `device_of`); raises DeviceRevokedError if it is revoked."""
        if ssl_object is None:
            return None
        peer = self._peers.get(ssl_object)
        if peer is None:
            peer = _read_peer(ssl_object)
            if peer is None:
                return None
            self._peers[ssl_object] = peer
        if peer.serial is not None:
            context = ssl_object.context
            if isinstance(context, ServerContext) and peer.serial in context.revoked:
                raise DeviceRevokedError(peer.device.device_id if peer.device else hex(peer.serial))
        return peer.device
