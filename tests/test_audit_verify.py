"""Tests for gatewayd.audit.verify: one test per kind of tampering, plus properties."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd.audit import (
    EVENT_NAMES,
    AuditKeyError,
    AuditLog,
    Problem,
    canonical_json,
    record_hash,
    verify_files,
)
from gatewayd.audit.events import INTERNAL_EVENTS
from gatewayd.audit.signing import key_id, sign_checkpoint

JST = ZoneInfo("Asia/Tokyo")
CALLER_EVENTS = sorted(EVENT_NAMES - INTERNAL_EVENTS)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 9, 0, tzinfo=JST)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)  # every reading is a second later
        return self.now


def new_log(directory: Path, **options: Any) -> AuditLog:
    options.setdefault("checkpoint_every", 5)
    return AuditLog(directory / "audit.log", node="gw-test", signing_key_path=directory / "key",
                    fsync="interval", clock=Clock(), **options)


async def write_log(directory: Path, events: int = 12, **options: Any) -> AuditLog:
    """With the defaults: seq 1 audit.start, 2-5 events, 6 checkpoint, 7-11 events,
    12 checkpoint, 13-15 events, 16 close checkpoint (line index = seq - 1)."""
    log = new_log(directory, **options)
    await log.start()
    for n in range(events):
        log.emit("access.allow", user=f"user{n}", source_ip="192.0.2.10", service="files",
                 method="GET", path=f"/files/{n}", rule="staff-files", status=200)
    await log.close()
    return log


@pytest.fixture
async def log(tmp_path: Path) -> AuditLog:
    return await write_log(tmp_path)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, new_lines: Sequence[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def record(line: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def rehashed(fields: dict[str, Any]) -> bytes:
    """A line for ``fields`` with a correctly recomputed hash (what a forger would do)."""
    fields = {**fields, "hash": record_hash(fields)}
    return canonical_json(fields).encode()


def seq_at(path: Path, index: int) -> int:
    seq: int = record(lines(path)[index])["seq"]
    return seq


def assert_problem(result: Any, kind: Problem, first_bad_seq: int) -> None:
    assert not result.ok
    assert (result.kind, result.first_bad_seq) == (kind, first_bad_seq), result.problem


# --------------------------------------------------------------------------- intact logs


async def test_intact_log_verifies_with_counts(log: AuditLog) -> None:
    result = verify_files([log.path])
    assert result.ok, result.problem
    assert (result.records, result.first_seq, result.last_seq) == (16, 1, 16)
    assert result.checkpoints == 3
    assert result.last_checkpoint is not None
    assert (result.last_checkpoint.seq, result.last_checkpoint.reason) == (16, "close")
    assert result.unsigned_tail == 0
    assert result.warnings == ()
    assert result.key_ids == (log.key_id,)
    assert result.first_bad_seq is None and result.problem == ""


async def test_explicit_key_and_missing_or_wrong_keys(log: AuditLog, tmp_path: Path) -> None:
    pub = log.path.with_name("audit.log.pub")
    assert verify_files([log.path], pub).ok
    moved = tmp_path / "elsewhere.pub"
    pub.rename(moved)
    with pytest.raises(AuditKeyError, match="no public key"):
        verify_files([log.path])
    with pytest.raises(AuditKeyError, match="cannot read"):
        verify_files([log.path], tmp_path / "nope.pub")
    other = tmp_path / "other.pub"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    result = verify_files([log.path], other)
    assert_problem(result, Problem.BAD_SIGNATURE, 6)
    assert "not among the public keys" in result.problem
    assert verify_files([log.path], [other, moved]).ok  # a keyring with old and new keys


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify_files([tmp_path / "audit.log"])


# --------------------------------------------------------------------------- one test per tampering


async def test_edited_field(log: AuditLog) -> None:
    content = lines(log.path)
    content[2] = content[2].replace(b'"user1"', b'"mallory"')
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.EDITED, 3)
    assert (result.file, result.line) == (log.path, 3)
    assert result.records == 2


async def test_whitespace_only_change_is_an_edit(log: AuditLog) -> None:
    content = lines(log.path)
    content[2] = content[2].replace(b'","', b'", "', 1)  # same JSON value, other bytes
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.EDITED, 3)


async def test_edited_and_rehashed_record(log: AuditLog) -> None:
    content = lines(log.path)
    content[2] = rehashed({**record(content[2]), "user": "mallory"})
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.EDITED, 3)
    assert "re-hashed" in result.problem


async def test_deleted_record(log: AuditLog) -> None:
    content = lines(log.path)
    del content[2]
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.DELETED, 3)
    assert "seq 3 missing" in result.problem


async def test_deleted_records(log: AuditLog) -> None:
    content = lines(log.path)
    del content[2:4]
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.DELETED, 3)


@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("cut", [1, 4, 6])
async def test_deleted_head_of_a_closed_log(log: AuditLog, cut: int, sealed: bool) -> None:
    """Every remaining link and signature is intact; only the missing header tells."""
    write_lines(log.path, lines(log.path)[cut:])
    result = verify_files([log.path], require_sealed=sealed)
    assert_problem(result, Problem.DELETED, cut + 1)  # the seq of the file's first record
    assert (result.file, result.line) == (log.path, 1)
    assert "not with a header record" in result.problem


async def test_deleted_head_of_a_rotated_file(tmp_path: Path) -> None:
    chain = await rotated_log(tmp_path)
    middle = chain[1]
    content = lines(middle)
    assert record(content[0])["event"] == "audit.continue"
    write_lines(middle, content[2:])
    first_left = record(content[2])["seq"]
    assert_problem(verify_files(chain), Problem.DELETED, first_left)
    assert_problem(verify_files(chain[1:]), Problem.DELETED, first_left)
    write_lines(middle, content[1:])  # only the header
    assert_problem(verify_files(chain), Problem.DELETED, first_left - 1)


async def test_a_header_must_be_a_real_one(log: AuditLog) -> None:
    content = lines(log.path)
    start = record(content[0])
    # an audit.start that does not begin a new chain is a restart, not a file header
    write_lines(log.path, [rehashed({**start, "prev": "1" * 64}), *content[1:]])
    assert_problem(verify_files([log.path]), Problem.DELETED, 1)
    forged = {k: v for k, v in start.items() if k not in ("key_id", "reason")}
    for prev_seq in (None, 0, 1):
        fields = {**forged, "event": "audit.continue", "prev": "1" * 64}
        if prev_seq is not None:
            fields["prev_seq"] = prev_seq
        write_lines(log.path, [rehashed(fields), *content[1:]])
        assert_problem(verify_files([log.path]), Problem.DELETED, 1)


def relinked(content: list[bytes], start: int) -> list[bytes]:
    """``content`` with every record from index ``start`` on re-linked and re-hashed."""
    out = list(content)
    for index in range(start, len(out)):
        out[index] = rehashed({**record(out[index]), "prev": record(out[index - 1])["hash"]})
    return out


async def test_gap_with_intact_chain_but_no_recovery_is_deleted(log: AuditLog) -> None:
    """Deleting unsigned records and re-linking the rest leaves a gap and an intact chain."""
    content = lines(log.path)[:-1]  # a live file: seq 13-15 come after the last checkpoint
    del content[13]  # seq 14
    write_lines(log.path, relinked(content, 13))
    result = verify_files([log.path])
    assert_problem(result, Problem.DELETED, 14)
    assert "no audit.recovery record" in result.problem
    assert (result.file, result.line) == (log.path, 14)
    assert result.gaps == ()


async def test_recovery_must_name_exactly_the_gap(log: AuditLog) -> None:
    content = lines(log.path)[:-1]
    del content[12:14]  # seq 13-14
    content = relinked(content, 12)
    template = record(content[-1])
    for lost, ok in (((13, 15), False), ((14, 14), False), ((13, 13), False), ((13, 14), True)):
        note = {key: value for key, value in template.items() if key not in ("user", "path")}
        note.update(event="audit.recovery", seq=16, prev=template["hash"], reason="forged",
                    lost_from=lost[0], lost_to=lost[1])
        write_lines(log.path, [*content, rehashed(note)])
        result = verify_files([log.path])
        assert result.ok is ok, (lost, result.problem)
    assert result.gaps == ((13, 14),)
    assert any("seq 13-14 absent" in w and "audit.recovery seq 16" in w for w in result.warnings)


async def test_gap_before_a_new_logs_first_record_needs_a_recovery(log: AuditLog) -> None:
    content = lines(log.path)
    start = record(content[0])
    # seq 1 (the real audit.start) deleted; seq 2 re-made into an audit.start of a new chain
    write_lines(log.path, relinked([rehashed({**start, "seq": 2}), *content[2:5]], 1))
    result = verify_files([log.path])
    assert_problem(result, Problem.DELETED, 1)
    assert "seq 1 missing" in result.problem


async def test_swapped_records(log: AuditLog) -> None:
    content = lines(log.path)
    content[2], content[3] = content[3], content[2]
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.REORDERED, 3)


async def test_moved_record(log: AuditLog) -> None:
    content = lines(log.path)
    content.insert(8, content.pop(2))
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.REORDERED, 3)


async def test_inserted_forged_record_with_recomputed_hash(log: AuditLog) -> None:
    content = lines(log.path)
    genuine = record(content[2])
    forged = rehashed({**genuine, "user": "mallory", "path": "/files/payroll",
                       "prev": record(content[1])["hash"]})
    content.insert(2, forged)  # a perfectly hashed seq 3 that links to seq 2
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.INSERTED, 3)
    assert result.line == 4  # found at the genuine seq 3, which chains around the forgery


async def test_duplicated_line(log: AuditLog) -> None:
    content = lines(log.path)
    content.insert(3, content[2])
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.INSERTED, 3)


async def test_forged_checkpoint_signature(log: AuditLog) -> None:
    content = lines(log.path)
    checkpoint = record(content[5])
    assert checkpoint["event"] == "audit.checkpoint"
    forger = Ed25519PrivateKey.generate()
    checkpoint["sig"] = sign_checkpoint(forger, node="gw-test", seq=checkpoint["covers_seq"],
                                        hash_hex=checkpoint["covers_hash"], ts=checkpoint["ts"],
                                        reason=checkpoint["reason"])
    content[5] = rehashed(checkpoint)  # keeps the real key_id: claims the real key signed it
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.BAD_SIGNATURE, 6)
    assert "invalid signature" in result.problem


async def test_checkpoint_by_unknown_key(log: AuditLog) -> None:
    content = lines(log.path)
    checkpoint = record(content[5])
    forger = Ed25519PrivateKey.generate()
    checkpoint["sig"] = sign_checkpoint(forger, node="gw-test", seq=checkpoint["covers_seq"],
                                        hash_hex=checkpoint["covers_hash"], ts=checkpoint["ts"],
                                        reason=checkpoint["reason"])
    checkpoint["key_id"] = key_id(forger.public_key())
    content[5] = rehashed(checkpoint)
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.BAD_SIGNATURE, 6)
    assert "not among" in result.problem


async def test_replayed_checkpoint_claims_a_hash_that_is_not_the_chains(log: AuditLog) -> None:
    content = lines(log.path)
    early, later = record(content[5]), record(content[11])
    for name in ("covers_seq", "covers_hash", "sig", "ts", "key_id"):
        early[name] = later[name]  # a genuinely signed checkpoint, copied to the wrong place
    content[5] = rehashed(early)
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.CHECKPOINT_MISMATCH, 6)


async def test_rewritten_history_is_caught_by_the_next_checkpoint(log: AuditLog) -> None:
    """A forger who edits seq 3 and re-links every later record still cannot re-sign."""
    content = lines(log.path)
    previous_hash = record(content[1])["hash"]
    for index in range(2, len(content)):
        fields = record(content[index])
        if index == 2:
            fields["user"] = "mallory"
        fields["prev"] = previous_hash
        content[index] = rehashed(fields)
        previous_hash = record(content[index])["hash"]
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.CHECKPOINT_MISMATCH, 6)

    # ... and updating what the checkpoint claims breaks its signature instead.
    fields = record(content[5])
    fields["covers_hash"] = fields["prev"]
    content[5] = rehashed(fields)
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.BAD_SIGNATURE, 6)


async def test_malformed_lines(log: AuditLog) -> None:
    original = lines(log.path)
    for garbage in (b"{not json", b"\xff\xfe binary", b"[1, 2]", b'{"seq": 4}', b""):
        content = list(original)
        content[3] = garbage
        write_lines(log.path, content)
        result = verify_files([log.path])
        assert_problem(result, Problem.MALFORMED, 4)
        assert result.line == 4


HOSTILE_LINES = [
    pytest.param(b'{"event":"auth.success","user":"\\ud800"}', id="lone-surrogate"),
    pytest.param(b"[" * 100_000, id="deep-array"),
    pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="deep-object"),
]


@pytest.mark.parametrize("hostile", HOSTILE_LINES)
async def test_hostile_lines_are_malformed_not_a_crash(log: AuditLog, hostile: bytes) -> None:
    content = lines(log.path)
    content[3] = hostile
    write_lines(log.path, content)
    result = verify_files([log.path])
    assert_problem(result, Problem.MALFORMED, 4)
    assert result.line == 4


async def test_surrogate_in_a_rehashed_record_is_malformed(log: AuditLog) -> None:
    """The forger's version: the JSON escape of a lone surrogate inside a real record."""
    content = lines(log.path)
    user = record(content[3])["user"]
    content[3] = content[3].replace(f'"{user}"'.encode(), b'"\\ud800"')
    assert b"\\ud800" in content[3]
    write_lines(log.path, content)
    assert_problem(verify_files([log.path]), Problem.MALFORMED, 4)


