"""Configuration: load and validate the TOML config into one frozen, typed `Settings`.

This module is the only reader of the configuration file and of ``GATEWAYD_*`` environment
variables. Validation is declarative (pydantic models with ``extra="forbid"``); this module's
own code is limited to the value grammars the operator writes by hand — durations (``"15m"``),
sizes (``"10MiB"``), listen addresses (``"127.0.0.1:9480"``) — and to turning validation
errors into one line each that names the file, the key path and what was expected::

    gatewayd.toml: sessions.idle_timeout: expected a duration like "15m", got "soon"

Relative paths in the file are resolved against the directory of the file, so a config and
its policies can be moved together.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

DEFAULT_CONFIG_PATH = Path("/etc/gatewayd/gatewayd.toml")
CONFIG_ENV = "GATEWAYD_CONFIG"


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` holds one printable line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --- value grammars --------------------------------------------------------------------------

_DURATION_UNITS = MappingProxyType({"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400})
_DURATION_PART = re.compile(r"(\d{1,12})(ms|s|m|h|d)")  # 12 digits: no float overflow
_SIZE_UNITS = MappingProxyType({
    "B": 1,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
})
_SIZE = re.compile(r"(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)")


MAX_DURATION = timedelta(days=3650)  # anything longer is a typo, and overflows timedelta soon


def parse_duration(text: str) -> timedelta:
    """Parse ``"15m"``, ``"10h"``, ``"1h30m"``, ``"500ms"``, ``"7d"``; else raise ValueError."""
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text) or total > MAX_DURATION.total_seconds():
        raise ValueError(text)
    return timedelta(seconds=total)


def parse_size(text: str) -> int:
    """Parse ``"10MiB"``, ``"512KiB"``, ``"1GB"``, ``"0B"`` into bytes; else raise ValueError."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(text)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_http_url(text: str) -> str:
    """An origin URL, ``http(s)://host[:port]`` with no path, query or credentials."""
    if re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?|https?://\[[0-9a-fA-F:.]+\](:\d{1,5})?",
                    text.rstrip("/")) is None:
        raise ValueError(text)
    return text.rstrip("/")


def parse_https_url(text: str) -> str:
    if not text.startswith("https://"):
        raise ValueError(text)
    return parse_http_url(text)


