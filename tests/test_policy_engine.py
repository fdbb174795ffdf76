"""Tests for gatewayd.policy.engine: decide() over every condition (table-driven), the
refusals before rule evaluation, and the laws of the semantics as hypothesis properties
(default deny, deny overrides allow, order independence, index soundness)."""

from __future__ import annotations

import ipaddress
import math
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.policy import (
    AccessRequest,
    Decision,
    Obligations,
    Policy,
    decide,
    explain,
    load_policy_texts,
)
from gatewayd.policy.check import LoadedFile
from gatewayd.policy.compiler import compile_policy
from gatewayd.policy.schema import validate_file
from gatewayd.policy.yamlsrc import SourceMap

JST = ZoneInfo("Asia/Tokyo")
MONDAY_10 = datetime(2025, 4, 7, 10, 0, tzinfo=JST)

POLICY = """\
timezone: Asia/Tokyo
roles:
  staff: {groups: [telework-staff]}
  managers: {groups: [telework-managers]}
  partners: {users: [Pat]}
services:
  web: {kind: http, prefixes: [/web/]}
  dav: {kind: http, prefixes: [/dav/]}
  pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
  smb: {kind: tcp, destinations: ["fs.ward.local:445", "fs.ward.local:139"]}
rules:
  - {id: office-hours, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/hours/**,
     when: {hours: "07:00-22:00", weekdays: mon-fri}}
  - {id: night-shift, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/night/**,
     when: {hours: "22:00-06:00"}}
  - {id: split-shift, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/split/**,
     when: {hours: ["08:00-12:00", "13:00-17:00"]}}
  - {id: office-network, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/net/**,
     when: {networks: [10.0.0.0/8, "2001:db8::/32"]}}
  - {id: registered-device, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/device/**,
     when: {device: registered}}
  - {id: own-device, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/own/**,
     when: {device_bound_to_user: true}}
  - {id: fresh-mfa, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/mfa/**,
     mfa_max_age: 5m}
  - {id: upload, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/upload/**,
     methods: [POST, PUT], obligations: {max_upload: 10MiB}}
  - {id: pdfs, effect: allow, subjects: {roles: [partners]}, services: dav, paths: ["/dav/public/*.pdf"]}
  - {id: dav-read, effect: allow, subjects: {roles: [staff, managers]}, services: dav,
     obligations: {read_only: true}}
  - {id: dav-write, effect: allow, subjects: {roles: [managers]}, services: dav,
     methods: [PUT, DELETE, MKCOL, COPY, MOVE, LOCK, UNLOCK, PROPPATCH], obligations: {max_upload: 1GiB}}
  - {id: no-secrets, effect: deny, subjects: "*", services: dav, paths: "/dav/**/secret/**",
     description: Secret folders are never served}
  - {id: own-pc, effect: allow, subjects: {roles: [staff]}, services: pc}
  - {id: smb-445, effect: allow, subjects: {roles: [staff]}, services: smb, destinations: fs.ward.local:445}
"""


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy_texts({"p.yaml": POLICY})


def http(path: str, **changes: Any) -> dict[str, Any]:
    return {"path": path, **changes}


def tcp(service: str, dest: str, **changes: Any) -> dict[str, Any]:
    host, _, port = dest.rpartition(":")
    return {"service": service, "method": None, "path": None, "dest_host": host, "dest_port": int(port),
            "frontend": "ssh", **changes}


def make(policy: Policy, changes: dict[str, Any]) -> AccessRequest:
    """A request by alice (staff) at Monday 10:00 JST from the internet, MFA a minute ago;
    the HTTP service is routed from the path unless given."""
    fields: dict[str, Any] = {
        "user": "alice", "groups": frozenset({"telework-staff"}), "frontend": "https",
        "method": "GET", "source": ipaddress.ip_address("192.0.2.1"), "now": MONDAY_10, "mfa_age": 60.0,
    } | changes
    if "service" not in fields:
        fields["service"] = policy.http_service_for(fields.get("host"), fields["path"])
    for key in ("groups",):
        fields[key] = frozenset(fields[key])
    if isinstance(fields["source"], str):
        fields["source"] = ipaddress.ip_address(fields["source"])
    return AccessRequest(**fields)