async def test_torn_final_line(log: AuditLog) -> None:
    data = log.path.read_bytes()
    log.path.write_bytes(data[: len(data) - 40])  # cut in the middle of the last record
    result = verify_files([log.path])
    assert_problem(result, Problem.MALFORMED, 16)
    assert "incomplete" in result.problem


async def test_second_chain_mixed_in(log: AuditLog, tmp_path: Path) -> None:
    other = await write_log(tmp_path / "other", events=2)
    keys = [p.with_name("audit.log.pub") for p in (log.path, other.path)]
    result = verify_files([log.path, other.path], keys)
    assert_problem(result, Problem.RESTARTED, 1)


# --------------------------------------------------------------------------- across rotated files


def log_files(directory: Path) -> list[Path]:
    """The live and rotated files of the log in ``directory`` (not keys or locks), by name."""
    return sorted(p for p in directory.iterdir() if p.name.startswith("audit.log")
                  and not p.name.endswith((".pub", ".lock")))


async def rotated_log(directory: Path) -> list[Path]:
    """A log over several files, each with count checkpoints inside; in chain order."""
    log = await write_log(directory, events=30, checkpoint_every=3, rotate_bytes=2500)
    rotated = [p for p in log_files(directory) if p != log.path]
    assert len(rotated) >= 3
    return [*rotated, log.path]


