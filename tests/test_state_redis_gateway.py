"""The whole gateway on ``state.backend = "redis"`` against a real redis-server: sign-in, two
gateways sharing the TOTP replay cache and the brute-force counters, and fail-closed logins
(HTTPS and SSH) plus ``/readyz`` while Redis is down — and recovery without a restart when it
returns.

Each test starts its own redis-server (tests/redis_server.py) and gateways
(tests/https_harness.py, overrides per config section). Two gateways are two nodes of one
deployment: their own state directories, audit logs and listeners; the same TOTP secrets
(copied, as an operator would) and the same Redis and key prefix.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from https_harness import Harness, running_gateway
from redis.asyncio import Redis
from redis_server import RedisServer, running_redis
from ssh_harness import running_ssh_gateway

from gatewayd.https.login import UNAVAILABLE_MESSAGE
from gatewayd.identity.totp import KEY_FILE, SECRETS_FILE
from gatewayd.state.redis import RedisState

PREFIX = "ward-test:"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def state_section(redis: RedisServer) -> dict[str, Any]:
    return {"backend": "redis", "url": redis.url, "key_prefix": PREFIX, "timeout": "300ms"}


@asynccontextmanager
async def gateway(tmp_path: Path, redis: RedisServer, **overrides: dict[str, Any]
                  ) -> AsyncIterator[Harness]:
    # running_gateway is an async generator (the body of a fixture); closed explicitly, so
    # the gateway stops even when the test body fails.
    runner = cast(AsyncGenerator[Harness, None],
                  running_gateway(tmp_path, state=state_section(redis), **overrides))
    harness = await anext(runner)
    try:
        assert isinstance(harness.gateway.state, RedisState)
        yield harness
    finally:
        await runner.aclose()


def share_totp_secrets(source: Harness, node_dir: Path) -> None:
    """Give the second node the first node's TOTP key and secrets (before it starts)."""
    state = node_dir / "state"
    state.mkdir(parents=True)
    for name in (KEY_FILE, SECRETS_FILE):
        shutil.copy2(source.gateway.settings.gateway.state_dir / name, state / name)


async def readyz(gw: Harness) -> tuple[int, dict[str, object]]:
    assert gw.gateway.listeners.metrics_url is not None
    url = gw.gateway.listeners.metrics_url.removesuffix("/metrics") + "/readyz"
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        return resp.status, await resp.json()


def failure_reasons(gw: Harness) -> list[str]:
    return [e["reason"] for e in gw.audit_events("auth.failure")]


async def test_sign_in_keeps_its_state_in_redis(tmp_path: Path, redis: RedisServer) -> None:
    async with gateway(tmp_path / "a", redis) as gw:
        assert (await readyz(gw))[0] == 200
        await gw.signed_in("alice")
        raw = Redis.from_url(redis.url)
        try:
            names = sorted([n.decode() async for n in raw.scan_iter(match=PREFIX + "*")])
        finally:
            await raw.aclose()
        # The claimed TOTP step and the two burned before it; the source counter left.
        assert sum(n.startswith(PREFIX + "totp:") for n in names) == 3, names
        assert [e["user"] for e in gw.audit_events("auth.success")] == ["alice"]


async def test_a_code_used_on_one_node_is_refused_on_the_other(
        tmp_path: Path, redis: RedisServer) -> None:
    async with gateway(tmp_path / "a", redis) as node_a:
        share_totp_secrets(node_a, tmp_path / "b")
        async with gateway(tmp_path / "b", redis) as node_b:
            code = node_a.code("bob")
            assert code == node_b.code("bob")  # same secret, same clock
            status, _, _ = await node_a.login(node_a.client(), "bob", code=code)
            assert status == 303
            status, body, _ = await node_b.login(node_b.client(), "bob", code=code)
            assert status == 401 and "Sign-in is temporarily unavailable" not in body
            assert failure_reasons(node_b) == ["replayed_code"]
            # The next code works on node B: the shared cache refuses only what was used.
            status, _, _ = await node_b.login(node_b.client(), "bob", code=node_b.code("bob", 1))
            assert status == 303


async def test_failed_attempts_on_one_node_throttle_the_other(
        tmp_path: Path, redis: RedisServer) -> None:
    login = {"failures_before_backoff": 3, "backoff_initial": "1m"}
    async with gateway(tmp_path / "a", redis, login=login) as node_a:
        share_totp_secrets(node_a, tmp_path / "b")
        async with gateway(tmp_path / "b", redis, login=login) as node_b:
            for _ in range(3):
                status, _, _ = await node_a.login(node_a.client(), "alice", password="guess")
                assert status == 401
            status, _, response = await node_b.login(node_b.client(), "alice")  # right now
            assert status == 429
            assert 50 <= int(response.headers["Retry-After"]) <= 60
            assert failure_reasons(node_b) == ["throttled"]
            # Carol is not affected (per account), nor is the source yet (4 x 3 failures).
            status, _, _ = await node_b.login(node_b.client(), "carol")
            assert status == 303


async def test_redis_down_refuses_logins_and_readiness_then_recovers(
        tmp_path: Path, redis: RedisServer) -> None:
    async with gateway(tmp_path / "a", redis) as gw:
        early = await gw.signed_in("alice")  # a session from before the outage
        redis.kill()
        status, detail = await readyz(gw)
        assert (status, detail) == (503, {"ready": False, "detail": "state store unavailable"})
        status, body, _ = await gw.login(gw.client(), "bob")
        assert status == 503
        assert UNAVAILABLE_MESSAGE in body
        assert failure_reasons(gw) == ["state_unavailable"]
        assert gw.audit_events("auth.failure")[0]["user"] == "bob"
        # A session opened before the outage continues (its checks do not need Redis).
        async with early.get(gw.base + "/groupware/inbox", allow_redirects=False) as resp:
            assert resp.status == 200

        redis.start()  # same port, empty (no persistence): nothing to restart in gatewayd
        assert (await readyz(gw))[0] == 200
        status, _, _ = await gw.login(gw.client(), "bob")
        assert status == 303
        assert [e["user"] for e in gw.audit_events("auth.success")] == ["alice", "bob"]


async def test_hung_redis_refuses_logins_within_the_timeout(
        tmp_path: Path, redis: RedisServer) -> None:
    async with gateway(tmp_path / "a", redis) as gw:
        client = gw.client()
        token = await gw.login_form(client)
        redis.pause()
        try:
            status, body, _ = await gw.login(client, "carol", token=token)
            assert (await readyz(gw))[0] == 503
        finally:
            redis.resume()
        assert status == 503 and UNAVAILABLE_MESSAGE in body
        assert failure_reasons(gw) == ["state_unavailable"]
        status, _, _ = await gw.login(gw.client(), "carol")
        assert status == 303


async def test_ssh_sign_in_fails_closed_while_redis_is_down(
        tmp_path: Path, redis: RedisServer) -> None:
    async for gw in running_ssh_gateway(tmp_path, state=state_section(redis)):
        assert isinstance(gw.gateway.state, RedisState)
        redis.kill()
        run = await gw.run("alice")
        # The person is told why (the SSH disconnect reason), not just "Permission denied".
        assert run.returncode == 255
        assert "Sign-in is temporarily unavailable" in run.stderr
        (failure,) = gw.audit_events("auth.failure")
        assert failure["frontend"] == "ssh" and failure["reason"] == "state_unavailable"
        assert gw.sessions() == []
        redis.start()
        process = await gw.spawn("alice", "-T")
        session = await gw.wait_for_session("alice")
        assert session.frontend == "ssh"
        process.terminate()
        await process.wait()
