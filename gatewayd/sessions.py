"""Session registry: seats, per-user caps, idle/absolute timeouts, and ending sessions.

Owns every live session of this node, whatever the frontend (HTTPS cookie or SSH
connection). The registry never keeps a raw session id: sessions are indexed by the SHA-256
of the id, so a lookup compares digests of attacker input, never the secret itself, and a
memory dump of the registry does not yield usable cookies.

Ending a session — logout, admin kill, expiry, policy change, shutdown — goes through one
path, `SessionRegistry.end`: the session leaves the indexes first (so no new request can
resolve it), then its closers run (each WebSocket, tunnel or SSH channel registered one), then
``on_end(session, reason)`` (the Gateway's hook: audit ``session.end``, metrics). A failing
closer or hook is logged and does not stop the others: a session that is ended must end.

All times are seconds from the injected ``clock`` (monotonic in the daemon, a fake in tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from gatewayd.identity.principal import Principal

log = logging.getLogger(__name__)

Frontend = Literal["https", "ssh"]
EndReason = Literal["logout", "idle_timeout", "expired", "admin_kill", "policy_changed",
                    "shutdown"]
END_REASONS: Final[frozenset[str]] = frozenset(
    {"logout", "idle_timeout", "expired", "admin_kill", "policy_changed", "shutdown",
     "replaced", "directory_revoked",
     # the emergency stop (gatewayd.emergency): `certs revoke` and `users disable`
     "device_revoked", "user_disabled",
     # an SSH client closed its connection, or stopped answering keepalives (gatewayd.ssh)
     "disconnected",
     # multi-node: Redis no longer has the session (its data was lost; gatewayd.sessions_shared)
     "state_lost",
     # multi-node: the node holding the SSH connection stopped its heartbeat (crashed)
     "node_lost"}
)
Closer = Callable[[str], None]
"""Called once with the end reason when the session ends; must not block."""

# 32 random bytes = 256 bits from the CSPRNG, URL-safe base64 (43 characters, cookie-safe).
SESSION_ID_BYTES: Final = 32


class SessionLimitError(Exception):
    """A new session would exceed a configured limit; ``limit`` is that limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class SeatsFull(SessionLimitError):  # noqa: N818 - the contract name
    """Every licensed seat (``sessions.max_concurrent``) is taken on this node.

    ``str()`` is the sentence both frontends show as it is (sign-in page, JSON, SSH
    disconnect): one wording, so the help desk recognises it whichever way it is reported.
    """

    def __str__(self) -> str:
        return seats_full_message(self.limit)


class PerUserLimit(SessionLimitError):  # noqa: N818 - the contract name
    """The user already has ``sessions.per_user`` live sessions."""

    def __str__(self) -> str:
        return f"the user already has {self.limit} session(s)"


def seats_full_message(limit: int) -> str:
    """What a person who cannot sign in because every seat is taken is told."""
    return f"All {limit} seats are in use; try again later."


def per_user_cap(default: int, per_role: Mapping[str, int], roles: Iterable[str]) -> int:
    """The seats one person may hold: the largest ``per_role`` value among ``roles``, else
    ``default`` (``sessions.per_user``). Larger wins so that adding someone to a role never
    takes seats away from them."""
    caps = [per_role[role] for role in roles if role in per_role]
    return max(caps) if caps else default


