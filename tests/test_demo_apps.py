"""Tests for gatewayd.demo_apps: the four demo upstreams on real loopback sockets, their
``whoami`` reports and assertion verification (static, URL and late-bound JWKS)."""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from multidict import CIMultiDict
from yarl import URL

from gatewayd.demo_apps import (
    DEMO_TCP_DESTINATIONS,
    JWKS_REFRESH_INTERVAL,
    SERVICES,
    DemoApps,
    start_demo_apps,
)
from gatewayd.https.assertion import AssertionSigner, b64url_encode
from gatewayd.identity.principal import Principal

ISSUER = "https://gw.test:8443"
T0 = 1_775_000_000.0
DAV = "{DAV:}"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def new_signer(clock: Clock, issuer: str = ISSUER) -> AssertionSigner:
    return AssertionSigner(ec.generate_private_key(ec.SECP256R1()), issuer=issuer, clock=clock)


ALICE = Principal("alice", frozenset({"telework-staff"}))
BOB = Principal("bob", frozenset({"telework-managers"}))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def signer(signing_key: ec.EllipticCurvePrivateKey, clock: Clock) -> AssertionSigner:
    return AssertionSigner(signing_key, issuer=ISSUER, clock=clock)


@pytest.fixture
async def apps(signer: AssertionSigner, clock: Clock) -> AsyncIterator[DemoApps]:
    running = await start_demo_apps(jwks_source=signer.jwks(), issuer=ISSUER, clock=clock,
                                    max_file_size=1024, max_store_size=4096)
    yield running
    await running.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def as_user(signer: AssertionSigner, principal: Principal, service: str) -> dict[str, str]:
    """The identity headers the gateway sends for ``principal`` to ``service``."""
    return {
        "X-Gatewayd-User": principal.user,
        "X-Gatewayd-Groups": ",".join(sorted(principal.groups)),
        "X-Gatewayd-Assertion": signer.sign(audience=service, principal=principal, device=None),
    }


async def whoami(http: aiohttp.ClientSession, apps: DemoApps, service: str,
                 headers: dict[str, str]) -> dict[str, Any]:
    async with http.get(apps.url(service) + "whoami", headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body: dict[str, Any] = await response.json()
        return body


# --- starting and stopping ----------------------------------------------------------------


async def test_each_service_runs_on_its_own_loopback_port(apps: DemoApps) -> None:
    assert set(apps.urls) == set(SERVICES)
    ports = set()
    for service, origin in apps.urls.items():
        url = URL(origin)
        assert url.host == "127.0.0.1" and url.path in {"", "/"}
        ports.add(url.port)
        assert apps.url(service) == f"{origin}/{service}/"
    assert len(ports) == 4


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "10.0.0.1", "gw.ward.local", ""])
async def test_refuses_to_listen_beyond_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        await start_demo_apps(host)


async def test_close_stops_listening(http: aiohttp.ClientSession) -> None:
    running = await start_demo_apps()
    origin = running.urls["groupware"]
    async with http.get(origin + "/groupware/") as response:
        assert response.status == 200
    await running.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(origin + "/groupware/"):
            pass


# --- the TCP services behind the SSH tunnels ------------------------------------------------


async def tcp_exchange(target: str, send: bytes) -> bytes:
    host, _, port = target.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(send)
    if send.startswith(b"GET"):
        await writer.drain()
    else:
        await asyncio.sleep(0.7)  # past the wait for an HTTP request: greeted, then echoed
        writer.write(b"more")
        writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


async def test_every_tcp_destination_of_the_policy_has_a_loopback_service(apps: DemoApps) -> None:
    assert set(apps.tcp) == set(DEMO_TCP_DESTINATIONS)
    assert "fileserver.ward.local:445" in apps.tcp and "pc-0042.ward.local:3389" in apps.tcp
    assert len(set(apps.tcp.values())) == len(apps.tcp)
    assert all(target.startswith("127.0.0.1:") for target in apps.tcp.values())


