"""Tests for gatewayd.ssh.server: the SSH listener against the real OpenSSH client and, for
protocol edge cases, raw sockets and asyncssh's client (see ssh_harness)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from ssh_harness import SshHarness, running_ssh_gateway

from gatewayd.app import GatewayError
from gatewayd.ssh.server import (
    CIPHERS,
    MACS,
    MAX_SESSION_CHANNELS,
    keepalive_count_max,
    kex_algorithms,
    render_banner,
)


@pytest.fixture
async def gw(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[SshHarness]:
    overrides: dict[str, Any] = dict(getattr(request, "param", {}))
    async for harness in running_ssh_gateway(tmp_path, **overrides):
        yield harness


def settings(**sections: object) -> pytest.MarkDecorator:
    """Config sections for this test's gateway (``ssh={...}`` adds to the test defaults)."""
    return pytest.mark.parametrize("gw", [sections], indirect=True, ids=["settings"])


async def read_until(stream: asyncio.StreamReader | None, needle: bytes) -> bytes:
    """What ``stream`` sent up to ``needle`` (10 s at most)."""
    assert stream is not None
    seen = b""
    deadline = time.monotonic() + 10.0
    while needle not in seen:
        chunk = await asyncio.wait_for(stream.read(4096), max(0.01, deadline - time.monotonic()))
        if not chunk:
            break
        seen += chunk
    return seen


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``check()`` until it holds (at most ``seconds``: generous for a loaded machine)."""
    async with asyncio.timeout(seconds):
        while not check():  # noqa: ASYNC110 - polling a plain condition, no event to wait on
            await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- keyboard-interactive ------------------------------------------------------------------


async def test_password_and_code_sign_in_show_the_banner_and_are_audited(gw: SshHarness) -> None:
    process = await gw.spawn("alice", "-T")
    banner = await read_until(process.stdout, b"Disconnect with")
    text = banner.decode()
    assert "signed in as alice (no registered device)" in text
    assert "mail.ward.local:993" in text and "mail.ward.local:587" in text
    assert "fileserver" not in text  # managers only
    (session,) = gw.sessions()
    assert session.user == "alice" and session.frontend == "ssh"
    assert session.source_ip == "127.0.0.1"
    (success,) = gw.audit_events("auth.success")
    assert success["frontend"] == "ssh" and success["user"] == "alice"
    assert success["session"] == session.handle
    (start,) = gw.audit_events("session.start")
    assert start["frontend"] == "ssh" and start["session"] == session.handle
    metrics = gw.gateway.metrics.render().decode()
    assert 'gatewayd_sessions_active{frontend="ssh"} 1.0' in metrics
    assert 'gatewayd_auth_attempts_total{frontend="ssh",result="success"} 1.0' in metrics
    process.terminate()
    await asyncio.wait_for(process.wait(), 5)
    await until(lambda: gw.sessions() == [])  # the server sees the close a moment later
    (end,) = gw.audit_events("session.end")
    assert end["frontend"] == "ssh" and end["reason"] == "disconnected"


@pytest.mark.parametrize(("answers", "reason"), [
    ({"password": "wrong-password"}, "bad_password"),
    ({"code": "000000"}, "bad_code"),
    ({"code": ""}, "bad_code"),
])
async def test_a_wrong_factor_is_refused_and_audited(gw: SshHarness, answers: dict[str, str],
                                                      reason: str) -> None:
    run = await gw.run("alice", **answers)
    assert run.returncode == 255
    assert "Permission denied" in run.stderr
    assert gw.sessions() == []
    (failure,) = gw.audit_events("auth.failure")
    assert failure["frontend"] == "ssh" and failure["reason"] == reason
    assert failure["user"] == "alice"


async def test_a_replayed_code_is_refused(gw: SshHarness) -> None:
    code = gw.code("alice")
    first = await gw.spawn("alice", "-T", code=code)
    await read_until(first.stdout, b"Disconnect with")
    second = await gw.run("alice", code=code)
    assert second.returncode == 255 and "Permission denied" in second.stderr
    (failure,) = gw.audit_events("auth.failure")
    assert failure["reason"] == "replayed_code"
    assert len(gw.sessions()) == 1


async def test_an_unknown_user_fails_like_a_wrong_password_and_is_not_named(
        gw: SshHarness) -> None:
    run = await gw.run("mallory", password="x", code="123456")
    assert run.returncode == 255 and "Permission denied" in run.stderr
    (failure,) = gw.audit_events("auth.failure")
    assert failure.get("user") is None and failure["reason"] == "unknown_or_disabled_user"


@settings(ssh={"max_auth_tries": 2})
async def test_too_many_failures_close_the_connection(gw: SshHarness) -> None:
    run = await gw.run("alice", password="wrong", options={"NumberOfPasswordPrompts": "5"})
    assert run.returncode == 255
    assert "Too many authentication failures" in run.stderr
    assert len(gw.audit_events("auth.failure")) == 2


@settings(login={"failures_before_backoff": 1, "backoff_initial": "10m"})
async def test_a_throttled_name_is_told_to_wait(gw: SshHarness) -> None:
    first = await gw.run("alice", password="wrong")
    assert "Permission denied" in first.stderr
    second = await gw.run("alice", code=gw.fresh_code("alice"))  # right this time: too soon
    assert second.returncode == 255
    assert "Too many failed attempts. Wait a while" in second.stderr
    assert gw.sessions() == []
    assert [f["reason"] for f in gw.audit_events("auth.failure")] == ["bad_password", "throttled"]


@settings(sessions={"max_concurrent": 1})
async def test_a_full_gateway_says_so_and_keeps_the_seat_holder(gw: SshHarness) -> None:
    holder = await gw.spawn("alice", "-T")
    await read_until(holder.stdout, b"Disconnect with")
    run = await gw.run("bob")
    assert run.returncode == 255 and "All 1 seats are in use; try again later." in run.stderr
    (failure,) = gw.audit_events("auth.failure")
    assert failure["reason"] == "seats_full" and failure["user"] == "bob"
    assert [s.user for s in gw.sessions()] == ["alice"] and holder.returncode is None


@settings(ssh={"login_grace_time": "1s"})
async def test_an_idle_unauthenticated_connection_is_closed_after_the_grace_time(
        gw: SshHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = time.monotonic()
    version = await asyncio.wait_for(reader.readline(), 5)
    assert version.startswith(b"SSH-2.0-gatewayd")
    rest = await asyncio.wait_for(reader.read(), 5)  # KEXINIT, then EOF at the grace time
    assert rest is not None
    assert 0.8 < time.monotonic() - started < 3.0
    writer.close()


# --- what a session channel does -----------------------------------------------------------


async def test_a_command_is_refused_with_a_reason(gw: SshHarness) -> None:
    run = await gw.run("alice", command=["cat", "/etc/passwd"])
    assert run.returncode == 126
    assert "runs no commands" in run.stderr and run.stdout == ""


async def test_a_subsystem_is_refused_with_a_reason(gw: SshHarness) -> None:
    run = await gw.run("alice", "-s", command=["sftp"])
    assert run.returncode == 126 and "runs no commands" in run.stderr


async def test_remote_forwarding_is_refused(gw: SshHarness) -> None:
    run = await gw.run("alice", "-N", "-R", f"{free_port()}:127.0.0.1:22",
                       options={"ExitOnForwardFailure": "yes"})
    assert run.returncode == 255
    assert "remote port forwarding failed" in run.stderr


async def test_a_shell_with_a_pty_gets_the_banner_with_crlf_and_ignores_input(
        gw: SshHarness) -> None:
    process = await gw.spawn("alice", "-tt", stdin=asyncio.subprocess.PIPE)
    banner = await read_until(process.stdout, b"Disconnect with")
    assert b"signed in as alice (no registered device).\r\n" in banner
    assert process.stdin is not None
    process.stdin.write(b"id\nexit\n")
    await process.stdin.drain()
    await asyncio.sleep(0.3)
    assert process.returncode is None and len(gw.sessions()) == 1


async def certificate_client(gw: SshHarness, user: str) -> asyncssh.SSHClientConnection:
    """An asyncssh client signed in with a portal certificate."""
    path = gw.certificate(user)
    key = asyncssh.read_private_key(path)
    cert = asyncssh.read_certificate(f"{path}-cert.pub")
    return await asyncssh.connect("127.0.0.1", gw.port, username=user, known_hosts=None,
                                  client_keys=[(key, cert)], agent_path=None, config=None,
                                  preferred_auth="publickey")


async def test_session_channels_per_connection_are_capped(gw: SshHarness) -> None:
    # Each shell request renders the banner (a policy decision per destination): a client
    # must not open thousands. Channels still opening count too (all requested at once).
    async with await certificate_client(gw, "bob") as conn:
        results = await asyncio.gather(
            *(conn.create_session(asyncssh.SSHClientSession) for _ in range(20)),
            return_exceptions=True)
        opened = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(opened) == MAX_SESSION_CHANNELS == 4
        for error in refused:
            assert isinstance(error, asyncssh.ChannelOpenError)
            assert (error.code, error.reason) == (
                asyncssh.OPEN_RESOURCE_SHORTAGE,
                "gatewayd: at most 4 session channels per connection")
        chan, _ = opened[0]
        chan.close()
        await chan.wait_closed()
        await until(lambda: next(iter(gw.gateway.ssh.servers)).session_channels == 3)  # type: ignore[union-attr]
        await conn.create_session(asyncssh.SSHClientSession)  # a freed slot can be used again
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_session(asyncssh.SSHClientSession)
        assert len(gw.sessions()) == 1 and gw.sessions()[0].ended is None


async def test_refused_remote_forwards_are_logged_once_a_minute(
        gw: SshHarness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gatewayd.ssh.server")
    async with await certificate_client(gw, "bob") as conn:
        for _ in range(50):
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
        gw.clock.advance(61)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 22)
    lines = [r.getMessage() for r in caplog.records if "remote forwarding" in r.getMessage()]
    assert lines == ["ssh: refused remote forwarding (-R) for bob from 127.0.0.1 (1 so far on "
                     "this connection)",
                     "ssh: refused remote forwarding (-R) for bob from 127.0.0.1 (51 so far on "
                     "this connection)"]


def test_banner_without_services_says_so() -> None:
    from datetime import UTC, datetime  # noqa: PLC0415

    text = render_banner(user="carol", device="ward-pc-0042", services=[],
                         expires=datetime(2026, 11, 27, 20, 0, tzinfo=UTC), idle_minutes=15)
    assert "signed in as carol on device ward-pc-0042." in text
    assert "allows no tunnels right now" in text and "2026-11-27 20:00 UTC" in text


# --- tunnels --------------------------------------------------------------------------------


async def open_forward(gw: SshHarness, user: str, dest: str
                       ) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    process = await gw.spawn(user, "-N", "-L", f"{port}:{dest}",
                             options={"ExitOnForwardFailure": "yes"})
    await gw.wait_for_session(user)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return process, port
    raise AssertionError("the forward never listened")


async def test_a_local_forward_reaches_an_allowed_service(gw: SshHarness) -> None:
    process, port = await open_forward(gw, "alice", "mail.ward.local:993")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello through the tunnel")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(24), 5) == b"hello through the tunnel"
    writer.close()
    assert process.returncode is None


async def socks5_connect(port: int, host: str, dest_port: int
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A SOCKS5 CONNECT through ``ssh -D``: the stream, or None when the client closed it (what
    OpenSSH does when the gateway refuses the channel)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x03" + bytes([len(host)]) + host.encode()
                 + dest_port.to_bytes(2, "big"))
    try:
        reply = await asyncio.wait_for(reader.readexactly(10), 5)
    except asyncio.IncompleteReadError:
        writer.close()
        return None
    assert reply[:2] == b"\x05\x00"
    return reader, writer


async def test_a_dynamic_forward_reaches_allowed_services_only(gw: SshHarness) -> None:
    port = free_port()
    process = await gw.spawn("alice", "-N", "-D", str(port),
                             options={"ExitOnForwardFailure": "yes"})
    await gw.wait_for_session("alice")
    deadline = time.monotonic() + 10
    while True:
        try:
            opened = await socks5_connect(port, "mail.ward.local", 587)
            break
        except OSError:
            assert time.monotonic() < deadline, "the SOCKS listener never answered"
            await asyncio.sleep(0.05)
    assert opened is not None
    reader, writer = opened
    writer.write(b"EHLO through socks")
    assert await asyncio.wait_for(reader.readexactly(18), 5) == b"EHLO through socks"
    writer.close()
    assert await socks5_connect(port, "fileserver.ward.local", 445) is None  # managers only
    assert process.returncode is None
    (deny,) = gw.audit_events("tunnel.deny")
    assert deny["user"] == "alice" and deny["dest"] == "fileserver.ward.local:445"


async def test_a_reload_that_now_denies_closes_the_open_tunnel(gw: SshHarness) -> None:
    process, port = await open_forward(gw, "alice", "mail.ward.local:993")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    staff = gw.dir / "policies" / "20-staff.yaml"
    text = staff.read_text()
    start = text.index("  - id: staff-mail-clients")
    end = text.index("  - id: staff-own-office-pc")
    staff.write_text(text[:start] + text[end:])
    assert await gw.gateway.reload()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the tunnel was closed
    writer.close()
    assert process.returncode is None  # the session itself goes on
    (session,) = gw.sessions()
    assert session.ended is None


async def test_readiness_needs_the_ssh_listener(gw: SshHarness) -> None:
    assert await gw.gateway.readiness() == (True, "ready")
    assert gw.gateway.ssh is not None
    await gw.gateway.ssh.stop_accepting()
    assert await gw.gateway.readiness() == (False, "ssh listener is not accepting")


# --- ending sessions -------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "message"), [
    ("admin_kill", "ended by an administrator"),
    ("user_disabled", "your account was disabled"),
])
async def test_ending_the_session_disconnects_the_client_within_5_seconds(
        gw: SshHarness, reason: str, message: str) -> None:
    process = await gw.spawn("alice", "-T")
    await read_until(process.stdout, b"Disconnect with")
    (session,) = gw.sessions()
    started = time.monotonic()
    gw.gateway.sessions.end(session, reason)
    await asyncio.wait_for(process.wait(), 5)
    assert time.monotonic() - started < 5
    assert process.stderr is not None
    assert message in (await process.stderr.read()).decode()
    (end,) = gw.audit_events("session.end")
    assert end["reason"] == reason


async def test_an_idle_session_ends_at_the_sweep(gw: SshHarness) -> None:
    process = await gw.spawn("alice", "-T")
    await read_until(process.stdout, b"Disconnect with")
    gw.clock.advance(gw.gateway.sessions.idle_timeout + 1)
    assert gw.gateway.sessions.sweep() == 1
    await asyncio.wait_for(process.wait(), 5)
    assert process.stderr is not None
    assert "idle timeout" in (await process.stderr.read()).decode()
    (end,) = gw.audit_events("session.end")
    assert end["reason"] == "idle_timeout"


async def test_kill_during_a_transfer_closes_the_tunnel(gw: SshHarness) -> None:
    process, port = await open_forward(gw, "alice", "mail.ward.local:993")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x" * 65536)
    await writer.drain()
    await asyncio.wait_for(reader.readexactly(65536), 5)
    (session,) = gw.sessions()
    gw.gateway.sessions.end(session, "admin_kill")
    await asyncio.wait_for(process.wait(), 5)
    assert process.stderr is not None
    assert "ended by an administrator" in (await process.stderr.read()).decode()
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest == b""  # the forwarded connection is closed too
    writer.close()


@settings(ssh={"keepalive_interval": "300ms", "keepalive_count": 2})
async def test_a_dead_client_is_freed_within_interval_times_count(gw: SshHarness) -> None:
    process = await gw.spawn("alice", "-T")
    await read_until(process.stdout, b"Disconnect with")
    (session,) = gw.sessions()
    os.killpg(process.pid, signal.SIGSTOP)
    started = time.monotonic()
    ended = asyncio.Event()
    session.add_closer(lambda _: ended.set())
    await asyncio.wait_for(ended.wait(), 5)
    assert session.ended == "disconnected"
    assert time.monotonic() - started <= 0.6 + 1.0  # interval x count, plus scheduling slack


@pytest.mark.parametrize(("count", "expected"), [(1, 1), (2, 1), (3, 2), (10, 9)])
def test_keepalive_count_max(count: int, expected: int) -> None:
    assert keepalive_count_max(count) == expected


async def test_shutdown_disconnects_with_a_reason(gw: SshHarness) -> None:
    process = await gw.spawn("alice", "-T")
    await read_until(process.stdout, b"Disconnect with")
    await gw.gateway.stop()  # the fixture's second stop() finds nothing left to do
    await asyncio.wait_for(process.wait(), 5)
    assert process.stderr is not None
    assert "shutting down" in (await process.stderr.read()).decode()
    assert gw.audit_events("session.end")[0]["reason"] == "shutdown"


# --- pre-authentication caps -----------------------------------------------------------------


async def closed_at_once(port: int) -> bool:
    """True when the server closes a new connection without sending its version."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = await asyncio.wait_for(reader.read(100), 2)
    finally:
        writer.close()
    return data == b""


