"""Brute-force regulation: per-account and per-source back-off, account lockout, pacing.

Owns the counters that slow down password and TOTP guessing, kept in the shared
`StateStore` so that spreading guesses over several nodes gains nothing. Settings come from
the ``[login]`` section:

* **Per account** (the typed user name, normalised as for lookup — existing or not, so the
  answers never reveal which accounts exist): the first ``failures_before_backoff``
  consecutive failures are free; from then on each further attempt must wait
  ``backoff_initial * 2^k`` (capped at ``backoff_max``) after the previous one. After
  ``lockout_after`` consecutive failures the account is locked for ``lockout_duration`` —
  never more than that many guesses in a row. A success resets the account.
* **Per source** (an IPv4 address, or the /64 of an IPv6 address — one home connection
  owns a whole /64): the same back-off curve after ``SOURCE_FACTOR *
  failures_before_backoff`` failures, against password spraying over many accounts. There
  is no hard lock per source (it would lock out a whole office behind one NAT), and a
  success does not reset it, so one valid account cannot be used to launder guesses
  against others.

Race-free by construction: an attempt is counted *before* the password is checked
(``incr``), and once in the back-off regime it must also win the single "wait" slot
(``add_once``), so a burst of parallel guesses gets at most ``failures_before_backoff``
attempts through, not one per connection. Attempts refused while throttled or locked are
not counted (they cost the attacker nothing, but they extend nothing either).

Every method passes `StateUnavailable` from the store through (a shared store that cannot
answer): the `Authenticator` refuses the attempt, as it must not guess the counters.

`ResponsePacer` makes every login answer take at least the same time, so early refusals
(locked, throttled, malformed input) are not distinguishable by timing from full checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from gatewayd.identity.directory import lookup_key
from gatewayd.state.store import StateStore

if TYPE_CHECKING:
    from gatewayd.config import LoginSettings

SOURCE_FACTOR: Final = 4
IPV6_PREFIX: Final = 64


@dataclass(frozen=True, slots=True)
class RegulationPolicy:
    """The ``[login]`` settings as seconds and counts."""

    failures_before_backoff: int = 5
    backoff_initial: float = 2.0
    backoff_max: float = 900.0
    lockout_after: int = 100
    lockout_duration: float = 3600.0

    @classmethod
    def from_settings(cls, login: LoginSettings) -> RegulationPolicy:
        return cls(
            failures_before_backoff=login.failures_before_backoff,
            backoff_initial=login.backoff_initial.total_seconds(),
            backoff_max=login.backoff_max.total_seconds(),
            lockout_after=login.lockout_after,
            lockout_duration=login.lockout_duration.total_seconds(),
        )

    def delay(self, failures: int, threshold: int) -> float:
        """The wait after ``failures`` consecutive failures (0 below ``threshold``)."""
        if failures < threshold:
            return 0.0
        exponent = min(failures - threshold, 64)  # 2**64 * anything is past any cap
        return min(self.backoff_initial * 2.0**exponent, self.backoff_max)

    @property
    def account_counter_ttl(self) -> float:
        # Longer than the longest wait, so a patient attacker's count does not evaporate.
        return max(self.lockout_duration, 2 * self.backoff_max)

    @property
    def source_counter_ttl(self) -> float:
        return 2 * self.backoff_max


@dataclass(frozen=True, slots=True)
class Refusal:
    """The attempt may not proceed now. reason is "locked" or "throttled"."""

    reason: Literal["locked", "throttled"]
    retry_after: float


@dataclass(frozen=True, slots=True)
class Attempt:
    """A counted attempt in progress; finish it with succeeded/failed/abandon."""

    account: str
    source: str
    account_failures: int  # including this attempt, should it fail
    holds_account_wait: bool
    holds_source_wait: bool


def account_key(username: str) -> str:
    """Counter id of a typed user name: the lookup key, hashed (keys never carry input)."""
    key = lookup_key(username)
    material = f"k:{key}" if key is not None else f"raw:{username}"
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def source_key(source_ip: str) -> str:
    """Counter id of a client address: the IPv4 address or the IPv6 /64, hashed."""
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        material = f"raw:{source_ip}"
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if isinstance(address, ipaddress.IPv6Address):
            material = str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
        else:
            material = str(address)
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Regulator:
    """Counts login and step-up attempts in the shared state and refuses the excess."""

    def __init__(self, state: StateStore, policy: RegulationPolicy) -> None:
        self.state = state
        self.policy = policy

    async def begin(self, username: str, source_ip: str) -> Attempt | Refusal:
        """Count an attempt before checking anything, or refuse it (locked / throttled)."""
        account, source = account_key(username), source_key(source_ip)
        locked = await self.state.remaining(_lock(account))
        if locked is not None:
            return Refusal("locked", locked)
        for wait in (_wait("u", account), _wait("s", source)):
            left = await self.state.remaining(wait)
            if left is not None:
                return Refusal("throttled", left)
        policy = self.policy
        n_account = await self.state.incr(_fails("u", account), policy.account_counter_ttl)
        n_source = await self.state.incr(_fails("s", source), policy.source_counter_ttl)
        if n_account > policy.lockout_after:
            # Parallel attempts raced past the last allowed one, whose outcome decides
            # whether the account locks: wait for it.
            await self._uncount(account, source)
            return Refusal("throttled", policy.backoff_initial)
        holds_account = await self._claim_wait(
            _wait("u", account), policy.delay(n_account, policy.failures_before_backoff))
        if holds_account is False:
            await self._uncount(account, source)
            return await self._throttled(_wait("u", account))
        holds_source = await self._claim_wait(
            _wait("s", source),
            policy.delay(n_source, SOURCE_FACTOR * policy.failures_before_backoff))
        if holds_source is False:
            await self._uncount(account, source)
            if holds_account:
                await self.state.delete(_wait("u", account))
            return await self._throttled(_wait("s", source))
        return Attempt(account, source, n_account, bool(holds_account), bool(holds_source))

    async def succeeded(self, attempt: Attempt) -> None:
        """All factors were right: the account starts afresh; the source forgets this one."""
        await self.state.delete(_fails("u", attempt.account), _wait("u", attempt.account))
        await self.state.incr(_fails("s", attempt.source), self.policy.source_counter_ttl, -1)
        if attempt.holds_source_wait:
            await self.state.delete(_wait("s", attempt.source))

    async def failed(self, attempt: Attempt) -> bool:
        """A factor was wrong (already counted); True if this failure started a lockout."""
        if attempt.account_failures < self.policy.lockout_after:
            return False
        started = await self.state.add_once(_lock(attempt.account), self.policy.lockout_duration)
        # The lock now speaks for these failures; after it expires the count starts again.
        await self.state.delete(_fails("u", attempt.account), _wait("u", attempt.account))
        return started

    async def abandon(self, attempt: Attempt) -> None:
        """The attempt could not be judged (directory down): it counts for nothing."""
        await self._uncount(attempt.account, attempt.source)
        if attempt.holds_account_wait:
            await self.state.delete(_wait("u", attempt.account))
        if attempt.holds_source_wait:
            await self.state.delete(_wait("s", attempt.source))

    async def release(self, username: str) -> None:
        """Lift a lockout and back-off for an account (help desk, after identity checks)."""
        account = account_key(username)
        await self.state.delete(_lock(account), _fails("u", account), _wait("u", account))

    async def locked_for(self, username: str) -> float | None:
        """Seconds left on the account's lockout, or None."""
        return await self.state.remaining(_lock(account_key(username)))

    # --- internals -------------------------------------------------------------------------

    async def _claim_wait(self, key: str, delay: float) -> bool | None:
        """None: no back-off due; True: this attempt holds the wait slot; False: another does."""
        if delay <= 0:
            return None
        return await self.state.add_once(key, delay)

    async def _throttled(self, wait_key: str) -> Refusal:
        left = await self.state.remaining(wait_key)
        return Refusal("throttled", left if left is not None else self.policy.backoff_initial)

    async def _uncount(self, account: str, source: str) -> None:
        policy = self.policy
        await self.state.incr(_fails("u", account), policy.account_counter_ttl, -1)
        await self.state.incr(_fails("s", source), policy.source_counter_ttl, -1)


def _fails(scope: str, ident: str) -> str:
    return f"login:fails:{scope}:{ident}"


def _wait(scope: str, ident: str) -> str:
    return f"login:wait:{scope}:{ident}"


def _lock(account: str) -> str:
    return f"login:lock:u:{account}"


class ResponsePacer:
    """Hold every answer until ``floor`` seconds after the attempt started.

    A refusal decided from a counter takes microseconds, a full check an argon2 computation;
    without pacing, the response time would tell an attacker which one happened.
    """

    def __init__(self, floor: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.floor = floor
        self._clock = clock
        self._sleep = sleep

    def start(self) -> float:
        return self._clock()

    async def finish(self, started: float) -> None:
        left = started + self.floor - self._clock()
        if left > 0:
            await self._sleep(left)
