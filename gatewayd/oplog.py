"""The operational log's format: one line per message on stderr, journald-friendly.

Owns how the operational logger (not the audit log) renders its lines. Under systemd the
service's stderr is a stream to the journal, and ``JOURNAL_STREAM`` names that stream's
device and inode (systemd.exec(5); sd_journal_stream_fd(3)). When stderr *is* that stream:

* each line starts with the sd-daemon(3) priority prefix — ``<2>`` critical, ``<3>`` error
  (and exceptions), ``<4>`` warning, ``<5>`` notice, ``<6>`` info, ``<7>`` debug — so
  ``journalctl -p warning`` and the colouring work;
* there is no timestamp of our own (the journal stamps every entry);
* a message is one line: any newline inside it (a console-format traceback) is written as
  ``\\n``, since the journal would make each physical line a separate entry.

Otherwise (a terminal, a file, a pipe, or stderr redirected away from the journal even though
the variable was inherited) the format is unchanged: JSON lines or console lines with an ISO
UTC timestamp. The logger is built with ``structlog.wrap_logger`` and every setting explicit:
nothing global is configured (tests run several gateways in one process).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType
from typing import IO, Any, Final, Literal, TextIO

import structlog

SD_PRIORITY: Final[Mapping[str, int]] = MappingProxyType({
    "critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "notice": 5,
    "info": 6, "debug": 7,
})
DEFAULT_PRIORITY: Final = 6

LogFormat = Literal["json", "console"]


def stream_is_journal(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether ``stream`` is the journal stream ``JOURNAL_STREAM`` (``DEV:INODE``) names."""
    device, sep, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not backed by a descriptor
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


class JournalLine:
    """Wraps the final renderer: the sd-daemon priority prefix, and one line per message."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str,
                 event_dict: MutableMapping[str, Any]) -> str:
        level = str(event_dict.get("level", method_name)).lower()
        text = str(self._renderer(logger, method_name, event_dict))
        one_line = text.rstrip("\n").replace("\r", "\\r").replace("\n", "\\n")
        return f"<{SD_PRIORITY.get(level, DEFAULT_PRIORITY)}>{one_line}"


def make_operational_logger(
    *, level: str, log_format: LogFormat, node: str, stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The operational logger: ``level`` and up, JSON or console, journald-aware."""
    out = stream if stream is not None else sys.stderr
    journal = stream_is_journal(out, os.environ if environ is None else environ)
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    processors: list[Any] = [structlog.processors.add_log_level]
    if not journal:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    processors += [structlog.processors.format_exc_info,
                   JournalLine(renderer) if journal else renderer]
    return structlog.wrap_logger(
        structlog.PrintLogger(file=out),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=processors,
        context_class=dict,
        cache_logger_on_first_use=True,
        node=node,
    )
