"""The compiled, immutable policy: roles, services, rules, and the indexes decide() uses.

A `Policy` is built by the loader (`load_policy`) and never changes; reloading builds a new
one. Besides the definitions it carries the route tables (which service a request is for)
and a per-service rule index, so a decision only looks at the rules that can apply.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo

from .conditions import Condition
from .paths import AmbiguousPathError, normalize_path
from .request import Decision, Obligations
from .values import Destination, canonical_host


@dataclass(frozen=True, slots=True)
class Role:
    """A role: held by members of any of `groups` and by any of `users` (case-folded)."""

    name: str
    groups: frozenset[str]
    users: frozenset[str]
    description: str | None
    origin: str  # "file:line" of the definition


@dataclass(frozen=True, slots=True)
class HttpService:
    """An HTTP upstream reached by path prefix (ending in '/') and/or Host header."""

    name: str
    prefixes: tuple[str, ...]
    hosts: tuple[str, ...]
    description: str | None
    origin: str
    kind: Literal["http"] = "http"


@dataclass(frozen=True, slots=True)
class TcpService:
    """A TCP upstream reached through a tunnel to one of its destinations."""

    name: str
    destinations: tuple[Destination, ...]
    description: str | None
    origin: str
    kind: Literal["tcp"] = "tcp"


Service = HttpService | TcpService


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule: all `conditions` must hold; an allow may also demand fresh MFA.

    `order` is the rule's position in policy order (files sorted by name, then top to
    bottom). `verdict` is the prebuilt Decision returned when this rule decides.
    """

    id: str
    effect: Literal["allow", "deny"]
    description: str | None
    origin: str
    order: int
    services: tuple[str, ...]
    methods: frozenset[str] | None  # the methods it can match (None: any), for the index
    conditions: tuple[Condition, ...]
    mfa_max_age: float | None
    obligations: Obligations
    verdict: Decision = field(compare=False)

    def mfa_is_fresh(self, mfa_age: float | None) -> bool:
        """Fresh enough for this rule. Unknown, negative or NaN ages are never fresh."""
        if self.mfa_max_age is None:
            return True
        return mfa_age is not None and 0 <= mfa_age <= self.mfa_max_age


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Candidate rules: denies in policy order, then allows ordered so the most permissive
    comes first (not read-only before read-only, larger or no upload limit before smaller;
    policy order among equals). The first fresh allow match therefore is the one that
    decides, and decide() can stop there."""

    denies: tuple[Rule, ...]
    allows: tuple[Rule, ...]

    def __len__(self) -> int:
        return len(self.denies) + len(self.allows)


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """The rules that name one service, also indexed by HTTP method.

    `by_method[m]` holds the rules that can match method m; `any_method` the rules without
    a method condition (the candidates for a method no rule names). The index only leaves
    out rules whose method condition would fail, so it never changes a decision;
    `policy explain` evaluates `all` to show every rule of the service.
    """

    all: RuleSet
    by_method: Mapping[str, RuleSet]
    any_method: RuleSet

    def candidates(self, method: str | None) -> RuleSet:
        if method is None:
            return self.all
        return self.by_method.get(method, self.any_method)


@dataclass(frozen=True, slots=True)
class HttpRoutes:
    """Route table: (host or None, prefix) -> service. Host-specific routes win over
    host-less ones; among those, the longest prefix wins. A path without its trailing
    slash ('/groupware') belongs to the prefix it names ('/groupware/')."""

    table: Mapping[tuple[str | None, str], str]
    hosts: frozenset[str]

    def route(self, host_header: str | None, path: str) -> str | None:
        """The service for a request's Host header (as received) and normalised path.

        The Host header is canonicalised only when some service is published under a host
        name: parsing it (an IP literal goes through `ipaddress`) was a tenth of a decision's
        cost, and a policy without ``hosts:`` routes by path alone anyway.
        """
        return self.lookup(http_host_key(host_header) if self.hosts else None, path)

    def lookup(self, host: str | None, path: str) -> str | None:
        """The service for a canonical host key (`http_host_key`) and normalised path."""
        candidates = _prefix_candidates(path)
        if host is not None and host in self.hosts:
            for prefix in candidates:
                service = self.table.get((host, prefix))
                if service is not None:
                    return service
        for prefix in candidates:
            service = self.table.get((None, prefix))
            if service is not None:
                return service
        return None


def _prefix_candidates(path: str) -> list[str]:
    """'/a/b/c' -> ['/a/b/c/', '/a/b/', '/a/', '/'], longest first."""
    candidates = [] if path.endswith("/") else [path + "/"]
    end = len(path)
    while end > 0:
        end = path.rfind("/", 0, end)
        if end < 0:
            break
        candidates.append(path[: end + 1])
    return candidates


def http_host_key(host: str | None) -> str | None:
    """A Host header value as a route key: port dropped, lower-cased, no trailing dot."""
    if not host:
        return None
    return _host_key(host)


# Browsers send the same few Host values over and over; the cache is bounded because the
# header is client input.
@functools.lru_cache(maxsize=256)
def _host_key(host: str) -> str | None:
    text = host.strip()
    if text.startswith("["):
        text = text[: text.find("]") + 1] if "]" in text else text
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    return canonical_host(text)


@dataclass(frozen=True, slots=True)
class TcpRoutes:
    """Which TCP service a destination belongs to: literal destinations first, then
    templated ones (resolved with the user's attributes) in policy order."""

    literal: Mapping[tuple[str, int], str]
    templated: tuple[tuple[Destination, str], ...]

    def lookup(self, host: str, port: int, attributes: Mapping[str, str]) -> str | None:
        canonical = canonical_host(host)
        if canonical is None:
            return None
        service = self.literal.get((canonical, port))
        if service is not None:
            return service
        for destination, name in self.templated:
            if destination.port == port and destination.resolve_host(attributes) == canonical:
                return name
        return None


@dataclass(frozen=True, slots=True)
class Policy:
    """A loaded policy. Build it with `load_policy`; pass it to `decide` and `explain`."""

    timezone: ZoneInfo
    roles: Mapping[str, Role]
    services: Mapping[str, Service]
    rules: tuple[Rule, ...]
    files: tuple[str, ...]
    rule_index: Mapping[str, ServiceRules]
    http_routes: HttpRoutes
    tcp_routes: TcpRoutes

    def http_service_for(self, host: str | None, raw_path: str) -> str | None:
        """The HTTP service a request is for, or None (no service, or an ambiguous path)."""
        try:
            path = normalize_path(raw_path)
        except AmbiguousPathError:
            return None
        return self.http_routes.route(host, path)

    def tcp_service_for(
        self, host: str, port: int, request_attributes: Mapping[str, str]
    ) -> str | None:
        """The TCP service a tunnel to host:port is for, for a user with these directory
        attributes (so '{user.office_pc}:3389' only resolves to the user's own PC)."""
        return self.tcp_routes.lookup(host, port, request_attributes)

    def rules_for(self, service: str) -> ServiceRules | None:
        return self.rule_index.get(service)

    def summary(self) -> str:
        """One line for `policy check` and logs: '3 roles, 8 services, 13 rules in 6 files'."""
        counts = (
            f"{_count(len(self.roles), 'role')}, {_count(len(self.services), 'service')}, "
            f"{_count(len(self.rules), 'rule')}"
        )
        return f"{counts} in {_count(len(self.files), 'file')} (timezone {self.timezone.key})"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
