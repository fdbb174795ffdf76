"""Live reload re-evaluation (issue 6, item 3) against real sockets: 200 open SSH tunnels
(two asyncssh connections, keyboard-interactive sign-in), WebSockets and a stream of HTTP
requests through one gateway while its policy is reloaded — first an invalid policy (rejected,
nothing changes), then one that denies the mail tunnels, the chat WebSockets and every rule of
the auditors. Only what the new policy denies closes (``policy_changed``); everything else
keeps flowing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest
from https_harness import USERS
from ssh_harness import SshHarness, running_ssh_gateway

PER_DESTINATION = 50  # tunnels per (user, destination); four pairs: 200 tunnels
KEPT = ("bob", "fileserver.ward.local", 445)
DENIED = (("alice", "mail.ward.local", 993), ("alice", "mail.ward.local", 587),
          ("bob", "mail.ward.local", 993))

Stream = tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]


class Answer(asyncssh.SSHClient):
    """Answers the gateway's one keyboard-interactive round: password and TOTP code."""

    def __init__(self, password: str, code: str) -> None:
        self._answers = [password, code]

    def kbdint_auth_requested(self) -> str:
        return ""

    def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                  prompts: Any) -> list[str]:
        return self._answers


async def ssh_connect(gw: SshHarness, user: str) -> asyncssh.SSHClientConnection:
    password, code = USERS[user][0], gw.code(user)
    return await asyncssh.connect(
        "127.0.0.1", gw.port, username=user, known_hosts=str(gw.known_hosts),
        client_factory=lambda: Answer(password, code), client_keys=None, agent_path=None,
        preferred_auth="keyboard-interactive", config=None)


async def echoes(stream: Stream, payload: bytes) -> bool:
    """Whether the tunnel carries ``payload`` there and back (5 s)."""
    reader, writer = stream
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    except (asyncio.IncompleteReadError, asyncssh.Error, OSError, TimeoutError):
        return False


async def closed(stream: Stream) -> bool:
    """Whether the tunnel was closed by the gateway (EOF within 10 s)."""
    reader, _ = stream
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except (asyncssh.Error, OSError):
        return True


@dataclass
class Traffic:
    """A browser asking for a groupware page again and again until stopped."""

    statuses: list[int] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, client: aiohttp.ClientSession, url: str) -> None:
        while not self.stop.is_set():
            try:
                async with client.get(url, allow_redirects=False) as resp:
                    await resp.read()
                    self.statuses.append(resp.status)
            except aiohttp.ClientError:
                self.statuses.append(0)  # a dropped request


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[SshHarness]:
    async for harness in running_ssh_gateway(tmp_path, sessions={"per_user": 3}):
        yield harness


def edit_policy(gw: SshHarness) -> None:
    """No more mail tunnels, no more chat, nothing at all for the auditors."""
    policies = gw.dir / "policies"
    staff = policies / "20-staff.yaml"
    text = staff.read_text()
    start = text.index("  - id: staff-mail-clients")
    end = text.index("  - id: staff-own-office-pc")
    text = (text[:start] + text[end:]).replace("services: [groupware, chat]",
                                               "services: [groupware]")
    staff.write_text(text)
    (policies / "40-auditors.yaml").unlink()


async def test_a_reload_closes_only_what_the_new_policy_denies(gw: SshHarness) -> None:
    # 100 tunnels per session (two destinations each): above the default cap of 32.
    gw.gateway.ssh.tunnels.max_per_session = 2 * PER_DESTINATION  # type: ignore[union-attr]
    conns = {user: await ssh_connect(gw, user) for user in ("alice", "bob")}
    tunnels: dict[tuple[str, str, int], list[Stream]] = {}
    for key in (KEPT, *DENIED):
        user, host, port = key
        tunnels[key] = list(await asyncio.gather(*[
            conns[user].open_connection(host, port) for _ in range(PER_DESTINATION)]))
    every = [stream for streams in tunnels.values() for stream in streams]
    assert len(every) == 200 and len(gw.gateway.ssh.tunnels) == 200  # type: ignore[union-attr]
    assert all(await asyncio.gather(*[echoes(s, b"before") for s in every]))

    gw.clock.advance(30)  # alice's SSH sign-in used this step's code: a new one
    alice = await gw.https.signed_in("alice")
    carol = await gw.https.signed_in("carol")
    chat = await alice.ws_connect(gw.https.base + "/chat/room")
    groupware_ws = await alice.ws_connect(gw.https.base + "/groupware/live")
    for ws in (chat, groupware_ws):
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
    traffic = Traffic()
    browsing = asyncio.create_task(traffic.run(alice, gw.https.base + "/groupware/inbox"))
    try:
        await wait_until(lambda: len(traffic.statuses) >= 5, "requests flowing")

        # 1. An invalid policy: rejected as a whole, nothing closes.
        broken = gw.dir / "policies" / "99-broken.yaml"
        broken.write_text("rules:\n  - id: [unterminated\n")
        assert not await gw.gateway.reload()
        assert gw.gateway.last_reload_ok is False
        failure = gw.audit_events("config.reload")[-1]
        assert failure["status"] == "failure" and "99-broken.yaml" in failure["reason"]
        assert all(await asyncio.gather(*[echoes(s, b"still") for s in every]))
        broken.unlink()

        # 2. A valid policy that denies mail, chat and the auditors.
        seen_before = len(traffic.statuses)
        edit_policy(gw)
        assert await gw.gateway.reload()
        message = await chat.receive(timeout=10)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message
        assert chat.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        denied = [s for key in DENIED for s in tunnels[key]]
        assert all(await asyncio.gather(*[closed(s) for s in denied]))
        assert all(await asyncio.gather(*[echoes(s, b"after") for s in tunnels[KEPT]]))
        await groupware_ws.send_str("still here")
        assert (await groupware_ws.receive(timeout=5)).data == "echo:still here"
        await wait_until(lambda: len(traffic.statuses) >= seen_before + 5,
                         "requests flowing after the reload")
    finally:
        traffic.stop.set()
        await browsing
    assert traffic.statuses and set(traffic.statuses) == {200}  # not one request dropped

    # Carol's only rules are gone: her session ended; alice's and bob's did not.
    ends = [(e["user"], e["reason"]) for e in gw.audit_events("session.end")]
    assert ends == [("carol", "policy_changed")]
    async with carol.get(gw.https.base + "/", allow_redirects=False) as resp:
        assert resp.status == 401  # signed out (a script gets 401, a browser the sign-in page)
    assert {s.user for s in gw.gateway.sessions.sessions()} == {"alice", "bob"}
    assert not any(conn.is_closed() for conn in conns.values())
    closes = [e for e in gw.audit_events("tunnel.close") if e.get("reason") == "policy_changed"]
    assert len(closes) == len(DENIED) * PER_DESTINATION
    assert {e["dest"] for e in closes} == {"mail.ward.local:993", "mail.ward.local:587"}
    assert [e["status"] for e in gw.audit_events("config.reload")] == ["failure", "success"]
    assert len(gw.gateway.ssh.tunnels) == PER_DESTINATION  # type: ignore[union-attr]

    await chat.close()
    await groupware_ws.close()
    for conn in conns.values():
        conn.close()
        with contextlib.suppress(Exception):
            await conn.wait_closed()


async def wait_until(condition: Any, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)
