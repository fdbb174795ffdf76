"""`RedisSessions`: the session records every node shares, and the channel that says they changed.

This is the Redis half of `gatewayd.sessions_shared.SharedSessionRegistry` (which explains
the design as a whole); here is only what lives on the server and how it changes atomically.

**Keys** (behind ``state.key_prefix``; never a raw session id):

* ``s:<handle>`` — a hash: the session's record (`RECORD_FIELDS`). Times are wall-clock
  milliseconds of the Redis server (``TIME``), the one clock every node shares.
* ``id:<sha256 of the raw id>`` — the handle of the session that id names (the cookie →
  session lookup of another node). Both expire with the session: ``min(idle left, absolute
  left)`` plus `EXPIRY_GRACE`, refreshed whenever a node flushes activity.
* ``live`` — a sorted set of the handles (score: created), the index seats are counted on.
  Members whose record has vanished (a crashed deployment's leftovers) are dropped by the next
  admission.
* ``end:<handle>`` — why a session ended (10 minutes): a node that missed the message while
  Redis was away learns the reason when it re-validates.
* ``hb:<node>`` — the node's heartbeat: the random ``boot`` token of the running process,
  expiring after the heartbeat TTL (see `HEARTBEAT`); ``nodes`` — a sorted set of node names
  scored by when their heartbeat expires (what ``gatewayd_state_nodes`` counts);
  ``beats`` — a hash: node name → how many times it has beaten (never expires; see below).
* ``ssh:<boot>`` — a sorted set of the handles of the SSH (node-bound) sessions one process
  admitted, and ``bound`` — a sorted set of ``<boot>:<node>`` for every such set: what the
  heartbeat looks at instead of every session. `ADMIT` adds, every ending (``finish``)
  removes (and drops an emptied set), atomically with the record.
* ``outbox:<node>`` — a sorted set of the endings a node's scripts made that the node must
  audit (sessions it replaced or reaped), each ``{"r": reason, "rec": record}``, until the
  node acknowledges them in a heartbeat (expires 10 minutes after the last addition).

**Scripts.** Each change is one Lua script, so nodes racing on the same seats stay correct:
`ADMIT` counts the seats of every node, applies ``per_user`` (ending the user's oldest
sessions with ``replaced`` when asked — newest login wins) and writes the new record, all in
one step: 20 logins racing for 10 seats on two nodes admit exactly 10. `REFRESH` merges a
node's activity (last seen, step-up time, byte counters), decides idle/absolute expiry on the
server's clock, and extends the expiry; `END` ends a session exactly once (only the caller
that deleted it is told so — that node audits ``session.end``); `ROTATE` moves a session to a
new id; `HEARTBEAT` keeps a node alive and ends the node-bound sessions of dead nodes
(below); `CANCEL` undoes an admission whose answer was lost.
Every ending publishes ``{"op": "end", ...}`` and every change ``{"op": "up", ...}``
on the channel ``<prefix>sessions``.

**Expiry grace.** Records outlive their timeout by `EXPIRY_GRACE` so that a node's `REFRESH`
normally finds the expired session and ends it with its reason (and one ``session.end``
record) before Redis drops the keys silently; the keys' own TTL is only the safety net for a
deployment whose nodes are all gone.

**Dead nodes.** An SSH session lives in one node's process (its TCP connection); its record
holds that node's name and ``boot``, a token the process drew at start. Each node runs
`HEARTBEAT` every few seconds: it renews ``hb:<node>`` to its own boot token with a TTL and,
once it has itself been beating for a whole TTL (so that after a Redis outage every live
node has had its chance to beat again before anyone is judged), ends every SSH session whose
node's heartbeat is gone or names another boot — crashed, ``kill -9``, partitioned away,
or restarted under the same name. The script ends each with ``finish`` (so exactly one node
of the deployment audits ``session.end`` reason ``node_lost``); the seats are free at once.
Only the sets of SSH sessions per boot are read (``bound``: one entry per process with SSH
sessions), so a beat costs the same with 20,000 browser sessions as with none.

**Lost answers.** A script's answer may arrive after ``state.timeout`` (or never) although the
script ran. So the endings a node must audit do not travel in the answer alone: `ADMIT` and
`HEARTBEAT` also put them in the node's ``outbox``, every heartbeat returns the outbox, and
the node audits each member once (it remembers what it audited) and acknowledges it in its
next beat (removed then). An admission whose answer was lost is undone (`CANCEL`, repeated
until Redis answers): it ends the session if stored, else leaves a tombstone that makes the
late `ADMIT` refuse — the client was told the sign-in failed, so it must not hold a seat. A
node that dies between auditing and acknowledging may audit those endings again in its next
life under the same name (a second ``session.end``), never none (unless it stays away longer
than the outbox's 10 minutes).

**Clock steps.** All heartbeat arithmetic uses Redis ``TIME`` and ``PX``, so the nodes'
clocks never matter, but key expiry follows the Redis host's wall clock: a forward step
(an NTP step, a VM resumed) may expire every ``hb:`` key at once. A missing heartbeat alone
is therefore no verdict: the judging node must also have seen the node's beat count
(``beats``, returned by every heartbeat as ``watch``) stand still for a whole TTL on its own
monotonic clock, and passes the count it saw; the script reaps only if the count is still
that. A heartbeat that names another boot is a verdict by itself (a restart; no clock step
makes one).

Sessions admitted by a version without the per-boot sets (a rolling upgrade) are not in
them and are not reaped as ``node_lost``; their idle timeout ends them.

HTTPS sessions are not bound to a node (the browser may continue on
another) and are left alone. A restarted node draws a new boot token, so sessions of its
previous life are never taken for its own; a partitioned node that comes back learns from
the tombstone (``end:<handle>``) that its sessions ended.

All operations go through `RedisState` (bounded by ``state.timeout``, failures become
`StateUnavailable`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript

from gatewayd.state.redis import Observer, RedisState
from gatewayd.state.store import StateUnavailable

EXPIRY_GRACE: Final = 60.0  # seconds a record outlives its timeout (see the module docstring)
TOMBSTONE_MS: Final = 600_000
HEARTBEAT_INTERVAL: Final = 2.0  # seconds between a node's heartbeats (and dead-node checks)
MIN_HEARTBEAT_TTL: Final = 10.0  # seconds; see `heartbeat_ttl`


def heartbeat_ttl(timeout: float) -> float:
    """How long a node's heartbeat lives: ``max(10 s, 4 beats + 2 * state.timeout)``.

    Four missed beats (8 s) plus two of the slowest answers Redis may give (``state.timeout``,
    at most 5 s) before a live but slowed node could be taken for dead — a false verdict ends
    its SSH sessions, so this leans to the safe side; a crashed node's seats are free about
    ``TTL + HEARTBEAT_INTERVAL`` after its last beat (10 to 12 s with the default 1 s timeout).
    """
    return max(MIN_HEARTBEAT_TTL, 4 * HEARTBEAT_INTERVAL + 2 * timeout)

RECORD_FIELDS: Final = (
    "handle", "id", "user", "groups", "attributes", "frontend", "source_ip", "device",
    "device_user", "device_serial", "created", "last_seen", "mfa_at", "seat", "bytes_up",
    "bytes_down", "node", "boot",
)

# Shared Lua: the wall clock in ms, and ending a session (keys, index, tombstone, message).
_COMMON = """
local p = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function unbind(h, boot, node)
  local set = p .. 'ssh:' .. boot
  redis.call('ZREM', set, h)
  if redis.call('ZCARD', set) == 0 then
    redis.call('DEL', set)
    redis.call('ZREM', p .. 'bound', boot .. ':' .. node)
  end
