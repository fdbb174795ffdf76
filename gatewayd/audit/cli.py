"""The ``gatewayd audit`` command: ``verify`` and ``query`` (offline, read-only).

Owns `register`, which the root CLI calls with its subparsers; each subcommand sets
``func`` to a callable taking the parsed Namespace and returning the exit status.

Exit status (DESIGN.md): ``verify`` 0 = intact (warnings allowed), 1 = tampered or damaged,
2 = usage error (missing/unreadable file, unreadable or missing public key). ``query``
0 = at least one record matched, 1 = none matched (like grep), 2 = usage error.

``query --since/--until`` read a time without an offset in ``--tz`` (default Asia/Tokyo, the
default ``audit.timezone``): records are written in the log's time zone, so that is the zone
in which security staff read and type times — never the server's local time.

Arguments may come from a shell glob such as ``audit.log*``: public-key files (``*.pub``,
``*.pub.<id>``), the writer's lock file (``*.lock``) and quarantined torn lines (``*.torn-*``)
are skipped with a note on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Final, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gatewayd.audit.events import display_text
from gatewayd.audit.query import json_line, query_files, table_header, table_row
from gatewayd.audit.signing import AuditKeyError
from gatewayd.audit.verify import VerifyResult, verify_files
from gatewayd.audit.writer import DEFAULT_TIMEZONE
from gatewayd.exits import EXIT_NEGATIVE, EXIT_OK, EXIT_USAGE

_NOT_A_LOG: Final = re.compile(
    r".*(\.pub|\.pub\.[0-9a-f]{16}|\.torn-[0-9T.]+(-\d+)?|\.tmp|\.lock)"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit verify`` and ``audit query`` to the root parser's subcommands."""
    audit = subparsers.add_parser(
        "audit", help="verify or search the tamper-evident audit log",
        description="Verify the hash chain and signatures of audit files, or search them.",
    )
    commands = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    _add_verify(commands)
    _add_query(commands)


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
    query.add_argument("--user", help="exact user name")
    query.add_argument("--event", help="event name or pattern, e.g. 'access.*'")
    query.add_argument("--service", help="exact service name")
    query.add_argument("--since", type=_iso_time, metavar="ISO",
                       help="from this time (inclusive); without an offset: in ZONE (--tz)")
    query.add_argument("--until", type=_iso_time, metavar="ISO",
                       help="up to this time (exclusive); without an offset: in ZONE (--tz)")
    query.add_argument(
        "--tz", type=_zone, default=DEFAULT_TIMEZONE, metavar="ZONE",
        help="IANA time zone for --since/--until given without an offset (default: "
        f"{DEFAULT_TIMEZONE.key}, the default audit.timezone). Records are written in the "
        "log's audit.timezone, so pass that zone if it was changed. A time with an offset "
        "(+09:00, Z) is exact and ignores --tz.",
    )
    query.add_argument("--json", action="store_true", help="one JSON object per line")
    query.set_defaults(func=run_query)


def _iso_time(text: str) -> datetime:
    """argparse type: an ISO 8601 date or date-time, kept naive if it has no offset.

    The zone for a naive value is applied later (`in_zone`) because it depends on ``--tz``,
    which argparse may not have read yet.
    """
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc


def _zone(name: str) -> ZoneInfo:
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


def _log_files(paths: list[Path], command: str, err: TextIO) -> list[Path] | None:
    """Drop key/quarantine files picked up by a glob; None (after a message) on usage error."""
    logs: list[Path] = []
    for path in paths:
        if _NOT_A_LOG.fullmatch(path.name):
            print(f"gatewayd audit {command}: skipping {_shown(path)} (not an audit log)",
                  file=err)
            continue
        if not path.is_file() or not os.access(path, os.R_OK):
            print(f"gatewayd audit {command}: error: {_shown(path)}: no such readable file",
                  file=err)
            return None
        logs.append(path)
    if not logs:
        print(f"gatewayd audit {command}: error: no audit log files given", file=err)
        return None
    return logs


def run_verify(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    paths = _log_files(args.files, "verify", err)
    if paths is None:
        return EXIT_USAGE
    try:
        result = verify_files(paths, args.key, require_sealed=args.sealed)
    except (AuditKeyError, OSError) as exc:
        print(f"gatewayd audit verify: error: {display_text(str(exc))}", file=err)
        return EXIT_USAGE
    if args.json:
        print(json_line(result.to_json()), file=out)
    else:
        _print_verdict(result, out)
    return EXIT_OK if result.ok else EXIT_NEGATIVE


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


def run_query(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    paths = _log_files(args.files, "query", err)
    if paths is None:
        return EXIT_USAGE

    def malformed(path: Path, line: int) -> None:
        print(f"warning: {_shown(path)}:{line}: not a valid record, skipped "
              "(run `gatewayd audit verify`)", file=err)

    since = None if args.since is None else in_zone(args.since, args.tz)
    until = None if args.until is None else in_zone(args.until, args.tz)
    records = query_files(
        paths, user=args.user, event=args.event, service=args.service,
        since=since, until=until, on_malformed=malformed,
    )
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


def _silence_stdout() -> None:
    # Python flushes stdout again at exit; point it at /dev/null so that does not fail.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
