"""Tests for gatewayd.policy.values: durations, sizes, hours, weekdays, networks, globs,
destinations and host names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd import config
from gatewayd.policy.values import (
    DURATION_UNITS,
    SIZE_UNITS,
    HourRange,
    canonical_host,
    format_duration,
    format_size,
    parse_destination,
    parse_duration,
    parse_glob,
    parse_hour_range,
    parse_method,
    parse_network,
    parse_size,
    parse_weekdays,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300), ("90s", 90), ("1h", 3600), ("1h30m", 5400), ("2h5m7s", 7507), (300, 300), (" 15m ", 900),
     ("500ms", 0.5), ("7d", 604800), ("1d12h", 129600), ("1m500ms", 60.5), ("1d1h1m1s1ms", 90061.001),
     ("365d", 365 * 86400), ("0d5m", 300)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "5", "5 minutes", "m", "1m1h", "1h1h", "5ms5s", "1h 30m", "1.5h", "0s", "0ms", "0d0h", 0, -5, True, "5M",
     "5D", 1.5, None, "366d", 366 * 86400, "9" * 400 + "h", "9" * 5000 + "s", 10**60],
)
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@given(st.lists(st.integers(0, 10**4), min_size=len(DURATION_UNITS), max_size=len(DURATION_UNITS)),
       st.lists(st.booleans(), min_size=len(DURATION_UNITS), max_size=len(DURATION_UNITS)))
def test_durations_agree_with_the_config_grammar(amounts: list[int], present: list[bool]) -> None:
    """The config layer writes durations as units largest first ("1h30m", "500ms", "7d");
    the policy grammar reads every such text the same (it only refuses zero and over 365d)."""
    text = "".join(f"{amount}{unit}" for amount, unit, keep in zip(amounts, DURATION_UNITS, present, strict=True)
                   if keep)
    try:
        seconds = config.parse_duration(text).total_seconds()
    except ValueError:
        return  # only what the config accepts must mean the same here
    if 0 < seconds <= 365 * 86400:
        assert parse_duration(text) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    ("seconds", "text"), [(300, "5m"), (5400, "1h30m"), (42, "42s"), (0, "0s"), (90.5, "1m30.5s"), (3600, "1h")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("value", "size"),
    [("10MiB", 10 * 2**20), ("10 MiB", 10 * 2**20), ("500kB", 500_000), ("2GB", 2 * 10**9),
     ("1KiB", 1024), ("7B", 7), ("7", 7), (4096, 4096), ("1TiB", 2**40), ("1KB", 1000), ("3TB", 3 * 10**12),
     ("1 GiB", 2**30), (" 2MB ", 2 * 10**6)],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["10XB", "10mib", "MiB", "", "-1", 0, False, "1.5MiB", None, "0B", "1kiB", "1PB",
                                   "9" * 19 + "B", "9" * 5000])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize("text", ["1B", "7B", "512KiB", "10MiB", "1GiB", "1KB", "10MB", "1GB", "10 MiB", " 1GB"])
def test_sizes_agree_with_the_config_grammar(text: str) -> None:
    assert parse_size(text) == config.parse_size(text)


README = (Path(__file__).resolve().parent.parent / "policies" / "README.md").read_text(encoding="utf-8")


def readme_units(row: str) -> set[str]:
    """The backticked units in the 'units' column of a row of the README's value table."""
    line = next(line for line in README.splitlines() if line.startswith(f"| {row} "))
    return set(re.findall(r"`([^`]+)`", line.split("|")[2]))


def test_readme_lists_exactly_the_units_the_code_accepts() -> None:
    assert readme_units("sizes") == set(SIZE_UNITS)
    assert readme_units("durations") == set(DURATION_UNITS)


