"""Tests for gatewayd.audit.query: filters, streaming, table and JSON output."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import AuditLog, query_files
from gatewayd.audit.query import (
    RESULTS,
    RecordFilter,
    json_line,
    query_records,
    record_result,
    table_header,
    table_row,
)

JST = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 27, 9, 0, tzinfo=JST)


class MinuteClock:
    """Each emit is one minute after the previous: seq 1 is audit.start at 08:59, seq n+2 is
    the n-th emit at 09:0n."""

    def __init__(self) -> None:
        self.now = T0 - timedelta(minutes=1)

    def __call__(self) -> datetime:
        return self.now

    def tick(self) -> None:
        self.now += timedelta(minutes=1)


@pytest.fixture
async def log_path(tmp_path: Path) -> Path:
    clock = MinuteClock()
    log = AuditLog(tmp_path / "audit.log", node="gw1", signing_key_path=tmp_path / "key",
                   clock=clock, fsync="interval")
    await log.start()
    emits: list[tuple[str, dict[str, Any]]] = [
        ("auth.success", {"user": "alice", "source_ip": "192.0.2.10", "frontend": "https"}),
        ("access.allow", {"user": "alice", "source_ip": "192.0.2.10", "service": "approval",
                          "method": "GET", "path": "/approval/list", "rule": "staff-approval",
                          "status": 200}),
        ("access.deny", {"user": "bob", "source_ip": "192.0.2.11", "service": "files",
                         "method": "POST", "path": "/files/hr/salary.xlsx", "rule": "hr-only",
                         "reason": "group hr required"}),
        ("auth.failure", {"user": "eve\x1b[31m", "source_ip": "203.0.113.9",
                          "reason": "invalid credentials"}),
        ("tunnel.open", {"user": "alice", "service": "smb", "dest": "10.0.0.5:445"}),
        ("auth.failure", {"user": "TOKYO\\carol", "source_ip": "192.0.2.12"}),
    ]
    for event, fields in emits:
        clock.tick()
        log.emit(event, **fields)
    await log.close()
    return log.path


def events_of(records: Iterator[dict[str, Any]]) -> list[str]:
    return [r["event"] for r in records]


async def test_query_is_lazy(log_path: Path) -> None:
    results = query_files([log_path])
    assert iter(results) is results  # a generator: records are read as they are consumed
    assert next(results)["seq"] == 1


async def test_filters(log_path: Path) -> None:
    assert events_of(query_files([log_path], user="alice")) == [
        "auth.success", "access.allow", "tunnel.open"]
    assert events_of(query_files([log_path], event="auth.failure")) == [
        "auth.failure", "auth.failure"]
    assert events_of(query_files([log_path], event="access.*")) == ["access.allow", "access.deny"]
    assert events_of(query_files([log_path], service="files")) == ["access.deny"]
    assert events_of(query_files([log_path], user="alice", service="smb")) == ["tunnel.open"]
    assert list(query_files([log_path], user="nobody")) == []
    assert list(query_files([log_path], event="access")) == []  # exact unless a pattern


async def test_user_filter_matches_names_as_typed(log_path: Path) -> None:
    assert [r["seq"] for r in query_files([log_path], user="eve\x1b[31m")] == [5]
    assert [r["seq"] for r in query_files([log_path], user="TOKYO\\carol")] == [7]


async def test_time_window_since_inclusive_until_exclusive(log_path: Path) -> None:
    since, until = T0 + timedelta(minutes=1), T0 + timedelta(minutes=3)
    got = [r["seq"] for r in query_files([log_path], since=since, until=until)]
    assert got == [3, 4]
    # the same instant written in another offset means the same thing
    got_utc = [r["seq"] for r in query_files([log_path], since=since.astimezone(UTC))]
    assert got_utc[0] == 3


def test_naive_times_are_refused(tmp_path: Path) -> None:
    (tmp_path / "audit.log").write_text("")
    with pytest.raises(ValueError, match="timezone-aware"):
        list(query_files([tmp_path / "audit.log"], since=datetime(2026, 1, 1)))  # naive


async def test_malformed_lines_are_reported_and_skipped(log_path: Path) -> None:
    with log_path.open("ab") as stream:
        stream.write(b"garbage\n{\"half\":")
    seen: list[tuple[str, int]] = []
    records = list(query_files([log_path], on_malformed=lambda p, n: seen.append((p.name, n))))
    assert len(records) == 8
    assert seen == [("audit.log", 9), ("audit.log", 10)]


async def test_hostile_lines_are_reported_and_skipped(log_path: Path) -> None:
    with log_path.open("ab") as stream:
        stream.write(b"[" * 100_000 + b"\n")  # exhausts a recursive JSON parser
        stream.write(b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"\n")
        stream.write(b'{"seq":99,"user":[[["nested"]]]}\n')
    seen: list[int] = []
    records = list(query_files([log_path], user="alice",
                               on_malformed=lambda p, n: seen.append(n)))
    assert [r["seq"] for r in records] == [2, 3, 6]
    assert seen == [9, 10, 11]


def test_lone_surrogates_are_escaped_in_table_and_json() -> None:
    hostile = json.loads('{"ts":"2026-11-27T09:00:00+09:00","seq":1,"event":"auth.failure",'
                         '"user":"eve\\ud800","\\udfff":"x"}')
    for text in (table_row(hostile), json_line(hostile)):
        text.encode("utf-8")  # printable on any UTF-8 terminal: no UnicodeEncodeError
    assert json.loads(json_line(hostile)) == hostile


async def test_table_rows_are_aligned_and_readable(log_path: Path) -> None:
    header = table_header()
    rows = [table_row(r) for r in query_files([log_path])][1:]  # after audit.start
    assert header.split() == ["TIME", "SEQ", "EVENT", "USER", "SOURCE", "SERVICE", "TARGET",
                              "DETAIL"]
    allow = rows[1]
    assert allow.startswith("2026-11-27 09:01:00+09:00")
    for title in ("EVENT", "USER", "SOURCE", "SERVICE", "TARGET", "DETAIL"):
        column = header.index(title)
        assert allow[column - 1] == " " and allow[column] != " ", title
    assert "access.allow" in allow and "GET /approval/list" in allow
    assert 'rule=staff-approval status=200' in allow
    assert 'reason="group hr required"' in rows[2]
    assert "10.0.0.5:445" in rows[4]
    assert "covers_seq=7" in rows[6] and "reason=close" in rows[6]


def test_table_and_json_never_pass_raw_controls_to_the_terminal() -> None:
    # A foreign or tampered file may hold raw controls once JSON-decoded.
    hostile = {"ts": "2026-11-27T09:00:00+09:00", "seq": 1, "event": "auth.failure",
               "user": "eve\x1b]0;pwned\x07", "reason": "a\u202eb", "path": "\x9b2J"}
    for text in (table_row(hostile), json_line(hostile)):
        for raw in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert raw not in text
    assert json.loads(json_line(hostile)) == hostile  # still the same JSON value
    assert json.loads(json_line({"tag": "\U000e0041"})) == {"tag": "\U000e0041"}


# ---------------------------------------------------------------------- newer filters

R = dict[str, Any]


def rec(event: str, **fields: Any) -> R:
    return {"ts": "2026-11-27T09:00:00+09:00", "seq": 1, "event": event, "node": "gw1",
            **fields}


@pytest.mark.parametrize(("record", "result"), [
    (rec("auth.success", user="alice"), "success"),
    (rec("auth.failure", user="alice"), "failure"),
    (rec("auth.locked", user="alice"), "failure"),
    (rec("access.allow", status=200), "success"),
    (rec("access.deny", status=403), "failure"),
    (rec("access.deny"), "failure"),
    (rec("access.step_up", status=401), None),  # a challenge, not an outcome
    (rec("access.end", status=200), "success"),
    (rec("access.end", status=404), "failure"),
    (rec("access.end", status=502, error="upstream_timeout"), "failure"),
    (rec("access.end", status=200, error="client_disconnected"), "failure"),
    (rec("tunnel.open"), "success"),
    (rec("tunnel.deny", status="rate_limited"), "failure"),
    (rec("tunnel.close", reason="client"), "success"),
    (rec("tunnel.close", error="channel_not_opened"), "failure"),
    (rec("config.reload", status="success"), "success"),
    (rec("config.reload", status="failure", reason="bad toml"), "failure"),
    (rec("admin.session_kill", status="no_match"), "failure"),
    (rec("admin.session_kill", session="s1"), "success"),
    (rec("user.disable", status="success"), "success"),
    (rec("mfa.enroll", status="success"), "success"),
    (rec("audit.checkpoint"), None),
    (rec("audit.start"), None),
    (rec("audit.recovery", lost_from=3, lost_to=4), None),
])
def test_result_vocabulary(record: R, result: str | None) -> None:
    assert record_result(record) == result
    for wanted in RESULTS:
        assert RecordFilter(result=wanted).matches(record) is (wanted == result)


HOSTILE = rec("access.allow", user="TOKYO\\Alice", device="dev-7", session="s-42",
              source_ip="192.0.2.10", service="approval", path="/承認/一覧", status=200,
              reason="raw\x1bcontrol")


@pytest.mark.parametrize(("flt", "matches"), [
    (RecordFilter(device="dev-7"), True),
    (RecordFilter(device="dev-"), False),  # exact, not a prefix
    (RecordFilter(session="s-42"), True),
    (RecordFilter(session="S-42"), False),
    (RecordFilter(source_ip="192.0.2.10"), True),
    (RecordFilter(source_ip="192.0.2.1"), False),
    (RecordFilter(text="alice"), True),  # case-insensitive
    (RecordFilter(text="承認"), True),
    (RecordFilter(text="200"), True),  # integers as displayed
    (RecordFilter(text="\\x1bcontrol"), True),  # controls as displayed
    (RecordFilter(text="access.allow"), True),
    (RecordFilter(text="source_ip"), False),  # keys are not searched
    (RecordFilter(text=""), True),  # an empty text filters nothing
    (RecordFilter(user="TOKYO\\Alice", device="dev-7", result="success", text="一覧"), True),
    (RecordFilter(user="TOKYO\\Alice", device="dev-8"), False),
])
def test_exact_and_text_filters(flt: RecordFilter, matches: bool) -> None:
    assert flt.matches(HOSTILE) is matches


def test_unknown_result_is_refused() -> None:
    with pytest.raises(ValueError, match="result must be one of success, failure"):
        RecordFilter(result="ok")


async def test_new_filters_through_query_files(log_path: Path) -> None:
    assert [r["seq"] for r in query_files([log_path], result="failure")] == [4, 5, 7]
    assert events_of(query_files([log_path], source_ip="192.0.2.10")) == [
        "auth.success", "access.allow"]
    assert events_of(query_files([log_path], text="SALARY")) == ["access.deny"]
    assert events_of(query_files([log_path], result="success", user="alice")) == [
        "auth.success", "access.allow", "tunnel.open"]
    wanted = RecordFilter(result="failure", source_ip="203.0.113.9")
    assert [r["seq"] for r in query_records([log_path], wanted)] == [5]