end
local function finish(h, reason, node)
  local k = p .. 's:' .. h
  local f = redis.call('HMGET', k, 'id', 'frontend', 'boot', 'node')
  local id = f[1]
  if not id then return false end
  local record = redis.call('HGETALL', k)
  redis.call('DEL', k, p .. 'id:' .. id)
  redis.call('ZREM', p .. 'live', h)
  if f[2] == 'ssh' and f[3] and f[4] then unbind(h, f[3], f[4]) end
  redis.call('SET', p .. 'end:' .. h, reason, 'PX', TOMBSTONE_MS)
  redis.call('PUBLISH', p .. 'sessions',
             cjson.encode({op = 'end', h = h, r = reason, n = node}))
  return record
end
local function outbox(node, reason, record)
  local box = p .. 'outbox:' .. node
  local member = cjson.encode({r = reason, rec = record})
  redis.call('ZADD', box, now_ms(), member)
  redis.call('PEXPIRE', box, TOMBSTONE_MS)
  return member
end
""".replace("TOMBSTONE_MS", str(TOMBSTONE_MS))

# ARGV: prefix, node, max_concurrent, cap, replace_oldest (0/1), seat_of handle or '',
#       idle_ms, absolute_ms, grace_ms, heartbeat_ms, then the new record's field/value pairs
#       (with 'boot': the admitting process's token, whose heartbeat this renews — a session
#       admitted before the node's first beat must not look like a dead node's).
# Returns JSON: {"ok": seat, "created": ms, "replaced": [outbox member, ...]}
#            or {"refused": "seats_full" | "per_user" | "cancelled" (see `_CANCEL`)}.
# The replaced sessions also stay in ``outbox:<node>`` until the node acknowledges them (in a
# heartbeat), so that they are audited even if this answer is lost.
_ADMIT = _COMMON + """
local node, max_seats, cap = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local replace, seat_of = ARGV[5] == '1', ARGV[6]
local idle, absolute, grace = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local record = {}
for i = 11, #ARGV, 2 do record[ARGV[i]] = ARGV[i + 1] end
local user, h = record['user'], record['handle']
if redis.call('GET', p .. 'end:' .. h) then return cjson.encode({refused = 'cancelled'}) end
local seats, mine = {}, {}
for _, other in ipairs(redis.call('ZRANGE', p .. 'live', 0, -1)) do
  local f = redis.call('HMGET', p .. 's:' .. other, 'seat', 'user', 'created')
  if not f[1] then
    redis.call('ZREM', p .. 'live', other)
  else
    seats[f[1]] = (seats[f[1]] or 0) + 1
    if f[2] == user then table.insert(mine, {other, tonumber(f[3]), f[1]}) end
  end