@pytest.mark.parametrize(("size", "text"), [(10 * 2**20, "10MiB"), (1536, "1536B"), (2048, "2KiB"), (7, "7B")])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("07:00-22:00", ["07:00", "12:00", "21:59"], ["06:59", "22:00", "23:59", "00:00"]),
        ("22:00-06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"]),
        ("00:00-23:59", ["00:00", "23:58"], ["23:59"]),
        ("08:30-17:15", ["08:30", "17:14"], ["08:29", "17:15"]),
        ("18:00-24:00", ["18:00", "23:59"], ["00:00", "17:59"]),
    ],
)
def test_hour_ranges_are_start_inclusive_end_exclusive(text: str, inside: list[str], outside: list[str]) -> None:
    hours = parse_hour_range(text)

    def minute(clock: str) -> int:
        h, m = clock.split(":")
        return int(h) * 60 + int(m)

    assert all(hours.contains(minute(t)) for t in inside)
    assert not any(hours.contains(minute(t)) for t in outside)
    assert str(hours) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [("7-22", "HH:MM-HH:MM"), ("07:00", "HH:MM-HH:MM"), ("25:00-26:00", "not a time of day"),
     ("07:60-08:00", "not a time of day"), ("24:30-01:00", "not a time of day"),
     ("07:00-24:01", "not a time of day"), ("07:00-07:00", "start equals end"),
     ("00:00-24:00", "start equals end")],
)
def test_bad_hour_ranges(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_hour_range(text)


def test_hour_range_value() -> None:
    assert parse_hour_range("07:00-22:00") == HourRange(420, 1320)


@pytest.mark.parametrize(
    ("value", "days"),
    [("mon", {0}), (["mon-fri"], {0, 1, 2, 3, 4}), (["sat", "sun"], {5, 6}), ("Mon-Wed", {0, 1, 2}),
     (["mon", "mon-tue"], {0, 1}), (["fri-sun"], {4, 5, 6})],
)
def test_weekdays(value: object, days: set[int]) -> None:
    assert parse_weekdays(value) == frozenset(days)


@pytest.mark.parametrize("value", ["funday", ["mon", "xyz"], [], "fri-mon", [1], None, "monday"])
def test_bad_weekdays(value: object) -> None:
    with pytest.raises(ValueError, match="weekday"):
        parse_weekdays(value)


@pytest.mark.parametrize("text", ["10.0.0.0/8", "192.168.1.0/24", "2001:db8::/32", "10.1.2.3/32", "::/0"])
def test_networks(text: str) -> None:
    assert str(parse_network(text)) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [("10.0.0.1/8", "has host bits set"), ("banana", "does not appear"), ("10.0.0.0/33", "invalid network"),
     (10, "CIDR notation")],
)
def test_bad_networks(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network(value)


@pytest.mark.parametrize("method", ["GET", "PROPFIND", "MKCOL", "M-SEARCH", "VERSION-CONTROL"])
def test_methods(method: str) -> None:
    assert parse_method(method) == method


@pytest.mark.parametrize(("value", "message"), [("get", "case-sensitive"), ("GE T", "invalid"), ("", "invalid"), (1, "invalid"),
                                               ("X" * 33, "longer than 32")])
def test_bad_methods(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_method(value)


# (glob, paths it matches, paths it does not match) — on already normalised paths.
GLOBS = [
    ("/files/**", ["/files", "/files/", "/files/a", "/files/a/b/c.txt"], ["/filesX", "/file", "/other/files/a"]),
    ("/files/*", ["/files/a", "/files/a/"], ["/files/", "/files", "/files/a/b"]),
    ("/files/*.pdf", ["/files/a.pdf", "/files/.pdf"], ["/files/a.pdfx", "/files/a/b.pdf", "/files/a.PDF"]),
    ("/files/**/.git/**", ["/files/.git", "/files/.git/config", "/files/a/b/.git/HEAD", "/files/a/.git/"],
     ["/files/a.git/x", "/files/.gitignore", "/files/a/git/x", "/files/.GIT/config"]),
    ("/approval/**/approve", ["/approval/approve", "/approval/1/approve", "/approval/2025/1/approve", "/approval/1/approve/"],
     ["/approval/1/approve/x", "/approval/1/approved", "/approval/1/reject"]),
    ("/a/*/c", ["/a/b/c", "/a/b/c/"], ["/a/c", "/a/b/x/c"]),
    ("/exact", ["/exact", "/exact/"], ["/exact/x", "/exac"]),
    ("/dir/", ["/dir/"], ["/dir", "/dir/x"]),
    ("/**", ["/", "/x", "/x/y"], []),
    ("/files/日本/**", ["/files/日本/a"], ["/files/日本語/a"]),
    ("/a.b/(x)+[y]", ["/a.b/(x)+[y]"], ["/aXb/(x)+[y]", "/a.b/xx+[y]"]),  # regex characters are literal
]


@pytest.mark.parametrize(("glob", "matching", "other"), GLOBS)
def test_globs(glob: str, matching: list[str], other: list[str]) -> None:
    pattern = re.compile(parse_glob(glob).regex)
    for path in matching:
        assert pattern.fullmatch(path), f"{glob} should match {path}"
    for path in other:
        assert not pattern.fullmatch(path), f"{glob} should not match {path}"


@pytest.mark.parametrize(
    ("value", "message"),
    [("files/**", "must start with '/'"), ("/files//x", "empty segment"), ("/files/../x", "dot-segments"),
     ("/files/a**", "whole segment"), ("/files/./x", "dot-segments"), (None, "must start with '/'"),
     ("/files/.git./**", "ends in '.' or space"), ("/files/a /x", "ends in '.' or space"),
     ("/files/*.", "ends in '.' or space"), ("/files/...", "ends in '.' or space")],
)
def test_bad_globs(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_glob(value)


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [("/files/**", "/files/secret/*", True), ("/files/**", "/files", True), ("/**", "/anything/*", True),
     ("/files/**", "/files/**/x", True), ("/files/*", "/files/**", False), ("/files/*/x", "/files/a/x", False),
     ("/files/**", "/filesX/a", False), ("/files/a", "/files/a", True), ("/files/*/**", "/files/a/b", False)],
)
def test_glob_covers_is_conservative(outer: str, inner: str, covers: bool) -> None:
    assert parse_glob(outer).covers(parse_glob(inner)) is covers


@pytest.mark.parametrize(
    ("host", "canonical"),
    [("Mail.Ward.Local", "mail.ward.local"), ("mail.ward.local.", "mail.ward.local"), ("10.0.0.5", "10.0.0.5"),
     ("[2001:DB8::1]", "2001:db8::1"), ("2001:db8:0:0::1", "2001:db8::1"), ("pc_01.ward", "pc_01.ward"),
     ("bad host", None), ("-x.ward", None), ("", None), ("a..b", None), ("010.0.0.5", "010.0.0.5"),
     ("*.ward.local", None), ("x/y", None)],
)
def test_canonical_host(host: str, canonical: str | None) -> None:
    assert canonical_host(host) == canonical


@pytest.mark.parametrize(
    ("text", "attributes", "resolved"),
    [
        ("fileserver.ward.local:445", {}, "fileserver.ward.local"),
        ("{user.office_pc}:3389", {"office_pc": "PC-0042.ward.local"}, "pc-0042.ward.local"),
        ("{user.office_pc}:3389", {"office_pc": "10.1.2.3"}, "10.1.2.3"),
        ("{user.office_pc}:3389", {}, None),
        ("{user.office_pc}:3389", {"office_pc": ""}, None),
        ("{user.office_pc}:3389", {"office_pc": "   "}, None),
        ("{user.office_pc}:3389", {"office_pc": "*"}, None),
        ("{user.office_pc}:3389", {"office_pc": "a b"}, None),
        ("{user.office_pc}:3389", {"office_pc": "{user.other}"}, None),
        ("{user.office_pc}:3389", {"OFFICE_PC": "pc-1"}, None),  # attribute names are exact
        ("pc-{user.employee_id}.ward.local:3389", {"employee_id": "0042"}, "pc-0042.ward.local"),
        ("pc-{user.employee_id}.ward.local:3389", {}, None),
        ("[2001:db8::7]:22", {}, "2001:db8::7"),
    ],
)
def test_destinations_resolve_per_user(text: str, attributes: dict[str, str], resolved: str | None) -> None:
    assert parse_destination(text).resolve_host(attributes) == resolved


@pytest.mark.parametrize(
    ("text", "message"),
    [("fileserver", "host:port"), ("fileserver:0", "port 1-65535"), ("fileserver:70000", "port 1-65535"),
     (":445", "host:port"), ("2001:db8::1:22", "[addr]:port"), ("{office_pc}:3389", "user.ATTRIBUTE"),
     ("{user.x:3389", "user.ATTRIBUTE"), ("bad host:22", "not a host name"), (445, "host:port")],
)
def test_bad_destinations(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_destination(text)
