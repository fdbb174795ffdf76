"""The shipped ward policy (policies/): it is clean, and it makes the decisions it promises,
through decide() and through `gatewayd policy explain --json` with its exit codes."""

from __future__ import annotations

import argparse
import ipaddress
import json
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.policy import AccessRequest, Policy, decide, load_policy
from gatewayd.policy.cli import register

POLICIES = Path(__file__).resolve().parent.parent / "policies"
JST = ZoneInfo("Asia/Tokyo")
MONDAY_10 = "2025-04-07T10:00:00+09:00"

ALICE = ("alice", "telework-staff")
BOB = ("bob", "telework-managers")
CAROL = ("carol", "security-auditors")
NOBODY = ("dave", "")


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(POLICIES)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gatewayd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_shipped_policy_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["policy", "check", str(POLICIES)], capsys)
    assert (code, err) == (0, "")
    assert out == f"{POLICIES}: OK: 3 roles, 8 services, 13 rules in 6 files (timezone Asia/Tokyo)\n"


def test_guard_rails_renamed_to_uppercase_suffix_still_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in POLICIES.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "90-guard-rails.yaml").rename(tmp_path / "90-guard-rails.YAML")
    code, out, _ = cli(["policy", "check", str(tmp_path)], capsys)
    assert (code, out) == (0, f"{tmp_path}: OK: 3 roles, 8 services, 13 rules in 6 files (timezone Asia/Tokyo)\n")
    trace = as_request(load_policy(tmp_path), ALICE, "TRACE /groupware/", MONDAY_10, 10, {})
    assert decide(load_policy(tmp_path), trace).rule == "no-trace-methods"


def test_a_backup_in_the_policy_directory_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in POLICIES.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "90-guard-rails.yaml").rename(tmp_path / "90-guard-rails.yaml.bak")
    code, out, _ = cli(["policy", "check", str(tmp_path)], capsys)
    assert (code, out) == (1, f"{tmp_path}/90-guard-rails.yaml.bak: not a policy file: rename it to *.yaml or move it out\n")


def test_shipped_policy_matches_the_design(policy: Policy) -> None:
    assert policy.timezone == JST
    assert {name: sorted(role.groups) for name, role in policy.roles.items()} == {
        "staff": ["telework-staff"], "managers": ["telework-managers"], "auditors": ["security-auditors"],
    }
    prefixes = {name: s.prefixes for name, s in policy.services.items() if s.kind == "http"}  # type: ignore[union-attr]
    assert prefixes == {
        "groupware": ("/groupware/",), "approval": ("/approval/",), "files": ("/files/",),
        "chat": ("/chat/",), "admin": ("/.gatewayd/admin/",),
    }
    assert policy.tcp_service_for("fileserver.ward.local", 445, {}) == "fileserver"
    assert policy.tcp_service_for("mail.ward.local", 993, {}) == "mail"
    assert policy.tcp_service_for("mail.ward.local", 587, {}) == "mail"