def jst(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """April 2025 in JST: the 7th is a Monday, the 11th a Friday, the 12th a Saturday."""
    return datetime(2025, 4, day, hour, minute, second, tzinfo=JST)


MANAGER = {"user": "bob", "groups": {"telework-managers"}}
DAV_WRITES = ["PUT", "DELETE", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "PROPPATCH"]

# (request changes, decision, deciding rule)
TABLE: list[Any] = [
    # hours and weekdays, in the policy time zone, start inclusive, end exclusive
    pytest.param(http("/web/hours/x", now=jst(7, 7, 0)), "allow", "office-hours", id="hours-start"),
    pytest.param(http("/web/hours/x", now=jst(7, 6, 59, 59)), "deny", None, id="hours-before-start"),
    pytest.param(http("/web/hours/x", now=jst(11, 21, 59, 59)), "allow", "office-hours", id="hours-last-second"),
    pytest.param(http("/web/hours/x", now=jst(11, 22, 0)), "deny", None, id="hours-end-exclusive"),
    pytest.param(http("/web/hours/x", now=jst(12, 10, 0)), "deny", None, id="saturday"),
    pytest.param(http("/web/hours/x", now=jst(13, 10, 0)), "deny", None, id="sunday"),
    pytest.param(http("/web/hours/x", now=datetime(2025, 4, 6, 22, 0, tzinfo=UTC)), "allow", "office-hours", id="utc-sunday-is-jst-monday-7am"),
    pytest.param(http("/web/hours/x", now=datetime(2025, 4, 6, 21, 59, tzinfo=UTC)), "deny", None, id="utc-sunday-is-jst-monday-6:59"),
    pytest.param(http("/web/hours/x", now=datetime(2025, 4, 11, 12, 59, tzinfo=UTC)), "allow", "office-hours", id="utc-friday-is-jst-21:59"),
    pytest.param(http("/web/hours/x", now=datetime(2025, 4, 11, 13, 0, tzinfo=UTC)), "deny", None, id="utc-friday-is-jst-22:00"),
    pytest.param(http("/web/hours/x", now=datetime(2025, 4, 7, 3, 0, tzinfo=timezone(timedelta(hours=-5)))), "allow", "office-hours", id="other-offset-same-instant"),
    pytest.param(http("/web/night/x", now=jst(7, 22, 0)), "allow", "night-shift", id="overnight-start"),
    pytest.param(http("/web/night/x", now=jst(8, 0, 0)), "allow", "night-shift", id="overnight-midnight"),
    pytest.param(http("/web/night/x", now=jst(8, 5, 59)), "allow", "night-shift", id="overnight-last-minute"),
    pytest.param(http("/web/night/x", now=jst(8, 6, 0)), "deny", None, id="overnight-end"),
    pytest.param(http("/web/night/x", now=jst(7, 21, 59)), "deny", None, id="overnight-before"),
    pytest.param(http("/web/split/x", now=jst(7, 11, 59)), "allow", "split-shift", id="split-morning"),
    pytest.param(http("/web/split/x", now=jst(7, 12, 30)), "deny", None, id="split-lunch"),
    pytest.param(http("/web/split/x", now=jst(7, 13, 0)), "allow", "split-shift", id="split-afternoon"),
    # networks, IPv4 and IPv6, IPv4-mapped IPv6 sources
    pytest.param(http("/web/net/x", source="10.1.2.3"), "allow", "office-network", id="net-v4-in"),
    pytest.param(http("/web/net/x", source="10.255.255.255"), "allow", "office-network", id="net-v4-last"),
    pytest.param(http("/web/net/x", source="11.0.0.0"), "deny", None, id="net-v4-next"),
    pytest.param(http("/web/net/x", source="192.0.2.1"), "deny", None, id="net-v4-out"),
    pytest.param(http("/web/net/x", source="2001:db8:1::5"), "allow", "office-network", id="net-v6-in"),
    pytest.param(http("/web/net/x", source="2001:db9::1"), "deny", None, id="net-v6-out"),
    pytest.param(http("/web/net/x", source="::ffff:10.0.0.1"), "allow", "office-network", id="net-v4-mapped"),
    pytest.param(http("/web/net/x", source="::ffff:192.0.2.1"), "deny", None, id="net-v4-mapped-out"),
    pytest.param(http("/web/net/x", source="::a00:1"), "deny", None, id="net-v6-same-bits-not-v4"),
    # devices
    pytest.param(http("/web/device/x", device="dev-1"), "allow", "registered-device", id="device-registered"),
    pytest.param(http("/web/device/x"), "deny", None, id="device-none"),
    pytest.param(http("/web/device/x", device=""), "deny", None, id="device-empty"),
    pytest.param(http("/web/own/x", device="dev-1", device_user="alice"), "allow", "own-device", id="bound-to-user"),
    pytest.param(http("/web/own/x", device="dev-1", device_user="ALICE"), "allow", "own-device", id="bound-case-insensitive"),
    pytest.param(http("/web/own/x", device="dev-1", device_user="bob"), "deny", None, id="bound-to-other"),
    pytest.param(http("/web/own/x", device="dev-1"), "deny", None, id="bound-to-nobody"),
    pytest.param(http("/web/own/x", device_user="alice"), "deny", None, id="bound-without-device"),
    # MFA freshness
    pytest.param(http("/web/mfa/x", mfa_age=0.0), "allow", "fresh-mfa", id="mfa-just-now"),
    pytest.param(http("/web/mfa/x", mfa_age=300.0), "allow", "fresh-mfa", id="mfa-at-limit"),
    pytest.param(http("/web/mfa/x", mfa_age=300.5), "step_up", "fresh-mfa", id="mfa-stale"),
    pytest.param(http("/web/mfa/x", mfa_age=None), "step_up", "fresh-mfa", id="mfa-unknown"),
    pytest.param(http("/web/mfa/x", mfa_age=-1.0), "step_up", "fresh-mfa", id="mfa-negative"),
    pytest.param(http("/web/mfa/x", mfa_age=math.nan), "step_up", "fresh-mfa", id="mfa-nan"),
    pytest.param(http("/web/hours/x", mfa_age=None), "allow", "office-hours", id="no-mfa-limit-needs-none"),
    # methods
    pytest.param(http("/web/upload/x", method="POST"), "allow", "upload", id="method-listed"),
    pytest.param(http("/web/upload/x", method="PUT"), "allow", "upload", id="method-listed-2"),
    pytest.param(http("/web/upload/x", method="GET"), "deny", None, id="method-not-listed"),
    pytest.param(http("/web/upload/x", method="post"), "deny", None, id="methods-case-sensitive"),
    *[pytest.param(http("/dav/a", method=m), "allow", "dav-read", id=f"read-only-allows-{m}")
      for m in ["GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"]],
    *[pytest.param(http("/dav/a", method=m), "deny", None, id=f"read-only-refuses-{m}")
      for m in [*DAV_WRITES, "POST", "PATCH", "TRACE", "BREW"]],
    *[pytest.param(http("/dav/a", method=m, **MANAGER), "allow", "dav-write", id=f"manager-{m}")
      for m in DAV_WRITES],
    pytest.param(http("/dav/a", method="POST", **MANAGER), "deny", None, id="manager-unlisted-method"),
    pytest.param(http("/dav/a", method="PROPFIND", **MANAGER), "allow", "dav-read", id="manager-read"),
    # path globs, case-sensitive
    pytest.param(http("/dav/public/a.pdf", user="pat", groups=set()), "allow", "pdfs", id="glob-star"),
    pytest.param(http("/dav/public/sub/a.pdf", user="pat", groups=set()), "deny", None, id="glob-star-one-segment"),
    pytest.param(http("/dav/public/a.PDF", user="pat", groups=set()), "deny", None, id="glob-case-sensitive"),
    pytest.param(http("/dav/public/a.pdf?download=1", user="pat", groups=set()), "allow", "pdfs", id="glob-ignores-query"),
    pytest.param(http("/dav/public/%61.pdf", user="pat", groups=set()), "allow", "pdfs", id="glob-after-decoding"),
    # deny overrides allow
    pytest.param(http("/dav/secret/x"), "deny", "no-secrets", id="deny-overrides-read"),
    pytest.param(http("/dav/a/b/secret/", method="PUT", **MANAGER), "deny", "no-secrets", id="deny-overrides-write"),
    pytest.param(http("/dav/a/secret"), "deny", "no-secrets", id="deny-bare-dir"),
    pytest.param(http("/dav/a/secrets/x"), "allow", "dav-read", id="deny-glob-exact-segment"),
    # deny globs match case-insensitively (casefolded: a deny rule errs on matching), so a
    # case-insensitive upstream (IIS, a Windows share) cannot be reached around them
    pytest.param(http("/dav/a/Secret/x"), "deny", "no-secrets", id="deny-glob-case-insensitive"),
    pytest.param(http("/dav/a/SECRET/"), "deny", "no-secrets", id="deny-glob-uppercase"),
    pytest.param(http("/dav/a/SeCrEt", method="PUT", **MANAGER), "deny", "no-secrets", id="deny-glob-mixed-case"),
    pytest.param(http("/dav/a/%C5%BFecret/x"), "deny", "no-secrets", id="deny-glob-casefolds-long-s"),  # U+017F folds to 's'
    pytest.param(http("/dav/a/secret./x"), "deny", None, id="trailing-dot-refused"),
    pytest.param(http("/dav/a/secret%20/x"), "deny", None, id="trailing-space-refused"),
    # subjects: groups and users compare case-insensitively (directory semantics)
    pytest.param(http("/dav/a", groups={"Telework-Staff"}), "allow", "dav-read", id="group-case-insensitive"),
    pytest.param(http("/dav/a", groups={"telework"}), "deny", None, id="group-not-member"),
    pytest.param(http("/dav/a", groups=set()), "deny", None, id="no-groups"),
    pytest.param(http("/dav/public/a.pdf", user="PAT", groups=set()), "allow", "pdfs", id="user-case-insensitive"),
    # TCP destinations, per-user
    pytest.param(tcp("pc", "pc-alice.ward.local:3389", attributes={"office_pc": "pc-alice.ward.local"}), "allow", "own-pc", id="own-pc"),
    pytest.param(tcp("pc", "PC-Alice.ward.local.:3389", attributes={"office_pc": "pc-alice.ward.local"}), "allow", "own-pc", id="own-pc-canonical"),
    pytest.param(tcp("pc", "pc-bob.ward.local:3389", attributes={"office_pc": "pc-alice.ward.local"}), "deny", None, id="other-users-pc"),
    pytest.param(tcp("pc", "pc-alice.ward.local:3389"), "deny", None, id="pc-attribute-missing"),
    pytest.param(tcp("pc", "pc-alice.ward.local:3389", attributes={"office_pc": ""}), "deny", None, id="pc-attribute-empty"),
    pytest.param(tcp("pc", "pc-alice.ward.local:22", attributes={"office_pc": "pc-alice.ward.local"}), "deny", None, id="pc-wrong-port"),
    pytest.param(tcp("smb", "fs.ward.local:445"), "allow", "smb-445", id="rule-destination"),
    pytest.param(tcp("smb", "fs.ward.local:139"), "deny", None, id="rule-destination-other-port"),
    pytest.param(tcp("smb", "10.9.9.9:445"), "deny", None, id="not-a-service-destination"),
]


@pytest.mark.parametrize(("changes", "decision", "rule"), TABLE)
def test_decisions(policy: Policy, changes: dict[str, Any], decision: str, rule: str | None) -> None:
    result = decide(policy, make(policy, changes))
    assert (result.decision, result.rule) == (decision, rule), result.reason


def test_obligations_come_from_the_deciding_rule(policy: Policy) -> None:
    assert decide(policy, make(policy, http("/dav/a"))).obligations == Obligations(read_only=True)
    assert decide(policy, make(policy, http("/dav/a", method="PUT", **MANAGER))).obligations == Obligations(max_upload=2**30)
    assert decide(policy, make(policy, http("/web/upload/a", method="POST"))).obligations == Obligations(max_upload=10 * 2**20)
    assert decide(policy, make(policy, http("/web/hours/a"))).obligations == Obligations()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (http("/web/hours/x"), "allowed by rule office-hours"),
        (http("/dav/secret/x"), "denied by rule no-secrets: Secret folders are never served"),
        (http("/web/nothing"), "no rule allows this"),
        (http("/web/mfa/x", mfa_age=754.0), "fresh MFA required: rule fresh-mfa wants MFA within 5m, last MFA 12m34s ago"),
        (http("/web/mfa/x", mfa_age=None), "fresh MFA required: rule fresh-mfa wants MFA within 5m, last MFA unknown"),
        # refused before any rule is looked at
        (http("/nowhere/"), "the request is not for any known service"),
        (http("/web/x", service="nope"), "unknown service nope"),
        (http("/web/x", now=datetime(2025, 4, 7, 10, 0)), "request time has no time zone"),
        (http("/web/x", method=None), "HTTP request without method or path"),
        (http("/web/x", service="web") | {"path": None}, "HTTP request without method or path"),
        (http("/web/%2e%2e/dav/x", service="web"), "ambiguous request path refused: percent-encoded '.' (%2E)"),
        (http("/web/../dav/x", service="web"), "ambiguous request path refused: dot-segment ('.' or '..') in path"),
        (http("/dav/x", service="web"), "path /dav/x is not part of service web"),
        (http("/APPROVAL/x", service="web"), "path /APPROVAL/x is not part of service web"),
        (tcp("smb", "fs.ward.local:445", dest_port=None), "TCP request without destination"),
        (tcp("pc", "pc-bob.ward.local:3389", attributes={"office_pc": "pc-alice.ward.local"}),
         "pc-bob.ward.local:3389 is not a destination of service pc for this user"),
    ],
)
def test_reasons(policy: Policy, changes: dict[str, Any], reason: str) -> None:
    assert decide(policy, make(policy, changes)).reason == reason


