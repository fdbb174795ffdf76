"""Where shared, expiring state lives: the `StateStore` interface and its backends.

Brute-force counters, lockouts and the TOTP replay cache must be shared by every node of a
cluster, or an attacker simply spreads guesses (or replays a code) across nodes. They all go
through `StateStore`; `MemoryState` is the single-node default, a Redis backend will implement
the same interface for multi-node deployments.
"""

from gatewayd.state.memory import MemoryState
from gatewayd.state.store import StateStore

__all__ = ["MemoryState", "StateStore"]
