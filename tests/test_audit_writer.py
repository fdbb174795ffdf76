"""Tests for gatewayd.audit.writer: the AuditLog on real files in tmp_path."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gatewayd.audit import (
    EVENT_NAMES,
    GENESIS_PREV,
    AuditConfigError,
    AuditLog,
    AuditResumeError,
    AuditWriteError,
    FieldError,
    SecretFieldError,
    UnknownEventError,
    record_hash,
    verify_files,
)
from gatewayd.audit.events import unescape_text
from gatewayd.audit.signing import checkpoint_message, key_id
from gatewayd.audit.writer import MAX_RETENTION_RECORDS
from gatewayd.metrics import Metrics

JST = ZoneInfo("Asia/Tokyo")
START = datetime(2026, 11, 27, 17, 10, 56, 123456, tzinfo=JST)


class Clock:
    """An injectable clock that only moves when told to."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def make_log(tmp_path: Path, clock: Callable[[], datetime] | None = None, **options: Any) -> AuditLog:
    options.setdefault("node", "gw-test")
    return AuditLog(
        tmp_path / "logs" / "audit.log",
        signing_key_path=tmp_path / "keys" / "audit.key",
        clock=clock or Clock(),
        **options,
    )


def rehashed(line: bytes, **changes: Any) -> bytes:
    """``line`` with ``changes`` applied and a correctly recomputed hash (a forger's edit)."""
    record = {**json.loads(line), **changes}
    record["hash"] = record_hash(record)
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def records_of(path: Path) -> list[dict[str, Any]]:
    # split on "\n" only: str.splitlines() would also split on U+2028, hiding an injection.
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def error_count(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("gatewayd_audit_write_errors_total")
    return value or 0.0


def event_count(metrics: Metrics, event: str) -> float:
    value = metrics.registry.get_sample_value("gatewayd_audit_events_total", {"event": event})
    return value or 0.0


def is_audit_fd(fd: int, name: str = "audit.log") -> bool:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return target.removesuffix(" (deleted)").endswith("/" + name)


@pytest.fixture
def fail_audit_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Make os.write on the audit file fail with ENOSPC while ``control["fail"]`` is True."""
    real_write = os.write
    control: dict[str, Any] = {"fail": False, "partial": False, "calls": 0}

    def write(fd: int, data: Any) -> int:
        if control["fail"] and is_audit_fd(fd):
            control["calls"] += 1
            if control["partial"] and control["calls"] == 1:
                return real_write(fd, bytes(data)[: len(data) // 2])  # half a line, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    yield control


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll briefly for something the periodic task does (its intervals are tiny in tests)."""
    async with asyncio.timeout(3):
        # Polling is the point: the condition is file contents, which no Event can signal.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- the chain


async def test_records_have_chain_keys_and_verify(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    first = log.emit("auth.success", user="alice", source_ip="192.0.2.10", frontend="https")
    second = log.emit("access.allow", user="alice", service="approval", method="GET",
                      path="/approval/list", rule="staff-approval", status=200)
    await log.close()

    records = records_of(log.path)
    assert [(r["seq"], r["event"]) for r in records] == [
        (1, "audit.start"), (2, "auth.success"), (3, "access.allow"), (4, "audit.checkpoint")]
    assert records[0]["prev"] == GENESIS_PREV == "0" * 64
    assert records[0]["reason"] == "new audit log"
    assert records[0]["key_id"] == log.key_id
    assert records[1]["ts"] == "2026-11-27T17:10:56.123456+09:00"
    assert records[1]["node"] == "gw-test"
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    for record in records:
        assert record["hash"] == record_hash(record)
        assert set(record) >= {"ts", "seq", "event", "node", "prev", "hash"}
    assert first is not None and second is not None
    assert first.as_dict() == records[1]
    assert second.fields["rule"] == "staff-approval"
    assert records[3]["reason"] == "close"
    result = verify_files([log.path])
    assert result.ok, result.problem
    assert result.records == 4


async def test_each_line_is_the_canonical_json_of_its_record(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.failure", user="山田　太郎", source_ip="2001:db8::1", reason="bad factor")
    await log.close()
    line = log.path.read_bytes().split(b"\n")[1]
    record = json.loads(line)
    expected = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert line == expected.encode("utf-8")
    assert "山田　太郎".encode() in line  # UTF-8, not \\u escapes


async def test_ts_is_rendered_in_the_configured_timezone(tmp_path: Path) -> None:
    utc_clock = Clock(datetime(2026, 11, 27, 8, 10, 56, 123456, tzinfo=UTC))
    log = make_log(tmp_path, utc_clock)
    await log.start()
    record = log.emit("session.start", user="alice")
    await log.close()
    assert record is not None
    assert record.ts == "2026-11-27T17:10:56.123456+09:00"

    other = make_log(tmp_path / "utc", utc_clock, timezone=UTC)
    await other.start()
    record = other.emit("session.start", user="alice")
    await other.close()
    assert record is not None
    assert record.ts == "2026-11-27T08:10:56.123456+00:00"


async def test_naive_clock_is_a_programming_error(tmp_path: Path) -> None:
    log = make_log(tmp_path, lambda: datetime(2026, 11, 27, 17, 0))  # naive on purpose
    with pytest.raises(ValueError, match="timezone-aware"):
        await log.start()


async def test_unknown_names_raise_and_consume_no_seq(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    with pytest.raises(UnknownEventError):
        log.emit("auth.maybe", user="alice")
    with pytest.raises(FieldError, match="colour"):
        log.emit("auth.success", colour="blue")
    with pytest.raises(FieldError, match="set by the AuditLog"):
        log.emit("auth.success", seq=99)
    with pytest.raises(UnknownEventError, match="AuditLog itself"):
        log.emit("audit.checkpoint")
    with pytest.raises(TypeError):
        log.emit("tunnel.close", bytes_up="many")
    record = log.emit("auth.success", user="alice")
    await log.close()
    assert record is not None and record.seq == 2  # right after audit.start


@pytest.mark.parametrize(
    "name", ["password", "code", "otp", "totp_code", "cookie", "session_cookie", "token",
             "csrf_token", "secret", "key", "api_key", "key_id", "private_key", "passwd"],
)
async def test_secret_field_names_are_rejected(tmp_path: Path, name: str) -> None:
    log = make_log(tmp_path)
    await log.start()
    with pytest.raises(SecretFieldError):
        log.emit("auth.failure", user="alice", **{name: "hunter2-PLANTED"})
    await log.close()
    assert b"PLANTED" not in log.path.read_bytes()


async def test_realistic_run_never_writes_a_secret(tmp_path: Path) -> None:
    """A login/proxy/logout flow with planted secrets: none may appear in the file."""
    password, totp, cookie = "Tr0ub4dor&3-PLANTED", "492039", "gwsess-PLANTED-9f8e7d"
    csrf, signing_pem = "csrf-PLANTED-77aa", "-----BEGIN PRIVATE KEY-----PLANTED"
    log = make_log(tmp_path, checkpoint_every=4)
    await log.start()
    common = {"user": "alice", "source_ip": "198.51.100.7", "frontend": "https"}
    log.emit("auth.failure", **common, reason="invalid credentials")
    for name, value in (("password", password), ("code", totp), ("cookie", cookie),
                        ("csrf_token", csrf), ("key", signing_pem)):
        with pytest.raises(SecretFieldError):
            log.emit("auth.failure", **common, **{name: value})
    log.emit("auth.success", **common, device="pc-0042")
    log.emit("session.start", **common, session="s-5b1c")
    for n in range(5):
        log.emit("access.allow", **common, session="s-5b1c", service="approval", method="POST",
                 path=f"/approval/forms/{n}", rule="staff-approval", status=200,
                 duration_ms=12.6)
    log.emit("access.step_up", **common, service="files", path="/files/hr/", rule="hr-mfa")
    log.emit("tunnel.open", user="alice", service="smb", dest="10.0.0.5:445", session="s-5b1c")
    log.emit("tunnel.close", user="alice", service="smb", dest="10.0.0.5:445",
             bytes_up=1234, bytes_down=98765, duration_ms=60_000)
    log.emit("session.end", **common, session="s-5b1c", reason="logout")
    await log.close()
    data = log.path.read_bytes()
    for secret in (password, totp, cookie, csrf, "PLANTED"):
        assert secret.encode() not in data
    assert verify_files([log.path]).ok


# --------------------------------------------------------------------------- injection


INJECTIONS = [
    ("newline", "alice\nseq=1 event=auth.success"),
    ("carriage return", "alice\rforged"),
    ("ansi escape", "\x1b[31malice\x1b[0m"),
    ("line separator", "alice\u2028forged"),
    ("paragraph separator", "alice\u2029forged"),
    ("nul", "alice\x00root"),
    ("bidi override", "alice\u202etxt.exe"),
    ("c1 control", "alice\x9b31m"),
    ("lone surrogate", "alice\udcff"),
    ("escape look-alike", "alice\\x0a"),
]


@pytest.mark.parametrize(("label", "value"), INJECTIONS, ids=[i[0] for i in INJECTIONS])
async def test_user_supplied_values_cannot_break_lines(
    tmp_path: Path, label: str, value: str
) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.failure", user=value, path="/login" + value, reason=value)
    log.emit("auth.success", user="bob")
    await log.close()
    data = log.path.read_bytes()
    assert data.count(b"\n") == 4  # start, two records, close checkpoint: one line each
    for raw in ("\r", "\x1b", "\u2028", "\u2029", "\x00", "\u202e", "\x9b"):
        assert raw.encode("utf-8", "surrogatepass") not in data, label
    stored = records_of(log.path)[1]
    assert stored["user"].isprintable()
    assert unescape_text(stored["user"]) == value  # escaping is exact and reversible
    assert unescape_text(stored["path"]) == "/login" + value
    assert verify_files([log.path]).ok


async def test_long_values_are_truncated_with_a_marker(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    record = log.emit("access.deny", user="alice", path="/files/" + "a" * 5000)
    await log.close()
    assert record is not None
    stored = str(record.fields["path"])
    assert stored.startswith("/files/aaa")
    assert stored.endswith(f"…[+{5007 - 1024} chars]")
    assert len(stored) < 1100


# --------------------------------------------------------------------------- checkpoints


def public_key(log: AuditLog) -> Ed25519PublicKey:
    pub = serialization.load_pem_public_key(log.path.with_name("audit.log.pub").read_bytes())
    assert isinstance(pub, Ed25519PublicKey)
    return pub


async def test_checkpoint_every_n_records_is_signed(tmp_path: Path) -> None:
    log = make_log(tmp_path, checkpoint_every=3)
    await log.start()
    for n in range(7):
        log.emit("access.allow", user=f"user{n}", service="groupware")
    await log.close()
    records = records_of(log.path)
    checkpoints = [r for r in records if r["event"] == "audit.checkpoint"]
    # seq 1 is audit.start; it counts as a record like any other
    assert [(c["seq"], c["covers_seq"], c["reason"]) for c in checkpoints] == [
        (4, 3, "count"), (8, 7, "count"), (11, 10, "close"),
    ]
    pub = public_key(log)
    for cp in checkpoints:
        assert cp["covers_hash"] == cp["prev"] == records[cp["covers_seq"] - 1]["hash"]
        assert cp["key_id"] == key_id(pub) == log.key_id
        message = checkpoint_message(node=cp["node"], seq=cp["covers_seq"],
                                     hash_hex=cp["covers_hash"], ts=cp["ts"],
                                     reason=cp["reason"], key_id=cp["key_id"])
        pub.verify(base64.b64decode(cp["sig"]), message)  # raises if invalid


async def test_start_and_close_mark_the_run(tmp_path: Path) -> None:
    idle = make_log(tmp_path / "idle")
    await idle.start()
    await idle.close()
    assert [(r["event"], r.get("reason")) for r in records_of(idle.path)] == [
        ("audit.start", "new audit log"), ("audit.checkpoint", "close")]


async def test_manual_checkpoint_only_when_something_new(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("config.reload", operator="admin", status="success")
    log.checkpoint()
    log.checkpoint()  # nothing new since: no second checkpoint
    await log.close()  # a run always ends with its own close checkpoint
    assert [(r["event"], r.get("reason")) for r in records_of(log.path)] == [
        ("audit.start", "new audit log"), ("config.reload", None),
        ("audit.checkpoint", "manual"), ("audit.checkpoint", "close")]


async def test_periodic_task_checkpoints_only_when_something_new(tmp_path: Path) -> None:
    log = make_log(tmp_path, checkpoint_interval=0.01)
    await log.start()
    log.emit("auth.success", user="alice")

    def checkpoints() -> list[dict[str, Any]]:
        return [r for r in records_of(log.path) if r["event"] == "audit.checkpoint"]

    await wait_for(lambda: len(checkpoints()) == 1)
    assert checkpoints()[0]["reason"] == "interval"
    await asyncio.sleep(0.05)  # several idle intervals
    assert len(checkpoints()) == 1
    log.emit("auth.success", user="bob")
    await wait_for(lambda: len(checkpoints()) == 2)
    await log.close()


async def test_periodic_task_is_named_and_cancelled_on_close(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("gatewayd.audit.periodic")]
    assert len(tasks) == 1
    await log.close()
    assert tasks[0].cancelled()
    assert not log.healthy
    with pytest.raises(RuntimeError, match="closed"):
        log.emit("auth.success", user="alice")


async def test_cancelling_close_propagates_but_still_closes_the_file(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    closing = asyncio.create_task(log.close())
    await asyncio.sleep(0)  # close() is now waiting for the periodic task
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert records_of(log.path)[-1]["reason"] == "close"
    assert not log.healthy


async def test_emit_before_start_is_an_error(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    with pytest.raises(RuntimeError, match="new"):
        log.emit("auth.success", user="alice")


async def test_context_manager_starts_and_closes(tmp_path: Path) -> None:
    async with make_log(tmp_path) as log:
        assert log.healthy
        log.emit("auth.success", user="alice")
    assert records_of(log.path)[-1]["event"] == "audit.checkpoint"


# --------------------------------------------------------------------------- durability


@pytest.fixture
def fsync_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if is_audit_fd(fd):
            calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


async def test_fsync_always_syncs_before_emit_returns(
    tmp_path: Path, fsync_calls: list[int]
) -> None:
    log = make_log(tmp_path, fsync="always")
    await log.start()
    synced_at_start = len(fsync_calls)  # the audit.start record
    for n in (1, 2, 3):
        log.emit("auth.success", user="alice")
        assert len(fsync_calls) == synced_at_start + n
    await log.close()


async def test_fsync_interval_syncs_from_the_task(tmp_path: Path, fsync_calls: list[int]) -> None:
    log = make_log(tmp_path, fsync="interval", fsync_interval=0.01)
    await log.start()
    log.emit("auth.success", user="alice")
    assert fsync_calls == []  # written to the OS, not yet synced
    assert records_of(log.path)[1]["user"] == "alice"  # but already in the file
    await wait_for(lambda: len(fsync_calls) >= 1)
    synced = len(fsync_calls)
    await asyncio.sleep(0.05)
    assert len(fsync_calls) == synced  # nothing new: no needless fsyncs
    await log.close()


# --------------------------------------------------------------------------- write failures


async def test_failed_write_raises_counts_goes_unhealthy_and_recovers(
    tmp_path: Path, fail_audit_writes: dict[str, Any]
) -> None:
    metrics = Metrics(events=EVENT_NAMES)
    log = make_log(tmp_path, metrics=metrics)
    await log.start()
    first = log.emit("auth.success", user="alice")  # seq 2, after audit.start
    assert first is not None and log.healthy

    fail_audit_writes["fail"] = True
    with pytest.raises(AuditWriteError) as caught:
        log.emit("access.allow", user="alice", service="files")
    assert caught.value.event == "access.allow"
    assert caught.value.seq == 3
    assert caught.value.error.errno == errno.ENOSPC
    assert "ENOSPC" in str(caught.value)
    assert not log.healthy
    with pytest.raises(AuditWriteError):
        log.emit("access.allow", user="bob", service="files")
    assert error_count(metrics) == 2

    fail_audit_writes["fail"] = False
    recovered = log.emit("session.end", user="alice")
    assert recovered is not None and log.healthy
    assert recovered.seq == 5  # seqs 3 and 4 are never reused
    assert recovered.prev == first.hash  # the chain continues from the last written record
    await log.close()

    records = records_of(log.path)
    assert [r["seq"] for r in records] == [1, 2, 5, 6, 7]
    note = records[3]
    assert note["event"] == "audit.recovery"
    assert (note["lost_from"], note["lost_to"]) == (3, 4)
    assert "ENOSPC" in note["error"]
    assert event_count(metrics, "auth.success") == 1
    assert event_count(metrics, "audit.recovery") == 1
    result = verify_files([log.path])
    assert result.ok
    assert result.gaps == ((3, 4),)
    assert any("seq 3-4" in w for w in result.warnings)


async def test_partial_write_is_cut_back_so_no_half_line_remains(
    tmp_path: Path, fail_audit_writes: dict[str, Any]
) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    size = log.path.stat().st_size
    fail_audit_writes.update(fail=True, partial=True)
    with pytest.raises(AuditWriteError):
        log.emit("auth.success", user="bob" * 50)
    assert log.path.stat().st_size == size
    fail_audit_writes["fail"] = False
    log.emit("auth.success", user="carol")
    await log.close()
    assert verify_files([log.path]).ok


async def test_failed_fsync_removes_the_unsynced_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    real_fsync = os.fsync

    def broken_fsync(fd: int) -> None:
        if is_audit_fd(fd):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(AuditWriteError, match="EIO"):
        log.emit("auth.success", user="bob")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert "bob" not in log.path.read_text()  # what was not acknowledged is not kept
    log.emit("auth.success", user="carol")
    await log.close()
    assert verify_files([log.path]).gaps == ((3, 3),)


@pytest.fixture
def fail_writes_of(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make os.write on the audit file fail with ENOSPC for lines containing ``control["match"]``
    (e.g. only recovery notes, only file headers)."""
    real_write = os.write
    control: dict[str, Any] = {"match": None}

    def write(fd: int, data: Any) -> int:
        if control["match"] is not None and control["match"] in bytes(data) and is_audit_fd(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return control


async def test_each_lost_range_gets_its_own_recovery_record(
    tmp_path: Path, fail_audit_writes: dict[str, Any], fail_writes_of: dict[str, Any]
) -> None:
    """A gap is accepted only when a recovery record names exactly it, so two gaps with a
    record between them (the first note failed) need two recovery records."""
    log = make_log(tmp_path, on_failure="continue")
    await log.start()
    log.emit("auth.success", user="alice")  # 2
    fail_audit_writes["fail"] = True
    assert log.emit("auth.success", user="bob") is None  # 3 lost
    fail_audit_writes["fail"] = False
    fail_writes_of["match"] = b'"audit.recovery"'
    assert log.emit("auth.success", user="carol") is not None  # 4; its note (5) is lost
    fail_writes_of["match"] = None
    assert log.emit("auth.success", user="dave") is not None  # 6, then notes 7 and 8
    await log.close()
    notes = [r for r in records_of(log.path) if r["event"] == "audit.recovery"]
    assert [(n["seq"], n["lost_from"], n["lost_to"]) for n in notes] == [(7, 3, 3), (8, 5, 5)]
    assert "ENOSPC" in notes[0]["error"]
    result = verify_files([log.path], require_sealed=True)
    assert result.ok, result.problem
    assert result.gaps == ((3, 3), (5, 5))


async def test_adjacent_lost_seqs_are_one_range(
    tmp_path: Path, fail_writes_of: dict[str, Any]
) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")  # 2
    fail_writes_of["match"] = b"mallory"
    with pytest.raises(AuditWriteError):
        log.emit("auth.success", user="mallory")  # 3 lost
    fail_writes_of["match"] = b'"audit.recovery"'
    log.checkpoint()  # its note (4) is lost too; the checkpoint itself (5) is written
    fail_writes_of["match"] = None
    await log.close()
    notes = [r for r in records_of(log.path) if r["event"] == "audit.recovery"]
    assert [(n["lost_from"], n["lost_to"]) for n in notes] == [(3, 4)]
    assert verify_files([log.path], require_sealed=True).ok


async def test_close_accounts_for_a_failed_last_record(
    tmp_path: Path, fail_audit_writes: dict[str, Any]
) -> None:
    log = make_log(tmp_path)
    await log.start()
    fail_audit_writes["fail"] = True
    with pytest.raises(AuditWriteError):
        log.emit("session.end", user="alice")  # seq 2, the run's last event, is lost
    fail_audit_writes["fail"] = False
    await log.close()
    events = [(r["seq"], r["event"]) for r in records_of(log.path)]
    assert events == [(1, "audit.start"), (3, "audit.recovery"), (4, "audit.checkpoint")]
    result = verify_files([log.path], require_sealed=True)
    assert result.ok and result.gaps == ((2, 2),)


async def test_rotation_accounts_for_lost_seqs_in_the_file_it_seals(
    tmp_path: Path, fail_audit_writes: dict[str, Any]
) -> None:
    clock = Clock()
    log = make_log(tmp_path, clock, rotate_daily=True)
    await log.start()
    log.emit("auth.success", user="alice")  # 2
    fail_audit_writes["fail"] = True
    with pytest.raises(AuditWriteError):
        log.emit("auth.success", user="bob")  # 3 lost
    fail_audit_writes["fail"] = False
    clock.advance(days=1)
    log.emit("auth.success", user="carol")
    await log.close()
    (rotated,) = [p for p in log.path.parent.iterdir() if ROTATED.fullmatch(p.name)]
    assert [r["event"] for r in records_of(rotated)][-2:] == ["audit.recovery", "audit.checkpoint"]
    result = verify_files([rotated], require_sealed=True)  # the archived file on its own
    assert result.ok, result.problem
    assert result.gaps == ((3, 3),)
    assert verify_files([rotated, log.path], require_sealed=True).ok


async def test_a_failed_header_costs_a_seq_but_not_the_chain(
    tmp_path: Path, fail_writes_of: dict[str, Any]
) -> None:
    log = make_log(tmp_path, rotate_bytes=1)  # every record starts a new file
    await log.start()
    log.emit("auth.success", user="alice")
    fail_writes_of["match"] = b'"audit.continue"'
    with pytest.raises(AuditWriteError) as caught:
        log.emit("auth.success", user="bob")
    assert caught.value.seq is None  # bob never got a seq: the new file's header failed
    lost = records_of(log.path.parent / sorted(
        p.name for p in log.path.parent.iterdir() if ROTATED.fullmatch(p.name))[-1])[-1]["seq"] + 1
    fail_writes_of["match"] = None
    log.emit("auth.success", user="carol")
    await log.close()
    header, carol, note = records_of(log.path)[:3]
    assert (header["event"], header["seq"]) == ("audit.continue", lost + 1)
    assert carol["user"] == "carol"
    assert (note["event"], note["lost_from"], note["lost_to"]) == ("audit.recovery", lost, lost)
    files = [p for p in log.path.parent.iterdir() if ROTATED.fullmatch(p.name)] + [log.path]
    result = verify_files(files, require_sealed=True)
    assert result.ok, result.problem
    assert result.gaps == ((lost, lost),)


async def test_a_failed_first_record_of_a_new_log(
    tmp_path: Path, fail_audit_writes: dict[str, Any]
) -> None:
    fail_audit_writes["fail"] = True
    log = make_log(tmp_path)
    await log.start()  # audit.start (seq 1) and the header before its recovery note (2) failed
    assert not log.healthy
    fail_audit_writes["fail"] = False
    record = log.emit("auth.success", user="alice")
    await log.close()
    assert record is not None
    records = records_of(log.path)
    events = [(r["seq"], r["event"], r.get("reason")) for r in records]
    assert events[:2] == [(3, "audit.start", "new audit log"), (4, "auth.success", None)]
    assert (records[2]["event"], records[2]["lost_from"], records[2]["lost_to"]) == (
        "audit.recovery", 1, 2)
    result = verify_files([log.path], require_sealed=True)
    assert result.ok, result.problem
    assert result.gaps == ((1, 2),)


async def test_on_failure_continue_returns_none_but_counts(
    tmp_path: Path, fail_audit_writes: dict[str, Any]
) -> None:
    metrics = Metrics(events=EVENT_NAMES)
    log = make_log(tmp_path, on_failure="continue", metrics=metrics)
    await log.start()
    fail_audit_writes["fail"] = True
    assert log.emit("auth.success", user="alice") is None
    assert not log.healthy
    assert error_count(metrics) == 1
    fail_audit_writes["fail"] = False
    assert log.emit("auth.success", user="bob") is not None
    assert log.healthy
    await log.close()


async def test_vanished_directory_fails_until_it_is_back(tmp_path: Path) -> None:
    metrics = Metrics(events=EVENT_NAMES)
    log = make_log(tmp_path, metrics=metrics)
    await log.start()
    first = log.emit("auth.success", user="alice")  # seq 2
    assert first is not None
    shutil.rmtree(log.path.parent)
    with pytest.raises(AuditWriteError) as caught:
        log.emit("auth.success", user="bob")
    assert caught.value.error.errno == errno.ENOENT
    assert not log.healthy and error_count(metrics) == 1

    log.path.parent.mkdir()
    record = log.emit("auth.success", user="carol")
    assert record is not None and log.healthy
    await log.close()
    records = records_of(log.path)
    header = records[0]  # the new file begins with a header chained to the last record written
    assert (header["event"], header["seq"], header["prev_seq"]) == ("audit.continue", 4, 2)
    assert header["prev"] == first.hash
    assert header["reason"] == "the live file was moved or deleted while open"
    assert (records[1]["user"], records[1]["prev"]) == ("carol", header["hash"])
    note = records[2]
    assert note["event"] == "audit.recovery"
    assert "moved or deleted" in note["reason"]
    assert note["lost_from"] == note["lost_to"] == 3
    result = verify_files([log.path])
    assert result.ok, result.problem
    assert any("starts at seq 4" in w for w in result.warnings)
    assert result.gaps == ((3, 3),)  # known from prev_seq, explained by the recovery record


async def test_live_file_moved_away_continues_the_chain_in_a_new_file(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    moved = log.path.with_name("audit.log.by-logrotate")
    os.rename(log.path, moved)
    record = log.emit("auth.success", user="bob")
    assert record is not None and log.healthy
    await log.close()
    assert records_of(moved)[-1]["user"] == "alice"
    header, bob, note, _close = records_of(log.path)
    assert (header["event"], header["prev_seq"]) == ("audit.continue", 2)
    assert bob["user"] == "bob" and note["event"] == "audit.recovery"
    assert verify_files([log.path, moved]).ok


class RecordingLogger:
    """A stand-in for the gateway's configured structlog logger."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self.calls.append(("info", event, kw))

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self.calls.append(("warning", event, kw))

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self.calls.append(("error", event, kw))


@pytest.fixture
def no_global_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything reaches for structlog's process-wide logger or config."""

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("global structlog used: get_logger/configure")

    for name in ("get_logger", "configure", "configure_once", "get_config"):
        monkeypatch.setattr(structlog, name, forbidden)


@pytest.mark.usefixtures("no_global_structlog")
async def test_operational_messages_go_to_the_given_logger(
    tmp_path: Path, fail_audit_writes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = RecordingLogger()
    log = make_log(tmp_path, logger=logger)
    await log.start()
    fail_audit_writes["fail"] = True
    with pytest.raises(AuditWriteError):
        log.emit("auth.success", user="alice")
    fail_audit_writes["fail"] = False
    await log.close()

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    rotating = make_log(tmp_path / "rotating", logger=logger, rotate_bytes=1)
    await rotating.start()
    monkeypatch.setattr(os, "rename", refuse)
    rotating.emit("auth.success", user="bob")
    await rotating.close()
    assert [(level, event) for level, event, _ in logger.calls] == [
        ("error", "audit record not written"), ("error", "audit log rotation failed")]
    fields = logger.calls[0][2]
    assert fields["audit_event"] == "auth.success" and "ENOSPC" in fields["error"]
    assert fields["path"] == str(log.path)


@pytest.mark.usefixtures("no_global_structlog")
async def test_periodic_task_errors_go_to_the_given_logger(tmp_path: Path) -> None:
    logger = RecordingLogger()
    log = make_log(tmp_path, logger=logger, checkpoint_interval=0.01)

    def broken(now: datetime) -> None:
        raise RuntimeError("tick failed")

    log._rotate_if_due = broken  # type: ignore[method-assign]
    await log.start()
    await wait_for(lambda: bool(logger.calls))
    await log.close()
    level, event, fields = logger.calls[0]
    assert (level, event, fields["exc_info"]) == ("error", "audit periodic task error", True)


@pytest.mark.usefixtures("no_global_structlog")
async def test_default_logger_is_private_json_lines_on_stderr(
    tmp_path: Path, fail_audit_writes: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    log = make_log(tmp_path)
    await log.start()
    fail_audit_writes["fail"] = True
    with pytest.raises(AuditWriteError):
        log.emit("auth.success", user="alice")
    fail_audit_writes["fail"] = False
    await log.close()
    message = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert (message["event"], message["level"]) == ("audit record not written", "error")
    assert (message["audit_event"], message["seq"]) == ("auth.success", 2)
    assert message["logger"] == "gatewayd.audit"


async def test_emits_from_threads_keep_one_chain(tmp_path: Path) -> None:
    log = make_log(tmp_path, fsync="interval")
    await log.start()

    def burst(n: int) -> None:
        for i in range(50):
            log.emit("access.allow", user=f"t{n}", path=f"/groupware/{i}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(burst, range(8)))
    await log.close()
    seqs = [r["seq"] for r in records_of(log.path)]
    assert seqs == list(range(1, 403))  # start, 400 records, close
    assert verify_files([log.path]).ok


# --------------------------------------------------------------------------- resume


async def test_a_second_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    first = make_log(tmp_path)
    await first.start()
    second = make_log(tmp_path)
    with pytest.raises(AuditResumeError, match="another process"):
        await second.start()
    first.emit("auth.success", user="alice")
    await first.close()
    third = make_log(tmp_path)
    await third.start()  # the lock went with the first writer
    await third.close()
    assert verify_files([third.path]).ok


async def test_restart_continues_seq_and_prev(tmp_path: Path) -> None:
    clock = Clock()
    first = make_log(tmp_path, clock)
    await first.start()
    for user in ("alice", "bob", "carol"):
        first.emit("auth.success", user=user)
    await first.close()
    last = records_of(first.path)[-1]

    clock.advance(hours=1)
    second = make_log(tmp_path, clock)
    await second.start()
    record = second.emit("auth.success", user="dave")
    await second.close()
    restart = records_of(second.path)[last["seq"]]
    assert restart["event"] == "audit.start"
    assert (restart["seq"], restart["prev"]) == (last["seq"] + 1, last["hash"])
    assert restart["reason"] == f"restart; the previous run closed cleanly at seq {last['seq']}"
    assert record is not None
    assert (record.seq, record.prev) == (last["seq"] + 2, restart["hash"])
    assert second.key_id == first.key_id  # the same signing key was loaded
    assert verify_files([second.path]).ok


async def test_restart_after_crash_signs_the_unsigned_tail(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    log.emit("auth.success", user="bob")
    await log.close()
    lines = log.path.read_bytes().split(b"\n")
    log.path.write_bytes(b"\n".join(lines[:3]) + b"\n")  # as if it crashed before close

    again = make_log(tmp_path)
    await again.start()
    await again.close()
    records = records_of(again.path)
    assert (records[3]["event"], records[3]["reason"], records[3]["covers_seq"]) == (
        "audit.checkpoint", "start", 3)
    assert records[4]["event"] == "audit.start"
    assert "unclean shutdown" in records[4]["reason"]
    assert verify_files([again.path], require_sealed=True).ok


async def test_torn_final_line_is_moved_aside_and_recorded(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    await log.close()
    torn = b'{"event":"auth.success","hash":"ab'
    with log.path.open("ab") as stream:
        stream.write(torn)

    again = make_log(tmp_path)
    await again.start()
    record = again.emit("auth.success", user="bob")
    await again.close()

    quarantined = list(log.path.parent.glob("audit.log.torn-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes() == torn
    records = records_of(log.path)  # asserts the file again ends in a newline
    # first run: start 1, alice 2, close 3; the torn record was seq 4
    note = records[3]
    assert note["event"] == "audit.recovery"
    assert note["quarantine"] == quarantined[0].name
    assert note["discarded_bytes"] == len(torn)
    assert note["discarded_sha256"] == hashlib.sha256(torn).hexdigest()
    assert note["lost_from"] == note["lost_to"] == 4  # the torn record's seq is never reused
    assert note["prev"] == records[2]["hash"]
    assert (records[4]["event"], records[4]["reason"]) == ("audit.checkpoint", "start")
    assert records[5]["event"] == "audit.start" and "unclean" in records[5]["reason"]
    assert record is not None and record.seq == 8
    result = verify_files([log.path])
    assert result.ok and result.gaps == ((4, 4),)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda line: line.replace(b'"alice"', b'"mallory"'), id="edited"),
        pytest.param(lambda line: b"this is not json", id="garbage"),
        pytest.param(lambda line: line.replace(b'"alice"', b'"\\ud800"'), id="lone-surrogate"),
        pytest.param(lambda line: b"[" * 100_000, id="deep-nesting"),
        pytest.param(lambda line: rehashed(line, ts="27 Nov 2026"), id="unreadable-ts"),
    ],
)
async def test_untrustworthy_last_record_refuses_to_start(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    await log.close()
    start, alice = log.path.read_bytes().split(b"\n")[:2]  # drop the close checkpoint
    log.path.write_bytes(start + b"\n" + damage(alice) + b"\n")
    with pytest.raises(AuditResumeError, match="refusing"):
        await make_log(tmp_path).start()


async def test_resume_from_newest_rotated_file_when_live_file_is_missing(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    log.emit("auth.success", user="alice")
    await log.close()
    rotated = log.path.with_name("audit.log.20261127T171056.123456")
    os.rename(log.path, rotated)  # as if the daemon died right after rotating

    again = make_log(tmp_path)
    await again.start()
    record = again.emit("auth.success", user="bob")
    await again.close()
    header, restart = records_of(again.path)[:2]
    assert (header["event"], header["seq"], header["prev_seq"]) == ("audit.continue", 4, 3)
    assert header["prev"] == records_of(rotated)[-1]["hash"]
    assert header["reason"] == "restart: the live file was missing or empty"
    assert (restart["event"], restart["seq"]) == ("audit.start", 5)
    assert record is not None and record.seq == 6
    assert verify_files([rotated, again.path]).ok
    assert verify_files([again.path], require_sealed=True).ok  # with a warning: starts later


# --------------------------------------------------------------------------- rotation

ROTATED = re.compile(r"audit\.log\.\d{8}T\d{6}\.\d{6}(-\d+)?")


async def test_size_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    clock = Clock()
    log = make_log(tmp_path, clock, rotate_bytes=1500)
    await log.start()
    for n in range(20):
        clock.advance(seconds=1)
        log.emit("access.allow", user=f"user{n}", service="files", path=f"/files/{n}")
    await log.close()

    rotated = sorted(p for p in log.path.parent.iterdir() if ROTATED.fullmatch(p.name))
    assert len(rotated) >= 3
    chain = [*rotated, log.path]
    previous_last: dict[str, Any] | None = None
    seqs: list[int] = []
    for path in chain:
        records = records_of(path)
        if path != log.path:
            assert records[-1]["event"] == "audit.checkpoint"
            assert records[-1]["reason"] == "rotation"
            assert path.name == "audit.log." + datetime.fromisoformat(
                records[0]["ts"]).strftime("%Y%m%dT%H%M%S.%f")
        if previous_last is None:
            assert (records[0]["event"], records[0]["prev"]) == ("audit.start", GENESIS_PREV)
        else:  # each later file begins with a header naming the previous file's last record
            assert (records[0]["event"], records[0]["reason"]) == ("audit.continue", "rotation")
            assert records[0]["prev"] == previous_last["hash"]
            assert records[0]["prev_seq"] == previous_last["seq"]
        previous_last = records[-1]
        seqs += [r["seq"] for r in records]
    assert seqs == list(range(1, len(seqs) + 1))
    result = verify_files(list(reversed(chain)))  # argument order does not matter
    assert result.ok, result.problem
    assert result.files == tuple(chain)


async def test_daily_rotation_follows_the_configured_timezone(tmp_path: Path) -> None:
    # 14:59:59Z is 23:59:59 in Tokyo: the next record two seconds later is another day there.
    clock = Clock(datetime(2026, 11, 27, 14, 59, 59, tzinfo=UTC))
    log = make_log(tmp_path, clock, rotate_daily=True)
    utc_log = make_log(tmp_path / "utc", clock, rotate_daily=True, timezone=UTC)
    for audit in (log, utc_log):
        await audit.start()
        audit.emit("auth.success", user="alice")
    clock.advance(seconds=2)
    for audit in (log, utc_log):
        audit.emit("auth.success", user="bob")
        await audit.close()

    rotated = log.path.with_name("audit.log.20261127T235959.000000")
    assert [r.get("user") for r in records_of(rotated)] == [None, "alice", None]
    assert records_of(rotated)[-1]["reason"] == "rotation"
    assert records_of(log.path)[0]["ts"] == "2026-11-28T00:00:01.000000+09:00"
    assert verify_files([rotated, log.path]).ok
    assert not [p for p in utc_log.path.parent.iterdir() if ROTATED.fullmatch(p.name)]


async def test_idle_file_is_rotated_after_midnight_by_the_task(tmp_path: Path) -> None:
    clock = Clock(datetime(2026, 11, 27, 23, 59, 59, tzinfo=JST))
    log = make_log(tmp_path, clock, rotate_daily=True, checkpoint_interval=0.01)
    await log.start()
    log.emit("auth.success", user="alice")
    clock.advance(seconds=2)
    rotated = log.path.with_name("audit.log.20261127T235959.000000")
    await wait_for(rotated.exists)
    await log.close()
    assert records_of(rotated)[-1]["reason"] == "rotation"


async def test_same_start_time_gets_a_numbered_rotated_name(tmp_path: Path) -> None:
    log = make_log(tmp_path, rotate_bytes=1)  # every record starts a new file; clock frozen
    await log.start()
    for user in ("alice", "bob", "carol"):
        log.emit("auth.success", user=user)
    await log.close()
    names = sorted(p.name for p in log.path.parent.iterdir() if ROTATED.fullmatch(p.name))
    assert names == ["audit.log.20261127T171056.123456", "audit.log.20261127T171056.123456-1",
                     "audit.log.20261127T171056.123456-2"]
    files = [log.path.parent / n for n in names] + [log.path]
    assert verify_files(files).ok


async def test_failed_rename_keeps_writing_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    log = make_log(tmp_path, rotate_bytes=1)
    await log.start()
    log.emit("auth.success", user="alice")
    monkeypatch.setattr(os, "rename", refuse)
    record = log.emit("auth.success", user="bob")
    assert record is not None and log.healthy
    await log.close()
    events = [(r["event"], r.get("reason", "")) for r in records_of(log.path)]
    assert events[0] == ("audit.continue", "rotation")
    assert events[2] == ("audit.checkpoint", "rotation")
    assert events[3][0] == "auth.success"
    assert events[4][0] == "audit.recovery" and "rotation" in events[4][1]
    assert verify_files([log.path]).ok


# --------------------------------------------------------------------------- keys


async def test_signing_key_is_created_private_and_public_key_published(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    await log.start()
    await log.close()
    key_file = tmp_path / "keys" / "audit.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert key_id(public_key(log)) == log.key_id


@pytest.mark.parametrize(
    "options",
    [{"fsync": "sometimes"}, {"on_failure": "ignore"}, {"checkpoint_every": 0},
     {"rotate_bytes": 0}, {"checkpoint_interval": 0}, {"node": ""}],
)
def test_invalid_options_are_rejected(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(AuditConfigError):
        make_log(tmp_path, **options)


@pytest.mark.parametrize("name", ["checkpoint_interval", "fsync_interval"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_intervals_must_be_positive_finite_seconds(
    tmp_path: Path, name: str, value: float
) -> None:
    with pytest.raises(AuditConfigError, match=rf"audit {name} must be a positive, finite "
                       rf"number of seconds, got {re.escape(repr(value))}") as caught:
        make_log(tmp_path, fsync="interval", **{name: value})
    assert isinstance(caught.value, ValueError)  # callers catching ValueError keep working


# --------------------------------------------------------------------------- retention records

RETENTION_NOTE: dict[str, object] = {
    "reason": "expired", "file": "audit.log.x", "first_seq": 1, "last_seq": 10,
    "last_hash": "a" * 64, "last_ts": "2025-01-01T00:00:00.000000+09:00", "records": 10,
    "retention": "7d"}


async def test_record_retention_fsyncs_once_per_call_and_caps_its_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with fsync="always": the records and their checkpoint, then one fsync (the
    emits waiting for the lock wait for one, not one per record); too many notes refused."""
    log = make_log(tmp_path, fsync="always")
    await log.start()
    real_fsync = os.fsync
    audit_fsyncs: list[int] = []

    def fsync(fd: int) -> None:
        if is_audit_fd(fd):
            audit_fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    outcome = log.record_retention([RETENTION_NOTE] * MAX_RETENTION_RECORDS)
    assert (outcome.written, outcome.signed) == (MAX_RETENTION_RECORDS, True)
    assert len(audit_fsyncs) == 1
    tail = records_of(log.path)[-MAX_RETENTION_RECORDS - 1:]
    assert [r["event"] for r in tail] == (["audit.retention"] * MAX_RETENTION_RECORDS
                                          + ["audit.checkpoint"])
    with pytest.raises(ValueError, match="at most"):
        log.record_retention([RETENTION_NOTE] * (MAX_RETENTION_RECORDS + 1))
    log.emit("access.allow", user="u")
    assert len(audit_fsyncs) == 2  # ordinary records are fsynced one by one again
    await log.close()
    assert verify_files([log.path]).ok


async def test_record_retention_is_not_signed_when_its_fsync_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, fsync="always", on_failure="continue")
    await log.start()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if is_audit_fd(fd):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    outcome = log.record_retention([RETENTION_NOTE])
    assert not outcome.signed and "syncing" in (outcome.error or "")
    assert not log.healthy
    monkeypatch.setattr(os, "fsync", real_fsync)
    await log.close()


async def test_a_checkpoint_that_starts_a_new_live_file_signs_its_header(
        tmp_path: Path) -> None:
    """The live file deleted while open: the checkpoint's new file begins with its header and
    the checkpoint signs up to that header (it used to sign the record before it)."""
    log = make_log(tmp_path)
    await log.start()
    log.emit("access.allow", user="u")
    log.path.unlink()
    log.checkpoint()
    await log.close()
    events = [(r["event"], r.get("reason")) for r in records_of(log.path)]
    assert events[0][0] == "audit.continue"
    assert events[-1] == ("audit.checkpoint", "close")
    manual = next(r for r in records_of(log.path) if r.get("reason") == "manual")
    assert manual["covers_seq"] == manual["seq"] - 1
    result = verify_files([log.path])
    assert result.ok, result.problem
