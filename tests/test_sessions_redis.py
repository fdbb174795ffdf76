"""`SharedSessionRegistry` on a real redis-server: two registries are two nodes.

Each node has its own `RedisState` (own connection pool) on the same Redis and key prefix, as
two gateway processes would; their monotonic clocks are made to differ on purpose, so that
only the wall-clock times in Redis can make them agree.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer, documented_acl_state, running_redis

from gatewayd.identity.principal import Principal
from gatewayd.sessions import PerUserLimit, SeatsFull, Session, hash_session_id
from gatewayd.sessions_shared import SharedSessionRegistry
from gatewayd.state.redis import RedisState
from gatewayd.state.sessions import EXPIRY_GRACE, Beat, RedisSessions, Refused, heartbeat_ttl
from gatewayd.state.store import StateUnavailable

PREFIX = "ward-test:"
ALICE = Principal("alice", groups=frozenset({"staff"}), attributes={"office_pc": "pc-17"})


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@dataclass
class Node:
    """One node: its registry and what its hooks saw."""

    registry: SharedSessionRegistry
    ended: list[tuple[str, str]] = field(default_factory=list)  # audited here
    remote: list[tuple[str, str]] = field(default_factory=list)  # ended by another node


@asynccontextmanager
async def node(redis: RedisServer, name: str, *, skew: float = 0.0, max_concurrent: int = 10,
               per_user: int = 1, idle: float = 600, absolute: float = 3600,
               cache_time: float = 30, heartbeat_ttl: float | None = None
               ) -> AsyncIterator[Node]:
    state = RedisState(redis.url, key_prefix=PREFIX, timeout=0.3)
    clock: Callable[[], float] = lambda: time.monotonic() + skew  # noqa: E731
    ended: list[tuple[str, str]] = []
    remote: list[tuple[str, str]] = []
    store = RedisSessions(state, node=name)
    if heartbeat_ttl is not None:  # shorter than in production, so that the test is quick
        store.heartbeat_ttl, store.heartbeat_interval = heartbeat_ttl, heartbeat_ttl / 5
    registry = SharedSessionRegistry(
        store, idle_timeout=idle, absolute_timeout=absolute,
        max_concurrent=max_concurrent, per_user=per_user, clock=clock, wall=time.time,
        on_end=lambda s, r: ended.append((s.handle, r)),
        on_remote_end=lambda s, r: remote.append((s.handle, r)), cache_time=cache_time)
    seen = Node(registry, ended, remote)
    registry.start()
    try:
        await until(lambda: seen.registry.in_sync)
        yield seen
    finally:
        await seen.registry.close()
        await state.close()


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    give_up = time.monotonic() + limit
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def login(n: Node, principal: Principal = ALICE, **options: object
                ) -> tuple[str, Session]:
    return await n.registry.admit(principal, frontend="https", source_ip="192.0.2.7",
                                  replace_oldest=True, **options)  # type: ignore[arg-type]


async def resolve(n: Node, raw_id: str) -> Session | None:
    await n.registry.prepare([raw_id])
    return n.registry.get(raw_id)


async def test_a_session_made_on_one_node_resolves_on_the_other(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b", skew=-5000.0) as b:
        raw, made = await a.registry.admit(ALICE, frontend="https", source_ip="192.0.2.7",
                                           device="laptop-3", device_user="alice",
                                           device_serial=4711)
        seen = await resolve(b, raw)
        assert seen is not None and seen is not made
        assert (seen.handle, seen.principal, seen.device, seen.device_user,
                seen.device_serial, seen.source_ip, seen.frontend) == (
            made.handle, ALICE, "laptop-3", "alice", 4711, "192.0.2.7", "https")
        # Times agree through the wall clock although the monotonic clocks are 5000 s apart.
        now_b = time.monotonic() - 5000.0
        assert abs((now_b - seen.created) - (time.monotonic() - made.created)) < 1.0
        assert b.registry.get("x" * 43) is None
        assert await resolve(b, "y" * 43) is None


async def test_redis_never_holds_the_raw_id_and_expires_the_record(redis: RedisServer) -> None:
    async with node(redis, "a", idle=120, absolute=3600) as a:
        raw, made = await login(a)
        client = Redis.from_url(redis.url)
        try:
            keys = [k.decode() async for k in client.scan_iter(match=PREFIX + "*")]
            values = [str(await client.hgetall(PREFIX + "s:" + made.handle))]
            ttl = await client.pttl(PREFIX + "id:" + hash_session_id(raw))
        finally:
            await client.aclose()
        assert all(raw not in text for text in keys + values)
        assert PREFIX + "id:" + hash_session_id(raw) in keys
        assert 0 < ttl <= (120 + EXPIRY_GRACE) * 1000


async def test_seats_are_counted_across_nodes(redis: RedisServer) -> None:
    async with node(redis, "a", max_concurrent=10) as a, \
            node(redis, "b", max_concurrent=10) as b:
        nodes = [a, b]

        async def attempt(i: int) -> bool:
            try:
                await login(nodes[i % 2], Principal(f"user{i}"))
            except SeatsFull:
                return False
            return True

        results = await asyncio.gather(*(attempt(i) for i in range(20)))
        assert sum(results) == 10
        await until(lambda: a.registry.seats_taken() == b.registry.seats_taken() == 10)


async def test_newest_login_wins_across_nodes(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b") as b:
        raw_old, old = await login(a)
        closed: list[str] = []
        old.add_closer(closed.append)
        raw_new, _ = await login(b)
        # Node B replaced it, so B audits it; A closes what it held within moments.
        assert b.ended == [(old.handle, "replaced")]
        await until(lambda: closed == ["replaced"])
        assert a.ended == [] and a.remote == [(old.handle, "replaced")]
        assert await resolve(a, raw_old) is None
        assert (await resolve(a, raw_new)) is not None
        # Without replace_oldest the cap refuses, whichever node is asked.
        with pytest.raises(PerUserLimit):
            await a.registry.admit(ALICE, frontend="https", source_ip="192.0.2.7")


async def test_a_certificate_session_shares_the_portal_seat(redis: RedisServer) -> None:
    async with node(redis, "a", max_concurrent=1) as a, \
            node(redis, "b", max_concurrent=1) as b:
        _, portal = await login(a)
        await until(lambda: b.registry.by_handle(portal.handle) is not None)
        seat_of = b.registry.by_handle(portal.handle)
        _, ssh = await b.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7",
                                        seat_of=seat_of)
        assert ssh.seat == portal.handle
        with pytest.raises(SeatsFull):
            await login(b, Principal("bob"))
        # The portal session ends; the SSH one keeps the seat.
        a.registry.end(portal, "logout")
        await until(lambda: a.registry.by_handle(portal.handle) is None
                    and b.registry.by_handle(portal.handle) is None)
        with pytest.raises(SeatsFull):
            await login(a, Principal("bob"))
        b.registry.end(ssh, "disconnected")
        await until(lambda: a.registry.seats_taken() == 0)
        await login(a, Principal("bob"))


async def test_an_end_on_one_node_closes_the_session_everywhere_once(
        redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b") as b:
        raw, made = await login(a)
        held = await resolve(b, raw)
        assert held is not None
        closed: list[str] = []
        held.add_closer(closed.append)
        started = time.monotonic()
        a.registry.end(made, "admin_kill")
        await until(lambda: closed == ["admin_kill"], limit=5.0)
        assert time.monotonic() - started < 5.0
        await until(lambda: a.ended == [(made.handle, "admin_kill")])
        assert b.ended == [] and b.remote == [(made.handle, "admin_kill")]
        assert await resolve(b, raw) is None
        assert b.registry.active() == 0


async def test_activity_on_one_node_keeps_the_session_alive_on_the_other(
        redis: RedisServer) -> None:
    async with node(redis, "a", idle=3) as a, node(redis, "b", idle=3) as b:
        raw, made = await login(a)
        assert await resolve(b, raw) is not None
        for _ in range(5):  # 5 s of activity on A only: longer than the idle timeout
            await asyncio.sleep(1.0)
            a.registry.touch(made)
        assert await resolve(b, raw) is not None
        # Then nothing: it ends once, decided by Redis, audited by one node.
        await until(lambda: a.registry.active() == b.registry.active() == 0, limit=15.0)
        assert [r for _, r in a.ended + b.ended] == ["idle_timeout"]


async def test_step_up_and_rotation_reach_the_other_node(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b") as b:
        raw, made = await login(a)
        seen = await resolve(b, raw)
        assert seen is not None
        before = seen.mfa_at
        await asyncio.sleep(0.05)
        a.registry.mark_mfa(made)
        new_raw = a.registry.rotate(made)
        await until(lambda: seen.mfa_at > before and seen.id_hash == made.id_hash)
        assert await resolve(b, raw) is None
        assert await resolve(b, new_raw) is seen


async def test_redis_down_serves_the_replica_then_fails_closed_then_recovers(
        redis: RedisServer) -> None:
    async with node(redis, "a", cache_time=5) as a, node(redis, "b", cache_time=5) as b:
        raw, alices = await login(a)
        kept, bobs = await login(b, Principal("bob"))
        assert await resolve(a, kept) is not None
        redis.kill()
        with pytest.raises(StateUnavailable):
            await login(a, Principal("carol"))
        assert await resolve(a, kept) is not None  # within session_cache: the replica serves
        with pytest.raises(StateUnavailable):
            await resolve(a, "z" * 43)  # unknown here: only Redis could tell
        await asyncio.sleep(5.5)
        with pytest.raises(StateUnavailable):
            await resolve(a, kept)  # too long without Redis: fail closed
        redis.start()  # empty: the sessions are gone with the data
        await until(lambda: a.registry.in_sync and b.registry.in_sync, limit=15.0)
        assert await resolve(a, kept) is None and await resolve(b, raw) is None
        assert a.registry.active() == b.registry.active() == 0
        # Redis lost them: each ends everywhere, recorded once (by whichever node was first).
        assert sorted(r for _, r in a.ended + b.ended) == ["state_lost", "state_lost"]
        # Node A had both sessions: both were closed there, whichever node recorded them.
        assert sorted(h for h, _ in a.ended + a.remote) == sorted([alices.handle, bobs.handle])
        await login(a, Principal("carol"))


async def test_a_kill_sent_while_redis_was_down_arrives_after(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b") as b:
        raw, made = await login(a)
        held = await resolve(b, raw)
        assert held is not None
        closed: list[str] = []
        held.add_closer(closed.append)
        redis.pause()  # hung, data kept
        try:
            a.registry.end(made, "admin_kill")
            await until(lambda: a.ended == [(made.handle, "admin_kill")])  # audited at once
            await asyncio.sleep(0.5)
            assert closed == []  # cannot be delivered now
        finally:
            redis.resume()
        await until(lambda: closed == ["admin_kill"], limit=10.0)
        assert b.ended == []


async def test_an_earlier_mfa_time_is_shared(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b", skew=300.0) as b:
        earlier = time.monotonic() - 120  # e.g. an SSH certificate's portal login
        raw, made = await a.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7",
                                           mfa_at=earlier)
        seen = await resolve(b, raw)
        assert seen is not None
        now_a, now_b = time.monotonic(), time.monotonic() + 300.0
        assert abs(made.mfa_age(now_a) - 120) < 1.0
        assert abs(seen.mfa_age(now_b) - 120) < 1.0


async def test_the_documented_acl_user_may_do_everything_needed(
        redis: RedisServer, tmp_path: Path) -> None:
    state = await documented_acl_state(redis, tmp_path)
    ended: list[str] = []
    registry = SharedSessionRegistry(
        RedisSessions(state, node="a"), idle_timeout=600, absolute_timeout=3600,
        max_concurrent=10, per_user=1, clock=time.monotonic, wall=time.time,
        on_end=lambda _, r: ended.append(r), on_remote_end=lambda _, r: None, cache_time=30)
    registry.start()
    try:
        await until(lambda: registry.in_sync)  # SUBSCRIBE on the prefix's channel
        _, first = await login(Node(registry))
        _, second = await login(Node(registry))  # replaces the first (script + PUBLISH)
        registry.touch(second)
        registry.mark_mfa(second)
        registry.rotate(second)
        await registry.sync()
        await registry.resync()
        assert registry.by_handle(second.handle) is second and first.ended == "replaced"
        registry.end(second, "logout")
        await until(lambda: ended == ["replaced", "logout"])
        assert await state.incr("login:fail:x", 10) == 1  # and the StateStore operations
        await until(lambda: registry.live_nodes == 1)  # the heartbeat script ran (and reaps)
        beat = await registry.store.heartbeat(reap=True)
        assert beat.nodes == 1
    finally:
        await registry.close()
        await state.close()


async def test_activity_is_written_every_few_seconds_not_per_request(
        redis: RedisServer) -> None:
    async with node(redis, "a") as a:
        raw, made = await login(a)
        client = Redis.from_url(redis.url)

        async def script_calls() -> int:
            stats = await client.info("commandstats")
            return sum(int(stats.get(name, {}).get("calls", 0))
                       for name in ("cmdstat_evalsha", "cmdstat_eval"))

        beats = 0
        beat = a.registry.store.heartbeat

        async def counted(**options: Any) -> Beat:
            nonlocal beats
            beats += 1
            return await beat(**options)

        a.registry.store.heartbeat = counted  # type: ignore[method-assign]
        try:
            before = await script_calls()
            for _ in range(300):  # 300 requests in about 3 s
                await a.registry.prepare([raw])
                assert a.registry.get(raw) is made
                a.registry.touch(made)
                await asyncio.sleep(0.01)
            await asyncio.sleep(2.5)
            writes = await script_calls() - before - beats
        finally:
            await client.aclose()
        # One REFRESH per sync round (every 2 s) that has news: a handful, not 300.
        assert 1 <= writes <= 4, writes


async def test_a_silent_channel_is_noticed_and_reconnected(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b") as b:
        raw, made = await login(a)
        held = await resolve(b, raw)
        assert held is not None
        await asyncio.sleep(1.0)  # the channel is quiet now: nothing in flight
        redis.pause()  # the subscriber's socket stays open, but nothing answers
        try:
            paused = time.monotonic()
            await until(lambda: not b.registry.in_sync, limit=20.0)
            # Noticed by the unanswered ping (5 s of silence, 5 s to answer), not sooner.
            assert 2.0 < time.monotonic() - paused < 15.0
        finally:
            redis.resume()
        await until(lambda: a.registry.in_sync and b.registry.in_sync, limit=20.0)
        closed: list[str] = []
        held.add_closer(closed.append)
        a.registry.end(made, "logout")
        await until(lambda: closed == ["logout"], limit=5.0)


async def test_the_ending_node_reports_the_bytes_of_every_node(redis: RedisServer) -> None:
    async with node(redis, "a") as a, node(redis, "b") as b:
        raw, made = await login(a)
        held = await resolve(b, raw)
        assert held is not None
        held.add_bytes(up=100, down=5000)  # a download through node B…
        await b.registry.sync()  # …written with B's next sync round
        made.add_bytes(up=1, down=10)  # and a little through A, not yet written
        a.registry.end(made, "logout")
        await until(lambda: a.ended == [(made.handle, "logout")])
        assert (made.bytes_up, made.bytes_down) == (101, 5010)


async def test_a_node_stopping_while_redis_is_down_still_records_its_ends(
        redis: RedisServer) -> None:
    async with node(redis, "a") as a:
        _, ssh = await a.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7")
        raw, web = await login(a, Principal("bob"))
        redis.pause()  # hung: every write waits its full state.timeout
        try:
            assert a.registry.end_all("shutdown") == 2
            await a.registry.close()
        finally:
            redis.resume()
        # The SSH connection died with the node: recorded. The browser session was not ended
        # (it lives on in Redis for the other nodes), so nothing to record for it.
        assert a.ended == [(ssh.handle, "shutdown")]
        assert web.ended == "shutdown" and a.registry.get(raw) is None


# --- dead nodes (the heartbeat) ---------------------------------------------------------------

TTL = 1.0  # the test nodes' heartbeat TTL (production: heartbeat_ttl(state.timeout) >= 10 s)


async def crashed_node_session(redis: RedisServer, name: str, frontend: str = "ssh",
                               user: str = "bob") -> str:
    """A session admitted by a node process that then dies without a word (its heartbeat,
    renewed by the admission, runs out after `TTL`); returns the session's handle."""
    state = RedisState(redis.url, key_prefix=PREFIX, timeout=0.3)
    store = RedisSessions(state, node=name)
    store.heartbeat_ttl, store.idle_timeout, store.absolute_timeout = TTL, 600, 3600
    handle = secrets.token_hex(8)
    record = {"handle": handle, "id": hashlib.sha256(handle.encode()).hexdigest(),
              "user": user, "groups": "[]", "attributes": "{}", "frontend": frontend,
              "source_ip": "192.0.2.9", "device": "", "device_user": "",
              "device_serial": "", "bytes_up": "0", "bytes_down": "7", "node": name}
    try:
        await store.admit(record, max_concurrent=10, cap=5, replace_oldest=False,
                          seat_of=None)
    finally:
        await state.close()
    return handle