end
local function count(t) local n = 0 for _ in pairs(t) do n = n + 1 end return n end
local function user_seats()
  local s = {}
  for _, m in ipairs(mine) do s[m[3]] = true end
  return count(s)
end
local seat = nil
if seat_of ~= '' then
  local f = redis.call('HMGET', p .. 's:' .. seat_of, 'seat', 'user')
  if f[1] and f[2] == user then seat = f[1] end
end
local replaced = {}
if not seat then
  if replace then
    table.sort(mine, function(a, b) return a[2] < b[2] end)
    while #mine > 0 and user_seats() >= cap do
      local oldest = table.remove(mine, 1)
      local gone = finish(oldest[1], 'replaced', node)
      if gone then table.insert(replaced, outbox(node, 'replaced', gone)) end
      seats[oldest[3]] = seats[oldest[3]] - 1
      if seats[oldest[3]] <= 0 then seats[oldest[3]] = nil end
    end
  end
  if count(seats) >= max_seats then return cjson.encode({refused = 'seats_full'}) end
  if user_seats() >= cap then return cjson.encode({refused = 'per_user'}) end
  seat = h
end
local now = now_ms()
record['seat'] = seat
record['created'], record['last_seen'] = now, now
record['mfa_at'] = math.min(now, tonumber(record['mfa_at'] or now))
local k = p .. 's:' .. h
for field, value in pairs(record) do redis.call('HSET', k, field, value) end
local ttl = math.min(idle, absolute) + grace
redis.call('PEXPIRE', k, ttl)
redis.call('SET', p .. 'id:' .. record['id'], h, 'PX', ttl)
redis.call('ZADD', p .. 'live', now, h)
if record['frontend'] == 'ssh' then
  redis.call('ZADD', p .. 'ssh:' .. record['boot'], now, h)
  redis.call('ZADD', p .. 'bound', 0, record['boot'] .. ':' .. node)
end
local beat = tonumber(ARGV[10])
redis.call('SET', p .. 'hb:' .. node, record['boot'], 'PX', beat)
redis.call('ZADD', p .. 'nodes', now + beat, node)
redis.call('HINCRBY', p .. 'beats', node, 1)
redis.call('PUBLISH', p .. 'sessions', cjson.encode({op = 'up', h = h, n = node}))
return cjson.encode({ok = seat, created = now, replaced = replaced})
"""

# ARGV: prefix, node, handle, last_seen_ms (0: none), mfa_at_ms (0: none), bytes up, bytes
#       down, idle_ms, absolute_ms, grace_ms.
# Returns JSON: {"gone": reason} | {"vanished": 1} (no record, no tombstone) |
#               {"expired": reason, "record": [...]} |
#               {"ok": 1, "last_seen": ms, "mfa_at": ms, "id": id_hash, "now": ms}.
_REFRESH = _COMMON + """
local node, h = ARGV[2], ARGV[3]
local k = p .. 's:' .. h
local f = redis.call('HMGET', k, 'created', 'last_seen', 'mfa_at', 'id')
if not f[1] then
  local reason = redis.call('GET', p .. 'end:' .. h)
  if reason then return cjson.encode({gone = reason}) end
  return cjson.encode({vanished = 1})
