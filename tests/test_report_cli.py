"""Tests of ``gatewayd report usage`` (gatewayd.report.cli): formats, period, seat limit from
the config, the device inventory, and exit statuses 0 / 1 / 2 — on a small real audit log
written through `AuditLog` with an injected clock."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import stat
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import AuditLog
from gatewayd.cli import main
from gatewayd.report import CSV_HEADER

TOKYO = ZoneInfo("Asia/Tokyo")
START = datetime(2026, 11, 17, 8, 0, tzinfo=TOKYO)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


async def _write_log(directory: Path) -> Path:
    """Two days: 17 Nov alice+bob overlap (peak 2) and carol is refused (seats_full);
    18 Nov alice alone on pc-001."""
    clock = Clock()
    path = directory / "audit.log"
    log = AuditLog(path, node="gw1", signing_key_path=directory / "audit.key",
                   rotate_daily=True, timezone=TOKYO, clock=clock)

    def emit(minutes: float, event: str, **fields: Any) -> None:
        clock.now = START + timedelta(minutes=minutes)
        log.emit(event, **fields)

    await log.start()
    emit(30, "session.start", frontend="https", user="alice", session="a1", device="pc-001")
    emit(60, "session.start", frontend="ssh", user="bob", session="b1")
    emit(61, "access.allow", frontend="https", user="alice", session="a1",
         service="groupware", method="GET", path="/groupware/")
    emit(61, "access.end", frontend="https", user="alice", session="a1", service="groupware",
         method="GET", path="/groupware/", status=200, bytes_up=10, bytes_down=2000)
    emit(70, "auth.failure", frontend="https", user="carol", reason="seats_full")
    emit(120, "session.end", frontend="ssh", user="bob", session="b1", reason="logout")
    emit(540, "session.end", frontend="https", user="alice", session="a1", reason="logout")
    emit(24 * 60 + 60, "session.start", frontend="https", user="alice", session="a2",
         device="pc-001")
    emit(24 * 60 + 180, "session.end", frontend="https", user="alice", session="a2",
         reason="logout")
    await log.close()
    return path


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("logs")
    asyncio.run(_write_log(directory))
    return sorted(directory.glob("audit.log*"))  # as a shell glob: includes .pub and .lock


@pytest.fixture(autouse=True)
def no_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The host's /etc/gatewayd/gatewayd.toml must not leak into the tests."""
    monkeypatch.setenv("GATEWAYD_CONFIG", str(tmp_path / "absent.toml"))


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = main(["report", "usage", *(str(a) for a in args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_text_report_skips_key_and_lock_files(
        logs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert any(p.name.endswith(".pub") for p in logs)
    status, out, err = run(capsys, *logs, "--seats", "5")
    assert status == 0
    assert "peak 2 of 5 seats" in out
    assert "Seats were exhausted in 1 hour (1 login refused)" in out
    assert "2026-11-17 09:00  1 refused, 1 user(s)" in out
    assert "skipping" in err and "audit.log.pub" in err


def test_csv_has_the_documented_header_and_rows(
        logs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *logs, "--seats", "5", "--format", "csv")
    assert status == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["section", "period", "subject", "metric", "value"] == list(CSV_HEADER)
    assert ["day", "2026-11-17", "", "peak", "2"] in rows
    assert ["attendance", "2026-11-17", "alice", "first_login", "08:30"] in rows
    assert ["attendance", "2026-11-17", "alice", "connected_hours", "8.50"] in rows
    assert ["service", "", "groupware", "bytes_down", "2000"] in rows
    assert ["seats_full", "2026-11-17T09:00", "", "refusals", "1"] in rows


def test_json_and_the_period_options(logs: list[Path], capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    status, out, _ = run(capsys, *logs, "--format", "json", "--from", "2026-11-18",
                         "--to", "2026-11-18", "--seats", "5")
    assert status == 0
    data = json.loads(out)
    assert [d["day"] for d in data["days"]] == ["2026-11-18"]
    assert (data["peak"], data["refusals"], data["users"]) == (1, 0, 1)
    assert data["period_start"] == "2026-11-18T00:00:00+09:00"
    assert data["period_end"] == "2026-11-19T00:00:00+09:00"


def test_html_written_to_a_file_readable_by_owner_and_group_only(
        logs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "usage.html"
    status, out, _ = run(capsys, *logs, "--format", "html", "--out", target, "--seats", "5")
    assert status == 0 and out == ""
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 3
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # it names people


def test_seat_limit_and_zone_come_from_the_config(
        logs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gatewayd.toml"
    config.write_text('[sessions]\nmax_concurrent = 7\n[audit]\ntimezone = "UTC"\n')
    status, out, _ = run(capsys, *logs, "--config", config, "--format", "json")
    assert status == 0
    data = json.loads(out)
    assert (data["seats"], data["zone"]) == (7, "UTC")
    assert data["days"][0]["day"] == "2026-11-16"  # 08:30 in Tokyo is the day before in UTC


def test_without_a_limit_the_report_says_so(
        logs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *logs)
    assert status == 0
    assert "peak 2 seats (seat limit unknown)" in out


def test_devices_from_the_ca_index(logs: list[Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def entry(serial: str, name: str, revoked_at: str | None = None) -> dict[str, Any]:
        return {"serial": serial, "kind": "device", "name": name, "user": None, "names": [],
                "not_before": "2026-01-01T00:00:00Z", "not_after": "2028-01-01T00:00:00Z",
                "sha256": "00" * 32, "issued_at": "2026-01-01T00:00:00Z",
                "issued_by": "admin1", "revoked_at": revoked_at,
                "revocation_reason": None, "revoked_by": None}

    ca = tmp_path / "ca"
    ca.mkdir()
    (ca / "index.json").write_text(json.dumps({
        "format": "gatewayd-ca-index-v1", "crl": {"number": 1},
        "certificates": [entry("01", "pc-001"), entry("02", "pc-002"),
                         entry("03", "pc-003", revoked_at="2026-06-01T00:00:00Z")],
    }))
    status, out, _ = run(capsys, *logs, "--devices", ca, "--seats", "5",
                         "--from", "2026-11-01", "--to", "2026-11-30")
    assert status == 0
    assert "2 PCs issued, 1 never used in this period" in out  # pc-003 was revoked before
    assert "Issued PCs not used in this period: pc-002" in out
    listed = tmp_path / "devices.txt"
    listed.write_text("# PCs of the branch office\npc-001\npc-009  # spare\n\n")
    status, out, _ = run(capsys, *logs, "--devices", listed, "--seats", "5")
    assert status == 0 and "2 PCs issued, 1 never used" in out


def test_no_records_in_the_period_exits_1(logs: list[Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *logs, "--from", "2027-01-01")
    assert (status, out) == (1, "")
    assert "no audit records in the period" in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--from", "2026-11-18", "--to", "2026-11-17"], "--to is before --from"),
    (["--devices", "MISSING"], "cannot read the device inventory"),
    (["--devices", "BADINDEX"], "not JSON"),
    (["--config", "MISSING"], "cannot read config"),
])
def test_usage_errors_exit_2_with_a_message(
        logs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        extra: list[str], message: str) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    replaced = [str(tmp_path / "missing") if a == "MISSING"
                else str(tmp_path / "bad.json") if a == "BADINDEX" else a for a in extra]
    status, out, err = run(capsys, *logs, *replaced)
    assert (status, out) == (2, "")
    assert message in err and "Traceback" not in err


def test_an_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, tmp_path / "nope.log")
    assert status == 2 and "no such readable file" in err


@pytest.mark.parametrize("args", [["--from", "17/11/2026"], ["--tz", "Mars/Olympus"],
                                  ["--seats", "0"], ["--format", "pdf"]])
def test_bad_arguments_exit_2(logs: list[Path], capsys: pytest.CaptureFixture[str],
                              args: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["report", "usage", *(str(p) for p in logs), *args])
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


def test_an_invalid_default_config_is_noted_and_ignored(
        logs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    default = tmp_path / "default.toml"
    default.write_text("[sessions]\nmax_concurrent = -3\n")
    monkeypatch.setenv("GATEWAYD_CONFIG", str(default))
    status, out, err = run(capsys, *logs, "--seats", "9")
    assert status == 0 and "peak 2 of 9 seats" in out
    assert "note: ignoring" in err
    status, _, err = run(capsys, *logs, "--config", default)  # named explicitly: an error
    assert status == 2 and "max_concurrent" in err
