"""Tests for gatewayd.https.flow: route → decide → audit → deny / step-up / proxy, against a
real gateway and a real upstream on 127.0.0.1 (see https_harness)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from https_harness import REPO, Harness, csrf_token, running_gateway

from gatewayd.certs import issue_device_cert, new_device_ca, save_pair
from gatewayd.https import pages
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
    ("X-Forwarded-Host", "mayor.example"), ("X_Forwarded_Host", "mayor.example"),
    ("X-Forwarded-Proto", "http"), ("Forwarded", "host=mayor.example;proto=http"),
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
    assert headers["x-forwarded-host"] == ["gateway.test"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert "x-gatewayd-anything" not in headers and "x-real-ip" not in headers
    assert not any("mayor" in v or "10.0.0.1" in v for vs in headers.values() for v in vs)


async def test_forwarded_host_is_the_public_host_never_the_clients(gw: Harness) -> None:
    """Upstreams build absolute links (password-reset mails, redirects) from it."""
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/groupware/", headers={
            **JSON, "Host": "attacker.example"}) as resp:
        assert resp.status == 200
        record = await resp.json()
    headers = upstream_headers(record)
    assert headers["x-forwarded-host"] == ["gateway.test"]  # https.public_url of the harness
    assert headers["forwarded"] == ["for=127.0.0.1;host=gateway.test;proto=https"]
    assert (headers["x-forwarded-proto"], headers["x-forwarded-for"]) == (["https"],
                                                                          ["127.0.0.1"])
    assert "attacker" not in json.dumps(headers)


async def test_a_denied_request_is_audited_and_never_proxied(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.post(gw.base + "/approval/requests/42/approve", headers=NAVIGATE) as resp:
        assert resp.status == 403
        page = await resp.text()
        assert "Access denied" in page and pages.GENERIC_DENY_REASON in page
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


async def test_writes_are_audited_before_and_after_the_transfer(gw: Harness) -> None:
    """access.allow is on record when the upstream sees the first byte; access.end has the
    outcome."""
    on_record_at_arrival: list[list[str]] = []
    gw.upstream.on_arrival.append(lambda request: on_record_at_arrival.append(
        [r["event"] for r in gw.audit_events() if r["event"].startswith("access.")]))
    client = await gw.signed_in("bob")
    async with client.get(gw.base + "/files/a.txt", headers=JSON) as resp:
        assert resp.status == 200
    async with client.put(gw.base + "/files/a.txt?lock=token-123", data=b"x" * 1000,
                          headers=JSON) as resp:
        assert resp.status == 200
    assert on_record_at_arrival == [[], ["access.allow"]]  # the GET is not audited
    (allow,) = gw.audit_events("access.allow")
    session = gw.audit_events("session.start")[-1]["session"]
    assert {k: allow.get(k) for k in ("frontend", "rule", "service", "method", "path", "user",
                                      "session", "source_ip", "status")} == {
        "frontend": "https", "rule": "managers-files-write", "service": "files",
        "method": "PUT", "path": "/files/a.txt", "user": "bob", "session": session,
        "source_ip": "127.0.0.1", "status": None}
    (end,) = gw.audit_events("access.end")
    assert end["seq"] > allow["seq"]
    assert (end["method"], end["path"], end["session"], end["rule"]) == (
        "PUT", "/files/a.txt", session, "managers-files-write")
    assert (end["status"], end["bytes_up"], end.get("error")) == (200, 1000, None)
    assert end["bytes_down"] > 0 and end["duration_ms"] >= 0


async def test_every_request_is_audited_when_configured(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, audit={"http_requests": "all"}):
        client = await gw.signed_in("alice")
        async with client.get(gw.base + "/groupware/x?secret=1", headers=JSON) as resp:
            assert resp.status == 200
        allow = gw.audit_events("access.allow")[-1]
        assert (allow["method"], allow["path"]) == ("GET", "/groupware/x")
        end = gw.audit_events("access.end")[-1]
        assert (end["method"], end["path"], end["status"]) == ("GET", "/groupware/x", 200)


def disk_full(fd: int, data: object) -> int:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("kind", ["write", "websocket"])
async def test_an_audited_request_that_cannot_be_recorded_never_reaches_the_upstream(
    gw: Harness, monkeypatch: pytest.MonkeyPatch, kind: str,
) -> None:
    """audit.on_failure = "deny" (the default): no record, no write."""
    client = await gw.signed_in("bob")
    monkeypatch.setattr("os.write", disk_full)  # the audit log's disk is full from now on
    if kind == "write":
        async with client.put(gw.base + "/files/a.txt", data=b"x", headers=JSON) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "audit_unavailable"
    else:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect(gw.base + "/chat/room")
        assert refused.value.status == 503
    monkeypatch.undo()
    assert gw.upstream.seen == [] and gw.upstream.sockets == []


async def test_with_on_failure_continue_writes_go_on_unrecorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for gw in running_gateway(tmp_path, audit={"on_failure": "continue"}):
        client = await gw.signed_in("bob")
        monkeypatch.setattr("os.write", disk_full)
        async with client.put(gw.base + "/files/a.txt", data=b"x", headers=JSON) as resp:
            status = resp.status
        monkeypatch.undo()
        assert status == 200
        assert [r["method"] for r in gw.upstream.seen] == ["PUT"]


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


async def test_a_service_without_upstream_is_a_502(tmp_path: Path) -> None:
    # A service the policy routes and allows, but no [upstreams.intranet] section: the policy
    # set and the config disagree, and the answer says so instead of hanging or a 500.
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "policies" / "50-intranet.yaml").write_text(
        "services:\n  intranet: {kind: http, prefixes: /intranet/}\n"
        "rules:\n  - id: staff-intranet\n    effect: allow\n"
        "    subjects: {roles: [staff]}\n    services: intranet\n")
    async with contextlib.aclosing(running_gateway(tmp_path)) as harnesses:
        async for gw in harnesses:
            client = await gw.signed_in("alice")
            async with client.get(gw.base + "/intranet/", headers=JSON) as resp:
                assert resp.status == 502
                assert (await resp.json())["error"] == "upstream_not_configured"


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
    assert (allow["service"], allow["path"]) == ("chat", "/chat/room")
    end = gw.audit_events("access.end")[-1]
    assert (end["service"], end["status"], end["error"]) == ("chat", 101, "session_ended")
    assert end["bytes_up"] == 2 and end["seq"] > allow["seq"]


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


# --- cross-origin writes and WebSockets ------------------------------------------------------

PUBLIC = "https://gateway.test"  # https.public_url of the harness
HOST_ORIGIN = "{base}"  # the origin the test client connects to: a name, not the public one

REFUSED_ORIGINS = [
    {"Origin": "https://evil.example"},
    {"Origin": "https://wiki.gateway.test"},  # a sibling host: same site, another origin
    {"Origin": "http://gateway.test"},
    {"Origin": "https://gateway.test:8443"},
    {"Origin": "null"},
    {"Origin": HOST_ORIGIN},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # what SameSite=Lax lets through with the cookie
    {"Origin": PUBLIC, "Sec-Fetch-Site": "same-site"},
]
ACCEPTED_ORIGINS = [
    {},  # a WebDAV drive or a script: no browser, no ambient cookie to abuse
    {"Origin": PUBLIC},
    {"Origin": "HTTPS://GATEWAY.TEST/"},
    {"Origin": PUBLIC, "Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},  # typed by the user
]


def with_base(headers: dict[str, str], gw: Harness) -> dict[str, str]:
    return {name: value.format(base=gw.base) for name, value in headers.items()}


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
async def test_a_cross_origin_write_is_refused(gw: Harness, origin: dict[str, str]) -> None:
    client = await gw.signed_in("bob")
    async with client.put(gw.base + "/files/a.txt", data=b"x",
                          headers={**JSON, **with_base(origin, gw)}) as resp:
        assert resp.status == 403
        body = await resp.json()
    assert (body["error"], body["reason"]) == ("cross_origin", "cross_origin")
    assert "another site" in body["message"] and body["detail"]
    assert gw.upstream.seen == []
    deny = gw.audit_events("access.deny")[-1]
    assert {k: deny.get(k) for k in ("reason", "status", "service", "method", "path", "user",
                                     "source_ip", "rule")} == {
        "reason": "cross_origin", "status": 403, "service": "files", "method": "PUT",
        "path": "/files/a.txt", "user": "bob", "source_ip": "127.0.0.1", "rule": None}
    assert gw.audit_events("access.allow") == []


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/groupware/mail/send"), ("PATCH", "/groupware/schedule/3"),
    ("DELETE", "/files/a.txt"), ("MKCOL", "/files/new/"), ("PROPPATCH", "/files/a.txt"),
    ("MOVE", "/files/a.txt"), ("COPY", "/files/a.txt"), ("LOCK", "/files/a.txt"),
])
async def test_every_state_changing_method_is_checked(gw: Harness, method: str, path: str
                                                      ) -> None:
    client = await gw.signed_in("bob")
    async with client.request(method, gw.base + path,
                              headers={**JSON, "Sec-Fetch-Site": "same-site"}) as resp:
        assert resp.status == 403
        assert (await resp.json())["reason"] == "cross_origin"
    assert gw.upstream.seen == []


@pytest.mark.parametrize("origin", ACCEPTED_ORIGINS)
async def test_same_origin_and_non_browser_writes_pass(gw: Harness, origin: dict[str, str]
                                                       ) -> None:
    client = await gw.signed_in("bob")
    async with client.put(gw.base + "/files/a.txt", data=b"x",
                          headers={**JSON, **origin}) as resp:
        assert resp.status == 200
    assert [r["method"] for r in gw.upstream.seen] == ["PUT"]


async def test_cross_site_reads_still_open(gw: Harness) -> None:
    """A link from another site to a page behind the gateway works, as with SameSite=Lax."""
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/groupware/", headers={
            **NAVIGATE, "Sec-Fetch-Site": "cross-site"}) as resp:
        assert resp.status == 200


async def test_a_cross_origin_form_post_gets_a_page_that_says_why(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    async with client.post(gw.base + "/groupware/mail/send", data={"to": "all"}, headers={
            **NAVIGATE, "Origin": "https://evil.example"}) as resp:
        assert resp.status == 403
        assert "sent from another site" in await resp.text()
        assert resp.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("origin", ["https://evil.example", "https://chat.gateway.test",
                                    HOST_ORIGIN, "null"])
async def test_a_websocket_from_another_origin_is_refused_before_the_upgrade(
    gw: Harness, origin: str
) -> None:
    """Cross-Site WebSocket Hijacking: browsers always send Origin on a WebSocket."""
    client = await gw.signed_in("alice")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(gw.base + "/chat/room", origin=origin.format(base=gw.base))
    assert refused.value.status == 403
    assert gw.upstream.sockets == []
    deny = gw.audit_events("access.deny")[-1]
    assert (deny["reason"], deny["service"], deny["path"]) == ("cross_origin", "chat",
                                                               "/chat/room")
    ws = await client.ws_connect(gw.base + "/chat/room", origin=PUBLIC)
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "echo:hi"
    await ws.close()


async def test_a_same_site_websocket_is_refused(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(gw.base + "/chat/room", headers={"Sec-Fetch-Site": "same-site"})
    assert refused.value.status == 403
    assert gw.upstream.sockets == []


async def test_a_read_only_rule_allows_no_websocket(gw: Harness) -> None:
    """staff-files-read is read-only; a WebSocket is a write channel."""
    alice = await gw.signed_in("alice")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await alice.ws_connect(gw.base + "/files/live", headers=JSON)
    assert refused.value.status == 403
    assert gw.upstream.sockets == []
    deny = gw.audit_events("access.deny")[-1]
    assert (deny["rule"], deny["path"], deny["status"]) == ("staff-files-read", "/files/live",
                                                            403)
    assert "WebSocket" in deny["reason"]
    bob = await gw.signed_in("bob")  # managers-files-write is not read-only
    ws = await bob.ws_connect(gw.base + "/files/live")
    await ws.close()
    assert len(gw.upstream.sockets) == 1


# --- who and from where: the context of access records ------------------------------------------


async def test_access_records_name_this_requests_address_not_the_logins(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    (session,) = gw.gateway.sessions.sessions()
    # As if bob had signed in from another network and his laptop had moved since: the
    # session remembers where it began, each request record says where it came from.
    session.source_ip = "192.0.2.7"
    async with client.put(gw.base + "/files/a.txt", data=b"x", headers=JSON) as resp:
        assert resp.status == 200
    async with client.post(gw.base + "/groupware/x", headers={**JSON, "Origin": "null"}):
        pass
    async with client.delete(gw.base + "/approval/requests/1", headers=JSON) as resp:
        assert resp.status == 403
    gw.clock.advance(6 * 60)
    async with client.post(gw.base + "/approval/requests/1/approve", headers=JSON) as resp:
        assert resp.status == 401
    records = [r for r in gw.audit_events() if r["event"].startswith("access.")]
    assert [r["event"] for r in records] == ["access.allow", "access.end", "access.deny",
                                             "access.deny", "access.step_up"]
    assert {r["source_ip"] for r in records} == {"127.0.0.1"}


@pytest.fixture
def bobs_pc(tmp_path: Path) -> tuple[Path, tuple[Path, Path]]:
    ca = new_device_ca()
    pki = tmp_path / "pki"
    pki.mkdir()
    save_pair(ca, pki, "device-ca")
    pc = save_pair(issue_device_cert(ca, "pc-0099", "bob"), pki, "pc-0099")
    return pki / "device-ca.crt", (pc.cert, pc.key)


async def test_every_record_of_a_device_session_names_the_device(
    tmp_path: Path, bobs_pc: tuple[Path, tuple[Path, Path]]
) -> None:
    ca_file, cert = bobs_pc
    https = {"client_cert": "optional", "client_ca_file": str(ca_file)}
    async for gw in running_gateway(tmp_path / "gw", https=https):
        client = await gw.signed_in("bob", cert=cert)
        async with client.put(gw.base + "/files/a.txt", data=b"x", headers=JSON) as resp:
            assert resp.status == 200
        async with client.put(gw.base + "/files/a.txt", headers={
                **JSON, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
        ws = await client.ws_connect(gw.base + "/chat/room")
        await ws.close()
        gw.clock.advance(6 * 60)
        async with client.post(gw.base + "/approval/requests/1/approve", headers=JSON) as resp:
            assert resp.status == 401
        async with client.get(gw.base + "/.gatewayd/logout") as resp:
            token = csrf_token(await resp.text())
        async with client.post(gw.base + "/.gatewayd/logout", data={"csrf_token": token},
                               headers={"Origin": gw.base}, allow_redirects=False):
            pass
        await asyncio.sleep(0.1)
        records = [r for r in gw.audit_events()
                   if r["event"].startswith(("access.", "session."))]
        assert sorted({r["event"] for r in records}) == [
            "access.allow", "access.deny", "access.end", "access.step_up", "session.end",
            "session.start"]
        assert [r["event"] for r in records if r.get("device") != "pc-0099"] == []


# --- Expect: 100-continue ---------------------------------------------------------------------


async def exchange(gw: Harness, method: str, path: str, *, headers: dict[str, str],
                   length: int = 10) -> tuple[list[int], int]:
    """Send a request head with ``Expect: 100-continue`` over a raw TLS socket and the body
    only when invited; returns (interim statuses, final status)."""
    host, port = gw.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=gw.ssl_context())
    lines = [f"{method} {path} HTTP/1.1", f"Host: {gw.host}", f"Content-Length: {length}",
             *(f"{name}: {value}" for name, value in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    interim: list[int] = []
    try:
        async with asyncio.timeout(5):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split()[1])
                if status != 100:
                    return interim, status
                interim.append(status)
                writer.write(b"x" * length)
    finally:
        writer.close()


def session_cookie(client: aiohttp.ClientSession) -> dict[str, str]:
    value = next(c.value for c in client.cookie_jar if c.key == "__Host-gatewayd_session")
    return {"Cookie": f"__Host-gatewayd_session={value}"}


CONTINUE = {"Expect": "100-continue"}


@pytest.mark.parametrize(("user", "method", "path", "extra", "length", "status"), [
    (None, "PUT", "/files/a.txt", JSON, 10, 401),                 # signed out: a script
    (None, "POST", "/groupware/x", NAVIGATE, 10, 303),            # signed out: a browser
    ("alice", "PUT", "/files/a.txt", JSON, 10, 403),              # read-only rule
    ("alice", "POST", "/approval/requests/1/approve", JSON, 10, 403),  # no rule
    ("bob", "PUT", "/files/a.txt", {"Origin": "https://evil.example"}, 10, 403),
    ("bob", "POST", "/approval/requests/1/approve", JSON, 2 * 1024**2, 413),  # max_upload
])
async def test_a_refused_client_is_never_invited_to_send_its_body(
    gw: Harness, user: str | None, method: str, path: str, extra: dict[str, str], length: int,
    status: int,
) -> None:
    cookie = session_cookie(await gw.signed_in(user)) if user else {}
    interim, final = await exchange(gw, method, path, headers={**CONTINUE, **extra, **cookie},
                                    length=length)
    assert (interim, final) == ([], status)
    assert gw.upstream.seen == []


async def test_an_allowed_upload_is_invited_after_the_decision_and_the_record(gw: Harness
                                                                             ) -> None:
    cookie = session_cookie(await gw.signed_in("bob"))
    interim, final = await exchange(gw, "PUT", "/files/a.txt",
                                    headers={**CONTINUE, **JSON, **cookie}, length=10)
    assert (interim, final) == ([100], 200)
    assert [(r["method"], r["body_bytes"]) for r in gw.upstream.seen] == [("PUT", 10)]
    assert "expect" not in upstream_headers(gw.upstream.seen[0])  # a hop-by-hop matter
    assert gw.audit_events("access.end")[-1]["bytes_up"] == 10


async def test_an_unknown_expectation_is_417(gw: Harness) -> None:
    cookie = session_cookie(await gw.signed_in("bob"))
    interim, final = await exchange(gw, "PUT", "/files/a.txt",
                                    headers={"Expect": "lunch", **JSON, **cookie})
    assert (interim, final) == ([], 417)
    assert gw.upstream.seen == []
