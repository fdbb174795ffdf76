"""Tests for gatewayd.audit.chain: canonical form, record hash, checking stored lines."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from gatewayd.audit.chain import (
    GENESIS_PREV,
    LineDefect,
    canonical_json,
    check_line,
    is_hash,
    parse_line,
    record_hash,
)


def sealed(**fields: Any) -> dict[str, Any]:
    record = {"ts": "2026-11-27T17:10:56.123456+09:00", "seq": 1, "event": "auth.success",
              "node": "gw1", "prev": GENESIS_PREV, **fields}
    return {**record, "hash": record_hash(record)}


def line_of(record: dict[str, Any]) -> bytes:
    return canonical_json(record).encode("utf-8")


def test_canonical_json_is_sorted_compact_utf8() -> None:
    text = canonical_json({"b": 1, "a": "山田", "c": {"y": 2, "x": 1}})
    assert text == '{"a":"山田","b":1,"c":{"x":1,"y":2}}'


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


def test_genesis_prev_is_64_zeros() -> None:
    assert GENESIS_PREV == "0" * 64
    assert is_hash(GENESIS_PREV)
    assert not is_hash("0" * 63) and not is_hash("A" * 64) and not is_hash(None)


def test_record_hash_is_sha256_of_canonical_form_without_hash() -> None:
    record = sealed(user="alice")
    body = {k: v for k, v in record.items() if k != "hash"}
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert record["hash"] == expected == record_hash(record)
    # prev is part of the hashed form: the hash covers the previous hash
    assert record_hash({**record, "prev": "1" * 64}) != record["hash"]


def test_check_line_accepts_a_sealed_record() -> None:
    check = check_line(line_of(sealed(user="alice")))
    assert check.ok and check.record is not None and check.record["user"] == "alice"


@pytest.mark.parametrize(
    ("line", "defect", "detail"),
    [
        (b"\xff\xfe", LineDefect.MALFORMED, "UTF-8"),
        (b"{oops", LineDefect.MALFORMED, "JSON"),
        (b"[1,2]", LineDefect.MALFORMED, "object"),
        (b"", LineDefect.MALFORMED, "JSON"),
        (b'{"seq":1}', LineDefect.MALFORMED, "'ts'"),
        (b'{"a":NaN}', LineDefect.MALFORMED, "not text or an integer"),
    ],
)
def test_check_line_rejects_non_records(line: bytes, defect: LineDefect, detail: str) -> None:
    check = check_line(line)
    assert check.defect is defect and detail in check.detail


@pytest.mark.parametrize("bad", [{"seq": 0}, {"seq": True}, {"seq": "1"}, {"prev": "x"},
                                 {"hash": "0" * 63}, {"node": 5}])
def test_check_line_requires_keys_of_the_right_type(bad: dict[str, Any]) -> None:
    record = {**sealed(), **bad}
    check = check_line(line_of(record))
    assert check.defect is LineDefect.MALFORMED


def test_check_line_detects_changed_content_and_non_canonical_bytes() -> None:
    record = sealed(user="alice")
    changed = line_of({**record, "user": "mallory"})
    assert check_line(changed).defect is LineDefect.EDITED
    spaced = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()  # ", " and ": "
    assert check_line(spaced).defect is LineDefect.EDITED
    escaped = line_of(record).replace(b'"alice"', b'"\\u0061lice"')  # same value, other bytes
    assert check_line(escaped).defect is LineDefect.EDITED
    duplicate = line_of(record)[:-1] + b',"user":"alice"}'
    assert check_line(duplicate).defect is LineDefect.EDITED


# --------------------------------------------------------------------------- hostile lines


def with_extra(raw_member: bytes) -> bytes:
    """A sealed record's line with one more raw JSON member spliced in before the ``}``."""
    return line_of(sealed(user="x"))[:-1] + b"," + raw_member + b"}"


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        pytest.param(with_extra(b'"z":"\\ud800"'), "surrogate", id="lone-surrogate-value"),
        pytest.param(b"[" * 100_000, "nested too deeply", id="deep-array"),
        pytest.param(b'{"a":' * 100_000, "nested too deeply", id="deep-object"),
        pytest.param(with_extra(b'"z":[[[1]]]'), "not text or an integer", id="nested-value"),
        pytest.param(with_extra(b'"z":1.5'), "not text or an integer", id="float-value"),
        pytest.param(with_extra(b'"z":null'), "not text or an integer", id="null-value"),
        pytest.param(with_extra(b'"z":true'), "not text or an integer", id="bool-value"),
    ],
)
def test_hostile_lines_are_malformed_not_exceptions(line: bytes, detail: str) -> None:
    check = check_line(line)
    assert check.defect is LineDefect.MALFORMED
    assert detail in check.detail
    assert check.detail.isprintable()


def test_parse_line_refuses_what_readers_could_not_handle() -> None:
    assert parse_line(b"[" * 100_000) is None
    assert parse_line(b'{"seq":1,"z":[1]}') is None
    assert parse_line(b'{"seq":1,"user":"a"}') == {"seq": 1, "user": "a"}


def test_surrogate_record_with_a_matching_hash_is_still_malformed() -> None:
    """Even a forger who hashes the decoded value cannot make such a line canonical."""
    body = {"ts": "2026-11-27T17:10:56.123456+09:00", "seq": 1, "event": "auth.success",
            "node": "gw1", "prev": GENESIS_PREV, "user": "\ud800"}
    body["hash"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    line = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()  # ensure_ascii
    assert b'"user":"\\ud800"' in line  # a JSON escape of a lone surrogate
    assert check_line(line).defect is LineDefect.MALFORMED


@pytest.mark.parametrize("ts", ["yesterday", "2026-11-27T17:10:56", "", "2026-13-01T00:00Z"])
def test_ts_must_be_an_iso_time_with_offset(ts: str) -> None:
    check = check_line(line_of(sealed(ts=ts)))
    assert check.defect is LineDefect.MALFORMED
    assert "'ts'" in check.detail
