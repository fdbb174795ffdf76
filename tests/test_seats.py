"""Seats and limits across both frontends (issue 6, item 1): the seats message, per-role
per-user caps, seats released at once, the HTTPS connection caps at accept, and 20 logins
(half HTTPS, half SSH keyboard-interactive through the real OpenSSH client) racing for 10
seats. Real sockets throughout (see https_harness / ssh_harness)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from https_harness import Harness, password_hash, running_gateway
from ssh_harness import SshHarness, running_ssh_gateway

from gatewayd.app import Gateway, GatewayError
from gatewayd.config import load_settings
from gatewayd.identity.totp import SecretStore
from gatewayd.sessions import per_user_cap, seats_full_message

RACERS = 20
SEATS = 10


async def wait_for(condition: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.02)


async def scrape(gateway: Gateway) -> str:
    assert gateway.listeners.metrics_url is not None
    async with aiohttp.ClientSession() as client, client.get(gateway.listeners.metrics_url) as r:
        return await r.text()


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{labels} not exported"
    return float(match.group(1))


# --- the cap of one person ------------------------------------------------------------------


@pytest.mark.parametrize(("default", "per_role", "roles", "cap"), [
    (1, {}, ["staff"], 1),
    (1, {"managers": 2}, ["staff"], 1),
    (1, {"managers": 2}, ["managers"], 2),
    (1, {"managers": 2}, ["staff", "managers"], 2),
    (3, {"managers": 2}, ["managers"], 2),  # a role's value replaces the default
    (1, {"managers": 2, "auditors": 5}, ["managers", "auditors"], 5),  # largest wins
    (2, {"managers": 4}, [], 2),
], ids=["no-table", "other-role", "role", "two-roles", "role-below-default", "largest",
        "no-roles"])
def test_per_user_cap(default: int, per_role: dict[str, int], roles: list[str],
                      cap: int) -> None:
    assert per_user_cap(default, per_role, roles) == cap


def test_the_seats_sentence() -> None:
    assert seats_full_message(140) == "All 140 seats are in use; try again later."


# --- HTTPS: full, released, visible ---------------------------------------------------------


@pytest.fixture
async def two_seats(tmp_path: Path) -> AsyncIterator[Harness]:
    async for gw in running_gateway(tmp_path, sessions={"max_concurrent": 2, "per_user": 1}):
        yield gw


async def test_full_gateway_says_so_in_html_and_json_and_metrics_show_why(
        two_seats: Harness) -> None:
    gw = two_seats
    alice = await gw.signed_in("alice")
    await gw.signed_in("bob")
    status, body, _ = await gw.login(gw.client(), "carol")
    assert status == 503 and seats_full_message(2) in body
    # A script (no text/html in Accept) gets the same sentence as JSON.
    client = gw.client()
    token = await gw.login_form(client)
    gw.clock.advance(30)  # carol's code of a moment ago was used: it would be a replay
    form = {"username": "carol", "password": "carol-password-333", "code": gw.code("carol"),
            "csrf_token": token, "next": "/"}
    async with client.post(gw.base + "/.gatewayd/login", data=form, allow_redirects=False,
                           headers={"Origin": gw.base, "Accept": "application/json"}) as resp:
        assert resp.status == 503
        assert await resp.json() == {"error": "seats_full", "message": seats_full_message(2)}
    reasons = [e["reason"] for e in gw.audit_events("auth.failure")]
    assert reasons == ["seats_full", "seats_full"]
    text = await scrape(gw.gateway)
    assert metric(text, "gatewayd_seats_limit") == 2
    assert metric(text, "gatewayd_sessions_active", '{frontend="https"}') == 2
    # Logout frees the seat at once: carol gets in with the very next attempt.
    async with alice.get(gw.base + "/.gatewayd/logout") as resp:
        logout_token = re.search(r'name="csrf_token" value="([^"]+)"', await resp.text())
    assert logout_token is not None
    async with alice.post(gw.base + "/.gatewayd/logout", headers={"Origin": gw.base},
                          data={"csrf_token": logout_token.group(1)},
                          allow_redirects=False) as resp:
        assert resp.status in (200, 303)
    assert gw.gateway.sessions.seats_taken() == 1
    gw.clock.advance(30)
    status, body, _ = await gw.login(gw.client(), "carol")
    assert status == 303, body
    assert metric(await scrape(gw.gateway), "gatewayd_sessions_active",
                  '{frontend="https"}') == 2


async def test_an_expired_session_frees_its_seat_for_the_next_login(two_seats: Harness) -> None:
    gw = two_seats
    await gw.signed_in("alice")
    await gw.signed_in("bob")
    idle = gw.gateway.settings.sessions.idle_timeout.total_seconds()
    gw.clock.advance(idle + 1)  # both idle now; nobody swept yet
    status, body, _ = await gw.login(gw.client(), "carol")
    assert status == 303, body
    ended = {(e["user"], e["reason"]) for e in gw.audit_events("session.end")}
    assert ended == {("alice", "idle_timeout"), ("bob", "idle_timeout")}


# --- per-role caps --------------------------------------------------------------------------


async def test_a_managers_cap_applies_to_managers_only(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, sessions={"per_user": 1,
                                                        "per_role": {"managers": 2}}):
        for _ in range(2):
            await gw.signed_in("bob")  # telework-managers → role managers: 2 seats
            gw.clock.advance(30)
        assert [s.user for s in gw.gateway.sessions.sessions()] == ["bob", "bob"]
        for _ in range(2):
            await gw.signed_in("alice")  # staff: the default, 1; newest login wins
            gw.clock.advance(30)
        users = sorted(s.user for s in gw.gateway.sessions.sessions())
        assert users == ["alice", "bob", "bob"]
        assert [e["user"] for e in gw.audit_events("session.end")
                if e["reason"] == "replaced"] == ["alice"]
        await gw.signed_in("bob")  # a third for bob replaces his oldest
        assert sorted(s.user for s in gw.gateway.sessions.sessions()) == ["alice", "bob", "bob"]


def test_a_per_role_name_the_policy_does_not_define_is_refused(tmp_path: Path) -> None:
    import trustme  # noqa: PLC0415
    from https_harness import write_gateway_config  # noqa: PLC0415

    config = write_gateway_config(tmp_path, "http://127.0.0.1:1", trustme.CA(),
                                  sessions={"per_role": {"manager": 2}})
    with pytest.raises(GatewayError, match=r"sessions\.per_role: 'manager' is not a role"):
        Gateway(load_settings(config), config_path=config)


# --- HTTPS connection caps at accept --------------------------------------------------------


async def _tls_connect(gw: Harness) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = gw.host.rpartition(":")
    return await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=gw.ssl_context(),
                                server_hostname="localhost"), 10)


async def _refused(gw: Harness) -> bool:
    """Whether a new TLS connection is closed before its handshake completes."""
    try:
        _, writer = await _tls_connect(gw)
    except (OSError, asyncio.IncompleteReadError):
        return True
    writer.close()
    return False


@pytest.mark.parametrize(("caps", "reason"), [
    ({"max_connections_per_source": 2}, "per_source"),
    ({"max_connections": 2}, "total"),
], ids=["per-source", "total"])
async def test_connections_over_the_cap_are_closed_at_accept(
        tmp_path: Path, caps: dict[str, int], reason: str) -> None:
    async for gw in running_gateway(tmp_path, https=caps):
        assert gw.gateway.https is not None
        admission = gw.gateway.https.admission
        held = [await _tls_connect(gw) for _ in range(2)]
        assert await _refused(gw)
        text = await scrape(gw.gateway)
        assert metric(text, "gatewayd_https_connections_refused_total",
                      f'{{reason="{reason}"}}') == 1
        # A connection that fails its handshake frees its slot too.
        held[1][1].close()
        await wait_for(lambda: admission.pending == 1,  # noqa: B023 - awaited right here
                       "the closed connection's slot")
        junk_reader, junk = await asyncio.open_connection(*gw.host.split(":"))
        junk.write(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP to the TLS port
        with contextlib.suppress(ConnectionError):  # closed by the failed handshake
            await asyncio.wait_for(junk_reader.read(), 10)  # until EOF (an alert may come)
        await wait_for(lambda: admission.pending == 1,  # noqa: B023 - awaited right here
                       "the failed handshake's slot")
        held[1] = await _tls_connect(gw)
        junk.close()
        # Closing one frees its slot; the next connection is served (a real request).
        held[0][1].close()
        await wait_for(lambda: admission.pending == 1,  # noqa: B023 - awaited right here
                       "the closed connection's slot")
        async with gw.client().get(gw.base + "/.gatewayd/jwks.json") as resp:
            assert resp.status == 200
        for _, writer in held[1:]:
            writer.close()


# --- the race: 20 logins, 10 seats, both frontends at once --------------------------------


def _racer(n: int) -> str:
    return f"racer{n:02d}"


def _racer_password(n: int) -> str:
    return f"racer-password-{n:02d}"


def _prepare_racers(tmp_path: Path) -> None:
    """A users file with the racers (telework staff) and their TOTP enrollments."""
    lines = []
    for n in range(RACERS):
        lines += [f"[users.{_racer(n)}]",
                  f"password_hash = {json.dumps(password_hash(_racer_password(n)))}",
                  'groups = ["telework-staff"]']
    users = tmp_path / "racers.toml"
    users.write_text("\n".join(lines) + "\n")
    users.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    store = SecretStore(state)
    for n in range(RACERS):
        store.enroll(_racer(n), operator="test")


@pytest.fixture
async def race(tmp_path: Path) -> AsyncIterator[SshHarness]:
    _prepare_racers(tmp_path)
    async for gw in running_ssh_gateway(
            tmp_path, directory={"file": "racers.toml"},
            sessions={"max_concurrent": SEATS, "per_user": 1},
            ssh={"preauth_per_source": 2 * RACERS, "connect_rate_per_source": 10 * RACERS,
                 "login_grace_time": "20s"}):
        yield gw


async def _https_racer(gw: SshHarness, n: int) -> tuple[str, bool, str]:
    client = gw.https.client()
    status, body, _ = await gw.https.login(client, _racer(n), password=_racer_password(n),
                                           code=gw.code(_racer(n)))
    assert status in (303, 503), (status, body)
    return _racer(n), status == 303, body


async def _ssh_racer(gw: SshHarness, n: int) -> tuple[str, bool, str]:
    user = _racer(n)
    process = await gw.spawn(user, "-N", password=_racer_password(n), code=gw.code(user))
    assert process.stderr is not None
    # Admitted: the session exists and the client stays connected. Refused: ssh exits.
    deadline = time.monotonic() + 30
    while process.returncode is None and time.monotonic() < deadline:
        if any(s.user == user for s in gw.sessions()):
            return user, True, ""
        await asyncio.sleep(0.05)
    if process.returncode is None:
        raise AssertionError(f"{user}: neither admitted nor refused within 30 s")
    return user, False, (await process.stderr.read()).decode(errors="replace")


async def test_twenty_logins_race_for_ten_seats_and_never_get_eleven(race: SshHarness) -> None:
    gw = race
    registry = gw.gateway.sessions
    most = 0

    def watch() -> None:
        nonlocal most
        most = max(most, registry.seats_taken())

    # Seats taken are sampled after every create() call, admitted or refused: the peak.
    original_create = registry.create

    def counting_create(*args: Any, **kwargs: Any) -> Any:
        try:
            return original_create(*args, **kwargs)
        finally:
            watch()

    registry.create = counting_create  # type: ignore[method-assign]
    # SSH logins take longer to reach the password (a process, a key exchange): the browsers
    # start once every SSH client has connected, so that all twenty reach authentication at
    # about the same time, whichever order the machine's load makes.
    assert gw.gateway.ssh is not None
    admission = gw.gateway.ssh.admission
    ssh = [asyncio.create_task(_ssh_racer(gw, n)) for n in range(0, RACERS, 2)]
    await wait_for(lambda: admission.pending + len(gw.sessions()) >= RACERS // 2,
                   "the SSH clients' connections", 60)
    https = [asyncio.create_task(_https_racer(gw, n)) for n in range(1, RACERS, 2)]
    results = await asyncio.gather(*ssh, *https)
    admitted = [user for user, ok, _ in results if ok]
    refused = [(user, text) for user, ok, text in results if not ok]
    assert len(admitted) == SEATS and most == SEATS
    assert registry.seats_taken() == SEATS
    message = seats_full_message(SEATS)
    assert all(message in text for _, text in refused), refused
    failures = gw.audit_events("auth.failure")
    assert sorted(f["user"] for f in failures) == sorted(user for user, _ in refused)
    assert {f["reason"] for f in failures} == {"seats_full"}
    assert sorted(e["user"] for e in gw.audit_events("session.start")) == sorted(admitted)
    # Which frontend wins more seats depends on the machine's load; both took part, and a
    # refusal on either says the same sentence (checked above).
    attempts = gw.audit_events("auth.success") + failures
    assert {e["frontend"] for e in attempts} == {"https", "ssh"} and len(attempts) == RACERS
    text = await scrape(gw.gateway)
    assert metric(text, "gatewayd_seats_limit") == SEATS
    active = sum(metric(text, "gatewayd_sessions_active", f'{{frontend="{f}"}}')
                 for f in ("https", "ssh"))
    assert active == SEATS


# --- seats freed by an SSH disconnect; limits changed by a reload ---------------------------


@pytest.fixture
async def one_ssh_seat(tmp_path: Path) -> AsyncIterator[SshHarness]:
    async for gw in running_ssh_gateway(tmp_path, sessions={"max_concurrent": 1}):
        yield gw


async def test_an_ssh_disconnect_frees_the_seat_at_once(one_ssh_seat: SshHarness) -> None:
    gw = one_ssh_seat
    holder = await gw.spawn("alice", "-N")
    await gw.wait_for_session("alice")
    refused = await gw.run("bob")
    assert refused.returncode == 255 and seats_full_message(1) in refused.stderr
    holder.terminate()  # the client goes away: its TCP connection closes
    await holder.wait()
    await wait_for(lambda: gw.gateway.sessions.seats_taken() == 0, "the seat freed")
    admitted = await gw.spawn("bob", "-N", code=gw.fresh_code("bob"))
    await gw.wait_for_session("bob")
    assert admitted.returncode is None
    ended = [(e["user"], e["reason"]) for e in gw.audit_events("session.end")]
    assert ended == [("alice", "disconnected")]


async def test_a_reload_raises_the_seats_for_the_next_sign_in(two_seats: Harness) -> None:
    gw = two_seats
    await gw.signed_in("alice")
    await gw.signed_in("bob")
    status, _, _ = await gw.login(gw.client(), "carol")
    assert status == 503
    gw.config.write_text(gw.config.read_text().replace("max_concurrent = 2",
                                                       "max_concurrent = 3"))
    assert await gw.gateway.reload()
    assert metric(await scrape(gw.gateway), "gatewayd_seats_limit") == 3
    gw.clock.advance(30)
    status, body, _ = await gw.login(gw.client(), "carol")
    assert status == 303, body
