"""Tests for gatewayd.https.guard: parser errors become 400/431 without tracebacks, an
unexpected exception becomes a generic 500 page, and the security headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gatewayd.https.guard import (
    GuardedAppRunner,
    add_security_headers,
    error_middleware,
    guarded,
    header_size_middleware,
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


@pytest.fixture(params=["middlewares", "guarded"])
async def port(request: pytest.FixtureRequest) -> AsyncIterator[int]:
    """The same guards as aiohttp middlewares, or as the one handler the listener uses."""

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret internal detail")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    if request.param == "middlewares":
        app = web.Application(middlewares=[error_middleware(generic),
                                           header_size_middleware(2048, too_large)])
        app.router.add_get("/boom", boom)
        app.router.add_get("/ok", ok)
    else:
        app = web.Application()
        for path, handler in (("/boom", boom), ("/ok", ok)):
            app.router.add_get(path, guarded(handler, max_header_size=2048,
                                             too_large=too_large, server_error=generic))
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
