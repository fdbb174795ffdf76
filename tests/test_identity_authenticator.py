"""Tests for gatewayd.identity.authenticator: one generic failure, replay, regulation, pacing."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import pyotp
import pytest
from argon2 import PasswordHasher

from gatewayd.audit import AuditWriteError
from gatewayd.config import settings_from_mapping
from gatewayd.identity.authenticator import (
    Authenticator,
    LoginResult,
    UserBlocked,
    build_authenticator,
)
from gatewayd.identity.blocks import UserBlocks
from gatewayd.identity.directory import DirectoryUnavailable
from gatewayd.identity.filedir import FileDirectory, UserEntry, hash_password, render_users
from gatewayd.identity.principal import Principal
from gatewayd.identity.regulation import RegulationPolicy, Regulator
from gatewayd.identity.totp import SecretStore, TotpVerifier
from gatewayd.state import MemoryState, StateUnavailable

FAST = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
NOW = 1_790_000_000.0
STEP = int(NOW // 30)
SOURCE = "192.0.2.10"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []
        self.fail = False

    def __call__(self, event: str, /, **fields: object) -> object:
        if self.fail:
            raise AuditWriteError(event, 1, OSError(28, "No space left on device"))
        self.events.append((event, fields))
        return None


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {u: hash_password(f"{u}-password", FAST) for u in ("alice", "bob", "carol", "dave")}


class World:
    """A real file directory, real encrypted TOTP store, shared MemoryState, fake clocks."""

    def __init__(self, tmp_path: Path, hashes: dict[str, str], policy: RegulationPolicy) -> None:
        self.users_file = tmp_path / "users.toml"
        self.hashes = hashes
        self.write_users()
        self.store = SecretStore(tmp_path / "state")
        self.secrets = {u: self.store.enroll(u, operator="root")[0] for u in ("alice", "bob", "carol")}
        self.state_clock = [0.0]
        self.state = MemoryState(clock=lambda: self.state_clock[0])
        self.audit = Recorder()
        self.sleeps: list[float] = []
        self.auth = Authenticator(
            FileDirectory(self.users_file, timeout=5),
            TotpVerifier(self.store, self.state, audit_emit=self.audit),
            Regulator(self.state, policy),
            response_floor=0.35, clock=lambda: 100.0, sleep=self._sleep,
        )

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def write_users(self, *, bob_groups: tuple[str, ...] = ("telework-managers",), bob_disabled: bool = False) -> None:
        entries = [
            UserEntry("alice", self.hashes["alice"], frozenset({"telework-staff"}), {"office_pc": "pc-1"}),
            UserEntry("Bob", self.hashes["bob"], frozenset(bob_groups), disabled=bob_disabled),
            UserEntry("carol", self.hashes["carol"], disabled=True),
            UserEntry("dave", self.hashes["dave"]),  # no TOTP enrolled
        ]
        self.users_file.write_text(render_users(entries))
        self.users_file.chmod(0o600)

    def code(self, user: str, offset: int = 0) -> str:
        return pyotp.TOTP(self.secrets[user]).generate_otp(STEP + offset)

    async def login(self, user: str, password: str | None = None, code: str | None = None,
                    source: str = SOURCE) -> LoginResult:
        return await self.auth.login(user, f"{user}-password" if password is None else password,
                                     self.default_code(user) if code is None else code, source, NOW)

    def default_code(self, user: str) -> str:
        return self.code(user) if user in self.secrets else "000000"


@pytest.fixture
def world(tmp_path: Path, hashes: dict[str, str]) -> World:
    return World(tmp_path, hashes, RegulationPolicy())


def public(result: LoginResult) -> tuple[Any, ...]:
    """What a frontend may show: everything except the audit-only fields."""
    return (result.ok, result.principal, result.reason, result.retry_after)


async def test_right_password_and_code_sign_in(world: World) -> None:
    result = await world.login("alice")
    assert result.ok and result.reason == "ok" and result.user == "alice"
    assert result.principal == Principal("alice", frozenset({"telework-staff"}), {"office_pc": "pc-1"})


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [("ALICE", "alice"), (" alice", "alice"), ("\uff41\uff4c\uff49\uff43\uff45", "alice"), ("bob", "Bob"), ("BOB", "Bob")],
)
async def test_name_spellings_sign_in_as_the_canonical_user(world: World, typed: str, canonical: str) -> None:
    key = canonical.lower()
    result = await world.auth.login(typed, f"{key}-password", world.code(key), SOURCE, NOW)
    assert result.ok and result.principal is not None and result.principal.user == canonical


@pytest.mark.parametrize("offset", [-1, 1])
async def test_one_step_of_clock_drift_is_accepted(world: World, offset: int) -> None:
    assert (await world.login("alice", code=world.code("alice", offset))).ok


@pytest.mark.parametrize(
    ("user", "password", "code_of", "offset", "detail", "audit_user"),
    [
        ("alice", "wrong-password", "alice", 0, "bad_password", "alice"),
        ("ALICE", "wrong-password", "alice", 0, "bad_password", "alice"),
        ("alice", None, "bob", 0, "bad_code", "alice"),
        ("alice", None, "alice", 2, "bad_code", "alice"),
        ("alice", None, "alice", -2, "bad_code", "alice"),
        ("alice", "wrong-password", "bob", 0, "bad_password", "alice"),
        # Unconfirmed names are not reported: they may be a password typed in the wrong field.
        ("mallory", "whatever", "alice", 0, "unknown_or_disabled_user", ""),
        ("carol", None, "carol", 0, "unknown_or_disabled_user", ""),
        ("dave", None, "alice", 0, "not_enrolled", "dave"),
        ("alice", "", "alice", 0, "bad_password", "alice"),
        ("", "", "alice", 0, "unknown_or_disabled_user", ""),
        ("alice", "x" * 5000, "alice", 0, "bad_password", "alice"),
    ],
)
async def test_every_wrong_factor_gets_the_same_answer(
    world: World, user: str, password: str | None, code_of: str, offset: int, detail: str, audit_user: str
) -> None:
    if password is None:
        password = f"{user.lower()}-password"
    code = world.code(code_of, offset)
    result = await world.auth.login(user, password, code, SOURCE, NOW)
    assert public(result) == (False, None, "bad_credentials", None)
    assert (result.detail, result.user) == (detail, audit_user)
    if password:
        assert password not in repr(result)
    assert code not in repr(result)


@pytest.mark.parametrize("code", ["", "12345", "abcdef", "1234567", "000000 000000"])
async def test_malformed_codes_are_just_wrong(world: World, code: str) -> None:
    result = await world.login("alice", code=code)
    assert public(result) == (False, None, "bad_credentials", None)


async def test_a_code_is_accepted_once(world: World) -> None:
    code = world.code("alice")
    assert (await world.login("alice", code=code)).ok
    again = await world.login("alice", code=code)
    assert (again.ok, again.reason, again.principal) == (False, "replayed_code", None)
    older = await world.login("alice", code=world.code("alice", -1))
    assert older.reason == "replayed_code"  # burned by the newer login
    assert (await world.login("alice", code=world.code("alice", 1))).ok


async def test_a_right_code_with_a_wrong_password_is_not_burned(world: World) -> None:
    code = world.code("alice")
    assert (await world.login("alice", password="guess", code=code)).reason == "bad_credentials"
    assert (await world.login("alice", code=code)).ok


async def test_lockout_looks_the_same_for_real_and_unknown_accounts(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy(failures_before_backoff=50, lockout_after=3,
                                                     lockout_duration=600))
    results: dict[str, list[LoginResult]] = {}
    for user in ("alice", "nobody"):
        results[user] = [await world.login(user, password="bad", source=f"198.51.100.{i}") for i in range(4)]
    for user, seq in results.items():
        assert [r.lockout_started for r in seq] == [False, False, True, False], user
        assert [r.reason for r in seq] == ["bad_credentials"] * 3 + ["locked"]
        assert seq[3].retry_after == pytest.approx(600)
    # Locked means locked: even the right password and code are refused without a check.
    assert (await world.login("alice")).reason == "locked"
    world.state_clock[0] += 600
    assert (await world.login("alice")).ok


async def test_throttling_reports_retry_after(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy(failures_before_backoff=2, backoff_initial=2))
    for _ in range(2):
        assert (await world.login("alice", password="bad")).reason == "bad_credentials"
    throttled = await world.login("alice")
    assert (throttled.ok, throttled.reason) == (False, "throttled")
    assert throttled.retry_after == pytest.approx(2)
    world.state_clock[0] += 2
    assert (await world.login("alice")).ok


async def test_directory_down_fails_closed_and_counts_nothing(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy(failures_before_backoff=2))
    world.users_file.rename(tmp_path / "away.toml")
    for _ in range(5):
        result = await world.login("alice")
        assert (result.ok, result.reason, result.detail) == (False, "directory_unavailable", "directory_unavailable")
    (tmp_path / "away.toml").rename(world.users_file)
    assert (await world.login("alice")).ok  # not throttled by the outage


async def test_broken_totp_store_fails_closed(world: World) -> None:
    world.store.path.write_text("{}")
    result = await world.login("alice")
    assert (result.ok, result.reason, result.detail) == (False, "directory_unavailable", "totp_store_unavailable")


async def test_pending_enrollment_is_audited_on_first_use_or_login_fails(world: World) -> None:
    world.audit.fail = True
    result = await world.login("alice")
    assert (result.reason, result.detail) == ("directory_unavailable", "audit_unavailable")
    world.audit.fail = False
    assert (await world.login("alice")).ok
    assert [(e, f["user"]) for e, f in world.audit.events] == [("mfa.enroll", "alice")]


async def test_every_answer_is_paced_to_the_floor(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy(failures_before_backoff=50, lockout_after=1))
    await world.login("alice")  # ok
    await world.login("mallory", password="x")  # bad, and locks "mallory"
    await world.login("mallory", password="x")  # locked: decided without any check
    world.users_file.unlink()
    await world.login("bob")  # directory unavailable
    assert world.sleeps == [pytest.approx(0.35)] * 4


async def test_pacing_makes_unknown_and_known_accounts_take_the_same_time(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy(failures_before_backoff=1000, lockout_after=100))
    # A floor well above the cheap test hashes' cost: the assertion is about the pacer, and a
    # busy CI machine (tests run in parallel) must not push a check past the floor.
    world.auth = build_auth_with_real_clock(world, floor=0.4)

    async def duration(user: str) -> float:
        start = time.perf_counter()
        await world.auth.login(user, "bad", "000000", SOURCE, NOW)
        return time.perf_counter() - start

    known = [await duration("alice") for _ in range(3)]
    unknown = [await duration("nobody") for _ in range(3)]
    assert min(known + unknown) >= 0.4
    assert abs(statistics.median(known) - statistics.median(unknown)) < 0.08


def build_auth_with_real_clock(world: World, floor: float) -> Authenticator:
    return Authenticator(world.auth.directory, world.auth.totp, world.auth.regulator, response_floor=floor)


# --- step-up ---------------------------------------------------------------------------------------


async def test_step_up_needs_a_fresh_code_and_returns_the_current_principal(world: World) -> None:
    login = await world.login("bob")
    assert login.ok and login.principal is not None
    same = await world.auth.step_up(login.principal, world.code("bob"), SOURCE, NOW)
    assert (same.ok, same.reason) == (False, "replayed_code")
    world.write_users(bob_groups=("telework-managers", "approvers"))
    fresh = await world.auth.step_up(login.principal, world.code("bob", 1), SOURCE, NOW)
    assert fresh.ok and fresh.principal is not None
    assert fresh.principal.groups == frozenset({"telework-managers", "approvers"})


async def test_step_up_refused_for_a_disabled_account(world: World) -> None:
    login = await world.login("bob")
    assert login.principal is not None
    world.write_users(bob_disabled=True)
    result = await world.auth.step_up(login.principal, world.code("bob", 1), SOURCE, NOW)
    assert (result.ok, result.reason, result.detail) == (False, "bad_credentials", "account_gone")


async def test_step_up_guessing_locks_the_account(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy(failures_before_backoff=50, lockout_after=3))
    principal = Principal("alice", frozenset({"telework-staff"}))
    results = [await world.auth.step_up(principal, f"{i:06d}", SOURCE, NOW) for i in range(4)]
    assert [r.reason for r in results] == ["bad_credentials"] * 3 + ["locked"]
    assert results[2].lockout_started
    assert (await world.login("alice")).reason == "locked"  # the same account counter


async def test_step_up_with_a_wrong_code(world: World) -> None:
    principal = Principal("alice")
    result = await world.auth.step_up(principal, world.code("bob"), SOURCE, NOW)
    assert public(result) == (False, None, "bad_credentials", None)
    assert result.detail == "bad_code"


# --- robustness ------------------------------------------------------------------------------------


class HangingDirectory:
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def authenticate(self, username: str, password: str) -> Principal | None:
        self.entered.set()
        await asyncio.Event().wait()
        return None

    async def lookup(self, username: str) -> Principal | None:
        raise DirectoryUnavailable("down")

    async def check(self) -> bool:
        return False


async def test_a_cancelled_login_is_not_counted(world: World) -> None:
    directory = HangingDirectory()
    auth = Authenticator(directory, world.auth.totp, world.auth.regulator, response_floor=0)
    task = asyncio.create_task(auth.login("alice", "x", "000000", SOURCE, NOW), name="login")
    await directory.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(v.value == 0 for k, v in world.state._entries.items() if k.startswith("login:fails"))


async def test_build_authenticator_from_settings(tmp_path: Path, hashes: dict[str, str]) -> None:
    world = World(tmp_path, hashes, RegulationPolicy())
    settings = settings_from_mapping({
        "gateway": {"state_dir": str(tmp_path / "state")},
        "directory": {"file": str(world.users_file), "timeout": "3s"},
        "mfa": {"issuer": "Ward"},
        "login": {"failures_before_backoff": 3},
    })
    recorder = Recorder()
    auth = build_authenticator(settings, state=MemoryState(), audit_emit=recorder, response_floor=0)
    assert auth.regulator.policy.failures_before_backoff == 3
    assert auth.totp.store.issuer == "Ward"
    assert await auth.totp.flush_enrollments() == 3
    result = await auth.login("alice", "alice-password", world.code("alice"), SOURCE, NOW)
    assert result.ok


# --- accounts the gateway blocks (gatewayd.identity.blocks) -------------------------------------


def block(world: World, tmp_path: Path, name: str, shared: Any = None) -> UserBlocks:
    blocks = UserBlocks(tmp_path / "state", shared)
    blocks.file.record("block", name, operator="admin1", reason="laptop stolen")
    world.auth.blocks = blocks
    return blocks


@pytest.mark.parametrize(("blocked", "typed"), [
    ("alice", "alice"), ("alice", "ALICE"), ("Alice", "\uff41\uff4c\uff49\uff43\uff45"),
    ("TOKYO\\ALICE", "alice"), ("alice", " Alice "),
])
async def test_a_blocked_account_fails_like_a_wrong_password(
        world: World, tmp_path: Path, blocked: str, typed: str) -> None:
    wrong = await world.login("alice", password="not-her-password")
    block(world, tmp_path, blocked)
    result = await world.auth.login(typed, "alice-password", world.code("alice", 1), SOURCE, NOW)
    assert public(result) == public(wrong)
    assert (result.user, result.detail) == ("alice", "user_blocked")
    assert (await world.login("bob")).ok  # others are not affected


async def test_a_blocked_account_cannot_step_up_nor_be_looked_up(world: World,
                                                                   tmp_path: Path) -> None:
    login = await world.login("bob")
    assert login.principal is not None
    block(world, tmp_path, "BOB")
    result = await world.auth.step_up(login.principal, world.code("bob", 1), SOURCE, NOW)
    assert (result.ok, result.reason, result.detail) == (False, "bad_credentials",
                                                         "user_blocked")
    with pytest.raises(UserBlocked):
        await world.auth.lookup("bob")
    assert await world.auth.lookup("alice") is not None


class DownSharedBlocks:
    async def any_of(self, keys: Any) -> bool:
        raise StateUnavailable("redis: connection refused")

    async def publish(self, changes: Any, restore: Any = ()) -> list[int]:
        raise StateUnavailable("redis: connection refused")

    async def all(self) -> dict[str, Any]:
        raise StateUnavailable("redis: connection refused")


async def test_an_unreadable_shared_block_list_fails_closed(world: World, tmp_path: Path) -> None:
    world.auth.blocks = UserBlocks(tmp_path / "state", DownSharedBlocks())
    result = await world.login("alice")  # every factor right
    assert (result.ok, result.reason, result.detail) == (False, "directory_unavailable",
                                                         "state_unavailable")
    with pytest.raises(StateUnavailable):
        await world.auth.lookup("alice")


async def test_an_unreadable_blocks_file_at_start_fails_closed(world: World,
                                                               tmp_path: Path) -> None:
    (tmp_path / "state" / "user-blocks.json").write_text("{not json")
    world.auth.blocks = UserBlocks(tmp_path / "state")
    result = await world.login("alice")
    assert (result.ok, result.detail) == (False, "state_unavailable")


@pytest.mark.parametrize("broken", ["file", "shared"])
async def test_an_unreadable_block_list_is_no_password_oracle(
        world: World, tmp_path: Path, broken: str) -> None:
    """Reviewer's probe: with the list unreadable, a right password with a wrong code used to
    get state_unavailable and a wrong password bad_credentials — telling which is right."""
    if broken == "file":
        (tmp_path / "state" / "user-blocks.json").write_text("{not json")
        world.auth.blocks = UserBlocks(tmp_path / "state")
    else:
        world.auth.blocks = UserBlocks(tmp_path / "state", DownSharedBlocks())
    wrong_password = await world.login("alice", password="guess-1", code="000000")
    right_password = await world.login("alice", code="000000")  # the code is wrong
    unknown = await world.login("nobody", password="guess-2", code="000000")
    assert public(wrong_password) == public(right_password) == public(unknown)
    assert {wrong_password.detail, right_password.detail, unknown.detail} == {
        "state_unavailable"}