@settings(ssh={"preauth_per_source": 2})
async def test_unauthenticated_connections_per_source_are_capped(gw: SshHarness) -> None:
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
    for reader, _ in held:
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-2.0-")
    assert await closed_at_once(gw.port)
    metrics = gw.gateway.metrics.render().decode()
    assert 'gatewayd_ssh_preauth_refused_total{reason="preauth_per_source"} 1.0' in metrics
    for _, writer in held:
        writer.close()
    assert gw.gateway.ssh is not None
    admission = gw.gateway.ssh.admission
    deadline = time.monotonic() + 5
    while admission.pending and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
        await asyncio.sleep(0.02)  # the slots are released when the server sees the close
    assert admission.pending == 0
    run = await gw.run("alice", command=["true"])
    assert run.returncode == 126  # signed in (and refused the command): admitted again


@settings(ssh={"connect_rate_per_source": 3})
async def test_new_connections_per_minute_are_capped(gw: SshHarness) -> None:
    for _ in range(3):
        assert not await closed_at_once(gw.port)
    assert await closed_at_once(gw.port)
    gw.gateway.ssh.admission._clock = lambda: time.monotonic() + 61  # type: ignore[union-attr]
    assert not await closed_at_once(gw.port)


# --- protocol edge cases: the server keeps serving others --------------------------------------