async def test_rotated_files_verify_in_any_order(tmp_path: Path) -> None:
    chain = await rotated_log(tmp_path)
    shuffled = [chain[2], chain[0], chain[-1], *chain[3:-1], chain[1]]
    result = verify_files(shuffled)
    assert result.ok, result.problem
    assert result.files == tuple(chain)


async def test_truncated_after_a_checkpoint_a_later_file_refers_past(tmp_path: Path) -> None:
    chain = await rotated_log(tmp_path)
    first = chain[0]
    content = lines(first)
    inner = [i for i, line in enumerate(content[:-1])
             if record(line)["event"] == "audit.checkpoint"]
    cut = inner[0]  # keep up to and including an inner (count) checkpoint
    write_lines(first, content[: cut + 1])
    result = verify_files(chain)
    assert_problem(result, Problem.TRUNCATED, record(content[cut])["seq"] + 1)
    assert result.file == chain[1]


async def test_missing_middle_file(tmp_path: Path) -> None:
    chain = await rotated_log(tmp_path)
    dropped = chain[1]
    result = verify_files([chain[0], *chain[2:]])
    assert_problem(result, Problem.MISSING_FILE, seq_at(dropped, 0))
    assert "whole rotated file" in result.problem


async def test_an_empty_file_is_malformed_unless_it_is_the_live_file(tmp_path: Path) -> None:
    chain = await rotated_log(tmp_path)
    live = tmp_path / "audit.log"
    assert live in chain
    live.write_bytes(b"")  # after a rotation, before the new file's first record
    result = verify_files(chain)
    assert result.ok, result.problem
    assert any("audit.log is empty" in w for w in result.warnings)
    for name in ("audit.log.bak", "audit.log.1"):
        empty = tmp_path / name
        empty.write_bytes(b"")
        result = verify_files([*chain, empty])
        assert (result.ok, result.kind, result.file) == (False, Problem.MALFORMED, empty)
        assert f"{name} is empty" in result.problem
        empty.unlink()
    alone = verify_files([live], public_key=tmp_path / "audit.log.pub")
    assert (alone.ok, alone.kind) == (False, Problem.MALFORMED)


