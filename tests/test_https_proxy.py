"""Tests for gatewayd.https.proxy against real aiohttp upstreams and raw sockets on 127.0.0.1.

A small gateway app (the shape of the frontend's handler: build headers, pick the upstream,
call proxy_http / proxy_websocket, record the outcome) sits between an aiohttp client and the
upstream under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.http_exceptions import TransferEncodingError
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from yarl import URL

from gatewayd.config import UpstreamSettings
from gatewayd.https import proxy
from gatewayd.https.headers import is_websocket_upgrade, upstream_request_headers
from gatewayd.https.proxy import ProxyOutcome, UpstreamConfigError, UpstreamPool
from gatewayd.identity.principal import Principal

MiB = 1024 * 1024
BLOCK = os.urandom(64 * 1024)  # streamed repeatedly: the upstream allocates nothing per chunk

ALICE = Principal("alice", frozenset({"telework-staff"}))


# --- servers ---------------------------------------------------------------------------------


async def serve(app: web.Application, **runner_options: Any) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def stream_blocks(request: web.Request, total: int, *, length: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if length:
        response.content_length = total
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    sent = 0
    # The gateway hangs up on us when its client went away: that is expected, not an error.
    with contextlib.suppress(ConnectionError):
        while sent < total:
            piece = BLOCK if total - sent >= len(BLOCK) else BLOCK[: total - sent]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
    return response


def upstream_app(state: UpstreamState) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({
            "method": request.method, "target": request.raw_path,
            "headers": list(request.headers.items()), "size": size,
            "sha256": digest.hexdigest(),
        })

    async def big(request: web.Request) -> web.StreamResponse:
        total = int(request.query["size"])
        return await stream_blocks(request, total, length="chunked" not in request.query)

    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if "chunked" not in request.query:
            response.content_length = 10 * MiB
        await response.prepare(request)
        await response.write(BLOCK * 4)
        await asyncio.sleep(0.05)  # let the bytes leave before the connection is cut
        assert request.transport is not None
        request.transport.abort()
        return response

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10 * MiB
        await response.prepare(request)
        await response.write(BLOCK)
        await state.release.wait()
        return response

    async def silent(request: web.Request) -> web.Response:
        await state.release.wait()
        return web.Response(text="late")

    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "app=1; Path=/")
        response.headers.add("Set-Cookie", "__Host-gatewayd_session=stolen; Path=/; Secure")
        response.headers.add("Server", "InternalApp/1.2.3")
        return response

    async def gzipped(request: web.Request) -> web.Response:
        body = b"\x1f\x8b\x08\x00not-really-gzip-but-opaque"
        return web.Response(body=body, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "text/plain"})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/echo")

    async def never_reads(request: web.Request) -> web.Response:
        state.never_reads_called += 1
        return web.Response(status=201, text="ignored your body")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
        await socket_.prepare(request)
        state.upstream_sockets.append(socket_)
        state.ws_headers = dict(request.headers)
        async for message in socket_:
            if message.type is aiohttp.WSMsgType.TEXT:
                if message.data == "close-4000":
                    await socket_.close(code=4000, message=b"bye from app")
                elif message.data == "die":
                    assert request.transport is not None
                    request.transport.abort()
                else:
                    await socket_.send_str(f"echo:{message.data}")
            elif message.type is aiohttp.WSMsgType.BINARY:
                await socket_.send_bytes(message.data[::-1])
        state.upstream_close_codes.append(socket_.close_code)
        return socket_

    async def ws_forbidden(request: web.Request) -> web.Response:
        raise web.HTTPForbidden()

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"ETag": '"v1"', "X-Status": str(code)})

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/dies", dies)
    app.router.add_get("/stalls", stalls)
    app.router.add_get("/silent", silent)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/redirect", redirect)
    app.router.add_post("/never-reads", never_reads)
    app.router.add_get("/ws", ws)
    app.router.add_get("/ws-forbidden", ws_forbidden)
    app.router.add_get("/status/{code}", status)
    return app


@dataclass
class UpstreamState:
    release: asyncio.Event = field(default_factory=asyncio.Event)
    upstream_sockets: list[web.WebSocketResponse] = field(default_factory=list)
    upstream_close_codes: list[int | None] = field(default_factory=list)
    ws_headers: dict[str, str] = field(default_factory=dict)
    never_reads_called: int = 0


@dataclass
class Gateway:
    url: str
    pool: UpstreamPool
    outcomes: list[ProxyOutcome]
    session_ended: asyncio.Future[str]
    activity: list[float]

    async def outcome(self) -> ProxyOutcome:
        """The single outcome of the one request a test made (waits for on_finish)."""
        for _ in range(500):
            if self.outcomes:
                assert len(self.outcomes) == 1, self.outcomes
                return self.outcomes[0]
            await asyncio.sleep(0.01)
        raise AssertionError("on_finish was never called")


def gateway_app(pool: UpstreamPool, gateway: Gateway, *, max_body: int,
                send_timeout: float) -> web.Application:
    """The frontend's handler, reduced to what the proxy needs."""

    async def handle(request: web.Request) -> web.StreamResponse:
        upstream = pool.get("app")
        assert upstream is not None
        headers = upstream_request_headers(
            request.headers, principal=ALICE, assertion="test-assertion",
            client_ip=request.remote or "", forwarded_host="gw.example",
        )
        if is_websocket_upgrade(request.method, request.headers):
            return await proxy.proxy_websocket(
                request, upstream=upstream, headers=headers,
                session_ended=gateway.session_ended, on_finish=gateway.outcomes.append,
                on_client_message=lambda: gateway.activity.append(time.monotonic()),
                heartbeat=5.0,
            )
        return await proxy.proxy_http(
            request, upstream=upstream, headers=headers, max_body=max_body,
            on_finish=gateway.outcomes.append, send_timeout=send_timeout,
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle, expect_handler=proxy.defer_continue)
    return app


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, UpstreamState]]:
    state = UpstreamState()
    runner, url = await serve(upstream_app(state))
    yield url, state
    state.release.set()
    await runner.cleanup()


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def factory(
        upstream_url: str, *, read_timeout: float = 5.0, connect_timeout: float = 1.0,
        max_body: int = 8 * MiB, send_timeout: float = 5.0, **runner_options: Any,
    ) -> Gateway:
        settings = UpstreamSettings(
            url=upstream_url, read_timeout=duration(read_timeout),
            connect_timeout=duration(connect_timeout),
        )
        pool = await UpstreamPool.open({"app": settings})
        gateway = Gateway("", pool, [], asyncio.get_running_loop().create_future(), [])
        runner, gateway.url = await serve(
            gateway_app(pool, gateway, max_body=max_body, send_timeout=send_timeout),
            **runner_options,
        )
        cleanups.append(runner.cleanup)
        cleanups.append(pool.close)
        return gateway

    yield factory
    for cleanup in cleanups:
        await cleanup()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # A bound on every test request: a proxy that hangs must fail the test, not stall it.
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
        yield session