async def still_serves(gw: SshHarness) -> None:
    run = await gw.run("bob", command=["true"], code=gw.fresh_code("bob"))
    assert run.returncode == 126, run.stderr


@pytest.mark.parametrize("junk", [
    b"SSH-2.0-junk\r\n" + os.urandom(2048),
    b"SSH-2.0-junk\r\n" + struct.pack(">I", 2**31) + b"\x00" * 64,
    b"SSH-2.0-junk\r\n" + struct.pack(">I", 1000) + b"\x04\x14",  # truncated, then EOF
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00" * 300,
], ids=["random_after_banner", "huge_length", "truncated_packet", "http", "zeros"])
async def test_garbage_and_truncated_packets_close_only_that_connection(
        gw: SshHarness, junk: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(junk)
    await writer.drain()
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"SSH-2.0-gatewayd")
    writer.close()
    await still_serves(gw)


class AnswerWith(asyncssh.SSHClient):
    """A client that answers keyboard-interactive prompts with fixed responses."""

    def __init__(self, responses: list[str]) -> None:
        self._responses = responses

    def kbdint_auth_requested(self) -> str:
        return ""

    def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                  prompts: Any) -> list[str]:
        return self._responses


@pytest.mark.parametrize("responses", [
    [],
    ["alice-password-1"],
    ["alice-password-1", "123456", "extra"],
    ["alice-password-1", "1" * 100_000],
    ["p" * 200_000, "123456"],
])
async def test_malformed_keyboard_interactive_answers_fail_cleanly(
        gw: SshHarness, responses: list[str]) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(
            "127.0.0.1", gw.port, username="alice", known_hosts=None,
            client_factory=lambda: AnswerWith(responses), client_keys=None, agent_path=None,
            preferred_auth="keyboard-interactive", config=None)
    failures = gw.audit_events("auth.failure")
    assert failures and all(f["reason"] == "malformed_response" for f in failures)
    await still_serves(gw)