async def live_handles(redis: RedisServer) -> set[str]:
    client = Redis.from_url(redis.url)
    try:
        return {h.decode() for h in await client.zrange(PREFIX + "live", 0, -1)}
    finally:
        await client.aclose()


def test_the_heartbeat_ttl_follows_the_state_timeout() -> None:
    assert heartbeat_ttl(0.5) == heartbeat_ttl(1.0) == 10.0
    assert heartbeat_ttl(5.0) == 18.0  # slow answers allowed: wait longer before judging


async def test_a_crashed_nodes_ssh_sessions_end_once_and_its_browser_sessions_stay(
        redis: RedisServer) -> None:
    ssh = await crashed_node_session(redis, "gone", "ssh")
    web = await crashed_node_session(redis, "gone", "https", user="carol")
    crashed = time.monotonic()
    async with node(redis, "a", heartbeat_ttl=TTL) as a, \
            node(redis, "b", heartbeat_ttl=TTL) as b:
        await until(lambda: a.registry.by_handle(ssh) is not None
                    and b.registry.by_handle(ssh) is not None)
        await until(lambda: (ssh, "node_lost") in a.ended + b.ended, limit=10.0)
        # Not before the dead node's heartbeat ran out (TTL after its last beat), and about
        # a TTL (the judging node's own streak) plus a beat later at the most.
        assert TTL <= time.monotonic() - crashed < 2 * TTL + 1.5
        await asyncio.sleep(0.5)
        # Recorded by exactly one node; the other only closed its copy.
        assert [e for e in a.ended + b.ended if e[0] == ssh] == [(ssh, "node_lost")]
        assert [e for e in a.remote + b.remote if e[0] == ssh] == [(ssh, "node_lost")]
        assert await live_handles(redis) == {web}  # the seat is free; the browser's stays
        assert a.registry.by_handle(web) is not None and b.registry.seats_taken() == 1
        assert a.registry.live_nodes == b.registry.live_nodes == 2


