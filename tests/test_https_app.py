"""Tests for gatewayd.https.app (and its wiring in gatewayd.app.Gateway): dispatch, the caller
middleware, headers, limits, garbage input, expiry, device binding, shutdown — over real
HTTPS on 127.0.0.1 (see https_harness)."""

from __future__ import annotations

import asyncio
import gc
import importlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from https_harness import Harness, running_gateway
from yarl import URL

from gatewayd.certs import issue_device_cert, new_device_ca, save_pair
from gatewayd.https.app import SERVING_GC_THRESHOLD, tune_gc_for_serving

JSON = {"Accept": "application/json"}
NAVIGATE = {"Accept": "text/html", "Sec-Fetch-Mode": "navigate"}


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


async def test_gateway_pages_carry_the_security_headers(gw: Harness) -> None:
    async with gw.client().get(gw.base + "/.gatewayd/login") as resp:
        headers = resp.headers
    assert headers["Strict-Transport-Security"] == "max-age=31536000"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "same-origin"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "script-src" not in csp  # no script at all


@pytest.mark.parametrize(("path", "signed_in", "status"), [
    ("/.gatewayd/login", False, 200),              # a gateway page
    ("/.gatewayd/assets/gatewayd.css", False, 200),
    ("/groupware/", False, 401),                    # the sign-in answer
    ("/.gatewayd/nothing-here", True, 404),         # an error page
    ("/files/.git/config", True, 403),              # a deny page
    ("/groupware/mail", True, 200),                 # proxied: the upstream is aiohttp too
])
async def test_no_response_names_the_stack_or_its_version(
    gw: Harness, path: str, signed_in: bool, status: int
) -> None:
    client = await gw.signed_in("alice") if signed_in else gw.client()
    async with client.get(gw.base + path, headers=JSON, allow_redirects=False) as resp:
        assert resp.status == status
        assert resp.headers.getall("Server") == ["gatewayd"]
        head = "\n".join(f"{k}: {v}" for k, v in resp.headers.items()).lower()
    assert "aiohttp" not in head and "python" not in head


@pytest.mark.parametrize(("method", "headers", "status", "location"), [
    ("GET", NAVIGATE, 302, "/.gatewayd/login?next=%2Fgroupware%2Fmail%3Fa%3D1"),
    ("GET", {"Accept": "text/html,application/xhtml+xml"}, 302,
     "/.gatewayd/login?next=%2Fgroupware%2Fmail%3Fa%3D1"),
    ("POST", NAVIGATE, 303, "/.gatewayd/login"),
    ("GET", JSON, 401, None),
    ("GET", {"Accept": "text/html", "Sec-Fetch-Mode": "cors"}, 401, None),
    ("GET", {}, 401, None),
    ("PROPFIND", {}, 401, None),
])
async def test_without_a_session(gw: Harness, method: str, headers: dict[str, str], status: int,
                                 location: str | None) -> None:
    async with gw.client().request(method, gw.base + "/groupware/mail?a=1", headers=headers,
                                   allow_redirects=False) as resp:
        assert resp.status == status
        if location is not None:
            assert resp.headers["Location"] == location
        else:
            body = await resp.json()
            assert body["error"] == "unauthenticated"
            expected = ("/.gatewayd/login?next=%2Fgroupware%2Fmail%3Fa%3D1" if method == "GET"
                        else "/.gatewayd/login")  # a write cannot be replayed after sign-in
            assert body["login_url"] == expected
            assert "WWW-Authenticate" in resp.headers
    assert gw.upstream.seen == []


