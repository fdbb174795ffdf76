"""`SharedSessionRegistry`: the session registry of one node of a multi-node deployment.

With ``state.backend = "redis"`` the sessions belong to the deployment, not to a node: a
browser behind a TCP load balancer may send each request to another node, seats and per-user
caps count every node's sessions, and a session ended on one node (logout, admin kill, user
disable, device revoke, directory revocation, expiry) closes its WebSockets, tunnels and SSH
connections on every node. The single-node registry (`gatewayd.sessions.SessionRegistry`,
``state.backend = "memory"``) is untouched by this: its lookup stays a dict lookup.

**Design: a replica per node, Redis as the truth.** This class *is* a `SessionRegistry` (same
public API, so the frontends, the admin socket and the emergency stop need no second code
path); its dicts hold a replica of every live session of the deployment, kept current from
Redis (`gatewayd.state.sessions.RedisSessions`):

* **Creating** (`admit`, the async form the frontends call) runs one Lua script that counts
  the seats of all nodes, applies ``per_user`` (newest login wins: it ends the user's oldest
  sessions with ``replaced``) and stores the record — atomic across nodes. The record is keyed
  by the handle; the cookie's SHA-256 points to it (never the raw id). Its times are wall
  clock (the Redis server's): each node converts to and from its own monotonic clock, which
  the rest of the gateway keeps using.
* **Resolving** (`get`) stays a local dict lookup. The HTTPS frontend first awaits `prepare`
  for the request's cookies: an id this node does not know yet (signed in on another node a
  moment ago), a session that looks expired here (its activity on other nodes not yet merged),
  or any session while this node's replica is older than ``state.session_cache`` is fetched
  from Redis first. While Redis cannot answer, a replica within ``session_cache`` keeps
  serving; after that `prepare` raises `StateUnavailable` and the request gets 503
  "temporarily unavailable" — never a session Redis may have ended meanwhile.
* **Changes** reach every node over pub/sub (``<prefix>sessions``): ``up`` (a new, rotated or
  stepped-up session: re-read it) and ``end`` (close it here). A node writes its own activity
  (last seen, step-up time, bytes) at most every `SYNC_INTERVAL` seconds per session — not
  a Redis write per request — which also extends the record's expiry; Redis decides idle and
  absolute expiry on its clock, once.
* **Ending** (`end`) closes the session here at once (unindex, closers), then ends it in
  Redis; the node whose script actually ended it writes the one ``session.end`` audit record
  (``on_end``); every other node, told by the channel, runs its closers and ``on_remote_end``
  (gauges, SSH certificate revocation) without auditing. If Redis is down, the ending node
  audits anyway and sends the end once Redis answers again.
* **Outage and recovery.** The subscriber reconnects by itself (and pings a channel that has
  been quiet, so a connection that died without a word is noticed); after every (re)subscribe the
  replica is re-validated against Redis (`resync`): what is gone there is closed here (a kill
  published while Redis was down could not be delivered), what is new is loaded. A resync
  also runs every `RESYNC_INTERVAL`, so the replica converges whatever was missed.
* **Stopping a node** (``end_all("shutdown")``) ends only what dies with it — its SSH
  connections; HTTPS sessions stay in Redis for the other nodes (the node merely closes its
  WebSockets). Then (`close`) it removes its heartbeat.
* **A node that dies** without stopping (crash, ``kill -9``, power, partition) stops renewing
  its heartbeat (``hb:<node>``, every `gatewayd.state.sessions.HEARTBEAT_INTERVAL` = 2 s, TTL
  `gatewayd.state.sessions.heartbeat_ttl`: ``max(10 s, 8 s + 2 * state.timeout)``). Its SSH
  sessions — bound to its TCP connections, so over with it — are then ended by the first
  surviving node whose heartbeat script finds them (atomically: exactly one node writes
  ``session.end`` reason ``node_lost``), so their seats are free about TTL + 2 s after the
  node's last beat, not after the idle timeout. Its HTTPS sessions continue (the browser
  simply reaches another node). A node judges others only after beating for a whole TTL
  itself, so after a Redis outage every live node has renewed its heartbeat first; a node
  restarted under the same name is a new "boot" and never adopts its previous life's
  sessions (they are ended as ``node_lost`` too); a partitioned node that comes back finds
  its reaped sessions' tombstones and closes them. A node whose heartbeat key is gone is
  judged only if its beat count also stood still for a TTL on the judge's own monotonic
  clock (a wall-clock step of the Redis host may expire every key at once; see
  `gatewayd.state.sessions`). The endings a node's scripts make (reaped, and replaced by its
  admissions) come back in every heartbeat until acknowledged, so a lost answer never loses
  their ``session.end``; an admission whose answer was lost is undone (the client was told
  it failed). The heartbeat also counts the live nodes (`live_nodes`, the
  ``gatewayd_state_nodes`` gauge): 0 until this node's first beat (a moment after start),
  and during an outage the count of the last beat that succeeded (it is not reset).

A session that vanished from Redis without a word why (Redis lost its data in a restart
without persistence) ends everywhere too, with reason ``state_lost`` (or its timeout, if it
was due), recorded by the one node that claims it first.

Known edges: two nodes that decide the same explicit end at the same moment (both refreshing
the directory) write ``session.end`` once, but a node that could not reach Redis may write a
second one after an outage; an SSH certificate sign-in within milliseconds of its portal
sign-in on another node may not find the portal session in the replica yet (`by_handle` is
synchronous) and take a seat of its own; a node that stops while Redis is down cannot end
its SSH sessions there nor remove its heartbeat, so a survivor later ends them again as
``node_lost`` (a second ``session.end`` for those sessions); a node stalled (not crashed)
for longer than the heartbeat TTL has its SSH sessions ended by the others — it closes them
when it wakes; a node that dies after auditing an ending from its outbox but before
acknowledging it audits it again in its next run under the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import RedisError

from gatewayd.identity.principal import Principal
from gatewayd.sessions import (
    END_REASONS,
    Frontend,
    PerUserLimit,
    SeatsFull,
    Session,
    SessionRegistry,
    hash_session_id,
)
from gatewayd.state.sessions import Beat, Record, RedisSessions, Refused, parse_outboxed
from gatewayd.state.store import StateUnavailable
from gatewayd.tasks import cancel_and_wait, within

log = logging.getLogger(__name__)


def _flat(value: object) -> Record | None:
    """A record as a script returned it inside JSON (a flat field/value list), or None."""
    if not isinstance(value, list) or len(value) % 2:
        return None
    return {str(k): str(v) for k, v in zip(value[::2], value[1::2], strict=True)}

SYNC_INTERVAL: Final = 2.0  # seconds between a node's activity writes (and expiry checks)
RESYNC_INTERVAL: Final = 30.0  # seconds between full re-validations of the replica
RECONNECT_DELAY: Final = 0.5  # seconds between subscriber reconnection attempts
PING_INTERVAL: Final = 5.0  # seconds of silence on the channel before the subscriber pings
CHANNEL_SILENCE: Final = 5.0  # seconds a ping may go unanswered before it reconnects
MAX_COOKIES: Final = 4  # cookie values `prepare` looks at (as gatewayd.https.auth tries)
ID_LENGTH: Final = 43  # a raw id's length (32 bytes, URL-safe base64)


@dataclass
class _Synced:
    """What Redis has of one session, as far as this node knows (monotonic seconds)."""

    node: str  # the node that created it (its SSH connection, if any, lives there)
    last_seen: float
    mfa_at: float
    bytes_up: int
    bytes_down: int


class SharedSessionRegistry(SessionRegistry):
    """A `SessionRegistry` whose sessions live in Redis (see the module docstring)."""

    def __init__(
        self,
        store: RedisSessions,
        *,
        idle_timeout: float,
        absolute_timeout: float,
        max_concurrent: int,
        per_user: int,
        clock: Callable[[], float],
        wall: Callable[[], float],
        on_end: Callable[[Session, str], None],
        on_remote_end: Callable[[Session, str], None],
        cache_time: float,
        cap_for: Callable[[Principal], int] | None = None,
        on_remote_start: Callable[[Session], None] | None = None,
    ) -> None:
        """``on_remote_end(session, reason)``: another node ended (and audited) a session
        this node had; ``on_remote_start(session)``: one made elsewhere joined the replica
        (gauges: they count the deployment's sessions on every node)."""
        super().__init__(idle_timeout=idle_timeout, absolute_timeout=absolute_timeout,
                         max_concurrent=max_concurrent, per_user=per_user, clock=clock,
                         on_end=on_end, cap_for=cap_for)
        self.store = store
        self.node = store.node
        self.cache_time = cache_time
        self._wall = wall
        self._on_remote_end = on_remote_end
        self._on_remote_start = on_remote_start
        self._by_handle: dict[str, Session] = {}
        self._synced: dict[str, _Synced] = {}
        self._rotating: set[str] = set()  # handles whose new id Redis does not have yet
        self._unsent_ends: dict[str, str] = {}  # handle -> reason, ended while Redis was down
        self._unsent_cancels: set[str] = set()  # handles of admissions whose answer was lost
        self._audited: set[str] = set()  # outbox members audited here, maybe not yet removed
        self._foreign = False  # another process beats as this node (logged once)
        self._confirmed = float("-inf")  # when Redis last confirmed the whole replica
        self._subscribed = False
        self._channel_lost = False  # logged as lost, not yet subscribed again
        self._writes: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self.live_nodes = 0  # nodes whose heartbeat was live at this node's last beat

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the subscriber and the sync loop (named tasks, kept until `close`)."""
        loop = asyncio.get_running_loop()
        self._heartbeat = loop.create_task(self._heartbeat_forever(),
                                           name="gatewayd.sessions.heartbeat")
        self._loops = [
            loop.create_task(self._listen_forever(), name="gatewayd.sessions.subscriber"),
            loop.create_task(self._sync_forever(), name="gatewayd.sessions.sync"),
            self._heartbeat,
        ]

    async def close(self) -> None:
        """Let pending writes (ends of this node's sessions) finish, remove this node's
        heartbeat, then stop the loops.

        Each write gives up after ``state.timeout`` and then audits anyway, so waiting a
        little longer than that never loses a ``session.end`` record. The heartbeat goes
        last: while it lives, no other node ends this node's SSH sessions as ``node_lost``.
        """
        if self._heartbeat is not None:  # stopped first: it would renew what we remove
            await cancel_and_wait([self._heartbeat])
        if self._writes:
            with contextlib.suppress(TimeoutError):
                await within(asyncio.wait(set(self._writes)), self.store.timeout + 1.0)
        if self._heartbeat is not None:
            try:
                await self.store.depart()
            except StateUnavailable:
                log.warning("node heartbeat not removed (state store unavailable); the other "
                            "nodes will take this node for crashed when it expires")
            self._heartbeat = None
        await cancel_and_wait([*self._loops, *self._writes])
        self._loops = []

    @property
    def in_sync(self) -> bool:
        """The replica is current (subscribed, confirmed by Redis within ``cache_time``)."""
        return self._subscribed and self._fresh(self._clock())

    # --- creating and resolving ----------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        *,
        frontend: Frontend,
        source_ip: str,
        device: str | None = None,
        device_user: str | None = None,
        now: float | None = None,
        replace_oldest: bool = False,
        seat_of: Session | None = None,
        device_serial: int | None = None,
        mfa_at: float | None = None,
    ) -> tuple[str, Session]:
        """Not here: a seat cannot be counted without asking Redis (use `admit`)."""
        raise RuntimeError("shared sessions are created with `await admit(...)`")

    async def admit(
        self,
        principal: Principal,
        *,
        frontend: Frontend,
        source_ip: str,
        device: str | None = None,
        device_user: str | None = None,
        replace_oldest: bool = False,
        seat_of: Session | None = None,
        device_serial: int | None = None,
        mfa_at: float | None = None,
    ) -> tuple[str, Session]:
        """Create a session if the deployment's seats and the user's cap allow it.

        Raises `SeatsFull`, `PerUserLimit`, or `StateUnavailable` (fail closed: no seat can be
        counted without Redis).
        """
        cap = self.user_cap(principal)
        self._timeouts()
        raw_id, id_hash = self._new_id()
        handle = secrets.token_hex(8)
        shares = (seat_of.handle if seat_of is not None and seat_of.ended is None
                  and seat_of.user == principal.user else None)
        record = {
            "handle": handle, "id": id_hash, "user": principal.user,
            "groups": json.dumps(sorted(principal.groups)),
            "attributes": json.dumps(dict(principal.attributes)), "frontend": frontend,
            "source_ip": source_ip, "device": device or "", "device_user": device_user or "",
            "device_serial": "" if device_serial is None else str(device_serial),
            "bytes_up": "0", "bytes_down": "0", "node": self.node,
        }
        if mfa_at is not None:  # an earlier TOTP check (see SessionRegistry.create)
            record["mfa_at"] = str(round((mfa_at + self._offset()) * 1000))
        try:
            seat, _, replaced = await self.store.admit(
                record, max_concurrent=self.max_concurrent, cap=cap,
                replace_oldest=replace_oldest, seat_of=shares)
        except Refused as refused:
            if refused.why == "seats_full":
                raise SeatsFull(self.max_concurrent) from None
            raise PerUserLimit(cap) from None
        except StateUnavailable:
            # The script may have run all the same (only its answer lost): the caller is told
            # the sign-in failed, so the session must not keep a seat. Undone now or by the
            # sync loop once Redis answers; the sessions it replaced reach the heartbeat's
            # outbox (and are audited here) either way.
            self._unsent_cancels.add(handle)
            self._write(self._send_cancel(handle), "cancel")
            raise
        now = self._clock()
        self._confirm_one()
        for member in replaced:
            self._outboxed(member)
        session = Session(
            id_hash=id_hash, principal=principal, frontend=frontend, source_ip=source_ip,
            device=device, device_user=device_user, created=now, last_seen=now,
            # An SSH certificate's MFA is older than this sign-in (`SessionRegistry.create`);
            # the admit script stores the same (never later than its own now).
            mfa_at=now if mfa_at is None else min(now, mfa_at),
            handle=handle, seat=None if seat == handle else seat, device_serial=device_serial,
            _seat_holder=seat_of if seat != handle else None)
        self._index(session, _Synced(self.node, now, session.mfa_at, 0, 0))
        return raw_id, session

    def get(self, raw_id: str) -> Session | None:
        """The live session for a raw id, from the replica (`prepare` refreshed it).

        A session that looks expired here is not ended here: Redis decides (the sync loop),
        so that it ends once with one audit record, with activity of every node counted.
        """
        if not raw_id:
            return None
        session = self._by_hash.get(hash_session_id(raw_id))
        if session is None or self._expiry_reason(session, self._clock()) is not None:
            return None
        return session

    def by_handle(self, handle: str) -> Session | None:
        exact = self._by_handle.get(handle.lower())
        return exact if exact is not None else super().by_handle(handle)

    async def prepare(self, raw_ids: Iterable[str]) -> None:
        """Make the replica answer for these cookie values (see the module docstring).

        Raises `StateUnavailable` when a session must be checked and Redis cannot answer.
        """
        now = self._clock()
        for raw_id in list(raw_ids)[:MAX_COOKIES]:
            if len(raw_id) != ID_LENGTH:
                continue
            id_hash = hash_session_id(raw_id)
            session = self._by_hash.get(id_hash)
            if session is not None and (session.handle in self._rotating or (
                    self._fresh(now) and self._expiry_reason(session, now) is None)):
                continue
            await self._load(id_hash, session)

    def rotate(self, session: Session) -> str:
        raw_id = super().rotate(session)
        self._rotating.add(session.handle)
        self._write(self._send_rotation(session), "rotate")
        return raw_id

    def mark_mfa(self, session: Session) -> None:
        super().mark_mfa(session)
        if session.ended is None:  # other nodes must see the step-up now, not in seconds
            self._write(self._sync_one(session), "mfa")

    # --- ending --------------------------------------------------------------------------------

    def end(self, session: Session, reason: str) -> None:
        """Close the session here now; end it in Redis (and audit it once) right after."""
        if reason not in END_REASONS:
            raise ValueError(f"unknown session end reason {reason!r}")
        if session.ended is not None:
            return
        synced = self._synced.get(session.handle)
        if reason == "shutdown" and not (
                session.frontend == "ssh" and synced is not None and synced.node == self.node):
            self._close_here(session, reason)  # lives on in Redis, for the other nodes
            return
        unflushed = self._unflushed(session)
        self._close_here(session, reason)
        self._write(self._send_end(session, reason, unflushed), "end")

    def sweep(self, now: float | None = None) -> int:
        """Nothing here: Redis decides expiry (the sync loop), so a session ends once."""
        return 0

    # --- internals: the replica ----------------------------------------------------------------

    def _timeouts(self) -> None:
        """Hand the current timeouts to the store (a reload may have changed them)."""
        self.store.idle_timeout = self.idle_timeout
        self.store.absolute_timeout = self.absolute_timeout

    def _fresh(self, now: float) -> bool:
        return now - self._confirmed < self.cache_time

    def _confirm_one(self) -> None:
        """A Redis call succeeded: with the channel up, the replica is current."""
        if self._subscribed:
            self._confirmed = self._clock()

    def _offset(self) -> float:
        """Wall seconds minus monotonic seconds, now (to convert Redis times)."""
        return self._wall() - self._clock()

    def _index(self, session: Session, synced: _Synced) -> None:
        self._by_hash[session.id_hash] = session
        self._by_user.setdefault(session.user, []).append(session)
        self._seats[session.seat_key] = self._seats.get(session.seat_key, 0) + 1
        self._by_handle[session.handle] = session
        self._synced[session.handle] = synced

    def _unindex(self, session: Session) -> None:
        super()._unindex(session)
        if self._by_handle.get(session.handle) is session:
            del self._by_handle[session.handle]
            self._synced.pop(session.handle, None)

    def _close_here(self, session: Session, reason: str) -> None:
        """End the local copy: unindex, run its closers (no audit)."""
        session.ended = reason
        self._unindex(session)
        closers, session._closers = session._closers, []
        for closer in closers:
            try:
                closer(reason)
            except Exception:
                log.exception("session closer failed", extra={"session": session.handle})

    def _ended_elsewhere(self, session: Session, reason: str) -> None:
        if session.ended is not None:
            return
        self._close_here(session, reason if reason in END_REASONS else "expired")
        self._hook(self._on_remote_end, session, reason)

    def _ended_by_us(self, session: Session, reason: str) -> None:
        if session.ended is None:
            self._close_here(session, reason)
        self._hook(self._on_end, session, reason)

    def _hook(self, hook: Callable[[Session, str], None], session: Session, reason: str) -> None:
        try:
            hook(session, reason)
        except Exception:
            log.exception("session end hook failed", extra={"session": session.handle})

    def _from_record(self, record: Record) -> tuple[Session, _Synced]:
        offset = self._offset()

        def mono(field: str) -> float:
            return float(record.get(field) or 0) / 1000 - offset

        principal = Principal(user=record["user"],
                              groups=frozenset(json.loads(record.get("groups") or "[]")),
                              attributes=json.loads(record.get("attributes") or "{}"))
        handle = record["handle"]
        seat = record.get("seat") or handle
        serial = record.get("device_serial") or ""
        frontend: Frontend = "ssh" if record.get("frontend") == "ssh" else "https"
        session = Session(
            id_hash=record["id"], principal=principal, frontend=frontend,
            source_ip=record.get("source_ip", ""), device=record.get("device") or None,
            device_user=record.get("device_user") or None, created=mono("created"),
            last_seen=mono("last_seen"), mfa_at=mono("mfa_at"), handle=handle,
            bytes_up=int(record.get("bytes_up") or 0),
            bytes_down=int(record.get("bytes_down") or 0),
            seat=None if seat == handle else seat,
            device_serial=int(serial) if serial.isdigit() else None,
            _seat_holder=None if seat == handle else self._by_handle.get(seat))
        synced = _Synced(record.get("node", ""), session.last_seen, session.mfa_at,
                         session.bytes_up, session.bytes_down)
        return session, synced

    def _upsert(self, record: Record) -> Session:
        """Add a record to the replica, or merge it into the session this node has."""
        fresh, synced = self._from_record(record)
        session = self._by_handle.get(fresh.handle)
        if session is None:
            self._index(fresh, synced)
            if self._on_remote_start is not None:
                try:
                    self._on_remote_start(fresh)
                except Exception:
                    log.exception("session start hook failed", extra={"session": fresh.handle})
            return fresh
        if session.id_hash != fresh.id_hash and session.handle not in self._rotating:
            del self._by_hash[session.id_hash]  # rotated on another node
            session.id_hash = fresh.id_hash
            self._by_hash[session.id_hash] = session
        self._merge(session, fresh.last_seen, fresh.mfa_at)
        return session

    def _merge(self, session: Session, last_seen: float, mfa_at: float) -> None:
        session.last_seen = max(session.last_seen, last_seen)
        session.mfa_at = max(session.mfa_at, mfa_at)
        synced = self._synced.get(session.handle)
        if synced is not None:
            synced.last_seen = max(synced.last_seen, last_seen)
            synced.mfa_at = max(synced.mfa_at, mfa_at)

    def _replaced(self, record: Record) -> None:
        """This node's admission replaced a session (maybe another node's): audit it here."""
        session = self._by_handle.get(record.get("handle", ""))
        if session is None:
            session, _ = self._from_record(record)
        self._take_totals(session, record, self._unflushed(session))
        self._ended_by_us(session, "replaced")

    async def _load(self, id_hash: str, session: Session | None) -> None:
        """Fetch the session an id names from Redis into the replica (`prepare`)."""
        record = await self.store.by_id(id_hash)
        if record is None:
            if session is not None and session.ended is None and session.id_hash == id_hash:
                if session.handle in self._rotating:
                    return
                await self._sync_one(session)  # ended, or rotated elsewhere: find out
            return
        current = self._upsert(record)
        if self._expiry_reason(current, self._clock()) is not None:
            await self._sync_one(current)  # Redis decides, and ends it once if due

    # --- internals: writing --------------------------------------------------------------------

    def _write(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"gatewayd.sessions.{what}")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _send_end(self, session: Session, reason: str,
                        unflushed: tuple[int, int]) -> None:
        try:
            ended = await self.store.end(session.handle, reason)
        except StateUnavailable:
            # Audit now (the end happened here); tell Redis, and so the others, once it answers.
            self._unsent_ends[session.handle] = reason
            self._hook(self._on_end, session, reason)
            return
        self._confirm_one()
        if ended is None:
            self._hook(self._on_remote_end, session, reason)
            return
        self._take_totals(session, ended, unflushed)
        self._hook(self._on_end, session, reason)

    async def _send_cancel(self, handle: str) -> None:
        with contextlib.suppress(StateUnavailable):  # the sync loop tries again
            await self.store.cancel(handle)
            self._unsent_cancels.discard(handle)

    async def _send_rotation(self, session: Session) -> None:
        try:
            await self.store.rotate(session.handle, session.id_hash)
        except StateUnavailable:
            log.warning("session %s: new id not stored (state store unavailable); other "
                        "nodes keep the old one until the next resync", session.handle)
        finally:
            self._rotating.discard(session.handle)

    async def _sync_one(self, session: Session) -> None:
        """Write this node's news of a session and take Redis's verdict on it."""
        synced = self._synced.get(session.handle)
        if synced is None or session.ended is not None:
            return
        offset = self._offset()
        last_seen = session.last_seen if session.last_seen > synced.last_seen else None
        mfa_at = session.mfa_at if session.mfa_at > synced.mfa_at else None
        up, down = session.bytes_up - synced.bytes_up, session.bytes_down - synced.bytes_down
        self._timeouts()
        answer = await self.store.refresh(
            session.handle, last_seen=0 if last_seen is None else last_seen + offset,
            mfa_at=0 if mfa_at is None else mfa_at + offset, bytes_up=max(0, up),
            bytes_down=max(0, down))
        self._confirm_one()
        synced.bytes_up, synced.bytes_down = session.bytes_up, session.bytes_down
        if "gone" in answer:
            self._ended_elsewhere(session, str(answer["gone"]))
        elif "vanished" in answer:
            await self._vanished(session)
        elif "expired" in answer:  # its bytes, ours included, are in the record now
            self._take_totals(session, _flat(answer.get("record")), (0, 0))
            self._ended_by_us(session, str(answer["expired"]))
        else:
            self._merge(session, float(answer["last_seen"]) / 1000 - offset,
                        float(answer["mfa_at"]) / 1000 - offset)
            if answer.get("id") and answer["id"] != session.id_hash:
                self._upsert_id(session, str(answer["id"]))

    def _unflushed(self, session: Session) -> tuple[int, int]:
        """Bytes of this session this node has counted but not yet written to Redis."""
        synced = self._synced.get(session.handle)
        if synced is None:
            return 0, 0
        return (max(0, session.bytes_up - synced.bytes_up),
                max(0, session.bytes_down - synced.bytes_down))

    @staticmethod
    def _take_totals(session: Session, record: Record | None,
                     unflushed: tuple[int, int]) -> None:
        """The deployment's byte counts of an ending session (for its ``session.end``)."""
        if record is None:
            return
        session.bytes_up = max(session.bytes_up,
                               int(record.get("bytes_up") or 0) + unflushed[0])
        session.bytes_down = max(session.bytes_down,
                                 int(record.get("bytes_down") or 0) + unflushed[1])

    def _upsert_id(self, session: Session, id_hash: str) -> None:
        if session.handle in self._rotating or self._by_hash.get(session.id_hash) is not session:
            return
        del self._by_hash[session.id_hash]
        session.id_hash = id_hash
        self._by_hash[id_hash] = session

    def _due(self, session: Session, now: float) -> bool:
        """Worth a write: news since the last one, or it looks expired here."""
        synced = self._synced.get(session.handle)
        if synced is None:
            return False
        return (session.last_seen > synced.last_seen or session.mfa_at > synced.mfa_at
                or session.bytes_up != synced.bytes_up
                or session.bytes_down != synced.bytes_down
                or self._expiry_reason(session, now) is not None)

    async def sync(self) -> None:
        """One round of the sync loop: unsent ends, then every session with news."""
        for handle, reason in list(self._unsent_ends.items()):
            await self.store.end(handle, reason)
            self._unsent_ends.pop(handle, None)
        for handle in list(self._unsent_cancels):
            await self.store.cancel(handle)
            self._unsent_cancels.discard(handle)
        now = self._clock()
        due = [s for s in list(self._by_hash.values()) if self._due(s, now)]
        for session in due:
            await self._sync_one(session)
        if not due:
            await self.store.ping()
            self._confirm_one()

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except StateUnavailable:
                pass  # RedisState logged the transition; the replica ages (`cache_time`)
            except Exception:
                log.exception("session sync failed")

    async def resync(self) -> None:
        """Re-validate the whole replica against Redis: load the new, close the gone."""
        known = dict(self._by_handle)  # before reading: sessions admitted later are not gone
        records = await self.store.all()
        present = {record["handle"] for record in records}
        for record in records:
            self._upsert(record)
        for handle, session in known.items():
            if handle not in present and handle not in self._unsent_ends:
                reason = await self.store.end_reason(handle)
                if reason is None:
                    await self._vanished(session)
                else:
                    self._ended_elsewhere(session, reason)
        self._confirm_one()

    async def _vanished(self, session: Session) -> None:
        """Redis has neither the session nor why it ended (its data was lost, or no node
        could refresh it in time): end it everywhere, audited by the one node that says why."""
        reason = self._expiry_reason(session, self._clock()) or "state_lost"
        won, reason = await self.store.claim_end(session.handle, reason)
        if session.ended is not None:  # ended here meanwhile (and recorded then)
            return
        if won:
            self._ended_by_us(session, reason)
        else:
            self._ended_elsewhere(session, reason)

    # --- internals: the heartbeat --------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        """Beat every ``heartbeat_interval``; judge the other nodes once beating for a TTL.

        On the loop's clock (real seconds), not the registry's: a test's fake clock must not
        make a node look dead. A gap in this node's own beats longer than the TTL (Redis
        away, the loop stalled) starts the streak over: the others may not have been able to
        beat either.

        A node whose heartbeat key is gone is judged dead only if its beat count (in Redis)
        also stood still for a whole TTL on this node's own monotonic clock: a step of the
        Redis host's wall clock may expire every heartbeat key at once, but it does not stop
        the counts of the live nodes. Everything a beat brings is handled inside the guard:
        nothing in it may end this task (the other nodes would then take this node for dead).
        """
        loop = asyncio.get_running_loop()
        ttl = self.store.heartbeat_ttl
        streak: float | None = None  # when the current unbroken run of beats began
        last_beat = float("-inf")
        first = True
        # node -> (its beat count, when this node first saw that count), on the loop's clock
        counts: dict[str, tuple[int, float]] = {}
        while True:
            now = loop.time()
            if streak is not None and now - last_beat > ttl:
                streak = None
            if streak is None:
                counts.clear()  # seen before a gap: not evidence of standing still
            try:
                judge = streak is not None and now - streak >= ttl
                still = {name: count for name, (count, since) in counts.items()
                         if now - since >= ttl} if judge else {}
                acks = set(self._audited)
                beat = await self.store.heartbeat(reap=judge, acks=acks, still=still)
                if streak is None:
                    streak = now
                last_beat = now
                seen = loop.time()
                for name, count in beat.watch.items():
                    if counts.get(name, (None, 0.0))[0] != count:
                        counts[name] = (count, seen)
                for name in set(counts) - set(beat.watch):
                    del counts[name]
                self._after_beat(beat, acks, first=first)
                first = False
            except asyncio.CancelledError:
                raise
            except StateUnavailable:
                streak = None  # RedisState logged the transition
            except Exception:
                streak = None
                log.exception("node heartbeat failed")
            await asyncio.sleep(self.store.heartbeat_interval)

    def _after_beat(self, beat: Beat, acks: set[str], *, first: bool) -> None:
        self.live_nodes = beat.nodes
        foreign = bool(beat.previous) and beat.previous != self.store.boot
        if foreign and first:
            log.info("node %s restarted: the SSH sessions of its previous run end "
                     "(node_lost)", self.node)
        elif foreign and not self._foreign:
            log.warning("another gatewayd process runs as node %s (its heartbeat replaced "
                        "ours): gateway.node must be unique per node", self.node)
        self._foreign = foreign and not first
        waiting = set(beat.outbox)
        self._audited -= acks - waiting  # acknowledged: Redis no longer has them
        for member in beat.outbox:
            self._outboxed(member)

    def _outboxed(self, member: str) -> None:
        """An ending this node's script made (a replaced or reaped session): audit it here,
        once per member (the heartbeat then acknowledges it). A malformed one is skipped."""
        if member in self._audited:
            return
        self._audited.add(member)
        try:
            reason, record = parse_outboxed(member)
            if reason == "replaced":
                self._replaced(record)
            else:
                self._reaped(record, reason)
        except Exception:
            log.exception("ignoring a malformed session ending from the state store")

    def _reaped(self, record: Record, reason: str) -> None:
        """This node's heartbeat ended a dead node's SSH session: audit it here (once)."""
        session = self._by_handle.get(record.get("handle", ""))
        if session is None:
            session, _ = self._from_record(record)
        self._take_totals(session, record, (0, 0))
        log.warning("session %s of user %s ended: its node %s stopped answering",
                    session.handle, session.user, record.get("node", "?"))
        self._ended_by_us(session, reason if reason in END_REASONS else "node_lost")

    # --- internals: the channel ----------------------------------------------------------------

    async def _listen_forever(self) -> None:
        """Subscribe, re-validate, then apply every message; reconnect whenever it breaks.

        The loss is logged once per outage (`_listen` logs the return)."""
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, StateUnavailable) as exc:
                if not isinstance(exc, StateUnavailable):  # those were counted where raised
                    self.store.report("subscribe", False)
                if not self._channel_lost:
                    self._channel_lost = True
                    log.warning("session channel lost (%s); reconnecting", exc)
            except Exception:
                log.exception("session channel failed; reconnecting")
            self._subscribed = False
            await asyncio.sleep(RECONNECT_DELAY)

    async def _listen(self) -> None:
        pubsub = self.store.pubsub()
        # Intervals on the loop's clock: the registry's clock may be a test's frozen fake.
        loop = asyncio.get_running_loop()
        try:
            await within(pubsub.subscribe(self.store.channel), self.store.timeout)
            self.store.report("subscribe", True)
            self._subscribed = True
            if self._channel_lost:
                self._channel_lost = False
                log.warning("session channel subscribed again; re-validating the sessions")
            await self.resync()
            last_resync = last_pong = loop.time()
            pinged = False
            me = asyncio.current_task()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if me is not None and me.cancelling():
                    # redis-py's read under its own timeout can swallow a cancellation that
                    # meets the timeout (the asyncio.wait_for problem, see gatewayd.tasks).
                    raise asyncio.CancelledError
                now = loop.time()
                kind = None if message is None else message.get("type")
                if message is not None and kind == "message":
                    await self._on_message(message.get("data"))
                elif kind == "pong":
                    last_pong, pinged = now, False
                if now - last_pong >= PING_INTERVAL:
                    # A subscriber socket that died silently (no RST: a partition, a NAT
                    # timeout) would wait for messages forever: ask, and reconnect if unheard.
                    if now - last_pong >= PING_INTERVAL + CHANNEL_SILENCE:
                        raise ConnectionError("no answer on the session channel")
                    if not pinged:
                        await within(pubsub.ping(), self.store.timeout)
                        pinged = True
                if now - last_resync >= RESYNC_INTERVAL:
                    await self.resync()
                    last_resync = loop.time()
        finally:
            self._subscribed = False
            with contextlib.suppress(Exception):
                await within(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]

    async def _on_message(self, data: object) -> None:
        try:
            text = data.decode() if isinstance(data, bytes) else str(data)
            message = json.loads(text)
            op, handle = message["op"], str(message["h"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("ignoring a malformed message on the session channel")
            return
        if op == "end":
            session = self._by_handle.get(handle)
            if session is not None:
                self._ended_elsewhere(session, str(message.get("r", "expired")))
        elif op == "up" and message.get("n") != self.node:
            record = await self.store.by_handle(handle)
            if record is not None:
                self._upsert(record)
        self._confirm_one()
