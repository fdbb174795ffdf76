"""`RedisState`: the multi-node `StateStore`, kept on a Redis server every node talks to.

Owns one connection pool to one Redis (redis-py's asyncio client) and the mapping of each
`StateStore` operation onto one atomic server-side step, so that nodes racing on the same
key stay correct:

* ``add_once`` → ``SET key 1 NX PX ttl`` (exactly one caller creates the key);
* ``incr`` → ``MULTI; INCRBY key n; PEXPIRE key ttl; EXEC`` (the count and its sliding
  expiry change together; no client sees a counter without an expiry);
* ``get_int`` → ``GET``; ``remaining`` → ``PTTL``; ``delete`` → ``DEL``.

Expiry is measured by the Redis server's clock, the one clock every node shares; TTLs are
sent in milliseconds, rounded up (a key never expires earlier than asked).

**Keys** are the callers' names behind ``key_prefix`` (default ``gatewayd:``), so several
deployments (a test ward next to production) can share one Redis without seeing each other.

**Failure.** Every operation is bounded by ``timeout`` as a whole (waiting for a pooled
connection, connecting, TLS, AUTH, the command). Whatever goes wrong — refused, reset, hung,
TLS verification, AUTH refused, an unexpected reply — surfaces as `StateUnavailable` with a
reason and without a credential; the callers fail closed. There is no retry inside an
operation (an ``INCRBY`` whose answer was lost must not be applied twice) and no circuit
breaker: every new operation simply tries again, so service comes back on its own as soon as
Redis does. Pooled connections that died with the old server are detected when they are
taken from the pool and replaced. The transitions down/up are logged once each, not per
operation.

**Observing.** Every call carries an operation name from `OPERATIONS` (a closed set: the
metric label ``gatewayd_state_errors_total{operation}``); ``observer(operation, ok)``, if
set (the `Gateway` sets it to its metrics), hears the outcome of each call — also of the
calls other modules make through `run` or report with `report` (the session subscriber).

**Credentials.** Never in the URL (refused, as in the config). The password is read from
``password_file`` whenever a new connection authenticates — a rotated password is picked up
without a restart — and, with ``username``, sent as an ACL ``AUTH user password``. With
``rediss://`` the server certificate is verified (hostname included) against the system store
plus ``ca_file``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError, RedisError

from gatewayd.config import parse_redis_url
from gatewayd.metrics import STATE_OPERATIONS
from gatewayd.state.store import StateUnavailable, check_ttl

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a call was for (the closed label set of gatewayd_state_errors_total): the StateStore
# operations — "add_once" (lockouts, login waits, the TOTP replay cache), "counter" (failure
# counters: incr/get/ttl/delete), "ping" (readiness, idle sync) — and the shared sessions'
# (gatewayd.state.sessions): "admit", "lookup", "refresh", "end", "rotate", "heartbeat",
# "subscribe" (the session channel) — and "blocks" (the gateway's user blocks:
# gatewayd.identity.blocks).
OPERATIONS: Final = STATE_OPERATIONS
Observer = Callable[[str, bool], None]

POOL_SIZE: Final = 32  # connections per node; operations beyond wait (bounded by the timeout)
CLIENT_NAME: Final = "gatewayd"  # shows in CLIENT LIST, for the Redis operator


def read_password(path: Path) -> str:
    """The password: the file's text without its final line break (AuthenticationError if
    it cannot be read or is empty — reported like a refused AUTH, without the content)."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthenticationError(f"password_file {path}: cannot read it "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
    if st.st_mode & 0o004:
        log.warning("state.password_file %s is world-readable: run chmod o-r on it", path)
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise AuthenticationError(f"password_file {path} is empty")
    return secret


class PasswordFile(CredentialProvider):
    """Credentials for each new connection, read from the file at that moment."""

    def __init__(self, path: Path, username: str = "") -> None:
        self.path = path
        self.username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = read_password(self.path)
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return await asyncio.to_thread(self.get_credentials)

    def __repr__(self) -> str:  # never the password, should a library log the provider
        return f"PasswordFile({str(self.path)!r}, username={self.username!r})"


