"""Stopping background tasks: cancel, wait until they have really finished, lose nothing.

Owns the one shutdown idiom every long-lived object uses for its named tasks. ``await task``
inside ``suppress(CancelledError)`` would also swallow a cancellation aimed at the *caller*
(a stop that is itself being cancelled would carry on as if nothing happened); waiting with
`asyncio.wait` never raises the tasks' outcomes, so the caller's own cancellation still
propagates, and a task that had failed is logged rather than silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and return once every one of them has finished."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s had failed", task.get_name(), exc_info=task.exception())
