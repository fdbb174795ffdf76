"""Contract tests for gatewayd.state.store.StateStore, run against every backend.

Each backend comes with a way to let time pass: `MemoryState` runs on a fake clock; for
`RedisState` (a real redis-server, tests/redis_server.py) the test shortens every key's TTL
on the server by the elapsed time, deleting those that reach zero — what the server's own
clock would have done, without sleeping. Real expiry on the server's clock is covered in
tests/test_state_redis.py. Because real milliseconds pass between steps on Redis, its
answers are compared with a tolerance and boundaries are approached with a margin.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer, running_redis

from gatewayd.state import MemoryState, StateBackend, StateStore
from gatewayd.state.redis import RedisState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A store under test and how to move its time forward."""

    store: StateBackend
    clock: FakeClock | None = None  # memory
    raw: Redis | None = None  # redis: a direct client for the "time machine"
    prefix: str = ""
    tolerance: float = 1e-9  # seconds of slack in TTL answers
    margin: float = 0.001  # how close to a boundary a "still there" step may go

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
            return
        assert self.raw is not None
        elapsed = round(seconds * 1000)
        async for name in self.raw.scan_iter(match=self.prefix + "*"):
            left = int(await self.raw.pttl(name)) - elapsed
            if left <= 0:
                await self.raw.delete(name)
            else:
                await self.raw.pexpire(name, left)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = FakeClock()
        yield Backend(MemoryState(clock=clock), clock=clock)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"contract-{uuid.uuid4().hex[:8]}:"  # a fresh namespace per test
    store = RedisState(server.url, key_prefix=prefix)
    raw = Redis.from_url(server.url)
    try:
        yield Backend(store, raw=raw, prefix=prefix, tolerance=0.1, margin=0.2)
    finally:
        await store.close()
        await raw.aclose()


def test_backends_satisfy_the_protocol(backend: Backend) -> None:
    assert isinstance(backend.store, StateStore)
    assert isinstance(backend.store, StateBackend)


async def test_check_answers(backend: Backend) -> None:
    await backend.store.check()  # raises StateUnavailable if not


async def test_add_once_is_true_exactly_once_until_expiry(backend: Backend) -> None:
    store = backend.store
    assert await store.add_once("k", 30) is True
    assert await store.add_once("k", 30) is False
    assert await store.get_int("k") == 1
    await backend.advance(30 - backend.margin)
    assert await store.add_once("k", 30) is False
    await backend.advance(backend.margin)
    assert await store.add_once("k", 30) is True


async def test_add_once_concurrent_callers_one_winner(backend: Backend) -> None:
    results = await asyncio.gather(*(backend.store.add_once("race", 5) for _ in range(50)))
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
async def test_incr_adds(backend: Backend, steps: list[int], expected: int) -> None:
    store = backend.store
    value = 0
    for amount in steps:
        value = await store.incr("c", 60, amount)
    assert value == expected
    assert await store.get_int("c") == expected


async def test_incr_concurrent_callers_sum_exactly(backend: Backend) -> None:
    amounts = [1, 2, -1, 5] * 25
    await asyncio.gather(*(backend.store.incr("sum", 60, n) for n in amounts))
    assert await backend.store.get_int("sum") == sum(amounts)


async def test_incr_expiry_slides_with_each_change(backend: Backend) -> None:
    store = backend.store
    await store.incr("c", 10)
    await backend.advance(9)
    assert await store.incr("c", 10) == 2  # still alive at t+9, re-armed to t+19
    await backend.advance(10 - backend.margin)
    assert await store.get_int("c") == 2
    await backend.advance(backend.margin)
    assert await store.get_int("c") == 0
    assert await store.incr("c", 10) == 1  # starts again from zero


async def test_incr_on_an_add_once_flag_counts_from_one(backend: Backend) -> None:
    await backend.store.add_once("k", 10)
    assert await backend.store.incr("k", 10) == 2


@pytest.mark.parametrize(("elapsed", "left"), [(0, 60.0), (15, 45.0), (59.5, 0.5)])
async def test_remaining_counts_down(backend: Backend, elapsed: float, left: float) -> None:
    await backend.store.add_once("k", 60)
    await backend.advance(elapsed)
    assert await backend.store.remaining("k") == pytest.approx(left, abs=backend.tolerance)


@pytest.mark.parametrize("elapsed", [60, 61, 10**6])
async def test_remaining_none_once_expired(backend: Backend, elapsed: float) -> None:
    await backend.store.add_once("k", 60)
    await backend.advance(elapsed)
    assert await backend.store.remaining("k") is None
    assert await backend.store.get_int("k") == 0


async def test_absent_keys(backend: Backend) -> None:
    store = backend.store
    assert await store.get_int("nope") == 0
    assert await store.remaining("nope") is None
    await store.delete("nope")  # no error
    await store.delete()  # nothing to delete: no error either


async def test_delete_removes_several_keys(backend: Backend) -> None:
    store = backend.store
    for key in ("a", "b", "c"):
        await store.add_once(key, 60)
    await store.delete("a", "c", "missing")
    assert [await store.get_int(k) for k in ("a", "b", "c")] == [0, 1, 0]
    assert await store.add_once("a", 60) is True


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
async def test_bad_ttl_is_refused(backend: Backend, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await backend.store.add_once("k", ttl)
    with pytest.raises(ValueError, match="ttl"):
        await backend.store.incr("k", ttl)
    assert await backend.store.get_int("k") == 0  # nothing was written


async def test_sub_millisecond_ttl_still_creates_the_key(backend: Backend) -> None:
    assert await backend.store.add_once("tiny", 1e-6) is True
    await backend.advance(0.001)
    assert await backend.store.get_int("tiny") == 0


async def test_keys_are_independent(backend: Backend) -> None:
    store = backend.store
    await store.incr("x", 5)
    await store.incr("y", 50)
    await backend.advance(10)
    assert (await store.get_int("x"), await store.get_int("y")) == (0, 1)


async def test_keys_are_arbitrary_text(backend: Backend) -> None:
    store = backend.store
    names = ["totp:used:山田:123", "with space", "a*b?[c]", "x" * 300]
    for name in names:
        assert await store.add_once(name, 60) is True
    assert [await store.get_int(name) for name in names] == [1] * len(names)
