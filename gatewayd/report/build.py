"""Building a usage report from files: audit logs in chain order and the device inventory.

Owns `build_usage` (blocking: it streams every record of the given files through the
`UsageAggregator`; async callers run it with ``asyncio.to_thread``) and
`read_device_inventory`, which lists the PCs issued by the CA tooling.

Device inventory (``--devices PATH``): the CA directory of ``gatewayd certs`` (its
``index.json``, see `gatewayd.ca`), that ``index.json`` itself, or a plain text file with one
device id per line (``#`` starts a comment) for devices issued elsewhere. From an index, a PC
counts as issued in the period when one of its device certificates was issued before the
period ended, had not expired before it began, and had not been revoked before it began.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

from gatewayd.audit.query import query_files
from gatewayd.ca import INDEX_FILE, CaError, parse_index
from gatewayd.report.aggregate import DEFAULT_OFFICE_HOURS, UsageAggregator
from gatewayd.report.model import UsageReport

MalformedCallback = Callable[[Path, int], None]


class EmptyPeriodError(LookupError):
    """No audit record lies in the requested period (the CLI exits 1)."""


class InventoryError(ValueError):
    """The device inventory cannot be read or parsed (the CLI exits 2)."""


def build_usage(
    paths: Sequence[Path],
    *,
    since: datetime | None,
    until: datetime | None,
    seats: int | None,
    zone: ZoneInfo,
    devices_issued: Collection[str] | None = None,
    office_hours: tuple[time, time] = DEFAULT_OFFICE_HOURS,
    on_malformed: MalformedCallback | None = None,
) -> UsageReport:
    """Read ``paths`` (live and rotated audit files, any order) and build the report.

    ``since`` inclusive, ``until`` exclusive, both aware (None: the data's own first / last
    record). Blocking. Raises `EmptyPeriodError` when no record lies in the period, OSError
    when a file cannot be read, ValueError for an empty or naive period.
    """
    aggregator = UsageAggregator(since=since, until=until, zone=zone, office_hours=office_hours)
    # No time filter here: records before `since` say which sessions were already open.
    aggregator.feed_all(query_files(paths, on_malformed=on_malformed))
    report = aggregator.finish(seats=seats, devices_issued=devices_issued)
    if report is None:
        raise EmptyPeriodError("no audit records in the period")
    return report


def read_device_inventory(path: Path, *, since: datetime | None = None,
                          until: datetime | None = None) -> tuple[str, ...]:
    """The device ids issued (see the module docstring); raises `InventoryError`."""
    target = path / INDEX_FILE if path.is_dir() else path
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{target}: cannot read the device inventory: {exc}") from None
    if text.lstrip().startswith("{"):
        return _devices_from_index(text, str(target), since, until)
    devices = {line.split("#", 1)[0].strip() for line in text.splitlines()}
    return tuple(sorted(d for d in devices if d))


def _devices_from_index(text: str, source: str, since: datetime | None,
                        until: datetime | None) -> tuple[str, ...]:
    try:
        index = parse_index(text, source)
    except CaError as exc:
        raise InventoryError(str(exc)) from None
    issued: set[str] = set()
    for entry in index.certificates:
        if entry.kind != "device":
            continue
        if until is not None and entry.issued_at >= until:
            continue  # issued after the period
        if since is not None and (entry.not_after <= since
                                  or (entry.revoked_at is not None and entry.revoked_at <= since)):
            continue  # no longer usable when the period began
        issued.add(entry.name)
    return tuple(sorted(issued))
