"""Tests for gatewayd.audit.retention: a real multi-day AuditLog on a fake clock, then removal."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatewayd.app import Gateway
from gatewayd.audit import AuditLog, Problem, canonical_json, verify_files
from gatewayd.audit.chain import GENESIS_PREV, record_hash
from gatewayd.audit.retention import (
    Removal,
    RetentionOutcome,
    RetentionPlan,
    apply_plan,
    format_retention,
    plan_removals,
    plan_retention,
    remember_audit_key,
    run_retention,
)
from gatewayd.audit.signing import (
    legacy_checkpoint_message,
    load_or_create_signing_key,
    sign_checkpoint,
)
from gatewayd.config import load_settings

JST = ZoneInfo("Asia/Tokyo")
START = datetime(2026, 1, 5, 9, 0, tzinfo=JST)
WEEK = timedelta(days=7)
REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def quiet_logger() -> Any:
    return structlog.wrap_logger(structlog.ReturnLogger(), wrapper_class=structlog.BoundLogger,
                                 processors=[], context_class=dict)


def new_log(directory: Path, clock: Callable[[], datetime], **options: Any) -> AuditLog:
    options.setdefault("on_failure", "deny")
    return AuditLog(directory / "audit.log", node="gw-test",
                    signing_key_path=directory / "keys" / "audit.key", fsync="interval",
                    rotate_daily=True, checkpoint_interval=3600, clock=clock,
                    logger=quiet_logger(), **options)


def write_day(log: AuditLog, day: int, records: int = 3) -> None:
    for n in range(records):
        log.emit("access.allow", user=f"user{day}-{n}", source_ip="192.0.2.10",
                 service="files", method="GET", path=f"/files/{n}", status=200)


async def days_of_log(log: AuditLog, clock: Clock, days: int) -> None:
    """Write ``days`` more days of records; each new day rotates yesterday's file."""
    for day in range(days):
        clock.advance(days=1)
        write_day(log, day)


def rotated(log: AuditLog) -> list[Path]:
    return sorted(p for p in log.path.parent.iterdir()
                  if p.name.startswith("audit.log.2") and p.is_file())


def log_files(log: AuditLog) -> list[Path]:
    return [*rotated(log), log.path]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def last_ts(path: Path) -> datetime:
    return datetime.fromisoformat(records(path)[-1]["ts"])


@pytest.fixture
async def five_days(tmp_path: Path) -> AsyncIterator[tuple[AuditLog, Clock]]:
    """Day 0 (START) to day 4: four rotated files, each sealed on the next day, and the live
    file of day 4. The file of day d ends with its rotation checkpoint at START + d+1 days."""
    clock = Clock()
    log = new_log(tmp_path, clock)
    await log.start()
    write_day(log, -1)
    await days_of_log(log, clock, 4)
    assert len(rotated(log)) == 4
    yield log, clock
    await log.close()


def at(days: float) -> datetime:
    return START + timedelta(days=days)


def retain(log: AuditLog, clock: Clock, days: float, **options: Any) -> RetentionOutcome:
    """Run retention ``days`` after START, the log's own clock moved there too (as in the
    gateway; its first record then rotates the live file of the day before)."""
    clock.now = at(days)
    return run_retention(log, WEEK, clock.now, quiet_logger(), **options)


def present(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.exists()]


# --------------------------------------------------------------------------- planning


async def test_plan_picks_exactly_the_expired_files_oldest_first(
    five_days: tuple[AuditLog, Clock],
) -> None:
    log, _ = five_days
    files = rotated(log)
    # Files 0 and 1 ended at START+1d and +2d; a week later plus an hour both have expired.
    plan = plan_retention(log.path, WEEK, at(9) + timedelta(hours=1))
    assert [r.path for r in plan.removals] == files[:2]
    assert plan.problem is None and plan.held is None
    first, second = plan.removals
    assert first.first_seq == 1
    assert second.first_seq == first.last_seq + 1
    assert first.last_hash == records(files[0])[-1]["hash"]
    assert first.records == len(records(files[0]))
    assert records(files[0])[-1]["event"] == "audit.checkpoint"
    assert plan_removals(log.path, WEEK, at(9) + timedelta(hours=1)) == list(plan.removals)


async def test_plan_never_takes_the_live_file(five_days: tuple[AuditLog, Clock]) -> None:
    log, _ = five_days
    plan = plan_retention(log.path, WEEK, at(400))
    assert [r.path for r in plan.removals] == rotated(log)
    assert log.path not in [r.path for r in plan.removals]


