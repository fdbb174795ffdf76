"""Tests for gatewayd.https.guard: parser errors become 400/431 without tracebacks, an
unexpected exception becomes a generic 500 page, the security headers, and no response names
the stack's versions (``Server: gatewayd``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.test_utils import make_mocked_request

from gatewayd.https.guard import (
    PROXIED,
    SERVER_NAME,
    GuardedAppRunner,
    add_security_headers,
    guarded,
    parser_error_status,
)


@pytest.mark.parametrize(("exc", "status"), [
    (LineTooLong(b"x", 10), 431),
    (BadHttpMessage("Too many headers received"), 431),
    (BadHttpMessage("Invalid method"), 400),
    (None, 400),
])
def test_parser_error_status(exc: BaseException | None, status: int) -> None:
    assert parser_error_status(exc) == status


async def generic(request: web.Request) -> web.StreamResponse:
    return web.Response(status=500, text="generic failure page")


async def too_large(request: web.Request) -> web.StreamResponse:
    return web.Response(status=431, text="too large")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    """The guards as the listener uses them: each route's handler wrapped in `guarded`
    (plus one unguarded route, to see what aiohttp's own error answer looks like)."""

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def proxied(request: web.Request) -> web.Response:
        # What the proxy hands back: an upstream's page, its Server header already dropped.
        request[PROXIED] = True
        return web.Response(text="upstream page", headers={"Cache-Control": "max-age=60"})

    async def went_away(request: web.Request) -> web.Response:
        raise ConnectionResetError("client gone")

    app = web.Application()
    for path, handler in (("/boom", boom), ("/ok", ok), ("/proxied", proxied),
                          ("/went-away", went_away)):
        app.router.add_get(path, guarded(handler, max_header_size=2048,
                                         too_large=too_large, server_error=generic))
    app.router.add_get("/unguarded-boom", boom)
    app.on_response_prepare.append(add_security_headers)
    runner = GuardedAppRunner(app, access_log=None, max_field_size=1024)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(("data", "status"), [
    (b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"200"),
    (b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\n", b"431"),
    (b"GET /ok HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 900 + b"\r\nX-B: " + b"b" * 900
     + b"\r\nX-C: " + b"c" * 900 + b"\r\nConnection: close\r\n\r\n", b"431"),
    (b"\x00\x01\x02 nonsense\r\n\r\n", b"400"),
    (b"GET /ok HTTP/1.1\r\nBad Header Name: 1\r\n\r\n", b"400"),
])
async def test_parser_and_size_limits(port: int, data: bytes, status: bytes,
                                      caplog: pytest.LogCaptureFixture) -> None:
    answer = await exchange(port, data)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status
    assert b"a" * 100 not in answer  # nothing of the request is echoed back
    assert "Traceback" not in caplog.text


async def test_an_unexpected_exception_is_a_generic_page(port: int,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    answer = await exchange(port, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500") and b"generic failure page" in answer
    assert b"secret internal detail" not in answer
    assert "secret internal detail" in caplog.text  # logged once for the operator


@pytest.mark.parametrize(("host", "hsts"), [
    ("gw.example", True), ("127.0.0.1:8443", True), ("localhost", False),
    ("localhost:8443", False), ("app.localhost", False),
])
async def test_hsts_is_skipped_for_localhost_only(port: int, host: str, hsts: bool) -> None:
    answer = await exchange(port, f"GET /ok HTTP/1.1\r\nHost: {host}\r\nConnection: close"
                                  "\r\n\r\n".encode())
    assert (b"Strict-Transport-Security: max-age=31536000" in answer) is hsts
    assert b"Cache-Control: no-store" in answer and b"X-Frame-Options: DENY" in answer


def server_headers(answer: bytes) -> list[bytes]:
    head = answer.partition(b"\r\n\r\n")[0]
    return [line.partition(b":")[2].strip() for line in head.split(b"\r\n")[1:]
            if line.lower().startswith(b"server:")]


GET = "GET {} HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(("data", "status"), [
    (GET.format("/ok").encode(), b"200"),
    (GET.format("/proxied").encode(), b"200"),
    (GET.format("/boom").encode(), b"500"),
    (GET.format("/went-away").encode(), b"499"),
    (GET.format("/unguarded-boom").encode(), b"500"),  # aiohttp's own error answer
    (b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\n", b"431"),
    (b"GET /ok HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 900 + b"\r\nX-B: " + b"b" * 900
     + b"\r\nX-C: " + b"c" * 900 + b"\r\nConnection: close\r\n\r\n", b"431"),
    (b"\x00\x01\x02 nonsense\r\n\r\n", b"400"),
])
async def test_no_answer_names_the_stack_or_its_version(port: int, data: bytes,
                                                         status: bytes) -> None:
    answer = await exchange(port, data)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status
    assert server_headers(answer) == [SERVER_NAME.encode()]
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert b"aiohttp" not in head and b"python" not in head
    assert SERVER_SOFTWARE.encode() not in answer


async def test_a_proxied_page_keeps_its_caching_and_gets_no_gateway_csp(port: int) -> None:
    answer = await exchange(port, GET.format("/proxied").encode())
    assert b"Cache-Control: max-age=60" in answer
    assert b"Content-Security-Policy" not in answer and b"X-Frame-Options" not in answer
    assert b"Strict-Transport-Security: max-age=31536000" in answer


async def test_an_upstreams_own_server_header_is_left_alone() -> None:
    """Only aiohttp's value is replaced: a Server header someone chose on purpose stays."""
    app = web.Application()
    request = make_mocked_request("GET", "/", headers={"Host": "gw.example"}, app=app)
    request[PROXIED] = True
    response = web.StreamResponse(headers={"Server": "upstream-app/2"})
    await add_security_headers(request, response)
    assert response.headers.getall("Server") == ["upstream-app/2"]
    aiohttp_stamped = web.StreamResponse(headers={"Server": SERVER_SOFTWARE})
    await add_security_headers(request, aiohttp_stamped)
    assert aiohttp_stamped.headers.getall("Server") == [SERVER_NAME]
