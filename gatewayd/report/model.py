"""The usage report as data: typed, frozen results of `gatewayd.report.aggregate`.

Owns the `UsageReport` dataclass tree and its JSON form (`UsageReport.to_json`). Every time
is timezone-aware in the report's zone; days are calendar days in that zone and weeks are ISO
weeks (``2026-W47``). Renderers (`gatewayd.report.render`, `gatewayd.report.html`) only read
these objects; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from datetime import date, datetime, time
from typing import Any


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One calendar day. ``p95`` is time-weighted over that day's office hours (see
    `gatewayd.report.aggregate`); ``seat_hours`` integrates the seats in use over the day."""

    day: date
    peak: int
    peak_at: datetime | None  # first moment the peak was reached; None on an empty day
    p95: int
    users: int  # distinct users connected at any time of the day
    devices: int  # distinct devices (the sessions' ``device``) connected that day
    sessions: int  # sessions started that day
    refusals: int  # logins refused because every seat was taken (auth.failure seats_full)
    seat_hours: float


@dataclass(frozen=True, slots=True)
class WeekUsage:
    """One ISO week (Monday to Sunday, in the report's zone), clipped to the period."""

    week: str  # "2026-W47"
    peak: int
    users: int
    devices: int


@dataclass(frozen=True, slots=True)
class SeatsFullHour:
    """An hour in which logins were refused because every seat was taken."""

    hour: datetime  # start of the hour
    refusals: int
    users: int  # distinct users refused in that hour


@dataclass(frozen=True, slots=True)
class ServiceUsage:
    """Use of one service in the period.

    ``requests`` counts allowed HTTP requests (``access.allow``), ``tunnels`` opened SSH
    tunnels (``tunnel.open``), ``denied`` refusals (``access.deny`` + ``tunnel.deny``); bytes
    come from ``access.end`` and ``tunnel.close`` and count toward the period in which the
    transfer ended. ``sessions`` / ``users``: distinct sessions / users that used the service.
    """

    service: str
    sessions: int
    users: int
    requests: int
    tunnels: int
    denied: int
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True, slots=True)
class Attendance:
    """One user's connected time on one day (telework attendance).

    ``connected_hours`` is the length of the *union* of the user's session intervals on that
    day (two parallel sessions are not double hours). ``from_previous_day``: connected at
    midnight (first_login is then 00:00). ``open_end``: the last interval did not end with a
    ``session.end`` (the gateway restarted, or the period/log ended), so last_logout is the last
    moment the session is known to have existed.
    """

    user: str
    day: date
    first_login: datetime
    last_logout: datetime
    connected_hours: float
    sessions: int  # sessions started that day
    from_previous_day: bool
    open_end: bool


@dataclass(frozen=True, slots=True)
class ConcurrencyStep:
    """From ``at`` on (until the next step), ``seats`` seats were in use."""

    at: datetime
    seats: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Everything `build_usage` found; see `gatewayd.report.aggregate` for the definitions."""

    period_start: datetime
    period_end: datetime  # exclusive
    zone: str
    office_hours: tuple[time, time]  # the window the p95 is taken over, each day
    seats: int | None  # the seat limit, None when unknown
    records: int  # audit records with a time inside the period
    sessions: int  # sessions connected at some time in the period
    peak: int
    peak_at: datetime | None
    p95: int
    days_in_use: int  # days with someone connected during office hours
    users: int  # distinct users connected in the period
    devices_seen: tuple[str, ...]
    devices_issued: tuple[str, ...] | None  # None: no inventory given
    devices_unused: tuple[str, ...] | None
    refusals: int
    days: tuple[DayUsage, ...]
    weeks: tuple[WeekUsage, ...]
    seats_full_hours: tuple[SeatsFullHour, ...]
    services: tuple[ServiceUsage, ...]
    attendance: tuple[Attendance, ...]
    steps: tuple[ConcurrencyStep, ...]
    notes: tuple[str, ...]
    recommendation: str

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: times as RFC 3339, days as ``YYYY-MM-DD``."""
        result = _jsonable(self)
        assert isinstance(result, dict)
        return result


def _jsonable(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    if isinstance(value, float):
        return round(value, 3)
    return value