class ListenAddress(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """Parse ``"127.0.0.1:9480"``, ``"[::1]:443"`` or ``"0.0.0.0:0"`` (0 = pick a free port)."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([0-9.]+|localhost):(\d{1,5})", text)
    if match is None:
        raise ValueError(text)
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if host != "localhost":
        ipaddress.ip_address(host)  # raises ValueError for 999.1.1.1
    if port > 65535:
        raise ValueError(text)
    return ListenAddress(host, port)


def _grammar(
    parse: Any, kind: str, example: str
) -> BeforeValidator:
    """A pydantic validator that applies ``parse`` to strings and explains the grammar on error."""

    def validate(value: object) -> object:
        if isinstance(value, str):
            try:
                return parse(value)
            except ValueError:
                pass
        raise PydanticCustomError(
            kind, "expected {what} like {example}, got {got}",
            {"what": "an address" if kind == "address" else f"a {kind}",
             "example": f'"{example}"', "got": _show(value)},
        )

    return BeforeValidator(validate)


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")


def _show(value: object) -> str:
    """Render a bad value the way the operator wrote it (TOML-ish), bounded in length.

    Credentials in a URL (``http://user:secret@host``) are masked: these messages reach the
    operational log and, on a rejected reload, the audit log, which can never be edited.
    """
    if isinstance(value, str):
        value = _URL_CREDENTIALS.sub("***@", value)
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    if isinstance(value, bool):
        text = str(value).lower()
    return text if len(text) <= 60 else text[:57] + "..."


Duration = Annotated[timedelta, _grammar(parse_duration, "duration", "15m")]


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise PydanticCustomError("positive", "expected a duration greater than zero, got {got}",
                                  {"got": '"0s"'})
    return value


Interval = Annotated[Duration, AfterValidator(_positive)]  # an interval or timeout: 0 can't work
Size = Annotated[int, _grammar(parse_size, "size", "10MiB")]
Int = Annotated[int, Strict()]  # TOML has real integers; "140" is a mistake, not a number
Bool = Annotated[bool, Strict()]
Listen = Annotated[ListenAddress, _grammar(parse_listen, "address", "127.0.0.1:9480")]
OriginUrl = Annotated[str, _grammar(parse_http_url, "URL", "http://127.0.0.1:8081")]
HttpsOrigin = Annotated[str, _grammar(parse_https_url, "URL", "https://gateway.example.jp")]


def parse_host_port(text: str) -> str:
    """``host:port`` as policies write TCP destinations (``fileserver.ward.local:445``)."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]{0,252}):(\d{1,5})", text)
    if match is None or not 0 < int(match.group(2)) <= 65535:
        raise ValueError(text)
    return text


HostPort = Annotated[str, _grammar(parse_host_port, "host:port", "fileserver.ward.local:445")]


def _resolve_relative(value: Path | None, info: ValidationInfo) -> Path | None:
    base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
    if value is None or value.is_absolute() or not isinstance(base, Path):
        return value
    return base / value


# --- the settings model ----------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySettings(_Section):
    node: str = Field(
        default="gw1", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    state_dir: Path = Path("/var/lib/gatewayd")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    shutdown_grace: Duration = timedelta(seconds=30)

    _resolve = field_validator("state_dir", mode="after")(_resolve_relative)


class MetricsSettings(_Section):
    enabled: Bool = True
    listen: Listen = ListenAddress("127.0.0.1", 9480)


class PolicySettings(_Section):
    dir: Path = Path("/etc/gatewayd/policies")

    _resolve = field_validator("dir", mode="after")(_resolve_relative)


RoleName = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                            pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
RoleCap = Annotated[int, Strict(), Field(ge=1, le=1000)]


class SessionSettings(_Section):
    idle_timeout: Interval = timedelta(minutes=15)
    absolute_timeout: Interval = timedelta(hours=10)
    max_concurrent: Int = Field(default=140, ge=1, le=1_000_000)
    per_user: Int = Field(default=1, ge=1, le=1000)
    # Role name (as in the policy's `roles:`) -> its members' cap; the gateway refuses a
    # name the policy does not define (a typo would silently leave the default in force).
    per_role: dict[RoleName, RoleCap] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _idle_within_absolute(self) -> SessionSettings:
        if self.idle_timeout > self.absolute_timeout:
            raise PydanticCustomError(
                "timeouts", "idle_timeout ({idle}) must not exceed absolute_timeout ({absolute})",
                {"idle": str(self.idle_timeout), "absolute": str(self.absolute_timeout)},
            )
        return self


class AuditForwardSettings(_Section):
    """``[audit.forward]``: every audit record also goes to a central syslog collector
    (RFC 5424; UDP, TCP with octet counting, or TCP+TLS — RFC 5426/6587/5425).

    The audit files themselves are the disk buffer: the forwarder keeps its position
    (``STATE_DIR/audit-forward.cursor``) and replays from there, in order, when the collector
    comes back — nothing is dropped however long the outage.
    """

    enabled: Bool = False
    protocol: Literal["udp", "tcp", "tls"] = "tls"
    address: HostPort = "127.0.0.1:6514"
    ca_file: Path | None = None       # tls: the collector's CA (required for "tls")
    server_name: str = ""             # tls: name expected in its certificate; default: the host
    cert_file: Path | None = None     # tls: our client certificate, if the collector wants one
    key_file: Path | None = None
    app_name: str = Field(default="gatewayd", min_length=1, max_length=48,
                          pattern=r"^[!-~]+$")
    facility: Literal["auth", "authpriv", "daemon", "local0", "local1", "local2", "local3",
                      "local4", "local5", "local6", "local7"] = "authpriv"
    reconnect_interval: Interval = timedelta(seconds=5)

    _resolve = field_validator("ca_file", "cert_file", "key_file",
                               mode="after")(_resolve_relative)

    @model_validator(mode="after")
    def _tls_is_complete(self) -> AuditForwardSettings:
        if self.enabled and self.protocol == "tls" and self.ca_file is None:
            raise PydanticCustomError(
                "ca_file", 'protocol = "tls" needs ca_file (the collector\'s CA): an unverified '
                "collector could be anyone", {})
        if (self.cert_file is None) != (self.key_file is None):
            raise PydanticCustomError("cert_file", "cert_file and key_file go together", {})
        if self.protocol != "tls" and (self.ca_file or self.cert_file or self.server_name):
            raise PydanticCustomError(
                "protocol", 'ca_file, server_name, cert_file and key_file need protocol = "tls"',
                {})
        return self


class ConsoleSettings(_Section):
    """``[console]``: the audit console at ``/.gatewayd/admin/`` (who may open it, and how
    fresh their MFA must be, is policy: service ``admin``, rule ``auditors-admin-console``)."""

    enabled: Bool = True
    page_size: Int = Field(default=50, ge=10, le=500)


class AuditSettings(_Section):
    path: Path = Path("/var/log/gatewayd/audit.log")
    signing_key: Path = Path("/var/lib/gatewayd/audit-signing.key")
    fsync: Literal["always", "interval"] = "always"
    fsync_interval: Interval = timedelta(seconds=1)
    rotate_size: Size = 100 * 1024**2  # "0B" turns size-based rotation off
    rotate_daily: Bool = True
    timezone: str = "Asia/Tokyo"
    checkpoint_interval: Interval = timedelta(seconds=60)
    checkpoint_events: Int = Field(default=1000, ge=1, le=1_000_000)
    on_failure: Literal["deny", "continue"] = "deny"
    http_requests: Literal["writes", "all"] = "writes"
    # Rotated files whose last record is older than this are removed (after their final
    # checkpoint, audited as `audit.retention`); "0s" keeps every file forever.
    retention: Duration = timedelta(days=365)
    forward: AuditForwardSettings = AuditForwardSettings()

    _resolve = field_validator("path", "signing_key", mode="after")(_resolve_relative)

    @field_validator("retention")
    @classmethod
    def _retention_bounds(cls, value: timedelta) -> timedelta:
        # Shorter than a week is almost surely a unit typo ("30m" for thirty months), and it
        # would destroy evidence; 0 means "never remove".
        if value != timedelta(0) and value < timedelta(days=7):
            raise PydanticCustomError(
                "retention", 'expected "0s" (keep forever) or at least "7d", got {got}',
                {"got": _show(f"{value.total_seconds():g}s")})
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        _zone(value)
        return value

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.timezone)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError(
            "timezone", 'expected an IANA time zone like "Asia/Tokyo", got {got}',
            {"got": _show(name)},
        ) from None


class HttpsSettings(_Section):
    enabled: Bool = True
    listen: Listen = ListenAddress("0.0.0.0", 443)  # noqa: S104 - a gateway faces the network
    public_url: HttpsOrigin = "https://localhost"
    cert_file: Path = Path("/etc/gatewayd/tls/server.crt")
    key_file: Path = Path("/etc/gatewayd/tls/server.key")
    client_cert: Literal["off", "optional", "required"] = "off"
    client_ca_file: Path | None = None
    crl_file: Path | None = None
    max_header_size: Size = 16 * 1024
    max_body: Size = 1024**3
    # TLS connections open at once (gatewayd.https.app: refused at accept, before the
    # handshake); the SSH listener's preauth_* caps play the same part.
    max_connections: Int = Field(default=4096, ge=1, le=1_000_000)
    max_connections_per_source: Int = Field(default=64, ge=1, le=100_000)

    _resolve = field_validator("cert_file", "key_file", "client_ca_file", "crl_file",
                               mode="after")(_resolve_relative)

    @model_validator(mode="after")
    def _client_ca_when_client_certs(self) -> HttpsSettings:
        if self.client_cert != "off" and self.client_ca_file is None:
            raise PydanticCustomError(
                "client_ca", 'client_cert = "{mode}" needs client_ca_file (the device CA)',
                {"mode": self.client_cert},
            )
        if self.crl_file is not None and self.client_cert == "off":
            # A revocation list nobody checks would look like protection and be none.
            raise PydanticCustomError(
                "crl_file", 'crl_file is only checked with client_cert = "optional" or '
                '"required", not "off"', {})
        return self


def parse_ldap_url(text: str) -> str:
    """``ldap://host[:port]`` or ``ldaps://host[:port]`` (no DN, filter or credentials)."""
    match = re.fullmatch(r"(ldaps?)://([A-Za-z0-9.\-]+|\[[0-9a-fA-F:.]+\])(?::(\d{1,5}))?/?",
                         text)
    if match is None or (match.group(3) is not None and not 0 < int(match.group(3)) <= 65535):
        raise ValueError(text)
    return text.rstrip("/")


def parse_ldap_filter(text: str) -> str:
    """An RFC 4515 filter as an operator writes it: ``(...)`` with balanced parentheses.

    Only the shape is checked here (the server parses the rest): a filter that is not one
    parenthesised expression would silently change meaning when gatewayd wraps it in ``(&…)``.
    """
    depth = 0
    for index, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0 and index != len(text) - 1:
                raise ValueError(text)  # "(a=1)(b=2)": two filters, not one
        if depth < 0 or not char.isprintable():
            raise ValueError(text)
    if depth != 0 or not text.startswith("(") or len(text) < 3:
        raise ValueError(text)
    return text


def parse_ldap_attribute(text: str) -> str:
    """An attribute description: a name (``sAMAccountName``) or a numeric OID."""
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,127}|[0-9]+(?:\.[0-9]+)+", text) is None:
        raise ValueError(text)
    return text


