"""Two whole gateways (two nodes) sharing one real redis-server: sessions, seats and kills.

Each node is a `Gateway` of its own (tests/https_harness.py) with its own listeners, admin
socket, audit log, state directory and `gateway.node` name; both have the same users, TOTP
secrets (copied, as an operator would), Redis and key prefix. A browser's cookie from one node
is presented to the other, as a TCP load balancer without stickiness would do.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import pytest
from https_harness import Harness, password_hash, running_gateway
from redis_server import RedisServer, running_redis
from ssh_harness import running_ssh_gateway
from yarl import URL

from gatewayd.admin_cli import call
from gatewayd.https.headers import SESSION_COOKIE
from gatewayd.identity.totp import KEY_FILE, SECRETS_FILE, SecretStore
from gatewayd.sessions_shared import SharedSessionRegistry

H = TypeVar("H")
PREFIX = "ward-multi:"
RACERS = 20
SEATS = 10


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def racer(n: int) -> str:
    return f"racer{n:02d}"


def prepare_node(node_dir: Path) -> None:
    """The racers' users file and TOTP enrollments (node A; node B gets copies)."""
    lines = []
    for n in range(RACERS):
        lines += [f"[users.{racer(n)}]",
                  f"password_hash = {json.dumps(password_hash(f'racer-password-{n:02d}'))}",
                  'groups = ["telework-staff"]']
    node_dir.mkdir(parents=True)
    users = node_dir / "racers.toml"
    users.write_text("\n".join(lines) + "\n")
    users.chmod(0o600)
    (node_dir / "state").mkdir()
    store = SecretStore(node_dir / "state")
    for n in range(RACERS):
        store.enroll(racer(n), operator="test")


def copy_node(source: Path, target: Path) -> None:
    """Node B: the same users file, TOTP key and secrets as node A."""
    (target / "state").mkdir(parents=True)
    shutil.copy2(source / "racers.toml", target / "racers.toml")
    for name in (KEY_FILE, SECRETS_FILE):
        shutil.copy2(source / "state" / name, target / "state" / name)