def _milliseconds(ttl: float) -> int:
    check_ttl(ttl)
    # round() first: 2.007 s times 1000 is 2007.0000000000002 in binary floating point,
    # which ceil() would turn into 2008.
    return max(1, math.ceil(round(ttl * 1000, 6)))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisState:
    """`StateStore` (and `StateBackend`) on Redis; see the module docstring."""

    def __init__(self, url: str, *, key_prefix: str = "gatewayd:", timeout: float = 1.0,
                 username: str = "", password_file: Path | None = None,
                 ca_file: Path | None = None, pool_size: int = POOL_SIZE) -> None:
        parse_redis_url(url)  # ValueError: no credentials in a URL that reaches the logs
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if username and password_file is None:
            raise ValueError("an ACL username needs a password_file")
        self.url = url
        self.key_prefix = key_prefix
        self.timeout = timeout
        tls: dict[str, object] = {}
        if url.startswith("rediss://"):
            # create_default_context underneath: TLS >= 1.2, certificate and hostname checked.
            tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True,
                   "ssl_ca_certs": str(ca_file) if ca_file is not None else None}
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, client_name=CLIENT_NAME,
            credential_provider=(PasswordFile(password_file, username)
                                 if password_file is not None else None),
            **tls)
        self._redis = Redis(connection_pool=self._pool)
        self._available = True  # only for logging the transitions once
        self.observer: Observer | None = None

    def __repr__(self) -> str:
        return f"RedisState({self.url!r}, key_prefix={self.key_prefix!r})"

    # --- StateStore --------------------------------------------------------------------------

    async def add_once(self, key: str, ttl: float) -> bool:
        px = _milliseconds(ttl)
        created = await self._run(lambda: self._redis.set(self._key(key), 1, nx=True, px=px),
                                  "add_once")
        return bool(created)

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        px, name = _milliseconds(ttl), self._key(key)

        async def transaction() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(name, amount)
                pipe.pexpire(name, px)
                value, _ = await pipe.execute()
            return int(value)

        return await self._run(transaction, "counter")

    async def get_int(self, key: str) -> int:
        raw = await self._run(lambda: self._redis.get(self._key(key)), "counter")
        if raw is None:
            return 0
        try:
            return int(raw)
        except ValueError:
            raise self._down("a key under the prefix holds a non-integer value (written by "
                             "something other than gatewayd?)") from None

    async def remaining(self, key: str) -> float | None:
        ms = int(await self._run(lambda: self._redis.pttl(self._key(key)), "counter"))
        if ms == -2:  # absent (or expired)
            return None
        if ms < 0:
            # Every write here sets an expiry atomically; a key without one was written by
            # hand. Treating it as "no lock" would fail open, as "forever" would lock for good.
            raise self._down("a key under the prefix has no expiry (written by something "
                             "other than gatewayd?)")
        return ms / 1000

    async def delete(self, *keys: str) -> None:
        if keys:
            names = [self._key(key) for key in keys]
            await self._run(lambda: self._redis.delete(*names), "counter")

    # --- StateBackend ------------------------------------------------------------------------

    async def check(self) -> None:
        await self._run(self._redis.ping, "ping")

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()

    # --- for the other Redis users of this node (gatewayd.state.sessions) ---------------------

    @property
    def client(self) -> Redis:
        """The client on this store's pool (to register scripts, open a subscriber)."""
        return self._redis

    async def run(self, operation: Callable[[], Awaitable[T]], name: str) -> T:
        """Run ``operation`` bounded and mapped exactly like this store's own operations;
        ``name`` is its label in `OPERATIONS`."""
        return await self._run(operation, name)

    def report(self, name: str, ok: bool) -> None:
        """Tell the observer how a call made elsewhere went (never raises)."""
        if self.observer is not None:
            try:
                self.observer(name, ok)
            except Exception:
                log.exception("state observer failed")

    # --- internals ---------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    async def _run(self, operation: Callable[[], Awaitable[T]], name: str) -> T:
        """One operation within ``timeout``; any failure becomes `StateUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout):
                result = await operation()
        except TimeoutError:  # our deadline; a cancellation from outside propagates as is
            self.report(name, False)
            raise self._down(f"no answer within {self.timeout:g}s") from None
        except (RedisError, OSError) as exc:
            self.report(name, False)
            raise self._down(_describe(exc)) from None
        self.report(name, True)
        if not self._available:
            self._available = True
            log.warning("state store %s answers again", self.url)
        return result

    def _down(self, reason: str) -> StateUnavailable:
        if self._available:
            self._available = False
            log.warning("state store %s unavailable: %s; logins are refused until it "
                        "answers", self.url, reason)
        return StateUnavailable(f"redis {self.url}: {reason}")
