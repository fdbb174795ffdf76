"""Tests for gatewayd.admin and gatewayd.admin_cli: the admin socket of a real running gateway
(real logins over TLS, a real unix socket), the `gatewayd sessions|reload|status` commands, and
the socket's own safety (mode, group, stale and live sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import pwd
import socket
import stat
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from https_harness import Harness, running_gateway
from ssh_harness import SshHarness, running_ssh_gateway
from test_ssh_server import open_forward

from gatewayd.admin import AdminServer, AdminSocketError
from gatewayd.admin_cli import call
from gatewayd.audit import AuditWriteError
from gatewayd.cli import main
from gatewayd.config import AdminSettings

JSON = {"Accept": "application/json"}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


def admin_socket(gw: Harness) -> Path:
    assert gw.gateway.listeners.admin_socket is not None
    return Path(gw.gateway.listeners.admin_socket)


async def cli(gw: Harness, *args: str) -> int:
    """Run the real `gatewayd` command in a thread (it runs its own event loop)."""
    return await asyncio.to_thread(main, [*args, "--socket", str(admin_socket(gw))])


async def api(gw: Harness, method: str, route: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    return await call(admin_socket(gw), method, route, **kwargs)


async def second_login(gw: Harness, user: str) -> Any:
    """Another session of ``user``: a TOTP code works once, so the next one is 30 s later."""
    gw.clock.advance(30)
    return await gw.signed_in(user)


async def still_signed_in(gw: Harness, client: Any) -> bool:
    async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
        return bool(resp.status == 200)


def me() -> str:
    uid = os.getuid()
    return f"uid={uid}({pwd.getpwuid(uid).pw_name})"


# --- listing --------------------------------------------------------------------------------


async def test_sessions_list_shows_who_is_connected(
    gw: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await gw.signed_in("alice")
    await gw.signed_in("bob")
    status, answer = await api(gw, "GET", "/v1/sessions")
    assert status == 200
    rows = answer["sessions"]
    assert sorted(row["user"] for row in rows) == ["alice", "bob"]
    assert set(rows[0]) == {"id", "user", "device", "source_ip", "frontend", "started",
                            "last_activity", "bytes_up", "bytes_down", "open_tunnels"}
    assert rows[0]["frontend"] == "https" and rows[0]["source_ip"] == "127.0.0.1"
    assert datetime.fromisoformat(rows[0]["started"]) == gw.clock.now().replace(microsecond=0)
    # The listing never carries the session secret: ids are the non-secret handles.
    live = {s.handle for s in gw.gateway.sessions.sessions()}
    assert {row["id"] for row in rows} == live

    assert await cli(gw, "sessions", "list", "--user", "bob", "--json") == 0
    only_bob = json.loads(capsys.readouterr().out)
    assert [row["user"] for row in only_bob] == ["bob"]
    assert await cli(gw, "sessions", "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["ID", "USER", "DEVICE"]
    assert len(table) == 3 and {line.split()[1] for line in table[1:]} == {"alice", "bob"}


# --- killing --------------------------------------------------------------------------------


async def test_kill_by_id_ends_that_session_now_and_is_audited_with_the_operator(
    gw: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = await gw.signed_in("alice")
    alice_too = await second_login(gw, "alice")
    handle = gw.gateway.sessions.sessions()[0].handle
    assert await cli(gw, "sessions", "kill", handle, "--reason", "lost laptop") == 0
    assert handle in capsys.readouterr().out
    assert not await still_signed_in(gw, alice)
    assert await still_signed_in(gw, alice_too)  # only the named session
    kill = gw.audit_events("admin.session_kill")[-1]
    assert kill["operator"] == me()
    assert kill["session"] == handle and kill["user"] == "alice"
    assert kill["reason"] == "lost laptop" and kill["frontend"] == "admin"
    end = gw.audit_events("session.end")[-1]
    assert end["session"] == handle and end["reason"] == "admin_kill"
    # Audit order: the kill is recorded before the session ends.
    assert kill["seq"] < end["seq"]


@pytest.mark.parametrize("selector", ["--user", "--device"])
async def test_kill_by_user_or_device_ends_all_of_them(gw: Harness, selector: str) -> None:
    first = await gw.signed_in("alice")
    second = await second_login(gw, "alice")
    bob = await gw.signed_in("bob")
    if selector == "--device":
        for session in gw.gateway.sessions.sessions():
            if session.user == "alice":
                session.device = "pc-0042"
        value = "pc-0042"
    else:
        value = "alice"
    assert await cli(gw, "sessions", "kill", selector, value) == 0
    assert not await still_signed_in(gw, first)
    assert not await still_signed_in(gw, second)
    assert await still_signed_in(gw, bob)
    kills = gw.audit_events("admin.session_kill")
    assert len(kills) == 2 and {k["user"] for k in kills} == {"alice"}


async def test_a_kill_that_matches_nothing_exits_1_and_is_still_audited(
    gw: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(gw, "sessions", "kill", "--user", "nobody") == 1
    assert "no matching session" in capsys.readouterr().err
    record = gw.audit_events("admin.session_kill")[-1]
    assert record["status"] == "no_match" and record["user"] == "nobody"


async def test_no_kill_without_an_audit_record(
    gw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await gw.signed_in("alice")

    def broken(*args: object, **kwargs: object) -> None:
        raise AuditWriteError("admin.session_kill", None, OSError(28, "No space left"))

    monkeypatch.setattr(gw.gateway.audit, "emit", broken)
    status, answer = await api(gw, "POST", "/v1/kill", body={"user": "alice"})
    assert status == 503 and "nothing was killed" in answer["error"]
    monkeypatch.undo()
    assert await still_signed_in(gw, alice)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one of session, user, device"),
        ({"user": "a", "device": "b"}, "exactly one of session, user, device"),
        ({"user": ""}, "user: expected a non-empty name"),
        ({"user": 5}, "user: expected a non-empty name"),
        ({"user": "a\nb"}, "user: expected a non-empty name"),
        ({"user": "alice", "reason": "two\nlines"}, "reason: expected one line"),
        ({"user": "alice", "reason": "x" * 201}, "reason: expected one line"),
        ({"user": "alice", "reason": ["list"]}, "reason: expected one line"),
    ],
)
async def test_bad_kill_requests_get_a_400_with_a_reason(
    gw: Harness, body: dict[str, object], message: str
) -> None:
    await gw.signed_in("alice")
    status, answer = await api(gw, "POST", "/v1/kill", body=body)  # type: ignore[arg-type]
    assert status == 400 and message in answer["error"]
    assert gw.gateway.sessions.active() == 1


async def test_malformed_and_unknown_requests_get_json_errors(gw: Harness) -> None:
    reader, writer = await asyncio.open_unix_connection(str(admin_socket(gw)))
    writer.write(b"POST /v1/kill HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                 b"Content-Type: application/json\r\nConnection: close\r\n\r\n[1,2")
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    assert response.startswith("HTTP/1.1 400")
    assert "\r\nServer: gatewayd\r\n" in response  # no stack version
    assert '"error": "expected a JSON object"' in response
    status, answer = await api(gw, "GET", "/v1/nothing")
    assert status == 404 and answer["error"] == "Not Found"
    status, answer = await api(gw, "GET", "/v1/kill")
    assert status == 405 and "error" in answer


# --- reload and status ----------------------------------------------------------------------


async def test_reload_applies_or_reports_the_rejection(
    gw: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli(gw, "reload") == 0
    assert "configuration reloaded" in capsys.readouterr().out
    policy = gw.gateway.settings.policy.dir / "20-staff.yaml"
    policy.write_text(policy.read_text() + "\n  - id: [broken\n")
    assert await cli(gw, "reload") == 1
    assert "reload rejected" in capsys.readouterr().err
    assert gw.audit_events("config.reload")[-1]["status"] == "failure"
    assert await cli(gw, "status") == 0  # still ready: the old policy serves
    out = capsys.readouterr().out
    assert "ready" in out and "last reload: REJECTED" in out


async def test_status_reports_listeners_and_seats(
    gw: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await gw.signed_in("alice")
    assert await cli(gw, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["ready"] is True and status["node"] == "https-test"
    assert status["seats"] == {"in_use": 1, "limit": 140}
    assert status["sessions"] == {"https": 1, "ssh": 0}
    assert status["listeners"]["https"] == gw.base
    assert status["listeners"]["admin"] == str(admin_socket(gw))


async def test_commands_without_a_gateway_exit_1_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(main, ["status", "--socket", str(tmp_path / "none.sock")])
    assert code == 1
    assert "cannot reach the gateway" in capsys.readouterr().err


# --- the socket itself ----------------------------------------------------------------------


class IdleTarget:
    """Enough of a Gateway for the socket tests (no request reaches it)."""


async def start_server(path: Path, group: str = "") -> AdminServer:
    server = AdminServer(AdminSettings(socket=path, group=group), IdleTarget())  # type: ignore[arg-type]
    await server.start()
    return server


async def test_without_a_group_the_socket_is_0600(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "a.sock")
    try:
        mode = (tmp_path / "a.sock").stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        await server.close()
    assert not (tmp_path / "a.sock").exists()  # removed at stop


async def test_with_a_group_the_socket_is_0660_and_owned_by_it(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    server = await start_server(tmp_path / "a.sock", group)
    try:
        info = (tmp_path / "a.sock").stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == os.getgid()
    finally:
        await server.close()


async def test_an_unknown_group_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(AdminSocketError, match="group 'no-such-group' does not exist"):
        await start_server(tmp_path / "a.sock", "no-such-group")


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a crashed gateway's leftover: the file exists, nobody listens
    server = await start_server(path)
    try:
        with pytest.raises(AdminSocketError, match="is in use"):
            await start_server(path)
    finally:
        await server.close()


@pytest.mark.parametrize("kind", ["file", "missing-dir"])
async def test_a_path_that_is_not_a_socket_is_a_start_error(tmp_path: Path, kind: str) -> None:
    if kind == "file":
        path = tmp_path / "a.sock"
        path.write_text("not a socket")
        expected = "exists and is not a socket"
    else:
        path = tmp_path / "missing" / "a.sock"
        expected = "does not exist"
    with pytest.raises(AdminSocketError, match=expected):
        await start_server(path)


# --- killing sessions that are busy (both frontends, through the admin socket) ---------------


STREAM_CHUNK = b"d" * 65536


async def endless_download_upstream() -> tuple[web.AppRunner, str]:
    """An upstream whose every response is a download that goes on for a minute."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(3000):
                await response.write(STREAM_CHUNK)
                await asyncio.sleep(0.02)
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def busy(tmp_path: Path) -> AsyncIterator[SshHarness]:
    runner, url = await endless_download_upstream()
    try:
        async for harness in running_ssh_gateway(
                tmp_path, upstreams={"files": {"url": url, "read_timeout": "30s"}}):
            yield harness
    finally:
        await runner.cleanup()


