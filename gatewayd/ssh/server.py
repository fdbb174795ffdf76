"""The SSH listener: accepting, authenticating, and tying each connection to a session.

Owns `SshFrontend` (one per Gateway: the listening socket, the pre-auth caps, the live
connections) and `GatewayServer` (asyncssh's per-connection server object). One connection::

    accept()                          `Admission` (gatewayd.ssh.admission): over a cap, the
                                      socket is closed before a single SSH byte is sent
    asyncssh.run_server(sock)         key exchange with `KEX_ALGS` / `CIPHERS` / `MACS` only,
                                      strict KEX, ed25519 host key, ``ssh.login_grace_time``
    keyboard-interactive              password + TOTP code in one round → Authenticator.login
      or user certificate             the portal's certificate (gatewayd.ssh.auth)
                                      at most ``ssh.max_auth_tries`` failures, then disconnect
    session in the registry           frontend "ssh": seats, per-user cap, idle and absolute
                                      timeouts; auth.success + session.start audited
    "session" channel                 a banner (user, device, reachable services, expiry) and
                                      nothing else: no shell, no command, stdin ignored; at
                                      most `MAX_SESSION_CHANNELS` per connection
    "direct-tcpip" channels           `Tunnels.open` (gatewayd.ssh.tunnel): policy per open
    anything else                     refused: exec/subsystem get a message on stderr and exit
                                      status 126; -R, streamlocal, agent, X11, tun/tap refused
                                      (-R logged once a minute per connection at most)

**Seats.** A session signed in with a certificate shares the seat of the portal session that
issued it while that one lives (`SessionRegistry.create(seat_of=…)`): with ``per_user = 1``
a member of staff keeps the browser session and the tunnel. At most
``ssh.sessions_per_certificate_seat`` SSH sessions share one seat (per node; one more is
refused "too many SSH connections for this sign-in (N)", ``auth.failure``
``too_many_connections``): one certificate is not an unlimited number of sessions. Tunnel
traffic also keeps the portal session that holds the seat from idling out
(`SessionRegistry.touch` follows the seat). When the issuing portal session is gone, the
certificate session joins the seat of a live SSH session of the same portal sign-in, else
of the user's newest live portal session (`SshFrontend.seat_for`), else takes a seat of its
own: so a tunnel that reconnects does not replace the user's new browser session, which
would replace the tunnel at its next sign-in, and so on. (A new portal sign-in at the
per-user cap still replaces the oldest seat, tunnels included: newest wins, as documented
for ``sessions.per_user``; the tunnel's next connection then joins the new sign-in.)
Keyboard-interactive logins are new logins: newest wins at the per-user cap, as on the
HTTPS listener (the oldest session of that user ends as ``replaced``). A certificate
session also ends when the certificate expires, whatever ``sessions.absolute_timeout`` says.

**MFA age.** A certificate proves the MFA of the portal login that issued it, not a fresh
one: the SSH session's ``mfa_at`` is the live portal session's, or, when that session is
gone, the certificate's ``valid_after`` (the portal signs after the login's TOTP check and
backdates ``valid_after`` a minute, so this is never later than the real MFA — stricter,
never laxer). Never "now": ``mfa_max_age`` rules hold for tunnels as for web pages.

**Ending.** Whatever ends a session (logout, admin kill, idle or absolute timeout, disabled
user, revoked device, directory change, shutdown) runs its closer here: the connection is
disconnected with the reason at once (the OpenSSH client prints it). A client that closes its
connection, or stops answering keepalives (``ssh.keepalive_interval`` times ``keepalive_count``),
ends its session as ``disconnected``. When a portal session ends by a revocation (sign-out,
admin kill, disable, device revocation, directory change), the SSH sessions signed in with
its certificates end with the same reason and those certificates are refused from then on.
Those sessions are ended by the outermost `SshFrontend.session_ended` call in a loop (inner
calls only queue their victims): a portal session shared by hundreds of SSH sessions does
not recurse once per sharer, and every one gets its ``session.end`` record.

**Revocations and restarts.** Revoked portal handles (`RevokedSessions`) live in memory; a
restart forgets them. So a certificate issued before this process started (its
``valid_after`` plus the portal's one-minute backdating is earlier than the listener's
start) is accepted only while the portal session its key id names is live
(`SshFrontend.portal_session`, the one function that says "live": with the multi-node
registry, live in the shared sessions); otherwise it is refused
(``certificate_predates_restart``) with an authentication banner telling the user to sign in
to the portal again for a new certificate. A restart therefore costs certificate users whose
portal session is gone one portal sign-in, and a sign-out or kill before the restart stays
in force after it.

**Certificates and asyncssh.** asyncssh checks a certificate's CA, principal, validity and
signatures, but its public API never shows the server the key id, which names the device and
the portal session. So `GatewayServer.connection_made` wraps the connection's
``validate_public_key`` (the method asyncssh's public-key auth calls with the raw key blob)
with a filter that runs `gatewayd.ssh.auth` first and lets asyncssh's own checks decide after.
This adds a check; it replaces none of asyncssh's. The checks run for the unsigned query and
again for the signed attempt (time, revocations, directory lookup, the gateway's user blocks:
`Authenticator.lookup`), and once more, without
an await in between, right before the session starts: a kill, disable or revocation between
query and signature is not missed. Only refusals are remembered per connection, keyed by
(user name, key). The wrapper is not public API, so it must not fail open: the filter marks
the one key it vouches for while asyncssh checks it, and `GatewayServer.validate_ca_key`
trusts the CA for nothing else; if an asyncssh release stopped calling the wrapper, every
certificate would be refused, never accepted unchecked. ``pyproject.toml`` pins asyncssh to
the 2.24 series this was checked against.

**The contract with `gatewayd.ssh.tunnel`.** asyncssh 2.24 calls ``connection_requested``
synchronously, but accepts a coroutine as its result and awaits it before it confirms the
channel; so `GatewayServer.connection_requested` returns ``Tunnels.open(...)``'s coroutine. A
``ChannelOpenError`` (``TunnelRefused``) raised there is the open failure the client sees;
anything else is logged here and refused as "internal error". ``gatewayd run`` and ``gatewayd
demo`` run on uvloop when it is installed: its transports are not ``asyncio.Transport``
instances (check capabilities, not classes).

**RFC 4252 partial success** (certificate, then keyboard-interactive) is not offered: asyncssh
has no public way for the server to answer "partial success", and the certificate already
proves the MFA login at the portal (with its age: see "MFA age").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import asyncssh
from asyncssh.kex import get_kex_algs

from gatewayd.audit import AuditWriteError
from gatewayd.files import exposure
from gatewayd.identity.authenticator import LoginResult, UserBlocked
from gatewayd.identity.directory import DirectoryUnavailable
from gatewayd.identity.principal import Principal
from gatewayd.sessions import PerUserLimit, SeatsFull, Session
from gatewayd.ssh.admission import Admission
from gatewayd.ssh.auth import (
    KBDINT_CHALLENGE,
    REVOKING_END_REASONS,
    CertificateClaims,
    CertificateRefused,
    KbdIntChallenge,
    RevokedSessions,
    check_certificate,
    check_validity,
    decode_certificate,
    device_owner,
    device_revoked,
    issued_at,
    read_responses,
    same_key,
    usable_username,
)
from gatewayd.ssh.tunnel import Tunnels
from gatewayd.state.store import StateUnavailable
from gatewayd.tasks import cancel_and_wait, within

if TYPE_CHECKING:
    from gatewayd.app import Gateway

log = logging.getLogger(__name__)

FRONTEND: Final = "ssh"
# Hybrid post-quantum first where asyncssh + cryptography offer it, then X25519.
PREFERRED_KEX: Final = ("mlkem768x25519-sha256", "sntrup761x25519-sha512",
                        "sntrup761x25519-sha512@openssh.com", "curve25519-sha256",
                        "curve25519-sha256@libssh.org")
# AES-GCM first: AES-NI makes it the fastest on the gateway's x86 hardware.
CIPHERS: Final = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                  "aes256-gcm@openssh.com")
MACS: Final = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
SERVER_VERSION: Final = "gatewayd"
AUTH_TIMEOUT: Final = 30.0  # seconds; the authenticator bounds itself, this catches a wedge
MAX_PLAIN_KEYS: Final = 16  # plain public keys offered per connection before a disconnect
CLOSE_WAIT: Final = 5.0  # seconds `close` waits for connections to finish closing
REFUSED_COMMAND: Final = (
    "gatewayd: this gateway runs no commands, shells or subsystems; it carries tunnels only.\n"
    "  Use: ssh -N -L 4445:fileserver.ward.local:445 gateway   (or ssh -D 1080 gateway)\n")
EXIT_REFUSED: Final = 126
# "session" channels one connection may have open or opening: each shell request renders the
# banner (a policy decision per destination); ``ssh`` needs one, a multiplexing master a few.
MAX_SESSION_CHANNELS: Final = 4
REMOTE_LOG_INTERVAL: Final = 60.0  # seconds between log lines about refused -R per connection
PREDATES_RESTART: Final = (
    "gatewayd: this certificate was issued before the gateway restarted and its portal "
    "session is gone; sign in to the portal again for a new certificate.\n")


def kex_algorithms() -> list[str]:
    """`PREFERRED_KEX` that this asyncssh (and cryptography) build implements."""
    available = {alg.decode("ascii") for alg in get_kex_algs()}
    return [alg for alg in PREFERRED_KEX if alg in available]


class SshConfigError(Exception):
    """The SSH listener cannot start (host key or CA unusable); the message says why."""


def _private_file(path: Path, setting: str) -> None:
    """Refuse a key others can read, as OpenSSH does (it may have leaked already)."""
    try:
        problem = exposure(path, setting)
    except OSError as exc:
        raise SshConfigError(f"{setting} {path}: {exc.strerror or exc}") from None
    if problem is not None:
        raise SshConfigError(problem)


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The Ed25519 host key (blocking)."""
    _private_file(path, "ssh.host_key_file")
    try:
        key = asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SshConfigError(f"ssh.host_key_file {path}: {exc}") from None
    if key.get_algorithm() != "ssh-ed25519":
        raise SshConfigError(f"ssh.host_key_file {path}: an Ed25519 key is required, "
                             f"not {key.get_algorithm()}")
    return key