def hash_session_id(raw_id: str) -> str:
    """The registry key of a raw session id: SHA-256 hex of its UTF-8 bytes."""
    return hashlib.sha256(raw_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(eq=False)
class Session:
    """One authenticated session. Identity is by object (``eq=False``), not by value.

    id_hash: SHA-256 hex of the raw id (the registry's key); changes when the id is rotated.
    handle: a random, non-secret name for logs, audit, admin listings and CSRF binding; it
        stays the same for the session's whole life, across id rotations.
    created, last_seen, mfa_at: clock seconds of login, last activity, last TOTP check.
    ended: the end reason once the session has ended, else None.
    seat: the handle of the session whose seat this one shares (an SSH session signed in with
        a certificate its live portal session issued), or None: it holds a seat of its own.
        A seat is counted once however many sessions share it (``sessions.max_concurrent``
        and ``sessions.per_user`` count seats), and stays taken while any of them lives.
    """

    id_hash: str
    principal: Principal
    frontend: Frontend
    source_ip: str
    device: str | None
    device_user: str | None
    created: float
    last_seen: float
    mfa_at: float
    handle: str = field(default_factory=lambda: secrets.token_hex(8))
    bytes_up: int = 0
    bytes_down: int = 0
    open_tunnels: int = 0  # SSH direct-tcpip channels open now (gatewayd.ssh.tunnel counts)
    ended: str | None = None
    seat: str | None = None
    # Serial of the device certificate the session signed in with (None: none, or not
    # recorded): revoking that one certificate ends this session (gatewayd.emergency).
    device_serial: int | None = None
    _closers: list[Closer] = field(default_factory=list, repr=False)
    # The live session whose seat this one shares (`seat`), as given to `create`: activity
    # here is activity there too (`SessionRegistry.touch`).
    _seat_holder: Session | None = field(default=None, repr=False)

    @property
    def user(self) -> str:
        return self.principal.user

    @property
    def seat_key(self) -> str:
        """The seat this session occupies: its own handle, or the one it shares."""
        return self.seat or self.handle

    def mfa_age(self, now: float) -> float:
        """Seconds since the last successful TOTP check (for `AccessRequest.mfa_age`)."""
        return max(0.0, now - self.mfa_at)

    def add_bytes(self, *, up: int = 0, down: int = 0) -> None:
        """Account traffic of this session (client→upstream is up)."""
        self.bytes_up += up
        self.bytes_down += down

    def add_closer(self, closer: Closer) -> Callable[[], None]:
        """Run ``closer(reason)`` when the session ends; returns a function that unregisters it.

        If the session has already ended the closer runs at once, so a WebSocket that raced a
        logout is still closed.
        """
        if self.ended is not None:
            _run_closer(self, closer, self.ended)
            return _nothing
        self._closers.append(closer)

        def remove() -> None:
            if closer in self._closers:
                self._closers.remove(closer)

        return remove


def _nothing() -> None:
    return None


def _run_closer(session: Session, closer: Closer, reason: str) -> None:
    try:
        closer(reason)
    except Exception:
        # One broken channel must not keep the others (or the audit record) from closing.
        log.exception("session closer failed", extra={"session": session.handle})


class SessionRegistry:
    """All live sessions of this node, with their limits and timeouts."""

    def __init__(
        self,
        *,
        idle_timeout: float,
        absolute_timeout: float,
        max_concurrent: int,
        per_user: int,
        clock: Callable[[], float],
        on_end: Callable[[Session, str], None],
        cap_for: Callable[[Principal], int] | None = None,
    ) -> None:
        """``cap_for(principal)``: that person's per-user cap (per-role caps, see
        `per_user_cap`); None: ``per_user`` for everyone."""
        if idle_timeout <= 0 or absolute_timeout <= 0:
            raise ValueError("session timeouts must be positive")
        if max_concurrent < 1 or per_user < 1:
            raise ValueError("session limits must be at least 1")
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.max_concurrent = max_concurrent
        self.per_user = per_user
        self._clock = clock
        self._on_end = on_end
        self.cap_for = cap_for
        self._by_hash: dict[str, Session] = {}
        self._by_user: dict[str, list[Session]] = {}  # limits and end_user without a scan
        self._seats: dict[str, int] = {}  # seat key -> how many live sessions share it

    # --- creating and resolving ------------------------------------------------------------

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
        """Start a session after a successful login (password + TOTP, so ``mfa_at = now``).

        Returns ``(raw_id, session)``; the raw id goes to the client and is forgotten here.
        Raises `SeatsFull` or `PerUserLimit`; sessions already past their timeouts are ended
        first so they never hold a seat. With ``replace_oldest``, a user at the per-user cap
        does not get `PerUserLimit`: their oldest sessions end with reason ``"replaced"``
        instead — newest login wins, so someone whose browser crashed (its cookie gone, its
        session still counted) is not locked out until the idle timeout.

        ``seat_of``: a live session of the same user whose seat the new one shares (no limit
        applies, no one is replaced); ignored when it has ended or belongs to someone else.

        ``mfa_at``: when the login's TOTP was checked, if that was not just now (an SSH
        certificate proves the MFA of the portal login that issued it, not a fresh one, so
        ``mfa_max_age`` rules see its real age); never later than ``now``.
        """
        now = self._clock() if now is None else now
        self.sweep(now)
        shared = self._shared_seat(seat_of, principal.user)
        if shared is None:
            cap = self.user_cap(principal)
            if replace_oldest:
                self._make_room_for(principal.user, cap)
            if len(self._seats) >= self.max_concurrent:
                raise SeatsFull(self.max_concurrent)
            if self._count_user(principal.user) >= cap:
                raise PerUserLimit(cap)
        raw_id, id_hash = self._new_id()
        session = Session(
            id_hash=id_hash, principal=principal, frontend=frontend, source_ip=source_ip,
            device=device, device_user=device_user, created=now, last_seen=now,
            mfa_at=now if mfa_at is None else min(now, mfa_at),
            seat=shared, device_serial=device_serial,
            _seat_holder=seat_of if shared is not None else None,
        )
        self._by_hash[id_hash] = session
        self._by_user.setdefault(principal.user, []).append(session)
        self._seats[session.seat_key] = self._seats.get(session.seat_key, 0) + 1
        return raw_id, session

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
        """`create`, as the frontends call it: on one node that is all; the multi-node
        registry (`gatewayd.sessions_shared`) counts the seats of every node first, in Redis.
        """
        return self.create(principal, frontend=frontend, source_ip=source_ip, device=device,
                           device_user=device_user, replace_oldest=replace_oldest,
                           seat_of=seat_of, device_serial=device_serial, mfa_at=mfa_at)

    def _shared_seat(self, seat_of: Session | None, user: str) -> str | None:
        if seat_of is None or seat_of.ended is not None or seat_of.user != user:
            return None
        if self._by_hash.get(seat_of.id_hash) is not seat_of:
            return None
        return seat_of.seat_key

    def user_cap(self, principal: Principal) -> int:
        """How many seats ``principal`` may hold (``per_user``, or its roles' cap)."""
        if self.cap_for is None:
            return self.per_user
        try:
            return max(1, self.cap_for(principal))
        except Exception:
            # A broken lookup must not lock everybody out: the default cap still holds.
            log.exception("per-user cap lookup failed; using sessions.per_user")
            return self.per_user

    def _make_room_for(self, user: str, cap: int) -> None:
        while self._count_user(user) >= cap:
            oldest = min(self._by_user[user], key=lambda session: session.created)
            self.end(oldest, "replaced")

    def get(self, raw_id: str) -> Session | None:
        """The live session for a raw id, or None (unknown, or expired — which ends it now)."""
        if not raw_id:
            return None
        session = self._by_hash.get(hash_session_id(raw_id))
        if session is None:
            return None
        reason = self._expiry_reason(session, self._clock())
        if reason is not None:
            self.end(session, reason)
            return None
        return session

    def by_handle(self, handle: str) -> Session | None:
        """The live session whose handle starts with ``handle`` (admin kill), if exactly one.

        Admin handles are at least 8 hex digits so one cannot kill by a guessed short prefix.
        """
        if len(handle) < 8:
            return None
        wanted = handle.lower()
        matches = [s for s in self._by_hash.values() if s.handle.startswith(wanted)]
        return matches[0] if len(matches) == 1 else None

    def rotate(self, session: Session) -> str:
        """Give a live session a new raw id (e.g. after step-up); the old id stops working."""
        if self._by_hash.get(session.id_hash) is not session:
            raise KeyError("session is not live")
        raw_id, id_hash = self._new_id()
        del self._by_hash[session.id_hash]
        session.id_hash = id_hash
        self._by_hash[id_hash] = session
        return raw_id

    # --- activity --------------------------------------------------------------------------

    def touch(self, session: Session) -> None:
        """Record activity now: restarts the idle timer (never extends the absolute lifetime).

        Also of the live session whose seat ``session`` shares: a tunnel in use keeps the
        portal session that issued its certificate from idling out (with ``per_user = 1``
        the next portal sign-in would otherwise replace the tunnel's session).
        """
        if session.ended is None:
            now = self._clock()
            session.last_seen = max(session.last_seen, now)
            holder = session._seat_holder
            if holder is not None and holder.ended is None:
                holder.last_seen = max(holder.last_seen, now)

    def mark_mfa(self, session: Session) -> None:
        """A TOTP step-up succeeded now; also counts as activity."""
        if session.ended is None:
            now = self._clock()
            session.mfa_at = now
            session.last_seen = max(session.last_seen, now)

    # --- ending ----------------------------------------------------------------------------

    def end(self, session: Session, reason: str) -> None:
        """End a session: unindex it, run its closers, then ``on_end``. Idempotent."""
        if reason not in END_REASONS:
            raise ValueError(f"unknown session end reason {reason!r}")
        if session.ended is not None:
            return
        session.ended = reason
        self._unindex(session)
        closers, session._closers = session._closers, []
        for closer in closers:
            _run_closer(session, closer, reason)
        try:
            self._on_end(session, reason)
        except Exception:
            log.exception("session end hook failed", extra={"session": session.handle})

    def end_user(self, user: str, reason: str) -> int:
        """End every session of ``user``; returns how many were ended."""
        victims = list(self._by_user.get(user, ()))
        for session in victims:
            self.end(session, reason)
        return len(victims)

    def end_all(self, reason: str) -> int:
        """End every session (shutdown); returns how many were ended."""
        victims = list(self._by_hash.values())
        for session in victims:
            self.end(session, reason)
        return len(victims)

    def sweep(self, now: float | None = None) -> int:
        """End every session past its idle or absolute timeout; returns how many."""
        now = self._clock() if now is None else now
        due = [(s, r) for s in self._by_hash.values()
               if (r := self._expiry_reason(s, now)) is not None]
        for session, reason in due:
            self.end(session, reason)
        return len(due)

    async def sweep_forever(self, interval: float) -> None:
        """Expire idle sessions every ``interval`` seconds (run as a named Gateway task).

        Without this, an idle WebSocket or tunnel would stay open until its session's cookie
        is presented again — which may be never.
        """
        while True:
            try:
                self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("session sweep failed")
            await asyncio.sleep(interval)

    # --- listing ---------------------------------------------------------------------------

    def sessions(self) -> list[Session]:
        """Live sessions, oldest first."""
        return sorted(self._by_hash.values(), key=lambda s: (s.created, s.id_hash))

    def active(self, frontend: str | None = None) -> int:
        """Number of live sessions, optionally only of one frontend."""
        if frontend is None:
            return len(self._by_hash)
        return sum(1 for s in self._by_hash.values() if s.frontend == frontend)

    # --- internals -------------------------------------------------------------------------

    def _new_id(self) -> tuple[str, str]:
        while True:  # a collision of 256-bit ids will not happen; never overwrite if it did
            raw_id = secrets.token_urlsafe(SESSION_ID_BYTES)
            id_hash = hash_session_id(raw_id)
            if id_hash not in self._by_hash:
                return raw_id, id_hash

    def _count_user(self, user: str) -> int:
        """Seats ``user`` holds (sessions sharing one seat count once)."""
        return len({session.seat_key for session in self._by_user.get(user, ())})

    def seats_taken(self) -> int:
        """Seats in use on this node (what ``sessions.max_concurrent`` limits)."""
        return len(self._seats)

    def _unindex(self, session: Session) -> None:
        if self._by_hash.get(session.id_hash) is session:
            del self._by_hash[session.id_hash]
            left = self._seats.get(session.seat_key, 0) - 1
            if left > 0:
                self._seats[session.seat_key] = left
            else:
                self._seats.pop(session.seat_key, None)
        same_user = self._by_user.get(session.principal.user)
        if same_user is not None and session in same_user:
            same_user.remove(session)
            if not same_user:
                del self._by_user[session.principal.user]

    def _expiry_reason(self, session: Session, now: float) -> str | None:
        # The absolute lifetime wins: a session both idle and too old ended because it was old.
        if now - session.created >= self.absolute_timeout:
            return "expired"
        if now - session.last_seen >= self.idle_timeout:
            return "idle_timeout"
        return None
