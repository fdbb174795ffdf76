"""Tests for gatewayd.policy.schema: every kind of per-file validation error, reported as
exactly `file:line: message` through the loader."""

from __future__ import annotations

import textwrap

import pytest

from gatewayd.policy import PolicyError, load_policy_texts

BASE = """\
roles:
  staff: {groups: [telework-staff]}
services:
  files: {kind: http, prefixes: [/files/]}
  pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
"""

RULE = """\
rules:
  - id: r
    effect: allow
    subjects: {roles: [staff]}
    services: [files]
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_texts({"00-base.yaml": BASE, "p.yaml": textwrap.dedent(text)})
    return [str(issue) for issue in caught.value.errors]


def test_base_and_rule_are_valid() -> None:
    policy = load_policy_texts({"00-base.yaml": BASE, "p.yaml": RULE})
    assert [rule.id for rule in policy.rules] == ["r"]


# (policy file text, the exact errors it must produce)
CASES = [
    # Unknown keys, with a hint when a known key is close.
    (RULE + "    methds: [GET]\n", ["p.yaml:6: rule 'r': unknown key 'methds' (did you mean 'methods'?)"]),
    (RULE + "    when: {hour: '07:00-22:00'}\n", ["p.yaml:6: rule 'r': when: unknown key 'hour' (did you mean 'hours'?)"]),
    ("colour: blue\n", ["p.yaml:1: unknown key 'colour'"]),
    ("roles:\n  x: {groups: [g], members: [a]}\n", ["p.yaml:2: role 'x': unknown key 'members'"]),
    ("services:\n  x: {kind: http, prefixes: /x/, port: 80}\n", ["p.yaml:2: service 'x': unknown key 'port'"]),
    # Missing keys.
    ("rules:\n  - id: r\n    subjects: '*'\n    services: [files]\n", ["p.yaml:2: rule 'r': missing required key 'effect'"]),
    ("rules:\n  - effect: allow\n    subjects: '*'\n    services: [files]\n", ["p.yaml:2: rules[0]: missing required key 'id'"]),
    ("services:\n  x: {prefixes: [/x/]}\n", ["p.yaml:2: service 'x': missing required key 'kind' (http or tcp)"]),
    # Wrong values.
    ("services:\n  x: {kind: udp}\n", ["p.yaml:2: service 'x': kind must be 'http' or 'tcp', not 'udp'"]),
    ("services:\n  x:\n    kind: http\n    description: no route\n", ["p.yaml:2: service 'x': an HTTP service needs at least one of 'prefixes' or 'hosts'"]),
    ("services:\n  x: {kind: http, prefixes: [x/]}\n", ["p.yaml:2: service 'x': prefixes[0]: invalid prefix 'x/': must start and end with '/'"]),
    ("services:\n  x: {kind: http, prefixes: ['/a/../b/']}\n", ["p.yaml:2: service 'x': prefixes[0]: invalid prefix '/a/../b/': dot-segment ('.' or '..') in path"]),
    ("services:\n  x: {kind: http, prefixes: ['/a/*/']}\n", ["p.yaml:2: service 'x': prefixes[0]: invalid prefix '/a/*/': prefixes are literal, no wildcards"]),
    ("services:\n  x: {kind: http, hosts: ['bad host']}\n", ["p.yaml:2: service 'x': hosts[0]: invalid host 'bad host': use a DNS name like 'mail.ward.example'"]),
    ("services:\n  x: {kind: tcp, destinations: []}\n", ["p.yaml:2: service 'x': destinations: must not be empty (omit the key to mean 'any')"]),
    ("services:\n  x:\n    kind: tcp\n    destinations:\n      - db:5432\n      - db:99999\n", ["p.yaml:6: service 'x': destinations[1]: invalid destination 'db:99999': use 'host:port' with port 1-65535"]),
    ("services:\n  'bad name': {kind: http, prefixes: /x/}\n", ["p.yaml:2: service 'bad name': invalid service name 'bad name': use letters, digits, '_', '.', ':' or '-', starting with a letter or digit"]),
    ("roles:\n  nobody: {description: empty}\n", ["p.yaml:2: role 'nobody': role maps no groups or users, so nobody can ever hold it"]),
    ("roles:\n  r: {groups: [' padded ']}\n", ["p.yaml:2: role 'r': groups[0]: invalid group name ' padded ': must be non-empty without outer spaces"]),
    ("timezone: Mars/Olympus\n", ["p.yaml:1: timezone: unknown timezone 'Mars/Olympus': use an IANA name like 'Asia/Tokyo'"]),
    ("rules: {id: r}\n", ["p.yaml:1: rules: must be a valid list"]),
    ("- just\n- a list\n", ["p.yaml:1: a policy file must be a mapping with keys timezone, roles, services, rules"]),
    (RULE.replace("effect: allow", "effect: permit"), ["p.yaml:3: rule 'r': effect: must be 'allow' or 'deny' (got 'permit')"]),
    (RULE.replace("id: r", "id: 'has space'"), ["p.yaml:2: rule 'has space': id: invalid rule id 'has space': use letters, digits, '_', '.', ':' or '-', starting with a letter or digit"]),
    (RULE.replace("{roles: [staff]}", "{}"), ["p.yaml:4: rule 'r': subjects: subjects name no roles, groups or users, so the rule can never match (write subjects: '*' for every user)"]),
    (RULE.replace("{roles: [staff]}", "everyone"), ["p.yaml:4: rule 'r': subjects: must be a valid dictionary or instance of SubjectsSpec (got 'everyone')"]),
    (RULE.replace("[files]", "[]"), ["p.yaml:5: rule 'r': services: must not be empty (omit the key to mean 'any')"]),
    (RULE + "    methods: []\n", ["p.yaml:6: rule 'r': methods: must not be empty (omit the key to mean 'any')"]),
    (RULE + "    methods: [get]\n", ["p.yaml:6: rule 'r': methods[0]: HTTP methods are case-sensitive: write 'GET'"]),
    (RULE + "    paths: ['files/**']\n", ["p.yaml:6: rule 'r': paths[0]: invalid path glob 'files/**': must start with '/'"]),
    (RULE + "    paths: ['/files/a**']\n", ["p.yaml:6: rule 'r': paths[0]: invalid path glob '/files/a**': '**' must be a whole segment"]),
    (RULE + "    when:\n      hours: '25:00-26:00'\n", ["p.yaml:7: rule 'r': when.hours: invalid hours '25:00-26:00': not a time of day"]),
    (RULE + "    when:\n      hours: 7-22\n", ["p.yaml:7: rule 'r': when.hours: invalid hours '7-22': use HH:MM-HH:MM, e.g. '07:00-22:00'"]),
    (RULE + "    when:\n      weekdays: [mon, funday]\n", ["p.yaml:7: rule 'r': when.weekdays: invalid weekday 'funday': use mon, tue, wed, thu, fri, sat, sun"]),
    (RULE + "    when:\n      networks:\n        - 10.0.0.0/8\n        - 10.0.0.1/8\n        - banana\n",
     ["p.yaml:9: rule 'r': when.networks[1]: invalid network '10.0.0.1/8': 10.0.0.1/8 has host bits set",
      "p.yaml:10: rule 'r': when.networks[2]: invalid network 'banana': 'banana' does not appear to be an IPv4 or IPv6 network"]),
    (RULE + "    when: {device: trusted}\n", ["p.yaml:6: rule 'r': when.device: must be 'registered' (got 'trusted')"]),
    (RULE + "    when: {device_bound_to_user: false}\n", ["p.yaml:6: rule 'r': when.device_bound_to_user: must be True (got False)"]),
    (RULE + "    mfa_max_age: 5 minutes\n", ["p.yaml:6: rule 'r': mfa_max_age: invalid duration '5 minutes': use e.g. '90s', '5m', '1h30m' or '7d' (largest unit first)"]),
    (RULE + "    obligations: {read_only: yes}\n", ["p.yaml:6: rule 'r': obligations.read_only: must be a valid boolean (got 'yes')"]),
    (RULE + "    obligations: {max_upload: 10XB}\n", ["p.yaml:6: rule 'r': obligations.max_upload: invalid size '10XB': use e.g. '10MiB', '500kB' or bytes"]),
    (RULE + "    methods: [GET, PUT, MOVE]\n    obligations: {read_only: true}\n",
     ["p.yaml:2: rule 'r': a read_only rule cannot allow write methods: PUT, MOVE (read methods are GET, HEAD, OPTIONS, PROPFIND, REPORT, SEARCH)"]),
    (RULE.replace("allow", "deny") + "    mfa_max_age: 5m\n", ["p.yaml:2: rule 'r': mfa_max_age only makes sense on allow rules"]),
    (RULE.replace("allow", "deny") + "    obligations: {read_only: true}\n", ["p.yaml:2: rule 'r': obligations only make sense on allow rules"]),
    (RULE + "    paths: [/files/**]\n    destinations: ['db:5432']\n", ["p.yaml:2: rule 'r': a rule cannot mix HTTP keys (methods, paths) with TCP destinations; split it"]),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_schema_errors_are_exact(text: str, expected: list[str]) -> None:
    assert errors_of(text) == expected


def test_every_broken_item_is_reported_not_just_the_first() -> None:
    text = """\
    rules:
      - id: a
        effect: maybe
        subjects: '*'
        services: [files]
      - id: b
        effect: allow
        subjects: '*'
        services: [files]
        when: {hours: nonsense}
      - id: c
        effect: allow
        subjects: {roles: [staf]}
        services: [files]
    """
    assert errors_of(text) == [
        "p.yaml:3: rule 'a': effect: must be 'allow' or 'deny' (got 'maybe')",
        "p.yaml:10: rule 'b': when.hours: invalid hours 'nonsense': use HH:MM-HH:MM, e.g. '07:00-22:00'",
        "p.yaml:13: rule 'c': unknown role 'staf' (did you mean 'staff'?)",
    ]


@pytest.mark.parametrize(
    ("text", "check"),
    [
        (RULE + "    methods: GET\n", lambda p: p.rules[0].methods == frozenset({"GET"})),
        (RULE.replace("[files]", "files"), lambda p: p.rules[0].services == ("files",)),
        (RULE + "    mfa_max_age: 300\n", lambda p: p.rules[0].mfa_max_age == 300),
        (RULE + "    obligations: {max_upload: 1048576}\n", lambda p: p.rules[0].obligations.max_upload == 2**20),
        (RULE + "    obligations: {read_only: true}\n", lambda p: p.rules[0].methods == frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"})),
        (RULE + "    methods: [GET, PROPFIND]\n    obligations: {read_only: true}\n", lambda p: p.rules[0].methods == frozenset({"GET", "PROPFIND"})),
    ],
)
def test_accepted_shorthands(text: str, check: object) -> None:
    policy = load_policy_texts({"00-base.yaml": BASE, "p.yaml": text})
    assert callable(check) and check(policy)
