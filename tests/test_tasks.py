"""Tests for gatewayd.tasks: cancel-and-wait finishes tasks and keeps the caller cancellable."""

from __future__ import annotations

import asyncio

import pytest

from gatewayd.tasks import cancel_and_wait, within


async def test_every_task_has_finished_when_it_returns() -> None:
    cleaned: list[str] = []

    async def worker(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(name)

    tasks = [asyncio.create_task(worker(n), name=n) for n in "abc"]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks)
    assert all(t.done() for t in tasks) and sorted(cleaned) == ["a", "b", "c"]


async def test_a_failed_task_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(broken(), name="broken-task")
    await asyncio.sleep(0)
    await cancel_and_wait([task])
    assert "broken-task had failed" in caplog.text


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # slow to stop

    inner = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait([inner]))
    await asyncio.sleep(0)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    inner.cancel()
    await asyncio.wait([inner])


async def test_nothing_to_do() -> None:
    await cancel_and_wait([])


@pytest.mark.parametrize("bounded", ["within", "bare"])
async def test_within_never_loses_a_cancellation_that_meets_the_result(bounded: str) -> None:
    """Python 3.11's wait_for returns the result here and the cancellation is gone (gh-86296):
    a named task cancelled at shutdown would then run on forever."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[int] = loop.create_future()

    async def waiter() -> int:
        return await (within(result, 10) if bounded == "within" else result)

    task = loop.create_task(waiter(), name="waiter")
    await asyncio.sleep(0)  # the task now waits for the result
    result.set_result(1)
    task.cancel()  # in the same loop iteration as the result
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_within_times_out() -> None:
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(10), 0.01)
    assert await within(asyncio.sleep(0, "done"), 1) == "done"


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_its_cancellation(
        caplog: pytest.LogCaptureFixture) -> None:
    """What a library read under its own timeout can do on Python 3.11 (gh-86296)."""
    swallowed = asyncio.Event()

    async def swallows_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # lost, like a cancellation that met a completing read
        await asyncio.sleep(3600)  # ... and the loop goes on

    task = asyncio.get_running_loop().create_task(swallows_once(), name="swallower")
    await asyncio.sleep(0)
    await within(cancel_and_wait([task]), 5)
    assert swallowed.is_set() and task.cancelled()
    assert "swallower ignored its cancellation" in caplog.text