async def test_only_recent_files_verify_with_a_warning(tmp_path: Path) -> None:
    chain = await rotated_log(tmp_path)
    result = verify_files(chain[2:])
    assert result.ok
    assert any(f"starts at seq {seq_at(chain[2], 0)}" in w for w in result.warnings)


# --------------------------------------------------------------------------- retention


class SteppedClock:
    """Moves only when told: retention needs weeks between a file's end and its removal."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 9, 0, tzinfo=JST)

    def __call__(self) -> datetime:
        return self.now


async def aged_log(directory: Path) -> tuple[AuditLog, list[Path]]:
    """A running log with rotated files (by size) that ended 30 days ago; in chain order."""
    clock = SteppedClock()
    log = AuditLog(directory / "audit.log", node="gw-test", signing_key_path=directory / "key",
                   fsync="interval", clock=clock, checkpoint_every=100, rotate_bytes=1500)
    await log.start()
    for n in range(20):
        log.emit("access.allow", user=f"user{n}", service="files", path=f"/files/{n}")
    rotated = [p for p in log_files(directory) if p != log.path]
    assert len(rotated) >= 3
    clock.now += timedelta(days=30)
    return log, rotated


def record_removal(log: AuditLog, path: Path, **override: Any) -> None:
    """Write the audit.retention record the retention task writes for ``path``, signed by
    its reason="retention" checkpoint."""
    content = [record(line) for line in lines(path)]
    header, last = content[0], content[-1]
    fields: dict[str, Any] = {
        "reason": "expired", "file": path.name, "last_seq": last["seq"],
        "first_seq": 1 if header["event"] == "audit.start" else header["prev_seq"] + 1,
        "last_hash": last["hash"], "last_ts": last["ts"], "records": len(content),
        "retention": "7d",
    }
    assert log.record_retention([{**fields, **override}]).signed


async def test_head_removed_by_retention_verifies_with_a_note(tmp_path: Path) -> None:
    log, rotated = await aged_log(tmp_path)
    for path in rotated[:2]:
        record_removal(log, path)
    await log.close()
    first_end, last_removed = (record(lines(p)[-1])["seq"] for p in rotated[:2])
    for path in rotated[:2]:
        path.unlink()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert result.ok, result.problem
    assert [(r.file, r.first_seq) for r in result.removed] == [
        (rotated[0].name, 1), (rotated[1].name, first_end + 1)]
    assert any(w.startswith(f"records 1-{last_removed:,} (2 files") for w in result.warnings)
    assert not any("earlier files were not given" in w for w in result.warnings)
    assert [r["file"] for r in result.to_json()["removed"]] == [p.name for p in rotated[:2]]


async def test_retention_records_must_cover_the_log_from_seq_1(tmp_path: Path) -> None:
    log, rotated = await aged_log(tmp_path)
    record_removal(log, rotated[1])  # but rotated[0] goes too, unrecorded
    await log.close()
    for path in rotated[:2]:
        path.unlink()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert_problem(result, Problem.MISSING_FILE, 1)
    assert "no audit.retention record accounts for seq 1 on" in result.problem
    lenient = verify_files(log_files(tmp_path))
    assert lenient.ok and lenient.removed == ()
    assert any("not removed by retention" in w for w in lenient.warnings)


async def test_retention_record_must_name_the_hash_the_next_file_chains_to(
    tmp_path: Path,
) -> None:
    log, rotated = await aged_log(tmp_path)
    record_removal(log, rotated[0], last_hash="a" * 64)
    await log.close()
    rotated[0].unlink()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert_problem(result, Problem.MISSING_FILE, 1)
    assert "names a last hash" in result.problem


@pytest.mark.parametrize("override", [
    {"last_ts": "2026-11-01T09:00:00"},  # no offset
    {"last_ts": "yesterday"},
    {"retention": "a year"},
    {"retention": "3d"},
    {"reason": "carried", "retention": "3d"},  # a carried range is held to the same rules
    {"reason": "housekeeping"},  # not a reason retention writes
])
async def test_a_retention_record_with_bad_values_explains_nothing(
    tmp_path: Path, override: dict[str, str],
) -> None:
    log, rotated = await aged_log(tmp_path)
    record_removal(log, rotated[0], **override)
    await log.close()
    rotated[0].unlink()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert_problem(result, Problem.MISSING_FILE, 1)
    assert "audit.retention" in result.problem  # it says why nothing accounts for the head
    assert result.retentions == ()


async def test_carried_coverage_may_overlap_and_counts_like_an_expired_record(
    tmp_path: Path,
) -> None:
    """Removing a file restates the coverage of the retention records inside it (carried):
    the ranges of the records given then overlap, and together they still cover seq 1 on."""
    log, rotated = await aged_log(tmp_path)
    record_removal(log, rotated[0])
    first_end = record(lines(rotated[0])[-1])["seq"]
    last = record(lines(rotated[1])[-1])
    record_removal(log, rotated[1], reason="carried", first_seq=1,
                   file=f"{rotated[0].name} … {rotated[1].name}")
    await log.close()
    for path in rotated[:2]:
        path.unlink()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert result.ok, result.problem
    assert [(r.reason, r.first_seq, r.last_seq) for r in result.removed] == [
        ("carried", 1, last["seq"])]
    assert [(r.first_seq, r.last_seq) for r in result.retentions] == [
        (1, first_end), (1, last["seq"])]
    assert any("earlier removals carried forward" in w for w in result.warnings)


async def test_a_retention_range_reaching_into_the_files_given_explains_nothing(
    tmp_path: Path,
) -> None:
    """A signed record claiming seq 1..N removed while the first file given continues from a
    seq before N claims coverage it cannot have."""
    log, rotated = await aged_log(tmp_path)
    beyond = record(lines(rotated[1])[-1])
    record_removal(log, rotated[0], last_seq=beyond["seq"], last_hash=beyond["hash"])
    await log.close()
    rotated[0].unlink()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert_problem(result, Problem.MISSING_FILE, 1)
    assert f"{rotated[1].name} continues from seq" in result.problem


async def test_retention_record_of_a_file_still_present_is_no_problem(tmp_path: Path) -> None:
    """The record is written before the removal; a removal that then failed leaves both."""
    log, rotated = await aged_log(tmp_path)
    record_removal(log, rotated[0])
    await log.close()
    result = verify_files(log_files(tmp_path), require_complete=True)
    assert result.ok and result.removed == ()


async def test_require_complete_passes_an_intact_log_and_fails_a_missing_head(
    tmp_path: Path,
) -> None:
    chain = await rotated_log(tmp_path)
    assert verify_files(chain, require_complete=True).ok
    result = verify_files(chain[1:], require_complete=True)
    assert_problem(result, Problem.MISSING_FILE, 1)
    assert (result.file, result.line) == (chain[1], 1)


# --------------------------------------------------------------------------- live tail


async def test_live_log_without_final_checkpoint_warns_or_fails_when_sealed(
    log: AuditLog,
) -> None:
    write_lines(log.path, lines(log.path)[:-1])  # a running gateway has not closed yet
    result = verify_files([log.path])
    assert result.ok
    assert result.unsigned_tail == 3
    assert any("after the last checkpoint" in w for w in result.warnings)
    assert_problem(verify_files([log.path], require_sealed=True), Problem.UNSEALED, 13)


# --------------------------------------------------------------------------- properties

user_text = st.text(st.characters(exclude_categories=()), max_size=24)
events = st.lists(
    st.tuples(st.sampled_from(CALLER_EVENTS), user_text, user_text, st.integers(0, 10**15)),
    min_size=1, max_size=10,
)


def write_events(
    directory: Path, items: list[tuple[str, str, str, int]], **options: Any
) -> list[Path]:
    async def scenario() -> None:
        log = new_log(directory, **options)
        await log.start()
        for event, user, path, count in items:
            log.emit(event, user=user, path=path, bytes_up=count, reason=user)
        await log.close()

    asyncio.run(scenario())
    return log_files(directory)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=events, every=st.integers(1, 4),
       rotate=st.one_of(st.none(), st.integers(300, 3000)))
def test_any_sequence_of_events_verifies(
    items: list[tuple[str, str, str, int]], every: int, rotate: int | None
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        paths = write_events(Path(directory), items, checkpoint_every=every, rotate_bytes=rotate)
        result = verify_files(paths)
        assert result.ok, result.problem
        assert result.records >= len(items)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=events, data=st.data())
def test_any_single_byte_change_is_detected(
    items: list[tuple[str, str, str, int]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        (path,) = write_events(Path(directory), items, checkpoint_every=3)
        raw = bytearray(path.read_bytes())
        index = data.draw(st.integers(0, len(raw) - 1), label="index")
        value = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="byte")
        raw[index] = value
        path.write_bytes(bytes(raw))
        result = verify_files([path])
        assert not result.ok
        assert result.kind in {Problem.EDITED, Problem.MALFORMED}
