"""Tests for gatewayd.policy.cli: `policy check` and `policy explain` through the registered
argparse parser (as the root CLI uses it): output, defaults, and exit codes 0/1/2."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gatewayd.policy.cli import DEFAULT_SOURCE, main, register

POLICY = """\
timezone: Europe/Berlin
roles:
  staff: {groups: [staff]}
services:
  web: {kind: http, prefixes: [/web/]}
  vhost: {kind: http, hosts: [intra.example]}
  db: {kind: tcp, destinations: ["db1.local:5432", "db2.local:5432"]}
  pc: {kind: tcp, destinations: ["{user.office_pc}:3389"]}
rules:
  - {id: web-day, effect: allow, subjects: {roles: [staff]}, services: web, when: {hours: "08:00-18:00"}}
  - {id: web-office, effect: allow, subjects: {roles: [staff]}, services: web, paths: /web/office/**,
     when: {networks: [192.0.2.0/24]}}
  - {id: vhost, effect: allow, subjects: {roles: [staff]}, services: vhost, methods: GET}
  - {id: db, effect: allow, subjects: {roles: [staff]}, services: db}
  - {id: pc, effect: allow, subjects: {roles: [staff]}, services: pc}
"""


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "p.yaml").write_text(POLICY, encoding="utf-8")
    return directory


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Parse with the registered parser like the root CLI, then call args.func."""
    parser = argparse.ArgumentParser(prog="gatewayd")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def explain(policies: Path, *extra: str) -> list[str]:
    return ["policy", "explain", "--policies", str(policies), "--user", "alice", "--groups", "staff", *extra]


# ----------------------------------------------------------------------------------- check

def test_check_clean(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "check", str(policies)], capsys) == (
        0, f"{policies}: OK: 1 role, 4 services, 5 rules in 1 file (timezone Europe/Berlin)\n", ""
    )


def test_check_prints_every_error_and_exits_1(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policies / "q.yaml").write_text("rules:\n  - {id: x, effect: allow, subjects: {roles: [stuff]}, services: wbe}\n"
                                     "  - {id: web-day, effect: deny, subjects: '*', services: web, when: {hours: 25}}\n")
    code, out, err = run(["policy", "check", str(policies)], capsys)
    assert code == 1
    assert out.splitlines() == [
        f"{policies}/q.yaml:2: rule 'x': unknown role 'stuff' (did you mean 'staff'?)",
        f"{policies}/q.yaml:2: rule 'x': unknown service 'wbe' (did you mean 'web'?)",
        f"{policies}/q.yaml:3: duplicate rule id 'web-day' (first at {policies}/p.yaml:10)",
        f"{policies}/q.yaml:3: rule 'web-day': when.hours: hours must be a range like '07:00-22:00' or a non-empty list of them",
    ]
    assert err == f"{policies}: 4 errors\n"


@pytest.mark.parametrize("name", ["missing", "file.yaml"])
def test_check_unreadable_directory_is_a_usage_error(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file.yaml").write_text("")
    code, out, err = run(["policy", "check", str(tmp_path / name)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"gatewayd policy check: {tmp_path / name}: ")


def test_check_reports_a_hostile_file_instead_of_crashing(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policies / "q.yaml").write_text("# deep\nrules: " + "[" * 5000, encoding="utf-8")
    assert run(["policy", "check", str(policies)], capsys) == (
        1, f"{policies}/q.yaml:2: YAML nesting too deep (more than 64 levels)\n", f"{policies}: 1 error\n"
    )


def test_check_empty_directory_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "check", str(tmp_path)], capsys) == (
        1, f"{tmp_path}: no policy files (*.yaml, *.yml) in directory\n", f"{tmp_path}: 1 error\n"
    )


def test_policy_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["policy"], capsys)
    assert code == 2 and "required" in err


# --------------------------------------------------------------------------------- explain

@pytest.mark.parametrize(
    ("extra", "code", "answer"),
    [
        (["--service", "web", "--at", "2025-04-07T10:00:00+02:00"], 0, {"decision": "allow", "rule": "web-day", "reason": "allowed by rule web-day"}),
        # no offset: the time is read in the policy time zone (Berlin), not the machine's
        (["--service", "web", "--at", "2025-04-07T17:59"], 0, {"decision": "allow", "rule": "web-day", "reason": "allowed by rule web-day"}),
        (["--service", "web", "--at", "2025-04-07T18:00"], 1, {"decision": "deny", "rule": None, "reason": "no rule allows this"}),
        (["--service", "web", "--at", "2025-04-07T16:00:00Z"], 1, {"decision": "deny", "rule": None, "reason": "no rule allows this"}),
        # default source is 192.0.2.1, which this policy lists as the office network
        (["--path", "/web/office/x", "--at", "2025-04-07T20:00"], 0, {"decision": "allow", "rule": "web-office", "reason": "allowed by rule web-office"}),
        (["--path", "/web/office/x", "--at", "2025-04-07T20:00", "--source", "2001:db8::1"], 1, {"decision": "deny", "rule": None, "reason": "no rule allows this"}),
        # routed by path when --service is not given; unknown paths are a real (negative) answer
        (["--path", "/elsewhere/", "--at", "2025-04-07T10:00"], 1, {"decision": "deny", "rule": None, "reason": "the request is not for any known service"}),
        (["--service", "web", "--path", "/web/%2e%2e/x"], 1, {"decision": "deny", "rule": None, "reason": "ambiguous request path refused: percent-encoded '.' (%2E)"}),
        # host-routed services default --host to their first host; method defaults to GET
        (["--service", "vhost"], 0, {"decision": "allow", "rule": "vhost", "reason": "allowed by rule vhost"}),
        (["--service", "vhost", "--method", "POST"], 1, {"decision": "deny", "rule": None, "reason": "no rule allows this"}),
        (["--service", "vhost", "--host", "other.example"], 1, {"decision": "deny", "rule": None, "reason": "path / is not part of service vhost"}),
        # TCP
        (["--dest", "db2.local:5432"], 0, {"decision": "allow", "rule": "db", "reason": "allowed by rule db"}),
        (["--service", "pc", "--attr", "office_pc=pc-7.local"], 0, {"decision": "allow", "rule": "pc", "reason": "allowed by rule pc"}),
        (["--service", "pc", "--dest", "pc-8.local:3389", "--attr", "office_pc=pc-7.local"], 1,
         {"decision": "deny", "rule": None, "reason": "pc-8.local:3389 is not a destination of service pc for this user"}),
        (["--dest", "pc-8.local:3389", "--attr", "office_pc=pc-7.local"], 1,
         {"decision": "deny", "rule": None, "reason": "the request is not for any known service"}),
    ],
)
def test_explain_json(policies: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, answer: dict[str, object]) -> None:
    result, out, err = run([*explain(policies, *extra), "--json"], capsys)
    assert (result, err) == (code, "")
    assert json.loads(out) == answer
    assert out.endswith("}\n") and out.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--service", "web", "--at", "yesterday"], "argument --at: expected an ISO 8601 time"),
        (["--service", "web", "--source", "10.0.0.300"], "argument --source: expected an IP address, got '10.0.0.300'"),
        (["--service", "web", "--mfa-age", "-1"], "argument --mfa-age: expected seconds >= 0, got '-1'"),
        (["--service", "web", "--mfa-age", "nan"], "argument --mfa-age: expected seconds >= 0, got 'nan'"),
        (["--dest", "db1.local"], "argument --dest: expected HOST:PORT with port 1-65535, got 'db1.local'"),
        (["--dest", "db1.local:0"], "argument --dest: expected HOST:PORT with port 1-65535"),
        (["--service", "pc", "--attr", "office_pc"], "argument --attr: expected KEY=VALUE, got 'office_pc'"),
        (["--service", "wbe"], "gatewayd policy explain: unknown service 'wbe' (services: db, pc, vhost, web)"),
        ([], "gatewayd policy explain: give --service, or --path (HTTP) or --dest (TCP) to route by"),
        (["--service", "web", "--dest", "db1.local:5432"], "gatewayd policy explain: --dest is for TCP services"),
        (["--service", "db", "--method", "GET"], "gatewayd policy explain: --method, --path and --host are for HTTP services"),
        (["--service", "db"], "gatewayd policy explain: give --dest HOST:PORT (the service has several destinations)"),
        (["--service", "pc"], "gatewayd policy explain: give --dest HOST:PORT (the service has several destinations)"),
    ],
)
def test_explain_usage_errors_exit_2(policies: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code, out, err = run([*explain(policies, *extra), "--json"], capsys)
    assert (code, out) == (2, "")
    assert message in err


def test_explain_requires_policies_and_user(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["policy", "explain", "--service", "web"], capsys)
    assert code == 2 and "the following arguments are required: --policies, --user" in err


def test_explain_unreadable_policy_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(explain(tmp_path / "nope", "--service", "web"), capsys)
    assert (code, out) == (2, "")
    assert err == f"gatewayd policy explain: {tmp_path / 'nope'}: cannot read policy directory: No such file or directory\n"


def test_explain_invalid_policy_exits_2_with_the_errors(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policies / "q.yaml").write_text("colour: red\n")
    code, out, err = run(explain(policies, "--service", "web"), capsys)
    assert (code, out) == (2, "")
    assert err == (f"{policies}/q.yaml:1: unknown key 'colour'\n"
                   "gatewayd policy explain: the policy is invalid (see `gatewayd policy check`)\n")


def test_explain_defaults_to_now_in_the_policy_timezone(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Read the hour first: the answers asserted below stay true for an hour after it.
    berlin_hour = datetime.now(ZoneInfo("Europe/Berlin")).hour
    code, out, _ = run(explain(policies, "--service", "web"), capsys)
    assert code in (0, 1)
    assert f"from {DEFAULT_SOURCE}, last MFA unknown, device none" in out
    assert " Europe/Berlin, from " in out
    if 8 <= berlin_hour < 17:  # away from the edges, the answer is known
        assert code == 0
    if berlin_hour >= 19 or berlin_hour < 7:
        assert code == 1


def test_explain_human_output(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(explain(policies, "--path", "/web/office/a?x=1", "--at", "2025-04-07T20:00:00+02:00",
                                 "--source", "10.0.0.1", "--mfa-age", "90"), capsys)
    assert (code, err) == (1, "")
    assert out == """\
decision: deny
rule:     none
reason:   no rule allows this
request:  user alice (groups: staff), service web: GET /web/office/a?x=1
          at 2025-04-07 20:00:00 Mon Europe/Berlin, from 10.0.0.1, last MFA 1m30s ago, device none
          attributes: none
rules considered (2 of 5 name service web; policy order):
  allow  web-day     no match — hours: local time 20:00 (CEST) is outside 08:00-18:00
  allow  web-office  no match — networks: source 10.0.0.1 is in none of 192.0.2.0/24
"""


def test_standalone_main(policies: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(policies)]) == 0
    assert "OK" in capsys.readouterr().out
