"""Strict reading of the gateway's own HTML form posts (login, step-up, logout).

Owns the rules a form body must meet before any field reaches authentication: the media type
(``application/x-www-form-urlencoded``, UTF-8), a size bound enforced while reading (so a
client cannot make the gateway buffer more than ``max_bytes``), ASCII-only body text (browsers
percent-encode everything else), valid UTF-8 after percent-decoding, a bounded number of
fields, no field given twice (which copy would count?) and a length bound per field. Every
violation is a `FormError` carrying the 4xx status to answer with — never a 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web

from gatewayd.https.proxy import send_continue

FORM_TYPE: Final = "application/x-www-form-urlencoded"
MAX_FIELDS: Final = 16


class FormError(Exception):
    """The form cannot be read; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_form(
    request: web.BaseRequest, *, max_bytes: int, limits: Mapping[str, int]
) -> dict[str, str]:
    """The fields named in ``limits`` (name -> max characters); absent fields are ''."""
    _check_media_type(request)
    body = await read_body(request, max_bytes)
    if body is None:
        raise FormError(413, "The form is too large.")
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(
            text, keep_blank_values=True, encoding="utf-8", errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise FormError(400, "The form is not valid UTF-8 text.") from None
    except ValueError:
        raise FormError(400, "The form has too many fields.") from None
    return _select_fields(pairs, limits)


def _check_media_type(request: web.BaseRequest) -> None:
    declared = request.headers.get("Content-Type", "")
    media_type, _, parameters = declared.partition(";")
    if media_type.strip().lower() != FORM_TYPE:
        raise FormError(415, "The form must be sent as application/x-www-form-urlencoded.")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8", "utf8"
        ):
            raise FormError(415, "The form must be sent as UTF-8.")


async def read_body(request: web.BaseRequest, max_bytes: int) -> bytes | None:
    """The whole request body, or None when it is (declared or turns out) over ``max_bytes``.

    A pending ``Expect: 100-continue`` is answered first: the gateway's routes never send the
    100 up front (`proxy.defer_continue`), so a handler that decides to read a body says so.
    A body declared too large is refused before the 100, so it is never invited.
    """
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        return None
    send_continue(request)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(max_bytes + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return None


def _select_fields(pairs: list[tuple[str, str]], limits: Mapping[str, int]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name not in limits:
            continue  # browsers and password managers add fields of their own
        if name in fields:
            raise FormError(400, f"The form field {name!r} was sent twice.")
        if len(value) > limits[name]:
            raise FormError(400, f"The form field {name!r} is too long.")
        fields[name] = value
    return {name: fields.get(name, "") for name in limits}
