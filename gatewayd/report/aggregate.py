"""Sans-IO aggregation of audit records into a `UsageReport` (the core of ``report usage``).

Owns `UsageAggregator`: feed it records (dicts as parsed from the log) one at a time, in chain
order, then call `finish`. It never sees a file, so tests drive it with plain dicts. Memory is
proportional to the number of *sessions* and user-days in the data, not to the number of
records: requests and tunnels only bump counters.

Definitions (what a budget officer reads off the report):

* **Session interval** — from ``session.start`` to the ``session.end`` with the same
  ``session`` handle. A session with no ``session.end`` is closed when the next ``audit.start``
  of the same ``node`` shows the gateway restarted (its sessions did not survive the crash or
  restart): it ends at that node's **last record before the restart** — the last moment the
  gateway is known to have been running — not at the restart, which could be hours later and
  would inflate seat use. A session still open when the data ends is cut at the period end
  (or the last record, whichever is earlier). A ``session.end`` whose start is not in the
  files (rotated away) starts ``duration_ms`` before it. Intervals are clipped to the period.
* **Seats** — as the gateway counts them (``sessions.max_concurrent``): an SSH session signed
  in with a certificate its live portal session issued (``session.start`` reason
  ``portal session <handle>``) shares that session's seat, so a seat is the union of the
  intervals of the sessions sharing it. **Concurrency** is the number of seats in use, an
  exact step function of time (an end and a start at the same instant do not overlap).
* **Peak** — the maximum of that step function (per day, and over the period), exact to the
  second; ``peak_at`` is the first moment it was reached.
* **95th percentile (p95)** — time-weighted over **office hours** (default 08:00-20:00 in the
  report's zone): the smallest seat count N such that at most N seats were in use during 95 %
  of that window. Per day over the day's window; for the period over the windows of the
  *days in use* (someone connected during office hours). Why: nights, weekends and holidays
  would otherwise make up most of the time and pull the figure toward zero; what sizing needs
  is "how many seats cover the working day except its busiest 5 %" (about 36 minutes of a
  12-hour day), which the peak alone — one busy minute — overstates.
* **Seats exhausted** — hours (in the report's zone) with ``auth.failure`` reason
  ``seats_full``, with the number of refused logins and distinct refused users.
* **Users / devices per day and ISO week** — distinct ``user`` / ``device`` of the sessions
  connected at any time of that day/week.
* **Attendance** — per user and day: first login, last logout and the union of the user's
  session intervals that day (parallel sessions are not double hours); a session across
  midnight counts toward both days.
* **Services** — see `ServiceUsage`; records count when their ``ts`` is inside the period.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from gatewayd.audit.query import record_time
from gatewayd.report.model import (
    Attendance,
    ConcurrencyStep,
    DayUsage,
    SeatsFullHour,
    ServiceUsage,
    UsageReport,
    WeekUsage,
)

DEFAULT_OFFICE_HOURS: Final = (time(8, 0), time(20, 0))
PERCENTILE: Final = 0.95
HEADROOM: Final = 0.2  # the margin the recommendation adds to the p95/peak when sizing
# Records the AuditLog writes at (re)start describe the restart, not a running gateway, so they
# do not prove the crashed run was alive at their time.
_RESTART_EVENTS: Final = frozenset({"audit.start", "audit.continue", "audit.recovery"})
_SHARED_SEAT: Final = re.compile(r"portal session (\S+)")
_REQUEST_EVENTS: Final = frozenset({"access.allow", "access.deny", "access.end",
                                    "tunnel.open", "tunnel.close", "tunnel.deny"})


def parse_ts(record: Mapping[str, Any]) -> float | None:
    """The record's ``ts`` as POSIX seconds, or None when missing or not RFC 3339 with offset."""
    moment = record_time(record)
    return None if moment is None else moment.timestamp()