# --- algorithms --------------------------------------------------------------------------------


def name_lists(kexinit: bytes) -> list[list[str]]:
    """The ten name-lists of a KEXINIT payload (RFC 4253 7.1)."""
    pos, lists = 17, []  # message number + 16-byte cookie
    for _ in range(10):
        (size,) = struct.unpack(">I", kexinit[pos:pos + 4])
        lists.append(kexinit[pos + 4:pos + 4 + size].decode().split(","))
        pos += 4 + size
    return lists


async def test_the_server_offers_only_hardened_algorithms_and_strict_kex(
        gw: SshHarness) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"SSH-2.0-probe\r\n")
    await reader.readline()
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    packet = await reader.readexactly(length)
    writer.close()
    padding = packet[0]
    payload = packet[1:length - padding]
    assert payload[0] == 20  # SSH_MSG_KEXINIT
    kex, host_keys, c2s, s2c, mac_c2s, mac_s2c, comp_c2s, comp_s2c, _, _ = name_lists(payload)
    offered = kex_algorithms()
    assert kex[:len(offered)] == offered  # then the pseudo-algorithms: strict KEX (Terrapin)
    assert set(kex[len(offered):]) == {"ext-info-s", "kex-strict-s-v00@openssh.com"}
    assert kex[0] == "mlkem768x25519-sha256"
    assert "curve25519-sha256" in kex and "curve25519-sha256@libssh.org" in kex
    assert host_keys == ["ssh-ed25519"]
    assert c2s == s2c == list(CIPHERS) and c2s[0] == "aes128-gcm@openssh.com"
    assert mac_c2s == mac_s2c == list(MACS)
    assert all(mac.endswith("-etm@openssh.com") for mac in MACS)
    assert comp_c2s == comp_s2c == ["none"]