# A method that is not an uppercase RFC 9110 token is refused before any rule is looked at,
# like an ambiguous path: otherwise 'trace' slips past a deny rule for TRACE (policy methods
# are uppercase) and is allowed by any rule without a method list. /web/hours/ is such a rule.
@pytest.mark.parametrize(
    ("method", "shown"),
    [
        ("trace", "'trace'"), ("get", "'get'"), ("Get", "'Get'"), ("pUT", "'pUT'"), ("GET ", "'GET '"),
        (" GET", "' GET'"), ("GE T", "'GE T'"), ("G\x00T", "'G\\x00T'"), ("GET\r\nX-Injected: 1", "'GET\\r\\nX-Injected: 1'"),
        ("", "''"), ("G\u0130T", "'G\\u0130T'"), ("\uff27\uff25\uff34", "'\\uff27\\uff25\\uff34'"),
        ("GET/1.1", "'GET/1.1'"), ("PROP(FIND)", "'PROP(FIND)'"),
        ("X" * 33, "'" + "X" * 32 + "'..."), ("GET" * 5000, "'" + ("GET" * 11)[:32] + "'..."),
    ],
)
def test_methods_that_are_not_uppercase_tokens_are_refused(policy: Policy, method: str, shown: str) -> None:
    result = decide(policy, make(policy, http("/web/hours/x", method=method)))
    assert result == Decision("deny", None, f"HTTP method refused: {shown} is not an uppercase method token")
    assert explain(policy, make(policy, http("/web/hours/x", method=method))).admitted is False


