"""Fixture generator: a month of realistic, verifiable audit data, and the truth behind it.

`generate_month(directory)` simulates November 2026 at a ward office (Asia/Tokyo) and writes
what the gateway would have written, through the real `AuditLog` (injected clock, daily
rotation, signed checkpoints), so `verify_files` passes on the result:

* 140 seats; 50 issued PCs ``pc-001``…``pc-050``, of which ``pc-039``…``pc-050`` are never
  used (staff001…staff038 work on their own PC; the others sign in without a device);
* 120 staff (``staff001``…``staff120``) teleworking on 20-60 % of working days: sign-in around
  08:30, some leave for lunch and come back, sign-out around 17:30, some overtime, a quarter
  of the days only a morning or an afternoon; weekends and
  the holidays (3 and 23 November) are mostly empty;
* two emergency days (12 and 19 November: a typhoon, a drill) on which 40 more staff
  (``bcp001``…``bcp040``) join everyone else and the 140 seats run out: ``auth.failure``
  ``seats_full``, with retries;
* HTTPS sessions with requests to groupware / approval / files / chat (``access.allow`` +
  ``access.end`` with bytes); SSH sessions with tunnels (``tunnel.open`` / ``tunnel.close``);
  a quarter of the PC users also open an SSH session with a certificate from their portal
  session, which shares its seat (``session.start`` reason ``portal session <handle>``);
* one crash (18 November 14:00): the process dies without ``session.end`` records and
  restarts 15 minutes later (``audit.start``), after which some users sign in again;
* ``staff007`` keeps a fixed timetable, including an evening session that runs past midnight.

The simulation is one pass over a time-ordered event queue: admission against the seat limit,
activity and the records written happen in the same order, so what the generator counts is
what the log says. It returns `MonthTruth`, computed by the generator from its own state —
independently of `gatewayd.report` (concurrency sampled every second of office hours, not
integrated) — so the report's numbers are checked against the simulation, not against
themselves. Deterministic (seeded); about 3-5 s.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from gatewayd.audit import AuditLog

ZONE = ZoneInfo("Asia/Tokyo")
FIRST_DAY = date(2026, 11, 1)
DAYS = 30
SEATS = 140
NODE = "gw1"
DEVICES = tuple(f"pc-{n:03d}" for n in range(1, 51))
DEVICE_USERS = 38  # staff001..staff038 use pc-001..pc-038; pc-039..pc-050 stay in the drawer
STAFF = tuple(f"staff{n:03d}" for n in range(1, 121))
BCP_STAFF = tuple(f"bcp{n:03d}" for n in range(1, 41))
HOLIDAYS = frozenset({date(2026, 11, 3), date(2026, 11, 23)})
EMERGENCY_DAYS = frozenset({date(2026, 11, 12), date(2026, 11, 19)})
CRASH_AT = datetime(2026, 11, 18, 14, 0, tzinfo=ZONE)
RESTART_AFTER = timedelta(minutes=15)
KNOWN_USER = "staff007"
OFFICE_HOURS = (time(8, 0), time(20, 0))
HTTP_SERVICES = (("groupware", 0.55), ("approval", 0.15), ("files", 0.2), ("chat", 0.1))
TUNNEL_SERVICES = (("fileshare", "fs1.office.local:445"), ("mail", "mail.office.local:993"))


@dataclass(frozen=True)
class AttendanceTruth:
    first_login: datetime
    last_logout: datetime
    connected_seconds: int


@dataclass(frozen=True)
class MonthTruth:
    """What the generator knows about the month it wrote."""

    directory: Path
    log_path: Path
    public_key: Path
    seats: int
    devices_issued: tuple[str, ...]
    devices_unused: tuple[str, ...]
    peak_per_day: dict[date, int]
    p95_per_day: dict[date, int]
    peak: int
    p95: int  # over office hours of the days in use
    refusals_per_day: dict[date, int]
    refusals_per_hour: dict[datetime, int]
    known_user: str
    known_attendance: dict[date, AttendanceTruth]
    sessions_closed_by_crash: int
    records: int
    requests_per_service: dict[str, int]
    tunnels_per_service: dict[str, int]

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir()
                      if p.name.startswith("audit.log") and not p.name.endswith((".pub", ".lock"))
                      and ".pub." not in p.name)


@dataclass
class _Session:
    handle: str
    user: str
    device: str | None
    frontend: str
    start: int
    planned_end: int
    seat: str
    alive: bool = True
    children: list[_Session] = field(default_factory=list)


@dataclass
class _Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


def _ts(moment: datetime) -> int:
    return int(moment.timestamp())


def _at(day: date, hour: float) -> int:
    base = datetime.combine(day, time(0), ZONE)
    return _ts(base) + round(hour * 3600)


class _Simulation:
    """The event queue, the seats, the log, and the truth being collected."""

    def __init__(self, directory: Path, rng: random.Random) -> None:
        self.rng = rng
        self.directory = directory
        self.log_path = directory / "audit.log"
        self.clock = _Clock(datetime.combine(FIRST_DAY, time(0), ZONE))
        self.queue: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self.order = itertools.count()
        self.handles = itertools.count(1)
        self.log: AuditLog | None = None
        self.down_until: int | None = None
        self.seats: dict[str, int] = {}  # seat -> live sessions on it
        self.sessions: dict[str, _Session] = {}
        self.level_changes: list[tuple[int, int]] = []  # (time, seats in use after it)
        self.last_written = 0
        self.records = 0
        self.refusals: defaultdict[datetime, int] = defaultdict(int)
        self.known_intervals: list[tuple[int, int]] = []
        self.crash_closed = 0
        self.devices_seen: set[str] = set()
        self.requests: defaultdict[str, int] = defaultdict(int)
        self.tunnels: defaultdict[str, int] = defaultdict(int)

    # --- the queue and the log -----------------------------------------------------------

    def schedule(self, when: int, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.queue, (when, next(self.order), action, args))

    def emit(self, when: int, event: str, **fields: object) -> None:
        assert self.log is not None
        self.clock.now = datetime.fromtimestamp(when, ZONE)
        self.log.emit(event, **fields)
        self.last_written = when
        self.records += 1

    def _new_log(self) -> AuditLog:
        return AuditLog(self.log_path, node=NODE, signing_key_path=self.directory / "audit.key",
                        fsync="interval", rotate_daily=True, timezone=ZONE,
                        checkpoint_every=2000, clock=self.clock)

    async def run(self) -> None:
        self.log = self._new_log()
        await self.log.start()
        while self.queue:
            when, _, action, args = heapq.heappop(self.queue)
            self.clock.now = datetime.fromtimestamp(when, ZONE)
            if action == self.restart:
                await self.restart_after_crash(when)
                continue
            action(when, *args)
        self.clock.now = datetime.combine(FIRST_DAY + timedelta(days=DAYS), time(0), ZONE)
        await self.log.close()

    # --- seats ---------------------------------------------------------------------------

    def seats_in_use(self) -> int:
        return len(self.seats)

    def _seat_taken(self, when: int, seat: str) -> None:
        self.seats[seat] = self.seats.get(seat, 0) + 1
        if self.seats[seat] == 1:
            self.level_changes.append((when, len(self.seats)))

    def _seat_released(self, when: int, seat: str) -> None:
        self.seats[seat] -= 1
        if self.seats[seat] == 0:
            del self.seats[seat]
            self.level_changes.append((when, len(self.seats)))

    # --- people --------------------------------------------------------------------------

    def login(self, when: int, user: str, end: int, attempt: int = 0) -> None:
        if self.down_until is not None:
            self.schedule(self.down_until + self.rng.randint(60, 1200), self.login, user, end)
            return
        if end - when < 600:
            return  # not worth it any more
        device = DEVICES[int(user[5:]) - 1] if user.startswith("staff") and \
            int(user[5:]) <= DEVICE_USERS else None
        frontend = "https" if device is not None or self.rng.random() < 0.7 else "ssh"
        source = f"198.51.100.{self.rng.randint(1, 254)}"
        if self.seats_in_use() >= SEATS:
            self.emit(when, "auth.failure", frontend=frontend, user=user, source_ip=source,
                      reason="seats_full", device=device)
            self.refusals[datetime.fromtimestamp(when, ZONE).replace(minute=0, second=0)] += 1
            if attempt < 6:
                self.schedule(when + self.rng.randint(600, 1200), self.login, user, end,
                              attempt + 1)
            return
        handle = f"s{next(self.handles):06d}"
        session = _Session(handle, user, device, frontend, when, end, handle)
        self.sessions[handle] = session
        if device is not None:
            self.devices_seen.add(device)
        self._seat_taken(when, handle)
        self.emit(when, "auth.success", frontend=frontend, user=user, source_ip=source,
                  device=device, session=handle)
        self.emit(when, "session.start", frontend=frontend, user=user, source_ip=source,
                  session=handle, device=device)
        self.schedule(end, self.logout, session)
        if frontend == "https":
            self._plan_requests(session)
            if device is not None and self.rng.random() < 0.25 and end - when > 1800:
                self.schedule(when + self.rng.randint(120, 900), self.ssh_with_cert, session)
        else:
            self._plan_tunnels(session, when, end)

    def logout(self, when: int, session: _Session) -> None:
        if not session.alive:
            return
        for child in session.children:  # an SSH session ends no later than its portal session
            self.logout(when, child)
        session.alive = False
        self.emit(when, "session.end", frontend=session.frontend, user=session.user,
                  device=session.device, session=session.handle,
                  reason="logout" if self.rng.random() < 0.9 else "idle_timeout",
                  duration_ms=(when - session.start) * 1000)
        self._seat_released(when, session.seat)
        if session.user == KNOWN_USER:
            self.known_intervals.append((session.start, when))

    def ssh_with_cert(self, when: int, portal: _Session) -> None:
        if not portal.alive or self.down_until is not None:
            return
        handle = f"s{next(self.handles):06d}"
        end = portal.planned_end - self.rng.randint(60, 600)
        session = _Session(handle, portal.user, portal.device, "ssh", when, end, portal.seat)
        portal.children.append(session)
        self.sessions[handle] = session
        self._seat_taken(when, portal.seat)
        source = f"198.51.100.{self.rng.randint(1, 254)}"
        self.emit(when, "auth.success", frontend="ssh", user=portal.user, source_ip=source,
                  device=portal.device, session=handle,
                  reason=f"certificate serial {handle}")
        self.emit(when, "session.start", frontend="ssh", user=portal.user, source_ip=source,
                  session=handle, device=portal.device, reason=f"portal session {portal.handle}")
        self.schedule(end, self.logout, session)
        self._plan_tunnels(session, when, end)

    def _plan_requests(self, session: _Session) -> None:
        span = session.planned_end - session.start
        for _ in range(max(1, round(span / 3600 * self.rng.uniform(1.0, 3.0)))):
            at = session.start + self.rng.randint(1, max(1, span - 10))
            services, weights = zip(*HTTP_SERVICES, strict=True)
            service = self.rng.choices(services, weights)[0]
            self.schedule(at, self.request, session, service)

    def request(self, when: int, session: _Session, service: str) -> None:
        if not session.alive:
            return
        fields = {"frontend": "https", "user": session.user, "session": session.handle,
                  "device": session.device, "service": service, "method": "GET",
                  "path": f"/{service}/"}
        self.emit(when, "access.allow", **fields, rule=f"{service}-staff")
        self.requests[service] += 1
        self.emit(when, "access.end", **fields, rule=f"{service}-staff", status=200,
                  bytes_up=self.rng.randint(300, 2000),
                  bytes_down=self.rng.randint(2000, 400_000), duration_ms=120)

    def _plan_tunnels(self, session: _Session, start: int, end: int) -> None:
        for _ in range(self.rng.randint(1, 3)):
            opened = self.rng.randint(start + 1, max(start + 2, end - 120))
            closed = self.rng.randint(opened + 1, max(opened + 2, end - 1))
            service, dest = self.rng.choice(TUNNEL_SERVICES)
            self.schedule(opened, self.tunnel, session, service, dest, closed)

    def tunnel(self, when: int, session: _Session, service: str, dest: str, closed: int) -> None:
        if not session.alive:
            return
        fields = {"frontend": "ssh", "user": session.user, "session": session.handle,
                  "device": session.device, "source_ip": "198.51.100.7", "dest": dest,
                  "service": service, "rule": f"{service}-tunnel"}
        self.emit(when, "tunnel.open", **fields)
        self.tunnels[service] += 1
        self.schedule(closed, self.tunnel_close, session, fields, when)

    def tunnel_close(self, when: int, session: _Session, fields: dict[str, object],
                     opened: int) -> None:
        if not session.alive:
            return
        self.emit(when, "tunnel.close", **fields, reason="client_closed",
                  bytes_up=self.rng.randint(10_000, 5_000_000),
                  bytes_down=self.rng.randint(50_000, 50_000_000),
                  duration_ms=(when - opened) * 1000)

    # --- the crash -----------------------------------------------------------------------

    def crash(self, when: int) -> None:
        """The process dies: no session.end; the sessions end when the gateway last wrote."""
        assert self.log is not None
        log = self.log
        if log._task is not None:  # a killed process runs no periodic task
            log._task.cancel()
        log._close_file()  # the kernel closes the file of a dead process …
        log._release_writer_lock()  # … and drops its flock
        died = self.last_written
        survivors: list[tuple[str, int]] = []
        for session in list(self.sessions.values()):
            if not session.alive:
                continue
            session.alive = False
            self.crash_closed += 1
            self._seat_released(died, session.seat)
            if session.user == KNOWN_USER:
                self.known_intervals.append((session.start, died))
            if session.seat == session.handle and session.planned_end > when + 3600:
                survivors.append((session.user, session.planned_end))
        self.down_until = when + int(RESTART_AFTER.total_seconds())
        self.schedule(self.down_until, self.restart)
        for user, end in survivors:
            if self.rng.random() < 0.8:
                self.schedule(self.down_until + self.rng.randint(60, 1800), self.login, user, end)

    def restart(self, when: int) -> None:
        """A marker in the queue: `run` awaits `restart_after_crash` for it."""

    async def restart_after_crash(self, when: int) -> None:
        self.clock.now = datetime.fromtimestamp(when, ZONE)
        self.log = self._new_log()
        await self.log.start()  # writes the audit.start that closes the lost sessions
        self.last_written = when
        self.down_until = None


def _plan_day(sim: _Simulation, day: date, rng: random.Random,
              propensity: dict[str, float]) -> None:
    emergency = day in EMERGENCY_DAYS
    working = day.weekday() < 5 and day not in HOLIDAYS
    people = STAFF + BCP_STAFF if emergency else STAFF
    for user in people:
        if user == KNOWN_USER:
            continue
        chance = 0.95 if emergency else propensity[user] if working else 0.02
        if rng.random() >= chance:
            continue
        if not working and not emergency:
            start = rng.uniform(9.5, 14.0)
            sim.schedule(_at(day, start), sim.login, user, _at(day, start + rng.uniform(0.3, 2)))
            continue
        start = min(max(rng.gauss(8.5, 0.3 if emergency else 0.25), 7.5), 10.5)
        end = rng.uniform(19.0, 22.0) if rng.random() < 0.12 else rng.gauss(17.5, 0.35)
        half = rng.random()
        if not emergency and half < 0.25:  # half-day telework: the morning or the afternoon
            start, end = (start, rng.gauss(12.0, 0.2)) if half < 0.12 else \
                (rng.gauss(13.2, 0.3), end)
            _work(sim, rng, day, user, start, end)
        elif rng.random() < 0.4:  # out for lunch, back after it
            out, back = 12.0 + rng.uniform(0, 0.2), 12.8 + rng.uniform(0, 0.3)
            _work(sim, rng, day, user, start, out)
            _work(sim, rng, day, user, back, end)
        else:
            _work(sim, rng, day, user, start, end)


def _work(sim: _Simulation, rng: random.Random, day: date, user: str, start: float,
          end: float) -> None:
    """Sessions from ``start`` to ``end`` (hours), broken by meetings and idle timeouts."""
    cursor = start
    while cursor < end:
        stop = min(end, cursor + rng.uniform(0.7, 3.5))
        sim.schedule(_at(day, cursor), sim.login, user, _at(day, stop))
        cursor = stop + rng.uniform(0.1, 0.7)


def _plan_known_user(sim: _Simulation, day: date) -> None:
    """staff007's fixed timetable: working days 08:25+ to 17:40, lunch out on even days, an
    evening session on 5 November until 01:30 the next morning."""
    if day.weekday() >= 5 or day in HOLIDAYS:
        return
    start = 8 + 25 / 60 + (day.day % 5) / 60
    if day.day % 2 == 0:
        sim.schedule(_at(day, start), sim.login, KNOWN_USER, _at(day, 12.0))
        sim.schedule(_at(day, 12.75), sim.login, KNOWN_USER, _at(day, 17 + 40 / 60))
    else:
        sim.schedule(_at(day, start), sim.login, KNOWN_USER, _at(day, 17 + 40 / 60))
    if day == date(2026, 11, 5):
        sim.schedule(_at(day, 21.0), sim.login, KNOWN_USER, _at(day, 25.5))


def _attendance_truth(intervals: list[tuple[int, int]]) -> dict[date, AttendanceTruth]:
    """Per day: first start, last end and the union length (seconds) of the intervals."""
    pieces: defaultdict[date, list[tuple[int, int]]] = defaultdict(list)
    for start, end in intervals:
        cursor = start
        while cursor < end:
            day = datetime.fromtimestamp(cursor, ZONE).date()
            midnight = _at(day + timedelta(days=1), 0)
            pieces[day].append((cursor, min(end, midnight)))
            cursor = min(end, midnight)
    truth: dict[date, AttendanceTruth] = {}
    for day, spans in pieces.items():
        covered: set[int] = set()
        for start, end in spans:
            covered.update(range(start, end))  # a second-by-second union: simple and certain
        truth[day] = AttendanceTruth(
            datetime.fromtimestamp(min(s for s, _ in spans), ZONE),
            datetime.fromtimestamp(max(e for _, e in spans), ZONE), len(covered))
    return truth


def _level_by_second(changes: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Seats in use in each second of [start, end), sampled from the simulation's changes."""
    index = 0
    level = 0
    while index < len(changes) and changes[index][0] <= start:
        level = changes[index][1]
        index += 1
    samples = []
    for second in range(start, end):
        while index < len(changes) and changes[index][0] <= second:
            level = changes[index][1]
            index += 1
        samples.append(level)
    return samples


