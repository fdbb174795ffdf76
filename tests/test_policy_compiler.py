"""Tests for gatewayd.policy.compiler: the per-service / per-method index, the order of
allow rules (most permissive first), role expansion, and prebuilt verdicts."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

from gatewayd.policy import AccessRequest, Decision, Obligations, decide, load_policy_texts
from gatewayd.policy.conditions import MethodsCondition, SubjectsCondition
from gatewayd.policy.request import READ_METHODS

POLICY = """\
roles:
  staff: {groups: [Telework-Staff], users: [Dave]}
services:
  files: {kind: http, prefixes: [/files/]}
  chat: {kind: http, prefixes: [/chat/]}
  smb: {kind: tcp, destinations: [fs.local:445]}
rules:
  - {id: small-upload, effect: allow, subjects: {roles: [staff]}, services: files, obligations: {max_upload: 1MiB}}
  - {id: read, effect: allow, subjects: {roles: [staff]}, services: files, obligations: {read_only: true}}
  - {id: unlimited, effect: allow, subjects: {users: [erin]}, services: files}
  - {id: big-upload, effect: allow, subjects: {roles: [staff]}, services: files, methods: [PUT, GET],
     obligations: {max_upload: 1GiB}}
  - {id: no-trace, effect: deny, subjects: '*', services: '*', methods: [TRACE]}
  - {id: no-x, effect: deny, subjects: '*', services: files, paths: /files/x/**, description: ' No x. '}
  - {id: everyone-chat, effect: allow, subjects: '*', services: chat}
  - {id: smb, effect: allow, subjects: {roles: [staff]}, services: smb}
"""


def test_index_by_service_and_method() -> None:
    policy = load_policy_texts({"p.yaml": POLICY})
    files = policy.rule_index["files"]
    ids = lambda rules: [rule.id for rule in rules]  # noqa: E731
    assert ids(files.all.denies) == ["no-trace", "no-x"]
    # Allows: most permissive first: no limit, 1GiB, 1MiB, then the read-only rule.
    assert ids(files.all.allows) == ["unlimited", "big-upload", "small-upload", "read"]
    assert ids(files.candidates("PUT").allows) == ["unlimited", "big-upload", "small-upload"]
    assert ids(files.candidates("PROPFIND").allows) == ["unlimited", "small-upload", "read"]
    assert ids(files.candidates("TRACE").denies) == ["no-trace", "no-x"]
    assert ids(files.candidates("BREW").allows) == ["unlimited", "small-upload"]  # no rule names BREW
    assert ids(files.candidates("BREW").denies) == ["no-x"]
    assert ids(policy.rule_index["chat"].all.denies) == ["no-trace"]  # '*' with methods: HTTP only
    assert ids(policy.rule_index["smb"].all.denies) == []
    assert ids(policy.rule_index["smb"].candidates(None).allows) == ["smb"]


def test_the_most_permissive_matching_allow_decides() -> None:
    policy = load_policy_texts({"p.yaml": POLICY})

    def request(method: str, user: str = "alice") -> AccessRequest:
        return AccessRequest(user=user, groups=frozenset({"telework-staff"}), frontend="https", service="files",
                             method=method, path="/files/a", source=ipaddress.ip_address("10.0.0.1"),
                             now=datetime(2025, 4, 7, tzinfo=UTC))

    assert decide(policy, request("PUT")).rule == "big-upload"
    assert decide(policy, request("GET")).rule == "big-upload"
    assert decide(policy, request("PROPFIND")).rule == "small-upload"
    assert decide(policy, request("DELETE")).obligations == Obligations(max_upload=2**20)
    assert decide(policy, request("PUT", user="erin")).obligations == Obligations()


def test_roles_are_expanded_and_names_folded() -> None:
    policy = load_policy_texts({"p.yaml": POLICY})
    rule = next(rule for rule in policy.rules if rule.id == "small-upload")
    subjects = rule.conditions[0]
    assert isinstance(subjects, SubjectsCondition)
    assert subjects.groups == frozenset({"telework-staff"}) and subjects.users == frozenset({"dave"})
    assert subjects.label == "roles staff"
    assert policy.roles["staff"].groups == frozenset({"telework-staff"})
    everyone = next(rule for rule in policy.rules if rule.id == "everyone-chat")
    assert everyone.conditions == ()  # '*' costs nothing at decision time
    read = next(rule for rule in policy.rules if rule.id == "read")
    assert read.conditions[1] == MethodsCondition(READ_METHODS, True)


def test_verdicts_are_prebuilt() -> None:
    policy = load_policy_texts({"p.yaml": POLICY})
    by_id = {rule.id: rule for rule in policy.rules}
    assert by_id["no-x"].verdict == Decision("deny", "no-x", "denied by rule no-x: No x.")
    assert by_id["no-trace"].verdict == Decision("deny", "no-trace", "denied by rule no-trace")
    assert by_id["big-upload"].verdict == Decision("allow", "big-upload", "allowed by rule big-upload",
                                                   Obligations(max_upload=2**30))
    assert [rule.order for rule in policy.rules] == list(range(8))
    assert by_id["no-trace"].services == ("files", "chat")
