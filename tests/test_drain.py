"""Graceful stop (issue 6, item 4) of a real ``gatewayd run`` process on SIGTERM: systemd
hears STOPPING=1 first; a slow download in flight completes; a new request on a kept-alive
connection gets 503 with ``Retry-After`` and ``Connection: close``; an SSH tunnel open at the
SIGTERM keeps relaying until ``gateway.shutdown_grace`` runs out and new tunnels are refused,
then the client is disconnected with "the gateway is shutting down"; every session gets its
``session.end`` (``shutdown``); the process exits 0 and its audit log verifies, a checkpoint
last."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
import trustme
from aiohttp import web
from https_harness import USERS, write_gateway_config
from ssh_harness import ASKPASS, SSH, TEST_SSH_SETTINGS, start_echo, write_ssh_keys

from gatewayd.identity.totp import SecretStore

GRACE = 6.0  # gateway.shutdown_grace of the daemon under test, seconds (2.5x the download)
CHUNK = b"x" * 65536
CHUNKS = 24  # the slow download: 1.5 MiB over about 2.4 s (well within the grace)
CHUNK_PAUSE = 0.1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def slow_upstream() -> tuple[web.AppRunner, str, asyncio.Event]:
    """Any path streams `CHUNKS` chunks with a pause between them; ``started`` is set once
    the first chunk went out."""
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/download"):
            response = web.StreamResponse()
            response.content_length = len(CHUNK) * CHUNKS
            await response.prepare(request)
            for _ in range(CHUNKS):
                await response.write(CHUNK)
                started.set()
                await asyncio.sleep(CHUNK_PAUSE)
            return response
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", started


async def open_ssh_forward(daemon: Daemon, user: str, dest: str
                           ) -> tuple[asyncio.subprocess.Process, int]:
    """``ssh -N -L PORT:dest`` as ``user`` (the real OpenSSH client, SSH_ASKPASS answering
    the password and code prompts); returns the process once the forward is listening."""
    answers = daemon.tmp / f"askpass-{user}"
    answers.mkdir()
    (answers / "password").write_text(USERS[user][0] + "\n")
    (answers / "code").write_text(daemon.code(user) + "\n")
    (answers / "askpass").write_text(ASKPASS)
    (answers / "askpass").chmod(0o700)
    port = free_port()
    options = {"UserKnownHostsFile": str(daemon.tmp / "known_hosts"),
               "StrictHostKeyChecking": "yes", "GlobalKnownHostsFile": "/dev/null",
               "IdentityAgent": "none", "PubkeyAuthentication": "no",
               "PreferredAuthentications": "keyboard-interactive", "BatchMode": "no",
               "ExitOnForwardFailure": "yes", "ControlMaster": "no", "UpdateHostKeys": "no"}
    args = [SSH, "-F", "/dev/null", "-p", str(daemon.ssh_port), "-l", user, "-N",
            "-L", f"127.0.0.1:{port}:{dest}"]
    for name, value in options.items():
        args += ["-o", f"{name}={value}"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(daemon.tmp),
           "SSH_ASKPASS": str(answers / "askpass"), "SSH_ASKPASS_REQUIRE": "force",
           "DISPLAY": ":0"}
    process = await asyncio.create_subprocess_exec(
        *args, "127.0.0.1", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.returncode is None, "ssh exited before its forward was up"
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return process, port
        await asyncio.sleep(0.1)
    raise AssertionError("the ssh -L forward did not come up within 20 s")


@dataclass
class Daemon:
    process: asyncio.subprocess.Process
    tmp: Path
    https: str
    ssh_port: int
    ca: trustme.CA
    started: asyncio.Event
    notify: socket.socket

    def code(self, user: str) -> str:
        return SecretStore(self.tmp / "state").current_code(user, time.time())

    def audit(self) -> list[dict[str, Any]]:
        text = (self.tmp / "log" / "audit.log").read_text()
        return [json.loads(line) for line in text.splitlines() if line]

    def notifications(self) -> list[str]:
        states = []
        with contextlib.suppress(BlockingIOError):
            while True:
                data = self.notify.recv(4096).decode()
                states += [line.split("=", 1)[0] for line in data.splitlines()
                           if not line.startswith("STATUS=")]
        return states


async def wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            assert process.returncode is None, "gatewayd exited during its start"
            with contextlib.suppress(aiohttp.ClientError):
                async with client.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError("gatewayd not ready within 30 s")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    write_ssh_keys(tmp_path)
    runner, upstream_url, started = await slow_upstream()
    echo, echo_port = await start_echo()
    ca = trustme.CA()
    https_port, ssh_port, metrics_port = free_port(), free_port(), free_port()
    ssh = {**TEST_SSH_SETTINGS, "listen": f"127.0.0.1:{ssh_port}", "address_overrides": {
        '"mail.ward.local:993"': f"127.0.0.1:{echo_port}"}}
    config = write_gateway_config(
        tmp_path, upstream_url, ca, ssh=ssh,
        gateway={"shutdown_grace": f"{GRACE:g}s", "log_level": "info"},
        https={"listen": f"127.0.0.1:{https_port}"},
        metrics={"listen": f"127.0.0.1:{metrics_port}"})
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    env.pop("WATCHDOG_USEC", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "run", "--config", str(config), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=(tmp_path / "stderr.log").open("wb"))
    try:
        await wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", process)
        known_hosts = tmp_path / "known_hosts"
        host_key = asyncssh.read_private_key(tmp_path / "ssh" / "host_ed25519")
        known_hosts.write_text(f"[127.0.0.1]:{ssh_port} "
                               f"{host_key.export_public_key('openssh').decode().strip()}\n")
        yield Daemon(process, tmp_path, f"https://127.0.0.1:{https_port}", ssh_port, ca,
                     started, notify)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        notify.close()
        echo.close()
        await echo.wait_closed()
        await runner.cleanup()


async def refused_within(seconds: float, host: str, port: int) -> bool:
    """Whether new connections to host:port are refused within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return True
        writer.close()
        await asyncio.sleep(0.05)
    return False