end
local idle, absolute, grace = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local now, created = now_ms(), tonumber(f[1])
local last = math.max(tonumber(f[2]), tonumber(ARGV[4]))
local mfa = math.max(tonumber(f[3]), tonumber(ARGV[5]))
local reason = nil
if now - created >= absolute then reason = 'expired'
elseif now - last >= idle then reason = 'idle_timeout' end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBY', k, 'bytes_up', ARGV[6]) end
if tonumber(ARGV[7]) > 0 then redis.call('HINCRBY', k, 'bytes_down', ARGV[7]) end
if reason then
  return cjson.encode({expired = reason, record = finish(h, reason, node)})
end
redis.call('HSET', k, 'last_seen', last, 'mfa_at', mfa)
local ttl = math.min(idle - (now - last), absolute - (now - created)) + grace
redis.call('PEXPIRE', k, ttl)
redis.call('PEXPIRE', p .. 'id:' .. f[4], ttl)
if tonumber(ARGV[5]) > tonumber(f[3]) then
  redis.call('PUBLISH', p .. 'sessions', cjson.encode({op = 'up', h = h, n = node}))
end
return cjson.encode({ok = 1, last_seen = last, mfa_at = mfa, id = f[4], now = now})
"""

# ARGV: prefix, node, handle, reason. Returns the record when this call ended it, else 0.
_END = _COMMON + """
local record = finish(ARGV[3], ARGV[4], ARGV[2])
if record then return record end
return 0
"""

# ARGV: prefix, node, handle, reason. A session that vanished without a tombstone (Redis lost
# its data, or no node refreshed it within the grace): the first caller writes the tombstone
# and gets {1, reason}; the others {0, the reason it holds}.
_CLAIM = _COMMON + """
local k = p .. 'end:' .. ARGV[3]
local held = redis.call('GET', k)
if held then return {0, held} end
redis.call('SET', k, ARGV[4], 'PX', TOMBSTONE_MS)
return {1, ARGV[4]}
""".replace("TOMBSTONE_MS", str(TOMBSTONE_MS))

# ARGV: prefix, node, handle, new id hash. Returns 1, or 0 when the session is gone.
_ROTATE = _COMMON + """
local h = ARGV[3]
local k = p .. 's:' .. h
local old = redis.call('HGET', k, 'id')
if not old then return 0 end
local ttl = redis.call('PTTL', k)
if ttl < 1 then ttl = 1000 end
redis.call('DEL', p .. 'id:' .. old)
redis.call('HSET', k, 'id', ARGV[4])
redis.call('SET', p .. 'id:' .. ARGV[4], h, 'PX', ttl)
redis.call('PUBLISH', p .. 'sessions', cjson.encode({op = 'up', h = h, n = ARGV[2]}))
return 1
"""

# ARGV: prefix, node, boot token, heartbeat_ms, reap (0/1), n, then n acknowledged members of
#       this node's outbox (audited: removed), then node/beat-count pairs the caller has seen
#       standing still for a whole TTL on its own clock.
# Renews this node's heartbeat and counts the beat; with reap = 1 ends (reason node_lost) the
# SSH sessions of every boot whose node's heartbeat names another boot, or is gone while the
# node's beat count is still the one the caller says stood still. Only the per-boot sets of
# SSH sessions are looked at (``bound``, ``ssh:<boot>``), never every session.
# Returns JSON: {"nodes": live node count, "previous": the boot token the key held ('' none),
#                "outbox": [member, ...] (this node's unacknowledged endings, the reaped ones
#                included), "watch": {node: beat count} (every other node with SSH sessions)}.
_HEARTBEAT = _COMMON + """
local node, boot, beat, reap = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local acks = tonumber(ARGV[6])
local key = p .. 'hb:' .. node
local previous = redis.call('GET', key) or ''
local now = now_ms()
redis.call('SET', key, boot, 'PX', beat)
redis.call('ZADD', p .. 'nodes', now + beat, node)
redis.call('ZREMRANGEBYSCORE', p .. 'nodes', '-inf', now)
redis.call('HINCRBY', p .. 'beats', node, 1)
local box = p .. 'outbox:' .. node
for i = 7, 6 + acks do redis.call('ZREM', box, ARGV[i]) end
local still = {}
for i = 7 + acks, #ARGV, 2 do still[ARGV[i]] = tonumber(ARGV[i + 1]) end
local held, watch = {}, {}
for _, member in ipairs(redis.call('ZRANGE', p .. 'bound', 0, -1)) do
  local b, n = string.match(member, '^([^:]*):(.*)$')
  if b then
    if held[n] == nil then held[n] = redis.call('GET', p .. 'hb:' .. n) or '' end
    local count = tonumber(redis.call('HGET', p .. 'beats', n) or '0')
    if n ~= node then watch[n] = count end
    local dead = held[n] ~= '' and held[n] ~= b
    if held[n] == '' and still[n] ~= nil and still[n] == count then dead = true end
    if reap and dead then
      local set = p .. 'ssh:' .. b
      for _, h in ipairs(redis.call('ZRANGE', set, 0, -1)) do
        local gone = finish(h, 'node_lost', node)
        if gone then outbox(node, 'node_lost', gone) end
      end
      redis.call('DEL', set)
      redis.call('ZREM', p .. 'bound', member)
    end
  end
