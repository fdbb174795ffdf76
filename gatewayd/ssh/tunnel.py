"""The tunnel broker: every ``direct-tcpip`` open (``ssh -L`` and ``ssh -D``) is decided,
connected, relayed, counted and closed here.

One open, in order (`Tunnels.open`)::

    policy.tcp_service_for(host, port, user attributes)   which service (None: "no service at")
    decide(AccessRequest(..., frontend="ssh"))            one call; deny and step_up refuse
    ssh.address_overrides[host:port]                      operator-explicit: connect there
      or getaddrinfo (own threads, with a timeout)        every address must be safe (below)
    connect to an address that was checked                no second resolution (DNS rebinding)
    tunnel.open + gatewayd_tunnels_active                 then bytes flow both ways
    ... tunnel.close                                      bytes each way, duration, reason

**Refusals** raise `TunnelRefused`, an ``asyncssh.ChannelOpenError``: asyncssh sends its code
and reason to the client as the channel-open failure (the OpenSSH client prints
``open failed: administratively prohibited: <reason>``). Every refusal after the session was
found is audited as ``tunnel.deny`` with ``dest``, ``service``, ``rule``, ``reason`` and a
``status`` word saying which step refused:

* ``no_service`` — host:port is no destination of any TCP service for this user (user A's
  ``{user.office_pc}`` is not one of user B's destinations); ``denied`` — a deny decision;
  ``step_up`` — an allow rule matched but wants fresher MFA: a tunnel cannot show a step-up
  page, so it is refused with "needs a fresh MFA login";
* ``unsafe_destination`` — the name resolves to loopback, link-local, unspecified, multicast,
  reserved or one of the gateway's own addresses (interface addresses and listeners). Any
  one such address refuses the whole open, unless the service lists that IP literal itself;
  an address override is the operator's explicit choice and is not checked;
* ``limit`` — code ``OPEN_RESOURCE_SHORTAGE``: the session already has
  `MAX_TUNNELS_PER_SESSION` tunnels open or opening, or too many name lookups are in
  progress (below; ``error`` ``dns_busy``);
* ``unreachable`` — allowed, but the name does not resolve or nothing answers: the refusal
  code is ``OPEN_CONNECT_FAILED`` and the record carries the rule that allowed it and
  ``error`` (``connection_refused``, ``timeout``, ``no_route``, ``dns``, ...). The allowed
  decision itself shows in ``gatewayd_policy_decisions_total{decision="allow"}``;
* ``error`` — an unexpected failure in the gateway (logged with its traceback): refused with
  ``OPEN_CONNECT_FAILED`` "internal error", never an allow.

All other refusals use ``OPEN_ADMINISTRATIVELY_PROHIBITED``.

**Refusal budget.** A client can ask for refused opens as fast as it can send packets (a scan
through ``-D``, a script looping on a denied port): each would be one ``tunnel.deny``. A
session may have `REFUSALS_PER_WINDOW` refused opens within `REFUSAL_WINDOW` seconds; the next
one disconnects the connection ("too many refused tunnel requests") and is audited as one
``tunnel.deny`` with status ``rate_limited`` and the count in its reason instead of its own
record. The refusals before it keep their records; opens the connection still had in flight
or asyncssh still reads after the disconnect are refused without a record, as on an ended
session (`Tunnels.cut_off`: the SSH server checks it before it starts an open).

**Name lookups** run on the broker's own `RESOLVER_THREADS` threads, never on asyncio's
default executor, which the TOTP store and the file directory use: a resolver that stops
answering stalls tunnel opens, never sign-ins. A session may have `LOOKUPS_PER_SESSION`
lookups in progress and all sessions together `LOOKUPS_IN_PROGRESS` (running or waiting for a
thread; a lookup counts until its thread returns, even after its open timed out); beyond that
an open is refused at once, "too many name lookups in progress". `Tunnels.close` stops the
threads (the Gateway's stop). An override to an IP literal needs no lookup.

A connect can take seconds: if
the session ends meanwhile the open is refused, and if a reload replaced the policy the open
is decided once more (``denied`` when the new policy says no) — `recheck` only sees tunnels
that have started. Refused without a record: opens on a session that has ended, and, with
``audit.on_failure = "deny"``, opens while the audit log is down or whose ``tunnel.open``
cannot be written (nothing happens unrecorded).

**The relay** (`Tunnel`) is two callback objects and no task: the channel's session object
writes client bytes straight to the upstream transport, the upstream protocol writes to the
channel — no await, no queue, no copy of ours per chunk. Flow control both ways: a full
upstream write buffer pauses reading the channel (the client's SSH window then closes), a full
channel send buffer (the client does not read) pauses reading the upstream socket. EOF passes
through each way (half-close); when both sides have sent it the tunnel closes. Bytes are
counted per chunk as one integer addition; the session's counters, the byte metrics and the
session's idle timer (`SessionRegistry.touch`) are updated at most once a second and at close
(metric children are resolved once per tunnel). ``Session.open_tunnels`` counts open tunnels.

**Memory per tunnel, worst case** (both ends stop reading, measured in
``test_slow_upstream_pauses_the_client`` / ``test_slow_client_pauses_the_upstream``):

* client → upstream: asyncssh's receive buffer of the channel holds at most the channel window
  (``ssh.window``, 8 MiB by default: pausing the channel stops window adjustments, so the
  client cannot send more), plus the upstream write buffer: `UPSTREAM_HIGH_WATER` plus one
  SSH packet (``ssh.max_packet_size``);
* upstream → client: the channel's send buffer, `CHANNEL_HIGH_WATER` plus one read (256 KiB);
* and the kernel's socket buffers of the upstream socket (autotuned, a few MiB at most).

So about window + 1 MiB per tunnel (9 MiB by default), times `MAX_TUNNELS_PER_SESSION` (32)
per session: about 290 MiB for one session whose tunnels all stall on purpose. A lower
``ssh.window`` lowers it in proportion, at the cost of bulk throughput on long paths.

**Closing**: ``tunnel.close`` with ``bytes_up`` (client → upstream), ``bytes_down``,
``duration_ms``, ``rule`` and ``reason``: ``client_closed`` / ``upstream_closed`` (whoever
ended first: closed the channel or socket, or sent EOF first), ``error`` (with ``error``), the
session's end reason (every tunnel registers a session closer: logout, kill, expiry, revoke,
shutdown abort its channel at once), or ``policy_changed`` (`Tunnels.recheck`: the current
policy now denies it — after a reload, and every 10 s from `Tunnels.recheck_forever` for rules
with hours and weekdays; only a *deny* closes: MFA freshness is judged at open, as for HTTPS).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol, cast

import asyncssh
from prometheus_client import Counter

from gatewayd.audit import AuditLog, AuditWriteError
from gatewayd.config import Settings
from gatewayd.metrics import Metrics
from gatewayd.policy import AccessRequest, Decision, Policy, TcpService, decide
from gatewayd.policy.values import canonical_host
from gatewayd.sessions import Session, SessionRegistry
from gatewayd.ssh.destinations import (
    IPAddress,
    OwnAddresses,
    allowed_destinations,
    explicitly_named,
    override_table,
    own_addresses_from_proc,
    show_dest,
    unsafe_kind,
)

log = logging.getLogger(__name__)

FRONTEND: Final = "ssh"
PROHIBITED: Final = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
CONNECT_FAILED: Final = asyncssh.OPEN_CONNECT_FAILED
RESOURCE_SHORTAGE: Final = asyncssh.OPEN_RESOURCE_SHORTAGE
INTERNAL_ERROR_DECISION: Final = Decision("deny", None, "internal error while deciding")

RESOLVE_TIMEOUT: Final = 5.0  # seconds for getaddrinfo
CONNECT_TIMEOUT: Final = 10.0  # seconds for all connection attempts of one open together
CONFIRM_TIMEOUT: Final = 30.0  # an upstream whose channel never opened is closed after this
# Tunnels one session may have open or opening at once. A staff PC needs a handful (SMB,
# mail, RDP; a browser behind ``ssh -D`` a few more); each may hold a channel window of
# buffered data (see "Memory per tunnel" above).
MAX_TUNNELS_PER_SESSION: Final = 32
# Refused opens one session may have within REFUSAL_WINDOW seconds; one more disconnects.
REFUSALS_PER_WINDOW: Final = 30
REFUSAL_WINDOW: Final = 60.0
TOO_MANY_REFUSALS: Final = "too many refused tunnel requests"
# The broker's own getaddrinfo threads, and how many lookups may be in progress (running or
# waiting for a thread) per session and in all.
RESOLVER_THREADS: Final = 4
LOOKUPS_PER_SESSION: Final = 4
LOOKUPS_IN_PROGRESS: Final = 4 * RESOLVER_THREADS
RECHECK_INTERVAL: Final = 10.0  # seconds between re-decisions of open tunnels (hours rules)
FLUSH_INTERVAL: Final = 1.0  # seconds between session/metric updates while bytes flow
# Write-buffer high-water marks (bytes). One asyncio read is at most 256 KiB, so a buffer
# holds at most about twice this before the other side stops reading.
UPSTREAM_HIGH_WATER: Final = 256 * 1024
CHANNEL_HIGH_WATER: Final = 256 * 1024
PROC_FILES: Final = (Path("/proc/net/fib_trie"), Path("/proc/net/if_inet6"),
                     Path("/proc/net/ipv6_route"))

_ERRNO_WORDS: Final = MappingProxyType({
    errno.ECONNREFUSED: ("connection_refused", "connection refused"),
    errno.ETIMEDOUT: ("timeout", "timed out"),
    errno.EHOSTUNREACH: ("no_route", "no route to host"),
    errno.ENETUNREACH: ("no_route", "network unreachable"),
    errno.ECONNRESET: ("connection_reset", "connection reset"),
})


class TunnelContext(Protocol):
    """The gateway as the tunnel broker sees it (`gatewayd.app.Gateway` satisfies it). Read
    at every call, never cached: a reload swaps ``settings`` and ``policy``."""

    @property
    def settings(self) -> Settings: ...
    @property
    def policy(self) -> Policy: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def sessions(self) -> SessionRegistry: ...

    def clock(self) -> float: ...
    def wall_clock(self) -> datetime: ...


class TunnelRefused(asyncssh.ChannelOpenError):
    """An open is refused: ``code`` is an SSH open-failure code, ``reason`` the client's text.

    A ``ChannelOpenError``, so asyncssh turns it into the channel-open failure by itself when
    `Tunnels.open` is returned from ``connection_requested``.
    """


class _Refusal(Exception):  # noqa: N818 - internal signal, turned into a TunnelRefused
    """An open refused after the session was found: audited as tunnel.deny, then refused."""

    def __init__(self, code: int, reason: str, status: str, *, service: str | None = None,
                 rule: str | None = None, error: str | None = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.status = code, reason, status
        self.service, self.rule, self.error = service, rule, error

    def of(self, service: str, rule: str | None) -> _Refusal:
        """The same refusal, for the service and rule that had allowed the open."""
        return _Refusal(self.code, self.reason, self.status, service=service, rule=rule,
                        error=self.error)


@dataclass(slots=True)
class _RefusalBudget:
    """One session's refused opens: when the last `REFUSALS_PER_WINDOW` happened."""

    times: deque[float]
    exhausted: bool = False  # the connection was disconnected for too many refusals


