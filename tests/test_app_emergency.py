"""The account emergency stop: ``gatewayd users disable`` (and a hand edit of the users file)
ends a running gateway's sessions of that person within seconds, audited; the users-file
edit keeps everything else of the file; the disable journal hands the request to the daemon."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from https_harness import Harness, running_gateway

from gatewayd.audit import AuditWriteError
from gatewayd.cli import main
from gatewayd.config import Settings, settings_from_mapping
from gatewayd.emergency import DisableJournal, EmergencyStop, JournalError
from gatewayd.identity.disable import disable_in_users_file, disable_user, set_disabled_text
from gatewayd.identity.filedir import load_users_file
from gatewayd.sessions import SessionRegistry

JSON = {"Accept": "application/json"}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


async def seconds_until(gw: Harness, event: str, reason: str) -> float:
    """Seconds until an ``event`` record with ``reason`` is in the audit log (at most 5)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 5.0:
        if any(r.get("reason") == reason for r in gw.audit_events(event)):
            return loop.time() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} with reason {reason} within 5 s")


async def status(gw: Harness, client: object, path: str = "/.gatewayd/userinfo") -> int:
    async with client.get(gw.base + path, headers=JSON) as resp:  # type: ignore[attr-defined]
        return int(resp.status)


# --- end to end -------------------------------------------------------------------------------


async def test_users_disable_ends_the_sessions_within_5_seconds(gw: Harness) -> None:
    users = gw.config.parent / "users.toml"
    users.write_text("# kept by the ward's IT desk\n" + users.read_text())
    alice = await gw.signed_in("alice")
    bob = await gw.signed_in("bob")
    before = users.read_text()

    code = await asyncio.to_thread(main, ["users", "disable", "alice", "--reason",
                                          "laptop stolen", "--config", str(gw.config)])
    assert code == 0
    latency = await seconds_until(gw, "session.end", "user_disabled")
    assert latency < 5.0
    print(f"users disable ended the session after {latency:.2f}s")

    assert await status(gw, alice) == 401
    assert await status(gw, bob) == 200
    [record] = gw.audit_events("user.disable")
    assert (record["user"], record["reason"], record["status"]) == ("alice", "laptop stolen",
                                                                     "success")
    assert record["operator"]
    [end] = gw.audit_events("session.end")
    assert end["user"] == "alice"
    # Only alice's disabled flag changed; the comment and every other line are as they were.
    assert users.read_text() == before.replace("[users.alice]\n",
                                               "[users.alice]\ndisabled = true\n", 1)
    assert load_users_file(users)["alice"].disabled
    status_code, _, _ = await gw.login(gw.client(), "alice")
    assert status_code != 303
    # Done once: later rounds write no second record.
    await gw.gateway.emergency.check()
    assert len(gw.audit_events("user.disable")) == 1
    journal = DisableJournal(gw.gateway.settings.gateway.state_dir)
    assert [r.done for r in journal.requests()] == [True]


async def test_a_hand_edit_of_the_users_file_applies_within_seconds(gw: Harness) -> None:
    bob = await gw.signed_in("bob")
    users = gw.config.parent / "users.toml"
    users.write_text(users.read_text().replace("[users.bob]", "[users.bob]\ndisabled = true", 1))
    # directory.refresh_interval is 5 minutes: this is the watcher, not the refresh task.
    assert await seconds_until(gw, "session.end", "directory_revoked") < 5.0
    assert await status(gw, bob) == 401
    assert gw.audit_events("user.disable") == []


async def test_reload_rereads_the_journal_at_once(gw: Harness) -> None:
    carol = await gw.signed_in("carol")
    journal = DisableJournal(gw.gateway.settings.gateway.state_dir)
    with journal.locked():
        journal.add("CAROL", operator="admin1", reason=None)  # any spelling of the name
    await gw.gateway.reload()
    assert [e["reason"] for e in gw.audit_events("session.end")] == ["user_disabled"]
    assert await status(gw, carol) == 401