def parse_optional_ldap_filter(text: str) -> str:
    """A filter as for `parse_ldap_filter`, or ``""`` for none."""
    return text if text == "" else parse_ldap_filter(text)


def parse_policy_attribute(text: str) -> str:
    """A name policies use for a directory attribute (``office_pc`` in ``{user.office_pc}``)."""
    if re.fullmatch(r"[a-z][a-z0-9_]{0,63}", text) is None:
        raise ValueError(text)
    return text


def parse_dn_text(text: str) -> str:
    """A distinguished name as written in the config: printable, ``attr=value,...``, or empty."""
    if text and ("=" not in text or not text.isprintable() or len(text) > 1024):
        raise ValueError(text)
    return text


LdapUrl = Annotated[str, _grammar(parse_ldap_url, "URL", "ldaps://dc1.ward.local")]
LdapFilter = Annotated[str, _grammar(parse_ldap_filter, "filter", "(objectClass=person)")]
OptionalLdapFilter = Annotated[
    str, _grammar(parse_optional_ldap_filter, "filter", "(employeeType=retired)")]
LdapAttribute = Annotated[
    str, _grammar(parse_ldap_attribute, "directory attribute", "sAMAccountName")]
DnText = Annotated[str, _grammar(parse_dn_text, "DN", "ou=people,dc=ward,dc=example")]
PolicyAttribute = Annotated[str, _grammar(parse_policy_attribute, "policy name", "office_pc")]