async def test_nothing_expired_nothing_planned(five_days: tuple[AuditLog, Clock]) -> None:
    log, _ = five_days
    assert plan_retention(log.path, WEEK, at(7)) == RetentionPlan()  # file 0 ended at +1d


async def test_zero_retention_keeps_everything(five_days: tuple[AuditLog, Clock]) -> None:
    log, _ = five_days
    before = log_files(log)
    outcome = run_retention(log, timedelta(0), at(4000), quiet_logger())
    assert outcome.removed == () and outcome.plan == RetentionPlan()
    assert log_files(log) == before


def edit_a_record(path: Path) -> None:
    content = path.read_bytes().replace(b'"user":"user', b'"user":"USER', 1)
    path.write_bytes(content)


def forge_final_checkpoint(path: Path) -> None:
    """Re-sign the final checkpoint with a key that is not the log's."""
    lines = path.read_bytes().splitlines()
    final = json.loads(lines[-1])
    final["sig"] = sign_checkpoint(Ed25519PrivateKey.generate(), node=final["node"],
                                   seq=final["covers_seq"], hash_hex=final["covers_hash"],
                                   ts=final["ts"], reason=final["reason"])
    lines[-1] = canonical_json(final).encode()
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def cut_final_checkpoint(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


@pytest.mark.parametrize("tamper", [edit_a_record, forge_final_checkpoint, cut_final_checkpoint])
async def test_a_file_that_does_not_verify_is_kept_and_nothing_newer_goes(
    five_days: tuple[AuditLog, Clock], tamper: Callable[[Path], None],
) -> None:
    log, _ = five_days
    files = rotated(log)
    tamper(files[1])
    plan = plan_retention(log.path, WEEK, at(400))  # everything rotated has expired
    assert [r.path for r in plan.removals] == files[:1]
    assert plan.problem is not None and plan.problem.path == files[1]
    outcome = apply_plan(log, plan, WEEK, quiet_logger())
    assert outcome.removed == plan.removals
    assert rotated(log) == files[1:]  # the tampered file and everything after it stay


async def test_a_file_not_chained_to_by_its_successor_is_kept(
    five_days: tuple[AuditLog, Clock],
) -> None:
    log, _ = five_days
    files = rotated(log)
    files[2].unlink()  # file 1's successor is now file 3, which chains to file 2
    plan = plan_retention(log.path, WEEK, at(400))
    assert [r.path for r in plan.removals] == files[:1]
    assert plan.problem is not None and plan.problem.path == files[1]
    assert "does not begin with an audit.continue chained" in plan.problem.reason


async def test_only_keys_the_gateway_has_held_vouch_for_a_removal(
    five_days: tuple[AuditLog, Clock], tmp_path: Path,
) -> None:
    """A key planted beside the log (anyone who can write that directory can) must not let
    retention remove, and re-sign with the real key, files only it vouches for."""
    log, _ = five_days
    files = rotated(log)
    store = tmp_path / "state" / "audit-keys.json"
    store.parent.mkdir()
    trusted = remember_audit_key(store, log.key_id)
    assert trusted == {log.key_id} and oct(store.stat().st_mode & 0o777) == "0o600"
    assert remember_audit_key(store, log.key_id) == trusted  # remembered, not duplicated
    plan = plan_retention(log.path, WEEK, at(400), trusted_key_ids=trusted)
    assert [r.path for r in plan.removals] == files
    # The log's own key, not one of the trusted: nothing vouches, nothing goes, it is said.
    stranger = {"ab" * 32}
    plan = plan_retention(log.path, WEEK, at(400), trusted_key_ids=stranger)
    assert plan.removals == () and plan.problem is not None
    assert plan.problem.path == files[0]
    # A damaged list trusts only the key in use from then on (never more).
    store.write_text("{not json")
    assert remember_audit_key(store, log.key_id) == {log.key_id}


async def test_may_remove_holds_files_not_yet_delivered(
    five_days: tuple[AuditLog, Clock],
) -> None:
    log, _ = five_days
    files = rotated(log)
    delivered: int = records(files[0])[-1]["seq"]
    asked: list[int] = []

    def may_remove(last_seq: int) -> bool:
        asked.append(last_seq)
        return last_seq <= delivered

    plan = plan_retention(log.path, WEEK, at(400), may_remove=may_remove)
    assert [r.path for r in plan.removals] == files[:1]
    assert plan.problem is None
    assert plan.held is not None and plan.held.path == files[1]
    assert asked == [delivered, records(files[1])[-1]["seq"]]


async def test_time_budget_holds_the_rest(five_days: tuple[AuditLog, Clock]) -> None:
    log, _ = five_days
    plan = plan_retention(log.path, WEEK, at(400), budget_seconds=-1.0)
    assert plan.removals == () and plan.held is not None and plan.held.path == rotated(log)[0]


def test_format_retention() -> None:
    assert [format_retention(timedelta(**d)) for d in
            ({"days": 365}, {"hours": 36}, {"minutes": 90}, {"seconds": 61})] == \
        ["365d", "36h", "90m", "61s"]


# --------------------------------------------------------------------------- removal


async def test_removal_is_recorded_first_and_verify_passes(
    five_days: tuple[AuditLog, Clock],
) -> None:
    log, clock = five_days
    files = rotated(log)
    outcome = retain(log, clock, 9.05)
    assert [r.path for r in outcome.removed] == files[:2] and outcome.error is None
    assert present(files) == files[2:]
    assert (log.path.parent / "audit.log.pub").exists()
    notes = [r for r in records(log.path) if r["event"] == "audit.retention"]
    assert [(n["file"], n["first_seq"], n["last_seq"], n["reason"], n["retention"])
            for n in notes] == [
        (r.path.name, r.first_seq, r.last_seq, "expired", "7d") for r in outcome.removed]
    assert records(log.path)[-1]["event"] == "audit.checkpoint"  # the records are signed
    result = verify_files(log_files(log), require_complete=True)
    assert result.ok, result.problem
    assert [(r.first_seq, r.last_seq) for r in result.removed] == [
        (r.first_seq, r.last_seq) for r in outcome.removed]
    assert any(w.startswith(f"records 1-{outcome.removed[-1].last_seq:,} (2 files")
               for w in result.warnings), result.warnings


@pytest.mark.parametrize("on_failure", ["deny", "continue"])
async def test_write_before_act_nothing_removed_when_the_record_fails(
    five_days: tuple[AuditLog, Clock], monkeypatch: pytest.MonkeyPatch, on_failure: str,
) -> None:
    log, clock = five_days
    log._on_failure = on_failure  # type: ignore[assignment]  # the policy under test
    before = log_files(log)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    outcome = retain(log, clock, 400)
    monkeypatch.undo()
    assert outcome.removed == () and outcome.error is not None
    assert len(outcome.plan.removals) == 4
    assert log_files(log) == before


async def test_nothing_removed_when_the_signing_checkpoint_fails(
    five_days: tuple[AuditLog, Clock], monkeypatch: pytest.MonkeyPatch,
) -> None:
    log, clock = five_days
    before = log_files(log)

    real_write = os.write

    def checkpoints_fail(fd: int, data: bytes) -> int:
        line = bytes(data)
        if b'"event":"audit.checkpoint"' in line and b'"reason":"retention"' in line:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", checkpoints_fail)
    outcome = retain(log, clock, 400)
    monkeypatch.undo()
    assert outcome.removed == () and "checkpoint" in (outcome.error or "")
    assert present(before) == before


async def test_two_successive_runs(five_days: tuple[AuditLog, Clock]) -> None:
    log, clock = five_days
    files = rotated(log)
    first = retain(log, clock, 8.05)  # file 0 (sealed at +1d) only
    assert [r.path for r in first.removed] == files[:1]
    await days_of_log(log, clock, 3)
    second = retain(log, clock, 11.05)  # files 1-3 (sealed at +2d..+4d); day 4's at +8d stays
    assert [r.path for r in second.removed] == files[1:]
    removed = [*first.removed, *second.removed]
    assert [r.first_seq for r in removed[1:]] == [r.last_seq + 1 for r in removed[:-1]]
    result = verify_files(log_files(log), require_complete=True)
    assert result.ok, result.problem
    assert len(result.removed) == 4
    assert result.removed[-1].last_seq == second.removed[-1].last_seq


def retention_notes(paths: list[Path]) -> list[dict[str, Any]]:
    return [r for path in paths for r in records(path) if r["event"] == "audit.retention"]


async def daily_log(directory: Path) -> tuple[AuditLog, Clock]:
    clock = Clock()
    log = new_log(directory, clock)
    await log.start()
    write_day(log, -1)
    return log, clock


@pytest.mark.parametrize("held_days", [(), (10, 11, 12)])
async def test_retention_run_daily_for_four_periods_keeps_the_log_verifiable(
    tmp_path: Path, held_days: tuple[int, ...],
) -> None:
    """Daily files, 7 days' retention, retention run daily for 30 days (> 2 x retention).

    The retention records explaining the first removals are written into the live file of
    that day, which expires in its turn: their coverage must be carried forward, or the
    untouched log stops verifying on day 18. With ``held_days`` the forwarder holds files
    for a few days, so the coverage of one file's records is split across two files.
    """
    log, clock = await daily_log(tmp_path)
    removed: list[Path] = []
    delivered_through = 10**9
    for day in range(30):
        clock.advance(days=1)
        write_day(log, day)
        if day in held_days and delivered_through == 10**9:
            delivered_through = records(log_files(log)[-2])[0]["seq"]  # hold from here on
        elif day not in held_days:
            delivered_through = 10**9
        limit = delivered_through
        outcome = run_retention(log, WEEK, clock.now, quiet_logger(),
                                may_remove=lambda seq, limit=limit: seq <= limit)
        assert outcome.error is None and outcome.plan.problem is None
        removed += [r.path for r in outcome.removed]
        result = verify_files(log_files(log), require_complete=True)
        assert result.ok, f"day {day + 1}: {result.problem}"
    assert len(removed) >= 20 and not any(p.exists() for p in removed)
    assert result.removed[0].first_seq == 1
    # The file holding the first removal's record is long gone; its coverage lives on.
    notes = retention_notes(log_files(log))
    assert not any(n["reason"] == "expired" and n["file"] == removed[0].name for n in notes)
    assert any(n["reason"] == "carried" and n["first_seq"] == 1 for n in notes)
    await log.close()


async def test_a_head_deleted_by_hand_is_never_carried_forward(tmp_path: Path) -> None:
    """Coverage is carried only from signed retention records, never from a file's header:
    a log whose first files were deleted without a record never verifies as complete."""
    log, clock = await daily_log(tmp_path)
    await days_of_log(log, clock, 3)
    first_files = rotated(log)[:2]
    for path in first_files:
        path.unlink()
    for day in range(30):
        clock.advance(days=1)
        write_day(log, day)
        run_retention(log, WEEK, clock.now, quiet_logger())
        result = verify_files(log_files(log), require_complete=True)
        assert (result.ok, result.kind, result.first_bad_seq) == (
            False, Problem.MISSING_FILE, 1), f"day {day + 1}"
    notes = retention_notes(log_files(log))
    assert notes and all(n["first_seq"] > 1 for n in notes)
    await log.close()


async def test_only_honoured_retention_records_are_carried(
    five_days: tuple[AuditLog, Clock],
) -> None:
    """A file's retention records are carried only if verify would honour them (plausible)."""
    log, clock = five_days
    files = rotated(log)
    file0_last = records(files[0])[-1]["seq"]
    retain(log, clock, 8.05)  # file 0; its record goes into the live file of day 8
    host = log.path
    file1_last = records(files[1])[-1]
    # A signed but implausible record in the same file (retention shorter than 7 days).
    log.emit("audit.retention", reason="expired", file=files[1].name, first_seq=1,
             last_seq=file1_last["seq"], last_hash=file1_last["hash"],
             last_ts=file1_last["ts"], records=5, retention="1d")
    await days_of_log(log, clock, 1)  # the day 8 file rotates
    host_rotated = rotated(log)[-1]
    assert records(host_rotated)[0]["seq"] > file1_last["seq"]
    assert host == log.path
    plan = plan_retention(log.path, WEEK, at(40))
    (removal,) = [r for r in plan.removals if r.path == host_rotated]
    assert [(c.first_seq, c.last_seq) for c in removal.carried] == [(1, file0_last)]


# --------------------------------------------------------------------------- verify


@pytest.mark.parametrize("which", [0, 1, 2, 3])
async def test_a_file_removed_without_a_record_fails_verification(
    five_days: tuple[AuditLog, Clock], which: int,
) -> None:
    log, _ = five_days
    files = rotated(log)
    first_missing = records(files[which])[0]["seq"]
    files[which].unlink()
    result = verify_files(log_files(log), require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.MISSING_FILE), result.problem
    assert result.first_bad_seq == (1 if which == 0 else first_missing)


@pytest.mark.parametrize("which", [0, 1])
async def test_after_retention_a_further_unrecorded_removal_fails(
    five_days: tuple[AuditLog, Clock], which: int,
) -> None:
    log, clock = five_days
    retain(log, clock, 9.05)  # files 0 and 1
    remaining = rotated(log)
    remaining[which].unlink()
    result = verify_files(log_files(log), require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.MISSING_FILE), result.problem
    if which == 0:  # the new head is not covered: the note says why, the default still warns
        assert "no audit.retention record accounts for seq" in result.problem
        lenient = verify_files(log_files(log))
        assert lenient.ok and lenient.removed == ()
        assert any("not removed by retention" in w for w in lenient.warnings)


async def test_deleting_the_retention_record_breaks_the_chain(
    five_days: tuple[AuditLog, Clock],
) -> None:
    log, clock = five_days
    retain(log, clock, 9.05)
    lines = log.path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if b'"event":"audit.retention"' not in line]
    assert len(kept) == len(lines) - 2
    log.path.write_bytes(b"".join(kept))
    assert not verify_files(log_files(log)).ok


