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
        (b'{"a":NaN}', LineDefect.MALFORMED, "'ts'"),
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
