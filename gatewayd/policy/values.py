"""Value syntaxes of the policy language, each a small pure parser that returns a typed value
or raises `ValueError` with a message meant for the administrator.

Durations ("5m", "1h30m", "7d", "500ms", or seconds), sizes ("10MiB", "500kB", or bytes),
hour ranges ("07:00-22:00", overnight "22:00-06:00"), weekdays ("mon", "mon-fri"), networks
(CIDR), path globs ("/files/**/.git/**") and TCP destinations ("host:port",
"{user.office_pc}:3389"). The pydantic schema calls these parsers, the compiler uses the
values they return.

Durations and sizes are a superset of the config file's grammar (`gatewayd.config`), so an
administrator can write them the same way in both places: every duration or size the config
accepts means the same here, except zero (a zero MFA age limit or upload limit is refused
rather than given a meaning) and durations over 365 days. On top, policies accept bare
numbers (seconds, bytes), ``kB``, ``TB``, ``TiB`` and blanks around the value. Units are
tables (`DURATION_UNITS`, `SIZE_UNITS`); the parsers' regexes and policies/README.md follow
them (a test checks the README).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Milliseconds per duration unit, largest first: a duration names units in this order, each
# at most once ("1h30m", "1m500ms"). Summed in integer milliseconds, divided once, so
# "1d1h1m1s1ms" is exact.
DURATION_UNITS = MappingProxyType({
    "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1,
})  # fmt: skip
_DURATION = re.compile("".join(rf"(?:(\d+){unit})?" for unit in DURATION_UNITS))
# An MFA age limit of over a year means "none" (omit the key); the bound also keeps the
# float of the result exact and finite, whatever number was written.
MAX_DURATION_DAYS = 365
_MAX_DURATION_MS = MAX_DURATION_DAYS * DURATION_UNITS["d"]
# Bytes per size unit: SI (kB and KB alike, as the config file writes KB) and binary.
SIZE_UNITS = MappingProxyType({
    "B": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
})  # fmt: skip
_SIZE = re.compile(r"(\d+)\s*(" + "|".join(sorted(SIZE_UNITS, key=len, reverse=True)) + ")?")
# Amounts longer than this are out of range anyway; checking the length first keeps int()
# away from thousands of digits (which Python refuses with a ValueError of its own).
_MAX_AMOUNT_DIGITS = 18
_HOUR_RANGE = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_TEMPLATE_REF = re.compile(r"\{user\.([A-Za-z_][A-Za-z0-9_-]*)\}")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The longest registered HTTP method (IANA: UPDATEREDIRECTREF) has 17 characters; a longer
# "method" is no method at all, and echoing it would only bloat reasons and audit records.
MAX_METHOD_LENGTH = 32
# What a request's method must be to reach the rules: an RFC 9110 token (tchar) without
# lowercase letters, as policy files must write methods (see `parse_method`).
_REQUEST_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]{1," + str(MAX_METHOD_LENGTH) + "}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
MINUTES_PER_DAY = 24 * 60


def _reject_bool(value: object, what: str) -> None:
    # YAML `true` is a Python bool, which is also an int: never let it pass as a number.
    if isinstance(value, bool):
        raise ValueError(f"invalid {what} {str(value).lower()}: expected a number or a string")


def parse_duration(value: object) -> float:
    """Seconds from an int (seconds) or a string like '90s', '5m', '1h30m', '7d', '500ms'
    (units `DURATION_UNITS`, largest first, each at most once); > 0 and at most 365 days."""
    _reject_bool(value, "duration")
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if isinstance(value, int):
        millis = value * 1000
    elif match is not None and any(match.groups()):
        written = zip(match.groups(), DURATION_UNITS.values(), strict=True)
        amounts = [(amount, unit) for amount, unit in written if amount]
        if any(len(amount) > _MAX_AMOUNT_DIGITS for amount, _ in amounts):
            raise ValueError(f"duration too long: at most {MAX_DURATION_DAYS}d")
        millis = sum(int(amount) * unit for amount, unit in amounts)
    else:
        raise ValueError(
            f"invalid duration {value!r}: use e.g. '90s', '5m', '1h30m' or '7d' "
            "(largest unit first)"
        )
    if millis <= 0:
        raise ValueError(f"duration must be positive, got {value!r}")
    if millis > _MAX_DURATION_MS:
        raise ValueError(f"duration too long: at most {MAX_DURATION_DAYS}d")
    return millis / 1000


def format_duration(seconds: float) -> str:
    """'5m', '1h30m', '42s', '1m30.5s' — the inverse of `parse_duration` for display."""
    whole = int(seconds)
    fraction = seconds - whole
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if secs or fraction or not (hours or minutes):
        parts.append(f"{secs + fraction:g}s")
    return "".join(parts)


def parse_size(value: object) -> int:
    """Bytes from an int or a string like '10MiB', '500kB', '2 GB' (units `SIZE_UNITS`, or
    none: bytes); must be > 0."""
    _reject_bool(value, "size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        if len(match.group(1)) > _MAX_AMOUNT_DIGITS:
            raise ValueError(f"invalid size: more than {_MAX_AMOUNT_DIGITS} digits")
        size = int(match.group(1)) * SIZE_UNITS[match.group(2) or "B"]
    else:
        raise ValueError(f"invalid size {value!r}: use e.g. '10MiB', '500kB' or bytes")
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


def format_size(size: int) -> str:
    """'10MiB' for 10485760; the largest binary unit that divides evenly."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class HourRange:
    """Minutes after local midnight: start inclusive, end exclusive; start > end wraps midnight."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_hour_range(text: str) -> HourRange:
    """'07:00-22:00' (end exclusive, '24:00' allowed as end; '22:00-06:00' wraps midnight)."""
    match = _HOUR_RANGE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"invalid hours {text!r}: use HH:MM-HH:MM, e.g. '07:00-22:00'")
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    if start_h > 23 or start_m > 59 or end_m > 59 or end_h > 24 or (end_h == 24 and end_m):
        raise ValueError(f"invalid hours {text!r}: not a time of day")
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start == end % MINUTES_PER_DAY:
        raise ValueError(f"invalid hours {text!r}: start equals end (omit hours for all day)")
    return HourRange(start, end)


def parse_weekdays(value: object) -> frozenset[int]:
    """Weekday numbers (Monday = 0) from 'mon', 'mon-fri' or a list of those."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("weekdays must be a day, a range like 'mon-fri', or a non-empty list")
    days: set[int] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"invalid weekday {item!r}: use mon, tue, wed, thu, fri, sat, sun")
        first, _, last = item.strip().lower().partition("-")
        start, end = _weekday(first, item), _weekday(last or first, item)
        if end < start:
            raise ValueError(f"invalid weekday range {item!r}: ranges run forward, e.g. mon-fri")
        days.update(range(start, end + 1))
    return frozenset(days)


