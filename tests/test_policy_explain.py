"""Tests for gatewayd.policy.explain: the per-rule trace and its text come from the same
evaluation as decide()."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.policy import AccessRequest, Policy, decide, explain, load_policy_texts
from gatewayd.policy.explain import format_explanation

POLICY = """\
roles:
  staff: {groups: [staff]}
  managers: {groups: [managers]}
services:
  files: {kind: http, prefixes: [/files/]}
  approval: {kind: http, prefixes: [/approval/]}
  empty: {kind: http, prefixes: [/empty/]}
  pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
rules:
  - {id: read, effect: allow, subjects: {roles: [staff, managers]}, services: files, obligations: {read_only: true}}
  - {id: write, effect: allow, subjects: {roles: [managers]}, services: files, obligations: {max_upload: 10MiB}}
  - {id: no-git, effect: deny, subjects: "*", services: files, paths: /files/**/.git/**,
     description: No version-control metadata}
  - {id: approve, effect: allow, subjects: {roles: [managers]}, services: approval, mfa_max_age: 5m}
  - {id: pc, effect: allow, subjects: {roles: [staff]}, services: pc, when: {device: registered}}
"""
AT = datetime(2025, 4, 7, 10, 0, tzinfo=ZoneInfo("Asia/Tokyo"))


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy_texts({"p.yaml": POLICY})


def request(**changes: Any) -> AccessRequest:
    fields: dict[str, Any] = {
        "user": "bob", "groups": frozenset({"managers"}), "frontend": "https", "service": "files",
        "method": "GET", "path": "/files/a", "source": ipaddress.ip_address("192.0.2.1"), "now": AT,
    } | changes
    return AccessRequest(**fields)


def outcomes(policy: Policy, req: AccessRequest) -> list[tuple[str, str, str | None]]:
    return [(step.rule.id, step.outcome, step.failed) for step in explain(policy, req).considered]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, [("read", "match", None), ("write", "match", None), ("no-git", "no_match", "paths")]),
        ({"method": "PUT"}, [("read", "no_match", "methods"), ("write", "match", None), ("no-git", "no_match", "paths")]),
        ({"path": "/files/.git/x"}, [("read", "match", None), ("write", "match", None), ("no-git", "match", None)]),
        ({"groups": frozenset()}, [("read", "no_match", "subjects"), ("write", "no_match", "subjects"), ("no-git", "no_match", "paths")]),
        ({"service": "approval", "path": "/approval/1"}, [("approve", "mfa_stale", None)]),
        ({"service": "approval", "path": "/approval/1", "mfa_age": 3.0}, [("approve", "match", None)]),
        ({"service": "empty", "path": "/empty/"}, []),
        ({"path": "/files/%2e%2e/x"}, []),
    ],
)
def test_every_rule_of_the_service_is_traced_in_policy_order(policy: Policy, changes: dict[str, Any],
                                                            expected: list[tuple[str, str, str | None]]) -> None:
    req = request(**changes)
    assert outcomes(policy, req) == expected
    assert explain(policy, req).decision == decide(policy, req)


def test_refused_requests_are_not_admitted(policy: Policy) -> None:
    explanation = explain(policy, request(path="/files/%2e%2e/x"))
    assert not explanation.admitted and explanation.considered == ()
    assert explain(policy, request(service="empty", path="/empty/")).admitted


def text(policy: Policy, req: AccessRequest) -> str:
    return format_explanation(explain(policy, req), policy)


def test_text_of_an_allow_with_obligations(policy: Policy) -> None:
    assert text(policy, request(method="PUT", path="/files/q1.xlsx", mfa_age=42.0, device="pc-1", device_user="bob")) == """\
decision: allow
rule:     write (p.yaml:11)
reason:   allowed by rule write
obligations: uploads up to 10MiB
request:  user bob (groups: managers), service files: PUT /files/q1.xlsx
          at 2025-04-07 10:00:00 Mon Asia/Tokyo, from 192.0.2.1, last MFA 42s ago, device pc-1 (bound to bob)
          attributes: none
rules considered (3 of 5 name service files; policy order):
  allow  read    no match — methods: PUT is a write method and the rule is read-only
  allow  write   MATCHES — decides
  deny   no-git  no match — paths: path /files/q1.xlsx matches none of /files/**/.git/** (ignoring case)
"""


def test_text_of_a_deny_that_overrides_allows(policy: Policy) -> None:
    assert text(policy, request(path="/files/repo/.git/config")).splitlines()[:3] == [
        "decision: deny", "rule:     no-git (p.yaml:12)",
        "reason:   denied by rule no-git: No version-control metadata",
    ]
    assert text(policy, request(path="/files/repo/.git/config")).splitlines()[-3:] == [
        "  allow  read    MATCHES, but deny rule no-git overrides it",
        "  allow  write   MATCHES, but deny rule no-git overrides it",
        "  deny   no-git  MATCHES — decides",
    ]


def test_text_of_a_step_up(policy: Policy) -> None:
    lines = text(policy, request(service="approval", method="POST", path="/approval/1/approve", mfa_age=600.0)).splitlines()
    assert lines[:3] == [
        "decision: step_up", "rule:     approve (p.yaml:14)",
        "reason:   fresh MFA required: rule approve wants MFA within 5m, last MFA 10m ago",
    ]
    assert lines[-1] == "  allow  approve  matches, but needs MFA within 5m — decides"


def test_text_of_a_tunnel_and_of_refusals(policy: Policy) -> None:
    tunnel = request(user="alice", groups=frozenset({"staff"}), frontend="ssh", service="pc", method=None, path=None,
                     dest_host="pc-7.local", dest_port=3389, attributes={"office_pc": "pc-7.local"})
    assert text(policy, tunnel).splitlines()[3:] == [
        "request:  user alice (groups: staff), service pc: tunnel to pc-7.local:3389",
        "          at 2025-04-07 10:00:00 Mon Asia/Tokyo, from 192.0.2.1, last MFA unknown, device none",
        "          attributes: office_pc=pc-7.local",
        "rules considered (1 of 5 name service pc; policy order):",
        "  allow  pc  no match — device: no registered device (no verified device certificate)",
    ]
    refused = text(policy, request(path="/approval/x"))
    assert "reason:   path /approval/x is not part of service files" in refused
    assert refused.endswith("rules:    none evaluated: the request was refused before rule evaluation\n")
    empty = text(policy, request(service="empty", path="/empty/x"))
    assert empty.endswith("rules:    none of the 5 rules names this service\n")
    naive = text(policy, request(now=datetime(2025, 4, 7, 10, 0)))
    assert "at 2025-04-07 10:00:00 (no time zone)" in naive
