"""Usage and sizing report from audit logs (``gatewayd report usage``; DESIGN.md ``report``).

Owns the public API the CLI and the admin console call:

* `build_usage` — stream audit files into a typed `UsageReport` (blocking; run it in a
  thread from async code); raises `EmptyPeriodError` when no record lies in the period;
* `render_text`, `render_csv`, `render_json`, `render_html` — the four output forms;
* `read_device_inventory` — the PCs issued by the CA tooling (for ``devices_issued``).

The modules behind it: `aggregate` (sans-IO core and the definitions of peak, p95,
attendance), `model` (the dataclasses), `build` (files), `render` (text/CSV/JSON, the CSV
contract), `html` (HTML + matplotlib charts), `cli` (the command).
"""

from gatewayd.report.aggregate import DEFAULT_OFFICE_HOURS, UsageAggregator
from gatewayd.report.build import (
    EmptyPeriodError,
    InventoryError,
    build_usage,
    read_device_inventory,
)
from gatewayd.report.html import render_html
from gatewayd.report.model import (
    Attendance,
    ConcurrencyStep,
    DayUsage,
    SeatsFullHour,
    ServiceUsage,
    UsageReport,
    WeekUsage,
)
from gatewayd.report.render import CSV_HEADER, render_csv, render_json, render_text

__all__ = [
    "CSV_HEADER",
    "DEFAULT_OFFICE_HOURS",
    "Attendance",
    "ConcurrencyStep",
    "DayUsage",
    "EmptyPeriodError",
    "InventoryError",
    "SeatsFullHour",
    "ServiceUsage",
    "UsageAggregator",
    "UsageReport",
    "WeekUsage",
    "build_usage",
    "read_device_inventory",
    "render_csv",
    "render_html",
    "render_json",
    "render_text",
]