# (who, HTTP method + target or TCP destination, time, MFA age, extra, decision, rule)
CASES: list[Any] = [
    # staff
    (ALICE, "GET /groupware/mail/inbox", MONDAY_10, None, {}, "allow", "staff-groupware-chat"),
    (ALICE, "POST /groupware/schedule/new", "2025-04-12T23:00:00+09:00", None, {}, "allow", "staff-groupware-chat"),
    (ALICE, "GET /chat/ws", MONDAY_10, None, {}, "allow", "staff-groupware-chat"),
    (ALICE, "GET /files/%E4%BA%88%E7%AE%97/2025.xlsx", MONDAY_10, None, {}, "allow", "staff-files-read"),
    (ALICE, "PROPFIND /files/", MONDAY_10, None, {}, "allow", "staff-files-read"),
    (ALICE, "HEAD /files/a.txt", MONDAY_10, None, {}, "allow", "staff-files-read"),
    (ALICE, "OPTIONS /files/", MONDAY_10, None, {}, "allow", "staff-files-read"),
    (ALICE, "PUT /files/a.txt", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "DELETE /files/a.txt", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "MKCOL /files/new/", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "MOVE /files/a.txt", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "LOCK /files/a.txt", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "PROPPATCH /files/a.txt", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "GET /approval/requests/12", MONDAY_10, None, {}, "allow", "staff-approval-read"),
    (ALICE, "POST /approval/requests/12/approve", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "GET /.gatewayd/admin/", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "tcp mail.ward.local:993", MONDAY_10, None, {}, "allow", "staff-mail-clients"),
    (ALICE, "tcp mail.ward.local:587", MONDAY_10, None, {}, "allow", "staff-mail-clients"),
    (ALICE, "tcp fileserver.ward.local:445", MONDAY_10, None, {}, "deny", None),
    (ALICE, "tcp pc-alice.ward.local:3389", MONDAY_10, None, {"office_pc": "pc-alice.ward.local"}, "allow", "staff-own-office-pc"),
    (ALICE, "tcp pc-bob.ward.local:3389", MONDAY_10, None, {"office_pc": "pc-alice.ward.local"}, "deny", None),
    (ALICE, "tcp pc-alice.ward.local:3389", MONDAY_10, None, {}, "deny", None),
    # managers: everything staff has, plus writes and approving with fresh MFA
    (BOB, "GET /groupware/", MONDAY_10, None, {}, "allow", "staff-groupware-chat"),
    (BOB, "PUT /files/reports/q1.xlsx", MONDAY_10, None, {}, "allow", "managers-files-write"),
    (BOB, "MKCOL /files/reports/2025/", MONDAY_10, None, {}, "allow", "managers-files-write"),
    (BOB, "GET /files/reports/q1.xlsx", MONDAY_10, None, {}, "allow", "managers-files-write"),
    (BOB, "POST /approval/requests/12/approve", MONDAY_10, 60, {}, "allow", "managers-approve"),
    (BOB, "POST /approval/requests/12/approve", MONDAY_10, 300, {}, "allow", "managers-approve"),
    (BOB, "POST /approval/requests/12/approve", MONDAY_10, 301, {}, "step_up", "managers-approve"),
    (BOB, "POST /approval/requests/12/approve", MONDAY_10, None, {}, "step_up", "managers-approve"),
    (BOB, "POST /approval/requests/12/reject", MONDAY_10, 60, {}, "deny", None),
    (BOB, "POST /approval/approve", "2025-04-11T21:59:00+09:00", 60, {}, "allow", "managers-approve"),
    (BOB, "POST /approval/x/approve", "2025-04-11T22:00:00+09:00", 60, {}, "deny", "approval-closed-at-night"),
    (BOB, "POST /approval/x/approve", "2025-04-07T06:59:00+09:00", 60, {}, "deny", "approval-closed-at-night"),
    (BOB, "POST /approval/x/approve", "2025-04-06T22:00:00Z", 60, {}, "allow", "managers-approve"),  # Mon 07:00 JST
    (BOB, "POST /approval/x/approve", "2025-04-12T10:00:00+09:00", 60, {}, "deny", "approval-closed-on-weekends"),
    (ALICE, "GET /approval/requests/12", "2025-04-13T10:00:00+09:00", None, {}, "deny", "approval-closed-on-weekends"),
    (ALICE, "GET /approval/requests/12", "2025-04-07T23:30:00+09:00", None, {}, "deny", "approval-closed-at-night"),
    (BOB, "tcp fileserver.ward.local:445", MONDAY_10, None, {}, "allow", "managers-smb"),
    (BOB, "GET /.gatewayd/admin/", MONDAY_10, 10, {}, "deny", None),
    # auditors: the admin console only, with MFA from the last 15 minutes
    (CAROL, "GET /.gatewayd/admin/sessions", MONDAY_10, 899, {}, "allow", "auditors-admin-console"),
    (CAROL, "POST /.gatewayd/admin/sessions/17/kill", MONDAY_10, 900, {}, "allow", "auditors-admin-console"),
    (CAROL, "GET /.gatewayd/admin/", MONDAY_10, 901, {}, "step_up", "auditors-admin-console"),
    (CAROL, "GET /.gatewayd/admin/", "2025-04-13T03:00:00+09:00", 10, {}, "allow", "auditors-admin-console"),
    (CAROL, "GET /groupware/", MONDAY_10, 10, {}, "deny", None),
    (CAROL, "GET /files/", MONDAY_10, 10, {}, "deny", None),
    (CAROL, "tcp mail.ward.local:993", MONDAY_10, 10, {}, "deny", None),
    # nobody else, and guard rails for everybody
    (NOBODY, "GET /groupware/", MONDAY_10, 10, {}, "deny", None),
    (BOB, "GET /files/project/.git/config", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    (BOB, "PUT /files/.git/hooks/post-checkout", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    (ALICE, "PROPFIND /files/a/b/.svn/", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    # ... also for upstreams that ignore case or strip trailing dots and spaces (IIS, Windows)
    (BOB, "GET /files/a/.GIT/config", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    (BOB, "PUT /files/a/.Git/hooks/pre-commit", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    (ALICE, "GET /files/.SVN/entries", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    (ALICE, "GET /files/x/.hG", MONDAY_10, 10, {}, "deny", "no-version-control-metadata"),
    (BOB, "GET /files/a/.git./config", MONDAY_10, 10, {}, "deny", None),
    (BOB, "GET /files/a/.git%20/config", MONDAY_10, 10, {}, "deny", None),
    (BOB, "GET /files/a/.GIT.%20/config", MONDAY_10, 10, {}, "deny", None),
    (BOB, "GET /files/a/.gitignore", MONDAY_10, 10, {}, "allow", "managers-files-write"),
    (ALICE, "TRACE /groupware/", MONDAY_10, 10, {}, "deny", "no-trace-methods"),
    (CAROL, "TRACE /.gatewayd/admin/", MONDAY_10, 10, {}, "deny", "no-trace-methods"),
    # methods that are not uppercase tokens are refused, never matched or guessed
    (ALICE, "trace /groupware/", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "Track /chat/", MONDAY_10, 10, {}, "deny", None),
    (BOB, "put /files/a.txt", MONDAY_10, 10, {}, "deny", None),
    # ambiguous or case-changed paths never reach a service
    (BOB, "GET /APPROVAL/requests/12", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "GET /files/%2e%2e/approval/x", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "GET /groupware/..%2f.gatewayd/admin/", MONDAY_10, 10, {}, "deny", None),
    (ALICE, "GET //approval/requests", MONDAY_10, 10, {}, "deny", None),
]


def split(target: str) -> tuple[str, str]:
    method, _, rest = target.partition(" ")
    return method, rest


def as_request(policy: Policy, who: tuple[str, str], target: str, at: str, mfa: float | None,
               attrs: dict[str, str]) -> AccessRequest:
    user, groups = who
    method, rest = split(target)
    common: dict[str, Any] = {
        "user": user, "groups": frozenset(filter(None, groups.split(","))), "attributes": attrs,
        "source": ipaddress.ip_address("192.0.2.1"), "now": datetime.fromisoformat(at), "mfa_age": mfa,
    }
    if method == "tcp":
        host, _, port = rest.rpartition(":")
        return AccessRequest(**common, frontend="ssh", service=policy.tcp_service_for(host, int(port), attrs),
                             dest_host=host, dest_port=int(port))
    return AccessRequest(**common, frontend="https", service=policy.http_service_for(None, rest),
                         method=method, path=rest)


@pytest.mark.parametrize(("who", "target", "at", "mfa", "attrs", "decision", "rule"), CASES)
def test_shipped_decisions_via_decide(policy: Policy, who: tuple[str, str], target: str, at: str,
                                      mfa: float | None, attrs: dict[str, str], decision: str, rule: str | None) -> None:
    result = decide(policy, as_request(policy, who, target, at, mfa, attrs))
    assert (result.decision, result.rule) == (decision, rule), result.reason


@pytest.mark.parametrize(("who", "target", "at", "mfa", "attrs", "decision", "rule"), CASES)
def test_shipped_decisions_via_explain_json(capsys: pytest.CaptureFixture[str], policy: Policy, who: tuple[str, str],
                                            target: str, at: str, mfa: float | None, attrs: dict[str, str],
                                            decision: str, rule: str | None) -> None:
    user, groups = who
    method, rest = split(target)
    argv = ["policy", "explain", "--policies", str(POLICIES), "--user", user, "--groups", groups, "--at", at, "--json"]
    argv += ["--dest", rest] if method == "tcp" else ["--method", method, "--path", rest]
    argv += [] if mfa is None else ["--mfa-age", str(mfa)]
    for key, value in attrs.items():
        argv += ["--attr", f"{key}={value}"]
    code, out, err = cli(argv, capsys)
    expected = decide(policy, as_request(policy, who, target, at, mfa, attrs))
    assert json.loads(out) == {"decision": decision, "rule": rule, "reason": expected.reason}
    assert out.count("\n") == 1 and err == ""
    assert code == (0 if decision == "allow" else 1)


def test_obligations_of_the_shipped_rules(policy: Policy) -> None:
    staff_read = decide(policy, as_request(policy, ALICE, "GET /files/a", MONDAY_10, None, {}))
    assert staff_read.obligations.read_only is True
    manager_write = decide(policy, as_request(policy, BOB, "PUT /files/a", MONDAY_10, None, {}))
    assert (manager_write.obligations.read_only, manager_write.obligations.max_upload) == (False, 200 * 2**20)
    approve = decide(policy, as_request(policy, BOB, "POST /approval/1/approve", MONDAY_10, 1, {}))
    assert approve.obligations.max_upload == 2**20