async def test_unknown_users_are_refused_and_nothing_is_recorded(
        gw: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "disable", "mallory", "--config", str(gw.config)]) == 1
    assert "no user 'mallory'" in capsys.readouterr().err
    assert DisableJournal(gw.gateway.settings.gateway.state_dir).requests() == []


async def test_other_backends_end_the_sessions_and_say_to_disable_the_account_there_too(
        gw: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    settings = gw.gateway.settings
    ldap = settings.model_copy(update={"directory": settings.directory.model_copy(
        update={"backend": "ldap"})})
    users_before = (gw.config.parent / "users.toml").read_text()
    alice = await gw.signed_in("alice")
    code = await asyncio.to_thread(disable_user, ldap, "alice", reason=None, operator="admin1")
    assert code == 0  # blocked in the gateway
    assert "Disable alice there too" in capsys.readouterr().err
    await gw.gateway.emergency.check()
    assert await status(gw, alice) == 401
    assert (gw.config.parent / "users.toml").read_text() == users_before


async def test_a_request_whose_audit_record_fails_is_retried(tmp_path: Path) -> None:
    settings = settings_from_mapping({"gateway": {"state_dir": str(tmp_path / "state")},
                                      "directory": {"file": str(tmp_path / "users.toml")}})
    registry = SessionRegistry(idle_timeout=60, absolute_timeout=600, max_concurrent=5,
                               per_user=1, clock=lambda: 0.0, on_end=lambda s, r: None)
    written: list[str] = []
    failures = [AuditWriteError("user.disable", None, OSError(28, "disk full"))]

    def emit(event: str, /, **fields: object) -> object:
        if failures:
            raise failures.pop()
        written.append(str(fields["user"]))
        return None

    async def no_refresh() -> int:
        return 0

    stop = EmergencyStop(settings, registry, emit=emit, refresh_directory=no_refresh)
    journal = DisableJournal(settings.gateway.state_dir)
    with journal.locked():
        journal.add("dave", operator="admin1", reason="left")
    await stop.check()
    assert written == [] and not journal.requests()[0].done
    await stop.check()
    assert written == ["dave"] and journal.requests()[0].done
    await stop.check()
    assert written == ["dave"]


# --- editing the users file -------------------------------------------------------------------

HASH = '"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$3m7bWlmC0yZRnvPVa7KlD1Jxd2PhnXzHAKDFBPqZJYs"'


@pytest.mark.parametrize(("text", "expected"), [
    (f"[users.alice]\npassword_hash = {HASH}\n",
     f"[users.alice]\ndisabled = true\npassword_hash = {HASH}\n"),
    (f'[users."alice"]  # the clerk\npassword_hash = {HASH}\ndisabled = false  # on leave\n'
     "\n[users.bob]\ndisabled = false\n",
     f'[users."alice"]  # the clerk\npassword_hash = {HASH}\ndisabled = true  # on leave\n'
     "\n[users.bob]\ndisabled = false\n"),
    (f"[users.bob]\npassword_hash = {HASH}\n[ users . alice ]", None),  # header is the last line
    (f"[users.alicex]\npassword_hash = {HASH}\n", None),
    (f"[users]\nalice = {{ password_hash = {HASH} }}\n", None),
])
def test_set_disabled_text(text: str, expected: str | None) -> None:
    result = set_disabled_text(text, "alice")
    if expected is None and text.endswith("[ users . alice ]"):
        assert result == text + "\ndisabled = true\n"
    else:
        assert result == expected


def test_the_edit_keeps_mode_and_falls_back_to_a_rewrite_with_a_backup(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    inline = (f"# inline layout\n[users]\nalice = {{ password_hash = {HASH}, groups = [\"a\"] }}\n"
              f"bob = {{ password_hash = {HASH} }}\n")
    users.write_text(inline)
    users.chmod(0o640)
    outcome = disable_in_users_file(users, "ALICE")
    assert (outcome.user, outcome.already) == ("alice", False)
    assert outcome.backup is not None and outcome.backup.read_text() == inline
    assert stat.S_IMODE(users.stat().st_mode) == 0o640
    assert stat.S_IMODE(outcome.backup.stat().st_mode) == 0o640
    entries = load_users_file(users)
    assert entries["alice"].disabled and not entries["bob"].disabled
    assert entries["alice"].groups == frozenset({"a"})
    assert disable_in_users_file(users, "alice").already
    if os.geteuid() == 0:
        os.chown(users, 65534, 65534)
        disable_in_users_file(users, "bob")
        assert (users.stat().st_uid, users.stat().st_gid) == (65534, 65534)


def test_the_journal_is_private_and_well_formed(tmp_path: Path) -> None:
    journal = DisableJournal(tmp_path / "state")
    with journal.locked():
        first = journal.add("alice", operator="admin1", reason="x")
    data = json.loads(journal.path.read_text())
    assert data["format"] == "gatewayd-user-disable-v1"
    assert data["requests"][0]["id"] == first.id and data["requests"][0]["done"] is False
    assert stat.S_IMODE(journal.path.stat().st_mode) == 0o600
    journal.mark_done([first.id])
    assert journal.requests()[0].done


def planted_state_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A state directory of another account (the daemon's, when root runs the tests) and a
    root-owned file the daemon's account must never be handed."""
    victim = tmp_path / "victim"
    victim.write_text("root:x:0:0\n")
    victim.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(state, 65534, 65534)
    return state, victim


def test_a_symlink_planted_as_the_lock_is_refused_not_followed(tmp_path: Path) -> None:
    state, victim = planted_state_dir(tmp_path)
    before = victim.stat()
    (state / "user-disable.json.lock").symlink_to(victim)
    with pytest.raises(JournalError), DisableJournal(state).locked(wait=0.1):
        pass
    after = victim.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    assert disable_user(settings_for(tmp_path, state), "alice", reason="x", operator="root") == 1
    assert victim.stat().st_uid == before.st_uid


def test_a_hard_link_planted_as_the_lock_is_refused_not_handed_over(tmp_path: Path) -> None:
    state, victim = planted_state_dir(tmp_path)
    before = victim.stat()
    os.link(victim, state / "user-disable.json.lock")
    with pytest.raises(JournalError, match="one link"), DisableJournal(state).locked(wait=0.1):
        pass
    assert victim.stat().st_uid == before.st_uid


def test_a_fifo_planted_as_the_lock_is_refused_without_hanging(tmp_path: Path) -> None:
    state, _ = planted_state_dir(tmp_path)
    os.mkfifo(state / "user-disable.json.lock")
    with pytest.raises(JournalError), DisableJournal(state).locked(wait=0.1):
        pass


def test_root_hands_its_own_new_lock_and_files_to_the_directorys_owner(tmp_path: Path) -> None:
    state, _ = planted_state_dir(tmp_path)
    settings = settings_for(tmp_path, state)
    assert disable_user(settings, "alice", reason="x", operator="root") == 0
    owner = state.stat().st_uid
    for name in ("user-disable.json.lock", "user-disable.json", "user-blocks.json"):
        st = (state / name).stat()
        assert st.st_uid == owner and st.st_nlink == 1, name
        assert stat.S_IMODE(st.st_mode) == 0o600, name
    assert disable_user(settings, "bob", reason="y", operator="root") == 0  # lock reused


def settings_for(tmp_path: Path, state: Path) -> Settings:
    users = tmp_path / "users.toml"
    users.write_text(f"[users]\nalice = {{ password_hash = {HASH} }}\n"
                     f"bob = {{ password_hash = {HASH} }}\n")
    return settings_from_mapping({
        "gateway": {"state_dir": str(state)},
        "directory": {"backend": "file", "file": str(users)}})


@pytest.mark.parametrize("name", ["user-disable.json", "user-blocks.json"])
def test_state_files_planted_as_symlinks_or_fifos_are_not_read(tmp_path: Path,
                                                               name: str) -> None:
    state, victim = planted_state_dir(tmp_path)
    settings = settings_for(tmp_path, state)
    (state / name).symlink_to(victim)
    assert disable_user(settings, "alice", reason="x", operator="root") == 1
    (state / name).unlink()
    os.mkfifo(state / name)
    assert disable_user(settings, "alice", reason="x", operator="root") == 1  # no hang


def test_root_never_hands_over_a_root_owned_file_renamed_to_the_locks_name(
        tmp_path: Path) -> None:
    """Reviewer's probe: the daemon's account owns the state directory, so it can rename any
    root-owned single-link file in it (a secret root left there) to the lock's name; the
    next ``users disable`` as root chowned that file to the daemon's account."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a state directory of another account")
    state, _ = planted_state_dir(tmp_path)
    secret = state / "redis-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    secret.rename(state / "user-disable.json.lock")  # what the daemon's account may do
    lock = state / "user-disable.json.lock"
    with pytest.raises(JournalError, match="refusing the lock"), \
            DisableJournal(state).locked(wait=0.1):
        pass
    assert lock.stat().st_uid == 0 and stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert disable_user(settings_for(tmp_path, state), "alice", reason="x",
                        operator="root") == 1
    assert lock.stat().st_uid == 0
    lock.unlink()  # removed: root creates its own and hands that one over
    with DisableJournal(state).locked(wait=0.1):
        pass
    assert lock.stat().st_uid == state.stat().st_uid


def test_users_disable_writes_the_request_even_when_the_blocks_file_is_broken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The request that ends the sessions must not depend on the blocks file: a broken one
    made ``users disable`` fail before the request was written."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "user-blocks.json").write_text("{not json")
    settings = settings_for(tmp_path, state)
    assert disable_user(settings, "alice", reason="x", operator="root") == 1
    err = capsys.readouterr()
    assert "NOT blocked by the gateway" in err.err and "ends alice's open sessions" in err.out
    [request] = DisableJournal(state).requests()
    assert (request.user, request.done) == ("alice", False)


class _BrokenBlocks:
    """A `UserBlocks` whose round raises what nobody expected (a hostile shared value)."""

    file = type("F", (), {"path": Path("/nonexistent")})()

    async def sync(self) -> object:
        raise RecursionError("maximum recursion depth exceeded")

    def blocked_locally(self, name: str) -> bool:
        return False


async def test_one_failing_part_of_the_round_never_skips_the_others(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text(f"[users]\nalice = {{ password_hash = {HASH} }}\n")
    settings = settings_from_mapping({"gateway": {"state_dir": str(tmp_path / "state")},
                                      "directory": {"file": str(users)}})
    registry = SessionRegistry(idle_timeout=60, absolute_timeout=600, max_concurrent=5,
                               per_user=1, clock=lambda: 0.0, on_end=lambda s, r: None)
    written: list[str] = []
    refreshed: list[int] = []

    def emit(event: str, /, **fields: object) -> object:
        written.append(event)
        return None

    async def refresh() -> int:
        refreshed.append(1)
        raise RuntimeError("directory refresh broke too")

    stop = EmergencyStop(settings, registry, emit=emit, refresh_directory=refresh,
                         blocks=_BrokenBlocks())  # type: ignore[arg-type]
    await stop.check()
    users.write_text(users.read_text() + "# changed\n")
    os.utime(users, ns=(1, 1))
    journal = DisableJournal(settings.gateway.state_dir)
    with journal.locked():
        journal.add("dave", operator="admin1", reason="left")
    await stop.check()  # the blocks part raises RecursionError: the rest still runs
    assert refreshed == [1] and written == ["user.disable"]
    assert journal.requests()[0].done
