"""Audit tooling benchmark: the console's index and search, the export, the usage report.

Answers issue 7's "paginates large logs without loading them into memory" and "a manager can
open one HTML file" with numbers: on a generated month of audit data (`tests/audit_month.py`:
140 seats, 50 PCs, 160 staff, realistic office hours — the same data the report tests use;
for logs far larger than a month, ``tests/test_audit_index.py`` checks the 200k-record case) it
measures

* **index** — `AuditIndex.refresh` from nothing, then with nothing new (what a console page
  view costs when nobody wrote), and the index's size on disk;
* **search** — page 1 of "everything", of one user ("what did staff007 do"), of one user on
  one day ("last Tuesday"), of a filter that matches nothing (the worst page: it scans up to
  the cap), and `record(seq)`; each with the audit bytes the index read;
* **export** — `gatewayd audit export`'s CSV of the whole set (MB/s);
* **report** — `build_usage` and `render_html` (seconds, and the process's peak RSS).

There is nothing to compare against here (nginx and OpenSSH have no audit console); the
numbers are absolute, taken on this machine, and repeated runs vary with its load.

Usage (from the repository root)::

    .venv/bin/python bench/bench_audit.py [--keep]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from audit_month import ZONE, MonthTruth, generate_month  # noqa: E402

from gatewayd.audit.export import iter_csv  # noqa: E402
from gatewayd.audit.index import AuditIndex  # noqa: E402
from gatewayd.audit.query import RecordFilter, query_records  # noqa: E402
from gatewayd.report import build_usage, render_html  # noqa: E402

T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def bench_index(truth: MonthTruth, index_dir: Path) -> None:
    index = AuditIndex(truth.log_path, index_dir)
    _, build = timed(index.refresh)
    _, again = timed(index.refresh)
    bounds = index.bounds()
    assert bounds is not None
    print(f"index: built in {build:.2f} s for seqs {bounds[0]}-{bounds[1]}; refresh with "
          f"nothing new {again * 1000:.2f} ms; {dir_bytes(index_dir) / 1024:.1f} KiB on disk")
    tuesday = datetime(2026, 11, 24, tzinfo=ZONE)
    cases = {
        "everything, page 1": RecordFilter(),
        f"user {truth.known_user}, page 1": RecordFilter(user=truth.known_user),
        f"user {truth.known_user} on Tue 24 Nov": RecordFilter(
            user=truth.known_user, since=tuesday, until=tuesday + timedelta(days=1)),
        "no match (scans to the cap)": RecordFilter(user="nobody-at-all"),
    }
    for name, flt in cases.items():
        before = index.bytes_read
        page, seconds = timed(lambda flt=flt: index.search(flt, limit=50))
        print(f"search {name}: {seconds * 1000:.1f} ms, {len(page.records)} records, "
              f"{page.scanned} scanned, {(index.bytes_read - before) / 1024:.0f} KiB read")
    middle = (bounds[0] + bounds[1]) // 2
    before = index.bytes_read
    record, seconds = timed(lambda: index.record(middle))
    assert record is not None and record["seq"] == middle
    print(f"record(seq={middle}): {seconds * 1000:.1f} ms, "
          f"{(index.bytes_read - before) / 1024:.0f} KiB read")


def bench_export(truth: MonthTruth) -> None:
    def export() -> int:
        return sum(len(chunk.encode()) for chunk in iter_csv(
            query_records(truth.files(), RecordFilter())))
    size, seconds = timed(export)
    print(f"export csv: {size / 1e6:.1f} MB in {seconds:.2f} s ({size / 1e6 / seconds:.0f} MB/s)")


def bench_report(truth: MonthTruth) -> None:
    rss_before = peak_rss_mib()
    report, build = timed(lambda: build_usage(
        truth.files(), since=None, until=None, seats=truth.seats, zone=ZONE,
        devices_issued=truth.devices_issued))
    rss_build = peak_rss_mib()
    html, render = timed(lambda: render_html(report))
    print(f"report: build_usage {build:.2f} s (peak RSS {rss_before:.0f} -> {rss_build:.0f} MiB),"
          f" render_html {render:.2f} s (peak RSS {peak_rss_mib():.0f} MiB), "
          f"HTML {len(html.encode()) / 1024:.0f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the generated log directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gatewayd-bench-audit-"))
    try:
        truth, seconds = timed(lambda: generate_month(work / "log"))
        size = sum(p.stat().st_size for p in truth.files())
        print(f"generated {truth.records} records in {len(truth.files())} files "
              f"({size / 1e6:.1f} MB) in {seconds:.1f} s")
        (work / "index").mkdir()
        bench_index(truth, work / "index")
        bench_export(truth)
        bench_report(truth)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
