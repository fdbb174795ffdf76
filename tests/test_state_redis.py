"""Tests for gatewayd.state.redis.RedisState against a real redis-server (tests/redis_server.py).

The behavioural contract shared with MemoryState is in tests/test_state_store.py; here:
two nodes racing on one key, real expiry on the server's clock, key prefixes, outages (killed,
hung, restarted — the same object recovers), credentials from a file (requirepass and an ACL
user with only the documented permissions), TLS, the ``[state]`` config section and
`build_state`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer, running_redis

from gatewayd.config import ConfigError, settings_from_mapping
from gatewayd.state import MemoryState, StateUnavailable, build_state
from gatewayd.state.redis import OPERATIONS, RedisState, _milliseconds

PASSWORD = "redis-test-password-7f3a"
ACL_PASSWORD = "acl-user-password-91bc"
# The ACL documented in CONFIGURATION.md, word for word (minus the user and password).
DOCUMENTED_ACL = ("~gatewayd:* resetchannels -@all +set +incrby +pexpire +get +pttl +del "
                  "+multi +exec +ping +select +client|setname")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(Path(tmp_path_factory.mktemp("redis"))) as running:
        yield running


@pytest.fixture
def outage_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of its own, for tests that kill, pause or restart it."""
    with running_redis(tmp_path / "redis") as running:
        yield running


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def node_a(server: RedisServer, prefix: str) -> AsyncIterator[RedisState]:
    store = RedisState(server.url, key_prefix=prefix)
    yield store
    await store.close()


@pytest.fixture
async def node_b(server: RedisServer, prefix: str) -> AsyncIterator[RedisState]:
    store = RedisState(server.url, key_prefix=prefix)
    yield store
    await store.close()


def secret_file(tmp_path: Path, text: str, name: str = "redis-password") -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


# --- two nodes ------------------------------------------------------------------------------


async def test_two_nodes_racing_add_once_have_exactly_one_winner(
        node_a: RedisState, node_b: RedisState) -> None:
    for round_ in range(5):
        key = f"totp:used:alice:{round_}"
        calls = [node.add_once(key, 60) for _ in range(25) for node in (node_a, node_b)]
        results = await asyncio.gather(*calls)
        assert len(results) == 50
        assert results.count(True) == 1


async def test_two_nodes_incrementing_one_counter_sum_exactly(
        node_a: RedisState, node_b: RedisState) -> None:
    calls = [node.incr("login:fails:u:x", 60, amount)
             for amount in (1, 2, 3) * 20 for node in (node_a, node_b)]
    values = await asyncio.gather(*calls)
    assert await node_a.get_int("login:fails:u:x") == 2 * 20 * 6
    assert await node_b.get_int("login:fails:u:x") == 240
    # Each answer is the counter right after that one increment: all different, the last 240.
    assert len(set(values)) == len(values) and max(values) == 240
    remaining = await node_b.remaining("login:fails:u:x")
    assert remaining is not None and 59 < remaining <= 60


async def test_a_flag_set_on_one_node_is_seen_by_the_other(
        node_a: RedisState, node_b: RedisState) -> None:
    assert await node_a.add_once("login:lock:u:bob", 30)
    assert await node_b.add_once("login:lock:u:bob", 30) is False
    left = await node_b.remaining("login:lock:u:bob")
    assert left is not None and 29 < left <= 30
    await node_b.delete("login:lock:u:bob")
    assert await node_a.remaining("login:lock:u:bob") is None


# --- real expiry on the server's clock ------------------------------------------------------


async def test_keys_expire_on_the_servers_clock(node_a: RedisState) -> None:
    assert await node_a.add_once("short", 0.3)
    assert await node_a.incr("counter", 0.3) == 1
    await asyncio.sleep(0.2)
    assert await node_a.add_once("short", 0.3) is False
    assert await node_a.incr("counter", 0.3) == 2  # re-armed for another 0.3 s
    await asyncio.sleep(0.2)  # 0.4 s after creation: the flag is gone, the counter is not
    assert await node_a.get_int("short") == 0
    assert await node_a.get_int("counter") == 2
    await asyncio.sleep(0.25)
    assert await node_a.get_int("counter") == 0
    assert await node_a.add_once("short", 0.3) is True


