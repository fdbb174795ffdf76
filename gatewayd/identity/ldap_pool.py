"""Connections to the LDAP servers: TLS, fail-over between URLs, and a bounded idle pool.

Owns how one ldap3 connection is opened (blocking; called from the backend's worker
threads only) and kept for reuse:

* **TLS is verified.** ``ldaps://`` wraps the socket at once; ``ldap://`` sends StartTLS
  before anything else and refuses to go on in clear text when the server declines, unless
  the operator set ``insecure = true``. Certificates are checked by OpenSSL against
  ``ca_file`` (or the system store) with host-name checking in the handshake, TLS 1.2 at
  least — not by ldap3's own after-the-fact name matching.
* **Fail-over.** URLs are tried in order, starting with the one that worked last, so a dead
  first domain controller costs one ``connect_timeout`` once, not on every login.
* **Service account.** Search connections bind as ``bind_dn`` with the password read from
  ``bind_password_file`` at every new connection (a rotated password applies without a
  restart). An empty password file is refused: an empty simple bind is an *unauthenticated*
  bind (RFC 4513 5.1.2) that many servers accept as anonymous.
* **Pooling.** `ConnectionPool` keeps at most ``size`` idle connections and reuses the most
  recent; one idle longer than `IDLE_LIMIT` is closed instead of reused, because firewalls
  and Active Directory (MaxConnIdleTime) drop idle connections silently and a dead socket
  costs a whole timeout to notice.

Every socket operation is bounded by the caller's deadline (`arm`).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from ldap3 import ANONYMOUS, NONE, SIMPLE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException

from gatewayd.identity.directory import DirectoryUnavailable

log = logging.getLogger(__name__)

IDLE_LIMIT: Final = 120.0  # seconds an idle connection is trusted to still be open
RESULT_SUCCESS: Final = 0


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (monotonic); DirectoryUnavailable when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DirectoryUnavailable("directory did not answer within the timeout")
    return left


def arm(connection: Any, deadline: float) -> None:
    """Bound the next socket operations of ``connection`` by ``deadline``.

    ldap3 sets the socket timeout once, when it opens the connection; resetting it before
    each operation makes a hung server cost at most what is left of the caller's budget, so
    the worker thread is free again when the caller gives up.
    """
    sock = getattr(connection, "socket", None)
    if sock is not None:
        sock.settimeout(remaining(deadline))


def no_delay(connection: Any) -> None:
    """Send each LDAP request at once (TCP_NODELAY).

    LDAP is small request / small response: with Nagle's algorithm the first request after
    the TLS handshake waits for the server's delayed ACK, 40 ms on Linux, on every new
    connection.
    """
    with contextlib.suppress(OSError, AttributeError):
        connection.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def close_quietly(connection: Any) -> None:
    with contextlib.suppress(LDAPException, OSError, AttributeError):
        connection.unbind()


@dataclass(frozen=True, slots=True)
class ServerUrl:
    """One configured server: ``ldaps://host:port`` or ``ldap://host:port``."""

    url: str
    host: str
    port: int
    ldaps: bool

    @classmethod
    def parse(cls, url: str) -> ServerUrl:
        parts = urlsplit(url)
        ldaps = parts.scheme == "ldaps"
        if parts.hostname is None:
            raise ValueError(f"no host in {url}")
        return cls(url, parts.hostname, parts.port or (636 if ldaps else 389), ldaps)


class VerifiedTls(Tls):  # type: ignore[misc]  # ldap3 is untyped
    """ldap3's `Tls` with a prepared `ssl.SSLContext` (host name checked in the handshake)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self.context = context

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        no_delay(connection)
        connection.socket = self.context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=connection.server.host)


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the server against ``ca_file`` (or the system store), TLS 1.2 or later."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context  # create_default_context: CERT_REQUIRED and check_hostname already on


def read_secret(path: Path) -> str:
    """The service account password: the file's text without its final line break."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DirectoryUnavailable(f"bind_password_file {path}: cannot read it "
                                   f"({getattr(exc, 'strerror', None) or exc})") from None
    if st.st_mode & 0o004:
        log.warning("bind_password_file %s is world-readable: run chmod o-r on it", path)
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise DirectoryUnavailable(f"bind_password_file {path} is empty; an empty simple bind "
                                   "would be an unauthenticated (anonymous) bind")
    return secret


