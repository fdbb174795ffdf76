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
     "blocked": [{"user": "alice", "since": "2026-11-27T08:10:56.021374Z",
                  "operator": "admin1 (sudo as root)", "reason": "laptop stolen",
                  "id": "<16 hex: the block command in force>"}],
     "changes": [{"id": "<16 hex>", "action": "block" | "lift", "user": "alice",
                  "operator": "…", "at": "2026-11-27T08:10:56.021374Z", "reason": "…",
                  "done": false, "lifts": "<id of the block lifted; lifts only>"}]}

A block in ``blocked`` whose name no sign-in can match is skipped when the file is read and
never written (it blocks nobody; it must not make the file unreadable).

``blocked`` is what the node enforces (``users disable`` adds to it at once, so a restarted
single node enforces a block from its first login); ``changes`` are the commands' requests
for the running gateway, which `UserBlocks.sync` picks up every emergency-stop round
(`gatewayd.emergency.EmergencyStop`, every second and on SIGHUP). A ``block`` is published to
the shared state at once (it is audited by the disable journal's ``user.disable``); with
Redis, ``users disable`` also publishes it itself (`publish_block`), so a block made while
this node's gateway is down still reaches the other nodes. A
``lift`` leaves ``blocked`` at once (``users blocked`` no longer lists it) but takes effect
only after the gateway has written its ``user.enable`` audit record (user, operator,
reason): until then the account stays blocked (write before act — no sign-in without the
record); then it is published and marked done. Of several pending changes of one account the
last one decides: every pending block is published in order, then the last change's lift
(a re-block takes a new id, and a lift after it names that id).

**Several nodes** (``state.backend = "redis"``): the Redis hash ``<key_prefix>user-blocks``
is the cluster's list. Field: the block key; value: the newest command for that account as
JSON, ``{"state": "block" | "lift", "user", "at", "id", "operator", "reason"}`` (a lift also
``"lifts"``: the id of the block it lifted) — a lift is kept as a tombstone, never deleted.
No clock orders a block against a lift (one Lua script of HGET/HSET, compare-and-set): a
lift names the block it lifts (the id in this node's file when ``users enable`` ran) and is
written only over that very block (or an empty field); a block is written over any other
block and any lift — except a lift of that same block (a re-sent block does not come back);
a lift written over an empty field (Redis lost its data, or the block never reached it) is
marked ``"blind": true``: it never saw the block in force. A block a node puts back from
its file (below) is written over an empty field and over a blind lift of another block —
never over a lift of itself, nor over a lift written over the block it lifted (that block
replaced the one in the node's file: the file is stale). So a block always wins over a lift
that did not name it, in any order of the nodes' rounds and after Redis lost its data (a
stale lift written into an emptied hash is overwritten by the newer block, which the node
that made it puts back from its file), and a block lifted through its own id stays lifted:
a lift recorded on a node whose
gateway was down, or that had not yet mirrored a newer block, lifts nothing (it is audited
as ``user.enable`` and then again with status ``failure``, ``error`` "superseded", and
logged); lift again. Nodes' clocks do not matter.

Each field must be a `block_key` (what sign-ins are checked against): other fields are not
gatewayd's and are ignored (logged). A value that cannot be read — longer than `MAX_VALUE`,
not JSON, nested too deep, wrong types — is a block of its field (fail closed); the account
is always the field, the value's ``user`` only its spelling.

Each round a node publishes its pending blocks, then every block of its own file that the
hash has no record of at all (neither block nor lift): after a Redis restart without
persistence, ``FLUSHALL``, an eviction, or a changed ``state.key_prefix`` the nodes put their
blocks back instead of dropping them (logged as a warning; so are blocks made while a node
ran on the memory backend, on its first round on Redis; and blocks put back over a blind
lift of another block). Then it reads the hash (``HGETALL``)
and mirrors it into its file: the hash's blocks, plus its own blocks the hash lacks — only a
lift removes a block from a node's file. Fail closed: a block lifted while a node was down
and whose tombstone Redis then lost comes back from that node's file (lift it again).
Tombstones are not expired — one small record per account ever lifted — so a stale file
cannot resurrect a lift the hash still knows. So a block made through node A's state
directory stops a login on node B within a round, ``users enable`` on node B lifts a block
made on node A, and ``users blocked`` on any node shows the cluster's list.

A blocks file that cannot be read does not stop the round: the node still adds the
cluster's blocks to what it enforces (nothing is lifted) and the error is logged.

**Enforcement** (`UserBlocks.blocked`, asked by the `Authenticator` for the sign-in form,
step-up, SSH keyboard-interactive, SSH certificates and the directory refresh of open
sessions): a name is blocked when its `block_key` is in this node's list in force (its
``blocked``, plus accounts whose lift is not audited yet) or — with Redis — has a block record
in the shared hash (``HMGET``, one round trip). Fail closed: a Redis that cannot
answer raises `StateUnavailable` (the sign-in is refused as ``state_unavailable``), and so
does a blocks file that could not be read since the gateway started (a file that breaks
later leaves the last list read in force, and the problem is logged).

**Names.** `block_key` is `gatewayd.identity.directory.lookup_key` (NFKC, casefold, outer
blanks) after dropping a down-level domain prefix, repeated until it no longer changes
(``maß`` with a combining acute folds to ``mass`` + acute, which NFKC composes again): a
function of the directory's lookup key, so every spelling the directory lookup equates is
one block, and every key is its own `block_key`. ``Alice``, ``ALICE`` typed full-width
and ``TOKYO\\alice`` are one block. Both the name as typed and the directory's spelling of
the account are compared.

**Files root writes.** ``users disable|enable`` usually run as root in a directory the
daemon's account owns: the lock is opened without following a symlink, handed to that
account only when this run created it, and an existing one is used only when it is that
account's plain file with one link (`gatewayd.emergency`); the
files are replaced through a new temporary file (``O_EXCL | O_NOFOLLOW``, `atomic_write`), so
nothing the daemon's account planted under these names is written through or given away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast

from gatewayd.emergency import JournalError, read_state_json, state_dir_owner
from gatewayd.files import atomic_write
from gatewayd.identity.directory import lookup_key
from gatewayd.state.store import StateUnavailable

if TYPE_CHECKING:
    from gatewayd.config import StateSettings
    from gatewayd.state.redis import RedisState

log = logging.getLogger(__name__)

BLOCKS_FILE: Final = "user-blocks.json"
BLOCKS_FORMAT: Final = "gatewayd-user-blocks-v1"
SHARED_KEY: Final = "user-blocks"  # the Redis hash, behind state.key_prefix
KEEP_DONE: Final = 500  # finished changes kept in the file for reference
IO_TIMEOUT: Final = 5.0  # seconds for reading the blocks file at the first sign-in

Action = Literal["block", "lift"]
_MAX_ROUNDS: Final = 8  # normalisation rounds of block_key (two suffice for known strings)


def block_key(name: str) -> str | None:
    """The key a block is kept and compared under, or None for an unusable name.

    `lookup_key` (case, width, outer blanks) after the last backslash: ``TOKYO\\alice`` and
    ``alice`` are the same account to Active Directory's down-level logon.
    """
    key = lookup_key(name)
    for _ in range(_MAX_ROUNDS):
        if key is None:
            return None
        key = key.rpartition("\\")[2].strip() or None
        # lookup_key is not idempotent (NFKC before casefold: "maß\u0301" folds to
        # "mass\u0301", which NFKC composes to "masś"): repeat it until the key is stable, so
        # that a key stored in the shared hash is its own block_key. The result depends only
        # on lookup_key(name): every spelling the directory lookup equates has one key.
        again = lookup_key(key) if key is not None else None
        if again is None or again == key:
            return key
        key = again
    return key


def _utc(now: datetime | None) -> str:
    """A change's time, to the microsecond: changes of one account are ordered by it."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def shown(at: str) -> str:
    """A change's time for people: to the second."""
    head, dot, _ = at.partition(".")
    return head + "Z" if dot else at


@dataclass(frozen=True, slots=True)
class Block:
    """One blocked account; ``id`` names the block command in force (what a lift names;
    ``""`` for a block recorded before blocks had ids)."""

    user: str
    since: str
    operator: str
    reason: str | None
    id: str = ""

    @property
    def key(self) -> str:
        return block_key(self.user) or self.user

    def to_json(self) -> dict[str, object]:
        return {"user": self.user, "since": self.since, "operator": self.operator,
                "reason": self.reason, "id": self.id}


@dataclass(frozen=True, slots=True)
class Change:
    """One ``users disable`` / ``users enable`` for the running gateway to publish (and audit).

    A lift names the block it lifts (``lifts``: that block's id, as this node's file knew it
    when the command ran); a block's own ``id`` is what a later lift names.
    """

    id: str
    action: Action
    user: str
    operator: str
    at: str
    reason: str | None
    done: bool
    lifts: str | None = None

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "id": self.id, "action": self.action, "user": self.user, "operator": self.operator,
            "at": self.at, "reason": self.reason, "done": self.done}
        if self.action == "lift":
            data["lifts"] = self.lifts or ""
        return data

    def marked(self, done: bool) -> Change:
        return Change(self.id, self.action, self.user, self.operator, self.at, self.reason,
                      done, self.lifts)


