"""The authenticated identity value shared by every frontend: `Principal`.

A `Principal` is what the directory says about a person after authentication: the canonical
user name (as the directory spells it, whatever case the person typed), the groups, and the
directory attributes policies may use (e.g. ``office_pc`` for ``"{user.office_pc}:3389"``).
It is an immutable value: a frontend may hand it to policy, audit and upstream headers without
defensive copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


def _no_attributes() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user: canonical name, directory groups, directory attributes.

    ``groups`` and ``attributes`` are frozen on construction (a caller's list or dict is
    copied), so a Principal can never change after a login decided on it.
    """

    user: str
    groups: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=_no_attributes)

    def __post_init__(self) -> None:
        # Copy into immutable containers: a caller keeping the original dict must not be able
        # to change the identity of a live session afterwards.
        groups: Iterable[str] = self.groups
        object.__setattr__(self, "groups", frozenset(groups))
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))

    def __hash__(self) -> int:
        return hash((self.user, self.groups, tuple(sorted(self.attributes.items()))))