class LdapSettings(_Section):
    """``[directory.ldap]``: where the LDAP / Active Directory server is and how to read it.

    Only shape is validated here; whether the pieces fit together is checked by
    `DirectorySettings` when ``backend = "ldap"`` (so the table may sit unused in a file).
    """

    urls: list[LdapUrl] = Field(default_factory=list, max_length=16)
    start_tls: Bool = True
    insecure: Bool = False
    ca_file: Path | None = None
    bind_dn: DnText = ""
    bind_password_file: Path | None = None
    user_base: DnText = ""
    user_filter: LdapFilter = "(objectClass=person)"
    user_id_attribute: LdapAttribute = "uid"
    user_dn_template: str = Field(default="", max_length=1024)
    group_mode: Literal["search", "memberof"] = "search"
    group_base: DnText = ""
    group_filter: LdapFilter = "(objectClass=*)"
    group_member_attribute: Literal["member", "uniqueMember", "memberUid"] = "member"
    group_name_attribute: LdapAttribute = "cn"
    nested_groups: Literal["auto", "in_chain", "recursive", "off"] = "auto"
    nesting_depth: Int = Field(default=8, ge=1, le=32)
    attributes: dict[PolicyAttribute, LdapAttribute] = Field(default_factory=dict)
    disabled_filter: OptionalLdapFilter = ""
    pool_size: Int = Field(default=4, ge=1, le=64)
    connect_timeout: Interval = timedelta(seconds=2)

    _resolve = field_validator("ca_file", "bind_password_file", mode="after")(_resolve_relative)

    @field_validator("user_dn_template")
    @classmethod
    def _template_names_the_user(cls, value: str) -> str:
        if value and ("{user}" not in value or parse_dn_text(value) != value):
            raise PydanticCustomError(
                "template", 'expected a DN with {user} like "uid={user},ou=people,dc=ward,'
                'dc=example", got {got}', {"got": _show(value)})
        return value

    @model_validator(mode="after")
    def _no_plain_text_by_accident(self) -> LdapSettings:
        plain = [url for url in self.urls if url.startswith("ldap://")]
        if plain and not self.start_tls and not self.insecure:
            # Simple binds carry the staff's passwords: in clear text only when asked for.
            raise PydanticCustomError(
                "insecure", "{url} with start_tls = false sends passwords in clear text; use "
                "ldaps:// or start_tls = true, or set insecure = true to accept that",
                {"url": plain[0]})
        if (self.bind_dn == "") != (self.bind_password_file is None):
            raise PydanticCustomError(
                "bind", "bind_dn and bind_password_file go together (both empty: anonymous "
                "searches)", {})
        return self