def load_user_ca(path: Path) -> asyncssh.SSHKey:
    """The public half of the SSH user CA key (blocking; the private half is not kept)."""
    _private_file(path, "ssh.user_ca_key_file")
    try:
        return asyncssh.read_private_key(path).convert_to_public()
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SshConfigError(f"ssh.user_ca_key_file {path}: {exc}") from None


def keepalive_count_max(count: int) -> int:
    """asyncssh's ``keepalive_count_max`` for ``ssh.keepalive_count``.

    asyncssh disconnects when more than ``count_max`` probes in a row went unanswered, i.e.
    at the probe after; so ``count - 1`` frees a dead client within interval * count. At
    least 1: with 0, the first timer would disconnect a quiet client before any probe.
    """
    return max(1, count - 1)


class SshFrontend:
    """The SSH listener of one gateway. `start` / `stop_accepting` / `close`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        ssh = gateway.settings.ssh
        self.admission = Admission(
            total=ssh.preauth_total, per_source=ssh.preauth_per_source,
            rate_per_minute=ssh.connect_rate_per_source, registry=gateway.metrics.registry)
        self.tunnels = Tunnels(gateway=gateway)
        self.revoked = RevokedSessions(clock=gateway.clock)
        # When this process began accepting: revocations before it are forgotten, so a
        # certificate issued earlier needs its portal session alive (`portal_session`).
        self.started_at = gateway.wall_clock().replace(microsecond=0)
        self.user_ca: asyncssh.SSHKey | None = None
        self._ending: deque[tuple[Session, str]] | None = None  # see `session_ended`
        self.servers: set[GatewayServer] = set()
        self._options: asyncssh.SSHServerConnectionOptions | None = None
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._recheck: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self.draining = False  # shutting down: no new tunnels (see `begin_drain`)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> int:
        """Load the keys, listen on ``ssh.listen``; returns the bound port (for port 0)."""
        ssh = self.gateway.settings.ssh
        self.started_at = self.gateway.wall_clock().replace(microsecond=0)
        host_key = await asyncio.to_thread(load_host_key, ssh.host_key_file)
        if ssh.user_ca_key_file is not None:
            self.user_ca = await asyncio.to_thread(load_user_ca, ssh.user_ca_key_file)
        self._options = await self._build_options(host_key)
        family = socket.AF_INET6 if ":" in ssh.listen.host else socket.AF_INET
        sock = socket.create_server((ssh.listen.host, ssh.listen.port), family=family,
                                    backlog=512)
        sock.setblocking(False)
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._accepting = loop.create_task(self._accept_forever(sock), name="gatewayd.ssh.accept")
        # Deny rules with hours or weekdays close open tunnels when their time comes.
        self._recheck = loop.create_task(self.tunnels.recheck_forever(),
                                         name="gatewayd.ssh.tunnel-recheck")
        return int(sock.getsockname()[1])

    async def _build_options(self, host_key: asyncssh.SSHKey
                             ) -> asyncssh.SSHServerConnectionOptions:
        ssh = self.gateway.settings.ssh
        grace = ssh.login_grace_time.total_seconds()
        options: asyncssh.SSHServerConnectionOptions
        options = await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: GatewayServer(self),
            server_host_keys=[host_key], server_version=SERVER_VERSION,
            kex_algs=kex_algorithms(), encryption_algs=list(CIPHERS), mac_algs=list(MACS),
            compression_algs=["none"],
            public_key_auth=self.user_ca is not None, kbdint_auth=True, password_auth=False,
            host_based_auth=False, gss_auth=False, gss_kex=False, gss_host=None,
            agent_forwarding=False, x11_forwarding=False, allow_pty=True, rdns_lookup=False,
            login_timeout=grace, connect_timeout=grace + 5,
            keepalive_interval=ssh.keepalive_interval.total_seconds(),
            keepalive_count_max=keepalive_count_max(ssh.keepalive_count),
            window=ssh.window, max_pktsize=ssh.max_packet_size,
        )
        return options

    @property
    def listening(self) -> bool:
        return self._sock is not None

    async def stop_accepting(self) -> None:
        """Close the listening socket; open connections stay (see `close`)."""
        task, self._accepting = self._accepting, None
        if task is not None:
            await cancel_and_wait([task])
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def begin_drain(self) -> None:
        """SIGTERM: stop accepting and refuse new tunnels; open tunnels keep relaying.

        "Finishing" a tunnel is up to its client: the gateway cannot tell a transfer's end from
        a pause, so an open tunnel is relayed as usual until it closes or the Gateway's
        ``gateway.shutdown_grace`` runs out; then the sessions end (``shutdown``) and each
        client is disconnected with "the gateway is shutting down".
        """
        self.draining = True
        await self.stop_accepting()

    @property
    def open_tunnels(self) -> int:
        return len(self.tunnels)

    async def close(self) -> None:
        """Close every connection (sessions have ended by now) and forget them."""
        await self.stop_accepting()
        for server in list(self.servers):
            server.close_connection()
        pending = [server.closed for server in self.servers]
        if pending:
            with contextlib.suppress(TimeoutError):
                await within(asyncio.gather(*pending), CLOSE_WAIT)
        tasks, self._serving = self._serving, set()
        if self._recheck is not None:
            tasks.add(self._recheck)
            self._recheck = None
        await cancel_and_wait(tasks)

    # --- accepting -----------------------------------------------------------------------

    async def _accept_forever(self, sock: socket.socket) -> None:
        await self.admission.accept_forever(sock, self._serve, self._serving,
                                            "gatewayd.ssh.handshake")

    async def _serve(self, conn: socket.socket, source: str) -> None:
        """Handshake and authentication of one admitted connection (its pre-auth phase)."""
        assert self._options is not None
        try:
            await asyncssh.run_server(conn, options=self._options)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            log.debug("ssh connection from %s ended before authentication: %s", source, exc)
        except Exception:
            log.exception("ssh handshake failed unexpectedly")
        finally:
            self.admission.release(source)

    # --- the gateway's hooks ---------------------------------------------------------------

    def policy_changed(self) -> int:
        """Re-decide every open tunnel against the current policy; returns how many closed."""
        return self.tunnels.recheck_all()

    def portal_session(self, handle: str) -> Session | None:
        """The live session a certificate's key id names, or None.

        The one place that decides whether a portal session is live for the certificate
        checks: this node's registry (with the multi-node registry, its replica of the shared
        sessions — `by_handle` of `gatewayd.sessions_shared`).
        """
        session = self.gateway.sessions.by_handle(handle)
        if session is None or session.handle != handle or session.ended is not None:
            return None
        return session

    def seat_for(self, handle: str, user: str) -> Session | None:
        """The seat a certificate whose portal session ``handle`` is gone signs in to.

        A live SSH session signed in with a certificate of the same portal sign-in (its
        seat: one sign-in, one seat), else the user's newest live portal session (they signed
        in again: join it rather than replace it, which would make the browser and the
        tunnel knock each other out under ``per_user = 1``), else None (a seat of its own).
        """
        for server in self.servers:
            session, claims = server.session, server.claims
            if claims is not None and claims.portal_session == handle and session is not None \
                    and session.ended is None and session.user == user:
                return session
        portals = [session for session in self.gateway.sessions.sessions()
                   if session.user == user and session.frontend == "https"
                   and session.ended is None]
        return portals[-1] if portals else None

    def session_ended(self, session: Session, reason: str) -> None:
        """A session ended: a revocation also kills the portal session's certificates.

        Ending a sibling calls back here (the registry's end hook); those calls only queue
        their victims for the outermost call, which ends them one by one: no recursion, so
        a portal session with hundreds of certificate sessions ends them all, each with its
        ``session.end`` record.
        """
        if reason not in REVOKING_END_REASONS:
            return
        lifetime = self.gateway.sessions.absolute_timeout
        handles = {session.handle}
        handles.update(server.claims.portal_session for server in self.servers
                       if server.session is session and server.claims is not None)
        for handle in handles:
            self.revoked.revoke(handle, lifetime, reason)
        victims = [(server.session, reason) for server in list(self.servers)
                   if server.claims is not None and server.claims.portal_session in handles
                   and server.session is not None and server.session is not session
                   and server.session.ended is None]
        if self._ending is not None:  # inside an outer call: it ends them
            self._ending.extend(victims)
            return
        self._ending = queue = deque(victims)
        try:
            while queue:
                victim, why = queue.popleft()
                self.gateway.sessions.end(victim, why)
        finally:
            self._ending = None


class GatewayServer(asyncssh.SSHServer):
    """asyncssh's server object for one connection: authentication, session, channels."""

    def __init__(self, frontend: SshFrontend) -> None:
        self._frontend = frontend
        self._gateway = frontend.gateway
        self._conn: asyncssh.SSHServerConnection | None = None
        self.source_ip = ""
        self.session: Session | None = None
        self.claims: CertificateClaims | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._failures = 0
        self._plain_keys = 0
        # Refused (user name, key) pairs: not checked again. Accepted ones are never cached:
        # the signed attempt is checked afresh (a kill may come between query and signature).
        self._refused: set[tuple[str, bytes]] = set()
        # The (user name, key) our certificate filter passed to asyncssh's own checks right
        # now: `validate_ca_key` says yes to nothing else (fail closed without the filter).
        self._vouched: tuple[str, bytes] | None = None
        self.seat_claim: str | None = None  # the portal seat this connection signs in to
        self._remove_closer: Callable[[], None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.banners: set[BannerSession] = set()
        self.session_channels = 0  # open or opening (`session_requested`)
        self._remote_refused = 0  # -R requests refused on this connection
        self._remote_logged_at: float | None = None

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.source_ip = str(peer[0]) if peer else ""
        self._frontend.servers.add(self)
        _filter_certificates(conn, self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._frontend.servers.discard(self)
        if self._expiry is not None:
            self._expiry.cancel()
        if self._remove_closer is not None:
            self._remove_closer()
        session = self.session
        if session is not None and session.ended is None:
            self._gateway.sessions.end(session, "disconnected")
        if not self.closed.done():
            self.closed.set_result(None)

    def close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _disconnect(self, message: str, code: int = asyncssh.DISC_BY_APPLICATION) -> None:
        """Disconnect now, telling the client why.

        Called from inside an auth callback, this goes out *before* the auth failure: a
        client that has no method left quits at the failure without reading on, so a message
        sent after it would never be shown. (asyncssh sends nothing once it disconnected.)
        """
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect(code, message)

    # --- authentication: shared -------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        return True  # every user must authenticate; unknown names fail like wrong passwords

    def password_auth_supported(self) -> bool:
        return False

    def _failed(self) -> bool:
        """Count a failed attempt; the last one allowed disconnects. Always False."""
        self._failures += 1
        if self._failures >= self._gateway.settings.ssh.max_auth_tries:
            self._disconnect("Too many authentication failures",
                             asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE)
        return False

    def _record(self, **fields: Any) -> bool:
        """`Gateway.record_auth` for this connection; False when it could not be recorded."""
        try:
            self._gateway.record_auth(frontend=FRONTEND, source_ip=self.source_ip, **fields)
        except AuditWriteError:
            self._disconnect("gatewayd cannot record sign-ins right now; try again later")
            return False
        return True

    def _audit_refuses(self) -> bool:
        gateway = self._gateway
        return gateway.settings.audit.on_failure == "deny" and not gateway.audit.healthy

    # --- keyboard-interactive: password + TOTP code -------------------------------------------

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> KbdIntChallenge:
        return KBDINT_CHALLENGE

    async def validate_kbdint_response(self, username: str, responses: Any) -> bool:
        answer = read_responses(responses if isinstance(responses, (list, tuple)) else ())
        if answer is None or not usable_username(username):
            self._record(user=None, ok=False, reason="malformed_response")
            return self._failed()
        if self._audit_refuses():
            self._disconnect("gatewayd cannot record sign-ins right now; try again later")
            return False
        result = await self._login(username, answer.password, answer.code)
        if not result.ok or result.principal is None:
            self._record(user=result.user or None, ok=False,
                         reason=result.detail or result.reason,
                         locked=result.reason == "locked" or result.lockout_started)
            if result.reason == "directory_unavailable":
                self._disconnect("Sign-in is temporarily unavailable; try again in a few "
                                 "minutes")
                return False
            if result.reason in ("throttled", "locked"):
                # Same words as the sign-in page: no hint whether the account exists.
                self._disconnect("Too many failed attempts. Wait a while before you try again.")
                return False
            return self._failed()
        return await self._start_session(result.principal, device=None, device_user=None)

    async def _login(self, username: str, password: str, code: str) -> LoginResult:
        gateway = self._gateway
        try:
            return await within(gateway.authenticator.login(
                username, password, code, self.source_ip, gateway.wall_clock().timestamp(),
            ), AUTH_TIMEOUT)
        except TimeoutError:
            return LoginResult(ok=False, principal=None, reason="directory_unavailable")
        except Exception:  # fail closed; the authenticator is not supposed to raise
            log.exception("authenticator failed")
            return LoginResult(ok=False, principal=None, reason="directory_unavailable")

    # --- certificates ----------------------------------------------------------------------

    def public_key_auth_supported(self) -> bool:
        return self._frontend.user_ca is not None

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Trust the CA only for a certificate the gateway's filter checked just now.

        If an asyncssh release stopped calling the connection's ``validate_public_key`` (the
        filter), nothing would have been vouched for and every certificate is refused: the
        gateway's checks can never silently drop out.
        """
        ca = self._frontend.user_ca
        vouched = self._vouched
        return (ca is not None and vouched is not None and vouched[0] == username
                and same_key(key, ca))

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False  # a plain key is one factor (the filter refuses these before here)

    async def certificate_verdict(self, username: str, key_data: bytes
                                  ) -> tuple[CertificateClaims, Principal] | None:
        """Our checks of an offered key: accepted (claims, principal) or None.

        Run for the query and again for the signed attempt: the time, revocation and
        directory checks must hold when the session starts, not when the key was first
        offered. Only refusals are remembered, per (user name, key).
        """
        if (username, key_data) in self._refused:
            return None
        verdict = await self._check_certificate(username, key_data)
        if verdict is None and len(self._refused) < MAX_PLAIN_KEYS:
            self._refused.add((username, key_data))
        return verdict

    async def _check_certificate(self, username: str, key_data: bytes
                                 ) -> tuple[CertificateClaims, Principal] | None:
        ca = self._frontend.user_ca
        parsed = decode_certificate(key_data)
        if parsed is None or ca is None:
            self._plain_keys += 1
            if self._plain_keys > MAX_PLAIN_KEYS:
                self._disconnect("Too many keys offered",
                                 asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE)
            return None  # not counted: an agent offering its keys is not an attack
        user: str | None = None
        try:
            claims = check_certificate(parsed, username=username, ca=ca,
                                       now=self._gateway.wall_clock())
            principal = await self._lookup(username)
            if principal is None:
                raise CertificateRefused("certificate_user_unknown_or_disabled")
            user = principal.user
            self._check_revocations(claims)
        except CertificateRefused as exc:
            self._record(user=user, ok=False, reason=exc.detail)
            self._failed()
            return None
        return claims, principal

    async def _lookup(self, username: str) -> Principal | None:
        authenticator = self._gateway.authenticator
        timeout = self._gateway.settings.directory.timeout.total_seconds()
        try:
            return await within(authenticator.lookup(username), timeout + 1)
        except UserBlocked:  # `gatewayd users disable`: refused like a disabled account
            raise CertificateRefused("user_blocked") from None
        except StateUnavailable:
            raise CertificateRefused("state_unavailable") from None
        except (DirectoryUnavailable, TimeoutError):
            raise CertificateRefused("directory_unavailable") from None

    def _check_revocations(self, claims: CertificateClaims) -> None:
        frontend = self._frontend
        if claims.portal_session in frontend.revoked:
            raise CertificateRefused("certificate_revoked")
        emergency = self._gateway.emergency
        if claims.device is not None and device_revoked(
                emergency.crl, emergency.index, claims.device, claims.valid_after):
            raise CertificateRefused("certificate_device_revoked")
        # Revocations live in memory: one issued before this process started may have been
        # revoked and forgotten. Fail closed unless its portal session is live.
        if issued_at(claims) < frontend.started_at \
                and frontend.portal_session(claims.portal_session) is None:
            self._banner(PREDATES_RESTART)
            raise CertificateRefused("certificate_predates_restart")

    def _banner(self, text: str) -> None:
        """An authentication banner (OpenSSH prints it before "Permission denied")."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.send_auth_banner(text)

    async def certificate_accepted(self, claims: CertificateClaims,
                                   principal: Principal) -> bool:
        """asyncssh verified the signatures too: sign in (False if no session can start).

        The session's MFA time is the portal session's (live), else the certificate's
        ``valid_after`` (issued after the portal login's TOTP check, backdated a minute):
        a certificate is never a fresh MFA, so ``mfa_max_age`` rules keep their meaning.
        """
        gateway = self._gateway
        emergency = gateway.emergency
        owner = device_owner(emergency.index, claims.device) if claims.device else None
        portal = self._frontend.portal_session(claims.portal_session)
        if portal is not None and portal.user != principal.user:
            portal = None
        try:  # again, with nothing awaited between these checks and the session's start
            check_validity(claims.valid_after, claims.valid_before, gateway.wall_clock())
            self._check_revocations(claims)
        except CertificateRefused as exc:
            self._record(user=principal.user, ok=False, reason=exc.detail)
            self._failed()
            return False
        if portal is not None:
            mfa_at = portal.mfa_at
        else:
            age = (gateway.wall_clock() - claims.valid_after).total_seconds()
            mfa_at = gateway.clock() - max(0.0, age)
        seat_of = portal or self._frontend.seat_for(claims.portal_session, principal.user)
        if seat_of is not None and not self._claim_seat(seat_of, principal.user,
                                                         claims.device):
            return False
        self.claims = claims
        started = await self._start_session(principal, device=claims.device,
                                            device_user=owner, seat_of=seat_of,
                                            certificate=claims, mfa_at=mfa_at)
        if not started:
            self.seat_claim = None
            return False
        revoked = self._frontend.revoked.reason(claims.portal_session)
        if revoked is not None and self.session is not None:  # revoked while admitted
            gateway.sessions.end(self.session, revoked)
            return False
        self._end_with_certificate(claims.valid_before)
        return True

    def _claim_seat(self, seat_of: Session, user: str, device: str | None) -> bool:
        """At most ``ssh.sessions_per_certificate_seat`` SSH sessions share a portal seat."""
        limit = self._gateway.settings.ssh.sessions_per_certificate_seat
        seat = seat_of.seat_key
        sharing = sum(1 for server in self._frontend.servers
                      if server is not self and server.seat_claim == seat
                      and (server.session is None or server.session.ended is None))
        if sharing >= limit:
            self._record(user=user, ok=False, reason="too_many_connections", device=device)
            self._disconnect(f"gatewayd: too many SSH connections for this sign-in ({limit}); "
                             "close one, then try again")
            return False
        self.seat_claim = seat
        return True

    def _end_with_certificate(self, valid_before: datetime) -> None:
        left = (valid_before - self._gateway.wall_clock()).total_seconds()
        session = self.session
        if session is None:
            return

        def expire() -> None:
            self._gateway.sessions.end(session, "expired")

        self._expiry = asyncio.get_running_loop().call_later(max(0.0, left), expire)

    # --- the session ------------------------------------------------------------------------

    async def _start_session(self, principal: Principal, *, device: str | None,
                             device_user: str | None, seat_of: Session | None = None,
                             certificate: CertificateClaims | None = None,
                             mfa_at: float | None = None) -> bool:
        gateway = self._gateway
        try:
            _, session = await gateway.sessions.admit(
                principal, frontend=FRONTEND, source_ip=self.source_ip, device=device,
                device_user=device_user, replace_oldest=True, seat_of=seat_of, mfa_at=mfa_at)
        except (SeatsFull, PerUserLimit) as exc:
            reason = "seats_full" if isinstance(exc, SeatsFull) else "per_user_limit"
            self._record(user=principal.user, ok=False, reason=reason, device=device)
            # Seats full: the very sentence of the sign-in page (`SeatsFull.__str__`).
            self._disconnect(str(exc) if isinstance(exc, SeatsFull)
                             else f"gatewayd: {exc}; try again later")
            return False
        except StateUnavailable:  # multi-node: no seat can be counted without Redis
            self._record(user=principal.user, ok=False, reason="state_unavailable",
                         device=device)
            self._disconnect("Sign-in is temporarily unavailable; try again in a few minutes")
            return False
        how = None if certificate is None else f"certificate serial {certificate.serial}"
        try:
            gateway.record_auth(frontend=FRONTEND, user=principal.user, source_ip=self.source_ip,
                                ok=True, device=device, session=session.handle, reason=how)
            gateway.audit.emit("session.start", frontend=FRONTEND, user=session.user,
                               source_ip=self.source_ip, session=session.handle, device=device,
                               reason=None if certificate is None
                               else f"portal session {certificate.portal_session}")
        except AuditWriteError:
            gateway.sessions.end(session, "logout")  # never usable: it could not be recorded
            self._disconnect("gatewayd cannot record sign-ins right now; try again later")
            return False
        gateway.metrics.sessions_active.labels(FRONTEND).set(gateway.sessions.active(FRONTEND))
        self.session = session
        self._remove_closer = session.add_closer(self._session_closed)
        return True

    def _session_closed(self, reason: str) -> None:
        """The session's closer: disconnect now, telling the client why.

        An open session channel gets the reason on stderr first: asyncssh closes channels
        before it sends the disconnect message, and a client whose last channel closed exits
        without reading on (``ssh -N`` has none and prints the disconnect message).
        """
        conn = self._conn
        if conn is None:
            return
        message = end_message(reason)
        for banner in list(self.banners):
            banner.end(message)
        with contextlib.suppress(Exception):
            conn.disconnect(asyncssh.DISC_BY_APPLICATION, message)

    # --- channels --------------------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession[str]:
        if self.session_channels >= MAX_SESSION_CHANNELS:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                f"gatewayd: at most {MAX_SESSION_CHANNELS} session channels per connection")
        self.session_channels += 1  # until the channel closes (`BannerSession`)
        return BannerSession(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        session, conn = self.session, self._conn
        if session is None or session.ended is not None or conn is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "gatewayd: the session has ended")
        if self._frontend.draining:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "gatewayd: the gateway is shutting down")
        if self._frontend.tunnels.cut_off(session):  # opens read after that disconnect
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "gatewayd: too many refused tunnel requests")
        return self._open_tunnel(session, conn, (dest_host, dest_port), (orig_host, orig_port))

    async def _open_tunnel(self, session: Session, conn: asyncssh.SSHServerConnection,
                           dest: tuple[str, int], orig: tuple[str, int],
                           ) -> asyncssh.SSHTCPSession[bytes]:
        try:
            return await self._frontend.tunnels.open(
                session, conn, dest_host=dest[0], dest_port=dest[1],
                orig_host=orig[0], orig_port=orig[1])
        except asyncssh.ChannelOpenError:
            raise
        except Exception:
            log.exception("tunnel open failed unexpectedly")
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            "gatewayd: internal error") from None

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        """-R is refused; logged at most once per `REMOTE_LOG_INTERVAL` per connection."""
        self._remote_refused += 1
        now = self._gateway.clock()
        if self._remote_logged_at is None \
                or now - self._remote_logged_at >= REMOTE_LOG_INTERVAL:
            self._remote_logged_at = now
            log.info("ssh: refused remote forwarding (-R) for %s from %s (%d so far on this "
                     "connection)", self.session.user if self.session else "?",
                     self.source_ip, self._remote_refused)
        return False

    def unix_connection_requested(self, dest_path: str) -> asyncssh.SSHUNIXSession[bytes]:
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "gatewayd carries TCP tunnels only (no UNIX socket forwarding)")

    def unix_server_requested(self, listen_path: str) -> bool:
        return False

    def tun_requested(self, unit: int | None) -> asyncssh.SSHTunTapSession:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "gatewayd carries TCP tunnels only (no tun/tap)")

    def tap_requested(self, unit: int | None) -> asyncssh.SSHTunTapSession:
        return self.tun_requested(unit)

    # --- what the banner shows -----------------------------------------------------------------

    def banner(self) -> str:
        session = self.session
        if session is None:
            return ""
        gateway = self._gateway
        registry = gateway.sessions
        now = gateway.clock()
        left = registry.absolute_timeout - (now - session.created)
        if self.claims is not None:
            left = min(left, (self.claims.valid_before - gateway.wall_clock()).total_seconds())
        expires = (gateway.wall_clock() + timedelta(seconds=max(0.0, left))).astimezone(
            gateway.policy.timezone)  # the ward's time, as its policy rules are written
        try:
            services = self._frontend.tunnels.services_for(session)
        except Exception:
            log.exception("listing reachable services failed")
            services = []
        return render_banner(user=session.user, device=session.device, services=services,
                             expires=expires,
                             idle_minutes=round(registry.idle_timeout / 60))


