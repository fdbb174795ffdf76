"""Tests for gatewayd.sdnotify: the sd_notify protocol against a real unix datagram socket,
and the daemon (``gatewayd run``) telling a fake systemd when it is ready, reloading, stopping,
and feeding the watchdog from its event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_app import write_config

from gatewayd.sdnotify import SystemdNotifier


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: collects each datagram as a dict of its lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def receive_until(self, key: str, value: str = "1", timeout: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(message)
            if message.get(key) == value:
                return message
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def assignments(self) -> list[str]:
        return [key for message in self.messages for key in message if key != "STATUS"]


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    try:
        yield fake
    finally:
        fake.sock.close()


# --- the protocol -------------------------------------------------------------------------


def test_states_arrive_as_one_datagram_each(systemd: FakeSystemd) -> None:
    notifier = SystemdNotifier(str(systemd.path))
    notifier.ready("serving https://127.0.0.1:8443")
    notifier.reloading()
    notifier.stopping()
    notifier.status("two\nlines")
    ready = systemd.receive_until("READY")
    assert ready == {"READY": "1", "STATUS": "serving https://127.0.0.1:8443"}
    reloading = systemd.receive_until("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert systemd.receive_until("STOPPING")["STATUS"] == "draining sessions"
    # A status line is one line: a newline would start a new (bogus) assignment.
    assert systemd.receive_until("STATUS", "two lines") == {"STATUS": "two lines"}
    notifier.close()


def test_abstract_namespace_addresses_work() -> None:
    name = f"gatewayd-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(2)
    try:
        SystemdNotifier("@" + name).ready()
        assert receiver.recv(100) == b"READY=1"
    finally:
        receiver.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready()
    notifier.watchdog()
    notifier.close()


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "gone.sock"))
    notifier.ready()  # ENOENT: systemd will notice the missing READY=1 by itself
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_sec(
    systemd: FakeSystemd, environ: dict[str, str], interval: float | None
) -> None:
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(systemd.path), **environ})
    assert notifier.watchdog_interval == interval


async def test_keep_alive_pings_from_the_loop_and_stops_when_it_is_blocked(
    systemd: FakeSystemd,
) -> None:
    notifier = SystemdNotifier(str(systemd.path), watchdog_usec=100_000)
    task = asyncio.get_running_loop().create_task(notifier.keep_alive(), name="watchdog")
    await asyncio.sleep(0.33)
    time.sleep(0.4)  # noqa: ASYNC251 - a hung loop: no keep-alive may be sent meanwhile
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stamps = []
    systemd.sock.settimeout(0)
    while True:
        try:
            assert systemd.sock.recv(100) == b"WATCHDOG=1"
        except BlockingIOError:
            break
        stamps.append(1)
    # Pings at 0, 50, 100, … 300 ms before the block; none during the 400 ms block.
    assert 3 <= len(stamps) <= 9
    notifier.close()


# --- the daemon under a fake systemd ----------------------------------------------------------


def test_daemon_notifies_ready_reloading_stopping_and_feeds_the_watchdog(
    tmp_path: Path, systemd: FakeSystemd
) -> None:
    config = write_config(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        ready = systemd.receive_until("READY")
        assert "serving http://127.0.0.1:" in ready["STATUS"]
        assert "0 of 140 seats in use" in ready["STATUS"]
        systemd.receive_until("WATCHDOG")
        systemd.receive_until("WATCHDOG")  # repeatedly, every 200 ms
        daemon.send_signal(signal.SIGHUP)
        systemd.receive_until("RELOADING")
        systemd.receive_until("READY")  # serving again after the reload
        daemon.send_signal(signal.SIGTERM)
        systemd.receive_until("STOPPING")
        assert daemon.wait(timeout=15) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.communicate(timeout=10)
    states = [key for key in systemd.assignments() if key != "WATCHDOG"]
    assert states == ["READY", "RELOADING", "MONOTONIC_USEC", "READY", "STOPPING"]
