"""Tests for gatewayd.audit.export: streamed CSV and JSON Lines exports of audit records."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gatewayd.audit import AuditLog, export
from gatewayd.audit.export import CHUNK_CHARS, CSV_COLUMNS, iter_csv, iter_jsonl, safe_cell
from gatewayd.audit.query import RecordFilter, query_records

JST = ZoneInfo("Asia/Tokyo")
INT_COLUMNS = {"seq", "status", "bytes_up", "bytes_down", "duration_ms"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 9, 0, tzinfo=JST)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
async def records(tmp_path: Path) -> list[dict[str, Any]]:
    log = AuditLog(tmp_path / "audit.log", node="gw1", signing_key_path=tmp_path / "key",
                   clock=Clock(), fsync="interval")
    await log.start()
    log.emit("auth.success", user="田中太郎", source_ip="192.0.2.10", frontend="https",
             device="dev-1", session="s1")
    log.emit("access.allow", user="=HYPERLINK(\"http://evil\")", source_ip="192.0.2.10",
             service="files", method="GET", path="/files/a,b \"c\".txt", rule="r1", status=200)
    log.emit("access.deny", user="+1", service="files", path="-2", reason="@SUM(A1)",
             rule="r2", status=403)
    log.emit("auth.failure", user="\tbob", reason="line1\nline2\rend")
    log.emit("admin.session_kill", operator="root", user="alice", frontend="admin",
             session="s9", reason="left the office")
    log.emit("access.end", user="alice", service="files", status=502, bytes_up=1,
             bytes_down=2, duration_ms=3, error="upstream_timeout")
    await log.close()
    return list(query_records([log.path], RecordFilter()))


def read_csv(text: str) -> list[dict[str, str]]:
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text[1:], newline="")))
    assert rows[0] == list(CSV_COLUMNS)
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def test_column_order_is_the_documented_one() -> None:
    assert CSV_COLUMNS == (
        "ts", "seq", "node", "event", "user", "device", "source_ip", "session", "frontend",
        "service", "method", "path", "dest", "rule", "reason", "status", "bytes_up",
        "bytes_down", "duration_ms", "other", "prev", "hash",
    )
    assert ", ".join(CSV_COLUMNS) in " ".join((export.__doc__ or "").split())


def test_csv_round_trips_every_field(records: list[dict[str, Any]]) -> None:
    text = "".join(iter_csv(records))
    rows = read_csv(text)
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        rebuilt: dict[str, Any] = {}
        for column, cell in row.items():
            if column == "other":
                rebuilt.update(json.loads(cell) if cell else {})
            elif cell != "":
                value = cell[1:] if cell.startswith("'") else cell
                rebuilt[column] = int(value) if column in INT_COLUMNS else value
        assert rebuilt == record  # nothing lost, nothing added


def test_csv_is_rfc4180_with_crlf(records: list[dict[str, Any]]) -> None:
    text = "".join(iter_csv(records))
    assert text.split("\r\n", 1)[0] == "\ufeff" + ",".join(CSV_COLUMNS)
    assert text.endswith("\r\n")
    assert '"/files/a,b ""c"".txt"' in text  # quoted, inner quotes doubled


@pytest.mark.parametrize(("value", "cell"), [
    ("=HYPERLINK(\"x\")", "'=HYPERLINK(\"x\")"),
    ("+1", "'+1"),
    ("-2", "'-2"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\tbob", "'\\x09bob"),
    ("\rx", "'\\x0dx"),
    ("alice", "alice"),
    ("田中", "田中"),
    ("a=b", "a=b"),
    (403, "403"),
    (None, ""),
    ("\u202eevil", "\\u202eevil"),  # a bidi override from a tampered file is shown escaped
    ("\ud800", "\\ud800"),  # a lone surrogate cannot break the UTF-8 encoding
    # Full-width starters, which Excel on Japanese Windows runs like their ASCII forms:
    ("\uff1dHYPERLINK(\"x\")", "'\uff1dHYPERLINK(\"x\")"),
    ("\uff0b1", "'\uff0b1"),
    ("\uff0d2", "'\uff0d2"),
    ("\uff20SUM(A1)", "'\uff20SUM(A1)"),
    # A starter after leading whitespace:
    (" =1+1", "' =1+1"),
    ("   +1", "'   +1"),
    ("\u3000\uff1d1", "'\u3000\uff1d1"),  # ideographic space, full-width equals
    ("\u00a0@x", "'\u00a0@x"),
    ("\n=1", "'\\x0a=1"),  # LF is escaped for display, and prefixed
    # Harmless: a starter that is not the first non-blank character, or no starter at all.
    ("a\uff1db", "a\uff1db"),
    ("\u7530\u4e2d \uff0b1", "\u7530\u4e2d \uff0b1"),
    (" alice", " alice"),
    ("\u3000", "\u3000"),
    ("", ""),
    ("'=x", "'=x"),  # already a text cell in a spreadsheet
])
def test_safe_cell(value: object, cell: str) -> None:
    assert safe_cell(value) == cell
    cell.encode("utf-8")


def test_formula_cells_in_an_export(records: list[dict[str, Any]]) -> None:
    rows = read_csv("".join(iter_csv(records)))
    assert rows[2]["user"] == "'=HYPERLINK(\"http://evil\")"
    assert rows[3]["user"] == "'+1" and rows[3]["path"] == "'-2"
    assert rows[3]["reason"] == "'@SUM(A1)" and rows[3]["status"] == "403"
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r"))


def test_other_column_holds_the_rest_as_compact_json(records: list[dict[str, Any]]) -> None:
    rows = read_csv("".join(iter_csv(records)))
    kill = next(r for r in rows if r["event"] == "admin.session_kill")
    assert kill["other"] == '{"operator":"root"}'
    end = next(r for r in rows if r["event"] == "access.end")
    assert json.loads(end["other"]) == {"error": "upstream_timeout"}
    start = rows[0]
    assert start["event"] == "audit.start" and json.loads(start["other"])["key_id"]


def test_japanese_names_are_utf8_with_bom(records: list[dict[str, Any]]) -> None:
    data = "".join(iter_csv(records)).encode("utf-8")
    assert data.startswith(b"\xef\xbb\xbf")
    assert "田中太郎".encode() in data
    assert data.decode("utf-8-sig").startswith("ts,seq")
    no_bom = "".join(iter_csv(records, bom=False))
    assert no_bom.startswith("ts,seq,")


def test_jsonl_is_exact(records: list[dict[str, Any]]) -> None:
    text = "".join(iter_jsonl(records))
    lines = text.split("\n")
    assert lines[-1] == ""
    assert [json.loads(line) for line in lines[:-1]] == records
    assert "田中太郎" in text  # readable UTF-8, not \\u escapes
    assert list(iter_jsonl([])) == []
    assert "".join(iter_csv([])) == "\ufeff" + ",".join(CSV_COLUMNS) + "\r\n"


def test_exports_stream_in_bounded_chunks() -> None:
    consumed = 0

    def many() -> Iterator[dict[str, Any]]:
        nonlocal consumed
        for n in range(5000):
            consumed += 1
            yield {"ts": "2026-11-27T09:00:00+09:00", "seq": n + 1, "event": "access.allow",
                   "user": "alice", "path": "/x" * 20}

    for exporter in (iter_csv, iter_jsonl):
        consumed = 0
        chunks = exporter(many())
        first = next(chunks)
        assert consumed < 5000  # the first chunk came before the records ran out
        assert CHUNK_CHARS <= len(first) < CHUNK_CHARS + 1000
        rest = list(chunks)
        assert len(rest) >= 3
        assert all(len(chunk) < CHUNK_CHARS + 1000 for chunk in rest)
        assert consumed == 5000