@pytest.mark.parametrize("method", ["GET", "BREW", "M-SEARCH", "VERSION-CONTROL", "X" * 32, "!#$%&'*+-.^_`|~09"])
def test_uppercase_method_tokens_reach_the_rules(policy: Policy, method: str) -> None:
    assert decide(policy, make(policy, http("/web/hours/x", method=method))).decision == "allow"


def test_decide_reads_no_clock_and_is_repeatable(policy: Policy) -> None:
    request = make(policy, http("/web/hours/x", now=jst(7, 6, 59)))
    assert {decide(policy, request) for _ in range(3)} == {Decision("deny", None, "no rule allows this")}


def test_an_empty_policy_denies_everything() -> None:
    empty = load_policy_texts({"p.yaml": "services:\n  web: {kind: http, prefixes: /web/}\n"})
    assert decide(empty, make(empty, http("/web/x"))) == Decision("deny", None, "no rule allows this")


# ---------------------------------------------------------------------------------------------
# Laws of the semantics, as properties over random policies and requests.
#
# Random rule sets often contain rules the loader rightly rejects (e.g. an allow shadowed by a
# deny), so the properties compile without the whole-policy checks: they are about what
# decide() does with whatever rules it is given.

SERVICES = """\
timezone: Asia/Tokyo
roles:
  r1: {groups: [g1]}
  r2: {groups: [g2, g3]}
services:
  web: {kind: http, prefixes: [/web/]}
  smb: {kind: tcp, destinations: ["fs.local:445", "{user.pc}:3389"]}
"""
USERS = ["alice", "bob", "carol"]
GROUPS = ["g1", "g2", "g3"]
METHODS = ["GET", "PUT", "PROPFIND", "POST", "DELETE"]
GLOBS = ["/web/**", "/web/a/*", "/web/a/**", "/web/*.txt", "/web/**/x", "/web/b"]
PATHS = ["/web/", "/web/a/b", "/web/a/b/x", "/web/f.txt", "/web/b", "/web/b/", "/web/%2e%2e/x", "/web//a"]


