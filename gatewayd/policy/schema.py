"""The schema of a policy file, as pydantic v2 models: what an administrator may write.

Every model forbids unknown keys and is strict (no silent coercion: `read_only: "yes"` is an
error, not True). Value syntaxes are parsed by `values`; each model checks only what it can
see on its own (e.g. "an HTTP service needs a prefix or a host"). Checks that need the whole
policy (unknown roles, duplicate ids, shadowed rules, ...) live in `check`.

Every list-valued key also accepts a single item: ``methods: GET`` means ``methods: [GET]``.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from .paths import AmbiguousPathError, normalize_path
from .request import READ_METHODS
from .values import (
    Destination,
    Glob,
    HourRange,
    IPNetwork,
    canonical_host,
    parse_destination,
    parse_duration,
    parse_glob,
    parse_hour_range,
    parse_method,
    parse_name,
    parse_network,
    parse_principal,
    parse_size,
    parse_weekdays,
)

DEFAULT_TIMEZONE = "Asia/Tokyo"
T = TypeVar("T")


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _star_or_some(value: object) -> str:
    return "all" if value == "*" else "some"


def _parse_timezone(value: object) -> zoneinfo.ZoneInfo:
    if not isinstance(value, str) or not value:
        raise ValueError(f"invalid timezone {value!r}: use an IANA name like 'Asia/Tokyo'")
    try:
        return zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown timezone {value!r}: use an IANA name like 'Asia/Tokyo'"
        ) from None


def _parse_hours(value: object) -> tuple[HourRange, ...]:
    items = _one_or_many(value)
    if not isinstance(items, list) or not items:
        raise ValueError("hours must be a range like '07:00-22:00' or a non-empty list of them")
    if not all(isinstance(item, str) for item in items):
        raise ValueError("hours must be written as strings like '07:00-22:00'")
    return tuple(parse_hour_range(item) for item in items)


def _parse_prefix(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not value.endswith("/"):
        raise ValueError(f"invalid prefix {value!r}: must start and end with '/'")
    if "*" in value:
        raise ValueError(f"invalid prefix {value!r}: prefixes are literal, no wildcards")
    try:
        plain = normalize_path(value) == value and "%" not in value
    except AmbiguousPathError as exc:
        raise ValueError(f"invalid prefix {value!r}: {exc.reason}") from None
    if not plain:
        raise ValueError(f"invalid prefix {value!r}: write it without escapes or query")
    return value


def _parse_http_host(value: object) -> str:
    host = canonical_host(value) if isinstance(value, str) else None
    if host is None:
        raise ValueError(f"invalid host {value!r}: use a DNS name like 'mail.ward.example'")
    return host


RuleId = Annotated[str, PlainValidator(lambda v: parse_name(v, "rule id"))]
RoleName = Annotated[str, PlainValidator(lambda v: parse_name(v, "role name"))]
ServiceName = Annotated[str, PlainValidator(lambda v: parse_name(v, "service name"))]
GroupName = Annotated[str, PlainValidator(lambda v: parse_principal(v, "group name"))]
UserName = Annotated[str, PlainValidator(lambda v: parse_principal(v, "user name"))]
Method = Annotated[str, PlainValidator(parse_method)]
PathGlob = Annotated[Glob, PlainValidator(parse_glob)]
Dest = Annotated[Destination, PlainValidator(parse_destination)]
Network = Annotated[IPNetwork, PlainValidator(parse_network)]
Prefix = Annotated[str, PlainValidator(_parse_prefix)]
HttpHost = Annotated[str, PlainValidator(_parse_http_host)]
Seconds = Annotated[float, PlainValidator(parse_duration)]
Bytes = Annotated[int, PlainValidator(parse_size)]
Hours = Annotated[tuple[HourRange, ...], PlainValidator(_parse_hours)]
Weekdays = Annotated[frozenset[int], PlainValidator(parse_weekdays)]
TimeZone = Annotated[zoneinfo.ZoneInfo, PlainValidator(_parse_timezone)]

# A list key that also accepts one bare item; `NonEmpty` refuses `[]`, which would silently
# mean "nothing" where the administrator almost certainly meant "anything" (omit the key).
Many = BeforeValidator(_one_or_many)
NonEmpty = Field(min_length=1)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RoleSpec(_Spec):
    """A role: who holds it, by directory group and/or by user name."""

    description: str | None = None
    groups: Annotated[list[GroupName], Many] = []
    users: Annotated[list[UserName], Many] = []

    @model_validator(mode="after")
    def _maps_someone(self) -> RoleSpec:
        if not self.groups and not self.users:
            raise ValueError("role maps no groups or users, so nobody can ever hold it")
        return self


class HttpServiceSpec(_Spec):
    """An HTTP service, routed by path prefix and/or Host header."""

    kind: Literal["http"]
    description: str | None = None
    prefixes: Annotated[list[Prefix], Many] = []
    hosts: Annotated[list[HttpHost], Many] = []

    @model_validator(mode="after")
    def _is_routable(self) -> HttpServiceSpec:
        if not self.prefixes and not self.hosts:
            raise ValueError("an HTTP service needs at least one of 'prefixes' or 'hosts'")
        return self


class TcpServiceSpec(_Spec):
    """A TCP service: the host:port destinations a tunnel to it may open."""

    kind: Literal["tcp"]
    description: str | None = None
    destinations: Annotated[list[Dest], Many, NonEmpty]


ServiceSpec = Annotated[HttpServiceSpec | TcpServiceSpec, Field(discriminator="kind")]


class SubjectsSpec(_Spec):
    """Who a rule is about: holders of any listed role, members of any group, listed users."""

    roles: Annotated[list[RoleName], Many] = []
    groups: Annotated[list[GroupName], Many] = []
    users: Annotated[list[UserName], Many] = []

    @model_validator(mode="after")
    def _names_someone(self) -> SubjectsSpec:
        if not (self.roles or self.groups or self.users):
            raise ValueError(
                "subjects name no roles, groups or users, so the rule can never match "
                "(write subjects: '*' for every user)"
            )
        return self


Subjects = Annotated[
    Annotated[Literal["*"], Tag("all")] | Annotated[SubjectsSpec, Tag("some")],
    Discriminator(_star_or_some),
]
ServiceRefs = Annotated[
    Annotated[Literal["*"], Tag("all")]
    | Annotated[list[ServiceName], Many, NonEmpty, Tag("some")],
    Discriminator(_star_or_some),
]


class WhenSpec(_Spec):
    """Conditions: all that are given must hold for the rule to match."""

    hours: Hours | None = None
    weekdays: Weekdays | None = None
    networks: Annotated[list[Network], Many, NonEmpty] | None = None
    device: Literal["registered"] | None = None
    device_bound_to_user: Literal[True] | None = None


class ObligationsSpec(_Spec):
    """What an allow rule imposes on the traffic it allows."""

    read_only: bool = False
    max_upload: Bytes | None = None


class RuleSpec(_Spec):
    """One rule. Omitted keys mean "any" (methods, paths, destinations) or "always" (when)."""

    id: RuleId
    description: str | None = None
    effect: Literal["allow", "deny"]
    subjects: Subjects
    services: ServiceRefs
    methods: Annotated[list[Method], Many, NonEmpty] | None = None
    paths: Annotated[list[PathGlob], Many, NonEmpty] | None = None
    destinations: Annotated[list[Dest], Many, NonEmpty] | None = None
    when: WhenSpec | None = None
    mfa_max_age: Seconds | None = None
    obligations: ObligationsSpec | None = None

    @model_validator(mode="after")
    def _is_coherent(self) -> RuleSpec:
        if self.effect == "deny" and self.mfa_max_age is not None:
            raise ValueError("mfa_max_age only makes sense on allow rules")
        if self.effect == "deny" and self.obligations is not None:
            raise ValueError("obligations only make sense on allow rules")
        if self.destinations is not None and (self.paths is not None or self.methods is not None):
            raise ValueError(
                "a rule cannot mix HTTP keys (methods, paths) with TCP destinations; split it"
            )
        if self.read_only and self.methods is not None:
            writes = [method for method in self.methods if method not in READ_METHODS]
            if writes:
                raise ValueError(
                    f"a read_only rule cannot allow write methods: {', '.join(writes)} "
                    f"(read methods are {', '.join(sorted(READ_METHODS))})"
                )
        return self

    @property
    def read_only(self) -> bool:
        return self.obligations is not None and self.obligations.read_only

    @property
    def http_only(self) -> bool:
        """Keys that only mean something for HTTP make the rule an HTTP rule."""
        return self.methods is not None or self.paths is not None or self.obligations is not None

    @property
    def tcp_only(self) -> bool:
        return self.destinations is not None


class PolicyFileSpec(_Spec):
    """The top level of one policy file. Any file may hold any section; names are global
    across files. The sections' items are validated one by one (`validate_file`), so one
    broken rule does not hide the problems of all the others."""

    timezone: TimeZone | None = None
    roles: dict[str, Any] = {}
    services: dict[str, Any] = {}
    rules: list[Any] = []


@dataclass(frozen=True, slots=True)
class SchemaError:
    """A pydantic error and the data path of the part that was validated."""

    at: tuple[str | int, ...]
    error: ValidationError


@dataclass(frozen=True, slots=True)
class ValidatedFile:
    """The valid parts of one file. `rules` keeps each rule's index in the file; names of
    definitions that exist but are invalid are kept so references to them are not also
    reported as unknown."""

    timezone: zoneinfo.ZoneInfo | None
    roles: Mapping[str, RoleSpec]
    services: Mapping[str, ServiceSpec]
    rules: Sequence[tuple[int, RuleSpec]]
    broken_roles: frozenset[str]
    broken_services: frozenset[str]
    errors: Sequence[SchemaError]
    # Everything the file declares, valid or not, for duplicate detection across files.
    declares_timezone: bool
    role_names: tuple[str, ...]
    service_names: tuple[str, ...]
    rule_ids: tuple[tuple[int, str], ...]


def validate_file(data: object) -> ValidatedFile:
    """Validate one parsed YAML document, collecting every error instead of stopping."""
    errors: list[SchemaError] = []
    raw = {} if data is None else data
    timezone = None
    try:
        timezone = PolicyFileSpec.model_validate(raw).timezone
    except ValidationError as exc:
        errors.append(SchemaError((), exc))
    sections = raw if isinstance(raw, dict) else {}
    roles, broken_roles = _validate_named(sections.get("roles"), "roles", _ROLE, errors)
    services, broken_services = _validate_named(
        sections.get("services"), "services", _SERVICE, errors
    )
    rules: list[tuple[int, RuleSpec]] = []
    raw_rules = sections.get("rules")
    for index, item in enumerate(raw_rules if isinstance(raw_rules, list) else []):
        try:
            rules.append((index, RuleSpec.model_validate(item)))
        except ValidationError as exc:
            errors.append(SchemaError(("rules", index), exc))
    raw_rules_list = raw_rules if isinstance(raw_rules, list) else []
    return ValidatedFile(
        timezone=timezone,
        roles=roles,
        services=services,
        rules=rules,
        broken_roles=broken_roles,
        broken_services=broken_services,
        errors=errors,
        declares_timezone="timezone" in sections,
        role_names=_names_of(sections.get("roles")),
        service_names=_names_of(sections.get("services")),
        rule_ids=tuple(
            (index, item["id"])
            for index, item in enumerate(raw_rules_list)
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        ),
    )


def _names_of(section: object) -> tuple[str, ...]:
    return tuple(str(key) for key in section) if isinstance(section, dict) else ()


def _validate_named(
    section: object,
    name: str,
    adapters: tuple[TypeAdapter[str], TypeAdapter[T]],
    errors: list[SchemaError],
) -> tuple[dict[str, T], frozenset[str]]:
    """Validate each `name: definition` of a section; return the valid ones and the names
    of the invalid ones."""
    name_adapter, spec_adapter = adapters
    valid: dict[str, T] = {}
    broken: set[str] = set()
    for key, item in (section.items() if isinstance(section, dict) else []):
        try:
            valid[name_adapter.validate_python(key)] = spec_adapter.validate_python(item)
        except ValidationError as exc:
            errors.append(SchemaError((name, key), exc))
            broken.add(str(key))
    return valid, frozenset(broken)


# Compiled validators (immutable): names and definitions of roles and services.
_ROLE = (TypeAdapter(RoleName), TypeAdapter(RoleSpec))
_SERVICE: tuple[TypeAdapter[str], TypeAdapter[ServiceSpec]] = (
    TypeAdapter(ServiceName), TypeAdapter(ServiceSpec)
)


def known_keys() -> frozenset[str]:
    """Every key the schema accepts anywhere, for "did you mean" hints on unknown keys."""
    models: tuple[type[BaseModel], ...] = (
        PolicyFileSpec, RoleSpec, HttpServiceSpec, TcpServiceSpec, SubjectsSpec,
        WhenSpec, ObligationsSpec, RuleSpec,
    )  # fmt: skip
    return frozenset(name for model in models for name in model.model_fields)
