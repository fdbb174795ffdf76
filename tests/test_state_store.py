"""Contract tests for gatewayd.state.store.StateStore, run against every backend.

A Redis backend added later joins `BACKENDS` and must pass the same table unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gatewayd.state import MemoryState, StateStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Factory = Callable[[FakeClock], StateStore]
BACKENDS: dict[str, Factory] = {"memory": lambda clock: MemoryState(clock=clock)}


@pytest.fixture(params=sorted(BACKENDS))
def clock_and_store(request: pytest.FixtureRequest) -> tuple[FakeClock, StateStore]:
    clock = FakeClock()
    return clock, BACKENDS[request.param](clock)


def test_backends_satisfy_the_protocol(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    assert isinstance(clock_and_store[1], StateStore)


async def test_add_once_is_true_exactly_once_until_expiry(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    clock, store = clock_and_store
    assert await store.add_once("k", 30) is True
    assert await store.add_once("k", 30) is False
    assert await store.get_int("k") == 1
    clock.now += 29.999
    assert await store.add_once("k", 30) is False
    clock.now += 0.001
    assert await store.add_once("k", 30) is True


async def test_add_once_concurrent_callers_one_winner(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    _, store = clock_and_store
    results = await asyncio.gather(*(store.add_once("race", 5) for _ in range(50)))
    assert results.count(True) == 1


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([1], 1),
        ([1, 1, 1], 3),
        ([5, -2], 3),
        ([-1], -1),
        ([1, -1], 0),
        ([10**12, 1], 10**12 + 1),
    ],
)
async def test_incr_adds(clock_and_store: tuple[FakeClock, StateStore], steps: list[int], expected: int) -> None:
    _, store = clock_and_store
    value = 0
    for amount in steps:
        value = await store.incr("c", 60, amount)
    assert value == expected
    assert await store.get_int("c") == expected


async def test_incr_expiry_slides_with_each_change(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    clock, store = clock_and_store
    await store.incr("c", 10)
    clock.now += 9
    assert await store.incr("c", 10) == 2  # still alive at t+9, re-armed to t+19
    clock.now += 9
    assert await store.get_int("c") == 2
    clock.now += 1
    assert await store.get_int("c") == 0
    assert await store.incr("c", 10) == 1  # starts again from zero


async def test_incr_on_an_add_once_flag_counts_from_one(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    _, store = clock_and_store
    await store.add_once("k", 10)
    assert await store.incr("k", 10) == 2


@pytest.mark.parametrize(("elapsed", "left"), [(0, 60.0), (15, 45.0), (59.5, 0.5)])
async def test_remaining_counts_down(clock_and_store: tuple[FakeClock, StateStore], elapsed: float, left: float) -> None:
    clock, store = clock_and_store
    await store.add_once("k", 60)
    clock.now += elapsed
    assert await store.remaining("k") == pytest.approx(left)


@pytest.mark.parametrize("elapsed", [60, 61, 10**6])
async def test_remaining_none_once_expired(clock_and_store: tuple[FakeClock, StateStore], elapsed: float) -> None:
    clock, store = clock_and_store
    await store.add_once("k", 60)
    clock.now += elapsed
    assert await store.remaining("k") is None
    assert await store.get_int("k") == 0


async def test_absent_keys(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    _, store = clock_and_store
    assert await store.get_int("nope") == 0
    assert await store.remaining("nope") is None
    await store.delete("nope")  # no error


async def test_delete_removes_several_keys(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    _, store = clock_and_store
    for key in ("a", "b", "c"):
        await store.add_once(key, 60)
    await store.delete("a", "c", "missing")
    assert [await store.get_int(k) for k in ("a", "b", "c")] == [0, 1, 0]
    assert await store.add_once("a", 60) is True


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
async def test_bad_ttl_is_refused(clock_and_store: tuple[FakeClock, StateStore], ttl: float) -> None:
    _, store = clock_and_store
    with pytest.raises(ValueError, match="ttl"):
        await store.add_once("k", ttl)
    with pytest.raises(ValueError, match="ttl"):
        await store.incr("k", ttl)


async def test_keys_are_independent(clock_and_store: tuple[FakeClock, StateStore]) -> None:
    clock, store = clock_and_store
    await store.incr("x", 5)
    await store.incr("y", 50)
    clock.now += 10
    assert (await store.get_int("x"), await store.get_int("y")) == (0, 1)