@pytest.mark.parametrize(("ttl", "ms"), [
    (60, 60_000), (2.0001, 2001), (2.007, 2007), (0.3, 300), (1e-6, 1), (0.0015, 2),
    (86400.5, 86_400_500),
])
def test_ttl_is_sent_in_milliseconds_rounded_up(ttl: float, ms: int) -> None:
    assert _milliseconds(ttl) == ms


async def test_the_server_holds_the_ttl_sent(node_a: RedisState, server: RedisServer,
                                             prefix: str) -> None:
    await node_a.add_once("k", 90)
    await node_a.incr("c", 7.5)
    raw = Redis.from_url(server.url)
    try:
        assert 89_900 < await raw.pttl(prefix + "k") <= 90_000
        assert 7_400 < await raw.pttl(prefix + "c") <= 7_500
    finally:
        await raw.aclose()


# --- key prefixes -----------------------------------------------------------------------------


async def test_prefixes_isolate_deployments(server: RedisServer) -> None:
    ward = RedisState(server.url, key_prefix=f"ward-{uuid.uuid4().hex[:6]}:")
    test = RedisState(server.url, key_prefix=f"test-{uuid.uuid4().hex[:6]}:")
    raw = Redis.from_url(server.url)
    try:
        assert await ward.add_once("totp:used:alice:1", 60)
        assert await test.add_once("totp:used:alice:1", 60)  # its own namespace
        await ward.incr("n", 60, 5)
        assert await test.get_int("n") == 0
        await test.delete("totp:used:alice:1", "n")
        assert await ward.get_int("totp:used:alice:1") == 1
        names = {name.decode() async for name in raw.scan_iter(match=ward.key_prefix + "*")}
        assert names == {ward.key_prefix + "totp:used:alice:1", ward.key_prefix + "n"}
    finally:
        await ward.close()
        await test.close()
        await raw.aclose()


async def test_foreign_values_under_the_prefix_fail_closed(node_a: RedisState,
                                                           server: RedisServer,
                                                           prefix: str) -> None:
    raw = Redis.from_url(server.url)
    try:
        await raw.set(prefix + "text", "not a number", px=60_000)
        await raw.set(prefix + "forever", 1)  # no expiry: a lock that never ends? refuse
    finally:
        await raw.aclose()
    with pytest.raises(StateUnavailable, match="non-integer"):
        await node_a.get_int("text")
    with pytest.raises(StateUnavailable):
        await node_a.incr("text", 60)
    with pytest.raises(StateUnavailable, match="no expiry"):
        await node_a.remaining("forever")


# --- outages ------------------------------------------------------------------------------


async def test_killed_server_raises_quickly_and_the_same_object_recovers(
        outage_server: RedisServer) -> None:
    store = RedisState(outage_server.url, timeout=0.5)
    try:
        assert await store.add_once("k", 60)
        outage_server.kill()
        for operation in (store.check(), store.add_once("k2", 60), store.incr("c", 60),
                          store.get_int("k"), store.remaining("k"), store.delete("k")):
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match=re.escape("redis://127.0.0.1")):
                await operation
            assert time.monotonic() - started < 0.5 + 0.3
        outage_server.start()
        await store.check()
        assert await store.get_int("k") == 0  # no persistence: a restart forgets
        assert await store.add_once("k", 60) is True
        assert await store.incr("c", 60) == 1
    finally:
        await store.close()