class DirectorySettings(_Section):
    backend: Literal["file", "ldap"] = "file"
    file: Path = Path("/etc/gatewayd/users.toml")
    timeout: Interval = timedelta(seconds=5)
    refresh_interval: Interval = timedelta(minutes=5)
    ldap: LdapSettings = LdapSettings()

    _resolve = field_validator("file", mode="after")(_resolve_relative)

    @model_validator(mode="after")
    def _ldap_is_complete(self) -> DirectorySettings:
        if self.backend != "ldap":
            return self
        ldap, problems = self.ldap, []
        if not ldap.urls:
            problems.append("directory.ldap.urls (at least one ldaps:// or ldap:// URL)")
        if not ldap.user_base and not ldap.user_dn_template:
            problems.append("directory.ldap.user_base or directory.ldap.user_dn_template")
        if ldap.group_mode == "search" and not (ldap.group_base or ldap.user_base):
            problems.append("directory.ldap.group_base (group_mode = \"search\")")
        if ldap.nested_groups == "in_chain" and ldap.group_member_attribute == "memberUid":
            problems.append('a DN-valued group_member_attribute (nested_groups = "in_chain")')
        if ldap.nested_groups == "in_chain" and not (ldap.group_base or ldap.user_base):
            problems.append('directory.ldap.group_base (nested_groups = "in_chain")')
        if ldap.connect_timeout > self.timeout:
            problems.append("directory.ldap.connect_timeout no longer than directory.timeout")
        if problems:
            raise PydanticCustomError(
                "ldap", 'backend = "ldap" needs {needs}', {"needs": "; ".join(problems)})
        return self


class MfaSettings(_Section):
    issuer: str = Field(default="gatewayd", min_length=1, max_length=64)


class LoginSettings(_Section):
    failures_before_backoff: Int = Field(default=5, ge=1, le=100)
    backoff_initial: Interval = timedelta(seconds=2)
    backoff_max: Interval = timedelta(minutes=15)
    lockout_after: Int = Field(default=100, ge=1, le=100)
    lockout_duration: Interval = timedelta(hours=1)


class UpstreamSettings(_Section):
    url: OriginUrl
    connect_timeout: Interval = timedelta(seconds=1)
    read_timeout: Interval = timedelta(seconds=60)
    tls_ca_file: Path | None = None

    _resolve = field_validator("tls_ca_file", mode="after")(_resolve_relative)


class SshSettings(_Section):
    """``[ssh]``: the tunnel frontend for the stock OpenSSH client (``ssh -L`` / ``ssh -D``)."""

    enabled: Bool = False
    listen: Listen = ListenAddress("0.0.0.0", 22)  # noqa: S104 - a gateway faces the network
    host_key_file: Path = Path("/etc/gatewayd/certs/ssh-host-ed25519.key")
    user_ca_key_file: Path | None = None
    login_grace_time: Interval = timedelta(seconds=30)
    max_auth_tries: Int = Field(default=4, ge=1, le=10)
    keepalive_interval: Interval = timedelta(seconds=15)
    keepalive_count: Int = Field(default=3, ge=1, le=100)
    preauth_total: Int = Field(default=64, ge=1, le=100_000)
    preauth_per_source: Int = Field(default=4, ge=1, le=1000)
    connect_rate_per_source: Int = Field(default=20, ge=1, le=100_000)
    address_overrides: dict[HostPort, HostPort] = Field(default_factory=dict)
    window: Size = Field(default=8 * 1024**2, ge=64 * 1024, le=1024**3)
    max_packet_size: Size = Field(default=32 * 1024, ge=4 * 1024, le=256 * 1024)
    sessions_per_certificate_seat: Int = Field(default=4, ge=1, le=1000)

    _resolve = field_validator("host_key_file", "user_ca_key_file",
                               mode="after")(_resolve_relative)


