"""Request-path normalisation: the one place that turns a raw request target into the path
that routes and rules are matched against, or refuses it as ambiguous.

The gateway and the upstream application must agree on which resource a request names. Any
target that two reasonable servers could read differently is refused here, never guessed:

* the query string (after the first ``?``) is split off first and plays no part in matching;
* the path must start with ``/`` (no absolute-form, authority-form or ``*`` targets);
* raw characters outside printable ASCII (space, controls, DEL, non-ASCII bytes) are refused:
  RFC 3986 requires them to be percent-encoded, and servers differ in how they repair them;
* a raw backslash, ``#`` or ``;`` is refused (Windows servers read ``\\`` as ``/``; ``;``
  starts path parameters that Java servers strip, so ``/x/..;/y`` walks upwards there);
* empty segments (``//``) and dot-segments (``.``, ``..``) are refused;
* a segment ending in ``.`` or a space (raw, ``%20``, or a character that is one under NFKC)
  is refused: Windows strips trailing dots and spaces from names, so on IIS or a share
  behind WebDAV ``/.git./config`` and ``/.git%20/config`` open ``/.git/config`` while a
  deny rule for ``.git`` sees a different name;
* percent-escapes must be ``%`` plus two hex digits, must not encode ``/``, ``.``, ``\\``,
  NUL or a control character, must decode to valid UTF-8 (overlong forms such as ``%c0%ae``
  are invalid UTF-8) and must not leave another escape behind (``%252e``: double encoding);
* a decoded non-ASCII segment must not turn into a separator or a dot-segment under Unicode
  compatibility normalisation (NFKC), as some servers apply it (two U+FF0E fullwidth full
  stops are ``..`` under NFKC).

What remains is decoded (``%20`` becomes a space, ``%E6%97%A5`` becomes 日) and returned,
with its case kept: routes and allow rules match it case-sensitively, deny rules casefolded
(see `compiler`), so that case-insensitive upstreams cannot be reached around a deny rule.
"""

from __future__ import annotations

import re
import unicodedata
from types import MappingProxyType

# Unreserved and sub-delim characters plus ':' and '@' (RFC 3986 pchar) without '%' and ';':
# a path made only of these needs no decoding, so the common case takes one regex.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")
_DOT_SEGMENT = re.compile(r"/\.\.?(?=/|$)")
# A segment ending in '.' (dot-segments included): one search covers both in the fast path.
_DOT_AT_SEGMENT_END = re.compile(r"\.(?=/|$)")
_WINDOWS_STRIPS = (".", " ")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")

# Bytes that must never arrive percent-encoded, with the reason given to the operator.
_FORBIDDEN_ENCODED = MappingProxyType({
    0x2F: "percent-encoded '/' (%2F)",
    0x2E: "percent-encoded '.' (%2E)",
    0x5C: "percent-encoded backslash (%5C)",
    0x00: "percent-encoded NUL (%00)",
})
_RAW_REFUSALS = MappingProxyType({
    "\\": "backslash in path",
    "#": "fragment ('#') in request target",
    ";": "path parameter (';') in path",
})


class AmbiguousPathError(ValueError):
    """The request path could be read in more than one way; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def strip_query(raw_target: str) -> str:
    """The path part of a request target: everything before the first '?'."""
    return raw_target.partition("?")[0]


def normalize_path(raw_target: str) -> str:
    """Return the decoded path of `raw_target` or raise `AmbiguousPathError`."""
    path = strip_query(raw_target)
    if not path.startswith("/"):
        raise AmbiguousPathError("path does not start with '/'")
    if _PLAIN_PATH.fullmatch(path):
        if _DOT_AT_SEGMENT_END.search(path):
            if _DOT_SEGMENT.search(path):
                raise AmbiguousPathError("dot-segment ('.' or '..') in path")
            raise _trailing_dot_or_space()
        return path
    _refuse_raw_characters(path)
    segments = path[1:].split("/")
    last = len(segments) - 1
    decoded: list[str] = []
    for index, segment in enumerate(segments):
        if segment == "" and index != last:
            raise AmbiguousPathError("empty path segment ('//')")
        if segment in (".", ".."):
            raise AmbiguousPathError("dot-segment ('.' or '..') in path")
        text = _decode_segment(segment)
        if text.endswith(_WINDOWS_STRIPS):
            raise _trailing_dot_or_space()
        decoded.append(text)
    return "/" + "/".join(decoded)


def _trailing_dot_or_space() -> AmbiguousPathError:
    return AmbiguousPathError(
        "path segment ends in '.' or space (Windows servers strip them: '.git.' is '.git')"
    )


def _refuse_raw_characters(path: str) -> None:
    for char in path:
        refusal = _RAW_REFUSALS.get(char)
        if refusal is not None:
            raise AmbiguousPathError(refusal)
        code = ord(char)
        if code <= 0x20 or code == 0x7F:
            raise AmbiguousPathError("raw space or control character in path")
        if code > 0x7E:
            raise AmbiguousPathError("raw non-ASCII character in path (must be percent-encoded)")


def _decode_segment(segment: str) -> str:
    if "%" not in segment:
        return segment
    if _BAD_ESCAPE.search(segment):
        raise AmbiguousPathError("invalid percent-escape")
    for match in _ESCAPE.finditer(segment):
        _refuse_encoded_byte(int(match.group(1), 16))
    raw = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), segment).encode("latin-1")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPathError("percent-escapes are not valid UTF-8 (e.g. overlong)") from None
    if _ESCAPE.search(text):
        raise AmbiguousPathError("double percent-encoding ('%25' followed by hex digits)")
    if not text.isascii():
        _refuse_unicode_tricks(text)
    return text


def _refuse_encoded_byte(byte: int) -> None:
    refusal = _FORBIDDEN_ENCODED.get(byte)
    if refusal is not None:
        raise AmbiguousPathError(refusal)
    if byte < 0x20 or byte == 0x7F:
        raise AmbiguousPathError("percent-encoded control character")


def _refuse_unicode_tricks(text: str) -> None:
    if any(unicodedata.category(char) == "Cc" for char in text):
        raise AmbiguousPathError("control character in decoded path")
    compatible = unicodedata.normalize("NFKC", text)
    if "/" in compatible or "\\" in compatible:
        raise AmbiguousPathError("character that servers may normalise to '/' or '\\'")
    if compatible in (".", ".."):
        raise AmbiguousPathError("characters that servers may normalise to a dot-segment")
    if compatible.endswith(_WINDOWS_STRIPS):
        raise _trailing_dot_or_space()
