"""Tests for gatewayd.ssh.admission: the pre-authentication caps on an injected clock."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from gatewayd.ssh.admission import LOG_EVERY, PRUNE_ABOVE, Admission, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, *, total: int = 64, per_source: int = 4, rate: int = 20
              ) -> Admission:
    return Admission(total=total, per_source=per_source, rate_per_minute=rate,
                     registry=CollectorRegistry(), clock=clock)


def refused(gate: Admission, reason: str) -> float:
    return gate.refused.labels(reason)._value.get()  # type: ignore[no-any-return]


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not-an-address", "not-an-address"),
])
def test_source_key(address: str, key: str) -> None:
    assert source_key(address) == key


def test_per_source_cap_counts_open_connections_and_release_frees_them() -> None:
    clock = Clock()
    gate = admission(clock, per_source=2)
    assert gate.admit("192.0.2.7") is None and gate.admit("192.0.2.7") is None
    assert gate.admit("192.0.2.7") == "preauth_per_source"
    assert gate.admit("192.0.2.8") is None  # another source is not affected
    gate.release("192.0.2.7")
    assert gate.admit("192.0.2.7") is None
    assert gate.pending == 3 and refused(gate, "preauth_per_source") == 1


def test_one_ipv6_slash_64_is_one_source() -> None:
    gate = admission(Clock(), per_source=1)
    assert gate.admit("2001:db8::1") is None
    assert gate.admit("2001:db8::2") == "preauth_per_source"
    assert gate.admit("2001:db8:0:1::1") is None


def test_total_cap() -> None:
    gate = admission(Clock(), total=3)
    assert [gate.admit(f"192.0.2.{n}") for n in range(4)] == [None, None, None, "preauth_total"]


def test_rate_is_a_sliding_minute_and_refused_attempts_count() -> None:
    clock = Clock()
    gate = admission(clock, rate=3, per_source=100)
    for _ in range(3):
        assert gate.admit("192.0.2.7") is None
        gate.release("192.0.2.7")
    assert gate.admit("192.0.2.7") == "connect_rate"
    clock.now += 59
    assert gate.admit("192.0.2.7") == "connect_rate"  # still hammering: still refused
    clock.now += 61
    assert gate.admit("192.0.2.7") is None
    assert refused(gate, "connect_rate") == 2


def test_release_of_an_unknown_source_changes_nothing() -> None:
    gate = admission(Clock())
    gate.release("192.0.2.9")
    assert gate.pending == 0


def test_refusals_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = admission(clock, total=1)
    gate.admit("192.0.2.1")
    with caplog.at_level(logging.WARNING, logger="gatewayd.ssh.admission"):
        for n in range(50):
            gate.admit(f"192.0.2.{n + 2}")
        clock.now += LOG_EVERY
        gate.admit("192.0.2.200")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["ssh: closed 1 connection(s) before the handshake: preauth_total",
                     "ssh: closed 50 connection(s) before the handshake: preauth_total"]


def test_stale_sources_are_forgotten() -> None:
    clock = Clock()
    gate = admission(clock)
    for n in range(PRUNE_ABOVE):
        gate.admit(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    clock.now += 61
    gate.admit("192.0.2.7")
    assert len(gate._recent) == 1


def test_failed_accepts_are_logged_at_most_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    gate = admission(clock)
    emfile = OSError(24, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="gatewayd.ssh.admission"):
        for _ in range(int(LOG_EVERY / 0.1)):  # the listener retries every 0.1 s
            gate.accept_failed(emfile)
            clock.now += 0.099
        clock.now += 1
        gate.accept_failed(emfile)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["ssh: accept failed 1 time(s): Too many open files (raise LimitNOFILE?)",
                     "ssh: accept failed 100 time(s): Too many open files (raise LimitNOFILE?)"]