def proxy_idle(gateway: Gateway) -> bool:
    upstream_ = gateway.pool.get("app")
    return upstream_ is None or upstream_.active == 0


def duration(seconds: float) -> Any:
    """A config duration string (what an operator writes) for ``seconds``."""
    return f"{round(seconds * 1000)}ms"


def free_port() -> int:
    """A port nobody listens on (bound, then released: connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- streaming and pass-through --------------------------------------------------------------


async def test_get_passes_target_and_rewritten_headers(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0])
    headers = {"X-Gatewayd-User": "mallory", "X_Forwarded_For": "6.6.6.6",
               "Cookie": "__Host-gatewayd_session=secret; app=1", "Accept": "text/html"}
    target = "/echo/a%20b/%E6%97%A5?q=1&q=%2F"
    async with client.get(URL(gateway.url + target, encoded=True), headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["target"] == target  # path and query bytes passed on unchanged
    sent = {name.lower(): value for name, value in seen["headers"]}
    names = [name.lower() for name, _ in seen["headers"]]
    assert names.count("x-gatewayd-user") == 1 and sent["x-gatewayd-user"] == "alice"
    assert "x-forwarded-for" in sent and sent["x-forwarded-for"] == "127.0.0.1"
    assert "x_forwarded_for" not in names
    assert sent["cookie"] == "app=1"
    assert sent["x-gatewayd-assertion"] == "test-assertion"
    assert sent["host"] == upstream[0].removeprefix("http://")  # the upstream's own Host
    assert "user-agent" in sent  # the client's, not one invented by the gateway's client
    assert "accept-encoding" in sent and sent["accept"] == "text/html"
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error, outcome.bytes_up) == (200, None, 0)
    assert outcome.bytes_down > 0 and outcome.duration >= 0


async def test_no_invented_request_headers(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0])
    bare = aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
    async with bare, bare.get(gateway.url + "/echo") as response:
        seen = await response.json()
    names = {name.lower() for name, _ in seen["headers"]}
    assert not names & {"user-agent", "accept", "accept-encoding", "content-type"}


@pytest.mark.parametrize(
    ("size", "chunked"),
    [(0, False), (1, False), (64 * 1024, False), (3 * MiB + 7, False), (3 * MiB + 7, True)],
)
async def test_download_is_streamed_byte_exact(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, size: int, chunked: bool,
) -> None:
    gateway = await make_gateway(upstream[0])
    query = f"size={size}" + ("&chunked=1" if chunked else "")
    expected = (BLOCK * (size // len(BLOCK) + 1))[:size]
    async with client.get(f"{gateway.url}/big?{query}") as response:
        body = await response.read()
        assert response.headers.get("Content-Length") == (None if chunked else str(size))
    assert body == expected
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error, outcome.bytes_down) == (200, None, size)


@pytest.mark.parametrize("chunked", [False, True])
async def test_upload_is_streamed_byte_exact(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, chunked: bool,
) -> None:
    gateway = await make_gateway(upstream[0], max_body=8 * MiB)
    body = BLOCK * 40 + b"tail"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start:start + 100_000]

    data: Any = chunks() if chunked else body
    async with client.put(gateway.url + "/echo", data=data) as response:
        assert response.status == 200
        seen = await response.json()
    assert (seen["size"], seen["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    sent = {name.lower(): value for name, value in seen["headers"]}
    assert ("transfer-encoding" in sent) == chunked
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error, outcome.bytes_up) == (200, None, len(body))


async def test_large_download_does_not_grow_memory(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    """256 MiB through the proxy (upstream, gateway and client share this process): if any
    leg buffered the body, RSS would grow by hundreds of MiB."""
    gateway = await make_gateway(upstream[0])
    total = 256 * MiB

    async def download(size: int) -> int:
        received = 0
        async with client.get(f"{gateway.url}/big?size={size}") as response:
            async for chunk in response.content.iter_any():
                received += len(chunk)
        return received

    await download(16 * MiB)  # warm up pools and allocator arenas
    baseline, peak = rss_bytes(), 0
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample(), name="rss-sampler")
    try:
        assert await download(total) == total
    finally:
        sampling = False
        await sampler
    growth = max(peak, rss_bytes()) - baseline
    assert growth < 16 * MiB, f"RSS grew by {growth / MiB:.1f} MiB for a {total // MiB} MiB body"
    outcomes = gateway.outcomes
    assert outcomes[-1].bytes_down == total and outcomes[-1].error is None


async def test_response_headers_are_filtered(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0])
    async with client.get(gateway.url + "/cookies") as response:
        cookies = response.headers.getall("Set-Cookie")
        server = response.headers.get("Server", "")
    assert cookies == ["app=1; Path=/"]
    assert "InternalApp" not in server


async def test_encoded_body_passes_through_untouched(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0])
    async with client.get(gateway.url + "/gzip") as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert await response.read() == b"\x1f\x8b\x08\x00not-really-gzip-but-opaque"


async def test_redirects_are_passed_to_the_client_not_followed(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0])
    async with client.get(gateway.url + "/redirect", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/echo"


async def test_upstream_cookies_never_reach_the_next_user(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    """The pooled session is shared by all users: it must not keep a cookie jar. (By host
    name: aiohttp's jar would silently ignore cookies from an IP address.)"""
    gateway = await make_gateway(upstream[0].replace("127.0.0.1", "localhost"))
    async with aiohttp.ClientSession() as first, aiohttp.ClientSession() as second:
        async with first.get(gateway.url + "/cookies") as response:
            assert response.status == 200
        async with second.get(gateway.url + "/echo") as response:
            seen = await response.json()
    assert "cookie" not in {name.lower() for name, _ in seen["headers"]}


async def test_trace_is_refused_with_405(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0])
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"TRACE /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"405"
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (405, "method_not_allowed")


