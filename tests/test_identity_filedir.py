"""Tests for gatewayd.identity.filedir: users-file format, hashing, and FileDirectory."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher, extract_parameters

from gatewayd.identity import filedir
from gatewayd.identity.directory import DirectoryUnavailable
from gatewayd.identity.filedir import (
    FileDirectory,
    UserEntry,
    UsersFileError,
    hash_password,
    load_users_file,
    parse_users,
    render_users,
)
from gatewayd.identity.principal import Principal

# The cheapest cost the users file accepts keeps the suite fast.
FAST = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
PASSWORDS = {"alice": "alice-pass-1", "bob": "bob-pass-2", "carol": "carol-pass-3"}


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {user: hash_password(pw, FAST) for user, pw in PASSWORDS.items()}


def users_text(hashes: dict[str, str], *, carol_disabled: bool = True, extra: str = "") -> str:
    return f"""
[users.alice]
password_hash = "{hashes['alice']}"
groups = ["telework-staff"]
attributes = {{ office_pc = "pc-0042.ward.local", display_name = "Alice Example" }}

[users.Bob]
password_hash = "{hashes['bob']}"
groups = ["telework-managers", "telework-staff"]

[users.carol]
password_hash = "{hashes['carol']}"
disabled = {'true' if carol_disabled else 'false'}
{extra}"""


def write(path: Path, text: str, *, bump: int = 0) -> None:
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    # Make the change visible even on filesystems with coarse timestamps.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump * 1_000_000_000))


@pytest.fixture
def users_file(tmp_path: Path, hashes: dict[str, str]) -> Path:
    path = tmp_path / "users.toml"
    write(path, users_text(hashes))
    path.chmod(0o600)
    return path


# --- format -------------------------------------------------------------------------------------


def test_parse_valid_file(hashes: dict[str, str]) -> None:
    users = parse_users(users_text(hashes))
    assert sorted(users) == ["alice", "bob", "carol"]
    alice = users["alice"]
    assert alice.groups == frozenset({"telework-staff"})
    assert dict(alice.attributes) == {"office_pc": "pc-0042.ward.local", "display_name": "Alice Example"}
    assert not alice.disabled and users["carol"].disabled
    assert users["bob"].name == "Bob"  # the canonical spelling is kept
    assert users["bob"].principal() == Principal("Bob", frozenset({"telework-managers", "telework-staff"}))


def test_empty_file_is_valid() -> None:
    assert parse_users("") == {}
    assert parse_users("[users]\n") == {}


GOOD = hash_password("x-password", FAST)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users = 3", "users: expected a table"),
        ("[groups]\n", "groups: unknown key"),
        ("[users.alice]\ngroups = []\n", "users.alice.password_hash: required key is missing"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\nshell = "/bin/sh"\n', "users.alice.shell: unknown key"),
        ('[users.alice]\npassword_hash = "secret"\n', "expected an argon2id hash"),
        ('[users.alice]\npassword_hash = "$2b$12$abcdefghijklmnopqrstuv"\n', "expected an argon2id hash"),
        (f'[users.alice]\npassword_hash = "{GOOD.replace("argon2id", "argon2i")}"\n', "expected an argon2id hash"),
        ('[users.alice]\npassword_hash = "$argon2id$v=19$m=65536,t=3,p=4$broken"\n', "malformed argon2id hash"),
        (f'[users.alice]\npassword_hash = "{PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("x")}"\n', "cost too low"),
        (f'[users.alice]\npassword_hash = "{PasswordHasher(time_cost=1, memory_cost=65536, parallelism=1).hash("x")}"\n', "cost too low"),
        ('[users.alice]\npassword_hash = "$argon2id$v=19$m=4194304,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"\n', "cost too high"),
        ('[users.alice]\npassword_hash = "$argon2id$v=19$m=65536,t=99,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"\n', "cost too high"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = "staff"\n', "expected a list of group names"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = ["a,b"]\n', "invalid group name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = [" staff"]\n', "invalid group name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = [""]\n', "invalid group name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = [1]\n', "invalid group name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = ["a\\nb"]\n', "invalid group name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ngroups = ["{"g" * 129}"]\n', "invalid group name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\nattributes = "pc"\n', "expected a table of text attributes"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\nattributes = {{ Office = "x" }}\n', "invalid attribute name"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\nattributes = {{ office_pc = 42 }}\n', "attribute 'office_pc'"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\nattributes = {{ office_pc = "a\\u0000b" }}\n', "attribute 'office_pc'"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ndisabled = "no"\n', "users.alice.disabled: expected true or false"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\ndisabled = 0\n', "expected true or false"),
        (f'[users."al ice"]\npassword_hash = "{GOOD}"\n', "invalid user name"),
        (f'[users.".alice"]\npassword_hash = "{GOOD}"\n', "invalid user name"),
        (f'[users."{"a" * 65}"]\npassword_hash = "{GOOD}"\n', "invalid user name"),
        (f'[users."\\u0430lice"]\npassword_hash = "{GOOD}"\n', "invalid user name"),  # Cyrillic a
        ('[users.alice]\npassword_hash = 1\n', "expected an argon2id hash"),
        ("[users.alice]\n", "required key is missing"),
        ("users.alice = 5\n", "users.alice: expected a table"),
        (f'[users.alice]\npassword_hash = "{GOOD}"\n[users.ALICE]\npassword_hash = "{GOOD}"\n', "same name as users.alice ignoring case"),
        ("[users\n", "invalid TOML"),
    ],
)
def test_invalid_files(text: str, message: str) -> None:
    with pytest.raises(UsersFileError) as info:
        parse_users(text, "users.toml")
    assert any(message in line for line in info.value.errors), info.value.errors
    assert all(line.startswith("users.toml: ") for line in info.value.errors)


def test_all_problems_are_reported_and_a_bad_user_does_not_hide_the_next(hashes: dict[str, str]) -> None:
    text = f"""