def _block(item: object, where: str) -> Block:
    if isinstance(item, dict):
        texts = [item.get(k) for k in ("user", "since", "operator")]
        reason, id_ = item.get("reason"), item.get("id", "")
        if all(isinstance(t, str) for t in texts) and (reason is None or isinstance(reason, str)) \
                and isinstance(id_, str) and block_key(str(texts[0])) is not None:
            return Block(str(texts[0]), str(texts[1]), str(texts[2]), reason, id_)
    raise JournalError(f"{where}: malformed block")


def _unusable_block(item: object) -> bool:
    """Whether a blocks-file entry is well formed but names no account a sign-in can match
    (skipped on reading: it blocks nobody, and must not make the whole file unreadable)."""
    return isinstance(item, dict) and isinstance(item.get("user"), str) \
        and block_key(item["user"]) is None


def _change(item: object, where: str) -> Change:
    if isinstance(item, dict):
        texts = [item.get(k) for k in ("id", "user", "operator", "at")]
        action, reason, done = item.get("action"), item.get("reason"), item.get("done")
        lifts = item.get("lifts", "" if action == "lift" else None)
        if all(isinstance(t, str) for t in texts) and action in ("block", "lift") \
                and (reason is None or isinstance(reason, str)) and isinstance(done, bool) \
                and (lifts is None or isinstance(lifts, str)):
            return Change(str(texts[0]), "block" if action == "block" else "lift",
                          str(texts[1]), str(texts[2]), str(texts[3]), reason, done,
                          lifts if action == "lift" else None)
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
        # A block of an account already blocked keeps its "since" but takes the new
        # command's id: that block is the one published, so the one a later lift must name.
        old = blocked.get(key)
        blocked[key] = (Block(change.user, change.at, change.operator, change.reason, change.id)
                        if old is None else
                        Block(old.user, old.since, old.operator, old.reason, change.id))
    else:
        blocked.pop(key, None)