BASE = yaml.safe_load(SERVICES)


def compile_unchecked(rules: list[dict[str, Any]]) -> Policy:
    """Validate and compile, skipping YAML (speed) and the whole-policy checks."""
    validated = validate_file({**BASE, "rules": rules})
    assert not validated.errors, validated.errors
    return compile_policy([LoadedFile(SourceMap("p.yaml", {(): 1}), validated)])


def test_compile_unchecked_agrees_with_the_loader() -> None:
    rule_list = [{"id": "a", "effect": "allow", "subjects": "*", "services": ["web"]}]
    loaded = load_policy_texts({"p.yaml": SERVICES + yaml.safe_dump({"rules": rule_list})})
    request = AccessRequest(user="u", frontend="https", service="web", method="GET", path="/web/x",
                            source=ipaddress.ip_address("10.0.0.1"), now=MONDAY_10)
    assert decide(compile_unchecked(rule_list), request) == decide(loaded, request)


@st.composite
def rules(draw: st.DrawFn, effect: str | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"id": "x", "effect": effect or draw(st.sampled_from(["allow", "deny"]))}
    rule["subjects"] = draw(st.one_of(
        st.just("*"),
        st.fixed_dictionaries({"roles": st.lists(st.sampled_from(["r1", "r2"]), min_size=1, max_size=2)}),
        st.fixed_dictionaries({"users": st.lists(st.sampled_from(USERS), min_size=1, max_size=2)}),
        st.fixed_dictionaries({"groups": st.lists(st.sampled_from(GROUPS), min_size=1, max_size=2)}),
    ))
    if draw(st.booleans()):
        rule["services"] = ["smb"]
        if draw(st.booleans()):
            rule["destinations"] = [draw(st.sampled_from(["fs.local:445", "{user.pc}:3389"]))]
    else:
        rule["services"] = ["web"]
        if draw(st.booleans()):
            rule["methods"] = draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=3, unique=True))
        if draw(st.booleans()):
            rule["paths"] = draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2))
        if rule["effect"] == "allow" and draw(st.booleans()):
            read_only = draw(st.booleans())
            if read_only and "methods" in rule:
                rule["methods"] = [m for m in rule["methods"] if m in ("GET", "PROPFIND")] or ["GET"]
            rule["obligations"] = {"read_only": read_only,
                                   "max_upload": draw(st.sampled_from([None, 1024, 10**6]))}
    when = draw(st.fixed_dictionaries({}, optional={
        "hours": st.sampled_from(["07:00-22:00", "22:00-06:00"]),
        "weekdays": st.sampled_from(["mon-fri", "sat"]),
        "networks": st.just(["10.0.0.0/8"]),
        "device": st.just("registered"),
        "device_bound_to_user": st.just(True),
    }))
    if when:
        rule["when"] = when
    if rule["effect"] == "allow" and draw(st.booleans()):
        rule["mfa_max_age"] = draw(st.sampled_from(["1m", "1h"]))
    return rule


