"""Tests for gatewayd.https.forms: every malformed form post is a 4xx, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gatewayd.https.forms import FormError, read_form

LIMITS = {"username": 16, "password": 32, "next": 64}
FORM = "application/x-www-form-urlencoded"


async def handler(request: web.Request) -> web.Response:
    try:
        fields = await read_form(request, max_bytes=256, limits=LIMITS)
    except FormError as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    return web.json_response(fields)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


async def post(url: str, body: bytes, content_type: str | None = FORM,
               chunked: bool = False) -> tuple[int, dict[str, str]]:
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession() as client:
        if chunked:
            async def gen() -> AsyncIterator[bytes]:
                yield body
            data: object = gen()
        else:
            data = body
        async with client.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize(("body", "expected"), [
    (b"username=alice&password=s3cret&next=%2Fgroupware%2F",
     {"username": "alice", "password": "s3cret", "next": "/groupware/"}),
    (b"username=%E5%B1%B1%E7%94%B0&password=a+b", {"username": "山田", "password": "a b", "next": ""}),
    (b"", {"username": "", "password": "", "next": ""}),
    (b"username=bob&unknown=1&autofill=x", {"username": "bob", "password": "", "next": ""}),
    (b"password=p%3D%26q", {"username": "", "password": "p=&q", "next": ""}),
])
async def test_good_forms_are_read(url: str, body: bytes, expected: dict[str, str]) -> None:
    assert await post(url, body) == (200, expected)


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"username=alice&username=mallory", FORM, 400),          # which one counts?
    (b"username=" + b"a" * 17, FORM, 400),                     # field over its limit
    (b"username=%FF%FE", FORM, 400),                           # not UTF-8 after decoding
    (b"username=%C0%AE", FORM, 400),                           # overlong UTF-8
    (b"username=\xff\xfe", FORM, 400),                         # raw non-ASCII bytes
    (b"username=\xe5\xb1\xb1", FORM, 400),                     # raw UTF-8 is not urlencoded
    (b"&".join(b"f%d=1" % i for i in range(40)), FORM, 400),   # too many fields
    (b"x=" + b"a" * 300, FORM, 413),                           # body over max_bytes
    (b"username=alice", "multipart/form-data; boundary=x", 415),
    (b"username=alice", "application/json", 415),
    (b"username=alice", "text/plain", 415),
    (b"username=alice", None, 415),
    (b"username=alice", FORM + "; charset=iso-8859-1", 415),
    (b"username=alice", "application/x-www-form-urlencodedx", 415),
])
async def test_bad_forms_get_a_client_error(url: str, body: bytes, content_type: str | None,
                                            status: int) -> None:
    got, _ = await post(url, body, content_type)
    assert got == status


async def test_charset_utf8_is_accepted(url: str) -> None:
    status, fields = await post(url, b"username=a", FORM + '; charset="UTF-8"')
    assert status == 200 and fields["username"] == "a"


async def test_a_chunked_body_is_bounded_while_reading(url: str) -> None:
    assert (await post(url, b"x=" + b"a" * 1000, chunked=True))[0] == 413
    assert (await post(url, b"username=c", chunked=True)) == (
        200, {"username": "c", "password": "", "next": ""})