async def test_portal_lists_what_the_user_may_use_now(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/") as resp:
        page = await resp.text()
    for service in ("groupware", "approval", "files", "chat"):
        assert f'href="/{service}/"' in page
    assert "admin" not in page
    assert page.count("read-only") == 2  # files and approval, for staff
    gw.clock.advance(13 * 60 * 60)  # 23:00: approval closed (and a new login is needed)
    client = await gw.signed_in("alice")
    async with client.get(gw.base + "/") as resp:
        assert 'href="/approval/"' not in await resp.text()


async def test_userinfo(gw: Harness) -> None:
    client = await gw.signed_in("bob")
    gw.clock.advance(60)
    async with client.get(gw.base + "/.gatewayd/userinfo") as resp:
        info = await resp.json()
    assert info["user"] == "bob" and info["groups"] == ["telework-managers"]
    assert info["mfa_age_seconds"] == 60 and info["idle_timeout_seconds"] == 15 * 60
    assert info["expires_in_seconds"] == 10 * 3600 - 60


async def test_wrong_method_on_a_gateway_endpoint_is_405(gw: Harness) -> None:
    async with gw.client().delete(gw.base + "/.gatewayd/login") as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD, POST"


async def test_idle_timeout(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    gw.clock.advance(14 * 60)
    async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
        assert resp.status == 200  # activity restarts the idle timer
    gw.clock.advance(14 * 60)
    async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
        assert resp.status == 200
    gw.clock.advance(15 * 60)
    async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
        assert resp.status == 401
    assert gw.audit_events("session.end")[-1]["reason"] == "idle_timeout"


async def test_absolute_lifetime(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, sessions={"absolute_timeout": "1h",
                                                        "idle_timeout": "15m"}):
        client = await gw.signed_in("alice")
        for _ in range(5):  # busy all the time
            gw.clock.advance(10 * 60)
            async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
                assert resp.status == 200
        gw.clock.advance(10 * 60)
        async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
            assert resp.status == 401
        end = gw.audit_events("session.end")[-1]
        assert end["reason"] == "expired" and end["duration_ms"] == 3600 * 1000


async def test_an_oversized_header_is_431(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    huge = {"X-Big": "a" * 20_000}
    async with client.get(gw.base + "/groupware/", headers=huge) as resp:
        assert resp.status == 431
    many = {f"X-Part-{i}": "b" * 1000 for i in range(20)}  # each fine, together over 16 KiB
    async with client.get(gw.base + "/groupware/", headers=many) as resp:
        assert resp.status == 431
    assert gw.upstream.seen == []


async def test_an_oversized_body_is_413(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path, https={"max_body": "1KiB"}):
        client = await gw.signed_in("bob")
        async with client.put(gw.base + "/files/x", data=b"x" * 4096, headers=JSON) as resp:
            assert resp.status == 413
        async with client.post(gw.base + "/.gatewayd/login", data=b"a=" + b"x" * 20_000,
                               headers={"Content-Type": "application/x-www-form-urlencoded"}
                               ) as resp:
            assert resp.status == 413


async def raw_exchange(gw: Harness, request: bytes) -> bytes:
    port = int(gw.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=gw.ssl_context(),
                                                   server_hostname="127.0.0.1")
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


GARBAGE_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\nCookie: __Host-gatewayd_session=\xff\xfe\x00\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nCookie: ;;;==;__Host-gatewayd_session\r\n\r\n",
    b'GET / HTTP/1.1\r\nHost: x\r\nCookie: __Host-gatewayd_session="' + b"A" * 43 + b'"\r\n\r\n',
    b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    b"GET /\xff\xfe/groupware HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /groupware/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil.example/groupware/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /.gatewayd/login?next=%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /.gatewayd/login?next=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /.gatewayd/stepup?next=%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Bad Header: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x00\x00garbage\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 40_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    b"POST /.gatewayd/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
    b"\r\nContent-Length: 27\r\n\r\nusername=%ff%fe&password=\xff\xfe",
    b"POST /.gatewayd/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
    b"\r\nContent-Length: 10\r\n\r\nusername=a",
    b"POST /.gatewayd/login HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary="
    b"\r\nContent-Length: 5\r\n\r\n--\r\n\r",
    b"POST /.gatewayd/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
    b"; charset=\xff\r\nContent-Length: 3\r\n\r\na=b",
    b"POST /.gatewayd/logout HTTP/1.1\r\nHost: x\r\nOrigin: \xff\r\nContent-Length: 0\r\n\r\n",
    b"POST /.gatewayd/stepup HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"GET /.gatewayd/jwks.json HTTP/1.1\r\nHost: x\r\nAccept: \xff\r\nSec-Fetch-Mode: \xff\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", GARBAGE_REQUESTS)
async def test_garbage_gets_a_client_error_never_a_server_error(
    gw: Harness, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    answer = await raw_exchange(gw, request_bytes)
    status_line = answer.split(b"\r\n", 1)[0]
    if answer:  # the server may also just close a connection it cannot read
        assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
        status = int(status_line.split()[1])
        assert status < 500, answer[:500]
    assert "Traceback" not in caplog.text
    assert gw.upstream.seen == []


@pytest.mark.parametrize("cookie", [
    "__Host-gatewayd_session=" + "A" * 43,
    "__Host-gatewayd_session=" + "A" * 4000,
    "__Host-gatewayd_session=../../etc/passwd",
    "__Host-gatewayd_session=%00%ff",
    "__Host-gatewayd_session=; __Host-gatewayd_session=" + "B" * 43,
    "__host-gatewayd_session=" + "A" * 43,
    "=; =;;",
    "\u3042=\u3044",
])
async def test_bad_session_cookies_are_no_session(gw: Harness, cookie: str) -> None:
    async with gw.client().get(gw.base + "/groupware/", headers={**JSON, "Cookie": cookie}
                               ) as resp:
        assert resp.status == 401


async def test_a_valid_cookie_among_stale_ones_works(gw: Harness) -> None:
    client = await gw.signed_in("alice")
    value = next(c.value for c in client.cookie_jar if c.key == "__Host-gatewayd_session")
    cookie = f"__Host-gatewayd_session={'Z' * 43}; other=1; __Host-gatewayd_session={value}"
    async with gw.client().get(gw.base + "/groupware/", headers={**JSON, "Cookie": cookie}
                               ) as resp:
        assert resp.status == 200


@pytest.fixture
def device_pki(tmp_path: Path) -> tuple[Path, tuple[Path, Path], tuple[Path, Path]]:
    ca = new_device_ca()
    pki = tmp_path / "pki"
    pki.mkdir()
    save_pair(ca, pki, "device-ca")
    alice = save_pair(issue_device_cert(ca, "pc-0042", "alice"), pki, "alice")
    other = save_pair(issue_device_cert(ca, "pc-0099", "bob"), pki, "other")
    return pki / "device-ca.crt", (alice.cert, alice.key), (other.cert, other.key)


async def test_a_session_is_bound_to_its_device(
    tmp_path: Path, device_pki: tuple[Path, tuple[Path, Path], tuple[Path, Path]]
) -> None:
    ca_file, alice_pc, other_pc = device_pki
    https = {"client_cert": "optional", "client_ca_file": str(ca_file)}
    async for gw in running_gateway(tmp_path / "gw", https=https):
        client = await gw.signed_in("alice", cert=alice_pc)
        async with client.get(gw.base + "/.gatewayd/userinfo") as resp:
            info = await resp.json()
        assert (info["device"], info["device_user"]) == ("pc-0042", "alice")
        value = next(c.value for c in client.cookie_jar if c.key == "__Host-gatewayd_session")
        for cert in (None, other_pc):  # the cookie copied to another machine
            thief = gw.client(cert)
            thief.cookie_jar.update_cookies({"__Host-gatewayd_session": value}, URL(gw.base))
            async with thief.get(gw.base + "/groupware/", headers=JSON) as resp:
                assert resp.status == 401
        assert gw.audit_events("session.start")[-1]["device"] == "pc-0042"


async def test_required_client_certificates_refuse_the_deviceless(
    tmp_path: Path, device_pki: tuple[Path, tuple[Path, Path], tuple[Path, Path]]
) -> None:
    ca_file, alice_pc, _ = device_pki
    https = {"client_cert": "required", "client_ca_file": str(ca_file)}
    async for gw in running_gateway(tmp_path / "gw", https=https):
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            async with gw.client().get(gw.base + "/.gatewayd/login") as resp:
                await resp.read()
        async with gw.client(alice_pc).get(gw.base + "/.gatewayd/login") as resp:
            assert resp.status == 200


async def test_audit_failure_fails_requests_closed(gw: Harness, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    client = await gw.signed_in("alice")
    monkeypatch.setattr(type(gw.gateway.audit), "healthy", property(lambda self: False))
    async with client.get(gw.base + "/groupware/", headers=JSON) as resp:
        assert resp.status == 503
    assert gw.upstream.seen == []
    assert (await gw.gateway.readiness())[0] is False


async def test_readiness_and_shutdown(tmp_path: Path) -> None:
    async for gw in running_gateway(tmp_path):
        assert await gw.gateway.readiness() == (True, "ready")
        await gw.signed_in("alice")
        await gw.signed_in("bob")
        await gw.gateway.stop()
        ends = gw.audit_events("session.end")
        assert sorted((e["user"], e["reason"]) for e in ends) == [
            ("alice", "shutdown"), ("bob", "shutdown")]
        assert gw.audit_events()[-1]["event"] == "audit.checkpoint"
        with pytest.raises(aiohttp.ClientConnectionError):
            async with gw.client().get(gw.base + "/.gatewayd/login"):
                pass
        gw.gateway.stop = _already_stopped  # type: ignore[method-assign]


async def _already_stopped() -> None:
    return None


def test_serving_gc_settings() -> None:
    """Startup objects are frozen once per process; young collections are made rarer."""
    gc.collect()
    tune_gc_for_serving()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert gc.get_threshold()[0] >= SERVING_GC_THRESHOLD
    tune_gc_for_serving()  # a second frontend in the same process freezes nothing more
    assert gc.get_freeze_count() <= frozen  # (frozen objects may still be freed)


@pytest.mark.parametrize("name", ["app", "auth", "forms", "guard", "login", "pages", "portal",
                                  "tls"])
def test_the_frontend_modules_hold_no_mutable_module_state(name: str) -> None:
    """Tables are read-only views, frozensets or tuples: nothing a request could change."""
    module = importlib.import_module(f"gatewayd.https.{name}")
    mutable = [key for key, value in vars(module).items()
               if not key.startswith("__") and isinstance(value, dict | list | set | bytearray)]
    assert mutable == []
