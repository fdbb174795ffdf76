"""Tests for gatewayd.https.pages: every value is escaped, every form is complete, and a
refusal tells the person why and how to get help without showing the policy's internals."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from https_harness import Harness, running_gateway

from gatewayd.https import pages
from gatewayd.policy import AccessRequest, Decision, Policy, decide, load_policy

HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>\'&'


def rendered() -> dict[str, str]:
    entry = pages.PortalEntry(name=HOSTILE, description=HOSTILE, url=HOSTILE,
                              needs_step_up=True, read_only=True)
    return {
        "login": pages.login_page(csrf_token=HOSTILE, next_path=HOSTILE, error=HOSTILE,
                                  notice=HOSTILE, username=HOSTILE),
        "stepup": pages.stepup_page(user=HOSTILE, csrf_token=HOSTILE, next_path=HOSTILE,
                                    logout_token=HOSTILE, error=HOSTILE),
        "logout": pages.logout_page(user=HOSTILE, csrf_token=HOSTILE),
        "portal": pages.portal_page(user=HOSTILE, display_name=HOSTILE, entries=[entry],
                                    device=HOSTILE, logout_token=HOSTILE),
        "message": pages.message_page(title=HOSTILE, message=HOSTILE, details=[HOSTILE],
                                      links=[(HOSTILE, HOSTILE)]),
    }


@pytest.mark.parametrize("name", ["login", "stepup", "logout", "portal", "message"])
def test_hostile_values_are_escaped(name: str) -> None:
    html = rendered()[name]
    assert "<script>" not in html and "<img" not in html and 'value=""><' not in html
    assert "&lt;script&gt;" in html
    assert "<script" not in html.lower()  # and the pages carry no script of their own


def test_the_login_form_has_the_contract_fields() -> None:
    html = pages.login_page(csrf_token="t", next_path="/n")
    for field in ("username", "password", "code", "csrf_token", "next"):
        assert f'name="{field}"' in html
    assert 'action="/.gatewayd/login"' in html and 'method="post"' in html
    assert 'autocomplete="one-time-code"' in html


@pytest.mark.parametrize(("next_path", "url"), [
    ("/", "/.gatewayd/login"),
    ("/groupware/?a=1&b=2", "/.gatewayd/login?next=%2Fgroupware%2F%3Fa%3D1%26b%3D2"),
])
def test_login_url(next_path: str, url: str) -> None:
    assert pages.login_url(next_path) == url


# --- what a refused person is told --------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
TOKYO = ZoneInfo("Asia/Tokyo")
WEEKDAY_NIGHT = datetime(2026, 11, 24, 23, 0, tzinfo=TOKYO)
WEEKDAY_MORNING = datetime(2026, 11, 24, 10, 0, tzinfo=TOKYO)
CLOSED = "The approval system is open on weekdays 07:00-22:00 only"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(REPO / "policies")


def decided(policy: Policy, user: str, group: str, method: str, path: str, when: datetime,
            mfa_age: float = 60.0) -> Decision:
    return decide(policy, AccessRequest(
        user=user, groups=frozenset({group}), frontend="https",
        service=policy.http_service_for("gw.example", path), host="gw.example", method=method,
        path=path, source=ip_address("192.0.2.1"), now=when, mfa_age=mfa_age))


@pytest.mark.parametrize(("group", "method", "path", "when", "rule", "reason"), [
    # a deny rule with a description: its words
    ("telework-staff", "GET", "/approval/", WEEKDAY_NIGHT, "approval-closed-at-night", CLOSED),
    # a write: the read-only rule does not match it, and no other rule allows it
    ("telework-staff", "PUT", "/files/a.txt", WEEKDAY_MORNING, None,
     pages.GENERIC_DENY_REASON),
    # no rule allows it (default deny, no rule id): the generic sentence
    ("telework-staff", "POST", "/approval/requests/1/approve", WEEKDAY_MORNING, None,
     pages.GENERIC_DENY_REASON),
    ("telework-staff", "GET", "/admin/", WEEKDAY_MORNING, None, pages.GENERIC_DENY_REASON),
])
def test_a_403_names_the_rules_description_or_a_generic_reason(
    policy: Policy, group: str, method: str, path: str, when: datetime, rule: str | None,
    reason: str,
) -> None:
    decision = decided(policy, "alice", group, method, path, when)
    assert decision.decision == "deny" and decision.rule == rule
    notice = pages.deny_notice(policy, decision, 403, session="0123456789abcdef", audit_seq=42)
    assert notice.reason == reason
    assert notice.reference == "0123456789abcdef-42"
    shown = " ".join(notice.details) + json.dumps(notice.fields)
    assert decision.reason not in shown and "rule" not in shown.lower()
    assert notice.fields == {"reason": reason, "reference": "0123456789abcdef-42"}
    html = pages.message_page(title="Access denied", message="m", details=notice.details)
    assert "0123456789abcdef-42" in html and "denied by rule" not in html


def test_a_read_only_rules_refusal_shows_what_it_allows(policy: Policy) -> None:
    allowed = decided(policy, "alice", "telework-staff", "GET", "/files/a.txt", WEEKDAY_MORNING)
    assert allowed.decision == "allow" and allowed.obligations.read_only
    refused = Decision("deny", allowed.rule, "the rule allows reading only")
    notice = pages.deny_notice(policy, refused, 403, session="s", audit_seq=7)
    assert notice.reason == "Shared folders, read-only (browse and download)"
    assert str(allowed.rule) not in " ".join(notice.details)


@pytest.mark.parametrize("status", [400, 404])
def test_an_address_refusal_says_no_more_than_its_page(policy: Policy, status: int) -> None:
    decision = Decision("deny", None, "path /x/ is not part of service files")
    notice = pages.deny_notice(policy, decision, status, session="s1", audit_seq=3)
    assert notice.reason is None and notice.fields == {"reference": "s1-3"}
    assert notice.details == ("Support reference: s1-3 (give it to the help desk)",)


def test_an_unaudited_refusal_gets_a_random_reference_logged_with_its_rule(
    policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    decision = decided(policy, "alice", "telework-staff", "GET", "/approval/", WEEKDAY_NIGHT)
    references = {pages.deny_notice(policy, decision, 403, session="abcd", audit_seq=None
                                    ).reference for _ in range(3)}
    assert len(references) == 3 and all(re.fullmatch(r"abcd-r[0-9a-f]{8}", r)
                                        for r in references)
    for reference in references:  # the help desk finds the rule in the service log
        assert f"refusal {reference} is not in the audit log: rule approval-closed-at-night" \
            in caplog.text


@pytest.mark.parametrize(("mfa_rule_description", "expected"), [
    (True, "Approve a request; needs an MFA from the last 5 minutes"),
    (False, pages.GENERIC_STEP_UP_REASON),
])
def test_step_up_reason(policy: Policy, mfa_rule_description: bool, expected: str) -> None:
    decision = decided(policy, "bob", "telework-managers", "POST",
                       "/approval/requests/1/approve", WEEKDAY_MORNING, mfa_age=3600)
    assert decision.decision == "step_up" and decision.rule is not None
    if not mfa_rule_description:
        decision = Decision("step_up", "no-such-rule", decision.reason)
    reason = pages.step_up_reason(policy, decision)
    assert reason == expected and "no-such-rule" not in reason


# End to end over real TLS: RequestFlow (flow.py) answers with deny_notice / step_up_reason.


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in running_gateway(tmp_path):
        yield harness


@pytest.mark.parametrize("html", [False, True])
async def test_a_deny_page_helps_without_showing_the_policy(gw: Harness, html: bool) -> None:
    gw.clock.advance(13 * 3600)  # 23:00 on a weekday: the approval system is closed
    alice = await gw.signed_in("alice")
    headers = ({"Accept": "text/html", "Sec-Fetch-Mode": "navigate"} if html
               else {"Accept": "application/json"})
    async with alice.get(gw.base + "/approval/requests/1", headers=headers) as resp:
        assert resp.status == 403
        body = await resp.text()
    [record] = gw.audit_events("access.deny")
    assert record["rule"] == "approval-closed-at-night"  # the rule id stays in the audit log
    reference = f"{record['session']}-{record['seq']}"
    assert "approval-closed-at-night" not in body and "denied by rule" not in body
    if html:
        assert CLOSED in body and reference in body
    else:
        payload = json.loads(body)
        assert payload["reason"] == CLOSED and payload["reference"] == reference


async def test_a_step_up_answer_names_no_rule(gw: Harness) -> None:
    bob = await gw.signed_in("bob")
    gw.clock.advance(600)  # the sign-in's MFA is older than approving allows
    async with bob.post(gw.base + "/approval/requests/1/approve", headers={
            "Accept": "application/json", "Origin": "https://gateway.test"}) as resp:
        assert resp.status == 401
        payload = await resp.json()
    [record] = gw.audit_events("access.step_up")
    assert payload["reason"] == "Approve a request; needs an MFA from the last 5 minutes"
    assert str(record["rule"]) not in json.dumps(payload)