def _weekday(name: str, item: str) -> int:
    try:
        return WEEKDAYS.index(name)
    except ValueError:
        raise ValueError(
            f"invalid weekday {item!r}: use mon, tue, wed, thu, fri, sat, sun"
        ) from None


def parse_network(value: object) -> IPNetwork:
    """A CIDR network ('10.0.0.0/8', '2001:db8::/32'); host bits must be zero."""
    if not isinstance(value, str):
        raise ValueError(f"invalid network {value!r}: use CIDR notation like '10.0.0.0/8'")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid network {value!r}: {exc}") from None


def unmap_ipv4(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:10.0.0.1, seen on dual-stack sockets) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_method(value: object) -> str:
    """An HTTP method token as a policy names it: uppercase, at most MAX_METHOD_LENGTH long.

    Methods are case-sensitive (RFC 9110), so lowercase is refused rather than folded; and
    every method a policy can name passes `is_request_method`, so no rule names a method
    that decide() refuses before looking at rules.
    """
    if not isinstance(value, str) or not _HTTP_TOKEN.fullmatch(value):
        raise ValueError(f"invalid HTTP method {value!r}")
    if value != value.upper():
        raise ValueError(f"HTTP methods are case-sensitive: write {value.upper()!r}")
    if len(value) > MAX_METHOD_LENGTH:
        raise ValueError(f"invalid HTTP method {value!r}: longer than {MAX_METHOD_LENGTH}")
    return value


def is_request_method(method: str) -> bool:
    """Whether a request's method may be evaluated: an uppercase RFC 9110 token.

    Policy files must write methods in uppercase, and methods are case-sensitive, so a
    request for 'trace' would not match a deny rule for TRACE — yet an upstream (or a
    framework in front of it) may well treat it as TRACE. Such a method is refused, never
    matched or guessed, like an ambiguous path; so are empty, spaced, control-character,
    non-ASCII and overlong ones.
    """
    return method in _COMMON_METHODS or _REQUEST_METHOD.fullmatch(method) is not None


# Checked before the regex: nearly every request carries one of these.
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH",
                             "PROPFIND"})


def show_method(method: str) -> str:
    """A request method for a reason text: ASCII-escaped (no control characters reach logs,
    audit records or the deny page) and cut to MAX_METHOD_LENGTH characters."""
    if len(method) <= MAX_METHOD_LENGTH:
        return ascii(method)
    return ascii(method[:MAX_METHOD_LENGTH]) + "..."


