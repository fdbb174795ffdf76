"""Plain renderers of a `UsageReport`: text (terminal), CSV (spreadsheets), JSON (scripts).

Owns the text layout and the CSV contract. Values from the log (user names, service and
device ids) are untrusted: the text form passes them through `display_text` so a tampered log
cannot drive a terminal; CSV cells are written by the audit export's
`gatewayd.audit.export.safe_cell` — one that a spreadsheet would run as a formula (``=``, ``+``,
``-``, ``@``, their full-width forms, also after leading whitespace; TAB, CR) is prefixed with
``'``, and controls are escaped as the audit export escapes them; JSON escapes as
`gatewayd.audit.query.json_line` does.

CSV layout (stable; a long "tidy" table that pivots in any spreadsheet). Header::

    section,period,subject,metric,value

=============  ========================  ==============  ========================================
section        period                    subject         metrics
=============  ========================  ==============  ========================================
``summary``    (empty)                   (empty)         period_start, period_end, zone, seats
                                                         (empty if unknown), peak, peak_at, p95,
                                                         days_in_use, users, sessions, records,
                                                         refusals, devices_seen, devices_issued,
                                                         devices_unused, recommendation
``day``        ``YYYY-MM-DD``            (empty)         peak, peak_at, p95, users, devices,
                                                         sessions, refusals, seat_hours
``week``       ``YYYY-Www``              (empty)         peak, users, devices
``seats_full`` ``YYYY-MM-DDTHH:00``      (empty)         refusals, users
``service``    (empty)                   service name    sessions, users, requests, tunnels,
                                                         denied, bytes_up, bytes_down
``attendance`` ``YYYY-MM-DD``            user name       first_login, last_logout (``HH:MM``),
                                                         connected_hours, sessions,
                                                         from_previous_day, open_end (0/1)
``unused``     (empty)                   device id       issued_unused (always 1)
=============  ========================  ==============  ========================================

Times are in the report's zone; hours are decimal with two places.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Final

from gatewayd.audit.events import display_text
from gatewayd.audit.export import safe_cell
from gatewayd.audit.query import json_line
from gatewayd.report.model import UsageReport

CSV_HEADER: Final = ("section", "period", "subject", "metric", "value")
_MAX_TEXT_ATTENDANCE: Final = 40  # rows of attendance shown by the text form; CSV/JSON have all

Row = tuple[str, str, str, str, str]


def _when(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat(timespec="seconds")


def _hours(value: float) -> str:
    return f"{value:.2f}"


def csv_rows(report: UsageReport) -> Iterator[Row]:
    """The CSV body (without the header) as tuples of strings."""
    devices_issued = "" if report.devices_issued is None else str(len(report.devices_issued))
    devices_unused = "" if report.devices_unused is None else str(len(report.devices_unused))
    summary = {
        "period_start": _when(report.period_start), "period_end": _when(report.period_end),
        "zone": report.zone, "seats": "" if report.seats is None else str(report.seats),
        "peak": str(report.peak), "peak_at": _when(report.peak_at), "p95": str(report.p95),
        "days_in_use": str(report.days_in_use), "users": str(report.users),
        "sessions": str(report.sessions), "records": str(report.records),
        "refusals": str(report.refusals), "devices_seen": str(len(report.devices_seen)),
        "devices_issued": devices_issued, "devices_unused": devices_unused,
        "recommendation": report.recommendation,
    }
    for metric, value in summary.items():
        yield ("summary", "", "", metric, value)
    for day in report.days:
        when = day.day.isoformat()
        for metric, value in (
            ("peak", str(day.peak)), ("peak_at", _when(day.peak_at)), ("p95", str(day.p95)),
            ("users", str(day.users)), ("devices", str(day.devices)),
            ("sessions", str(day.sessions)), ("refusals", str(day.refusals)),
            ("seat_hours", _hours(day.seat_hours)),
        ):
            yield ("day", when, "", metric, value)
    for week in report.weeks:
        for metric, count in (("peak", week.peak), ("users", week.users),
                              ("devices", week.devices)):
            yield ("week", week.week, "", metric, str(count))
    for hour in report.seats_full_hours:
        when = hour.hour.strftime("%Y-%m-%dT%H:00")
        yield ("seats_full", when, "", "refusals", str(hour.refusals))
        yield ("seats_full", when, "", "users", str(hour.users))
    for service in report.services:
        for metric, count in (
            ("sessions", service.sessions), ("users", service.users),
            ("requests", service.requests), ("tunnels", service.tunnels),
            ("denied", service.denied), ("bytes_up", service.bytes_up),
            ("bytes_down", service.bytes_down),
        ):
            yield ("service", "", service.service, metric, str(count))
    for row in report.attendance:
        when = row.day.isoformat()
        for metric, value in (
            ("first_login", row.first_login.strftime("%H:%M")),
            ("last_logout", row.last_logout.strftime("%H:%M")),
            ("connected_hours", _hours(row.connected_hours)), ("sessions", str(row.sessions)),
            ("from_previous_day", str(int(row.from_previous_day))),
            ("open_end", str(int(row.open_end))),
        ):
            yield ("attendance", when, row.user, metric, value)
    for device in report.devices_unused or ():
        yield ("unused", "", device, "issued_unused", "1")


def render_csv(report: UsageReport) -> str:
    """The report as CSV (see the module docstring for the layout)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for row in csv_rows(report):
        writer.writerow([safe_cell(cell) for cell in row])  # no formula runs (CWE-1236)
    return buffer.getvalue()


