"""Tests for gatewayd.https.flow: route → decide → audit → deny / step-up / proxy, against a
real gateway and a real upstream on 127.0.0.1 (see https_harness)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from https_harness import Harness, csrf_token, running_gateway

from gatewayd.https.assertion import verify_assertion

JSON = {"Accept": "application/json"}
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


def upstream_headers(record: dict[str, Any]) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in record["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return headers


async def test_an_allowed_request_reaches_the_upstream_with_identity(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/groupware/mail?folder=inbox", headers=JSON) as resp:
        assert resp.status == 200
        record = await resp.json()
        assert "no-store" in resp.headers["Cache-Control"]  # the upstream said nothing
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert record["path"] == "/groupware/mail?folder=inbox"
    headers = upstream_headers(record)
    assert headers["x-gatewayd-user"] == ["alice"]
    assert headers["x-gatewayd-groups"] == ["telework-staff"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert "__Host-gatewayd_session" not in str(headers.get("cookie"))
    claims = verify_assertion(headers["x-gatewayd-assertion"][0], gw.gateway.signer.jwks(),
                              issuer="https://gateway.test", audience="groupware",
                              now=gw.clock.wall.timestamp())
    assert claims["sub"] == "alice"
    async with client.get(gw.base + "/.gatewayd/jwks.json") as resp:
        assert await resp.json() == gw.gateway.signer.jwks()


async def assertion_of(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url, headers=JSON) as resp:
        assert resp.status == 200
        record = await resp.json()
    token: str = upstream_headers(record)["x-gatewayd-assertion"][0]
    return token


async def test_the_assertion_is_reused_per_session_and_never_across_users(gw: Harness) -> None:
    """Signed once per (session, service, device), renewed with 15 s left, never shared."""
    alice = await gw.signed_in("alice")
    first = await assertion_of(alice, gw.base + "/groupware/a")
    assert await assertion_of(alice, gw.base + "/groupware/b") == first
    bob = await gw.signed_in("bob")
    bobs = await assertion_of(bob, gw.base + "/groupware/a")
    claims = verify_assertion(bobs, gw.gateway.signer.jwks(), issuer="https://gateway.test",
                              audience="groupware", now=gw.clock.wall.timestamp())
    assert claims["sub"] == "bob" and bobs != first
    gw.clock.advance(31)  # a TOTP code works once: the next login needs the next one
    other_session = await gw.signed_in("alice")
    assert await assertion_of(other_session, gw.base + "/groupware/a") != first
    assert await assertion_of(alice, gw.base + "/groupware/a") == first  # 29 s left
    gw.clock.advance(15)  # less than 15 s of the 60 s lifetime left: a new one
    renewed = await assertion_of(alice, gw.base + "/groupware/a")
    assert renewed != first
    claims = verify_assertion(renewed, gw.gateway.signer.jwks(), issuer="https://gateway.test",
                              audience="groupware", now=gw.clock.wall.timestamp(), leeway=0)
    assert claims["sub"] == "alice" and claims["exp"] - gw.clock.wall.timestamp() >= 59


SPOOFS = [
    ("X-Gatewayd-User", "mayor"), ("x-gatewayd-user", "mayor"), ("X_Gatewayd_User", "mayor"),
    ("X-GATEWAYD-GROUPS", "telework-managers"), ("x-gatewayd-anything", "1"),
    ("X-Gatewayd-Assertion", "eyJ.forged.jwt"), ("X-Forwarded-For", "10.0.0.1"),
    ("X-Real-IP", "10.0.0.1"), ("Forwarded", "for=10.0.0.1"),
]


async def test_spoofed_identity_headers_reach_no_upstream(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/groupware/", headers=[*SPOOFS, *SPOOFS,
                                                            ("Accept", "application/json")]
                          ) as resp:
        record = await resp.json()
    headers = upstream_headers(record)
    assert headers["x-gatewayd-user"] == ["alice"]
    assert headers["x-gatewayd-groups"] == ["telework-staff"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert "x-gatewayd-anything" not in headers and "x-real-ip" not in headers
    assert not any("mayor" in v or "10.0.0.1" in v for vs in headers.values() for v in vs)


async def test_a_denied_request_is_audited_and_never_proxied(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.post(gw.base + "/approval/requests/42/approve", headers=NAVIGATE) as resp:
        assert resp.status == 403
        page = await resp.text()
        assert "Access denied" in page and "no rule allows this" in page
        assert resp.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    async with client.post(gw.base + "/approval/requests/42/approve", headers=JSON) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "forbidden"
    assert gw.upstream.seen == []
    deny = gw.audit_events("access.deny")[-1]
    assert (deny["user"], deny["service"], deny["method"], deny["path"], deny["status"]) == (
        "alice", "approval", "POST", "/approval/requests/42/approve", 403)


# Attempts to reach /files/**/.git/** (denied by no-version-control-metadata) for alice, who
# may read /files/ otherwise. None may reach the upstream.
BYPASSES = [
    "/files/repo/.git/config",
    "/files/repo/.GIT/config",
    "/files/repo/.Git/config",
    "/files/repo/%2egit/config",
    "/files/repo/%2Egit/config",
    "/files/repo/.gi%74/config",
    "/files/repo/.git%2fconfig",
    "/files/repo/.git%2Fconfig",
    "/files/repo//.git/config",
    "/files/repo/./.git/config",
    "/files/repo/x/../.git/config",
    "/files/repo/x/%2e%2e/.git/config",
    "/files/repo/.git;/config",
    "/files/repo/.git;x=1/config",
    "/files/repo/.git%00/config",
    "/files/repo/%252egit/config",
    "/files/repo\\.git\\config",
    "/files/repo/.git%5cconfig",
    "/files/repo/.git./config",
    "/files/repo/.git%20/config",
    "/files/repo/.git/config#",
    "/files//repo/.git/config",
    "/FILES/repo/.git/config",
]


@pytest.mark.parametrize("path", BYPASSES)
async def test_path_tricks_never_reach_a_denied_path(gw: Harness, path: str) -> None:
    client = await gw.signed_in("alice")
    async with client.get(aiohttp.client.URL(gw.base + path, encoded=True),
                          headers=JSON) as resp:
        assert resp.status in (400, 403, 404), await resp.text()
    assert gw.upstream.seen == []


async def test_reads_are_allowed_where_writes_are_not(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/files/shared/report.txt", headers=JSON) as resp:
        assert resp.status == 200
    async with client.put(gw.base + "/files/shared/report.txt", data=b"x", headers=JSON) as resp:
        assert resp.status == 403
    assert [r["method"] for r in gw.upstream.seen] == ["GET"]


async def test_writes_are_audited_with_status_and_bytes(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    async with client.get(gw.base + "/files/a.txt", headers=JSON) as resp:
        assert resp.status == 200
    async with client.put(gw.base + "/files/a.txt", data=b"x" * 1000, headers=JSON) as resp:
        assert resp.status == 200
    allows = gw.audit_events("access.allow")
    assert [(a["method"], a["status"], a["bytes_up"]) for a in allows] == [("PUT", 200, 1000)]
    assert allows[0]["rule"] == "managers-files-write" and allows[0]["user"] == "bob"
    assert "duration_ms" in allows[0]


async def test_every_request_is_audited_when_configured(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, audit={"http_requests": "all"}):
        client = await gw.signed_in("alice")
        async with client.get(gw.base + "/groupware/x?secret=1", headers=JSON) as resp:
            assert resp.status == 200
        allow = gw.audit_events("access.allow")[-1]
        assert (allow["method"], allow["path"], allow["status"]) == ("GET", "/groupware/x", 200)


async def test_max_upload_is_enforced(gw: Harness) -> None:
    client = await gw.signed_in("bob")  # managers-approve: max_upload 1MiB
    async with client.post(gw.base + "/approval/requests/1/approve", data=b"x" * (2 * 1024**2),
                           headers=JSON) as resp:
        assert resp.status == 413
    async with client.post(gw.base + "/approval/requests/1/approve", data=b"ok",
                           headers=JSON) as resp:
        assert resp.status == 200
    assert [r["body_bytes"] for r in gw.upstream.seen] == [2]


async def test_step_up_flow_returns_to_the_page_and_allows_the_action(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    gw.clock.advance(6 * 60)  # the approve rule wants MFA from the last 5 minutes
    url = gw.base + "/approval/requests/7/approve"
    async with client.post(url, headers=JSON) as resp:
        assert resp.status == 401
        body = await resp.json()
        assert body["error"] == "step_up_required"
    page = gw.base + "/approval/requests/7"
    async with client.post(url, headers={**NAVIGATE, "Referer": page},
                           allow_redirects=False) as resp:
        assert resp.status == 303
        target = resp.headers["Location"]
        assert target == "/.gatewayd/stepup?next=%2Fapproval%2Frequests%2F7"
    assert body["step_up_url"].startswith("/.gatewayd/stepup?next=")
    assert gw.audit_events("access.step_up")[-1]["rule"] == "managers-approve"
    async with client.get(gw.base + target) as resp:
        token = csrf_token(await resp.text(), "/.gatewayd/stepup")
    async with client.post(gw.base + "/.gatewayd/stepup", allow_redirects=False,
                           headers={"Origin": gw.base},
                           data={"code": "123456", "csrf_token": token,
                                 "next": "/approval/requests/7"}) as resp:
        assert resp.status == 401  # a wrong code
    async with client.post(gw.base + "/.gatewayd/stepup", allow_redirects=False,
                           headers={"Origin": gw.base},
                           data={"code": gw.code("bob"), "csrf_token": token,
                                 "next": "/approval/requests/7"}) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/approval/requests/7"
    async with client.post(url, headers=JSON) as resp:
        assert resp.status == 200
    success = gw.audit_events("auth.success")[-1]
    assert success["reason"] == "step_up" and success["user"] == "bob"


async def test_a_get_that_needs_step_up_redirects_with_the_url_itself(gw: Harness) -> None:
    client = await gw.signed_in("carol")  # the admin console wants MFA from 15 minutes
    for _ in range(2):  # active (not idle), but the MFA is 16 minutes old
        gw.clock.advance(8 * 60)
        async with client.get(gw.base + "/.gatewayd/userinfo") as resp:
            assert resp.status == 200
    async with client.get(gw.base + "/.gatewayd/admin/sessions?x=1", headers=NAVIGATE,
                          allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == (
            "/.gatewayd/stepup?next=%2F.gatewayd%2Fadmin%2Fsessions%3Fx%3D1")


async def test_a_service_without_upstream_is_a_502(gw: Harness) -> None:
    client = await gw.signed_in("carol")  # admin: allowed, but no upstream configured
    async with client.get(gw.base + "/.gatewayd/admin/", headers=JSON) as resp:
        assert resp.status == 502


async def test_unrouted_and_ambiguous_paths(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/nowhere/", headers=JSON) as resp:
        assert resp.status == 404
    async with client.get(aiohttp.client.URL(gw.base + "/groupware/%2e%2e/x", encoded=True),
                          headers=JSON) as resp:
        assert resp.status == 400


async def test_decisions_are_counted(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/groupware/", headers=JSON):
        pass
    async with client.delete(gw.base + "/groupware/", headers=JSON):
        pass
    assert gw.gateway.listeners.metrics_url is not None
    async with aiohttp.ClientSession() as plain, plain.get(gw.gateway.listeners.metrics_url) as r:
        text = await r.text()
    assert 'gatewayd_policy_decisions_total{decision="allow",frontend="https",service="groupware"} 2.0' in text
    assert 'gatewayd_sessions_active{frontend="https"} 1.0' in text
    assert 'gatewayd_auth_attempts_total{frontend="https",result="success"} 1.0' in text
    assert 'gatewayd_proxy_request_duration_seconds_count{service="groupware"} 2.0' in text


async def open_chat(client: aiohttp.ClientSession, gw: Harness) -> aiohttp.ClientWebSocketResponse:
    ws = await client.ws_connect(gw.base + "/chat/room")
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "echo:hi"
    return ws


async def test_websocket_closes_on_logout(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    ws = await open_chat(client, gw)
    async with client.get(gw.base + "/.gatewayd/logout") as resp:
        token = csrf_token(await resp.text())
    async with client.post(gw.base + "/.gatewayd/logout", data={"csrf_token": token},
                           headers={"Origin": gw.base}, allow_redirects=False):
        pass
    message = await ws.receive(timeout=5)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    await asyncio.sleep(0.1)
    allow = gw.audit_events("access.allow")[-1]
    assert allow["service"] == "chat" and allow["status"] == 101


async def test_websocket_closes_on_kill(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    ws = await open_chat(client, gw)
    assert gw.gateway.sessions.end_user("alice", "admin_kill") == 1
    await ws.receive(timeout=5)
    assert ws.closed and ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_websocket_closes_when_a_reload_denies_it(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    ws = await open_chat(client, gw)
    (gw.config.parent / "policies" / "95-no-chat.yaml").write_text(
        "rules:\n  - id: chat-off\n    effect: deny\n    subjects: '*'\n    services: chat\n")
    assert await gw.gateway.reload()
    await ws.receive(timeout=5)
    assert ws.closed and ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert json.dumps(gw.audit_events("session.end")) == "[]"  # the session itself goes on


async def test_proxied_pages_keep_their_own_security_headers(gw: Harness) -> None:
    """The gateway's strict page CSP must not replace an upstream's (it broke the chat app)."""
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/groupware/") as resp:
        assert resp.status == 200
        assert "Content-Security-Policy" not in resp.headers  # the echo upstream sets none
        assert resp.headers["Cache-Control"] == "no-store"  # but nothing protected is cached
    async with client.get(gw.base + "/") as resp:  # the gateway's own portal page
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
