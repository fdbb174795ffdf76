"""Whole-policy checks: everything that needs more than one file or one rule to see.

Duplicate names and ids across files, a second timezone, route clashes, references to
unknown roles and services, keys that do not fit the kind of service (paths on a TCP
service), and unreachable rules: paths outside the services' prefixes, destinations the
services do not have, and allow rules fully shadowed by an unconditional deny rule. Every
problem becomes a `PolicyIssue` pointing at the offending line; nothing stops at the first.

The helpers `rule_services` and `rule_subjects` are shared with the compiler, so what is
checked is exactly what is compiled.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import PolicyIssue
from .request import READ_METHODS
from .schema import (
    HttpServiceSpec,
    RoleSpec,
    RuleSpec,
    ServiceSpec,
    SubjectsSpec,
    ValidatedFile,
)
from .values import Destination, Glob
from .yamlsrc import DataPath, SourceMap


@dataclass(frozen=True, slots=True)
class LoadedFile:
    """One validated policy file and where its parts are."""

    source: SourceMap
    spec: ValidatedFile

    def origin(self, path: DataPath) -> str:
        return f"{self.source.file}:{self.source.line_of(path)}"


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Located(Generic[T]):
    """A definition together with the file and data path it came from."""

    value: T
    file: LoadedFile
    path: DataPath

    @property
    def origin(self) -> str:
        return self.file.origin(self.path)

    def issue(self, message: str, *sub: str | int) -> PolicyIssue:
        return self.file.source.issue((*self.path, *sub), message)


@dataclass(frozen=True, slots=True)
class Subjects:
    """Who a rule matches, with roles expanded; names case-folded."""

    everyone: bool
    users: frozenset[str]
    groups: frozenset[str]

    def covers(self, other: Subjects) -> bool:
        if self.everyone:
            return True
        return not other.everyone and other.users <= self.users and other.groups <= self.groups


def rules_in_order(files: Sequence[LoadedFile]) -> Iterator[Located[RuleSpec]]:
    """Rules in policy order: files as given (sorted by name), then top to bottom."""
    for file in files:
        for index, rule in file.spec.rules:
            yield Located(rule, file, ("rules", index))


def roles_in_order(files: Sequence[LoadedFile]) -> Iterator[Located[RoleSpec]]:
    for file in files:
        for name, spec in file.spec.roles.items():
            yield Located(spec, file, ("roles", name))


def services_in_order(files: Sequence[LoadedFile]) -> Iterator[Located[ServiceSpec]]:
    for file in files:
        for name, spec in file.spec.services.items():
            yield Located(spec, file, ("services", name))


def rule_services(rule: RuleSpec, services: Mapping[str, ServiceSpec]) -> tuple[str, ...]:
    """The services a rule applies to. '*' means every service of the kind the rule's keys
    imply (methods/paths/obligations: HTTP; destinations: TCP; none of them: all)."""
    if rule.services != "*":
        return tuple(dict.fromkeys(name for name in rule.services if name in services))
    return tuple(
        name for name, spec in services.items()
        if not (rule.http_only and spec.kind != "http")
        and not (rule.tcp_only and spec.kind != "tcp")
    )  # fmt: skip


def rule_subjects(rule: RuleSpec, roles: Mapping[str, RoleSpec]) -> Subjects:
    if not isinstance(rule.subjects, SubjectsSpec):
        return Subjects(everyone=True, users=frozenset(), groups=frozenset())
    users = set(rule.subjects.users)
    groups = set(rule.subjects.groups)
    for role_name in rule.subjects.roles:
        role = roles.get(role_name)
        if role is not None:
            users.update(role.users)
            groups.update(role.groups)
    return Subjects(
        everyone=False,
        users=frozenset(name.casefold() for name in users),
        groups=frozenset(name.casefold() for name in groups),
    )


def effective_methods(rule: RuleSpec) -> frozenset[str] | None:
    """The methods a rule can match, None meaning any; read-only rules only read methods."""
    methods = None if rule.methods is None else frozenset(rule.methods)
    if rule.read_only:
        return READ_METHODS if methods is None else methods & READ_METHODS
    return methods


def check_policy(files: Sequence[LoadedFile]) -> list[PolicyIssue]:
    """Every cross-file and semantic problem of validated files, in no particular order."""
    issues = list(_duplicate_definitions(files))
    roles = _first_of_each(roles_in_order(files))
    services = _first_of_each(services_in_order(files))
    issues += _check_routes(services)
    role_specs = {name: located.value for name, located in roles.items()}
    service_specs = {name: located.value for name, located in services.items()}
    # Invalid definitions were reported already; references to them are not "unknown".
    broken = frozenset().union(*(f.spec.broken_roles | f.spec.broken_services for f in files))
    sound: list[Located[RuleSpec]] = []
    for rule in rules_in_order(files):
        if _names_any(rule.value, broken):
            continue  # judged once the invalid definition it names is fixed
        problems = list(_check_rule(rule, role_specs, service_specs))
        issues += problems
        if not problems:
            sound.append(rule)
    issues += _check_shadowing(sound, role_specs, service_specs)
    return issues


def _names_any(rule: RuleSpec, names: frozenset[str]) -> bool:
    roles = rule.subjects.roles if isinstance(rule.subjects, SubjectsSpec) else []
    services = rule.services if rule.services != "*" else []
    return any(name in names for name in (*roles, *services))


def _duplicate_definitions(files: Sequence[LoadedFile]) -> Iterator[PolicyIssue]:
    """A second timezone, role, service or rule id — valid or not — anywhere in the policy."""
    first: dict[tuple[str, str], tuple[LoadedFile, DataPath]] = {}
    for file in files:
        declared: list[tuple[str, str, DataPath]] = [
            *(("timezone", "", ("timezone",)) for _ in range(file.spec.declares_timezone)),
            *(("role", name, ("roles", name)) for name in file.spec.role_names),
            *(("service", name, ("services", name)) for name in file.spec.service_names),
            *(("rule id", rule_id, ("rules", i, "id")) for i, rule_id in file.spec.rule_ids),
        ]
        for what, name, path in declared:
            earlier_file, earlier_path = first.setdefault((what, name), (file, path))
            if earlier_file is file and earlier_path == path:
                continue
            earlier = earlier_file.origin(earlier_path)
            if what == "timezone":
                yield file.source.issue(path, f"timezone is already set at {earlier}")
            elif what == "rule id":
                yield file.source.issue(path, f"duplicate rule id {name!r} (first at {earlier})")
            else:
                yield file.source.issue(path, f"{what} {name!r} is already defined at {earlier}")


def _first_of_each(definitions: Iterable[Located[T]]) -> dict[str, Located[T]]:
    found: dict[str, Located[T]] = {}
    for located in definitions:
        found.setdefault(str(located.path[-1]), located)
    return found


def http_route_keys(spec: HttpServiceSpec) -> list[tuple[str | None, str]]:
    """The (host or None, prefix) keys of a service in the route table."""
    prefixes = spec.prefixes or ["/"]
    hosts: list[str | None] = list(spec.hosts) or [None]
    return [(host, prefix) for host in hosts for prefix in prefixes]


def _check_routes(services: Mapping[str, Located[ServiceSpec]]) -> Iterator[PolicyIssue]:
    http_owner: dict[tuple[str | None, str], str] = {}
    tcp_owner: dict[tuple[tuple[str, ...], int], str] = {}
    for name, located in services.items():
        spec = located.value
        if isinstance(spec, HttpServiceSpec):
            for key in http_route_keys(spec):
                other = http_owner.setdefault(key, name)
                if other != name:
                    route = f"{key[0] or ''}{key[1]}"
                    yield located.issue(f"route {route} is already used by service {other!r}")
            continue
        for index, destination in enumerate(spec.destinations):
            owner = tcp_owner.setdefault((destination.host_parts, destination.port), name)
            if owner != name:
                yield located.issue(
                    f"destination {destination.text} is already used by service {owner!r}",
                    "destinations", index,
                )  # fmt: skip


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_rule(
    located: Located[RuleSpec],
    roles: Mapping[str, RoleSpec],
    services: Mapping[str, ServiceSpec],
) -> Iterator[PolicyIssue]:
    rule = located.value
    label = f"rule {rule.id!r}"
    if isinstance(rule.subjects, SubjectsSpec):
        for index, role in enumerate(rule.subjects.roles):
            if role not in roles:
                yield located.issue(
                    f"{label}: unknown role {role!r}{_suggest(role, roles)}",
                    "subjects", "roles", index,
                )  # fmt: skip
    if rule.services != "*":
        for index, name in enumerate(rule.services):
            yield from _check_service_fits(located, name, services, index)
    targets = rule_services(rule, services)
    if not targets:
        if rule.services == "*":
            kind = "HTTP" if rule.http_only else "TCP" if rule.tcp_only else "any"
            yield located.issue(f"{label} can never apply: the policy has no {kind} services")
        return
    yield from _check_paths_reachable(located, [services[name] for name in targets])
    yield from _check_destinations_reachable(located, [services[name] for name in targets])


def _check_service_fits(
    located: Located[RuleSpec], name: str, services: Mapping[str, ServiceSpec], index: int
) -> Iterator[PolicyIssue]:
    rule = located.value
    label = f"rule {rule.id!r}"
    spec = services.get(name)
    if spec is None:
        yield located.issue(
            f"{label}: unknown service {name!r}{_suggest(name, services)}", "services", index
        )
    elif rule.http_only and spec.kind == "tcp":
        yield located.issue(
            f"{label}: service {name!r} is a TCP service; methods, paths and obligations "
            "apply only to HTTP services",
            "services", index,
        )  # fmt: skip
    elif rule.tcp_only and spec.kind == "http":
        yield located.issue(
            f"{label}: service {name!r} is an HTTP service; destinations apply only to "
            "TCP services",
            "services", index,
        )  # fmt: skip


def glob_can_fall_under(glob: Glob, prefix: str, *, ignore_case: bool = False) -> bool:
    """Whether some path under `prefix` (or the bare prefix) could match `glob`; with
    `ignore_case`, as a deny rule matches (casefolded)."""
    head = glob.casefolded().literal_head if ignore_case else glob.literal_head
    if ignore_case:
        prefix = prefix.casefold()
    return head.startswith(prefix) or prefix.startswith(head)


def _check_paths_reachable(
    located: Located[RuleSpec], targets: Sequence[ServiceSpec]
) -> Iterator[PolicyIssue]:
    rule = located.value
    if rule.paths is None:
        return
    prefixes: list[str] = []
    for spec in targets:
        if isinstance(spec, HttpServiceSpec):
            prefixes += spec.prefixes or ["/"]
    fold = rule.effect == "deny"
    for index, glob in enumerate(rule.paths):
        if not any(glob_can_fall_under(glob, prefix, ignore_case=fold) for prefix in prefixes):
            yield located.issue(
                f"rule {rule.id!r}: path {glob.text!r} can never match: it lies outside "
                f"the service prefixes {', '.join(sorted(set(prefixes)))}",
                "paths", index,
            )  # fmt: skip


def _destination_key(destination: Destination) -> tuple[tuple[str, ...], int]:
    return destination.host_parts, destination.port


def _check_destinations_reachable(
    located: Located[RuleSpec], targets: Sequence[ServiceSpec]
) -> Iterator[PolicyIssue]:
    rule = located.value
    if rule.destinations is None:
        return
    available = {
        _destination_key(destination)
        for spec in targets
        if not isinstance(spec, HttpServiceSpec)
        for destination in spec.destinations
    }
    for index, destination in enumerate(rule.destinations):
        if _destination_key(destination) not in available:
            yield located.issue(
                f"rule {rule.id!r}: destination {destination.text} can never match: "
                "it is not a destination of the rule's services",
                "destinations", index,
            )  # fmt: skip


def _check_shadowing(
    rules: Sequence[Located[RuleSpec]],
    roles: Mapping[str, RoleSpec],
    services: Mapping[str, ServiceSpec],
) -> Iterator[PolicyIssue]:
    """An allow rule is unreachable if an unconditional deny rule matches all it matches.

    Deny overrides allow whatever the order, so the deny may come before or after it.
    """
    denies = [r for r in rules if r.value.effect == "deny" and r.value.when is None]
    for allow in rules:
        if allow.value.effect != "allow":
            continue
        for deny in denies:
            if _deny_covers(deny.value, allow.value, roles, services):
                yield allow.issue(
                    f"rule {allow.value.id!r} can never allow anything: deny rule "
                    f"{deny.value.id!r} ({deny.origin}) matches every request it matches"
                )
                break


def _deny_covers(
    deny: RuleSpec,
    allow: RuleSpec,
    roles: Mapping[str, RoleSpec],
    services: Mapping[str, ServiceSpec],
) -> bool:
    """Conservative: True only if every request `allow` matches is matched by `deny`."""
    return (
        rule_subjects(deny, roles).covers(rule_subjects(allow, roles))
        and set(rule_services(allow, services)) <= set(rule_services(deny, services))
        and _methods_cover(effective_methods(deny), effective_methods(allow))
        and _paths_cover(deny.paths, allow.paths)
        and _destinations_cover(deny.destinations, allow.destinations)
    )


def _methods_cover(outer: frozenset[str] | None, inner: frozenset[str] | None) -> bool:
    # None means "any method".
    return outer is None or (inner is not None and inner <= outer)


def _paths_cover(outer: Sequence[Glob] | None, inner: Sequence[Glob] | None) -> bool:
    """Whether deny globs `outer` (matched casefolded) match every path `inner` matches."""
    if outer is None:
        return True
    if inner is None:
        return False
    folded = [glob.casefolded() for glob in outer]
    return all(any(o.covers(i.casefolded()) for o in folded) for i in inner)


def _destinations_cover(
    outer: Sequence[Destination] | None, inner: Sequence[Destination] | None
) -> bool:
    if outer is None:
        return True
    keys = {_destination_key(destination) for destination in outer}
    return inner is not None and all(_destination_key(i) in keys for i in inner)
