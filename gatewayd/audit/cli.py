"""The ``gatewayd audit`` command: ``verify``, ``query`` and ``export`` (offline, read-only).

Owns `register`, which the root CLI calls with its subparsers; each subcommand sets
``func`` to a callable taking the parsed Namespace and returning the exit status.

Exit status (DESIGN.md): ``verify`` 0 = intact (warnings allowed), 1 = tampered or damaged,
2 = usage error (missing/unreadable file, unreadable or missing public key). ``query`` and
``export`` 0 = at least one record matched, 1 = none matched (like grep), 2 = usage error.

``query`` and ``export`` take the same filters (`RecordFilter`): ``--user --event --service
--device --session --source-ip --result success|failure --text --since --until``.
``export --format csv|jsonl`` writes to stdout or, with ``--out PATH``, to a new file that is
renamed into place when complete (mode 0600: exports hold personal data; an input file is
never overwritten). With no match the export still holds the CSV header (an empty file for
JSON Lines) and the exit status is 1. Formats: see `export`.

``query --since/--until`` read a time without an offset in ``--tz`` (default Asia/Tokyo, the
default ``audit.timezone``): records are written in the log's time zone, so that is the zone
in which security staff read and type times — never the server's local time.

``verify`` checks **the whole log** — a missing beginning is then tampering (``missing_file``,
exit 1) unless signed ``audit.retention`` records account for it — when ``--complete`` is
given, or by default whenever every rotated file next to the log is among the files given
(``audit.log*``: what an operator means by "verify the log"), whatever else is given and
whether or not the live file exists (it does not between a rotation and the next record).
Only a file set that leaves out a rotated file is checked as a subset by default; anyone able
to write the directory can add files, but not make a glob leave one out. A file given that
is neither the live file nor one of its rotated files (``audit.log.bak`` beside
``audit.log``) is named in a warning on stderr and verified with the rest; verify reports an
empty one as ``malformed``. ``--partial`` checks a chosen subset instead: a chain starting
mid-way is then only a warning. The output says which (``checked as:`` line;
``"complete"`` in ``--json``).

Arguments may come from a shell glob such as ``audit.log*``: public-key files (``*.pub``,
``*.pub.<id>``), the writer's lock file (``*.lock``) and quarantined torn lines (``*.torn-*``)
are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gatewayd.audit import files
from gatewayd.audit.events import display_text
from gatewayd.audit.export import iter_csv, iter_jsonl
from gatewayd.audit.query import (
    RESULTS,
    RecordFilter,
    json_line,
    query_records,
    table_header,
    table_row,
)
from gatewayd.audit.signing import AuditKeyError
from gatewayd.audit.verify import VerifyResult, verify_files
from gatewayd.audit.writer import DEFAULT_TIMEZONE
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify``, ``audit query`` and ``audit export`` to the root parser."""
    audit = subparsers.add_parser(
        "audit", help="verify or search the tamper-evident audit log",
        description="Verify the hash chain and signatures of audit files, or search them.",
    )
    commands = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    _add_verify(commands)
    _add_query(commands)
    _add_export(commands)


