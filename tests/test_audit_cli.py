"""Tests for gatewayd.audit.cli: ``audit verify`` and ``audit query`` through argparse."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import AuditLog
from gatewayd.audit.cli import parse_time, register

JST = ZoneInfo("Asia/Tokyo")


def run(argv: list[str]) -> int:
    """Parse like the root CLI does (``register(sub)``), then call ``args.func(args)``."""
    parser = argparse.ArgumentParser(prog="gatewayd")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse reports usage errors by exiting with 2
        return int(exc.code or 0)
    code: int = args.func(args)
    return code


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 9, 0, tzinfo=JST)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


async def write_log(directory: Path, *, rotate_bytes: int | None = None) -> AuditLog:
    log = AuditLog(directory / "audit.log", node="gw1", signing_key_path=directory / "key",
                   clock=Clock(), fsync="interval", checkpoint_every=4, rotate_bytes=rotate_bytes)
    await log.start()
    for n in range(10):
        user = "alice" if n % 2 else "bob"
        log.emit("access.allow", user=user, source_ip="192.0.2.10", service="files",
                 method="GET", path=f"/files/{n}", rule="staff-files", status=200)
    await log.close()
    return log


@pytest.fixture
async def log(tmp_path: Path) -> AuditLog:
    return await write_log(tmp_path)


def shell_glob(directory: Path, pattern: str) -> list[str]:
    return sorted(str(p) for p in directory.glob(pattern))


def out_err(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


async def test_verify_ok(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "verify", str(log.path)]) == 0
    out, _ = out_err(capsys)
    assert out.startswith("OK: 1 file(s), 14 records (seq 1-14), 3 checkpoint(s)")
    assert "last good checkpoint: seq 14" in out and log.key_id in out


async def test_verify_tampered_reports_first_bad_seq(
    log: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = log.path.read_bytes().split(b"\n")
    del lines[2]
    log.path.write_bytes(b"\n".join(lines))
    assert run(["audit", "verify", str(log.path)]) == 1
    out, _ = out_err(capsys)
    assert out.startswith("TAMPERED: first bad seq 3: deleted")
    assert "audit.log:3:" in out


@pytest.mark.parametrize(
    "hostile", [b'{"user":"\\ud800"}', b"[" * 100_000], ids=["lone-surrogate", "deep-array"]
)
async def test_hostile_lines_give_a_verdict_not_a_traceback(
    log: AuditLog, hostile: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = log.path.read_bytes().split(b"\n")
    lines[2] = hostile
    log.path.write_bytes(b"\n".join(lines))
    assert run(["audit", "verify", str(log.path)]) == 1
    assert out_err(capsys)[0].startswith("TAMPERED: first bad seq 3: malformed")
    assert run(["audit", "query", "--json", str(log.path)]) == 0
    out, err = out_err(capsys)
    out.encode("utf-8")  # what was printed is valid UTF-8 (the surrogate is escaped)
    if hostile.startswith(b"["):  # not an object: skipped with a warning
        assert "audit.log:3: not a valid record" in err
        assert len(out.splitlines()) == 13
    else:  # query does not judge integrity: a flat object is shown, escaped
        assert len(out.splitlines()) == 14 and "\\ud800" in out


async def test_query_prints_lone_surrogates_escaped(
    log: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    with log.path.open("ab") as stream:
        stream.write(b'{"seq":99,"event":"auth.failure","user":"eve\\ud800"}\n')
    for extra in ([], ["--json"]):
        assert run(["audit", "query", "--event", "auth.failure", *extra, str(log.path)]) == 0
        out, _ = out_err(capsys)
        assert "eve\\ud800" in out
        out.encode("utf-8")


async def test_hostile_file_names_are_printed_escaped(
    log: AuditLog, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name is attacker-chosen too: not UTF-8, or carrying terminal controls."""
    for raw in (b"audit.log.\xff", b"audit.log.\x1b[2J"):
        hostile = tmp_path / os.fsdecode(raw)
        shutil.copy(log.path, hostile)
        assert run(["audit", "verify", "--key", str(tmp_path / "audit.log.pub"),
                    str(hostile)]) == 0
        out, _ = out_err(capsys)
        out.encode("utf-8")
        assert "\x1b" not in out
        hostile.unlink()
        assert run(["audit", "query", str(hostile)]) == 2
        _, err = out_err(capsys)
        err.encode("utf-8")
        assert "\x1b" not in err


