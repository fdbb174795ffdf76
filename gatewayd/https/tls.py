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
verified certificate is read with `gatewayd.certs.device_identity_from_der`; one that chains to
the device CA but is not a well-formed device certificate yields no device (and is logged).
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gatewayd.certs import CertError, DeviceIdentity, device_identity_from_der
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

CLIENT_CERT_MODES: Final = {
    "off": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


class TlsConfigError(Exception):
    """The certificate, key or client CA cannot be loaded; the message names the file."""


@dataclass(frozen=True, slots=True)
class TlsProfile:
    """What `server_context` actually configured (for logs and tests)."""

    groups: str  # "X25519:P-256:P-384", or "prime256v1" after the fallback


def server_context(settings: HttpsSettings) -> tuple[ssl.SSLContext, TlsProfile]:
    """Build the listener's SSLContext from ``https.*``; raise TlsConfigError on bad files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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


def _configure_client_certificates(context: ssl.SSLContext, settings: HttpsSettings) -> None:
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


def device_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> DeviceIdentity | None:
    """The verified device certificate's identity on this connection, or None.

    OpenSSL has already verified the chain against the device CA (the context only asks for
    client certificates when ``client_cert`` is not ``off``), so a certificate returned here is
    trusted; whether it is a well-formed *device* certificate is checked by `certs`.
    """
    if ssl_object is None:
        return None
    try:
        der = ssl_object.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):  # handshake not complete, or connection gone
        return None
    if not der:
        return None
    try:
        return device_identity_from_der(der)
    except CertError as exc:
        log.warning("client certificate is not a usable device certificate: %s", exc)
        return None