[users.al]
password_hash = "nope"
[users.alice]
password_hash = "{hashes['alice']}"
disabled = "x"
[users.bob]
shell = "sh"
"""
    with pytest.raises(UsersFileError) as info:
        parse_users(text, "u")
    assert len(info.value.errors) == 4
    assert any(e.startswith("u: users.alice.disabled") for e in info.value.errors)


def test_load_users_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read users file"):
        load_users_file(tmp_path / "missing.toml")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(UsersFileError, match="not UTF-8"):
        load_users_file(tmp_path / "latin1.toml")


def test_render_round_trips(hashes: dict[str, str]) -> None:
    entries = [
        UserEntry("alice", hashes["alice"], frozenset({"telework-staff", "a \"quoted\" group"}),
                  {"office_pc": "pc-1", "display_name": "Ä \\ back\\slash ☃"}),
        UserEntry("bob@ward", hashes["bob"], disabled=True),
        UserEntry("c.a-r_o.l", hashes["carol"], frozenset(), {}),
    ]
    parsed = parse_users(render_users(entries))
    assert [parsed[e.name.lower()] for e in entries] == entries


@pytest.mark.parametrize("typed", ["s3cret-Passw0rd", "\uff53\uff13\uff43\uff52\uff45\uff54-Passw0rd"])
def test_hash_password_is_argon2id_and_nfkc(typed: str) -> None:
    digest = hash_password(typed, FAST)
    assert digest.startswith("$argon2id$")
    assert FAST.verify(digest, "s3cret-Passw0rd")


def test_hash_password_default_cost_is_rfc9106_low_memory() -> None:
    params = extract_parameters(hash_password("x" * 12))
    assert (params.memory_cost, params.time_cost, params.parallelism) == (65536, 3, 4)


@pytest.mark.parametrize("bad", ["", "a\x00b", "x" * 1025])
def test_hash_password_refuses_unusable(bad: str) -> None:
    with pytest.raises(ValueError, match="password"):
        hash_password(bad, FAST)


# --- FileDirectory --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "password", "user"),
    [
        ("alice", "alice-pass-1", "alice"),
        ("ALICE", "alice-pass-1", "alice"),
        (" alice", "alice-pass-1", "alice"),
        ("\uff41\uff4c\uff49\uff43\uff45", "alice-pass-1", "alice"),
        ("bob", "bob-pass-2", "Bob"),
        ("Bob", "bob-pass-2", "Bob"),
        ("alice", "\uff41lice-pass-1", "alice"),  # NFKC on the password too
        ("alice", "Alice-pass-1", None),
        ("alice", "alice-pass-1 ", None),
        ("alice", "bob-pass-2", None),
        ("alice", "", None),
        ("alice", "alice-pass-1\x00", None),
        ("mallory", "alice-pass-1", None),
        ("", "alice-pass-1", None),
        ("carol", "carol-pass-3", None),  # disabled
        ("a" * 300, "x", None),
    ],
)
async def test_authenticate(users_file: Path, username: str, password: str, user: str | None) -> None:
    directory = FileDirectory(users_file, timeout=5)
    principal = await directory.authenticate(username, password)
    assert (principal.user if principal else None) == user
    if principal is not None and user == "alice":
        assert principal.groups == frozenset({"telework-staff"})
        assert principal.attributes["office_pc"] == "pc-0042.ward.local"


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "alice-pass-1"), ("alice", "wrong"), ("mallory", "whatever"), ("carol", "carol-pass-3"),
     ("", ""), ("x" * 1000, "y" * 5000), ("alice", "a\x00")],
)
async def test_every_attempt_costs_one_verification_of_the_same_cost(
    users_file: Path, monkeypatch: pytest.MonkeyPatch, username: str, password: str
) -> None:
    directory = FileDirectory(users_file, timeout=5)
    verified: list[str] = []
    real_verify = filedir._verify

    def counting(password_hash: str, candidate: str | None) -> bool:
        verified.append(password_hash)
        return real_verify(password_hash, candidate)

    monkeypatch.setattr(filedir, "_verify", counting)
    await directory.authenticate(username, password)
    assert len(verified) == 1
    alice = extract_parameters(parse_users(users_file.read_text())["alice"].password_hash)
    assert extract_parameters(verified[0]) == alice


async def test_dummy_hash_never_matches_anything_a_user_can_type(users_file: Path) -> None:
    directory = FileDirectory(users_file, timeout=5)
    for guess in ("", "\x00unusable", "password", "x"):
        assert await directory.authenticate("nobody", guess) is None


@pytest.mark.parametrize(
    ("username", "user"),
    [("alice", "alice"), ("BOB", "Bob"), ("carol", None), ("mallory", None), ("", None)],
)
async def test_lookup(users_file: Path, username: str, user: str | None) -> None:
    principal = await FileDirectory(users_file, timeout=5).lookup(username)
    assert (principal.user if principal else None) == user


async def test_reload_on_change_and_keep_last_good_on_invalid(
    users_file: Path, hashes: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    directory = FileDirectory(users_file, timeout=5)
    assert await directory.authenticate("carol", "carol-pass-3") is None
    write(users_file, users_text(hashes, carol_disabled=False), bump=1)
    assert (await directory.authenticate("carol", "carol-pass-3")) is not None

    write(users_file, users_text(hashes, carol_disabled=False, extra="[users.dave]\nbroken = 1\n"), bump=2)
    with caplog.at_level(logging.ERROR, logger="gatewayd.identity.filedir"):
        assert (await directory.lookup("carol")) is not None  # last good version in force
        assert (await directory.lookup("carol")) is not None
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1  # reported once
    assert directory.problem is not None and "users.dave" in directory.problem
    assert await directory.check() is True

    write(users_file, users_text(hashes, carol_disabled=True), bump=3)
    assert await directory.lookup("carol") is None
    assert directory.problem is None


async def test_removing_a_user_takes_effect_at_once(users_file: Path, hashes: dict[str, str]) -> None:
    directory = FileDirectory(users_file, timeout=5)
    assert await directory.lookup("bob") is not None
    text = users_text(hashes)
    write(users_file, text[: text.index("[users.Bob]")], bump=1)
    assert await directory.lookup("bob") is None
    assert await directory.authenticate("bob", "bob-pass-2") is None


async def test_missing_file_fails_closed(users_file: Path) -> None:
    directory = FileDirectory(users_file, timeout=5)
    assert await directory.check() is True
    users_file.unlink()
    assert await directory.check() is False
    with pytest.raises(DirectoryUnavailable):
        await directory.authenticate("alice", "alice-pass-1")
    with pytest.raises(DirectoryUnavailable):
        await directory.lookup("alice")


async def test_invalid_file_at_start_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text("[users.alice]\n")
    directory = FileDirectory(path, timeout=5)
    assert await directory.check() is False
    with pytest.raises(DirectoryUnavailable, match="required key"):
        await directory.authenticate("alice", "x")


async def test_world_readable_file_is_warned_about(users_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    users_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gatewayd.identity.filedir"):
        await FileDirectory(users_file, timeout=5).lookup("alice")
    assert "world-readable" in caplog.text


async def test_slow_verification_times_out_and_keeps_its_slot(users_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = FileDirectory(users_file, timeout=0.2, max_parallel=1)
    release = threading.Event()
    real = directory._authenticate_blocking

    def stuck(username: str, password: str) -> Any:
        release.wait(5)
        return real(username, password)

    monkeypatch.setattr(directory, "_authenticate_blocking", stuck)
    with pytest.raises(DirectoryUnavailable, match="took over"):
        await directory.authenticate("alice", "alice-pass-1")
    # The stuck thread still holds the only slot: the next attempt cannot start a second one.
    with pytest.raises(DirectoryUnavailable, match="no password check slot"):
        await directory.authenticate("alice", "alice-pass-1")
    release.set()
    monkeypatch.setattr(directory, "_authenticate_blocking", real)
    for _ in range(100):  # the slot comes back once the thread has finished
        if not directory._slots.locked():
            break
        await asyncio.sleep(0.01)
    assert (await directory.authenticate("alice", "alice-pass-1")) is not None


async def test_parallel_verifications_are_bounded(users_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = FileDirectory(users_file, timeout=5, max_parallel=2)
    running = 0
    peak = 0
    lock = threading.Lock()
    real = directory._authenticate_blocking

    def tracked(username: str, password: str) -> Any:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return real(username, password)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(directory, "_authenticate_blocking", tracked)
    results = await asyncio.gather(*(directory.authenticate("alice", "alice-pass-1") for _ in range(8)))
    assert all(r is not None for r in results)
    assert peak == 2


async def test_cancelled_login_propagates_cancellation(users_file: Path) -> None:
    directory = FileDirectory(users_file, timeout=5)
    task = asyncio.create_task(directory.authenticate("alice", "alice-pass-1"), name="login")
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_passwords_never_reach_the_log(users_file: Path, hashes: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    directory = FileDirectory(users_file, timeout=5)
    with caplog.at_level(logging.DEBUG):
        await directory.authenticate("alice", "alice-pass-1")
        await directory.authenticate("alice", "wrong-guess-xyz")
        write(users_file, "[users.x]\n", bump=1)
        await directory.authenticate("alice", "alice-pass-1")
    assert "alice-pass-1" not in caplog.text and "wrong-guess-xyz" not in caplog.text
    assert hashes["alice"] not in caplog.text
