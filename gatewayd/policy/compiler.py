"""Compile validated, checked policy files into a `Policy` built for fast decisions.

Roles are expanded into the rules that reference them, globs are joined into one regex per
rule (casefolded for deny rules, see `PathsCondition`), networks become integer ranges,
and rules are indexed by service, so decide() only ever looks at the few rules that name
the request's service. The compiler assumes `check.check_policy` found no problems.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from .check import (
    LoadedFile,
    effective_methods,
    http_route_keys,
    roles_in_order,
    rule_services,
    rule_subjects,
    rules_in_order,
    services_in_order,
)
from .conditions import (
    Condition,
    DestinationsCondition,
    DeviceBoundToUserCondition,
    HoursCondition,
    MethodsCondition,
    NetworksCondition,
    PathsCondition,
    RegisteredDeviceCondition,
    SubjectsCondition,
    WeekdaysCondition,
)
from .model import (
    HttpRoutes,
    HttpService,
    Policy,
    Role,
    Rule,
    RuleSet,
    Service,
    ServiceRules,
    TcpRoutes,
    TcpService,
)
from .request import Decision, Obligations
from .schema import (
    DEFAULT_TIMEZONE,
    HttpServiceSpec,
    RoleSpec,
    RuleSpec,
    ServiceSpec,
    SubjectsSpec,
)
from .values import Destination


def compile_policy(files: Sequence[LoadedFile]) -> Policy:
    role_specs = {located.path[-1]: located for located in roles_in_order(files)}
    service_specs = {located.path[-1]: located for located in services_in_order(files)}
    roles = {
        str(name): _compile_role(str(name), located.value, located.origin)
        for name, located in role_specs.items()
    }
    services = {
        str(name): _compile_service(str(name), located.value, located.origin)
        for name, located in service_specs.items()
    }
    plain_roles = {str(name): located.value for name, located in role_specs.items()}
    plain_services = {str(name): located.value for name, located in service_specs.items()}
    rules = tuple(
        _compile_rule(located.value, located.origin, order, plain_roles, plain_services)
        for order, located in enumerate(rules_in_order(files))
    )
    return Policy(
        timezone=_timezone(files),
        roles=MappingProxyType(roles),
        services=MappingProxyType(services),
        rules=rules,
        files=tuple(file.source.file for file in files),
        rule_index=MappingProxyType(_index_rules(rules, services)),
        http_routes=_http_routes(plain_services),
        tcp_routes=_tcp_routes(services),
    )


def _timezone(files: Sequence[LoadedFile]) -> zoneinfo.ZoneInfo:
    for file in files:
        if file.spec.timezone is not None:
            return file.spec.timezone
    return zoneinfo.ZoneInfo(DEFAULT_TIMEZONE)


def _compile_role(name: str, spec: RoleSpec, origin: str) -> Role:
    return Role(
        name=name,
        groups=frozenset(group.casefold() for group in spec.groups),
        users=frozenset(user.casefold() for user in spec.users),
        description=spec.description,
        origin=origin,
    )


def _compile_service(name: str, spec: ServiceSpec, origin: str) -> Service:
    if isinstance(spec, HttpServiceSpec):
        return HttpService(name, tuple(spec.prefixes), tuple(spec.hosts), spec.description, origin)
    return TcpService(name, tuple(spec.destinations), spec.description, origin)


def _compile_rule(
    spec: RuleSpec,
    origin: str,
    order: int,
    roles: Mapping[str, RoleSpec],
    services: Mapping[str, ServiceSpec],
) -> Rule:
    obligations = Obligations(
        read_only=spec.read_only,
        max_upload=spec.obligations.max_upload if spec.obligations else None,
    )
    return Rule(
        id=spec.id,
        effect=spec.effect,
        description=spec.description,
        origin=origin,
        order=order,
        services=rule_services(spec, services),
        methods=effective_methods(spec),
        conditions=_conditions(spec, roles),
        mfa_max_age=spec.mfa_max_age,
        obligations=obligations,
        verdict=_verdict(spec, obligations),
    )


def _verdict(spec: RuleSpec, obligations: Obligations) -> Decision:
    if spec.effect == "allow":
        return Decision("allow", spec.id, f"allowed by rule {spec.id}", obligations)
    reason = f"denied by rule {spec.id}"
    if spec.description:
        reason += f": {spec.description.strip()}"
    return Decision("deny", spec.id, reason)


def _conditions(spec: RuleSpec, roles: Mapping[str, RoleSpec]) -> tuple[Condition, ...]:
    """The rule's tests, cheapest and most selective first; this order is also the order in
    which `policy explain` reports the first failing condition."""
    conditions: list[Condition] = []
    subjects = rule_subjects(spec, roles)
    if not subjects.everyone:
        conditions.append(SubjectsCondition(subjects.users, subjects.groups, _label(spec)))
    methods = effective_methods(spec)
    if methods is not None:
        conditions.append(MethodsCondition(methods, spec.read_only))
    if spec.paths is not None:
        ignore_case = spec.effect == "deny"
        globs = [glob.casefolded() if ignore_case else glob for glob in spec.paths]
        pattern = re.compile("|".join(f"(?:{glob.regex})" for glob in globs))
        texts = tuple(glob.text for glob in spec.paths)
        conditions.append(PathsCondition(texts, pattern, ignore_case))
    if spec.destinations is not None:
        conditions.append(DestinationsCondition(tuple(spec.destinations)))
    when = spec.when
    if when is not None:
        if when.networks is not None:
            conditions.append(NetworksCondition.of(tuple(when.networks)))
        if when.weekdays is not None:
            conditions.append(WeekdaysCondition(when.weekdays))
        if when.hours is not None:
            conditions.append(HoursCondition(when.hours))
        if when.device is not None:
            conditions.append(RegisteredDeviceCondition())
        if when.device_bound_to_user is not None:
            conditions.append(DeviceBoundToUserCondition())
    return tuple(conditions)


def _label(spec: RuleSpec) -> str:
    subjects = spec.subjects
    assert isinstance(subjects, SubjectsSpec)  # '*' compiles to no condition at all
    parts = [
        f"{kind} {', '.join(names)}"
        for kind, names in (
            ("roles", subjects.roles), ("groups", subjects.groups), ("users", subjects.users)
        )
        if names
    ]
    return "; ".join(parts)


def _permissiveness(rule: Rule) -> tuple[bool, float]:
    """Sort key: most permissive first (not read-only, then the largest upload limit)."""
    limit = rule.obligations.max_upload
    return (rule.obligations.read_only, -(math.inf if limit is None else limit))


def _rule_set(rules: Iterable[Rule]) -> RuleSet:
    relevant = list(rules)
    denies = tuple(rule for rule in relevant if rule.effect == "deny")
    allows = sorted((rule for rule in relevant if rule.effect == "allow"), key=_permissiveness)
    return RuleSet(denies, tuple(allows))


def _index_rules(rules: Sequence[Rule], services: Mapping[str, Service]) -> dict[str, ServiceRules]:
    index: dict[str, ServiceRules] = {}
    for name in services:
        relevant = [rule for rule in rules if name in rule.services]
        named_methods = set().union(*(rule.methods or () for rule in relevant))
        by_method = {
            method: _rule_set(r for r in relevant if r.methods is None or method in r.methods)
            for method in sorted(named_methods)
        }
        index[name] = ServiceRules(
            all=_rule_set(relevant),
            by_method=MappingProxyType(by_method),
            any_method=_rule_set(r for r in relevant if r.methods is None),
        )
    return index


def _http_routes(services: Mapping[str, ServiceSpec]) -> HttpRoutes:
    table: dict[tuple[str | None, str], str] = {}
    hosts: set[str] = set()
    for name, spec in services.items():
        if isinstance(spec, HttpServiceSpec):
            for key in http_route_keys(spec):
                table.setdefault(key, name)
            hosts.update(spec.hosts)
    return HttpRoutes(MappingProxyType(table), frozenset(hosts))


def _tcp_routes(services: Mapping[str, Service]) -> TcpRoutes:
    literal: dict[tuple[str, int], str] = {}
    templated: list[tuple[Destination, str]] = []
    for name, service in services.items():
        if isinstance(service, TcpService):
            for destination in service.destinations:
                if destination.is_template:
                    templated.append((destination, name))
                else:
                    literal.setdefault((destination.host_parts[0], destination.port), name)
    return TcpRoutes(MappingProxyType(literal), tuple(templated))