@st.composite
def rule_lists(draw: st.DrawFn, max_size: int = 8) -> list[dict[str, Any]]:
    drawn = draw(st.lists(rules(), max_size=max_size))
    return [rule | {"id": f"rule-{index}"} for index, rule in enumerate(drawn)]


@st.composite
def requests(draw: st.DrawFn) -> AccessRequest:
    user = draw(st.sampled_from(USERS))
    common: dict[str, Any] = {
        "user": user,
        "groups": frozenset(draw(st.lists(st.sampled_from(GROUPS), max_size=2))),
        "attributes": draw(st.sampled_from([{}, {"pc": "pc-1.local"}, {"pc": ""}])),
        "device": draw(st.sampled_from([None, "dev-1"])),
        "device_user": draw(st.sampled_from([None, user, "mallory"])),
        "source": ipaddress.ip_address(draw(st.sampled_from(["10.1.1.1", "192.0.2.1", "2001:db8::1"]))),
        "now": datetime(2025, 4, 7, tzinfo=JST) + timedelta(minutes=draw(st.integers(0, 7 * 24 * 60))),
        "mfa_age": draw(st.sampled_from([None, 0.0, 30.0, 600.0, 7200.0])),
    }
    if draw(st.booleans()):
        dest = draw(st.sampled_from([("fs.local", 445), ("pc-1.local", 3389), ("other", 445)]))
        return AccessRequest(**common, frontend="ssh", service="smb", dest_host=dest[0], dest_port=dest[1])
    return AccessRequest(**common, frontend="https", service="web",
                         method=draw(st.sampled_from([*METHODS, "MOVE"])), path=draw(st.sampled_from(PATHS)))


