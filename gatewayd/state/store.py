"""The `StateStore` protocol: small, atomic operations on expiring integer keys.

Every operation is one atomic step on one key, so that each maps onto one Redis command
(``SET NX PX``, ``INCRBY`` + ``PEXPIRE`` in a ``MULTI``, ``GET``, ``PTTL``, ``DEL``) and stays
correct when several nodes race. Nothing here reads a wall clock: expiry is relative (``ttl``
in seconds), and each backend measures it on its own clock.

Key names are chosen by callers and namespaced by them (``totp:used:…``, ``login:fail:…``);
they must not contain secrets in the clear (hash user-supplied material first).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
