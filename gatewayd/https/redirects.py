"""Where the gateway may send a browser back to: the open-redirect-safe ``next`` parameter.

Owns `safe_next`, the single check every ``next=`` value (login, step-up) passes before it
becomes a ``Location`` header. Only a same-origin, origin-relative path is accepted; anything
a browser could read as another origin, or that needs repair to be read at all, becomes the
portal ``/``. Browsers are generous readers, so the rules are strict:

* it must start with exactly one ``/`` — ``//evil``, ``/\\evil``, ``https:``, ``javascript:``
  and every other scheme or authority form is refused;
* no backslash anywhere (WHATWG URL parsers treat ``\\`` as ``/`` in http(s) URLs);
* no control characters, spaces, or non-ASCII (browsers strip tab/CR/LF from URLs, so
  ``/\\t/evil`` would become ``//evil``; non-ASCII must arrive percent-encoded);
* percent-decoding it (up to three times, for double and triple encoding) must never produce
  one of the refused forms — ``/%2F%2Fevil``, ``/%5Cevil``, ``%2F%2Fevil`` are refused even
  though a browser would not decode them in a path, because some upstream or
  some future code might;
* gateway endpoints that would loop (login, logout, step-up) lead to the portal instead.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote, urlsplit

PORTAL: Final = "/"
MAX_NEXT_LENGTH: Final = 2048
# Printable ASCII without space and backslash.
_ALLOWED: Final = re.compile(r"[!-\[\]-~]*")
_LOOPING_PREFIXES: Final = ("/.gatewayd/login", "/.gatewayd/logout", "/.gatewayd/stepup")
_DECODE_ROUNDS: Final = 3


def safe_next(value: str | None) -> str:
    """``value`` if it is a safe same-origin path (with optional query), else ``"/"``."""
    if not value or len(value) > MAX_NEXT_LENGTH or not _ALLOWED.fullmatch(value):
        return PORTAL
    candidate = value
    for _ in range(_DECODE_ROUNDS + 1):
        if not _is_origin_relative_path(candidate):
            return PORTAL
        decoded = unquote(candidate, errors="replace")
        if decoded == candidate:
            break
        candidate = decoded
    if value.startswith(_LOOPING_PREFIXES):
        return PORTAL
    return value


def _is_origin_relative_path(text: str) -> bool:
    if not text.startswith("/") or text.startswith(("//", "/\\")):
        return False
    if "\\" in text or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return False
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme == "" and parts.netloc == ""