@dataclass(frozen=True, slots=True)
class _Target:
    """Where to connect: the checked addresses, in the order to try them, and the port."""

    addresses: tuple[IPAddress, ...]
    port: int


def session_fields(session: Session) -> dict[str, object]:
    """The audit context of a session's tunnels: who, from where, on which device."""
    return {"frontend": FRONTEND, "user": session.user, "session": session.handle,
            "device": session.device, "source_ip": session.source_ip}


class Tunnels:
    """The tunnel broker of one gateway (see module docstring)."""

    def __init__(self, *, gateway: TunnelContext, resolve_timeout: float = RESOLVE_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 confirm_timeout: float = CONFIRM_TIMEOUT,
                 max_per_session: int = MAX_TUNNELS_PER_SESSION,
                 refusals_per_window: int = REFUSALS_PER_WINDOW,
                 refusal_window: float = REFUSAL_WINDOW,
                 resolver_threads: int = RESOLVER_THREADS,
                 lookups_per_session: int = LOOKUPS_PER_SESSION,
                 lookups_in_progress: int = LOOKUPS_IN_PROGRESS) -> None:
        self._gateway = gateway
        self._resolve_timeout = resolve_timeout
        self._connect_timeout = connect_timeout
        self.confirm_timeout = confirm_timeout
        self.max_per_session = max_per_session
        self._open: dict[Session, set[Tunnel]] = {}
        self._opening: dict[Session, int] = {}  # opens still resolving or connecting
        self._refusals_per_window = refusals_per_window
        self._refusal_window = refusal_window
        self._budgets: weakref.WeakKeyDictionary[Session, _RefusalBudget] = (
            weakref.WeakKeyDictionary())
        # Threads start on first use; `close` stops them.
        self._resolver = ThreadPoolExecutor(max_workers=resolver_threads,
                                            thread_name_prefix="gatewayd-resolve")
        self._lookups_per_session = lookups_per_session
        self._lookups_in_progress = lookups_in_progress
        self._lookups: dict[Session, int] = {}  # per session, until the thread returns
        self._lookups_total = 0

    def close(self) -> None:
        """Stop the resolver threads (the Gateway's stop): queued lookups are dropped, a
        running getaddrinfo is left to finish on its own."""
        self._resolver.shutdown(wait=False, cancel_futures=True)

    def cut_off(self, session: Session) -> bool:
        """True once the session's connection was disconnected for too many refused opens:
        opens it still sends are refused before any work (see "Refusal budget")."""
        budget = self._budgets.get(session)
        return budget is not None and budget.exhausted

    @property
    def lookups_in_progress(self) -> int:
        """Name lookups running or waiting for a resolver thread (for tests and listings)."""
        return self._lookups_total

    def __len__(self) -> int:
        return sum(len(tunnels) for tunnels in self._open.values())

    def tunnels_of(self, session: Session) -> list[Tunnel]:
        """The session's open tunnels (for listings and tests)."""
        return list(self._open.get(session, ()))

    # --- what a user may reach -----------------------------------------------------------

    def services_for(self, session: Session) -> list[tuple[str, str]]:
        """(service, "host:port") the session's user may open now, in policy order."""
        template = self._access(session, None, None, None)
        if template is None:
            return []
        return [(allowed.service, allowed.destination)
                for allowed in allowed_destinations(self._gateway.policy, template)]

    # --- re-deciding open tunnels --------------------------------------------------------

    def recheck(self, session: Session) -> int:
        """Close the session's tunnels the current policy denies (``policy_changed``);
        returns how many. Only a deny closes: MFA freshness was judged at open."""
        closed = 0
        policy = self._gateway.policy
        for tunnel in self.tunnels_of(session):
            _, decision = self._decide(policy, session, tunnel.dest_host, tunnel.dest_port)
            if decision.decision == "deny":
                tunnel.abort("policy_changed")
                closed += 1
        return closed

    def recheck_all(self) -> int:
        """`recheck` every session with open tunnels (after a reload, and periodically for
        rules with hours and weekdays)."""
        return sum(self.recheck(session) for session in list(self._open))

    async def recheck_forever(self, interval: float = RECHECK_INTERVAL) -> None:
        """`recheck_all` every ``interval`` seconds (run as a named task of the SSH frontend):
        a deny rule with ``hours`` or ``weekdays`` closes open tunnels when its time comes,
        as it closes WebSockets."""
        while True:
            await asyncio.sleep(interval)
            try:
                closed = self.recheck_all()
            except Exception:  # keep rechecking; one bad round must not end the task
                log.exception("tunnel policy recheck failed")
            else:
                if closed:
                    log.info("closed %d tunnel(s) the policy now denies", closed)

    # --- opening -------------------------------------------------------------------------

    async def open(self, session: Session, conn: asyncssh.SSHServerConnection, *,
                   dest_host: str, dest_port: int, orig_host: str,
                   orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        """Decide, connect and hand back the channel's session object; or raise TunnelRefused.

        ``orig_host``/``orig_port`` are the client's claim of where the connection came from
        on its side; they decide nothing. ``conn`` is the SSH connection the channel is on.
        """
        if self.cut_off(session):  # being disconnected: no more work
            raise TunnelRefused(PROHIBITED, TOO_MANY_REFUSALS)
        dest = show_dest(dest_host, dest_port)
        busy = len(self._open.get(session, ())) + self._opening.get(session, 0)
        if busy >= self.max_per_session:
            raise self._refuse(session, conn, dest, _Refusal(
                RESOURCE_SHORTAGE, f"too many tunnels in this session (at most "
                                   f"{self.max_per_session} at once)", "limit"))
        self._opening[session] = self._opening.get(session, 0) + 1
        try:
            return await self._open_checked(session, dest_host, dest_port, dest)
        except _Refusal as refusal:
            raise self._refuse(session, conn, dest, refusal) from None
        except (TunnelRefused, asyncio.CancelledError):
            raise
        except Exception:  # fail closed: a bug refuses this open, never the whole connection
            log.exception("tunnel open failed unexpectedly")
            raise self._refuse(session, conn, dest, _Refusal(
                CONNECT_FAILED, "internal error", "error")) from None
        finally:
            left = self._opening.pop(session) - 1
            if left:
                self._opening[session] = left

    async def _open_checked(self, session: Session, dest_host: str, dest_port: int,
                            dest: str) -> Tunnel:
        gateway = self._gateway
        if gateway.settings.audit.on_failure == "deny" and not gateway.audit.healthy:
            raise TunnelRefused(PROHIBITED, "the audit log is unavailable; no new tunnels")
        if session.ended is not None:
            raise TunnelRefused(PROHIBITED, "the session has ended")
        policy = gateway.policy
        service, decision = self._decide(policy, session, dest_host, dest_port)
        gateway.metrics.policy_decision(FRONTEND, service, decision.decision)
        if service is None:
            raise _Refusal(PROHIBITED, f"no service at {dest}", "no_service")
        if decision.decision == "step_up":
            raise _Refusal(PROHIBITED, f"{dest} needs a fresh MFA login ({decision.reason})",
                           "step_up", service=service, rule=decision.rule)
        if decision.decision != "allow":
            raise _Refusal(PROHIBITED, f"{dest} refused: {decision.reason}", "denied",
                           service=service, rule=decision.rule)
        host = canonical_host(dest_host)
        assert host is not None  # tcp_service_for found a service for it
        tunnel = Tunnel(self, gateway, session=session, service=service, rule=decision.rule,
                        dest_host=host, dest_port=dest_port, dest=dest)
        try:
            target = await self._target(session, policy.services.get(service), host,
                                        dest_port, dest)
            await self._connect(tunnel, target, dest)
        except _Refusal as refusal:
            raise refusal.of(service, decision.rule) from None
        self._still_allowed(tunnel, policy)
        self._start(tunnel)
        return tunnel

    def _still_allowed(self, tunnel: Tunnel, policy: Policy) -> None:
        """After the connect (seconds, maybe): the session may have ended, or a reload may
        have replaced the policy — `recheck` cannot see an open that is not started yet."""
        session = tunnel.session
        if session.ended is not None:
            tunnel.discard()
            raise TunnelRefused(PROHIBITED, "the session has ended")
        current = self._gateway.policy
        if current is policy:
            return
        _, decision = self._decide(current, session, tunnel.dest_host, tunnel.dest_port)
        if decision.decision == "deny":
            tunnel.discard()
            raise _Refusal(PROHIBITED, f"{tunnel.dest} refused: {decision.reason}", "denied",
                           service=tunnel.service, rule=decision.rule)

    def _access(self, session: Session, service: str | None, host: str | None,
                port: int | None) -> AccessRequest | None:
        try:
            source = ipaddress.ip_address(session.source_ip)
        except ValueError:
            return None  # no usable peer address: "source" rules could not be judged
        principal = session.principal
        gateway = self._gateway
        return AccessRequest(
            user=principal.user, groups=principal.groups, attributes=principal.attributes,
            device=session.device, device_user=session.device_user, frontend=FRONTEND,
            service=service, dest_host=host, dest_port=port, source=source,
            now=gateway.wall_clock(), mfa_age=session.mfa_age(gateway.clock()),
        )

    def _decide(self, policy: Policy, session: Session, host: str,
                port: int) -> tuple[str | None, Decision]:
        """The service host:port belongs to for this user, and the decision (one decide())."""
        attributes = session.principal.attributes
        service = policy.tcp_service_for(host, port, attributes) if 0 < port <= 65535 else None
        access = self._access(session, service, host, port)
        if access is None:
            return service, INTERNAL_ERROR_DECISION
        try:
            return service, decide(policy, access)
        except Exception:  # fail closed: a bug in policy evaluation is a deny
            log.exception("decide() failed; denying the tunnel")
            return service, INTERNAL_ERROR_DECISION

    # --- where to connect ----------------------------------------------------------------

    async def _target(self, session: Session, service: object, host: str, port: int,
                      dest: str) -> _Target:
        override = override_table(self._gateway.settings.ssh.address_overrides).get((host, port))
        if override is not None:  # the operator named the address: connect there, unchecked
            literal = _ip_literal(override[0])
            if literal is not None:
                return _Target((literal,), override[1])
            addresses, _ = await self._lookup(session, override[0], override[1], dest,
                                              own=False)
            return _Target(addresses, override[1])
        addresses, own = await self._lookup(session, host, port, dest, own=True)
        if isinstance(service, TcpService) and explicitly_named(service, host, port):
            return _Target(addresses, port)  # the service writes this IP literal itself
        own = own.union(self._listen_addresses())
        for address in addresses:
            kind = unsafe_kind(address, own)
            if kind is not None:
                raise _Refusal(PROHIBITED, f"{dest} refused: it resolves to {kind}",
                               "unsafe_destination")
        return _Target(addresses, port)

    async def _lookup(self, session: Session, host: str, port: int, dest: str,
                      *, own: bool) -> tuple[tuple[IPAddress, ...], OwnAddresses]:
        """Resolve on the resolver threads (and read the gateway's own addresses in the same
        hop); refused at once when too many lookups are in progress."""
        if self._lookups_total >= self._lookups_in_progress \
                or self._lookups.get(session, 0) >= self._lookups_per_session:
            raise _Refusal(RESOURCE_SHORTAGE, "too many name lookups in progress", "limit",
                           error="dns_busy")
        loop = asyncio.get_running_loop()
        work: Future[tuple[tuple[IPAddress, ...], OwnAddresses]]
        work = self._resolver.submit(_resolve, host, port, own)
        self._lookups_total += 1
        self._lookups[session] = self._lookups.get(session, 0) + 1

        def returned(_: object) -> None:  # in the resolver thread (or here, if cancelled)
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to count
                loop.call_soon_threadsafe(self._lookup_done, session)

        work.add_done_callback(returned)
        try:
            async with asyncio.timeout(self._resolve_timeout):
                addresses, mine = await asyncio.wrap_future(work)
        except TimeoutError:
            raise _Refusal(CONNECT_FAILED, f"{dest} is unreachable: name resolution timed out",
                           "unreachable", error="dns_timeout") from None
        except (socket.gaierror, UnicodeError):
            addresses, mine = (), OwnAddresses()
        if not addresses:
            raise _Refusal(CONNECT_FAILED, f"{dest} is unreachable: the name does not resolve",
                           "unreachable", error="dns")
        return addresses, mine

    def _lookup_done(self, session: Session) -> None:
        self._lookups_total -= 1
        left = self._lookups.pop(session) - 1
        if left:
            self._lookups[session] = left

    def _listen_addresses(self) -> Iterable[IPAddress]:
        settings = self._gateway.settings
        for listen in (settings.ssh.listen, settings.https.listen, settings.metrics.listen):
            try:
                yield ipaddress.ip_address(listen.host)
            except ValueError:
                continue  # a name: the interface addresses cover what it is bound to

    async def _connect(self, tunnel: Tunnel, target: _Target, dest: str) -> None:
        """Connect to the first checked address that answers (no name is resolved here)."""
        loop = asyncio.get_running_loop()
        failure: OSError | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                for address in target.addresses:
                    try:
                        await loop.create_connection(tunnel.upstream_protocol, str(address),
                                                     target.port)
                    except OSError as exc:
                        failure = exc
                    else:
                        return
        except TimeoutError:
            failure = TimeoutError(errno.ETIMEDOUT, "timed out")
        word, text = describe_os_error(failure)
        raise _Refusal(CONNECT_FAILED, f"{dest} is unreachable: {text}", "unreachable",
                       error=word)

    # --- bookkeeping ---------------------------------------------------------------------

    def _start(self, tunnel: Tunnel) -> None:
        try:
            self._gateway.audit.emit("tunnel.open", **tunnel.fields(), rule=tunnel.rule)
        except AuditWriteError:
            tunnel.discard()
            raise TunnelRefused(PROHIBITED, "the audit log is unavailable; no new tunnels"
                                ) from None
        self._open.setdefault(tunnel.session, set()).add(tunnel)
        tunnel.started()

    def forget(self, tunnel: Tunnel) -> None:
        """A tunnel has closed (called by the tunnel)."""
        tunnels = self._open.get(tunnel.session)
        if tunnels is not None:
            tunnels.discard(tunnel)
            if not tunnels:
                del self._open[tunnel.session]

    def _refuse(self, session: Session, conn: asyncssh.SSHServerConnection | None, dest: str,
                refusal: _Refusal) -> TunnelRefused:
        """Audit a refused open within the session's refusal budget (module docstring); past
        it, write one ``rate_limited`` record and disconnect. Returns what to raise."""
        budget = self._budgets.get(session)
        if budget is None:
            budget = _RefusalBudget(deque(maxlen=self._refusals_per_window))
            self._budgets[session] = budget
        if budget.exhausted:
            return TunnelRefused(refusal.code, refusal.reason)
        now = self._gateway.clock()
        times = budget.times
        if len(times) < self._refusals_per_window or now - times[0] >= self._refusal_window:
            times.append(now)
            self._audit_deny(session, dest, refusal)
            return TunnelRefused(refusal.code, refusal.reason)
        budget.exhausted = True
        summary = _Refusal(
            PROHIBITED, f"{TOO_MANY_REFUSALS}: {len(times) + 1} within "
                        f"{self._refusal_window:g} s; disconnected", "rate_limited",
            service=refusal.service, rule=refusal.rule, error=refusal.status)
        self._audit_deny(session, dest, summary)
        log.warning("ssh: disconnected %s from %s: %s", session.user, session.source_ip,
                    TOO_MANY_REFUSALS)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"gatewayd: {TOO_MANY_REFUSALS}")
        return TunnelRefused(PROHIBITED, TOO_MANY_REFUSALS)

    def _audit_deny(self, session: Session, dest: str, refusal: _Refusal) -> None:
        try:
            self._gateway.audit.emit(
                "tunnel.deny", **session_fields(session), dest=dest, service=refusal.service,
                rule=refusal.rule, reason=refusal.reason, status=refusal.status,
                error=refusal.error)
        except AuditWriteError:
            log.error("tunnel.deny could not be audited")  # refused anyway