async def download(client: aiohttp.ClientSession, url: str, received: list[int]) -> None:
    """Read the download until the gateway cuts it (any error or EOF ends it)."""
    with contextlib.suppress(aiohttp.ClientError, ConnectionError):
        async with client.get(url) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received.append(len(chunk))


async def pump(writer: asyncio.StreamWriter) -> None:
    """Keep a tunnel busy (the echo service sends it all back) until the tunnel closes."""
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            writer.write(STREAM_CHUNK)
            await writer.drain()


async def wait_for_bytes(received: list[int], wanted: int) -> None:
    deadline = time.monotonic() + 10
    while sum(received) < wanted:
        assert time.monotonic() < deadline, "the download did not flow"
        await asyncio.sleep(0.02)


async def stopped_within(awaitable: Any, seconds: float = 5.0) -> float:
    started = time.monotonic()
    await asyncio.wait_for(awaitable, seconds)
    return time.monotonic() - started


@pytest.mark.parametrize("selector", ["id", "user", "device"])
async def test_a_kill_stops_a_download_a_websocket_and_a_tunnel_within_5_seconds(
        busy: SshHarness, selector: str) -> None:
    gw = busy
    alice = await gw.https.signed_in("alice")
    bob = await gw.https.signed_in("bob")
    bob_ws = await bob.ws_connect(gw.https.base + "/chat/room")
    received: list[int] = []
    fetching = asyncio.create_task(download(alice, gw.https.base + "/files/big.iso", received))
    ws = await alice.ws_connect(gw.https.base + "/chat/room")
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "echo:hi"
    gw.clock.advance(30)  # a fresh code for alice's SSH sign-in
    ssh, port = await open_forward(gw, "alice", "mail.ward.local:993")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pumping = asyncio.create_task(pump(writer))
    await reader.readexactly(len(STREAM_CHUNK))  # the tunnel carries data
    await wait_for_bytes(received, 4 * len(STREAM_CHUNK))  # the download is flowing
    (web_session,) = [s for s in gw.gateway.sessions.sessions()
                      if s.user == "alice" and s.frontend == "https"]
    (ssh_session,) = gw.sessions()

    async def tunnel_closed() -> None:
        with contextlib.suppress(ConnectionError):  # a reset is as closed as an EOF
            while await reader.read(65536):
                pass

    async def websocket_closed() -> None:
        message = await ws.receive()
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    socket_path = str(admin_socket(gw.https))
    kill = ["sessions", "kill", "--socket", socket_path, "--reason", "test"]
    if selector == "id":
        # One id is one session: the browser's transfers stop, the tunnel goes on…
        assert await asyncio.to_thread(main, [*kill, web_session.handle]) == 0
        await stopped_within(asyncio.gather(fetching, websocket_closed()))
        assert not reader.at_eof() and ssh.returncode is None
        # …until its own session is killed too.
        assert await asyncio.to_thread(main, [*kill, ssh_session.handle]) == 0
        await stopped_within(asyncio.gather(tunnel_closed(), ssh.wait()))
    else:
        if selector == "device":
            web_session.device = ssh_session.device = "pc-0042"
        target = ["--user", "alice"] if selector == "user" else ["--device", "pc-0042"]
        assert await asyncio.to_thread(main, [*kill, *target]) == 0
        await stopped_within(asyncio.gather(fetching, websocket_closed(), tunnel_closed(),
                                            ssh.wait()))
    pumping.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionError):
        await pumping
    writer.close()
    # (Not asserted here: the disconnect message. A client busy writing may hit the closed
    # socket before it reads the message; test_ssh_server checks the message.)
    kills = gw.audit_events("admin.session_kill")
    assert sorted(k["session"] for k in kills) == sorted([web_session.handle,
                                                          ssh_session.handle])
    assert {k["operator"] for k in kills} == {me()}
    ends = {e["session"]: e["reason"] for e in gw.audit_events("session.end")}
    assert ends == {web_session.handle: "admin_kill", ssh_session.handle: "admin_kill"}
    # Bob was not touched.
    await bob_ws.send_str("still here")
    assert (await bob_ws.receive(timeout=5)).data == "echo:still here"
    await bob_ws.close()