class BlockFile:
    """``STATE_DIR/user-blocks.json`` (blocking; hold the disable journal's lock to change it)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / BLOCKS_FILE

    def read(self) -> BlockState:
        """The file's contents (empty when it does not exist); JournalError if unreadable."""
        data = read_state_json(self.path, BLOCKS_FORMAT, "blocked", "changes")
        if data is None:
            return BlockState()
        unusable = [b for b in data["blocked"] if _unusable_block(b)]
        if unusable:
            log.warning("%s: ignoring %d block(s) of a name no sign-in can match: %s",
                        self.path, len(unusable), ", ".join(repr(b["user"]) for b in unusable))
        return BlockState(
            tuple(_block(b, f"{self.path}: blocked[{i}]") for i, b in enumerate(data["blocked"])
                  if not _unusable_block(b)),
            tuple(_change(c, f"{self.path}: changes[{i}]")
                  for i, c in enumerate(data["changes"])))

    def write(self, state: BlockState) -> None:
        """Replace the file with ``state``. Every block is checked as `read` checks it first:
        one that would not read back (a name no sign-in can match) is left out and logged,
        so the file never becomes unreadable."""
        blocked = []
        for block in sorted(state.blocked, key=lambda b: b.key):
            try:
                blocked.append(_block(block.to_json(), str(self.path)).to_json())
            except JournalError:
                log.error("%s: not writing a block of %r: no sign-in can match that name",
                          self.path, block.user)
        finished = [c for c in state.changes if c.done][-KEEP_DONE:]
        changes = [c for c in state.changes if not c.done or c in finished]
        data = {"format": BLOCKS_FORMAT, "blocked": blocked,
                "changes": [c.to_json() for c in changes]}
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, text.encode("utf-8"), mode=0o600, overwrite=True,
                     owner=state_dir_owner(self.state_dir))

    def record(self, action: Action, user: str, *, operator: str, reason: str | None,
               now: datetime | None = None) -> tuple[Block | None, Change]:
        """Block or lift ``user`` now and leave the change for the gateway (caller holds the
        lock). Returns the block that was in force before (None: there was none). A lift
        names that block (its id): it lifts that block and no other."""
        state = self.read()
        before = state.find(user)
        lifts = (before.id if before is not None else "") if action == "lift" else None
        change = Change(secrets.token_hex(8), action, user, operator, _utc(now), reason, False,
                        lifts)
        blocked = {b.key: b for b in state.blocked}
        _apply(blocked, change)
        self.write(BlockState(tuple(blocked.values()), (*state.changes, change)))
        return before, change