def _ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is one (no lookup needed), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int, own: bool) -> tuple[tuple[IPAddress, ...], OwnAddresses]:
    """getaddrinfo (blocking; run in a thread), and the local addresses when ``own``."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = tuple(dict.fromkeys(
        ipaddress.ip_address(info[4][0]) for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6)))
    return addresses, (local_addresses(addresses) if own else OwnAddresses())


def local_addresses(candidates: Iterable[IPAddress] = ()) -> OwnAddresses:
    """The gateway's own addresses, read fresh from the kernel (blocking; a few /proc reads).

    Without Linux's /proc, each candidate is probed instead: binding a socket to an address
    succeeds only for an address of this host.
    """
    texts = []
    for path in PROC_FILES:
        try:
            texts.append(path.read_text(encoding="ascii", errors="replace"))
        except OSError:
            texts.append("")
    own = own_addresses_from_proc(*texts)
    if own.networks:
        return own
    return OwnAddresses().union(a for a in candidates if _bindable(a))


def _bindable(address: IPAddress) -> bool:
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def describe_os_error(exc: BaseException | None) -> tuple[str, str]:
    """(audit word, text for the client) for a failed connection."""
    words = _ERRNO_WORDS.get(exc.errno) if isinstance(exc, OSError) and exc.errno else None
    if words is not None:
        return words
    if isinstance(exc, ConnectionRefusedError):
        return _ERRNO_WORDS[errno.ECONNREFUSED]
    if isinstance(exc, TimeoutError):
        return _ERRNO_WORDS[errno.ETIMEDOUT]
    if isinstance(exc, OSError) and exc.strerror:
        return "connect_failed", exc.strerror.lower()
    return "connect_failed", "connection failed"


def _nothing() -> None:
    return None


class _Upstream(asyncio.Protocol):
    """The upstream socket's protocol: every callback goes to its `Tunnel`."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection always hands a stream transport; uvloop's implements the
        # asyncio.Transport interface without subclassing it, so no isinstance check here.
        self._tunnel.upstream_connected(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._tunnel.from_upstream(data)

    def eof_received(self) -> bool:
        return self._tunnel.upstream_eof()

    def pause_writing(self) -> None:
        self._tunnel.upstream_full()

    def resume_writing(self) -> None:
        self._tunnel.upstream_drained()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tunnel.upstream_lost(exc)


class Tunnel(asyncssh.SSHTCPSession[bytes]):
    """One open tunnel: the SSH channel's session object, relaying to its upstream socket.

    ``up`` is client → upstream, ``down`` upstream → client. `closed` is the close reason
    once the tunnel has ended (its ``tunnel.close`` is written then).
    """

    def __init__(self, owner: Tunnels, gateway: TunnelContext, *, session: Session,
                 service: str, rule: str | None, dest_host: str, dest_port: int,
                 dest: str) -> None:
        self._owner = owner
        self._gateway = gateway
        self.session = session
        self.service = service
        self.rule = rule
        self.dest_host, self.dest_port, self.dest = dest_host, dest_port, dest
        self.opened_at = gateway.clock()
        self.bytes_up = 0
        self.bytes_down = 0
        self.closed: str | None = None
        self._loop_time = asyncio.get_running_loop().time
        self._counted_up = 0
        self._counted_down = 0
        self._next_flush = 0.0
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._upstream: asyncio.Transport | None = None
        self._eof_from_client = False
        self._eof_from_upstream = False
        self._first_end: str | None = None  # who ended first: client_closed / upstream_closed
        self._remove_closer: Callable[[], None] = _nothing
        self._watchdog: asyncio.TimerHandle | None = None
        self._active: Callable[[float], None] | None = None
        self._up_counter: Counter | None = None
        self._down_counter: Counter | None = None

    def fields(self) -> dict[str, object]:
        return {**session_fields(self.session), "dest": self.dest, "service": self.service}

    def upstream_protocol(self) -> asyncio.Protocol:
        return _Upstream(self)

    @property
    def channel_buffered(self) -> int:
        """Bytes waiting in the channel's send buffer (upstream → client)."""
        return self._chan.get_write_buffer_size() if self._chan is not None else 0

    @property
    def upstream_buffered(self) -> int:
        """Bytes waiting in the upstream socket's write buffer (client → upstream)."""
        return self._upstream.get_write_buffer_size() if self._upstream is not None else 0

    # --- lifecycle (called by Tunnels) ---------------------------------------------------

    def started(self) -> None:
        """The open is decided, connected and audited: count it, tie it to its session."""
        metrics = self._gateway.metrics
        label = metrics.service_label(self.service)
        active = metrics.tunnels_active.labels(label)
        active.inc()
        self._active = active.dec
        self.session.open_tunnels += 1  # for `gatewayd sessions list`
        # Resolved once: no label lookup per chunk or per flush.
        self._up_counter = metrics.tunnel_bytes.labels(label, "up")
        self._down_counter = metrics.tunnel_bytes.labels(label, "down")
        self._watchdog = asyncio.get_running_loop().call_later(self._owner.confirm_timeout,
                                                               self._never_opened)
        self._remove_closer = self.session.add_closer(self.abort)

    def discard(self) -> None:
        """Drop a connected upstream whose open was refused after all (nothing recorded)."""
        self.closed = "refused"
        if self._upstream is not None:
            self._upstream.abort()

    def abort(self, reason: str) -> None:
        """Close both sides now, discarding buffered data (session end, policy change)."""
        if self.closed is None:
            self._finish(reason)
        if self._chan is not None:
            self._chan.abort()
        if self._upstream is not None:
            self._upstream.abort()

    def _never_opened(self) -> None:
        self._watchdog = None
        if self._chan is None and self.closed is None:
            self._finish("error", error="channel_not_opened")
            if self._upstream is not None:
                self._upstream.abort()

    def _close_both(self) -> None:
        """Both sides have sent EOF: close gracefully (buffered bytes still go out)."""
        if self.closed is None:
            self._finish(self._first_end or "client_closed")
        if self._chan is not None:
            self._chan.close()
        if self._upstream is not None:
            self._upstream.close()

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.closed = reason
        self._flush(activity=False)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._active is not None:  # started: counted in the gauge and the session
            self._active(1)
            self._active = None
            self.session.open_tunnels -= 1
        self._remove_closer()
        self._remove_closer = _nothing
        self._owner.forget(self)
        duration = max(0.0, self._gateway.clock() - self.opened_at)
        try:
            self._gateway.audit.emit(
                "tunnel.close", **self.fields(), rule=self.rule, reason=reason, error=error,
                bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                duration_ms=round(duration * 1000))
        except AuditWriteError:
            log.error("tunnel.close could not be audited")

    def _flush(self, *, activity: bool) -> None:
        """Hand the bytes counted since the last flush to the session and the metrics."""
        up, down = self.bytes_up - self._counted_up, self.bytes_down - self._counted_down
        self._counted_up, self._counted_down = self.bytes_up, self.bytes_down
        if up or down:
            self.session.add_bytes(up=up, down=down)
            if up and self._up_counter is not None:
                self._up_counter.inc(up)
            if down and self._down_counter is not None:
                self._down_counter.inc(down)
        if activity:
            self._gateway.sessions.touch(self.session)
        self._next_flush = self._loop_time() + FLUSH_INTERVAL

    # --- the upstream socket (via _Upstream) ---------------------------------------------

    def upstream_connected(self, transport: asyncio.Transport) -> None:
        # Nowhere to send its bytes until the channel is open: read nothing until then.
        transport.pause_reading()
        transport.set_write_buffer_limits(high=UPSTREAM_HIGH_WATER)
        self._upstream = transport

    def from_upstream(self, data: bytes) -> None:
        chan = self._chan
        if chan is None:
            return
        try:
            chan.write(data)
        except OSError:
            return  # the channel is closing; its connection_lost ends the tunnel
        self.bytes_down += len(data)
        if self._loop_time() >= self._next_flush:
            self._flush(activity=True)

    def upstream_eof(self) -> bool:
        self._eof_from_upstream = True
        self._first_end = self._first_end or "upstream_closed"
        if self._chan is not None:
            self._chan.write_eof()
        if self._eof_from_client:
            self._close_both()
        return True  # keep the socket open: the client may still be sending (half-close)

    def upstream_full(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()  # the client's window closes behind this

    def upstream_drained(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            if exc is None:
                self._finish(self._first_end or "upstream_closed")
            else:
                self._finish("error", error=describe_os_error(exc)[0])
        if self._chan is not None:
            self._chan.close()  # what the upstream sent still reaches the client

    # --- the SSH channel (asyncssh SSHTCPSession callbacks) ------------------------------

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self.closed is not None:  # the session ended (or upstream left) while opening
            chan.close()
            return
        chan.set_write_buffer_limits(high=CHANNEL_HIGH_WATER)
        if self._upstream is not None:
            self._upstream.resume_reading()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        upstream = self._upstream
        if upstream is None:
            return
        try:
            upstream.write(data)
        except (OSError, RuntimeError):
            return  # written after our EOF or close: dropped, the tunnel is ending
        self.bytes_up += len(data)
        if self._loop_time() >= self._next_flush:
            self._flush(activity=True)

    def eof_received(self) -> bool:
        self._eof_from_client = True
        self._first_end = self._first_end or "client_closed"
        upstream = self._upstream
        if upstream is not None and not upstream.is_closing() and upstream.can_write_eof():
            upstream.write_eof()
        if self._eof_from_upstream:
            self._close_both()
        return True  # keep the channel open: the upstream may still be answering

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading()  # the client is not reading: stop reading for it

    def resume_writing(self) -> None:
        if self._upstream is not None and not self._upstream.is_closing():
            self._upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is None:
            if exc is None:
                self._finish(self._first_end or "client_closed")
            else:
                self._finish("error", error=type(exc).__name__)
        if self._upstream is not None:
            self._upstream.close()  # what the client sent still reaches the upstream