def matching_deny(request: AccessRequest) -> dict[str, Any]:
    """A deny rule that certainly matches `request` (it names the user and the service)."""
    return {"id": "added-deny", "effect": "deny", "subjects": {"users": [request.user]},
            "services": [request.service]}


PROPERTY = settings(max_examples=60, deadline=None)


@PROPERTY
@given(rule_lists(), requests(), st.text(max_size=30), st.text(max_size=8))
def test_decide_is_total(rule_list: list[dict[str, Any]], request: AccessRequest, path: str, method: str) -> None:
    """Any path and method text gives a decision, never an exception (fail closed)."""
    odd = replace(request, frontend="https", service="web", method=method, path="/web/" + path,
                  dest_host=None, dest_port=None)
    assert decide(compile_unchecked(rule_list), odd).decision in ("allow", "deny", "step_up")


@PROPERTY
@given(requests())
def test_empty_policy_denies_everything(request: AccessRequest) -> None:
    assert decide(compile_unchecked([]), request).decision == "deny"


@PROPERTY
@given(rule_lists(), requests())
def test_adding_a_matching_deny_rule_always_denies(rule_list: list[dict[str, Any]], request: AccessRequest) -> None:
    for position in (0, len(rule_list)):
        with_deny = [*rule_list[:position], matching_deny(request), *rule_list[position:]]
        assert decide(compile_unchecked(with_deny), request).decision == "deny"