async def test_a_node_restarted_under_its_name_does_not_adopt_its_earlier_sessions(
        redis: RedisServer) -> None:
    old = await crashed_node_session(redis, "a")
    # Restarted at once, long before its old heartbeat would have expired by itself.
    async with node(redis, "a", heartbeat_ttl=30.0) as a:
        client = Redis.from_url(redis.url)
        try:
            assert (await client.get(PREFIX + "hb:a")).decode() == a.registry.store.boot
        finally:
            await client.aclose()
        async with node(redis, "b", heartbeat_ttl=TTL) as b:
            await until(lambda: (old, "node_lost") in a.ended + b.ended, limit=10.0)
        assert a.registry.by_handle(old) is None and await live_handles(redis) == set()
        # Its own sessions of this run are kept by the other node's judgement.
        _, mine = await a.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7")
        async with node(redis, "c", heartbeat_ttl=TTL):
            await asyncio.sleep(2 * TTL + 1.0)
        assert mine.ended is None and await live_handles(redis) == {mine.handle}


async def test_a_clean_stop_removes_the_heartbeat(redis: RedisServer) -> None:
    client = Redis.from_url(redis.url)
    try:
        async with node(redis, "a") as a:
            async with node(redis, "b") as b:
                await until(lambda: b.registry.live_nodes == 2)
                _, ssh = await b.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7")
                assert await client.exists(PREFIX + "hb:b") == 1
                b.registry.end_all("shutdown")
            assert b.ended == [(ssh.handle, "shutdown")]
            assert await client.exists(PREFIX + "hb:b") == 0
            assert await client.zrange(PREFIX + "nodes", 0, -1) == [b"a"]
            await until(lambda: a.registry.live_nodes == 1, limit=3.0)  # its next beat
            # No second record for the SSH session (it ended cleanly: shutdown).
            assert (ssh.handle, "node_lost") not in a.ended + a.remote
    finally:
        await client.aclose()


