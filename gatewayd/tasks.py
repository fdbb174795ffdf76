"""Waiting with a deadline, and stopping background tasks: cancel, wait, lose nothing.

`within` is the one way gatewayd bounds an await: ``asyncio.wait_for`` on Python 3.11 loses a
cancellation that arrives as the awaited work completes (it returns the result instead; fixed
in 3.12, gh-86296), and a named task whose cancellation is lost runs forever — a shutdown that
never ends. ``asyncio.timeout`` counts cancellations properly.

`cancel_and_wait` owns the one shutdown idiom every long-lived object uses for its named
tasks. ``await task`` inside ``suppress(CancelledError)`` would also swallow a cancellation
aimed at the *caller* (a stop that is itself being cancelled would carry on as if nothing
happened); waiting with `asyncio.wait` never raises the tasks' outcomes, so the caller's own
cancellation still propagates, and a task that had failed is logged rather than silently
dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, or TimeoutError after ``seconds`` (``asyncio.wait_for`` done right)."""
    async with asyncio.timeout(seconds):
        return await awaitable


RECANCEL_EVERY = 1.0  # seconds; see cancel_and_wait


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and return once every one of them has finished.

    A task still running a second after its cancel is cancelled again (and logged): library
    code we do not own (redis-py's reads under their own timeouts, asyncio.wait_for on 3.11)
    can swallow a cancellation that meets a completing operation, and a shutdown must not
    wait forever for a task that never heard it.
    """
    pending = set(tasks)
    tasks = list(pending)
    for task in tasks:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY)
        for task in pending:
            log.warning("task %s ignored its cancellation; cancelling it again",
                        task.get_name())
            task.cancel()
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s had failed", task.get_name(), exc_info=task.exception())