async def test_unsigned_retention_record_explains_nothing(
    tmp_path: Path, five_days: tuple[AuditLog, Clock],
) -> None:
    """Someone able to write the live file could append a well-formed (unkeyed hash chain)
    audit.retention record after a deletion; without a checkpoint signing it, it counts not."""
    log, clock = five_days
    files = rotated(log)
    plan = plan_retention(log.path, WEEK, at(400))
    removal = plan.removals[0]
    clock.now = at(400)
    log.emit("audit.retention", reason="expired", file=removal.path.name, first_seq=1,
             last_seq=removal.last_seq, last_hash=removal.last_hash, last_ts=removal.last_ts,
             records=removal.records, retention="7d")
    files[0].unlink()
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in [*log_files(log), log.path.parent / "audit.log.pub"]:
        shutil.copy(path, copy / path.name)  # the running log would sign it at close
    remaining = sorted(p for p in copy.iterdir() if not p.name.endswith(".pub"))
    result = verify_files(remaining, require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.MISSING_FILE)
    assert "not yet signed by a checkpoint" in result.problem


@pytest.mark.parametrize(("retention", "age_days", "why"), [
    ("7d", 3, "before the stated retention"),
    ("1d", 30, "shorter than the 7 days"),
])
async def test_implausible_retention_record_explains_nothing(
    five_days: tuple[AuditLog, Clock], retention: str, age_days: int, why: str,
) -> None:
    """A signed record claiming the removal of a file that had not yet expired is not honoured."""
    log, clock = five_days
    files = rotated(log)
    removal = plan_retention(log.path, timedelta(days=1), at(400)).removals[0]
    clock.now = last_ts(files[0]) + timedelta(days=age_days)
    assert log.record_retention([{
        "reason": "expired", "file": removal.path.name, "first_seq": 1,
        "last_seq": removal.last_seq, "last_hash": removal.last_hash,
        "last_ts": removal.last_ts, "records": removal.records, "retention": retention,
    }]).signed
    files[0].unlink()
    result = verify_files(log_files(log), require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.MISSING_FILE)
    assert why in result.problem