async def test_no_node_is_judged_by_a_node_that_only_just_began_beating(
        redis: RedisServer) -> None:
    # After a Redis outage every node beats again within a beat; the first to come back must
    # not take the others for dead before they had their chance (it waits one TTL).
    ssh = await crashed_node_session(redis, "gone")
    await asyncio.sleep(TTL)  # "gone" is overdue from now on
    async with node(redis, "a", heartbeat_ttl=2.0) as a:
        await asyncio.sleep(1.5)  # but "a" has beaten for less than its own TTL
        assert ssh in await live_handles(redis)
        await until(lambda: (ssh, "node_lost") in a.ended, limit=3.0)


async def test_a_stalled_node_closes_the_ssh_sessions_the_others_ended(
        redis: RedisServer) -> None:
    async with node(redis, "a", heartbeat_ttl=TTL) as a, \
            node(redis, "b", heartbeat_ttl=TTL) as b:
        _, ssh = await a.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7")
        closed: list[str] = []
        ssh.add_closer(closed.append)  # the SSH connection on node a
        a.registry.store.heartbeat_interval = 3600  # a stalls: no beat after the next one
        await until(lambda: (ssh.handle, "node_lost") in b.ended, limit=3 * TTL + 2)
        # Node a is alive (subscribed): told, it closes the connection, without a record.
        await until(lambda: closed == ["node_lost"], limit=2.0)
        assert a.ended == [] and a.remote == [(ssh.handle, "node_lost")]
        assert a.registry.by_handle(ssh.handle) is None


