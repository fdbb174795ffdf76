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
structlog's global configuration is never touched (tests run several gateways in one process).

The standard library's ``logging`` — what the gatewayd modules themselves (``log =
logging.getLogger(__name__)``), asyncssh, aiohttp and asyncio write to — goes through the same
renderer: `StdlibLogging` puts one `OperationalHandler` (a ``structlog.stdlib.ProcessorFormatter``)
on the root logger, so those lines carry ``level``, ``logger`` and ``node``, the ``<N>`` prefix
on the journal, and an exception as an ``exception`` field of the one line. The configured level
applies to the ``gatewayd`` logger hierarchy (whose level is set to it); every other logger's
records are written from WARNING up only, so asyncssh's and aiohttp's chatter does not flood the
log. Without it nothing configured the stdlib loggers: Python's last-resort handler printed
WARNING and up only, bare, and a traceback as many journal entries.

The handler belongs to whoever holds it (a `gatewayd.app.Gateway`, from ``start`` to ``stop``);
the process keeps one however many holders there are (tests run several gateways in one process:
the latest ``attach`` sets format, level and node), and the last ``detach`` removes it and gives
the ``gatewayd`` logger its previous level back. Its bookkeeping lives on the handler, which
lives on the root logger — none in this module.
"""

from __future__ import annotations

import contextlib
import logging
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


STDLIB_SCOPE: Final = "gatewayd"
"""The logger hierarchy the configured level applies to (every gatewayd module's logger)."""
FOREIGN_FLOOR: Final = logging.WARNING
"""Records of every other logger (asyncssh, aiohttp, asyncio, …) are written from this level."""


def _final_renderer(log_format: LogFormat, journal: bool) -> Any:
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    return JournalLine(renderer) if journal else renderer


def _timestamp(journal: bool) -> list[Any]:
    """The journal stamps every entry itself; elsewhere the line carries an ISO UTC time."""
    return [] if journal else [structlog.processors.TimeStamper(fmt="iso", utc=True)]


def make_operational_logger(
    *, level: str, log_format: LogFormat, node: str, stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The operational logger: ``level`` and up, JSON or console, journald-aware."""
    out = stream if stream is not None else sys.stderr
    journal = stream_is_journal(out, os.environ if environ is None else environ)
    processors: list[Any] = [structlog.processors.add_log_level, *_timestamp(journal),
                             structlog.processors.format_exc_info,
                             _final_renderer(log_format, journal)]
    return structlog.wrap_logger(
        structlog.PrintLogger(file=out),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        processors=processors,
        context_class=dict,
        cache_logger_on_first_use=True,
        node=node,
    )


class _AddNode:
    """Foreign (stdlib) records get the ``node`` field the structlog logger binds."""

    def __init__(self, node: str) -> None:
        self._node = node

    def __call__(self, logger: Any, method_name: str,
                 event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("node", self._node)
        return event_dict


def make_stdlib_formatter(
    *, log_format: LogFormat, node: str, journal: bool,
) -> structlog.stdlib.ProcessorFormatter:
    """A ``logging.Formatter`` writing stdlib records as the operational logger writes its own.

    Fields: ``event`` (the %-formatted message), ``level``, ``logger`` (the record's logger
    name), ``node``, ``session`` when the record was logged with ``extra={"session": handle}``
    (a non-secret handle), ``timestamp`` off the journal, ``exception`` (the traceback, inside
    the one line) when the record carries exc_info.
    """
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            _AddNode(node),
            structlog.stdlib.ExtraAdder(allow=("session",)),
            *_timestamp(journal),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _final_renderer(log_format, journal),
        ],
    )


def _in_scope(name: str) -> bool:
    return name == STDLIB_SCOPE or name.startswith(STDLIB_SCOPE + ".")


class OperationalHandler(logging.StreamHandler[TextIO]):
    """The one root-logger handler `StdlibLogging` holders share; see the module docstring.

    ``holders`` and ``scope_level_before`` are the sharing's bookkeeping: who holds it, and the
    ``gatewayd`` logger's level to restore when the last holder lets go.
    """

    def __init__(self, stream: TextIO | None, scope_level_before: int) -> None:
        self._fixed: TextIO | None = None
        super().__init__(stream)
        self.use(stream)
        self.holders: set[StdlibLogging] = set()
        self.scope_level_before = scope_level_before

    def use(self, stream: TextIO | None) -> None:
        """Write to ``stream``, or (None) to whatever ``sys.stderr`` is at each write — as
        logging's own last-resort handler does, so a replaced and closed stderr (a test's
        capture, a daemon's redirection) is never written to after it is gone."""
        self._fixed = stream

    @property
    def stream(self) -> TextIO:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self._fixed = value

    def flush(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # a stream closed under us: nothing to do
            super().flush()

    def filter(self, record: logging.LogRecord) -> bool:
        if not _in_scope(record.name) and record.levelno < max(FOREIGN_FLOOR, self.level):
            return False  # asyncssh, aiohttp, asyncio …: warnings and up only
        return bool(super().filter(record))


class StdlibLogging:
    """One holder's claim on the process's `OperationalHandler` (``attach`` … ``detach``)."""

    def __init__(self) -> None:
        self._handler: OperationalHandler | None = None

    @property
    def attached(self) -> bool:
        return self._handler is not None

    def attach(
        self, *, level: str, log_format: LogFormat, node: str, stream: TextIO | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Route stdlib logging through the operational format at ``level`` (``"info"``, …).

        Installs the handler if no holder has, else (re)configures the one there is: calling it
        again (a reload) applies a new level, format or node. Idempotent.
        """
        out = stream if stream is not None else sys.stderr
        journal = stream_is_journal(out, os.environ if environ is None else environ)
        number = logging.getLevelNamesMapping()[level.upper()]
        root, scope = logging.getLogger(), logging.getLogger(STDLIB_SCOPE)
        handler = next((h for h in root.handlers if isinstance(h, OperationalHandler)), None)
        if handler is None:
            handler = OperationalHandler(stream, scope_level_before=scope.level)
            root.addHandler(handler)
        else:
            handler.use(stream)
        handler.setFormatter(make_stdlib_formatter(log_format=log_format, node=node,
                                                   journal=journal))
        handler.setLevel(number)
        scope.setLevel(number)
        handler.holders.add(self)
        self._handler = handler

    def detach(self) -> None:
        """Let go; the last holder removes the handler and restores the ``gatewayd`` level."""
        handler, self._handler = self._handler, None
        if handler is None:
            return
        handler.holders.discard(self)
        if handler.holders:
            return
        logging.getLogger().removeHandler(handler)
        logging.getLogger(STDLIB_SCOPE).setLevel(handler.scope_level_before)
        handler.flush()
        handler.close()
