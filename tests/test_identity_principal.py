"""Tests for gatewayd.identity.principal.Principal: an immutable identity value."""

from __future__ import annotations

import dataclasses

import pytest

from gatewayd.identity import Principal


def test_principal_is_frozen_against_the_callers_containers() -> None:
    groups = {"a"}
    attributes = {"office_pc": "pc-1"}
    p = Principal("alice", groups, attributes)  # type: ignore[arg-type]
    groups.add("admins")
    attributes["office_pc"] = "evil"
    assert p.groups == frozenset({"a"}) and p.attributes["office_pc"] == "pc-1"
    with pytest.raises(TypeError):
        p.attributes["office_pc"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.user = "mallory"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (Principal("alice"), Principal("alice"), True),
        (Principal("alice", frozenset({"x"})), Principal("alice", frozenset({"x"})), True),
        (Principal("alice", attributes={"k": "v"}), Principal("alice", attributes={"k": "v"}), True),
        (Principal("alice"), Principal("Alice"), False),
        (Principal("alice", frozenset({"x"})), Principal("alice"), False),
        (Principal("alice", attributes={"k": "v"}), Principal("alice", attributes={"k": "w"}), False),
    ],
)
def test_equality_and_hash(a: Principal, b: Principal, equal: bool) -> None:
    assert (a == b) is equal
    if equal:
        assert hash(a) == hash(b)
    assert len({a, b}) == (1 if equal else 2)


def test_defaults_are_empty() -> None:
    p = Principal("carol")
    assert p.groups == frozenset() and dict(p.attributes) == {}