# --------------------------------------------------------------------------- the gateway


def write_config(tmp_path: Path, retention: str,
                 forward: dict[str, object] | None = None) -> Path:
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    sections: dict[str, dict[str, object]] = {
        "gateway": {"node": "gw-test", "state_dir": "state", "log_level": "warning"},
        "metrics": {"enabled": False},
        "admin": {"enabled": False},
        "policy": {"dir": "policies"},
        "audit": {"path": "log/audit.log", "signing_key": "log/keys/audit.key",
                  "checkpoint_interval": "1h", "retention": retention},
        "https": {"enabled": False},
        "ssh": {"enabled": False},
    }
    if forward is not None:
        sections["audit.forward"] = forward
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path = tmp_path / "gatewayd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def old_log(directory: Path) -> list[Path]:
    """Five days of log in January 2020, closed: four rotated files and the live one."""
    clock = Clock(datetime(2020, 1, 6, 9, 0, tzinfo=JST))
    log = new_log(directory, clock)
    await log.start()
    write_day(log, -1)
    await days_of_log(log, clock, 4)
    await log.close()
    return rotated(log)


async def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_gateway_removes_expired_files_at_start(tmp_path: Path) -> None:
    files = await old_log(tmp_path / "log")
    path = write_config(tmp_path, "7d")
    # A week after 8 Jan 09:30: the first two files (sealed 7 and 8 Jan 09:00) have expired.
    wall = datetime(2020, 1, 15, 9, 30, tzinfo=JST)
    gw = Gateway(load_settings(path), config_path=path, wall_clock=lambda: wall)
    await gw.start()
    try:
        await wait_until(lambda: not files[1].exists())
        assert files[0].exists() is False and all(p.exists() for p in files[2:])
        keys = json.loads((tmp_path / "state" / "audit-keys.json").read_text())
        assert keys["key_ids"] == [gw.audit.key_id]  # what vouches for a removal
    finally:
        await gw.stop()
    remaining = [*(p for p in files if p.exists()), *sorted(
        p for p in (tmp_path / "log").iterdir()
        if p.name.startswith("audit.log") and p.suffix not in (".pub", ".lock")
        and p not in files)]
    result = verify_files(remaining, require_complete=True)
    assert result.ok, result.problem
    assert [r.file for r in result.removed] == [files[0].name, files[1].name]


