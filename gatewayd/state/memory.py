"""`MemoryState`: the single-node `StateStore`, a dict with expiry on an injected clock.

Owns the expiring keys of one process. Memory stays bounded by the live keys: expired keys
are purged on every operation using a min-heap of expiry times (stale heap entries for keys
that were updated or deleted are skipped, and the heap is rebuilt when they dominate), so an
attacker submitting endless distinct user names fills memory only for as long as the TTLs
the regulation chose.

Used from the event loop only (no locks): each method runs to completion without awaiting,
which is what makes every operation atomic.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from gatewayd.state.store import check_ttl


@dataclass(slots=True)
class _Entry:
    value: int
    expires: float


class MemoryState:
    """In-process `StateStore`; ``clock`` is monotonic seconds (a fake one in tests)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """Number of live keys (after purging the expired ones)."""
        self._purge(self._clock())
        return len(self._entries)

    async def add_once(self, key: str, ttl: float) -> bool:
        check_ttl(ttl)
        now = self._clock()
        self._purge(now)
        if key in self._entries:
            return False
        self._set(key, 1, now + ttl)
        return True

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        check_ttl(ttl)
        now = self._clock()
        self._purge(now)
        entry = self._entries.get(key)
        value = (entry.value if entry is not None else 0) + amount
        self._set(key, value, now + ttl)
        return value

    async def get_int(self, key: str) -> int:
        entry = self._live(key)
        return 0 if entry is None else entry.value

    async def remaining(self, key: str) -> float | None:
        now = self._clock()
        entry = self._live(key, now)
        return None if entry is None else entry.expires - now

    async def delete(self, *keys: str) -> None:
        self._purge(self._clock())
        for key in keys:
            self._entries.pop(key, None)

    async def check(self) -> None:
        """Always answers: the state lives in this process."""

    async def close(self) -> None:
        """Nothing to release (the keys go with the object)."""

    # --- internals -------------------------------------------------------------------------

    def _live(self, key: str, now: float | None = None) -> _Entry | None:
        self._purge(self._clock() if now is None else now)
        return self._entries.get(key)

    def _set(self, key: str, value: int, expires: float) -> None:
        self._entries[key] = _Entry(value, expires)
        heapq.heappush(self._expiries, (expires, key))
        # Updates leave stale heap items behind; rebuild before they outnumber live keys.
        if len(self._expiries) > 2 * len(self._entries) + 64:
            self._expiries = [(e.expires, k) for k, e in self._entries.items()]
            heapq.heapify(self._expiries)

    def _purge(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            # Only the heap item matching the key's current expiry removes it; older items
            # are leftovers of an update (the key was re-armed with a later expiry).
            if entry is not None and entry.expires == expires:
                del self._entries[key]