end
return cjson.encode({nodes = redis.call('ZCARD', p .. 'nodes'), previous = previous,
                     outbox = redis.call('ZRANGE', box, 0, -1), watch = watch})
"""

# ARGV: prefix, node, handle. An admission whose answer never came (timed out): end the
# session if it was stored, else leave a tombstone so that a late `ADMIT` refuses it.
# Nobody audits it (the client was told the sign-in failed; no ``session.start`` was written).
_CANCEL = _COMMON + """
if not finish(ARGV[3], 'state_lost', ARGV[2]) and not redis.call('GET', p .. 'end:' .. ARGV[3])
then
  redis.call('SET', p .. 'end:' .. ARGV[3], 'state_lost', 'PX', TOMBSTONE_MS)
end
return 1
""".replace("TOMBSTONE_MS", str(TOMBSTONE_MS))

# ARGV: prefix, node, boot token. A clean stop: drop the heartbeat if it is still this
# process's (a successor under the same name may already have replaced it).
_DEPART = _COMMON + """
local key = p .. 'hb:' .. ARGV[2]
if redis.call('GET', key) == ARGV[3] then
  redis.call('DEL', key)
  redis.call('ZREM', p .. 'nodes', ARGV[2])
  return 1
end
return 0
"""


class Refused(Exception):  # noqa: N818 - a verdict, not a malfunction
    """`RedisSessions.admit` refused the session: ``why`` is ``seats_full`` or ``per_user``."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


Record = dict[str, str]
"""A session record as stored (`RECORD_FIELDS`, all strings; absent optional fields: '')."""


