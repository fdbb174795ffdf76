"""Tests for gatewayd.https.portal: the services listed are exactly what decide() allows now."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gatewayd.certs import DeviceIdentity
from gatewayd.https.portal import portal_entries
from gatewayd.identity.principal import Principal
from gatewayd.policy import load_policy
from gatewayd.sessions import SessionRegistry

REPO = Path(__file__).resolve().parent.parent
TOKYO = ZoneInfo("Asia/Tokyo")
ALL = frozenset({"groupware", "approval", "files", "chat", "admin"})


def listed(user: str, groups: set[str], *, when: datetime, mfa_age: float = 60,
           configured: frozenset[str] = ALL) -> dict[str, tuple[bool, bool]]:
    registry = SessionRegistry(idle_timeout=900, absolute_timeout=36000, max_concurrent=5,
                               per_user=5, clock=lambda: 0.0, on_end=lambda s, r: None)
    _, session = registry.create(Principal(user, frozenset(groups)), frontend="https",
                                 source_ip="192.0.2.1")
    entries = portal_entries(
        load_policy(REPO / "policies"), session=session, device=DeviceIdentity("pc-1", user),
        source_ip="192.0.2.1", host="gw.example", now=when, mfa_age=mfa_age,
        configured=configured)
    return {e.name: (e.read_only, e.needs_step_up) for e in entries}


TUESDAY_10 = datetime(2026, 11, 24, 10, 0, tzinfo=TOKYO)
TUESDAY_23 = datetime(2026, 11, 24, 23, 0, tzinfo=TOKYO)
SATURDAY_10 = datetime(2026, 11, 28, 10, 0, tzinfo=TOKYO)


@pytest.mark.parametrize(("user", "groups", "when", "mfa_age", "expected"), [
    ("alice", {"telework-staff"}, TUESDAY_10, 60,
     {"groupware": (False, False), "approval": (True, False), "files": (True, False),
      "chat": (False, False)}),
    ("alice", {"telework-staff"}, TUESDAY_23, 60,
     {"groupware": (False, False), "files": (True, False), "chat": (False, False)}),
    ("alice", {"telework-staff"}, SATURDAY_10, 60,
     {"groupware": (False, False), "files": (True, False), "chat": (False, False)}),
    ("bob", {"telework-managers"}, TUESDAY_10, 60,
     {"groupware": (False, False), "approval": (True, False), "files": (False, False),
      "chat": (False, False)}),
    ("carol", {"security-auditors"}, TUESDAY_10, 60, {"admin": (False, False)}),
    ("carol", {"security-auditors"}, TUESDAY_10, 3600, {"admin": (False, True)}),
    ("mallory", set(), TUESDAY_10, 60, {}),
])
def test_portal_entries(user: str, groups: set[str], when: datetime, mfa_age: float,
                        expected: dict[str, tuple[bool, bool]]) -> None:
    assert listed(user, groups, when=when, mfa_age=mfa_age) == expected


def test_services_without_an_upstream_are_not_listed() -> None:
    got = listed("alice", {"telework-staff"}, when=TUESDAY_10, configured=frozenset({"chat"}))
    assert list(got) == ["chat"]