async def test_the_observer_hears_each_call_by_its_operation(
        outage_server: RedisServer) -> None:
    store = RedisState(outage_server.url, timeout=0.5)
    heard: list[tuple[str, bool]] = []
    store.observer = lambda operation, ok: heard.append((operation, ok))
    try:
        await store.add_once("k", 60)
        await store.incr("c", 60)
        await store.remaining("k")
        await store.check()
        assert heard == [("add_once", True), ("counter", True), ("counter", True),
                         ("ping", True)]
        heard.clear()
        outage_server.kill()
        with pytest.raises(StateUnavailable):
            await store.incr("c", 60)
        with pytest.raises(StateUnavailable):
            await store.run(store.client.ping, "lookup")
        store.report("subscribe", False)
        assert heard == [("counter", False), ("lookup", False), ("subscribe", False)]
        assert {operation for operation, _ in heard} <= OPERATIONS

        def broken(operation: str, ok: bool) -> None:
            raise RuntimeError("a broken observer")

        store.observer = broken  # must not turn into the caller's error
        outage_server.start()
        assert await store.incr("c", 60) == 1
    finally:
        await store.close()


async def test_after_a_restart_no_operation_fails_on_a_stale_pooled_connection(
        outage_server: RedisServer) -> None:
    store = RedisState(outage_server.url)
    try:
        await asyncio.gather(*(store.incr("c", 60) for _ in range(10)))  # several connections
        outage_server.kill()
        await asyncio.sleep(0.05)  # the outage: the event loop sees the connections close
        outage_server.start()  # nothing used the pool in between
        results = await asyncio.gather(*(store.incr("c", 60) for _ in range(10)))
        assert sorted(results) == list(range(1, 11))  # every one succeeded, counted once
    finally:
        await store.close()


async def test_hung_server_raises_within_the_timeout_and_recovers(
        outage_server: RedisServer) -> None:
    store = RedisState(outage_server.url, timeout=0.3)
    try:
        assert await store.incr("c", 60) == 1  # a pooled connection exists
        outage_server.pause()
        try:
            for _ in range(3):  # pooled connection, then new connections: each bounded
                started = time.monotonic()
                with pytest.raises(StateUnavailable, match=re.escape("no answer within 0.3s")):
                    await store.incr("c", 60)
                assert 0.25 < time.monotonic() - started < 0.3 + 0.4
        finally:
            outage_server.resume()
        # The counter may have been incremented by the requests the server read before it
        # hung (the strict side); the store answers again without a new object.
        assert await store.incr("c", 60) >= 2
    finally:
        await store.close()


async def test_many_concurrent_operations_during_an_outage_all_fail_fast(
        outage_server: RedisServer) -> None:
    store = RedisState(outage_server.url, timeout=0.4, pool_size=4)
    try:
        outage_server.pause()
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(store.add_once(f"k{i}", 60) for i in range(40)),
                                           return_exceptions=True)
            elapsed = time.monotonic() - started
        finally:
            outage_server.resume()
        assert all(isinstance(r, StateUnavailable) for r in results)
        assert elapsed < 0.4 + 0.5  # pool waits are inside the same deadline
        assert await store.add_once("after", 60) is True
    finally:
        await store.close()