# --- the shared list (Redis) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One field of the shared hash: the account's block in force, or the lift of its last
    block (``lifts``: that block's id).

    A lift stays as a tombstone (never deleted): a node that missed it must not publish the
    block again as "lost" (see the module docstring).
    """

    state: Action
    user: str
    at: str
    id: str
    operator: str
    reason: str | None
    lifts: str | None = None
    blind: bool = False  # a lift written over an empty field: it never saw the block it names

    @classmethod
    def of(cls, change: Change) -> Record:
        return cls(change.action, change.user, change.at, change.id, change.operator,
                   change.reason, (change.lifts or "") if change.action == "lift" else None)

    @classmethod
    def restored(cls, block: Block) -> Record:
        return cls("block", block.user, block.since, block.id, block.operator, block.reason)

    def block(self) -> Block:
        return Block(self.user, self.at, self.operator, self.reason, self.id)

    def to_json(self) -> str:
        data: dict[str, object] = {
            "state": self.state, "user": self.user, "at": self.at, "id": self.id,
            "operator": self.operator, "reason": self.reason}
        if self.state == "lift":
            data["lifts"] = self.lifts or ""
            if self.blind:
                data["blind"] = True
        return json.dumps(data, ensure_ascii=False, sort_keys=True)


MAX_VALUE: Final = 65_536  # bytes of a stored value parsed; a longer one counts as a block


def field_key(field: object) -> str | None:
    """The account a field of the hash is about, or None when no sign-in can ever be checked
    against it (every key written is a `block_key`: anything else is not ours)."""
    key = field.decode("utf-8", "replace") if isinstance(field, bytes) else str(field)
    try:
        return key if block_key(key) == key else None
    except Exception:  # a name lookup_key cannot handle is no key of ours either
        return None


def _record(key: str, value: object) -> Record:
    """The stored value of field ``key`` (a `field_key`). An older bare block record counts
    as a block; anything unreadable — too long, not JSON, nested too deep, wrong types — as
    a block of ``key`` (someone else's value under our prefix: fail closed). The account is
    always ``key``: the value's own ``user`` is kept only as its spelling of that key."""
    try:
        if not isinstance(value, (bytes, str)) or len(value) > MAX_VALUE:
            raise ValueError("not a short text")
        data = json.loads(value)
        if isinstance(data, dict) and data.get("state") in ("block", "lift"):
            texts = [data.get(k) for k in ("user", "at", "id", "operator")]
            reason = data.get("reason")
            lifts = data.get("lifts") if data["state"] == "lift" else None
            blind = data.get("blind", False) if data["state"] == "lift" else False
            if not (all(isinstance(t, str) for t in texts)
                    and (reason is None or isinstance(reason, str))
                    and (lifts is None or isinstance(lifts, str))
                    and isinstance(blind, bool)):
                raise ValueError("malformed record")
            record = Record("lift" if data["state"] == "lift" else "block", str(texts[0]),
                            str(texts[1]), str(texts[2]), str(texts[3]), reason, lifts, blind)
        else:
            record = Record.restored(_block(data, key))
        if block_key(record.user) != key:
            record = replace(record, user=key)
        return record
    except Exception:  # any unreadable value blocks (RecursionError too)
        return Record("block", key, "", "", "?", "unreadable record in the shared state")


# KEYS[1]: the hash. ARGV: groups of (mode, field, value, id, lifts, blind value: a lift's
# value marked "blind", written instead when the field is empty). Nothing is ordered by time:
# a block names itself (id), a lift names the block it lifts (lifts).
#   "block"   writes unless the field holds this block already, or a lift of this very block
#             (it was lifted: a re-sent block must not come back); overwrites any other lift
#             and any other block (the newest block command is the one a lift must name).
#   "restore" writes when the field does not exist or holds a blind lift of another block (a
#             lift written into an emptied hash never saw the block in force: it must not
#             beat a block it did not name); not over a lift written over its own block (the
#             restored block is older than that one: the node's file is stale), nor over a
#             lift of this very block, nor over any block (a block is in force already).
#   "lift"    writes when the field holds the block it names, or nothing (then marked blind:
#             a tombstone, so a node's stale file cannot restore that block, yet a restore of
#             another block overwrites it); not over another block.
# An unreadable stored value counts as a block with id "". Returns per group 2 (written),
# 1 (not written: in effect already — this record, or for a lift: no block there) or
# 0 (not written: a block already lifted; a lift of a block that is no longer the one in
# force — superseded).
_PUBLISH: Final = """
local out = {}
for i = 1, #ARGV, 6 do
  local mode, field, value, id, lifts = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  local current = redis.call('HGET', KEYS[1], field)
  local cstate, cid, clifts, cblind = 'block', '', nil, false
  if current then
    local ok, rec = pcall(cjson.decode, current)
    if ok and type(rec) == 'table' then
      if type(rec['id']) == 'string' then cid = rec['id'] end
      if rec['state'] == 'lift' then
        cstate = 'lift'
        if type(rec['lifts']) == 'string' then clifts = rec['lifts'] end
        cblind = rec['blind'] == true
      end
    end
  end
  local result
  if not current then
    result = 2
    if mode == 'lift' then value = ARGV[i + 5] end
  elseif current == value then
    result = 1
  elseif mode == 'block' then
    if cstate == 'lift' and clifts == id then
      result = 0
    elseif cstate == 'block' and cid == id then
      result = 1
    else
      result = 2
    end
  elseif mode == 'lift' then
    if cstate == 'lift' then
      result = 1
    elseif cid == lifts then
      result = 2
    else
      result = 0
    end
  elseif cstate == 'lift' and cblind and clifts ~= id then
    result = 2
  else
    result = 1
  end
  if result == 2 then redis.call('HSET', KEYS[1], field, value) end
  out[#out + 1] = result
end
return out
"""

class SharedBlocks(Protocol):
    """The cluster's list of blocks (every method raises StateUnavailable when it cannot)."""

    async def any_of(self, keys: Sequence[str]) -> bool: ...

    async def publish(self, changes: Sequence[Change],
                      restore: Sequence[Block] = ()) -> list[int]: ...

    async def all(self) -> dict[str, Record]: ...


class RedisBlocks:
    """`SharedBlocks` on the Redis hash ``<key_prefix>user-blocks`` of a `RedisState`
    (HMGET, HGETALL and one script of HGET / HSET: all in the documented ACL)."""

    def __init__(self, state: RedisState) -> None:
        self._state = state
        self._name = state.key_prefix + SHARED_KEY
        self._publish = state.client.register_script(_PUBLISH)
        self._ignored: set[str] = set()  # foreign fields of the hash, logged once

    async def any_of(self, keys: Sequence[str]) -> bool:
        if not keys:
            return False
        client, name = self._state.client, self._name

        found = await self._state.run(lambda: cast(
            Awaitable[list[Any]], client.hmget(name, list(keys))), "blocks")
        return any(value is not None and _record(key, value).state == "block"
                   for key, value in zip(keys, found, strict=True))

    async def publish(self, changes: Sequence[Change],
                      restore: Sequence[Block] = ()) -> list[int]:
        """Write each change by the rules of `_PUBLISH` (2 written, 1 in effect already,
        0 not written: a block lifted already, or a lift of a block no longer in force), then
        each of ``restore`` where the hash has nothing for its key, or a blind lift of
        another block (2 written, else 1)."""
        args: list[str] = []
        for mode, key, record in [
                *((c.action, block_key(c.user), Record.of(c)) for c in changes),
                *(("restore", b.key, Record.restored(b)) for b in restore)]:
            # An unusable name (None) goes to a field no check ever asks for.
            args += [mode, key or "", record.to_json(), record.id, record.lifts or "",
                     replace(record, blind=True).to_json() if mode == "lift" else ""]
        if not args:
            return []
        script, name = self._publish, self._name
        result = await self._state.run(
            lambda: cast(Awaitable[list[Any]], script(keys=[name], args=args)), "blocks")
        return [int(x) for x in result]

    async def all(self) -> dict[str, Record]:
        client, name = self._state.client, self._name

        raw = await self._state.run(lambda: cast(
            Awaitable[dict[Any, Any]], client.hgetall(name)), "blocks")
        records: dict[str, Record] = {}
        ignored: list[str] = []
        for field, value in raw.items():
            key = field_key(field)
            if key is None:
                ignored.append(repr(field))
            else:
                records[key] = _record(key, value)
        if ignored and set(ignored) != self._ignored:
            log.warning("redis %s: ignoring %d field(s) that are no account name a sign-in "
                        "is checked against (not written by gatewayd; remove them): %s",
                        name, len(ignored), ", ".join(sorted(ignored)[:20]))
        self._ignored = set(ignored)
        return records


# --- the gateway's view --------------------------------------------------------------------


def _pending(changes: Iterable[Change]) -> tuple[dict[str, Change], frozenset[str]]:
    """The last pending change per key (the one that decides) and the keys being lifted."""
    last: dict[str, Change] = {}
    for change in changes:
        key = block_key(change.user)
        if not change.done and key is not None:
            last[key] = change
    return last, frozenset(k for k, c in last.items() if c.action == "lift")


@dataclass(frozen=True, slots=True)
class Sync:
    """What one `UserBlocks.sync` found: the blocks in force and the changes to finish."""

    blocked: dict[str, Block]  # the list for the file (the cluster's, with Redis)
    lifts: tuple[Change, ...]  # pending lifts, to be audited as user.enable
    published: tuple[str, ...]  # ids of pending changes taken care of (lifts: once audited)
    effective: tuple[Change, ...] = ()  # the lifts to publish once audited (last per key)


class UserBlocks:
    """The blocks one gateway enforces (see the module docstring); one per `Authenticator`."""

    def __init__(self, state_dir: Path, shared: SharedBlocks | None = None, *,
                 io_timeout: float = IO_TIMEOUT) -> None:
        self.file = BlockFile(state_dir)
        self.shared = shared
        self._io_timeout = io_timeout
        self._local: frozenset[str] | None = None  # keys in force; None until first read

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
            # A lift is in force once audited (`finish`): until then the account stays blocked.
            self._local = frozenset(b.key for b in state.blocked) | _pending(state.changes)[1]

    async def sync(self) -> Sync:
        """One round: read the file, publish pending blocks (and local blocks the shared list
        lacks), read the cluster's list. Lifts are published by `finish`, once audited.

        Raises JournalError (the file: the cluster's blocks are still added to the list in
        force) or StateUnavailable (Redis); nothing is lifted then.
        """
        try:
            state = await asyncio.to_thread(self.file.read)
        except JournalError as exc:
            if self.shared is None:
                raise
            records = await self.shared.all()
            if self._local is not None:  # never read: sign-ins stay refused (fail closed)
                self._local |= frozenset(k for k, r in records.items() if r.state == "block")
            raise JournalError(f"{exc} (enforcing the shared list and the last list read "
                               "from it; nothing is lifted until it is repaired)") from None
        last, lifting = _pending(state.changes)
        pending = tuple(c for c in state.changes if not c.done)
        local = {b.key: b for b in state.blocked}
        blocked = dict(local)
        if self.shared is not None:
            # Every pending block, in order — not only the last change of its account: a lift
            # that follows a re-block names the re-block's id, which must be the one in force
            # when that lift is published (`finish`), or the lift would be "superseded".
            blocks = [c for c in pending
                      if c.action == "block" and block_key(c.user) is not None]
            try:
                results = await self.shared.publish(blocks, list(local.values()))
                records = await self.shared.all()
            except StateUnavailable:
                # Logins are refused meanwhile (the shared check fails too); this node's
                # sessions of newly blocked users still end.
                self._local = (self._local or frozenset()) | frozenset(local) | lifting
                raise
            _report(blocks, results[:len(blocks)], list(local.values()),
                    results[len(blocks):])
            # The cluster's list; a local block the hash still lacks stays (fail closed).
            blocked = {k: r.block() for k, r in records.items() if r.state == "block"}
            blocked.update({k: b for k, b in local.items() if k not in records})
        self._local = frozenset(blocked) | lifting
        return Sync(blocked, tuple(c for c in pending if c.action == "lift"),
                    tuple(c.id for c in pending),
                    tuple(c for c in last.values() if c.action == "lift"))

    async def finish(self, done: Iterable[str], sync: Sync,
                     locked: Callable[[], AbstractContextManager[object]]) -> list[Change]:
        """Publish the audited lifts, mark ``done`` changes done and (with Redis) mirror the
        cluster's list into the file. Returns the lifts that were superseded: each names a
        block that is no longer the one in force (the account was blocked again elsewhere
        since this node's file last knew it), so it lifted nothing; they are done too.

        ``locked`` is the disable journal's lock (a context manager factory, blocking). A lift
        that cannot be published stays pending (audited again next round).
        """
        ids = set(done)
        lifted: set[str] = set()  # keys whose lift is now in force everywhere
        superseded: list[Change] = []
        publish = [c for c in sync.effective if c.id in ids]
        if self.shared is not None and publish:
            try:
                results = await self.shared.publish(publish)
            except StateUnavailable as exc:
                log.error("cannot publish lifted user blocks (%s); tried again next round",
                          exc)
                ids -= {c.id for c in publish}
            else:
                for change, result in zip(publish, results, strict=True):
                    if result:
                        lifted.add(block_key(change.user) or change.user)
                    else:
                        superseded.append(change)
                        log.warning("the lift of %s (%s, %s) names block %s, which is no "
                                    "longer the one in force (blocked again elsewhere since "
                                    "this node last read the list): superseded, the block "
                                    "stays — lift it again if it must go", change.user,
                                    change.operator, change.at, change.lifts or "(no id)")
        mirror = self.shared is not None

        def work() -> None:
            with locked():
                state = self.file.read()
                changes = tuple(c.marked(c.done or c.id in ids) for c in state.changes)
                if mirror:
                    # The cluster's list, less the lifts just published, plus whatever the
                    # commands changed since (a pending lift leaves the file at once).
                    blocked = {k: b for k, b in sync.blocked.items() if k not in lifted}
                    for change in changes:
                        if not change.done:
                            _apply(blocked, change)
                    new = BlockState(tuple(blocked.values()), changes)
                else:
                    new = BlockState(state.blocked, changes)
                if new != state:
                    self.file.write(new)
                self._local = frozenset(b.key for b in new.blocked) | _pending(changes)[1]

        await asyncio.to_thread(work)
        return superseded


def _report(changes: Sequence[Change], results: Sequence[int], restored: Sequence[Block],
            restore_results: Sequence[int]) -> None:
    for change, result in zip(changes, results, strict=True):
        if not result:
            log.warning("the block of %s (%s, %s) was lifted already (a lift naming this very "
                        "block): it is not in force", change.user, change.operator, change.at)
    again = [b.user for b, result in zip(restored, restore_results, strict=True) if result == 2]
    if again:
        log.warning("published %d block(s) of this node's file the shared state lacked or "
                    "held only a blind lift of another block for (first round on Redis, a "
                    "changed state.key_prefix, or Redis lost its data — a block lifted "
                    "meanwhile is in force again: lift it again if so): %s",
                    len(again), ", ".join(sorted(again)))


def publish_block(settings: StateSettings, change: Change) -> int:
    """Publish one ``users disable`` block to the shared hash from the command itself
    (blocking; runs its own event loop): the same script and rules as the gateway's round,
    so the gateway publishing it again later changes nothing. Returns the script's result
    (2 written, 1 in force already, 0 lifted already by a lift naming it). Raises
    StateUnavailable when Redis does not answer within a few times ``state.timeout``."""
    from gatewayd.state.redis import RedisState  # noqa: PLC0415 - only the CLI on Redis

    timeout = settings.timeout.total_seconds()

    async def run() -> int:
        state = RedisState(settings.url, key_prefix=settings.key_prefix, timeout=timeout,
                           username=settings.username, password_file=settings.password_file,
                           ca_file=settings.ca_file, pool_size=1)
        try:
            async with asyncio.timeout(3 * timeout):
                [result] = await RedisBlocks(state).publish([change])
            return result
        except TimeoutError:
            raise StateUnavailable(f"redis: no answer within {3 * timeout:g}s") from None
        finally:
            with suppress(Exception):
                async with asyncio.timeout(timeout):
                    await state.close()

    return asyncio.run(run())


def for_state(state_dir: Path, state: object, *, redis: bool) -> UserBlocks:
    """The `UserBlocks` of a node whose state store is ``state`` (``redis``: the store is a
    `RedisState` and the list is shared; otherwise the file is the whole list)."""
    if not redis:
        return UserBlocks(state_dir)
    from gatewayd.state.redis import RedisState  # noqa: PLC0415 - only nodes on Redis load it

    if not isinstance(state, RedisState):
        raise TypeError(f"state.backend is redis but the store is {state!r}")
    return UserBlocks(state_dir, RedisBlocks(state))