async def test_gateway_keeps_expired_files_the_collector_does_not_have(tmp_path: Path) -> None:
    # Forwarding on, collector unreachable (a port nobody listens on): nothing was delivered,
    # so nothing may go, however old — the collector's copy would be lost with the file.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    files = await old_log(tmp_path / "log")
    path = write_config(tmp_path, "7d", forward={
        "enabled": True, "protocol": "tcp", "address": f"127.0.0.1:{closed_port}",
        "reconnect_interval": "10s"})
    gw = Gateway(load_settings(path), config_path=path,
                 wall_clock=lambda: datetime(2030, 1, 1, tzinfo=JST))
    await gw.start()
    try:
        await wait_until(lambda: any(
            task.get_name() == "gatewayd-audit-retention" for task in asyncio.all_tasks()))
        await asyncio.sleep(0.5)  # the run at start has planned by now
        assert gw._collector_has(1) is False
    finally:
        await gw.stop()
    assert all(p.exists() for p in files)
    assert b"audit.retention" not in (tmp_path / "log" / "audit.log").read_bytes()


async def test_gateway_with_zero_retention_keeps_everything(tmp_path: Path) -> None:
    files = await old_log(tmp_path / "log")
    path = write_config(tmp_path, "0s")
    gw = Gateway(load_settings(path), config_path=path,
                 wall_clock=lambda: datetime(2030, 1, 1, tzinfo=JST))
    await gw.start()
    try:
        await asyncio.sleep(0.3)  # long enough for a retention run, had one been started
    finally:
        await gw.stop()
    assert all(p.exists() for p in files)
    assert b"audit.retention" not in (tmp_path / "log" / "audit.log").read_bytes()


