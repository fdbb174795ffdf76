"""Compiled rule conditions, and the per-request `Facts` they test.

A compiled rule is a tuple of conditions (rules as data). Each condition answers two
questions: `test(facts)` — does it hold? — on the hot path, and `why_not(facts)` — a short
explanation — only when `policy explain` records a trace. Both are answered by the same
object from the same data, so the explanation cannot drift from the decision.

`Facts` are the request's values prepared once per decision (case-folded names, the
normalised path and, if a deny rule's paths need it, its casefolded form, the canonical
destination, the source as an integer, the local time).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from .request import READ_METHODS, AccessRequest
from .values import WEEKDAYS, Destination, HourRange, IPNetwork, unmap_ipv4


class Facts:
    """The request as the conditions see it. Built once per decision; local time is lazy."""

    __slots__ = (
        "_folded_path", "_local", "attributes", "groups", "host", "method", "path", "port",
        "request", "source", "source_int", "source_version", "timezone", "user",
    )  # fmt: skip

    def __init__(
        self,
        request: AccessRequest,
        timezone: ZoneInfo,
        path: str | None = None,
        host: str | None = None,
    ) -> None:
        self.request = request
        self.timezone = timezone
        # Directory names are case-insensitive (LDAP, Active Directory): a deny rule for
        # "mallory" must also stop "Mallory". Policy names are folded the same way.
        self.user = request.user.casefold()
        self.groups = frozenset(group.casefold() for group in request.groups)
        self.attributes = request.attributes
        self.method = request.method
        self.path = path
        self.host = host
        self.port = request.dest_port
        self.source = unmap_ipv4(request.source)
        self.source_version = self.source.version
        self.source_int = int(self.source)
        self._local: datetime | None = None
        self._folded_path: str | None = None

    @property
    def local_time(self) -> datetime:
        if self._local is None:
            self._local = self.request.now.astimezone(self.timezone)
        return self._local

    @property
    def folded_path(self) -> str | None:
        """The path casefolded, for deny rules' globs; computed once, and only if needed."""
        if self._folded_path is None and self.path is not None:
            self._folded_path = self.path.casefold()
        return self._folded_path

    @property
    def minute_of_day(self) -> int:
        local = self.local_time
        return local.hour * 60 + local.minute


class Condition(Protocol):
    """One test a rule makes. `name` is the policy key it comes from."""

    @property
    def name(self) -> str: ...

    def test(self, facts: Facts) -> bool: ...

    def why_not(self, facts: Facts) -> str: ...


def _list(items: Iterable[object]) -> str:
    """Items joined for a sentence; sets are sorted so explanations are reproducible."""
    if isinstance(items, (set, frozenset)):
        return ", ".join(sorted(str(item) for item in items))
    return ", ".join(str(item) for item in items)


@dataclass(frozen=True, slots=True)
class SubjectsCondition:
    """The user is listed, or is in a listed group (roles are compiled into both)."""

    users: frozenset[str]
    groups: frozenset[str]
    label: str  # as written in the policy, for explanations
    name: str = "subjects"

    def test(self, facts: Facts) -> bool:
        return facts.user in self.users or not self.groups.isdisjoint(facts.groups)

    def why_not(self, facts: Facts) -> str:
        groups = _list(facts.request.groups) or "none"
        return f"user {facts.request.user} (groups: {groups}) is not among {self.label}"


@dataclass(frozen=True, slots=True)
class MethodsCondition:
    """The method is listed; a read-only rule only ever admits read methods."""

    methods: frozenset[str]
    read_only: bool
    name: str = "methods"

    def test(self, facts: Facts) -> bool:
        return facts.method in self.methods

    def why_not(self, facts: Facts) -> str:
        if self.read_only and facts.method not in READ_METHODS:
            return f"{facts.method} is a write method and the rule is read-only"
        return f"method {facts.method} is not one of {_list(self.methods)}"


