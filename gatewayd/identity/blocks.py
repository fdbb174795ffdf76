"""Gateway-side account blocks ("holds"): a user the gateway refuses, whatever the directory says.

``gatewayd users disable USER`` blocks USER here for every directory backend — with LDAP /
Active Directory this is what stops the next sign-in until the directory's administrator
disables the account there; with the file backend it is a second layer next to
``disabled = true``. ``gatewayd users enable USER`` lifts the block (it never touches the
directory), ``gatewayd users blocked`` lists the blocks (`gatewayd.identity.disable`).

**Where a block lives.** ``STATE_DIR/user-blocks.json`` (``0600``, owned by the state
directory's owner even when root runs the command, replaced atomically), written under the
disable journal's lock (``user-disable.json.lock``, `gatewayd.emergency.DisableJournal`) so
that ``users disable`` records the block and the disable request as one step::

    {"format": "gatewayd-user-blocks-v1",
     "blocked": [{"user": "alice", "since": "2026-11-27T08:10:56Z",
                  "operator": "admin1 (sudo as root)", "reason": "laptop stolen"}],
     "changes": [{"id": "<16 hex>", "action": "block" | "lift", "user": "alice",
                  "operator": "…", "at": "2026-11-27T08:10:56Z", "reason": "…",
                  "done": false}]}

``blocked`` is what the node enforces (the command changes it at once, so a restarted
single node enforces it from its first login); ``changes`` are the commands' requests for the
running gateway, which `UserBlocks.sync` picks up every emergency-stop round
(`gatewayd.emergency.EmergencyStop`, every second and on SIGHUP): it publishes them to the
shared state, and a ``lift`` is audited as ``user.enable`` (user, operator, reason) before it
is marked done (a ``block`` is audited by the disable journal's ``user.disable``).

**Several nodes** (``state.backend = "redis"``): the Redis hash ``<key_prefix>user-blocks``
(field: the block key, value: the record as JSON) is the cluster's list. Each round a node
first applies its pending changes there (``HSET`` / ``HDEL``), then reads the whole hash
(``HGETALL``) and writes it into its own ``blocked`` (a mirror; ``users blocked`` on any node
shows the cluster's list). So a block made through node A's state directory stops a login on
node B within a round, and ``users enable`` on node B lifts a block made on node A. Blocks
made while a node ran on the memory backend are not published when it switches to Redis
(only pending changes are): run ``users disable`` again after switching.

**Enforcement** (`UserBlocks.blocked`, asked by the `Authenticator` for the sign-in form,
step-up, SSH keyboard-interactive, SSH certificates and the directory refresh of open
sessions): a name is blocked when its `block_key` is in this node's ``blocked`` or — with
Redis — in the shared hash (``HMGET``, one round trip). Fail closed: a Redis that cannot
answer raises `StateUnavailable` (the sign-in is refused as ``state_unavailable``), and so
does a blocks file that could not be read since the gateway started (a file that breaks
later leaves the last list read in force, and the problem is logged).

**Names.** `block_key` is `gatewayd.identity.directory.lookup_key` (NFKC, casefold, outer
blanks) after dropping a down-level domain prefix: ``Alice``, ``ALICE`` typed full-width
and ``TOKYO\\alice`` are one block. Both the name as typed and the directory's spelling of
the account are compared.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

from gatewayd.emergency import JournalError, state_dir_owner
from gatewayd.files import atomic_write
from gatewayd.identity.directory import lookup_key
from gatewayd.state.store import StateUnavailable

if TYPE_CHECKING:
    from gatewayd.state.redis import RedisState

log = logging.getLogger(__name__)

BLOCKS_FILE: Final = "user-blocks.json"
BLOCKS_FORMAT: Final = "gatewayd-user-blocks-v1"
SHARED_KEY: Final = "user-blocks"  # the Redis hash, behind state.key_prefix
KEEP_DONE: Final = 500  # finished changes kept in the file for reference
IO_TIMEOUT: Final = 5.0  # seconds for reading the blocks file at the first sign-in

Action = Literal["block", "lift"]


def block_key(name: str) -> str | None:
    """The key a block is kept and compared under, or None for an unusable name.

    `lookup_key` (case, width, outer blanks) after the last backslash: ``TOKYO\\alice`` and
    ``alice`` are the same account to Active Directory's down-level logon.
    """
    key = lookup_key(name)
    if key is None:
        return None
    return key.rpartition("\\")[2].strip() or None


def _utc(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Block:
    """One blocked account."""

    user: str
    since: str
    operator: str
    reason: str | None

    @property
    def key(self) -> str:
        return block_key(self.user) or self.user

    def to_json(self) -> dict[str, object]:
        return {"user": self.user, "since": self.since, "operator": self.operator,
                "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Change:
    """One ``users disable`` / ``users enable`` for the running gateway to publish (and audit)."""

    id: str
    action: Action
    user: str
    operator: str
    at: str
    reason: str | None
    done: bool

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "action": self.action, "user": self.user,
                "operator": self.operator, "at": self.at, "reason": self.reason,
                "done": self.done}


def _block(item: object, where: str) -> Block:
    if isinstance(item, dict):
        texts = [item.get(k) for k in ("user", "since", "operator")]
        reason = item.get("reason")
        if all(isinstance(t, str) for t in texts) and (reason is None or isinstance(reason, str)) \
                and block_key(str(texts[0])) is not None:
            return Block(str(texts[0]), str(texts[1]), str(texts[2]), reason)
    raise JournalError(f"{where}: malformed block")


def _change(item: object, where: str) -> Change:
    if isinstance(item, dict):
        texts = [item.get(k) for k in ("id", "user", "operator", "at")]
        action, reason, done = item.get("action"), item.get("reason"), item.get("done")
        if all(isinstance(t, str) for t in texts) and action in ("block", "lift") \
                and (reason is None or isinstance(reason, str)) and isinstance(done, bool):
            return Change(str(texts[0]), "block" if action == "block" else "lift",
                          str(texts[1]), str(texts[2]), str(texts[3]), reason, done)
    raise JournalError(f"{where}: malformed change")


@dataclass(frozen=True, slots=True)
class BlockState:
    """The contents of the blocks file."""

    blocked: tuple[Block, ...] = ()
    changes: tuple[Change, ...] = ()

    def find(self, name: str) -> Block | None:
        key = block_key(name)
        return next((b for b in self.blocked if b.key == key), None)


def _apply(blocked: dict[str, Block], change: Change) -> None:
    key = block_key(change.user)
    if key is None:
        return
    if change.action == "block":
        blocked.setdefault(key, Block(change.user, change.at, change.operator, change.reason))
    else:
        blocked.pop(key, None)


class BlockFile:
    """``STATE_DIR/user-blocks.json`` (blocking; hold the disable journal's lock to change it)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / BLOCKS_FILE

    def read(self) -> BlockState:
        """The file's contents (empty when it does not exist); JournalError if unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return BlockState()
        except (OSError, UnicodeDecodeError) as exc:
            raise JournalError(f"cannot read {self.path}: {exc}") from None
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise JournalError(f"{self.path}: not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != BLOCKS_FORMAT \
                or not isinstance(data.get("blocked"), list) \
                or not isinstance(data.get("changes"), list):
            raise JournalError(f"{self.path} is not a {BLOCKS_FORMAT} file")
        return BlockState(
            tuple(_block(b, f"{self.path}: blocked[{i}]") for i, b in enumerate(data["blocked"])),
            tuple(_change(c, f"{self.path}: changes[{i}]")
                  for i, c in enumerate(data["changes"])))

    def write(self, state: BlockState) -> None:
        finished = [c for c in state.changes if c.done][-KEEP_DONE:]
        changes = [c for c in state.changes if not c.done or c in finished]
        data = {"format": BLOCKS_FORMAT,
                "blocked": [b.to_json() for b in sorted(state.blocked, key=lambda b: b.key)],
                "changes": [c.to_json() for c in changes]}
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, text.encode("utf-8"), mode=0o600, overwrite=True,
                     owner=state_dir_owner(self.state_dir))

    def record(self, action: Action, user: str, *, operator: str, reason: str | None,
               now: datetime | None = None) -> tuple[Block | None, Change]:
        """Block or lift ``user`` now and leave the change for the gateway (caller holds the
        lock). Returns the block that was in force before (None: there was none)."""
        state = self.read()
        before = state.find(user)
        change = Change(secrets.token_hex(8), action, user, operator, _utc(now), reason, False)
        blocked = {b.key: b for b in state.blocked}
        _apply(blocked, change)
        self.write(BlockState(tuple(blocked.values()), (*state.changes, change)))
        return before, change


# --- the shared list (Redis) ---------------------------------------------------------------


class SharedBlocks(Protocol):
    """The cluster's list of blocks (every method raises StateUnavailable when it cannot)."""

    async def any_of(self, keys: Sequence[str]) -> bool: ...

    async def apply(self, changes: Sequence[Change]) -> None: ...

    async def all(self) -> dict[str, Block]: ...


class RedisBlocks:
    """`SharedBlocks` on the Redis hash ``<key_prefix>user-blocks`` of a `RedisState`."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._name = state.key_prefix + SHARED_KEY

    async def any_of(self, keys: Sequence[str]) -> bool:
        if not keys:
            return False
        client, name = self._state.client, self._name

        found = await self._state.run(lambda: cast(
            Awaitable[list[Any]], client.hmget(name, list(keys))), "blocks")
        return any(value is not None for value in found)

    async def apply(self, changes: Sequence[Change]) -> None:
        client, name = self._state.client, self._name

        async def transaction() -> None:
            async with client.pipeline(transaction=True) as pipe:
                for change in changes:
                    key = block_key(change.user)
                    if key is None:
                        continue
                    if change.action == "block":
                        record = Block(change.user, change.at, change.operator, change.reason)
                        pipe.hsetnx(name, key, json.dumps(record.to_json(), ensure_ascii=False))
                    else:
                        pipe.hdel(name, key)
                await pipe.execute()

        if changes:
            await self._state.run(transaction, "blocks")

    async def all(self) -> dict[str, Block]:
        client, name = self._state.client, self._name

        raw = await self._state.run(lambda: cast(
            Awaitable[dict[Any, Any]], client.hgetall(name)), "blocks")
        blocks: dict[str, Block] = {}
        for field, value in raw.items():
            try:
                block = _block(json.loads(value), f"redis {name}")
            except (JournalError, ValueError, TypeError):
                # Someone else's value under our prefix: still a block (fail closed).
                key = field.decode("utf-8", "replace") if isinstance(field, bytes) else str(field)
                block = Block(key, "?", "?", "unreadable record in the shared state")
            blocks[block.key] = block
        return blocks


# --- the gateway's view --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sync:
    """What one `UserBlocks.sync` found: the blocks in force and the changes to finish."""

    blocked: dict[str, Block]
    lifts: tuple[Change, ...]  # pending lifts, to be audited as user.enable
    published: tuple[str, ...]  # ids of pending changes now in force everywhere


class UserBlocks:
    """The blocks one gateway enforces (see the module docstring); one per `Authenticator`."""

    def __init__(self, state_dir: Path, shared: SharedBlocks | None = None, *,
                 io_timeout: float = IO_TIMEOUT) -> None:
        self.file = BlockFile(state_dir)
        self.shared = shared
        self._io_timeout = io_timeout
        self._local: frozenset[str] | None = None  # keys in force; None until first read
        self._reported = False

    async def blocked(self, *names: str) -> bool:
        """Whether any of ``names`` is blocked (raises StateUnavailable: fail closed)."""
        keys = sorted({k for n in names if (k := block_key(n)) is not None})
        if self._local is None:
            await self._first_read()
        if self._local is not None and not self._local.isdisjoint(keys):
            return True
        if self.shared is not None:
            return await self.shared.any_of(keys)
        return False

    def blocked_locally(self, name: str) -> bool:
        """Whether ``name`` is in this node's list as last read (no I/O)."""
        return self._local is not None and block_key(name) in self._local

    async def _first_read(self) -> None:
        from gatewayd.tasks import within  # noqa: PLC0415 - keeps this module light for the CLI

        try:
            state = await within(asyncio.to_thread(self.file.read), self._io_timeout)
        except (JournalError, TimeoutError) as exc:
            raise StateUnavailable(f"user blocks: {exc or 'no answer'}") from None
        if self._local is None:
            self._local = frozenset(b.key for b in state.blocked)

    async def sync(self) -> Sync:
        """One round: read the file, publish pending changes, read the cluster's list.

        Raises JournalError (the file) or StateUnavailable (Redis); the list in force stays.
        """
        state = await asyncio.to_thread(self.file.read)
        pending = tuple(c for c in state.changes if not c.done)
        blocked = {b.key: b for b in state.blocked}
        if self.shared is not None:
            try:
                await self.shared.apply(pending)
                blocked = await self.shared.all()
            except StateUnavailable:
                # Logins are refused meanwhile (the shared check fails too); this node's
                # sessions of newly blocked users still end.
                self._local = (self._local or frozenset()) | frozenset(blocked)
                raise
        self._local = frozenset(blocked)
        return Sync(blocked, tuple(c for c in pending if c.action == "lift"),
                    tuple(c.id for c in pending))

    async def finish(self, done: Iterable[str], sync: Sync,
                     locked: Callable[[], AbstractContextManager[object]]) -> None:
        """Mark ``done`` changes done and (with Redis) mirror the cluster's list into the file.

        ``locked`` is the disable journal's lock (a context manager factory, blocking).
        """
        ids = frozenset(done)
        mirror = self.shared is not None

        def work() -> None:
            with locked():
                state = self.file.read()
                changes = tuple(Change(c.id, c.action, c.user, c.operator, c.at, c.reason,
                                       c.done or c.id in ids) for c in state.changes)
                if mirror:
                    # The cluster's list, plus whatever a command changed since the round began.
                    blocked = dict(sync.blocked)
                    for change in changes:
                        if not change.done and change.id not in sync.published:
                            _apply(blocked, change)
                    new = BlockState(tuple(blocked.values()), changes)
                else:
                    new = BlockState(state.blocked, changes)
                if new != state:
                    self.file.write(new)
                self._local = frozenset(b.key for b in new.blocked)

        await asyncio.to_thread(work)


def for_state(state_dir: Path, state: object, *, redis: bool) -> UserBlocks:
    """The `UserBlocks` of a node whose state store is ``state`` (``redis``: the store is a
    `RedisState` and the list is shared; otherwise the file is the whole list)."""
    if not redis:
        return UserBlocks(state_dir)
    from gatewayd.state.redis import RedisState  # noqa: PLC0415 - only nodes on Redis load it

    if not isinstance(state, RedisState):
        raise TypeError(f"state.backend is redis but the store is {state!r}")
    return UserBlocks(state_dir, RedisBlocks(state))