async def test_connect_is_refused_whatever_the_router_let_through(
    upstream: tuple[str, UpstreamState],
) -> None:
    # aiohttp's router never matches an authority-form CONNECT to a path route; the proxy
    # refuses it anyway, without contacting the upstream.
    pool = await UpstreamPool.open({"app": UpstreamSettings(url=upstream[0])})
    outcomes: list[ProxyOutcome] = []
    upstream_ = pool.get("app")
    assert upstream_ is not None
    try:
        response = await proxy.proxy_http(
            make_mocked_request("CONNECT", "/echo"), upstream=upstream_, headers={},
            max_body=0, on_finish=outcomes.append,
        )
    finally:
        await pool.close()
    assert response.status == 405
    assert [(o.status, o.error) for o in outcomes] == [(405, "method_not_allowed")]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("HEAD", "/big?size=5000", 200), ("GET", "/status/204", 204),
    ("GET", "/status/304", 304), ("GET", "/status/404", 404), ("GET", "/status/503", 503),
])
async def test_bodyless_and_error_statuses_pass_through(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, method: str, path: str, status: int,
) -> None:
    gateway = await make_gateway(upstream[0])
    async with client.request(method, gateway.url + path) as response:
        assert response.status == status
        assert await response.read() == b""
        if method == "HEAD":
            assert response.headers["Content-Length"] == "5000"
        else:
            assert response.headers["X-Status"] == str(status)
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error, outcome.bytes_down) == (status, None, 0)


async def test_absolute_form_target_is_refused_not_sent_elsewhere(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0])
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET http://evil.example/echo HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"400"
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (400, "bad_request_target")


def test_url_for_refuses_other_target_forms() -> None:
    async def build(target: str) -> str:
        pool = await UpstreamPool.open({"a": UpstreamSettings(url="http://10.0.0.1:8080")})
        upstream_ = pool.get("a")
        assert upstream_ is not None
        try:
            return str(upstream_.url_for(target))
        finally:
            await pool.close()

    for target in ("http://evil.example/x", "evil.example:443", "*", ""):
        with pytest.raises(ValueError, match="origin-form"):
            asyncio.run(build(target))


