"""Tests for gatewayd.policy.conditions: each compiled condition's test and the sentence it
gives `policy explain` when it fails, and the per-request Facts."""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.policy import AccessRequest
from gatewayd.policy.conditions import (
    Condition,
    DestinationsCondition,
    DeviceBoundToUserCondition,
    Facts,
    HoursCondition,
    MethodsCondition,
    NetworksCondition,
    PathsCondition,
    RegisteredDeviceCondition,
    SubjectsCondition,
    WeekdaysCondition,
)
from gatewayd.policy.request import READ_METHODS
from gatewayd.policy.values import parse_destination, parse_glob, parse_hour_range, parse_network

JST = ZoneInfo("Asia/Tokyo")


def facts(path: str | None = None, host: str | None = None, **changes: Any) -> Facts:
    fields: dict[str, Any] = {
        "user": "alice", "groups": frozenset({"Telework-Staff"}), "frontend": "https", "service": "x",
        "method": "GET", "source": ipaddress.ip_address("192.0.2.1"),
        "now": datetime(2025, 4, 7, 1, 30, tzinfo=UTC),  # Monday 10:30 JST
    } | changes
    return Facts(AccessRequest(**fields), JST, path=path, host=host)


SUBJECTS = SubjectsCondition(frozenset({"carol"}), frozenset({"telework-staff"}), "roles staff; users carol")
PDF = parse_glob("/files/*.pdf")
PATHS = PathsCondition(("/files/*.pdf", "/files/public/**"), re.compile(f"(?:{PDF.regex})|(?:{parse_glob('/files/public/**').regex})"))
NETWORKS = NetworksCondition.of((parse_network("10.0.0.0/8"), parse_network("2001:db8::/32")))
OFFICE_HOURS = HoursCondition((parse_hour_range("07:00-12:00"), parse_hour_range("13:00-22:00")))
PC = DestinationsCondition((parse_destination("{user.office_pc}:3389"),))

# (condition, facts, holds, explanation when it does not hold)
CASES: list[Any] = [
    (SUBJECTS, facts(), True, None),
    (SUBJECTS, facts(user="Carol", groups=frozenset()), True, None),
    (SUBJECTS, facts(user="bob", groups=frozenset({"b", "a"})), False,
     "user bob (groups: a, b) is not among roles staff; users carol"),
    (SUBJECTS, facts(user="bob", groups=frozenset()), False, "user bob (groups: none) is not among roles staff; users carol"),
    (MethodsCondition(frozenset({"GET", "PUT"}), False), facts(method="PUT"), True, None),
    (MethodsCondition(frozenset({"GET", "PUT"}), False), facts(method="DELETE"), False, "method DELETE is not one of GET, PUT"),
    (MethodsCondition(READ_METHODS, True), facts(method="MKCOL"), False, "MKCOL is a write method and the rule is read-only"),
    (MethodsCondition(frozenset({"GET"}), True), facts(method="HEAD"), False, "method HEAD is not one of GET"),
    (PATHS, facts("/files/a.pdf"), True, None),
    (PATHS, facts("/files/public/x/y"), True, None),
    (PATHS, facts("/files/a/b.pdf"), False, "path /files/a/b.pdf matches none of /files/*.pdf, /files/public/**"),
    (NETWORKS, facts(source=ipaddress.ip_address("10.2.3.4")), True, None),
    (NETWORKS, facts(source=ipaddress.ip_address("2001:db8::9")), True, None),
    (NETWORKS, facts(source=ipaddress.ip_address("::ffff:10.2.3.4")), True, None),
    (NETWORKS, facts(), False, "source 192.0.2.1 is in none of 10.0.0.0/8, 2001:db8::/32"),
    (OFFICE_HOURS, facts(), True, None),
    (OFFICE_HOURS, facts(now=datetime(2025, 4, 7, 12, 30, tzinfo=JST)), False,
     "local time 12:30 (JST) is outside 07:00-12:00, 13:00-22:00"),
    (OFFICE_HOURS, facts(now=datetime(2025, 4, 7, 3, 30, tzinfo=UTC)), False,
     "local time 12:30 (JST) is outside 07:00-12:00, 13:00-22:00"),
    (WeekdaysCondition(frozenset({0, 1, 2, 3, 4})), facts(), True, None),
    (WeekdaysCondition(frozenset({0, 1, 2, 3, 4})), facts(now=datetime(2025, 4, 5, 16, 0, tzinfo=UTC)), False,
     "sun 2025-04-06 is not one of mon, tue, wed, thu, fri"),  # Saturday 16:00 UTC is Sunday in Tokyo
    (RegisteredDeviceCondition(), facts(device="pc-17"), True, None),
    (RegisteredDeviceCondition(), facts(), False, "no registered device (no verified device certificate)"),
    (DeviceBoundToUserCondition(), facts(device="pc-17", device_user="Alice"), True, None),
    (DeviceBoundToUserCondition(), facts(device="pc-17", device_user="bob"), False, "device pc-17 is bound to bob, not to alice"),
    (DeviceBoundToUserCondition(), facts(device="pc-17"), False, "device pc-17 is bound to nobody, not to alice"),
    (DeviceBoundToUserCondition(), facts(device_user="alice"), False, "no registered device (no verified device certificate)"),
    (PC, facts(host="pc-1.ward", dest_port=3389, attributes={"office_pc": "PC-1.ward"}), True, None),
    (PC, facts(host="pc-2.ward", dest_port=3389, attributes={"office_pc": "pc-1.ward"}), False,
     "destination pc-2.ward:3389 is not one of {user.office_pc}:3389 for this user"),
    (PC, facts(host="pc-1.ward", dest_port=3389), False,
     "destination pc-1.ward:3389 is not one of {user.office_pc}:3389 for this user"),
    (PC, facts(host=None, dest_port=3389, attributes={"office_pc": "pc-1.ward"}), False,
     "destination None:3389 is not one of {user.office_pc}:3389 for this user"),
]


@pytest.mark.parametrize(("condition", "request_facts", "holds", "why"), CASES)
def test_conditions(condition: Condition, request_facts: Facts, holds: bool, why: str | None) -> None:
    assert condition.test(request_facts) is holds
    if not holds:
        assert condition.why_not(request_facts) == why


def test_facts_fold_names_and_compute_local_time_once() -> None:
    request_facts = facts(user="Alice", groups=frozenset({"A", "b"}))
    assert request_facts.user == "alice"
    assert request_facts.groups == frozenset({"a", "b"})
    assert request_facts.local_time is request_facts.local_time
    assert request_facts.minute_of_day == 10 * 60 + 30
    assert request_facts.local_time.tzinfo is JST


@pytest.mark.parametrize(
    ("condition", "name"),
    [(SUBJECTS, "subjects"), (MethodsCondition(frozenset(), False), "methods"), (PATHS, "paths"), (PC, "destinations"),
     (NETWORKS, "networks"), (OFFICE_HOURS, "hours"), (WeekdaysCondition(frozenset()), "weekdays"),
     (RegisteredDeviceCondition(), "device"), (DeviceBoundToUserCondition(), "device_bound_to_user")],
)
def test_condition_names_are_the_policy_keys(condition: Condition, name: str) -> None:
    assert condition.name == name