def parse_name(value: object, what: str) -> str:
    """An identifier for rules, roles and services: letters, digits, '_', '.', ':', '-'."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return value


def parse_principal(value: object, what: str) -> str:
    """A directory group or user name: any non-empty text without surrounding blanks."""
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(f"invalid {what} {value!r}: must be non-empty without outer spaces")
    return value


def canonical_host(host: str) -> str | None:
    """Lower-case DNS name without trailing dot, or the canonical text of an IP literal.

    Returns None for anything that is neither (such a host never matches a destination).
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text):
        return None
    return text.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class Glob:
    """A path glob: `*` matches within one segment, `**` any number of whole segments.

    A glob that does not end in '/' also matches the same path with a trailing '/', and a
    trailing '/**' also matches the directory itself ('/files/**' matches '/files').
    """

    text: str
    regex: str
    literal_head: str  # the text before the first wildcard, for reachability checks

    def covers(self, other: Glob) -> bool:
        """True only when every path `other` matches is certainly matched by this glob.

        Conservative: False may mean "could not prove it". Used to find shadowed rules.
        """
        if self.text in (other.text, "/**"):
            return True
        if self.text.endswith("/**") and self.is_literal_before_tail:
            base = self.text[: -len("/**")]
            return other.text == base or other.text.startswith(base + "/")
        return False

    @property
    def is_literal_before_tail(self) -> bool:
        return "*" not in self.text[: -len("/**")]

    def casefolded(self) -> Glob:
        """This glob as deny rules match it: casefolded, to be matched against the casefolded
        path. Casefolding is per character and never makes or removes a '/' or '*', so a
        path the glob matches always casefolds to one the casefolded glob matches."""
        return parse_glob(self.text.casefold())


def parse_glob(value: object) -> Glob:
    """Compile a path glob to a regular expression (see `Glob`)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"invalid path glob {value!r}: must start with '/'")
    segments = value[1:].split("/")
    for index, segment in enumerate(segments):
        if segment == "" and index != len(segments) - 1:
            raise ValueError(f"invalid path glob {value!r}: empty segment ('//') never matches")
        if segment in (".", ".."):
            raise ValueError(f"invalid path glob {value!r}: dot-segments never match")
        if "**" in segment and segment != "**":
            raise ValueError(f"invalid path glob {value!r}: '**' must be a whole segment")
        if segment.endswith((".", " ")):
            raise ValueError(
                f"invalid path glob {value!r}: a segment that ends in '.' or space never "
                "matches (such paths are refused as ambiguous)"
            )
    star = value.find("*")
    head = value if star < 0 else value[:star]
    return Glob(text=value, regex=_glob_regex(segments), literal_head=head)


def _glob_regex(segments: list[str]) -> str:
    parts: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "**":
            # Last: nothing more, or '/' and anything. Elsewhere: zero or more whole segments.
            parts.append("(?:/.*)?" if index == last else "(?:/[^/]+)*")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    if segments[last] not in ("", "**"):
        parts.append("/?")
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Destination:
    """A TCP destination pattern: host (literal or with `{user.ATTR}` references) and port.

    A reference to a user attribute that is missing, empty, or not a valid host name makes
    the whole destination unresolvable for that user: it then matches nothing.
    """

    text: str
    host_parts: tuple[str, ...]  # even indexes literal text, odd indexes attribute names
    port: int

    @property
    def is_template(self) -> bool:
        return len(self.host_parts) > 1

    def resolve_host(self, attributes: Mapping[str, str]) -> str | None:
        """The canonical host for a user with these attributes, or None if unresolvable."""
        if not self.is_template:
            return self.host_parts[0]
        pieces: list[str] = []
        for index, part in enumerate(self.host_parts):
            if index % 2 == 0:
                pieces.append(part)
                continue
            value = attributes.get(part)
            if not isinstance(value, str) or not value.strip():
                return None
            if "{" in value or "}" in value:
                return None
            pieces.append(value.strip())
        return canonical_host("".join(pieces))


def parse_destination(value: object) -> Destination:
    """'fileserver.ward.local:445', '[2001:db8::5]:3389' or '{user.office_pc}:3389'."""
    if not isinstance(value, str):
        raise ValueError(f"invalid destination {value!r}: use 'host:port'")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid destination {value!r}: use 'host:port' with port 1-65535")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"invalid destination {value!r}: write IPv6 hosts as '[addr]:port'")
    parts = tuple(_TEMPLATE_REF.split(host))
    literal = "".join(parts[0::2])
    if "{" in literal or "}" in literal:
        raise ValueError(
            f"invalid destination {value!r}: only '{{user.ATTRIBUTE}}' references are allowed"
        )
    if len(parts) == 1:
        canonical = canonical_host(host)
        if canonical is None:
            raise ValueError(f"invalid destination {value!r}: {host!r} is not a host name or IP")
        parts = (canonical,)
    else:
        parts = tuple(p.lower() if i % 2 == 0 else p for i, p in enumerate(parts))
    return Destination(text=value.strip(), host_parts=parts, port=int(port_text))