@PROPERTY
@given(rule_lists(), rules(), requests(), st.integers(0, 8))
def test_adding_any_rule_never_lifts_a_deny_by_a_deny_rule(
    rule_list: list[dict[str, Any]], extra: dict[str, Any], request: AccessRequest, position: int
) -> None:
    before = decide(compile_unchecked(rule_list), request)
    if before.decision != "deny" or before.rule is None:
        return
    extended = [*rule_list[:position], extra | {"id": "extra"}, *rule_list[position:]]
    assert decide(compile_unchecked(extended), request).decision == "deny"


@PROPERTY
@given(rule_lists(), rules(effect="allow"), requests())
def test_adding_an_allow_rule_never_takes_an_allow_away(
    rule_list: list[dict[str, Any]], extra: dict[str, Any], request: AccessRequest
) -> None:
    if decide(compile_unchecked(rule_list), request).decision != "allow":
        return
    assert decide(compile_unchecked([*rule_list, extra | {"id": "extra"}]), request).decision == "allow"


@PROPERTY
@given(rule_lists(), requests())
def test_without_allow_rules_everything_is_denied(rule_list: list[dict[str, Any]], request: AccessRequest) -> None:
    denies_only = [rule for rule in rule_list if rule["effect"] == "deny"]
    assert decide(compile_unchecked(denies_only), request).decision == "deny"


@PROPERTY
@given(rule_lists(), requests(), st.randoms(use_true_random=False))
def test_rule_order_does_not_change_the_decision(
    rule_list: list[dict[str, Any]], request: AccessRequest, rng: random.Random
) -> None:
    shuffled = list(rule_list)
    rng.shuffle(shuffled)
    assert decide(compile_unchecked(rule_list), request).decision == decide(compile_unchecked(shuffled), request).decision


@PROPERTY
@given(rule_lists(), requests())
def test_deny_only_when_no_allow_or_a_deny_rule_matched(rule_list: list[dict[str, Any]], request: AccessRequest) -> None:
    """Classify by explain's per-rule trace, which must agree with decide's answer."""
    policy = compile_unchecked(rule_list)
    decision = decide(policy, request)
    explanation = explain(policy, request)
    assert explanation.decision == decision  # the method index never changes an answer
    matched = {(step.rule.effect, step.outcome) for step in explanation.considered}
    if ("deny", "match") in matched:
        assert decision.decision == "deny" and decision.rule is not None
    elif ("allow", "match") in matched:
        assert decision.decision == "allow"
    elif ("allow", "mfa_stale") in matched:
        assert decision.decision == "step_up"
    else:
        assert decision.decision == "deny"


@PROPERTY
@given(rule_lists(), requests())
def test_fresh_mfa_never_needs_a_step_up(rule_list: list[dict[str, Any]], request: AccessRequest) -> None:
    assert decide(compile_unchecked(rule_list), replace(request, mfa_age=0.0)).decision != "step_up"


@PROPERTY
@given(rule_lists(), requests())
def test_read_only_never_allows_a_write(rule_list: list[dict[str, Any]], request: AccessRequest) -> None:
    decision = decide(compile_unchecked(rule_list), request)
    if decision.decision == "allow" and decision.obligations.read_only:
        assert request.method in {"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"}