# --- body limits -----------------------------------------------------------------------------


async def test_content_length_over_limit_is_413_without_contacting_upstream(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    url, state = upstream
    gateway = await make_gateway(url, max_body=1000)
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /never-reads HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.split()[1] == b"413"
    assert b"connection: close" in head.lower()
    assert state.never_reads_called == 0
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (413, "request_too_large")


@pytest.mark.parametrize(("content_length", "body_complete", "keep_alive"),
                         [("2000", False, False), ("2000", True, True)])
async def test_any_error_renderer_gets_connection_close_when_a_body_is_left_unread(
    upstream: tuple[str, UpstreamState], content_length: str, body_complete: bool,
    keep_alive: bool,
) -> None:
    pool = await UpstreamPool.open({"app": UpstreamSettings(url=upstream[0])})
    upstream_ = pool.get("app")
    assert upstream_ is not None
    body = StreamReader(mock.Mock(_reading_paused=False), 2**16,
                        loop=asyncio.get_running_loop())
    body.feed_data(b"x" * 10)
    if body_complete:
        body.feed_eof()
    request = make_mocked_request("POST", "/echo", headers={"Content-Length": content_length},
                                  payload=body)
    try:
        response = await proxy.proxy_http(
            request, upstream=upstream_, headers={}, max_body=1000, on_finish=lambda _: None,
            error_response=lambda status, error: web.json_response({"error": error},
                                                                   status=status),
        )
    finally:
        await pool.close()
    assert response.status == 413
    assert response.keep_alive is (None if keep_alive else False)


@pytest.mark.parametrize(("size", "expected"), [(1000, 200), (1001, 413), (5 * MiB, 413)])
async def test_chunked_body_is_counted_against_the_limit(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory, size: int, expected: int,
) -> None:
    """A client streaming a chunked body: it must get the 413 while still sending (then it
    stops, as a browser does), and the upstream must never see more than the limit."""
    gateway = await make_gateway(upstream[0], max_body=1000)
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")

    async def send_body() -> None:
        for start in range(0, size, 300):
            piece = min(300, size - start)
            writer.write(f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    sender = asyncio.create_task(send_body(), name="chunked-sender")
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            if not sender.done():
                sender.cancel()  # stops between two chunks (cancelled only while draining)
                await asyncio.gather(sender, return_exceptions=True)
                # End the body instead of vanishing: otherwise the gateway keeps reading and
                # discarding for aiohttp's lingering_time (10 s) so that clients see the 413.
                writer.write(b"0\r\n\r\n")
            if b"connection: close" in head.lower():
                await reader.read()  # until the gateway has closed its side
    finally:
        sender.cancel()
        writer.close()
    assert head.split()[1] == str(expected).encode()
    outcome = await gateway.outcome()
    assert outcome.status == expected
    if expected == 413:
        # Only what was passed on is counted: never the chunk that crossed the limit.
        assert outcome.error == "request_too_large" and outcome.bytes_up <= 1000
    else:
        assert (outcome.error, outcome.bytes_up) == (None, size)


# --- Expect: 100-continue ----------------------------------------------------------------------


async def expect_exchange(gateway_url: str, head: bytes, body: bytes) -> tuple[list[bytes], bytes]:
    """Send ``head`` (with ``Expect``), then ``body`` only once a 100 came; returns the interim
    status lines and the final response head."""
    host, port = gateway_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    interim: list[bytes] = []
    try:
        async with asyncio.timeout(5):
            while True:
                response = await reader.readuntil(b"\r\n\r\n")
                if response.split()[1] != b"100":
                    return interim, response
                interim.append(response.split(b"\r\n")[0])
                writer.write(body)
    finally:
        writer.close()


@pytest.mark.parametrize("framing", [b"Content-Length: 11", b"Transfer-Encoding: chunked"])
async def test_expect_continue_is_answered_when_the_body_is_wanted(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory, framing: bytes,
) -> None:
    gateway = await make_gateway(upstream[0])
    body = b"hello world" if b"Content" in framing else b"b\r\nhello world\r\n0\r\n\r\n"
    interim, final = await expect_exchange(
        gateway.url, b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        + framing + b"\r\n\r\n", body)
    assert interim == [b"HTTP/1.1 100 Continue"]
    assert final.split()[1] == b"200"
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.bytes_up, outcome.error) == (200, 11, None)


@pytest.mark.parametrize(("target", "length", "status", "error"), [
    ("/echo", 1001, b"413", "request_too_large"),  # refused by Content-Length
    ("refused", 10, b"502", "upstream_refused"),    # the upstream cannot take it anyway
])
async def test_expect_continue_is_not_sent_for_a_refused_body(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory, target: str,
    length: int, status: bytes, error: str,
) -> None:
    url = f"http://127.0.0.1:{free_port()}" if target == "refused" else upstream[0]
    gateway = await make_gateway(url, max_body=1000)
    interim, final = await expect_exchange(
        gateway.url, b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % length, b"x" * length)
    assert (interim, final.split()[1]) == ([], status)
    assert (await gateway.outcome()).error == error


async def test_http10_and_unknown_expectations(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    """HTTP/1.0 has no 100 Continue (its body follows at once); anything but 100-continue is
    refused with 417 before the upstream is contacted."""
    gateway = await make_gateway(upstream[0])
    interim, final = await expect_exchange(
        gateway.url, b"PUT /echo HTTP/1.0\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\n\r\nok", b"")
    assert (interim, final.split()[1]) == ([], b"200")
    assert (await gateway.outcome()).bytes_up == 2
    gateway.outcomes.clear()
    interim, final = await expect_exchange(
        gateway.url, b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: tea\r\n"
        b"Content-Length: 2\r\n\r\n", b"ok")
    assert (interim, final.split()[1]) == ([], b"417")
    assert b"connection: close" in final.lower()
    assert gateway.outcomes == []  # the handler never ran


# --- upstream failures -----------------------------------------------------------------------


async def test_refused_upstream_is_502_within_a_second(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(f"http://127.0.0.1:{free_port()}", connect_timeout=5.0)
    started = time.monotonic()
    async with client.get(gateway.url + "/anything") as response:
        assert response.status == 502
        assert response.headers["Cache-Control"] == "no-store"
    assert time.monotonic() - started < 1.0
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (502, "upstream_refused")


async def test_unresolvable_upstream_is_502(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway("http://no-such-host.invalid:8080")
    async with client.get(gateway.url + "/x") as response:
        assert response.status == 502
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (502, "upstream_unreachable")


@contextlib.asynccontextmanager
async def unanswered_listener() -> AsyncIterator[int]:
    """A port whose accept queue is full, so new connections hang in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the (backlog + 1) queue; later SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()


async def test_connect_timeout_is_502(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession,
) -> None:
    async with unanswered_listener() as port:
        gateway = await make_gateway(f"http://127.0.0.1:{port}", connect_timeout=0.3)
        started = time.monotonic()
        async with client.get(gateway.url + "/x") as response:
            assert response.status == 502
        assert time.monotonic() - started < 2.0
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (502, "upstream_connect_timeout")


async def test_silent_upstream_is_504_after_read_timeout(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0], read_timeout=0.3)
    started = time.monotonic()
    async with client.get(gateway.url + "/silent") as response:
        assert response.status == 504
    assert 0.25 < time.monotonic() - started < 2.0
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (504, "upstream_timeout")


@pytest.mark.parametrize("chunked", [False, True])
async def test_upstream_dying_mid_body_aborts_the_client_stream(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, chunked: bool,
) -> None:
    gateway = await make_gateway(upstream[0])
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):  # never a clean, silently short body
        async with client.get(gateway.url + "/dies" + ("?chunked=1" if chunked else "")) as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += len(chunk)
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (200, "upstream_disconnected")
    # bytes_down counts what was handed to the client's transport; the abort may discard the
    # tail still in its buffer (a busy machine), so the client can have less — never more.
    assert outcome.bytes_down == 4 * len(BLOCK) and received <= outcome.bytes_down
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


async def test_upstream_stalling_mid_body_aborts_after_read_timeout(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0], read_timeout=0.3)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(gateway.url + "/stalls") as response:
            assert response.status == 200
            await response.read()
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (200, "upstream_timeout")


async def raw_upstream(reply: bytes | None) -> tuple[asyncio.Server, str]:
    """An upstream that reads the request head, then writes ``reply`` and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if reply:
                writer.write(reply)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (None, "upstream_disconnected"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "upstream_disconnected"),
        (b"garbage\r\n\r\n", "upstream_bad_response"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "upstream_bad_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
         "upstream_bad_response"),
    ],
)
async def test_broken_upstream_responses_are_502(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession,
    reply: bytes | None, error: str,
) -> None:
    server, url = await raw_upstream(reply)
    try:
        gateway = await make_gateway(url)
        async with client.get(gateway.url + "/x") as response:
            assert response.status == 502
        outcome = await gateway.outcome()
        assert (outcome.status, outcome.error) == (502, error)
    finally:
        server.close()


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """An https:// upstream with a certificate from a private CA; yields (url, CA file)."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    ca_file = tmp_path / "internal-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    runner = web.AppRunner(upstream_app(UpstreamState()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}", ca_file
    await runner.cleanup()


@pytest.mark.parametrize(("trust_ca", "status", "error"),
                         [(True, 200, None), (False, 502, "upstream_tls_error")])
async def test_https_upstream_is_verified_against_its_ca(
    tls_upstream: tuple[str, Path], client: aiohttp.ClientSession,
    trust_ca: bool, status: int, error: str | None,
) -> None:
    url, ca_file = tls_upstream
    settings = UpstreamSettings(url=url, tls_ca_file=ca_file if trust_ca else None)
    pool = await UpstreamPool.open({"app": settings})
    gateway = Gateway("", pool, [], asyncio.get_running_loop().create_future(), [])
    runner, gateway.url = await serve(gateway_app(pool, gateway, max_body=0, send_timeout=5))
    try:
        async with client.get(gateway.url + "/echo") as response:
            assert response.status == status
        outcome = await gateway.outcome()
        assert (outcome.status, outcome.error) == (status, error)
    finally:
        await runner.cleanup()
        await pool.close()


async def test_stale_keepalive_connection_is_retried_once_for_get() -> None:
    """The first connection answers one request and is closed by the upstream while idle;
    the next GET must not see a 502 for it."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            # Keep-alive promised, but the next request on this connection is answered by a
            # close — what a keep-alive timeout race looks like from the client.
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = await UpstreamPool.open({"app": UpstreamSettings(url=url)})
    outcomes: list[ProxyOutcome] = []
    gateway = Gateway("", pool, outcomes, asyncio.get_running_loop().create_future(), [])
    runner, gateway_url = await serve(gateway_app(pool, gateway, max_body=0, send_timeout=5))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(gateway_url + "/x") as response:
                    assert (response.status, await response.text()) == (200, "ok")
        assert [o.status for o in outcomes] == [200, 200, 200]
        assert served == 3
    finally:
        await runner.cleanup()
        await pool.close()
        server.close()


# --- client going away -----------------------------------------------------------------------


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_disconnect_mid_stream_is_quiet(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture, handler_cancellation: bool,
) -> None:
    gateway = await make_gateway(upstream[0], handler_cancellation=handler_cancellation)
    caplog.set_level(logging.DEBUG)
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /big?size={512 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readexactly(256 * 1024)
    writer.transport.abort()
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (200, "client_disconnected")
    assert outcome.bytes_down < 512 * MiB
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_client_that_stops_reading_is_cut_after_send_timeout(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0], send_timeout=0.3)
    host, port = gateway.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port), limit=2**16)
    writer.transport.set_write_buffer_limits(0)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(f"GET /big?size={256 * MiB} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    writer.transport.pause_reading()  # a client that never reads again
    outcome = await gateway.outcome()
    writer.close()
    assert (outcome.status, outcome.error) == (200, "client_timeout")


async def test_client_disconnect_while_waiting_for_upstream_with_cancellation(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0], handler_cancellation=True)
    host, port = gateway.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /silent HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (499, "client_disconnected")