async def test_a_tcp_service_answers_http_with_its_name(apps: DemoApps) -> None:
    answer = await tcp_exchange(apps.tcp["fileserver.ward.local:445"], b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == (b"gatewayd demo: SMB file server (fileserver.ward.local:445), reached through "
                    b"an SSH tunnel.\n")


async def test_a_tcp_service_greets_and_echoes_anything_else(apps: DemoApps) -> None:
    answer = await tcp_exchange(apps.tcp["mail.ward.local:993"], b"a001 LOGIN ")
    assert answer.startswith(b"gatewayd demo: IMAPS mail server (mail.ward.local:993)")
    assert answer.endswith(b"What you type comes back.\r\na001 LOGIN more")


# --- whoami and the assertion -------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
async def test_whoami_reports_headers_and_verified_assertion(
    apps: DemoApps, http: aiohttp.ClientSession, signer: AssertionSigner, service: str
) -> None:
    headers = as_user(signer, ALICE, service)
    headers.update({"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https",
                    "X-Forwarded-Host": "gw.test:8443", "Cookie": "app_pref=1; theme=dark"})
    body = await whoami(http, apps, service, headers)
    assert body["service"] == service
    assert body["path"] == f"/{service}/whoami"
    assert body["headers"] == {k: v for k, v in headers.items() if k.startswith("X-Gatewayd")}
    assert body["forwarded"] == {"X-Forwarded-For": "203.0.113.5", "X-Forwarded-Proto": "https",
                                 "X-Forwarded-Host": "gw.test:8443"}
    assert body["cookies"] == ["app_pref", "theme"]
    assertion = body["assertion"]
    assert assertion["present"] and assertion["verified"], assertion
    assert assertion["error"] is None
    assert assertion["subject_matches_user_header"] is True
    claims = assertion["claims"]
    assert (claims["sub"], claims["aud"], claims["iss"]) == ("alice", service, ISSUER)
    assert claims["groups"] == ["telework-staff"]


@pytest.mark.parametrize(
    "spelling",
    ["X_Gatewayd_User", "x-gatewayd-user", "X-GATEWAYD-GROUPS", "x-gatewayd-anything",
     "X-Gatewayd_Device", "x_gatewayd_assertion2"],
)
async def test_whoami_shows_any_spelling_that_reached_it(
    apps: DemoApps, http: aiohttp.ClientSession, spelling: str
) -> None:
    """So a test through the gateway can prove a spoofed spelling did not get this far."""
    body = await whoami(http, apps, "groupware", {spelling: "mayor", "X-Gatewayd-Other": "1"})
    assert body["headers"][spelling] == "mayor"
    assert body["headers"]["X-Gatewayd-Other"] == "1"


@pytest.mark.parametrize("name", ["X-Gateway-User", "X-Gatewaydx-User", "Gatewayd-User",
                                  "X-Forwarded-User", "Remote-User"])
async def test_whoami_does_not_list_other_headers(apps: DemoApps, http: aiohttp.ClientSession,
                                                  name: str) -> None:
    body = await whoami(http, apps, "files", {name: "x"})
    assert body["headers"] == {}


async def test_repeated_identity_headers_are_all_visible(
    apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    headers = [("X-Gatewayd-User", "alice"), ("X-Gatewayd-User", "mayor")]
    async with http.get(apps.url("chat") + "whoami", headers=headers) as response:
        body = await response.json()
    assert body["headers"] == {"X-Gatewayd-User": "alice, mayor"}


def tamper(token: str) -> str:
    header, _, signature = token.split(".")
    forged = b64url_encode(b'{"sub":"mayor","aud":"groupware","iss":"' + ISSUER.encode() +
                           b'","iat":1775000000,"exp":1775000060}')
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("missing", "no X-Gatewayd-Assertion"),
        ("other audience", "audience"),
        ("expired", "expired"),
        ("from the future", "future"),
        ("other issuer", "issuer"),
        ("other key", "unknown key"),
        ("tampered", "signature"),
        ("garbage", "not a JWS"),
        ("alg none", "algorithm"),
    ],
)
async def test_assertions_that_must_not_verify(
    apps: DemoApps, http: aiohttp.ClientSession, signer: AssertionSigner, clock: Clock,
    signing_key: ec.EllipticCurvePrivateKey, case: str, error: str,
) -> None:
    headers = as_user(signer, ALICE, "groupware")
    token = headers["X-Gatewayd-Assertion"]
    if case == "missing":
        del headers["X-Gatewayd-Assertion"]
    elif case == "other audience":
        headers["X-Gatewayd-Assertion"] = signer.sign(audience="files", principal=ALICE,
                                                      device=None)
    elif case == "expired":
        clock.now += 60 + 11  # lifetime + leeway
    elif case == "from the future":
        headers["X-Gatewayd-Assertion"] = signer.sign(audience="groupware", principal=ALICE,
                                                      device=None, now=T0 + 3600)
    elif case == "other issuer":
        other = AssertionSigner(signing_key, issuer="https://evil.test", clock=clock)
        headers["X-Gatewayd-Assertion"] = other.sign(audience="groupware", principal=ALICE,
                                                     device=None)
    elif case == "other key":
        headers["X-Gatewayd-Assertion"] = new_signer(clock).sign(
            audience="groupware", principal=ALICE, device=None)
    elif case == "tampered":
        headers["X-Gatewayd-Assertion"] = tamper(token)
    elif case == "garbage":
        headers["X-Gatewayd-Assertion"] = "not-a-token"
    elif case == "alg none":
        _, payload, _ = token.split(".")
        headers["X-Gatewayd-Assertion"] = b64url_encode(b'{"alg":"none"}') + f".{payload}."
    assertion = (await whoami(http, apps, "groupware", headers))["assertion"]
    assert assertion["verified"] is False
    assert assertion["claims"] is None
    assert error in assertion["error"]


