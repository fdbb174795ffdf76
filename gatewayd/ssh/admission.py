"""Pre-authentication admission: which accepted TCP connections may start a handshake.

Shared by both listeners: the SSH listener (below) and the HTTPS listener, whose
``https.max_connections`` / ``max_connections_per_source`` are the same total and per-source
caps on TLS connections, checked at accept before the TLS handshake (`Admission.for_https`:
no rate cap, its own metric ``gatewayd_https_connections_refused_total{reason}`` with reasons
``total`` / ``per_source``).

Owns the three caps of ``[ssh]`` that are enforced before the gateway sends a single SSH byte
(no version string, no key exchange — so a flood of connections costs the gateway an
``accept()`` and a ``close()``, never a Diffie-Hellman or ML-KEM computation; this is what
defeats the "DHEat" key-exchange flood ``ssh-audit`` tests for):

* ``preauth_total`` — unauthenticated connections at once, all sources together;
* ``preauth_per_source`` — unauthenticated connections at once from one source;
* ``connect_rate_per_source`` — new connections per minute from one source (sliding window).

A *source* is the IPv4 address, or the IPv6 /64 (one customer line gets a whole /64, so per
address limits would be no limits); an IPv4-mapped IPv6 address counts as its IPv4 address.
A connection holds its pre-auth slot from ``admit`` until ``release`` (authenticated, failed or
closed). Refusals are counted in ``gatewayd_ssh_preauth_refused_total{reason}`` and logged at
most once per `LOG_EVERY` seconds per reason (with the count since), never one line per
connection: the flood must not become a log flood, nor an audit one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

Refusal = Literal["preauth_total", "preauth_per_source", "connect_rate"]
REFUSALS: Final[tuple[Refusal, ...]] = ("preauth_total", "preauth_per_source", "connect_rate")
RATE_WINDOW: Final = 60.0  # seconds: connect_rate_per_source is per minute
LOG_EVERY: Final = 10.0  # seconds between two log lines about refusals of one kind
PRUNE_ABOVE: Final = 10_000  # sources remembered before stale ones are dropped
SSH_METRIC: Final = ("gatewayd_ssh_preauth_refused_total",
                     "SSH connections closed before the handshake by a pre-authentication cap.")
HTTPS_METRIC: Final = ("gatewayd_https_connections_refused_total",
                       "TLS connections closed at accept by https.max_connections"
                       "[_per_source].")
HTTPS_REASONS: Final[Mapping[Refusal, str]] = {"preauth_total": "total",
                                               "preauth_per_source": "per_source"}


def source_key(address: str) -> str:
    """The unit the per-source caps count: an IPv4 address or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Admission:
    """The pre-auth caps of one SSH listener (single event loop: no locking needed)."""

    def __init__(
        self, *, total: int, per_source: int, rate_per_minute: int | None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        listener: str = "ssh", metric: tuple[str, str] = SSH_METRIC,
        reasons: Mapping[Refusal, str] | None = None,
    ) -> None:
        """``rate_per_minute``: None for no rate cap. ``listener`` names the listener in log
        lines; ``metric`` is the refusal counter's (name, help); ``reasons`` renames the
        refusals in the metric label and the log (default: the `Refusal` names)."""
        self.total = total
        self.per_source = per_source
        self.rate_per_minute = rate_per_minute
        self._listener = listener
        self._reasons: Mapping[Refusal, str] = reasons or {r: r for r in REFUSALS}
        self._clock = clock
        self._open: dict[str, int] = {}
        self._open_total = 0
        self._recent: dict[str, deque[float]] = {}
        self._refused_since_log: dict[str, int] = {}
        self._next_log: dict[str, float] = {}
        self.refused = Counter(metric[0], metric[1], ["reason"], registry=registry)
        for label in self._reasons.values():
            self.refused.labels(label)

    @classmethod
    def for_https(cls, *, total: int, per_source: int,
                  registry: CollectorRegistry | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Admission:
        """The HTTPS listener's connection caps (``https.max_connections[_per_source]``)."""
        return cls(total=total, per_source=per_source, rate_per_minute=None,
                   registry=registry, clock=clock, listener="https", metric=HTTPS_METRIC,
                   reasons=HTTPS_REASONS)

    @property
    def pending(self) -> int:
        """Connections admitted and not yet released."""
        return self._open_total

    def admit(self, address: str) -> Refusal | None:
        """Take a pre-auth slot for a connection from ``address``; else the cap it hit."""
        key = source_key(address)
        now = self._clock()
        refusal = self._check(key, now)
        if refusal is not None:
            self._refuse(refusal, now)
            return refusal
        self._open[key] = self._open.get(key, 0) + 1
        self._open_total += 1
        return None

    def release(self, address: str) -> None:
        """The connection left pre-auth (authenticated, failed or closed)."""
        key = source_key(address)
        left = self._open.get(key, 0) - 1
        if left < 0:
            return
        self._open_total -= 1
        if left:
            self._open[key] = left
        else:
            del self._open[key]

    def _check(self, key: str, now: float) -> Refusal | None:
        if self.rate_per_minute is not None and self._rate_exceeded(key, now):
            return "connect_rate"
        if self._open_total >= self.total:
            return "preauth_total"
        if self._open.get(key, 0) >= self.per_source:
            return "preauth_per_source"
        return None

    def _rate_exceeded(self, key: str, now: float) -> bool:
        assert self.rate_per_minute is not None
        recent = self._recent.get(key)
        if recent is None:
            if len(self._recent) >= PRUNE_ABOVE:
                self._prune(now)
            recent = self._recent[key] = deque(maxlen=self.rate_per_minute)
        while recent and now - recent[0] >= RATE_WINDOW:
            recent.popleft()
        # Every attempt counts against the rate, refused ones too: a client hammering away
        # stays refused until it slows down.
        full = len(recent) >= self.rate_per_minute
        recent.append(now)
        return full

    def _prune(self, now: float) -> None:
        stale = [key for key, recent in self._recent.items()
                 if not recent or now - recent[-1] >= RATE_WINDOW]
        for key in stale:
            del self._recent[key]

    async def accept_forever(
        self, sock: socket.socket,
        serve: Callable[[socket.socket, str], Coroutine[Any, Any, None]],
        tasks: set[asyncio.Task[None]], name: str,
    ) -> None:
        """The listener's accept loop: every connection is admitted (or closed at once,
        before any TLS or SSH byte — no handshake work for a flood) and then served by
        ``serve(conn, source)`` in its own task, kept in ``tasks`` until it ends. ``serve``
        must `release` the source when the connection is done."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                self.accept_failed(exc)
                await asyncio.sleep(0.1)
                continue
            source = str(peer[0])
            if self.admit(source) is not None:
                conn.close()
                continue
            task = loop.create_task(serve(conn, source), name=name)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def accept_failed(self, exc: OSError) -> None:
        """Log a failed ``accept()`` (EMFILE: out of file descriptors) at most every
        LOG_EVERY seconds with the count: the listener retries 10 times a second, and a full
        descriptor table must not also fill the journal."""
        now = self._clock()
        count = self._refused_since_log.get("accept_failed", 0) + 1
        if now < self._next_log.get("accept_failed", 0.0):
            self._refused_since_log["accept_failed"] = count
            return
        self._refused_since_log["accept_failed"] = 0
        self._next_log["accept_failed"] = now + LOG_EVERY
        log.warning("%s: accept failed %d time(s): %s (raise LimitNOFILE?)", self._listener,
                    count, exc.strerror or exc)

    def _refuse(self, refusal: Refusal, now: float) -> None:
        reason = self._reasons.get(refusal, refusal)
        self.refused.labels(reason).inc()
        count = self._refused_since_log.get(reason, 0) + 1
        if now < self._next_log.get(reason, 0.0):
            self._refused_since_log[reason] = count
            return
        self._refused_since_log[reason] = 0
        self._next_log[reason] = now + LOG_EVERY
        log.warning("%s: closed %d connection(s) before the handshake: %s", self._listener,
                    count, reason)
