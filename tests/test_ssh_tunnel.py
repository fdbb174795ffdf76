"""Tests for gatewayd.ssh.tunnel: the tunnel broker against a real `Gateway` (audit log,
policy, sessions, metrics, fake clock), a small asyncssh server of this module calling
`Tunnels.open` for every direct-tcpip open, an asyncssh client, and real upstream servers on
127.0.0.1 reached through ``ssh.address_overrides``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from https_harness import REPO, FakeClock, toml

from gatewayd.app import Gateway
from gatewayd.audit import AuditWriteError
from gatewayd.config import load_settings
from gatewayd.identity.principal import Principal
from gatewayd.policy import load_policy
from gatewayd.sessions import Session
from gatewayd.ssh.tunnel import (
    CHANNEL_HIGH_WATER,
    MAX_TUNNELS_PER_SESSION,
    REFUSALS_PER_WINDOW,
    UPSTREAM_HIGH_WATER,
    Tunnels,
    describe_os_error,
    local_addresses,
)
from gatewayd.tasks import within

PROHIBITED = asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
CONNECT_FAILED = asyncssh.OPEN_CONNECT_FAILED
SHORTAGE = asyncssh.OPEN_RESOURCE_SHORTAGE
READ_CHUNK = 256 * 1024  # the most one asyncio read hands over


def _own_non_loopback() -> str | None:
    for net in local_addresses().networks:
        if net.num_addresses == 1 and not net.network_address.is_loopback \
                and not net.network_address.is_link_local:
            return str(net.network_address)
    return None


USERS: dict[str, tuple[set[str], dict[str, str]]] = {
    "alice": ({"telework-staff"}, {"office_pc": "pc-alice.ward.local"}),
    "bob": ({"telework-managers"}, {"office_pc": "pc-bob.ward.local"}),
    "mallory": ({"telework-staff"}, {"office_pc": "127.0.0.1"}),  # a self-edited attribute
    "eve": ({"telework-staff"}, {"office_pc": _own_non_loopback() or "192.0.2.1"}),
    "carol": ({"security-auditors"}, {}),
}


# --- upstream servers ---------------------------------------------------------------------


@dataclass
class Upstreams:
    """Plain TCP servers on 127.0.0.1 that the tunnels reach."""

    servers: list[asyncio.Server] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    received: dict[str, list[bytes]] = field(default_factory=dict)
    firehose_sent: list[int] = field(default_factory=lambda: [0])
    sinks: list[asyncio.StreamWriter] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, name: str,
                    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                      Awaitable[None]]) -> None:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.handlers.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                self.handlers.discard(task)

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        self.servers.append(server)
        self.ports[name] = server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()

        async def answer_after_eof(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until the client's EOF
            writer.write(b"got " + str(len(data)).encode() + b": " + data[::-1])
            await writer.drain()

        async def banner_then_listen(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
            writer.write(b"banner, then EOF")
            writer.write_eof()
            self.received.setdefault("banner", []).append(await reader.read())

        async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            chunk = b"x" * 65536
            while True:
                writer.write(chunk)
                await writer.drain()
                self.firehose_sent[0] += len(chunk)

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.sinks.append(writer)  # never reads
            await asyncio.Event().wait()

        for name, handler in (("echo", echo), ("answer", answer_after_eof),
                              ("banner", banner_then_listen), ("firehose", firehose),
                              ("sink", sink)):
            await self.serve(name, handler)
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            self.ports["closed"] = probe.getsockname()[1]

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.handlers):
            task.cancel()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=5)
        for server in self.servers:
            await server.wait_closed()


# --- the gateway and a small SSH server around Tunnels ---------------------------------------


def tunnel_policy(ports: dict[str, int]) -> str:
    echo = ports["echo"]
    return f"""
services:
  echo:
    kind: tcp
    destinations: ["echo.ward.local:7", "localhost:{echo}", "127.0.0.1:{echo}"]
  answer:
    kind: tcp
    destinations: answer.ward.local:7
  banner:
    kind: tcp
    destinations: banner.ward.local:7
  firehose:
    kind: tcp
    destinations: firehose.ward.local:19
  sink:
    kind: tcp
    destinations: sink.ward.local:9
  dead:
    kind: tcp
    destinations: dead.ward.local:1
  forbidden:
    kind: tcp
    destinations: forbidden.ward.local:7
  fresh:
    kind: tcp
    destinations: fresh.ward.local:7
  daytime:
    kind: tcp
    destinations: daytime.ward.local:7
rules:
  - id: tunnel-tests
    effect: allow
    subjects: {{roles: [staff, managers]}}
    services: [echo, answer, banner, firehose, sink, dead, daytime]
  - id: daytime-only
    effect: deny
    subjects: "*"
    services: daytime
    when: {{hours: "22:00-07:00"}}
  - id: fresh-mfa
    effect: allow
    subjects: {{roles: [staff, managers]}}
    services: fresh
    mfa_max_age: 1m