def _text(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and value else None


def _count(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(slots=True)
class _Open:
    start: float
    user: str
    device: str | None
    node: str
    seat: str


@dataclass(frozen=True, slots=True)
class _Interval:
    start: float
    end: float
    user: str
    device: str | None
    seat: str
    open_end: bool  # ended without a session.end (restart, end of data)


@dataclass(slots=True)
class _ServiceCounter:
    requests: int = 0
    tunnels: int = 0
    denied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    sessions: set[str] = field(default_factory=set)
    users: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Steps:
    """The concurrency step function: ``levels[i]`` seats from ``times[i]`` to ``times[i+1]``."""

    times: list[float]
    levels: list[int]

    def level_at(self, moment: float) -> int:
        index = bisect.bisect_right(self.times, moment) - 1
        return self.levels[index] if index >= 0 else 0

    def pieces(self, start: float, end: float) -> Iterator[tuple[float, float, int]]:
        """(from, to, seats) for each constant piece of [start, end)."""
        if end <= start:
            return
        index = bisect.bisect_right(self.times, start) - 1
        cursor = start
        while cursor < end:
            level = self.levels[index] if index >= 0 else 0
            following = self.times[index + 1] if index + 1 < len(self.times) else end
            stop = min(following, end)
            if stop > cursor:
                yield cursor, stop, level
            cursor = stop
            index += 1


def time_weighted_percentile(durations: Mapping[int, float], fraction: float) -> int:
    """Smallest level N with time(level <= N) >= fraction of the total time (0 if no time)."""
    total = sum(durations.values())
    if total <= 0:
        return 0
    covered = 0.0
    for level in sorted(durations):
        covered += durations[level]
        if covered >= fraction * total - 1e-9:
            return level
    return max(durations)


class UsageAggregator:
    """Streaming core of the usage report (see the module docstring for the definitions).

    ``since`` is inclusive and ``until`` exclusive (aware datetimes, or None for the data's
    own first/last record). Records before ``since`` are still needed: they say which sessions
    were already open when the period began.
    """

    def __init__(self, *, since: datetime | None, until: datetime | None, zone: ZoneInfo,
                 office_hours: tuple[time, time] = DEFAULT_OFFICE_HOURS) -> None:
        for name, moment in (("since", since), ("until", until)):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"{name} must be timezone-aware")
        if since is not None and until is not None and until <= since:
            raise ValueError("the period is empty: until must be after since")
        if office_hours[1] <= office_hours[0]:
            raise ValueError("office hours must end after they start")
        self._since = since.timestamp() if since is not None else None
        self._until = until.timestamp() if until is not None else None
        self._zone = zone
        self._office = office_hours
        self._open: dict[str, _Open] = {}
        self._intervals: list[_Interval] = []
        self._alive: dict[str, float] = {}  # node -> its last record proving it ran
        self._first: float | None = None
        self._last: float | None = None
        self._records = 0
        self._started_per_day: Counter[date] = Counter()
        self._started_per_user_day: Counter[tuple[str, date]] = Counter()
        self._refusals: Counter[datetime] = Counter()
        self._refused_users: defaultdict[datetime, set[str]] = defaultdict(set)
        self._services: defaultdict[str, _ServiceCounter] = defaultdict(_ServiceCounter)
        self._notes: Counter[str] = Counter()

    # ----------------------------------------------------------------- feeding

    def feed(self, record: Mapping[str, Any]) -> None:
        """Take one record (in chain order). Records without a readable time are noted."""
        moment = parse_ts(record)
        if moment is None:
            self._notes["records without a readable time were skipped"] += 1
            return
        event = record.get("event")
        node = _text(record, "node") or "?"
        if event == "audit.start":
            self._close_node(node)
        if self._first is None or moment < self._first:
            self._first = moment
        if self._last is None or moment > self._last:
            self._last = moment
        if event not in _RESTART_EVENTS and not (
            event == "audit.checkpoint" and record.get("reason") == "start"
        ):
            self._alive[node] = max(moment, self._alive.get(node, moment))
        if event == "session.start":
            self._session_start(record, moment, node)
        elif event == "session.end":
            self._session_end(record, moment)
        if not self._in_period(moment):
            return
        self._records += 1
        if event == "auth.failure" and record.get("reason") == "seats_full":
            self._refusal(record, moment)
        elif event in _REQUEST_EVENTS:
            self._service_record(str(event), record)

    def feed_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self.feed(record)

    def _in_period(self, moment: float) -> bool:
        return ((self._since is None or moment >= self._since)
                and (self._until is None or moment < self._until))

    def _session_start(self, record: Mapping[str, Any], moment: float, node: str) -> None:
        handle, user = _text(record, "session"), _text(record, "user")
        if handle is None or user is None:
            self._notes["session.start records without session or user were skipped"] += 1
            return
        if handle in self._open:
            return  # a duplicate start changes nothing: the session is already counted
        seat = handle
        match = _SHARED_SEAT.fullmatch(_text(record, "reason") or "")
        if match is not None:
            holder = self._open.get(match.group(1))
            if holder is not None and holder.user == user:
                seat = holder.seat
        self._open[handle] = _Open(moment, user, _text(record, "device"), node, seat)
        if self._in_period(moment):
            day = self._local(moment).date()
            self._started_per_day[day] += 1
            self._started_per_user_day[(user, day)] += 1

    def _session_end(self, record: Mapping[str, Any], moment: float) -> None:
        handle = _text(record, "session")
        if handle is None:
            return
        session = self._open.pop(handle, None)
        if session is not None:
            self._add_interval(session, moment, open_end=False)
            return
        user = _text(record, "user")
        duration = _count(record, "duration_ms") / 1000
        if user is None or duration <= 0:
            return
        # Started before the files given (rotated away): its own record says how long it ran.
        self._notes["sessions whose start is not in the files were placed by duration_ms"] += 1
        self._add_interval(
            _Open(moment - duration, user, _text(record, "device"), "?", handle), moment,
            open_end=False)

    def _close_node(self, node: str) -> None:
        """The node restarted: its sessions did not survive; they end when it was last alive."""
        ended_at = self._alive.get(node)
        for handle, session in list(self._open.items()):
            if session.node != node:
                continue
            del self._open[handle]
            self._notes["sessions without session.end were closed at a gateway restart"] += 1
            self._add_interval(session, max(session.start, ended_at or session.start),
                               open_end=True)

    def _add_interval(self, session: _Open, end: float, *, open_end: bool) -> None:
        start = session.start if self._since is None else max(session.start, self._since)
        stop = end if self._until is None else min(end, self._until)
        if stop <= start:
            return
        self._intervals.append(_Interval(start, stop, session.user, session.device,
                                         session.seat, open_end))

    def _refusal(self, record: Mapping[str, Any], moment: float) -> None:
        hour = self._local(moment).replace(minute=0, second=0, microsecond=0)
        self._refusals[hour] += 1
        self._refused_users[hour].add(_text(record, "user") or "?")

    def _service_record(self, event: str, record: Mapping[str, Any]) -> None:
        service = _text(record, "service")
        if service is None:
            return
        counter = self._services[service]
        if event == "access.allow":
            counter.requests += 1
        elif event == "tunnel.open":
            counter.tunnels += 1
        elif event in ("access.deny", "tunnel.deny"):
            counter.denied += 1
            return
        elif event in ("access.end", "tunnel.close"):
            counter.bytes_up += _count(record, "bytes_up")
            counter.bytes_down += _count(record, "bytes_down")
        session, user = _text(record, "session"), _text(record, "user")
        if session is not None:
            counter.sessions.add(session)
        if user is not None:
            counter.users.add(user)

    # ----------------------------------------------------------------- finishing

    def _local(self, moment: float) -> datetime:
        return datetime.fromtimestamp(moment, self._zone)

    def _day_start(self, day: date) -> float:
        return datetime.combine(day, time(0), self._zone).timestamp()

    def _at(self, day: date, clock: time) -> float:
        return datetime.combine(day, clock, self._zone).timestamp()

    def finish(self, *, seats: int | None,
               devices_issued: Collection[str] | None = None) -> UsageReport | None:
        """The report, or None when no record lies in the period."""
        if self._records == 0 or self._first is None or self._last is None:
            return None
        start = self._since if self._since is not None else self._first
        end = self._until if self._until is not None else self._last
        data_end = min(end, self._last)
        for session in list(self._open.values()):
            self._notes["sessions still open at the end of the data were cut there"] += 1
            self._add_interval(session, max(session.start, data_end), open_end=True)
        self._open.clear()
        steps = _concurrency(self._intervals)
        days = self._days(start, end)
        day_rows, office = self._day_usage(days, steps, start, end)
        peak_row = max(day_rows, key=lambda row: row.peak, default=None)
        peak = peak_row.peak if peak_row is not None else 0
        in_use = [hist for hist in office if any(level > 0 for level in hist)]
        period_hist: defaultdict[int, float] = defaultdict(float)
        for hist in in_use:
            for level, seconds in hist.items():
                period_hist[level] += seconds
        p95 = time_weighted_percentile(period_hist, PERCENTILE)
        seen = sorted({i.device for i in self._intervals if i.device is not None})
        issued = None if devices_issued is None else tuple(sorted(set(devices_issued)))
        unused = None if issued is None else tuple(d for d in issued if d not in set(seen))
        refusals = sum(self._refusals.values())
        full_hours = tuple(
            SeatsFullHour(hour, count, len(self._refused_users[hour]))
            for hour, count in sorted(self._refusals.items()))
        return UsageReport(
            period_start=self._local(start), period_end=self._local(end),
            zone=self._zone.key, office_hours=self._office, seats=seats,
            records=self._records, sessions=len(self._intervals), peak=peak,
            peak_at=peak_row.peak_at if peak_row is not None and peak else None, p95=p95,
            days_in_use=len(in_use), users=len({i.user for i in self._intervals}),
            devices_seen=tuple(seen), devices_issued=issued, devices_unused=unused,
            refusals=refusals, days=tuple(day_rows), weeks=self._weeks(days, day_rows),
            seats_full_hours=full_hours, services=self._service_rows(),
            attendance=self._attendance(), steps=_step_rows(steps, self._local),
            notes=tuple(f"{text}: {n}" for text, n in sorted(self._notes.items())),
            recommendation=recommendation(
                peak=peak, p95=p95, seats=seats, issued=issued, unused=unused,
                full_hours=len(full_hours), refusals=refusals),
        )

    def _days(self, start: float, end: float) -> list[date]:
        first, last = self._local(start).date(), self._local(end).date()
        if self._local(end) == datetime.combine(last, time(0), self._zone) and last > first:
            last -= timedelta(days=1)  # an exclusive end at midnight ends the day before
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]

    def _day_usage(self, days: list[date], steps: _Steps, start: float, end: float
                   ) -> tuple[list[DayUsage], list[dict[int, float]]]:
        users: defaultdict[date, set[str]] = defaultdict(set)
        devices: defaultdict[date, set[str]] = defaultdict(set)
        for interval in self._intervals:
            for day in self._days_of(interval.start, interval.end):
                users[day].add(interval.user)
                if interval.device is not None:
                    devices[day].add(interval.device)
        refusals_per_day: Counter[date] = Counter()
        for hour, count in self._refusals.items():
            refusals_per_day[hour.date()] += count
        rows: list[DayUsage] = []
        office: list[dict[int, float]] = []
        for day in days:
            lo = max(self._day_start(day), start)
            hi = min(self._day_start(day + timedelta(days=1)), end)
            peak, peak_at, seat_seconds = 0, None, 0.0
            for a, b, level in steps.pieces(lo, hi):
                seat_seconds += (b - a) * level
                if level > peak:
                    peak, peak_at = level, self._local(a)
            hist: defaultdict[int, float] = defaultdict(float)
            o_lo = max(self._at(day, self._office[0]), start)
            o_hi = min(self._at(day, self._office[1]), end)
            for a, b, level in steps.pieces(o_lo, o_hi):
                hist[level] += b - a
            office.append(hist)
            rows.append(DayUsage(
                day=day, peak=peak, peak_at=peak_at,
                p95=time_weighted_percentile(hist, PERCENTILE), users=len(users[day]),
                devices=len(devices[day]), sessions=self._started_per_day[day],
                refusals=refusals_per_day[day], seat_hours=seat_seconds / 3600))
        return rows, office

    def _days_of(self, start: float, end: float) -> list[date]:
        first, last = self._local(start).date(), self._local(max(start, end - 1e-6)).date()
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]

    def _weeks(self, days: list[date], rows: list[DayUsage]) -> tuple[WeekUsage, ...]:
        users: defaultdict[str, set[str]] = defaultdict(set)
        devices: defaultdict[str, set[str]] = defaultdict(set)
        for interval in self._intervals:
            for day in self._days_of(interval.start, interval.end):
                users[_iso_week(day)].add(interval.user)
                if interval.device is not None:
                    devices[_iso_week(day)].add(interval.device)
        peaks: dict[str, int] = {}
        for day, row in zip(days, rows, strict=True):
            week = _iso_week(day)
            peaks[week] = max(peaks.get(week, 0), row.peak)
        return tuple(WeekUsage(week, peak, len(users[week]), len(devices[week]))
                     for week, peak in peaks.items())

    def _service_rows(self) -> tuple[ServiceUsage, ...]:
        return tuple(
            ServiceUsage(name, len(c.sessions), len(c.users), c.requests, c.tunnels, c.denied,
                         c.bytes_up, c.bytes_down)
            for name, c in sorted(self._services.items()))

    def _attendance(self) -> tuple[Attendance, ...]:
        per_user: defaultdict[str, list[_Interval]] = defaultdict(list)
        for interval in self._intervals:
            per_user[interval.user].append(interval)
        rows: list[Attendance] = []
        for user in sorted(per_user):
            for block_start, block_end, open_end in _union(per_user[user]):
                rows.extend(self._attendance_pieces(user, block_start, block_end, open_end))
        merged: dict[tuple[str, date], Attendance] = {}
        for row in rows:  # a user's blocks of one day fold into one row
            key = (row.user, row.day)
            earlier = merged.get(key)
            merged[key] = row if earlier is None else Attendance(
                user=row.user, day=row.day, first_login=earlier.first_login,
                last_logout=row.last_logout,
                connected_hours=earlier.connected_hours + row.connected_hours,
                sessions=row.sessions, from_previous_day=earlier.from_previous_day,
                open_end=row.open_end)
        return tuple(sorted(merged.values(), key=lambda r: (r.day, r.user)))

    def _attendance_pieces(self, user: str, start: float, end: float, open_end: bool
                           ) -> Iterator[Attendance]:
        for day in self._days_of(start, end):
            lo = max(start, self._day_start(day))
            hi = min(end, self._day_start(day + timedelta(days=1)))
            if hi <= lo:
                continue
            yield Attendance(
                user=user, day=day, first_login=self._local(lo), last_logout=self._local(hi),
                connected_hours=(hi - lo) / 3600,
                sessions=self._started_per_user_day[(user, day)],
                from_previous_day=lo > start, open_end=open_end and hi == end)


