"""Tests of gatewayd.report: the aggregation rules (unit tables on plain records), the report
of a generated month checked against the generator's own truth, and the HTML output (SVG
inline, self-contained, escaped, and rendered by headless Chromium to a non-blank image)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time as clock
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from audit_month import MonthTruth, generate_month

from gatewayd.audit import verify_files
from gatewayd.report import (
    CSV_HEADER,
    EmptyPeriodError,
    UsageAggregator,
    UsageReport,
    build_usage,
    render_csv,
    render_html,
    render_json,
    render_text,
)
from gatewayd.report.aggregate import time_weighted_percentile
from gatewayd.report.model import Attendance

TOKYO = ZoneInfo("Asia/Tokyo")
DAY = date(2026, 11, 17)  # a Tuesday


def at(hhmm: str, day: date = DAY) -> datetime:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return datetime.combine(day, time(0), TOKYO) + timedelta(hours=hour, minutes=minute)


def rec(event: str, moment: datetime, node: str = "gw1", **fields: Any) -> dict[str, Any]:
    return {"event": event, "ts": moment.isoformat(), "node": node, **fields}


def start(handle: str, moment: datetime, user: str = "alice", **fields: Any) -> dict[str, Any]:
    return rec("session.start", moment, session=handle, user=user,
               **{"frontend": "https", **fields})


def end(handle: str, moment: datetime, user: str = "alice", **fields: Any) -> dict[str, Any]:
    return rec("session.end", moment, session=handle, user=user, reason="logout", **fields)


def report_of(records: list[dict[str, Any]], *, since: datetime | None = None,
              until: datetime | None = None, seats: int | None = 10,
              devices: tuple[str, ...] | None = None) -> UsageReport:
    aggregator = UsageAggregator(since=since, until=until, zone=TOKYO)
    aggregator.feed_all(records)
    report = aggregator.finish(seats=seats, devices_issued=devices)
    assert report is not None
    return report


def day_row(report: UsageReport, day: date = DAY) -> Any:
    return next(row for row in report.days if row.day == day)


def attendance(report: UsageReport, user: str, day: date = DAY) -> Attendance:
    return next(row for row in report.attendance if row.user == user and row.day == day)


# ------------------------------------------------------------------ concurrency rules


def test_overlapping_sessions_peak_at_the_moment_all_three_overlap() -> None:
    report = report_of([
        start("a", at("09:00"), "alice"), start("b", at("10:00"), "bob"),
        start("c", at("10:30"), "carol"), end("c", at("10:45"), "carol"),
        end("a", at("11:00"), "alice"), end("b", at("12:00"), "bob"),
    ])
    assert (report.peak, report.peak_at) == (3, at("10:30"))
    assert [(s.at, s.seats) for s in report.steps] == [
        (at("09:00"), 1), (at("10:00"), 2), (at("10:30"), 3), (at("10:45"), 2),
        (at("11:00"), 1), (at("12:00"), 0)]
    row = day_row(report)
    assert (row.peak, row.users, row.sessions) == (3, 3, 3)
    assert row.seat_hours == pytest.approx(2 + 2 + 0.25)


def test_a_logout_and_a_login_at_the_same_instant_do_not_overlap() -> None:
    report = report_of([start("a", at("09:00")), end("a", at("10:00")),
                        start("b", at("10:00"), "bob"), end("b", at("11:00"), "bob")])
    assert report.peak == 1


def test_an_ssh_session_from_a_portal_certificate_shares_the_portal_seat() -> None:
    shared = report_of([
        start("p", at("09:00")),
        start("s", at("10:00"), frontend="ssh", reason="portal session p"),
        end("s", at("11:00")), end("p", at("17:00")),
    ])
    assert shared.peak == 1
    own_seat = report_of([start("p", at("09:00")), start("s", at("10:00")),
                          end("s", at("11:00")), end("p", at("17:00"))])
    assert own_seat.peak == 2
    # Attendance is the union either way: two parallel sessions are not double hours.
    assert attendance(shared, "alice").connected_hours == pytest.approx(8)
    assert attendance(own_seat, "alice").connected_hours == pytest.approx(8)


def test_a_restart_closes_the_nodes_open_sessions_when_it_was_last_alive() -> None:
    report = report_of([
        start("a", at("09:00")), start("b", at("09:30"), "bob", node="gw2"),
        rec("access.allow", at("10:00"), user="alice", session="a", service="groupware"),
        # gw1 crashed after 10:00; its restart signs what the dead run left, then starts.
        rec("audit.checkpoint", at("14:00"), reason="start"),
        rec("audit.start", at("14:00"), reason="restart after an unclean shutdown"),
        start("c", at("14:10")), end("c", at("15:00")), end("b", at("16:00"), "bob", node="gw2"),
    ])
    alice = attendance(report, "alice")
    assert (alice.first_login, alice.last_logout) == (at("09:00"), at("15:00"))
    assert alice.connected_hours == pytest.approx(1 + 50 / 60)  # 09:00-10:00 and 14:10-15:00
    bob = attendance(report, "bob")  # the other node's session was not touched
    assert (bob.last_logout, bob.open_end) == (at("16:00"), False)
    assert report.peak == 2
    assert any("closed at a gateway restart: 1" in note for note in report.notes)


def test_a_session_across_midnight_counts_toward_both_days() -> None:
    next_day = DAY + timedelta(days=1)
    report = report_of([start("a", at("22:00")), end("a", at("02:00", next_day))])
    first, second = attendance(report, "alice"), attendance(report, "alice", next_day)
    assert (first.first_login, first.last_logout, first.connected_hours) == (
        at("22:00"), at("00:00", next_day), pytest.approx(2))
    assert (second.first_login, second.last_logout, second.connected_hours) == (
        at("00:00", next_day), at("02:00", next_day), pytest.approx(2))
    assert (first.from_previous_day, second.from_previous_day) == (False, True)
    assert [row.peak for row in report.days] == [1, 1]
    assert second.sessions == 0  # started the day before


def test_a_session_across_the_period_boundary_is_clipped_to_the_period() -> None:
    next_day = DAY + timedelta(days=1)
    records = [start("a", at("20:00")), end("a", at("03:00", next_day)),
               start("b", at("09:00", next_day), "bob"), end("b", at("10:00", next_day), "bob")]
    only_first = report_of(records, since=at("00:00"), until=at("00:00", next_day))
    assert [row.day for row in only_first.days] == [DAY]
    assert attendance(only_first, "alice").connected_hours == pytest.approx(4)
    assert only_first.users == 1
    only_second = report_of(records, since=at("00:00", next_day))
    alice = attendance(only_second, "alice", next_day)
    assert (alice.first_login, alice.connected_hours) == (at("00:00", next_day),
                                                         pytest.approx(3))
    assert alice.sessions == 0 and only_second.peak == 1 and only_second.users == 2


def test_a_session_still_open_at_the_end_of_the_data_is_cut_there_and_marked() -> None:
    report = report_of([start("a", at("09:00")),
                        rec("access.allow", at("11:30"), user="alice", service="files")])
    alice = attendance(report, "alice")
    assert (alice.last_logout, alice.open_end) == (at("11:30"), True)


def test_an_end_whose_start_was_rotated_away_is_placed_by_its_duration() -> None:
    report = report_of([end("a", at("12:00"), duration_ms=3 * 3600 * 1000)],
                       since=at("00:00"))
    assert attendance(report, "alice").first_login == at("09:00")


def test_seats_full_refusals_are_counted_per_hour() -> None:
    report = report_of([
        rec("auth.failure", at("09:01"), user="dave", reason="seats_full"),
        rec("auth.failure", at("09:20"), user="dave", reason="seats_full"),
        rec("auth.failure", at("09:59"), user="erin", reason="seats_full"),
        rec("auth.failure", at("10:05"), user="erin", reason="seats_full"),
        rec("auth.failure", at("10:06"), user="frank", reason="bad_password"),
    ], seats=2)
    assert [(h.hour, h.refusals, h.users) for h in report.seats_full_hours] == [
        (at("09:00"), 3, 2), (at("10:00"), 1, 1)]
    assert report.refusals == 4 and day_row(report).refusals == 4
    assert "exhausted in 2 hours (4 logins refused): consider more seats" in (
        report.recommendation)


@pytest.mark.parametrize(("busy_minutes", "expected"), [(60, 2), (37, 2), (36, 1), (30, 1)])
def test_p95_is_time_weighted_over_office_hours(busy_minutes: int, expected: int) -> None:
    """08:00-20:00 is 720 minutes; 5 % of it is 36 minutes: two seats for more than 36 minutes
    make the 95th percentile 2; for 36 minutes or less one seat covered 95 % of the window."""
    second = at("10:00") + timedelta(minutes=busy_minutes)
    report = report_of([
        start("a", at("07:00")), start("b", at("10:00"), "bob"), end("b", second, "bob"),
        end("a", at("21:00")),
        # Night use is outside office hours: it makes the peak, not the p95.
        start("n1", at("22:00"), "night1"), start("n2", at("22:00"), "night2"),
        start("n3", at("22:00"), "night3"), end("n1", at("23:00"), "night1"),
        end("n2", at("23:00"), "night2"), end("n3", at("23:00"), "night3"),
    ])
    assert day_row(report).p95 == expected
    assert report.p95 == expected
    assert report.peak == 3


def test_time_weighted_percentile_table() -> None:
    assert time_weighted_percentile({}, 0.95) == 0
    assert time_weighted_percentile({0: 50.0, 4: 50.0}, 0.95) == 4
    assert time_weighted_percentile({3: 95.0, 9: 5.0}, 0.95) == 3
    assert time_weighted_percentile({3: 94.0, 9: 6.0}, 0.95) == 9


def test_services_count_requests_tunnels_denials_and_bytes() -> None:
    report = report_of([
        start("a", at("09:00")),
        rec("access.allow", at("09:01"), user="alice", session="a", service="groupware"),
        rec("access.end", at("09:01"), user="alice", session="a", service="groupware",
            bytes_up=100, bytes_down=5000),
        rec("access.allow", at("09:02"), user="alice", session="a", service="groupware"),
        rec("access.deny", at("09:03"), user="alice", session="a", service="approval"),
        rec("tunnel.open", at("09:04"), user="bob", session="b", service="fileshare"),
        rec("tunnel.close", at("09:30"), user="bob", session="b", service="fileshare",
            bytes_up=7, bytes_down=9),
        end("a", at("10:00")),
    ])
    rows = {s.service: s for s in report.services}
    assert (rows["groupware"].requests, rows["groupware"].bytes_down,
            rows["groupware"].sessions) == (2, 5000, 1)
    assert (rows["approval"].denied, rows["approval"].requests) == (1, 0)
    assert (rows["fileshare"].tunnels, rows["fileshare"].bytes_up,
            rows["fileshare"].bytes_down, rows["fileshare"].users) == (1, 7, 9, 1)


def test_users_and_devices_per_day_and_week_and_unused_devices() -> None:
    monday = DAY - timedelta(days=1)
    report = report_of([
        start("a", at("09:00", monday), device="pc-001"), end("a", at("10:00", monday)),
        start("b", at("09:00"), "bob", device="pc-002"), end("b", at("10:00"), "bob"),
        start("c", at("11:00"), device="pc-001"), end("c", at("12:00")),
    ], devices=("pc-001", "pc-002", "pc-003"))
    assert [(d.day, d.users, d.devices) for d in report.days] == [(monday, 1, 1), (DAY, 2, 2)]
    assert [(w.week, w.users, w.devices) for w in report.weeks] == [("2026-W47", 2, 2)]
    assert report.devices_unused == ("pc-003",)
    assert "3 PCs issued, 1 never used in this period" in report.recommendation


def test_recommendation_wording_without_refusals_and_without_a_limit() -> None:
    records = [start("a", at("09:00")), end("a", at("10:00"))]
    assert report_of(records, seats=None).recommendation.startswith(
        "peak 1 seats (seat limit unknown); 95th percentile")
    roomy = report_of(records, seats=140).recommendation
    assert roomy.startswith("peak 1 of 140 seats;")
    assert "No login was refused; 2 seats would have covered the peak" in roomy


def test_no_record_in_the_period_gives_no_report() -> None:
    aggregator = UsageAggregator(since=at("00:00", DAY + timedelta(days=5)), until=None,
                                 zone=TOKYO)
    aggregator.feed_all([start("a", at("09:00")), end("a", at("10:00"))])
    assert aggregator.finish(seats=5) is None


def test_naive_or_empty_periods_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        UsageAggregator(since=datetime(2026, 11, 1), until=None, zone=TOKYO)
    with pytest.raises(ValueError, match="empty"):
        UsageAggregator(since=at("10:00"), until=at("09:00"), zone=TOKYO)


# ------------------------------------------------------------------ the generated month


@pytest.fixture(scope="module")
def month(tmp_path_factory: pytest.TempPathFactory) -> MonthTruth:
    return generate_month(tmp_path_factory.mktemp("month"))


@pytest.fixture(scope="module")
def month_report(month: MonthTruth) -> UsageReport:
    return build_usage(
        month.files(), since=datetime(2026, 11, 1, tzinfo=TOKYO),
        until=datetime(2026, 12, 1, tzinfo=TOKYO), seats=month.seats, zone=TOKYO,
        devices_issued=month.devices_issued)


def test_the_generated_month_is_a_real_verifiable_audit_log(month: MonthTruth) -> None:
    result = verify_files(month.files(), month.public_key)
    assert result.ok, result.problem
    assert result.records >= month.records
    assert len(month.files()) >= 28  # rotated by day


def test_month_peak_and_p95_per_day_match_the_simulation(
        month: MonthTruth, month_report: UsageReport) -> None:
    assert {d.day: d.peak for d in month_report.days} == month.peak_per_day
    assert {d.day: d.p95 for d in month_report.days} == month.p95_per_day
    assert (month_report.peak, month_report.p95) == (month.peak, month.p95)
    assert month.peak == month.seats  # the emergency days filled every seat
    weekday = date(2026, 11, 17)
    assert 30 <= month.peak_per_day[weekday] <= 80  # an ordinary day: realistic load
    assert month.p95_per_day[weekday] <= month.peak_per_day[weekday]


def test_month_seats_full_hours_match_the_simulation(
        month: MonthTruth, month_report: UsageReport) -> None:
    assert {h.hour: h.refusals for h in month_report.seats_full_hours} == (
        month.refusals_per_hour)
    assert {d.day: d.refusals for d in month_report.days if d.refusals} == (
        month.refusals_per_day)
    assert "consider more seats" in month_report.recommendation


def test_month_attendance_of_the_known_user(
        month: MonthTruth, month_report: UsageReport) -> None:
    rows = {a.day: a for a in month_report.attendance if a.user == month.known_user}
    assert set(rows) == set(month.known_attendance)
    for day, truth in month.known_attendance.items():
        row = rows[day]
        assert (row.first_login, row.last_logout) == (truth.first_login, truth.last_logout)
        assert row.connected_hours * 3600 == pytest.approx(truth.connected_seconds)
    # The evening session of 5 November ran until 01:30 on the 6th.
    late = rows[date(2026, 11, 5)]
    assert late.last_logout == datetime(2026, 11, 6, 0, 0, tzinfo=TOKYO)
    assert rows[date(2026, 11, 6)].from_previous_day


def test_month_devices_services_and_crash(month: MonthTruth, month_report: UsageReport) -> None:
    assert month_report.devices_unused == month.devices_unused
    assert len(month.devices_unused) == 12
    assert "50 PCs issued, 12 never used in this period" in month_report.recommendation
    services = {s.service: s for s in month_report.services}
    assert {name: s.requests for name, s in services.items() if s.requests} == (
        month.requests_per_service)
    assert {name: s.tunnels for name, s in services.items() if s.tunnels} == (
        month.tunnels_per_service)
    assert (f"sessions without session.end were closed at a gateway restart: "
            f"{month.sessions_closed_by_crash}") in month_report.notes


def test_a_period_without_records_raises_empty_period(month: MonthTruth) -> None:
    with pytest.raises(EmptyPeriodError):
        build_usage(month.files(), since=datetime(2027, 1, 1, tzinfo=TOKYO), until=None,
                    seats=140, zone=TOKYO)


def test_building_the_month_is_fast(month: MonthTruth) -> None:
    started = clock.perf_counter()
    build_usage(month.files(), since=None, until=None, seats=140, zone=TOKYO)
    assert clock.perf_counter() - started < 10


def test_renderers_of_the_month(month_report: UsageReport) -> None:
    text = render_text(month_report)
    assert month_report.recommendation in text
    rows = list(csv.reader(io.StringIO(render_csv(month_report))))
    assert tuple(rows[0]) == CSV_HEADER
    assert ["summary", "", "", "peak", str(month_report.peak)] in rows
    data = json.loads(render_json(month_report))
    assert data["peak"] == month_report.peak and len(data["days"]) == 30


# ------------------------------------------------------------------ HTML


def test_html_is_self_contained_with_inline_svg_charts(month_report: UsageReport) -> None:
    page = render_html(month_report)
    assert page.count("<svg") == 3
    lowered = page.lower()
    assert "<script" not in lowered
    assert "http://" not in lowered.replace("http://www.w3.org/", "")  # only XML namespaces
    assert "https://" not in lowered and " src=" not in lowered and "@import" not in lowered
    assert "<?xml" not in page  # the SVG prolog is dropped when inlined


def test_html_escapes_everything_from_the_log() -> None:
    hostile = "<script>alert(1)</script>"
    report = report_of([
        start("a", at("09:00"), hostile, device="<b>pc</b>"),
        rec("access.allow", at("09:01"), user=hostile, session="a", service="$\\frac{1}{0}$<i>"),
        end("a", at("10:00"), hostile),
    ], devices=("<b>pc</b>", "pc-&-2"))
    page = render_html(report)
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>pc</b>" not in page and "<i>" not in page
    assert "pc-&amp;-2" in page


def _csv_safe_cells(report: UsageReport) -> list[list[str]]:
    return list(csv.reader(io.StringIO(render_csv(report))))


def test_csv_cells_cannot_run_as_formulas() -> None:
    report = report_of([start("a", at("09:00"), "=cmd|' /C calc'!A0"),
                        end("a", at("10:00"), "=cmd|' /C calc'!A0")])
    subjects = {row[2] for row in _csv_safe_cells(report)}
    assert "'=cmd|' /C calc'!A0" in subjects


@pytest.mark.parametrize(("user", "cell"), [
    ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("-2+3", "'-2+3"),
    # Full-width starters, which Excel on Japanese Windows runs like their ASCII forms:
    ("\uff1dHYPERLINK(\"http://x\")", "'\uff1dHYPERLINK(\"http://x\")"),
    ("\uff0b1", "'\uff0b1"),
    ("\uff0d1", "'\uff0d1"),
    ("\uff20SUM(A1)", "'\uff20SUM(A1)"),
    # A starter after leading whitespace:
    (" =1+1", "' =1+1"),
    ("\u3000\uff1d1", "'\u3000\uff1d1"),
    # Harmless:
    ("\u7530\u4e2d", "\u7530\u4e2d"),
    ("a=b", "a=b"),
    ("\u7530\u4e2d\uff0b1", "\u7530\u4e2d\uff0b1"),
])
def test_csv_user_names_that_look_like_formulas(user: str, cell: str) -> None:
    report = report_of([start("a", at("09:00"), user), end("a", at("10:00"), user)])
    subjects = {row[2] for row in _csv_safe_cells(report) if row[0] == "attendance"}
    assert subjects == {cell}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps"]


@pytest.fixture
def html_file(tmp_path: Path, month_report: UsageReport) -> Iterator[Path]:
    path = tmp_path / "usage.html"
    path.write_text(render_html(month_report), encoding="utf-8")
    yield path


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_html_renders_in_headless_chromium(html_file: Path, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    from PIL import Image, ImageStat  # noqa: PLC0415 - Pillow comes with matplotlib

    shot = tmp_path / "usage.png"
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Offline by construction: any request other than the file itself is refused.
            page = await browser.new_page(viewport={"width": 1100, "height": 1200})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            await page.goto(html_file.as_uri())
            charts = await page.locator("figure svg").count()
            box = await page.locator("figure svg").first.bounding_box()
            await page.screenshot(path=str(shot))
        finally:
            await browser.close()
    assert requests == [html_file.as_uri()]
    assert charts == 3
    assert box is not None and box["width"] > 500 and box["height"] > 150
    with Image.open(shot) as image:
        stats = ImageStat.Stat(image.convert("L"))
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert stats.stddev[0] > 20  # not a blank page
    assert colours is not None and len(colours) > 50  # text and charts, not a flat fill