def _percentile(samples: list[int]) -> int:
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1] if ordered else 0


def _concurrency_truth(changes: list[tuple[int, int]]
                       ) -> tuple[dict[date, int], dict[date, int], int]:
    peaks: dict[date, int] = {}
    p95s: dict[date, int] = {}
    in_use: list[int] = []
    for offset in range(DAYS):
        day = FIRST_DAY + timedelta(days=offset)
        whole = _level_by_second(changes, _at(day, 0), _at(day, 24))
        peaks[day] = max(whole)
        office = whole[OFFICE_HOURS[0].hour * 3600:OFFICE_HOURS[1].hour * 3600]
        p95s[day] = _percentile(office)
        if any(office):
            in_use.extend(office)
    return peaks, p95s, _percentile(in_use)


def generate_month(directory: Path, seed: int = 2026) -> MonthTruth:
    """Write the month's audit log under ``directory`` and return what it contains."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sim = _Simulation(directory, rng)
    propensity = {user: rng.uniform(0.2, 0.6) for user in STAFF}
    for offset in range(DAYS):
        day = FIRST_DAY + timedelta(days=offset)
        _plan_day(sim, day, rng, propensity)
        _plan_known_user(sim, day)
    sim.schedule(_ts(CRASH_AT), sim.crash)
    asyncio.run(sim.run())
    # Ties at one instant: the last change recorded at a second is the level after it.
    peaks, p95s, p95 = _concurrency_truth(sim.level_changes)
    refusals_per_day: defaultdict[date, int] = defaultdict(int)
    for hour, count in sim.refusals.items():
        refusals_per_day[hour.date()] += count
    assert sim.devices_seen <= {DEVICES[n] for n in range(DEVICE_USERS)}
    return MonthTruth(
        directory=directory, log_path=sim.log_path, public_key=directory / "audit.log.pub",
        seats=SEATS, devices_issued=DEVICES,
        devices_unused=tuple(d for d in DEVICES if d not in sim.devices_seen),
        peak_per_day=peaks, p95_per_day=p95s, peak=max(peaks.values()), p95=p95,
        refusals_per_day=dict(refusals_per_day), refusals_per_hour=dict(sim.refusals),
        known_user=KNOWN_USER, known_attendance=_attendance_truth(sim.known_intervals),
        sessions_closed_by_crash=sim.crash_closed, records=sim.records,
        requests_per_service=dict(sim.requests), tunnels_per_service=dict(sim.tunnels),
    )