def slow_answers(store: RedisSessions, name: str, when: Callable[[str], bool],
                 delay: float = 1.0) -> list[str]:
    """Make the script ``store._<name>`` answer after ``delay`` (past ``state.timeout``) the
    first time its answer satisfies ``when`` — the script ran, only its answer came too late.
    Returns the delayed answers."""
    real = getattr(store, "_" + name)
    delayed: list[str] = []

    def script(args: list[Any]) -> Any:
        async def run() -> Any:
            result = await real(args=args)
            text = result.decode() if isinstance(result, bytes) else str(result)
            if not delayed and when(text):
                delayed.append(text)
                await asyncio.sleep(delay)
            return result
        return run()

    setattr(store, "_" + name, script)
    return delayed


async def test_a_reaping_beat_whose_answer_is_lost_still_audits_the_sessions_once(
        redis: RedisServer) -> None:
    ssh = await crashed_node_session(redis, "gone", "ssh")
    async with node(redis, "a", heartbeat_ttl=TTL) as a:
        delayed = slow_answers(a.registry.store, "heartbeat", lambda text: ssh in text)
        await until(lambda: bool(delayed), limit=10.0)
        assert ssh not in await live_handles(redis)  # ended in Redis, the answer lost
        await until(lambda: (ssh, "node_lost") in a.ended, limit=5.0)  # from the outbox
        await asyncio.sleep(5 * a.registry.store.heartbeat_interval)
        assert a.ended == [(ssh, "node_lost")]  # once, though the outbox was read again
        client = Redis.from_url(redis.url)
        try:
            assert await client.zcard(PREFIX + "outbox:a") == 0  # acknowledged
        finally:
            await client.aclose()