class AdminSettings(_Section):
    """``[admin]``: the admin API socket (`gatewayd sessions|reload|status`)."""

    enabled: Bool = True
    socket: Path = Path("/run/gatewayd/admin.sock")
    group: str = Field(default="gatewayd-admin", max_length=64,
                       pattern=r"^([A-Za-z_][A-Za-z0-9_.-]*)?$")

    _resolve = field_validator("socket", mode="after")(_resolve_relative)


_REDIS_URL = re.compile(
    r"(?P<scheme>rediss?)://(?P<host>[A-Za-z0-9][A-Za-z0-9.\-]{0,252}|\[[0-9a-fA-F:.]+\])"
    r"(?::(?P<port>\d{1,5}))?(?:/(?P<db>\d{1,5})?)?")


def parse_redis_url(text: str) -> str:
    """``redis://host[:port][/db]`` or ``rediss://…`` (TLS); no credentials, query or path.

    Raises ValueError; a URL with ``user:password@`` gets its own message that names where
    credentials go instead, and never repeats the URL (it carries a password).
    """
    if "@" in text:
        raise ValueError("credentials")
    match = _REDIS_URL.fullmatch(text)
    if match is None or (match.group("port") is not None
                         and not 0 < int(match.group("port")) <= 65535):
        raise ValueError(text)
    if match.group("host").startswith("["):
        ipaddress.IPv6Address(match.group("host")[1:-1])  # raises ValueError
    return text


def _redis_url(value: object) -> object:
    if not isinstance(value, str) or value == "":
        return value  # "" = not configured; non-strings get pydantic's own message
    try:
        return parse_redis_url(value)
    except ValueError as exc:
        if str(exc) == "credentials":
            raise PydanticCustomError(
                "credentials", "credentials do not belong in the URL (it appears in logs and "
                "status output): put the password in a file named by state.password_file, and "
                "an ACL user name in state.username", {}) from None
        raise PydanticCustomError(
            "URL", 'expected a URL like "redis://10.0.10.40:6379/0" or '
            '"rediss://redis.ward.local:6380/0", got {got}', {"got": _show(value)}) from None


RedisUrl = Annotated[str, BeforeValidator(_redis_url)]


class StateSettings(_Section):
    """``[state]``: where brute-force counters, the TOTP replay cache and (with Redis) the
    sessions live.

    ``memory`` keeps them in this process (one node); ``redis`` shares them between nodes.
    ``session_cache``: how long a node serves the sessions it knows while Redis cannot
    confirm them (`gatewayd.sessions_shared`).
    """

    backend: Literal["memory", "redis"] = "memory"
    url: RedisUrl = ""
    username: str = Field(default="", max_length=128, pattern=r"^([A-Za-z0-9._-]+)?$")
    password_file: Path | None = None
    ca_file: Path | None = None
    key_prefix: str = "gatewayd:"
    timeout: Interval = timedelta(seconds=1)
    session_cache: Interval = timedelta(seconds=30)

    _resolve = field_validator("password_file", "ca_file", mode="after")(_resolve_relative)

    @field_validator("session_cache")
    @classmethod
    def _cache_bounds(cls, value: timedelta) -> timedelta:
        # How long a node trusts its copy of the sessions while Redis cannot confirm it: a kill
        # sent meanwhile cannot arrive, so this is how long such a kill may be late.
        if not timedelta(seconds=5) <= value <= timedelta(minutes=5):
            raise PydanticCustomError(
                "session_cache", 'expected a duration from "5s" to "5m", got {got}',
                {"got": _show(f"{value.total_seconds():g}s")})
        return value

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", value) is None:
            raise PydanticCustomError(
                "key_prefix", "expected 1-64 letters, digits, '.', '_', ':' or '-' like "
                '"gatewayd:", got {got}', {"got": _show(value)})
        return value

    @field_validator("timeout")
    @classmethod
    def _fail_fast(cls, value: timedelta) -> timedelta:
        # Every login waits for the store: a long timeout turns an outage into hung logins,
        # and /readyz must still answer within its own budget.
        if value > timedelta(seconds=5):
            raise PydanticCustomError(
                "timeout", 'expected a duration of at most "5s", got {got}',
                {"got": _show(f"{value.total_seconds():g}s")})
        return value

    @model_validator(mode="after")
    def _redis_is_complete(self) -> StateSettings:
        if self.backend == "redis" and not self.url:
            raise PydanticCustomError(
                "url", 'backend = "redis" needs url, e.g. "rediss://redis.ward.local:6380/0"', {})
        if self.ca_file is not None and self.url.startswith("redis://"):
            # A CA nobody checks would look like protection and be none.
            raise PydanticCustomError(
                "ca_file", "ca_file is only used with a rediss:// (TLS) url", {})
        if self.username and self.password_file is None:
            raise PydanticCustomError(
                "username", "username (an ACL user) needs password_file", {})
        return self