class Connector:
    """Opens connections (blocking) to the first configured server that answers."""

    def __init__(self, urls: list[str], *, start_tls: bool, insecure: bool,
                 ca_file: Path | None, connect_timeout: float,
                 bind_dn: str, bind_password_file: Path | None) -> None:
        self.servers = tuple(ServerUrl.parse(url) for url in urls)
        self.start_tls = start_tls
        self.insecure = insecure
        self.ca_file = ca_file
        self.connect_timeout = connect_timeout
        self.bind_dn = bind_dn
        self.bind_password_file = bind_password_file
        self._lock = threading.Lock()
        self._preferred = 0  # index of the server that answered last
        self._tls: tuple[tuple[int, int] | None, ssl.SSLContext] | None = None

    def open(self, deadline: float, *, bind_service: bool) -> Any:
        """A connected (TLS) ldap3 connection, bound as the service account if asked."""
        with self._lock:
            first = self._preferred
        order = [(first + i) % len(self.servers) for i in range(len(self.servers))]
        problems: list[str] = []
        for index in order:
            server = self.servers[index]
            try:
                connection = self._connect(server, deadline)
            except (LDAPException, OSError, DirectoryUnavailable) as exc:
                problems.append(f"{server.url}: {describe(exc)}")
                continue
            try:
                if bind_service:
                    self._bind_service(connection, deadline, server)
            except (LDAPException, OSError) as exc:  # the connection broke: try the next one
                close_quietly(connection)
                problems.append(f"{server.url}: {describe(exc)}")
                continue
            except BaseException:
                # A refused service bind is not retried elsewhere: every server would refuse
                # it too, and each refusal counts towards locking the service account.
                close_quietly(connection)
                raise
            with self._lock:
                self._preferred = index
            return connection
        raise DirectoryUnavailable("no directory server answered: " + "; ".join(problems))

    def _connect(self, server: ServerUrl, deadline: float) -> Any:
        tls = None
        if server.ldaps or self.start_tls:
            tls = VerifiedTls(self._context())
        budget = remaining(deadline)
        ldap_server = Server(server.host, port=server.port, use_ssl=server.ldaps, tls=tls,
                             get_info=NONE, connect_timeout=min(self.connect_timeout, budget))
        connection = Connection(
            ldap_server, authentication=ANONYMOUS, client_strategy=SYNC, read_only=True,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds; `arm` sets the precise
            # per-operation limit afterwards.
            receive_timeout=max(1, math.ceil(budget)), raise_exceptions=False,
            auto_referrals=False, auto_escape=False, check_names=False,
            return_empty_attributes=False)
        try:
            connection.open(read_server_info=False)
            no_delay(connection)
            if not server.ldaps and self.start_tls:
                arm(connection, deadline)
                connection.start_tls(read_server_info=False)
                if not connection.tls_started:
                    # Never fall back to clear text: the next thing sent may be a password.
                    raise DirectoryUnavailable("StartTLS was refused")
            elif not server.ldaps and not self.insecure:
                raise DirectoryUnavailable("plain LDAP without insecure = true")
        except BaseException:
            close_quietly(connection)
            raise
        return connection

    def _context(self) -> ssl.SSLContext:
        """The TLS context, rebuilt when the CA file changes (a renewed internal CA)."""
        try:
            st = self.ca_file.stat() if self.ca_file else None
        except OSError as exc:
            raise DirectoryUnavailable(f"ca_file {self.ca_file}: {exc.strerror}") from None
        signature = (st.st_ino, st.st_mtime_ns) if st else None
        with self._lock:
            cached = self._tls
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            context = tls_context(self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DirectoryUnavailable(f"ca_file {self.ca_file}: not a PEM CA bundle "
                                       f"({exc})") from None
        with self._lock:
            self._tls = (signature, context)
        return context

    def _bind_service(self, connection: Any, deadline: float, server: ServerUrl) -> None:
        if not self.bind_dn or self.bind_password_file is None:
            return  # anonymous searches, as configured
        code = simple_bind(connection, self.bind_dn, read_secret(self.bind_password_file),
                           deadline)
        if code != RESULT_SUCCESS:
            description = connection.result.get("description") if connection.result else None
            log.error("directory %s refused the service account %s (%s): check bind_dn and "
                      "bind_password_file", server.url, self.bind_dn, description or code)
            raise DirectoryUnavailable(f"{server.url}: service account bind refused "
                                       f"({description or code})")


def simple_bind(connection: Any, dn: str, password: str, deadline: float) -> int | None:
    """Bind ``connection`` as ``dn``; the LDAP result code (0 = success).

    The password goes out as UTF-8 bytes exactly as typed: ldap3 would otherwise apply
    SASLprep (NFKC) to a text password, and Active Directory and OpenLDAP compare against
    what was stored without it. It is cleared from the connection object afterwards, so a
    pooled connection does not keep the last person's password in memory.
    """
    if not password:
        # Never reached by design; guarded anyway because an empty simple bind "succeeds".
        raise ValueError("empty password")
    arm(connection, deadline)
    connection.authentication = SIMPLE
    connection.user = dn
    connection.password = password.encode("utf-8")
    try:
        connection.bind(read_server_info=False)
    finally:
        connection.password = None
    result = connection.result or {}
    code = result.get("result")
    return int(code) if code is not None else None


def describe(exc: BaseException) -> str:
    """A short, secret-free reason for the operational log.

    ldap3 wraps the original error's text in tuple reprs, several deep
    (``("('socket ssl wrapping error: …',)",)``); those layers are peeled off.
    """
    text = str(exc).strip()
    for _ in range(4):
        try:
            inner = ast.literal_eval(text) if text.startswith("(") else None
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            break
        if not (isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], str)):
            break
        text = inner[0].strip()
    text = text or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class ConnectionPool:
    """Idle connections of one kind (service-bound searchers, or user binders).

    Not a concurrency limit by itself: the backend runs at most ``size`` worker threads,
    each holding at most one connection of each pool, so neither pool ever has more than
    ``size`` connections open.
    """

    def __init__(self, open_connection: Callable[[float], Any], size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open = open_connection
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[tuple[float, Any]] = []
        self._closed = False

    def take(self, deadline: float) -> tuple[Any, bool]:
        """A connection and whether it was reused (a reused one may have died meanwhile)."""
        while True:
            with self._lock:
                item = self._idle.pop() if self._idle else None
            if item is None:
                return self._open(deadline), False
            since, connection = item
            if self._clock() - since <= IDLE_LIMIT and not connection.closed:
                return connection, True
            close_quietly(connection)

    def give(self, connection: Any) -> None:
        """Return a healthy connection for reuse (closed if the pool is full or shut)."""
        with self._lock:
            keep = not self._closed and len(self._idle) < self._size
            if keep:
                self._idle.append((self._clock(), connection))
        if not keep:
            close_quietly(connection)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _, connection in idle:
            close_quietly(connection)

    @property
    def idle(self) -> int:
        with self._lock:
            return len(self._idle)
