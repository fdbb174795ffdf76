"""Tests for gatewayd.identity.regulation: back-off, lockout, source limits, races, pacing."""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.config import LoginSettings
from gatewayd.identity.regulation import (
    SOURCE_FACTOR,
    Attempt,
    Refusal,
    RegulationPolicy,
    Regulator,
    ResponsePacer,
    account_key,
    source_key,
)
from gatewayd.state import MemoryState


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class YieldingState(MemoryState):
    """A MemoryState that lets other tasks run before every operation, like a network store."""

    async def add_once(self, key: str, ttl: float) -> bool:
        await asyncio.sleep(0)
        return await super().add_once(key, ttl)

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        await asyncio.sleep(0)
        return await super().incr(key, ttl, amount)

    async def remaining(self, key: str) -> float | None:
        await asyncio.sleep(0)
        return await super().remaining(key)


def make(policy: RegulationPolicy | None = None) -> tuple[FakeClock, Regulator]:
    clock = FakeClock()
    return clock, Regulator(MemoryState(clock=clock), policy or RegulationPolicy())


def refused(result: Attempt | Refusal, reason: str, retry_after: float) -> bool:
    return (isinstance(result, Refusal) and result.reason == reason
            and result.retry_after == pytest.approx(retry_after, abs=1e-3))


async def fail(regulator: Regulator, user: str = "alice", source: str = "192.0.2.1") -> Attempt:
    attempt = await regulator.begin(user, source)
    assert isinstance(attempt, Attempt), attempt
    await regulator.failed(attempt)
    return attempt


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0.0), (4, 0.0), (5, 2.0), (6, 4.0), (7, 8.0), (12, 256.0), (13, 512.0), (14, 900.0),
     (99, 900.0), (10_000, 900.0)],
)
def test_delay_curve(failures: int, delay: float) -> None:
    assert RegulationPolicy().delay(failures, 5) == delay


def test_policy_from_settings() -> None:
    login = LoginSettings.model_validate({"failures_before_backoff": 3, "backoff_initial": "1s",
                                          "backoff_max": "5m", "lockout_after": 20,
                                          "lockout_duration": "30m"})
    assert RegulationPolicy.from_settings(login) == RegulationPolicy(3, 1.0, 300.0, 20, 1800.0)
    assert RegulationPolicy.from_settings(LoginSettings()) == RegulationPolicy()


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("alice", "alice", True),
        ("alice", "ALICE", True),
        ("alice", " alice ", True),
        ("alice", "\uff41\uff4c\uff49\uff43\uff45", True),
        ("alice", "alice2", False),
        ("", "", True),
        ("bad\x00name", "bad\x00name", True),
        ("bad\x00name", "bad\x00Name", False),  # unusable names are kept apart verbatim
    ],
)
def test_account_key(a: str, b: str, same: bool) -> None:
    assert (account_key(a) == account_key(b)) is same
    assert len(account_key(a)) == 32 and "alice" not in account_key(a)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("192.0.2.1", "192.0.2.1", True),
        ("192.0.2.1", "192.0.2.2", False),
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),  # same /64
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),
        ("::ffff:192.0.2.1", "192.0.2.1", True),
        ("2001:DB8:1:2::1", "2001:db8:1:2::1", True),
        ("not-an-ip", "not-an-ip", True),
        ("not-an-ip", "192.0.2.1", False),
    ],
)
def test_source_key(a: str, b: str, same: bool) -> None:
    assert (source_key(a) == source_key(b)) is same


async def test_back_off_sequence_per_account() -> None:
    clock, regulator = make()
    for _ in range(4):
        await fail(regulator)  # free
    await fail(regulator)  # the 5th is allowed and arms a 2 s wait for the next
    for expected_wait in (2.0, 4.0, 8.0, 16.0):
        refusal = await regulator.begin("ALICE", "198.51.100.7")  # any spelling, any source
        assert refused(refusal, "throttled", expected_wait)
        clock.now += expected_wait - 0.001
        assert isinstance(await regulator.begin("alice", "192.0.2.1"), Refusal)
        clock.now += 0.001
        await fail(regulator)


async def test_refused_attempts_are_not_counted() -> None:
    clock, regulator = make()
    for _ in range(5):
        await fail(regulator)
    for _ in range(50):
        assert isinstance(await regulator.begin("alice", "192.0.2.1"), Refusal)
    clock.now += 2
    attempt = await regulator.begin("alice", "192.0.2.1")
    assert isinstance(attempt, Attempt) and attempt.account_failures == 6


async def test_success_resets_the_account() -> None:
    clock, regulator = make()
    for _ in range(5):
        await fail(regulator)
    clock.now += 2
    attempt = await regulator.begin("alice", "192.0.2.1")
    assert isinstance(attempt, Attempt)
    await regulator.succeeded(attempt)
    for _ in range(4):
        await fail(regulator)  # free again, immediately
    assert isinstance(await regulator.begin("alice", "192.0.2.1"), Attempt)


async def test_lockout_after_limit_and_release_by_time() -> None:
    policy = RegulationPolicy(failures_before_backoff=100, lockout_after=3, lockout_duration=3600)
    clock, regulator = make(policy)
    started = []
    for _ in range(3):
        attempt = await regulator.begin("alice", "192.0.2.1")
        assert isinstance(attempt, Attempt)
        started.append(await regulator.failed(attempt))
    assert started == [False, False, True]
    assert refused(await regulator.begin("alice", "203.0.113.5"), "locked", 3600)
    assert await regulator.locked_for("Alice") == 3600
    assert isinstance(await regulator.begin("bob", "192.0.2.1"), Attempt)  # others unaffected
    clock.now += 3599
    assert refused(await regulator.begin("alice", "192.0.2.1"), "locked", 1)
    clock.now += 1
    for _ in range(2):
        await fail(regulator)  # a fresh count after the lock expired
    assert await regulator.locked_for("alice") is None