async def test_a_stopped_run_removes_nothing(five_days: tuple[AuditLog, Clock]) -> None:
    log, clock = five_days
    before = log_files(log)
    outcome = retain(log, clock, 400, stop=lambda: True)
    assert outcome.removed == () and outcome.plan.held is not None
    assert outcome.plan.held.reason == "stopped"
    assert log_files(log) == before


# --------------------------------------------------------------------------- forged records


def append_rehashed(path: Path, **fields: Any) -> None:
    """Append a well-formed record chained to the file's last one (the chain is unkeyed)."""
    last = records(path)[-1]
    record: dict[str, Any] = {"ts": last["ts"], "seq": last["seq"] + 1, "node": last["node"],
                              "prev": last["hash"], **fields}
    record["hash"] = record_hash(record)
    with path.open("ab") as stream:
        stream.write(canonical_json(record).encode() + b"\n")


async def forged_carried_record_signed_at_restart(tmp_path: Path) -> tuple[AuditLog, Clock]:
    """The attack: with write access to the directory but no key, while the gateway is
    stopped, delete the two oldest (not expired) files and append a re-hashed carried record
    covering them; the gateway then restarts (its start checkpoint signs the record) and
    writes a day. The restarted (closed) AuditLog and its clock."""
    clock = Clock()
    log = new_log(tmp_path, clock)
    await log.start()
    write_day(log, -1)
    await days_of_log(log, clock, 4)
    await log.close()
    files = rotated(log)
    files[0].unlink()
    files[1].unlink()
    head = records(files[2])[0]
    append_rehashed(log.path, event="audit.retention", reason="carried", file="audit.log.x",
                    first_seq=1, last_seq=head["prev_seq"], last_hash=head["prev"],
                    last_ts="2025-01-01T00:00:00.000000+09:00", records=head["prev_seq"],
                    retention="7d")
    again = new_log(tmp_path, clock)
    await again.start()
    write_day(again, 9)
    await again.close()
    return again, clock


async def test_a_forged_retention_record_signed_at_restart_explains_nothing(
    tmp_path: Path,
) -> None:
    """Write access to the directory, no key: while the gateway is stopped, delete the two
    oldest (not expired) files and append a re-hashed carried record covering them. The
    restarted writer's start checkpoint signs it; it is still not retention's."""
    again, _ = await forged_carried_record_signed_at_restart(tmp_path)
    result = verify_files(log_files(again), require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.MISSING_FILE)
    assert "followed by a checkpoint with reason 'start'" in result.problem
    assert result.retentions == () and result.removed == ()


