"""Tests for gatewayd.https.login: sign-in, step-up and sign-out against a real gateway over
HTTPS on 127.0.0.1 (see https_harness)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from https_harness import USERS, Harness, csrf_token, running_gateway
from yarl import URL


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


def masked(html: str) -> str:
    """The page without its CSRF token (the one part that differs by design)."""
    return re.sub(r'name="csrf_token" value="[^"]+"', 'name="csrf_token" value=""', html)


async def test_login_sets_a_fresh_session_cookie_and_goes_to_next(gw: Harness) -> None:
    client = gw.client()
    status, _, resp = await gw.login(client, "alice", next_path="/groupware/mail")
    assert status == 303
    assert resp.headers["Location"] == "/groupware/mail"
    cookies = resp.headers.getall("Set-Cookie")
    session = [c for c in cookies if c.startswith("__Host-gatewayd_session=")]
    assert len(session) == 1
    flags = {part.strip().lower() for part in session[0].split(";")[1:]}
    assert flags == {"path=/", "secure", "httponly", "samesite=lax"}
    value = session[0].split(";")[0].split("=", 1)[1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", value)  # 256 bits, URL-safe
    assert any(c.startswith("__Host-gatewayd_csrf=;") and "Max-Age=0" in c for c in cookies)
    events = [e["event"] for e in gw.audit_events()]
    assert events.index("auth.success") < events.index("session.start")
    success = gw.audit_events("auth.success")[-1]
    assert success["user"] == "alice" and success["frontend"] == "https"
    assert "password" not in str(gw.audit_events()) and USERS["alice"][0] not in str(
        gw.audit_events())


WRONG_FACTORS = {
    # name: (typed user name, password or None for the right one, code: None right, "bob" his)
    "wrong password": ("alice", "not-the-password", None),
    "wrong code": ("alice", None, "000000"),
    "code of another user": ("alice", None, "bob"),
    "empty code": ("alice", None, ""),
    "letters as code": ("alice", None, "abcdef"),
    "empty password": ("alice", "", None),
    "password of another user": ("alice", USERS["bob"][0], None),
    "unknown user": ("mallory", "whatever-password", None),
    "disabled user": ("dave", None, None),
    "user with a control character": ("alice\x01", None, None),
}


async def test_every_wrong_factor_gets_the_same_answer(gw: Harness) -> None:
    answers = set()
    for name, (user, typed_password, typed_code) in WRONG_FACTORS.items():
        client = gw.client()
        code = typed_code
        if typed_code == "bob":
            code = gw.code("bob")
        if typed_code is None:
            code = gw.code("alice" if user not in USERS else user)
        password = typed_password
        if typed_password is None:
            password = USERS.get(user, USERS["alice"])[0]
        status, body, resp = await gw.login(client, user, password=password, code=code)
        assert status == 401, name
        assert not any(c.startswith("__Host-gatewayd_session")
                       for c in resp.headers.getall("Set-Cookie", []))
        answers.add((status, re.sub(r'name="username" value="[^"]*"', "", masked(body))))
    assert len(answers) == 1
    assert "The user name, password or code is not correct." in answers.pop()[1]
    reasons = {f["reason"] for f in gw.audit_events("auth.failure")}
    assert reasons >= {"bad_password", "bad_code", "unknown_or_disabled_user"}


async def test_a_name_that_is_no_account_is_not_audited(gw: Harness) -> None:
    """People type their password into the user-name field; the audit log keeps it for years."""
    typed = "Tr0ub4dor&3-typed-as-name"
    status, _, _ = await gw.login(gw.client(), typed, password="x", code="000000")
    assert status == 401
    failure = gw.audit_events("auth.failure")[-1]
    assert failure["reason"] == "unknown_or_disabled_user" and "user" not in failure
    assert typed not in gw.gateway.settings.audit.path.read_text()
    status, _, _ = await gw.login(gw.client(), "ALICE", password="wrong-password")
    assert gw.audit_events("auth.failure")[-1]["user"] == "alice"  # real accounts: canonical


async def test_a_replayed_code_gets_the_generic_answer(gw: Harness) -> None:
    code = gw.code("alice")
    assert (await gw.login(gw.client(), "alice", code=code))[0] == 303
    gw.clock.advance(5)
    status, body, _ = await gw.login(gw.client(), "alice", code=code)
    assert status == 401 and "The user name, password or code is not correct." in body
    assert gw.audit_events("auth.failure")[-1]["reason"] == "replayed_code"


async def test_lockout_and_release(tmp_path: Path) -> None:
    overrides = {"login": {"failures_before_backoff": 10, "lockout_after": 3,
                           "lockout_duration": "10m"}}
    async for gw in running_gateway(tmp_path, **overrides):
        for _ in range(3):
            assert (await gw.login(gw.client(), "bob", password="wrong-password-x"))[0] == 401
        status, body, resp = await gw.login(gw.client(), "bob")  # right password, too late
        assert status == 429 and int(resp.headers["Retry-After"]) > 0
        assert "Too many failed attempts" in body
        assert [e["user"] for e in gw.audit_events("auth.locked")][-1] == "bob"
        gw.clock.advance(11 * 60)
        assert (await gw.login(gw.client(), "bob"))[0] == 303


@pytest.mark.parametrize(("headers", "token"), [
    ({"Origin": "https://evil.example"}, "valid"),
    ({"Origin": "null"}, "valid"),
    ({"Origin": None, "Sec-Fetch-Site": "cross-site"}, "valid"),
    ({}, "missing"),
    ({}, "forged"),
    ({}, "another browser"),
])
async def test_login_csrf_is_refused(gw: Harness, headers: dict[str, str | None], token: str
                                     ) -> None:
    client = gw.client()
    valid = await gw.login_form(client)
    tokens = {"valid": valid, "missing": "", "forged": "v1.1." + "A" * 43,
              "another browser": await gw.login_form(gw.client())}
    form = {"username": "alice", "password": USERS["alice"][0], "code": gw.code("alice"),
            "csrf_token": tokens[token], "next": "/"}
    sent = {"Origin": gw.base, **headers}
    async with client.post(gw.base + "/.gatewayd/login", data=form, allow_redirects=False,
                           headers={k: v for k, v in sent.items() if v is not None}) as resp:
        assert resp.status == 403
        assert "__Host-gatewayd_session" not in str(resp.headers.getall("Set-Cookie", []))
    assert gw.gateway.sessions.active() == 0


@pytest.mark.parametrize("next_path", [
    "//evil.example/", "https://evil.example/", "/\\evil.example", "/%2F%2Fevil.example",
    "javascript:alert(1)", "/\t/evil.example", "/.gatewayd/login",
])
async def test_next_never_leaves_the_gateway(gw: Harness, next_path: str) -> None:
    client = gw.client()
    async with client.get(gw.base + "/.gatewayd/login", params={"next": next_path}) as resp:
        assert 'name="next" value="/"' in await resp.text()
    status, _, resp = await gw.login(client, "alice", next_path=next_path)
    assert status == 303 and resp.headers["Location"] == "/"


async def test_a_preset_cookie_is_never_adopted(gw: Harness) -> None:
    """Session fixation: an attacker-chosen cookie value stays worthless after the login."""
    planted = "A" * 43
    client = gw.client()
    client.cookie_jar.update_cookies({"__Host-gatewayd_session": planted})
    status, _, resp = await gw.login(client, "alice")
    assert status == 303
    issued = [c for c in resp.headers.getall("Set-Cookie") if c.startswith("__Host-gatewayd_s")]
    assert planted not in issued[0]
    attacker = gw.client()
    attacker.cookie_jar.update_cookies({"__Host-gatewayd_session": planted})
    async with attacker.get(gw.base + "/.gatewayd/userinfo") as r:
        assert r.status == 401


async def test_signing_in_again_ends_the_old_session(gw: Harness) -> None:
    first = await gw.signed_in("alice")
    cookie = next(c.value for c in first.cookie_jar if c.key == "__Host-gatewayd_session")
    gw.clock.advance(31)
    client = gw.client()
    token = await gw.login_form(client)  # (a signed-in browser is sent past the form)
    client.cookie_jar.update_cookies({"__Host-gatewayd_session": cookie}, URL(gw.base))
    assert (await gw.login(client, "alice", token=token))[0] == 303
    assert gw.gateway.sessions.active() == 1
    assert gw.audit_events("session.end")[-1]["reason"] == "logout"


async def test_logout_ends_the_session_server_side(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    stolen = next(c.value for c in client.cookie_jar if c.key == "__Host-gatewayd_session")
    async with client.get(gw.base + "/.gatewayd/logout") as resp:
        assert resp.status == 200
        token = csrf_token(await resp.text())
    assert gw.gateway.sessions.active() == 1  # GET only asks
    async with client.post(gw.base + "/.gatewayd/logout", data={"csrf_token": token},
                           headers={"Origin": gw.base}, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/.gatewayd/login?signed_out=1"
        assert resp.headers["Clear-Site-Data"] == '"cache", "cookies", "storage"'
        assert any("Max-Age=0" in c for c in resp.headers.getall("Set-Cookie"))
    assert gw.gateway.sessions.active() == 0
    replay = gw.client()
    replay.cookie_jar.update_cookies({"__Host-gatewayd_session": stolen})
    async with replay.get(gw.base + "/groupware/", headers={"Accept": "application/json"}) as r:
        assert r.status == 401
    end = gw.audit_events("session.end")[-1]
    assert end["reason"] == "logout" and end["user"] == "alice" and "duration_ms" in end


async def test_logout_without_a_valid_token_is_refused(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.post(gw.base + "/.gatewayd/logout", data={"csrf_token": "x"},
                           headers={"Origin": gw.base}, allow_redirects=False) as resp:
        assert resp.status == 403
    assert gw.gateway.sessions.active() == 1


async def test_login_fails_closed_when_the_audit_log_cannot_be_written(
    gw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = gw.client()
    token = await gw.login_form(client)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    status, _, _ = await gw.login(client, "alice", token=token)
    monkeypatch.undo()
    assert status == 503
    assert gw.gateway.sessions.active() == 0


async def test_the_seat_limit_is_a_clear_refusal(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, sessions={"max_concurrent": 1}):
        await gw.signed_in("alice")
        status, body, _ = await gw.login(gw.client(), "bob")
        assert status == 503 and "All 1 seats are in use; try again later." in body
        assert gw.audit_events("auth.failure")[-1]["reason"] == "seats_full"


async def test_newest_login_wins_over_a_lost_session(tmp_path: Path) -> None:
    """per_user = 1: a browser that crashed must not lock its user out until the idle timeout."""
    async for gw in running_gateway(tmp_path, sessions={"per_user": 1}):
        first = await gw.signed_in("alice")
        gw.clock.advance(31)  # a new code step: each code works once
        second = await gw.signed_in("alice")
        async with second.get(gw.base + "/groupware/", allow_redirects=False) as resp:
            assert resp.status == 200
        async with first.get(gw.base + "/groupware/", allow_redirects=False,
                             headers={"Accept": "application/json"}) as resp:
            assert resp.status == 401
        ends = [e for e in gw.audit_events("session.end") if e["user"] == "alice"]
        assert [e["reason"] for e in ends] == ["replaced"]


async def test_step_up_gives_a_new_session_id_and_the_old_one_stops_working(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    cookie = "__Host-gatewayd_session"
    before = next(c.value for c in client.cookie_jar if c.key == cookie)
    gw.clock.advance(6 * 60)
    async with client.get(gw.base + "/.gatewayd/stepup?next=/approval/") as resp:
        token = csrf_token(await resp.text(), "/.gatewayd/stepup")
    async with client.post(gw.base + "/.gatewayd/stepup", allow_redirects=False,
                           headers={"Origin": gw.base},
                           data={"code": gw.code("bob"), "csrf_token": token,
                                 "next": "/approval/"}) as resp:
        assert resp.status == 303
        after = resp.cookies[cookie].value
    assert after != before
    handles = {e["session"] for e in gw.audit_events() if e.get("user") == "bob" and "session" in e}
    assert len(handles) == 1  # the audit trail still sees one session
    stale = gw.client()
    stale.cookie_jar.update_cookies({cookie: before}, URL(gw.base))
    async with stale.get(gw.base + "/approval/", headers={"Accept": "application/json"},
                         allow_redirects=False) as resp:
        assert resp.status == 401
    async with client.get(gw.base + "/approval/", allow_redirects=False) as resp:
        assert resp.status == 200


async def test_the_login_form_invites_its_body_with_100_continue(gw: Harness) -> None:
    """The routes never send 100 up front (proxy.defer_continue); a form handler that reads its
    body sends it, so curl does not sit out its one-second Expect timeout at every sign-in."""
    host, port = gw.host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=gw.ssl_context(),
                                                   server_hostname="localhost")
    body = b"username=alice&password=x&code=000000&csrf_token=t&next=%2F"
    writer.write(b"POST /.gatewayd/login HTTP/1.1\r\nHost: " + gw.host.encode() + b"\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert final.startswith(b"HTTP/1.1 403")  # the forged CSRF token, judged after the body
    writer.close()