async def test_outage_and_recovery_are_logged_once_each(
        outage_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = RedisState(outage_server.url, timeout=0.3)
    caplog.set_level(logging.WARNING, logger="gatewayd.state.redis")
    try:
        outage_server.kill()
        for _ in range(5):
            with pytest.raises(StateUnavailable):
                await store.get_int("k")
        outage_server.start()
        for _ in range(3):
            await store.get_int("k")
    finally:
        await store.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "unavailable" in messages[0] and "logins are refused" in messages[0]
    assert "answers again" in messages[1]


async def test_server_down_at_start_is_not_an_error_until_used(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis") as server:
        url = server.url
        server.kill()
        store = RedisState(url, timeout=0.3)  # building it does not connect
        try:
            with pytest.raises(StateUnavailable, match=r"Connection refused|Error 111"):
                await store.check()
            server.start()
            await store.check()
        finally:
            await store.close()


# --- credentials ------------------------------------------------------------------------------


async def test_password_file_authenticates_and_never_shows_in_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_redis(tmp_path / "redis", password=PASSWORD) as server:
        good = RedisState(server.url, password_file=secret_file(tmp_path, PASSWORD))
        wrong = RedisState(server.url, password_file=secret_file(tmp_path, "guess", "wrong"))
        none = RedisState(server.url)
        missing = RedisState(server.url, password_file=tmp_path / "absent")
        try:
            assert await good.add_once("k", 60)
            problems = []
            for store in (wrong, none, missing):
                with pytest.raises(StateUnavailable) as caught:
                    await store.add_once("k", 60)
                problems.append(str(caught.value))
        finally:
            for store in (good, wrong, none, missing):
                await store.close()
    assert "invalid" in problems[0].lower() or "WRONGPASS" in problems[0]
    assert "NOAUTH" in problems[1] or "Authentication required" in problems[1]
    assert "absent" in problems[2] and "cannot read" in problems[2]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in "\n".join(problems) + logged
    assert PASSWORD not in repr(good) + repr(good._pool)


async def test_rotated_password_is_read_for_new_connections(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis", password=PASSWORD) as server:
        path = secret_file(tmp_path, PASSWORD)
        store = RedisState(server.url, password_file=path)
        admin = Redis.from_url(server.url, password=PASSWORD)
        try:
            assert await store.incr("c", 60) == 1
            await admin.config_set("requirepass", "rotated-password-2")
            path.write_text("rotated-password-2\n")
            await admin.client_kill_filter(_type="normal", skipme=True)  # drop old sessions
            assert await store.incr("c", 60) == 2  # a new connection, the new password
        finally:
            await store.close()
            await admin.aclose()


async def test_acl_user_with_the_documented_permissions(tmp_path: Path) -> None:
    users = {"gatewayd": (ACL_PASSWORD, "gatewayd:*")}
    with running_redis(tmp_path / "redis", acl_users=users) as server:
        admin = Redis.from_url(server.url)
        await admin.execute_command("ACL", "SETUSER", "gatewayd", "reset", "on",
                                    f">{ACL_PASSWORD}", *DOCUMENTED_ACL.split())
        await admin.aclose()
        password_file = secret_file(tmp_path, ACL_PASSWORD)
        store = RedisState(server.url + "", username="gatewayd", password_file=password_file)
        other_db = RedisState(server.url.removesuffix("/0") + "/3", username="gatewayd",
                              password_file=password_file)
        outside = RedisState(server.url, username="gatewayd", password_file=password_file,
                             key_prefix="elsewhere:")
        anonymous = RedisState(server.url, username="nobody", password_file=password_file)
        try:
            await store.check()
            assert await store.add_once("totp:used:alice:1", 60)
            assert await store.incr("login:fails:u:x", 60) == 1
            assert await store.get_int("login:fails:u:x") == 1
            assert await store.remaining("totp:used:alice:1") is not None
            await store.delete("totp:used:alice:1", "login:fails:u:x")
            assert await other_db.add_once("k", 60)
            with pytest.raises(StateUnavailable, match=r"NOPERM|permission"):
                await outside.add_once("k", 60)  # the ACL confines it to gatewayd:*
            with pytest.raises(StateUnavailable, match=r"WRONGPASS|invalid"):
                await anonymous.check()
        finally:
            for each in (store, other_db, outside, anonymous):
                await each.close()


async def test_tls_verifies_the_server_certificate(tmp_path: Path) -> None:
    with running_redis(tmp_path / "redis", tls=True) as server:
        assert server.url.startswith("rediss://")
        verified = RedisState(server.url, ca_file=server.ca_file)
        unknown_ca = RedisState(server.url)  # the system store does not know the test CA
        wrong_name = RedisState(server.url.replace("127.0.0.1", "localhost"),
                                ca_file=server.ca_file)  # the certificate names 127.0.0.1
        plain = RedisState(server.url.replace("rediss://", "redis://"), timeout=0.5)
        try:
            assert await verified.add_once("k", 60)
            with pytest.raises(StateUnavailable, match=r"(?i)certificate"):
                await unknown_ca.check()
            with pytest.raises(StateUnavailable, match=r"(?i)hostname|certificate"):
                await wrong_name.check()
            with pytest.raises(StateUnavailable):
                await plain.check()  # a TLS-only server does not speak plain RESP
        finally:
            for store in (verified, unknown_ca, wrong_name, plain):
                await store.close()


# --- construction, config, build_state ------------------------------------------------------


@pytest.mark.parametrize("url", [
    "redis://user:secret@127.0.0.1:6379/0", "redis://:secret@127.0.0.1", "http://127.0.0.1",
    "redis://127.0.0.1:6379/0?password=x", "redis://127.0.0.1:70000", "unix:///run/redis.sock",
])
def test_constructor_refuses_bad_urls(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        RedisState(url)
    assert "secret" not in str(caught.value)


def test_constructor_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timeout"):
        RedisState("redis://127.0.0.1", timeout=0)
    with pytest.raises(ValueError, match="password_file"):
        RedisState("redis://127.0.0.1", username="gatewayd")


@pytest.mark.parametrize(("table", "message"), [
    ({"backend": "redis"}, 'state: backend = "redis" needs url'),
    ({"url": "redis://gw:hunter2@10.0.0.5:6379/0"},
     "state.url: credentials do not belong in the URL"),
    ({"url": "rediss://:hunter2@redis.ward.local"}, "state.url: credentials do not belong"),
    ({"url": "http://10.0.0.5"}, 'state.url: expected a URL like "redis://'),
    ({"url": "redis://10.0.0.5", "ca_file": "ca.pem"},
     "state: ca_file is only used with a rediss:// (TLS) url"),
    ({"username": "gatewayd"}, "state: username (an ACL user) needs password_file"),
    ({"username": "gate way", "password_file": "p"}, "state.username: expected letters"),
    ({"timeout": "10s"}, 'state.timeout: expected a duration of at most "5s", got "10s"'),
    ({"timeout": "0s"}, "state.timeout: expected a duration greater than zero"),
    ({"key_prefix": ""}, "state.key_prefix: expected 1-64 letters"),
    ({"key_prefix": "a b"}, "state.key_prefix: expected 1-64 letters"),
    ({"backend": "sqlite"}, "state.backend: expected one of 'memory' or 'redis'"),
])
def test_state_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"state": table}, source="gw.toml")
    text = str(caught.value)
    assert text.startswith("gw.toml: ")
    assert message in text
    assert "hunter2" not in text


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1", "redis://127.0.0.1:6379", "redis://127.0.0.1:6379/0",
    "redis://redis.ward.local/2", "rediss://redis.ward.local:6380/0", "redis://[::1]:6379/0",
])
def test_state_config_accepts_urls(url: str) -> None:
    settings = settings_from_mapping({"state": {"backend": "redis", "url": url}})
    assert settings.state.url == url


async def test_build_state_picks_the_backend(tmp_path: Path) -> None:
    memory = build_state(settings_from_mapping({}), time.monotonic)
    assert isinstance(memory, MemoryState)
    settings = settings_from_mapping({"state": {
        "backend": "redis", "url": "rediss://redis.ward.local:6380/1", "username": "gw",
        "password_file": "pw", "ca_file": "ca.pem", "key_prefix": "ward1:", "timeout": "250ms",
    }}, base_dir=tmp_path)
    store = build_state(settings, time.monotonic)
    try:
        assert isinstance(store, RedisState)
        assert (store.url, store.key_prefix, store.timeout) == (
            "rediss://redis.ward.local:6380/1", "ward1:", 0.25)
        kwargs = store._pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")
        assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
        assert kwargs["credential_provider"].path == tmp_path / "pw"
        assert kwargs["credential_provider"].username == "gw"
        # No retry inside an operation: an INCRBY whose answer was lost is not sent twice.
        connection = store._pool.make_connection()  # type: ignore[no-untyped-call]
        assert connection.retry.get_retries() == 0
    finally:
        await store.close()