def end_message(reason: str) -> str:
    """What the client is told when its session ends."""
    texts = {
        "idle_timeout": "no tunnel traffic for too long (idle timeout)",
        "expired": "the session reached its maximum lifetime; sign in again",
        "admin_kill": "ended by an administrator",
        "replaced": "you signed in again elsewhere",
        "shutdown": "the gateway is shutting down",
        "device_revoked": "this device's certificate was revoked",
        "user_disabled": "your account was disabled",
        "directory_revoked": "your account is no longer enabled",
        "logout": "you signed out of the portal",
    }
    return f"gatewayd: session ended: {texts.get(reason, reason)}"


def render_banner(*, user: str, device: str | None, services: list[tuple[str, str]],
                  expires: datetime, idle_minutes: int) -> str:
    """The text a session channel shows (plain lines, ``\\n`` endings)."""
    lines = [f"gatewayd: signed in as {user}"
             + (f" on device {device}" if device else " (no registered device)") + ".",
             f"Session ends at {expires:%Y-%m-%d %H:%M %Z} at the latest, or after "
             f"{idle_minutes} minutes without tunnel traffic."]
    if services:
        lines.append("You may open tunnels to:")
        width = max(len(name) for name, _ in services)
        lines += [f"  {name.ljust(width)}  {dest}" for name, dest in services]
        lines.append("Example: ssh -N -L 4445:" + services[0][1] + " <this gateway>")
    else:
        lines.append("Your access policy allows no tunnels right now.")
    lines.append("No shell or commands here. Disconnect with ~. (Enter, tilde, dot).")
    return "\n".join(lines) + "\n"