@pytest.mark.parametrize("sealed", [[], ["--sealed"]])
async def test_verify_fails_a_log_whose_first_records_were_deleted(
    log: AuditLog, sealed: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = log.path.read_bytes().split(b"\n")
    log.path.write_bytes(b"\n".join(lines[4:]))  # lines 1-4, audit.start among them
    assert run(["audit", "verify", *sealed, str(log.path)]) == 1
    out, _ = out_err(capsys)
    assert out.startswith("TAMPERED: first bad seq 5: deleted")
    assert "audit.log:1:" in out


async def test_verify_json(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "verify", "--json", str(log.path)]) == 0
    result = json.loads(out_err(capsys)[0])
    assert result["ok"] is True and result["records"] == 14
    assert result["last_checkpoint"]["reason"] == "close"


async def test_verify_skips_key_files_from_a_glob(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_log(tmp_path, rotate_bytes=1500)
    everything = shell_glob(tmp_path, "audit.log*")
    assert any(name.endswith(".pub") for name in everything)
    assert run(["audit", "verify", *everything]) == 0
    out, err = out_err(capsys)
    assert "skipping" in err and "audit.log.pub" in err
    assert out.startswith("OK: ")


async def test_verify_sealed_fails_on_unsigned_tail(
    log: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = log.path.read_bytes().split(b"\n")[:-2]  # drop the close checkpoint
    log.path.write_bytes(b"\n".join(lines) + b"\n")
    assert run(["audit", "verify", str(log.path)]) == 0
    assert "warning:" in out_err(capsys)[0]
    assert run(["audit", "verify", "--sealed", str(log.path)]) == 1
    assert "unsealed" in out_err(capsys)[0]


async def test_verify_of_the_whole_log_requires_its_beginning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The live file and all its rotated files given (a glob): checked as the whole log, so
    rotated files deleted from the front without an audit.retention record fail (exit 1)."""
    await write_log(tmp_path, rotate_bytes=1500)
    everything = shell_glob(tmp_path, "audit.log*")
    assert run(["audit", "verify", *everything]) == 0
    assert "checked as: the whole log (all its rotated files were given)" in out_err(capsys)[0]
    rotated = sorted(tmp_path.glob("audit.log.2*"))
    assert len(rotated) >= 3
    for path in rotated[:2]:
        path.unlink()
    remaining = shell_glob(tmp_path, "audit.log*")
    assert run(["audit", "verify", *remaining]) == 1
    out = out_err(capsys)[0]
    assert out.startswith("TAMPERED: first bad seq 1: missing_file")
    assert "no audit.retention record accounts for seq 1 on" in out
    assert run(["audit", "verify", "--json", *remaining]) == 1
    verdict = json.loads(out_err(capsys)[0])
    assert (verdict["kind"], verdict["complete"]) == ("missing_file", True)
    # Asked for a subset: only a warning, and the output says so.
    assert run(["audit", "verify", "--partial", *remaining]) == 0
    out = out_err(capsys)[0]
    assert out.startswith("OK: ") and "checked as: a subset" in out
    assert "earlier files were not given" in out


async def test_verify_of_the_whole_log_when_the_live_file_does_not_exist_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a rotation the live file is created only with its next record: a glob then
    gives the rotated files alone, which are still the whole log."""
    await write_log(tmp_path, rotate_bytes=1500)
    rotated = sorted(tmp_path.glob("audit.log.2*"))
    assert len(rotated) >= 3
    (tmp_path / "audit.log").rename(tmp_path / "audit.log.20991231T000000.000000")
    assert run(["audit", "verify", *shell_glob(tmp_path, "audit.log*")]) == 0
    assert "checked as: the whole log" in out_err(capsys)[0]
    for path in rotated[:2]:
        path.unlink()
    assert run(["audit", "verify", *shell_glob(tmp_path, "audit.log*")]) == 1
    out = out_err(capsys)[0]
    assert out.startswith("TAMPERED: first bad seq 1: missing_file")
    assert "checked as: the whole log" in out


@pytest.mark.parametrize("extra", ["audit.log.bak", "audit.log.1"])
@pytest.mark.parametrize("content", ["empty", "copy"])
async def test_an_extra_file_does_not_make_the_log_a_subset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, content: str,
) -> None:
    """Anyone able to write the directory can add a file a glob picks up; it is named in a
    warning, and the log with its head deleted still fails as the whole log."""
    await write_log(tmp_path, rotate_bytes=1500)
    rotated = sorted(tmp_path.glob("audit.log.2*"))
    for path in rotated[:2]:
        path.unlink()
    if content == "empty":
        (tmp_path / extra).write_bytes(b"")
    else:
        shutil.copy(rotated[2], tmp_path / extra)
    assert run(["audit", "verify", *shell_glob(tmp_path, "audit.log*")]) == 1
    out, err = out_err(capsys)
    assert out.startswith("TAMPERED: ") and "checked as: the whole log" in out
    assert f"{extra} is neither the live file nor a rotated file of the log" in err


async def test_an_empty_extra_file_fails_an_intact_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_log(tmp_path, rotate_bytes=1500)
    (tmp_path / "audit.log.bak").write_bytes(b"")
    assert run(["audit", "verify", *shell_glob(tmp_path, "audit.log*")]) == 1
    out = out_err(capsys)[0]
    assert out.startswith("TAMPERED: first bad seq None: malformed")
    assert "audit.log.bak is empty" in out


async def test_verify_of_a_subset_warns_unless_complete_is_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_log(tmp_path, rotate_bytes=1500)
    rotated = sorted(tmp_path.glob("audit.log.2*"))
    subset = [str(p) for p in rotated[1:]]  # the live file not given: a subset by default
    assert run(["audit", "verify", *subset]) == 0
    assert "checked as: a subset" in out_err(capsys)[0]
    assert run(["audit", "verify", "--complete", *subset]) == 1
    out = out_err(capsys)[0]
    assert "missing_file" in out and "checked as: the whole log (--complete)" in out
    assert run(["audit", "verify", "--complete", "--partial", *subset]) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "verify", "{missing}"],
        ["audit", "verify", "{log}", "--key", "{missing}"],
        ["audit", "verify", "{log}", "--key", "{garbage}"],
        ["audit", "verify", "{dir}"],
        ["audit", "verify"],
        ["audit"],
        ["audit", "query", "{missing}"],
        ["audit", "query", "{log}", "--since", "yesterday"],
    ],
)
async def test_usage_errors_exit_2(
    log: AuditLog, tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    names = {"missing": str(tmp_path / "nope.log"), "log": str(log.path),
             "garbage": str(garbage), "dir": str(tmp_path)}
    assert run([part.format(**names) for part in argv]) == 2
    assert out_err(capsys)[1]  # an explanation on stderr


async def test_verify_without_any_public_key_is_a_usage_error(
    log: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    log.path.with_name("audit.log.pub").unlink()
    assert run(["audit", "verify", str(log.path)]) == 2
    assert "--key" in out_err(capsys)[1]


async def test_query_table(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "query", "--user", "alice", str(log.path)]) == 0
    out, _ = out_err(capsys)
    rows = out.splitlines()
    assert rows[0].split()[:3] == ["TIME", "SEQ", "EVENT"]
    assert len(rows) == 1 + 5
    assert all(" alice " in row for row in rows[1:])
    assert "GET /files/1" in rows[1]


async def test_query_json_and_filters(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    # The clock ticks a minute per reading: audit.start (seq 1) at 09:01, seq 2 at 09:02, …
    argv = ["audit", "query", "--json", "--event", "access.*", "--service", "files",
            "--since", "2026-11-27T09:03:00+09:00", "--until", "2026-11-27T00:05:00+00:00",
            str(log.path)]
    assert run(argv) == 0
    records: list[dict[str, Any]] = [json.loads(line) for line in out_err(capsys)[0].splitlines()]
    assert [(r["seq"], r["ts"][11:16]) for r in records] == [(3, "09:03"), (4, "09:04")]
    assert all(r["event"] == "access.allow" for r in records)


@pytest.fixture
def server_in_new_york() -> Iterator[None]:
    """The host's local zone is not the log's (a server set to another zone than the office)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.usefixtures("server_in_new_york")
def test_times_without_offset_are_in_the_log_zone_not_local_time() -> None:
    assert parse_time("2026-11-27T09:06:00") == datetime(2026, 11, 27, 9, 6, tzinfo=JST)
    assert parse_time("2026-11-27") == datetime(2026, 11, 27, tzinfo=JST)
    assert parse_time("2026-11-27T09:06:00", UTC) == datetime(2026, 11, 27, 9, 6, tzinfo=UTC)
    assert parse_time("2026-11-27T09:06:00+09:00", UTC).utcoffset() == timedelta(hours=9)


@pytest.mark.usefixtures("server_in_new_york")
@pytest.mark.parametrize(
    "window",
    [
        ["--since", "2026-11-27T09:03", "--until", "2026-11-27T09:05"],  # Asia/Tokyo by default
        ["--tz", "Asia/Tokyo", "--since", "2026-11-27T09:03", "--until", "2026-11-27T09:05"],
        ["--tz", "UTC", "--since", "2026-11-27T00:03", "--until", "2026-11-27T00:05"],
        ["--since", "2026-11-27T00:03", "--until", "2026-11-27T00:05", "--tz", "Etc/UTC"],
        ["--tz", "UTC", "--since", "2026-11-27T09:03+09:00", "--until", "2026-11-27T00:05Z"],
    ],
)
async def test_query_window_without_offset_uses_tz(
    log: AuditLog, window: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # seq 3 and 4 are at 09:03 and 09:04 Tokyo (seq 5, a checkpoint, shares 09:04)
    assert run(["audit", "query", "--json", "--event", "access.*", *window,
                str(log.path)]) == 0
    records = [json.loads(line) for line in out_err(capsys)[0].splitlines()]
    assert [r["seq"] for r in records] == [3, 4]


async def test_unknown_tz_is_a_usage_error(
    log: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    for zone in ("Mars/Olympus", "../../etc/passwd", ""):
        assert run(["audit", "query", "--tz", zone, str(log.path)]) == 2
        assert "time zone" in out_err(capsys)[1]


def test_query_help_documents_the_zone_of_times_without_offset(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["audit", "query", "--help"]) == 0
    text = " ".join(out_err(capsys)[0].split())
    assert "--tz ZONE" in text
    assert "default: Asia/Tokyo" in text and "audit.timezone" in text
    assert "without an offset" in text


async def test_query_without_matches_exits_1(
    log: AuditLog, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["audit", "query", "--user", "nobody", str(log.path)]) == 1
    assert out_err(capsys)[0] == ""


# ---------------------------------------------------------------------- new filters, export


async def test_query_new_filters(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "query", "--json", "--result", "success", "--text", "FILES/3",
                "--source-ip", "192.0.2.10", str(log.path)]) == 0
    out, _ = out_err(capsys)
    assert [json.loads(line)["path"] for line in out.splitlines()] == ["/files/3"]
    assert run(["audit", "query", "--result", "failure", str(log.path)]) == 1
    assert run(["audit", "query", "--device", "nope", str(log.path)]) == 1
    assert run(["audit", "query", "--session", "nope", str(log.path)]) == 1
    assert run(["audit", "query", "--result", "maybe", str(log.path)]) == 2
    assert "invalid choice: 'maybe'" in out_err(capsys)[1]


def export_run(
    argv: list[str], capsysbinary: pytest.CaptureFixture[bytes]
) -> tuple[int, bytes, str]:
    code = run(["audit", "export", *argv])
    captured = capsysbinary.readouterr()
    return code, captured.out, captured.err.decode()


async def test_export_csv_to_stdout(
    log: AuditLog, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, out, _ = export_run(["--format", "csv", "--user", "alice", str(log.path)],
                              capsysbinary)
    assert code == 0
    assert out.startswith(b"\xef\xbb\xbfts,seq,node,event,user,device,")
    rows = out.decode("utf-8-sig").split("\r\n")
    assert rows[-1] == ""
    assert len(rows) - 2 == 5  # header + five alice records
    assert all(",alice," in row for row in rows[1:-1])
    code, out, _ = export_run(["--format", "csv", "--no-bom", "--event", "audit.start",
                               str(log.path)], capsysbinary)
    assert code == 0 and out.startswith(b"ts,seq,")


async def test_export_jsonl_to_a_file(
    log: AuditLog, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    target = tmp_path / "out" / "export.jsonl"
    target.parent.mkdir()
    code, out, _ = export_run(["--format", "jsonl", "--out", str(target), "--since",
                               "2026-11-27T09:03", "--until", "2026-11-27T09:06",
                               str(log.path)], capsysbinary)
    assert code == 0 and out == b""
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert {r["ts"][11:16] for r in records} == {"09:03", "09:04", "09:05"}
    assert [r["event"] for r in records].count("access.allow") == 3
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["export.jsonl"]  # no tmp left


async def test_export_nothing_matched(
    log: AuditLog, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    target = tmp_path / "none.csv"
    code, _, _ = export_run(["--format", "csv", "--out", str(target), "--user", "nobody",
                             str(log.path)], capsysbinary)
    assert code == 1
    assert target.read_bytes().decode("utf-8-sig").startswith("ts,seq,")
    assert target.read_bytes().count(b"\r\n") == 1  # the header only


@pytest.mark.parametrize(("extra", "message"), [
    (["--format", "xml"], "invalid choice: 'xml'"),
    ([], "the following arguments are required: --format"),
    (["--format", "csv", "--since", "yesterday"], "not an ISO 8601 time"),
    (["--format", "csv", "--tz", "Mars/Olympus"], "unknown time zone"),
    (["--format", "csv", "--out", "/nonexistent-dir/x.csv"], "no such directory"),
])
async def test_export_usage_errors(
    log: AuditLog, extra: list[str], message: str,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    code, _, err = export_run([*extra, str(log.path)], capsysbinary)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


async def test_export_never_overwrites_an_input_file(
    log: AuditLog, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    before = log.path.read_bytes()
    code, _, err = export_run(["--format", "csv", "--out", str(log.path), str(log.path)],
                              capsysbinary)
    assert code == 2 and "is one of the input files" in err
    assert log.path.read_bytes() == before


async def test_export_missing_file_is_a_usage_error(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code, _, err = export_run(["--format", "jsonl", str(tmp_path / "missing.log")],
                              capsysbinary)
    assert code == 2 and "no such readable file" in err


async def test_export_spans_rotated_files_in_chain_order(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    log = await write_log(tmp_path, rotate_bytes=1500)
    paths = sorted(str(p) for p in tmp_path.glob("audit.log*")
                   if not p.name.endswith((".pub", ".lock")) and ".pub." not in p.name)
    assert len(paths) >= 3
    code, out, _ = export_run(["--format", "jsonl", *reversed(paths)], capsysbinary)
    assert code == 0
    seqs = [json.loads(line)["seq"] for line in out.decode().splitlines()]
    assert seqs == list(range(1, len(seqs) + 1))
    assert log.path.name == "audit.log"
