"""systemd service notifications: readiness, reloads, stopping, and the watchdog keep-alive.

This module owns the ``sd_notify(3)`` protocol, implemented directly (one datagram per state
change on the unix socket named by ``NOTIFY_SOCKET``) so the daemon needs no libsystemd
binding. `SystemdNotifier.from_environment` reads systemd's own variables once at start;
outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the same code runs under
``gatewayd demo``, in tests and under the unit with ``Type=notify``.

The order the unit relies on (see systemd/gatewayd.service):

- ``READY=1`` only after every listener is bound, so ``systemctl start`` returns when the
  gateway really accepts connections and units ordered ``After=`` it can start;
- ``RELOADING=1`` + ``MONOTONIC_USEC`` before a reload, ``READY=1`` after it (whatever its
  outcome — a rejected config leaves the old one serving), so ``systemctl reload`` waits;
- ``STOPPING=1`` when the drain begins;
- ``WATCHDOG=1`` every half ``WatchdogSec`` from a task *on the event loop*: a loop that hangs
  (a blocking call, a busy coroutine) stops the keep-alives and systemd restarts the service,
  which is the point — a thread would keep pinging for a dead loop.

Sending never raises: a full or vanished socket must not take the gateway down (systemd
then notices the missing notification itself — start timeout or watchdog).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("gatewayd.sdnotify")

# sd_notify(3): a message is at most one datagram; ours are a few dozen bytes.
_MAX_STATUS = 200


class SystemdNotifier:
    """Sends state changes to systemd; a no-op when not started by systemd."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self._watchdog = (watchdog_usec / 1e6 if watchdog_usec else None)
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``/``WATCHDOG_PID`` (sd_watchdog_enabled)."""
        watchdog = _positive_int(environ.get("WATCHDOG_USEC"))
        pid = _positive_int(environ.get("WATCHDOG_PID"))
        if pid is not None and pid != os.getpid():
            watchdog = None  # meant for another process (e.g. a wrapper that exec'd us later)
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives (half of ``WatchdogSec``), or None without a watchdog."""
        return None if self._watchdog is None or not self.enabled else self._watchdog / 2

    def ready(self, status: str = "") -> None:
        self._send("READY=1", status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an older one (systemd >= 253
        # requires it for Type=notify-reload; older ones ignore it).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}", "reloading configuration")

    def stopping(self) -> None:
        self._send("STOPPING=1", "draining sessions")

    def status(self, text: str) -> None:
        self._send("", text)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1", "")

    async def keep_alive(self) -> None:
        """Ping the watchdog from the event loop until cancelled (only when it is enabled)."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, state: str, status: str) -> None:
        if self._address is None:
            return
        lines = [state] if state else []
        if status:
            lines.append("STATUS=" + " ".join(status.split())[:_MAX_STATUS])
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("systemd notification not delivered", error=exc.strerror or str(exc))


def _socket_address(address: str) -> str | bytes:
    """``@name`` is Linux's abstract namespace (a leading NUL byte), as in sd_notify(3)."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


def _positive_int(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    value = int(text)
    return value if value > 0 else None
