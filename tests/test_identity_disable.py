"""Tests for gatewayd.identity.disable (``gatewayd users disable|enable|blocked``) and the
gateway-side blocks behind it (gatewayd.identity.blocks): the commands against a real state
directory; a real gateway on the LDAP backend against a real slapd, where a block keeps a
person whom the directory still lets in out of every way in; two gateways on one real
redis-server, where a block made through node A's state directory stops a login on node B."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from https_harness import USERS, Harness, password_hash
from ldap_server import Slapd, running_slapd
from redis.asyncio import Redis
from redis_server import RedisServer, documented_acl_state, running_redis
from ssh_harness import SshHarness, running_ssh_gateway
from test_multinode import sign_in, two_nodes

from gatewayd.cli import main
from gatewayd.emergency import DisableJournal, JournalError
from gatewayd.identity.blocks import (
    Action,
    Block,
    BlockFile,
    BlockState,
    RedisBlocks,
    Sync,
    UserBlocks,
    block_key,
)
from gatewayd.identity.ldap import LdapDirectory
from gatewayd.state import StateUnavailable
from gatewayd.state.redis import RedisState


def config_file(tmp_path: Path, backend: str = "file") -> Path:
    (tmp_path / "users.toml").write_text(
        f'[users.alice]\npassword_hash = "{password_hash("alice-password")}"\n')
    (tmp_path / "users.toml").chmod(0o600)
    config = tmp_path / "gatewayd.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[directory]\nbackend = "{backend}"\nfile = "{tmp_path / "users.toml"}"\n')
    return config


def gw_password(user: str) -> str:
    return USERS[user][0]


def users(*args: str) -> int:
    return main(["users", *args])


# --- the commands against a state directory ------------------------------------------------------


def test_disable_blocks_and_enable_lifts(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    config = str(config_file(tmp_path))
    assert users("disable", "ALICE", "--reason", "laptop stolen", "--config", config) == 0
    assert "alice is now blocked by the gateway" in capsys.readouterr().out
    path = tmp_path / "state" / "user-blocks.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert users("blocked", "--config", config) == 0
    [line] = capsys.readouterr().out.splitlines()
    user, since, operator, reason = line.split("\t")
    assert (user, reason) == ("alice", "laptop stolen")
    assert since.startswith("since 20") and operator.startswith("by ")
    assert users("disable", "alice", "--config", config) == 0  # again: no second block
    assert "already blocked" in capsys.readouterr().out
    assert len(BlockFile(tmp_path / "state").read().blocked) == 1

    assert users("enable", "TOKYO\\Alice", "--reason", "found", "--config", config) == 0
    out = capsys.readouterr().out
    assert "block of alice is lifted" in out
    assert "still disabled in" in out  # the users file's own flag is the operator's call
    assert BlockFile(tmp_path / "state").read().blocked == ()
    assert users("blocked", "--config", config) == 0
    assert capsys.readouterr().out == ""
    changes = BlockFile(tmp_path / "state").read().changes
    assert [(c.action, c.user, c.reason, c.done) for c in changes] == [
        ("block", "alice", "laptop stolen", False), ("block", "alice", None, False),
        ("lift", "alice", "found", False)]


def test_enable_refuses_what_is_not_blocked_and_usage_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(config_file(tmp_path))
    assert users("enable", "alice", "--config", config) == 1
    assert "not blocked by the gateway" in capsys.readouterr().err
    assert users("enable", "\x07", "--config", config) == 1
    with pytest.raises(SystemExit) as exc:
        users("enable", "--config", config)
    assert exc.value.code == 2


def test_the_ldap_backend_blocks_even_when_the_directory_does_not_answer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, "ldap")
    text = config.read_text().replace("[directory]\n", '[directory]\ntimeout = "2s"\n') + (
        '[directory.ldap]\nurls = ["ldap://127.0.0.1:1"]\nuser_base = "ou=people,dc=x"\n')
    config.write_text(text)
    assert users("disable", "TOKYO\\Alice", "--config", str(config)) == 0
    captured = capsys.readouterr()
    assert "blocking the name" in captured.out
    assert "Disable TOKYO\\Alice there too" in captured.err
    [blocked] = BlockFile(tmp_path / "state").read().blocked
    assert blocked.key == "alice"


@pytest.mark.parametrize("name", ["alice", "Alice", " ALICE ", "TOKYO\\alice",
                                  "\uff21\uff4c\uff49\uff43\uff45"])
def test_every_spelling_has_one_block_key(name: str) -> None:
    assert block_key(name) == "alice"


# --- a real gateway on LDAP ----------------------------------------------------------------------


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    with running_slapd(tmp_path / "slapd") as server:
        yield server


@pytest.fixture
async def gw(tmp_path: Path, slapd: Slapd) -> AsyncIterator[SshHarness]:
    directory = slapd.directory_settings()
    del directory["ldap"]["attributes"]  # (the harness writes flat tables only)
    (tmp_path / "gw").mkdir()
    async for harness in running_ssh_gateway(tmp_path / "gw", directory=directory):
        ldap = harness.gateway.authenticator.directory
        assert isinstance(ldap, LdapDirectory)
        yield harness
    await ldap.close()


async def cli(*args: str) -> int:
    return await asyncio.to_thread(main, ["users", *args])


async def form_login(https: Harness, user: str) -> int:
    status, _, _ = await https.login(https.client(), user, password=gw_password("alice"),
                                     code=https.code("alice"))
    return status


async def test_disable_on_ldap_ends_the_session_and_every_later_sign_in(
        gw: SshHarness, capsys: pytest.CaptureFixture[str]) -> None:
    https = gw.https
    alice = await https.signed_in("alice")
    config = str(https.config)
    assert await cli("disable", "alice", "--reason", "phone stolen", "--config", config) == 0
    assert "Disable alice there too" in capsys.readouterr().err
    await gw.gateway.emergency.check()
    async with alice.get(https.base + "/groupware/", allow_redirects=False,
                         headers={"Accept": "application/json"}) as resp:
        assert resp.status == 401
    assert [(e["user"], e["reason"]) for e in https.audit_events("session.end")] == [
        ("alice", "user_disabled")]

    # The directory still has alice enabled and her password and code are right.
    assert await gw.gateway.authenticator.directory.lookup("alice") is not None
    for typed in ("alice", "Alice", "ALICE"):
        assert await form_login(https, typed) == 401  # the generic wrong-password page
    run = await gw.run("alice", code=gw.fresh_code("alice"))
    assert run.returncode == 255 and "Permission denied" in run.stderr
    key = gw.certificate("alice")
    run = await gw.run("alice", key=key, options={"PreferredAuthentications": "publickey"})
    assert run.returncode == 255
    failures = [(e["frontend"], e.get("user"), e["reason"])
                for e in https.audit_events("auth.failure")]
    assert failures == [("https", "alice", "user_blocked")] * 3 + [
        ("ssh", "alice", "user_blocked"),  # keyboard-interactive
        ("ssh", None, "user_blocked")]  # the certificate (refused before a directory answer)
    assert gw.sessions() == []

    assert await cli("enable", "alice", "--reason", "phone found", "--config", config) == 0
    await gw.gateway.emergency.check()
    [enabled] = https.audit_events("user.enable")
    assert (enabled["user"], enabled["reason"], enabled["status"]) == ("alice", "phone found",
                                                                       "success")
    gw.clock.advance(30)
    assert await form_login(https, "alice") == 303
    await gw.gateway.emergency.check()  # a later round writes no second user.enable
    assert len(https.audit_events("user.enable")) == 1


async def test_the_session_refresh_ends_a_blocked_users_sessions(gw: SshHarness) -> None:
    https = gw.https
    await https.signed_in("alice")
    await https.signed_in("bob")
    blocks = gw.gateway.authenticator.blocks
    assert blocks is not None
    blocks.file.record("block", "TOKYO\\alice", operator="admin1", reason=None)
    await blocks.sync()  # what the emergency stop round reads (without its session sweep)
    assert await gw.gateway.refresh_principals() == 1
    assert [(e["user"], e["reason"]) for e in https.audit_events("session.end")] == [
        ("alice", "user_disabled")]


# --- two nodes on one Redis ----------------------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def test_a_block_made_on_node_a_stops_a_login_on_node_b(
        tmp_path: Path, redis: RedisServer) -> None:
    async with two_nodes(tmp_path, redis) as (a, b):
        # Node A's own users file gets disabled = true; node B's copy does not: only the
        # shared block can stop racer00 there.
        assert await cli("disable", "racer00", "--config", str(a.config)) == 0
        await a.gateway.emergency.check()  # published
        assert (await sign_in(b, 0))[0] == 401
        [failure] = b.audit_events("auth.failure")
        assert (failure["user"], failure["reason"]) == ("racer00", "user_blocked")
        assert (await sign_in(b, 1))[0] == 303  # only racer00

        await b.gateway.emergency.check()  # node B mirrors the cluster's list
        assert [x.user for x in BlockFile(b.gateway.settings.gateway.state_dir).read().blocked
                ] == ["racer00"]
        assert await cli("enable", "racer00", "--config", str(b.config)) == 0  # made on A
        await b.gateway.emergency.check()
        assert [e["user"] for e in b.audit_events("user.enable")] == ["racer00"]
        await a.gateway.emergency.check()
        assert BlockFile(a.gateway.settings.gateway.state_dir).read().blocked == ()
        b.clock.advance(30)  # (node A's users file still says disabled = true: a node
        assert (await sign_in(b, 0))[0] == 303  # each has its own copy of the file here)

        redis.kill()
        with pytest.raises(StateUnavailable):  # fail closed: the list cannot be read
            await b.gateway.authenticator.lookup("racer02")


# --- the shared list under stress (UserBlocks on a real redis-server, two state dirs) ----------

T0 = datetime(2026, 11, 27, 8, 0, 0, tzinfo=UTC)


class Node:
    """One gateway's blocks: its state directory and a `UserBlocks` on the shared Redis."""

    def __init__(self, state_dir: Path, state: RedisState | None) -> None:
        state_dir.mkdir(exist_ok=True)
        self.dir = state_dir
        self.state = state
        self.blocks = UserBlocks(state_dir, RedisBlocks(state) if state is not None else None)
        self.audited: list[str] = []
        self.superseded: list[str] = []

    def restarted(self) -> Node:
        node = Node(self.dir, self.state)
        node.audited = self.audited
        return node

    def command(self, action: Action, user: str, at: datetime) -> None:
        with DisableJournal(self.dir).locked(wait=2):
            BlockFile(self.dir).record(action, user, operator="admin", reason=None, now=at)

    async def round(self, *, audit: bool = True) -> Sync:
        """What `EmergencyStop._apply_blocks` does: sync, audit the lifts, finish."""
        sync = await self.blocks.sync()
        lifts = {lift.id for lift in sync.lifts}
        done = [i for i in sync.published if i not in lifts]
        if audit:
            self.audited += [lift.user for lift in sync.lifts]
            done += lifts
        superseded = await self.blocks.finish(
            done, sync, lambda: DisableJournal(self.dir).locked(wait=2))
        self.superseded += [lift.user for lift in superseded]
        return sync

    def file(self) -> list[str]:
        return [b.user for b in BlockFile(self.dir).read().blocked]