async def test_a_retention_record_signed_by_another_checkpoint_explains_nothing(
    five_days: tuple[AuditLog, Clock],
) -> None:
    """A record written through emit (not by retention) and signed by an ordinary
    checkpoint: only the reason="retention" checkpoint right after it counts."""
    log, clock = five_days
    files = rotated(log)
    removal = plan_retention(log.path, WEEK, at(400)).removals[0]
    clock.now = at(400)
    log.emit("audit.retention", reason="expired", file=removal.path.name, first_seq=1,
             last_seq=removal.last_seq, last_hash=removal.last_hash, last_ts=removal.last_ts,
             records=removal.records, retention="7d")
    log.checkpoint()
    files[0].unlink()
    result = verify_files(log_files(log), require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.MISSING_FILE)
    assert "followed by a checkpoint with reason 'manual'" in result.problem


async def test_a_retention_record_followed_by_another_record_explains_nothing(
    five_days: tuple[AuditLog, Clock],
) -> None:
    """Only retention and recovery records may come between a retention record and
    retention's checkpoint: a later honest run does not sign an earlier stray record."""
    log, clock = five_days
    files = rotated(log)
    removal = plan_retention(log.path, WEEK, at(400)).removals[0]
    clock.now = at(400)
    fields: dict[str, object] = {
        "reason": "expired", "file": removal.path.name, "first_seq": 1,
        "last_seq": removal.last_seq, "last_hash": removal.last_hash,
        "last_ts": removal.last_ts, "records": removal.records, "retention": "7d"}
    log.emit("audit.retention", **fields)
    write_day(log, 400, records=1)
    assert log.record_retention([{**fields, "file": "later"}]).signed
    files[0].unlink()
    result = verify_files(log_files(log), require_complete=True)
    assert result.ok, result.problem  # the later record, signed by retention, explains it
    assert [r.file for r in result.retentions] == ["later"]


async def test_retention_records_and_their_checkpoint_are_adjacent_across_a_day_change(
    five_days: tuple[AuditLog, Clock],
) -> None:
    """Retention's records go into one file with their checkpoint right after them: a due
    rotation comes first, and no count checkpoint comes between."""
    log, clock = five_days
    log._checkpoint_every = 1  # the threshold would be reached after every record
    outcome = retain(log, clock, 400)
    assert len(outcome.removed) == 4
    tail = records(log.path)
    assert tail[0]["event"] == "audit.continue"  # the day change rotated first
    events = [(r["event"], r.get("reason")) for r in tail[1:]]
    assert events == [("audit.retention", "expired")] * 4 + [("audit.checkpoint", "retention")]
    assert verify_files(log_files(log), require_complete=True).ok


async def test_a_start_checkpoint_whose_reason_is_rewritten_to_retention_is_refused(
    tmp_path: Path,
) -> None:
    """Reviewer's probe: after the forged record above has been signed by a restart's start
    checkpoint, cut the live file right after that checkpoint and rewrite its reason to
    "retention" (re-hashed; nothing signed follows it). The reason is signed (version 2), so
    the checkpoint's signature no longer verifies."""
    log, clock = await forged_carried_record_signed_at_restart(tmp_path)
    lines = log.path.read_bytes().splitlines()
    start = next(i for i, line in enumerate(lines) if json.loads(line)["event"]
                 == "audit.checkpoint" and json.loads(line)["reason"] == "start")
    checkpoint = json.loads(lines[start])
    checkpoint["reason"] = "retention"
    del checkpoint["hash"]
    checkpoint["hash"] = record_hash(checkpoint)
    log.path.write_bytes(b"\n".join([*lines[:start], canonical_json(checkpoint).encode()])
                         + b"\n")
    third = new_log(tmp_path, clock)
    await third.start()
    write_day(third, 10)
    await third.close()
    result = verify_files(log_files(third), require_complete=True)
    assert (result.ok, result.kind) == (False, Problem.BAD_SIGNATURE)
    assert result.first_bad_seq == checkpoint["seq"]
    assert result.removed == () and result.retentions == ()


def resign_as_version_1(paths: list[Path], key_path: Path) -> None:
    """Rewrite a log as gatewayd wrote it before version 2: every checkpoint signed over the
    version 1 message, the chain re-linked (the hashes change with the signatures)."""
    key = load_or_create_signing_key(key_path)
    prev: str | None = None
    for path in paths:
        out = []
        for record in records(path):
            if prev is not None and record["prev"] != GENESIS_PREV:
                record["prev"] = prev
            if record["event"] == "audit.checkpoint":
                record["covers_hash"] = record["prev"]
                message = legacy_checkpoint_message(node=record["node"],
                                                    seq=record["covers_seq"],
                                                    hash_hex=record["prev"], ts=record["ts"])
                record["sig"] = base64.b64encode(key.sign(message)).decode()
            del record["hash"]
            record["hash"] = prev = record_hash(record)
            out.append(canonical_json(record).encode() + b"\n")
        path.write_bytes(b"".join(out))