"""


def overrides(ports: dict[str, int]) -> dict[str, str]:
    local = {"echo.ward.local:7": "echo", "answer.ward.local:7": "answer",
             "banner.ward.local:7": "banner", "firehose.ward.local:19": "firehose",
             "sink.ward.local:9": "sink", "dead.ward.local:1": "closed",
             "forbidden.ward.local:7": "echo", "fresh.ward.local:7": "echo",
             "daytime.ward.local:7": "echo",
             "pc-alice.ward.local:3389": "echo", "pc-bob.ward.local:3389": "answer"}
    return {dest: f"127.0.0.1:{ports[name]}" for dest, name in local.items()}


class TunnelServer(asyncssh.SSHServer):
    """What the real server does for tunnels: one session per connection, every
    direct-tcpip open handed to `Tunnels.open`, the session ended when the client leaves."""

    def __init__(self, env: Env) -> None:
        self._env = env
        self._conn: asyncssh.SSHServerConnection | None = None
        self._session: Session | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        groups, attributes = USERS[username]
        _, self._session = self._env.gateway.sessions.create(
            Principal(username, frozenset(groups), attributes), frontend="ssh",
            source_ip="127.0.0.1")
        self._env.sessions[username] = self._session
        return False  # the tests are about tunnels, not authentication

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        assert self._session is not None and self._conn is not None
        if self._env.tunnels.cut_off(self._session):  # as the real server does
            raise asyncssh.ChannelOpenError(PROHIBITED, "too many refused tunnel requests")
        return self._env.tunnels.open(self._session, self._conn, dest_host=dest_host,
                                      dest_port=dest_port, orig_host=orig_host,
                                      orig_port=orig_port)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._session is not None:
            self._env.gateway.sessions.end(self._session, "logout")


@dataclass
class Env:
    gateway: Gateway
    tunnels: Tunnels
    clock: FakeClock
    upstreams: Upstreams
    policy_dir: Path
    ssh_port: int = 0
    sessions: dict[str, Session] = field(default_factory=dict)
    clients: list[asyncssh.SSHClientConnection] = field(default_factory=list)

    async def connect(self, user: str) -> asyncssh.SSHClientConnection:
        conn = await asyncssh.connect("127.0.0.1", self.ssh_port, username=user,
                                      known_hosts=None, client_keys=None, agent_path=None)
        self.clients.append(conn)
        return conn

    def audit(self, event: str) -> list[dict[str, Any]]:
        path = self.gateway.settings.audit.path
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [r for r in records if r["event"] == event]

    def metric(self, name: str, **labels: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    upstreams = Upstreams()
    await upstreams.start()
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir)
    (policy_dir / "50-tunnel-tests.yaml").write_text(tunnel_policy(upstreams.ports))
    (tmp_path / "state").mkdir()
    (tmp_path / "users.toml").write_text("")
    config = tmp_path / "gatewayd.toml"
    config.write_text(toml({
        "gateway": {"node": "ssh-tunnel-test", "state_dir": "state", "log_level": "warning"},
        "metrics": {"enabled": False},
        "policy": {"dir": "policies"},
        "audit": {"path": "log/audit.log", "signing_key": "state/audit.key",
                  "checkpoint_interval": "1h", "fsync": "interval"},
        "https": {"enabled": False},
        "admin": {"enabled": False},
        "directory": {"file": "users.toml"},
        "sessions": {"per_user": 3},
        "ssh": {"listen": "127.0.0.1:0"},
    }) + "address_overrides = {" + ", ".join(
        f"{json.dumps(k)} = {json.dumps(v)}" for k, v in overrides(upstreams.ports).items()
    ) + "}\n")
    clock = FakeClock()
    gateway = Gateway(load_settings(config), config_path=config, clock=clock.monotonic,
                      wall_clock=clock.now)
    await gateway.start()
    environment = Env(gateway, Tunnels(gateway=gateway, connect_timeout=3.0), clock,
                      upstreams, policy_dir)
    server = await asyncssh.create_server(
        lambda: TunnelServer(environment), "127.0.0.1", 0,
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
    environment.ssh_port = server.sockets[0].getsockname()[1]
    try:
        yield environment
    finally:
        for conn in environment.clients:
            conn.close()
        for conn in environment.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)
        server.close()
        await server.wait_closed()
        environment.tunnels.close()
        await gateway.stop()
        await upstreams.close()


async def eventually(check: Callable[[], bool]) -> None:
    """Wait (at most 5 s: the issue's bound for closing) until ``check()`` holds."""
    async with asyncio.timeout(5):
        while not check():  # noqa: ASYNC110 - polling a plain condition, no event to wait on
            await asyncio.sleep(0.01)


async def refused(conn: asyncssh.SSHClientConnection, host: str,
                  port: int) -> asyncssh.ChannelOpenError:
    with pytest.raises(asyncssh.ChannelOpenError) as caught:
        await conn.open_connection(host, port)
    return caught.value


# --- allowed tunnels ------------------------------------------------------------------------


async def test_allowed_open_relays_both_ways_counts_and_audits(env: Env) -> None:
    conn = await env.connect("alice")
    reader, writer = await conn.open_connection("echo.ward.local", 7)
    payload = bytes(range(256)) * 4096  # 1 MiB
    writer.write(payload)
    echoed = await reader.readexactly(len(payload))
    assert echoed == payload
    [opened] = env.audit("tunnel.open")
    session = env.sessions["alice"]
    assert opened["frontend"] == "ssh"
    assert opened["user"] == "alice"
    assert opened["session"] == session.handle
    assert opened["source_ip"] == "127.0.0.1"
    assert opened["dest"] == "echo.ward.local:7"
    assert opened["service"] == "echo"
    assert opened["rule"] == "tunnel-tests"
    assert env.metric("gatewayd_tunnels_active", service="echo") == 1
    assert len(env.tunnels) == 1
    assert session.open_tunnels == 1

    writer.write_eof()
    assert await reader.read() == b""  # the echo server closes after our EOF
    await eventually(lambda: len(env.audit("tunnel.close")) == 1)
    [closed] = env.audit("tunnel.close")
    assert closed["bytes_up"] == len(payload)
    assert closed["bytes_down"] == len(payload)
    assert closed["reason"] == "client_closed"  # the client's EOF came first
    assert closed["rule"] == "tunnel-tests"
    assert closed["dest"] == "echo.ward.local:7"
    assert closed["session"] == session.handle
    assert closed["duration_ms"] == 0  # the fake clock did not move
    assert session.bytes_up == len(payload)
    assert session.bytes_down == len(payload)
    assert env.metric("gatewayd_tunnel_bytes_total", service="echo", direction="up") == len(payload)
    assert env.metric("gatewayd_tunnel_bytes_total", service="echo", direction="down") == len(payload)
    assert env.metric("gatewayd_tunnels_active", service="echo") == 0
    assert env.metric("gatewayd_policy_decisions_total", frontend="ssh", service="echo",
                      decision="allow") == 1
    assert len(env.tunnels) == 0
    assert session.open_tunnels == 0


async def test_tunnel_traffic_keeps_the_session_alive(env: Env) -> None:
    conn = await env.connect("alice")
    reader, writer = await conn.open_connection("echo.ward.local", 7)
    session = env.sessions["alice"]
    env.clock.advance(600)
    before = session.last_seen
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    assert session.last_seen == env.clock.mono > before


async def test_duration_follows_the_gateway_clock(env: Env) -> None:
    conn = await env.connect("alice")
    _, writer = await conn.open_connection("echo.ward.local", 7)
    env.clock.advance(12.5)
    writer.close()
    await eventually(lambda: len(env.audit("tunnel.close")) == 1)
    assert env.audit("tunnel.close")[0]["duration_ms"] == 12_500


async def test_literal_ip_named_by_the_service_may_be_loopback(env: Env) -> None:
    conn = await env.connect("alice")
    reader, writer = await conn.open_connection("127.0.0.1", env.upstreams.ports["echo"])
    writer.write(b"named explicitly")
    assert await reader.readexactly(16) == b"named explicitly"


async def test_own_office_pc_is_reachable(env: Env) -> None:
    alice = await env.connect("alice")
    reader, writer = await alice.open_connection("PC-Alice.ward.local", 3389)
    writer.write(b"rdp")
    assert await reader.readexactly(3) == b"rdp"
    bob = await env.connect("bob")
    reader, writer = await bob.open_connection("pc-bob.ward.local", 3389)
    writer.write(b"rdp")
    writer.write_eof()
    assert await reader.read() == b"got 3: pdr"
    services = {(r["user"], r["service"], r["dest"]) for r in env.audit("tunnel.open")}
    assert services == {("alice", "office-pc", "pc-alice.ward.local:3389"),
                        ("bob", "office-pc", "pc-bob.ward.local:3389")}


# --- refusals ------------------------------------------------------------------------------


def only_deny(env: Env) -> dict[str, Any]:
    [record] = env.audit("tunnel.deny")
    return record


async def test_user_cannot_reach_another_users_office_pc(env: Env) -> None:
    conn = await env.connect("alice")
    error = await refused(conn, "pc-bob.ward.local", 3389)
    assert error.code == PROHIBITED
    assert error.reason == "no service at pc-bob.ward.local:3389"
    record = only_deny(env)
    assert record["user"] == "alice"
    assert record["dest"] == "pc-bob.ward.local:3389"
    assert record["status"] == "no_service"
    assert "service" not in record or record["service"] is None
    assert env.metric("gatewayd_policy_decisions_total", frontend="ssh", service="other",
                      decision="deny") == 1
    assert env.audit("tunnel.open") == []


@pytest.mark.parametrize(("host", "port", "reason"), [
    ("nowhere.ward.local", 22, "no service at nowhere.ward.local:22"),
    ("echo.ward.local", 8, "no service at echo.ward.local:8"),
    ("bad\x1bhost", 7, "no service at bad?host:7"),
    ("echo.ward.local", 70000, "no service at echo.ward.local:70000"),
])
async def test_unknown_destination_is_refused(env: Env, host: str, port: int,
                                              reason: str) -> None:
    conn = await env.connect("alice")
    error = await refused(conn, host, port)
    assert (error.code, error.reason) == (PROHIBITED, reason)
    assert only_deny(env)["reason"] == reason


async def test_denied_open_reason_reaches_the_client(env: Env) -> None:
    conn = await env.connect("alice")
    error = await refused(conn, "forbidden.ward.local", 7)
    assert error.code == PROHIBITED
    assert error.reason == "forbidden.ward.local:7 refused: no rule allows this"
    record = only_deny(env)
    assert record["service"] == "forbidden"
    assert record["status"] == "denied"
    assert record["session"] == env.sessions["alice"].handle
    assert record["source_ip"] == "127.0.0.1"
    assert record["frontend"] == "ssh"
    assert env.metric("gatewayd_policy_decisions_total", frontend="ssh",
                      service="forbidden", decision="deny") == 1


async def test_auditors_reach_no_tunnel_at_all(env: Env) -> None:
    conn = await env.connect("carol")
    error = await refused(conn, "echo.ward.local", 7)
    assert error.reason == "echo.ward.local:7 refused: no rule allows this"


async def test_stale_mfa_is_refused_as_needing_a_fresh_login(env: Env) -> None:
    conn = await env.connect("alice")
    _, writer = await conn.open_connection("fresh.ward.local", 7)  # MFA just now
    writer.close()
    env.clock.advance(120)
    error = await refused(conn, "fresh.ward.local", 7)
    assert error.code == PROHIBITED
    assert error.reason.startswith("fresh.ward.local:7 needs a fresh MFA login (")
    record = only_deny(env)
    assert (record["status"], record["rule"]) == ("step_up", "fresh-mfa")
    assert env.metric("gatewayd_policy_decisions_total", frontend="ssh", service="fresh",
                      decision="step_up") == 1


async def test_loopback_name_is_refused_without_override(env: Env) -> None:
    conn = await env.connect("alice")
    error = await refused(conn, "localhost", env.upstreams.ports["echo"])
    assert error.code == PROHIBITED
    assert error.reason == (f"localhost:{env.upstreams.ports['echo']} refused: "
                            "it resolves to a loopback address")
    record = only_deny(env)
    assert (record["status"], record["service"], record["rule"]) == (
        "unsafe_destination", "echo", "tunnel-tests")


async def test_attribute_pointing_at_loopback_is_refused(env: Env) -> None:
    # The template resolves to a literal IP, but a directory attribute is not the operator
    # naming an address: refused before any connection attempt (3389 listens nowhere).
    conn = await env.connect("mallory")
    error = await refused(conn, "127.0.0.1", 3389)
    assert error.code == PROHIBITED
    assert error.reason == "127.0.0.1:3389 refused: it resolves to a loopback address"


async def test_attribute_pointing_at_the_gateway_itself_is_refused(env: Env) -> None:
    own = _own_non_loopback()
    if own is None:
        pytest.skip("this machine has no non-loopback address")
    conn = await env.connect("eve")
    error = await refused(conn, own, 3389)
    assert error.reason.endswith("it resolves to an address of the gateway itself")
    assert only_deny(env)["status"] == "unsafe_destination"


async def test_unreachable_destination_fails_with_connect_failed(env: Env) -> None:
    conn = await env.connect("alice")
    error = await refused(conn, "dead.ward.local", 1)
    assert error.code == CONNECT_FAILED
    assert error.reason == "dead.ward.local:1 is unreachable: connection refused"
    record = only_deny(env)
    assert (record["status"], record["error"], record["rule"], record["service"]) == (
        "unreachable", "connection_refused", "tunnel-tests", "dead")
    assert env.audit("tunnel.open") == []


async def test_unresolvable_name_fails_with_connect_failed(env: Env) -> None:
    # bob's office PC has no override here: its name must be looked up, and .invalid never
    # resolves (RFC 6761).
    env.sessions.clear()
    groups, _ = USERS["bob"]
    USERS["nobody"] = (groups, {"office_pc": "pc-9.example.invalid"})
    try:
        conn = await env.connect("nobody")
        error = await refused(conn, "pc-9.example.invalid", 3389)
    finally:
        del USERS["nobody"]
    assert error.code == CONNECT_FAILED
    assert error.reason == "pc-9.example.invalid:3389 is unreachable: the name does not resolve"
    assert only_deny(env)["error"] == "dns"


async def test_ended_session_opens_nothing(env: Env) -> None:
    conn = await env.connect("alice")
    env.gateway.sessions.end(env.sessions["alice"], "admin_kill")
    error = await refused(conn, "echo.ward.local", 7)
    assert error.reason == "the session has ended"


# --- services_for ---------------------------------------------------------------------------


async def test_services_for_lists_what_the_user_may_open(env: Env) -> None:
    await env.connect("alice")
    services = env.tunnels.services_for(env.sessions["alice"])
    echo = env.upstreams.ports["echo"]
    assert ("echo", "echo.ward.local:7") in services
    assert ("echo", f"127.0.0.1:{echo}") in services
    assert ("office-pc", "pc-alice.ward.local:3389") in services
    assert ("mail", "mail.ward.local:993") in services
    assert not any(name in {"fileserver", "forbidden"} for name, _ in services)
    assert ("office-pc", "pc-bob.ward.local:3389") not in services
    await env.connect("carol")
    assert env.tunnels.services_for(env.sessions["carol"]) == []


# --- ending tunnels -------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["admin_kill", "device_revoked", "idle_timeout"])
async def test_session_end_closes_its_tunnels_with_the_reason(env: Env, reason: str) -> None:
    conn = await env.connect("alice")
    streams = [await conn.open_connection("echo.ward.local", 7) for _ in range(2)]
    firehose_reader, _ = await conn.open_connection("firehose.ward.local", 19)
    await firehose_reader.readexactly(1)  # a transfer is running
    other = await env.connect("bob")
    bob_reader, bob_writer = await other.open_connection("echo.ward.local", 7)
    assert len(env.tunnels) == 4

    env.gateway.sessions.end(env.sessions["alice"], reason)
    async with asyncio.timeout(5):
        for reader, _ in streams:
            assert await reader.read() == b""
        while await firehose_reader.read(1 << 20):
            pass
    closes = [r for r in env.audit("tunnel.close") if r["user"] == "alice"]
    assert sorted(r["reason"] for r in closes) == [reason] * 3
    # The tunnels closed (and handed over their last bytes) before the session's record.
    [ended] = [r for r in env.audit("session.end") if r["user"] == "alice"]
    assert ended["bytes_down"] == sum(r["bytes_down"] for r in closes) > 0
    assert len(env.tunnels) == 1  # bob's tunnel is untouched
    assert (env.sessions["alice"].open_tunnels, env.sessions["bob"].open_tunnels) == (0, 1)
    bob_writer.write(b"still here")
    assert await bob_reader.readexactly(10) == b"still here"
    assert env.metric("gatewayd_tunnels_active", service="firehose") == 0


async def test_client_disconnect_closes_its_tunnels(env: Env) -> None:
    conn = await env.connect("alice")
    await conn.open_connection("echo.ward.local", 7)
    conn.abort()
    await eventually(lambda: len(env.audit("tunnel.close")) == 1)
    assert env.audit("tunnel.close")[0]["reason"] in {"logout", "client_closed", "error"}
    assert len(env.tunnels) == 0


async def test_recheck_closes_what_the_new_policy_denies(env: Env) -> None:
    conn = await env.connect("alice")
    echo_reader, _ = await conn.open_connection("echo.ward.local", 7)
    pc_reader, pc_writer = await conn.open_connection("pc-alice.ward.local", 3389)
    session = env.sessions["alice"]
    assert env.tunnels.recheck(session) == 0  # nothing changed

    text = (env.policy_dir / "50-tunnel-tests.yaml").read_text()
    (env.policy_dir / "50-tunnel-tests.yaml").write_text(
        text.replace("services: [echo, answer,", "services: [answer,"))
    assert await env.gateway.reload()
    assert env.tunnels.recheck(session) == 1

    async with asyncio.timeout(5):
        assert await echo_reader.read() == b""
    [closed] = env.audit("tunnel.close")
    assert (closed["reason"], closed["service"]) == ("policy_changed", "echo")
    pc_writer.write(b"office pc stays")
    assert await pc_reader.readexactly(15) == b"office pc stays"
    assert env.tunnels.recheck_all() == 0


async def test_periodic_recheck_closes_tunnels_when_a_deny_rule_starts(env: Env) -> None:
    conn = await env.connect("alice")
    reader, _ = await conn.open_connection("daytime.ward.local", 7)  # Tuesday 10:00 Tokyo
    echo_reader, echo_writer = await conn.open_connection("echo.ward.local", 7)
    task = asyncio.create_task(env.tunnels.recheck_forever(0.05), name="test.tunnel.recheck")
    try:
        await asyncio.sleep(0.2)
        assert len(env.tunnels) == 2  # daytime: nothing to close
        env.clock.advance(13 * 3600)  # 23:00: the approval-style night rule applies
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [closed] = env.audit("tunnel.close")
    assert (closed["reason"], closed["service"]) == ("policy_changed", "daytime")
    echo_writer.write(b"night shift")
    assert await echo_reader.readexactly(11) == b"night shift"


async def test_recheck_does_not_close_for_stale_mfa(env: Env) -> None:
    conn = await env.connect("alice")
    await conn.open_connection("fresh.ward.local", 7)
    env.clock.advance(3600)
    assert env.tunnels.recheck(env.sessions["alice"]) == 0
    assert len(env.tunnels) == 1


# --- half-close ----------------------------------------------------------------------------


async def test_client_eof_reaches_upstream_which_still_answers(env: Env) -> None:
    conn = await env.connect("alice")
    reader, writer = await conn.open_connection("answer.ward.local", 7)
    writer.write(b"hello")
    writer.write_eof()
    assert await reader.read() == b"got 5: olleh"
    await eventually(lambda: len(env.audit("tunnel.close")) == 1)
    [closed] = env.audit("tunnel.close")
    assert (closed["reason"], closed["bytes_up"], closed["bytes_down"]) == ("client_closed", 5, 12)


async def test_upstream_eof_reaches_client_which_still_sends(env: Env) -> None:
    conn = await env.connect("alice")
    reader, writer = await conn.open_connection("banner.ward.local", 7)
    assert await reader.read() == b"banner, then EOF"  # EOF passed through
    writer.write(b"sent after the upstream's EOF")
    writer.write_eof()
    await eventually(lambda: len(env.audit("tunnel.close")) == 1)
    assert env.upstreams.received["banner"] == [b"sent after the upstream's EOF"]
    assert env.audit("tunnel.close")[0]["reason"] == "upstream_closed"


# --- backpressure ---------------------------------------------------------------------------


async def test_slow_client_pauses_the_upstream(env: Env) -> None:
    conn = await env.connect("alice")
    reader, _ = await conn.open_connection("firehose.ward.local", 19)
    [tunnel] = env.tunnels.tunnels_of(env.sessions["alice"])
    sent = env.upstreams.firehose_sent

    async def plateau() -> int:
        while True:  # the upstream stops being able to send once every buffer is full
            before = sent[0]
            await asyncio.sleep(1.0)
            # More than our high-water mark must have gone through first: a loaded machine
            # can leave the firehose unscheduled for a second before it sent anything.
            if sent[0] == before and before > 4 * CHANNEL_HIGH_WATER:
                return before

    async with asyncio.timeout(30):
        stalled = await plateau()
    # Bounded by the client's window and stream buffer, socket buffers and our high-water
    # mark — not by how much the upstream would like to send.
    assert stalled < 64 * 1024 * 1024
    assert tunnel.channel_buffered <= CHANNEL_HIGH_WATER + READ_CHUNK
    received = 0
    async with asyncio.timeout(10):
        while received < stalled + 8 * 1024 * 1024:  # reading again lets it flow again
            received += len(await reader.read(1 << 20))
    assert sent[0] > stalled


async def test_slow_upstream_pauses_the_client(env: Env) -> None:
    conn = await env.connect("alice")
    _, writer = await conn.open_connection("sink.ward.local", 9)
    [tunnel] = env.tunnels.tunnels_of(env.sessions["alice"])
    chunk = b"y" * 65536
    written = 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(3):
            while True:
                writer.write(chunk)
                await writer.drain()  # blocks once the gateway stops reading the channel
                written += len(chunk)
    assert written < 64 * 1024 * 1024
    # The gateway holds at most its write-buffer mark plus one SSH packet for the upstream.
    assert tunnel.upstream_buffered <= UPSTREAM_HIGH_WATER + 256 * 1024
    assert len(env.upstreams.sinks) == 1
    # What the client has sent and the upstream's kernel has not taken sits in the gateway:
    # asyncssh's receive buffer of the paused channel plus our upstream write buffer. The
    # pause stops window adjustments, so that is at most one channel window more.
    assert tunnel._chan is not None
    window = tunnel._chan.get_recv_window()
    unsent = writer.channel.get_write_buffer_size()  # still on the client, waiting for window
    previous = -1
    async with asyncio.timeout(10):
        while (held := written + len(chunk) - unsent - tunnel.bytes_up) != previous:
            previous = held  # wait until nothing is in flight between client and gateway
            await asyncio.sleep(0.5)
            unsent = writer.channel.get_write_buffer_size()
    max_packet = 32 * 1024
    assert 0 <= held <= window + max_packet
    assert held + tunnel.upstream_buffered <= window + UPSTREAM_HIGH_WATER + 2 * max_packet
    print(f"held by the gateway for one stalled tunnel: {held} B in the channel "
          f"(window {window}) + {tunnel.upstream_buffered} B upstream write buffer")


# --- the real OpenSSH client ------------------------------------------------------------------


async def openssh_stdio(env: Env, tmp_path: Path, dest: str,
                        data: bytes) -> tuple[int, bytes, bytes]:
    """``ssh -W dest`` (a direct-tcpip channel on stdin/stdout) as alice; data then EOF."""
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("OpenSSH client not installed")
    process = await asyncio.create_subprocess_exec(
        ssh, "-F", "none", "-p", str(env.ssh_port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path / 'known'}",
        "-o", "LogLevel=INFO", "-W", dest, "alice@127.0.0.1",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(data), 20)
    assert process.returncode is not None
    return process.returncode, out, err


async def test_openssh_client_through_a_tunnel(env: Env, tmp_path: Path) -> None:
    status, out, err = await openssh_stdio(env, tmp_path, "answer.ward.local:7", b"abc")
    assert (status, out) == (0, b"got 3: cba"), err  # stdin's EOF reached the upstream
    await eventually(lambda: len(env.audit("tunnel.close")) == 1)
    [closed] = env.audit("tunnel.close")
    assert (closed["bytes_up"], closed["bytes_down"]) == (3, 10)


async def test_openssh_client_shows_the_refusal(env: Env, tmp_path: Path) -> None:
    status, out, err = await openssh_stdio(env, tmp_path, "pc-bob.ward.local:3389", b"")
    assert status != 0 and out == b""
    assert b"administratively prohibited: no service at pc-bob.ward.local:3389" in err


# --- limits and opens that never complete ----------------------------------------------------


async def test_tunnels_per_session_are_capped(env: Env) -> None:
    env.tunnels = Tunnels(gateway=env.gateway, max_per_session=2)
    conn = await env.connect("alice")
    first = await conn.open_connection("echo.ward.local", 7)
    await conn.open_connection("echo.ward.local", 7)
    error = await refused(conn, "echo.ward.local", 7)
    assert error.code == asyncssh.OPEN_RESOURCE_SHORTAGE
    assert error.reason == "too many tunnels in this session (at most 2 at once)"
    assert only_deny(env)["status"] == "limit"
    other = await env.connect("bob")  # the cap is per session
    await other.open_connection("echo.ward.local", 7)
    first[1].close()
    await eventually(lambda: len(env.tunnels.tunnels_of(env.sessions["alice"])) == 1)
    await conn.open_connection("echo.ward.local", 7)


async def test_default_cap_is_a_handful_of_tunnels(env: Env) -> None:
    assert MAX_TUNNELS_PER_SESSION == 32
    conn = await env.connect("alice")
    await asyncio.gather(*(conn.open_connection("echo.ward.local", 7)
                           for _ in range(MAX_TUNNELS_PER_SESSION)))
    error = await refused(conn, "echo.ward.local", 7)
    assert (error.code, error.reason) == (SHORTAGE, "too many tunnels in this session (at most "
                                                    "32 at once)")


async def test_a_flood_of_refused_opens_is_cut_off(env: Env,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncssh")  # the client logs the disconnect
    conn = await env.connect("alice")
    session = env.sessions["alice"]

    async def attempt(i: int) -> None:
        with contextlib.suppress(asyncssh.ChannelOpenError, asyncssh.ConnectionLost,
                                 asyncssh.DisconnectError, OSError):
            await conn.create_connection(asyncssh.SSHTCPSession, f"h{i}.example", 1)

    await within(asyncio.gather(*(attempt(i) for i in range(500))), 30)
    await within(conn.wait_closed(), 10)
    assert session.ended == "logout"  # what this module's server ends a session with
    assert "Received disconnect: gatewayd: too many refused tunnel requests (11)" in caplog.text
    denies = env.audit("tunnel.deny")
    *each, summary = denies
    assert len(each) == REFUSALS_PER_WINDOW  # every refusal before the limit kept its record
    assert {d["status"] for d in each} == {"no_service"}
    assert summary["status"] == "rate_limited"
    assert summary["reason"] == ("too many refused tunnel requests: 31 within 60 s; "
                                 "disconnected")
    assert summary["session"] == session.handle and summary["error"] == "no_service"


async def test_refusal_budget_is_per_minute(env: Env) -> None:
    conn = await env.connect("alice")
    for _ in range(2):
        for i in range(REFUSALS_PER_WINDOW):
            await refused(conn, f"h{i}.example", 1)
        env.clock.advance(61)
    error = await refused(conn, "h.example", 1)
    assert error.reason == "no service at h.example:1"  # still connected, still audited
    assert len(env.audit("tunnel.deny")) == 2 * REFUSALS_PER_WINDOW + 1
    assert env.sessions["alice"].ended is None


@contextlib.contextmanager
def stalled_resolver(monkeypatch: pytest.MonkeyPatch) -> Any:
    """getaddrinfo hangs for names ending in .stalled.invalid (a DNS server that stopped
    answering) until the block exits; the yielded list gets the thread name of each call."""
    real = socket.getaddrinfo
    release = threading.Event()
    calls: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".stalled.invalid"):
            calls.append(threading.current_thread().name)
            release.wait(30)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield calls
    finally:
        release.set()


async def test_stalled_name_lookups_never_block_the_default_executor(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sign-ins (TOTP store, file directory) run on asyncio's default executor; tunnels that
    # wait for a resolver must not take its threads.
    groups, _ = USERS["bob"]
    USERS["stalled"] = (groups, {"office_pc": "pc-1.stalled.invalid"})
    try:
        with stalled_resolver(monkeypatch) as calls:
            conn = await env.connect("stalled")
            opens = [asyncio.ensure_future(conn.open_connection("pc-1.stalled.invalid", 3389))
                     for _ in range(12)]
            done, _ = await asyncio.wait(opens, timeout=3, return_when=asyncio.ALL_COMPLETED)
            # At most four lookups per session; the others are refused at once.
            assert len(done) == 8
            for opening in done:
                error = opening.exception()
                assert isinstance(error, asyncssh.ChannelOpenError)
                assert (error.code, error.reason) == (SHORTAGE,
                                                      "too many name lookups in progress")
            assert len(calls) == 4 and env.tunnels.lookups_in_progress == 4
            assert all(name.startswith("gatewayd-resolve") for name in calls)
            assert await within(asyncio.to_thread(lambda: "free"), 2) == "free"
        # The resolver answers again (.invalid: "does not resolve"); the lookups are done.
        for opening in opens:
            with contextlib.suppress(asyncssh.ChannelOpenError):
                await within(opening, 10)
        await eventually(lambda: env.tunnels.lookups_in_progress == 0)
    finally:
        del USERS["stalled"]
    busy = [d for d in env.audit("tunnel.deny") if d.get("error") == "dns_busy"]
    assert len(busy) == 8 and {d["status"] for d in busy} == {"limit"}
    assert {d["rule"] for d in busy} == {"staff-own-office-pc"}


async def test_name_lookups_in_progress_are_capped_for_all_sessions(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.tunnels = Tunnels(gateway=env.gateway, resolver_threads=2, lookups_in_progress=3,
                          resolve_timeout=0.5)
    groups, _ = USERS["bob"]
    USERS["stalled"] = (groups, {"office_pc": "pc-1.stalled.invalid"})
    try:
        with stalled_resolver(monkeypatch) as calls:
            first, second = await env.connect("stalled"), await env.connect("stalled")
            opens = [asyncio.ensure_future(first.open_connection("pc-1.stalled.invalid", 3389))
                     for _ in range(2)]
            await eventually(lambda: len(calls) == 2)  # both threads stuck
            # A third lookup waits for a thread, times out, and keeps nothing queued.
            error = await refused(second, "pc-1.stalled.invalid", 3389)
            assert error.reason == "pc-1.stalled.invalid:3389 is unreachable: name resolution " \
                                   "timed out"
            assert env.tunnels.lookups_in_progress == 2
            opens += [asyncio.ensure_future(second.open_connection("pc-1.stalled.invalid", 3389))]
            await eventually(lambda: env.tunnels.lookups_in_progress == 3)
            error = await refused(second, "pc-1.stalled.invalid", 3389)
            assert (error.code, error.reason) == (SHORTAGE, "too many name lookups in progress")
        for opening in opens:
            with contextlib.suppress(asyncssh.ChannelOpenError):
                await within(opening, 10)
        await eventually(lambda: env.tunnels.lookups_in_progress == 0)
    finally:
        del USERS["stalled"]
        env.tunnels.close()


def direct_session(env: Env) -> Session:
    groups, attributes = USERS["alice"]
    _, session = env.gateway.sessions.create(
        Principal("alice", frozenset(groups), attributes), frontend="ssh",
        source_ip="127.0.0.1")
    return session


async def test_upstream_of_a_channel_that_never_opens_is_closed(env: Env) -> None:
    # asyncssh drops a channel whose connection closed while the open was in progress; the
    # tunnel must not keep its upstream socket forever.
    tunnels = Tunnels(gateway=env.gateway, confirm_timeout=0.2)
    tunnel = await tunnels.open(direct_session(env), None, dest_host="echo.ward.local",  # type: ignore[arg-type]
                                dest_port=7, orig_host="127.0.0.1", orig_port=50000)
    assert len(env.upstreams.handlers) == 1
    await eventually(lambda: not env.upstreams.handlers)  # the upstream saw the close
    [closed] = env.audit("tunnel.close")
    assert (closed["reason"], closed["error"]) == ("error", "channel_not_opened")
    assert len(tunnels) == 0
    assert isinstance(tunnel, asyncssh.SSHTCPSession)


async def test_session_end_before_the_channel_opens_closes_the_upstream(env: Env) -> None:
    session = direct_session(env)
    await env.tunnels.open(session, None, dest_host="echo.ward.local",  # type: ignore[arg-type]
                           dest_port=7, orig_host="127.0.0.1", orig_port=50000)
    assert len(env.upstreams.handlers) == 1
    env.gateway.sessions.end(session, "user_disabled")
    await eventually(lambda: not env.upstreams.handlers)
    [closed] = env.audit("tunnel.close")
    assert closed["reason"] == "user_disabled"
    assert env.metric("gatewayd_tunnels_active", service="echo") == 0


async def test_open_that_cannot_be_audited_is_refused(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    emit = env.gateway.audit.emit

    def failing_open(event: str, **fields: object) -> object:
        if event == "tunnel.open":
            raise AuditWriteError(event, None, OSError(28, "No space left on device"))
        return emit(event, **fields)

    monkeypatch.setattr(env.gateway.audit, "emit", failing_open)
    conn = await env.connect("alice")
    error = await refused(conn, "echo.ward.local", 7)
    assert error.reason == "the audit log is unavailable; no new tunnels"
    assert len(env.tunnels) == 0
    await eventually(lambda: not env.upstreams.handlers)
    assert env.metric("gatewayd_tunnels_active", service="echo") == 0


@contextlib.contextmanager
def stalled_listener() -> Any:
    """A listener whose backlog is full: a new connect hangs (its SYNs are dropped) until
    the caller calls the yielded ``release``, which accepts the queued connection."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    filler = socket.create_connection(server.getsockname())
    accepted: list[socket.socket] = []

    def release() -> None:
        accepted.append(server.accept()[0])

    try:
        yield server.getsockname()[1], release
    finally:
        for sock in (filler, server, *accepted):
            sock.close()


@pytest.mark.parametrize("change", ["session_end", "policy_reload"])
async def test_what_changes_during_the_connect_is_honoured(env: Env, change: str) -> None:
    conn = await env.connect("alice")
    with stalled_listener() as (port, release):
        overrides = dict(env.gateway.settings.ssh.address_overrides)
        overrides["echo.ward.local:7"] = f"127.0.0.1:{port}"
        ssh = env.gateway.settings.ssh.model_copy(update={"address_overrides": overrides})
        env.gateway.settings = env.gateway.settings.model_copy(update={"ssh": ssh})
        opening = asyncio.ensure_future(conn.open_connection("echo.ward.local", 7))
        await asyncio.sleep(0.3)
        assert not opening.done()  # connecting
        if change == "session_end":
            env.gateway.sessions.end(env.sessions["alice"], "admin_kill")
            expected = "the session has ended"
        else:
            text = (env.policy_dir / "50-tunnel-tests.yaml").read_text()
            (env.policy_dir / "50-tunnel-tests.yaml").write_text(
                text.replace("services: [echo, answer,", "services: [answer,"))
            # What Gateway.reload swaps in (a reload would refuse the override edited above).
            env.gateway.policy = load_policy(env.policy_dir)
            expected = "echo.ward.local:7 refused: no rule allows this"
        release()
        with pytest.raises(asyncssh.ChannelOpenError) as caught:
            await asyncio.wait_for(opening, 5)
    assert caught.value.reason == expected
    assert env.audit("tunnel.open") == []
    assert len(env.tunnels) == 0


# --- audit failure ---------------------------------------------------------------------------


async def test_no_new_tunnels_while_the_audit_log_cannot_be_written(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await env.connect("alice")
    monkeypatch.setattr(type(env.gateway.audit), "healthy", property(lambda self: False))
    error = await refused(conn, "echo.ward.local", 7)
    assert error.reason == "the audit log is unavailable; no new tunnels"


@pytest.mark.parametrize(("exc", "described"), [
    (ConnectionRefusedError(111, "Connection refused"), ("connection_refused", "connection refused")),
    (ConnectionRefusedError("no errno"), ("connection_refused", "connection refused")),
    (TimeoutError(), ("timeout", "timed out")),
    (OSError(113, "No route to host"), ("no_route", "no route to host")),
    (OSError(101, "Network is unreachable"), ("no_route", "network unreachable")),
    (OSError(99, "Cannot assign requested address"),
     ("connect_failed", "cannot assign requested address")),
    (OSError("odd"), ("connect_failed", "connection failed")),
    (None, ("connect_failed", "connection failed")),
])
def test_describe_os_error(exc: BaseException | None, described: tuple[str, str]) -> None:
    assert describe_os_error(exc) == described


def test_ipaddress_of_own_addresses_is_parseable() -> None:
    # local_addresses() reads the real kernel tables: loopback is always among them.
    assert ipaddress.ip_address("127.0.0.1") in local_addresses()