async def test_an_admission_whose_answer_is_lost_is_undone_and_its_replaced_audited(
        redis: RedisServer) -> None:
    async with node(redis, "a", heartbeat_ttl=TTL) as a:
        _, old = await login(a)
        delayed = slow_answers(a.registry.store, "admit", lambda text: "replaced" in text
                               and old.handle in text)
        with pytest.raises(StateUnavailable):
            await login(a)  # told it failed…
        assert delayed
        # …so the new session does not keep a seat; the one it replaced is recorded once.
        await until(lambda: a.ended == [(old.handle, "replaced")], limit=5.0)
        await until(lambda: not a.registry._unsent_cancels, limit=5.0)
        assert await live_handles(redis) == set()
        await asyncio.sleep(5 * a.registry.store.heartbeat_interval)
        assert a.ended == [(old.handle, "replaced")]
        await login(a)  # the seat is free


async def test_an_admission_arriving_after_its_cancel_is_refused(redis: RedisServer) -> None:
    async with node(redis, "a") as a:
        store = a.registry.store
        store.idle_timeout, store.absolute_timeout = 600, 3600
        await store.cancel("00000000000000aa")  # nothing stored yet: a tombstone
        record = {"handle": "00000000000000aa", "id": "f" * 64, "user": "bob", "groups": "[]",
                  "attributes": "{}", "frontend": "ssh", "source_ip": "192.0.2.9",
                  "node": "a"}
        with pytest.raises(Refused):
            await store.admit(record, max_concurrent=10, cap=5, replace_oldest=False,
                              seat_of=None)
        assert await live_handles(redis) == set()


