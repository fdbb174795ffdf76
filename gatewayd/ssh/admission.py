"""Pre-authentication admission: which accepted TCP connections may start an SSH handshake.

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

import ipaddress
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

Refusal = Literal["preauth_total", "preauth_per_source", "connect_rate"]
REFUSALS: Final[tuple[Refusal, ...]] = ("preauth_total", "preauth_per_source", "connect_rate")
RATE_WINDOW: Final = 60.0  # seconds: connect_rate_per_source is per minute
LOG_EVERY: Final = 10.0  # seconds between two log lines about refusals of one kind
PRUNE_ABOVE: Final = 10_000  # sources remembered before stale ones are dropped


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
        self, *, total: int, per_source: int, rate_per_minute: int,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.per_source = per_source
        self.rate_per_minute = rate_per_minute
        self._clock = clock
        self._open: dict[str, int] = {}
        self._open_total = 0
        self._recent: dict[str, deque[float]] = {}
        self._refused_since_log: dict[str, int] = {}
        self._next_log: dict[str, float] = {}
        self.refused = Counter(
            "gatewayd_ssh_preauth_refused_total",
            "SSH connections closed before the handshake by a pre-authentication cap.",
            ["reason"], registry=registry,
        )
        for reason in REFUSALS:
            self.refused.labels(reason)

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
        if full:
            return "connect_rate"
        if self._open_total >= self.total:
            return "preauth_total"
        if self._open.get(key, 0) >= self.per_source:
            return "preauth_per_source"
        return None

    def _prune(self, now: float) -> None:
        stale = [key for key, recent in self._recent.items()
                 if not recent or now - recent[-1] >= RATE_WINDOW]
        for key in stale:
            del self._recent[key]

    def _refuse(self, reason: Refusal, now: float) -> None:
        self.refused.labels(reason).inc()
        count = self._refused_since_log.get(reason, 0) + 1
        if now < self._next_log.get(reason, 0.0):
            self._refused_since_log[reason] = count
            return
        self._refused_since_log[reason] = 0
        self._next_log[reason] = now + LOG_EVERY
        log.warning("ssh: closed %d connection(s) before the handshake: %s", count, reason)