def _pairs(flat: Sequence[Any]) -> Record:
    """A Redis ``HGETALL``-style flat list (as Lua returns it) as a dict of strings."""
    items = [_text(item) for item in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_outboxed(member: str) -> tuple[str, Record]:
    """An outbox member (``{"r": reason, "rec": [field, value, ...]}``) as (reason, record);
    `ValueError` if it is not one."""
    try:
        entry = json.loads(member)
        reason, flat = entry["r"], entry["rec"]
        if not isinstance(reason, str) or not isinstance(flat, list) or len(flat) % 2:
            raise ValueError("not an outbox entry")
        return reason, _pairs(flat)
    except (KeyError, TypeError) as exc:
        raise ValueError("not an outbox entry") from exc


@dataclass(frozen=True)
class Beat:
    """What one `RedisSessions.heartbeat` found."""

    nodes: int  # live nodes (their heartbeats unexpired), this one included
    previous: str  # the boot token the node's key held before ('' none)
    # This node's unacknowledged endings (`parse_outboxed`): the sessions it replaced or
    # reaped, this call's reaped ones included. The node audits each once and acknowledges it.
    outbox: list[str]
    watch: dict[str, int]  # every other node with SSH sessions: its beat count now


class RedisSessions:
    """Session records and their change channel on the Redis of a `RedisState`."""

    def __init__(self, state: RedisState, *, node: str) -> None:
        self._state = state
        self.node = node
        # This process's token: a node restarted under the same name is another life.
        self.boot = secrets.token_hex(8)
        # Seconds between beats, and how long one lives (attributes: a test shortens them).
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        self.heartbeat_ttl = heartbeat_ttl(state.timeout)
        self.channel = state.key_prefix + "sessions"
        # The registry's timeouts (seconds), set by it before each call: a reload may change them.
        self.idle_timeout = 0.0
        self.absolute_timeout = 0.0
        redis = state.client
        self._admit: AsyncScript = redis.register_script(_ADMIT)
        self._refresh: AsyncScript = redis.register_script(_REFRESH)
        self._end: AsyncScript = redis.register_script(_END)
        self._rotate: AsyncScript = redis.register_script(_ROTATE)
        self._claim: AsyncScript = redis.register_script(_CLAIM)
        self._heartbeat: AsyncScript = redis.register_script(_HEARTBEAT)
        self._depart: AsyncScript = redis.register_script(_DEPART)
        self._cancel: AsyncScript = redis.register_script(_CANCEL)

    @property
    def client(self) -> Redis:
        return self._state.client

    @property
    def timeout(self) -> float:
        """``state.timeout``: the longest one operation may take."""
        return self._state.timeout

    async def ping(self) -> None:
        """Return when Redis answers (`StateUnavailable` if not)."""
        await self._state.check()

    def observe(self, observer: Observer) -> None:
        """Hear the outcome of every call on this Redis (`RedisState.observer`)."""
        self._state.observer = observer

    def report(self, operation: str, ok: bool) -> None:
        """Count a call made outside `RedisState.run` (the subscriber) like the others."""
        self._state.report(operation, ok)

    def pubsub(self) -> PubSub:
        """A subscriber connection for `channel` (the caller subscribes and closes it)."""
        return self._state.client.pubsub(ignore_subscribe_messages=True)

    # --- the scripts ---------------------------------------------------------------------------

    async def admit(self, record: Mapping[str, str], *, max_concurrent: int, cap: int,
                    replace_oldest: bool, seat_of: str | None
                    ) -> tuple[str, float, list[str]]:
        """Store a new session if the deployment's limits allow it (see `_ADMIT`).

        Returns ``(seat, created wall seconds, outbox members of the sessions it replaced)``;
        raises `Refused` or `StateUnavailable` (then the session may have been stored all
        the same: `cancel` it).
        """
        idle, absolute, grace = self._ms()
        args: list[str | int] = [self._state.key_prefix, self.node, max_concurrent, cap,
                                 int(replace_oldest), seat_of or "", idle, absolute, grace,
                                 round(self.heartbeat_ttl * 1000)]
        for name, value in {**record, "boot": self.boot}.items():
            args += [name, value]
        answer = await self._call(self._admit, args, "admit")
        if "refused" in answer:
            raise Refused(str(answer["refused"]))
        replaced = [_text(member) for member in answer.get("replaced") or []]
        return str(answer["ok"]), float(answer["created"]) / 1000, replaced

    async def cancel(self, handle: str) -> None:
        """Undo an admission whose answer was lost (see `_CANCEL`); idempotent."""
        await self._state.run(lambda: self._cancel(
            args=[self._state.key_prefix, self.node, handle]), "end")

    async def refresh(self, handle: str, *, last_seen: float, mfa_at: float, bytes_up: int,
                      bytes_down: int) -> dict[str, Any]:
        """Merge activity (wall seconds; 0: nothing new) into the record (see `_REFRESH`)."""
        idle, absolute, grace = self._ms()
        return await self._call(self._refresh, [
            self._state.key_prefix, self.node, handle, round(last_seen * 1000),
            round(mfa_at * 1000), bytes_up, bytes_down, idle, absolute, grace], "refresh")

    async def end(self, handle: str, reason: str) -> Record | None:
        """End the session; its last record when this call ended it (None: already gone)."""
        done = await self._state.run(lambda: self._end(
            args=[self._state.key_prefix, self.node, handle, reason]), "end")
        return _pairs(done) if isinstance(done, list) else None

    async def claim_end(self, handle: str, reason: str) -> tuple[bool, str]:
        """For a session that vanished: (True, reason) for the one caller that records why
        (it audits), (False, the recorded reason) for every other."""
        won, held = cast(list[Any], await self._state.run(lambda: self._claim(
            args=[self._state.key_prefix, self.node, handle, reason]), "end"))
        return bool(int(won)), _text(held)

    async def rotate(self, handle: str, id_hash: str) -> bool:
        done = await self._state.run(lambda: self._rotate(
            args=[self._state.key_prefix, self.node, handle, id_hash]), "rotate")
        return bool(int(cast(int, done)))

    async def heartbeat(self, *, reap: bool, acks: Collection[str] = (),
                        still: Mapping[str, int] | None = None) -> Beat:
        """Renew this node's heartbeat (see `_HEARTBEAT`).

        ``acks``: outbox members this node has audited (removed now). With ``reap``, end the
        SSH sessions of dead nodes: of another boot of their node, or of a node whose
        heartbeat is gone and whose beat count is still the one ``still`` names (the caller
        saw it stand still for a whole TTL on its own clock).
        """
        args: list[str | int] = [self._state.key_prefix, self.node, self.boot,
                                 round(self.heartbeat_ttl * 1000), int(reap), len(acks),
                                 *acks]
        for name, count in (still or {}).items():
            args += [name, count]
        answer = await self._call(self._heartbeat, args, "heartbeat")
        watch = answer.get("watch")
        return Beat(nodes=int(answer.get("nodes") or 0),
                    previous=str(answer.get("previous") or ""),
                    outbox=[_text(member) for member in answer.get("outbox") or []],
                    watch={str(k): int(v) for k, v in watch.items()}
                    if isinstance(watch, dict) else {})

    async def depart(self) -> bool:
        """A clean stop: remove this node's heartbeat (True if it was still this process's)."""
        done = await self._state.run(lambda: self._depart(
            args=[self._state.key_prefix, self.node, self.boot]), "heartbeat")
        return bool(int(cast(int, done)))

    # --- reading -------------------------------------------------------------------------------

    async def by_id(self, id_hash: str) -> Record | None:
        """The record the id hash names, or None."""
        handle = await self._state.run(lambda: self.client.get(self._key("id:" + id_hash)),
                                       "lookup")
        return None if handle is None else await self.by_handle(_text(handle))

    async def by_handle(self, handle: str) -> Record | None:
        raw = await self._state.run(lambda: cast(
            Awaitable[dict[Any, Any]], self.client.hgetall(self._key("s:" + handle))), "lookup")
        record = {_text(k): _text(v) for k, v in raw.items()}
        return record if "id" in record else None

    async def all(self) -> list[Record]:
        """Every live record (the index, then the records in one pipeline)."""
        async def read() -> list[Record]:
            handles = await self.client.zrange(self._key("live"), 0, -1)
            async with self.client.pipeline(transaction=False) as pipe:
                for handle in handles:
                    pipe.hgetall(self._key("s:" + _text(handle)))
                rows = await pipe.execute()
            return [record for raw in rows
                    if "id" in (record := {_text(k): _text(v) for k, v in raw.items()})]
        return await self._state.run(read, "lookup")

    async def end_reason(self, handle: str) -> str | None:
        raw = await self._state.run(lambda: self.client.get(self._key("end:" + handle)),
                                    "lookup")
        return None if raw is None else _text(raw)

    # --- internals -----------------------------------------------------------------------------

    def _ms(self) -> tuple[int, int, int]:
        if self.idle_timeout <= 0 or self.absolute_timeout <= 0:
            raise ValueError("the session timeouts are not set")
        return (round(self.idle_timeout * 1000), round(self.absolute_timeout * 1000),
                round(EXPIRY_GRACE * 1000))

    def _key(self, name: str) -> str:
        return self._state.key_prefix + name

    async def _call(self, script: AsyncScript, args: list[str | int], operation: str
                    ) -> dict[str, Any]:
        raw = await self._state.run(lambda: script(args=args), operation)
        try:
            answer = json.loads(_text(raw))
        except ValueError:
            raise StateUnavailable("redis: a session script answered something unexpected") \
                from None
        if not isinstance(answer, dict):
            raise StateUnavailable("redis: a session script answered something unexpected")
        return answer