async def test_sigterm_drains_downloads_and_tunnels_then_exits_zero(daemon: Daemon) -> None:
    context = ssl.create_default_context()
    daemon.ca.configure_trust(context)
    browser = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1),
                                    cookie_jar=aiohttp.CookieJar(unsafe=True))
    downloader = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context),
                                       cookie_jar=browser.cookie_jar)
    ssh: asyncio.subprocess.Process | None = None
    try:
        await sign_in(browser, daemon)
        ssh, port = await open_ssh_forward(daemon, "bob", "mail.ward.local:993")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        download = asyncio.create_task(fetch(downloader, daemon.https + "/files/download"))
        await asyncio.wait_for(daemon.started.wait(), 10)
        # The browser's one connection is kept alive after this request — once its body is
        # read: aiohttp closes a connection released with an unread body, which under load
        # (body not yet arrived with the headers) made the drain's first request open a new
        # connection to a listener already closed (the failure seen in loaded full runs).
        async with browser.get(daemon.https + "/groupware/ping") as resp:
            assert resp.status == 200
            await resp.read()
        assert sum(len(c) for c in browser.connector._conns.values()) == 1  # kept alive
        stopped_at = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)

        # A new request on the kept-alive connection: 503, Retry-After, Connection: close.
        status, headers = await until_draining(browser, daemon.https + "/groupware/ping")
        assert status == 503 and int(headers["Retry-After"]) > 0
        assert headers["Connection"].lower() == "close"
        # Nothing new is accepted: not on either listener, not on the admin socket.
        https_port = int(daemon.https.rpartition(":")[2])
        # (The listeners close one after another as the drain starts: allow a moment.)
        for port_ in (https_port, daemon.ssh_port):
            assert await refused_within(5.0, "127.0.0.1", port_)
        admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with admin, pytest.raises(OSError):
            admin.connect(str(daemon.tmp / "admin.sock"))
        # The tunnel open at SIGTERM still carries data during the grace (checked while the
        # download is still running: a fixed pause after it raced the grace's end under load)…
        writer.write(b"during the grace")
        assert await asyncio.wait_for(reader.readexactly(16), 5) == b"during the grace"
        assert time.monotonic() - stopped_at < GRACE
        # …but no new tunnel opens (ssh accepts locally, the gateway refuses the channel).
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(late_reader.read(), 10) == b""
        late_writer.close()
        # The download in flight completes, every byte of it.
        assert await asyncio.wait_for(download, GRACE + 10) == len(CHUNK) * CHUNKS
        # Then the grace ends: the client is told why, and the process exits 0.
        assert ssh.stderr is not None
        errors = (await asyncio.wait_for(ssh.stderr.read(), GRACE + 10)).decode()
        assert "administratively prohibited: gatewayd: the gateway is shutting down" in errors
        assert "session ended: the gateway is shutting down" in errors
        assert time.monotonic() - stopped_at >= GRACE - 0.5  # the tunnel had its grace
        assert await asyncio.wait_for(ssh.wait(), 10) == 255
        assert await asyncio.wait_for(daemon.process.wait(), 20) == 0
    finally:
        await browser.close()
        await downloader.close()
        if ssh is not None and ssh.returncode is None:
            os.killpg(ssh.pid, signal.SIGKILL)
            await ssh.wait()

    states = daemon.notifications()
    assert states.index("READY") < states.index("STOPPING") and states[-1] == "STOPPING"
    records = daemon.audit()
    ends = [(r["user"], r["frontend"], r["reason"]) for r in records
            if r["event"] == "session.end"]
    assert sorted(ends) == [("alice", "https", "shutdown"), ("bob", "ssh", "shutdown")]
    assert records[-1]["event"] == "audit.checkpoint"
    verify = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd", "audit", "verify",
        str(daemon.tmp / "log" / "audit.log"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await verify.communicate()
    assert verify.returncode == 0, out.decode()


async def sign_in(browser: aiohttp.ClientSession, daemon: Daemon) -> None:
    from https_harness import csrf_token  # noqa: PLC0415

    async with browser.get(daemon.https + "/.gatewayd/login") as resp:
        token = csrf_token(await resp.text())
    form = {"username": "alice", "password": USERS["alice"][0], "code": daemon.code("alice"),
            "csrf_token": token, "next": "/"}
    async with browser.post(daemon.https + "/.gatewayd/login", data=form,
                            headers={"Origin": daemon.https}, allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


async def fetch(client: aiohttp.ClientSession, url: str) -> int:
    size = 0
    async with client.get(url) as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            size += len(chunk)
    return size


async def until_draining(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    """The first answer that is not a 200 (the SIGTERM takes a moment to arrive)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with client.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                return resp.status, resp.headers
        await asyncio.sleep(0.02)
    raise AssertionError("the gateway never answered 503 during its drain")
