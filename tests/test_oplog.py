"""gatewayd.oplog: operational log lines, journald-friendly when stderr is the journal."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

import pytest

from gatewayd.oplog import make_operational_logger, stream_is_journal


def journal_env(stream: TextIO) -> dict[str, str]:
    stat = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}


def lines(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


@pytest.fixture
def stream(tmp_path: Path) -> TextIO:
    return (tmp_path / "stderr").open("w+")


def test_journal_stream_must_name_this_very_stream(stream: TextIO, tmp_path: Path) -> None:
    assert stream_is_journal(stream, journal_env(stream))
    with (tmp_path / "other").open("w") as other:  # inherited, but stderr was redirected
        assert not stream_is_journal(stream, journal_env(other))
    assert not stream_is_journal(stream, {})
    assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
    assert not stream_is_journal(stream, {"JOURNAL_STREAM": "1:x"})


def test_journal_lines_carry_the_priority_and_no_timestamp(stream: TextIO) -> None:
    log = make_operational_logger(level="debug", log_format="json", node="gw1", stream=stream,
                                  environ=journal_env(stream))
    log.debug("d")
    log.info("i", n=1)
    log.warning("w")
    log.error("e")
    log.critical("c")
    out = lines(stream)
    assert [line[:3] for line in out] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    info = json.loads(out[1][3:])
    assert info == {"event": "i", "n": 1, "level": "info", "node": "gw1"}  # no timestamp


def test_a_traceback_stays_one_journal_entry(stream: TextIO) -> None:
    log = make_operational_logger(level="info", log_format="console", node="gw1",
                                  stream=stream, environ=journal_env(stream))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    out = lines(stream)
    assert len(out) == 1
    assert out[0].startswith("<3>") and "it failed" in out[0]
    assert "RuntimeError: boom" in out[0] and "\\n" in out[0]


def test_outside_the_journal_the_format_is_unchanged(stream: TextIO) -> None:
    log = make_operational_logger(level="info", log_format="json", node="gw1", stream=stream,
                                  environ={})
    log.debug("not shown at info")
    log.warning("w", detail="x")
    out = lines(stream)
    assert len(out) == 1
    record = json.loads(out[0])  # no prefix: the line is plain JSON
    assert record["level"] == "warning" and record["detail"] == "x"
    assert record["timestamp"].endswith("Z")
