"""Policy errors: one `PolicyIssue` per problem, all of them collected into one `PolicyError`.

An issue always names the file it is about and, when it is about a place in that file, the
1-based line, so that `str(issue)` reads like a compiler diagnostic: ``file:line: message``.
Issues about a whole file or directory (unreadable, empty directory) have no line and print
as ``file: message``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class PolicyIssue:
    """One problem found while loading a policy directory."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"

    @property
    def sort_key(self) -> tuple[str, int, str]:
        return (self.file, self.line or 0, self.message)


class PolicyError(Exception):
    """The policy directory is not a valid policy; `errors` lists every problem found."""

    def __init__(self, errors: Iterable[PolicyIssue]) -> None:
        self.errors: list[PolicyIssue] = sorted(errors, key=lambda issue: issue.sort_key)
        super().__init__("\n".join(str(issue) for issue in self.errors) or "invalid policy")