@asynccontextmanager
async def one_node(node_dir: Path, name: str, redis: RedisServer,
                   **overrides: dict[str, Any]) -> AsyncIterator[Harness]:
    sections: dict[str, dict[str, Any]] = {
        "gateway": {"node": name},
        "state": {"backend": "redis", "url": redis.url, "key_prefix": PREFIX,
                  "timeout": "500ms"},
        "directory": {"file": "racers.toml"},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    runner = cast(AsyncGenerator[Harness, None], running_gateway(node_dir, **sections))
    harness = await anext(runner)
    try:
        assert isinstance(harness.gateway.sessions, SharedSessionRegistry)
        yield harness
    finally:
        await runner.aclose()


@asynccontextmanager
async def started(runner: AsyncIterator[H]) -> AsyncIterator[H]:
    """A harness generator (the body of a fixture) as a context manager."""
    body = cast(AsyncGenerator[H, None], runner)
    harness = await anext(body)
    try:
        yield harness
    finally:
        await body.aclose()


@asynccontextmanager
async def two_nodes(tmp_path: Path, redis: RedisServer, **overrides: dict[str, Any]
                    ) -> AsyncIterator[tuple[Harness, Harness]]:
    prepare_node(tmp_path / "a")
    copy_node(tmp_path / "a", tmp_path / "b")
    async with one_node(tmp_path / "a", "node-a", redis, **overrides) as a, \
            one_node(tmp_path / "b", "node-b", redis, **overrides) as b:
        yield a, b


async def sign_in(node: Harness, n: int) -> tuple[int, str]:
    """One racer signs in on ``node``: (status, the session cookie or '')."""
    client = node.client()
    status, _, response = await node.login(client, racer(n), password=f"racer-password-{n:02d}")
    morsel = response.cookies.get(SESSION_COOKIE)
    return status, morsel.value if morsel is not None else ""


def with_cookie(node: Harness, raw_id: str) -> aiohttp.ClientSession:
    """A browser holding ``raw_id`` that talks to ``node`` (the load balancer's choice)."""
    client = node.client()
    client.cookie_jar.update_cookies({SESSION_COOKIE: raw_id},
                                     response_url=URL(node.base))
    return client


async def status_of(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url, allow_redirects=False,
                          headers={"Accept": "application/json"}) as response:
        return response.status


async def until(condition: Any, limit: float = 10.0) -> None:
    give_up = time.monotonic() + limit
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def events(nodes: tuple[Harness, ...], event: str) -> list[dict[str, Any]]:
    return [record for node in nodes for record in node.audit_events(event)]


async def test_a_browser_may_reach_either_node(tmp_path: Path, redis: RedisServer) -> None:
    async with two_nodes(tmp_path, redis) as (a, b):
        status, raw_id = await sign_in(a, 0)
        assert status == 303 and raw_id
        browser_on_b = with_cookie(b, raw_id)
        assert await status_of(browser_on_b, b.base + "/groupware/inbox") == 200
        # The request reached the upstream as the signed-in user, via node B.
        assert any(record["path"] == "/groupware/inbox" for record in b.upstream.seen)
        (started,) = events((a, b), "session.start")
        assert started["node"] == "node-a"
        # A cookie nobody issued is not a session on either node.
        stranger = with_cookie(b, "A" * 43)
        assert await status_of(stranger, b.base + "/groupware/inbox") == 401


async def test_twenty_logins_race_for_ten_seats_across_two_nodes(
        tmp_path: Path, redis: RedisServer) -> None:
    async with two_nodes(tmp_path, redis, sessions={"max_concurrent": SEATS, "per_user": 1}
                         ) as nodes:
        results = await asyncio.gather(*(sign_in(nodes[n % 2], n) for n in range(RACERS)))
        statuses = [status for status, _ in results]
        assert statuses.count(303) == SEATS and statuses.count(503) == RACERS - SEATS
        # Both nodes took part, and both count every seat of the deployment.
        failures = events(nodes, "auth.failure")
        assert len(failures) == RACERS - SEATS
        assert {f["reason"] for f in failures} == {"seats_full"}
        assert len(events(nodes, "session.start")) == SEATS
        assert {e["node"] for e in events(nodes, "auth.success") + failures} == {
            "node-a", "node-b"}
        await until(lambda: all(n.gateway.sessions.seats_taken() == SEATS for n in nodes))
        # Either node's gauge shows why the next login is refused: 10 of 10 seats.
        for n in nodes:
            metrics = n.gateway.metrics.registry
            assert metrics.get_sample_value("gatewayd_sessions_active",
                                            {"frontend": "https"}) == SEATS
            assert metrics.get_sample_value("gatewayd_seats_limit") == SEATS


async def test_a_kill_on_one_node_closes_the_websocket_on_the_other_within_5_seconds(
        tmp_path: Path, redis: RedisServer) -> None:
    async with two_nodes(tmp_path, redis) as (a, b):
        status, raw_id = await sign_in(a, 3)
        assert status == 303
        ws = await with_cookie(b, raw_id).ws_connect(b.base + "/chat/room")
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
        assert a.gateway.listeners.admin_socket is not None
        started = time.monotonic()
        code, answer = await call(Path(a.gateway.listeners.admin_socket), "POST", "/v1/kill",
                                  body={"user": racer(3), "reason": "test"})
        assert code == 200 and len(answer["killed"]) == 1
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert time.monotonic() - started < 5.0
        # Audited once, by the node that ended it; the kill itself by the operator's node.
        await until(lambda: len(events((a, b), "session.end")) == 1)
        await asyncio.sleep(0.5)
        (ended,) = events((a, b), "session.end")
        assert (ended["node"], ended["reason"]) == ("node-a", "admin_kill")
        assert [e["node"] for e in events((a, b), "admin.session_kill")] == ["node-a"]
        assert await status_of(with_cookie(b, raw_id), b.base + "/groupware/inbox") == 401
        assert b.gateway.sessions.active() == 0


async def test_redis_lost_then_back(tmp_path: Path, redis: RedisServer) -> None:
    async with two_nodes(tmp_path, redis, state={"session_cache": "5s"}) as (a, b):
        status, raw_id = await sign_in(a, 5)
        assert status == 303
        browser_on_b = with_cookie(b, raw_id)
        url = b.base + "/groupware/inbox"
        assert await status_of(browser_on_b, url) == 200
        redis.kill()
        assert await status_of(browser_on_b, url) == 200  # within session_cache: served
        assert (await sign_in(b, 6))[0] == 503  # no new login without Redis
        b.clock.advance(6)  # past session_cache without a word from Redis: fail closed
        assert await status_of(browser_on_b, url) == 503
        redis.start()  # empty, as after a crash without persistence: the session is gone
        await until(lambda: b.gateway.sessions.in_sync  # type: ignore[attr-defined]
                    and a.gateway.sessions.in_sync, limit=15.0)  # type: ignore[attr-defined]
        assert await status_of(browser_on_b, url) == 401
        assert b.gateway.sessions.active() == a.gateway.sessions.active() == 0
        await until(lambda: len(events((a, b), "session.end")) == 1)
        (ended,) = events((a, b), "session.end")
        assert ended["reason"] == "state_lost"
        b.clock.advance(30)  # the next TOTP step
        assert (await sign_in(b, 6))[0] == 303  # recovered without a restart


async def test_a_kill_on_one_node_ends_an_ssh_connection_held_by_the_other(
        tmp_path: Path, redis: RedisServer) -> None:
    state = {"backend": "redis", "url": redis.url, "key_prefix": PREFIX, "timeout": "500ms"}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    async with started(running_ssh_gateway(tmp_path / "b", state=state,
                                           gateway={"node": "node-b"})) as b, \
            started(running_gateway(tmp_path / "a", state=state,
                                    gateway={"node": "node-a"})) as a:
        process = await b.spawn("alice", "-N")
        held = await b.wait_for_session("alice")
        await until(lambda: a.gateway.sessions.by_handle(held.handle) is not None)
        assert a.gateway.sessions.seats_taken() == 1  # node A counts B's seat
        assert a.gateway.listeners.admin_socket is not None
        code, answer = await call(Path(a.gateway.listeners.admin_socket), "POST",
                                  "/v1/kill", body={"user": "alice", "reason": "test"})
        assert code == 200 and answer["killed"] == [held.handle]
        begun = time.monotonic()
        await asyncio.wait_for(process.wait(), 5.0)
        assert time.monotonic() - begun < 5.0
        await until(lambda: not b.sessions())
        await asyncio.sleep(0.5)
        ends = [(e["node"], e["frontend"], e["reason"])
                for e in a.audit_events("session.end") + b.audit_events("session.end")]
        assert ends == [("node-a", "ssh", "admin_kill")]


async def test_a_node_that_stops_leaves_the_browser_sessions_to_the_other(
        tmp_path: Path, redis: RedisServer) -> None:
    prepare_node(tmp_path / "a")
    copy_node(tmp_path / "a", tmp_path / "b")
    async with one_node(tmp_path / "b", "node-b", redis) as b:
        async with one_node(tmp_path / "a", "node-a", redis) as a:
            status, raw_id = await sign_in(a, 7)
            assert status == 303
            await until(lambda: b.gateway.sessions.active() == 1)
        # Node A has stopped (SIGTERM): its browser session lives on, served by node B.
        assert await status_of(with_cookie(b, raw_id), b.base + "/groupware/inbox") == 200
        assert a.audit_events("session.end") == [] and b.gateway.sessions.seats_taken() == 1
