"""Where shared, expiring state lives: the `StateStore` interface, its backends, and
`build_state`, which picks the backend ``[state]`` names.

Brute-force counters, lockouts and the TOTP replay cache must be shared by every node of a
cluster, or an attacker simply spreads guesses (or replays a code) across nodes. They all go
through `StateStore`; `MemoryState` is the single-node default, `RedisState`
(``state.backend = "redis"``) the multi-node backend. Either may be asked for health and
closed (`StateBackend`); only the Redis one can be unavailable (`StateUnavailable`).

With Redis the sessions are shared too: `gatewayd.state.sessions` keeps their records and
change channel on the same connection pool, for `gatewayd.sessions_shared`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gatewayd.state.memory import MemoryState
from gatewayd.state.store import StateBackend, StateStore, StateUnavailable

if TYPE_CHECKING:
    from gatewayd.config import Settings

__all__ = ["MemoryState", "StateBackend", "StateStore", "StateUnavailable", "build_state"]


def build_state(settings: Settings, clock: Callable[[], float]) -> StateBackend:
    """The state store of one node: ``memory`` on ``clock`` (monotonic seconds), or Redis.

    Builds the Redis client without connecting: a Redis that is down at start makes the node
    not ready and refuses logins (`StateUnavailable`) until it answers, without a restart.
    """
    state = settings.state
    if state.backend == "redis":
        # Imported here: a single node never loads the Redis client.
        from gatewayd.state.redis import RedisState  # noqa: PLC0415 - backend choice

        return RedisState(state.url, key_prefix=state.key_prefix,
                          timeout=state.timeout.total_seconds(), username=state.username,
                          password_file=state.password_file, ca_file=state.ca_file)
    return MemoryState(clock=clock)
