"""The ``gatewayd report usage`` command (offline, read-only on the audit files).

Owns `register`, which the root CLI calls with its subparsers; the subcommand sets ``func``
to a callable taking the parsed Namespace and returning the exit status.

``gatewayd report usage FILE… [--from DATE] [--to DATE] [--tz ZONE] [--seats N | --config PATH]
[--devices PATH] [--format text|csv|json|html] [--out PATH]``

* ``--from`` / ``--to`` are days ``YYYY-MM-DD`` in ``--tz`` (default Asia/Tokyo, the default
  ``audit.timezone``), both inclusive: ``--from 2026-11-01 --to 2026-11-30`` is November.
* The seat limit is ``--seats``, else ``sessions.max_concurrent`` of ``--config``, else of
  ``$GATEWAYD_CONFIG`` / ``/etc/gatewayd/gatewayd.toml`` when that file exists; otherwise the
  report says "seat limit unknown". ``audit.timezone`` of that config is the default zone.
* ``--devices``: the CA directory (``index.json``) or a list of device ids, one per line
  (see `gatewayd.report.build`): "50 PCs issued, 12 never used".
* ``--out``: the report is written there (mode 0640: it names people), atomically;
  default stdout.

Exit status: 0 report written, 1 no audit record in the period, 2 usage error (unreadable
file, bad date or zone, unreadable config or inventory). Key files, lock files and
quarantined torn lines picked up by a glob (``audit.log*``) are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Final
from zoneinfo import ZoneInfo

from gatewayd.audit.cli import log_files, zone_argument
from gatewayd.audit.events import display_text
from gatewayd.audit.writer import DEFAULT_TIMEZONE
from gatewayd.config import ConfigError, Settings, default_config_path, load_settings
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE
from gatewayd.files import atomic_write
from gatewayd.report.build import (
    EmptyPeriodError,
    InventoryError,
    build_usage,
    read_device_inventory,
)
from gatewayd.report.html import render_html
from gatewayd.report.model import UsageReport
from gatewayd.report.render import render_csv, render_json, render_text

RENDERERS: Final[Mapping[str, Callable[[UsageReport], str]]] = MappingProxyType({
    "text": render_text, "csv": render_csv, "json": render_json, "html": render_html,
})
_PROG: Final = "gatewayd report usage"
_REPORT_MODE: Final = 0o640
# Public keys, quarantined torn lines, temporary and lock files (as in gatewayd.audit.cli).

class _UsageError(Exception):
    """A problem with the command line or its inputs: one message, exit 2."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report usage`` to the root parser's subcommands."""
    report = subparsers.add_parser(
        "report", help="usage and sizing reports from the audit log",
        description="Reports built from audit files (read-only).",
    )
    commands = report.add_subparsers(dest="report_command", metavar="COMMAND", required=True)
    usage = commands.add_parser(
        "usage", help="seats, sessions, services and attendance over a period",
        description="Peak and 95th-percentile seats in use per day against the seat limit, "
        "hours in which every seat was taken, users and devices per day and week, use per "
        "service, and per-user attendance. Exit 0 report written, 1 no records in the "
        "period, 2 usage error.",
    )
    usage.add_argument("files", nargs="+", type=Path, metavar="FILE",
                       help="audit files, live and rotated, any order (e.g. audit.log*)")
    usage.add_argument("--from", dest="from_day", type=_day, metavar="DATE",
                       help="first day, YYYY-MM-DD in ZONE (inclusive)")
    usage.add_argument("--to", dest="to_day", type=_day, metavar="DATE",
                       help="last day, YYYY-MM-DD in ZONE (inclusive)")
    usage.add_argument("--tz", type=zone_argument, metavar="ZONE",
                       help="IANA zone for days and times (default: audit.timezone of the "
                       f"config, else {DEFAULT_TIMEZONE.key})")
    usage.add_argument("--seats", type=_positive, metavar="N",
                       help="the seat limit (default: sessions.max_concurrent of the config)")
    usage.add_argument("--config", type=Path, metavar="PATH",
                       help="gatewayd config to read the seat limit and zone from (default: "
                       "$GATEWAYD_CONFIG or /etc/gatewayd/gatewayd.toml, if it exists)")
    usage.add_argument("--devices", type=Path, metavar="PATH",
                       help="issued devices: the CA directory of `gatewayd certs`, its "
                       "index.json, or a file with one device id per line")
    usage.add_argument("--format", choices=sorted(RENDERERS), default="text")
    usage.add_argument("--out", type=Path, metavar="PATH", help="write here instead of stdout")
    usage.set_defaults(func=run_usage)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a day YYYY-MM-DD: {text!r}") from exc


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of seats, got {text!r}")
    return value


def _settings(path: Path | None) -> Settings | None:
    """The config named by --config (must load), or the default one if it exists and loads.

    The default config is only a convenience: one this user may not read (it is usually
    root:gatewayd 0640) or that does not validate is reported and then ignored, so that
    ``--seats`` and ``--tz`` still work for staff without access to it.
    """
    if path is None:
        default = default_config_path()
        if not default.is_file():
            return None
        try:
            return _load(default)
        except _UsageError as exc:
            print(f"{_PROG}: note: ignoring {display_text(str(exc))}", file=sys.stderr)
            return None
    return _load(path)


def _load(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise _UsageError("; ".join(exc.errors) or f"{path}: invalid config") from None
    except OSError as exc:
        raise _UsageError(f"{path}: cannot read the config: {exc.strerror or exc}") from None


def _period(args: argparse.Namespace, zone: ZoneInfo) -> tuple[datetime | None, datetime | None]:
    since = None if args.from_day is None else datetime.combine(args.from_day, time(0), zone)
    until = (None if args.to_day is None
             else datetime.combine(args.to_day + timedelta(days=1), time(0), zone))
    if since is not None and until is not None and until <= since:
        raise _UsageError("--to is before --from")
    return since, until


def run_usage(args: argparse.Namespace) -> int:
    err = sys.stderr
    paths = log_files(args.files, _PROG, sys.stderr)
    if paths is None:
        return EXIT_USAGE
    try:
        # The config supplies the seat limit and the zone: read it unless both were given.
        wanted = args.config is not None or args.seats is None or args.tz is None
        settings = _settings(args.config) if wanted else None
        zone: ZoneInfo = args.tz or (settings.audit.zone if settings else DEFAULT_TIMEZONE)
        seats = args.seats or (settings.sessions.max_concurrent if settings else None)
        since, until = _period(args, zone)
        issued = (None if args.devices is None
                  else read_device_inventory(args.devices, since=since, until=until))
        report = build_usage(paths, since=since, until=until, seats=seats, zone=zone,
                             devices_issued=issued, on_malformed=_warn_malformed)
        _write(RENDERERS[args.format](report), args.out)
    except EmptyPeriodError:
        print(f"{_PROG}: no audit records in the period", file=err)
        return EXIT_NEGATIVE
    except (_UsageError, InventoryError, ValueError) as exc:
        print(f"{_PROG}: error: {display_text(str(exc))}", file=err)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{_PROG}: error: {display_text(where + (exc.strerror or str(exc)))}", file=err)
        return EXIT_USAGE
    return EXIT_OK


def _warn_malformed(path: Path, line: int) -> None:
    print(f"warning: {display_text(str(path))}:{line}: not a valid record, skipped "
          "(run `gatewayd audit verify`)", file=sys.stderr)


def _write(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write(out, text.encode("utf-8"), mode=_REPORT_MODE, overwrite=True)