@dataclass(frozen=True, slots=True)
class PathsCondition:
    """The normalised path matches one of the globs (compiled into one regex).

    With `ignore_case` (deny rules), the casefolded path is matched against the casefolded
    globs: an upstream that ignores case (IIS, a Windows share behind WebDAV) serves
    '/.GIT/config' as '/.git/config', so a deny rule must err on the side of matching.
    Allow rules stay exact, erring on the side of not matching.
    """

    globs: tuple[str, ...]
    pattern: re.Pattern[str]
    ignore_case: bool = False
    name: str = "paths"

    def test(self, facts: Facts) -> bool:
        path = facts.folded_path if self.ignore_case else facts.path
        return path is not None and self.pattern.fullmatch(path) is not None

    def why_not(self, facts: Facts) -> str:
        how = " (ignoring case)" if self.ignore_case else ""
        return f"path {facts.path} matches none of {_list(self.globs)}{how}"


@dataclass(frozen=True, slots=True)
class DestinationsCondition:
    """The TCP destination is one of the listed ones (templates resolved for this user)."""

    destinations: tuple[Destination, ...]
    name: str = "destinations"

    def test(self, facts: Facts) -> bool:
        return reaches(self.destinations, facts)

    def why_not(self, facts: Facts) -> str:
        listed = _list(d.text for d in self.destinations)
        return f"destination {facts.host}:{facts.port} is not one of {listed} for this user"


def reaches(destinations: tuple[Destination, ...], facts: Facts) -> bool:
    """True if the request's destination is one of `destinations` for this user."""
    if facts.host is None:
        return False
    for destination in destinations:
        if destination.port != facts.port:
            continue
        if destination.resolve_host(facts.attributes) == facts.host:
            return True
    return False


@dataclass(frozen=True, slots=True)
class NetworksCondition:
    """The source address lies in one of the networks (compared as integer ranges)."""

    networks: tuple[IPNetwork, ...]
    ranges: tuple[tuple[int, int, int], ...]  # (version, first, last)
    name: str = "networks"

    @classmethod
    def of(cls, networks: tuple[IPNetwork, ...]) -> NetworksCondition:
        ranges = tuple(
            (net.version, int(net.network_address), int(net.broadcast_address))
            for net in networks
        )
        return cls(networks, ranges)

    def test(self, facts: Facts) -> bool:
        version, address = facts.source_version, facts.source_int
        return any(v == version and lo <= address <= hi for v, lo, hi in self.ranges)

    def why_not(self, facts: Facts) -> str:
        return f"source {facts.source} is in none of {_list(self.networks)}"


@dataclass(frozen=True, slots=True)
class HoursCondition:
    """The local time of day (policy timezone) falls in one of the ranges."""

    ranges: tuple[HourRange, ...]
    name: str = "hours"

    def test(self, facts: Facts) -> bool:
        minute = facts.minute_of_day
        return any(hours.contains(minute) for hours in self.ranges)

    def why_not(self, facts: Facts) -> str:
        local = facts.local_time
        return f"local time {local:%H:%M} ({local.tzname()}) is outside {_list(self.ranges)}"


@dataclass(frozen=True, slots=True)
class WeekdaysCondition:
    """The local weekday (policy timezone) is one of the days."""

    days: frozenset[int]
    name: str = "weekdays"

    def test(self, facts: Facts) -> bool:
        return facts.local_time.weekday() in self.days

    def why_not(self, facts: Facts) -> str:
        local = facts.local_time
        days = _list(WEEKDAYS[day] for day in sorted(self.days))
        return f"{WEEKDAYS[local.weekday()]} {local:%Y-%m-%d} is not one of {days}"


@dataclass(frozen=True, slots=True)
class RegisteredDeviceCondition:
    """The request came with a verified device certificate."""

    name: str = "device"

    def test(self, facts: Facts) -> bool:
        return bool(facts.request.device)

    def why_not(self, facts: Facts) -> str:
        return "no registered device (no verified device certificate)"


@dataclass(frozen=True, slots=True)
class DeviceBoundToUserCondition:
    """The verified device certificate is bound to the requesting user."""

    name: str = "device_bound_to_user"

    def test(self, facts: Facts) -> bool:
        bound = facts.request.device_user
        return bool(facts.request.device) and bound is not None and bound.casefold() == facts.user

    def why_not(self, facts: Facts) -> str:
        request = facts.request
        if not request.device:
            return "no registered device (no verified device certificate)"
        owner = request.device_user or "nobody"
        return f"device {request.device} is bound to {owner}, not to {request.user}"