@pytest.mark.parametrize("option", [
    {"kex_algs": ["diffie-hellman-group14-sha256"]},
    {"encryption_algs": ["aes128-ctr"]},
    {"mac_algs": ["hmac-sha2-256"], "encryption_algs": ["aes128-ctr"]},
    {"server_host_key_algs": ["ecdsa-sha2-nistp256"]},
])
async def test_weaker_algorithms_are_not_negotiated(gw: SshHarness,
                                                    option: dict[str, list[str]]) -> None:
    with pytest.raises((asyncssh.KeyExchangeFailed, asyncssh.HostKeyNotVerifiable,
                        asyncssh.DisconnectError)):
        await asyncssh.connect("127.0.0.1", gw.port, username="alice", known_hosts=None,
                               client_keys=None, agent_path=None, config=None, **option)


# --- start-up errors ---------------------------------------------------------------------------


def rsa_host_key(tmp_path: Path) -> str:
    path = tmp_path / "rsa_host_key"
    asyncssh.generate_private_key("ssh-rsa", key_size=2048).write_private_key(path)
    path.chmod(0o600)
    return str(path)


def readable_host_key(tmp_path: Path) -> str:
    path = tmp_path / "readable_host_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(path)
    path.chmod(0o644)
    return str(path)


@pytest.mark.parametrize(("ssh", "message"), [
    ({"host_key_file": "ssh/missing"}, "ssh.host_key_file"),
    ({"host_key_file": "RSA"}, "an Ed25519 key is required"),
    ({"user_ca_key_file": "ssh/missing"}, "ssh.user_ca_key_file"),
    ({"host_key_file": "READABLE"}, "is accessible by group/others (mode 0644)"),
    ({"listen": "IN_USE"}, "ssh.listen 127.0.0.1:"),
], ids=["missing_host_key", "rsa_host_key", "missing_user_ca", "readable_host_key",
        "port_in_use"])
async def test_an_unusable_ssh_setting_stops_the_start_with_a_clear_error(
        tmp_path: Path, ssh: dict[str, str], message: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        special = {"RSA": lambda: rsa_host_key(tmp_path),
                   "READABLE": lambda: readable_host_key(tmp_path),
                   "IN_USE": lambda: f"127.0.0.1:{busy.getsockname()[1]}"}
        values = {key: special[value]() if value in special else value
                  for key, value in ssh.items()}
        with pytest.raises(GatewayError) as error:
            async for _ in running_ssh_gateway(tmp_path, ssh=values):
                pytest.fail("the gateway started")
    assert any(message in line for line in error.value.errors), error.value.errors