async def test_a_log_signed_with_version_1_verifies_but_its_retention_counts_for_nothing(
    five_days: tuple[AuditLog, Clock], tmp_path: Path,
) -> None:
    """Logs written before checkpoints signed their reason: their checkpoints still sign the
    records (with a warning), but a version 1 retention checkpoint excuses no removal, since
    its reason could have been rewritten."""
    log, clock = five_days
    outcome = retain(log, clock, 400)
    assert len(outcome.removed) == 4
    await log.close()
    assert verify_files(log_files(log), require_complete=True).ok
    resign_as_version_1(log_files(log), tmp_path / "keys" / "audit.key")
    result = verify_files(log_files(log))
    assert result.ok, result.problem
    assert any("version 1 signature" in w for w in result.warnings)
    assert result.retentions == ()
    complete = verify_files(log_files(log), require_complete=True)
    assert (complete.ok, complete.kind) == (False, Problem.MISSING_FILE)
    assert "version 1 signature does not sign its reason 'retention'" in complete.problem


async def test_a_long_run_is_recorded_in_batches_each_durable_before_its_files_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reviewer's probe: a run over a backlog held the writer's lock (and so every emit on
    the event loop) for all its records, each fsynced. Now each lock hold writes at most one
    batch and fsyncs once, and a batch's files go only after its checkpoint is on disk."""
    clock = Clock()
    log = AuditLog(tmp_path / "audit.log", node="gw-test", fsync="always", clock=clock,
                   signing_key_path=tmp_path / "keys" / "audit.key", logger=quiet_logger())
    await log.start()
    backlog = tmp_path / "backlog"
    backlog.mkdir()
    removals = []
    for n in range(120):
        path = backlog / f"audit.log.{n:04d}"
        path.write_bytes(b"x\n")
        removals.append(Removal(path=path, first_seq=n * 10 + 1, last_seq=n * 10 + 10,
                                last_hash=f"{n:064x}", last_ts="2025-01-01T00:00:00+09:00",
                                records=10))
    trace: list[tuple[str, str]] = []
    real_write, real_fsync, real_unlink = log._write_all, os.fsync, Path.unlink

    class TracingLock:
        def __init__(self) -> None:
            self.inner = log._lock

        def __enter__(self) -> None:
            self.inner.acquire()
            trace.append(("acquire", ""))

        def __exit__(self, *_: object) -> None:
            trace.append(("release", ""))
            self.inner.release()

    def write(data: bytes) -> None:
        record = json.loads(data)
        trace.append(("record", f"{record['event']} {record.get('reason')}"))
        real_write(data)

    def fsync(fd: int) -> None:
        trace.append(("fsync", ""))
        real_fsync(fd)

    def unlink(path: Path, missing_ok: bool = False) -> None:
        trace.append(("unlink", path.name))
        real_unlink(path, missing_ok)

    monkeypatch.setattr(log, "_lock", TracingLock())
    monkeypatch.setattr(log, "_write_all", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    outcome = apply_plan(log, RetentionPlan(tuple(removals)), WEEK, quiet_logger())
    monkeypatch.undo()
    assert outcome.error is None and len(outcome.removed) == 120
    holds: list[list[str]] = []  # what happened under each hold of the lock
    for kind, _ in trace:
        if kind == "acquire":
            holds.append([])
        elif kind == "release":
            holds.append([])  # what follows, until the next acquire, is outside the lock
        elif holds:
            holds[-1].append(kind)
    under_lock = holds[0::2]
    assert [h.count("record") for h in under_lock] == [51, 51, 21]  # notes + checkpoint
    assert [h.count("fsync") for h in under_lock] == [1, 1, 1]
    assert all(h.count("unlink") == 0 for h in under_lock)
    # Write before act: every unlink comes after its batch's checkpoint and that fsync.
    last_record = last_fsync = -1
    for index, (kind, what) in enumerate(trace):
        if kind == "record":
            last_record = index
            last_what = what
        elif kind == "fsync":
            last_fsync = index
        elif kind == "unlink":
            assert last_what == "audit.checkpoint retention" and last_fsync > last_record
    assert not any(p.exists() for p in backlog.iterdir())
    await log.close()