def _add_verify(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    verify = commands.add_parser(
        "verify", help="check audit files for tampering",
        description="Check the hash chain, seq order and checkpoint signatures of audit files "
        "(live and rotated, any order). Exit 0 intact, 1 tampered/damaged, 2 usage error.",
    )
    verify.add_argument("files", nargs="+", type=Path, metavar="FILE")
    verify.add_argument(
        "--key", action="append", type=Path, metavar="PUB",
        help="Ed25519 public key (PEM); repeat for old keys. Default: FILE.pub next to the log. "
        "Prefer a copy kept off the gateway host.",
    )
    verify.add_argument(
        "--sealed", action="store_true",
        help="the log is closed/archived: records after the last checkpoint are an error",
    )
    scope = verify.add_mutually_exclusive_group()
    scope.add_argument(
        "--complete", action="store_true",
        help="the files are the whole log: a missing beginning not accounted for by signed "
        "audit.retention records is an error (default when every rotated file of the log "
        "is among the files given)",
    )
    scope.add_argument(
        "--partial", action="store_true",
        help="the files are a subset: a chain starting mid-way is only a warning",
    )
    verify.add_argument("--json", action="store_true", help="print the result as one JSON object")
    verify.set_defaults(func=run_verify)


def _add_query(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    query = commands.add_parser(
        "query", help="search audit records",
        description="Print matching audit records (does not verify; run `audit verify`). "
        "Times given without an offset are read in --tz (default "
        f"{DEFAULT_TIMEZONE.key}), not in the server's local time. "
        "Exit 0 if something matched, 1 if nothing matched, 2 on usage errors.",
    )
    query.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _add_filters(query)
    query.add_argument("--json", action="store_true", help="one JSON object per line")
    query.set_defaults(func=run_query)


def _add_export(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser(
        "export", help="export audit records as CSV or JSON Lines",
        description="Write matching audit records as CSV (UTF-8 with BOM, stable column order, "
        "formula-injection safe) or JSON Lines (does not verify; run `audit verify`). "
        "Exit 0 if something matched, 1 if nothing matched, 2 on usage errors.",
    )
    export.add_argument("files", nargs="+", type=Path, metavar="FILE")
    export.add_argument("--format", required=True, choices=("csv", "jsonl"),
                        help="csv (columns: see `gatewayd.audit.export`) or jsonl")
    export.add_argument("--out", type=Path, metavar="PATH",
                        help="write to this file (created when complete, mode 0600) "
                        "instead of stdout")
    export.add_argument("--no-bom", action="store_true",
                        help="CSV without the UTF-8 byte order mark (Excel then misreads "
                        "non-ASCII text such as Japanese names)")
    _add_filters(export)
    export.set_defaults(func=run_export)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    """The record filters shared by ``query`` and ``export`` (see `query.RecordFilter`)."""
    parser.add_argument("--user", help="exact user name")
    parser.add_argument("--event", help="event name or pattern, e.g. 'access.*'")
    parser.add_argument("--service", help="exact service name")
    parser.add_argument("--device", help="exact device id")
    parser.add_argument("--session", help="exact session id")
    parser.add_argument("--source-ip", dest="source_ip", metavar="IP",
                        help="exact client address")
    parser.add_argument("--result", choices=RESULTS,
                        help="failure: refusals, errors, status >= 400, failed actions; "
                        "success: the rest (step-ups and the log's own records are neither)")
    parser.add_argument("--text", help="case-insensitive text anywhere in a record's values")
    parser.add_argument("--since", type=_iso_time, metavar="ISO",
                        help="from this time (inclusive); without an offset: in ZONE (--tz)")
    parser.add_argument("--until", type=_iso_time, metavar="ISO",
                        help="up to this time (exclusive); without an offset: in ZONE (--tz)")
    parser.add_argument(
        "--tz", type=zone_argument, default=DEFAULT_TIMEZONE, metavar="ZONE",
        help="IANA time zone for --since/--until given without an offset (default: "
        f"{DEFAULT_TIMEZONE.key}, the default audit.timezone). Records are written in the "
        "log's audit.timezone, so pass that zone if it was changed. A time with an offset "
        "(+09:00, Z) is exact and ignores --tz.",
    )


def record_filter(args: argparse.Namespace) -> RecordFilter:
    """The `RecordFilter` the parsed filter options describe (raises ValueError if invalid)."""
    since = None if args.since is None else in_zone(args.since, args.tz)
    until = None if args.until is None else in_zone(args.until, args.tz)
    return RecordFilter(
        user=args.user, event=args.event, service=args.service, since=since, until=until,
        device=args.device, session=args.session, source_ip=args.source_ip,
        result=args.result, text=args.text,
    )


def _iso_time(text: str) -> datetime:
    """argparse type: an ISO 8601 date or date-time, kept naive if it has no offset.

    The zone for a naive value is applied later (`in_zone`) because it depends on ``--tz``,
    which argparse may not have read yet.
    """
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc


def zone_argument(name: str) -> ZoneInfo:
    """argparse type: an IANA time zone name such as ``Asia/Tokyo`` or ``UTC``."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"unknown time zone {name!r} (expected an IANA name like 'Asia/Tokyo')"
        ) from exc


def in_zone(moment: datetime, zone: tzinfo) -> datetime:
    """``moment`` unchanged if it has an offset; otherwise the same wall-clock time in ``zone``.

    Not the server's local time: records carry times in the log's zone (``audit.timezone``),
    and security staff read "09:00" off those records, often on a host set to UTC.
    """
    return moment if moment.utcoffset() is not None else moment.replace(tzinfo=zone)


def parse_time(text: str, zone: tzinfo = DEFAULT_TIMEZONE) -> datetime:
    """ISO 8601 date or date-time; a value without an offset is a time in ``zone``."""
    return in_zone(_iso_time(text), zone)


def _shown(path: Path | str) -> str:
    """A file name made safe to print: names are attacker-chosen bytes (not UTF-8, controls)."""
    return display_text(str(path))


def log_files(paths: list[Path], prog: str, err: TextIO) -> list[Path] | None:
    """Drop key/lock/quarantine files a glob picked up (with a note); None (after a message)
    when a file is missing or unreadable or no log is left. Also used by `gatewayd report`."""
    logs: list[Path] = []
    for path in paths:
        if not files.is_log_name(path.name):
            print(f"{prog}: skipping {_shown(path)} (not an audit log)", file=err)
            continue
        if not path.is_file() or not os.access(path, os.R_OK):
            print(f"{prog}: error: {_shown(path)}: no such readable file", file=err)
            return None
        logs.append(path)
    if not logs:
        print(f"{prog}: error: no audit log files given", file=err)
        return None
    return logs


def run_verify(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    paths = log_files(args.files, "gatewayd audit verify", err)
    if paths is None:
        return EXIT_USAGE
    try:
        for extra in foreign_files(paths):
            print(f"gatewayd audit verify: warning: {_shown(extra)} is neither the live file "
                  "nor a rotated file of the log; verified with the rest", file=err)
        complete = args.complete or (not args.partial and is_whole_log(paths))
        result = verify_files(paths, args.key, require_sealed=args.sealed,
                              require_complete=complete)
    except (AuditKeyError, OSError) as exc:
        print(f"gatewayd audit verify: error: {display_text(str(exc))}", file=err)
        return EXIT_USAGE
    if args.json:
        print(json_line({**result.to_json(), "complete": complete}), file=out)
    else:
        _print_verdict(result, out)
        print(f"  checked as: {_scope_text(complete, forced=args.complete)}", file=out)
    return EXIT_OK if result.ok else EXIT_NEGATIVE


def is_whole_log(paths: list[Path]) -> bool:
    """Whether every rotated file of the log(s) ``paths`` belong to is among ``paths``.

    Extra files and a live file that does not exist do not matter: only a file left out
    makes the set a subset (see the module docstring). Raises OSError if a directory cannot
    be listed or a path cannot be resolved.
    """
    given = {path.resolve() for path in paths}
    lives = {files.live_path_of(path) for path in paths}
    return all(p.resolve() in given for live in lives for p in files.rotated_siblings(live))


def foreign_files(paths: list[Path]) -> list[Path]:
    """The files given that only look like the log's: ``<log>.<anything>`` that is not a
    rotated file name, where ``<log>`` is the live file of another file given."""
    lives = {files.live_path_of(path) for path in paths}
    return [path for path in paths if files.live_path_of(path) == path and any(
        live != path and live.parent == path.parent and path.name.startswith(live.name + ".")
        for live in lives)]


def _scope_text(complete: bool, *, forced: bool) -> str:
    if complete:
        why = "--complete" if forced else "all its rotated files were given"
        return (f"the whole log ({why}): a missing beginning must be accounted for by signed "
                "audit.retention records")
    return ("a subset (--partial, or a rotated file of the log was not given): a "
            "missing beginning is only a warning; --complete to require the whole log")


def _print_verdict(result: VerifyResult, out: TextIO) -> None:
    if result.ok:
        span = (f" (seq {result.first_seq}-{result.last_seq})"
                if result.first_seq is not None else "")
        print(f"OK: {len(result.files)} file(s), {result.records} records{span}, "
              f"{result.checkpoints} checkpoint(s)", file=out)
    else:
        print(f"TAMPERED: first bad seq {result.first_bad_seq}: {result.kind}", file=out)
        print(f"  {display_text(result.problem)}", file=out)
        print(f"  {result.records} records verified before the problem", file=out)
    cp = result.last_checkpoint
    if cp is not None:
        text = (f"last good checkpoint: seq {cp.seq} at {cp.ts} ({cp.reason}) in "
                f"{cp.file.name}, covering seq {cp.covers_seq}, key {cp.key_id}")
        print(f"  {display_text(text)}", file=out)
    print("  files in chain order: " + " ".join(_shown(p.name) for p in result.files), file=out)
    for warning in result.warnings:
        print(f"  warning: {display_text(warning)}", file=out)


def _warn_malformed(err: TextIO) -> Callable[[Path, int], None]:
    def malformed(path: Path, line: int) -> None:
        print(f"warning: {_shown(path)}:{line}: not a valid record, skipped "
              "(run `gatewayd audit verify`)", file=err)

    return malformed


def _filter_or_error(args: argparse.Namespace, command: str, err: TextIO) -> RecordFilter | None:
    try:
        return record_filter(args)
    except ValueError as exc:
        print(f"gatewayd audit {command}: error: {display_text(str(exc))}", file=err)
        return None


def run_query(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    paths = log_files(args.files, "gatewayd audit query", err)
    wanted = _filter_or_error(args, "query", err)
    if paths is None or wanted is None:
        return EXIT_USAGE
    records = query_records(paths, wanted, on_malformed=_warn_malformed(err))
    try:
        matched = _print_records(records, out, as_json=args.json)
    except BrokenPipeError:
        # Reader went away (`| head`): stop quietly, as a filter should.
        _silence_stdout()
        return EXIT_OK
    return EXIT_OK if matched else EXIT_NEGATIVE


def _print_records(
    records: Iterable[Mapping[str, Any]], out: TextIO, *, as_json: bool
) -> int:
    matched = 0
    for record in records:
        if matched == 0 and not as_json:
            print(table_header(), file=out)
        matched += 1
        if as_json:
            print(json_line(record), file=out)
        else:
            print(table_row(record), file=out)
    out.flush()
    return matched


class _Counted:
    """Pass records through while counting them (the exit status says whether any matched)."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        self._records = records
        self.count = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in self._records:
            self.count += 1
            yield record


def run_export(args: argparse.Namespace) -> int:
    err = sys.stderr
    paths = log_files(args.files, "gatewayd audit export", err)
    wanted = _filter_or_error(args, "export", err)
    if paths is None or wanted is None:
        return EXIT_USAGE
    if args.out is not None and not _usable_output(args.out, paths, err):
        return EXIT_USAGE
    records = _Counted(query_records(paths, wanted, on_malformed=_warn_malformed(err)))
    chunks = iter_csv(records, bom=not args.no_bom) if args.format == "csv" else iter_jsonl(
        records)
    try:
        if args.out is None:
            _write_chunks(chunks, sys.stdout.buffer)
        else:
            _write_file(chunks, args.out)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except OSError as exc:
        print(f"gatewayd audit export: error: {_shown(args.out)}: "
              f"{display_text(exc.strerror or str(exc))}", file=err)
        return EXIT_USAGE
    return EXIT_OK if records.count else EXIT_NEGATIVE


def _usable_output(out: Path, inputs: list[Path], err: TextIO) -> bool:
    """An --out PATH that is not an input file (evidence is never overwritten)."""
    if not out.parent.is_dir():
        print(f"gatewayd audit export: error: {_shown(out.parent)}: no such directory",
              file=err)
        return False
    if out.exists() and any(_same_file(out, path) for path in inputs):
        print(f"gatewayd audit export: error: {_shown(out)} is one of the input files",
              file=err)
        return False
    if out.exists() and not out.is_file():
        print(f"gatewayd audit export: error: {_shown(out)} is not a regular file", file=err)
        return False
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _write_chunks(chunks: Iterable[str], stream: BinaryIO) -> None:
    for chunk in chunks:
        stream.write(chunk.encode("utf-8"))
    stream.flush()


def _write_file(chunks: Iterable[str], out: Path) -> None:
    """Write to a temporary file next to ``out`` and rename it into place when complete, so
    a cut export never looks like a finished one."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as stream:
            _write_chunks(chunks, stream)
            os.fsync(stream.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that does not fail.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