class BannerSession(asyncssh.SSHServerSession[str]):
    """A "session" channel: the banner, then nothing until the session ends.

    A shell request gets the banner and the channel stays open (stdin is read and dropped);
    exec and subsystem requests are accepted only to say why nothing runs, then exit 126.
    """

    def __init__(self, server: GatewayServer) -> None:
        self._server = server
        self._chan: asyncssh.SSHServerChannel[str] | None = None
        self._pty = False
        self._refuse = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self._chan = chan
        self._server.banners.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.banners.discard(self)
        self._server.session_channels -= 1

    def end(self, message: str) -> None:
        """The session ended: say why on stderr and close with exit status 255."""
        chan, self._chan = self._chan, None
        self._server.banners.discard(self)
        if chan is None:
            return
        newline = "\r\n" if self._pty else "\n"
        with contextlib.suppress(Exception):
            chan.write_stderr(newline + message + newline)
            chan.exit(255)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self._pty = True
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._refuse = True
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._refuse = True
        return True

    def session_started(self) -> None:
        chan = self._chan
        if chan is None:
            return
        newline = "\r\n" if self._pty else "\n"
        if self._refuse:
            chan.write_stderr(REFUSED_COMMAND.replace("\n", newline))
            chan.exit(EXIT_REFUSED)
            return
        chan.write(self._server.banner().replace("\n", newline))

    def data_received(self, data: str, datatype: int | None) -> None:
        return None  # stdin is ignored: nothing here reads commands

    def eof_received(self) -> bool:
        return True  # keep our side open: the channel lives as long as the session

    def break_received(self, msec: int) -> bool:
        return False


def _filter_certificates(conn: asyncssh.SSHServerConnection, server: GatewayServer) -> None:
    """Run the gateway's certificate checks before asyncssh's own (see the module docstring).

    asyncssh's public-key auth calls ``conn.validate_public_key(username, key_data, msg,
    signature)`` for each offered key (``msg`` empty for a query, set for the signed
    attempt). The filter refuses what `GatewayServer.certificate_verdict` refuses, lets
    asyncssh verify the rest, and signs the user in once asyncssh verified a signed attempt.
    """
    original = conn.validate_public_key

    async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        verdict = await server.certificate_verdict(username, key_data)
        if verdict is None:
            return False
        server._vouched = (username, key_data)  # what `validate_ca_key` may say yes to
        try:
            valid = await original(username, key_data, msg, signature)
        finally:
            server._vouched = None
        if not valid:
            if msg:
                server._failed()  # our checks passed, a signature did not
            return False
        return (await server.certificate_accepted(*verdict)) if msg else True

    setattr(conn, "validate_public_key", validate)  # noqa: B010 - an instance attribute
