"""The callers of the shared state fail closed: gatewayd.identity.authenticator with a state
store that stops answering at any one point of a login or step-up.

`FlakyState` is a MemoryState that raises `StateUnavailable` on its n-th operation (fault
injection; the Redis backend raising it for real is in tests/test_state_redis.py and the
gateway end to end in tests/test_state_redis_gateway.py). For every n up to the number of
operations an attempt makes, the attempt must be refused as ``directory_unavailable`` with
detail ``state_unavailable`` — never signed in, never an exception.
"""

from __future__ import annotations

from pathlib import Path

import pyotp
import pytest
from argon2 import PasswordHasher

from gatewayd.identity.authenticator import Authenticator, LoginResult
from gatewayd.identity.filedir import FileDirectory, UserEntry, hash_password, render_users
from gatewayd.identity.regulation import RegulationPolicy, Regulator
from gatewayd.identity.totp import SecretStore, TotpVerifier
from gatewayd.state import MemoryState, StateUnavailable

FAST = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
NOW = 1_790_000_000.0
STEP = int(NOW // 30)
SOURCE = "192.0.2.10"


class FlakyState(MemoryState):
    """Counts operations; the ``fail_at``-th and every later one raises StateUnavailable."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at: int | None = None

    def _tick(self) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise StateUnavailable("redis redis://127.0.0.1:1/0: ConnectionError: refused")

    async def add_once(self, key: str, ttl: float) -> bool:
        self._tick()
        return await super().add_once(key, ttl)

    async def incr(self, key: str, ttl: float, amount: int = 1) -> int:
        self._tick()
        return await super().incr(key, ttl, amount)

    async def get_int(self, key: str) -> int:
        self._tick()
        return await super().get_int(key)

    async def remaining(self, key: str) -> float | None:
        self._tick()
        return await super().remaining(key)

    async def delete(self, *keys: str) -> None:
        self._tick()
        await super().delete(*keys)


class Emit:
    def __call__(self, event: str, /, **fields: object) -> object:
        return None


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    base = tmp_path_factory.mktemp("users")
    users_file = base / "users.toml"
    users_file.write_text(render_users([
        UserEntry("alice", hash_password("alice-password", FAST), frozenset({"staff"}))]))
    users_file.chmod(0o600)
    secret = SecretStore(base / "state").enroll("alice", operator="root")[0]
    return users_file, base / "state", secret


def authenticator(users: tuple[Path, Path, str], state: MemoryState,
                  policy: RegulationPolicy | None = None) -> Authenticator:
    users_file, state_dir, _ = users
    return Authenticator(
        FileDirectory(users_file, timeout=5),
        TotpVerifier(SecretStore(state_dir), state, audit_emit=Emit()),
        Regulator(state, policy or RegulationPolicy()), response_floor=0)


def code(users: tuple[Path, Path, str], offset: int = 0) -> str:
    return pyotp.TOTP(users[2]).generate_otp(STEP + offset)


def assert_refused_for_state(result: LoginResult) -> None:
    assert not result.ok and result.principal is None
    assert result.reason == "directory_unavailable"  # the frontends' "try again later" page
    assert result.detail == "state_unavailable"  # the audit record's reason


async def count_operations(users: tuple[Path, Path, str], password: str, typed: str,
                           policy: RegulationPolicy | None = None) -> tuple[int, LoginResult]:
    state = FlakyState()
    result = await authenticator(users, state, policy).login("alice", password, typed,
                                                             SOURCE, NOW)
    return state.calls, result


@pytest.mark.parametrize("password", ["alice-password", "wrong-password"])
async def test_login_is_refused_wherever_the_store_fails(
        users: tuple[Path, Path, str], password: str) -> None:
    total, healthy = await count_operations(users, password, code(users))
    assert healthy.ok is (password == "alice-password")
    assert total >= 4
    for fail_at in range(1, total + 1):
        state = FlakyState()
        state.fail_at = fail_at
        result = await authenticator(users, state).login("alice", password, code(users),
                                                         SOURCE, NOW)
        assert_refused_for_state(result)
        # The name is given to the audit log only because it is a real account.
        assert result.user == "alice"


async def test_a_failure_that_would_lock_the_account_is_refused_when_the_lock_cannot_be_set(
        users: tuple[Path, Path, str]) -> None:
    policy = RegulationPolicy(failures_before_backoff=50, lockout_after=1)
    total, healthy = await count_operations(users, "wrong", "000000", policy)
    assert healthy.lockout_started
    state = FlakyState()
    state.fail_at = total - 1  # the add_once of the lock (then the cleanup) fails
    result = await authenticator(users, state, policy).login("alice", "wrong", "000000",
                                                             SOURCE, NOW)
    assert_refused_for_state(result)
    assert not result.lockout_started


async def test_replay_claim_that_cannot_be_made_refuses_and_keeps_the_code_unused_elsewhere(
        users: tuple[Path, Path, str]) -> None:
    state = FlakyState()
    auth = authenticator(users, state)
    state.fail_at = 1
    assert_refused_for_state(await auth.login("alice", "alice-password", code(users),
                                              SOURCE, NOW))
    state.fail_at = None  # the store answers again: the same code still works (never claimed)
    result = await auth.login("alice", "alice-password", code(users), SOURCE, NOW)
    assert result.ok and result.principal is not None


async def test_step_up_is_refused_wherever_the_store_fails(
        users: tuple[Path, Path, str]) -> None:
    state = FlakyState()
    auth = authenticator(users, state)
    signed_in = await auth.login("alice", "alice-password", code(users), SOURCE, NOW)
    assert signed_in.ok and signed_in.principal is not None
    principal = signed_in.principal
    before = state.calls
    assert (await auth.step_up(principal, code(users, 1), SOURCE, NOW + 30)).ok
    total = state.calls - before
    for fail_at in range(1, total + 1):
        flaky = FlakyState()
        flaky.fail_at = fail_at
        result = await authenticator(users, flaky).step_up(principal, code(users, 1),
                                                           SOURCE, NOW + 30)
        assert_refused_for_state(result)


async def test_unknown_user_refusal_names_nobody(users: tuple[Path, Path, str]) -> None:
    state = FlakyState()
    state.fail_at = 1
    result = await authenticator(users, state).login("mallory", "x", "123456", SOURCE, NOW)
    assert_refused_for_state(result)
    assert result.user == ""
