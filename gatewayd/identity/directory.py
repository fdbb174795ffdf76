"""The `Directory` protocol: where users, passwords, groups and attributes come from.

Owns the contract every backend (the embedded ``file`` backend today, LDAP / Active
Directory next) implements, the error that means "cannot answer now", and the input rules
shared by all backends: how a typed user name is normalised for lookup, and the size limits
on what a login form may submit.

Backends must make `authenticate` take the same time whether or not the user exists (run the
password check against a dummy hash for unknown users) and must run blocking work off the
event loop with a timeout, raising `DirectoryUnavailable` instead of hanging a login.
"""

from __future__ import annotations

import unicodedata
from typing import Final, Protocol, runtime_checkable

from gatewayd.identity.principal import Principal

MAX_USERNAME_CHARS: Final = 256
# argon2 hashes any length, but a megabyte "password" is a denial-of-service attempt.
MAX_PASSWORD_CHARS: Final = 1024


class DirectoryUnavailable(Exception):  # noqa: N818 - reads as a condition, like TimeoutError
    """The directory cannot answer (unreachable, timed out, no valid data): fail closed."""


@runtime_checkable
class Directory(Protocol):
    """A source of identities. Implementations never log passwords."""

    async def authenticate(self, username: str, password: str) -> Principal | None:
        """The principal if the password is right and the account enabled, else None.

        None covers unknown user, wrong password and disabled account alike, in uniform
        time. Raises `DirectoryUnavailable` when the directory cannot answer.
        """
        ...

    async def lookup(self, username: str) -> Principal | None:
        """The current principal of an enabled account (no password check), else None."""
        ...

    async def check(self) -> bool:
        """True when the directory is reachable and has valid data (for ``/readyz``)."""
        ...


def lookup_key(username: str) -> str | None:
    """The case- and width-insensitive lookup key for a typed user name, or None if unusable.

    NFKC folds full-width letters typed on a Japanese IME (U+FF41.. → a..); casefold
    makes Alice and ALICE the same account; outer blanks (a phone keyboard's trailing space)
    are dropped. Names with control characters or over the size limit are unusable.
    """
    if len(username) > MAX_USERNAME_CHARS:
        return None
    key = unicodedata.normalize("NFKC", username).strip().casefold()
    if not key or not key.isprintable():
        return None
    return key


def normalize_password(password: str) -> str | None:
    """The password as hashed and verified (NFKC, per NIST SP 800-63B), or None if unusable.

    NFKC makes a password typed with full-width digits on one keyboard match the same
    password typed with ASCII digits on another. Passwords with NUL or over the size limit
    are unusable (they still cost a dummy verification, so timing does not tell).
    """
    if not password or len(password) > MAX_PASSWORD_CHARS or "\x00" in password:
        return None
    return unicodedata.normalize("NFKC", password)