@pytest.fixture
async def shared(tmp_path: Path, redis: RedisServer) -> AsyncIterator[tuple[Node, Node]]:
    states = [RedisState(redis.url, key_prefix="gw:", timeout=1.0) for _ in "ab"]
    try:
        yield Node(tmp_path / "a", states[0]), Node(tmp_path / "b", states[1])
    finally:
        for state in states:
            await state.close()


async def flushall(redis: RedisServer) -> None:
    admin = Redis.from_url(redis.url)
    try:
        await admin.flushall()
    finally:
        await admin.aclose()


@pytest.mark.parametrize("loss", ["flushall", "restart"])
async def test_blocks_survive_redis_losing_its_data(
        shared: tuple[Node, Node], redis: RedisServer, loss: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Reviewer's probe 1: the hash was the whole truth, mirrored into every file — a Redis
    without its data emptied every node's list and file, and the block failed open."""
    a, b = shared
    a.command("block", "alice", T0)
    await a.round()
    await b.round()
    assert (a.file(), b.file()) == (["alice"], ["alice"])
    if loss == "flushall":
        await flushall(redis)
    else:
        redis.kill()
        redis.start()
    for node in (a, b):
        with contextlib.suppress(StateUnavailable):  # the old connection may fail once
            await node.round()
    await a.round()
    await b.round()
    assert await a.blocks.blocked("alice") and await b.blocks.blocked("alice")
    assert (a.file(), b.file()) == (["alice"], ["alice"])
    assert await a.restarted().blocks.blocked("alice")
    assert "shared state lacked" in caplog.text
    fresh = Node(a.dir.parent / "c", a.state)  # a node with an empty file: the shared list
    assert await fresh.blocks.blocked("alice")


async def test_a_stale_lift_does_not_undo_a_newer_block(shared: tuple[Node, Node]) -> None:
    """Reviewer's probe 2: node B's daemon is down when ``users enable bob`` runs there; bob is
    blocked again through node A later; B comes back — the newer block must stay."""
    a, b = shared
    a.command("block", "bob", T0)
    await a.round()
    await b.round()
    b.command("lift", "bob", T0 + timedelta(minutes=5))  # B's daemon is down
    a.command("block", "bob", T0 + timedelta(minutes=10))  # the laptop is stolen again
    await a.round()
    b = b.restarted()
    await b.round()  # the stale lift: audited (it was run) but superseded
    await b.round()
    await a.round()
    assert b.audited == ["bob"]
    assert await a.blocks.blocked("bob") and await b.blocks.blocked("bob")
    assert (a.file(), b.file()) == (["bob"], ["bob"])
    assert BlockFile(b.dir).read().changes[-1].done  # not re-applied every round


async def test_a_block_always_wins_over_a_lift_that_does_not_name_it(
        shared: tuple[Node, Node]) -> None:
    """A block made on B while its daemon was down, published after A lifted A's own block:
    the lift named A's block, not B's — B's block is in force (fail closed, no clocks)."""
    a, b = shared
    b.command("block", "carol", T0)  # B's daemon is down
    a.command("block", "carol", T0 + timedelta(minutes=1))
    await a.round()
    a.command("lift", "carol", T0 + timedelta(minutes=2))
    await a.round()
    await b.round()
    await a.round()
    assert await a.blocks.blocked("carol") and await b.blocks.blocked("carol")
    assert (a.file(), b.file()) == (["carol"], ["carol"])
    b.command("lift", "carol", T0 + timedelta(minutes=3))  # names B's block: lifts it
    await b.round()
    await a.round()
    assert not await a.blocks.blocked("carol") and not await b.blocks.blocked("carol")
    assert (a.file(), b.file()) == ([], [])


@pytest.mark.parametrize("skew", [timedelta(minutes=10), -timedelta(minutes=10)])
async def test_skewed_clocks_cannot_make_a_lift_defeat_a_later_block(
        shared: tuple[Node, Node], skew: timedelta, caplog: pytest.LogCaptureFixture) -> None:
    """Reviewer's probe: node B's clock is 10 minutes fast; B lifts alice, one real minute
    later A blocks her again (laptop stolen). Changes were ordered by each node's clock: the
    block was 'older', not written, and alice was unblocked everywhere (fail open)."""
    a, b = shared
    a.command("block", "alice", T0)
    await a.round()
    await b.round()
    b.command("lift", "alice", T0 + timedelta(minutes=1) + skew)
    await b.round()
    assert not await b.blocks.blocked("alice")
    a.command("block", "alice", T0 + timedelta(minutes=2))  # later in real time
    await a.round()
    await b.round()
    await a.round()
    assert await a.blocks.blocked("alice") and await b.blocks.blocked("alice")
    assert (a.file(), b.file()) == (["alice"], ["alice"])
    # A stale lift (B's daemon down, it still knows the lifted-then-renewed block's old id)
    # names an older block: superseded, whatever its time; audited and logged as such.
    c = Node(b.dir.parent / "c", b.state)
    with DisableJournal(c.dir).locked(wait=2):
        BlockFile(c.dir).write(BlockState((Block("alice", "x", "admin", None, "0" * 16),), ()))
    c.command("lift", "alice", T0 + timedelta(days=365))
    sync = await c.round()
    assert [lift.user for lift in sync.lifts] == ["alice"]
    assert c.superseded == ["alice"] and "superseded" in caplog.text
    await a.round()
    assert await a.blocks.blocked("alice") and await c.blocks.blocked("alice")
    assert c.file() == ["alice"]


async def test_a_lift_is_kept_as_a_tombstone_so_a_stale_file_cannot_resurrect_it(
        shared: tuple[Node, Node]) -> None:
    a, b = shared
    a.command("block", "dave", T0)
    await a.round()
    await b.round()
    a.command("lift", "dave", T0 + timedelta(minutes=1))
    await a.round()
    assert not await a.blocks.blocked("dave")
    b = b.restarted()  # B still has dave in its file: the hash's tombstone wins
    await b.round()
    await a.round()
    assert not await a.blocks.blocked("dave") and not await b.blocks.blocked("dave")
    assert (a.file(), b.file()) == ([], [])


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_lift_takes_effect_only_once_audited(
        shared: tuple[Node, Node], tmp_path: Path, backend: str) -> None:
    a = shared[0] if backend == "redis" else Node(tmp_path / "m", None)
    other = shared[1]
    a.command("block", "erin", T0)
    await a.round()
    a.command("lift", "erin", T0 + timedelta(minutes=1))
    assert a.file() == []  # `users blocked` no longer lists it
    fresh = a.restarted()
    assert await fresh.blocks.blocked("erin")  # a restarted node: not before the record
    await a.round(audit=False)  # user.enable could not be written
    assert await a.blocks.blocked("erin")
    if backend == "redis":
        await other.round()
        assert await other.blocks.blocked("erin")
    await a.round()
    assert a.audited == ["erin"] and not await a.blocks.blocked("erin")
    if backend == "redis":
        await other.round()
        assert not await other.blocks.blocked("erin")


async def test_a_corrupt_local_file_does_not_stop_enforcing_the_shared_list(
        shared: tuple[Node, Node]) -> None:
    a, b = shared
    await b.round()
    (b.dir / "user-blocks.json").write_text("{not json")
    a.command("block", "frank", T0)
    await a.round()
    with pytest.raises(JournalError, match="enforcing the shared list"):
        await b.round()
    assert b.blocks.blocked_locally("frank")  # its sessions on B end


async def hset(redis: RedisServer, field: str, value: str) -> None:
    admin = Redis.from_url(redis.url)
    try:
        await admin.hset("gw:user-blocks", field, value)
    finally:
        await admin.aclose()


@pytest.mark.parametrize(("field", "value", "blocked"), [
    ("", "garbage", None),
    ("\x01", "garbage", None),
    ("Mallory", "garbage", None),  # not a block key: no sign-in is ever checked against it
    ("mallory", json.dumps({"state": "block", "user": "", "at": "x", "id": "",
                            "operator": "o", "reason": None}), "mallory"),
    ("mallory", json.dumps({"state": "block", "user": "eve", "at": "x", "id": "i",
                            "operator": "o", "reason": None}), "mallory"),
    ("mallory", "garbage", "mallory"),
])
async def test_a_bad_value_in_the_hash_never_makes_the_blocks_file_unreadable(
        shared: tuple[Node, Node], redis: RedisServer, field: str, value: str,
        blocked: str | None) -> None:
    """Reviewer's probe: a field with no usable key, or a value whose user is '', was mirrored
    into every node's file as a block that file cannot read back: every later round failed,
    and ``users disable`` failed on every node."""
    a, _ = shared
    await a.round()
    await hset(redis, field, value)
    await a.round()
    assert a.file() == ([blocked] if blocked else [])  # readable; the field is the account
    a.command("block", "victim", T0)  # users disable still works
    await a.round()
    assert await a.blocks.blocked("victim")
    assert sorted(a.file()) == sorted(["victim", *([blocked] if blocked else [])])
    if blocked:
        assert await a.blocks.blocked(blocked)


def test_a_block_no_sign_in_can_match_is_never_written_and_skipped_on_reading(
        tmp_path: Path) -> None:
    blocks = BlockFile(tmp_path)
    blocks.write(BlockState((Block("", "x", "o", None), Block("bob", "x", "o", None, "i")), ()))
    assert [b.user for b in blocks.read().blocked] == ["bob"]
    blocks.path.write_text(json.dumps({  # written so by an earlier version: still readable
        "format": "gatewayd-user-blocks-v1", "changes": [],
        "blocked": [{"user": "\x01", "since": "x", "operator": "o", "reason": None},
                    {"user": "bob", "since": "x", "operator": "o", "reason": None}]}))
    assert [b.user for b in blocks.read().blocked] == ["bob"]


async def test_a_deeply_nested_value_fails_closed_instead_of_raising(
        shared: tuple[Node, Node], redis: RedisServer) -> None:
    """Reviewer's probe: ``'[' * 200000`` made json.loads raise RecursionError, uncaught by
    sync (every round, every node) and by the sign-in check."""
    a, _ = shared
    await hset(redis, "zed", "[" * 200_000)
    await hset(redis, "yan", "[" * 500 + "]" * 500)
    await a.round()
    assert await a.blocks.blocked("zed") and await a.blocks.blocked("yan")
    assert sorted(a.file()) == ["yan", "zed"]
    fresh = Node(a.dir.parent / "c", a.state)
    assert await fresh.blocks.blocked("zed")


async def test_the_documented_acl_user_may_keep_the_shared_list(
        redis: RedisServer, tmp_path: Path) -> None:
    state = await documented_acl_state(redis, tmp_path)
    try:
        node = Node(tmp_path / "a", state)
        node.command("block", "gina", T0)
        await node.round()  # EVALSHA / SCRIPT LOAD (HGET, HSET), HGETALL
        assert await node.blocks.blocked("gina")  # HMGET
        node.command("lift", "gina", T0 + timedelta(minutes=1))
        await node.round()
        assert not await node.blocks.blocked("gina")
    finally:
        await state.close()


# --- review round 6 --------------------------------------------------------------------------


@pytest.mark.parametrize("b_first", [True, False])
async def test_a_stale_lift_written_into_an_emptied_hash_does_not_beat_a_newer_block(
        shared: tuple[Node, Node], redis: RedisServer, b_first: bool) -> None:
    """Reviewer's P2: A blocks X, B mirrors it; B's gateway is down while A lifts X and blocks
    again (Y); B's operator lifts X (stale). Redis loses its data. In either order of rounds
    the newer block Y stays: B's lift did not name it."""
    a, b = shared
    a.command("block", "alice", T0)
    await a.round()
    await b.round()
    a.command("lift", "alice", T0 + timedelta(minutes=1))
    await a.round()
    a.command("block", "alice", T0 + timedelta(minutes=2))
    await a.round()
    b.command("lift", "alice", T0 + timedelta(minutes=3))  # names X
    await flushall(redis)
    for node in (b, a, b, a) if b_first else (a, b, a, b):
        await node.round()
    assert await a.blocks.blocked("alice") and await b.blocks.blocked("alice")
    assert (a.file(), b.file()) == (["alice"], ["alice"])


@pytest.mark.parametrize("b_first", [True, False])
async def test_a_block_lifted_through_its_own_id_stays_lifted_after_redis_lost_its_data(
        shared: tuple[Node, Node], redis: RedisServer, b_first: bool) -> None:
    a, b = shared
    a.command("block", "alice", T0)
    await a.round()
    await b.round()
    b.command("lift", "alice", T0 + timedelta(minutes=1))  # names X, the block in force
    await flushall(redis)
    for node in (b, a, b, a) if b_first else (a, b, a, b):
        await node.round()
    assert not await a.blocks.blocked("alice") and not await b.blocks.blocked("alice")
    assert (a.file(), b.file(), b.superseded) == ([], [], [])


async def test_a_reblock_then_a_lift_before_a_round_is_not_superseded(
        shared: tuple[Node, Node]) -> None:
    """Reviewer's P1: on B, before its gateway's next round, the account is blocked again
    (a new id) and then lifted; nobody blocked it elsewhere: the lift takes effect."""
    a, b = shared
    a.command("block", "alice", T0)
    await a.round()
    await b.round()
    b.command("block", "alice", T0 + timedelta(minutes=1))
    b.command("lift", "alice", T0 + timedelta(minutes=2))
    await b.round()
    await a.round()
    assert b.superseded == []
    assert not await b.blocks.blocked("alice") and not await a.blocks.blocked("alice")
    assert (a.file(), b.file()) == ([], [])


def redis_config(tmp_path: Path, url: str) -> str:
    config = config_file(tmp_path)
    config.write_text(config.read_text()
                      + f'[state]\nbackend = "redis"\nurl = "{url}"\nkey_prefix = "gw:"\n')
    return str(config)


async def test_disable_publishes_the_block_itself_while_the_gateway_is_down(
        tmp_path: Path, shared: tuple[Node, Node], redis: RedisServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Reviewer's P3: ``users disable`` on A while A's gateway is stopped reaches node B."""
    a, b = shared
    await b.round()
    config = redis_config(tmp_path, redis.url)
    assert await asyncio.to_thread(users, "disable", "alice", "--config", config) == 0
    assert "in the cluster's list" in capsys.readouterr().out
    assert await b.blocks.blocked("alice")  # before any round of either node
    await b.round()
    assert b.file() == ["alice"]
    node_a = Node(tmp_path / "state", a.state)  # A's gateway starts: publishing again is a no-op
    await node_a.round()
    assert await node_a.blocks.blocked("alice")
    assert node_a.file() == ["alice"]


async def test_disable_says_the_block_is_local_only_when_redis_cannot_be_reached(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = redis_config(tmp_path, f"redis://127.0.0.1:{port}/0")
    assert await asyncio.to_thread(users, "disable", "alice", "--config", config) == 1
    err = capsys.readouterr().err
    assert "THIS NODE ONLY" in err and "until this node's gateway publishes it" in err
    assert [x.user for x in BlockFile(tmp_path / "state").read().blocked] == ["alice"]
    assert DisableJournal(tmp_path / "state").path.exists()  # the request is written too


def test_block_key_is_its_own_block_key() -> None:
    """Reviewer's P4: NFKC then casefold is not idempotent; the key is a fixed point, and
    every spelling the directory lookup equates still has one key."""
    name = "ma\u00df\u0301"
    key = block_key(name)
    assert key is not None and block_key(key) == key
    assert block_key("MASS\u0301") == block_key("ma\u00df\u0301") == key


async def test_a_block_of_a_name_whose_fold_is_not_normal_is_mirrored(
        shared: tuple[Node, Node]) -> None:
    a, b = shared
    name = "ma\u00df\u0301"
    a.command("block", name, T0)
    await a.round()
    await b.round()
    assert await b.blocks.blocked(name) and await b.blocks.blocked(name.upper())
    assert b.file() == [name]
    b.command("lift", name, T0 + timedelta(minutes=1))  # users enable on B finds it
    await b.round()
    await a.round()
    assert not await a.blocks.blocked(name) and a.file() == []
