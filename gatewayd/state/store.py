"""The `StateStore` protocol: small, atomic operations on expiring integer keys.

Every operation is one atomic step on one key, so that each maps onto one Redis command
(``SET NX PX``, ``INCRBY`` + ``PEXPIRE`` in a ``MULTI``, ``GET``, ``PTTL``, ``DEL``) and stays
correct when several nodes race. Nothing here reads a wall clock: expiry is relative (``ttl``
in seconds), and each backend measures it on its own clock.

Key names are chosen by callers and namespaced by them (``totp:used:…``, ``login:fail:…``);
they must not contain secrets in the clear (hash user-supplied material first).

**Failure.** A backend that cannot answer (Redis down, hung, refusing our credentials) raises
`StateUnavailable` from every operation, promptly (within its configured timeout), and answers
again by itself once the store is back. Callers fail closed on it: a login whose regulation
or replay check cannot be made is refused. `MemoryState` never raises it.

`StateBackend` adds what the composition root needs on top of `StateStore`: a health check
for ``/readyz`` and ``close()``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable


class StateUnavailable(Exception):  # noqa: N818 - reads as a condition, like TimeoutError
    """The shared state store cannot answer now; the operation may or may not have happened.

    The message says why (timeout, connection refused, authentication refused …) and never
    contains a credential, so it may be logged as is.
    """


def check_ttl(ttl: float) -> None:
    """Refuse a TTL that is not a positive, finite number of seconds (ValueError)."""
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


@runtime_checkable
class StateStore(Protocol):
    """Expiring integer counters and flags shared by every gateway node."""

    async def add_once(self, key: str, ttl: float) -> bool:
        """Create ``key`` (value 1) expiring in ``ttl`` s; False if it already existed.

        Exactly one of any number of concurrent callers gets True: this is the primitive for
        "accept this once" (TOTP replay cache) and for single-holder slots.
        """
        ...

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        """Add ``amount`` to ``key`` (absent counts as 0); it now expires ``ttl`` s from now.

        Returns the new value. The expiry slides with every call: a counter disappears
        ``ttl`` seconds after its last change.
        """
        ...

    async def get_int(self, key: str) -> int:
        """The value of ``key``, or 0 when it is absent or expired."""
        ...

    async def remaining(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None when it is absent or expired."""
        ...

    async def delete(self, *keys: str) -> None:
        """Remove the keys (absent keys are ignored)."""
        ...


@runtime_checkable
class StateBackend(StateStore, Protocol):
    """A `StateStore` as the Gateway holds it: with a health check and a close."""

    async def check(self) -> None:
        """Return when the store answers; raise `StateUnavailable` (within the timeout) if not."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...
