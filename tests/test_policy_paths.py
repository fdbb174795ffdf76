"""Tests for gatewayd.policy.paths: the request-path normaliser and its attack table."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.policy.paths import AmbiguousPathError, normalize_path, strip_query

# (raw request target, why it must be refused) — every row is denied, never guessed.
ATTACKS = [
    ("/%2e%2e/", "percent-encoded '.'"),
    ("/%2E%2E/etc/passwd", "percent-encoded '.'"),
    ("/approval/%2e%2e/files", "percent-encoded '.'"),
    ("/approval/%2e/x", "percent-encoded '.'"),
    ("/approval/.%2e/files/x", "percent-encoded '.'"),
    ("/files/report%2epdf", "percent-encoded '.'"),
    ("//approval", "empty path segment"),
    ("/approval//x", "empty path segment"),
    ("/approval/x//", "empty path segment"),
    ("/approval%2Fx", "percent-encoded '/'"),
    ("/approval%2fx", "percent-encoded '/'"),
    ("/files/a%2F..%2Fb", "percent-encoded '/'"),
    ("/files\\..\\approval", "backslash"),
    ("/files\\x", "backslash"),
    ("/files/%5c../x", "percent-encoded backslash"),
    ("/files/%5Cx", "percent-encoded backslash"),
    ("/files/%00", "percent-encoded NUL"),
    ("/files/a%00.pdf", "percent-encoded NUL"),
    ("/files/a\x00b", "raw space or control character"),
    ("/files/%c0%ae%c0%ae/x", "not valid UTF-8"),
    ("/files/%c0%af", "not valid UTF-8"),
    ("/files/%e0%80%ae", "not valid UTF-8"),
    ("/files/%f0%80%80%ae", "not valid UTF-8"),
    ("/files/%ed%a0%80", "not valid UTF-8"),  # a UTF-16 surrogate encoded in UTF-8
    ("/files/%ff", "not valid UTF-8"),
    ("/files/%e6%97", "not valid UTF-8"),  # truncated multi-byte sequence
    ("/approval/./x", "dot-segment"),
    ("/approval/../files/x", "dot-segment"),
    ("/approval/x/..", "dot-segment"),
    ("/approval/x/.", "dot-segment"),
    ("/..", "dot-segment"),
    ("/.", "dot-segment"),
    ("/files/%", "invalid percent-escape"),
    ("/files/%4", "invalid percent-escape"),
    ("/files/%zz", "invalid percent-escape"),
    ("/files/%%32%65", "invalid percent-escape"),
    ("/files/%252e%252e/x", "double percent-encoding"),
    ("/files/%25%32%65", "double percent-encoding"),  # decodes to the text '%2e'
    ("/files/%01", "percent-encoded control character"),
    ("/files/%1f", "percent-encoded control character"),
    ("/files/%7f", "percent-encoded control character"),
    ("/files/%c2%85", "control character in decoded path"),  # U+0085 NEL
    ("/files/a b", "raw space or control character"),
    ("/files/a\tb", "raw space or control character"),
    ("/files/a\r\nX-Injected: 1", "raw space or control character"),
    ("/files/\x7f", "raw space or control character"),
    ("/files/日本", "raw non-ASCII"),
    ("/files/caf\u00e9", "raw non-ASCII"),
    ("/files/x/..;/approval", "path parameter"),
    ("/files;jsessionid=1/x", "path parameter"),
    ("/files/x#frag", "fragment"),
    ("approval/x", "does not start with '/'"),
    ("", "does not start with '/'"),
    ("*", "does not start with '/'"),
    ("http://evil/approval/", "does not start with '/'"),
    ("?/approval/", "does not start with '/'"),
    ("/files/%ef%bc%8f", "normalise to '/'"),  # U+FF0F FULLWIDTH SOLIDUS
    ("/files/%ef%bc%bc", "normalise to '/' or '\\'"),  # U+FF3C FULLWIDTH REVERSE SOLIDUS
    ("/files/%ef%bc%8e%ef%bc%8e/x", "dot-segment"),  # two U+FF0E FULLWIDTH FULL STOP
    ("/files/%e2%80%a5", "dot-segment"),  # U+2025 TWO DOT LEADER -> '..'
    # Windows strips trailing dots and spaces from names: '.git.' and '.git ' open '.git'
    # on IIS or a share behind WebDAV, past a deny rule for '.git'.
    ("/files/a/.git./config", "ends in '.' or space"),
    ("/files/a/.git%20/config", "ends in '.' or space"),
    ("/files/a/.git.%20./config", "ends in '.' or space"),
    ("/files/a/.git.", "ends in '.' or space"),
    ("/files/a/.git./", "ends in '.' or space"),
    ("/files/a/.git%20", "ends in '.' or space"),
    ("/files/report.pdf.", "ends in '.' or space"),
    ("/files/...", "ends in '.' or space"),
    ("/files/.../x", "ends in '.' or space"),
    ("/files/%E6%97%A5%E6%9C%AC%20/x", "ends in '.' or space"),
    ("/files/.git%ef%bc%8e/config", "ends in '.' or space"),  # U+FF0E FULLWIDTH FULL STOP (NFKC '.')
    ("/files/.git%e3%80%80/config", "ends in '.' or space"),  # U+3000 IDEOGRAPHIC SPACE (NFKC ' ')
    ("/files/.git%c2%a0/config", "ends in '.' or space"),  # U+00A0 NO-BREAK SPACE (NFKC ' ')
]

# (raw request target, normalised path) — ordinary paths pass and are decoded once.
ORDINARY = [
    ("/", "/"),
    ("/approval/", "/approval/"),
    ("/approval", "/approval"),
    ("/approval/2025/123/approve", "/approval/2025/123/approve"),
    ("/files/Annual%20Report.pdf", "/files/Annual Report.pdf"),
    ("/files/%E6%97%A5%E6%9C%AC%E8%AA%9E.docx", "/files/日本語.docx"),
    ("/files/%e6%97%a5%e6%9c%ac/", "/files/日本/"),
    ("/files/%E5%A4%A7%E4%BA%95%E7%94%BA/%E4%BA%88%E7%AE%97.xlsx", "/files/大井町/予算.xlsx"),
    ("/files/.hidden", "/files/.hidden"),
    ("/files/a..b", "/files/a..b"),
    ("/files/a.b/c", "/files/a.b/c"),
    ("/files/%20a/b%20c", "/files/ a/b c"),  # leading and inner spaces are not stripped
    ("/files/.git/", "/files/.git/"),
    ("/files/.git/config", "/files/.git/config"),
    ("/.gatewayd/admin/", "/.gatewayd/admin/"),
    ("/files/x?q=/../..", "/files/x"),
    ("/files/x?%2e%2e", "/files/x"),
    ("/files/a+b=c&d~e'(f)!*,$@:", "/files/a+b=c&d~e'(f)!*,$@:"),
    ("/files/100%25", "/files/100%"),
    ("/files/%25zz", "/files/%zz"),
    ("/files/%3F%23%3B", "/files/?#;"),
    ("/files/%41%42C", "/files/ABC"),
    ("/APPROVAL/", "/APPROVAL/"),  # normalisation keeps case: routing is case-sensitive
    ("/files/%EF%BC%A1", "/files/\uff21"),  # fullwidth A is fine; only separators matter
]


@pytest.mark.parametrize(("raw", "why"), ATTACKS)
def test_ambiguous_paths_are_refused(raw: str, why: str) -> None:
    with pytest.raises(AmbiguousPathError) as caught:
        normalize_path(raw)
    assert why.lower() in caught.value.reason.lower()


@pytest.mark.parametrize(("raw", "expected"), ORDINARY)
def test_ordinary_paths_are_decoded(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("target", "path"),
    [("/a?b", "/a"), ("/a?b?c", "/a"), ("/a", "/a"), ("?x", ""), ("/a%3Fb?c", "/a%3Fb")],
)
def test_query_is_split_off_at_the_first_question_mark(target: str, path: str) -> None:
    assert strip_query(target) == path


@given(st.text(max_size=40))
def test_normaliser_either_refuses_or_returns_a_clean_path(raw: str) -> None:
    """Whatever comes in, what comes out has no separators or dot-segments to disagree on."""
    try:
        path = normalize_path(raw)
    except AmbiguousPathError:
        return
    assert path.startswith("/")
    segments = path[1:].split("/")
    assert all(segment not in (".", "..") for segment in segments)
    assert all(segments[:-1]), "only the last segment may be empty (trailing slash)"
    assert "\\" not in path and "\x00" not in path
    assert not any(segment.endswith((".", " ")) for segment in segments)


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8), max_size=5))
def test_percent_encoded_utf8_names_round_trip(segments: list[str]) -> None:
    """A path whose segments are fully percent-encoded decodes back, unless it is one of
    the refused kinds (dot-segments, separators, controls)."""
    raw = "/" + "/".join(quote(segment, safe="") for segment in segments)
    try:
        path = normalize_path(raw)
    except AmbiguousPathError:
        return
    assert path == "/" + "/".join(segments)