async def test_client_vanishing_during_upload(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0])
    host, port = gateway.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (499, "client_disconnected")


async def test_client_silent_during_upload_gets_408(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(upstream[0], send_timeout=0.2)
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"408"
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (408, "client_timeout")


async def test_broken_chunked_upload_never_completes_upstream(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
) -> None:
    """Broken framing mid-body (a real socket): the upstream request is never completed and
    the client gets a 4xx (aiohttp 3.14 does not hand the framing error to a streaming
    reader, so it is the send_timeout that ends the wait: 408)."""
    gateway = await make_gateway(upstream[0], send_timeout=0.3)
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\nhello\r\n")
    await writer.drain()
    for _ in range(100):  # the body is streaming upstream: the handler is running
        if not proxy_idle(gateway):
            break
        await asyncio.sleep(0.01)
    writer.write(b"zz\r\n")  # not a chunk size
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    writer.close()
    outcome = await gateway.outcome()
    assert (int(status_line.split()[1]), outcome.status) in ((400, 400), (408, 408))
    assert outcome.error in ("bad_request_body", "client_timeout")


async def test_client_body_framing_error_is_400(upstream: tuple[str, UpstreamState]) -> None:
    """The mapping itself, with a request body stream that fails as aiohttp's parser fails."""
    pool = await UpstreamPool.open({"app": UpstreamSettings(url=upstream[0])})
    upstream_ = pool.get("app")
    assert upstream_ is not None
    protocol = mock.Mock(_reading_paused=False)
    body = StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    body.feed_data(b"hello")
    body.set_exception(TransferEncodingError("Not enough data to satisfy transfer length"))
    request = make_mocked_request("PUT", "/echo", headers={"Transfer-Encoding": "chunked"},
                                  payload=body)
    outcomes: list[ProxyOutcome] = []
    try:
        response = await proxy.proxy_http(request, upstream=upstream_, headers={},
                                          max_body=1000, on_finish=outcomes.append)
    finally:
        await pool.close()
    assert response.status == 400
    assert [(o.status, o.error) for o in outcomes] == [(400, "bad_request_body")]


async def test_on_finish_failure_is_logged_not_raised(
    upstream: tuple[str, UpstreamState], caplog: pytest.LogCaptureFixture,
) -> None:
    pool = await UpstreamPool.open({"app": UpstreamSettings(url=upstream[0])})

    def broken(outcome: ProxyOutcome) -> None:
        raise RuntimeError("audit is down")

    async def handle(request: web.Request) -> web.StreamResponse:
        upstream_ = pool.get("app")
        assert upstream_ is not None
        return await proxy.proxy_http(request, upstream=upstream_, headers={}, max_body=0,
                                      on_finish=broken)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/echo") as response:
            assert response.status == 200
        assert any("on_finish" in r.getMessage() for r in caplog.records)
    finally:
        await runner.cleanup()
        await pool.close()


# --- the pool --------------------------------------------------------------------------------


async def test_pool_reconfigure_keeps_unchanged_and_drains_replaced(
    upstream: tuple[str, UpstreamState], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proxy, "RETIRE_GRACE", 0.0)
    first = UpstreamSettings(url=upstream[0])
    pool = await UpstreamPool.open({"a": first, "b": first})
    a, b = pool.get("a"), pool.get("b")
    assert a is not None and b is not None
    with b.lease():  # an in-flight request on the upstream about to be replaced
        await pool.reconfigure({"a": first, "b": UpstreamSettings(url=upstream[0],
                                                                  read_timeout="1s")})
        assert pool.get("a") is a  # unchanged: same pool, connections kept
        assert pool.get("b") is not b
        await asyncio.sleep(0.05)
        assert not b.session.closed  # still in use
    for _ in range(100):
        if b.session.closed:
            break
        await asyncio.sleep(0.01)
    assert b.session.closed
    await pool.reconfigure({})
    assert pool.names() == frozenset()
    await pool.close()
    assert a.session.closed


async def test_pool_rejects_unreadable_ca_file_and_changes_nothing(
    upstream: tuple[str, UpstreamState], tmp_path: Path,
) -> None:
    pool = await UpstreamPool.open({"a": UpstreamSettings(url=upstream[0])})
    before = pool.get("a")
    bad = UpstreamSettings(url="https://internal.example", tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(UpstreamConfigError, match=r"upstreams\.b"):
        await pool.reconfigure({"a": UpstreamSettings(url=upstream[0], read_timeout="2s"),
                                "b": bad})
    assert pool.get("a") is before and pool.get("b") is None
    await pool.close()


def test_url_for_keeps_the_raw_target() -> None:
    async def build() -> str:
        pool = await UpstreamPool.open({"a": UpstreamSettings(url="http://10.0.0.1:8080")})
        upstream_ = pool.get("a")
        assert upstream_ is not None
        try:
            return str(upstream_.url_for("/files/a%2Fb/%7e?x=%20&y=a+b"))
        finally:
            await pool.close()

    assert asyncio.run(build()) == "http://10.0.0.1:8080/files/a%2Fb/%7e?x=%20&y=a+b"


# --- WebSocket -------------------------------------------------------------------------------


async def open_ws(
    client: aiohttp.ClientSession, gateway: Gateway, path: str = "/ws", **options: Any
) -> aiohttp.ClientWebSocketResponse:
    timeout = aiohttp.ClientWSTimeout(ws_receive=5.0, ws_close=5.0)
    return await client.ws_connect(gateway.url + path, timeout=timeout, **options)


async def test_websocket_echo_both_ways_with_subprotocol_and_identity(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    url, state = upstream
    gateway = await make_gateway(url, read_timeout=0.2)
    ws = await open_ws(client, gateway, protocols=("chat.v1", "other"),
                       headers={"X-Gatewayd-User": "mallory"})
    assert ws.protocol == "chat.v1"
    await ws.send_str("hello")
    assert (await ws.receive_str()) == "echo:hello"
    await asyncio.sleep(0.4)  # idle longer than read_timeout: a quiet chat is not a dead one
    await ws.send_bytes(b"\x01\x02\x03")
    assert (await ws.receive_bytes()) == b"\x03\x02\x01"
    await ws.close(code=1000)
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (101, None)
    assert (outcome.bytes_up, outcome.bytes_down) == (5 + 3, 10 + 3)
    assert state.ws_headers["X-Gatewayd-User"] == "alice"
    assert state.upstream_close_codes == [1000]
    assert len(gateway.activity) == 2


@pytest.mark.parametrize(("reason", "code"), [("logout", 1008), ("admin_kill", 1008),
                                              ("policy_changed", 1008), ("shutdown", 1001)])
async def test_websocket_closes_when_the_session_ends(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, reason: str, code: int,
) -> None:
    url, state = upstream
    gateway = await make_gateway(url)
    ws = await open_ws(client, gateway)
    await ws.send_str("hi")
    assert (await ws.receive_str()) == "echo:hi"
    started = time.monotonic()
    gateway.session_ended.set_result(reason)
    message = await ws.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert (message.data, message.extra) == (code, reason)
    outcome = await gateway.outcome()
    assert time.monotonic() - started < 3.0
    assert (outcome.status, outcome.error) == (101, "session_ended")
    for _ in range(100):
        if state.upstream_close_codes:
            break
        await asyncio.sleep(0.01)
    assert state.upstream_close_codes == [code]


async def test_websocket_refused_when_session_already_ended(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    url, state = upstream
    gateway = await make_gateway(url)
    gateway.session_ended.set_result("logout")
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await open_ws(client, gateway)
    assert raised.value.status == 401
    assert state.upstream_sockets == []


async def test_websocket_upstream_close_code_is_passed_on(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0])
    ws = await open_ws(client, gateway)
    await ws.send_str("close-4000")
    message = await ws.receive()
    assert (message.type, message.data, message.extra) == (aiohttp.WSMsgType.CLOSE, 4000,
                                                           "bye from app")
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (101, None)


async def test_websocket_upstream_dying_closes_client_with_1014(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(upstream[0])
    ws = await open_ws(client, gateway)
    await ws.send_str("die")
    message = await ws.receive()
    assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1014)
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (101, "upstream_disconnected")


async def test_websocket_client_vanishing_closes_upstream(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    url, state = upstream
    gateway = await make_gateway(url)
    ws = await open_ws(client, gateway)
    await ws.send_str("hi")
    await ws.receive_str()
    assert ws._response.connection is not None
    transport = ws._response.connection.transport
    assert transport is not None
    transport.abort()
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (101, "client_disconnected")
    for _ in range(100):
        if state.upstream_close_codes:
            break
        await asyncio.sleep(0.01)
    assert state.upstream_close_codes == [1001]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_websocket_handler_on_a_plain_request_is_400(
    upstream: tuple[str, UpstreamState],
) -> None:
    pool = await UpstreamPool.open({"app": UpstreamSettings(url=upstream[0])})
    upstream_ = pool.get("app")
    assert upstream_ is not None
    outcomes: list[ProxyOutcome] = []
    try:
        response = await proxy.proxy_websocket(
            make_mocked_request("GET", "/ws"), upstream=upstream_, headers={},
            session_ended=asyncio.get_running_loop().create_future(),
            on_finish=outcomes.append,
        )
    finally:
        await pool.close()
    assert response.status == 400
    assert [(o.status, o.error) for o in outcomes] == [(400, "not_websocket")]
    assert upstream[1].upstream_sockets == []


async def test_websocket_activity_callback_failure_does_not_break_the_chat(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(upstream[0])
    gateway.activity = None  # type: ignore[assignment]  # .append now raises AttributeError
    ws = await open_ws(client, gateway)
    for word in ("one", "two"):
        await ws.send_str(word)
        assert (await ws.receive_str()) == f"echo:{word}"
    await ws.close()
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (101, None)
    assert any("on_client_message" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("path", "status", "error"), [
    ("/ws-forbidden", 403, "upstream_refused_websocket"),
    ("/echo", 502, "upstream_refused_websocket"),  # 200 instead of 101
])
async def test_websocket_upstream_handshake_refusal(
    upstream: tuple[str, UpstreamState], make_gateway: GatewayFactory,
    client: aiohttp.ClientSession, path: str, status: int, error: str,
) -> None:
    gateway = await make_gateway(upstream[0])
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await open_ws(client, gateway, path)
    assert raised.value.status == status
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (status, error)


async def test_websocket_to_refused_upstream_is_502(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
        await open_ws(client, gateway)
    assert raised.value.status == 502
    outcome = await gateway.outcome()
    assert (outcome.status, outcome.error) == (502, "upstream_refused")


# --- the send timeout (one timer per response) ------------------------------------------------


async def test_send_timeout_cuts_a_write_that_takes_too_long() -> None:
    loop = asyncio.get_running_loop()
    sending = proxy._SendTimeout(loop, 0.05)
    started = loop.time()
    with pytest.raises(TimeoutError), sending:
        await asyncio.sleep(5)
    assert 0.04 <= loop.time() - started < 1.0
    sending.close()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the timeout's own cancel was undone


async def test_send_timeout_is_per_write_and_idle_between_writes() -> None:
    """Many quick writes that together take far longer than the timeout, and a long wait for
    the upstream between two of them, are all fine: only one write may not take too long."""
    loop = asyncio.get_running_loop()
    sending = proxy._SendTimeout(loop, 0.05)
    for _ in range(8):
        with sending:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.15)  # waiting for the upstream: not a send
    with sending:
        await asyncio.sleep(0.02)
    sending.close()
    await asyncio.sleep(0.1)  # a closed timer never fires


async def test_send_timeout_leaves_an_outside_cancellation_alone() -> None:
    loop = asyncio.get_running_loop()
    entered = asyncio.Event()

    async def send() -> None:
        sending = proxy._SendTimeout(loop, 0.2)
        try:
            with sending:
                entered.set()
                await asyncio.sleep(5)
        finally:
            sending.close()

    task = asyncio.create_task(send())
    await entered.wait()
    task.cancel()  # a shutdown or a client that went away, not a slow client
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_send_timeout_and_an_outside_cancellation_at_once_stay_a_cancellation() -> None:
    loop = asyncio.get_running_loop()

    async def send() -> None:
        sending = proxy._SendTimeout(loop, 60)
        try:
            with sending:
                sending._deadline = loop.time() - 1  # this write is overdue ...
                sending._check()  # ... its timer fires and cancels the task,
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # and so does someone else (a shutdown), in the same instant
                await asyncio.sleep(1)
        finally:
            sending.close()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(send())
