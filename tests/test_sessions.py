"""Tests for gatewayd.sessions: limits, expiry on an injected clock, ending and closers."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import Any

import pytest

from gatewayd.identity.principal import Principal
from gatewayd.sessions import (
    END_REASONS,
    PerUserLimit,
    SeatsFull,
    Session,
    SessionLimitError,
    SessionRegistry,
    hash_session_id,
)

ALICE = Principal("alice", frozenset({"telework-staff"}), {"office_pc": "pc-0042"})
BOB = Principal("bob", frozenset({"telework-managers"}))


class FakeClock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, **limits: Any) -> None:
        self.clock = FakeClock()
        self.ended: list[tuple[Session, str]] = []
        options: dict[str, Any] = {"idle_timeout": 900.0, "absolute_timeout": 36_000.0,
                                   "max_concurrent": 140, "per_user": 1}
        options.update(limits)
        self.registry = SessionRegistry(clock=self.clock, on_end=self._on_end, **options)

    def _on_end(self, session: Session, reason: str) -> None:
        self.ended.append((session, reason))

    def login(self, principal: Principal = ALICE, frontend: str = "https") -> tuple[str, Session]:
        return self.registry.create(principal, frontend=frontend, source_ip="192.0.2.7",  # type: ignore[arg-type]
                                    device=None, device_user=None)


def test_create_returns_a_256_bit_url_safe_id_and_keeps_only_its_hash() -> None:
    h = Harness()
    raw, session = h.login()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", raw)
    assert session.id_hash == hashlib.sha256(raw.encode()).hexdigest() == hash_session_id(raw)
    assert raw not in repr(vars(h.registry)) and raw not in repr(session)
    assert h.registry.get(raw) is session


def test_ids_are_unique() -> None:
    h = Harness(per_user=1000, max_concurrent=1000)
    ids = {h.login()[0] for _ in range(500)}
    assert len(ids) == 500


def test_new_session_fields() -> None:
    h = Harness()
    _, s = h.registry.create(ALICE, frontend="ssh", source_ip="2001:db8::1", device="dev-1",
                             device_user="alice", now=123.0)
    assert (s.user, s.frontend, s.source_ip, s.device, s.device_user) == ("alice", "ssh", "2001:db8::1", "dev-1", "alice")
    assert s.created == s.last_seen == s.mfa_at == 123.0
    assert (s.bytes_up, s.bytes_down, s.ended) == (0, 0, None)
    assert re.fullmatch(r"[0-9a-f]{16}", s.handle) and s.handle not in s.id_hash


def test_rotation_changes_the_id_but_not_the_handle() -> None:
    h = Harness()
    old_raw, session = h.login()
    handle, old_hash = session.handle, session.id_hash
    new_raw = h.registry.rotate(session)
    assert h.registry.get(old_raw) is None
    assert h.registry.get(new_raw) is session
    assert session.handle == handle and session.id_hash != old_hash
    assert h.ended == []  # rotation is not an end


@pytest.mark.parametrize(
    ("max_concurrent", "per_user", "logins", "error"),
    [
        (2, 5, ["alice", "bob"], None),
        (2, 5, ["alice", "bob", "alice"], SeatsFull),
        (1, 5, ["alice", "bob"], SeatsFull),
        (10, 1, ["alice", "alice"], PerUserLimit),
        (10, 2, ["alice", "alice"], None),
        (10, 2, ["alice", "alice", "alice"], PerUserLimit),
        (10, 1, ["alice", "bob"], None),
        (1, 1, ["alice", "alice"], SeatsFull),  # seats are checked first
    ],
)
def test_limits(max_concurrent: int, per_user: int, logins: list[str], error: type[SessionLimitError] | None) -> None:
    h = Harness(max_concurrent=max_concurrent, per_user=per_user)
    principals = {"alice": ALICE, "bob": BOB}
    for user in logins[:-1]:
        h.login(principals[user])
    if error is None:
        h.login(principals[logins[-1]])
    else:
        with pytest.raises(error) as info:
            h.login(principals[logins[-1]])
        assert info.value.limit == (max_concurrent if error is SeatsFull else per_user)
        assert str(info.value.limit) in str(info.value)
    assert h.registry.active() == min(len(logins), len(logins) - (error is not None))


def test_per_user_limit_counts_both_frontends() -> None:
    h = Harness(per_user=1)
    h.login(frontend="ssh")
    with pytest.raises(PerUserLimit):
        h.login(frontend="https")


@pytest.mark.parametrize("per_user", [1, 2, 3])
def test_replace_oldest_ends_the_oldest_sessions_of_that_user_only(per_user: int) -> None:
    h = Harness(per_user=per_user)
    bob_raw, _ = h.login(BOB)
    olds = []
    for _ in range(per_user):
        olds.append(h.login(ALICE)[0])
        h.clock.now += 1
    raw, session = h.registry.create(ALICE, frontend="https", source_ip="192.0.2.8",
                                     replace_oldest=True)
    assert h.registry.get(raw) is session
    assert h.registry.get(olds[0]) is None  # the oldest made room
    assert all(h.registry.get(old) is not None for old in olds[1:])
    assert h.registry.get(bob_raw) is not None
    assert [(s.user, r) for s, r in h.ended] == [("alice", "replaced")]


def test_replacing_never_bypasses_the_seat_limit() -> None:
    h = Harness(max_concurrent=1, per_user=1)
    h.login(BOB)
    with pytest.raises(SeatsFull):
        h.registry.create(ALICE, frontend="https", source_ip="192.0.2.8", replace_oldest=True)
    assert h.ended == []


def test_expired_sessions_do_not_hold_seats() -> None:
    h = Harness(max_concurrent=1)
    h.login(BOB)
    h.clock.now += 900
    raw, _ = h.login(ALICE)
    assert h.registry.get(raw) is not None
    assert [(s.user, r) for s, r in h.ended] == [("bob", "idle_timeout")]


@pytest.mark.parametrize(
    ("touches", "at", "alive", "reason"),
    [
        ([], 899.0, True, None),
        ([], 900.0, False, "idle_timeout"),
        ([600.0], 1499.0, True, None),
        ([600.0], 1500.0, False, "idle_timeout"),
        ([800.0 * i for i in range(1, 45)], 35_999.0, True, None),
        ([800.0 * i for i in range(1, 45)], 36_000.0, False, "expired"),  # busy, but too old
        ([], 36_000.0, False, "expired"),  # both due: the absolute lifetime is named
    ],
)
def test_get_expiry(touches: list[float], at: float, alive: bool, reason: str | None) -> None:
    h = Harness()
    start = h.clock.now
    raw, session = h.login()
    for t in touches:
        h.clock.now = start + t
        assert h.registry.get(raw) is session
        h.registry.touch(session)
    h.clock.now = start + at
    assert (h.registry.get(raw) is session) is alive
    assert h.ended == ([] if alive else [(session, reason)])
    assert session.ended == reason


@pytest.mark.parametrize("raw", ["", "x", "A" * 43, "é", "\udcff"])
def test_get_unknown(raw: str) -> None:
    h = Harness()
    h.login()
    assert h.registry.get(raw) is None


def test_get_does_not_count_as_activity() -> None:
    h = Harness()
    raw, session = h.login()
    h.clock.now += 500
    h.registry.get(raw)
    assert session.last_seen == session.created


def test_mark_mfa_sets_mfa_time_and_activity() -> None:
    h = Harness()
    _, session = h.login()
    h.clock.now += 300
    h.registry.mark_mfa(session)
    assert session.mfa_at == session.last_seen == h.clock.now
    assert session.mfa_age(h.clock.now + 42) == 42
    assert session.mfa_age(h.clock.now - 5) == 0  # never negative


def test_touch_never_moves_backwards() -> None:
    h = Harness()
    _, session = h.login()
    h.clock.now -= 100
    h.registry.touch(session)
    assert session.last_seen == session.created


def test_end_unindexes_runs_closers_then_hook_once() -> None:
    h = Harness()
    raw, session = h.login()
    calls: list[str] = []

    def closer(reason: str) -> None:
        calls.append(f"closer:{reason}")
        assert h.registry.get(raw) is None  # already unreachable when closers run

    session.add_closer(closer)
    session.add_closer(lambda reason: calls.append("second"))
    h.registry.end(session, "logout")
    h.registry.end(session, "admin_kill")  # idempotent: the first reason stands
    assert calls == ["closer:logout", "second"]
    assert h.ended == [(session, "logout")]
    assert session.ended == "logout"
    assert h.registry.active() == 0


def test_removed_closer_does_not_run() -> None:
    h = Harness()
    _, session = h.login()
    calls: list[str] = []
    remove = session.add_closer(calls.append)
    remove()
    remove()  # twice is harmless
    h.registry.end(session, "logout")
    assert calls == []


def test_closer_added_after_end_runs_at_once() -> None:
    h = Harness()
    _, session = h.login()
    h.registry.end(session, "admin_kill")
    calls: list[str] = []
    session.add_closer(calls.append)()
    assert calls == ["admin_kill"]


def test_failing_closer_and_hook_do_not_stop_the_end(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    raw, session = h.login()
    calls: list[str] = []

    def broken(reason: str) -> None:
        raise RuntimeError("socket already gone")

    session.add_closer(broken)
    session.add_closer(calls.append)

    def broken_hook(s: Session, reason: str) -> None:
        raise RuntimeError("audit down")

    h.registry._on_end = broken_hook
    with caplog.at_level(logging.ERROR, logger="gatewayd.sessions"):
        h.registry.end(session, "logout")
    assert calls == ["logout"]
    assert h.registry.get(raw) is None
    assert len([r for r in caplog.records if r.exc_info]) == 2
    assert raw not in caplog.text


def test_unknown_end_reason_is_a_programming_error() -> None:
    h = Harness()
    _, session = h.login()
    with pytest.raises(ValueError, match="reason"):
        h.registry.end(session, "bored")
    assert session.ended is None


def test_end_reasons_are_the_contract() -> None:
    assert {"logout", "idle_timeout", "expired", "admin_kill", "policy_changed", "shutdown", "replaced", "directory_revoked", "device_revoked", "user_disabled", "disconnected", "state_lost", "node_lost"} == END_REASONS


def test_end_user_and_end_all() -> None:
    h = Harness(per_user=3)
    for _ in range(3):
        h.login(ALICE)
    h.login(BOB)
    assert h.registry.end_user("alice", "policy_changed") == 3
    assert h.registry.end_user("alice", "policy_changed") == 0
    assert [s.user for s in h.registry.sessions()] == ["bob"]
    assert h.registry.end_all("shutdown") == 1
    assert [r for _, r in h.ended] == ["policy_changed"] * 3 + ["shutdown"]


def test_sessions_listing_and_active_per_frontend() -> None:
    h = Harness(per_user=5)
    h.login(ALICE, "https")
    h.clock.now += 1
    h.login(BOB, "ssh")
    h.clock.now += 1
    h.login(ALICE, "ssh")
    assert [s.user for s in h.registry.sessions()] == ["alice", "bob", "alice"]
    assert (h.registry.active(), h.registry.active("https"), h.registry.active("ssh")) == (3, 1, 2)


def test_sweep_ends_only_due_sessions() -> None:
    h = Harness(per_user=5)
    _, old = h.login()
    h.clock.now += 600
    _, young = h.login()
    h.clock.now += 300
    assert h.registry.sweep() == 1
    assert old.ended == "idle_timeout" and young.ended is None


async def test_sweep_forever_expires_idle_sessions_and_stops_on_cancel() -> None:
    h = Harness()
    _, session = h.login()
    closed = asyncio.Event()
    session.add_closer(lambda reason: closed.set())
    task = asyncio.create_task(h.registry.sweep_forever(0.01), name="test-sweep")
    await asyncio.sleep(0.03)
    assert session.ended is None
    h.clock.now += 900
    await asyncio.wait_for(closed.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_sweep_forever_survives_a_failing_sweep(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    calls = 0
    third = asyncio.Event()

    def flaky(now: float | None = None) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        if calls == 3:
            third.set()
        return 0

    h.registry.sweep = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(h.registry.sweep_forever(0.001), name="test-sweep")
    await asyncio.wait_for(third.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "session sweep failed" in caplog.text


def test_rotate_gives_a_new_id_and_kills_the_old() -> None:
    h = Harness()
    old_raw, session = h.login()
    old_hash = session.id_hash
    new_raw = h.registry.rotate(session)
    assert new_raw != old_raw and session.id_hash != old_hash
    assert h.registry.get(old_raw) is None
    assert h.registry.get(new_raw) is session
    assert h.ended == []


def test_rotate_refuses_an_ended_session() -> None:
    h = Harness()
    _, session = h.login()
    h.registry.end(session, "logout")
    with pytest.raises(KeyError):
        h.registry.rotate(session)


def test_by_handle() -> None:
    h = Harness(per_user=2)
    _, a = h.login(ALICE)
    _, b = h.login(BOB)
    assert h.registry.by_handle(a.handle) is a
    assert h.registry.by_handle(b.handle.upper()) is b
    assert h.registry.by_handle(b.handle[:8]) is b
    assert h.registry.by_handle(a.handle[:7]) is None  # too short to be a deliberate choice
    assert h.registry.by_handle(b.id_hash) is None  # handles are not id prefixes
    assert h.registry.by_handle("g" * 16) is None


def test_byte_accounting() -> None:
    h = Harness()
    _, session = h.login()
    session.add_bytes(up=10)
    session.add_bytes(up=5, down=1000)
    assert (session.bytes_up, session.bytes_down) == (15, 1000)


@pytest.mark.parametrize(
    "options",
    [
        {"idle_timeout": 0},
        {"absolute_timeout": -1},
        {"max_concurrent": 0},
        {"per_user": 0},
    ],
)
def test_bad_limits_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="session"):
        Harness(**options)


def test_ending_frees_the_per_user_slot_and_leaves_no_index_behind() -> None:
    h = Harness(per_user=1)
    for reason in ("logout", "admin_kill", "policy_changed"):
        _, session = h.login()
        with pytest.raises(PerUserLimit):
            h.login()
        h.registry.end(session, reason)
    h.login(BOB)
    h.clock.now += 900
    h.registry.sweep()
    assert h.registry._by_user == {} and h.registry._by_hash == {}


def test_a_session_sharing_a_live_seat_needs_no_seat_of_its_own() -> None:
    h = Harness(max_concurrent=1, per_user=1)
    _, portal = h.login()
    _, tunnel = h.registry.create(ALICE, frontend="ssh", source_ip="192.0.2.7", seat_of=portal)
    assert tunnel.seat == portal.handle and tunnel.seat_key == portal.seat_key
    assert h.registry.seats_taken() == 1 and h.registry.active() == 2 and h.ended == []
    with pytest.raises(SeatsFull):  # the one seat is still taken by the pair
        h.login(BOB)
    h.registry.end(portal, "logout")
    assert h.registry.seats_taken() == 1  # the tunnel keeps the shared seat
    h.registry.end(tunnel, "disconnected")
    assert h.registry.seats_taken() == 0
    h.login(BOB)


@pytest.mark.parametrize("case", ["ended", "other_user"])
def test_a_seat_is_shared_only_with_a_live_session_of_the_same_user(case: str) -> None:
    h = Harness(max_concurrent=5, per_user=1)
    _, portal = h.login(BOB if case == "other_user" else ALICE)
    if case == "ended":
        h.registry.end(portal, "logout")
    _, tunnel = h.registry.create(ALICE, frontend="ssh", source_ip="192.0.2.7", seat_of=portal)
    assert tunnel.seat is None and tunnel.seat_key == tunnel.handle


def test_replacing_at_the_per_user_cap_ends_every_session_of_the_shared_seat() -> None:
    h = Harness(per_user=1)
    _, portal = h.login()
    _, tunnel = h.registry.create(ALICE, frontend="ssh", source_ip="192.0.2.7", seat_of=portal)
    _, newest = h.registry.create(ALICE, frontend="https", source_ip="192.0.2.7",
                                  replace_oldest=True)
    assert [(s, r) for s, r in h.ended] == [(portal, "replaced"), (tunnel, "replaced")]
    assert h.registry.sessions() == [newest]
