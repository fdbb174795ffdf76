"""Tests for gatewayd.state.memory.MemoryState: purging and bounded memory."""

from __future__ import annotations

import pytest

from gatewayd.state import MemoryState


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_expired_keys_are_purged_without_being_read() -> None:
    clock = FakeClock()
    store = MemoryState(clock=clock)
    for i in range(1000):
        await store.add_once(f"user:{i}", 60)
    assert len(store) == 1000
    clock.now += 60
    assert len(store) == 0
    assert store._expiries == []  # the heap is drained as well


async def test_purge_respects_re_armed_expiry() -> None:
    clock = FakeClock()
    store = MemoryState(clock=clock)
    await store.incr("c", 10)
    clock.now = 8
    await store.incr("c", 10)  # now expires at 18; the heap item for 10 is stale
    clock.now = 10
    assert await store.get_int("c") == 2
    clock.now = 18
    assert await store.get_int("c") == 0


async def test_deleted_then_recreated_key_keeps_its_new_expiry() -> None:
    clock = FakeClock()
    store = MemoryState(clock=clock)
    await store.add_once("k", 10)
    await store.delete("k")
    clock.now = 5
    await store.add_once("k", 10)  # expires at 15
    clock.now = 12
    assert await store.get_int("k") == 1


@pytest.mark.parametrize("updates", [100, 10_000])
async def test_heap_stays_proportional_to_live_keys(updates: int) -> None:
    clock = FakeClock()
    store = MemoryState(clock=clock)
    for i in range(updates):
        clock.now = i * 0.001
        await store.incr("hot", 3600)  # one live key, many stale heap items
    assert len(store) == 1
    assert len(store._expiries) <= 2 * 1 + 64 + 1


async def test_default_clock_is_monotonic_and_works() -> None:
    store = MemoryState()
    assert await store.add_once("k", 60)
    remaining = await store.remaining("k")
    assert remaining is not None and 59 < remaining <= 60