async def test_a_malformed_reaped_record_does_not_stop_the_heartbeat(
        redis: RedisServer) -> None:
    client = Redis.from_url(redis.url)
    try:  # an SSH record of a dead node without a user (as the old and new index see it)
        await client.hset(PREFIX + "s:00000000000000bb", mapping={
            "handle": "00000000000000bb", "id": "e" * 64, "frontend": "ssh", "node": "gone",
            "boot": "b0", "groups": "not json"})
        await client.zadd(PREFIX + "live", {"00000000000000bb": 0})
        await client.zadd(PREFIX + "ssh:b0", {"00000000000000bb": 0})
        await client.zadd(PREFIX + "bound", {"b0:gone": 0})
        async with node(redis, "a", heartbeat_ttl=TTL) as a:
            await until(lambda: a.registry.live_nodes != 0)
            later = await crashed_node_session(redis, "gone2", "ssh")
            await until(lambda: (later, "node_lost") in a.ended, limit=10.0)
            assert a.registry._heartbeat is not None and not a.registry._heartbeat.done()
            assert await client.exists(PREFIX + "s:00000000000000bb") == 0
    finally:
        await client.aclose()


async def test_reaping_reads_only_the_ssh_sessions_of_nodes_with_any(
        redis: RedisServer) -> None:
    client = Redis.from_url(redis.url)
    try:
        async with node(redis, "a", max_concurrent=500, per_user=500) as a:
            for i in range(200):  # browser sessions are never a dead node's
                await login(a, Principal(f"user{i}"))
            _, ssh = await a.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7")
            await client.config_resetstat()
            await a.registry.store.heartbeat(reap=True)
            stats = await client.info("commandstats")
        calls = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                    for name in ("hmget", "hgetall", "hget", "get"))
        assert calls <= 4, calls  # not one per session
        assert ssh.ended is None
    finally:
        await client.aclose()


async def test_a_missing_heartbeat_of_a_node_still_beating_is_no_verdict(
        redis: RedisServer) -> None:
    # The Redis host's clock steps forward: every heartbeat key expires at once. The nodes'
    # beat counts keep moving, so nobody's SSH sessions end.
    async with node(redis, "a", heartbeat_ttl=TTL) as a, \
            node(redis, "b", heartbeat_ttl=TTL) as b:
        _, ssh = await b.registry.admit(ALICE, frontend="ssh", source_ip="192.0.2.7")
        client = Redis.from_url(redis.url)
        try:
            await a.registry.store.heartbeat(reap=True)
            given_up = time.monotonic() + 3 * TTL + 1.0
            while time.monotonic() < given_up:  # b's key keeps vanishing
                await client.delete(PREFIX + "hb:b")
                await a.registry.store.heartbeat(reap=True)  # a judge without evidence
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        assert ssh.ended is None and a.ended == b.ended == []
        assert await live_handles(redis) == {ssh.handle}


async def test_a_node_running_twice_is_reported_once(
        redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async with node(redis, "a", heartbeat_ttl=TTL), node(redis, "a", heartbeat_ttl=TTL):
        await asyncio.sleep(6 * TTL / 5 + 0.5)  # several beats of each
    twice = [r for r in caplog.records if "another gatewayd process" in r.getMessage()]
    assert 1 <= len(twice) <= 2, len(twice)