class Settings(_Section):
    """Every setting of one gatewayd node. Frozen: a reload builds a new one."""

    gateway: GatewaySettings = GatewaySettings()
    metrics: MetricsSettings = MetricsSettings()
    admin: AdminSettings = AdminSettings()
    policy: PolicySettings = PolicySettings()
    sessions: SessionSettings = SessionSettings()
    audit: AuditSettings = AuditSettings()
    https: HttpsSettings = HttpsSettings()
    ssh: SshSettings = SshSettings()
    directory: DirectorySettings = DirectorySettings()
    mfa: MfaSettings = MfaSettings()
    login: LoginSettings = LoginSettings()
    state: StateSettings = StateSettings()
    console: ConsoleSettings = ConsoleSettings()
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)


# --- loading ---------------------------------------------------------------------------------

# Human wording for pydantic's built-in error types (the custom ones already read well).
_EXPECTED = MappingProxyType({
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_type": "expected an integer, got {got}",
    "bool_type": "expected true or false, got {got}",
    "string_type": "expected a string, got {got}",
    "path_type": "expected a path string, got {got}",
    "model_type": "expected a table, got {got}",
    "model_attributes_type": "expected a table, got {got}",
    "dict_type": "expected a table, got {got}",
})

_BOUNDS = MappingProxyType({
    "greater_than_equal": "expected a number >= {ge}, got {got}",
    "less_than_equal": "expected a number <= {le}, got {got}",
    "string_too_short": "expected at least {min_length} characters, got {got}",
    "string_too_long": "expected at most {max_length} characters, got {got}",
    "string_pattern_mismatch": "expected letters, digits, '.', '_' or '-', got {got}",
})


def _format_error(source: str, error: Mapping[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind in _EXPECTED:
        message = _EXPECTED[kind].format(got=_show(error.get("input")))
    elif kind == "literal_error":
        allowed = error.get("ctx", {}).get("expected", "")
        message = f"expected one of {allowed}, got {_show(error.get('input'))}"
    elif kind in _BOUNDS:
        message = _BOUNDS[kind].format(**error.get("ctx", {}), got=_show(error.get("input")))
    else:  # our own PydanticCustomError messages already say what was expected and got
        message = str(error["msg"])
    prefix = f"{source}: {path}: " if path else f"{source}: "
    return prefix + message


def settings_from_mapping(
    data: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None
) -> Settings:
    """Validate an already parsed config; raise ConfigError listing every problem."""
    try:
        return Settings.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise ConfigError([_format_error(source, e) for e in errors]) from None


def load_settings(path: Path) -> Settings:
    """Read and validate the TOML file at ``path``."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
    return settings_from_mapping(data, source=source, base_dir=path.resolve().parent)


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string, for the programs that write config-like files.

    Quotes, backslashes and every control character (DEL included, which TOML forbids raw)
    are ``\\uXXXX`` escapes; everything else, astral characters included, stays literal.
    """
    escaped = "".join(
        f"\\u{ord(ch):04x}" if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in text
    )
    return f'"{escaped}"'


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """``$GATEWAYD_CONFIG`` if set, else ``/etc/gatewayd/gatewayd.toml``."""
    value = environ.get(CONFIG_ENV)
    return Path(value) if value else DEFAULT_CONFIG_PATH
