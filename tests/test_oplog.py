"""gatewayd.oplog: operational log lines, journald-friendly when stderr is the journal."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from gatewayd.app import Gateway
from gatewayd.config import Settings, settings_from_mapping
from gatewayd.oplog import (
    OperationalHandler,
    StdlibLogging,
    make_operational_logger,
    stream_is_journal,
)

REPO = Path(__file__).resolve().parent.parent


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


# --- the stdlib loggers (gatewayd's modules, asyncssh, aiohttp, asyncio) ----------------------

@pytest.fixture
def hold() -> Iterator[StdlibLogging]:
    holder = StdlibLogging()
    try:
        yield holder
    finally:
        holder.detach()


def operational_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, OperationalHandler)]


def test_stdlib_lines_share_the_journal_format(stream: TextIO, hold: StdlibLogging) -> None:
    hold.attach(level="info", log_format="json", node="gw1", stream=stream,
                environ=journal_env(stream))
    log = logging.getLogger("gatewayd.sessions_shared")
    log.debug("not shown at info")
    log.info("node %s restarted", "gw2")  # was lost: the last-resort handler starts at WARNING
    log.warning("session channel lost", extra={"session": "a1b2c3d4"})
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("node heartbeat failed")
    out = lines(stream)
    assert [line[:3] for line in out] == ["<6>", "<4>", "<3>"]  # one line per message
    assert json.loads(out[0][3:]) == {"event": "node gw2 restarted", "level": "info",
                                      "logger": "gatewayd.sessions_shared", "node": "gw1"}
    assert json.loads(out[1][3:])["session"] == "a1b2c3d4"
    failed = json.loads(out[2][3:])
    assert failed["event"] == "node heartbeat failed" and failed["level"] == "error"
    assert "ZeroDivisionError" in failed["exception"]  # the traceback is a field of the line


def test_without_a_stream_it_follows_stderr_as_it_is_now(
        hold: StdlibLogging, monkeypatch: pytest.MonkeyPatch) -> None:
    # stderr replaced after attach (a test's capture, a daemon's redirection) and the old one
    # closed: lines go to the new one, and letting go does not trip over the closed one.
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    hold.attach(level="info", log_format="json", node="gw1", environ={})
    monkeypatch.setattr(sys, "stderr", second)
    first.close()
    logging.getLogger("gatewayd.test").warning("after the swap")
    hold.detach()
    assert json.loads(second.getvalue().splitlines()[-1])["event"] == "after the swap"


def test_other_libraries_only_from_warning(stream: TextIO, hold: StdlibLogging) -> None:
    hold.attach(level="debug", log_format="json", node="gw1", stream=stream, environ={})
    for name in ("asyncssh", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.DEBUG)  # even when the logger lets it through
    try:
        logging.getLogger("asyncssh").info("chatter")
        logging.getLogger("aiohttp.access").info("GET / 200")
        logging.getLogger("asyncssh").warning("worth a look")
        logging.getLogger("gatewayd.tasks").debug("ours, at the configured level")
    finally:
        for name in ("asyncssh", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    records = [json.loads(line) for line in lines(stream)]
    assert [(r["logger"], r["event"]) for r in records] == [
        ("asyncssh", "worth a look"), ("gatewayd.tasks", "ours, at the configured level")]
    assert records[0]["timestamp"].endswith("Z")  # off the journal: our own timestamp


def test_console_traceback_of_a_stdlib_record_stays_one_entry(stream: TextIO,
                                                            hold: StdlibLogging) -> None:
    hold.attach(level="warning", log_format="console", node="gw1", stream=stream,
                environ=journal_env(stream))
    logging.getLogger("gatewayd.state.redis").info("below the configured level")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("gatewayd.state.redis").exception("it failed")
    out = lines(stream)
    assert len(out) == 1 and out[0].startswith("<3>")
    assert "RuntimeError: boom" in out[0] and "\\n" in out[0] and "gw1" in out[0]


def test_holders_share_one_handler_and_the_last_removes_it(stream: TextIO) -> None:
    scope = logging.getLogger("gatewayd")
    level_before = scope.level
    first, second = StdlibLogging(), StdlibLogging()
    try:
        first.attach(level="info", log_format="json", node="gw1", stream=stream, environ={})
        second.attach(level="info", log_format="json", node="gw2", stream=stream, environ={})
        assert len(operational_handlers()) == 1 and scope.level == logging.INFO
        second.attach(level="error", log_format="json", node="gw2", stream=stream, environ={})
        assert scope.level == logging.ERROR  # a reload's new level applies
        logging.getLogger("gatewayd.x").warning("below error now")
        logging.getLogger("gatewayd.x").error("written once")
        first.detach()
        assert len(operational_handlers()) == 1  # the second still holds it
        first.detach()  # idempotent
        second.detach()
        assert operational_handlers() == [] and scope.level == level_before
    finally:
        first.detach()
        second.detach()
    out = lines(stream)
    assert [json.loads(line)["event"] for line in out] == ["written once"]


async def test_a_gateway_holds_the_handler_from_start_to_stop(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def settings(name: str) -> Settings:
        shutil.copytree(REPO / "policies", tmp_path / name / "policies")
        return settings_from_mapping({
            "gateway": {"node": "gw-oplog", "state_dir": "state", "log_level": "info"},
            "metrics": {"listen": "127.0.0.1:0"},
            "admin": {"enabled": False},
            "policy": {"dir": "policies"},
            "audit": {"path": "log/audit.log", "signing_key": "state/audit.key"},
            "https": {"enabled": False},
        }, base_dir=tmp_path / name)

    gateways = [Gateway(settings("a")), Gateway(settings("b"))]
    for gateway in gateways:
        await gateway.start()
    try:
        assert len(operational_handlers()) == 1  # two gateways, one handler: no line twice
        logging.getLogger("gatewayd.sessions_shared").info("node %s restarted", "gw2")
        await gateways[0].stop()
        assert len(operational_handlers()) == 1
    finally:
        for gateway in gateways:
            await gateway.stop()
    assert operational_handlers() == []  # nothing left behind for the next test
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if '"gatewayd.sessions_shared"' in line]
    assert logged == [{"event": "node gw2 restarted", "level": "info",
                       "logger": "gatewayd.sessions_shared", "node": "gw-oplog",
                       "timestamp": logged[0]["timestamp"]}]
