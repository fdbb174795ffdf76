"""Tests for gatewayd.policy.check: cross-file problems and unreachable rules, each reported
as exactly `file:line: message`."""

from __future__ import annotations

import textwrap

import pytest

from gatewayd.policy import PolicyError, load_policy_texts

BASE = """\
roles:
  staff: {groups: [telework-staff]}
  managers: {groups: [telework-managers], users: [carol]}
services:
  files: {kind: http, prefixes: [/files/]}
  approval: {kind: http, prefixes: [/approval/]}
  pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
  smb: {kind: tcp, destinations: ["fileserver.ward.local:445"]}
"""


def errors_of(files: dict[str, str]) -> list[str]:
    texts = {"00-base.yaml": BASE} | {name: textwrap.dedent(text) for name, text in files.items()}
    with pytest.raises(PolicyError) as caught:
        load_policy_texts(texts)
    return [str(issue) for issue in caught.value.errors]


def ok(files: dict[str, str]) -> None:
    texts = {"00-base.yaml": BASE} | {name: textwrap.dedent(text) for name, text in files.items()}
    load_policy_texts(texts)


CASES = [
    pytest.param(
        {"a.yaml": "timezone: Asia/Tokyo\n", "b.yaml": "roles: {}\ntimezone: UTC\n"},
        ["b.yaml:2: timezone is already set at a.yaml:1"],
        id="second-timezone",
    ),
    pytest.param(
        {"a.yaml": "roles:\n  staff: {users: [x]}\n"},
        ["a.yaml:2: role 'staff' is already defined at 00-base.yaml:2"],
        id="duplicate-role",
    ),
    pytest.param(
        {"a.yaml": "services:\n  files: {kind: http, prefixes: /f/}\n"},
        ["a.yaml:2: service 'files' is already defined at 00-base.yaml:5"],
        id="duplicate-service",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: files}\n",
         "b.yaml": "\nrules:\n  - {id: r, effect: deny, subjects: '*', services: smb}\n"},
        ["b.yaml:3: duplicate rule id 'r' (first at a.yaml:2)"],
        id="duplicate-rule-id-across-files",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: files}\n"
                   "  - {id: r, effect: allow, subjects: '*', services: approval}\n"},
        ["a.yaml:3: duplicate rule id 'r' (first at a.yaml:2)"],
        id="duplicate-rule-id-in-file",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: files}\n",
         "b.yaml": "rules:\n  - {id: r, effect: bogus, subjects: '*', services: files}\n"},
        ["b.yaml:2: duplicate rule id 'r' (first at a.yaml:2)",
         "b.yaml:2: rule 'r': effect: must be 'allow' or 'deny' (got 'bogus')"],
        id="duplicate-id-of-an-invalid-rule-is-still-reported",
    ),
    pytest.param(
        {"a.yaml": "services:\n  files2: {kind: http, prefixes: [/files/]}\n"},
        ["a.yaml:2: route /files/ is already used by service 'files'"],
        id="route-clash",
    ),
    pytest.param(
        {"a.yaml": "services:\n  smb2:\n    kind: tcp\n    destinations: [other:1, FileServer.ward.local:445]\n"},
        ["a.yaml:4: destination FileServer.ward.local:445 is already used by service 'smb'"],
        id="destination-clash",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - id: r
                effect: allow
                subjects: {roles: [staf, managers]}
                services: [files, aproval, nothing]
            """},
        ["a.yaml:4: rule 'r': unknown role 'staf' (did you mean 'staff'?)",
         "a.yaml:5: rule 'r': unknown service 'aproval' (did you mean 'approval'?)",
         "a.yaml:5: rule 'r': unknown service 'nothing'"],
        id="unknown-references",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: [files, smb], methods: [GET]}\n"},
        ["a.yaml:2: rule 'r': service 'smb' is a TCP service; methods, paths and obligations apply only to HTTP services"],
        id="http-keys-on-tcp-service",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: [smb], obligations: {max_upload: 1MiB}}\n"},
        ["a.yaml:2: rule 'r': service 'smb' is a TCP service; methods, paths and obligations apply only to HTTP services"],
        id="obligations-on-tcp-service",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: [files], destinations: ['x:1']}\n"},
        ["a.yaml:2: rule 'r': destination x:1 can never match: it is not a destination of the rule's services",
         "a.yaml:2: rule 'r': service 'files' is an HTTP service; destinations apply only to TCP services"],
        id="destinations-on-http-service",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - id: r
                effect: allow
                subjects: '*'
                services: [files]
                paths: [/files/**, /approval/**, /fil*/x]
            """},
        ["a.yaml:6: rule 'r': path '/approval/**' can never match: it lies outside the service prefixes /files/"],
        id="path-outside-service-prefix",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: files, paths: /FILES/**}\n"},
        ["a.yaml:2: rule 'r': path '/FILES/**' can never match: it lies outside the service prefixes /files/"],
        id="allow-paths-are-case-sensitive",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - id: r
                effect: allow
                subjects: '*'
                services: [pc, smb]
                destinations: ['{user.office_pc}:3389', 'fileserver.ward.local:139']
            """},
        ["a.yaml:6: rule 'r': destination fileserver.ward.local:139 can never match: it is not a destination of the rule's services"],
        id="destination-not-of-service",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - id: secret-files
                effect: allow
                subjects: {roles: [staff]}
                services: [files]
                methods: [GET]
                paths: [/files/secret/*]
              - id: general
                effect: allow
                subjects: {roles: [staff]}
                services: [files]
            """,
         "b.yaml": """\
            rules:
              - id: no-secrets
                effect: deny
                subjects: '*'
                services: [files, approval]
                paths: [/files/secret/**]
            """},
        ["a.yaml:2: rule 'secret-files' can never allow anything: deny rule 'no-secrets' (b.yaml:2) matches every request it matches"],
        id="allow-shadowed-by-later-deny",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - {id: secret-files, effect: allow, subjects: '*', services: files, paths: /files/Secret/*}
              - {id: no-secrets, effect: deny, subjects: '*', services: files, paths: /FILES/SECRET/**}
            """},
        ["a.yaml:2: rule 'secret-files' can never allow anything: deny rule 'no-secrets' (a.yaml:3) matches every request it matches"],
        id="shadowed-by-a-deny-rule-ignoring-case",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - id: no-carol
                effect: deny
                subjects: {users: [Carol], groups: [telework-managers]}
                services: [smb]
              - id: managers-smb
                effect: allow
                subjects: {roles: [managers]}
                services: [smb]
            """},
        ["a.yaml:6: rule 'managers-smb' can never allow anything: deny rule 'no-carol' (a.yaml:2) matches every request it matches"],
        id="role-expanded-subjects-are-covered",
    ),
    pytest.param(
        {"a.yaml": """\
            rules:
              - id: no-writes
                effect: deny
                subjects: '*'
                services: '*'
                methods: [PUT, DELETE, GET, HEAD, OPTIONS, PROPFIND, REPORT, SEARCH]
              - id: read
                effect: allow
                subjects: {roles: [staff]}
                services: [files]
                obligations: {read_only: true}
            """},
        ["a.yaml:7: rule 'read' can never allow anything: deny rule 'no-writes' (a.yaml:2) matches every request it matches"],
        id="read-only-methods-covered",
    ),
    pytest.param(
        {"a.yaml": "rules:\n  - {id: r, effect: allow, subjects: '*', services: '*', destinations: ['x:1']}\n",
         "00-base.yaml": "services:\n  files: {kind: http, prefixes: /files/}\n"},
        ["a.yaml:2: rule 'r' can never apply: the policy has no TCP services"],
        id="star-services-of-missing-kind",
    ),
]


@pytest.mark.parametrize(("files", "expected"), CASES)
def test_check_errors_are_exact(files: dict[str, str], expected: list[str]) -> None:
    assert errors_of(files) == expected


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param("""\
            - {id: deny-night, effect: deny, subjects: '*', services: files, when: {hours: '22:00-06:00'}}
            - {id: allow, effect: allow, subjects: '*', services: files}
            """, id="conditional-deny-does-not-shadow"),
        pytest.param("""\
            - {id: deny-staff, effect: deny, subjects: {roles: [staff]}, services: files}
            - {id: allow-managers, effect: allow, subjects: {roles: [managers]}, services: files}
            """, id="disjoint-subjects"),
        pytest.param("""\
            - {id: deny-some, effect: deny, subjects: '*', services: files, paths: [/files/a/*]}
            - {id: allow-more, effect: allow, subjects: '*', services: files, paths: [/files/a/**]}
            """, id="narrower-deny-paths"),
        pytest.param("""\
            - {id: deny-put, effect: deny, subjects: '*', services: files, methods: [PUT]}
            - {id: allow-any, effect: allow, subjects: '*', services: files}
            """, id="narrower-deny-methods"),
        pytest.param("""\
            - {id: deny-files, effect: deny, subjects: '*', services: files}
            - {id: allow-both, effect: allow, subjects: '*', services: [files, approval]}
            """, id="allow-has-more-services"),
        pytest.param("""\
            - {id: deny-users, effect: deny, subjects: {users: [carol]}, services: smb}
            - {id: allow-managers, effect: allow, subjects: {roles: [managers]}, services: smb}
            """, id="deny-misses-the-role-groups"),
        pytest.param("""\
            - {id: deny-upper, effect: deny, subjects: '*', services: files, paths: [/FILES/**/.GIT/**]}
            - {id: allow, effect: allow, subjects: '*', services: files}
            """, id="deny-paths-ignore-case-so-can-match"),
    ],
)
def test_rules_that_can_still_apply_are_accepted(rules: str) -> None:
    ok({"a.yaml": "rules:\n" + textwrap.indent(textwrap.dedent(rules), "  ")})


def test_references_to_invalid_definitions_are_not_also_unknown() -> None:
    assert errors_of({
        "a.yaml": "roles:\n  broken: {groups: [], colour: red}\n",
        "b.yaml": "rules:\n  - {id: r, effect: allow, subjects: {roles: [broken]}, services: files}\n",
    }) == [
        "a.yaml:2: role 'broken': unknown key 'colour'",
    ]
