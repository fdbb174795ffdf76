"""The embedded ``file`` directory backend: a TOML users file with argon2id password hashes.

Owns the users-file format, its validation, password hashing for administrators
(`hash_password`, used by ``gatewayd users hash-password`` and the demo), and
`FileDirectory`, the `Directory` implementation the daemon uses. Format::

    [users.alice]
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."   # gatewayd users hash-password
    groups = ["telework-staff"]
    attributes = { office_pc = "pc-0042.ward.local", display_name = "Alice Example" }
    disabled = false                                         # optional, default false

Rules: user names are 1-64 of ``A-Z a-z 0-9 . _ @ -`` starting with a letter or digit and are
unique ignoring case (a login as ``ALICE`` finds ``alice``; the principal carries the name as
written here). Only argon2id hashes are accepted, with at least the OWASP minimum cost
(19 MiB, 2 passes) and at most 1 GiB / 10 passes / 16 lanes so one typo cannot exhaust the
host. Group names must not contain commas (upstreams receive them comma-separated).

Behaviour: the file is re-read when it changes (checked on every call; a stat is cheap). An
invalid new version is logged and the last valid one stays in force, as with a config reload;
a missing or unreadable file makes the directory unavailable (logins fail closed). Password
checks run in worker threads, at most ``max_parallel`` at once (each argon2 verification uses
the hash's memory cost), each bounded by ``timeout``. Unknown users are checked against a
dummy hash with the same cost parameters as the real ones, so timing does not reveal whether
an account exists.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import stat
import threading
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar, cast

from argon2 import Parameters, PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gatewayd.config import toml_string
from gatewayd.identity.directory import DirectoryUnavailable, lookup_key, normalize_password
from gatewayd.identity.principal import Principal
from gatewayd.tasks import within

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ATTRIBUTE_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_GROUP_CHARS: Final = 128
MAX_ATTRIBUTE_CHARS: Final = 1024
# OWASP Password Storage Cheat Sheet minimum for argon2id, and a ceiling against typos.
MIN_MEMORY_KIB: Final = 19 * 1024
MIN_TIME_COST: Final = 2
MAX_MEMORY_KIB: Final = 1024 * 1024
MAX_TIME_COST: Final = 10
MAX_PARALLELISM: Final = 16


class UsersFileError(Exception):
    """The users file is invalid; ``errors`` holds one printable line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One account of the users file."""

    name: str
    password_hash: str
    groups: frozenset[str] = frozenset()
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    disabled: bool = False

    def principal(self) -> Principal:
        return Principal(self.name, self.groups, self.attributes)


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """An argon2id hash of ``password`` (NFKC-normalised, like every login attempt).

    The default hasher uses argon2-cffi's RFC 9106 "low memory" profile (64 MiB, 3 passes,
    4 lanes). Raises ValueError for an empty, NUL-containing or oversized password.
    """
    normalized = normalize_password(password)
    if normalized is None:
        raise ValueError("password is empty, too long or contains NUL")
    return (hasher or PasswordHasher()).hash(normalized)


# --- parsing and validation -------------------------------------------------------------------


def _check_hash(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("$argon2id$"):
        raise ValueError('expected an argon2id hash ("$argon2id$..."); '
                         "make one with `gatewayd users hash-password`")
    try:
        params = extract_parameters(value)
    except InvalidHashError:
        raise ValueError("malformed argon2id hash") from None
    if params.type is not Type.ID:
        raise ValueError("expected an argon2id hash")
    if params.memory_cost < MIN_MEMORY_KIB or params.time_cost < MIN_TIME_COST:
        raise ValueError(f"argon2id cost too low (m={params.memory_cost}, t={params.time_cost}); "
                         f"at least m={MIN_MEMORY_KIB}, t={MIN_TIME_COST}")
    if (params.memory_cost > MAX_MEMORY_KIB or params.time_cost > MAX_TIME_COST
            or params.parallelism > MAX_PARALLELISM):
        raise ValueError(f"argon2id cost too high (m={params.memory_cost}, t={params.time_cost}, "
                         f"p={params.parallelism}); at most m={MAX_MEMORY_KIB}, "
                         f"t={MAX_TIME_COST}, p={MAX_PARALLELISM}")
    return value


def _check_groups(value: object) -> frozenset[str]:
    if not isinstance(value, list):
        raise ValueError("expected a list of group names")
    for group in value:
        if (not isinstance(group, str) or not group or group != group.strip() or "," in group
                or len(group) > MAX_GROUP_CHARS or not group.isprintable()):
            raise ValueError(f"invalid group name {group!r}: non-empty printable text without "
                             f"commas or outer spaces, at most {MAX_GROUP_CHARS} characters")
    return frozenset(value)


def _check_attributes(value: object) -> Mapping[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a table of text attributes")
    for name, text in value.items():
        if not ATTRIBUTE_NAME.fullmatch(name):
            raise ValueError(f"invalid attribute name {name!r}: lower-case letters, digits, '_'")
        if not isinstance(text, str) or len(text) > MAX_ATTRIBUTE_CHARS or not text.isprintable():
            raise ValueError(f"attribute {name!r}: expected printable text of at most "
                             f"{MAX_ATTRIBUTE_CHARS} characters")
    return MappingProxyType(dict(value))


def _check_disabled(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


_FIELDS: Final[Mapping[str, Callable[[object], object]]] = MappingProxyType({
    "password_hash": _check_hash,
    "groups": _check_groups,
    "attributes": _check_attributes,
    "disabled": _check_disabled,
})


def _parse_user(name: str, table: object, errors: list[str], source: str) -> UserEntry | None:
    where = f"{source}: users.{name}"
    if not USER_NAME.fullmatch(name):
        errors.append(f"{where}: invalid user name: 1-64 of A-Z a-z 0-9 . _ @ -, "
                      "starting with a letter or digit")
        return None
    if not isinstance(table, dict):
        errors.append(f"{where}: expected a table")
        return None
    known_before = len(errors)
    values: dict[str, object] = {}
    for key, raw in table.items():
        check = _FIELDS.get(key)
        if check is None:
            errors.append(f"{where}.{key}: unknown key")
            continue
        try:
            values[key] = check(raw)
        except ValueError as exc:
            errors.append(f"{where}.{key}: {exc}")
    if "password_hash" not in table:
        errors.append(f"{where}.password_hash: required key is missing")
    if len(errors) > known_before:
        return None
    return UserEntry(
        name=name,
        password_hash=str(values["password_hash"]),
        groups=cast("frozenset[str]", values.get("groups", frozenset())),
        attributes=cast("Mapping[str, str]", values.get("attributes", MappingProxyType({}))),
        disabled=bool(values.get("disabled", False)),
    )


def parse_users(text: str, source: str = "<users>") -> dict[str, UserEntry]:
    """Validate a users file; return ``{lookup key: entry}`` or raise `UsersFileError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsersFileError([f"{source}: invalid TOML: {exc}"]) from None
    errors = [f"{source}: {key}: unknown key" for key in data if key != "users"]
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise UsersFileError([*errors, f"{source}: users: expected a table"])
    entries: dict[str, UserEntry] = {}
    for name, table in users.items():
        entry = _parse_user(name, table, errors, source)
        if entry is None:
            continue
        key = lookup_key(name)
        assert key is not None  # USER_NAME admits only printable ASCII
        if key in entries:
            errors.append(f"{source}: users.{name}: same name as users.{entries[key].name} "
                          "ignoring case")
            continue
        entries[key] = entry
    if errors:
        raise UsersFileError(errors)
    return entries


def load_users_file(path: Path) -> dict[str, UserEntry]:
    """Read and validate the users file at ``path`` (blocking; call off the loop)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsersFileError([f"{path}: cannot read users file: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsersFileError([f"{path}: not UTF-8 text"]) from None
    return parse_users(text, str(path))


def render_users(entries: Iterable[UserEntry]) -> str:
    """The TOML text of a users file holding ``entries`` (for the demo and for tests)."""
    lines = ["# gatewayd users file: see `gatewayd users hash-password`", ""]
    for entry in entries:
        lines.append(f"[users.{toml_string(entry.name)}]")
        lines.append(f"password_hash = {toml_string(entry.password_hash)}")
        groups = ", ".join(toml_string(g) for g in sorted(entry.groups))
        lines.append(f"groups = [{groups}]")
        attributes = ", ".join(f"{k} = {toml_string(v)}"
                               for k, v in sorted(entry.attributes.items()))
        lines.append(f"attributes = {{ {attributes} }}" if attributes else "attributes = {}")
        lines.append(f"disabled = {'true' if entry.disabled else 'false'}")
        lines.append("")
    return "\n".join(lines)


# --- the live directory --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One valid version of the users file, with the dummy hash matching its cost."""

    users: Mapping[str, UserEntry]
    dummy_hash: str
    dummy_params: Parameters | None
    signature: tuple[int, int, int, int]


def _file_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _typical_parameters(users: Mapping[str, UserEntry]) -> Parameters | None:
    """The argon2 parameters most users' hashes have (None for an empty file)."""
    # Parameters is an unhashable dataclass: count its astuple() form.
    params = [extract_parameters(u.password_hash) for u in users.values()]
    by_key = {astuple(p): p for p in params}
    counts = collections.Counter(astuple(p) for p in params)
    return by_key[counts.most_common(1)[0][0]] if counts else None


def _dummy_hash(params: Parameters | None) -> str:
    """A hash of a random password with ``params``, verified in place of unknown users'."""
    hasher = PasswordHasher() if params is None else PasswordHasher.from_parameters(params)
    return hasher.hash(os.urandom(32).hex())


def _verify(password_hash: str, password: str | None) -> bool:
    try:
        # A fixed throwaway candidate for unusable input keeps the argon2 cost identical.
        return PasswordHasher().verify(password_hash, password or "\x00unusable")
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class FileDirectory:
    """`Directory` backed by the TOML users file at ``path``."""

    def __init__(self, path: Path, *, timeout: float, max_parallel: int | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_parallel or max(2, os.cpu_count() or 2))
        self._lock = threading.Lock()  # one reload at a time across worker threads
        self._snapshot: _Snapshot | None = None
        self._rejected: tuple[int, int, int, int] | None = None
        self.problem: str | None = None  # why the file on disk is not the version in force

    # --- Directory protocol ----------------------------------------------------------------

    async def authenticate(self, username: str, password: str) -> Principal | None:
        return await self._in_verification_slot(self._authenticate_blocking, username, password)

    async def lookup(self, username: str) -> Principal | None:
        return await self._off_loop(self._lookup_blocking, username)

    async def check(self) -> bool:
        try:
            await self._off_loop(self._current)
        except DirectoryUnavailable:
            return False
        return True

    # --- blocking parts (worker threads) -----------------------------------------------------

    def _authenticate_blocking(self, username: str, password: str) -> Principal | None:
        snapshot = self._current()
        key = lookup_key(username)
        entry = snapshot.users.get(key) if key is not None else None
        target = entry.password_hash if entry is not None else snapshot.dummy_hash
        # Always exactly one argon2 verification, whatever was wrong with the input.
        matched = _verify(target, normalize_password(password))
        if entry is None or entry.disabled or not matched:
            return None
        return entry.principal()

    def _lookup_blocking(self, username: str) -> Principal | None:
        key = lookup_key(username)
        entry = self._current().users.get(key) if key is not None else None
        return None if entry is None or entry.disabled else entry.principal()

    def _current(self) -> _Snapshot:
        """The valid version in force, re-reading the file if it changed on disk."""
        with self._lock:
            try:
                st = self.path.stat()
            except OSError as exc:
                self.problem = f"{self.path}: cannot read users file: {exc.strerror}"
                raise DirectoryUnavailable(self.problem) from None
            signature = _file_signature(st)
            snapshot = self._snapshot
            if snapshot is not None and snapshot.signature == signature:
                return snapshot
            if signature == self._rejected and snapshot is not None:
                return snapshot  # already reported; keep the last good version quietly
            return self._reload(st, signature)

    def _reload(self, st: os.stat_result, signature: tuple[int, int, int, int]) -> _Snapshot:
        try:
            users = load_users_file(self.path)
        except UsersFileError as exc:
            self._rejected = signature
            self.problem = exc.errors[0]
            if self._snapshot is None:
                raise DirectoryUnavailable(str(exc)) from None
            log.error("users file rejected; the previous version stays in force: %s", exc)
            return self._snapshot
        if stat.S_IMODE(st.st_mode) & 0o004:
            log.warning("users file %s is world-readable; password hashes can be attacked "
                        "offline: run chmod o-r on it", self.path)
        params = _typical_parameters(users)
        previous = self._snapshot
        dummy = (previous.dummy_hash if previous is not None and previous.dummy_params == params
                 else _dummy_hash(params))  # hashing costs as much as a login: only if needed
        self._snapshot = _Snapshot(MappingProxyType(users), dummy, params, signature)
        self._rejected, self.problem = None, None
        log.info("users file loaded: %d accounts", len(users))
        return self._snapshot

    # --- running blocking work -------------------------------------------------------------

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await within(asyncio.to_thread(fn, *args), self.timeout)
        except TimeoutError:
            raise DirectoryUnavailable(f"users file not read within {self.timeout}s") from None

    async def _in_verification_slot(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` in a thread holding one of the bounded argon2 slots, within the timeout.

        On timeout the caller gets `DirectoryUnavailable` at once, but the slot stays taken
        until the thread really finishes: a flood of slow verifications must not start more
        concurrent argon2 computations (64 MiB each) than ``max_parallel``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise DirectoryUnavailable("no password check slot free within the timeout") from None
        future: asyncio.Future[T] = loop.run_in_executor(None, fn, *args)
        future.add_done_callback(self._release_slot)
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DirectoryUnavailable(f"password check took over {self.timeout}s") from None

    def _release_slot(self, future: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not future.cancelled():
            future.exception()  # retrieved: a late failure after a timeout is not "lost"