def _iso_week(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def _union(intervals: list[_Interval]) -> list[tuple[float, float, bool]]:
    """Merged (start, end, open_end) blocks; open_end belongs to whichever interval ends last."""
    blocks: list[tuple[float, float, bool]] = []
    for interval in sorted(intervals, key=lambda i: (i.start, i.end)):
        if blocks and interval.start <= blocks[-1][1]:
            start, end, open_end = blocks[-1]
            if interval.end > end:
                end, open_end = interval.end, interval.open_end
            blocks[-1] = (start, end, open_end)
        else:
            blocks.append((interval.start, interval.end, interval.open_end))
    return blocks


def _concurrency(intervals: list[_Interval]) -> _Steps:
    """The seats-in-use step function from the sessions' intervals (shared seats merged)."""
    per_seat: defaultdict[str, list[_Interval]] = defaultdict(list)
    for interval in intervals:
        per_seat[interval.seat].append(interval)
    changes: list[tuple[float, int]] = []
    for seat_intervals in per_seat.values():
        for start, end, _ in _union(seat_intervals):
            changes.append((start, 1))
            changes.append((end, -1))
    changes.sort()  # at one instant -1 sorts before +1: a logout frees the seat first
    times: list[float] = []
    levels: list[int] = []
    level = 0
    for moment, delta in changes:
        level += delta
        if times and times[-1] == moment:
            levels[-1] = level
        else:
            times.append(moment)
            levels.append(level)
    return _Steps(times, levels)


def _step_rows(steps: _Steps, local: Any) -> tuple[ConcurrencyStep, ...]:
    rows: list[ConcurrencyStep] = []
    for moment, level in zip(steps.times, steps.levels, strict=True):
        if rows and rows[-1].seats == level:
            continue
        rows.append(ConcurrencyStep(local(moment), level))
    return tuple(rows)


def plural(count: int, noun: str) -> str:
    """``1 hour``, ``8 hours``: the line is read by people, not parsed."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def recommendation(*, peak: int, p95: int, seats: int | None, issued: tuple[str, ...] | None,
                   unused: tuple[str, ...] | None, full_hours: int, refusals: int) -> str:
    """The one line a manager reads: use against the contract, idle PCs, exhausted hours."""
    parts = [f"peak {peak} of {seats} seats" if seats is not None
             else f"peak {peak} seats (seat limit unknown)",
             f"95th percentile {p95}"]
    if issued is not None and unused is not None:
        parts.append(f"{len(issued)} PCs issued, {len(unused)} never used in this period")
    line = "; ".join(parts)
    if full_hours:
        line += (f". Seats were exhausted in {plural(full_hours, 'hour')} "
                 f"({plural(refusals, 'login')} refused): consider more seats")
    elif seats is not None and peak < seats:
        enough = max(1, math.ceil(peak * (1 + HEADROOM)))
        if enough < seats:
            line += (f". No login was refused; {enough} seats would have covered the peak "
                     f"with {round(HEADROOM * 100)} % headroom")
        else:
            line += ". No login was refused, but the peak came close to the limit"
    elif seats is not None:
        line += ". Every seat was in use at the peak, though no login was refused"
    return line + "."