async def test_never_more_than_lockout_after_consecutive_failures() -> None:
    policy = RegulationPolicy(failures_before_backoff=5, backoff_initial=1, backoff_max=60,
                              lockout_after=100, lockout_duration=3600)
    clock, regulator = make(policy)
    failures = 0
    while True:
        result = await regulator.begin("alice", f"192.0.2.{failures % 250}")
        if isinstance(result, Refusal):
            if result.reason == "locked":
                break
            clock.now += result.retry_after
            continue
        await regulator.failed(result)
        failures += 1
    assert failures == 100


async def test_release_by_help_desk() -> None:
    policy = RegulationPolicy(lockout_after=2, failures_before_backoff=50)
    _, regulator = make(policy)
    await fail(regulator)
    await fail(regulator)
    assert isinstance(await regulator.begin("alice", "192.0.2.1"), Refusal)
    await regulator.release("ALICE")
    assert isinstance(await regulator.begin("alice", "192.0.2.1"), Attempt)


async def test_source_throttles_spraying_across_accounts() -> None:
    policy = RegulationPolicy(failures_before_backoff=2)
    clock, regulator = make(policy)
    threshold = SOURCE_FACTOR * 2
    for i in range(threshold):
        await fail(regulator, user=f"user{i}", source="2001:db8:1:2::10")
    refusal = await regulator.begin("fresh-user", "2001:db8:1:2::99")  # same /64
    assert refused(refusal, "throttled", 2.0)
    assert isinstance(await regulator.begin("fresh-user", "2001:db8:9:9::1"), Attempt)
    clock.now += 2
    assert isinstance(await regulator.begin("fresh-user", "2001:db8:1:2::99"), Attempt)


async def test_a_valid_account_does_not_launder_source_failures() -> None:
    policy = RegulationPolicy(failures_before_backoff=2)
    _, regulator = make(policy)
    for i in range(SOURCE_FACTOR * 2 - 1):
        await fail(regulator, user=f"victim{i}")
    mine = await regulator.begin("attacker", "192.0.2.1")  # the attacker's own good login
    assert isinstance(mine, Attempt)
    await regulator.succeeded(mine)
    await fail(regulator, user="victim-next")  # the 8th failure arms the source wait
    assert isinstance(await regulator.begin("another", "192.0.2.1"), Refusal)


async def test_abandoned_attempt_counts_for_nothing() -> None:
    policy = RegulationPolicy(failures_before_backoff=1)
    _, regulator = make(policy)
    attempt = await regulator.begin("alice", "192.0.2.1")
    assert isinstance(attempt, Attempt) and attempt.holds_account_wait
    await regulator.abandon(attempt)
    again = await regulator.begin("alice", "192.0.2.1")
    assert isinstance(again, Attempt) and again.account_failures == 1


@pytest.mark.parametrize("state_class", [MemoryState, YieldingState])
async def test_parallel_burst_gets_only_the_free_attempts(state_class: type[MemoryState]) -> None:
    regulator = Regulator(state_class(), RegulationPolicy(failures_before_backoff=5))
    results = await asyncio.gather(*(regulator.begin("alice", f"192.0.2.{i}") for i in range(60)))
    admitted = [r for r in results if isinstance(r, Attempt)]
    assert len(admitted) == 5
    assert all(r.reason == "throttled" for r in results if isinstance(r, Refusal))


async def test_parallel_burst_past_the_lockout_is_refused() -> None:
    policy = RegulationPolicy(failures_before_backoff=50, lockout_after=3)
    regulator = Regulator(YieldingState(), policy)
    results = await asyncio.gather(*(regulator.begin("alice", "192.0.2.1") for _ in range(20)))
    admitted = [r for r in results if isinstance(r, Attempt)]
    assert len(admitted) == 3
    locks = [await regulator.failed(a) for a in admitted]
    assert locks.count(True) == 1
    assert refused((await regulator.begin("alice", "192.0.2.1")), "locked", 3600.0)


async def test_counts_are_shared_between_nodes() -> None:
    shared = MemoryState()
    node1 = Regulator(shared, RegulationPolicy(failures_before_backoff=3))
    node2 = Regulator(shared, RegulationPolicy(failures_before_backoff=3))
    await fail(node1)
    await fail(node2)
    await fail(node1)
    assert isinstance(await node2.begin("alice", "192.0.2.1"), Refusal)


async def test_state_keys_do_not_carry_user_names_or_addresses() -> None:
    state = MemoryState()
    await fail(Regulator(state, RegulationPolicy()), user="alice", source="192.0.2.1")
    keys = list(state._entries)
    assert keys and not any("alice" in k or "192.0.2.1" in k for k in keys)


@pytest.mark.parametrize(("elapsed", "slept"), [(0.0, 0.25), (0.1, 0.15), (0.25, None), (3.0, None)])
async def test_pacer_waits_up_to_the_floor(elapsed: float, slept: float | None) -> None:
    clock = FakeClock()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    pacer = ResponsePacer(0.25, clock=clock, sleep=sleep)
    started = pacer.start()
    clock.now += elapsed
    await pacer.finish(started)
    assert sleeps == ([] if slept is None else [pytest.approx(slept)])