def render_json(report: UsageReport) -> str:
    """The report as one JSON object (one line, terminal-safe), ending with a newline."""
    return json_line(report.to_json()) + "\n"


def render_text(report: UsageReport) -> str:
    """A terminal summary: headline, per-day table, exhausted hours, services, attendance."""
    out: list[str] = []
    start, end = report.period_start, report.period_end
    out.append(f"Usage report {start:%Y-%m-%d %H:%M} - {end:%Y-%m-%d %H:%M} ({report.zone})")
    out.append(display_text(report.recommendation))
    office = f"{report.office_hours[0]:%H:%M}-{report.office_hours[1]:%H:%M}"
    out.append(f"p95 over office hours {office} of {report.days_in_use} day(s) in use; "
               f"{report.users} users, {report.sessions} sessions, "
               f"{len(report.devices_seen)} devices seen, {report.records} records")
    out.append("")
    out.append(f"{'DAY':<15} {'PEAK':>5} {'AT':>6} {'P95':>5} {'USERS':>6} {'DEVICES':>8} "
               f"{'SESSIONS':>9} {'REFUSED':>8} {'SEAT-H':>8}")
    for day in report.days:
        at = f"{day.peak_at:%H:%M}" if day.peak_at else "-"
        out.append(f"{day.day:%Y-%m-%d %a} {day.peak:>5} {at:>6} {day.p95:>5} {day.users:>6} "
                   f"{day.devices:>8} {day.sessions:>9} {day.refusals:>8} "
                   f"{day.seat_hours:>8.1f}")
    out.append("")
    out.append(f"{'WEEK':<10} {'PEAK':>5} {'USERS':>6} {'DEVICES':>8}")
    out.extend(f"{w.week:<10} {w.peak:>5} {w.users:>6} {w.devices:>8}" for w in report.weeks)
    out.append("")
    if report.seats_full_hours:
        out.append("Hours with every seat taken (logins refused):")
        out.extend(f"  {h.hour:%Y-%m-%d %H:00}  {h.refusals} refused, {h.users} user(s)"
                   for h in report.seats_full_hours)
    else:
        out.append("No login was refused for lack of seats.")
    out.append("")
    out.append(f"{'SERVICE':<16} {'SESSIONS':>9} {'USERS':>6} {'REQUESTS':>9} {'TUNNELS':>8} "
               f"{'DENIED':>7} {'MB UP':>9} {'MB DOWN':>9}")
    for s in report.services:
        out.append(f"{display_text(s.service):<16} {s.sessions:>9} {s.users:>6} "
                   f"{s.requests:>9} {s.tunnels:>8} {s.denied:>7} "
                   f"{s.bytes_up / 1e6:>9.1f} {s.bytes_down / 1e6:>9.1f}")
    out.append("")
    out.extend(_attendance_text(report))
    if report.devices_unused:
        out.append("")
        out.append("Issued PCs not used in this period: "
                   + " ".join(display_text(d) for d in report.devices_unused))
    for note in report.notes:
        out.append(f"note: {display_text(note)}")
    return "\n".join(out) + "\n"


def _attendance_text(report: UsageReport) -> list[str]:
    rows = report.attendance
    lines = [f"Attendance ({len(rows)} user-days"
             + (f"; first {_MAX_TEXT_ATTENDANCE} shown, all in --format csv/json/html)"
                if len(rows) > _MAX_TEXT_ATTENDANCE else ")"),
             f"{'DAY':<11} {'USER':<20} {'FIRST':>6} {'LAST':>6} {'HOURS':>6}"]
    for row in rows[:_MAX_TEXT_ATTENDANCE]:
        first = f"{row.first_login:%H:%M}" + ("<" if row.from_previous_day else "")
        last = f"{row.last_logout:%H:%M}" + ("?" if row.open_end else "")
        lines.append(f"{row.day:%Y-%m-%d} {display_text(row.user):<20} {first:>6} {last:>6} "
                     f"{row.connected_hours:>6.2f}")
    lines.append("(< connected since the previous day; ? no logout recorded)")
    return lines