async def test_subject_that_differs_from_user_header_is_flagged(
    apps: DemoApps, http: aiohttp.ClientSession, signer: AssertionSigner
) -> None:
    headers = as_user(signer, ALICE, "approval")
    headers["X-Gatewayd-User"] = "bob"
    assertion = (await whoami(http, apps, "approval", headers))["assertion"]
    assert assertion["verified"] is True
    assert assertion["subject_matches_user_header"] is False


async def test_without_a_configured_gateway_nothing_verifies(
    http: aiohttp.ClientSession, signer: AssertionSigner
) -> None:
    async with await start_demo_apps() as running:
        body = await whoami(http, running, "files", as_user(signer, ALICE, "files"))
    assert body["assertion"]["verified"] is False
    assert "no gateway JWKS" in body["assertion"]["error"]


class JwksServer:
    """A stand-in for the gateway's ``/.gatewayd/jwks.json`` that counts fetches."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response(self.document)


@pytest.fixture
async def jwks_server(signer: AssertionSigner) -> AsyncIterator[tuple[JwksServer, str]]:
    server = JwksServer(signer.jwks())
    app = web.Application()
    app.router.add_get("/.gatewayd/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield server, f"http://127.0.0.1:{port}/.gatewayd/jwks.json"
    await runner.cleanup()


async def test_jwks_fetched_by_url_cached_and_refreshed_on_rotation(
    jwks_server: tuple[JwksServer, str], http: aiohttp.ClientSession, signer: AssertionSigner,
    clock: Clock,
) -> None:
    server, url = jwks_server
    async with await start_demo_apps(jwks_source=url, issuer=ISSUER, clock=clock) as running:
        for _ in range(3):
            body = await whoami(http, running, "chat", as_user(signer, ALICE, "chat"))
            assert body["assertion"]["verified"] is True
        assert server.fetches == 1  # cached

        rotated = new_signer(clock)
        server.document = rotated.jwks()
        new_token = as_user(rotated, ALICE, "chat")
        # Within the refresh interval a failing token does not cause another fetch...
        body = await whoami(http, running, "chat", new_token)
        assert body["assertion"]["verified"] is False and server.fetches == 1
        # ...after it, one fetch picks up the rotated key.
        clock.now += JWKS_REFRESH_INTERVAL
        new_token = as_user(rotated, ALICE, "chat")
        body = await whoami(http, running, "chat", new_token)
        assert body["assertion"]["verified"] is True
        assert server.fetches == 2


async def test_forged_tokens_do_not_hammer_the_gateway(
    jwks_server: tuple[JwksServer, str], http: aiohttp.ClientSession, clock: Clock,
) -> None:
    server, url = jwks_server
    forger = new_signer(clock)
    async with await start_demo_apps(jwks_source=url, issuer=ISSUER, clock=clock) as running:
        for _ in range(20):
            body = await whoami(http, running, "files", as_user(forger, ALICE, "files"))
            assert body["assertion"]["verified"] is False
    assert server.fetches == 1


async def test_unreachable_jwks_is_reported(
    jwks_server: tuple[JwksServer, str], http: aiohttp.ClientSession, signer: AssertionSigner,
    clock: Clock,
) -> None:
    server, url = jwks_server
    server.status = 503
    async with await start_demo_apps(jwks_source=url, issuer=ISSUER, clock=clock) as running:
        for _ in range(5):
            body = await whoami(http, running, "groupware", as_user(signer, ALICE, "groupware"))
            assert body["assertion"]["verified"] is False
            assert "JWKS unavailable" in body["assertion"]["error"]
        assert server.fetches == 1  # a gateway that is down is not asked on every request
        server.status = 200
        clock.now += JWKS_REFRESH_INTERVAL
        body = await whoami(http, running, "groupware", as_user(signer, ALICE, "groupware"))
        assert body["assertion"]["verified"] is True
        assert server.fetches == 2


async def test_gateway_configured_after_start_with_a_coroutine_source(
    http: aiohttp.ClientSession, signer: AssertionSigner, clock: Clock
) -> None:
    calls = []

    async def from_gateway() -> dict[str, Any]:
        calls.append(1)
        return signer.jwks()

    async with await start_demo_apps(clock=clock) as running:
        running.configure_gateway(from_gateway, ISSUER)
        body = await whoami(http, running, "approval", as_user(signer, BOB, "approval"))
    assert body["assertion"]["verified"] is True
    assert calls == [1]


# --- pages --------------------------------------------------------------------------------

PAGES = [
    ("groupware", "/groupware/", "Groupware"),
    ("groupware", "/groupware/schedule", "Section meeting"),
    ("groupware", "/groupware/mail/inbox", "Approval needed: request 42"),
    ("groupware", "/groupware/mail/2", "waiting for a manager"),
    ("approval", "/approval/requests", "Printer toner"),
    ("approval", "/approval/requests/42", "Approve"),
    ("files", "/files/", "shared/"),
    ("files", "/files/shared/", "budget.xlsx"),
    ("chat", "/chat/", "Section chat"),
]


@pytest.mark.parametrize(("service", "path", "text"), PAGES)
async def test_pages_are_self_contained_html(
    apps: DemoApps, http: aiohttp.ClientSession, service: str, path: str, text: str
) -> None:
    async with http.get(apps.urls[service] + path,
                        headers={"X-Gatewayd-User": "alice", "Accept": "text/html"}) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        body = await response.text()
        csp = response.headers["Content-Security-Policy"]
    assert text in body
    assert "signed in as alice" in body
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    # No external resources: every src/href/action is a path on this origin.
    for url in re.findall(r'(?:src|href|action)="([^"]*)"', body):
        assert url.startswith("/") and not url.startswith("//"), url
    assert "<script>" not in body  # inline script would need 'unsafe-inline'


@pytest.mark.parametrize(("service", "asset", "kind"), [
    ("groupware", "/groupware/static/style.css", "text/css"),
    ("chat", "/chat/static/chat.js", "text/javascript"),
])
async def test_static_assets(apps: DemoApps, http: aiohttp.ClientSession, service: str,
                             asset: str, kind: str) -> None:
    async with http.get(apps.urls[service] + asset) as response:
        assert response.status == 200 and response.content_type == kind
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_user_names_are_escaped(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    async with http.get(apps.url("groupware") + "schedule",
                        headers={"X-Gatewayd-User": "<script>x</script>"}) as response:
        body = await response.text()
    assert "<script>x" not in body and "&lt;script&gt;x" in body


@pytest.mark.parametrize("path", ["/groupware/mail/99", "/groupware/nothing",
                                  "/approval/requests/999", "/files/shared/nothing.txt"])
async def test_unknown_things_are_404(apps: DemoApps, http: aiohttp.ClientSession,
                                      path: str) -> None:
    service = path.split("/")[1]
    async with http.get(apps.urls[service] + path) as response:
        assert response.status == 404


# --- approval -----------------------------------------------------------------------------


async def approve(http: aiohttp.ClientSession, apps: DemoApps, request_id: int,
                  headers: dict[str, str], **form: str) -> aiohttp.ClientResponse:
    url = f"{apps.urls['approval']}/approval/requests/{request_id}/approve"
    async with http.post(url, data=form, headers={"Accept": "application/json", **headers},
                         allow_redirects=False) as response:
        await response.read()
        return response


async def test_approval_records_who_approved_and_when(
    apps: DemoApps, http: aiohttp.ClientSession, signer: AssertionSigner, clock: Clock
) -> None:
    clock.now = T0 + 5
    response = await approve(http, apps, 42, as_user(signer, BOB, "approval"), comment="OK")
    assert response.status == 200
    async with http.get(f"{apps.urls['approval']}/approval/requests/42",
                        headers={"Accept": "application/json"}) as detail:
        item = await detail.json()
    assert item["status"] == "approved"
    assert item["approved_by"] == "bob"
    assert item["approved_at"] == "2026-03-31T23:33:25+00:00"
    assert item["comment"] == "OK"
    assert item["assertion_verified"] is True
    async with http.get(f"{apps.urls['approval']}/approval/requests",
                        headers={"Accept": "application/json"}) as listing:
        statuses = {r["id"]: r["status"] for r in (await listing.json())["requests"]}
    assert statuses == {42: "approved", 43: "pending", 44: "pending"}


async def test_second_approval_is_a_conflict_and_keeps_the_first(
    apps: DemoApps, http: aiohttp.ClientSession, signer: AssertionSigner
) -> None:
    assert (await approve(http, apps, 43, as_user(signer, BOB, "approval"))).status == 200
    second = await approve(http, apps, 43, {"X-Gatewayd-User": "carol"})
    assert second.status == 409
    async with http.get(f"{apps.urls['approval']}/approval/requests/43",
                        headers={"Accept": "application/json"}) as detail:
        assert (await detail.json())["approved_by"] == "bob"


async def test_approval_without_gateway_identity_is_refused(
    apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    assert (await approve(http, apps, 42, {})).status == 403
    assert (await approve(http, apps, 42, {"X-Gatewayd-User": "  "})).status == 403
    async with http.get(f"{apps.urls['approval']}/approval/requests/42",
                        headers={"Accept": "application/json"}) as detail:
        assert (await detail.json())["status"] == "pending"


async def test_approval_with_only_a_header_is_recorded_as_unverified(
    apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    response = await approve(http, apps, 44, {"X-Gatewayd-User": "bob"})
    assert response.status == 200
    async with http.get(f"{apps.urls['approval']}/approval/requests/44",
                        headers={"Accept": "application/json"}) as detail:
        item = await detail.json()
    assert item["approved_by"] == "bob" and item["assertion_verified"] is False


async def test_browser_form_approval_redirects_to_the_request(
    apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    url = f"{apps.urls['approval']}/approval/requests/42/approve"
    long_comment = "<b>" + "x" * 600
    async with http.post(url, data={"comment": long_comment},
                         headers={"X-Gatewayd-User": "bob", "Accept": "text/html"},
                         allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/approval/requests/42"
    async with http.get(f"{apps.urls['approval']}/approval/requests/42") as page:
        body = await page.text()
    assert "approved by bob" in body and "&lt;b&gt;" in body and "<b>x" not in body
    assert "x" * 497 in body and "x" * 498 not in body  # comment cut at 500 characters


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_approve_is_post_only(apps: DemoApps, http: aiohttp.ClientSession,
                                    method: str) -> None:
    url = f"{apps.urls['approval']}/approval/requests/42/approve"
    async with http.request(method, url, headers={"X-Gatewayd-User": "bob"}) as response:
        assert response.status == 405


# --- files --------------------------------------------------------------------------------


def files_url(apps: DemoApps, path: str) -> URL:
    return URL(apps.urls["files"] + path, encoded=True)


async def dav(http: aiohttp.ClientSession, apps: DemoApps, method: str, path: str,
              **kwargs: Any) -> tuple[int, bytes, CIMultiDict[str]]:
    async with http.request(method, files_url(apps, path), allow_redirects=False,
                            **kwargs) as response:
        return response.status, await response.read(), response.headers.copy()


async def test_put_get_replace_delete(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    status, _, headers = await dav(http, apps, "PUT", "/files/shared/note.txt", data=b"v1",
                                   headers={"Content-Type": "text/plain"})
    assert status == 201
    status, body, got = await dav(http, apps, "GET", "/files/shared/note.txt")
    assert (status, body, got["Content-Type"]) == (200, b"v1", "text/plain")
    assert got["ETag"] == headers["ETag"]
    assert (await dav(http, apps, "PUT", "/files/shared/note.txt", data=b"v2"))[0] == 204
    status, body, replaced = await dav(http, apps, "GET", "/files/shared/note.txt")
    assert body == b"v2" and replaced["ETag"] != got["ETag"]
    assert (await dav(http, apps, "DELETE", "/files/shared/note.txt"))[0] == 204
    assert (await dav(http, apps, "GET", "/files/shared/note.txt"))[0] == 404
    assert (await dav(http, apps, "DELETE", "/files/shared/note.txt"))[0] == 404


async def test_conditional_get(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    _, _, headers = await dav(http, apps, "GET", "/files/shared/readme.txt")
    status, body, _ = await dav(http, apps, "GET", "/files/shared/readme.txt",
                                headers={"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
    assert (await dav(http, apps, "HEAD", "/files/shared/readme.txt"))[0] == 200


async def test_collections(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    assert (await dav(http, apps, "PUT", "/files/new/a.txt", data=b"x"))[0] == 409
    assert (await dav(http, apps, "MKCOL", "/files/new/"))[0] == 201
    assert (await dav(http, apps, "MKCOL", "/files/new/"))[0] == 405
    assert (await dav(http, apps, "MKCOL", "/files/x/y/"))[0] == 409
    assert (await dav(http, apps, "PUT", "/files/new/a.txt", data=b"x"))[0] == 201
    assert (await dav(http, apps, "PUT", "/files/new/", data=b"x"))[0] == 405
    assert (await dav(http, apps, "DELETE", "/files/new/"))[0] == 204
    assert (await dav(http, apps, "GET", "/files/new/a.txt"))[0] == 404
    assert (await dav(http, apps, "GET", "/files/new/"))[0] == 404
    assert (await dav(http, apps, "DELETE", "/files/"))[0] == 403


def propfind_responses(body: bytes) -> dict[str, ET.Element]:
    root = ET.fromstring(body)
    assert root.tag == f"{DAV}multistatus"
    return {r.findtext(f"{DAV}href") or "": r for r in root.findall(f"{DAV}response")}


async def test_propfind_depth_1(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    await dav(http, apps, "PUT", "/files/shared/%E4%BC%9A%E8%AD%B0%20memo.txt", data=b"12345")
    status, body, headers = await dav(http, apps, "PROPFIND", "/files/shared/",
                                      headers={"Depth": "1"})
    assert status == 207 and headers["Content-Type"].startswith("application/xml")
    responses = propfind_responses(body)
    assert set(responses) == {
        "/files/shared/", "/files/shared/budget.xlsx", "/files/shared/minutes/",
        "/files/shared/readme.txt", "/files/shared/%E4%BC%9A%E8%AD%B0%20memo.txt"}
    memo = responses["/files/shared/%E4%BC%9A%E8%AD%B0%20memo.txt"]
    prop = memo.find(f"{DAV}propstat/{DAV}prop")
    assert prop is not None
    assert prop.findtext(f"{DAV}getcontentlength") == "5"
    assert prop.findtext(f"{DAV}displayname") == "会議 memo.txt"
    assert prop.find(f"{DAV}resourcetype/{DAV}collection") is None
    assert prop.findtext(f"{DAV}getetag")
    minutes = responses["/files/shared/minutes/"]
    assert minutes.find(f"{DAV}propstat/{DAV}prop/{DAV}resourcetype/{DAV}collection") is not None
    assert memo.findtext(f"{DAV}propstat/{DAV}status") == "HTTP/1.1 200 OK"


async def test_propfind_depth_0_and_infinity(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    status, body, _ = await dav(http, apps, "PROPFIND", "/files/shared/", headers={"Depth": "0"})
    assert status == 207 and list(propfind_responses(body)) == ["/files/shared/"]
    status, body, _ = await dav(http, apps, "PROPFIND", "/files/shared/readme.txt",
                                headers={"Depth": "1"})
    assert status == 207 and list(propfind_responses(body)) == ["/files/shared/readme.txt"]
    for depth in ({"Depth": "infinity"}, {}):
        status, body, _ = await dav(http, apps, "PROPFIND", "/files/", headers=depth)
        assert status == 403 and b"propfind-finite-depth" in body
    assert (await dav(http, apps, "PROPFIND", "/files/none/", headers={"Depth": "0"}))[0] == 404


async def test_options_and_unknown_methods(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    status, _, headers = await dav(http, apps, "OPTIONS", "/files/shared/")
    assert status == 200 and headers["DAV"] == "1" and "PROPFIND" in headers["Allow"]
    for method in ("PATCH", "POST", "LOCK"):
        assert (await dav(http, apps, method, "/files/shared/readme.txt"))[0] == 405


@pytest.mark.parametrize("path", [
    "/files/shared/../readme.txt", "/files/shared/%2e%2e/readme.txt", "/files/./shared/readme.txt",
    "/files/shared//readme.txt", "/files/shared/%5c..%5creadme.txt", "/files/shared/a%00b",
])
async def test_unsafe_paths_are_refused(apps: DemoApps, http: aiohttp.ClientSession,
                                        path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, _, _ = await dav(http, apps, method, path, data=b"x")
        assert status in {400, 404}, (method, path, status)
    assert (await dav(http, apps, "GET", "/files/shared/readme.txt"))[0] == 200


async def test_size_limits(apps: DemoApps, http: aiohttp.ClientSession) -> None:
    """The fixture allows 1 KiB per file and 4 KiB in all (the seed files take ~150 B)."""
    assert (await dav(http, apps, "PUT", "/files/shared/big", data=b"x" * 1025))[0] == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(5):
            yield b"y" * 300

    assert (await dav(http, apps, "PUT", "/files/shared/big", data=chunked()))[0] == 413
    assert (await dav(http, apps, "GET", "/files/shared/big"))[0] == 404
    for index in range(3):
        assert (await dav(http, apps, "PUT", f"/files/shared/f{index}", data=b"z" * 1024))[0] == 201
    assert (await dav(http, apps, "PUT", "/files/shared/f3", data=b"z" * 1024))[0] == 413
    # Replacing a file counts the room its old content frees.
    assert (await dav(http, apps, "PUT", "/files/shared/f2", data=b"w" * 1024))[0] == 204


# --- chat ---------------------------------------------------------------------------------


async def connect(http: aiohttp.ClientSession, apps: DemoApps,
                  user: str) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(apps.urls["chat"] + "/chat/ws",
                                 headers={"X-Gatewayd-User": user})


async def next_event(socket: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(socket.receive(), 5)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    event: dict[str, Any] = message.json()
    return event


async def test_chat_broadcasts_with_the_gateway_user_as_sender(
    apps: DemoApps, http: aiohttp.ClientSession, clock: Clock
) -> None:
    alice = await connect(http, apps, "alice")
    assert (await next_event(alice))["type"] == "join"
    bob = await connect(http, apps, "bob")
    assert await next_event(bob) == {"type": "join", "user": "bob", "ts": T0}
    assert (await next_event(alice))["user"] == "bob"

    clock.now = T0 + 1
    await alice.send_str("  good morning  ")
    expected = {"type": "message", "from": "alice", "text": "good morning", "ts": T0 + 1}
    assert await next_event(alice) == expected
    assert await next_event(bob) == expected

    await bob.send_str("x" * 5000)
    assert (await next_event(alice))["text"] == "x" * 2000
    await bob.send_bytes(b"binary is not chat")
    await bob.send_str("   ")  # nothing to say: not broadcast
    await bob.close()
    assert await next_event(alice) == {"type": "leave", "user": "bob", "ts": T0 + 1}

    carol = await connect(http, apps, "carol")  # the history comes first
    assert [e["text"] for e in [await next_event(carol), await next_event(carol)]] == [
        "good morning", "x" * 2000]
    assert (await next_event(carol))["type"] == "join"
    await carol.close()
    await alice.close()


async def test_chat_refuses_connections_without_gateway_identity(
    apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(apps.urls["chat"] + "/chat/ws")
    assert refused.value.status == 403


async def test_closing_the_apps_closes_chat_members(http: aiohttp.ClientSession) -> None:
    running = await start_demo_apps()
    alice = await connect(http, running, "alice")
    await next_event(alice)
    closing = asyncio.create_task(running.close(), name="close demo apps")
    message = await asyncio.wait_for(alice.receive(), 5)  # a client reads all the time
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert message.data == aiohttp.WSCloseCode.GOING_AWAY
    await asyncio.wait_for(closing, 5)


async def test_failed_refresh_keeps_the_known_keys(
    jwks_server: tuple[JwksServer, str], http: aiohttp.ClientSession, signer: AssertionSigner,
    clock: Clock,
) -> None:
    server, url = jwks_server
    async with await start_demo_apps(jwks_source=url, issuer=ISSUER, clock=clock) as running:
        assert (await whoami(http, running, "files", as_user(signer, ALICE, "files"))
                )["assertion"]["verified"] is True
        server.status = 503
        clock.now += JWKS_REFRESH_INTERVAL
        forged = await whoami(http, running, "files", as_user(new_signer(clock), ALICE, "files"))
        assert forged["assertion"]["verified"] is False
        assert server.fetches == 2  # the refresh was tried and failed
        genuine = await whoami(http, running, "files", as_user(signer, ALICE, "files"))
        assert genuine["assertion"]["verified"] is True
